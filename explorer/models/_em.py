"""Tensor core of the dynamical model: scVelo's EM over many genes at once.

Every tensor is ``(n_genes, n_cells)`` or ``(n_genes, 1)``, so one call fits a whole
batch of genes. The maths follows scVelo's ``DynamicsRecovery`` (Bergen et al. 2020;
theislab/scvelo:scvelo/tools/_em_model_core.py and _em_model_utils.py):

- the unspliced abundance is divided by a per-gene ``scaling`` so that ``u`` and ``s``
  have the same spread; distances are measured in units of ``std_u`` and ``std_s``;
- the E-step assigns each cell a time on the induction branch (from ``(0, 0)`` with
  rate ``alpha`` until the switch time ``t_``) or the repression branch (from the
  switch point with ``alpha = 0``), or one of the two steady states, by projecting
  it onto the analytic curve of :mod:`explorer.kinetics`;
- the M-step lowers scVelo's loss, the mean squared scaled distance of the weighted
  cells to the curve plus its penalty on moving ``gamma / beta`` away from the
  steady-state ratio, with the times held fixed.

Where scVelo runs Nelder-Mead per gene, this core profiles out ``alpha`` and the
``u`` scaling in closed form (the curve is linear in ``alpha``) and moves ``beta``,
``gamma`` and ``t_`` by a vectorised coordinate search, and projects cells by analytic
inversion followed by Gauss-Newton steps. Nothing here reads AnnData.

Every function takes numpy arrays or torch tensors and answers in the same kind: on the
CPU the dynamical model runs numpy around the compiled kernels of
:mod:`explorer.models._em_kernels` (this module never imports torch: a command that fits
on the CPU does not load it); on CUDA, torch. Both run the same code here, and the
tests check that they give the same fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from explorer import kinetics
from explorer.models import _em_kernels

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    #: a numpy array or a torch tensor; one call takes and gives one kind
    Array = np.ndarray | torch.Tensor

#: scVelo clips the logarithm in its analytic time inversion to [eps, 1 - eps]
_LOG_EPS = 1e-6
#: floor for rates, abundances and amplitudes (keeps logs and ratios finite)
_TINY = 1e-8
#: the four states of scVelo's assignment, in the order of its distance array
REPRESSION, INDUCTION, STEADY_OFF, STEADY_ON = 0, 1, 2, 3
#: run the E-step and the profiled loss through the compiled kernels of
#: :mod:`explorer.models._em_kernels` on the CPU (the tests also run the array code)
USE_KERNELS = True


# ---------------------------------------------------------------------------------------------
# numpy or torch: the few operations whose spelling differs


def _is_np(x: Array) -> bool:
    return isinstance(x, np.ndarray)


def _xp(x: Array) -> Any:
    """The array library of ``x``: numpy, or torch (imported already when ``x`` is a tensor)."""
    if isinstance(x, np.ndarray):
        return np
    import torch

    return torch


def _rsum(x: Array) -> Array:
    """Row sums, ``(n, 1)``."""
    return x.sum(1, keepdims=True) if _is_np(x) else x.sum(1, keepdim=True)


def _rmax(x: Array) -> Array:
    """Row maxima, ``(n, 1)``."""
    return x.max(1, keepdims=True) if _is_np(x) else x.amax(1, keepdim=True)


def _rmean(x: Array) -> Array:
    """Row means, ``(n, 1)``."""
    return x.mean(1, keepdims=True) if _is_np(x) else x.mean(1, keepdim=True)


def _clamp(x: Array, lo: Any = None, hi: Any = None) -> Array:
    """``x`` clipped to ``[lo, hi]`` (either may be None), in ``x``'s dtype for a float bound."""
    if not _is_np(x):
        return x.clamp(min=lo, max=hi)
    if lo is not None:
        x = np.maximum(x, lo)
    if hi is not None:
        x = np.minimum(x, hi)
    return x


def _cast(x: Array, like: Array) -> Array:
    """``x`` in the dtype of ``like`` (numbers, or a mask as 1.0/0.0)."""
    return x.astype(like.dtype, copy=False) if _is_np(x) else x.to(like.dtype)


def _f64(x: Array) -> Array:
    return x.astype(np.float64, copy=False) if _is_np(x) else x.double()


def _gather(x: Array, idx: Array) -> Array:
    """``x[i, idx[i, j]]``: each row its own columns."""
    return np.take_along_axis(x, idx, 1) if _is_np(x) else x.gather(1, idx)


def take_columns(x: Array, idx: Array) -> Array:
    """``x[:, idx]``: every row the same columns, C-contiguous for numpy.

    ``x[:, idx]`` of a numpy array is a transposed copy, which every compiled kernel call
    would copy again (0.15-0.2 s of the onset fit's CPU); tensors keep ``x[:, idx]``.
    """
    return np.take(x, idx, axis=1) if _is_np(x) else x[:, idx]


def to_numpy(x: Array) -> np.ndarray:
    """``x`` as a numpy array (a tensor moved to the CPU; an array as it is)."""
    return x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()


def _like(x: np.ndarray, ref: Array) -> Array:
    """A kernel's numpy output in ``ref``'s kind (the kernels run on the CPU only)."""
    if isinstance(ref, np.ndarray):
        return x
    import torch

    return torch.from_numpy(x)


def _compiled(x: Array) -> bool:
    """Whether ``x``'s computations go to the compiled CPU kernels (else: the array code, e.g. on CUDA)."""
    return USE_KERNELS and (_is_np(x) or x.device.type == "cpu")


def _cells(x: Array) -> np.ndarray:
    """``(n_genes, n_cells)`` float32 array as a C-contiguous numpy array (no copy when it is one)."""
    return np.ascontiguousarray(to_numpy(x), dtype=np.float32)


def _genes(x: Array) -> np.ndarray:
    """``(n_genes, 1)`` array as a ``(n_genes,)`` float64 numpy array."""
    return np.ascontiguousarray(to_numpy(x).reshape(-1), dtype=np.float64)


