"""Where the sample files live and how they are found: inside the package, so a wheel ships them.

The files are package data in ``explorer/sample_data/``; ``sample_data/`` at the top of the
repository is a link to that folder. ``sample_path`` looks them up with
:mod:`importlib.resources`, which is what works from an installed wheel.
"""

from __future__ import annotations

import fnmatch
import tomllib
from importlib.resources import files
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from scipy import sparse
from scipy.spatial import cKDTree

import explorer
from explorer._samples_build import make_samples
from explorer._types import InputError
from explorer.data.samples import SAMPLES, sample_dir, sample_path

ROOT = Path(__file__).resolve().parents[2]


def test_lookup_finds_the_files_through_the_installed_package():
    package_dir = Path(explorer.__file__).resolve().parent
    resources = files("explorer").joinpath("sample_data")
    assert sample_dir() == resources
    for name, file_name in SAMPLES.items():
        path = sample_path(name)
        assert path.is_file()
        assert path.resolve() == package_dir / "sample_data" / file_name
        assert path.stat().st_size > 100_000  # a real .h5ad, not a pointer or an empty stub


def test_repository_sample_data_is_the_package_folder():
    """``sample_data/`` stays visible at the repository root and is the same files, not copies."""
    top = ROOT / "sample_data"
    assert top.is_dir()
    for file_name in SAMPLES.values():
        assert (top / file_name).samefile(sample_dir() / file_name)
    assert (top / "README.md").samefile(sample_dir() / "README.md")


def test_package_data_declares_every_sample_file():
    """pyproject's package-data globs match every sample file, so ``pip wheel .`` packs them.

    Checked by building the wheel too (``.venv/bin/pip wheel . --no-deps -w /tmp/whl``: the
    wheel holds ``explorer/sample_data/default.h5ad``; README, "Packaging").
    """
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["explorer"]
    for file_name in [*SAMPLES.values(), "README.md"]:
        rel = f"sample_data/{file_name}"
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not in package-data {patterns}"


def test_unknown_sample_names_the_valid_ones():
    with pytest.raises(InputError, match="Invalid sample 'pancreas'. Valid options are: 'default'"):
        sample_path("pancreas")


def _knn_sets(x: np.ndarray, k: int = 15) -> list[set[int]]:
    """Each point's ``k`` nearest other points (Euclidean), as sets of indices."""
    _, idx = cKDTree(x).query(x, k=k + 1)
    return [set(row[1:]) for row in idx]


@pytest.mark.slow
def test_rebuilding_the_sample_gives_the_same_file(tmp_path):
    """``python -m explorer.data.samples`` is deterministic, and rebuilds the stored sample on any CPU.

    Two builds on one machine are the same bytes. Against the stored file, built on another
    machine: the simulated counts and ground truth, the moments, the fit, the velocity graph
    and ``T_fwd`` are equal to round-off (the simulator's ground-truth rates are 1 ulp apart
    where numpy's SIMD ``exp`` differs between CPUs; the normalised ``X``, the PCA and the kNN
    weights up to 5e-5 of their scale, measured 2026-12-03 on an AMD EPYC with AVX2 against
    the stored file). UMAP's layout is chaotic in such differences (coordinates apart by up to
    39 on a layout about 60 wide there), so it is compared by neighbourhoods: 81% of each
    cell's 15 nearest neighbours in the layout were the same there (the kNN graph's: 100%);
    ``velocity_umap``, the velocities projected on that layout, is not compared.

    If this fails after a change to the simulator, the preprocessing or the stochastic
    model, regenerate the sample with ``python -m explorer.data.samples``.
    """
    (written,) = make_samples(tmp_path / "one", names=["default"])
    (again,) = make_samples(tmp_path / "two", names=["default"])
    assert written.read_bytes() == again.read_bytes()

    built, stored = ad.read_h5ad(written), ad.read_h5ad(sample_path("default"))
    assert built.obs_names.equals(stored.obs_names) and built.var_names.equals(stored.var_names)

    def dense(x):
        return x.toarray() if sparse.issparse(x) else np.asarray(x)

    for key in ("spliced", "unspliced"):  # drawn counts: exact
        np.testing.assert_array_equal(dense(built.layers[key]), dense(stored.layers[key]), err_msg=key)

    def close(a, b, what):
        a, b = dense(a), dense(b)
        if a.dtype.kind not in "fiu":
            np.testing.assert_array_equal(a, b, err_msg=what)
            return
        scale = np.nanmax(np.abs(b)) if np.isfinite(b).any() else 1.0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=what)

    assert set(built.layers) == set(stored.layers)
    for key in built.layers:
        close(built.layers[key], stored.layers[key], f"layers[{key!r}]")
    close(built.X, stored.X, "X")
    assert set(built.obsp) == set(stored.obsp)
    for key in built.obsp:
        assert (built.obsp[key] != 0).sum() == (stored.obsp[key] != 0).sum(), key
        close(built.obsp[key], stored.obsp[key], f"obsp[{key!r}]")
    for frame in ("obs", "var"):
        mine, theirs = getattr(built, frame), getattr(stored, frame)
        assert list(mine.columns) == list(theirs.columns), frame
        for column in mine.columns:
            close(mine[column].to_numpy(), theirs[column].to_numpy(), f"{frame}[{column!r}]")
    assert set(built.obsm) == set(stored.obsm)
    close(built.obsm["X_pca"], stored.obsm["X_pca"], "X_pca")
    same = [len(a & b) / 15 for a, b in zip(_knn_sets(built.obsm["X_umap"]), _knn_sets(stored.obsm["X_umap"]))]
    assert np.mean(same) > 0.6, np.mean(same)  # 0.81 across CPUs, 1.0 on one
