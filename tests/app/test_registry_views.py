"""A model registered from outside the app shows in it: runner, phase portrait, comparison, colourings.

The toy model below lives only in this test. It is registered with
:func:`explorer.models.register_model` after the app's modules were imported (so the
runner must read the registry when a page is built, not at import) and declares
``shows=("cell_points", "cell_rates", "uncertainty")``; nothing in ``explorer/app`` names it. Also here:
the colour bars of continuous colourings, checked on the drawn Bokeh figures.
"""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd
import pytest
from bokeh.document import Document
from bokeh.models import ColorBar
from panel.io.state import set_curdoc

from explorer.app import plots
from explorer.app.main import create_app
from explorer.app.readouts import COLOR_EXPRESSION, COLOR_UNCERTAINTY, Coloring
from explorer.keys import Key
from explorer.models import MODELS, register_model, unregister_model
from explorer.models.base import VelocityResult
from tests.app.conftest import phase_layers

TOY = "toy_cloud"


def _dense(matrix) -> np.ndarray:
    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, dtype=np.float32)


class ToyCloud:
    """Predicts each cell at ``shrink`` times its (Ms, Mu); velocity Mu - 0.5 Ms; uncertainty: gene 0's Ms.

    Its per-cell splicing rate of a gene is 1 + the cell's Mu.
    """

    name = TOY

    def __init__(self, *, shrink: float = 0.9, seed: int = 0) -> None:
        self.shrink = shrink
        self.seed = seed

    def get_params(self) -> dict[str, float]:
        return {"shrink": self.shrink, "seed": self.seed}

    def fit(self, adata, *, progress=None) -> VelocityResult:
        ms, mu = _dense(adata.layers[Key.layers.MS]), _dense(adata.layers[Key.layers.MU])
        return VelocityResult(
            model=TOY,
            params=self.get_params(),
            obs_names=adata.obs_names,
            var_names=adata.var_names,
            velocity=mu - 0.5 * ms,
            gene_params=pd.DataFrame(index=adata.var_names),
            velocity_genes=np.ones(adata.n_vars, dtype=bool),
            likelihood=pd.Series(np.linspace(0, 1, adata.n_vars), index=adata.var_names),
            uncertainty=ms[:, 0].copy(),
            layers={
                Key.layers.PREDICTED_S: self.shrink * ms,
                Key.layers.PREDICTED_U: self.shrink * mu,
                Key.layers.RATE_BETA: 1 + mu,
            },
        )


@pytest.fixture
def toy_model():
    register_model(
        TOY, ToyCloud, shows=("cell_points", "cell_rates", "uncertainty"), description="a toy cloud"
    )
    yield TOY
    unregister_model(TOY)
    assert TOY not in MODELS


@pytest.fixture
def app(toy_model, app_adata, tmp_path):
    doc = Document()
    with set_curdoc(doc):
        page = create_app(app_adata, data_dir=tmp_path)
        page.server_doc(doc)
        yield page.app


def _frame(dmap):
    return dmap.last


def _cell_points(overlay) -> list[hv.Points]:
    return [layer for layer in overlay if layer.group == "CellPoints"]


