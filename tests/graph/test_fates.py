"""Velocity kernels (three modes, three similarities), GPCCA states, fates and drivers.

Ground truth: chains and random walks whose transition probabilities, absorption
probabilities and absorption times have closed forms (gambler's ruin), a numerical
second-order expansion for the stochastic kernel, scipy's Pearson test for the drivers,
the simulator's lineage ends, and the real pancreas (slow).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
from scipy import sparse, stats

from explorer.graph import fates as F
from explorer.graph.kernels import (
    compute_velocity_kernel,
    connectivity_transition_matrix,
    estimate_softmax_scale,
    velocity_moments,
    velocity_similarities,
    velocity_transition_matrix,
)
from explorer.graph.transition import random_walks
from explorer.keys import Key
from tests.test_compat import CELLRANK_NUMPY2_SHIM

# --------------------------------------------------------------------------------------
# a chain of cells with velocity along it
# --------------------------------------------------------------------------------------

N_CHAIN = 20


def _chain(n: int = N_CHAIN, reach: int = 2) -> tuple[np.ndarray, np.ndarray, sparse.csr_matrix]:
    """Cells at (i, 0, 0), velocity (1, 0, 0), each linked to the cells up to ``reach`` away."""
    X = np.zeros((n, 3))
    X[:, 0] = np.arange(n)
    V = np.zeros((n, 3))
    V[:, 0] = 1.0
    rows, cols = [], []
    for i in range(n):
        for j in range(max(0, i - reach), min(n, i + reach + 1)):
            if j != i:
                rows.append(i)
                cols.append(j)
    C = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return X, V, C


@pytest.mark.parametrize("similarity", ["correlation", "cosine"])
def test_chain_kernel_by_hand(similarity):
    X, V, C = _chain()
    # each displacement is +-d along gene 0: correlation and cosine are exactly +1 / -1
    sims = velocity_similarities(X, V, C, similarity=similarity).toarray()
    i = 10
    np.testing.assert_allclose(sims[i, [8, 9, 11, 12]], [-1, -1, 1, 1], atol=1e-12)
    T = velocity_transition_matrix(X, V, C, similarity=similarity, softmax_scale=2.0).toarray()
    np.testing.assert_allclose(T.sum(axis=1), 1.0)
    z = 2 * np.exp(2.0) + 2 * np.exp(-2.0)
    np.testing.assert_allclose(T[i, [8, 9, 11, 12]], np.exp([-2.0, -2.0, 2.0, 2.0]) / z, rtol=1e-12)
    # forward mass dominates everywhere but the last cell, which can only go back
    forward = np.triu(T, 1).sum(axis=1)
    assert (forward[:-1] > 0.95).all()
    assert forward[-1] == 0


def test_chain_dot_product_by_hand():
    X, V, C = _chain()
    T = velocity_transition_matrix(X, V, C, similarity="dot_product", softmax_scale=0.5).toarray()
    w = np.exp(0.5 * np.array([-2.0, -1.0, 1.0, 2.0]))
    np.testing.assert_allclose(T[10, [8, 9, 11, 12]], w / w.sum(), rtol=1e-12)
    # CellRank's width: 1 / median |s| over the scored pairs (here |d| in {1, 2})
    logits = velocity_similarities(X, V, C, similarity="dot_product").data
    assert estimate_softmax_scale(X, V, C, similarity="dot_product") == pytest.approx(
        1 / np.median(np.abs(logits))
    )


def test_cell_without_velocity_moves_uniformly():
    X, V, C = _chain()
    V[5] = 0.0
    for mode in ("deterministic", "stochastic", "monte_carlo"):
        T = velocity_transition_matrix(X, V, C, mode=mode, softmax_scale=1.0, n_samples=50).toarray()
        if mode == "deterministic":
            np.testing.assert_allclose(T[5, [3, 4, 6, 7]], 0.25)
        np.testing.assert_allclose(T.sum(axis=1), 1.0)


def test_random_walks_on_the_chain_end_at_its_end():
    X, V, C = _chain()
    T = velocity_transition_matrix(X, V, C, softmax_scale=2.0)
    walks = random_walks(T, 0, n_steps=60, n_walks=200, seed=1)
    assert (walks[:, -1] >= N_CHAIN - 3).mean() > 0.95


# --------------------------------------------------------------------------------------
# stochastic and Monte Carlo modes
# --------------------------------------------------------------------------------------


def _random_graph(n: int = 40, g: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, g))
    V = rng.normal(size=(n, g))
    C = sparse.random(n, n, density=0.25, random_state=seed, format="csr")
    C = ((C + C.T) > 0).astype(float)
    C.setdiag(0)
    C.eliminate_zeros()
    return X, V, sparse.csr_matrix(C), rng


@pytest.mark.parametrize("similarity", ["correlation", "cosine", "dot_product"])
def test_stochastic_is_the_second_order_expansion(similarity):
    """Our closed-form Hessian against finite differences of the deterministic kernel."""
    X, V, C, rng = _random_graph()
    var = rng.uniform(0.0, 0.02, size=V.shape)
    lam = 2.0
    T_sto = velocity_transition_matrix(
        X, V, C, mode="stochastic", similarity=similarity, softmax_scale=lam, velocity_variance=var
    ).toarray()
    np.testing.assert_allclose(T_sto.sum(axis=1), 1.0)

    def row(i: int, v: np.ndarray) -> np.ndarray:
        Vi = V.copy()
        Vi[i] = v
        return velocity_transition_matrix(X, Vi, C, similarity=similarity, softmax_scale=lam).toarray()[i]

    h = 1e-3
    for i in (0, 7, 21):
        p0 = row(i, V[i])
        second = np.zeros_like(p0)
        for gene in range(V.shape[1]):
            e = np.zeros(V.shape[1])
            e[gene] = h
            second += var[i, gene] * (row(i, V[i] + e) - 2 * p0 + row(i, V[i] - e)) / h**2
        expected = np.clip(p0 + 0.5 * second, 0, 1)
        expected /= expected.sum()
        np.testing.assert_allclose(T_sto[i], expected, atol=2e-5)


def test_zero_variance_is_deterministic_and_monte_carlo_matches_stochastic():
    X, V, C, rng = _random_graph(seed=3)
    det = velocity_transition_matrix(X, V, C, softmax_scale=3.0).toarray()
    sto0 = velocity_transition_matrix(
        X, V, C, mode="stochastic", softmax_scale=3.0, velocity_variance=np.zeros_like(V)
    ).toarray()
    np.testing.assert_allclose(sto0, det, atol=1e-12)
    # small variances: the expansion and the sampled expectation agree within sampling error
    var = np.full_like(V, 0.01)
    sto = velocity_transition_matrix(
        X, V, C, mode="stochastic", softmax_scale=3.0, velocity_variance=var
    ).toarray()
    mc = velocity_transition_matrix(
        X, V, C, mode="monte_carlo", softmax_scale=3.0, velocity_variance=var, n_samples=4000,
        cellrank_noise=False, seed=0,
    ).toarray()
    assert np.abs(mc - sto).max() < 0.01
    # the variance matters: both move away from the deterministic matrix the same way
    assert np.corrcoef((mc - det).ravel(), (sto - det).ravel())[0, 1] > 0.9
    # seeded
    again = velocity_transition_matrix(
        X, V, C, mode="monte_carlo", softmax_scale=3.0, velocity_variance=var, n_samples=4000,
        cellrank_noise=False, seed=0,
    ).toarray()
    np.testing.assert_array_equal(mc, again)


def test_velocity_moments_are_knn_mean_and_variance():
    X, V, C, _ = _random_graph(n=12, seed=5)
    mean, var = velocity_moments(V, C)
    for i in (0, 5, 11):
        group = np.r_[i, C[i].indices]
        np.testing.assert_allclose(mean[i], V[group].mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(var[i], V[group].var(axis=0), rtol=1e-5, atol=1e-7)


def test_connectivity_kernel_and_mix_stay_row_stochastic():
    _, _, C, _ = _random_graph(seed=2)
    W = C.multiply(np.random.default_rng(0).uniform(0.5, 1.0, C.shape)).tocsr()
    W = (W + W.T) / 2
    T = connectivity_transition_matrix(W).toarray()
    q = np.asarray(W.sum(axis=0)).ravel()
    expected = W.toarray() / np.outer(q, q)
    np.testing.assert_allclose(T, expected / expected.sum(axis=1, keepdims=True), rtol=1e-12)


def test_bad_kernel_options_list_the_valid_ones():
    X, V, C = _chain()
    with pytest.raises(ValueError, match="Valid options are: 'deterministic', 'stochastic', 'monte_carlo'"):
        velocity_transition_matrix(X, V, C, mode="exact")
    with pytest.raises(ValueError, match="Valid options are: 'correlation', 'cosine', 'dot_product'"):
        velocity_transition_matrix(X, V, C, similarity="pearson")
    with pytest.raises(ValueError, match="velocity_variance of shape"):
        velocity_transition_matrix(X, V, C, mode="stochastic", velocity_variance=np.zeros((2, 2)))


# --------------------------------------------------------------------------------------
# absorption: gambler's ruin
# --------------------------------------------------------------------------------------


def _walk(n: int, p: float) -> sparse.csr_matrix:
    """Walk on 0..n: right with p, left with 1 - p; the ends stay."""
    T = np.zeros((n + 1, n + 1))
    T[0, 0] = T[n, n] = 1.0
    for i in range(1, n):
        T[i, i + 1], T[i, i - 1] = p, 1 - p
    return sparse.csr_matrix(T)


@pytest.mark.parametrize("solver", ["direct", "iterative"])
@pytest.mark.parametrize("p", [0.5, 0.7])
def test_absorption_probabilities_are_gamblers_ruin(p, solver):
    n = 12
    states = np.full(n + 1, -1)
    states[0], states[n] = 0, 1
    B = F.absorption_probabilities(_walk(n, p), states, solver=solver)
    i = np.arange(n + 1)
    r = (1 - p) / p
    reach_n = i / n if p == 0.5 else (1 - r**i) / (1 - r**n)
    np.testing.assert_allclose(B[:, 1], reach_n, atol=1e-12)
    np.testing.assert_allclose(B.sum(axis=1), 1.0)


@pytest.mark.parametrize("solver", ["direct", "iterative"])
def test_absorption_times_are_the_closed_forms(solver):
    n = 10
    states = np.full(n + 1, -1)
    states[0], states[n] = 0, 1
    T = _walk(n, 0.5)
    i = np.arange(n + 1)
    # symmetric walk: E[steps] = i (n - i); given it ends at n: (n^2 - i^2) / 3
    np.testing.assert_allclose(F.mean_absorption_time(T, states, solver=solver), i * (n - i), rtol=1e-10)
    times = F.absorption_times(T, states, solver=solver)
    np.testing.assert_allclose(times[1:, 1], (n**2 - i[1:] ** 2) / 3, rtol=1e-10)
    np.testing.assert_allclose(times[:-1, 0], (n**2 - (n - i[:-1]) ** 2) / 3, rtol=1e-10)
    assert times[0, 1] == np.inf  # the other end is never reached from an absorbed cell


@pytest.mark.parametrize("solver", ["direct", "iterative"])
def test_absorption_rejects_unreachable_cells(solver):
    T = sparse.csr_matrix(np.array([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]]))
    with pytest.raises(ValueError, match="reach no terminal state"):
        F.absorption_probabilities(T, np.array([0, -1, -1]), solver=solver)
    with pytest.raises(ValueError, match=r"Valid options are: \['auto', 'direct', 'iterative'\]"):
        F.absorption_probabilities(T, np.array([0, -1, -1]), solver="lu")


# --------------------------------------------------------------------------------------
# GPCCA on blocks, drivers
# --------------------------------------------------------------------------------------


def _blocks(size: int = 60, leak: float = 0.2, seed: int = 0) -> sparse.csr_matrix:
    """Three dense blocks; block 0 sends ``leak`` of each step into blocks 1 and 2, which keep theirs."""
    rng = np.random.default_rng(seed)
    n = 3 * size
    T = np.zeros((n, n))
    for b in range(3):
        block = rng.uniform(0.5, 1.0, (size, size))
        T[b * size : (b + 1) * size, b * size : (b + 1) * size] = block / block.sum(axis=1, keepdims=True)
    T[:size] *= 1 - leak
    T[:size, size:] += leak / (2 * size)
    T[size:, :size] += 1e-4 / size  # rarely back: stable, but one connected chain
    return sparse.csr_matrix(T / T.sum(axis=1, keepdims=True))


def test_gpcca_finds_the_blocks_and_the_terminal_ones():
    T = _blocks()
    clusters = pd.Categorical(np.repeat(["start", "left", "right"], 60))
    macro = F.macrostates(T, 3, clusters=clusters, n_cells=20)
    assert sorted(macro.names) == ["left", "right", "start"]
    np.testing.assert_allclose(macro.memberships.sum(axis=1), 1.0, atol=1e-8)
    # the most typical cells of each state lie in its block
    labels = np.asarray(macro.assignment.astype(str))
    for name in macro.names:
        assert set(np.asarray(clusters)[labels == name]) == {name}
    # Schur vectors: constant first column, orthonormal for uniform weights, invariant
    X, R = macro.schur_vectors, macro.schur_matrix
    np.testing.assert_allclose(X[:, 0], 1.0)
    np.testing.assert_allclose(X.T @ X / X.shape[0], np.eye(X.shape[1]), atol=1e-8)
    np.testing.assert_allclose(T @ X, X @ R, atol=1e-8)
    assert sorted(F.terminal_state_names(macro)) == ["left", "right"]
    assert F.initial_state_names(macro) == ["start"]
    states, probs, _ = F.state_cells(macro, ["left", "right"], n_cells=20)
    B = F.absorption_probabilities(T, np.asarray(states.codes))
    assert np.all(B.sum(axis=1) == pytest.approx(1.0))
    assert probs.max() == pytest.approx(1.0)


def _metastable(n: int = 600, n_blocks: int = 4, seed: int = 0) -> sparse.csr_matrix:
    """``n_blocks`` sparse random blocks, not reversible, each leaking 2 % of a step to the next."""
    rng = np.random.default_rng(seed)
    size = n // n_blocks
    T = np.zeros((n, n))
    for b in range(n_blocks):
        lo = b * size
        block = rng.uniform(0.1, 1.0, (size, size)) * (rng.random((size, size)) < 0.1)
        block[np.arange(size), np.arange(size)] += 0.5
        T[lo : lo + size, lo : lo + size] = 0.98 * block / block.sum(axis=1, keepdims=True)
        nxt = ((b + 1) % n_blocks) * size
        T[lo : lo + size, nxt : nxt + size] += 0.02 / size
    return sparse.csr_matrix(T)


def test_too_many_macrostates_for_the_cells_say_how_many_to_ask_for():
    """100 cells hold 3 states of 30 typical cells: the default 10 is refused with the number to ask for.

    Found on scVelo's 100-cell dentate gyrus in the app (macrostates 10, the default): the
    message said what was expected and found, not what to set (nor where).
    """
    from explorer._types import InputError

    T = _blocks(size=33)
    expected = r"= 3 \(99 cells, 30 typical cells a state\), found 10\. Ask for 2 to 3 "
    with pytest.raises(InputError, match=expected):
        F.macrostates(T, 10)
    with pytest.raises(InputError, match=r"found 1\. Ask for 2 to 3 "):
        F.macrostates(T, 1)
    too_few = r"39 cells are too few for fates of 30 typical cells a state; they need 60 at least\. "
    too_few += r"Ask for fewer "
    with pytest.raises(InputError, match=too_few + r"typical cells a state \(`--n-cells 19` or fewer\)"):
        F.macrostates(_blocks(size=13), 2)
    assert F.macrostates(_blocks(size=13), 2, n_cells=19).memberships.shape == (39, 2)  # as it says
    assert F.macrostates(T, 3).memberships.shape == (99, 3)


def test_a_complex_pair_the_cells_cannot_hold_one_more_state_for_is_kept_by_one_fewer():
    """Six blocks in a cycle: eigenvalues 1, 0.99 +- 0.017i, 0.97 +- 0.017i, 0.96.

    Four states would split the second pair. Taking five (as pygpcca does) left 120 cells
    a state where 150 were asked for, and was refused for too many cells a state, a number
    nobody had chosen (200 dentate gyrus cells asked for 6 by default, got 7 and were
    refused); three keeps the pairs whole and fits.
    """
    T = _metastable(n=600, n_blocks=6)
    vals = np.sort_complex(np.linalg.eigvals(T.toarray()))[::-1]
    assert abs(vals[3].imag) > 1e-3 and np.isclose(vals[3], np.conj(vals[4]))  # the 4th starts a pair
    macro = F.macrostates(T, 4, n_cells=150)  # room for four: one fewer
    assert macro.memberships.shape[1] == 3 == len(macro.names)


def test_no_stable_state_says_what_to_change_that_can_be_changed():
    """Without a terminal state the message offers more macrostates only where the cells hold them.

    Found with ``explorer fates`` on scVelo's 100-cell dentate gyrus (3 macrostates, the most
    100 cells hold): it said "compute more macrostates", which would have been refused.
    """
    import anndata as ad

    from explorer._types import InputError

    def leaky(n: int) -> ad.AnnData:  # three blocks that leak half of each step away
        adata = ad.AnnData(np.zeros((n, 1), dtype=np.float32))
        T = _blocks(size=n // 3, leak=0.0).toarray() + 1.0 / n
        adata.obsp[Key.obsp.TRANSITIONS] = sparse.csr_matrix(T / T.sum(axis=1, keepdims=True))
        return adata

    with pytest.raises(InputError, match="No macrostate is stable enough") as e:
        F.compute_fates(leaky(99), n_states=3, cluster_key=None)
    assert "use more cells: 99 hold no more than these 3 macrostates" in str(e.value)
    assert "more macrostates (up to" not in str(e.value) and "--stability-threshold" in str(e.value)
    with pytest.raises(InputError, match=r"ask for more macrostates \(up to 10: `--n-states`"):
        F.compute_fates(leaky(300), n_states=3, cluster_key=None)


def test_terminal_states_named_among_macrostates_already_found_equal_a_fresh_computation(monkeypatch):
    """The refusal carries the macrostates; naming terminal states among them runs no GPCCA again.

    Three leaky blocks (no state reaches 0.96): ``NoTerminalState.macrostates`` are those
    ``macrostates`` finds, and ``compute_fates(terminal_states=..., macro=...)`` gives the fate
    probabilities of a computation from scratch with the same names.
    """
    import anndata as ad

    n = 300
    adata = ad.AnnData(np.zeros((n, 1), dtype=np.float32))
    T = _blocks(size=n // 3, leak=0.0).toarray() + 1.0 / n
    adata.obsp[Key.obsp.TRANSITIONS] = sparse.csr_matrix(T / T.sum(axis=1, keepdims=True))
    with pytest.raises(F.NoTerminalState) as e:
        F.compute_fates(adata, n_states=3, cluster_key=None)
    macro = e.value.macrostates
    assert len(macro.names) == 3 and (macro.stability() < F.STABILITY_THRESHOLD).all()  # noqa: PLR2004
    assert str(macro.stability().round(3).to_dict()) in str(e.value)  # the message lists them
    fresh = F.compute_fates(adata.copy(), n_states=3, cluster_key=None, terminal_states=macro.names[:2])

    def no_gpcca(*_, **__):
        raise AssertionError("GPCCA ran again")

    monkeypatch.setattr(F, "macrostates", no_gpcca)
    again = F.compute_fates(adata, n_states=3, cluster_key=None, terminal_states=macro.names[:2], macro=macro)
    assert again.terminal_states == macro.names[:2] and again.macrostates is macro
    np.testing.assert_allclose(again.fate_probabilities, fresh.fate_probabilities, atol=1e-10)
    with pytest.raises(ValueError, match="Expected macrostates of 299 cells, found 300"):
        F.compute_fates(adata[:299].copy(), cluster_key=None, terminal_states=macro.names[:1], macro=macro)


def test_no_cell_left_outside_the_terminal_states_is_a_message_not_a_traceback():
    """60 cells, two stable blocks: two terminal states of 30 typical cells take every cell.

    Found by passing the fuzz files' fits to ``explorer fates`` with its defaults (17 of
    76 ended in "ValueError: Every cell is absorbing"); 20 typical cells a state leave 20
    cells whose fates are computed.
    """
    import anndata as ad

    from explorer._types import InputError

    T = np.kron(np.eye(2), np.full((30, 30), 1 / 30)) * (1 - 1e-4) + 1e-4 / 60
    adata = ad.AnnData(np.random.default_rng(0).random((60, 3)).astype(np.float32))
    adata.obsp[Key.obsp.TRANSITIONS] = sparse.csr_matrix(T / T.sum(axis=1, keepdims=True))
    expected = r"Every cell is among the terminal states' most typical cells \(2 states x 30 cells, 60 cells"
    with pytest.raises(InputError, match=expected):
        F.compute_fates(adata.copy(), cluster_key=None)
    fates = F.compute_fates(adata, cluster_key=None, n_states=2, n_cells=20)
    assert len(fates.terminal_states) == 2
    np.testing.assert_allclose(fates.fate_probabilities.sum(axis=1), 1.0, atol=1e-8)


def test_krylov_schur_vectors_span_the_dense_schur_subspace(monkeypatch):
    """ARPACK's few vectors (n >= 500) span the invariant subspace of the sorted dense real Schur form.

    CellRank without SLEPc takes the leading columns of the full Schur form (``brandts``).
    """
    from scipy import linalg
    from threadpoolctl import threadpool_limits

    T = _metastable()
    calls = []
    eigs = F.splinalg.eigs
    monkeypatch.setattr(F.splinalg, "eigs", lambda *a, **k: calls.append(k["k"]) or eigs(*a, **k))
    X, R, vals = F.schur_vectors(T, 4)
    assert calls and max(calls) < 10  # the sparse solver, a few vectors
    dense = T.toarray()
    # one BLAS thread: two on a loaded 2-core machine make this 600 x 600 Schur form 10x slower
    with threadpool_limits(limits=1, user_api="blas"):
        real = np.sort(np.linalg.eigvals(dense).real)[::-1]
        cutoff = (real[3] + real[4]) / 2
        _, Z, sdim = linalg.schur(dense, output="real", sort=lambda re, im: re > cutoff)
    # 1, a complex pair 0.98 +- 0.02i (the blocks leak in a cycle), 0.96, then a gap
    assert sdim == X.shape[1] == 4
    assert linalg.subspace_angles(X, Z[:, :sdim]).max() < 1e-8
    np.testing.assert_allclose(np.sort(vals.real)[::-1], real[:4], atol=1e-10)
    np.testing.assert_allclose(T @ X, X @ R, atol=1e-10)


def test_gpcca_objective_skips_rows_without_changing_a_value(monkeypatch):
    """Along a walk of small steps and jumps, the objective with its kept candidates equals a full
    scan bit for bit (and pygpcca's own objective to round-off), and it does skip rows."""
    from pygpcca._gpcca import _objective

    # more candidates than a block has cells: the blocks are tight, their cells all but tie
    monkeypatch.setattr(F, "_CANDIDATES", 80)
    X, _, _ = F.schur_vectors(_metastable(n=300), 4)
    args = F._objective_args(X)
    alpha = F._initial_rotation(X)[1:, 1:].ravel()
    rng = np.random.default_rng(0)
    kept = refreshed = 0
    for step in range(400):
        alpha = alpha + rng.normal(0, 0.3 if step % 50 == 0 else 1e-3, alpha.size)
        before = args[3].copy()
        try:
            value = F._gpcca_objective(alpha, *args)
        except ValueError:
            value = "infeasible"
        try:
            full = F._gpcca_objective(alpha, *F._objective_args(X))  # no candidates: all rows
        except ValueError:
            full = "infeasible"
        assert value == full, step
        if value != "infeasible":
            assert value == pytest.approx(_objective(alpha, X), rel=1e-10, abs=1e-12)
        same = (args[3] == before).all(axis=1)
        kept += int(same.sum())
        refreshed += int((~same).sum())
    assert kept > 0 and refreshed > 0


def test_gpcca_start_and_memberships_are_pygpccas():
    """The vectorised inner simplex is pygpcca's (the same rows where no two are within round-off;
    a start simplex as large where the blocks' cells all but tie), and from one start the
    memberships are pygpcca's optimisation's."""
    from pygpcca._gpcca import _indexsearch, _initialize_rot_matrix, _opt_soft

    rng = np.random.default_rng(0)
    spread = np.column_stack([np.ones(500), rng.normal(size=(500, 4))])
    np.testing.assert_array_equal(F._inner_simplex(spread), _indexsearch(spread))
    np.testing.assert_array_equal(F._initial_rotation(spread), _initialize_rot_matrix(spread))
    for T, m in ((_blocks(), 3), (_metastable(), 4)):
        X, _, _ = F.schur_vectors(T, m)
        ours, theirs = F._inner_simplex(X), _indexsearch(X)
        volume = abs(np.linalg.det(X[ours]))
        assert volume == pytest.approx(abs(np.linalg.det(X[theirs])), rel=1e-8)
        rot = F._initial_rotation(X)
        np.testing.assert_array_equal(rot, np.linalg.pinv(X[ours]))
        chi, crispness = F.gpcca_memberships(X)
        _, chi_theirs, fopt = _opt_soft(X, rot)
        np.testing.assert_allclose(chi, chi_theirs, atol=1e-8)
        assert crispness == pytest.approx((m - fopt) / m, abs=1e-10)


def test_lineage_drivers_are_pearson_with_fisher_tests():
    rng = np.random.default_rng(0)
    n = 300
    fates = rng.dirichlet([1, 1], size=n)
    expr = np.column_stack([fates[:, 0] + rng.normal(0, 0.3, n), rng.normal(size=n), np.ones(n)])
    df = F.lineage_drivers(sparse.csr_matrix(expr), fates, names=["A", "B"], gene_names=["g0", "g1", "flat"])
    assert list(df.columns[:2]) == ["A_corr", "B_corr"]
    assert {"A_pval", "A_qval", "A_ci_low", "A_ci_high"} <= set(df.columns)
    for gene, j in (("g0", 0), ("g1", 1)):
        r, _ = stats.pearsonr(expr[:, j], fates[:, 0])
        assert df.loc[gene, "A_corr"] == pytest.approx(r, abs=1e-10)
        z = np.arctanh(r) * np.sqrt(n - 3)
        assert df.loc[gene, "A_pval"] == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-8)
        assert df.loc[gene, "A_ci_low"] < r < df.loc[gene, "A_ci_high"]
    assert df.loc["g0", "A_qval"] < 1e-10
    assert np.isnan(df.loc["flat", "A_corr"])
    dense = F.lineage_drivers(expr, fates, names=["A", "B"], gene_names=["g0", "g1", "flat"])
    pd.testing.assert_frame_equal(df, dense)


