from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from explorer._types import InputError
from explorer.data.io import read
from explorer.data.preprocess import (
    filter_and_normalize,
    is_preprocessed,
    looks_like_counts,
    shared_counts,
    size_factors,
    x_is_logged,
)
from explorer.graph.moments import moments
from explorer.keys import Key
from explorer.pipeline import prepare


def test_shared_counts_by_hand():
    s = np.array([[1, 0, 2], [3, 4, 0], [0, 5, 1]], dtype=np.float32)
    u = np.array([[2, 1, 0], [1, 0, 7], [0, 1, 1]], dtype=np.float32)
    # gene 0: cells 0, 1 -> 1+2 + 3+1; gene 1: cell 2 -> 5+1; gene 2: cell 2 -> 1+1
    expected = [7.0, 6.0, 2.0]
    np.testing.assert_array_equal(shared_counts(s, u), expected)
    np.testing.assert_array_equal(shared_counts(sparse.csr_matrix(s), sparse.csr_matrix(u)), expected)


def test_size_factors_by_hand():
    # median 4: divisors size/4; an empty cell keeps divisor 1
    np.testing.assert_allclose(size_factors(np.array([2.0, 4.0, 8.0, 0.0, 6.0])), [0.5, 1.0, 2.0, 1.0, 1.5])


def test_filter_and_normalize_by_hand():
    s = np.array([[4, 0, 1], [1, 3, 2], [2, 1, 0], [5, 0, 1]], dtype=np.float32)
    u = np.array([[2, 0, 1], [1, 1, 0], [1, 0, 0], [3, 0, 0]], dtype=np.float32)
    adata = ad.AnnData(
        X=sparse.csr_matrix(s),
        obs=pd.DataFrame(index=list("abcd")),
        var=pd.DataFrame(index=["g0", "g1", "g2"]),
        layers={"spliced": sparse.csr_matrix(s), "unspliced": sparse.csr_matrix(u)},
    )
    # shared counts: g0 = 6+2+3+8 = 19, g1 = 4, g2 = 2 -> only g0 passes 10
    filter_and_normalize(adata, min_shared_counts=10, n_top_genes=None, log=False)
    assert list(adata.var_names) == ["g0"]
    # sizes before filtering: spliced 5, 6, 3, 6 (median 5.5); unspliced 3, 2, 1, 3 (median 2.5)
    np.testing.assert_array_equal(adata.obs[Key.obs.INITIAL_SIZE_SPLICED], [5, 6, 3, 6])
    np.testing.assert_allclose(
        adata.layers["spliced"].toarray().ravel(), [4 * 5.5 / 5, 5.5 / 6, 2 * 5.5 / 3, 5 * 5.5 / 6], rtol=1e-6
    )
    np.testing.assert_allclose(
        adata.layers["unspliced"].toarray().ravel(), [2 * 2.5 / 3, 2.5 / 2, 2.5, 3 * 2.5 / 3], rtol=1e-6
    )
    np.testing.assert_allclose(adata.obs[Key.obs.N_COUNTS], adata.X.toarray().ravel())


def test_x_sharing_memory_with_spliced_is_normalised_once(counts_adata):
    counts_adata.X = counts_adata.layers["spliced"]  # the same object, not a copy
    raw = counts_adata.layers["spliced"].toarray()
    filter_and_normalize(counts_adata, min_shared_counts=0, n_top_genes=None, log=False)
    size = raw.sum(1)
    expected = raw / (size / np.median(size))[:, None]
    np.testing.assert_allclose(counts_adata.layers["spliced"].toarray(), expected, rtol=1e-6)
    np.testing.assert_allclose(counts_adata.X.toarray(), expected, rtol=1e-6)


def test_log1p_and_gene_selection(counts_adata):
    raw = counts_adata.layers["spliced"].toarray()
    filter_and_normalize(counts_adata, min_shared_counts=0, n_top_genes=5)
    # scanpy's seurat flavour keeps every gene tied with the 5th largest normalised
    # dispersion (genes alone in a mean bin all get 1), so ties may add one or two
    assert 5 <= counts_adata.n_vars < 12
    dispersion = counts_adata.var["dispersions_norm"]
    assert (dispersion >= np.sort(dispersion)[-5]).all()
    assert counts_adata.var[Key.var.HIGHLY_VARIABLE].all()
    assert Key.uns.LOG1P in counts_adata.uns
    idx = [int(g.removeprefix("gene")) for g in counts_adata.var_names]
    size = raw.sum(1)
    expected = np.log1p(raw[:, idx] / (size / np.median(size))[:, None])
    np.testing.assert_allclose(counts_adata.X.toarray(), expected, rtol=1e-5)


