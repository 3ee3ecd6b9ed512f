"""First- and second-order moments over each cell's neighbourhood, as scVelo computes them.

scVelo (``pp.moments``, ``get_connectivities``) does not use the UMAP weights of the kNN
graph: it binarises the connectivities, adds self loops and divides each row by its number
of entries, so ``Ms`` of a cell is the plain mean of the spliced abundances over the cell
and its graph neighbours (Bergen et al. 2020, Methods). The products here use the same
float32 arithmetic, so they reproduce scVelo's ``Ms``/``Mu`` bit for bit.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from explorer._types import InputError
from explorer.keys import Key

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)


def neighbor_weights(connectivities: sparse.spmatrix) -> sparse.csr_matrix:
    """Binarised graph with self loops, rows summing to 1 (scVelo's ``get_connectivities``).

    Parameters
    ----------
    connectivities
        ``(n_obs, n_obs)`` kNN connectivities; only which entries are > 0 matters.

    Returns
    -------
    ``(n_obs, n_obs)`` float32 CSR matrix with ``1 / (k_i + 1)`` on the ``k_i`` neighbours
    of cell ``i`` and on the diagonal.
    """
    graph = sparse.csr_matrix(connectivities)
    n_obs = graph.shape[0]
    if graph.shape != (n_obs, n_obs):
        msg = f"connectivities must be square (n_obs, n_obs); found shape {graph.shape}."
        raise InputError(msg)
    adjacency = (graph > 0).astype(np.float64)
    adjacency.setdiag(1.0)  # scVelo's setdiag(1): every cell is its own neighbour
    adjacency = sparse.csr_matrix(adjacency)
    adjacency.sort_indices()
    counts = np.diff(adjacency.indptr)
    # 1.0 / count in float64, then float32, as scVelo's multiply(1.0 / sum(1)).astype(float32)
    adjacency.data = np.repeat(1.0 / counts, counts)
    return adjacency.astype(np.float32)


def moments(
    connectivities: sparse.spmatrix, X: sparse.spmatrix | np.ndarray, *, fused: bool = False
) -> np.ndarray:
    """Mean of ``X`` over each cell and its neighbours (scVelo's first-order moments).

    Parameters
    ----------
    connectivities
        ``(n_obs, n_obs)`` kNN connectivities (binarised internally, see
        :func:`neighbor_weights`).
    X
        ``(n_obs, n_vars)`` abundances, sparse or dense.
    fused
        Round each float32 multiply-add once (a fused multiply-add), as scipy does on
        machines whose compiler fuses them (e.g. ARM). scVelo's own test fixtures
        (``tests/_data/*_preprocessed.h5ad``) were made that way; ``False`` gives what
        scVelo computes on x86-64. The two differ by at most a few float32 ulps.

    Returns
    -------
    Dense float32 array of shape ``(n_obs, n_vars)``.
    """
    weights = neighbor_weights(connectivities)
    if fused:
        return _smooth_fused(weights, X)
    return _smooth(weights, X)


def compute_moments(adata: AnnData) -> None:
    """Compute the first-order moments ``Ms`` and ``Mu`` in place.

    Parameters
    ----------
    adata
        Data with normalised ``layers['spliced']`` / ``layers['unspliced']`` and
        ``obsp['connectivities']`` (:func:`explorer.graph.neighbors.compute_neighbors`).

    Returns
    -------
    Nothing; sets layers ``Ms`` and ``Mu`` (dense float32).
    """
    weights = neighbor_weights(_connectivities(adata))
    adata.layers[Key.layers.MS] = _smooth(weights, adata.layers[Key.layers.SPLICED])
    adata.layers[Key.layers.MU] = _smooth(weights, adata.layers[Key.layers.UNSPLICED])


def second_order_moments(adata: AnnData, *, adjusted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Second-order moments ``Mss = <s^2>`` and ``Mus = <u s>`` over each neighbourhood.

    As scVelo's ``pp.second_order_moments``: the same neighbourhood means as ``Ms``/``Mu``,
    taken of ``s * s`` and ``u * s`` (normalised, not log-transformed counts).

    Parameters
    ----------
    adata
        Data with layers ``spliced``, ``unspliced`` and obsp ``connectivities``
        (and ``Ms``/``Mu`` when ``adjusted``).
    adjusted
        ``False`` (the default, what scVelo's stochastic model calls) returns the plain
        means ``<s^2>`` and ``<u s>``. ``True`` returns ``2 <s^2> - Ms`` and
        ``2 <u s> - Mu``, scVelo's ``adjusted=True`` correction for Poisson noise. Note
        that scVelo's stochastic model builds its own terms from the unadjusted moments,
        ``var_ss = 2 Mss - Ms`` and ``cov_us = 2 Mus + Mu`` (a plus sign for ``Mu``), so
        use ``adjusted=False`` to reproduce it.

    Returns
    -------
    ``(Mss, Mus)``, dense float32 arrays of shape ``(n_obs, n_vars)``.
    """
    weights = neighbor_weights(_connectivities(adata))
    s = sparse.csr_matrix(adata.layers[Key.layers.SPLICED])
    u = sparse.csr_matrix(adata.layers[Key.layers.UNSPLICED])
    mss = _smooth(weights, s.multiply(s))
    mus = _smooth(weights, s.multiply(u))
    if adjusted:
        for key in (Key.layers.MS, Key.layers.MU):
            if key not in adata.layers:
                msg = (
                    f"adjusted=True needs layer {key!r}; adata.layers has {list(adata.layers)}. "
                    "Run compute_moments first."
                )
                raise InputError(msg)
        mss = 2 * mss - np.asarray(adata.layers[Key.layers.MS], dtype=np.float32)
        mus = 2 * mus - np.asarray(adata.layers[Key.layers.MU], dtype=np.float32)
    return mss, mus


def _connectivities(adata: AnnData) -> sparse.spmatrix:
    if Key.obsp.CONNECTIVITIES not in adata.obsp:
        msg = (
            f"obsp[{Key.obsp.CONNECTIVITIES!r}] not found; adata.obsp has {list(adata.obsp)}. "
            "Compute the neighbour graph first (explorer.graph.neighbors.compute_neighbors)."
        )
        raise InputError(msg)
    return adata.obsp[Key.obsp.CONNECTIVITIES]


def _smooth(weights: sparse.csr_matrix, X: sparse.spmatrix | np.ndarray) -> np.ndarray:
    """``weights @ X`` as a dense float32 array, with scVelo's exact float32 arithmetic.

    scVelo multiplies two sparse matrices; CSR times a dense array accumulates the same
    float32 products in the same order (the weights' column order; the extra terms are
    exact zeros), so the result is bit-identical and 5-10 times faster.
    """
    dense = X.toarray() if sparse.issparse(X) else np.asarray(X)
    dense = np.ascontiguousarray(dense, dtype=np.float32)
    return np.asarray(weights @ dense, dtype=np.float32)


def _smooth_fused(weights: sparse.csr_matrix, X: sparse.spmatrix | np.ndarray) -> np.ndarray:
    """``weights @ X`` accumulated in the CSR order with one rounding per multiply-add.

    A float32 product is exact in float64, so ``float32(acc + w * x)`` computed in
    float64 is the fused multiply-add. Vectorised over rows, one neighbour slot at a time.
    """
    dense = X.toarray() if sparse.issparse(X) else np.asarray(X)
    dense = np.asarray(dense, dtype=np.float32)
    counts = np.diff(weights.indptr)
    out = np.zeros((weights.shape[0], dense.shape[1]), dtype=np.float32)
    for slot in range(int(counts.max(initial=0))):
        rows = np.flatnonzero(counts > slot)
        pos = weights.indptr[rows] + slot
        w = weights.data[pos].astype(np.float64)[:, None]
        out[rows] = (out[rows].astype(np.float64) + w * dense[weights.indices[pos]]).astype(np.float32)
    return out
