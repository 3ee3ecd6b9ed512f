"""``explorer serve``: start the app on a local port, reachable from this machine only by default.

The server listens on ``127.0.0.1`` unless ``address`` says otherwise, and answers only
requests whose ``Host`` header names this machine (``localhost``, ``127.0.0.1``,
``[::1]``) or a host passed in ``allow_websocket_origin``: a web page on another site
cannot reach it through DNS rebinding (its requests carry that site's host name).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explorer._types import InputError

if TYPE_CHECKING:
    from collections.abc import Sequence

logger = logging.getLogger(__name__)

#: where ``explorer serve`` listens unless told otherwise: this machine only
DEFAULT_ADDRESS = "127.0.0.1"
#: Host header names that always mean this machine
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
#: addresses that mean "every interface"
_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 - names, not a binding


def _relative_name(data: str | Path, data_dir: Path) -> str:
    """Turn ``data`` into a name under ``data_dir``, however the path is written.

    Accepted: a path relative to ``data_dir`` (``x.h5ad``), relative to the current
    folder (``data/x.h5ad`` with ``--data-dir data``) or absolute, as long as the file
    lies inside ``data_dir``.
    """
    path = Path(data).expanduser()
    candidates = [path] if path.is_absolute() else [data_dir / path, Path.cwd() / path]
    for candidate in candidates:
        # lexically first (a link inside data_dir stays a name inside it; resolve_under then
        # decides where the link may lead), then with links followed
        for full in (Path(os.path.abspath(candidate)), candidate.resolve()):
            if full.exists() and full.is_relative_to(data_dir):
                return full.relative_to(data_dir).as_posix()
    outside = next((c for c in candidates if c.exists()), None)
    if outside is not None:
        msg = (
            f"The dataset {str(data)!r} is outside the data directory {data_dir}; the app reads only "
            "files under it. Pass --data-dir with the folder that holds the file."
        )
        raise InputError(msg)
    # missing: the loader's message names the data directory it looked in
    return path.as_posix() if not path.is_absolute() else path.name


def _host_name(host: str) -> str:
    """``'Example.org:5006'`` -> ``'example.org'``; ``'[::1]:5006'`` -> ``'[::1]'``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts(address: str | None, websocket_origins: Sequence[str] | None) -> frozenset[str] | None:
    """Host names the server answers to; None when ``'*'`` allows every host."""
    origins = list(websocket_origins or [])
    if "*" in origins:
        return None
    hosts = set(_LOOPBACK_HOSTS)
    hosts.update(_host_name(o) for o in origins)
    if address and address not in _ANY_ADDRESS:
        hosts.add(_host_name(f"[{address}]" if ":" in address else address))
    return frozenset(hosts)


def _refuse_foreign_hosts(tornado_app: Any, hosts: frozenset[str]) -> None:
    """Answer 403 to any request whose Host header is not one of ``hosts`` (DNS rebinding)."""
    from tornado.routing import Matcher, Rule
    from tornado.web import RequestHandler

    class ForeignHost(Matcher):
        def match(self, request: Any) -> dict[str, Any] | None:
            return None if _host_name(request.host or "") in hosts else {}

    class Refuse(RequestHandler):
        def prepare(self) -> None:
            self.set_status(403)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(
                "403: this explorer server answers to localhost only. To open it to other hosts, "
                "start it with --address and --allow-websocket-origin=HOST.\n"
            )

    router = tornado_app.default_router
    router.add_rules([Rule(ForeignHost(), Refuse)])
    router.rules.insert(0, router.rules.pop())


def _mid_message(handler: Any) -> bool:
    """Whether ``handler``'s websocket has received part of a Bokeh message and waits for the rest.

    A Bokeh message is three websocket frames or more (header, metadata, content,
    buffers), and Tornado hands each frame to ``on_message`` in its own event-loop turn.
    """
    from bokeh.protocol.receiver import Receiver

    consumer = getattr(getattr(handler, "receiver", None), "_current_consumer", None)
    return consumer is not None and getattr(consumer, "__func__", None) is not Receiver._HEADER  # noqa: SLF001


