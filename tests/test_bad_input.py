"""Bad input to ``explorer fit``: exit 2, a message that says what to do, no traceback, nothing written.

Options and output paths are checked before the data is read: those tests replace the
reader with one that fails the test if it is called.
"""

from __future__ import annotations

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

from explorer import cli
from explorer._types import InputError
from explorer.cli import EXIT_INPUT, main
from explorer.data.io import read

EXE = shutil.which("explorer", path=str(Path(sys.executable).parent))


def _counts(n_obs: int = 80, n_vars: int = 30, *, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    rates = rng.uniform(1, 20, n_vars)
    s = rng.poisson(rates, (n_obs, n_vars)).astype(np.float32)
    u = rng.poisson(rates / 3, (n_obs, n_vars)).astype(np.float32)
    return ad.AnnData(
        X=sparse.csr_matrix(s),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(n_obs)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_vars)]),
        layers={"spliced": sparse.csr_matrix(s), "unspliced": sparse.csr_matrix(u)},
    )


@pytest.fixture
def raw_path(tmp_path) -> Path:
    path = tmp_path / "raw.h5ad"
    _counts().write_h5ad(path)
    return path


@pytest.fixture
def no_reading(monkeypatch):
    """Fail the test if ``explorer fit`` reads the input: the check must come first."""

    def refuse(*_args, **_kwargs):
        pytest.fail("the input was read before the options were checked")

    monkeypatch.setattr(cli, "_load", refuse)


def _fit(args, capsys) -> tuple[int, str]:
    code = main(["fit", *args, "-q"])
    return code, capsys.readouterr().err


def _assert_refused(code: int, err: str, *expected: str) -> None:
    assert code == EXIT_INPUT, err
    assert "error:" in err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--model", "dynamical", "--param", "max_iter=abc"],
            ["max_iter must be a whole number", "found 'abc'"],
        ),
        (
            ["--model", "dynamical", "--param", "max_iter=-5"],
            ["max_iter must be a whole number >= 0", "found -5"],
        ),
        (["--model", "dynamical", "--param", "t_max=0"], ["t_max must be a number > 0"]),
        (["--model", "dynamical", "--param", "device=gpu"], ["Valid options are: 'auto', 'cpu', 'cuda'"]),
        (["--model", "stochastic", "--param", "perc=5,150"], ["perc must be", "<= 100", "found (5, 150)"]),
        (["--model", "stochastic", "--param", "fit_offset=maybe"], ["fit_offset must be True or False"]),
        (["--param", "no_such=1"], ["unexpected keyword argument 'no_such'", "Its parameters are: perc"]),
        (["--param", "max_iter"], ["--param expects KEY=VALUE"]),
        (["--model", "velovi"], ["Invalid model 'velovi'", "Valid options are"]),
        (["--n_pcs", "0"], ["n_pcs must be at least 1", "--n-pcs"]),
        (["--n_neighbors", "1"], ["n_neighbors must be at least 2"]),
        (["--min_shared_counts", "-1"], ["min_shared_counts must be at least 0"]),
        (["--n_top_genes", "0"], ["n_top_genes must be at least 1"]),
    ],
)
def test_bad_options_refused_before_reading(raw_path, tmp_path, capsys, no_reading, args, expected):
    out = tmp_path / "out.h5ad"
    code, err = _fit([str(raw_path), "--out", str(out), *args], capsys)
    _assert_refused(code, err, *expected)
    assert not out.exists()


