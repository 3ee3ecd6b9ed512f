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
