"""Gene-shared latent time from the per-gene times of the dynamical model.

scVelo's ``tl.latent_time`` (Bergen et al. 2020, "Identifying a gene-shared latent
time"; theislab/scvelo:scvelo/tools/dynamical_model.py and _em_model_utils.py):

1. root cells are where the backward velocity chain comes to rest: the eigenvectors of
   the backward transition matrix with eigenvalue 1, averaged over each cell's
   neighbours (scVelo's ``terminal_states``; :func:`root_cells`);
2. each gene's time is re-rooted at a root cell, wrapping cells fitted before the root
   to the end (:func:`root_time`);
3. per cell, a low quantile of the re-rooted gene times is taken, choosing the two
   quantiles whose ranked values are closest to uniform (:func:`shared_time`);
4. the result is averaged over up to four root cells and smoothed over neighbours,
   except for cells whose time disagrees with their neighbourhood (:func:`latent_time`).

Three departures from scVelo, all measured on its own simulator (README, "Speed and
accuracy against scVelo"): the gene times are averaged over neighbours on each gene's
clock, a loop through the off state, instead of linearly (:func:`smooth_gene_times`);
they are then combined as per-gene ranks rather than on each gene's fitted scale
(:func:`rank_gene_times`); and the root-cell score does not depend on the eigen
solver's rounding noise (:func:`root_cells`).

Pure array functions; :func:`compute_latent_time` is the AnnData wrapper.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numba
import numpy as np
from scipy import sparse
from scipy.sparse import linalg as splinalg

from explorer._types import MissingInputError
from explorer.graph.transition import (
    get_velocity_graph,
    self_transition_probabilities,
    sparse_dense_product,
    transition_matrix,
    velocity_graphs,
)
from explorer.keys import Key

if TYPE_CHECKING:
    from anndata import AnnData

    from explorer._types import FloatArray

logger = logging.getLogger(__name__)

#: scVelo's default quantiles of the gene times from which the shared time is built
SHARED_TIME_PERCENTILES: tuple[float, ...] = (15, 20, 25, 30, 35)
#: eigenvalues within this of 1 count as stationary (scVelo's ``eigs(eps=1e-3)``)
_EIG_EPS = 1e-3
#: relative accuracy of the eigen solve. scVelo solves to machine precision; on the
#: pancreas (six eigenvalues at exactly 1, two more above 1 - 1e-3) 1e-6 takes 271
#: matrix products instead of 1,349 (0.31 s of CPU instead of 1.13 s), and the latent time's
#: Spearman correlation with scVelo's is 0.9845 (0.9855 at machine precision). With
#: eigenvalue 1 repeated, the solver returns an arbitrary basis of its eigenspace at
#: any accuracy (a larger Krylov space changes 10-20% of the root cells too)
_EIG_TOL = 1e-6
#: root-cell scores above this are root cells (scVelo's ``1 - 1e-3`` threshold)
_ROOT_THRESHOLD = 1 - 1e-3
#: scVelo averages the latent time over this many root cells
_N_ROOTS = 4
#: root cells are taken only among this share of cells with the smallest summed gene time
_ROOT_MAX_QUANTILE = 0.05
#: eigenvector entries below this share of the largest are rounding noise
_NOISE = 1e-9
#: a gene's clock closes from its latest time back to time 0 over this share of its span
_CLOCK_GAP = 0.05
#: float64 entries of the block of gene times (genes for the ranks and the clock smoothing,
#: cells for the re-rooted times) worked on at a time, so that the temporaries stay the size
#: of a block: the times themselves are ``(n_obs, n_genes)`` (160 MB at 100,000 cells and
#: 200 genes) and their steps made several copies of them at once, per root cell
_TIME_BLOCK_ENTRIES = 1 << 22


def neighbor_average_matrix(connectivities: sparse.spmatrix) -> sparse.csr_matrix:
    """ScVelo's ``get_connectivities``: binarised kNN graph with self loops, rows summing to 1."""
    adjacency = sparse.csr_matrix(connectivities, dtype=np.float64, copy=True)
    adjacency.data = (adjacency.data > 0).astype(np.float64)
    adjacency.setdiag(1.0)
    adjacency.eliminate_zeros()
    counts = np.asarray(adjacency.sum(1)).ravel()
    return sparse.csr_matrix(sparse.diags(1.0 / counts) @ adjacency, dtype=np.float32)


