"""What the newer models show in the app, through a toy model registered in the test (no model names).

The toy declares ``shows=("cell_points", "cell_rates", "latent_time", "uncertainty")`` and
records a seeded training split, as VeloVAE and DeepVelo do; nothing in ``explorer/app``
names it. Checked: per-cell velocity arrows in the phase portrait, the latent time's
interval in the cell inspector, held-out reconstruction of A against B, random walks from
a cell, fates computed in the background and shown as colourings, the metrics table, trust
diagnostics with a recompute without flagged genes, and a basis the fit holds.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from bokeh.document import Document
from panel.io.state import set_curdoc

from explorer.app import readouts
from explorer.app.escape import markdown_text
from explorer.app.fits import with_fit
from explorer.app.main import create_app
from explorer.app.plots import WALK_COLOR
from explorer.app.views.field import PERTURBED_COLOR, TRAJECTORY_COLOR
from explorer.keys import Key
from explorer.models import MODELS, register_model, unregister_model
from explorer.models.base import VelocityResult
from explorer.models.vector_field import VectorField
from tests.app.conftest import embedding_lines, phase_layers

TOY = "toy_rates"


def _dense(matrix) -> np.ndarray:
    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, dtype=np.float32)


class ToyRates:
    """Predicts each cell at ``shrink`` times its (Ms, Mu), with per-cell rates and a timed posterior.

    Rates of cell i: alpha 2, beta 1 + Mu_i, gamma 0.5; velocity beta Mu - gamma Ms. Latent
    time: the simulator's, SD 0.05; training split: a seeded 70 %, the same for every fit.
    """

    name = TOY

    def __init__(self, *, shrink: float = 0.9, seed: int = 0) -> None:
        self.shrink = shrink
        self.seed = seed

    def get_params(self) -> dict[str, float]:
        return {"shrink": self.shrink, "seed": self.seed}

    def fit(self, adata, *, progress=None) -> VelocityResult:
        ms, mu = _dense(adata.layers[Key.layers.MS]), _dense(adata.layers[Key.layers.MU])
        beta, gamma = 1 + mu, np.full_like(ms, 0.5)
        t = adata.obs[Key.obs.TRUE_T].to_numpy(dtype=np.float32)
        train = np.random.default_rng(self.seed).random(adata.n_obs) < 0.7
        return VelocityResult(
            model=TOY,
            params=self.get_params(),
            obs_names=adata.obs_names,
            var_names=adata.var_names,
            velocity=beta * mu - gamma * ms,
            gene_params=pd.DataFrame(index=adata.var_names),
            velocity_genes=np.ones(adata.n_vars, dtype=bool),
            latent_time=(t - t.min()) / (t.max() - t.min()),
            uncertainty=ms[:, 0].copy(),
            layers={
                Key.layers.PREDICTED_S: self.shrink * ms,
                Key.layers.PREDICTED_U: self.shrink * mu,
                Key.layers.RATE_ALPHA: np.full_like(ms, 2.0),
                Key.layers.RATE_BETA: beta,
                Key.layers.RATE_GAMMA: gamma,
            },
            obs=pd.DataFrame(
                {
                    Key.obs.LATENT_TIME_STD: np.full(adata.n_obs, 0.05),
                    Key.obs.LATENT_TIME_START_SPREAD: np.linspace(0, 0.3, adata.n_obs),
                    Key.obs.LATENT_TIME_RANK_WIDTH: np.full(adata.n_obs, 0.125),
                    Key.obs.FIT_TRAIN: train,
                },
                index=adata.obs_names,
            ),
            obsm={Key.obsm.RATES_UMAP: np.column_stack([ms[:, 0], mu[:, 0]])},  # an embedding of its own
        )


@pytest.fixture
def app(app_adata, tmp_path):
    register_model(
        TOY, ToyRates, shows=("cell_points", "cell_rates", "latent_time", "uncertainty"), description="toy"
    )
    doc = Document()
    with set_curdoc(doc):
        page = create_app(app_adata, data_dir=tmp_path)
        page.server_doc(doc)
        yield page.app
    unregister_model(TOY)
    assert TOY not in MODELS


def _wait(state) -> None:
    for job in state.background_jobs():
        assert job.join(120)
    assert state.error == ""


def test_rates_intervals_reconstruction_walks_fates_and_metrics(app):
    state, views = app.state, app.views
    assert state.run_model(TOY).join(120), state.error
    first = state.model

    # each cell's own velocity as arrows: an even sample of at most 400 cells
    gene = str(state.adata.var_names[3])
    state.select_gene(gene)
    (arrows,) = phase_layers(views["phase"], "arrows")  # x0, y0, x1, y1
    n_arrows = min(state.adata.n_obs, readouts.MAX_CELL_ARROWS)
    assert len(arrows) == 3 * n_arrows  # a shaft and two head strokes each
    shafts = arrows[:n_arrows]
    ms, mu = state.gene_values("Ms"), state.gene_values("Mu")
    cells = np.arange(state.adata.n_obs)[readouts.even_sample(state.adata.n_obs, n_arrows)]
    np.testing.assert_allclose(shafts[:, 0], ms[cells], rtol=1e-6)
    np.testing.assert_allclose(shafts[:, 1], mu[cells], rtol=1e-6)  # each shaft starts at its cell
    # du = 2 - (1 + u) u points up exactly where the cell's u is below 1
    np.testing.assert_array_equal(shafts[:, 3] > shafts[:, 1], 2 - (1 + mu[cells]) * mu[cells] > 0)
    assert "own rates (arrows)" in views["phase"]._legend()

    # the inspector: latent time with its 90 % interval (SD 0.05: ± 0.082)
    state.select_cell(10)
    t = state.latent_time()[10]
    lo, hi = max(t - 1.6449 * 0.05, 0.0), min(t + 1.6449 * 0.05, 1.0)  # within the axis (t = 0.040 here)
    assert f"{lo:.3f}–{hi:.3f}" in views["inspector"].summary.object
    # ... and how far the cell's rank moves between the fit's two initial times
    spread = 0.3 * 10 / (state.adata.n_obs - 1)
    assert f"start spread {spread:.3f} of the ranking" in views["inspector"].summary.object
    # ... and how much of the ordering its place is unsure over
    assert "its place within 12.5% of the cells (90 %)" in views["inspector"].summary.object
    # ... and the embedding coloured by that SD
    assert readouts.COLOR_TIME_SD in state.param.color_by.objects
    state.color_by = readouts.COLOR_TIME_SD
    np.testing.assert_allclose(views["embedding"].scatter.base.last.dimension_values("value"), 0.05)

    # held-out reconstruction, A (shrink 0.9) against B (shrink 0.8), on the cells both held out
    assert state.run_model(TOY, shrink=0.8).join(120), state.error
    assert (state.compare_a, state.compare_b) == (first, state.model)
    compare = views["compare"]
    compare.reconstruction[()]  # drawing it starts the computation
    _wait(state)
    found = state.compare_reconstruction()
    held = ~state.fit.result.obs[Key.obs.FIT_TRAIN].to_numpy()
    sq = (ms**2 + mu**2)[held].mean()  # for the selected gene: MSE = (1 - shrink)^2 mean(Ms^2 + Mu^2)
    row = found.table.set_index("gene").loc[gene]
    assert (row["a"], row["b"]) == pytest.approx((0.01 * sq, 0.04 * sq), rel=1e-4)
    assert found.n_cells == held.sum()
    frame = compare._draw_reconstruction()  # what the plot draws once the figures landed
    assert len(frame.get(0)) == state.adata.n_vars
    assert f"{held.sum():,} cells" in compare.reconstruction_note.object
    state.select_gene_near(float(np.log10(row["a"])), float(np.log10(row["b"])), plot="reconstruction")
    assert state.gene == gene

    # random walks from the selected cell: drawn on the embedding, their ends counted
    inspector = views["inspector"]
    assert not inspector.walk_button.disabled
    inspector.walk_button.clicks += 1
    assert state.walks.start == 10
    assert int(state.walks.ends["walks"].sum()) == 100
    assert embedding_lines(views["embedding"])["color"].count(WALK_COLOR) == 30
    assert "random walks of 100 steps" in inspector.where.object

    # fates of the active fit in the background, then its colourings
    state.fate_states = 3  # GPCCA's time grows with the macrostates
    inspector.fates_button.clicks += 1
    assert state.job.join(300), state.error
    assert state.error == ""
    fates = state.active_fates()
    assert len(fates.names) >= 1
    np.testing.assert_allclose(fates.probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert state.color_by == readouts.COLOR_TERMINAL
    assert state.coloring().kind == "category"
    state.color_by = f"{readouts.FATE_PREFIX}{fates.names[0]}"
    coloring = state.coloring()
    np.testing.assert_allclose(coloring.values, fates.probabilities[:, 0])
    bars = [r for r in views["embedding"].scatter.base_live.plots[-1].state.right if r.visible]
    assert bars  # a continuous colouring: its colour bar shows
    assert "fate probabilities" in inspector.where.object

    # every fit scored, for transitions between clusters
    state.compute_metrics("early>mid, mid>late")
    _wait(state)
    table = compare.metrics.value
    assert list(table["model"]) == list(state.results)
    columns = {"cbdir[early&gt;mid]", "cbdir[mid&gt;late]", "cbdir", "icvcoh", "consistency", "MSE"}
    assert columns <= set(table.columns)  # column titles are HTML in Tabulator: escaped
    assert table["MSE cells"].tolist() == ["held-out"] * len(state.results)
    compare._metric_clicked(SimpleNamespace(row=1))  # a fit's row: its per-cluster detail
    assert compare.per_cluster.visible
    assert set(compare.per_cluster.value["cluster"]) == set(state.adata.obs[Key.obs.CLUSTERS].astype(str))
    # a metric's cell: that metric per cluster for every fit, and the clicked fit's per-cell values on the map
    compare._metric_clicked(SimpleNamespace(row=1, column="MSE"))
    detail = compare.per_cluster.value.set_index("cluster")
    assert list(detail.columns) == [*table["model"], "cells scored"]
    assert detail.loc["all cells"].iloc[:2].tolist() == pytest.approx(table["MSE"].tolist(), rel=1e-5)
    assert detail.loc["all cells", "cells scored"] == held.sum()  # the held-out cells, as the MSE
    coloring = compare.agreement._coloring()
    assert coloring.label == f"MSE, {table['model'].iloc[1]} (per cell)"
    assert np.nanmean(coloring.values) == pytest.approx(table["MSE"].iloc[1], rel=1e-4)
    assert compare._agreement_title() == coloring.label
    assert not compare.transition_genes.visible  # the MSE lists no genes
    # a transition's CBDir: also the genes that carry it; a click on one selects it everywhere
    compare._metric_clicked(SimpleNamespace(row=1, column="cbdir[early&gt;mid]"))
    assert compare.transition_genes.visible and "The genes that carry" in compare.transition_genes_note.object
    genes = compare.transition_genes.value
    assert list(genes.columns) == ["gene", *table["model"]]
    clicked = genes["gene"].iloc[-1]  # the most forward gene of the clicked fit
    compare._transition_gene_clicked(SimpleNamespace(row=len(genes) - 1))
    assert state.gene == clicked
    compare._metric_clicked(SimpleNamespace(row=1, column="MSE"))
    assert not compare.transition_genes.visible and compare.transition_genes_note.object == ""
    picked = state.compare_a
    state.compare_a = state.compare_b  # other fits picked: the map shows their agreement again
    assert compare.agreement._coloring().label == "velocity agreement (cosine)"
    state.compare_a = picked
    state.compute_metrics("early>nowhere")
    assert "Unknown cluster 'nowhere'" in state.error
    # Tabulator writes column titles as HTML: dataset names go into them escaped
    payload = pd.DataFrame({"model": ["m"], "cbdir[<img src=x>>b]": [0.5]})
    state.metrics_table = lambda *a, **k: readouts.MetricsTable(payload, {})
    compare._show_metrics()
    assert list(compare.metrics.value.columns) == ["model", "cbdir[&lt;img src=x&gt;&gt;b]"]
    del state.metrics_table

    # trust diagnostics (explorer.diagnostics) in the gene table, then one click to drop the flagged genes
    genes = views["genes"]
    assert genes.without_button.disabled
    genes.diagnose_button.clicks += 1
    assert state.job.join(120), state.error
    flagged = state.flagged()
    table = state.gene_table().set_index("gene")
    assert (table[readouts.FLAG] != "").to_numpy().sum() == flagged.sum() > 0
    # the note counts the flagged genes by reason (it named every reason whatever flagged)
    reasons = state.diagnostics[state.model][Key.var.DIAG_FLAG_REASON].reindex(state.adata.var_names)
    boosted = sum("boost" in str(r).split(",") for r in reasons.to_numpy()[flagged])
    assert genes.flags_note.object.startswith(f"**{int(flagged.sum())}** velocity genes flagged")
    assert (f"transcriptional boost {boosted}" in genes.flags_note.object) == (boosted > 0)
    assert "not tested" not in genes.flags_note.object  # the data has cell types
    assert f"{int(flagged.sum()):,} of them velocity genes" in state.status
    assert not genes.without_button.disabled
    before = state.fit.result.velocity_genes.copy()
    genes.without_button.clicks += 1
    assert state.job.join(120), state.error
    assert state.model.endswith(f"without {int(flagged.sum())} flagged genes")
    np.testing.assert_array_equal(state.fit.result.velocity_genes, before & ~flagged)
    assert state.fit.transitions is not None

    # an embedding the fit holds (DeepVelo's UMAP of rates) is offered as a basis
    assert Key.obsm.RATES_UMAP in state.param.basis.objects
    state.basis = Key.obsm.RATES_UMAP
    np.testing.assert_allclose(
        state.embedding()[:, 0], state.gene_values("Ms", gene=str(state.adata.var_names[0]))
    )
    assert len(state.streamlines()) > 0


def test_a_vector_field_on_its_base_draws_paths_and_perturbs(app, monkeypatch):
    """vector_field learns from the session's own base fit; a click draws its path, the panel perturbs."""
    state, views = app.state, app.views
    assert state.run_model("stochastic").join(120), state.error
    base = state.fit
    statuses: list[str] = []
    state.param.watch(lambda e: statuses.append(e.new), ["status"])
    params = {"base": "stochastic", "n_pcs": 5, "epochs": 20, "n_fixed_point_starts": 0, "device": "cpu"}
    assert state.run_model("vector_field", **params).join(120)
    assert state.error == ""
    label = "vector_field (device=cpu, epochs=20, n_fixed_point_starts=0, n_pcs=5) on stochastic"
    assert state.model == label
    assert not [s for s in statuses if "base stochastic" in s]  # the base was not fitted again
    # ... and the field is the one a fit from the base's velocity gives
    direct = VectorField(**params).fit(with_fit(state.adata, base))
    np.testing.assert_allclose(
        state.fit.result.obsm[Key.obsm.VF_VELOCITY], direct.obsm[Key.obsm.VF_VELOCITY], rtol=1e-5, atol=1e-6
    )
    assert readouts.COLOR_DIVERGENCE in state.param.color_by.objects
    # a gene outside the field's state: the time view says why its velocity plot is empty
    genes = state.adata.var_names
    (outside, *_) = genes[~np.asarray(state.fit.result.velocity_genes)]
    state.select_gene(outside)
    time_of_cells = np.linspace(0, 1, state.adata.n_obs)  # a base with a latent time shows the time view
    monkeypatch.setattr(state, "latent_time", lambda fit=None: time_of_cells)
    assert f"Velocity plot: no velocity to draw for {markdown_text(outside)}" in views["time"]._note()
    monkeypatch.undo()
    # a click on a cell draws its path (black) on the embedding; the inspector says where it ends;
    # the path is sent to the drawn layer in place, without a HoloViews redraw of the embedding
    drawn = views["embedding"].walks.last
    state.select_cell(3)
    assert views["embedding"].walks.last is drawn
    found = state.trajectory
    assert found is not None and found.start == 3 and found.path.shape == (readouts.TRAJECTORY_STEPS + 1, 2)
    lines = embedding_lines(views["embedding"])
    (i,) = [i for i, color in enumerate(lines["color"]) if color == TRAJECTORY_COLOR]
    np.testing.assert_allclose(np.column_stack([lines["xs"][i], lines["ys"][i]]), found.path)
    panel = views["inspector"].field
    assert panel is not None
    assert "ends near a cell of" in panel.summary.object
    # the perturbation panel: a gene, a factor, the selected cells -> moved paths and the fate shift
    state.select_cells(np.arange(12))
    panel.gene.value, panel.factor.value = panel.gene.options[0], 0.0
    assert panel.perturb().join(120), state.error
    run = state.perturbation
    assert run.n_cells == 12 and run.factor == 0.0
    assert embedding_lines(views["embedding"])["color"].count(PERTURBED_COLOR) == 12
    assert "| control | perturbed | shift |" in panel.result.object
    assert "fates: the cluster nearest to each path" in panel.result.object  # no fates computed
    # a name typed in the box without Enter is what runs, not the gene chosen before
    typed = panel.gene.options[1]
    panel.gene.value_input = typed
    assert panel.perturb().join(120), state.error
    assert state.perturbation.gene == typed
    # with the field's fates in the session, the shift is in fate probabilities
    n = state.adata.n_obs
    probabilities = np.tile([0.25, 0.75], (n, 1))
    state.fates = {state.model: readouts.FateInfo(("X", "Y"), probabilities, np.full(n, -1), {}, "a test")}
    assert panel.perturb().join(120), state.error
    assert state.perturbation.measure.startswith("fate probabilities (a test)")
    assert "fates: fate probabilities" in panel.result.object
    np.testing.assert_allclose(state.perturbation.table["control"], [0.25, 0.75], atol=1e-6)
    panel.gene.value_input = "no such gene"
    assert panel.perturb() is None and "not one of the field's" in state.error
    # another fit active: no path, no panel result
    state.model = base.label
    assert state.trajectory is None
    assert panel.result.object == ""


