"""The k-nearest-neighbour graph of cells, as scVelo's ``pp.neighbors`` builds it.

scVelo 0.3.4 (``scv.pp.moments(n_pcs=30, n_neighbors=30)``) computes a PCA with scanpy
(30 components, ``svd_solver="arpack"``, on the highly variable genes) unless ``X_pca``
already exists with enough components, and then scanpy's ``Neighbors`` with the UMAP
method: exact euclidean neighbours below 4,096 cells (pynndescent above) and UMAP's fuzzy
simplicial set as connectivities. We call the same scanpy functions, so the graph is the
same one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from explorer._types import PREPROCESS, InputError
from explorer.keys import Key

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

#: scanpy and scVelo use X itself, not a PCA, for data with fewer genes than this
_MIN_GENES_FOR_PCA = 50


def has_neighbors(adata: AnnData) -> bool:
    """Whether ``adata`` has a kNN graph (obsp ``connectivities`` and uns ``neighbors``)."""
    return Key.obsp.CONNECTIVITIES in adata.obsp and Key.uns.NEIGHBORS in adata.uns


def compute_neighbors(
    adata: AnnData, *, n_neighbors: int = PREPROCESS.n_neighbors, n_pcs: int = PREPROCESS.n_pcs, seed: int = 0
) -> None:
    """Compute PCA (if missing) and the kNN graph in place, as scVelo's ``pp.neighbors``.

    Parameters
    ----------
    adata
        Normalised, log-transformed data (see :func:`explorer.data.preprocess.filter_and_normalize`).
    n_neighbors
        Neighbours per cell, the cell itself included (scanpy's convention).
    n_pcs
        Principal components to use. An existing ``obsm['X_pca']`` with at least this
        many components is reused, as scVelo and scanpy do; with fewer than 50 genes the
        graph is built on X directly.
    seed
        Random state of the PCA (ARPACK start vector) and of the neighbour search.

    Returns
    -------
    Nothing; sets obsp ``distances`` (``n_neighbors - 1`` per row, self excluded) and
    ``connectivities`` (symmetric UMAP weights); uns ``neighbors``; and, when computed,
    obsm ``X_pca``, varm ``PCs``, uns ``pca``.

    Raises
    ------
    InputError
        When there are fewer cells than ``n_neighbors``.
    """
    if adata.n_obs < n_neighbors:
        msg = (
            f"too few cells: found {adata.n_obs}, fewer than n_neighbors={n_neighbors} asked for. "
            f"Pass `n_neighbors=` at most {adata.n_obs}."
        )
        raise InputError(msg)
    if n_neighbors < 2:
        msg = f"n_neighbors must be at least 2 (the cell and one neighbour), got {n_neighbors}."
        raise InputError(msg)

    pca = adata.obsm.get(Key.obsm.PCA)
    if pca is None and adata.n_vars < _MIN_GENES_FOR_PCA:
        use_rep, n_used = "X", None
        logger.info("%d genes: neighbours computed on X directly, as scanpy does", adata.n_vars)
    else:
        if pca is None or pca.shape[1] < n_pcs:
            _compute_pca(adata, n_pcs=n_pcs, seed=seed)
        else:
            logger.info("using the existing obsm[%r] (%d components)", Key.obsm.PCA, pca.shape[1])
        use_rep, n_used = Key.obsm.PCA, min(n_pcs, adata.obsm[Key.obsm.PCA].shape[1])
    # scanpy and pynndescent load only here (they compile numba code on import, about a
    # second): reading and fitting data that has its neighbours never needs them
    import scanpy as sc

    sc.pp.neighbors(
        adata,
        n_neighbors=n_neighbors,
        n_pcs=n_used,
        use_rep=use_rep,
        method="umap",
        metric="euclidean",
        random_state=seed,
        key_added=None,
        # below scanpy's exact-search size it picks brute force itself, as scVelo gets
        transformer=None
        if adata.n_obs < _EXACT_KNN_MAX_OBS
        else _approximate_knn(adata.n_obs, n_neighbors, seed),
    )
    if adata.n_obs >= _EXACT_KNN_MAX_OBS:
        adata.obsp[Key.obsp.DISTANCES] = _knn_distances(adata.obsp[Key.obsp.DISTANCES], n_neighbors - 1)


#: scanpy searches neighbours exactly below this many cells and with pynndescent above
_EXACT_KNN_MAX_OBS = 4096


def _knn_distances(distances: sparse.csr_matrix, k: int) -> sparse.csr_matrix:
    """Keep the ``k`` nearest other cells of each row, as scanpy's exact search stores them.

    pynndescent's rows hold the cell itself (distance 0) and ``n_neighbors`` others; the
    exact path stores ``n_neighbors - 1`` others and no self. Keep one convention so every
    reader (scVelo's neighbour recursion included) sees the same graph shape.
    """
    d = distances.tocsr()
    counts = np.diff(d.indptr)
    n_obs = d.shape[0]
    width = int(counts.max())
    cols = np.full((n_obs, width), -1, dtype=np.int64)
    vals = np.full((n_obs, width), np.inf, dtype=np.float64)
    rows = np.repeat(np.arange(n_obs), counts)
    pos = np.arange(d.nnz) - np.repeat(d.indptr[:-1], counts)
    cols[rows, pos] = d.indices
    vals[rows, pos] = d.data
    vals[cols == np.arange(n_obs)[:, None]] = np.inf  # drop the cell itself
    order = np.argsort(vals, axis=1, kind="stable")[:, :k]
    keep_cols = np.take_along_axis(cols, order, axis=1)
    keep_vals = np.take_along_axis(vals, order, axis=1)
    ok = np.isfinite(keep_vals) & (keep_cols >= 0)
    out = sparse.csr_matrix(
        (keep_vals[ok].astype(np.float32), (np.nonzero(ok)[0], keep_cols[ok])), shape=d.shape
    )
    out.sort_indices()
    return out


def _approximate_knn(n_obs: int, n_neighbors: int, seed: int) -> Any:
    """Build scanpy's default pynndescent search, handing back a ``csr_matrix``.

    scanpy 1.11 builds this transformer itself above 4,096 cells, but pynndescent returns
    a ``csr_array`` and scanpy then calls ``getnnz(axis=1)``, which scipy 1.17 removed
    from sparse arrays: ``prepare`` failed on every dataset of more than ~10k cells. Same
    parameters as scanpy's (UMAP's ``nearest_neighbors`` defaults), one conversion more.

    The index is not prepared for later queries: pynndescent's own ``fit_transform``
    ends with ``compress_index``, which builds a search tree and a pruned search graph
    (``NNDescent.prepare``) that scanpy never uses. The kNN graph is the same (it is
    read before that step); what goes is the preparation's time and, in a process
    whose numba cache is empty, compiling its kernels (about 58 s of CPU of the
    4,500-cell search's 125 s, measured on the 2-core development machine under load).
    """
    from pynndescent import PyNNDescentTransformer

    class _CsrMatrixNNDescent(PyNNDescentTransformer):
        def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> sparse.csr_matrix:
            # pynndescent's own fit_transform, without its closing compress_index
            self.fit(X, compress_index=False)
            return sparse.csr_matrix(self.transform(X=None))

        def transform(self, X: Any) -> sparse.csr_matrix:
            return sparse.csr_matrix(super().transform(X))

    return _CsrMatrixNNDescent(
        n_neighbors=n_neighbors,
        metric="euclidean",
        random_state=seed,
        n_trees=min(64, 5 + round(n_obs**0.5 / 20.0)),
        n_iters=max(5, round(np.log2(n_obs))),
    )


def _compute_pca(adata: AnnData, *, n_pcs: int, seed: int) -> None:
    hv = adata.var.get(Key.var.HIGHLY_VARIABLE)
    mask = None
    n_vars = adata.n_vars
    if hv is not None and not bool(np.all(hv)):
        mask = Key.var.HIGHLY_VARIABLE
        n_vars = int(np.sum(hv))
    # scVelo's ``_set_pca``: at most n_vars - 1 and n_obs - 1 components, ARPACK
    n_comps = min(n_pcs, n_vars - 1, adata.n_obs - 1)
    import scanpy as sc

    sc.pp.pca(adata, n_comps=n_comps, mask_var=mask, svd_solver="arpack", random_state=seed)
