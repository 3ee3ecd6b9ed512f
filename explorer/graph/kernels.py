r"""CellRank's velocity kernel in its three modes, its similarity choices, and the connectivity kernel.

For each cell :math:`i` and each neighbour :math:`j` in the kNN connectivities, a
similarity :math:`s_{ij}(v_i)` between the velocity :math:`v_i` and the displacement
:math:`\delta_{ij} = x_j - x_i` (``Ms``) becomes a transition probability by a softmax
with width :math:`\lambda` (``softmax_scale``):

.. math:: T_{ij} = \frac{\exp(\lambda s_{ij})}{\sum_k \exp(\lambda s_{ik})}.

Similarities (Li et al. 2020, eqs. 4.7-4.9, as CellRank names them):

- ``"correlation"``: Pearson correlation of :math:`v_i` and :math:`\delta_{ij}` (each
  centred over genes);
- ``"cosine"``: cosine of the angle between them;
- ``"dot_product"``: :math:`\delta_{ij}^\top v_i`.

Modes (CellRank 2's ``VelocityKernel.compute_transition_matrix(model=...)``, Lange et al.
2022):

- ``"deterministic"``: the velocity as it is;
- ``"stochastic"``: the velocity is a random vector with a mean :math:`\mu_i` and a
  per-gene variance :math:`\sigma_i^2` (by default the mean and variance of the velocity
  over the cell and its kNN neighbours); :math:`T_{ij}` is the second-order Taylor
  expansion of its expectation,
  :math:`E[T_{ij}] \approx T_{ij}(\mu_i) + \frac12 \sum_g \sigma_{ig}^2\, \partial^2_{g} T_{ij}(\mu_i)`
  (the first-order term vanishes), clipped to [0, 1] and renormalised. CellRank gets
  the Hessian diagonal from ``jax``; here it is written out in closed form (see
  :func:`_stochastic_row`) and computed in one compiled pass.
- ``"monte_carlo"``: the average of :math:`T_{ij}(v)` over ``n_samples`` draws of
  :math:`v`.

CellRank estimates the width as :math:`\lambda = 1 / \mathrm{median}|s_{ij}|` of the
deterministic similarities (:func:`estimate_softmax_scale`). A cell without velocity
moves uniformly to its neighbours, as in CellRank.

:func:`connectivity_transition_matrix` is CellRank's ``ConnectivityKernel`` (density
normalised kNN connectivities) and :func:`~explorer.graph.transition.mix` combines
kernels (CellRank's ``0.8 * vk + 0.2 * ck``). :func:`compute_velocity_kernel` writes the
result to ``obsp['T_fwd']``, CellRank's key, which its estimators read.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numba
import numpy as np
from scipy import sparse

from explorer._types import InputError, report
from explorer.graph.moments import neighbor_weights
from explorer.graph.transition import _dense, _normalize_rows, mix, velocity_gene_mask
from explorer.keys import Key

if TYPE_CHECKING:
    from anndata import AnnData

    from explorer._types import FloatArray, ProgressCallback

logger = logging.getLogger(__name__)

Similarity = Literal["correlation", "cosine", "dot_product"]
KernelMode = Literal["deterministic", "stochastic", "monte_carlo"]
SIMILARITIES: tuple[str, ...] = ("correlation", "cosine", "dot_product")
KERNEL_MODES: tuple[str, ...] = ("deterministic", "stochastic", "monte_carlo")
#: (centre over genes, divide by the norms) for each similarity
_FLAGS = {"correlation": (True, True), "cosine": (False, True), "dot_product": (False, False)}
#: CellRank's default number of velocity draws in ``monte_carlo`` mode
DEFAULT_N_SAMPLES = 1000
#: cells per block of the Monte Carlo kernel: draws are shared within a block
_MC_BLOCK = 64
_PROGRESS_BLOCKS = 16


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        msg = f"Invalid {name} {value!r}. Valid options are: {', '.join(repr(v) for v in valid)}."
        raise ValueError(msg)


def _check_inputs(
    expression: FloatArray, velocity: FloatArray, neighbors: sparse.spmatrix
) -> tuple[np.ndarray, np.ndarray, sparse.csr_matrix]:
    X = np.ascontiguousarray(expression, dtype=np.float64)
    V = np.ascontiguousarray(velocity, dtype=np.float64)
    if X.ndim != 2 or X.shape != V.shape:
        msg = (
            "Expected expression and velocity of the same (n_obs, n_genes) shape, "
            f"found {X.shape} and {V.shape}."
        )
        raise ValueError(msg)
    if not np.isfinite(V).all():
        msg = "Expected finite velocities; drop the genes the model did not fit (velocity_genes)."
        raise ValueError(msg)
    pattern = sparse.csr_matrix(neighbors)
    if pattern.shape != (X.shape[0], X.shape[0]):
        msg = f"Expected a ({X.shape[0]}, {X.shape[0]}) neighbour graph, found {pattern.shape}."
        raise ValueError(msg)
    # every stored entry is a neighbour, a stored 0 too (UMAP connectivities can hold
    # explicit zeros): CellRank iterates the stored indices; the moments use entries > 0 only
    pattern = sparse.csr_matrix(pattern, dtype=np.float64, copy=True)
    pattern.sort_indices()
    if (np.diff(pattern.indptr) == 0).any():
        n_empty = int((np.diff(pattern.indptr) == 0).sum())
        msg = (
            f"Expected every cell to have neighbours, but {n_empty} rows of the neighbour graph are empty. "
            "Recompute the neighbour graph (explorer.graph.neighbors.compute_neighbors)."
        )
        raise ValueError(msg)
    return X, V, pattern


# --------------------------------------------------------------------------------------
# similarities and the deterministic kernel
# --------------------------------------------------------------------------------------


@numba.njit(cache=True, fastmath=False)
def _similarities(X, v, i, nbrs, center, scale, out_s, out_mask):  # pragma: no cover
    """Similarity of ``v`` with ``X[j] - X[i]`` for each ``j`` in ``nbrs`` (CellRank's numpy path).

    ``out_mask[k]`` marks a zero denominator (an identical neighbour or no velocity):
    probability 0 there, as CellRank's masked softmax gives.
    """
    n_genes = X.shape[1]
    v_mean = 0.0
    if center:
        for g in range(n_genes):
            v_mean += v[g]
        v_mean /= n_genes
    v_norm2 = 0.0
    for g in range(n_genes):
        d = v[g] - v_mean
        v_norm2 += d * d
    v_norm = np.sqrt(v_norm2)
    for k in range(nbrs.shape[0]):
        j = nbrs[k]
        w_mean = 0.0
        if center:
            for g in range(n_genes):
                w_mean += X[j, g] - X[i, g]
            w_mean /= n_genes
        dot = 0.0
        w_norm2 = 0.0
        for g in range(n_genes):
            w = X[j, g] - X[i, g] - w_mean
            dot += w * (v[g] - v_mean)
            w_norm2 += w * w
        if scale:
            denom = v_norm * np.sqrt(w_norm2)
            if denom == 0.0:
                out_s[k] = 0.0
                out_mask[k] = True
            else:
                out_s[k] = dot / denom
                out_mask[k] = False
        else:
            out_s[k] = dot
            out_mask[k] = False


@numba.njit(cache=True)
def _softmax(s, mask, softmax_scale, out):  # pragma: no cover
    best = -np.inf
    for k in range(s.shape[0]):
        if not mask[k] and softmax_scale * s[k] > best:
            best = softmax_scale * s[k]
    total = 0.0
    for k in range(s.shape[0]):
        if mask[k]:
            out[k] = 0.0
        else:
            out[k] = np.exp(softmax_scale * s[k] - best)
            total += out[k]
    if total > 0:
        for k in range(s.shape[0]):
            out[k] /= total
    return total > 0


@numba.njit(parallel=True, cache=True)
def _deterministic_kernel(  # pragma: no cover
    X, V, indptr, indices, center, scale, softmax_scale, first, last, probs, logits
):
    for i in numba.prange(first, last):
        start, end = indptr[i], indptr[i + 1]
        n = end - start
        v = V[i]
        moving = False
        for g in range(v.shape[0]):
            if v[g] != 0.0:
                moving = True
                break
        if not moving:
            for k in range(n):
                probs[start + k] = 1.0 / n
                logits[start + k] = 0.0
            continue
        s = np.empty(n)
        mask = np.empty(n, dtype=np.bool_)
        _similarities(X, v, i, indices[start:end], center, scale, s, mask)
        p = np.empty(n)
        ok = _softmax(s, mask, softmax_scale, p)
        for k in range(n):
            probs[start + k] = p[k] if ok else 1.0 / n
            logits[start + k] = s[k]


def _as_matrix(values: np.ndarray, pattern: sparse.csr_matrix) -> sparse.csr_matrix:
    out = sparse.csr_matrix((values, pattern.indices.copy(), pattern.indptr.copy()), shape=pattern.shape)
    out.eliminate_zeros()
    return out


def velocity_similarities(
    expression: FloatArray,
    velocity: FloatArray,
    neighbors: sparse.spmatrix,
    *,
    similarity: Similarity = "correlation",
) -> sparse.csr_matrix:
    """Similarity of each cell's velocity with the displacement to each neighbour (CellRank's logits).

    Parameters
    ----------
    expression
        ``(n_obs, n_genes)`` expression the displacements are taken in (``layers['Ms']``).
    velocity
        ``(n_obs, n_genes)`` finite velocities of the same genes.
    neighbors
        ``(n_obs, n_obs)`` graph whose stored entries are the pairs to score
        (``obsp['connectivities']``).
    similarity
        ``"correlation"``, ``"cosine"`` or ``"dot_product"``.

    Returns
    -------
    ``(n_obs, n_obs)`` CSR float64 similarities on the pattern of ``neighbors``, without
    stored zeros (pairs that cannot be scored are left out).
    """
    _check_choice("similarity", similarity, SIMILARITIES)
    X, V, pattern = _check_inputs(expression, velocity, neighbors)
    probs = np.zeros(pattern.nnz)
    logits = np.zeros(pattern.nnz)
    center, scale = _FLAGS[similarity]
    _deterministic_kernel(
        X, V, pattern.indptr.astype(np.int64), pattern.indices.astype(np.int64), center, scale, 1.0,
        0, X.shape[0], probs, logits,
    )
    return _as_matrix(logits, pattern)


def estimate_softmax_scale(
    expression: FloatArray,
    velocity: FloatArray,
    neighbors: sparse.spmatrix,
    *,
    similarity: Similarity = "correlation",
) -> float:
    """CellRank's kernel width: one over the median absolute non-zero similarity.

    Returns
    -------
    ``1 / median(|s_ij|)`` over the scored pairs of the deterministic similarities.
    """
    logits = velocity_similarities(expression, velocity, neighbors, similarity=similarity)
    values = np.abs(logits.data)
    values = values[values > 0]
    if values.size == 0:
        msg = (
            "No cell's velocity has a non-zero similarity with any neighbour, so no kernel width can be "
            "estimated: the velocities are all zero. Fit a velocity model first, or pass softmax_scale=."
        )
        raise InputError(msg)
    return float(1.0 / np.median(values))


# --------------------------------------------------------------------------------------
# the stochastic kernel: second-order expansion in closed form
# --------------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _derivatives(d, w_norm, s, v, r, r2, lam, extra, scale):  # pragma: no cover
    """``(A, B)`` of :func:`_stochastic_row` for one neighbour and gene: the first and second
    derivative of the softmax argument by the gene's velocity ``v`` (centred), with ``d`` the
    neighbour's (centred) displacement, ``w_norm`` its norm and ``s`` its similarity."""
    if not scale:
        return lam * d, 0.0
    c = d / w_norm
    u = v / r
    a = lam * (c - s * u) / r
    b = lam * (3.0 * s * u * u - 2.0 * u * c - s + extra * s) / r2
    return a, b


