"""Arrays in, HoloViews elements out: every drawing the app makes.

Functions here take plain arrays and the records of :mod:`explorer.app.readouts`, never
the state object, so tests call them without a server. Many cells (more than
:data:`DATASHADE_THRESHOLD`) are drawn as a datashader image of the visible range
(:func:`rasterize`), with one fixed colour per category so colours stay put when the
selection or zoom changes. Every continuous colouring gets a colour bar
(:func:`sync_colorbar`), images included.
"""

from __future__ import annotations

import functools
import io
from typing import TYPE_CHECKING, Any, Literal

import datashader as ds
import datashader.transfer_functions as tf
import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401 - registers the bokeh backend the options below are for
import matplotlib as mpl
import numpy as np
import pandas as pd
from bokeh.models import ColorBar, LinearColorMapper
from matplotlib import colormaps
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure

from explorer.app.escape import html_text
from explorer.app.readouts import Coloring

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from explorer.app.readouts import PhaseFit

#: above this many cells, scatter plots are rasterised with datashader
DATASHADE_THRESHOLD = 50_000

#: above this many highlighted cells, the highlight is rasterised too
HIGHLIGHT_THRESHOLD = 20_000

#: colours that mean the same in every view
SELECTION_COLOR = "#222222"
CELL_COLOR = "#ff2d95"
TARGET_COLOR = "#ff8c00"
MISSING_COLOR = "#d0d0d0"
STREAM_COLOR = "#333333"
#: line styles that tell fits apart in the phase portrait (the active fit is solid)
FIT_CURVE_COLOR = "#c0392b"
FIT_COLORS = ("#1f3a93", "#c0392b", "#16a085", "#8e44ad", "#d35400", "#2c3e50")
CONTINUOUS_CMAP = "viridis"
DIVERGING_CMAP = "coolwarm"

#: tools of plots where cells can be picked one at a time, or also selected as a group;
#: few tools keep the page's Bokeh model small, which every update walks
PICK_TOOLS = ("tap",)
SELECT_TOOLS = ("tap", "box_select", "lasso_select")
_DEFAULT_TOOLS = ["pan", "wheel_zoom", "reset"]


def _size(n: int) -> float:
    """Marker size that keeps a few thousand cells readable and 50k cells from merging."""
    return float(np.clip(12 - 2 * np.log10(max(n, 1)), 2, 8))


def cmap_for(coloring: Coloring) -> str:
    """Pick the colour map of a continuous colouring: diverging where it says so, else sequential."""
    return DIVERGING_CMAP if coloring.diverging else CONTINUOUS_CMAP


def value_range(coloring: Coloring) -> tuple[float, float]:
    """Return the range the colour map spans (the finite values'): symmetric around 0 for a diverging map.

    A gene click coloured by the gene asks for it once or twice per plot (the image's span,
    the colour bar) over 10^6 values: the values' own minimum and maximum are read first
    (no float64 copy, no copy of the finite values), and only values with NaN or inf in
    them are filtered (:func:`_finite_min_max`).
    """
    values = np.asarray(coloring.values)
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    span = _finite_min_max(values)
    if span is None:
        return 0.0, 1.0
    low, high = span
    if cmap_for(coloring) == DIVERGING_CMAP:
        lim = max(abs(low), abs(high)) or 1.0
        return -lim, lim
    return low, high


def legend_html(coloring: Coloring) -> str:
    """Describe a colouring as HTML: one swatch per category, or the colour bar's ends.

    Category names and the label (an obs column's name) come from the dataset and are
    escaped (:func:`~explorer.app.escape.html_text`): they show as text, never as markup.
    """
    label = html_text(coloring.label)
    if coloring.kind == "category":
        key = coloring.color_key or {}
        items = "".join(
            '<span style="white-space:nowrap;margin-right:10px">'
            '<span style="display:inline-block;width:10px;'
            f'height:10px;background:{html_text(key.get(c, MISSING_COLOR))};margin-right:4px"></span>'
            f"{html_text(c)}</span> "
            for c in coloring.categories
        )
        return f"<div style='font-size:12px'><b>{label}</b>: {items}</div>"
    if coloring.kind == "continuous":
        lo, hi = value_range(coloring)
        stops = ",".join(_cmap_colors(cmap_for(coloring))[::32])
        note = f" <span style='color:#555'>— {html_text(coloring.note)}</span>" if coloring.note else ""
        return (
            f"<div style='font-size:12px'><b>{label}</b> {lo:.3g} "
            "<span style='display:inline-block;width:160px;height:10px;"
            f"background:linear-gradient(to right,{stops})'>"
            f"</span> {hi:.3g}{note}</div>"
        )
    return f"<div style='font-size:12px;color:#777'>{label}</div>"


def color_mapping(coloring: Coloring) -> tuple[np.ndarray, list[str], tuple[float, float]]:
    """``(values, palette, (low, high))`` for a linear colour mapper that draws ``coloring``.

    Categories become their codes on a palette of the categories' fixed colours, spanning
    ``(-0.5, k - 0.5)`` so code ``i`` lands on colour ``i``; continuous values use the
    colour map over :func:`value_range`. One mapper type for both keeps a plot switching
    between them without rebuilding its glyphs, and numbers are far cheaper to send and
    validate than a colour string per cell.
    """
    if coloring.kind == "category":
        key = coloring.color_key or {}
        palette = [key.get(c, MISSING_COLOR) for c in coloring.categories] or [MISSING_COLOR]
        codes = np.asarray(coloring.values)
        values = np.where(codes >= 0, codes, np.nan).astype(np.float32)
        return values, palette, (-0.5, len(palette) - 0.5)
    if coloring.kind == "continuous":
        return (
            np.asarray(coloring.values, dtype=np.float32),
            list(_cmap_colors(cmap_for(coloring))),
            value_range(coloring),
        )
    return np.zeros(len(coloring.values), dtype=np.float32), [MISSING_COLOR, MISSING_COLOR], (0.0, 1.0)


