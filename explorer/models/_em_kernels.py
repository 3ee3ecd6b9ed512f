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
the better one, then Gauss-Newton steps kept only where they help), with the logarithm
also in plain arithmetic (:func:`_log_unit`) so that every loop vectorises. Compiled once and
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
def _log_unit(x):  # pragma: no cover - compiled
    """``log(x)`` for ``2^-31 <= x <= 1`` in plain arithmetic, so that loops over cells vectorise.

    ``x`` is scaled by powers of two into ``[sqrt(1/2), sqrt(2))`` (selections, no
    branch), then ``log(x) = 2 atanh((x - 1) / (x + 1))`` by its series to the 23rd power
    (``|z| < 0.172``: truncation below 1e-17): within 1e-14 of libm's ``log`` (tested).
    The time inversion's ratios are clipped to ``[1e-6, 1 - 1e-6]``, inside that range.
    """
    e = 0.0
    small = x < 1.0 / 65536.0
    x = x * 65536.0 if small else x
    e = e - 16.0 if small else e
    small = x < 1.0 / 256.0
    x = x * 256.0 if small else x
    e = e - 8.0 if small else e
    small = x < 1.0 / 16.0
    x = x * 16.0 if small else x
    e = e - 4.0 if small else e
    small = x < 0.25
    x = x * 4.0 if small else x
    e = e - 2.0 if small else e
    small = x < 0.5
    x = x * 2.0 if small else x
    e = e - 1.0 if small else e
    small = x < 0.7071067811865476
    x = x * 2.0 if small else x
    e = e - 1.0 if small else e
    z = (x - 1.0) / (x + 1.0)
    z2 = z * z
    p = 1.0 + z2 * (1.0 / 3 + z2 * (1.0 / 5 + z2 * (1.0 / 7 + z2 * (1.0 / 9 + z2 * (1.0 / 11 + z2 * (
        1.0 / 13 + z2 * (1.0 / 15 + z2 * (1.0 / 17 + z2 * (1.0 / 19 + z2 * (1.0 / 21 + z2 / 23))))))))))
    return e * 0.6931471805599453 + 2.0 * z * p


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
def _decays(x_b, x_g, x_gap, b_slow):  # pragma: no cover - compiled
    """The exponentials of the analytic solution at ``x_b = beta tau``, ``x_g = gamma tau``.

    ``(e^{-x_b}, e^{-x_g}, expm1(-x_b), expm1(-x_g), slow, cross)`` with ``slow =
    e^{-min(beta, gamma) tau}`` (``b_slow``: ``beta <= gamma``) and ``cross = e^{-max tau} -
    e^{-min tau}``, or ``slow * expm1(-|gamma - beta| tau)`` by its series where that
    cancels (``x_gap = |gamma - beta| tau`` below 1e-3). Shared with VeloVAE's kernels
    (:mod:`explorer.models._vae_kernels`), which also need the parts.
    """
    e_b = _exp_neg(x_b)
    e_g = _exp_neg(x_g)
    em_b = _expm1_neg(x_b, e_b)
    em_g = _expm1_neg(x_g, e_g)
    slow = e_b if b_slow else e_g
    diff = (e_g - e_b) if b_slow else (e_b - e_g)
    cross_exp = slow * _expm1_neg(x_gap, 0.0) if x_gap < 1e-3 else diff
    return e_b, e_g, em_b, em_g, slow, cross_exp


@numba.njit(inline="always", fastmath=True, cache=True)
def _solution(tau, u0, s0, alpha, beta, gamma):  # pragma: no cover - compiled
    """``(u(tau), s(tau))``: :func:`explorer.kinetics.solution` for scalars, with two exponentials.

    The cross term ``e^{-min(beta, gamma) tau} expm1(-|gamma - beta| tau)`` is the
    difference of the two exponentials (or the series of ``expm1`` times the slower one
    where ``|gamma - beta| tau`` is small), the same number without a third call
    (:func:`_decays`).
    """
    gap = max(abs(gamma - beta), _RATE_GAP_FLOOR)
    e_b, e_g, em_b, em_g, _, cross_exp = _decays(beta * tau, gamma * tau, gap * tau, beta <= gamma)
    u = u0 * e_b - alpha / beta * em_b
    cross = (alpha - beta * u0) * cross_exp / gap
    return u, s0 * e_g - alpha / gamma * em_g + cross


