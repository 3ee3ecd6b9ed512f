from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import odeint
from scipy.sparse import issparse

from explorer.data.simulate import KINDS, simulate
from explorer.keys import Key


@pytest.fixture(scope="module")
def branched():
    return simulate(n_obs=600, n_vars=60, seed=3, branches=2)


def _odeint_u_s(t_cells, segments, beta, gamma):
    """(u, s) in ODE units at sorted ``t_cells`` for piecewise-constant alpha.

    ``segments`` = [(start, alpha), ...]; alpha is 0 before the first start. Integrates
    each piece separately so that the jumps in alpha are resolved exactly.
    """

    def rhs(y, _t, a):
        return [a - beta * y[0], beta * y[0] - gamma * y[1]]

    # the gene is off (0, 0) before the first start, which may lie before t = 0
    starts = [st for st, _ in segments] + [max(t_cells.max(), segments[-1][0]) + 1.0]
    alphas = [a for _, a in segments]
    out = np.zeros((len(t_cells), 2))
    y0 = [0.0, 0.0]
    for (lo, hi), a in zip(zip(starts[:-1], starts[1:], strict=True), alphas, strict=True):
        if hi <= lo:
            continue
        inside = (t_cells >= lo) & (t_cells < hi)
        grid = np.concatenate([[lo], t_cells[inside], [hi]])
        sol = odeint(rhs, y0, grid, args=(a,), rtol=1e-10, atol=1e-10)
        out[inside] = sol[1:-1]
        y0 = sol[-1]
    return out[:, 0], out[:, 1]


def test_same_seed_same_data_other_seed_other_data():
    a = simulate(n_obs=150, n_vars=15, seed=7, noise="nb")
    b = simulate(n_obs=150, n_vars=15, seed=7, noise="nb")
    c = simulate(n_obs=150, n_vars=15, seed=8, noise="nb")
    for key in (Key.layers.SPLICED, Key.layers.UNSPLICED):
        assert (a.layers[key] != b.layers[key]).nnz == 0
        assert (a.layers[key] != c.layers[key]).nnz > 0
    np.testing.assert_array_equal(a.layers[Key.layers.TRUE_S], b.layers[Key.layers.TRUE_S])
    assert a.var.equals(b.var)
    assert a.obs.equals(b.obs)


def test_layout_and_ground_truth_keys(tiny_adata):
    adata = tiny_adata
    assert adata.shape == (200, 20)
    for key in (Key.layers.SPLICED, Key.layers.UNSPLICED):
        layer = adata.layers[key]
        assert issparse(layer)
        assert layer.dtype == np.float32
        np.testing.assert_array_equal(layer.data, np.round(layer.data))
    assert (adata.X != adata.layers[Key.layers.SPLICED]).nnz == 0
    for key in (
        Key.var.TRUE_ALPHA,
        Key.var.TRUE_BETA,
        Key.var.TRUE_GAMMA,
        Key.var.TRUE_T_,
        Key.var.TRUE_T_ON,
        Key.var.TRUE_SCALING,
        Key.var.TRUE_KIND,
    ):
        assert key in adata.var
    assert list(adata.var[Key.var.TRUE_KIND].cat.categories) == list(KINDS)
    # default shares: 5% of 20 genes = 1 of each pitfall, 10% late induction = 2
    counts = adata.var[Key.var.TRUE_KIND].value_counts()
    assert counts["late_induction"] == 2
    assert counts["standard"] == 20 - 2 - 4
    assert adata.obs[Key.obs.CLUSTERS].dtype == "category"
    assert adata.uns[Key.uns.SIMULATION]["seed"] == 0


