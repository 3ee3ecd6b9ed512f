"""Gene-shared latent time: hand-checkable pieces and a chain with a known start."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from scipy.stats import spearmanr

from explorer.graph import latent_time as lt


def _chain(n: int, k: int = 2) -> sparse.csr_matrix:
    """kNN connectivities of ``n`` cells on a line: each cell linked to ``k`` on each side."""
    rows, cols = [], []
    for i in range(n):
        for d in range(1, k + 1):
            for j in (i - d, i + d):
                if 0 <= j < n:
                    rows.append(i)
                    cols.append(j)
    return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))


def test_neighbor_average_matrix_rows_sum_to_one_with_self_loops():
    conn = _chain(5, k=1)
    W = lt.neighbor_average_matrix(conn).toarray()
    np.testing.assert_allclose(W.sum(1), 1.0, rtol=1e-6)
    # first cell: itself and one neighbour
    np.testing.assert_allclose(W[0, :2], [0.5, 0.5])
    np.testing.assert_allclose(W[2, 1:4], [1 / 3, 1 / 3, 1 / 3], rtol=1e-6)


def test_root_time_wraps_cells_before_the_root():
    t = np.array([[0.0], [1.0], [2.0], [3.0]])
    # rooted at cell 2 (t = 2): cells 2, 3 get 0, 1; cells 0, 1 move after the last (1 + 0, 1 + 1)
    np.testing.assert_allclose(lt.root_time(t, 2).ravel(), [1.0, 2.0, 0.0, 1.0])


def test_shared_time_of_identical_genes_is_their_time():
    t = np.linspace(0, 5, 50)
    times = np.repeat(t[:, None], 4, axis=1)
    np.testing.assert_allclose(lt.shared_time(times), t / 5, atol=1e-12)


def test_latent_time_recovers_a_noisy_ordering():
    rng = np.random.default_rng(0)
    n = 200
    true = np.linspace(0, 1, n)
    # 30 genes measuring the same clock with noise and gene-specific speed
    fit_t = true[:, None] * rng.uniform(5, 20, 30) + rng.normal(0, 0.5, (n, 30))
    fit_t = np.clip(fit_t, 0, None)
    root = np.zeros(n, dtype=np.float32)
    root[0] = 1.0
    out = lt.latent_time(fit_t, root, _chain(n))
    assert out.dtype == np.float32
    assert out.min() == pytest.approx(0)
    assert out.max() == pytest.approx(1)
    assert spearmanr(out, true)[0] > 0.98


def test_root_cells_from_a_flow_along_a_chain():
    # forward flow 0 -> 1 -> ... -> n-1, so the backward chain steps i -> i-1 and comes to
    # rest at cell 0 (with a little self-transition everywhere, as scVelo adds)
    n = 60
    T_bwd = sparse.lil_matrix((n, n))
    for i in range(1, n):
        T_bwd[i, i - 1] = 0.9
        T_bwd[i, i] = 0.1
    T_bwd[0, 0] = 1.0
    T_bwd = sparse.csr_matrix(T_bwd)
    score = lt.root_cells(T_bwd, _chain(n), seed=0)
    assert score.shape == (n,)
    assert score.max() == pytest.approx(1)
    # scVelo's percentile clipping and neighbour averaging spread the root over a few cells
    assert score[:5].mean() > 0.9
    assert score[-15:].max() < 0.1
    assert np.argmax(score) < 10
    # pushing mass through the backward chain (the large-data path) finds the same root
    fast = lt.root_cells(T_bwd, _chain(n), n_power_steps=200)
    assert np.argmax(fast) < 10
    assert fast[-15:].max() < 0.1
    with pytest.raises(ValueError, match="n_power_steps"):
        lt.root_cells(T_bwd, _chain(n), n_power_steps=0)


def test_compute_latent_time_writes_obs():
    import anndata

    n = 80
    adata = anndata.AnnData(np.zeros((n, 3), dtype=np.float32))
    true = np.linspace(0, 1, n)
    adata.layers["fit_t"] = (true[:, None] * np.array([10.0, 15.0, 20.0])).astype(np.float32)
    adata.var["fit_likelihood"] = [0.5, 0.5, 0.5]
    adata.obsp["connectivities"] = _chain(n)
    adata.obs["root_cells"] = np.r_[1.0, np.zeros(n - 1)]
    lt.compute_latent_time(adata)
    assert spearmanr(adata.obs["latent_time"], true)[0] > 0.99


def test_compute_latent_time_needs_a_fit():
    import anndata

    with pytest.raises(KeyError, match="fit_t"):
        lt.compute_latent_time(anndata.AnnData(np.zeros((3, 2), dtype=np.float32)))
