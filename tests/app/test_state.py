"""ExplorerState and jobs, without a server: selections, runs, progress, cancellation, cache."""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

from explorer._types import InputError, Progress
from explorer.app import state as state_module
from explorer.app.geometry import binned_mean, nearest, points_in_box, points_in_polygon
from explorer.app.jobs import Fit, Job, fit_key, fit_label
from explorer.app.readouts import COLOR_TERMINAL, velocity_agreement
from explorer.app.state import COLOR_EXPRESSION, COLOR_LATENT_TIME, ExplorerState
from explorer.keys import Key


@pytest.fixture
def state(app_adata):
    return ExplorerState(app_adata, dataset="test")


# ------------------------------------------------------------------ pure helpers
def test_nearest_scales_each_axis_by_its_range():
    x = np.array([0.0, 10.0, 0.0])
    y = np.array([0.0, 0.0, 0.1])
    # unscaled, (0, 0.09) is nearest to point 2; with y spanning only 0.1 it is still point 2,
    # but (4, 0) is nearer to point 0 than to point 1 once x is scaled by 10
    assert nearest(x, y, 0.0, 0.09) == 2
    assert nearest(x, y, 4.0, 0.0) == 0
    assert nearest(np.array([np.nan, 1.0]), np.array([0.0, 1.0]), 0.0, 0.0) == 1


def test_points_in_box_and_polygon():
    x = np.array([0.0, 1.0, 2.0, 3.0])
    y = np.array([0.0, 1.0, 2.0, 3.0])
    assert points_in_box(x, y, (2.5, 0.5, 0.5, 2.5)).tolist() == [1, 2]
    triangle = np.array([[-1.0, -1.0], [4.0, -1.0], [-1.0, 4.0]])  # x + y <= 3
    assert points_in_polygon(x, y, triangle).tolist() == [0, 1]


def test_velocity_agreement_is_cosine_over_shared_finite_genes():
    a = np.array([[1.0, 0.0, np.nan], [1.0, 1.0, 5.0], [0.0, 0.0, 1.0]])
    b = np.array([[1.0, 0.0, 3.0], [-1.0, -1.0, 1.0], [1.0, 0.0, 0.0]])
    got = velocity_agreement(a, b)
    np.testing.assert_allclose(got[:2], [1.0, -1.0], atol=1e-6)  # gene 2 has a NaN: left out
    assert np.isnan(got[2])  # a zero vector has no direction


def test_binned_mean_of_a_line_is_the_line():
    x = np.linspace(0, 1, 1001)
    centres, means = binned_mean(x, 2 * x + 1, n_bins=10)
    np.testing.assert_allclose(means, 2 * centres + 1, atol=1e-3)


def test_fit_key_ignores_order_and_label_names_changes():
    assert fit_key("dynamical", {"a": 1, "b": 2.0}) == fit_key("dynamical", {"b": 2.0, "a": 1})
    assert fit_key("dynamical", {"a": 1}) != fit_key("dynamical", {"a": 2})
    assert (
        fit_label("dynamical", {"max_iter": 5, "seed": 0}, {"max_iter": 10, "seed": 0})
        == "dynamical (max_iter=5)"
    )
    assert fit_label("stochastic", {}, {"seed": 0}) == "stochastic"


# --------------------------------------------------------------------- jobs
def test_job_reports_progress_then_result():
    seen: list[Progress] = []
    done: list[int] = []

    def work(progress):
        for i in range(3):
            progress(Progress(i + 1, 3, "step"))
        return 42

    job = Job(work, on_progress=seen.append, on_done=done.append).start()
    assert job.join(5)
    assert done == [42]
    assert job.outcome == "done"
    assert seen[-1].step == 3  # the last report always gets through


def test_job_cancel_stops_at_next_report():
    started = threading.Event()
    cancelled: list[bool] = []
    steps: list[int] = []

    def work(progress):
        for i in range(1000):
            started.set()
            steps.append(i)
            progress(Progress(i, 1000))
            time.sleep(0.002)
        return "finished"

    job = Job(
        work, on_cancelled=lambda: cancelled.append(True), on_done=lambda v: cancelled.append(False)
    ).start()
    started.wait(5)
    job.cancel()
    assert job.join(5)
    assert job.outcome == "cancelled"
    assert cancelled == [True]
    assert len(steps) < 1000