def test_true_velocity_is_beta_u_minus_gamma_s(branched):
    adata = branched
    var, obs = adata.var, adata.obs
    gamma = np.where(
        obs[Key.obs.TRUE_REGIME].to_numpy()[:, None] == 1,
        var[Key.var.TRUE_GAMMA_2].to_numpy()[None, :],
        var[Key.var.TRUE_GAMMA].to_numpy()[None, :],
    )
    expected = (
        var[Key.var.TRUE_BETA].to_numpy() * adata.layers[Key.layers.TRUE_U]
        - gamma * adata.layers[Key.layers.TRUE_S]
    )
    steady = (var[Key.var.TRUE_KIND] == "steady").to_numpy()
    np.testing.assert_allclose(adata.layers[Key.layers.TRUE_VELOCITY], expected, rtol=1e-4, atol=1e-3)
    # steady genes: constant abundances at alpha/gamma, zero velocity
    assert np.all(adata.layers[Key.layers.TRUE_VELOCITY][:, steady] == 0)
    s_st = adata.layers[Key.layers.TRUE_S][:, steady]
    np.testing.assert_allclose(s_st, np.broadcast_to(s_st[:1], s_st.shape), rtol=1e-6)
    np.testing.assert_allclose(
        s_st[0], (var[Key.var.TRUE_ALPHA] / var[Key.var.TRUE_GAMMA])[steady], rtol=1e-5
    )


@pytest.mark.parametrize("kind", ["standard", "boost", "two_regimes", "late_induction", "early_repression"])
def test_abundances_match_odeint(tiny_adata, kind):
    adata = simulate(n_obs=200, n_vars=40, seed=1)
    var = adata.var
    j = int(np.flatnonzero(var[Key.var.TRUE_KIND] == kind)[0])
    row = var.iloc[j]
    regime = adata.obs[Key.obs.TRUE_REGIME].to_numpy()
    t = adata.obs[Key.obs.TRUE_T].to_numpy().astype(float)
    scaling = row[Key.var.TRUE_SCALING]
    beta_ode = row[Key.var.TRUE_BETA] * scaling
    alpha = row[Key.var.TRUE_ALPHA]
    segments = [(row[Key.var.TRUE_T_ON], alpha)]
    if kind == "boost":
        segments.append((row[Key.var.TRUE_T_BOOST], alpha * row[Key.var.TRUE_BOOST]))
    segments.append((row[Key.var.TRUE_T_], 0.0))
    for reg, gkey in ((0, Key.var.TRUE_GAMMA), (1, Key.var.TRUE_GAMMA_2)):
        cells = regime == reg
        u, s = _odeint_u_s(t[cells], segments, beta_ode, row[gkey])
        np.testing.assert_allclose(
            adata.layers[Key.layers.TRUE_U][cells, j], u * scaling, rtol=2e-4, atol=1e-4
        )
        np.testing.assert_allclose(adata.layers[Key.layers.TRUE_S][cells, j], s, rtol=2e-4, atol=1e-4)
    if kind == "two_regimes":
        assert row[Key.var.TRUE_GAMMA_2] > 2 * row[Key.var.TRUE_GAMMA]


def test_late_induction_silent_before_onset(branched):
    var, t = branched.var, branched.obs[Key.obs.TRUE_T].to_numpy()
    late = np.flatnonzero(var[Key.var.TRUE_KIND] == "late_induction")
    assert len(late) > 0
    for j in late:
        t_on = var[Key.var.TRUE_T_ON].iloc[j]
        assert t_on > 0.3 * branched.uns[Key.uns.SIMULATION]["t_max"]
        before = t < t_on
        assert before.sum() > 0
        assert np.all(branched.layers[Key.layers.TRUE_S][before, j] == 0)
        assert np.all(branched.layers[Key.layers.UNSPLICED][before, j].toarray() == 0)
        assert (
            np.all(branched.layers[Key.layers.TRUE_S][~before, j] > 0)
            or var[Key.var.TRUE_PROGRAM].iloc[j] != "shared"
        )


def test_early_repression_switches_early(tiny_adata):
    var = tiny_adata.var
    early = var[Key.var.TRUE_KIND] == "early_repression"
    t_max = tiny_adata.uns[Key.uns.SIMULATION]["t_max"]
    duration = var[Key.var.TRUE_T_] - var[Key.var.TRUE_T_ON]
    assert (var.loc[early, Key.var.TRUE_T_] <= 0.2 * t_max).all()
    assert (duration[early] <= 0.2 * t_max).all()
    standard = var[Key.var.TRUE_KIND] == "standard"
    assert (duration[standard] >= 0.45 * t_max).all()
    # long enough inductions: >= 97% of the steady state before switching
    assert (var.loc[standard, Key.var.TRUE_GAMMA] * duration[standard] >= 3.5).all()


