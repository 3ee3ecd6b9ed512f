"""The dynamical model at atlas scale: streamed over gene batches, on one machine or on Dask.

Velocity genes are independent until the velocity graph, so nothing here holds a
``(n_obs, n_vars)`` matrix: every step reads a block of genes (or of cells) from a chunked
on-disk store, and memory is ``O(n_obs x batch + n_edges)``.

1. **Read** the input (AnnData's zarr format, or an ``.h5ad`` read lazily through h5py) in
   blocks of cells, into gene-chunked dense arrays of the output store (``Ms``/``Mu`` when
   the input has them, else scratch copies of ``spliced``/``unspliced``).
2. **Moments** per gene block: ``Ms = W @ spliced[:, block]`` with scVelo's neighbour
   weights ``W`` (:func:`explorer.graph.moments.neighbor_weights`), the same float32
   product as :func:`~explorer.graph.moments.compute_moments`; and the steady-state fit
   that picks the genes to fit (:func:`~explorer.models.steady_state.genes_to_fit`).
3. **Fit** per gene block: :class:`~explorer.models.dynamical.Dynamical`'s own per-batch
   EM, on the same batches and seeds as the in-memory fit, so the kinetics are identical.
   Velocities and times go to the store.
4. **Velocity graph** from per-edge sums: for the edge ``(i, j)`` and displacement
   ``d = Ms[j] - Ms[i]``, the Pearson correlation with ``v = velocity[i]`` over the genes
   needs ``sum d``, ``sum d^2``, ``sum d v`` per edge and ``sum v``, ``sum v^2`` per cell;
   every gene block adds its share and the blocks' sums are added up (on Dask, in a tree).
   The kNN sums ``sum v_i v_j`` give the velocity confidence the same way. A graph of more
   than ``_GRAPH_PASS_EDGES`` edges is scored in passes over blocks of cells, so the
   per-edge sums never exist for more edges than that; the graph keeps float32 rows.
5. **Transition matrix, projection, root cells** on the ``(n_obs, n_obs)`` graph
   (:mod:`explorer.graph.transition`, :mod:`explorer.graph.projection`), then the
   **latent time** (:func:`explorer.graph.latent_time.latent_time` split into gene-block
   and cell-block passes) and the onset fit.

From raw counts, :func:`prepare_streamed` first runs :func:`explorer.pipeline.prepare`'s
steps over blocks of cells (filter, normalise, log, seurat variable genes, an exact PCA from
the streamed Gram matrix, then the kNN graph and UMAP on ``X_pca``), writing the normalised
layers that step 1 reads; :func:`fit_streamed` calls it when the input has raw counts.

:func:`fit_streamed` runs the passes in this process; given a ``dask.distributed``
client (or a scheduler address, or a number of local workers) it sends each block to the
cluster as one task. The results equal the in-memory ``explorer fit --model dynamical``
(``tests/test_stream.py``) up to float rounding in the sums.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata
import numba
import numpy as np
import pandas as pd
import zarr
from anndata import AnnData
from anndata.io import read_elem, sparse_dataset, write_elem
from scipy import sparse

from explorer._types import PREPROCESS, InputError, no_velocity_gene, option, report
from explorer._version import __version__
from explorer.data.io import MAX_VALUE, require_layers
from explorer.data.preprocess import (
    _GENE_COUNT_CORR_MIN_GENES,
    _N_ROWS_CHECKED,
    _N_ROWS_LOG_ADVISED,
    MAX_LOGGED,
    MIN_GENES,
    _row_sums,
    _scale_rows,
    check_options,
    highly_variable_from_moments,
    looks_like_counts,
    shared_counts,
    size_factors,
)
from explorer.graph import latent_time as lt_mod
from explorer.graph.moments import neighbor_weights
from explorer.graph.neighbors import _MIN_GENES_FOR_PCA, compute_neighbors
from explorer.graph.projection import project_graph
from explorer.graph.transition import (
    RowStack,
    knn_indices,
    knn_pattern,
    neighbor_pattern,
    pattern_rows,
    reach_step,
    row_blocks,
    self_transition_probabilities,
    split_graph,
    transition_matrix,
)
from explorer.keys import Key
from explorer.models.base import _uns_safe
from explorer.models.dynamical import (
    _BATCH_ELEMENTS,
    _LARGE_GRAPH_CELLS,
    _LARGE_GRAPH_POWER_STEPS,
    Dynamical,
    _batch_seed,
    _GeneEM,
    _em_device,
    _inference_mode,
    _Smoother,
    _warn_few_em_cells,
)
from explorer.models.steady_state import SteadyState, select_velocity_genes

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from explorer._types import ProgressCallback

logger = logging.getLogger(__name__)

#: float32 elements of one block read by a task (64 MiB): bounds a task's memory
_BLOCK_ELEMENTS = 1 << 24
#: edges of the graph scored at once by the per-edge kernel (a block of cells' edges)
_EDGE_BLOCK = 1 << 20
#: edges of the velocity graph whose per-edge sums one pass holds (about 40 bytes each with
#: their pattern and correlations: 2.7 GB); a larger graph is scored in several passes over
#: blocks of cells, each reading the graph genes' Ms again
_GRAPH_PASS_EDGES = 1 << 26
#: cells per chunk of the output's layers, which are one gene wide: the app (and every pass
#: here) reads a gene's column, 2**17 x 4 bytes a chunk (a gene of 10^6 cells is 8 chunks)
_LAYER_CHUNK_CELLS = 1 << 17
#: scVelo's threshold below which a displacement has no direction (explorer.graph.transition)
_ZERO_DISPLACEMENT = 1e-10
#: scratch arrays in the output store, removed before it is renamed into place
_SCRATCH = "_explorer_scratch"
#: anndata's on-disk encodings (anndata.io.write_elem writes the same attributes)
_ARRAY_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}
_DICT_ATTRS = {"encoding-type": "dict", "encoding-version": "0.1.0"}
_ANNDATA_ATTRS = {"encoding-type": "anndata", "encoding-version": "0.1.0"}
#: per-process cache of what every task of one run rebuilds from the plan (the EM
#: smoother): a Dask worker runs many tasks of a run, and building it costs seconds at 10^6 cells
_PROCESS_CACHE: dict[str, Any] = {}


# --------------------------------------------------------------------------------------
# reading the input in blocks
# --------------------------------------------------------------------------------------


def _open_root(path: Path) -> Any:
    """The input's root group: zarr for a ``.zarr`` folder, h5py for an ``.h5ad`` file (read only)."""
    if path.is_dir():
        return zarr.open_group(str(path), mode="r")
    import h5py

    return h5py.File(path, "r")


