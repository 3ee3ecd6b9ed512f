"""Benchmark: explorer's dynamical model against scVelo's ``recover_dynamics``.

Runs, in one go and on the same preprocessed inputs, genes and cores:

1. the real pancreas (3,696 cells; scVelo's velocity genes) and a simulation
   (``simulate(n_obs=3000, n_vars=1000)``): explorer's :class:`Dynamical` in this
   environment and scVelo (``scv.tl.recover_dynamics(n_jobs=2)`` then
   ``velocity(mode="dynamical")``, ``velocity_graph``, ``latent_time``) in its own
   virtual environment (``pip install scvelo-modern``; never a dependency of explorer),
   each in a fresh process whose peak memory (whole process tree) is sampled;
2. explorer alone on simulations of 1k, 10k and 100k cells (300 genes) to show how the
   cost grows with the number of cells.

It prints a table and writes ``benchmarks/results/dynamical.json``. Usage::

    python benchmarks/bench_dynamical.py [--scvelo-python /tmp/scvenv/bin/python]
        [--sizes 1000 10000 100000] [--scaling-genes 300] [--skip-scvelo]

Quality measures, computed here identically for both tools from what they wrote:
latent-time Spearman correlation with the simulator's true time; the fit R² of every
fitted gene (the curve ``u(t), s(t)`` drawn from the ``fit_*`` parameters at the cells'
``fit_t`` against ``Mu``/``Ms``, each axis divided by its spread), averaged over genes;
the tool's own mean ``fit_likelihood``; on the pancreas the share of genes whose
velocity correlates positively across cells with the other tool's, and the
cross-boundary direction correctness (CBDir) of the endocrinogenesis transitions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EXPLORER_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "results"
#: endocrinogenesis (Bastidas-Ponce et al. 2019; scVelo's pancreas example)
TRANSITIONS = (
    ("Ductal", "Ngn3 low EP"),
    ("Ngn3 low EP", "Ngn3 high EP"),
    ("Ngn3 high EP", "Pre-endocrine"),
    ("Pre-endocrine", "Alpha"),
    ("Pre-endocrine", "Beta"),
    ("Pre-endocrine", "Delta"),
    ("Pre-endocrine", "Epsilon"),
)


# ----------------------------------------------------------------------------------- workers


def explorer_worker(path: str, genes_path: str, out: str, kwargs: str) -> None:
    """Fit explorer's dynamical model (run in a fresh process)."""
    import anndata

    from explorer.models.dynamical import Dynamical

    adata = anndata.read_h5ad(path)
    genes = [g for g in Path(genes_path).read_text().split("\n") if g]
    model = Dynamical(genes=genes, **json.loads(kwargs))
    t0 = time.perf_counter()
    res = model.fit(adata)
    wall = time.perf_counter() - t0
    idx = adata.var_names.get_indexer(genes)
    gp = res.gene_params.iloc[idx]
    np.savez(
        out,
        genes=np.asarray(genes),
        fit_t=res.layers["fit_t"][:, idx],
        velocity=res.velocity[:, idx],
        velocity_genes=res.velocity_genes[idx],
        latent_time=np.asarray(
            res.latent_time if res.latent_time is not None else np.full(adata.n_obs, np.nan)
        ),
        times=np.asarray([wall]),
        timings=json.dumps(model.timings_),
        **{c: gp[c].to_numpy(dtype=np.float64) for c in gp.columns if gp[c].dtype != bool},
    )


