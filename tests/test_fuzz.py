"""Fuzz: generated AnnData files fed to ``explorer fit`` and to the app's loader.

Every file either runs (exit 0, an output file scVelo's keys in it) or is refused with
exit 2 and a message (the app's loader: :class:`~explorer._types.InputError`); nothing
ends in a traceback. The files cover integer and float dtypes, sparse and dense storage,
raw, normalised, logged and continuous (scVelo's simulator) values, zeros, NaN, inf, huge
values, one or two genes and a handful of cells. Small (at most 60 cells x 25 genes) and
the stochastic model, so the whole module stays within about a minute.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from explorer._types import InputError
from explorer.app.state import load_dataset
from explorer.cli import EXIT_INPUT, main
from explorer.data.io import read
from explorer.keys import Key

EXE = shutil.which("explorer", path=str(Path(sys.executable).parent))

N_OBS, N_VARS = 60, 25


def _layers(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:  # noqa: C901, PLR0912
    """Spliced, unspliced and (None: the spliced values) X for one kind of file."""
    n_obs = {"five_cells": 5, "three_cells": 3}.get(kind, N_OBS)
    n_vars = {"one_gene": 1, "two_genes": 2}.get(kind, N_VARS)
    rates = rng.uniform(0.5, 20, n_vars)
    s = rng.poisson(rates, (n_obs, n_vars)).astype(np.float64)
    u = rng.poisson(rates / 3, (n_obs, n_vars)).astype(np.float64)
    x = None
    if kind == "continuous":  # scVelo's simulator: non-integer, some values past expm1's float32 range
        s = s * rng.uniform(0.3, 9.0, n_vars) + rng.uniform(0, 1, (n_obs, n_vars))
        u = u * rng.uniform(0.3, 9.0, n_vars) + rng.uniform(0, 1, (n_obs, n_vars))
    elif kind == "normalised":  # counts per 10,000 from another tool, not logged
        s = s / s.sum(1, keepdims=True) * 1e4
        u = u / np.maximum(u.sum(1, keepdims=True), 1) * 1e4
    elif kind == "logged":
        s, u = np.log1p(s), np.log1p(u)
    elif kind == "x_logged":  # X normalised and logged by another tool, without scanpy's marker
        x = np.log1p(s / s.sum(1, keepdims=True) * 1e4)
    elif kind == "x_scaled":
        x = (s - s.mean(0)) / (s.std(0) + 1)
    elif kind == "huge":
        s, u = s * 1e30, u * 1e30
    elif kind == "large_counts":
        s, u = s * 1e6, u * 1e6
    elif kind == "nan":
        s[1, 2] = np.nan
    elif kind == "inf":
        u[3, 4] = np.inf
    elif kind == "x_nan":
        x = s.copy()
        x[0, 0] = np.nan
    elif kind == "negative":
        u[2, 2] = -1
    elif kind == "all_zero":
        s[:], u[:] = 0, 0
    elif kind == "empty_cells":
        s[:10], u[:10] = 0, 0
    elif kind == "empty_genes":
        s[:, :5], u[:, :5] = 0, 0
    elif kind == "no_unspliced":
        u[:] = 0
    elif kind == "constant":
        s[:], u[:] = 3, 1
    return s, u, x


#: kind -> storage: (sparse?, dtype)
KINDS: dict[str, tuple[bool, str]] = {
    "int_sparse": (True, "int64"),
    "int_dense": (False, "int32"),
    "float32_sparse": (True, "float32"),
    "float64_dense": (False, "float64"),
    "continuous": (False, "float64"),
    "normalised": (True, "float32"),
    "logged": (True, "float32"),
    "x_logged": (True, "float32"),
    "x_scaled": (False, "float32"),
    "huge": (False, "float32"),
    "large_counts": (True, "float32"),
    "nan": (True, "float32"),
    "inf": (False, "float32"),
    "x_nan": (False, "float32"),
    "negative": (True, "float32"),
    "all_zero": (True, "float32"),
    "empty_cells": (True, "float32"),
    "empty_genes": (False, "float32"),
    "no_unspliced": (True, "float32"),
    "constant": (False, "float32"),
    "one_gene": (True, "float32"),
    "two_genes": (False, "float32"),
    "five_cells": (True, "float32"),
    "three_cells": (False, "float32"),
}


def make(kind: str, *, seed: int = 0) -> ad.AnnData:
    """The generated AnnData of ``kind``."""
    is_sparse, dtype = KINDS[kind]
    rng = np.random.default_rng(seed)
    s, u, x = _layers(kind, rng)

    def store(m: np.ndarray) -> np.ndarray | sparse.csr_matrix:
        with np.errstate(invalid="ignore", over="ignore"):
            m = m.astype(dtype)
        return sparse.csr_matrix(m) if is_sparse else m

    return ad.AnnData(
        X=store(s if x is None else x),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(s.shape[0])]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(s.shape[1])]),
        layers={"spliced": store(s), "unspliced": store(u)},
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fuzz")
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. anndata on int64 / sparse efficiency
        for kind in KINDS:
            paths[kind] = folder / f"{kind}.h5ad"
            make(kind).write_h5ad(paths[kind])
    return paths


def _cli(*args: str | Path) -> tuple[int, str]:
    """Run ``explorer`` with ``args`` in this process: its exit code and what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def _check_fit(code: int, err: str, out: Path, kind: str) -> None:
    assert "Traceback" not in err, f"{kind}: {err}"
    assert code in (0, EXIT_INPUT), f"{kind}: exit {code}: {err}"
    if code == EXIT_INPUT:
        assert "error:" in err, f"{kind}: {err}"
        assert len(err.strip().splitlines()) <= 3, f"{kind}: {err}"
        assert not out.exists(), kind
    else:
        result = read(out)
        assert Key.layers.VELOCITY in result.layers, kind
        assert Key.obsp.VELOCITY_GRAPH in result.obsp, kind


