"""Benchmark: VeloVAE's time, error and intervals on six 600-cell simulations, per setting.

The simulations: explorer's two-lineage simulation of the tests (``simulate(n_obs=600,
n_vars=60, branches=2, kinds={"two_regimes": 0.3})``, seeds 1 and 2), the same with
lineages whose rates differ (``lineage_rate_range=(0.25, 1)``), and scVelo's own simulator
on its own time axis (``benchmarks/_scvelo_simulation.py`` in scVelo's environment,
``--scvelo-python``, 600 cells, 60 genes, seeds 1 and 2). Each is fitted with the default
and with each setting of ``--settings`` (JSON keyword arguments), the same seed and split,
and every fit is scored by the same functions: Spearman correlation of ``latent_time`` with
the true time, the held-out MSE (``metrics_``), and
:func:`explorer.models.vae.time_calibration` (coverage of nominal 90 % intervals through a
cross-fitted monotone map, and the Spearman correlation of the SD with the time error).

Usage::

    python benchmarks/velovae_simulations.py --scvelo-python .venv-compat/bin/python
        [--settings '{"initial_time": "steady_state"}' '{"variant": "basic"}'] [--out FILE]

It prints a table and writes ``benchmarks/results/velovae_simulations.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from bench_dynamical import scvelo_simulation
from velovae_scvelo_sim import run, score_fit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = [
    '{"initial_time": "steady_state"}',
    '{"variant": "basic"}',
    '{"encoder_dropout": 0.2}',
    '{"n_starts": 2}',
]


def _datasets(scvelo_python: str, cache: Path) -> dict:
    import anndata as ad

    from explorer.data.simulate import simulate
    from explorer.pipeline import prepare

    out = {}
    for seed in (1, 2):
        for name, extra in (("two lineages", {}), ("rates differ", {"lineage_rate_range": (0.25, 1)})):
            adata = simulate(n_obs=600, n_vars=60, seed=seed, branches=2, kinds={"two_regimes": 0.3}, **extra)
            prepare(adata, n_neighbors=15, compute_umap=False)
            out[f"{name}, seed {seed}"] = adata
        path = scvelo_simulation(scvelo_python, cache, 600, 60, 0, seed)
        out[f"scVelo own axis, seed {seed}"] = ad.read_h5ad(path)
    return out


def _rows(args: argparse.Namespace, cache: Path) -> Iterator[dict]:
    keys = ("latent_time_spearman", "mse_test", "coverage_90", "sd_error_spearman", "width_error_spearman", "fit_s")
    for name, adata in _datasets(args.scvelo_python, cache).items():
        for setting in ["{}", *args.settings]:
            scores = score_fit(adata.copy(), json.loads(setting))
            yield {"simulation": name, "setting": setting, **{k: scores[k] for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="*", default=SETTINGS)
    parser.add_argument("--out", type=Path, default=RESULTS / "velovae_simulations.json")
    run(parser, _rows)


if __name__ == "__main__":
    main()