def test_job_error_becomes_a_callback(caplog):
    """A refused input is a message, logged without a traceback; any other failure keeps its traceback.

    Each refusal (fates on too few cells, ...) wrote a full traceback at ERROR to the server's log.
    """
    errors: list[BaseException] = []

    def work(progress):
        msg = "bad input"
        raise InputError(msg)

    def broken(progress):
        return 1 / 0

    with caplog.at_level("INFO", logger="explorer.app.jobs"):
        job = Job(work, on_error=errors.append).start()
        job.join(5)
        assert job.outcome == "error"
        assert isinstance(errors[0], InputError)
        assert [(r.levelname, r.exc_info) for r in caplog.records] == [("INFO", None)]
        assert "bad input" in caplog.records[0].getMessage()
        caplog.clear()
        Job(broken, on_error=errors.append).start().join(5)
        assert isinstance(errors[1], ZeroDivisionError)
        assert [r.levelname for r in caplog.records] == ["ERROR"] and caplog.records[0].exc_info


def test_job_keeps_the_warnings_explorer_logs_on_its_thread():
    """A model's warnings during a job reach the page; another thread's and non-explorer ones do not."""
    import logging

    release = threading.Event()

    def elsewhere():
        logging.getLogger("explorer.models").warning("another session's note")
        release.set()

    def work(progress):
        logging.getLogger("explorer.models.vae").warning("capture times agree %s", "poorly")
        logging.getLogger("explorer.models.vae").info("just progress")
        logging.getLogger("numba").warning("not ours")
        threading.Thread(target=elsewhere).start()
        release.wait(5)
        return 1

    done: list[int] = []
    job = Job(work, on_done=done.append).start()
    assert job.join(5) and done == [1]
    assert job.warnings == ["capture times agree poorly"]
    # the handler is gone once the job ends
    assert not any(type(h).__name__ == "_ThreadWarnings" for h in logging.getLogger("explorer").handlers)


# -------------------------------------------------------------------- state
def test_state_starts_with_defaults(state, app_adata):
    assert state.basis == Key.obsm.UMAP
    assert state.color_by == Key.obs.CLUSTERS
    assert state.gene in app_adata.var_names
    assert state.cell is None
    assert state.results == {}
    assert COLOR_EXPRESSION in state.param.color_by.objects
    assert state.fate_states == 10  # 300 cells hold 10 macrostates of 30 typical cells


def test_the_macrostates_asked_for_by_default_fit_the_cells(app_adata):
    """100 cells hold 3 macrostates of 30 typical cells: Compute fates asks for 3, not 10.

    On scVelo's 100-cell dentate gyrus the app's default 10 was refused every time.
    """
    small = ExplorerState(app_adata[:100].copy(), dataset="small")
    assert small.fate_states == 3
    small.set_data(app_adata.copy(), name="whole")  # another data set: its own default
    assert small.fate_states == 10
    small.set_data(app_adata[:40].copy(), name="tiny")
    assert small.fate_states == 2  # the fewest GPCCA takes (fates then say 40 cells are too few)


def test_cells_are_first_coloured_by_their_types_under_a_usual_name(app_adata):
    """A batch column first, the types under ``cell_type`` and no ``clusters``: the types colour the cells."""
    adata = app_adata.copy()
    types = adata.obs.pop(Key.obs.CLUSTERS)
    adata.obs.insert(0, "batch", pd.Categorical(np.arange(adata.n_obs) % 2))
    adata.obs["cell_type"] = types
    assert ExplorerState(adata).color_by == "cell_type"
    # without a usual name, the first categorical column, as before
    adata.obs = adata.obs.rename(columns={"cell_type": "annotation"})
    assert ExplorerState(adata).color_by == "batch"


def test_set_data_rejects_data_without_moments():
    bare = AnnData(np.ones((5, 3), dtype=np.float32))
    with pytest.raises(InputError, match="Ms"):
        ExplorerState(bare)


def test_select_gene_exact_case_insensitive_and_unknown(state, app_adata):
    name = str(app_adata.var_names[3])
    state.select_gene(name.upper())
    assert state.gene == name
    with pytest.raises(InputError, match="not found.*Similar names: gene_0001"):
        state.select_gene("gene_0001x")
    assert state.gene == name


def test_select_cell_by_click_picks_the_nearest_cell(state):
    xy = state.embedding()
    index = state.select_cell_at("embedding", float(xy[17, 0]), float(xy[17, 1]))
    assert index == 17
    assert state.cell == 17
    ms, mu = state.gene_values("Ms"), state.gene_values("Mu")
    state.select_cell_at("phase", float(ms[5]), float(mu[5]))
    assert state.cell in set(np.flatnonzero((ms == ms[5]) & (mu == mu[5])))
    with pytest.raises(InputError, match="out of range"):
        state.select_cell(10_000)


