from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from explorer._types import InputError
from explorer.graph.embedding import compute_umap
from explorer.graph.moments import compute_moments, moments, neighbor_weights, second_order_moments
from explorer.graph.neighbors import compute_neighbors
from explorer.keys import Key

FIXTURES = ["pancreas_50obs", "pancreas_100obs", "dentategyrus_50obs", "dentategyrus_100obs"]

# a 4-cell graph: 0-1, 1-2, 2-3 (with UMAP-like weights; only their pattern matters)
CHAIN = sparse.csr_matrix(
    np.array(
        [[0.0, 0.7, 0.0, 0.0], [0.7, 0.0, 0.2, 0.0], [0.0, 0.2, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]],
        dtype=np.float32,
    )
)
X4 = np.array([[1.0, 0.0], [3.0, 6.0], [5.0, 0.0], [0.0, 3.0]], dtype=np.float32)


def _adata4() -> ad.AnnData:
    s = sparse.csr_matrix(X4)
    u = sparse.csr_matrix(np.array([[2.0, 1.0], [0.0, 1.0], [1.0, 1.0], [4.0, 0.0]], dtype=np.float32))
    adata = ad.AnnData(
        X=s.copy(), layers={"spliced": s, "unspliced": u}, obs=pd.DataFrame(index=list("abcd"))
    )
    adata.obsp[Key.obsp.CONNECTIVITIES] = CHAIN
    return adata