def test_branches_have_own_programmes(branched):
    obs, var = branched.obs, branched.var
    t = obs[Key.obs.TRUE_T].to_numpy()
    branch_time = branched.uns[Key.uns.SIMULATION]["branch_time"]
    lineage = obs[Key.obs.TRUE_LINEAGE].astype(str).to_numpy()
    assert set(lineage[t < branch_time]) == {"root"}
    assert set(lineage[t >= branch_time]) == {"A", "B"}
    regime = obs[Key.obs.TRUE_REGIME].to_numpy()
    # after the branch the regimes are the lineages
    np.testing.assert_array_equal(regime[t >= branch_time], (lineage[t >= branch_time] == "B").astype(int))
    true_s = branched.layers[Key.layers.TRUE_S]
    for name in ("A", "B"):
        genes = np.flatnonzero(var[Key.var.TRUE_PROGRAM] == name)
        assert len(genes) >= 5
        other = (t >= branch_time) & (lineage != name)
        own = (t > var[Key.var.TRUE_T_ON].iloc[genes].max()) & (lineage == name)
        assert np.all(true_s[np.ix_(other, genes)] == 0)
        assert np.all(true_s[np.ix_(own, genes)] > 0)
        assert np.all(var[Key.var.TRUE_T_ON].iloc[genes] >= branch_time)
    assert {"root_1", "A_4", "B_4"} <= set(obs[Key.obs.CLUSTERS].cat.categories)


@pytest.mark.parametrize("noise", ["poisson", "nb", "none"])
def test_counts_scatter_around_abundances(noise):
    adata = simulate(n_obs=400, n_vars=30, seed=2, noise=noise, dispersion=0.5)
    sf = adata.obs[Key.obs.TRUE_SIZE_FACTOR].to_numpy()[:, None]
    mu = adata.layers[Key.layers.TRUE_S] * sf
    counts = adata.layers[Key.layers.SPLICED].toarray()
    if noise == "none":
        np.testing.assert_allclose(counts, mu, rtol=1e-5)
        return
    # per-gene totals within 4.5 standard deviations of the expected totals
    var = mu + (0.5 * mu**2 if noise == "nb" else 0.0)
    z = (counts.sum(0) - mu.sum(0)) / np.sqrt(var.sum(0))
    assert np.abs(z).max() < 4.5
    assert abs(z.mean()) < 1.5
    resid = ((counts - mu) ** 2).sum() / mu.sum()
    # Poisson: variance = mean; NB with dispersion 0.5: variance = mu + 0.5 mu^2 >> mu
    if noise == "poisson":
        assert 0.9 < resid < 1.1
    else:
        assert resid > 3


def test_magnitudes_survive_shared_counts_filter():
    adata = simulate(n_obs=1000, n_vars=100, seed=0)
    s = adata.layers[Key.layers.SPLICED].toarray()
    u = adata.layers[Key.layers.UNSPLICED].toarray()
    # scVelo's filter_genes(min_shared_counts=20): counts in cells where both are detected
    shared = (s * (u > 0) + u * (s > 0)).sum(0)
    assert (shared >= 20).mean() >= 0.95
    u_frac = u.sum() / (u.sum() + s.sum())
    assert 0.1 < u_frac < 0.35  # the pancreas has 17%


def test_invalid_options_say_what_is_valid():
    with pytest.raises(ValueError, match="Valid options are: 'poisson', 'nb', 'none'"):
        simulate(n_obs=10, n_vars=5, noise="gaussian")
    with pytest.raises(ValueError, match="Valid kinds are"):
        simulate(n_obs=10, n_vars=5, kinds={"bursty": 0.1})


# ------------------------------------------------------------------ shipped samples


