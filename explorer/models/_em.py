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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch

from explorer import kinetics
from explorer.models import _em_kernels

if TYPE_CHECKING:
    from collections.abc import Callable

#: scVelo clips the logarithm in its analytic time inversion to [eps, 1 - eps]
_LOG_EPS = 1e-6
#: floor for rates, abundances and amplitudes (keeps logs and ratios finite)
_TINY = 1e-8
#: the four states of scVelo's assignment, in the order of its distance array
REPRESSION, INDUCTION, STEADY_OFF, STEADY_ON = 0, 1, 2, 3
#: run the E-step and the profiled loss through the compiled kernels of
#: :mod:`explorer.models._em_kernels` on the CPU (the tests also run the torch code)
USE_KERNELS = True


def _compiled(x: torch.Tensor) -> bool:
    """Whether ``x``'s computations go to the compiled CPU kernels (else: torch, e.g. on CUDA)."""
    return USE_KERNELS and x.device.type == "cpu"


def _cells(x: torch.Tensor) -> np.ndarray:
    """``(n_genes, n_cells)`` float32 tensor as a C-contiguous numpy array (no copy when it is one)."""
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


def _genes(x: torch.Tensor) -> np.ndarray:
    """``(n_genes, 1)`` tensor as a ``(n_genes,)`` float64 numpy array."""
    return np.ascontiguousarray(x.reshape(-1).numpy(), dtype=np.float64)


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

    u: torch.Tensor
    s: torch.Tensor
    weights: torch.Tensor
    weights_upper: torch.Tensor
    std_u: torch.Tensor
    std_s: torch.Tensor

    @property
    def n_weighted(self) -> torch.Tensor:
        """``(n_genes, 1)`` number of weighted cells (at least 1)."""
        return self.weights.sum(1, keepdim=True).clamp(min=1).to(self.u.dtype)

    def take_cells(self, idx: torch.Tensor) -> GeneData:
        """Return the same genes on the cells ``idx`` only (standard deviations kept).

        ``idx`` is ``(n,)`` (the same cells for every gene) or ``(n_genes, n)`` (each gene
        its own cells, as :func:`weighted_cells` draws them).
        """
        if idx.dim() == 2:

            def take(x: torch.Tensor) -> torch.Tensor:
                return x.gather(1, idx)
        else:

            def take(x: torch.Tensor) -> torch.Tensor:
                return x[:, idx]

        return GeneData(
            take(self.u),
            take(self.s),
            take(self.weights),
            take(self.weights_upper),
            self.std_u,
            self.std_s,
        )


def weighted_cells(weights: torch.Tensor, n: int, *, seed: int) -> torch.Tensor:
    """``(n_genes, min(n, n_cells))`` cell indices per gene, drawn from the cells that carry its weight.

    A uniform draw without replacement among each gene's weighted cells (``weights >
    0``), topped up with unweighted cells when it has fewer than ``n``. One uniform draw
    for all genes would keep about ``n / n_cells`` of a rare population: a gene
    expressed in 1 % of 50,000 cells would be fitted on 10 cells; this keeps all its
    500. Seeded: the same ``seed`` and weights give the same cells.
    """
    generator = torch.Generator().manual_seed(seed)
    keys = torch.rand(weights.shape, generator=generator).to(weights.device)
    # unweighted cells rank after every weighted one
    keys = keys + (weights <= 0).to(keys.dtype)
    idx = keys.topk(min(n, weights.shape[1]), dim=1, largest=False).indices
    return idx.sort(dim=1).values