#: what must happen to each kind: every valid input runs, these are refused
REFUSED = {
    "huge",
    "nan",
    "inf",
    "x_nan",
    "negative",
    "all_zero",
    "no_unspliced",
    "constant",
    "one_gene",
    "three_cells",
}
#: refused too: five cells have no velocity genes; the app's loader asks 30 neighbours of them
REFUSED_FIT = REFUSED | {"five_cells"}
REFUSED_LOAD = REFUSED | {"five_cells"}


# scanpy's kNN graph warns about identical cells (the empty ones) with scipy's
# SparseEfficiencyWarning: a printed warning, not a failure
@pytest.mark.filterwarnings("ignore::scipy.sparse.SparseEfficiencyWarning")
@pytest.mark.parametrize("kind", list(KINDS))
def test_fit_finishes_or_exits_2(files, tmp_path, kind):
    out = tmp_path / "out.h5ad"
    # 5 neighbours: five cells run, three are refused (fewer cells than neighbours)
    code, err = _cli("fit", files[kind], "--out", out, "-q", "--n_neighbors", "5")
    _check_fit(code, err, out, kind)
    assert (code == EXIT_INPUT) == (kind in REFUSED_FIT), f"{kind}: exit {code}: {err}"


@pytest.mark.filterwarnings("ignore::scipy.sparse.SparseEfficiencyWarning")
@pytest.mark.parametrize("kind", list(KINDS))
def test_app_loader_loads_or_raises_input_error(files, kind):
    if kind in REFUSED_LOAD:
        with pytest.raises(InputError):  # noqa: PT011 - the messages differ by kind
            load_dataset(files[kind])
        return
    adata = load_dataset(files[kind])  # anything but InputError fails the test
    assert {Key.layers.MS, Key.layers.MU} <= set(adata.layers)
    assert np.isfinite(np.asarray(adata.obsm[Key.obsm.UMAP])).all()


def test_dynamical_on_continuous_values(files, tmp_path):
    out = tmp_path / "out.h5ad"
    code, err = _cli(
        "fit", files["continuous"], "--out", out, "-q", "--n_neighbors", "5",
        "--model", "dynamical", "--param", "max_iter=2", "--param", "genes=all",
    )  # fmt: skip
    _check_fit(code, err, out, "continuous")
    assert code == 0


