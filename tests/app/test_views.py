"""The views, headless: a Bokeh document without a browser; selections change what every view shows."""

from __future__ import annotations

import contextlib
import re
from types import SimpleNamespace
from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from bokeh.core.property.vectorization import Unspecified
from bokeh.document import Document
from panel.io.state import set_curdoc

from explorer.app import plots
from explorer.app.main import create_app
from explorer.app.readouts import PhaseFit
from explorer.app.state import COLOR_EXPRESSION, COLOR_VELOCITY, Coloring
from explorer.app.views.export import plot_file
from explorer.keys import Key


@pytest.fixture
def timed_adata(app_adata):
    """``app_adata`` with ``obs['latent_time']`` (the simulator's time scaled to [0, 1])."""
    adata = app_adata.copy()
    t = adata.obs[Key.obs.TRUE_T].to_numpy()
    adata.obs[Key.obs.LATENT_TIME] = (t - t.min()) / (t.max() - t.min())
    return adata


@pytest.fixture
def app(timed_adata, tmp_path):
    """A rendered page (the model tree built as for a browser) and its views."""
    doc = Document()
    with set_curdoc(doc):
        page = create_app(timed_adata, data_dir=tmp_path)
        page.server_doc(doc)
        yield page.app


def shown_text(pane) -> str:
    """The text a Markdown pane (or Alert) shows in the browser: its Markdown rendered, tags removed."""
    import html
    import re

    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark").render(str(pane.object))
    return html.unescape(re.sub(r"<[^>]+>", "", rendered))


def _frame(dmap):
    """The element a DynamicMap drew last."""
    return dmap.last


def _shown(live):
    """What the browser is sent for a live layer: its data source's ``(x, y)`` rows."""
    data = live.shown
    return np.column_stack([data["x"], data["y"]])


def test_shading_the_filled_pixels_gives_datashaders_image():
    """plots.shade_filled shades only pixels with cells, and gives tf.shade's image bit for bit."""
    import datashader as ds
    import datashader.transfer_functions as tf

    rng = np.random.default_rng(3)
    n = 3_000
    x = rng.normal(size=n).astype(np.float32)
    y = (x**2 + rng.normal(scale=0.05, size=n)).astype(np.float32)  # a thin arc: most pixels empty
    frame = pd.DataFrame(
        {"x": x, "y": y, "c": pd.Categorical.from_codes(rng.integers(0, 3, n), ["a", "b", "c"]), "v": x * y}
    )
    cases = [
        (ds.count_cat("c"), {"color_key": ["#1f77b4", "#ff7f0e", "#2ca02c"], "min_alpha": 200}),
        (ds.mean("v"), {"cmap": ["#440154", "#21918c", "#fde725"], "how": "linear", "span": (-1.0, 2.0)}),
        (ds.count(), {"cmap": ["#123456", "#123456"], "min_alpha": 255}),
    ]
    for size, x_range in ((200, (-3.0, 3.0)), (3, (-0.5, 0.5)), (50, (10.0, 11.0))):  # sparse, full, empty
        canvas = ds.Canvas(plot_width=size, plot_height=size, x_range=x_range, y_range=(-0.5, 9.0))
        for reduction, options in cases:
            agg = canvas.points(frame, "x", "y", agg=reduction)
            expected = tf.shade(agg, **options)
            found = plots.shade_filled(agg, **options)
            assert found.dtype == expected.dtype
            np.testing.assert_array_equal(found.data, expected.data)
            np.testing.assert_array_equal(found.coords["x"], expected.coords["x"])
    # the axis range of an image skips what is not finite, as before
    assert plots._shade_range(np.array([1.0, np.nan, 3.0, np.inf]), None, None) == pytest.approx((0.96, 3.04))
    assert plots._shade_range(np.array([np.nan]), None, None) == (0.0, 1.0)


def test_a_shaded_image_is_datashaders_image_of_the_cells():
    """plots.shade draws datashader's image of the cells; cells without a category count in the first."""
    import datashader as ds
    import datashader.transfer_functions as tf

    rng = np.random.default_rng(4)
    n = 2_000
    x, y = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
    codes = rng.integers(-1, 3, n).astype(np.int8)
    key = {"a": "#1f77b4", "b": "#ff7f0e", "c": "#2ca02c"}
    coloring = Coloring("category", codes, "c", ("a", "b", "c"), key)
    found, bounds = plots.shade(x, y, coloring, x_range=(-2.0, 2.0), y_range=(-1.0, 3.0), width=40, height=30)
    assert bounds == (-2.0, -1.0, 2.0, 3.0)
    first_if_missing = pd.Categorical.from_codes(np.maximum(codes, 0), ["a", "b", "c"])
    frame = pd.DataFrame({"x": x, "y": y, "c": first_if_missing})
    canvas = ds.Canvas(plot_width=40, plot_height=30, x_range=(-2.0, 2.0), y_range=(-1.0, 3.0))
    agg = canvas.points(frame, "x", "y", agg=ds.count_cat("c"))
    shaded = tf.shade(agg, color_key=list(key.values()), min_alpha=200)
    expected = tf.dynspread(shaded, threshold=0.5, max_px=2)
    np.testing.assert_array_equal(found, expected.to_numpy())
    # read-only arrays (a store's columns) are binned as they are
    x.flags.writeable = y.flags.writeable = codes.flags.writeable = False
    np.testing.assert_array_equal(
        plots.shade(x, y, coloring, x_range=(-2.0, 2.0), y_range=(-1.0, 3.0), width=40, height=30)[0], found
    )


def test_a_fits_phase_layers_stay_for_a_gene_without_them():
    """A fit's curve and line layers stay (empty) for a gene it did not fit: a click keeps the layers."""
    fitted = PhaseFit(
        label="dynamical", active=True, slope=0.5, s=np.array([0.0, 1.0]), u=np.array([0.0, 0.4]),
        line=np.array([[0.0, 0.0], [2.0, 1.0]]), kinds=frozenset({"curve", "line"}),
    )  # fmt: skip
    unfitted = PhaseFit(label="dynamical", active=True, slope=None, s=None, u=None, kinds=fitted.kinds)
    with_data, without = plots.phase_fit_layers([fitted]), plots.phase_fit_layers([unfitted])
    assert [key for key, _ in with_data] == [key for key, _ in without]
    assert [sorted(columns) for _, columns in with_data] == [sorted(columns) for _, columns in without]
    assert all(len(values) == 0 for _, columns in without for values in columns.values())
    # drawn as empty elements, and nothing at all for a fit that never draws them
    assert len(plots.phase_fits([unfitted])) == len(with_data)
    assert plots.phase_fit_layers([PhaseFit(label="x", active=False, slope=None, s=None, u=None)]) == []


def test_streamlines_are_one_path_that_lifts_the_pen_between_lines():
    """All streamlines as one path, a NaN row between two lines, in order; lone points are dropped."""
    lines = [
        np.array([[0.0, 0.0, 9.0], [1.0, 1.0, 9.0]]),  # a third column (a time) is not drawn
        np.array([[5.0, 5.0]]),
        np.array([[2.0, 0.0], [3.0, 1.0], [4.0, 0.5]]),
    ]
    path = plots.streamlines(lines)
    assert len(path.split()) == 1
    drawn = np.column_stack([path.dimension_values(0), path.dimension_values(1)])
    gaps = np.flatnonzero(np.isnan(drawn).any(axis=1))
    np.testing.assert_array_equal(gaps, [2])
    np.testing.assert_array_equal(drawn[:2], lines[0][:, :2])
    np.testing.assert_array_equal(drawn[3:], lines[2])
    assert len(plots.streamlines([]).split()) == 0
    assert len(plots.streamlines([np.array([[1.0, 2.0]])]).split()) == 0


