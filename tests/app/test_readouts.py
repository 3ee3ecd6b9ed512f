"""The app's read-outs, memo and geometry as pure functions: no Panel, no state, no server.

Values are computed by hand (a gene whose kinetics reach their steady state, a four-cell
transition matrix, genes built to pass or fail each trust check) or taken from a fit.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy import sparse

from explorer._types import InputError
from explorer.app import plots, readouts
from explorer.app.fits import fit_from_adata, model_defaults, results_adata
from explorer.app.geometry import even_sample, time_bins
from explorer.app.jobs import Fit
from explorer.app.memo import Memo, shared_memo
from explorer.keys import Key
from explorer.models import get_model
from explorer.models.base import VelocityResult

N_OBS, N_VARS = 6, 3
#: what a fit that shows "curve" needs in var (with layer fit_t)
_CURVE_KEYS = (Key.var.FIT_ALPHA, Key.var.FIT_BETA, Key.var.FIT_GAMMA, Key.var.FIT_T_)


@pytest.fixture
def toy_adata() -> AnnData:
    """Six cells, three genes: ``Ms`` = row + column, ``Mu`` = half of it, an embedding and clusters."""
    ms = np.add.outer(np.arange(N_OBS), np.arange(N_VARS)).astype(np.float32)
    adata = AnnData(
        np.zeros((N_OBS, N_VARS), dtype=np.float32),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(N_OBS)]),
        var=pd.DataFrame(index=["g0", "g1", "g2"]),
    )
    adata.layers[Key.layers.MS] = ms
    adata.layers[Key.layers.MU] = sparse.csr_matrix(ms / 2)
    adata.obsm[Key.obsm.UMAP] = np.column_stack([np.arange(N_OBS), np.zeros(N_OBS)]).astype(np.float32)
    adata.obs[Key.obs.CLUSTERS] = pd.Categorical(["a", "a", "b", "b", "c", "c"])
    adata.uns["clusters_colors"] = ["#ff0000", "#00ff00", "#0000ff"]
    return adata


def _result(model: str, adata: AnnData, **fields) -> VelocityResult:
    base = {
        "model": model,
        "params": {},
        "obs_names": adata.obs_names,
        "var_names": adata.var_names,
        "velocity": np.ones((adata.n_obs, adata.n_vars), dtype=np.float32),
        "gene_params": pd.DataFrame(index=adata.var_names),
        "velocity_genes": np.ones(adata.n_vars, dtype=bool),
    }
    return VelocityResult(**{**base, **fields})


def _fit(result: VelocityResult, label: str | None = None, **fields) -> Fit:
    return Fit(label=label or result.model, key=(result.model, ()), result=result, **fields)


def _kinetic_params(adata: AnnData) -> pd.DataFrame:
    """Gene 0 induced for good (t_ = 1e4): alpha 4, fit_beta 1, scaling 2 (ODE beta 2), gamma 0.5."""
    return pd.DataFrame(
        {
            Key.var.FIT_ALPHA: [4.0, np.nan, np.nan],
            Key.var.FIT_BETA: [1.0, np.nan, np.nan],
            Key.var.FIT_GAMMA: [0.5, np.nan, np.nan],
            Key.var.FIT_T_: [1e4, np.nan, np.nan],
            Key.var.FIT_SCALING: [2.0, np.nan, np.nan],
            Key.var.FIT_LIKELIHOOD: [0.4, np.nan, np.nan],
        },
        index=adata.var_names,
    )


# ------------------------------------------------------------------ no Panel
def test_readouts_state_and_fits_load_no_panel():
    code = (
        "import sys, explorer.app.readouts, explorer.app.state, explorer.app.fits, explorer.app.memo; "
        "print(sorted({'panel', 'holoviews', 'bokeh'} & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------- memo
def test_memo_keeps_the_most_recently_used_within_its_bound():
    memo, calls = Memo(max_items=2), []

    def compute(value):
        def run():
            calls.append(value)
            return value

        return run

    assert memo.get("a", compute(1)) == 1
    assert memo.get("b", compute(2)) == 2
    assert memo.get("a", compute(99)) == 1  # remembered, and now the most recently used
    assert memo.get("c", compute(3)) == 3  # drops "b", the least recently used
    assert len(memo) == 2
    assert "a" in memo
    assert "b" not in memo
    assert memo.get("b", compute(4)) == 4
    assert calls == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="max_items >= 1"):
        Memo(0)


def test_shared_memo_is_one_per_object_and_dropped_with_it(toy_adata):
    assert shared_memo(toy_adata) is shared_memo(toy_adata)
    other = toy_adata.copy()
    assert shared_memo(other) is not shared_memo(toy_adata)


def test_even_sample_and_time_bins():
    assert even_sample(5, 10).tolist() == [0, 1, 2, 3, 4]
    picked = even_sample(1000, 10)
    assert len(picked) == 10
    assert (np.diff(picked) > 0).all()
    assert picked.tolist() == even_sample(1000, 10).tolist()  # the same sample every time
    which, centres = time_bins(np.array([0.0, 0.5, 1.0, np.nan]), n_bins=2)
    assert which.tolist() == [0, 1, 1, -1]
    np.testing.assert_allclose(centres, [0.25, 0.75])


def test_the_flags_note_counts_each_reason_and_says_when_clusters_were_not_tested():
    """By hand: four genes, three flagged velocity genes; a gene with two reasons counts twice.

    On 100 dentate gyrus cells without cell types the note named "differential kinetics
    across clusters" among the reasons, though that test had not run.
    """
    names = pd.Index(["a", "b", "c", "d"])
    reasons = ["boost", "differential_kinetics,boost", "", "unstable"]
    flags = pd.DataFrame({Key.var.DIAG_FLAG_REASON: reasons}, index=names[::-1])  # read by name
    # by name: a unstable, b none, c differential kinetics and boost, d boost; b not flagged
    flagged = np.array([True, False, True, True])
    note = readouts.flags_summary(flags, flagged, names, has_types=True)
    assert note == (
        "**3** velocity genes flagged (column *flag*): differential kinetics across clusters 1, "
        "transcriptional boost 2, unstable 1."
    )
    only_a = flags.assign(**{Key.var.DIAG_FLAG_REASON: ["", "", "", "boost"]})  # a: boost
    untyped = readouts.flags_summary(only_a, np.array([True, False, False, False]), names, has_types=False)
    assert untyped == (
        "**1** velocity genes flagged (column *flag*): transcriptional boost 1. "
        "No cell types, so differential kinetics across clusters were not tested."
    )


# --------------------------------------------------------------------- shows
def test_fit_shows_what_the_registry_declares_and_the_data_holds(toy_adata):
    fit_t = np.full((N_OBS, N_VARS), 1.0, dtype=np.float32)
    t = np.linspace(0, 1, N_OBS, dtype=np.float32)
    dyn = _result(
        "dynamical",
        toy_adata,
        gene_params=_kinetic_params(toy_adata),
        layers={Key.layers.FIT_T: fit_t},
        latent_time=t,
        uncertainty=t,  # held, but the dynamical model does not declare it
    )
    assert readouts.fit_shows(dyn) == {"curve", "latent_time"}
    assert readouts.held(dyn) == {"curve", "latent_time", "uncertainty"}
    # steady state declares nothing: a latent time read from the file is not its own
    assert readouts.fit_shows(_result("steady_state", toy_adata, latent_time=t)) == frozenset()
    # a model nobody registered (a file from another tool) shows what its data holds
    foreign = _result(
        "someone_elses_model",
        toy_adata,
        layers={Key.layers.PREDICTED_U: fit_t, Key.layers.PREDICTED_S: fit_t, Key.layers.RATE_BETA: fit_t},
        uncertainty=t,
    )
    assert readouts.fit_shows(foreign) == {"cell_points", "cell_rates", "uncertainty"}


# ------------------------------------------------------------ cells and genes
def test_gene_values_latent_time_and_uncertainty(toy_adata):
    np.testing.assert_array_equal(readouts.gene_values(toy_adata, "Ms", 2), np.arange(N_OBS) + 2)
    np.testing.assert_array_equal(readouts.gene_values(toy_adata, "Mu", 1), (np.arange(N_OBS) + 1) / 2)
    assert np.isnan(readouts.gene_values(toy_adata, "velocity", 0)).all()
    velocity = np.arange(N_OBS * N_VARS, dtype=np.float32).reshape(N_OBS, N_VARS)
    fit = _fit(_result("steady_state", toy_adata, velocity=velocity))
    np.testing.assert_array_equal(readouts.gene_values(toy_adata, "velocity", 1, fit), velocity[:, 1])

    assert readouts.latent_time(toy_adata, None) is None
    toy_adata.obs[Key.obs.LATENT_TIME] = np.linspace(0, 1, N_OBS)
    own = np.linspace(1, 0, N_OBS, dtype=np.float32)
    undeclared = _fit(_result("steady_state", toy_adata, latent_time=own))
    np.testing.assert_allclose(readouts.latent_time(toy_adata, undeclared), np.linspace(0, 1, N_OBS))
    declared = _fit(
        _result(
            "dynamical",
            toy_adata,
            latent_time=own,
            gene_params=_kinetic_params(toy_adata),
            layers={Key.layers.FIT_T: np.ones((N_OBS, N_VARS), dtype=np.float32)},
        )
    )
    np.testing.assert_allclose(readouts.latent_time(toy_adata, declared), own)
    assert readouts.uncertainty(toy_adata, declared) is None  # declares none, obs has none


def test_coloring_by_category_gene_velocity_and_rates(toy_adata):
    cats = readouts.coloring(toy_adata, Key.obs.CLUSTERS)
    assert cats.kind == "category"
    assert cats.values.tolist() == [0, 0, 1, 1, 2, 2]
    assert cats.color_key == {"a": "#ff0000", "b": "#00ff00", "c": "#0000ff"}
    expr = readouts.coloring(toy_adata, readouts.COLOR_EXPRESSION, gene="g1")
    assert (expr.kind, expr.label, expr.diverging) == ("continuous", "g1 expression (Ms)", False)
    np.testing.assert_array_equal(expr.values, np.arange(N_OBS) + 1)
    assert readouts.coloring(toy_adata, readouts.COLOR_VELOCITY, gene="g1").kind == "none"
    rates = np.arange(N_OBS * N_VARS, dtype=np.float32).reshape(N_OBS, N_VARS)
    gcn = _fit(_result("someone_elses_model", toy_adata, layers={Key.layers.RATE_GAMMA: rates}))
    velocity = readouts.coloring(toy_adata, readouts.COLOR_VELOCITY, gene="g1", fit=gcn)
    assert velocity.diverging  # velocities are signed: a diverging map centred on 0
    by_gamma = readouts.coloring(toy_adata, "gene: rate gamma (degradation)", gene="g2", fit=gcn)
    assert by_gamma.kind == "continuous"
    np.testing.assert_array_equal(by_gamma.values, rates[:, 2])
    no_alpha = readouts.coloring(toy_adata, "gene: rate alpha (transcription)", gene="g2", fit=gcn)
    assert no_alpha.kind == "none"  # the fit has no alpha layer
    # the menu offers rates and uncertainty only when a fit has them
    plain = readouts.color_options(toy_adata, {})
    assert plain[0] == Key.obs.CLUSTERS
    assert readouts.COLOR_UNCERTAINTY not in plain
    assert not set(readouts.COLOR_RATES) & set(plain)
    assert set(readouts.COLOR_RATES) <= set(readouts.color_options(toy_adata, {"gcn": gcn}))


def test_agreement_coloring(toy_adata):
    assert readouts.agreement_coloring(None, N_OBS).kind == "none"
    shown = readouts.agreement_coloring(np.linspace(-1, 1, N_OBS), N_OBS)
    assert (shown.kind, shown.label) == ("continuous", "velocity agreement (cosine)")


def test_cell_info_lists_next_cells_by_probability(toy_adata):
    # cell 0 moves to 2 (0.6), 1 (0.3) and stays (0.1, never listed)
    rows = [[0.1, 0.3, 0.6, 0, 0, 0], *np.eye(N_OBS)[1:].tolist()]
    fit = _fit(_result("steady_state", toy_adata), transitions=sparse.csr_matrix(np.array(rows)))
    t = np.linspace(0, 1, N_OBS)
    info = readouts.cell_info(toy_adata, fit, 0, n_targets=5, t=t, conf=np.full(N_OBS, 0.7))
    assert (info.name, info.cluster, info.latent_time, info.confidence) == (
        "c0",
        "a",
        0.0,
        pytest.approx(0.7),
    )
    assert info.targets["index"].tolist() == [2, 1]
    assert info.targets["cluster"].tolist() == ["b", "a"]
    np.testing.assert_allclose(info.targets["probability"], [0.6, 0.3])
    assert readouts.cell_info(toy_adata, fit, 0, n_targets=1).targets["cell"].tolist() == ["c2"]
    assert readouts.cell_info(toy_adata, None, 3, n_targets=5).targets.empty


def test_project_on_a_transition_matrix(toy_adata):
    # cells on a line, each likelier to move right (0.8) than left (0.2): velocity along +x,
    # prob * direction minus the mean over the neighbours (scVelo): 0.8 - 0.2 - 0.5 * 0 = 0.6
    n = N_OBS
    right, left = np.zeros((n, n)), np.zeros((n, n))
    for i in range(1, n - 1):
        right[i, i + 1], right[i, i - 1] = 0.8, 0.2
        left[i, i + 1], left[i, i - 1] = 0.2, 0.8
    xy = np.asarray(toy_adata.obsm[Key.obsm.UMAP])
    v = readouts.project(_fit(_result("steady_state", toy_adata), transitions=sparse.csr_matrix(right)), xy)
    assert v.shape == (n, 2)
    assert np.allclose(v[:, 1], 0.0)
    assert (v[1:-1, 0] > 0).all()
    np.testing.assert_allclose(v[1:-1, 0], v[1, 0])  # the same for every inner cell
    back = readouts.project(_fit(_result("steady_state", toy_adata), transitions=sparse.csr_matrix(left)), xy)
    np.testing.assert_allclose(back, -v, atol=1e-6)
    assert readouts.project(_fit(_result("steady_state", toy_adata)), xy) is None


# ----------------------------------------------------------- phase and time
def test_phase_fits_curve_line_and_cell_points(toy_adata):
    fit_t = np.full((N_OBS, N_VARS), 50.0, dtype=np.float32)
    curve = _fit(
        _result(
            "dynamical", toy_adata, gene_params=_kinetic_params(toy_adata), layers={Key.layers.FIT_T: fit_t}
        )
    )
    predicted_s = np.arange(N_OBS * N_VARS, dtype=np.float32).reshape(N_OBS, N_VARS)
    points = _fit(
        _result(
            "someone_elses_model",
            toy_adata,
            layers={Key.layers.PREDICTED_S: predicted_s, Key.layers.PREDICTED_U: predicted_s / 4},
        )
    )
    ratio = _fit(
        _result(
            "steady_state",
            toy_adata,
            gene_params=pd.DataFrame({Key.var.GAMMA: [0.25, 0.5, 1.0]}, index=toy_adata.var_names),
        )
    )
    ms = np.array([0, 1, 2, 3, 4, 10], dtype=np.float32)
    mu = ms / 2
    found = readouts.phase_fits(ms, mu, {"dyn": curve, "pts": points, "ss": ratio}, j=0, active="pts")
    dyn, pts, ss = found
    assert [f.active for f in found] == [False, True, False]
    # slope = scaling gamma / beta_ode = 2 * 0.5 / 2, the steady state (alpha/gamma, alpha) = (8, 4)
    assert dyn.slope == pytest.approx(0.5)
    assert (dyn.s[0], dyn.u[0]) == (0.0, 0.0)
    assert (dyn.s[-1], dyn.u[-1]) == (pytest.approx(8.0, rel=1e-6), pytest.approx(4.0, rel=1e-6))
    np.testing.assert_allclose(dyn.line[-1], [10.0, 5.0])  # to the cells' largest Ms
    assert dyn.points is None
    assert pts.s is None
    assert pts.line is None
    np.testing.assert_array_equal(pts.points, np.column_stack([predicted_s[:, 0], predicted_s[:, 0] / 4]))
    assert ss.slope == 0.25
    assert ss.s is None
    # a gene the dynamical model did not fit draws no curve
    assert readouts.phase_fits(ms, mu, {"dyn": curve}, j=1, active="dyn")[0].s is None


def test_cell_points_are_an_even_sample_of_finite_cells(toy_adata):
    s = np.arange(N_OBS * N_VARS, dtype=np.float32).reshape(N_OBS, N_VARS)
    s[0, 0] = np.nan
    fit = _fit(
        _result(
            "someone_elses_model", toy_adata, layers={Key.layers.PREDICTED_S: s, Key.layers.PREDICTED_U: s}
        )
    )
    assert len(readouts.cell_points(fit, 0)) == N_OBS - 1
    few = readouts.cell_points(fit, 0, max_points=3)
    assert len(few) == 3
    assert np.isfinite(few).all()


def test_fitted_at_cells_and_time_curve(toy_adata):
    fit_t = np.tile(np.array([[0.0], [1.0], [50.0], [50.0], [50.0], [50.0]], dtype=np.float32), (1, N_VARS))
    fit = _fit(
        _result(
            "dynamical", toy_adata, gene_params=_kinetic_params(toy_adata), layers={Key.layers.FIT_T: fit_t}
        )
    )
    at_cells = readouts.fitted_at_cells(fit, 0)
    mu = at_cells["Mu"]
    # u(t) = alpha / beta (1 - exp(-beta t)) with beta 2, Mu = scaling u
    np.testing.assert_allclose(mu[:3], [0.0, 4 * (1 - np.exp(-2.0)), 4.0], rtol=1e-6)
    np.testing.assert_allclose(at_cells["velocity"][2], 0.0, atol=1e-6)
    assert readouts.fitted_at_cells(fit, 1) is None  # gene 1 not fitted
    assert readouts.fitted_at_cells(None, 0) is None
    t = np.array([0.0, 0.1, 0.9, 1.0, np.nan, 0.5])
    x, y, kind = readouts.time_curve(t, np.array([1.0, 3.0, 10.0, 20.0, 99.0, 7.0]), None)
    assert kind == "trend"
    bins = time_bins(t, n_bins=2)
    x, y, kind = readouts.time_curve(t, np.array([1.0, 3.0, 10.0, 20.0, 99.0, 7.0]), None, bins=bins)
    np.testing.assert_allclose(x, [0.25, 0.75])
    np.testing.assert_allclose(y, [2.0, (10 + 20 + 7) / 3])
    _, y, kind = readouts.time_curve(t, None, np.array([2.0, 2.0, 4.0, 4.0, 4.0, 4.0]), bins=bins)
    assert kind == "fit"
    np.testing.assert_allclose(y, [2.0, 4.0])


def test_the_fits_time_curve_breaks_where_the_cells_part():
    """Where the cells at one time have fitted values that part (two lineages), no mean is drawn between them.

    By hand, four bins: a rise shared by all cells, then lineage A rising on and lineage B
    at 0. The mean of the parted bins (5 and 7.5) has no cell within 5% of the range (0 to
    15) of it; a steep but unbroken spread of values (bin 1, 0 to 4 evenly) keeps its mean.
    """
    t = np.repeat([0.1, 0.35, 0.6, 0.85], 5)
    fitted = np.concatenate(
        [
            [0.0, 1.0, 2.0, 3.0, 4.0],  # one rise, cells all along it: mean 2, a cell at 2
            [4.0, 4.5, 5.0, 5.5, 6.0],
            [10.0, 10.0, 10.0, 0.0, 0.0],  # A at 10, B at 0: mean 6, nearest cell 4 away
            [15.0, 15.0, 15.0, 15.0, 0.0],  # mostly A: mean 12, nearest cell 3 away
        ]
    )
    bins = time_bins(t, n_bins=4)
    x, y, kind = readouts.time_curve(t, None, fitted, bins=bins)
    assert kind == "fit" and len(x) == 4
    np.testing.assert_allclose(y[:2], [2.0, 5.0])
    assert np.isnan(y[2:]).all()
    # B's cells at 10 instead of 0: bin 2 is one value (drawn); bin 3's mean (14, between four
    # cells at 15 and one at 10) is 1 from the nearest cell, over 5% of the range 1-15 (0.7)
    _, y, _ = readouts.time_curve(t, None, np.where(fitted > 0, fitted, 10.0), bins=bins)
    assert np.isfinite(y[:3]).all() and np.isnan(y[3])
    # the observed values' trend is never broken
    _, y, kind = readouts.time_curve(t, fitted, None, bins=bins)
    assert kind == "trend" and np.isfinite(y).all()


# --------------------------------------------------------------- gene table
def test_gene_trust_by_hand():
    index = pd.Index(["good", "poor", "unfitted", "late"])
    params = pd.DataFrame(
        {
            Key.var.FIT_LIKELIHOOD: [0.5, 0.05, np.nan, 0.3],
            Key.var.FIT_KINETIC_SIGNAL: [0.8, 0.3, np.nan, 0.6],
            Key.var.FIT_FRAC_STEADY_ON: [0.2, 0.5, np.nan, 0.3],
            Key.var.FIT_FRAC_STEADY_OFF: [0.2, 0.45, np.nan, 0.3],
            Key.var.FIT_N_CELLS_EM: [200.0, 10.0, np.nan, 50.0],
            Key.var.FIT_USES_T_ON: [False, False, False, True],
        },
        index=index,
    )
    trust = readouts.gene_trust(params)
    np.testing.assert_allclose(trust[readouts.TRUST], [1.0, 0.0, np.nan, 1.0])
    notes = trust[readouts.TRUST_NOTES].tolist()
    assert notes[0] == ""
    assert notes[2] == ""
    # the kinetic signal is shown, not judged: fitted rates do not recover it (2026-12-05)
    assert notes[1] == "low likelihood; mostly steady; few cells"
    assert notes[3] == readouts.ONSET_NOTE  # a note, not a failed check
    # the steady-state models: R² is the only check
    r2 = readouts.gene_trust(pd.DataFrame({Key.var.R2: [0.5, 0.001], Key.var.GAMMA: [1.0, 1.0]}))
    np.testing.assert_allclose(r2[readouts.TRUST], [1.0, 0.0])
    assert readouts.gene_trust(pd.DataFrame({Key.var.GAMMA: [1.0]})) is None
    # another model's likelihood (on another scale) is not judged by scVelo's threshold
    other = readouts.gene_trust(
        params[[Key.var.FIT_LIKELIHOOD, Key.var.FIT_N_CELLS_EM]], scvelo_likelihood=False
    )
    np.testing.assert_allclose(other[readouts.TRUST], [1.0, 0.0, np.nan, 1.0])
    assert other[readouts.TRUST_NOTES].tolist()[1] == "few cells"
    # ... but by the R² of its predictions (VeloVAE's: it had no trust light until 2026-12-05),
    # scVelo's 0.01 for a dynamical fit's velocity genes
    vae = pd.DataFrame(
        {
            Key.var.FIT_LIKELIHOOD: [0.2, 0.18, 0.9],
            Key.var.FIT_R2: [0.5, -0.2, 0.9],
            Key.var.FIT_KINETIC_SIGNAL: [0.8, 0.7, 0.2],
        }
    )
    judged = readouts.gene_trust(vae, scvelo_likelihood=False)
    np.testing.assert_allclose(judged[readouts.TRUST], [1.0, 0.0, 1.0])
    assert judged[readouts.TRUST_NOTES].tolist() == ["", "low R²", ""]
    # the legend names the checks the columns allow
    dynamical = VelocityResult(
        model="dynamical",
        params={},
        obs_names=pd.Index(["c0"]),
        var_names=index,
        velocity=np.zeros((1, 4), dtype=np.float32),
        gene_params=params.assign(**dict.fromkeys(_CURVE_KEYS, 1.0)),
        velocity_genes=np.ones(4, dtype=bool),
        layers={Key.layers.FIT_T: np.ones((1, 4), dtype=np.float32)},
    )
    assert readouts.fit_shows(dynamical) == {"curve"}  # scVelo's likelihood: judged by its threshold
    legend = readouts.trust_legend(dynamical)
    assert len(legend) == 4  # fit, transient cells, cells, the onset note
    assert legend[0].startswith("fit: likelihood ≥ 0.1")
    diagnosed = readouts.trust_legend(dynamical, diagnosed=True)
    assert diagnosed[:3] == legend[:3] and diagnosed[3].startswith("diagnostics: not flagged")
    # the trust diagnostics' flag is one more check once they ran: a flagged gene passed every
    # check and kept its green light until 2026-12-05 (the unfitted gene is still not judged)
    flags = pd.Series(["differential_kinetics,boost", "boost", "", ""], index=index)
    flagged = readouts.gene_trust(params, flags=flags)
    np.testing.assert_allclose(flagged[readouts.TRUST], [3 / 4, 0.0, np.nan, 1.0])
    assert flagged[readouts.TRUST_NOTES].tolist()[:2] == [
        "flagged: differential kinetics across clusters, transcriptional boost",
        "low likelihood; mostly steady; few cells; flagged: transcriptional boost",
    ]
    # a fit no other check reads (DeepVelo): the diagnostics alone judge its fitted genes
    bare = pd.DataFrame({Key.var.GAMMA: [1.0, 1.0, 1.0, 1.0]}, index=index)
    assert readouts.gene_trust(bare, flags=flags) is None  # which genes it fitted is not known
    alone = readouts.gene_trust(bare, flags=flags, fitted=np.array([True, True, False, True]))
    np.testing.assert_allclose(alone[readouts.TRUST], [0.0, 0.0, np.nan, 1.0])
    assert alone[readouts.TRUST_NOTES].tolist()[1] == "flagged: transcriptional boost"


def test_detection_power_is_weak_in_the_lowest_quarter():
    params = pd.DataFrame({Key.var.FIT_DETECTION_POWER: [1.0, 2.0, 3.0, 4.0, 5.0, np.nan, 7.0, 8.0, 9.0]})
    trust = readouts.gene_trust(params)[readouts.TRUST].to_numpy()
    # the 25th percentile of the eight finite values is 2.75: genes 0 and 1 are weak
    np.testing.assert_allclose(trust, [0, 0, 1, 1, 1, np.nan, 1, 1, 1])


def test_gene_table_of_a_steady_state_fit_has_r2_not_likelihood(app_adata):
    result = get_model("steady_state").fit(app_adata)
    means = readouts.gene_means(app_adata)
    table = readouts.gene_table(app_adata.var_names, means, result)
    assert "likelihood" not in table
    assert "alpha" not in table
    np.testing.assert_allclose(table["R²"], result.gene_params[Key.var.R2], equal_nan=True)
    np.testing.assert_allclose(table["gamma"], result.gene_params[Key.var.GAMMA], equal_nan=True)
    np.testing.assert_allclose(
        table["mean Ms"], np.asarray(app_adata.layers[Key.layers.MS].mean(axis=0)).ravel()
    )
    expected = np.where(
        np.isfinite(result.gene_params[Key.var.R2]), 1.0 * (result.gene_params[Key.var.R2] >= 0.01), np.nan
    )
    np.testing.assert_allclose(table[readouts.TRUST], expected)
    assert table["velocity gene"].tolist() == list(result.velocity_genes)
    no_fit = readouts.gene_table(app_adata.var_names, means, None)
    assert no_fit.columns.tolist() == ["gene", "mean Ms", "mean Mu"]
    help_text = readouts.column_help(table)
    assert set(help_text) == set(table.columns)


def test_gene_table_names_an_unknown_goodness_of_fit_fit_quality(toy_adata):
    like = pd.Series([0.1, 0.2, np.nan], index=toy_adata.var_names)
    table = readouts.gene_table(
        toy_adata.var_names, readouts.gene_means(toy_adata), _result("x", toy_adata, likelihood=like)
    )
    np.testing.assert_allclose(table[readouts.FIT_QUALITY], [0.1, 0.2, np.nan])
    assert readouts.TRUST not in table  # nothing to check


def test_compare_quality_keeps_genes_both_fitted(toy_adata):
    a = _result("a", toy_adata, likelihood=pd.Series([0.1, np.nan, 0.3], index=toy_adata.var_names))
    b = _result("b", toy_adata, likelihood=pd.Series([0.5, 0.6, 0.7], index=toy_adata.var_names))
    table = readouts.compare_quality(toy_adata.var_names, a, b)
    assert table["gene"].tolist() == ["g0", "g2"]
    np.testing.assert_allclose(table[["a", "b"]].to_numpy(), [[0.1, 0.5], [0.3, 0.7]])
    assert readouts.compare_quality(toy_adata.var_names, a, None) is None
    assert readouts.compare_quality(toy_adata.var_names, a, _result("c", toy_adata)) is None


# ------------------------------------------------------------------- files
def test_fit_from_adata_round_trips_and_reads_unnamed_velocity(toy_adata):
    assert fit_from_adata(toy_adata) is None
    fit_t = np.full((N_OBS, N_VARS), 2.0, dtype=np.float32)
    rates = np.full((N_OBS, N_VARS), 0.5, dtype=np.float32)
    result = _result(
        "someone_elses_model",
        toy_adata,
        velocity=np.full((N_OBS, N_VARS), 0.25, dtype=np.float32),
        layers={Key.layers.FIT_T: fit_t, Key.layers.RATE_ALPHA: rates},
        likelihood=pd.Series([0.1, 0.2, 0.3], index=toy_adata.var_names, name=Key.var.FIT_LIKELIHOOD),
        gene_params=pd.DataFrame({Key.var.FIT_LIKELIHOOD: [0.1, 0.2, 0.3]}, index=toy_adata.var_names),
    )
    written = results_adata(toy_adata, _fit(result))
    assert Key.layers.VELOCITY not in toy_adata.layers  # the input is never written to
    back = fit_from_adata(written)
    assert back.label == "someone_elses_model (from file)"
    np.testing.assert_array_equal(back.result.layers[Key.layers.RATE_ALPHA], rates)
    assert readouts.fit_shows(back) == {"cell_rates"}  # not registered: what the file holds
    # velocity written by another tool, without uns['velocity_params']
    bare = toy_adata.copy()
    bare.layers[Key.layers.VELOCITY] = np.full((N_OBS, N_VARS), 1.0)  # float64 in the file
    unnamed = fit_from_adata(bare)
    assert unnamed.label == "velocity (from file)"
    assert unnamed.result.velocity.dtype == np.float32
    assert unnamed.transitions is None


def test_model_defaults_read_the_constructor():
    defaults = model_defaults("steady_state")
    assert defaults == get_model("steady_state").get_params()


def test_compare_uses_a_fits_own_latent_time_and_names_its_measure(toy_adata):
    t = np.linspace(0, 1, N_OBS, dtype=np.float32)
    toy_adata.obs[Key.obs.LATENT_TIME] = t[::-1]
    borrowed = _result("steady_state", toy_adata, latent_time=t)  # read from the file, not its own
    assert readouts.own_latent_time(borrowed) is None
    assert readouts.own_latent_time(None) is None
    own = _result(
        "dynamical",
        toy_adata,
        latent_time=t,
        gene_params=_kinetic_params(toy_adata),
        layers={Key.layers.FIT_T: np.ones((N_OBS, N_VARS), dtype=np.float32)},
    )
    np.testing.assert_array_equal(readouts.own_latent_time(own), t)
    r2 = pd.Series([0.1, 0.2, 0.3], index=toy_adata.var_names, name=Key.var.R2)
    like = r2.rename(Key.var.FIT_LIKELIHOOD)
    assert readouts.quality_name(_result("steady_state", toy_adata, likelihood=r2)) == "R²"
    assert readouts.quality_name(_result("dynamical", toy_adata, likelihood=like)) == "likelihood"
    assert readouts.quality_name(_result("x", toy_adata, likelihood=r2.rename(None))) == "fit quality"


# ------------------------------------------------- per-cell rates, intervals, reconstruction
def test_cell_arrows_are_each_cells_velocity_from_its_own_rates(toy_adata):
    ms = np.asarray(toy_adata.layers[Key.layers.MS])
    mu = toy_adata.layers[Key.layers.MU].toarray()
    ones = np.ones_like(ms)
    rates = {
        Key.layers.RATE_ALPHA: 10 * ones,
        Key.layers.RATE_BETA: np.arange(N_OBS, dtype=np.float32)[:, None] * ones,  # beta_i = i
        Key.layers.RATE_GAMMA: 0.5 * ones,
    }
    fit = _fit(_result("deepvelo", toy_adata, layers=rates))  # the registry: shows cell_rates
    arrows = readouts.cell_arrows(fit, ms[:, 1], mu[:, 1], 1)
    # gene 1: Ms = i + 1, Mu = (i + 1) / 2; du = 10 - i Mu, ds = i Mu - 0.5 Ms
    i = np.arange(N_OBS)
    s, u = i + 1.0, (i + 1.0) / 2
    np.testing.assert_allclose(arrows, np.column_stack([s, u, i * u - 0.5 * s, 10 - i * u]))
    assert len(readouts.cell_arrows(fit, ms[:, 1], mu[:, 1], 1, max_arrows=4)) == 4
    # a fit whose model does not declare cell_rates shows none, whatever its layers
    assert (
        readouts.cell_arrows(_fit(_result("velovae", toy_adata, layers=rates)), ms[:, 1], mu[:, 1], 1) is None
    )
    (drawn,) = [p for p in readouts.phase_fits(ms[:, 1], mu[:, 1], {"gcn": fit}, j=1, active="gcn")]
    np.testing.assert_allclose(drawn.arrows, arrows)


def test_latent_time_interval_from_the_posterior_sd(toy_adata):
    obs = pd.DataFrame({Key.obs.LATENT_TIME_STD: np.full(N_OBS, 0.1)}, index=toy_adata.obs_names)
    t = np.linspace(0, 1, N_OBS).astype(np.float32)
    timed = _fit(_result("velovae", toy_adata, latent_time=t, obs=obs))
    sd = readouts.latent_time_sd(timed)
    info = readouts.cell_info(toy_adata, timed, 2, n_targets=3, t=t, t_sd=sd)
    lo, hi = info.latent_time_interval(0.9)
    # N(0.4, 0.1^2): 90 % within 1.6449 SD
    assert (lo, hi) == pytest.approx((0.4 - 0.164485, 0.4 + 0.164485), abs=1e-5)
    # near the axis' ends the interval stops at them (a latent time runs from the first cell to the last)
    late = readouts.cell_info(toy_adata, timed, N_OBS - 1, n_targets=3, t=t, t_sd=sd)  # t = 1
    assert late.latent_time_interval(0.9) == pytest.approx((1 - 0.164485, 1.0), abs=1e-5)
    early = readouts.cell_info(toy_adata, timed, 0, n_targets=3, t=t, t_sd=sd)  # t = 0
    assert early.latent_time_interval(0.9) == pytest.approx((0.0, 0.164485), abs=1e-5)
    # a model without its own latent time has no SD to show, even if a column says so
    assert readouts.latent_time_sd(_fit(_result("deepvelo", toy_adata, obs=obs))) is None
    assert readouts.cell_info(toy_adata, timed, 2, n_targets=3, t=t).latent_time_interval() is None
    # the SD colours the cells when the active fit has one, and is offered only then
    assert readouts.COLOR_TIME_SD in readouts.color_options(toy_adata, {"vae": timed})
    dynamical = _fit(_result("dynamical", toy_adata, latent_time=t))
    assert readouts.COLOR_TIME_SD not in readouts.color_options(toy_adata, {"dyn": dynamical})
    shown = readouts.coloring(toy_adata, readouts.COLOR_TIME_SD, fit=timed)
    assert (shown.kind, shown.label) == ("continuous", readouts.COLOR_TIME_SD)
    np.testing.assert_allclose(shown.values, 0.1)
    # read as the posterior's spread, not as the error (2026-12-05: on simulations neither
    # uncertainty ranks the cells by their error); the legend under the plot says so
    assert shown.note == readouts.UNCERTAINTY_NOTE and "not where it is wrong" in plots.legend_html(shown)
    assert readouts.coloring(toy_adata, readouts.COLOR_LATENT_TIME, fit=timed).note == ""
    # an SD that holds a second start's shift (VeloVAE's default since 2026-12-05) is measured to rank
    # the cells by their error where lineages differ: its legend says that instead
    shifted = obs.assign(**{Key.obs.LATENT_TIME_START_SHIFT: np.zeros(N_OBS, dtype=np.float32)})
    two_starts = _fit(_result("velovae", toy_adata, latent_time=t, obs=shifted))
    shown = readouts.coloring(toy_adata, readouts.COLOR_TIME_SD, fit=two_starts)
    assert shown.note == readouts.TIME_SD_NOTE
    assert "ranked the cells by their error" in plots.legend_html(shown)
    # scVelo's velocity confidence, likewise: coherent is not correct
    coherent = toy_adata.copy()
    coherent.obs[Key.obs.VELOCITY_CONFIDENCE] = np.linspace(0, 1, N_OBS)
    confidence = readouts.coloring(coherent, readouts.COLOR_CONFIDENCE, fit=timed)
    assert confidence.kind == "continuous" and "not necessarily correct" in plots.legend_html(confidence)
    untimed = _fit(_result("deepvelo", toy_adata, obs=obs))
    nothing = readouts.coloring(toy_adata, readouts.COLOR_TIME_SD, fit=untimed)
    assert nothing.kind == "none"
    assert nothing.label == "the active model reports no latent-time SD (VeloVAE does)"


@pytest.mark.parametrize(
    ("key", "what", "read"),
    [
        (Key.obs.LATENT_TIME_START_SPREAD, readouts.COLOR_TIME_SPREAD, readouts.latent_time_start_spread),
        (Key.obs.LATENT_TIME_RANK_WIDTH, readouts.COLOR_TIME_RANK_WIDTH, readouts.latent_time_rank_width),
    ],
)
def test_a_latent_time_column_colours_the_cells_of_a_fit_that_has_it(toy_adata, key, what, read):
    """The start spread and the rank width (VeloVAE's obs columns about its own latent time)."""
    values = np.linspace(0.05, 0.6, N_OBS)
    obs = pd.DataFrame({key: values}, index=toy_adata.obs_names)
    t = np.linspace(0, 1, N_OBS).astype(np.float32)
    timed = _fit(_result("velovae", toy_adata, latent_time=t, obs=obs))
    assert what in readouts.color_options(toy_adata, {"vae": timed})
    shown = readouts.coloring(toy_adata, what, fit=timed)
    assert (shown.kind, shown.label) == ("continuous", what)
    np.testing.assert_allclose(shown.values, values, rtol=1e-6)
    # not offered without it (VeloVAE with capture times: no spread), nor read from a model
    # without its own time
    plain = _fit(_result("velovae", toy_adata, latent_time=t))
    assert what not in readouts.color_options(toy_adata, {"vae": plain})
    assert read(_fit(_result("deepvelo", toy_adata, obs=obs))) is None
    assert readouts.coloring(toy_adata, what, fit=plain).kind == "none"
    if key == Key.obs.LATENT_TIME_RANK_WIDTH:
        # its legend says what it is measured to be, not the posterior's "unsure, not wrong"
        assert shown.note == readouts.RANK_WIDTH_NOTE and "rank error" in plots.legend_html(shown)
        info = readouts.cell_info(toy_adata, timed, 3, n_targets=2, t=t, t_rank_width=values)
        assert info.latent_time_rank_width == pytest.approx(values[3])


def test_held_out_reconstruction_of_two_fits_by_hand(toy_adata):
    ms = np.asarray(toy_adata.layers[Key.layers.MS], dtype=np.float32)
    mu = toy_adata.layers[Key.layers.MU].toarray()
    train = np.array([1, 1, 1, 1, 0, 0], dtype=bool)  # cells 4 and 5 held out
    split = pd.DataFrame({Key.obs.FIT_TRAIN: train}, index=toy_adata.obs_names)
    # A misses s by 1 on every cell; B is exact but for gene 2, which it does not predict
    a_layers = {Key.layers.PREDICTED_S: ms + 1, Key.layers.PREDICTED_U: mu}
    b_s = ms.copy()
    b_s[:, 2] = np.nan
    b_layers = {Key.layers.PREDICTED_S: b_s, Key.layers.PREDICTED_U: mu}
    a = _fit(_result("velovae", toy_adata, layers=a_layers, obs=split), "A")
    b = _fit(_result("velovae", toy_adata, layers=b_layers), "B")
    held, words = readouts.held_out_cells(a, b)
    np.testing.assert_array_equal(held, ~train)
    assert "2 cells" in words
    found = readouts.compare_reconstruction(toy_adata, a, b)
    assert list(found.table["gene"]) == ["g0", "g1"]  # genes both predict
    np.testing.assert_allclose(found.table["a"], 1.0)
    np.testing.assert_allclose(found.table["b"], 0.0)
    assert found.n_cells == 2
    assert found.summary == pytest.approx((1.0, 0.0))
    # no split recorded: all cells; a fit that predicts nothing: no comparison
    assert readouts.held_out_cells(b, None) == (None, "all cells (no fit recorded held-out cells)")
    assert readouts.compare_reconstruction(toy_adata, a, _fit(_result("deepvelo", toy_adata))) is None
    np.testing.assert_allclose(readouts.log10_positive(np.array([100.0, 0.0])), [2.0, np.nan])


# --------------------------------------------------------------- fates and walks
def test_fates_from_a_file_colour_cells_and_list_a_cells_probabilities(toy_adata):
    adata = toy_adata.copy()
    assert readouts.fates_from_adata(adata) is None
    probs = np.column_stack([np.linspace(0, 1, N_OBS), 1 - np.linspace(0, 1, N_OBS)]).astype(np.float32)
    adata.obsm[Key.obsm.FATE_PROBABILITIES] = probs
    adata.obs[Key.obs.TERMINAL_STATES] = pd.Categorical([None, None, None, None, "<b>x", "y"])
    fates = readouts.fates_from_adata(adata)
    assert fates.names == ("<b>x", "y")
    np.testing.assert_array_equal(fates.terminal, [-1, -1, -1, -1, 0, 1])
    options = readouts.color_options(adata, {}, [fates])
    assert options[-2:] == ["fate: <b>x", "fate: y"]  # a file's terminal states are its own obs column
    coloring = readouts.coloring(adata, "fate: y", fates=fates)
    assert coloring.kind == "continuous"
    np.testing.assert_allclose(coloring.values, probs[:, 1])
    assert readouts.coloring(adata, "fate: y").kind == "none"  # no fates: says so
    table = readouts.cell_fates(fates, 1)  # 0.2 vs 0.8
    assert list(table["state"]) == ["y", "<b>x"]
    assert table["probability"].tolist() == pytest.approx([0.8, 0.2])
    computed = readouts.FateInfo(fates.names, probs, fates.terminal, fates.colors, "computed for m")
    assert readouts.COLOR_TERMINAL in readouts.fate_options(computed)
    terminal = readouts.coloring(adata, readouts.COLOR_TERMINAL, fates=computed)
    assert terminal.kind == "category"
    assert terminal.categories == ("<b>x", "y")


def test_walks_on_a_chain_end_at_its_end_and_are_counted_by_cluster(toy_adata):
    from explorer.graph.transition import random_walks

    # cells 0 -> 1 -> ... -> 5, the last absorbing: five steps from cell 0 always reach cell 5
    chain = sparse.csr_matrix(
        (np.ones(N_OBS), (np.arange(N_OBS), np.minimum(np.arange(N_OBS) + 1, N_OBS - 1)))
    )
    walks = random_walks(chain, 0, n_steps=7, n_walks=10, seed=0)
    ends = readouts.walk_ends(toy_adata, walks)
    assert ends.to_dict("list") == {"cluster": ["c"], "walks": [10], "share": [1.0]}
    # without cell types nothing to count them by (the page said all ended in "—")
    untyped = toy_adata.copy()
    while (column := readouts.cluster_column(untyped)) is not None:
        del untyped.obs[column]
    assert readouts.cluster_column(untyped) is None
    assert readouts.walk_ends(untyped, walks).empty
    xy = np.asarray(toy_adata.obsm[Key.obsm.UMAP])
    paths = readouts.walk_paths(xy, walks, max_paths=3)
    assert len(paths) == 3
    np.testing.assert_allclose(paths[0][:, 0], [0, 1, 2, 3, 4, 5, 5, 5])


def test_transitions_are_parsed_and_checked():
    clusters = ["a", "b", "c"]
    assert readouts.parse_transitions(" a>b, b > c ,", clusters) == [("a", "b"), ("b", "c")]
    assert readouts.parse_transitions("", clusters) == []
    with pytest.raises(InputError, match="Valid options are: a, b, c"):
        readouts.parse_transitions("a>z", clusters)
    with pytest.raises(InputError, match="source>target"):
        readouts.parse_transitions("a-b", clusters)
    # data without cell types: it said "Valid options are: ." (an empty list)
    with pytest.raises(InputError, match="Cannot score 'a>b': the data has no cell types"):
        readouts.parse_transitions("a>b", [])
    assert readouts.parse_transitions(" ", []) == []


def test_model_metrics_by_hand(app_adata):
    from explorer.graph.metrics import cross_boundary_correctness

    n_obs, n_vars = app_adata.shape
    ms = readouts._dense_layer(app_adata.layers[Key.layers.MS]).astype(np.float32)
    mu = readouts._dense_layer(app_adata.layers[Key.layers.MU]).astype(np.float32)
    v = np.tile(np.linspace(-1, 1, n_vars, dtype=np.float32), (n_obs, 1))  # one velocity for every cell
    layers = {Key.layers.PREDICTED_S: ms, Key.layers.PREDICTED_U: mu + 1}  # u off by 1
    same = _fit(_result("velovae", app_adata, velocity=v, layers=layers), "same")
    found = readouts.model_metrics(app_adata, {"same": same}, [("early", "mid")])
    row = found.table.iloc[0]
    # every neighbour moves the same way: cosines and correlations are 1
    for name in ("consistency", "consistency_type", "velocity_confidence", "icvcoh[early]", "icvcoh"):
        assert row[name] == pytest.approx(1.0), name
    assert row["MSE"] == pytest.approx(1.0)
    assert row["MSE cells"] == "all"
    expected = cross_boundary_correctness(app_adata, v, source="early", target="mid")
    assert row["cbdir[early>mid]"] == pytest.approx(expected)
    assert row["cbdir"] == pytest.approx(expected)
    detail = found.per_cluster["same"].set_index("cluster")
    assert detail["n_cells"].sum() == n_obs
    assert detail["velocity_consistency"].to_numpy() == pytest.approx(1.0)


# ------------------------------------------------------- lineages and vector fields
def test_lineage_curves_follow_each_lineages_predicted_cells_by_hand():
    """300 cells: 100 root cells (state near lineage A's), 100 of lineage A, 100 of B, late ones last.

    Predicted ``u`` is ``2 s`` on the root and A cells and ``-s`` on B's: each lineage's curve
    keeps its own relation only if the cells were split right.
    """
    rng = np.random.default_rng(0)
    n = 100
    t = np.concatenate([rng.uniform(0, 0.3, n), rng.uniform(0.5, 1, n), rng.uniform(0.5, 1, n)])
    state = np.concatenate(
        [rng.normal([1, 0], 0.1, (n, 2)), rng.normal([5, 0], 0.1, (n, 2)), rng.normal([0, 5], 0.1, (n, 2))]
    )
    labels = ["root"] * n + ["A"] * n + ["B"] * n
    adata = AnnData(
        np.zeros((3 * n, 1), dtype=np.float32),
        obs=pd.DataFrame({Key.obs.CLUSTERS: pd.Categorical(labels)}, index=[f"c{i}" for i in range(3 * n)]),
        var=pd.DataFrame(index=["g"]),
    )
    adata.uns["clusters_colors"] = ["#aa0000", "#00aa00", "#0000aa"]  # A, B, root
    s = t[:, None]
    u = np.where(np.arange(3 * n)[:, None] < 2 * n, 2 * s, -s)
    result = _result(
        "velovae",
        adata,
        latent_time=t,
        layers={Key.layers.PREDICTED_S: s, Key.layers.PREDICTED_U: u},
        obsm={Key.obsm.CELL_STATE: state},
    )
    found = readouts.lineages(adata, _fit(result))
    assert found.names == ("A", "B")
    assert found.colors == ("#aa0000", "#00aa00")
    assert (found.codes[: 2 * n] == 0).all() and (found.codes[2 * n :] == 1).all()
    curves = {c.name: c for c in readouts.lineage_curves(_fit(result), 0, found)}
    a_s = curves["A"].s
    # root then A, in time order, broken (one NaN) across the empty bins of t 0.3-0.5
    gap = np.flatnonzero(np.isnan(a_s))
    assert len(gap) == 1 and a_s[: gap[0]].max() < 0.3 < 0.5 < a_s[gap[0] + 1 :].min()
    assert np.all(np.diff(a_s[: gap[0]]) > 0) and np.all(np.diff(a_s[gap[0] + 1 :]) > 0)
    np.testing.assert_allclose(curves["A"].u, 2 * a_s)
    np.testing.assert_allclose(curves["B"].u, -curves["B"].s)
    assert np.nanmin(curves["B"].s) >= 0.5
    # a fit without a cell state (VeloVAE's basic model, any other model) has none
    points = {Key.layers.PREDICTED_S: s, Key.layers.PREDICTED_U: u}
    plain = _result("velovae", adata, latent_time=t, layers=points)
    assert readouts.lineages(adata, _fit(plain)) is None
    fits = readouts.phase_fits(
        s[:, 0], u[:, 0], {"full": _fit(result)}, j=0, active="full", lineages={"full": found}
    )
    assert [c.name for c in fits[0].lineages] == ["A", "B"]
    hv = pytest.importorskip("holoviews")
    from explorer.app import plots

    hv.extension("bokeh")
    (drawn,) = [layer for layer in plots.phase_fits(fits) if layer.group == "Lineages"]
    figure = hv.render(drawn)  # drawn in a darker shade of each lineage's cluster colour
    assert list(figure.renderers[0].data_source.data["color"]) == ["#660000", "#006600"]
    assert "per-lineage curves along latent time" in plots.fits_legend_html(fits)


def test_a_lineage_curve_follows_its_cells_where_they_crowd_in_time():
    """300 cells of one lineage, 240 of them crowded into the last 5% of latent time, rising there.

    As the pancreas' Beta cells (latent time 0.88-1, Ins2 from 3 to 93 along it): bins of
    equal time put the crowd in one or two bins, whose mean (about half the crowd's top)
    ended the curve; bins of about equal numbers of cells follow the crowd, so the curve's
    last point is the mean of its last 20 cells (s 0.92-1.0; bins of at least
    LINE_BIN_CELLS), and its points rise in time order.
    """
    n_early, n_crowd = 60, 240
    t = np.concatenate([np.linspace(0, 0.95, n_early, endpoint=False), np.linspace(0.95, 1, n_crowd)])
    s = np.concatenate([np.zeros(n_early), np.linspace(0, 1, n_crowd)])[:, None]
    adata = AnnData(
        np.zeros((len(t), 1), dtype=np.float32),
        obs=pd.DataFrame(
            {Key.obs.CLUSTERS: pd.Categorical(["A"] * len(t))}, index=[f"c{i}" for i in range(len(t))]
        ),
        var=pd.DataFrame(index=["g"]),
    )
    state = np.random.default_rng(0).normal(0, 0.1, (len(t), 2))
    points = {Key.layers.PREDICTED_S: s, Key.layers.PREDICTED_U: 2 * s}
    result = _result("velovae", adata, latent_time=t, layers=points, obsm={Key.obsm.CELL_STATE: state})
    found = readouts.lineages(adata, _fit(result))
    (curve,) = readouts.lineage_curves(_fit(result), 0, found)
    assert not np.isnan(curve.s).any()  # 0.016 apart at most: no stretch without cells
    assert readouts.LINE_BIN_CELLS == 20 and len(curve.s) == 15  # 300 cells in bins of 20, not 20 of 15
    assert curve.s[-1] == pytest.approx(np.linspace(0, 1, n_crowd)[-20:].mean())
    assert np.all(np.diff(curve.s[3:]) > 0)  # the crowd's 12 bins, rising
    np.testing.assert_allclose(curve.u, 2 * curve.s)
    (line,) = readouts.lineage_lines(t, s[:, 0], found)
    assert line.t[-1] == pytest.approx(t[-20:].mean()) and line.value[-1] == pytest.approx(curve.s[-1])


def test_a_small_lineage_is_not_cut_by_its_own_spacing_and_no_bin_stands_alone():
    """50 random cells of a lineage make one unbroken line; a 7-cell stretch apart is left out.

    Cut at 1/20 of the span alone, 50 random times broke the line almost every time (their
    widest gap is about span ln(50) / 50, 0.08 of it; here 0.065 against 1/20); and a stretch
    of one bin between two breaks drew nothing (a point between NaNs). By hand: lineage A,
    50 cells uniform in [0, 1]; lineage B, the same 50 and 7 more at 2.0-2.006, a gap of
    1.0. Each line is its 50 cells' 2 bins of 25 alone (bins of at least LINE_BIN_CELLS, 20,
    where a stretch has twice as many), unbroken.
    """
    rng = np.random.default_rng(3)
    early = np.sort(rng.uniform(0, 1, 50))
    t = np.concatenate([early, early, np.linspace(2.0, 2.006, 7)])
    values = np.arange(len(t), dtype=float)
    codes = np.repeat([0, 1], [50, 57])
    found = readouts.Lineages(codes=codes, names=("A", "B"), colors=("#000000", "#000000"))
    lines = readouts.lineage_lines(t, values, found)
    for line, first in zip(lines, (0, 50), strict=True):
        assert not np.isnan(line.value).any(), line.name
        np.testing.assert_allclose(line.value, values[first : first + 50].reshape(2, 25).mean(1))
        np.testing.assert_allclose(line.t, early.reshape(2, 25).mean(1))


def test_cell_types_are_found_under_their_usual_names_before_any_categorical_column():
    """``clusters``, then the rest of CELL_TYPE_COLUMNS (any case), then the first categorical column."""
    index = [f"c{i}" for i in range(4)]
    batch = pd.Categorical(["b1", "b1", "b2", "b2"])

    def found(**columns) -> str | None:
        return readouts.cluster_column(AnnData(obs=pd.DataFrame(columns, index=index)))

    types = pd.Categorical(["x", "y", "x", "y"])
    assert found(batch=batch, Cell_Type=types) == "Cell_Type"
    assert found(batch=batch, leiden=types, cell_type=types) == "cell_type"  # the list's order
    assert found(batch=batch, cell_type=types, clusters=types) == "clusters"
    assert found(batch=batch, cell_type=["x", "y", "x", "y"]) == "batch"  # text, not categorical
    assert found(batch=batch, sample=batch) == "batch"  # no named column: the first categorical
    assert found(score=[0.1, 0.2, 0.3, 0.4]) is None


def test_a_small_terminal_type_earlier_than_the_others_ends_its_own_lineage():
    """Each type in the later half of latent time ends a lineage, however few of its cells are late, by hand.

    100 root cells (t 0-0.3), 150 each of types A and B (t 0.5-1) and 40 of type E (t
    0.55-0.85), each with its own state: E's median time is in the later half, but under
    a quarter of its cells are among the latest 30%. Each type's cells join its own
    lineage, and the root cells (state near A's) join A's.
    """
    rng = np.random.default_rng(1)
    sizes = {"root": 100, "A": 150, "B": 150, "E": 40}
    times = {"root": (0, 0.3), "A": (0.5, 1), "B": (0.5, 1), "E": (0.55, 0.85)}
    states = {"root": [1, 0], "A": [5, 0], "B": [0, 5], "E": [5, 5]}
    t = np.concatenate([rng.uniform(*times[k], n) for k, n in sizes.items()])
    state = np.concatenate([rng.normal(states[k], 0.1, (n, 2)) for k, n in sizes.items()])
    labels = np.concatenate([[k] * n for k, n in sizes.items()])
    assert np.median(t[labels == "E"]) > np.median(t) > np.median(t[labels == "root"])
    assert (t[labels == "E"] >= np.quantile(t, 0.7)).mean() < 0.25
    adata = AnnData(
        np.zeros((len(t), 1), dtype=np.float32),
        obs=pd.DataFrame({Key.obs.CLUSTERS: pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(t))]),
        var=pd.DataFrame(index=["g"]),
    )
    points = {Key.layers.PREDICTED_S: t[:, None], Key.layers.PREDICTED_U: t[:, None]}
    result = _result("velovae", adata, latent_time=t, layers=points, obsm={Key.obsm.CELL_STATE: state})
    found = readouts.lineages(adata, _fit(result))
    assert found.names == ("A", "B", "E")
    named = np.array(found.names)[found.codes]
    assert (named[labels == "root"] == "A").all()
    for name in ("A", "B", "E"):
        assert (named[labels == name] == name).all(), name


