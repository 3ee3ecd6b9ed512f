"""The phase portrait of the selected gene: ``Mu`` against ``Ms`` with what each fit shows (curve, cells)."""

from __future__ import annotations

from typing import Any

import holoviews as hv
import panel as pn
import param

from explorer.app import plots
from explorer.app.escape import markdown_text
from explorer.app.state import ExplorerState
from explorer.app.views._layers import CellScatter

#: ``only`` values that follow the comparison's picks, and how the title names them
_PICKS = {"compare_a": "A", "compare_b": "B"}


class PhasePortrait(pn.viewable.Viewer):
    """``Mu`` against ``Ms`` for every cell, coloured as the embedding; active fit solid, others dashed.

    ``only`` restricts the fitted curves to one fit label (the comparison view's A or B).
    """

    state = param.ClassSelector(class_=ExplorerState)
    only = param.String(default=None, allow_None=True)
    width = param.Integer(default=480)
    height = param.Integer(default=420)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        state = self.state
        self.scatter = CellScatter(
            state,
            xy=lambda: (state.gene_values("Ms"), state.gene_values("Mu")),
            # a comparison's portrait is retitled when its pick changes
            xy_depends=["gene", "adata", *([self.only] if self.only in _PICKS else [])],
            labels=("Ms", "Mu"),
            on_tap=lambda x, y: state.select_cell_at("phase", x, y),
            title=self._title,
            width=self.width,
            height=self.height,
        )
        self.fits = hv.DynamicMap(
            self._draw_fits,
            streams=[hv.streams.Params(state, ["gene", "model", "results", "compare_a", "compare_b"])],
        )
        self.plot = self.scatter.overlay(self.fits)

    def _only_label(self) -> str | None:
        """Return the fit label ``only`` stands for (the comparison's A or B is read from the state)."""
        if self.only in _PICKS:
            return getattr(self.state, self.only, None)
        return self.only

    def _title(self) -> str:
        title = f"{self.state.gene}: phase portrait"
        if self.only in _PICKS:
            return f"{title} — {_PICKS[self.only]}: {self._only_label() or 'no fit'}"
        return f"{title} — {self.only}" if self.only else title

    def _fits(self) -> list[Any]:
        fits = self.state.phase_fits()
        if self.only is not None:
            label = self._only_label()
            fits = [f for f in fits if f.label == label]
        return fits

    def _draw_fits(self, **_: Any) -> hv.Overlay:
        return plots.phase_fits(self._fits())

    def __panel__(self) -> pn.viewable.Viewable:
        state = self.state
        header = pn.pane.Markdown(pn.bind(self._header, state.param.gene, state.param.model), margin=(0, 10))
        legend = pn.pane.HTML(
            pn.bind(self._legend, state.param.gene, state.param.model, state.param.results), margin=(0, 10)
        )
        return pn.Column(header, pn.pane.HoloViews(self.plot, name="phase portrait"), legend)

    def _legend(self, *_: Any) -> str:
        return plots.fits_legend_html(self._fits())

    def _header(self, gene: str | None, model: str | None) -> str:
        fit = f" — fit: **{markdown_text(model)}**" if model else " — no fit yet: press Run"
        return f"Gene **{markdown_text(gene)}**{fit}"
