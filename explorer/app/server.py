"""``explorer serve``: start the app on a local port."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from explorer._types import InputError

logger = logging.getLogger(__name__)


def _relative_name(data: str | Path, data_dir: Path) -> str:
    """Turn ``data`` into a name under ``data_dir`` (an absolute path inside it is accepted)."""
    path = Path(data)
    if path.is_absolute():
        resolved = path.resolve()
        if not resolved.is_relative_to(data_dir):
            msg = (
                f"The dataset {str(data)!r} is outside the data directory {data_dir}; "
                "the app reads only files "
                "under it. Pass --data-dir with the folder that holds the file."
            )
            raise InputError(msg)
        return resolved.relative_to(data_dir).as_posix()
    return path.as_posix()


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


def serve(
    data: str | Path | None = None,
    *,
    port: int = 5006,
    data_dir: str | Path | None = None,
    show: bool = False,
    address: str | None = None,
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
        Address to listen on (default: Bokeh's, localhost).
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
        the message is the CLI's.
    """
    import panel as pn

    from explorer.app.main import TITLE, configure_process, create_app, shared_dataset

    folder = Path(data_dir if data_dir is not None else ".").resolve()
    if not folder.is_dir():
        msg = f"Expected --data-dir to be a folder; {str(data_dir)!r} is not one."
        raise InputError(msg)
    name = None if data is None else _relative_name(data, folder)
    configure_process()
    _import_styler_without_pyplot()
    # Load (and preprocess) once before the first page: a bad file fails here, with the CLI's message.
    shared_dataset(name, folder)
    logger.info("serving explorer on port %s (data directory %s)", port, folder)
    return pn.serve(
        lambda: create_app(name, data_dir=folder),
        port=port,
        address=address,
        show=show,
        start=start,
        title=TITLE,
        threaded=False,
    )