# --------------------------------------------------------------------------------------
# the simulator: terminal states at the lineage ends
# --------------------------------------------------------------------------------------


def test_terminal_states_at_the_simulated_lineage_ends(sample_adata, monkeypatch):
    adata = sample_adata
    compute_velocity_kernel(adata)
    T = adata.obsp[Key.obsp.TRANSITIONS]
    np.testing.assert_allclose(np.asarray(T.sum(axis=1)).ravel(), 1.0)
    # solver="auto" goes iterative above ITERATIVE_ABOVE transient cells: here, and says so
    monkeypatch.setattr(F, "ITERATIVE_ABOVE", adata.n_obs // 2)
    result = F.compute_fates(adata, n_states=4, cluster_key=Key.obs.TRUE_LINEAGE, n_cells=20)
    assert adata.uns[Key.uns.ESTIMATOR_PARAMS][Key.obsm.FATE_PROBABILITIES]["solver"].startswith("iterative")
    true_t = adata.obs[Key.obs.TRUE_T].to_numpy()
    lineage = adata.obs[Key.obs.TRUE_LINEAGE].astype(str).to_numpy()
    states = adata.obs[Key.obs.TERMINAL_STATES]
    ends = set()
    for name in result.terminal_states:
        cells = (states == name).to_numpy()
        # a terminal state is the late end of one lineage
        assert np.median(true_t[cells]) > np.quantile(true_t, 0.8), name
        values, counts = np.unique(lineage[cells], return_counts=True)
        assert counts.max() >= 0.9 * cells.sum()
        ends.add(values[np.argmax(counts)])
    # the simulator calls the trunk before the branch point "root"
    assert ends == set(np.unique(lineage)) - {"root"}
    assert len(ends) == 2
    fp = adata.obsm[Key.obsm.FATE_PROBABILITIES]
    np.testing.assert_allclose(fp.sum(axis=1), 1.0)
    np.testing.assert_allclose(fp, F.absorption_probabilities(T, states.cat.codes, solver="direct"), atol=1e-8)
    # the keys CellRank reads, in its layouts
    assert list(states.cat.categories) == result.terminal_states
    assert fp.shape == (adata.n_obs, len(result.terminal_states))
    assert len(adata.uns[Key.uns.colors(Key.obs.TERMINAL_STATES)]) == len(result.terminal_states)
    times = adata.obsm[Key.obsm.ABSORPTION_TIMES]
    assert list(times.columns) == [f"{t}_mean" for t in result.terminal_states]
    assert isinstance(adata.uns[Key.uns.COARSE_TRANSITIONS].X, np.ndarray)
    drivers = adata.varm[Key.varm.LINEAGE_DRIVERS]
    assert list(drivers.index) == list(adata.var_names)
    assert isinstance(adata.obs[Key.obs.MACROSTATES].dtype, pd.CategoricalDtype)


def test_iterative_fates_equal_the_direct_solve(sample_adata):
    """GMRES + incomplete LU (chosen above ITERATIVE_ABOVE cells) against SuperLU on a kNN graph."""
    adata = sample_adata
    compute_velocity_kernel(adata)
    T = adata.obsp[Key.obsp.TRANSITIONS]
    lineage = adata.obs[Key.obs.TRUE_LINEAGE].astype(str).to_numpy()
    true_t = adata.obs[Key.obs.TRUE_T].to_numpy()
    states = np.full(adata.n_obs, -1)
    for k, name in enumerate(sorted(set(lineage) - {"root"})):
        cells = np.flatnonzero(lineage == name)
        states[cells[np.argsort(true_t[cells])[-10:]]] = k
    direct = F.absorption_probabilities(T, states, solver="direct")
    iterative = F.absorption_probabilities(T, states, solver="iterative")
    assert 0.05 < direct[:, 0].mean() < 0.95  # both lineage ends are reached
    np.testing.assert_allclose(iterative, direct, atol=1e-8)
    t_direct = F.absorption_times(T, states, solver="direct")
    t_iterative = F.absorption_times(T, states, solver="iterative")
    finite = np.isfinite(t_direct) & (direct > 1e-6)
    np.testing.assert_allclose(t_iterative[finite], t_direct[finite], rtol=1e-6)
    # "auto" is the direct solve up to ITERATIVE_ABOVE cells (above: the test before)
    np.testing.assert_array_equal(F.absorption_probabilities(T, states), direct)
    # the simulator stores its cells in time order; the iterative solve orders them itself
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    shuffled = F.absorption_probabilities(T[perm][:, perm], states[perm], solver="iterative")
    np.testing.assert_allclose(shuffled, direct[perm], atol=1e-8)


def test_block_gmres_restarts_to_the_exact_solution():
    """Several right-hand sides, restarted every 3 steps, against a dense solve (and a zero column)."""
    rng = np.random.default_rng(1)
    A = np.eye(30) * 4 + rng.uniform(-1, 1, (30, 30)) * (rng.random((30, 30)) < 0.2)
    B = rng.normal(size=(30, 3))
    B[:, 1] = 0.0
    X, residuals = F._gmres(
        sparse.csr_matrix(A), lambda b: b / 4, B, tol=1e-12, restart=3, maxiter=200
    )
    np.testing.assert_allclose(X, np.linalg.solve(A, B), atol=1e-10)
    assert residuals.max() <= 1e-12 and residuals[1] == 0


def test_flow_order_puts_the_cells_nearest_to_absorption_first():
    """A chain drifting right (0.8 right, 0.2 left) into an absorbing end: the order is right to left."""
    n = 6
    T = np.zeros((n, n))
    for i in range(n - 1):
        T[i, i + 1] = 0.8
        T[i, max(i - 1, 0)] += 0.2
    T[n - 1, n - 1] = 1.0
    Q = T[: n - 1, : n - 1]
    np.testing.assert_array_equal(F._flow_order(sparse.csr_matrix(np.eye(n - 1) - Q)), [4, 3, 2, 1, 0])


# --------------------------------------------------------------------------------------
# explorer fates on the command line
# --------------------------------------------------------------------------------------


@pytest.fixture
def fitted_path(tmp_path, sample_adata):
    """The bundled sample (a stochastic fit of simulated cells), written as an .h5ad."""
    path = tmp_path / "fitted.h5ad"
    sample_adata.write_h5ad(path)
    return path


def _fates_cli(args, capsys) -> tuple[int, str]:
    from explorer.cli import main

    code = main(["fates", *map(str, args), "-q"])
    return code, capsys.readouterr().err


def test_cli_fates_writes_cellranks_keys(fitted_path, tmp_path, capsys):
    import anndata as ad

    out = tmp_path / "fates.h5ad"
    before = fitted_path.read_bytes()
    code, err = _fates_cli(
        [fitted_path, "--out", out, "--n-states", "4", "--n-cells", "20", "--cluster-key", "true_lineage",
         "--mode", "stochastic"],
        capsys,
    )
    assert code == 0, err
    assert "terminal" in err
    assert fitted_path.read_bytes() == before  # the input is never touched
    result = ad.read_h5ad(out)
    fp = np.asarray(result.obsm[Key.obsm.FATE_PROBABILITIES])
    np.testing.assert_allclose(fp.sum(axis=1), 1.0)
    states = result.obs[Key.obs.TERMINAL_STATES]
    assert fp.shape[1] == len(states.cat.categories) >= 2
    assert result.uns[Key.uns.TRANSITIONS_PARAMS]["params"]["model"] == "stochastic"
    assert isinstance(result.obsm[Key.obsm.ABSORPTION_TIMES], pd.DataFrame)
    assert isinstance(result.varm[Key.varm.LINEAGE_DRIVERS], pd.DataFrame)
    # an existing output needs --force
    code, err = _fates_cli([fitted_path, "--out", out], capsys)
    assert code == 2
    assert "--force" in err


def test_cli_fates_asks_by_default_for_as_many_macrostates_as_the_cells_hold(shared_data, tmp_path, capsys):
    """100 cells hold 3 macrostates of 30 typical cells: ``explorer fates`` asks for 3, not 10.

    Its fixed default of 10 was refused on every data set under 300 cells (the app's
    default had been fitted to the cells on 2026-12-05; now the CLI and the API share it).
    On scVelo's 100-cell pancreas, fitted by ``explorer fit``.
    """
    import anndata as ad

    from explorer.cli import main

    fitted, out = tmp_path / "fit.h5ad", tmp_path / "fates.h5ad"
    source = shared_data / "scvelo_tests" / "pancreas_100obs_preprocessed.h5ad"
    assert main(["fit", str(source), "--model", "stochastic", "--out", str(fitted), "-q"]) == 0
    code, err = _fates_cli([fitted, "--out", out], capsys)
    assert code == 0, err
    result = ad.read_h5ad(out)
    assert result.obsm[Key.obsm.MACROSTATES_MEMBERSHIPS].shape == (100, 3)
    assert F.default_n_states(100) == 3 and F.default_n_states(3696) == 10 and F.default_n_states(40) == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--n-states", "1"], "--n-states must be at least 2"),
        (["--connectivity-weight", "1.5"], "--connectivity-weight must be in [0, 1]"),
        (["--n-cells", "0"], "--n-cells must be at least 1"),
        (["--n-samples", "0"], "--n-samples must be at least 1"),
    ],
)
def test_cli_fates_bad_options_refused_before_reading(
    fitted_path, tmp_path, capsys, monkeypatch, args, expected
):
    import anndata as ad

    def refuse(*_a, **_k):
        pytest.fail("the input was read before the options were checked")

    monkeypatch.setattr(ad, "read_h5ad", refuse)
    out = tmp_path / "out.h5ad"
    code, err = _fates_cli([fitted_path, "--out", out, *args], capsys)
    assert code == 2, err
    assert expected in err
    assert "Traceback" not in err
    assert not out.exists()


