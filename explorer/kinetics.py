"""The splicing ODE and its analytic solution, written once for every model.

``du/dt = alpha - beta u``, ``ds/dt = beta u - gamma s`` (La Manno et al. 2018; Bergen
et al. 2020, eq. 1-2). Every function takes the array namespace as ``xp`` (``numpy`` or
``torch``), so this module never imports torch and the same formula serves the numpy
steady-state code, the torch EM of the dynamical model and the simulator. All inputs
broadcast against each other.

:func:`fitted_gene` reads one gene's fit back from its ``var`` row (scVelo's keys) and is
what every drawn curve goes through (the app's phase portrait, time views, comparison
and exported figures), so a curve on screen is exactly the one that produced ``fit_t``
and the velocities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from explorer.keys import Key

if TYPE_CHECKING:
    from collections.abc import Mapping

#: floor on |gamma - beta| in the cross term of ``spliced``: ``expm1(-d tau) / d`` equals
#: ``-tau`` to machine precision for any ``d`` this small, so no special case is needed
_RATE_GAP_FLOOR = 1e-20


def _floor(x: Any, value: float, xp: Any) -> Any:
    return xp.maximum(x, value) if xp is np else x.clamp(min=value)


def unspliced(tau: Any, u0: Any, alpha: Any, beta: Any, *, xp: Any = np) -> Any:
    """Unspliced abundance ``u(tau)`` starting from ``u0`` with constant ``alpha``.

    ``u(tau) = u0 e^{-beta tau} + alpha / beta (1 - e^{-beta tau})``, with
    ``1 - e^{-x}`` as ``-expm1(-x)`` (exact for small ``beta tau``).
    """
    return u0 * xp.exp(-beta * tau) - alpha / beta * xp.expm1(-beta * tau)


def spliced(tau: Any, s0: Any, u0: Any, alpha: Any, beta: Any, gamma: Any, *, xp: Any = np) -> Any:
    """Spliced abundance ``s(tau)`` starting from ``(u0, s0)`` with constant ``alpha``.

    ``s(tau) = s0 e^{-gamma tau} + alpha/gamma (1 - e^{-gamma tau})
    + (alpha - beta u0)/(gamma - beta) (e^{-gamma tau} - e^{-beta tau})``.

    The last term is evaluated as ``(alpha - beta u0) e^{-m tau} expm1(-|d| tau) / |d|``
    with ``m = min(beta, gamma)`` and ``d = gamma - beta``: the difference of two close
    exponentials cancels catastrophically when ``beta ~ gamma`` (in float32, 1 %
    relative error at ``|d| = 1e-3``), its ``expm1`` form does not, never overflows, and
    tends to the ``beta == gamma`` limit ``(beta u0 - alpha) tau e^{-beta tau}``
    continuously (scVelo drops the term there instead, which is wrong at equal rates).
    """
    exps = xp.exp(-gamma * tau)
    gap = _floor(xp.abs(gamma - beta), _RATE_GAP_FLOOR, xp)
    slow = xp.exp(-xp.minimum(beta, gamma) * tau)
    cross = (alpha - beta * u0) * slow * xp.expm1(-gap * tau) / gap
    return s0 * exps - alpha / gamma * xp.expm1(-gamma * tau) + cross


def solution(
    tau: Any, u0: Any, s0: Any, alpha: Any, beta: Any, gamma: Any, *, xp: Any = np
) -> tuple[Any, Any]:
    """``(u(tau), s(tau))`` together: :func:`unspliced` and :func:`spliced`, bit for bit.

    The same formulas, in the same order of operations, with each exponential and
    each exponent evaluated once for both (``e^{-beta tau}`` serves ``u`` and, where
    ``beta <= gamma``, the cross term of ``s``): five transcendental functions per element
    instead of six and two products fewer. The dynamical model's EM calls this for
    every cell and gene thousands of times. ``beta`` and ``gamma`` broadcast against
    ``tau`` as in the other functions.
    """
    x_beta = -beta * tau
    x_gamma = -gamma * tau
    e_beta = xp.exp(x_beta)
    e_gamma = xp.exp(x_gamma)
    u = u0 * e_beta - alpha / beta * xp.expm1(x_beta)
    gap = _floor(xp.abs(gamma - beta), _RATE_GAP_FLOOR, xp)
    # e^{-min(beta, gamma) tau}: the same number as exp(-minimum(beta, gamma) * tau)
    slow = xp.where(beta <= gamma, e_beta, e_gamma)
    cross = (alpha - beta * u0) * slow * xp.expm1(-gap * tau) / gap
    return u, s0 * e_gamma - alpha / gamma * xp.expm1(x_gamma) + cross


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
    induction lasts ``t_ - t_on``; an onset after the switch counts as at the switch
    (no induction), so ``e^{-beta (t_ - t_on)}`` cannot overflow. ``t_ = inf`` (VeloVAE's
    ``var['fit_t_']`` for a gene without a switch-off) is induction at every time.
    """
    dur = _floor(t_ - t_on, 0.0, xp)
    # the time since the onset, read only during induction (t < t_, so after an onset past the
    # switch it is 0 either way); t - (t_ - dur) was NaN for t_ = inf
    tau_on = _floor(t - t_on, 0.0, xp)
    u0_, s0_ = switch_state(dur, alpha, beta, gamma, xp=xp)
    induction = t < t_
    tau = xp.where(induction, tau_on, t - t_)
    a = xp.where(induction, alpha, 0.0)
    u0 = xp.where(induction, 0.0, u0_)
    s0 = xp.where(induction, 0.0, s0_)
    return unspliced(tau, u0, a, beta, xp=xp), spliced(tau, s0, u0, a, beta, gamma, xp=xp)


