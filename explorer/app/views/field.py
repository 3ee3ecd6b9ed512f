"""A vector field in the app: paths on the embedding, fixed points, and the perturbation panel.

:func:`path_layers` draws, as one set of lines and one set of dots, everything that moves
on the embedding: the random walks from a cell, the selected cell's path on the active
fit's vector field, a perturbation's unperturbed and perturbed paths, and the field's
fixed points (two Bokeh glyphs in all, whatever is shown, so a page without a field pays
nothing more for them). :class:`FieldPanel` (in the cell inspector, built the first time
the active fit has a field) says where the selected cell's path ends, lists the fixed
points, and runs an in-silico perturbation: a gene, a factor, the selected cells ->
the moved paths on the embedding and the shift of where they end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import holoviews as hv
import numpy as np
import panel as pn
import param

from explorer.app.escape import markdown_text
from explorer.app.plots import WALK_COLOR
from explorer.app.state import ExplorerState

if TYPE_CHECKING:
    from explorer.app import readouts

#: the selected cell's path on the field; a perturbation's paths, unperturbed and perturbed
TRAJECTORY_COLOR = "#111111"
CONTROL_COLOR = "#666666"
PERTURBED_COLOR = "#e31a1c"
#: the white casing under a field's paths, so they read over cells of any colour
CASING_COLOR = "#ffffff"
#: fixed points by type (the field's Jacobian: all eigenvalues' real parts < 0, mixed, > 0)
FIXED_COLORS = {"attractor": "#2ca02c", "saddle": "#ff9900", "repeller": "#d62728"}
FIXED_OTHER = "#888888"


def path_layer_columns(
    walks: list[np.ndarray],
    trajectory: np.ndarray | None = None,
    control: list[np.ndarray] = (),
    perturbed: list[np.ndarray] = (),
    fixed: readouts.FixedPoints | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The data sources of :func:`path_layers`' lines and dots, as a drawing of them holds them.

    Lines: ``xs``, ``ys`` (one array per line), ``color``, ``line_width``; dots: ``x``, ``y``,
    ``color``, ``line_color`` (the ring), ``size``. What the embedding sends to show other
    paths in the drawn layers (:class:`explorer.app.views._layers.LiveLayer`).
    """
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    colors: list[str] = []
    widths: list[float] = []
    ends: list[tuple[float, float, str, str, float]] = []

    def line(x: np.ndarray, y: np.ndarray, color: str, width: float) -> None:
        xs.append(x)
        ys.append(y)
        colors.append(color)
        widths.append(width)

    def add(paths: Any, color: str, width: float, end_size: float, *, casing: bool = True) -> None:
        paths = [np.asarray(p, dtype=np.float64)[:, :2] for p in paths]
        paths = [p for p in paths if len(p) > 1]
        if casing:  # drawn first: under every line of the group
            for p in paths:
                line(p[:, 0], p[:, 1], CASING_COLOR, width + 3)
        for p in paths:
            line(p[:, 0], p[:, 1], color, width)
            ends.append((p[-1, 0], p[-1, 1], color, "white", end_size))

    add(walks, WALK_COLOR, 1.2, 7, casing=False)
    add(control, CONTROL_COLOR, 1.5, 7)
    add(perturbed, PERTURBED_COLOR, 2.0, 8)
    add([] if trajectory is None else [trajectory], TRAJECTORY_COLOR, 3.0, 11)
    if fixed is not None:
        for (x, y), kind in zip(fixed.xy, fixed.kind, strict=True):
            ends.append((float(x), float(y), FIXED_COLORS.get(kind, FIXED_OTHER), "black", 16))
    # two invisible lines and dots (NaN, unlike values) keep the colour and size columns even
    # when nothing is shown: HoloViews turns a column of equal values into one constant
    for color, size in (("#ffffff", 0.0), ("#fffffe", 0.1)):
        line(np.full(2, np.nan), np.full(2, np.nan), color, size)
        ends.append((np.nan, np.nan, color, color, size))
    x, y, color, ring, size = zip(*ends, strict=True)
    lines = {"xs": xs, "ys": ys, "color": colors, "line_width": np.asarray(widths)}
    dots = {
        "x": np.asarray(x),
        "y": np.asarray(y),
        "color": list(color),
        "line_color": list(ring),
        "size": np.asarray(size),
    }
    return lines, dots


def path_layers(
    lines: dict[str, Any], dots: dict[str, Any], *, hooks: tuple[Any, Any] = (None, None)
) -> hv.Overlay:
    """Lines and dots on the embedding: walks (purple), a field path (black), perturbation paths, fixed points.

    ``lines`` and ``dots`` as :func:`path_layer_columns` gives them: lines end in a dot of
    their colour (a walk's end cell, a path's end); fixed points are large dots ringed in
    black, coloured by type. Always one ``Path`` and one ``Points`` element, so the overlay
    keeps its shape. ``hooks``: HoloViews hooks of the lines and the dots (see ``LiveLayer``).
    """
    # Contours: one colour and width per line (a Path would cut each line into segments)
    path = hv.Contours(
        [
            {"x": x, "y": y, "color": color, "width": width}
            for x, y, color, width in zip(
                lines["xs"], lines["ys"], lines["color"], lines["line_width"], strict=True
            )
        ],
        ["x", "y"],
        vdims=["color", "width"],
    ).opts(
        color=hv.dim("color"),
        line_width=hv.dim("width"),
        alpha=0.8,
        hooks=[h for h in hooks[:1] if h],
        backend="bokeh",
    )
    # HoloViews names the ring's column after its option (line_color) in the drawing
    points = {"ring" if k == "line_color" else k: np.asarray(v) for k, v in dots.items()}
    dots_element = hv.Points(points, ["x", "y"], ["color", "size", "ring"]).opts(
        color=hv.dim("color"),
        size=hv.dim("size"),
        line_color=hv.dim("ring"),
        line_width=1.5,
        hooks=[h for h in hooks[1:] if h],
        backend="bokeh",
    )
    return path * dots_element


