"""Time and peak memory of the streamed dynamical fit (explorer.stream) at increasing sizes, and on Dask.

For each size, simulated data (``explorer.data.simulate``) is preprocessed in memory
(``explorer.pipeline.prepare`` without UMAP: the setup, not measured) and stored as an
AnnData ``.zarr`` without ``Ms``/``Mu``. The measured run is then a fresh process running
:func:`explorer.stream.fit_streamed` on it: moments per gene block, the gene choice, the
dynamical fit, the velocity graph from per-edge sums, transition matrix, projection on the
PCA, confidence, root cells, latent time and the onsets, writing the output store. Its
peak memory is the process's maximum resident set (and, on Dask, the largest worker's and
the sum over the workers).

The 10^6-cell and 10^7-cell figures are an extrapolation from the measured per-cell costs,
printed as such.

Usage::

    python benchmarks/bench_atlas.py [--cells 2000 5000 10000] [--genes 2000] [--workers 0 1 2]
        [--out benchmarks/results/atlas.json]

``--workers 0`` is the single-process path; ``N > 0`` a Dask ``LocalCluster`` of N workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup(n_obs: int, n_vars: int, path: Path) -> dict:
    """Simulate, preprocess in memory and store as .zarr (not measured)."""
    import anndata as ad

    from explorer.data.simulate import simulate
    from explorer.pipeline import prepare

    clock = time.perf_counter()
    adata = simulate(n_obs=n_obs, n_vars=n_vars, seed=0)
    for key in [k for k in adata.layers if k.startswith("true_")]:
        del adata.layers[key]
    prepare(adata, n_top_genes=None, compute_umap=False)
    del adata.layers["Ms"], adata.layers["Mu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata: zarr v2 is still its default
        ad.settings.zarr_write_format = 2
        adata.write_zarr(path)
    return {"n_vars_kept": int(adata.n_vars), "setup_s": time.perf_counter() - clock}


def _child(path: str, out: str, workers: int) -> None:
    """The measured run (a fresh process): print one JSON line."""
    from explorer.stream import dask_client, fit_streamed

    clock = time.perf_counter()
    worker_peaks: list[float] = []
    if workers:
        with dask_client(n_workers=workers) as client:
            summary = fit_streamed(path, out, basis="pca", client=client, overwrite=True)
            peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            worker_peaks = [v / 2**20 for v in peaks.values()]
    else:
        summary = fit_streamed(path, out, basis="pca", overwrite=True)
    wall = time.perf_counter() - clock
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(
        json.dumps(
            {
                "wall_s": wall,
                "peak_gib": peak,
                "worker_peak_gib": max(worker_peaks, default=0.0),
                "workers_total_gib": sum(worker_peaks),
                "n_fitted": summary.n_fitted,
                "n_velocity_genes": summary.n_velocity_genes,
                "n_edges": summary.n_edges,
                "passes_s": {k: round(v, 2) for k, v in summary.seconds.items()},
            }
        )
    )


def _extrapolate(rows: list[dict], n_vars: int) -> list[dict]:
    """Least-squares line through (cells, value) of the single-process runs, at 10^6 and 10^7 cells."""
    import numpy as np

    single = [r for r in rows if r["workers"] == 0]
    if len(single) < 2:
        return []
    x = np.array([r["n_obs"] for r in single], dtype=float)
    out = []
    for key in ("wall_s", "peak_gib"):
        y = np.array([r[key] for r in single])
        slope, intercept = np.polyfit(x, y, 1)
        for n in (1_000_000, 10_000_000):
            out.append({"quantity": key, "n_obs": n, "n_vars": n_vars, "value": slope * n + intercept,
                        "per_1000_cells": slope * 1000})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[2000, 5000, 10000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dask-cells", type=int, default=None, help="size the Dask runs use (default: the smallest)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "atlas.json"))
    parser.add_argument("--child", nargs=3, metavar=("STORE", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    rows = []
    dask_cells = args.dask_cells or min(args.cells)
    with tempfile.TemporaryDirectory(prefix="bench_atlas_") as tmp:
        for n_obs in args.cells:
            store = Path(tmp) / f"sim_{n_obs}.zarr"
            info = _setup(n_obs, args.genes, store)
            for workers in args.workers:
                if workers and n_obs != dask_cells:
                    continue
                cmd = [sys.executable, __file__, "--child", str(store), str(Path(tmp) / "out.zarr"), str(workers)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=dict(os.environ))
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(done.returncode)
                row = {"n_obs": n_obs, "n_vars": args.genes, "workers": workers, **info}
                row.update(json.loads(done.stdout.strip().splitlines()[-1]))
                rows.append(row)
                print(
                    f"{n_obs:>9,} cells x {args.genes:,} genes ({row['n_fitted']} fitted) "
                    f"{'in process' if workers == 0 else f'Dask, {workers} worker(s)':>18}: "
                    f"{row['wall_s']:7.1f} s, peak {row['peak_gib']:.2f} GiB"
                    + (f" (+ workers {row['workers_total_gib']:.2f} GiB)" if workers else ""),
                    flush=True,
                )
    extra = _extrapolate(rows, args.genes)
    print("\n| cells | genes | where | wall (s) | peak memory (GiB) | genes fitted |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        where = "one process" if r["workers"] == 0 else f"Dask, {r['workers']} worker(s)"
        mem = r["peak_gib"] + r["workers_total_gib"]
        print(f"| {r['n_obs']:,} | {r['n_vars']:,} | {where} | {r['wall_s']:.1f} | {mem:.2f} | {r['n_fitted']} |")
    if extra:
        print("\nEXTRAPOLATED (a straight line through the single-process runs; not measured):")
        for e in extra:
            print(f"  {e['quantity']:>9} at {e['n_obs']:>10,} cells: {e['value']:,.1f} ({e['per_1000_cells']:.3f} per 1,000 cells)")
    load = os.getloadavg()
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": load},
        "note": "measured on a shared machine; other processes were running (see loadavg)",
        "rows": rows,
        "extrapolated": extra,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    tmp_out.replace(args.out)
    print(f"\nload average at the end: {load}; written {args.out}")


if __name__ == "__main__":
    main()
