"""Scores of a velocity field: against known biology (CBDir) and its own coherence (consistency)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from explorer.graph.transition import cosine_correlations, mean_neighbour_cosine
from explorer.keys import Key

if TYPE_CHECKING:
    from anndata import AnnData
    from numpy.typing import ArrayLike

    from explorer._types import BoolArray, FloatArray, IntArray


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
    per_cell = cross_boundary_correctness_per_cell(
        adata, velocity, source=source, target=target, genes=genes, cluster_key=cluster_key
    )
    scored = per_cell[np.isfinite(per_cell)]
    return float(scored.astype(np.float64).mean()) if scored.size else float("nan")


def cross_boundary_correctness_per_cell(
    adata: AnnData,
    velocity: FloatArray,
    *,
    source: str,
    target: str,
    genes: BoolArray | None = None,
    cluster_key: str = Key.obs.CLUSTERS,
) -> FloatArray:
    """Each cell's term of :func:`cross_boundary_correctness`: ``(n_obs,)``, NaN for the cells it skips.

    A cell of ``source`` with kNN neighbours in ``target`` gets the mean correlation of its
    velocity with the displacements to those neighbours; every other cell gets NaN.
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
    out = np.full(adata.n_obs, np.nan, dtype=np.float64)
    if pairs.nnz == 0:
        return out
    use = np.isfinite(velocity).all(0)
    if genes is not None:
        use &= np.asarray(genes, dtype=bool)
    X = np.asarray(adata.layers[Key.layers.MS][:, use], dtype=np.float32)
    corr = cosine_correlations(X, np.asarray(velocity[:, use], dtype=np.float32), pairs)
    # a pair with exactly zero correlation is dropped from the sparse result; it counts as 0
    rows = np.flatnonzero(np.diff(pairs.indptr))
    out[rows] = np.asarray(corr.sum(1), dtype=np.float64).ravel()[rows] / np.diff(pairs.indptr)[rows]
    return out


def _unit_rows(velocity: FloatArray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``velocity`` scaled to length 1 (non-finite genes left out), and which rows are nonzero."""
    V = np.asarray(velocity, dtype=np.float32)
    V = V[:, np.isfinite(V).all(0)]
    norm = np.sqrt(np.einsum("ij,ij->i", V, V, dtype=np.float64))
    unit = np.divide(V, norm[:, None], out=np.zeros_like(V), where=norm[:, None] > 0)
    return unit, norm > 0


def velocity_consistency(velocity: FloatArray, indices: IntArray) -> FloatArray:
    """Overall consistency (DeepVelo, Cui et al. 2022): mean cosine of a cell's velocity with its neighbours'.

    Unlike :func:`~explorer.graph.transition.velocity_confidence` (scVelo's), velocities
    are not centred and negative means are kept.

    Parameters
    ----------
    velocity
        ``(n_obs, n_vars)`` velocity; genes with a non-finite value are left out.
    indices
        ``(n_obs, k)`` neighbour indices
        (:func:`~explorer.graph.transition.knn_indices` of obsp ``distances``).

    Returns
    -------
    ``(n_obs,)`` float32 in [-1, 1]; NaN for a cell with zero velocity or no neighbour
    with a nonzero one.
    """
    unit, has = _unit_rows(velocity)
    return mean_neighbour_cosine(unit, has, indices).astype(np.float32)


def velocity_consistency_by_type(velocity: FloatArray, labels: ArrayLike) -> FloatArray:
    """Cell-type-wise consistency (DeepVelo): mean cosine of a cell's velocity with all cells of its type.

    The mean runs over every cell of the type with a nonzero velocity, the cell itself
    included (as the reference implementation, which compares with the mean of the
    type's unit velocities).

    Parameters
    ----------
    velocity
        ``(n_obs, n_vars)`` velocity; genes with a non-finite value are left out.
    labels
        ``(n_obs,)`` cell types (``adata.obs['clusters']``); missing labels get NaN.

    Returns
    -------
    ``(n_obs,)`` float32 in [-1, 1]; NaN for a cell with zero velocity or no type.
    """
    unit, has = _unit_rows(velocity)
    codes, _ = pd.factorize(pd.Series(np.asarray(labels, dtype=object)), use_na_sentinel=True)
    out = np.full(unit.shape[0], np.nan)
    for c in np.unique(codes[codes >= 0]):
        members = codes == c
        mean_unit = unit[members & has].mean(axis=0) if (members & has).any() else None
        if mean_unit is None:
            continue
        out[members] = unit[members] @ mean_unit
    out[~has] = np.nan
    return out.astype(np.float32)


def in_cluster_coherence(velocity: FloatArray, indices: IntArray, labels: ArrayLike) -> FloatArray:
    """In-cluster velocity coherence (ICVCoh; Qiao & Huang 2021), per cell.

    For cell ``i`` of cluster ``c``: the mean cosine similarity of its velocity with the
    velocities of its kNN neighbours (``indices``) that are also in ``c``, the cell itself
    left out (VeloAE's ``inner_cluster_coh`` keeps it, adding a 1 to every mean). A
    cluster's ICVCoh is the mean over its cells with a value.

    Parameters
    ----------
    velocity
        ``(n_obs, n_vars)`` velocity; genes with a non-finite value are left out.
    indices
        ``(n_obs, k)`` neighbour indices (:func:`~explorer.graph.transition.knn_indices`).
    labels
        ``(n_obs,)`` clusters.

    Returns
    -------
    ``(n_obs,)`` float32 in [-1, 1]; NaN for a cell with zero velocity, no label or no
    neighbour of its cluster with a nonzero velocity.

    Examples
    --------
    >>> v = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    >>> in_cluster_coherence(v, np.array([[1], [0], [1]]), ["a", "a", "a"]).round(3).tolist()
    [0.707, 0.707, 0.707]
    """
    unit, has = _unit_rows(velocity)
    codes, _ = pd.factorize(pd.Series(np.asarray(labels, dtype=object)), use_na_sentinel=True)
    idx = np.asarray(indices)
    same = (
        (codes[idx] == codes[:, None])
        & (codes[:, None] >= 0)
        & has[idx]
        & (idx != np.arange(len(idx))[:, None])
    )
    cos = np.einsum("ij,ikj->ik", unit, unit[idx], dtype=np.float64)
    n = same.sum(1)
    out = np.where(n > 0, np.where(same, cos, 0.0).sum(1) / np.maximum(n, 1), np.nan)
    out[~has] = np.nan
    return out.astype(np.float32)


def parse_transitions(text: str) -> list[tuple[str, str]]:
    """``"A>B, C>D"`` -> ``[("A", "B"), ("C", "D")]``: cluster transitions for CBDir and ICVCoh.

    Raises
    ------
    ValueError
        If a part is not ``SOURCE>TARGET`` with both names non-empty.
    """
    pairs = []
    for part in text.split(","):
        if not part.strip():
            continue
        source, sep, target = part.partition(">")
        if not sep or not source.strip() or not target.strip() or ">" in target:
            msg = (
                f"Expected transitions as SOURCE>TARGET separated by commas (e.g. "
                f"'Ngn3 high EP>Pre-endocrine,Pre-endocrine>Beta'); found {part.strip()!r}."
            )
            raise ValueError(msg)
        pairs.append((source.strip(), target.strip()))
    if not pairs:
        msg = f"Expected at least one transition SOURCE>TARGET; found {text!r}."
        raise ValueError(msg)
    return pairs
