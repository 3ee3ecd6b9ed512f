"""One pipeline: ``explorer fit`` and the app's Run button compute the same things after the fit.

Both call :func:`explorer.pipeline.derive`. These tests fit the same model with the same
seed through both paths (the CLI / ``run_velocity``, and the app's background job) and
check that the velocity graph, the projection on the UMAP and the confidence are
identical, bit for bit, and that the projection is scVelo's signed one.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from explorer.keys import Key
from explorer.pipeline import STEPS, derive, run_velocity


def _same_sparse(a, b) -> bool:
    a, b = sparse.csr_matrix(a), sparse.csr_matrix(b)
    return a.shape == b.shape and (a != b).nnz == 0


def _app_fit(adata, model: str, **params):
    """Fit through the app: ExplorerState.run_model -> Job (worker thread) -> fit_and_derive."""
    from explorer.app.state import ExplorerState

    state = ExplorerState(adata, dataset="sample")
    job = state.run_model(model, **params)
    assert job is not None
    assert job.join(600)
    assert job.outcome == "done", state.error
    return state, state.fit


@pytest.mark.parametrize("model", ["stochastic", "dynamical"])
def test_app_job_and_run_velocity_give_identical_results(sample_adata, model):
    cli = sample_adata.copy()
    run_velocity(cli, model=model, seed=0, model_params={"max_iter": 3} if model == "dynamical" else None)
    params = {"seed": 0, **({"max_iter": 3} if model == "dynamical" else {})}
    state, fit = _app_fit(sample_adata, model, **params)

    np.testing.assert_array_equal(fit.result.velocity, cli.layers[Key.layers.VELOCITY])
    assert _same_sparse(fit.derived.graph, cli.obsp[Key.obsp.VELOCITY_GRAPH])
    assert _same_sparse(fit.derived.graph_neg, cli.obsp[Key.obsp.VELOCITY_GRAPH_NEG])
    assert _same_sparse(fit.transitions, cli.obsp[Key.obsp.TRANSITIONS])
    np.testing.assert_array_equal(fit.velocity_embedding[Key.obsm.UMAP], cli.obsm["velocity_umap"])
    np.testing.assert_array_equal(fit.confidence, cli.obs[Key.obs.VELOCITY_CONFIDENCE].to_numpy(np.float32))
    # what the app exports is what the CLI writes
    out = state.results_adata()
    for key in (Key.obsp.VELOCITY_GRAPH, Key.obsp.VELOCITY_GRAPH_NEG, Key.obsp.TRANSITIONS):
        assert _same_sparse(out.obsp[key], cli.obsp[key]), key
    np.testing.assert_array_equal(out.obsm["velocity_umap"], cli.obsm["velocity_umap"])
    for col in (
        Key.obs.VELOCITY_CONFIDENCE,
        Key.obs.VELOCITY_LENGTH,
        Key.obs.VELOCITY_CONFIDENCE_TRANSITION,
        Key.obs.VELOCITY_SELF_TRANSITION,
    ):
        np.testing.assert_array_equal(out.obs[col].to_numpy(), cli.obs[col].to_numpy(), err_msg=col)
    assert out.uns[Key.uns.VELOCITY_PARAMS]["embeddings"] == cli.uns[Key.uns.VELOCITY_PARAMS]["embeddings"]


def test_projection_is_scvelos_signed_kernel(sample_adata):
    """The app used to project with the positive transition matrix; scVelo uses the signed one."""
    from explorer.graph.projection import project_velocity
    from explorer.graph.transition import transition_matrix
    from explorer.models import get_model

    result = get_model("stochastic", seed=0).fit(sample_adata)
    derived = derive(sample_adata, result, basis="umap")
    umap = np.asarray(sample_adata.obsm[Key.obsm.UMAP])
    signed = transition_matrix(derived.graph, derived.graph_neg, use_negative_cosines=True)
    np.testing.assert_array_equal(derived.velocity_embedding[Key.obsm.UMAP], project_velocity(signed, umap))
    positive = project_velocity(derived.transitions, umap)
    assert not np.allclose(positive, derived.velocity_embedding[Key.obsm.UMAP])
    # the app projects on another basis with the same kernel
    np.testing.assert_array_equal(derived.project(umap), derived.velocity_embedding[Key.obsm.UMAP])
    # the input was not written to
    assert Key.obsp.VELOCITY_GRAPH in sample_adata.obsp  # the stored fit of the sample file ...
    stored = sample_adata.obsp[Key.obsp.VELOCITY_GRAPH]
    assert stored is not derived.graph  # ... was left as it was


def test_cli_file_equals_app_export(sample_adata, tmp_path):
    """``explorer fit`` on the sample writes what the app's export of the same fit holds."""
    from explorer.cli import main
    from explorer.data.io import read

    out = tmp_path / "cli.h5ad"
    assert main(["fit", "sample", "--model", "stochastic", "--seed", "0", "--out", str(out), "--quiet"]) == 0
    written = read(out)
    state, _ = _app_fit(sample_adata, "stochastic", seed=0)
    exported = state.results_adata()
    for key in (Key.obsp.VELOCITY_GRAPH, Key.obsp.TRANSITIONS):
        assert _same_sparse(exported.obsp[key], written.obsp[key]), key
    np.testing.assert_allclose(exported.obsm["velocity_umap"], written.obsm["velocity_umap"], rtol=0, atol=0)
    np.testing.assert_array_equal(
        exported.obs[Key.obs.VELOCITY_CONFIDENCE].to_numpy(), written.obs[Key.obs.VELOCITY_CONFIDENCE].to_numpy()
    )