def test_sample_is_prepared_and_keeps_ground_truth(sample_adata):
    from explorer.data.preprocess import is_preprocessed
    from explorer.data.samples import RECIPES

    adata = sample_adata
    recipe = RECIPES["default"]
    assert adata.shape == (recipe["n_obs"], recipe["n_vars"])  # every gene passes the filter
    assert is_preprocessed(adata)
    for key in (Key.layers.MS, Key.layers.MU, Key.layers.TRUE_VELOCITY, Key.layers.TRUE_S):
        assert adata.layers[key].shape == adata.shape
    assert {Key.obsm.PCA, Key.obsm.UMAP} <= set(adata.obsm)
    assert Key.obsp.CONNECTIVITIES in adata.obsp
    sim = adata.uns[Key.uns.SIMULATION]
    assert sim["seed"] == recipe["seed"]
    assert sim["branches"] == recipe["branches"]
    assert set(adata.obs[Key.obs.TRUE_LINEAGE].cat.categories) == {"root", "A", "B"}
    assert (adata.var[Key.var.TRUE_KIND] != "standard").sum() >= 5
    # the stored ground truth is the simulator's, gene for gene
    fresh = simulate(**recipe)
    np.testing.assert_array_equal(
        adata.layers[Key.layers.TRUE_VELOCITY], fresh[:, adata.var_names].layers[Key.layers.TRUE_VELOCITY]
    )


def test_sample_ships_a_stochastic_fit_that_follows_the_truth(sample_adata):
    from explorer.graph.transition import transition_matrix
    from explorer.models import MODELS

    adata = sample_adata
    params = adata.uns[Key.uns.VELOCITY_PARAMS]
    assert params["mode"] == "stochastic"
    assert params["mode"] in MODELS  # the app shows it as a fitted model
    assert adata.layers[Key.layers.VELOCITY].shape == adata.shape
    assert adata.obsm[Key.obsm.velocity(Key.obsm.UMAP)].shape == (adata.n_obs, 2)
    assert {Key.obsp.VELOCITY_GRAPH, Key.obsp.VELOCITY_GRAPH_NEG} <= set(adata.obsp)
    stored_T = adata.obsp[Key.obsp.TRANSITIONS]
    genes = adata.var[Key.var.VELOCITY_GENES].to_numpy(dtype=bool)
    assert genes.sum() >= 0.8 * adata.n_vars
    # per gene, the fitted velocity follows the simulator's true velocity
    v, truth = adata.layers[Key.layers.VELOCITY][:, genes], adata.layers[Key.layers.TRUE_VELOCITY][:, genes]
    corr = [np.corrcoef(v[:, j], truth[:, j])[0, 1] for j in range(v.shape[1])]
    assert np.median(corr) > 0.7
    # the transitions lead forward in simulated time for most cells
    T = transition_matrix(adata.obsp[Key.obsp.VELOCITY_GRAPH], adata.obsp[Key.obsp.VELOCITY_GRAPH_NEG])
    np.testing.assert_allclose(stored_T.toarray(), T.toarray(), atol=1e-6)  # stored as float32
    t = adata.obs[Key.obs.TRUE_T].to_numpy()
    assert np.mean(T @ t > t) > 0.8


def test_sample_files_are_small_and_names_checked():
    from explorer._types import InputError
    from explorer.data.samples import SAMPLES, sample_path

    total = sum(sample_path(name).stat().st_size for name in SAMPLES)
    assert total < 8e6  # a few MB: counts, moments, ground truth, one fit and its velocity graph
    with pytest.raises(InputError, match="Valid options are: 'default'"):
        sample_path("pancreas")


# --- options that make the data harder (all off by default)


def test_terminal_fraction_piles_cells_at_the_end():
    adata = simulate(n_obs=2000, n_vars=10, seed=4, terminal_fraction=0.3)
    t = adata.obs[Key.obs.TRUE_T].to_numpy()
    t_max = adata.uns[Key.uns.SIMULATION]["t_max"]
    # 30% placed in the last 5%, plus 5% of the other 70% drawn uniformly: 33.5%
    assert np.mean(t >= 0.95 * t_max) == pytest.approx(0.335, abs=0.03)
    assert t.min() >= 0
    assert t.max() <= t_max


def test_uneven_time_density_has_dense_and_sparse_stretches():
    t_max = 20.0
    uniform = simulate(n_obs=4000, n_vars=5, seed=1).obs[Key.obs.TRUE_T].to_numpy()
    uneven = simulate(n_obs=4000, n_vars=5, seed=1, time_density="uneven").obs[Key.obs.TRUE_T].to_numpy()
    bins = np.linspace(0, t_max, 11)
    h_u, h_x = np.histogram(uniform, bins)[0], np.histogram(uneven, bins)[0]
    assert h_u.max() / h_u.min() < 1.5  # 400 +- 20 per bin
    assert h_x.max() / h_x.min() > 2.5
    assert uneven.min() >= 0
    assert uneven.max() <= t_max


