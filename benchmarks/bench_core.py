"""Time the velocity core on the real pancreas, step by step, against scVelo.

Steps: load, filter_and_normalize, moments (PCA + kNN + Ms/Mu), steady-state
('deterministic') and stochastic fits, velocity graph, transition matrix, UMAP and
projection onto it. Each step is timed ``--repeats`` times in this process (the first run
pays numba's JIT unless NUMBA_CACHE_DIR holds a warm cache); the table shows the median and
the first run.

scVelo is measured in the same run when ``--scvelo-python`` names a Python that has
``scvelo`` installed (its own virtual environment, never explorer's): the same steps run
there in a subprocess, ``--repeats`` passes in one process as ours (since 2026-12-04; before, one
cold pass against our warm median), so the ratio compares like with like on this machine: the
medians warm against warm, and the first runs (imports and compilation included) side by
side. Without it the
table compares with the figures in ``../shared/reference/README.md``.

Usage::

    python benchmarks/bench_core.py [--data ../shared/data/pancreas_endocrinogenesis_3696.h5ad]
        [--scvelo-python /tmp/scvenv/bin/python] [--repeats 3] [--out benchmarks/results/core.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pancreas_endocrinogenesis_3696.h5ad"
REFERENCE_README = ROOT.parent / "shared" / "reference" / "README.md"

#: our step -> the row of scVelo's table in the reference README
REFERENCE_ROWS = {
    "filter_and_normalize": "filter_and_normalize",
    "moments": "moments (PCA + kNN + Ms/Mu)",
    "deterministic": "velocity deterministic",
    "stochastic": "velocity stochastic",
    "velocity_graph": "velocity_graph",
    "cellrank_kernel": "CellRank VelocityKernel transition matrix",
    "umap": "UMAP (scanpy)",
}
#: steps that make up the issue's "whole": load + preprocess + moments + both models + graph + projection
WHOLE = ("filter_and_normalize", "moments", "deterministic", "stochastic", "velocity_graph", "embedding")

SCVELO_SCRIPT = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np
import anndata as ad, scanpy as sc, scvelo as scv
# CellRank 2.0.7 calls assert_array_equal(x=, y=), names numpy 2 no longer accepts
_aae = np.testing.assert_array_equal
def _aae_compat(*a, x=None, y=None, **k):
    return _aae(x, y, **k) if x is not None else _aae(*a, **k)
np.testing.assert_array_equal = _aae_compat
import cellrank as cr
path, umap_ok, repeats = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
runs = []
for _ in range(repeats):  # passes in one process, as explorer's: the first pays imports and numba's JIT
    t = {}
    def timed(name, f):
        s = time.perf_counter(); f(); t[name] = time.perf_counter() - s
    a = None
    def load():
        global a
        a = ad.read_h5ad(path)
    timed("load", load)
    def fan():
        scv.pp.filter_and_normalize(a, min_shared_counts=20)
        sc.pp.log1p(a)
        sc.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=2000, subset=True)
    timed("filter_and_normalize", fan)
    timed("moments", lambda: scv.pp.moments(a, n_pcs=30, n_neighbors=30))
    timed("deterministic", lambda: scv.tl.velocity(a, mode="deterministic"))
    timed("stochastic", lambda: scv.tl.velocity(a, mode="stochastic"))
    timed("velocity_graph", lambda: scv.tl.velocity_graph(a))
    timed("transition_matrix", lambda: scv.utils.get_transition_matrix(a))
    timed("cellrank_kernel", lambda: cr.kernels.VelocityKernel(a).compute_transition_matrix())
    if umap_ok:
        timed("umap", lambda: (sc.tl.umap(a, random_state=0)))
    timed("embedding", lambda: scv.tl.velocity_embedding(a, basis="umap"))
    runs.append(t)
print(json.dumps(runs))
"""


def reference_seconds() -> dict[str, float]:
    """scVelo's per-step seconds on pancreas_3696 from the reference README table."""
    out: dict[str, float] = {}
    if not REFERENCE_README.exists():
        return out
    rows = {}
    for line in REFERENCE_README.read_text().splitlines():
        m = re.match(r"\|\s*([^|]+?)\s*\|\s*([\d.]+)\s*\|", line)
        if m:
            rows[m.group(1)] = float(m.group(2))
    for step, row in REFERENCE_ROWS.items():
        if row in rows:
            out[step] = rows[row]
    return out


