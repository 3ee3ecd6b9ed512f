"""Model fits off the server's event loop, with progress and cancellation.

A :class:`Job` runs one callable on a daemon thread. The callable receives a
:class:`~explorer.ProgressCallback`; each report is forwarded to ``on_progress`` through
``dispatch`` (in the app: the session document's next tick, so widgets change on the
event loop) and, once :meth:`Job.cancel` was called, raises
:class:`~explorer.FitCancelled` instead, which stops the fit between two steps: models
never write into the AnnData they fit, so nothing is left half-done.

:func:`fit_and_derive` is what a Run button starts: the model's fit, then the velocity
graph, the transition matrix, the projection on the embedding and its streamlines (the
maths lives in :mod:`explorer.graph`), bundled as a :class:`Fit`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from explorer._types import FitCancelled, Progress
from explorer.keys import Key

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from anndata import AnnData
    from scipy.sparse import csr_matrix

    from explorer._types import ProgressCallback
    from explorer.models.base import VelocityResult

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: at most this many progress updates per second reach the page (a fit may report per gene)
_PROGRESS_INTERVAL_S = 0.1

#: shares of a Run's progress bar: the fit, then the graph steps
_FIT_SHARE = 0.8

FitKey = tuple[str, tuple[tuple[str, str], ...]]


_TORCH_LOCK = threading.Lock()
_torch_configured = False
#: set by :func:`configure_torch`'s first caller: from then on every fit configures torch first
_torch_serving = threading.Event()


def configure_torch(*, now: bool = True) -> None:
    """Import torch once per process and give it one thread (a no-op after the first call).

    A fit runs on a worker thread beside the server's event loop; one torch thread leaves
    the other core to the page (the development machines have two). The server calls
    this at start-up (``now=False``: only marks the process as serving, the import comes
    later on a background thread); from then on :func:`fit_and_derive` calls it before
    each fit, so a Run that comes before the background import still gets the setting.
    Outside a server (tests, notebooks) fits leave torch's settings alone. Thread-safe.
    """
    global _torch_configured  # noqa: PLW0603 - process-wide, set once
    _torch_serving.set()
    if not now:
        return
    with _TORCH_LOCK:
        if _torch_configured:
            return
        _torch_configured = True
        try:
            import torch
        except ImportError:  # torch is a dependency, but the views work without it
            return
        torch.set_num_threads(1)


def fit_key(model: str, params: Mapping[str, Any]) -> FitKey:
    """Cache key of a fit: the model's name and its parameters, frozen and sorted."""
    return model, tuple(sorted((str(k), repr(v)) for k, v in params.items()))