def test_a_handful_of_cells_runs_every_model_or_is_refused_before_any_work(files, tmp_path):
    """Five cells with 4 neighbours run VeloVAE; three cells with 2 are refused with a message.

    Found by feeding the fuzz files to every model: on five cells VeloVAE's diffusion
    pseudotime asked scanpy for 10 diffusion components of 5 cells ("Cannot instantiate
    using n_dcs=10", a traceback); on three cells every model ended in scipy's "k >= N" from
    UMAP's spectral layout.
    """
    out = tmp_path / "out.h5ad"
    code, err = _cli(
        "fit", files["five_cells"], "--out", out, "-q", "--n_neighbors", "4",
        "--model", "velovae", "--param", "max_epochs=3",
    )  # fmt: skip
    _check_fit(code, err, out, "five_cells")
    assert code == 0, err
    three, out3 = tmp_path / "three.h5ad", tmp_path / "o3.h5ad"
    make("five_cells")[:3].copy().write_h5ad(three)
    code, err = _cli("fit", three, "--out", out3, "-q", "--n_neighbors", "2")
    _check_fit(code, err, out3, "three cells")
    assert code == EXIT_INPUT and "too few cells: found 3; explorer needs 4 at least" in err


def test_no_velocity_gene_says_how_to_fit_all_genes_in_the_callers_words(tmp_path):
    """``explorer fit`` says ``--param genes=all``; Python says ``genes='all'``.

    Five cells (the fuzz file's second draw) leave no gene through the steady-state filter;
    the command line was told "Pass genes='all'", which is how Python spells it.
    """
    from explorer.data.io import read
    from explorer.models.dynamical import Dynamical
    from explorer.pipeline import prepare

    path, out = tmp_path / "five.h5ad", tmp_path / "out.h5ad"
    make("five_cells", seed=1).write_h5ad(path)
    code, err = _cli("fit", path, "--out", out, "-q", "--n_neighbors", "5", "--model", "dynamical")
    _check_fit(code, err, out, "five cells")
    assert code == EXIT_INPUT and "Pass `--param genes=all`." in err, err
    adata = read(path)
    prepare(adata, n_neighbors=5)
    with pytest.raises(InputError, match=r"Pass `genes='all'`\."):
        Dynamical().fit(adata)
    assert Dynamical(genes="all").fit(adata).velocity.shape == adata.shape


def test_the_app_refuses_fewer_cells_than_its_neighbours_with_a_command_that_opens_them(tmp_path):
    """20 cells in the app: the message gives an ``explorer fit`` command whose output the app opens.

    The app prepares raw files with 30 neighbours and has no option for fewer; it said
    "Pass `n_neighbors=` at most 20", which nobody using the app can do.
    """
    import shlex

    raw = tmp_path / "small.h5ad"
    make("int_sparse")[:20].copy().write_h5ad(raw)
    expected = "too few cells for the app's kNN graph of 30 neighbours: found 20"
    with pytest.raises(InputError, match=expected) as e:
        load_dataset(raw)
    command = re.search(r"`(explorer fit [^`]+)`", str(e.value)).group(1)
    args = shlex.split(command)[1:]
    args = [str(tmp_path / a) if a.endswith(".h5ad") else a for a in args]
    code, err = _cli(*args, "-q")
    assert code == 0, err
    adata = load_dataset(tmp_path / "small_velocity.h5ad")
    assert adata.n_obs == 20 and Key.obsm.UMAP in adata.obsm


@pytest.mark.parametrize("kind", ["continuous", "huge"])
def test_console_script(files, tmp_path, kind):
    out = tmp_path / "out.h5ad"
    proc = subprocess.run(  # noqa: S603 - our own console script
        [EXE, "fit", str(files[kind]), "--out", str(out), "--n_neighbors", "5", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    _check_fit(proc.returncode, proc.stderr, out, kind)
    assert (proc.returncode == EXIT_INPUT) == (kind in REFUSED)
