"""Server-side latency of the app: a gene click or a cell click until every view is updated.

For each dataset the page is built as for a browser session (``create_app`` on a Bokeh
document, all plots rendered), then the handlers a browser event calls are timed:

- gene click: ``GeneBrowser._clicked`` (a row of the gene table) -> phase portrait, three
  time plots, table selection, and the embedding when it is coloured by the gene;
- cell click: the embedding's tap handler at a cell's coordinates -> the selected-cell
  markers of every plot, the next-cell arrows and the cell inspector.

The time is the Python work on the server until all Bokeh models hold their new values
(one Document update, as in a session); the websocket transfer and the browser's drawing
are not included. Datasets:

- ``pancreas``: ``../shared/data/pancreas_endocrinogenesis_3696.h5ad`` preprocessed with
  ``explorer.pipeline.prepare`` (UMAP and latent time taken from scVelo's reference
  results, ``../shared/reference``), with a stochastic fit run through the app's job;
- ``200000``, ``1000000``: ``simulate(n_obs=N, n_vars=30, branches=2)`` with its
  noise-free abundances as ``Ms``/``Mu``, a two-armed synthetic embedding, the simulated
  time as latent time, a steady-state fit, and a kNN transition matrix on the embedding
  (a stand-in for the velocity graph, which is not what is measured here).

``--page-ready`` also starts ``explorer serve`` on the sample data in a subprocess and
times it until chromium shows the page. ``--screenshot PATH`` saves the pancreas page.

``--load N`` is the many-users scenario (:func:`load_scenario`): ``explorer serve`` in a
subprocess, one page opened first (the user who is already there), then ``N`` pages
opened at once in chromium (one browser context each, as separate users). The first
user's page is in a browser of its own and the server in a process session of its own
(``--first-browser separate --server-session own``, the defaults): on Linux each process
session is scheduled as one group (autogroup), so the server and the first user's browser
each get a share of the CPU as they would on their own machines, instead of competing
inside one group with the ``N`` loading pages (the first user's renderer) or with this
script and Playwright's driver (the server). ``--first-browser shared --server-session
shared`` is the set-up of the measurements before 2026-12-02 15:00 UTC. ``--burst-weight
SHARES`` runs the browser that loads the ``N`` pages (and every renderer it starts) in a
CPU cgroup of that weight (``cpu.shares``, 1024 being a normal process's; cgroup v1 and
root), so that the new users' browsers, which stand in for their own machines, take only
the CPU the server and the first user leave idle. It reports
each page's seconds until usable (the cell inspector's text and the plots drawn) and
until complete (the gene-over-time view and the sidebar's Run button shown too), the latency of gene clicks on the first page while the ``N`` pages load (click a row
of the gene table until the phase portrait's header names the gene), and the server's
resident memory (``/proc/<pid>/status``): idle after the first page, peak, and each
second for ``--settle`` seconds after every page closed. Each click while the pages load
is also timed inside the page (from its click event to the painted frame, the page's own
clock): the time seen from here adds this script's round trips through the browser
process, which creates the other pages' contexts meanwhile. ``--rounds`` repeats the
open-and-close to show whether memory comes back every time. ``--sizes`` with no
value skips the latency part. Each round also reports the CPU seconds the server and
every chromium process (renderers, browser, GPU process...) spent from the burst's start
until its last page was usable (``cpu_s_until_last_usable``, read from ``/proc/<pid>/stat``):
on a shared machine that figure moves far less with other work than the wall time, and on
2 cores the last page cannot be usable much before half of it.

How a page is seen to be ready, or a click answered (``--probe``): ``js`` (default) runs one
small script in the page every 100 ms that walks the page's elements, shadow roots
included, and checks what a user would look for (for a click: on every animation frame,
reading only the phase portrait's header, found once); ``locator`` waits with
Playwright's text and CSS locators, as the measurements before did. The locators re-run
their text search through the page's ~4,500 elements on every animation frame while they
wait, which cost each loading page about a second of chromium's CPU in a burst of 8: the
observer's load, not the app's, and no user's browser carries it.

Usage::

    python benchmarks/bench_app.py [--sizes pancreas 200000 1000000] [--repeats 15]
        [--page-ready] [--screenshot assets/app.png] [--out benchmarks/results/app.json]
    python benchmarks/bench_app.py --sizes --load 8 [--rounds 2] [--load-data FILE]
        [--probe js|locator] [--first-browser separate|shared] [--server-session own|shared]
        [--burst-weight SHARES] [--trace TRACE.log] [--out benchmarks/results/app_load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EXPLORER_SHARED", ROOT.parent / "shared"))
PANCREAS = SHARED / "data" / "pancreas_endocrinogenesis_3696.h5ad"
PANCREAS_REFERENCE = SHARED / "reference" / "pancreas_3696_scvelo_cells.csv"
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def pancreas():
    """The real pancreas, preprocessed, with scVelo's UMAP and latent time, and a stochastic fit."""
    import pandas as pd

    from explorer.app.state import ExplorerState
    from explorer.data.io import read
    from explorer.pipeline import prepare
    from explorer.keys import Key

    adata = read(PANCREAS)
    prepare(adata, compute_umap=False, seed=0)
    ref = pd.read_csv(PANCREAS_REFERENCE, index_col=0).reindex(adata.obs_names)
    adata.obsm[Key.obsm.UMAP] = ref[["umap_1", "umap_2"]].to_numpy(np.float32)
    adata.obs[Key.obs.LATENT_TIME] = ref["latent_time"].to_numpy(np.float32)
    state = ExplorerState(adata, dataset="pancreas")
    job = state.run_model("stochastic")
    job.join()
    return adata, state.results


