"""Benchmark: VeloVAE's latent time on scVelo's own simulator, full against basic model.

Data we did not design: ``scv.datasets.simulation`` with heterogeneous rates, drawn and
preprocessed by scVelo in its own virtual environment (``benchmarks/_scvelo_simulation.py``,
``--scvelo-python``; never a dependency of explorer). ``t_max`` 0 keeps the simulator's
own time axis (about ``0.1 x`` cells), where most genes finish repression long before the
last cells; 25 compresses it. Each setting is fitted by explorer's default VeloVAE (the
full model), by its basic variant (no cell state) and by the default with
``time_posterior="final"``, with the same seed, and all are
scored by the same functions: Spearman correlation of ``latent_time`` with the true time,
the cells misplaced by more than half the ranking (``|rank error| > 0.5``), the held-out
MSE (:func:`explorer.models.metrics.reconstruction_error`, through ``metrics_``) and the
coverage of nominal 90 % intervals (:func:`explorer.models.vae.time_calibration`), and
how the time SD (on the model's clock) and each interval's width mapped onto the true axis
rank the cells by their time error. Beside them, each draw's *oracle* row: the exact time
posterior under the simulator's own rates and switch times, scored by the same function
(what a perfect model reaches there).

Usage::

    python benchmarks/velovae_scvelo_sim.py --scvelo-python .venv-compat/bin/python
        [--settings 600:60:0 1000:100:0 600:60:25] [--seeds 1 2 3 4 5] [--variants ...] [--out FILE]

It prints a table and writes ``benchmarks/results/velovae_scvelo_sim.json`` (or ``--out``).
The simulations are cached in ``--cache`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from bench_dynamical import scvelo_simulation

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = {
    "full (default)": {},
    "basic": {"variant": "basic"},
    "full, time read on the final curves": {"time_posterior": "final"},
    "full, the posterior's SD alone": {"time_sd": "posterior"},
}
#: the row of the exact posterior under the simulator's own curves (:func:`oracle_scores`)
ORACLE = "oracle (the simulator's own curves)"


def score_fit(adata, kwargs: dict, model_class: type | None = None) -> dict:
    """Fit VeloVAE (seed 0, CPU, ``kwargs``) on ``adata`` and score it against ``obs['true_t']``.

    ``lineage_offset`` (with lineages A and B in ``obs['true_lineage']``, else ``None``): the
    mean rank error (share of the cells) of lineage B's cells minus lineage A's, negative
    where B is placed earlier than it is. ``spread_error_spearman``: Spearman correlation of
    ``obs['latent_time_start_spread']`` with each cell's absolute rank error (``None`` where
    the fit has no spread); ``sd_error_spearman`` is the SD's (on the model's clock) and
    ``width_error_spearman`` its interval's width on the true axis, each against the error
    through the monotone map of :func:`~explorer.models.vae.time_calibration`;
    ``share_error_spearman`` the interval's width in cells against the rank error, and
    ``rank_width_error_spearman`` the fit's ``obs['latent_time_rank_width']`` (that width
    with the start spread) against it. ``model_class`` replaces :class:`VeloVAE`.
    """
    from scipy.stats import rankdata, spearmanr

    from explorer.keys import Key
    from explorer.models.vae import VeloVAE, time_calibration

    true_t = adata.obs["true_t"].to_numpy()
    lineage = adata.obs["true_lineage"].astype(str).to_numpy() if "true_lineage" in adata.obs else None
    model = (model_class or VeloVAE)(seed=0, device="cpu", **kwargs)
    clock = time.perf_counter()
    result = model.fit(adata)
    seconds = time.perf_counter() - clock
    t = np.asarray(result.latent_time)
    rank_error = (rankdata(t) - rankdata(true_t)) / len(t)
    # the SD on latent_time's own scale ([0, 1]); model.time_posterior_ is on the model's clock
    # (until 2026-12-04 its SD was read against latent_time here, intervals ~20x too wide)
    cal = time_calibration(true_t, t, result.obs[Key.obs.LATENT_TIME_STD].to_numpy())
    spread = None
    if result.obs is not None and Key.obs.LATENT_TIME_START_SPREAD in result.obs:
        values = result.obs[Key.obs.LATENT_TIME_START_SPREAD].to_numpy()
        spread = round(float(spearmanr(values, np.abs(rank_error))[0]), 2)
    rank_width = result.obs[Key.obs.LATENT_TIME_RANK_WIDTH].to_numpy()
    offset = None
    if lineage is not None and {"A", "B"} <= set(lineage):
        offset = round(float(rank_error[lineage == "B"].mean() - rank_error[lineage == "A"].mean()), 3)
    return {
        "latent_time_spearman": round(float(spearmanr(t, true_t)[0]), 4),
        "encoder_time_spearman": round(float(spearmanr(model.time_posterior_["t_mean_encoder"], true_t)[0]), 4),
        "misplaced_cells": int((np.abs(rank_error) > 0.5).sum()),
        "lineage_offset": offset,
        "mse_test": round(float(model.metrics_["mse_test"]), 3),
        "coverage_90": round(float(cal["coverage"]), 2),
        "sd_error_spearman": round(float(cal["sd_error_spearman"]), 2),
        "width_error_spearman": round(float(cal["width_error_spearman"]), 2),
        "share_error_spearman": round(float(cal["share_error_spearman"]), 2),
        "rank_width_error_spearman": round(float(spearmanr(rank_width, np.abs(rank_error))[0]), 2),
        "spread_error_spearman": spread,
        "stage1_epochs": len(model.history_["stage1"]),
        "initial_time": model.initial_time_["used"],
        "fit_s": round(seconds, 1),
    }


def oracle_scores(adata) -> dict:
    """The exact time posterior under the simulator's own curves, scored as :func:`score_fit` scores a fit.

    :func:`~explorer.models.vae.oracle_time_posterior` (a perfect model: the true rates and
    switch times, per-gene noise from the residuals at the true times, tempered as the
    model tempers), through the same :func:`~explorer.models.vae.time_calibration`;
    ``sd_error_spearman_true_clock``: its SD against its error on the true clock, where
    both already are (no map).
    """
    from scipy.stats import spearmanr

    from explorer.models.vae import oracle_time_posterior, time_calibration

    true_t = adata.obs["true_t"].to_numpy()
    oracle = oracle_time_posterior(adata)
    cal = time_calibration(true_t, oracle["t_mean"], oracle["t_sd"])
    error = np.abs(oracle["t_mean"] - true_t)
    return {
        "latent_time_spearman": round(float(spearmanr(oracle["t_mean"], true_t)[0]), 4),
        "coverage_90": round(float(cal["coverage"]), 2),
        "sd_error_spearman": round(float(cal["sd_error_spearman"]), 2),
        "width_error_spearman": round(float(cal["width_error_spearman"]), 2),
        "share_error_spearman": round(float(cal["share_error_spearman"]), 2),
        # no second start: its rank width is its interval in cells
        "rank_width_error_spearman": round(float(cal["share_error_spearman"]), 2),
        "sd_error_spearman_true_clock": round(float(spearmanr(oracle["t_sd"], error)[0]), 2),
    }


def run(parser: argparse.ArgumentParser, rows_of: Callable[[argparse.Namespace, Path], Iterator[dict]]) -> None:
    """Parse the shared options, then print each row ``rows_of(args, cache)`` yields and write them as JSON."""
    parser.add_argument("--scvelo-python", required=True, help="python of a virtual environment with scVelo")
    parser.add_argument("--cache", type=Path, default=None, help="where scVelo's simulations are kept")
    args = parser.parse_args()

    from explorer._process import set_up_process

    set_up_process()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        cache = args.cache or Path(tmp_name)
        cache.mkdir(parents=True, exist_ok=True)
        for row in rows_of(args, cache):
            rows.append(row)
            print(" | ".join(str(v) for v in row.values()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=1))
    print(f"wrote {args.out}")


def _rows(args: argparse.Namespace, cache: Path) -> Iterator[dict]:
    import anndata as ad

    keys = (
        "latent_time_spearman", "encoder_time_spearman", "misplaced_cells", "mse_test", "coverage_90",
        "sd_error_spearman", "width_error_spearman", "share_error_spearman", "rank_width_error_spearman",
        "spread_error_spearman",
    )  # fmt: skip
    for setting in args.settings:
        n_obs, n_vars, t_max = (int(x) for x in setting.split(":"))
        seeds = args.seeds if n_obs <= 600 and t_max == 0 else args.seeds[: args.max_seeds_large]
        for seed in seeds:
            path = scvelo_simulation(args.scvelo_python, cache, n_obs, n_vars, t_max, seed)
            for label in args.variants:
                scores = score_fit(ad.read_h5ad(path), VARIANTS[label])
                row = {"cells": n_obs, "genes": n_vars, "t_max": t_max or "own", "seed": seed, "model": label}
                row.update({k: scores[k] for k in keys})
                row.update({k: scores[k] for k in ("stage1_epochs", "initial_time", "fit_s")})
                yield row
            # what a perfect model's posterior reaches on the same cells (since 2026-12-05)
            row = {"cells": n_obs, "genes": n_vars, "t_max": t_max or "own", "seed": seed, "model": ORACLE}
            row.update(dict.fromkeys(keys))
            row.update(oracle_scores(ad.read_h5ad(path)))
            yield row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["600:60:0", "1000:100:0", "600:60:25"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--max-seeds-large", type=int, default=2, help="seeds run for settings over 600 cells")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "velovae_scvelo_sim.json")
    run(parser, _rows)


if __name__ == "__main__":
    main()
