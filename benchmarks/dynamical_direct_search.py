"""Benchmark: the dynamical model's EM against its opt-in direct search (``direct_rounds``).

Each configuration fits the same preprocessed data in one process, one after the other:
``em`` (the default: 10 EM iterations), ``em + direct 20`` (the EM, then 20 rounds of
``explorer.models._em.direct_search``) and ``direct 20`` (the search from scVelo's initial
guess, ``max_iter=0``). Scored by one function on every side:

- **scVelo's loss** on the pancreas (3,696 cells, ``explorer.pipeline.prepare(seed=0)``, the
  328 genes both tools fit): the mean scaled projection distance of all cells plus the ratio
  penalty (explorer's initial ratio for every side), each cell projected anew
  (``_em.assign``, ``_em.em_loss``), at each configuration's parameters and at scVelo
  0.3.4's (``../shared/reference/pancreas_3696_scvelo_genes.csv``), with the number of
  genes each side wins by over 1%;
- the mean ``fit_likelihood`` each fit writes, and the fit's wall time (in process);
- on explorer's simulator (``simulate(n_obs=600, n_vars=60, seed)``, the tests' data) and,
  with ``--scvelo-sim FILE`` (a file ``bench_dynamical.scvelo_simulation`` wrote, with
  ``true_*`` columns), on scVelo's: the Spearman correlation of the fitted ``gamma / beta``
  with the truth, of the latent time with the true time, the velocity's sign agreement with
  the true velocity (scVelo's simulator only: its ``true_*`` parameters at the true time;
  explorer's has genes of other kinetics) and, on explorer's, of the share of each clean
  gene's expressing cells put before its switch (as
  ``test_dynamical.py::test_switch_time_recovered_on_clean_genes``).

Usage::

    python benchmarks/dynamical_direct_search.py [--seeds 1 2] [--scvelo-sim FILE]
        [--out benchmarks/results/dynamical_direct_search.json]

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("EXPLORER_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {
    "em": {},
    "em + direct 20": {"direct_rounds": 20},
    "direct 20": {"max_iter": 0, "direct_rounds": 20},
}


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def _params(var: pd.DataFrame):
    from explorer.models import _em

    def col(key: str) -> np.ndarray:
        return np.asarray(var[key], dtype=np.float32)[:, None]

    scaling = col("fit_scaling")
    return _em.Params(
        col("fit_alpha"), col("fit_beta") * scaling, col("fit_gamma"), col("fit_t_"), scaling, 0 * scaling
    )


def _fit(adata, config: dict):
    from explorer.models import get_model

    start = time.perf_counter()
    result = get_model("dynamical", seed=0, **config).fit(adata)
    return result, time.perf_counter() - start


def pancreas() -> dict:
    """scVelo's loss and the likelihood on the pancreas, each configuration and scVelo's reference."""
    from explorer.data.io import read
    from explorer.models import _em
    from explorer.models.dynamical import _SHAPE_FACTORS
    from explorer.pipeline import prepare

    adata = read(SHARED / "data" / "pancreas_endocrinogenesis_3696.h5ad")
    prepare(adata, seed=0)
    reference = pd.read_csv(SHARED / "reference" / "pancreas_3696_scvelo_genes.csv", index_col=0)
    fits = {name: _fit(adata, config) for name, config in CONFIGS.items()}
    params = {name: fit.gene_params for name, (fit, _) in fits.items()}
    genes = [
        g
        for g in adata.var_names
        if g in reference.index
        and np.isfinite(reference.loc[g, "fit_alpha"])
        and all(np.isfinite(p.loc[g, "fit_alpha"]) for p in params.values())
    ]
    j = [adata.var_names.get_loc(g) for g in genes]
    u = np.ascontiguousarray(_dense(adata.layers["Mu"][:, j]).T, dtype=np.float32)
    s = np.ascontiguousarray(_dense(adata.layers["Ms"][:, j]).T, dtype=np.float32)
    data, _ = _em.prepare(u, s)
    moments = _em.moments(data)
    ratio = _em.initialize_shape(data, _em.initialize(data), factors=_SHAPE_FACTORS).ratio

    def loss(var: pd.DataFrame) -> np.ndarray:
        p = _params(var.loc[genes])
        return _em.em_loss(data, moments, p, _em.assign(data, p).dist, ratio)[:, 0]

    scvelo = loss(reference)
    rows = {}
    for name, (fit, seconds) in fits.items():
        mine = loss(params[name])
        lik = fit.gene_params.loc[genes, "fit_likelihood"].to_numpy()
        rows[name] = {
            "genes": len(genes),
            "loss_mean": float(mine.mean()),
            "scvelo_loss_mean": float(scvelo.mean()),
            "explorer_lower": int((mine < 0.99 * scvelo).sum()),
            "scvelo_lower": int((scvelo < 0.99 * mine).sum()),
            "likelihood_mean": float(np.nanmean(lik)),
            "fit_s": round(seconds, 2),
            "order": _cluster_order(adata, fit),
        }
    return rows


def _cluster_order(adata, fit) -> str:
    median = pd.Series(np.asarray(fit.latent_time)).groupby(adata.obs["clusters"].to_numpy()).median()
    return " < ".join(f"{k} {v:.2f}" for k, v in median.sort_values().items())


def truth_scores(adata, fit, *, switch: bool) -> dict:
    """The fit against the simulator's truth (see the module docstring)."""
    from scipy.stats import spearmanr

    from explorer import kinetics
    from explorer.keys import Key

    var, gp = adata.var, fit.gene_params
    ok = np.isfinite(gp["fit_alpha"].to_numpy())
    fitted = (gp["fit_gamma"] / gp["fit_beta"]).to_numpy()[ok]
    true = (var[Key.var.TRUE_GAMMA] / var[Key.var.TRUE_BETA]).to_numpy()[ok]
    t = adata.obs[Key.obs.TRUE_T].to_numpy()
    out = {
        "likelihood_mean": float(np.nanmean(gp["fit_likelihood"].to_numpy())),
        "gamma_beta_spearman": float(spearmanr(fitted, true)[0]),
        "latent_time_spearman": float(spearmanr(fit.latent_time, t)[0]),
    }
    if not switch:  # scVelo's simulator: every gene on/off with its true parameters
        u, s = kinetics.trajectory(
            t[:, None],
            var[Key.var.TRUE_T_].to_numpy()[None],
            var[Key.var.TRUE_ALPHA].to_numpy()[None],
            var[Key.var.TRUE_BETA].to_numpy()[None],
            var[Key.var.TRUE_GAMMA].to_numpy()[None],
        )
        true_v = var[Key.var.TRUE_BETA].to_numpy()[None] * u - var[Key.var.TRUE_GAMMA].to_numpy()[None] * s
        v = np.asarray(fit.velocity)[:, ok]
        out["velocity_sign_agreement"] = float(np.mean(np.sign(v) == np.sign(true_v[:, ok])))
    if switch:
        from tests.models.test_dynamical import _truth

        _, clean = _truth(adata)
        tt = t[:, None]
        expressing = tt > var[Key.var.TRUE_T_ON].to_numpy()
        before = tt < var[Key.var.TRUE_T_].to_numpy()
        fitted_before = fit.layers[Key.layers.FIT_T] < gp[Key.var.FIT_T_].to_numpy()
        n = expressing.sum(0)[clean]
        true_share = (before & expressing).sum(0)[clean] / n
        fitted_share = (fitted_before & expressing).sum(0)[clean] / n
        out["switch_share_spearman"] = float(spearmanr(fitted_share, true_share)[0])
    return out


