r"""Velocity graph and transition matrix: where each cell's velocity points among its neighbours.

For every cell :math:`i` and every cell :math:`j` in its neighbourhood, the velocity graph
holds the Pearson correlation (the cosine of the gene-centred vectors) between the
velocity :math:`v_i` and the displacement :math:`\\delta_{ij} = x_j - x_i` in expression
space (``Ms``), as scVelo's ``tl.velocity_graph`` and CellRank's ``VelocityKernel``
(``model="deterministic"``, ``similarity="correlation"``) define it (Bergen et al. 2020,
Nat. Biotechnol.; Lange et al. 2022, Nat. Methods). Positive correlations go to
``obsp['velocity_graph']``, negative ones to ``obsp['velocity_graph_neg']``.

:func:`transition_matrix` turns the graph into a row-stochastic matrix
:math:`T_{ij} \\propto \\exp(\\lambda\\, \\pi_{ij})` with scVelo's kernel width
(``scale`` :math:`\\lambda = 10`) and self-transitions; :func:`softmax_scale` gives
CellRank's data-driven width instead. :func:`mix` combines matrices (CellRank's
``0.8 * vk + 0.2 * ck``), :func:`random_walks` samples paths on one, and
:func:`velocity_confidence` / :func:`velocity_length` are scVelo's per-cell summaries.

Each computation is a pure function on arrays; the ``compute_*`` functions are thin
wrappers that read and write AnnData keys (see :mod:`explorer.keys`). Matrices go to
``obsp``; graphs that scVelo left in ``uns`` are read from there too.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any, Literal

import numba
import numpy as np
from scipy import sparse

from explorer._types import FloatArray, InputError, IntArray, MissingInputError, ProgressCallback, report
from explorer.keys import Key, drop_keys

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from anndata import AnnData

logger = logging.getLogger(__name__)

NeighborMode = Literal["distances", "connectivities"]
_NEIGHBOR_MODES: tuple[str, ...] = ("distances", "connectivities")

#: scVelo's kernel width for ``exp(scale * correlation)`` (``tl.transition_matrix``).
DEFAULT_SCALE = 10.0
#: scVelo sets a cell's self-transition to ``clip(q - max_j pi_ij, 0, 1)`` with ``q`` the
#: 98th percentile of the per-cell maxima: cells whose best neighbour fits worse than
#: most cells' best neighbour tend to stay (``scvelo.tools.velocity_graph``).
SELF_TRANSITION_PERCENTILE = 98.0
#: scVelo's default recursion depth for ``mode_neighbors="distances"``: neighbours and
#: their neighbours (``VelocityGraph.__init__``); 1 for ``"connectivities"``.
_DEFAULT_RECURSE = {"distances": 2, "connectivities": 1}
#: a centred displacement whose squared norm is below this share of the uncentred one is
#: treated as zero (scVelo's 0/0 gives NaN there, and then no edge).
_ZERO_DISPLACEMENT = 1e-10
#: stored entries of the block of rows that the graph functions (:func:`neighbor_pattern`,
#: :func:`cosine_correlations`, :func:`transition_matrix`) build at a time, so that their
#: temporaries stay the size of a block and only the result grows with the graph (at 100,000
#: cells the twice-recursed kNN has 35 million edges)
ROW_BLOCK_ENTRIES = 1 << 22
#: progress reports from the compiled edge-by-edge path
_PROGRESS_BLOCKS = 16


# --------------------------------------------------------------------------------------
# neighbour sets
# --------------------------------------------------------------------------------------


def knn_indices(distances: sparse.spmatrix, *, n_neighbors: int | None = None) -> IntArray:
    """Each cell's ``k`` nearest neighbours from a kNN distance matrix, as scVelo's ``get_indices``.

    Parameters
    ----------
    distances
        ``(n_obs, n_obs)`` sparse kNN distances (``obsp['distances']``); a stored zero is a
        neighbour at distance 0 (a duplicate cell), as in scVelo.
    n_neighbors
        Neighbours to keep per cell; at most the smallest number stored in any row
        (the default).

    Returns
    -------
    ``(n_obs, k)`` column indices of each cell's nearest neighbours, nearest first.
    """
    dist = sparse.csr_matrix(distances)
    counts = np.diff(dist.indptr)
    if dist.shape[0] == 0 or counts.min() == 0:
        empty = int((counts == 0).sum())
        msg = (
            f"Expected every cell to have neighbours in the distance matrix, but {empty} of "
            f"{dist.shape[0]} rows are empty. Recompute the neighbour graph "
            "(explorer.graph.neighbors.compute_neighbors)."
        )
        raise ValueError(msg)
    k = int(counts.min()) if n_neighbors is None else int(min(counts.min(), n_neighbors))
    if counts.max() == counts.min():
        # the usual kNN graph, the same number stored per row: sort the rows as a block
        # (stable, as the lexsort below; 6x faster)
        n, c = dist.shape[0], int(counts[0])
        order = np.argsort(dist.data.reshape(n, c), axis=1, kind="stable")[:, :k]
        return np.take_along_axis(dist.indices.reshape(n, c), order, axis=1).astype(np.int64)
    rows = np.repeat(np.arange(dist.shape[0]), counts)
    # sort by row, then by distance inside each row; keep the first k of every row
    order = np.lexsort((dist.data, rows))
    rank = np.arange(dist.nnz) - dist.indptr[rows[order]]
    keep = order[rank < k]
    return dist.indices[keep].reshape(dist.shape[0], k).astype(np.int64)


def neighbor_pattern(adjacency: sparse.spmatrix, *, n_recurse_neighbors: int = 1) -> sparse.csr_matrix:
    """Cells reachable in ``n_recurse_neighbors`` steps, scVelo's ``get_iterative_indices``.

    Parameters
    ----------
    adjacency
        ``(n_obs, n_obs)`` graph whose stored entries are the direct neighbours (a kNN
        pattern from :func:`knn_pattern`, or ``obsp['connectivities']``).
    n_recurse_neighbors
        1: the direct neighbours; 2: also the neighbours' neighbours (scVelo's default
        for kNN distances), and so on.

    Returns
    -------
    ``(n_obs, n_obs)`` CSR pattern of ``(I + A)^n`` without its diagonal (data all 1,
    float32, sorted indices), built a block of rows at a time (:func:`pattern_rows`).
    """
    if n_recurse_neighbors < 1:
        msg = (
            f"Expected n_recurse_neighbors >= 1, found {n_recurse_neighbors}. "
            "Use 1 for direct neighbours only."
        )
        raise ValueError(msg)
    step = reach_step(adjacency)
    n_obs = step.shape[0]
    # a row of (I + A)^n has about degree^n entries before duplicates are summed (the mean
    # degree: a kNN's rows are all alike, and a few hubs of a symmetric graph would make the
    # widest row's bound a block of a few cells)
    degree = max(1, round(step.nnz / max(n_obs, 1)))
    per_block = max(1, ROW_BLOCK_ENTRIES // degree**n_recurse_neighbors)
    rows = RowStack()
    for a in range(0, n_obs, per_block):
        rows.add(pattern_rows(step, a, min(a + per_block, n_obs), n_recurse_neighbors=n_recurse_neighbors))
    return rows.stack(n_obs)


def reach_step(direct: sparse.spmatrix) -> sparse.csr_matrix:
    """``I + A`` as a 0/1 float32 pattern: one step of :func:`neighbor_pattern`."""
    step = sparse.csr_matrix(direct, dtype=np.float32, copy=True)
    step.data[:] = 1.0
    step = (step + sparse.identity(step.shape[0], dtype=np.float32, format="csr")).tocsr()
    step.data[:] = 1.0
    return step


def pattern_rows(
    step: sparse.csr_matrix, a: int, b: int, *, n_recurse_neighbors: int = 2
) -> sparse.csr_matrix:
    """Rows ``a:b`` of :func:`neighbor_pattern`, a ``(b - a, n_obs)`` pattern, from :func:`reach_step`."""
    block = sparse.csr_matrix(step[a:b])
    for _ in range(n_recurse_neighbors - 1):
        block = sparse.csr_matrix(block @ step)
    block = _drop_diagonal(block, row0=a)
    block.data = np.ones(block.nnz, dtype=np.float32)
    return block


def _drop_diagonal(matrix: sparse.spmatrix, *, row0: int = 0) -> sparse.csr_matrix:
    """``matrix`` as CSR without diagonal entries, zeros or unsorted indices.

    ``row0``: the cell of the first row, for a block of rows (its diagonal is at
    ``(r, row0 + r)``).
    """
    m = sparse.csr_matrix(matrix, copy=True)
    m.eliminate_zeros()
    rows = np.repeat(np.arange(row0, row0 + m.shape[0]), np.diff(m.indptr))
    off = m.indices != rows
    if not off.all():
        m = sparse.csr_matrix(
            (
                m.data[off],
                m.indices[off],
                np.concatenate([[0], np.cumsum(np.bincount(rows[off] - row0, minlength=m.shape[0]))]),
            ),
            shape=m.shape,
        )
    m.sort_indices()
    return m


def row_blocks(indptr: np.ndarray, per_block: int) -> list[tuple[int, int]]:
    """Ranges of rows holding about ``per_block`` stored entries each, given the rows' CSR ``indptr``."""
    indptr = np.asarray(indptr, dtype=np.int64)
    n = len(indptr) - 1
    bounds = np.searchsorted(indptr, np.arange(0, indptr[-1] + per_block, per_block), side="right") - 1
    bounds = np.unique(np.r_[0, np.clip(bounds, 0, n), n])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))


