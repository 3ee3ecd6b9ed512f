"""Benchmark: explorer's dynamical model against scVelo's ``recover_dynamics``.

Runs, in one go and on the same preprocessed inputs, genes and cores:

1. the real pancreas (3,696 cells; scVelo's velocity genes) and a simulation
   (``simulate(n_obs=3000, n_vars=1000)``): the whole ``explorer fit PRE.h5ad --model
   dynamical`` command (start-up, read, fit, latent time, onsets, velocity graph,
   projection, write), timed as a process (after one untimed run of it, as a user's
   repeated command finds numba's compiled kernels cached; the untimed run's output is
   deleted before the timed run, which so writes a new file rather than replacing one,
   since the peers' timed steps write no file at all), against the compute alone (no start-up, no
   read or write) of scVelo (``scv.tl.recover_dynamics(n_jobs=2)`` then
   ``velocity(mode="dynamical")``, ``velocity_graph``, ``latent_time``) and of
   scvelo-rs (the same calls through its Rust kernels), both in scVelo's own virtual
   environment (``pip install scvelo-modern``, and ``pip install scvelo-rs --no-deps``
   beside it; never dependencies of explorer), each in a fresh process whose peak memory
   (whole process tree) is sampled; every tool is scored by the same functions on what
   it wrote;
2. explorer alone on simulations of 1k, 10k and 100k cells (300 genes) to show how the
   cost grows with the number of cells.

It prints a table and writes ``benchmarks/results/dynamical.json``.

``--latent-sweep`` instead runs only the side-by-side latent time on scVelo's own
simulator (:func:`latent_sweep`: heterogeneous rates, several seeds, cell counts and
``t_max``), scored by one function for both tools, and writes
``benchmarks/results/dynamical_latent_time.json``. Usage::

    python benchmarks/bench_dynamical.py [--scvelo-python .venv-compat/bin/python]
        [--peers scvelo scvelo-rs] [--datasets pancreas_3696 simulation_3000x1000]
        [--sizes 1000 10000 100000] [--scaling-genes 300] [--skip-scvelo]
    python benchmarks/bench_dynamical.py --latent-sweep --scvelo-python PY
        [--sweep-seeds 0 1 2 3 4] [--sweep-settings 1000:25 1000:30 3000:25 3000:30]
        [--sweep-genes 300] [--sweep-cache DIR]

Quality measures, computed here identically for both tools from what they wrote:
latent-time Spearman correlation with the simulator's true time; the tool's own mean
``fit_likelihood`` (scVelo's formula on each tool's parameters and times); the fit R²
of every fitted gene (the curve drawn from the ``fit_*`` parameters at the cells'
``fit_t``) is kept in the JSON but not printed: scVelo's ``fit_t`` is neighbour-smoothed
and explorer's is not, so it compares the smoothing, not the fits; on the pancreas the share of genes whose
velocity correlates positively across cells with the other tool's, and the
cross-boundary direction correctness (CBDir) of the endocrinogenesis transitions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
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

#: the other tools, each run by ``_scvelo_worker.py`` in the scVelo environment on the same
#: file and genes: scVelo 0.3.4 and scvelo-rs (its Rust port, ``pip install scvelo-rs --no-deps``)
PEERS = ("scvelo", "scvelo-rs")


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


#: CPU seconds (user + system, every thread) of the last :func:`run_measured` command and
#: the children it waited for: on a shared machine the CPU a tool spends is the measure
#: that load does not inflate (much); wall-clock ratios need a quiet machine
LAST_CPU_S: list[float] = [float("nan")]


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_measured(cmd: list[str], *, stderr: Path | None = None) -> float:
    """Run ``cmd``; return the peak RSS (GB) of its process tree, sampled every 50 ms.

    ``stderr``: a file that receives the command's standard error (else it goes to ours).
    The command's CPU seconds go to ``LAST_CPU_S[0]``.
    """
    err = stderr.open("w") if stderr is not None else None
    cpu0 = _children_cpu()
    try:
        proc = subprocess.Popen(cmd, stderr=err)
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
        LAST_CPU_S[0] = _children_cpu() - cpu0
    finally:
        if err is not None:
            err.close()
    if rc != 0:
        msg = f"benchmark step failed (exit {rc}): {' '.join(cmd)}"
        raise RuntimeError(msg)
    return peak / 1e9


# ----------------------------------------------------------------------------------- measures


def fit_r2(out: dict, Mu: np.ndarray, Ms: np.ndarray) -> np.ndarray:
    """Per-gene R² of the drawn curve at ``fit_t`` (scVelo's convention), both axes in spread units."""
    from explorer import kinetics

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


def _explorer_command(path: Path, out: Path, kwargs: dict) -> list[str]:
    """The whole ``explorer fit PATH --model dynamical`` command, as a user runs it (logs on stderr)."""
    script = Path(sys.executable).with_name("explorer")
    prefix = [str(script)] if script.exists() else [sys.executable, "-m", "explorer.cli"]
    params = [x for k, v in kwargs.items() for x in ("--param", f"{k}={v}")]
    options = ["--out", str(out), "--force", "--quiet"]
    return [*prefix, "-v", "fit", str(path), "--model", "dynamical", *params, *options]


def _read_command_output(out: Path, genes: list[str], log: str) -> dict:
    """What the command wrote for ``genes``, in the workers' npz layout, and its stage timings."""
    import anndata

    adata = anndata.read_h5ad(out)
    gi = adata.var_names.get_indexer(genes)
    var = adata.var.iloc[gi]
    z = {
        "genes": np.asarray(genes),
        "fitted_genes": np.asarray(adata.var_names[adata.var["fit_alpha"].notna().to_numpy()]),
        "fit_t": np.asarray(adata.layers["fit_t"][:, gi]),
        "velocity": np.asarray(adata.layers["velocity"][:, gi]),
        "velocity_genes": var["velocity_genes"].to_numpy(dtype=bool),
        "latent_time": adata.obs["latent_time"].to_numpy(),
        **{
            c: var[c].to_numpy(dtype=np.float64)
            for c in var.columns
            if c.startswith("fit_") and var[c].dtype != bool
        },
    }
    # "dynamical model timings (s): {...}", logged by Dynamical.fit under -v
    match = re.search(r"dynamical model timings \(s\): (\{.*\})", log)
    timings = json.loads(match.group(1).replace("'", '"')) if match else {}
    # [wall, cpu] per stage: the command's own (start-up, read, fit, write), the pipeline's
    # (preprocess, model fit, graph, to adata) and the model's CPU (em, latent_time, onsets)
    stages = {}
    for what in ("fit command", "pipeline"):
        match = re.search(what + r" stages \(s, \[wall, cpu\]\): (\{.*\})", log)
        if match:
            stages.update(json.loads(match.group(1).replace("'", '"')))
    match = re.search(r"dynamical model CPU \(s\): (\{.*\})", log)
    if match:
        for k, v in json.loads(match.group(1).replace("'", '"')).items():
            stages[f"  {k}"] = [timings.get(k, float("nan")), v]
    timings["stages"] = stages
    return z, timings


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


def _prepare_inputs(tmp: Path, names: list[str]) -> dict[str, Path]:
    """The preprocessed inputs (``explorer.pipeline.prepare``, with the UMAP the command projects on)."""
    import anndata

    from explorer.data.simulate import simulate
    from explorer.models.steady_state import SteadyState
    from explorer.pipeline import prepare

    inputs = {}
    makers = {
        "pancreas_3696": lambda: anndata.read_h5ad(SHARED / "data" / "pancreas_endocrinogenesis_3696.h5ad"),
        "simulation_3000x1000": lambda: simulate(n_obs=3000, n_vars=1000, seed=0),
    }
    for name in names:
        adata = makers[name]()
        # with the UMAP: the command projects the velocity on it, and would otherwise compute it
        prepare(adata)
        path = tmp / f"{name}.h5ad"
        adata.write_h5ad(path)
        genes = SteadyState(use_highly_variable=False).fit(adata).velocity_genes
        (tmp / f"{name}_genes.txt").write_text("\n".join(adata.var_names[genes]))
        inputs[name] = path
    return inputs


def compare(
    name: str,
    path: Path,
    tmp: Path,
    scvelo_python: str | None,
    kwargs: dict,
    peers: tuple[str, ...] = PEERS,
    peer_cache: Path | None = None,
) -> dict:
    """Explorer's whole command and each of ``peers`` on one preprocessed file, scored alike.

    ``peer_cache``: a folder keeping each peer's output and timings; a peer found there is
    not rerun (its row says when it was measured). For a quick rerun of explorer's side
    only; the ratios of record come from a run without it.
    """
    import anndata
    from scipy.stats import spearmanr

    genes_path = tmp / f"{name}_genes.txt"
    genes = [g for g in genes_path.read_text().split("\n") if g]
    row: dict = {"dataset": name}
    outs = {}
    for tool in ("explorer", *peers):
        out = tmp / f"{name}_{tool}.npz"
        if tool == "explorer":
            # the whole command: start-up, read, fit, latent time, graph, projection, write
            h5 = tmp / f"{name}_explorer.h5ad"
            log = tmp / f"{name}_explorer.log"
            # one untimed run first, as a user's command follows earlier ones: numba's
            # kernels are in its on-disk cache (a first run after an install or an edit of
            # a kernel's source compiles them, seconds of CPU) and the command's libraries
            # in the page cache. Its wall and CPU seconds are kept in the row.
            t0 = time.perf_counter()
            run_measured(_explorer_command(path, h5, kwargs), stderr=tmp / f"{name}_explorer_warm_up.log")
            row["explorer_warm_up_command_s"] = round(time.perf_counter() - t0, 2)
            row["explorer_warm_up_command_cpu_s"] = round(LAST_CPU_S[0], 2)
            # the timed run writes a new file, as the peers' timed compute writes none:
            # replacing the warm-up's 150 MB output would add deleting it (35-40 ms on ext4)
            h5.unlink()
            t0 = time.perf_counter()
            peak = run_measured(_explorer_command(path, h5, kwargs), stderr=log)
            process_wall = time.perf_counter() - t0
            z, timings = _read_command_output(h5, genes, log.read_text())
            row["explorer_same_genes"] = bool(set(z.pop("fitted_genes")) == set(genes))
            row["explorer_command_s"] = round(process_wall, 2)
            row["explorer_command_cpu_s"] = round(LAST_CPU_S[0], 2)
            stages = timings.pop("stages")
            row["explorer_timings"] = {k: round(v, 2) for k, v in timings.items()}
            row["explorer_stages_wall_cpu_s"] = stages
        elif scvelo_python:
            cached = peer_cache / f"{name}_{tool}.npz" if peer_cache else None
            if cached is not None and cached.exists():
                # measured by an earlier run (--peer-cache): not side by side, say so
                meta = json.loads(cached.with_suffix(".json").read_text())
                peak, process_wall, LAST_CPU_S[0] = meta["peak_gb"], meta["process_s"], meta["process_cpu_s"]
                z = dict(np.load(cached, allow_pickle=False))
                row[f"{tool}_from_earlier_run"] = meta["when"]
            else:
                cmd = [scvelo_python, str(ROOT / "benchmarks" / "_scvelo_worker.py")]
                cmd += [str(path), str(genes_path), str(out), "2", tool]
                t0 = time.perf_counter()
                peak = run_measured(cmd)
                process_wall = time.perf_counter() - t0
                z = dict(np.load(out, allow_pickle=False))
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(cached, **z)
                    meta = {"peak_gb": peak, "process_s": process_wall, "process_cpu_s": LAST_CPU_S[0]}
                    meta["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                    cached.with_suffix(".json").write_text(json.dumps(meta))
            t = z["times"]
            row[f"{tool}_recover_dynamics_s"] = round(float(t[0]), 2)
            # recover_dynamics + velocity + velocity_graph + latent_time: their compute, no start-up
            row[f"{tool}_total_s"] = round(float(t.sum()), 2)
            row[f"{tool}_steps_s"] = [round(float(x), 2) for x in t]
            if "cpu_times" in z:
                # CPU seconds of the same steps, the worker's process tree (joblib's workers too)
                row[f"{tool}_total_cpu_s"] = round(float(z["cpu_times"].sum()), 2)
                row[f"{tool}_steps_cpu_s"] = [round(float(x), 2) for x in z["cpu_times"]]
            row[f"{tool}_process_cpu_s"] = round(LAST_CPU_S[0], 2)
        else:
            continue
        outs[tool] = z
        row[f"{tool}_peak_gb"] = round(peak, 2)
        row[f"{tool}_process_s"] = round(process_wall, 1)

    adata = anndata.read_h5ad(path)
    gi = adata.var_names.get_indexer(genes)
    Mu = np.asarray(adata.layers["Mu"][:, gi])
    Ms = np.asarray(adata.layers["Ms"][:, gi])
    for tool, z in outs.items():
        fitted = np.isfinite(z["fit_alpha"])
        r2 = fit_r2(z, Mu, Ms)
        row[f"{tool}_n_fitted"] = int(fitted.sum())
        row[f"{tool}_mean_fit_r2"] = round(float(np.nanmean(r2[fitted])), 3)
        # each tool's own fit_likelihood: scvelo-rs's is not scVelo's formula (on the pancreas
        # 2.8x what scVelo's get_likelihood gives for the same parameters), so not a ranking
        row[f"{tool}_mean_likelihood"] = round(float(np.nanmean(z["fit_likelihood"][fitted])), 3)
        if "true_t" in adata.obs:
            row[f"{tool}_latent_time_spearman"] = round(
                float(spearmanr(z["latent_time"], adata.obs["true_t"])[0]), 3
            )
        reference = SHARED / "reference" / f"{name}_scvelo_cells.csv"
        if reference.exists():
            # the accuracy check of issue 12: latent time against scVelo's stored reference
            import pandas as pd

            cells = pd.read_csv(reference, index_col=0)
            lt = pd.Series(z["latent_time"], index=adata.obs_names)[cells.index]
            row[f"{tool}_latent_time_spearman_vs_scvelo_reference"] = round(
                float(spearmanr(lt, cells["latent_time"])[0]), 4
            )
        if "clusters" in adata.obs and "Ductal" in set(adata.obs["clusters"].astype(str)):
            vel = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
            vel[:, gi] = z["velocity"]
            vg = np.zeros(adata.n_vars, dtype=bool)
            vg[gi] = z["velocity_genes"]
            row[f"{tool}_cbdir"] = {k: round(v, 3) for k, v in cbdir(adata, vel, vg).items()}
    for peer in (p for p in peers if p in outs):
        a, b = outs["explorer"], outs[peer]
        key = "" if peer == "scvelo" else f"_{peer.replace('-', '_')}"
        both = np.isfinite(a["fit_alpha"]) & np.isfinite(b["fit_alpha"])
        corr = []
        for j in np.flatnonzero(both):
            x, y = a["velocity"][:, j], b["velocity"][:, j]
            ok = np.isfinite(x) & np.isfinite(y)
            if x[ok].std() > 0 and y[ok].std() > 0:
                corr.append(np.corrcoef(x[ok], y[ok])[0, 1])
        corr = np.asarray(corr)
        row[f"velocity_agreement_share_genes{key}"] = round(float((corr > 0).mean()), 3)
        row[f"velocity_agreement_median_corr{key}"] = round(float(np.median(corr)), 3)
        row[f"latent_time_spearman_between{key}"] = round(
            float(spearmanr(a["latent_time"], b["latent_time"])[0]), 3
        )
        ra = a["fit_gamma"][both] / a["fit_beta"][both]
        rb = b["fit_gamma"][both] / b["fit_beta"][both]
        row[f"ratio_spearman_between{key}"] = round(float(spearmanr(ra, rb)[0]), 3)
        # the measure: the whole explorer command against the peer's compute alone
        row[f"speedup_command_vs_{peer}"] = round(row[f"{peer}_total_s"] / row["explorer_command_s"], 1)
        if f"{peer}_total_cpu_s" in row:
            # the same in CPU seconds: the command's whole process against the peer's compute
            row[f"cpu_ratio_command_vs_{peer}"] = round(
                row[f"{peer}_total_cpu_s"] / row["explorer_command_cpu_s"], 1
            )
        if "em" in row["explorer_timings"]:
            row[f"speedup_fit_vs_{peer}"] = round(
                row[f"{peer}_recover_dynamics_s"] / row["explorer_timings"]["em"], 1
            )
    return row


#: scVelo-simulator settings of the latent-time sweep: (cells, t_max); t_max 0 keeps the
#: simulator's own axis (about 0.1 x cells)
SWEEP_SETTINGS = ((1000, 25), (1000, 30), (3000, 25), (3000, 30))


def latent_time_spearman(latent_time: np.ndarray, true_t: np.ndarray) -> float:
    """The one score of both tools' latent time: Spearman correlation with the true time."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(latent_time), np.asarray(true_t))[0])


def _run(cmd: list[str]) -> None:
    if subprocess.run(cmd, check=False).returncode != 0:
        msg = f"benchmark step failed: {' '.join(cmd)}"
        raise RuntimeError(msg)


def scvelo_simulation(scvelo_python: str, cache: Path, n_obs: int, n_vars: int, t_max: int, seed: int) -> Path:
    """scVelo's own simulation in ``cache`` (``benchmarks/_scvelo_simulation.py`` in scVelo's environment), drawn once."""
    path = cache / f"scvsim_{n_obs}x{n_vars}_tmax{t_max}_seed{seed}.h5ad"
    if not path.exists():
        script = str(ROOT / "benchmarks" / "_scvelo_simulation.py")
        _run([scvelo_python, script, str(path), str(seed), str(n_obs), str(n_vars), str(t_max)])
    return path


def latent_sweep(
    cache: Path,
    scvelo_python: str,
    seeds: list[int],
    settings: list[tuple[int, int]],
    n_vars: int,
    kwargs: dict,
) -> list[dict]:
    """Latent time of explorer and scVelo on scVelo's own simulator, side by side.

    For every setting and seed: scVelo's ``datasets.simulation`` with heterogeneous
    rates, preprocessed by scVelo (``benchmarks/_scvelo_simulation.py``, in scVelo's
    environment); explorer's steady-state velocity genes; scVelo's ``recover_dynamics``,
    ``velocity``, ``velocity_graph`` and ``latent_time`` on those genes (one job) and
    explorer's :class:`Dynamical` on the same file and genes; both scored by
    :func:`latent_time_spearman`. Inputs and scVelo's results are kept in ``cache`` and
    reused (they do not depend on explorer); explorer is always refitted.
    """
    import anndata

    from explorer.models.steady_state import SteadyState

    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for n_obs, t_max in settings:
        for seed in seeds:
            path = scvelo_simulation(scvelo_python, cache, n_obs, n_vars, t_max, seed)
            stem = path.stem
            genes_path = cache / f"{stem}_genes.txt"
            adata = anndata.read_h5ad(path)
            if not genes_path.exists():
                genes = SteadyState(use_highly_variable=False).fit(adata).velocity_genes
                genes_path.write_text("\n".join(adata.var_names[genes]))
            true_t = adata.obs["true_t"].to_numpy()
            scv_out = cache / f"{stem}_scvelo.npz"
            if not scv_out.exists():
                worker = str(ROOT / "benchmarks" / "_scvelo_worker.py")
                _run([scvelo_python, worker, str(path), str(genes_path), str(scv_out), "1"])
            exp_out = cache / f"{stem}_explorer.npz"
            t0 = time.perf_counter()
            _run(_explorer_worker_cmd(path, genes_path, exp_out, kwargs))
            wall = time.perf_counter() - t0
            lt_exp = np.load(exp_out)["latent_time"]
            lt_scv = np.load(scv_out)["latent_time"]
            rows.append(
                {
                    "n_obs": n_obs,
                    "n_vars": n_vars,
                    "t_max": t_max,
                    "seed": seed,
                    "n_genes": len([g for g in genes_path.read_text().split("\n") if g]),
                    "explorer": round(latent_time_spearman(lt_exp, true_t), 4),
                    "scvelo": round(latent_time_spearman(lt_scv, true_t), 4),
                    "explorer_process_s": round(wall, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


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

    from explorer.data.simulate import simulate
    from explorer.keys import Key
    from explorer.pipeline import prepare

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
    parser.add_argument(
        "--scvelo-python",
        default=str(ROOT / ".venv-compat" / "bin" / "python"),
        help="python of the scVelo environment (.ci/setup makes .venv-compat; add scvelo-rs there by hand)",
    )
    parser.add_argument("--skip-scvelo", action="store_true", help="run explorer alone")
    parser.add_argument(
        "--peers",
        nargs="*",
        default=list(PEERS),
        choices=list(PEERS),
        help="the other tools to run in --scvelo-python (scvelo-rs: pip install scvelo-rs --no-deps there)",
    )
    parser.add_argument(
        "--datasets", nargs="*", default=["pancreas_3696", "simulation_3000x1000"], help="comparison inputs"
    )
    parser.add_argument("--skip-comparison", action="store_true")
    parser.add_argument(
        "--peer-cache",
        help="folder keeping the peers' outputs: a peer found there is reused, not rerun (not side by side)",
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000])
    parser.add_argument("--scaling-genes", type=int, default=300)
    parser.add_argument("--kwargs", default="{}", help="JSON of Dynamical keyword arguments")
    parser.add_argument("--out", default=str(RESULTS / "dynamical.json"))
    parser.add_argument(
        "--latent-sweep",
        action="store_true",
        help="only the latent-time sweep on scVelo's simulator (writes dynamical_latent_time.json)",
    )
    parser.add_argument("--sweep-seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--sweep-settings",
        nargs="*",
        default=[f"{n}:{t}" for n, t in SWEEP_SETTINGS],
        help="CELLS:T_MAX pairs (T_MAX 0: the simulator's own axis)",
    )
    parser.add_argument("--sweep-genes", type=int, default=300)
    parser.add_argument(
        "--sweep-cache",
        default=str(Path(tempfile.gettempdir()) / "explorer_bench_latent"),
        help="folder keeping the simulations and scVelo's results between runs",
    )
    args = parser.parse_args()
    if args.explorer_worker:
        explorer_worker(*args.explorer_worker)
        return
    if args.latent_sweep:
        settings = [tuple(int(x) for x in pair.split(":")) for pair in args.sweep_settings]
        rows = latent_sweep(
            Path(args.sweep_cache),
            args.scvelo_python,
            args.sweep_seeds,
            settings,
            args.sweep_genes,
            json.loads(args.kwargs),
        )
        out = RESULTS / "dynamical_latent_time.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        # runs of other settings measured earlier are kept (same keyword arguments only)
        key = ("n_obs", "n_vars", "t_max", "seed")
        kept = []
        if out.exists():
            old = json.loads(out.read_text())
            if old.get("kwargs") == json.loads(args.kwargs):
                new_keys = {tuple(r[k] for k in key) for r in rows}
                kept = [r for r in old["runs"] if tuple(r[k] for k in key) not in new_keys]
        rows = kept + rows
        out.write_text(json.dumps({"kwargs": json.loads(args.kwargs), "runs": rows}, indent=2))
        print_sweep(rows)
        return

    import numba

    kwargs = json.loads(args.kwargs)
    result: dict = {
        # the command's CPU path runs numpy and numba's kernels (torch only on CUDA)
        "machine": {"cpus": os.cpu_count(), "numba_threads": numba.config.NUMBA_NUM_THREADS},
        "explorer_kwargs": kwargs,
    }
    with tempfile.TemporaryDirectory(prefix="explorer_bench_") as tmpdir:
        tmp = Path(tmpdir)
        if not args.skip_comparison:
            inputs = _prepare_inputs(tmp, args.datasets)
            scvelo = None if args.skip_scvelo else args.scvelo_python
            peers = tuple(args.peers)
            cache = Path(args.peer_cache) if args.peer_cache else None
            result["comparison"] = [
                compare(name, path, tmp, scvelo, kwargs, peers, cache) for name, path in inputs.items()
            ]
            for row in result["comparison"]:
                print(json.dumps(row), flush=True)
        if args.sizes:
            result["scaling"] = scaling(tmp, args.sizes, args.scaling_genes, kwargs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(result)


def print_sweep(rows: list[dict]) -> None:
    """Markdown table of the latent-time sweep: mean (min) Spearman per setting."""
    print(
        "\n| cells | genes | t_max | seeds | explorer mean (min) | scVelo mean (min) | explorer >= scVelo |"
    )
    print("|---|---|---|---|---|---|---|")
    keys = sorted({(r["n_obs"], r["n_vars"], r["t_max"]) for r in rows})
    for n_obs, n_vars, t_max in keys:
        sel = [r for r in rows if (r["n_obs"], r["n_vars"], r["t_max"]) == (n_obs, n_vars, t_max)]
        e = np.array([r["explorer"] for r in sel])
        v = np.array([r["scvelo"] for r in sel])
        t_label = t_max if t_max else "own"
        print(
            f"| {n_obs} | {n_vars} | {t_label} | {len(sel)} | {e.mean():.3f} ({e.min():.3f}) | "
            f"{v.mean():.3f} ({v.min():.3f}) | {int((e >= v).sum())} of {len(sel)} |"
        )


def print_table(result: dict) -> None:
    """Markdown tables of the comparison and the scaling runs."""
    rows = result.get("comparison", [])
    if rows:
        print(
            "\n| dataset | tool | fit (s) | whole (s) | whole CPU (s) | peak GB | latent-time Spearman |"
            " mean own fit_likelihood | whole command faster by (wall) | (CPU) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            for tool in ("explorer", *PEERS):
                if f"{tool}_mean_fit_r2" not in r:
                    continue
                if tool == "explorer":
                    fit, total = r["explorer_timings"].get("em", float("nan")), r["explorer_command_s"]
                    cpu, ratio, cpu_ratio = r.get("explorer_command_cpu_s", "-"), "-", "-"
                else:
                    fit, total = r[f"{tool}_recover_dynamics_s"], r[f"{tool}_total_s"]
                    cpu = r.get(f"{tool}_total_cpu_s", "-")
                    ratio = f"{r[f'speedup_command_vs_{tool}']}x"
                    cpu_ratio = r.get(f"cpu_ratio_command_vs_{tool}", "-")
                    cpu_ratio = f"{cpu_ratio}x" if cpu_ratio != "-" else cpu_ratio
                    if f"{tool}_from_earlier_run" in r:
                        ratio += f" (peer from {r[f'{tool}_from_earlier_run']})"
                lt = r.get(f"{tool}_latent_time_spearman", "-")
                ref = r.get(f"{tool}_latent_time_spearman_vs_scvelo_reference")
                if lt == "-" and ref is not None:
                    lt = f"{ref} (with scVelo's reference)"
                print(
                    f"| {r['dataset']} | {tool} | {fit:.1f} | {total:.1f} | {cpu} | {r[f'{tool}_peak_gb']} | "
                    f"{lt} | {r[f'{tool}_mean_likelihood']} | {ratio} | {cpu_ratio} |"
                )
        print("\nexplorer's command, stage by stage ([wall, CPU] s; indented: inside the model fit)")
        for r in rows:
            stages = r.get("explorer_stages_wall_cpu_s", {})
            print(f"- {r['dataset']}: " + "; ".join(f"{k.strip()} {v[0]}/{v[1]}" for k, v in stages.items()))
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