@numba.njit(cache=True)
def _stochastic_row(X, mu, var, i, nbrs, center, scale, lam, p_out):  # pragma: no cover
    r"""Second-order expected transition probabilities of cell ``i`` (CellRank's ``Stochastic``).

    With :math:`a_j = \lambda s_j(v)` and :math:`p = \mathrm{softmax}(a)`, the diagonal of
    the Hessian of :math:`p_j` is

    .. math:: \partial_g^2 p_j = p_j\,[(A_{jg} - \bar A_g)^2 + B_{jg} - \bar B_g
              - (\overline{A^2}_g - \bar A_g^2)]

    with :math:`A = \partial_g a`, :math:`B = \partial_g^2 a` and bars the
    :math:`p`-weighted means over neighbours. For the cosine of :math:`v` with the unit
    displacement :math:`c_j` (:math:`r = |v|`, :math:`u = v / r`, :math:`s_j = c_j^\top u`):
    :math:`A_{jg} = \lambda (c_{jg} - s_j u_g) / r` and
    :math:`B_{jg} = \lambda (3 s_j u_g^2 - 2 u_g c_{jg} - s_j) / r^2`. The correlation is the
    cosine after centring :math:`P = I - 11^\top/n`; as :math:`u` and :math:`c_j` are
    centred, :math:`(PHP)_{gg} = H_{gg} + s_j / (n r^2)`. The dot product has
    :math:`A_{jg} = \lambda \delta_{jg}` and :math:`B = 0`.
    """
    n_genes = X.shape[1]
    n = nbrs.shape[0]
    s = np.empty(n)
    mask = np.empty(n, dtype=np.bool_)
    _similarities(X, mu, i, nbrs, center, scale, s, mask)
    p0 = np.empty(n)
    if not _softmax(s, mask, lam, p0):
        return False
    # unit (centred) velocity and each neighbour's unit (centred) displacement norm
    v_mean = 0.0
    if center:
        for g in range(n_genes):
            v_mean += mu[g]
        v_mean /= n_genes
    r2 = 0.0
    for g in range(n_genes):
        r2 += (mu[g] - v_mean) ** 2
    r = np.sqrt(r2)
    w_mean = np.zeros(n)
    w_norm = np.ones(n)
    for k in range(n):
        j = nbrs[k]
        m = 0.0
        if center:
            for g in range(n_genes):
                m += X[j, g] - X[i, g]
            m /= n_genes
        w_mean[k] = m
        q = 0.0
        for g in range(n_genes):
            d = X[j, g] - X[i, g] - m
            q += d * d
        w_norm[k] = np.sqrt(q)
    extra = 1.0 / n_genes if center else 0.0
    A_bar = np.zeros(n_genes)
    A2_bar = np.zeros(n_genes)
    B_bar = np.zeros(n_genes)
    for k in range(n):
        if mask[k] or p0[k] == 0.0:
            continue
        j = nbrs[k]
        for g in range(n_genes):
            a, b = _derivatives(X[j, g] - X[i, g] - w_mean[k], w_norm[k], s[k], mu[g] - v_mean, r, r2, lam, extra, scale)
            A_bar[g] += p0[k] * a
            A2_bar[g] += p0[k] * a * a
            B_bar[g] += p0[k] * b
    for k in range(n):
        if mask[k] or p0[k] == 0.0:
            p_out[k] = 0.0
            continue
        j = nbrs[k]
        total = 0.0
        for g in range(n_genes):
            if var[g] == 0.0:
                continue
            a, b = _derivatives(X[j, g] - X[i, g] - w_mean[k], w_norm[k], s[k], mu[g] - v_mean, r, r2, lam, extra, scale)
            spread = A2_bar[g] - A_bar[g] * A_bar[g]
            total += var[g] * ((a - A_bar[g]) ** 2 + b - B_bar[g] - spread)
        p = p0[k] + 0.5 * p0[k] * total
        p_out[k] = min(max(p, 0.0), 1.0)
    return True