@pytest.mark.slow
def test_each_pancreas_endocrine_type_gets_its_own_lineage_curve(shared_data):
    """VeloVAE on the 739-cell pancreas: Alpha, Beta, Delta and Epsilon each end a lineage.

    Epsilon (27 cells, 8 of them among the latest 30%) got no curve when the lineages' ends
    were k-means centres of the late cells' states (Alpha, Beta and Delta only; measured
    2026-12-04), so Ghrl, Epsilon's hormone, had no curve through its cells. Now Epsilon's
    curve reaches its cells' level and no other lineage's comes near it.
    """
    import anndata as ad

    from explorer.models.vae import VeloVAE
    from explorer.pipeline import prepare

    adata = ad.read_h5ad(shared_data / "pancreas_veloviz_739.h5ad")
    prepare(adata, seed=0)
    result = VeloVAE(seed=0, device="cpu").fit(adata)
    found = readouts.lineages(adata, _fit(result))
    endocrine = ("Alpha", "Beta", "Delta", "Epsilon")
    assert set(endocrine) <= set(found.names), found.names
    clusters = adata.obs["clusters"].astype(str).to_numpy()
    named = np.array(found.names)[found.codes]
    for name in endocrine:
        assert (named[clusters == name] == name).mean() > 0.5, name
    j = adata.var_names.get_loc("Ghrl")
    level = np.median(np.asarray(adata.layers[Key.layers.MS][clusters == "Epsilon", j]))
    peaks = {c.name: np.nanmax(c.s) for c in readouts.lineage_curves(_fit(result), j, found)}
    assert peaks["Epsilon"] > 0.5 * level, (peaks, level)
    assert max(v for k, v in peaks.items() if k != "Epsilon") < 0.5 * peaks["Epsilon"], peaks


