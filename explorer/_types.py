"""Types shared across explorer: arrays, progress reports and cancellation."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray

FloatArray: TypeAlias = NDArray[np.float32]
BoolArray: TypeAlias = NDArray[np.bool_]
IntArray: TypeAlias = NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Progress:
    """One progress report: ``step`` of ``total`` done, with a short message."""

    step: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        """Share done, in [0, 1]."""
        return 0.0 if self.total <= 0 else min(1.0, max(0.0, self.step / self.total))


ProgressCallback: TypeAlias = Callable[[Progress], None]


@dataclass(frozen=True, slots=True)
class PreprocessOptions:
    """The preprocessing options, with scVelo's names; :data:`PREPROCESS` holds the defaults.

    Every signature that takes these options (``prepare``, ``run_velocity``,
    ``filter_and_normalize``, ``compute_neighbors``), the ``explorer fit`` options, the app
    and the samples read their defaults from :data:`PREPROCESS`, so they are written once.
    """

    #: genes need this many spliced + unspliced counts over cells where both are detected
    min_shared_counts: int = 20
    #: highly variable genes kept; ``None`` keeps every gene that passes the filter
    n_top_genes: int | None = 2000
    #: principal components of the kNN graph
    n_pcs: int = 30
    #: neighbours per cell, the cell itself included (scanpy's convention)
    n_neighbors: int = 30


#: scVelo's defaults: ``filter_and_normalize(min_shared_counts=20, n_top_genes=2000)``,
#: ``moments(n_pcs=30, n_neighbors=30)``
PREPROCESS = PreprocessOptions()


class FitCancelled(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a progress callback to stop a fit between iterations.

    Models call ``progress`` only at points where stopping leaves nothing half-written
    (they never write to the AnnData they were given), so the caller can simply catch it.
    """


def report(progress: ProgressCallback | None, step: int, total: int, message: str = "") -> None:
    """Send ``Progress(step, total, message)`` to ``progress`` if there is one."""
    if progress is not None:
        progress(Progress(step, total, message))


class InputError(ValueError):
    """Bad input from the user: the message says what was expected, what was found and what to do.

    The CLI turns it into a message on stderr and exit code 2; the app shows it and keeps
    the session alive.
    """


class MissingInputError(InputError, KeyError):
    """A layer, key, model name or file that the input lacks: an :class:`InputError`.

    Also a ``KeyError``, so code that looked an entry up by name and caught ``KeyError``
    keeps working; the CLI and the app treat it as any other bad input.
    """

    def __str__(self) -> str:
        # KeyError's str() quotes its argument; this is a sentence for a person
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


#: who reads the messages: ``"python"`` (the default) or ``"cli"``, which ``explorer`` sets
#: so that messages name its options (``--spliced-layer``) rather than keyword arguments
CALLER: ContextVar[str] = ContextVar("explorer_caller", default="python")

#: keyword argument -> command-line option, where the names differ beyond ``_`` / ``-``
_CLI_OPTIONS: dict[str, str] = {"model_params": "--param KEY=VALUE"}


def option(name: str) -> str:
    """How the caller passes the setting ``name``: ```name=``` in Python, ``--name`` on the command line.

    Examples
    --------
    >>> option("spliced_layer")
    '`spliced_layer=`'
    """
    if CALLER.get() == "cli":
        return _CLI_OPTIONS.get(name, "--" + name.replace("_", "-"))
    return f"`{name}=`"


def model_param(name: str, value: str) -> str:
    """How the caller sets a model's hyperparameter ``name`` to ``value``.

    Examples
    --------
    >>> model_param("genes", "all")
    "`genes='all'`"
    """
    if CALLER.get() == "cli":
        return f"`--param {name}={value}`"
    return f"`{name}={value!r}`"


def no_velocity_gene() -> InputError:
    """The refusal of every model where no gene passes the steady-state velocity-gene filter."""
    return InputError(
        "No gene to fit: no gene passes the steady-state velocity-gene filter. "
        f"Pass {model_param('genes', 'all')}."
    )
