from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from scipy.stats import spearmanr

from explorer._types import InputError
from explorer.pipeline import prepare
from explorer.data.simulate import simulate
from explorer.graph.moments import compute_moments
from explorer.graph.neighbors import compute_neighbors
from explorer.keys import Key
from explorer.models import MODELS, get_model
from explorer.models.base import VelocityModel
from explorer.models.steady_state import (
    SteadyState,
    Stochastic,
    column_percentile,
    extreme_quantile_mask,
    generalized_least_squares,
    linear_regression,
)

# ------------------------------------------------------------------ hand-computable cases


def _hand_adata() -> ad.AnnData:
    """10 cells, s = 1..10; the 4 cells with s >= 7 lie on u = 0.5 s, the rest on u = 0.2 s."""
    s = np.arange(1, 11, dtype=np.float32)
    u = np.where(s >= 7, 0.5 * s, 0.2 * s).astype(np.float32)
    Ms = np.c_[s, 2 * s]  # second gene: twice the first (same ratio)
    Mu = np.c_[u, 2 * u]
    adata = ad.AnnData(X=sparse.csr_matrix(Ms), layers={Key.layers.MS: Ms, Key.layers.MU: Mu})
    adata.obs_names = [f"c{i}" for i in range(10)]
    adata.var_names = ["g0", "g1"]
    return adata


def test_extreme_quantile_regression_by_hand():
    adata = _hand_adata()
    # the 60th percentile of u/max(u) + s/max(s) = s/10 + u/5 lies between s = 6 and s = 7
    result = SteadyState(perc=(5, 60)).fit(adata)
    np.testing.assert_allclose(result.gene_params[Key.var.GAMMA], [0.5, 0.5], rtol=1e-6)
    s = np.arange(1, 11)
    u = np.where(s >= 7, 0.5 * s, 0.2 * s)
    expected_v = np.where(s >= 7, 0.0, -0.3 * s)
    np.testing.assert_allclose(result.velocity[:, 0], expected_v, atol=1e-6)
    # R² of the quantile line over all cells: 1 - sum((0.3 s)^2, s<=6) / sum((u - mean u)^2)
    r2 = 1 - 0.09 * (1 + 4 + 9 + 16 + 25 + 36) / ((u - u.mean()) ** 2).sum()
    np.testing.assert_allclose(result.gene_params[Key.var.R2], [r2, r2], rtol=1e-5)
    assert result.velocity_genes.all()
    # the default 95th percentile keeps only the top cell (s = 10): still 0.5
    np.testing.assert_allclose(SteadyState().fit(adata).gene_params[Key.var.GAMMA], 0.5, rtol=1e-6)


def test_r2_adjusted_uses_the_least_squares_line():
    adata = _hand_adata()
    result = SteadyState(perc=(5, 60), r2_adjusted=True).fit(adata)
    s = np.arange(1, 11)
    u = np.where(s >= 7, 0.5 * s, 0.2 * s)
    slope = (u * s).sum() / (s * s).sum()
    r2 = 1 - ((u - slope * s) ** 2).sum() / ((u - u.mean()) ** 2).sum()
    np.testing.assert_allclose(result.gene_params[Key.var.R2].iloc[0], r2, rtol=1e-5)
    np.testing.assert_allclose(result.gene_params[Key.var.GAMMA].iloc[0], 0.5, rtol=1e-6)


def test_linear_regression_with_offset():
    x = np.linspace(0, 5, 50, dtype=np.float32)[:, None]
    offset, gamma = linear_regression(x, 1 + 2 * x, fit_offset=True)
    np.testing.assert_allclose([offset[0], gamma[0]], [1, 2], rtol=1e-5)
    # negative intercept: scVelo refits through the origin and clips the offset to 0
    offset, gamma = linear_regression(x, -1 + 2 * x, fit_offset=True)
    assert offset[0] == 0
    np.testing.assert_allclose(gamma[0], ((-1 + 2 * x) * x).sum() / (x * x).sum(), rtol=1e-5)


