"""Run scVelo's dynamical model on a preprocessed .h5ad; executed in scVelo's own venv.

Only imports scVelo's stack (never explorer), so it runs in the separate virtual
environment the benchmark creates (``pip install scvelo-modern``, and for the third
column ``pip install scvelo-rs --no-deps`` beside it). Usage::

    python _scvelo_worker.py INPUT.h5ad GENES.txt OUTPUT.npz N_JOBS [scvelo|scvelo-rs]

``scvelo-rs`` runs the same calls through ``scvelo_rs`` (a Rust port of scVelo's
``recover_dynamics``, ``velocity`` and ``velocity_graph``; ``velocity(mode="dynamical")``
and ``latent_time`` pass through to scVelo), with ``t_max=20``: scvelo-rs skips scVelo's
alignment of each gene's time to a total of 20 unless asked, and scVelo does it by default.

Writes the fitted ``fit_*`` columns of the given genes, ``layers['fit_t']`` and
``layers['velocity']`` for them, ``obs['latent_time']`` and the wall seconds of each
step (``times``) and their CPU seconds, this process tree's (``cpu_times``), to
OUTPUT.npz. Peak memory is measured by the parent.
"""

from __future__ import annotations

import os
import resource
import sys
import time
import warnings
from pathlib import Path

import anndata
import numpy as np

warnings.filterwarnings("ignore")


def tree_cpu() -> float:
    """CPU seconds (user + system) of this process, its live descendants and its reaped children.

    joblib's worker processes live between the steps, so each step's CPU is the difference
    of two readings of the whole tree.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + ru.ru_utime + ru.ru_stime


def main() -> None:
    path, genes_path, out_path, n_jobs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tool = sys.argv[5] if len(sys.argv) > 5 else "scvelo"
    options = {}
    if tool == "scvelo-rs":
        import scvelo_rs as scv

        options["t_max"] = 20  # scVelo's default alignment, which scvelo-rs skips unless given
    else:
        import scvelo as scv
    adata = anndata.read_h5ad(path)
    genes = [g for g in open(genes_path).read().split("\n") if g]
    scv.settings.verbosity = 0
    times, cpu = {}, {}
    c0 = tree_cpu()
    t0 = time.perf_counter()
    scv.tl.recover_dynamics(adata, var_names=genes, n_jobs=n_jobs, **options)
    times["recover_dynamics"] = time.perf_counter() - t0
    cpu["recover_dynamics"] = tree_cpu() - c0
    c0, t0 = tree_cpu(), time.perf_counter()
    scv.tl.velocity(adata, mode="dynamical")
    times["velocity"] = time.perf_counter() - t0
    cpu["velocity"] = tree_cpu() - c0
    c0, t0 = tree_cpu(), time.perf_counter()
    scv.tl.velocity_graph(adata, n_jobs=n_jobs)
    times["velocity_graph"] = time.perf_counter() - t0
    cpu["velocity_graph"] = tree_cpu() - c0
    c0, t0 = tree_cpu(), time.perf_counter()
    scv.tl.latent_time(adata)
    times["latent_time"] = time.perf_counter() - t0
    cpu["latent_time"] = tree_cpu() - c0
    sub = adata[:, genes]
    cols = [
        "fit_alpha",
        "fit_beta",
        "fit_gamma",
        "fit_t_",
        "fit_scaling",
        "fit_likelihood",
        "fit_std_u",
        "fit_std_s",
    ]
    np.savez(
        out_path,
        genes=np.asarray(genes),
        velocity_genes=np.asarray(sub.var["velocity_genes"], dtype=bool),
        fit_t=np.asarray(sub.layers["fit_t"], dtype=np.float32),
        velocity=np.asarray(sub.layers["velocity"], dtype=np.float32),
        latent_time=np.asarray(adata.obs["latent_time"], dtype=np.float32),
        times=np.asarray(
            [times[k] for k in ("recover_dynamics", "velocity", "velocity_graph", "latent_time")]
        ),
        cpu_times=np.asarray(
            [cpu[k] for k in ("recover_dynamics", "velocity", "velocity_graph", "latent_time")]
        ),
        **{c: np.asarray(sub.var[c], dtype=np.float64) for c in cols},
    )


if __name__ == "__main__":
    main()
