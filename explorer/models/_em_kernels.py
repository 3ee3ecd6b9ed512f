"""Compiled CPU kernels of the dynamical model's EM: the ODE, projection and loss in one loop.

:mod:`explorer.models._em` writes the EM as torch tensor code over ``(n_genes, n_cells)``;
on the CPU each of its element-wise steps is one pass over memory, and the two hottest
functions (the time assignment, :func:`explorer.models._em.assign`, and the sums of the
profiled loss, :func:`explorer.models._em.profiled_loss`) made about fifty such passes
per call, five transcendental functions per evaluation of the analytic solution among
them. Here each is one compiled pass per gene (genes in parallel), with per-gene constants
computed once, no temporaries and float64 arithmetic on the float32 data; the sums come
out in float64 as before.

The maths is that of the torch code it replaces (and is tested against it):
:func:`_solution` is :func:`explorer.kinetics.solution` for scalars, with two
exponentials per evaluation instead of five transcendental calls, each in plain
arithmetic (:func:`_exp_neg`) so that the loss's loop over cells vectorises; the
projection is :func:`explorer.models._em._project_branch` (both analytic inversions,
the better one, then Gauss-Newton steps kept only where they help). Compiled once and
cached on disk (``cache=True``: next to the source, or under ``NUMBA_CACHE_DIR``), so a
command pays the compilation only after this file changes.
"""

from __future__ import annotations

import math

import numba
import numpy as np

#: the constants of :mod:`explorer.models._em` and :mod:`explorer.kinetics`, repeated
#: because a compiled function reads globals at compile time (a test checks they agree)
_LOG_EPS = 1e-6
_TINY = 1e-8
_RATE_GAP_FLOOR = 1e-20
#: the repression branch is followed until u has decayed to 1e-4 of its start
_LOG_1E4 = math.log(1e4)
#: fast-math without fused multiply-adds: the time assignment compares distances computed
#: in different loops (a cell at the switch point is as far from the repression branch at
#: tau = 0 as from the upper steady state), and contracting one of them into an FMA but
#: not the other would break such exact ties differently from the torch code
_NO_CONTRACT = {"nnan", "ninf", "nsz", "arcp", "afn"}


@numba.njit(inline="always", fastmath=True, cache=True)
def _exp_neg(x):  # pragma: no cover - compiled
    """``exp(-x)`` for ``x >= 0`` in plain arithmetic, so that loops over cells vectorise.

    ``(P(-x / 1024))^1024`` with ``P`` the degree-13 Taylor polynomial of ``e^r`` on
    ``[-0.684, 0]`` (``x`` capped at 700, where ``e^{-x}`` is already below 1e-304):
    within 1e-10 relative of libm's ``exp`` (tested), about 4x faster than its scalar
    call in a vectorised loop (numba has no vector math library here).
    """
    r = -min(x, 700.0) * (1.0 / 1024.0)
    p = 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (
        1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880 + r * (
            1.0 / 3628800 + r * (1.0 / 39916800 + r * (1.0 / 479001600 + r / 6227020800.0))))))))))))
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    return p * p


@numba.njit(inline="always", fastmath=True, cache=True)
def _expm1_neg(x, e):  # pragma: no cover - compiled
    """``expm1(-x)`` for ``x >= 0`` given ``e = exp(-x)``: ``e - 1``, or its series where that cancels.

    Below ``x = 1e-3`` the five-term series is exact to float64 rounding; above, ``e - 1``
    loses at most ``1e-13`` relative, far below the float32 data (no branch: both are
    computed and one is selected, which keeps loops vectorisable).
    """
    series = -x * (1.0 - x * (0.5 - x * (1.0 / 6.0 - x * (1.0 / 24.0 - x / 120.0))))
    return series if x < 1e-3 else e - 1.0


@numba.njit(inline="always", fastmath=True, cache=True)
def _solution(tau, u0, s0, alpha, beta, gamma):  # pragma: no cover - compiled
    """``(u(tau), s(tau))``: :func:`explorer.kinetics.solution` for scalars, with two exponentials.

    The cross term ``e^{-min(beta, gamma) tau} expm1(-|gamma - beta| tau)`` is the
    difference of the two exponentials (or the series of ``expm1`` times the slower one
    where ``|gamma - beta| tau`` is small), the same number without a third call.
    """
    x_b = beta * tau
    x_g = gamma * tau
    e_b = _exp_neg(x_b)
    e_g = _exp_neg(x_g)
    em_b = _expm1_neg(x_b, e_b)
    em_g = _expm1_neg(x_g, e_g)
    u = u0 * e_b - alpha / beta * em_b
    gap = max(abs(gamma - beta), _RATE_GAP_FLOOR)
    x_gap = gap * tau
    b_slow = beta <= gamma
    slow = e_b if b_slow else e_g
    # e^{-max tau} - e^{-min tau}, or slow * expm1(-gap tau) by its series where that cancels
    diff = (e_g - e_b) if b_slow else (e_b - e_g)
    cross_exp = slow * _expm1_neg(x_gap, 0.0) if x_gap < 1e-3 else diff
    cross = (alpha - beta * u0) * cross_exp / gap
    return u, s0 * e_g - alpha / gamma * em_g + cross


