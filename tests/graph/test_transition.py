"""Velocity graph, transition matrix, mixing, random walks and confidence.

Ground truth: a four-cell example computed by hand, and scVelo's own results stored in
CellRank's test fixtures (``cellrank_tests/adata_{100,200}.h5ad``: scVelo's dynamical
velocities, ``velocity_graph`` computed with ``mode_neighbors="connectivities"``).
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

from explorer.graph.transition import (
    compute_transition_matrix,
    compute_velocity_confidence,
    compute_velocity_graph,
    cosine_correlations,
    get_velocity_graph,
    knn_indices,
    knn_pattern,
    mix,
    neighbor_pattern,
    random_walks,
    self_transition_probabilities,
    softmax_scale,
    split_graph,
    transition_matrix,
    velocity_confidence,
    velocity_gene_mask,
    velocity_length,
)
from explorer.keys import Key

# --------------------------------------------------------------------------------------
# four cells by hand
# --------------------------------------------------------------------------------------

#: cell 0 at the origin, cells 1-3 one unit along each of three genes
X4 = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
#: only cell 0 moves, towards cell 1
V4 = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=np.float32)
ALL_PAIRS = sparse.csr_matrix(np.ones((4, 4)) - np.eye(4))


def test_four_cell_correlations_by_hand():
    # centred v = (2, -1, -1)/3; centred displacement to cell 1 is the same vector (r = 1);
    # to cells 2 and 3 it is (-1, 2, -1)/3: r = (-2 - 2 + 1)/9 / (6/9) = -1/2
    corr = cosine_correlations(X4, V4, ALL_PAIRS).toarray()
    expected = np.zeros((4, 4))
    expected[0, 1:] = [1.0, -0.5, -0.5]
    np.testing.assert_allclose(corr, expected, atol=1e-6)
    # the edge-by-edge path (sqrt transform of 0/1 values changes nothing here) agrees
    np.testing.assert_allclose(
        cosine_correlations(X4, V4, ALL_PAIRS, sqrt_transform=True).toarray(), expected, atol=1e-6
    )

    graph, graph_neg = split_graph(corr)
    assert graph.nnz == 1
    assert graph_neg.nnz == 2
    assert graph_neg.data.max() < 0


def test_four_cell_transition_matrix_by_hand():
    graph, graph_neg = split_graph(cosine_correlations(X4, V4, ALL_PAIRS))
    # row maxima (1, 0, 0, 0); 98th percentile by linear interpolation = 0.94
    np.testing.assert_allclose(self_transition_probabilities(graph), [0.0, 0.94, 0.94, 0.94], atol=1e-6)

    T = transition_matrix(graph, graph_neg, scale=10.0).toarray()
    z = np.exp(10.0) + 2 * np.exp(-5.0)
    expected = np.array(
        [
            [0.0, np.exp(10.0) / z, np.exp(-5.0) / z, np.exp(-5.0) / z],
            [0.0, 1.0, 0.0, 0.0],  # no velocity: only the self-transition is left
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    np.testing.assert_allclose(T, expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(T.sum(axis=1), 1.0)

    # without the negative part, negative neighbours get nothing and weights are exp - 1
    T_pos = transition_matrix(graph, None, scale=10.0, self_transitions=False).toarray()
    np.testing.assert_allclose(T_pos[0], [0, 1, 0, 0])
    # empty rows stay where they are, so rows still sum to 1
    np.testing.assert_allclose(T_pos.sum(axis=1), 1.0)

    # signed weights for projection: rows sum to 1 in absolute value
    T_signed = transition_matrix(graph, graph_neg, use_negative_cosines=True).toarray()
    w = np.array([np.expm1(10.0), -np.expm1(5.0), -np.expm1(5.0)])
    np.testing.assert_allclose(T_signed[0, 1:], w / np.abs(w).sum(), rtol=1e-6)

    # backward = transpose before normalising
    T_bwd = transition_matrix(graph, graph_neg, scale=10.0, backward=True).toarray()
    np.testing.assert_allclose(T_bwd.sum(axis=1), 1.0)
    assert T_bwd[1, 0] > 0
    assert T_bwd[0, 1] == 0


def test_neighbor_sets_by_hand():
    # a path 0-1-2-3-4 with distances 1; each cell's two nearest (ties by column)
    d = sparse.csr_matrix(
        np.array(
            [
                [0, 1, 2, 0, 0],
                [1, 0, 1, 0, 0],
                [0, 1, 0, 1, 0],
                [0, 0, 1, 0, 1],
                [0, 0, 2, 1, 0],
            ],
            dtype=float,
        )
    )
    idx = knn_indices(d)
    assert [sorted(r) for r in idx.tolist()] == [[1, 2], [0, 2], [1, 3], [2, 4], [2, 3]]
    one = neighbor_pattern(knn_pattern(idx), n_recurse_neighbors=1).toarray() > 0
    two = neighbor_pattern(knn_pattern(idx), n_recurse_neighbors=2).toarray() > 0
    assert np.flatnonzero(one[0]).tolist() == [1, 2]
    # neighbours of neighbours: 0 -> {1, 2} -> {0, 2, 1, 3}
    assert np.flatnonzero(two[0]).tolist() == [1, 2, 3]
    assert not np.diag(two).any()
    # a row with more stored neighbours than the others is trimmed to its nearest
    d2 = d.tolil()
    d2[0, 4] = 5.0
    assert sorted(knn_indices(d2.tocsr())[0].tolist()) == [1, 2]


def test_mix_renormalises_rows():
    a = sparse.csr_matrix(np.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 1.0]]))
    b = sparse.identity(3, format="csr")
    m = mix((0.8, a), (0.2, b)).toarray()
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    np.testing.assert_allclose(m[0], [0.2, 0.8, 0.0])
    # weights need not sum to 1: (4, 1) is the same mixture
    np.testing.assert_allclose(mix((4.0, a), (1.0, b)).toarray(), m)
    with pytest.raises(ValueError, match="non-negative"):
        mix((-1.0, a), (1.0, b))
    with pytest.raises(ValueError, match="one shape"):
        mix((1.0, a), (1.0, sparse.identity(2, format="csr")))


def test_random_walks_follow_the_matrix():
    T = sparse.csr_matrix(np.array([[0.0, 0.7, 0.3], [0.0, 0.0, 1.0], [0.5, 0.0, 0.5]]))
    walks = random_walks(T, 0, n_steps=20, n_walks=2000, seed=3)
    assert walks.shape == (2000, 21)
    assert (walks[:, 0] == 0).all()
    # every step uses an edge with positive probability
    dense = T.toarray()
    assert (dense[walks[:, :-1], walks[:, 1:]] > 0).all()
    # first-step frequencies match row 0
    freq = np.bincount(walks[:, 1], minlength=3) / 2000
    np.testing.assert_allclose(freq, [0.0, 0.7, 0.3], atol=0.04)
    np.testing.assert_array_equal(walks, random_walks(T, 0, n_steps=20, n_walks=2000, seed=3))
    # several start cells: drawn from the given ones
    many = random_walks(T, [1, 2], n_steps=1, n_walks=50, seed=0)
    assert set(many[:, 0].tolist()) <= {1, 2}
    with pytest.raises(ValueError, match="start cells"):
        random_walks(T, 7, n_steps=1, n_walks=1)


def test_confidence_by_hand():
    V = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=np.float32)
    idx = np.array([[1, 2], [0, 2], [0, 1], [0, 1]])
    conf = velocity_confidence(V, idx)
    # cell 0: r(v0, v1) = 1 and r(v0, v2) = -1/2 -> mean 1/4
    np.testing.assert_allclose(conf[:3], [0.25, 0.25, 0.0], atol=1e-6)  # cell 2: mean -1/2 clipped to 0
    assert np.isnan(conf[3])  # no velocity
    np.testing.assert_allclose(velocity_length(V)[:3], np.sqrt(6) / 3, rtol=1e-6)


# --------------------------------------------------------------------------------------
# scVelo's results in CellRank's fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(params=[100, 200], ids=["adata_100", "adata_200"])
def cellrank_adata(request, shared_data) -> ad.AnnData:
    """CellRank's ground-truth AnnData with scVelo's velocity graph (see the data README)."""
    return read_fixture(shared_data / "cellrank_tests" / f"adata_{request.param}.h5ad")


def read_fixture(path) -> ad.AnnData:
    """Read a CellRank fixture; they were written by an old anndata (no encoding metadata)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ad.OldFormatWarning)
        return ad.read_h5ad(path)


