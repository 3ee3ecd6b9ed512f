"""The cell inspector: the selected cell's cluster, latent time, confidence and likely next cells."""

from __future__ import annotations

from typing import Any

import pandas as pd
import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter

from explorer.app.escape import markdown_text
from explorer.app.state import ExplorerState


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
        self._indices: list[int] = []
        state.param.watch(self._update, ["cell", "model", "results", "n_targets", "adata"])
        self._update()

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
            f"- latent time: **{_fmt(info.latent_time)}**",
            f"- velocity confidence: **{_fmt(info.confidence)}**",
        ]
        if info.targets.empty:
            lines.append("- next cells: *no transition matrix (run a model on data with a neighbour graph)*")
        else:
            lines.append(f"- most likely next cells ({len(info.targets)}), drawn in orange on the embedding:")
        self.summary.object = "\n".join(lines)
        self._indices = [int(i) for i in info.targets["index"]]
        self.targets.value = info.targets[["cell", "cluster", "probability"]].reset_index(drop=True)

    def _clicked(self, event: Any) -> None:
        row = getattr(event, "row", None)
        if row is not None and 0 <= row < len(self._indices):
            self.state.select_cell(self._indices[row])

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self.summary, self.targets, name="Cell", sizing_mode="stretch_width")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
