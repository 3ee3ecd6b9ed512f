"""Shared fixtures.

The real datasets are read from ``../shared/data`` beside the checkout (see its README for
their origin); they are never copied into the repository. Each test gets its own copy.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

# numba compiles pynndescent/UMAP on first use (tens of seconds); keep its cache in the checkout.
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".numba_cache"))

from explorer._process import set_up_process
from explorer._types import Progress

# as the CLI does: idle OpenMP threads spin only briefly before they sleep (2 shared cores)
set_up_process()


def _share_the_cores_between_workers() -> None:
    """Give each of pytest-xdist's workers its share of the cores' threads.

    The README's test command runs two workers on two cores. Each worker's OpenMP, BLAS,
    torch and numba teams default to a thread per core, so whenever both workers compute at
    once four threads spin on two cores: two 600-cell VeloVAE fits side by side took 100 s
    each (17 s alone), against 19-20 s each with one thread apiece (measured 2026-12-03).
    The environment variables are read when the libraries load (none has yet), and are
    inherited by the commands and servers the tests start; numba's count is set for this
    process's main thread. A limit the user set is kept. Outside xdist nothing changes.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return
    share = max(1, (os.cpu_count() or 1) // workers)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(share))
    import numba

    numba.set_num_threads(min(share, numba.config.NUMBA_NUM_THREADS))


_share_the_cores_between_workers()

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EXPLORER_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: the real datasets (pancreas, dentate gyrus, CellRank fixtures)."""
    if not DATA.is_dir():
        msg = f"expected the real datasets in {DATA}; set EXPLORER_SHARED to the shared/ folder"
        raise FileNotFoundError(msg)
    return DATA


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/reference``: scVelo 0.3.4's results on the pancreas files."""
    if not REFERENCE.is_dir():
        msg = f"expected scVelo's reference results in {REFERENCE}; set EXPLORER_SHARED"
        raise FileNotFoundError(msg)
    return REFERENCE


@pytest.fixture
def progress_log() -> tuple[list[Progress], callable]:
    """A ``(log, callback)`` pair: the callback appends every Progress it receives to log."""
    log: list[Progress] = []
    return log, log.append


@pytest.fixture
def tiny_adata():
    """Raw counts of ``simulate(n_obs=200, n_vars=20, seed=0)`` (Poisson noise, one lineage,
    default pitfall shares): a fresh AnnData per test, nothing preprocessed."""
    from explorer.data.simulate import simulate

    return simulate(n_obs=200, n_vars=20, seed=0)


@functools.cache
def _stored_sample():
    from explorer.data.samples import load_sample

    return load_sample("default")


@pytest.fixture
def sample_adata():
    """``sample_data/default.h5ad`` (``explorer/sample_data/``), a fresh copy per test (read once).

    Made by ``python -m explorer.data.samples``: ``simulate(n_obs=1000, n_vars=120, seed=0,
    branches=2, noise="poisson")`` then ``explorer.pipeline.prepare(adata, seed=0)`` (filtered, normalised,
    PCA, kNN graph, Ms/Mu, UMAP), then ``run_velocity(adata, model="stochastic", seed=0)``
    (velocity, velocity graph, T_fwd, velocity_umap, confidence), with the simulator's
    ground truth kept.
    """
    return _stored_sample().copy()
