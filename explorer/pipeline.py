"""One call from counts to velocity on an embedding: what ``explorer fit`` runs.

``prepare`` (filter, normalise, neighbours, moments, UMAP) -> ``model.fit`` ->
``result.to_adata`` -> velocity graph -> transition matrix -> projection ->
confidence. Each step is the public function of its module; this only orders them and
reports progress, so the CLI, the app and the benchmarks run the same thing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from explorer._types import InputError, Progress, report
from explorer.keys import Key

if TYPE_CHECKING:
    from anndata import AnnData

    from explorer._types import ProgressCallback
    from explorer.models.base import VelocityResult

logger = logging.getLogger(__name__)

#: the steps of :func:`run_velocity`, in order, as they are reported to ``progress``
STEPS: tuple[str, ...] = ("preprocess", "fit", "velocity graph", "embedding", "confidence")


def _substep(progress: ProgressCallback | None, index: int) -> ProgressCallback | None:
    """Map a step's own progress onto the whole pipeline's ``[index, index + 1)`` share."""
    if progress is None:
        return None
    n = len(STEPS)

    def forward(p: Progress) -> None:
        scale = 1000
        done = int((index + p.fraction) * scale)
        progress(Progress(done, n * scale, f"{STEPS[index]}: {p.message}" if p.message else STEPS[index]))

    return forward


def run_velocity(
    adata: AnnData,
    *,
    model: str = "stochastic",
    model_params: dict[str, Any] | None = None,
    basis: str = "umap",
    min_shared_counts: int = 20,
    n_top_genes: int = 2000,
    n_pcs: int = 30,
    n_neighbors: int = 30,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> VelocityResult:
    """Preprocess ``adata`` if needed, fit ``model`` and compute the velocity graph and embedding.

    Parameters
    ----------
    adata
        Cells with layers ``spliced`` and ``unspliced`` (raw counts), or already
        preprocessed data with layers ``Ms``/``Mu``; modified in place.
    model
        A name from :data:`explorer.models.MODELS`.
    model_params
        Hyperparameters for the model's constructor; ``seed`` is added unless given.
    basis
        Embedding to project velocity on (``obsm['X_<basis>']``); a UMAP is computed
        when ``basis='umap'`` and none exists.
    min_shared_counts, n_top_genes, n_pcs, n_neighbors
        Preprocessing, with scVelo's names and defaults.
    seed
        Seed for PCA/UMAP and the model.
    progress
        Receives the pipeline's progress, each step's own reports folded in.

    Returns
    -------
    The model's result. ``adata`` gains everything ``prepare`` and
    ``VelocityResult.to_adata`` write, and obsp ``velocity_graph``,
    ``velocity_graph_neg``, ``T_fwd``, obsm ``velocity_<basis>``, obs
    ``velocity_confidence`` and ``velocity_length``.
    """
    from explorer.data.preprocess import prepare
    from explorer.graph.projection import compute_velocity_embedding
    from explorer.graph.transition import (
        compute_transition_matrix,
        compute_velocity_confidence,
        compute_velocity_graph,
    )
    from explorer.models import get_model

    params = {"seed": seed, **(model_params or {})}
    try:
        estimator = get_model(model, **params)
    except KeyError as err:
        raise InputError(err.args[0]) from None
    except TypeError as err:
        msg = (
            f"Invalid parameters for model {model!r}: {err}. "
            "Run `explorer models` to see each model's parameters."
        )
        raise InputError(msg) from None

    basis_key = Key.obsm.embedding(basis)
    report(progress, 0, len(STEPS), "preprocess")
    prepare(
        adata,
        min_shared_counts=min_shared_counts,
        n_top_genes=n_top_genes,
        n_pcs=n_pcs,
        n_neighbors=n_neighbors,
        compute_umap=basis_key == Key.obsm.UMAP,
        seed=seed,
        progress=_substep(progress, 0),
    )
    if basis_key not in adata.obsm:
        found = sorted(k for k in adata.obsm if k.startswith("X_"))
        msg = (
            f"Embedding {basis_key!r} not found; adata.obsm has {found}. "
            "Pass one of them as basis, or 'umap'."
        )
        raise InputError(msg)

    result = estimator.fit(adata, progress=_substep(progress, 1))
    result.to_adata(adata)
    compute_velocity_graph(adata, progress=_substep(progress, 2))
    compute_transition_matrix(adata)
    report(progress, 3, len(STEPS), "embedding")
    compute_velocity_embedding(adata, basis=basis)
    report(progress, 4, len(STEPS), "confidence")
    compute_velocity_confidence(adata)
    report(progress, len(STEPS), len(STEPS), "done")
    return result
