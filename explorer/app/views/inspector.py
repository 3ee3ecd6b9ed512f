"""The cell inspector: the selected cell's cluster, latent time, confidence, likely next cells and fates.

Below the next cells: **Random walks from this cell** (drawn on the embedding, their end
clusters counted here) and **Compute fates** (terminal states and fate probabilities of
the active fit, in the background; the selected cell's probabilities are listed here).
Once fates are computed (or none of the macrostates was stable enough), every macrostate
is offered with its coarse self-transition, to tick the terminal states by hand.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter

from explorer.app.escape import markdown_text
from explorer.app.state import ExplorerState
from explorer.app.views.field import FieldPanel
from explorer.graph.fates import STABILITY_THRESHOLD


class CellInspector(pn.viewable.Viewer):
    """Facts about ``state.cell`` and the cells it most likely moves to (click one to go there)."""

    state = param.ClassSelector(class_=ExplorerState)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        state = self.state
        self.summary = pn.pane.Markdown("", name="cell summary", sizing_mode="stretch_width")
        self.targets = pn.widgets.Tabulator(
            pd.DataFrame(columns=["cell", "cluster", "probability"]),
            show_index=False,
            disabled=True,
            selectable=False,
            height=190,
            sizing_mode="stretch_width",
            formatters={"probability": NumberFormatter(format="0.000")},
        )
        self.targets.on_click(self._clicked)
        # the table joins the page with the first cell that has next cells to list: an empty
        # table costs every page, and building it cost a first cell click 0.4-1 s in chromium
        # on a dataset without transitions (a 10^6-cell store), where it would stay empty
        self.targets_slot = pn.Column(sizing_mode="stretch_width")
        self._indices: list[int] = []
        self.walk_button = pn.widgets.Button(label="Random walks from this cell", width=200, disabled=True)
        self.fates_button = pn.widgets.Button(label="Compute fates", width=140)
        self.walk_button.on_click(lambda _: state.start_walks())
        self.fates_button.on_click(lambda _: state.compute_fates())
        self.fate_states = pn.widgets.IntInput.from_param(
            state.param.fate_states, name="macrostates", width=90
        )
        self.fate_mode = pn.widgets.Select.from_param(state.param.fate_mode, label="kernel", width=140)
        # the macrostates of the last Compute fates, ticked where terminal (names are Bokeh text)
        self.terminal = pn.widgets.CheckBoxGroup(
            label="terminal states",
            options={},
            value=[],
            inline=True,
            sizing_mode="stretch_width",
            visible=False,
            # ten states in a row ran 600 px past the inspector: they wrap onto more lines
            stylesheets=[".bk-input-group.bk-inline { flex-wrap: wrap; column-gap: 10px; }"],
        )
        self.terminal_note = pn.pane.Markdown(
            "", name="terminal states note", sizing_mode="stretch_width", visible=False
        )
        self.terminal.param.watch(self._terminal_ticked, "value")
        state.param.watch(
            self._show_terminal, ["model", "fate_states", "fate_mode", "fate_bases", "fate_terminal", "adata"]
        )
        self._show_terminal()
        self.where = pn.pane.Markdown("", name="where the cell goes", sizing_mode="stretch_width")
        # the vector-field panel is built the first time the active fit has a field (no cost before)
        self.field_slot = pn.Column(sizing_mode="stretch_width")
        self.field: FieldPanel | None = None
        state.param.watch(self._show_field, ["model", "results"])
        self._show_field()
        state.param.watch(self._update, ["cell", "model", "results", "n_targets", "adata"])
        state.param.watch(
            self._update_where, ["cell", "model", "results", "walks", "fates", "running", "adata"]
        )
        self._update()
        self._update_where()

    def _update(self, *_: Any) -> None:
        info = self.state.cell_info()
        if info is None:
            self.summary.object = (
                "**No cell selected.** Click a cell in the embedding, phase portrait or time view."
            )
            self._indices = []
            self.targets.value = pd.DataFrame(columns=["cell", "cluster", "probability"])
            return
        # cell and cluster names come from the dataset: shown as text, never markup
        cluster = markdown_text(info.cluster) if info.cluster is not None else "—"
        lines = [
            f"**Cell** {markdown_text(info.name)} (row {info.index})",
            f"- cluster: **{cluster}**",
            f"- latent time: **{_fmt(info.latent_time)}**{_interval(info)}{_spread(info)}",
            f"- velocity confidence: **{_fmt(info.confidence)}**",
        ]
        if info.targets.empty:
            lines.append("- next cells: *no transition matrix (run a model on data with a neighbour graph)*")
        else:
            lines.append(f"- most likely next cells ({len(info.targets)}), drawn in orange on the embedding:")
        self.summary.object = "\n".join(lines)
        self._indices = [int(i) for i in info.targets["index"]]
        self.targets.value = info.targets[["cell", "cluster", "probability"]].reset_index(drop=True)
        if self._indices and not self.targets_slot.objects:
            self.targets_slot.objects = [self.targets]

    def _update_where(self, *_: Any) -> None:
        state = self.state
        fit = state.fit
        self.walk_button.disabled = state.cell is None or fit is None or fit.transitions is None
        self.fates_button.disabled = fit is None or state.running
        lines = []
        fates = state.active_fates()
        table = state.cell_fates()
        if table is not None and fates is not None:
            probs = ", ".join(
                f"{markdown_text(row.state)} **{row.probability:.2f}**" for row in table.itertuples()
            )
            lines.append(f"- fate probabilities ({markdown_text(fates.source)}): {probs}")
        elif fates is None and fit is not None:
            lines.append(
                "- fates: *press Compute fates (terminal states and fate probabilities of this fit)*"
            )
        walks = state.walks
        if walks is not None:
            n_walks, n_steps = walks.walks.shape[0], walks.walks.shape[1] - 1
            ends = ", ".join(
                f"{markdown_text(row.cluster)} **{row.walks}**" for row in walks.ends.itertuples()
            )
            where = (
                f"end in: {ends}"
                if ends
                else "end at the purple dots (no cell types to count the ends by)"
            )
            lines.append(
                f"- {n_walks} random walks of {n_steps} steps from row {walks.start} "
                f"({markdown_text(walks.fit)}; 30 drawn in purple on the embedding) {where}"
            )
        self.where.object = "\n".join(lines)

    def _show_terminal(self, *_: Any) -> None:
        choices = self.state.terminal_choices()
        options = {f"{name} ({stability:.3f})": name for name, stability in choices}
        if self.terminal.options != options:
            self.terminal.options = options
        value = [name for name in self.state.fate_terminal if name in options.values()]
        if self.terminal.value != value:
            self.terminal.value = value
        self.terminal.visible = bool(choices)
        self.terminal_note.object = (
            f"**Terminal states** among the {len(choices)} macrostates (coarse self-transition; "
            f"CellRank's rule takes those of {STABILITY_THRESHOLD} or more): tick where cells end, then "
            "press Compute fates."
            if choices
            else ""
        )
        self.terminal_note.visible = bool(choices)

    def _terminal_ticked(self, event: Any) -> None:
        ticked = list(event.new)
        if ticked != list(self.state.fate_terminal):
            self.state.fate_terminal = ticked

    def _show_field(self, *_: Any) -> None:
        if self.field is None and self.state.field_info() is not None:
            self.field = FieldPanel(state=self.state)
            self.field_slot.objects = [self.field]

    def _clicked(self, event: Any) -> None:
        row = getattr(event, "row", None)
        if row is not None and 0 <= row < len(self._indices):
            self.state.select_cell(self._indices[row])

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(
            self.summary,
            self.targets_slot,
            # the kernel under the macrostates: beside them the row ran 90 px past a 1,600-px page
            pn.Row(self.walk_button, pn.Column(self.fates_button, self.fate_states, self.fate_mode)),
            self.terminal_note,
            self.terminal,
            self.where,
            self.field_slot,
            name="Cell",
            sizing_mode="stretch_width",
        )


def _interval(info: Any) -> str:
    """`` (90 % interval a–b, SD s)`` after the latent time, when the fit gives a time SD.

    Not called a posterior interval: VeloVAE's default SD holds a second start's shift too.
    """
    interval = info.latent_time_interval(0.9)
    if interval is None:
        return ""
    return f" (90 % interval {interval[0]:.3f}–{interval[1]:.3f}, SD {info.latent_time_sd:.4f})"


def _spread(info: Any) -> str:
    """``; start spread x`` when the fit records how far the cell's rank moves between its initial times,
    then ``; its place within y of the cells (90 %)`` when it records the cell's rank width.
    """
    spread, width = info.latent_time_start_spread, info.latent_time_rank_width
    words = ""
    if spread is not None and math.isfinite(spread):
        words += f"; start spread {spread:.3f} of the ranking"
    if width is not None and math.isfinite(width):
        words += f"; its place within {width:.1%} of the cells (90 %)"
    return words


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
