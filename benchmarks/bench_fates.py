"""Time explorer's fates against CellRank 2.0.7 on the same velocity fit, and compare the results.

Both run on one input file (the pancreas after ``explorer fit``, stochastic model, made
here if ``--fitted`` is not given) with the same recipe: ``0.8 * VelocityKernel(mode) +
0.2 * ConnectivityKernel``, GPCCA with ``--n-states`` macrostates named by ``clusters``,
terminal states by stability >= 0.96, one initial state, fate probabilities, absorption
times and lineage drivers. CellRank runs once in its own environment (``--cellrank-python``,
default ``.venv-compat/bin/python``) in a subprocess; without PETSc/SLEPc it computes the
Schur vectors with the dense ``brandts`` method, as any plain ``pip install cellrank`` does.

The tables list each step's wall and CPU seconds (process and children; CPU ratios
move less when the machine is shared) and the speed-ups, and the agreement: the
transition matrices' largest difference, the macrostate and terminal-state names, the
correlation of the fate probabilities per terminal state and the largest difference of
the macrostate memberships (states matched by name). Explorer's pancreas side runs in this
process after an untimed warm-up on a 60-cell matrix (numba's compiled code and pygpcca
loaded); CellRank's side imports CellRank and computes its kernels once, untimed, before
its clock starts (its numba kernels compile on first call; since 2026-12-04: before, the
pancreas kernel's time held their compilation). The JSON goes to
``benchmarks/results/fates.json``.

Then the same at scale (``--simulated``, default 100,000 cells; 0 skips it): the
simulator's two lineages (50 genes), preprocessed and fitted (stochastic model) here, the
deterministic kernel with 0.2 connectivities, then fate probabilities, absorption times
and drivers towards given terminal cells (each lineage's latest 2% by true time; explorer
solves ``I - Q`` iteratively at that size: GMRES with an ILU(0) preconditioner in flow
order), explorer and CellRank each in its own process: wall and CPU seconds per step
(explorer's fate step also split into solver set-up, fates and times), peak memory of
each. ``--threads 1`` limits both processes' thread pools alike. CellRank 2.0.7 refuses its own fate
probabilities at 100k cells (GMRES round-off leaves negative values); its solution is then
kept as its solver returned it, clipped at 0 and renormalised, so that the rest is timed,
and the refusal is reported. GPCCA is left out there on both sides: CellRank without
PETSc/SLEPc computes a dense Schur form, 80 GB at 100k cells.

Usage::

    python benchmarks/bench_fates.py [--fitted fitted.h5ad] [--mode deterministic] [--n-states 10]
        [--simulated 100000] [--simulated-input sim.h5ad] [--kernel-only] [--skip-pancreas]
        [--cellrank-python .venv-compat/bin/python] [--threads 1] [--out benchmarks/results/fates.json]
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pancreas_endocrinogenesis_3696.h5ad"
DEFAULT_COMPAT = ROOT / ".venv-compat" / "bin" / "python"

#: CellRank 2.0.7 calls assert_array_equal(x=..., y=...), names numpy 2 no longer accepts
NUMPY2_SHIM = r'''
_aae = np.testing.assert_array_equal
def _aae_compat(*a, x=None, y=None, **k):
    return _aae(x, y, **k) if x is not None else _aae(*a, **k)
np.testing.assert_array_equal = _aae_compat
'''

#: CPU seconds of the process and its children (joblib workers: finished ones from getrusage,
#: live ones from psutil where installed), for runs under load
CPU_CLOCK = r'''
try:
    import psutil
except ImportError:
    psutil = None
def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    live = 0.0
    for p in psutil.Process().children(recursive=True) if psutil else ():
        try:
            live += sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime + live
'''

_CLOCK: dict = {"resource": resource}
exec(CPU_CLOCK, _CLOCK)  # noqa: S102 - the same clock in this process as in the tools' scripts
#: CPU seconds of this process and its children (explorer's pancreas side runs here)
cpu = _CLOCK["cpu"]

#: both CellRank scripts start so: imports, the shim, CellRank
CELLRANK_PREAMBLE = r'''
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, anndata as ad, scipy.sparse as sp
''' + NUMPY2_SHIM + r'''import cellrank as cr
''' + CPU_CLOCK

#: CellRank's velocity kernel mixed 0.8/0.2 with its connectivity kernel, timed; needs
#: ``path`` and ``mode``, leaves ``a``, ``k``, ``T`` and ``times``
CELLRANK_KERNEL = r'''
a = ad.read_h5ad(path)
times, cpu_times = {}, {}
t, c = time.perf_counter(), cpu()
vk = cr.kernels.VelocityKernel(a).compute_transition_matrix(model=mode, show_progress_bar=False)
ck = cr.kernels.ConnectivityKernel(a).compute_transition_matrix()
k = 0.8 * vk + 0.2 * ck
T = sp.csr_matrix(k.transition_matrix)
times["kernel"], cpu_times["kernel"] = time.perf_counter() - t, cpu() - c
'''

#: CellRank's kernels once, untimed, on the whole file: its numba kernels are compiled on first
#: call in every process (no on-disk cache), as explorer's compiled code is loaded by
#: ``_warm_up`` before its clock starts (about 6 s of the pancreas kernel's 11 s before
#: 2026-12-04, when only explorer was warmed up; a warm-up on a 300-cell subset hung in
#: CellRank, so the whole file); needs ``path`` and ``mode``
CELLRANK_WARM_UP = r'''
w = ad.read_h5ad(path)
cr.kernels.VelocityKernel(w).compute_transition_matrix(model=mode, show_progress_bar=False)
cr.kernels.ConnectivityKernel(w).compute_transition_matrix()
del w
'''

#: CellRank's side: argv = input .h5ad, output .npz, kernel mode, n_states[, stability threshold];
#: prints one JSON line
CELLRANK_SCRIPT = CELLRANK_PREAMBLE + r'''
path, out, mode, n_states = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
threshold = float(sys.argv[5]) if len(sys.argv) > 5 else 0.96
''' + CELLRANK_WARM_UP + CELLRANK_KERNEL + r'''# explorer's terminal states where the file has them (CellRank's GPCCA below overwrites the column)
file_states = a.obs["term_states_fwd"].copy() if "term_states_fwd" in a.obs else None
t, c = time.perf_counter(), cpu()
g = cr.estimators.GPCCA(k)
g.compute_schur(n_components=n_states + 1)
g.compute_macrostates(n_states=n_states, cluster_key="clusters")
times["macrostates"], cpu_times["macrostates"] = time.perf_counter() - t, cpu() - c
t, c = time.perf_counter(), cpu()
g.predict_terminal_states(stability_threshold=threshold)
# CellRank's rule can pick a terminal state as the initial one (then it refuses the overlap)
g.predict_initial_states(allow_overlap=True)
g.compute_fate_probabilities()
times["fate_probabilities"], cpu_times["fate_probabilities"] = time.perf_counter() - t, cpu() - c
t, c = time.perf_counter(), cpu()
g.compute_absorption_times()
times["absorption_times"], cpu_times["absorption_times"] = time.perf_counter() - t, cpu() - c
t, c = time.perf_counter(), cpu()
g.compute_lineage_drivers()
times["drivers"], cpu_times["drivers"] = time.perf_counter() - t, cpu() - c
fp = g.fate_probabilities
memb = g.macrostates_memberships
# untimed: where the file holds explorer's terminal states, CellRank's fate probabilities
# absorbing in those cells (what explorer's solve should give exactly)
extra = {}
if file_states is not None and file_states.notna().any():
    g_ours = cr.estimators.GPCCA(k)
    g_ours.set_terminal_states(file_states)
    g_ours.compute_fate_probabilities()
    extra = {"fates_on_file_states": np.asarray(g_ours.fate_probabilities.X),
             "file_state_names": np.asarray([str(n) for n in g_ours.fate_probabilities.names])}
np.savez(out, T_data=T.data, T_indices=T.indices, T_indptr=T.indptr, fate_probabilities=np.asarray(fp.X),
         terminal=np.asarray(g.terminal_states.astype(str).values, dtype=object).astype(str),
         memberships=np.asarray(memb.X), membership_names=np.asarray([str(n) for n in memb.names]), **extra)
print(json.dumps({
    "times": times,
    "cpu_s": cpu_times,
    "macrostates": [str(c) for c in g.macrostates.cat.categories],
    "stability": {str(c): float(v) for c, v in zip(g.coarse_T.columns, np.diag(g.coarse_T))},
    "terminal_states": [str(c) for c in g.terminal_states.cat.categories],
    "initial_states": [] if g.initial_states is None else [str(c) for c in g.initial_states.cat.categories],
    "lineage_names": [str(n) for n in fp.names],
}))
'''


def run_cellrank(
    python: str, path: Path, *, mode: str, n_states: int, workdir: Path, stability_threshold: float = 0.96
) -> tuple[dict, dict]:
    """CellRank's recipe in ``python``; returns its JSON summary and its arrays."""
    out = workdir / "cellrank.npz"
    proc = subprocess.run(
        [python, "-c", CELLRANK_SCRIPT, str(path), str(out), mode, str(n_states), str(stability_threshold)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        msg = f"CellRank failed:\n{proc.stderr[-3000:]}"
        raise RuntimeError(msg)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    arrays = dict(np.load(out, allow_pickle=False))
    return summary, arrays


def _warm_up(F) -> None:
    """GPCCA and the absorption once on a 60-cell chain of three blocks, untimed: loads numba's
    compiled code (compiles it, on the first run after an install or an edit of the module,
    a one-off that would otherwise land in the first timed step) and pygpcca, as CellRank's
    side imports CellRank before its clock starts."""
    rng = np.random.default_rng(0)
    T = np.kron(np.eye(3), rng.uniform(0.5, 1.0, (20, 20))) + 1e-3
    T /= T.sum(axis=1, keepdims=True)
    macro = F.macrostates(T, 3, n_cells=5)
    cells, _, _ = F.state_cells(macro, macro.names[:2], n_cells=5)
    F.absorption_times(T, np.asarray(cells.codes, dtype=np.int64))


def run_explorer(
    path: Path, *, mode: str, n_states: int, stability_threshold: float = 0.96
) -> tuple[dict, object]:
    """Explorer's recipe, step by step; returns the seconds per step and the AnnData."""
    import anndata as ad

    from explorer.graph import fates as F
    from explorer.graph.kernels import compute_velocity_kernel
    from explorer.keys import Key

    adata = ad.read_h5ad(path)
    _warm_up(F)
    times, cpu_times = {}, {}
    t, c = time.perf_counter(), cpu()
    T = compute_velocity_kernel(adata, mode=mode, connectivity_weight=0.2)
    times["kernel"], cpu_times["kernel"] = time.perf_counter() - t, cpu() - c
    t, c = time.perf_counter(), cpu()
    macro = F.macrostates(
        T, n_states, clusters=adata.obs["clusters"], cluster_colors=adata.uns.get("clusters_colors")
    )
    times["macrostates"], cpu_times["macrostates"] = time.perf_counter() - t, cpu() - c
    t, c = time.perf_counter(), cpu()
    term = F.terminal_state_names(macro, stability_threshold=stability_threshold)
    cells, _, _ = F.state_cells(macro, term)
    codes = np.asarray(cells.codes, dtype=np.int64)
    fp = F.absorption_probabilities(T, codes)
    times["fate_probabilities"], cpu_times["fate_probabilities"] = time.perf_counter() - t, cpu() - c
    t, c = time.perf_counter(), cpu()
    F.absorption_times(T, codes)
    times["absorption_times"], cpu_times["absorption_times"] = time.perf_counter() - t, cpu() - c
    t, c = time.perf_counter(), cpu()
    F.lineage_drivers(adata.X, fp, names=term, gene_names=adata.var_names)
    times["drivers"], cpu_times["drivers"] = time.perf_counter() - t, cpu() - c
    summary = {
        "times": times,
        "cpu_s": cpu_times,
        "memberships": macro.memberships,
        "macrostates": list(macro.names),
        "stability": {k: float(v) for k, v in macro.stability().items()},
        "terminal_states": term,
        "initial_states": F.initial_state_names(macro),
        "lineage_names": term,
        "fate_probabilities": fp,
        "T": T,
        "terminal_cells": np.asarray(cells.astype(str)),
        "n_obs": adata.n_obs,
        "key": Key.obsp.TRANSITIONS,
    }
    return summary, adata


# ---------------------------------------------------------------- simulated cells (100k)
#: CellRank's side on the simulation: kernel, then fates to the given terminal cells
#: (obs ``bench_terminal``); argv = input .h5ad, output .npz, kernel mode; prints one JSON line
CELLRANK_SIM_SCRIPT = CELLRANK_PREAMBLE + r'''
path, out, mode, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
''' + CELLRANK_KERNEL + r'''if steps == "kernel":
    np.savez(out, T_data=T.data, T_indices=T.indices, T_indptr=T.indptr, fate_probabilities=np.zeros((0, 0)))
    print(json.dumps({"times": times, "cpu_s": cpu_times, "lineage_names": [],
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
    sys.exit(0)
g = cr.estimators.GPCCA(k)
g.set_terminal_states(a.obs["bench_terminal"])
# CellRank's solution is kept as it leaves its solver: its own check refuses any value < 0,
# which GMRES round-off (-1e-33) gives at 100k cells; then the rest is timed on that solution
# clipped at 0 and renormalised (explorer's rule), and the refusal is reported
import cellrank.estimators.mixins._fate_probabilities as fpm
raw, solve = {}, fpm._solve_lin_system
def keep(*args, **kwargs):
    raw["x"] = solve(*args, **kwargs)
    return raw["x"]
fpm._solve_lin_system = keep
refused = None
t, c = time.perf_counter(), cpu()
try:
    g.compute_fate_probabilities(show_progress_bar=False)
except ValueError as err:
    refused = str(err)
    d = g._rec_trans_states(None, ctx="fate_probs")
    x = np.zeros((a.n_obs, len(d.term_states.cat.categories)))
    x[d.trans_indices] = np.clip(raw["x"], 0, None)
    for j, name in enumerate(d.term_states.cat.categories):
        x[np.flatnonzero(d.term_states == name), j] = 1.0
    x /= x.sum(axis=1, keepdims=True)
    g._write_fate_probabilities(
        cr.Lineage(x, names=list(d.term_states.cat.categories), colors=d.term_states_colors), params={}
    )
times["fate_probabilities"], cpu_times["fate_probabilities"] = time.perf_counter() - t, cpu() - c
t, c = time.perf_counter(), cpu()
g.compute_absorption_times(show_progress_bar=False)
times["absorption_times"], cpu_times["absorption_times"] = time.perf_counter() - t, cpu() - c
t, c = time.perf_counter(), cpu()
g.compute_lineage_drivers()
times["drivers"], cpu_times["drivers"] = time.perf_counter() - t, cpu() - c
fp = g.fate_probabilities
np.savez(out, T_data=T.data, T_indices=T.indices, T_indptr=T.indptr, fate_probabilities=np.asarray(fp.X))
print(json.dumps({
    "times": times,
    "cpu_s": cpu_times,
    "refused": refused,
    "negatives": int((raw["x"] < 0).sum()) if "x" in raw else 0,
    "lineage_names": [str(n) for n in fp.names],
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
}))
'''

#: explorer's side on the simulation, in its own process too (its peak memory alone)
EXPLORER_SIM_SCRIPT = r'''
import json, resource, sys, time
import numpy as np, anndata as ad
from explorer.graph import fates as F
from explorer.graph.kernels import compute_velocity_kernel
''' + CPU_CLOCK + r'''
path, out, mode, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
FATES = "fate_probabilities+absorption_times"
a = ad.read_h5ad(path)
terminal = a.obs["bench_terminal"]
names = [str(c) for c in terminal.cat.categories]
codes = np.asarray(terminal.cat.codes, dtype=np.int64)
times, cpu_times = {}, {}
t, c = time.perf_counter(), cpu()
T = compute_velocity_kernel(a, mode=mode, connectivity_weight=0.2)
times["kernel"], cpu_times["kernel"] = time.perf_counter() - t, cpu() - c
if steps == "kernel":
    np.savez(out, T_data=T.data, T_indices=T.indices, T_indptr=T.indptr, fate_probabilities=np.zeros((0, 0)))
    print(json.dumps({"times": times, "cpu_s": cpu_times, "lineage_names": [],
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
    sys.exit(0)
# as `explorer fates` does (F._absorption): one factorisation (or preconditioner) of I - Q
# for both, here step by step so that each part is timed
detail, detail_cpu = {}, {}
t, c = time.perf_counter(), cpu()
A, S, trans, n_states = F._absorbing_split(T, codes)
lin = F._LinearSolver(A, solver="auto", tol=F.ITERATIVE_RTOL)
detail["setup"], detail_cpu["setup"] = time.perf_counter() - t, cpu() - c
t1, c1 = time.perf_counter(), cpu()
B = np.clip(lin.solve(S), 0.0, None)
detail["fate_probabilities"], detail_cpu["fate_probabilities"] = time.perf_counter() - t1, cpu() - c1
t1, c1 = time.perf_counter(), cpu()
H = lin.solve(B)
detail["absorption_times"], detail_cpu["absorption_times"] = time.perf_counter() - t1, cpu() - c1
fp = np.zeros((a.n_obs, n_states))
fp[trans] = B
fp[codes >= 0, codes[codes >= 0]] = 1.0
fp /= fp.sum(axis=1, keepdims=True)
solver = lin.description
times[FATES], cpu_times[FATES] = time.perf_counter() - t, cpu() - c
t, c = time.perf_counter(), cpu()
F.lineage_drivers(a.X, fp, names=names, gene_names=a.var_names)
times["drivers"], cpu_times["drivers"] = time.perf_counter() - t, cpu() - c
np.savez(out, T_data=T.data, T_indices=T.indices, T_indptr=T.indptr, fate_probabilities=fp)
print(json.dumps({
    "times": times,
    "cpu_s": cpu_times,
    "solver": solver,
    "fates_detail_s": detail,
    "fates_detail_cpu_s": detail_cpu,
    "lineage_names": names,
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
}))
'''


#: explorer computes both from one factorisation; CellRank's two steps are summed
FATES = "fate_probabilities+absorption_times"


def fit_simulation(n_obs: int, out: Path, *, n_vars: int = 50, terminal_share: float = 0.02) -> Path:
    """Simulate ``n_obs`` cells on two lineages, preprocess, fit the stochastic model; write ``out``.

    ``obs['bench_terminal']`` marks the terminal cells both tools absorb into: per lineage,
    its ``terminal_share`` latest cells by the simulator's true time.
    """
    import pandas as pd

    from explorer.data.io import write
    from explorer.data.simulate import simulate
    from explorer.models import get_model
    from explorer.pipeline import prepare

    adata = simulate(n_obs=n_obs, n_vars=n_vars, branches=2, seed=0)
    prepare(adata, compute_umap=False, seed=0)
    get_model("stochastic", seed=0).fit(adata).to_adata(adata)
    lineage = adata.obs["true_lineage"].astype(str).to_numpy()
    t = adata.obs["true_t"].to_numpy()
    terminal = np.full(adata.n_obs, None, dtype=object)
    for name in sorted(set(lineage) - {"root"}):
        cells = np.flatnonzero(lineage == name)
        late = cells[np.argsort(t[cells])[-max(1, int(terminal_share * cells.size)) :]]
        terminal[late] = name
    adata.obs["bench_terminal"] = pd.Categorical(terminal)
    return write(adata, out)


def _run_json(argv: list[str]) -> dict:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = f"{argv[0]} failed:\n{proc.stderr[-3000:]}"
        raise RuntimeError(msg)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_simulated(
    n_obs: int, *, mode: str, cellrank_python: str, workdir: Path, fates: bool = True,
    path: Path | None = None,
) -> dict:
    """Kernel (and with ``fates`` the fates) on ``n_obs`` simulated cells, each tool in its own process.

    The GPCCA step is left out on both sides: CellRank without PETSc/SLEPc computes a dense
    Schur form (``n_obs^2`` doubles, 80 GB at 100k cells). Both absorb into the same
    terminal cells (:func:`fit_simulation`; ``path``: a file it wrote before). Wall and
    CPU seconds (process and children) per step, and each process's peak memory.
    """
    from scipy import sparse

    path = path or fit_simulation(n_obs, workdir / f"sim_{n_obs}.h5ad")
    steps = "all" if fates else "kernel"
    ours = _run_json(
        [sys.executable, "-c", EXPLORER_SIM_SCRIPT, str(path), str(workdir / "ours.npz"), mode, steps]
    )
    theirs = _run_json(
        [cellrank_python, "-c", CELLRANK_SIM_SCRIPT, str(path), str(workdir / "theirs.npz"), mode, steps]
    )
    for clock in ("times", "cpu_s"):
        if "fate_probabilities" in theirs[clock]:
            both = theirs[clock].pop("fate_probabilities") + theirs[clock].pop("absorption_times")
            theirs[clock] = {"kernel": theirs[clock]["kernel"], FATES: both, **theirs[clock]}
    a, b = np.load(workdir / "ours.npz"), np.load(workdir / "theirs.npz")
    shape = (n_obs, n_obs)
    Ta = sparse.csr_matrix((a["T_data"], a["T_indices"], a["T_indptr"]), shape=shape)
    Tb = sparse.csr_matrix((b["T_data"], b["T_indices"], b["T_indptr"]), shape=shape)
    corr = {}
    for j, name in enumerate(theirs["lineage_names"]):
        if name in ours["lineage_names"]:
            k = ours["lineage_names"].index(name)
            corr[name] = float(np.corrcoef(a["fate_probabilities"][:, k], b["fate_probabilities"][:, j])[0, 1])
    total_a, total_b = sum(ours["times"].values()), sum(theirs["times"].values())
    cpu_a, cpu_b = sum(ours["cpu_s"].values()), sum(theirs["cpu_s"].values())
    return {
        "n_obs": n_obs,
        "mode": mode,
        "explorer_s": ours["times"],
        "cellrank_s": theirs["times"],
        "explorer_cpu_s": ours["cpu_s"],
        "cellrank_cpu_s": theirs["cpu_s"],
        "explorer_total_s": total_a,
        "cellrank_total_s": total_b,
        "speedup": total_b / total_a,
        "speedup_cpu": cpu_b / cpu_a,
        "explorer_solver": ours.get("solver"),
        "explorer_fates_detail_s": ours.get("fates_detail_s"),
        "explorer_fates_detail_cpu_s": ours.get("fates_detail_cpu_s"),
        "threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "cellrank_refused": theirs.get("refused"),
        "cellrank_negative_values": theirs.get("negatives", 0),
        "explorer_peak_rss_gb": ours["peak_rss_gb"],
        "cellrank_peak_rss_gb": theirs["peak_rss_gb"],
        "T_max_abs_diff": float(abs(Ta - Tb).max()),
        "fate_probability_correlation": corr,
    }


def print_table(ours: dict, theirs: dict) -> None:
    print(f"{'step':36s} {'explorer s':>11s} {'CellRank s':>11s} {'speed-up':>9s}")
    for step in ours:
        a, b = ours[step], theirs.get(step, float("nan"))
        print(f"{step:36s} {a:11.2f} {b:11.2f} {b / a:8.1f}x")
    ta, tb = sum(ours.values()), sum(theirs.values())
    print(f"{'total':36s} {ta:11.2f} {tb:11.2f} {tb / ta:8.1f}x")


def fit_pancreas(data: Path, out: Path) -> Path:
    from explorer.data.io import read, write
    from explorer.pipeline import run_velocity

    adata = read(data)
    run_velocity(adata, model="stochastic")
    return write(adata, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--fitted", type=Path, default=None, help="an `explorer fit` output (else made here)")
    parser.add_argument(
        "--mode", default="deterministic", choices=["deterministic", "stochastic", "monte_carlo"]
    )
    parser.add_argument("--n-states", type=int, default=10)
    parser.add_argument("--stability-threshold", type=float, default=0.96)
    parser.add_argument("--cellrank-python", default=str(DEFAULT_COMPAT))
    parser.add_argument(
        "--simulated", type=int, default=100_000, help="cells of the simulated comparison (0: skip it)"
    )
    parser.add_argument(
        "--kernel-only", action="store_true", help="on the simulation, only the kernels (no fates)"
    )
    parser.add_argument(
        "--simulated-input", type=Path, default=None,
        help="a simulation this script wrote before (keeps its cells; skips simulating and fitting)",
    )
    parser.add_argument("--skip-pancreas", action="store_true", help="only the simulation")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="thread pools (BLAS, OpenMP, numba) of both tools' processes limited to this many",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fates.json")
    args = parser.parse_args()
    if args.threads is not None:
        # inherited by both tools' subprocesses (and by this one's own libraries, loaded later)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # with --skip-pancreas the pancreas results already in --out are kept
        result = json.loads(args.out.read_text()) if args.skip_pancreas and args.out.exists() else {}
        if not args.skip_pancreas:
            result = compare_pancreas(args, work)
        # the deterministic kernel at scale: CellRank's stochastic mode is a jax Hessian per cell
        simulated = (
            run_simulated(
                args.simulated, mode="deterministic", cellrank_python=args.cellrank_python, workdir=work,
                fates=not args.kernel_only, path=args.simulated_input,
            )
            if args.simulated
            else None
        )
    # a run with --threads keeps the default run's figures beside its own
    result["simulated" if args.threads is None else f"simulated_threads_{args.threads}"] = simulated
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if simulated is not None:
        print(f"\nsimulation, {simulated['n_obs']:,} cells, deterministic kernel (+ fates to given terminal cells)")
        print("wall seconds:")
        print_table(simulated["explorer_s"], simulated["cellrank_s"])
        print("CPU seconds (process and children):")
        print_table(simulated["explorer_cpu_s"], simulated["cellrank_cpu_s"])
        detail = simulated["explorer_fates_detail_cpu_s"] or {}
        print("explorer's fate step, CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in detail.items()))
        print(f"T max |diff|: {simulated['T_max_abs_diff']:.2e}")
        print(f"fate probability correlation: {simulated['fate_probability_correlation']}")
        if simulated["cellrank_refused"]:
            print(f"CellRank refused its own fate probabilities: {simulated['cellrank_refused']}")
        print(
            f"peak memory: explorer {simulated['explorer_peak_rss_gb']:.2f} GB, "
            f"CellRank {simulated['cellrank_peak_rss_gb']:.2f} GB"
        )
    print(f"-> {args.out}")
    sys.stdout.flush()


def compare_pancreas(args: argparse.Namespace, work: Path) -> dict:
    """The pancreas side by side (GPCCA included); prints its table, returns its JSON part."""
    from scipy import sparse

    fitted = args.fitted or fit_pancreas(args.data, work / "fitted.h5ad")
    ours, _ = run_explorer(
        fitted, mode=args.mode, n_states=args.n_states, stability_threshold=args.stability_threshold
    )
    theirs, arrays = run_cellrank(
        args.cellrank_python, fitted, mode=args.mode, n_states=args.n_states, workdir=work,
        stability_threshold=args.stability_threshold,
    )
    T_theirs = sparse.csr_matrix(
        (arrays["T_data"], arrays["T_indices"], arrays["T_indptr"]), shape=(ours["n_obs"], ours["n_obs"])
    )
    T_diff = float(abs(ours["T"] - T_theirs).max())
    fate_corr = {}
    for j, name in enumerate(theirs["lineage_names"]):
        if name in ours["lineage_names"]:
            k = ours["lineage_names"].index(name)
            ours_k, theirs_j = ours["fate_probabilities"][:, k], arrays["fate_probabilities"][:, j]
            fate_corr[name] = float(np.corrcoef(ours_k, theirs_j)[0, 1])
    # GPCCA's memberships, macrostates matched by name (both name them after the clusters)
    theirs_names = [str(n) for n in arrays["membership_names"]]
    shared = [n for n in ours["macrostates"] if n in theirs_names]
    memb_diff = float(max(
        np.abs(ours["memberships"][:, ours["macrostates"].index(n)]
               - arrays["memberships"][:, theirs_names.index(n)]).max()
        for n in shared
    )) if shared else float("nan")
    steps = list(ours["times"])
    ours_total = sum(ours["times"].values())
    theirs_total = sum(theirs["times"].values())
    print(f"pancreas, {ours['n_obs']:,} cells, {args.mode} kernel")
    print("wall seconds:")
    print_table({k: ours["times"][k] for k in steps}, theirs["times"])
    print("CPU seconds (process and children):")
    print_table({k: ours["cpu_s"][k] for k in steps}, theirs["cpu_s"])
    print(f"T max |diff|: {T_diff:.2e}")
    print(f"terminal states: explorer {ours['terminal_states']}, CellRank {theirs['terminal_states']}")
    print(f"fate probability correlation: {fate_corr}")
    print(f"macrostate memberships max |diff| ({len(shared)} states matched by name): {memb_diff:.2e}")
    return {
        "data": str(args.data.name),
        "n_obs": ours["n_obs"],
        "mode": args.mode,
        "n_states": args.n_states,
        "stability_threshold": args.stability_threshold,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs while measured",
        "explorer_s": ours["times"],
        "cellrank_s": theirs["times"],
        "explorer_total_s": ours_total,
        "cellrank_total_s": theirs_total,
        "speedup": theirs_total / ours_total,
        "explorer_cpu_s": ours["cpu_s"],
        "cellrank_cpu_s": theirs["cpu_s"],
        "speedup_cpu": sum(theirs["cpu_s"].values()) / sum(ours["cpu_s"].values()),
        "T_max_abs_diff": T_diff,
        "explorer_macrostates": ours["macrostates"],
        "cellrank_macrostates": theirs["macrostates"],
        "explorer_stability": ours["stability"],
        "cellrank_stability": theirs["stability"],
        "explorer_terminal_states": ours["terminal_states"],
        "cellrank_terminal_states": theirs["terminal_states"],
        "explorer_initial_states": ours["initial_states"],
        "cellrank_initial_states": theirs["initial_states"],
        "fate_probability_correlation": fate_corr,
        "memberships_max_abs_diff": memb_diff,
        "terminal_cells_agree": float(np.mean(ours["terminal_cells"] == arrays["terminal"])),
    }


if __name__ == "__main__":
    main()
