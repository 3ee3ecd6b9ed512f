"""The browser app (Panel + HoloViews + datashader): the only package that imports panel.

``create_app()`` builds one session's page (:mod:`explorer.app.main`); ``serve()``
(:mod:`explorer.app.server`) runs it, as ``explorer serve`` does.
"""

from __future__ import annotations

from explorer.app.main import create_app
from explorer.app.server import serve
from explorer.app.state import ExplorerState

__all__ = ["ExplorerState", "create_app", "serve"]
