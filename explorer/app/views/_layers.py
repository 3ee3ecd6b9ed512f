"""The layers every cell scatter shares: cells, the selected group, the selected cell, and clicks.

:class:`CellScatter` turns two per-cell arrays from the state (embedding coordinates,
``Ms``/``Mu`` of the selected gene, latent time against a value) into linked
HoloViews layers. Each layer redraws only when what it shows changes: a cell click
never redraws the million-point base.

The small layers that follow a click (the selected cell, the selected group, the next
cells) are :class:`LiveLayer` s: HoloViews draws them once, and afterwards their Bokeh
data sources are given new data directly. A HoloViews update of a plot walks the whole
page's model graph (tens of milliseconds on this page); a direct data change costs
well under one.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import holoviews as hv
import numpy as np
import param
from bokeh.core.property.descriptors import UnsetValueError

from explorer._types import InputError
from explorer.app import plots
from explorer.app.readouts import GENE_COLORINGS, Coloring

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from explorer.app.state import ExplorerState

#: the y axis of a plot whose range follows the gene: tick labels along the axis, four ticks,
#: short labels (see CellScatter's ``y_labels_along_axis``)
_ALONG_AXIS = {"yrotation": 90, "yticks": 4, "yformatter": "%.4g"}


def _padded(values: np.ndarray, share: float = 0.05) -> tuple[float, float]:
    """Axis range over the finite ``values``, widened by ``share`` of the span on each side."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    pad = share * (hi - lo) if hi > lo else 0.5
    return lo - pad, hi + pad


class LiveLayer:
    """A layer drawn once by HoloViews whose Bokeh data sources are then updated in place.

    ``hook`` goes into the element's ``hooks`` option and keeps the data source of every
    plot the element is drawn in (one per browser view of it); :meth:`push` replaces
    their data. Before the first drawing there is nothing to update: the drawing itself
    reads the current state.
    """

    def __init__(self) -> None:
        self.sources: list[Any] = []
        self.plots: list[Any] = []
        # HoloViews keeps every element's options, hooks included, in a process-wide tree
        # that outlives the session: the hook it keeps holds this layer (and through its
        # plots the session's whole page) only weakly, so a closed session is freed
        layer = weakref.ref(self)

        def hook(plot: Any, element: Any) -> None:
            live = layer()
            if live is not None:
                live.remember(plot, element)

        self.hook = hook

    def remember(self, plot: Any, element: Any) -> None:
        """Remember the plot's data source (what ``hook`` does)."""
        source = plot.handles.get("source")
        if source is not None and all(source is not s for s in self.sources):
            self.sources.append(source)
            self.plots.append(plot)

    def push(self, data: dict[str, Any]) -> None:
        """Show ``data`` (column name -> values) in every drawing of the layer.

        A list stays a list (a multi-line's ``xs`` and ``ys``: one array per line).
        """
        for source in self.sources:
            source.data = {k: v if isinstance(v, list) else np.asarray(v) for k, v in data.items()}

    def push_columns(self, *columns: Any) -> None:
        """Show ``columns`` in the order of the drawn source's columns (a curve's x and y)."""
        for source in self.sources:
            source.data = {k: np.asarray(v) for k, v in zip(source.data, columns, strict=True)}

    @property
    def shown(self) -> dict[str, np.ndarray] | None:
        """The data the browser shows (of the last drawing), or None if not drawn yet."""
        return dict(self.sources[-1].data) if self.sources else None