@numba.njit(parallel=True, fastmath=True, cache=True)
def curve_sums(u, s, w, t, t_, t_on, beta, gamma):  # pragma: no cover - compiled
    """``(n_genes, 4)`` float64 sums over the cells weighted in ``w``: ``u f, f f, s g, g g``.

    ``(f, g)`` is the curve at times ``t`` for ``alpha = 1`` (``_em._curve``); ``u, s,
    w, t`` are ``(n_genes, n_cells)``, the parameters ``(n_genes,)`` float64. The loop
    over cells has no branch (selections), so it vectorises.
    """
    n_genes, n_cells = u.shape
    out = np.zeros((n_genes, 4))
    for g in numba.prange(n_genes):
        b, c, ts = beta[g], gamma[g], t_[g]
        dur = max(ts - t_on[g], 0.0)
        u0_, s0_ = _solution(dur, 0.0, 0.0, 1.0, b, c)
        start = ts - dur
        suf = 0.0
        sff = 0.0
        ssg = 0.0
        sgg = 0.0
        for j in range(n_cells):
            tj = np.float64(t[g, j])
            ind = tj < ts
            tau = max(tj - start, 0.0) if ind else tj - ts
            f, gg = _solution(tau, 0.0 if ind else u0_, 0.0 if ind else s0_, 1.0 if ind else 0.0, b, c)
            wj = np.float64(w[g, j])
            f = f * wj
            gg = gg * wj
            suf += u[g, j] * f
            sff += f * f
            ssg += s[g, j] * gg
            sgg += gg * gg
        out[g, 0] = suf
        out[g, 1] = sff
        out[g, 2] = ssg
        out[g, 3] = sgg
    return out


@numba.njit(inline="always", cache=True)
def _distance(u, s, ut, st, sc, std_u, std_s):  # pragma: no cover - compiled
    """Squared scaled distance of a cell ``(u, s)`` to the curve point ``(sc * ut, st)``."""
    du = (u - sc * ut) / std_u
    ds = (s - st) / std_s
    return du * du + ds * ds


@numba.njit(fastmath=_NO_CONTRACT, cache=True)
def _project_row(
    u, s, sc, std_u, std_s, u0, s0, alpha, beta, gamma, tau_max, n_newton, out
):  # pragma: no cover - compiled
    """``_em._project_branch`` for one gene's cells: ``out[:, 0]`` the time, ``out[:, 1]`` the distance.

    ``out`` is ``(n_cells, 5)``: columns 2-3 keep the curve point and 4 the second
    inversion. Both analytic inversions (libm's ``log``, one loop), the better one, then
    ``n_newton`` Gauss-Newton passes, each a loop over the cells without branches that
    writes one array. (LLVM does not vectorise these loops, measured: the E-step gains
    1.2-1.4x over torch, the loss's vectorised loop 3x.)
    """
    n = u.shape[0]
    uinf = alpha / beta
    den_u = u0 - uinf
    if abs(den_u) < _TINY:
        den_u = -_TINY
    diff = gamma - beta
    if abs(diff) < _TINY:
        diff = _TINY
    beta_ = beta / diff
    xinf = alpha / gamma - beta_ * uinf
    den_s = s0 - beta_ * u0 - xinf
    if abs(den_s) < _TINY:
        den_s = _TINY
    for j in range(n):
        us = u[j] / sc
        ratio_u = min(max((us - uinf) / den_u, _LOG_EPS), 1 - _LOG_EPS)
        out[j, 0] = min(max(-math.log(ratio_u) / beta, 0.0), tau_max)
        ratio_s = min(max((s[j] - beta_ * us - xinf) / den_s, _LOG_EPS), 1 - _LOG_EPS)
        out[j, 4] = min(max(-math.log(ratio_s) / gamma, 0.0), tau_max)
    for j in range(n):
        uj = np.float64(u[j])
        sj = np.float64(s[j])
        ta = out[j, 0]
        tb = out[j, 4]
        ua, sa = _solution(ta, u0, s0, alpha, beta, gamma)
        da = _distance(uj, sj, ua, sa, sc, std_u, std_s)
        ub, sb = _solution(tb, u0, s0, alpha, beta, gamma)
        db = _distance(uj, sj, ub, sb, sc, std_u, std_s)
        better = db < da
        out[j, 0] = tb if better else ta
        out[j, 1] = db if better else da
        out[j, 2] = ub if better else ua
        out[j, 3] = sb if better else sa
    su = std_u / sc
    for _ in range(n_newton):
        for j in range(n):
            uj = np.float64(u[j])
            sj = np.float64(s[j])
            tau = out[j, 0]
            d = out[j, 1]
            ut = out[j, 2]
            st = out[j, 3]
            ru = (ut - uj / sc) / su
            rs = (st - sj) / std_s
            ju = (alpha - beta * ut) / su
            js = (beta * ut - gamma * st) / std_s
            step = (ru * ju + rs * js) / (ju * ju + js * js + _TINY)
            new = min(max(tau - step, 0.0), tau_max)
            un, sn = _solution(new, u0, s0, alpha, beta, gamma)
            dn = _distance(uj, sj, un, sn, sc, std_u, std_s)
            better = dn < d
            out[j, 0] = new if better else tau
            out[j, 1] = dn if better else d
            out[j, 2] = un if better else ut
            out[j, 3] = sn if better else st


