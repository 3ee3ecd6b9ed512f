"""Command line: ``explorer fit``, ``fates``, ``compare``, ``trajectories``, ``perturb`` and the rest.

The other commands: ``models``, ``info`` and ``serve``.

A thin argparse front-end over the Python API. Bad input (``InputError``) is printed as
one clear message on stderr with exit code 2; progress goes to stderr as a bar. The app
(Panel) is imported only by ``explorer serve``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explorer._process import (
    collector_paused,
    fit_settings,
    import_anndata,
    is_in_memory_fit,
    prepare_heap,
    set_up_process,
)

# the console fit, which exits after its write: glibc keeps the memory it frees, in one
# heap, part of which a thread touches while the libraries below load (prepare_heap)
if is_in_memory_fit(sys.argv):
    prepare_heap(sys.argv)

# an in-memory `explorer fit` imports anndata without dask, xarray and zarr (0.6 s of CPU); no
# garbage collection while the modules load, and the console fit's modules then frozen
# out of the collector's reach (collector_paused)
with collector_paused(freeze=is_in_memory_fit(sys.argv)):
    ad = import_anndata(sys.argv)
    import numpy as np
    import pandas as pd
    from tqdm import tqdm

    from explorer._types import CALLER, PREPROCESS, FitCancelled, InputError
    from explorer._version import __version__
    from explorer.data.io import H5adWriter, _check_hdf5, _stored_shapes, check_output, read, write
    from explorer.data.preprocess import check_options
    from explorer.data.samples import load_sample, sample_path
    from explorer.keys import Key
    from explorer.models import MODELS
    from explorer.pipeline import prepare, run_velocity

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from explorer._types import Progress

logger = logging.getLogger("explorer")

#: exit codes: 2 for bad input (as argparse uses for bad arguments), 130 for Ctrl-C
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130

SAMPLE = "sample"


class _Interrupt:
    """Ctrl-C for ``explorer fit``: the run stops, and nothing is written.

    The handler sets a flag; every progress report and the write itself check it
    (:class:`FitCancelled`), so even a ``KeyboardInterrupt`` that a library swallows (numba
    prints one and carries on when it lands in its compiler) cannot let the output be
    written. Where the interrupted code is not a compiler, the handler also raises
    ``KeyboardInterrupt`` to stop at once; a second Ctrl-C always does. Tracebacks of
    swallowed interrupts are kept off the terminal.
    """

    #: code the interrupt must not be raised in: it catches it, prints it and carries on
    _SWALLOWING = (f"{os.sep}numba{os.sep}", f"{os.sep}llvmlite{os.sep}")

    def __init__(self) -> None:
        self.flag = threading.Event()
        self._previous: Any = None
        self._unraisable: Any = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        self._unraisable = sys.unraisablehook
        sys.unraisablehook = self._quiet_unraisable
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        sys.unraisablehook = self._unraisable

    def _handle(self, _signum: int, frame: Any) -> None:
        first = not self.flag.is_set()
        self.flag.set()
        if first and self._in_swallowing_code(frame):
            return  # stops at the next progress report
        raise KeyboardInterrupt

    def _in_swallowing_code(self, frame: Any) -> bool:
        while frame is not None:
            if any(part in frame.f_code.co_filename for part in self._SWALLOWING):
                return True
            frame = frame.f_back
        return False

    def _quiet_unraisable(self, unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, (KeyboardInterrupt, FitCancelled)):
            self.flag.set()
            return
        self._unraisable(unraisable)

    def check(self) -> None:
        """Raise :class:`FitCancelled` once Ctrl-C was pressed."""
        if self.flag.is_set():
            raise FitCancelled


class _Bar:
    """A progress bar on stderr (tqdm), fed with :class:`~explorer.Progress` reports.

    Each report first checks ``interrupt`` (Ctrl-C), so a run stops at its next step.
    """

    def __init__(self, *, enabled: bool, interrupt: _Interrupt | None = None) -> None:
        self._bar = None
        self._enabled = enabled
        self._interrupt = interrupt

    def __call__(self, p: Progress) -> None:
        if self._interrupt is not None:
            self._interrupt.check()
        if not self._enabled:
            return
        if self._bar is None:
            self._bar = tqdm(total=p.total, file=sys.stderr, unit="", bar_format="{l_bar}{bar}| {elapsed}")
        self._bar.total = p.total
        self._bar.n = p.step
        self._bar.set_description_str(p.message[:40].ljust(40))
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _parse_value(text: str) -> Any:
    """``'10' -> 10``, ``'0.5' -> 0.5``, ``'true' -> True``, ``'none' -> None``, else the text.

    A comma makes a tuple of such values: ``'5,95' -> (5, 95)``, ``'Cpe,' -> ('Cpe',)``.
    """
    if "," in text:
        return tuple(_parse_value(part.strip()) for part in text.split(",") if part.strip())
    lowered = text.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _model_params(pairs: Sequence[str]) -> dict[str, Any]:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            msg = f"--param expects KEY=VALUE (e.g. --param max_iter=20); found {pair!r}."
            raise InputError(msg)
        params[key.strip()] = _parse_value(value.strip())
    return params


def _load(
    path_text: str | None, *, spliced_layer: str = "spliced", unspliced_layer: str = "unspliced"
) -> tuple[AnnData, Path | None]:
    """Read the input (or the bundled sample for ``None``/``'sample'``); return it and its path."""
    if path_text is None or path_text == SAMPLE:
        return load_sample(), sample_path()
    return read(path_text, spliced_layer=spliced_layer, unspliced_layer=unspliced_layer), Path(path_text)


def _input_path(path_text: str | None) -> Path | None:
    return sample_path() if path_text is None or path_text == SAMPLE else Path(path_text)


def _check_fit_args(args: argparse.Namespace) -> tuple[dict[str, Any], Path, list[Path]]:
    """Check everything that needs no data before any work: model, its parameters, options, output.

    Returns the model parameters, the output path and the paths the output must not replace.
    """
    try:
        cls = MODELS[args.model]
    except InputError as err:
        msg = f"{err} See `explorer models`."
        raise InputError(msg) from None
    params = {"seed": args.seed, **_model_params(args.param)}
    try:
        cls(**params)  # checks types and ranges (InputError); builds nothing heavy
    except TypeError as err:
        known = ", ".join(p for p in inspect.signature(cls).parameters if p != "seed")
        msg = (
            f"invalid --param for model {args.model!r}: {err}. Its parameters are: {known} "
            "(see `explorer models`)."
        )
        raise InputError(msg) from None
    check_options(
        min_shared_counts=args.min_shared_counts,
        n_top_genes=args.n_top_genes,
        n_pcs=args.n_pcs,
        n_neighbors=args.n_neighbors,
    )
    in_path = _input_path(args.input)
    if in_path is not None and args.input not in (None, SAMPLE) and not in_path.is_file():
        _load(args.input)  # the reader's message for a missing file or a folder
    out = Path(args.out) if args.out else Path(f"{(in_path.stem if in_path else 'sample')}_{args.model}.h5ad")
    protect = [in_path] if in_path is not None else []
    if in_path is not None and out.resolve() == in_path.resolve():
        msg = (
            f"--out {out} is the input file; explorer never overwrites its input. Choose another output path."
        )
        raise InputError(msg)
    check_output(out, protect=protect, overwrite=args.force)
    return params, out, protect


def _wants_stream(args: argparse.Namespace) -> bool:
    """``explorer fit`` streams gene blocks (explorer.stream) for a .zarr input or a Dask option."""
    zarr_input = args.input is not None and str(args.input).rstrip("/").endswith(".zarr")
    return zarr_input or args.stream or args.scheduler is not None or args.workers is not None


def _cmd_fit_streamed(args: argparse.Namespace) -> int:
    """``explorer fit atlas.zarr --model dynamical [--scheduler ADDR | --workers N]``."""
    from explorer.stream import dask_client, fit_streamed

    if args.input is None:
        msg = "the streamed fit needs an input: an AnnData .zarr folder or .h5ad file."
        raise InputError(msg)
    if args.workers is not None and args.workers < 1:
        msg = f"--workers expects at least 1; found {args.workers}."
        raise InputError(msg)
    in_path = Path(args.input)
    out = Path(args.out) if args.out else Path(f"{in_path.name.split('.')[0]}_{args.model}.zarr")
    params = {"seed": args.seed, **_model_params(args.param)}
    with _Interrupt() as interrupt:
        bar = _Bar(enabled=not args.quiet, interrupt=interrupt)
        start = time.perf_counter()
        kwargs = {
            "model": args.model, "model_params": params, "basis": args.basis, "overwrite": args.force,
            "spliced_layer": args.spliced_layer, "unspliced_layer": args.unspliced_layer, "progress": bar,
        }  # fmt: skip
        try:
            if args.scheduler is None and args.workers is None:
                summary = fit_streamed(in_path, out, **kwargs)
            else:
                with dask_client(scheduler=args.scheduler, n_workers=args.workers) as client:
                    print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
                    summary = fit_streamed(in_path, out, client=client, **kwargs)
        finally:
            bar.close()
    print(
        f"{args.model} (streamed): {summary.n_obs} cells, {summary.n_vars} genes, "
        f"{summary.n_velocity_genes} velocity genes in {time.perf_counter() - start:.1f} s -> {summary.out}",
        file=sys.stderr,
    )
    return 0


def _stage_clock() -> tuple[float, float]:
    """Wall and CPU seconds (all threads) now, for ``explorer -v fit``'s stage timings."""
    return time.perf_counter(), time.process_time()


