"""Time and peak memory of the streamed pipeline (explorer.stream) at increasing sizes, and on Dask.

Two modes:

``--end-to-end`` (the atlas target): raw counts are simulated block by block
(``explorer.data.simulate`` with the same genes in every block, Poisson counts) straight into
a chunked AnnData ``.zarr`` (never a whole matrix in memory). The measured run is a fresh
process running :func:`explorer.stream.fit_streamed` on the counts: streamed preprocessing
(filter, normalise, log, variable genes, PCA from the streamed Gram matrix, pynndescent kNN,
UMAP unless ``--no-umap``), moments per gene block, the dynamical fit, the velocity graph from
per-edge sums, transition matrix, projection, confidence, root cells, latent time, onsets, the
written store. A watchdog kills the run when its resident memory passes ``--max-gib``.

``--app N`` (the app at atlas scale): a fitted store of ``N`` cells is written block by
block (simulated kinetics: the noise-free abundances as ``Ms``/``Mu``, the true velocity and
time as the fit's ``velocity``/``fit_t``, the true rates as ``var['fit_*']``, a 2-D
embedding drawn from the simulated time and its derivative as ``velocity_umap``; chunks as
:func:`explorer.stream.fit_streamed` writes them, or ``--app-chunks``), then ``explorer serve``
runs on it in a subprocess and chromium (playwright) opens the page: seconds until the
embedding, phase portrait and gene table are drawn, gene clicks until the phase portrait
names the gene (and the server's CPU seconds meanwhile, which a loaded machine does not
stretch as it stretches the wall clock), cell clicks until the inspector shows the cell, and
the server's resident memory sampled every 0.2 s. With ``--keep DIR`` the store is kept in
``DIR`` and reused when it is there (no rebuild).

Default (the older table): the data is preprocessed in memory as setup (not timed) and
stored without ``Ms``/``Mu``; only the streamed fit is measured.

Peak memory is the measured process's maximum resident set (on Dask, plus the workers').
Figures for sizes that were not run are an extrapolation, printed as such.

Usage::

    python benchmarks/bench_atlas.py --end-to-end --cells 100000 200000 --genes 2000 --workers 0
    python benchmarks/bench_atlas.py --app 1000000 [--app-genes 100]
    python benchmarks/bench_atlas.py [--cells 2000 5000 10000] [--genes 2000] [--workers 0 1 2]
        [--out benchmarks/results/atlas.json]

``--workers 0`` is the single-process path; ``N > 0`` a Dask ``LocalCluster`` of N workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench_dynamical import _tree_rss

ROOT = Path(__file__).resolve().parent.parent


def _setup(n_obs: int, n_vars: int, path: Path) -> dict:
    """Simulate, preprocess in memory and store as .zarr (not measured)."""
    import anndata as ad

    from explorer.data.simulate import simulate
    from explorer.pipeline import prepare

    clock = time.perf_counter()
    adata = simulate(n_obs=n_obs, n_vars=n_vars, seed=0)
    for key in [k for k in adata.layers if k.startswith("true_")]:
        del adata.layers[key]
    prepare(adata, n_top_genes=None, compute_umap=False)
    del adata.layers["Ms"], adata.layers["Mu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata: zarr v2 is still its default
        ad.settings.zarr_write_format = 2
        adata.write_zarr(path)
    return {"n_vars_kept": int(adata.n_vars), "setup_s": time.perf_counter() - clock}


#: cells simulated at once (every block the same size: the same genes, drawn from one seed)
_SIM_BLOCK = 10_000


def _setup_counts(n_obs: int, n_vars: int, path: Path) -> dict:
    """Simulate raw counts block by block into a chunked AnnData .zarr (not measured)."""
    import numpy as np
    import pandas as pd
    import zarr
    from anndata.io import write_elem

    from explorer.data.simulate import simulate

    clock = time.perf_counter()
    block = min(_SIM_BLOCK, n_obs)
    if n_obs % block:
        raise SystemExit(f"--cells must be multiples of {block:,} in --end-to-end mode; found {n_obs:,}")
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    layers = root.create_group("layers")
    layers.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    arrays = {}
    for name in ("spliced", "unspliced"):
        arrays[name] = layers.create_array(name, shape=(n_obs, n_vars), chunks=(block, n_vars), dtype="int32")
        arrays[name].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    t_max = 20.0
    clusters = []
    for k, start in enumerate(range(0, n_obs, block)):
        times = np.sort(np.random.default_rng(1000 + k).uniform(0.0, t_max, block))
        # seed 0 in every block: the same gene kinetics, different cells (their times)
        sim = simulate(n_obs=block, n_vars=n_vars, seed=0, cell_times=times, t_max=t_max)
        for name in ("spliced", "unspliced"):
            layer = sim.layers[name]
            arrays[name][start : start + block] = np.asarray(
                layer.toarray() if hasattr(layer, "toarray") else layer, dtype=np.int32
            )
        clusters.append(np.asarray(sim.obs["clusters"].astype(str)))
        var_names = sim.var_names
    obs = pd.DataFrame({"clusters": pd.Categorical(np.concatenate(clusters))}, index=[f"cell{i}" for i in range(n_obs)])
    write_elem(root, "obs", obs)
    write_elem(root, "var", pd.DataFrame(index=var_names))
    for name in ("obsm", "obsp", "varm", "varp", "uns"):
        write_elem(root, name, {})
    return {"n_vars_kept": n_vars, "setup_s": time.perf_counter() - clock}


#: cells per block of the app's store (written one block at a time)
_APP_BLOCK = 50_000


def _app_store(n_obs: int, n_vars: int, path: Path, chunks: tuple[int, int] | None = None) -> dict:
    """A fitted AnnData .zarr store of ``n_obs`` simulated cells, written a block of cells at a time."""
    import numpy as np
    import pandas as pd
    import zarr
    from anndata.io import write_elem

    from explorer.data.simulate import simulate
    from explorer.keys import Key

    clock = time.perf_counter()
    block = min(_APP_BLOCK, n_obs)
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    layers = root.create_group("layers")
    layers.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    # the chunks fit_streamed writes: a gene wide (explorer.stream._LAYER_CHUNK_CELLS)
    chunks = chunks or (min(n_obs, 1 << 17), 1)
    names = {Key.layers.MS: "true_s", Key.layers.MU: "true_u", Key.layers.VELOCITY: "true_velocity", "fit_t": None}
    arrays = {}
    for name in names:
        arrays[name] = layers.create_array(name, shape=(n_obs, n_vars), chunks=chunks, dtype="float32")
        arrays[name].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    t_max, rng = 20.0, np.random.default_rng(0)
    clusters, times = [], []
    for k, start in enumerate(range(0, n_obs, block)):
        stop = min(start + block, n_obs)
        t = np.sort(np.random.default_rng(1000 + k).uniform(0.0, t_max, stop - start))
        sim = simulate(n_obs=stop - start, n_vars=n_vars, seed=0, cell_times=t, t_max=t_max)
        for name, source in names.items():
            values = np.repeat(t[:, None], n_vars, axis=1) if source is None else sim.layers[source]
            arrays[name][start:stop] = np.asarray(values, dtype=np.float32)
        clusters.append(np.asarray(sim.obs["clusters"].astype(str)))
        times.append(t)
        var = sim.var
    t = np.concatenate(times) / t_max
    # a spiral arm: position and its derivative in the simulated time (the projected velocity)
    angle = 3.0 * t
    xy = np.column_stack([10 * t * np.cos(angle), 10 * t * np.sin(angle)])
    dxy = np.column_stack([10 * np.cos(angle) - 30 * t * np.sin(angle), 10 * np.sin(angle) + 30 * t * np.cos(angle)])
    xy += rng.normal(scale=0.15, size=xy.shape)
    obs = pd.DataFrame(
        {"clusters": pd.Categorical(np.concatenate(clusters)), Key.obs.LATENT_TIME: t.astype(np.float32)},
        index=[f"cell{i}" for i in range(n_obs)],
    )
    fit_var = pd.DataFrame(index=var.index)
    for fit_key, true_key in (("fit_alpha", "true_alpha"), ("fit_beta", "true_beta"), ("fit_gamma", "true_gamma"),
                              ("fit_t_", "true_t_"), ("fit_scaling", "true_scaling")):  # fmt: skip
        fit_var[fit_key] = var[true_key].to_numpy(np.float32)
    fit_var["fit_likelihood"] = np.float32(1.0)
    fit_var[Key.var.VELOCITY_GENES] = True
    write_elem(root, "obs", obs)
    write_elem(root, "var", fit_var)
    write_elem(root, "obsm", {Key.obsm.UMAP: xy.astype(np.float32), "velocity_umap": (0.05 * dxy).astype(np.float32)})
    write_elem(root, "uns", {Key.uns.VELOCITY_PARAMS: {"mode": "dynamical", "model": "dynamical", "params": {}}})
    for name in ("obsp", "varm", "varp"):
        write_elem(root, name, {})
    zarr.consolidate_metadata(str(path))
    return {"n_obs": n_obs, "n_vars": n_vars, "chunks": list(chunks), "setup_s": time.perf_counter() - clock}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_idle(pid: int, *, below_s: float = 0.05, first_s: float = 5.0, longest_s: float = 60.0) -> float:
    """Wait ``first_s``, then until process ``pid`` uses under ``below_s`` CPU seconds in a second.

    ``first_s`` covers the server's background torch import, which starts 2 s after the
    first page (``explorer.app.main._want_torch_soon``). Returns the seconds waited.
    """
    start = time.perf_counter()
    time.sleep(first_s)
    while time.perf_counter() - start < longest_s:
        cpu = _cpu_s(pid)
        time.sleep(1.0)
        if _cpu_s(pid) - cpu < below_s:
            break
    return time.perf_counter() - start


def _app_measure(
    path: Path,
    *,
    n_clicks: int = 6,
    gene_clicks: int = 12,
    color_by: str | None = None,
    timeout_s: float = 600.0,
    settle: bool = False,
) -> dict:
    """``explorer serve`` on the store; chromium's page-ready, gene-click and cell-click times; server memory.

    ``gene_clicks`` clicks on as many different genes (rows 1, 2, ... of the gene table's
    first page, at most 14), so that no click finds its gene's columns read already;
    ``n_clicks`` cell clicks (at most 6). ``color_by``: an option of the page's "Colour by"
    list picked before the clicks (e.g. ``"gene: expression (Ms)"``: each gene click then
    redraws the embedding too); default the page's own (the clusters).
    """
    import asyncio
    import re
    import statistics
    import threading

    from bench_app import BROWSER_ARGS, CHROMIUM, _gene_click, _open_page, _rss_mb, _start_server, _stop_server
    from playwright.async_api import async_playwright

    proc, url, listening = _start_server(path.name, path.parent, timeout_s=timeout_s)
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set() and proc.poll() is None:
            samples.append(_rss_mb(proc.pid))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    async def run() -> dict:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            page, ready = await _open_page(browser, url, timeout_s * 1e3)
            rss_ready = _rss_mb(proc.pid)
            # --app-settle: click once the server is idle (after the background torch import)
            if color_by is not None:
                option = page.locator(f'option:text-is("{color_by}")')
                choice = page.locator("select").filter(has=option).first
                await choice.select_option(label=color_by)
                _wait_idle(proc.pid)  # the page redrawn in the new colours
            settled = _wait_idle(proc.pid) if settle else 0.0
            gene, gene_cpu, genes = [], [], []
            load_before = os.getloadavg()[0]
            cells_of_genes = page.locator('.tabulator-row .tabulator-cell[tabulator-field="gene"]')
            for row in range(1, min(gene_clicks, 14) + 1):
                genes.append((await cells_of_genes.nth(row).inner_text()).strip())
                cpu = _cpu_s(proc.pid)
                gene.append(await _gene_click(page, row, timeout_s * 1e3))
                gene_cpu.append(_cpu_s(proc.pid) - cpu)  # the server's CPU until the browser shows it
            load_after = os.getloadavg()[0]
            canvas = page.locator(".bk-Canvas").first
            box = await canvas.bounding_box()
            inspector = page.get_by_text(re.compile(r"\(row \d+\)"))
            cells: list[float | None] = []
            # points on the spiral's arm (the store's embedding is the same at every size)
            for fx, fy in ((0.6, 0.15), (0.45, 0.18), (0.7, 0.2), (0.5, 0.16), (0.75, 0.35), (0.55, 0.15))[:n_clicks]:
                before = await inspector.first.inner_text() if await inspector.count() else ""
                start = time.perf_counter()
                await page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
                took = None
                while time.perf_counter() - start < 30:
                    if await inspector.count() and await inspector.first.inner_text() != before:
                        took = time.perf_counter() - start
                        break
                    await asyncio.sleep(0.02)
                cells.append(took)  # None: no other cell selected within 30 s (a click off the arm)
            await page.screenshot(path=str(path.parent / "atlas_app.png"))
            await browser.close()
        return {"page_ready_s": ready, "rss_at_ready_mb": rss_ready, "settled_s": settled,
                "gene_click_s": gene, "gene_click_server_cpu_s": gene_cpu, "gene_click_genes": genes,
                "gene_click_load_1min": [load_before, load_after], "cell_click_s": cells}  # fmt: skip

    try:
        out = asyncio.run(run())
    finally:
        stop.set()
        stderr = _stop_server(proc)
    out.update(
        serve_to_listening_s=listening,
        gene_click_median_s=statistics.median(out["gene_click_s"]),
        gene_click_server_cpu_median_s=statistics.median(out["gene_click_server_cpu_s"]),
        cell_click_median_s=statistics.median([c for c in out["cell_click_s"] if c is not None] or [float("nan")]),
        rss_peak_mb=max(samples, default=float("nan")),
        server_errors=[line for line in stderr.splitlines() if "Error" in line or "Traceback" in line],
    )
    return out


def _child(path: str, out: str, workers: int, end_to_end: bool = False, umap: bool = True, genes: int = 2000) -> None:
    """The measured run (a fresh process): print one JSON line."""
    from explorer.stream import dask_client, fit_streamed

    kwargs: dict = {"basis": "pca", "overwrite": True}
    if end_to_end:
        kwargs.update(basis="umap" if umap else "pca", preprocess=True,
                      prepare_params={"n_top_genes": genes, "compute_umap": umap})  # fmt: skip
    # the largest resident set seen in each pass (named by its progress reports), sampled every 0.2 s
    import re
    import threading

    phase = {"name": "start (before the first pass)"}
    by_pass: dict[str, float] = {}
    stop = threading.Event()

    def progress(p) -> None:
        phase["name"] = re.sub(r"\s*\d+/\d+\)?$", "", p.message).strip() or "unnamed"

    def sample() -> None:
        while not stop.is_set():
            rss = int(next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:")).split()[1])
            by_pass[phase["name"]] = max(by_pass.get(phase["name"], 0.0), rss / 2**20)
            stop.wait(0.2)

    threading.Thread(target=sample, daemon=True).start()
    kwargs["progress"] = progress
    clock = time.perf_counter()
    worker_peaks: list[float] = []
    if workers:
        with dask_client(n_workers=workers) as client:
            summary = fit_streamed(path, out, client=client, **kwargs)
            peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            worker_peaks = [v / 2**20 for v in peaks.values()]
    else:
        summary = fit_streamed(path, out, **kwargs)
    wall = time.perf_counter() - clock
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(
        json.dumps(
            {
                "wall_s": wall,
                "peak_gib": peak,
                "worker_peak_gib": max(worker_peaks, default=0.0),
                "workers_total_gib": sum(worker_peaks),
                "n_fitted": summary.n_fitted,
                "n_velocity_genes": summary.n_velocity_genes,
                "n_edges": summary.n_edges,
                "cpu_s": resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime,
                "passes_s": {k: round(v, 2) for k, v in summary.seconds.items()},
                "peak_by_pass_gib": {k: round(v, 2) for k, v in by_pass.items()},
            }
        )
    )


def _run_watched(cmd: list[str], max_gib: float) -> subprocess.CompletedProcess:
    """Run ``cmd``, killing it (and its Dask workers) when their resident memory passes ``max_gib``."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # its own session: a kill reaches the Dask workers it starts too
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=dict(os.environ), start_new_session=True)
        peak = 0
        while child.poll() is None:
            peak = max(peak, _tree_rss(child.pid))
            if peak > max_gib * 2**30:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                print(f"killed: resident memory passed {max_gib} GiB", file=sys.stderr)
                break
            time.sleep(1.0)
        out.seek(0)
        err.seek(0)
        stderr = err.read() + f"\nwatchdog: largest resident set seen {peak / 2**30:.2f} GiB"
        return subprocess.CompletedProcess(cmd, child.returncode, out.read(), stderr)


