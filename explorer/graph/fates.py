r"""Where cells go: macrostates, initial and terminal states, fate probabilities and drivers.

CellRank 2's GPCCA estimator on a transition matrix :math:`T` (Reuter et al. 2018, 2019;
Lange et al. 2022), step by step:

1. **Schur vectors.** A real basis :math:`X` of the invariant subspace of :math:`T` for
   its ``n_states`` eigenvalues of largest real part, orthonormal for the uniform weights
   and with a constant first column (:func:`schur_vectors`). CellRank without PETSc/SLEPc
   computes the full dense Schur form of :math:`T` (``method="brandts"``); the subspace
   is the same, and the sparse eigensolver (ARPACK) that finds it here needs only a few
   products with the sparse matrix.
2. **Macrostates.** ``pygpcca`` rotates :math:`X` into the memberships :math:`\chi`
   (cells x macrostates, rows sum to 1) and coarse-grains :math:`T` to
   :math:`T_c = (\chi^\top D \chi)^{-1} \chi^\top D T \chi`. Each macrostate is named after
   the cluster most of its 30 most typical cells belong to (``Beta``, ``Beta_1``,
   ``Beta_2`` when several share one) (:func:`macrostates`).
3. **Terminal states**: macrostates whose coarse self-transition :math:`(T_c)_{kk}` is at
   least 0.96 (CellRank's ``stability``); **initial states**: those with the smallest
   coarse stationary probability (:func:`terminal_state_names`, :func:`initial_state_names`).
4. **Fate probabilities**: with the terminal cells absorbing, the probability
   :math:`B = (I - Q)^{-1} S` that a walk from each transient cell is absorbed in each
   terminal state, by one sparse LU factorisation of :math:`I - Q` and one solve per
   state, or above :data:`ITERATIVE_ABOVE` transient cells by GMRES (all states at once)
   preconditioned with an incomplete LU without fill of the cells in flow order, to a
   relative residual of :data:`ITERATIVE_RTOL` (:func:`absorption_probabilities`).
5. **Absorption times**: the mean number of steps to absorption, conditioned on the
   state reached, :math:`m_k = ((I - Q)^{-1} B_k) / B_k` (CellRank's ``<state>_mean``)
   (:func:`absorption_times`).
6. **Drivers**: Pearson correlation of each gene's expression with each fate
   probability, with Fisher-z p-values, Benjamini-Hochberg q-values and 95 % intervals
   (:func:`lineage_drivers`).

:func:`compute_fates` writes it all in CellRank 2's keys, so ``cellrank.estimators.GPCCA.
from_adata`` and CellRank's plotting read our files.
"""

from __future__ import annotations

import colorsys
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import anndata as ad
import numba
import numpy as np
import pandas as pd
from scipy import sparse
from scipy import linalg, stats
from scipy.optimize import fmin
from scipy.sparse import csgraph
from scipy.sparse import linalg as splinalg
from threadpoolctl import threadpool_limits

from explorer._types import InputError, report
from explorer.keys import Key, drop_keys

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from explorer._types import IntArray, ProgressCallback

logger = logging.getLogger(__name__)

#: CellRank's cells per state: the most typical cells of each macrostate define it
DEFAULT_N_CELLS = 30

#: macrostates asked for by default where the cells hold them (:func:`default_n_states`)
DEFAULT_N_STATES = 10
#: CellRank's ``predict_terminal_states(method="stability")`` threshold on diag(T_c)
STABILITY_THRESHOLD = 0.96
#: below this many cells the dense eigensolver is used (ARPACK needs k < n - 1)
_DENSE_BELOW = 500
#: eigenvalues whose imaginary part is below this are real
_IMAG_TOL = 1e-9
#: ``solver="auto"`` solves ``I - Q`` iteratively above this many transient cells: the
#: sparse LU's fill-in grows much faster than the graph (over 4 GB at 100k simulated cells)
ITERATIVE_ABOVE = 30_000
#: the iterative solve's tolerance: each column's relative residual
#: ``||(I - Q) x - b|| / ||b||`` (checked on the true residual after GMRES)
ITERATIVE_RTOL = 1e-10
#: The iterative solve's preconditioner is an incomplete LU without fill (ILU(0), on the
#: pattern of ``I - Q``) with the cells ordered along the flow (nearest to absorption
#: first: :func:`_flow_order`). At 100k simulated cells it is built in about 1 CPU-s
#: (SuperLU's ILUTP with drop tolerance 1e-3, used before, took 40) and GMRES needs 56
#: iterations per column to 1e-10 (restart 50: 77-85; 94-101 in a random cell order).
#: GMRES restart length (Krylov vectors kept: 100 x 8 bytes per transient cell and
#: right-hand side) and the most restart cycles before giving up. At 100k simulated cells
#: a restart of 50 took 77 iterations to 1e-10, 100 took 56
_GMRES_RESTART = 100
_GMRES_MAXITER = 100
#: at most this many bytes of Krylov vectors (all right-hand sides): fewer vectors kept
#: (a shorter restart, down to 20) where more would not fit
_KRYLOV_BYTES = 5e8

Solver = Literal["auto", "direct", "iterative"]
_SOLVERS = ("auto", "direct", "iterative")


def most_states(n_obs: int, n_cells: int = DEFAULT_N_CELLS) -> int:
    """The most macrostates ``n_obs`` cells hold, each with its ``n_cells`` most typical cells.

    Examples
    --------
    >>> most_states(100), most_states(59)
    (3, 1)
    """
    return n_obs // max(n_cells, 1)


def default_n_states(n_obs: int, n_cells: int = DEFAULT_N_CELLS) -> int:
    """The macrostates to ask for by default: 10, or as many as ``n_obs`` cells hold, 2 at least.

    Each state holds its ``n_cells`` most typical cells; the 100-cell dentate gyrus refused
    a fixed default of 10 (it holds 3). Used by :func:`compute_fates`, ``explorer fates``
    and the app.

    Examples
    --------
    >>> default_n_states(3696), default_n_states(100), default_n_states(40), default_n_states(100, 10)
    (10, 3, 2, 10)
    """
    return int(min(DEFAULT_N_STATES, max(2, most_states(n_obs, n_cells))))


# --------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------


def _pygpcca():
    """Import pygpcca (installed without its pins: see .ci/setup), or say how to install it."""
    try:
        import pygpcca._gpcca
        import pygpcca.utils
    except ImportError:
        msg = (
            "The fate maps need pygpcca (CellRank's GPCCA), which is not installed. Install it "
            "without its pins, which would downgrade jinja2 below what pandas needs: "
            "`pip install --no-deps pygpcca==1.0.4` (its one import, docrep, comes with explorer)."
        )
        raise InputError(msg) from None
    return pygpcca


def _check_transitions(transitions: sparse.spmatrix) -> sparse.csr_matrix:
    T = sparse.csr_matrix(transitions, dtype=np.float64)
    if T.shape[0] != T.shape[1]:
        msg = f"Expected a square (n_obs, n_obs) transition matrix, found shape {T.shape}."
        raise ValueError(msg)
    if T.nnz and (T.data < 0).any():
        msg = "Expected non-negative transition probabilities, found negative entries."
        raise ValueError(msg)
    sums = np.asarray(T.sum(axis=1)).ravel()
    bad = ~np.isclose(sums, 1.0, rtol=0, atol=1e-6)
    if bad.any():
        msg = (
            f"Transition matrix is not row stochastic, {int(bad.sum())} rows do not sum to 1 "
            f"(e.g. row {int(np.flatnonzero(bad)[0])} sums to {sums[bad][0]:.6g}). "
            "Build it with explorer.graph.kernels.compute_velocity_kernel."
        )
        raise ValueError(msg)
    return T


# --------------------------------------------------------------------------------------
# Schur vectors and macrostates
# --------------------------------------------------------------------------------------


