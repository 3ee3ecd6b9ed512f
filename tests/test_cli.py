"""The command line on real data: fit, models, info, and its error messages (exit code 2)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import anndata as ad
import numpy as np
import pytest

from explorer.cli import EXIT_INPUT, main
from explorer.keys import Key
from tests.data.conftest import h5_entries


def test_models_lists_every_model(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("steady_state", "stochastic", "dynamical"):
        assert name in out


def test_info_on_raw_pancreas(shared_data, capsys):
    assert main(["info", str(shared_data / "pancreas_endocrinogenesis_3696.h5ad")]) == 0
    out = capsys.readouterr().out
    assert "3696 x 2000" in out
    assert "preprocessed: no" in out
    assert "ready for velocity: yes" in out


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_text("cell,gene\n1,2\n"), "AnnData"),
    ],
)
def test_fit_bad_file_exits_2(tmp_path, capsys, make, expected):
    path = tmp_path / "bad.h5ad"
    make(path)
    assert main(["fit", str(path), "--out", str(tmp_path / "out.h5ad"), "-q"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "error:" in err and expected in err
    assert not (tmp_path / "out.h5ad").exists()


def test_fit_missing_layer_names_found_layers(tmp_path, capsys, shared_data):
    with warnings.catch_warnings():  # scVelo's fixture predates anndata's encoding metadata
        warnings.simplefilter("ignore", ad.OldFormatWarning)
        adata = ad.read_h5ad(shared_data / "scvelo_tests" / "pancreas_50obs.h5ad")
    adata.layers["counts_u"] = adata.layers.pop("unspliced")
    path = tmp_path / "renamed.h5ad"
    adata.write_h5ad(path)
    assert main(["fit", str(path), "--out", str(tmp_path / "o.h5ad"), "-q"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "unspliced" in err and "counts_u" in err


def test_fit_unknown_model_exits_2(tmp_path, capsys, shared_data):
    src = shared_data / "pancreas_endocrinogenesis_3696.h5ad"
    assert main(["fit", str(src), "--model", "velovi", "--out", str(tmp_path / "o.h5ad"), "-q"]) == EXIT_INPUT
    assert "Valid options are" in capsys.readouterr().err


def test_fit_refuses_to_overwrite_input(tmp_path, capsys, shared_data):
    path = tmp_path / "in.h5ad"
    shutil.copy(shared_data / "scvelo_tests" / "pancreas_50obs_preprocessed.h5ad", path)
    before = path.read_bytes()
    assert main(["fit", str(path), "--out", str(path), "-q"]) == EXIT_INPUT
    assert "never overwrites" in capsys.readouterr().err
    assert path.read_bytes() == before


@pytest.mark.slow
def test_fit_pancreas_writes_scvelo_keys(tmp_path, shared_data, reference_dir):
    """`explorer fit` on the raw pancreas, through the console script, as a user runs it."""
    import pandas as pd

    src = shared_data / "pancreas_endocrinogenesis_3696.h5ad"
    out = tmp_path / "pancreas_stochastic.h5ad"
    exe = shutil.which("explorer", path=str(__import__("pathlib").Path(sys.executable).parent))
    proc = subprocess.run(
        [exe, "fit", str(src), "--model", "stochastic", "--out", str(out), "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "velocity genes" in proc.stderr
    from explorer.data.io import read

    res = read(out)
    for key in (Key.layers.MS, Key.layers.MU, Key.layers.VELOCITY):
        assert key in res.layers
    for key in (Key.var.GAMMA, Key.var.R2, Key.var.VELOCITY_GENES):
        assert key in res.var
    for key in (
        Key.obsp.CONNECTIVITIES,
        Key.obsp.DISTANCES,
        Key.obsp.VELOCITY_GRAPH,
        Key.obsp.VELOCITY_GRAPH_NEG,
    ):
        assert key in res.obsp
    assert {Key.obsm.UMAP, "velocity_umap"} <= set(res.obsm)
    assert {Key.obs.VELOCITY_CONFIDENCE, Key.obs.VELOCITY_LENGTH} <= set(res.obs)
    # the file also carries the graphs where scVelo's tools look; read() keeps them in obsp only
    import h5py

    with h5py.File(out, "r") as f:
        assert Key.obsp.VELOCITY_GRAPH in f["uns"] and Key.obsp.VELOCITY_GRAPH_NEG in f["uns"]
    assert Key.obsp.VELOCITY_GRAPH not in res.uns
    params = res.uns[Key.uns.VELOCITY_PARAMS]
    assert params["mode"] == "stochastic" and "explorer_version" in params
    # same genes as scVelo kept, and gamma close to scVelo's stochastic gamma on its velocity genes
    ref = pd.read_csv(reference_dir / "pancreas_3696_scvelo_genes.csv", index_col=0)
    common = res.var_names.intersection(ref.index[ref["steady_state_velocity_genes"]])
    assert len(common) > 0.95 * ref["steady_state_velocity_genes"].sum()
    rel = (
        np.abs(res.var.loc[common, Key.var.GAMMA] - ref.loc[common, "stochastic_gamma"])
        / ref.loc[common, "stochastic_gamma"]
    )
    assert np.median(rel) < 0.02
    # the input is untouched: still raw counts, no velocity
    raw = ad.read_h5ad(src)
    assert Key.layers.VELOCITY not in raw.layers
    assert float(raw.layers["spliced"].max()) == float(np.round(raw.layers["spliced"].max()))


@pytest.fixture
def small_prepared(tmp_path):
    """A small simulated data set, preprocessed (neighbours, moments, UMAP), as a file."""
    from explorer.data.simulate import simulate
    from explorer.pipeline import prepare

    adata = simulate(n_obs=300, n_vars=40, seed=0)
    prepare(adata)
    path = tmp_path / "small.h5ad"
    adata.write_h5ad(path)
    return path


def test_fit_command_exits_after_writing_with_logs_flushed(tmp_path, small_prepared):
    """The console fit ends without the interpreter's teardown, its file and logs complete."""
    out = tmp_path / "out.h5ad"
    proc = subprocess.run(
        [sys.executable, "-m", "explorer.cli", "-v", "fit", str(small_prepared), "--model", "steady_state",
         "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # the last log lines come after the write: lost if the handlers were not flushed
    assert "fit command stages" in proc.stderr
    assert "wrote" in proc.stderr
    res = ad.read_h5ad(out)
    assert Key.layers.VELOCITY in res.layers
    assert np.isfinite(res.layers[Key.layers.VELOCITY][:, res.var[Key.var.VELOCITY_GENES].to_numpy()]).all()


def test_fit_called_with_argv_returns_its_code(tmp_path, small_prepared, monkeypatch):
    """A program calling ``main([...])`` gets the code back even when ``sys.argv`` looks like the command."""
    from explorer import cli

    out = tmp_path / "out.h5ad"
    argv = ["fit", str(small_prepared), "--model", "steady_state", "--out", str(out), "--quiet"]
    monkeypatch.setattr(sys, "argv", ["explorer", *argv])
    exits = []
    monkeypatch.setattr(cli.os, "_exit", exits.append)
    assert main(argv) == 0
    assert exits == []
    assert out.exists()


def test_fit_file_equals_a_plain_write_of_the_fit(tmp_path, small_prepared):
    """``explorer fit`` writes arrays during the fit (``H5adWriter``): the file ``write`` makes after it."""
    from explorer.data.io import read, write
    from explorer.pipeline import run_velocity

    out = tmp_path / "out.h5ad"
    assert main(["fit", str(small_prepared), "--model", "dynamical", "--out", str(out), "--quiet"]) == 0
    adata = read(small_prepared)
    run_velocity(adata, model="dynamical", model_params={"seed": 0}, seed=0)
    write(adata, tmp_path / "plain.h5ad")
    written, plain = h5_entries(out), h5_entries(tmp_path / "plain.h5ad")
    assert written.keys() == plain.keys()
    assert [k for k in written if written[k] != plain[k]] == []
    assert {"layers/Ms", "layers/velocity", "uns/velocity_graph/data"} <= written.keys()
