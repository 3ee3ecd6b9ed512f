"""The streamed (gene-batch) dynamical fit and the streamed preprocessing equal the in-memory ones; on Dask too.

The in-memory path is ``Dynamical().fit`` + :func:`explorer.pipeline.derive`, what
``explorer fit --model dynamical`` runs. The streamed path reads the stored AnnData in
blocks and builds the velocity graph from per-edge sums, so its graph differs from the
in-memory float32 kernel by float rounding only; the kinetics, velocities and times are the
same numbers (same batches, same seeds).
"""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pytest
from scipy import sparse
from scipy.stats import spearmanr

from explorer._types import InputError
from explorer.cli import main
from explorer.graph import latent_time as lt_mod
from explorer.graph.transition import knn_indices, knn_pattern, reach_step, transition_matrix
from explorer.models.dynamical import Dynamical
from explorer import stream
from explorer.pipeline import derive, prepare
from explorer.stream import _needs_preprocessing, dask_client, fit_streamed, prepare_streamed

pytestmark = pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")

#: a fit quick enough for CI, on several EM batches and several tasks
PARAMS = {"batch_size": 12, "max_iter": 3, "fit_t_on": False}


def _dense(x: object) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x, dtype=np.float64)


def _in_memory(adata: ad.AnnData, basis: str, params: dict) -> ad.AnnData:
    result = Dynamical(**params).fit(adata)
    derived = derive(adata, result, basis=basis)
    out = adata.copy()
    result.to_adata(out)
    derived.to_adata(out)
    return out


@pytest.fixture(scope="module")
def pancreas_subset(shared_data, tmp_path_factory):
    """The real pancreas (all 3,696 cells) on its 60 top genes; stored as an .h5ad without Ms/Mu."""
    adata = ad.read_h5ad(shared_data / "pancreas_endocrinogenesis_3696.h5ad")
    prepare(adata, n_top_genes=60, compute_umap=False)
    path = tmp_path_factory.mktemp("stream") / "pancreas.h5ad"
    stored = adata.copy()
    del stored.layers["Ms"], stored.layers["Mu"]  # the streamed path computes them per gene block
    stored.write_h5ad(path)
    return adata, path


def test_streamed_equals_in_memory_on_the_pancreas(pancreas_subset, tmp_path, monkeypatch):
    adata, path = pancreas_subset
    expected = _in_memory(adata, "pca", PARAMS)
    # the velocity graph scored in passes over blocks of cells, as at 10^6 cells (here 864,505
    # edges: five passes of at most 200,000)
    monkeypatch.setattr(stream, "_GRAPH_PASS_EDGES", 200_000)
    step = reach_step(knn_pattern(knn_indices(adata.obsp["distances"])))
    assert len(stream._graph_passes(step, 200_000)) == 5
    summary = fit_streamed(path, tmp_path / "out.zarr", model_params=PARAMS, basis="pca", genes_per_task=24)
    got = ad.read_zarr(summary.out)
    n_fit = int(np.isfinite(expected.var["fit_alpha"]).sum())
    assert summary.n_fitted == n_fit > 2 * PARAMS["batch_size"]  # several batches and tasks

    # moments, kinetics, velocities and gene times: the same numbers
    for key in ("Ms", "Mu", "velocity", "velocity_u", "fit_t"):
        np.testing.assert_array_equal(got.layers[key], expected.layers[key], err_msg=key)
    for col in ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling", "fit_likelihood", "fit_r2"):
        np.testing.assert_array_equal(got.var[col], expected.var[col], err_msg=col)
    np.testing.assert_array_equal(got.var["velocity_genes"], expected.var["velocity_genes"])

    # the velocity graph from per-edge sums: the in-memory float32 kernel's up to rounding
    signed = got.obsp["velocity_graph"] + got.obsp["velocity_graph_neg"]
    want = expected.obsp["velocity_graph"] + expected.obsp["velocity_graph_neg"]
    assert signed.nnz == want.nnz
    np.testing.assert_allclose(_dense(signed), _dense(want), atol=1e-6)
    np.testing.assert_allclose(_dense(got.obsp["T_fwd"]), _dense(expected.obsp["T_fwd"]), atol=1e-5)
    np.testing.assert_allclose(got.obsm["velocity_pca"], expected.obsm["velocity_pca"], atol=1e-5)
    for col in ("velocity_self_transition", "velocity_length", "velocity_confidence"):
        np.testing.assert_allclose(got.obs[col], expected.obs[col], atol=1e-5, err_msg=col)
    np.testing.assert_allclose(
        got.obs["velocity_confidence_transition"], expected.obs["velocity_confidence_transition"], atol=1e-4
    )

    # root cells and latent time: exactly what latent_time computes from the streamed graph
    # (the root cells' eigen solve amplifies the graph's 1e-7 rounding, so the end-to-end
    # comparison with the in-memory fit is a rank correlation)
    conn = adata.obsp["connectivities"]
    score = lt_mod.root_cells(transition_matrix(got.obsp["velocity_graph"], got.obsp["velocity_graph_neg"], backward=True), conn)
    np.testing.assert_allclose(got.obs["root_cells"], score, atol=1e-6)
    t = expected.layers["fit_t"]
    genes = np.isfinite(t).all(0) & (expected.var["fit_likelihood"].to_numpy() >= 0.1)
    lt = lt_mod.latent_time(t[:, genes], score, conn)
    np.testing.assert_allclose(got.obs["latent_time"], lt, atol=1e-6)
    assert spearmanr(got.obs["latent_time"], expected.obs["latent_time"])[0] > 0.999


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """40 genes of the bundled sample (1,000 cells, preprocessed, with a UMAP) as a .zarr store."""
    from explorer.data.samples import load_sample

    path = tmp_path_factory.mktemp("small") / "sample.zarr"
    load_sample("default")[:, :40].copy().write_zarr(path)
    return path


