"""The analytic splicing solution against numerical integration (as scVelo's tests do)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import odeint

from explorer.models import kinetics


def _ode(y, _t, alpha, beta, gamma):
    u, s = y
    return [alpha - beta * u, beta * u - gamma * s]


@pytest.mark.parametrize(("alpha", "beta", "gamma"), [(5.0, 0.5, 0.3), (2.0, 1.0, 1.0), (1.0, 0.2, 2.0)])
def test_analytic_matches_odeint(alpha, beta, gamma):
    t = np.linspace(0, 20, 201)
    u0, s0 = 0.7, 1.3
    num = odeint(_ode, [u0, s0], t, args=(alpha, beta, gamma), rtol=1e-10, atol=1e-10)
    u = kinetics.unspliced(t, u0, alpha, beta)
    s = kinetics.spliced(t, s0, u0, alpha, beta, gamma)
    np.testing.assert_allclose(u, num[:, 0], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(s, num[:, 1], rtol=1e-6, atol=1e-8)


def test_trajectory_on_off_with_onset():
    alpha, beta, gamma, t_on, t_ = 4.0, 0.8, 0.4, 2.0, 8.0
    t = np.linspace(0, 20, 401)
    u, s = kinetics.trajectory(t, t_, alpha, beta, gamma, t_on=t_on)
    assert np.all(u[t <= t_on] == 0) and np.all(s[t <= t_on] == 0)
    # integrate the piecewise ODE numerically
    ind = odeint(_ode, [0, 0], np.linspace(0, t_ - t_on, 2), args=(alpha, beta, gamma))[-1]
    rep_t = t[t >= t_]
    rep = odeint(_ode, ind, rep_t - t_, args=(0.0, beta, gamma), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(u[t >= t_], rep[:, 0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s[t >= t_], rep[:, 1], rtol=1e-5, atol=1e-7)
    # velocity sign: positive while induced (spliced rising), negative late in repression
    v = kinetics.velocity(u, s, beta, gamma)
    assert np.all(v[(t > t_on) & (t < t_)] > 0)
    assert np.all(v[t > t_ + 1] < 0)


def test_torch_and_numpy_agree():
    t = np.linspace(0, 10, 50)
    u_np, s_np = kinetics.trajectory(t, 5.0, 3.0, 0.6, 0.6, t_on=1.0)
    tt = torch.tensor(t, dtype=torch.float64)
    u_t, s_t = kinetics.trajectory(
        tt,
        torch.tensor(5.0, dtype=torch.float64),
        torch.tensor(3.0, dtype=torch.float64),
        torch.tensor(0.6, dtype=torch.float64),
        torch.tensor(0.6, dtype=torch.float64),
        t_on=torch.tensor(1.0, dtype=torch.float64),
        xp=torch,
    )
    np.testing.assert_allclose(u_t.numpy(), u_np, rtol=1e-10)
    np.testing.assert_allclose(s_t.numpy(), s_np, rtol=1e-10)


def test_steady_state_is_the_limit():
    u_inf, s_inf = kinetics.steady_state(3.0, 0.5, 0.25)
    u, s = kinetics.trajectory(np.array([200.0]), 300.0, 3.0, 0.5, 0.25)
    np.testing.assert_allclose([u[0], s[0]], [u_inf, s_inf], rtol=1e-8)