def test_no_genes_left(counts_adata):
    with pytest.raises(
        InputError, match=r"no genes left after filtering: none of the 12 genes .*min_shared_counts=100000"
    ):
        filter_and_normalize(counts_adata, min_shared_counts=100_000)


def test_fewer_cells_than_neighbors(counts_adata):
    with pytest.raises(InputError, match=r"too few cells: found 40, fewer than n_neighbors=50"):
        prepare(counts_adata, n_neighbors=50)


def test_looks_like_counts():
    assert looks_like_counts(sparse.csr_matrix(np.array([[1.0, 0.0], [2.0, 3.0]])))
    assert not looks_like_counts(np.array([[1.5, 0.0], [2.0, 3.0]]))


def test_pancreas_genes_match_scvelo(shared_data, reference_dir):
    """scVelo 0.3.4 + scanpy (reference README, step 1) keep 1,126 of the 2,000 genes."""
    adata = read(shared_data / "pancreas_endocrinogenesis_3696.h5ad")
    filter_and_normalize(adata)
    reference = pd.read_csv(reference_dir / "pancreas_3696_scvelo_genes.csv", index_col=0).index
    shared = adata.var_names.intersection(reference)
    assert len(reference) == 1126
    assert len(shared) / len(reference) >= 0.95
    assert adata.n_vars == len(shared) == 1126  # in fact all of them, and nothing else


def test_pancreas_739_genes_match_scvelo(shared_data, reference_dir):
    adata = read(shared_data / "pancreas_veloviz_739.h5ad")
    filter_and_normalize(adata)
    reference = pd.read_csv(reference_dir / "pancreas_739_scvelo_genes.csv", index_col=0).index
    assert adata.n_vars == 2000
    assert len(adata.var_names.intersection(reference)) == 2000
    # more than 3,000 genes pass the shared-counts filter, so scVelo's gene_count_corr is set
    assert Key.var.GENE_COUNT_CORR in adata.var


@pytest.mark.parametrize("name", ["pancreas_50obs", "dentategyrus_50obs"])
def test_raw_pipeline_matches_scvelo_fixture(shared_data, name):
    """scVelo's fixtures: filter_and_normalize(min_shared_counts=20, n_top_genes=200), moments(30, 30)."""
    fixture = ad.read_h5ad(shared_data / "scvelo_tests" / f"{name}_preprocessed.h5ad")
    adata = read(shared_data / "scvelo_tests" / f"{name}.h5ad")
    prepare(adata, n_top_genes=200, compute_umap=False)
    assert list(adata.var_names) == list(fixture.var_names)
    for key in (
        Key.obs.INITIAL_SIZE,
        Key.obs.INITIAL_SIZE_SPLICED,
        Key.obs.INITIAL_SIZE_UNSPLICED,
        Key.obs.N_COUNTS,
    ):
        np.testing.assert_array_equal(adata.obs[key].to_numpy(), fixture.obs[key].to_numpy())
    for key in ("spliced", "unspliced"):
        np.testing.assert_array_equal(adata.layers[key].toarray(), fixture.layers[key].toarray())
    np.testing.assert_allclose(adata.X.toarray(), fixture.X.toarray(), rtol=1e-6)
    # same neighbour sets (the PCA agrees to ARPACK's tolerance, the graph exactly)
    ours, theirs = adata.obsp[Key.obsp.CONNECTIVITIES], fixture.obsp[Key.obsp.CONNECTIVITIES]
    assert ((ours > 0) != (theirs > 0)).nnz == 0
    np.testing.assert_allclose(
        adata.layers[Key.layers.MS], fixture.layers[Key.layers.MS], rtol=1e-6, atol=1e-6
    )
    # bit-identical with the fixture's fused multiply-add arithmetic (see moments(fused=))
    fused = moments(ours, adata.layers["spliced"], fused=True)
    np.testing.assert_array_equal(fused, fixture.layers[Key.layers.MS])


def test_preprocessed_data_not_normalised_twice(shared_data):
    path = shared_data / "scvelo_tests" / "pancreas_50obs_preprocessed.h5ad"
    original = ad.read_h5ad(path)
    adata = read(path)
    assert is_preprocessed(adata)
    prepare(adata)
    assert adata.shape == original.shape
    for key in ("spliced", "unspliced"):
        np.testing.assert_array_equal(adata.layers[key].toarray(), original.layers[key].toarray())
    for key in (Key.layers.MS, Key.layers.MU):
        np.testing.assert_array_equal(adata.layers[key], original.layers[key])
    np.testing.assert_array_equal(adata.X.toarray(), original.X.toarray())
    assert adata.uns[Key.uns.PREPROCESS]["normalized"] is False
    assert adata.obsm[Key.obsm.UMAP].shape == (50, 2)


