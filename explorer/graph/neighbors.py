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
from typing import TYPE_CHECKING

import numpy as np

from explorer._types import InputError
from explorer.keys import Key

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

#: scanpy and scVelo use X itself, not a PCA, for data with fewer genes than this
_MIN_GENES_FOR_PCA = 50


def has_neighbors(adata: AnnData) -> bool:
    """Whether ``adata`` has a kNN graph (obsp ``connectivities`` and uns ``neighbors``)."""
    return Key.obsp.CONNECTIVITIES in adata.obsp and Key.uns.NEIGHBORS in adata.uns


def compute_neighbors(adata: AnnData, *, n_neighbors: int = 30, n_pcs: int = 30, seed: int = 0) -> None:
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
    import scanpy as sc

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
    sc.pp.neighbors(
        adata,
        n_neighbors=n_neighbors,
        n_pcs=n_used,
        use_rep=use_rep,
        method="umap",
        metric="euclidean",
        random_state=seed,
        key_added=None,
    )


def _compute_pca(adata: AnnData, *, n_pcs: int, seed: int) -> None:
    import scanpy as sc

    hv = adata.var.get(Key.var.HIGHLY_VARIABLE)
    mask = None
    n_vars = adata.n_vars
    if hv is not None and not bool(np.all(hv)):
        mask = Key.var.HIGHLY_VARIABLE
        n_vars = int(np.sum(hv))
    # scVelo's ``_set_pca``: at most n_vars - 1 and n_obs - 1 components, ARPACK
    n_comps = min(n_pcs, n_vars - 1, adata.n_obs - 1)
    sc.pp.pca(adata, n_comps=n_comps, mask_var=mask, svd_solver="arpack", random_state=seed)
