"""Time explorer's fates against CellRank 2.0.7 on the same velocity fit, and compare the results.

Both run on one input file (the pancreas after ``explorer fit``, stochastic model, made
here if ``--fitted`` is not given) with the same recipe: ``0.8 * VelocityKernel(mode) +
0.2 * ConnectivityKernel``, GPCCA with ``--n-states`` macrostates named by ``clusters``,
terminal states by stability >= 0.96, one initial state, fate probabilities, absorption
times and lineage drivers. CellRank runs once in its own environment (``--cellrank-python``,
default ``.venv-compat/bin/python``) in a subprocess; without PETSc/SLEPc it computes the
Schur vectors with the dense ``brandts`` method, as any plain ``pip install cellrank`` does.

The table lists each step's seconds and the speed-up, and the agreement: the transition
matrices' largest difference, the macrostate and terminal-state names, and the
correlation of the fate probabilities per terminal state. The JSON goes to
``benchmarks/results/fates.json``.

Usage::

    python benchmarks/bench_fates.py [--fitted fitted.h5ad] [--mode deterministic] [--n-states 10]
        [--cellrank-python .venv-compat/bin/python] [--out benchmarks/results/fates.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pancreas_endocrinogenesis_3696.h5ad"
DEFAULT_COMPAT = ROOT / ".venv-compat" / "bin" / "python"

#: CellRank's side: argv = input .h5ad, output .npz, kernel mode, n_states[, stability threshold];
#: prints one JSON line
CELLRANK_SCRIPT = r'''
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, anndata as ad, scipy.sparse as sp
# CellRank 2.0.7 calls assert_array_equal(x=..., y=...), names numpy 2 no longer accepts
_aae = np.testing.assert_array_equal
def _aae_compat(*a, x=None, y=None, **k):
    return _aae(x, y, **k) if x is not None else _aae(*a, **k)
np.testing.assert_array_equal = _aae_compat
import cellrank as cr
path, out, mode, n_states = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
threshold = float(sys.argv[5]) if len(sys.argv) > 5 else 0.96
a = ad.read_h5ad(path)
times = {}
t = time.perf_counter()
vk = cr.kernels.VelocityKernel(a).compute_transition_matrix(model=mode, show_progress_bar=False)
ck = cr.kernels.ConnectivityKernel(a).compute_transition_matrix()
k = 0.8 * vk + 0.2 * ck
T = sp.csr_matrix(k.transition_matrix)
times["kernel"] = time.perf_counter() - t
t = time.perf_counter()
g = cr.estimators.GPCCA(k)
g.compute_schur(n_components=n_states + 1)
g.compute_macrostates(n_states=n_states, cluster_key="clusters")
times["macrostates"] = time.perf_counter() - t
t = time.perf_counter()
g.predict_terminal_states(stability_threshold=threshold)
# CellRank's rule can pick a terminal state as the initial one (then it refuses the overlap)
g.predict_initial_states(allow_overlap=True)
g.compute_fate_probabilities()
times["fate_probabilities"] = time.perf_counter() - t
t = time.perf_counter()
g.compute_absorption_times()
times["absorption_times"] = time.perf_counter() - t
t = time.perf_counter()
g.compute_lineage_drivers()
times["drivers"] = time.perf_counter() - t
fp = g.fate_probabilities
np.savez(out, T_data=T.data, T_indices=T.indices, T_indptr=T.indptr, fate_probabilities=np.asarray(fp.X),
         terminal=np.asarray(g.terminal_states.astype(str).values, dtype=object).astype(str))
print(json.dumps({
    "times": times,
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


def run_explorer(
    path: Path, *, mode: str, n_states: int, stability_threshold: float = 0.96
) -> tuple[dict, object]:
    """Explorer's recipe, step by step; returns the seconds per step and the AnnData."""
    import anndata as ad

    from explorer.graph import fates as F
    from explorer.graph.kernels import compute_velocity_kernel
    from explorer.keys import Key

    adata = ad.read_h5ad(path)
    times = {}
    t = time.perf_counter()
    T = compute_velocity_kernel(adata, mode=mode, connectivity_weight=0.2)
    times["kernel"] = time.perf_counter() - t
    t = time.perf_counter()
    macro = F.macrostates(
        T, n_states, clusters=adata.obs["clusters"], cluster_colors=adata.uns.get("clusters_colors")
    )
    times["macrostates"] = time.perf_counter() - t
    t = time.perf_counter()
    term = F.terminal_state_names(macro, stability_threshold=stability_threshold)
    cells, _, _ = F.state_cells(macro, term)
    codes = np.asarray(cells.codes, dtype=np.int64)
    fp = F.absorption_probabilities(T, codes)
    times["fate_probabilities"] = time.perf_counter() - t
    t = time.perf_counter()
    F.absorption_times(T, codes)
    times["absorption_times"] = time.perf_counter() - t
    t = time.perf_counter()
    F.lineage_drivers(adata.X, fp, names=term, gene_names=adata.var_names)
    times["drivers"] = time.perf_counter() - t
    summary = {
        "times": times,
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
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fates.json")
    args = parser.parse_args()

    from scipy import sparse

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
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
    steps = list(ours["times"])
    ours_total = sum(ours["times"].values())
    theirs_total = sum(theirs["times"].values())
    result = {
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
        "terminal_cells_agree": float(np.mean(ours["terminal_cells"] == arrays["terminal"])),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'step':22s} {'explorer s':>11s} {'CellRank s':>11s} {'speed-up':>9s}")
    for step in steps:
        a, b = ours["times"][step], theirs["times"].get(step, float("nan"))
        print(f"{step:22s} {a:11.2f} {b:11.2f} {b / a:8.1f}x")
    print(f"{'total':22s} {ours_total:11.2f} {theirs_total:11.2f} {theirs_total / ours_total:8.1f}x")
    print(f"T max |diff|: {T_diff:.2e}")
    print(f"terminal states: explorer {ours['terminal_states']}, CellRank {theirs['terminal_states']}")
    print(f"fate probability correlation: {fate_corr}")
    print(f"-> {args.out}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
