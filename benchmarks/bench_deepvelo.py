"""Benchmark: DeepVelo's training time and peak memory, and its scores beside the other models.

1. The real pancreas (3,696 cells, ``prepare``'s 2,000 genes, default parameters:
   full batch, 100 epochs): training time (wall and CPU), peak memory, and for
   ``deepvelo`` and the other models the mean overall and cell-type-wise consistency
   (:func:`explorer.graph.metrics.velocity_consistency`, ``..._by_type``) and the
   cross-boundary direction correctness (CBDir) of the endocrinogenesis transitions,
   each on the model's own velocity genes and on the dynamical model's;
2. simulations of 10k and 100k cells (``simulate(n_obs, n_vars=300)``) trained
   mini-batched (1,024 cells) for a few epochs (20 and 5 by default), to show time per
   epoch and memory against cells, and the resident memory after every epoch (flat:
   training does not accumulate memory).

Each case runs in a fresh process, whose peak resident memory (``ru_maxrss``) is
reported beside its memory after loading the data. Prints a table and writes
``benchmarks/results/deepvelo.json``. Usage::

    python benchmarks/bench_deepvelo.py [--sizes 10000 100000] [--sim-epochs 20 5] [--skip-pancreas] [--threads 1]
    python benchmarks/bench_deepvelo.py --threads 2 --sizes  # the pancreas only

``--skip-pancreas`` keeps the pancreas figures already in the JSON. ``--threads`` sets
torch's intra-op threads in the workers (default: torch's own, one per core); each
record keeps the number used. On a machine shared with other jobs, one thread wastes
far less time waiting for the others than two.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_dynamical import TRANSITIONS  # endocrinogenesis (Bastidas-Ponce et al. 2019)

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EXPLORER_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "results"
OTHER_MODELS = ("steady_state", "stochastic", "dynamical")


def _rss_gb() -> float:
    """Peak resident memory of this process so far, GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _scores(adata, velocity: np.ndarray, genes: np.ndarray, cluster_key: str = "clusters") -> dict:
    from explorer.graph.metrics import (
        cross_boundary_correctness,
        velocity_consistency,
        velocity_consistency_by_type,
    )
    from explorer.graph.transition import knn_indices

    V = velocity[:, genes]
    cb = {
        f"{a} -> {b}": cross_boundary_correctness(
            adata, velocity, source=a, target=b, genes=genes, cluster_key=cluster_key
        )
        for a, b in TRANSITIONS
    }
    cb = {k: float(v) for k, v in cb.items() if np.isfinite(v)}
    return {
        "n_genes": int(genes.sum()),
        "consistency": float(np.nanmean(velocity_consistency(V, knn_indices(adata.obsp["distances"])))),
        "consistency_type": float(np.nanmean(velocity_consistency_by_type(V, adata.obs[cluster_key]))),
        "cbdir": cb,
        "cbdir_mean": float(np.mean(list(cb.values()))) if cb else float("nan"),
    }


def pancreas_worker(out: str) -> None:
    """Fit deepvelo and the other models on the pancreas and score them (a fresh process)."""
    import anndata

    from explorer.models import get_model
    from explorer.pipeline import prepare

    adata = anndata.read_h5ad(SHARED / "data" / "pancreas_endocrinogenesis_3696.h5ad")
    prepare(adata, compute_umap=False)
    loaded = _rss_gb()
    model = get_model("deepvelo", seed=0)
    w, c = time.perf_counter(), time.process_time()
    res = model.fit(adata)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    import torch

    record = {
        "torch_threads": torch.get_num_threads(),
        "cells": adata.n_obs,
        "genes": int(res.velocity_genes.sum()),
        "epochs": model.epochs,
        "fit_wall_s": wall,
        "fit_cpu_s": cpu,
        "train_wall_s": model.timings_["train"],
        "rss_loaded_gb": loaded,
        "rss_peak_gb": _rss_gb(),
        "loss_first": model.history_[0]["total"],
        "loss_last": model.history_[-1]["total"],
    }
    others = {}
    for name in OTHER_MODELS:
        others[name] = get_model(name, seed=0).fit(adata)
    dyn_genes = np.asarray(others["dynamical"].velocity_genes, dtype=bool)
    models = {"deepvelo": res, **others}
    record["scores"] = {
        name: {
            "own_genes": _scores(adata, r.velocity, np.asarray(r.velocity_genes, dtype=bool)),
            "dynamical_genes": _scores(adata, r.velocity, dyn_genes & np.isfinite(r.velocity).all(0)),
        }
        for name, r in models.items()
    }
    Path(out).write_text(json.dumps(record))


