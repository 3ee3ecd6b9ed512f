"""Two fitted models side by side, and every fit scored.

A against B: phase portraits, latent time, per-gene fit quality, per-gene held-out
reconstruction error, velocity agreement. Then a table of metrics of all fits (CBDir for
user-given transitions, consistency, confidence, reconstruction), computed in the
background when asked for.
"""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter

from explorer._types import InputError
from explorer.app import plots, readouts
from explorer.app.escape import html_text, markdown_text
from explorer.app.state import ExplorerState
from explorer.app.views._layers import CellScatter
from explorer.app.views.phase import PhasePortrait


class ComparisonView(pn.viewable.Viewer):
    """Pick fits A and B; clicking a gene on the fit-quality plot selects it everywhere."""

    state = param.ClassSelector(class_=ExplorerState)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        state = self.state
        self.phase_a = PhasePortrait(state=state, only="compare_a", width=400, height=340)
        self.phase_b = PhasePortrait(state=state, only="compare_b", width=400, height=340)
        pair = ["compare_a", "compare_b", "results"]
        self.latent = hv.DynamicMap(self._draw_latent, streams=[hv.streams.Params(state, [*pair, "cell"])])
        self.quality = hv.DynamicMap(self._draw_quality, streams=[hv.streams.Params(state, [*pair, "gene"])])
        self._quality_tap = hv.streams.Tap(source=self.quality, transient=True)
        self._quality_tap.add_subscriber(self._quality_tapped)
        # computed in the background when first drawn (readout_revision: it landed)
        self.reconstruction = hv.DynamicMap(
            self._draw_reconstruction, streams=[hv.streams.Params(state, [*pair, "gene", "readout_revision"])]
        )
        self._reconstruction_tap = hv.streams.Tap(source=self.reconstruction, transient=True)
        self._reconstruction_tap.add_subscriber(self._reconstruction_tapped)
        self.reconstruction_note = pn.pane.Markdown("", width=400, margin=(0, 10))
        self.transitions = pn.widgets.TextInput.from_param(
            state.param.metric_transitions,
            name="Transitions (source>target, comma-separated) scored by CBDir",
            placeholder="e.g. progenitor>mature, mature>terminal",
            width=520,
        )
        self.metrics_button = pn.widgets.Button(label="Compute metrics", color="primary", width=150)
        self.metrics_button.on_click(lambda _: state.compute_metrics())
        self.metrics = pn.widgets.Tabulator(
            pd.DataFrame(columns=["model"]),
            show_index=False,
            disabled=True,
            selectable=False,
            sizing_mode="stretch_width",
            height=200,
        )
        self.metrics_note = pn.pane.Markdown(_METRICS_HELP, sizing_mode="stretch_width")
        # a click on the table: a fit's per-cluster detail, or a metric's per cluster and per cell
        self._found: readouts.MetricsTable | None = None
        self._detail: readouts.MetricDetail | None = None
        self.metrics.on_click(self._metric_clicked)
        self.per_cluster_note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.per_cluster = _detail_table("cluster")
        # a transition's CBDir clicked: the genes that carry it (the note is empty otherwise);
        # clicking one selects it everywhere
        self.transition_genes_note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.transition_genes = _detail_table("gene")
        self.transition_genes.on_click(self._transition_gene_clicked)
        state.param.watch(self._show_metrics, ["readout_revision", "results", "metric_transitions"])
        # picking other fits returns the map to their agreement (watched before the map's own redraw)
        state.param.watch(self._forget_cell_metric, pair)
        self.agreement = CellScatter(
            state,
            xy=lambda: tuple(state.embedding().T),
            xy_depends=["basis", "adata"],
            labels=("dim 1", "dim 2"),
            on_tap=lambda x, y: state.select_cell_at("embedding", x, y),
            coloring=self._agreement_coloring,
            color_depends=pair,
            title=self._agreement_title,
            width=400,  # three plots of 400 fit a 1,600-pixel page beside the sidebar (420 did not)
            height=360,
        )

    def _agreement_coloring(self) -> readouts.Coloring:
        n_obs = self.state.adata.n_obs
        clicked = readouts.metric_coloring(self._detail, n_obs)
        return clicked or readouts.agreement_coloring(self.state.compare_agreement(), n_obs)

    def _agreement_title(self) -> str:
        clicked = readouts.metric_coloring(self._detail, self.state.adata.n_obs)
        return clicked.label if clicked is not None else "velocity agreement of A and B (cosine)"

    def _forget_cell_metric(self, *_: Any) -> None:
        self._detail = None

    def _draw_latent(self, **_: Any) -> hv.Overlay:
        a, b = self.state.compare_fits()
        ta, tb = readouts.own_latent_time(a), readouts.own_latent_time(b)
        if ta is None or tb is None:
            return plots.message("latent time needs two fits that have one", width=400, height=340)
        return plots.comparison_scatter(
            ta,
            tb,
            labels=("latent time A", "latent time B"),
            title="latent time per cell",
            width=400,
            height=340,
            highlight_index=self.state.cell,
        )

    def _draw_quality(self, **_: Any) -> hv.Overlay:
        table = self.state.compare_quality()
        if table is None or table.empty:
            return plots.message("fit quality needs two fits that report one per gene", width=400, height=340)
        hit = np.flatnonzero(table["gene"].to_numpy() == self.state.gene)
        # each fit's own measure; the title says when they are not on one scale, and then
        # no diagonal is drawn (until 2026-12-05 it was, and put VeloVAE above the dynamical
        # model on almost every gene of the pancreas, a difference of scale)
        fits = self.state.compare_fits()
        label_a, label_b, title = readouts.quality_axes(*fits)
        return plots.comparison_scatter(
            table["a"].to_numpy(),
            table["b"].to_numpy(),
            labels=(label_a, label_b),
            title=title,
            width=400,
            height=340,
            highlight_index=int(hit[0]) if hit.size else None,
            diagonal=readouts.one_scale(*fits),
        )

    def _draw_reconstruction(self, **_: Any) -> hv.Overlay:
        state = self.state
        found = state.compare_reconstruction()
        labels = ("A: log10 MSE", "B: log10 MSE")
        # always the same kind of plot (an empty one while there is nothing to show), so that
        # the drawn figure keeps its axes when the figures arrive from the background
        empty = np.empty(0)
        if found is None:
            self.reconstruction_note.object = ""
            title = (
                "reconstruction error: computing…"
                if state.reconstruction_pending()
                else "reconstruction needs fits predicting (u, s)"  # 45 characters show
            )
            return plots.comparison_scatter(empty, empty, labels=labels, title=title, width=400, height=340)
        table = found.table
        self.reconstruction_note.object = (
            f"Scored on {markdown_text(found.cells)}, {len(table):,} genes both fits predict. "
            f"MSE over them: A {found.summary[0]:.3g}, B {found.summary[1]:.3g} "
            "(below the diagonal: B reconstructs the gene better)."
        )
        hit = np.flatnonzero(table["gene"].to_numpy() == state.gene)
        return plots.comparison_scatter(
            readouts.log10_positive(table["a"].to_numpy()),
            readouts.log10_positive(table["b"].to_numpy()),
            labels=labels,
            title="per-gene reconstruction error (click a gene)",
            highlight_index=int(hit[0]) if hit.size else None,
            width=400,
            height=340,
        )

    def _reconstruction_tapped(self, x: float | None = None, y: float | None = None) -> None:
        if x is None or y is None:
            return
        try:
            self.state.select_gene_near(x, y, plot="reconstruction")
        except InputError as err:
            self.state.error = str(err)

    def _show_metrics(self, *_: Any) -> None:
        found = self.state.metrics_table()
        if found is not None:
            self._found = found
            _show_table(self.metrics, found.table)

    def _metric_clicked(self, event: Any) -> None:
        """Show the clicked cell's detail below the table (:func:`readouts.metric_detail`).

        A fit's name: its per-cluster means. A metric: its per-cluster means for every fit,
        and the clicked fit's per-cell values on the map.
        """
        row, column = getattr(event, "row", None), getattr(event, "column", None) or "model"
        table, found = self.metrics.value, self._found
        if found is None or row is None or not 0 <= row < len(table) or "model" not in table:
            return
        label = str(found.table["model"].iloc[row])
        # Tabulator's column titles are the escaped names
        names = {html_text(c): c for c in found.table.columns}
        detail = readouts.metric_detail(found, label, names.get(str(column), str(column)))
        if detail is None:
            return
        _show_table(self.per_cluster, detail.table)
        self.per_cluster_note.object = f"**{markdown_text(detail.title)}**" + (
            f"; the map shows {markdown_text(detail.label)}." if detail.values is not None else ":"
        )
        self.per_cluster.visible = True
        if detail.genes is not None:
            _show_table(self.transition_genes, detail.genes)
        self.transition_genes_note.object = markdown_text(detail.genes_title)
        self.transition_genes.visible = detail.genes is not None
        if detail.values is not None or self._detail is not None:
            self._detail = detail if detail.values is not None else None
            self.agreement.param.update(color_revision=self.agreement.color_revision + 1)

    def _transition_gene_clicked(self, event: Any) -> None:
        """Select the clicked gene of a transition's gene table (every view follows)."""
        row, table = getattr(event, "row", None), self.transition_genes.value
        if row is None or not 0 <= row < len(table) or "gene" not in table:
            return
        try:
            self.state.select_gene(str(table["gene"].iloc[row]))
        except InputError as err:
            self.state.error = str(err)

    def _quality_tapped(self, x: float | None = None, y: float | None = None) -> None:
        if x is None or y is None:
            return
        try:
            self.state.select_gene_near(x, y)
        except InputError as err:
            self.state.error = str(err)

    def __panel__(self) -> pn.viewable.Viewable:
        state = self.state
        pickers = pn.Row(
            pn.widgets.Select.from_param(state.param.compare_a, label="Model A", width=260),
            pn.widgets.Select.from_param(state.param.compare_b, label="Model B", width=260),
        )
        return pn.Column(
            pickers,
            pn.Row(pn.pane.HoloViews(self.phase_a.plot), pn.pane.HoloViews(self.phase_b.plot)),
            pn.Row(
                pn.pane.HoloViews(self.latent),
                pn.pane.HoloViews(self.quality, name="fit quality"),
                pn.pane.HoloViews(self.agreement.overlay()),
            ),
            pn.Row(
                pn.Column(
                    pn.pane.HoloViews(self.reconstruction, name="reconstruction"), self.reconstruction_note
                ),
                pn.Column(
                    "### Every fit scored",
                    pn.Row(self.transitions, self.metrics_button),
                    self.metrics,
                    self.metrics_note,
                    self.per_cluster_note,
                    self.per_cluster,
                    self.transition_genes_note,
                    self.transition_genes,
                    sizing_mode="stretch_width",
                ),
                sizing_mode="stretch_width",
            ),
            name="Compare",
        )