#: name of the colour bar :func:`sync_colorbar` adds to a figure (found again by it)
COLORBAR_NAME = "explorer-colorbar"


def sync_colorbar(figure: Any, coloring: Coloring | None) -> ColorBar | None:
    """Show ``coloring``'s colour bar at the right of a Bokeh ``figure``; hide it for other colourings.

    The bar has its own colour mapper (the cells may be an image without one), spanning
    :func:`value_range` on :func:`cmap_for`'s map. It is added on first need and then only
    updated, so a plot that switches between a category and a continuous colouring keeps
    its layout. Returns the bar, or None when the figure never needed one.
    """
    bar = next((r for r in figure.right if getattr(r, "name", None) == COLORBAR_NAME), None)
    continuous = coloring is not None and coloring.kind == "continuous"
    if bar is None and not continuous:
        return None
    if continuous:
        low, high = value_range(coloring)
        palette = list(_cmap_colors(cmap_for(coloring)))
        if bar is None:
            mapper = LinearColorMapper(palette=palette, low=low, high=high)
            bar = ColorBar(
                name=COLORBAR_NAME, color_mapper=mapper, width=10, padding=4, major_label_text_font_size="9px"
            )
            figure.add_layout(bar, "right")
        else:
            # only what changed: Bokeh validates every colour of a palette it is given (256
            # here, about 4 ms a colour bar), and a new gene keeps the palette
            mapper = bar.color_mapper
            wanted = {"palette": palette, "low": low, "high": high}
            changed = {k: v for k, v in wanted.items() if getattr(mapper, k) != v}
            if changed:
                mapper.update(**changed)
    bar.visible = continuous
    return bar


def colorbar_hook(coloring: Coloring) -> Callable[[Any, Any], None]:
    """Make a HoloViews hook that keeps the drawn figure's colour bar in step with ``coloring``.

    It holds only the colouring's kind, colour map and range, never its values: HoloViews
    keeps hooks in a process-wide options tree.
    """
    summary = Coloring(
        kind=coloring.kind,
        values=np.asarray(value_range(coloring) if coloring.kind == "continuous" else [0.0, 1.0]),
        label=coloring.label,
        diverging=coloring.diverging,
    )

    def hook(plot: Any, _element: Any) -> None:
        sync_colorbar(plot.state, summary)

    return hook


def points(
    x: np.ndarray,
    y: np.ndarray,
    coloring: Coloring,
    *,
    labels: tuple[str, str] = ("x", "y"),
    title: str = "",
    width: int = 480,
    height: int = 420,
    tools: tuple[str, ...] = PICK_TOOLS,
    hooks: Sequence[Callable[[Any, Any], None]] = (),
) -> hv.Points:
    """Draw cells coloured by :func:`color_mapping`; each point carries its row as ``cell``.

    A continuous colouring gets a colour bar (:func:`colorbar_hook`); ``hooks`` run too.
    """
    n = len(x)
    values, palette, clim = color_mapping(coloring)
    data = {labels[0]: x, labels[1]: y, "cell": np.arange(n), "value": values}
    element = hv.Points(data, kdims=list(labels), vdims=["cell", "value"])
    return element.opts(
        color="value",
        cmap=palette,
        clim=clim,
        size=_size(n),
        tools=list(tools),
        default_tools=_DEFAULT_TOOLS,
        nonselection_alpha=1.0,
        selection_alpha=1.0,
        width=width,
        height=height,
        framewise=True,
        title=hv_title(title),
        line_alpha=0,
        hooks=[*hooks, colorbar_hook(coloring)],
        backend="bokeh",
    )


def _finite_min_max(values: np.ndarray) -> tuple[float, float] | None:
    """Return the finite values' minimum and maximum, or None without any finite value."""
    # finite min and max mean no NaN or inf anywhere: no copy of the finite values needed
    low, high = (float(values.min()), float(values.max())) if values.size else (np.nan, np.nan)
    if not np.isfinite([low, high]).all():
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return None
        low, high = float(finite.min()), float(finite.max())
    return low, high


def _shade_range(values: np.ndarray, lo: float | None, hi: float | None) -> tuple[float, float]:
    span = _finite_min_max(values)
    if span is None:
        return 0.0, 1.0
    low, high = span
    lo = low if lo is None else lo
    hi = high if hi is None else hi
    pad = (hi - lo) * 0.02 or 0.5
    return lo - pad, hi + pad


