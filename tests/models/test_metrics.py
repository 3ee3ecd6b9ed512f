"""Metrics of a fitted model, against values computed by hand, and ``model_metrics``' table."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from explorer.keys import Key
from explorer.models.metrics import gene_likelihood, latent_time_spearman, model_metrics, reconstruction_error


def test_latent_time_spearman_by_hand():
    # ranks (1, 2, 3, 4) against (1, 3, 2, 4): d = (0, 1, 1, 0), rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert latent_time_spearman(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 3, 2, 4])) == pytest.approx(0.8)
    assert latent_time_spearman(np.array([0.1, 0.2, 0.3]), np.array(["0", "1", "2"])) == pytest.approx(1.0)
    # NaN capture times are left out; a constant time has no correlation
    assert latent_time_spearman(np.array([0.1, 0.2, 0.3, 0.9]), np.array([3, 2, 1, np.nan])) == pytest.approx(
        -1.0
    )
    assert np.isnan(latent_time_spearman(np.array([0.5, 0.5, 0.5]), np.array([1, 2, 3])))


def test_reconstruction_error_by_hand():
    Mu = np.array([[1.0], [2.0]])
    Ms = np.array([[1.0], [1.0]])
    err = reconstruction_error(Mu, Ms, Mu + np.array([[1.0], [-1.0]]), Ms + np.array([[0.0], [2.0]]))
    # residuals (u, s): cell 0 (-1, 0), cell 1 (1, -2): MSE mean(1 + 0, 1 + 4) = 3; MAE mean(1, 3) = 2
    assert err.summary["mse_train"] == pytest.approx(3.0)
    assert err.summary["mae_train"] == pytest.approx(2.0)
    # noise = root mean square residual: sigma_u = 1, sigma_s = sqrt(2)
    sigma_s = np.sqrt(2)
    ll = [
        -0.5 * (1 + 0) - np.log(sigma_s) - np.log(2 * np.pi),
        -0.5 * (1 + 4 / 2) - np.log(sigma_s) - np.log(2 * np.pi),
    ]
    assert err.summary["loglik_train"] == pytest.approx(np.mean(ll))


def _four_cells() -> ad.AnnData:
    """Cells A0, A1 at x=0 and B0, B1 at x=1 (three genes); every cell's kNN holds the other three."""
    ms = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 0]], dtype=np.float32)
    dist = sparse.csr_matrix(
        np.array([[0, 1, 1, 1.4], [1, 0, 1.4, 1], [1, 1.4, 0, 1], [1.4, 1, 1, 0]], dtype=np.float32)
    )
    adata = ad.AnnData(
        X=ms,
        obs=pd.DataFrame({Key.obs.CLUSTERS: ["A", "A", "B", "B"]}, index=["A0", "A1", "B0", "B1"]),
    )
    adata.layers[Key.layers.MS] = ms
    adata.obsp[Key.obsp.DISTANCES] = dist
    adata.obs["day"] = [0, 1, 2, 3]
    adata.obs[Key.obs.LATENT_TIME] = [0.0, 0.2, 0.1, 0.9]
    return adata


