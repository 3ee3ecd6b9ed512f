"""A vector field in chromium: a click draws the cell's path, fixed points are marked, the panel perturbs.

The small two-lineage simulation (``conftest.make_app_adata``) gets a ``vector_field``
fit (stochastic base, 5 principal components, 20 epochs) written into the file the
server opens, with one fixed point put by hand at a cell (the fit on so few cells finds
none near them). What the browser draws is read from its Bokeh document: the lines and
dots of the embedding's path layer, by colour. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import numpy as np
import pytest

from explorer.app.views.field import FIXED_COLORS, PERTURBED_COLOR, TRAJECTORY_COLOR
from explorer.keys import Key
from tests.app.conftest import ARTIFACTS, BROWSER_ARGS, BROWSER_MARKS, CHROMIUM, running_server

pytestmark = BROWSER_MARKS

#: what the embedding's path layer holds in the browser: the black path's points, red paths, green dots
_DRAWN = f"""() => {{
  const out = {{path: 0, perturbed: 0, attractors: 0}};
  for (const doc of Bokeh.documents) for (const m of doc.all_models) {{
    const d = m.data;
    if (!d || !d.color) continue;
    const colors = Array.from(d.color);
    colors.forEach((c, i) => {{
      if (d.xs && c === "{TRAJECTORY_COLOR}") out.path = d.xs[i].length;
      if (d.xs && c === "{PERTURBED_COLOR}") out.perturbed += 1;
      if (!d.xs && d.x && c === "{FIXED_COLORS["attractor"]}") out.attractors += 1;
    }});
  }}
  return out;
}}"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, app_adata):
    from explorer.models.vector_field import VectorField

    folder = tmp_path_factory.mktemp("e2e_field")
    adata = app_adata.copy()
    field = VectorField(base="stochastic", n_pcs=5, epochs=20, n_fixed_point_starts=0, device="cpu")
    field.fit(adata).to_adata(adata)
    state = adata.obsm[Key.obsm.VF_STATE][[7]]
    adata.uns[Key.uns.VECTOR_FIELD]["fixed_points"] = {
        "state": state,
        "type": np.array(["attractor"]),
        "embedding": np.asarray(adata.obsm[Key.obsm.UMAP])[[7], :2],
    }
    adata.write_h5ad(folder / "field.h5ad")
    return folder


@pytest.fixture(scope="module")
def field_page(data_dir):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with (
        running_server("field.h5ad", data_dir, log_name="e2e_field_server.log") as url,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1400})
        page.goto(url)
        page.get_by_text("No cell selected").wait_for(timeout=60_000)
        page.locator(".bk-Canvas").first.wait_for(timeout=60_000)
        yield page
        browser.close()


def _drawn(page, key: str, value: int) -> dict:
    """Wait (up to 20 s) until the browser's path layer holds ``value`` of ``key``; return what it holds."""
    found = {}
    for _ in range(80):
        found = page.evaluate(_DRAWN)
        if found[key] == value:
            break
        page.wait_for_timeout(250)
    return found


def test_a_click_draws_the_cells_path_beside_the_fixed_points(field_page):
    page = field_page
    assert _drawn(page, "attractors", 1)["attractors"] == 1  # the fixed point, marked before any click
    page.get_by_text("click a cell to draw its path").wait_for(timeout=30_000)
    canvas = page.locator(".bk-Canvas").first
    box = canvas.bounding_box()
    canvas.click(position={"x": box["width"] * 0.45, "y": box["height"] * 0.5})
    page.get_by_text("ends near a cell of").wait_for(timeout=30_000)
    assert _drawn(page, "path", 101)["path"] == 101  # the path's 100 RK4 steps and its start
    canvas.screenshot(path=ARTIFACTS / "e2e_field_path.png")


def test_the_perturbation_panel_moves_the_selected_cells_paths(field_page):
    page = field_page
    gene = page.get_by_label("gene", exact=True).input_value()  # the selected gene, or the field's first
    assert gene.startswith("gene_")
    page.get_by_label("factor (0: knock-out)").fill("0")
    page.keyboard.press("Tab")
    page.get_by_role("button", name="Perturb").click()
    page.get_by_text("where the paths end").wait_for(timeout=60_000)
    assert page.get_by_text(f"{gene} x0").count() == 1
    assert _drawn(page, "perturbed", 1)["perturbed"] == 1  # the selected cell's perturbed path
    page.screenshot(path=ARTIFACTS / "e2e_field_perturbation.png", full_page=True)