@dataclass(frozen=True, slots=True)
class GeneData:
    """The observations of a batch of genes and scVelo's per-gene weights.

    Attributes
    ----------
    u, s
        ``(n_genes, n_cells)`` unspliced and spliced abundances (``Mu``, ``Ms``).
    weights
        Cells used for fitting, as 1.0/0.0: both abundances positive and below their
        99th percentile (scVelo's ``initialize_weights``). Masks are float so that
        selections are products, much faster than ``torch.where`` on CPU.
    weights_upper
        Weighted cells in the upper third of both axes, where scVelo measures the
        likelihood (1.0/0.0).
    std_u, std_s
        ``(n_genes, 1)`` standard deviations over the weighted cells.
    """

    u: Array
    s: Array
    weights: Array
    weights_upper: Array
    std_u: Array
    std_s: Array

    @property
    def n_weighted(self) -> Array:
        """``(n_genes, 1)`` number of weighted cells (at least 1)."""
        return _cast(_clamp(_rsum(self.weights), 1), self.u)

    def take_cells(self, idx: Array) -> GeneData:
        """Return the same genes on the cells ``idx`` only (standard deviations kept).

        ``idx`` is ``(n,)`` (the same cells for every gene) or ``(n_genes, n)`` (each gene
        its own cells, as :func:`weighted_cells` draws them).
        """

        def take(x: Array) -> Array:
            return _gather(x, idx) if idx.ndim == 2 else take_columns(x, idx)

        return GeneData(
            take(self.u),
            take(self.s),
            take(self.weights),
            take(self.weights_upper),
            self.std_u,
            self.std_s,
        )


