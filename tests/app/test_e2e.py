"""The app in a real browser: Debian's chromium driven by playwright (never ``playwright install``).

One server (``explorer.app.server.serve``, started by ``conftest.running_server``, which
waits up to 180 s with 30 s per request) runs in a subprocess on a free local port with a
small dataset in a temporary data directory; the tests share one page and keep
screenshots in ``test-artifacts/``. The last test opens four more pages at once and
checks that no request leaves this machine (no CDN).
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from explorer.keys import Key
from tests.app.conftest import ARTIFACTS, BROWSER_ARGS, BROWSER_MARKS, CHROMIUM, running_server

pytestmark = BROWSER_MARKS


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, app_adata):
    folder = tmp_path_factory.mktemp("e2e_data")
    adata = app_adata.copy()
    t = adata.obs[Key.obs.TRUE_T].to_numpy()
    adata.obs[Key.obs.LATENT_TIME] = (t - t.min()) / (t.max() - t.min())
    adata.obs["day"] = np.digitize(t, np.quantile(t, [0.25, 0.5, 0.75])).astype(float) + 1  # capture times
    adata.write_h5ad(folder / "small.h5ad")
    return folder


@pytest.fixture(scope="module")
def server(data_dir):
    with running_server("small.h5ad", data_dir, log_name="e2e_server.log") as url:
        yield url


@pytest.fixture(scope="module")
def app_page(server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1400}, accept_downloads=True)
        page = context.new_page()
        start = time.monotonic()
        page.goto(server)
        page.get_by_text("No cell selected").wait_for(timeout=60_000)
        page.locator("canvas").first.wait_for(timeout=60_000)
        # the sidebar (dataset, runner, export) may come last, after the plots (see ExplorerApp)
        page.get_by_text("small.h5ad").first.wait_for(timeout=60_000)
        page.ready_s = time.monotonic() - start
        yield page
        page.screenshot(path=ARTIFACTS / "e2e_final.png", full_page=True, timeout=10_000)
        browser.close()


#: addresses of this machine (and in-page data): every request a page makes must match
_LOCAL = re.compile(r"^(https?|wss?)://(127\.0\.0\.1|localhost)(:\d+)?/|^(data|blob|about):")


def _click_gene(page, gene: str) -> None:
    """Filter the gene table to ``gene`` (its rows are sorted by fit quality) and click its row."""
    from playwright.sync_api import expect

    box = page.get_by_placeholder("filter genes")
    box.fill("")
    box.press_sequentially(gene)  # Tabulator filters on key presses, not on a pasted value
    box.press("Enter")
    # the server has filtered once the pager offers one page (the browser shows the rows sooner;
    # a click before then is mapped to a row of the unfiltered table)
    expect(page.locator(".tabulator-pages .tabulator-page")).to_have_count(1, timeout=30_000)
    page.get_by_role("gridcell", name=gene, exact=True).click()


def _phase(page):
    """The phase-portrait plot (the second plot of the Explore tab)."""
    return page.locator(".bk-Canvas").nth(1)


def test_page_loads(app_page):
    page = app_page
    assert page.ready_s < 60
    page.screenshot(path=ARTIFACTS / "e2e_loaded.png", full_page=True)
    assert page.get_by_text("small.h5ad").first.is_visible()


def test_clicking_a_gene_changes_the_phase_portrait(app_page):
    page = app_page
    before = _phase(page).screenshot()
    _click_gene(page, "gene_0007")
    page.get_by_text("Gene gene_0007").wait_for(timeout=10_000)
    page.wait_for_timeout(800)
    after = _phase(page).screenshot()
    assert before != after
    page.screenshot(path=ARTIFACTS / "e2e_gene.png", full_page=True)


def test_clicking_a_cell_fills_the_inspector(app_page):
    page = app_page
    canvas = page.locator(".bk-Canvas").first
    box = canvas.bounding_box()
    # the middle of the plot: the tap selects whichever cell is nearest
    canvas.click(position={"x": box["width"] * 0.45, "y": box["height"] * 0.5})
    page.get_by_text("latent time:").wait_for(timeout=10_000)
    summary = page.get_by_text("Cell cell_").first.inner_text()
    assert "cell_" in summary
    page.screenshot(path=ARTIFACTS / "e2e_cell.png", full_page=True)


def test_a_run_shows_progress_while_clicks_still_answer(app_page):
    page = app_page
    page.get_by_label("Model", exact=True).select_option("dynamical")
    page.get_by_label("max_iter").fill("30")
    # tol=0: every one of the 30 EM iterations runs, so the bar has steps to show even on a fast machine
    page.get_by_label("tol", exact=True).fill("0")
    bar = page.locator("progress").first
    # record every value the bar takes in the browser itself; polling alone can miss a fast run
    bar.evaluate(
        "el => { window.__progress = []; new MutationObserver(() => "
        "window.__progress.push(Number(el.value))).observe(el, {attributes: true}); }"
    )
    page.get_by_role("button", name="Run").click()
    values = []
    answered = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        raw = bar.get_attribute("value")
        values.append(float(raw) if raw not in (None, "") else 0.0)
        if not answered and values[-1] > 0:
            # a click while the fit runs still gets an answer
            start = time.monotonic()
            _click_gene(page, "gene_0003")
            page.get_by_text("Gene gene_0003").wait_for(timeout=10_000)
            answered = time.monotonic() - start < 10
            page.screenshot(path=ARTIFACTS / "e2e_running.png", full_page=True)
        if values[-1] >= 1000 and page.get_by_text("fit: dynamical").count():
            break
        page.wait_for_timeout(150)
    assert answered
    moving = [v for v in values + page.evaluate("window.__progress || []") if 0 < v < 1000]
    assert len(set(moving)) >= 2, f"progress never moved: {values}"
    page.get_by_text("fit: dynamical").wait_for(timeout=10_000)


def test_capture_times_are_chosen_from_the_datasets_columns(app_page):
    page = app_page
    page.get_by_label("Model", exact=True).select_option("velovae")
    menu = page.get_by_label("time_key", exact=True)
    menu.wait_for(timeout=10_000)
    options = menu.locator("option").all_inner_texts()
    assert options[0] == "(none)" and "day" in options
    assert "true_t" not in options and "clusters" not in options  # one value per cell; not numbers
    menu.select_option("day")
    assert menu.input_value() == "day"
    page.screenshot(path=ARTIFACTS / "e2e_time_key.png", full_page=True)


def test_export_writes_a_file_in_the_data_directory(app_page, data_dir):
    page = app_page
    page.get_by_label("Save results as (in the data directory)").fill("e2e_results.h5ad")
    page.get_by_role("button", name="Save .h5ad").click()
    page.get_by_text(re.compile(r"^Saved e2e_results\.h5ad")).wait_for(timeout=30_000)
    assert (data_dir / "e2e_results.h5ad").is_file()
    with page.expect_download() as download:
        page.get_by_role("button", name="Gene table (CSV)").click()
    target = ARTIFACTS / "e2e_genes.csv"
    download.value.save_as(target)
    header = target.read_text().splitlines()[0]
    assert header.startswith("gene,mean Ms,mean Mu")
    assert "likelihood" in header
    assert len(target.read_text().splitlines()) == 31  # a header and one row per gene


def test_saving_over_another_file_asks_first(app_page, data_dir):
    import anndata as ad

    page = app_page
    other = data_dir / "other.h5ad"
    other.write_bytes(b"another dataset")
    name = page.get_by_label("Save results as (in the data directory)")
    save = page.get_by_role("button", name="Save .h5ad")
    name.fill("other.h5ad")
    save.click()
    page.get_by_text("exists already in the data directory").wait_for(timeout=30_000)
    assert other.read_bytes() == b"another dataset"
    # an error replaces the message next to the button (and the offer to overwrite goes)
    (data_dir / "folder.h5ad").mkdir()
    name.fill("folder.h5ad")
    save.click()
    page.get_by_text("that is a folder").wait_for(timeout=30_000)
    assert page.get_by_text("exists already in the data directory").count() == 0
    assert not page.get_by_role("button", name="Overwrite").is_visible()
    name.fill("other.h5ad")
    save.click()
    page.get_by_role("button", name="Overwrite").click()
    page.get_by_text(re.compile(r"^Saved other\.h5ad")).wait_for(timeout=30_000)
    page.screenshot(path=ARTIFACTS / "e2e_overwrite.png", full_page=True)
    assert ad.read_h5ad(other).n_obs == 300


def test_terminal_states_ticked_in_the_inspector_give_the_fates_of_those_states(app_page):
    """Compute fates lists every macrostate with its self-transition; one more ticked is recomputed.

    The boxes are ticked where CellRank's stability rule found the terminal states; ticking
    another and pressing Compute fates again colours the cells by the states ticked (the
    embedding's legend names it) and the status says they were chosen. Until 2026-12-05
    the app had no choice of terminal states, and a second Compute fates answered "cached".
    """
    page = app_page
    page.get_by_role("button", name="Compute fates").click()
    page.get_by_text("tick where cells end").wait_for(timeout=120_000)
    page.get_by_text(re.compile(r"terminal states \(stable enough\)")).first.wait_for(timeout=30_000)
    boxes = page.get_by_role("checkbox", name=re.compile(r" \(\d\.\d{3}\)$"))
    labels = [boxes.nth(i).evaluate("el => el.parentElement.textContent") for i in range(boxes.count())]
    ticked = [boxes.nth(i).is_checked() for i in range(len(labels))]
    assert len(labels) == 10 and any(ticked) and not all(ticked), (labels, ticked)  # noqa: PLR2004
    free = ticked.index(False)
    name = labels[free].rsplit(" (", 1)[0]
    boxes.nth(free).check()
    page.get_by_role("button", name="Compute fates").click()
    page.get_by_text(re.compile(r"terminal states \(chosen\)")).first.wait_for(timeout=60_000)
    status = page.get_by_text(re.compile(r"terminal states \(chosen\)")).first.inner_text()
    assert name in status
    legend = page.locator("div", has=page.locator("b", has_text="terminal states (computed for")).last
    legend.get_by_text(name, exact=True).wait_for(timeout=30_000)
    page.screenshot(path=ARTIFACTS / "e2e_terminal_states.png", full_page=True)


def test_a_new_pages_first_click_sends_no_stylesheets_again(app_page, server):
    """A page's first updates reuse its stylesheet models (no new ones for the browser to lay out).

    Panel drops a session's stylesheet cache when the page's address is set; set after the
    page was built, every pane's first update sent its stylesheets again (4 on the first gene
    click of the sample, 0.45 s instead of 0.09 s).
    """
    browser = app_page.context.browser  # the module's browser: one playwright per thread
    context = browser.new_context(viewport={"width": 1600, "height": 1400})
    frames: list[str] = []
    recording = []
    try:
        page = context.new_page()
        def listen(ws) -> None:
            ws.on("framereceived", lambda f: frames.append(f) if recording and isinstance(f, str) else None)

        page.on("websocket", listen)
        page.goto(server)
        page.get_by_text("small.h5ad").first.wait_for(timeout=60_000)
        page.locator("canvas").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        recording.append(True)
        _click_gene(page, "gene_0005")
        page.get_by_text("Gene gene_0005").first.wait_for(timeout=10_000)
        page.wait_for_timeout(1000)
    finally:
        context.close()
    sent = " ".join(frames)
    assert "gene_0005" in sent  # the click's updates were recorded
    assert "ImportedStyleSheet" not in sent


def test_a_transitions_genes_select_a_gene_and_nothing_leaves_the_machine(app_page, server):
    """Compare tab: score a transition, click its CBDir, then a gene that carries it.

    The gene is selected in every view (the Explore tab's header names it). Picking it there updated the
    hidden Explore tab's Markdown panes, whose stylesheet Panel then pointed at its CDN for
    every Markdown pane of the page (explorer.app.resources); no request may leave.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    outside: list[str] = []
    context = app_page.context.browser.new_context(viewport={"width": 1600, "height": 1400})
    try:
        page = context.new_page()
        page.on("request", lambda r: None if _LOCAL.match(r.url) else outside.append(r.url))
        page.goto(server)
        page.get_by_text("No cell selected").wait_for(timeout=120_000)
        page.get_by_label("Model", exact=True).select_option("stochastic")
        page.get_by_role("button", name="Run").click()
        page.get_by_text("fit: stochastic").wait_for(timeout=120_000)
        page.get_by_text("Compare", exact=True).first.click()
        box = page.get_by_placeholder("e.g. progenitor>mature, mature>terminal")
        box.fill("early>mid")
        box.press("Enter")
        page.get_by_role("button", name="Compute metrics").click()
        # the metrics table's CBDir column (Tabulator's field is the escaped name)
        cbdir = page.locator(".tabulator-row .tabulator-cell[tabulator-field='cbdir[early&gt;mid]']")
        cbdir.first.wait_for(timeout=120_000)
        cbdir.first.click()
        page.get_by_text("The genes that carry").wait_for(timeout=30_000)
        # the Compare tab's last table (the Explore tab's gene table has a gene column too)
        table = page.locator(".tabulator").last
        genes = table.locator(".tabulator-row .tabulator-cell[tabulator-field='gene']")
        # the first row: the clicked fit's most backward gene
        first = genes.first
        first.wait_for(timeout=30_000)
        gene = first.inner_text().strip()
        assert gene != "gene_0000"  # not the gene selected before
        # the Compare tab's phase portraits' titles ("gene — A: fit") are drawn on their
        # canvases: read them from Bokeh's models
        titled = (
            "gene => Bokeh.documents.flatMap(doc => [...doc.all_models]).some(m => m.type === 'Title' "
            "&& String(m.text).startsWith(gene + ' — A: '))"
        )
        for _ in range(3):  # a click while the table is still being drawn can be lost: click again
            first.click()
            try:
                page.wait_for_function(titled, arg=gene, timeout=10_000)
                break
            except PlaywrightTimeout:
                continue
        assert page.evaluate(titled, gene), f"clicking {gene} did not select it"
        page.wait_for_timeout(500)
        page.screenshot(path=ARTIFACTS / "e2e_transition_genes.png", full_page=True)
        # every view follows: the Explore tab's header names the gene
        page.get_by_text("Explore", exact=True).first.click()
        page.get_by_text(f"Gene {gene}").wait_for(timeout=30_000)
    finally:
        context.close()
    assert outside == []


def test_four_pages_at_once_request_nothing_outside_this_machine(app_page, server):
    """Offline and under concurrency, every script, stylesheet and socket comes from the app's server."""
    outside: list[str] = []
    browser = app_page.context.browser  # the module's browser: one playwright per thread
    contexts = [browser.new_context(viewport={"width": 1400, "height": 1000}) for _ in range(4)]
    try:
        pages = [context.new_page() for context in contexts]
        for page in pages:
            page.on("request", lambda r: None if _LOCAL.match(r.url) else outside.append(r.url))
        for page in pages:  # all four requested before any is ready
            page.goto(server, wait_until="commit")
        for page in pages:
            page.get_by_text("No cell selected").wait_for(timeout=180_000)
            page.locator("canvas").first.wait_for(timeout=60_000)
        pages[0].wait_for_timeout(1000)
    finally:
        for context in contexts:
            context.close()
    assert outside == []
