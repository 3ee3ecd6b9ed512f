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