class CellScatter(param.Parameterized):
    """Linked layers of one scatter of all cells.

    Parameters
    ----------
    state
        The session's state.
    xy
        Returns the ``(x, y)`` arrays to draw, or None when there is nothing to draw.
    xy_depends
        State parameters that change ``xy``.
    on_tap
        Called with the clicked ``(x, y)``; typically selects the nearest cell.
    on_select
        Called with ``bounds=`` or ``polygon=`` after a box or lasso selection, or None
        to offer no group selection.
    live_on
        State parameters whose changes redraw the cells by giving the drawn plot new
        data, axis ranges and colours directly instead of a HoloViews update (only when
        the cells are not rasterised and no other layer of the plot is redrawn by
        HoloViews at the same time, which would reset the axes from the old data).
    coloring
        Returns the colouring (default: the state's ``coloring()``).
    color_depends
        State parameters that change the colouring besides ``color_by`` (and ``gene``
        or ``model`` when the colouring needs them).
    redrawn_on
        State parameters on whose change the caller itself calls :meth:`refresh` (a view
        whose coordinates follow more than ``xy_depends``). A change of only these and
        ``xy_depends`` redraws the cells in their current colours: the colouring does not
        draw them again (coloured by the gene, a gene click drew each gene plot's image
        twice, ~11 ms an image at 10^6 cells).
    y_labels_along_axis
        Draw the y axis' tick labels along the axis (turned a quarter). Its width is then
        the labels' line height whatever their text, so a new y range (another gene) keeps
        the plot's layout: a y axis that gets wider or narrower makes BokehJS lay out the
        whole page again before it paints (``compute_layout`` climbs to the page's root; 13
        layouts a gene click instead of 2, 20-60 ms of chromium's main thread at 10^6 cells).
        Bokeh's maintainers suggest rotated labels for plots whose range changes
        (bokeh/bokeh#12129); their other suggestion, a wide enough ``min_border``, does not
        stop the re-layout in Bokeh 3.9 (the check compares the axis' own width). Along the
        axis a label takes its length of the axis' height, so these axes get four ticks and
        the shortest of ``%.4g`` (Bokeh's default wrote ``0.000e+0``, ``5.000e-4``, ... for
        a small velocity, and the labels ran into each other).
    """

    xy_revision = param.Integer(default=0)
    color_revision = param.Integer(default=0)

    def __init__(
        self,
        state: ExplorerState,
        *,
        xy: Callable[[], tuple[np.ndarray, np.ndarray] | None],
        xy_depends: Sequence[str],
        labels: tuple[str, str],
        on_tap: Callable[[float, float], Any],
        on_select: Callable[..., Any] | None = None,
        live_on: Sequence[str] = (),
        coloring: Callable[[], Coloring] | None = None,
        color_depends: Sequence[str] = (),
        width: int = 480,
        height: int = 420,
        title: Callable[[], str] | None = None,
        y_labels_along_axis: bool = False,
        redrawn_on: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.state = state
        self._xy_fn = xy
        self._xy: tuple[np.ndarray, np.ndarray] | None = None
        self._xy_at = -1
        self._coloring = coloring or state.coloring
        self._labels = labels
        self._width, self._height = width, height
        self._title = title or (lambda: "")
        self._axis_opts = _ALONG_AXIS if y_labels_along_axis else {}
        self._own_coloring = coloring is not None
        self._on_tap = on_tap
        self._on_select = on_select
        self._drawn_xy = -1
        self._xy_token = 0
        self._live_on = set(live_on)
        self._redrawn_on = {*xy_depends, *redrawn_on}
        self.base_live = LiveLayer()
        n = state.adata.n_obs
        self.datashade = n > plots.DATASHADE_THRESHOLD
        state.param.watch(self._xy_changed, list(xy_depends))
        state.param.watch(
            self._color_changed, ["color_by", "gene", "model", "results", "fates", *color_depends]
        )

        base_streams: list[hv.streams.Stream] = [hv.streams.Params(self, ["xy_revision", "color_revision"])]
        if self.datashade:
            self._range = hv.streams.RangeXY()
            base_streams.append(self._range)
        self.base = hv.DynamicMap(self._draw_base, streams=base_streams)
        self.selection_live, self.marker_live = LiveLayer(), LiveLayer()
        self.selection = hv.DynamicMap(self._draw_selection)
        self.marker = hv.DynamicMap(self._draw_marker)
        state.param.watch(self._push_selection, ["selected"])
        state.param.watch(self._push_marker, ["cell"])
        self._tap = hv.streams.Tap(source=self.base, transient=True)
        self._tap.add_subscriber(self._tapped)
        if on_select is not None:
            self._box = hv.streams.BoundsXY(source=self.base, transient=True)
            self._box.add_subscriber(self._boxed)
            self._lasso = hv.streams.Lasso(source=self.base, transient=True)
            self._lasso.add_subscriber(self._lassoed)
            self._clear = hv.streams.DoubleTap(source=self.base, transient=True)
            self._clear.add_subscriber(lambda **_: state.select_cells([]))

    # -------------------------------------------------------------- watchers
    def _xy_changed(self, *events: param.parameterized.Event) -> None:
        self.refresh(live={e.name for e in events} <= self._live_on)

    def refresh(self, *, live: bool, extent: tuple[np.ndarray, np.ndarray] | None = None) -> bool:
        """The coordinates changed: redraw the cells, directly if ``live`` and possible.

        Returns whether the drawn plot got its new data directly (else HoloViews redraws
        the cells). ``extent``: more ``(x, y)`` values the axes must show (another layer's,
        pushed directly at the same time). A caller that redraws another layer of the same
        plot through HoloViews must pass ``live=False``: that redraw sets the axes from
        every layer's last HoloViews data, which a direct push does not update.
        """
        self._xy_token += 1
        pushed = live and self._push_base(extent)
        if not pushed:
            self.param.update(xy_revision=self.xy_revision + 1, color_revision=self.color_revision + 1)
        # the selection and the selected cell move with the points
        if len(self.state.selected):
            self._push_selection()
        if self.state.cell is not None:
            self._push_marker()
        return pushed

    def _selection_data(self) -> dict[str, np.ndarray]:
        xy = self.xy()
        idx = self.state.selected
        if xy is None or len(idx) == 0:
            return {"x": np.empty(0), "y": np.empty(0)}
        if len(idx) > plots.HIGHLIGHT_THRESHOLD:
            # too many rings to send to the browser: show an even sample of them
            idx = np.random.default_rng(0).choice(idx, plots.HIGHLIGHT_THRESHOLD, replace=False)
        return {"x": xy[0][idx], "y": xy[1][idx]}

    def _marker_data(self) -> dict[str, np.ndarray]:
        xy = self.xy()
        i = self.state.cell
        if xy is None or i is None or not np.isfinite([xy[0][i], xy[1][i]]).all():
            return {"x": np.empty(0), "y": np.empty(0)}
        return {"x": np.array([xy[0][i]]), "y": np.array([xy[1][i]])}

    def _push_base(self, extent: tuple[np.ndarray, np.ndarray] | None = None) -> bool:
        """Give the drawn cells new coordinates and colours directly; False if that cannot be done.

        The axes span the cells and ``extent`` (more ``(x, y)`` values to show).
        """
        if not self.base_live.sources:
            return False
        xy = self.xy()
        if xy is None:
            return False
        x, y = xy
        coloring = self._coloring()
        images: dict[tuple[int, int], tuple[np.ndarray, tuple[float, float, float, float]]] = {}
        if self.datashade:
            # a fresh image of all cells (new coordinates forget the zoom, as a redraw does),
            # at each drawing's frame size (one drawing, one size, in a page)
            for plot in self.base_live.plots:
                size = self._image_size(plot)
                if size not in images:
                    images[size] = plots.shade(x, y, coloring, width=size[0], height=size[1])
            self._drawn_xy = self._xy_token
            x0, y0, x1, y1 = next(iter(images.values()))[1]  # the cells' bounds: the same at any size
            ranges = {"x_range": (x0, x1), "y_range": (y0, y1)}
            if extent is not None:
                ranges = {
                    "x_range": _padded(np.concatenate([[x0, x1], extent[0]]), 0.0),
                    "y_range": _padded(np.concatenate([[y0, y1], extent[1]]), 0.0),
                }
        else:
            values, palette, clim = plots.color_mapping(coloring)
            ex, ey = extent if extent is not None else (np.empty(0), np.empty(0))
            ranges = {"x_range": _padded(np.concatenate([x, ex])), "y_range": _padded(np.concatenate([y, ey]))}
            # x, y, then the colour value as 'value' or as HoloViews' mapped 'color'
            # column, and 'cell' when it is kept: the columns plots.points draws
            extra = {"cell": np.arange(len(x)), "value": values, "color": values}
        for source, plot in zip(self.base_live.sources, self.base_live.plots, strict=True):
            keys = list(source.data)
            if self.datashade:
                image, (x0, y0, x1, y1) = images[self._image_size(plot)]
                data = {"image": [image], "x": [x0], "y": [y0], "dw": [x1 - x0], "dh": [y1 - y0]}
                if set(keys) != set(data):
                    return False
            else:
                if len(keys) < 2 or not set(keys[2:]) <= set(extra):  # noqa: PLR2004
                    return False
                data = {keys[0]: x, keys[1]: y, **{k: extra[k] for k in keys[2:]}}
                mapper = plot.handles.get("color_color_mapper")
                if mapper is not None:
                    mapper.update(palette=palette, low=clim[0], high=clim[1])
            source.data = data
            plots.sync_colorbar(plot.state, coloring)
            for axis, (lo, hi) in ranges.items():
                plot.handles[axis].update(start=lo, end=hi)
            title = plot.handles["plot"].title
            if title is not None:
                title.text = self._title()
        return True

    def _push_selection(self, *_: Any) -> None:
        self.selection_live.push(self._selection_data())

    def _push_marker(self, *_: Any) -> None:
        self.marker_live.push(self._marker_data())

    def _color_changed(self, *events: param.parameterized.Event) -> None:
        names = {e.name for e in events}
        if names <= self._redrawn_on:
            return  # the cells are redrawn for the same change, in the new colours (refresh)
        color_by = self.state.color_by
        categorical = color_by in self.state.adata.obs.columns
        gene_only = names == {"gene"} and color_by in GENE_COLORINGS and not self._own_coloring
        if gene_only and self._xy_at == self._xy_token and self._push_colors():
            return  # the same cells in new colours, sent directly
        if (
            "color_by" in names
            or self._own_coloring
            or ("gene" in names and color_by in GENE_COLORINGS)
            or ({"model", "results", "fates"} & names and not categorical)
        ):
            self.color_revision += 1

    def _push_colors(self) -> bool:
        """Recolour the drawn cells in place (same coordinates and zoom); False if that cannot be done."""
        if not self.base_live.sources or self.xy() is None:
            return False
        x, y = self.xy()
        coloring = self._coloring()
        for source, plot in zip(self.base_live.sources, self.base_live.plots, strict=True):
            if self.datashade:
                xr, yr = plot.handles["x_range"], plot.handles["y_range"]
                if xr.start is None or yr.start is None or "image" not in source.data:
                    return False
                bounds = (float(xr.start), float(xr.end)), (float(yr.start), float(yr.end))
                width, height = self._image_size(plot)
                image, (x0, y0, x1, y1) = plots.shade(
                    x, y, coloring, x_range=bounds[0], y_range=bounds[1], width=width, height=height
                )
                source.data.update(image=[image], x=[x0], y=[y0], dw=[x1 - x0], dh=[y1 - y0])
            else:
                column = "color" if "color" in source.data else "value" if "value" in source.data else None
                mapper = plot.handles.get("color_color_mapper")
                if column is None or mapper is None:
                    return False
                values, palette, clim = plots.color_mapping(coloring)
                source.data.update({column: values})
                mapper.update(palette=palette, low=clim[0], high=clim[1])
            plots.sync_colorbar(plot.state, coloring)
            title = plot.handles["plot"].title
            if title is not None:
                title.text = self._title()
        return True

    def _image_size(self, plot: Any) -> tuple[int, int]:
        """Pixels of an image of the cells sent to ``plot``: its frame as the browser laid it out, else its size.

        The frame is the plot less its axes, title and colour bar; BokehJS reports its size
        (``inner_width``, ``inner_height``) once the plot is laid out. An image drawn at the
        plot's outer size was squeezed into the frame when painted (a time plot's 380 x 260
        into 305 x 188: a quarter of its rows never reached the screen) and a gene click
        sent 2.0 MB of images at 10^6 cells instead of 1.25 MB. Only images given to a
        drawn plot directly use it (a click's): a HoloViews redraw (the first drawing, a new
        colouring, a zoom) may add or remove a colour bar, which changes the frame after
        the image is drawn, so it keeps the plot's size (squeezed rather than stretched).
        """
        try:
            width, height = plot.state.inner_width, plot.state.inner_height
        except UnsetValueError:  # not laid out by a browser (yet)
            return self._width, self._height
        laid_out = isinstance(width, int) and isinstance(height, int)
        if laid_out and 0 < width <= self._width and 0 < height <= self._height:
            return width, height
        return self._width, self._height

    def xy(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Return the drawn coordinates (computed once per change of what they depend on)."""
        if self._xy_at != self._xy_token:
            self._xy = self._xy_fn()
            self._xy_at = self._xy_token
        return self._xy

    # -------------------------------------------------------------- drawing
    def _draw_base(
        self, xy_revision: int = 0, color_revision: int = 0, x_range: Any = None, y_range: Any = None
    ) -> hv.Element:
        xy = self.xy()
        if xy is None:
            x = y = np.full(0, np.nan, dtype=np.float32)
            coloring = Coloring(kind="none", values=x, label="")
        else:
            x, y = xy
            coloring = self._coloring()
        title = self._title()
        tools = plots.SELECT_TOOLS if self._on_select is not None else plots.PICK_TOOLS
        if not self.datashade:
            return plots.points(
                x,
                y,
                coloring,
                labels=self._labels,
                title=title,
                width=self._width,
                height=self._height,
                tools=tools,
                hooks=[self.base_live.hook],
            ).opts(**self._axis_opts, backend="bokeh")
        if self._drawn_xy != self._xy_token:
            # new coordinates (another gene, basis or dataset): show all cells, forget the zoom
            x_range = y_range = None
            self._drawn_xy = self._xy_token
        return plots.rasterize(
            x,
            y,
            coloring,
            x_range=x_range,
            y_range=y_range,
            width=self._width,
            height=self._height,
            labels=self._labels,
            title=title,
            tools=tools,
            hooks=[self.base_live.hook],
        ).opts(framewise=True, **self._axis_opts, backend="bokeh")

    def _draw_selection(self) -> hv.Element:
        data = self._selection_data()
        return plots.highlight(data["x"], data["y"]).opts(hooks=[self.selection_live.hook], backend="bokeh")

    def _draw_marker(self) -> hv.Points:
        data = self._marker_data()
        x, y = (float(data["x"][0]), float(data["y"][0])) if len(data["x"]) else (None, None)
        return plots.cell_marker(x, y).opts(hooks=[self.marker_live.hook], backend="bokeh")

    def overlay(self, *extra: Any) -> hv.Overlay:
        """Overlay the base, ``extra`` layers, selection and marker, in drawing order."""
        layers = [self.base, *extra, self.selection, self.marker]
        out = layers[0]
        for layer in layers[1:]:
            out = out * layer
        return out

    # ---------------------------------------------------------------- clicks
    def _tapped(self, x: float | None = None, y: float | None = None) -> None:
        if x is None or y is None or self.xy() is None:
            return
        try:
            self._on_tap(float(x), float(y))
        except InputError as err:
            self.state.error = str(err)

    def _boxed(self, bounds: tuple[float, float, float, float] | None = None) -> None:
        if bounds is not None and self._on_select is not None:
            self._on_select(bounds=bounds)

    def _lassoed(self, geometry: Any = None) -> None:
        if geometry is not None and len(geometry) >= 3 and self._on_select is not None:  # noqa: PLR2004
            self._on_select(polygon=np.asarray(geometry))
