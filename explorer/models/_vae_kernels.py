"""Compiled CPU kernels of VeloVAE: the ODE decoder's Gaussian log-likelihood and its gradient in one loop.

On the CPU a VeloVAE training step spent about half its time outside the networks'
matrix products, in some ninety element-wise torch operations over ``(cells, genes)``:
the on/off trajectory of :func:`explorer.kinetics.trajectory` from ``(0, 0)``, the cell's
relative rate ``rho``, the clamps, the scaling and the likelihood, then autograd's
backward through each of them. Here the forward pass is one compiled loop per cell that
sums the log-likelihood, and the backward pass one loop that recomputes the trajectory
and accumulates every gradient analytically (derivatives below), in float64 on the
float32 tensors. :class:`explorer.models._vae_module.VAEModule` uses them on the CPU
when the cells are solved from ``(0, 0)`` (stage 1, the state stage, the polish and
every evaluation); on CUDA, and for stage 2's per-cell starts, it keeps the torch code,
which the tests compare these kernels with.

Per cell ``i`` and gene ``g``, with ``tau`` the time since the onset ``t_start`` (during
induction, ``t < t_off``; before the onset ``tau = 0``) or since the switch ``t_off``
(repression, from the switch state ``(u0, s0)`` and with rate 0)::

    u = u0 e^{-beta tau} - (a / beta) expm1(-beta tau)
    s = s0 e^{-gamma tau} - (a / gamma) expm1(-gamma tau) + (a - beta u0) D
    D = (e^{-gamma tau} - e^{-beta tau}) / (gamma - beta)
    ll_i = -1/2 sum_g ((Mu - scaling max(rho u, 0))^2 / sigma_u^2 + (Ms - max(rho s, 0))^2 / sigma_s^2)

(the constant of the Gaussian is added by the caller). The derivatives: ``d/dtau`` is the
velocity (``a - beta u``, ``beta u - gamma s``), so ``d/dt = d/dtau`` and ``d/dt_start``
(induction) or ``d/dt_off`` (repression) is its negative; ``du/da = -expm1(-beta tau) / beta``,
``ds/da = -expm1(-gamma tau) / gamma + D``; ``du/dbeta = -tau u0 e^{-beta tau} + (a / beta)
(expm1(-beta tau) / beta + tau e^{-beta tau})``, ``ds/dbeta = -u0 D + (a - beta u0) dD/dbeta``,
``ds/dgamma = -tau s0 e^{-gamma tau} + (a / gamma)(expm1(-gamma tau) / gamma + tau
e^{-gamma tau}) + (a - beta u0) dD/dgamma``; with ``x = |gamma - beta| tau``,
``phi = -expm1(-x) / x`` and ``slow = e^{-min(beta, gamma) tau}``, ``D = -tau slow phi``
and the derivative of ``D`` by the larger rate is ``tau^2 slow (phi - e^{-x}) / x``, by the
smaller ``tau^2 slow (1 - phi) / x`` (both ``tau^2 slow / 2`` at equal rates, where their
series are used). The start ``(u0, s0)`` is a per-gene input: its gradient goes back
through :func:`explorer.kinetics.switch_state` by autograd, over genes only.
"""

from __future__ import annotations

import numba
import numpy as np

from explorer.kinetics import _RATE_GAP_FLOOR
from explorer.models._em_kernels import _decays

#: below this ``x = |gamma - beta| tau`` the derivatives of ``D`` use their series
_SERIES_BELOW = 1e-2
#: cells are split into this many contiguous chunks, each summing its own per-gene
#: gradients: a fixed number, so that the sums' order (and the result) does not depend
#: on the number of threads
_N_CHUNKS = 8


#: the rows of :func:`gene_constants`, by name; the kernels read them by these indices
#: (module-level integers, constants to numba)
_ROWS = ("t_start", "t_off", "alpha", "beta", "gamma", "1/beta", "1/gamma", "gap", "1/gap", "beta<=gamma",
         "u0", "s0", "scaling", "1/sigma_u^2", "1/sigma_s^2")  # fmt: skip
(_T_START, _T_OFF, _ALPHA, _BETA, _GAMMA, _INV_BETA, _INV_GAMMA, _GAP, _INV_GAP, _B_SLOW,
 _U0, _S0, _SCALING, _W_U, _W_S) = range(len(_ROWS))  # fmt: skip