@pytest.fixture(scope="module")
def field_fit(app_adata):
    """A vector field on the two-lineage simulation (stochastic base, 5 PCs, 40 epochs) as a Fit."""
    from explorer.models.vector_field import VectorField

    result = VectorField(base="stochastic", n_pcs=5, epochs=40, n_fixed_point_starts=20, device="cpu").fit(
        app_adata
    )
    return Fit(label="vector_field", key=("vector_field", ()), result=result)


def test_a_fields_path_divergence_and_fixed_points(app_adata, field_fit):
    xy = np.asarray(app_adata.obsm[Key.obsm.UMAP])
    assert readouts.has_field(app_adata, field_fit)
    assert not readouts.has_field(app_adata, _fit(_result("stochastic", app_adata)))
    info = readouts.field_info(app_adata, field_fit, xy, basis=Key.obsm.UMAP)
    assert info.basis == "umap" and len(info.genes) > 0
    assert Key.uns.VECTOR_FIELD not in app_adata.uns  # the data is never written to
    # a gene outside the field's state has no velocity: the time view says why, not empty axes
    outside = [j for j, g in enumerate(app_adata.var_names) if g not in info.genes]
    inside = app_adata.var_names.get_loc(info.genes[0])
    assert outside and readouts.velocity_gap(app_adata, field_fit, inside) is None
    gap = readouts.velocity_gap(app_adata, field_fit, outside[0])
    assert gap.startswith(f"no velocity to draw for {app_adata.var_names[outside[0]]}: it is not among")
    assert f"the {len(info.genes)} genes of the vector field's state" in gap
    assert readouts.velocity_gap(app_adata, None, outside[0]) is None
    # the simulation runs forward in time: a path from an early cell ends among later cells
    t = app_adata.obs[Key.obs.TRUE_T].to_numpy()
    early = int(np.argsort(t)[10])
    found = readouts.field_trajectory(info, early, n_steps=60)
    assert found.path.shape == (61, 2)
    end = app_adata.obs_names.get_loc(found.end_cell)
    assert t[end] > t[early] + 0.2 * np.ptp(t)
    assert found.end_cluster == str(app_adata.obs[Key.obs.CLUSTERS].iloc[end])
    # the divergence colouring is the fit's obs column, offered only with a field
    coloring = readouts.coloring(app_adata, readouts.COLOR_DIVERGENCE, fit=field_fit)
    np.testing.assert_array_equal(coloring.values, field_fit.result.obs[Key.obs.VF_DIVERGENCE].to_numpy())
    assert coloring.diverging
    assert readouts.COLOR_DIVERGENCE in readouts.color_options(app_adata, {"f": field_fit})
    assert readouts.COLOR_DIVERGENCE not in readouts.color_options(
        app_adata, {"s": _fit(_result("stochastic", app_adata))}
    )
    # fixed points: on the fit's basis where the fit carried them, named after their nearest cell
    cell = 7
    state = field_fit.result.obsm[Key.obsm.VF_STATE][[cell]]
    data = {
        **field_fit.result.field_data,
        "fixed_points": {
            "state": state,
            "type": np.array(["attractor"]),
            "embedding": np.array([[0.5, -0.5]]),
        },
    }
    marked = AnnData(obs=info.adata.obs, obsm=dict(info.adata.obsm), uns={Key.uns.VECTOR_FIELD: data})
    fixed = readouts.fixed_points(readouts.FieldInfo("f", marked, info.field, "umap", info.genes))
    np.testing.assert_allclose(fixed.xy, [[0.5, -0.5]])
    assert fixed.kind == ("attractor",)
    assert fixed.cluster == (str(app_adata.obs[Key.obs.CLUSTERS].iloc[cell]),)
    # one the cells do not support (no path ends near it) is not marked
    marked.uns[Key.uns.VECTOR_FIELD] = {
        **data, "fixed_points": {**data["fixed_points"], "supported": np.array([False])}
    }
    unsupported = readouts.fixed_points(readouts.FieldInfo("f", marked, info.field, "umap", info.genes))
    assert unsupported.kind == () and unsupported.xy.shape == (0, 2)
    marked.uns[Key.uns.VECTOR_FIELD] = data
    # on another basis: at the nearest cell
    other = readouts.FieldInfo("f", marked, info.field, "pca", info.genes)
    marked.obsm[Key.obsm.PCA] = np.asarray(app_adata.obsm[Key.obsm.PCA])[:, :2]
    np.testing.assert_allclose(readouts.fixed_points(other).xy, marked.obsm[Key.obsm.PCA][[cell]])