def test_generalized_least_squares_recovers_exact_lines():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 3, (40, 3)).astype(np.float32)
    x2 = rng.uniform(0, 9, (40, 3)).astype(np.float32)
    g = np.array([0.2, 0.7, 1.5])
    _, _, gamma = generalized_least_squares(x, g * x, x2, g * x2, np.ones(3), np.ones(3), perc=95)
    np.testing.assert_allclose(gamma, g, rtol=1e-5)
    offset, offset2, gamma = generalized_least_squares(
        x, 0.3 + g * x, x2, 0.1 + g * x2, np.full(3, 0.5), np.full(3, 2.0), fit_offset=True, fit_offset2=True
    )
    np.testing.assert_allclose(gamma, g, rtol=1e-4)
    np.testing.assert_allclose(offset, 0.3, rtol=1e-3)
    np.testing.assert_allclose(offset2, 0.1, rtol=1e-2)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("q", [5, 50, 95, 97.3, 100])
def test_column_percentile_is_numpys(q, dtype, order):
    """Bit for bit, both memory layouts (C-ordered columns are partitioned as rows of a copy)."""
    rng = np.random.default_rng(1)
    a = rng.poisson(2.0, (301, 7)).astype(dtype)  # many ties
    a[:, 3] = 0
    a[:, 5] = rng.random(301)
    a = np.asarray(a, order=order)
    got = column_percentile(a, q)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, np.percentile(a, q, axis=0))


def test_extreme_quantile_mask_both_tails():
    x = np.arange(20, dtype=np.float32)[:, None]
    mask = extreme_quantile_mask(x, x, perc=(10, 90))
    assert mask[:, 0].tolist() == [i <= 1 or i >= 18 for i in range(20)]


# ------------------------------------------------------------------ contract


@pytest.mark.parametrize("cls", [SteadyState, Stochastic])
def test_fit_leaves_adata_untouched_and_to_adata_writes(sample_adata, cls, progress_log):
    adata = sample_adata
    before = adata.copy()
    log, callback = progress_log
    model = cls()
    assert isinstance(model, VelocityModel)
    result = model.fit(adata, progress=callback)
    assert set(adata.layers) == set(before.layers)
    for key in adata.layers:
        a, b = adata.layers[key], before.layers[key]
        a, b = (m.toarray() if sparse.issparse(m) else m for m in (a, b))
        np.testing.assert_array_equal(a, b)
    assert adata.var.equals(before.var)
    assert adata.obs.equals(before.obs)
    assert set(adata.uns) == set(before.uns)
    steps = [p.step for p in log]
    assert steps == sorted(steps)
    assert log[-1].step == log[-1].total

    assert result.model == cls.name
    assert result.velocity.shape == adata.shape
    assert result.velocity.dtype == np.float32
    gamma = result.gene_params[Key.var.GAMMA].to_numpy()
    np.testing.assert_allclose(
        result.velocity,
        adata.layers[Key.layers.MU] - gamma * adata.layers[Key.layers.MS],
        rtol=1e-5,
        atol=1e-5,
    )
    assert result.likelihood.index.equals(adata.var_names)
    np.testing.assert_array_equal(result.likelihood.to_numpy(), result.gene_params[Key.var.R2].to_numpy())

    result.to_adata(adata)
    np.testing.assert_array_equal(adata.layers[Key.layers.VELOCITY], result.velocity)
    np.testing.assert_array_equal(adata.var[Key.var.GAMMA].to_numpy(), gamma)
    assert Key.var.R2 in adata.var
    np.testing.assert_array_equal(adata.var[Key.var.VELOCITY_GENES].to_numpy(), result.velocity_genes)
    assert adata.uns[Key.uns.VELOCITY_PARAMS]["mode"] == cls.name


def test_registry_and_params():
    assert MODELS["steady_state"] is SteadyState
    assert MODELS["stochastic"] is Stochastic
    model = get_model("stochastic", fit_offset2=True, perc=(10, 90))
    params = model.get_params()
    assert params["fit_offset2"] is True
    assert params["perc"] == (10, 90)
    assert type(model)(**params).get_params() == params
    assert "fit_offset2" not in SteadyState().get_params()


def test_missing_moments_say_to_preprocess(tiny_adata):
    with pytest.raises(InputError, match=r"needs layers \['Ms', 'Mu'\].*prepare"):
        SteadyState().fit(tiny_adata)
    tiny_adata.layers[Key.layers.MS] = tiny_adata.layers[Key.layers.SPLICED].toarray()
    tiny_adata.layers[Key.layers.MU] = tiny_adata.layers[Key.layers.UNSPLICED].toarray()
    SteadyState().fit(tiny_adata)  # enough for the steady-state model
    with pytest.raises(InputError, match="connectivities"):
        Stochastic().fit(tiny_adata)


