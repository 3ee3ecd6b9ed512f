"""Command line: ``explorer fit``, ``explorer models``, ``explorer info``, ``explorer serve``.

A thin argparse front-end over the Python API. Bad input (``InputError``) is printed as
one clear message on stderr with exit code 2; progress goes to stderr as a bar.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explorer._types import FitCancelled, InputError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from explorer._types import Progress

logger = logging.getLogger("explorer")

#: exit codes: 2 for bad input (as argparse uses for bad arguments), 130 for Ctrl-C
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130

SAMPLE = "sample"


class _Bar:
    """A progress bar on stderr (tqdm), fed with :class:`~explorer.Progress` reports."""

    def __init__(self, *, enabled: bool) -> None:
        self._bar = None
        self._enabled = enabled

    def __call__(self, p: Progress) -> None:
        if not self._enabled:
            return
        from tqdm import tqdm

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
    """``'10' -> 10``, ``'0.5' -> 0.5``, ``'true' -> True``, ``'none' -> None``, else the text."""
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


def _load(path_text: str | None) -> tuple[AnnData, Path | None]:
    """Read the input (or the bundled sample for ``None``/``'sample'``); return it and its path."""
    from explorer.data.io import read
    from explorer.data.samples import load_sample, sample_path

    if path_text is None or path_text == SAMPLE:
        return load_sample(), sample_path()
    return read(path_text), Path(path_text)


def _cmd_fit(args: argparse.Namespace) -> int:
    from explorer.data.io import write
    from explorer.pipeline import run_velocity

    adata, in_path = _load(args.input)
    out = Path(args.out) if args.out else Path(f"{(in_path.stem if in_path else 'sample')}_{args.model}.h5ad")
    protect = [in_path] if in_path is not None else []
    if in_path is not None and out.resolve() == in_path.resolve():
        msg = (
            f"--out {out} is the input file; explorer never overwrites its input. Choose another output path."
        )
        raise InputError(msg)
    bar = _Bar(enabled=not args.quiet)
    start = time.perf_counter()
    try:
        result = run_velocity(
            adata,
            model=args.model,
            model_params=_model_params(args.param),
            basis=args.basis,
            min_shared_counts=args.min_shared_counts,
            n_top_genes=args.n_top_genes,
            n_pcs=args.n_pcs,
            n_neighbors=args.n_neighbors,
            seed=args.seed,
            progress=bar,
        )
    finally:
        bar.close()
    written = write(adata, out, protect=protect)
    n_genes = int(result.velocity_genes.sum())
    print(
        f"{args.model}: {adata.n_obs} cells, {adata.n_vars} genes, {n_genes} velocity genes "
        f"in {time.perf_counter() - start:.1f} s -> {written}",
        file=sys.stderr,
    )
    return 0


def _cmd_models(_args: argparse.Namespace) -> int:
    from explorer.models import MODELS

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
    from explorer.keys import Key

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
    adata, path = _load(args.input)
    print(f"file: {path}")
    for line in describe(adata):
        print(line)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from explorer.app.server import serve

    serve(args.data, port=args.port, data_dir=args.data_dir, show=args.show)
    return 0


def _add_alias(group: argparse._ActionsContainer, name: str, **kwargs: Any) -> None:
    """Accept scVelo's ``--n_top_genes`` spelling and the usual ``--n-top-genes``."""
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    group.add_argument(*flags, dest=name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``explorer`` argument parser."""
    from explorer import __version__

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
    fit.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="model hyperparameter, repeatable"
    )
    fit.add_argument(
        "--basis", default="umap", help="embedding to project velocity on (X_<basis>); default umap"
    )
    pre = fit.add_argument_group("preprocessing (scVelo's names and defaults)")
    _add_alias(pre, "min_shared_counts", type=int, default=20)
    _add_alias(pre, "n_top_genes", type=int, default=2000)
    _add_alias(pre, "n_pcs", type=int, default=30)
    _add_alias(pre, "n_neighbors", type=int, default=30)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    fit.set_defaults(func=_cmd_fit)

    models = sub.add_parser("models", help="list the velocity models and their parameters")
    models.set_defaults(func=_cmd_models)

    info = sub.add_parser("info", help="what a file holds and whether it is ready for velocity")
    info.add_argument("input", nargs="?", default=None, help=".h5ad or .loom (default: the bundled sample)")
    info.set_defaults(func=_cmd_info)

    serve = sub.add_parser("serve", help="open the explorer app in the browser")
    serve.add_argument(
        "data", nargs="?", default=None, help="dataset under --data-dir (default: the bundled sample)"
    )
    serve.add_argument("--port", type=int, default=5006)
    serve.add_argument(
        "--data-dir", default=".", help="the only folder the app reads datasets from (default: .)"
    )
    serve.add_argument("--show", action="store_true", help="open a browser tab")
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``explorer`` console script; returns the exit code."""
    # torch's OpenMP threads spin while idle; on a busy 2-core machine that made a dynamical
    # fit 20x slower. Must be set before torch is imported; the user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except InputError as err:
        print(f"explorer {args.command}: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except (KeyboardInterrupt, FitCancelled):
        print(f"explorer {args.command}: interrupted; nothing was written.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
