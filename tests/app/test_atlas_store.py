"""The app opens an AnnData ``.zarr`` store (``explorer serve atlas.zarr``) with its layers left on disk.

``explorer.data.io.read_zarr_lazy`` reads obs, var, obsm, obsp and uns and leaves every
layer as a Dask array over the store's chunks, so a gene's column is read when the gene
is shown. The browser test is Debian's chromium through playwright, on the harness of
``tests/app/conftest.py``.
"""

from __future__ import annotations

import time

import dask.array as da
import numpy as np
import pytest
import zarr

from explorer.app.files import list_datasets
from explorer.app.fits import fit_from_adata, load_dataset
from explorer.app.readouts import dense_column
from explorer.data import io
from explorer.keys import Key
from explorer.models.steady_state import SteadyState
from tests.app.conftest import ARTIFACTS, BROWSER_ARGS, BROWSER_MARKS, CHROMIUM, running_server

pytestmark = pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")

STORE = "atlas.zarr"


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory, app_adata):
    """The app's small dataset written as a chunked AnnData .zarr store (a folder)."""
    folder = tmp_path_factory.mktemp("atlas_data")
    adata = app_adata.copy()
    t = adata.obs[Key.obs.TRUE_T].to_numpy()
    adata.obs[Key.obs.LATENT_TIME] = (t - t.min()) / (t.max() - t.min())
    adata.write_zarr(folder / STORE)
    layers = zarr.open_group(str(folder / STORE / "layers"), mode="r+")
    for key in (Key.layers.MS, Key.layers.MU):  # chunked by blocks of 100 cells x 4 genes
        values = np.asarray(adata.layers[key])
        arr = layers.create_array(key, shape=values.shape, chunks=(100, 4), dtype=values.dtype, overwrite=True)
        arr[:] = values
        arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    zarr.consolidate_metadata(str(folder / STORE))  # anndata reads the consolidated metadata
    return folder


def test_a_zarr_store_opens_with_its_layers_on_disk(atlas_dir, app_adata):
    assert list_datasets(atlas_dir) == [STORE]
    adata = load_dataset(atlas_dir / STORE)
    assert adata.shape == app_adata.shape
    for key in (Key.layers.MS, Key.layers.MU, Key.layers.SPLICED):
        assert isinstance(adata.layers[key], da.Array), key  # nothing read yet
    ms = adata.layers[Key.layers.MS]
    assert ms.chunksize == (100, 4)
    # one gene's column, as the phase portrait reads it: the stored values
    np.testing.assert_array_equal(dense_column(ms, 7), app_adata.layers[Key.layers.MS][:, 7])
    np.testing.assert_array_equal(adata.obsm[Key.obsm.UMAP], app_adata.obsm[Key.obsm.UMAP])


def test_a_fit_in_a_store_is_read_per_gene(app_adata, tmp_path):
    """The app's fit from a store keeps velocity and fit_t on disk; a gene's column is the stored one."""
    fitted = app_adata.copy()
    result = SteadyState().fit(fitted)
    result.to_adata(fitted)
    fitted.layers[Key.layers.FIT_T] = np.tile(fitted.obs[Key.obs.TRUE_T].to_numpy(np.float32)[:, None], (1, fitted.n_vars))
    fitted.write_zarr(tmp_path / STORE)
    fit = fit_from_adata(load_dataset(tmp_path / STORE))
    for arr in (fit.result.velocity, fit.result.layers[Key.layers.FIT_T]):
        assert isinstance(arr, da.Array)  # not read when the fit is taken
    j = int(np.flatnonzero(result.velocity_genes)[0])
    np.testing.assert_array_equal(dense_column(fit.result.velocity, j), result.velocity[:, j].astype(np.float32))
    np.testing.assert_array_equal(dense_column(fit.result.layers[Key.layers.FIT_T], j), fitted.layers[Key.layers.FIT_T][:, j])


