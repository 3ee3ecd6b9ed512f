"""Small simulated datasets shipped in ``sample_data/``, stored preprocessed and fitted.

Each sample is made by :func:`explorer.data.simulate.simulate` with fixed arguments,
then :func:`explorer.data.preprocess.prepare` (filtering, normalisation, PCA, kNN graph,
moments ``Ms``/``Mu``, UMAP) and :func:`explorer.pipeline.run_velocity` with the
stochastic model (layers ``velocity``, var ``velocity_gamma``/``velocity_r2``/...,
obsp ``velocity_graph``/``velocity_graph_neg``/``T_fwd``, obsm ``velocity_umap``, obs
``velocity_confidence``/``velocity_length``, uns ``velocity_params``), so the app opens
it with streamlines and gene fits in place without computing anything; the
simulator's ground truth (obs ``true_t``, ``true_lineage``, ``clusters``; var
``true_*``; layers ``true_s``, ``true_u``, ``true_velocity``; uns ``simulation``) is kept.

``python -m explorer.data.samples`` rewrites the files from these recipes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from explorer._types import InputError
from explorer.keys import Key

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

#: sample name -> file name in ``sample_data/``
SAMPLES: dict[str, str] = {"default": "default.h5ad"}

#: sample name -> arguments of :func:`~explorer.data.simulate.simulate`
RECIPES: dict[str, dict[str, Any]] = {
    # two lineages after t = 8 (of 20), default pitfall shares: 6 boost, 6 two-regime,
    # 6 steady, 12 late-induction and 6 early-repression genes among 120
    "default": {"n_obs": 1000, "n_vars": 120, "seed": 0, "branches": 2, "noise": "poisson"},
}

#: ``sample_data/`` at the top of the source tree
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "sample_data"

#: seed of PCA, neighbour search and UMAP in :func:`~explorer.data.preprocess.prepare`
#: and of the model in :func:`~explorer.pipeline.run_velocity`
_PREPARE_SEED = 0

#: the model fitted into every sample: fast (well under a second on 1,000 cells) and
#: deterministic, so the shipped file is small and reproducible
SAMPLE_MODEL = "stochastic"


def _check_name(name: str) -> None:
    if name not in SAMPLES:
        valid = ", ".join(repr(n) for n in SAMPLES)
        msg = f"Invalid sample {name!r}. Valid options are: {valid}."
        raise InputError(msg)


def sample_path(name: str = "default") -> Path:
    """Path of the sample file ``name`` in ``sample_data/``.

    Raises
    ------
    InputError
        Unknown name, or the file is missing (e.g. a wheel install without the source
        tree); the message says how to regenerate it.
    """
    _check_name(name)
    path = SAMPLE_DIR / SAMPLES[name]
    if not path.is_file():
        msg = (
            f"sample file {str(path)!r} not found; expected it in the source tree's sample_data/. "
            "Regenerate it with `python -m explorer.data.samples` or call make_sample(name)."
        )
        raise InputError(msg)
    return path


def load_sample(name: str = "default") -> AnnData:
    """Read the preprocessed sample ``name`` (see :data:`SAMPLES`).

    Examples
    --------
    >>> adata = load_sample()  # doctest: +SKIP
    >>> adata.layers["Ms"].shape  # doctest: +SKIP
    (1000, 120)
    """
    from explorer.data.io import read

    return read(sample_path(name))


def make_sample(name: str = "default") -> AnnData:
    """Simulate, preprocess and fit the sample ``name`` from its recipe (deterministic).

    Returns
    -------
    The prepared AnnData with a :data:`SAMPLE_MODEL` fit, its velocity graph,
    transition matrix, UMAP projection and confidence, as stored in ``sample_data/``.
    """
    from explorer.data.preprocess import prepare
    from explorer.data.simulate import simulate
    from explorer.pipeline import run_velocity

    _check_name(name)
    adata = simulate(**RECIPES[name])
    prepare(adata, seed=_PREPARE_SEED)
    # run_velocity skips preprocessing when Ms/Mu exist, so this is fit + graph + projection
    run_velocity(adata, model=SAMPLE_MODEL, seed=_PREPARE_SEED)
    # T_fwd is stored so the app opens the sample without computing (or importing) the
    # transition code; float32, as the graphs are, keeps the file half a megabyte smaller
    adata.obsp[Key.obsp.TRANSITIONS] = adata.obsp[Key.obsp.TRANSITIONS].astype(np.float32)
    return adata


def make_samples(out_dir: str | Path = SAMPLE_DIR, *, names: list[str] | None = None) -> list[Path]:
    """Write every sample (or those in ``names``) to ``out_dir``.

    Returns
    -------
    The paths written.
    """
    from explorer.data.io import write

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or list(SAMPLES):
        adata = make_sample(name)
        path = write(adata, out_dir / SAMPLES[name])
        path.chmod(0o644)  # a file of the source tree, readable by all (the temp file was 0600)
        paths.append(path)
        logger.info("sample %r: %d cells x %d genes -> %s", name, adata.n_obs, adata.n_vars, paths[-1])
    return paths


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_samples()