def test_prepare_raw_adds_everything(shared_data, progress_log):
    log, callback = progress_log
    adata = read(shared_data / "scvelo_tests" / "pancreas_50obs.h5ad")
    prepare(adata, n_top_genes=200, n_neighbors=30, seed=0, progress=callback)
    assert adata.obsm[Key.obsm.UMAP].shape == (50, 2)
    assert np.isfinite(adata.obsm[Key.obsm.UMAP]).all()
    assert adata.layers[Key.layers.MS].dtype == np.float32
    assert adata.uns[Key.uns.PREPROCESS]["normalized"] is True
    assert adata.uns[Key.uns.PREPROCESS]["n_neighbors"] == 30
    assert [p.step for p in log] == [0, 1, 2, 3, 4]
    assert log[-1].fraction == 1.0
    # seeded: a second run gives the same embedding
    again = read(shared_data / "scvelo_tests" / "pancreas_50obs.h5ad")
    prepare(again, n_top_genes=200)
    np.testing.assert_allclose(again.obsm[Key.obsm.UMAP], adata.obsm[Key.obsm.UMAP])


def _continuous(seed: int = 0) -> ad.AnnData:
    """scVelo's simulator kind of data: non-integer values, X = spliced, some far above 88."""
    rng = np.random.default_rng(seed)
    n_obs, n_vars = 60, 20
    rates = rng.uniform(0.5, 20, n_vars)
    scale_s, scale_u = rng.uniform(0.3, 9.0, n_vars), rng.uniform(0.3, 9.0, n_vars)
    s = rng.poisson(rates, (n_obs, n_vars)) * scale_s + rng.uniform(0, 1, (n_obs, n_vars))
    u = rng.poisson(rates / 3, (n_obs, n_vars)) * scale_u + rng.uniform(0, 1, (n_obs, n_vars))
    return ad.AnnData(
        X=s.copy(),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(n_obs)]),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)]),
        layers={"spliced": s, "unspliced": u},
    )


def test_non_integer_data_as_scvelo_pipeline():
    """As scVelo 0.3.4's ``filter_and_normalize`` + ``sc.pp.log1p`` + seurat HVG: the layers are
    left as they are (they do not look like counts), X is logged, the genes are scanpy's pick.

    Checked against scVelo 0.3.4 itself on such data (same genes, identical X) when written;
    here against scanpy's own log1p and gene selection, which are what that pipeline runs.
    """
    import scanpy as sc

    adata = _continuous()
    assert adata.X.max() > 100  # expm1 of unlogged X would overflow float32
    raw_s, raw_u = adata.layers["spliced"].copy(), adata.layers["unspliced"].copy()
    expected = adata.copy()
    keep = shared_counts(raw_s, raw_u) >= 20
    expected = expected[:, keep].copy()
    sc.pp.log1p(expected)
    sc.pp.highly_variable_genes(expected, flavor="seurat", n_top_genes=8, subset=True)

    filter_and_normalize(adata, n_top_genes=8)
    assert list(adata.var_names) == list(expected.var_names)
    np.testing.assert_allclose(np.asarray(adata.X), np.asarray(expected.X), rtol=1e-6)
    assert Key.uns.LOG1P in adata.uns
    idx = [int(g.removeprefix("gene")) for g in adata.var_names]
    np.testing.assert_array_equal(adata.layers["spliced"], raw_s[:, idx])  # not normalised
    np.testing.assert_array_equal(adata.layers["unspliced"], raw_u[:, idx])


def test_non_integer_x_sharing_memory_with_spliced_is_not_logged_in_place():
    adata = _continuous()
    adata.X = adata.layers["spliced"]  # the same object
    raw = adata.layers["spliced"].copy()
    filter_and_normalize(adata, min_shared_counts=0, n_top_genes=None)
    np.testing.assert_array_equal(adata.layers["spliced"], raw)
    np.testing.assert_allclose(adata.X, np.log1p(raw))


def test_logged_x_is_not_logged_again():
    # marked by scanpy
    adata = _continuous()
    adata.X = np.log1p(adata.X)
    adata.uns[Key.uns.LOG1P] = {"base": None}
    before = adata.X.copy()
    filter_and_normalize(adata, min_shared_counts=0, n_top_genes=None)
    np.testing.assert_array_equal(adata.X, before)
    # logged by another tool without the marker: not the spliced values, and small
    adata = _continuous()
    adata.X = np.log1p(adata.X / adata.X.sum(1, keepdims=True) * 1e4)
    assert x_is_logged(adata)
    before = adata.X.copy()
    filter_and_normalize(adata, min_shared_counts=0, n_top_genes=None)
    np.testing.assert_array_equal(adata.X, before)