def test_select_cells_in_box(state):
    xy = state.embedding()
    x0, x1 = np.quantile(xy[:, 0], [0.2, 0.5])
    y0, y1 = np.quantile(xy[:, 1], [0.2, 0.8])
    state.select_cells_in(bounds=(x0, y0, x1, y1))
    expected = np.flatnonzero((xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1))
    assert state.selected.tolist() == expected.tolist()
    assert len(expected) > 10


def test_coloring_follows_choice(state, app_adata):
    cats = state.coloring()
    assert cats.kind == "category"
    assert set(cats.color_key) == {"early", "mid", "late", "end"}
    state.color_by = COLOR_EXPRESSION
    expr = state.coloring()
    np.testing.assert_allclose(expr.values, np.asarray(app_adata.layers["Ms"][:, state.gene_index]).ravel())
    state.color_by = COLOR_LATENT_TIME
    assert state.coloring().kind == "none"  # no fit, no obs latent_time yet


def test_run_model_reports_progress_lands_in_cache_and_becomes_active(state):
    fractions: list[float] = []
    state.param.watch(lambda e: fractions.append(e.new), "progress")
    job = state.run_model("stochastic")
    assert job is not None
    assert job.join(120)
    assert state.error == ""
    assert list(state.results) == ["stochastic"]
    assert state.model == "stochastic"
    assert not state.running
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    fit = state.fit
    assert fit.transitions is not None
    np.testing.assert_allclose(np.asarray(fit.transitions.sum(axis=1)).ravel(), 1.0, atol=1e-6)
    assert fit.velocity_embedding[Key.obsm.UMAP].shape == (state.adata.n_obs, 2)
    assert fit.confidence.shape == (state.adata.n_obs,)
    # the same model and parameters again: served from the cache, no new job
    assert state.run_model("stochastic") is None
    assert state.status.endswith("cached")
    # the data shown is never written to
    assert Key.layers.VELOCITY not in state.adata.layers


def test_gene_table_shows_the_active_fit(state):
    before = state.gene_table()
    assert before.columns.tolist() == ["gene", "mean Ms", "mean Mu"]  # no fit: no fit columns
    state.run_model("steady_state").join(120)
    table = state.gene_table()
    assert {"R²", "gamma", "velocity gene"} <= set(table.columns)
    # a steady-state fit's R² is its R², never shown as a likelihood; no dynamical columns
    assert not {"likelihood", "alpha", "switch time"} & set(table.columns)
    gamma = state.fit.result.gene_params[Key.var.GAMMA].to_numpy()
    np.testing.assert_allclose(table["gamma"].to_numpy(), gamma)


def test_a_fit_without_a_per_gene_figure_opens_and_lists_the_genes_it_trusts_first(app_adata):
    """No goodness of fit to rank by (a vector field's own result): velocity genes before the others.

    Until 2026-12-05 such a fit opened on the data's first gene and the table kept the
    file's order, unfitted genes among the first rows.
    """
    import dataclasses

    from explorer.app.views.genes import GeneBrowser

    adata = app_adata.copy()
    fitted = ExplorerState(adata, dataset="t")
    assert fitted.run_model("stochastic").join(120), fitted.error
    trusted = np.zeros(adata.n_vars, dtype=bool)
    trusted[[3, 7, 20]] = True
    empty = pd.DataFrame(index=adata.var_names)
    bare = dataclasses.replace(fitted.fit.result, likelihood=None, velocity_genes=trusted, gene_params=empty)
    opened = ExplorerState._default_gene(adata, Fit(label="v", key=("v", ()), result=bare))
    assert opened == adata.var_names[3]
    fitted._add_fit(Fit(label="bare", key=("bare", ()), result=bare))
    table = GeneBrowser._ordered(fitted.gene_table())
    assert table["gene"].tolist()[:3] == list(adata.var_names[[3, 7, 20]])
    assert table["velocity gene"].tolist() == [True] * 3 + [False] * (adata.n_vars - 3)