def _detail_table(first_column: str) -> pn.widgets.Tabulator:
    """A hidden, read-only table under the metrics (a click's detail), until something is shown in it."""
    return pn.widgets.Tabulator(
        pd.DataFrame(columns=[first_column]),
        show_index=False,
        disabled=True,
        selectable=False,
        sizing_mode="stretch_width",
        height=240,
        visible=False,
    )


def _show_table(widget: pn.widgets.Tabulator, table: pd.DataFrame) -> None:
    """Show ``table`` in ``widget``, numbers to three decimals.

    Tabulator puts column titles into the page as HTML: the cluster names in them come
    from the dataset, so they go in escaped (and show literally).
    """
    table = table.rename(columns=html_text)
    numeric = [c for c in table.columns if pd.api.types.is_float_dtype(table[c])]
    # one update: the browser draws the table once (a click between two draws was lost)
    widget.param.update(formatters={c: NumberFormatter(format="0.000") for c in numeric}, value=table)


_METRICS_HELP = (
    "*cbdir[A>B]*: mean correlation of a cell's velocity with the displacement to its neighbours "
    "in the target cluster, over the source cells that have such neighbours (−1 to 1; Qiao & Huang 2021); "
    "*icvcoh[A]*: mean cosine of a cell's velocity with its neighbours' in the same cluster. "
    "*consistency* / *consistency_type*: mean cosine with its neighbours' / with its cell type's (DeepVelo). "
    "*velocity_confidence*: scVelo's, mean over cells. "
    "*MSE*: reconstruction error of the predicted (u, s), on the fit's held-out cells when it "
    "recorded a split (*MSE cells*), else all cells, over the genes it predicts. "
    "Click a fit's name for its means per cluster; click a score for that metric per cluster for every "
    "fit and the clicked fit's value per cell on the map (picking fits A/B brings back their agreement); "
    "a transition's CBDir also lists the genes that carry it (click one to select it). "
    "All by `explorer.models.metrics.model_metrics`."
)