def _rss_now_gb() -> float:
    """Resident memory of this process now, GB (``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1024**3


def simulation_worker(n_obs: int, n_vars: int, epochs: int, out: str) -> None:
    """Train deepvelo mini-batched on ``simulate(n_obs, n_vars)`` (a fresh process).

    The simulator's true layers are dropped before preprocessing (``prepare`` needs only
    ``spliced``/``unspliced``) and the raw counts after it, so that the peak measured is
    the model's rather than the simulator's. The resident memory is read after every
    epoch: flat across epochs means memory does not grow with training.
    """
    from explorer.data.simulate import simulate
    from explorer.models import get_model
    from explorer.pipeline import prepare

    adata = simulate(n_obs=n_obs, n_vars=n_vars, seed=0)
    for key in ("true_s", "true_u", "true_velocity"):
        adata.layers.pop(key, None)
    prepare(adata, compute_umap=False)
    for key in ("spliced", "unspliced"):
        adata.layers.pop(key, None)
    import gc

    gc.collect()
    loaded_now, loaded = _rss_now_gb(), _rss_gb()
    model = get_model("deepvelo", seed=0, epochs=epochs, batch_size=1024)
    per_epoch: list[float] = []
    epoch_cpu: list[float] = []

    def progress(p) -> None:
        if p.step <= epochs:
            per_epoch.append(_rss_now_gb())
            epoch_cpu.append(time.process_time())

    w, c = time.perf_counter(), time.process_time()
    model.fit(adata, progress=progress)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    import torch

    cpu_per_epoch = np.diff([c, *epoch_cpu])
    record = {
        "torch_threads": torch.get_num_threads(),
        "cells": n_obs,
        "genes": n_vars,
        "epochs": epochs,
        "batch_size": 1024,
        "fit_wall_s": wall,
        "fit_cpu_s": cpu,
        "train_wall_s": model.timings_["train"],
        "train_s_per_epoch": model.timings_["train"] / epochs,
        "cpu_s_per_epoch": float(np.median(cpu_per_epoch[1:] if epochs > 1 else cpu_per_epoch)),
        "loss_first": model.history_[0]["total"],
        "loss_last": model.history_[-1]["total"],
        "rss_loaded_gb": loaded,
        "rss_before_fit_gb": loaded_now,
        "rss_after_epoch_gb": per_epoch,
        "rss_peak_gb": _rss_gb(),
    }
    Path(out).write_text(json.dumps(record))


def _run(args: list[str], out: Path, threads: int) -> dict:
    subprocess.run([sys.executable, __file__, "--threads", str(threads), *args, str(out)], check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--sim-genes", type=int, default=300)
    parser.add_argument(
        "--sim-epochs", type=int, nargs="+", default=[20, 5], help="epochs per size (one value: all sizes)"
    )
    parser.add_argument("--skip-pancreas", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    parser.add_argument("--pancreas-worker", nargs=1, help=argparse.SUPPRESS)
    parser.add_argument("--simulation-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pancreas_worker or args.simulation_worker:
        import logging

        import torch

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        if args.threads > 0:
            torch.set_num_threads(args.threads)
    if args.pancreas_worker:
        pancreas_worker(args.pancreas_worker[0])
        return
    if args.simulation_worker:
        n, g, e, out = args.simulation_worker
        simulation_worker(int(n), int(g), int(e), out)
        return

    import tempfile

    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "cores": os.cpu_count(),
        "note": "2 shared cores under load from other jobs: times inflated",
    }
    # checked before any run; `--sizes` with no value runs the pancreas only
    epochs = args.sim_epochs * len(args.sizes) if len(args.sim_epochs) == 1 else args.sim_epochs
    if args.sizes and len(epochs) != len(args.sizes):
        parser.error(f"--sim-epochs: expected 1 or {len(args.sizes)} values; found {len(args.sim_epochs)}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_pancreas:
            results["pancreas"] = _run(["--pancreas-worker"], Path(tmp) / "pancreas.json", args.threads)
        results["simulations"] = [
            _run(
                ["--simulation-worker", str(n), str(args.sim_genes), str(e)],
                Path(tmp) / f"sim_{n}.json",
                args.threads,
            )
            for n, e in zip(args.sizes, epochs, strict=False)
        ]
    path = RESULTS / "deepvelo.json"
    if path.exists():
        # keep the figures of an earlier run for the parts not run now
        earlier = json.loads(path.read_text())
        if args.skip_pancreas and "pancreas" in earlier:
            results["pancreas"] = earlier["pancreas"]
        if not args.sizes and "simulations" in earlier:
            results["simulations"] = earlier["simulations"]
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(results, indent=2))
    tmp_path.replace(path)

    if "pancreas" in results:
        p = results["pancreas"]
        print(
            f"pancreas {p['cells']} cells x {p['genes']} genes, {p['epochs']} epochs, "
            f"{p['torch_threads']} torch thread(s): "
            f"fit {p['fit_wall_s']:.1f} s wall / {p['fit_cpu_s']:.1f} s CPU, "
            f"peak {p['rss_peak_gb']:.2f} GB (after loading {p['rss_loaded_gb']:.2f} GB)"
        )
        print("| model | genes | consistency | type consistency | CBDir mean | CBDir (dynamical's genes) |")
        print("|---|---|---|---|---|---|")
        for name, sc in p["scores"].items():
            own, dyn = sc["own_genes"], sc["dynamical_genes"]
            print(
                f"| {name} | {own['n_genes']} | {own['consistency']:.3f} | {own['consistency_type']:.3f} | "
                f"{own['cbdir_mean']:.3f} | {dyn['cbdir_mean']:.3f} |"
            )
    print("| cells | genes | epochs | CPU s / epoch | wall s / epoch | GB before fit | GB after each epoch | peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["simulations"]:
        after = r.get("rss_after_epoch_gb", [])
        span = f"{min(after):.2f}-{max(after):.2f}" if after else ""
        print(
            f"| {r['cells']:,} | {r['genes']} | {r['epochs']} | {r.get('cpu_s_per_epoch', float('nan')):.1f} | "
            f"{r['train_s_per_epoch']:.1f} | {r.get('rss_before_fit_gb', r['rss_loaded_gb']):.2f} | {span} | "
            f"{r['rss_peak_gb']:.2f} |"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
