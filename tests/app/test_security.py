"""Names from a dataset are text, never markup; the page fetches nothing from outside this machine.

Datasets come from collaborators and public repositories, so every name the app shows
(genes, cells, categories, obs columns, the file's own name) may carry HTML or
JavaScript. The browser test opens a dataset made of such payloads in Debian's
chromium and drives every view that shows them; each payload, if it ran, would set
``window.__pwned``. The headless tests check the escaping helpers and the HTML the
views produce.
"""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
from bokeh.document import Document
from bokeh.models import ImportedStyleSheet
from panel.io.state import set_curdoc

from explorer.app import plots
from explorer.app.escape import hex_colors, html_text, markdown_text
from explorer.app.main import create_app
from explorer.app.resources import use_local_resources
from explorer.app.state import Coloring
from explorer.keys import Key
from tests.app.conftest import ARTIFACTS, BROWSER_ARGS, CHROMIUM, make_app_adata, running_server

browser_test = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/setup installs it)"
)

#: each would set window.__pwned if the page ran it
GENE_PAYLOADS = [
    '<img src=x onerror="window.__pwned=1">',
    "<script>window.__pwned=2</script>",
    '"><svg onload=window.__pwned=3>',
]
CATEGORY_PAYLOADS = [
    '<img src=x onerror="window.__pwned=4">',
    "<b onmouseover=window.__pwned=5>mid</b>",
    "*late* [x](javascript:window.__pwned=6)",
    '"><svg onload=window.__pwned=7>',
]
COLUMN_PAYLOAD = '<img src=x onerror="window.__pwned=8">'
FILE_PAYLOAD = "<svg onload=window.__pwned=9>.h5ad"  # no "/" in a file name
CELL_PAYLOAD = '<img src=x onerror="window.__pwned=10">'
#: the name the Save form offers for results of FILE_PAYLOAD (spaces become "_")
SAVED_PAYLOAD = "<svg_onload=window.__pwned=9>_velocity.h5ad"


def payload_adata():
    """The app's small dataset with a payload in every name it shows."""
    adata = make_app_adata()
    genes = list(adata.var_names)
    genes[: len(GENE_PAYLOADS)] = GENE_PAYLOADS
    adata.var_names = genes
    adata.obs_names = [f"{CELL_PAYLOAD}c{i}" for i in range(adata.n_obs)]
    adata.obs[Key.obs.CLUSTERS] = adata.obs[Key.obs.CLUSTERS].cat.rename_categories(CATEGORY_PAYLOADS)
    adata.obs[COLUMN_PAYLOAD] = adata.obs[Key.obs.CLUSTERS].copy()
    # a stored colour that would close the style attribute and open a tag
    adata.uns[f"{Key.obs.CLUSTERS}_colors"] = np.array(
        ['red;"><img src=x onerror="window.__pwned=11">', "blue", "green", "orange"]
    )
    t = adata.obs[Key.obs.TRUE_T].to_numpy()
    adata.obs[Key.obs.LATENT_TIME] = (t - t.min()) / (t.max() - t.min())
    return adata


# --------------------------------------------------------------------------- headless
def _rendered(markdown: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"linkify": False}).render(markdown)


@pytest.mark.parametrize(
    "text", [*GENE_PAYLOADS, *CATEGORY_PAYLOADS, "a_b_c **x** `y` # h $x$ &amp; \\n", "line\nbreak"]
)
def test_markdown_text_renders_to_exactly_its_characters(text):
    rendered = _rendered(markdown_text(text))
    assert "<" not in rendered.removeprefix("<p>").removesuffix("</p>\n")  # no tag but the paragraph
    shown = html.unescape(rendered.removeprefix("<p>").removesuffix("</p>\n"))
    assert shown == text


def test_html_text_escapes_tags_and_quotes():
    assert html_text('<img src=x onerror="a">') == "&lt;img src=x onerror=&quot;a&quot;&gt;"
    assert html_text("a'b&c") == "a&#x27;b&amp;c"


def test_stored_colours_are_kept_only_when_they_are_colours():
    assert hex_colors(["red", "#00ff00", "#00F"], 3) == ["#ff0000", "#00ff00", "#0000ff"]
    assert hex_colors(['red;"><img src=x>', "blue"], 2) is None
    assert hex_colors(["red"], 2) is None  # too few for the categories
    assert hex_colors(None, 1) is None


def test_legends_show_names_as_text():
    coloring = Coloring(
        kind="category",
        values=np.zeros(3, dtype=np.int8),
        label=COLUMN_PAYLOAD,
        categories=CATEGORY_PAYLOADS,
        color_key={CATEGORY_PAYLOADS[0]: '#fff"><img src=x onerror=alert(1)>'},
    )
    legend = plots.legend_html(coloring)
    assert "<img" not in legend and "<svg" not in legend and "<script" not in legend
    for name in (*CATEGORY_PAYLOADS, COLUMN_PAYLOAD):
        assert html.escape(name, quote=True) in legend


