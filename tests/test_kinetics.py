"""The analytic splicing solution against numerical integration (as scVelo's tests do)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import odeint

from explorer import kinetics


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


def test_a_switch_at_infinity_is_induction_at_every_time():
    # VeloVAE writes fit_t_ = inf for a gene that never switches off; t - (t_ - dur) was NaN there
    alpha, beta, gamma, t_on = 4.0, 0.8, 0.4, 2.0
    t = np.linspace(0, 20, 81)
    u, s = kinetics.trajectory(t, np.inf, alpha, beta, gamma, t_on=t_on)
    tau = np.maximum(t - t_on, 0.0)
    np.testing.assert_allclose(u, kinetics.unspliced(tau, 0.0, alpha, beta), rtol=1e-12)
    np.testing.assert_allclose(s, kinetics.spliced(tau, 0.0, 0.0, alpha, beta, gamma), rtol=1e-12)
    one = torch.ones((), dtype=torch.float64)
    u_t, s_t = kinetics.trajectory(
        torch.tensor(t), torch.tensor(np.inf), alpha * one, beta * one, gamma * one, t_on=t_on * one, xp=torch
    )
    np.testing.assert_allclose(u_t.numpy(), u, rtol=1e-12)
    np.testing.assert_allclose(s_t.numpy(), s, rtol=1e-12)


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


def _reference_spliced(tau, alpha, beta, gamma):
    """``s(tau)`` from (0, 0) in float64 by numerical integration (the reference of the float32 tests)."""
    return odeint(
        _ode, [0.0, 0.0], np.concatenate([[0.0], tau]), args=(alpha, beta, gamma), rtol=1e-12, atol=1e-14
    )[1:, 1]


@pytest.mark.parametrize("gap", [1e-2, 1e-3, 1e-5, 1e-7, 0.0])
def test_spliced_in_float32_stays_exact_when_beta_approaches_gamma(gap):
    # the difference of two close exponentials cancels in float32 (about 1 % error at a
    # gap of 1e-3 in the textbook form); the expm1 form keeps float32 precision
    alpha, beta = 3.0, 0.7
    gamma = beta + gap
    tau = np.linspace(0.05, 15, 60)
    ref = _reference_spliced(tau, alpha, beta, gamma)
    f32 = np.float32
    for xp, cast in (
        (np, lambda x: np.asarray(x, dtype=f32)),
        (torch, lambda x: torch.tensor(x, dtype=torch.float32)),
    ):
        s = kinetics.spliced(cast(tau), cast(0.0), cast(0.0), cast(alpha), cast(beta), cast(gamma), xp=xp)
        s = np.asarray(s, dtype=np.float64)
        np.testing.assert_allclose(s, ref, rtol=2e-5)


def test_onset_after_switch_keeps_the_gene_off_without_overflow():
    # e^{-beta (t_ - t_on)} with t_on far after t_ would overflow (inf, then NaN curves)
    t = np.linspace(0, 60, 121)
    u, s = kinetics.trajectory(t, 1.0, 5.0, 50.0, 40.0, t_on=30.0)
    assert np.isfinite(u).all()
    assert np.isfinite(s).all()
    np.testing.assert_array_equal(u, 0.0)
    np.testing.assert_array_equal(s, 0.0)
    # torch float32, the EM's dtype
    tt = torch.linspace(0, 60, 121)
    one = torch.ones(())
    u_t, s_t = kinetics.trajectory(tt, one, 5 * one, 50 * one, 40 * one, t_on=30 * one, xp=torch)
    assert torch.isfinite(u_t).all()
    assert (u_t == 0).all()
    assert (s_t == 0).all()


def test_fitted_gene_reads_scvelo_keys():
    import pandas as pd

    row = pd.Series(
        {
            "fit_alpha": 2.0,
            "fit_beta": 0.25,
            "fit_gamma": 0.3,
            "fit_t_": 4.0,
            "fit_scaling": 2.0,
            "fit_t_on": 9.0,
        }
    )
    gene = kinetics.fitted_gene(row)
    # the ODE's beta is fit_beta * fit_scaling; the shared-axis onset is not part of the curve
    assert gene.beta == 0.5
    t = np.array([0.0, 1.0, 4.0, 7.0])
    u_counts, s, v = gene.at(t)
    u, s_ref = kinetics.trajectory(t, 4.0, 2.0, 0.5, 0.3)
    np.testing.assert_allclose(u_counts, 2.0 * u)
    np.testing.assert_allclose(s, s_ref)
    np.testing.assert_allclose(v, 0.5 * u - 0.3 * s_ref)
    # induced from time 0, not from fit_t_on
    assert u_counts[0] == 0
    assert u_counts[1] > 0
    # not fitted: NaN or missing rates
    assert kinetics.fitted_gene(row.drop("fit_t_")) is None
    assert kinetics.fitted_gene(row.replace(2.0, np.nan)) is None


def test_steady_state_line_stays_in_the_data_box():
    np.testing.assert_allclose(kinetics.steady_state_line(0.5, 10.0, 8.0), [[0, 0], [10, 5]])
    # steeper than the box: stops where it reaches u_max (10 * 2 = 20 > 8)
    np.testing.assert_allclose(kinetics.steady_state_line(2.0, 10.0, 8.0), [[0, 0], [4, 8]])
    assert kinetics.steady_state_line(-1.0, 10.0, 8.0) is None
    assert kinetics.steady_state_line(None, 10.0, 8.0) is None


@pytest.mark.parametrize("xp", [np, torch])
def test_solution_is_unspliced_and_spliced_bit_for_bit(xp):
    """The EM's one-pass evaluation gives exactly the two functions' numbers (float32),
    for beta below, equal to and above gamma, from rest and from a switch point."""
    rng = np.random.default_rng(0)
    n_genes, n_cells = 6, 50
    beta = rng.uniform(0.2, 3, (n_genes, 1)).astype(np.float32)
    gamma = rng.uniform(0.2, 3, (n_genes, 1)).astype(np.float32)
    gamma[:2] = beta[:2]  # equal rates: the expm1 limit
    tau = rng.uniform(0, 20, (n_genes, n_cells)).astype(np.float32)
    moving = rng.uniform(0, 5, (n_genes, n_cells))
    u0 = np.where(rng.random((n_genes, n_cells)) < 0.5, 0, moving).astype(np.float32)
    s0 = (u0 * 1.3).astype(np.float32)
    alpha = np.where(u0 > 0, 0, rng.uniform(0.5, 4, (n_genes, n_cells))).astype(np.float32)
    args = [x if xp is np else torch.from_numpy(x) for x in (tau, u0, s0, alpha, beta, gamma)]
    tau, u0, s0, alpha, beta, gamma = args
    u, s = kinetics.solution(tau, u0, s0, alpha, beta, gamma, xp=xp)
    u_ref = kinetics.unspliced(tau, u0, alpha, beta, xp=xp)
    s_ref = kinetics.spliced(tau, s0, u0, alpha, beta, gamma, xp=xp)
    assert np.array_equal(np.asarray(u), np.asarray(u_ref))
    assert np.array_equal(np.asarray(s), np.asarray(s_ref))
    assert np.asarray(s).dtype == np.float32
