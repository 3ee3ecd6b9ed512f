"""The streamed (gene-batch) dynamical fit equals the in-memory one; on Dask too.

The in-memory path is ``Dynamical().fit`` + :func:`explorer.pipeline.derive`, what
``explorer fit --model dynamical`` runs. The streamed path reads the stored AnnData in
blocks and builds the velocity graph from per-edge sums, so its graph differs from the
in-memory float32 kernel by float rounding only; the kinetics, velocities and times are the
same numbers (same batches, same seeds).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from scipy import sparse
from scipy.stats import spearmanr

from explorer._types import InputError
from explorer.cli import main
from explorer.graph import latent_time as lt_mod
from explorer.graph.transition import transition_matrix
from explorer.models.dynamical import Dynamical
from explorer.pipeline import derive, prepare
from explorer.stream import dask_client, fit_streamed

pytestmark = pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")

#: a fit quick enough for CI, on several EM batches and several tasks
PARAMS = {"batch_size": 12, "max_iter": 3, "fit_t_on": False}


def _dense(x: object) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x, dtype=np.float64)


def _in_memory(adata: ad.AnnData, basis: str, params: dict) -> ad.AnnData:
    result = Dynamical(**params).fit(adata)
    derived = derive(adata, result, basis=basis)
    out = adata.copy()
    result.to_adata(out)
    derived.to_adata(out)
    return out


@pytest.fixture(scope="module")
def pancreas_subset(shared_data, tmp_path_factory):
    """The real pancreas (all 3,696 cells) on its 60 top genes; stored as an .h5ad without Ms/Mu."""
    adata = ad.read_h5ad(shared_data / "pancreas_endocrinogenesis_3696.h5ad")
    prepare(adata, n_top_genes=60, compute_umap=False)
    path = tmp_path_factory.mktemp("stream") / "pancreas.h5ad"
    stored = adata.copy()
    del stored.layers["Ms"], stored.layers["Mu"]  # the streamed path computes them per gene block
    stored.write_h5ad(path)
    return adata, path


def test_streamed_equals_in_memory_on_the_pancreas(pancreas_subset, tmp_path):
    adata, path = pancreas_subset
    expected = _in_memory(adata, "pca", PARAMS)
    summary = fit_streamed(path, tmp_path / "out.zarr", model_params=PARAMS, basis="pca", genes_per_task=24)
    got = ad.read_zarr(summary.out)
    n_fit = int(np.isfinite(expected.var["fit_alpha"]).sum())
    assert summary.n_fitted == n_fit > 2 * PARAMS["batch_size"]  # several batches and tasks

    # moments, kinetics, velocities and gene times: the same numbers
    for key in ("Ms", "Mu", "velocity", "velocity_u", "fit_t"):
        np.testing.assert_array_equal(got.layers[key], expected.layers[key], err_msg=key)
    for col in ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling", "fit_likelihood", "fit_r2"):
        np.testing.assert_array_equal(got.var[col], expected.var[col], err_msg=col)
    np.testing.assert_array_equal(got.var["velocity_genes"], expected.var["velocity_genes"])

    # the velocity graph from per-edge sums: the in-memory float32 kernel's up to rounding
    signed = got.obsp["velocity_graph"] + got.obsp["velocity_graph_neg"]
    want = expected.obsp["velocity_graph"] + expected.obsp["velocity_graph_neg"]
    assert signed.nnz == want.nnz
    np.testing.assert_allclose(_dense(signed), _dense(want), atol=1e-6)
    np.testing.assert_allclose(_dense(got.obsp["T_fwd"]), _dense(expected.obsp["T_fwd"]), atol=1e-5)
    np.testing.assert_allclose(got.obsm["velocity_pca"], expected.obsm["velocity_pca"], atol=1e-5)
    for col in ("velocity_self_transition", "velocity_length", "velocity_confidence"):
        np.testing.assert_allclose(got.obs[col], expected.obs[col], atol=1e-5, err_msg=col)
    np.testing.assert_allclose(
        got.obs["velocity_confidence_transition"], expected.obs["velocity_confidence_transition"], atol=1e-4
    )

    # root cells and latent time: exactly what latent_time computes from the streamed graph
    # (the root cells' eigen solve amplifies the graph's 1e-7 rounding, so the end-to-end
    # comparison with the in-memory fit is a rank correlation)
    conn = adata.obsp["connectivities"]
    score = lt_mod.root_cells(transition_matrix(got.obsp["velocity_graph"], got.obsp["velocity_graph_neg"], backward=True), conn)
    np.testing.assert_allclose(got.obs["root_cells"], score, atol=1e-6)
    t = expected.layers["fit_t"]
    genes = np.isfinite(t).all(0) & (expected.var["fit_likelihood"].to_numpy() >= 0.1)
    lt = lt_mod.latent_time(t[:, genes], score, conn)
    np.testing.assert_allclose(got.obs["latent_time"], lt, atol=1e-6)
    assert spearmanr(got.obs["latent_time"], expected.obs["latent_time"])[0] > 0.999


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """40 genes of the bundled sample (1,000 cells, preprocessed, with a UMAP) as a .zarr store."""
    from explorer.data.samples import load_sample

    path = tmp_path_factory.mktemp("small") / "sample.zarr"
    load_sample("default")[:, :40].copy().write_zarr(path)
    return path


def test_dask_cluster_of_two_equals_one_process(small_store, tmp_path):
    params = {"batch_size": 8, "max_iter": 3, "fit_t_on": False, "genes": "all"}
    # the single-process run through the command line (a .zarr input streams)
    flags = [f"--param={k}={v}" for k, v in params.items()]
    assert main(["fit", str(small_store), "--model", "dynamical", "-o", str(tmp_path / "local.zarr"), "-q", *flags]) == 0
    local = ad.read_zarr(tmp_path / "local.zarr")
    with dask_client(n_workers=2) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        summary = fit_streamed(
            small_store, tmp_path / "dask.zarr", model_params=params, genes_per_task=16, client=client
        )
    on_dask = ad.read_zarr(summary.out)
    assert summary.n_fitted == 40  # three fit tasks, three graph tasks, reduced as a tree
    for key in ("velocity", "velocity_u", "fit_t"):
        np.testing.assert_array_equal(on_dask.layers[key], local.layers[key], err_msg=key)
    for key in ("velocity_graph", "velocity_graph_neg", "T_fwd"):
        np.testing.assert_allclose(_dense(on_dask.obsp[key]), _dense(local.obsp[key]), atol=1e-7, err_msg=key)
    for col in ("latent_time", "root_cells", "velocity_confidence", "velocity_confidence_transition"):
        np.testing.assert_allclose(on_dask.obs[col], local.obs[col], atol=1e-6, err_msg=col)
    np.testing.assert_allclose(on_dask.obsm["velocity_umap"], local.obsm["velocity_umap"], atol=1e-6)


def test_bad_input_is_explained(small_store, tmp_path, capsys):
    source = tmp_path / "no_graph.zarr"
    no_graph = ad.read_zarr(small_store)[:, :5].copy()
    del no_graph.obsp["distances"]
    no_graph.write_zarr(source)
    with pytest.raises(InputError, match="no neighbour graph"):
        fit_streamed(source, tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()
    with pytest.raises(InputError, match="never overwrites its input"):
        fit_streamed(source, source)
    assert main(["fit", str(source), "--model", "stochastic", "-o", str(tmp_path / "x.zarr")]) != 0
    assert "dynamical model only" in capsys.readouterr().err