def _load_compiler_in_background() -> None:
    """Have numba load its compiler's registries in a daemon thread, beside the gene selection.

    The first compiled kernel a process calls (the EM's, the velocity graph's) first makes
    numba import and install the typing and lowering registries of everything it can
    compile: about 0.6 s of CPU of the pancreas command (mostly imports, under the GIL),
    on the main thread just before the EM. Started after the read (mostly Python: the two
    would only take turns at the GIL), it runs while the main thread selects the genes
    and sets up the EM (mostly numpy, outside the GIL: the two run side by side). numba's
    compiler lock orders it with the kernels' own loading: a kernel called before it is
    done waits for it, as it would have done the work itself.
    """

    def load() -> None:
        from numba.core.compiler_lock import global_compiler_lock
        from numba.core.registry import cpu_target

        # under the lock a kernel's own compile or cache load holds: two refreshes at once
        # race on the registries (an intermittent failure of the command, seen in the tests)
        with global_compiler_lock:
            cpu_target.target_context.refresh()

    threading.Thread(target=load, name="explorer-numba-registries", daemon=True).start()


def _cmd_fit(args: argparse.Namespace) -> int:
    if _wants_stream(args):
        return _cmd_fit_streamed(args)
    # CPU seconds so far: interpreter start-up and imports (the wall clock started before us)
    stages: dict[str, list[float]] = {"start-up": [float("nan"), time.process_time()]}
    clock = _stage_clock()

    def stage(name: str) -> None:
        nonlocal clock
        now = _stage_clock()
        stages[name] = [now[0] - clock[0], now[1] - clock[1]]
        clock = now

    params, out, protect = _check_fit_args(args)
    # an .h5ad output gets the input's arrays while the model fits (H5adWriter)
    writer = H5adWriter(out, protect=protect, overwrite=args.force) if out.suffix.lower() == ".h5ad" else None
    # one BLAS thread, no huge pages for numpy's temporaries (fit_settings says why)
    with fit_settings(), _Interrupt() as interrupt, writer or contextlib.nullcontext():
        adata, _ = _load(args.input, spliced_layer=args.spliced_layer, unspliced_layer=args.unspliced_layer)
        stage("read")
        interrupt.check()
        _load_compiler_in_background()
        bar = _Bar(enabled=not args.quiet, interrupt=interrupt)
        start = time.perf_counter()
        try:
            result = run_velocity(
                adata,
                model=args.model,
                model_params=params,
                basis=args.basis,
                min_shared_counts=args.min_shared_counts,
                n_top_genes=args.n_top_genes,
                n_pcs=args.n_pcs,
                n_neighbors=args.n_neighbors,
                seed=args.seed,
                progress=bar,
                on_arrays=None if writer is None else writer.add,
            )
        finally:
            bar.close()
        stage("fit")
        interrupt.check()
        cancelled = interrupt.flag.is_set
        if writer is None:
            written = write(adata, out, protect=protect, overwrite=args.force, cancelled=cancelled)
        else:
            written = writer.finish(adata, cancelled=cancelled)
        stage("write")
    logger.info(
        "fit command stages (s, [wall, cpu]): %s",
        json.dumps({k: [round(x, 2) for x in v] for k, v in stages.items()}),
    )
    n_genes = int(result.velocity_genes.sum())
    print(
        f"{args.model}: {adata.n_obs} cells, {adata.n_vars} genes, {n_genes} velocity genes "
        f"in {time.perf_counter() - start:.1f} s -> {written}",
        file=sys.stderr,
    )
    return 0


