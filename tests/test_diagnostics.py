"""Per-gene trust diagnostics: the differential kinetic test, the boost flag, stability, the flag rule.

The simulator knows which genes have two kinetic regimes (``true_kind == "two_regimes"``:
gamma differs in lineage B) and which are boosted (``"boost"``: alpha rises late in the
induction, ``boost_start=0.8``). The shared kinetic given to the diagnostics is the
simulator's own one-regime, one-alpha curve at each cell's true time (a perfect fit of
the standard genes), so what is flagged is what departs from one kinetic.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest

from explorer._types import InputError
from explorer.data.simulate import simulate
from explorer.diagnostics import (
    differential_kinetic_test,
    flagged_genes,
    gene_diagnostics,
    stability,
    velocity_genes_without_flagged,
)
from explorer.keys import Key


@functools.cache
def _simulated_with_truth_fit():
    adata = simulate(
        n_obs=600,
        n_vars=24,
        seed=1,
        branches=2,
        branch_gene_fraction=0.0,
        kinds={"two_regimes": 0.25, "boost": 0.25},
        boost_start=0.8,
        regime_factor=(4.0, 5.0),
    )
    var = adata.var
    rng = np.random.default_rng(0)
    u, s = adata.layers[Key.layers.TRUE_U], adata.layers[Key.layers.TRUE_S]
    # a little noise, as moments have, so no residual is exactly zero
    adata.layers[Key.layers.MU] = u * (1 + 0.01 * rng.standard_normal(u.shape))
    adata.layers[Key.layers.MS] = s * (1 + 0.01 * rng.standard_normal(s.shape))
    adata.layers[Key.layers.VELOCITY] = adata.layers[Key.layers.TRUE_VELOCITY]
    t_on = var[Key.var.TRUE_T_ON].to_numpy()
    adata.layers[Key.layers.FIT_T] = np.maximum(adata.obs[Key.obs.TRUE_T].to_numpy()[:, None] - t_on, 0.0)
    for fit, true in (
        (Key.var.FIT_ALPHA, Key.var.TRUE_ALPHA),
        (Key.var.FIT_BETA, Key.var.TRUE_BETA),
        (Key.var.FIT_GAMMA, Key.var.TRUE_GAMMA),
        (Key.var.FIT_SCALING, Key.var.TRUE_SCALING),
    ):
        var[fit] = var[true]
    var[Key.var.FIT_T_] = var[Key.var.TRUE_T_] - t_on
    return adata


@pytest.fixture
def truth_fit():
    return _simulated_with_truth_fit().copy()


def test_two_regime_genes_are_flagged_in_the_other_lineage(truth_fit):
    table, pvals = differential_kinetic_test(truth_fit, groupby=Key.obs.CLUSTERS)
    kind = truth_fit.var[Key.var.TRUE_KIND].to_numpy()
    two = kind == "two_regimes"
    assert two.sum() >= 4
    flagged = table[Key.var.DIAG_DK_N_CLUSTERS].to_numpy() > 0
    assert flagged[two].all(), table[two]
    # the flagged clusters are those of regime 1: lineage B, or root cells (half of them are in it)
    for clusters in table.loc[two, Key.var.FIT_DIFF_KINETICS]:
        named = clusters.split(",")
        assert any(c.startswith("B_") for c in named)
        assert not any(c.startswith("A_") for c in named)
    # one kinetic fits the standard genes: none flagged
    assert not flagged[kind == "standard"].any()
    assert pvals.shape == (truth_fit.n_vars, truth_fit.obs[Key.obs.CLUSTERS].cat.categories.size)
    sig = (pvals < 0.01).any(axis=1).to_numpy()
    assert np.array_equal(sig, flagged)


def test_boosted_genes_are_flagged_and_standard_ones_not(truth_fit):
    table = gene_diagnostics(truth_fit)
    kind = truth_fit.var[Key.var.TRUE_KIND].to_numpy()
    boost = table[Key.var.DIAG_BOOST].to_numpy(bool)
    assert boost[kind == "boost"].all(), table.loc[
        kind == "boost", [Key.var.DIAG_BOOST_SCORE, Key.var.DIAG_BOOST_ABOVE]
    ]
    assert not boost[kind == "standard"].any()
    # written into var under the declared keys, and the flag rule combines both tests
    for col in (
        Key.var.DIAG_BOOST,
        Key.var.FIT_DIFF_KINETICS,
        Key.var.DIAG_FLAGGED,
        Key.var.DIAG_FLAG_REASON,
    ):
        assert col in truth_fit.var
    assert Key.varm.PVALS_KINETICS in truth_fit.varm
    expected = set(truth_fit.var_names[(kind == "boost") | (kind == "two_regimes")])
    assert set(flagged_genes(truth_fit)) == expected
    reasons = truth_fit.var.loc[kind == "boost", Key.var.DIAG_FLAG_REASON]
    assert all("boost" in r for r in reasons)
    kept = velocity_genes_without_flagged(truth_fit)
    assert not kept[truth_fit.var_names.isin(list(expected))].any()


def test_stability_on_the_sample(sample_adata):
    """Two stochastic refits on 80% of the sample's cells: well-fitted genes keep rates and signs."""
    table = stability(sample_adata, n_refits=2, fraction=0.8, seed=0)
    vg = sample_adata.var[Key.var.VELOCITY_GENES].to_numpy(bool)
    assert (table.loc[vg, Key.var.DIAG_N_REFITS] == 2).all()
    agree = table.loc[vg, Key.var.DIAG_SIGN_AGREEMENT]
    assert agree.between(0, 1).all()
    assert agree.median() > 0.9
    # gamma's spread across refits is small for genes with a good steady-state fit
    good = vg & (sample_adata.var[Key.var.R2].to_numpy() > 0.5)
    assert table.loc[good, Key.var.DIAG_RATE_SD].median() < 0.1
    # the worst genes are less stable than the best: the score separates something
    low_r2 = vg & (sample_adata.var[Key.var.R2].to_numpy() < 0.2)
    if low_r2.any():
        assert (
            table.loc[low_r2, Key.var.DIAG_RATE_SD].median() > table.loc[good, Key.var.DIAG_RATE_SD].median()
        )


