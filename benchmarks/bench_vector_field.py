"""Benchmark: the learned vector field's training and integration time, and what it finds on the pancreas.

1. The real pancreas (3,696 cells, ``prepare``'s genes; base model ``stochastic`` or
   ``dynamical``, default parameters): time to fit the base (when needed) and the field
   (wall and CPU), to integrate 200 RK4 steps from every Ngn3 high EP cell, where those
   paths end (group of the nearest observed cell; also for the plain ODE), one cell's
   200-step path as the app draws it, the velocity-matching cosine at the cells, where
   the progenitors' (Ductal, Ngn3 low EP) input velocity leads (``progenitor_flow``), the
   fixed points (type, group, the cells' support), and the fate shift of a knock-out
   (factor 0, held) of Pdx1, Nkx6-1 and Neurog3 in the Ngn3 high EP cells, for those
   among the field's genes: as fate probabilities (``explorer fates`` on the base's
   velocity, computed here) and as the nearest cluster; the same on a second field over
   all genes (``genes="all"``, which holds Nkx6-1).
2. Simulations (``simulate(n_obs, n_vars=100, branches=2)``; the state built directly from
   the true abundances and velocity, ``base=None``, so no preprocessing is timed): time
   per training epoch and of 100 RK4 steps from 1,000 cells, against cells.

Each case runs in a fresh process (peak resident memory ``ru_maxrss``). Prints a table
and writes ``benchmarks/results/vector_field.json``. Usage::

    python benchmarks/bench_vector_field.py [--base dynamical stochastic] [--sizes 10000 100000]
        [--sim-epochs 5] [--skip-pancreas] [--device auto]

The first base's pancreas case (by default the model's default base, ``dynamical``) is
``pancreas`` in the JSON, the others ``pancreas_other_bases``.
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

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EXPLORER_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "results"
PANCREAS = SHARED / "data" / "pancreas_endocrinogenesis_3696.h5ad"
KNOCKOUTS = ("Pdx1", "Nkx6-1", "Neurog3")
START = "Ngn3 high EP"


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class _Clock:
    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = {"wall_s": round(wall - self.wall, 2), "cpu_s": round(cpu - self.cpu, 2)}
        self.wall, self.cpu = wall, cpu
        return out


ENDOCRINE = ("Alpha", "Beta", "Delta", "Epsilon")


def _fixed(adata) -> list[dict]:
    fixed = adata.uns["vector_field"]["fixed_points"]
    n = len(fixed["type"])
    basin = fixed.get("basin", [float("nan")] * n)
    visits = fixed.get("visits", [float("nan")] * n)
    supported = fixed.get("supported", [True] * n)
    return [
        {
            "type": str(t),
            "cluster": str(c),
            "unstable_directions": int((er > 0).sum()),
            "basin": round(float(b), 3),
            "visits": round(float(v), 3),
            "supported": bool(ok),
        }
        for t, c, er, b, v, ok in zip(
            fixed["type"], fixed["cluster"], fixed["eig_real"], basin, visits, supported, strict=True
        )
    ]


def _knockouts(adata, field, cells, genes) -> dict:
    from explorer.models.vector_field import perturb

    out: dict = {}
    for gene in genes:
        if gene not in set(field.genes):
            out[gene] = "not among the field's genes"
            continue
        out[gene] = {}
        for use_fates in (True, False):
            p = perturb(adata, gene, cells=cells, factor=0.0, n_steps=200, field=field, use_fates=use_fates)
            out[gene][p.measure] = {
                str(k): {
                    "control": round(float(r["control"]), 4),
                    "perturbed": round(float(r["perturbed"]), 4),
                }
                for k, r in p.table().iterrows()
                if r["control"] > 0 or r["perturbed"] > 0
            }
    return out


def _progenitor_flow(adata, field, velocity) -> dict:
    """Where the input velocity of the progenitors leads, in the field's state (why a Ductal attractor).

    Per cluster (Ductal, Ngn3 low EP): the cosine of the cells' mean velocity (carried into
    the state exactly) with the way from Ductal's centre to Ngn3 high EP's, and its
    coherence ``|mean v| / mean |v|`` (near 0: noise around zero; near 1: a common drift).
    """
    ms = adata.layers["Ms"][:, field.cols]
    ms = ms.toarray() if hasattr(ms, "toarray") else np.asarray(ms)
    v = (np.nan_to_num(velocity[:, field.cols]) / (1 + ms)) @ field.loadings
    x, clusters = field.states, adata.obs["clusters"].astype(str).to_numpy()
    way = x[clusters == START].mean(0) - x[clusters == "Ductal"].mean(0)
    out = {}
    for name in ("Ductal", "Ngn3 low EP"):
        vc = v[clusters == name]
        mean = vc.mean(0)
        cos = mean @ way / np.linalg.norm(mean) / np.linalg.norm(way)
        out[name] = {
            "cos_mean_velocity_to_ngn3_high": round(float(cos), 3),
            "coherence": round(float(np.linalg.norm(mean) / np.linalg.norm(vc, axis=1).mean()), 3),
        }
    return out


def _ends(paths, steps: int) -> dict[str, float]:
    ends = paths.loc[paths["step"] == steps, "end_cluster"].value_counts(normalize=True)
    return {str(k): round(float(v), 4) for k, v in ends.items()}


def pancreas_worker(base: str, device: str, out: str) -> None:
    from explorer.data.io import read
    from explorer.graph.fates import compute_fates
    from explorer.graph.kernels import compute_velocity_kernel
    from explorer.models import get_model
    from explorer.models.vector_field import VectorField, load_field, simulate_trajectories
    from explorer.pipeline import prepare

    adata = read(PANCREAS)
    clock = _Clock()
    prepare(adata)
    result: dict = {"cells": adata.n_obs, "genes": adata.n_vars, "base": base, "prepare": clock.lap()}
    get_model(base, seed=0).fit(adata).to_adata(adata)
    result["base_fit"] = clock.lap()
    # fate probabilities of the base's velocity (as `explorer fates`), which perturb reports
    compute_velocity_kernel(adata, seed=0)
    fates = compute_fates(adata, cluster_key="clusters")
    result["fates"] = {"terminal_states": list(fates.terminal_states), **clock.lap()}
    input_velocity = adata.layers["velocity"].copy()
    model = VectorField(base=base, seed=0, device=device)
    fit = model.fit(adata)
    result["field_fit"] = clock.lap()
    result["train"] = round(model.timings_["train"], 2)
    result["epochs"] = model.epochs
    result["device"] = str(model.module_.speed.device)
    fit.to_adata(adata)
    result["fixed_points"] = _fixed(adata)
    attractors = [f["cluster"] for f in result["fixed_points"] if f["type"] == "attractor" and f["supported"]]
    result["attractors_endocrine"] = f"{sum(c in ENDOCRINE for c in attractors)}/{len(attractors)}"
    field = load_field(adata, device=device)
    # velocity matching at the cells: cosine of the field with the input velocity in the state
    ms = adata.layers["Ms"][:, field.cols]
    ms = ms.toarray() if hasattr(ms, "toarray") else np.asarray(ms)
    v = (np.nan_to_num(input_velocity[:, field.cols]) / (1 + ms)) @ field.loadings
    f = adata.obsm["vf_velocity"]
    cos = (f * v).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(v, axis=1)
    result["velocity_cosine"] = round(float(np.mean(cos)), 4)
    result["progenitor_flow"] = _progenitor_flow(adata, field, input_velocity)
    cells = (adata.obs["clusters"] == START).to_numpy()
    clock.lap()
    paths = simulate_trajectories(adata, cells, n_steps=200, field=field)
    result["trajectories"] = {"cells": int(cells.sum()), "steps": 200, **clock.lap()}
    result["ends"] = _ends(paths, 200)
    plain = simulate_trajectories(adata, cells, n_steps=200, field=field, on_data=False)
    result["ends_plain_ode"] = _ends(plain, 200)
    # one cell, as the app draws it on a click (the field already loaded)
    one = []
    for cell in np.flatnonzero(cells)[:5]:
        clock.lap()
        simulate_trajectories(adata, [int(cell)], n_steps=200, field=field)
        one.append(clock.lap())
    result["one_cell_200_steps"] = {
        "wall_s": round(float(np.median([o["wall_s"] for o in one])), 3),
        "cpu_s": round(float(np.median([o["cpu_s"] for o in one])), 3),
    }
    result["knockouts"] = _knockouts(adata, field, cells, KNOCKOUTS)
    result["n_field_genes"] = len(field.genes)
    # genes="all": a field over every gene with a velocity, so that Nkx6-1 and Neurog3
    # (not among the stochastic model's velocity genes) can be knocked down
    every = adata.copy()
    VectorField(base=base, seed=0, device=device, genes="all").fit(every).to_adata(every)
    field_all = load_field(every, device=device)
    result["all_genes"] = {
        "n_field_genes": len(field_all.genes),
        "fixed_points": _fixed(every),
        "ends": _ends(simulate_trajectories(every, cells, n_steps=200, field=field_all), 200),
        "knockouts": _knockouts(every, field_all, cells, KNOCKOUTS),
    }
    result["peak_gb"] = round(_rss_gb(), 2)
    Path(out).write_text(json.dumps(result))


def simulation_worker(n_obs: int, epochs: int, device: str, out: str) -> None:
    import anndata as ad
    import pandas as pd

    from explorer.data.simulate import simulate
    from explorer.models.vector_field import VectorField, load_field

    sim = simulate(n_obs=n_obs, n_vars=100, branches=2, seed=0)
    adata = ad.AnnData(
        obs=pd.DataFrame(index=sim.obs_names),
        var=pd.DataFrame(index=sim.var_names),
        layers={"Ms": sim.layers["true_s"], "velocity": sim.layers["true_velocity"]},
    )
    adata.var["velocity_genes"] = True
    loaded = _rss_gb()
    clock = _Clock()
    model = VectorField(base=None, epochs=epochs, seed=0, device=device, basis="none")
    model.fit(adata).to_adata(adata)
    fit = clock.lap()
    field = load_field(adata, device=device)
    starts = np.random.default_rng(0).choice(n_obs, min(1000, n_obs), replace=False)
    clock.lap()
    field.integrate(field.states[starts], n_steps=100)
    result = {
        "cells": n_obs,
        "epochs": epochs,
        "fit": fit,
        "s_per_epoch": round(model.timings_["train"] / epochs, 3),
        "integrate_1000x100": clock.lap(),
        "gb_loaded": round(loaded, 2),
        "peak_gb": round(_rss_gb(), 2),
    }
    Path(out).write_text(json.dumps(result))


def _run(args: list[str], out: Path) -> dict:
    subprocess.run([sys.executable, __file__, *args, "--out", str(out)], check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", choices=["pancreas", "simulation"])
    parser.add_argument("--out")
    parser.add_argument("--base", nargs="+", default=["dynamical", "stochastic"])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--sim-epochs", type=int, default=5)
    parser.add_argument("--n-obs", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-pancreas", action="store_true")
    args = parser.parse_args()
    if args.worker == "pancreas":
        pancreas_worker(args.base[0], args.device, args.out)
        return
    if args.worker == "simulation":
        simulation_worker(args.n_obs, args.sim_epochs, args.device, args.out)
        return

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "vector_field.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    tmp = RESULTS / ".vector_field_case.json"
    result = {"load_average_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    if args.skip_pancreas:
        result["pancreas"] = previous.get("pancreas", {})
        result["pancreas_other_bases"] = previous.get("pancreas_other_bases", {})
    else:
        runs = {
            b: _run(["--worker", "pancreas", "--base", b, "--device", args.device], tmp) for b in args.base
        }
        result["pancreas"] = runs.pop(args.base[0])
        result["pancreas_other_bases"] = runs
    result["simulation"] = [
        _run(
            [
                "--worker",
                "simulation",
                "--n-obs",
                str(n),
                "--sim-epochs",
                str(args.sim_epochs),
                "--device",
                args.device,
            ],
            tmp,
        )  # fmt: skip
        for n in args.sizes
    ]
    result["load_average_at_end"] = os.getloadavg()
    tmp.unlink(missing_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")

    for p in (result["pancreas"], *result["pancreas_other_bases"].values()):
        if not p:
            continue
        print(f"pancreas ({p['cells']} cells, base {p['base']}, {p['epochs']} epochs on {p['device']}):")
        for step in ("prepare", "base_fit", "field_fit", "trajectories"):
            print(f"  {step:14s} wall {p[step]['wall_s']:8.1f} s   cpu {p[step]['cpu_s']:8.1f} s")
        print(f"  velocity cosine at the cells {p['velocity_cosine']}")
        print(f"  one cell, 200 steps: {p['one_cell_200_steps']}")
        print(f"  paths from {START} end in: {p['ends']} (plain ODE: {p['ends_plain_ode']})")
        print(f"  fixed points: {p['fixed_points']}")
        print(f"  attractors supported by the cells in endocrine clusters: {p['attractors_endocrine']}")
        print(f"  progenitors' input velocity toward Ngn3 high EP: {p.get('progenitor_flow')}")
        print(f"  fates: {p.get('fates')}")
        for gene, shift in p["knockouts"].items():
            print(f"  {gene} knock-out: {shift}")
        print(f"  genes='all': {p['all_genes']}")
    print(f"{'cells':>8s} {'s/epoch':>8s} {'fit wall':>9s} {'fit cpu':>8s} {'RK4 wall':>9s} {'peak GB':>8s}")
    for r in result["simulation"]:
        print(
            f"{r['cells']:8d} {r['s_per_epoch']:8.3f} {r['fit']['wall_s']:9.1f} {r['fit']['cpu_s']:8.1f} "
            f"{r['integrate_1000x100']['wall_s']:9.1f} {r['peak_gb']:8.2f}"
        )


if __name__ == "__main__":
    main()
