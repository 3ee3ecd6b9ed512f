"""explorer: fit RNA-velocity models and question every fit.

Layers, imported only downhill (``tests/test_imports.py`` checks it): ``cli`` -> ``app``
-> ``pipeline`` -> ``models`` -> ``graph``, ``data`` -> ``kinetics`` -> ``keys``,
``_types``. Every import sits at the top of its module, with three deliberate exceptions,
all lazy loads of heavy libraries that most uses never need:

- **torch**, imported inside the model files' functions (``explorer.models.dynamical``
  calls ``_import_torch``, which first runs :func:`explorer._process.set_up_process`, as
  OpenMP settings only take effect before torch loads). The registry
  (:data:`explorer.models.MODELS`) imports a model's module only when it is asked for,
  so ``import explorer``, ``explorer.data``, ``explorer.graph``, ``explorer.pipeline``
  and the CLI run without loading torch.
- **Panel** (and HoloViews, Bokeh), imported by ``explorer.app`` only: the CLI imports
  the app inside ``explorer serve``, and ``explorer.app`` loads its views on first use,
  so the core never loads Panel.
- **scanpy** (with scikit-learn and matplotlib), **pynndescent** and **umap**, imported
  inside the preprocessing steps that call them (gene selection, PCA, neighbours, UMAP):
  `explorer fit` on data that is already preprocessed starts without them.
"""

from __future__ import annotations

from explorer._types import FitCancelled, InputError, Progress, ProgressCallback
from explorer._version import __version__
from explorer.keys import Key
from explorer.models import MODELS, VelocityModel, VelocityResult, get_model

__all__ = [
    "MODELS",
    "FitCancelled",
    "InputError",
    "Key",
    "Progress",
    "ProgressCallback",
    "VelocityModel",
    "VelocityResult",
    "__version__",
    "get_model",
]