def rows_of(matrix: sparse.spmatrix, a: int, b: int) -> sparse.csr_matrix:
    """``matrix`` with only rows ``a:b`` kept (same shape; the others empty), sharing its arrays."""
    m = sparse.csr_matrix(matrix)
    lo, hi = m.indptr[a], m.indptr[b]
    n = m.shape[0]
    indptr = np.concatenate([np.zeros(a, dtype=np.int64), m.indptr[a : b + 1] - lo, np.full(n - b, hi - lo)])
    return sparse.csr_matrix((m.data[lo:hi], m.indices[lo:hi], indptr), shape=m.shape)


class RowStack:
    """Blocks of rows of a CSR matrix, stacked into one at the end.

    ``scipy.sparse.vstack`` holds every block and the whole result together (twice the
    matrix); here each block's arrays are dropped as they are copied into the result, so
    the result and one block are alive at a time.
    """

    def __init__(self) -> None:
        self.data: list[np.ndarray] = []
        self.indices: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []

    def add(self, block: sparse.spmatrix, dtype: Any = None) -> None:
        """Append the rows of ``block`` (its data as ``dtype``, if given)."""
        block = sparse.csr_matrix(block)
        self.data.append(block.data if dtype is None else block.data.astype(dtype, copy=False))
        self.indices.append(block.indices)
        self.counts.append(np.diff(block.indptr))

    def stack(self, n_cols: int) -> sparse.csr_matrix:
        """The ``(rows added, n_cols)`` CSR matrix; empties the stack."""
        counts = np.concatenate(self.counts) if self.counts else np.zeros(0, dtype=np.int64)
        self.counts.clear()
        data, indices = _drain(self.data, np.float32), _drain(self.indices, np.int32)
        return sparse.csr_matrix((data, indices, np.r_[0, np.cumsum(counts)]), shape=(len(counts), n_cols))


def _drain(parts: list[np.ndarray], empty_dtype: Any) -> np.ndarray:
    """The concatenation of ``parts``, each dropped (``parts`` emptied) once it is copied."""
    if not parts:
        return np.zeros(0, dtype=empty_dtype)
    if len(parts) == 1:
        return parts.pop()
    out = np.empty(sum(len(p) for p in parts), dtype=np.result_type(*parts))
    start = 0
    parts.reverse()
    while parts:
        part = parts.pop()
        out[start : start + len(part)] = part
        start += len(part)
    return out


def knn_pattern(indices: IntArray, *, n_obs: int | None = None) -> sparse.csr_matrix:
    """``(n_obs, n_obs)`` CSR pattern with a 1 at ``(i, indices[i, k])``."""
    n_obs = indices.shape[0] if n_obs is None else n_obs
    k = indices.shape[1]
    data = np.ones(indices.size, dtype=np.float32)
    return sparse.csr_matrix(
        (data, indices.ravel(), np.arange(0, indices.size + 1, k)), shape=(indices.shape[0], n_obs)
    )


# --------------------------------------------------------------------------------------
# correlations
# --------------------------------------------------------------------------------------


def cosine_correlations(
    expression: FloatArray,
    velocity: FloatArray,
    neighbors: sparse.spmatrix,
    *,
    sqrt_transform: bool = False,
    progress: ProgressCallback | None = None,
) -> sparse.csr_matrix:
    """Correlation of each cell's velocity with its displacements to its neighbours.

    For every stored ``(i, j)`` of ``neighbors``, the Pearson correlation (cosine after
    centring over genes, scVelo's ``cosine_correlation``) of ``velocity[i]`` with
    ``expression[j] - expression[i]``.

    Parameters
    ----------
    expression
        ``(n_obs, n_genes)`` smoothed expression (``layers['Ms']``) of the genes to use.
    velocity
        ``(n_obs, n_genes)`` velocities of the same genes, without NaN.
    neighbors
        ``(n_obs, n_obs)`` sparse pattern of the pairs to score (:func:`neighbor_pattern`);
        the diagonal is ignored.
    sqrt_transform
        Score ``sign(d) * sqrt(|d|)`` of the velocity and the displacements instead (the
        variance-stabilising transform scVelo applies to stochastic-model velocities).
    progress
        Receives one report per block of cells.

    Returns
    -------
    ``(n_obs, n_obs)`` CSR float32 matrix of correlations in [-1, 1] on the pattern of
    ``neighbors``. Pairs that cannot be scored, because the cell has no velocity (all
    zero after centring) or the two cells are identical, are left out, as scVelo does.
    Scored a block of cells at a time (:data:`ROW_BLOCK_ENTRIES`); :func:`velocity_graphs`
    splits each block as it comes.
    """
    rows = RowStack()
    for block in _correlation_blocks(expression, velocity, neighbors, sqrt_transform, progress):
        rows.add(block)
    return rows.stack(neighbors.shape[1])