def test_page_builds_every_view(app):
    assert set(app.views) >= {"embedding", "phase", "genes", "inspector", "time", "compare", "export"}
    embedding = _frame(app.views["embedding"].scatter.base)
    assert len(embedding) == app.state.adata.n_obs


def test_selecting_a_gene_updates_phase_time_table_and_colouring(app):
    state, views = app.state, app.views
    state.run_model("stochastic").join(120)  # a fit, so the phase portrait has lines to move
    state.color_by = COLOR_EXPRESSION
    row = int(np.flatnonzero(views["genes"].table.value["gene"] != state.gene)[0])
    gene = str(views["genes"].table.value.loc[row, "gene"])
    views["genes"]._clicked(SimpleNamespace(row=row, column="gene"))  # a click on the table row
    assert state.gene == gene
    # the phase portrait's cells and fitted lines get the new gene's data directly
    phase = views["phase"].scatter.base_live
    np.testing.assert_allclose(phase.shown["Ms"], state.gene_values("Ms"))
    np.testing.assert_allclose(phase.shown["Mu"], state.gene_values("Mu"))
    layers = plots.phase_fit_layers(state.phase_fits())
    assert layers
    for live, (_, columns) in zip(views["phase"]._fits_live, layers, strict=True):
        assert set(live.shown) == {"Ms", "Mu"}
        np.testing.assert_allclose(live.shown["Ms"], columns["Ms"])
        np.testing.assert_allclose(live.shown["Mu"], columns["Mu"])
    # its axes span the cells and the lines
    x_range = phase.plots[-1].handles["x_range"]
    lines_x = np.concatenate([np.asarray(c["Ms"], dtype=float) for _, c in layers])
    assert x_range.start <= min(state.gene_values("Ms").min(), np.nanmin(lines_x))
    assert x_range.end >= max(state.gene_values("Ms").max(), np.nanmax(lines_x))
    # the time plots get the new gene's values, axis range and title sent directly
    time_ms = views["time"].scatters["Ms"]
    np.testing.assert_allclose(time_ms.base_live.shown["Ms"], state.gene_values("Ms"))
    plot = time_ms.base_live.plots[-1]
    assert plot.handles["y_range"].end >= state.gene_values("Ms").max()
    assert plot.handles["plot"].title.text == f"{gene}: Ms"
    # the plots whose y range follows the gene draw its tick labels along the axis (a y axis
    # of constant width: no re-layout of the page in the browser); the embedding's stay level
    for scatter in (views["phase"].scatter, *views["time"].scatters.values()):
        axis = scatter.base_live.plots[-1].state.left[0]
        assert axis.major_label_orientation == pytest.approx(np.pi / 2)
        # few, short labels: along the axis each takes its length of the plot's height
        assert axis.ticker.desired_num_ticks == 4 and axis.formatter.format == "%.4g"
    embedding_axis = views["embedding"].scatter.base_live.plots[-1].state.left[0]
    assert embedding_axis.major_label_orientation == "horizontal"
    np.testing.assert_allclose(views["time"].curves_live["Mu"].shown["Mu"], state.time_curve("Mu")[1])
    # the embedding, coloured by the gene, is recoloured in place
    embedding = views["embedding"].scatter.base_live
    np.testing.assert_allclose(embedding.shown["color"], state.gene_values("Ms"))
    mapper = embedding.plots[-1].handles["color_color_mapper"]
    assert (mapper.low, mapper.high) == pytest.approx(plots.value_range(state.coloring()))
    assert views["genes"].table.selection == [row]
    # the search box selects too, whatever the case
    views["genes"].search.value = str(state.adata.var_names[2]).upper()
    assert state.gene == str(state.adata.var_names[2])
    views["genes"].search.value = "no-such-gene"
    assert "not found" in state.error
    assert app.error.visible


def test_clicking_a_cell_highlights_it_everywhere_and_fills_the_inspector(app):
    state, views = app.state, app.views
    state.run_model("stochastic").join(120)
    xy = state.embedding()
    views["embedding"].scatter._tapped(x=float(xy[42, 0]), y=float(xy[42, 1]))  # a tap on the embedding
    assert state.cell == 42
    np.testing.assert_allclose(_shown(views["embedding"].scatter.marker_live), [xy[42]], rtol=1e-6)
    np.testing.assert_allclose(
        _shown(views["phase"].scatter.marker_live),
        [[state.gene_values("Ms")[42], state.gene_values("Mu")[42]]],
    )
    t = state.latent_time()
    np.testing.assert_allclose(
        _shown(views["time"].scatters["Mu"].marker_live), [[t[42], state.gene_values("Mu")[42]]], rtol=1e-6
    )
    # the marker moves with the points when another gene is chosen
    state.select_gene(str(state.adata.var_names[11]))
    np.testing.assert_allclose(
        _shown(views["phase"].scatter.marker_live),
        [[state.gene_values("Ms")[42], state.gene_values("Mu")[42]]],
    )
    inspector = views["inspector"]
    assert f"Cell {state.adata.obs_names[42]} (row 42)" in shown_text(inspector.summary)
    assert len(inspector.targets.value) == state.n_targets
    segments = views["embedding"].targets_live[0].shown  # segments to the likely next cells
    assert len(segments["x1"]) == state.n_targets
    np.testing.assert_allclose(segments["x0"], xy[42, 0])
    # what the view sent is what the drawing reads: the widths by probability, 1 to 5 pixels
    # (sent as "w", a column the drawing did not read, they were all 1 pixel wide)
    drawn = hv.render(views["embedding"]._draw_targets()).renderers
    assert [set(r.data_source.data) for r in drawn] == [set(x.shown) for x in views["embedding"].targets_live]
    p = state.cell_info().targets["probability"].to_numpy()
    np.testing.assert_allclose(segments["line_width"], 1 + 4 * p / p.max())
    # clicking a next cell in the inspector moves there
    first = inspector._indices[0]
    inspector._clicked(SimpleNamespace(row=0))
    assert state.cell == first
    # a click on the phase portrait picks that view's nearest cell
    ms, mu = state.gene_values("Ms"), state.gene_values("Mu")
    views["phase"].scatter._tapped(x=float(ms[9]), y=float(mu[9]))
    assert (ms[state.cell], mu[state.cell]) == (ms[9], mu[9])


def test_box_selection_highlights_cells_in_phase_and_time_views(app):
    state, views = app.state, app.views
    xy = state.embedding()
    bounds = (float(xy[:, 0].min()), float(xy[:, 1].min()), float(np.median(xy[:, 0])), float(xy[:, 1].max()))
    views["embedding"].scatter._boxed(bounds=bounds)
    chosen = np.flatnonzero(xy[:, 0] <= np.median(xy[:, 0]))
    assert state.selected.tolist() == chosen.tolist()
    phase_sel = _shown(views["phase"].scatter.selection_live)
    np.testing.assert_allclose(phase_sel[:, 0], state.gene_values("Ms")[chosen])
    assert len(_shown(views["time"].scatters["Ms"].selection_live)) == len(chosen)
    # a lasso does the same with a polygon; a double tap clears
    views["embedding"].scatter._lassoed(geometry=np.array([[-1e3, -1e3], [1e3, -1e3], [1e3, 1e3]]))
    assert len(state.selected) > 0
    views["embedding"].scatter._clear.event(x=0.0, y=0.0)
    assert len(state.selected) == 0