@numba.njit(inline="always", fastmath=True, cache=True)
def _gene_curve_sums(u, s, w, t, g, ts, ton, b, c):  # pragma: no cover - compiled
    """Row ``g``'s four sums of :func:`curve_sums` for the parameters ``ts, ton, b, c``."""
    n_cells = u.shape[1]
    dur = max(ts - ton, 0.0)
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
    return suf, sff, ssg, sgg


@numba.njit(parallel=True, fastmath=True, cache=True)
def curve_sums(u, s, w, t, t_, t_on, beta, gamma):  # pragma: no cover - compiled
    """``(n_genes, 4)`` float64 sums over the cells weighted in ``w``: ``u f, f f, s g, g g``.

    ``(f, g)`` is the curve at times ``t`` for ``alpha = 1`` (``_em._curve``); ``u, s,
    w, t`` are ``(n_genes, n_cells)``, the parameters ``(n_genes,)`` float64. The loop
    over cells has no branch (selections), so it vectorises.
    """
    n_genes = u.shape[0]
    out = np.zeros((n_genes, 4))
    for g in numba.prange(n_genes):
        suf, sff, ssg, sgg = _gene_curve_sums(u, s, w, t, g, t_[g], t_on[g], beta[g], gamma[g])
        out[g, 0] = suf
        out[g, 1] = sff
        out[g, 2] = ssg
        out[g, 3] = sgg
    return out


@numba.njit(parallel=True, fastmath=True, cache=True)
def curve_sums_grid(u, s, w, t, t_, t_on, beta, gamma):  # pragma: no cover - compiled
    """:func:`curve_sums` for many candidate parameter sets in one call: ``(n_cand, n_genes, 4)``.

    The parameters are ``(n_cand, n_genes)`` float64, the data as :func:`curve_sums`'s;
    each gene and candidate is the same sums as that kernel's (the same compiled loop),
    with the candidates and genes in parallel together. The onset fit's grid
    (:func:`explorer.models._em.grid_onset`, 15 and 120 candidates) is then one call instead
    of one per candidate.
    """
    n_cand, n_genes = t_.shape
    out = np.zeros((n_cand, n_genes, 4))
    for i in numba.prange(n_cand * n_genes):
        k = i // n_genes
        g = i - k * n_genes
        suf, sff, ssg, sgg = _gene_curve_sums(u, s, w, t, g, t_[k, g], t_on[k, g], beta[k, g], gamma[k, g])
        out[k, g, 0] = suf
        out[k, g, 1] = sff
        out[k, g, 2] = ssg
        out[k, g, 3] = sgg
    return out


@numba.njit(inline="always", cache=True)
def _distance(u, s, ut, st, sc, std_u, std_s):  # pragma: no cover - compiled
    """Squared scaled distance of a cell ``(u, s)`` to the curve point ``(sc * ut, st)``."""
    du = (u - sc * ut) / std_u
    ds = (s - st) / std_s
    return du * du + ds * ds