def _top_eigen(T: sparse.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` eigenvalues of largest real part (and eigenvectors), sorted descending."""
    n = T.shape[0]
    if n < _DENSE_BELOW or k >= n - 2:
        vals, vecs = np.linalg.eig(T.toarray())
    else:
        # ARPACK's random start vector is seeded, so results do not change between runs
        v0 = np.random.default_rng(0).random(n)
        vals, vecs = splinalg.eigs(T, k=k, which="LR", v0=v0, tol=1e-12, maxiter=max(10 * n, 10_000))
    order = np.lexsort((-vals.imag, -np.round(vals.real, 12)))
    return vals[order][:k], vecs[:, order][:, :k]


def _splits_pair(vals: np.ndarray, m: int) -> bool:
    """Whether keeping the first ``m`` eigenvalues separates a complex-conjugate pair."""
    if m >= vals.size:
        return False
    last = vals[m - 1]
    if abs(last.imag) <= _IMAG_TOL:
        return False
    # the pair is kept together when the m-th value's conjugate is among the first m
    return not np.any(np.isclose(vals[: m - 1], np.conj(last), atol=1e-8))


def schur_vectors(
    transitions: sparse.spmatrix, n_vectors: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal basis of the dominant invariant subspace of ``T`` (what GPCCA needs).

    Parameters
    ----------
    transitions
        ``(n_obs, n_obs)`` row-stochastic matrix.
    n_vectors
        Dimension of the subspace: the eigenvalues of largest real part (CellRank's
        ``which="LR"``). One more is taken where ``n_vectors`` would split a pair of
        complex-conjugate eigenvalues.

    Returns
    -------
    ``(X, R, eigenvalues)``: ``X`` ``(n_obs, m)`` with ``X[:, 0] == 1`` and
    ``X.T @ X / n_obs == I`` (orthonormal for uniform weights :math:`\\eta`), ``R = X^T D T X``
    ``(m, m)`` (so ``T X = X R``), and the ``m`` eigenvalues sorted by real part.
    """
    T = _check_transitions(transitions)
    n = T.shape[0]
    if not 2 <= n_vectors < n:
        msg = f"Expected 2 <= number of Schur vectors < n_obs = {n}, found {n_vectors}."
        raise ValueError(msg)
    with _one_blas_thread():
        return _schur_vectors(T, n_vectors)


def _one_blas_thread() -> threadpool_limits:
    """GPCCA's dense steps on one BLAS thread: they are small (``n_obs x m``), and a second
    thread only waits (a QR of the pancreas's 3696 x 10 Schur vectors takes 1 ms on one
    thread, 15-60 ms on two of a loaded machine, and ARPACK's orthogonalisations likewise)."""
    return threadpool_limits(limits=1, user_api="blas")


def _schur_vectors(T: sparse.csr_matrix, n_vectors: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`schur_vectors` of a checked matrix."""
    n = T.shape[0]
    vals, vecs = _top_eigen(T, min(n_vectors + 1, n - 1) if n >= _DENSE_BELOW else n)
    m = n_vectors + 1 if _splits_pair(vals, n_vectors) else n_vectors
    if m > vals.size:
        vals, vecs = _top_eigen(T, m + 1)
    vals, vecs = vals[:m], vecs[:, :m]
    # a real basis: (Re, Im) of each complex pair, the real part of real eigenvectors
    basis = []
    done = np.zeros(m, dtype=bool)
    for i in range(m):
        if done[i]:
            continue
        if abs(vals[i].imag) > _IMAG_TOL:
            basis += [vecs[:, i].real, vecs[:, i].imag]
            partner = np.flatnonzero(~done & np.isclose(vals, np.conj(vals[i]), atol=1e-8))
            done[partner] = True
        else:
            basis.append(vecs[:, i].real)
        done[i] = True
    B = np.column_stack(basis)[:, :m]
    ones = np.ones(n) / np.sqrt(n)
    first = B[:, 0] / np.linalg.norm(B[:, 0])
    if abs(first @ ones) > 1 - 1e-8:
        # Gram-Schmidt of the eigenvectors in eigenvalue order, the constant one first: the
        # sorted real Schur vectors (up to signs) that CellRank's dense Schur form gives, so
        # that GPCCA's Nelder-Mead runs in the same coordinates as CellRank's
        Q, _ = np.linalg.qr(np.column_stack([ones, B[:, 1:]]))
        Q[:, 0] = ones
    else:
        # eigenvalue 1 is repeated (a reducible chain): constant first, the rest orthogonal
        B = B - np.outer(ones, ones @ B)
        U, _, _ = np.linalg.svd(B, full_matrices=False)
        Q = np.column_stack([ones, U[:, : m - 1]])
    X = Q * np.sqrt(n)
    R = X.T @ (T @ X) / n
    return X, R, vals


#: rows of each column the GPCCA objective keeps as candidates for its maximum
_CANDIDATES = 1024
#: relative margin on the objective's bounds against round-off (its products are exact to ~1e-15)
_BOUND_MARGIN = 1e-12


@numba.njit(cache=True)
def _gpcca_objective(alpha, X, Xt, row_norms, ref, cand, cand_val, n_cand, floor):  # pragma: no cover
    r"""PyGPCCA's ``_objective``: ``m - trace(diag(1 / A[0]) A^T A)`` for the feasible completion ``A``.

    The same arithmetic as pygpcca's ``_fill_matrix`` + ``_objective``, compiled. Its time
    goes to the maximum over cells :math:`r` of :math:`v_r = -X_{r,1:} a_j` for each column
    :math:`a_j` of the rotation, which is found exactly without reading most rows.
    Nelder-Mead's points lie close together, and a row's value moves by at most
    :math:`|X_{r,1:}| \, |a_j - a^0_j|` from its value :math:`v^0_r` at an earlier
    point :math:`a^0_j` (Cauchy-Schwarz). So each column keeps a reference
    point, its :data:`_CANDIDATES` rows of largest :math:`v^0_r` sorted descending
    (``cand``, ``cand_val``) and the largest :math:`v^0_r` of the other rows (``floor``),
    and reads candidates until no later candidate, nor any other row, can beat the best
    so far (with a margin for round-off). Where that does not settle it, the column is
    scanned in full (``Xt``, ``X[:, 1:]`` transposed) and becomes the new reference
    (``ref``, ``cand``, ``cand_val``, ``n_cand`` and ``floor`` are updated in place). Each
    row's product is summed in the same order either way, so the maximum, and the
    objective, are bit for bit those of a full scan.
    """
    n, m = X.shape
    k = m - 1
    rot = np.zeros((m, m))
    for i in range(k):
        for j in range(k):
            rot[i + 1, j + 1] = alpha[i * k + j]
    for i in range(1, m):
        total = 0.0
        for j in range(1, m):
            total += rot[i, j]
        rot[i, 0] = -total
    norm_max = row_norms.max()
    for j in range(m):
        delta, a_norm, ref_norm = 0.0, 0.0, 0.0
        for q in range(k):
            delta += (rot[q + 1, j] - ref[j, q]) ** 2
            a_norm += rot[q + 1, j] ** 2
            ref_norm += ref[j, q] ** 2
        delta = np.sqrt(delta)
        margin = _BOUND_MARGIN * norm_max * (np.sqrt(a_norm) + np.sqrt(ref_norm))
        shift = norm_max * delta + margin
        if n_cand[j] > 0:
            best = -np.inf
            settled = False
            for i in range(n_cand[j]):
                v0 = cand_val[j, i]
                if v0 + shift < best:
                    settled = True
                    break
                r = cand[j, i]
                if v0 + row_norms[r] * delta + margin < best:
                    continue
                d = 0.0
                for q in range(1, m):
                    d += X[r, q] * rot[q, j]
                if -d > best:
                    best = -d
            if settled or floor[j] + shift < best:
                rot[0, j] = best
                continue
        # a full scan, which becomes the column's new reference
        v = np.zeros(n)
        for q in range(k):
            aq = rot[q + 1, j]
            for r in range(n):
                v[r] += Xt[q, r] * aq
        for r in range(n):
            v[r] = -v[r]
        rot[0, j] = v.max()
        keep = min(cand.shape[1], n)
        if keep == n:
            rows = np.argsort(-v, kind="mergesort")
            floor[j] = -np.inf
        else:
            threshold = np.partition(v, n - keep)[n - keep]
            rows = np.flatnonzero(v >= threshold)[:keep]
            rows = rows[np.argsort(-v[rows], kind="mergesort")]
            # the other rows' best: below the threshold, or a tie with it left out
            below = -np.inf
            chosen = np.zeros(n, dtype=np.bool_)
            chosen[rows] = True
            for r in range(n):
                if not chosen[r] and v[r] > below:
                    below = v[r]
            floor[j] = below
        for i in range(rows.size):
            cand[j, i] = rows[i]
            cand_val[j, i] = v[rows[i]]
        n_cand[j] = rows.size
        for q in range(k):
            ref[j, q] = rot[q + 1, j]
    scale = 0.0
    for j in range(m):
        scale += rot[0, j]
    for i in range(m):
        for j in range(m):
            rot[i, j] /= scale
    for j in range(m):
        if rot[0, j] <= 0.0:
            raise ValueError("First row of rotation matrix has elements <= 0.")
    trace = 0.0
    for j in range(m):
        col = 0.0
        for i in range(m):
            col += rot[i, j] * rot[i, j]
        trace += col / rot[0, j]
    return m - trace


def _objective_args(X: np.ndarray) -> tuple:
    """What :func:`_gpcca_objective` takes after ``alpha``: ``X``, its transpose, row norms and empty references."""
    n, m = X.shape
    keep = min(_CANDIDATES, n)
    Y = X[:, 1:]
    return (
        X,
        np.ascontiguousarray(Y.T),
        np.linalg.norm(Y, axis=1),
        np.zeros((m, m - 1)),
        np.zeros((m, keep), dtype=np.int64),
        np.zeros((m, keep)),
        np.zeros(m, dtype=np.int64),
        np.full(m, -np.inf),
    )


def _inner_simplex(X: np.ndarray) -> np.ndarray:
    """PyGPCCA's ``_indexsearch`` (the inner simplex algorithm), vectorised over the rows.

    The row of largest norm, then ``m - 1`` times the row farthest from the span of the
    rows chosen so far (all rows projected at once rather than in a Python loop).

    Returns
    -------
    ``(m,)`` int64 row indices, the vertices of the start simplex.
    """
    n, m = X.shape
    diffs = np.abs(X.max(axis=0) - X.min(axis=0))
    if not np.isclose(1.0 + diffs[0], 1.0, rtol=1e-6) or not np.all(diffs[1:] > 1e-6):
        msg = (
            "Expected Schur vectors with a constant first column and no other constant column "
            f"(ranges {diffs.round(8).tolist()}): no simplex structure to search."
        )
        raise ValueError(msg)
    ortho = X.copy()
    index = np.zeros(m, dtype=np.int64)
    index[0] = int(np.argmax(np.linalg.norm(ortho, axis=1)))
    ortho -= ortho[index[0]]
    for j in range(1, m):
        temp = ortho[index[j - 1]].copy()
        ortho -= np.outer(ortho @ temp, temp)
        dist = np.linalg.norm(ortho, axis=1)
        index[j] = int(np.argmax(dist))
        if not dist[index[j]] > 0:
            msg = f"The Schur vectors span fewer than {m} dimensions: no {m}-vertex simplex in the data."
            raise ValueError(msg)
        ortho /= dist[index[j]]
    return index


def _initial_rotation(X: np.ndarray) -> np.ndarray:
    """PyGPCCA's ``_initialize_rot_matrix``: the inverse of the start simplex's vertices."""
    vertices = X[_inner_simplex(X)]
    condition = np.linalg.cond(vertices)
    if condition >= 1.0 / np.finfo(np.float64).eps:
        msg = (
            f"The condition number {condition:.3g} of the start simplex's vertices is too high for a "
            "safe inversion (to build the initial rotation matrix)."
        )
        raise ValueError(msg)
    if condition > 1e4:
        logger.warning("The start simplex's vertices are ill-conditioned (condition number %.3g)", condition)
    return np.linalg.pinv(vertices)


def gpcca_memberships(X: np.ndarray) -> tuple[np.ndarray, float]:
    """GPCCA's memberships from Schur vectors (pygpcca's ``_gpcca_core``, Roeblitz & Weber 2013).

    The initial rotation (inner simplex algorithm, :func:`_inner_simplex`), the
    Nelder-Mead optimisation (``scipy.optimize.fmin`` with pygpcca's settings) and the
    feasible completion are pygpcca's; the objective runs compiled, reading only the rows
    that can hold each column's maximum (:func:`_gpcca_objective`): the same values, and
    so the same optimisation, as the full scan's.

    Parameters
    ----------
    X
        ``(n_obs, m)`` Schur vectors with a constant first column (:func:`schur_vectors`).

    Returns
    -------
    ``(chi, crispness)``: ``(n_obs, m)`` non-negative memberships whose rows sum to 1, and
    the crispness ``(m - f_opt) / m`` (1 for a crisp clustering).
    """
    _pygpcca()
    with _one_blas_thread():
        return _memberships(X)


def _memberships(X: np.ndarray) -> tuple[np.ndarray, float]:
    """:func:`gpcca_memberships`, on the calling thread pools."""
    _fill_matrix = _pygpcca()._gpcca._fill_matrix  # noqa: SLF001
    X = np.ascontiguousarray(X, dtype=np.float64)
    m = X.shape[1]
    rot = _initial_rotation(X)
    alpha = np.reshape(rot[1:, 1:], (m - 1) ** 2)
    try:
        alpha, fopt, *_ = fmin(_gpcca_objective, alpha, args=_objective_args(X), full_output=True, disp=False)
    except ValueError:
        return np.full(X.shape, 1.0 / m), -1.0
    rot[1:, 1:] = np.reshape(alpha, (m - 1, m - 1))
    rot = _fill_matrix(rot, X)
    chi = X @ rot
    # pygpcca: round-off negatives are zeroed and rows renormalised; real ones are an error
    if (chi < -1e4 * np.finfo(np.float64).eps).any():
        return chi, -1.0
    chi = np.clip(chi, 0.0, None)
    chi /= chi.sum(axis=1, keepdims=True)
    return chi, float((m - fopt) / m)


@dataclass(frozen=True, slots=True)
class Macrostates:
    """GPCCA's macrostates of a transition matrix.

    Attributes
    ----------
    names
        ``(n_states,)`` state names (cluster names, ``Beta_1``... for repeats; ``"0"``,
        ``"1"``... without clusters).
    memberships
        ``(n_obs, n_states)`` soft assignment of cells to states (rows sum to 1).
    assignment
        Categorical ``(n_obs,)``: the ``n_cells`` most typical cells of each state carry
        its name, the others NaN (CellRank's ``macrostates_fwd``).
    colors
        One hex colour per state.
    coarse_transitions
        ``(n_states, n_states)`` coarse-grained transition matrix :math:`T_c`.
    coarse_stationary
        ``(n_states,)`` coarse stationary distribution, or None where :math:`T` has none.
    coarse_initial
        ``(n_states,)`` coarse input distribution (uniform weights pooled by state).
    schur_vectors, schur_matrix, eigenvalues
        What GPCCA rotated (:func:`schur_vectors`).
    """

    names: list[str]
    memberships: np.ndarray
    assignment: pd.Categorical
    colors: list[str]
    coarse_transitions: np.ndarray
    coarse_stationary: np.ndarray | None
    coarse_initial: np.ndarray
    schur_vectors: np.ndarray
    schur_matrix: np.ndarray
    eigenvalues: np.ndarray

    def stability(self) -> pd.Series:
        """Coarse self-transition probability of each state, the diagonal of :math:`T_c`."""
        return pd.Series(np.diag(self.coarse_transitions), index=self.names)


def top_cells(memberships: np.ndarray, n_cells: int) -> np.ndarray:
    """The ``n_cells`` cells of highest membership per state, each cell in at most one.

    CellRank's ``_fuzzy_to_discrete(remove_overlap=False)``: a cell among the top of
    several states goes to the one it belongs to most.

    Returns
    -------
    ``(n_obs,)`` int64: the state of each chosen cell, -1 elsewhere.
    """
    chi = np.asarray(memberships, dtype=np.float64)
    n_obs, n_states = chi.shape
    if n_cells < 1 or n_cells * n_states > n_obs:
        msg = (
            f"Expected 1 <= n_cells <= n_obs / n_states = {n_obs // max(n_states, 1)}, found {n_cells}. "
            "Choose fewer cells per state."
        )
        raise InputError(msg)
    chosen = np.zeros((n_obs, n_states), dtype=bool)
    for k in range(n_states):
        chosen[np.argpartition(chi[:, k], -n_cells)[-n_cells:], k] = True
    labels = np.full(n_obs, -1, dtype=np.int64)
    has = chosen.any(axis=1)
    labels[has] = np.argmax(np.where(chosen[has], chi[has], -np.inf), axis=1)
    counts = np.bincount(labels[labels >= 0], minlength=n_states)
    if (counts < max(int(0.2 * n_cells), 1)).any():
        msg = (
            f"A state kept only {int(counts.min())} of its {n_cells} most typical cells (the others belong "
            "more to another state): the states overlap. Ask for fewer states."
        )
        raise InputError(msg)
    return labels


def _name_states(labels: np.ndarray, n_states: int, clusters: pd.Series | None, cluster_colors) -> tuple:
    """Cluster name (and colour) with the most of each state's cells; repeats get ``_1``, ``_2``."""
    from matplotlib import colors as mcolors

    if clusters is None:
        palette = [mcolors.to_hex(c) for c in _palette(n_states)]
        return [str(k) for k in range(n_states)], palette
    cats = list(clusters.cat.categories.astype(str))
    codes = clusters.cat.codes.to_numpy()
    base = []
    for k in range(n_states):
        counts = np.bincount(codes[(labels == k) & (codes >= 0)], minlength=len(cats))
        base.append(cats[int(np.argmax(counts))])
    if cluster_colors is not None and len(cluster_colors) >= len(cats):
        ref = {c: mcolors.to_hex(cluster_colors[i]) for i, c in enumerate(cats)}
    else:
        ref = {c: mcolors.to_hex(col) for c, col in zip(cats, _palette(len(cats)), strict=False)}
    names, colors = [], []
    seen: dict[str, int] = {}
    totals = pd.Series(base).value_counts()
    for name in base:
        if totals[name] == 1:
            names.append(name)
            colors.append(ref[name])
            continue
        seen[name] = seen.get(name, 0) + 1
        names.append(f"{name}_{seen[name]}")
        colors.append(_shade(ref[name], seen[name], int(totals[name])))
    return names, colors


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def _shade(color: str, i: int, n: int) -> str:
    """``color`` made lighter or darker, distinct for each of ``n`` repeats."""
    from matplotlib import colors as mcolors

    r, g, b = mcolors.to_rgb(color)
    h, lightness, s = colorsys.rgb_to_hls(r, g, b)
    lightness = float(np.clip(0.25 + 0.5 * i / (n + 1), 0.0, 1.0))
    return mcolors.to_hex(colorsys.hls_to_rgb(h, lightness, s))


def macrostates(
    transitions: sparse.spmatrix,
    n_states: int,
    *,
    clusters: pd.Series | pd.Categorical | np.ndarray | None = None,
    cluster_colors: Sequence[str] | None = None,
    n_cells: int = DEFAULT_N_CELLS,
) -> Macrostates:
    """GPCCA macrostates of a transition matrix (CellRank's ``GPCCA.compute_macrostates``).

    Parameters
    ----------
    transitions
        ``(n_obs, n_obs)`` row-stochastic matrix.
    n_states
        Number of macrostates (one more where ``n_states`` would split a complex pair of
        eigenvalues, as in CellRank).
    clusters
        ``(n_obs,)`` cluster labels that name the states.
    cluster_colors
        Colours of the clusters' categories (``uns['clusters_colors']``).
    n_cells
        Most typical cells per state in the assignment.

    Returns
    -------
    The :class:`Macrostates`.
    """
    pygpcca = _pygpcca()
    _coarsegrain, stationary_distribution = pygpcca._gpcca._coarsegrain, pygpcca.utils.stationary_distribution  # noqa: SLF001

    T = _check_transitions(transitions)
    n_obs = T.shape[0]
    most = most_states(n_obs, n_cells)
    if not 2 <= n_states <= most:
        msg = (
            f"Expected 2 <= number of macrostates <= n_obs / n_cells = {most} ({n_obs} cells, "
            f"{n_cells} typical cells a state), found {n_states}. "
            + (
                f"Ask for 2 to {most} (`--n_states` of `explorer fates`; macrostates in the app)."
                if most >= 2  # noqa: PLR2004 - two states at least
                else (
                    f"{n_obs} cells are too few for fates of {n_cells} typical cells a state; they need "
                    f"{2 * n_cells} at least. Ask for fewer typical cells a state (`--n-cells "
                    f"{n_obs // 2}` or fewer) or load more cells."
                )
            )
        )
        raise InputError(msg)
    with _one_blas_thread():
        X, R, vals = _schur_vectors(T, n_states)
        if X.shape[1] > most and n_states > 2:  # noqa: PLR2004 - two states at least
            # one more state (a complex pair kept whole) would hold too few typical cells:
            # one fewer keeps the pair together too (200 cells asked for 6, got 7 of 28 cells,
            # and were refused for too many cells a state, which nobody had chosen)
            X, R, vals = _schur_vectors(T, n_states - 1)
        chi, crispness = _memberships(X)
        eta = np.full(n_obs, 1.0 / n_obs)
        coarse = _coarsegrain(T, eta=eta, chi=chi)
        try:
            pi = stationary_distribution(T)
            stat = chi.T @ pi
        except Exception:  # noqa: BLE001 - pygpcca: no stationary distribution (reducible chain)
            stat = None
    m = X.shape[1]
    if m != n_states:
        logger.warning(
            "%d macrostates would split a pair of complex-conjugate eigenvalues; using %d", n_states, m
        )
    if crispness <= 0:
        msg = (
            f"GPCCA found no clustering of the cells into {m} macrostates (crispness {crispness:.3g}). "
            "Ask for a different number of macrostates."
        )
        raise InputError(msg)
    labels = top_cells(chi, n_cells)
    series = None
    if clusters is not None:
        series = pd.Series(pd.Categorical(np.asarray(clusters).astype(str) if not isinstance(
            clusters, (pd.Series, pd.Categorical)) else clusters))
        if not isinstance(series.dtype, pd.CategoricalDtype):
            series = series.astype("category")
        if len(series) != n_obs:
            msg = f"Expected {n_obs} cluster labels, found {len(series)}."
            raise ValueError(msg)
    names, colors = _name_states(labels, m, series, cluster_colors)
    assignment = pd.Categorical.from_codes(labels, categories=names)
    return Macrostates(
        names=names,
        memberships=chi,
        assignment=assignment,
        colors=colors,
        coarse_transitions=np.asarray(coarse, dtype=np.float64),
        coarse_stationary=None if stat is None else np.asarray(stat, dtype=np.float64),
        coarse_initial=chi.T @ eta,
        schur_vectors=X,
        schur_matrix=R,
        eigenvalues=vals,
    )