def test_dask_cluster_of_two_equals_one_process(small_store, raw_store, tmp_path):
    """The streamed fit and the streamed preprocessing on a LocalCluster of 2 workers equal one process."""
    # raw counts are preprocessed first when fit_streamed is not told otherwise; a prepared store is not
    assert _needs_preprocessing(raw_store, "spliced") and not _needs_preprocessing(small_store, "spliced")
    prep = {"n_top_genes": 80, "compute_umap": False, "cells_per_task": 500}
    here = ad.read_zarr(prepare_streamed(raw_store, tmp_path / "here.zarr", **prep).out)
    params = {"batch_size": 8, "max_iter": 3, "fit_t_on": False, "genes": "all"}
    # the single-process run through the command line (a .zarr input streams)
    flags = [f"--param={k}={v}" for k, v in params.items()]
    assert main(["fit", str(small_store), "--model", "dynamical", "-o", str(tmp_path / "local.zarr"), "-q", *flags]) == 0
    local = ad.read_zarr(tmp_path / "local.zarr")
    environ = dict(os.environ)
    with dask_client(n_workers=2) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        # the nannies' thread limits (OMP_NUM_THREADS=1 ...) are not left in this process
        assert dict(os.environ) == environ
        summary = fit_streamed(
            small_store, tmp_path / "dask.zarr", model_params=params, genes_per_task=16, client=client
        )
        there = ad.read_zarr(prepare_streamed(raw_store, tmp_path / "there.zarr", client=client, **prep).out)
    # preprocessing: per-block values identical; the PCA's Gram sums added in another order
    for key in ("spliced", "unspliced"):
        np.testing.assert_array_equal(there.layers[key], here.layers[key], err_msg=key)
    assert list(there.var_names) == list(here.var_names)
    np.testing.assert_allclose(there.obsm["X_pca"], here.obsm["X_pca"], atol=1e-5)
    assert (there.obsp["distances"] != here.obsp["distances"]).nnz == 0
    on_dask = ad.read_zarr(summary.out)
    assert summary.n_fitted == 40  # three fit tasks, three graph tasks, reduced as a tree
    for key in ("velocity", "velocity_u", "fit_t"):
        np.testing.assert_array_equal(on_dask.layers[key], local.layers[key], err_msg=key)
    for key in ("velocity_graph", "velocity_graph_neg", "T_fwd"):
        np.testing.assert_allclose(_dense(on_dask.obsp[key]), _dense(local.obsp[key]), atol=1e-7, err_msg=key)
    for col in ("latent_time", "root_cells", "velocity_confidence", "velocity_confidence_transition"):
        np.testing.assert_allclose(on_dask.obs[col], local.obs[col], atol=1e-6, err_msg=col)
    np.testing.assert_allclose(on_dask.obsm["velocity_umap"], local.obsm["velocity_umap"], atol=1e-6)