def steady_state(alpha: Any, beta: Any, gamma: Any) -> tuple[Any, Any]:
    """``(u_inf, s_inf) = (alpha / beta, alpha / gamma)``: the induction steady state."""
    return alpha / beta, alpha / gamma


def detection_power(alpha: Any, beta: Any, gamma: Any, scaling: Any) -> Any:
    """``s_inf * u_inf`` in the data's units (``u = scaling * u_ode``), Bergen et al. 2021, Box 1.

    ``beta`` is the ODE's splicing rate (``fit_beta * fit_scaling`` in scVelo's convention).
    """
    u_inf, s_inf = steady_state(alpha, beta, gamma)
    return s_inf * (u_inf * scaling)


def velocity(u: Any, s: Any, beta: Any, gamma: Any) -> Any:
    """Spliced velocity ``ds/dt = beta u - gamma s``."""
    return beta * u - gamma * s


@dataclass(frozen=True, slots=True)
class FittedGene:
    """One gene's fitted on/off kinetics, in the ODE's units, as the dynamical model used them.

    scVelo's convention, which the dynamical model follows: the ODE runs on
    ``u = (Mu - u0) / scaling`` and ``var['fit_beta']`` is reported divided by the
    scaling, so the ODE's splicing rate ``beta`` is ``fit_beta * fit_scaling``. The
    onset is 0 on the gene's own clock (``fit_t``): ``var['fit_t_on']`` is a diagnostic
    on the shared latent-time axis and is never part of the curve.
    """

    alpha: float
    beta: float
    gamma: float
    t_: float
    scaling: float
    u0: float = 0.0
    s0: float = 0.0

    def at(self, t: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(Mu(t), Ms(t), ds/dt)`` in count units at the gene times ``t`` (``fit_t``)."""
        u, s = trajectory(np.asarray(t, dtype=np.float64), self.t_, self.alpha, self.beta, self.gamma)
        return u * self.scaling + self.u0, s + self.s0, velocity(u, s, self.beta, self.gamma)

    def phase_curve(self, t_end: float, *, n_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
        """``(Ms, Mu)`` along the curve from time 0 to ``max(t_end, t_)``, for a phase portrait.

        ``t_end`` is the latest gene time of a cell (``nanmax(fit_t)``); without one, pass
        ``2 * t_``.
        """
        end = max(float(t_end), self.t_) if np.isfinite(t_end) else 2 * self.t_
        u, s, _ = self.at(np.linspace(0.0, end, n_points))
        return s, u


def fitted_gene(row: Mapping[str, Any]) -> FittedGene | None:
    """Read the kinetic fit of one gene from its ``var`` row (``adata.var.loc[gene]``), or None.

    None when the row lacks ``fit_alpha``, ``fit_beta``, ``fit_gamma`` or ``fit_t_``, or
    they are not finite, or a rate is not positive (a gene the model did not fit).
    ``fit_scaling`` defaults to 1 and scVelo's offsets ``fit_u0``, ``fit_s0`` to 0.
    """
    keys = (Key.var.FIT_ALPHA, Key.var.FIT_BETA, Key.var.FIT_GAMMA, Key.var.FIT_T_)
    if not all(k in row for k in keys):
        return None

    def get(key: str, default: float) -> float:
        value = float(row[key]) if key in row else default
        return value if np.isfinite(value) else default

    alpha, beta, gamma, t_ = (float(row[k]) for k in keys)
    scaling = float(row[Key.var.FIT_SCALING]) if Key.var.FIT_SCALING in row else 1.0
    if not np.isfinite([alpha, beta, gamma, t_, scaling]).all() or min(beta, gamma, scaling) <= 0:
        return None
    return FittedGene(
        alpha=max(alpha, 0.0),
        beta=beta * scaling,
        gamma=gamma,
        t_=max(t_, 0.0),
        scaling=scaling,
        u0=get(Key.var.FIT_U0, 0.0),
        s0=get(Key.var.FIT_S0, 0.0),
    )


def steady_state_line(slope: float | None, s_max: float, u_max: float) -> np.ndarray | None:
    """``(2, 2)`` end points ``[(0, 0), (s, slope * s)]`` of the line ``u = slope * s`` in the data box.

    The line runs to ``s_max``, or stops where it reaches ``u_max`` if it is steeper
    than the box, so it never leaves the ``[0, s_max] x [0, u_max]`` range of the cells
    (scVelo draws it to the axis limits, which the cells set). None for a missing or
    negative slope, which has no steady state to draw.
    """
    if slope is None or not np.isfinite(slope) or slope < 0:
        return None
    s_max = float(s_max) if np.isfinite(s_max) and s_max > 0 else 1.0
    end = s_max
    if np.isfinite(u_max) and u_max > 0 and slope * s_max > u_max:
        end = u_max / slope
    return np.array([[0.0, 0.0], [end, slope * end]])
