"""The gene browser: a searchable, sortable table of the active model's per-gene fit figures."""

from __future__ import annotations

from typing import Any

import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter

from explorer._types import InputError
from explorer.app.state import ExplorerState

#: number format of the float columns; each table gets its own formatter: a Bokeh model shared by
#: every session keeps a reference to each session's table, which then outlives its session
_FLOAT_FORMAT = "0.000"


class GeneBrowser(pn.viewable.Viewer):
    """A search box and a table of genes; clicking a row or picking a name selects the gene."""

    state = param.ClassSelector(class_=ExplorerState)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        state = self.state
        names = [str(g) for g in state.adata.var_names]
        self.search = pn.widgets.AutocompleteInput(
            label="Find a gene",
            options=names,
            case_sensitive=False,
            search_strategy="includes",
            min_characters=1,
            placeholder="gene name, e.g. " + (state.gene or names[0]),
            restrict=False,
            width=260,
        )
        self.search.param.watch(self._searched, "value")
        table = state.gene_table()
        self.table = pn.widgets.Tabulator(
            table,
            pagination="remote",
            page_size=12,
            show_index=False,
            disabled=True,
            selectable=1,
            header_filters={"gene": {"type": "input", "func": "like", "placeholder": "filter genes"}},
            formatters=self._formatters(table),
            # best-fitted genes first (genes without a fit figure sort last)
            sorters=[{"field": "likelihood", "dir": "desc"}],
            sizing_mode="stretch_width",
            height=420,
        )
        self.table.on_click(self._clicked)
        state.param.watch(self._refresh, ["model", "results"])
        state.param.watch(self._follow, ["gene"])
        self._follow()

    @staticmethod
    def _formatters(table: Any) -> dict[str, Any]:
        number = NumberFormatter(format=_FLOAT_FORMAT)
        return {c: number for c in table.columns if table[c].dtype.kind == "f"}

    def _refresh(self, *_: Any) -> None:
        table = self.state.gene_table()
        self.table.formatters = self._formatters(table)
        self.table.value = table
        self._follow()

    def _follow(self, *_: Any) -> None:
        """Mark the selected gene's row, wherever the gene was chosen."""
        rows = self.table.value.index[self.table.value["gene"] == self.state.gene]
        self.table.selection = [int(rows[0])] if len(rows) else []

    def _clicked(self, event: Any) -> None:
        row = getattr(event, "row", None)
        if row is None:
            return
        self.state.select_gene(str(self.table.value.loc[row, "gene"]))

    def _searched(self, event: param.parameterized.Event) -> None:
        if not event.new:
            return
        try:
            self.state.select_gene(str(event.new))
        except InputError as err:
            self.state.error = str(err)

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self.search, self.table, name="Genes", sizing_mode="stretch_width")
