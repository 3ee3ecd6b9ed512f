"""DeepVelo (per-cell rates from a GCN) against kinetics with two regimes, and its parts by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from anndata import AnnData
from scipy import sparse
from sklearn.metrics import roc_auc_score

from explorer import kinetics
from explorer._types import FitCancelled, InputError
from explorer.graph.metrics import velocity_consistency, velocity_consistency_by_type
from explorer.keys import Key
from explorer.models import MODELS, get_model
from explorer.models._gcn_module import VeloGCN, candidate_targets
from explorer.models.gcn import DeepVelo, _Blocks, _normalized_adjacency, compute_rate_umap
from explorer.pipeline import prepare

#: epochs of the fits on the two-lineage simulations (the default is 100)
EPOCHS = 60


def two_lineages(
    *, phases: str, n_per: int = 200, n_markers: int = 20, n_regime: int = 3, seed: int = 0
) -> AnnData:
    """Two lineages, each with its own marker genes, and regime genes with 4x the gamma in lineage B.

    The marker genes (on/off kinetics, expressed in one lineage only) keep the lineages
    apart in PCA space, so no neighbourhood mixes the two regimes.

    - ``phases="split"``: lineage A induces the regime genes from t = 0 (gamma 0.15),
      lineage B represses them from its steady state (gamma 0.6). One gamma per gene
      puts the steady-state line between the two, below A's late induction.
    - ``phases="both"``: both lineages induce them until t = 10, then repress
      (gamma 0.1 in A, 0.4 in B, beta 1), so each lineage's ratio is visible.

    Counts are Poisson around the ODE's abundances (``explorer.kinetics``); the true
    velocity is in ``layers['true_velocity']``, the lineage in ``obs['true_regime']``.
    """
    rng = np.random.default_rng(seed)
    n = 2 * n_per
    t = rng.uniform(0, 20, n)
    lineage = np.repeat([0, 1], n_per)
    g = 2 * n_markers + n_regime
    own = np.full(g, -1)
    own[:n_markers], own[n_markers : 2 * n_markers] = 0, 1
    gamma = np.exp(rng.uniform(np.log(0.2), np.log(0.6), g))
    beta = np.exp(rng.uniform(np.log(1.0), np.log(3.0), g))
    alpha = np.exp(rng.uniform(np.log(5), np.log(50), g)) * gamma
    t_on = rng.uniform(-5, 5, g)
    t_ = t_on + rng.uniform(8, 12, g)
    reg = np.arange(2 * n_markers, g)
    t_on_c = np.broadcast_to(t_on, (n, g)).copy()
    t_c = np.broadcast_to(t_, (n, g)).copy()
    if phases == "split":
        gamma[reg], alpha[reg] = 0.15, 3.0
        a, b = lineage == 0, lineage == 1
        t_on_c[np.ix_(a, reg)], t_c[np.ix_(a, reg)] = 0.0, 100.0
        t_on_c[np.ix_(b, reg)], t_c[np.ix_(b, reg)] = -100.0, 0.0
    else:
        gamma[reg], alpha[reg], beta[reg] = 0.1, 2.0, 1.0
        t_on_c[:, reg], t_c[:, reg] = 0.0, 10.0
    alpha_c = np.where((own[None] == -1) | (own[None] == lineage[:, None]), alpha[None], 0.0)
    gamma_c = np.broadcast_to(gamma, (n, g)).copy()
    gamma_c[np.ix_(lineage == 1, reg)] *= 4.0
    u, s = kinetics.trajectory(t[:, None], t_c, alpha_c, beta, gamma_c, t_on=t_on_c)
    size = np.exp(rng.normal(0, 0.1, n))
    S = sparse.csr_matrix(rng.poisson(s * size[:, None]).astype(np.float32))
    U = sparse.csr_matrix(rng.poisson(u * size[:, None]).astype(np.float32))
    obs = pd.DataFrame(
        {
            Key.obs.CLUSTERS: pd.Categorical(np.where(lineage == 0, "A", "B")),
            Key.obs.TRUE_REGIME: lineage,
            Key.obs.TRUE_T: t,
        },
        index=[f"cell_{i:04d}" for i in range(n)],
    )
    var = pd.DataFrame(
        {Key.var.TRUE_KIND: np.where(own == -1, "two_regimes", "standard")},
        index=[f"gene_{j:03d}" for j in range(g)],
    )
    layers = {
        Key.layers.SPLICED: S,
        Key.layers.UNSPLICED: U,
        Key.layers.TRUE_VELOCITY: kinetics.velocity(u, s, beta, gamma_c).astype(np.float32),
    }
    return AnnData(X=S.copy(), obs=obs, var=var, layers=layers)


def _prepared(phases: str) -> AnnData:
    adata = two_lineages(phases=phases)
    prepare(adata, n_neighbors=30, compute_umap=False)
    return adata


@pytest.fixture(scope="module")
def split():
    """two_lineages(phases="split"), prepared (30 neighbours, no UMAP), with a DeepVelo fit."""
    adata = _prepared("split")
    model = DeepVelo(genes="all", epochs=EPOCHS, seed=0)
    return adata, model.fit(adata), model


@pytest.fixture(scope="module")
def both():
    """two_lineages(phases="both"), prepared (30 neighbours, no UMAP), with a DeepVelo fit."""
    adata = _prepared("both")
    return adata, DeepVelo(genes="all", epochs=EPOCHS, seed=0).fit(adata)


def _sign_accuracy(adata: AnnData, velocity: np.ndarray, regime: int) -> float:
    """Share of the regime genes' cells of one lineage whose velocity has the true sign.

    Cells whose true velocity is below a tenth of the gene's largest are left out: the
    sign of a velocity near a steady state is noise.
    """
    genes = np.flatnonzero(adata.var[Key.var.TRUE_KIND] == "two_regimes")
    cells = adata.obs[Key.obs.TRUE_REGIME].to_numpy() == regime
    true = adata.layers[Key.layers.TRUE_VELOCITY][np.ix_(cells, genes)]
    clear = np.abs(true) > 0.1 * np.abs(true).max(0)
    return float(np.mean(np.sign(velocity[np.ix_(cells, genes)][clear]) == np.sign(true[clear])))


def test_registered_with_cell_rates():
    assert "deepvelo" in MODELS
    assert MODELS.shows("deepvelo") == frozenset({"cell_rates"})
    assert isinstance(get_model("deepvelo"), DeepVelo)


def test_sign_in_both_regimes_where_one_rate_fails(split):
    adata, result, _ = split
    single = get_model("steady_state").fit(adata).velocity
    # one gamma per gene: A's late induction falls below the shared steady-state line
    assert _sign_accuracy(adata, single, 0) < 0.3
    assert _sign_accuracy(adata, single, 1) > 0.95
    # per-cell rates: most of A's induction gets its sign back, B's repression stays right
    assert _sign_accuracy(adata, result.velocity, 0) > _sign_accuracy(adata, single, 0) + 0.2
    assert _sign_accuracy(adata, result.velocity, 1) > 0.95


def test_gamma_separates_lineages(both):
    adata, result = both
    genes = np.flatnonzero(adata.var[Key.var.TRUE_KIND] == "two_regimes")
    lineage_b = adata.obs[Key.obs.TRUE_REGIME].to_numpy() == 1
    gamma = result.layers[Key.layers.RATE_GAMMA][:, genes]
    ratio = gamma / result.layers[Key.layers.RATE_BETA][:, genes]
    for j in range(len(genes)):
        # B's cells have the higher gamma (4x in truth) in per-cell rates
        assert roc_auc_score(lineage_b, gamma[:, j]) > 0.75
        assert roc_auc_score(lineage_b, ratio[:, j]) > 0.9


def test_outputs(split):
    adata, result, model = split
    n_obs, n_vars = adata.shape
    keys = (Key.layers.RATE_ALPHA, Key.layers.RATE_BETA, Key.layers.RATE_GAMMA)
    alpha, beta, gamma = (result.layers[k] for k in keys)
    for rate in (alpha, beta, gamma):
        assert rate.shape == (n_obs, n_vars)
        assert rate.dtype == np.float32
        assert (rate > 0).all()
    Mu, Ms = adata.layers[Key.layers.MU], adata.layers[Key.layers.MS]
    np.testing.assert_allclose(result.velocity, beta * Mu - gamma * Ms, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.velocity_u, alpha - beta * Mu, rtol=1e-5, atol=1e-6)
    medians = result.gene_params[Key.var.FIT_RATE_GAMMA]
    np.testing.assert_allclose(medians, np.median(gamma, axis=0), rtol=1e-6)
    # the consistency scores are the metric functions' on the velocity genes
    V = result.velocity[:, result.velocity_genes]
    np.testing.assert_allclose(
        result.obs[Key.obs.VELOCITY_CONSISTENCY_TYPE],
        velocity_consistency_by_type(V, adata.obs[Key.obs.CLUSTERS]),
        rtol=1e-6,
    )
    assert np.nanmean(result.obs[Key.obs.VELOCITY_CONSISTENCY]) > 0.5
    # training lowered the loss
    assert model.history_[-1]["total"] < model.history_[0]["total"]


def test_rates_only_for_fitted_genes(split):
    adata = split[0]
    genes = list(adata.var_names[:5])
    result = DeepVelo(genes=genes, epochs=2, seed=0).fit(adata)
    fitted = adata.var_names.isin(genes)
    for key in (Key.layers.RATE_ALPHA, Key.layers.RATE_BETA, Key.layers.RATE_GAMMA):
        assert np.isfinite(result.layers[key][:, fitted]).all()
        assert np.isnan(result.layers[key][:, ~fitted]).all()
    assert np.isnan(result.velocity[:, ~fitted]).all()
    assert np.isnan(result.gene_params[Key.var.FIT_RATE_BETA].to_numpy()[~fitted]).all()
    assert not result.velocity_genes[~fitted].any()
    copy = adata.copy()
    result.to_adata(copy)
    assert Key.layers.RATE_GAMMA in copy.layers
    assert Key.obs.VELOCITY_CONSISTENCY in copy.obs
    assert Key.var.FIT_RATE_ALPHA in copy.var


def test_few_epochs_reduce_the_loss(split, progress_log):
    log, callback = progress_log
    model = DeepVelo(epochs=5, seed=1)
    model.fit(split[0], progress=callback)
    totals = [h["total"] for h in model.history_]
    assert len(totals) == 5
    assert totals[-1] < totals[0]
    # one report per epoch, then the extraction
    assert [p.step for p in log] == [1, 2, 3, 4, 5, 6]
    assert {p.total for p in log} == {6}


def test_seeded(split):
    adata = split[0]
    a = DeepVelo(epochs=3, seed=5).fit(adata)
    b = DeepVelo(epochs=3, seed=5).fit(adata)
    c = DeepVelo(epochs=3, seed=6).fit(adata)
    np.testing.assert_array_equal(a.velocity, b.velocity)
    np.testing.assert_array_equal(a.layers[Key.layers.RATE_GAMMA], b.layers[Key.layers.RATE_GAMMA])
    assert not np.array_equal(a.velocity, c.velocity)


def test_cancel_leaves_adata(split):
    adata = split[0].copy()

    def cancel(p):
        if p.step == 2:
            raise FitCancelled

    with pytest.raises(FitCancelled):
        DeepVelo(epochs=10).fit(adata, progress=cancel)
    assert Key.layers.RATE_GAMMA not in adata.layers


def test_mini_batch_blocks_are_exact():
    """A mini-batch's rates equal the full graph's for its cells: its neighbourhood is complete."""
    rng = np.random.default_rng(0)
    n, k, g = 60, 5, 4
    indices = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    adj = _normalized_adjacency(indices)
    # D^-1/2 (A + I) D^-1/2 by hand: symmetric, self loops, rows weighted by degrees
    A = np.zeros((n, n))
    A[np.repeat(np.arange(n), k), indices.ravel()] = 1
    A = np.maximum(A, A.T) + np.eye(n)
    d = A.sum(1)
    np.testing.assert_allclose(adj.toarray(), A / np.sqrt(d[:, None] * d[None, :]), rtol=1e-6)

    X = rng.random((n, 2 * g)).astype(np.float32)
    first = torch.from_numpy(np.asarray(adj @ X, dtype=np.float32))
    torch.manual_seed(0)
    net = VeloGCN(g, torch.ones(3, g), hidden=(8, 8, 8), dropout=0.0).eval()
    u = torch.from_numpy(rng.random((n, g)).astype(np.float32))
    cpu = torch.device("cpu")
    from explorer.models.gcn import _torch_sparse

    full = _Blocks(adj, first, net.n_layers, _torch_sparse(adj, cpu), cpu)
    part = _Blocks(adj, first, net.n_layers, None, cpu)
    with torch.no_grad():
        all_rates = net(*full(torch.arange(n)), u)
        cells = torch.tensor([3, 17, 40])
        some = net(*part(cells), u[cells])
    for x, y in zip(all_rates, some, strict=True):
        torch.testing.assert_close(x[cells], y)


def test_mini_batch_fit(split):
    adata = split[0]
    result = DeepVelo(epochs=2, batch_size=64, seed=0).fit(adata)
    assert np.isfinite(result.velocity[:, result.velocity_genes]).all()
    assert (result.layers[Key.layers.RATE_BETA][:, result.velocity_genes] > 0).all()


def test_candidate_targets_by_hand():
    # cell 0 at the origin with candidates 1 (ahead along v), 2 (behind) and 3 (ahead)
    S = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-2.0, 1.0], [3.0, 2.0]])
    U = S * 10
    v = torch.tensor([[1.0, 0.0]])
    cand = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    one = torch.ones(2)
    t = candidate_targets(v, torch.tensor([0]), cand, S, U, one, one)
    torch.testing.assert_close(t.fwd_s, torch.tensor([[2.0, 1.0]]))  # mean of (1, 0) and (3, 2)
    torch.testing.assert_close(t.bwd_s, torch.tensor([[-2.0, 1.0]]))
    torch.testing.assert_close(t.fwd_u, torch.tensor([[20.0, 10.0]]))


def test_consistency_by_hand():
    V = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    indices = np.array([[1, 2], [0, 3], [0, 1], [0, 1]])
    r = np.sqrt(0.5)
    expected = [(0 - 1) / 2, (0 + r) / 2, (-1 + 0) / 2, (r + r) / 2]
    np.testing.assert_allclose(velocity_consistency(V, indices), expected, rtol=1e-6)
    labels = np.array(["a", "a", "b", "b"])
    # type a: units (1, 0), (0, 1); type b: (-1, 0), (r, r)
    np.testing.assert_allclose(
        velocity_consistency_by_type(V, labels), [0.5, 0.5, (1 - r) / 2, (-r + 1) / 2], rtol=1e-6
    )
    # a cell without velocity has no score; a gene with NaN is left out
    V2 = np.hstack([V, np.full((4, 1), np.nan, dtype=np.float32)])
    V2[3, :2] = 0
    assert np.isnan(velocity_consistency(V2, indices)[3])
    assert np.isnan(velocity_consistency_by_type(V2, labels)[3])


def test_rate_umap(split):
    adata = split[0].copy()
    with pytest.raises(InputError, match="rate_alpha"):
        compute_rate_umap(adata)
    result = DeepVelo(genes="all", epochs=2, rate_umap=True, seed=0).fit(adata)
    result.to_adata(adata)
    emb = adata.obsm[Key.obsm.RATES_UMAP]
    assert emb.shape == (adata.n_obs, 2)
    assert np.isfinite(emb).all()
    # the fit's basis is the function's on the rates it wrote (both seeded)
    del adata.obsm[Key.obsm.RATES_UMAP]
    compute_rate_umap(adata, seed=0)
    np.testing.assert_array_equal(adata.obsm[Key.obsm.RATES_UMAP], emb)


def test_needs_the_knn_graph(split):
    adata = split[0].copy()
    del adata.obsp[Key.obsp.DISTANCES]
    with pytest.raises(InputError, match="distances"):
        DeepVelo(epochs=1).fit(adata)


def test_pearson_target_matches_numpy():
    from explorer.models._gcn_module import PearsonTarget

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    mask = rng.random((50, 3)) > 0.3
    got = PearsonTarget(torch.from_numpy(y), torch.from_numpy(mask)).correlation(torch.from_numpy(x)).numpy()
    expected = [np.corrcoef(x[mask[:, j], j], y[mask[:, j], j])[0, 1] for j in range(3)]
    np.testing.assert_allclose(got, expected, rtol=1e-10)