def test_normalised_elsewhere_x_is_logged():
    """Counts per 10,000 without log: not the spliced values, but far above any log1p."""
    adata = _continuous()
    adata.X = adata.X / adata.X.sum(1, keepdims=True) * 1e4
    assert not x_is_logged(adata)
    raw = adata.X.copy()
    filter_and_normalize(adata, min_shared_counts=0, n_top_genes=None)
    np.testing.assert_allclose(adata.X, np.log1p(raw), rtol=1e-6)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.X.__setitem__((0, 0), np.nan), "X has 1 non-finite values"),
        (lambda a: a.X.__setitem__((0, 0), 1e20), "X has values up to 1e\\+20"),
        (lambda a: setattr(a, "X", np.full(a.shape, 2.0)), "same value in all 60 cells"),
    ],
)
def test_unusable_x_is_an_input_error(change, match):
    adata = _continuous()
    change(adata)
    with pytest.raises(InputError, match=match):
        filter_and_normalize(adata, min_shared_counts=0)


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("n_pcs", 0, "n_pcs must be at least 1"),
        ("n_neighbors", 1, "n_neighbors must be at least 2"),
        ("min_shared_counts", -1, "min_shared_counts must be at least 0"),
        ("n_top_genes", 0, "n_top_genes must be at least 1"),
        ("n_pcs", 2.5, "n_pcs must be a whole number"),
    ],
)
def test_prepare_checks_options_first(counts_adata, option, value, match):
    before = counts_adata.copy()
    with pytest.raises(InputError, match=match):
        prepare(counts_adata, **{option: value})
    assert counts_adata.shape == before.shape
    assert not counts_adata.obsm
    assert Key.obs.N_COUNTS not in counts_adata.obs


def test_keeping_genes_gives_anndatas_own_subset():
    """``_keep_genes`` (the lean gene subset) equals AnnData's ``_inplace_subset_var`` in every part."""
    from explorer.data.preprocess import _keep_genes

    rng = np.random.default_rng(0)
    n_obs, n_vars = 40, 12
    counts = sparse.random(n_obs, n_vars, density=0.4, format="csr", random_state=0, dtype=np.float32)
    adata = ad.AnnData(
        X=counts.copy(),
        obs=pd.DataFrame({"c": rng.integers(0, 3, n_obs)}, index=[f"c{i}" for i in range(n_obs)]),
        var=pd.DataFrame({"g": np.arange(n_vars)}, index=[f"g{j}" for j in range(n_vars)]),
        layers={"spliced": counts.copy(), "unspliced": counts.toarray() * 2},
        obsm={"X_pca": rng.normal(size=(n_obs, 3))},
        varm={
            "loadings": rng.normal(size=(n_vars, 3)),
            "table": pd.DataFrame({"a": np.arange(n_vars)}, index=[f"g{j}" for j in range(n_vars)]),
        },
        obsp={"connectivities": sparse.identity(n_obs, format="csr")},
        varp={"corr": rng.normal(size=(n_vars, n_vars))},
        uns={"note": "kept"},
    )
    keep = rng.random(n_vars) > 0.4
    lean, reference = adata.copy(), adata.copy()
    _keep_genes(lean, keep)
    reference._inplace_subset_var(keep)
    assert lean.shape == reference.shape == (n_obs, int(keep.sum()))
    pd.testing.assert_frame_equal(lean.var, reference.var)
    pd.testing.assert_frame_equal(lean.obs, reference.obs)
    np.testing.assert_array_equal(lean.X.toarray(), reference.X.toarray())
    for key in adata.layers:
        a, b = lean.layers[key], reference.layers[key]
        assert type(a) is type(b)
        dense = [m.toarray() if sparse.issparse(m) else m for m in (a, b)]
        np.testing.assert_array_equal(*dense)
    np.testing.assert_array_equal(lean.varm["loadings"], reference.varm["loadings"])
    pd.testing.assert_frame_equal(lean.varm["table"], reference.varm["table"])
    np.testing.assert_array_equal(lean.varp["corr"], reference.varp["corr"])
    np.testing.assert_array_equal(lean.obsm["X_pca"], reference.obsm["X_pca"])
    assert (lean.obsp["connectivities"] != reference.obsp["connectivities"]).nnz == 0
    assert lean.uns["note"] == "kept"