def shade_filled(agg: Any, **options: Any) -> Any:
    """``datashader.transfer_functions.shade(agg, **options)``, computed on the pixels that hold cells.

    Shading works pixel by pixel, except for what it takes over all pixels with data
    (the colour baseline, the alpha's histogram and span), and every empty pixel (no
    count, or NaN) gets the same colour. So the filled pixels and one empty pixel are
    shaded as a one-row image and the others copied from that empty pixel: the same
    image, bit for bit (``tests/app/test_views.py`` compares them), at the cost of the
    filled pixels. A phase portrait of 10^6 cells fills a few thousand of its 200,000
    pixels; shading them all was most of each image's time.
    """
    data = agg.data
    empty = None  # other kinds of aggregate: shaded whole
    if data.dtype.kind == "f" and data.ndim == 2:  # noqa: PLR2004 - a mean: NaN where no cell
        empty = np.isnan(data)
    elif data.dtype.kind == "u" and data.ndim == 3:  # noqa: PLR2004 - counts per category (last)
        # one column at a time: numpy reduces a short last axis ten times slower; two
        # categories' counts at once where they pair up into 64-bit words (a third of the time)
        pairs = data.itemsize == 4 and data.flags.c_contiguous and data.shape[2] % 2 == 0  # noqa: PLR2004
        words = data.view(np.uint64) if pairs else data
        empty = words[..., 0] == 0
        for k in range(1, words.shape[2]):
            empty &= words[..., k] == 0
    elif data.dtype.kind == "u":  # counts (datashader leaves zero counts transparent)
        empty = data == 0
    filled = None if empty is None else np.flatnonzero(~empty)
    if filled is None or filled.size in (0, empty.size):
        return tf.shade(agg, **options)
    picked = np.append(filled, np.argmax(empty))  # the first empty pixel
    rows = data.reshape(empty.size, *data.shape[2:])[picked][None]
    dims = agg.dims
    coords = {dims[0]: [0.0], dims[1]: np.arange(picked.size, dtype=np.float64)}
    if data.ndim == 3:
        coords[dims[2]] = agg.coords[dims[2]].values
    shaded = tf.shade(type(agg)(rows, coords=coords, dims=dims), **options).data[0]  # an xarray DataArray
    values = np.full(empty.size, shaded[-1], dtype=shaded.dtype)
    values[filled] = shaded[:-1]
    return tf.Image(values.reshape(empty.shape), coords={d: agg.coords[d] for d in dims[:2]}, dims=dims[:2])


def _frame(columns: dict[str, Any]) -> pd.DataFrame:
    """The cells' columns as the DataFrame datashader bins, without copying them.

    pandas' default stacks columns of one dtype (``x`` and ``y``) into one new block: at
    10^6 cells a copy of 8 MB for every image, about a tenth of its time.
    """
    return pd.DataFrame(columns, copy=False)


