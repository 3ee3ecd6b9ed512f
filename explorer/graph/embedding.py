"""A UMAP of the cells from the kNN graph, as scanpy's ``tl.umap`` draws it.

The scVelo reference (shared/reference/README.md, step 6) used scanpy's UMAP on the
30-neighbour graph with seed 0; we call the same function.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import scanpy as sc

from explorer._types import PREPROCESS
from explorer.graph.neighbors import compute_neighbors, has_neighbors
from explorer.keys import Key

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)


def compute_umap(adata: AnnData, *, seed: int = 0) -> None:
    """Compute a 2-D UMAP embedding from the kNN graph, in place.

    Parameters
    ----------
    adata
        Data with a neighbour graph; one is computed with
        :func:`explorer.graph.neighbors.compute_neighbors` (``PREPROCESS.n_neighbors``) when missing.
    seed
        UMAP's random state (the layout is reproducible for a given seed).

    Returns
    -------
    Nothing; sets obsm ``X_umap`` and uns ``umap`` (its parameters).
    """
    if not has_neighbors(adata):
        compute_neighbors(adata, seed=seed, n_neighbors=min(PREPROCESS.n_neighbors, adata.n_obs))
    sc.tl.umap(adata, random_state=seed)
    logger.info("computed %s", Key.obsm.UMAP)
