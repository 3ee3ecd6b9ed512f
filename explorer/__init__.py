"""explorer: fit RNA-velocity models and question every fit.

The core (``explorer.data``, ``explorer.graph``, ``explorer.models``) imports neither
Panel nor, until a torch model is asked for, torch. The app lives in ``explorer.app``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("explorer")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0"

from explorer._types import FitCancelled, Progress, ProgressCallback
from explorer.keys import Key
from explorer.models import MODELS, VelocityModel, VelocityResult, get_model

__all__ = [
    "MODELS",
    "FitCancelled",
    "Key",
    "Progress",
    "ProgressCallback",
    "VelocityModel",
    "VelocityResult",
    "__version__",
    "get_model",
]