# ------------------------------------------------------------------ ground truth


def _true_ratio(adata):
    return (adata.var[Key.var.TRUE_GAMMA] / adata.var[Key.var.TRUE_BETA]).to_numpy()


def test_recovers_gamma_over_beta_from_noise_free_abundances():
    adata = simulate(n_obs=1000, n_vars=100, seed=0, noise="none")
    adata.layers[Key.layers.MS] = adata.layers[Key.layers.TRUE_S]
    adata.layers[Key.layers.MU] = adata.layers[Key.layers.TRUE_U]
    rel = SteadyState().fit(adata).gene_params[Key.var.GAMMA].to_numpy() / _true_ratio(adata) - 1
    kind = adata.var[Key.var.TRUE_KIND].to_numpy()
    # constant genes lie exactly on u = (gamma / beta) s
    np.testing.assert_allclose(rel[kind == "steady"], 0, atol=1e-4)
    # standard genes reach >= 97% of the steady state: the top cells sit on the line
    assert np.median(np.abs(rel[kind == "standard"])) < 0.01
    assert np.abs(rel[kind == "standard"]).max() < 0.06
    # induction stopped far from the steady state: the ratio is overestimated (pitfall)
    assert np.median(rel[kind == "early_repression"]) > 0.15


def test_recovers_gamma_over_beta_from_counts():
    """Poisson counts, divided by the true size factors, smoothed over the kNN graph."""
    adata = simulate(n_obs=1000, n_vars=100, seed=0)
    sf = adata.obs[Key.obs.TRUE_SIZE_FACTOR].to_numpy()[:, None]
    for key in (Key.layers.SPLICED, Key.layers.UNSPLICED):
        adata.layers[key] = sparse.csr_matrix(adata.layers[key].toarray() / sf)
    adata.X = sparse.csr_matrix(np.log1p(adata.layers[Key.layers.SPLICED].toarray()))
    compute_neighbors(adata, n_neighbors=30, n_pcs=30, seed=0)
    compute_moments(adata)
    truth = _true_ratio(adata)
    kind = adata.var[Key.var.TRUE_KIND].to_numpy()
    clean = np.isin(kind, ["standard", "steady"])
    for cls in (SteadyState, Stochastic):
        gamma = cls().fit(adata).gene_params[Key.var.GAMMA].to_numpy()
        rel = gamma / truth - 1
        assert spearmanr(gamma[clean], truth[clean]).statistic > 0.97
        # extreme quantiles of noisy counts select cells with upward noise: a small
        # positive bias (about +8%) is expected, not more
        assert -0.05 < np.median(rel[clean]) < 0.15
        assert np.quantile(np.abs(rel[clean]), 0.9) < 0.35


# ------------------------------------------------------------------ scVelo reference


@pytest.fixture(scope="module")
def pancreas(shared_data):
    adata = ad.read_h5ad(shared_data / "pancreas_endocrinogenesis_3696.h5ad")
    prepare(adata, compute_umap=False)
    return adata


@pytest.mark.parametrize(
    ("cls", "column"), [(SteadyState, "deterministic_gamma"), (Stochastic, "stochastic_gamma")]
)
def test_matches_scvelo_on_pancreas(pancreas, reference_dir, cls, column):
    ref = pd.read_csv(reference_dir / "pancreas_3696_scvelo_genes.csv", index_col=0)
    result = cls().fit(pancreas)
    common = pancreas.var_names.intersection(ref.index)
    assert len(common) >= 0.95 * len(ref)
    ref = ref.loc[common]
    ours = result.gene_params.loc[common]
    vg = ref["steady_state_velocity_genes"].astype(bool).to_numpy()
    gamma, ref_gamma = ours[Key.var.GAMMA].to_numpy()[vg], ref[column].to_numpy()[vg]
    assert spearmanr(gamma, ref_gamma).statistic >= 0.99
    assert np.median(np.abs(gamma / ref_gamma - 1)) < 0.02
    # R² as scVelo computes it (r2_adjusted=None: from the extreme-quantile line)
    r2 = ours[Key.var.R2].to_numpy()
    assert np.median(np.abs(r2 - ref["deterministic_r2"].to_numpy())) < 1e-3
    ours_vg = pd.Series(result.velocity_genes, index=pancreas.var_names).loc[common].to_numpy()
    jaccard = (ours_vg & vg).sum() / (ours_vg | vg).sum()
    assert jaccard >= 0.95
