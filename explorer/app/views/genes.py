"""The gene browser: a searchable, sortable table of the active model's per-gene figures.

The table shows only the columns the active fit has (:func:`explorer.app.readouts.gene_table`):
a steady-state fit's R² as ``R²``, a dynamical fit's rates, switch time and diagnostics,
and a per-gene ``trust`` summary (a traffic light: the share of fit checks the gene
passes), explained in the legend under the table and in each header's tooltip. The
checks the selected gene fails are spelled out above the table. ``mean Mu``, the scaling
and the notes stay in the table's data (and in its CSV) but are not shown as columns, so
the others fit the width without a sideways scroll.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter

from explorer._types import InputError
from explorer.app import readouts
from explorer.app.escape import html_text
from explorer.app.state import ExplorerState

if TYPE_CHECKING:
    import pandas as pd

#: number format of the float columns; each table gets its own formatter: a Bokeh model shared by
#: every session keeps a reference to each session's table, which then outlives its session
_FLOAT_FORMAT = "0.000"

#: the trust score as a traffic light (Tabulator's "traffic" formatter): red, amber, green
_TRUST_FORMAT = {"type": "traffic", "min": 0, "max": 1, "color": ["#d73027", "#fdae61", "#1a9850"]}


def _light(score: np.ndarray) -> np.ndarray:
    """The trust light of a score (share of checks passed): 0 red (none), 0.5 amber (some), 1 green (all).

    The table shows this rather than the score (the CSV keeps the score): Tabulator's
    "traffic" formatter splits ``[min, max]`` into equal thirds, so a gene passing 5 of 6
    checks (0.83) was drawn green beside a header saying which check it fails.
    """
    return np.where(np.isnan(score), np.nan, np.where(score >= 1, 1.0, np.where(score <= 0, 0.0, 0.5)))


#: the column of a gene's switch-off time: ``inf`` (never switches off) is shown as "none"
_SWITCH = "switch time"

#: shorter headers for long column names (the tooltips say what each means)
_TITLES = {
    "likelihood": "likeli\u00adhood",  # a soft hyphen: it may break there
    "displacement r": "displace\u00adment r",
    "kinetic signal": "kin. signal",
    "detection power": "det. power",
    _SWITCH: "t switch",
    "velocity gene": "vel. gene",
}

#: columns kept in the data (the CSV, the notes line) but not shown, to leave room for the rest
_HIDDEN = ["mean Mu", "scaling", readouts.TRUST_NOTES]

#: the column a new table is sorted by (best first), the first the fit has
_SORT_BY = (readouts.TRUST, "likelihood", "R²", "displacement r", readouts.FIT_QUALITY)
#: ties of the trust score are broken by the fit's goodness of fit
_THEN_BY = ("likelihood", "R²", "displacement r", readouts.FIT_QUALITY)

#: tighter cells and headers that wrap between words, so a dozen columns fit ~850 px unshortened
_TABLE_CSS = """
.tabulator-col .tabulator-col-content { padding: 4px 2px 4px 5px !important; }
.tabulator-col .tabulator-col-title { white-space: normal !important; text-overflow: clip !important; }
.tabulator-col .tabulator-col-title-holder { padding-right: 12px !important; }
.tabulator-cell { padding: 4px 5px !important; }
"""

#: pixels per table row and for the header, filter row and pagination bar
_ROW_PX, _CHROME_PX = 30, 100


class GeneBrowser(pn.viewable.Viewer):
    """A search box and a table of genes; clicking a row or picking a name selects the gene."""

    state = param.ClassSelector(class_=ExplorerState)
    page_size = param.Integer(default=15, bounds=(5, 100), doc="Genes per page of the table.")

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
        table = self._ordered(state.gene_table())
        self.table = pn.widgets.Tabulator(
            table,
            pagination="remote",
            page_size=self.page_size,
            show_index=False,
            disabled=True,
            selectable=1,
            header_filters={"gene": {"type": "input", "func": "like", "placeholder": "filter genes"}},
            formatters=self._formatters(table),
            titles=self._titles(table),
            header_tooltips=self._help(table),
            frozen_columns=["gene"],
            hidden_columns=list(_HIDDEN),
            # the columns share the table's width: no sideways scroll (the numbers are short;
            # a long header is shortened, its tooltip says it in full)
            layout="fit_columns",
            widths={"gene": 100, readouts.TRUST: 62},
            stylesheets=[_TABLE_CSS],
            sizing_mode="stretch_width",
            height=_CHROME_PX + _ROW_PX * self.page_size,
        )
        self.legend = pn.pane.HTML(self._legend(), name="trust legend", sizing_mode="stretch_width")
        self.verdict = pn.pane.HTML(
            "", name="gene trust", sizing_mode="stretch_width", margin=(22, 10, 0, 10)
        )
        self.table.on_click(self._clicked)
        # trust diagnostics (explorer.diagnostics) of the active fit, and a refit without the flagged genes
        self.diagnose_button = pn.widgets.Button(label="Trust diagnostics", width=150)
        self.without_button = pn.widgets.Button(label="Recompute without flagged genes", width=240)
        self.diagnose_button.on_click(lambda _: state.compute_diagnostics())
        self.without_button.on_click(lambda _: state.recompute_without_flagged())
        self.flags_note = pn.pane.Markdown("", sizing_mode="stretch_width", margin=(12, 10, 0, 10))
        state.param.watch(self._refresh, ["model", "results", "diagnostics"])
        state.param.watch(self._show_flags, ["model", "results", "diagnostics", "running"])
        self._show_flags()
        state.param.watch(self._follow, ["gene"])
        self._follow()

    @staticmethod
    def _formatters(table: Any) -> dict[str, Any]:
        number = NumberFormatter(format=_FLOAT_FORMAT)
        formats: dict[str, Any] = {c: number for c in table.columns if table[c].dtype.kind == "f"}
        if _SWITCH in table:
            # a gene that never switches off (VeloVAE's induced genes: switch time inf, shown as NaN)
            formats[_SWITCH] = NumberFormatter(format=_FLOAT_FORMAT, nan_format="none")
        if readouts.TRUST in table:
            formats[readouts.TRUST] = dict(_TRUST_FORMAT)
        return formats

    @staticmethod
    def _ordered(table: pd.DataFrame) -> pd.DataFrame:
        """Best-fitted genes first (genes without a figure last), as rows 0, 1, ... of the frame.

        Sorted here rather than by Tabulator ``sorters``: with remote pagination and a
        sorter, Panel maps ``selection`` to the wrong rows (holoviz/panel#3663), and the
        selected gene's row would be marked on another gene.
        """
        if _SWITCH in table:  # "none", not "Infinity" (the CSV keeps inf)
            table = table.assign(**{_SWITCH: table[_SWITCH].replace([np.inf, -np.inf], np.nan)})
        keys = [c for c in (*_SORT_BY[:1], *_THEN_BY) if c in table] if readouts.TRUST in table else []
        keys = keys or [c for c in _SORT_BY if c in table][:1]
        # no figure to rank by (a vector field's own fit): the genes it trusts first
        keys = keys or [c for c in ("velocity gene",) if c in table]
        if not keys:
            return table
        ordered = table.sort_values(keys, ascending=False, na_position="last", kind="stable")
        ordered = ordered.reset_index(drop=True)
        if readouts.TRUST in ordered:
            ordered[readouts.TRUST] = _light(ordered[readouts.TRUST].to_numpy(dtype=float))
        return ordered

    def _help(self, table: pd.DataFrame) -> dict[str, str]:
        fit = self.state.fit
        return readouts.column_help(table, fit.result.gene_params if fit is not None else None)

    @staticmethod
    def _titles(table: Any) -> dict[str, str]:
        return {c: _TITLES[c] for c in table.columns if c in _TITLES}

    def _legend(self) -> str:
        fit = self.state.fit
        diagnosed = self.state.model in self.state.diagnostics
        lines = readouts.trust_legend(fit, diagnosed=diagnosed)
        if not lines:
            return ""
        items = "".join(f"<li>{html_text(line)}</li>" for line in lines)
        return (
            "<div style='font-size:12px;color:#444'><b>trust</b>: the share of these checks a gene "
            "passes (<span style='color:#1a9850'>●</span> all, <span style='color:#fdae61'>●</span> some, "
            f"<span style='color:#d73027'>●</span> none); sort by it to find well-fitted genes."
            f"<ul style='margin:2px 0 0 0;padding-left:18px'>{items}</ul></div>"
        )

    def _verdict(self, row: pd.Series | None) -> str:
        """Say the selected gene's trust in words: its light and the checks it fails (names as text)."""
        if row is None or readouts.TRUST not in row or not np.isfinite(row[readouts.TRUST]):
            return ""
        color = _TRUST_FORMAT["color"][int(2 * _light(np.asarray(float(row[readouts.TRUST]))))]
        notes = str(row[readouts.TRUST_NOTES])
        failed = [n for n in notes.split("; ") if n and n != readouts.ONSET_NOTE]
        words = f"fails: {'; '.join(failed)}" if failed else "passes every check"
        if readouts.ONSET_NOTE in notes:
            words += f" (note: {readouts.ONSET_NOTE})"
        return (
            f"<div style='font-size:13px'><span style='color:{color}'>●</span> "
            f"<b>{html_text(row['gene'])}</b>: {html_text(words)}</div>"
        )

    def _refresh(self, *_: Any) -> None:
        table = self._ordered(self.state.gene_table())
        self.table.param.update(
            formatters=self._formatters(table),
            titles=self._titles(table),
            header_tooltips=self._help(table),
            value=table,
        )
        self.legend.object = self._legend()
        self._follow()

    def _follow(self, *_: Any) -> None:
        """Mark the selected gene's row, wherever the gene was chosen, and show its page and verdict."""
        rows = self.table.value.index[self.table.value["gene"] == self.state.gene]
        self.table.selection = [int(rows[0])] if len(rows) else []
        self.verdict.object = self._verdict(self.table.value.loc[rows[0]] if len(rows) else None)
        shown = np.flatnonzero(self.table.current_view["gene"].to_numpy() == self.state.gene)
        if shown.size:
            self.table.page = int(shown[0]) // self.table.page_size + 1

    def _show_flags(self, *_: Any) -> None:
        state = self.state
        flagged = state.flagged()
        self.diagnose_button.disabled = state.fit is None or state.running
        self.without_button.disabled = flagged is None or not flagged.any() or state.running
        if flagged is None:
            self.flags_note.object = ""
        else:
            self.flags_note.object = readouts.flags_summary(
                state.diagnostics[state.model],
                flagged,
                state.adata.var_names,
                has_types=readouts.cluster_column(state.adata) is not None,
            )

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
        return pn.Column(
            pn.Row(self.search, self.verdict, sizing_mode="stretch_width"),
            self.table,
            self.legend,
            pn.Row(self.diagnose_button, self.without_button, self.flags_note, sizing_mode="stretch_width"),
            name="Genes",
            sizing_mode="stretch_width",
        )
