"""The session's fits on their way in and out: from a file, into an export, and what a model offers.

- :func:`fit_from_adata`: the velocity already stored in a dataset (written by
  ``explorer fit``, scVelo or an earlier export) as a :class:`~explorer.app.jobs.Fit`,
  through :meth:`explorer.VelocityResult.from_adata`;
- :func:`results_adata`: a copy of the data with a fit written under scVelo's and
  CellRank's keys, what the Export tab saves;
- :func:`load_dataset`: read a file and preprocess it as ``explorer fit`` does;
- :func:`model_names`, :func:`model_defaults`: the registered models and their
  parameters, read from :data:`explorer.models.MODELS` when a page is built;
  :func:`obs_key_columns`, :func:`obs_key_choices`: the dataset's columns a ``*_key``
  parameter can name;
- :func:`fit_fates`: a fit's terminal states and fate probabilities (a background job).
"""

from __future__ import annotations

import builtins
import dataclasses
import inspect
import sys
import typing
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from explorer._types import PREPROCESS, InputError, Progress
from explorer.app.jobs import Fit
from explorer.app.readouts import FateInfo, cluster_column, color_key, named_type_column
from explorer.data.io import read
from explorer.data.preprocess import is_preprocessed
from explorer.graph.streamlines import compute_streamlines
from explorer.graph.transition import drop_velocity_graphs, transition_matrix
from explorer.keys import Key
from explorer.models import MODELS
from explorer.models.base import VelocityResult
from explorer.pipeline import MIN_CELLS, Derived, derive, prepare

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from explorer._types import ProgressCallback

#: the model name of a fit read from a file that names none (velocity from another tool)
UNNAMED_MODEL = "velocity"


def model_names() -> list[str]:
    """List the models a Run can fit, as registered now (one registered later shows on the next page)."""
    return MODELS.keys()


def model_defaults(model: str) -> dict[str, Any]:
    """Return the constructor's keyword defaults of ``model`` (for the Run form)."""
    signature = inspect.signature(MODELS[model].__init__)
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if name != "self" and p.default is not inspect.Parameter.empty
    }


#: most distinct values a numeric column may hold to be offered as capture times
MAX_CAPTURE_TIMES = 50
#: cells whose values are looked at before a column's full count of distinct values
_PEEK = 10_000


def obs_key_columns(obs: pd.DataFrame | None) -> dict[str, list[str]]:
    """The obs columns a ``*_key`` parameter can name, by kind (computed once per dataset).

    ``"time"``: columns of 2 to :data:`MAX_CAPTURE_TIMES` distinct values that are all numbers
    (capture times are a few levels, such as days; a computed column such as a latent time or
    a score has one per cell), numeric or categorical (CellRank's dentate gyrus keeps
    ``age(days)`` as categories ``12`` and ``35``; VeloVAE and the vector field read either);
    ``"group"``: categorical and text columns (clusters). Boolean columns are neither.
    ``"types"``: the cell types' column under a usual name
    (:func:`~explorer.app.readouts.named_type_column`), if any.
    """
    out: dict[str, list[str]] = {"time": [], "group": [], "types": []}
    if obs is None:
        return out
    types = named_type_column(obs)
    if types is not None:
        out["types"].append(str(types))
    for column in obs.columns:
        values = obs[column]
        if pd.api.types.is_bool_dtype(values.dtype):
            continue
        numeric = pd.api.types.is_numeric_dtype(values.dtype)
        if not numeric:
            if not (isinstance(values.dtype, pd.CategoricalDtype) or pd.api.types.is_object_dtype(values.dtype)):
                continue
            out["group"].append(str(column))
        # capture times: a number for every cell, a few levels (a look at the first cells
        # first: at 10^6 cells a score's full unique() would cost the page build ~50 ms)
        if values.iloc[:_PEEK].nunique() > MAX_CAPTURE_TIMES:
            continue
        levels = values.unique()
        if values.isna().any() or not 2 <= len(levels) <= MAX_CAPTURE_TIMES:  # noqa: PLR2004
            continue
        if numeric or np.isfinite(pd.to_numeric(pd.Series(levels).astype(str), errors="coerce")).all():
            out["time"].append(str(column))
    return out


