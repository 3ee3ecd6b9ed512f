r"""Project velocities onto an embedding through the transition matrix (scVelo's ``velocity_embedding``).

A cell's projected velocity is the expected unit displacement towards its neighbours
under the transition matrix, minus what a uniform choice would give:

.. math::
    \\tilde v_i = \\sum_j \\left(T_{ij} - \\bar T_{i\\cdot}\\right)
    \\frac{e_j - e_i}{\\lVert e_j - e_i \\rVert}

over the neighbours :math:`j \\ne i` stored in row :math:`i` (Bergen et al. 2020; the
correction term is scVelo's ``probs.mean() * dX.sum(0)``, so an uninformative row
projects to about zero).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numba
import numpy as np
from scipy import sparse

from explorer._types import MissingInputError
from explorer.graph.transition import DEFAULT_SCALE, _vkey_name, get_velocity_graph, transition_blocks
from explorer.keys import Key

if TYPE_CHECKING:
    from collections.abc import Iterable

    from anndata import AnnData

    from explorer._types import FloatArray

logger = logging.getLogger(__name__)

#: matplotlib's default figure (6.4 x 4.8 in) and subplot box (left .125, right .9,
#: bottom .11, top .88): the axes aspect that ``quiver``'s autoscale sees in scVelo.
_AXES_ASPECT = (0.77 * 4.8) / (0.775 * 6.4)
#: matplotlib's default axes margins (5 % of the data range on each side)
_AXES_MARGIN = 0.05


def project_velocity(
    transitions: sparse.spmatrix, embedding: FloatArray, *, autoscale: bool = True
) -> FloatArray:
    """Velocity in an embedding from a transition matrix (scVelo's ``velocity_embedding``).

    Parameters
    ----------
    transitions
        ``(n_obs, n_obs)`` transition matrix; scVelo projects the signed one,
        ``transition_matrix(g, g_neg, use_negative_cosines=True)``, which
        :func:`compute_velocity_embedding` builds. The diagonal is ignored.
    embedding
        ``(n_obs, n_dims)`` coordinates, e.g. ``obsm['X_umap']``.
    autoscale
        Divide by scVelo's arrow scale (:func:`quiver_scale`), so that arrows drawn at
        this length look as in scVelo; the direction is unchanged.

    Returns
    -------
    ``(n_obs, n_dims)`` float32 velocities in embedding units.
    """
    E = np.asarray(embedding, dtype=np.float64)
    T = sparse.csr_matrix(transitions, dtype=np.float64)
    if T.shape != (E.shape[0], E.shape[0]):
        n = E.shape[0]
        msg = f"Expected a ({n}, {n}) transition matrix for {n} cells, found {T.shape}."
        raise ValueError(msg)
    return _projected([(0, T.shape[0], T)], E, autoscale=autoscale)


def project_graph(
    graph: sparse.spmatrix,
    graph_neg: sparse.spmatrix | None,
    embedding: FloatArray,
    *,
    scale: float = DEFAULT_SCALE,
    self_transitions: bool = True,
    use_negative_cosines: bool = True,
    self_probabilities: FloatArray | None = None,
    autoscale: bool = True,
) -> np.ndarray:
    """:func:`project_velocity` of a velocity graph's transition matrix, never built whole.

    The matrix (scVelo's projection kernel: ``use_negative_cosines`` by default) is made a
    block of rows at a time (:func:`~explorer.graph.transition.transition_blocks`, whose
    parameters these are) and each block projected as it comes: the same numbers as
    :func:`project_velocity` of the whole matrix, with one block's temporaries (the
    signed matrix beside the forward one :func:`~explorer.pipeline.derive` keeps was
    0.4 GB at 100,000 cells).
    """
    blocks = transition_blocks(
        graph,
        graph_neg,
        scale=scale,
        self_transitions=self_transitions,
        use_negative_cosines=use_negative_cosines,
        self_probabilities=self_probabilities,
    )
    return _projected(blocks, embedding, autoscale=autoscale)


def _projected(
    blocks: Iterable[tuple[int, int, sparse.spmatrix]], embedding: FloatArray, *, autoscale: bool
) -> np.ndarray:
    """:func:`project_velocity` from the transition matrix's rows ``a:b`` given a block at a time.

    ``blocks`` yields ``(a, b, rows)`` (:func:`~explorer.graph.transition.transition_blocks`),
    so the whole matrix need not exist; the same numbers as from the whole.
    """
    E = np.ascontiguousarray(embedding, dtype=np.float64)
    V = np.zeros(E.shape)
    for a, b, rows in blocks:
        rows = sparse.csr_matrix(rows, dtype=np.float64)
        _project_kernel(rows.indptr, rows.indices, rows.data, E, V[a:b], a)
    if autoscale:
        scale = quiver_scale(E, V)
        if scale > 0:
            V /= 3.0 * scale
    return V.astype(np.float32)


@numba.njit(parallel=True, cache=True)
def _project_kernel(indptr, indices, probs, E, out, row0):  # pragma: no cover - compiled
    """Per cell ``sum p (dx / |dx|) - mean(p) sum dx / |dx|`` over its off-diagonal nonzero transitions.

    ``dx`` is the neighbour's position minus the cell's, unit length (0 for identical
    positions, which carry no direction; scVelo sets their NaN to 0). Cells in parallel;
    the CSR rows and ``out`` are those of cells ``row0, row0 + 1, ...``.
    """
    n_dims = E.shape[1]
    for r in numba.prange(out.shape[0]):
        i = row0 + r
        weighted = np.zeros(n_dims)
        plain = np.zeros(n_dims)
        dx = np.empty(n_dims)
        total = 0.0
        count = 0
        for k in range(indptr[r], indptr[r + 1]):
            j = indices[k]
            p = probs[k]
            if j == i or p == 0:
                continue
            norm2 = 0.0
            for d in range(n_dims):
                dx[d] = E[j, d] - E[i, d]
                norm2 += dx[d] * dx[d]
            norm = np.sqrt(norm2)
            for d in range(n_dims):
                unit = dx[d] / norm if norm > 0 else 0.0
                weighted[d] += p * unit
                plain[d] += unit
            total += p
            count += 1
        mean_prob = total / max(count, 1)
        for d in range(n_dims):
            out[r, d] = weighted[d] - mean_prob * plain[d]


def quiver_scale(embedding: FloatArray, velocity: FloatArray) -> float:
    """Compute the arrow scale matplotlib's ``quiver`` would pick, without matplotlib.

    scVelo divides projected velocities by ``3 * scale`` from ``ax.quiver(...,
    angles="xy", scale_units="xy", scale=None)`` on a default figure
    (``quiver_autoscale``); matplotlib sets ``scale = 1.8 * mean(arrow length in axes
    widths) * max(10, sqrt(n))``. This reproduces that for the default figure size and
    margins, on the first two dimensions.

    Returns
    -------
    The scale in embedding units (0 when there is nothing to scale).
    """
    E = np.asarray(embedding, dtype=np.float64)[:, :2]
    V = np.asarray(velocity, dtype=np.float64)[:, :2]
    finite = np.isfinite(V).all(axis=1) & np.isfinite(E).all(axis=1)
    if not finite.any():
        return 0.0
    span = E[finite].max(axis=0) - E[finite].min(axis=0)
    view = np.where(span > 0, span, 1.0) * (1.0 + 2.0 * _AXES_MARGIN)
    # arrow length in units of the axes width (x) and the same pixels for y
    length = np.hypot(V[finite, 0] / view[0], V[finite, 1] * _AXES_ASPECT / view[1])
    n_arrows = finite.sum()
    return float(1.8 * length.mean() * max(10.0, math.sqrt(n_arrows)))


def compute_velocity_embedding(
    adata: AnnData,
    *,
    basis: str = "umap",
    vkey: str = Key.layers.VELOCITY,
    scale: float = DEFAULT_SCALE,
    self_transitions: bool = True,
    use_negative_cosines: bool = True,
    autoscale: bool = True,
) -> None:
    """Project the velocity graph onto ``obsm['X_<basis>']`` (scVelo's ``tl.velocity_embedding``).

    Parameters
    ----------
    adata
        Needs the velocity graph (``obsp`` or ``uns``) and ``obsm['X_<basis>']``.
    basis
        Embedding name, with or without ``X_``.
    vkey
        Velocity whose graph to use.
    scale, self_transitions, use_negative_cosines
        Transition kernel, as in :func:`~explorer.graph.transition.transition_matrix`;
        scVelo's projection defaults.
    autoscale
        scVelo's arrow scaling (:func:`quiver_scale`).

    Returns
    -------
    None; sets ``obsm['velocity_<basis>']`` and appends ``basis`` to
    ``uns['velocity_params']['embeddings']``, which tells scVelo's plots that the
    projection is up to date.
    """
    emb_key = Key.obsm.embedding(basis)
    if emb_key not in adata.obsm:
        found = sorted(adata.obsm)
        msg = (
            f"Embedding {emb_key!r} not found; adata.obsm has {found}. "
            "Compute it first or pass another basis."
        )
        raise MissingInputError(msg)
    graph, graph_neg = get_velocity_graph(adata, vkey=vkey)
    V_emb = project_graph(
        graph,
        graph_neg,
        adata.obsm[emb_key],
        scale=scale,
        self_transitions=self_transitions,
        use_negative_cosines=use_negative_cosines,
        autoscale=autoscale,
    )
    name = emb_key.removeprefix("X_")
    adata.obsm[_vkey_name(Key.obsm.velocity(name), vkey)] = V_emb
    params_key = _vkey_name(Key.uns.VELOCITY_PARAMS, vkey)
    params = dict(adata.uns.get(params_key, {}))
    done = [str(b) for b in np.atleast_1d(params.get(Key.uns.EMBEDDINGS, [])) if str(b) != name]
    params[Key.uns.EMBEDDINGS] = [*done, name]
    adata.uns[params_key] = params
