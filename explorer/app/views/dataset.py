"""Open another dataset: only files under the data directory are offered or accepted."""

from __future__ import annotations

from typing import Any

import panel as pn
import param

from explorer.app.escape import markdown_text
from explorer.app.files import list_datasets
from explorer.app.state import ExplorerState


class DatasetPicker(pn.viewable.Viewer):
    """A list of the data directory's ``.h5ad``/``.loom`` files and an Open button."""

    state = param.ClassSelector(class_=ExplorerState)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.files = pn.widgets.Select(label="Dataset in the data directory", options=[], width=250)
        self.open_button = pn.widgets.Button(label="Open", width=80)
        self.refresh_button = pn.widgets.Button(label="Rescan folder", width=120)
        self.current = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.open_button.on_click(self._open)
        self.refresh_button.on_click(self._refresh)
        self.state.param.watch(self._show_current, ["dataset", "running"])
        self._refresh()
        self._show_current()

    def _refresh(self, *_: Any) -> None:
        options = list_datasets(self.state.data_dir)
        self.files.options = options
        if self.state.dataset in options:
            self.files.value = self.state.dataset

    def _open(self, *_: Any) -> None:
        if self.files.value:
            self.state.load(self.files.value)

    def _show_current(self, *_: Any) -> None:
        state = self.state
        self.open_button.disabled = state.running
        n = (
            f" — {state.adata.n_obs:,} cells x {state.adata.n_vars:,} genes"
            if state.adata is not None
            else ""
        )
        self.current.object = f"**{markdown_text(state.dataset)}**{n}"

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self.current, self.files, pn.Row(self.open_button, self.refresh_button), name="Data")