def shade(
    x: np.ndarray,
    y: np.ndarray,
    coloring: Coloring | None,
    *,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    width: int = 480,
    height: int = 420,
    color: str | None = None,
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Cells as a datashader image: ``(rgba, (x0, y0, x1, y1))``, rows bottom first.

    ``rgba`` is ``(height, width)`` uint32 (one RGBA pixel each, Bokeh's ``image_rgba``
    layout) over ``x_range`` x ``y_range`` (default: all cells). Categories use their
    fixed ``color_key`` (``count_cat``), continuous values the mean per pixel on a colour
    map, and ``color`` (with ``coloring=None``) one flat colour on a transparent background.
    """
    x_range = _shade_range(x, None, None) if x_range is None else tuple(map(float, x_range))
    y_range = _shade_range(y, None, None) if y_range is None else tuple(map(float, y_range))
    frame = {"x": np.asarray(x, dtype=np.float32), "y": np.asarray(y, dtype=np.float32)}
    canvas = ds.Canvas(
        plot_width=max(int(width), 10), plot_height=max(int(height), 10), x_range=x_range, y_range=y_range
    )
    if coloring is not None and coloring.kind == "category":
        cats = list(coloring.categories) or ["NA"]
        codes = np.asarray(coloring.values)
        if codes.size and codes.min() < 0:  # cells without a category are counted in the first
            codes = np.where(codes >= 0, codes, 0)
        frame["c"] = pd.Categorical.from_codes(codes, categories=cats)
        agg = canvas.points(_frame(frame), "x", "y", agg=ds.count_cat("c"))
        key = coloring.color_key or {}
        img = shade_filled(agg, color_key=[key.get(c, MISSING_COLOR) for c in cats], min_alpha=200)
    elif coloring is not None and coloring.kind == "continuous":
        frame["v"] = np.asarray(coloring.values, dtype=np.float32)
        agg = canvas.points(_frame(frame), "x", "y", agg=ds.mean("v"))
        img = shade_filled(
            agg, cmap=list(_cmap_colors(cmap_for(coloring))), how="linear", span=value_range(coloring)
        )
    else:
        agg = canvas.points(_frame(frame), "x", "y", agg=ds.count())
        img = shade_filled(agg, cmap=[color or MISSING_COLOR, color or MISSING_COLOR], min_alpha=255)
    img = tf.dynspread(img, threshold=0.5, max_px=2)
    return np.ascontiguousarray(img.to_numpy(), dtype=np.uint32), (
        x_range[0],
        y_range[0],
        x_range[1],
        y_range[1],
    )


@functools.cache
def warm_up() -> None:
    """Compile datashader's kernels now (once per process) rather than on a page's first image.

    datashader's aggregation, shading and spreading kernels are compiled by numba on first
    use, not cached on disk: 20-30 s of CPU on this 2-core machine. ``explorer serve``
    calls this at start-up for a dataset drawn as images (more than
    :data:`DATASHADE_THRESHOLD` cells), so that no page waits for it.
    """
    x = np.linspace(0.0, 1.0, 64, dtype=np.float32)
    codes = np.arange(64) % 3
    for coloring in (
        Coloring(kind="category", values=codes, label="", categories=("a", "b", "c"),
                 color_key={"a": "#000000", "b": "#ff0000", "c": "#00ff00"}),
        Coloring(kind="continuous", values=x, label=""),
        Coloring(kind="continuous", values=x - 0.5, label="", diverging=True),
        None,
    ):  # fmt: skip
        shade(x, x[::-1], coloring, width=16, height=16)
    # a sparse image: dynspread then compiles its spreading kernel (a dense one returns early)
    canvas = ds.Canvas(plot_width=64, plot_height=64, x_range=(0.0, 1.0), y_range=(0.0, 1.0))
    sparse_img = tf.shade(canvas.points(pd.DataFrame({"x": x[:4], "y": x[:4]}), "x", "y", agg=ds.count()))
    tf.dynspread(sparse_img, threshold=1.0, max_px=2)


def rasterize(
    x: np.ndarray,
    y: np.ndarray,
    coloring: Coloring | None,
    *,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    width: int = 480,
    height: int = 420,
    color: str | None = None,
    labels: tuple[str, str] = ("x", "y"),
    title: str = "",
    tools: tuple[str, ...] = PICK_TOOLS,
    hooks: Sequence[Callable[[Any, Any], None]] = (),
) -> hv.RGB:
    """Cells drawn as a datashader image (see :func:`shade`) in a HoloViews ``RGB``.

    A continuous colouring gets a colour bar (:func:`colorbar_hook`); ``hooks`` run too.
    """
    packed, bounds = shade(
        x, y, coloring, x_range=x_range, y_range=y_range, width=width, height=height, color=color
    )
    # HoloViews wants the top row first and one channel per plane
    rgba = packed.view(np.uint8).reshape((*packed.shape, 4))[::-1]
    element = hv.RGB(rgba, bounds=bounds, kdims=list(labels), vdims=["R", "G", "B", "A"])
    return element.opts(
        width=width,
        height=height,
        tools=list(tools),
        default_tools=_DEFAULT_TOOLS,
        title=hv_title(title),
        hooks=[*hooks, *([colorbar_hook(coloring)] if coloring is not None else [])],
        backend="bokeh",
    )


@functools.cache
def _cmap_colors(name: str) -> tuple[str, ...]:
    cmap = colormaps[name]
    return tuple(str(to_hex(cmap(i / 255))) for i in range(256))


def highlight(x: np.ndarray, y: np.ndarray, *, color: str = SELECTION_COLOR, size: float = 4.0) -> hv.Points:
    """Cells drawn over a scatter in one colour (a selection), hollow so the colour below shows."""
    return hv.Points((np.asarray(x), np.asarray(y))).opts(
        color=color, size=size, fill_alpha=0.0, line_width=1.2, backend="bokeh"
    )


def cell_marker(x: float | None, y: float | None) -> hv.Points:
    """Draw the selected cell as a large ring (an empty element when no cell is selected)."""
    data = ([], []) if x is None or y is None or not np.isfinite([x, y]).all() else ([x], [y])
    return hv.Points(data).opts(
        color=CELL_COLOR, size=16, fill_alpha=0.0, line_width=3, marker="circle", backend="bokeh"
    )


def transition_target_data(
    origin: tuple[float, float] | None, targets: np.ndarray, probability: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Columns of :func:`transition_targets`: segments ``x0, y0, x1, y1, line_width``, points ``x, y, size``.

    The names of the drawn data sources' columns, so that a view can send new targets to
    a drawing (the segments' width went as ``w`` until 2026-12-04, which the drawing did
    not read: every segment was drawn 1 pixel wide, BokehJS warning of a missing field).
    """
    targets = np.asarray(targets, dtype=float).reshape(-1, 2)
    p = np.asarray(probability, dtype=float).ravel()
    if origin is None or len(targets) == 0:
        targets, p = np.empty((0, 2)), np.empty(0)
        origin = (0.0, 0.0)
    scale = p / (p.max() if len(p) and p.max() > 0 else 1.0)
    n = len(targets)
    segments = {
        "x0": np.full(n, origin[0]),
        "y0": np.full(n, origin[1]),
        "x1": targets[:, 0],
        "y1": targets[:, 1],
        "line_width": 1 + 4 * scale,
    }
    points = {"x": targets[:, 0], "y": targets[:, 1], "size": 4 + 10 * scale}
    return segments, points


def transition_targets(
    origin: tuple[float, float] | None,
    targets: np.ndarray,
    probability: np.ndarray,
    *,
    hooks: tuple[Any, Any] = (None, None),
) -> hv.Overlay:
    """Segments from the selected cell to its likely next cells, sized by transition probability.

    ``hooks`` are HoloViews hooks for the segments and the points (see ``LiveLayer``).
    """
    seg_data, pt_data = transition_target_data(origin, targets, probability)
    segs = hv.Segments(seg_data, kdims=["x0", "y0", "x1", "y1"], vdims=["line_width"]).opts(
        color=TARGET_COLOR,
        line_width="line_width",
        alpha=0.8,
        hooks=[h for h in hooks[:1] if h],
        backend="bokeh",
    )
    pts = hv.Points(pt_data, vdims=["size"]).opts(
        color=TARGET_COLOR,
        size="size",
        line_color="white",
        hooks=[h for h in hooks[1:] if h],
        backend="bokeh",
    )
    return segs * pts


WALK_COLOR = "#7b2cbf"


def streamlines(lines: list[np.ndarray]) -> hv.Path:
    """Velocity streamlines: polylines of shape ``(n_points, 2)``, drawn as one path broken by NaN rows.

    One path, not one per streamline: HoloViews prepares each path of an element on its
    own (about 2.4 ms of CPU a path), so the pancreas embedding (36 streamlines) cost the
    server 0.23 CPU-s to draw with a path per streamline and 0.15 with one path (the
    sample's 7 streamlines: 0.17 and 0.15), for every page and every basis or fit change.
    The browser draws the same lines: Bokeh lifts the pen at a NaN point and strokes each
    line of a ``multi_line`` once, so only where two streamlines overlap is the colour
    laid down once instead of twice (screenshots differ by anti-aliasing only).
    """
    kept = [np.asarray(line)[:, :2] for line in lines if len(line) > 1]
    if not kept:
        return hv.Path([]).opts(color=STREAM_COLOR, line_width=1.5, alpha=0.85, backend="bokeh")
    gap = np.full((1, 2), np.nan, dtype=np.result_type(*kept, np.float32))
    joined = np.concatenate([part for line in kept for part in (line, gap)][:-1])
    return hv.Path([joined]).opts(color=STREAM_COLOR, line_width=1.5, alpha=0.85, backend="bokeh")


def arrows(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> hv.VectorField:
    """Velocity arrows at grid points ``(x, y)`` with components ``(vx, vy)``."""
    vx, vy = np.asarray(vx, dtype=float), np.asarray(vy, dtype=float)
    mag = np.hypot(vx, vy)
    ok = np.isfinite(mag) & (mag > 0)
    angle = np.arctan2(vy[ok], vx[ok])
    return hv.VectorField(
        (np.asarray(x)[ok], np.asarray(y)[ok], angle, mag[ok] / (mag[ok].max() if ok.any() else 1.0))
    ).opts(magnitude="Magnitude", color=STREAM_COLOR, backend="bokeh")


#: the longest per-cell arrows (90th percentile) span this share of the portrait's axes
ARROW_SHARE = 0.06
#: arrow heads: share of the arrow's length, and half-angle (radians)
_HEAD_SHARE, _HEAD_ANGLE = 0.35, 0.45


def arrow_segments(arrows: np.ndarray, *, share: float = ARROW_SHARE) -> dict[str, np.ndarray]:
    """Columns ``x0, y0, x1, y1`` of arrows (shafts, then two head strokes each) for ``(s, u, ds, du)`` rows.

    Each axis is measured in units of the cells' span on it (Ms and Mu have different
    scales), and the arrows are scaled together so the 90th percentile of their lengths
    is ``share`` of the span: directions and relative speeds are kept, the overall scale
    is for reading. Zero-length arrows are dropped.
    """
    a = np.asarray(arrows, dtype=np.float64).reshape(-1, 4)
    s, u, ds, du = a.T
    span_s = float(np.ptp(s)) if len(s) and np.ptp(s) > 0 else 1.0
    span_u = float(np.ptp(u)) if len(u) and np.ptp(u) > 0 else 1.0
    nx, ny = ds / span_s, du / span_u
    length = np.hypot(nx, ny)
    keep = np.isfinite(length) & (length > 0)
    if not keep.any():
        return {k: np.empty(0) for k in ("x0", "y0", "x1", "y1")}
    s, u, nx, ny, length = s[keep], u[keep], nx[keep], ny[keep], length[keep]
    scale = share / float(np.quantile(length, 0.9))
    nx, ny = nx * scale, ny * scale
    # head strokes: the shaft turned back by +-_HEAD_ANGLE, a share of its length
    back = np.arctan2(-ny, -nx)
    head = _HEAD_SHARE * np.minimum(np.hypot(nx, ny), share)
    x1, y1 = s + nx * span_s, u + ny * span_u
    xs0, ys0, xs1, ys1 = [s], [u], [x1], [y1]
    for turn in (_HEAD_ANGLE, -_HEAD_ANGLE):
        xs0.append(x1)
        ys0.append(y1)
        xs1.append(x1 + head * np.cos(back + turn) * span_s)
        ys1.append(y1 + head * np.sin(back + turn) * span_u)
    return {
        "x0": np.concatenate(xs0),
        "y0": np.concatenate(ys0),
        "x1": np.concatenate(xs1),
        "y1": np.concatenate(ys1),
    }


def phase_fit_layers(fits: list[PhaseFit]) -> list[tuple[tuple[str, bool, str], dict[str, Any]]]:
    """The layers :func:`phase_fits` draws, in drawing order: ``((fit label, active, kind), columns)``.

    ``kind`` is ``"points"``, ``"lineages"``, ``"arrows"``, ``"curve"`` or ``"line"``;
    ``columns`` maps the layer's dimensions (``Ms``, ``Mu``; arrows also ``Ms end``,
    ``Mu end``) to their arrays (for ``"lineages"``: ``{"curves": the lineage curves}``).
    A layer of one of the fit's ``kinds`` is there even when the gene has nothing to draw
    in it (empty columns), so the layers stay the same from gene to gene. The keys tell
    whether a new gene's fits can be shown in the layers already drawn (same keys: same
    styles).
    """
    empty = np.empty(0)
    layers: list[tuple[tuple[str, bool, str], dict[str, Any]]] = []
    for fit in fits:
        key = (fit.label, fit.active)
        if (fit.points is not None and len(fit.points)) or "points" in fit.kinds:
            points = np.empty((0, 2)) if fit.points is None else fit.points
            layers.append(((*key, "points"), {"Ms": points[:, 0], "Mu": points[:, 1]}))
        if fit.lineages:
            layers.append(((*key, "lineages"), {"curves": tuple(fit.lineages)}))
        if (fit.arrows is not None and len(fit.arrows)) or "arrows" in fit.kinds:
            x0, y0, x1, y1 = arrow_segments(np.empty((0, 4)) if fit.arrows is None else fit.arrows).values()
            layers.append(((*key, "arrows"), {"Ms": x0, "Mu": y0, "Ms end": x1, "Mu end": y1}))
        if (fit.s is not None and fit.u is not None) or "curve" in fit.kinds:
            curve = (empty, empty) if fit.s is None or fit.u is None else (fit.s, fit.u)
            layers.append(((*key, "curve"), {"Ms": curve[0], "Mu": curve[1]}))
        if fit.line is not None or "line" in fit.kinds:
            line = np.empty((0, 2)) if fit.line is None else fit.line
            layers.append(((*key, "line"), {"Ms": line[:, 0], "Mu": line[:, 1]}))
    return layers


def phase_fits(
    fits: list[PhaseFit], *, hooks: Sequence[Callable[[Any, Any], None]] = ()
) -> hv.Overlay:
    """Each fit's trajectory, steady-state line ``u = slope * s`` and predicted cells, in the fit's colour.

    The active fit's lines are solid, the others dashed; predicted ``(s, u)`` of cells
    (fits that show ``"cell_points"``) are small dots; per-cell velocities (fits that show
    ``"cell_rates"``) are arrows (:func:`arrow_segments`). The curves carry no labels: a legend
    appearing in a plot already on the page breaks Bokeh's views, so
    :func:`fits_legend_html` explains them beside the plot. ``hooks[i]``, when given, goes
    on the ``i``-th layer of :func:`phase_fit_layers`.
    """
    labels = [fit.label for fit in fits]
    elements = []
    for i, ((label, active, kind), columns) in enumerate(phase_fit_layers(fits)):
        color = FIT_COLORS[labels.index(label) % len(FIT_COLORS)]
        dash = "solid" if active else "dashed"
        width = 3 if active else 2
        xy = (columns["Ms"], columns["Mu"]) if "Ms" in columns else None
        if kind == "points":
            element = hv.Points(xy, ["Ms", "Mu"], group="CellPoints").opts(
                color=color,
                size=3,
                alpha=0.5 if active else 0.3,
                line_alpha=0,
                nonselection_alpha=0.5 if active else 0.3,
                backend="bokeh",
            )
        elif kind == "lineages":
            # one curve per lineage (VeloVAE's full model), each a darker shade of its cell type's
            # colour (it runs through that type's dots)
            curves = columns["curves"]
            element = _lineage_contours(
                [c.s for c in curves], [c.u for c in curves], [c.color for c in curves], ("Ms", "Mu")
            ).opts(line_width=width + 1, line_dash=dash, backend="bokeh")
        elif kind == "arrows":
            dims = ["Ms", "Mu", "Ms end", "Mu end"]
            element = hv.Segments(tuple(columns[d] for d in dims), dims, group="CellArrows").opts(
                color=color, line_width=1.2, alpha=0.8 if active else 0.45, backend="bokeh"
            )
        elif kind == "curve":
            element = hv.Curve(xy, "Ms", "Mu").opts(
                color=color, line_width=width, line_dash=dash, backend="bokeh"
            )
        else:
            element = hv.Curve(xy, "Ms", "Mu", group="SteadyState").opts(
                color=color, line_width=1.5, line_dash="dotdash" if active else "dotted", backend="bokeh"
            )
        if i < len(hooks):
            element = element.opts(hooks=[hooks[i]], backend="bokeh")
        elements.append(element)
    if not elements:
        return hv.Overlay([hv.Curve([], "Ms", "Mu")])
    return hv.Overlay(elements)


def curve(x: np.ndarray, y: np.ndarray, *, labels: tuple[str, str]) -> hv.Curve:
    """Draw a fitted or trend curve on the time view."""
    return hv.Curve((x, y), labels[0], labels[1]).opts(color=FIT_CURVE_COLOR, line_width=3, backend="bokeh")


def _lineage_curves_words(curves: Sequence[Any]) -> str:
    """How the phase portrait's legend names the lineage curves (:func:`lineages_html` lists them)."""
    colour = "a darker shade of each type's colour" if curves[0].typed else "each lineage's colour"
    return f"per-lineage curves along latent time ({colour})"


def fits_legend_html(fits: list[PhaseFit]) -> str:
    """Explain the lines of :func:`phase_fits` as HTML: colour and dash per fit (labels escaped)."""
    items = []
    for i, fit in enumerate(fits):
        color = FIT_COLORS[i % len(FIT_COLORS)]
        style = "solid" if fit.active else "dashed"
        parts = [
            *(["trajectory"] if fit.s is not None else []),
            *(["u = γ s (dash-dot)" if fit.s is not None else "u = γ s"] if fit.line is not None else []),
            *(["predicted cells (dots)"] if fit.points is not None else []),
            *(["each cell's velocity from its own rates (arrows)"] if fit.arrows is not None else []),
            *([lineages_html(fit.lineages, _lineage_curves_words(fit.lineages))] if fit.lineages else []),
        ]
        what = ", ".join(parts) or "nothing to draw for this gene"
        # the swatch and the fit's name stay together; the description wraps
        items.append(
            '<span style="margin-right:12px"><span style="white-space:nowrap">'
            '<span style="display:inline-block;width:22px;'
            f'border-top:3px {style} {color};margin:0 4px 3px 0"></span>{html_text(fit.label)}:</span>'
            f" {what}</span>"
        )
    return "<div style='font-size:12px'>" + " ".join(items) + "</div>" if items else ""


def lineages_html(curves: Any, what: str, *, text: Callable[[Any], str] = html_text) -> str:
    """``what: Alpha, Beta`` with each lineage's name in its curve's colour.

    The names are escaped by ``text`` (:func:`~explorer.app.escape.markdown_text` where the
    result goes into Markdown), ``what`` is not.
    """
    names = ", ".join(f'<span style="color:{c.color};font-weight:bold">{text(c.name)}</span>' for c in curves)
    return f"{what}: {names}"


#: how much darker than its cell type a lineage's line is on a time view (it runs through
#: that type's dots, drawn in the type's own colour)
LINE_SHADE = 0.6


def lineage_lines(lines: Sequence[Any], *, labels: tuple[str, str]) -> hv.Contours:
    """One line per lineage on a time view (``t`` against ``value``), in a darker shade of its type's colour.

    Drawn as a Bokeh multi-line whose data source has the columns of
    :func:`lineage_line_columns` (a view sends new lines as those columns).
    """
    return _lineage_contours(
        [x.t for x in lines], [x.value for x in lines], [x.color for x in lines], labels
    ).opts(line_width=2.5, backend="bokeh")


def _lineage_contours(
    xs: list[Any], ys: list[Any], colors: list[str], labels: tuple[str, str]
) -> hv.Contours:
    """Lines ``(xs[i], ys[i])``, each in :func:`line_color` of ``colors[i]``: one Bokeh multi-line.

    Contours give each line its own colour; a Path would map the colours through a colour map.
    Under two lines, empty ones (:data:`_PADDING`) make up two: HoloViews maps the colours by
    what a layer is drawn with, and drew no line through a numeric colour map (lines sent
    later, :func:`lineage_line_columns`, were grey) and one line in a constant colour (every
    later line took it).
    """
    return hv.Contours(
        [
            {labels[0]: x, labels[1]: y, "lineage": color}
            for x, y, color in zip(*_padded(xs, ys, colors), strict=True)
        ],
        list(labels),
        vdims=["lineage"],
        group="Lineages",
    ).opts(color=hv.dim("lineage"), backend="bokeh")


#: the colours of the empty lines :func:`_lineage_contours` draws under two lines (two
#: distinct colours, so that HoloViews colours each line by its own)
_PADDING = ("#000000", "#ffffff")


def lineage_line_columns(lines: Sequence[Any]) -> dict[str, list[Any]]:
    """The data-source columns of :func:`lineage_lines`, to send new lines to a drawn one.

    ``xs`` and ``ys`` (one array per line; NaN breaks a line) and ``color`` (:func:`line_color`
    of each lineage's colour).
    """
    return _multi_line([x.t for x in lines], [x.value for x in lines], [x.color for x in lines])


def phase_layer_columns(kind: str, columns: dict[str, Any]) -> dict[str, Any]:
    """What a drawn layer of :func:`phase_fits` holds as its data source, from :func:`phase_fit_layers`.

    What a view sends to show another gene in the same layers: the lineage curves as a
    multi-line (as :func:`lineage_line_columns`), every other layer its dimensions (a space
    as ``_``).
    """
    if kind == "lineages":
        curves = columns["curves"]
        return _multi_line([c.s for c in curves], [c.u for c in curves], [c.color for c in curves])
    return {name.replace(" ", "_"): values for name, values in columns.items()}


def _multi_line(xs: list[Any], ys: list[Any], colors: list[str]) -> dict[str, list[Any]]:
    xs, ys, colours = _padded(xs, ys, colors)
    return {"xs": xs, "ys": ys, "color": colours}


def _padded(xs: list[Any], ys: list[Any], colors: list[str]) -> tuple[list[Any], list[Any], list[str]]:
    """The lines with empty ones making up two (:data:`_PADDING`), each colour :func:`line_color`'s.

    What is drawn and what is sent to a drawing must hold as many lines: HoloViews reads a
    drawing's own data source against the lines it drew (and failed where they differed).
    """
    pad = max(0, 2 - len(xs))
    return (
        [*xs, *([np.array([np.nan])] * pad)],
        [*ys, *([np.array([np.nan])] * pad)],
        [line_color(c) for c in colors] + list(_PADDING[:pad]),
    )


def line_color(color: str) -> str:
    """``color`` darkened by :data:`LINE_SHADE`, as hex: a lineage's line over its type's dots.

    Examples
    --------
    >>> line_color("#ff8000")
    '#994d00'
    """
    return str(to_hex(tuple(LINE_SHADE * c for c in to_rgb(color))))


def comparison_scatter(
    a: np.ndarray,
    b: np.ndarray,
    *,
    labels: tuple[str, str],
    title: str,
    width: int = 420,
    height: int = 380,
    highlight_index: int | None = None,
    diagonal: bool = True,
) -> hv.Overlay:
    """Plot A against B with the diagonal; ``highlight_index`` marks one point (gene or cell).

    ``diagonal=False`` leaves the diagonal out (drawn empty, so the layers stay): for two
    measures on different scales, where ``a == b`` means nothing.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    finite = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if len(a) > DATASHADE_THRESHOLD:
        base: hv.Element = rasterize(
            a,
            b,
            Coloring(kind="none", values=np.zeros(len(a)), label=""),
            labels=labels,
            width=width,
            height=height,
            color="#1f3a93",
            title=title,  # rasterize doubles its braces
        )
    else:
        base = hv.Points((a, b), list(labels)).opts(
            size=_size(len(a)),
            color="#1f3a93",
            alpha=0.6,
            tools=["tap"],
            default_tools=_DEFAULT_TOOLS,
            title=hv_title(title),
            width=width,
            height=height,
            line_alpha=0,
            nonselection_alpha=0.6,
            selection_alpha=0.6,
            backend="bokeh",
        )
    ends = [lo, hi] if diagonal else []
    line = hv.Curve((ends, ends), *labels).opts(color="#999999", line_dash="dashed", backend="bokeh")
    mark = cell_marker(
        *(a[highlight_index], b[highlight_index]) if highlight_index is not None else (None, None)
    )
    # framewise on each layer: a plot first drawn empty (figures still being computed) takes
    # the ranges of the data that arrives later
    layers = [layer.opts(framewise=True, backend="bokeh") for layer in (base, line, mark)]
    return (layers[0] * layers[1] * layers[2]).opts(framewise=True, backend="bokeh")


def message(text: str, *, width: int = 480, height: int = 420) -> hv.Overlay:
    """Draw an empty plot that says why there is nothing to draw."""
    # options set on each element: ``hv.opts.Points`` needs a backend chosen with hv.extension first
    empty = hv.Points([]).opts(width=width, height=height, xaxis=None, yaxis=None, backend="bokeh")
    return empty * hv.Text(0.5, 0.5, text).opts(text_font_size="11pt", backend="bokeh")


# --------------------------------------------------------------------- export
def figure_bytes(
    layers: list[dict[str, Any]],
    *,
    fmt: Literal["png", "svg"],
    title: str = "",
    labels: tuple[str, str] = ("x", "y"),
) -> bytes:
    """Draw ``layers`` with matplotlib and return the file's bytes (PNG or SVG).

    Each layer is a dict with ``kind`` ``"points"`` (``x``, ``y``, ``coloring``),
    ``"dots"`` (``x``, ``y``, ``color``: small dots in one colour, with a ``label``),
    ``"lines"`` (``lines``: list of ``(n, 2)`` arrays, ``color``, ``style``, ``label``),
    ``"marker"`` (``x``, ``y``, ``color``) or ``"highlight"`` (``x``, ``y``). Exports
    draw without a browser, so they work on a server with no display.
    """
    mpl.use("Agg", force=False)
    fig = Figure(figsize=(6, 5), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    for layer in layers:
        kind = layer["kind"]
        if kind == "points":
            _mpl_points(ax, layer["x"], layer["y"], layer["coloring"])
        elif kind == "dots":
            ax.scatter(
                layer["x"],
                layer["y"],
                s=3,
                color=layer.get("color", STREAM_COLOR),
                alpha=0.4,
                linewidths=0,
                label=mpl_text(layer.get("label")),
                rasterized=True,
            )
        elif kind == "lines":
            for line in layer["lines"]:
                line = np.asarray(line)
                ax.plot(
                    line[:, 0],
                    line[:, 1],
                    color=layer.get("color", STREAM_COLOR),
                    lw=layer.get("width", 0.8),
                    ls=layer.get("style", "-"),
                    alpha=layer.get("alpha", 0.8),
                )
            if layer.get("label"):
                ax.plot(
                    [],
                    [],
                    color=layer.get("color", STREAM_COLOR),
                    ls=layer.get("style", "-"),
                    label=mpl_text(layer["label"]),
                )
        elif kind == "highlight":
            ax.scatter(
                layer["x"], layer["y"], s=8, facecolors="none", edgecolors=SELECTION_COLOR, linewidths=0.6
            )
        elif kind == "marker":
            ax.scatter(
                layer["x"],
                layer["y"],
                s=160,
                facecolors="none",
                edgecolors=layer.get("color", CELL_COLOR),
                linewidths=2.5,
            )
    ax.set_xlabel(mpl_text(labels[0]))
    ax.set_ylabel(mpl_text(labels[1]))
    ax.set_title(mpl_text(title))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best", frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt)
    return buffer.getvalue()


def hv_title(text: str) -> str:
    """``text`` as a HoloViews ``title`` option, which it formats (``str.format``): braces doubled.

    A title holds names (a gene, a dataset, a colouring); one with a brace (``run{1}.h5ad``)
    stopped HoloViews from drawing the plot (``ValueError: unmatched '{'``).

    Examples
    --------
    >>> hv_title("run{1}: X_umap").format()
    'run{1}: X_umap'
    """
    return text.replace("{", "{{").replace("}", "}}")


def mpl_text(value: Any) -> str | None:
    r"""``value`` as text matplotlib draws literally: a ``$`` escaped, so that no name opens mathtext.

    A gene, cluster or file name holding ``$...$`` was drawn as math, and one that is not
    valid mathtext (``$\bad{$``) made the export fail; None stays None (no legend entry).

    Examples
    --------
    >>> mpl_text("IgG$1$")
    'IgG\\$1\\$'
    """
    return None if value is None else str(value).replace("$", r"\$")


def _mpl_points(ax: Any, x: np.ndarray, y: np.ndarray, coloring: Coloring) -> None:
    size = max(0.5, 20 / np.sqrt(max(len(x), 1) / 100))
    if coloring.kind == "category":
        key = coloring.color_key or {}
        codes = np.asarray(coloring.values)
        for code, cat in enumerate(coloring.categories):
            mine = codes == code
            ax.scatter(
                x[mine],
                y[mine],
                s=size,
                color=key.get(cat, MISSING_COLOR),
                label=mpl_text(cat),
                linewidths=0,
                rasterized=True,
            )
    elif coloring.kind == "continuous":
        lo, hi = value_range(coloring)
        art = ax.scatter(
            x,
            y,
            s=size,
            c=coloring.values,
            cmap=cmap_for(coloring),
            vmin=lo,
            vmax=hi,
            linewidths=0,
            rasterized=True,
        )
        ax.figure.colorbar(art, ax=ax, label=mpl_text(coloring.label))
    else:
        ax.scatter(x, y, s=size, color=MISSING_COLOR, linewidths=0, rasterized=True)


def table_csv(table: pd.DataFrame) -> str:
    """Write the gene table as CSV text."""
    return table.to_csv(index=False)
