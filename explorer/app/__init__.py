"""The browser app (Panel + HoloViews + datashader): the only package that imports panel.

``create_app()`` builds one session's page (:mod:`explorer.app.main`); ``serve()``
(:mod:`explorer.app.server`) runs it, as ``explorer serve`` does.

The names are imported on first use, so that ``explorer serve`` can refuse a busy port
or a bad path before Panel (seconds to import) is loaded.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from explorer.app.main import create_app
    from explorer.app.server import serve
    from explorer.app.state import ExplorerState

_WHERE = {
    "ExplorerState": "explorer.app.state",
    "create_app": "explorer.app.main",
    "serve": "explorer.app.server",
}

__all__ = ["ExplorerState", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    msg = f"module 'explorer.app' has no attribute {name!r}"
    raise AttributeError(msg)