def test_bad_input_is_explained(small_store, tmp_path, capsys):
    source = tmp_path / "no_graph.zarr"
    no_graph = ad.read_zarr(small_store)[:, :5].copy()
    del no_graph.obsp["distances"]
    no_graph.write_zarr(source)
    with pytest.raises(InputError, match="no neighbour graph"):
        fit_streamed(source, tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()
    with pytest.raises(InputError, match="never overwrites its input"):
        fit_streamed(source, source)
    assert main(["fit", str(source), "--model", "stochastic", "-o", str(tmp_path / "x.zarr")]) != 0
    assert "dynamical model only" in capsys.readouterr().err
    # the streamed preprocessing: a missing layer and negative counts are named, nothing is written
    del no_graph.layers["unspliced"]
    no_graph.write_zarr(tmp_path / "no_unspliced.zarr")
    with pytest.raises(InputError, match="layer 'unspliced' not found"):
        prepare_streamed(tmp_path / "no_unspliced.zarr", tmp_path / "prepared.zarr")
    negative = ad.AnnData(
        obs=no_graph.obs, var=no_graph.var,
        layers={"spliced": -np.ones(no_graph.shape, np.float32), "unspliced": np.ones(no_graph.shape, np.float32)},
    )  # fmt: skip
    negative.write_zarr(tmp_path / "negative.zarr")
    with pytest.raises(InputError, match="negative values"):
        prepare_streamed(tmp_path / "negative.zarr", tmp_path / "prepared.zarr", n_neighbors=5)
    assert not (tmp_path / "prepared.zarr").exists()


#: the raw pancreas file: counts in X, spliced, unspliced (CSR), no graph
RAW = "pancreas_endocrinogenesis_3696.h5ad"


def _same_preprocessing(got: ad.AnnData, want: ad.AnnData) -> None:
    """The streamed preprocessing's output against the in-memory one's (same cells, genes, values)."""
    assert list(got.var_names) == list(want.var_names)  # same filter and same variable genes
    for key in ("spliced", "unspliced"):
        np.testing.assert_allclose(_dense(got.layers[key]), _dense(want.layers[key]), rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(_dense(got.X), _dense(want.X), rtol=1e-6)
    for col in ("initial_size", "initial_size_spliced", "initial_size_unspliced", "n_counts"):
        np.testing.assert_allclose(got.obs[col], want.obs[col], rtol=1e-6, err_msg=col)
    for col in ("means", "dispersions", "dispersions_norm"):
        np.testing.assert_allclose(got.var[col], want.var[col], rtol=1e-5, err_msg=col)
    # the PCA from the streamed Gram matrix: scanpy's ARPACK components, signs included
    np.testing.assert_allclose(got.uns["pca"]["variance"], want.uns["pca"]["variance"], rtol=1e-5)
    np.testing.assert_allclose(got.obsm["X_pca"], want.obsm["X_pca"], atol=1e-3)
    # the kNN graph on it: the same neighbours but for near ties at float rounding
    a, b = got.obsp["distances"].tocsr(), want.obsp["distances"].tocsr()
    assert a.nnz == b.nnz
    differ = ((a > 0) != (b > 0)).nnz
    assert differ <= 1e-4 * b.nnz, differ
    # UMAP's weights from those distances (exponentials of the rounding): equal to 1e-3 but near the ties
    rows_equal = np.isclose(_dense(got.obsp["connectivities"]), _dense(want.obsp["connectivities"]), atol=1e-3).all(1)
    assert rows_equal.mean() > 0.99, rows_equal.mean()


def test_streamed_preprocessing_equals_in_memory_on_the_pancreas(pancreas_subset, shared_data, tmp_path):
    """Filter, normalise, log, variable genes, PCA and kNN over blocks of cells equal scVelo's pipeline in memory."""
    want, _ = pancreas_subset  # explorer.pipeline.prepare(n_top_genes=60) of the raw file
    summary = prepare_streamed(
        shared_data / RAW, tmp_path / "prepared.zarr", n_top_genes=60, compute_umap=False, cells_per_task=1000
    )
    assert (summary.n_vars_input, summary.n_vars) == (2000, 60)
    assert summary.n_vars_kept == 1126  # scVelo's min_shared_counts=20 on the pancreas
    _same_preprocessing(ad.read_zarr(summary.out), want)


@pytest.fixture(scope="module")
def raw_store(shared_data, tmp_path_factory):
    """1,500 cells of the raw pancreas counts as a .zarr store (CSR, as anndata writes them)."""
    path = tmp_path_factory.mktemp("raw") / "raw.zarr"
    ad.read_h5ad(shared_data / RAW)[:1500].copy().write_zarr(path)
    return path