def test_unspliced_capture_scales_unspliced_counts_only():
    full = simulate(n_obs=400, n_vars=30, seed=2, noise="none")
    low = simulate(n_obs=400, n_vars=30, seed=2, noise="none", unspliced_capture=0.2)
    ratio = low.layers[Key.layers.UNSPLICED].sum() / full.layers[Key.layers.UNSPLICED].sum()
    assert ratio == pytest.approx(0.2, rel=1e-5)
    assert (low.layers[Key.layers.SPLICED] != full.layers[Key.layers.SPLICED]).nnz == 0
    np.testing.assert_array_equal(low.layers[Key.layers.TRUE_U], full.layers[Key.layers.TRUE_U])


def test_rate_sd_varies_rates_from_cell_to_cell():
    kw = {"n_obs": 400, "n_vars": 30, "seed": 2, "noise": "none", "kinds": {}}
    plain = simulate(**kw)
    varied = simulate(**kw, rate_sd=0.3)
    # same genes and cells (the options draw from their own stream)
    assert plain.var.equals(varied.var)
    np.testing.assert_array_equal(plain.obs[Key.obs.TRUE_T], varied.obs[Key.obs.TRUE_T])
    s0, s1 = plain.layers[Key.layers.TRUE_S], varied.layers[Key.layers.TRUE_S]
    on = s0 > 1
    # at the steady state s = alpha / gamma, both log-normal with sd 0.3: sd of the log
    # ratio sqrt(2) * 0.3 = 0.42 there, less during the transients
    sd = np.log(s1[on] / s0[on]).std()
    assert 0.2 < sd < 0.5


def test_hard_options_say_what_is_valid():
    with pytest.raises(ValueError, match="time_density"):
        simulate(n_obs=10, n_vars=3, time_density="bumpy")
    with pytest.raises(ValueError, match="terminal_fraction"):
        simulate(n_obs=10, n_vars=3, terminal_fraction=1.0)
    with pytest.raises(ValueError, match="rate_sd"):
        simulate(n_obs=10, n_vars=3, rate_sd=-0.1)
    with pytest.raises(ValueError, match="unspliced_capture"):
        simulate(n_obs=10, n_vars=3, unspliced_capture=0.0)


