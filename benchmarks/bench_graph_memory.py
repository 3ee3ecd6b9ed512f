"""Peak memory of the velocity graph's steps at 100,000 cells, against the memory of their results.

Every model's ``explorer fit`` scores the velocity graph on scVelo's neighbourhood (the kNN
recursed twice: about 355 cells per cell at 100,000 simulated cells, 35 million edges),
and a latent time's root cells come from a backward transition matrix (VeloVAE's initial
time's and the dynamical model's, on that pattern up to 20,000 cells). Each
step runs in one process on the same prepared simulation; before each, the kernel's
peak-RSS mark is reset (``/proc/self/clear_refs``, Linux), and the step's figure is its
peak resident memory above what the process held when it began (the data, prepared and
loaded), beside the size of what it returns.

``--compare-with DIR`` runs the same steps in a second process with another checkout of
explorer first on ``PYTHONPATH`` (``git worktree add DIR <commit>``), on the same file:
before and after a change, side by side in one run.

Usage::

    python benchmarks/bench_graph_memory.py [--cells 100000] [--data prepared.h5ad]
        [--compare-with /tmp/explorer-before] [--out benchmarks/results/graph_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _prepare(n_obs: int, path: Path) -> None:
    """The simulation ``bench_velovae.py --sizes`` fits: two lineages, 200 genes, prepared without UMAP."""
    from explorer._process import set_up_process

    set_up_process()
    from explorer.data.simulate import simulate
    from explorer.pipeline import prepare

    sim = simulate(n_obs=n_obs, n_vars=200, seed=0, branches=2)
    prepare(sim, seed=0, compute_umap=False)
    sim.write_h5ad(path)


def _gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    msg = f"{field} not in /proc/self/status"
    raise RuntimeError(msg)


def _nbytes(result: object) -> int:
    parts = result if isinstance(result, tuple) else (result,)
    return sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in parts)


def _worker(path: str) -> dict:
    """The steps' peaks in this process (whichever explorer is first on the path), and its file."""
    import gc
    import time

    from explorer._process import set_up_process

    set_up_process()
    import anndata as ad
    import numpy as np

    import explorer
    from explorer.graph import latent_time as lt_mod
    from explorer.graph import transition as tr
    from explorer.keys import Key
    from explorer.models.steady_state import SteadyState

    adata = ad.read_h5ad(path)
    fit = SteadyState(use_highly_variable=False).fit(adata)
    genes = np.asarray(fit.velocity_genes, dtype=bool) & np.isfinite(fit.velocity).all(0)
    X = np.asarray(adata.layers[Key.layers.MS][:, genes], dtype=np.float32)
    V = np.ascontiguousarray(fit.velocity[:, genes], dtype=np.float32)
    pattern = tr.neighbors_for_graph(adata)
    graphs = getattr(tr, "velocity_graphs", None)  # since 2026-12-05; before, the split of the signed graph

    def velocity_graph(p):
        return graphs(X, V, p) if graphs else tr.split_graph(tr.cosine_correlations(X, V, p))

    pos, neg = velocity_graph(pattern)
    steps = {
        "neighbour pattern (kNN recursed twice)": lambda: tr.neighbors_for_graph(adata),
        "velocity graph (positive and negative)": lambda: velocity_graph(pattern),
        "forward transition matrix": lambda: tr.transition_matrix(pos, neg),
        "backward transition matrix": lambda: tr.transition_matrix(pos, neg, backward=True),
        "backward matrix from velocities (pattern, graph, matrix)": lambda: (
            lt_mod.transitions_backward_from_velocity(X, V, tr.neighbors_for_graph(adata))
        ),
    }
    rows = []
    for name, step in steps.items():
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak-RSS mark (VmHWM) starts again from the current RSS
        start = _gib("VmRSS:")
        clock = time.perf_counter()
        result = step()
        seconds = time.perf_counter() - clock
        peak = _gib("VmHWM:") - start
        rows.append(
            {
                "step": name,
                "peak_above_start_gib": round(peak, 3),
                "result_gib": round(_nbytes(result) / 2**30, 3),
                "seconds": round(seconds, 2),
                "start_gib": round(start, 3),
            }
        )
        del result
    return {"explorer": explorer.__file__, "steps": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--data", type=Path, help="a prepared .h5ad to measure on (default: simulate --cells)")
    parser.add_argument("--compare-with", type=Path, help="another checkout of explorer, measured in the same run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "graph_memory.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = args.data
        if path is None:
            path = Path(tmp) / f"sim_{args.cells}.h5ad"
            print(f"simulating and preparing {args.cells:,} cells ...", flush=True)
            _prepare(args.cells, path)
        checkouts = {"this checkout": ROOT}
        if args.compare_with:
            checkouts = {f"{args.compare_with}": args.compare_with.resolve(), **checkouts}
        runs = {}
        for label, checkout in checkouts.items():
            env = {**os.environ, "PYTHONPATH": str(checkout)}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=checkout)
            runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
    labels = list(runs)
    head = "| step | result (GiB) | " + " | ".join(f"peak above start, {x} (GiB)" for x in labels) + " |"
    for label, run in runs.items():
        print(f"{label}: explorer from {run['explorer']}")
    print(head)
    print("|---" * (2 + len(labels)) + "|")
    for i, row in enumerate(runs[labels[-1]]["steps"]):
        peaks = " | ".join(
            f"{runs[x]['steps'][i]['peak_above_start_gib']:.2f} ({runs[x]['steps'][i]['seconds']:.1f} s)" for x in labels
        )
        print(f"| {row['step']} | {row['result_gib']:.2f} | {peaks} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "cells": args.cells if args.data is None else str(args.data),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "runs": runs,
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
