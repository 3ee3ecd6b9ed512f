"""Process-wide settings that must be in place before a library loads: set once, here.

The OpenMP wait policy, the libraries that anndata need not load for an in-memory
``explorer fit``, and how the command's memory is allocated. The CLI's ``main``, a torch
model's ``fit`` (before it first imports torch) and the test suite's ``conftest.py`` call
:func:`set_up_process`; ``explorer.cli`` imports anndata under :func:`lean_anndata_import`
and its modules under :func:`collector_paused`; ``explorer fit`` (in memory) runs under
:func:`fit_settings`, and the console command's heap is set up by :func:`prepare_heap`
(with :func:`keep_freed_memory`) before its libraries load.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
import types
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
#: zarr, which anndata 0.12 imports unconditionally (with numcodecs, asyncio and fsspec:
#: about 0.1 s of CPU of the command's start-up) for its ``.zarr`` reader and writer and to
#: register them by zarr's ``Array`` and ``Group`` types; an in-memory ``explorer fit``
#: never reads or writes ``.zarr`` (:func:`is_in_memory_fit` says no to any ``.zarr``
#: argument), so anndata gets a stand-in whose two types no object is an instance of
_ANNDATA_ZARR = "zarr"
#: ``explorer fit`` options (as argparse prefixes) that stream gene blocks, on Dask
_STREAM_OPTIONS = ("--st", "--sc", "--w")
#: glibc's ``mallopt`` parameters (``malloc.h``) and the values :func:`keep_freed_memory`
#: sets: blocks up to 32 MB (glibc's ceiling for the threshold on 64-bit) come from the
#: heap, whose freed memory is kept (trimmed only above 1 GB free at its top) and which
#: grows 64 MB at a time
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP_FREED = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
#: ``mallopt``'s parameter for the most malloc arenas (heaps) the threads may use
_M_ARENA_MAX = -8
#: what :func:`prepare_heap` touches ahead: this many bytes per byte of the input file,
#: at most :data:`_PREFAULT_MAX`, in blocks of :data:`_PREFAULT_BLOCK` (below the mmap
#: threshold of :data:`_KEEP_FREED`, so they come from the heap and go back to it)
_PREFAULT_PER_INPUT_BYTE = 5
_PREFAULT_MAX = 640 << 20
_PREFAULT_BLOCK = 16 << 20
#: the suffixes of the input files :func:`prepare_heap` sizes its work by
_INPUT_SUFFIXES = (".h5ad", ".loom")
#: :func:`prepare_heap` gives every thread one arena only on machines with at most this many
#: cores: measured on 2; with many threads the compiled kernels' scratch arrays (tens of
#: thousands of ``malloc``/``free`` a fit) would all take that arena's lock
_ONE_ARENA_MAX_CPUS = 4
#: the thread :func:`prepare_heap` started (it runs once per process)
_HEAP_THREAD: list[threading.Thread | None] = []


def set_up_process() -> None:
    """Let idle OpenMP threads spin only briefly before they sleep, unless torch is loaded or the user chose.

    With GNU OpenMP's default (300,000 spins before a thread sleeps, 30 billion with
    ``OMP_WAIT_POLICY=ACTIVE``), each of the thousands of small parallel operations of the
    dynamical model's EM waits for a thread the OS has descheduled whenever other processes
    share the cores: on the 2-core development machine under load the pancreas fit took
    129 s instead of 6.7 s. ``GOMP_SPINCOUNT=10000`` bounds the spinning. It replaced
    ``OMP_WAIT_POLICY=PASSIVE`` (no spinning at all) on 2026-12-03: passive waiting made
    every one of VeloVAE's small torch operations wait for its threads to wake, and its
    pancreas fit took twice the time (15 stage-1 epochs: 12.5 s instead of 6.2 s; the
    ``explorer fit`` command 204 s instead of about 100 s). The dynamical model's command
    (preprocessing included) took the same time either way, quiet (10.8-10.9 s against
    11.0-11.1 s) and beside two CPU-bound processes (18.7 s against 18.0 s; without a spin
    limit 19.3 s, ``ACTIVE`` 28.3 s). The settings are read when the OpenMP runtime loads,
    so they are set only while torch is not imported yet, and a wait policy or spin count
    the user set is kept. The thread count is left alone.
    """
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")


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
    """Import anndata inside this block without dask, xarray and zarr when ``argv`` is an in-memory fit.

    anndata loads dask.array and xarray at its own import only to recognise their types
    (``find_spec``); an in-memory ``explorer fit`` holds neither, so the block hides them
    (``sys.modules[name] = None`` reads as not installed) and restores them after: a
    later ``import dask`` works, only anndata in this process does not know its arrays.
    zarr, which anndata imports whether or not it is used, is replaced by a stand-in
    module (:func:`_zarr_stand_in`) while anndata loads and removed after: a later
    ``import zarr`` loads the real one, but anndata in this process cannot read or
    write ``.zarr`` stores (an in-memory fit has none). The streamed fit
    (:mod:`explorer.stream`, on Dask and zarr) and every other command import anndata as
    usual, as does a process that has loaded anndata already.
    """
    lean = "anndata" not in sys.modules and is_in_memory_fit(argv)
    hide = [m for m in _ANNDATA_OPTIONAL if m not in sys.modules] if lean else []
    stand_in = _zarr_stand_in() if lean and _ANNDATA_ZARR not in sys.modules else None
    for name in hide:
        sys.modules[name] = None  # type: ignore[assignment]
    if stand_in is not None:
        sys.modules[_ANNDATA_ZARR] = stand_in
    try:
        yield
    finally:
        for name in hide:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
        if stand_in is not None and sys.modules.get(_ANNDATA_ZARR) is stand_in:
            del sys.modules[_ANNDATA_ZARR]


def import_anndata(argv: Sequence[str]) -> types.ModuleType:
    """Import anndata, under :func:`lean_anndata_import` for an in-memory fit, whole if that fails.

    The stand-ins fit the anndata releases tested here; should another release need more of
    zarr (or dask) at its import than the stand-in gives, the partly loaded anndata is
    dropped and imported again with every library it asks for, so the command only loses
    the saving, never its start.
    """
    try:
        with lean_anndata_import(argv):
            import anndata
    except Exception:  # noqa: BLE001 - any failure under the stand-ins: import it the usual way
        for name in [m for m in sys.modules if m == "anndata" or m.startswith("anndata.")]:
            del sys.modules[name]
        import anndata
    return anndata


def _zarr_stand_in() -> types.ModuleType:
    """Make a module named ``zarr`` with the two names anndata takes from zarr at its import.

    ``Array`` and ``Group`` (anndata's ``ZarrArray``/``ZarrGroup``, keys of its reader and
    writer registries and targets of its ``isinstance`` checks): empty classes, so no
    object in the process is taken for a zarr store. Anything else (anndata's zarr
    reader and writer) raises ``AttributeError``, which an in-memory fit never reaches.
    """
    module = types.ModuleType(_ANNDATA_ZARR, "Stand-in for zarr while anndata loads (explorer._process).")
    module.Array = type("Array", (), {"__module__": _ANNDATA_ZARR})  # type: ignore[attr-defined]
    module.Group = type("Group", (), {"__module__": _ANNDATA_ZARR})  # type: ignore[attr-defined]
    return module


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


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory the process frees, for its next allocations.

    By default glibc gives each block of more than 128 kB (a threshold it raises, up to
    32 MB, as such blocks are freed) its own ``mmap`` and returns it to the kernel when it
    is freed, and trims the heap whenever 128 kB lie free at its top; the next array of
    that size is fresh memory again, which the kernel zeroes page by page on first touch.
    The dynamical fit makes hundreds of short-lived arrays of 1-30 MB, and on this VM
    those first touches cost 0.5-0.75 s of system time per pancreas command (about
    200,000 page faults). With the thresholds raised (:data:`_KEEP_FREED`) freed blocks
    are reused: about 145,000 faults and 0.1-0.15 s less system time, the same numbers.

    For a process that exits after its work, as the console ``explorer fit`` does (a
    program importing explorer keeps glibc's defaults; ``mallopt`` cannot put back the
    adaptive threshold). Returns whether the settings were applied: False where the C
    library is not glibc (musl, macOS, Windows).
    """
    mallopt = _libc_mallopt()
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in _KEEP_FREED)