def test_cli_fates_needs_a_velocity_fit(tmp_path, capsys, sample_adata, fitted_path):
    raw = sample_adata.copy()
    del raw.layers[Key.layers.VELOCITY]
    path = tmp_path / "raw.h5ad"
    raw.write_h5ad(path)
    out = tmp_path / "out.h5ad"
    code, err = _fates_cli([path, "--out", out], capsys)
    assert code == 2
    assert "holds no velocity fit" in err
    assert "explorer fit" in err
    assert not out.exists()
    code, err = _fates_cli([tmp_path / "missing.h5ad", "--out", out], capsys)
    assert code == 2
    assert "file not found" in err
    code, err = _fates_cli([fitted_path, "--out", fitted_path], capsys)
    assert code == 2
    assert "never overwrites its input" in err
    # a bad choice is argparse's: exit 2 with the valid choices
    with pytest.raises(SystemExit) as exc:
        _fates_cli([path, "--mode", "exact"], capsys)
    assert exc.value.code == 2
    assert "monte_carlo" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# side by side with CellRank 2.0.7 (its own environment, with jax for the stochastic mode)
# --------------------------------------------------------------------------------------

CELLRANK_KERNELS = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import numpy as np, anndata as ad, scipy.sparse as sp
""" + CELLRANK_NUMPY2_SHIM + r"""
import cellrank as cr
path, out = sys.argv[1], sys.argv[2]
a = ad.read_h5ad(path)
res = {}
for run in sys.argv[3].split(","):
    mode, sim = run.split(":")
    kw = {"seed": 0} if mode == "monte_carlo" else {}
    vk = cr.kernels.VelocityKernel(a).compute_transition_matrix(
        model=mode, similarity=sim, show_progress_bar=False, **kw)
    res[run] = sp.csr_matrix(vk.transition_matrix).toarray()