@numba.njit(fastmath=_NO_CONTRACT, error_model="numpy", cache=True)
def _project_row(
    u, s, sc, std_u, std_s, u0, s0, alpha, beta, gamma, tau_max, n_newton, t_o, d_o, ut_o, st_o, tb_o
):  # pragma: no cover - compiled
    """``_em._project_branch`` for one gene's cells: the time in ``t_o``, the distance in ``d_o``.

    ``ut_o``, ``st_o`` keep the curve point and ``tb_o`` the second inversion: all
    ``(n_cells,)`` float64 arrays of their own. Both analytic inversions, the better one,
    then ``n_newton`` Gauss-Newton passes, each a loop over the cells without branches.
    Every loop vectorises (LLVM, AVX2 here), which took three things, each measured
    necessary: separate output arrays (the rows of one ``(5, n_cells)`` array, or its
    columns as before, are "unsafe dependent memory operations" to LLVM, which cannot
    prove that they do not overlap), numpy's error model (Python's raises on a division
    by zero, a branch out of the Gauss-Newton loop) and the logarithm in plain arithmetic
    (:func:`_log_unit`, as the exponential). 3-4x less CPU per E-step than the loops over
    interleaved columns with libm's ``log`` (0.12 s -> 0.035 s, 328 genes x 1,000 cells,
    one thread), with the same times, states and distances on that test bit for bit.
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
        t_o[j] = min(max(-_log_unit(ratio_u) / beta, 0.0), tau_max)
        ratio_s = min(max((s[j] - beta_ * us - xinf) / den_s, _LOG_EPS), 1 - _LOG_EPS)
        tb_o[j] = min(max(-_log_unit(ratio_s) / gamma, 0.0), tau_max)
    for j in range(n):
        uj = np.float64(u[j])
        sj = np.float64(s[j])
        ta = t_o[j]
        tb = tb_o[j]
        ua, sa = _solution(ta, u0, s0, alpha, beta, gamma)
        da = _distance(uj, sj, ua, sa, sc, std_u, std_s)
        ub, sb = _solution(tb, u0, s0, alpha, beta, gamma)
        db = _distance(uj, sj, ub, sb, sc, std_u, std_s)
        better = db < da
        t_o[j] = tb if better else ta
        d_o[j] = db if better else da
        ut_o[j] = ub if better else ua
        st_o[j] = sb if better else sa
    su = std_u / sc
    for _ in range(n_newton):
        for j in range(n):
            uj = np.float64(u[j])
            sj = np.float64(s[j])
            tau = t_o[j]
            d = d_o[j]
            ut = ut_o[j]
            st = st_o[j]
            ru = (ut - uj / sc) / su
            rs = (st - sj) / std_s
            ju = (alpha - beta * ut) / su
            js = (beta * ut - gamma * st) / std_s
            step = (ru * ju + rs * js) / (ju * ju + js * js + _TINY)
            new = min(max(tau - step, 0.0), tau_max)
            un, sn = _solution(new, u0, s0, alpha, beta, gamma)
            dn = _distance(uj, sj, un, sn, sc, std_u, std_s)
            better = dn < d
            t_o[j] = new if better else tau
            d_o[j] = dn if better else d
            ut_o[j] = un if better else ut
            st_o[j] = sn if better else st


@numba.njit(parallel=True, fastmath=_NO_CONTRACT, error_model="numpy", cache=True)
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
        # one array per quantity (see _project_row); w0-w2 are scratch, then the choices
        t_ind, d_ind_row = np.empty(n_cells), np.empty(n_cells)
        t_rep, d_rep = np.empty(n_cells), np.empty(n_cells)
        w0, w1, w2 = np.empty(n_cells), np.empty(n_cells), np.empty(n_cells)
        _project_row(ug, sg, sc, sdu, sds, 0.0, 0.0, a, b, c, dur, n_newton, t_ind, d_ind_row, w0, w1, w2)
        tau_max_rep = _LOG_1E4 / max(min(b, c), _TINY)
        _project_row(
            ug, sg, sc, sdu, sds, u0_, s0_, 0.0, b, c, tau_max_rep, n_newton, t_rep, d_rep, w0, w1, w2
        )
        if keep_all:
            for j in range(n_cells):
                uj = np.float64(ug[j])
                sj = np.float64(sg[j])
                dists[0, g, j] = d_rep[j]
                dists[1, g, j] = d_ind_row[j]
                dists[2, g, j] = _distance(uj, sj, 0.0, 0.0, 1.0, sdu, sds)
                dists[3, g, j] = _distance(uj, sj, u0_, s0_, sc, sdu, sds)
                times[0, g, j] = ts + t_rep[j]
                times[1, g, j] = ton + t_ind[j]
            continue
        # choices in float64 (t, dist, state) in the scratch arrays, one written per pass
        t_best, d_best, s_best = w0, w1, w2
        for j in range(n_cells):
            uj = np.float64(ug[j])
            sj = np.float64(sg[j])
            d_off = _distance(uj, sj, 0.0, 0.0, 1.0, sdu, sds)
            d_on = _distance(uj, sj, u0_, s0_, sc, sdu, sds)
            state, t, d = 0.0, ts + t_rep[j], d_rep[j]
            d_ind = d_ind_row[j]
            better = d_ind < d
            state = 1.0 if better else state
            t = ton + t_ind[j] if better else t
            d = d_ind if better else d
            better = d_off < d
            state = 2.0 if better else state
            t = 0.0 if better else t
            d = d_off if better else d
            better = d_on < d
            state = 3.0 if better else state
            t = ts if better else t
            d = d_on if better else d
            t_best[j] = t
            d_best[j] = d
            s_best[j] = state
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
                better = d_prev < d_best[j]
                t_best[j] = tp if better else t_best[j]
                s_best[j] = (1.0 if before else 0.0) if better else s_best[j]
                d_best[j] = d_prev if better else d_best[j]
        for j in range(n_cells):
            t_out[g, j] = t_best[j]
            dist_out[g, j] = d_best[j]
            state_out[g, j] = np.int8(s_best[j])
    return t_out, state_out, dist_out
