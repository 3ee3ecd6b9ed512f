"""Fixtures for the app tests: a small preprocessed dataset built without UMAP/numba.

``app_adata``: ``simulate(n_obs=300, n_vars=30, seed=0)`` (two lineages), log-normalised
counts, an exact 15-nearest-neighbour graph on the first 10 principal components
(sklearn, so no numba JIT on the test path), ``Ms``/``Mu`` from
``explorer.graph.moments.compute_moments``, ``X_umap`` = the first two principal
components, and ``clusters`` = true time in four bins. Shared read-only: the app never
writes into the data it shows.

For the browser tests (``e2e`` marker): :func:`running_server` starts
``explorer.app.server.serve`` in a subprocess and waits for it with a total deadline
and long per-request timeouts (a page build takes seconds on a busy 2-core machine);
:data:`CHROMIUM` and :data:`BROWSER_ARGS` launch Debian's chromium through playwright.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from explorer.keys import Key

if TYPE_CHECKING:
    from collections.abc import Iterator

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
#: marks of every browser test module
BROWSER_MARKS = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/setup installs it)"
    ),
]

#: how long the server may take to answer its first GET / (imports, loading the dataset, the
#: first page build) on a loaded 2-core CI machine
SERVER_START_DEADLINE_S = 180.0
#: how long one request may take there: GET / took ~4 s under load, so the old 2 s gave up on
#: a server that was about to answer
REQUEST_TIMEOUT_S = 30.0


def make_app_adata(n_obs: int = 300, n_vars: int = 30, *, seed: int = 0, n_neighbors: int = 15):
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    from explorer.data.simulate import simulate
    from explorer.graph.moments import compute_moments

    adata = simulate(n_obs=n_obs, n_vars=n_vars, seed=seed, branches=2)
    for layer in (Key.layers.SPLICED, Key.layers.UNSPLICED):
        counts = adata.layers[layer]
        counts = counts.toarray() if sparse.issparse(counts) else np.asarray(counts)
        size = counts.sum(axis=1, keepdims=True)
        adata.layers[layer] = sparse.csr_matrix(
            counts / np.maximum(size, 1) * np.median(size), dtype=np.float32
        )
    X = np.log1p(adata.layers[Key.layers.SPLICED].toarray())
    pcs = PCA(n_components=10, random_state=seed).fit_transform(X).astype(np.float32)
    adata.obsm[Key.obsm.PCA] = pcs
    adata.obsm[Key.obsm.UMAP] = np.ascontiguousarray(pcs[:, :2])
    knn = NearestNeighbors(n_neighbors=n_neighbors).fit(pcs)
    dist = knn.kneighbors_graph(pcs, mode="distance")
    dist.setdiag(0)
    dist.eliminate_zeros()
    conn = (dist > 0).astype(np.float32)
    conn = conn.maximum(conn.T).tocsr()
    adata.obsp[Key.obsp.DISTANCES] = dist.tocsr().astype(np.float32)
    adata.obsp[Key.obsp.CONNECTIVITIES] = conn
    adata.uns[Key.uns.NEIGHBORS] = {
        "connectivities_key": Key.obsp.CONNECTIVITIES,
        "distances_key": Key.obsp.DISTANCES,
        "params": {"n_neighbors": n_neighbors, "method": "sklearn"},
    }
    compute_moments(adata)
    t = adata.obs[Key.obs.TRUE_T].to_numpy()
    bins = np.digitize(t, np.quantile(t, [0.25, 0.5, 0.75]))
    adata.obs[Key.obs.CLUSTERS] = pd.Categorical.from_codes(bins, ["early", "mid", "late", "end"])
    return adata


@pytest.fixture(scope="session")
def app_adata():
    """A small preprocessed dataset with an embedding, clusters and a neighbour graph (see module doc)."""
    return make_app_adata()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(
    url: str, proc: subprocess.Popen, *, log: Path, deadline_s: float = SERVER_START_DEADLINE_S
) -> float:
    """Wait until ``url`` answers, the server exits, or ``deadline_s`` passes; return the seconds taken.

    Each request may take up to ``REQUEST_TIMEOUT_S`` (never past the deadline): a busy
    machine builds the first page slowly, and a short timeout gives up on a server that
    is about to answer.
    """
    start = time.monotonic()
    last_error: Exception | None = None
    while (left := deadline_s - (time.monotonic() - start)) > 0:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}; see {log}")
        try:
            timeout = max(1.0, min(REQUEST_TIMEOUT_S, left))
            with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 - a local URL we started
                return time.monotonic() - start
        except OSError as err:  # refused while the server starts, or a timeout
            last_error = err
            time.sleep(0.25)
    pytest.fail(f"no answer from {url} within {deadline_s:.0f} s (last error: {last_error!r}); see {log}")
    return deadline_s


@contextlib.contextmanager
def running_server(data: str, data_dir: Path, *, log_name: str) -> Iterator[str]:
    """Serve ``data`` (a file in ``data_dir``) on a free local port; yield its URL once it answers.

    The server's output goes to ``test-artifacts/<log_name>``; the server is stopped on exit.
    """
    port = free_port()
    code = f"from explorer.app.server import serve; serve({data!r}, port={port}, data_dir={str(data_dir)!r})"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / log_name
    with log_path.open("w") as log:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and code
            [sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, text=True, env=env
        )
        url = f"http://127.0.0.1:{port}/"
        try:
            wait_http(url, proc, log=log_path)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def phase_layers(phase, kind: str) -> list[np.ndarray]:
    """What the browser is sent for the phase portrait's fitted layers of ``kind``.

    ``kind`` as :func:`explorer.app.plots.phase_fit_layers` names it (``"points"``,
    ``"arrows"``, ...); each layer as an ``(n, 2)`` array ``Ms, Mu`` read from its data
    source by column name, ``(n, 4)`` ``Ms, Mu, Ms end, Mu end`` (``x0, y0, x1, y1``) for
    arrows. A gene click gives these sources new data directly, so the HoloViews element
    drawn last may be an earlier gene's.
    """
    out = []
    for (_, _, found), live in zip(phase._drawn_keys, phase._fits_live, strict=True):
        if found == kind:
            shown = live.shown
            names = ["Ms", "Mu", "Ms_end", "Mu_end"] if kind == "arrows" else ["Ms", "Mu"]
            out.append(np.column_stack([np.asarray(shown[n], dtype=float) for n in names]))
    return out


def embedding_lines(embedding) -> dict:
    """What the browser is sent for the embedding's path layer's lines (walks, field paths).

    ``xs``, ``ys`` (one array per line), ``color`` and ``line_width``, read from the drawn
    data source: the paths are sent to it directly, so the HoloViews element drawn last
    may show earlier ones.
    """
    shown = embedding.walks_live[0].shown
    assert shown is not None, "the path layer was never drawn"
    return {k: list(v) for k, v in shown.items()}
