"""One call from counts to velocity on an embedding: what ``explorer fit`` runs.

:func:`prepare` (filter, normalise, neighbours, moments, UMAP) -> ``model.fit`` ->
:func:`derive` (velocity graph -> transition matrix -> projection -> confidence) ->
``result.to_adata`` and ``Derived.to_adata``. Each step is the public function of its
module; this only orders them and reports progress (and, for a model that hands its
velocities over before its last steps, runs :func:`derive` beside them). :func:`derive`
is everything after the fit: ``explorer fit`` (:func:`run_velocity`) and the app's Run button
(:func:`explorer.app.jobs.fit_and_derive`) both call it, so the two give identical
graphs, projections and confidences for the same model and seed.

This is the layer that joins the others: :mod:`explorer.data` works on count matrices,
:mod:`explorer.graph` on cell graphs and :mod:`explorer.models` fits; only here (and in
the app and CLI above it) do they meet.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from explorer._types import PREPROCESS, InputError, Progress, option, report
from explorer.data.io import validate_counts
from explorer.data.preprocess import check_genes, check_options, filter_and_normalize, is_preprocessed
from explorer.graph.moments import compute_moments
from explorer.graph.neighbors import compute_neighbors, has_neighbors
from explorer.graph.projection import compute_velocity_embedding, project_graph
from explorer.graph.transition import (
    compute_transition_matrix,
    compute_velocity_confidence,
    compute_velocity_graph,
    drop_velocity_graphs,
    velocity_gene_mask,
)
from explorer.keys import Key
from explorer.models import get_model

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from scipy import sparse

    from explorer._types import FloatArray, ProgressCallback
    from explorer.models.base import VelocityResult

logger = logging.getLogger(__name__)

#: the fewest cells :func:`prepare` takes (UMAP's two-dimensional spectral layout needs 4)
MIN_CELLS = 4

#: the steps of :func:`run_velocity`, in order, as they are reported to ``progress``
STEPS: tuple[str, ...] = ("preprocess", "fit", "velocity graph", "embedding", "confidence")

#: the steps of :func:`derive` and their shares of its progress
_DERIVE_STEPS: tuple[tuple[str, float, float], ...] = (
    ("velocity graph", 0.0, 0.8),
    ("embedding", 0.8, 0.9),
    ("confidence", 0.9, 1.0),
)


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


@dataclass(frozen=True, slots=True)
class Derived:
    """What :func:`derive` computes from a fit, ready to be written under scVelo's keys.

    Attributes
    ----------
    graph, graph_neg
        ``(n_obs, n_obs)`` positive and negative velocity graph
        (``obsp['velocity_graph']``, ``obsp['velocity_graph_neg']``).
    transitions
        Row-stochastic transition matrix (``obsp['T_fwd']``, CellRank's key).
    velocity_embedding
        Embedding key (``X_umap``) -> ``(n_obs, n_dims)`` velocity projected on it with
        scVelo's signed kernel (``obsm['velocity_umap']``).
    obs
        Per-cell columns: ``velocity_self_transition``, ``velocity_length``,
        ``velocity_confidence``, ``velocity_confidence_transition``.
    params
        What the graph steps add to ``uns['velocity_params']`` (``mode_neighbors``,
        ``n_recurse_neighbors``, ``embeddings``).
    """

    graph: sparse.csr_matrix
    graph_neg: sparse.csr_matrix
    transitions: sparse.csr_matrix
    velocity_embedding: dict[str, FloatArray]
    obs: pd.DataFrame
    params: dict[str, Any]

    @property
    def confidence(self) -> FloatArray:
        """``(n_obs,)`` float32 velocity confidence (scVelo's ``velocity_confidence``)."""
        return self.obs[Key.obs.VELOCITY_CONFIDENCE].to_numpy(np.float32)

    def to_adata(self, adata: AnnData) -> None:
        """Write into ``adata`` (the cells :func:`derive` ran on), in place.

        Returns
        -------
        None; sets obsp ``velocity_graph``, ``velocity_graph_neg``, ``T_fwd``, obsm
        ``velocity_<basis>``, the columns of :attr:`obs` and the keys of :attr:`params`
        in ``uns['velocity_params']``.
        """
        if not adata.obs_names.equals(self.obs.index):
            msg = (
                f"These velocity graphs belong to {len(self.obs)} other cells; the AnnData has "
                f"{adata.n_obs}. Write them into the AnnData they were computed on (or a copy of it)."
            )
            raise ValueError(msg)
        adata.obsp[Key.obsp.VELOCITY_GRAPH] = self.graph
        adata.obsp[Key.obsp.VELOCITY_GRAPH_NEG] = self.graph_neg
        adata.obsp[Key.obsp.TRANSITIONS] = self.transitions
        for key, v in self.velocity_embedding.items():
            adata.obsm[Key.obsm.velocity(key)] = v
        for col in self.obs.columns:
            adata.obs[col] = self.obs[col].to_numpy()
        params = dict(adata.uns.get(Key.uns.VELOCITY_PARAMS, {}))
        params.update(self.params)
        adata.uns[Key.uns.VELOCITY_PARAMS] = params

    def project(self, embedding: FloatArray) -> FloatArray:
        """Project the velocity on another ``(n_obs, n_dims)`` embedding, as :func:`derive` does."""
        return project_graph(self.graph, self.graph_neg, embedding)


def prepare(
    adata: AnnData,
    *,
    min_shared_counts: int = PREPROCESS.min_shared_counts,
    n_top_genes: int | None = PREPROCESS.n_top_genes,
    n_pcs: int = PREPROCESS.n_pcs,
    n_neighbors: int = PREPROCESS.n_neighbors,
    compute_umap: bool = True,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> None:
    """Run the whole scVelo-compatible preprocessing in place.

    Raw counts go through :func:`~explorer.data.preprocess.filter_and_normalize`, then PCA + kNN graph
    (:func:`explorer.graph.neighbors.compute_neighbors`) and the moments ``Ms``/``Mu``
    (:func:`explorer.graph.moments.compute_moments`). Data that already has ``Ms`` and
    ``Mu`` is not normalised again: only a missing neighbour graph or UMAP is added.

    Parameters
    ----------
    adata
        Data from :func:`explorer.data.io.read`.
    min_shared_counts, n_top_genes
        Passed to :func:`~explorer.data.preprocess.filter_and_normalize`.
    n_pcs, n_neighbors
        PCA components and neighbours (including the cell itself) of the kNN graph.
    compute_umap
        Compute ``obsm['X_umap']`` when the data has none.
    seed
        Seed of PCA, neighbour search and UMAP.
    progress
        Receives one :class:`~explorer._types.Progress` per step.

    Returns
    -------
    Nothing; sets what ``filter_and_normalize``, ``compute_neighbors``,
    ``compute_moments`` and ``compute_umap`` set (layers ``Ms``, ``Mu``; obsm
    ``X_pca``, ``X_umap``; obsp ``distances``, ``connectivities``; uns ``neighbors``,
    ``pca``, ``umap``) and uns ``explorer_preprocess`` with the parameters used.

    Raises
    ------
    InputError
        Missing layers, no genes left, or fewer cells than ``n_neighbors``.
    """
    check_options(
        min_shared_counts=min_shared_counts, n_top_genes=n_top_genes, n_pcs=n_pcs, n_neighbors=n_neighbors
    )
    validate_counts(adata)
    check_genes(adata)
    if adata.n_obs < MIN_CELLS:
        # UMAP's spectral layout of 2 dimensions needs 4 cells (3 ended in a scipy traceback)
        msg = (
            f"too few cells: found {adata.n_obs}; explorer needs {MIN_CELLS} at least (a velocity "
            "analysis needs hundreds). Load more cells."
        )
        raise InputError(msg)
    if adata.n_obs < n_neighbors:
        msg = (
            f"too few cells: found {adata.n_obs}, fewer than n_neighbors={n_neighbors} asked for. "
            f"Pass {option('n_neighbors')} at most {adata.n_obs} or load more cells."
        )
        raise InputError(msg)

    already = is_preprocessed(adata)
    steps = ["filter and normalise", "neighbours", "moments", "UMAP"]
    total = len(steps)
    if already:
        logger.info("layers Ms/Mu present: using the data as it is (no normalisation)")
    else:
        report(progress, 0, total, "filtering and normalising")
        n_before = adata.n_vars
        filter_and_normalize(adata, min_shared_counts=min_shared_counts, n_top_genes=n_top_genes)
        check_genes(adata, n_before=n_before, min_shared_counts=min_shared_counts)
    report(progress, 1, total, "neighbours")
    if not already or not has_neighbors(adata):
        compute_neighbors(adata, n_neighbors=n_neighbors, n_pcs=n_pcs, seed=seed)
    report(progress, 2, total, "moments")
    if not already:
        compute_moments(adata)
    report(progress, 3, total, "UMAP")
    made_umap = False
    if compute_umap and Key.obsm.UMAP not in adata.obsm:
        # scanpy's UMAP (and numba's compilation of umap-learn) loads only when drawn
        from explorer.graph.embedding import compute_umap as _compute_umap

        _compute_umap(adata, seed=seed)
        made_umap = True
    report(progress, 4, total, "done")
    adata.uns[Key.uns.PREPROCESS] = {
        "normalized": not already,
        "min_shared_counts": min_shared_counts,
        "n_top_genes": "None" if n_top_genes is None else n_top_genes,
        "n_pcs": n_pcs,
        "n_neighbors": n_neighbors,
        "seed": seed,
        "umap_computed": made_umap,
        "n_obs": adata.n_obs,
        "n_vars": adata.n_vars,
    }


def _derive_step(progress: ProgressCallback | None, index: int) -> ProgressCallback | None:
    """Map one step of :func:`derive` onto its share of ``progress``."""
    if progress is None:
        return None
    name, start, stop = _DERIVE_STEPS[index]

    def forward(p: Progress) -> None:
        done = int(1000 * (start + (stop - start) * p.fraction))
        progress(Progress(done, 1000, f"{name}: {p.message}" if p.message else name))

    return forward


def derive(
    adata: AnnData,
    result: VelocityResult,
    *,
    basis: str = "umap",
    progress: ProgressCallback | None = None,
    velocity_graph: Mapping[str, Any] | None = None,
) -> Derived:
    """Everything after the fit: velocity graph, transition matrix, projection, confidence.

    ``adata`` is left untouched (it may be shared read-only between the app's
    sessions): the graph functions of :mod:`explorer.graph` run on a light AnnData that
    shares ``adata``'s arrays and holds what ``result.to_adata`` writes.

    Parameters
    ----------
    adata
        The cells ``result`` was fitted on, with layer ``Ms``, obsp ``distances`` (and
        ``connectivities``) and ``obsm['X_<basis>']``.
    result
        The model's fit.
    basis
        Embedding to project the velocity on (``umap`` or ``X_umap``).
    progress
        Receives 1000 steps: the velocity graph fills the first 80 %.
    velocity_graph
        The model's own velocity graph, if it computed scVelo's (the dynamical model's
        ``velocity_graph_``: ``graph``, ``graph_neg`` and the ``genes`` mask it used):
        reused when those genes are the ones the graph step would use, else ignored.

    Returns
    -------
    The :class:`Derived` arrays; ``Derived.to_adata`` writes them.
    """
    missing = [k for k in (Key.obsp.DISTANCES,) if k not in adata.obsp]
    if missing or Key.layers.MS not in adata.layers:
        msg = (
            f"Expected a neighbour graph (obsp {Key.obsp.DISTANCES!r}) and layer 'Ms' to compute the "
            f"velocity graph; found obsp {sorted(adata.obsp)} and layers {sorted(adata.layers)}. "
            "Preprocess the data first (explorer.pipeline.prepare, or `explorer fit`)."
        )
        raise InputError(msg)
    basis_key = Key.obsm.embedding(basis)
    work = _graph_adata(adata, basis_key)
    result.to_adata(work)
    before = set(work.obs.columns)
    graphs = None
    if (
        velocity_graph is not None
        and velocity_graph["graph"].shape == (work.n_obs, work.n_obs)
        and np.array_equal(velocity_graph["genes"], velocity_gene_mask(work))
    ):
        graphs = (velocity_graph["graph"], velocity_graph["graph_neg"])
    compute_velocity_graph(work, progress=_derive_step(progress, 0), graphs=graphs)
    transitions = compute_transition_matrix(work)
    report(_derive_step(progress, 1), 0, 1)
    compute_velocity_embedding(work, basis=basis_key)
    report(_derive_step(progress, 2), 0, 1)
    compute_velocity_confidence(work, transitions=transitions)
    report(progress, 1000, 1000, "done")
    added = [c for c in work.obs.columns if c not in before]
    params = work.uns[Key.uns.VELOCITY_PARAMS]
    return Derived(
        graph=work.obsp[Key.obsp.VELOCITY_GRAPH],
        graph_neg=work.obsp[Key.obsp.VELOCITY_GRAPH_NEG],
        transitions=transitions,
        velocity_embedding={basis_key: np.asarray(work.obsm[Key.obsm.velocity(basis_key)])},
        obs=work.obs[added].copy(),
        params={
            k: params[k]
            for k in (Key.uns.MODE_NEIGHBORS, Key.uns.N_RECURSE_NEIGHBORS, Key.uns.EMBEDDINGS)
            if k in params
        },
    )


def _graph_adata(adata: AnnData, basis_key: str) -> AnnData:
    """Build a light AnnData for the graph steps: ``adata``'s names, ``Ms``, graphs and embedding, shared."""
    obsm = {basis_key: adata.obsm[basis_key]} if basis_key in adata.obsm else {}
    return AnnData(
        obs=pd.DataFrame(index=adata.obs_names.copy()),
        var=pd.DataFrame(index=adata.var_names.copy()),
        layers={Key.layers.MS: adata.layers[Key.layers.MS]},
        obsm=obsm,
        obsp={k: adata.obsp[k] for k in (Key.obsp.CONNECTIVITIES, Key.obsp.DISTANCES) if k in adata.obsp},
        uns={Key.uns.NEIGHBORS: dict(adata.uns.get(Key.uns.NEIGHBORS, {}))},
    )


def run_velocity(
    adata: AnnData,
    *,
    model: str = "stochastic",
    model_params: dict[str, Any] | None = None,
    basis: str = "umap",
    min_shared_counts: int = PREPROCESS.min_shared_counts,
    n_top_genes: int | None = PREPROCESS.n_top_genes,
    n_pcs: int = PREPROCESS.n_pcs,
    n_neighbors: int = PREPROCESS.n_neighbors,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    on_arrays: Callable[[AnnData], None] | None = None,
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
        Preprocessing, with scVelo's names and defaults (:data:`explorer._types.PREPROCESS`).
    seed
        Seed for PCA/UMAP and the model.
    progress
        Receives the pipeline's progress, each step's own reports folded in.
    on_arrays
        Called with ``adata`` when a set of its arrays is final: once it is preprocessed
        (before the model's fit) and once the fit's result is in it. With a model that
        hands its velocities over early (the dynamical model's ``on_velocity``), also with
        light AnnDatas holding the velocity layers and then the velocity graphs as soon
        as they exist, from a second thread (the very arrays ``adata`` ends up with).
        ``explorer fit`` writes them to its output there, beside the work
        (:class:`explorer.data.io.H5adWriter`).

    Returns
    -------
    The model's result. ``adata`` gains everything :func:`prepare` and
    ``VelocityResult.to_adata`` and :meth:`Derived.to_adata` write: obsp
    ``velocity_graph``, ``velocity_graph_neg``, ``T_fwd``, obsm ``velocity_<basis>``,
    obs ``velocity_confidence``, ``velocity_length`` and the rest.
    """
    params = {"seed": seed, **(model_params or {})}
    try:
        estimator = get_model(model, **params)
    except TypeError as err:
        msg = (
            f"Invalid parameters for model {model!r}: {err}. "
            "Run `explorer models` to see each model's parameters."
        )
        raise InputError(msg) from None

    basis_key = Key.obsm.embedding(basis)
    clock = [(time.perf_counter(), time.process_time())]
    stages: dict[str, list[float]] = {}

    def stage(name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        stages[name] = [round(now[0] - clock[0][0], 2), round(now[1] - clock[0][1], 2)]
        clock[0] = now

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

    stage("preprocess")
    if on_arrays is not None:
        on_arrays(adata)
    with _EarlyDerive(estimator, adata, basis_key, on_arrays=on_arrays) as early:
        result = estimator.fit(adata, progress=_substep(progress, 1), **early.fit_kwargs)
        stage("model fit")
        # derive reads none of the keys the result writes (it works on a light copy); it
        # writes the graphs afresh, so an earlier velocity's go without a warning
        drop_velocity_graphs(adata)
        result.to_adata(adata)
        if on_arrays is not None:
            on_arrays(adata)
        derived = early.result()
        if derived is None:
            # the dynamical model computes scVelo's velocity graph for its root cells: not twice
            graph = getattr(estimator, "velocity_graph_", None)
            derived = derive(
                adata, result, basis=basis_key, progress=_derive_progress(progress), velocity_graph=graph
            )
        else:
            report(_derive_progress(progress), 1000, 1000, "done")
    stage("graph, projection, confidence")
    derived.to_adata(adata)
    stage("to adata")
    logger.info("pipeline stages (s, [wall, cpu]): %s", stages)
    report(progress, len(STEPS), len(STEPS), "done")
    return result


class _EarlyDerive:
    """Run :func:`derive` in a second thread while the model fits its last steps.

    A model whose ``fit`` takes ``on_velocity`` (the dynamical model) calls it as soon
    as its velocities and velocity graph are final, before its latent time and onset
    fit (about a third of its time on the pancreas): :func:`derive` needs neither, so it
    runs beside them, with the same inputs as after the fit, and gives the same arrays.
    Only where compiled kernels may be called from two threads at once: numba's
    ``workqueue`` threading layer (used where neither TBB nor OpenMP is installed)
    aborts the process on concurrent parallel kernels, so there derive runs after the
    fit as before. ``on_arrays`` (:func:`run_velocity`'s) gets the velocity layers as
    soon as they are known and derive's graphs as soon as they are computed, each in a
    light AnnData holding the very arrays ``adata`` will hold. Used as a context
    manager, the thread is always joined.
    """

    def __init__(
        self,
        estimator: Any,
        adata: AnnData,
        basis_key: str,
        *,
        on_arrays: Callable[[AnnData], None] | None = None,
    ) -> None:
        self._estimator = estimator
        self._adata = adata
        self._basis_key = basis_key
        self._on_arrays = on_arrays
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future[Derived] | None = None
        takes_hook = "on_velocity" in inspect.signature(estimator.fit).parameters
        #: keyword arguments for the model's ``fit``
        self.fit_kwargs: dict[str, Any] = {"on_velocity": self._start} if takes_hook else {}

    def __enter__(self) -> _EarlyDerive:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _start(self, partial: VelocityResult) -> None:
        if self._future is not None or not _kernels_thread_safe():
            return
        if Key.obsp.DISTANCES not in self._adata.obsp or Key.layers.MS not in self._adata.layers:
            return  # derive's own error, after the fit, names what adata lacks
        graph = getattr(self._estimator, "velocity_graph_", None)
        # what derive reads of adata, taken here: the thread never touches adata, which
        # this thread writes the result into once the fit is done
        inputs = _graph_adata(self._adata, self._basis_key)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explorer-derive")
        self._future = self._pool.submit(self._derive, inputs, partial, graph)

    def _derive(self, inputs: AnnData, partial: VelocityResult, graph: Mapping[str, Any] | None) -> Derived:
        _yield_to_other_threads()
        if self._on_arrays is not None:
            self._on_arrays(self._light(layers=partial.layer_arrays()))
        derived = derive(inputs, partial, basis=self._basis_key, velocity_graph=graph)
        if self._on_arrays is not None:
            light = self._light()
            derived.to_adata(light)  # the graphs and projections, as run_velocity writes them after
            self._on_arrays(light)
        return derived

    def _light(self, **slots: dict[str, Any]) -> AnnData:
        """Build an AnnData of ``adata``'s cells and genes holding only ``slots``' arrays (not copied)."""
        return AnnData(
            obs=pd.DataFrame(index=self._adata.obs_names),
            var=pd.DataFrame(index=self._adata.var_names),
            **slots,
        )

    def result(self) -> Derived | None:
        """Return the early :func:`derive`'s result (its error raised here), or None if it did not run."""
        return None if self._future is None else self._future.result()


#: how much nicer than the fit's threads the early derive runs (Linux's per-thread nice)
_DERIVE_NICENESS = 10


def _yield_to_other_threads() -> None:
    """Raise this thread's nice value, so that it runs on what the fit's threads leave idle.

    The early derive is off the fit's critical path (root cells, shared time, onsets),
    which it would otherwise slow on a 2-core machine by taking a core from their
    compiled kernels. On Linux the nice value is per thread, and the OpenMP threads
    this thread's kernels start inherit it; elsewhere, or where it is refused, nothing
    changes. The thread ends with the derive, and the process's other threads keep theirs.
    """
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, nice + _DERIVE_NICENESS))
    except OSError:
        pass


def _kernels_thread_safe() -> bool:
    """Whether numba's parallel kernels may run in two threads at once (its threading layer)."""
    import numba

    try:
        return numba.threading_layer() != "workqueue"
    except ValueError:  # no parallel kernel has run yet: the layer is not chosen
        return False


def _derive_progress(progress: ProgressCallback | None) -> ProgressCallback | None:
    """Spread :func:`derive`'s progress over the pipeline's last three steps."""
    if progress is None:
        return None
    n, first = len(STEPS), STEPS.index("velocity graph")

    def forward(p: Progress) -> None:
        done = first + (n - first) * p.fraction
        progress(Progress(int(done * 1000), n * 1000, p.message or STEPS[first]))

    return forward