def _pace_page_requests(tornado_app: Any) -> None:
    """Route page requests and websocket messages through the app's :class:`~explorer.app.main.PageGate`.

    Panel's page handler builds a session's document in the request; this makes each
    request wait for its turn, so that clicks on open pages are handled between the
    requests of a burst instead of after all of them. A message counts as in hand from
    its first frame until its last one is handled: counted frame by frame, a click was
    "handled" once its header frame was, and a page request or a build step (0.3-1 s on a
    loaded machine) then ran before its content frame was read, each frame of the click
    waiting for one (gene clicks on an open page waited up to 2.5 s in a burst of 8 pages).
    """
    from panel.io.server import DocHandler
    from tornado.websocket import WebSocketHandler

    from explorer.app.main import page_gate

    def paced(handler: type) -> type:
        if issubclass(handler, WebSocketHandler):

            class PacedMessages(handler):  # type: ignore[misc, valid-type]
                #: a message's first fragment came and its last has not been handled yet
                _explorer_in_hand = False

                async def on_message(self, fragment: Any) -> None:
                    if not self._explorer_in_hand:
                        self._explorer_in_hand = True
                        page_gate.message_started()
                    try:
                        await super().on_message(fragment)
                    finally:
                        if not _mid_message(self):
                            self._explorer_in_hand = False
                            page_gate.message_done()

                def on_close(self) -> None:
                    if self._explorer_in_hand:  # closed between two fragments of a message
                        self._explorer_in_hand = False
                        page_gate.message_done()
                    super().on_close()

            return PacedMessages

        class PacedPage(handler):  # type: ignore[misc, valid-type]
            async def get(self, *args: Any, **kwargs: Any) -> None:
                await page_gate.enter()
                try:
                    await super().get(*args, **kwargs)
                finally:
                    page_gate.leave()

        return PacedPage

    def walk(router: Any) -> None:
        for rule in router.rules:
            target = rule.target
            if isinstance(target, type) and issubclass(target, (DocHandler, WebSocketHandler)):
                if not getattr(target, "_explorer_paced", False):  # a rule both routers hold
                    rule.target = paced(target)
                    rule.target._explorer_paced = True
            elif hasattr(target, "rules"):
                walk(target)

    walk(tornado_app.default_router)
    walk(tornado_app.wildcard_router)