def test_a_perturbation_moves_the_start_by_the_gene_and_reports_each_step(app_adata, field_fit, progress_log):
    xy = np.asarray(app_adata.obsm[Key.obsm.UMAP])
    info = readouts.field_info(app_adata, field_fit, xy, basis=Key.obsm.UMAP)
    cells = np.arange(40)
    log, callback = progress_log
    gene = info.genes[0]
    run = readouts.field_perturbation(info, gene, cells=cells, factor=0.0, n_steps=20, progress=callback)
    assert run.n_cells == 40 and len(run.control_paths) == len(run.perturbed_paths) == 30
    assert [p.step for p in log] == list(range(1, 41))  # 2 x 20 RK4 steps: control and perturbed runs
    for column in ("control", "perturbed"):
        assert run.table[column].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(run.table["shift"], run.table["perturbed"] - run.table["control"])
    # a knock-out of an expressed gene moves the start; factor 1 leaves it where it was
    ms = readouts.dense_column(app_adata.layers[Key.layers.MS], app_adata.var_names.get_loc(gene))
    moved = [i for i, c in enumerate(cells[readouts.even_sample(40, 30)]) if ms[c] > 0]
    assert any(not np.allclose(run.perturbed_paths[i][0], run.control_paths[i][0]) for i in moved)
    same = readouts.field_perturbation(info, gene, cells=cells, factor=1.0, n_steps=2)
    for a, b in zip(same.control_paths, same.perturbed_paths, strict=True):
        np.testing.assert_allclose(a[0], b[0])
    assert same.measure.startswith("the cluster nearest")
    # with fate probabilities: their mean at the cells nearest to the ends. One-hot fates
    # of the clusters give back the clusters' shares; the table is named by fate
    labels = app_adata.obs[Key.obs.CLUSTERS].astype(str).to_numpy()
    names = tuple(sorted(set(labels)))
    onehot = (labels[:, None] == np.asarray(names)[None, :]).astype(np.float32)
    fates = readouts.FateInfo(names, onehot, np.full(len(labels), -1), {}, "a test")
    by_fate = readouts.field_perturbation(info, gene, cells=cells, factor=0.0, n_steps=2, fates=fates)
    assert by_fate.measure.startswith("fate probabilities (a test)")
    by_cluster = readouts.field_perturbation(info, gene, cells=cells, factor=0.0, n_steps=2)
    table = by_cluster.table.reindex(list(names), fill_value=0.0)
    np.testing.assert_allclose(by_fate.table.loc[list(names)].to_numpy(), table.to_numpy(), atol=1e-6)
    with pytest.raises(InputError, match="factor >= 0"):
        readouts.field_perturbation(info, gene, cells=cells, factor=-1.0)
    with pytest.raises(InputError, match="No cells"):
        readouts.field_perturbation(info, gene, cells=[], factor=0.0)