def test_a_gene_column_is_read_straight_from_the_store(atlas_dir, app_adata, monkeypatch):
    """A layer the app opened is read through zarr (no Dask task), and gives Dask's values."""
    adata = load_dataset(atlas_dir / STORE)
    ms = adata.layers[Key.layers.MS]
    expected = app_adata.layers[Key.layers.MS][:, 5]

    def no_dask(*_, **__):
        msg = "read through Dask"
        raise AssertionError(msg)

    with monkeypatch.context() as patch:
        patch.setattr(da.Array, "__array__", no_dask)
        patch.setattr(da.Array, "compute", no_dask)
        column = io.read_column(ms, 5)
    np.testing.assert_array_equal(column, expected)
    assert column.dtype == ms.dtype
    np.testing.assert_array_equal(column, np.asarray(ms[:, 5]))
    # an array derived from the layer (a subset of cells) is not the store's: read through Dask
    np.testing.assert_array_equal(io.read_column(ms[10:50], 5), expected[10:50])
    # the note of the zarr array goes with the layer
    key = id(ms)
    assert key in io._ZARR_BEHIND
    del adata, ms
    import gc

    gc.collect()
    assert key not in io._ZARR_BEHIND


@pytest.mark.e2e
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/setup installs it)")
@pytest.mark.parametrize("n_categories", [1, 2, 3, 4, 5, 6])
def test_an_atlas_image_is_datashaders_for_any_number_of_clusters(n_categories):
    """Above the datashader threshold the cells are images: plots.shade_filled gives tf.shade's, bit for bit.

    Its empty-pixel test reads two clusters' counts at once (one 64-bit word) when their
    number is even, one at a time when it is odd; both must find the same pixels.
    """
    import datashader as ds
    import datashader.transfer_functions as tf
    import pandas as pd

    from explorer.app import plots

    rng = np.random.default_rng(n_categories)
    n = 4_000
    x = rng.normal(size=n).astype(np.float32)
    y = (x**2 + rng.normal(scale=0.05, size=n)).astype(np.float32)  # a thin arc: most pixels empty
    cats = [f"c{k}" for k in range(n_categories)]
    codes = rng.integers(0, n_categories, n)
    codes[x > 1.5] = n_categories - 1  # a stretch of pixels holding the last cluster only
    frame = pd.DataFrame({"x": x, "y": y, "c": pd.Categorical.from_codes(codes, cats)})
    key = [f"#{rng.integers(0, 2**24):06x}" for _ in cats]
    for size in (120, 7):  # sparse, full
        canvas = ds.Canvas(plot_width=size, plot_height=size + 3, x_range=(-3.0, 3.0), y_range=(-0.5, 9.0))
        agg = canvas.points(frame, "x", "y", agg=ds.count_cat("c"))
        expected = tf.shade(agg, color_key=key, min_alpha=200)
        found = plots.shade_filled(agg, color_key=key, min_alpha=200)
        np.testing.assert_array_equal(found.data, expected.data)