res["connectivity"] = sp.csr_matrix(
    cr.kernels.ConnectivityKernel(a).compute_transition_matrix().transition_matrix).toarray()
np.savez(out, **{k.replace(":", "__"): v for k, v in res.items()})
"""


def _compat_python() -> str | None:
    from tests.test_compat import COMPAT_PYTHON

    return COMPAT_PYTHON


def _cellrank_kernels(path, runs: list[str], tmp_path) -> dict[str, np.ndarray]:
    import subprocess

    out = tmp_path / "cellrank_kernels.npz"
    proc = subprocess.run(
        [_compat_python(), "-c", CELLRANK_KERNELS, str(path), str(out), ",".join(runs)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {k.replace("__", ":"): v for k, v in np.load(out).items()}


def _ours(adata, run: str) -> np.ndarray:
    from explorer.graph.transition import velocity_gene_mask

    mode, sim = run.split(":")
    mask = velocity_gene_mask(adata)
    X = np.asarray(adata.layers[Key.layers.MS][:, mask], dtype=np.float64)
    V = np.asarray(adata.layers[Key.layers.VELOCITY][:, mask], dtype=np.float64)
    return velocity_transition_matrix(
        X, V, adata.obsp[Key.obsp.CONNECTIVITIES], mode=mode, similarity=sim, seed=0
    ).toarray()


@pytest.mark.slow
@pytest.mark.skipif(_compat_python() is None, reason="no .venv-compat with CellRank 2.0.7")
def test_kernels_match_cellrank(shared_data, tmp_path):
    from tests.graph.test_transition import read_fixture

    path = shared_data / "cellrank_tests" / "adata_200.h5ad"
    runs = [
        "deterministic:correlation",
        "deterministic:cosine",
        "deterministic:dot_product",
        "monte_carlo:correlation",
    ]
    theirs = _cellrank_kernels(path, runs, tmp_path)
    adata = read_fixture(path)
    for run in runs:
        ours = _ours(adata, run)
        np.testing.assert_array_equal(ours > 0, theirs[run] > 0)
        if run.startswith("monte_carlo"):
            # both average 1000 draws: equal within sampling error
            assert np.abs(ours - theirs[run]).max() < 0.03, run
            assert np.abs(ours - theirs[run]).mean() < 1e-3, run
        else:
            np.testing.assert_allclose(ours, theirs[run], atol=1e-12, err_msg=run)
    np.testing.assert_allclose(
        connectivity_transition_matrix(adata.obsp[Key.obsp.CONNECTIVITIES]).toarray(),
        theirs["connectivity"],
        atol=1e-12,
    )


CELLRANK_STOCHASTIC_ROWS = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import numpy as np, anndata as ad
""" + CELLRANK_NUMPY2_SHIM + r"""
import cellrank as cr
path, out = sys.argv[1], sys.argv[2]
vk = cr.kernels.VelocityKernel(ad.read_h5ad(path))
conn = vk.connectivities
counts = np.diff(conn.indptr)
# rows with the most common neighbour count: jax compiles its Hessian once per shape
rows = np.flatnonzero(counts == np.bincount(counts).argmax())[:4]
res = {"rows": rows}
for sim in ("correlation", "cosine", "dot_product"):
    scale = vk._estimate_softmax_scale(similarity=sim, backward_mode="transpose")
    model = vk._create_model("stochastic", backward_mode="transpose", similarity=sim, softmax_scale=scale)
    res[sim] = np.array([model._compute(i, conn.indices[conn.indptr[i]:conn.indptr[i + 1]])[0] for i in rows])
np.savez(out, **res)
"""


