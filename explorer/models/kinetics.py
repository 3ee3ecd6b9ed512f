"""The splicing ODE and its analytic solution, written once for every model.

``du/dt = alpha - beta u``, ``ds/dt = beta u - gamma s`` (La Manno et al. 2018; Bergen
et al. 2020, eq. 1-2). Every function takes the array namespace as ``xp`` (``numpy`` or
``torch``), so this module never imports torch and the same formula serves the numpy
steady-state code, the torch EM of the dynamical model and the simulator. All inputs
broadcast against each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: below this |gamma - beta| the beta == gamma limit of ``spliced`` is used, avoiding 0/0
_EQUAL_RATES_TOL = 1e-6


def unspliced(tau: Any, u0: Any, alpha: Any, beta: Any, *, xp: Any = np) -> Any:
    """Unspliced abundance ``u(tau)`` starting from ``u0`` with constant ``alpha``.

    ``u(tau) = u0 e^{-beta tau} + alpha / beta (1 - e^{-beta tau})``.
    """
    expu = xp.exp(-beta * tau)
    return u0 * expu + alpha / beta * (1 - expu)


def spliced(tau: Any, s0: Any, u0: Any, alpha: Any, beta: Any, gamma: Any, *, xp: Any = np) -> Any:
    """Spliced abundance ``s(tau)`` starting from ``(u0, s0)`` with constant ``alpha``.

    ``s(tau) = s0 e^{-gamma tau} + alpha/gamma (1 - e^{-gamma tau})
    + (alpha - beta u0)/(gamma - beta) (e^{-gamma tau} - e^{-beta tau})``, and its limit
    ``(beta u0 - alpha) tau e^{-beta tau}`` for the last term when ``gamma == beta``
    (scVelo drops that term instead, which is wrong at equal rates).
    """
    expu, exps = xp.exp(-beta * tau), xp.exp(-gamma * tau)
    diff = gamma - beta
    close = xp.abs(diff) < _EQUAL_RATES_TOL
    safe = xp.where(close, xp.ones_like(diff * tau), diff)
    cross = xp.where(close, (beta * u0 - alpha) * tau * expu, (alpha - beta * u0) / safe * (exps - expu))
    return s0 * exps + alpha / gamma * (1 - exps) + cross


def switch_state(t_: Any, alpha: Any, beta: Any, gamma: Any, *, xp: Any = np) -> tuple[Any, Any]:
    """``(u0_, s0_)``: where induction from ``(0, 0)`` stands at the switch time ``t_``."""
    u0_ = unspliced(t_, 0.0, alpha, beta, xp=xp)
    s0_ = spliced(t_, 0.0, 0.0, alpha, beta, gamma, xp=xp)
    return u0_, s0_


def trajectory(
    t: Any,
    t_: Any,
    alpha: Any,
    beta: Any,
    gamma: Any,
    *,
    t_on: Any = 0.0,
    xp: Any = np,
) -> tuple[Any, Any]:
    """``(u(t), s(t))`` of the on/off model at absolute time ``t``.

    The gene is off (``u = s = 0``) before ``t_on``, induced with rate ``alpha`` from
    ``t_on`` to ``t_``, then represses with ``alpha = 0``. ``t_`` is absolute, so the
    induction lasts ``t_ - t_on``.
    """
    tau_on = xp.clip(t - t_on, 0, None) if xp is np else xp.clamp(t - t_on, min=0)
    dur = t_ - t_on
    u0_, s0_ = switch_state(dur, alpha, beta, gamma, xp=xp)
    induction = t < t_
    tau = xp.where(induction, tau_on, t - t_)
    a = xp.where(induction, alpha, xp.zeros_like(alpha * tau))
    u0 = xp.where(induction, xp.zeros_like(u0_ * tau), u0_)
    s0 = xp.where(induction, xp.zeros_like(s0_ * tau), s0_)
    return unspliced(tau, u0, a, beta, xp=xp), spliced(tau, s0, u0, a, beta, gamma, xp=xp)


def steady_state(alpha: Any, beta: Any, gamma: Any) -> tuple[Any, Any]:
    """``(u_inf, s_inf) = (alpha / beta, alpha / gamma)``: the induction steady state."""
    return alpha / beta, alpha / gamma


def velocity(u: Any, s: Any, beta: Any, gamma: Any) -> Any:
    """Spliced velocity ``ds/dt = beta u - gamma s``."""
    return beta * u - gamma * s