def terminal_state_names(
    macro: Macrostates, *, stability_threshold: float = STABILITY_THRESHOLD
) -> list[str]:
    """Macrostates whose coarse self-transition is at least ``stability_threshold`` (CellRank's rule).

    Returns
    -------
    The names, in the order of ``macro.names``; all of them for a single state.
    """
    if len(macro.names) == 1:
        return list(macro.names)
    stab = macro.stability()
    return [n for n in macro.names if stab[n] >= stability_threshold]


def initial_state_names(macro: Macrostates, *, n_states: int = 1) -> list[str]:
    """The ``n_states`` macrostates of smallest coarse stationary probability (CellRank's rule).

    Returns
    -------
    The names; empty where :math:`T` has no stationary distribution.
    """
    if macro.coarse_stationary is None:
        return []
    order = np.argsort(macro.coarse_stationary, kind="stable")[:n_states]
    return [macro.names[i] for i in order]


def state_cells(
    macro: Macrostates, names: Sequence[str], *, n_cells: int = DEFAULT_N_CELLS
) -> tuple[pd.Categorical, np.ndarray, np.ndarray]:
    """The cells of some macrostates (CellRank's ``set_terminal_states``).

    Returns
    -------
    ``(states, probs, memberships)``: categorical ``(n_obs,)`` with the ``n_cells`` most
    typical cells of each named state (NaN elsewhere), each cell's membership relative to
    the best cell of its closest state ``(n_obs,)`` (CellRank's ``term_states_fwd_probs``),
    and the ``(n_obs, len(names))`` memberships of those states.
    """
    idx = [macro.names.index(n) for n in names]
    memb = macro.memberships[:, idx]
    if len(idx) == 0:
        msg = "Expected at least one state, found none."
        raise ValueError(msg)
    labels = top_cells(memb, n_cells)
    states = pd.Categorical.from_codes(labels, categories=list(names))
    top = memb.max(axis=0)
    probs = (memb / np.where(top > 0, top, 1.0)).max(axis=1)
    return states, probs, memb


