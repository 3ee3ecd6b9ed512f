"""Projection of velocities onto an embedding, the grid field and streamlines.

Ground truth: hand-computed projections, scVelo's projection loop restated on CellRank's
fixture (its stored scVelo velocity graph and UMAP), matplotlib's own quiver scale, and
streamlines of analytic fields (a rotation and a constant flow) on random points.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from explorer.graph.projection import compute_velocity_embedding, project_velocity, quiver_scale
from explorer.graph.streamlines import (
    GridField,
    compute_streamlines,
    pack_polylines,
    streamlines_from_field,
    velocity_on_grid,
)
from explorer.graph.transition import get_velocity_graph, transition_matrix
from explorer.keys import Key
from tests.graph.test_transition import read_fixture

# --------------------------------------------------------------------------------------
# projection
# --------------------------------------------------------------------------------------


def test_projection_by_hand():
    # cell 0 at the origin, neighbours one unit right (p = 0.75) and up (p = 0.25)
    E = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    T = sparse.csr_matrix(np.array([[0.0, 0.75, 0.25], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    V = project_velocity(T, E, autoscale=False)
    # sum p_j u_j - mean(p) * sum u_j = (0.75, 0.25) - 0.5 * (1, 1)
    np.testing.assert_allclose(V[0], [0.25, -0.25], atol=1e-7)
    # a uniform row carries no direction; self-transitions are ignored
    np.testing.assert_allclose(V[1:], 0.0, atol=1e-7)
    T_uniform = sparse.csr_matrix(np.array([[0.2, 0.4, 0.4], [0, 1, 0], [0, 0, 1]]))
    np.testing.assert_allclose(project_velocity(T_uniform, E, autoscale=False)[0], 0.0, atol=1e-7)


def test_quiver_scale_is_matplotlibs():
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    E = rng.normal(size=(300, 2)) * [3.0, 1.0] + [10.0, -2.0]
    V = rng.normal(size=(300, 2))
    # scVelo's quiver_autoscale, which draws an invisible quiver on a default figure
    with mpl.rc_context(mpl.rcParamsDefault):
        factor = np.abs(E).max()
        fig, ax = plt.subplots()
        q = ax.quiver(
            E[:, 0] / factor, E[:, 1] / factor, V[:, 0], V[:, 1], angles="xy", scale_units="xy", scale=None
        )
        q._init()
        expected = q.scale / factor
        plt.close(fig)
    assert quiver_scale(E, V) == pytest.approx(expected, rel=1e-6)


@pytest.fixture
def adata_100(shared_data):
    """CellRank's 100-cell fixture: scVelo's velocity graph and UMAP (see the data README)."""
    return read_fixture(shared_data / "cellrank_tests" / "adata_100.h5ad")


def test_projection_matches_scvelo_loop(adata_100):
    graph, graph_neg = get_velocity_graph(adata_100)
    E = np.asarray(adata_100.obsm[Key.obsm.UMAP], dtype=np.float64)
    compute_velocity_embedding(adata_100, basis="umap", autoscale=False)
    ours = adata_100.obsm[Key.obsm.velocity("umap")]
    assert ours.shape == (adata_100.n_obs, 2)
    # scVelo's velocity_embedding loop, restated on its signed transition matrix
    T = transition_matrix(graph, graph_neg, use_negative_cosines=True).toarray()
    np.fill_diagonal(T, 0.0)
    expected = np.zeros_like(E)
    for i in range(adata_100.n_obs):
        idx = np.flatnonzero(T[i])
        dX = E[idx] - E[i]
        dX /= np.linalg.norm(dX, axis=1)[:, None]
        expected[i] = T[i, idx] @ dX - T[i, idx].mean() * dX.sum(axis=0)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert "umap" in list(adata_100.uns[Key.uns.VELOCITY_PARAMS][Key.uns.EMBEDDINGS])
    # autoscaling changes the length, not the direction
    compute_velocity_embedding(adata_100, basis="X_umap")
    scaled = adata_100.obsm[Key.obsm.velocity("umap")]
    ratio = np.linalg.norm(scaled, axis=1) / np.linalg.norm(ours, axis=1)
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
    with pytest.raises(KeyError, match="Compute it first"):
        compute_velocity_embedding(adata_100, basis="tsne")


# --------------------------------------------------------------------------------------
# grid field and streamlines
# --------------------------------------------------------------------------------------


def _rotation(points: np.ndarray) -> np.ndarray:
    return np.column_stack([-points[:, 1], points[:, 0]])


@pytest.fixture
def disc() -> np.ndarray:
    """2,000 points uniform in the square [-1, 1]^2 (seed 0)."""
    return np.random.default_rng(0).uniform(-1, 1, size=(2000, 2))


def test_grid_of_constant_field_is_constant(disc):
    V = np.tile([1.0, 0.5], (len(disc), 1))
    field = velocity_on_grid(disc, V)
    assert isinstance(field, GridField)
    assert field.u.shape == (50, 50)
    assert field.x[0] < disc[:, 0].min()
    assert field.x[-1] > disc[:, 0].max()
    ok = field.valid
    assert ok.mean() > 0.8
    # inside the cloud the gaussian mass exceeds 1, so the weighted mean is the field
    inner = ok & (field.mass > 1.0)
    assert inner.sum() > 100
    np.testing.assert_allclose(field.u[inner], 1.0, rtol=1e-5)
    np.testing.assert_allclose(field.v[inner], 0.5, rtol=1e-5)


def test_binned_grid_equals_the_gaussian_sum_over_every_cell(monkeypatch):
    """Above ``_BINNED_ABOVE`` cells the node sums come from binned cells: the same field as
    the exact gaussian sum over all cells (``n_neighbors = n_obs``) up to the binning."""
    import explorer.graph.streamlines as streamlines

    rng = np.random.default_rng(0)
    n = 20_000
    t = rng.uniform(0, 6, n)
    X = np.column_stack([np.cos(t) * t, np.sin(t) * t]) + rng.normal(0, 0.3, (n, 2))
    V = np.column_stack([np.cos(t) - t * np.sin(t), np.sin(t) + t * np.cos(t)]) + rng.normal(0, 0.5, (n, 2))
    exact = velocity_on_grid(X, V, n_neighbors=n, density=0.5)
    monkeypatch.setattr(streamlines, "_BINNED_ABOVE", 1000)
    binned = velocity_on_grid(X, V, density=0.5)
    assert np.abs(binned.mass - exact.mass).max() < 0.01 * exact.mass.max()
    both = exact.valid & binned.valid
    assert both.sum() > 0.95 * exact.valid.sum() > 100
    err = np.hypot(binned.u - exact.u, binned.v - exact.v)[both] / np.hypot(exact.u, exact.v)[both]
    assert np.median(err) < 0.005
    assert err.max() < 0.05


def test_grid_masks_empty_regions():
    rng = np.random.default_rng(1)
    left = rng.normal([-5.0, 0.0], 0.5, size=(500, 2))
    right = rng.normal([5.0, 0.0], 0.5, size=(500, 2))
    X = np.vstack([left, right])
    field = velocity_on_grid(X, np.ones_like(X))
    middle = np.abs(field.x) < 1.5
    assert not field.valid[:, middle].any()
    assert field.valid[:, np.abs(field.x + 5) < 0.3].any()


def test_streamlines_follow_a_rotation(disc):
    lines = compute_streamlines(disc, _rotation(disc))
    assert len(lines) > 10
    assert all(line.ndim == 2 and line.shape[1] == 2 and len(line) >= 2 for line in lines)
    steps = np.concatenate([np.diff(line, axis=0) for line in lines])
    mids = np.concatenate([(line[1:] + line[:-1]) / 2 for line in lines])
    field = _rotation(mids)
    cos = np.einsum("ij,ij->i", steps, field) / (
        np.linalg.norm(steps, axis=1) * np.linalg.norm(field, axis=1)
    )
    assert np.median(cos) > 0.999
    assert cos.min() > 0.95
    # circles: the radius barely changes along a line (midpoint rule, no drift)
    for line in lines:
        r = np.linalg.norm(line, axis=1)
        assert r.max() - r.min() < 0.08
    # deterministic
    again = compute_streamlines(disc, _rotation(disc))
    assert len(again) == len(lines)
    assert all(np.array_equal(a, b) for a, b in zip(lines, again, strict=True))


def test_streamlines_of_a_constant_flow_are_parallel_and_spaced(disc):
    V = np.tile([1.0, 0.5], (len(disc), 1))
    lines = compute_streamlines(disc, V, density=1.0)
    direction = np.array([1.0, 0.5]) / np.hypot(1.0, 0.5)
    for line in lines:
        d = np.diff(line, axis=0)
        np.testing.assert_allclose(
            d / np.linalg.norm(d, axis=1)[:, None], np.tile(direction, (len(d), 1)), atol=1e-4
        )
    # first point upstream: lines run along the flow
    assert all((line[-1] - line[0]) @ direction > 0 for line in lines)
    # denser seeding gives more lines; backward-only lines run against the flow
    assert len(compute_streamlines(disc, V, density=2.0)) > len(lines)
    back = compute_streamlines(disc, V, direction="backward")
    assert back
    assert all((line[-1] - line[0]) @ direction > 0 for line in back)


def test_streamlines_handle_empty_and_bad_input():
    field = GridField(
        x=np.linspace(0, 1, 5, dtype=np.float32),
        y=np.linspace(0, 1, 5, dtype=np.float32),
        u=np.full((5, 5), np.nan, dtype=np.float32),
        v=np.full((5, 5), np.nan, dtype=np.float32),
        mass=np.zeros((5, 5), dtype=np.float32),
    )
    assert streamlines_from_field(field) == []
    with pytest.raises(ValueError, match="Valid options are"):
        streamlines_from_field(field, direction="sideways")
    with pytest.raises(ValueError, match=r"\(n_obs, 2\)"):
        velocity_on_grid(np.zeros((5, 3)), np.zeros((5, 3)))


def test_pack_polylines():
    a = np.array([[0.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    packed = pack_polylines([a, b])
    assert packed.shape == (6, 2)
    assert packed.dtype == np.float32
    assert np.isnan(packed[2]).all()
    assert not np.isnan(np.delete(packed, 2, axis=0)).any()
    np.testing.assert_array_equal(packed[3:], b)
    assert pack_polylines([]).shape == (0, 2)
