"""Fit scVelo's dynamical model beside explorer's fit and score both with scVelo's own likelihood.

Executed in scVelo's own virtual environment (never imports explorer). Usage::

    python _scvelo_likelihood_worker.py EXPLORER_FIT.h5ad OUT.csv N_JOBS [on|off]

EXPLORER_FIT.h5ad is explorer's dynamical fit written with scVelo's keys (``Ms``, ``Mu``,
``fit_*`` columns, ``layers['fit_t']``). scVelo's ``recover_dynamics`` runs on the same
``Ms``/``Mu``, neighbour graph and genes explorer fitted; then, for each gene and each tool,
``DynamicsRecovery(load_pars=True).get_likelihood(refit_time=False)``: scVelo's likelihood
of the stored parameters at the stored per-gene times, the function scVelo reports as
``fit_likelihood``, applied to both fits alike. ``on`` (default) / ``off``: scVelo's
``fit_connected_states`` (its final time assignment compares neighbours' distances, and
it stores ``fit_t`` averaged over neighbours), to match explorer's ``connected_states`` and
``smooth_time``. OUT.csv: one row per gene, columns
``explorer``, ``scvelo``, and ``scvelo_seconds`` (the fit's wall time, repeated).
"""

from __future__ import annotations

import sys
import time
import warnings

import anndata
import numpy as np
import pandas as pd

warnings.filterwarnings("ignore")


def _dense(matrix) -> np.ndarray:
    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, dtype=np.float32)


def likelihoods(adata: anndata.AnnData, genes: list[str]) -> pd.Series:
    """ScVelo's likelihood of each gene's stored fit (``fit_*`` columns, ``layers['fit_t']``)."""
    from scvelo.tools._em_model import DynamicsRecovery

    out = {}
    for gene in genes:
        found = DynamicsRecovery(adata, gene, use_raw=False, load_pars=True)
        out[gene] = float(found.get_likelihood(refit_time=False))
    return pd.Series(out)


def main() -> None:
    import scvelo as scv

    path, out_path, n_jobs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    connected = (sys.argv[4] if len(sys.argv) > 4 else "on") == "on"
    ours = anndata.read_h5ad(path)
    fitted = np.isfinite(ours.var["fit_alpha"].to_numpy(dtype=float))
    genes = list(ours.var_names[fitted])
    keep = ["Ms", "Mu"]
    theirs = anndata.AnnData(
        X=np.zeros((ours.n_obs, ours.n_vars), dtype=np.float32), obs=pd.DataFrame(index=ours.obs_names)
    )
    theirs.var_names = ours.var_names
    for key in keep:
        theirs.layers[key] = _dense(ours.layers[key])
    # the same neighbour graph: scVelo's final time assignment compares connected cells'
    # distances (fit_connected_states, on by default), as explorer's does; without a graph it
    # silently would not
    for key in ("connectivities", "distances"):
        theirs.obsp[key] = ours.obsp[key]
    theirs.uns["neighbors"] = dict(ours.uns["neighbors"])
    start = time.perf_counter()
    scv.tl.recover_dynamics(
        theirs, var_names=genes, use_raw=False, n_jobs=n_jobs, show_progress_bar=False,
        fit_connected_states=connected,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    # explorer's fit on the same cells: its parameters and per-gene times, no latent time (load_pars
    # would read obs['latent_time'] in place of each gene's fit_t)
    scored = anndata.AnnData(X=theirs.X, obs=pd.DataFrame(index=ours.obs_names), var=ours.var.copy())
    for key in keep:
        scored.layers[key] = theirs.layers[key]
    scored.layers["fit_t"] = _dense(ours.layers["fit_t"])
    table = pd.DataFrame({"explorer": likelihoods(scored, genes), "scvelo": likelihoods(theirs, genes)})
    table["scvelo_seconds"] = seconds
    table.to_csv(out_path)


if __name__ == "__main__":
    main()