def test_views_escape_every_dataset_name(tmp_path):
    """The Markdown and HTML the page is sent holds the payloads only as text."""
    adata = payload_adata()
    doc = Document()
    with set_curdoc(doc):
        page = create_app(adata, data_dir=tmp_path, name=FILE_PAYLOAD)
        page.server_doc(doc)
        app = page.app
        state = app.state
        state.select_cell(0)
        app.views["genes"].search.value = "img src"  # not a gene: the error names similar ones
        assert "Similar names" in state.error
        state.color_by = COLUMN_PAYLOAD
        # a model's warning naming a column (VeloVAE's on capture times) is shown as text
        state.notices = [f"the capture times in obs[{COLUMN_PAYLOAD!r}] agree poorly", GENE_PAYLOADS[0]]
        texts = {
            "dataset": app.dataset.current.object,
            "phase header": app.views["phase"]._header(state.gene, state.model),
            "legend": app.views["embedding"]._legend(),
            "inspector": app.views["inspector"].summary.object,
            "error": app.error.object,
            "runner alert": app.runner.alert.object,
            "runner notice": app.runner.notice.object,
        }
    for where, text in texts.items():
        rendered = text if where == "legend" else _rendered(text)
        assert not re.search(r"<(img|svg|script|b |a )", rendered), (where, rendered)
    assert GENE_PAYLOADS[0] in html.unescape(re.sub(r"<[^>]+>", "", _rendered(texts["phase header"])))
    assert f"{CELL_PAYLOAD}c0" in html.unescape(re.sub(r"<[^>]+>", "", _rendered(texts["inspector"])))
    assert FILE_PAYLOAD in html.unescape(re.sub(r"<[^>]+>", "", _rendered(texts["dataset"])))
    assert COLUMN_PAYLOAD in html.unescape(re.sub(r"<[^>]+>", "", _rendered(texts["runner notice"])))


#: names matplotlib would read as mathtext, the second not valid mathtext
MATH_PAYLOADS = ["IgG$_{1}$", r"$\bad{$"]


def test_names_with_dollars_and_braces_are_drawn_as_text_on_the_page_and_in_exports(tmp_path):
    """A gene, cluster or file name with ``$...$`` or a brace: the plots and their PNG/SVG exports draw it.

    Before, HoloViews formatted each plot's title with ``str.format``, so a brace in a gene
    or file name stopped the plot from being drawn at all (``unmatched '{'``), and matplotlib
    read ``$...$`` in an export as mathtext: one that is not valid mathtext made every
    export of its plot fail.
    """
    from explorer.app.views.export import plot_file

    adata = make_app_adata()
    adata.var_names = [MATH_PAYLOADS[1], *adata.var_names[1:]]
    adata.obs[Key.obs.CLUSTERS] = adata.obs[Key.obs.CLUSTERS].cat.rename_categories(
        [*MATH_PAYLOADS, "mid", "late"]
    )
    t = adata.obs[Key.obs.TRUE_T].to_numpy()
    adata.obs[Key.obs.LATENT_TIME] = (t - t.min()) / (t.max() - t.min())
    doc = Document()
    with set_curdoc(doc):
        page = create_app(adata, data_dir=tmp_path, name=f"{MATH_PAYLOADS[1]}.h5ad")
        page.server_doc(doc)
        state = page.app.state
        state.select_gene(MATH_PAYLOADS[1])
        for scatter in (page.app.views["phase"].scatter, page.app.views["time"].scatters["Ms"]):
            title = scatter.base_live.plots[-1].handles["plot"].title.text
            assert title.startswith(f"{MATH_PAYLOADS[1]}: "), title
        for which in ("embedding", "phase portrait", "gene over time"):
            assert plot_file(state, which, "png").startswith(b"\x89PNG"), which
            assert b"<svg" in plot_file(state, which, "svg")[:400], which
    for name in MATH_PAYLOADS:
        assert plots.mpl_text(name).count("\\$") == name.count("$")


def _stylesheet_urls(doc: Document) -> list[str]:
    return sorted({str(s.url) for root in doc.roots for s in root.select({"type": ImportedStyleSheet})})