def test_a_colouring_by_the_gene_spans_its_finite_values_and_keeps_the_colour_bars_palette(monkeypatch):
    """A click coloured by the gene asks each plot's colour range and bar again (10^6 values at atlas scale).

    The range is the finite values' (NaN and inf skipped; symmetric around 0 for a diverging
    map), whatever the values' dtype; the colour bar gets the new range, and keeps its
    palette when the map did not change (Bokeh validates every colour of a palette it is given).
    """
    from bokeh.plotting import figure

    from explorer.app import plots
    from explorer.app.readouts import Coloring

    values = np.array([0.5, np.nan, -2.0, np.inf, 3.0, -np.inf], dtype=np.float32)
    assert plots.value_range(Coloring("continuous", values, "Ms")) == (-2.0, 3.0)
    assert plots.value_range(Coloring("continuous", values, "velocity", diverging=True)) == (-3.0, 3.0)
    assert plots.value_range(Coloring("continuous", values[:2], "Ms")) == (0.5, 0.5)
    assert plots.value_range(Coloring("continuous", np.array([np.nan, np.inf]), "Ms")) == (0.0, 1.0)
    assert plots.value_range(Coloring("continuous", np.empty(0), "Ms")) == (0.0, 1.0)
    counts = Coloring("continuous", np.array([3, -7]), "count", diverging=True)
    assert plots.value_range(counts) == (-7.0, 7.0)
    assert all(type(v) is float for v in plots.value_range(Coloring("continuous", values, "Ms")))

    fig = figure()
    bar = plots.sync_colorbar(fig, Coloring("continuous", values, "gene A"))
    mapper_type = type(bar.color_mapper)
    given: list[set[str]] = []
    update = mapper_type.update
    monkeypatch.setattr(mapper_type, "update", lambda self, **kw: (given.append(set(kw)), update(self, **kw)))
    assert plots.sync_colorbar(fig, Coloring("continuous", np.array([1.0, 9.0]), "gene B")) is bar
    assert (bar.color_mapper.low, bar.color_mapper.high) == (1.0, 9.0)
    assert given == [{"low", "high"}]  # the same map: its palette is not given again
    plots.sync_colorbar(fig, Coloring("continuous", np.array([1.0, 9.0]), "gene C"))
    assert given == [{"low", "high"}]  # nothing changed: nothing set
    plots.sync_colorbar(fig, Coloring("continuous", np.array([-1.0, 9.0]), "velocity", diverging=True))
    assert given[-1] == {"palette", "low"} and (bar.color_mapper.low, bar.color_mapper.high) == (-9.0, 9.0)
    assert bar.color_mapper.palette == list(plots._cmap_colors(plots.DIVERGING_CMAP))


def test_the_browser_opens_a_chunked_store(atlas_dir):
    from playwright.sync_api import expect, sync_playwright

    assert all(m.name in ("e2e", "skipif") for m in BROWSER_MARKS)
    ARTIFACTS.mkdir(exist_ok=True)
    with running_server(STORE, atlas_dir, log_name="atlas_store_server.log") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            start = time.monotonic()
            page.goto(url)
            page.get_by_text("No cell selected").wait_for(timeout=60_000)
            page.locator("canvas").first.wait_for(timeout=60_000)
            assert time.monotonic() - start < 120
            page.get_by_text(STORE).first.wait_for(timeout=60_000)  # the sidebar is built after the plots
            # a gene click reads that gene's Ms/Mu chunks and redraws the phase portrait
            phase = page.locator(".bk-Canvas").nth(1)
            before = phase.screenshot()
            box = page.get_by_placeholder("filter genes")
            box.press_sequentially("gene_0007")
            box.press("Enter")
            expect(page.locator(".tabulator-pages .tabulator-page")).to_have_count(1, timeout=30_000)
            page.get_by_role("gridcell", name="gene_0007", exact=True).click()
            page.get_by_text("Gene gene_0007").wait_for(timeout=10_000)
            page.wait_for_timeout(800)
            assert phase.screenshot() != before
            page.screenshot(path=ARTIFACTS / "atlas_store.png", full_page=True)
        finally:
            browser.close()


def _with_a_stored_fit(adata):
    """A copy of ``adata`` with a dynamical fit stored as ``explorer fit`` writes it (the simulated rates)."""
    fitted = adata.copy()
    t = fitted.obs[Key.obs.TRUE_T].to_numpy(np.float32)
    fitted.obs[Key.obs.LATENT_TIME] = t / t.max()
    for fit_key, true_key in (("fit_alpha", "true_alpha"), ("fit_beta", "true_beta"), ("fit_gamma", "true_gamma"),
                              ("fit_t_", "true_t_"), ("fit_scaling", "true_scaling")):  # fmt: skip
        fitted.var[fit_key] = fitted.var[true_key].to_numpy(np.float32)
    fitted.var["fit_likelihood"] = np.float32(1.0)
    fitted.var[Key.var.VELOCITY_GENES] = True
    fitted.layers[Key.layers.VELOCITY] = np.asarray(fitted.layers[Key.layers.MS] * 0.1, dtype=np.float32)
    fitted.layers[Key.layers.FIT_T] = np.tile(t[:, None], (1, fitted.n_vars))
    fitted.uns[Key.uns.VELOCITY_PARAMS] = {"mode": "dynamical", "model": "dynamical", "params": {}}
    return fitted