@pytest.mark.slow
@pytest.mark.skipif(_compat_python() is None, reason="no .venv-compat with CellRank 2.0.7")
def test_stochastic_kernel_matches_cellrank(shared_data, tmp_path):
    """CellRank's jax Hessians against our closed form, row by row.

    CellRank's stochastic mode compiles a jax Hessian per neighbourhood size and takes
    minutes per hundred cells, so it scores four cells of one size (its ``Stochastic._compute``
    on its own inputs); jax computes in float32, hence the 1e-6 tolerance.
    """
    import subprocess

    from tests.graph.test_transition import read_fixture

    path = shared_data / "cellrank_tests" / "adata_200.h5ad"
    out = tmp_path / "rows.npz"
    proc = subprocess.run(
        [_compat_python(), "-c", CELLRANK_STOCHASTIC_ROWS, str(path), str(out)],
        capture_output=True, text=True, timeout=1800, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = np.load(out)
    adata = read_fixture(path)
    C = sparse.csr_matrix(adata.obsp[Key.obsp.CONNECTIVITIES])
    C.sort_indices()
    for sim in ("correlation", "cosine", "dot_product"):
        T = _ours(adata, f"stochastic:{sim}")
        for k, i in enumerate(theirs["rows"]):
            np.testing.assert_allclose(T[i, C[i].indices], theirs[sim][k], atol=1e-6, err_msg=sim)


# --------------------------------------------------------------------------------------
# the real pancreas (slow): a dynamical fit, CellRank's recipe
# --------------------------------------------------------------------------------------

ENDOCRINE = {"Alpha", "Beta", "Delta", "Epsilon"}
PANCREAS_THRESHOLD = 0.95


@pytest.fixture(scope="module")
def pancreas_fates(shared_data, tmp_path_factory):
    """The pancreas after ``run_velocity(model="dynamical")``, ``compute_velocity_kernel()``
    (deterministic, 0.2 connectivities) and ``compute_fates(n_states=10, stability_threshold=0.95)``,
    written once. (Alpha's coarse self-transition is 0.959 here, in CellRank too: at CellRank's
    default 0.96 both call only Beta and Epsilon terminal.)"""
    from explorer.data.io import read, write
    from explorer.pipeline import run_velocity

    adata = read(shared_data / "pancreas_endocrinogenesis_3696.h5ad")
    run_velocity(adata, model="dynamical")
    compute_velocity_kernel(adata)
    result = F.compute_fates(adata, n_states=10, stability_threshold=PANCREAS_THRESHOLD)
    path = write(adata, tmp_path_factory.mktemp("pancreas") / "pancreas_fates.h5ad")
    return adata, result, path


@pytest.mark.slow
def test_pancreas_terminal_states_and_fates(pancreas_fates):
    adata, result, _ = pancreas_fates
    assert {"Alpha", "Beta", "Epsilon"} <= set(result.terminal_states)
    # GPCCA's ten macrostates here are sensitive: a change of 5e-5 in the transition matrix
    # (the EM's float32 sums in numpy rather than torch) took a Ductal macrostate's coarse
    # self-transition from 0.90 to 0.99, and CellRank then also calls it terminal. A steady
    # Ductal population may be terminal; no other non-endocrine state may
    assert all(name in ENDOCRINE or name.startswith("Ductal") for name in result.terminal_states)
    clusters = adata.obs[Key.obs.CLUSTERS].astype(str).to_numpy()
    states = adata.obs[Key.obs.TERMINAL_STATES].astype(str).to_numpy()
    # each endocrine terminal state's cells lie in its cluster; a Ductal one is named after the
    # majority of its most typical cells, and its cells may reach into Ngn3 low EP (Ductal_1:
    # 67% Ductal, from a fit in a two-thread process on an AMD EPYC, 2026-12-03)
    for name in result.terminal_states:
        share = (clusters[states == name] == name.split("_")[0]).mean()
        assert share > (0.9 if name in ENDOCRINE else 0.5), (name, share)
    fp = adata.obsm[Key.obsm.FATE_PROBABILITIES]
    high = clusters == "Ngn3 high EP"
    np.testing.assert_allclose(fp[high].sum(axis=1), 1.0, atol=1e-10)
    # endocrine progenitors split their fate among the endocrine states
    assert (fp[high] > 0.01).sum(axis=1).mean() >= 2
    endocrine_fate = np.array([name in ENDOCRINE for name in result.terminal_states])
    assert fp[high][:, endocrine_fate].sum(axis=1).mean() > 0.9
    # random walks from Ngn3 low EP cells end in endocrine cells
    start = np.flatnonzero(clusters == "Ngn3 low EP")
    walks = random_walks(adata.obsp[Key.obsp.TRANSITIONS], start, n_steps=300, n_walks=300, seed=0)
    assert np.isin(clusters[walks[:, -1]], list(ENDOCRINE)).mean() > 0.8


@pytest.mark.slow
def test_pancreas_gpcca_start_and_objective_are_pygpccas(pancreas_fates):
    """On the pancreas's Schur vectors: pygpcca's start simplex, row for row, and its objective
    along Nelder-Mead-like steps (the kept candidates cut most rows here: 3,696 cells, 1,024 kept)."""
    from pygpcca._gpcca import _indexsearch, _objective

    _, result, _ = pancreas_fates
    X = np.ascontiguousarray(result.macrostates.schur_vectors)
    np.testing.assert_array_equal(F._inner_simplex(X), _indexsearch(X))
    args = F._objective_args(X)
    alpha = F._initial_rotation(X)[1:, 1:].ravel()
    rng = np.random.default_rng(0)
    kept = 0
    for _ in range(200):
        alpha = alpha + rng.normal(0, 1e-4, alpha.size)
        before = args[3].copy()
        value = F._gpcca_objective(alpha, *args)
        assert value == F._gpcca_objective(alpha, *F._objective_args(X))
        assert value == pytest.approx(_objective(alpha, X), rel=1e-10, abs=1e-12)
        kept += int((args[3] == before).all(axis=1).sum())
    assert kept > 0.5 * 200 * X.shape[1]


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fates.py"
    spec = importlib.util.spec_from_file_location("bench_fates", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(_compat_python() is None, reason="no .venv-compat with CellRank 2.0.7")
def test_pancreas_fates_match_cellrank(pancreas_fates, tmp_path):
    """CellRank's full recipe on our file (its dense Schur makes this the slowest test here).

    Both find the same endocrine terminal states, with fate probabilities that agree. Which
    non-endocrine macrostates of the ten are stable enough to be terminal changes with the
    round-off of the file's fit, in CellRank as here: from a file fitted in a two-thread
    process CellRank called Alpha, Beta and Epsilon terminal, from one fitted in a one-thread
    process also Ductal_2 (coarse self-transition 0.980) and Ngn3 high EP_1 (0.995), where
    explorer's GPCCA called Ductal_4 (0.979) (AMD EPYC, 2026-12-03; on the development machine
    the two lists were equal). A test of the same algorithm on the same Schur vectors, bit for
    bit, is ``test_pancreas_gpcca_start_and_objective_are_pygpccas``.
    """
    adata, result, path = pancreas_fates
    theirs, arrays = _bench_module().run_cellrank(
        _compat_python(), path, mode="deterministic", n_states=10, workdir=tmp_path,
        stability_threshold=PANCREAS_THRESHOLD,
    )
    T = sparse.csr_matrix(
        (arrays["T_data"], arrays["T_indices"], arrays["T_indptr"]), shape=(adata.n_obs, adata.n_obs)
    )
    assert abs(T - adata.obsp[Key.obsp.TRANSITIONS]).max() < 1e-10
    endocrine = sorted(n for n in theirs["terminal_states"] if n in ENDOCRINE)
    assert endocrine == sorted(n for n in result.terminal_states if n in ENDOCRINE)
    assert {"Alpha", "Beta", "Epsilon"} <= set(endocrine)
    fp = adata.obsm[Key.obsm.FATE_PROBABILITIES]
    for j, name in enumerate(theirs["lineage_names"]):
        if name not in ENDOCRINE:
            continue
        k = result.terminal_states.index(name)
        # 0.98-0.997 with the same terminal states; Beta 0.82 where CellRank's Ngn3 high EP_1
        # absorbed some of the walks that end in Beta here
        assert np.corrcoef(fp[:, k], arrays["fate_probabilities"][:, j])[0, 1] > 0.8, name
    # CellRank's solve, absorbing in our terminal states' cells, gives our fate probabilities
    assert list(arrays["file_state_names"]) == list(result.terminal_states)
    np.testing.assert_allclose(arrays["fates_on_file_states"], fp, atol=1e-4)  # 4e-6 (CellRank's GMRES)


CELLRANK_READS = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import matplotlib
matplotlib.use("Agg")
import numpy as np, anndata as ad
""" + CELLRANK_NUMPY2_SHIM + r"""
import cellrank as cr
a = ad.read_h5ad(sys.argv[1])
g = cr.estimators.GPCCA.from_adata(a, obsp_key="T_fwd")
g.plot_fate_probabilities(same_plot=False, basis="umap", save=sys.argv[2])
g.plot_macrostates(which="all", basis="umap", save=sys.argv[3])
print(json.dumps({
    "terminal": [str(c) for c in g.terminal_states.cat.categories],
    "macro": [str(c) for c in g.macrostates.cat.categories],
    "lineages": [str(n) for n in g.fate_probabilities.names],
    "fates": np.asarray(g.fate_probabilities.X).tolist(),
    "times": list(g.absorption_times.columns),
    "drivers": list(g.lineage_drivers.columns),
    "coarse": list(g.coarse_T.shape),
}))
"""


def cellrank_reads(path, folder) -> dict:
    """What CellRank 2.0.7's ``GPCCA.from_adata`` reads from the file at ``path`` (:data:`CELLRANK_READS`).

    It also plots the fate probabilities and macrostates into ``folder`` (checked non-empty).
    """
    import json
    import subprocess

    pngs = folder / "fates.png", folder / "macro.png"
    proc = subprocess.run(
        [_compat_python(), "-c", CELLRANK_READS, str(path), *map(str, pngs)],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(p.stat().st_size > 10_000 for p in pngs)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(_compat_python() is None, reason="no .venv-compat with CellRank 2.0.7")
def test_cellrank_reads_and_plots_our_fates(sample_adata, tmp_path):
    from explorer.data.io import write

    compute_velocity_kernel(sample_adata)
    result = F.compute_fates(sample_adata, n_states=4, cluster_key=Key.obs.TRUE_LINEAGE, n_cells=20)
    path = write(sample_adata, tmp_path / "fates.h5ad")
    res = cellrank_reads(path, tmp_path)
    assert res["terminal"] == result.terminal_states == res["lineages"]
    assert res["macro"] == result.macrostates.names
    np.testing.assert_allclose(res["fates"], sample_adata.obsm[Key.obsm.FATE_PROBABILITIES], atol=1e-12)
    assert res["times"] == [f"{t}_mean" for t in result.terminal_states]
    assert res["drivers"][: len(result.terminal_states)] == [f"{t}_corr" for t in result.terminal_states]
    assert res["coarse"] == [len(result.macrostates.names)] * 2


def test_drop_fates_removes_exactly_what_compute_fates_wrote(sample_adata):
    """``drop_fates`` names the keys ``compute_fates`` writes a second time: this keeps the two lists one."""
    adata = sample_adata
    compute_velocity_kernel(adata)

    def keys(a):
        return {kind: set(getattr(a, kind).keys()) for kind in ("obs", "obsm", "varm", "uns", "obsp", "layers")}

    before = keys(adata)
    F.compute_fates(adata, n_states=4, cluster_key=Key.obs.TRUE_LINEAGE, n_cells=20)
    added = {kind: keys(adata)[kind] - before[kind] for kind in before}
    removed = F.drop_fates(adata)
    assert keys(adata) == before
    assert len(removed) == sum(map(len, added.values()))


def test_a_models_velocity_distribution_feeds_the_kernel(sample_adata):
    """``variance_key``: a model's own per-cell velocity variance replaces the kNN estimate."""
    adata = sample_adata
    det = compute_velocity_kernel(adata, connectivity_weight=0.0).toarray()
    adata.layers["velocity_var"] = np.zeros(adata.shape, dtype=np.float32)
    sto0 = compute_velocity_kernel(
        adata, mode="stochastic", variance_key="velocity_var", connectivity_weight=0.0
    ).toarray()
    np.testing.assert_allclose(sto0, det, atol=1e-12)  # no spread: the deterministic kernel
    knn = compute_velocity_kernel(adata, mode="stochastic", connectivity_weight=0.0).toarray()
    assert np.abs(knn - det).max() > 1e-3  # the kNN estimate is another distribution
    params = adata.uns[Key.uns.TRANSITIONS_PARAMS]["params"]
    assert params["model"] == "stochastic"
    assert "variance_key" not in params
    with pytest.raises(ValueError, match="not found"):
        compute_velocity_kernel(adata, mode="stochastic", variance_key="no_such_layer")


def test_missing_pygpcca_is_a_message(monkeypatch):
    """pygpcca is installed without its pins (.ci/setup); without it the fate maps say how to get it."""
    from explorer._types import InputError
    from explorer.graph import fates

    for name in ("pygpcca", "pygpcca._gpcca", "pygpcca.utils"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(InputError, match=r"pip install --no-deps pygpcca==1\.0\.4"):
        fates._pygpcca()
