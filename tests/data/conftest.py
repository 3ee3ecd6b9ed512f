"""Small hand-made AnnData objects for the io and preprocessing tests."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse


def make_counts(n_obs: int = 40, n_vars: int = 12, *, seed: int = 0) -> ad.AnnData:
    """Poisson counts in CSR float32 layers ``spliced``/``unspliced``, X = spliced."""
    rng = np.random.default_rng(seed)
    rates = rng.uniform(0.5, 8.0, size=n_vars)
    s = rng.poisson(rates, size=(n_obs, n_vars)).astype(np.float32)
    u = rng.poisson(rates / 3, size=(n_obs, n_vars)).astype(np.float32)
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_obs)])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)])
    return ad.AnnData(
        X=sparse.csr_matrix(s),
        obs=obs,
        var=var,
        layers={"spliced": sparse.csr_matrix(s), "unspliced": sparse.csr_matrix(u)},
    )


@pytest.fixture
def counts_adata() -> ad.AnnData:
    """40 cells x 12 genes of seeded Poisson counts (spliced rate 0.5-8, unspliced a third)."""
    return make_counts()


def h5_entries(path) -> dict[str, tuple]:
    """Every group, dataset and attribute of an HDF5 file, by name, in comparable form.

    A dataset is its dtype, shape and bytes (strings as a list), so NaN equals NaN; a
    group is its attributes. Two files with equal entries hold the same AnnData layout
    and values, whatever order their objects were written in.
    """
    import h5py

    def plain(value):
        arr = np.asarray(value)
        return (str(arr.dtype), arr.shape, arr.tolist() if arr.dtype.kind in "OSU" else arr.tobytes())

    entries: dict[str, tuple] = {}

    def visit(name, obj):
        attrs = tuple(sorted((k, plain(v)) for k, v in obj.attrs.items()))
        if isinstance(obj, h5py.Dataset):
            entries[name] = ("dataset", attrs, plain(obj[()]))
        else:
            entries[name] = ("group", attrs)

    with h5py.File(path, "r") as f:
        entries["/"] = ("group", tuple(sorted((k, plain(v)) for k, v in f.attrs.items())))
        f.visititems(visit)
    return entries