def test_neighbor_weights_by_hand():
    w = neighbor_weights(CHAIN).toarray()
    expected = np.array(
        [[1 / 2, 1 / 2, 0, 0], [1 / 3, 1 / 3, 1 / 3, 0], [0, 1 / 3, 1 / 3, 1 / 3], [0, 0, 1 / 2, 1 / 2]],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(w, expected)
    assert w.dtype == np.float32


def test_moments_by_hand():
    m = moments(CHAIN, X4)
    expected = [[2.0, 3.0], [3.0, 2.0], [8 / 3, 3.0], [2.5, 1.5]]
    np.testing.assert_allclose(m, expected, rtol=1e-6)
    np.testing.assert_allclose(moments(CHAIN, sparse.csr_matrix(X4), fused=True), expected, rtol=1e-6)


def test_second_order_moments_by_hand():
    adata = _adata4()
    compute_moments(adata)
    mss, mus = second_order_moments(adata)
    s, u = X4, adata.layers["unspliced"].toarray()
    w = neighbor_weights(CHAIN).toarray().astype(np.float64)
    np.testing.assert_allclose(mss, w @ (s * s), rtol=1e-6)
    np.testing.assert_allclose(mus, w @ (s * u), rtol=1e-6)
    mss_adj, mus_adj = second_order_moments(adata, adjusted=True)
    np.testing.assert_allclose(mss_adj, 2 * (w @ (s * s)) - adata.layers["Ms"], rtol=1e-6)
    np.testing.assert_allclose(mus_adj, 2 * (w @ (s * u)) - adata.layers["Mu"], rtol=1e-6)


def test_compute_moments_needs_graph():
    adata = _adata4()
    del adata.obsp[Key.obsp.CONNECTIVITIES]
    with pytest.raises(InputError, match=r"obsp\['connectivities'\] not found"):
        compute_moments(adata)


@pytest.mark.parametrize("name", FIXTURES)
def test_moments_reproduce_scvelo_fixtures(shared_data, name):
    """Given scVelo's own graph, our Ms/Mu are scVelo's, bit for bit (fused) or within 4 ulp."""
    fixture = ad.read_h5ad(shared_data / "scvelo_tests" / f"{name}_preprocessed.h5ad")
    graph = fixture.obsp[Key.obsp.CONNECTIVITIES]
    for layer, key in (("spliced", Key.layers.MS), ("unspliced", Key.layers.MU)):
        expected = fixture.layers[key]
        np.testing.assert_array_equal(moments(graph, fixture.layers[layer], fused=True), expected)
        plain = moments(graph, fixture.layers[layer])
        np.testing.assert_array_max_ulp(plain, expected, maxulp=4)
    adata = fixture.copy()
    del adata.layers[Key.layers.MS], adata.layers[Key.layers.MU]
    compute_moments(adata)
    np.testing.assert_array_max_ulp(adata.layers[Key.layers.MS], fixture.layers[Key.layers.MS], maxulp=4)


def test_compute_neighbors_graph_shape(shared_data):
    fixture = ad.read_h5ad(shared_data / "scvelo_tests" / "dentategyrus_100obs_preprocessed.h5ad")
    adata = fixture.copy()
    del adata.obsp[Key.obsp.CONNECTIVITIES], adata.obsp[Key.obsp.DISTANCES], adata.uns[Key.uns.NEIGHBORS]
    compute_neighbors(adata, n_neighbors=30, n_pcs=30)  # reuses the fixture's X_pca, as scVelo does
    distances = adata.obsp[Key.obsp.DISTANCES]
    assert (np.diff(distances.indptr) == 29).all()  # the cell itself is not stored
    connectivities = adata.obsp[Key.obsp.CONNECTIVITIES]
    assert abs(connectivities - connectivities.T).max() < 1e-6  # UMAP's fuzzy union is symmetric
    np.testing.assert_allclose(
        connectivities.toarray(), fixture.obsp[Key.obsp.CONNECTIVITIES].toarray(), atol=1e-6
    )
    assert adata.uns[Key.uns.NEIGHBORS]["params"]["n_neighbors"] == 30


def test_compute_neighbors_too_few_cells():
    adata = _adata4()
    with pytest.raises(InputError, match=r"too few cells: found 4, fewer than n_neighbors=30"):
        compute_neighbors(adata, n_neighbors=30)


def test_small_data_uses_x_and_umap(shared_data):
    """Fewer than 50 genes: the graph is built on X, as scanpy/scVelo do; UMAP is seeded."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5)).astype(np.float32)
    X[:30] += 5
    adata = ad.AnnData(X=X)
    compute_neighbors(adata, n_neighbors=10)
    assert Key.obsm.PCA not in adata.obsm
    compute_umap(adata, seed=0)
    emb = adata.obsm[Key.obsm.UMAP]
    assert emb.shape == (60, 2)
    # the two separated groups stay apart in the embedding
    centre_a, centre_b = emb[:30].mean(0), emb[30:].mean(0)
    spread = max(emb[:30].std(0).max(), emb[30:].std(0).max())
    assert np.linalg.norm(centre_a - centre_b) > 3 * spread


@pytest.mark.slow
def test_neighbors_above_exact_search_size(monkeypatch):
    """Above 4,096 cells scanpy searches approximately (pynndescent); that path used to crash.

    scanpy 1.11 called ``getnnz`` on the ``csr_array`` pynndescent returns, which scipy 1.17
    removed. The result must still be the kNN graph: compare with an exact search. The
    index is never prepared for queries (``NNDescent.prepare``: a search tree and graph
    nobody reads, and half of this test's time compiling them in a fresh numba cache).
    """
    import anndata as ad
    from pynndescent import NNDescent
    from sklearn.neighbors import NearestNeighbors

    from explorer.graph.neighbors import compute_neighbors

    def no_prepare(*_args, **_kwargs):
        msg = "the kNN search prepared its index for queries"
        raise AssertionError(msg)

    monkeypatch.setattr(NNDescent, "prepare", no_prepare)
    rng = np.random.default_rng(0)
    n_obs, k = 4500, 15
    pcs = rng.normal(size=(n_obs, 10)).astype(np.float32)
    adata = ad.AnnData(X=np.zeros((n_obs, 60), dtype=np.float32), obsm={"X_pca": pcs})
    compute_neighbors(adata, n_neighbors=k, n_pcs=10)
    dist = adata.obsp["distances"]
    assert np.all(np.diff(dist.indptr) == k - 1)
    exact = NearestNeighbors(n_neighbors=k).fit(pcs).kneighbors(pcs, return_distance=False)[:, 1:]
    found = np.split(dist.indices, dist.indptr[1:-1])
    recall = np.mean([len(set(f) & set(e)) / (k - 1) for f, e in zip(found, exact, strict=True)])
    assert recall > 0.95
