"""The embedding: cells on UMAP (or any ``X_*`` basis), streamlines, the selected cell's next cells.

Random walks from a cell, the selected cell's path on a vector field, a perturbation's
paths and the field's fixed points share one layer of lines and dots
(:func:`explorer.app.views.field.path_layers`).
"""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import param

from explorer.app import plots
from explorer.app.escape import html_text
from explorer.app.state import ExplorerState
from explorer.app.views._layers import CellScatter, LiveLayer
from explorer.app.views.field import path_layer_columns, path_layers

#: the embedding's width in pixels (its legend wraps to it)
_WIDTH = 560


class EmbeddingView(pn.viewable.Viewer):
    """Cells on the embedding, coloured by the state's ``color_by``; click a cell, box or lasso a group."""

    state = param.ClassSelector(class_=ExplorerState)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        state = self.state
        self.scatter = CellScatter(
            state,
            xy=self._xy,
            xy_depends=["basis", "adata"],
            labels=("dim 1", "dim 2"),
            on_tap=lambda x, y: state.select_cell_at("embedding", x, y),
            on_select=state.select_cells_in,
            title=lambda: f"{state.basis} — {state.color_by}",
            width=_WIDTH,
            height=460,
        )
        self.streamlines = hv.DynamicMap(
            self._draw_streamlines,
            # readout_revision: a stored fit's velocity graph landed (AppState._derive_stored)
            streams=[
                hv.streams.Params(
                    state, ["model", "basis", "show_streamlines", "results", "readout_revision"]
                )
            ],
        )
        self.arrows = hv.DynamicMap(
            self._draw_arrows,
            streams=[
                hv.streams.Params(state, ["model", "basis", "show_arrows", "results", "readout_revision"])
            ],
        )
        # the selected cell's next cells follow each click without a HoloViews update (see LiveLayer)
        self.targets_live = (LiveLayer(), LiveLayer())
        self.targets = hv.DynamicMap(self._draw_targets)
        state.param.watch(self._push_targets, ["cell", "model", "basis", "n_targets", "results"])
        # random walks from a cell (the inspector's button), the selected cell's path on a vector
        # field, a perturbation's paths and the field's fixed points: drawn once, then sent in
        # place when they change (a cell click with a field moves its path: redrawn through
        # HoloViews that cost about 0.09 s of server time a click on the pancreas)
        self.walks_live = (LiveLayer(), LiveLayer())
        self.walks = hv.DynamicMap(self._draw_walks)
        state.param.watch(
            self._push_walks, ["walks", "basis", "trajectory", "perturbation", "model", "results"]
        )
        # the arrows and the paths join the plot when they first have something to draw (then
        # stay): drawn empty on every page, they cost half the embedding's server time
        self._joined = self._layers_to_show({"arrows": False, "paths": False})
        self._panes: list[pn.pane.HoloViews] = []
        self.plot = self._overlay()
        state.param.watch(
            self._join_layers, ["show_arrows", "walks", "trajectory", "perturbation", "model", "results"]
        )

    def _layers_to_show(self, joined: dict[str, bool]) -> dict[str, bool]:
        state = self.state
        # a joined layer stays: no need to look at the state (or a field's fixed points) again
        paths = joined["paths"] or (
            state.walks is not None
            or state.trajectory is not None
            or state.perturbation is not None
            or state.fixed_points() is not None
        )
        return {"arrows": joined["arrows"] or state.show_arrows, "paths": paths}

    def _overlay(self) -> hv.Overlay:
        extra = [self.arrows] if self._joined["arrows"] else []
        extra += [self.walks] if self._joined["paths"] else []
        return self.scatter.overlay(self.streamlines, *extra, self.targets)

    def _join_layers(self, *_: Any) -> None:
        joined = self._layers_to_show(self._joined)
        if joined != self._joined:
            self._joined = joined
            self.plot = self._overlay()
            for pane in self._panes:
                pane.object = self.plot

    def _xy(self) -> tuple[np.ndarray, np.ndarray]:
        xy = self.state.embedding()
        return xy[:, 0], xy[:, 1]

    def _draw_streamlines(self, **_: Any) -> hv.Path:
        state = self.state
        return plots.streamlines(state.streamlines() if state.show_streamlines else [])

    def _draw_arrows(self, **_: Any) -> hv.VectorField:
        state = self.state
        grid = state.arrow_grid() if state.show_arrows else None
        if grid is None:
            return plots.arrows(np.empty(0), np.empty(0), np.empty(0), np.empty(0))
        return plots.arrows(*_grid_arrays(grid))

    def _paths(self) -> tuple[Any, ...]:
        """What the path layer shows: the arguments of :func:`path_layer_columns`."""
        state = self.state
        found, run = state.trajectory, state.perturbation
        basis = state.basis.removeprefix("X_") if state.basis else None
        shown = run is not None and run.fit == state.model and run.basis == basis
        return (
            state.walk_paths(),
            found.path if found is not None and found.fit == state.model else None,
            run.control_paths if shown else [],
            run.perturbed_paths if shown else [],
            state.fixed_points(),
        )

    def _draw_walks(self) -> hv.Overlay:
        hooks = (self.walks_live[0].hook, self.walks_live[1].hook)
        return path_layers(*path_layer_columns(*self._paths()), hooks=hooks)

    def _push_walks(self, *_: Any) -> None:
        if not self.walks_live[0].sources:
            return  # not drawn yet: its first drawing reads the state
        lines, dots = path_layer_columns(*self._paths())
        self.walks_live[0].push(lines)
        self.walks_live[1].push(dots)

    def _targets(self) -> tuple[Any, np.ndarray, np.ndarray]:
        state = self.state
        info = state.cell_info()
        if info is None or info.targets.empty:
            return None, np.empty((0, 2)), np.empty(0)
        xy = state.embedding()
        return (
            tuple(xy[info.index]),
            xy[info.targets["index"].to_numpy()],
            info.targets["probability"].to_numpy(),
        )

    def _draw_targets(self) -> hv.Overlay:
        return plots.transition_targets(
            *self._targets(), hooks=(self.targets_live[0].hook, self.targets_live[1].hook)
        )

    def _push_targets(self, *_: Any) -> None:
        segments, points = plots.transition_target_data(*self._targets())
        self.targets_live[0].push(segments)
        self.targets_live[1].push(points)

    def __panel__(self) -> pn.viewable.Viewable:
        state = self.state
        controls = pn.Row(
            pn.widgets.Select.from_param(state.param.color_by, label="Colour by", width=200),
            pn.widgets.Select.from_param(state.param.basis, label="Embedding", width=120),
            pn.widgets.Checkbox.from_param(
                state.param.show_streamlines, label="streamlines", margin=(28, 5, 5, 5)
            ),
            pn.widgets.Checkbox.from_param(state.param.show_arrows, label="arrows", margin=(28, 5, 5, 5)),
        )
        legend = pn.pane.HTML(
            pn.bind(
                self._legend,
                state.param.color_by,
                state.param.gene,
                state.param.model,
                state.param.results,
                state.param.basis,
                state.param.show_streamlines,
                state.param.readout_revision,
                state.param.fates,  # fates computed again (other terminal states), same colouring
            ),
            # wrapped under the plot: one line of many type names pushed the phase portrait aside
            width=_WIDTH,
            margin=(0, 10),
        )
        pane = pn.pane.HoloViews(self.plot, name="embedding")
        self._panes.append(pane)
        self.legend = legend
        return pn.Column(controls, pane, legend, name="Embedding")

    def _legend(self, *_: Any) -> str:
        note = self.state.streamlines_note()
        legend = plots.legend_html(self.state.coloring())
        return legend + (f'<div class="streamlines-note">{html_text(note)}</div>' if note else "")


def _grid_arrays(grid: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, vx, vy)`` of a grid field from :func:`explorer.graph.streamlines.velocity_on_grid`."""
    gx, gy = np.meshgrid(np.asarray(grid.x), np.asarray(grid.y))
    return gx.ravel(), gy.ravel(), np.asarray(grid.u).ravel(), np.asarray(grid.v).ravel()