def obs_key_start(name: str, default: Any, columns: dict[str, list[str]]) -> Any:
    """The value the menu of ``*_key`` parameter ``name`` starts at (:func:`obs_key_choices`).

    The model's default, except for a group key (``cluster_key``) whose default column the
    data lacks: then the data's cell types' column, when one has a usual name (types under
    ``cell_type`` and no ``clusters``: DeepVelo's form starts at ``cell_type``; a batch
    column is never guessed).
    """
    types = [c for c in columns["types"] if c in columns["group"]]
    group_key = name.endswith("_key") and name != "time_key" and isinstance(default, str)
    if group_key and default not in columns["group"] and types:
        return types[0]
    return default


def obs_key_choices(name: str, default: Any, columns: dict[str, list[str]]) -> dict[str, Any] | None:
    """The menu ``{label: value}`` of a parameter ``name`` ending in ``_key``, else ``None``.

    ``time_key`` (capture times) offers ``columns["time"]``, any other ``*_key`` (clusters)
    ``columns["group"]`` (see :func:`obs_key_columns`); a parameter whose default is ``None``
    (optional) starts the menu with ``"(none)"``, and a default the data lacks stays on the
    menu: where :func:`obs_key_start` finds no cell types to start at instead, the form starts
    at the model's default and the model's own message explains the missing column.
    """
    if not name.endswith("_key"):
        return None
    menu: dict[str, Any] = {"(none)": None} if default is None else {}
    offered = columns["time" if name == "time_key" else "group"]
    if isinstance(default, str) and default not in offered:
        menu[default] = default
    menu.update({c: c for c in offered})
    return menu


def model_choices(model: str) -> dict[str, list[Any]]:
    """Return the parameters of ``model`` that take one of a few values, with those values (for menus).

    A ``Literal[...]`` annotation gives its values; a ``base`` parameter (a model another
    learns from, as ``vector_field``'s) the other registered models.
    """
    cls = MODELS[model]
    module = vars(sys.modules[cls.__module__])

    class Known(dict):
        """Names of the model's module; a name only type checkers import reads as ``Any``."""

        def __missing__(self, key: str) -> Any:
            return module.get(key, getattr(builtins, key, Any))

    out: dict[str, list[Any]] = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():

        def one() -> None: ...

        one.__annotations__ = {name: p.annotation}
        try:  # one parameter at a time: another's annotation may not evaluate at run time
            hint = typing.get_type_hints(one, globalns=module, localns=Known())[name]
        except (NameError, TypeError, AttributeError, SyntaxError):
            continue
        if typing.get_origin(hint) is typing.Literal:
            out[name] = list(typing.get_args(hint))
    if "base" in model_defaults(model):
        out["base"] = [m for m in model_names() if m != model]
    return out


def base_fit(model: str, params: dict[str, Any], fits: dict[str, Fit], *, active: str | None) -> Fit | None:
    """The session's fit that ``model`` (with a ``base`` parameter) can learn from instead of refitting it.

    The active fit when its model is the base, else the latest fit of that model; None for
    a model without a ``base`` or when the session has no fit of it.
    """
    defaults = model_defaults(model)
    if "base" not in defaults:
        return None
    base = params.get("base", defaults["base"])
    found = [f for f in fits.values() if f.result.model == base]
    if not found or base is None:
        return None
    chosen = fits.get(active) if active is not None else None
    return chosen if chosen is not None and chosen.result.model == base else found[-1]


def with_fit(adata: AnnData, fit: Fit) -> AnnData:
    """A light AnnData sharing ``adata``'s arrays, with ``fit`` written in (the data is never written to).

    What a model that learns from another fit's velocity reads (``layers['velocity']``,
    ``uns['velocity_params']``, ``obs['latent_time']``...) beside the data's layers,
    embeddings and neighbour graph.
    """
    light = AnnData(
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        layers=dict(adata.layers),
        obsm=dict(adata.obsm),
        obsp=dict(adata.obsp),
        uns={k: adata.uns[k] for k in (Key.uns.NEIGHBORS,) if k in adata.uns},
    )
    fit.result.to_adata(light, keep_derived=True)  # a working copy: the file's fates and graphs do no harm
    return light


