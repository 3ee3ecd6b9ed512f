"""Benchmark: explorer's VeloVAE against pip's ``velovae`` 0.1.2 (Gu et al. 2022), side by side.

Runs on the same preprocessed inputs (``explorer.pipeline.prepare``):

1. the real pancreas (3,696 cells) and a branching simulation with lineage-specific
   rates (``simulate(n_obs=2000, n_vars=200, branches=2, kinds={"two_regimes": 0.3})``):
   explorer's :class:`~explorer.models.vae.VeloVAE` here, the ``velovae`` package in its
   own virtual environment (``--velovae-python``; never a dependency of explorer), and
   on the pancreas explorer's dynamical model as the scVelo baseline. Each runs in a
   fresh process whose peak memory (whole process tree) is sampled;
2. explorer alone on simulations of 10k and 100k cells (``--sizes``), to show that
   memory stays bounded by the data (minibatches).

Every prediction is scored by one function, :func:`explorer.models.metrics.reconstruction_error`,
on each tool's own held-out cells (and the dynamical model on explorer's held-out
cells), with latent-time Spearman correlation against the simulator's true time.

The package's environment (``--setup`` creates it)::

    python3 -m venv .venv-velovae
    .venv-velovae/bin/pip install torch==2.13.0 velovae==0.1.2

It needs two shims on today's stack, applied by the worker before import: scipy's
removed sparse ``.A`` and matplotlib's removed ``cbook.mplDeprecation``. Its own
``preprocess`` crashes on current scVelo, so it gets our preprocessed file.
Usage::

    python benchmarks/bench_velovae.py [--setup] [--velovae-python .venv-velovae/bin/python]
        [--package-epochs 1000 500] [--sizes 10000 100000] [--skip-package]
        [--datasets pancreas simulation] [--package-init own|explorer] [--out FILE]
        [--also '{"initial_time": "steady_state"}'] [--device cpu|cuda] [--seeds 0 1 2]

``--seeds`` runs explorer's default row and the package once per training seed (explorer's
``seed``, the package's ``torch.manual_seed``), on the same file in one run; with
``--package-init explorer`` each package seed starts from that seed's explorer initial time.

It prints a table and writes ``benchmarks/results/velovae.json`` (or ``--out``).
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
from typing import Any

import numpy as np
from bench_dynamical import run_measured as peak_rss_of

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EXPLORER_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "results"
VENV = ROOT / ".venv-velovae"

#: the package's worker, run with --velovae-python; shims first, then velovae's API
PACKAGE_WORKER = r"""
import sys, time, json
import numpy as np
import scipy.sparse as sp
# shim 1: scipy removed the sparse .A shortcut that velovae calls
for cls in (sp.csr_matrix, sp.csc_matrix, sp.coo_matrix):
    if not hasattr(cls, "A"):
        cls.A = property(lambda self: self.toarray())
# shim 2: matplotlib removed cbook.mplDeprecation that velovae's plotting imports
import matplotlib
matplotlib.use("Agg")
import matplotlib.cbook as cbook
if not hasattr(cbook, "mplDeprecation"):
    cbook.mplDeprecation = DeprecationWarning
import anndata as ad
import torch
import velovae as vv

path, out, n1, n2, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
init_key = sys.argv[6] if len(sys.argv) > 6 else None  # an obs column of initial times in [0, 20]
torch.manual_seed(seed); np.random.seed(seed)
adata = ad.read_h5ad(path)
t0, cpu0 = time.perf_counter(), time.process_time()
vae = vv.VAE(adata, tmax=20, dim_z=5, device="cpu", init_key=init_key)
vae.train(adata, config={"n_epochs": n1, "n_epochs_post": n2}, plot=False, embed="umap")
train_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
vae.save_anndata(adata, "vae", "/tmp", file_name=None)
np.savez(out, t=adata.obs["vae_time"].to_numpy(), std_t=adata.obs["vae_std_t"].to_numpy(),
         uhat=adata.layers["vae_uhat"], shat=adata.layers["vae_shat"],
         train_idx=np.asarray(adata.uns["vae_train_idx"]), test_idx=np.asarray(adata.uns["vae_test_idx"]),
         train_s=train_s, cpu_s=cpu_s, iterations=vae.counter,
         iterations_per_epoch=int(np.ceil(len(vae.train_idx) / vae.config["batch_size"])))