def test_derive_needs_a_neighbour_graph(sample_adata):
    from explorer._types import InputError
    from explorer.models import get_model

    result = get_model("stochastic", seed=0).fit(sample_adata)
    del sample_adata.obsp[Key.obsp.DISTANCES]
    with pytest.raises(InputError, match="neighbour graph"):
        derive(sample_adata, result, basis="umap")


def test_run_velocity_progress_ends_at_the_last_step(sample_adata, progress_log):
    log, callback = progress_log
    run_velocity(sample_adata, model="stochastic", seed=0, progress=callback)
    fractions = [p.fraction for p in log]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    messages = [p.message for p in log]
    for step in STEPS[2:]:
        assert any(m.startswith(step) for m in messages), step


@pytest.mark.slow
def test_one_pipeline_on_the_pancreas(shared_data, reference_dir):
    """The real pancreas (sparse counts, 3,696 cells): the app's job and the CLI agree exactly."""
    import pandas as pd

    from explorer.data.io import read
    from explorer.pipeline import prepare

    adata = read(shared_data / "pancreas_endocrinogenesis_3696.h5ad")
    prepare(adata, compute_umap=False, seed=0)
    ref = pd.read_csv(reference_dir / "pancreas_3696_scvelo_cells.csv", index_col=0).reindex(adata.obs_names)
    adata.obsm[Key.obsm.UMAP] = ref[["umap_1", "umap_2"]].to_numpy(np.float32)
    cli = adata.copy()
    run_velocity(cli, model="stochastic", seed=0)
    _, fit = _app_fit(adata, "stochastic", seed=0)
    assert _same_sparse(fit.derived.graph, cli.obsp[Key.obsp.VELOCITY_GRAPH])
    np.testing.assert_array_equal(fit.velocity_embedding[Key.obsm.UMAP], cli.obsm["velocity_umap"])
    np.testing.assert_array_equal(fit.confidence, cli.obs[Key.obs.VELOCITY_CONFIDENCE].to_numpy(np.float32))