def fit_from_adata(adata: AnnData) -> Fit | None:
    """Read the velocity stored in ``adata`` as a fit labelled ``"<model> (from file)"`` (None without one).

    The result is :meth:`~explorer.VelocityResult.from_adata` (a file that names no model
    gets :data:`UNNAMED_MODEL`), with its velocity as float32; the fit carries the stored
    transition matrix (``obsp['T_fwd']``, else one from the velocity graph), velocity
    confidence and projections ``obsm['velocity_<basis>']``. With both velocity graphs the
    app can project on another basis as ``explorer fit`` does (scVelo's signed kernel).
    """
    if Key.layers.VELOCITY not in adata.layers:
        return None
    result = VelocityResult.from_adata(adata, model=UNNAMED_MODEL)
    if result.velocity.dtype != np.float32:
        result = dataclasses.replace(result, velocity=result.velocity.astype(np.float32))
    graph, graph_neg = adata.obsp.get(Key.obsp.VELOCITY_GRAPH), adata.obsp.get(Key.obsp.VELOCITY_GRAPH_NEG)
    transitions = adata.obsp.get(Key.obsp.TRANSITIONS)
    if transitions is None and graph is not None:
        transitions = transition_matrix(graph, graph_neg)
    transitions = None if transitions is None else transitions.tocsr()
    confidence = (
        adata.obs[Key.obs.VELOCITY_CONFIDENCE].to_numpy(np.float32)
        if Key.obs.VELOCITY_CONFIDENCE in adata.obs
        else None
    )
    embedding = {
        key: np.asarray(adata.obsm[Key.obsm.velocity(key)])[:, :2]
        for key in adata.obsm
        if key.startswith("X_") and Key.obsm.velocity(key) in adata.obsm
    }
    derived = None
    if graph is not None and graph_neg is not None and transitions is not None:
        derived = Derived(
            graph=graph.tocsr(),
            graph_neg=graph_neg.tocsr(),
            transitions=transitions,
            velocity_embedding={},
            obs=pd.DataFrame(index=adata.obs_names),
            params={},
        )
    return Fit(
        label=f"{result.model} (from file)",
        key=(result.model, (("source", "'file'"),)),
        result=result,
        transitions=transitions,
        confidence=confidence,
        velocity_embedding=embedding,
        derived=derived,
    )


def results_adata(
    adata: AnnData, fit: Fit | None, fates: FateBasis | None = None, *, file_fit: bool = False
) -> AnnData:
    """Copy ``adata`` and write ``fit`` into the copy under scVelo's/CellRank's keys.

    ``fates``: the basis of the fit's fates computed in the session (:func:`fit_fates`),
    whose light AnnData holds what ``explorer fates`` writes; those keys are copied too.
    ``file_fit``: ``fit`` is the file's own, whose fates in the file are kept; another
    fit's export leaves them out (they came from the file's velocity).

    Returns
    -------
    A new AnnData: what ``VelocityResult.to_adata`` writes, plus what ``explorer fit``
    writes after the fit (velocity graphs, projection, confidence), obsp ``T_fwd``
    (CellRank's transition matrix), obsm ``velocity_<basis>`` and obs
    ``velocity_confidence`` when the fit has them; with ``fates``, CellRank 2's fates keys
    (macrostates, terminal and initial states, ``lineages_fwd``, absorption times,
    drivers, the coarse chain) and the fates' own kernel as ``T_fwd``, as ``explorer
    fates`` writes them. ``adata`` itself without a fit.
    """
    out = adata.copy()
    if fit is None:
        return out
    if not file_fit:
        drop_velocity_graphs(out)  # the file's, rewritten below for this fit: no warning of them
    fit.result.to_adata(out, keep_derived=file_fit)
    if fit.derived is not None:
        fit.derived.to_adata(out)
    if fit.transitions is not None:
        out.obsp[Key.obsp.TRANSITIONS] = fit.transitions
    for basis, v in fit.velocity_embedding.items():
        out.obsm[Key.obsm.velocity(basis)] = v
    if fit.confidence is not None:
        out.obs[Key.obs.VELOCITY_CONFIDENCE] = fit.confidence
    if fates is not None:
        _copy_fates(fates.light, out)
    return out