# --------------------------------------------------------------------------------------
# absorption
# --------------------------------------------------------------------------------------


def _absorbing_split(
    transitions: sparse.spmatrix, states: np.ndarray
) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray, int]:
    """``I - Q`` (CSR) and the transient-to-state sums ``S`` (n_transient, n_states)."""
    T = _check_transitions(transitions)
    labels = np.asarray(states, dtype=np.int64)
    if labels.shape != (T.shape[0],):
        msg = f"Expected {T.shape[0]} state labels, found shape {labels.shape}."
        raise ValueError(msg)
    n_states = int(labels.max()) + 1 if (labels >= 0).any() else 0
    if n_states == 0:
        msg = "Expected at least one absorbing cell (a label >= 0), found none."
        raise ValueError(msg)
    trans = np.flatnonzero(labels < 0)
    if trans.size == 0:
        msg = "Every cell is absorbing: there are no transient cells to compute fates for."
        raise ValueError(msg)
    Q = T[trans][:, trans]
    onehot = sparse.csr_matrix(
        (np.ones(int((labels >= 0).sum())), (np.flatnonzero(labels >= 0), labels[labels >= 0])),
        shape=(T.shape[0], n_states),
    )
    S = np.asarray((T[trans] @ onehot).todense())
    A = sparse.csr_matrix(sparse.identity(trans.size, format="csr") - Q)
    return A, S, trans, n_states