def test_a_session_built_without_its_html_page_loads_no_stylesheet_from_a_cdn(tmp_path, monkeypatch):
    """Bokeh rebuilds a session whose page took over 15 s to connect without rendering its HTML.

    Panel then left every component's stylesheet on its CDN (12 requests to
    cdn.holoviz.org per page in a load test); :func:`use_local_resources` keeps them local.
    """
    import panel.reactive
    from panel.io.resources import CDN_DIST

    adata = make_app_adata()
    # Panel's fallback for models outside a document, as before any session of this process
    monkeypatch.setattr(panel.reactive, "CDN_DIST", CDN_DIST)

    def build(local: bool) -> list[str]:
        doc = Document()
        if local:
            with monkeypatch.context() as m:  # a server session's document
                m.setattr(Document, "session_context", property(lambda _self: object()))
                use_local_resources(doc)
        with set_curdoc(doc):
            page = create_app(adata, data_dir=tmp_path)
            page.server_doc(doc)
            page.app.content.objects[0].active = 1  # the Compare tab, rendered when opened
            # a gene picked there (its table of a transition's genes) updates the Explore tab's
            # Markdown panes while that tab is hidden, their models outside the document:
            # Panel resolved their stylesheets against its CDN, and the shared stylesheet of
            # every Markdown pane of the page with them
            page.app.state.select_gene(str(adata.var_names[3]))
        return _stylesheet_urls(doc)

    remote = [u for u in build(local=False) if u.startswith("http")]
    assert remote, "expected Panel to point a page built without a session at its CDN"
    urls = build(local=True)
    assert urls
    assert [u for u in urls if re.match(r"^(https?:)?//", u)] == []


# --------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def payload_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("payload_data")
    payload_adata().write_h5ad(folder / FILE_PAYLOAD)
    with running_server(FILE_PAYLOAD, folder, log_name="security_server.log") as url:
        yield url, folder


def _pwned(page) -> object:
    return page.evaluate("window.__pwned")


def _injected(page) -> int:
    """Elements the payloads would create (the locator looks inside every shadow root)."""
    return sum(
        page.locator(selector).count()
        for selector in ("img[src='x']", "svg[onload]", "b[onmouseover]", "a[href^='javascript']")
    )


@pytest.mark.e2e
@browser_test
def test_payload_names_run_no_script_and_show_literally(payload_server):
    from playwright.sync_api import sync_playwright

    url, folder = payload_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1400})
        page.goto(url)
        page.get_by_text("No cell selected").wait_for(timeout=120_000)
        page.locator("canvas").first.wait_for(timeout=60_000)
        # the first gene (a payload) is selected; the clusters (payloads) colour the cells
        for text in (f"Gene {GENE_PAYLOADS[0]}", CATEGORY_PAYLOADS[0], CATEGORY_PAYLOADS[2], FILE_PAYLOAD):
            page.get_by_text(text).first.wait_for(timeout=10_000)

        # a fit: the inspector's table of next cells then lists cell and cluster names
        page.get_by_role("button", name="Run").click()
        page.get_by_text("fit: stochastic").first.wait_for(timeout=120_000)

        # pick another payload gene in the gene table
        box = page.get_by_placeholder("filter genes")
        box.press_sequentially("script")
        box.press("Enter")
        # the server has filtered once the pager offers one page (the browser shows the rows sooner;
        # a click before then is mapped to a row of the unfiltered table)
        page.locator(".tabulator-page[data-page='2']").wait_for(state="detached", timeout=10_000)
        page.get_by_role("gridcell", name=GENE_PAYLOADS[1], exact=True).click()
        page.get_by_text(f"Gene {GENE_PAYLOADS[1]}").wait_for(timeout=10_000)

        # the completion menu lists payload names; a near miss (no completion) names similar genes
        find = page.get_by_label("Find a gene")
        find.press_sequentially("onerror")
        page.get_by_text(GENE_PAYLOADS[0], exact=True).last.wait_for(timeout=10_000)
        find.fill("")
        find.press_sequentially(GENE_PAYLOADS[2] + "x")
        find.press("Enter")
        page.get_by_text(f"Similar names: {GENE_PAYLOADS[2]}").first.wait_for(timeout=10_000)

        # a cell: the inspector names it, its cluster and its likely next cells
        canvas = page.locator(".bk-Canvas").first
        box_ = canvas.bounding_box()
        canvas.click(position={"x": box_["width"] * 0.45, "y": box_["height"] * 0.5})
        page.get_by_text("latent time:").wait_for(timeout=10_000)
        page.get_by_text(f"Cell {CELL_PAYLOAD}c").first.wait_for(timeout=10_000)
        page.get_by_role("gridcell", name=re.compile(re.escape(CELL_PAYLOAD))).first.wait_for(timeout=10_000)

        # the obs column whose name is a payload, as the colouring (its legend names it)
        page.get_by_label("Colour by").select_option(label=COLUMN_PAYLOAD)
        page.get_by_text(f"{COLUMN_PAYLOAD}:").first.wait_for(timeout=10_000)

        # the Compare tab, and a save under the payload file name
        page.locator(".bk-tab").filter(has_text="Compare").click()
        page.wait_for_timeout(1500)
        page.locator(".bk-tab").filter(has_text="Explore").click()
        page.get_by_role("button", name="Save .h5ad").click()
        page.get_by_text(f"Saved {SAVED_PAYLOAD} (").wait_for(timeout=30_000)
        page.wait_for_timeout(1000)  # an <img src=x> would have failed to load and run by now

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / "security_payloads.png", full_page=True)
        assert _pwned(page) is None
        assert _injected(page) == 0
        browser.close()
    assert (folder / SAVED_PAYLOAD).is_file()