def _encoding(elem: Any) -> str:
    value = elem.attrs.get("encoding-type", "")
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_rows(elem: Any, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a stored matrix (dense, or anndata's CSR/CSC encoding), dense float32."""
    kind = _encoding(elem)
    if kind in ("csr_matrix", "csc_matrix"):
        block = sparse_dataset(elem)[start:stop]
        return np.asarray(block.toarray(), dtype=np.float32)
    return np.asarray(elem[start:stop], dtype=np.float32)


def _read_elem(root: Any, key: str) -> Any:
    return read_elem(root[key])


@dataclass(frozen=True, slots=True)
class _Input:
    """What the passes need from the input, read once: names, tables, graphs and layer keys."""

    path: Path
    obs: pd.DataFrame
    var: pd.DataFrame
    obsm: dict[str, np.ndarray]
    obsp: dict[str, sparse.csr_matrix]
    uns: dict[str, Any]
    has_moments: bool

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def n_vars(self) -> int:
        return len(self.var)


def _read_input(path: Path, *, spliced_layer: str, unspliced_layer: str) -> _Input:
    """Read the small parts of an AnnData store and check it holds what the streamed fit needs."""
    try:
        root = _open_root(path)
    except (OSError, ValueError) as err:
        msg = (
            f"cannot read {path.name!r} as an AnnData store ({err}); expected an AnnData .zarr folder "
            "or .h5ad file (anndata >= 0.8 encoding). Rewrite it with anndata.write_zarr."
        )
        raise InputError(msg) from None
    names = set(root.keys())
    if "obs" not in names or "var" not in names:
        msg = f"{path.name!r} is not an AnnData store: expected groups 'obs' and 'var', found {sorted(names)}."
        raise InputError(msg)
    layers = set(root["layers"].keys()) if "layers" in names else set()
    has_moments = {Key.layers.MS, Key.layers.MU} <= layers
    need = {spliced_layer, unspliced_layer}
    if not has_moments and not need <= layers:
        msg = (
            f"{path.name!r} has neither layers Ms/Mu nor {sorted(need)}: found layers {sorted(layers)}. "
            "The streamed fit needs normalised spliced/unspliced layers (or Ms/Mu) and a neighbour graph: "
            "preprocess with explorer.pipeline.prepare (or scanpy) and write the result with write_zarr."
        )
        raise InputError(msg)
    obsp = {}
    if "obsp" in names:
        for key in (Key.obsp.CONNECTIVITIES, Key.obsp.DISTANCES):
            if key in root["obsp"]:
                obsp[key] = sparse.csr_matrix(_read_elem(root, f"obsp/{key}"))
    missing = [k for k in (Key.obsp.CONNECTIVITIES, Key.obsp.DISTANCES) if k not in obsp]
    if missing:
        msg = (
            f"{path.name!r} has no neighbour graph: obsp {missing} missing (found {sorted(obsp)}). The streamed "
            "fit reads the kNN graph (scanpy's obsp['distances'] and obsp['connectivities']); compute it "
            "with explorer.graph.neighbors.compute_neighbors (or scanpy.pp.neighbors) first."
        )
        raise InputError(msg)
    if not has_moments:
        dtype = np.dtype(
            root[f"layers/{spliced_layer}/data"].dtype
            if _encoding(root[f"layers/{spliced_layer}"]).endswith("matrix")
            else root[f"layers/{spliced_layer}"].dtype
        )
        if np.issubdtype(dtype, np.integer):
            msg = (
                f"layer {spliced_layer!r} of {path.name!r} holds integer counts: the fit expects normalised "
                "layers. Leave preprocess unset (or pass preprocess=True) to filter and normalise them "
                "in blocks (explorer.stream.prepare_streamed) first."
            )
            raise InputError(msg)
    obsm = {}
    if "obsm" in names:
        obsm = {k: np.asarray(_read_elem(root, f"obsm/{k}")) for k in root["obsm"].keys()}
    uns = _read_elem(root, "uns") if "uns" in names else {}
    return _Input(
        path=path,
        obs=_read_elem(root, "obs"),
        var=_read_elem(root, "var"),
        obsm=obsm,
        obsp=obsp,
        uns=dict(uns),
        has_moments=has_moments,
    )


# --------------------------------------------------------------------------------------
# the output store
# --------------------------------------------------------------------------------------


def _create(group: Any, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any) -> None:
    arr = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=np.nan)
    arr.attrs.update(_ARRAY_ATTRS)


def _array(store: Path, name: str) -> Any:
    return zarr.open_array(str(store / name), mode="r+")


def _layer(name: str) -> str:
    return f"layers/{name}"


def _scratch(name: str) -> str:
    return f"{_SCRATCH}/{name}"


# --------------------------------------------------------------------------------------
# the plan every task receives
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Everything a task needs, sent once to each Dask worker (``O(n_obs + n_edges)``)."""

    token: str
    source: Path
    store: Path
    model: Dynamical
    n_obs: int
    n_vars: int
    cell_chunk: int
    var_chunk: int
    #: source layers read into the store by blocks of cells: (source key, store array)
    copies: tuple[tuple[str, str], ...]
    weights: sparse.csr_matrix  # scVelo's neighbour weights (Ms = weights @ spliced)
    smoother_weights: sparse.csr_matrix  # Dynamical's: neighbor_average_matrix(connectivities)
    pattern: sparse.csr_matrix  # the edges the velocity graph scores, of rows row0:row0 + pattern.shape[0]
    knn: np.ndarray  # (n_obs, k) kNN indices for the velocity confidence
    connectivities: sparse.csr_matrix
    fit_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    model_batch: int = 1
    graph_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    lt_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    row0: int = 0


def _replace(plan: _Plan, **changes: Any) -> _Plan:
    return dataclasses.replace(plan, **changes)


# --------------------------------------------------------------------------------------
# tasks (module level: Dask pickles them by name)
# --------------------------------------------------------------------------------------


def _copy_rows_task(plan: _Plan, start: int) -> None:
    """Read a block of cells of each source layer into its gene-chunked array of the store."""
    root = _open_root(plan.source)
    stop = min(start + plan.cell_chunk, plan.n_obs)
    for key, name in plan.copies:
        _array(plan.store, name)[start:stop] = _read_rows(root[key], start, stop)


def _moments_task(plan: _Plan, lo: int) -> dict[str, np.ndarray]:
    """Ms/Mu of genes ``lo:lo + var_chunk`` (unless read), and their steady-state fit for the gene choice."""
    hi = min(lo + plan.var_chunk, plan.n_vars)
    ms_arr, mu_arr = _array(plan.store, _layer(Key.layers.MS)), _array(plan.store, _layer(Key.layers.MU))
    if plan.copies and plan.copies[0][1] == _scratch(Key.layers.SPLICED):
        s = np.ascontiguousarray(_array(plan.store, _scratch(Key.layers.SPLICED))[:, lo:hi])
        u = np.ascontiguousarray(_array(plan.store, _scratch(Key.layers.UNSPLICED))[:, lo:hi])
        # the float32 product of explorer.graph.moments.compute_moments, one gene block at a time
        Ms = np.asarray(plan.weights @ s, dtype=np.float32)
        Mu = np.asarray(plan.weights @ u, dtype=np.float32)
        ms_arr[:, lo:hi] = Ms
        mu_arr[:, lo:hi] = Mu
    else:
        Ms, Mu = np.asarray(ms_arr[:, lo:hi]), np.asarray(mu_arr[:, lo:hi])
    out = {"any_s": (Ms > 0).any(0), "any_u": (Mu > 0).any(0)}
    if isinstance(plan.model.genes, str) and plan.model.genes == "velocity_genes":
        block = AnnData(
            obs=pd.DataFrame(index=pd.RangeIndex(plan.n_obs).astype(str)),
            var=pd.DataFrame(index=pd.RangeIndex(lo, hi).astype(str)),
            layers={Key.layers.MS: Ms, Key.layers.MU: Mu},
        )
        fit = SteadyState(use_highly_variable=False).fit(block)
        out["gamma"] = fit.gene_params[Key.var.GAMMA].to_numpy(np.float64)
        out["r2"] = fit.gene_params[Key.var.R2].to_numpy(np.float64)
    return out


def _smoother(plan: _Plan, device: Any) -> _Smoother | None:
    if not plan.model.connected_states:
        return None
    key = f"{plan.token}:smoother"
    if key not in _PROCESS_CACHE:
        _PROCESS_CACHE.clear()  # one run at a time per process: drop the previous run's
        _PROCESS_CACHE[key] = _Smoother(plan.smoother_weights, device)
    return _PROCESS_CACHE[key]


def _fit_task(plan: _Plan, k0: int) -> dict[str, Any]:
    """Fit the genes ``fit_cols[k0:k1]`` in the model's own batches; write velocities and times."""
    model = plan.model
    k1 = min(k0 + plan.var_chunk, len(plan.fit_cols))
    cols = plan.fit_cols[k0:k1]
    Mu = np.asarray(_array(plan.store, _layer(Key.layers.MU)).oindex[:, cols], dtype=np.float32)
    Ms = np.asarray(_array(plan.store, _layer(Key.layers.MS)).oindex[:, cols], dtype=np.float32)
    device = _em_device(model.device)  # None: numpy on the CPU, torch not imported
    smoother = _smoother(plan, device)
    parts = []
    with _inference_mode(device):
        for start in range(k0, k1, plan.model_batch):
            sl = slice(start - k0, min(start + plan.model_batch, k1) - k0)
            parts.append(
                model._fit_batch(
                    Mu[:, sl], Ms[:, sl], smoother, device,
                    progress=None, step0=0, total=1, seed=_batch_seed(model.seed, start),
                )
            )  # fmt: skip
    for name, attr in (("velocity", "velocity"), ("velocity_u", "velocity_u"), ("fit_t", "fit_t")):
        _array(plan.store, _scratch(name))[:, k0:k1] = np.concatenate([getattr(p, attr) for p in parts], axis=1)
    latent_t = np.concatenate([p.latent_t for p in parts], axis=1)
    if model.smooth_time:
        _array(plan.store, _scratch("latent_t"))[:, k0:k1] = latent_t
    vel = np.concatenate([p.velocity for p in parts], axis=1)
    return {
        "params": {k: np.concatenate([p.params[k] for p in parts]) for k in parts[0].params},
        "em": _GeneEM.concat([p.em for p in parts]),
        "history": [np.stack(p.loss_history, axis=0) if p.loss_history else None for p in parts],
        "finite_v": np.isfinite(vel).all(0),
        "finite_t": np.isfinite(latent_t).all(0),
    }


@numba.njit(parallel=True, cache=True)
def _edge_sums_kernel(X, V, indptr, indices, row0, first, last, sum_d, sum_d2, sum_dv):  # pragma: no cover
    """Add ``sum d``, ``sum d^2``, ``sum d v`` over a block of genes for every edge of rows ``first:last``.

    ``d = X[j] - X[i]`` (float32, as the in-memory kernel), products and sums in float64.
    ``indptr``/``indices`` hold the edges of rows ``row0:`` (row ``i`` is their ``i - row0``).
    """
    n_genes = X.shape[1]
    for i in numba.prange(first, last):
        for k in range(indptr[i - row0], indptr[i - row0 + 1]):
            j = indices[k]
            total = 0.0
            squares = 0.0
            dot = 0.0
            for g in range(n_genes):
                d = np.float64(X[j, g] - X[i, g])
                total += d
                squares += d * d
                dot += d * np.float64(V[i, g])
            sum_d[k] += total
            sum_d2[k] += squares
            sum_dv[k] += dot


@numba.njit(parallel=True, cache=True)
def _knn_dot_kernel(V, knn, row0, row1, out):  # pragma: no cover
    """Add ``sum_g V[i, g] V[knn[i, m], g]`` to ``out[i - row0, m]`` for the rows ``row0:row1``."""
    n_genes = V.shape[1]
    for i in numba.prange(row0, row1):
        for m in range(knn.shape[1]):
            j = knn[i, m]
            acc = 0.0
            for g in range(n_genes):
                acc += np.float64(V[i, g]) * np.float64(V[j, g])
            out[i - row0, m] += acc


def _graph_columns(plan: _Plan, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """``Ms`` and velocity of graph genes ``lo:lo + var_chunk``, dense float32."""
    sel = plan.graph_cols[lo : lo + plan.var_chunk]
    X = np.asarray(_array(plan.store, _layer(Key.layers.MS)).oindex[:, plan.fit_cols[sel]], dtype=np.float32)
    V = np.asarray(_array(plan.store, _scratch("velocity")).oindex[:, sel], dtype=np.float32)
    return np.ascontiguousarray(X), np.ascontiguousarray(V)


def _graph_task(plan: _Plan, lo: int, *, into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per-edge and per-cell sums of one block of graph genes, added to ``into`` (or to zeros).

    For the edges of the pass's cells ``row0:row0 + pattern.shape[0]`` only: three float64
    per edge is the largest thing the streamed fit holds, so a large graph is scored in
    passes of at most ``_GRAPH_PASS_EDGES`` edges (:func:`_graph_passes`).
    """
    X, V = _graph_columns(plan, lo)
    nnz = plan.pattern.nnz
    row0, row1 = plan.row0, plan.row0 + plan.pattern.shape[0]
    sums = into if into is not None else {name: np.zeros(nnz) for name in ("d", "d2", "dv")}
    indptr, indices = plan.pattern.indptr, plan.pattern.indices
    step = max(1, _EDGE_BLOCK // max(int(np.diff(indptr).max(initial=1)), 1))
    for first in range(row0, row1, step):
        last = min(first + step, row1)
        _edge_sums_kernel(X, V, indptr, indices, row0, first, last, sums["d"], sums["d2"], sums["dv"])
    if into is None:
        n = row1 - row0
        sums.update(v=np.zeros(n), v2=np.zeros(n), knn_dot=np.zeros((n, plan.knn.shape[1])))
    _knn_dot_kernel(V, plan.knn, row0, row1, sums["knn_dot"])
    V64 = V[row0:row1].astype(np.float64)
    sums["v"] += V64.sum(1)
    sums["v2"] += np.einsum("ij,ij->i", V64, V64)
    return sums


def _transition_task(
    plan: _Plan, lo: int, T: sparse.csr_matrix, *, into: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Per-cell sums of ``dX = T X - X`` against the velocity (velocity_confidence_transition)."""
    X, V = _graph_columns(plan, lo)
    dX = np.asarray(T @ X, dtype=np.float64) - X
    V64 = V.astype(np.float64)
    part = {
        "x": dX.sum(1),
        "x2": np.einsum("ij,ij->i", dX, dX),
        "xv": np.einsum("ij,ij->i", dX, V64),
        "v": V64.sum(1),
        "v2": np.einsum("ij,ij->i", V64, V64),
    }
    return part if into is None else _add_into(into, part)


def _rank_task(plan: _Plan, lo: int) -> np.ndarray:
    """Rank and clock-smooth the times of latent-time genes ``lo:lo + var_chunk``; return their row sums."""
    sel = plan.lt_cols[lo : lo + plan.var_chunk]
    name = _scratch("latent_t") if plan.model.smooth_time else _scratch("fit_t")
    t = lt_mod.rank_gene_times(np.asarray(_array(plan.store, name).oindex[:, sel], dtype=np.float64))
    _array(plan.store, _scratch("lt_smooth"))[:, lo : lo + len(sel)] = lt_mod.smooth_gene_times(
        t, plan.connectivities
    )
    return t.sum(1)


def _origin_task(plan: _Plan, lo: int, roots: np.ndarray) -> np.ndarray:
    """Per root, each gene's ``t_origin`` (latest time after the root's), for genes ``lo:lo + var_chunk``."""
    t = np.asarray(_array(plan.store, _scratch("lt_smooth"))[:, lo : lo + plan.var_chunk])
    return np.stack([lt_mod.latest_after(t, t[r]) for r in roots])


def _shared_time_task(
    plan: _Plan, start: int, roots: np.ndarray, t_origin: np.ndarray, t_roots: np.ndarray
) -> np.ndarray:
    """Per root, the per-cell percentiles of the re-rooted gene times, for cells ``start:start + cell_chunk``."""
    t = np.asarray(_array(plan.store, _scratch("lt_smooth"))[start : start + plan.cell_chunk])
    out = []
    for k in range(len(roots)):
        rooted = lt_mod.reroot(t, t_roots[k], t_origin[k])
        out.append(np.percentile(rooted, lt_mod.SHARED_TIME_PERCENTILES, axis=1))
    return np.stack(out)


def _expand_task(plan: _Plan, lo: int) -> None:
    """Write the fitted genes' velocities and times into genes ``lo:lo + var_chunk`` of the full layers.

    By blocks of genes over all cells: the layers are chunked a gene wide, so each write
    fills whole chunks. Genes not fitted are NaN.
    """
    hi = min(lo + plan.var_chunk, plan.n_vars)
    k = np.flatnonzero((plan.fit_cols >= lo) & (plan.fit_cols < hi))
    for name in ("velocity", "velocity_u", "fit_t"):
        full = np.full((plan.n_obs, hi - lo), np.nan, dtype=np.float32)
        if len(k):
            full[:, plan.fit_cols[k] - lo] = _array(plan.store, _scratch(name)).oindex[:, k]
        _array(plan.store, _layer(name))[:, lo:hi] = full


# --------------------------------------------------------------------------------------
# running the tasks: here, or on a Dask cluster
# --------------------------------------------------------------------------------------


def _add(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: a[k] + b[k] for k in a}


def _add_into(total: dict[str, np.ndarray], part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for k, v in part.items():
        total[k] += v
    return total


class _Runner:
    """Run one pass's tasks: in this process, or as Dask tasks (reductions as a tree of additions)."""

    def __init__(self, client: Any | None, progress: ProgressCallback | None) -> None:
        self.client = client
        self.progress = progress
        self._plan: Any = None
        self.task_seconds: dict[str, float] = {}

    def set_plan(self, plan: _Plan) -> None:
        self.plan = plan
        if self.client is not None:
            self._plan = self.client.scatter(plan, broadcast=True, hash=False)

    def _report(self, name: str, done: int, total: int) -> None:
        report(self.progress, done, total, f"{name} {done}/{total}")

    def map(self, name: str, fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> list[Any]:
        clock = time.perf_counter()
        if self.client is None:
            out = []
            for n, item in enumerate(items, 1):
                out.append(fn(self.plan, item, *args))
                self._report(name, n, len(items))
        else:
            from distributed import as_completed

            extra = [self.client.scatter(a, broadcast=True, hash=False) for a in args]
            futures = [
                self.client.submit(fn, self._plan, item, *extra, key=f"{name}-{n}-{uuid.uuid4().hex[:8]}")
                for n, item in enumerate(items)
            ]
            for n, _ in enumerate(as_completed(futures), 1):
                self._report(name, n, len(items))
            out = self.client.gather(futures)
        self.task_seconds[name] = time.perf_counter() - clock
        return out

    def sum(self, name: str, fn: Callable[..., dict[str, np.ndarray]], items: Sequence[Any], *args: Any) -> dict:
        """Sum the tasks' dicts of arrays (one accumulator here; a tree of additions on Dask)."""
        clock = time.perf_counter()
        if self.client is None:
            total = None
            for n, item in enumerate(items, 1):
                total = fn(self.plan, item, *args, into=total)
                self._report(name, n, len(items))
        else:
            extra = [self.client.scatter(a, broadcast=True, hash=False) for a in args]
            level = [self.client.submit(fn, self._plan, item, *extra, pure=False) for item in items]
            while len(level) > 1:
                pairs = [self.client.submit(_add, level[i], level[i + 1], pure=False) for i in range(0, len(level) - 1, 2)]
                level = pairs + ([level[-1]] if len(level) % 2 else [])
            total = level[0].result()
            self._report(name, len(items), len(items))
        self.task_seconds[name] = time.perf_counter() - clock
        return total


@contextlib.contextmanager
def dask_client(*, scheduler: str | None = None, n_workers: int | None = None) -> Any:
    """A ``dask.distributed`` client: connected to ``scheduler``, or to a local cluster of ``n_workers``.

    Parameters
    ----------
    scheduler
        Address of a running scheduler (``tcp://host:8786``), e.g. one started by
        ``dask-ssh``, ``dask-kubernetes`` or ``dask-jobqueue``.
    n_workers
        Start a ``LocalCluster`` of this many single-threaded worker processes.

    Yields
    ------
    The client; the local cluster, if one was started, is closed on exit.
    """
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as err:
            msg = (
                f"cannot reach the Dask scheduler at {scheduler!r} ({err}). Start one (dask-scheduler, "
                "dask-ssh, dask-kubernetes or dask-jobqueue) and pass its address, or use --workers N."
            )
            raise InputError(msg) from None
        with client:
            yield client
        return
    n = n_workers or 1
    environ = dict(os.environ)
    try:
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0")
    finally:
        # Dask's nannies run in this process and set their workers' limits here
        # (OMP_NUM_THREADS=1 and its like) without putting them back: every later
        # subprocess, and any BLAS loaded later, would then run on one thread
        _restore_environment(environ)
    with cluster, Client(cluster) as client:
        logger.info("Dask dashboard: %s", client.dashboard_link)
        yield client


def _restore_environment(environ: dict[str, str]) -> None:
    """Make ``os.environ`` equal to ``environ`` again (drop what was added, put back what changed)."""
    for name in set(os.environ) - set(environ):
        del os.environ[name]
    for name, value in environ.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


# --------------------------------------------------------------------------------------
# streamed preprocessing: counts -> normalised layers, variable genes, PCA, kNN graph
# --------------------------------------------------------------------------------------


def _read_block(elem: Any, start: int, stop: int, dtype: Any = None) -> sparse.csr_matrix | np.ndarray:
    """Rows ``start:stop`` of a stored matrix as it is stored (CSR for anndata's sparse encodings)."""
    if _encoding(elem) in ("csr_matrix", "csc_matrix"):
        block = sparse.csr_matrix(sparse_dataset(elem)[start:stop])
    else:
        block = np.asarray(elem[start:stop])
    return block if dtype is None or block.dtype == dtype else block.astype(dtype)


def _values_of(block: sparse.csr_matrix | np.ndarray) -> np.ndarray:
    return np.asarray(block.data if sparse.issparse(block) else block).ravel()


def _value_stats(block: sparse.csr_matrix | np.ndarray) -> np.ndarray:
    """``[non-finite, negative, above MAX_VALUE, min, max]`` of a block, for validate_counts' checks."""
    values = _values_of(block)
    if values.size == 0:
        return np.array([0, 0, 0, np.inf, -np.inf])
    finite = values[np.isfinite(values)]
    return np.array([
        values.size - finite.size, np.count_nonzero(finite < 0), np.count_nonzero(np.abs(finite) > MAX_VALUE),
        finite.min(initial=np.inf), finite.max(initial=-np.inf),
    ], dtype=np.float64)  # fmt: skip


@dataclass(frozen=True)
class _PrepPlan:
    """What every preprocessing task needs (``O(n_obs + n_vars)``; the PCA loadings at the end)."""

    source: Path
    store: Path
    n_obs: int
    cell_chunk: int
    #: source keys of X, spliced, unspliced (X is the spliced key when the input has no X)
    keys: tuple[str, str, str]
    normalise: tuple[bool, bool, bool] = (False, False, False)
    log_x: bool = False
    divisors: tuple[np.ndarray | None, ...] = (None, None, None)
    keep: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    count_corr: bool = False
    final: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    centre: np.ndarray = field(default_factory=lambda: np.zeros(0))
    components: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


def _prep_rows(plan: _PrepPlan, start: int) -> tuple[int, Any]:
    return min(start + plan.cell_chunk, plan.n_obs), _open_root(plan.source)


def _sizes_task(plan: _PrepPlan, start: int) -> dict[str, np.ndarray]:
    """Cell sizes over all genes, per-gene shared counts and the value checks of a block of cells."""
    stop, root = _prep_rows(plan, start)
    x_key, s_key, u_key = plan.keys
    s = _read_block(root[s_key], start, stop, np.float32)
    u = _read_block(root[u_key], start, stop, np.float32)
    x = s if x_key == s_key else _read_block(root[x_key], start, stop)
    return {
        "size_x": _row_sums(x), "size_s": _row_sums(s), "size_u": _row_sums(u),
        "shared": shared_counts(s, u), "check_x": _value_stats(x), "check_s": _value_stats(s),
        "check_u": _value_stats(u),
    }  # fmt: skip


def _normalised(plan: _PrepPlan, start: int, stop: int, root: Any, which: int, cols: np.ndarray) -> Any:
    """Layer ``which`` (0 X, 1 spliced, 2 unspliced) of a block of cells on genes ``cols``, normalised."""
    block = _read_block(root[plan.keys[which]], start, stop)
    block = block[:, cols]
    if not np.issubdtype(block.dtype, np.floating):
        block = block.astype(np.float32)
    if plan.normalise[which]:
        block = _scale_rows(block, plan.divisors[which][start:stop])
    return block


def _log1p_block(x: Any) -> Any:
    if sparse.issparse(x):
        x = x.copy()
        np.log1p(x.data, out=x.data)
        return x
    return np.log1p(x)


def _gene_stats_task(plan: _PrepPlan, start: int) -> dict[str, np.ndarray]:
    """Per-gene sums of ``expm1(log X)`` and its square (the seurat flavour's mean and variance)."""
    stop, root = _prep_rows(plan, start)
    x = _normalised(plan, start, stop, root, 0, plan.keep)
    out: dict[str, np.ndarray] = {"n_counts": _row_sums(x)}
    if plan.count_corr:  # scVelo's gene_count_corr, on the normalised X before the log
        detected = np.asarray((x > 0).sum(axis=1), dtype=np.float64).ravel()
        x64 = sparse.csr_matrix(x, dtype=np.float64) if sparse.issparse(x) else np.asarray(x, np.float64)
        out.update(
            cc_x=np.asarray(x64.sum(axis=0)).ravel(),
            cc_xx=np.asarray((x64.multiply(x64) if sparse.issparse(x64) else x64 * x64).sum(axis=0)).ravel(),
            cc_xd=np.asarray(x64.T @ detected).ravel(),
            cc_d=np.array([detected.sum(), detected @ detected]),
        )
    if plan.log_x:
        x = _log1p_block(x)
    lo = np.asarray(x.min(axis=0).toarray() if sparse.issparse(x) else x.min(axis=0)).ravel()
    hi = np.asarray(x.max(axis=0).toarray() if sparse.issparse(x) else x.max(axis=0)).ravel()
    e = x.expm1() if sparse.issparse(x) else np.expm1(x)
    if sparse.issparse(e):
        data = e.data.astype(np.float64)
        n = e.shape[1]
        out.update(sum=np.bincount(e.indices, weights=data, minlength=n),
                   sum2=np.bincount(e.indices, weights=data * data, minlength=n))  # fmt: skip
    else:
        e64 = np.asarray(e, dtype=np.float64)
        out.update(sum=e64.sum(0), sum2=(e64 * e64).sum(0))
    out.update(min=lo, max=hi)
    return out


def _write_task(plan: _PrepPlan, start: int, *, into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write a block of cells' normalised layers and log X on the selected genes; add X's Gram matrix."""
    stop, root = _prep_rows(plan, start)
    cols = plan.keep[plan.final]
    out = {}
    for which, name in ((0, "X"), (1, _layer(Key.layers.SPLICED)), (2, _layer(Key.layers.UNSPLICED))):
        block = _normalised(plan, start, stop, root, which, cols)
        if which == 0 and plan.log_x:
            block = _log1p_block(block)
        dense = np.asarray(block.toarray() if sparse.issparse(block) else block, dtype=np.float32)
        _array(plan.store, name)[start:stop] = dense
        if which == 0:
            x64 = dense.astype(np.float64)
            out = {"gram": x64.T @ x64, "sum": x64.sum(0)}
    return out if into is None else _add_into(into, out)


def _project_task(plan: _PrepPlan, start: int) -> np.ndarray:
    """PCA coordinates of a block of cells (or, with no loadings, their log X itself)."""
    stop = min(start + plan.cell_chunk, plan.n_obs)
    x = np.asarray(_array(plan.store, "X")[start:stop], dtype=np.float64)
    if plan.components.size == 0:
        return x.astype(np.float32)
    return ((x - plan.centre) @ plan.components).astype(np.float32)


@dataclass(frozen=True, slots=True)
class PrepareSummary:
    """What :func:`prepare_streamed` did: the store written, its cells and genes, seconds per pass."""

    out: Path
    n_obs: int
    n_vars_input: int
    n_vars_kept: int
    n_vars: int
    seconds: dict[str, float]


def _check_values(name: str, stats: np.ndarray, *, counts: bool) -> None:
    n_bad, n_neg, n_big = (int(v) for v in stats[:3])
    if n_bad:
        msg = f"layer {name!r} has {n_bad} non-finite values (NaN or inf); expected finite counts. Fix those values."
        raise InputError(msg)
    if counts and n_neg:
        msg = (
            f"layer {name!r} has {n_neg} negative values (lowest {stats[3]:g}); expected counts >= 0. "
            "Pass raw or normalised (not scaled/centred) counts."
        )
        raise InputError(msg)
    if n_big:
        msg = f"layer {name!r} has {n_big} values above {MAX_VALUE:g}; expected counts. Check the layer."
        raise InputError(msg)


def _x_logged(root: Any, plan: _PrepPlan, uns: dict[str, Any], stats: np.ndarray) -> bool:
    """:func:`explorer.data.preprocess.x_is_logged` from the blocks' statistics (min, max) and the first rows."""
    if Key.uns.LOG1P in uns:
        return True
    lowest, highest = stats[3], stats[4]
    if not np.isfinite(highest):
        return True
    if lowest < -1:
        return True
    x_key, s_key, _ = plan.keys
    head = min(_N_ROWS_LOG_ADVISED, plan.n_obs)
    head_x = _read_block(root[x_key], 0, head).sum()
    head_s = _read_block(root[s_key], 0, head, np.float32).sum()
    if np.allclose(float(head_x), float(head_s)):
        return False
    return not highest > MAX_LOGGED


def prepare_streamed(
    source: str | Path,
    out: str | Path,
    *,
    min_shared_counts: int = PREPROCESS.min_shared_counts,
    n_top_genes: int | None = PREPROCESS.n_top_genes,
    n_pcs: int = PREPROCESS.n_pcs,
    n_neighbors: int = PREPROCESS.n_neighbors,
    compute_umap: bool = True,
    seed: int = 0,
    spliced_layer: str = Key.layers.SPLICED,
    unspliced_layer: str = Key.layers.UNSPLICED,
    client: Any | None = None,
    cells_per_task: int | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> PrepareSummary:
    """:func:`explorer.pipeline.prepare` (without the moments) over blocks of cells, from a chunked store.

    Never holds a ``(n_obs, n_vars)`` matrix: four passes over blocks of cells, each a
    set of independent tasks (here, or on the Dask ``client``):

    1. cell sizes over all genes and per-gene shared counts (scVelo's ``min_shared_counts``);
    2. on the kept genes, per-gene sums of ``expm1(log X)`` and its square, from which
       :func:`~explorer.data.preprocess.highly_variable_from_moments` picks the
       ``n_top_genes`` as scanpy's seurat flavour does;
    3. the selected genes' normalised ``spliced``/``unspliced`` and log ``X`` written to the
       store, and X's ``genes x genes`` Gram matrix summed: the PCA is the eigen
       decomposition of the covariance (exact, not randomised; ``O(n_genes^2)`` memory);
    4. each block's PCA coordinates.

    Then the kNN graph on ``X_pca`` with :func:`explorer.graph.neighbors.compute_neighbors`
    (scanpy's, pynndescent above 4,096 cells) and, when asked, the UMAP: ``O(n_obs x k)``.
    The moments ``Ms``/``Mu`` are left to :func:`fit_streamed`, which computes them per
    gene block. The result equals the in-memory :func:`~explorer.pipeline.prepare` up to
    float rounding in the sums (``tests/test_stream.py``).

    Parameters
    ----------
    source
        AnnData ``.zarr`` folder or ``.h5ad`` (read lazily) with raw counts in
        ``spliced``/``unspliced`` (dense or CSR), and optionally X.
    out
        Output ``.zarr`` folder (never ``source``), written under a temporary name and renamed.
    min_shared_counts, n_top_genes, n_pcs, n_neighbors, compute_umap, seed
        As :func:`explorer.pipeline.prepare`.
    client
        A ``dask.distributed.Client`` to run the tasks on; ``None`` runs them here.
    cells_per_task
        Cells per task and per chunk of the written layers; default ``2**24`` elements.

    Returns
    -------
    A :class:`PrepareSummary`.
    """
    check_options(
        min_shared_counts=min_shared_counts, n_top_genes=n_top_genes, n_pcs=n_pcs, n_neighbors=n_neighbors
    )
    source, out = Path(source), Path(out)
    _check_paths(source, out, overwrite)
    clock = time.perf_counter()
    try:
        root = _open_root(source)
    except (OSError, ValueError) as err:
        msg = f"cannot read {source.name!r} as an AnnData store ({err}); expected an AnnData .zarr folder or .h5ad file."
        raise InputError(msg) from None
    names = set(root.keys())
    layers = sorted(root["layers"].keys()) if "layers" in names else []
    require_layers(layers, spliced_layer=spliced_layer, unspliced_layer=unspliced_layer, path=source)
    obs, var = _read_elem(root, "obs"), _read_elem(root, "var")
    n_obs, n_vars = len(obs), len(var)
    if n_obs < n_neighbors:
        msg = (
            f"too few cells: found {n_obs}, fewer than n_neighbors={n_neighbors} asked for. "
            f"Pass {option('n_neighbors')} at most {n_obs} or load more cells."
        )
        raise InputError(msg)
    s_key, u_key = _layer(spliced_layer), _layer(unspliced_layer)
    x_key = "X" if "X" in names and _encoding(root["X"]) in ("array", "csr_matrix", "csc_matrix") else s_key
    uns = dict(_read_elem(root, "uns")) if "uns" in names else {}
    chunk = cells_per_task or max(1, min(n_obs, _BLOCK_ELEMENTS // max(n_vars, 1)))
    plan = _PrepPlan(source=source, store=out, n_obs=n_obs, cell_chunk=chunk, keys=(x_key, s_key, u_key))
    runner = _Runner(client, progress)
    runner.set_plan(plan)
    starts = list(range(0, n_obs, chunk))

    # 1. sizes and shared counts
    parts = runner.map("sizes", _sizes_task, starts)
    for name, key in (("X", "check_x"), (spliced_layer, "check_s"), (unspliced_layer, "check_u")):
        stats = np.stack([p[key] for p in parts])
        _check_values(name, np.r_[stats[:, :3].sum(0), stats[:, 3].min(), stats[:, 4].max()], counts=name != "X")
    x_stats = np.stack([p["check_x"] for p in parts])
    obs = obs.copy()
    for key, part in (
        (Key.obs.INITIAL_SIZE_UNSPLICED, "size_u"), (Key.obs.INITIAL_SIZE_SPLICED, "size_s"), (Key.obs.INITIAL_SIZE, "size_x"),
    ):  # fmt: skip
        if key not in obs:
            obs[key] = np.concatenate([p[part] for p in parts])
    shared = np.sum([p["shared"] for p in parts], axis=0)
    keep = np.flatnonzero(shared >= min_shared_counts)
    if len(keep) == 0:
        msg = (
            f"no genes left after filtering: none of the {n_vars} genes has min_shared_counts={min_shared_counts} "
            "(spliced + unspliced counts over cells where both are detected). Lower `min_shared_counts` or "
            "check that the layers hold raw counts."
        )
        raise InputError(msg)
    head = min(_N_ROWS_CHECKED, n_obs)
    normalise = tuple(looks_like_counts(_read_block(root[k], 0, head)) for k in plan.keys)
    sizes = (Key.obs.INITIAL_SIZE, Key.obs.INITIAL_SIZE_SPLICED, Key.obs.INITIAL_SIZE_UNSPLICED)
    divisors = tuple(size_factors(np.asarray(obs[k])) if flag else None for k, flag in zip(sizes, normalise, strict=True))
    for name, flag in zip(("X", spliced_layer, unspliced_layer), normalise, strict=True):
        if not flag:
            logger.warning("did not normalise %s: it does not look like raw counts", name)
    plan = _replace(plan, normalise=normalise, divisors=divisors, keep=keep)
    if normalise[0]:
        log_x = Key.uns.LOG1P not in uns
    else:
        log_x = not _x_logged(root, plan, uns, np.r_[0, 0, 0, x_stats[:, 3].min(), x_stats[:, 4].max()])
        if log_x:
            logger.warning("X is not raw counts and not log-transformed: taking log1p of it")
    plan = _replace(plan, log_x=log_x, count_corr=len(keep) > _GENE_COUNT_CORR_MIN_GENES)
    runner.set_plan(plan)

    # 2. per-gene statistics and the variable genes
    parts = runner.map("gene statistics", _gene_stats_task, starts)
    obs[Key.obs.N_COUNTS] = np.concatenate([p["n_counts"] for p in parts])
    var_out = var.iloc[keep].copy()
    if plan.count_corr and Key.var.GENE_COUNT_CORR not in var_out:
        d_sum, d_sq = np.sum([p["cc_d"] for p in parts], axis=0)
        sx, sxx, sxd = (np.sum([p[k] for p in parts], axis=0) for k in ("cc_x", "cc_xx", "cc_xd"))
        with np.errstate(divide="ignore", invalid="ignore"):
            yy = d_sq - d_sum**2 / n_obs
            corr = (sxd - d_sum / n_obs * sx) / np.sqrt((sxx - sx**2 / n_obs) * yy)
        var_out[Key.var.GENE_COUNT_CORR] = np.round(corr, 4)
    final = np.arange(len(keep))
    if n_top_genes is not None:
        lo = np.min([p["min"] for p in parts], axis=0)
        hi = np.max([p["max"] for p in parts], axis=0)
        if not (hi > lo).any():
            msg = (
                f"every one of the {len(keep)} genes has the same value in all {n_obs} cells; expected expression "
                "that varies between cells (velocity needs it). Check that the layers hold per-cell counts."
            )
            raise InputError(msg)
        total = np.sum([p["sum"] for p in parts], axis=0)
        total2 = np.sum([p["sum2"] for p in parts], axis=0)
        mean = total / n_obs
        variance = (total2 - total * mean) / max(n_obs - 1, 1)
        hvg = highly_variable_from_moments(mean, variance, n_top_genes=n_top_genes)
        for key, values in hvg.items():
            var_out[key] = values
        final = np.flatnonzero(hvg[Key.var.HIGHLY_VARIABLE])
        var_out = var_out.iloc[final].copy()
        uns["hvg"] = {"flavor": "seurat"}
    if len(final) < MIN_GENES:
        msg = (
            f"too few genes left after filtering: {len(final)} of the {n_vars} genes passed "
            f"(min_shared_counts={min_shared_counts} and gene selection); velocity needs at least "
            f"{MIN_GENES}. Lower {option('min_shared_counts')} or load more genes."
        )
        raise InputError(msg)
    if log_x:
        uns[Key.uns.LOG1P] = {"base": None}

    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        store = zarr.open_group(str(tmp), mode="w", zarr_format=_zarr_format())
        store.attrs.update(_ANNDATA_ATTRS)
        group = store.create_group("layers")
        group.attrs.update(_DICT_ATTRS)
        n_final = len(final)
        for name in (Key.layers.SPLICED, Key.layers.UNSPLICED):
            _create(group, name, (n_obs, n_final), (chunk, n_final), np.float32)
        _create(store, "X", (n_obs, n_final), (chunk, n_final), np.float32)
        plan = _replace(plan, store=tmp, final=final)
        runner.set_plan(plan)

        # 3. the layers, and X's Gram matrix for the PCA
        sums = runner.sum("normalise", _write_task, starts)
        obsm = {k: np.asarray(_read_elem(root, f"obsm/{k}")) for k in root["obsm"].keys()} if "obsm" in names else {}
        varm: dict[str, np.ndarray] = {}
        n_comps = min(n_pcs, n_final - 1, n_obs - 1)
        if n_final >= _MIN_GENES_FOR_PCA:
            centre, components, variance, ratio = _pca_from_gram(sums["gram"], sums["sum"], n_obs, n_comps)
            plan = _replace(plan, centre=centre, components=components)
            varm["PCs"] = components.astype(np.float32)
            uns[Key.uns.PCA] = {
                "params": {"zero_center": True, "use_highly_variable": False, "mask_var": None},
                "variance": variance, "variance_ratio": ratio,
            }  # fmt: skip
        runner.set_plan(plan)

        # 4. PCA coordinates (or X itself below 50 genes, as scanpy), then the graph
        rep = np.concatenate(runner.map("PCA", _project_task, starts))
        if plan.components.size:
            light = AnnData(obs=pd.DataFrame(index=obs.index.copy()), obsm={Key.obsm.PCA: rep})
        else:
            light = AnnData(X=rep, obs=pd.DataFrame(index=obs.index.copy()), var=pd.DataFrame(index=var_out.index.copy()))
        clock2 = time.perf_counter()
        compute_neighbors(light, n_neighbors=n_neighbors, n_pcs=n_pcs, seed=seed)
        runner.task_seconds["neighbours"] = time.perf_counter() - clock2
        made_umap = False
        if compute_umap and Key.obsm.UMAP not in obsm:
            # scanpy's UMAP loads only when drawn (explorer/__init__.py's lazy loads)
            from explorer.graph.embedding import compute_umap as _compute_umap

            clock2 = time.perf_counter()
            _compute_umap(light, seed=seed)
            runner.task_seconds["UMAP"] = time.perf_counter() - clock2
            made_umap = True
        obsm.update({k: np.asarray(v) for k, v in light.obsm.items()})
        obsp = {k: v for k, v in (_read_elem(root, "obsp").items() if "obsp" in names else ())}
        obsp.update({k: sparse.csr_matrix(v) for k, v in light.obsp.items()})
        uns.update({k: v for k, v in light.uns.items() if k in (Key.uns.NEIGHBORS, "umap")})
        uns[Key.uns.PREPROCESS] = {
            "normalized": True, "min_shared_counts": min_shared_counts,
            "n_top_genes": "None" if n_top_genes is None else n_top_genes, "n_pcs": n_pcs,
            "n_neighbors": n_neighbors, "seed": seed, "umap_computed": made_umap, "n_obs": n_obs,
            "n_vars": n_final, "streamed": True,
        }  # fmt: skip
        _write_tables(store, obs, var_out, obsm, obsp, uns)
        write_elem(store, "varm", varm)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = dict(runner.task_seconds)
    seconds["total"] = time.perf_counter() - clock
    return PrepareSummary(
        out=out, n_obs=n_obs, n_vars_input=n_vars, n_vars_kept=len(keep), n_vars=len(final), seconds=seconds
    )


def _pca_from_gram(
    gram: np.ndarray, total: np.ndarray, n_obs: int, n_comps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Zero-centred PCA from ``X^T X`` and ``sum X``: centre, ``(n_vars, n_comps)`` loadings, variances.

    The covariance's leading eigenvectors are the PCA's components (scanpy's ARPACK solves
    for the same ones); signs as scikit-learn's ``svd_flip`` (largest loading positive).
    """
    from scipy.linalg import eigh

    centre = total / n_obs
    cov = (gram - n_obs * np.outer(centre, centre)) / max(n_obs - 1, 1)
    n = cov.shape[0]
    values, vectors = eigh(cov, subset_by_index=(n - n_comps, n - 1))
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(n_comps)])
    vectors *= np.where(signs == 0, 1.0, signs)
    return centre, vectors, values, values / max(np.trace(cov), 1e-300)


def _needs_preprocessing(source: Path, spliced_layer: str) -> bool:
    """Whether a store holds raw counts or lacks a neighbour graph (and has no ``Ms``/``Mu``)."""
    try:
        root = _open_root(source)
        layers = set(root["layers"].keys()) if "layers" in root else set()
        if {Key.layers.MS, Key.layers.MU} <= layers or spliced_layer not in layers:
            return False  # fitted as it is, or _read_input says what is missing
        graph = "obsp" in root and {Key.obsp.CONNECTIVITIES, Key.obsp.DISTANCES} <= set(root["obsp"].keys())
        return not graph or looks_like_counts(_read_block(root[_layer(spliced_layer)], 0, _N_ROWS_CHECKED))
    except (OSError, ValueError, KeyError):
        return False  # _read_input explains


def _check_paths(source: Path, out: Path, overwrite: bool) -> None:
    if not source.exists():
        msg = f"file not found: {str(source)!r}; expected an AnnData .zarr folder or .h5ad file."
        raise InputError(msg)
    if out.resolve() == source.resolve():
        msg = f"--out {out} is the input; explorer never overwrites its input. Choose another output path."
        raise InputError(msg)
    if out.exists() and not overwrite:
        msg = f"{out} exists; pass overwrite=True (--force) to replace it, or choose another path."
        raise InputError(msg)


# --------------------------------------------------------------------------------------
# the whole streamed fit
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamSummary:
    """What :func:`fit_streamed` did.

    Attributes
    ----------
    out
        The AnnData zarr store written.
    n_obs, n_vars, n_fitted, n_velocity_genes
        Cells, genes, genes fitted and velocity genes.
    n_edges
        Edges of the velocity graph.
    seconds
        Wall time of each pass.
    """

    out: Path
    n_obs: int
    n_vars: int
    n_fitted: int
    n_velocity_genes: int
    n_edges: int
    seconds: dict[str, float]


def _check_model(model: str, model_params: dict[str, Any] | None) -> Dynamical:
    if model != "dynamical":
        msg = (
            f"the streamed (atlas-scale) fit runs the dynamical model only; found --model {model!r}. "
            "Use --model dynamical, or fit other models in memory (without --scheduler/--workers/.zarr)."
        )
        raise InputError(msg)
    try:
        estimator = Dynamical(**(model_params or {}))
    except TypeError as err:
        msg = f"Invalid parameters for model 'dynamical': {err}. Run `explorer models` to see them."
        raise InputError(msg) from None
    if isinstance(estimator.genes, str) and estimator.genes not in ("velocity_genes", "all"):
        msg = f"Invalid genes {estimator.genes!r}. Valid options are: 'velocity_genes', 'all', or a list of names."
        raise InputError(msg)
    return estimator


def fit_streamed(
    source: str | Path,
    out: str | Path,
    *,
    model: str = "dynamical",
    model_params: dict[str, Any] | None = None,
    basis: str = "umap",
    spliced_layer: str = Key.layers.SPLICED,
    unspliced_layer: str = Key.layers.UNSPLICED,
    client: Any | None = None,
    genes_per_task: int | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    preprocess: bool | None = None,
    prepare_params: dict[str, Any] | None = None,
) -> StreamSummary:
    """Fit the dynamical model gene block by gene block and write an AnnData zarr store.

    Parameters
    ----------
    source
        AnnData ``.zarr`` folder or ``.h5ad`` file, read in blocks: normalised layers
        ``spliced``/``unspliced`` (or ``Ms``/``Mu``), obsp ``distances`` and
        ``connectivities`` (preprocessed, e.g. by :func:`explorer.pipeline.prepare`), or
        raw counts, which :func:`prepare_streamed` preprocesses first (``preprocess``).
    out
        Output ``.zarr`` folder, never ``source``; written under a temporary name and renamed.
    model
        ``"dynamical"`` (the only model streamed).
    model_params
        Hyperparameters of :class:`~explorer.models.dynamical.Dynamical`; its
        ``batch_size`` (genes per EM batch) keeps its meaning and default, so the batches
        and their seeds are those of the in-memory fit.
    basis
        Embedding to project the velocity on; skipped (with a log line) if absent.
    spliced_layer, unspliced_layer
        Layers holding the normalised abundances, when the input has no ``Ms``/``Mu``.
    client
        A ``dask.distributed.Client`` to run the tasks on (:func:`dask_client`); ``None``
        runs them in this process.
    genes_per_task
        Genes per task and per gene chunk of the store; default: ``2**24`` cells x genes,
        rounded to the model's gene batch.
    overwrite
        Replace ``out`` if it exists.
    progress
        Receives a report per task.
    preprocess
        Run :func:`prepare_streamed` first (into a scratch store next to ``out``, removed
        at the end). ``None``: when the input has raw counts (whole numbers in the first
        cells) or no neighbour graph, and no ``Ms``/``Mu``.
    prepare_params
        Keyword arguments of :func:`prepare_streamed` (``n_top_genes``, ``n_pcs``, ...).

    Returns
    -------
    A :class:`StreamSummary`. The store holds the input's obs, var, obsm, obsp and uns
    with what ``explorer fit --model dynamical`` adds: layers ``Ms``, ``Mu``,
    ``velocity``, ``velocity_u``, ``fit_t``; var ``fit_*`` and ``velocity_genes``; obs
    ``latent_time``, ``root_cells``, ``velocity_self_transition``, ``velocity_length``,
    ``velocity_confidence``, ``velocity_confidence_transition``; obsp
    ``velocity_graph``, ``velocity_graph_neg``, ``T_fwd``; obsm ``velocity_<basis>``;
    uns ``velocity_params``. The counts stay in the input.
    """
    source, out = Path(source), Path(out)
    _check_paths(source, out, overwrite)
    estimator = _check_model(model, model_params)
    _em_device(estimator.device)  # a bad device fails before any work
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    if preprocess is None:
        preprocess = _needs_preprocessing(source, spliced_layer)
    if preprocess:
        prepared = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.prepared.zarr")
        try:
            prep = prepare_streamed(
                source, prepared, spliced_layer=spliced_layer, unspliced_layer=unspliced_layer,
                client=client, progress=progress, **({"seed": estimator.seed} | (prepare_params or {})),
            )  # fmt: skip
            summary = fit_streamed(
                prepared, out, model=model, model_params=model_params, basis=basis, client=client,
                genes_per_task=genes_per_task, overwrite=overwrite, progress=progress, preprocess=False,
            )  # fmt: skip
        finally:
            shutil.rmtree(prepared, ignore_errors=True)
        times = {f"prepare: {k}": v for k, v in prep.seconds.items()}
        times.update(summary.seconds)
        times["total"] = time.perf_counter() - clock
        return dataclasses.replace(summary, seconds=times)
    data = _read_input(source, spliced_layer=spliced_layer, unspliced_layer=unspliced_layer)
    n_obs, n_vars = data.n_obs, data.n_vars
    if n_obs < 3:
        msg = f"too few cells: found {n_obs}; the velocity graph needs at least 3."
        raise InputError(msg)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        summary = _run(
            data, tmp, estimator, basis=basis, spliced_layer=spliced_layer, unspliced_layer=unspliced_layer,
            client=client, genes_per_task=genes_per_task, progress=progress, seconds=seconds,
        )  # fmt: skip
        shutil.rmtree(tmp / _SCRATCH, ignore_errors=True)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds["total"] = time.perf_counter() - clock
    return StreamSummary(out=out, seconds=seconds, **summary)


def _run(
    data: _Input,
    tmp: Path,
    estimator: Dynamical,
    *,
    basis: str,
    spliced_layer: str,
    unspliced_layer: str,
    client: Any | None,
    genes_per_task: int | None,
    progress: ProgressCallback | None,
    seconds: dict[str, float],
) -> dict[str, int]:
    n_obs, n_vars = data.n_obs, data.n_vars
    model_batch = estimator.batch_size or max(1, _BATCH_ELEMENTS // max(n_obs, 1))
    per_task = genes_per_task or max(1, _BLOCK_ELEMENTS // n_obs)
    # a task holds whole model batches, so each batch (and its seed) is the in-memory fit's
    per_task = max(model_batch, per_task // model_batch * model_batch)
    cell_chunk = max(1, min(n_obs, _BLOCK_ELEMENTS // max(n_vars, 1)))
    conn = data.obsp[Key.obsp.CONNECTIVITIES]
    large = n_obs > _LARGE_GRAPH_CELLS
    knn = knn_indices(data.obsp[Key.obsp.DISTANCES])
    direct = knn_pattern(knn)
    # scVelo's velocity graph scores the kNN recursed twice (explorer.graph.transition, mode
    # "distances"): the cells two steps of (I + kNN) away, built a pass of cells at a time
    reach = reach_step(direct)

    root = zarr.open_group(str(tmp), mode="w", zarr_format=_zarr_format())
    root.attrs.update(_ANNDATA_ATTRS)
    layers = root.create_group("layers")
    layers.attrs.update(_DICT_ATTRS)
    scratch = root.create_group(_SCRATCH)
    full_chunks = (cell_chunk, per_task)
    # a gene wide (see _LAYER_CHUNK_CELLS); Ms/Mu copied from the input by blocks of
    # cells are chunked by those blocks, so every copy fills whole chunks
    rows = cell_chunk if data.has_moments else min(n_obs, _LAYER_CHUNK_CELLS)
    for name in (Key.layers.MS, Key.layers.MU, "velocity", "velocity_u", "fit_t"):
        _create(layers, name, (n_obs, n_vars), (rows, 1), np.float32)
    if data.has_moments:
        copies = ((_layer(Key.layers.MS), _layer(Key.layers.MS)), (_layer(Key.layers.MU), _layer(Key.layers.MU)))
    else:
        for name in (Key.layers.SPLICED, Key.layers.UNSPLICED):
            _create(scratch, name, (n_obs, n_vars), full_chunks, np.float32)
        copies = (
            (_layer(spliced_layer), _scratch(Key.layers.SPLICED)),
            (_layer(unspliced_layer), _scratch(Key.layers.UNSPLICED)),
        )
    plan = _Plan(
        token=uuid.uuid4().hex,
        source=data.path,
        store=tmp,
        model=estimator,
        n_obs=n_obs,
        n_vars=n_vars,
        cell_chunk=cell_chunk,
        var_chunk=per_task,
        copies=copies,
        weights=neighbor_weights(conn),
        smoother_weights=lt_mod.neighbor_average_matrix(conn),
        pattern=sparse.csr_matrix((0, n_obs), dtype=np.float32),
        knn=knn,
        connectivities=conn,
        model_batch=model_batch,
    )
    runner = _Runner(client, progress)
    runner.set_plan(plan)
    cell_starts = list(range(0, n_obs, cell_chunk))

    # 1. read the input by blocks of cells; 2. moments and the steady-state gene choice
    runner.map("read", _copy_rows_task, cell_starts)
    stats = runner.map("moments", _moments_task, list(range(0, n_vars, per_task)))
    fitted = _genes_to_fit(estimator, data.var.index, stats)
    cols = np.flatnonzero(fitted)
    if len(cols) == 0:
        raise no_velocity_gene()
    fit_chunks = (cell_chunk, per_task)
    for name in ("velocity", "velocity_u", "fit_t", *(("latent_t",) if estimator.smooth_time else ())):
        _create(scratch, name, (n_obs, len(cols)), fit_chunks, np.float32)

    # 3. the fit, in the model's batches
    plan = _replace(plan, fit_cols=cols)
    runner.set_plan(plan)
    logger.info("streamed dynamical fit: %d genes x %d cells, %d genes per task", len(cols), n_obs, per_task)
    parts = runner.map("fit", _fit_task, list(range(0, len(cols), per_task)))
    params = {k: np.concatenate([p["params"][k] for p in parts]) for k in parts[0]["params"]}
    em = _GeneEM.concat([p["em"] for p in parts])
    finite_v = np.concatenate([p["finite_v"] for p in parts])
    finite_t = np.concatenate([p["finite_t"] for p in parts])
    estimator.history_ = [h for p in parts for h in p["history"]]
    genes_ok = estimator._velocity_genes(params)
    _warn_few_em_cells(params, em, data.var.index[cols])

    # 4. the velocity graph from per-edge sums over the velocity genes
    use = genes_ok & finite_v
    if not use.any():
        use = finite_v.copy()
    if not use.any():
        msg = "No gene left for the velocity graph: every fitted gene has NaN velocities. Load more cells or genes."
        raise InputError(msg)
    graph_cols = np.flatnonzero(use)
    plan = _replace(plan, graph_cols=graph_cols)
    runner.set_plan(plan)
    graph_starts = list(range(0, len(graph_cols), per_task))
    # Dynamical._latent_time's choice above 20,000 cells: root cells on the direct kNN's edges only
    mask = neighbor_pattern(direct, n_recurse_neighbors=1) if estimator.latent_time and large else None
    graph, graph_neg, knn_graphs, sums, n_edges = _velocity_graph(runner, plan, reach, mask, graph_starts)
    del reach, mask

    obs = pd.DataFrame(index=data.obs.index.copy())
    obs[Key.obs.VELOCITY_SELF_TRANSITION] = self_transition_probabilities(graph)
    self_p = obs[Key.obs.VELOCITY_SELF_TRANSITION].to_numpy()
    # compute_transition_matrix's T_fwd, kept as float32 (8 bytes an edge with its indices, the
    # float64 matrix 12), the precision the transition confidence used
    transitions = transition_matrix(graph, graph_neg, self_probabilities=self_p, dtype=np.float32)
    obsm: dict[str, np.ndarray] = {}
    embeddings: list[str] = []
    if Key.obsm.embedding(basis) in data.obsm:
        name = Key.obsm.embedding(basis).removeprefix("X_")
        embedding = data.obsm[Key.obsm.embedding(basis)]
        obsm[Key.obsm.velocity(name)] = project_graph(graph, graph_neg, embedding, self_probabilities=self_p)
        embeddings = [name]
    else:
        logger.info("no obsm[%r]: the velocity is not projected", Key.obsm.embedding(basis))
    length, confidence = _confidence(sums, knn, len(graph_cols))
    obs[Key.obs.VELOCITY_LENGTH] = np.round(length, 2)
    obs[Key.obs.VELOCITY_CONFIDENCE] = confidence
    tsums = runner.sum("confidence", _transition_task, graph_starts, transitions)
    obs[Key.obs.VELOCITY_CONFIDENCE_TRANSITION] = _transition_confidence(tsums, len(graph_cols))

    # 5. root cells and latent time, then the onsets
    lt, roots_score = None, None
    if estimator.latent_time:
        pos, neg = knn_graphs if knn_graphs is not None else (graph, graph_neg)
        T_bwd = transition_matrix(pos, neg, backward=True)
        roots_score = lt_mod.root_cells(
            T_bwd, conn, seed=estimator.seed, n_power_steps=_LARGE_GRAPH_POWER_STEPS if large else None
        )
        lt = _latent_time(runner, plan, params, finite_t, roots_score, conn, scratch, cell_starts)
        if estimator.fit_t_on:
            clock = time.perf_counter()
            device = _em_device(estimator.device)
            ms_arr, mu_arr = _array(tmp, _layer(Key.layers.MS)), _array(tmp, _layer(Key.layers.MU))
            estimator._fit_onsets(_Columns(mu_arr, cols), _Columns(ms_arr, cols), lt, params, em, device)
            runner.task_seconds["onsets"] = time.perf_counter() - clock

    # 6. full layers, then obs, var, obsm, obsp, uns
    runner.map("write layers", _expand_task, list(range(0, n_vars, per_task)))
    velocity_genes = np.zeros(n_vars, dtype=bool)
    velocity_genes[cols] = genes_ok
    var = data.var.copy()
    for key, values in params.items():
        full = np.zeros(n_vars, dtype=bool) if values.dtype == bool else np.full(n_vars, np.nan, dtype=np.float32)
        full[cols] = values
        var[key] = full
    var[Key.var.VELOCITY_GENES] = velocity_genes
    obs_out = data.obs.copy()
    if lt is not None:
        obs_out[Key.obs.LATENT_TIME] = lt
        obs_out[Key.obs.ROOT_CELLS] = roots_score.astype(np.float32)
    for col in obs.columns:
        obs_out[col] = obs[col].to_numpy()
    uns = dict(data.uns)
    uns[Key.uns.VELOCITY_PARAMS] = _uns_safe(
        {
            "mode": estimator.name,
            "model": estimator.name,
            "params": estimator.get_params(),
            "seed": estimator.seed,
            "explorer_version": _version(),
            Key.uns.MODE_NEIGHBORS: "distances",
            Key.uns.N_RECURSE_NEIGHBORS: 2,
            **({Key.uns.EMBEDDINGS: embeddings} if embeddings else {}),
        }
    )
    obsp = dict(data.obsp)
    obsp.update(
        {Key.obsp.VELOCITY_GRAPH: graph, Key.obsp.VELOCITY_GRAPH_NEG: graph_neg, Key.obsp.TRANSITIONS: transitions}
    )
    _write_tables(root, obs_out, var, {**data.obsm, **obsm}, obsp, uns)
    seconds.update(runner.task_seconds)
    return {
        "n_obs": n_obs,
        "n_vars": n_vars,
        "n_fitted": len(cols),
        "n_velocity_genes": int(velocity_genes.sum()),
        "n_edges": n_edges,
    }


def _graph_passes(step: sparse.csr_matrix, per_pass: int) -> list[tuple[int, int]]:
    """Blocks of cells whose velocity-graph edges number about ``per_pass`` each (one block if all fit)."""
    n_obs = step.shape[0]
    widest = int(np.diff(step.indptr).max(initial=1))
    if n_obs * widest * widest <= per_pass:  # (I + kNN)^2 bounds the rows' edges
        return [(0, n_obs)]
    counts = np.zeros(n_obs, dtype=np.int64)
    chunk = max(1, per_pass // (4 * widest * widest))  # a counting product of per_pass / 4 entries at most
    for a in range(0, n_obs, chunk):
        b = min(a + chunk, n_obs)
        counts[a:b] = np.diff(sparse.csr_matrix(step[a:b] @ step).indptr) - 1  # less the diagonal
    return row_blocks(np.r_[0, np.cumsum(counts)], per_pass)


def _velocity_graph(
    runner: _Runner, plan: _Plan, step: sparse.csr_matrix, mask: sparse.csr_matrix | None, starts: list[int]
) -> tuple[
    sparse.csr_matrix, sparse.csr_matrix, tuple[sparse.csr_matrix, sparse.csr_matrix] | None, dict[str, np.ndarray], int
]:
    """The velocity graph's positive and negative parts from per-edge sums, a pass of cells at a time.

    Each pass builds its cells' rows of the edge pattern, sums every graph-gene block's
    share of their edges (``_graph_task``), turns the sums into correlations and keeps only
    the split float32 graph rows (8 bytes an edge): the per-edge sums and the pattern (32
    bytes an edge) never exist for more than ``_GRAPH_PASS_EDGES`` edges. With ``mask``
    (the direct kNN) also the graph on its edges only, for the root cells. Returns the two
    graphs, the masked pair (or ``None``), the per-cell sums and the number of edges scored.
    """
    n_obs, n_genes = plan.n_obs, len(plan.graph_cols)
    parts = [RowStack() for _ in range(4)]
    cell_sums: dict[str, list[np.ndarray]] = {"v": [], "v2": [], "knn_dot": []}
    n_edges, seconds = 0, 0.0
    passes = _graph_passes(step, _GRAPH_PASS_EDGES)
    for n, (a, b) in enumerate(passes, 1):
        pattern = pattern_rows(step, a, b)
        n_edges += int(pattern.nnz)
        runner.set_plan(_replace(plan, pattern=pattern, row0=a))
        name = "velocity graph" if len(passes) == 1 else f"velocity graph (cells pass {n}/{len(passes)})"
        sums = runner.sum(name, _graph_task, starts)
        seconds += runner.task_seconds.pop(name)
        corr = _correlations(sums, pattern, n_genes)
        for key, values in cell_sums.items():
            values.append(sums[key])
        del sums, pattern
        pos, neg = split_graph(corr)
        del corr
        parts[0].add(pos)
        parts[1].add(neg)
        if mask is not None:
            parts[2].add(pos.multiply(mask[a:b]))
            parts[3].add(neg.multiply(mask[a:b]))
    runner.task_seconds["velocity graph"] = seconds
    runner.set_plan(plan)
    sums = {key: np.concatenate(values) for key, values in cell_sums.items()}
    graph, graph_neg = parts[0].stack(n_obs), parts[1].stack(n_obs)
    knn_graphs = (parts[2].stack(n_obs), parts[3].stack(n_obs)) if mask is not None else None
    return graph, graph_neg, knn_graphs, sums, n_edges


class _Columns:
    """The columns ``cols`` of a stored ``(n_obs, n_vars)`` array, read a slice at a time.

    :meth:`Dynamical._fit_onsets` reads ``Mu[:, batch]`` for one gene batch at a time, in
    the fit's batches and seeds; this hands it those columns from the store.
    """

    def __init__(self, arr: Any, cols: np.ndarray) -> None:
        self.arr, self.cols = arr, cols
        self.shape = (arr.shape[0], len(cols))

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, sl = key
        return np.asarray(self.arr.oindex[rows, self.cols[sl]], dtype=np.float32)


def _genes_to_fit(estimator: Dynamical, names: pd.Index, stats: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The genes :func:`~explorer.models.steady_state.genes_to_fit` picks, from the blocks' statistics."""
    genes = estimator.genes
    if isinstance(genes, str):
        if genes == "all":
            return np.ones(len(names), dtype=bool)
        r2 = np.concatenate([s["r2"] for s in stats])
        gamma = np.concatenate([s["gamma"] for s in stats])
        any_s = np.concatenate([s["any_s"] for s in stats])[None, :].astype(np.float32)
        any_u = np.concatenate([s["any_u"] for s in stats])[None, :].astype(np.float32)
        # SteadyState(use_highly_variable=False)'s defaults, as genes_to_fit uses them
        defaults = SteadyState()
        return np.asarray(
            select_velocity_genes(r2, gamma, any_s, any_u, min_r2=defaults.min_r2, min_ratio=defaults.min_ratio),
            dtype=bool,
        )
    wanted = pd.Index([str(g) for g in genes])
    unknown = wanted.difference(names)
    if len(unknown):
        msg = f"{len(unknown)} of the genes to fit are not in var_names, e.g. {list(unknown[:5])}."
        raise InputError(msg)
    return np.asarray(names.isin(wanted), dtype=bool)


def _correlations(sums: dict[str, np.ndarray], pattern: sparse.csr_matrix, n_genes: int) -> sparse.csr_matrix:
    """Pearson correlation per edge from the summed ``d``, ``d^2``, ``d v`` and the cells' ``v``, ``v^2``.

    As :func:`explorer.graph.transition.cosine_correlations`: unscored where the cell's
    centred velocity is zero or the displacement has no direction. In blocks of edges, so
    the temporaries stay small beside the sums.
    """
    vnorm2 = np.maximum(sums["v2"] - sums["v"] ** 2 / n_genes, 0.0)
    values = np.zeros(pattern.nnz, dtype=np.float32)
    step = _EDGE_BLOCK * 16
    for lo in range(0, pattern.nnz, step):
        hi = min(lo + step, pattern.nnz)
        # the row of each edge in this block
        rows = np.searchsorted(pattern.indptr, np.arange(lo, hi), side="right") - 1
        total, squares, dv = sums["d"][lo:hi], sums["d2"][lo:hi], sums["dv"][lo:hi]
        norm2 = squares - total * total / n_genes
        dot = dv - total * sums["v"][rows] / n_genes
        vn = vnorm2[rows]
        ok = (norm2 > _ZERO_DISPLACEMENT * squares) & (norm2 > 0) & (vn > 0)
        values[lo:hi][ok] = np.clip(dot[ok] / np.sqrt(norm2[ok] * vn[ok]), -1.0, 1.0)
    out = sparse.csr_matrix((values, pattern.indices.copy(), pattern.indptr.copy()), shape=pattern.shape)
    out.eliminate_zeros()
    return out


def _confidence(sums: dict[str, np.ndarray], knn: np.ndarray, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """Velocity length and confidence (:func:`explorer.graph.transition.velocity_confidence`) from sums."""
    mean = sums["v"] / n_genes
    norm = np.sqrt(np.maximum(sums["v2"] - sums["v"] * mean, 0.0))
    has = norm > 0
    centred = sums["knn_dot"] - n_genes * mean[:, None] * mean[knn]
    denom = norm[:, None] * norm[knn]
    cos = np.divide(centred, denom, out=np.zeros_like(centred), where=denom > 0)
    valid = has[knn]
    n_valid = valid.sum(1)
    mean_cos = np.where(valid, cos, 0.0).sum(1) / np.maximum(n_valid, 1)
    conf = np.where(has & (n_valid > 0), mean_cos, np.nan)
    return norm.astype(np.float32), np.clip(conf, 0.0, None).astype(np.float32)


def _transition_confidence(sums: dict[str, np.ndarray], n_genes: int) -> np.ndarray:
    """:func:`explorer.graph.transition.velocity_confidence_transition` from per-cell sums."""
    dot = sums["xv"] - sums["x"] * sums["v"] / n_genes
    nx = np.sqrt(np.maximum(sums["x2"] - sums["x"] ** 2 / n_genes, 0.0))
    nv = np.sqrt(np.maximum(sums["v2"] - sums["v"] ** 2 / n_genes, 0.0))
    norms = nx * nv
    norms[norms == 0] = 1.0
    return (dot / norms).astype(np.float32)


def _latent_time(
    runner: _Runner,
    plan: _Plan,
    params: dict[str, np.ndarray],
    finite_t: np.ndarray,
    score: np.ndarray,
    conn: sparse.csr_matrix,
    scratch: Any,
    cell_starts: list[int],
) -> np.ndarray:
    """:func:`explorer.graph.latent_time.latent_time` in gene-block and cell-block passes.

    Ranks and clock smoothing are per gene (gene blocks); the roots need the summed
    ranks (added up); each root's re-rooted times need each gene's latest time after
    the root (gene blocks); the shared time takes per-cell percentiles over the genes
    (cell blocks). The steps and constants are those of ``latent_time``.
    """
    lik = params[Key.var.FIT_LIKELIHOOD]
    genes = finite_t & (lik >= 0.1)
    if not genes.any():
        genes = finite_t
    lt_cols = np.flatnonzero(genes)
    _create(scratch, "lt_smooth", (plan.n_obs, len(lt_cols)), (plan.cell_chunk, plan.var_chunk), np.float64)
    plan = _replace(plan, lt_cols=lt_cols)
    runner.set_plan(plan)
    starts = list(range(0, len(lt_cols), plan.var_chunk))
    t_sum = runner.sum("latent time", _rank_sum_task, starts)["t"]
    order = np.argsort(t_sum, kind="stable")
    is_root = np.asarray(score)[order] > lt_mod._ROOT_THRESHOLD
    is_root[max(1, int(np.ceil(lt_mod._ROOT_MAX_QUANTILE * len(order)))) :] = False
    roots = order[is_root] if is_root.any() else order[:1]
    if not is_root.any():
        logger.warning(
            "No root cells among the %d%% of cells earliest by summed gene time; rooting latent "
            "time at the cell with the smallest summed gene time.",
            round(100 * lt_mod._ROOT_MAX_QUANTILE),
        )
    roots = roots[: lt_mod._N_ROOTS].astype(np.int64)
    t_origin = np.concatenate(runner.map("latent time roots", _origin_task, starts, roots), axis=1)
    smooth = _array(plan.store, _scratch("lt_smooth"))
    t_roots = np.stack([np.asarray(smooth[int(r)]) for r in roots])
    tx_all = np.concatenate(
        runner.map("shared time", _shared_time_task, cell_starts, roots, t_origin, t_roots), axis=2
    )
    times = []
    for tx in tx_all:  # shared_time after its percentiles (the re-rooted times' minimum is 0: the root)
        times.append(lt_mod.best_percentiles(tx))
    lt = lt_mod.scale01(np.stack(times).mean(0))
    # latent_time's last step: neighbour smoothing, skipping cells out of line with theirs
    w = lt_mod.neighbor_average_matrix(conn)
    tc = w @ lt
    z = lt.dot(tc) / max(tc.dot(tc), 1e-12)
    lt_max = lt.max() if lt.max() > 0 else 1.0
    conf = (1 - np.abs(lt / lt_max - tc * z / lt_max)) ** 2
    low = conf < 0.75
    w_new = sparse.csr_matrix(w, copy=True)
    if low.any():
        w_new = w_new @ sparse.diags((~low).astype(np.float32))
        w_new.eliminate_zeros()
    return lt_mod.scale01(w_new @ lt).astype(np.float32)


def _rank_sum_task(plan: _Plan, lo: int, *, into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    part = {"t": _rank_task(plan, lo)}
    return part if into is None else _add_into(into, part)


def _zarr_format() -> int:
    return int(anndata.settings.zarr_write_format)


def _version() -> str:
    return __version__


def _write_tables(
    root: Any,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    obsm: dict[str, np.ndarray],
    obsp: dict[str, sparse.spmatrix],
    uns: dict[str, Any],
) -> None:
    """Write obs, var, obsm, obsp and uns with anndata's own encoders (the layers are written)."""
    write_elem(root, "obs", obs)
    write_elem(root, "var", var)
    write_elem(root, "obsm", obsm)
    write_elem(root, "obsp", obsp)
    write_elem(root, "varm", {})
    write_elem(root, "varp", {})
    write_elem(root, "uns", uns)