def _weights(connectivities: sparse.spmatrix, weights: sparse.spmatrix | None) -> sparse.csr_matrix:
    """The caller's ``weights`` (:func:`neighbor_average_matrix` of ``connectivities``), else built here."""
    return neighbor_average_matrix(connectivities) if weights is None else weights


def scale01(x: np.ndarray) -> np.ndarray:
    """Linear map of ``x`` onto [0, 1] (constant input gives zeros)."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = np.nanmin(x), np.nanmax(x)
    return np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo)


def root_cells(
    transitions_backward: sparse.spmatrix,
    connectivities: sparse.spmatrix,
    *,
    n_eigs: int = 10,
    seed: int = 0,
    n_power_steps: int | None = None,
    weights: sparse.spmatrix | None = None,
) -> FloatArray:
    """Root-cell score in [0, 1] from the backward transition matrix (scVelo's ``terminal_states``).

    Parameters
    ----------
    transitions_backward
        ``(n_obs, n_obs)`` row-stochastic backward transition matrix
        (:func:`explorer.graph.transition.transition_matrix` with ``backward=True``).
    connectivities
        ``(n_obs, n_obs)`` kNN connectivities.
    n_eigs
        Number of leading eigenvectors computed.
    seed
        Seeds the start vector of the eigen solver.
    n_power_steps
        ``None``: scVelo's eigen solve (ARPACK; here to a relative accuracy of 1e-6,
        where scVelo's machine precision takes about 5x the matrix products on the
        pancreas for a latent time as close to scVelo's). Its eigenvalues near
        1 cluster tighter as cells are added, and the Arnoldi restarts grow with them
        (18,000 restarts, 280 s, at 100,000 cells even with a 1e-6 tolerance). An
        integer: instead push a uniform distribution through the backward chain this
        many steps and use where its mass sits (the slow modes that the eigenvectors
        with eigenvalue near 1 describe), at a cost linear in the cells. On a 10,000-cell
        simulation 1,000 steps shares 83% of the root cells with the eigen solve, whose
        median true time is the same (0.23 of a 0-20 range).
    weights
        ``neighbor_average_matrix(connectivities)`` if the caller has it already
        (the dynamical model does): it is not built again.

    Returns
    -------
    ``(n_obs,)`` float32: the stationary eigenvectors (eigenvalue >= 1 - 1e-3, or the
    leading one if none; or the pushed distribution), clipped to their 2nd-98th
    percentiles, scaled to a maximum of 1, summed, averaged over neighbours, clipped at
    the 98th percentile and scaled to [0, 1]. Cells scoring above ``1 - 1e-3`` are root
    cells.
    """
    T = sparse.csr_matrix(transitions_backward, dtype=np.float64)
    n = T.shape[0]
    if n_power_steps is not None:
        vecs = _backward_mass(T, n_power_steps)[:, None]
    else:
        k = min(n_eigs, n - 2)
        rng = np.random.default_rng(seed)
        v0 = rng.random(n)
        vals, vecs = splinalg.eigs(T.T, k=k, which="LR", v0=v0, tol=_EIG_TOL)
        order = np.argsort(vals.real)[::-1]
        vals, vecs = vals.real[order], np.abs(vecs.real[:, order])
        keep = vals >= 1 - _EIG_EPS
        if not keep.any():
            keep[0] = True
        vecs = vecs[:, keep]
    # entries at rounding level are noise of the solver (they differ between BLAS
    # builds and thread counts); zero them so that the percentiles never pick them up
    vecs[vecs <= _NOISE * vecs.max(0)] = 0
    lbs, ubs = np.percentile(vecs, [2, 98], axis=0)
    # mass on fewer than 2% of the cells puts scVelo's upper clip at 0, which would wipe
    # the vector out: keep it unclipped then
    ubs = np.where(ubs > 0, ubs, vecs.max(0))
    vecs[vecs < lbs] = 0
    vecs = np.clip(vecs, 0, ubs)
    vecs /= np.where(vecs.max(0) > 0, vecs.max(0), 1)
    score = _weights(connectivities, weights) @ vecs.sum(1)
    score = np.clip(score, 0, np.percentile(score, 98))
    return scale01(score).astype(np.float32)


def _backward_mass(T: sparse.csr_matrix, n_steps: int) -> np.ndarray:
    """Distribution after ``n_steps`` of the chain ``T`` started uniform (float64)."""
    if n_steps < 1:
        msg = f"Expected n_power_steps >= 1, found {n_steps}. Use None for the eigen solve."
        raise ValueError(msg)
    # row-major transpose: p <- T^T p is one CSR matrix-vector product per step
    TT = sparse.csr_matrix(T.T, dtype=np.float32)
    p = np.full(T.shape[0], 1.0 / T.shape[0], dtype=np.float32)
    for _ in range(n_steps):
        p = TT @ p
    return p.astype(np.float64)


def smooth_gene_times(
    t: np.ndarray, connectivities: sparse.spmatrix, *, weights: sparse.spmatrix | None = None
) -> np.ndarray:
    """Average each gene's times over each cell's neighbours, on the gene's clock.

    A gene's clock is a loop: off cells at ``(0, 0)`` are given time 0 or the end of
    repression, whichever branch is closer, so neighbours of an off cell sit at both
    ends. scVelo averages the times linearly (its ``fit_t`` is smoothed over neighbours),
    which puts such cells at mid-range times; on scVelo's own simulator, where most genes
    finish repression long before the last cells, that cost explorer's latent time
    0.15-0.25 of Spearman correlation. Here the times are averaged as angles on a circle
    of circumference ``1.05 x`` the gene's latest time (the gap closes the loop), so
    cells at the wrap stay at one of its ends.

    Parameters
    ----------
    t
        ``(n_obs, n_genes)`` non-negative times (no NaN).
    connectivities
        ``(n_obs, n_obs)`` kNN connectivities (:func:`neighbor_average_matrix` weights).
    weights
        Their :func:`neighbor_average_matrix`, if the caller has it already.

    Returns
    -------
    ``(n_obs, n_genes)`` float64 times in ``[0, 1.05 x`` the gene's latest time``)``.
    """
    t = np.ascontiguousarray(t, dtype=np.float64)
    period = t.max(0) * (1 + _CLOCK_GAP)
    period = np.where(period > 0, period, 1.0)
    angle = 2 * np.pi * t / period
    W = _weights(connectivities, weights)
    # scipy's sums in its order, bit for bit, on both cores
    sin = sparse_dense_product(W, np.sin(angle), dtype=np.float64)
    cos = sparse_dense_product(W, np.cos(angle), dtype=np.float64)
    mean = _wrap_angle(np.arctan2(sin, cos))
    return mean / (2 * np.pi) * period


def _wrap_angle(angle: np.ndarray) -> np.ndarray:
    """``angle % (2 pi)`` for angles in ``[-pi, pi]`` (arctan2's), bit for bit, in place.

    numpy's float remainder there adds 2 pi to negative values and turns -0.0 into 0.0,
    which adding 2 pi or 0.0 does too, at a sixth of the remainder's cost (18 -> 3 ms on
    the pancreas's 3,696 x 325 gene times, on the latent time's critical path).
    """
    angle += np.where(angle < 0, 2 * np.pi, 0.0)
    return angle


def rank_gene_times(t: np.ndarray) -> np.ndarray:
    """Each gene's times replaced by their ranks over the cells, scaled to (0, 1] (ties averaged).

    The shared time takes a low quantile of the gene times per cell. On the fitted
    scale (each gene's own clock) the genes whose times are compressed into a short
    range hold that quantile in most cells, with their noise; on ranks every gene
    orders the cells with equal weight. :func:`latent_time` ranks before the
    neighbour smoothing (ranking after it measured no better on any data set tried and
    worse on most).
    Cells tied at a gene's time (often many off cells at 0) share their average rank;
    giving them the lowest rank instead cost 0.07-0.10 of Spearman correlation on
    explorer's hard simulator. On scVelo's simulator (3,000 cells, 298 genes) ranking
    lifts the Spearman correlation of the latent time with the true time from 0.983 to
    0.999 (README, "Speed and accuracy against scVelo").
    """
    t = np.asarray(t, dtype=np.float64)
    return average_ranks(t) / max(t.shape[0], 1)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks (1 to n) of each column of ``(n, m)`` ``x``, ties given their average rank.

    ``scipy.stats.rankdata(x, axis=0)``, compiled with the columns in parallel
    (:func:`_average_ranks_kernel`): importing ``scipy.stats`` costs about half a second
    of CPU, a tenth of the command's start-up, for this one function. No NaN in ``x``.
    """
    # along rows of the transpose: each column's values contiguous. The sort need not be
    # stable (ties share their mean position): numpy's default sort is vectorised, about
    # 4x faster than its stable one here
    xt = np.ascontiguousarray(np.asarray(x, dtype=np.float64).T)
    order = np.argsort(xt, axis=1)
    ranks = np.empty(xt.shape, dtype=np.float64)
    _average_ranks_kernel(xt, order, ranks)
    return np.ascontiguousarray(ranks.T)


@numba.njit(parallel=True, cache=True)
def _average_ranks_kernel(xt, order, out):  # pragma: no cover - compiled
    """Average ranks (1 to n) of each row of ``xt`` into ``out``, rows in parallel.

    ``order`` sorts each row; ties share the mean of the positions they occupy in it, so
    their order within the run does not change the result.
    """
    n = xt.shape[1]
    for g in numba.prange(xt.shape[0]):
        row = xt[g]
        idx = order[g]
        first = 0
        while first < n:
            last = first
            value = row[idx[first]]
            while last + 1 < n and row[idx[last + 1]] == value:
                last += 1
            rank = (first + last) / 2 + 1
            for k in range(first, last + 1):
                out[g, idx[k]] = rank
            first = last + 1


def root_time(t: np.ndarray, root: int) -> np.ndarray:
    """Gene times re-rooted at cell ``root`` (scVelo's ``root_time``).

    ``t`` is ``(n_obs, n_genes)``. Cells at or after the root's time keep their
    distance to it; cells before it are moved after the last one.
    """
    t_root = t[root]
    return reroot(t, t_root, latest_after(t, t_root))


def latest_after(t: np.ndarray, t_root: np.ndarray) -> np.ndarray:
    """Each gene's latest time after the root's ``t_root``, 0 if none (:func:`root_time`'s origin)."""
    return ((t - t_root) * (t >= t_root)).max(0)


def reroot(t: np.ndarray, t_root: np.ndarray, t_origin: np.ndarray) -> np.ndarray:
    """Rows of ``t`` re-rooted at a root whose times are ``t_root``, given :func:`latest_after`'s ``t_origin``."""
    after = t >= t_root
    return (t - t_root) * after + (t + t_origin) * ~after


def rooted_shared_time(
    t: np.ndarray, root: int, *, percentiles: tuple[float, ...] = SHARED_TIME_PERCENTILES
) -> np.ndarray:
    """``shared_time(root_time(t, root))``, the same numbers, a block of cells at a time.

    Each gene's origin needs all cells (a maximum); the rest is per cell, but for the
    re-rooted times' minimum, which :func:`shared_time` subtracts first (0, the root's
    own times, for non-negative ``t``; found in a first pass over the blocks all the same).
    """
    t = np.asarray(t, dtype=np.float64)
    n_obs, n_genes = t.shape
    blocks = _blocks(n_obs, max(1, _TIME_BLOCK_ENTRIES // max(n_genes, 1)))
    if len(blocks) == 1:  # all at once: the one pass, as before
        return shared_time(root_time(t, root), percentiles=percentiles)
    t_root = t[root].copy()
    t_origin = np.max([latest_after(t[a:b], t_root) for a, b in blocks], axis=0)
    lowest = min(reroot(t[a:b], t_root, t_origin).min() for a, b in blocks)
    parts = []
    for a, b in blocks:
        rooted = reroot(t[a:b], t_root, t_origin)
        rooted -= lowest
        rooted.sort(axis=1)  # as shared_time: the same order statistics, faster
        parts.append(np.percentile(rooted, percentiles, axis=1))
    return best_percentiles(np.concatenate(parts, axis=1))


def shared_time(t: np.ndarray, *, percentiles: tuple[float, ...] = SHARED_TIME_PERCENTILES) -> np.ndarray:
    """Combine ``(n_obs, n_genes)`` gene times into one time per cell (scVelo's ``compute_shared_time``).

    For each percentile, the per-cell percentile of the gene times normalised to a
    maximum of 1; the two whose sorted values lie closest to a uniform grid are summed
    and scaled to a maximum of 1.
    """
    t = np.asarray(t, dtype=np.float64)
    t = t - t.min()
    # the percentiles of each cell's sorted times are those of its times, bit for bit (the
    # same order statistics), and numpy's vectorised sort followed by a partition of sorted
    # rows takes half the time of the partition of unsorted ones (the shared time runs
    # once per root cell, on the latent time's critical path); t is our own copy here
    t.sort(axis=1)
    return best_percentiles(np.percentile(t, percentiles, axis=1))


def best_percentiles(tx: np.ndarray) -> np.ndarray:
    """:func:`shared_time`'s last step, from the ``(n_percentiles, n_obs)`` per-cell percentiles."""
    tx_max = tx.max(1)
    tx_max = np.where(tx_max == 0, 1, tx_max)
    tx = tx / tx_max[:, None]
    grid = np.linspace(0, 1, num=tx.shape[1])
    mse = ((np.sort(tx, axis=1) - grid) ** 2).sum(1)
    best = np.argsort(mse, kind="stable")[:2]
    out = tx[best].sum(0)
    return out / out.max() if out.max() > 0 else out


def earliest_roots(root_score: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, bool]:
    """Root cells, earliest by ``t`` first, and whether any cell qualified.

    A root's score passes scVelo's ``1 - 1e-3`` and it is among the 5% of cells earliest
    by ``t``. Without any such cell: the earliest cell, and False.
    """
    order = np.argsort(t, kind="stable")
    is_root = np.asarray(root_score)[order] > _ROOT_THRESHOLD
    # a root must also be early by the genes' own clocks: the backward chain can settle
    # in the middle of a trajectory (on one 3,000-cell scVelo simulation all 62 root
    # candidates sat at true time ~125 of 0-296, and the latent time scored 0.24)
    is_root[max(1, int(np.ceil(_ROOT_MAX_QUANTILE * len(order)))) :] = False
    if is_root.any():
        return order[is_root], True
    return order[:1], False


def latent_time(
    fit_t: np.ndarray,
    root_score: np.ndarray,
    connectivities: sparse.spmatrix,
    *,
    min_confidence: float = 0.75,
    smooth_times: bool = True,
    rank_times: bool = True,
) -> FloatArray:
    """ScVelo's gene-shared latent time.

    Parameters
    ----------
    fit_t
        ``(n_obs, n_genes)`` per-gene times of the genes to use (no NaN).
    root_score
        ``(n_obs,)`` root-cell score (:func:`root_cells`); the cells above ``1 - 1e-3``
        with the smallest summed gene time (ranked if ``rank_times``, before the
        smoothing) are the roots (up to four), taken only among the 5% of cells with the
        smallest summed gene time. Without any such cell, the cell with the smallest
        summed gene time is used.
    connectivities
        ``(n_obs, n_obs)`` kNN connectivities for the smoothing.
    smooth_times
        Average the gene times over neighbours on each gene's clock
        (:func:`smooth_gene_times`; scVelo averages them linearly in
        ``recover_dynamics``). ``False`` for times smoothed already.
    rank_times
        First replace each gene's times by their ranks over the cells
        (:func:`rank_gene_times`; scVelo combines the times on their fitted scale).
    min_confidence
        Cells whose time differs from its neighbourhood average by more than this
        allows (scVelo's ``(1 - |t - z t_nbr|)^2 < min_confidence``) are not used to
        smooth their neighbours.

    Returns
    -------
    ``(n_obs,)`` float32 latent time in [0, 1].
    """
    times = gene_clock_times(fit_t, connectivities, smooth_times=smooth_times, rank_times=rank_times)
    return latent_time_from_gene_times(times, root_score, connectivities, min_confidence=min_confidence)


@dataclass(frozen=True, slots=True)
class GeneClockTimes:
    """The gene times :func:`latent_time` combines, before any root is chosen.

    Attributes
    ----------
    times
        ``(n_obs, n_genes)`` float64 times (ranked and smoothed as asked).
    summed
        ``(n_obs,)`` float64 sum of each cell's times before the smoothing: the roots are
        the earliest root cells by it.
    """

    times: np.ndarray
    summed: np.ndarray


def gene_clock_times(
    fit_t: np.ndarray,
    connectivities: sparse.spmatrix,
    *,
    smooth_times: bool = True,
    rank_times: bool = True,
    weights: sparse.spmatrix | None = None,
) -> GeneClockTimes:
    """:func:`latent_time`'s first half, which needs no root-cell score.

    So a caller can compute it while the score (:func:`root_cells`, an eigen solve
    that spends most of its time in scipy's sparse products, outside the GIL) is being
    computed. Parameters as :func:`latent_time`'s; ``weights``: the connectivities'
    :func:`neighbor_average_matrix`, if the caller has it already.
    """
    t = np.asarray(fit_t, dtype=np.float64)
    # each gene is ranked and smoothed on its own: a block of genes at a time, into one array
    blocks = _blocks(t.shape[1], max(1, _TIME_BLOCK_ENTRIES // max(t.shape[0], 1)))
    if rank_times:
        ranked = np.empty(t.shape, dtype=np.float64)
        for a, b in blocks:
            ranked[:, a:b] = rank_gene_times(t[:, a:b])
        t = ranked
    # the roots are chosen on the times before the smoothing: on each gene's loop the
    # latest cells (off, at (0, 0)) average to near time 0 and can pass for the earliest
    # (on a 3,000-cell scVelo simulation that chose roots at true time 3 instead of
    # about 1, and cost 0.025 of Spearman correlation)
    t_sum = t.sum(1)
    if smooth_times:
        W = _weights(connectivities, weights)
        smoothed = t if rank_times else np.empty(t.shape, dtype=np.float64)  # the input is not ours
        for a, b in blocks:
            smoothed[:, a:b] = smooth_gene_times(t[:, a:b], connectivities, weights=W)
        t = smoothed
    return GeneClockTimes(t, t_sum)


def _blocks(n: int, per_block: int) -> list[tuple[int, int]]:
    """``(a, b)`` ranges of ``per_block`` items covering ``range(n)`` (one empty range for ``n = 0``)."""
    return [(a, min(a + per_block, n)) for a in range(0, n, per_block)] or [(0, 0)]


def latent_time_from_gene_times(
    gene_times: GeneClockTimes,
    root_score: np.ndarray,
    connectivities: sparse.spmatrix,
    *,
    min_confidence: float = 0.75,
    weights: sparse.spmatrix | None = None,
) -> FloatArray:
    """:func:`latent_time`'s second half: roots, shared time, smoothing over neighbours.

    ``gene_times`` from :func:`gene_clock_times`; ``weights`` as there; the other
    parameters and the result as :func:`latent_time`'s.
    """
    t, t_sum = gene_times.times, gene_times.summed
    roots, found = earliest_roots(root_score, t_sum)
    if not found:
        logger.warning(
            "No root cells among the %d%% of cells earliest by summed gene time; rooting latent "
            "time at the cell with the smallest summed gene time.",
            round(100 * _ROOT_MAX_QUANTILE),
        )
    # one root per thread (numpy's partition and arithmetic release the GIL)
    roots = [int(r) for r in roots[:_N_ROOTS]]
    with ThreadPoolExecutor(max_workers=min(len(roots), os.cpu_count() or 1)) as pool:
        times = np.stack(list(pool.map(lambda r: rooted_shared_time(t, r), roots)))
    lt = scale01(times.mean(0))
    conn = _weights(connectivities, weights)
    tc = conn @ lt
    z = lt.dot(tc) / max(tc.dot(tc), 1e-12)
    # a constant latent time (all zeros after scale01) has max 0: no division by it
    lt_max = lt.max() if lt.max() > 0 else 1.0
    conf = (1 - np.abs(lt / lt_max - tc * z / lt_max)) ** 2
    low = conf < min_confidence
    conn_new = sparse.csr_matrix(conn, copy=True)
    if low.any():
        conn_new = conn_new @ sparse.diags((~low).astype(np.float32))
        conn_new.eliminate_zeros()
    return scale01(conn_new @ lt).astype(np.float32)


def transitions_backward_from_velocity(
    expression: np.ndarray, velocity: np.ndarray, neighbors: sparse.spmatrix
) -> sparse.csr_matrix:
    """Backward transition matrix from velocities via :mod:`explorer.graph.transition`.

    ``transition_matrix(graph, graph_neg, backward=True)``, with the graphs transposed
    here and dropped before the weights are made (each weight is a function of its entry,
    and of the self-transition on the diagonal), so that the forward graphs, their
    transposes and the weights are not all alive at once.
    """
    graph, graph_neg = velocity_graphs(expression, velocity, neighbors)
    self_p = self_transition_probabilities(graph)
    graph = graph.T.tocsr()  # one at a time: each original goes as its transpose comes
    graph_neg = graph_neg.T.tocsr()
    return transition_matrix(graph, graph_neg, self_probabilities=self_p)


def compute_latent_time(adata: AnnData, *, min_likelihood: float = 0.1, min_confidence: float = 0.75) -> None:
    """ScVelo's ``tl.latent_time`` on a fitted AnnData.

    Needs ``layers['fit_t']`` and ``var['fit_likelihood']`` (the dynamical model),
    ``obsp['connectivities']`` and either ``obs['root_cells']`` or the velocity graph
    (``obsp['velocity_graph']``, ``obsp['velocity_graph_neg']``).

    Returns
    -------
    None; sets ``obs['latent_time']`` and, if it was missing, ``obs['root_cells']``.
    """
    for slot, key in ((adata.layers, Key.layers.FIT_T), (adata.var, Key.var.FIT_LIKELIHOOD)):
        if key not in slot:
            msg = f"{key!r} not found; fit the dynamical model first (explorer fit --model dynamical)."
            raise MissingInputError(msg)
    if Key.obsp.CONNECTIVITIES not in adata.obsp:
        msg = "obsp['connectivities'] not found; run explorer.graph.neighbors.compute_neighbors(adata) first."
        raise MissingInputError(msg)
    conn = adata.obsp[Key.obsp.CONNECTIVITIES]
    t = np.asarray(adata.layers[Key.layers.FIT_T], dtype=np.float64)
    genes = np.isfinite(t).all(0) & (np.asarray(adata.var[Key.var.FIT_LIKELIHOOD]) >= min_likelihood)
    if not genes.any():
        genes = np.isfinite(t).all(0)
    if Key.obs.ROOT_CELLS in adata.obs:
        score = adata.obs[Key.obs.ROOT_CELLS].to_numpy(dtype=np.float64)
    else:
        graph, graph_neg = get_velocity_graph(adata)
        score = root_cells(transition_matrix(graph, graph_neg, backward=True), conn)
        adata.obs[Key.obs.ROOT_CELLS] = score
    adata.obs[Key.obs.LATENT_TIME] = latent_time(t[:, genes], score, conn, min_confidence=min_confidence)