def test_model_metrics_by_hand():
    adata = _four_cells()
    # A cells move along gene 0, B cells along gene 1
    adata.layers[Key.layers.VELOCITY] = np.array(
        [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]], dtype=np.float32
    )
    m = model_metrics(adata, transitions=[("A", "B")], time_key="day")
    s = m.summary
    # CBDir by hand (Pearson r over 3 genes): A0 -> B0 (1,0,0): 1, A0 -> B1 (1,1,0): 0.5;
    # A1 -> B0 (1,-1,0): sqrt(3)/2, A1 -> B1 (1,0,0): 1
    assert s["cbdir[A>B]"] == pytest.approx(((1 + 0.5) / 2 + (np.sqrt(3) / 2 + 1) / 2) / 2, abs=1e-5)
    assert s["cbdir"] == pytest.approx(s["cbdir[A>B]"])
    # same-cluster neighbours have the same velocity: ICVCoh 1 in both clusters
    assert s["icvcoh[A]"] == pytest.approx(1.0)
    assert s["icvcoh[B]"] == pytest.approx(1.0)
    # overall consistency: each cell has 1 parallel and 2 orthogonal neighbours -> 1/3
    assert s["consistency"] == pytest.approx(1 / 3)
    # cell-type-wise: every cell is parallel to its type's mean unit velocity -> 1
    assert s["consistency_type"] == pytest.approx(1.0)
    # latent time ranks (1, 3, 2, 4) against days (1, 2, 3, 4): rho = 0.8
    assert s["latent_time_spearman"] == pytest.approx(0.8)
    # no model here predicts (u, s): reconstruction is NaN, not an error
    assert np.isnan(s["mse"])
    assert list(m.per_cluster.index) == ["A", "B"]
    assert m.per_cluster["n_cells"].tolist() == [2, 2]


def test_model_metrics_reuses_the_pipeline_figures(sample_adata):
    """On the sample (stochastic fit): confidence as the pipeline wrote it, CBDir as the library's."""
    from explorer.graph.metrics import cross_boundary_correctness

    m = model_metrics(sample_adata, transitions=[("A_2", "A_3")])
    stored = sample_adata.obs[Key.obs.VELOCITY_CONFIDENCE].to_numpy()
    np.testing.assert_allclose(m.per_cell[Key.obs.VELOCITY_CONFIDENCE].to_numpy(), stored, atol=1e-5)
    genes = sample_adata.var[Key.var.VELOCITY_GENES].to_numpy(bool)
    direct = cross_boundary_correctness(
        sample_adata, sample_adata.layers[Key.layers.VELOCITY], source="A_2", target="A_3", genes=genes
    )
    assert m.summary["cbdir[A_2>A_3]"] == pytest.approx(direct)
    with pytest.raises(ValueError, match="not in obs"):
        model_metrics(sample_adata, transitions=[("A_2", "Z")])


def test_gene_likelihood_ranks_fits_not_expression_levels():
    """ScVelo's likelihood of predictions is the same for a gene at 1/100 of the counts; a density is not.

    Gene 1 is gene 0 at 1/100 of its counts with the same relative residuals; gene 2 has
    twice the residuals. VeloVAE's ``fit_likelihood`` was the density in counts until
    2026-12-05: it ranked gene 1 about 10^4 times above gene 0, and the app showed first the
    genes of least unspliced RNA.
    """
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 400)
    u, s = 1 + np.sin(3 * t), 1 + np.sin(3 * t - 0.5)
    noise_u, noise_s = rng.normal(0, 0.05, t.size), rng.normal(0, 0.05, t.size)
    Mu = np.column_stack([u + noise_u, 0.01 * (u + noise_u), u + 2 * noise_u])
    Ms = np.column_stack([s + noise_s, 0.01 * (s + noise_s), s + 2 * noise_s])
    u_hat, s_hat = np.column_stack([u, 0.01 * u, u]), np.column_stack([s, 0.01 * s, s])
    like = gene_likelihood(Mu, Ms, u_hat, s_hat)
    assert like[0] == pytest.approx(like[1], rel=1e-9)
    assert like[0] > like[2]
    density = np.exp(reconstruction_error(Mu, Ms, u_hat, s_hat).per_gene["loglik_train"].to_numpy())
    assert density[1] > 1e3 * density[0]  # noqa: PLR2004 - what it replaced
    assert np.isnan(gene_likelihood(np.ones((5, 1)), np.ones((5, 1)), np.ones((5, 1)), np.ones((5, 1))))[0]