_UNREACHABLE = (
    "part of the graph has no path to the terminal states (a closed set of cells without a terminal "
    "state). Use more macrostates, choose other terminal states, or give the connectivity kernel a "
    "weight > 0."
)


def _factor(A: sparse.spmatrix) -> splinalg.SuperLU:
    """Sparse LU of ``I - Q``; singular exactly when some cells can never be absorbed."""
    try:
        return splinalg.splu(sparse.csc_matrix(A))
    except RuntimeError as err:
        msg = f"Some cells reach no terminal state: {_UNREACHABLE}"
        raise InputError(msg) from err


def _flow_order(A: sparse.spmatrix) -> np.ndarray:
    """The transient cells ordered along the flow: those nearest to absorption first.

    A cell's distance is the smallest ``-log`` probability of a path from it out of the
    transient set (Dijkstra from a virtual exit node over the reversed edges of ``Q``, each
    edge weighted ``-log Q_ij``, each cell's exit step ``-log s_i`` with ``s = (I - Q) 1``
    the probability of leaving in one step). In this order the likely steps of a cell go
    to cells before it, so that an incomplete LU without fill keeps most of the flow.
    Cells that cannot leave come last.
    """
    A = sparse.csr_matrix(A)
    n = A.shape[0]
    exit_prob = np.asarray(A.sum(axis=1)).ravel()
    rows = np.repeat(np.arange(n), np.diff(A.indptr))
    step = (A.indices != rows) & (A.data < 0)  # the entries -Q_ij of the steps i -> j
    leaves = np.flatnonzero(exit_prob > 1e-12)
    # the reversed steps j -> i, and a virtual node n with n -> i for each cell i with an exit
    reverse = sparse.csr_matrix(
        (
            -np.log(np.clip(np.concatenate([-A.data[step], exit_prob[leaves]]), 1e-300, 1.0)),
            (np.concatenate([A.indices[step], np.full(leaves.size, n)]), np.concatenate([rows[step], leaves])),
        ),
        shape=(n + 1, n + 1),
    )
    # a zero weight would be read as no edge: certain steps get the smallest positive one
    reverse.data = np.maximum(reverse.data, np.finfo(np.float64).tiny)
    dist = csgraph.dijkstra(reverse, directed=True, indices=n)[:n]
    return np.argsort(dist, kind="stable")


@numba.njit(cache=True)
def _ilu0(indptr, indices, data):  # pragma: no cover
    """ILU(0) of a CSR matrix with sorted indices: ``L`` (unit diagonal) and ``U`` on its pattern.

    Returns the factors' values on ``data``'s pattern and the position of each diagonal
    entry; ``ok`` is False at a pivot that is not positive (for ``I - Q``, an M-matrix, the
    pivots are positive exactly when it is non-singular; Meijerink & van der Vorst 1977).
    """
    n = indptr.size - 1
    lu = data.copy()
    diag = np.full(n, -1, dtype=np.int64)
    where = np.full(n, -1, dtype=np.int64)
    for i in range(n):
        for p in range(indptr[i], indptr[i + 1]):
            where[indices[p]] = p
        for p in range(indptr[i], indptr[i + 1]):
            k = indices[p]
            if k >= i:
                break
            lu[p] /= lu[diag[k]]
            for q in range(diag[k] + 1, indptr[k + 1]):
                r = where[indices[q]]
                if r >= 0:
                    lu[r] -= lu[p] * lu[q]
        for p in range(indptr[i], indptr[i + 1]):
            where[indices[p]] = -1
            if indices[p] == i:
                diag[i] = p
        if diag[i] < 0 or not lu[diag[i]] > 0.0:
            return lu, diag, False
    return lu, diag, True


@numba.njit(cache=True)
def _ilu0_solve(indptr, indices, lu, diag, b):  # pragma: no cover
    """``(LU)^{-1} b`` for the factors of :func:`_ilu0`, ``b`` of shape ``(n, k)``.

    All ``k`` columns in one pass over the factors (the solve is bound by reading them).
    """
    n, k = b.shape
    x = b.copy()
    for i in range(n):
        for p in range(indptr[i], diag[i]):
            v, j = lu[p], indices[p]
            for c in range(k):
                x[i, c] -= v * x[j, c]
    for i in range(n - 1, -1, -1):
        for p in range(diag[i] + 1, indptr[i + 1]):
            v, j = lu[p], indices[p]
            for c in range(k):
                x[i, c] -= v * x[j, c]
        d = lu[diag[i]]
        for c in range(k):
            x[i, c] /= d
    return x


def _gmres(
    A: sparse.csr_matrix, precondition, B: np.ndarray, *, tol: float, restart: int, maxiter: int
) -> tuple[np.ndarray, np.ndarray]:
    r"""Right-preconditioned restarted GMRES for all columns of ``B`` at once (Saad & Schultz 1986).

    Each column has its own Krylov space; the products with ``A`` and the preconditioner
    are taken for all columns together. With right preconditioning the residual GMRES
    minimises is the true one, :math:`\|B_k - A X_k\|`; a column stops once it is at most
    ``tol`` times :math:`\|B_k\|` (classical Gram-Schmidt, applied twice).

    Returns
    -------
    ``(X, relative_residuals)``, ``(n, k)`` and ``(k,)``, the residuals recomputed at the end.
    """
    n = B.shape[0]
    X = np.zeros(B.shape)
    b_norm = np.linalg.norm(B, axis=0)
    target = tol * b_norm
    R = B.copy()
    for _ in range(maxiter):
        beta = np.linalg.norm(R, axis=0)
        active = np.flatnonzero(beta > target)
        if active.size == 0:
            break
        m = active.size
        V = np.zeros((m, restart + 1, n))
        V[:, 0] = (R[:, active] / beta[active]).T
        H = np.zeros((m, restart + 1, restart))
        cs, sn = np.zeros((m, restart)), np.zeros((m, restart))
        g = np.zeros((m, restart + 1))
        g[:, 0] = beta[active]
        steps = np.full(m, restart)
        running = np.ones(m, dtype=bool)
        for j in range(restart):
            W = A @ precondition(V[:, j].T)
            for c in range(m):
                basis, w = V[c, : j + 1], W[:, c]
                h = basis @ w
                w -= basis.T @ h
                h2 = basis @ w
                w -= basis.T @ h2
                H[c, : j + 1, j] = h + h2
                H[c, j + 1, j] = np.linalg.norm(w)
                if H[c, j + 1, j] > 0:
                    V[c, j + 1] = w / H[c, j + 1, j]
                for i in range(j):
                    a, b = H[c, i, j], H[c, i + 1, j]
                    H[c, i, j], H[c, i + 1, j] = cs[c, i] * a + sn[c, i] * b, -sn[c, i] * a + cs[c, i] * b
                a, b = H[c, j, j], H[c, j + 1, j]
                r = np.hypot(a, b)
                cs[c, j], sn[c, j] = (a / r, b / r) if r > 0 else (1.0, 0.0)
                H[c, j, j], H[c, j + 1, j] = r, 0.0
                g[c, j + 1] = -sn[c, j] * g[c, j]
                g[c, j] *= cs[c, j]
                if running[c] and (abs(g[c, j + 1]) <= target[active[c]] or H[c, j, j] == 0):
                    running[c] = False
                    steps[c] = j + 1
            if not running.any():
                break
        update = np.zeros((n, m))
        for c in range(m):
            j = steps[c]
            diagonal = np.diag(H[c, :j, :j])
            j = int(np.argmax(diagonal == 0)) if (diagonal == 0).any() else j
            if j:
                y = linalg.solve_triangular(H[c, :j, :j], g[c, :j])
                update[:, c] = V[c, :j].T @ y
        X[:, active] += precondition(update)
        R = B - A @ X
    residuals = np.linalg.norm(R, axis=0) / np.where(b_norm > 0, b_norm, 1.0)
    return X, residuals