@numba.njit(parallel=True, cache=True)
def _stochastic_kernel(  # pragma: no cover
    X, mu, var, indptr, indices, center, scale, lam, first, last, probs
):
    for i in numba.prange(first, last):
        start, end = indptr[i], indptr[i + 1]
        n = end - start
        moving = False
        for g in range(mu.shape[1]):
            if mu[i, g] != 0.0:
                moving = True
                break
        p = np.zeros(n)
        ok = moving and _stochastic_row(X, mu[i], var[i], i, indices[start:end], center, scale, lam, p)
        total = 0.0
        for k in range(n):
            if np.isnan(p[k]):
                p[k] = 0.0
            total += p[k]
        if not ok or total == 0.0:
            for k in range(n):
                probs[start + k] = 1.0 / n
        else:
            for k in range(n):
                probs[start + k] = p[k] / total


# --------------------------------------------------------------------------------------
# the Monte Carlo kernel
# --------------------------------------------------------------------------------------


def _monte_carlo_block(
    X: np.ndarray,
    mu: np.ndarray,
    std: np.ndarray,
    pattern: sparse.csr_matrix,
    cells: np.ndarray,
    Z: np.ndarray,
    *,
    center: bool,
    scale: bool,
    lam: float,
) -> np.ndarray:
    """Average softmax probabilities of ``cells`` over the draws ``mu + std * Z`` (float32 BLAS).

    Each similarity needs only inner products with the draws: for a centred
    displacement :math:`w`, :math:`w^\\top v = w^\\top\\mu + (w \\odot \\sigma)^\\top z`, and the
    squared (centred) velocity norm is
    :math:`|\\tilde\\mu|^2 + 2 (\\tilde\\mu\\odot\\sigma)^\\top z + (\\sigma^2)^\\top z^2
    - (\\sigma^\\top z)^2 / n` (without the last term for the cosine).
    """
    n_genes, n_samples = Z.shape
    starts, ends = pattern.indptr[cells], pattern.indptr[cells + 1]
    counts = ends - starts
    rows = np.repeat(cells, counts)
    cols = np.concatenate([pattern.indices[a:b] for a, b in zip(starts, ends, strict=True)])
    W = X[cols] - X[rows]
    if center:
        W -= W.mean(axis=1, keepdims=True)
    sigma = std[cells]
    m = mu[cells] - (mu[cells].mean(axis=1, keepdims=True) if center else 0.0)
    owner = np.repeat(np.arange(cells.size), counts)
    Zf = Z.astype(np.float32)
    dot = (W * mu[rows]).sum(axis=1)[:, None] + ((W * sigma[owner]).astype(np.float32) @ Zf)
    if scale:
        w_norm = np.linalg.norm(W, axis=1)[:, None]
        norm2 = (
            (m * m).sum(axis=1)[:, None]
            + 2.0 * ((m * sigma).astype(np.float32) @ Zf)
            + ((sigma * sigma).astype(np.float32) @ (Zf * Zf))
        )
        if center:
            norm2 = norm2 - ((sigma.astype(np.float32) @ Zf) ** 2) / n_genes
        denom = np.sqrt(np.maximum(norm2, 0.0))[owner] * w_norm
        masked = denom == 0
        s = np.where(masked, 0.0, dot / np.where(masked, 1.0, denom))
    else:
        masked = np.zeros(dot.shape, dtype=bool)
        s = dot
    a = np.where(masked, -np.inf, lam * s)
    # softmax over each cell's neighbours, per draw
    seg = np.concatenate([[0], np.cumsum(counts)])
    best = np.maximum.reduceat(a, seg[:-1], axis=0)
    e = np.exp(a - best[owner])
    e[masked] = 0.0
    z = np.add.reduceat(e, seg[:-1], axis=0)
    p = e / np.where(z > 0, z, 1.0)[owner]
    return p.mean(axis=1)