#: what `explorer fates` needs from its input: a velocity fit (`explorer fit`)
_FATES_LAYERS = (Key.layers.VELOCITY, Key.layers.MS)


def _check_fates_args(args: argparse.Namespace) -> tuple[Path, Path]:
    """Check the options, the input's layers (HDF5 metadata only) and the output before any work."""
    checks = (
        (
            args.n_states is None or args.n_states >= 2,
            f"--n-states must be at least 2; found {args.n_states}.",
        ),
        (args.n_cells >= 1, f"--n-cells must be at least 1; found {args.n_cells}."),
        (
            0.0 <= args.connectivity_weight <= 1.0,
            f"--connectivity-weight must be in [0, 1]; found {args.connectivity_weight}.",
        ),
        (args.n_samples >= 1, f"--n-samples must be at least 1; found {args.n_samples}."),
        (
            args.stability_threshold is None or 0.0 < args.stability_threshold <= 1.0,
            f"--stability-threshold must be in (0, 1]; found {args.stability_threshold}.",
        ),
    )
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
    in_path = Path(args.input)
    if not in_path.exists():
        msg = f"file not found: {args.input!r}; expected the .h5ad written by `explorer fit`. Check the path."
        raise InputError(msg)
    if in_path.is_dir() or in_path.suffix.lower() != ".h5ad":
        msg = (
            f"cannot read {in_path.name!r}: expected an .h5ad file with a velocity fit "
            "(from `explorer fit`), "
            f"found {'a folder' if in_path.is_dir() else repr(in_path.suffix or 'no extension')}."
        )
        raise InputError(msg)
    _check_hdf5(in_path, ".h5ad")
    layers = [name for name in _stored_shapes(in_path, ".h5ad") if name != "X"]
    missing = [name for name in _FATES_LAYERS if name not in layers]
    if missing:
        msg = (
            f"{in_path.name!r} holds no velocity fit: layers {missing} are missing (it has {layers}). "
            f"Fit velocity first: `explorer fit {args.input} --out fitted.h5ad`, then "
            "`explorer fates fitted.h5ad --out fates.h5ad`."
        )
        raise InputError(msg)
    out = Path(args.out) if args.out else Path(f"{in_path.stem}_fates.h5ad")
    if out.resolve() == in_path.resolve():
        msg = (
            f"--out {out} is the input file; explorer never overwrites its input. Choose another output path."
        )
        raise InputError(msg)
    check_output(out, protect=[in_path], overwrite=args.force)
    return in_path, out