def test_bad_input_says_what_to_do(truth_fit):
    with pytest.raises(InputError, match="obs column 'nope' not found"):
        differential_kinetic_test(truth_fit, groupby="nope")
    with pytest.raises(InputError, match="gene_diagnostics"):
        flagged_genes(truth_fit)
    bare = truth_fit.copy()
    for k in list(bare.var.columns):
        if k.startswith("fit_"):
            del bare.var[k]
    del bare.layers[Key.layers.FIT_T]
    with pytest.raises(InputError, match="Fit a model first"):
        gene_diagnostics(bare)


def test_table_columns_are_documented():
    """Every column gene_diagnostics writes is named in the README's table."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Trust diagnostics", 1)[1].split("\n## ", 1)[0]
    adata = _simulated_with_truth_fit().copy()
    table = gene_diagnostics(adata, write=False)
    missing = [c for c in table.columns if f"`{c}`" not in section]
    assert not missing, missing
    assert isinstance(table, pd.DataFrame)


def test_recompute_without_flagged_genes_on_the_sample(sample_adata):
    """The one-click path: flag, drop the flagged genes from the velocity genes, recompute the graph."""
    from explorer.diagnostics import result_without_flagged
    from explorer.models.base import VelocityResult
    from explorer.pipeline import derive

    gene_diagnostics(sample_adata)
    flagged = flagged_genes(sample_adata)
    result = VelocityResult.from_adata(sample_adata)
    trimmed = result_without_flagged(result, flagged)
    np.testing.assert_array_equal(trimmed.velocity_genes, velocity_genes_without_flagged(sample_adata))
    assert 0 < trimmed.velocity_genes.sum() < result.velocity_genes.sum()
    derived = derive(sample_adata, trimmed)
    before = sample_adata.obs[Key.obs.VELOCITY_CONFIDENCE].to_numpy()
    assert not np.allclose(derived.confidence, before)
    with pytest.raises(InputError, match="velocity genes are flagged"):
        result_without_flagged(result, sample_adata.var_names)
