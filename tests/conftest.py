"""Shared fixtures.

The real datasets are read from ``../shared/data`` beside the checkout (see its README for
their origin); they are never copied into the repository. Each test gets its own copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from explorer._types import Progress

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EXPLORER_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: the real datasets (pancreas, dentate gyrus, CellRank fixtures)."""
    if not DATA.is_dir():
        msg = f"expected the real datasets in {DATA}; set EXPLORER_SHARED to the shared/ folder"
        raise FileNotFoundError(msg)
    return DATA


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/reference``: scVelo 0.3.4's results on the pancreas files."""
    if not REFERENCE.is_dir():
        msg = f"expected scVelo's reference results in {REFERENCE}; set EXPLORER_SHARED"
        raise FileNotFoundError(msg)
    return REFERENCE


@pytest.fixture
def progress_log() -> tuple[list[Progress], callable]:
    """A ``(log, callback)`` pair: the callback appends every Progress it receives to log."""
    log: list[Progress] = []
    return log, log.append
