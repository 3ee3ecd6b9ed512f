"""The session's fits on their way in and out: from a file, into an export, and what a model offers.

- :func:`fit_from_adata`: the velocity already stored in a dataset (written by
  ``explorer fit``, scVelo or an earlier export) as a :class:`~explorer.app.jobs.Fit`,
  through :meth:`explorer.VelocityResult.from_adata`;
- :func:`results_adata`: a copy of the data with a fit written under scVelo's and
  CellRank's keys, what the Export tab saves;
- :func:`load_dataset`: read a file and preprocess it as ``explorer fit`` does;
- :func:`model_names`, :func:`model_defaults`: the registered models and their
  parameters, read from :data:`explorer.models.MODELS` when a page is built.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from explorer.app.jobs import Fit
from explorer.data.io import read
from explorer.data.preprocess import is_preprocessed
from explorer.graph.transition import transition_matrix
from explorer.keys import Key
from explorer.models import MODELS
from explorer.models.base import VelocityResult
from explorer.pipeline import Derived, prepare

if TYPE_CHECKING:
    from pathlib import Path

    from anndata import AnnData

    from explorer._types import ProgressCallback

#: the model name of a fit read from a file that names none (velocity from another tool)
UNNAMED_MODEL = "velocity"


def model_names() -> list[str]:
    """List the models a Run can fit, as registered now (one registered later shows on the next page)."""
    return MODELS.keys()


def model_defaults(model: str) -> dict[str, Any]:
    """Return the constructor's keyword defaults of ``model`` (for the Run form)."""
    signature = inspect.signature(MODELS[model].__init__)
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if name != "self" and p.default is not inspect.Parameter.empty
    }


def fit_from_adata(adata: AnnData) -> Fit | None:
    """Read the velocity stored in ``adata`` as a fit labelled ``"<model> (from file)"`` (None without one).

    The result is :meth:`~explorer.VelocityResult.from_adata` (a file that names no model
    gets :data:`UNNAMED_MODEL`), with its velocity as float32; the fit carries the stored
    transition matrix (``obsp['T_fwd']``, else one from the velocity graph), velocity
    confidence and projections ``obsm['velocity_<basis>']``. With both velocity graphs the
    app can project on another basis as ``explorer fit`` does (scVelo's signed kernel).
    """
    if Key.layers.VELOCITY not in adata.layers:
        return None
    result = VelocityResult.from_adata(adata, model=UNNAMED_MODEL)
    if result.velocity.dtype != np.float32:
        result = dataclasses.replace(result, velocity=result.velocity.astype(np.float32))
    graph, graph_neg = adata.obsp.get(Key.obsp.VELOCITY_GRAPH), adata.obsp.get(Key.obsp.VELOCITY_GRAPH_NEG)
    transitions = adata.obsp.get(Key.obsp.TRANSITIONS)
    if transitions is None and graph is not None:
        transitions = transition_matrix(graph, graph_neg)
    transitions = None if transitions is None else transitions.tocsr()
    confidence = (
        adata.obs[Key.obs.VELOCITY_CONFIDENCE].to_numpy(np.float32)
        if Key.obs.VELOCITY_CONFIDENCE in adata.obs
        else None
    )
    embedding = {
        key: np.asarray(adata.obsm[Key.obsm.velocity(key)])[:, :2]
        for key in adata.obsm
        if key.startswith("X_") and Key.obsm.velocity(key) in adata.obsm
    }
    derived = None
    if graph is not None and graph_neg is not None and transitions is not None:
        derived = Derived(
            graph=graph.tocsr(),
            graph_neg=graph_neg.tocsr(),
            transitions=transitions,
            velocity_embedding={},
            obs=pd.DataFrame(index=adata.obs_names),
            params={},
        )
    return Fit(
        label=f"{result.model} (from file)",
        key=(result.model, (("source", "'file'"),)),
        result=result,
        transitions=transitions,
        confidence=confidence,
        velocity_embedding=embedding,
        derived=derived,
    )


def results_adata(adata: AnnData, fit: Fit | None) -> AnnData:
    """Copy ``adata`` and write ``fit`` into the copy under scVelo's/CellRank's keys.

    Returns
    -------
    A new AnnData: what ``VelocityResult.to_adata`` writes, plus what ``explorer fit``
    writes after the fit (velocity graphs, projection, confidence), obsp ``T_fwd``
    (CellRank's transition matrix), obsm ``velocity_<basis>`` and obs
    ``velocity_confidence`` when the fit has them. ``adata`` itself without a fit.
    """
    out = adata.copy()
    if fit is None:
        return out
    fit.result.to_adata(out)
    if fit.derived is not None:
        fit.derived.to_adata(out)
    if fit.transitions is not None:
        out.obsp[Key.obsp.TRANSITIONS] = fit.transitions
    for basis, v in fit.velocity_embedding.items():
        out.obsm[Key.obsm.velocity(basis)] = v
    if fit.confidence is not None:
        out.obs[Key.obs.VELOCITY_CONFIDENCE] = fit.confidence
    return out


def load_dataset(path: Path, *, progress: ProgressCallback | None = None) -> AnnData:
    """Read a dataset file and preprocess it when it has no ``Ms``/``Mu`` yet (as ``explorer fit`` does)."""
    adata = read(path)
    if not is_preprocessed(adata) or Key.obsm.UMAP not in adata.obsm:
        has_basis = any(k.startswith("X_") and k != Key.obsm.PCA for k in adata.obsm)
        prepare(adata, compute_umap=not has_basis, progress=progress)
    return adata
