"""Scores of a velocity field against known biology."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from explorer.graph.transition import cosine_correlations
from explorer.keys import Key

if TYPE_CHECKING:
    from anndata import AnnData

    from explorer._types import BoolArray, FloatArray


def cross_boundary_correctness(
    adata: AnnData,
    velocity: FloatArray,
    *,
    source: str,
    target: str,
    genes: BoolArray | None = None,
    cluster_key: str = Key.obs.CLUSTERS,
) -> float:
    """Cross-boundary direction correctness (CBDir; Qiao & Huang 2021), in expression space.

    For each cell of ``source`` with kNN neighbours (obsp ``distances``) in ``target``,
    the mean correlation of its velocity with the displacements ``Ms_j - Ms_i`` to those
    neighbours (the velocity-graph correlation of
    :func:`~explorer.graph.transition.cosine_correlations`), averaged over those cells.

    Parameters
    ----------
    adata
        Cells with layer ``Ms``, obsp ``distances`` and obs ``cluster_key``.
    velocity
        ``(n_obs, n_vars)`` velocity; genes with a non-finite value are left out.
    source, target
        The two clusters of the transition ``source -> target``.
    genes
        ``(n_vars,)`` genes to use (default: all with finite velocity).
    cluster_key
        obs column with the cluster labels.

    Returns
    -------
    The score in [-1, 1]; NaN when no cell of ``source`` has a neighbour in ``target``.
    """
    labels = adata.obs[cluster_key].astype(str).to_numpy()
    knn = sparse.csr_matrix(adata.obsp[Key.obsp.DISTANCES], copy=True)
    knn.data[:] = 1
    pairs = sparse.csr_matrix(
        sparse.diags((labels == source).astype(np.float32))
        @ knn
        @ sparse.diags((labels == target).astype(np.float32))
    )
    pairs.eliminate_zeros()
    if pairs.nnz == 0:
        return float("nan")
    use = np.isfinite(velocity).all(0)
    if genes is not None:
        use &= np.asarray(genes, dtype=bool)
    X = np.asarray(adata.layers[Key.layers.MS][:, use], dtype=np.float32)
    corr = cosine_correlations(X, np.asarray(velocity[:, use], dtype=np.float32), pairs)
    # a pair with exactly zero correlation is dropped from the sparse result; it counts as 0
    rows = np.flatnonzero(np.diff(pairs.indptr))
    per_cell = np.asarray(corr.sum(1)).ravel()[rows] / np.diff(pairs.indptr)[rows]
    return float(per_cell.mean())
