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