class FieldPanel(pn.viewable.Viewer):
    """The active fit's vector field: where the selected cell's path ends, fixed points, perturbations."""

    state = param.ClassSelector(class_=ExplorerState)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        state = self.state
        self.summary = pn.pane.Markdown("", name="vector field", sizing_mode="stretch_width")
        self.gene = pn.widgets.AutocompleteInput(
            label="gene", options=[], case_sensitive=False, search_strategy="includes", width=140
        )
        self.gene.param.watch(self._chosen, "value")
        self.factor = pn.widgets.FloatInput(
            label="factor (0: knock-out)", value=0.0, start=0.0, step=0.5, width=130
        )
        self.button = pn.widgets.Button(label="Perturb", color="primary", width=90, margin=(24, 5, 5, 5))
        self.button.on_click(lambda _: self.perturb())
        self.cells = pn.pane.Markdown("", name="perturbed cells", sizing_mode="stretch_width")
        self.result = pn.pane.Markdown("", name="fate shift", sizing_mode="stretch_width")
        state.param.watch(self._update, ["model", "results", "trajectory", "basis"])
        state.param.watch(self._update_cells, ["cell", "selected", "running"])
        state.param.watch(self._update_result, ["perturbation", "model"])
        state.param.watch(self._follow_gene, ["gene"])
        self._update()
        self._update_cells()
        self._update_result()

    def perturb(self) -> Any:
        """Run the perturbation the form describes (the state's selected cells, else the selected cell)."""
        # what the box shows: a name typed without Enter (or picking it from the list) is in
        # ``value_input`` only, and clicking Perturb must not run the previous gene
        gene = str(self.gene.value_input or self.gene.value or "").strip()
        return self.state.run_perturbation(gene, factor=float(self.factor.value or 0))

    def _chosen(self, event: param.parameterized.Event) -> None:
        """A gene chosen (from the list, by Enter, or set here) is also what the box shows."""
        if self.gene.value_input != event.new:
            self.gene.value_input = event.new

    def _follow_gene(self, *_: Any) -> None:
        info = self.state.field_info()
        if info is not None and self.state.gene in info.genes:
            self.gene.value = self.state.gene

    def _update(self, *_: Any) -> None:
        state = self.state
        info = state.field_info()
        if info is None:
            self.summary.object = ""
            return
        if list(self.gene.options) != list(info.genes):
            self.gene.options = list(info.genes)
        if self.gene.value not in info.genes:
            first = info.genes[0] if info.genes else ""
            self.gene.value = state.gene if state.gene in info.genes else first
        lines = [f"**Vector field** of {markdown_text(info.label)}"]
        found = state.trajectory
        if found is None:
            lines.append("- click a cell to draw its path on the field (black)")
        else:
            lines.append(
                f"- path of {found.n_steps} steps from row {found.start} (black) ends near a cell of "
                f"**{markdown_text(found.end_cluster)}**"
            )
        fixed = state.fixed_points()
        if fixed is None or len(fixed.kind) == 0:
            lines.append("- no fixed point found near the cells")
        else:
            kinds = ", ".join(
                f"{markdown_text(k)} in {markdown_text(c)}"
                for k, c in zip(fixed.kind, fixed.cluster, strict=True)
            )
            lines.append(f"- fixed points (green attractor, orange saddle, red repeller): {kinds}")
        self.summary.object = "\n".join(lines)
        self.button.disabled = state.running or not info.genes

    def _update_cells(self, *_: Any) -> None:
        state = self.state
        n = len(state.selected)
        if n:
            self.cells.object = f"Perturbs the **{n:,}** selected cells (box or lasso on the embedding)."
        elif state.cell is not None:
            self.cells.object = (
                f"Perturbs the selected cell (row {state.cell}); box or lasso to perturb a group."
            )
        else:
            self.cells.object = "Select cells to perturb: click one, or box/lasso a group on the embedding."
        self.button.disabled = state.running or state.field_info() is None

    def _update_result(self, *_: Any) -> None:
        run = self.state.perturbation
        if run is None or run.fit != self.state.model:
            self.result.object = ""
            return
        table = run.table[(run.table["control"] > 0) | (run.table["perturbed"] > 0)]
        rows = "\n".join(
            f"| {markdown_text(name)} | {row['control']:.2f} | {row['perturbed']:.2f} | {row['shift']:+.2f} |"
            for name, row in table.iterrows()
        )
        self.result.object = (
            f"**{markdown_text(run.gene)} x{run.factor:g}** in {run.n_cells:,} cells, {run.n_steps} steps: "
            f"where the paths end (grey: unperturbed, red: perturbed; {len(run.perturbed_paths)} drawn); "
            f"fates: {markdown_text(run.measure)}\n\n"
            "| fate | control | perturbed | shift |\n|---|---|---|---|\n" + rows
        )

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(
            self.summary,
            pn.Row(self.gene, self.factor, self.button),
            self.cells,
            self.result,
            name="Vector field",
            sizing_mode="stretch_width",
        )