# --------------------------------------------------------------------------------------
# public array functions
# --------------------------------------------------------------------------------------


def velocity_moments(velocity: FloatArray, connectivities: sparse.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of each cell's velocity over itself and its kNN neighbours.

    CellRank's velocity distribution for the ``stochastic`` and ``monte_carlo`` modes
    (scVelo's ``get_moments`` of the velocity, first order and centred second order, with
    equal weights on the cell and its neighbours).

    Returns
    -------
    ``(mean, variance)``, each ``(n_obs, n_genes)`` float64.
    """
    weights = neighbor_weights(connectivities).astype(np.float64)
    V = np.asarray(velocity, dtype=np.float64)
    mean = np.asarray(weights @ V)
    variance = np.asarray(weights @ (V * V)) - mean * mean
    return mean, variance


def velocity_transition_matrix(
    expression: FloatArray,
    velocity: FloatArray,
    neighbors: sparse.spmatrix,
    *,
    mode: KernelMode = "deterministic",
    similarity: Similarity = "correlation",
    softmax_scale: float | None = None,
    velocity_variance: FloatArray | None = None,
    n_samples: int = DEFAULT_N_SAMPLES,
    seed: int = 0,
    cellrank_noise: bool = True,
    progress: ProgressCallback | None = None,
) -> sparse.csr_matrix:
    r"""Transition matrix of CellRank's ``VelocityKernel`` from arrays.

    Parameters
    ----------
    expression
        ``(n_obs, n_genes)`` expression the displacements are taken in (``layers['Ms']``).
    velocity
        ``(n_obs, n_genes)`` finite velocities. In ``"stochastic"`` and ``"monte_carlo"``
        mode without ``velocity_variance``, the kNN mean and variance of these
        (:func:`velocity_moments`) form each cell's velocity distribution, as in CellRank.
        With ``velocity_variance``, ``velocity`` is taken as the distribution's mean
        (e.g. a VAE posterior's) and used as it is.
    neighbors
        ``(n_obs, n_obs)`` kNN connectivities (``obsp['connectivities']``): their stored
        entries are the neighbours each cell can move to, and they weight the moments.
    mode
        ``"deterministic"``, ``"stochastic"`` or ``"monte_carlo"``.
    similarity
        ``"correlation"``, ``"cosine"`` or ``"dot_product"``.
    softmax_scale
        Kernel width :math:`\lambda`; default CellRank's estimate from the deterministic
        similarities of ``velocity`` (:func:`estimate_softmax_scale`).
    velocity_variance
        ``(n_obs, n_genes)`` per-cell, per-gene variance of the velocity, from a model that
        gives a velocity distribution; skips the neighbourhood estimate.
    n_samples
        Draws per cell in ``"monte_carlo"`` mode (CellRank: 1000).
    seed
        Seed of the draws in ``"monte_carlo"`` mode; the same seed gives the same matrix.
        Draws are shared by blocks of 64 cells (each cell's draws are still independent
        of each other), which lets one matrix product serve the whole block.
    cellrank_noise
        ``monte_carlo`` only. CellRank 2.0.7 draws ``numpy.random.normal(mean, variance)``,
        whose second argument is the standard deviation, so its draws have standard
        deviation equal to the variance; True reproduces that. False draws with standard
        deviation :math:`\sqrt{\sigma^2}`, the distribution the stochastic mode expands.
    progress
        Receives one report per block of cells.

    Returns
    -------
    ``(n_obs, n_obs)`` row-stochastic CSR float64 matrix on the pattern of ``neighbors``.
    """
    _check_choice("mode", mode, KERNEL_MODES)
    _check_choice("similarity", similarity, SIMILARITIES)
    X, V, pattern = _check_inputs(expression, velocity, neighbors)
    if softmax_scale is None:
        softmax_scale = estimate_softmax_scale(X, V, pattern, similarity=similarity)
    if not np.isfinite(softmax_scale) or softmax_scale <= 0:
        msg = f"Expected a positive finite softmax_scale, found {softmax_scale}."
        raise ValueError(msg)
    center, scale = _FLAGS[similarity]
    indptr, indices = pattern.indptr.astype(np.int64), pattern.indices.astype(np.int64)
    n_obs = X.shape[0]
    probs = np.zeros(pattern.nnz)
    n_blocks = min(_PROGRESS_BLOCKS, max(n_obs, 1))
    bounds = np.linspace(0, n_obs, n_blocks + 1).astype(np.int64)

    if mode == "deterministic":
        logits = np.zeros(pattern.nnz)
        for b in range(n_blocks):
            _deterministic_kernel(
                X, V, indptr, indices, center, scale, float(softmax_scale),
                bounds[b], bounds[b + 1], probs, logits,
            )
            report(progress, b + 1, n_blocks, "velocity kernel")
        return _normalized(probs, pattern)

    if velocity_variance is None:
        mean, variance = velocity_moments(V, pattern)
    else:
        mean = V
        variance = np.ascontiguousarray(velocity_variance, dtype=np.float64)
        if variance.shape != V.shape:
            msg = f"Expected velocity_variance of shape {V.shape}, found {variance.shape}."
            raise ValueError(msg)
        if not np.isfinite(variance).all() or (variance < 0).any():
            msg = "Expected finite, non-negative velocity variances."
            raise ValueError(msg)
    variance = np.maximum(variance, 0.0)  # float rounding of E[v^2] - E[v]^2

    if mode == "stochastic":
        for b in range(n_blocks):
            _stochastic_kernel(
                X, mean, variance, indptr, indices, center, scale, float(softmax_scale),
                bounds[b], bounds[b + 1],
                probs,
            )
            report(progress, b + 1, n_blocks, "velocity kernel (stochastic)")
        return _normalized(probs, pattern)

    if n_samples < 1:
        msg = f"Expected n_samples >= 1, found {n_samples}."
        raise ValueError(msg)
    std = variance if cellrank_noise else np.sqrt(variance)
    rng = np.random.default_rng(seed)
    n_mc = max(1, -(-n_obs // _MC_BLOCK))
    for b in range(n_mc):
        cells = np.arange(b * _MC_BLOCK, min((b + 1) * _MC_BLOCK, n_obs))
        Z = rng.standard_normal((X.shape[1], n_samples))
        p = _monte_carlo_block(
            X, mean, std, pattern, cells, Z, center=center, scale=scale, lam=float(softmax_scale)
        )
        probs[pattern.indptr[cells[0]] : pattern.indptr[cells[-1] + 1]] = p
        report(progress, b + 1, n_mc, "velocity kernel (monte carlo)")
    return _normalized(probs, pattern)


def _normalized(probs: np.ndarray, pattern: sparse.csr_matrix) -> sparse.csr_matrix:
    """Rows renormalised in float64 (sums to 1 within rounding) and zeros dropped."""
    T = sparse.csr_matrix((probs, pattern.indices.copy(), pattern.indptr.copy()), shape=pattern.shape)
    sums = np.asarray(T.sum(axis=1)).ravel()
    T = sparse.csr_matrix(sparse.diags(1.0 / np.where(sums > 0, sums, 1.0)) @ T)
    T.eliminate_zeros()
    T.sort_indices()
    return T


def connectivity_transition_matrix(
    connectivities: sparse.spmatrix, *, density_normalize: bool = True
) -> sparse.csr_matrix:
    """CellRank's ``ConnectivityKernel``: the kNN connectivities as a transition matrix.

    Parameters
    ----------
    connectivities
        ``(n_obs, n_obs)`` symmetric kNN connectivities (``obsp['connectivities']``).
    density_normalize
        Divide by the degrees on both sides first, :math:`Q C Q` with
        :math:`Q = \\mathrm{diag}(1 / \\sum_i C_{ij})` (CellRank's default), so dense regions
        do not attract walks.

    Returns
    -------
    ``(n_obs, n_obs)`` row-stochastic CSR float64 matrix; an isolated cell stays put.
    """
    C = sparse.csr_matrix(connectivities, dtype=np.float64, copy=True)
    if C.shape[0] != C.shape[1]:
        msg = f"Expected square (n_obs, n_obs) connectivities, found shape {C.shape}."
        raise ValueError(msg)
    if density_normalize:
        q = np.asarray(C.sum(axis=0)).ravel()
        Q = sparse.diags(1.0 / np.where(q > 0, q, 1.0))
        C = sparse.csr_matrix(Q @ C @ Q)
    C.eliminate_zeros()
    return _normalize_rows(C)


# --------------------------------------------------------------------------------------
# AnnData wrapper
# --------------------------------------------------------------------------------------


def compute_velocity_kernel(
    adata: AnnData,
    *,
    mode: KernelMode = "deterministic",
    similarity: Similarity = "correlation",
    connectivity_weight: float = 0.2,
    softmax_scale: float | None = None,
    vkey: str = Key.layers.VELOCITY,
    xkey: str = Key.layers.MS,
    variance_key: str | None = None,
    n_samples: int = DEFAULT_N_SAMPLES,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> sparse.csr_matrix:
    """CellRank's ``(1 - w) * VelocityKernel + w * ConnectivityKernel``, written to ``obsp['T_fwd']``.

    Parameters
    ----------
    adata
        Needs ``layers[xkey]``, ``layers[vkey]`` and ``obsp['connectivities']``. The genes
        are ``var['<vkey>_genes']`` without NaN velocities, as CellRank chooses them.
    mode, similarity, softmax_scale, n_samples, seed
        See :func:`velocity_transition_matrix`.
    connectivity_weight
        Weight ``w`` in [0, 1] of the connectivity kernel (CellRank's tutorials: 0.2).
    vkey, xkey
        Velocity and expression layers.
    variance_key
        Layer with a per-cell, per-gene velocity variance from a model that gives a
        velocity distribution (mean in ``layers[vkey]``); with it, the stochastic and
        Monte Carlo modes use that distribution instead of the kNN estimate.
    progress
        Receives one report per block of cells.

    Returns
    -------
    The ``(n_obs, n_obs)`` row-stochastic matrix; also sets ``obsp['T_fwd']`` and
    ``uns['T_fwd_params']`` (the kernel's settings, as CellRank records them).
    """
    if not 0.0 <= connectivity_weight <= 1.0:
        msg = f"Expected a connectivity weight in [0, 1], found {connectivity_weight}."
        raise InputError(msg)
    for layer in (xkey, vkey) + ((variance_key,) if variance_key else ()):
        if layer not in adata.layers:
            msg = (
                f"Layer {layer!r} not found; adata.layers has {sorted(adata.layers)}. "
                "Fit a velocity model first (explorer fit)."
            )
            raise InputError(msg)
    if Key.obsp.CONNECTIVITIES not in adata.obsp:
        msg = (
            f"obsp[{Key.obsp.CONNECTIVITIES!r}] not found; adata.obsp has {sorted(adata.obsp)}. "
            "Compute the neighbour graph first (explorer fit does)."
        )
        raise InputError(msg)
    mask = velocity_gene_mask(adata, vkey=vkey)
    conn = sparse.csr_matrix(adata.obsp[Key.obsp.CONNECTIVITIES])
    X = _dense(adata.layers[xkey][:, mask]).astype(np.float64)
    V = _dense(adata.layers[vkey][:, mask]).astype(np.float64)
    var = None if variance_key is None else _dense(adata.layers[variance_key][:, mask]).astype(np.float64)
    if softmax_scale is None:
        softmax_scale = estimate_softmax_scale(X, V, conn, similarity=similarity)
    T = velocity_transition_matrix(
        X, V, conn, mode=mode, similarity=similarity, softmax_scale=softmax_scale, velocity_variance=var,
        n_samples=n_samples, seed=seed, progress=progress,
    )
    if connectivity_weight > 0:
        T = mix((1.0 - connectivity_weight, T), (connectivity_weight, connectivity_transition_matrix(conn)))
    adata.obsp[Key.obsp.TRANSITIONS] = T
    params = {
        "model": mode,
        "similarity": similarity,
        "softmax_scale": float(softmax_scale),
        "connectivity_weight": float(connectivity_weight),
        "n_genes": int(mask.sum()),
        **({"n_samples": int(n_samples), "seed": int(seed)} if mode == "monte_carlo" else {}),
        **({"variance_key": variance_key} if variance_key else {}),
    }
    # CellRank's layout (Kernel.write_to_adata): {"params": ..., "init": ...}
    adata.uns[Key.uns.TRANSITIONS_PARAMS] = {"params": params, "init": {"backward": False}}
    return T