def test_model_choices_offer_literal_values_and_other_models_as_base():
    from explorer.app.fits import model_choices

    choices = model_choices("vector_field")
    assert choices["objective"] == ["velocity", "flow", "both"]
    assert "vector_field" not in choices["base"] and "dynamical" in choices["base"]
    assert model_choices("velovae")["variant"] == ["full", "basic"]
    assert "base" not in model_choices("dynamical")


def test_key_menus_offer_capture_times_and_clusters(shared_data):
    """time_key: a number for every cell in 2-50 levels, numeric or categorical; cluster_key: categories and text."""
    from explorer.app.fits import obs_key_choices, obs_key_columns, obs_key_start

    obs = pd.DataFrame(
        {
            "day": [1.0, 2.0, 2.0, 3.0],
            "stage": pd.Categorical(["12", "35", "35", "12"]),  # numbers kept as categories
            "partly": [1.0, np.nan, 2.0, 2.0],  # a cell without a capture time
            "score": np.linspace(0, 1, 4),  # four levels in four cells: still a few
            "one": [5.0] * 4,
            "cluster": pd.Categorical(["a", "b", "a", "b"]),
            "name": ["x", "y", "z", "w"],
            "flag": [True, False, True, True],
        }
    )
    columns = obs_key_columns(obs)
    assert columns == {"time": ["day", "stage", "score"], "group": ["stage", "cluster", "name"], "types": []}
    many = pd.DataFrame({"t": np.arange(60.0)})  # one value per cell: a time or a score, not a capture
    assert obs_key_columns(many)["time"] == []
    expected = {"(none)": None, "day": "day", "stage": "stage", "score": "score"}
    assert obs_key_choices("time_key", None, columns) == expected
    # a default the data lacks stays, so the form starts at the model's default
    assert list(obs_key_choices("cluster_key", "clusters", columns)) == ["clusters", "stage", "cluster", "name"]
    assert obs_key_start("cluster_key", "clusters", columns) == "clusters"  # no types by a usual name
    assert obs_key_choices("n_pcs", 30, columns) is None
    # types under a usual name: a cluster key the data lacks starts there instead
    typed = obs_key_columns(obs.rename(columns={"cluster": "Cell_Type"}))
    assert typed["types"] == ["Cell_Type"]
    assert obs_key_start("cluster_key", "clusters", typed) == "Cell_Type"
    assert obs_key_start("cluster_key", "stage", typed) == "stage"  # a default the data has stays
    assert obs_key_start("time_key", None, typed) is None
    # a real file: CellRank's dentate gyrus keeps its capture ages as categories
    from tests.graph.test_transition import read_fixture

    dentate = read_fixture(shared_data / "cellrank_tests" / "adata_200.h5ad")
    assert obs_key_columns(dentate.obs)["time"] == ["age(days)"]


