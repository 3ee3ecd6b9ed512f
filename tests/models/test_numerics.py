"""Numerically fragile spots of the dynamical model, each against a value computable by hand or scipy."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import sparse
from scipy.integrate import odeint

from explorer.graph import latent_time as lt_mod
from explorer.models import _em


def _params(**values: float) -> _em.Params:
    base = {"alpha": 3.0, "beta": 0.7, "gamma": 0.7, "t_": 10.0, "scaling": 1.0, "t_on": 0.0}
    base.update(values)
    return _em.Params(**{k: torch.tensor([[v]], dtype=torch.float32) for k, v in base.items()})


def test_em_curve_in_float32_near_equal_rates_matches_scipy():
    # the EM's own curve (float masks, float32) at |gamma - beta| = 1e-4 against float64 odeint
    alpha, beta, gamma, t_ = 3.0, 0.7, 0.7001, 6.0
    p = _params(alpha=alpha, beta=beta, gamma=gamma, t_=t_)
    t = np.linspace(0.1, 14, 40)
    u, s = _em.curve(torch.tensor(t[None], dtype=torch.float32), p)

    def ode(y, tt):
        a = alpha if tt < t_ else 0.0
        return [a - beta * y[0], beta * y[0] - gamma * y[1]]

    ref = odeint(ode, [0.0, 0.0], np.concatenate([[0.0], t]), rtol=1e-12, atol=1e-14, tcrit=[t_])[1:]
    np.testing.assert_allclose(u.numpy()[0], ref[:, 0], rtol=2e-5)
    np.testing.assert_allclose(s.numpy()[0], ref[:, 1], rtol=2e-5)


def test_em_onset_after_switch_is_clamped():
    # t_on > t_ used to give e^{+beta (t_on - t_)}: inf in float32 for beta = 50, t_on - t_ = 29
    p = _params(beta=50.0, gamma=40.0, t_=1.0, t_on=30.0)
    t = torch.linspace(0, 60, 61)[None]
    u, s = _em.curve(t, p)
    u0_, s0_ = p.switch_point()
    for x in (u, s, u0_, s0_):
        assert torch.isfinite(x).all()
        assert (x == 0).all()


def test_likelihood_is_nan_without_cells_in_the_upper_set():
    # gene 0: cells high in u are low in s and the reverse, so no cell is in the upper third
    # of both (scVelo's weights_upper is empty and its likelihood NaN); gene 1: a normal gene
    n = 200
    u = np.where(np.arange(n) % 2 == 0, 10.0, 1.0)
    s = np.where(np.arange(n) % 2 == 0, 1.0, 10.0)
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 15, n)
    p_np = {"alpha": 3.0, "beta": 1.0, "gamma": 0.5, "t_": 8.0}
    from explorer import kinetics

    u1, s1 = kinetics.trajectory(t, 8.0, 3.0, 1.0, 0.5)
    noise = rng.lognormal(0, 0.1, (2, n))
    uu = torch.tensor(np.stack([u, u1 + 0.01]) * noise, dtype=torch.float32)
    ss = torch.tensor(np.stack([s, s1 + 0.01]) * noise[::-1], dtype=torch.float32)
    data, _ = _em.prepare(uu, ss)
    assert data.weights_upper[0].sum() == 0
    assert data.weights_upper[1].sum() > 10
    p = _em.Params(
        **{k: torch.full((2, 1), v) for k, v in p_np.items()},
        scaling=torch.ones(2, 1),
        t_on=torch.zeros(2, 1),
    )
    lik = _em.likelihood(
        data, p, torch.tensor(np.stack([t, t]), dtype=torch.float32), torch.full((2, 1), 0.5)
    )
    assert math.isnan(lik[0, 0].item())
    assert 0 < lik[1, 0].item() < math.inf


def test_latent_time_of_constant_gene_times_has_no_division_by_zero():
    # every gene time 0: the shared time is constant, scale01 gives zeros, and the
    # confidence used to divide by their max of 0 (a RuntimeWarning, an error under pytest)
    n = 30
    fit_t = np.zeros((n, 4))
    chain = sparse.diags([np.ones(n - 1), np.ones(n - 1)], [-1, 1], format="csr")
    root = np.zeros(n)
    root[0] = 1
    out = lt_mod.latent_time(fit_t, root, chain)
    np.testing.assert_array_equal(out, np.zeros(n, dtype=np.float32))
