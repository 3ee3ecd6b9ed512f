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
    pairs, use = _boundary_pairs(adata, velocity, source, target, genes, cluster_key)
    out = np.full(adata.n_obs, np.nan, dtype=np.float64)
    if pairs.nnz == 0:
        return out
    X = np.asarray(adata.layers[Key.layers.MS][:, use], dtype=np.float32)
    corr = cosine_correlations(X, np.asarray(velocity[:, use], dtype=np.float32), pairs)
    # a pair with exactly zero correlation is dropped from the sparse result; it counts as 0
    rows = np.flatnonzero(np.diff(pairs.indptr))
    out[rows] = np.asarray(corr.sum(1), dtype=np.float64).ravel()[rows] / np.diff(pairs.indptr)[rows]
    return out


def _boundary_pairs(
    adata: AnnData, velocity: FloatArray, source: str, target: str, genes: BoolArray | None, cluster_key: str
) -> tuple[sparse.csr_matrix, np.ndarray]:
    """CBDir's kNN pairs ``(i, j)`` (obsp ``distances``, ``i`` in ``source``, ``j`` in ``target``) and genes.

    The genes are those with finite velocity in every cell, within ``genes`` when given.
    """
    use = np.isfinite(velocity).all(0)
    if genes is not None:
        use &= np.asarray(genes, dtype=bool)
    labels = adata.obs[cluster_key].astype(str).to_numpy()
    knn = sparse.csr_matrix(adata.obsp[Key.obsp.DISTANCES], copy=True)
    knn.data[:] = 1
    pairs = sparse.csr_matrix(
        sparse.diags((labels == source).astype(np.float32))
        @ knn
        @ sparse.diags((labels == target).astype(np.float32))
    )
    pairs.eliminate_zeros()
    return pairs, use


def cross_boundary_gene_terms(
    adata: AnnData,
    velocity: FloatArray,
    *,
    source: str,
    target: str,
    genes: BoolArray | None = None,
    cluster_key: str = Key.obs.CLUSTERS,
    chunk: int = 4096,
) -> FloatArray:
    """Each gene's share of :func:`cross_boundary_correctness`: which genes carry a transition's direction.

    A pair's correlation is a sum over genes, ``sum_g vc_g dc_g / (|vc| |dc|)``, with ``vc``
    the cell's velocity and ``dc`` its displacement to the neighbour, both centred over the
    genes; gene ``g``'s term is averaged as CBDir averages the pairs (over a cell's
    neighbours in ``target``, then over the scored cells of ``source``). The terms sum to
    the CBDir: a positive term is a gene whose velocity points from ``source`` towards
    ``target``, a negative one a gene that points back, weighted by the gene's share of the
    velocity's and the displacement's lengths (genes of high expression weigh most).

    Parameters
    ----------
    adata, velocity, source, target, genes, cluster_key
        As :func:`cross_boundary_correctness`.
    chunk
        Pairs scored at a time (memory: ``chunk`` x genes floats).

    Returns
    -------
    ``(n_vars,)`` float64; NaN for the genes left out, all NaN when no cell of ``source``
    has a neighbour in ``target``.

    Examples
    --------
    Two cells of A at the origin, one of B at ``(1, -1, 0)``: the first cell's velocity points
    straight at B (correlation 1), the second's half-way (0.5), so CBDir is 0.75; gene 0
    carries 0.5 of it, gene 1 0.25, gene 2 nothing.

    >>> import anndata as ad, scipy.sparse as sp
    >>> a = ad.AnnData(np.zeros((3, 3), np.float32), obs={"clusters": ["A", "A", "B"]})
    >>> a.layers["Ms"] = np.array([[0, 0, 0], [0, 0, 0], [1, -1, 0]], np.float32)
    >>> a.obsp["distances"] = sp.csr_matrix(np.array([[0, 0, 1], [0, 0, 1], [1, 0, 0]], np.float32))
    >>> v = np.array([[1, -1, 0], [1, 0, -1], [0, 0, 0]], np.float32)
    >>> cross_boundary_gene_terms(a, v, source="A", target="B").round(3).tolist()
    [0.5, 0.25, 0.0]
    >>> round(cross_boundary_correctness(a, v, source="A", target="B"), 3)
    0.75
    """
    pairs, use = _boundary_pairs(adata, velocity, source, target, genes, cluster_key)
    out = np.full(adata.n_vars, np.nan, dtype=np.float64)
    if pairs.nnz == 0:
        return out
    ms = adata.layers[Key.layers.MS]
    genes_used = np.flatnonzero(use)
    rows = np.repeat(np.arange(adata.n_obs), np.diff(pairs.indptr))
    cols = pairs.indices
    # each pair counts 1 / (the cell's pairs) / (cells scored), as CBDir's two means
    weight = 1.0 / np.diff(pairs.indptr)[rows] / np.count_nonzero(np.diff(pairs.indptr))
    total = np.zeros(genes_used.size, dtype=np.float64)
    for start in range(0, len(rows), chunk):
        i, j, w = rows[start : start + chunk], cols[start : start + chunk], weight[start : start + chunk]
        # only the chunk's rows, in float64 (never a copy of the whole layer)
        vi = np.asarray(velocity[i][:, genes_used], dtype=np.float64)
        vc = vi - vi.mean(1, keepdims=True)
        xi, xj = (np.asarray(ms[cells][:, genes_used], dtype=np.float64) for cells in (i, j))
        dc = xj - xi
        dc -= dc.mean(1, keepdims=True)
        norm = np.linalg.norm(vc, axis=1) * np.linalg.norm(dc, axis=1)
        # a pair without velocity or displacement is scored 0, as cosine_correlations leaves it out
        scale = np.divide(w, norm, out=np.zeros_like(norm), where=norm > 0)
        total += np.einsum("pg,pg,p->g", vc, dc, scale)
    out[use] = total
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
    >>> in_cluster_coherence(v, np.array([[1], [0], [1]]), ["a", "a", "a"]).astype(float).round(3).tolist()
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