def _cmd_fates(args: argparse.Namespace) -> int:
    from explorer.graph.fates import compute_fates
    from explorer.graph.kernels import compute_velocity_kernel

    in_path, out = _check_fates_args(args)
    with _Interrupt() as interrupt:
        adata = ad.read_h5ad(in_path)
        if Key.obsp.CONNECTIVITIES not in adata.obsp:
            msg = (
                f"{in_path.name!r} has no kNN graph (obsp['connectivities']; it has {sorted(adata.obsp)}). "
                f"Fit velocity with `explorer fit`, which computes it."
            )
            raise InputError(msg)
        cluster_key = args.cluster_key if args.cluster_key in adata.obs else None
        if cluster_key is None and args.cluster_key != "clusters":
            msg = (
                f"--cluster-key {args.cluster_key!r} is not a column of {in_path.name!r}; "
                "its obs columns are "
                f"{list(adata.obs.columns)}."
            )
            raise InputError(msg)
        interrupt.check()
        bar = _Bar(enabled=not args.quiet, interrupt=interrupt)
        start = time.perf_counter()
        # a model that gives a velocity distribution (VeloVAE's posterior) feeds it in directly
        variance_key = (
            Key.layers.VELOCITY_VARIANCE
            if args.mode != "deterministic" and Key.layers.VELOCITY_VARIANCE in adata.layers
            else None
        )
        try:
            compute_velocity_kernel(
                adata,
                mode=args.mode,
                similarity=args.similarity,
                variance_key=variance_key,
                connectivity_weight=args.connectivity_weight,
                n_samples=args.n_samples,
                seed=args.seed,
                progress=bar,
            )
            fates = compute_fates(
                adata,
                n_states=args.n_states,
                n_cells=args.n_cells,
                cluster_key=cluster_key,
                terminal_states=args.terminal_states.split(",") if args.terminal_states else None,
                progress=bar,
                **({"stability_threshold": args.stability_threshold} if args.stability_threshold else {}),
            )
        finally:
            bar.close()
        interrupt.check()
        written = write(adata, out, protect=[in_path], overwrite=args.force, cancelled=interrupt.flag.is_set)
    print(
        f"fates ({args.mode} kernel): {adata.n_obs} cells, {len(fates.macrostates.names)} macrostates, "
        f"terminal {fates.terminal_states}, initial {fates.initial_states} "
        f"in {time.perf_counter() - start:.1f} s -> {written}",
        file=sys.stderr,
    )
    return 0


