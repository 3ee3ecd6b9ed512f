"""Benchmark: do the figures the app offers to judge a fit recover the simulators' truth?

Bergen et al. (2021, Box 1) read two figures from a gene's fitted rates: the kinetic
signal ``beta / (beta + gamma)`` (with the ODE's splicing rate ``fit_beta * fit_scaling``)
and the detection power ``s_inf * u_inf``. The app's trust light judged both until
2026-12-05; this script measures each against the rates the data were drawn from, for the
dynamical model and VeloVAE (seed 0, CPU), on data we did not design and on our own:

- scVelo's simulator (``benchmarks/_scvelo_simulation.py`` in scVelo's environment,
  ``--scvelo-python``; 1,000 cells x 100 genes, seeds 1 and 2, its own time axis);
- the bundled sample (``explorer/sample_data/default.h5ad``: two lineages, lineage programmes);
- the tests' two-lineage simulation (``simulate(600, 60, seed=1, branches=2)``, 30 %
  two-regime genes, as ``tests/models/test_vae.py``'s ``branching``).

Per dataset and model: Spearman of each figure with the truth over the fitted genes, and
for the kinetic signal how many genes the fit puts below 0.5 (the old check's "little
curvature") against how many truly are, and both. For VeloVAE, where the data carry the true
velocity (``layers['true_velocity']``, our simulator's), also whether its per-cell velocity
uncertainty (``obs['velocity_uncertainty']``, the app's "velocity uncertainty" colouring)
ranks the cells by their velocity error, ``1 -`` the cosine of the fitted and the true
velocity over the genes; and, for the dynamical, stochastic and VeloVAE velocities, whether
scVelo's velocity confidence (each cell's coherence with its kNN neighbours, the app's
"velocity confidence" colouring) does. Usage::

    python benchmarks/trust_truth.py --scvelo-python .venv-compat/bin/python [--out FILE]

It prints a table and writes ``benchmarks/results/trust_truth.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from bench_dynamical import scvelo_simulation

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"dynamical": {}, "velovae": {}}  # each with its defaults, as the app fits them


def true_figures(var) -> tuple[np.ndarray, np.ndarray]:
    """``(kinetic signal, detection power)`` of the true rates; ``true_scaling`` where the simulator has one.

    Our simulator stores ``true_beta`` in scVelo's convention (the ODE's rate divided by
    ``true_scaling``); scVelo's has no scaling (1).
    """
    from explorer import kinetics

    scaling = var["true_scaling"].to_numpy(float) if "true_scaling" in var else np.ones(len(var))
    alpha, gamma = var["true_alpha"].to_numpy(float), var["true_gamma"].to_numpy(float)
    beta = var["true_beta"].to_numpy(float) * scaling
    return beta / (beta + gamma), kinetics.detection_power(alpha, beta, gamma, scaling)


def score(adata, model: str) -> dict:
    """Fit ``model`` on ``adata`` and score its kinetic signal and detection power against the truth."""
    from scipy.stats import spearmanr

    from explorer.keys import Key
    from explorer.models import get_model

    result = get_model(model, seed=0, device="cpu", **MODELS[model]).fit(adata.copy())
    params = result.gene_params
    uncertain = {}
    if result.uncertainty is not None and "true_velocity" in adata.layers:
        true_velocity = np.asarray(adata.layers["true_velocity"], float)
        uncertain = velocity_uncertainty_against_truth(result, true_velocity)
    if Key.var.FIT_KINETIC_SIGNAL in params:
        kinetic = params[Key.var.FIT_KINETIC_SIGNAL].to_numpy(float)
    else:  # VeloVAE does not write it (since 2026-12-05): the same formula on its rates
        beta = (params[Key.var.FIT_BETA] * params[Key.var.FIT_SCALING]).to_numpy(float)
        kinetic = beta / (beta + params[Key.var.FIT_GAMMA].to_numpy(float))
    detection = params[Key.var.FIT_DETECTION_POWER].to_numpy(float)
    fitted_scaling = params[Key.var.FIT_SCALING].to_numpy(float)
    true_kinetic, true_detection = true_figures(adata.var)
    ok = np.isfinite(kinetic) & np.isfinite(detection) & np.isfinite(true_kinetic)
    low, truly_low = kinetic[ok] < 0.5, true_kinetic[ok] < 0.5  # noqa: PLR2004 - the old check's threshold
    return {
        "model": model,
        "genes": int(ok.sum()),
        "kinetic_spearman": float(spearmanr(kinetic[ok], true_kinetic[ok])[0]),
        "kinetic_below_half": int(low.sum()),
        "kinetic_truly_below_half": int(truly_low.sum()),
        "kinetic_both": int((low & truly_low).sum()),
        "detection_spearman": float(spearmanr(detection[ok], true_detection[ok])[0]),
        "median_scaling_vs_truth": (
            float(np.median(fitted_scaling[ok] / adata.var["true_scaling"].to_numpy(float)[ok]))
            if "true_scaling" in adata.var
            else None
        ),
        **uncertain,
    }


def velocity_uncertainty_against_truth(result, true_velocity: np.ndarray) -> dict:
    """Spearman of the per-cell velocity uncertainty with the velocity error; the error's median by decile."""
    from scipy.stats import spearmanr

    velocity = np.asarray(result.velocity, float)
    genes = np.isfinite(velocity).all(0) & np.isfinite(true_velocity).all(0)
    v, t = velocity[:, genes], true_velocity[:, genes]
    error = 1 - (v * t).sum(1) / np.sqrt((v * v).sum(1) * (t * t).sum(1))
    uncertainty = np.asarray(result.uncertainty, float)
    most, least = uncertainty >= np.quantile(uncertainty, 0.9), uncertainty <= np.quantile(uncertainty, 0.1)
    return {
        "uncertainty_error_spearman": float(spearmanr(uncertainty, error)[0]),
        "median_velocity_error": float(np.median(error)),
        "median_error_most_uncertain_tenth": float(np.median(error[most])),
        "median_error_least_uncertain_tenth": float(np.median(error[least])),
    }