def test_type_groups_are_the_cell_types_with_cells_enough_and_not_too_many():
    """Types of 10 cells or more are groups, in their colours; one type or too many give none.

    By hand: types a (12 cells) and b (10) are groups 0 and 1, tiny (9) none; a alone, or
    MAX_TYPE_LINES + 1 types, give no groups (the red line over all cells stays).
    """
    labels = ["a"] * 12 + ["b"] * 10 + ["tiny"] * 9
    adata = AnnData(
        np.zeros((len(labels), 1), dtype=np.float32),
        obs=pd.DataFrame(
            {Key.obs.CLUSTERS: pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))]
        ),
    )
    adata.uns["clusters_colors"] = ["#111111", "#222222", "#333333"]
    found = readouts.type_groups(adata)
    assert found.kind == "type" and found.names == ("a", "b") and found.colors == ("#111111", "#222222")
    np.testing.assert_array_equal(found.codes, [0] * 12 + [1] * 10 + [-1] * 9)
    one = adata[:12].copy()
    assert readouts.type_groups(one) is None
    many = [f"t{i:02d}" for i in range(readouts.MAX_TYPE_LINES + 1) for _ in range(10)]
    crowd = AnnData(
        np.zeros((len(many), 1), dtype=np.float32),
        obs=pd.DataFrame({Key.obs.CLUSTERS: pd.Categorical(many)}, index=[f"c{i}" for i in range(len(many))]),
    )
    assert readouts.type_groups(crowd) is None
    assert readouts.type_groups(crowd[: 10 * readouts.MAX_TYPE_LINES].copy()).names[-1] == "t11"


def test_cells_at_one_time_share_a_bin_whatever_their_order():
    """Discrete times: each time's cells are one bin, so the line does not depend on the input order.

    By hand: 4 times x 30 cells, values 0..29 at each time in two orders. In bins of
    120 / 20 = 6 consecutive cells (the rule for continuous times) a time's 30 cells made
    five bins whose means (2.5, 8.5, ...) follow the order they came in: a vertical
    zig-zag. Now each time is one bin with mean 14.5, in either order.
    """
    t = np.repeat([0.0, 1.0, 2.0, 3.0], 30)
    found = readouts.Lineages(codes=np.zeros(len(t), dtype=np.int64), names=("A",), colors=("#000000",))
    for values in (np.tile(np.arange(30.0), 4), np.tile(np.arange(30.0)[::-1], 4)):
        (line,) = readouts.lineage_lines(t, values, found)
        np.testing.assert_allclose(line.t, [0.0, 1.0, 2.0, 3.0])
        np.testing.assert_allclose(line.value, 14.5)