def _float32_fit(rng: np.random.Generator, n: int, m: int) -> tuple[np.ndarray, ...]:
    """``(Mu, Ms, u_hat, s_hat)``, ``(n, m)`` float32: gamma-distributed moments, predictions off by noise."""
    Mu = rng.gamma(2, 1, (n, m)).astype(np.float32)
    Ms = rng.gamma(2, 2, (n, m)).astype(np.float32)
    u_hat = (Mu + rng.normal(0, 0.3, (n, m))).astype(np.float32)
    s_hat = (Ms + rng.normal(0, 0.5, (n, m))).astype(np.float32)
    return Mu, Ms, u_hat, s_hat


def test_reconstruction_error_in_blocks_of_genes_is_the_error_at_once(monkeypatch):
    """A block of genes at a time in float64 (the inputs are float32): each gene's figures the same to
    the bit; the summary and each cell's, summed over blocks, to float64 rounding."""
    from explorer.models import metrics

    rng = np.random.default_rng(3)
    n, m = 120, 9
    Mu, Ms, u_hat, s_hat = _float32_fit(rng, n, m)
    s_hat[:, 4] = np.nan  # a gene not predicted
    train = rng.random(n) < 0.7
    whole = reconstruction_error(Mu, Ms, u_hat, s_hat, train=train)
    assert metrics._BLOCK_ENTRIES >= n * m
    monkeypatch.setattr(metrics, "_BLOCK_ENTRIES", 2 * n)  # two genes a block
    blocked = reconstruction_error(Mu, Ms, u_hat, s_hat, train=train)
    assert blocked.summary == pytest.approx(whole.summary, rel=1e-12)
    pd.testing.assert_frame_equal(blocked.per_gene, whole.per_gene, check_exact=True)
    pd.testing.assert_frame_equal(blocked.per_cell, whole.per_cell, check_exact=False, rtol=1e-12)
    # each cell's MSE by hand, over the predicted genes
    ok = np.arange(m) != 4
    r = (Mu.astype(float) - u_hat) ** 2 + (Ms.astype(float) - s_hat) ** 2
    np.testing.assert_allclose(blocked.per_cell["mse"], r[:, ok].mean(1), rtol=1e-12)
    assert np.isnan(whole.per_gene["mse_test"].iloc[4]) and whole.summary["n_genes"] == m - 1
    # the held-out MSE by hand, in float64
    assert whole.summary["mse_test"] == pytest.approx(r[np.ix_(~train, ok)].mean(), rel=1e-12)


def test_gene_likelihood_in_blocks_of_genes_and_on_chosen_cells(monkeypatch):
    """Blocks of genes give each gene's likelihood to the bit; ``cells=`` is the likelihood on those rows."""
    from explorer.models import metrics

    rng = np.random.default_rng(4)
    n, m = 150, 7
    Mu, Ms, u_hat, s_hat = _float32_fit(rng, n, m)
    cells = rng.random(n) < 0.6
    whole = gene_likelihood(Mu, Ms, u_hat, s_hat)
    on_rows = gene_likelihood(Mu[cells], Ms[cells], u_hat[cells], s_hat[cells])
    monkeypatch.setattr(metrics, "_BLOCK_ENTRIES", 3 * n)  # blocks of 3 and 4 genes (1 left joins)
    np.testing.assert_array_equal(gene_likelihood(Mu, Ms, u_hat, s_hat), whole)
    np.testing.assert_array_equal(gene_likelihood(Mu, Ms, u_hat, s_hat, cells=cells), on_rows)
    assert not np.allclose(on_rows, whole)  # the cells matter
    # gene 0 by hand (scVelo's formula, in float64)
    su, ss = Mu[cells, 0].astype(float).std(), Ms[cells, 0].astype(float).std()
    du = (u_hat[cells, 0].astype(float) - Mu[cells, 0]) / su
    ds = (s_hat[cells, 0].astype(float) - Ms[cells, 0]) / ss
    d2 = du**2 + ds**2
    varx = d2.mean() - (np.sign(ds) * np.sqrt(d2)).mean() ** 2
    by_hand = np.exp(-0.5 * d2.mean() / varx - 0.5 * np.log(2 * np.pi * varx))
    assert on_rows[0] == pytest.approx(by_hand, rel=1e-12)