def synthetic(n_obs: int, *, n_vars: int = 30, n_neighbors: int = 10, seed: int = 0):
    """Simulated cells on a synthetic two-armed embedding, with a steady-state fit (see module doc)."""
    import pandas as pd
    from scipy import sparse
    from sklearn.neighbors import NearestNeighbors

    from explorer.app.jobs import Fit, fit_key
    from explorer.data.simulate import simulate
    from explorer.graph.projection import project_velocity
    from explorer.graph.streamlines import compute_streamlines
    from explorer.keys import Key
    from explorer.models.steady_state import SteadyState

    adata = simulate(n_obs=n_obs, n_vars=n_vars, seed=seed, branches=2)
    adata.layers[Key.layers.MS] = np.asarray(adata.layers[Key.layers.TRUE_S], dtype=np.float32)
    adata.layers[Key.layers.MU] = np.asarray(adata.layers[Key.layers.TRUE_U], dtype=np.float32)
    for layer in (
        Key.layers.SPLICED,
        Key.layers.UNSPLICED,
        Key.layers.TRUE_S,
        Key.layers.TRUE_U,
        Key.layers.TRUE_VELOCITY,
    ):
        del adata.layers[layer]
    rng = np.random.default_rng(seed)
    t = adata.obs[Key.obs.TRUE_T].to_numpy()
    t = (t - t.min()) / (t.max() - t.min())
    lineage = pd.Categorical(adata.obs[Key.obs.TRUE_LINEAGE]).codes
    angle = np.where(lineage == lineage.max(), 0.5, -0.5) * np.clip(t - 0.4, 0, None) * 3
    xy = np.column_stack([10 * t * np.cos(angle), 10 * t * np.sin(angle)]) + rng.normal(
        scale=0.15, size=(n_obs, 2)
    )
    adata.obsm[Key.obsm.UMAP] = xy.astype(np.float32)
    adata.obs[Key.obs.LATENT_TIME] = t.astype(np.float32)
    result = SteadyState().fit(adata)
    knn = NearestNeighbors(n_neighbors=n_neighbors).fit(xy)
    dist, idx = knn.kneighbors(xy)
    # forward in simulated time: a stand-in velocity graph that gives a realistic sparsity
    ahead = np.clip(t[idx] - t[:, None], 0, None) + 1e-3
    weights = ahead / ahead.sum(axis=1, keepdims=True)
    transitions = sparse.csr_matrix(
        (weights.ravel(), idx.ravel(), np.arange(0, n_obs * n_neighbors + 1, n_neighbors)),
        shape=(n_obs, n_obs),
    )
    v_emb = np.asarray(project_velocity(transitions, adata.obsm[Key.obsm.UMAP]))
    fit = Fit(
        label="steady_state",
        key=fit_key("steady_state", {}),
        result=result,
        transitions=transitions,
        velocity_embedding={Key.obsm.UMAP: v_emb},
        streamlines={Key.obsm.UMAP: compute_streamlines(adata.obsm[Key.obsm.UMAP], v_emb)},
    )
    del dist
    return adata, {fit.label: fit}


def build_page(adata, results):
    """A page on a Bokeh document, every plot rendered, with ``results`` as the session's fits."""
    from bokeh.document import Document
    from panel.io.state import set_curdoc

    from explorer.app.main import create_app

    doc = Document()
    with set_curdoc(doc):
        page = create_app(adata)
        app = page.app
        state = app.state
        for p in (state.param.model, state.param.compare_a, state.param.compare_b):
            p.objects = list(results)
        state.param.update(results=results, model=next(iter(results)), compare_a=next(iter(results)))
        page.server_doc(doc)
    return doc, page, app


class _Clock:
    """Wall and CPU milliseconds of a block: ``with clock("gene click"): ...``.

    CPU time (this process, all threads) is reported beside the wall time because the
    development machines are shared: other processes stretch the wall time, not the work.
    """

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self._name = ""

    def __call__(self, name: str) -> _Clock:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def __exit__(self, *exc: object) -> None:
        self.wall.setdefault(self._name, []).append(1e3 * (time.perf_counter() - self._t0))
        self.cpu.setdefault(self._name, []).append(1e3 * (time.process_time() - self._c0))