def simulations(seeds: list[int], scvelo_sim: str | None) -> dict:
    import anndata

    from explorer.data.simulate import simulate
    from explorer.pipeline import prepare

    rows = {}
    for seed in seeds:
        adata = simulate(n_obs=600, n_vars=60, seed=seed)
        prepare(adata, compute_umap=False)
        for name, config in CONFIGS.items():
            fit, seconds = _fit(adata, {"genes": "all", **config})
            scores = truth_scores(adata, fit, switch=True)
            rows[f"explorer sim {seed} | {name}"] = {**scores, "fit_s": round(seconds, 2)}
    if scvelo_sim:
        adata = anndata.read_h5ad(scvelo_sim)
        for name, config in CONFIGS.items():
            fit, seconds = _fit(adata, config)
            scores = truth_scores(adata, fit, switch=False)
            rows[f"scVelo sim | {name}"] = {**scores, "fit_s": round(seconds, 2)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--scvelo-sim", default=None)
    parser.add_argument("--skip-pancreas", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "dynamical_direct_search.json"))
    args = parser.parse_args()
    from explorer._process import set_up_process

    set_up_process()
    out = {"python": sys.version.split()[0]}
    if not args.skip_pancreas:
        out["pancreas"] = pancreas()
        for name, row in out["pancreas"].items():
            print(
                f"pancreas | {name:15s} | loss {row['loss_mean']:.3f} (scVelo {row['scvelo_loss_mean']:.3f}) "
                f"lower {row['explorer_lower']} / scVelo lower {row['scvelo_lower']} | "
                f"likelihood {row['likelihood_mean']:.3f} | {row['fit_s']} s"
            )
    out["simulations"] = simulations(args.seeds, args.scvelo_sim)
    for name, row in out["simulations"].items():
        cells = (f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        print(name, "|", " ".join(cells))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    print("wrote", path)


if __name__ == "__main__":
    main()