@numba.njit(parallel=True, fastmath=_NO_CONTRACT, cache=True)
def assign_states(
    u, s, std_u, std_s, alpha, beta, gamma, t_, scaling, t_on, n_newton, t_prev, use_prev, dists, times
):  # pragma: no cover - compiled
    """``_em.assign``'s four-state assignment for every cell and gene.

    ``u, s`` (and ``t_prev``, read only with ``use_prev``) are ``(n_genes, n_cells)``,
    the parameters ``(n_genes,)`` float64. With ``dists`` of shape ``(4, n_genes,
    n_cells)`` the distances to the four states (repression, induction, off, on) and in
    ``times`` the two branch times are written there, and nothing is chosen (the caller
    compares neighbourhood averages). Otherwise returns ``(t, state, dist)``: the closest
    state (ties keep the earlier one, as ``argmin``), or ``t_prev`` where that is
    closer still.
    """
    n_genes, n_cells = u.shape
    keep_all = dists.shape[0] == 4
    t_out = np.empty((n_genes, n_cells), dtype=np.float32)
    state_out = np.empty((n_genes, n_cells), dtype=np.int8)
    dist_out = np.empty((n_genes, n_cells), dtype=np.float32)
    for g in numba.prange(n_genes):
        a, b, c, ts, ton, sc = alpha[g], beta[g], gamma[g], t_[g], t_on[g], scaling[g]
        sdu, sds = std_u[g], std_s[g]
        dur = max(ts - ton, 0.0)
        start = ts - dur
        u0_, s0_ = _solution(dur, 0.0, 0.0, a, b, c)
        ug, sg = u[g], s[g]
        ind = np.empty((n_cells, 5))
        rep = np.empty((n_cells, 5))
        _project_row(ug, sg, sc, sdu, sds, 0.0, 0.0, a, b, c, dur, n_newton, ind)
        tau_max_rep = _LOG_1E4 / max(min(b, c), _TINY)
        _project_row(ug, sg, sc, sdu, sds, u0_, s0_, 0.0, b, c, tau_max_rep, n_newton, rep)
        if keep_all:
            for j in range(n_cells):
                uj = np.float64(ug[j])
                sj = np.float64(sg[j])
                dists[0, g, j] = rep[j, 1]
                dists[1, g, j] = ind[j, 1]
                dists[2, g, j] = _distance(uj, sj, 0.0, 0.0, 1.0, sdu, sds)
                dists[3, g, j] = _distance(uj, sj, u0_, s0_, sc, sdu, sds)
                times[0, g, j] = ts + rep[j, 0]
                times[1, g, j] = ton + ind[j, 0]
            continue
        # choices in float64 (t, dist, state) in rep's spare columns, one array written per pass
        for j in range(n_cells):
            uj = np.float64(ug[j])
            sj = np.float64(sg[j])
            d_off = _distance(uj, sj, 0.0, 0.0, 1.0, sdu, sds)
            d_on = _distance(uj, sj, u0_, s0_, sc, sdu, sds)
            state, t, d = 0.0, ts + rep[j, 0], rep[j, 1]
            d_ind = ind[j, 1]
            better = d_ind < d
            state = 1.0 if better else state
            t = ton + ind[j, 0] if better else t
            d = d_ind if better else d
            better = d_off < d
            state = 2.0 if better else state
            t = 0.0 if better else t
            d = d_off if better else d
            better = d_on < d
            state = 3.0 if better else state
            t = ts if better else t
            d = d_on if better else d
            rep[j, 2] = t
            rep[j, 3] = d
            rep[j, 4] = state
        if use_prev:
            tpg = t_prev[g]
            for j in range(n_cells):
                tp = np.float64(tpg[j])
                before = tp < ts
                tau = max(tp - start, 0.0) if before else tp - ts
                ut, st = _solution(
                    tau, 0.0 if before else u0_, 0.0 if before else s0_, a if before else 0.0, b, c
                )
                d_prev = _distance(np.float64(ug[j]), np.float64(sg[j]), ut, st, sc, sdu, sds)
                better = d_prev < rep[j, 3]
                rep[j, 2] = tp if better else rep[j, 2]
                rep[j, 4] = (1.0 if before else 0.0) if better else rep[j, 4]
                rep[j, 3] = d_prev if better else rep[j, 3]
        for j in range(n_cells):
            t_out[g, j] = rep[j, 2]
            dist_out[g, j] = rep[j, 3]
            state_out[g, j] = np.int8(rep[j, 4])
    return t_out, state_out, dist_out