def _datashaded_page(adata, folder, monkeypatch):
    """A page of ``adata`` on a Bokeh document, its plots drawn as images as at atlas scale."""
    from bokeh.document import Document
    from panel.io.state import set_curdoc

    from explorer.app import plots
    from explorer.app.main import create_app

    monkeypatch.setattr(plots, "DATASHADE_THRESHOLD", adata.n_obs // 2)
    doc = Document()
    with set_curdoc(doc):
        page = create_app(adata, data_dir=folder)
        page.server_doc(doc)
    # the read-outs the page started (a stored fit's velocity graph): landed before the test
    # clicks. Without a server their callbacks redraw from the worker thread, which raced
    # the test's own redraws under load (holoviews: an overlay's subplots None mid-update)
    for job in page.app.state.background_jobs():
        assert job.join(120)
    return doc, page.app.state, page.app.views


def test_a_gene_click_coloured_by_the_gene_draws_each_image_once(app_adata, tmp_path, monkeypatch):
    """Coloured by the gene, a gene click draws five images (the embedding and four gene plots), once each.

    The gene plots' new coordinates come with the new colours; drawing their colours
    again cost ~11 ms an image at 10^6 cells.
    """
    from panel.io.state import set_curdoc

    from explorer.app import plots
    from explorer.app.readouts import COLOR_EXPRESSION

    adata = _with_a_stored_fit(app_adata)
    doc, state, views = _datashaded_page(adata, tmp_path, monkeypatch)
    assert state.fit is not None
    gene_plots = [views["phase"].scatter, *views["time"].scatters.values()]
    assert all(s.datashade and s.base_live.sources for s in [views["embedding"].scatter, *gene_plots])
    with set_curdoc(doc):
        state.color_by = COLOR_EXPRESSION
    shade = plots.shade
    drawn: list[int] = []
    monkeypatch.setattr(plots, "shade", lambda *a, **k: (drawn.append(k["height"]), shade(*a, **k))[1])
    for gene in adata.var_names[[3, 8]]:
        drawn.clear()
        with set_curdoc(doc):
            state.select_gene(str(gene))
        assert sorted(drawn) == sorted([460, 420, 260, 260, 260]), drawn  # embedding, phase, 3 time plots
        coloring = state.coloring()
        assert coloring.label.startswith(str(gene))
        for scatter in gene_plots:  # each shows the new gene's cells in the new gene's colours
            x, y = scatter.xy()
            expected, _ = shade(x, y, coloring, width=scatter._width, height=scatter._height)
            np.testing.assert_array_equal(scatter.base_live.shown["image"][0], expected)
    # coloured by clusters, a gene click draws the four gene plots only
    with set_curdoc(doc):
        state.color_by = "clusters"
    drawn.clear()
    with set_curdoc(doc):
        state.select_gene(str(adata.var_names[5]))
    assert sorted(drawn) == [260, 260, 260, 420]


def test_a_gene_click_reads_a_stored_fits_fit_t_once(app_adata, tmp_path, monkeypatch):
    """The phase curve's end and the time curves read the stored fit's ``fit_t`` column once a click."""
    from panel.io.state import set_curdoc

    from explorer.app import readouts
    from explorer.app import state as state_module

    fitted = _with_a_stored_fit(app_adata)
    fitted.write_zarr(tmp_path / STORE)
    adata = load_dataset(tmp_path / STORE)
    assert isinstance(adata.layers[Key.layers.FIT_T], da.Array)
    doc, state, views = _datashaded_page(adata, tmp_path, monkeypatch)
    assert state.fit is not None and "curve" in state.fit_shows(state.fit)
    stored_fit_t = state.fit.result.layers[Key.layers.FIT_T]
    reads: list[int] = []
    for module in (readouts, state_module):

        def counted(matrix, j, _read=module.read_column):
            if matrix is stored_fit_t:
                reads.append(j)
            return _read(matrix, j)

        monkeypatch.setattr(module, "read_column", counted)
    for j in (4, 9):
        reads.clear()
        with set_curdoc(doc):
            state.select_gene(str(adata.var_names[j]))
        assert reads == [j]  # the phase curve and the three time plots: one read
        # the time plots draw the fit's values per cell type (no red line over all cells)
        lines = state.lineage_lines("Ms")
        assert state.time_curve("Ms") is None and lines and {x.kind for x in lines} == {"type"}
        # the same curve and fitted values as from the column read where each is used
        shown = state.phase_fits()
        again = readouts.phase_fits(
            state.gene_values("Ms"), state.gene_values("Mu"), state.results, j=j, active=state.model
        )
        assert len(shown) == len(again) == 1 and shown[0].s is not None and len(shown[0].s) > 1
        np.testing.assert_array_equal(shown[0].s, again[0].s)
        np.testing.assert_array_equal(shown[0].u, again[0].u)
        at_cells = readouts.fitted_at_cells(state.fit, j, fit_t=lambda fit: state._fit_t(fit, j))
        for key, values in readouts.fitted_at_cells(state.fit, j).items():
            np.testing.assert_array_equal(at_cells[key], values)


def test_an_image_is_drawn_at_its_plots_frame_size_once_the_browser_has_it(app_adata, tmp_path, monkeypatch):
    """A gene click draws each image at its plot's frame size (BokehJS' ``inner_width``/``inner_height``).

    Before the browser has laid the plot out the image has the plot's size; an image
    larger than its frame was squeezed into it when painted.
    """
    from panel.io.state import set_curdoc

    adata = _with_a_stored_fit(app_adata)
    doc, state, views = _datashaded_page(adata, tmp_path, monkeypatch)
    time_ms, phase = views["time"].scatters["Ms"], views["phase"].scatter
    assert time_ms.base_live.shown["image"][0].shape == (260, 380)  # not laid out yet: the plot's size
    frames = {time_ms: (305, 188), phase: (405, 348)}
    for scatter, (width, height) in frames.items():
        figure = scatter.base_live.plots[-1].state
        figure.set_from_json("inner_width", width)  # what BokehJS sends once it has laid the plot out
        figure.set_from_json("inner_height", height)
    with set_curdoc(doc):
        state.select_gene(str(adata.var_names[6]))
    for scatter, (width, height) in frames.items():
        shown = scatter.base_live.shown
        assert shown["image"][0].shape == (height, width)
        # the same cells over the same span as the plot-sized image of the gene
        x, y = scatter.xy()
        image, (x0, y0, x1, y1) = plots_shade(x, y, state.coloring(), width=width, height=height)
        np.testing.assert_array_equal(shown["image"][0], image)
        assert (shown["x"][0], shown["y"][0], shown["dw"][0], shown["dh"][0]) == (x0, y0, x1 - x0, y1 - y0)
        assert (x0, y0, x1, y1) == plots_shade(x, y, state.coloring(), width=380, height=260)[1]
    # a frame the browser has not sized (0) or larger than the plot: the plot's size
    figure = time_ms.base_live.plots[-1].state
    figure.set_from_json("inner_width", 0)
    with set_curdoc(doc):
        state.select_gene(str(adata.var_names[7]))
    assert time_ms.base_live.shown["image"][0].shape == (260, 380)


def plots_shade(*args, **kwargs):
    """:func:`explorer.app.plots.shade` (imported late, after the app's modules)."""
    from explorer.app import plots

    return plots.shade(*args, **kwargs)