def test_fit_command_starts_without_the_preprocessing_libraries():
    """`explorer fit` on preprocessed data needs neither scanpy (with sklearn and matplotlib)
    nor pynndescent/umap: they load only inside the steps that use them, not at start-up."""
    import json
    import subprocess
    import sys

    code = (
        "import sys, json, explorer.cli, explorer.pipeline\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "anndata" in loaded  # the check sees what the CLI loads
    assert not loaded & {"scanpy", "sklearn", "pynndescent", "umap", "matplotlib", "torch"}


@pytest.mark.parametrize("early", [True, False], ids=["beside the fit", "after the fit"])
def test_run_velocity_derives_beside_the_dynamical_fit(sample_adata, monkeypatch, early):
    """The dynamical model hands its velocities over before its latent time and onsets:
    derive then runs in a second thread (only where compiled kernels may run in two threads
    at once), the arrays it makes go to ``on_arrays`` as soon as they exist, and the AnnData
    ends up as with derive after the fit."""
    import os
    import sys
    import threading

    import explorer.pipeline as pipeline
    from explorer.models.dynamical import Dynamical

    monkeypatch.setattr(pipeline, "_kernels_thread_safe", lambda: early)
    threads, handed, nice = [], [], []
    plain_derive = pipeline.derive
    main_nice = os.getpriority(os.PRIO_PROCESS, 0)

    def recording_derive(*args, **kwargs):
        threads.append(threading.current_thread().name)
        if sys.platform.startswith("linux"):  # per-thread nice values
            nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return plain_derive(*args, **kwargs)

    monkeypatch.setattr(pipeline, "derive", recording_derive)
    params = {"max_iter": 3}
    adata = sample_adata.copy()

    def on_arrays(a):
        slots = ("layers", "obsp", "obsm")
        handed.append({(slot, key): value for slot in slots for key, value in getattr(a, slot).items()})

    run_velocity(adata, model="dynamical", seed=0, model_params=params, on_arrays=on_arrays)
    assert len(threads) == 1
    assert threads[0].startswith("explorer-derive") if early else threads[0] == threading.main_thread().name
    # beside the fit, derive yields the cores to the fit's threads (Linux); this thread keeps its nice value
    assert os.getpriority(os.PRIO_PROCESS, 0) == main_nice
    if nice:
        assert nice[0] == (min(19, main_nice + pipeline._DERIVE_NICENESS) if early else main_nice)
    # the whole AnnData before and after the fit; with derive beside the fit, light ones
    # in between, whose arrays are the very ones the AnnData holds at the end
    light = [arrays for arrays in handed if ("layers", Key.layers.MS) not in arrays]
    assert len(handed) == 2 + len(light)
    early_keys = set()
    for arrays in light:
        for (slot, key), value in arrays.items():
            early_keys.add((slot, key))
            assert getattr(adata, slot)[key] is value, (slot, key)
    written = {
        ("obsp", Key.obsp.VELOCITY_GRAPH),
        ("obsp", Key.obsp.TRANSITIONS),
        ("layers", Key.layers.VELOCITY),
    }
    assert written <= early_keys if early else not light

    monkeypatch.setattr(pipeline, "derive", plain_derive)
    reference = sample_adata.copy()
    model = Dynamical(seed=0, **params)
    result = model.fit(reference)
    derived = plain_derive(reference, result, basis="umap", velocity_graph=model.velocity_graph_)
    result.to_adata(reference)
    derived.to_adata(reference)
    for key in (Key.obsp.VELOCITY_GRAPH, Key.obsp.VELOCITY_GRAPH_NEG, Key.obsp.TRANSITIONS):
        assert _same_sparse(adata.obsp[key], reference.obsp[key]), key
    np.testing.assert_array_equal(adata.obsm["velocity_umap"], reference.obsm["velocity_umap"])
    assert list(adata.obs.columns) == list(reference.obs.columns)
    for col in reference.obs.columns:
        np.testing.assert_array_equal(adata.obs[col].to_numpy(), reference.obs[col].to_numpy(), err_msg=col)
    assert list(adata.var.columns) == list(reference.var.columns)