def fit_label(model: str, params: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> str:
    """Name a fit: the model, plus each parameter that differs from its default."""
    defaults = defaults or {}
    changed = [f"{k}={v}" for k, v in sorted(params.items()) if k not in defaults or defaults[k] != v]
    return f"{model} ({', '.join(changed)})" if changed else model


@dataclass(slots=True)
class Fit:
    """A fitted model and what the views draw from it.

    Attributes
    ----------
    label
        Name shown in the app (``"dynamical"``, ``"dynamical (max_iter=5)"``).
    key
        Cache key, :func:`fit_key` of model and parameters.
    result
        The model's :class:`~explorer.VelocityResult`.
    transitions
        Row-stochastic ``(n_obs, n_obs)`` transition matrix from the velocity graph, or None.
    confidence
        ``(n_obs,)`` velocity confidence (scVelo's ``velocity_confidence``), or None.
    velocity_embedding
        Basis key (``X_umap``) -> ``(n_obs, 2)`` velocity projected on it.
    streamlines
        Basis key -> streamline polylines on it.
    """

    label: str
    key: FitKey
    result: VelocityResult
    transitions: csr_matrix | None = None
    confidence: np.ndarray | None = None
    velocity_embedding: dict[str, np.ndarray] = field(default_factory=dict)
    streamlines: dict[str, list[np.ndarray]] = field(default_factory=dict)


class Job(Generic[T]):
    """Run ``target(progress)`` on a daemon thread; report, finish or fail through callbacks.

    Parameters
    ----------
    target
        The work; it must call the progress callback it is given now and then, which is
        where a cancellation takes effect.
    on_progress, on_done, on_error, on_cancelled
        Called through ``dispatch`` with a :class:`~explorer.Progress`, the result, the
        exception, and nothing.
    dispatch
        How callbacks reach the caller's thread; the default calls them directly on the
        worker thread.
    name
        Thread name, for logs.
    """

    def __init__(
        self,
        target: Callable[[ProgressCallback], T],
        *,
        on_progress: Callable[[Progress], None] | None = None,
        on_done: Callable[[T], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_cancelled: Callable[[], None] | None = None,
        dispatch: Callable[[Callable[[], None]], None] | None = None,
        name: str = "explorer-job",
    ) -> None:
        self._target = target
        self._on_progress = on_progress
        self._on_done = on_done
        self._on_error = on_error
        self._on_cancelled = on_cancelled
        self._dispatch = dispatch or (lambda fn: fn())
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._last_report = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.outcome: str = "pending"

    def start(self) -> Job[T]:
        """Start the worker thread; returns ``self``."""
        self.outcome = "running"
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the job to stop at its next progress report."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancel.is_set()

    @property
    def running(self) -> bool:
        """Whether the worker has not finished yet."""
        return self._thread.is_alive() and not self._finished.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to finish (callbacks sent); True if it did within ``timeout``."""
        return self._finished.wait(timeout)

    def _progress(self, p: Progress) -> None:
        if self._cancel.is_set():
            raise FitCancelled
        now = time.monotonic()
        if self._on_progress is not None and (
            now - self._last_report >= _PROGRESS_INTERVAL_S or p.step >= p.total
        ):
            self._last_report = now
            callback = self._on_progress
            self._dispatch(lambda: callback(p))

    def _run(self) -> None:
        try:
            value = self._target(self._progress)
            if self._cancel.is_set():
                raise FitCancelled  # noqa: TRY301 - a cancel that came after the last report
        except FitCancelled:
            self.outcome = "cancelled"
            if self._on_cancelled is not None:
                self._dispatch(self._on_cancelled)
        except Exception as err:  # noqa: BLE001 - any failure becomes a message in the app
            logger.exception("background job failed")
            self.outcome = "error"
            if self._on_error is not None:
                # bind the exception now: Python unbinds `err` when this block ends, before
                # a dispatched callback runs on the event loop
                self._dispatch(functools.partial(self._on_error, err))
        else:
            self.outcome = "done"
            if self._on_done is not None:
                callback_done = self._on_done
                self._dispatch(lambda: callback_done(value))
        finally:
            self._finished.set()


def _scaled(progress: ProgressCallback | None, start: float, stop: float, prefix: str) -> ProgressCallback:
    """Forward a sub-step's progress onto ``[start, stop)`` of a 1000-step bar."""

    def forward(p: Progress) -> None:
        if progress is not None:
            done = start + (stop - start) * p.fraction
            progress(Progress(int(done * 1000), 1000, f"{prefix}: {p.message}" if p.message else prefix))

    return forward


def _working_adata(adata: AnnData, result: VelocityResult) -> AnnData:
    """Build a light AnnData sharing ``adata``'s arrays, with ``result``'s velocity in its layers.

    The graph functions write their outputs into the AnnData they get; giving them this
    one keeps the dataset itself, shared read-only between sessions, untouched.
    """
    import pandas as pd
    from anndata import AnnData

    work = AnnData(
        obs=pd.DataFrame(index=adata.obs_names.copy()),
        var=pd.DataFrame(index=adata.var_names.copy()),
        layers={Key.layers.MS: adata.layers[Key.layers.MS], Key.layers.VELOCITY: result.velocity},
        obsm={k: v for k, v in adata.obsm.items() if k.startswith("X_")},
        obsp={k: adata.obsp[k] for k in (Key.obsp.CONNECTIVITIES, Key.obsp.DISTANCES) if k in adata.obsp},
        uns={
            Key.uns.NEIGHBORS: dict(adata.uns.get(Key.uns.NEIGHBORS, {})),
            # the velocity graph takes square roots of stochastic velocities, as scVelo does
            Key.uns.VELOCITY_PARAMS: {"mode": result.model},
        },
    )
    work.var[Key.var.VELOCITY_GENES] = np.asarray(result.velocity_genes, dtype=bool)
    return work


def derive(
    adata: AnnData,
    result: VelocityResult,
    *,
    basis: str,
    progress: ProgressCallback | None = None,
) -> tuple[csr_matrix | None, np.ndarray | None, dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """Velocity graph, transition matrix, confidence, projection and streamlines of a result.

    Returns ``(transitions, confidence, velocity_embedding, streamlines)``; the graph
    parts are None (and the dicts empty) when ``adata`` has no neighbour graph.
    """
    from explorer.graph.projection import project_velocity
    from explorer.graph.streamlines import compute_streamlines
    from explorer.graph.transition import (
        compute_velocity_confidence,
        compute_velocity_graph,
        transition_matrix,
    )

    if Key.obsp.CONNECTIVITIES not in adata.obsp:
        logger.info("no neighbour graph in the data: no transitions or streamlines for %s", result.model)
        return None, None, {}, {}
    work = _working_adata(adata, result)
    compute_velocity_graph(work, progress=_scaled(progress, 0.0, 0.7, "velocity graph"))
    transitions = transition_matrix(
        work.obsp[Key.obsp.VELOCITY_GRAPH], work.obsp[Key.obsp.VELOCITY_GRAPH_NEG]
    )
    confidence = None
    if Key.obsp.DISTANCES in work.obsp:
        _scaled(progress, 0.7, 0.8, "confidence")(Progress(0, 1))
        compute_velocity_confidence(work)
        confidence = np.asarray(work.obs[Key.obs.VELOCITY_CONFIDENCE], dtype=np.float32)
    embedding, lines = {}, {}
    if basis in adata.obsm:
        _scaled(progress, 0.8, 0.9, "embedding")(Progress(0, 1))
        embedding[basis] = np.asarray(project_velocity(transitions, np.asarray(adata.obsm[basis])[:, :2]))
        _scaled(progress, 0.9, 1.0, "streamlines")(Progress(0, 1))
        lines[basis] = compute_streamlines(np.asarray(adata.obsm[basis])[:, :2], embedding[basis])
    return transitions, confidence, embedding, lines


def fit_and_derive(
    adata: AnnData,
    model: str,
    params: Mapping[str, Any],
    *,
    basis: str,
    label: str,
    progress: ProgressCallback | None = None,
) -> Fit:
    """Fit ``model`` with ``params`` on ``adata`` (left untouched), then :func:`derive`.

    ``progress`` sees one bar of 1000 steps: the fit fills the first 80 %.
    """
    from explorer.models import get_model

    if _torch_serving.is_set():
        configure_torch()
    estimator = get_model(model, **params)
    result = estimator.fit(adata, progress=_scaled(progress, 0.0, _FIT_SHARE, "fit"))
    transitions, confidence, embedding, lines = derive(
        adata, result, basis=basis, progress=_scaled(progress, _FIT_SHARE, 1.0, "graph")
    )
    if progress is not None:
        progress(Progress(1000, 1000, "done"))
    return Fit(
        label=label,
        key=fit_key(model, params),
        result=result,
        transitions=transitions,
        confidence=confidence,
        velocity_embedding=embedding,
        streamlines=lines,
    )
