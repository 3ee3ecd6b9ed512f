"""Sessions on a real server: a closed tab stops its fit at once, quietly, and its memory is let go.

A Panel server runs in a thread of the test process; Bokeh's own client opens a session
over the websocket (as a browser tab does, without a browser) and closes it. The
factory keeps only weak references to what the sessions build.
"""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
import weakref

import pytest

from explorer._types import Progress


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


class _Server:
    """``create_app(adata)`` served in a thread; ``made`` holds weak references to each session's parts."""

    def __init__(self, adata, *, run: bool, lifetime_ms: int) -> None:
        import panel as pn

        from explorer.app.main import create_app

        self.made: list[dict[str, weakref.ref]] = []
        self.started = threading.Event()

        def session():
            page = create_app(adata, name="small")
            state = page.app.state
            job = state.run_model("stochastic") if run else None
            self.made.append(
                {"state": weakref.ref(state), "app": weakref.ref(page.app), "job": job and weakref.ref(job)}
            )
            self.started.set()
            return page

        self.port = _free_port()
        self.thread = pn.serve(
            session,
            port=self.port,
            address="127.0.0.1",
            show=False,
            threaded=True,
            check_unused_sessions_milliseconds=100,
            unused_session_lifetime_milliseconds=lifetime_ms,
        )
        assert _wait(lambda: _listening(self.port), 60), "the test server did not start"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self.thread.stop()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def endless_fit(monkeypatch):
    """Make every fit run until it is cancelled, reporting progress every 10 ms; log when it stopped."""
    from explorer.app import state as state_module

    stopped: list[float] = []

    def fit(*_args, progress=None, **_kwargs):
        i = 0
        try:
            while True:
                i += 1
                progress(Progress(i % 1000, 1000, "working"))
                time.sleep(0.01)
        finally:
            stopped.append(time.monotonic())

    monkeypatch.setattr(state_module, "fit_and_derive", fit)
    return stopped


def _errors(caplog) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR
        or "WebSocketClosedError" in r.getMessage()
        or "never retrieved" in r.getMessage()
    ]


def test_closing_the_tab_cancels_its_fit_at_once_and_quietly(app_adata, endless_fit, caplog):
    from bokeh.client import pull_session

    caplog.set_level(logging.WARNING)
    # a session is discarded 60 s after its tab closed: the fit must stop long before that
    server = _Server(app_adata, run=True, lifetime_ms=60_000)
    try:
        client = pull_session(url=server.url)
        assert server.started.wait(60)
        job = server.made[0]["job"]()
        assert _wait(lambda: job.running, 10)
        time.sleep(0.5)  # progress reaches the page meanwhile
        assert job.running
        closed = time.monotonic()
        client.close()
        assert _wait(lambda: not job.running, 10), "the fit still runs after its tab closed"
        assert job.outcome == "cancelled"
        assert endless_fit[0] - closed < 5
        time.sleep(1.0)  # anything the closed session would still send
        gc.collect()  # an asyncio task that failed is reported when it is collected
        assert _errors(caplog) == []
    finally:
        server.stop()


def test_a_closed_session_releases_its_state(app_adata, caplog, monkeypatch):
    from bokeh.client import pull_session

    from explorer.app import main

    caplog.set_level(logging.WARNING)
    # Bokeh's client never reports its page as shown, so the first page counts as opening
    # for main._OPENING_S (10 s): under a load average of 15 the second request came later
    # than that and was built whole. Here it counts as opening for the whole test.
    monkeypatch.setattr(main, "_OPENING_S", 3600.0)
    server = _Server(app_adata, run=False, lifetime_ms=300)
    try:
        client = pull_session(url=server.url)
        assert server.started.wait(60)
        # a page opened alone is built whole into its first document
        assert {"embedding", "phase", "genes", "inspector", "time"} <= set(server.made[0]["app"]().views)
        # a page opened while another is still opening (Bokeh's client never reports its
        # page as shown, as a browser does) gets a light first document; its parts come
        # once it is shown
        second = pull_session(url=server.url)
        assert _wait(lambda: len(server.made) == 2, 60)
        made = server.made[1]
        state = made["state"]()
        assert not {"embedding", "phase", "genes", "inspector", "time"} & set(made["app"]().views)
        app = made["app"]()
        app.life._loop.add_callback(app.page_shown)  # noqa: SLF001 - the server's event loop
        del app
        assert _wait(lambda: {"embedding", "phase", "genes", "inspector", "time"} <= set(made["app"]().views), 60)
        assert state.adata is app_adata
        del state
        client.close()
        second.close()

        def released() -> bool:
            gc.collect()
            return all(m["state"]() is None and m["app"]() is None for m in server.made)

        # a deadline, not a timing: under a load average of 20 the release took over 30 s
        assert _wait(released, 120), "the closed sessions' state is still referenced"
        assert _errors(caplog) == []
    finally:
        server.stop()


