"""Save the session's results (.h5ad), each plot (PNG, SVG) and the gene table (CSV)."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import panel as pn
import param

from explorer._types import InputError
from explorer.app import plots
from explorer.app.escape import markdown_text
from explorer.app.files import ExistingFileError
from explorer.app.state import ExplorerState

logger = logging.getLogger(__name__)

PLOTS = ("embedding", "phase portrait", "gene over time")


def figure_layers(state: ExplorerState, which: str) -> tuple[list[dict[str, Any]], str, tuple[str, str]]:
    """Collect what :func:`~explorer.app.plots.figure_bytes` draws for ``which``: layers, title, labels."""
    layers: list[dict[str, Any]] = []
    coloring = state.coloring()
    idx = state.selected
    if which == "embedding":
        xy = state.embedding()
        x, y = xy[:, 0], xy[:, 1]
        layers.append({"kind": "points", "x": x, "y": y, "coloring": coloring})
        layers.append({"kind": "lines", "lines": state.streamlines() if state.show_streamlines else []})
        title, labels = f"{state.dataset}: {state.basis} — {coloring.label}", ("dim 1", "dim 2")
    elif which == "phase portrait":
        x, y = state.gene_values("Ms"), state.gene_values("Mu")
        layers.append({"kind": "points", "x": x, "y": y, "coloring": coloring})
        for i, fit in enumerate(state.phase_fits()):
            color = plots.FIT_COLORS[i % len(plots.FIT_COLORS)]
            style = "-" if fit.active else "--"
            if fit.points is not None:
                layers.append(
                    {
                        "kind": "dots",
                        "x": fit.points[:, 0],
                        "y": fit.points[:, 1],
                        "color": color,
                        "label": f"{fit.label}: predicted cells",
                    }
                )
            if fit.s is not None:
                layers.append(
                    {
                        "kind": "lines",
                        "lines": [np.column_stack([fit.s, fit.u])],
                        "color": color,
                        "style": style,
                        "width": 2,
                        "label": fit.label,
                    }
                )
            if fit.line is not None:
                layers.append(
                    {
                        "kind": "lines",
                        "lines": [fit.line],
                        "color": color,
                        "style": ":",
                        "width": 1.2,
                        "label": f"{fit.label}: u = γ s",
                    }
                )
            for curve in fit.lineages or ():
                xy = np.column_stack([curve.s, curve.u])
                layers.append(_lineage_layer(curve, xy, f"{fit.label}: ", style))
        title, labels = f"{state.gene}: phase portrait", ("Ms", "Mu")
    elif which == "gene over time":
        t = state.latent_time()
        if t is None:
            msg = "There is no latent time to plot against; run a model that has one first."
            raise InputError(msg)
        x, y = t, state.gene_values("Ms")
        layers.append({"kind": "points", "x": x, "y": y, "coloring": coloring})
        found = state.time_curve("Ms")
        if found is not None:
            layers.append(
                {
                    "kind": "lines",
                    "lines": [np.column_stack(found[:2])],
                    "color": "#c0392b",
                    "width": 2.5,
                    "label": found[2],
                }
            )
        for line in state.lineage_lines("Ms") or ():
            layers.append(_lineage_layer(line, np.column_stack([line.t, line.value]), "", "-"))
        title, labels = f"{state.gene}: Ms over latent time", ("latent time", "Ms")
    else:
        msg = f"Invalid plot {which!r}. Valid options are: {', '.join(PLOTS)}."
        raise InputError(msg)
    if len(idx):
        layers.append({"kind": "highlight", "x": x[idx], "y": y[idx]})
    if state.cell is not None:
        layers.append({"kind": "marker", "x": [x[state.cell]], "y": [y[state.cell]]})
    return layers, title, labels


def _lineage_layer(lineage: Any, xy: np.ndarray, prefix: str, style: str) -> dict[str, Any]:
    """A lineage's curve or line, or a cell type's line, as the page draws it (:func:`.plots.line_color`)."""
    return {
        "kind": "lines",
        "lines": [xy],
        "color": plots.line_color(lineage.color),
        "style": style,
        "width": 2.5,
        "alpha": 1.0,
        "label": f"{prefix}{lineage.kind} {lineage.name}",
    }


def plot_file(state: ExplorerState, which: str, fmt: Literal["png", "svg"]) -> bytes:
    """Render plot ``which`` as PNG or SVG bytes."""
    layers, title, labels = figure_layers(state, which)
    return plots.figure_bytes(layers, fmt=fmt, title=title, labels=labels)


class ExportView(pn.viewable.Viewer):
    """Save results as .h5ad under the data directory; download plots and the gene table.

    Saving never replaces a file without asking: when the name is taken, the message
    under the Save button says so and an Overwrite button appears, which replaces that
    file (and only that name; editing the name hides it). Every outcome of a save,
    success or any error, replaces the message under the button.
    """

    state = param.ClassSelector(class_=ExplorerState)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        state = self.state
        stem = Path(state.dataset or "explorer").stem.replace("/", "_").replace(" ", "_")
        self.filename = pn.widgets.TextInput(
            label="Save results as (in the data directory)", value=f"{stem}_velocity.h5ad", width=250
        )
        self.save_button = pn.widgets.Button(label="Save .h5ad", color="success", width=110)
        self.overwrite_button = pn.widgets.Button(label="Overwrite", color="danger", width=110, visible=False)
        self.message = pn.pane.Alert(
            "", name="export message", alert_type="info", visible=False, sizing_mode="stretch_width"
        )
        #: the name the Overwrite button replaces (the one the last save found taken)
        self._confirm: str | None = None
        self.save_button.on_click(self._save)
        self.overwrite_button.on_click(self._overwrite)
        self.filename.param.watch(self._renamed, "value")
        # the sidebar is 340 px wide: the plot menu and its two buttons share one row
        self.which = pn.widgets.Select(label="Plot", options=list(PLOTS), width=140)
        self.png = pn.widgets.FileDownload(
            callback=self._png, filename="plot.png", label="PNG", width=64, color="light", align="end"
        )
        self.svg = pn.widgets.FileDownload(
            callback=self._svg, filename="plot.svg", label="SVG", width=64, color="light", align="end"
        )
        self.csv = pn.widgets.FileDownload(
            callback=self._csv,
            filename=f"{stem}_genes.csv",
            label="Gene table (CSV)",
            width=160,
            color="light",
        )
        self.which.param.watch(self._rename, "value")
        self._rename()

    def _rename(self, *_: Any) -> None:
        base = self.which.value.replace(" ", "_")
        self.png.filename, self.svg.filename = f"{base}.png", f"{base}.svg"

    def _renamed(self, *_: Any) -> None:
        """Withdraw the offer to overwrite: it was for the old name."""
        if self._confirm is not None and self.filename.value != self._confirm:
            self._ask_overwrite(None)

    def _ask_overwrite(self, name: str | None) -> None:
        self._confirm = name
        self.overwrite_button.visible = name is not None

    def _say(self, text: str, kind: str) -> None:
        self.message.param.update(object=text, alert_type=kind, visible=bool(text))

    def save(self, *, overwrite: bool = False) -> Path | None:
        """Write the results file named in the form; the outcome is shown under the Save button.

        Without ``overwrite`` an existing file is kept and the Overwrite button offered.
        Returns the path written, or None when nothing was written.
        """
        name = self.filename.value
        shown = markdown_text(name)
        try:
            path = self.state.export_h5ad(name, overwrite=overwrite)
        except ExistingFileError:
            self._ask_overwrite(name)
            self._say(
                f"**Not saved:** {shown} exists already in the data directory. "
                "Press **Overwrite** to replace it, or choose another name.",
                "warning",
            )
            return None
        except (InputError, OSError) as err:
            # a name that leaves the folder, a folder's name, too long a name, no permission, a full disk
            self._ask_overwrite(None)
            reason = (
                f"could not write {name!r} in the data directory: {err.strerror or err}"
                if isinstance(err, OSError)
                else str(err)
            )
            self._say(f"**Not saved:** {markdown_text(reason)}", "danger")
            return None
        except Exception as err:  # noqa: BLE001 - whatever the writer raises, the page must say it
            logger.exception("saving %r failed", name)
            self._ask_overwrite(None)
            self._say(f"**Not saved:** {markdown_text(f'{type(err).__name__}: {err}')}", "danger")
            return None
        self._ask_overwrite(None)
        self._say(
            f"Saved {markdown_text(path.name)} ({path.stat().st_size / 1e6:.1f} MB) in the data directory.",
            "success",
        )
        return path

    def _save(self, *_: Any) -> None:
        self.save()

    def _overwrite(self, *_: Any) -> None:
        if self._confirm is not None and self.filename.value == self._confirm:
            self.save(overwrite=True)

    def _png(self) -> io.BytesIO:
        return io.BytesIO(plot_file(self.state, self.which.value, "png"))

    def _svg(self) -> io.BytesIO:
        return io.BytesIO(plot_file(self.state, self.which.value, "svg"))

    def _csv(self) -> io.StringIO:
        return io.StringIO(plots.table_csv(self.state.gene_table()))

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(
            self.filename,
            pn.Row(self.save_button, self.overwrite_button),
            self.message,
            pn.Row(self.which, self.png, self.svg),
            self.csv,
            name="Export",
            sizing_mode="stretch_width",
        )