def gene_constants(ts, to, alpha, beta, gamma, u0_, s0_, scaling, wu, ws):
    """``(15, G)`` float64 rows of per-gene constants the kernels read (:data:`_ROWS`).

    ``ts, to`` the onset and switch, ``u0_, s0_`` the switch state (ODE units), ``wu, ws``
    the noise weights ``1 / sigma^2``; the reciprocals and ``|gamma - beta|`` (floored as
    :mod:`explorer.kinetics` floors it) are computed once here.
    """
    b = np.asarray(beta, dtype=np.float64)
    c = np.asarray(gamma, dtype=np.float64)
    gap = np.maximum(np.abs(c - b), _RATE_GAP_FLOOR)
    rows = (ts, to, alpha, b, c, 1 / b, 1 / c, gap, 1 / gap, (b <= c), u0_, s0_, scaling, wu, ws)
    return np.stack([np.asarray(r, dtype=np.float64) for r in rows])


@numba.njit(inline="always", fastmath=True, cache=True)
def _element(ti, k, g):  # pragma: no cover - compiled
    """The trajectory at cell time ``ti`` for gene ``g`` (constants ``k``): ``(u, s)`` and what the gradient needs."""
    ts = k[_T_START, g]
    to = k[_T_OFF, g]
    b = k[_BETA, g]
    c = k[_GAMMA, g]
    ind = ti < to
    rel = ti - ts
    tau = max(rel, 0.0) if ind else ti - to
    a = k[_ALPHA, g] if ind else 0.0
    u0 = 0.0 if ind else k[_U0, g]
    s0 = 0.0 if ind else k[_S0, g]
    x_gap = k[_GAP, g] * tau
    b_slow = k[_B_SLOW, g] > 0.5
    e_b, e_g, em_b, em_g, slow, cross_exp = _decays(b * tau, c * tau, x_gap, b_slow)
    d = cross_exp * k[_INV_GAP, g]
    coef = a - b * u0
    u = u0 * e_b - a * k[_INV_BETA, g] * em_b
    s = s0 * e_g - a * k[_INV_GAMMA, g] * em_g + coef * d
    return ind, rel, tau, a, u0, s0, e_b, e_g, em_b, em_g, x_gap, b_slow, slow, d, coef, u, s


@numba.njit(inline="always", fastmath=True, cache=True)
def _trajectory(ti, k, g):  # pragma: no cover - compiled
    """``(induced, ti - t_start, rate, u, s)``: what the likelihood and predictions read."""
    ind, rel, _tau, a, _u0, _s0, _eb, _eg, _emb, _emg, _x, _bs, _sl, _d, _co, u, s = _element(ti, k, g)
    return ind, rel, a, u, s


@numba.njit(parallel=True, fastmath=True, cache=True)
def loglik(t, rho, mu, ms, k):  # pragma: no cover - compiled
    """``(n,)`` float64: each cell's ``-1/2`` weighted squared residuals summed over genes.

    ``t`` is ``(n,)``; ``rho``, ``mu``, ``ms`` ``(n, G)``; ``k`` the genes' constants
    (:func:`gene_constants`).
    """
    n, n_genes = rho.shape
    out = np.zeros(n)
    for i in numba.prange(n):
        ti = np.float64(t[i])
        acc = 0.0
        for g in range(n_genes):
            _ind, _rel, _a, u, s = _trajectory(ti, k, g)
            r = np.float64(rho[i, g])
            ru = np.float64(mu[i, g]) - k[_SCALING, g] * max(r * u, 0.0)
            rs = np.float64(ms[i, g]) - max(r * s, 0.0)
            acc += ru * ru * k[_W_U, g] + rs * rs * k[_W_S, g]
        out[i] = -0.5 * acc
    return out


@numba.njit(inline="always", fastmath=True, cache=True)
def _psi_chi(x, slow_to_fast):  # pragma: no cover - compiled
    """``((phi - e^{-x}) / x, (1 - phi) / x)`` with ``phi = -expm1(-x) / x``; ``slow_to_fast = e^{-x}``."""
    psi_s = 0.5 + x * (-1.0 / 3 + x * (1.0 / 8 + x * (-1.0 / 30 + x / 144)))
    chi_s = 0.5 + x * (-1.0 / 6 + x * (1.0 / 24 + x * (-1.0 / 120 + x / 720)))
    inv = 1.0 / max(x, _SERIES_BELOW)
    phi = (1.0 - slow_to_fast) * inv
    psi = (phi - slow_to_fast) * inv
    chi = (1.0 - phi) * inv
    small = x < _SERIES_BELOW
    return (psi_s if small else psi), (chi_s if small else chi)