def test_the_path_layers_data_is_what_a_drawing_of_it_holds():
    """What the embedding sends to its path layer in place has a drawing's columns and values."""
    import holoviews as hv

    from explorer.app.views.field import path_layer_columns, path_layers

    rng = np.random.default_rng(0)
    walks = [rng.normal(size=(5, 2)) for _ in range(3)]
    trajectory = rng.normal(size=(7, 2))
    fixed = SimpleNamespace(xy=np.array([[0.5, 1.5]]), kind=["attractor"])
    lines, dots = path_layer_columns(walks, trajectory, [], [], fixed)
    overlay = hv.render(path_layers(lines, dots))
    drawn = [r.data_source.data for r in overlay.renderers]
    for sent, source in zip((lines, dots), drawn, strict=True):
        assert set(sent) == set(source)
        for name, values in sent.items():
            if name in ("xs", "ys"):
                for a, b in zip(values, source[name], strict=True):
                    np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_array_equal(np.asarray(values), np.asarray(source[name]))
    # three walks, the path with its casing, two invisible lines; the path's end and the
    # fixed point as dots
    assert lines["color"].count("#ffffff") == 2 and len(lines["xs"]) == 3 + 2 + 2
    assert dots["line_color"][4] == "black" and dots["size"][3] == 11
