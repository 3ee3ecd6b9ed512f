"""The app: ``create_app()`` builds one browser session's page; ``panel serve`` runs this file.

``panel serve explorer/app/main.py`` shows the bundled sample dataset; the environment
variables ``EXPLORER_DATA`` (a dataset file under the data directory) and
``EXPLORER_DATA_DIR`` (the only folder the app reads from or writes to, default: the
current directory) choose others. ``explorer serve`` (:func:`explorer.app.server.serve`)
sets both from its arguments.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import os
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import holoviews as hv
import panel as pn
import param
from anndata import AnnData

from explorer._types import InputError
from explorer.app import plots
from explorer.app.escape import markdown_text
from explorer.app.files import is_dataset, resolve_under
from explorer.app.jobs import configure_torch
from explorer.app.resources import divider, keep_stylesheets, use_local_resources
from explorer.app.state import ExplorerState, load_dataset
from explorer.app.views import (
    CellInspector,
    ComparisonView,
    DatasetPicker,
    EmbeddingView,
    ExportView,
    GeneBrowser,
    GeneTimeView,
    ModelRunner,
    PhasePortrait,
)
from explorer.data.samples import load_sample, sample_path

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from bokeh.document import Document

logger = logging.getLogger(__name__)

ENV_DATA = "EXPLORER_DATA"
ENV_DATA_DIR = "EXPLORER_DATA_DIR"
TITLE = "explorer — RNA velocity"


#: without a browser session to wait for, torch is imported this long after start-up
_TORCH_IMPORT_FALLBACK_S = 30.0

#: and this long after the first page has loaded in a browser
_TORCH_IMPORT_AFTER_LOAD_S = 2.0

#: then once no page has sent anything for this long (the import holds the interpreter
#: for a second or two: a click during it waited that long), or after the second delay anyway
_TORCH_IMPORT_IDLE_S = 3.0
_TORCH_IMPORT_IDLE_MAX_S = 60.0

_torch_wanted = threading.Event()


def use_canvas_rendering() -> None:
    """Draw plots on a 2D canvas rather than WebGL (HoloViews' default since 1.18).

    Our plots hold at most a few thousand glyphs (the embedding is a datashader
    image), which a canvas draws at once. WebGL costs each page a GL context: browsers
    allow only about 16 of them per process, and without a GPU (a headless browser,
    a remote desktop) it runs in software. Measured in chromium on 2 cores, 8 pages
    opened at once took 64 s of browser CPU with WebGL.
    """
    hv.renderer("bokeh").webgl = False


#: Bokeh property defaults that are the same immutable value for every instance of a class
#: without a theme: ``(class, property name) -> value`` (see :func:`cache_bokeh_defaults`)
_BOKEH_DEFAULTS: dict[tuple[type, str], Any] = {}

_IMMUTABLE_DEFAULT = (type(None), bool, int, float, str)


def cache_bokeh_defaults() -> None:
    """Compute each Bokeh property's plain default once per model class, not at every read.

    Bokeh works a property's default out again each time an unset property is read
    (``PropertyDescriptor._get_default``: the class's overridden defaults merged over
    its MRO, then the value validated), and reading unset properties is most of what
    building and serialising a page does: every model's every property is read when it
    is sent. In an 8-page burst that was about a quarter of the server's CPU (cProfile of
    the served process). Cached here: defaults that are not themed for the instance,
    not made fresh per instance (Bokeh's "unstable" defaults: lists, models, functions,
    which it already keeps per instance), and immutable (None, bool, number, string), so
    every instance gets the value it would have got. Idempotent.
    """
    from bokeh.core.property.descriptors import PropertyDescriptor

    original = getattr(PropertyDescriptor, "_get_default", None)
    if original is None or not hasattr(PropertyDescriptor, "has_unstable_default"):
        logger.debug("Bokeh's PropertyDescriptor has changed: its defaults are not cached")
        return  # a Bokeh whose internals differ: every default computed as Bokeh does
    if getattr(original, "_explorer_cached", False):
        return

    def _get_default(self: PropertyDescriptor, obj: Any) -> Any:
        themed = obj.themed_values()
        if themed is not None and self.name in themed:
            return original(self, obj)
        key = (obj.__class__, self.name)
        try:
            return _BOKEH_DEFAULTS[key]
        except KeyError:
            pass
        value = original(self, obj)
        if type(value) in _IMMUTABLE_DEFAULT and not self.has_unstable_default(obj):
            _BOKEH_DEFAULTS[key] = value
        return value

    _get_default._explorer_cached = True  # type: ignore[attr-defined]
    PropertyDescriptor._get_default = _get_default  # type: ignore[method-assign]


def configure_process(*, background: bool = True, import_torch: bool = True) -> None:
    """Process-wide set-up for serving: import torch and give it one thread.

    Importing torch ahead keeps its second or so of import time off the first Run
    (:func:`explorer.app.jobs.configure_torch`). With ``background`` it is imported on a
    daemon thread, but only once the first page has loaded (or after
    ``_TORCH_IMPORT_FALLBACK_S``): imported at start-up it held the GIL against the
    server's imports and the first page build and made the page ~0.7 s slower to show.
    It then waits until the pages are idle (:func:`_pages_idle`; at most
    ``_TORCH_IMPORT_IDLE_MAX_S``): imported while a user clicked, it held that click
    (0.8 s for a gene of 10^6 cells).
    Plots are drawn on a canvas (:func:`use_canvas_rendering`), and Bokeh's plain
    property defaults are computed once per class (:func:`cache_bokeh_defaults`). Without
    ``import_torch`` torch is only marked for one thread, and imported at the first fit.
    """
    use_canvas_rendering()
    cache_bokeh_defaults()
    if not import_torch:
        configure_torch(now=False)
        return
    if not background:
        configure_torch()
        return

    configure_torch(now=False)

    def setup() -> None:
        _torch_wanted.wait(_TORCH_IMPORT_FALLBACK_S)
        deadline = time.monotonic() + _TORCH_IMPORT_IDLE_MAX_S
        while not _pages_idle() and time.monotonic() < deadline:
            time.sleep(0.25)
        configure_torch()

    threading.Thread(target=setup, name="explorer-import-torch", daemon=True).start()


def _pages_idle() -> bool:
    """Whether no page has sent anything for ``_TORCH_IMPORT_IDLE_S`` and none is being built."""
    quiet = page_gate.quiet_in() == 0 and time.monotonic() - page_gate.last_message > _TORCH_IMPORT_IDLE_S
    return quiet and not page_gate.waiting and _builder.idle()


def _want_torch_soon() -> None:
    """Let the background torch import start shortly (after the page's deferred parts render)."""
    if not _torch_wanted.is_set():
        timer = threading.Timer(_TORCH_IMPORT_AFTER_LOAD_S, _torch_wanted.set)
        timer.daemon = True
        timer.start()


def shared_dataset(data: str | Path | None, data_dir: str | Path) -> tuple[AnnData, str, Path | None]:
    """Load the dataset every session starts with, once per process (``pn.state.as_cached``).

    ``data`` is a file under ``data_dir`` or None for the bundled sample. Sessions share
    the object read-only.
    """
    if data is None:
        adata = pn.state.as_cached("explorer-sample-default", load_sample, name="default")
        return adata, "sample dataset", sample_path("default")
    path = resolve_under(data_dir, str(data))
    if not (path.is_file() or is_dataset(path)):
        folder = Path(data_dir).resolve()
        msg = f"Expected a dataset file {str(data)!r} in the data directory {folder}; it does not exist."
        raise InputError(msg)
    stat = path.stat()
    adata = pn.state.as_cached(
        f"explorer-data-{path}-{stat.st_mtime_ns}-{stat.st_size}", load_dataset, path=path
    )
    return adata, Path(str(data)).as_posix(), path


def prepare_dataset(data: str | Path | None, data_dir: str | Path) -> AnnData:
    """Load the dataset before the first page (``explorer serve``), and for an atlas also what every page shares.

    For a dataset drawn as images (more than :data:`~explorer.app.plots.DATASHADE_THRESHOLD`
    cells) a page is built once, off any session: datashader's kernels are compiled and
    what every session computes alike (the gene means, the stored fit's streamlines and
    velocity projection, the colourings) lands in the dataset's shared memo, so that the
    first user's page does not pay for it. At 10^6 cells that was most of the page's time.
    """
    adata, _, _ = shared_dataset(data, data_dir)
    if adata.n_obs > plots.DATASHADE_THRESHOLD:
        from bokeh.document import Document
        from panel.io.state import set_curdoc

        plots.warm_up()
        doc = Document()
        with set_curdoc(doc):
            page = create_app(data, data_dir=data_dir)
            page.get_root(doc)
            page.app.release()
    return adata


class SessionLife:
    """A browser session's link to its page: hands a worker's callbacks to it until the tab closes.

    Callbacks run on the server's event loop under the document's lock (as Bokeh's
    next-tick callbacks do), but through :meth:`dispatch`, which drops them once the
    tab has closed: a fit that reports progress after that must not touch a document
    whose websocket is gone (that was ``WebSocketClosedError: Task exception was never
    retrieved`` in the server log). :meth:`connection_lost` runs when the websocket
    closes, which is seconds before Bokeh destroys the session; it calls the
    ``on_close`` callbacks at once (the app's: cancel the running fit).
    """

    def __init__(self, doc: Document) -> None:
        from tornado.ioloop import IOLoop

        self._doc = weakref.ref(doc)
        self._loop = IOLoop.current()
        self.closed = threading.Event()
        self._on_close: list[Callable[[], None]] = []

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the event loop, without the document's lock) when the tab closes."""
        self._on_close.append(callback)

    def connection_lost(self, *_: Any) -> None:
        """The websocket closed (or the session was destroyed): stop sending, run the close callbacks."""
        if self.closed.is_set():
            return
        self.closed.set()
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - one failing clean-up must not stop the others
                logger.exception("clean-up of a closed session failed")

    @property
    def document(self) -> Document | None:
        """The session's document, while it exists."""
        return self._doc()

    def dispatch(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the session's next event-loop turn (document locked); dropped once the tab closed.

        Thread-safe: a worker thread hands its callbacks to the page this way.
        """
        if not self.closed.is_set():
            self._loop.add_callback(self.next_tick, fn)

    def next_tick(self, fn: Callable[[], None], *, after: Callable[[], None] | None = None) -> bool:
        """Schedule ``fn`` as a Bokeh next-tick callback of the document (call on the event loop).

        ``after`` runs once ``fn`` has run (or failed). Returns False, running neither,
        when the tab closed or the session is gone.
        """
        from panel.io.state import set_curdoc

        doc = self._doc()
        context = None if doc is None else doc.session_context
        if self.closed.is_set() or context is None or context.destroyed:
            return False

        def run() -> None:
            try:
                if not self.closed.is_set():
                    with set_curdoc(doc):
                        fn()
            finally:
                if after is not None:
                    after()

        try:
            doc.add_next_tick_callback(run)
        except Exception:  # noqa: BLE001 - the session ended meanwhile: nothing to update
            logger.debug("session gone; dropped a callback")
            return False
        return True


def session_dispatch(doc: Document | None) -> Callable[[Callable[[], None]], None] | None:
    """Send a worker thread's callbacks to ``doc``'s event loop (None outside a server session)."""
    if doc is None or doc.session_context is None:
        return None
    return SessionLife(doc).dispatch


class _Builder:
    """Builds the heavy parts of new pages one at a time, in order of arrival, between other work.

    One per server process. A page's plots take most of a session's start (about a
    second of CPU on the pancreas); built in one piece on the event loop, eight pages
    opened at once kept every other request, gene clicks included, waiting for all of
    them. Here the first request returns a light page at once, and each heavy part is
    one step on the event loop: parts needed to use a page (``priority`` 0) for every
    waiting page first, oldest page first, then the rest (the time plots). Between two
    steps the loop serves clicks and requests that arrived meanwhile: the next step
    starts once no websocket message has been in hand for a moment
    (:meth:`PageGate.quiet_in`), so that a click's callbacks, which Panel runs a few loop
    turns after its message, come before the next step rather than after it.
    """

    def __init__(self) -> None:
        self._queues: tuple[deque, deque] = (deque(), deque())
        self._current: object | None = None

    def add(self, life: SessionLife, step: Callable[[], None], *, priority: int = 0) -> None:
        """Queue ``step`` for ``life``'s page (call on the event loop)."""
        self._queues[priority].append((life, step, None))
        self._kick_soon()

    def add_page(self, life: SessionLife, steps: list[tuple[Callable[[], None], int]]) -> None:
        """Queue a page's ``(step, priority)`` parts (call on the event loop)."""
        for step, priority in steps:
            self._queues[priority].append((life, step, None))
        self._kick_soon()

    def _kick_soon(self) -> None:
        """Start the next step now if no websocket message is in hand, else once none is.

        Parts are queued while a message is handled (a page's "shown" message, a new
        dataset): started at once, a step ran ahead of the clicks that came meanwhile.
        """
        from tornado.ioloop import IOLoop

        if self._current is not None:
            return  # the step under way starts the next one when it ends
        if page_gate.quiet_in() == 0:
            self._kick()
        else:
            IOLoop.current().spawn_callback(self._kick_when_quiet)

    def idle(self) -> bool:
        """Whether no part of any page is queued or under way."""
        return self._current is None and not any(self._queues)

    def _next(self) -> tuple[SessionLife, Callable[[], None], int, float] | None:
        """Return the next step to build: its page, the step, its priority and when it was first due."""
        for priority, queue in enumerate(self._queues):
            while queue:
                life, step, since = queue.popleft()
                if not life.closed.is_set():
                    return life, step, priority, time.monotonic() if since is None else since
        return None

    def _kick(self) -> None:
        """Start the next step unless one is under way."""
        from tornado.ioloop import IOLoop

        while self._current is None and (item := self._next()) is not None:
            life, step, priority, since = item
            token = object()
            self._current = token
            run = self._when_free(life, step, priority, since)
            if life.next_tick(run, after=lambda token=token: self._done(token)):
                # a session destroyed before its step ran never runs it: go on after a while
                IOLoop.current().call_later(_STEP_TIMEOUT_S, self._done, token)
            else:
                self._current = None

    def _when_free(
        self, life: SessionLife, step: Callable[[], None], priority: int, since: float
    ) -> Callable[[], None]:
        """``step`` as the next-tick callback: put back at the head of its queue if a message came in first.

        A step is scheduled for the next loop turn; a click's first frame that arrived in
        between would otherwise wait for the whole step (0.3-1 s on a loaded machine). A
        step first scheduled more than :data:`_GATE_MAX_WAIT_S` ago runs anyway, so a
        page in constant use cannot hold the others' parts off for long.
        """

        def run() -> None:
            if page_gate.quiet_in() > 0 and time.monotonic() - since < _GATE_MAX_WAIT_S:
                self._queues[priority].appendleft((life, step, since))
                return
            try:
                step()
            except Exception:  # noqa: BLE001 - a broken part must not stop other pages
                logger.exception("building part of a page failed")

        return run

    def _done(self, token: object) -> None:
        from tornado.ioloop import IOLoop

        if token is self._current:
            self._current = None
            # let the loop read the sockets first, and finish the clicks that came meanwhile
            IOLoop.current().spawn_callback(self._kick_when_quiet)

    async def _kick_when_quiet(self) -> None:
        """Start the next step once no websocket message is in hand (:meth:`PageGate.until_quiet`)."""
        import asyncio

        await asyncio.sleep(_BUILD_GAP_S)
        await page_gate.until_quiet()
        self._kick()


#: pause between two build steps, for requests and clicks that arrived meanwhile
_BUILD_GAP_S = 0.005

#: a step not run after this long (its session ended first) no longer holds up the others
_STEP_TIMEOUT_S = 10.0

_builder = _Builder()


class PageGate:
    """Lets page requests build their first documents one at a time, after the clicks in flight.

    One per server process; ``explorer serve`` routes every page request
    (:meth:`enter`/:meth:`leave` around Panel's handler) and every websocket message
    (:meth:`message_started`/:meth:`message_done`) through it. A page request builds
    its document on the event loop in one piece (0.1-0.3 s of CPU, 1-2 s when the page
    is built whole), and Tornado runs requests that arrived together back to back: a
    burst of eight held a click on an open page for all of them (7 s under load). Here a
    request starts building only when no message is being handled and none has ended for
    :data:`_GATE_QUIET_S` (Panel runs a click's callbacks on a later loop turn, a property
    change after a 50 ms debounce), and at most :data:`_GATE_MAX_WAIT_S` after its turn
    came, so a busy page cannot hold new ones off for long. Requests still waiting tell
    :meth:`ExplorerApp._build_whole` that a burst is under way.
    """

    def __init__(self) -> None:
        self.waiting = 0
        self._busy = 0
        self._quiet_since = 0.0
        #: when a websocket message last ended (an open page in use)
        self.last_message = -float("inf")
        self._lock: Any = None

    async def enter(self) -> None:
        """Wait for this request's turn (call on the event loop); :meth:`leave` must follow."""
        import asyncio

        if self._lock is None:
            self._lock = asyncio.Lock()
        self.waiting += 1
        try:
            await self._lock.acquire()
            try:
                await self.until_quiet()
            except BaseException:
                self._lock.release()
                raise
        finally:
            self.waiting -= 1

    async def until_quiet(self) -> None:
        """Wait until no message has been in hand for :data:`_GATE_QUIET_S` (at most ``_GATE_MAX_WAIT_S``)."""
        import asyncio

        deadline = time.monotonic() + _GATE_MAX_WAIT_S
        while time.monotonic() < deadline and (wait := self.quiet_in()) > 0:
            await asyncio.sleep(wait)

    def quiet_in(self) -> float:
        """Seconds until no message will have been handled for :data:`_GATE_QUIET_S` (0: quiet now)."""
        if self._busy:
            return 0.01
        return max(_GATE_QUIET_S - (time.monotonic() - self._quiet_since), 0.0)

    def leave(self) -> None:
        """Let the next request in: this one's document is built and sent."""
        self._quiet_since = time.monotonic()
        self._lock.release()

    def message_started(self) -> None:
        """Count a websocket message (a click, a page's first pull) being handled."""
        self._busy += 1

    def message_done(self) -> None:
        """Count that message as handled."""
        self._busy -= 1
        self._quiet_since = self.last_message = time.monotonic()


#: a page request waits until no websocket message has been handled for this long
_GATE_QUIET_S = 0.08

#: and at most this long once its turn came
_GATE_MAX_WAIT_S = 1.0

page_gate = PageGate()


#: the parts of the Explore tab: name, view, build priority (0: needed to use the page)
_PARTS: tuple[tuple[str, type, int], ...] = (
    ("embedding", EmbeddingView, 0),
    ("phase", PhasePortrait, 0),
    ("genes", GeneBrowser, 0),
    ("inspector", CellInspector, 0),
    ("time", GeneTimeView, 1),
)

# A page opened alone is built whole into its first document, before the browser connects:
# the browser then lays it out and draws each plot once. Measured in chromium on 2 cores
# (sample data, pages opened one after another, CPU seconds per page, server and browser
# together): 4.25 s, against 4.9-5.8 s when the parts came one by one as patches of the
# shown page (the browser laid out and repainted the whole page after each). When other
# pages are opening or being built, the parts still come one by one through the builder,
# so that a burst of page requests does not hold the server, and other users' clicks, for
# all their plots: sent as one patch per page there, the 8-page burst was no faster (25.9 s
# against 25.5 s) and clicks waited longer (median 1.15 s against 0.68 s).

#: pages whose first document went out but which the browser has not shown yet, with the
#: time they were requested; one requested longer ago than ``_OPENING_S`` (a tab closed
#: while it loaded) no longer counts
_opening: weakref.WeakKeyDictionary[ExplorerApp, float] = weakref.WeakKeyDictionary()
_OPENING_S = 10.0

#: a page is built whole only if no open page sent anything for this long
_IN_USE_S = 10.0

#: room each part takes while it is built (width, height in pixels), so the page does not jump.
#: The layout is made for a 1600 x 1000 screen: the embedding, the phase portrait and the
#: gene-over-time plots above the fold; the gene table (wide enough for its columns) and
#: the cell inspector below them.
_PLACEHOLDER_SIZE = {
    "embedding": (580, 530),
    "phase": (500, 530),
    "genes": (_GENES_WIDTH := 860, 560),
    "inspector": (_INSPECTOR_WIDTH := 400, 300),
    "time": (1180, 320),
}


#: the header button's labels
_HIDE_SIDEBAR, _SHOW_SIDEBAR = "Hide sidebar", "Show sidebar"


def _placeholder(name: str) -> pn.Column:
    """The room of part ``name`` until it is built, with a still "Loading" line.

    Not an animated spinner: five of them per page kept the browser repainting for as
    long as the page loaded, which under load (many pages at once) cost each browser
    about a second of CPU more and slowed every page.
    """
    width, height = _PLACEHOLDER_SIZE[name]
    note = pn.pane.HTML("<span style='color:#888'>Loading…</span>", margin=(10, 10))
    return pn.Column(pn.Column(note, width=width, height=height))


class ExplorerApp:
    """One session's views around its :class:`ExplorerState`; ``page`` is what the browser shows.

    In a server session (``life`` given) a page opened alone is built whole into its
    first document. A page opened while others open or are being built starts with the
    header, an empty sidebar and placeholders (its request costs the server about 0.1 s
    instead of 0.25 s on the sample, and other users' clicks wait that much less); once
    the browser shows it, the views replace the placeholders one by one through the
    process's :class:`_Builder`: the embedding, phase portrait, gene table and inspector
    of every waiting page first, then the gene-over-time plots, the export and the
    sidebar (dataset picker, model runner). The Compare tab's views are built when it
    is first opened. Outside a server (tests, benchmarks) everything is built at once.
    """

    def __init__(self, state: ExplorerState, *, life: SessionLife | None = None) -> None:
        self.state = state
        self.life = life
        self.content = pn.Column(sizing_mode="stretch_width")
        self.error = pn.pane.Alert("", alert_type="danger", visible=False, sizing_mode="stretch_width")
        self.views: dict[str, Any] = {"export_holder": pn.Column(sizing_mode="stretch_width")}
        self._generation = 0
        #: parts waiting for the browser to show the first page (see :meth:`page_shown`)
        self._waiting: list[tuple[Callable[[], None], int]] | None = [] if life is not None else None
        #: whether the parts are built at once (see :meth:`_build_whole`); set by each build
        self._whole = life is None
        # A plain layout rather than a Panel template: one Bokeh root instead of ten and no
        # FAST web-components bundle, which takes about a second off the first page load.
        self.sidebar = pn.Column(width=340, styles={"border-right": "1px solid #e0e0e0"})
        #: the sidebar's model runner and dataset picker (None until the sidebar is built)
        self.runner: ModelRunner | None = None
        self.dataset: DatasetPicker | None = None
        state.param.watch(self._build, ["adata"])
        state.param.watch(self._show_error, ["error"])
        self._build()
        # the sidebar is not needed to use the page (see a gene, a cell): in a burst it is
        # built after every page's plots, table and inspector, not in the page's request
        self._add_part(self._fill_sidebar, 1)
        title = pn.pane.HTML(
            f"<span>{TITLE}</span>",
            sizing_mode="stretch_width",
            styles={"color": "white", "font-size": "20px", "padding": "12px 16px", "margin": "0"},
            margin=0,
        )
        #: hides the sidebar and gives its 340 pixels to the views: with it hidden, the
        #: Explore and Compare tabs fit a 1,366-pixel laptop screen without scrolling sideways
        self.sidebar_toggle = pn.widgets.Button(
            label=_HIDE_SIDEBAR, color="light", width=170, margin=(12, 16), align="center"
        )
        self.sidebar_toggle.on_click(self._toggle_sidebar)
        # the run's progress bar is in the sidebar: while it is hidden the button shows how far
        state.param.watch(self._label_sidebar_toggle, ["running", "progress"])
        header = pn.Row(
            title, self.sidebar_toggle, sizing_mode="stretch_width", styles={"background": "#0072b5"},
            margin=0,
        )  # fmt: skip
        main = pn.Column(self.error, self.content, sizing_mode="stretch_width")
        self.page = pn.Column(
            header, pn.Row(self.sidebar, main, sizing_mode="stretch_width"), sizing_mode="stretch_width"
        )

    def _toggle_sidebar(self, *_: Any) -> None:
        """Hide the sidebar (dataset, models, export), or show it again; nothing in it is lost."""
        self.sidebar.visible = not self.sidebar.visible
        self._label_sidebar_toggle()

    def _label_sidebar_toggle(self, *_: Any) -> None:
        """``Hide sidebar``, ``Show sidebar``, or while a run goes on hidden, ``Show sidebar (run 45%)``."""
        if self.sidebar.visible:
            label = _HIDE_SIDEBAR
        elif self.state.running:
            label = f"{_SHOW_SIDEBAR} (run {round(100 * self.state.progress)}%)"
        else:
            label = _SHOW_SIDEBAR
        if self.sidebar_toggle.label != label:
            self.sidebar_toggle.label = label

    def _build_whole(self) -> bool:
        """Whether to build the parts at once: outside a server, or a new page opened alone.

        A page is alone when no other page's parts are being built, none is opening, no
        other page request waits at the :class:`PageGate`, and no open page was used in the
        last :data:`_IN_USE_S` (a whole build holds the server for 1-2 s under load, and
        with it the clicks of whoever is using an open page).
        A shown page's new dataset is built through the builder.
        """
        if self.life is None:
            return True
        if self._waiting is None:
            return False
        now = time.monotonic()
        alone = (
            not page_gate.waiting
            and now - page_gate.last_message > _IN_USE_S
            and all(now - since > _OPENING_S for since in _opening.values())
        )
        return alone and _builder.idle()

    def _add_part(self, step: Callable[[], None], priority: int) -> None:
        """Build ``step`` now (a whole page), or queue it for after the page is shown or in the builder."""
        if self._whole:
            step()
        elif self._waiting is not None:
            self._waiting.append((step, priority))
        elif self.life is not None:
            _builder.add(self.life, step, priority=priority)

    def _fill_sidebar(self) -> None:
        """Build the sidebar: the dataset picker, the model runner and the export."""
        if self.life is not None and self.life.closed.is_set():
            return
        self.runner = ModelRunner(state=self.state)
        self.dataset = DatasetPicker(state=self.state)
        self.sidebar.objects = [self.dataset, divider(), self.runner, divider(), self.views["export_holder"]]

    def _build(self, *_: Any) -> None:
        state = self.state
        if state.adata is None:
            return
        self._generation += 1
        generation = self._generation
        self._whole = self._build_whole()
        if self._waiting is not None:
            _opening[self] = time.monotonic()
        holder = self.views["export_holder"]
        self.views = {"export_holder": holder}
        slots = {name: _placeholder(name) for name, _, _ in _PARTS}
        explore = pn.Column(
            pn.Row(slots["embedding"], slots["phase"]),
            slots["time"],
            pn.Row(
                pn.Column(slots["genes"], width=_GENES_WIDTH),
                pn.Column(slots["inspector"], width=_INSPECTOR_WIDTH),
            ),
        )
        compare = pn.Column(sizing_mode="stretch_width")
        tabs = pn.Tabs(("Explore", explore), ("Compare", compare), dynamic=True)
        self.content.objects = [tabs]
        for name, view_class, priority in (*_PARTS, ("export", ExportView, 1)):
            slot = holder if name == "export" else slots[name]
            self._add_part(functools.partial(self._fill, generation, slot, name, view_class), priority)
        if self.life is None:
            self._fill(generation, compare, "compare", ComparisonView)
        else:

            def open_compare(event: param.parameterized.Event) -> None:
                if event.new == 1:
                    tabs.param.unwatch(watcher)
                    self._fill(generation, compare, "compare", ComparisonView)

            watcher = tabs.param.watch(open_compare, "active")

    def page_shown(self) -> None:
        """The browser shows the first page: queue its parts.

        Parts built before that were sometimes lost on the way to a page that was still
        connecting, under load; from here on they are ordinary updates of a shown page.
        """
        _opening.pop(self, None)
        waiting, self._waiting = self._waiting or [], None
        if self.life is not None:
            _builder.add_page(self.life, waiting)

    def _fill(self, generation: int, slot: pn.Column, name: str, view_class: type) -> None:
        """Build view ``name`` into ``slot``, unless the data changed (or the session ended) since."""
        if generation != self._generation or self.state.adata is None:
            return
        view = view_class(state=self.state)
        self.views[name] = view
        slot.objects = [view]

    def _show_error(self, *_: Any) -> None:
        self.error.object = markdown_text(self.state.error)  # names from the dataset: text, not markup
        self.error.visible = bool(self.state.error)

    def release(self) -> None:
        """Drop the views and the session's state (its session ended); the document is not touched."""
        self._generation += 1  # parts still queued are skipped
        _opening.pop(self, None)  # a page closed before it was shown
        self.views = {}
        self.state.release()


#: seconds after the last session ended before unused memory is handed back to the system
_TRIM_DELAY_S = 2.0

_trim_pending = threading.Event()


def _trim_memory_soon() -> None:
    """Collect garbage and return freed heap to the system shortly after sessions end.

    A closed session's arrays and Bokeh models are freed by reference counting and the
    garbage collector, but glibc keeps freed heap pages mapped, so the server's resident
    memory would stay at its peak; ``malloc_trim`` gives them back. One call per burst of
    closed sessions.
    """
    if _trim_pending.is_set():
        return
    _trim_pending.set()
    from tornado.ioloop import IOLoop

    def trim() -> None:
        _trim_pending.clear()
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the memory is reused by the next sessions
            logger.debug("malloc_trim unavailable")

    IOLoop.current().call_later(_TRIM_DELAY_S, trim)


@contextlib.contextmanager
def page_update(doc: Document) -> Iterator[None]:
    """Hold a page's updates for one action and recompute its model graph once, only if it changed.

    Like ``pn.io.hold(doc, freeze=True)`` (one message to the browser, one walk of the
    document's models when something was added or replaced), except that an action
    that only gave existing models new values (a gene or cell click whose plots get new
    data directly) skips that walk: Bokeh's freeze always walks every model reachable
    from the page at its end, which took 0.2 s of every click with 10^6 cells (Bokeh
    visits each property's default) and most of a click's server time on the sample.
    """
    models = doc.models
    if "invalidate" in vars(models):  # nested: the outer action recomputes
        with pn.io.hold(doc):
            yield
        return
    changed = False

    def invalidate() -> None:  # what a model-valued property change calls (Model.trigger)
        nonlocal changed
        changed = True

    models.invalidate = invalidate  # type: ignore[method-assign]
    try:
        with pn.io.hold(doc):
            yield
    finally:
        del models.invalidate
        if changed:
            models.recompute()


def create_app(
    data: str | Path | AnnData | None = None,
    *,
    data_dir: str | Path | None = None,
    name: str | None = None,
) -> pn.Column:
    """Build the page for one browser session.

    In a server session, closing the tab cancels the session's running fit at once,
    and when Bokeh discards the session its state, fits and views are dropped.

    Parameters
    ----------
    data
        An AnnData, a dataset file under ``data_dir``, or None: ``$EXPLORER_DATA`` if
        set, else the bundled sample dataset.
    data_dir
        The only folder the session reads datasets from and writes exports to; default
        ``$EXPLORER_DATA_DIR``, else the current directory.
    name
        Name shown for an AnnData passed as ``data`` (default ``"data"``).

    Returns
    -------
    The page (a Panel layout); its ``.app`` attribute is the :class:`ExplorerApp`.
    """
    from bokeh.events import ConnectionLost

    folder = Path(data_dir if data_dir is not None else os.environ.get(ENV_DATA_DIR, ".")).resolve()
    doc = pn.state.curdoc
    use_local_resources(doc)  # before any component is rendered: no CDN address in the page
    keep_stylesheets(doc)
    life = SessionLife(doc) if doc is not None and doc.session_context is not None else None
    state = ExplorerState(
        data_dir=folder,
        dispatch=life.dispatch if life is not None else None,
        batch=(lambda: page_update(doc)) if doc is not None else None,
    )
    if isinstance(data, AnnData):
        state.set_data(data, name=name or "data")
    else:
        source = data if data is not None else os.environ.get(ENV_DATA) or None
        adata, name, path = shared_dataset(source, folder)
        state.set_data(adata, name=name, path=path)
    if life is not None:
        # the gene table is built after the page's HTML went out: its JS must be listed now
        pn.extension("tabulator")
    app = ExplorerApp(state, life=life)
    if life is not None:
        life.on_close(state.stop_job)
        life.on_close(lambda: _opening.pop(app, None))  # a tab closed while it loaded
        doc.on_event(ConnectionLost, life.connection_lost)

        def destroyed(_context: Any) -> None:
            life.connection_lost()
            app.release()
            _trim_memory_soon()

        pn.state.on_session_destroyed(destroyed)
        pn.state.onload(app.page_shown)
        pn.state.onload(_want_torch_soon)
    page = app.page
    page.app = app  # type: ignore[attr-defined] - lets tests and benchmarks reach the views
    return page


if __name__.startswith("bokeh"):  # `panel serve explorer/app/main.py`
    # Bokeh runs this file as a fresh module for each session and empties that module when
    # the session ends: the session's clean-up must call the installed module's functions
    from explorer.app import main as _installed

    _installed.configure_process()
    _installed.create_app().servable(title=TITLE)