def _copy_fates(light: AnnData, out: AnnData) -> None:
    """Copy into ``out`` what the kernel and fates wrote into ``light`` (:func:`fit_fates` built it bare)."""
    column = cluster_column(light)
    for key in light.obs.columns:  # the same cells, in the same order
        if key != column:
            out.obs[key] = light.obs[key]
    for key in light.obsm:
        out.obsm[key] = light.obsm[key]
    for key in light.varm:
        out.varm[key] = light.varm[key]
    cluster_colors = Key.uns.colors(column) if column else None
    for key in light.uns:
        if key != cluster_colors:
            out.uns[key] = light.uns[key]
    # the fates' kernel (CellRank's VelocityKernel + ConnectivityKernel), which GPCCA.from_adata reads
    out.obsp[Key.obsp.TRANSITIONS] = light.obsp[Key.obsp.TRANSITIONS]


def load_dataset(path: Path, *, progress: ProgressCallback | None = None) -> AnnData:
    """Read a dataset file and preprocess it when it has no ``Ms``/``Mu`` yet (as ``explorer fit`` does)."""
    adata = read(path)
    if not is_preprocessed(adata) or Key.obsm.UMAP not in adata.obsm:
        if MIN_CELLS <= adata.n_obs < PREPROCESS.n_neighbors:
            # the app has no neighbours option: prepare's "pass n_neighbors=" could not be followed
            fewer = max(2, adata.n_obs // 3)
            msg = (
                f"too few cells for the app's kNN graph of {PREPROCESS.n_neighbors} neighbours: found "
                f"{adata.n_obs}. Prepare the file with fewer neighbours and open what it writes, e.g. "
                f"`explorer fit {path.name} --n-neighbors {fewer} --out {path.stem}_velocity.h5ad`, "
                "or load more cells."
            )
            raise InputError(msg)
        has_basis = any(k.startswith("X_") and k != Key.obsm.PCA for k in adata.obsm)
        prepare(adata, compute_umap=not has_basis, progress=progress)
    return adata


@dataclasses.dataclass(frozen=True, slots=True)
class FateBasis:
    """What :func:`fit_fates` keeps of a fit to choose its terminal states again without GPCCA.

    ``n_states``: the macrostates asked for; ``mode``: the velocity kernel's mode;
    ``light``: the light AnnData holding the fit's transition matrix (sharing the data's
    arrays); ``macro``: the macrostates found there
    (:class:`explorer.graph.fates.Macrostates`).
    """

    n_states: int
    mode: str
    light: AnnData
    macro: Any

    def serves(self, n_states: int, mode: str) -> bool:
        """Whether these macrostates are those of ``n_states`` asked for on a ``mode`` kernel."""
        return (self.n_states, self.mode) == (n_states, mode)

    def choices(self) -> list[tuple[str, float]]:
        """Each macrostate's name and coarse self-transition, to choose terminal states from."""
        stability = self.macro.stability()
        return [(str(name), float(stability[name])) for name in self.macro.names]


class NoTerminalStateFound(InputError):
    """No macrostate was stable enough to be terminal; ``basis`` holds them, to choose from."""

    def __init__(self, message: str, basis: FateBasis) -> None:
        super().__init__(message)
        self.basis = basis


def fit_fates(
    adata: AnnData,
    fit: Fit,
    *,
    n_states: int = 10,
    terminal_states: Sequence[str] | None = None,
    mode: str = "deterministic",
    basis: FateBasis | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[FateInfo, FateBasis]:
    """Terminal states and fate probabilities of ``fit``, as ``explorer fates`` computes them.

    CellRank's velocity kernel (``mode``: ``"deterministic"``, ``"stochastic"`` or
    ``"monte_carlo"``; correlation) mixed with 0.2 of the connectivity kernel
    (:func:`explorer.graph.kernels.compute_velocity_kernel`), then GPCCA macrostates,
    terminal states and absorption probabilities (:func:`explorer.graph.fates.compute_fates`,
    ``n_states`` macrostates, named after the clusters). Both write into a light AnnData
    that shares ``adata``'s arrays: the session's data is never written to. As ``explorer
    fates``, the stochastic and Monte Carlo modes use the fit's own velocity variance
    (``layers['velocity_variance']``, VeloVAE's posterior) where it has one, else the kNN
    estimate.

    ``terminal_states`` names the terminal states among the macrostates (default: those
    CellRank's stability rule finds); with the ``basis`` an earlier call returned for this
    fit, ``n_states`` and ``mode``, its kernel and macrostates are reused and only the absorption is
    computed.

    Returns
    -------
    The fates, and the basis to choose other terminal states from.

    Raises
    ------
    InputError
        Without a neighbour graph, or with unknown terminal states;
        :class:`NoTerminalStateFound`, carrying the macrostates to choose from, when no
        macrostate is stable enough to be terminal.
    """
    from explorer.graph.fates import STABILITY_THRESHOLD, NoTerminalState, compute_fates

    column = cluster_column(adata)
    if basis is None or not basis.serves(n_states, mode):
        light, macro, start = _fate_kernel(adata, fit, column, mode, progress), None, 0.3
    else:  # the kernel and macrostates again, into a light AnnData of its own (the earlier fates stay whole)
        light, macro, start = _kernel_only(basis.light, column), basis.macro, 0.0
    try:
        found = compute_fates(
            light,
            n_states=n_states,
            cluster_key=column,
            terminal_states=list(terminal_states) if terminal_states else None,
            macro=macro,
            progress=_share(progress, start, 1.0),
        )
    except NoTerminalState as err:
        offered = FateBasis(n_states, mode, light, err.macrostates)
        stability = ", ".join(f"{name} {value:.3f}" for name, value in offered.choices())
        msg = (
            f"No macrostate is stable enough to be terminal: their coarse self-transitions are "
            f"{stability}, under CellRank's threshold {STABILITY_THRESHOLD}. Choose the terminal "
            "states among them (terminal states, under Compute fates) and press Compute fates again, "
            "or ask for another number of macrostates."
        )
        raise NoTerminalStateFound(msg, offered) from err
    states = light.obs[Key.obs.TERMINAL_STATES]
    info = FateInfo(
        names=tuple(found.terminal_states),
        probabilities=np.asarray(found.fate_probabilities, dtype=np.float32),
        terminal=states.cat.codes.to_numpy().astype(np.int64),
        colors=color_key(light, Key.obs.TERMINAL_STATES),
        source=f"computed for {fit.label}" + ("" if mode == "deterministic" else f", {mode} kernel"),
        n_states=n_states,
        mode=mode,
        chosen=bool(terminal_states),
    )
    return info, FateBasis(n_states, mode, light, found.macrostates)


def _kernel_only(light: AnnData, column: str | None) -> AnnData:
    """A new light AnnData with ``light``'s inputs and kernel, none of its fates (arrays shared)."""
    uns_keys = (Key.uns.colors(column) if column else None, Key.uns.TRANSITIONS_PARAMS)
    return AnnData(
        X=light.X,
        obs=light.obs[[column]].copy() if column else pd.DataFrame(index=light.obs_names),
        var=light.var.copy(),
        layers=dict(light.layers),
        obsp={k: light.obsp[k] for k in (Key.obsp.CONNECTIVITIES, Key.obsp.TRANSITIONS)},
        uns={k: light.uns[k] for k in uns_keys if k in light.uns},
    )


def _share(progress: ProgressCallback | None, share0: float, share1: float) -> ProgressCallback | None:
    """``progress`` for a step that takes its reports' fractions from ``share0`` to ``share1``."""
    if progress is None:
        return None
    return lambda p: progress(
        Progress(int(1000 * (share0 + (share1 - share0) * p.fraction)), 1000, p.message)
    )


def _fate_kernel(
    adata: AnnData, fit: Fit, column: str | None, mode: str, progress: ProgressCallback | None
) -> AnnData:
    """A light AnnData sharing ``adata``'s arrays, with ``fit``'s ``mode`` velocity kernel."""
    from explorer.graph.kernels import compute_velocity_kernel

    if Key.obsp.CONNECTIVITIES not in adata.obsp:
        msg = (
            f"Fates need a neighbour graph (obsp['connectivities']); the data has {sorted(adata.obsp)}. "
            "Open a file preprocessed by `explorer fit`."
        )
        raise InputError(msg)
    result = fit.result
    light = AnnData(
        X=adata.X,
        obs=adata.obs[[column]].copy() if column else pd.DataFrame(index=adata.obs_names),
        var=pd.DataFrame(
            {Key.var.VELOCITY_GENES: np.asarray(result.velocity_genes, dtype=bool)}, index=adata.var_names
        ),
        layers={Key.layers.MS: adata.layers[Key.layers.MS], Key.layers.VELOCITY: result.velocity},
        obsp={Key.obsp.CONNECTIVITIES: adata.obsp[Key.obsp.CONNECTIVITIES]},
        uns={Key.uns.colors(column): adata.uns[Key.uns.colors(column)]}
        if column and Key.uns.colors(column) in adata.uns
        else {},
    )

    # a model that gives a velocity distribution (VeloVAE's posterior) feeds it in, as `explorer fates`
    variance = result.layers.get(Key.layers.VELOCITY_VARIANCE) if mode != "deterministic" else None
    if variance is not None:
        light.layers[Key.layers.VELOCITY_VARIANCE] = variance
    compute_velocity_kernel(
        light,
        mode=mode,
        variance_key=Key.layers.VELOCITY_VARIANCE if variance is not None else None,
        progress=_share(progress, 0.0, 0.3),
    )
    return light


def fit_diagnostics(adata: AnnData, fit: Fit, *, progress: ProgressCallback | None = None) -> pd.DataFrame:
    """Per-gene trust flags of ``fit`` (:func:`explorer.diagnostics.gene_diagnostics`), a background job.

    The fit is written into a light AnnData sharing ``adata``'s arrays (the data is never
    written to); no stability refits (they cost fits).

    Returns
    -------
    DataFrame indexed by ``var_names`` with ``diag_flagged`` (bool) and ``diag_flag_reason``
    (comma-joined reasons: ``differential_kinetics``, ``boost``, ``unstable``).
    """
    from explorer.diagnostics import gene_diagnostics

    if progress is not None:
        progress(Progress(0, 1, "trust diagnostics"))
    light = AnnData(
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        layers={k: adata.layers[k] for k in (Key.layers.MS, Key.layers.MU)},
        obsp=dict(adata.obsp),
        obsm=dict(adata.obsm),
    )
    fit.result.to_adata(light)
    table = gene_diagnostics(light, groupby=cluster_column(adata), write=False)
    if progress is not None:
        progress(Progress(1, 1, "trust diagnostics"))
    return table[[Key.var.DIAG_FLAGGED, Key.var.DIAG_FLAG_REASON]].copy()


def without_genes(
    adata: AnnData,
    fit: Fit,
    drop: np.ndarray,
    *,
    basis: str,
    label: str,
    progress: ProgressCallback | None = None,
) -> Fit:
    """``fit`` with the genes ``drop`` (a ``(n_vars,)`` mask) taken out of its velocity genes, re-derived.

    The velocity graph, transitions, projection, confidence and streamlines are recomputed
    by :func:`explorer.pipeline.derive` (what ``explorer fit`` runs after a fit) on the
    remaining velocity genes; the per-gene fit itself is kept.
    """
    genes = np.asarray(fit.result.velocity_genes, dtype=bool) & ~np.asarray(drop, dtype=bool)
    if not genes.any():
        msg = "Every velocity gene is flagged: nothing would be left to compute velocity from."
        raise InputError(msg)
    result = dataclasses.replace(fit.result, velocity_genes=genes)
    key = (fit.key[0], (*fit.key[1], ("without_genes", repr(tuple(np.flatnonzero(drop))))))
    out = Fit(label=label, key=key, result=result)
    if Key.obsp.DISTANCES in adata.obsp:
        derived = derive(adata, result, basis=basis, progress=progress)
        out.derived = derived
        out.transitions = derived.transitions
        out.confidence = derived.confidence
        out.velocity_embedding = {k: v[:, :2] for k, v in derived.velocity_embedding.items()}
        for k, v in out.velocity_embedding.items():
            out.streamlines[k] = compute_streamlines(np.asarray(adata.obsm[k])[:, :2], v)
    return out