def _extrapolate(rows: list[dict], n_vars: int) -> list[dict]:
    """Least-squares line through (cells, value) of the single-process runs, at 10^6 and 10^7 cells."""
    import numpy as np

    single = [r for r in rows if r["workers"] == 0]
    if len(single) < 2:
        return []
    x = np.array([r["n_obs"] for r in single], dtype=float)
    out = []
    for key in ("wall_s", "peak_gib"):
        y = np.array([r[key] for r in single])
        slope, intercept = np.polyfit(x, y, 1)
        for n in (1_000_000, 10_000_000):
            out.append({"quantity": key, "n_obs": n, "n_vars": n_vars, "value": slope * n + intercept,
                        "per_1000_cells": slope * 1000})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[2000, 5000, 10000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dask-cells", type=int, default=None, help="size the Dask runs use (default: the smallest)")
    parser.add_argument("--out", default=None, help="default: results/atlas.json, or results/atlas_app.json with --app")
    parser.add_argument("--end-to-end", action="store_true", help="from simulated raw counts, preprocessing streamed too")
    parser.add_argument("--no-umap", action="store_true", help="(--end-to-end) project on the PCA, no UMAP")
    parser.add_argument("--max-gib", type=float, default=6.0, help="kill a run whose resident memory passes this")
    parser.add_argument("--app", type=int, default=None, metavar="N", help="the app on a fitted store of N cells")
    parser.add_argument("--app-genes", type=int, default=100, help="(--app) genes in the store")
    parser.add_argument("--app-chunks", type=int, nargs=2, default=None, metavar=("CELLS", "GENES"),
                        help="(--app) the layers' chunks (default: fit_streamed's, 131072 x 1)")  # fmt: skip
    parser.add_argument("--keep", default=None, help="(--app) build the store here and keep it (reused if present)")
    parser.add_argument("--app-gene-clicks", type=int, default=12, metavar="N",
                        help="(--app) gene clicks, each on another gene (at most 14)")
    parser.add_argument("--app-color", default=None, metavar="OPTION",
                        help='(--app) colour the cells by this option first, e.g. "gene: expression (Ms)"')
    parser.add_argument("--app-settle", action="store_true",
                        help="(--app) click once the server is idle, not as soon as the page shows")  # fmt: skip
    parser.add_argument("--child", nargs=3, metavar=("STORE", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]), args.end_to_end, not args.no_umap, args.genes)
        return
    if args.app:
        args.out = args.out or str(ROOT / "benchmarks" / "results" / "atlas_app.json")
        _main_app(args)
        return
    args.out = args.out or str(ROOT / "benchmarks" / "results" / "atlas.json")
    rows = []
    dask_cells = args.dask_cells or min(args.cells)
    with tempfile.TemporaryDirectory(prefix="bench_atlas_") as tmp:
        for n_obs in args.cells:
            store = Path(tmp) / f"sim_{n_obs}.zarr"
            info = _setup_counts(n_obs, args.genes, store) if args.end_to_end else _setup(n_obs, args.genes, store)
            for workers in args.workers:
                if workers and n_obs != dask_cells:
                    continue
                cmd = [sys.executable, __file__, "--child", str(store), str(Path(tmp) / "out.zarr"), str(workers),
                       "--genes", str(args.genes), *(["--end-to-end"] if args.end_to_end else []),
                       *(["--no-umap"] if args.no_umap else [])]  # fmt: skip
                done = _run_watched(cmd, args.max_gib)
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(done.returncode or 1)
                row = {"n_obs": n_obs, "n_vars": args.genes, "workers": workers, "end_to_end": args.end_to_end,
                       "umap": args.end_to_end and not args.no_umap, **info}  # fmt: skip
                row.update(json.loads(done.stdout.strip().splitlines()[-1]))
                rows.append(row)
                print(
                    f"{n_obs:>9,} cells x {args.genes:,} genes ({row['n_fitted']} fitted) "
                    f"{'in process' if workers == 0 else f'Dask, {workers} worker(s)':>18}: "
                    f"{row['wall_s']:7.1f} s (CPU {row['cpu_s']:.0f} s), peak {row['peak_gib']:.2f} GiB"
                    + (f" (+ workers {row['workers_total_gib']:.2f} GiB)" if workers else ""),
                    flush=True,
                )
                print(f"  passes (s): {row['passes_s']}", flush=True)
                print(f"  largest resident set in each pass (GiB): {row.get('peak_by_pass_gib')}", flush=True)
                shutil.rmtree(Path(tmp) / "out.zarr", ignore_errors=True)
                _write_result(args.out, rows, args.genes)  # after every run: a later one may be killed
            shutil.rmtree(store, ignore_errors=True)
    extra = _extrapolate(rows, args.genes)
    print("\n| cells | genes | where | wall (s) | peak memory (GiB) | genes fitted |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        where = "one process" if r["workers"] == 0 else f"Dask, {r['workers']} worker(s)"
        mem = r["peak_gib"] + r["workers_total_gib"]
        print(f"| {r['n_obs']:,} | {r['n_vars']:,} | {where} | {r['wall_s']:.1f} | {mem:.2f} | {r['n_fitted']} |")
    if extra:
        print("\nEXTRAPOLATED (a straight line through the single-process runs; not measured):")
        for e in extra:
            print(f"  {e['quantity']:>9} at {e['n_obs']:>10,} cells: {e['value']:,.1f} ({e['per_1000_cells']:.3f} per 1,000 cells)")
    print(f"\nload average at the end: {os.getloadavg()}; written {args.out}")


def _main_app(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_atlas_app_") as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        store = folder / f"atlas_{args.app}.zarr"
        info = {"n_obs": args.app, "n_vars": args.app_genes, "setup_s": 0.0, "reused": True}
        if not (store / "obs").exists():
            info = _app_store(args.app, args.app_genes, store, tuple(args.app_chunks) if args.app_chunks else None)
        print(f"store: {store} ({info})", flush=True)
        measured = _app_measure(
            store, gene_clicks=args.app_gene_clicks, color_by=args.app_color, settle=args.app_settle
        )
        row = {**info, **measured, "color_by": args.app_color}
    clicks = sorted(
        zip(row["gene_click_s"], row["gene_click_genes"], row["gene_click_server_cpu_s"], strict=True), reverse=True
    )
    worst = ", ".join(f"{g} {s * 1e3:.0f} ms (server CPU {c * 1e3:.0f} ms)" for s, g, c in clicks[:3])
    print(
        f"{args.app:,} cells x {args.app_genes} genes: page ready {row['page_ready_s']:.1f} s; gene click median "
        f"{row['gene_click_median_s'] * 1e3:.0f} ms of {len(clicks)} (max {clicks[0][0] * 1e3:.0f}; "
        "server CPU median "
        f"{row['gene_click_server_cpu_median_s'] * 1e3:.0f} ms); cell click median "
        f"{row['cell_click_median_s'] * 1e3:.0f} ms; server memory peak {row['rss_peak_mb'] / 1024:.2f} GiB; "
        f"longest gene clicks: {worst}; load average {row['gene_click_load_1min'][0]:.1f} -> "
        f"{row['gene_click_load_1min'][1]:.1f} over the gene clicks"
    )
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
              "note": "measured on a shared machine; other processes were running (see loadavg)", "app": row}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


def _write_result(out: str, rows: list[dict], n_vars: int) -> None:
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "note": "measured on a shared machine; other processes were running (see loadavg)",
        "rows": rows,
        "extrapolated": _extrapolate(rows, n_vars),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(out).with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    tmp_out.replace(out)


if __name__ == "__main__":
    main()