def confidence_against_truth(adata, model: str) -> dict:
    """Spearman of scVelo's velocity confidence with the velocity error, on the model's velocity genes."""
    from scipy.stats import spearmanr

    from explorer.graph.transition import knn_indices, velocity_confidence
    from explorer.keys import Key
    from explorer.models import get_model

    device = {} if model == "stochastic" else {"device": "cpu"}  # the steady-state models run on numpy
    result = get_model(model, seed=0, **device).fit(adata.copy())
    velocity, truth = np.asarray(result.velocity, float), np.asarray(adata.layers["true_velocity"], float)
    genes = np.asarray(result.velocity_genes, bool) & np.isfinite(velocity).all(0) & np.isfinite(truth).all(0)
    v, t = velocity[:, genes], truth[:, genes]
    error = 1 - (v * t).sum(1) / np.sqrt((v * v).sum(1) * (t * t).sum(1))
    confidence = velocity_confidence(v, knn_indices(adata.obsp[Key.obsp.DISTANCES])).astype(float)
    ok = np.isfinite(confidence) & np.isfinite(error)
    return {"model": model, "confidence_error_spearman": float(spearmanr(confidence[ok], error[ok])[0])}


def datasets(scvelo_python: str, cache: Path):
    """Yield ``(name, AnnData)``: scVelo's simulator (seeds 1, 2), the sample, the tests' two lineages."""
    import anndata

    from explorer.data.simulate import simulate
    from explorer.pipeline import prepare

    for seed in (1, 2):
        path = scvelo_simulation(scvelo_python, cache, 1000, 100, 0, seed)
        yield f"scVelo simulator, seed {seed}", anndata.read_h5ad(path)
    yield "bundled sample", anndata.read_h5ad(ROOT / "explorer" / "sample_data" / "default.h5ad")
    branching = simulate(n_obs=600, n_vars=60, seed=1, branches=2, kinds={"two_regimes": 0.3})
    prepare(branching, n_neighbors=15, compute_umap=False)
    yield "tests' two lineages, seed 1", branching
    branching = simulate(n_obs=600, n_vars=60, seed=2, branches=2, kinds={"two_regimes": 0.3})
    prepare(branching, n_neighbors=15, compute_umap=False)
    yield "tests' two lineages, seed 2", branching


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scvelo-python", required=True, help="scVelo's environment's Python")
    parser.add_argument("--cache", type=Path, default=None, help="folder for the simulations")
    parser.add_argument("--out", type=Path, default=RESULTS / "trust_truth.json")
    args = parser.parse_args()
    from explorer._process import set_up_process

    set_up_process()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        for name, adata in datasets(args.scvelo_python, cache):
            for model in MODELS:
                row = {"data": name, **score(adata, model)}
                rows.append(row)
                print(
                    f"{name:28s} {model:10s} genes {row['genes']:4d}  kinetic signal: Spearman "
                    f"{row['kinetic_spearman']:+.3f}, below 0.5 {row['kinetic_below_half']:3d} "
                    f"(truly {row['kinetic_truly_below_half']}, both {row['kinetic_both']})  "
                    f"detection power: Spearman {row['detection_spearman']:+.3f}",
                    flush=True,
                )
                if model == "velovae" and "true_velocity" in adata.layers:
                    for other in ("dynamical", "stochastic", "velovae"):
                        found = {"data": name, **confidence_against_truth(adata, other)}
                        rows.append(found)
                        print(
                            f"{name:28s} {other:10s} velocity confidence against the velocity error: "
                            f"Spearman {found['confidence_error_spearman']:+.3f}",
                            flush=True,
                        )
                if "uncertainty_error_spearman" in row:
                    print(
                        f"{'':39s} velocity uncertainty against the velocity error: Spearman "
                        f"{row['uncertainty_error_spearman']:+.3f} "
                        f"(median error {row['median_velocity_error']:.3f}; "
                        f"most uncertain tenth {row['median_error_most_uncertain_tenth']:.3f}, least "
                        f"{row['median_error_least_uncertain_tenth']:.3f})",
                        flush=True,
                    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
