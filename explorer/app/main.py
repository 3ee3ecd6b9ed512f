"""The app: ``create_app()`` builds one browser session's page; ``panel serve`` runs this file.

``panel serve explorer/app/main.py`` shows the bundled sample dataset; the environment
variables ``EXPLORER_DATA`` (a dataset file under the data directory) and
``EXPLORER_DATA_DIR`` (the only folder the app reads from or writes to, default: the
current directory) choose others. ``explorer serve`` (:func:`explorer.app.server.serve`)
sets both from its arguments.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import panel as pn

from explorer._types import InputError
from explorer.app.files import resolve_under
from explorer.app.jobs import configure_torch
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

if TYPE_CHECKING:
    from collections.abc import Callable

    from anndata import AnnData
    from bokeh.document import Document

logger = logging.getLogger(__name__)

ENV_DATA = "EXPLORER_DATA"
ENV_DATA_DIR = "EXPLORER_DATA_DIR"
TITLE = "explorer — RNA velocity"


#: without a browser session to wait for, torch is imported this long after start-up
_TORCH_IMPORT_FALLBACK_S = 30.0

#: and this long after the first page has loaded in a browser
_TORCH_IMPORT_AFTER_LOAD_S = 2.0

_torch_wanted = threading.Event()


def configure_process(*, background: bool = True) -> None:
    """Process-wide set-up for serving: import torch and give it one thread.

    Importing torch ahead keeps its second or so of import time off the first Run
    (:func:`explorer.app.jobs.configure_torch`). With ``background`` it is imported on a
    daemon thread, but only once the first page has loaded (or after
    ``_TORCH_IMPORT_FALLBACK_S``): imported at start-up it held the GIL against the
    server's imports and the first page build and made the page ~0.7 s slower to show.
    """
    if not background:
        configure_torch()
        return

    configure_torch(now=False)

    def setup() -> None:
        _torch_wanted.wait(_TORCH_IMPORT_FALLBACK_S)
        configure_torch()

    threading.Thread(target=setup, name="explorer-import-torch", daemon=True).start()


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
        from explorer.data.samples import load_sample, sample_path

        adata = pn.state.as_cached("explorer-sample-default", load_sample, name="default")
        return adata, "sample dataset", sample_path("default")
    path = resolve_under(data_dir, str(data))
    if not path.is_file():
        folder = Path(data_dir).resolve()
        msg = f"Expected a dataset file {str(data)!r} in the data directory {folder}; it does not exist."
        raise InputError(msg)
    stat = path.stat()
    adata = pn.state.as_cached(
        f"explorer-data-{path}-{stat.st_mtime_ns}-{stat.st_size}", load_dataset, path=path
    )
    return adata, Path(str(data)).as_posix(), path


def session_dispatch(doc: Document | None) -> Callable[[Callable[[], None]], None] | None:
    """Send a worker thread's callbacks to ``doc``'s event loop (None outside a server session)."""
    if doc is None or doc.session_context is None:
        return None
    from panel.io.state import set_curdoc

    def dispatch(fn: Callable[[], None]) -> None:
        def run() -> None:
            with set_curdoc(doc):
                fn()

        try:
            doc.add_next_tick_callback(run)
        except Exception:  # noqa: BLE001 - the session closed while the job ran; nothing to update
            logger.debug("session gone; dropped a job callback")

    return dispatch


class ExplorerApp:
    """One session's views around its :class:`ExplorerState`; ``page`` is what the browser shows."""

    def __init__(self, state: ExplorerState) -> None:
        self.state = state
        self.runner = ModelRunner(state=state)
        self.dataset = DatasetPicker(state=state)
        self.content = pn.Column(sizing_mode="stretch_width")
        self.error = pn.pane.Alert("", alert_type="danger", visible=False, sizing_mode="stretch_width")
        self.views: dict[str, Any] = {}
        state.param.watch(self._build, ["adata"])
        state.param.watch(self._show_error, ["error"])
        self._build()
        # A plain layout rather than a Panel template: one Bokeh root instead of ten and no
        # FAST web-components bundle, which takes about a second off the first page load.
        sidebar = pn.Column(
            self.dataset,
            pn.layout.Divider(),
            self.runner,
            pn.layout.Divider(),
            self.views["export_holder"],
            width=340,
            styles={"border-right": "1px solid #e0e0e0"},
        )
        header = pn.pane.HTML(
            f"<span>{TITLE}</span>",
            sizing_mode="stretch_width",
            styles={
                "background": "#0072b5",
                "color": "white",
                "font-size": "20px",
                "padding": "12px 16px",
                "margin": "0",
            },
            margin=0,
        )
        main = pn.Column(self.error, self.content, sizing_mode="stretch_width")
        self.page = pn.Column(
            header, pn.Row(sidebar, main, sizing_mode="stretch_width"), sizing_mode="stretch_width"
        )

    def _build(self, *_: Any) -> None:
        state = self.state
        if state.adata is None:
            return
        views = {
            "embedding": EmbeddingView(state=state),
            "phase": PhasePortrait(state=state),
            "genes": GeneBrowser(state=state),
            "inspector": CellInspector(state=state),
            "time": GeneTimeView(state=state),
            "compare": ComparisonView(state=state),
            "export": ExportView(state=state),
        }
        holder = self.views.get("export_holder") or pn.Column(sizing_mode="stretch_width")
        holder.objects = [views["export"]]
        views["export_holder"] = holder
        self.views = views
        time_slot = pn.Column(sizing_mode="stretch_width")
        explore = pn.Column(
            pn.Row(views["embedding"], views["phase"]),
            pn.Row(pn.Column(views["genes"], width=620), pn.Column(views["inspector"], width=440)),
            time_slot,
        )
        # the Compare tab is rendered only when opened (dynamic)
        self.content.objects = [pn.Tabs(("Explore", explore), ("Compare", views["compare"]), dynamic=True)]
        _fill_soon(time_slot, views["time"])

    def _show_error(self, *_: Any) -> None:
        self.error.object = self.state.error
        self.error.visible = bool(self.state.error)