def _check_field_args(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """``explorer trajectories`` / ``perturb``: the options, the input and the output, before any work."""
    if args.steps < 1:
        msg = f"--steps must be at least 1; found {args.steps}. Pass e.g. --steps 200."
        raise InputError(msg)
    if args.dt is not None and not args.dt > 0:
        msg = f"--dt must be a positive number; found {args.dt}. Leave it out for the fit's own step."
        raise InputError(msg)
    in_path = Path(args.input)
    if not in_path.is_file() or in_path.suffix.lower() != ".h5ad":
        found = "nothing"
        if in_path.exists():
            found = "a folder" if in_path.is_dir() else repr(in_path.suffix or "no extension")
        msg = (
            f"cannot read {args.input!r}: expected an .h5ad file with a vector-field fit, found {found}. "
            "Fit one with `explorer fit DATA --model vector_field --out fit.h5ad`."
        )
        raise InputError(msg)
    _check_hdf5(in_path, ".h5ad")
    out = None
    if args.out:
        out = Path(args.out)
        problems = (
            (
                out.suffix.lower() != ".csv",
                f"expected a name ending in .csv, found {out.suffix or 'no extension'!r}",
            ),
            (out.resolve() == in_path.resolve(), "it is the input file"),
            (not out.resolve().parent.is_dir(), f"folder {str(out.resolve().parent)!r} does not exist"),
            (out.is_dir(), "it is a folder"),
            (out.exists() and not args.force, "it exists already; pass --force to replace it"),
        )
        for bad, why in problems:
            if bad:
                msg = f"cannot write --out {str(out)!r}: {why}. Choose another file name (e.g. paths.csv)."
                raise InputError(msg)
    return in_path, out


def _start_cells(adata: AnnData, selection: str) -> Any:
    """``--from KEY=VALUE``: the cells whose obs column KEY equals VALUE (``all``: every cell)."""
    if selection == "all":
        return np.ones(adata.n_obs, dtype=bool)
    key, sep, value = selection.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value:
        msg = f'--from expects KEY=VALUE (e.g. --from "clusters=Ngn3 high EP") or all; found {selection!r}.'
        raise InputError(msg)
    if key not in adata.obs:
        msg = f"--from: {key!r} is not an obs column; the columns are {list(adata.obs.columns)}."
        raise InputError(msg)
    labels = adata.obs[key].astype(str).to_numpy()
    mask = labels == value
    if not mask.any():
        values = sorted(set(labels))
        shown = ", ".join(repr(v) for v in values[:30]) + (" ..." if len(values) > 30 else "")
        msg = f"--from: no cell has {key} = {value!r}; its values are {shown}."
        raise InputError(msg)
    return mask


def _write_csv(frame: Any, out: Path, *, cancelled: Any) -> Path:
    """Write ``frame`` to ``out`` atomically (a temporary file in the same folder, then a rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent)
    os.close(fd)
    try:
        frame.to_csv(tmp, index=False)
        if cancelled():
            raise FitCancelled
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _cmd_trajectories(args: argparse.Namespace) -> int:
    from explorer.models.vector_field import cancellable, load_field, simulate_trajectories

    in_path, out = _check_field_args(args)
    with _Interrupt() as interrupt:
        adata = ad.read_h5ad(in_path)
        field = load_field(adata, device=args.device)
        cells = _start_cells(adata, args.start)
        interrupt.check()
        bar = _Bar(enabled=not args.quiet, interrupt=interrupt)
        start = time.perf_counter()
        try:
            paths = simulate_trajectories(
                adata, cells, n_steps=args.steps, dt=args.dt, on_data=not args.plain_ode,
                basis=args.basis, field=field, check=cancellable(bar, args.steps, "integrating"),
            )  # fmt: skip
        finally:
            bar.close()
        interrupt.check()
        ends = paths.loc[paths["step"] == args.steps, "end_cluster"].value_counts(normalize=True)
        if out is not None:
            _write_csv(paths, out, cancelled=interrupt.flag.is_set)
    n = int(paths["cell"].nunique())
    print(f"{n} trajectories of {args.steps} steps; where they end (nearest observed cell's group):")
    for name, share in ends.items():
        print(f"  {name:24s} {share:6.1%}")
    where = f" -> {out}" if out is not None else " (no --out: nothing written)"
    print(f"in {time.perf_counter() - start:.1f} s{where}", file=sys.stderr)
    return 0


def _cmd_perturb(args: argparse.Namespace) -> int:
    from explorer.models.vector_field import load_field, perturb

    if (args.factor is None) == (args.value is None):
        msg = (
            "explorer perturb needs exactly one of --factor F (0: knock-out) and --value V "
            "(the gene's new Ms)."
        )
        raise InputError(msg)
    if (args.factor is not None and args.factor < 0) or (args.value is not None and args.value < 0):
        found = args.factor if args.factor is not None else args.value
        msg = f"--factor and --value must be >= 0; found {found}."
        raise InputError(msg)
    in_path, out = _check_field_args(args)
    with _Interrupt() as interrupt:
        adata = ad.read_h5ad(in_path)
        field = load_field(adata, device=args.device)
        cells = _start_cells(adata, args.start)
        interrupt.check()
        start = time.perf_counter()
        result = perturb(
            adata, args.gene, cells=cells, factor=args.factor, value=args.value, n_steps=args.steps,
            dt=args.dt, hold=not args.no_hold, on_data=not args.plain_ode, field=field,
        )  # fmt: skip
        interrupt.check()
        table = result.table()
        if out is not None:
            _write_csv(table.rename_axis("fate").reset_index(), out, cancelled=interrupt.flag.is_set)
    change = f"x {args.factor:g}" if args.factor is not None else f"= {args.value:g}"
    print(f"{args.gene} {change} in {len(result.cells)} cells ({args.start}), {args.steps} steps:")
    if result.measure == "fate probabilities":
        print("  fate probabilities (obsm['lineages_fwd']) of the cells nearest to the paths' ends, mean:")
    else:
        print(
            "  share of paths ending nearest to each cluster (no fate probabilities in the file: "
            "run `explorer fates` on it for those):"
        )
    print(f"  {'fate':24s} {'control':>8s} {'perturbed':>10s} {'shift':>8s}")
    for name, row in table.iterrows():
        print(f"  {str(name):24s} {row['control']:8.1%} {row['perturbed']:10.1%} {row['shift']:+8.1%}")
    where = f" -> {out}" if out is not None else ""
    print(f"in {time.perf_counter() - start:.1f} s{where}", file=sys.stderr)
    return 0


def _add_field_options(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    """Options shared by ``explorer trajectories`` and ``explorer perturb``."""
    parser.add_argument("input", help=".h5ad with a vector-field fit (`explorer fit --model vector_field`)")
    parser.add_argument(
        "--from",
        dest="start",
        default="all",
        metavar="KEY=VALUE",
        help='start cells: those whose obs column KEY is VALUE, e.g. "clusters=Ngn3 high EP" (default: all)',
    )
    parser.add_argument("--steps", type=int, default=200, help="RK4 steps (default 200)")
    parser.add_argument(
        "--dt", type=float, default=None, help="step size (default: the fit's, uns vector_field dt)"
    )
    parser.add_argument(
        "--plain-ode", action="store_true", help="integrate the plain ODE (default: paths kept on the cells)"
    )
    parser.add_argument("--out", "-o", default=None, help=out_help)
    parser.add_argument("--force", "-f", action="store_true", help="replace --out if it exists")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="torch device")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


#: what `explorer compare` writes: a table (--out, .csv) and the same figures as JSON beside it
_COMPARE_SUFFIX = ".csv"


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file in ``path``'s folder, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_compare_args(
    args: argparse.Namespace,
) -> tuple[list[str], list[tuple[str, str]], Path, Path, Path | None]:
    """Check the models, transitions and outputs before the data is read."""
    from explorer.graph.metrics import parse_transitions

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        msg = (
            "--models expects model names separated by commas (see `explorer models`); "
            f"found {args.models!r}."
        )
        raise InputError(msg)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        msg = f"unknown model(s) {unknown} in --models; the models are {list(MODELS)}. See `explorer models`."
        raise InputError(msg)
    if len(set(models)) < len(models):
        msg = f"--models names a model twice ({args.models!r}); name each once."
        raise InputError(msg)
    try:
        transitions = parse_transitions(args.transitions) if args.transitions else []
    except ValueError as err:
        msg = f"--transitions: {err}"
        raise InputError(msg) from None
    check_options(
        min_shared_counts=args.min_shared_counts,
        n_top_genes=args.n_top_genes,
        n_pcs=args.n_pcs,
        n_neighbors=args.n_neighbors,
    )
    in_path = _input_path(args.input)
    if args.input not in (None, SAMPLE) and in_path is not None and not in_path.is_file():
        _load(args.input)  # the reader's message for a missing file or a folder
    stem = in_path.stem if in_path is not None else "sample"
    out = Path(args.out) if args.out else Path(f"{stem}_compare{_COMPARE_SUFFIX}")
    if out.suffix.lower() != _COMPARE_SUFFIX:
        msg = (
            f"cannot write {out.name!r}: --out expects a name ending in .csv (the JSON goes beside it, "
            f"same name with .json); found {out.suffix or 'no extension'!r}. "
            f"Name it e.g. {out.stem or 'compare'}.csv."
        )
        raise InputError(msg)
    json_out = out.with_suffix(".json")
    # each gene's term of each transition's CBDir, for every model (only with transitions)
    genes_out = out.with_name(f"{out.stem}_genes{_COMPARE_SUFFIX}") if transitions else None
    protect = [in_path] if in_path is not None else []
    for path in (out, json_out, genes_out):
        if path is not None:
            check_output(path, protect=protect, overwrite=args.force, suffixes=None)
    return models, transitions, out, json_out, genes_out


def _cmd_compare(args: argparse.Namespace) -> int:
    from explorer.models.metrics import model_metrics

    models, transitions, out, json_out, genes_out = _check_compare_args(args)
    with _Interrupt() as interrupt:
        adata, _ = _load(args.input, spliced_layer=args.spliced_layer, unspliced_layer=args.unspliced_layer)
        if transitions or args.cluster_key != "clusters":
            if args.cluster_key not in adata.obs:
                msg = (
                    f"--cluster-key {args.cluster_key!r} is not an obs column of the input; its obs columns "
                    f"are {list(adata.obs.columns)}. Name the column of clusters with --cluster-key."
                )
                raise InputError(msg)
            known = set(adata.obs[args.cluster_key].astype(str))
            unknown = sorted({c for pair in transitions for c in pair} - known)
            if unknown:
                msg = (
                    f"--transitions names clusters {unknown} that obs[{args.cluster_key!r}] does not have; "
                    f"its clusters are {sorted(known)}."
                )
                raise InputError(msg)
        if args.time_key is not None and args.time_key not in adata.obs:
            msg = (
                f"--time-key {args.time_key!r} is not an obs column of the input; its obs columns are "
                f"{list(adata.obs.columns)}. Name the column of capture times, or leave --time-key out."
            )
            raise InputError(msg)
        bar = _Bar(enabled=not args.quiet, interrupt=interrupt)
        start = time.perf_counter()
        rows: dict[str, dict[str, float]] = {}
        terms: list[pd.DataFrame] = []
        try:
            prepare(
                adata,
                min_shared_counts=args.min_shared_counts,
                n_top_genes=args.n_top_genes,
                n_pcs=args.n_pcs,
                n_neighbors=args.n_neighbors,
                seed=args.seed,
                progress=bar,
            )
            start = time.perf_counter()
            for name in models:
                work = adata.copy()
                run_velocity(work, model=name, seed=args.seed, progress=bar)
                interrupt.check()
                metrics = model_metrics(
                    work, transitions=transitions, cluster_key=args.cluster_key, time_key=args.time_key
                )
                rows[name] = {"fit_seconds": round(time.perf_counter() - start, 2), **metrics.summary}
                long = metrics.per_gene.rename_axis("gene").reset_index()
                long = long.melt(id_vars="gene", var_name="transition", value_name="term").dropna()
                terms.append(long.assign(model=name)[["model", "transition", "gene", "term"]])
                start = time.perf_counter()
        finally:
            bar.close()
        interrupt.check()
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "model"
        payload = {
            "input": str(_input_path(args.input)),
            "models": models,
            "transitions": [f"{a}>{b}" for a, b in transitions],
            "cluster_key": args.cluster_key,
            "time_key": args.time_key,
            "seed": args.seed,
            "explorer_version": __version__,
            "metrics": {
                m: {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
                for m, row in rows.items()
            },
        }
        _write_text_atomic(out, table.to_csv())
        _write_text_atomic(json_out, json.dumps(payload, indent=2, allow_nan=False) + "\n")
        if genes_out is not None:
            _write_text_atomic(genes_out, pd.concat(terms, ignore_index=True).to_csv(index=False))
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table.T.to_string(float_format=lambda x: f"{x:.4g}"))
    written = ", ".join(str(p) for p in (out, json_out, genes_out) if p is not None)
    print(f"compare: {len(models)} model(s) -> {written}", file=sys.stderr)
    return 0


def _cmd_models(_args: argparse.Namespace) -> int:
    for name in MODELS:
        cls = MODELS[name]
        doc = (inspect.getdoc(cls) or "").splitlines()[0] if inspect.getdoc(cls) else ""
        sig = inspect.signature(cls)
        params = ", ".join(
            f"{p.name}={p.default!r}"
            for p in sig.parameters.values()
            if p.default is not inspect.Parameter.empty
        )
        print(f"{name:14s} {doc}")
        if params:
            print(f"{'':14s} parameters: {params}")
    return 0


def describe(adata: AnnData) -> list[str]:
    """Lines saying what ``adata`` holds and whether it is ready for velocity."""
    lines = [f"cells x genes: {adata.n_obs} x {adata.n_vars}"]
    lines.append(f"layers: {sorted(adata.layers.keys())}")
    cats = [c for c in adata.obs.columns if str(adata.obs[c].dtype) == "category"]
    lines.append(f"obs columns: {list(adata.obs.columns)} (categorical: {cats})")
    lines.append(f"var columns: {list(adata.var.columns)}")
    lines.append(f"embeddings (obsm): {sorted(adata.obsm.keys())}")
    lines.append(f"cell graphs (obsp): {sorted(adata.obsp.keys())}")
    has_counts = Key.layers.SPLICED in adata.layers and Key.layers.UNSPLICED in adata.layers
    has_moments = Key.layers.MS in adata.layers and Key.layers.MU in adata.layers
    if has_moments:
        lines.append("preprocessed: yes (layers Ms/Mu present; used as they are)")
    elif has_counts:
        lines.append("preprocessed: no (explorer fit will filter, normalise and compute moments)")
    if Key.layers.VELOCITY in adata.layers:
        mode = adata.uns.get(Key.uns.VELOCITY_PARAMS, {}).get("mode", "unknown")
        lines.append(f"velocity: present (model {mode})")
    ready = has_counts or has_moments
    lines.append(
        "ready for velocity: yes"
        if ready
        else "ready for velocity: no: needs layers 'spliced' and 'unspliced' (velocyto/STARsolo output)"
    )
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    adata, path = _load(args.input, spliced_layer=args.spliced_layer, unspliced_layer=args.unspliced_layer)
    print(f"file: {path}")
    for line in describe(adata):
        print(line)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    # the one import of the app: Panel loads only for `explorer serve` (see explorer/__init__.py)
    from explorer.app.server import serve

    serve(
        args.data,
        port=args.port,
        data_dir=args.data_dir,
        show=args.show,
        address=args.address,
        allow_websocket_origin=args.allow_websocket_origin,
        num_procs=args.num_procs,
    )
    return 0


def _add_layer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spliced-layer",
        "--spliced_layer",
        dest="spliced_layer",
        default="spliced",
        metavar="NAME",
        help="layer holding the spliced counts (default: spliced), renamed to 'spliced' on read",
    )
    parser.add_argument(
        "--unspliced-layer",
        "--unspliced_layer",
        dest="unspliced_layer",
        default="unspliced",
        metavar="NAME",
        help="layer holding the unspliced counts (default: unspliced)",
    )


def _add_alias(group: argparse._ActionsContainer, name: str, **kwargs: Any) -> None:
    """Accept scVelo's ``--n_top_genes`` spelling and the usual ``--n-top-genes``."""
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    group.add_argument(*flags, dest=name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``explorer`` argument parser."""
    parser = argparse.ArgumentParser(prog="explorer", description="Fit and explore RNA velocity.")
    parser.add_argument("--version", action="version", version=f"explorer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit a velocity model and write an .h5ad scVelo/CellRank can read")
    fit.add_argument(
        "input",
        nargs="?",
        default=None,
        help=".h5ad or .loom with layers spliced/unspliced (default: the bundled sample)",
    )
    fit.add_argument(
        "--model", default="stochastic", help="model name (see `explorer models`); default stochastic"
    )
    fit.add_argument(
        "--out", "-o", default=None, help="output .h5ad (default: <input>_<model>.h5ad here); never the input"
    )
    fit.add_argument("--force", "-f", action="store_true", help="replace --out if it exists")
    fit.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="model hyperparameter, repeatable"
    )
    fit.add_argument(
        "--basis", default="umap", help="embedding to project velocity on (X_<basis>); default umap"
    )
    pre = fit.add_argument_group("preprocessing (scVelo's names and defaults)")
    for name in ("min_shared_counts", "n_top_genes", "n_pcs", "n_neighbors"):
        _add_alias(pre, name, type=int, default=getattr(PREPROCESS, name))
    fit.add_argument("--seed", type=int, default=0)
    _add_layer_options(fit)
    fit.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    atlas = fit.add_argument_group("atlas scale: streamed gene blocks, optionally on Dask (dynamical model)")
    atlas.add_argument(
        "--stream", action="store_true", help="stream gene blocks from disk and write a .zarr (implied by a .zarr input)"
    )
    atlas.add_argument("--scheduler", default=None, metavar="ADDR", help="Dask scheduler, e.g. tcp://host:8786")
    atlas.add_argument("--workers", type=int, default=None, metavar="N", help="start a local Dask cluster of N workers")
    fit.set_defaults(func=_cmd_fit)

    fates = sub.add_parser(
        "fates",
        help="macrostates, initial/terminal states and fate probabilities (CellRank 2's keys) of a fit",
    )
    fates.add_argument("input", help=".h5ad with a velocity fit (written by `explorer fit`)")
    fates.add_argument("--out", "-o", default=None, help="output .h5ad (default: <input>_fates.h5ad here)")
    fates.add_argument("--force", "-f", action="store_true", help="replace --out if it exists")
    fates.add_argument(
        "--mode",
        default="deterministic",
        choices=["deterministic", "stochastic", "monte_carlo"],
        help="velocity kernel mode, as CellRank's VelocityKernel (default: deterministic); "
        "stochastic and monte_carlo use a fit's layers['velocity_variance'] (VeloVAE's posterior) "
        "when present, else the kNN estimate",
    )
    fates.add_argument(
        "--similarity",
        default="correlation",
        choices=["correlation", "cosine", "dot_product"],
        help="velocity-displacement similarity (default: correlation)",
    )
    _add_alias(
        fates,
        "n_states",
        type=int,
        default=None,
        help="number of macrostates (default: 10, or as many as the cells hold, n_obs / n_cells, 2 at least)",
    )
    _add_alias(
        fates,
        "connectivity_weight",
        type=float,
        default=0.2,
        help="weight of the connectivity kernel in the mix, in [0, 1] (default: 0.2, CellRank's tutorials)",
    )
    _add_alias(fates, "n_cells", type=int, default=30, help="most typical cells per state (default: 30)")
    _add_alias(
        fates,
        "stability_threshold",
        type=float,
        default=None,
        help="terminal states: macrostates with a coarse self-transition at least this (default: 0.96)",
    )
    _add_alias(
        fates,
        "terminal_states",
        default=None,
        metavar="A,B,...",
        help="choose the terminal states among the macrostates by name instead",
    )
    _add_alias(
        fates, "cluster_key", default="clusters", help="obs column naming the states (default: clusters)"
    )
    _add_alias(fates, "n_samples", type=int, default=1000, help="draws per cell with --mode monte_carlo")
    fates.add_argument("--seed", type=int, default=0, help="seed of the monte_carlo draws")
    fates.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    fates.set_defaults(func=_cmd_fates)

    compare = sub.add_parser(
        "compare", help="fit several models and tabulate their metrics (CBDir, ICVCoh, consistency...)"
    )
    compare.add_argument(
        "input",
        nargs="?",
        default=None,
        help=".h5ad or .loom with layers spliced/unspliced, or preprocessed (default: the bundled sample)",
    )
    compare.add_argument(
        "--models",
        default="steady_state,stochastic,dynamical",
        help="models to fit and compare, separated by commas (default: steady_state,stochastic,dynamical)",
    )
    compare.add_argument(
        "--transitions",
        default=None,
        metavar="A>B,C>D",
        help="cluster transitions for CBDir and ICVCoh, e.g. 'Ngn3 high EP>Pre-endocrine,Pre-endocrine>Beta'",
    )
    compare.add_argument(
        "--out",
        "-o",
        default=None,
        help=(
            "output table .csv (default: <input>_compare.csv here); the JSON goes beside it (.json) and, "
            "with --transitions, each gene's term of each CBDir in <name>_genes.csv"
        ),
    )
    compare.add_argument("--force", "-f", action="store_true", help="replace the outputs if they exist")
    _add_alias(compare, "cluster_key", default="clusters", help="obs column of clusters (default: clusters)")
    _add_alias(
        compare,
        "time_key",
        default=None,
        help="obs column of capture times: Spearman correlation with each model's latent time",
    )
    cpre = compare.add_argument_group("preprocessing (scVelo's names and defaults)")
    for name in ("min_shared_counts", "n_top_genes", "n_pcs", "n_neighbors"):
        _add_alias(cpre, name, type=int, default=getattr(PREPROCESS, name))
    compare.add_argument("--seed", type=int, default=0, help="seed of the preprocessing and every model")
    _add_layer_options(compare)
    compare.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    compare.set_defaults(func=_cmd_compare)

    traj = sub.add_parser(
        "trajectories", help="integrate a vector-field fit from chosen cells; one CSV row per cell and step"
    )
    _add_field_options(
        traj, out_help="output .csv: cell, step, time, embedding coordinates, end cell and group"
    )
    traj.add_argument("--basis", default="umap", help="embedding for the coordinates (default: umap)")
    traj.set_defaults(func=_cmd_trajectories)

    pert = sub.add_parser(
        "perturb", help="in-silico perturbation of a gene on a vector-field fit; prints the fate shift"
    )
    _add_field_options(pert, out_help="also write the fate table as .csv")
    pert.add_argument("--gene", required=True, help="gene to perturb (one of the field's genes)")
    pert.add_argument(
        "--factor", type=float, default=None, help="multiply the gene's Ms by this (0: knock-out)"
    )
    pert.add_argument("--value", type=float, default=None, help="or set the gene's Ms to this")
    pert.add_argument(
        "--no-hold", action="store_true", help="perturb the start only (default: the gene is held all along)"
    )
    pert.set_defaults(func=_cmd_perturb)

    models = sub.add_parser("models", help="list the velocity models and their parameters")
    models.set_defaults(func=_cmd_models)

    info = sub.add_parser("info", help="what a file holds and whether it is ready for velocity")
    info.add_argument("input", nargs="?", default=None, help=".h5ad or .loom (default: the bundled sample)")
    _add_layer_options(info)
    info.set_defaults(func=_cmd_info)

    serve = sub.add_parser("serve", help="open the explorer app in the browser")
    serve.add_argument(
        "data", nargs="?", default=None, help="dataset under --data-dir (default: the bundled sample)"
    )
    serve.add_argument("--port", type=int, default=5006, help="port to listen on; 0 picks a free one")
    serve.add_argument(
        "--data-dir", default=".", help="the only folder the app reads datasets from (default: .)"
    )
    serve.add_argument("--show", action="store_true", help="open a browser tab")
    serve.add_argument(
        "--address",
        default=None,
        help="address to listen on (default 127.0.0.1: this machine only). 0.0.0.0 opens the app "
        "to the network: anyone who can reach it can read the data directory; see the README",
    )
    serve.add_argument(
        "--allow-websocket-origin",
        action="append",
        default=None,
        metavar="HOST[:PORT]",
        help="host name browsers may use to reach the app besides localhost, repeatable "
        "(Panel's option; needed with --address)",
    )
    serve.add_argument(
        "--num-procs",
        type=int,
        default=1,
        help="worker processes for more users (0: one per core); each holds the dataset",
    )
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``explorer`` console script; returns the exit code."""
    set_up_process()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    token = CALLER.set("cli")  # messages name --options, not keyword arguments
    try:
        code = args.func(args)
    except InputError as err:
        print(f"explorer {args.command}: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except (KeyboardInterrupt, FitCancelled):
        print(f"explorer {args.command}: interrupted; nothing was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        CALLER.reset(token)
    if argv is None and code == 0 and is_in_memory_fit(sys.argv):
        _exit_without_teardown(code)
    return code


def _exit_without_teardown(code: int) -> None:
    """End the process now: logs and output flushed, the interpreter's teardown skipped.

    After an in-memory ``explorer fit`` has written its file, everything left is the
    interpreter tearing down the modules and freeing the heap (numba's and LLVM's
    state, the fitted arrays): 0.3-0.7 s of the command's wall clock on the pancreas,
    for nothing the user sees. Only the console command does this (``main`` called
    without ``argv``: a program or test calling ``main([...])`` gets the code back), only
    on success and only when no other non-daemon thread is still running (the
    interpreter would wait for it).
    """
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
