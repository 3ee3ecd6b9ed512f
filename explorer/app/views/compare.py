"""Two fitted models side by side: phase portraits, latent time, fit quality, velocity agreement."""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import param

from explorer._types import InputError
from explorer.app import plots, readouts
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
        self.agreement = CellScatter(
            state,
            xy=lambda: tuple(state.embedding().T),
            xy_depends=["basis", "adata"],
            labels=("dim 1", "dim 2"),
            on_tap=lambda x, y: state.select_cell_at("embedding", x, y),
            coloring=self._agreement_coloring,
            color_depends=pair,
            title=lambda: "velocity agreement of A and B (cosine)",
            width=420,
            height=360,
        )

    def _agreement_coloring(self) -> readouts.Coloring:
        return readouts.agreement_coloring(self.state.compare_agreement(), self.state.adata.n_obs)

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
        a, b = self.state.compare_fits()
        return plots.comparison_scatter(
            table["a"].to_numpy(),
            table["b"].to_numpy(),
            # each fit's own measure (a likelihood, an R²): they need not be the same
            labels=(f"A: {readouts.quality_name(a)}", f"B: {readouts.quality_name(b)}"),
            title="per-gene fit quality (click a gene)",
            width=400,
            height=340,
            highlight_index=int(hit[0]) if hit.size else None,
        )

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
            name="Compare",
        )
