"""Benchmark: what sets VeloVAE's time between lineages that run their genes at different rates.

The simulations: explorer's two-lineage simulation of the tests (600 cells, 60 genes,
``kinds={"two_regimes": 0.3}``, seeds 1-4) with ``lineage_rates=(1, 0.3)``: from the branch on,
lineage B runs every shared gene at 0.3 of lineage A's rate; with
``lineage_rate_range=(0.25, 1)``, a factor per lineage and gene (``velovae_simulations.py``'s
"rates differ", there seeds 1-2 only); and, for comparison, with neither (the tests' own). A
graph pseudotime sees a slower lineage's cells move less and misplaces them; so may any time
read off expression. Each simulation is fitted by the full model and the basic one from seven
starts (``--starts`` chooses), the same seed and split: the default (DPT's initial time), the
steady-state fit's latent time, **the true time** (a diagnostic: ``_TrueStart`` hands the
simulator's time to the fit as its initial time, with the default's weak prior), four capture
times (``obs['capture_time']``, the true time's quarter, an idealised time course, through
``time_key``, whose prior holds each cell within its capture interval) and four overlapping
capture times (the quarters of the true time plus noise of SD 0.1 of its span: Spearman about
0.92 with the true time, as real time courses overlap, which the prior does not expect), and
``n_starts=2`` (a fit from DPT's initial time and one from the steady-state time, pooled by
``ensemble_time``), and, as a diagnostic, two fits from DPT's initial time with training seeds
0 and 1, pooled alike (``_SameStart``; ``--starts "two DPT starts pooled" --models full --out
...`` runs it alone), and the default with ``time_posterior="final"``. Every fit is
scored by the same function
(:func:`velovae_scvelo_sim.score_fit`): Spearman correlation of ``latent_time`` with the
true time, ``lineage_offset`` (lineage B's mean rank error minus A's, as a share of the
cells), the held-out MSE, and how the time SD and ``obs['latent_time_start_spread']`` rank
the cells by their time error. Beside them, each simulation's *oracle* row: the exact time
posterior under the simulator's own curves (:func:`velovae_scvelo_sim.oracle_scores`).

Usage::

    python benchmarks/velovae_lineage_rates.py [--seeds 1 2 3 4] [--starts ...] [--models full basic]
        [--out FILE]

It prints a table and writes ``benchmarks/results/velovae_lineage_rates.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from velovae_scvelo_sim import ORACLE, oracle_scores, score_fit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SIMULATIONS = {
    "lineage_rates (1, 0.3)": {"lineage_rates": (1.0, 0.3)},
    "lineage_rate_range (0.25, 1)": {"lineage_rate_range": (0.25, 1.0)},
    "the tests' two lineages": {},
}
STARTS = {
    "DPT (default)": {},
    "steady-state time": {"initial_time": "steady_state"},
    "true time": {},
    "4 capture times": {"time_key": "capture_time"},
    "4 overlapping capture times": {"time_key": "capture_time_overlapping"},
    "two starts pooled": {"n_starts": 2},
    "two DPT starts pooled": {"n_starts": 2},
    "DPT, time read on the final curves": {"time_posterior": "final"},
    "DPT, the posterior's SD alone": {"time_sd": "posterior"},
}


def _true_start_class() -> type:
    from explorer.models.vae import VeloVAE

    class _TrueStart(VeloVAE):
        """VeloVAE whose initial time is the simulator's true time (a diagnostic, not a model)."""

        def _initial_time(self, adata, data, init, cols):  # noqa: ANN001, ANN202, ARG002
            t = adata.obs["true_t"].to_numpy(dtype=np.float64)
            return (t - t.min()) / (t.max() - t.min()), "true time", float("nan")

    return _TrueStart


def _same_start_class() -> type:
    from explorer.models.vae import VeloVAE

    class _SameStart(VeloVAE):
        """``n_starts`` fits all from ``initial_time`` (DPT), training seeds ``seed + k``, the first split.

        A diagnostic: is it the second initial time or only a second training run that
        makes the pooled intervals cover?
        """

        def _start(self, adata, k, n, progress, earlier, *, time_only=False):  # noqa: ANN001, ANN202, ARG002
            split = self.seed if self.split_seed is None else self.split_seed
            params = {"n_starts": 1, "time_sd": "posterior", "seed": self.seed + k, "split_seed": split}
            member = VeloVAE(**{**self.get_params(), **params})
            return member, member._fit_one(adata, None, time_only=time_only)  # noqa: SLF001

    return _SameStart


#: starts fitted by another class than VeloVAE (diagnostics, not models): its maker
START_CLASSES = {"true time": _true_start_class, "two DPT starts pooled": _same_start_class}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS))
    parser.add_argument("--models", nargs="+", default=["full", "basic"], choices=["full", "basic"])
    parser.add_argument("--out", type=Path, default=RESULTS / "velovae_lineage_rates.json")
    args = parser.parse_args()

    from explorer._process import set_up_process
    from explorer.data.simulate import simulate
    from explorer.pipeline import prepare

    set_up_process()
    keys = (
        "latent_time_spearman", "lineage_offset", "mse_test", "coverage_90",
        "sd_error_spearman", "width_error_spearman", "share_error_spearman", "rank_width_error_spearman",
        "spread_error_spearman", "fit_s",
    )  # fmt: skip
    rows = []
    for (simulation, extra), seed in itertools.product(SIMULATIONS.items(), args.seeds):
        adata = simulate(n_obs=600, n_vars=60, seed=seed, branches=2, kinds={"two_regimes": 0.3}, **extra)
        prepare(adata, n_neighbors=15, compute_umap=False)
        true_t = adata.obs["true_t"].to_numpy()
        adata.obs["capture_time"] = np.digitize(true_t, np.quantile(true_t, [0.25, 0.5, 0.75])).astype(float)
        noisy = true_t + np.random.default_rng(seed).normal(0, 0.1 * np.ptp(true_t), len(true_t))
        edges = np.quantile(noisy, [0.25, 0.5, 0.75])
        adata.obs["capture_time_overlapping"] = np.digitize(noisy, edges).astype(float)
        # what a perfect model's posterior reaches on the same cells (since 2026-12-05)
        row = {"simulation": simulation, "seed": seed, "start": "-", "model": ORACLE, **dict.fromkeys(keys)}
        row.update({k: v for k, v in oracle_scores(adata).items() if k in keys})
        rows.append(row)
        print(" | ".join(str(v) for v in row.values()), flush=True)
        for start in args.starts:
            kwargs = STARTS[start]
            cls = START_CLASSES[start]() if start in START_CLASSES else None
            for variant in args.models:
                scores = score_fit(adata.copy(), {**kwargs, "variant": variant}, model_class=cls)
                row = {"simulation": simulation, "seed": seed, "start": start, "model": variant}
                row.update({k: scores[k] for k in keys})
                rows.append(row)
                print(" | ".join(str(v) for v in row.values()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