class _LinearSolver:
    """``(I - Q)^{-1} B``, by SuperLU or by GMRES (all columns at once) with an incomplete-LU preconditioner.

    ``solver="auto"`` factorises exactly up to :data:`ITERATIVE_ABOVE` unknowns and solves
    iteratively above (CellRank solves these systems by GMRES too, preconditioned when it has
    PETSc). Built once, it serves several right-hand sides (fates, then absorption times).
    The iterative solve works on the cells in flow order (:func:`_flow_order`) with an
    ILU(0) preconditioner (:func:`_ilu0`).
    """

    def __init__(self, A: sparse.spmatrix, *, solver: Solver = "auto", tol: float = ITERATIVE_RTOL) -> None:
        if solver not in _SOLVERS:
            msg = f"Invalid option {solver!r} for `solver`. Valid options are: {list(_SOLVERS)}."
            raise ValueError(msg)
        if not 0 < tol < 1:
            msg = f"Expected a tolerance `tol` between 0 and 1, found {tol!r}."
            raise ValueError(msg)
        if solver == "auto":
            solver = "iterative" if A.shape[0] > ITERATIVE_ABOVE else "direct"
        self.method = solver
        self.tol = tol
        if solver == "direct":
            self._lu = _factor(A)
            return
        A = sparse.csr_matrix(A)
        self._order = _flow_order(A)
        A = A[self._order][:, self._order]
        A.sort_indices()
        self._A = A
        indptr, indices = A.indptr, A.indices
        lu, diag, ok = _ilu0(indptr, indices, A.data)
        if not ok:
            msg = f"Some cells reach no terminal state: {_UNREACHABLE}"
            raise InputError(msg)
        self._precondition = lambda b: _ilu0_solve(indptr, indices, lu, diag, np.ascontiguousarray(b))

    @property
    def description(self) -> str:
        """How the systems are solved, for ``uns['fwd_estimator_params']``."""
        if self.method == "direct":
            return "direct (SuperLU)"
        return f"iterative (GMRES + ILU(0) in flow order, relative residual <= {self.tol:g})"

    def _restart(self, n_columns: int) -> int:
        """GMRES's restart length: :data:`_GMRES_RESTART`, fewer where the Krylov vectors would pass 0.5 GB."""
        fits = int(_KRYLOV_BYTES // (8 * self._A.shape[0] * n_columns))
        return int(np.clip(fits, 20, _GMRES_RESTART))

    def solve(self, B: np.ndarray) -> np.ndarray:
        """``(I - Q)^{-1} B`` for ``B`` of shape ``(n, k)`` or ``(n,)``."""
        B = np.asarray(B, dtype=np.float64)
        if self.method == "direct":
            return self._lu.solve(B)
        cols = B.reshape(B.shape[0], -1)[self._order]
        # GMRES's vector operations are short BLAS calls: threads only add overhead (and
        # busy-waiting CPU time on a loaded machine)
        with threadpool_limits(limits=1, user_api="blas"):
            X, residuals = _gmres(
                self._A, self._precondition, cols, tol=self.tol, restart=self._restart(cols.shape[1]),
                maxiter=_GMRES_MAXITER,
            )
        if (residuals > self.tol).any():
            msg = (
                f"The iterative solve of I - Q stopped at a relative residual of {residuals.max():.2g}, above "
                f"the tolerance {self.tol:g}. Either {_UNREACHABLE} Or pass "
                "solver='direct' (exact, but its memory grows fast with the cells) or a larger `tol`."
            )
            raise InputError(msg)
        out = np.empty_like(X)
        out[self._order] = X
        return out.reshape(B.shape)


def _absorption(
    transitions: sparse.spmatrix, states: IntArray, *, solver: Solver, tol: float, with_times: bool
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Fate probabilities (and conditional absorption times) from one factorisation of ``I - Q``."""
    A, S, trans, n_states = _absorbing_split(transitions, states)
    lin = _LinearSolver(A, solver=solver, tol=tol)
    labels = np.asarray(states, dtype=np.int64)
    term = np.flatnonzero(labels >= 0)
    # round-off (LU or the iterative tolerance) can leave -1e-17: probabilities are clipped
    B = np.clip(lin.solve(S), 0.0, None)
    out = np.zeros((labels.size, n_states))
    out[trans] = B
    out[term, labels[term]] = 1.0
    sums = out.sum(axis=1, keepdims=True)
    bad = ~np.isclose(sums.ravel(), 1.0, atol=1e-3)
    if bad.any():
        msg = (
            f"{int(bad.sum())} cells reach no terminal state (their absorption probabilities sum to "
            f"{sums.ravel()[bad].min():.3g}): {_UNREACHABLE}"
        )
        raise InputError(msg)
    times = None
    if with_times:
        H = lin.solve(B)
        times = np.full((labels.size, n_states), np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            times[trans] = np.where(B > 0, H / np.where(B > 0, B, 1.0), np.inf)
        times[term, labels[term]] = 0.0
    return out / sums, times, lin.description


def absorption_probabilities(
    transitions: sparse.spmatrix, states: IntArray, *, solver: Solver = "auto", tol: float = ITERATIVE_RTOL
) -> np.ndarray:
    """Probability that a walk from each cell ends in each absorbing state.

    Parameters
    ----------
    transitions
        ``(n_obs, n_obs)`` row-stochastic matrix.
    states
        ``(n_obs,)`` int: the absorbing state of each terminal cell (0, 1, ...), -1 for
        transient cells. Terminal cells are made absorbing: their rows are ignored.
    solver
        ``"direct"``: one sparse LU factorisation (SuperLU); ``"iterative"``: GMRES
        preconditioned by an incomplete LU without fill, cells in flow order; ``"auto"``: direct up to
        :data:`ITERATIVE_ABOVE` transient cells, iterative above.
    tol
        Iterative solve: each column's relative residual ``||(I - Q) x - b|| / ||b||`` is
        at most this (checked after the solve; an :class:`~explorer._types.InputError` if
        it cannot be reached).

    Returns
    -------
    ``(n_obs, n_states)`` float64 rows summing to 1: :math:`B = (I - Q)^{-1} S` for transient
    cells (``Q`` the transient block, ``S`` the transient-to-state sums), one-hot for
    terminal cells.
    """
    return _absorption(transitions, states, solver=solver, tol=tol, with_times=False)[0]


def absorption_times(
    transitions: sparse.spmatrix, states: IntArray, *, solver: Solver = "auto", tol: float = ITERATIVE_RTOL
) -> np.ndarray:
    """Mean number of steps until absorption, per state reached (CellRank's ``<state>_mean``).

    Parameters
    ----------
    transitions, states, solver, tol
        As for :func:`absorption_probabilities`.

    Returns
    -------
    ``(n_obs, n_states)`` float64: for transient cell :math:`i` and state :math:`k`, the
    expected steps of the walks from :math:`i` that end in :math:`k`,
    :math:`m_k = ((I - Q)^{-1} B_k) / B_k` (inf where :math:`B_{ik} = 0`); 0 for the cells of
    state :math:`k`, inf for the cells of other states.
    """
    return _absorption(transitions, states, solver=solver, tol=tol, with_times=True)[1]


def mean_absorption_time(
    transitions: sparse.spmatrix, states: IntArray, *, solver: Solver = "auto", tol: float = ITERATIVE_RTOL
) -> np.ndarray:
    """Mean number of steps until any absorbing state is reached, ``(I - Q)^{-1} 1``.

    Parameters
    ----------
    transitions, states, solver, tol
        As for :func:`absorption_probabilities`.

    Returns
    -------
    ``(n_obs,)`` float64; 0 for absorbing cells.
    """
    A, _, trans, _ = _absorbing_split(transitions, states)
    out = np.zeros(np.asarray(states).size)
    out[trans] = _LinearSolver(A, solver=solver, tol=tol).solve(np.ones(trans.size))
    return out


# --------------------------------------------------------------------------------------
# drivers
# --------------------------------------------------------------------------------------


def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN kept)."""
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


def lineage_drivers(
    expression: np.ndarray | sparse.spmatrix,
    fate_probabilities: np.ndarray,
    *,
    names: Sequence[str],
    gene_names: Sequence[str] | pd.Index,
    confidence_level: float = 0.95,
) -> pd.DataFrame:
    """Correlation of each gene with each fate probability (CellRank's ``compute_lineage_drivers``).

    Parameters
    ----------
    expression
        ``(n_obs, n_vars)`` expression (CellRank uses ``adata.X``).
    fate_probabilities
        ``(n_obs, n_states)``.
    names
        The states' names.
    gene_names
        ``(n_vars,)`` names for the index.
    confidence_level
        Of the Fisher-z confidence interval.

    Returns
    -------
    DataFrame indexed by gene with ``<state>_corr``, ``<state>_pval`` (two-sided, Fisher z),
    ``<state>_qval`` (Benjamini-Hochberg over genes), ``<state>_ci_low`` and
    ``<state>_ci_high`` per state, in that order (CellRank's columns). Constant genes get NaN.
    """
    Y = np.asarray(fate_probabilities, dtype=np.float64)
    n = Y.shape[0]
    if sparse.issparse(expression):
        E = sparse.csc_matrix(expression, dtype=np.float64)
        mean = np.asarray(E.mean(axis=0)).ravel()
        sq = np.asarray(E.multiply(E).sum(axis=0)).ravel()
        cross = np.asarray(E.T @ Y)
    else:
        E = np.asarray(expression, dtype=np.float64)
        mean = E.mean(axis=0)
        sq = (E * E).sum(axis=0)
        cross = E.T @ Y
    x_ss = sq - n * mean**2
    # a constant gene leaves only round-off in sum(x^2) - n mean^2: no correlation (NaN)
    x_ss = np.where(x_ss > 1e-10 * sq, x_ss, 0.0)
    y_mean = Y.mean(axis=0)
    y_ss = ((Y - y_mean) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = (cross - n * np.outer(mean, y_mean)) / np.sqrt(np.outer(np.maximum(x_ss, 0.0), y_ss))
    corr[~np.isfinite(corr)] = np.nan
    corr = np.clip(corr, -1.0, 1.0)
    z_crit = stats.norm.ppf(confidence_level + (1 - confidence_level) / 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        fisher = np.arctanh(corr)
    se = 1.0 / np.sqrt(max(n - 3, 1))
    pval = 2 * stats.norm.cdf(-np.abs(fisher / se))
    low, high = np.tanh(fisher - z_crit * se), np.tanh(fisher + z_crit * se)
    columns = {}
    for k, name in enumerate(names):
        columns[f"{name}_corr"] = corr[:, k]
    for k, name in enumerate(names):
        columns[f"{name}_pval"] = pval[:, k]
        columns[f"{name}_qval"] = _bh(pval[:, k])
        columns[f"{name}_ci_low"] = low[:, k]
        columns[f"{name}_ci_high"] = high[:, k]
    return pd.DataFrame(columns, index=pd.Index(gene_names))


# --------------------------------------------------------------------------------------
# AnnData wrapper
# --------------------------------------------------------------------------------------


def drop_fates(adata: AnnData) -> list[str]:
    """Remove from ``adata`` what :func:`compute_fates` writes (CellRank 2's fates keys), in place.

    For when the velocity they were computed from is replaced: fates of an earlier fit beside
    a new velocity would be read by CellRank (and the app) as this fit's.

    Returns
    -------
    The keys removed, as ``"obs['term_states_fwd']"``...; empty where there were none.
    """
    o, m = Key.obs, Key.obsm
    states = (o.MACROSTATES, o.TERMINAL_STATES, o.INITIAL_STATES)
    where = {
        "obs": (adata.obs, (*states, o.TERMINAL_STATES_PROBS, o.INITIAL_STATES_PROBS)),
        "obsm": (adata.obsm, (m.FATE_PROBABILITIES, m.ABSORPTION_TIMES, m.MACROSTATES_MEMBERSHIPS,
                              m.TERMINAL_STATES_MEMBERSHIPS, m.INITIAL_STATES_MEMBERSHIPS, m.SCHUR_VECTORS)),
        "varm": (adata.varm, (Key.varm.LINEAGE_DRIVERS,)),
        "uns": (adata.uns, (*(Key.uns.colors(k) for k in states), Key.uns.COARSE_TRANSITIONS,
                            Key.uns.SCHUR_MATRIX, Key.uns.EIGENDECOMPOSITION, Key.uns.ESTIMATOR_PARAMS)),
    }
    return drop_keys(where)


class NoTerminalState(InputError):
    """No macrostate is stable enough to be terminal.

    ``macrostates`` holds the :class:`Macrostates` found, so that a caller can offer them to
    choose the terminal states from (:func:`compute_fates`'s ``terminal_states`` and ``macro``).
    """

    def __init__(self, message: str, macrostates: Macrostates) -> None:
        super().__init__(message)
        self.macrostates = macrostates


@dataclass(frozen=True, slots=True)
class Fates:
    """What :func:`compute_fates` found (it also writes it to the AnnData)."""

    macrostates: Macrostates
    terminal_states: list[str]
    initial_states: list[str]
    fate_probabilities: np.ndarray
    absorption_times: pd.DataFrame


def compute_fates(
    adata: AnnData,
    *,
    n_states: int | None = None,
    n_cells: int = DEFAULT_N_CELLS,
    cluster_key: str | None = Key.obs.CLUSTERS,
    stability_threshold: float = STABILITY_THRESHOLD,
    terminal_states: Sequence[str] | None = None,
    n_initial_states: int = 1,
    driver_layer: str | None = None,
    solver: Solver = "auto",
    tol: float = ITERATIVE_RTOL,
    macro: Macrostates | None = None,
    progress: ProgressCallback | None = None,
) -> Fates:
    """Macrostates, initial/terminal states, fate probabilities, absorption times and drivers.

    Parameters
    ----------
    adata
        Needs a transition matrix in ``obsp['T_fwd']``
        (:func:`explorer.graph.kernels.compute_velocity_kernel`).
    n_states
        Number of macrostates; default :func:`default_n_states` (10, or as many as the
        cells hold, ``n_obs // n_cells``, 2 at least).
    n_cells
        Most typical cells per state.
    cluster_key
        obs column whose categories name the states (None: states are numbered).
    stability_threshold
        Terminal states are the macrostates with a coarse self-transition at least this.
    terminal_states
        Choose the terminal states by name instead (they must be macrostate names).
    n_initial_states
        Number of initial states (smallest coarse stationary probability).
    driver_layer
        Layer whose expression is correlated with the fates; default ``adata.X`` (CellRank's).
    solver, tol
        How ``I - Q`` is solved (:func:`absorption_probabilities`): exactly up to
        :data:`ITERATIVE_ABOVE` transient cells, by GMRES above.
    macro
        Macrostates already computed from this transition matrix with these ``n_cells`` (the
        ``macrostates`` of an earlier :class:`Fates` or :class:`NoTerminalState`): GPCCA is
        not run again and ``n_states`` is theirs. Choosing other terminal states among the
        same macrostates then costs only the absorption (the app does so).
    progress
        Receives one report per step.

    Returns
    -------
    The :class:`Fates`; also sets ``obs['macrostates_fwd']``, ``obs['term_states_fwd']``,
    ``obs['term_states_fwd_probs']``, ``obs['init_states_fwd']``,
    ``obs['init_states_fwd_probs']`` (categoricals, NaN outside the states; probabilities
    float), ``obsm['macrostates_fwd_memberships']``, ``obsm['term_states_fwd_memberships']``,
    ``obsm['init_states_fwd_memberships']``, ``obsm['lineages_fwd']`` (``(n_obs, n_terminal)``
    fate probabilities, columns in the order of ``obs['term_states_fwd']``'s categories),
    ``obsm['absorption_times_fwd']`` (DataFrame, ``<state>_mean``), ``obsm['schur_vectors_fwd']``,
    ``varm['terminal_lineage_drivers']`` (DataFrame), ``uns['<key>_colors']`` for the three
    obs keys, ``uns['coarse_fwd']`` (AnnData of :math:`T_c` with obs ``coarse_init_dist``,
    ``coarse_stat_dist``), ``uns['schur_matrix_fwd']``, ``uns['eigendecomposition_fwd']`` and
    ``uns['fwd_estimator_params']``: CellRank 2's keys and layouts, which
    ``cellrank.estimators.GPCCA.from_adata`` reads.
    """
    if Key.obsp.TRANSITIONS not in adata.obsp:
        msg = (
            f"No transition matrix obsp[{Key.obsp.TRANSITIONS!r}]; adata.obsp has {sorted(adata.obsp)}. "
            "Compute one first (explorer.graph.kernels.compute_velocity_kernel)."
        )
        raise InputError(msg)
    clusters, colors = None, None
    if cluster_key is not None:
        if cluster_key not in adata.obs:
            msg = f"obs[{cluster_key!r}] not found; adata.obs has {list(adata.obs.columns)}."
            raise InputError(msg)
        clusters = adata.obs[cluster_key].astype(str).astype("category")
        if isinstance(adata.obs[cluster_key].dtype, pd.CategoricalDtype):
            clusters = adata.obs[cluster_key].cat.rename_categories(str)
        colors = adata.uns.get(Key.uns.colors(cluster_key))
    T = adata.obsp[Key.obsp.TRANSITIONS]
    if n_states is None:
        n_states = default_n_states(adata.n_obs, n_cells)
    total = 5
    report(progress, 0, total, "macrostates")
    if macro is None:
        macro = macrostates(T, n_states, clusters=clusters, cluster_colors=colors, n_cells=n_cells)
    elif macro.memberships.shape[0] != adata.n_obs:
        msg = f"Expected macrostates of {adata.n_obs} cells, found {macro.memberships.shape[0]}."
        raise ValueError(msg)
    report(progress, 1, total, "terminal states")
    if terminal_states is None:
        term = terminal_state_names(macro, stability_threshold=stability_threshold)
        if not term:
            m, most = len(macro.names), most_states(adata.n_obs, n_cells)
            # more states only where the cells hold them (100 cells hold 3: it said "compute more")
            more = (
                f"ask for more macrostates (up to {most}: `--n-states`, the app's macrostates)"
                if m < most
                else f"use more cells: {adata.n_obs} hold no more than these {m} macrostates"
            )
            msg = (
                f"No macrostate is stable enough to be terminal (coarse self-transitions "
                f"{macro.stability().round(3).to_dict()}, threshold {stability_threshold}). "
                "Lower the threshold (`--stability-threshold` of `explorer fates`), name the terminal "
                f"states (`--terminal-states`), or {more}."
            )
            raise NoTerminalState(msg, macro)
    else:
        term = list(terminal_states)
        unknown = [t for t in term if t not in macro.names]
        if unknown:
            msg = f"Unknown terminal states {unknown}. Valid options are: {macro.names}."
            raise InputError(msg)
    init = [n for n in initial_state_names(macro, n_states=n_initial_states) if n not in term]
    term_cells, term_probs, term_memb = state_cells(macro, term, n_cells=n_cells)
    report(progress, 2, total, "fate probabilities and absorption times")
    codes = np.asarray(term_cells.codes, dtype=np.int64)
    if (codes >= 0).all():
        # 60 cells, two terminal states of 30 typical cells: absorption raised a ValueError
        msg = (
            f"Every cell is among the terminal states' most typical cells ({len(term)} states x "
            f"{n_cells} cells, {adata.n_obs} cells in all): none is left whose fate to compute. Ask "
            "for fewer typical cells a state (`--n-cells`), name fewer terminal states "
            "(`--terminal-states`), or load more cells."
        )
        raise InputError(msg)
    fates, steps, how = _absorption(T, codes, solver=solver, tol=tol, with_times=True)
    report(progress, 3, total, "absorption times")
    times = pd.DataFrame(steps, index=adata.obs_names, columns=[f"{t}_mean" for t in term])
    report(progress, 4, total, "driver genes")
    expr = adata.X if driver_layer is None else adata.layers[driver_layer]
    drivers = lineage_drivers(expr, fates, names=term, gene_names=adata.var_names)
    color_of = dict(zip(macro.names, macro.colors, strict=True))

    # CellRank 2's keys
    adata.obs[Key.obs.MACROSTATES] = pd.Categorical(macro.assignment)
    adata.uns[Key.uns.colors(Key.obs.MACROSTATES)] = np.asarray(macro.colors, dtype=object)
    adata.obsm[Key.obsm.MACROSTATES_MEMBERSHIPS] = macro.memberships
    adata.obs[Key.obs.TERMINAL_STATES] = term_cells
    adata.obs[Key.obs.TERMINAL_STATES_PROBS] = term_probs
    adata.uns[Key.uns.colors(Key.obs.TERMINAL_STATES)] = np.asarray([color_of[t] for t in term], dtype=object)
    adata.obsm[Key.obsm.TERMINAL_STATES_MEMBERSHIPS] = term_memb
    if init:
        init_cells, init_probs, init_memb = state_cells(macro, init, n_cells=n_cells)
        adata.obs[Key.obs.INITIAL_STATES] = init_cells
        adata.obs[Key.obs.INITIAL_STATES_PROBS] = init_probs
        adata.uns[Key.uns.colors(Key.obs.INITIAL_STATES)] = np.asarray(
            [color_of[t] for t in init], dtype=object
        )
        adata.obsm[Key.obsm.INITIAL_STATES_MEMBERSHIPS] = init_memb
    adata.obsm[Key.obsm.FATE_PROBABILITIES] = fates
    adata.obsm[Key.obsm.ABSORPTION_TIMES] = times
    adata.obsm[Key.obsm.SCHUR_VECTORS] = macro.schur_vectors
    adata.uns[Key.uns.SCHUR_MATRIX] = macro.schur_matrix
    adata.uns[Key.uns.EIGENDECOMPOSITION] = {
        "D": macro.eigenvalues,
        "params": {"which": "LR", "k": int(macro.eigenvalues.size), "alpha": 1.0},
    }
    dists = pd.DataFrame({"coarse_init_dist": macro.coarse_initial}, index=macro.names)
    if macro.coarse_stationary is not None:
        dists["coarse_stat_dist"] = macro.coarse_stationary
    adata.uns[Key.uns.COARSE_TRANSITIONS] = ad.AnnData(
        pd.DataFrame(macro.coarse_transitions, index=macro.names, columns=macro.names), obs=dists
    )
    adata.varm[Key.varm.LINEAGE_DRIVERS] = drivers
    adata.uns[Key.uns.ESTIMATOR_PARAMS] = {
        Key.obs.MACROSTATES: {"n_states": int(macro.memberships.shape[1]), "n_cells": int(n_cells),
                              "cluster_key": cluster_key or ""},
        Key.obs.TERMINAL_STATES: {"method": "stability" if terminal_states is None else "set",
                                  "stability_threshold": float(stability_threshold), "n_cells": int(n_cells)},
        Key.obsm.FATE_PROBABILITIES: {"solver": how},
        Key.obsm.ABSORPTION_TIMES: {"solver": how},
        Key.varm.LINEAGE_DRIVERS: {"method": "fisher", "use_raw": False,
                                   "layer": driver_layer or "X"},
    }
    report(progress, total, total, "fates done")
    return Fates(
        macrostates=macro,
        terminal_states=term,
        initial_states=init,
        fate_probabilities=fates,
        absorption_times=times,
    )
