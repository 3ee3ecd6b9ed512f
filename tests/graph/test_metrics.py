"""CBDir on cases small enough to check by hand."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from explorer.graph.metrics import cross_boundary_correctness
from explorer.keys import Key


def _two_clusters() -> ad.AnnData:
    """Cells A0, A1 at x=0 and B0, B1 at x=1 (three genes); each A cell's kNN holds both B cells."""
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
    return adata


def test_velocity_towards_the_target_scores_positive_and_away_negative():
    adata = _two_clusters()
    towards = np.tile(np.array([1, 0, 0], dtype=np.float32), (4, 1))
    # Pearson r over the three genes: A0 -> B0 = (1, 0, 0) gives 1, A0 -> B1 = (1, 1, 0) gives 0.5;
    # A1 -> B0 = (1, -1, 0) gives sqrt(3)/2, A1 -> B1 = (1, 0, 0) gives 1. Mean per cell, then over cells.
    expected = ((1 + 0.5) / 2 + (np.sqrt(3) / 2 + 1) / 2) / 2
    score = cross_boundary_correctness(adata, towards, source="A", target="B")
    assert score == pytest.approx(expected, abs=1e-5)
    away = cross_boundary_correctness(adata, -towards, source="A", target="B")
    assert away == pytest.approx(-expected, abs=1e-5)


def test_genes_with_nan_velocity_are_left_out_and_empty_transitions_are_nan():
    adata = _two_clusters()
    velocity = np.tile(np.array([1, 0, np.nan], dtype=np.float32), (4, 1))
    with_nan = cross_boundary_correctness(adata, velocity, source="A", target="B")
    genes = np.array([True, True, False])
    assert with_nan == pytest.approx(
        cross_boundary_correctness(adata, velocity, source="A", target="B", genes=genes)
    )
    assert np.isnan(cross_boundary_correctness(adata, velocity, source="A", target="C"))


def test_gene_terms_by_hand_and_they_sum_to_cbdir():
    from explorer.graph.metrics import cross_boundary_gene_terms

    adata = _two_clusters()
    towards = np.tile(np.array([1, 0, 0], dtype=np.float32), (4, 1))
    terms = cross_boundary_gene_terms(adata, towards, source="A", target="B")
    # centred velocity (2, -1, -1) / 3 (length sqrt(6) / 3); per pair vc_g dc_g / (|vc| |dc|):
    # A0 -> B0, dc (2, -1, -1) / 3: (4, 1, 1) / 6; A0 -> B1, dc (1, 1, -2) / 3: (2, -1, 2) / 6;
    # A1 -> B0, dc (1, -1, 0): (2, 1, 0) / (2 sqrt 3); A1 -> B1, dc (2, -1, -1) / 3: (4, 1, 1) / 6
    by_hand = (
        (np.array([4, 1, 1]) / 6 + np.array([2, -1, 2]) / 6) / 2
        + (np.array([2, 1, 0]) / (2 * np.sqrt(3)) + np.array([4, 1, 1]) / 6) / 2
    ) / 2
    np.testing.assert_allclose(terms, by_hand, atol=1e-6)
    cbdir = cross_boundary_correctness(adata, towards, source="A", target="B")
    assert terms.sum() == pytest.approx(cbdir, abs=1e-6)
    # a gene left out (NaN velocity or not in genes) gets NaN, and the rest still sum to that CBDir
    velocity = towards.copy()
    velocity[:, 2] = np.nan
    left = cross_boundary_gene_terms(adata, velocity, source="A", target="B")
    assert np.isnan(left[2])
    assert left[:2].sum() == pytest.approx(
        cross_boundary_correctness(adata, velocity, source="A", target="B"), abs=1e-6
    )
    assert np.isnan(cross_boundary_gene_terms(adata, towards, source="A", target="C")).all()


def test_gene_terms_sum_to_cbdir_on_a_random_graph_and_flip_with_their_gene():
    from explorer.graph.metrics import cross_boundary_gene_terms

    rng = np.random.default_rng(0)
    n, g = 300, 40
    ms = rng.gamma(2.0, 1.0, size=(n, g)).astype(np.float32)
    dist = sparse.random(n, n, density=0.05, random_state=1, format="csr", dtype=np.float32)
    dist.data[:] = rng.uniform(0.1, 1.0, dist.nnz)
    obs = pd.DataFrame({Key.obs.CLUSTERS: rng.choice(["A", "B", "C"], n)}, index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(X=ms, obs=obs)
    adata.layers[Key.layers.MS] = ms
    adata.obsp[Key.obsp.DISTANCES] = dist
    velocity = rng.normal(size=(n, g)).astype(np.float32)
    velocity[5] = 0  # a cell without velocity: its pairs count as 0, as in CBDir
    genes = rng.random(g) < 0.8
    for source, target in (("A", "B"), ("C", "A")):
        cbdir = cross_boundary_correctness(adata, velocity, source=source, target=target, genes=genes)
        terms = cross_boundary_gene_terms(adata, velocity, source=source, target=target, genes=genes, chunk=7)
        assert np.isnan(terms[~genes]).all()
        assert terms[genes].sum() == pytest.approx(cbdir, abs=1e-5)
    # one gene's velocity turned around in every cell: its term changes sign, the others barely move
    top = int(np.nanargmax(np.abs(terms)))
    flipped = velocity.copy()
    flipped[:, top] *= -1
    after = cross_boundary_gene_terms(adata, flipped, source="C", target="A", genes=genes)
    assert np.sign(after[top]) == -np.sign(terms[top])


def test_in_cluster_coherence_by_hand():
    from explorer.graph.metrics import in_cluster_coherence

    # cells 0, 1, 2 in cluster a, cell 3 in b; velocities at 0, 45, 90 and 180 degrees
    v = np.array([[1, 0], [1, 1], [0, 1], [-1, 0]], dtype=np.float32)
    indices = np.array([[1, 3], [0, 2], [1, 3], [0, 2]])
    labels = ["a", "a", "a", "b"]
    out = in_cluster_coherence(v, indices, labels)
    # cell 0: only neighbour 1 is in a (cos 45 deg); cell 1: neighbours 0 and 2 (both 45 deg);
    # cell 2: neighbour 1; cell 3: no neighbour of its cluster
    c45 = np.sqrt(0.5)
    np.testing.assert_allclose(out[:3], [c45, c45, c45], atol=1e-6)
    assert np.isnan(out[3])
    # the cell itself is never its own neighbour, and a zero velocity gives NaN
    v[1] = 0
    out = in_cluster_coherence(v, np.array([[0, 1], [0, 2], [1, 0], [0, 2]]), labels)
    assert np.isnan(out[1])
    assert np.isnan(out[0])  # its only other same-cluster neighbour has no velocity
    assert out[2] == pytest.approx(0.0, abs=1e-6)  # 0 and 90 degrees


def test_parse_transitions():
    from explorer.graph.metrics import parse_transitions

    assert parse_transitions("Ngn3 high EP>Pre-endocrine, Pre-endocrine>Beta") == [
        ("Ngn3 high EP", "Pre-endocrine"),
        ("Pre-endocrine", "Beta"),
    ]
    for bad in ("A-B", "A>", ">B", "A>B>C", " , "):
        with pytest.raises(ValueError, match="SOURCE>TARGET"):
            parse_transitions(bad)