def time_clicks(doc, app, *, repeats: int, seed: int = 0) -> _Clock:
    """Milliseconds per gene click and per cell click (also with the embedding coloured by the gene)."""
    from panel.io.state import set_curdoc

    from explorer.app.state import COLOR_EXPRESSION

    state, views = app.state, app.views
    rng = np.random.default_rng(seed)
    xy = state.embedding()
    table = views["genes"].table
    clock = _Clock()
    with set_curdoc(doc):
        # one of each first: lazy caches (column means, colour keys) are filled on first use
        views["genes"]._clicked(SimpleNamespace(row=1, column="gene"))
        views["embedding"].scatter._tapped(x=float(xy[0, 0]), y=float(xy[0, 1]))
        for _ in range(repeats):
            row = int(rng.integers(len(table.value)))
            with clock("gene click"):
                views["genes"]._clicked(SimpleNamespace(row=row, column="gene"))
            cell = int(rng.integers(len(xy)))
            with clock("cell click"):
                views["embedding"].scatter._tapped(x=float(xy[cell, 0]), y=float(xy[cell, 1]))
        state.color_by = COLOR_EXPRESSION
        for _ in range(repeats):
            row = int(rng.integers(len(table.value)))
            with clock("gene click, embedding coloured by gene"):
                views["genes"]._clicked(SimpleNamespace(row=row, column="gene"))
    return clock


#: how readiness is observed in the browser (``--probe``): ``"js"`` or ``"locator"``
PROBE = "js"

#: the page is usable: the cell inspector's text, two plot canvases and a gene-table row are shown
_READY_JS = """() => {
  let canvases = 0, rows = 0, inspector = false;
  const shown = (el) => el.offsetWidth > 0 && el.offsetHeight > 0;
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.shadowRoot) walk(el.shadowRoot);
      const c = el.classList;
      if (c.contains('bk-Canvas')) { if (shown(el)) canvases++; }
      else if (c.contains('tabulator-row')) { if (shown(el)) rows++; }
      else if (!inspector && el.childElementCount === 0 && el.textContent.includes('No cell selected')) {
        inspector = true;
      }
    }
  };
  walk(document);
  return canvases >= 2 && rows >= 1 && inspector;
}"""

#: the whole page is built: the gene-over-time view too (its three plots, five plot canvases in all,
#: or its note that the fit has no latent time), and the sidebar's Run button
_COMPLETE_JS = """() => {
  let canvases = 0, run = false, notime = false;
  const shown = (el) => el.offsetWidth > 0 && el.offsetHeight > 0;
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.shadowRoot) walk(el.shadowRoot);
      if (el.classList.contains('bk-Canvas')) { if (shown(el)) canvases++; }
      else if (!run && el.tagName === 'BUTTON' && el.textContent.trim() === 'Run' && shown(el)) run = true;
      else if (!notime && el.childElementCount === 0 && el.textContent.startsWith('No latent time yet')) {
        notime = true;
      }
    }
  };
  walk(document);
  return (canvases >= 5 || notime) && run;
}"""

#: the phase portrait's header names ``gene`` ("Gene <gene> — fit: ..."). The header's shadow root
#: is found once by a walk of the page and kept; each poll then reads its paragraphs only (the
#: walk again if the header was replaced). Run on every animation frame, so a click is seen in
#: the frame that shows it (and counted until that frame is painted, :data:`_PAINTED_JS`): the
#: walk of the whole page every 50 ms it replaces cost the page about 20 ms of CPU a poll and
#: saw the header up to 50 ms late.
_HEADER_JS = """(gene) => {
  const find = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.shadowRoot) { const r = find(el.shadowRoot); if (r) return r; }
      if (el.tagName === 'P' && el.textContent.startsWith('Gene ')) return el.getRootNode();
    }
    return null;
  };
  let root = window.__explorerHeader;
  if (!root || !(root.host ? root.host.isConnected : root.isConnected)) {
    root = window.__explorerHeader = find(document);
    if (!root) return false;
  }
  for (const p of root.querySelectorAll('p')) {
    if (p.textContent.startsWith('Gene ' + gene + ' ')) return true;
  }
  return false;
}"""


#: resolves once the next frame has been painted: a callback of the frame after it
_PAINTED_JS = "() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))"