def _inputs(adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    mask = velocity_gene_mask(adata)
    return np.asarray(adata.layers[Key.layers.MS][:, mask]), np.asarray(
        adata.layers[Key.layers.VELOCITY][:, mask]
    )


def _pattern(m: sparse.spmatrix) -> sparse.csr_matrix:
    p = sparse.csr_matrix(m, copy=True)
    p.data[:] = 1.0
    return p


def test_correlations_match_scvelo_on_its_pattern(cellrank_adata):
    ref_pos, ref_neg = get_velocity_graph(cellrank_adata)
    ref = (ref_pos + ref_neg).tocsr()
    X, V = _inputs(cellrank_adata)
    assert X.shape[1] == int(cellrank_adata.var[Key.var.VELOCITY_GENES].sum())
    ours = cosine_correlations(X, V, _pattern(ref))
    assert ours.nnz == ref.nnz
    assert abs(ours - ref).max() < 1e-4
    assert np.corrcoef(ours.data, ref.data)[0, 1] > 0.9999


def test_velocity_graph_matches_scvelo(cellrank_adata):
    ref_pos, ref_neg = get_velocity_graph(cellrank_adata)
    ref = (ref_pos + ref_neg).tocsr()
    adata = cellrank_adata.copy()
    del adata.obsp[Key.obsp.VELOCITY_GRAPH], adata.obsp[Key.obsp.VELOCITY_GRAPH_NEG]
    compute_velocity_graph(adata, mode_neighbors="connectivities")
    pos, neg = get_velocity_graph(adata)
    assert pos.data.min() > 0
    assert neg.data.max() < 0
    ours = (pos + neg).tocsr()
    # scVelo re-derives UMAP weights from the 29 stored neighbours (without the cell
    # itself); float32 underflow drops ~5 % of the weakest edges there. We score the
    # stored connectivities, so its pattern is contained in ours.
    only_ref = _pattern(ref) - _pattern(ours)
    assert (only_ref.data > 0).sum() == 0
    extra = ours.nnz - ref.nnz
    assert 0 <= extra <= 0.07 * ref.nnz
    shared = _pattern(ref).multiply(_pattern(ours)).tocoo()
    a = np.asarray(ours[shared.row, shared.col]).ravel()
    b = np.asarray(ref[shared.row, shared.col]).ravel()
    assert np.abs(a - b).max() < 1e-4
    assert np.corrcoef(a, b)[0, 1] > 0.9999
    params = adata.uns[Key.uns.VELOCITY_PARAMS]
    assert params[Key.uns.MODE_NEIGHBORS] == "connectivities"
    assert params[Key.uns.N_RECURSE_NEIGHBORS] == 1


def test_self_transitions_match_scvelo(cellrank_adata):
    graph, _ = get_velocity_graph(cellrank_adata)
    np.testing.assert_allclose(
        self_transition_probabilities(graph),
        cellrank_adata.obs[Key.obs.VELOCITY_SELF_TRANSITION].to_numpy(),
        atol=1e-6,
    )


def test_transition_matrix_matches_definition(cellrank_adata):
    graph, graph_neg = get_velocity_graph(cellrank_adata)
    T = compute_transition_matrix(cellrank_adata)
    assert cellrank_adata.obsp[Key.obsp.TRANSITIONS] is T
    np.testing.assert_allclose(np.asarray(T.sum(axis=1)).ravel(), 1.0, rtol=1e-10)
    # dense restatement of scVelo 0.3.4's transition_matrix: exp(10 * r) on every scored
    # pair, exp(10 * self) on the diagonal where the self-probability is positive
    corr = (graph + graph_neg).toarray()
    self_prob = cellrank_adata.obs[Key.obs.VELOCITY_SELF_TRANSITION].to_numpy()
    W = np.where(corr != 0, np.exp(10.0 * corr), 0.0)
    W[np.diag_indices_from(W)] = np.where(self_prob > 0, np.exp(10.0 * self_prob), 0.0)
    np.testing.assert_allclose(T.toarray(), W / W.sum(axis=1, keepdims=True), atol=1e-6)


def test_softmax_scale_is_cellranks_median_rule(cellrank_adata):
    graph, graph_neg = get_velocity_graph(cellrank_adata)
    values = np.abs(np.concatenate([graph.data, graph_neg.data]))
    assert softmax_scale(graph, graph_neg) == pytest.approx(1.0 / np.median(values))
    T = transition_matrix(graph, graph_neg, scale=softmax_scale(graph, graph_neg), self_transitions=False)
    np.testing.assert_allclose(np.asarray(T.sum(axis=1)).ravel(), 1.0)
    # no self-transitions: only cells without any scored neighbour stay (diagonal 1)
    no_edges = np.diff((graph + graph_neg).tocsr().indptr) == 0
    np.testing.assert_array_equal(T.diagonal(), no_edges.astype(float))


def test_confidence_matches_scvelo_definition(cellrank_adata):
    adata = cellrank_adata.copy()
    compute_velocity_confidence(adata)
    conf = adata.obs[Key.obs.VELOCITY_CONFIDENCE].to_numpy()
    # scVelo's loop, restated: centred velocities, the 29 stored neighbours
    _, V = _inputs(adata)
    V = V - V.mean(axis=1, keepdims=True)
    D = adata.obsp[Key.obsp.DISTANCES]
    expected = []
    for i in range(adata.n_obs):
        nb = D.indices[D.indptr[i] : D.indptr[i + 1]]
        r = V[nb] @ V[i] / (np.linalg.norm(V[nb], axis=1) * np.linalg.norm(V[i]))
        expected.append(max(r.mean(), 0.0))
    np.testing.assert_allclose(conf, expected, atol=1e-5)
    np.testing.assert_allclose(
        adata.obs[Key.obs.VELOCITY_LENGTH].to_numpy(), np.round(np.linalg.norm(V, axis=1), 2), atol=0.011
    )
    tc = adata.obs[Key.obs.VELOCITY_CONFIDENCE_TRANSITION].to_numpy()
    assert np.all(np.abs(tc) <= 1.0 + 1e-6)
    # velocities point where the chain goes: the mean transition confidence is positive
    assert tc.mean() > 0.2


def test_graph_reads_uns_and_reports_progress(cellrank_adata, progress_log):
    log, callback = progress_log
    adata = cellrank_adata.copy()
    # scVelo files keep the graph in uns
    adata.uns[Key.obsp.VELOCITY_GRAPH] = adata.obsp.pop(Key.obsp.VELOCITY_GRAPH)
    adata.uns[Key.obsp.VELOCITY_GRAPH_NEG] = adata.obsp.pop(Key.obsp.VELOCITY_GRAPH_NEG)
    g, g_neg = get_velocity_graph(adata)
    assert g.nnz > 0
    assert g_neg is not None
    compute_velocity_graph(adata, progress=callback)
    assert log
    assert log[-1].step == log[-1].total
    assert [p.step for p in log] == sorted(p.step for p in log)
    # the default neighbourhood: kNN of the distances and their neighbours (scVelo's)
    assert adata.uns[Key.uns.VELOCITY_PARAMS][Key.uns.N_RECURSE_NEIGHBORS] == 2
    assert adata.obsp[Key.obsp.VELOCITY_GRAPH].nnz > g.nnz


def test_missing_inputs_say_what_to_do(cellrank_adata):
    adata = cellrank_adata.copy()
    del adata.layers[Key.layers.VELOCITY]
    with pytest.raises(KeyError, match="Fit a model first|fit a velocity model first"):
        compute_velocity_graph(adata)
    with pytest.raises(ValueError, match="Valid options are"):
        compute_velocity_graph(cellrank_adata.copy(), mode_neighbors="umap")


def test_sparse_dense_product_is_scipys_bit_for_bit():
    from explorer.graph.transition import sparse_dense_product

    rng = np.random.default_rng(0)
    m = sparse.random(80, 60, density=0.2, format="csr", random_state=1, dtype=np.float32)
    x = rng.standard_normal((60, 7)).astype(np.float32)
    np.testing.assert_array_equal(sparse_dense_product(m, x), m @ x)
    # a transposed (Fortran-ordered) operand, as the EM's smoother passes
    y = np.ascontiguousarray(rng.standard_normal((7, 60)).astype(np.float32))
    np.testing.assert_array_equal(sparse_dense_product(m, y.T), m @ y.T)


def test_knn_indices_rows_of_equal_length_match_the_general_sort():
    rng = np.random.default_rng(2)
    n, c = 40, 6
    # column indices sorted in each row, so that adding an entry below keeps the stored order
    cols = np.stack([np.sort(rng.choice(np.delete(np.arange(n), i), c, replace=False)) for i in range(n)])
    data = rng.integers(1, 4, size=(n, c)).astype(float)  # many ties: stable order decides
    dist = sparse.csr_matrix((data.ravel(), cols.ravel(), np.arange(0, n * c + 1, c)), shape=(n, n))
    fast = knn_indices(dist, n_neighbors=4)
    # the general path (rows of unequal length): one more, farthest entry in row 0 changes nothing
    extra = dist.tolil()
    extra[0, next(j for j in range(n) if j != 0 and dist[0, j] == 0)] = 100.0
    general = knn_indices(sparse.csr_matrix(extra), n_neighbors=4)
    np.testing.assert_array_equal(fast, general)
    order = np.argsort(data, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(fast, np.take_along_axis(cols, order, axis=1))


def test_the_graph_built_in_blocks_of_cells_is_the_graph_built_at_once(cellrank_adata, monkeypatch):
    """Blocks of rows bound the temporaries at 10^5 cells; the numbers stay the same to the bit."""
    from explorer.graph import transition
    from explorer.graph.transition import row_blocks, velocity_graphs

    X, V = _inputs(cellrank_adata)
    direct = knn_pattern(knn_indices(cellrank_adata.obsp[Key.obsp.DISTANCES]))

    def everything():
        pattern = neighbor_pattern(direct, n_recurse_neighbors=2)
        corr = cosine_correlations(X, V, pattern)
        pos, neg = velocity_graphs(X, V, pattern)
        return pattern, corr, pos, neg, *(
            transition_matrix(pos, neg, **kw)
            for kw in ({}, {"backward": True}, {"use_negative_cosines": True}, {"self_transitions": False})
        )

    at_once = everything()
    assert len(row_blocks(at_once[0].indptr, transition.ROW_BLOCK_ENTRIES)) == 1
    monkeypatch.setattr(transition, "ROW_BLOCK_ENTRIES", 97)  # not a multiple of any row's length
    assert len(row_blocks(at_once[0].indptr, 97)) > 50
    for whole, blocks in zip(at_once, everything(), strict=True):
        for name in ("data", "indices", "indptr"):
            np.testing.assert_array_equal(getattr(blocks, name), getattr(whole, name), err_msg=name)
    pattern, corr, pos, neg, T, T_bwd = at_once[:6]
    # the split is the signed correlations' two signs
    np.testing.assert_array_equal((pos + neg).toarray(), corr.toarray())
    # backward: scVelo's weights (exp(10 r) on every scored pair, exp(10 self) on the
    # diagonal) transposed, then each row normalised
    W = np.where(corr.toarray() != 0, np.exp(10.0 * corr.toarray()), 0.0)
    self_prob = self_transition_probabilities(pos)
    W[np.diag_indices_from(W)] = np.where(self_prob > 0, np.exp(10.0 * self_prob), 0.0)
    np.testing.assert_allclose(T_bwd.toarray(), W.T / W.T.sum(axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(T.toarray(), W / W.sum(axis=1, keepdims=True), atol=1e-6)


def test_projection_and_transition_confidence_a_block_of_cells_at_a_time(cellrank_adata, monkeypatch):
    """The embedding's projection reads the signed matrix a block of rows at a time (never whole),
    the transition confidence the forward one: the same numbers to the bit as from whole matrices."""
    from explorer.graph import transition
    from explorer.graph.projection import _projected, project_velocity
    from explorer.graph.transition import transition_blocks, velocity_confidence_transition

    X, V = _inputs(cellrank_adata)
    pos, neg = get_velocity_graph(cellrank_adata)
    E = np.asarray(cellrank_adata.obsm["X_umap"])
    signed = transition_matrix(pos, neg, use_negative_cosines=True)
    T = transition_matrix(pos, neg)
    emb, conf = project_velocity(signed, E), velocity_confidence_transition(X, V, T)
    monkeypatch.setattr(transition, "ROW_BLOCK_ENTRIES", 97)
    blocks = list(transition_blocks(pos, neg, use_negative_cosines=True))
    assert len(blocks) > 20
    bounds = [(a, b) for a, b, _ in blocks]
    assert bounds[0][0] == 0 and bounds[-1][1] == cellrank_adata.n_obs
    assert all(b == a for (_, b), (a, _) in zip(bounds, bounds[1:]))
    np.testing.assert_array_equal(sparse.vstack([rows for _, _, rows in blocks]).toarray(), signed.toarray())
    np.testing.assert_array_equal(_projected(iter(blocks), E, autoscale=True), emb)
    np.testing.assert_array_equal(velocity_confidence_transition(X, V, T), conf)
    # one cell's confidence by hand: the correlation of its velocity with T x - x
    i = 7
    dx = T[i].toarray().ravel() @ X.astype(np.float64) - X[i]
    assert conf[i] == pytest.approx(np.corrcoef(dx, V[i])[0, 1], abs=1e-5)