def test_lineage_rate_range_scales_each_lineage_rate_after_the_branch():
    """Each lineage's shared genes run at their own transcription rate from the branch time on."""
    kw = {"n_obs": 400, "n_vars": 30, "seed": 4, "noise": "none", "kinds": {}, "branches": 2}
    plain = simulate(**kw)
    scaled = simulate(**kw, lineage_rate_range=(0.2, 0.6))
    # same genes, cells and times (the factors draw from their own stream)
    np.testing.assert_array_equal(plain.obs[Key.obs.TRUE_T], scaled.obs[Key.obs.TRUE_T])
    assert plain.var.equals(scaled.var[plain.var.columns])
    shared = (scaled.var[Key.var.TRUE_PROGRAM] == "shared").to_numpy()
    alpha = scaled.var[Key.var.TRUE_ALPHA].to_numpy()
    factors = {lin: scaled.var[f"{Key.var.TRUE_ALPHA}_{lin}"].to_numpy() / alpha for lin in "AB"}
    for f in factors.values():
        assert (f[shared] >= 0.2).all() and (f[shared] <= 0.6).all()
        np.testing.assert_array_equal(f[~shared], 1.0)  # lineage programmes keep their rate
    t = scaled.obs[Key.obs.TRUE_T].to_numpy()
    lineage = scaled.obs[Key.obs.TRUE_LINEAGE].astype(str).to_numpy()
    # the root is unchanged
    root = lineage == "root"
    s_plain, s_scaled = plain.layers[Key.layers.TRUE_S], scaled.layers[Key.layers.TRUE_S]
    np.testing.assert_allclose(s_scaled[root], s_plain[root], rtol=1e-6)
    # a lineage's cells follow the ODE whose rate changes to factor * alpha at the branch time
    branch_time = scaled.uns[Key.uns.SIMULATION]["branch_time"]
    var = scaled.var
    checked = 0
    for g in np.flatnonzero(shared):
        t_on, t_off = var[Key.var.TRUE_T_ON].iloc[g], var[Key.var.TRUE_T_].iloc[g]
        if not t_on < branch_time < t_off:
            continue
        beta_ode = var[Key.var.TRUE_BETA].iloc[g] * var[Key.var.TRUE_SCALING].iloc[g]
        gamma = var[Key.var.TRUE_GAMMA].iloc[g]
        for lin in "AB":
            cells = np.flatnonzero(lineage == lin)
            cells = cells[np.argsort(t[cells])]
            segments = [(t_on, alpha[g]), (branch_time, factors[lin][g] * alpha[g]), (t_off, 0.0)]
            _, s = _odeint_u_s(t[cells], segments, beta_ode, gamma)
            np.testing.assert_allclose(scaled.layers[Key.layers.TRUE_S][cells, g], s, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked >= 3
    with pytest.raises(ValueError, match="lineage_rate_range"):
        simulate(n_obs=10, n_vars=3, lineage_rate_range=(0.5, 1.0))  # one lineage
    with pytest.raises(ValueError, match="lineage_rate_range"):
        simulate(n_obs=10, n_vars=3, branches=2, lineage_rate_range=(0.0, 1.0))


def test_lineage_rates_scale_every_shared_gene_of_a_lineage():
    """One factor per lineage: lineage B runs all its shared genes at 0.3 of A's rate after the branch."""
    kw = {"n_obs": 400, "n_vars": 30, "seed": 4, "noise": "none", "kinds": {}, "branches": 2}
    plain = simulate(**kw)
    slow = simulate(**kw, lineage_rates=(1.0, 0.3))
    both = simulate(**kw, lineage_rates=(1.0, 0.3), lineage_rate_range=(0.2, 0.6))
    per_gene = simulate(**kw, lineage_rate_range=(0.2, 0.6))
    shared = (slow.var[Key.var.TRUE_PROGRAM] == "shared").to_numpy()
    alpha = slow.var[Key.var.TRUE_ALPHA].to_numpy()
    f_a = slow.var[f"{Key.var.TRUE_ALPHA}_A"].to_numpy() / alpha
    f_b = slow.var[f"{Key.var.TRUE_ALPHA}_B"].to_numpy() / alpha
    np.testing.assert_allclose(f_a, 1.0)
    np.testing.assert_allclose(f_b[shared], 0.3)
    np.testing.assert_allclose(f_b[~shared], 1.0)
    # lineage A and the root are the plain simulation's; B's shared genes are lower after the branch
    lineage = slow.obs[Key.obs.TRUE_LINEAGE].astype(str).to_numpy()
    s_plain, s_slow = plain.layers[Key.layers.TRUE_S], slow.layers[Key.layers.TRUE_S]
    keep = lineage != "B"
    np.testing.assert_allclose(s_slow[keep], s_plain[keep], rtol=1e-6)
    b_cells = lineage == "B"
    assert (s_slow[np.ix_(b_cells, shared)] <= s_plain[np.ix_(b_cells, shared)] * (1 + 1e-6)).all()
    assert s_slow[np.ix_(b_cells, shared)].sum() < 0.6 * s_plain[np.ix_(b_cells, shared)].sum()
    # with a per-gene range too, the factors multiply
    for lin, rate in (("A", 1.0), ("B", 0.3)):
        col = f"{Key.var.TRUE_ALPHA}_{lin}"
        np.testing.assert_allclose(both.var[col][shared], rate * per_gene.var[col][shared], rtol=1e-12)
        np.testing.assert_allclose(both.var[col][~shared], alpha[~shared], rtol=1e-12)
    assert both.uns[Key.uns.SIMULATION]["lineage_rates"].tolist() == [1.0, 0.3]
    with pytest.raises(ValueError, match="lineage_rates"):
        simulate(n_obs=10, n_vars=3, branches=2, lineage_rates=(1.0,))  # one factor for two lineages
    with pytest.raises(ValueError, match="lineage_rates"):
        simulate(n_obs=10, n_vars=3, branches=2, lineage_rates=(1.0, 0.0))