def test_a_registered_toy_model_runs_and_is_drawn_without_app_changes(app):
    state, views, runner = app.state, app.views, app.runner
    assert TOY in runner.model_select.options
    runner.model_select.value = TOY
    assert set(runner._widgets) == {"shrink", "seed"}  # the form follows the toy's constructor
    assert "toy cloud" in runner.description.object
    runner._widgets["shrink"].value = 0.5
    runner._run()
    assert state.job.join(120), state.error
    assert state.error == ""
    label = state.model
    assert label.startswith(TOY)
    assert state.fit_shows() == {"cell_points", "cell_rates", "uncertainty"}

    # the phase portrait draws each cell's predicted (s, u): half its own (Ms, Mu)
    cloud = _cell_points(_frame(views["phase"].fits))
    assert len(cloud) == 1
    ms, mu = state.gene_values("Ms"), state.gene_values("Mu")
    np.testing.assert_allclose(cloud[0].dimension_values("Ms"), 0.5 * ms, rtol=1e-6)
    np.testing.assert_allclose(cloud[0].dimension_values("Mu"), 0.5 * mu, rtol=1e-6)
    assert "predicted cells" in views["phase"]._legend()
    # ... and follows the selected gene
    state.select_gene(str(state.adata.var_names[4]))
    (cloud,) = phase_layers(views["phase"], "points")
    np.testing.assert_allclose(cloud[:, 0], 0.5 * state.gene_values("Ms"), rtol=1e-6)
    np.testing.assert_allclose(cloud[:, 1], 0.5 * state.gene_values("Mu"), rtol=1e-6)

    # its uncertainty colours the embedding
    assert COLOR_UNCERTAINTY in state.param.color_by.objects
    state.color_by = COLOR_UNCERTAINTY
    coloring = state.coloring()
    assert coloring.kind == "continuous"
    np.testing.assert_allclose(coloring.values, state.gene_values("Ms", gene=str(state.adata.var_names[0])))

    # and a gene's per-cell rate colours it: the embedding draws the toy's 1 + Mu of the gene
    rate = "gene: rate beta (splicing)"
    assert rate in state.param.color_by.objects
    assert "gene: rate alpha (transcription)" in state.param.color_by.objects  # offered; the toy has none
    state.color_by = rate
    shown = _frame(views["embedding"].scatter.base).dimension_values("value")
    np.testing.assert_allclose(shown, 1 + state.gene_values("Mu"), rtol=1e-6)

    # the comparison: toy as A against steady state as B
    state.run_model("steady_state").join(120)
    assert (state.compare_a, state.compare_b) == (label, "steady_state")
    compare = views["compare"]
    a_cloud = _cell_points(compare.phase_a.fits[()])
    assert len(a_cloud) == 1
    assert _cell_points(compare.phase_b.fits[()]) == []
    quality = state.compare_quality()
    assert len(quality) == state.adata.n_vars
    np.testing.assert_allclose(quality["a"], np.linspace(0, 1, state.adata.n_vars))
    frame = compare.quality[()]
    assert len(frame.get(0)) == len(quality)
    # each axis names its fit's own measure; the steady state's is its R²
    assert [d.name for d in frame.get(0).kdims] == ["A: fit quality", "B: R²"]
    assert compare.phase_a._title() == f"{state.gene} — A: {label}"  # short enough for 400 pixels
    # neither fit has its own latent time: nothing to set against each other
    assert isinstance(compare.latent[()].get(1), hv.Text)
    agreement = compare.agreement._coloring()
    assert agreement.kind == "continuous"
    assert np.nanmax(np.abs(agreement.values)) <= 1 + 1e-6


def test_an_unregistered_model_is_not_offered(app_adata, tmp_path):
    doc = Document()
    with set_curdoc(doc):
        page = create_app(app_adata, data_dir=tmp_path)
    assert TOY not in page.app.runner.model_select.options


# ---------------------------------------------------------------- colour bars
def _colorbars(live) -> list[ColorBar]:
    figure = live.plots[-1].state
    return [r for r in figure.right if isinstance(r, ColorBar)]


def test_continuous_colourings_get_a_colour_bar(app):
    state, views = app.state, app.views
    embedding = views["embedding"].scatter.base_live
    assert not any(bar.visible for bar in _colorbars(embedding))  # clusters: a legend, no bar
    state.color_by = COLOR_EXPRESSION
    (bar,) = _colorbars(embedding)
    assert bar.visible
    values = state.gene_values("Ms")
    assert (bar.color_mapper.low, bar.color_mapper.high) == pytest.approx(
        (float(values.min()), float(values.max()))
    )
    # another gene: the bar's range follows the colours sent in place
    state.select_gene(str(state.adata.var_names[9]))
    values = state.gene_values("Ms")
    assert bar.color_mapper.high == pytest.approx(float(values.max()))
    phase = _colorbars(views["phase"].scatter.base_live)
    assert phase  # the phase portrait is coloured as the embedding
    assert phase[0].visible
    state.color_by = Key.obs.CLUSTERS
    assert not bar.visible

    # the Compare tab's velocity agreement (cosine) always has one
    state.run_model("steady_state").join(120)
    state.run_model("stochastic").join(120)
    hv.renderer("bokeh").get_plot(views["compare"].agreement.overlay())  # as opening the tab draws it
    (agreement,) = _colorbars(views["compare"].agreement.base_live)
    assert agreement.visible
    cosine = state.compare_agreement()
    assert agreement.color_mapper.high == pytest.approx(float(np.nanmax(cosine)))


def test_rasterised_cells_get_a_colour_bar_too():
    rng = np.random.default_rng(0)
    n = plots.DATASHADE_THRESHOLD + 1
    x, y = rng.normal(size=n), rng.normal(size=n)
    element = plots.rasterize(x, y, Coloring("continuous", x, "x value"), width=100, height=80)
    figure = hv.renderer("bokeh").get_plot(element).state
    (bar,) = [r for r in figure.right if isinstance(r, ColorBar)]
    assert bar.visible
    assert (bar.color_mapper.low, bar.color_mapper.high) == pytest.approx((x.min(), x.max()))
    categories = Coloring(
        "category", (x > 0).astype(np.int8), "side", ("l", "r"), {"l": "#ff0000", "r": "#0000ff"}
    )
    figure = hv.renderer("bokeh").get_plot(plots.rasterize(x, y, categories, width=100, height=80)).state
    assert not [r for r in figure.right if isinstance(r, ColorBar)]