#: clicks the gene table's cell of ``gene`` and resolves, once the frame after the one that shows the
#: phase portrait's header naming the gene is painted, with the seconds this took on the page's clock
#: (the click, the header and the paint as :func:`_gene_click` has them, timed inside the page)
_IN_PAGE_CLICK_JS = """([gene, timeoutMs]) => new Promise((resolve, reject) => {
  const header = HEADER_JS;
  let cell = null;
  const find = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (cell) return;
      if (el.shadowRoot) find(el.shadowRoot);
      if (el.classList.contains('tabulator-cell') && el.getAttribute('tabulator-field') === 'gene'
          && el.closest('.tabulator-row') && el.textContent.trim() === gene) cell = el;
    }
  };
  find(document);
  if (!cell) { reject(new Error('no gene-table cell for ' + gene)); return; }
  const start = performance.now();
  cell.dispatchEvent(new MouseEvent('click', {bubbles: true, cancelable: true, composed: true}));
  const poll = () => {
    if (header(gene)) {
      requestAnimationFrame(() => requestAnimationFrame(() => resolve((performance.now() - start) / 1e3)));
    } else if (performance.now() - start > timeoutMs) {
      reject(new Error('the phase portrait did not show ' + gene));
    } else {
      requestAnimationFrame(poll);
    }
  };
  poll();
})""".replace("HEADER_JS", _HEADER_JS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_ready(
    *, screenshot: Path | None = None, data: str | None = None, data_dir: Path | None = None
) -> dict[str, float]:
    """Seconds from starting ``explorer serve`` until it listens, and until chromium shows the page."""
    from playwright.sync_api import sync_playwright

    proc, url, listening = _start_server(data, data_dir, stderr=subprocess.DEVNULL, timeout_s=120)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            opened = time.perf_counter()
            page.goto(url)
            if PROBE == "js":
                page.wait_for_function(_READY_JS, polling=100, timeout=60_000)
            else:
                page.get_by_text("No cell selected").wait_for(timeout=60_000)
                page.locator(".bk-Canvas").nth(1).wait_for(timeout=60_000)
            ready = time.perf_counter()
            if screenshot is not None:
                page.wait_for_timeout(1500)
                page.screenshot(path=screenshot, full_page=False)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
    # the total is launch to page shown, less the browser's own start-up
    return {
        "serve to listening (s)": listening,
        "page load in the browser (s)": ready - opened,
        "explorer serve to page ready (s)": listening + (ready - opened),
    }


async def _torch_loaded(pid: int, timeout_s: float) -> bool:
    """Wait (at most ``timeout_s``) until process ``pid`` has torch's library mapped; whether it has."""
    import asyncio

    deadline = time.perf_counter() + timeout_s
    while True:
        try:
            if "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                return True
        except OSError:
            return False
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.5)