def weighted_cells(weights: Array, n: int, *, seed: int) -> Array:
    """``(n_genes, min(n, n_cells))`` cell indices per gene, drawn from the cells that carry its weight.

    A uniform draw without replacement among each gene's weighted cells (``weights >
    0``), topped up with unweighted cells when it has fewer than ``n``. One uniform draw
    for all genes would keep about ``n / n_cells`` of a rare population: a gene
    expressed in 1 % of 50,000 cells would be fitted on 10 cells; this keeps all its
    500. Seeded: the same ``seed`` and weights give the same cells, in numpy and in torch.

    The keys are the numbers of ``torch.rand`` with a generator seeded ``seed`` (mod
    2**32), drawn by numpy: both are MT19937 with the same seeding, and torch makes a
    float32 of the low 24 bits of each 32-bit draw (a test checks they are equal).
    """
    bits = np.random.RandomState(seed % 2**32).randint(0, 2**32, size=tuple(weights.shape), dtype=np.uint32)
    keys = (bits & np.uint32(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)
    k = min(n, weights.shape[1])
    if _is_np(weights):
        # unweighted cells rank after every weighted one
        keys += weights <= 0
        idx = np.argpartition(keys, k - 1, axis=1)[:, :k] if k < keys.shape[1] else None
        if idx is None:
            return np.broadcast_to(np.arange(k), keys.shape).copy()
        idx.sort(axis=1)
        return idx
    import torch

    keys_t = torch.from_numpy(keys).to(weights.device)
    keys_t = keys_t + (weights <= 0).to(keys_t.dtype)
    idx = keys_t.topk(k, dim=1, largest=False).indices
    return idx.sort(dim=1).values


@dataclass(frozen=True, slots=True)
class Params:
    """Kinetic parameters of a batch of genes, each ``(n_genes, 1)``.

    ``beta`` is the splicing rate in units of the scaled unspliced abundance
    ``u / scaling`` (scVelo's internal ``beta``; it reports ``beta / scaling``).
    ``t_`` is the absolute switch time and ``t_on`` the onset of induction.
    """

    alpha: Array
    beta: Array
    gamma: Array
    t_: Array
    scaling: Array
    t_on: Array

    def replace(self, **changes: Array) -> Params:
        """Return a copy with some fields changed."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Params(**values)

    def where(self, mask: Array, other: Params) -> Params:
        """Take ``other``'s value for genes where ``mask`` (``(n_genes, 1)``) is true."""
        xp = _xp(mask)
        return Params(
            **{f.name: xp.where(mask, getattr(other, f.name), getattr(self, f.name)) for f in fields(self)}
        )

    def switch_point(self) -> tuple[Array, Array]:
        """``(u0_, s0_)`` in scaled units: where induction stands at ``t_`` (none if ``t_on >= t_``)."""
        dur = _clamp(self.t_ - self.t_on, 0.0)
        return kinetics.switch_state(dur, self.alpha, self.beta, self.gamma, xp=_xp(dur))


def stack_genes(*parts: Any) -> Any:
    """Join gene batches along the genes: arrays, or :class:`GeneData`, :class:`Moments` or :class:`Params`.

    Every step of the EM is per gene (element-wise, or sums along each gene's cells), so
    a step on the joined genes gives each part the numbers it gives that part alone:
    two fits of the same genes from different starts can run as one (the onset fit).
    """
    first = parts[0]
    if first is None:
        return None
    if not hasattr(first, "shape"):
        joined = {f.name: stack_genes(*(getattr(p, f.name) for p in parts)) for f in fields(first)}
        return type(first)(**joined)
    return np.concatenate(parts) if _is_np(first) else _xp(first).cat(parts)


def take_genes(x: Any, genes: slice) -> Any:
    """The genes ``genes`` of an array, or of a :class:`GeneData`, :class:`Params` or other gene batch.

    Views of the same memory. As for :func:`stack_genes`, every step on the part gives it
    the numbers the step on all genes gives it.
    """
    if x is None:
        return None
    if not hasattr(x, "shape"):
        return type(x)(**{f.name: take_genes(getattr(x, f.name), genes) for f in fields(x)})
    return x[genes]


def split_genes(x: Any, n: int) -> tuple[Any, Any]:
    """:func:`stack_genes`'s inverse for two parts: ``(first n genes, the rest)``."""
    if not hasattr(x, "shape"):
        halves = [split_genes(getattr(x, f.name), n) for f in fields(x)]
        names = [f.name for f in fields(x)]
        return tuple(type(x)(**{name: h[i] for name, h in zip(names, halves, strict=True)}) for i in (0, 1))
    return x[:n], x[n:]


#: below this many cells x genes a step is not worth a second thread
_MIN_SPLIT_ELEMENTS = 1 << 16


def in_two_halves(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with the genes cut in two halves, one computed in a second thread.

    For the EM's serial numpy steps (data preparation, initial guess, read-outs after
    the loop), which leave the second core idle: numpy releases the GIL in its loops
    over these arrays, so the halves run side by side. Every argument with genes
    (arrays with the genes first, or :class:`GeneData`, :class:`Params`) is cut, others
    are passed to both; ``fn`` must be per gene (element-wise, or reductions along each
    gene's cells), and its result (an array, such a dataclass, or a tuple of them) is
    joined: the same numbers as one call, bit for bit. Torch tensors and small batches
    take the one call.
    """
    first = args[0]
    data = first.u if isinstance(first, GeneData) else first
    n = data.shape[0]
    if not _is_np(data) or n < 2 or data.size < _MIN_SPLIT_ELEMENTS:
        return fn(*args)
    from concurrent.futures import ThreadPoolExecutor

    half = n // 2

    def cut(a: Any) -> tuple[Any, Any]:
        per_gene = isinstance(a, np.ndarray) and a.ndim > 0 and a.shape[0] == n
        has_genes = per_gene or isinstance(a, (GeneData, Params, Init))
        return split_genes(a, half) if has_genes else (a, a)

    parts = [cut(a) for a in args]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="explorer-em-half") as pool:
        second = pool.submit(fn, *(p[1] for p in parts))
        one = fn(*(p[0] for p in parts))
        two = second.result()
    if isinstance(one, tuple):
        return tuple(stack_genes(a, b) for a, b in zip(one, two, strict=True))
    return stack_genes(one, two)


# ---------------------------------------------------------------------------------------------
# data preparation and initialisation


def masked_quantile(x: Array, mask: Array, q: float) -> Array:
    """Per-row ``q`` quantile of ``x`` over ``mask`` (linear interpolation, as numpy).

    Rows without any masked-in value give 0.
    """
    xp = _xp(x)
    big = xp.where(mask, x, xp.full_like(x, math.inf))
    if _is_np(big):
        ordered = np.sort(big, axis=1)
    elif big.device.type == "cpu":
        # numpy's vectorised sort: the same values, about 20x faster than torch.sort on CPU
        ordered = _like(np.sort(big.numpy(), axis=1), big)
    else:
        ordered = xp.sort(big, dim=1).values
    n = _rsum(mask)
    pos = q * _cast(_clamp(n - 1, 0), x)
    lo = xp.floor(pos)
    lo = lo.astype(np.int64) if _is_np(lo) else lo.long()
    hi = xp.minimum(lo + 1, _clamp(n - 1, 0))
    frac = pos - _cast(lo, x)
    vlo, vhi = _gather(ordered, lo), _gather(ordered, hi)
    res = vlo + (vhi - vlo) * frac
    return xp.where(n > 0, res, xp.zeros_like(res))


def _masked_mean(x: Array, mask: Array) -> Array:
    xp = _xp(x)
    n = _cast(_clamp(_rsum(mask), 1), x)
    return _rsum(xp.where(mask, x, xp.zeros_like(x))) / n


def _masked_std(x: Array, mask: Array) -> Array:
    mean = _masked_mean(x, mask)
    return _xp(x).sqrt(_masked_mean((x - mean) ** 2, mask))


def prepare(u: Array, s: Array, *, perc: float = 99.0) -> tuple[GeneData, Array]:
    """ScVelo's weights and spreads for each gene.

    Returns
    -------
    The :class:`GeneData` and a ``(n_genes,)`` mask of genes with more than two
    weighted cells (scVelo's ``recoverable``).
    """
    xp = _xp(u)
    weights = (s > 0) & (u > 0)
    ub_s = masked_quantile(s, weights, perc / 100)
    ub_u = masked_quantile(u, weights, perc / 100)
    weights = weights & ((s <= ub_s) | (ub_s <= 0)) & ((u <= ub_u) | (ub_u <= 0))
    recoverable = weights.sum(1) > 2
    std_u, std_s = _masked_std(u, weights), _masked_std(s, weights)
    # scVelo sets both spreads to 1 when either is 0
    degenerate = (std_u == 0) | (std_s == 0)
    std_u = xp.where(degenerate, xp.ones_like(std_u), std_u)
    std_s = xp.where(degenerate, xp.ones_like(std_s), std_s)
    max_u = _rmax(xp.where(weights, u, xp.zeros_like(u)))
    max_s = _rmax(xp.where(weights, s, xp.zeros_like(s)))
    # scVelo measures the likelihood on cells above a third of the weighted maximum
    upper = weights & (u > max_u / 3) & (s > max_s / 3)
    return GeneData(u, s, _cast(weights, u), _cast(upper, u), std_u, std_s), recoverable


def tau_inv(
    u: Array,
    s: Array,
    u0: Array,
    s0: Array,
    alpha: Array,
    beta: Array,
    gamma: Array,
    *,
    use_u: Array,
) -> Array:
    """Time to go from ``(u0, s0)`` to ``(u, s)`` on the curve, by analytic inversion.

    From ``u`` alone where ``use_u``, else from ``s - beta/(gamma-beta) u``, which
    decays with rate ``gamma`` (scVelo's ``tau_inv``; it uses ``u`` when
    ``gamma >= beta``). The ratio inside the log is clipped to ``[eps, 1 - eps]``.
    """
    tau_u, tau_s = _tau_inv_both(u, s, u0, s0, alpha, beta, gamma)
    return _xp(tau_u).where(use_u, tau_u, tau_s)


def _tau_inv_both(
    u: Array,
    s: Array,
    u0: Array,
    s0: Array,
    alpha: Array,
    beta: Array,
    gamma: Array,
) -> tuple[Array, Array]:
    """Both inversions of :func:`tau_inv`: ``(from u, from s)``."""
    xp = _xp(alpha)
    uinf = alpha / beta
    den_u = u0 - uinf
    ratio_u = (u - uinf) / xp.where(xp.abs(den_u) < _TINY, xp.full_like(den_u, -_TINY), den_u)
    tau_u = -xp.log(_clamp(ratio_u, _LOG_EPS, 1 - _LOG_EPS)) / beta
    diff = gamma - beta
    diff = xp.where(xp.abs(diff) < _TINY, xp.full_like(diff, _TINY), diff)
    beta_ = beta / diff
    xinf = alpha / gamma - beta_ * uinf
    den = s0 - beta_ * u0 - xinf
    den = xp.where(xp.abs(den) < _TINY, xp.full_like(den, _TINY), den)
    tau_s = -xp.log(_clamp((s - beta_ * u - xinf) / den, _LOG_EPS, 1 - _LOG_EPS)) / gamma
    return tau_u, tau_s


def ratio_gap(p: Params, ratio: Array) -> Array:
    """``gamma / beta - ratio / scaling``: distance of the fit from the prior ratio.

    scVelo penalises ``gamma / beta`` (scaled units) moving from its initial value with
    the scaling held fixed; here the scaling is re-fitted at every step, so the prior
    ``ratio`` is kept in count units (``gamma / (beta / scaling)``) and converted.
    """
    return p.gamma / p.beta - ratio / p.scaling


@dataclass(frozen=True, slots=True)
class Init:
    """Initial parameters and the prior ratio ``gamma / fit_beta`` (count units) per gene."""

    params: Params
    ratio: Array


def initialize(data: GeneData, *, perc: float = 98.0) -> Init:
    """ScVelo's initial guess (``DynamicsRecovery.initialize``), for all genes at once.

    ``gamma`` is the steady-state slope of ``u / scaling`` on ``s`` over the cells with
    ``s`` in its top 2 %, ``beta = 1``, ``alpha`` puts the induction steady state at the
    mean of the extreme cells, and ``t_`` is the time to reach that point. (scVelo's
    optional bimodality test is not used.)
    """
    u, s, w = data.u, data.s, data.weights > 0
    xp = _xp(u)
    scaling = data.std_u / data.std_s
    us = u / scaling
    weights_s = w & (s >= masked_quantile(s, w, perc / 100))
    weights_u = w & (us >= masked_quantile(us, w, perc / 100))
    zero = xp.zeros_like(s)
    num = _rsum(xp.where(weights_s, us * s, zero))
    den = _clamp(_rsum(xp.where(weights_s, s * s, zero)), _TINY)
    # + 1e-6 avoids beta == gamma (scVelo)
    gamma = _clamp(num / den, _TINY) + 1e-6
    # scVelo nudges extreme initial ratios towards the middle by a factor 1.2
    gamma = xp.where(gamma < 0.05 / scaling, gamma * 1.2, xp.where(gamma > 1.5 / scaling, gamma / 1.2, gamma))
    beta = xp.ones_like(gamma)
    u_inf = _clamp(_masked_mean(us, weights_u | weights_s), _TINY)
    s_inf = _clamp(_masked_mean(s, weights_s), _TINY)
    alpha = u_inf * beta
    zero1 = xp.zeros_like(alpha)
    t_ = tau_inv(u_inf, s_inf, zero1, zero1, alpha, beta, gamma, use_u=gamma >= beta)
    params = Params(alpha, beta, gamma, t_, scaling, zero1)
    return Init(params, gamma / beta * scaling)


def initialize_shape(data: GeneData, init: Init, *, factors: tuple[float, ...], n_newton: int = 2) -> Init:
    """Choose the curvature of each gene's curve by a grid over the ``u`` scaling.

    In scaled units the phase portrait's shape depends only on ``beta / gamma``, which the
    ``u`` scaling sets for a given steady-state slope. Like scVelo's
    ``initialize_scaling`` (which tries 4 values around ``std_u / std_s`` twice), each
    factor ``k`` multiplies ``scaling`` and ``beta`` together (keeping the slope in count
    units), every cell is projected, and each gene keeps the factor with the lowest loss.
    The prior ratio becomes the chosen ``gamma / beta``.
    """
    p0 = init.params
    xp = _xp(p0.alpha)
    mom = moments(data)
    best, best_loss = p0, None
    for k in factors:
        beta = p0.beta * k
        cand = p0.replace(beta=beta, scaling=p0.scaling * k)
        u_inf = cand.alpha / beta
        zero = xp.zeros_like(beta)
        # the switch time puts the end of induction at the initial extreme point
        s_inf = kinetics.switch_state(p0.t_, p0.alpha, p0.beta, p0.gamma, xp=xp)[1]
        t_ = tau_inv(
            u_inf * (1 - 1e-3), s_inf, zero, zero, cand.alpha, beta, cand.gamma, use_u=cand.gamma >= beta
        )
        cand = cand.replace(t_=_clamp(t_, _TINY))
        ratio = cand.gamma / cand.beta * cand.scaling
        a = assign(data, cand, n_newton=n_newton)
        loss = em_loss(data, mom, cand, a.dist, ratio)
        if best_loss is None:
            best, best_loss = cand, loss
        else:
            better = loss < best_loss
            best, best_loss = best.where(better, cand), xp.where(better, loss, best_loss)
    return Init(best, best.gamma / best.beta * best.scaling)


# ---------------------------------------------------------------------------------------------
# E-step: time assignment by projection


def _branch_distance(
    data: GeneData, p: Params, tau: Array, u0: Array, s0: Array, alpha: Array
) -> tuple[Array, Array, Array]:
    """Squared scaled distance of each cell to the branch point at ``tau``, and the point."""
    ut, st = kinetics.solution(tau, u0, s0, alpha, p.beta, p.gamma, xp=_xp(tau))
    du = (data.u - p.scaling * ut) / data.std_u
    ds = (data.s - st) / data.std_s
    return du * du + ds * ds, ut, st


def _project_branch(
    data: GeneData,
    p: Params,
    u0: Array,
    s0: Array,
    alpha: Array,
    tau_max: Array,
    *,
    n_newton: int,
) -> tuple[Array, Array]:
    """Closest point of one branch to each cell: ``(tau, squared distance)``.

    Starts from the better of the two analytic inversions (from ``u`` and from ``s``)
    and takes Gauss-Newton steps on the distance, keeping a step only where it helps.
    """
    xp = _xp(data.u)
    us = data.u / p.scaling
    best = None
    # both inversions at once (each is tau_inv with use_u all true / all false)
    for tau in _tau_inv_both(us, data.s, u0, s0, alpha, p.beta, p.gamma):
        tau = xp.minimum(_clamp(tau, 0.0), tau_max)
        d, ut, st = _branch_distance(data, p, tau, u0, s0, alpha)
        if best is None:
            best = (tau, d, ut, st)
        else:
            better = _less(d, best[1])
            best = tuple(_pick(better, new, old) for new, old in zip((tau, d, ut, st), best, strict=True))
    tau, d, ut, st = best
    su, ss = data.std_u / p.scaling, data.std_s
    for _ in range(n_newton):
        ru, rs = (ut - us) / su, (st - data.s) / ss
        ju = (alpha - p.beta * ut) / su
        js = (p.beta * ut - p.gamma * st) / ss
        step = (ru * ju + rs * js) / (ju * ju + js * js + _TINY)
        new = xp.minimum(_clamp(tau - step, 0.0), tau_max)
        d_new, ut_new, st_new = _branch_distance(data, p, new, u0, s0, alpha)
        better = _less(d_new, d)
        tau, ut, st = _pick(better, new, tau), _pick(better, ut_new, ut), _pick(better, st_new, st)
        d = xp.minimum(d_new, d)
    return tau, d


@dataclass(frozen=True, slots=True)
class Assignment:
    """Per cell and gene: absolute time ``t``, state (0-3) and squared distance."""

    t: Array
    state: Array
    dist: Array


def assign(
    data: GeneData,
    p: Params,
    *,
    n_newton: int = 2,
    t_prev: Array | None = None,
    smooth: Callable[[Array], Array] | None = None,
) -> Assignment:
    """E-step: scVelo's four-state time assignment for every cell and gene.

    Each cell is projected onto the induction branch (time ``t_on + tau``), the
    repression branch (``t_ + tau_``), the lower steady state (``(0, 0)``, time 0) and
    the upper one (the switch point, time ``t_``), and takes the closest (scVelo's
    ``assign_timepoints``). ``t_prev``, if given, is kept where it is closer still, so
    the EM loss cannot rise. ``smooth``, a callable averaging ``(n_genes, n_cells)``
    over each cell's neighbours, compares neighbourhood-averaged distances instead
    (scVelo's ``fit_connected_states``).
    """
    if _compiled(data.u):
        if smooth is None:
            return _assign_compiled(data, p, n_newton=n_newton, t_prev=t_prev)
        dists, times = _branch_states_compiled(data, p, n_newton=n_newton)
    else:
        dists, times = _branch_states(data, p, n_newton=n_newton)
    xp = _xp(data.u)
    crits = dists if smooth is None else tuple(smooth(d) for d in dists)
    # running minimum over the states (ties keep the earlier state, as argmin does)
    state = xp.zeros_like(dists[0])
    t, dist, crit = times[0], dists[0], crits[0]
    for k in range(1, 4):
        better = _less(crits[k], crit)
        state = state + better * (k - state)
        t = t + better * (times[k] - t)
        dist = dist + better * (dists[k] - dist)
        crit = xp.minimum(crits[k], crit)
    if t_prev is not None and smooth is None:
        d_prev = point_distance(data, p, t_prev)
        keep = _less(d_prev, dist)
        t = t + keep * (t_prev - t)
        dist = xp.minimum(d_prev, dist)
        state = state + keep * (state_of(t_prev, p) - state)
    state = xp.round(state)
    return Assignment(t, state.astype(np.int8) if _is_np(state) else state.to(xp.int8), dist)


def _branch_states(
    data: GeneData, p: Params, *, n_newton: int
) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """Distances to the four states (repression, induction, off, on) and their times, as arrays."""
    xp = _xp(p.alpha)
    zero = xp.zeros_like(p.alpha)
    dur = _clamp(p.t_ - p.t_on, 0.0)
    tau, d_ind = _project_branch(data, p, zero, zero, p.alpha, dur, n_newton=n_newton)
    u0_, s0_ = p.switch_point()
    # the repression branch is followed until u has decayed to 1e-4 of its start
    rate = _clamp(xp.minimum(p.beta, p.gamma), _TINY)
    tau_, d_rep = _project_branch(data, p, u0_, s0_, zero, math.log(1e4) / rate, n_newton=n_newton)
    du_off, ds_off = data.u / data.std_u, data.s / data.std_s
    d_off = du_off * du_off + ds_off * ds_off
    du_on, ds_on = (data.u - p.scaling * u0_) / data.std_u, (data.s - s0_) / data.std_s
    d_on = du_on * du_on + ds_on * ds_on
    dists = (d_rep, d_ind, d_off, d_on)
    times = (p.t_ + tau_, p.t_on + tau, xp.zeros_like(tau), _expand(p.t_, tau))
    return dists, times


def _expand(x: Array, like: Array) -> Array:
    """``(n_genes, 1)`` ``x`` as a view of ``like``'s shape."""
    return np.broadcast_to(x, like.shape) if _is_np(x) else x.expand_as(like)


def _run_assign_kernel(
    data: GeneData, p: Params, *, n_newton: int, t_prev: Array | None, keep_all: bool
) -> tuple[np.ndarray, ...]:
    """Call :func:`explorer.models._em_kernels.assign_states`: ``(t, state, dist, dists, times)``."""
    shape = (4, *data.u.shape) if keep_all else (1, 1, 1)
    dists = np.empty(shape, dtype=np.float32)
    times = np.empty((2, *shape[1:]), dtype=np.float32)
    prev = _cells(t_prev) if t_prev is not None else np.empty((1, 1), dtype=np.float32)
    t, state, dist = _em_kernels.assign_states(
        _cells(data.u), _cells(data.s), _genes(data.std_u), _genes(data.std_s),
        _genes(p.alpha), _genes(p.beta), _genes(p.gamma), _genes(p.t_), _genes(p.scaling), _genes(p.t_on),
        n_newton, prev, t_prev is not None, dists, times,
    )  # fmt: skip
    return t, state, dist, dists, times


def _assign_compiled(data: GeneData, p: Params, *, n_newton: int, t_prev: Array | None) -> Assignment:
    """:func:`assign` without ``smooth``, in one compiled pass (CPU)."""
    t, state, dist, _, _ = _run_assign_kernel(data, p, n_newton=n_newton, t_prev=t_prev, keep_all=False)
    ref = data.u
    return Assignment(_like(t, ref), _like(state, ref), _like(dist, ref))


def _branch_states_compiled(
    data: GeneData, p: Params, *, n_newton: int
) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """:func:`_branch_states` through the compiled kernel (CPU)."""
    _, _, _, dists, times = _run_assign_kernel(data, p, n_newton=n_newton, t_prev=None, keep_all=True)
    d, tau = _like(dists, data.u), _like(times, data.u)
    # time 0 of the off state, broadcast (assign only blends it in)
    zero = _xp(d).zeros_like(tau[0, :1, :1])
    return (d[0], d[1], d[2], d[3]), (tau[0], tau[1], zero, _expand(p.t_, tau[0]))


def state_of(t: Array, p: Params) -> Array:
    """Induction (1) before the switch time, repression (0) after it."""
    return _less(t, p.t_) * (INDUCTION - REPRESSION) + REPRESSION


def curve(t: Array, p: Params) -> tuple[Array, Array]:
    """``(u(t), s(t))`` in scaled units (multiply ``u`` by ``scaling`` for counts)."""
    return _curve(t, p, p.alpha)


def _curve(t: Array, p: Params, alpha: Array) -> tuple[Array, Array]:
    """:func:`explorer.kinetics.trajectory` with float masks instead of ``where``.

    The same three pieces (off before ``t_on``, induction until ``t_``, repression from
    the switch point), each from :func:`kinetics.solution` (:func:`kinetics.unspliced` and
    :func:`kinetics.spliced` in one pass).
    An onset after the switch counts as at the switch (no induction; no overflow).
    """
    xp = _xp(t)
    ind = _less(t, p.t_)
    rep = 1 - ind
    dur = _clamp(p.t_ - p.t_on, 0.0)
    u0_, s0_ = kinetics.switch_state(dur, alpha, p.beta, p.gamma, xp=xp)
    tau = ind * _clamp(t - (p.t_ - dur), 0.0) + rep * (t - p.t_)
    u0, s0 = rep * u0_, rep * s0_
    a = ind * alpha
    return kinetics.solution(tau, u0, s0, a, p.beta, p.gamma, xp=xp)


def point_distance(data: GeneData, p: Params, t: Array) -> Array:
    """Squared scaled distance of each cell to the curve at its time ``t``."""
    ut, st = curve(t, p)
    du = (data.u - p.scaling * ut) / data.std_u
    ds = (data.s - st) / data.std_s
    return du * du + ds * ds


# ---------------------------------------------------------------------------------------------
# M-step: parameters for fixed times


def _sum(x: Array, w: Array) -> Array:
    """Row sums of ``x`` over the cells weighted 1 in ``w``, as float64 ``(n_genes, 1)``."""
    return _f64(_rsum(x * w))


def _pick(mask: Array, new: Array, old: Array) -> Array:
    """Take ``new`` where ``mask`` (1.0/0.0, or bool) else ``old``, by arithmetic.

    ``torch.where`` is slow on CPU.
    """
    if mask.dtype == bool or str(mask.dtype) == "torch.bool":
        mask = _cast(mask, old)
    return old + mask * (new - old)


def _false_like(x: Array) -> Array:
    """A boolean array of ``x``'s shape, all False (numpy's or torch's bool)."""
    xp = _xp(x)
    return xp.zeros_like(x, dtype=bool if _is_np(x) else xp.bool)


def _less(a: Array, b: Array) -> Array:
    """Compare ``a < b`` into 1.0/0.0 of ``a``'s dtype.

    The same numbers as ``(a < b).to(a.dtype)``, written straight into a float tensor:
    the bool-to-float cast costs about five times the comparison itself on CPU.
    """
    # numpy's broadcast_shapes: torch's imports torch.fx's symbolic shapes and with them
    # sympy, 0.4 s of CPU (1 s of wall) of the command's start-up for this one shape
    shape = np.broadcast_shapes(tuple(a.shape), tuple(b.shape))
    if _is_np(a):
        return np.less(a, b, out=np.empty(shape, dtype=a.dtype))
    import torch

    out = torch.empty(shape, dtype=a.dtype, device=a.device)
    return torch.lt(a, b, out=out)


@dataclass(frozen=True, slots=True)
class Moments:
    """Per-gene sums over the weighted cells that do not depend on the parameters."""

    uu: Array
    ss: Array
    n: Array


def moments(data: GeneData) -> Moments:
    """``sum(u^2)``, ``sum(s^2)`` and the count over the weighted cells, in float64."""
    return Moments(
        _sum(data.u * data.u, data.weights), _sum(data.s * data.s, data.weights), _f64(data.n_weighted)
    )


def profiled_loss(
    data: GeneData, mom: Moments, p: Params, t: Array, ratio: Array, *, reg: float = 1.0
) -> tuple[Array, Params]:
    """ScVelo's loss at the best ``alpha`` and ``scaling`` for the other parameters.

    The curve is linear in ``alpha`` (the switch point is too), so with ``f, g`` the
    curve for ``alpha = 1`` the best ``u`` amplitude ``scaling * alpha`` and ``s``
    amplitude ``alpha`` are two least-squares ratios. The loss is the mean over the
    weighted cells of ``((u - scaling u(t)) / std_u)^2 + ((s - s(t)) / std_s)^2`` plus
    scVelo's regulariser ``((gamma / beta - ratio) s / std_s)^2``.

    Returns
    -------
    ``(n_genes, 1)`` float64 loss and the parameters with ``alpha``, ``scaling`` set.
    """
    if _compiled(data.u):
        sums = _like(
            _em_kernels.curve_sums(
                _cells(data.u), _cells(data.s), _cells(data.weights), _cells(t),
                _genes(p.t_), _genes(p.t_on), _genes(p.beta), _genes(p.gamma),
            ),
            data.u,
        )  # fmt: skip
        suf, sff, ssg, sgg = (sums[:, k : k + 1] for k in range(4))
        sff, sgg = _clamp(sff, _TINY), _clamp(sgg, _TINY)
    else:
        f, g = _curve(t, p, _xp(p.alpha).ones_like(p.alpha))
        w = data.weights
        suf, sff = _sum(data.u * f, w), _clamp(_sum(f * f, w), _TINY)
        ssg, sgg = _sum(data.s * g, w), _clamp(_sum(g * g, w), _TINY)
    return _profile(data, mom, p, ratio, (suf, sff, ssg, sgg), reg=reg)


def _profile(
    data: GeneData, mom: Moments, p: Params, ratio: Array, sums: tuple[Array, ...], *, reg: float
) -> tuple[Array, Params]:
    """:func:`profiled_loss` from the sums ``u f, f f (floored), s g, g g (floored)``.

    Element-wise over genes, so ``p`` and the sums may carry a leading axis of candidates
    (``(n_cand, n_genes, 1)``, :func:`grid_onset`): each candidate gets the numbers a call
    of its own gives.
    """
    suf, sff, ssg, sgg = sums
    amp_u = _clamp(suf / sff, _TINY)
    amp_s = _clamp(ssg / sgg, _TINY)
    sse_u = _clamp(mom.uu - 2 * amp_u * suf + amp_u * amp_u * sff, 0.0) / _f64(data.std_u) ** 2
    sse_s = _clamp(mom.ss - 2 * amp_s * ssg + amp_s * amp_s * sgg, 0.0) / _f64(data.std_s) ** 2
    p = p.replace(alpha=_cast(amp_s, p.alpha), scaling=_cast(amp_u / amp_s, p.alpha))
    penalty = (_f64(ratio_gap(p, ratio)) ** 2) * mom.ss / _f64(data.std_s) ** 2
    return (sse_u + sse_s + reg * penalty) / mom.n, p


def m_step(
    data: GeneData,
    mom: Moments,
    p: Params,
    t: Array,
    ratio: Array,
    step: Array,
    *,
    n_rounds: int = 2,
    reg: float = 1.0,
    fit_t_on: bool = False,
) -> tuple[Params, Array, Array]:
    """Lower the loss for fixed times by a coordinate search on the log parameters.

    Each round tries ``beta``, ``gamma`` and ``t_`` (and ``t_on`` if ``fit_t_on``)
    multiplied (``t_on`` shifted) by ``exp(+-step)``, plus ``t_`` moved to just after
    the last induction cell (scVelo's ``alt_t_``), and keeps each change that lowers a
    gene's loss; a gene's step halves in rounds without improvement.

    Returns
    -------
    The new parameters, their ``(n_genes, 1)`` loss and the new step sizes.
    """
    xp = _xp(p.alpha)
    loss, p = profiled_loss(data, mom, p, t, ratio, reg=reg)

    def try_params(cand: Params) -> None:
        nonlocal loss, p, improved
        c_loss, cand = profiled_loss(data, mom, cand, t, ratio, reg=reg)
        better = c_loss < loss
        loss = xp.where(better, c_loss, loss)
        p = p.where(better, cand)
        improved |= better

    for _ in range(n_rounds):
        improved = _false_like(p.alpha)
        factor = xp.exp(step)
        for name in ("beta", "gamma", "t_"):
            for f in (factor, 1 / factor):
                try_params(p.replace(**{name: getattr(p, name) * f}))
        if fit_t_on:
            span = _clamp(xp.abs(p.t_ - p.t_on), _TINY)
            for sign in (1.0, -1.0):
                shift = sign * span * (factor - 1)
                try_params(p.replace(t_on=p.t_on + shift, t_=p.t_ + shift))
        else:
            # scVelo's alt_t_: end induction at the last cell assigned to it
            on = _less(t, p.t_) * data.weights
            last = _rmax(on * t)
            ok = (last > p.t_on) & (last < p.t_)
            try_params(p.replace(t_=xp.where(ok, last * (1 + 1e-3), p.t_)))
        step = xp.where(improved, step, step * 0.5)
    return p, loss, step


#: the parameters :func:`direct_search` steps, each multiplied by ``exp(+-step)``
DIRECT_NAMES = ("alpha", "beta", "gamma", "t_", "scaling")


def direct_search(
    data: GeneData,
    mom: Moments,
    p: Params,
    ratio: Array,
    *,
    rounds: int,
    step: float = float(np.log(1.5)),
    n_newton: int = 2,
    on_round: Callable[[int], None] | None = None,
) -> tuple[Params, Array]:
    """Lower scVelo's loss itself, each candidate's cells projected anew (no fixed times).

    A coordinate search on the log parameters (:data:`DIRECT_NAMES`): each round tries
    every parameter multiplied by ``exp(+-step)``, scores the candidate by
    :func:`assign` and :func:`em_loss` (the loss scVelo's Nelder-Mead steps also score,
    its ``get_mse`` re-assigning the times at every evaluation), keeps each change that
    lowers a gene's loss, and halves a gene's step after a round without one (``on_round``
    is called with each round's number after it, for progress). The EM's
    alternation (times fixed, then parameters profiled at them) stopped on the pancreas at
    a loss above scVelo's on 201 of 328 genes; the u scaling drifted to 2.4x scVelo's on
    the genes that lost, which the alternation cannot undo (it profiles the scaling for
    the times it has).

    Returns
    -------
    The parameters and their ``(n_genes, 1)`` loss.
    """
    xp = _xp(p.alpha)

    def loss_of(q: Params) -> Array:
        return em_loss(data, mom, q, assign(data, q, n_newton=n_newton).dist, ratio)

    loss = loss_of(p)
    steps = xp.full_like(p.alpha, step)
    for k in range(rounds):
        improved = _false_like(p.alpha)
        for name in DIRECT_NAMES:
            for sign in (1.0, -1.0):
                cand = p.replace(**{name: getattr(p, name) * xp.exp(sign * steps)})
                c_loss = loss_of(cand)
                better = c_loss < loss
                p, loss = p.where(better, cand), xp.where(better, c_loss, loss)
                improved |= better
        steps = xp.where(improved, steps, steps * 0.5)
        if on_round is not None:
            on_round(k + 1)
    return p, loss


# ---------------------------------------------------------------------------------------------
# read-outs


def likelihood(
    data: GeneData, p: Params, t: Array, ratio: Array, *, at: tuple[Array, Array] | None = None
) -> Array:
    """ScVelo's gene likelihood (``get_likelihood``, normal noise), ``(n_genes, 1)``.

    On the cells of ``weights_upper``: ``exp(-sum(d^2) / (2 n varx) - log(2 pi varx) / 2)``
    with ``d^2`` the squared scaled distance plus the ratio penalty, ``varx`` the
    variance of the signed distance and ``n`` the number of those cells less 1 % of all
    cells (at least 2). NaN for a gene without any such cell, as scVelo (whose mean over
    no cells is NaN), so it fails every likelihood filter.
    """
    xp = _xp(t)
    ut, st = curve(t, p) if at is None else at
    du = (p.scaling * ut - data.u) / data.std_u
    ds = (st - data.s) / data.std_s
    reg = ratio_gap(p, ratio) * data.s / data.std_s
    distx = du * du + ds * ds + reg * reg
    w = data.weights_upper
    cnt = _f64(_clamp(_rsum(w), 1))
    mean_d = _sum(distx, w) / cnt
    mean_signed = _sum(xp.sign(ds) * xp.sqrt(distx), w) / cnt
    varx = mean_d - mean_signed**2
    # scVelo replaces a variance of 0 by 1; rounding can also leave it just below 0
    varx = xp.where(varx <= 0, xp.ones_like(varx), varx)
    n = _clamp(_f64(_rsum(w)) - 0.01 * data.u.shape[1], 2.0)
    loglik = -0.5 / n * _sum(distx, w) / varx - 0.5 * xp.log(2 * math.pi * _clamp(varx, 1e-30))
    loglik = xp.where(_rsum(w) > 0, loglik, xp.full_like(loglik, math.nan))
    return _cast(xp.exp(loglik), p.alpha)


def r2(data: GeneData, p: Params, t: Array, *, at: tuple[Array, Array] | None = None) -> Array:
    """R² of the fitted curve on the weighted cells, ``u`` and ``s`` in units of their spread.

    ``at``: :func:`curve` at ``t``, when the caller has it (likewise for :func:`likelihood`
    and :func:`velocities`).
    """
    ut, st = curve(t, p) if at is None else at
    w = data.weights
    du = (data.u - p.scaling * ut) / data.std_u
    ds = (data.s - st) / data.std_s
    sse = _sum(du * du + ds * ds, w)
    cu = (data.u - _masked_mean(data.u, w > 0)) / data.std_u
    cs = (data.s - _masked_mean(data.s, w > 0)) / data.std_s
    sst = _clamp(_sum(cu * cu + cs * cs, w), _TINY)
    return _cast(1 - sse / sst, p.alpha)


def velocities(
    data: GeneData, p: Params, t: Array, state: Array, *, at: tuple[Array, Array] | None = None
) -> tuple[Array, Array]:
    """ScVelo's dynamical velocity at the cells' times, in count units.

    ``ds/dt = beta u(t) - gamma s(t)`` and ``du/dt = (alpha 1[induction] - beta u(t))
    scaling``, zero for cells in a steady state (scVelo's ``mode='velocity'``), clipped
    below at ``-s`` and ``-u`` as scVelo does.
    """
    xp = _xp(t)
    ut, st = curve(t, p) if at is None else at
    moving = (state == INDUCTION) | (state == REPRESSION)
    on = t < p.t_
    alpha = _cast(on & (t >= p.t_on), t) * p.alpha
    vs = kinetics.velocity(ut, st, p.beta, p.gamma)
    vu = (alpha - p.beta * ut) * p.scaling
    vs = vs * _cast(moving, vs)
    vu = vu * _cast(moving, vu)
    return xp.maximum(vs, -data.s), xp.maximum(vu, -data.u)


def em_loss(data: GeneData, mom: Moments, p: Params, dist: Array, ratio: Array) -> Array:
    """ScVelo's loss from the assigned distances: mean over weighted cells plus the ratio penalty."""
    penalty = (_f64(ratio_gap(p, ratio)) ** 2) * mom.ss / _f64(data.std_s) ** 2
    return (_sum(dist, data.weights) + penalty) / mom.n


def alignment_factor(t: Array, p: Params, t_max: float) -> Array:
    """ScVelo's ``align_dynamics``: the factor that stretches a gene's time span to ``t_max``.

    The span is the longest induction time plus the longest repression time, divided by
    the share of cells not sitting exactly at time 0 or ``t_``.
    """
    xp = _xp(t)
    zero = xp.zeros_like(t)
    span = _rmax(xp.where(t < p.t_, t - p.t_on, zero))
    span = span + _rmax(xp.where(t > p.t_, t - p.t_, zero))
    pinned = _rmean(_cast((t == p.t_) | (t == 0), t))
    denom = 1 - pinned
    denom = xp.where(denom == 0, xp.ones_like(denom), denom)
    span = span / denom
    span = xp.where(span <= 0, xp.ones_like(span), span)
    return t_max / span


def grid_onset(
    data: GeneData,
    p: Params,
    t: Array,
    ratio: Array,
    *,
    t_on_grid: list[float],
    duration_grid: list[float],
    rate_grid: list[float],
    reg: float = 1.0,
) -> Params:
    """Best ``(t_on, t_, rate scale)`` per gene over a grid, for fixed cell times ``t``.

    ``t_`` is ``t_on`` plus each induction length of ``duration_grid``; ``beta`` and
    ``gamma`` are multiplied by each factor of ``rate_grid`` (the gene's clock speed on
    the shared axis); ``alpha`` and ``scaling`` are profiled (:func:`profiled_loss`).
    """
    xp = _xp(p.alpha)
    mom = moments(data)
    cands = _grid_candidates(p, t_on_grid, duration_grid, rate_grid)
    if _compiled(data.u):
        return _grid_onset_compiled(data, mom, cands, t, ratio, reg=reg)
    best_loss, best = None, p
    for cand in cands:
        loss, cand = profiled_loss(data, mom, cand, t, ratio, reg=reg)
        if best_loss is None:
            best_loss, best = loss, cand
        else:
            better = loss < best_loss
            best_loss = xp.where(better, loss, best_loss)
            best = best.where(better, cand)
    return best


def _grid_candidates(
    p: Params, t_on_grid: list[float], duration_grid: list[float], rate_grid: list[float]
) -> list[Params]:
    """:func:`grid_onset`'s candidates, in its order (rates, then onsets, then durations)."""
    xp = _xp(p.alpha)
    return [
        p.replace(
            t_on=xp.full_like(p.t_on, t_on),
            t_=xp.full_like(p.t_, t_on + dur),
            beta=p.beta * k,
            gamma=p.gamma * k,
        )
        for k in rate_grid
        for t_on in t_on_grid
        for dur in duration_grid
    ]


def _grid_onset_compiled(
    data: GeneData, mom: Moments, cands: list[Params], t: Array, ratio: Array, *, reg: float
) -> Params:
    """:func:`grid_onset` over its candidates ``cands``, every candidate's sums in one compiled call (CPU).

    The same numbers as one :func:`profiled_loss` per candidate (the kernels share their
    loop, and the rest is element-wise), in one kernel call instead of up to 120, and
    the same choice: per gene the first candidate whose loss no later one undercuts,
    where a NaN loss never wins unless it is the first.
    """
    stacked = {f.name: _stack([getattr(c, f.name) for c in cands]) for f in fields(Params)}

    def per_cand(name: str) -> np.ndarray:
        return np.ascontiguousarray(to_numpy(stacked[name])[:, :, 0], dtype=np.float64)

    sums = _em_kernels.curve_sums_grid(
        _cells(data.u), _cells(data.s), _cells(data.weights), _cells(t),
        per_cand("t_"), per_cand("t_on"), per_cand("beta"), per_cand("gamma"),
    )  # fmt: skip
    sums = _like(sums, data.u)
    suf, sff, ssg, sgg = (sums[:, :, k : k + 1] for k in range(4))
    loss, fitted = _profile(
        data, mom, Params(**stacked), ratio, (suf, _clamp(sff, _TINY), ssg, _clamp(sgg, _TINY)), reg=reg
    )
    # the serial choice (``loss < best``, first candidate kept on ties) as an argmin
    losses = to_numpy(loss)[:, :, 0]
    first_nan = np.isnan(losses[0])
    pick = np.where(first_nan, 0, np.argmin(np.where(np.isnan(losses), np.inf, losses), axis=0))
    pick = _like(pick.astype(np.int64), data.u)

    def choose(x: Array) -> Array:  # (n_cand, n_genes, 1) -> each gene's picked candidate
        return x[pick, _xp(x).arange(x.shape[1])]

    return Params(**{f.name: choose(getattr(fitted, f.name)) for f in fields(Params)})


def _stack(xs: list[Array]) -> Array:
    """Arrays of one shape stacked on a new leading axis (numpy or torch)."""
    return np.stack(xs) if _is_np(xs[0]) else _xp(xs[0]).stack(xs)
