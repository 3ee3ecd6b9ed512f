"""The Compare tab's metrics table, clicked: a fit's or a metric's detail per cluster and per cell.

Hand-checkable fits on the app's small dataset (``app_adata``): one moves every cell the
same way (every cosine 1), the other flips the velocity of the ``mid`` cells (their
neighbours outside ``mid`` disagree), so the per-cluster and per-cell figures are known.
The view-level click (``ComparisonView._metric_clicked``) is checked in
``tests/app/test_models_views.py``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from explorer.app import plots, readouts
from explorer.app.jobs import Fit
from explorer.graph.metrics import cross_boundary_correctness, cross_boundary_correctness_per_cell
from explorer.keys import Key
from explorer.models.base import VelocityResult


def _fit(adata, label: str, velocity: np.ndarray, layers: dict | None = None) -> Fit:
    result = VelocityResult(
        model="velovae" if layers else "stochastic",
        params={},
        obs_names=adata.obs_names,
        var_names=adata.var_names,
        velocity=velocity,
        gene_params=pd.DataFrame(index=adata.var_names),
        velocity_genes=np.ones(adata.n_vars, dtype=bool),
        layers=layers or {},
    )
    return Fit(label=label, key=(label, ()), result=result)


@pytest.fixture(scope="module")
def scored(app_adata):
    n_obs, n_vars = app_adata.shape
    clusters = app_adata.obs[Key.obs.CLUSTERS].astype(str).to_numpy()
    same = np.tile(np.linspace(-1, 1, n_vars, dtype=np.float32), (n_obs, 1))
    flipped = same.copy()
    flipped[clusters == "mid"] *= -1
    ms = readouts._dense_layer(app_adata.layers[Key.layers.MS]).astype(np.float32)
    mu = readouts._dense_layer(app_adata.layers[Key.layers.MU]).astype(np.float32)
    # u off by 1 in the early cells only: per-cell MSE 1 there, 0 elsewhere
    u_hat = mu + (clusters == "early")[:, None].astype(np.float32)
    layers = {Key.layers.PREDICTED_S: ms, Key.layers.PREDICTED_U: u_hat}
    fits = {"same": _fit(app_adata, "same", same, layers), "flipped": _fit(app_adata, "flipped", flipped)}
    found = readouts.model_metrics(app_adata, fits, [("early", "mid"), ("mid", "late")])
    return found, clusters, same, flipped


def test_clicking_a_metric_gives_its_per_cluster_and_per_cell_detail(app_adata, scored):
    found, clusters, same, flipped = scored
    detail = readouts.metric_detail(found, "flipped", "consistency")
    table = detail.table.set_index("cluster")
    assert list(table.columns) == ["same", "flipped", "cells scored"]
    assert table.loc["all cells", "cells scored"] == app_adata.n_obs
    assert table["same"].to_numpy() == pytest.approx(1.0)  # every neighbour agrees
    # the flipped fit: a late cell's neighbours are late (and a few mid): at most 1, the mid ones
    # disagree with their early/late neighbours, so mid is below late
    assert table.loc["mid", "flipped"] < table.loc["late", "flipped"] <= 1.0 + 1e-6
    # per cell: the clicked fit's values, averaging to the table's row (the summary figure)
    assert detail.values.shape == (app_adata.n_obs,)
    row = found.table.set_index("model").loc["flipped"]
    assert np.nanmean(detail.values) == pytest.approx(row["consistency"], rel=1e-5)
    assert table.loc["all cells", "flipped"] == pytest.approx(row["consistency"], rel=1e-5)
    coloring = readouts.metric_coloring(detail, app_adata.n_obs)
    assert coloring.kind == "continuous"
    assert coloring.label == "consistency, flipped (per cell)"


def test_a_transitions_detail_is_its_source_cells(app_adata, scored):
    found, clusters, same, _ = scored
    detail = readouts.metric_detail(found, "same", "cbdir[early>mid]")
    # only early cells with neighbours in mid are scored
    assert list(detail.table["cluster"]) == ["all cells", "early"]
    expected = cross_boundary_correctness_per_cell(app_adata, same, source="early", target="mid")
    np.testing.assert_allclose(detail.values, expected, equal_nan=True)
    assert np.isnan(detail.values[clusters != "early"]).all()
    assert detail.table.set_index("cluster").loc["early", "same"] == pytest.approx(
        cross_boundary_correctness(app_adata, same, source="early", target="mid")
    )
    # the mean CBDir: one row per transition, one column per fit
    mean = readouts.metric_detail(found, "same", "cbdir")
    assert list(mean.table["transition"]) == ["cbdir[early>mid]", "cbdir[mid>late]"]
    assert mean.values is None
    assert mean.table["flipped"].tolist() == pytest.approx(
        found.table.set_index("model").loc["flipped", ["cbdir[early>mid]", "cbdir[mid>late]"]].tolist()
    )


def test_a_transitions_detail_lists_the_genes_that_carry_it(app_adata, scored):
    found, *_ = scored
    table = found.table.set_index("model")
    for label in ("same", "flipped"):
        for metric in ("cbdir[early>mid]", "cbdir[mid>late]"):
            # every gene's term, summed, is the CBDir of the table
            assert found.per_gene[label][metric].sum() == pytest.approx(table.loc[label, metric], abs=1e-5)
    # the flipped fit turns the mid cells' velocity around: from mid every term changes sign,
    # from early (whose velocity it keeps) none changes
    early, mid = "cbdir[early>mid]", "cbdir[mid>late]"
    np.testing.assert_allclose(found.per_gene["flipped"][early], found.per_gene["same"][early], atol=1e-6)
    np.testing.assert_allclose(found.per_gene["flipped"][mid], -found.per_gene["same"][mid], atol=1e-6)
    detail = readouts.metric_detail(found, "flipped", mid)
    genes = detail.genes
    assert list(genes.columns) == ["gene", "same", "flipped"]
    assert len(genes) == min(readouts.TRANSITION_GENES_SHOWN, app_adata.n_vars)
    # the clicked fit's largest terms, most backward first
    terms = found.per_gene["flipped"][mid]
    assert genes["flipped"].is_monotonic_increasing
    assert genes["flipped"].abs().min() >= terms.abs().nlargest(len(genes)).min() - 1e-12
    assert set(genes["gene"]) <= set(app_adata.var_names)
    assert "flipped" in detail.genes_title and "sum to the CBDir" in detail.genes_title
    # only a transition's CBDir lists genes
    assert readouts.metric_detail(found, "flipped", "consistency").genes is None
    assert readouts.metric_detail(found, "flipped", "cbdir").genes is None


def test_reconstruction_and_a_fits_name(app_adata, scored):
    found, clusters, *_ = scored
    detail = readouts.metric_detail(found, "same", "MSE")
    table = detail.table.set_index("cluster")
    assert list(table.columns) == ["same", "cells scored"]  # the other fit predicts no (u, s)
    # u off by 1 in early cells: MSE per gene 1 there, 0 elsewhere; the mean over all is their share
    assert table.loc["early", "same"] == pytest.approx(1.0)
    assert table.loc["late", "same"] == pytest.approx(0.0, abs=1e-6)
    assert table.loc["all cells", "same"] == pytest.approx(np.mean(clusters == "early"))
    assert table.loc["all cells", "same"] == pytest.approx(found.table.set_index("model").loc["same", "MSE"])
    # ICVCoh of one cluster: the cells of that cluster only
    coh = readouts.metric_detail(found, "flipped", "icvcoh[mid]")
    assert list(coh.table["cluster"]) == ["all cells", "mid"]
    # a fit's name: its per-cluster means, no per-cell colouring
    name = readouts.metric_detail(found, "flipped", "model")
    assert name.values is None and readouts.metric_coloring(name, app_adata.n_obs) is None
    assert set(name.table["cluster"]) == set(clusters)
    assert readouts.metric_detail(found, "nobody", "consistency") is None


def test_fit_quality_axes_say_when_the_scales_differ(app_adata):
    genes = app_adata.var_names

    def fit(model: str, key: str) -> Fit:
        velocity = np.zeros(app_adata.shape, dtype=np.float32)
        f = _fit(app_adata, model, velocity)
        likelihood = pd.Series(0.5, index=genes, name=key)
        return Fit(label=model, key=(model, ()), result=_replace(f.result, model, likelihood))

    vae, dyn = fit("velovae", Key.var.FIT_LIKELIHOOD), fit("dynamical", Key.var.FIT_LIKELIHOOD)
    # both call it a likelihood, on different scales: the axes name the models, the title says so
    a, b, title = readouts.quality_axes(vae, dyn)
    assert (a, b) == ("A: likelihood (velovae)", "B: likelihood (dynamical)")
    assert "not one scale" in title and "reconstruction" in title
    assert len(title) <= 44  # shown whole over a 400-pixel plot (the page cut one after 45 characters)
    # two fits of one model, or the steady-state line's R² of two steady-state models: one scale
    same = ("A: likelihood", "B: likelihood", "per-gene fit quality (click a gene)")
    assert readouts.quality_axes(dyn, dyn) == same
    ss, st = fit("steady_state", Key.var.R2), fit("stochastic", Key.var.R2)
    assert readouts.quality_axes(ss, st)[2] == "per-gene fit quality (click a gene)"
    assert readouts.quality_axes(dyn, st)[:2] == ("A: likelihood", "B: R²")
    assert "not one scale" in readouts.quality_axes(dyn, st)[2]
    # the scatter's diagonal only where the scales are one (it put VeloVAE above the dynamical
    # model on almost every pancreas gene, a difference of scale, until 2026-12-05)
    assert readouts.one_scale(dyn, dyn) and readouts.one_scale(ss, st)
    assert not readouts.one_scale(vae, dyn) and not readouts.one_scale(dyn, st)
    values = np.array([0.2, 0.4, 3.0])
    for diagonal, points in ((True, 2), (False, 0)):
        line = plots.comparison_scatter(values, values / 2, labels=("a", "b"), title="t", diagonal=diagonal)
        assert len(line.Curve.I.data) == points


def _replace(result: VelocityResult, model: str, likelihood: pd.Series) -> VelocityResult:
    return dataclasses.replace(result, model=model, likelihood=likelihood)