def velocity_graphs(
    expression: FloatArray,
    velocity: FloatArray,
    neighbors: sparse.spmatrix,
    *,
    sqrt_transform: bool = False,
    progress: ProgressCallback | None = None,
) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """``split_graph(cosine_correlations(...))``, split a block of cells at a time.

    The same two matrices (scVelo's ``velocity_graph`` and ``velocity_graph_neg``) without
    the signed one beside them.
    """
    pos, neg = RowStack(), RowStack()
    for block in _correlation_blocks(expression, velocity, neighbors, sqrt_transform, progress):
        p, n = split_graph(block)
        del block
        pos.add(p)
        neg.add(n)
    return pos.stack(neighbors.shape[1]), neg.stack(neighbors.shape[1])


def _correlation_blocks(
    expression: FloatArray,
    velocity: FloatArray,
    neighbors: sparse.spmatrix,
    sqrt_transform: bool,
    progress: ProgressCallback | None,
) -> Iterator[sparse.csr_matrix]:
    """:func:`cosine_correlations`' rows, a block of cells at a time, reporting progress after each.

    A compiled loop over each cell's neighbours reads the two expression rows once and
    keeps three running sums; numpy would write several ``(n_edges, n_genes)``
    temporaries (three to five times slower on the pancreas) and BLAS tricks lose digits
    to cancellation in float32.
    """
    X = np.asarray(expression, dtype=np.float32)
    V = np.asarray(velocity, dtype=np.float32)
    if X.shape != V.shape or X.ndim != 2:
        msg = (
            "Expected expression and velocity of the same (n_obs, n_genes) shape, "
            f"found {X.shape} and {V.shape}."
        )
        raise ValueError(msg)
    pattern = sparse.csr_matrix(neighbors)
    if pattern.shape != (X.shape[0], X.shape[0]):
        msg = f"Expected a ({X.shape[0]}, {X.shape[0]}) neighbour pattern, found {pattern.shape}."
        raise ValueError(msg)
    if np.isnan(V).any():
        msg = "Expected velocities without NaN; drop the genes the model did not fit (velocity_genes)."
        raise ValueError(msg)

    if sqrt_transform:
        V = np.sign(V) * np.sqrt(np.abs(V))
    V = np.ascontiguousarray(V - V.mean(axis=1, keepdims=True), dtype=np.float32)
    X = np.ascontiguousarray(X)
    # a cell whose centred velocity is zero (norm 0) gets no edges (scVelo skips it)
    v_norm = np.sqrt(np.einsum("ij,ij->i", V, V, dtype=np.float64)).astype(np.float32)
    blocks = row_blocks(pattern.indptr, ROW_BLOCK_ENTRIES)
    # progress after each of about _PROGRESS_BLOCKS runs of the kernel, over cells
    runs = [np.linspace(a, b, -(-_PROGRESS_BLOCKS // len(blocks)) + 1).astype(np.int64) for a, b in blocks]
    done, total = 0, sum(len(r) - 1 for r in runs)
    for (a, b), bounds in zip(blocks, runs, strict=True):
        # rows a:b alone, in the full shape the kernel indexes (the diagonal is not scored)
        rows = _drop_diagonal(rows_of(pattern, a, b))
        values = np.zeros(rows.nnz, dtype=np.float32)
        indptr = rows.indptr.astype(np.int64)
        indices = rows.indices.astype(np.int64)
        for first, last in itertools.pairwise(bounds):
            _correlation_kernel(X, V, v_norm, indptr, indices, first, last, sqrt_transform, values)
            done += 1
            report(progress, done, total, "velocity graph")
        del indices
        np.clip(values, -1.0, 1.0, out=values)
        block = sparse.csr_matrix((values, rows.indices, indptr[a : b + 1]), shape=(b - a, pattern.shape[1]))
        block.eliminate_zeros()
        yield block


@numba.njit(parallel=True, fastmath=True, cache=True)
def _correlation_kernel(X, V, v_norm, indptr, indices, first, last, sqrt_transform, out):  # pragma: no cover
    """Correlation of centred ``V[i]`` with the centred displacement ``X[j] - X[i]`` per stored pair.

    ``V`` is centred, so ``<d - mean(d), v> = <d, v>`` and
    ``|d - mean(d)|^2 = |d|^2 - (sum d)^2 / n_genes``: one pass per pair. With
    ``sqrt_transform`` the displacement is ``sign(d) sqrt(|d|)`` first (scVelo).
    """
    n_genes = X.shape[1]
    for i in numba.prange(first, last):
        if v_norm[i] == 0:
            continue
        for k in range(indptr[i], indptr[i + 1]):
            j = indices[k]
            total = 0.0
            squares = 0.0
            dot = 0.0
            for g in range(n_genes):
                d = X[j, g] - X[i, g]
                if sqrt_transform:
                    q = np.sqrt(abs(d))
                    d = -q if d < 0 else q
                total += d
                squares += d * d
                dot += d * V[i, g]
            norm2 = squares - total * total / n_genes
            # identical cells, or a displacement equal in every gene, have no direction
            if norm2 > _ZERO_DISPLACEMENT * squares and norm2 > 0:
                out[k] = dot / (np.sqrt(norm2) * v_norm[i])


def split_graph(correlations: sparse.spmatrix) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """Split signed correlations into scVelo's ``(velocity_graph, velocity_graph_neg)``.

    Returns
    -------
    The positive part (values in (0, 1]) and the negative part (values in [-1, 0)),
    both CSR float32 without stored zeros.
    """
    corr = sparse.csr_matrix(correlations, dtype=np.float32)
    pos, neg = corr.copy(), corr.copy()
    pos.data = np.clip(pos.data, 0.0, 1.0)
    neg.data = np.clip(neg.data, -1.0, 0.0)
    pos.eliminate_zeros()
    neg.eliminate_zeros()
    return pos, neg


# --------------------------------------------------------------------------------------
# transition matrices
# --------------------------------------------------------------------------------------


def self_transition_probabilities(graph: sparse.spmatrix) -> FloatArray:
    """ScVelo's self-transition probabilities: ``clip(q98 - max_j pi_ij, 0, 1)``.

    Parameters
    ----------
    graph
        ``(n_obs, n_obs)`` positive velocity graph.

    Returns
    -------
    ``(n_obs,)`` float32; ``obs['velocity_self_transition']`` in scVelo.
    """
    g = sparse.csr_matrix(graph)
    best = g.max(axis=1).toarray().ravel()
    upper = np.percentile(best, SELF_TRANSITION_PERCENTILE)
    return np.clip(upper - best, 0.0, 1.0).astype(np.float32)


def transition_matrix(
    graph: sparse.spmatrix,
    graph_neg: sparse.spmatrix | None = None,
    *,
    scale: float = DEFAULT_SCALE,
    self_transitions: bool = True,
    use_negative_cosines: bool = False,
    backward: bool = False,
    self_probabilities: FloatArray | None = None,
    dtype: type = np.float64,
) -> sparse.csr_matrix:
    r"""Transition probabilities from a velocity graph, as scVelo's ``tl.transition_matrix``.

    :math:`T_{ij} \\propto \\exp(\\lambda\\, \\pi_{ij})` over the scored neighbours
    :math:`j` of :math:`i`, with :math:`\\lambda` = ``scale``.

    Parameters
    ----------
    graph
        ``(n_obs, n_obs)`` positive correlations (``obsp['velocity_graph']``).
    graph_neg
        Negative correlations (``obsp['velocity_graph_neg']``). With it, negatively
        correlated neighbours keep their small weight :math:`\\exp(\\lambda\\pi_{ij})`
        (scVelo >= 0.2.4); without it they get none and positive ones get
        :math:`\\exp(\\lambda\\pi_{ij}) - 1`.
    scale
        Kernel width :math:`\\lambda` (scVelo: 10). CellRank's choice is
        :func:`softmax_scale`.
    self_transitions
        Add scVelo's self-transition on the diagonal
        (:func:`self_transition_probabilities`), weighted like a correlation.
    use_negative_cosines
        Give negatively correlated neighbours the negative weight
        :math:`-(\\exp(-\\lambda\\pi_{ij}) - 1)`, for projecting velocities (scVelo's
        ``velocity_embedding``). Rows are then normalised to absolute sum 1 and the
        result is no longer a probability matrix.
    backward
        Transpose before normalising: transitions into the past (scVelo's and
        CellRank's ``backward``).
    self_probabilities
        ``(n_obs,)`` self-transition probabilities to use instead of
        :func:`self_transition_probabilities` of ``graph`` (whose percentile spans all
        cells), if the caller has them.
    dtype
        Of the result's values, computed in float64 a block of rows at a time: float32
        keeps 8 bytes an edge with its indices instead of 12 (:mod:`explorer.stream`).

    Returns
    -------
    ``(n_obs, n_obs)`` CSR matrix of ``dtype`` whose rows sum to 1 (in absolute value with
    ``use_negative_cosines``). A cell with no scored neighbour stays where it is (a 1 on
    the diagonal), where scVelo would leave an empty row.
    """
    rows = RowStack()
    blocks = transition_blocks(
        graph,
        graph_neg,
        scale=scale,
        self_transitions=self_transitions,
        use_negative_cosines=use_negative_cosines,
        backward=backward,
        self_probabilities=self_probabilities,
    )
    for _, _, block in blocks:
        rows.add(block, dtype=dtype)
    return rows.stack(graph.shape[0])


def transition_blocks(
    graph: sparse.spmatrix,
    graph_neg: sparse.spmatrix | None = None,
    *,
    scale: float = DEFAULT_SCALE,
    self_transitions: bool = True,
    use_negative_cosines: bool = False,
    backward: bool = False,
    self_probabilities: FloatArray | None = None,
) -> Iterator[tuple[int, int, sparse.csr_matrix]]:
    """:func:`transition_matrix`'s rows a block at a time, for a caller that reads each row once.

    Yields ``(a, b, rows)``: ``rows`` the ``(b - a, n_obs)`` float64 CSR rows ``a:b``, each
    normalised as in the whole matrix (the same numbers); blocks of about
    ``ROW_BLOCK_ENTRIES`` entries, in order. The parameters are :func:`transition_matrix`'s.
    """
    pos = sparse.csr_matrix(graph)
    n_obs = pos.shape[0]
    if pos.shape != (n_obs, n_obs):
        msg = f"Expected a square (n_obs, n_obs) velocity graph, found shape {pos.shape}."
        raise ValueError(msg)
    if graph_neg is not None and graph_neg.shape != pos.shape:
        msg = f"Expected velocity_graph_neg of shape {pos.shape}, found {graph_neg.shape}."
        raise ValueError(msg)
    neg = None if graph_neg is None else sparse.csr_matrix(graph_neg)
    self_p = None
    if self_transitions:
        self_p = self_transition_probabilities(graph) if self_probabilities is None else self_probabilities
        self_p = np.asarray(self_p, dtype=np.float64)
    if backward:
        # each weight is a function of its entry alone (and of the self-transition on the
        # diagonal, which stays there), so the transposed graphs give the transposed
        # weights: no float64 copy of the forward ones to transpose
        pos = pos.T.tocsr()
        neg = None if neg is None else neg.T.tocsr()
    counts = pos.indptr.astype(np.int64) + (0 if neg is None else neg.indptr)
    for a, b in row_blocks(counts, ROW_BLOCK_ENTRIES):
        block = _kernel_rows(
            rows_of(pos, a, b),
            None if neg is None else rows_of(neg, a, b),
            self_p,
            (a, b),
            scale=scale,
            use_negative_cosines=use_negative_cosines,
        )
        # the block's rows are whole rows: normalised here
        yield a, b, _normalize_rows_in_place(block, row0=a)


def _kernel_rows(
    pos: sparse.csr_matrix,
    neg: sparse.csr_matrix | None,
    self_p: np.ndarray | None,
    cells: tuple[int, int],
    *,
    scale: float,
    use_negative_cosines: bool,
) -> sparse.csr_matrix:
    """Rows ``a:b`` (``cells``) of :func:`transition_matrix`'s weights, before their rows are normalised.

    ``pos`` and ``neg`` hold the graphs' rows ``a:b`` in their full shape (:func:`rows_of`),
    ``self_p`` every cell's self-transition probability (or None).
    """
    a, b = cells
    pos = _drop_diagonal(sparse.csr_matrix(pos, dtype=np.float64, copy=True))
    if self_p is not None:
        diagonal = np.zeros(pos.shape[0])
        diagonal[a:b] = self_p[a:b]
        pos = pos + sparse.diags(diagonal, format="csr")
    pos.eliminate_zeros()
    weights = pos.copy()
    weights.data = np.expm1(scale * weights.data)
    if neg is not None:
        neg = _drop_diagonal(sparse.csr_matrix(neg, dtype=np.float64, copy=True))
        if use_negative_cosines:
            neg.data = -np.expm1(-scale * neg.data)
            weights = weights + neg
        else:
            # scVelo: T += expm1(scale * neg); T.data += 1, i.e. exp(scale * pi) on every
            # stored entry (entries that cancel to zero are dropped first)
            neg.data = np.expm1(scale * neg.data)
            weights = weights + neg
            weights.eliminate_zeros()
            weights.data += 1.0
    weights = sparse.csr_matrix(weights)
    weights.eliminate_zeros()
    return weights if (a, b) == (0, weights.shape[0]) else weights[a:b]


def _normalize_rows(weights: sparse.spmatrix) -> sparse.csr_matrix:
    """Divide each row by its absolute sum, in a new matrix; an empty row gets a 1 on the diagonal."""
    return _normalize_rows_in_place(sparse.csr_matrix(weights, dtype=np.float64, copy=True))


def _normalize_rows_in_place(weights: sparse.csr_matrix, *, row0: int = 0) -> sparse.csr_matrix:
    """:func:`_normalize_rows` of a float64 CSR matrix of one's own, a block of rows at a time, in place.

    ``row0``: the cell of the first row, for a block of a matrix's rows (an empty row's 1
    goes on its cell's diagonal).
    """
    n_obs = weights.shape[0]
    sums = np.zeros(n_obs)
    blocks = row_blocks(weights.indptr, ROW_BLOCK_ENTRIES)
    for a, b in blocks:
        block = weights if (a, b) == (0, n_obs) else weights[a:b]
        sums[a:b] = np.asarray(abs(block).sum(axis=1)).ravel()
    empty = sums == 0
    if empty.any():
        diagonal = sparse.diags(empty.astype(np.float64), offsets=row0, shape=weights.shape, format="csr")
        weights = sparse.csr_matrix(weights + diagonal)
        sums[empty] = 1.0
        blocks = row_blocks(weights.indptr, ROW_BLOCK_ENTRIES)
    inverse = 1.0 / sums
    for a, b in blocks:
        lo, hi = weights.indptr[a], weights.indptr[b]
        weights.data[lo:hi] *= np.repeat(inverse[a:b], np.diff(weights.indptr[a : b + 1]))
    weights.eliminate_zeros()
    weights.sort_indices()
    return weights


def softmax_scale(graph: sparse.spmatrix, graph_neg: sparse.spmatrix | None = None) -> float:
    """CellRank's kernel width: one over the median absolute correlation.

    With a graph computed on the connectivities (``mode_neighbors="connectivities"``),
    ``transition_matrix(g, g_neg, scale=softmax_scale(g, g_neg), self_transitions=False)``
    is CellRank's ``VelocityKernel().compute_transition_matrix(model="deterministic",
    similarity="correlation")``.
    """
    values = np.abs(sparse.csr_matrix(graph).data)
    if graph_neg is not None:
        values = np.concatenate([values, np.abs(sparse.csr_matrix(graph_neg).data)])
    values = values[values > 0]
    if values.size == 0:
        msg = "The velocity graph has no non-zero correlation; compute it first (compute_velocity_graph)."
        raise ValueError(msg)
    return float(1.0 / np.median(values))


def mix(*terms: tuple[float, sparse.spmatrix]) -> sparse.csr_matrix:
    """Weighted sum of transition matrices, rows re-normalised (CellRank's ``0.8 * vk + 0.2 * ck``).

    Parameters
    ----------
    *terms
        ``(weight, matrix)`` pairs; weights are non-negative and need not sum to 1.

    Returns
    -------
    ``(n_obs, n_obs)`` row-stochastic CSR matrix.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import sparse
    >>> a = sparse.csr_matrix(np.array([[0.0, 1.0], [1.0, 0.0]]))
    >>> b = sparse.identity(2, format="csr")
    >>> mix((0.8, a), (0.2, b)).toarray()
    array([[0.2, 0.8],
           [0.8, 0.2]])
    """
    if not terms:
        msg = "Expected at least one (weight, matrix) pair, found none."
        raise ValueError(msg)
    shape = terms[0][1].shape
    total = None
    for weight, matrix in terms:
        if weight < 0 or not np.isfinite(weight):
            msg = f"Expected non-negative finite weights, found {weight}."
            raise ValueError(msg)
        if matrix.shape != shape:
            msg = f"Expected matrices of one shape {shape}, found {matrix.shape}."
            raise ValueError(msg)
        part = float(weight) * sparse.csr_matrix(matrix, dtype=np.float64)
        total = part if total is None else total + part
    total = sparse.csr_matrix(total)
    total.eliminate_zeros()
    return _normalize_rows(total)


def random_walks(
    transitions: sparse.spmatrix,
    start: int | Sequence[int] | IntArray,
    *,
    n_steps: int = 100,
    n_walks: int = 100,
    seed: int = 0,
) -> IntArray:
    """Sample random walks on a transition matrix (CellRank's ``plot_random_walks`` idea).

    Parameters
    ----------
    transitions
        ``(n_obs, n_obs)`` row-stochastic matrix.
    start
        A cell index, or cells to draw each walk's start from uniformly.
    n_steps
        Transitions per walk.
    n_walks
        Number of walks.
    seed
        Seed of the random generator; the same seed gives the same walks.

    Returns
    -------
    ``(n_walks, n_steps + 1)`` int64 cell indices; column 0 is the start.
    """
    T = sparse.csr_matrix(transitions, dtype=np.float64)
    T.sort_indices()
    n_obs = T.shape[0]
    starts = np.atleast_1d(np.asarray(start, dtype=np.int64))
    if starts.size == 0 or starts.min() < 0 or starts.max() >= n_obs:
        msg = f"Expected start cells in [0, {n_obs}), found {starts.tolist()[:10]}."
        raise ValueError(msg)
    if (T.data < 0).any():
        msg = "Expected non-negative transition probabilities; build T with use_negative_cosines=False."
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    # one global cumulative table: entry k of row r holds r + (cumulative prob within r),
    # so a draw u in [0, 1) for row r is found by one searchsorted on r + u
    counts = np.diff(T.indptr)
    rows = np.repeat(np.arange(n_obs), counts)
    sums = np.asarray(T.sum(axis=1)).ravel()
    safe = np.where(sums > 0, sums, 1.0)
    cum = np.cumsum(T.data / safe[rows])
    before = np.concatenate([[0.0], cum])[T.indptr[:-1]]
    table = rows + (cum - before[rows])
    table[T.indptr[1:][counts > 0] - 1] = np.arange(n_obs)[counts > 0] + 1.0  # exact row ends
    walks = np.empty((n_walks, n_steps + 1), dtype=np.int64)
    walks[:, 0] = starts if starts.size == n_walks else rng.choice(starts, size=n_walks)
    for step in range(n_steps):
        current = walks[:, step]
        u = rng.random(n_walks)
        k = np.searchsorted(table, current + u, side="right")
        k = np.minimum(k, T.indptr[current + 1] - 1)
        stuck = (counts[current] == 0) | (sums[current] <= 0)
        walks[:, step + 1] = np.where(stuck, current, T.indices[np.maximum(k, 0)])
    return walks


# --------------------------------------------------------------------------------------
# per-cell summaries
# --------------------------------------------------------------------------------------


def velocity_length(velocity: FloatArray) -> FloatArray:
    """Norm of each cell's gene-centred velocity (scVelo's ``velocity_length``, unrounded).

    Parameters
    ----------
    velocity
        ``(n_obs, n_genes)`` velocities without NaN.

    Returns
    -------
    ``(n_obs,)`` float32.
    """
    V = np.asarray(velocity, dtype=np.float32)
    V = V - V.mean(axis=1, keepdims=True)
    return np.sqrt(np.einsum("ij,ij->i", V, V, dtype=np.float64)).astype(np.float32)


def velocity_confidence(velocity: FloatArray, indices: IntArray) -> FloatArray:
    """Mean correlation of a cell's velocity with its neighbours' (scVelo's ``velocity_confidence``).

    Parameters
    ----------
    velocity
        ``(n_obs, n_genes)`` velocities without NaN.
    indices
        ``(n_obs, k)`` neighbour indices (:func:`knn_indices`).

    Returns
    -------
    ``(n_obs,)`` float32 in [0, 1] (negative means are clipped to 0, as in scVelo); NaN
    for cells without velocity. Neighbours without velocity are left out of the mean,
    where scVelo's would turn NaN.
    """
    V = np.asarray(velocity, dtype=np.float32)
    V = V - V.mean(axis=1, keepdims=True)
    norm = np.sqrt(np.einsum("ij,ij->i", V, V, dtype=np.float64))
    unit = np.divide(V, norm[:, None], out=np.zeros_like(V), where=norm[:, None] > 0)
    return np.clip(mean_neighbour_cosine(unit, norm > 0, indices), 0.0, None).astype(np.float32)


def mean_neighbour_cosine(unit: np.ndarray, has: np.ndarray, indices: IntArray) -> np.ndarray:
    """Mean dot product of each row of ``unit`` with its neighbours' rows.

    ``unit``: ``(n_obs, n_genes)`` rows of length 1 (or 0); ``has``: ``(n_obs,)`` which rows
    are nonzero; ``indices``: ``(n_obs, k)`` neighbours. Neighbours without a row are left
    out of the mean; NaN for a cell without a row or without such a neighbour. Float64
    (the dot products summed in float64, cells in parallel).
    """
    out = np.full(unit.shape[0], np.nan)
    unit = np.asarray(unit)
    _mean_neighbour_cosine_kernel(
        np.ascontiguousarray(unit, dtype=unit.dtype if unit.dtype == np.float64 else np.float32),
        np.ascontiguousarray(has, dtype=np.bool_),
        np.ascontiguousarray(indices, dtype=np.int64),
        out,
    )
    return out


@numba.njit(parallel=True, cache=True)
def _mean_neighbour_cosine_kernel(unit, has, indices, out):  # pragma: no cover - compiled
    n_genes = unit.shape[1]
    for i in numba.prange(unit.shape[0]):
        if not has[i]:
            continue
        total = 0.0
        n_valid = 0
        for m in range(indices.shape[1]):
            j = indices[i, m]
            if not has[j]:
                continue
            dot = 0.0
            for g in range(n_genes):
                dot += unit[j, g] * unit[i, g]
            total += dot
            n_valid += 1
        if n_valid > 0:
            out[i] = total / n_valid


def sparse_dense_product(matrix: sparse.spmatrix, dense: np.ndarray, *, dtype: type = np.float32) -> np.ndarray:
    """``matrix @ dense`` for a CSR matrix and a C-ordered array, in ``dtype``, rows in parallel.

    scipy's sparse-dense product runs on one core; this is the same sum, in the order
    of each sparse row, in ``dtype`` like scipy's on operands of that type.
    """
    m = sparse.csr_matrix(matrix, dtype=dtype)
    x = np.ascontiguousarray(dense, dtype=dtype)
    out = np.zeros((m.shape[0], x.shape[1]), dtype=dtype)
    _csr_dense_kernel(m.indptr, m.indices, m.data, x, out)
    return out


@numba.njit(parallel=True, cache=True)
def _csr_dense_kernel(indptr, indices, data, x, out):  # pragma: no cover - compiled
    for i in numba.prange(out.shape[0]):
        for k in range(indptr[i], indptr[i + 1]):
            j = indices[k]
            w = data[k]
            for g in range(x.shape[1]):
                out[i, g] += w * x[j, g]


def velocity_confidence_transition(
    expression: FloatArray, velocity: FloatArray, transitions: sparse.spmatrix
) -> FloatArray:
    """Correlation of each velocity with the expected displacement ``T x - x`` (scVelo).

    Returns
    -------
    ``(n_obs,)`` float32 in [-1, 1]; 0 where either vector vanishes.
    """
    X = np.asarray(expression, dtype=np.float32)
    velocity = np.asarray(velocity)
    T = sparse.csr_matrix(transitions)
    n_obs, n_genes = X.shape
    out = np.empty(n_obs, dtype=np.float32)
    # a block of cells at a time, each row its own (the same numbers): the float64
    # displacements and centred velocities of every cell were 0.6 GB at 100,000 x 200;
    # a block's transitions and dense rows count together
    cost = T.indptr.astype(np.int64) + np.arange(n_obs + 1, dtype=np.int64) * n_genes
    for a, b in row_blocks(cost, ROW_BLOCK_ENTRIES):
        # float32 product: twice as fast, and the correlation needs no more digits
        dX = np.asarray(sparse_dense_product(T[a:b], X), dtype=np.float64) - X[a:b]
        dX -= dX.mean(axis=1, keepdims=True)
        V = np.asarray(velocity[a:b], dtype=np.float64)
        V = V - V.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(dX, axis=1) * np.linalg.norm(V, axis=1)
        norms[norms == 0] = 1.0
        out[a:b] = np.einsum("ij,ij->i", dX, V) / norms
    return out


# --------------------------------------------------------------------------------------
# AnnData wrappers
# --------------------------------------------------------------------------------------


def _vkey_name(key: str, vkey: str) -> str:
    """ScVelo's per-velocity key: ``velocity_graph`` for vkey ``velocity``, ``<vkey>_graph`` else."""
    return key if vkey == Key.layers.VELOCITY else vkey + key.removeprefix(Key.layers.VELOCITY)


def _dense(matrix: object) -> np.ndarray:
    return matrix.toarray() if sparse.issparse(matrix) else np.asarray(matrix)


def velocity_gene_mask(
    adata: AnnData, *, vkey: str = Key.layers.VELOCITY, genes: object = None
) -> np.ndarray:
    """Genes the graph uses: ``genes`` (names or mask) or ``var['<vkey>_genes']``, without NaN velocities.

    Returns
    -------
    ``(n_vars,)`` boolean mask.
    """
    if vkey not in adata.layers:
        msg = (
            f"Velocity layer {vkey!r} not found; adata.layers has {sorted(adata.layers)}. Fit a model first."
        )
        raise MissingInputError(msg)
    mask = np.ones(adata.n_vars, dtype=bool)
    if genes is not None:
        arr = np.asarray(genes)
        if arr.dtype == bool:
            if arr.shape != (adata.n_vars,):
                msg = f"Expected a gene mask of length {adata.n_vars}, found shape {arr.shape}."
                raise ValueError(msg)
            mask &= arr
        else:
            mask &= adata.var_names.isin(arr.astype(str))
    else:
        gene_key = _vkey_name(Key.var.VELOCITY_GENES, vkey)
        if gene_key in adata.var:
            mask &= np.asarray(adata.var[gene_key], dtype=bool)
    V = adata.layers[vkey]
    if sparse.issparse(V):
        mask &= np.isfinite(np.asarray(V.sum(axis=0))).ravel()
    else:
        mask &= np.isfinite(np.asarray(V).sum(axis=0))
    if not mask.any():
        msg = (
            f"No gene left for the velocity graph: none of the selected genes has velocities without NaN "
            f"in layers[{vkey!r}] ({adata.n_obs} cells x {adata.n_vars} genes): the model found no velocity "
            "genes, as happens with too few cells or too little signal. Load more cells or genes; in "
            f"Python, check var['{_vkey_name(Key.var.VELOCITY_GENES, vkey)}'] or pass genes=."
        )
        raise InputError(msg)
    return mask


def get_velocity_graph(
    adata: AnnData, *, vkey: str = Key.layers.VELOCITY
) -> tuple[sparse.csr_matrix, sparse.csr_matrix | None]:
    """Read the velocity graph and its negative part from ``obsp`` (ours) or ``uns`` (scVelo).

    Returns
    -------
    ``(graph, graph_neg)``; ``graph_neg`` is None when the file has none.
    """
    key, key_neg = _vkey_name(Key.obsp.VELOCITY_GRAPH, vkey), _vkey_name(Key.obsp.VELOCITY_GRAPH_NEG, vkey)
    for slot in (adata.obsp, adata.uns):
        if key in slot:
            neg = slot.get(key_neg)
            return sparse.csr_matrix(slot[key]), None if neg is None else sparse.csr_matrix(neg)
    msg = f"No {key!r} in adata.obsp or adata.uns; compute it first with compute_velocity_graph(adata)."
    raise MissingInputError(msg)


def neighbors_for_graph(
    adata: AnnData, *, mode_neighbors: NeighborMode = "distances", n_recurse_neighbors: int | None = None
) -> sparse.csr_matrix:
    """Build the neighbour pattern that scVelo's ``velocity_graph`` scores, from ``obsp``."""
    if mode_neighbors not in _NEIGHBOR_MODES:
        msg = f"Invalid mode_neighbors {mode_neighbors!r}. Valid options are: {list(_NEIGHBOR_MODES)}."
        raise ValueError(msg)
    key = Key.obsp.DISTANCES if mode_neighbors == "distances" else Key.obsp.CONNECTIVITIES
    if key not in adata.obsp:
        msg = (
            f"Neighbour graph obsp[{key!r}] not found; adata.obsp has {sorted(adata.obsp)}. "
            "Run explorer.graph.neighbors.compute_neighbors(adata) first."
        )
        raise MissingInputError(msg)
    depth = _DEFAULT_RECURSE[mode_neighbors] if n_recurse_neighbors is None else n_recurse_neighbors
    if mode_neighbors == "distances":
        direct = knn_pattern(knn_indices(adata.obsp[key]))
    else:
        direct = sparse.csr_matrix(adata.obsp[key])
    return neighbor_pattern(direct, n_recurse_neighbors=depth)


def compute_velocity_graph(
    adata: AnnData,
    *,
    vkey: str = Key.layers.VELOCITY,
    xkey: str = Key.layers.MS,
    genes: Sequence[str] | np.ndarray | None = None,
    mode_neighbors: NeighborMode = "distances",
    n_recurse_neighbors: int | None = None,
    sqrt_transform: bool | None = None,
    progress: ProgressCallback | None = None,
    graphs: tuple[sparse.csr_matrix, sparse.csr_matrix] | None = None,
) -> None:
    """Compute the velocity graph of ``adata`` (scVelo's ``tl.velocity_graph``).

    Parameters
    ----------
    adata
        Needs ``layers[xkey]``, ``layers[vkey]`` and ``obsp['distances']`` (or
        ``obsp['connectivities']``).
    vkey
        Velocity layer.
    xkey
        Expression layer the displacements are taken in (scVelo: ``Ms``).
    genes
        Gene names or a boolean mask; default ``var['velocity_genes']`` where present.
        Genes with NaN velocities are always left out.
    mode_neighbors
        ``"distances"``: the kNN of ``obsp['distances']``, recursed twice by default
        (scVelo's default); ``"connectivities"``: the symmetric pattern of
        ``obsp['connectivities']`` (CellRank's neighbourhood; scVelo's option).
    n_recurse_neighbors
        Recursion depth; default 2 for ``"distances"``, 1 for ``"connectivities"``.
    sqrt_transform
        Variance-stabilise velocities and displacements; default: when
        ``uns['velocity_params']['mode']`` is ``"stochastic"``, as scVelo decides.
    progress
        Receives one report per block of cells.
    graphs
        ``(velocity_graph, velocity_graph_neg)`` already computed from these layers, genes
        and neighbour pattern (the dynamical model's root cells need them): stored as
        they are instead of computed again.

    Returns
    -------
    None; sets ``obsp['velocity_graph']`` (positive correlations),
    ``obsp['velocity_graph_neg']`` (negative ones), ``obs['velocity_self_transition']``,
    and ``uns['velocity_params']['mode_neighbors' | 'n_recurse_neighbors']`` (and drops
    its ``'embeddings'``, whose projections are now stale). Other velocity layers write
    ``<vkey>_graph`` etc.
    """
    for layer in (xkey, vkey):
        if layer not in adata.layers:
            msg = (
                f"Layer {layer!r} not found; adata.layers has {sorted(adata.layers)}. "
                "Compute moments (Ms) and fit a velocity model first."
            )
            raise MissingInputError(msg)
    mask = velocity_gene_mask(adata, vkey=vkey, genes=genes)
    params_key = _vkey_name(Key.uns.VELOCITY_PARAMS, vkey)
    params = dict(adata.uns.get(params_key, {}))
    if sqrt_transform is None:
        sqrt_transform = str(params.get("mode", "")) == "stochastic"
    depth = _DEFAULT_RECURSE.get(mode_neighbors, 1) if n_recurse_neighbors is None else n_recurse_neighbors
    if graphs is not None:
        graph, graph_neg = graphs
    else:
        pattern = neighbors_for_graph(adata, mode_neighbors=mode_neighbors, n_recurse_neighbors=depth)
        X = _dense(adata.layers[xkey][:, mask]).astype(np.float32, copy=False)
        V = _dense(adata.layers[vkey][:, mask]).astype(np.float32, copy=False)
        logger.info(
            "velocity graph on %d genes, %d cell pairs (mode_neighbors=%s, depth %d, sqrt_transform=%s)",
            int(mask.sum()),
            pattern.nnz,
            mode_neighbors,
            depth,
            sqrt_transform,
        )
        graph, graph_neg = velocity_graphs(
            X, V, pattern, sqrt_transform=bool(sqrt_transform), progress=progress
        )
    adata.obsp[_vkey_name(Key.obsp.VELOCITY_GRAPH, vkey)] = graph
    adata.obsp[_vkey_name(Key.obsp.VELOCITY_GRAPH_NEG, vkey)] = graph_neg
    adata.obs[_vkey_name(Key.obs.VELOCITY_SELF_TRANSITION, vkey)] = self_transition_probabilities(graph)
    params.pop(Key.uns.EMBEDDINGS, None)
    params[Key.uns.MODE_NEIGHBORS] = mode_neighbors
    params[Key.uns.N_RECURSE_NEIGHBORS] = int(depth)
    adata.uns[params_key] = params


def compute_transition_matrix(
    adata: AnnData,
    *,
    vkey: str = Key.layers.VELOCITY,
    scale: float = DEFAULT_SCALE,
    self_transitions: bool = True,
    backward: bool = False,
) -> sparse.csr_matrix:
    """Row-stochastic transition matrix from the stored velocity graph (see :func:`transition_matrix`).

    Returns
    -------
    The ``(n_obs, n_obs)`` matrix; also sets ``obsp['T_fwd']`` (``obsp['T_bwd']`` with
    ``backward``), CellRank's key, so CellRank's estimators can read it.
    """
    graph, graph_neg = get_velocity_graph(adata, vkey=vkey)
    T = transition_matrix(graph, graph_neg, scale=scale, self_transitions=self_transitions, backward=backward)
    adata.obsp[Key.obsp.TRANSITIONS_BACKWARD if backward else Key.obsp.TRANSITIONS] = T
    return T


def compute_velocity_confidence(
    adata: AnnData, *, vkey: str = Key.layers.VELOCITY, transitions: sparse.spmatrix | None = None
) -> None:
    """Velocity length and confidence per cell (scVelo's ``tl.velocity_confidence``).

    Uses the velocity genes without NaN and the kNN of ``obsp['distances']``.
    ``transitions``: the default :func:`transition_matrix` of the stored velocity graph,
    if the caller has it (:func:`compute_transition_matrix`'s result), so it is not
    built again.

    Returns
    -------
    None; sets ``obs['velocity_length']`` (rounded to 2 decimals, as scVelo),
    ``obs['velocity_confidence']`` and, when a velocity graph is stored,
    ``obs['velocity_confidence_transition']`` (``<vkey>_...`` for other layers).
    """
    mask = velocity_gene_mask(adata, vkey=vkey)
    if Key.obsp.DISTANCES not in adata.obsp:
        msg = (
            f"Neighbour graph obsp[{Key.obsp.DISTANCES!r}] not found; adata.obsp has {sorted(adata.obsp)}. "
            "Run explorer.graph.neighbors.compute_neighbors(adata) first."
        )
        raise MissingInputError(msg)
    V = _dense(adata.layers[vkey][:, mask]).astype(np.float32, copy=False)
    indices = knn_indices(adata.obsp[Key.obsp.DISTANCES])
    adata.obs[_vkey_name(Key.obs.VELOCITY_LENGTH, vkey)] = np.round(velocity_length(V), 2)
    adata.obs[_vkey_name(Key.obs.VELOCITY_CONFIDENCE, vkey)] = velocity_confidence(V, indices)
    try:
        graph, graph_neg = get_velocity_graph(adata, vkey=vkey)
    except KeyError:
        return
    if Key.layers.MS in adata.layers:
        X = _dense(adata.layers[Key.layers.MS][:, mask])
        T = transition_matrix(graph, graph_neg) if transitions is None else transitions
        adata.obs[_vkey_name(Key.obs.VELOCITY_CONFIDENCE_TRANSITION, vkey)] = velocity_confidence_transition(
            X, V, T
        )


def drop_velocity_graphs(adata: AnnData) -> list[str]:
    """Remove from ``adata`` what was computed from its velocity after the fit, in place.

    The velocity graphs (``obsp`` and the copies written files keep in ``uns``), the
    transition matrices ``T_fwd`` / ``T_bwd`` (and ``uns['T_fwd_params']``), every
    projection ``obsm['velocity_<basis>']`` of an ``obsm['X_<basis>']``, and the per-cell
    summaries (``velocity_self_transition``, ``velocity_length``, ``velocity_confidence``,
    ``velocity_confidence_transition``). For when that velocity is replaced: scVelo's
    ``velocity_embedding`` reuses a stored graph, and CellRank's estimators read ``T_fwd``,
    as if they were the new fit's.

    Returns
    -------
    The keys removed, as ``"obsp['velocity_graph']"``...; empty where there were none.
    """
    p, o = Key.obsp, Key.obs
    graphs = (p.VELOCITY_GRAPH, p.VELOCITY_GRAPH_NEG)
    projections = [Key.obsm.velocity(b) for b in adata.obsm if str(b).startswith("X_")]
    where = {
        "obsp": (adata.obsp, (*graphs, p.TRANSITIONS, p.TRANSITIONS_BACKWARD)),
        "uns": (adata.uns, (*graphs, Key.uns.TRANSITIONS_PARAMS)),
        "obsm": (adata.obsm, projections),
        "obs": (adata.obs, (o.VELOCITY_SELF_TRANSITION, o.VELOCITY_LENGTH, o.VELOCITY_CONFIDENCE,
                            o.VELOCITY_CONFIDENCE_TRANSITION)),
    }
    return drop_keys(where)