def test_a_page_opens_on_a_well_fitted_gene_the_cells_express(app_adata):
    """Not on the best fit of a gene nearly no cell expresses: a stored steady-state fit of the
    pancreas opened on Stmn2 (R² 0.996, Ms above 0 in 5% of the cells) until 2026-12-05.
    """
    adata = app_adata.copy()
    fitted = ExplorerState(adata, dataset="t")
    assert fitted.run_model("stochastic").join(120), fitted.error
    fit = fitted.fit
    like = fit.result.likelihood.where(np.asarray(fit.result.velocity_genes, dtype=bool))
    best, second = like.sort_values(ascending=False).index[:2]
    assert ExplorerState._default_gene(adata, fit) == best
    j = adata.var_names.get_loc(best)
    ms = np.array(adata.layers[Key.layers.MS], dtype=np.float32)
    ms[adata.n_obs // 20 :, j] = 0  # expressed in 5% of the cells
    adata.layers[Key.layers.MS] = ms
    assert ExplorerState._default_gene(adata, fit) == second
    ms[adata.n_obs // 10 :, j] = 0  # 10%: expressed enough
    ms[: adata.n_obs // 10, j] = 1.0
    adata.layers[Key.layers.MS] = ms
    assert ExplorerState._default_gene(adata, fit) == best


def test_cell_info_lists_most_likely_next_cells(state):
    state.run_model("stochastic").join(120)
    state.select_cell(11)
    info = state.cell_info()
    assert info.cluster == str(state.adata.obs[Key.obs.CLUSTERS].iloc[11])
    row = state.fit.transitions[11].toarray().ravel()
    row[11] = 0
    assert info.targets["index"].tolist() == list(np.argsort(-row, kind="stable")[: state.n_targets])
    assert info.targets["probability"].is_monotonic_decreasing


def test_cancel_run_leaves_no_result(state, monkeypatch):
    def slow_fit(adata, model, params, *, basis, label, progress):
        for i in range(2000):
            progress(Progress(i, 2000, "slow"))
            time.sleep(0.002)
        pytest.fail("the fit should have been cancelled")

    monkeypatch.setattr(state_module, "fit_and_derive", slow_fit)
    job = state.run_model("stochastic")
    while state.progress == 0:
        time.sleep(0.01)
    state.cancel_run()
    assert job.join(10)
    assert job.outcome == "cancelled"
    assert state.results == {}
    assert not state.running
    assert state.status.endswith("cancelled")


def test_failed_run_sets_an_error_message(state, monkeypatch):
    def broken(*args, **kwargs):
        msg = "no convergence"
        raise RuntimeError(msg)

    monkeypatch.setattr(state_module, "fit_and_derive", broken)
    state.run_model("stochastic").join(10)
    assert "no convergence" in state.error
    assert not state.running


def test_sessions_do_not_share_selections_or_runs(app_adata):
    one, two = ExplorerState(app_adata), ExplorerState(app_adata)
    one.select_gene(str(app_adata.var_names[5]))
    one.select_cell(3)
    one.run_model("steady_state").join(120)
    assert two.cell is None
    assert two.gene != one.gene
    assert two.results == {}


# ------------------------------------------------------------------ fates
def test_other_macrostates_compute_the_fates_again_instead_of_reading_the_cache(state):
    """Fates are cached per fit *and* settings: another number of macrostates computes them again.

    Until 2026-12-05 a fit's fates were cached by its label alone, so after Compute fates
    with 4 macrostates, asking for 6 answered "cached" with the 4-state fates.
    """
    assert state.run_model("stochastic").join(120), state.error
    state.fate_states = 4
    assert state.compute_fates().join(120), state.error
    four = state.active_fates()
    assert (four.n_states, len(state.terminal_choices())) == (4, 4)
    state.fate_states = 6
    job = state.compute_fates()
    assert job is not None and job.join(120), state.error
    six = state.active_fates()
    assert (six.n_states, len(state.terminal_choices())) == (6, 6)
    assert state.compute_fates() is None and state.status.endswith("cached")  # the same settings


def test_terminal_states_ticked_among_the_macrostates_reuse_them_and_give_their_fates(state, monkeypatch):
    """Ticked terminal states: only the absorption is computed again, and it equals a fresh computation."""
    from explorer.app.fits import fit_fates
    from explorer.graph import fates as fates_module

    assert state.run_model("stochastic").join(120), state.error
    state.fate_states = 6
    assert state.compute_fates().join(120), state.error
    found = state.active_fates()
    assert state.fate_terminal == list(found.names)  # what the boxes show: the states found
    assert state.coloring().categories == found.names  # the cells coloured by them
    choices = dict(state.terminal_choices())
    # the boxes show each macrostate's coarse self-transition, as the fates wrote them (uns['coarse_fwd'])
    coarse = state.fate_bases[state.model].light.uns[Key.uns.COARSE_TRANSITIONS]
    assert choices == pytest.approx(dict(zip(coarse.obs_names, np.diag(coarse.X), strict=True)))
    assert all(choices[n] >= fates_module.STABILITY_THRESHOLD for n in found.names)
    # the least stable macrostate, which the rule left out, ticked with the first found
    least = min(choices, key=choices.get)
    picked = [found.names[0], least]
    state.fate_terminal = picked

    def no_gpcca(*_, **__):
        raise AssertionError("GPCCA ran again for terminal states among the same macrostates")

    monkeypatch.setattr(fates_module, "macrostates", no_gpcca)
    first = state.fate_bases[state.model].light
    assert state.compute_fates().join(120), state.error
    monkeypatch.undo()
    # written into a light AnnData of its own: the first fates' keys are whole (an export reads them)
    assert state.fate_bases[state.model].light is not first
    assert tuple(first.obs[Key.obs.TERMINAL_STATES].cat.categories) == found.names
    chosen = state.active_fates()
    assert chosen.chosen and set(chosen.names) == set(picked) and "(chosen)" in state.status
    # recoloured by the states ticked (the colouring was remembered by the fates' source alone)
    assert state.color_by == COLOR_TERMINAL and state.coloring().categories == chosen.names
    fresh, _ = fit_fates(state.adata, state.fit, n_states=6, terminal_states=list(chosen.names))
    np.testing.assert_allclose(chosen.probabilities, fresh.probabilities, atol=1e-6)
    np.testing.assert_allclose(chosen.probabilities.sum(axis=1), 1.0, atol=1e-6)
    # the boxes cleared: CellRank's rule again
    state.fate_terminal = []
    assert state.compute_fates().join(120), state.error
    assert state.active_fates().names == found.names and not state.active_fates().chosen
    # another number of macrostates offers nothing until computed (the names were the 6 states')
    state.fate_states = 4
    assert state.terminal_choices() == [] and state.fate_terminal == []


def test_back_to_the_settings_of_the_fates_shown_their_macrostates_are_offered_again(state, monkeypatch):
    """4 macrostates computed, 5 refused (none stable), 4 again: the cached fates' boxes come back."""
    from explorer.app.fits import NoTerminalStateFound, fit_fates

    assert state.run_model("stochastic").join(120), state.error
    state.fate_states = 4
    assert state.compute_fates().join(120), state.error
    four = [name for name, _ in state.terminal_choices()]
    _, five = fit_fates(state.adata, state.fit, n_states=5)

    def refused(*_, **__):
        raise NoTerminalStateFound("No macrostate is stable enough to be terminal (made up).", five)

    monkeypatch.setattr(state_module, "fit_fates", refused)
    state.fate_states = 5
    state.compute_fates().join(120)
    assert "made up" in state.error and len(state.terminal_choices()) == 5  # noqa: PLR2004
    state.fate_states = 4
    assert state.compute_fates() is None and state.status.endswith("cached")
    assert [name for name, _ in state.terminal_choices()] == four
    assert state.fate_terminal == list(state.active_fates().names)


def test_the_kernel_mode_reads_the_fits_velocity_variance_as_explorer_fates_does(state):
    """Compute fates on a stochastic kernel uses the fit's own velocity variance, as the CLI.

    A fit with ``layers['velocity_variance']`` (VeloVAE's posterior gives one): the app's
    fates equal those of the fit written into the data, its kernel computed there with that
    variance and GPCCA run on it (what ``explorer fates --mode stochastic`` does). The
    deterministic kernel is then another computation, not the cache.
    """
    import dataclasses

    from explorer.graph.fates import compute_fates
    from explorer.graph.kernels import compute_velocity_kernel

    assert state.run_model("stochastic").join(120), state.error
    base = state.fit.result
    rng = np.random.default_rng(0)
    spread = np.nanvar(base.velocity, axis=0, keepdims=True)
    variance = (rng.random(base.velocity.shape) * spread).astype(np.float32)
    result = dataclasses.replace(base, layers={**base.layers, Key.layers.VELOCITY_VARIANCE: variance})
    state._add_fit(Fit(label="with variance", key=("with variance", ()), result=result))
    state.param.update(fate_states=4, fate_mode="stochastic")
    assert state.compute_fates().join(120), state.error
    found = state.active_fates()
    assert found.mode == "stochastic" and found.source == "computed for with variance, stochastic kernel"
    adata = state.adata.copy()
    result.to_adata(adata)
    compute_velocity_kernel(adata, mode="stochastic", variance_key=Key.layers.VELOCITY_VARIANCE)
    expected = compute_fates(adata, n_states=4, cluster_key=Key.obs.CLUSTERS)
    assert found.names == tuple(expected.terminal_states)
    np.testing.assert_allclose(found.probabilities, expected.fate_probabilities, atol=1e-5)
    state.fate_mode = "deterministic"
    assert state.compute_fates().join(120), state.error
    plain = state.active_fates()
    assert plain.mode == "deterministic" and state.status != "fates of with variance: cached"
    assert plain.names == found.names  # the same states (end_1, end_2), other probabilities (0.065 apart)
    assert np.abs(plain.probabilities - found.probabilities).max() > 0.01  # noqa: PLR2004


def test_comparison_of_two_fits(state):
    state.run_model("steady_state").join(120)
    state.run_model("stochastic").join(120)
    assert (state.compare_a, state.compare_b) == ("steady_state", "stochastic")
    quality = state.compare_quality()
    assert len(quality) > 0
    agreement = state.compare_agreement()
    assert agreement.shape == (state.adata.n_obs,)
    finite = agreement[np.isfinite(agreement)]
    assert ((finite >= -1 - 1e-6) & (finite <= 1 + 1e-6)).all()
    target = quality.iloc[len(quality) // 2]
    assert state.select_gene_near(target["a"], target["b"]) == target["gene"]


def test_a_new_fit_is_compared_with_the_one_shown_before_it_unless_a_was_picked(state):
    """B is each new fit; A the fit active before it, or the fit picked as A in the Compare tab.

    A refit with other parameters (``steady_state (min_r2=0.05)``) was compared with the
    session's first fit until 2026-12-04 (on the bundled sample, the file's stochastic fit,
    not the dynamical fit it varies); a fit picked as A by hand stays A.
    """
    state.run_model("steady_state").join(120)
    state.run_model("stochastic").join(120)
    assert (state.compare_a, state.compare_b) == ("steady_state", "stochastic")
    state.run_model("steady_state", min_r2=0.05).join(120)
    varied = state.model
    assert varied != "steady_state" and (state.compare_a, state.compare_b) == ("stochastic", varied)
    state.compare_a = "steady_state"  # picked in the Compare tab
    state.run_model("stochastic", min_r2=0.05).join(120)
    assert (state.compare_a, state.compare_b) == ("steady_state", state.model)
    assert state.model not in ("stochastic", varied)


def test_export_writes_results_and_protects_the_input(state, tmp_path, app_adata):
    import anndata as ad

    state.data_dir = tmp_path
    state.dataset_path = tmp_path / "input.h5ad"
    state.run_model("stochastic").join(120)
    path = state.export_h5ad("out.h5ad")
    back = ad.read_h5ad(path)
    np.testing.assert_allclose(back.layers[Key.layers.VELOCITY], state.fit.result.velocity, equal_nan=True)
    assert Key.obsp.TRANSITIONS in back.obsp
    assert Key.obsm.velocity("umap") in back.obsm
    assert back.uns[Key.uns.VELOCITY_PARAMS]["mode"] == "stochastic"
    with pytest.raises(InputError, match="input file"):
        state.export_h5ad("input.h5ad")
    with pytest.raises(InputError, match="'..'"):
        state.export_h5ad("../escape.h5ad")
    with pytest.raises(InputError, match=".h5ad"):
        state.export_h5ad("out.csv")


def test_the_export_holds_the_fates_shown_and_cellrank_reads_them(state, tmp_path):
    """Save .h5ad after Compute fates writes them too (CellRank 2's keys), with the terminal states ticked.

    Until 2026-12-05 the export wrote the fit alone: fates computed (and terminal states
    chosen) in the app were lost with the session. The saved file reopens with the same
    fates in the app and in CellRank 2.0.7 (``GPCCA.from_adata``), where it is installed.
    """
    from explorer.app import readouts
    from explorer.data.io import read
    from tests.graph.test_fates import _compat_python, cellrank_reads

    state.data_dir = tmp_path
    assert state.run_model("stochastic").join(120), state.error
    assert state.export_h5ad("fit_only.h5ad") and state.status == "saved fit_only.h5ad"
    assert readouts.fates_from_adata(read(tmp_path / "fit_only.h5ad")) is None
    state.fate_states = 4
    assert state.compute_fates().join(120), state.error
    choices = dict(state.terminal_choices())
    state.fate_terminal = [state.active_fates().names[0], min(choices, key=choices.get)]
    assert state.compute_fates().join(120), state.error
    shown = state.active_fates()
    path = state.export_h5ad("with_fates.h5ad")
    assert state.status == "saved with_fates.h5ad (the fit and its fates)"
    back = read(path)
    assert list(back.obs[Key.obs.TERMINAL_STATES].cat.categories) == list(shown.names)
    np.testing.assert_allclose(back.obsm[Key.obsm.FATE_PROBABILITIES], shown.probabilities, atol=1e-6)
    assert back.uns[Key.uns.ESTIMATOR_PARAMS][Key.obs.TERMINAL_STATES]["method"] == "set"  # chosen
    reopened = readouts.fates_from_adata(back)
    assert reopened.names == shown.names
    np.testing.assert_allclose(reopened.probabilities, shown.probabilities, atol=1e-6)
    np.testing.assert_allclose(back.layers[Key.layers.VELOCITY], state.fit.result.velocity, equal_nan=True)
    if _compat_python() is None:
        return
    res = cellrank_reads(path, tmp_path)
    assert res["terminal"] == list(shown.names) == res["lineages"]
    assert res["macro"] == [name for name, _ in state.terminal_choices()]
    np.testing.assert_allclose(res["fates"], shown.probabilities, atol=1e-6)


def test_the_files_fates_are_saved_with_its_own_fit_and_left_out_with_another(app_adata, tmp_path):
    """A file with ``explorer fates``' keys: saved with its own fit they stay; with a new fit they go.

    They were computed from the file's velocity; until 2026-12-05 a session's new fit was
    saved beside them, and CellRank read them as that fit's fates.
    """
    from explorer.app import readouts
    from explorer.data.io import read
    from explorer.graph.fates import compute_fates
    from explorer.graph.kernels import compute_velocity_kernel
    from explorer.models.steady_state import Stochastic

    adata = app_adata.copy()
    Stochastic(seed=0).fit(adata).to_adata(adata)
    compute_velocity_kernel(adata)
    compute_fates(adata, n_states=4, cluster_key=Key.obs.CLUSTERS)
    state = ExplorerState(adata, dataset="fates.h5ad", data_dir=tmp_path)
    assert state.file_fates() is not None
    own = read(state.export_h5ad("own.h5ad"))
    assert state.status == "saved own.h5ad"
    assert readouts.fates_from_adata(own).names == state.file_fates().names
    assert state.run_model("steady_state").join(120), state.error
    other = read(state.export_h5ad("other.h5ad"))
    assert "the file's fates, computed from its own velocity, left out" in state.status
    assert readouts.fates_from_adata(other) is None
    assert Key.obsm.FATE_PROBABILITIES not in other.obsm and Key.obs.TERMINAL_STATES not in other.obs
    assert other.uns[Key.uns.VELOCITY_PARAMS]["mode"] == "steady_state"


def test_stored_velocity_opens_as_a_fit(state, tmp_path):
    state.run_model("stochastic").join(120)
    exported = state.results_adata()
    exported.obs[Key.obs.LATENT_TIME] = np.linspace(0, 1, exported.n_obs)
    reopened = ExplorerState(exported, dataset="exported")
    assert list(reopened.results) == ["stochastic (from file)"]
    assert reopened.fit.transitions is not None
    np.testing.assert_allclose(
        reopened.latent_time(), exported.obs[Key.obs.LATENT_TIME].to_numpy(), atol=1e-6
    )
    assert isinstance(reopened.gene_table(), pd.DataFrame)


def test_stored_velocity_without_a_graph_gets_one_in_the_background(app_adata, monkeypatch):
    """A file with velocity alone (``result.to_adata`` without ``explorer fit``'s graph) draws streamlines.

    The velocity graph is derived off the event loop as ``explorer fit`` derives it: the
    projection is :func:`explorer.pipeline.derive`'s on the same velocity. Without a neighbour
    graph the page says why there are none.
    """
    from explorer.models import get_model
    from explorer.pipeline import derive

    result = get_model("stochastic").fit(app_adata)
    stored = app_adata.copy()
    result.to_adata(stored)
    for key in (Key.obsp.VELOCITY_GRAPH, Key.obsp.VELOCITY_GRAPH_NEG, Key.obsp.TRANSITIONS):
        assert key not in stored.obsp
    opened = ExplorerState(stored, dataset="velocity only")
    assert opened.streamlines() == []
    assert "computing the velocity graph" in opened.streamlines_note()
    revision = opened.readout_revision
    for job in opened.background_jobs():
        assert job.join(120)
    assert opened.readout_revision == revision + 1
    lines = opened.streamlines()
    assert len(lines) > 0 and opened.streamlines_note() == ""
    assert opened.fit.transitions is not None
    expected = derive(stored, opened.fit.result).project(np.asarray(stored.obsm[Key.obsm.UMAP]))
    np.testing.assert_allclose(opened.velocity_embedding(), expected[:, :2], rtol=1e-4, atol=1e-6)

    no_graph = stored.copy()
    for key in (Key.obsp.DISTANCES, Key.obsp.CONNECTIVITIES):
        del no_graph.obsp[key]
    bare = ExplorerState(no_graph, dataset="no neighbours")
    assert bare.streamlines() == [] and bare.background_jobs() == []
    assert "no neighbour graph" in bare.streamlines_note()
    bare.show_streamlines = False
    assert bare.streamlines_note() == ""
    # above AUTO_GRAPH_CELLS no session starts the (minutes-long) job: the note says so
    monkeypatch.setattr(state_module, "AUTO_GRAPH_CELLS", stored.n_obs - 1)
    large = ExplorerState(stored.copy(), dataset="large")  # not the first one's shared fit
    assert large.streamlines() == [] and large.background_jobs() == []
    assert "does not compute one" in large.streamlines_note()


def test_sessions_opening_a_stored_velocity_meanwhile_share_one_velocity_graph(app_adata, monkeypatch):
    """Three sessions open one file with velocity alone while its graph is computed: it is computed once.

    Each session used to start its own job (minutes and gigabytes each on a large file);
    now the later ones wait for the first's, and all three draw streamlines from it.
    """
    from explorer.models import get_model

    stored = app_adata.copy()
    get_model("stochastic").fit(app_adata).to_adata(stored)
    calls, release = [], threading.Event()
    real = state_module.derive

    def slow_derive(*args, **kwargs):
        calls.append(threading.get_ident())
        assert release.wait(60)  # every session has asked before the first computation ends
        return real(*args, **kwargs)

    monkeypatch.setattr(state_module, "derive", slow_derive)
    sessions = [ExplorerState(stored, dataset="velocity only") for _ in range(3)]
    for opened in sessions:
        assert opened.streamlines() == []
        assert "computing the velocity graph" in opened.streamlines_note()
    time.sleep(0.2)
    release.set()
    for opened in sessions:
        for job in opened.background_jobs():
            assert job.join(120)
    assert len(calls) == 1
    assert all(len(opened.streamlines()) > 0 for opened in sessions)
    assert sessions[0].fit is sessions[2].fit  # the file's fit, shared, carries the graph


def test_a_shared_computation_that_fails_reaches_every_waiter_and_is_tried_again():
    """``Memo.get_once``: one computation per key at a time; a failure is raised to all, not kept."""
    from explorer.app.memo import Memo

    memo, started, release, calls = Memo(4), threading.Event(), threading.Event(), []

    def failing():
        calls.append(1)
        started.set()
        assert release.wait(10)
        raise ValueError("no graph")

    errors = []

    def ask():
        try:
            memo.get_once("k", failing)
        except ValueError as err:
            errors.append(str(err))

    first = threading.Thread(target=ask)
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=ask)
    second.start()
    time.sleep(0.1)
    release.set()
    first.join(10), second.join(10)
    assert errors == ["no graph", "no graph"] and len(calls) == 1
    assert memo.get_once("k", lambda: 7) == 7 and "k" in memo  # tried again, then remembered


def test_loading_a_bad_file_keeps_the_session_and_says_why(state, tmp_path):
    state.data_dir = tmp_path
    (tmp_path / "broken.h5ad").write_text("not an hdf5 file")
    job = state.load("broken.h5ad")
    assert job.join(30)
    assert job.outcome == "error"
    assert "broken.h5ad" in state.error
    assert state.dataset == "test"  # the data shown before is still there
    assert state.load("../elsewhere.h5ad") is None
    assert "'..'" in state.error
    assert state.load("missing.h5ad") is None
    assert "No file" in state.error


def test_loading_a_good_file_switches_dataset(state, tmp_path, app_adata):
    state.data_dir = tmp_path
    (tmp_path / "runs").mkdir()
    app_adata[:120].copy().write_h5ad(tmp_path / "runs" / "part.h5ad")
    state.select_cell(3)
    job = state.load("runs/part.h5ad")
    assert job.join(60)
    assert state.error == ""
    assert state.dataset == "runs/part.h5ad"
    assert state.adata.n_obs == 120
    assert state.cell is None
