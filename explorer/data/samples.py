"""Small simulated datasets shipped inside the package, stored preprocessed and fitted.

The files live in ``explorer/sample_data/`` (package data: a wheel installs them, so
``explorer serve`` opens the sample without the source tree); the repository's
``sample_data/`` is a link to that folder. :func:`sample_path` finds them with
:mod:`importlib.resources`.

Each sample is made by :func:`explorer.data.simulate.simulate` with fixed arguments
(:data:`RECIPES`), then :func:`explorer.pipeline.prepare` (filtering, normalisation, PCA,
kNN graph, moments ``Ms``/``Mu``, UMAP) and :func:`explorer.pipeline.run_velocity` with
the stochastic model (layers ``velocity``, var ``velocity_gamma``/``velocity_r2``/...,
obsp ``velocity_graph``/``velocity_graph_neg``/``T_fwd``, obsm ``velocity_umap``, obs
``velocity_confidence``/``velocity_length``, uns ``velocity_params``), so the app opens
it with streamlines and gene fits in place without computing anything; the
simulator's ground truth (obs ``true_t``, ``true_lineage``, ``clusters``; var
``true_*``; layers ``true_s``, ``true_u``, ``true_velocity``; uns ``simulation``) is kept.

``python -m explorer.data.samples`` rewrites the files from these recipes; the code that
builds them uses the pipeline and so lives above it, in :mod:`explorer._samples_build`
(this module only reads, and imports nothing above :mod:`explorer.data`).
"""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explorer._types import MissingInputError
from explorer.data.io import read

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

#: sample name -> file name in ``explorer/sample_data/``
SAMPLES: dict[str, str] = {"default": "default.h5ad"}

#: sample name -> arguments of :func:`~explorer.data.simulate.simulate`
RECIPES: dict[str, dict[str, Any]] = {
    # two lineages after t = 8 (of 20), default pitfall shares: 6 boost, 6 two-regime,
    # 6 steady, 12 late-induction and 6 early-repression genes among 120
    "default": {"n_obs": 1000, "n_vars": 120, "seed": 0, "branches": 2, "noise": "poisson"},
}

#: the package folder that holds the sample files (``sample_data/`` in the repository links to it)
SAMPLE_PACKAGE, SAMPLE_FOLDER = "explorer", "sample_data"

#: seed of PCA, neighbour search and UMAP in :func:`~explorer.pipeline.prepare`
#: and of the model in :func:`~explorer.pipeline.run_velocity`
SAMPLE_SEED = 0

#: the model fitted into every sample: fast (well under a second on 1,000 cells) and
#: deterministic, so the shipped file is small and reproducible
SAMPLE_MODEL = "stochastic"


def sample_dir() -> Path:
    """Return the installed folder of the sample files, found with :mod:`importlib.resources`.

    In an editable install or the source tree it is ``explorer/sample_data/`` of the
    checkout; from a wheel, the same folder in ``site-packages``.
    """
    folder = files(SAMPLE_PACKAGE).joinpath(SAMPLE_FOLDER)
    if not isinstance(folder, Path):  # a zipped install: the files have no path to open
        msg = (
            f"the sample files are inside an archive ({folder}); explorer reads them from a folder. "
            "Install explorer unzipped (`pip install explorer`)."
        )
        raise MissingInputError(msg)
    return folder


def check_sample_name(name: str) -> None:
    """Raise :class:`~explorer._types.MissingInputError` listing the valid names for an unknown ``name``."""
    if name not in SAMPLES:
        valid = ", ".join(repr(n) for n in SAMPLES)
        msg = f"Invalid sample {name!r}. Valid options are: {valid}."
        raise MissingInputError(msg)


def sample_path(name: str = "default") -> Path:
    """Path of the installed sample file ``name`` (see :func:`sample_dir`).

    Raises
    ------
    MissingInputError
        Unknown name, or the file is missing from the installation; the message says how
        to regenerate it.
    """
    check_sample_name(name)
    path = sample_dir() / SAMPLES[name]
    if not path.is_file():
        msg = (
            f"sample file {str(path)!r} not found; expected it in the installed package's "
            f"{SAMPLE_FOLDER}/ folder. Regenerate it with `python -m explorer.data.samples`."
        )
        raise MissingInputError(msg)
    return path


def load_sample(name: str = "default") -> AnnData:
    """Read the preprocessed sample ``name`` (see :data:`SAMPLES`).

    Examples
    --------
    >>> adata = load_sample()  # doctest: +SKIP
    >>> adata.layers["Ms"].shape  # doctest: +SKIP
    (1000, 120)
    """
    return read(sample_path(name))


if __name__ == "__main__":
    # a program, not part of this module: building needs the pipeline, a layer above data
    from explorer._samples_build import main

    main()