"""


def _seeded(label: str, seed: int, seeds: list[int]) -> str:
    """A row's tool label, with its seed where more than seed 0 runs (one seed-0 run keeps the old labels)."""
    return label if seeds == [0] else f"{label}, seed {seed}"


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS in GB of its process tree, sampled every 50 ms)."""
    start = time.perf_counter()
    peak = peak_rss_of(cmd)
    return time.perf_counter() - start, peak


def explorer_worker(path: str, out: str, model: str, kwargs: str) -> None:
    """Fit ``model`` on the file and save what the scores need (run in a fresh process)."""
    import anndata as ad

    from explorer.models import get_model
    from explorer.models.metrics import predicted_abundances

    adata = ad.read_h5ad(path)
    data_rss = _rss_gb("VmRSS")  # the process with its data read, before the fit
    start, cpu = time.perf_counter(), time.process_time()
    fitted = get_model(model, **json.loads(kwargs))
    initial: dict[str, np.ndarray] = {}
    if model == "velovae":
        # keep the initial time (DPT, or the steady-state latent time), for --package-init explorer
        first = fitted._initialize

        def keep_initial_time(*args: object, **kw: object) -> tuple:
            out = first(*args, **kw)
            initial["t_init"] = np.asarray(out[1], dtype=float)
            return out

        fitted._initialize = keep_initial_time
    result = fitted.fit(adata)
    train_s, cpu = time.perf_counter() - start, time.process_time() - cpu
    fit_peak = _rss_gb("VmHWM")  # the process's peak through the fit (not the scoring after it)
    gpu_gb = np.nan
    if fitted.device == "cuda":
        import torch

        gpu_gb = torch.cuda.max_memory_allocated() / 1e9
    result.to_adata(adata)
    u, s = predicted_abundances(adata)
    extra = {}
    if model == "velovae":
        extra = {
            "train": adata.obs["fit_train"].to_numpy(bool),
            "epochs": np.array([len(fitted.history_["stage1"]), len(fitted.history_["stage2"])]),
            "extract_s": fitted.timings_["extract"],
            # the written time and its SD (with n_starts > 1 the pooled ones, not the first start's)
            "t_sd": adata.obs["latent_time_std"].to_numpy(),
            "cpu_s": cpu,
            # the starts of n_starts > 1 are fitted by other instances: no initial time is kept
            "t_init": initial.get("t_init", np.full(adata.n_obs, np.nan)),
        }
    np.savez(
        out,
        u=u.astype(np.float32),
        s=s.astype(np.float32),
        latent_time=np.asarray(adata.obs.get("latent_time", np.full(adata.n_obs, np.nan))),
        train_s=train_s,
        gpu_peak_gb=gpu_gb,
        data_rss_gb=data_rss,
        fit_peak_gb=fit_peak,
        **extra,
    )


def _prepare(tmp: Path, sizes: list[int], datasets: list[str]) -> dict[str, Path]:
    import anndata as ad

    from explorer.data.simulate import simulate
    from explorer.pipeline import prepare

    paths = {}
    if "pancreas" in datasets:
        pancreas = ad.read_h5ad(SHARED / "data" / "pancreas_endocrinogenesis_3696.h5ad")
        prepare(pancreas, seed=0)
        paths["pancreas"] = tmp / "pancreas.h5ad"
        pancreas.write_h5ad(paths["pancreas"])
    if "simulation" in datasets:
        sim = simulate(n_obs=2000, n_vars=200, seed=0, branches=2, kinds={"two_regimes": 0.3})
        prepare(sim, seed=0)
        paths["simulation"] = tmp / "simulation.h5ad"
        sim.write_h5ad(paths["simulation"])
    for n in sizes:
        big = simulate(n_obs=n, n_vars=200, seed=0, branches=2)
        prepare(big, seed=0, compute_umap=False)
        paths[f"sim_{n}"] = tmp / f"sim_{n}.h5ad"
        big.write_h5ad(paths[f"sim_{n}"])
    return paths


def _calibration(true_t: np.ndarray, t: np.ndarray, sd: np.ndarray) -> dict:
    """Coverage of nominal 90% time intervals and Spearman of the SD (model clock) and of the interval's width
    (true axis) with |error| (:func:`explorer.models.vae.time_calibration`).

    Through a cross-fitted monotone map of the model's clock to the true one, and (the
    ``_cubic`` columns) through a cubic fitted on all cells, as measured before.
    """
    from explorer.models.vae import time_calibration

    cal = time_calibration(true_t, t, sd)
    keys = {
        "coverage": "coverage_90",
        "sd_error_spearman": "sd_error_spearman",
        "width_error_spearman": "width_error_spearman",
        "coverage_cubic": "coverage_90_cubic",
    }
    return {new: round(cal[old], 3) for old, new in keys.items()}


def _score(path: Path, u: np.ndarray, s: np.ndarray, train: np.ndarray, latent: np.ndarray) -> dict:
    import anndata as ad
    from scipy.stats import spearmanr

    from explorer.models.metrics import reconstruction_error

    adata = ad.read_h5ad(path)
    err = reconstruction_error(adata.layers["Mu"], adata.layers["Ms"], u, s, train=train).summary
    if "true_t" in adata.obs and np.isfinite(latent).all():
        err["latent_time_spearman"] = float(spearmanr(latent, adata.obs["true_t"])[0])
    if "clusters" in adata.obs and "true_t" not in adata.obs and np.isfinite(latent).all():
        import pandas as pd

        med = pd.Series(latent).groupby(adata.obs["clusters"].to_numpy()).median()
        err["latent_time_median_by_cluster"] = {str(k): round(float(v), 3) for k, v in med.items()}
    return err


class _SavedRows(list):
    """The table's rows, written to ``path`` as each is added (a run cut short keeps what it measured)."""

    def __init__(self, path: Path, machine: str) -> None:
        super().__init__()
        self.path, self.machine = path, machine

    def append(self, row: dict) -> None:
        super().append(row)
        self.save()

    def save(self) -> None:
        """Write the JSON: ``machine`` and the rows so far."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"machine": self.machine, "rows": list(self)}, indent=2))


def _rss_gb(field: str) -> float:
    """This process's ``VmRSS`` (resident now) or ``VmHWM`` (its peak) in GB; NaN off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return float("nan")


