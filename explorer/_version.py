"""The installed version of explorer (``explorer.__version__``), for modules below the public API."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("explorer")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0"
