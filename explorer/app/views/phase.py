"""The phase portrait of the selected gene: ``Mu`` against ``Ms`` with what each fit shows (curve, cells)."""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import param

from explorer.app import plots
from explorer.app.escape import markdown_text
from explorer.app.state import ExplorerState
from explorer.app.views._layers import CellScatter, LiveLayer

#: ``only`` values that follow the comparison's picks, and how the title names them
_PICKS = {"compare_a": "A", "compare_b": "B"}
#: state parameters on which the portrait redraws its cells and curves (:meth:`PhasePortrait._changed`)
_REDRAWN_ON = ("gene", "model", "results", "compare_a", "compare_b")


def _extent(layers: list[tuple[tuple[str, bool, str], dict[str, Any]]]) -> tuple[np.ndarray, np.ndarray]:
    """Every ``Ms`` and every ``Mu`` value of the fitted layers (arrow ends and lineage curves included)."""
    xs: list[np.ndarray] = [np.empty(0)]
    ys: list[np.ndarray] = [np.empty(0)]
    for _, columns in layers:
        for name, values in columns.items():
            if name.startswith("Ms"):
                xs.append(np.asarray(values, dtype=np.float64).ravel())
            elif name.startswith("Mu"):
                ys.append(np.asarray(values, dtype=np.float64).ravel())
            elif name == "curves":
                xs.extend(np.asarray(c.s, dtype=np.float64) for c in values)
                ys.extend(np.asarray(c.u, dtype=np.float64) for c in values)
    return np.concatenate(xs), np.concatenate(ys)


class PhasePortrait(pn.viewable.Viewer):
    """``Mu`` against ``Ms`` for every cell, coloured as the embedding; active fit solid, others dashed.

    ``only`` restricts the fitted curves to one fit label (the comparison view's A or B).
    """

    state = param.ClassSelector(class_=ExplorerState)
    only = param.String(default=None, allow_None=True)
    width = param.Integer(default=480)
    height = param.Integer(default=420)
    fits_revision = param.Integer(default=0)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        state = self.state
        self.scatter = CellScatter(
            state,
            xy=lambda: (state.gene_values("Ms"), state.gene_values("Mu")),
            xy_depends=["adata"],  # a gene, model or pick changes both layers: see _changed
            redrawn_on=_REDRAWN_ON,
            labels=("Ms", "Mu"),
            on_tap=lambda x, y: state.select_cell_at("phase", x, y),
            title=self._title,
            width=self.width,
            height=self.height,
            y_labels_along_axis=True,  # Mu's range changes with the gene: see CellScatter
        )
        #: the fitted layers of the last HoloViews drawing: their keys and their data sources
        self._drawn_keys: list[tuple[str, bool, str]] | None = None
        self._fits_live: list[LiveLayer] = []
        self.fits = hv.DynamicMap(self._draw_fits, streams=[hv.streams.Params(self, ["fits_revision"])])
        self.plot = self.scatter.overlay(self.fits)
        # registered after the scatter's own watcher, as the fits' DynamicMap stream was
        state.param.watch(self._changed, list(_REDRAWN_ON))

    def _only_label(self) -> str | None:
        """Return the fit label ``only`` stands for (the comparison's A or B is read from the state)."""
        if self.only in _PICKS:
            return getattr(self.state, self.only, None)
        return self.only

    def _title(self) -> str:
        title = f"{self.state.gene}: phase portrait"
        if self.only in _PICKS:
            # the gene and the fit only: "phase portrait" too cut a 400-pixel comparison's
            # title ("Pcsk2: phase portrait — A: dynamical (from fil")
            return f"{self.state.gene} — {_PICKS[self.only]}: {self._only_label() or 'no fit'}"
        return f"{title} — {self.only}" if self.only else title

    def _fits(self) -> list[Any]:
        fits = self.state.phase_fits()
        if self.only is not None:
            label = self._only_label()
            fits = [f for f in fits if f.label == label]
        return fits

    def _draw_fits(self, **_: Any) -> hv.Overlay:
        fits = self._fits()
        layers = plots.phase_fit_layers(fits)
        self._drawn_keys = [key for key, _ in layers]
        self._fits_live = [LiveLayer() for _ in layers]
        return plots.phase_fits(fits, hooks=[live.hook for live in self._fits_live])

    def _changed(self, *_: Any) -> None:
        """Another gene, fit or pick: new cells and curves, sent directly when only their data changed.

        A gene click whose fits draw the same layers (same fits, same kinds of lines) gives
        the drawn data sources new columns and the axes a range over cells and curves,
        without a HoloViews update of the plot (most of a click's server time; the lineage
        curves too since 2026-12-04, which until then redrew the plot on every click of a
        VeloVAE fit: 0.15 s of server time a click against 0.006 s). Anything else (other
        fits, another kind of layer) redraws both layers through HoloViews, so that the
        axes are computed from current data.
        """
        layers = plots.phase_fit_layers(self._fits())
        keys = [key for key, _ in layers]
        # what each drawn layer's data source holds for this gene
        sources = [plots.phase_layer_columns(key[2], columns) for key, columns in layers]
        live = keys == self._drawn_keys and all(
            live.sources and all(set(s.data) == set(data) for s in live.sources)
            for live, data in zip(self._fits_live, sources, strict=True)
        )
        extent = _extent(layers) if live else None
        if self.scatter.refresh(live=live, extent=extent):
            for live_layer, data in zip(self._fits_live, sources, strict=True):
                live_layer.push(data)
        else:
            self.fits_revision += 1

    def __panel__(self) -> pn.viewable.Viewable:
        state = self.state
        header = pn.pane.Markdown(pn.bind(self._header, state.param.gene, state.param.model), margin=(0, 10))
        # as wide as the plot, so that a long legend (five lineages' names) wraps under it
        # rather than widening the page (1,818 pixels in a 1,600-pixel window until 2026-12-04)
        legend = pn.pane.HTML(
            pn.bind(self._legend, state.param.gene, state.param.model, state.param.results),
            margin=(0, 10),
            width=self.width,
        )
        return pn.Column(header, pn.pane.HoloViews(self.plot, name="phase portrait"), legend)

    def _legend(self, *_: Any) -> str:
        return plots.fits_legend_html(self._fits())

    def _header(self, gene: str | None, model: str | None) -> str:
        fit = f" — fit: **{markdown_text(model)}**" if model else " — no fit yet: press Run"
        return f"Gene **{markdown_text(gene)}**{fit}"
