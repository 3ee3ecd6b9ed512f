"""explorer: fit RNA-velocity models and question every fit.

Layers, imported only downhill (``tests/test_imports.py`` checks it): ``cli`` -> ``app``
-> ``pipeline`` -> ``models`` -> ``graph``, ``data`` -> ``kinetics`` -> ``keys``,
``_types``. Every import sits at the top of its module, with these deliberate exceptions,
all lazy loads of heavy libraries that most uses never need:

- **torch**, imported inside the model files' functions, as are the network modules that
  import it at top (``explorer.models._*_module``); ``explorer.models.dynamical``
  calls ``_import_torch``, which first runs :func:`explorer._process.set_up_process`, as
  OpenMP settings only take effect before torch loads. The dynamical model's EM
  (``explorer.models._em``) runs on numpy arrays on the CPU and on torch tensors on CUDA,
  so ``explorer fit --model dynamical`` (in memory or streamed) does not load torch without a GPU. The registry
  (:data:`explorer.models.MODELS`) imports a model's module only when it is asked for,
  so ``import explorer``, ``explorer.data``, ``explorer.graph``, ``explorer.pipeline``
  and the CLI run without loading torch.
- **Panel** (and HoloViews, Bokeh), imported by ``explorer.app`` only: the CLI imports
  the app inside ``explorer serve``, and ``explorer.app`` loads its views on first use,
  so the core never loads Panel.
- **scanpy** (with scikit-learn and matplotlib), **pynndescent** and **umap**, imported
  inside the preprocessing steps that call them (gene selection, PCA, neighbours, UMAP):
  `explorer fit` on data that is already preprocessed starts without them.
- **distributed** (Dask) and **h5py**, imported inside :mod:`explorer.stream` by the Dask
  client and the ``.h5ad`` block reader only.
- **zarr**, imported inside :func:`explorer.data.io.read_zarr_lazy` (and by
  :mod:`explorer.stream`): an in-memory ``explorer fit`` loads anndata with a stand-in for
  it (:func:`explorer._process.lean_anndata_import`) and never the real one.
- **pygpcca**, imported inside :mod:`explorer.graph.fates` when GPCCA macrostates are computed.
- **scipy.stats**, imported inside ``explorer.app.readouts`` and ``explorer.models.metrics``.
- **explorer's own optional parts**: ``explorer.cli`` imports the modules of ``compare``,
  ``fates``, ``trajectories``/``perturb`` and the streamed fit inside those subcommands;
  ``explorer.app.fits`` and ``explorer.app.readouts`` import the fates, kernels,
  diagnostics, metrics and vector-field modules when first used; ``explorer.pipeline`` imports the
  UMAP step when it runs. So ``explorer fit`` and a page load pay only for what they use
  (``tests/test_imports.py`` checks what ``explorer.cli`` and ``explorer.app.state`` load).
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