@numba.njit(fastmath=True, cache=True)
def _grad_rows(grad, t, rho, mu, ms, k, lo, hi, g_t, g_rho, acc):  # pragma: no cover - compiled
    """:func:`loglik_grad` for cells ``lo:hi``, the per-gene sums added to the rows of ``acc``."""
    n_genes = rho.shape[1]
    a_start, a_off, a_alpha, a_beta, a_gamma, a_u0, a_s0, a_scaling = acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]
    for i in range(lo, hi):
        ti = np.float64(t[i])
        gi = np.float64(grad[i])
        acc_t = 0.0
        row = g_rho[i]
        for g in range(n_genes):
            res = _element(ti, k, g)
            ind, rel, tau, a, u0, s0, e_b, e_g, em_b, em_g, x_gap, b_slow, slow, d, coef, u, s = res
            b = k[_BETA, g]
            c = k[_GAMMA, g]
            inv_b = k[_INV_BETA, g]
            inv_c = k[_INV_GAMMA, g]
            r = np.float64(rho[i, g])
            sc = k[_SCALING, g]
            pu = r * u
            ps = r * s
            pu_c = max(pu, 0.0)
            ps_c = max(ps, 0.0)
            # d(-1/2 w res^2) / d prediction = w res
            d_uh = gi * (np.float64(mu[i, g]) - sc * pu_c) * k[_W_U, g]
            d_ps = gi * (np.float64(ms[i, g]) - ps_c) * k[_W_S, g]
            a_scaling[g] += d_uh * pu_c
            d_pu = d_uh * sc if pu >= 0.0 else 0.0
            d_ps = d_ps if ps >= 0.0 else 0.0
            row[g] = d_pu * u + d_ps * s
            gu = d_pu * r
            gs = d_ps * r
            # d/dtau: the velocity (zero before the onset, where tau is clamped)
            gtau = 0.0 if (ind and rel < 0.0) else gu * (a - b * u) + gs * (b * u - c * s)
            on = 1.0 if ind else 0.0
            off = 1.0 - on
            acc_t += gtau
            a_start[g] -= gtau * on
            a_off[g] -= gtau * off
            a_alpha[g] += (gu * (-em_b * inv_b) + gs * (-em_g * inv_c + d)) * on
            a_u0[g] += (gu * e_b - gs * b * d) * off
            a_s0[g] += gs * e_g * off
            fast = e_g if b_slow else e_b
            ratio = fast / max(slow, 1e-300)
            psi, chi = _psi_chi(x_gap, ratio)
            t2s = tau * tau * slow
            d_b = t2s * (chi if b_slow else psi)
            d_g = t2s * (psi if b_slow else chi)
            du_b = -tau * u0 * e_b + a * inv_b * (em_b * inv_b + tau * e_b)
            ds_b = -u0 * d + coef * d_b
            ds_g = -tau * s0 * e_g + a * inv_c * (em_g * inv_c + tau * e_g) + coef * d_g
            a_beta[g] += gu * du_b + gs * ds_b
            a_gamma[g] += gs * ds_g
        g_t[i] = acc_t


@numba.njit(parallel=True, fastmath=True, cache=True)
def loglik_grad(grad, t, rho, mu, ms, k):  # pragma: no cover - compiled
    """Gradients of ``sum_i grad[i] * loglik[i]``.

    Returns ``(g_t (n,), g_rho (n, G) float32, g_genes (8, G))``, the rows of ``g_genes``
    by ``t_start, t_off, alpha, beta, gamma, u0, s0, scaling``.
    """
    n, n_genes = rho.shape
    g_t = np.zeros(n)
    g_rho = np.zeros((n, n_genes), dtype=np.float32)
    chunks = min(_N_CHUNKS, n)
    partial = np.zeros((chunks, 8, n_genes))
    for ch in numba.prange(chunks):
        _grad_rows(grad, t, rho, mu, ms, k, ch * n // chunks, (ch + 1) * n // chunks, g_t, g_rho, partial[ch])
    g_genes = np.zeros((8, n_genes))
    for ch in range(chunks):
        g_genes += partial[ch]
    return g_t, g_rho, g_genes


@numba.njit(parallel=True, fastmath=True, cache=True)
def predict(t, rho, k):  # pragma: no cover - compiled
    """``(u_hat, s_hat, du/dt, ds/dt)``, each ``(n, G)`` float32: :meth:`VAEModule.decode` from ``(0, 0)``.

    ``u_hat = scaling max(rho u, 0)`` and ``s_hat = max(rho s, 0)``; the velocities at
    those, with the rate ``rho alpha`` in force after the onset and before the switch.
    """
    n, n_genes = rho.shape
    out = np.empty((4, n, n_genes), dtype=np.float32)
    for i in numba.prange(n):
        ti = np.float64(t[i])
        for g in range(n_genes):
            ind, rel, a, u, s = _trajectory(ti, k, g)
            r = np.float64(rho[i, g])
            sc = k[_SCALING, g]
            u_c = max(r * u, 0.0)
            s_c = max(r * s, 0.0)
            rate = r * a if (ind and rel >= 0.0) else 0.0
            b = k[_BETA, g]
            out[0, i, g] = sc * u_c
            out[1, i, g] = s_c
            out[2, i, g] = (rate - b * u_c) * sc
            out[3, i, g] = b * u_c - k[_GAMMA, g] * s_c
    return out
