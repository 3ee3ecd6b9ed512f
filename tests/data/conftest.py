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