def _free_port(address: str, port: int) -> int:
    """Check that ``port`` can be bound on ``address`` before any work; return it (or a free one for 0)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    host = "" if address in _ANY_ADDRESS else address.strip("[]")
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tornado binds
        try:
            sock.bind((host, port))
        except OverflowError:
            msg = f"Expected --port between 0 and 65535; found {port}."
            raise InputError(msg) from None
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                msg = (
                    f"Port {port} on {address} is already in use (another explorer serve or server?). "
                    "Pass --port with another number, or --port 0 to pick a free one."
                )
            elif err.errno == errno.EACCES:
                msg = (
                    f"Not allowed to listen on port {port} on {address}; ports below 1024 need root. "
                    "Pass --port 0 or a port above 1023."
                )
            else:
                msg = (
                    f"Cannot listen on {address} port {port}: {err.strerror}. Check --address "
                    "(an address of this machine, or 127.0.0.1)."
                )
            raise InputError(msg) from None
        return sock.getsockname()[1]


def _import_styler_without_pyplot() -> None:
    """Import pandas' ``Styler`` with ``matplotlib.pyplot`` blocked, once, in the server process.

    Panel's Tabulator (the gene table) imports ``pandas.io.formats.style``, which imports
    ``matplotlib.pyplot`` only to offer colour gradients; that was 0.2 s of the first page
    load. The app never styles tables with matplotlib, so the server process imports the
    module with pyplot unavailable (pandas then sets ``has_mpl = False``); pyplot itself
    stays importable afterwards.
    """
    import sys

    if "pandas.io.formats.style" in sys.modules or "matplotlib.pyplot" in sys.modules:
        return
    sys.modules["matplotlib.pyplot"] = None  # type: ignore[assignment] - makes `import` raise ImportError
    try:
        import pandas.io.formats.style  # noqa: F401
    finally:
        del sys.modules["matplotlib.pyplot"]


def _stop_with_supervisor() -> None:
    """Have this worker process get SIGTERM when its supervisor ends (Linux).

    With ``--num-procs`` tornado forks the workers from a supervisor that only waits on
    them: a ``kill`` (or a service manager's stop) of the supervisor left the workers
    serving, holding the port and the memory. Ctrl-C reaches every process of the
    terminal's group, so it stopped them anyway.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        logger.warning("could not tie this worker to its supervisor (prctl: errno %s)", ctypes.get_errno())
    if os.getppid() == 1:  # the supervisor ended before the call
        os.kill(os.getpid(), signal.SIGTERM)


def serve(
    data: str | Path | None = None,
    *,
    port: int = 5006,
    data_dir: str | Path | None = None,
    show: bool = False,
    address: str | None = None,
    allow_websocket_origin: Sequence[str] | None = None,
    num_procs: int = 1,
    start: bool = True,
) -> Any:
    """Serve the explorer app; blocks until stopped when ``start`` is true.

    Parameters
    ----------
    data
        A dataset file under ``data_dir`` (relative to it, or absolute inside it); None
        opens the bundled sample dataset.
    port
        Local port (0 picks a free one).
    data_dir
        The only folder the app reads datasets from and writes exports to (default: the
        current directory).
    show
        Open a browser tab.
    address
        Address to listen on; default ``127.0.0.1``, this machine only. ``0.0.0.0``
        opens the app to every network the machine is on: whoever reaches it can read
        every dataset in ``data_dir`` and write exports there.
    allow_websocket_origin
        Host names (``host`` or ``host:port``) besides localhost that browsers may use to
        reach the app (Panel's option); requests naming any other host get 403.
    num_procs
        Worker processes (0: one per core). Each serves its own sessions and holds the
        dataset, which is loaded once before they fork and shared until written to; a
        browser stays on the process it connected to.
    start
        Run the server's event loop here (blocking); False returns the started server
        for the caller to run or stop.

    Returns
    -------
    The ``panel.io.server.Server``.

    Raises
    ------
    InputError
        If ``data`` is outside ``data_dir``, missing, or not a dataset explorer can read;
        if the port is in use or the address is not this machine's; the message is the
        CLI's.
    """
    if isinstance(num_procs, bool) or not isinstance(num_procs, int) or num_procs < 0:
        msg = f"Expected --num-procs to be 0 (one per core) or a positive whole number; found {num_procs!r}."
        raise InputError(msg)
    folder = Path(data_dir if data_dir is not None else ".").resolve()
    if not folder.is_dir():
        msg = f"Expected --data-dir to be a folder; {str(data_dir)!r} is not one."
        raise InputError(msg)
    name = None if data is None else _relative_name(data, folder)
    address = DEFAULT_ADDRESS if address is None else address
    port = _free_port(address, port)  # a port in use fails now, not after loading the data
    hosts = allowed_hosts(address, allow_websocket_origin)
    if address not in _LOOPBACK_HOSTS:
        logger.warning(
            "listening on %s: the app and every dataset in %s are open to whoever can reach this "
            "machine on port %d",
            address,
            folder,
            port,
        )
    # Panel and the app are imported only now: a busy port or a bad path fails in a second
    import panel as pn

    from explorer.app.collector import collect_when_idle
    from explorer.app.main import TITLE, configure_process, create_app, prepare_dataset

    # several processes fork from this one: no background thread before the fork (each
    # worker imports torch at its first fit)
    configure_process(import_torch=num_procs == 1)
    _import_styler_without_pyplot()
    # Load (and preprocess) once before the first page: a bad file fails here, with the CLI's message.
    prepare_dataset(name, folder)
    logger.info("serving explorer on %s port %s (data directory %s)", address, port, folder)
    origins = [f"localhost:{port}", f"127.0.0.1:{port}", *(allow_websocket_origin or [])]
    try:
        server = pn.serve(
            lambda: create_app(name, data_dir=folder),
            port=port,
            address=address,
            websocket_origin=origins,
            show=show,
            start=False,
            title=TITLE,
            threaded=False,
            num_procs=num_procs,
        )
    except OSError as err:  # the port was taken between the check and now
        msg = f"Cannot listen on {address} port {port}: {err.strerror}. Pass --port 0 to pick a free one."
        raise InputError(msg) from None
    if num_procs != 1:
        # only the forked workers get here: the supervisor waits on them inside pn.serve
        _stop_with_supervisor()
    _pace_page_requests(server._tornado)  # noqa: SLF001 - Bokeh keeps its tornado app there
    if hosts is not None:
        _refuse_foreign_hosts(server._tornado, hosts)  # noqa: SLF001
    if start:
        # this process is the server from now on: its long-lived objects frozen, full
        # garbage collections while it is idle (explorer.app.collector); before any session
        collect_when_idle(server.io_loop)
        server.start()
        server.io_loop.start()
    return server