@dataclass(frozen=True, slots=True)
class Params:
    """Kinetic parameters of a batch of genes, each ``(n_genes, 1)``.

    ``beta`` is the splicing rate in units of the scaled unspliced abundance
    ``u / scaling`` (scVelo's internal ``beta``; it reports ``beta / scaling``).
    ``t_`` is the absolute switch time and ``t_on`` the onset of induction.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor
    t_: torch.Tensor
    scaling: torch.Tensor
    t_on: torch.Tensor

    def replace(self, **changes: torch.Tensor) -> Params:
        """Return a copy with some fields changed."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Params(**values)

    def where(self, mask: torch.Tensor, other: Params) -> Params:
        """Take ``other``'s value for genes where ``mask`` (``(n_genes, 1)``) is true."""
        return Params(
            **{f.name: torch.where(mask, getattr(other, f.name), getattr(self, f.name)) for f in fields(self)}
        )

    def switch_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u0_, s0_)`` in scaled units: where induction stands at ``t_`` (none if ``t_on >= t_``)."""
        dur = (self.t_ - self.t_on).clamp(min=0)
        return kinetics.switch_state(dur, self.alpha, self.beta, self.gamma, xp=torch)


# ---------------------------------------------------------------------------------------------
# data preparation and initialisation


def masked_quantile(x: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q`` quantile of ``x`` over ``mask`` (linear interpolation, as numpy).

    Rows without any masked-in value give 0.
    """
    big = torch.where(mask, x, torch.full_like(x, math.inf))
    if big.device.type == "cpu":
        # numpy's vectorised sort: the same values, about 20x faster than torch.sort on CPU
        ordered = torch.from_numpy(np.sort(big.numpy(), axis=1))
    else:
        ordered = torch.sort(big, dim=1).values
    n = mask.sum(1, keepdim=True)
    pos = q * (n - 1).clamp(min=0).to(x.dtype)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (n - 1).clamp(min=0))
    frac = pos - lo.to(x.dtype)
    vlo, vhi = ordered.gather(1, lo), ordered.gather(1, hi)
    res = vlo + (vhi - vlo) * frac
    return torch.where(n > 0, res, torch.zeros_like(res))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
    return torch.where(mask, x, torch.zeros_like(x)).sum(1, keepdim=True) / n


def _masked_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = _masked_mean(x, mask)
    return _masked_mean((x - mean) ** 2, mask).sqrt()


def prepare(u: torch.Tensor, s: torch.Tensor, *, perc: float = 99.0) -> tuple[GeneData, torch.Tensor]:
    """ScVelo's weights and spreads for each gene.

    Returns
    -------
    The :class:`GeneData` and a ``(n_genes,)`` mask of genes with more than two
    weighted cells (scVelo's ``recoverable``).
    """
    weights = (s > 0) & (u > 0)
    ub_s = masked_quantile(s, weights, perc / 100)
    ub_u = masked_quantile(u, weights, perc / 100)
    weights = weights & ((s <= ub_s) | (ub_s <= 0)) & ((u <= ub_u) | (ub_u <= 0))
    recoverable = weights.sum(1) > 2
    std_u, std_s = _masked_std(u, weights), _masked_std(s, weights)
    # scVelo sets both spreads to 1 when either is 0
    degenerate = (std_u == 0) | (std_s == 0)
    std_u = torch.where(degenerate, torch.ones_like(std_u), std_u)
    std_s = torch.where(degenerate, torch.ones_like(std_s), std_s)
    max_u = torch.where(weights, u, torch.zeros_like(u)).amax(1, keepdim=True)
    max_s = torch.where(weights, s, torch.zeros_like(s)).amax(1, keepdim=True)
    # scVelo measures the likelihood on cells above a third of the weighted maximum
    upper = weights & (u > max_u / 3) & (s > max_s / 3)
    return GeneData(u, s, weights.to(u.dtype), upper.to(u.dtype), std_u, std_s), recoverable


def tau_inv(
    u: torch.Tensor,
    s: torch.Tensor,
    u0: torch.Tensor,
    s0: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    *,
    use_u: torch.Tensor,
) -> torch.Tensor:
    """Time to go from ``(u0, s0)`` to ``(u, s)`` on the curve, by analytic inversion.

    From ``u`` alone where ``use_u``, else from ``s - beta/(gamma-beta) u``, which
    decays with rate ``gamma`` (scVelo's ``tau_inv``; it uses ``u`` when
    ``gamma >= beta``). The ratio inside the log is clipped to ``[eps, 1 - eps]``.
    """
    tau_u, tau_s = _tau_inv_both(u, s, u0, s0, alpha, beta, gamma)
    return torch.where(use_u, tau_u, tau_s)