def _gpu_peak(res: Any) -> dict:
    """``{"gpu_peak_gb": ...}`` of a worker's result that trained on CUDA, else nothing."""
    gb = float(res["gpu_peak_gb"])
    return {"gpu_peak_gb": round(gb, 2)} if np.isfinite(gb) else {}


def _machine(device: str) -> str:
    """The cores, and with ``--device cuda`` the GPU, the rows ran on."""
    machine = f"{os.cpu_count()} cores"
    if device == "cuda":
        import torch

        machine += f", {torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return machine


def setup_venv() -> Path:
    """Create ``.venv-velovae`` with torch 2.13.0 and velovae 0.1.2 (pip's resolver relaxes the rest)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "torch==2.13.0", "velovae==0.1.2"], check=True)
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--velovae-python", default=str(VENV / "bin" / "python"))
    parser.add_argument("--setup", action="store_true", help="create .venv-velovae first")
    parser.add_argument("--skip-package", action="store_true")
    parser.add_argument("--package-epochs", type=int, nargs=2, default=(1000, 500))
    parser.add_argument(
        "--package-init",
        choices=("own", "explorer"),
        default="own",
        help="the package's initial time: its own (default) or explorer VeloVAE's, passed as its init_key",
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument(
        "--datasets",
        nargs="*",
        choices=("pancreas", "simulation"),
        default=["pancreas", "simulation"],
        help="which of the side-by-side datasets to run (default: both; none: the --sizes alone)",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "velovae.json", help="the JSON to write (default: %(default)s)"
    )
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="JSON",
        help='another explorer VeloVAE row with these parameters, e.g. \'{"initial_time": "steady_state"}\'',
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where explorer's VeloVAE rows train (the dynamical baseline stays on the CPU)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="training seeds of explorer's default row and of the package, each run once per seed",
    )
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        explorer_worker(*args.worker)
        return
    package_python = str(setup_venv()) if args.setup else args.velovae_python
    if not args.skip_package and not Path(package_python).exists():
        parser.error(f"{package_python} not found: pass --setup, --velovae-python PY or --skip-package")
    import anndata as ad

    rows = _SavedRows(args.out, _machine(args.device))
    # explorer VeloVAE's initial time per dataset and seed
    initial_time: dict[tuple[str, int], np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = _prepare(tmp, args.sizes, args.datasets)
        for data in args.datasets:
            # the simulator's time, read once per dataset for both tools' calibration
            true_t = ad.read_h5ad(paths[data]).obs["true_t"].to_numpy() if data == "simulation" else None
            runs = [
                (_seeded("explorer velovae", k, args.seeds), "velovae", {"device": args.device, "seed": k})
                for k in args.seeds
            ]
            for extra in args.also:
                kwargs = {"device": args.device, **json.loads(extra)}
                runs.append((f"explorer velovae {extra}", "velovae", kwargs))
            if data == "pancreas":
                runs.append(("explorer dynamical (scVelo)", "dynamical", {"device": "cpu"}))
            train = None
            for label, model, kwargs in runs:
                out = tmp / f"{data}_{model}_{len(rows)}.npz"
                cmd = [sys.executable, __file__, "--worker", str(paths[data]), str(out), model, json.dumps(kwargs)]
                wall, peak = run_measured(cmd)
                res = np.load(out)
                if model == "velovae" and train is None:  # the first default row's split
                    train = res["train"]
                if model == "velovae" and kwargs.keys() == {"device", "seed"}:  # a default row's initial time
                    initial_time[data, kwargs["seed"]] = res["t_init"]
                # each VeloVAE row on its own held-out cells (an --also row may change the seed or
                # the split); the dynamical model, which holds none out, on the default row's
                own_train = res["train"] if model == "velovae" else train
                row = {"data": data, "tool": label, "wall_s": round(wall, 1), "fit_s": round(float(res["train_s"]), 1)}
                row["peak_gb"] = round(peak, 2)
                row.update(_gpu_peak(res))
                row.update(_score(paths[data], res["u"], res["s"], own_train, res["latent_time"]))
                if "epochs" in res:
                    row["epochs"] = res["epochs"].tolist()
                    row["fit_cpu_s"] = round(float(res["cpu_s"]), 1)
                    if true_t is not None:
                        row.update(_calibration(true_t, res["latent_time"], res["t_sd"]))
                    row["uncertainty_s"] = round(float(res["extract_s"]), 1)
                rows.append(row)
            for seed in [] if args.skip_package else args.seeds:
                out = tmp / f"{data}_package_{seed}.npz"
                script = tmp / "package_worker.py"
                script.write_text(PACKAGE_WORKER)
                n1, n2 = args.package_epochs
                cmd = [package_python, str(script), str(paths[data]), str(out), str(n1), str(n2), str(seed)]
                if args.package_init == "explorer":
                    # the package from explorer's initial time (its init_key), scaled to its t_max of 20
                    given = ad.read_h5ad(paths[data])
                    t_init = initial_time[data, seed]
                    span = t_init.max() - t_init.min()
                    given.obs["explorer_initial_time"] = (t_init - t_init.min()) / max(span, 1e-12) * 20
                    cmd[2] = str(tmp / f"{data}_with_initial_time_{seed}.h5ad")
                    given.write_h5ad(cmd[2])
                    cmd.append("explorer_initial_time")
                wall, peak = run_measured(cmd)
                res = np.load(out)
                mask = np.zeros(len(res["t"]), dtype=bool)
                mask[res["train_idx"]] = True
                tool = f"velovae 0.1.2 ({n1}+{n2} epochs)"
                if args.package_init == "explorer":
                    tool += ", from explorer's initial time"
                tool = _seeded(tool, seed, args.seeds)
                row = {"data": data, "tool": tool, "wall_s": round(wall, 1)}
                row["fit_s"] = round(float(res["train_s"]), 1)
                if "cpu_s" in res:
                    row["fit_cpu_s"] = round(float(res["cpu_s"]), 1)
                    # stages 1 and 2 together (the package stops each early), from its minibatch count
                    row["epochs"] = round(int(res["iterations"]) / int(res["iterations_per_epoch"]))
                row["peak_gb"] = round(peak, 2)
                row.update(_score(paths[data], res["uhat"], res["shat"], mask, res["t"]))
                if true_t is not None:
                    row.update(_calibration(true_t, res["t"], res["std_t"]))
                rows.append(row)
        for n in args.sizes:
            out = tmp / f"sim_{n}.npz"
            kwargs = json.dumps({"device": args.device})
            cmd = [sys.executable, __file__, "--worker", str(paths[f"sim_{n}"]), str(out), "velovae", kwargs]
            wall, peak = run_measured(cmd)
            res = np.load(out)
            size_gb = 4 * n * 200 * 2 / 1e9
            rows.append(
                {
                    "data": f"simulation {n} cells",
                    "tool": "explorer velovae",
                    "wall_s": round(wall, 1),
                    "fit_s": round(float(res["train_s"]), 1),
                    "peak_gb": round(peak, 2),
                    # the worker's resident memory with the file read, and its peak up to the
                    # fit's end (the whole run's peak also holds the scoring's copies)
                    "data_rss_gb": round(float(res["data_rss_gb"]), 2),
                    "fit_peak_gb": round(float(res["fit_peak_gb"]), 2),
                    "Mu+Ms_gb": round(size_gb, 3),
                    "epochs": res["epochs"].tolist(),
                    **_gpu_peak(res),
                }
            )
    rows.save()  # also a run without rows
    keys = (
        "data", "tool", "fit_s", "fit_cpu_s", "peak_gb", "data_rss_gb", "fit_peak_gb", "gpu_peak_gb",
        "mse_test", "mae_test", "latent_time_spearman", "coverage_90", "coverage_90_cubic",
        "sd_error_spearman", "epochs",
    )  # fmt: skip
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row.get(k, "")) for k in keys))


if __name__ == "__main__":
    main()