def _fill_soon(slot: pn.Column, view: Any) -> None:
    """Put ``view`` into ``slot`` on the session's next event-loop turn (at once outside a server).

    In a server session the page's HTML goes out first and the server renders ``view``
    while the browser loads its scripts; the browser then fetches the whole page in one
    go. Panel's ``defer_load`` instead waits for the browser to finish drawing the rest
    before asking for it, a second round trip that kept the page ~0.8 s from complete.
    """
    doc = pn.state.curdoc
    if doc is None or doc.session_context is None:
        slot.objects = [view]
        return

    def fill() -> None:
        slot.objects = [view]

    pn.state.execute(fill, schedule=True)


def create_app(
    data: str | Path | AnnData | None = None,
    *,
    data_dir: str | Path | None = None,
    name: str | None = None,
) -> pn.Column:
    """Build the page for one browser session.

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
    from anndata import AnnData

    folder = Path(data_dir if data_dir is not None else os.environ.get(ENV_DATA_DIR, ".")).resolve()
    doc = pn.state.curdoc
    state = ExplorerState(
        data_dir=folder,
        dispatch=session_dispatch(doc),
        batch=(lambda: pn.io.hold(doc, freeze=True)) if doc is not None else None,
    )
    if isinstance(data, AnnData):
        state.set_data(data, name=name or "data")
    else:
        source = data if data is not None else os.environ.get(ENV_DATA) or None
        adata, name, path = shared_dataset(source, folder)
        state.set_data(adata, name=name, path=path)
    app = ExplorerApp(state)
    if doc is not None and doc.session_context is not None:
        pn.state.on_session_destroyed(lambda _ctx: state.cancel_run())
        pn.state.onload(_want_torch_soon)
    page = app.page
    page.app = app  # type: ignore[attr-defined] - lets tests and benchmarks reach the views
    return page


if __name__.startswith("bokeh"):  # `panel serve explorer/app/main.py`
    configure_process()
    create_app().servable(title=TITLE)