def _libc_mallopt() -> Any:
    """glibc's ``mallopt`` through ctypes, or None off Linux or where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def prepare_heap(argv: Sequence[str]) -> threading.Thread | None:
    """Set up glibc's heap for the console ``explorer fit``: freed memory kept, one arena, touched ahead.

    ``explorer.cli`` calls it as it is imported (after the package's own first imports,
    numpy among them; before anndata, pandas, scipy and numba load), when ``argv`` is
    the in-memory console fit (:func:`is_in_memory_fit`):

    - :func:`keep_freed_memory`;
    - one malloc arena for every thread (``M_ARENA_MAX``) on a machine of at most
      :data:`_ONE_ARENA_MAX_CPUS` cores: glibc otherwise gives threads that allocate
      their own heaps (the fit's worker threads, numba's OpenMP team, the writer), each
      made of fresh pages. glibc reads the setting when a second thread first
      allocates: numpy's OpenBLAS threads, started at its import, allocate only with
      their first job. With more cores glibc's arenas are kept (one arena's lock shared
      by many threads was not measured), and the touched pages serve the main thread;
    - about five times the input file's size (:data:`_PREFAULT_PER_INPUT_BYTE`; at most
      640 MB) of that heap allocated in 16 MB blocks, written once by a daemon thread
      and freed again, while the main thread imports its libraries (about 0.45 s of
      serial Python, beside which the second core idles). The kernel zeroes each page on
      its first write (about 3 us a page on the development VM: 0.35-0.65 s of system
      time of the pancreas and simulation commands, much of it in the serial read); the
      fit's arrays then reuse pages already touched. The same arrays and numbers, in
      other places of the heap.

    Runs once per process. Returns the daemon thread (None where there is nothing to
    touch: not glibc, no ``.h5ad``/``.loom`` input named in ``argv``, or a second call).
    """
    if _HEAP_THREAD:
        return None
    _HEAP_THREAD.append(None)
    mallopt = _libc_mallopt()
    if mallopt is None or not keep_freed_memory():
        return None
    if (os.cpu_count() or 1) <= _ONE_ARENA_MAX_CPUS:
        mallopt(_M_ARENA_MAX, 1)
    n_blocks = min(_PREFAULT_PER_INPUT_BYTE * _input_bytes(argv), _PREFAULT_MAX) // _PREFAULT_BLOCK
    if n_blocks == 0:
        return None
    libc = ctypes.CDLL(None)
    malloc, free, memset = libc.malloc, libc.free, libc.memset
    malloc.argtypes, malloc.restype = (ctypes.c_size_t,), ctypes.c_void_p
    free.argtypes, free.restype = (ctypes.c_void_p,), None
    memset.argtypes, memset.restype = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t), ctypes.c_void_p
    # allocated here, on the main thread (the heap's top grows, nothing is touched yet)
    blocks = [b for b in (malloc(_PREFAULT_BLOCK) for _ in range(n_blocks)) if b]

    def touch() -> None:
        for block in blocks:  # ctypes releases the GIL for each call
            memset(block, 0, _PREFAULT_BLOCK)
        for block in blocks:
            free(block)

    thread = threading.Thread(target=touch, name="explorer-heap", daemon=True)
    thread.start()
    _HEAP_THREAD[0] = thread
    return thread


def _input_bytes(argv: Sequence[str]) -> int:
    """Size of the largest ``.h5ad``/``.loom`` file ``argv`` names, ``--out``'s excepted (0 if none)."""
    args = list(argv[1:])
    sizes = [0]
    for i, arg in enumerate(args):
        if arg.startswith("-") or (i > 0 and args[i - 1] in ("--out", "-o")):
            continue
        if arg.lower().endswith(_INPUT_SUFFIXES):
            try:
                sizes.append(os.stat(arg).st_size)
            except OSError:
                continue
    return max(sizes)


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
