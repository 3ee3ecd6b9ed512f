"""Choose a model and its main parameters, run it in the background, watch its progress, cancel it.

The models offered are those registered in :data:`explorer.models.MODELS` when the page
is built, so a model registered after start-up (a plug-in, a test's toy model) shows on
the next page without any change here.
"""

from __future__ import annotations

from typing import Any

import panel as pn
import param

from explorer.app.escape import markdown_text
from explorer.app.fits import (
    model_choices,
    model_defaults,
    model_names,
    obs_key_choices,
    obs_key_columns,
    obs_key_start,
)
from explorer.app.state import ExplorerState
from explorer.models import MODELS

#: the model the form starts with, when registered
_FIRST_MODEL = "stochastic"


def _widget_for(
    name: str, default: Any, choices: list[Any] | dict[str, Any] | None = None
) -> pn.widgets.Widget | None:
    """Make an input for one constructor parameter: a menu of its ``choices``, else by its default's type.

    ``choices`` is a list of values, or ``{label: value}`` (:func:`obs_key_choices`), which
    always holds the default.
    """
    if isinstance(choices, dict) or (choices and default in choices):
        return pn.widgets.Select(label=name, options=choices, value=default, width=120)
    if isinstance(default, bool):
        return pn.widgets.Checkbox(label=name, value=default, width=140)
    if isinstance(default, int):
        return pn.widgets.IntInput(label=name, value=default, width=120)
    if isinstance(default, float):
        return pn.widgets.FloatInput(label=name, value=default, width=120)
    if isinstance(default, str):
        return pn.widgets.TextInput(label=name, value=default, width=120)
    return None


class ModelRunner(pn.viewable.Viewer):
    """Model picker, parameter form, Run/Cancel, a live progress bar and the active-model choice."""

    state = param.ClassSelector(class_=ExplorerState)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        state = self.state
        names = model_names()
        self.model_select = pn.widgets.Select(
            label="Model",
            options=names,
            value=_FIRST_MODEL if _FIRST_MODEL in names else (names[0] if names else None),
            width=250,
        )
        self.description = pn.pane.Markdown("", name="model description", sizing_mode="stretch_width")
        self.form = pn.Column(sizing_mode="stretch_width")
        self.run_button = pn.widgets.Button(label="Run", color="primary", width=110)
        self.cancel_button = pn.widgets.Button(label="Cancel", color="warning", width=110, disabled=True)
        self.bar = pn.indicators.Progress(value=0, max=1000, bar_color="primary", sizing_mode="stretch_width")
        self.status = pn.pane.Markdown("", name="status", sizing_mode="stretch_width")
        self.alert = pn.pane.Alert("", alert_type="danger", visible=False, sizing_mode="stretch_width")
        # what the model logged as a warning during the last run (its notes on the input)
        self.notice = pn.pane.Alert("", alert_type="warning", visible=False, sizing_mode="stretch_width")
        self.active = pn.widgets.Select.from_param(state.param.model, label="Active model", width=250)
        self._widgets: dict[str, pn.widgets.Widget] = {}
        self.model_select.param.watch(self._build_form, "value")
        # a *_key parameter lists the dataset's columns: a new dataset rebuilds the form
        self._columns = self._read_columns()
        state.param.watch(self._new_dataset, "adata")
        self.run_button.on_click(self._run)
        self.cancel_button.on_click(lambda _: state.cancel_run())
        state.param.watch(self._show_progress, ["progress", "running", "status", "error", "notices"])
        self._build_form()
        self._show_progress()

    def _read_columns(self) -> dict[str, list[str]]:
        return obs_key_columns(None if self.state.adata is None else self.state.adata.obs)

    def _new_dataset(self, *_: Any) -> None:
        self._columns = self._read_columns()
        self._build_form()

    def _build_form(self, *_: Any) -> None:
        name = self.model_select.value
        self.description.object = markdown_text(MODELS.spec(name).description) if name in MODELS else ""
        self._widgets = {}
        choices = model_choices(self.model_select.value) if name in MODELS else {}
        for name, default in model_defaults(self.model_select.value).items():
            menu = obs_key_choices(name, default, self._columns)
            if menu is not None:
                widget = _widget_for(name, obs_key_start(name, default, self._columns), menu)
            else:
                widget = _widget_for(name, default, choices.get(name))
            if widget is not None:
                self._widgets[name] = widget
        # a grid of plain Bokeh layout, not a FlexBox (a ReactiveHTML template: costlier to build and draw)
        self.form.objects = [pn.GridBox(*self._widgets.values(), ncols=2)]

    def params(self) -> dict[str, Any]:
        """Return the form's parameter values (only those changed from the model's defaults)."""
        defaults = model_defaults(self.model_select.value)
        return {k: w.value for k, w in self._widgets.items() if w.value != defaults.get(k)}

    def _run(self, _: Any = None) -> None:
        self.state.run_model(self.model_select.value, **self.params())

    def _show_progress(self, *_: Any) -> None:
        state = self.state
        self.bar.value = int(round(state.progress * 1000))
        self.bar.active = state.running and state.progress == 0
        self.run_button.disabled = state.running
        self.cancel_button.disabled = not state.running
        # messages name genes, files and categories from the dataset: shown as text, never markup
        self.status.object = markdown_text(state.status)
        self.alert.object = markdown_text(state.error)
        self.alert.visible = bool(state.error)
        # one paragraph per warning, each shown as text
        self.notice.object = "\n\n".join(markdown_text(note) for note in state.notices)
        self.notice.visible = bool(state.notices)

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(
            self.model_select,
            self.description,
            self.form,
            pn.Row(self.run_button, self.cancel_button),
            self.bar,
            self.status,
            self.alert,
            self.notice,
            self.active,
            name="Model",
            sizing_mode="stretch_width",
        )
