"""Build the sample files of :mod:`explorer.data.samples` (``python -m explorer.data.samples``).

Building runs the pipeline (:func:`explorer.pipeline.prepare`,
:func:`explorer.pipeline.run_velocity`), so it lives here, above the pipeline, and
:mod:`explorer.data.samples` only reads the files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from explorer.data.io import write
from explorer.data.samples import RECIPES, SAMPLE_MODEL, SAMPLE_SEED, SAMPLES, check_sample_name, sample_dir
from explorer.data.simulate import simulate
from explorer.keys import Key
from explorer.pipeline import prepare, run_velocity

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)


def make_sample(name: str = "default") -> AnnData:
    """Simulate, preprocess and fit the sample ``name`` from its recipe (deterministic).

    Returns
    -------
    The prepared AnnData with a :data:`~explorer.data.samples.SAMPLE_MODEL` fit, its
    velocity graph, transition matrix, UMAP projection and confidence, as stored in the
    package's ``sample_data/``.
    """
    check_sample_name(name)
    adata = simulate(**RECIPES[name])
    prepare(adata, seed=SAMPLE_SEED)
    # run_velocity skips preprocessing when Ms/Mu exist, so this is fit + graph + projection
    run_velocity(adata, model=SAMPLE_MODEL, seed=SAMPLE_SEED)
    # T_fwd is stored so the app opens the sample without computing (or importing) the
    # transition code; float32, as the graphs are, keeps the file half a megabyte smaller
    adata.obsp[Key.obsp.TRANSITIONS] = adata.obsp[Key.obsp.TRANSITIONS].astype(np.float32)
    return adata


def make_samples(out_dir: str | Path | None = None, *, names: list[str] | None = None) -> list[Path]:
    """Write every sample (or those in ``names``) to ``out_dir`` (default: the package's sample folder).

    Returns
    -------
    The paths written.
    """
    out_dir = sample_dir() if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or list(SAMPLES):
        adata = make_sample(name)
        path = write(adata, out_dir / SAMPLES[name])
        path.chmod(0o644)  # a file of the source tree, readable by all (the temp file was 0600)
        paths.append(path)
        logger.info("sample %r: %d cells x %d genes -> %s", name, adata.n_obs, adata.n_vars, paths[-1])
    return paths


def main() -> None:
    """Rewrite the sample files in the package's sample folder, logging each one."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_samples()