def run_explorer(path: Path) -> dict[str, float]:
    """One pass of explorer's steps; returns seconds per step."""
    from explorer.data.io import read
    from explorer.data.preprocess import filter_and_normalize
    from explorer.graph.embedding import compute_umap
    from explorer.graph.moments import compute_moments
    from explorer.graph.neighbors import compute_neighbors
    from explorer.graph.projection import compute_velocity_embedding
    from explorer.graph.transition import (
        compute_transition_matrix,
        compute_velocity_graph,
        softmax_scale,
        transition_matrix,
    )
    from explorer.keys import Key
    from explorer.models.steady_state import SteadyState, Stochastic

    t: dict[str, float] = {}
    box = {}

    def timed(name, f):
        s = time.perf_counter()
        f()
        t[name] = time.perf_counter() - s

    timed("load", lambda: box.setdefault("a", read(path)))
    a = box["a"]
    timed("filter_and_normalize", lambda: filter_and_normalize(a, min_shared_counts=20, n_top_genes=2000))
    timed("moments", lambda: (compute_neighbors(a, n_neighbors=30, n_pcs=30), compute_moments(a)))
    timed("deterministic", lambda: SteadyState().fit(a).to_adata(a))
    timed("stochastic", lambda: Stochastic().fit(a).to_adata(a))
    timed("velocity_graph", lambda: compute_velocity_graph(a))
    timed("transition_matrix", lambda: compute_transition_matrix(a))

    def cellrank_kernel():
        # what CellRank's VelocityKernel computes: its neighbourhood, softmax scale, no self-loops
        b = a.copy()
        compute_velocity_graph(b, mode_neighbors="connectivities")
        g, g_neg = b.obsp[Key.obsp.VELOCITY_GRAPH], b.obsp[Key.obsp.VELOCITY_GRAPH_NEG]
        transition_matrix(g, g_neg, scale=softmax_scale(g, g_neg), self_transitions=False)

    timed("cellrank_kernel", cellrank_kernel)
    timed("umap", lambda: compute_umap(a, seed=0))
    timed("embedding", lambda: compute_velocity_embedding(a, basis="umap"))
    return t


def run_scvelo(python: str, path: Path, repeats: int) -> list[dict[str, float]]:
    """The same steps with scVelo, ``repeats`` passes in one process of its own interpreter.

    As explorer's passes are: the first pays imports and numba's compilation (scVelo's and
    CellRank's kernels compile on first call), the median compares warm with warm. Until
    2026-12-04 scVelo ran one cold pass against explorer's warm median.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(SCVELO_SCRIPT)
        script = f.name
    try:
        proc = subprocess.run(
            [python, script, str(path), "1", str(repeats)],
            capture_output=True,
            text=True,
            check=True,
            timeout=3600,
        )
    finally:
        os.unlink(script)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each step's median seconds over the passes."""
    return {step: statistics.median(r[step] for r in runs) for step in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scvelo-python", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "core.json")
    args = parser.parse_args()

    runs = [run_explorer(args.data) for _ in range(args.repeats)]
    steps = list(runs[0])
    ours = _medians(runs)
    first = runs[0]
    their_first: dict[str, float] = {}
    if args.scvelo_python:
        their_runs = run_scvelo(args.scvelo_python, args.data, args.repeats)
        theirs = _medians(their_runs)
        their_first = their_runs[0]
        source = f"scVelo measured in this run ({args.scvelo_python}), median of {args.repeats} in one process"
    else:
        theirs = reference_seconds()
        source = f"scVelo figures from {REFERENCE_README}"

    print(f"explorer core on {args.data.name}; {os.cpu_count()} cores; median of {args.repeats}; vs {source}")
    print(
        f"{'step':22s} {'explorer s':>11s} {'first run':>10s} {'scVelo s':>9s} {'first run':>10s} "
        f"{'speed-up':>9s} {'first runs':>10s}"
    )
    nan = float("nan")
    for s in steps:
        ref, ref_first = theirs.get(s), their_first.get(s)
        ratio = f"{ref / ours[s]:8.1f}x" if ref else "       -"
        ratio_first = f"{ref_first / first[s]:9.1f}x" if ref_first else "        -"
        print(
            f"{s:22s} {ours[s]:11.3f} {first[s]:10.3f} {ref or nan:9.2f} {ref_first or nan:10.2f} "
            f"{ratio} {ratio_first}"
        )

    def whole(times: dict[str, float]) -> float:
        return sum(times.get(s, 0) for s in WHOLE) + times.get("load", 0)

    whole_ours, whole_theirs = whole(ours), whole(theirs)
    print(
        f"{'whole (no UMAP)':22s} {whole_ours:11.3f} {whole(first):10.3f} {whole_theirs:9.2f} "
        f"{whole(their_first) if their_first else nan:10.2f} {whole_theirs / whole_ours:8.1f}x"
        + (f" {whole(their_first) / whole(first):9.1f}x" if their_first else "")
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "data": str(args.data.name),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "repeats": args.repeats,
        "explorer_median_s": ours,
        "explorer_first_s": first,
        "scvelo_s": theirs,
        "scvelo_first_s": their_first,
        "scvelo_source": source,
        "whole_explorer_s": whole_ours,
        "whole_scvelo_s": whole_theirs,
    }
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
