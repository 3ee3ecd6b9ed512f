"""Fixtures for the app tests: a small preprocessed dataset built without UMAP/numba.

``app_adata``: ``simulate(n_obs=300, n_vars=30, seed=0)`` (two lineages), log-normalised
counts, an exact 15-nearest-neighbour graph on the first 10 principal components
(sklearn, so no numba JIT on the test path), ``Ms``/``Mu`` from
``explorer.graph.moments.compute_moments``, ``X_umap`` = the first two principal
components, and ``clusters`` = true time in four bins. Shared read-only: the app never
writes into the data it shows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from explorer.keys import Key


def make_app_adata(n_obs: int = 300, n_vars: int = 30, *, seed: int = 0, n_neighbors: int = 15):
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    from explorer.data.simulate import simulate
    from explorer.graph.moments import compute_moments

    adata = simulate(n_obs=n_obs, n_vars=n_vars, seed=seed, branches=2)
    for layer in (Key.layers.SPLICED, Key.layers.UNSPLICED):
        counts = adata.layers[layer]
        counts = counts.toarray() if sparse.issparse(counts) else np.asarray(counts)
        size = counts.sum(axis=1, keepdims=True)
        adata.layers[layer] = sparse.csr_matrix(
            counts / np.maximum(size, 1) * np.median(size), dtype=np.float32
        )
    X = np.log1p(adata.layers[Key.layers.SPLICED].toarray())
    pcs = PCA(n_components=10, random_state=seed).fit_transform(X).astype(np.float32)
    adata.obsm[Key.obsm.PCA] = pcs
    adata.obsm[Key.obsm.UMAP] = np.ascontiguousarray(pcs[:, :2])
    knn = NearestNeighbors(n_neighbors=n_neighbors).fit(pcs)
    dist = knn.kneighbors_graph(pcs, mode="distance")
    dist.setdiag(0)
    dist.eliminate_zeros()
    conn = (dist > 0).astype(np.float32)
    conn = conn.maximum(conn.T).tocsr()
    adata.obsp[Key.obsp.DISTANCES] = dist.tocsr().astype(np.float32)
    adata.obsp[Key.obsp.CONNECTIVITIES] = conn
    adata.uns[Key.uns.NEIGHBORS] = {
        "connectivities_key": Key.obsp.CONNECTIVITIES,
        "distances_key": Key.obsp.DISTANCES,
        "params": {"n_neighbors": n_neighbors, "method": "sklearn"},
    }
    compute_moments(adata)
    t = adata.obs[Key.obs.TRUE_T].to_numpy()
    bins = np.digitize(t, np.quantile(t, [0.25, 0.5, 0.75]))
    adata.obs[Key.obs.CLUSTERS] = pd.Categorical.from_codes(bins, ["early", "mid", "late", "end"])
    return adata


@pytest.fixture(scope="session")
def app_adata():
    """A small preprocessed dataset with an embedding, clusters and a neighbour graph (see module doc)."""
    return make_app_adata()