def test_runner_shows_progress_and_result_in_every_view(app):
    state, views, runner = app.state, app.views, app.runner
    runner.model_select.value = "steady_state"
    assert "fit_offset" in runner._widgets or runner._widgets  # the form follows the model
    runner._run()
    assert state.job.join(120)
    assert runner.bar.value == 1000
    assert runner.cancel_button.disabled is not state.running
    assert "steady_state" in runner.active.options
    assert "gamma" in views["genes"].table.value.columns
    fits = _frame(views["phase"].fits)
    lines = [layer for layer in fits if layer.group == "SteadyState"]  # u = gamma s
    gamma = state.fit.result.gene_params[Key.var.GAMMA].iloc[state.gene_index]
    s_end, u_end = lines[0].dimension_values("Ms")[-1], lines[0].dimension_values("Mu")[-1]
    assert u_end == pytest.approx(gamma * s_end)
    state.color_by = COLOR_VELOCITY
    shown = _frame(views["embedding"].scatter.base).dimension_values("value")
    np.testing.assert_allclose(shown, state.gene_values("velocity"), equal_nan=True)
    streamlines = _frame(views["embedding"].streamlines)
    assert len(streamlines.split()) > 0
    state.show_arrows = True  # velocity arrows on a grid, as an option
    arrows = _frame(views["embedding"].arrows)
    assert len(arrows) > 10


def test_key_parameters_offer_the_datasets_columns_and_reach_the_model(app, app_adata):
    """time_key lists the numeric obs columns of a few values (capture times), cluster_key the categorical."""
    state, runner = app.state, app.runner
    runner.model_select.value = "velovae"
    menu = runner._widgets["time_key"]
    assert menu.value is None and next(iter(menu.options)) == "(none)" and menu.options["(none)"] is None
    # one value per cell (a time, a score) is not a capture time; clusters are not numbers
    for column in (Key.obs.TRUE_T, Key.obs.LATENT_TIME, Key.obs.CLUSTERS):
        assert column not in menu.options.values()
    runner.model_select.value = "deepvelo"
    clusters = runner._widgets["cluster_key"]
    assert clusters.value == Key.obs.CLUSTERS and "(none)" not in clusters.options
    assert Key.obs.TRUE_T not in clusters.options.values()
    # another dataset's columns replace the menus': one with capture days
    other = app_adata.copy()
    t = other.obs[Key.obs.TRUE_T].to_numpy()
    other.obs["day"] = np.digitize(t, np.quantile(t, [0.25, 0.5, 0.75])).astype(float) + 1
    state.set_data(other, name="with days")
    runner.model_select.value = "velovae"
    assert "day" in runner._widgets["time_key"].options
    # a run with capture times: the model gets them and its time follows them
    quick = {"max_epochs": 4, "max_epochs_stage2": 2, "max_epochs_polish": 2, "n_samples": 4}
    for name, value in quick.items():
        runner._widgets[name].value = value
    runner._widgets["time_key"].value = "day"
    assert runner.params()["time_key"] == "day"
    runner._run()
    assert state.job.join(300)
    assert state.error == ""
    assert state.fit.result.params["time_key"] == "day"
    assert spearmanr(state.fit.result.latent_time, t)[0] > 0.9
    assert not runner.notice.visible  # the days follow the cells' order
    # days that do not: the model's warning is shown under the run, not only logged
    other.obs["shuffled"] = np.random.default_rng(0).permutation(other.obs["day"].to_numpy())
    state.set_data(other, name="with shuffled days")
    runner.model_select.value = "velovae"
    for name, value in quick.items():
        runner._widgets[name].value = value
    runner._widgets["time_key"].value = "shuffled"
    runner._run()
    assert state.job.join(300) and state.error == ""
    assert runner.notice.visible and "agree poorly" in shown_text(runner.notice)
    assert "shuffled" in shown_text(runner.notice)


def test_a_cluster_key_the_data_lacks_starts_at_its_cell_types(app, app_adata):
    """Types under ``cell_type``, no ``clusters``: DeepVelo's form starts cluster_key there and sends it."""
    state, runner = app.state, app.runner
    other = app_adata.copy()
    other.obs.insert(0, "batch", pd.Categorical(np.arange(other.n_obs) % 2))
    other.obs["cell_type"] = other.obs.pop(Key.obs.CLUSTERS)
    state.set_data(other, name="typed")
    runner.model_select.value = "deepvelo"
    assert runner._widgets["cluster_key"].value == "cell_type"
    assert runner.params()["cluster_key"] == "cell_type"
    # with no column under a usual name, the model's default stays (a batch is not guessed)
    other.obs = other.obs.rename(columns={"cell_type": "annotation"})
    state.set_data(other, name="untyped")
    runner.model_select.value = "deepvelo"
    assert runner._widgets["cluster_key"].value == Key.obs.CLUSTERS


def _result_of(adata, model: str, latent_time: np.ndarray | None, **parts: Any) -> Any:
    """A ``model`` fit of ``adata`` with unit velocities, no per-gene columns and ``parts``."""
    from explorer.models.base import VelocityResult

    return VelocityResult(
        model=model,
        params={},
        obs_names=adata.obs_names,
        var_names=adata.var_names,
        velocity=np.ones(adata.shape, dtype=np.float32),
        gene_params=pd.DataFrame(index=adata.var_names),
        velocity_genes=np.ones(adata.n_vars, dtype=bool),
        latent_time=latent_time,
        **parts,
    )


@contextlib.contextmanager
def _page_with_fit(adata, tmp_path, result) -> Any:
    """A rendered page of ``adata`` with ``result`` added as the active fit ``velovae``: (state, views)."""
    from explorer.app.jobs import Fit

    doc = Document()
    with set_curdoc(doc):
        page = create_app(adata, data_dir=tmp_path)
        page.server_doc(doc)
        page.app.state._add_fit(Fit(label="velovae", key=("velovae", ()), result=result))
        yield page.app.state, page.app.views


def test_time_views_hide_while_the_active_fit_has_no_latent_time(app_adata, tmp_path):
    """The three time plots join the page with a fit that has a latent time and hide for one without.

    DeepVelo (per-cell rates, no latent time) made active after VeloVAE left three empty
    axes under the note that there is no latent time; now they hide, and come back with
    the timed fit.
    """
    from explorer.app.jobs import Fit

    def result(model: str, latent_time: np.ndarray | None) -> Any:
        return _result_of(app_adata, model, latent_time)

    doc = Document()
    with set_curdoc(doc):
        page = create_app(app_adata.copy(), data_dir=tmp_path)
        page.server_doc(doc)
        state, view = page.app.state, page.app.views["time"]
        assert not view.slot.objects and not view.slot.visible  # no latent time anywhere yet
        t = np.linspace(0, 1, app_adata.n_obs, dtype=np.float32)
        state._add_fit(Fit(label="velovae", key=("velovae", ()), result=result("velovae", t)))
        assert view.slot.objects and view.slot.visible
        state._add_fit(Fit(label="deepvelo", key=("deepvelo", ()), result=result("deepvelo", None)))
        assert state.model == "deepvelo" and state.latent_time() is None
        assert not view.slot.visible
        assert "The active fit has no latent time; **velovae** has one" in view._note()
        state.model = "velovae"
        assert view.slot.visible