def test_sessions_share_the_datasets_read_only_arrays(app_adata):
    """Two sessions on one dataset share its embedding array and stored fit instead of copying them."""
    import numpy as np

    from explorer.app.state import ExplorerState
    from explorer.keys import Key
    from explorer.models import get_model

    adata = app_adata.copy()
    get_model("steady_state").fit(adata).to_adata(adata)  # a fit stored in the file
    a, b = ExplorerState(adata, dataset="a"), ExplorerState(adata, dataset="b")
    assert a.embedding() is b.embedding()
    np.testing.assert_array_equal(a.embedding(), np.asarray(adata.obsm[Key.obsm.UMAP])[:, :2])
    with pytest.raises(ValueError, match="read-only"):
        a.embedding()[0, 0] = 1.0
    assert a.fit is b.fit is not None
    a.release()
    assert a.adata is None and a.results == {}
    assert b.fit is not None and b.embedding() is not None


def test_an_atlas_is_prepared_before_the_first_page(app_adata, tmp_path, monkeypatch):
    """``explorer serve`` on a dataset drawn as images builds one page off any session first:
    datashader's kernels are compiled and the dataset's shared memo holds what every page reads."""
    from explorer.app import plots
    from explorer.app.main import prepare_dataset
    from explorer.app.memo import shared_memo
    from explorer.data.io import write
    from explorer.models import get_model

    adata = app_adata.copy()
    get_model("steady_state").fit(adata).to_adata(adata)  # a fit stored in the file
    write(adata, tmp_path / "atlas.h5ad")
    plots.warm_up.cache_clear()
    monkeypatch.setattr(plots, "DATASHADE_THRESHOLD", 10 * adata.n_obs)
    small = prepare_dataset("atlas.h5ad", tmp_path)
    assert plots.warm_up.cache_info().currsize == 0  # below the threshold: nothing ahead
    assert "means" not in shared_memo(small)
    monkeypatch.setattr(plots, "DATASHADE_THRESHOLD", adata.n_obs // 2)
    prepared = prepare_dataset("atlas.h5ad", tmp_path)
    assert prepared is small  # the one dataset every session shares
    assert plots.warm_up.cache_info().currsize == 1
    memo = shared_memo(prepared)
    assert "means" in memo  # the gene table's column means: 4 s at 10^6 cells
    assert "stored fit" in memo


# --- many pages at once: page requests wait for the clicks in flight (main.PageGate) ---


def _run(coro):
    import asyncio

    return asyncio.run(coro)


def test_a_page_request_waits_for_the_message_in_flight_and_a_quiet_moment():
    import asyncio

    from explorer.app.main import _GATE_QUIET_S, PageGate

    async def scenario():
        gate = PageGate()
        gate.message_started()  # a click on an open page is being handled
        entered = asyncio.Event()

        async def request():
            await gate.enter()
            entered.set()

        task = asyncio.create_task(request())
        await asyncio.sleep(0.3)
        assert not entered.is_set()
        assert gate.waiting == 1
        gate.message_done()
        done_at = time.monotonic()
        await asyncio.wait_for(entered.wait(), 5)
        waited = time.monotonic() - done_at
        assert waited >= 0.9 * _GATE_QUIET_S, waited  # Panel runs the click's callbacks on later turns
        assert gate.waiting == 0
        gate.leave()
        await task

    _run(scenario())


def test_page_requests_build_one_at_a_time():
    import asyncio

    from explorer.app.main import PageGate

    async def scenario():
        gate = PageGate()
        order: list[str] = []

        async def request(name: str, hold: float):
            await gate.enter()
            order.append(f"{name} in")
            await asyncio.sleep(hold)  # a build (synchronous in the real handler)
            order.append(f"{name} out")
            gate.leave()

        await asyncio.gather(request("a", 0.2), request("b", 0.0), request("c", 0.0))
        assert order == ["a in", "a out", "b in", "b out", "c in", "c out"]

    _run(scenario())


def test_a_busy_page_holds_new_pages_off_only_for_a_while(monkeypatch):
    import asyncio

    from explorer.app import main

    monkeypatch.setattr(main, "_GATE_MAX_WAIT_S", 0.4)

    async def scenario():
        gate = main.PageGate()
        gate.message_started()  # never ends
        start = time.monotonic()
        await asyncio.wait_for(gate.enter(), 5)
        gate.leave()
        return time.monotonic() - start

    waited = _run(scenario())
    assert 0.35 <= waited < 2.0, waited


def test_a_message_is_in_hand_from_its_first_frame_to_its_last(monkeypatch):
    """Tornado hands each websocket frame of a Bokeh message to the handler in its own loop turn.

    Counted frame by frame, a click's header frame ended its "message" and a page request
    or a build step ran before its content frame was read.
    """
    from types import SimpleNamespace

    from bokeh.protocol import Protocol
    from bokeh.protocol.receiver import Receiver
    from bokeh.server.views.ws import WSHandler
    from tornado.web import Application

    from explorer.app import main
    from explorer.app.server import _pace_page_requests

    gate = main.PageGate()
    monkeypatch.setattr(main, "page_gate", gate)
    app = Application([(r"/ws", WSHandler)])
    _pace_page_requests(app)
    paced = next(rule.target for rule in app.wildcard_router.rules if isinstance(rule.target, type))
    assert issubclass(paced, WSHandler)
    assert paced is not WSHandler

    handled = []

    async def handle(message, _connection):
        handled.append(message.msgtype)

    socket = object.__new__(paced)  # no connection needed: the frames are fed by hand
    socket.receiver = Receiver(Protocol())
    socket.handler = SimpleNamespace(handle=handle)
    socket.connection = None
    socket.close_code = socket.close_reason = None
    message = Protocol().create("PULL-DOC-REQ")

    async def scenario():
        in_hand = []
        for frame in (message.header_json, message.metadata_json, message.content_json):
            await socket.on_message(frame)
            in_hand.append(gate._busy)
        assert in_hand == [1, 1, 0]
        assert handled == ["PULL-DOC-REQ"]
        assert gate.quiet_in() > 0  # and a page request still waits a quiet moment after it
        # a tab closed between two frames of a message does not leave the gate busy
        await socket.on_message(message.header_json)
        assert gate._busy == 1
        socket.on_close()
        assert gate._busy == 0

    _run(scenario())


class _LoopLife:
    """A page's life whose next tick is the running asyncio loop's next turn (never closed)."""

    closed = threading.Event()

    def next_tick(self, fn, *, after=None):
        import asyncio

        def run():
            fn()
            after()

        asyncio.get_running_loop().call_soon(run)
        return True


def test_parts_queued_while_a_message_is_in_hand_wait_for_it(monkeypatch):
    """A page's parts are queued while its "shown" message is handled: not started before the clicks."""
    import asyncio

    from explorer.app import main

    gate = main.PageGate()
    monkeypatch.setattr(main, "page_gate", gate)
    builder = main._Builder()
    ran: list[float] = []

    async def scenario():
        gate.message_started()
        builder.add_page(_LoopLife(), [(lambda: ran.append(time.monotonic()), 0)])
        await asyncio.sleep(0.3)
        assert ran == []
        gate.message_done()
        done_at = time.monotonic()
        await asyncio.sleep(main._GATE_QUIET_S + 0.3)
        assert len(ran) == 1
        assert ran[0] - done_at >= 0.9 * main._GATE_QUIET_S
        # with nothing in hand a part starts at once
        gate._quiet_since -= 1
        builder.add(_LoopLife(), lambda: ran.append(time.monotonic()))
        await asyncio.sleep(0.05)
        assert len(ran) == 2

    _run(scenario())


def test_a_step_due_when_a_click_comes_in_waits_for_the_click(monkeypatch):
    """A step due on the next loop turn is put back when a message arrives first, for a while at most."""
    import asyncio

    from explorer.app import main

    monkeypatch.setattr(main, "_GATE_MAX_WAIT_S", 0.5)
    gate = main.PageGate()
    monkeypatch.setattr(main, "page_gate", gate)
    builder = main._Builder()
    ran: list[str] = []

    async def scenario():
        gate._quiet_since -= 1
        builder.add(_LoopLife(), lambda: ran.append("a"))  # scheduled for the next loop turn
        gate.message_started()  # a click's first frame comes in before it runs
        await asyncio.sleep(0.2)
        assert ran == []
        assert not builder.idle()
        gate.message_done()
        await asyncio.sleep(main._GATE_QUIET_S + 0.2)
        assert ran == ["a"]
        # a page in constant use holds a step off only until it was due that long ago
        gate._quiet_since -= 1
        builder.add(_LoopLife(), lambda: ran.append("b"))
        gate.message_started()  # never ends
        start = time.monotonic()
        while ran != ["a", "b"] and time.monotonic() - start < 5:
            await asyncio.sleep(0.05)
        assert ran == ["a", "b"]
        assert 0.4 <= time.monotonic() - start < 2.5

    _run(scenario())


def test_a_page_is_built_whole_only_when_no_open_page_is_in_use(monkeypatch):
    """A whole build holds the server for 1-2 s under load: not while someone clicks."""
    from types import SimpleNamespace

    from explorer.app import main

    monkeypatch.setattr(main, "page_gate", main.PageGate())
    monkeypatch.setattr(main, "_opening", {})
    opening = SimpleNamespace(life=object(), _waiting=[])
    assert main.ExplorerApp._build_whole(opening)
    main.page_gate.message_started()
    main.page_gate.message_done()  # an open page was just used
    assert not main.ExplorerApp._build_whole(opening)
    main.page_gate.last_message -= main._IN_USE_S + 1
    assert main.ExplorerApp._build_whole(opening)
    main.page_gate.waiting = 1  # another page request waits: a burst
    assert not main.ExplorerApp._build_whole(opening)


def test_explorer_serve_routes_pages_and_messages_through_the_gate(monkeypatch):
    import asyncio

    from panel.io.server import DocHandler
    from tornado.websocket import WebSocketHandler

    from explorer.app import main
    from explorer.app.server import serve

    monkeypatch.setattr(main, "configure_process", lambda **_: None)  # no process-wide settings here
    asyncio.set_event_loop(asyncio.new_event_loop())
    server = serve(None, port=0, start=False)
    try:
        targets = []

        def walk(router):
            for rule in router.rules:
                if isinstance(rule.target, type):
                    targets.append(rule.target)
                elif hasattr(rule.target, "rules"):
                    walk(rule.target)

        walk(server._tornado.default_router)
        walk(server._tornado.wildcard_router)
        pages = [t for t in targets if issubclass(t, DocHandler)]
        sockets = [t for t in targets if issubclass(t, WebSocketHandler)]
        assert pages
        assert sockets
        assert all(getattr(t, "_explorer_paced", False) for t in pages + sockets)
        # wrapped once, not twice (a rule both routers hold)
        assert all(not getattr(t.__mro__[1], "_explorer_paced", False) for t in pages + sockets)
    finally:
        server.stop()
        server.unlisten()


def test_torch_is_imported_only_once_the_pages_are_idle(monkeypatch):
    """The background import holds the interpreter for a second or two: not while a user clicks."""
    from explorer.app import main

    monkeypatch.setattr(main, "page_gate", main.PageGate())
    assert main._pages_idle()  # a fresh server: nobody there
    main.page_gate.message_started()
    assert not main._pages_idle()  # a click in hand
    main.page_gate.message_done()
    assert not main._pages_idle()  # just clicked
    main.page_gate.last_message -= main._TORCH_IMPORT_IDLE_S + 0.1
    time.sleep(main._GATE_QUIET_S + 0.02)
    assert main._pages_idle()
    main.page_gate.waiting = 1  # a page request waits
    assert not main._pages_idle()


def test_cached_bokeh_defaults_are_the_values_bokeh_computes_per_instance():
    """``cache_bokeh_defaults``: every unset property of a page's models reads what Bokeh itself computes.

    The page (the sample, built whole) is read property by property against Bokeh's own,
    uncached default; a theme's value still wins for a themed instance, and a default
    Bokeh makes per instance (a list) is not shared.
    """
    from bokeh.core.property.descriptors import PropertyDescriptor
    from bokeh.document import Document
    from bokeh.models import Title
    from bokeh.themes import Theme
    from panel.io.state import set_curdoc

    from explorer.app.main import _BOKEH_DEFAULTS, cache_bokeh_defaults, create_app

    cache_bokeh_defaults()
    cache_bokeh_defaults()  # idempotent: one wrapper
    assert PropertyDescriptor._get_default._explorer_cached
    doc = Document()
    with set_curdoc(doc):
        doc.add_root(create_app(None).get_root(doc))
    compared = 0
    for model in list(doc.models):
        for name in model.properties():
            descriptor = model.lookup(name)
            if not isinstance(descriptor, PropertyDescriptor) or not hasattr(descriptor, "instance_default"):
                continue  # an alias of another property
            if name in model._property_values or descriptor.has_unstable_default(model):
                continue
            expected = descriptor.instance_default(model)  # Bokeh's computation, no cache
            value = descriptor._get(model)  # as a read does (without raising for an unset value)
            assert value == expected or (value != value and expected != expected), (model, name)  # NaN
            compared += 1
    assert compared > 1000
    assert any(cls.__name__ == "Scatter" for cls, _ in _BOKEH_DEFAULTS)

    plain, themed = Title(), Title()
    assert plain.text_font_size == "13px"  # cached for Title now
    themed_doc = Document(theme=Theme(json={"attrs": {"Title": {"text_font_size": "30px"}}}))
    themed_doc.add_root(themed)
    assert themed.text_font_size == "30px"
    assert Title().text_font_size == "13px"
    a, b = Title(), Title()
    a.tags.append("x")
    assert b.tags == []
