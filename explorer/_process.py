"""Process-wide settings that must be in place before a library loads: set once, here.

The OpenMP wait policy, and the libraries that anndata need not load for an in-memory
``explorer fit``. The CLI's ``main``, a torch model's ``fit`` (before it first imports
torch) and the test suite's ``conftest.py`` call :func:`set_up_process`; ``explorer.cli``
imports anndata under :func:`lean_anndata_import` and its modules under
:func:`collector_paused`; ``explorer fit`` (in memory) runs under :func:`fit_settings`.
"""

from __future__ import annotations

import gc
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

#: libraries anndata imports with itself whenever they are installed, for data types an
#: in-memory ``explorer fit`` never holds (dask arrays, xarray datasets): about 0.5 s of
#: CPU of the command's start-up (dask.array alone 0.4 s, most of it rewriting numpy's
#: docstrings), a tenth of the whole command on the pancreas
_ANNDATA_OPTIONAL = ("dask", "xarray")
#: ``explorer fit`` options (as argparse prefixes) that stream gene blocks, on Dask
_STREAM_OPTIONS = ("--st", "--sc", "--w")


def set_up_process() -> None:
    """Let idle OpenMP threads of torch sleep instead of spin, unless torch is loaded or the user chose.

    With GNU OpenMP's default (active waiting), each of the thousands of small parallel
    operations of the dynamical model's EM waits for a thread the OS has descheduled
    whenever other processes share the cores: on the 2-core development machine under
    load the pancreas fit took 129 s instead of 6.7 s. ``OMP_WAIT_POLICY=PASSIVE`` is read
    when the OpenMP runtime loads, so it is set only while torch is not imported yet, and
    a value the user set is kept. The thread count is left alone.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def is_in_memory_fit(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (``sys.argv``) is the ``explorer`` command running ``fit`` in memory.

    Only the console script (or ``python -m explorer.cli``) counts, not a program that
    imports the CLI. Any sign of the streamed fit (a ``.zarr`` argument, ``--stream``,
    ``--scheduler``, ``--workers`` or a prefix of them, as argparse accepts) answers no.
    """
    if not argv or Path(argv[0]).name not in ("explorer", "cli.py"):
        return False
    args = list(argv[1:])
    command = next((a for a in args if not a.startswith("-")), None)
    if command != "fit":
        return False
    return not any(a.startswith(_STREAM_OPTIONS) or a.rstrip("/").lower().endswith(".zarr") for a in args)


@contextmanager
def lean_anndata_import(argv: Sequence[str]) -> Iterator[None]:
    """Import anndata inside this block without dask and xarray when ``argv`` is an in-memory fit.

    anndata loads dask.array and xarray at its own import only to recognise their types
    (``find_spec``); an in-memory ``explorer fit`` holds neither, so the block hides them
    (``sys.modules[name] = None`` reads as not installed) and restores them after: a
    later ``import dask`` works, only anndata in this process does not know its arrays.
    The streamed fit (:mod:`explorer.stream`, on Dask) and every other command import
    anndata as usual, as does a process that has loaded anndata already.
    """
    hide = (
        [m for m in _ANNDATA_OPTIONAL if m not in sys.modules]
        if "anndata" not in sys.modules and is_in_memory_fit(argv)
        else []
    )
    for name in hide:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hide:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


@contextmanager
def collector_paused(*, freeze: bool = False) -> Iterator[None]:
    """Run the block (imports) without Python's cyclic garbage collector; restore it after.

    Importing ``explorer.cli`` makes about 150,000 objects that live as long as the
    process and no cyclic garbage worth finding, yet the collector's passes over them
    cost the command's serial start-up and fit 0.2-0.35 s of CPU (full collections among
    them). ``freeze``: move every object made so far out of the collector's reach
    (:func:`gc.freeze`) before it resumes, so that later collections do not go over them
    either; for a process that keeps its modules until it exits (the console command),
    not for a program importing explorer, whose own objects would be frozen too.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()


def _numpy_hugepage_switch() -> Any:
    """Return numpy's own switch of ``madvise(MADV_HUGEPAGE)`` on its large arrays, or ``None``.

    The function behind ``NUMPY_MADVISE_HUGEPAGE`` (numpy reads the variable once, at its
    import): ``numpy._core.multiarray._set_madvise_hugepage`` (numpy 2; ``numpy.core`` in
    1.26). It is private, so a numpy without it leaves the setting alone.
    """
    import numpy as np

    core = getattr(np, "_core", None)
    if core is None:  # numpy 1.26
        core = np.core
    return getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)


@contextmanager
def fit_settings() -> Iterator[None]:
    """One BLAS thread and no transparent huge pages for numpy's arrays, inside the block.

    Both measured on the in-memory ``explorer fit --model dynamical`` (the pancreas,
    interleaved runs; README, "Speed and accuracy against scVelo"):

    - OpenBLAS (numpy's and scipy's own copy) wakes its second thread for a few vector
      operations (the root cells' ARPACK solve, small products), and an idle OpenBLAS
      thread spins for a while before it sleeps: 0.3-0.4 s of CPU of the command, taken
      from the core numba's parallel kernels run on. None of the fit's products is large
      enough to gain from a second BLAS thread (preprocessing a raw input inside the
      block took the same CPU: 16.0 -> 16.4 s, one run each under load).
    - numpy asks the kernel for 2 MB pages on each array of 4 MB or more; with Linux's
      ``transparent_hugepage=madvise`` (the common default) each such allocation is a
      fresh huge page the kernel zeroes on the fault, for the fit's many short-lived
      temporaries: 0.3-0.7 s of system time of the command.

    Both settings are put back when the block ends. ``scipy.linalg`` is imported here (the
    dynamical model's latent time imports it anyway) so that its BLAS is limited too:
    threadpoolctl only reaches libraries already loaded.
    """
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS, see above)
    from threadpoolctl import threadpool_limits

    switch = _numpy_hugepage_switch()
    previous = switch(False) if switch is not None else None  # noqa: FBT003 (numpy's signature)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        if switch is not None:
            switch(previous)