def _cpu_by_process(server_pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of the server and of every chromium process this script started.

    Returns pid -> (kind, user + system seconds), read from ``/proc/<pid>/stat``; kinds:
    ``server``, ``renderer``, ``gpu-process``, ``utility``, ``zygote``, ``browser``
    (chromium's main process), ``crashpad``, ``other`` (playwright's driver and anything
    else below this script).
    """
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    stats: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        stats[pid] = (int(fields[11]) + int(fields[12])) / tick
    out: dict[int, tuple[str, float]] = {}
    if server_pid in stats:
        out[server_pid] = ("server", stats[server_pid])
    me = os.getpid()
    for pid, cpu in stats.items():
        ancestor = parents.get(pid)
        while ancestor not in (None, 0, 1, me):
            ancestor = parents.get(ancestor)
        if ancestor != me or pid == server_pid:
            continue
        try:
            # chromium's children rewrite their command line as one string with spaces
            cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").split()
        except OSError:
            continue
        name = Path(cmd[0].decode(errors="replace")).name if cmd else ""
        kind = "other"
        if "crashpad" in name:
            kind = "crashpad"
        elif name.startswith(("chromium", "chrome", "headless_shell")):
            kind = next((c.split(b"=", 1)[1].decode() for c in cmd if c.startswith(b"--type=")), "browser")
        out[pid] = (kind, cpu)
    return out


def _chromium_tree() -> set[int]:
    """The pids of every chromium process below this script (see :func:`_cpu_by_process`)."""
    return {pid for pid, (kind, _) in _cpu_by_process(-1).items() if kind not in ("other", "crashpad")}


#: the report's entry for ``--burst-weight``
BURST_WEIGHT_KEY = "burst browser's CPU weight"

#: cgroup v1's CPU controller, where ``--burst-weight`` makes a group for the loading pages' browser
_CPU_CGROUP = Path("/sys/fs/cgroup/cpu")


def _weigh_down(pids: set[int], shares: int) -> Path | None:
    """Put ``pids`` in a new CPU cgroup of ``shares`` (1024: a normal process's weight); None if not allowed.

    Processes they start later (chromium's renderers, forked by its zygote) are in it too.
    Needs cgroup v1's ``cpu`` controller and root (Linux); without them the run goes on at
    equal weights and says so.
    """
    group = _CPU_CGROUP / f"explorer-bench-burst-{os.getpid()}"
    try:
        group.mkdir()
        (group / "cpu.shares").write_text(str(shares))
        for pid in sorted(pids):
            try:
                (group / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:
                pass
    except OSError as err:
        print(f"--burst-weight: no CPU cgroup could be made here ({err}); the browsers keep equal weights")
        return None
    return group


def _drop_group(group: Path | None) -> None:
    """Move what is left in ``group`` back to the root group and remove it."""
    if group is None:
        return
    try:
        for pid in (group / "cgroup.procs").read_text().split():
            try:
                (_CPU_CGROUP / "cgroup.procs").write_text(pid)
            except ProcessLookupError:
                pass
        group.rmdir()
    except OSError as err:
        print(f"--burst-weight: could not remove {group}: {err}")


def _cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two :func:`_cpu_by_process` readings, by kind (and ``total``).

    A process that started in between counts from zero; one that ended in between is lost
    (chromium's pages are closed only after the readings).
    """
    spent: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        spent[kind] = spent.get(kind, 0.0) + cpu - (before[pid][1] if pid in before else 0.0)
    spent["chromium"] = sum(v for k, v in spent.items() if k not in ("server", "other", "crashpad"))
    spent["total"] = spent["chromium"] + spent.get("server", 0.0)
    return {k: round(v, 2) for k, v in sorted(spent.items())}


async def _rss_steady(pid: int, timeout_s: float, *, within_mb: float = 1.0, for_s: float = 3.0) -> bool:
    """Wait (at most ``timeout_s``) until process ``pid``'s RSS moved less than ``within_mb`` in ``for_s``."""
    import asyncio

    deadline = time.perf_counter() + timeout_s
    readings: list[tuple[float, float]] = []
    while time.perf_counter() < deadline:
        now = time.perf_counter()
        try:
            readings.append((now, _rss_mb(pid)))
        except OSError:
            return False
        recent = [m for t, m in readings if t >= now - for_s]
        if readings[0][0] <= now - for_s and max(recent) - min(recent) < within_mb:
            return True
        await asyncio.sleep(0.5)
    return False


def _rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _start_server(
    data: str | None,
    data_dir: Path | None,
    *,
    stderr: int = subprocess.PIPE,
    timeout_s: float = 300,
    own_session: bool = True,
    trace: Path | None = None,
) -> tuple[subprocess.Popen, str, float]:
    """``explorer serve`` in a subprocess on a free port; returns it, its URL and seconds to listen.

    ``stderr``: ``subprocess.PIPE`` keeps the server's log for the caller to read after
    stopping it (``communicate``); ``subprocess.DEVNULL`` drops it. With ``own_session``
    the server runs in a process session of its own, as one started from its own
    terminal or by a service manager does: Linux's autogroup scheduler then gives it its
    own share of the CPU instead of splitting one share with this script and
    Playwright's driver (the observers), which are busy creating the pages' contexts
    during a burst. With
    ``trace`` the server runs through ``trace_serve.py``, which logs its event loop there.
    """
    port = _free_port()
    explorer = Path(sys.executable).with_name("explorer")
    cmd = [str(explorer), "serve", "--port", str(port)]
    if trace is not None:
        cmd = [sys.executable, str(Path(__file__).with_name("trace_serve.py")), str(trace), *cmd[1:]]
    if data is not None:
        cmd += [data, "--data-dir", str(data_dir)]
    start = time.perf_counter()
    proc = subprocess.Popen(  # noqa: S603
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        cwd=data_dir or ROOT,
        text=True,
        start_new_session=own_session,
    )
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.perf_counter() - start > timeout_s:
                proc.kill()
                msg = f"explorer serve did not come up (exit code {proc.poll()})"
                raise RuntimeError(msg) from None
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}/", time.perf_counter() - start


def _stop_server(proc: subprocess.Popen) -> str:
    """Stop a server from :func:`_start_server`; returns what it wrote to stderr (if piped)."""
    proc.terminate()
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    return stderr or ""


async def _open_page(browser, url: str, timeout_ms: float):
    """Open ``url`` in a new context (a separate user); returns the page and seconds until usable.

    ``page.complete`` is then a task giving the seconds until the whole page is built.
    """
    import asyncio

    context = await browser.new_context(viewport={"width": 1600, "height": 1400})
    page = await context.new_page()
    start = time.perf_counter()
    await page.goto(url, timeout=timeout_ms)
    if PROBE == "js":
        await page.wait_for_function(_READY_JS, polling=100, timeout=timeout_ms)
    else:
        await page.get_by_text("No cell selected").wait_for(timeout=timeout_ms)
        # the embedding, the phase portrait and the gene table are drawn
        await page.locator(".bk-Canvas").nth(1).wait_for(timeout=timeout_ms)
        await page.locator(".tabulator-row").first.wait_for(timeout=timeout_ms)
    ready = time.perf_counter() - start

    async def complete() -> float:
        # every part built (the time plots and the sidebar come after the usable parts)
        await page.wait_for_function(_COMPLETE_JS, polling=100, timeout=timeout_ms)
        return time.perf_counter() - start

    page.complete = asyncio.ensure_future(complete())
    return page, ready


async def _gene_click(page, row: int, timeout_ms: float) -> float:
    """Click row ``row`` of the gene table; seconds until the phase portrait's header names the gene."""
    cell = page.locator('.tabulator-row .tabulator-cell[tabulator-field="gene"]').nth(row)
    gene = (await cell.inner_text()).strip()
    start = time.perf_counter()
    # a click event on the cell itself (what Tabulator listens to): the pointer can be covered
    # for a moment by a layout that is still filling in
    await cell.dispatch_event("click")
    if PROBE == "js":
        await page.wait_for_function(_HEADER_JS, arg=gene, polling="raf", timeout=timeout_ms)
        # and until the frame that shows the header is painted (the plots' new images with it)
        await page.evaluate(_PAINTED_JS)
    else:
        await page.get_by_text(f"Gene {gene} ").first.wait_for(timeout=timeout_ms)
    return time.perf_counter() - start


async def _gene_click_in_page(page, row: int, timeout_ms: float) -> tuple[float, float]:
    """Like :func:`_gene_click`, timed both from here and on the page's own clock.

    Returns the seconds seen here and the seconds inside the page, from the click event
    to the painted frame. The first also holds the round trips from this script to the
    page through the browser process: while the browser process creates pages for other
    users (the load scenario's burst) they took up to 3 s before the page ran the click,
    and as long again to bring back its result, time in which the page itself had
    already answered. A user's own click does not wait for another user's browser.
    """
    cell = page.locator('.tabulator-row .tabulator-cell[tabulator-field="gene"]').nth(row)
    gene = (await cell.inner_text()).strip()
    start = time.perf_counter()
    in_page = await page.evaluate(_IN_PAGE_CLICK_JS, [gene, timeout_ms])
    return time.perf_counter() - start, in_page


async def _load_round(
    browser, url: str, n_pages: int, first, *, timeout_s: float, server_pid: int | None = None
) -> dict[str, object]:
    """Open ``n_pages`` at once while clicking genes on ``first``; returns the timings.

    With ``server_pid``, also the CPU seconds the server and chromium spent from the
    burst's start until its last page was usable (:func:`_cpu_spent`).
    """
    import asyncio

    timeout_ms = timeout_s * 1e3
    cpu_start = _cpu_by_process(server_pid) if server_pid is not None else None
    cpu_usable: dict[str, float] = {}
    tasks = [asyncio.ensure_future(_open_page(browser, url, timeout_ms)) for _ in range(n_pages)]

    def page_usable(_task: object) -> None:
        if cpu_start is not None and not cpu_usable and all(t.done() for t in tasks):
            cpu_usable.update(_cpu_spent(cpu_start, _cpu_by_process(server_pid)))

    for task in tasks:
        task.add_done_callback(page_usable)
    clicks: list[float] = []
    clicks_in_page: list[float] = []
    row = 0
    while not all(t.done() for t in tasks):
        row = (row + 1) % 6
        if PROBE == "js":
            seen, in_page = await _gene_click_in_page(first, row, timeout_ms)
            clicks_in_page.append(in_page)
        else:
            seen = await _gene_click(first, row, timeout_ms)
        clicks.append(seen)
        await asyncio.sleep(0.2)
    opened = [t.result() for t in tasks]
    complete = [await page.complete for page, _ in opened]
    # one click on each new page, now that it is usable
    new_clicks = [await _gene_click(page, 2, timeout_ms) for page, _ in opened]
    for page, _ in opened:
        await page.context.close()
    return {
        "ready_s": [ready for _, ready in opened],
        "complete_s": complete,
        "clicks_while_loading_s": clicks,
        "clicks_while_loading_in_page_s": clicks_in_page,
        "first_click_on_new_pages_s": new_clicks,
        "cpu_s_until_last_usable": cpu_usable,
    }


def load_scenario(
    *,
    n_pages: int = 8,
    rounds: int = 1,
    settle_s: float = 60.0,
    data: str | None = None,
    data_dir: Path | None = None,
    timeout_s: float = 300.0,
    first_browser: str = "separate",
    server_session: str = "own",
    trace: Path | None = None,
    burst_weight: int | None = None,
) -> dict[str, object]:
    """Many users at once on one ``explorer serve`` process (see the module docstring).

    ``first_browser``: ``"separate"`` opens the first user's page in a browser of its own
    (each browser Playwright starts is its own process session, so the kernel's autogroup
    scheduler gives it its own share of the CPU, as a user's own machine would);
    ``"shared"`` opens it in the browser that also loads the ``N`` new pages, where its
    renderer competes with theirs for the CPU. ``server_session``: ``"own"`` starts the
    server in a process session of its own (:func:`_start_server`), ``"shared"`` in this
    script's. ``trace``: the server's event-loop trace goes there (``trace_serve.py``).
    ``burst_weight``: the browser that loads the ``N`` pages runs in a CPU cgroup of that
    weight (``cpu.shares``; 1024 is a normal process's), standing in for the new users'
    own machines; the server and the first user's browser keep the normal weight.
    """
    import asyncio
    import threading

    from playwright.async_api import async_playwright

    proc, url, listening = _start_server(data, data_dir, own_session=server_session == "own", trace=trace)
    samples: list[tuple[float, float]] = []
    groups: list[Path | None] = []  # the burst browser's CPU cgroup (burst_weight)
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not stop.is_set() and proc.poll() is None:
            samples.append((time.perf_counter() - t0, _rss_mb(proc.pid)))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    async def run() -> dict[str, object]:
        out: dict[str, object] = {"rounds": []}
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            if burst_weight is not None:
                if first_browser != "separate":
                    raise SystemExit("--burst-weight needs --first-browser separate")
                groups.append(_weigh_down(_chromium_tree(), burst_weight))
                out[BURST_WEIGHT_KEY] = burst_weight if groups[-1] is not None else None
            own = first_browser == "separate"
            first_user = (
                await p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS) if own else browser
            )
            first, first_ready = await _open_page(first_user, url, timeout_s * 1e3)
            await first.complete
            await _gene_click(first, 5, timeout_s * 1e3)  # warm: the first click imports what it needs
            await asyncio.sleep(5)
            # the served process imports torch in the background once the pages are idle
            # (explorer.app.main.configure_process): the idle level is read after it, or a
            # late import lands between this reading and the one after the close
            out["torch loaded before the idle reading"] = await _torch_loaded(proc.pid, 60)
            # torch's library is mapped when its import starts, not when it ends: one idle
            # reading taken right then was 20 MB under the others (535 against 555 MB)
            out["rss steady before the idle reading"] = await _rss_steady(proc.pid, 30)
            out["first page ready (s)"] = first_ready
            out["rss idle with one page (MB)"] = _rss_mb(proc.pid)
            for _ in range(rounds):
                begin = time.perf_counter() - t0
                result = await _load_round(
                    browser, url, n_pages, first, timeout_s=timeout_s, server_pid=proc.pid
                )
                closed = time.perf_counter() - t0
                await asyncio.sleep(settle_s)
                result["rss peak (MB)"] = max(m for t, m in samples if t >= begin)
                after = [(t - closed, m) for t, m in samples if t >= closed]
                result["rss after close (MB)"] = {
                    f"{int(s)} s": next((m for t, m in after if t >= s), after[-1][1] if after else float("nan"))
                    for s in (5, 30, settle_s - 1)
                }
                result["rss trace after close (s, MB)"] = [(round(t, 1), round(m)) for t, m in after[::5]]
                out["rounds"].append(result)
            await first.context.close()
            if own:
                await first_user.close()
            await browser.close()
        return out

    try:
        report = asyncio.run(run())
    finally:
        for group in groups:
            _drop_group(group)
        stop.set()
        stderr = _stop_server(proc)
    report["serve to listening (s)"] = listening
    report["first user's browser"] = first_browser
    report["server's process session"] = server_session
    report["pages"] = n_pages
    report["settle (s)"] = settle_s
    report["server errors logged"] = [
        line for line in stderr.splitlines() if "Error" in line or "Traceback" in line or "exception" in line
    ]
    return report


def print_load(report: dict[str, object]) -> None:
    """Print the load scenario as a Markdown table, one row per round."""
    first_browser = report.get("first user's browser", "shared")
    server_session = report.get("server's process session", "shared")
    print(
        f"\nfirst page ready: {report['first page ready (s)']:.1f} s; "
        f"server RSS idle with one page: {report['rss idle with one page (MB)']:.0f} MB "
        f"(torch loaded: {report['torch loaded before the idle reading']}, "
        f"RSS steady: {report.get('rss steady before the idle reading')}); "
        f"the first user's browser: {first_browser}; the server's process session: {server_session}; "
        f"the loading pages' browser's CPU weight: {report.get(BURST_WEIGHT_KEY) or 'normal'}"
    )
    n = report["pages"]
    print(
        f"\n| round | {n} pages: all ready (s) | median ready (s) | all complete (s) | gene clicks while "
        "loading: median / max (s) | the same clicks timed in the page: median / max (s) | "
        "first click on a new page: max (s) | RSS peak (MB) | "
        f"RSS 5 s / {report['settle (s)']:.0f} s after close (MB) |\n|---|---|---|---|---|---|---|---|---|"
    )
    for i, r in enumerate(report["rounds"], 1):
        ready, clicks = r["ready_s"], r["clicks_while_loading_s"] or [float("nan")]
        in_page = r.get("clicks_while_loading_in_page_s") or [float("nan")]
        after = list(r["rss after close (MB)"].values())
        print(
            f"| {i} | {max(ready):.1f} | {statistics.median(ready):.1f} | {max(r['complete_s']):.1f} | "
            f"{statistics.median(clicks):.2f} / {max(clicks):.2f} "
            f"({len(r['clicks_while_loading_s'])} clicks) | "
            f"{statistics.median(in_page):.2f} / {max(in_page):.2f} | "
            f"{max(r['first_click_on_new_pages_s']):.2f} | {r['rss peak (MB)']:.0f} | "
            f"{after[0]:.0f} / {after[-1]:.0f} |"
        )
    for i, r in enumerate(report["rounds"], 1):
        if r.get("cpu_s_until_last_usable"):
            print(f"round {i}: CPU seconds until the last page was usable: {r['cpu_s_until_last_usable']}")
    if report["server errors logged"]:
        print("\nserver errors logged:\n" + "\n".join(report["server errors logged"]))


def screenshot_page(adata, results, path: Path) -> None:
    """Serve ``adata`` with ``results`` in-process and save a screenshot of the page with a cell selected."""
    import threading

    import panel as pn
    from playwright.sync_api import sync_playwright

    from explorer.app.main import create_app

    port = _free_port()

    def session():
        page = create_app(adata, name="pancreas (Bastidas-Ponce et al. 2019)")
        state = page.app.state
        for p in (state.param.model, state.param.compare_a, state.param.compare_b):
            p.objects = list(results)
        state.param.update(results=results, model=next(iter(results)))
        state.select_gene("Cpe" if "Cpe" in adata.var_names else str(adata.var_names[0]))
        state.select_cell(int(np.argmax(adata.obsm["X_umap"][:, 0])) // 2)
        return page

    server = pn.serve(session, port=port, show=False, start=False, threaded=False)
    thread = threading.Thread(target=server.io_loop.start, daemon=True)
    server.start()
    thread.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1180})
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_text("latent time:").wait_for(timeout=60_000)
            page.wait_for_timeout(2500)
            page.screenshot(path=path)
            browser.close()
    finally:
        server.io_loop.add_callback(server.stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["pancreas", "200000", "1000000"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--page-ready", action="store_true")
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--load", type=int, default=0, metavar="N", help="open N pages at once (0: skip)")
    parser.add_argument("--rounds", type=int, default=1, help="open and close the N pages this often")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds to watch memory after closing")
    parser.add_argument("--load-data", type=Path, default=None, help="dataset to serve (default: the sample)")
    parser.add_argument(
        "--probe",
        choices=("js", "locator"),
        default="js",
        help="how readiness is observed: a script polled in the page, or Playwright's locators (see above)",
    )
    parser.add_argument(
        "--first-browser",
        choices=("separate", "shared"),
        default="separate",
        help="the first user's page in a browser of its own (default) or in the one loading the N pages",
    )
    parser.add_argument(
        "--server-session",
        choices=("own", "shared"),
        default="own",
        help="the server in a process session of its own (default, as deployed) or in this script's",
    )
    parser.add_argument(
        "--burst-weight",
        type=int,
        default=None,
        metavar="SHARES",
        help="run the browser that loads the N pages in a CPU cgroup of this weight (1024: normal; root)",
    )
    parser.add_argument(
        "--trace",
        type=Path,
        default=None,
        metavar="FILE",
        help="serve through benchmarks/trace_serve.py, logging the server's event loop to FILE",
    )
    args = parser.parse_args(argv)
    global PROBE  # noqa: PLW0603 - one run, one way of observing
    PROBE = args.probe

    from explorer.app.main import configure_process

    configure_process(background=False)
    report: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "latency_ms": {},
    }
    rows = []
    for size in args.sizes:
        t0 = time.perf_counter()
        adata, results = pancreas() if size == "pancreas" else synthetic(int(size))
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        doc, page, app = build_page(adata, results)
        build = time.perf_counter() - t0
        clock = time_clicks(doc, app, repeats=args.repeats)
        name = (
            f"pancreas ({adata.n_obs:,} cells)" if size == "pancreas" else f"simulated {adata.n_obs:,} cells"
        )
        summary = {
            k: {
                "median": statistics.median(v),
                "p90": float(np.percentile(v, 90)),
                "cpu_median": statistics.median(clock.cpu[k]),
            }
            for k, v in clock.wall.items()
        }
        report["latency_ms"][name] = {**summary, "page build (s)": build, "data set-up (s)": setup}
        for k, v in summary.items():
            rows.append(f"| {name} | {k} | {v['median']:.0f} | {v['p90']:.0f} | {v['cpu_median']:.0f} |")
        print(
            f"{name}: build {build:.1f} s; "
            + "; ".join(f"{k} {v['median']:.0f} ms" for k, v in summary.items()),
            flush=True,
        )
        if size == "pancreas" and args.screenshot is not None:
            screenshot_page(adata, results, args.screenshot)
        del doc, page, app, adata, results
    print("\n| data | action | median wall (ms) | p90 wall (ms) | median CPU (ms) |\n|---|---|---|---|---|")
    print("\n".join(rows))
    if args.load:
        data, folder = (
            (args.load_data.name, args.load_data.resolve().parent) if args.load_data else (None, None)
        )
        load = load_scenario(
            n_pages=args.load,
            rounds=args.rounds,
            settle_s=args.settle,
            data=data,
            data_dir=folder,
            first_browser=args.first_browser,
            server_session=args.server_session,
            trace=args.trace,
            burst_weight=args.burst_weight,
        )
        load["data"] = str(args.load_data) if args.load_data else "sample dataset"
        load["probe"] = PROBE
        report["load"] = load
        print_load(load)
    if args.page_ready:
        ready = page_ready()
        report["page_ready_s"] = ready
        print("\n" + "\n".join(f"{k}: {v:.2f}" for k, v in ready.items()))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
