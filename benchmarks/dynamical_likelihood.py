"""Benchmark: explorer's and scVelo's dynamical fits on the same cells, scored by scVelo's likelihood.

For the bundled sample (``explorer/sample_data/default.h5ad``, already preprocessed: the
dynamical model is fitted on its ``Ms``/``Mu`` as ``explorer fit`` would), the real
pancreas (3,696 cells, ``explorer.pipeline.prepare(seed=0)``) and scVelo's own simulator
(``scvelo_sim_SEED``: 1,000 cells, 300 genes, ``t_max=25``, heterogeneous rates, drawn and
preprocessed by scVelo, ``bench_dynamical.scvelo_simulation``): explorer's dynamical model
(seed 0, its default genes) is fitted and written with scVelo's keys; then, in scVelo's own
virtual environment (``_scvelo_likelihood_worker.py``; never a dependency of explorer),
scVelo's ``recover_dynamics`` fits the same genes on the same ``Ms``/``Mu``, and scVelo's
own likelihood (``DynamicsRecovery(load_pars=True).get_likelihood(refit_time=False)``, the
formula scVelo reports as ``fit_likelihood``, without the ratio penalty: ``load_pars`` sets
the prior ratio to the fit's own) scores each gene's stored parameters and per-gene times
of both fits. ``on``: both tools' final time assignment compares neighbours' distances
(explorer's ``connected_states``, scVelo's ``fit_connected_states``, each on by default, on
the same neighbour graph), and both store their per-gene times averaged over neighbours,
as scVelo does with connected states (its ``fit_t`` is ``conn.dot(T)``; explorer's
``smooth_time=True``; explorer's default stores them unaveraged). ``off``
(``--connected-states off``): neither, the tools' raw per-gene times. Before scVelo was
given the graph it ran without (its default needs one), and before explorer averaged its
times in ``on`` the two sides were scored at different kinds of time: neither was like for
like. A like-for-like check of fit quality with the peer's own function
(``bench_dynamical.py`` reports each tool's own ``fit_likelihood``). Usage::

    python benchmarks/dynamical_likelihood.py [--scvelo-python .venv-compat/bin/python]
        [--datasets sample pancreas_3696 scvelo_sim_1 scvelo_sim_2] [--params '{"max_cells_em": null}']
        [--connected-states on off]
        [--out benchmarks/results/dynamical_likelihood.json]

Prints a table and writes JSON (per data set: the summary and every gene's two values).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EXPLORER_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "results"
#: genes named in the table where a data set has them (the guide's flagship pancreas genes;
#: the sample's gene whose dynamical phase portrait is a loop away from its cells)
NAMED = ("Cpe", "Pcsk2", "Gcg", "Ghrl", "Ins2", "gene_0003")


def _load(name: str, scvelo_python: str, tmp: Path):
    import anndata

    from explorer.data.io import read
    from explorer.pipeline import prepare

    if name == "sample":
        return read(ROOT / "explorer" / "sample_data" / "default.h5ad")
    if name == "pancreas_3696":
        adata = read(SHARED / "data" / "pancreas_endocrinogenesis_3696.h5ad")
        prepare(adata, seed=0)
        return adata
    if name.startswith("scvelo_sim_"):
        from bench_dynamical import scvelo_simulation

        seed = int(name.rsplit("_", 1)[1])
        return anndata.read_h5ad(scvelo_simulation(scvelo_python, tmp, 1000, 300, 25, seed))
    raise SystemExit(f"unknown data set {name!r}; expected 'sample', 'pancreas_3696' or 'scvelo_sim_SEED'")


def compare(name: str, scvelo_python: str, tmp: Path, params: dict, connected: str) -> dict:
    """Fit explorer (``params``) here and scVelo in its environment on ``name``; both scored alike.

    ``connected``: ``"on"`` or ``"off"``, both tools' connected-states time assignment and
    neighbour-averaged stored times.
    """
    from explorer.data.io import write
    from explorer.models import get_model

    adata = _load(name, scvelo_python, tmp)
    start = time.perf_counter()
    on = connected == "on"
    params = {"seed": 0, **params, "connected_states": on, "smooth_time": on}
    get_model("dynamical", **params).fit(adata).to_adata(adata)
    seconds = time.perf_counter() - start
    path, out = tmp / f"{name}_{connected}_explorer.h5ad", tmp / f"{name}_{connected}_likelihood.csv"
    write(adata, path)
    worker = Path(__file__).with_name("_scvelo_likelihood_worker.py")
    command = [scvelo_python, str(worker), str(path), str(out), "2", connected]
    subprocess.run(command, check=True)  # noqa: S603 - scVelo's environment, our worker
    table = pd.read_csv(out, index_col=0)
    both = table[["explorer", "scvelo"]].dropna()
    diff = both["explorer"] - both["scvelo"]
    return {
        "data": name,
        "connected_states": connected,
        "explorer_params": params,
        "n_genes": len(both),
        "explorer_mean": round(float(both["explorer"].mean()), 3),
        "scvelo_mean": round(float(both["scvelo"].mean()), 3),
        "explorer_median": round(float(both["explorer"].median()), 3),
        "scvelo_median": round(float(both["scvelo"].median()), 3),
        # ties within 0.01 counted apart: the two fits of such a gene are the same to the eye
        "explorer_higher": int((diff > 0.01).sum()),
        "level": int((diff.abs() <= 0.01).sum()),
        "scvelo_higher": int((diff < -0.01).sum()),
        "explorer_fit_s": round(seconds, 1),
        "scvelo_fit_s": round(float(table["scvelo_seconds"].iloc[0]), 1),
        "named": {g: [round(float(v), 3) for v in both.loc[g]] for g in NAMED if g in both.index},
        "genes": {g: [round(float(v), 4) for v in row] for g, row in both.iterrows()},
    }


#: what each setting scores: the stored per-gene times, averaged over neighbours or raw
TIMES = {"on": "on, averaged", "off": "off, raw"}


def print_table(rows: list[dict]) -> None:
    print(
        "| data | connected states, times | genes | scVelo's likelihood, mean: explorer / scVelo | median |"
        " genes higher: explorer / level (within 0.01) / scVelo | fit (s): explorer / scVelo |"
        " named genes: explorer / scVelo |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        named = ", ".join(f"{g} {a} / {b}" for g, (a, b) in r["named"].items())
        print(
            f"| {r['data']} | {TIMES[r['connected_states']]} | {r['n_genes']} |"
            f" {r['explorer_mean']} / {r['scvelo_mean']} |"
            f" {r['explorer_median']} / {r['scvelo_median']} |"
            f" {r['explorer_higher']} / {r['level']} / {r['scvelo_higher']} |"
            f" {r['explorer_fit_s']} / {r['scvelo_fit_s']} | {named} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scvelo-python", default=str(ROOT / ".venv-compat" / "bin" / "python"))
    datasets = ["sample", "pancreas_3696", "scvelo_sim_1", "scvelo_sim_2"]
    parser.add_argument("--datasets", nargs="*", default=datasets)
    parser.add_argument("--params", type=json.loads, default={}, help="explorer's model parameters, as JSON")
    parser.add_argument("--connected-states", nargs="*", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--out", type=Path, default=RESULTS / "dynamical_likelihood.json")
    args = parser.parse_args()
    from explorer._process import set_up_process

    set_up_process()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            compare(name, args.scvelo_python, Path(tmp), args.params, connected)
            for name in args.datasets
            for connected in args.connected_states
        ]
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"python": sys.version.split()[0], "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
