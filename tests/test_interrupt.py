"""Ctrl-C stops ``explorer fit`` at any moment: exit 130, a one-line message, no traceback, no file.

A real ``explorer fit`` runs in a subprocess and gets SIGINT at several moments, each
when its progress bar shows a step: the first report, the neighbour graph and the UMAP
(numba code), the velocity graph after the fit. One run compiles numba's code from an
empty cache, where an interrupt used to be printed as a traceback and swallowed, and the
output was written anyway.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from explorer._types import FitCancelled
from explorer.data.io import write

EXE = shutil.which("explorer", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory):
    """Raw counts: 600 cells x 100 genes (each step is short; the flag stops the run at the next one)."""
    from explorer.data.simulate import simulate

    path = tmp_path_factory.mktemp("interrupt") / "raw.h5ad"
    simulate(n_obs=600, n_vars=100, seed=0).write_h5ad(path)
    return path


def _interrupt_at(raw_file: Path, out: Path, *, after: str | float, env: dict[str, str] | None = None):
    """Run ``explorer fit``; send SIGINT once stderr shows ``after`` (or after ``after`` seconds)."""
    proc = subprocess.Popen(  # noqa: S603 - our own console script
        [EXE, "fit", str(raw_file), "--out", str(out), "--model", "stochastic"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    seen: list[str] = []
    signalled = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(1):
            seen.append(chunk.decode(errors="replace"))
            if isinstance(after, str) and not signalled.is_set() and after in "".join(seen):
                proc.send_signal(signal.SIGINT)
                signalled.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not isinstance(after, str):
        time.sleep(after)
        proc.send_signal(signal.SIGINT)
        signalled.set()
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    proc.stderr.close()
    return proc.returncode, "".join(seen), signalled.is_set()


@pytest.mark.parametrize(
    "after",
    [
        "preprocess  ",  # the first report, right after the file was read
        "preprocess: neighbours",  # scanpy's kNN graph and umap's fuzzy set (numba)
        pytest.param("preprocess: UMAP", marks=pytest.mark.slow),
        pytest.param("velocity graph", marks=pytest.mark.slow),  # after the fit
    ],
)
def test_ctrl_c_writes_nothing(raw_file, tmp_path, after):
    out = tmp_path / "out.h5ad"
    rc, err, signalled = _interrupt_at(raw_file, out, after=after)
    assert signalled, f"the run ended before {after!r}: {err[-2000:]}"
    if rc == 0:
        pytest.fail(f"the run finished after Ctrl-C at {after!r}: {err[-2000:]}")
    assert rc == 130, err[-2000:]
    assert "interrupted; nothing was written" in err
    assert "Traceback" not in err, err[-3000:]
    assert "KeyboardInterrupt" not in err, err[-3000:]
    assert not out.exists()
    assert not list(tmp_path.glob(".out.h5ad*")), "a temporary file was left behind"


@pytest.mark.slow
def test_ctrl_c_while_numba_compiles(raw_file, tmp_path):
    """An empty numba cache: the neighbour graph compiles UMAP's code for many seconds."""
    out = tmp_path / "out.h5ad"
    cache = tmp_path / "numba_cache"
    env = {"NUMBA_CACHE_DIR": str(cache)}
    rc, err, _ = _interrupt_at(raw_file, out, after="preprocess: neighbours", env=env)
    assert rc == 130, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert "KeyboardInterrupt" not in err, err[-3000:]
    assert not out.exists()


def test_write_checks_cancel_before_replacing(tmp_path, counts_adata_small):
    out = tmp_path / "o.h5ad"
    out.write_bytes(b"old")
    with pytest.raises(FitCancelled):
        write(counts_adata_small, out, cancelled=lambda: True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.h5ad"]


@pytest.fixture
def counts_adata_small():
    import anndata as ad

    rng = np.random.default_rng(0)
    s = rng.poisson(3, (10, 4)).astype(np.float32)
    return ad.AnnData(X=s, layers={"spliced": s, "unspliced": s})


def test_interrupt_in_a_compiler_only_sets_the_flag():
    """In numba's or llvmlite's code the handler does not raise (they swallow it and carry on)."""
    from explorer.cli import _Interrupt

    def frame_in(filename: str):
        namespace: dict = {}
        exec(compile("import sys\ndef f():\n    return sys._getframe()\n", filename, "exec"), namespace)  # noqa: S102
        return namespace["f"]()

    interrupt = _Interrupt()
    numba_file = os.path.join(os.sep, "site-packages", "numba", "core", "compiler.py")
    interrupt._handle(signal.SIGINT, frame_in(numba_file))
    assert interrupt.flag.is_set()
    with pytest.raises(FitCancelled):
        interrupt.check()
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
        interrupt._handle(signal.SIGINT, frame_in(numba_file))
    fresh = _Interrupt()
    with pytest.raises(KeyboardInterrupt):  # elsewhere the first one does
        fresh._handle(signal.SIGINT, frame_in("/work/explorer/pipeline.py"))
    assert fresh.flag.is_set()