@pytest.mark.parametrize(
    ("out", "expected"),
    [
        ("missing/out.h5ad", ["folder", "does not exist", "Create it first"]),
        ("out.csv", ["expected a name ending in .h5ad or .loom", "found '.csv'"]),
        ("out", ["found 'no extension'"]),
    ],
)
def test_bad_out_refused_before_reading(raw_path, tmp_path, capsys, no_reading, out, expected):
    code, err = _fit([str(raw_path), "--out", str(tmp_path / out)], capsys)
    _assert_refused(code, err, *expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.h5ad"]


def test_existing_out_needs_force(raw_path, tmp_path, capsys, no_reading):
    out = tmp_path / "out.h5ad"
    out.write_bytes(b"keep me")
    code, err = _fit([str(raw_path), "--out", str(out)], capsys)
    _assert_refused(code, err, "exists already", "--force")
    assert out.read_bytes() == b"keep me"


def test_force_replaces_existing_out(raw_path, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    out.write_bytes(b"old")
    code, err = _fit([str(raw_path), "--out", str(out), "--n_neighbors", "10", "--force"], capsys)
    assert code == 0, err
    assert read(out).n_obs == 80


def test_one_gene_refused_on_read(tmp_path, capsys):
    path = tmp_path / "one.h5ad"
    _counts(n_vars=1).write_h5ad(path)
    code, err = _fit([str(path), "--out", str(tmp_path / "o.h5ad")], capsys)
    _assert_refused(code, err, "too few genes", "1 gene", "at least 2")
    assert not (tmp_path / "o.h5ad").exists()


def test_one_gene_left_after_filtering(tmp_path, capsys):
    adata = _counts(n_vars=5)
    for key in ("spliced", "unspliced"):
        m = adata.layers[key].toarray()
        m[:, 1:] = 0  # only g0 has shared counts
        adata.layers[key] = sparse.csr_matrix(m)
    path = tmp_path / "sparse.h5ad"
    adata.write_h5ad(path)
    code, err = _fit([str(path), "--out", str(tmp_path / "o.h5ad")], capsys)
    _assert_refused(code, err, "too few genes left after filtering", "--min-shared-counts")


def test_layer_names_cli_and_python(tmp_path, capsys):
    adata = _counts()
    adata.layers["exon"] = adata.layers.pop("spliced")
    adata.layers["intron"] = adata.layers.pop("unspliced")
    path = tmp_path / "custom.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "o.h5ad"
    code, err = _fit([str(path), "--out", str(out)], capsys)
    _assert_refused(code, err, "--spliced-layer", "'exon'")
    assert "spliced_layer=" not in err
    with pytest.raises(InputError, match="`spliced_layer=`"):
        read(path)
    # the options the message names work
    code, err = _fit(
        [
            str(path),
            "--out",
            str(out),
            "--spliced-layer",
            "exon",
            "--unspliced-layer",
            "intron",
            "--n_neighbors",
            "10",
        ],
        capsys,
    )
    assert code == 0, err
    assert {"spliced", "unspliced"} <= set(read(out).layers)


def test_non_integer_values_run(tmp_path, capsys):
    """scVelo's simulator writes continuous values; some far above what expm1 of float32 survives."""
    adata = _counts()
    rng = np.random.default_rng(1)
    for key in ("spliced", "unspliced"):
        m = adata.layers[key].toarray() * rng.uniform(0.5, 12.0, adata.n_vars) + 0.013
        adata.layers[key] = m.astype(np.float64)
    adata.X = adata.layers["spliced"].copy()
    assert adata.X.max() > 100  # expm1 overflows float32 above 88.7
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "o.h5ad"
    code, err = _fit([str(path), "--out", str(out), "--n_neighbors", "10"], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    assert np.isfinite(read(out).layers["velocity"]).any()


@pytest.mark.parametrize(
    ("make", "args", "expected"),
    [
        ("one_gene", [], "too few genes"),
        ("raw", ["--model", "dynamical", "--param", "max_iter=abc"], "max_iter must be a whole number"),
    ],
)
def test_console_script_exits_2_without_traceback(tmp_path, make, args, expected):
    path = tmp_path / "in.h5ad"
    _counts(n_vars=1 if make == "one_gene" else 30).write_h5ad(path)
    out = tmp_path / "o.h5ad"
    proc = subprocess.run(  # noqa: S603 - our own console script
        [EXE, "fit", str(path), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == EXIT_INPUT, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_python_messages_name_keyword_arguments(tmp_path):
    """Outside the CLI the same checks name Python's keyword arguments."""
    from explorer.data.preprocess import check_options
    from explorer.models import get_model

    with pytest.raises(InputError, match="`n_pcs=`"):
        check_options(n_pcs=0)
    with pytest.raises(InputError, match=r"e\.g\. max_iter=10"):
        get_model("dynamical", max_iter="abc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_model("dynamical", max_iter=3, genes=("a", "b")).max_iter == 3


@pytest.mark.parametrize("model", ["steady_state", "dynamical", "velovae", "deepvelo"])
def test_unspliced_moments_zero_everywhere_are_refused_by_name(model, tmp_path, capsys):
    """A prepared file whose ``Mu`` is 0 in every cell and gene (its unspliced counts lost).

    VeloVAE fitted every gene of such a file without a word, the dynamical model said no gene
    passed the velocity-gene filter and suggested ``genes='all'``; each model now says the
    layer is empty and where the counts should come from, and writes nothing.
    """
    from explorer.pipeline import prepare

    adata = _counts(n_obs=120, n_vars=30)
    prepare(adata, compute_umap=False)
    adata.layers["Mu"] = np.zeros(adata.shape, dtype=np.float32)
    path = tmp_path / "no_unspliced.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "fit.h5ad"
    code, err = _fit([str(path), "--model", model, "--out", str(out)], capsys)
    assert code == EXIT_INPUT and not out.exists()
    assert "layers['Mu'] 0 in every cell and gene" in err and "--unspliced-layer" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("model", ["dynamical", "velovae", "deepvelo", "vector_field"])
def test_cuda_asked_for_where_torch_finds_none_is_bad_input(model, tmp_path, capsys):
    """``--param device=cuda`` on a machine without a GPU: a message and exit 2, not a traceback.

    Every torch model raised a ValueError there (a traceback from ``explorer fit``, an
    unexpected error in the app, whose VeloVAE and DeepVelo offer ``cuda`` in a menu).
    """
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    from explorer.pipeline import prepare

    adata = _counts(n_obs=120, n_vars=30)
    prepare(adata, compute_umap=False)
    path = tmp_path / "prepared.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "fit.h5ad"
    code, err = _fit([str(path), "--model", model, "--param", "device=cuda", "--out", str(out)], capsys)
    assert code == EXIT_INPUT and not out.exists()
    assert "device='cuda' was asked for, but torch" in err and "finds no CUDA device" in err, err
    assert "use device='auto' (CUDA where there is one) or 'cpu'" in err and "Traceback" not in err