def _tree_rss(pid: int) -> int:
    """Resident memory (bytes) of ``pid`` and all its descendants, from ``/proc`` (Linux)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += (
                int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
            )
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, StopIteration, ValueError):
            continue
    return total


def run_measured(cmd: list[str]) -> float:
    """Run ``cmd``; return the peak RSS (GB) of its process tree, sampled every 50 ms."""
    proc = subprocess.Popen(cmd)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    rc = proc.wait()
    done.set()
    thread.join()
    if rc != 0:
        msg = f"benchmark step failed (exit {rc}): {' '.join(cmd)}"
        raise RuntimeError(msg)
    return peak / 1e9


# ----------------------------------------------------------------------------------- measures


def fit_r2(out: dict, Mu: np.ndarray, Ms: np.ndarray) -> np.ndarray:
    """Per-gene R² of the drawn curve at ``fit_t`` (scVelo's convention), both axes in spread units."""
    from explorer.models import kinetics

    beta = out["fit_beta"] * out["fit_scaling"]
    u, s = kinetics.trajectory(out["fit_t"], out["fit_t_"], out["fit_alpha"], beta, out["fit_gamma"])
    u = u * out["fit_scaling"]
    su, ss = Mu.std(0), Ms.std(0)
    su, ss = np.where(su > 0, su, 1), np.where(ss > 0, ss, 1)
    sse = (((Mu - u) / su) ** 2 + ((Ms - s) / ss) ** 2).sum(0)
    sst = (((Mu - Mu.mean(0)) / su) ** 2 + ((Ms - Ms.mean(0)) / ss) ** 2).sum(0)
    return 1 - sse / sst


def _explorer_worker_cmd(path: Path, genes_path: Path, out: Path, kwargs: dict) -> list[str]:
    """This script as a subprocess fitting explorer's model on ``path`` (so peak memory is its own)."""
    args = [str(path), str(genes_path), str(out), json.dumps(kwargs)]
    return [sys.executable, __file__, "--explorer-worker", *args]


def cbdir(adata, velocity: np.ndarray, genes: np.ndarray, key: str = "clusters") -> dict[str, float]:
    """CBDir of every transition in :data:`TRANSITIONS` that has cells on both sides."""
    from explorer.graph.metrics import cross_boundary_correctness

    scores = {
        f"{a} -> {b}": cross_boundary_correctness(
            adata, velocity, source=a, target=b, genes=genes, cluster_key=key
        )
        for a, b in TRANSITIONS
    }
    return {k: v for k, v in scores.items() if np.isfinite(v)}


# ----------------------------------------------------------------------------------- driver


def _prepare_inputs(tmp: Path) -> dict[str, Path]:
    import anndata

    from explorer.data.preprocess import prepare
    from explorer.data.simulate import simulate
    from explorer.models.steady_state import SteadyState

    inputs = {}
    panc = anndata.read_h5ad(SHARED / "data" / "pancreas_endocrinogenesis_3696.h5ad")
    prepare(panc, compute_umap=False)
    sim = simulate(n_obs=3000, n_vars=1000, seed=0)
    prepare(sim, compute_umap=False)
    for name, adata in (("pancreas_3696", panc), ("simulation_3000x1000", sim)):
        path = tmp / f"{name}.h5ad"
        adata.write_h5ad(path)
        genes = SteadyState(use_highly_variable=False).fit(adata).velocity_genes
        (tmp / f"{name}_genes.txt").write_text("\n".join(adata.var_names[genes]))
        inputs[name] = path
    return inputs


def compare(name: str, path: Path, tmp: Path, scvelo_python: str | None, kwargs: dict) -> dict:
    import anndata
    from scipy.stats import spearmanr

    genes_path = tmp / f"{name}_genes.txt"
    row: dict = {"dataset": name}
    outs = {}
    for tool in ("explorer", "scvelo"):
        out = tmp / f"{name}_{tool}.npz"
        if tool == "explorer":
            cmd = _explorer_worker_cmd(path, genes_path, out, kwargs)
        elif scvelo_python:
            cmd = [
                scvelo_python,
                str(ROOT / "benchmarks" / "_scvelo_worker.py"),
                str(path),
                str(genes_path),
                str(out),
                "2",
            ]
        else:
            continue
        t0 = time.perf_counter()
        peak = run_measured(cmd)
        process_wall = time.perf_counter() - t0
        z = dict(np.load(out, allow_pickle=False))
        outs[tool] = z
        row[f"{tool}_peak_gb"] = round(peak, 2)
        row[f"{tool}_process_s"] = round(process_wall, 1)
        if tool == "explorer":
            row["explorer_fit_s"] = round(float(z["times"][0]), 2)
            row["explorer_timings"] = {k: round(v, 2) for k, v in json.loads(str(z["timings"])).items()}
        else:
            t = z["times"]
            row["scvelo_recover_dynamics_s"] = round(float(t[0]), 2)
            # recover_dynamics + velocity + velocity_graph + latent_time: what one explorer fit does
            row["scvelo_total_s"] = round(float(t.sum()), 2)

    adata = anndata.read_h5ad(path)
    genes = list(outs["explorer"]["genes"])
    gi = adata.var_names.get_indexer(genes)
    Mu = np.asarray(adata.layers["Mu"][:, gi])
    Ms = np.asarray(adata.layers["Ms"][:, gi])
    for tool, z in outs.items():
        fitted = np.isfinite(z["fit_alpha"])
        r2 = fit_r2(z, Mu, Ms)
        row[f"{tool}_n_fitted"] = int(fitted.sum())
        row[f"{tool}_mean_fit_r2"] = round(float(np.nanmean(r2[fitted])), 3)
        row[f"{tool}_mean_likelihood"] = round(float(np.nanmean(z["fit_likelihood"][fitted])), 3)
        if "true_t" in adata.obs:
            row[f"{tool}_latent_time_spearman"] = round(
                float(spearmanr(z["latent_time"], adata.obs["true_t"])[0]), 3
            )
        if "clusters" in adata.obs and "Ductal" in set(adata.obs["clusters"].astype(str)):
            vel = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
            vel[:, gi] = z["velocity"]
            vg = np.zeros(adata.n_vars, dtype=bool)
            vg[gi] = z["velocity_genes"]
            row[f"{tool}_cbdir"] = {k: round(v, 3) for k, v in cbdir(adata, vel, vg).items()}
    if "scvelo" in outs:
        a, b = outs["explorer"], outs["scvelo"]
        both = np.isfinite(a["fit_alpha"]) & np.isfinite(b["fit_alpha"])
        corr = []
        for j in np.flatnonzero(both):
            x, y = a["velocity"][:, j], b["velocity"][:, j]
            ok = np.isfinite(x) & np.isfinite(y)
            if x[ok].std() > 0 and y[ok].std() > 0:
                corr.append(np.corrcoef(x[ok], y[ok])[0, 1])
        corr = np.asarray(corr)
        row["velocity_agreement_share_genes"] = round(float((corr > 0).mean()), 3)
        row["velocity_agreement_median_corr"] = round(float(np.median(corr)), 3)
        row["latent_time_spearman_between"] = round(
            float(spearmanr(a["latent_time"], b["latent_time"])[0]), 3
        )
        ra = a["fit_gamma"][both] / a["fit_beta"][both]
        rb = b["fit_gamma"][both] / b["fit_beta"][both]
        row["ratio_spearman_between"] = round(float(spearmanr(ra, rb)[0]), 3)
        if "scvelo_total_s" in row:
            row["speedup_recover_dynamics"] = round(
                row["scvelo_recover_dynamics_s"] / row["explorer_timings"]["em"], 1
            )
            row["speedup_total"] = round(row["scvelo_total_s"] / row["explorer_fit_s"], 1)
    return row


def _prepare_large(adata) -> None:
    """``prepare`` with an exact kNN search.

    scanpy 1.11.5's approximate search (used above 4,096 cells) hands back a sparse
    array that scipy 1.17 cannot count per row (``csr_array.getnnz``), so the steps are
    run here with ``transformer="sklearn"``.
    """
    import scanpy as sc

    from explorer.data.preprocess import filter_and_normalize
    from explorer.graph.moments import compute_moments

    filter_and_normalize(adata)
    sc.pp.pca(adata, n_comps=30, random_state=0)
    sc.pp.neighbors(adata, n_neighbors=30, use_rep="X_pca", transformer="sklearn", random_state=0)
    compute_moments(adata)


def scaling(tmp: Path, sizes: list[int], n_vars: int, kwargs: dict) -> list[dict]:
    from scipy.stats import spearmanr

    from explorer.data.preprocess import prepare
    from explorer.data.simulate import simulate
    from explorer.keys import Key

    rows = []
    for n in sizes:
        adata = simulate(n_obs=n, n_vars=n_vars, seed=0)
        true_t = adata.obs[Key.obs.TRUE_T].to_numpy()
        if n > 4096:
            _prepare_large(adata)
        else:
            prepare(adata, compute_umap=False)
        path = tmp / f"scaling_{n}.h5ad"
        adata.write_h5ad(path)
        genes_path = tmp / f"scaling_{n}_genes.txt"
        genes_path.write_text("\n".join(adata.var_names))
        del adata
        out = tmp / f"scaling_{n}.npz"
        cmd = _explorer_worker_cmd(path, genes_path, out, kwargs)
        peak = run_measured(cmd)
        z = np.load(out)
        rows.append(
            {
                "n_obs": n,
                "n_vars": n_vars,
                "fit_s": round(float(z["times"][0]), 2),
                "timings": {k: round(v, 2) for k, v in json.loads(str(z["timings"])).items()},
                "peak_gb": round(peak, 2),
                "latent_time_spearman": round(float(spearmanr(z["latent_time"], true_t)[0]), 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--explorer-worker", nargs=4, metavar=("INPUT", "GENES", "OUT", "KWARGS"))
    parser.add_argument("--scvelo-python", default="/tmp/scvenv/bin/python")
    parser.add_argument("--skip-scvelo", action="store_true")
    parser.add_argument("--skip-comparison", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000])
    parser.add_argument("--scaling-genes", type=int, default=300)
    parser.add_argument("--kwargs", default="{}", help="JSON of Dynamical keyword arguments")
    parser.add_argument("--out", default=str(RESULTS / "dynamical.json"))
    args = parser.parse_args()
    if args.explorer_worker:
        explorer_worker(*args.explorer_worker)
        return

    import torch

    kwargs = json.loads(args.kwargs)
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "explorer_kwargs": kwargs,
    }
    with tempfile.TemporaryDirectory(prefix="explorer_bench_") as tmpdir:
        tmp = Path(tmpdir)
        if not args.skip_comparison:
            inputs = _prepare_inputs(tmp)
            scvelo = None if args.skip_scvelo else args.scvelo_python
            result["comparison"] = [compare(name, path, tmp, scvelo, kwargs) for name, path in inputs.items()]
            for row in result["comparison"]:
                print(json.dumps(row), flush=True)
        if args.sizes:
            result["scaling"] = scaling(tmp, args.sizes, args.scaling_genes, kwargs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(result)


def print_table(result: dict) -> None:
    """Markdown tables of the comparison and the scaling runs."""
    rows = result.get("comparison", [])
    if rows:
        print(
            "\n| dataset | tool | fit (s) | total (s) | peak GB | latent-time Spearman "
            "| mean fit R² | mean likelihood |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            for tool in ("explorer", "scvelo"):
                if f"{tool}_mean_fit_r2" not in r:
                    continue
                fit = r["explorer_timings"]["em"] if tool == "explorer" else r["scvelo_recover_dynamics_s"]
                total = r["explorer_fit_s"] if tool == "explorer" else r["scvelo_total_s"]
                lt = r.get(f"{tool}_latent_time_spearman", "-")
                print(
                    f"| {r['dataset']} | {tool} | {fit:.1f} | {total:.1f} | {r[f'{tool}_peak_gb']} | {lt} | "
                    f"{r[f'{tool}_mean_fit_r2']} | {r[f'{tool}_mean_likelihood']} |"
                )
    if result.get("scaling"):
        print("\n| cells | genes | fit (s) | EM (s) | latent time (s) | peak GB | latent-time Spearman |")
        print("|---|---|---|---|---|---|---|")
        for r in result["scaling"]:
            print(
                f"| {r['n_obs']} | {r['n_vars']} | {r['fit_s']} | {r['timings'].get('em', '-')} | "
                f"{r['timings'].get('latent_time', '-')} | {r['peak_gb']} | "
                f"{r.get('latent_time_spearman', '-')} |"
            )


if __name__ == "__main__":
    main()