def _tau_inv_both(
    u: torch.Tensor,
    s: torch.Tensor,
    u0: torch.Tensor,
    s0: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inversions of :func:`tau_inv`: ``(from u, from s)``."""
    uinf = alpha / beta
    ratio_u = (u - uinf) / torch.where((u0 - uinf).abs() < _TINY, torch.full_like(uinf, -_TINY), u0 - uinf)
    tau_u = -torch.log(ratio_u.clamp(_LOG_EPS, 1 - _LOG_EPS)) / beta
    diff = gamma - beta
    diff = torch.where(diff.abs() < _TINY, torch.full_like(diff, _TINY), diff)
    beta_ = beta / diff
    xinf = alpha / gamma - beta_ * uinf
    den = s0 - beta_ * u0 - xinf
    den = torch.where(den.abs() < _TINY, torch.full_like(den, _TINY), den)
    tau_s = -torch.log(((s - beta_ * u - xinf) / den).clamp(_LOG_EPS, 1 - _LOG_EPS)) / gamma
    return tau_u, tau_s


def ratio_gap(p: Params, ratio: torch.Tensor) -> torch.Tensor:
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
    ratio: torch.Tensor


def initialize(data: GeneData, *, perc: float = 98.0) -> Init:
    """ScVelo's initial guess (``DynamicsRecovery.initialize``), for all genes at once.

    ``gamma`` is the steady-state slope of ``u / scaling`` on ``s`` over the cells with
    ``s`` in its top 2 %, ``beta = 1``, ``alpha`` puts the induction steady state at the
    mean of the extreme cells, and ``t_`` is the time to reach that point. (scVelo's
    optional bimodality test is not used.)
    """
    u, s, w = data.u, data.s, data.weights > 0
    scaling = data.std_u / data.std_s
    us = u / scaling
    weights_s = w & (s >= masked_quantile(s, w, perc / 100))
    weights_u = w & (us >= masked_quantile(us, w, perc / 100))
    zero = torch.zeros_like(s)
    num = torch.where(weights_s, us * s, zero).sum(1, keepdim=True)
    den = torch.where(weights_s, s * s, zero).sum(1, keepdim=True).clamp(min=_TINY)
    # + 1e-6 avoids beta == gamma (scVelo)
    gamma = (num / den).clamp(min=_TINY) + 1e-6
    # scVelo nudges extreme initial ratios towards the middle by a factor 1.2
    gamma = torch.where(
        gamma < 0.05 / scaling, gamma * 1.2, torch.where(gamma > 1.5 / scaling, gamma / 1.2, gamma)
    )
    beta = torch.ones_like(gamma)
    u_inf = _masked_mean(us, weights_u | weights_s).clamp(min=_TINY)
    s_inf = _masked_mean(s, weights_s).clamp(min=_TINY)
    alpha = u_inf * beta
    zero1 = torch.zeros_like(alpha)
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
    mom = moments(data)
    best, best_loss = p0, None
    for k in factors:
        beta = p0.beta * k
        cand = p0.replace(beta=beta, scaling=p0.scaling * k)
        u_inf = cand.alpha / beta
        zero = torch.zeros_like(beta)
        # the switch time puts the end of induction at the initial extreme point
        s_inf = kinetics.switch_state(p0.t_, p0.alpha, p0.beta, p0.gamma, xp=torch)[1]
        t_ = tau_inv(
            u_inf * (1 - 1e-3), s_inf, zero, zero, cand.alpha, beta, cand.gamma, use_u=cand.gamma >= beta
        )
        cand = cand.replace(t_=t_.clamp(min=_TINY))
        ratio = cand.gamma / cand.beta * cand.scaling
        a = assign(data, cand, n_newton=n_newton)
        loss = em_loss(data, mom, cand, a.dist, ratio)
        if best_loss is None:
            best, best_loss = cand, loss
        else:
            better = loss < best_loss
            best, best_loss = best.where(better, cand), torch.where(better, loss, best_loss)
    return Init(best, best.gamma / best.beta * best.scaling)


# ---------------------------------------------------------------------------------------------
# E-step: time assignment by projection


def _branch_distance(
    data: GeneData, p: Params, tau: torch.Tensor, u0: torch.Tensor, s0: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared scaled distance of each cell to the branch point at ``tau``, and the point."""
    ut, st = kinetics.solution(tau, u0, s0, alpha, p.beta, p.gamma, xp=torch)
    du = (data.u - p.scaling * ut) / data.std_u
    ds = (data.s - st) / data.std_s
    return du * du + ds * ds, ut, st


def _project_branch(
    data: GeneData,
    p: Params,
    u0: torch.Tensor,
    s0: torch.Tensor,
    alpha: torch.Tensor,
    tau_max: torch.Tensor,
    *,
    n_newton: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest point of one branch to each cell: ``(tau, squared distance)``.

    Starts from the better of the two analytic inversions (from ``u`` and from ``s``)
    and takes Gauss-Newton steps on the distance, keeping a step only where it helps.
    """
    us = data.u / p.scaling
    best = None
    # both inversions at once (each is tau_inv with use_u all true / all false)
    for tau in _tau_inv_both(us, data.s, u0, s0, alpha, p.beta, p.gamma):
        tau = torch.minimum(tau.clamp(min=0), tau_max)
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
        new = torch.minimum((tau - step).clamp(min=0), tau_max)
        d_new, ut_new, st_new = _branch_distance(data, p, new, u0, s0, alpha)
        better = _less(d_new, d)
        tau, ut, st = _pick(better, new, tau), _pick(better, ut_new, ut), _pick(better, st_new, st)
        d = torch.minimum(d_new, d)
    return tau, d


@dataclass(frozen=True, slots=True)
class Assignment:
    """Per cell and gene: absolute time ``t``, state (0-3) and squared distance."""

    t: torch.Tensor
    state: torch.Tensor
    dist: torch.Tensor


def assign(
    data: GeneData,
    p: Params,
    *,
    n_newton: int = 2,
    t_prev: torch.Tensor | None = None,
    smooth: Callable[[torch.Tensor], torch.Tensor] | None = None,
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
    crits = dists if smooth is None else tuple(smooth(d) for d in dists)
    # running minimum over the states (ties keep the earlier state, as argmin does)
    state = torch.zeros_like(dists[0])
    t, dist, crit = times[0], dists[0], crits[0]
    for k in range(1, 4):
        better = _less(crits[k], crit)
        state = state + better * (k - state)
        t = t + better * (times[k] - t)
        dist = dist + better * (dists[k] - dist)
        crit = torch.minimum(crits[k], crit)
    if t_prev is not None and smooth is None:
        d_prev = point_distance(data, p, t_prev)
        keep = _less(d_prev, dist)
        t = t + keep * (t_prev - t)
        dist = torch.minimum(d_prev, dist)
        state = state + keep * (state_of(t_prev, p) - state)
    return Assignment(t, state.round().to(torch.int8), dist)


def _branch_states(
    data: GeneData, p: Params, *, n_newton: int
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Distances to the four states (repression, induction, off, on) and their times, in torch."""
    zero = torch.zeros_like(p.alpha)
    dur = (p.t_ - p.t_on).clamp(min=0)
    tau, d_ind = _project_branch(data, p, zero, zero, p.alpha, dur, n_newton=n_newton)
    u0_, s0_ = p.switch_point()
    # the repression branch is followed until u has decayed to 1e-4 of its start
    rate = torch.minimum(p.beta, p.gamma).clamp(min=_TINY)
    tau_, d_rep = _project_branch(data, p, u0_, s0_, zero, math.log(1e4) / rate, n_newton=n_newton)
    du_off, ds_off = data.u / data.std_u, data.s / data.std_s
    d_off = du_off * du_off + ds_off * ds_off
    du_on, ds_on = (data.u - p.scaling * u0_) / data.std_u, (data.s - s0_) / data.std_s
    d_on = du_on * du_on + ds_on * ds_on
    dists = (d_rep, d_ind, d_off, d_on)
    times = (p.t_ + tau_, p.t_on + tau, torch.zeros_like(tau), p.t_.expand_as(tau))
    return dists, times


def _run_assign_kernel(
    data: GeneData, p: Params, *, n_newton: int, t_prev: torch.Tensor | None, keep_all: bool
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


def _assign_compiled(data: GeneData, p: Params, *, n_newton: int, t_prev: torch.Tensor | None) -> Assignment:
    """:func:`assign` without ``smooth``, in one compiled pass (CPU)."""
    t, state, dist, _, _ = _run_assign_kernel(data, p, n_newton=n_newton, t_prev=t_prev, keep_all=False)
    return Assignment(torch.from_numpy(t), torch.from_numpy(state), torch.from_numpy(dist))


def _branch_states_compiled(
    data: GeneData, p: Params, *, n_newton: int
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """:func:`_branch_states` through the compiled kernel (CPU)."""
    _, _, _, dists, times = _run_assign_kernel(data, p, n_newton=n_newton, t_prev=None, keep_all=True)
    d, tau = torch.from_numpy(dists), torch.from_numpy(times)
    return (d[0], d[1], d[2], d[3]), (tau[0], tau[1], torch.zeros_like(tau[0]), p.t_.expand_as(tau[0]))


def state_of(t: torch.Tensor, p: Params) -> torch.Tensor:
    """Induction (1) before the switch time, repression (0) after it."""
    return _less(t, p.t_) * (INDUCTION - REPRESSION) + REPRESSION


def curve(t: torch.Tensor, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u(t), s(t))`` in scaled units (multiply ``u`` by ``scaling`` for counts)."""
    return _curve(t, p, p.alpha)


def _curve(t: torch.Tensor, p: Params, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`explorer.kinetics.trajectory` with float masks instead of ``where``.

    The same three pieces (off before ``t_on``, induction until ``t_``, repression from
    the switch point), each from :func:`kinetics.solution` (:func:`kinetics.unspliced` and
    :func:`kinetics.spliced` in one pass).
    An onset after the switch counts as at the switch (no induction; no overflow).
    """
    ind = _less(t, p.t_)
    rep = 1 - ind
    dur = (p.t_ - p.t_on).clamp(min=0)
    u0_, s0_ = kinetics.switch_state(dur, alpha, p.beta, p.gamma, xp=torch)
    tau = ind * (t - (p.t_ - dur)).clamp(min=0) + rep * (t - p.t_)
    u0, s0 = rep * u0_, rep * s0_
    a = ind * alpha
    return kinetics.solution(tau, u0, s0, a, p.beta, p.gamma, xp=torch)


def point_distance(data: GeneData, p: Params, t: torch.Tensor) -> torch.Tensor:
    """Squared scaled distance of each cell to the curve at its time ``t``."""
    ut, st = curve(t, p)
    du = (data.u - p.scaling * ut) / data.std_u
    ds = (data.s - st) / data.std_s
    return du * du + ds * ds


# ---------------------------------------------------------------------------------------------
# M-step: parameters for fixed times


def _sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Row sums of ``x`` over the cells weighted 1 in ``w``, as float64 ``(n_genes, 1)``."""
    return (x * w).sum(1, keepdim=True).double()


def _pick(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Take ``new`` where ``mask`` (1.0/0.0, or bool) else ``old``, by arithmetic.

    ``torch.where`` is slow on CPU.
    """
    if mask.dtype == torch.bool:
        mask = mask.to(old.dtype)
    return old + mask * (new - old)


def _less(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Compare ``a < b`` into 1.0/0.0 of ``a``'s dtype.

    The same numbers as ``(a < b).to(a.dtype)``, written straight into a float tensor:
    the bool-to-float cast costs about five times the comparison itself on CPU.
    """
    # numpy's broadcast_shapes: torch's imports torch.fx's symbolic shapes and with them
    # sympy, 0.4 s of CPU (1 s of wall) of the command's start-up for this one shape
    shape = np.broadcast_shapes(tuple(a.shape), tuple(b.shape))
    out = torch.empty(shape, dtype=a.dtype, device=a.device)
    return torch.lt(a, b, out=out)


@dataclass(frozen=True, slots=True)
class Moments:
    """Per-gene sums over the weighted cells that do not depend on the parameters."""

    uu: torch.Tensor
    ss: torch.Tensor
    n: torch.Tensor


def moments(data: GeneData) -> Moments:
    """``sum(u^2)``, ``sum(s^2)`` and the count over the weighted cells, in float64."""
    return Moments(
        _sum(data.u * data.u, data.weights), _sum(data.s * data.s, data.weights), data.n_weighted.double()
    )


def profiled_loss(
    data: GeneData, mom: Moments, p: Params, t: torch.Tensor, ratio: torch.Tensor, *, reg: float = 1.0
) -> tuple[torch.Tensor, Params]:
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
        sums = torch.from_numpy(
            _em_kernels.curve_sums(
                _cells(data.u), _cells(data.s), _cells(data.weights), _cells(t),
                _genes(p.t_), _genes(p.t_on), _genes(p.beta), _genes(p.gamma),
            )
        )  # fmt: skip
        suf, sff, ssg, sgg = (sums[:, k : k + 1] for k in range(4))
        sff, sgg = sff.clamp(min=_TINY), sgg.clamp(min=_TINY)
    else:
        f, g = _curve(t, p, torch.ones_like(p.alpha))
        w = data.weights
        suf, sff = _sum(data.u * f, w), _sum(f * f, w).clamp(min=_TINY)
        ssg, sgg = _sum(data.s * g, w), _sum(g * g, w).clamp(min=_TINY)
    amp_u = (suf / sff).clamp(min=_TINY)
    amp_s = (ssg / sgg).clamp(min=_TINY)
    sse_u = (mom.uu - 2 * amp_u * suf + amp_u * amp_u * sff).clamp(min=0) / data.std_u.double() ** 2
    sse_s = (mom.ss - 2 * amp_s * ssg + amp_s * amp_s * sgg).clamp(min=0) / data.std_s.double() ** 2
    dtype = p.alpha.dtype
    p = p.replace(alpha=amp_s.to(dtype), scaling=(amp_u / amp_s).to(dtype))
    penalty = (ratio_gap(p, ratio).double() ** 2) * mom.ss / data.std_s.double() ** 2
    return (sse_u + sse_s + reg * penalty) / mom.n, p


def m_step(
    data: GeneData,
    mom: Moments,
    p: Params,
    t: torch.Tensor,
    ratio: torch.Tensor,
    step: torch.Tensor,
    *,
    n_rounds: int = 2,
    reg: float = 1.0,
    fit_t_on: bool = False,
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """Lower the loss for fixed times by a coordinate search on the log parameters.

    Each round tries ``beta``, ``gamma`` and ``t_`` (and ``t_on`` if ``fit_t_on``)
    multiplied (``t_on`` shifted) by ``exp(+-step)``, plus ``t_`` moved to just after
    the last induction cell (scVelo's ``alt_t_``), and keeps each change that lowers a
    gene's loss; a gene's step halves in rounds without improvement.

    Returns
    -------
    The new parameters, their ``(n_genes, 1)`` loss and the new step sizes.
    """
    loss, p = profiled_loss(data, mom, p, t, ratio, reg=reg)

    def try_params(cand: Params) -> None:
        nonlocal loss, p, improved
        c_loss, cand = profiled_loss(data, mom, cand, t, ratio, reg=reg)
        better = c_loss < loss
        loss = torch.where(better, c_loss, loss)
        p = p.where(better, cand)
        improved |= better

    for _ in range(n_rounds):
        improved = torch.zeros_like(p.alpha, dtype=torch.bool)
        factor = torch.exp(step)
        for name in ("beta", "gamma", "t_"):
            for f in (factor, 1 / factor):
                try_params(p.replace(**{name: getattr(p, name) * f}))
        if fit_t_on:
            span = (p.t_ - p.t_on).abs().clamp(min=_TINY)
            for sign in (1.0, -1.0):
                shift = sign * span * (factor - 1)
                try_params(p.replace(t_on=p.t_on + shift, t_=p.t_ + shift))
        else:
            # scVelo's alt_t_: end induction at the last cell assigned to it
            on = _less(t, p.t_) * data.weights
            last = (on * t).amax(1, keepdim=True)
            ok = (last > p.t_on) & (last < p.t_)
            try_params(p.replace(t_=torch.where(ok, last * (1 + 1e-3), p.t_)))
        step = torch.where(improved, step, step * 0.5)
    return p, loss, step


# ---------------------------------------------------------------------------------------------
# read-outs


def likelihood(data: GeneData, p: Params, t: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ScVelo's gene likelihood (``get_likelihood``, normal noise), ``(n_genes, 1)``.

    On the cells of ``weights_upper``: ``exp(-sum(d^2) / (2 n varx) - log(2 pi varx) / 2)``
    with ``d^2`` the squared scaled distance plus the ratio penalty, ``varx`` the
    variance of the signed distance and ``n`` the number of those cells less 1 % of all
    cells (at least 2). NaN for a gene without any such cell, as scVelo (whose mean over
    no cells is NaN), so it fails every likelihood filter.
    """
    ut, st = curve(t, p)
    du = (p.scaling * ut - data.u) / data.std_u
    ds = (st - data.s) / data.std_s
    reg = ratio_gap(p, ratio) * data.s / data.std_s
    distx = du * du + ds * ds + reg * reg
    w = data.weights_upper
    cnt = w.sum(1, keepdim=True).clamp(min=1).double()
    mean_d = _sum(distx, w) / cnt
    mean_signed = _sum(torch.sign(ds) * distx.sqrt(), w) / cnt
    varx = mean_d - mean_signed**2
    # scVelo replaces a variance of 0 by 1; rounding can also leave it just below 0
    varx = torch.where(varx <= 0, torch.ones_like(varx), varx)
    n = (w.sum(1, keepdim=True).double() - 0.01 * data.u.shape[1]).clamp(min=2)
    loglik = -0.5 / n * _sum(distx, w) / varx - 0.5 * torch.log(2 * math.pi * varx.clamp(min=1e-30))
    loglik = torch.where(w.sum(1, keepdim=True) > 0, loglik, torch.full_like(loglik, math.nan))
    return torch.exp(loglik).to(p.alpha.dtype)


def r2(data: GeneData, p: Params, t: torch.Tensor) -> torch.Tensor:
    """R² of the fitted curve on the weighted cells, ``u`` and ``s`` in units of their spread."""
    ut, st = curve(t, p)
    w = data.weights
    du = (data.u - p.scaling * ut) / data.std_u
    ds = (data.s - st) / data.std_s
    sse = _sum(du * du + ds * ds, w)
    cu = (data.u - _masked_mean(data.u, w > 0)) / data.std_u
    cs = (data.s - _masked_mean(data.s, w > 0)) / data.std_s
    sst = _sum(cu * cu + cs * cs, w).clamp(min=_TINY)
    return (1 - sse / sst).to(p.alpha.dtype)


def velocities(
    data: GeneData, p: Params, t: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ScVelo's dynamical velocity at the cells' times, in count units.

    ``ds/dt = beta u(t) - gamma s(t)`` and ``du/dt = (alpha 1[induction] - beta u(t))
    scaling``, zero for cells in a steady state (scVelo's ``mode='velocity'``), clipped
    below at ``-s`` and ``-u`` as scVelo does.
    """
    ut, st = curve(t, p)
    moving = (state == INDUCTION) | (state == REPRESSION)
    on = t < p.t_
    alpha = (on & (t >= p.t_on)).to(t.dtype) * p.alpha
    vs = kinetics.velocity(ut, st, p.beta, p.gamma)
    vu = (alpha - p.beta * ut) * p.scaling
    vs = vs * moving.to(vs.dtype)
    vu = vu * moving.to(vu.dtype)
    return torch.maximum(vs, -data.s), torch.maximum(vu, -data.u)


def em_loss(data: GeneData, mom: Moments, p: Params, dist: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ScVelo's loss from the assigned distances: mean over weighted cells plus the ratio penalty."""
    penalty = (ratio_gap(p, ratio).double() ** 2) * mom.ss / data.std_s.double() ** 2
    return (_sum(dist, data.weights) + penalty) / mom.n


def alignment_factor(t: torch.Tensor, p: Params, t_max: float) -> torch.Tensor:
    """ScVelo's ``align_dynamics``: the factor that stretches a gene's time span to ``t_max``.

    The span is the longest induction time plus the longest repression time, divided by
    the share of cells not sitting exactly at time 0 or ``t_``.
    """
    zero = torch.zeros_like(t)
    span = torch.where(t < p.t_, t - p.t_on, zero).amax(1, keepdim=True)
    span = span + torch.where(t > p.t_, t - p.t_, zero).amax(1, keepdim=True)
    pinned = ((t == p.t_) | (t == 0)).to(t.dtype).mean(1, keepdim=True)
    denom = 1 - pinned
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    span = span / denom
    span = torch.where(span <= 0, torch.ones_like(span), span)
    return t_max / span


def grid_onset(
    data: GeneData,
    p: Params,
    t: torch.Tensor,
    ratio: torch.Tensor,
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
    mom = moments(data)
    best_loss, best = None, p
    for k in rate_grid:
        for t_on in t_on_grid:
            for dur in duration_grid:
                cand = p.replace(
                    t_on=torch.full_like(p.t_on, t_on),
                    t_=torch.full_like(p.t_, t_on + dur),
                    beta=p.beta * k,
                    gamma=p.gamma * k,
                )
                loss, cand = profiled_loss(data, mom, cand, t, ratio, reg=reg)
                if best_loss is None:
                    best_loss, best = loss, cand
                else:
                    better = loss < best_loss
                    best_loss = torch.where(better, loss, best_loss)
                    best = best.where(better, cand)
    return best
