"""Write scVelo's own simulation, preprocessed by scVelo, to .h5ad; executed in scVelo's venv.

Only imports scVelo's stack (never explorer). Usage::

    python _scvelo_simulation.py OUTPUT.h5ad SEED N_OBS N_VARS T_MAX [--compact]

``--compact`` keeps only what a fit needs (float32 ``Ms``/``Mu``, the connectivities,
``obs['true_t']``) and compresses it: the test fixture
``tests/data/scvelo_simulation_500x40.h5ad`` is ``OUTPUT 1 500 40 0 --compact``.

``T_MAX`` of 0 keeps the simulator's own time axis (Poisson event times, about
``0.1 * N_OBS``). Heterogeneous rates, as in scVelo's simulation notebooks (Bergen et
al. 2020, Supplementary Fig. 1): ``alpha, beta, gamma`` drawn per gene from a
multivariate log-normal around scVelo's defaults ``(5, 0.5, 0.3)`` (log-scale
spread 0.4) with correlated splicing and degradation rates, the 1 % most extreme genes
left out, switch times uniform in ``[0.1, 1]`` of the time axis, Gaussian noise (``noise_level=1``). Then
``scv.pp.filter_and_normalize`` and ``scv.pp.moments`` (30 PCs, 30 neighbours), as a
scVelo user would. ``obs['true_t']`` is the simulator's time of every cell.
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import scvelo as scv  # noqa: E402


def simulate(seed: int, n_obs: int, n_vars: int, t_max: float | None):
    rng = np.random.default_rng(seed)
    mu = np.log([5.0, 0.5, 0.3])
    corr = np.array([[1.0, 0.2, 0.2], [0.2, 1.0, 0.8], [0.2, 0.8, 1.0]])
    scale = np.full(3, 0.4)
    cov = corr * np.outer(scale, scale)
    # draw a few extra genes so that n_vars remain after leaving out the extremes
    rates = np.exp(rng.multivariate_normal(mu, cov, size=int(n_vars * 1.1) + 10))
    keep = (rates < np.percentile(rates, 99, axis=0)).all(1)
    alpha, beta, gamma = rates[keep][:n_vars].T
    switches = rng.uniform(0.1, 1.0, size=n_vars)
    adata = scv.datasets.simulation(
        n_obs=n_obs,
        n_vars=n_vars,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        switches=switches,
        t_max=t_max,
        noise_level=1,
        random_seed=seed,
    )
    adata.var_names = [f"g{i}" for i in range(adata.n_vars)]
    adata.obs_names = [f"c{i}" for i in range(adata.n_obs)]
    return adata


def main() -> None:
    out = sys.argv[1]
    seed, n_obs, n_vars = (int(x) for x in sys.argv[2:5])
    t_max = float(sys.argv[5])
    if n_obs == n_vars:
        # scVelo's simulation reads a rate array as per-cell when its length is n_obs
        msg = f"Expected N_OBS != N_VARS (scVelo's simulation misreads the rates), found {n_obs} for both."
        raise SystemExit(msg)
    scv.settings.verbosity = 0
    adata = simulate(seed, n_obs, n_vars, t_max if t_max > 0 else None)
    scv.pp.filter_and_normalize(adata)
    scv.pp.moments(adata, n_pcs=30, n_neighbors=30)
    if "--compact" in sys.argv[6:]:
        import anndata

        layers = {k: np.asarray(adata.layers[k], dtype=np.float32) for k in ("Ms", "Mu")}
        adata = anndata.AnnData(
            X=None,
            obs=adata.obs[["true_t"]].astype(np.float32),
            var=adata.var[["true_t_", "true_alpha", "true_beta", "true_gamma"]],
            layers=layers,
            obsp={"connectivities": adata.obsp["connectivities"].astype(np.float32)},
        )
        adata.write_h5ad(out, compression="gzip")
        return
    adata.write_h5ad(out)


if __name__ == "__main__":
    main()