def test_hiding_the_sidebar_keeps_it_and_the_header_shows_a_hidden_runs_progress(app_adata, tmp_path):
    """Hide sidebar (for a laptop screen) hides the runner, not its run: the header says how far it is."""
    doc = Document()
    with set_curdoc(doc):
        page = create_app(app_adata.copy(), data_dir=tmp_path)
        page.server_doc(doc)
        app, state = page.app, page.app.state
        runner = app.runner
        assert app.sidebar.visible and app.sidebar_toggle.label == "Hide sidebar"
        app.sidebar_toggle.clicks += 1
        assert not app.sidebar.visible and app.sidebar_toggle.label == "Show sidebar"
        state.param.update(running=True, progress=0.0)
        state.progress = 0.454
        assert app.sidebar_toggle.label == "Show sidebar (run 45%)"
        state.param.update(running=False, progress=1.0)
        assert app.sidebar_toggle.label == "Show sidebar"
        app.sidebar_toggle.clicks += 1
        assert app.sidebar.visible and app.sidebar_toggle.label == "Hide sidebar"
        assert app.runner is runner  # the same runner, not rebuilt


def test_time_views_draw_one_line_per_lineage_in_its_colour(timed_adata, tmp_path):
    """A VeloVAE-like fit with a cell state: each time plot draws each lineage's mean, per gene.

    By hand: the cells after t = 0.5 alternate between lineages A (state (5, 0)) and B
    (state (0, 5)), the earlier ones are root cells (state near A's); the fit predicts
    each cell's observed ``Ms`` / ``Mu``, halved in B. So A's line on the Ms plot is the
    mean ``Ms`` of A's and the root cells, B's half the mean of B's, bin by bin. B's name
    is markup, which the note shows as text.
    """
    import holoviews as hv
    from markdown_it import MarkdownIt

    from explorer.app import readouts

    adata = timed_adata.copy()
    t = adata.obs[Key.obs.LATENT_TIME].to_numpy()
    late = np.flatnonzero(t > 0.5)
    labels = np.array(["root"] * adata.n_obs, dtype=object)
    b = '<img src=x onerror="window.__pwned=11">*B*'
    labels[late[::2]], labels[late[1::2]] = "A", b
    adata.obs[Key.obs.CLUSTERS] = pd.Categorical(labels, categories=["A", b, "root"])
    adata.uns["clusters_colors"] = ["#aa0000", "#00aa00", "#0000aa"]  # A, B, root
    centre = {"root": [1.0, 0.0], "A": [5.0, 0.0], b: [0.0, 5.0]}
    state_c = np.array([centre[x] for x in labels]) + np.random.default_rng(0).normal(0, 0.1, (len(t), 2))
    ms, mu = (readouts._dense_layer(adata.layers[k]).astype(float) for k in (Key.layers.MS, Key.layers.MU))
    half = np.where(labels == b, 0.5, 1.0)[:, None]
    result = _result_of(
        adata,
        "velovae",
        t.astype(np.float32),
        layers={
            Key.layers.PREDICTED_S: (ms * half).astype(np.float32),
            Key.layers.PREDICTED_U: (mu * half).astype(np.float32),
        },
        obsm={Key.obsm.CELL_STATE: state_c},
    )
    with _page_with_fit(adata, tmp_path, result) as (state, views):
        assert state.model == "velovae"
        phase = views["phase"]
        for gene in (str(adata.var_names[3]), str(adata.var_names[7])):
            redrawn = phase.fits_revision
            state.gene = gene
            j = adata.var_names.get_loc(gene)
            # the phase portrait's lineage curves follow the gene in place, without a redraw
            assert phase.fits_revision == redrawn
            (curves,) = [f.lineages for f in state.phase_fits() if f.lineages]
            drawn = zip(phase._fits_live, phase._drawn_keys, strict=True)
            (live,) = [layer for layer, key in drawn if key[2] == "lineages"]
            for drawn_u, curve in zip(live.shown["ys"], curves, strict=True):
                np.testing.assert_allclose(drawn_u, curve.u)
            lines = {line.name: line for line in state.lineage_lines("Ms")}
            assert sorted(lines) == sorted(["A", b])
            mine = {"A": labels != b, b: labels == b}
            for name, line in lines.items():
                # by hand: the lineage's cells in time order, cut where two in a row are over
                # 1/20 of its span apart (or 3 span ln(n) / n), each stretch of 10 or more
                # cells in two bins or more of about 1/20 of the lineage's cells, 20 at least
                order = np.argsort(t[mine[name]], kind="stable")
                ts, predicted = t[mine[name]][order], (ms[:, j] * half[:, 0])[mine[name]][order]
                n, span = len(ts), ts[-1] - ts[0]
                cuts = np.flatnonzero(np.diff(ts) > max(span / 20, 3 * span * np.log(n) / n)) + 1
                size = max(20, -(-n // 20))
                expected = []
                for stretch in np.split(predicted, cuts):
                    if len(stretch) >= 10:
                        expected += ([np.nan] if expected else []) + [
                            part.mean() for part in np.array_split(stretch, max(2, len(stretch) // size))
                        ]
                np.testing.assert_allclose(line.value, expected, rtol=1e-5)
                assert np.all(np.diff(line.t[np.isfinite(line.t)]) > 0)  # in time order
            # in the browser: one line per lineage, in its type's colour, with this gene's values
            shown = views["time"].lines_live["Ms"].shown
            drawn = dict(zip(shown["color"], shown["ys"], strict=True))
            assert sorted(drawn) == ["#006600", "#660000"]  # darker than the dots: 0.6 of each channel
            np.testing.assert_allclose(drawn["#660000"], lines["A"].value, rtol=1e-5)
            np.testing.assert_allclose(drawn["#006600"], lines[b].value, rtol=1e-5)
            # no red line over all cells: where the lineages part it ran between them, through
            # none of their cells (the lines stand for the fit)
            for what in ("Ms", "Mu", "velocity"):
                assert state.time_curve(what) is None
                assert len(views["time"].curves_live[what].shown[what]) == 0
        # what the view sends is what a drawing of the lines holds
        lines = state.lineage_lines("Ms")
        source = hv.render(plots.lineage_lines(lines, labels=("latent time", "Ms"))).renderers[0].data_source
        assert set(source.data) == set(plots.lineage_line_columns(lines))
        # the PNG/SVG exports draw the lines too, in the page's colours
        from explorer.app.views.export import figure_layers

        for which, prefix in (("gene over time", ""), ("phase portrait", "velovae: ")):
            drawn = {x["label"]: x["color"] for x in figure_layers(state, which)[0] if x.get("label")}
            assert drawn[f"{prefix}lineage A"] == "#660000" and drawn[f"{prefix}lineage {b}"] == "#006600"
        assert plot_file(state, "gene over time", "png").startswith(b"\x89PNG")
        # the phase portrait's legend is as wide as the plot and its description wraps there
        # (five pancreas lineages widened a 1,600-pixel page to 1,818): only the swatch and
        # the fit's name are kept on one line
        legend = phase.__panel__().objects[-1]
        assert legend.width == phase.width
        assert legend.object.count("nowrap") == 1
        unbroken, rest = legend.object.split('white-space:nowrap">')[1].split(":</span>", 1)
        assert re.sub(r"<[^>]*>", "", unbroken) == "velovae" and "per-lineage curves" in rest
        note = SimpleNamespace(object=views["time"]._note())
        assert f"darker shade of each type's colour, each lineage: {b}, A" in shown_text(note)
        assert "<img" not in MarkdownIt("commonmark").render(note.object)
        # another model active (no cell state): the lines go, and come back with the fit
        state.run_model("steady_state").join(120)
        gone = views["time"].lines_live["Ms"].shown["xs"]  # empty lines only (see plots._padded)
        assert state.model == "steady_state" and not any(np.isfinite(x).any() for x in gone)
        assert len(views["time"].curves_live["Ms"].shown["Ms"]) > 0  # its red line is back
        state.model = "velovae"
        assert len(views["time"].lines_live["Ms"].shown["xs"]) == 2


def test_lineage_lines_keep_their_colours_when_the_time_views_were_drawn_without_lines(timed_adata, tmp_path):
    """Data without cell types: a fit without lineages draws the time views first, then VeloVAE's.

    Found on the raw dentate gyrus (no cell types) in chromium: after the dynamical model
    (a red line, no lineage lines) VeloVAE's three lineage lines were drawn grey, under a
    note naming them in colour. HoloViews maps a line's colour by what it is first drawn
    with: no lines gave a numeric colour map, which drew the colours sent later in grey
    (one line would have given every later line its colour); now it is drawn with two lines
    at least, empty ones making up the number. By hand: the late cells lie
    in three states far apart, a fourth handful (1% of the cells) in another; k-means'
    lineages without types are numbered from 1 as shown, the handful's dropped.
    """
    from explorer.app import readouts
    from explorer.app.jobs import Fit

    adata = timed_adata.copy()
    while (column := readouts.cluster_column(adata)) is not None:
        del adata.obs[column]
    t = adata.obs[Key.obs.LATENT_TIME].to_numpy()
    late = np.flatnonzero(t > 0.5)
    groups = np.zeros(adata.n_obs, dtype=np.int64)  # 0: the earlier cells
    groups[late] = 1 + np.arange(len(late)) % 3
    groups[late[: max(2, adata.n_obs // 100)]] = 4  # a handful, under MIN_LINEAGE_SHARE
    centre = np.array([[1.0, 0.0], [8.0, 0.0], [0.0, 8.0], [-8.0, 0.0], [0.0, -30.0]])
    state_c = centre[groups] + np.random.default_rng(0).normal(0, 0.1, (adata.n_obs, 2))
    ms, mu = (
        readouts._dense_layer(adata.layers[k]).astype(np.float32) for k in (Key.layers.MS, Key.layers.MU)
    )
    velovae = _result_of(
        adata,
        "velovae",
        t.astype(np.float32),
        layers={Key.layers.PREDICTED_S: ms, Key.layers.PREDICTED_U: mu},
        obsm={Key.obsm.CELL_STATE: state_c},
    )
    dynamical = _result_of(adata, "dynamical", t.astype(np.float32))
    doc = Document()
    with set_curdoc(doc):
        page = create_app(adata, data_dir=tmp_path)
        page.server_doc(doc)
        state, view = page.app.state, page.app.views["time"]
        state._add_fit(Fit(label="dynamical", key=("dynamical", ()), result=dynamical))
        # drawn without lines (two empty ones, each in its own colour)
        drawn = view.lines_live["Ms"].shown
        assert all(np.isnan(x).all() for x in drawn["xs"]) and len(set(drawn["color"])) == len(drawn["xs"])
        state._add_fit(Fit(label="velovae", key=("velovae", ()), result=velovae))
        lines = state.lineage_lines("Ms")
        names = [line.name for line in lines]
        assert 3 <= len(names) and names == [f"lineage {i + 1}" for i in range(len(names))]
        live = view.lines_live["Ms"]
        assert live.shown["color"] == [plots.line_color(line.color) for line in lines]
        assert len(set(live.shown["color"])) == len(lines)
        for drawn in live.plots:
            renderer = drawn.handles["glyph_renderer"]
            for glyph in (renderer.glyph, renderer.nonselection_glyph, renderer.muted_glyph):
                assert glyph.line_color.field == "color"  # each line its own colour, not mapped
                assert glyph.line_color.transform is Unspecified
        # the notes do not speak of cell types the data has not (they said "each type's colour")
        note = shown_text(SimpleNamespace(object=view._note()))
        assert "Lines in each lineage's colour (lineages found in the fit's cell state): lineage 1" in note
        legend = page.app.views["phase"].__panel__().objects[-1].object
        assert "per-lineage curves along latent time (each lineage's colour)" in legend
        assert "type" not in note + legend
    # one line drawn first (and an empty one): the lines sent later keep their colours too
    one = hv.render(plots.lineage_lines(lines[:1], labels=("latent time", "Ms"))).renderers[0]
    assert one.data_source.data["color"][0] == plots.line_color(lines[0].color)
    assert np.isnan(one.data_source.data["xs"][1]).all()
    assert one.glyph.line_color.field == "color" and one.glyph.line_color.transform is Unspecified


def test_the_time_views_redraw_whatever_number_of_lines_was_sent_to_them(timed_adata, tmp_path):
    """A colouring changed after the lineage lines changed in number: the plots redraw, no error.

    Found on 50 dentate gyrus cells (one lineage): HoloViews redrew a time view for the new
    colouring from the lines it had drawn (kept, one and an empty one) against the lines
    sent to the drawing since (one), and failed ("failed to validate MultiLine.line_color").
    The lines are now drawn afresh with every redraw and sent with the drawing's padding.
    """
    from explorer.app import readouts
    from explorer.app.jobs import Fit

    adata = timed_adata.copy()
    while (column := readouts.cluster_column(adata)) is not None:
        del adata.obs[column]
    t = adata.obs[Key.obs.LATENT_TIME].to_numpy()
    ms, mu = (
        readouts._dense_layer(adata.layers[k]).astype(np.float32) for k in (Key.layers.MS, Key.layers.MU)
    )

    def velovae(n_states: int) -> Any:
        """A VeloVAE-like fit whose late cells lie in ``n_states`` states far apart."""
        groups = np.where(t > 0.5, 1 + np.arange(adata.n_obs) % n_states, 0)
        centre = np.array([[0.0, 0.0], [9.0, 0.0], [0.0, 9.0], [-9.0, 0.0]])
        return _result_of(
            adata,
            "velovae",
            t.astype(np.float32),
            layers={Key.layers.PREDICTED_S: ms, Key.layers.PREDICTED_U: mu},
            obsm={Key.obsm.CELL_STATE: centre[groups]},  # one point a state: k-means finds each once
        )

    doc = Document()
    with set_curdoc(doc):
        page = create_app(adata, data_dir=tmp_path)
        page.server_doc(doc)
        state, view = page.app.state, page.app.views["time"]
        state._add_fit(Fit(label="one", key=("one", ()), result=velovae(1)))
        assert len(state.lineage_lines("Ms")) == 1
        for label, n in (("three", 3), ("one again", 1)):
            state.color_by = COLOR_VELOCITY  # a redraw of every cell plot
            state._add_fit(Fit(label=label, key=(label, ()), result=velovae(n)))
            assert len(state.lineage_lines("Ms")) == n
            state.color_by = COLOR_EXPRESSION
            state.select_gene(str(adata.var_names[5 + n]))
            state.color_by = COLOR_VELOCITY
            drawn = view.lines_live["Ms"].shown
            assert sum(np.isfinite(x).any() for x in drawn["xs"]) == n
            assert len(drawn["xs"]) == len(drawn["color"]) == max(n, 2)


def test_time_views_draw_a_line_per_cell_type_for_a_fit_without_lineages(timed_adata, tmp_path):
    """A fit without a cell state: each cell type gets its own line where the types overlap in time.

    By hand: after t = 0.5 the cells alternate between types A and B; the fit predicts the
    observed ``Ms`` / ``Mu`` of A's and the root cells and 0 for B's. The mean over all cells
    at a late time is about half of A's: a line through neither type (the dynamical model on
    the pancreas: Gcg's mean over all cells peaked at 187 among Alpha cells that reach 400).
    Each type's line keeps to its cells: B's at 0, A's at its cells' mean.
    """
    from explorer.app import readouts
    from explorer.app.views.export import figure_layers

    adata = timed_adata.copy()
    t = adata.obs[Key.obs.LATENT_TIME].to_numpy()
    late = np.flatnonzero(t > 0.5)
    labels = np.array(["root"] * adata.n_obs, dtype=object)
    labels[late[::2]], labels[late[1::2]] = "A", "B"
    adata.obs[Key.obs.CLUSTERS] = pd.Categorical(labels, categories=["A", "B", "root"])
    adata.uns["clusters_colors"] = ["#aa0000", "#00aa00", "#0000aa"]
    ms, mu = (readouts._dense_layer(adata.layers[k]).astype(float) for k in (Key.layers.MS, Key.layers.MU))
    keep = np.where(labels == "B", 0.0, 1.0)[:, None]
    predicted = {Key.layers.PREDICTED_S: ms * keep, Key.layers.PREDICTED_U: mu * keep}
    layers = {key: value.astype(np.float32) for key, value in predicted.items()}
    result = _result_of(adata, "velovae", t.astype(np.float32), layers=layers)  # no cell state
    j = int(np.argmax(ms[labels == "A"].mean(0) - ms[labels == "root"].mean(0)))  # a gene A turns on
    with _page_with_fit(adata, tmp_path, result) as (state, views):
        state.gene = str(adata.var_names[j])
        assert state.lineages() is None
        lines = {line.name: line for line in state.lineage_lines("Ms")}
        assert sorted(lines) == ["A", "B", "root"] and {x.kind for x in lines.values()} == {"type"}
        np.testing.assert_allclose(lines["B"].value[np.isfinite(lines["B"].value)], 0.0)
        a_cells = ms[labels == "A", j]
        assert np.nanmean(lines["A"].value) == pytest.approx(a_cells.mean(), rel=0.05)
        # what the red line over all cells was where both types are: about half of A's line,
        # or broken (no cell near that mean): nothing to see of A's cells' fit
        x, y, _ = readouts.time_curve(t, None, ms[:, j] * keep[:, 0])
        finite = np.isfinite(lines["A"].value)
        a_line = np.interp(x, lines["A"].t[finite], lines["A"].value[finite])
        both = (x > t[late].min() + 0.05) & (a_line > 0.2 * a_cells.max())
        assert both.sum() >= 3
        halfway = (y[both] < 0.75 * a_line[both]) & (y[both] > 0.25 * a_line[both])
        assert np.all(np.isnan(y[both]) | halfway)
        # drawn: a line per type in its darker shade, and no red line over all cells
        shown = views["time"].lines_live["Ms"].shown
        assert sorted(shown["color"]) == ["#000066", "#006600", "#660000"]
        for what in ("Ms", "Mu", "velocity"):
            assert state.time_curve(what) is None
            assert len(views["time"].curves_live[what].shown[what]) == 0
        note = SimpleNamespace(object=views["time"]._note())
        assert "within each cell type" in shown_text(note)
        drawn = {x["label"] for x in figure_layers(state, "gene over time")[0] if x.get("label")}
        assert {"type A", "type B", "type root"} <= drawn


def test_comparison_view_selects_a_gene_from_the_quality_plot(app):
    state, views = app.state, app.views
    state.run_model("steady_state").join(120)
    state.run_model("stochastic").join(120)
    compare = views["compare"]
    quality = state.compare_quality()
    target = quality.iloc[3]
    compare._quality_tapped(x=float(target["a"]), y=float(target["b"]))
    assert state.gene == target["gene"]
    frame = compare.quality[()]
    assert len(frame.get(0)) == len(quality)
    agreement = compare.agreement._coloring()
    assert agreement.kind == "continuous"


def test_exports(app, tmp_path):
    state, export = app.state, app.views["export"]
    state.run_model("stochastic").join(120)
    state.select_cell(5)
    state.select_cells(np.arange(10))
    for which in ("embedding", "phase portrait", "gene over time"):
        assert plot_file(state, which, "png").startswith(b"\x89PNG")
        assert b"<svg" in plot_file(state, which, "svg")[:400]
    csv = export._csv().getvalue()
    assert csv.splitlines()[0].startswith("gene,mean Ms,mean Mu")
    assert len(pd.read_csv(export._csv())) == state.adata.n_vars
    export.filename.value = "results.h5ad"
    path = export.save()
    assert path == (tmp_path / "results.h5ad").resolve()
    export.filename.value = "../outside.h5ad"
    assert export.save() is None
    assert "Not saved" in shown_text(export.message)
    assert not (tmp_path.parent / "outside.h5ad").exists()


def test_saving_over_a_file_asks_first_and_errors_show_under_the_button(app, tmp_path, monkeypatch):
    import anndata as ad

    state, export = app.state, app.views["export"]
    state.run_model("stochastic").join(120)
    other = tmp_path / "other.h5ad"
    other.write_bytes(b"another dataset")
    export.filename.value = "other.h5ad"
    assert export.save() is None
    assert other.read_bytes() == b"another dataset"
    assert "exists already" in shown_text(export.message) and "Overwrite" in shown_text(export.message)
    assert export.overwrite_button.visible
    # another name: the confirmation no longer applies
    export.filename.value = "elsewhere.h5ad"
    assert not export.overwrite_button.visible
    export.filename.value = "other.h5ad"
    export._overwrite()  # a stale click does nothing until the name is refused again
    assert other.read_bytes() == b"another dataset"
    export.save()
    export._overwrite()
    assert ad.read_h5ad(other).n_obs == state.adata.n_obs
    assert shown_text(export.message).startswith("Saved other.h5ad")
    assert not export.overwrite_button.visible

    # each failure replaces the message under the button; none escapes as an exception
    (tmp_path / "folder.h5ad").mkdir()
    cases = {"folder.h5ad": "is a folder", "y" * 296 + ".h5ad": "301 characters long"}
    for name, words in cases.items():
        export.filename.value = name
        assert export.save() is None
        assert words in shown_text(export.message)
        assert export.message.alert_type == "danger"

    def denied(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("explorer.app.files.tempfile.mkstemp", denied)
    export.filename.value = "new.h5ad"
    assert export.save() is None
    assert "could not write 'new.h5ad' in the data directory: Permission denied" in shown_text(export.message)
    monkeypatch.undo()

    def broken():
        raise RuntimeError("h5py could not encode a column")

    monkeypatch.setattr(state, "results_adata", broken)
    assert export.save() is None
    assert "RuntimeError: h5py could not encode a column" in shown_text(export.message)
    assert not (tmp_path / "new.h5ad").exists()


def test_two_sessions_are_independent(timed_adata, tmp_path):
    pages = []
    for _ in range(2):
        doc = Document()
        with set_curdoc(doc):
            page = create_app(timed_adata, data_dir=tmp_path)
            page.server_doc(doc)
        pages.append(page.app)
    one, two = pages
    one.state.select_cell(3)
    one.state.select_gene(str(timed_adata.var_names[4]))
    assert two.state.cell is None
    assert _shown(two.views["embedding"].scatter.marker_live).shape[0] == 0
    assert _shown(one.views["embedding"].scatter.marker_live).shape[0] == 1
    assert two.state.gene != one.state.gene


def test_many_cells_are_rasterised_with_fixed_category_colours():
    rng = np.random.default_rng(0)
    n = 60_000
    x, y = rng.normal(size=n), rng.normal(size=n)
    codes = (x > 0).astype(np.int8)
    key = {"left": "#ff0000", "right": "#0000ff"}
    img = plots.rasterize(
        x, y, Coloring("category", codes, "side", ("left", "right"), key), width=100, height=80
    )
    rgba = np.stack([img.dimension_values(d, flat=False) for d in img.vdims], axis=-1)
    assert rgba.shape == (80, 100, 4)
    left, right = rgba[:, :40], rgba[:, 60:]
    # every drawn pixel on each side has that side's colour
    assert (left[left[..., 3] > 0][:, 0] > 200).all()
    assert (left[left[..., 3] > 0][:, 2] < 50).all()
    assert (right[right[..., 3] > 0][:, 2] > 200).all()
    assert (right[right[..., 3] > 0][:, 0] < 50).all()


def test_many_cells_are_drawn_as_images_that_follow_clicks(tmp_path):
    from tests.app.conftest import make_app_adata

    adata = make_app_adata(n_obs=plots.DATASHADE_THRESHOLD + 5_000, n_vars=12, n_neighbors=5)
    t = adata.obs[Key.obs.TRUE_T].to_numpy()
    adata.obs[Key.obs.LATENT_TIME] = t / t.max()
    doc = Document()
    with set_curdoc(doc):
        page = create_app(adata, data_dir=tmp_path)
        page.server_doc(doc)
    state, views = page.app.state, page.app.views
    assert views["embedding"].scatter.datashade
    assert _frame(views["embedding"].scatter.base).__class__.__name__ == "RGB"
    time_ms = views["time"].scatters["Ms"]
    before = time_ms.base_live.shown["image"][0].copy()
    with set_curdoc(doc):
        state.select_gene(str(adata.var_names[5]))
        state.select_cell(123)
    after = time_ms.base_live.shown
    assert not np.array_equal(after["image"][0], before)  # a new image for the new gene
    ms = state.gene_values("Ms")
    assert after["y"][0] <= np.nanmin(ms)  # the image spans all of the new gene's values
    assert after["y"][0] + after["dh"][0] >= np.nanmax(ms)
    np.testing.assert_allclose(_shown(time_ms.marker_live), [[state.latent_time()[123], ms[123]]], rtol=1e-6)
    # the images' y axes keep their width from gene to gene too (tick labels along the axis)
    for scatter in (views["phase"].scatter, time_ms):
        assert scatter.base_live.plots[-1].state.left[0].major_label_orientation == pytest.approx(np.pi / 2)


def test_gene_table_orders_by_trust_and_marks_the_selected_gene(app):
    state, genes = app.state, app.views["genes"]
    state.run_model("steady_state").join(120)
    table = genes.table.value
    assert "likelihood" not in table  # a steady-state fit: R², no likelihood column
    # best first: the trust light, then R², genes without a fit last
    trust = table["trust"].to_numpy()
    finite = trust[np.isfinite(trust)]
    assert (np.diff(finite) <= 0).all()
    assert np.isnan(trust[len(finite) :]).all()
    assert table.index.tolist() == list(range(len(table)))  # sorted in Python: rows are positions
    r2 = state.fit.result.gene_params[Key.var.R2]
    expected = (r2 >= 0.01).where(r2.notna()).astype(float)
    np.testing.assert_allclose(table.set_index("gene").loc[r2.index, "trust"], expected)
    assert genes.table.formatters["trust"]["type"] == "traffic"
    assert "R² ≥ 0.01" in genes.legend.object
    assert genes.table.header_tooltips["trust"].startswith("share of the fit checks")
    # the selected gene's row is marked and its page shown, wherever it sorts
    last = str(table["gene"].iloc[-1])
    state.select_gene(last)
    assert genes.table.value.loc[genes.table.selection[0], "gene"] == last
    assert genes.table.page == (len(table) - 1) // genes.table.page_size + 1
    genes._clicked(SimpleNamespace(row=0, column="gene"))
    assert state.gene == str(table["gene"].iloc[0])
    # the selected gene's verdict above the table; the notes and technical columns stay in the data
    assert f"{state.gene}</b>: passes every check" in genes.verdict.object
    failing = table.loc[table["trust"] == 0, "gene"]
    if len(failing):
        state.select_gene(str(failing.iloc[0]))
        assert "fails: low R²" in genes.verdict.object
    assert set(genes.table.hidden_columns) == {"mean Mu", "scaling", "trust notes"}
    assert "trust notes" in genes.table.value
    # once the trust diagnostics ran, a flagged gene fails their check: until 2026-12-05 its
    # light stayed green and its verdict said "passes every check" beside its flag
    genes.diagnose_button.clicks += 1
    assert state.job.join(120), state.error
    assert "diagnostics: not flagged" in genes.legend.object
    after = genes.table.value.set_index("gene")
    flagged = after.index[after["flag"] != ""]
    assert len(flagged) > 0
    one = str(flagged[0])
    state.select_gene(one)
    assert f"{one}</b>: fails: " in genes.verdict.object and "flagged: " in genes.verdict.object
    r2_ok = (r2 >= 0.01).where(r2.notna()).astype(float)
    expected = (r2_ok + (after.loc[r2.index, "flag"] == "")) / 2
    np.testing.assert_allclose(after.loc[r2.index, "trust"], expected)


def test_time_plots_and_next_cells_table_join_the_page_once_they_have_something_to_show(app_adata, tmp_path):
    """Empty plots and tables are left out of an opening page; they appear when there is data."""
    doc = Document()
    with set_curdoc(doc):
        page = create_app(app_adata.copy(), data_dir=tmp_path)  # a latent time is added below
        page.server_doc(doc)
        app = page.app

        def count(kind: str) -> int:
            return sum(type(m).__name__ == kind for m in doc.models)

        assert app.state.latent_time() is None
        assert count("figure") == 2  # the embedding and the phase portrait, not three empty time plots
        tables = count("DataTabulator")
        app.state.select_cell(3)
        # no fit, so no transitions: the next-cells table would stay empty and stays out
        assert "no transition matrix" in app.views["inspector"].summary.object
        assert count("DataTabulator") == tables
        app.state.run_model("stochastic").join(120)
        app.state.select_cell(4)
        assert count("DataTabulator") == tables + 1  # the selected cell's likely next cells
        assert len(app.views["inspector"].targets.value) == app.state.n_targets
        app.state.adata.obs[Key.obs.LATENT_TIME] = np.linspace(0, 1, app.state.adata.n_obs)
        app.state.param.trigger("adata")
        assert count("figure") == 5
        time_ms = app.views["time"].scatters["Ms"]
        np.testing.assert_allclose(_frame(time_ms.base).dimension_values(0), app.state.latent_time())


def test_the_table_light_and_the_verdict_agree_for_a_partial_score():
    """A gene that passes 5 of 6 checks is amber in the table and in the line above it.

    Tabulator's "traffic" formatter (Tabulator 6: ``index = floor(percent / (100 / n_colors))``)
    drew a score of 0.83 green while the verdict said amber; the table now shows the light.
    """
    from explorer.app import readouts
    from explorer.app.views.genes import _TRUST_FORMAT, GeneBrowser

    table = pd.DataFrame(
        {
            "gene": ["all", "five of six", "one of six", "none", "unfitted"],
            readouts.TRUST: [1.0, 5 / 6, 1 / 6, 0.0, np.nan],
            readouts.TRUST_NOTES: ["", "weakly detected", "a; b; c; d; e", "a", ""],
            "likelihood": [0.3, 0.9, 0.8, 0.7, np.nan],
        }
    )
    shown = GeneBrowser._ordered(table)
    assert shown["gene"].tolist() == ["all", "five of six", "one of six", "none", "unfitted"]  # sorted by score
    colors = _TRUST_FORMAT["color"]

    def tabulator_color(value: float) -> str:  # Tabulator's traffic formatter, min 0, max 1
        percent = round(min(max(value, 0.0), 1.0) * 100)
        return colors[max(0, min(len(colors) - 1, int(percent // (100 / len(colors)))))]

    expected = [colors[2], colors[1], colors[1], colors[0]]
    assert [tabulator_color(v) for v in shown[readouts.TRUST][:4]] == expected
    for i in range(4):
        verdict = GeneBrowser._verdict(None, shown.loc[i])
        assert f"color:{expected[i]}" in verdict
    assert GeneBrowser._verdict(None, shown.loc[4]) == ""
    assert "fails: weakly detected" in GeneBrowser._verdict(None, shown.loc[1])


def test_a_gene_that_never_switches_off_shows_none_not_infinity():
    """VeloVAE's induced genes have switch time ``inf``: the table shows "none" (the CSV keeps inf).

    Bokeh sends ``inf`` as it is and its number formatter wrote "Infinity"; the shown table
    holds NaN there and the column's formatter writes NaN as "none". The frame it was
    given (the CSV's) keeps ``inf``.
    """
    from explorer.app.views.genes import _SWITCH, GeneBrowser

    table = pd.DataFrame({"gene": ["a", "b", "c"], "likelihood": [0.3, 0.2, 0.1], _SWITCH: [4.5, np.inf, np.nan]})
    shown = GeneBrowser._ordered(table)
    assert shown["gene"].tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(shown[_SWITCH].to_numpy(), [4.5, np.nan, np.nan])
    assert np.isinf(table[_SWITCH].to_numpy()[1])  # the input frame is not changed
    formats = GeneBrowser._formatters(shown)
    assert formats[_SWITCH].nan_format == "none"
    assert formats["likelihood"].nan_format != "none"


def test_axis_range_pads_by_its_share_and_widens_a_single_value():
    """``_padded``: ``share`` of the span on each side (none with 0, as the datashaded phase
    portrait asks when it joins the image's range with its lines); half a unit around one value."""
    from explorer.app.views._layers import _padded

    assert _padded(np.array([0.0, 2.0, np.nan]), 0.0) == (0.0, 2.0)
    assert _padded(np.array([0.0, 2.0])) == pytest.approx((-0.1, 2.1))
    assert _padded(np.array([1.0, 1.0]), 0.0) == (0.5, 1.5)


def test_with_no_macrostate_stable_enough_the_inspector_offers_them_all_to_tick(shared_data, tmp_path):
    """CellRank's 200-cell dentate gyrus: no macrostate reaches 0.96, so the user ticks the terminal states.

    Fitted by the stochastic model, the five macrostates' coarse self-transitions are all under
    CellRank's 0.96, and until 2026-12-05 the app could only say so (the message named
    `explorer fates --terminal-states`, which the app had no place for). Now the inspector
    lists every macrostate with its self-transition; ticking the two end types of the
    dentate gyrus (granule cells mature, astrocytes) gives their fates, ordered along the
    granule lineage: mature granule cells 0.97, immature 0.91, neuroblasts 0.65.
    """
    from explorer.app.fits import load_dataset

    adata = load_dataset(shared_data / "cellrank_tests" / "adata_200.h5ad")
    doc = Document()
    with set_curdoc(doc):
        page = create_app(adata, data_dir=tmp_path)
        page.server_doc(doc)
        state, inspector = page.app.state, page.app.views["inspector"]
        assert not inspector.terminal.visible  # nothing to choose from before Compute fates
        assert state.run_model("stochastic").join(300), state.error
        inspector.fates_button.clicks += 1
        state.job.join(120)
        choices = dict(state.terminal_choices())
        assert "No macrostate is stable enough to be terminal" in state.error
        assert all(f"{name} {value:.3f}" in state.error for name, value in choices.items())
        # 6 asked for (the cells hold them); 6 would split a complex pair of eigenvalues, so 5
        assert (state.fate_states, len(choices)) == (6, 5) and max(choices.values()) < 0.96  # noqa: PLR2004
        assert state.notices == ["6 macrostates would split a pair of complex-conjugate eigenvalues; using 5"]
        assert inspector.terminal.visible and "tick where cells end" in shown_text(inspector.terminal_note)
        assert inspector.terminal.options == {f"{n} ({v:.3f})": n for n, v in choices.items()}
        assert inspector.terminal.value == []
        inspector.terminal.value = ["Granule mature", "Astrocytes"]  # the boxes ticked
        assert state.fate_terminal == ["Granule mature", "Astrocytes"]
        inspector.fates_button.clicks += 1
        assert state.job.join(120) and state.error == "", state.error
        fates = state.active_fates()
        assert fates.chosen and set(fates.names) == {"Granule mature", "Astrocytes"}
        mature = pd.Series(fates.probabilities[:, fates.names.index("Granule mature")])
        by_type = mature.groupby(state.adata.obs["clusters"].to_numpy()).mean()
        # along the granule lineage (the types of 20 cells or more), nearer maturity is likelier
        assert by_type["Granule mature"] > by_type["Granule immature"] > by_type["Neuroblast"], by_type
        state.select_cell(int(np.flatnonzero(state.adata.obs["clusters"] == "Neuroblast")[0]))
        assert "fate probabilities (computed for stochastic): Granule mature" in shown_text(inspector.where)
        assert sorted(inspector.terminal.value) == ["Astrocytes", "Granule mature"]
        legend = page.app.views["embedding"].legend
        assert "Astrocytes" in legend.object and "Endothelial" not in legend.object
        # one more ticked, the cells already coloured by terminal states: the legend follows
        inspector.terminal.value = [*inspector.terminal.value, "Endothelial"]
        inspector.fates_button.clicks += 1
        assert state.job.join(120) and state.error == "", state.error
        assert set(state.active_fates().names) == {"Granule mature", "Astrocytes", "Endothelial"}
        assert "Endothelial" in legend.object


def test_a_deepvelo_fit_opens_on_its_best_followed_gene_and_lists_it_first(shared_data, tmp_path):
    """DeepVelo's per-gene figure ranks the genes: the page opens on a fitted gene, not the file's first.

    Until 2026-12-05 DeepVelo gave no per-gene goodness of fit, so a file holding its fit
    opened on the data's first gene (on the 3,696-cell pancreas Prkacb, which it had not
    fitted: an empty phase portrait) and the gene table listed the genes in file order.
    Now ``fit_displacement_r`` (how a gene's velocity follows its training target) ranks
    them: on the 3,696 cells Ins2 (0.94) comes first, then Clu, Nnat, Chga, Gcg and Ghrl.
    """
    from explorer.app.views.genes import GeneBrowser
    from explorer.data.io import read
    from explorer.models.gcn import DeepVelo
    from explorer.pipeline import prepare

    adata = read(shared_data / "pancreas_veloviz_739.h5ad")
    prepare(adata, seed=0)
    result = DeepVelo(seed=0).fit(adata)
    result.to_adata(adata)
    r = adata.var[Key.var.FIT_DISPLACEMENT_R].where(adata.var[Key.var.VELOCITY_GENES].astype(bool))
    best = r.idxmax()
    assert r[best] > 0.8 and not adata.var[Key.var.VELOCITY_GENES][adata.var_names[0]]  # noqa: PLR2004
    doc = Document()
    with set_curdoc(doc):
        page = create_app(adata, data_dir=tmp_path)
        page.server_doc(doc)
        state = page.app.state
        assert state.gene == best
        table = GeneBrowser._ordered(state.gene_table())
        assert table["gene"].iloc[0] == best
        assert "displacement r" in table and "fit quality" not in table  # one column for the figure
        shown = table["displacement r"].dropna().to_numpy()
        assert (np.diff(shown) <= 0).all()  # best first
