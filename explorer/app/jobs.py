"""Model fits off the server's event loop, with progress and cancellation.

A :class:`Job` runs one callable on a daemon thread. The callable receives a
:class:`~explorer.ProgressCallback`; each report is forwarded to ``on_progress`` through
``dispatch`` (in the app: the session document's next tick, so widgets change on the
event loop) and, once :meth:`Job.cancel` was called, raises
:class:`~explorer.FitCancelled` instead, which stops the fit between two steps: models
never write into the AnnData they fit, so nothing is left half-done.

:func:`fit_and_derive` is what a Run button starts: the model's fit, then
:func:`explorer.pipeline.derive` (velocity graph, transition matrix, projection,
confidence: the very function ``explorer fit`` calls after its fit, so the app and the
CLI give identical results for the same model and seed), then the streamlines the
embedding draws, bundled as a :class:`Fit`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from explorer._types import FitCancelled, InputError, Progress
from explorer.graph.streamlines import compute_streamlines
from explorer.keys import Key
from explorer.models import get_model
from explorer.pipeline import derive

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from anndata import AnnData
    from scipy.sparse import csr_matrix

    from explorer._types import ProgressCallback
    from explorer.models.base import VelocityResult
    from explorer.pipeline import Derived

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
    derived
        What :func:`explorer.pipeline.derive` computed (velocity graphs, ...), which an
        export writes as ``explorer fit`` does; None for a fit without a neighbour graph.
    """

    label: str
    key: FitKey
    result: VelocityResult
    transitions: csr_matrix | None = None
    confidence: np.ndarray | None = None
    velocity_embedding: dict[str, np.ndarray] = field(default_factory=dict)
    streamlines: dict[str, list[np.ndarray]] = field(default_factory=dict)
    derived: Derived | None = None


class _ThreadWarnings(logging.Handler):
    """Keep the messages of warnings that explorer's loggers emit on one thread."""

    def __init__(self, thread_id: int, messages: list[str]) -> None:
        super().__init__(level=logging.WARNING)
        self.thread_id = thread_id
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread_id:
            self.messages.append(record.getMessage())


class Job(Generic[T]):
    """Run ``target(progress)`` on a daemon thread; report, finish or fail through callbacks.

    The warnings explorer logs on the worker thread while the job runs (a model's notes on
    its input, such as VeloVAE's on capture times) are kept in :attr:`warnings`, for the
    page to show: a log the biologist never reads would lose them.

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
        self.warnings: list[str] = []

    def start(self) -> Job[T]:
        """Start the worker thread; returns ``self``."""
        self.outcome = "running"
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the job to stop at its next progress report."""
        self._cancel.set()

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
        notes = _ThreadWarnings(threading.get_ident(), self.warnings)
        explorer_logger = logging.getLogger("explorer")
        explorer_logger.addHandler(notes)
        try:
            value = self._target(self._progress)
            if self._cancel.is_set():
                raise FitCancelled  # noqa: TRY301 - a cancel that came after the last report
        except FitCancelled:
            self.outcome = "cancelled"
            if self._on_cancelled is not None:
                self._dispatch(self._on_cancelled)
        except Exception as err:  # noqa: BLE001 - any failure becomes a message in the app
            if isinstance(err, InputError):  # refused input: the page says why; no traceback to log
                logger.info("background job refused its input: %s", err)
            else:
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
            explorer_logger.removeHandler(notes)
            self._finished.set()


def _scaled(progress: ProgressCallback | None, start: float, stop: float, prefix: str) -> ProgressCallback:
    """Forward a sub-step's progress onto ``[start, stop)`` of a 1000-step bar."""

    def forward(p: Progress) -> None:
        if progress is not None:
            done = start + (stop - start) * p.fraction
            progress(Progress(int(done * 1000), 1000, f"{prefix}: {p.message}" if p.message else prefix))

    return forward


def fit_and_derive(
    adata: AnnData,
    model: str,
    params: Mapping[str, Any],
    *,
    basis: str,
    label: str,
    progress: ProgressCallback | None = None,
) -> Fit:
    """Fit ``model`` with ``params`` on ``adata`` (left untouched), then derive what the views draw.

    After the fit, :func:`explorer.pipeline.derive` (what ``explorer fit`` runs) and the
    streamlines on ``basis``. Without a neighbour graph in ``adata`` the fit has
    velocities only. ``progress`` sees one bar of 1000 steps: the fit fills the first 80 %.
    """
    if _torch_serving.is_set():
        configure_torch()
    estimator = get_model(model, **params)
    result = estimator.fit(adata, progress=_scaled(progress, 0.0, _FIT_SHARE, "fit"))
    fit = Fit(label=label, key=fit_key(model, params), result=result)
    if Key.obsp.DISTANCES not in adata.obsp:
        logger.info("no neighbour graph in the data: no transitions or streamlines for %s", result.model)
    else:
        derived = derive(
            adata, result, basis=basis, progress=_scaled(progress, _FIT_SHARE, 0.95, "graph")
        )
        fit.derived = derived
        fit.transitions = derived.transitions
        fit.confidence = derived.confidence
        fit.velocity_embedding = {key: v[:, :2] for key, v in derived.velocity_embedding.items()}
        _scaled(progress, 0.95, 1.0, "streamlines")(Progress(0, 1))
        for key, v in fit.velocity_embedding.items():
            fit.streamlines[key] = compute_streamlines(np.asarray(adata.obsm[key])[:, :2], v)
    if progress is not None:
        progress(Progress(1000, 1000, "done"))
    return fit
