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
step to OUTPUT.npz. Peak memory is measured by the parent.
"""

from __future__ import annotations

import sys
import time
import warnings

import anndata
import numpy as np

warnings.filterwarnings("ignore")


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
    times = {}
    t0 = time.perf_counter()
    scv.tl.recover_dynamics(adata, var_names=genes, n_jobs=n_jobs, **options)
    times["recover_dynamics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scv.tl.velocity(adata, mode="dynamical")
    times["velocity"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scv.tl.velocity_graph(adata, n_jobs=n_jobs)
    times["velocity_graph"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scv.tl.latent_time(adata)
    times["latent_time"] = time.perf_counter() - t0
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
        **{c: np.asarray(sub.var[c], dtype=np.float64) for c in cols},
    )


if __name__ == "__main__":
    main()
