"""The selected gene against latent time: ``Ms``, ``Mu`` and velocity, each with the fitted curve."""

from __future__ import annotations

from typing import Any, Literal

import holoviews as hv
import numpy as np
import panel as pn
import param
from holoviews.core.spaces import Callable

from explorer.app import plots
from explorer.app.escape import markdown_text
from explorer.app.state import ExplorerState
from explorer.app.views._layers import CellScatter, LiveLayer

_WHAT: tuple[Literal["Ms", "Mu", "velocity"], ...] = ("Ms", "Mu", "velocity")


class GeneTimeView(pn.viewable.Viewer):
    """Three linked scatters against latent time; click a cell in any of them to select it.

    With the active fit's lineages (VeloVAE's full model) each plot draws one line per
    lineage in a darker shade of its cell type's colour (:meth:`ExplorerState.lineage_lines`)
    instead of the red line (the fit's mean over all cells, which would mix the lineages);
    like the red line, they follow the gene and the fit without a HoloViews update.
    """

    state = param.ClassSelector(class_=ExplorerState)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        state = self.state
        self.scatters: dict[str, CellScatter] = {}
        self.curves_live: dict[str, LiveLayer] = {}
        self.plots: dict[str, hv.Overlay] = {}
        self.lines_live: dict[str, LiveLayer] = {}
        for what in _WHAT:
            scatter = CellScatter(
                state,
                xy=self._xy_of(what),
                xy_depends=["gene", "model", "results", "adata"],
                live_on=["gene"],
                labels=("latent time", what),
                on_tap=self._tap_of(what),
                title=(lambda what=what: f"{state.gene}: {what}"),
                width=380,
                height=260,
                y_labels_along_axis=True,  # the gene's range changes: see CellScatter
            )
            # the fitted curve and lineage lines follow the gene without a HoloViews update
            # (see LiveLayer)
            self.curves_live[what] = LiveLayer()
            self.lines_live[what] = LiveLayer()
            curve = hv.DynamicMap(self._curve_of(what))
            # drawn afresh whenever the plot is: the number of lines changes with the fit and
            # the gene, and HoloViews failed reading a kept drawing's lines against the lines
            # sent to it since (a colouring changed after VeloVAE on 50 dentate gyrus cells)
            lines = hv.DynamicMap(Callable(self._lines_of(what), memoize=False))
            self.scatters[what] = scatter
            self.plots[what] = scatter.overlay(curve, lines)
        state.param.watch(self._push_curves, ["gene", "model", "results", "adata"])

    def _xy_of(self, what: Literal["Ms", "Mu", "velocity"]) -> Any:
        def xy() -> tuple[np.ndarray, np.ndarray] | None:
            t = self.state.latent_time()
            if t is None or (what == "velocity" and self.state.fit is None):
                return None
            return t, self.state.gene_values(what)

        return xy

    def _tap_of(self, what: Literal["Ms", "Mu", "velocity"]) -> Any:
        return lambda x, y: self.state.select_cell_at("time", x, y, what=what)

    def _curve_data(self, what: Literal["Ms", "Mu", "velocity"]) -> tuple[np.ndarray, np.ndarray]:
        found = None if what == "velocity" and self.state.fit is None else self.state.time_curve(what)
        return (np.empty(0), np.empty(0)) if found is None else (found[0], found[1])

    def _curve_of(self, what: Literal["Ms", "Mu", "velocity"]) -> Any:
        def draw() -> hv.Curve:
            t, value = self._curve_data(what)
            return plots.curve(t, value, labels=("latent time", what)).opts(
                hooks=[self.curves_live[what].hook], backend="bokeh"
            )

        return draw

    def _lines(self, what: Literal["Ms", "Mu", "velocity"]) -> tuple[Any, ...]:
        if what == "velocity" and self.state.fit is None:
            return ()
        return self.state.lineage_lines(what) or ()

    def _lines_of(self, what: Literal["Ms", "Mu", "velocity"]) -> Any:
        def draw() -> hv.Contours:
            return plots.lineage_lines(self._lines(what), labels=("latent time", what)).opts(
                hooks=[self.lines_live[what].hook], backend="bokeh"
            )

        return draw

    def _push_curves(self, *_: Any) -> None:
        for what, live in self.curves_live.items():
            live.push_columns(*self._curve_data(what))
        for what, live in self.lines_live.items():
            live.push(plots.lineage_line_columns(self._lines(what)))

    def __panel__(self) -> pn.viewable.Viewable:
        state = self.state
        note = pn.pane.Markdown(
            pn.bind(self._note, state.param.model, state.param.results, state.param.gene), margin=(0, 10)
        )
        # the three plots join the page when the active fit first has a latent time: until
        # then they would be empty axes, which cost every opening page a third of its drawing;
        # they hide again while the active fit has none (DeepVelo after VeloVAE left them empty)
        slot = pn.Column()
        self.slot = slot

        def show(*_: Any) -> None:
            timed = state.latent_time() is not None
            if not slot.objects and timed:
                slot.objects = [pn.Row(*(pn.pane.HoloViews(self.plots[w], name=f"time {w}") for w in _WHAT))]
            slot.visible = timed

        state.param.watch(show, ["model", "results", "adata"])
        show()
        return pn.Column(note, slot, name="Gene over time")

    def _note(self, *_: Any) -> str:
        if self.state.latent_time() is None:
            fits = self.state.results.items()
            timed = [label for label, fit in fits if self.state.latent_time(fit) is not None]
            if timed:  # another fit of this session has one
                names = ", ".join(f"**{markdown_text(label)}**" for label in timed)
                has = "has one: choose it" if len(timed) == 1 else "have one: choose one"
                return f"*The active fit has no latent time; {names} {has} under Active model.*"
            return (
                "*No latent time yet: run a model that orders cells in time (one that shows a latent time).*"
            )
        # the velocity plot of a gene the fit has no velocity for is empty axes: say why
        gap = self.state.velocity_gap()
        return self._curve_note() + (f"  \n*Velocity plot: {markdown_text(gap)}.*" if gap else "")

    def _curve_note(self) -> str:
        model = markdown_text(self.state.model)
        if "curve" in self.state.fit_shows():
            fit_words = f"the **{model}** fit at each cell's gene time"
        else:
            fit_words = f"the **{model}** fit's predicted values of the cells"
        lines = self._lines("Ms")
        if lines:
            # the lineages' (or cell types') lines stand for the fit: no red line over all cells
            # (ExplorerState.time_curve)
            by_type = lines[0].kind == "type"
            shade = (
                "Lines in a darker shade of each type's colour" + ("" if by_type else ", each lineage")
                if lines[0].typed
                else "Lines in each lineage's colour (lineages found in the fit's cell state)"
            )
            each = plots.lineages_html(lines, shade, text=markdown_text)
            within = (
                "each cell type (no line over all cells: where types overlap in time with different "
                "values it runs through none of them)"
                if by_type
                else "each lineage (no line over all cells: it would mix lineages whose values part)"
            )
            return f"{each}: {fit_words}, averaged along latent time within {within}."
        found = self.state.time_curve("Ms")
        if found is not None and found[2] == "fit":
            along = "averaged along latent time (broken where the cells at one time part)"
            return f"Red line: {fit_words}, {along}."
        return "Red line: the mean along latent time (no kinetic fit for this gene)."
