"""One browser session's state: its parameters, its intent methods and its running job.

:class:`ExplorerState` holds everything a user can change or select (gene, cell,
selected cells, active model, colouring, embedding) and the session's fits; views
render from its parameters and change them only through its intent methods
(:meth:`~ExplorerState.select_gene`, :meth:`~ExplorerState.select_cell`,
:meth:`~ExplorerState.select_cells`, :meth:`~ExplorerState.run_model`, ...). The data
itself may be shared read-only between sessions: nothing here writes into
``state.adata``; fits live in ``state.results`` and are written only into a copy on
export.

What the views show is computed by the pure functions of :mod:`explorer.app.readouts`
(geometry in :mod:`explorer.app.geometry`, files in :mod:`explorer.app.fits`); the
state's accessors (``gene_values``, ``coloring``, ``phase_fits``, ...) only pass them
the session's data, fit and selection and remember the results in a bounded
:class:`~explorer.app.memo.Memo`. Nothing in this module draws or imports Panel.
"""

from __future__ import annotations

import contextlib
import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import param
from anndata import AnnData

from explorer._types import InputError, Progress
from explorer.app import readouts
from explorer.app.files import DATASET_SUFFIXES, export_target, is_dataset, resolve_under, write_new
from explorer.app.fits import (
    NoTerminalStateFound,
    fit_diagnostics,
    base_fit,
    fit_fates,
    fit_from_adata,
    load_dataset,
    model_defaults,
    results_adata,
    with_fit,
    without_genes,
)
from explorer.app.geometry import even_sample, nearest, points_in_box, points_in_polygon, time_bins
from explorer.app.jobs import Fit, Job, fit_and_derive, fit_key, fit_label
from explorer.app.memo import Memo, shared_memo
from explorer.app.readouts import (
    COLOR_CONFIDENCE,
    COLOR_EXPRESSION,
    COLOR_LATENT_TIME,
    COLOR_RATES,
    COLOR_UNCERTAINTY,
    COLOR_VELOCITY,
    CONTINUOUS_COLORINGS,
    CellInfo,
    Coloring,
    PhaseFit,
)
from explorer.data.io import read_column, write
from explorer.graph.fates import DEFAULT_N_STATES, default_n_states
from explorer.graph.transition import random_walks
from explorer.keys import Key
from explorer.models import MODELS
from explorer.pipeline import derive

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable

    import pandas as pd

    from explorer.app.fits import FateBasis

__all__ = [
    "COLOR_CONFIDENCE",
    "COLOR_EXPRESSION",
    "COLOR_LATENT_TIME",
    "COLOR_RATES",
    "COLOR_UNCERTAINTY",
    "COLOR_VELOCITY",
    "CONTINUOUS_COLORINGS",
    "CellInfo",
    "Coloring",
    "ExplorerState",
    "PhaseFit",
    "load_dataset",
    "model_defaults",
]

#: a gene's curve along latent time is averaged over at most this many cells (an even sample)
CURVE_CELLS = 100_000
#: a stored velocity without its velocity graph gets one computed on opening up to this many
#: cells (ExplorerState._derive_stored: once for the sessions opening it meanwhile); above it, the
#: job would take minutes and gigabytes on opening (`explorer fit` computes it)
AUTO_GRAPH_CELLS = 200_000

#: results one session remembers (a few genes' columns, colourings, time bins, the arrow
#: grid, the agreement of two fits): each up to a few MB at a million cells
SESSION_MEMO_ITEMS = 16
#: read-outs computed in the background one session remembers (reconstruction, metrics tables)
BACKGROUND_ITEMS = 6
#: random walks started from a clicked cell, and their length (CellRank's plot_random_walks: 100 x 100)
N_WALKS, N_WALK_STEPS = 100, 100
#: per-fit objects one session keeps besides the memo (rebuilt vector fields, lineages)
FIT_MEMO_ITEMS = 6
#: a page opens on the best-fitted of this many velocity genes that is expressed (Ms above 0)
#: in at least this share of the cells (ExplorerState._default_gene)
_DEFAULT_GENE_CANDIDATES, _DEFAULT_GENE_MIN_SHARE = 20, 0.1


class ExplorerState(param.Parameterized):
    """Everything one browser session can select or change, and its fitted models.

    Views depend on these parameters and call the intent methods; they never set
    parameters on each other. ``adata`` is treated as read-only (it may be shared
    between sessions).
    """

    adata = param.ClassSelector(class_=AnnData, allow_None=True, doc="The dataset (read-only).")
    dataset = param.String(default="", doc="Name of the dataset shown.")
    dataset_path = param.ClassSelector(class_=Path, allow_None=True, doc="File the dataset came from.")
    data_dir = param.ClassSelector(
        class_=Path, default=Path("."), doc="The only folder read from or written to."
    )
    basis = param.Selector(default=None, objects=[], allow_None=True, doc="Embedding key (X_umap, ...).")
    gene = param.String(default=None, allow_None=True, doc="The selected gene.")
    cell = param.Integer(default=None, allow_None=True, doc="Index of the selected cell.")
    selected = param.Array(default=np.empty(0, dtype=np.int64), doc="Indices of the selected group of cells.")
    color_by = param.Selector(default=None, objects=[], allow_None=True, doc="What colours the cells.")
    results = param.Dict(default={}, doc="Fits of this session by label.")
    model = param.Selector(default=None, objects=[], allow_None=True, doc="Label of the active fit.")
    compare_a = param.Selector(default=None, objects=[], allow_None=True, doc="First fit compared.")
    compare_b = param.Selector(default=None, objects=[], allow_None=True, doc="Second fit compared.")
    show_streamlines = param.Boolean(default=True, doc="Draw velocity streamlines on the embedding.")
    show_arrows = param.Boolean(default=False, doc="Draw velocity arrows on a grid.")
    n_targets = param.Integer(
        default=5, bounds=(1, 30), doc="Most likely next cells shown for the selected cell."
    )
    fates = param.Dict(default={}, doc="Fates computed in this session, by fit label (readouts.FateInfo).")
    diagnostics = param.Dict(default={}, doc="Per-gene trust flags computed in this session, by fit label.")
    fate_states = param.Integer(
        default=DEFAULT_N_STATES,
        bounds=(2, 30),
        doc="Macrostates that Compute fates looks for (`explorer fates --n-states`).",
    )
    fate_mode = param.Selector(
        default="deterministic",
        objects=["deterministic", "stochastic", "monte_carlo"],
        doc="Velocity kernel mode Compute fates uses (`explorer fates --mode`); stochastic and "
        "monte_carlo use the fit's velocity variance (VeloVAE's posterior) where it has one.",
    )
    fate_terminal = param.List(
        default=[],
        item_type=str,
        doc="Terminal states Compute fates uses, among the active fit's macrostates "
        "(`explorer fates --terminal-states`); empty: those CellRank's stability rule finds.",
    )
    fate_bases = param.Dict(
        default={},
        doc="By fit label, the kernel and macrostates of its last Compute fates (fits.FateBasis): "
        "the terminal states are chosen among them.",
    )
    walks = param.Parameter(default=None, doc="The last random walks from a cell (readouts.RandomWalks).")
    trajectory = param.Parameter(
        default=None, doc="The selected cell's path on the active fit's vector field (readouts.Trajectory)."
    )
    perturbation = param.Parameter(
        default=None, doc="The last in-silico perturbation on a vector field (readouts.PerturbationRun)."
    )
    metric_transitions = param.String(
        default="", doc="Transitions 'A>B, C>D' between clusters that the metrics table scores (CBDir)."
    )
    readout_revision = param.Integer(
        default=0, precedence=-1, doc="Counts read-outs finished in the background (views redraw on it)."
    )
    status = param.String(default="", doc="What is going on, in words.")
    progress = param.Number(default=0.0, bounds=(0.0, 1.0), doc="Progress of the running job.")
    running = param.Boolean(default=False, doc="Whether a job runs.")
    error = param.String(default="", doc="Last error message, for the page to show.")
    #: a model's notes on its data: the warnings the last finished job logged
    notices = param.List(default=[], item_type=str, doc="The warnings the last finished job logged.")
    dispatch = param.Callable(
        default=None, precedence=-1, doc="Sends a job's callbacks to the session's event loop."
    )
    batch = param.Callable(
        default=None,
        precedence=-1,
        doc="Returns a context manager that groups the page updates of one action (the app: Panel's hold).",
    )

    def __init__(self, adata: AnnData | None = None, **params: Any) -> None:
        super().__init__(**params)
        self._job: Job | None = None
        self._memo = Memo(SESSION_MEMO_ITEMS)
        #: read-outs computed off the event loop (:meth:`_background`), and those under way
        self._computed = Memo(BACKGROUND_ITEMS)
        self._pending: dict[Hashable, Job] = {}
        #: per fit: its rebuilt vector field (by basis) and its lineages
        self._per_fit = Memo(FIT_MEMO_ITEMS)
        #: what every session computes alike from the same dataset (see :func:`shared_memo`)
        self._shared = Memo(1)
        #: the fit the comparison's A was last set to by a new fit (:meth:`_add_fit`); another
        #: value there was picked in the Compare tab, and stays
        self._placed_a: str | None = None
        #: by fit label, the kernel, macrostates and fates keys of its fates shown (for the export)
        self._fates_written: dict[str, FateBasis] = {}
        if adata is not None:
            self.set_data(adata, name=self.dataset or "data", path=self.dataset_path)
        # a click on a cell integrates its path when the active fit has a vector field
        self.param.watch(self._follow_cell, ["cell", "model", "basis", "results"])
        # another fit or number of macrostates: the terminal states offered are no longer these
        self.param.watch(self._follow_fates, ["model", "fate_states", "fate_mode"])

    def _batched(self) -> contextlib.AbstractContextManager[Any]:
        """One page update for everything an action changes (a no-op outside the app)."""
        return self.batch() if self.batch is not None else contextlib.nullcontext()

    def _remember(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        return self._memo.get(key, compute)

    # ------------------------------------------------------------------ data
    def set_data(self, adata: AnnData, *, name: str, path: Path | None = None) -> None:
        """Show ``adata`` (needs layers ``Ms``/``Mu`` and an ``X_*`` embedding); resets selections, fits."""
        missing = [k for k in (Key.layers.MS, Key.layers.MU) if k not in adata.layers]
        bases = [k for k in adata.obsm if k.startswith("X_") and np.asarray(adata.obsm[k]).shape[1] >= 2]  # noqa: PLR2004
        if missing or not bases:
            msg = (
                f"The dataset {name!r} cannot be shown: expected layers 'Ms' and 'Mu' and an embedding "
                f"obsm['X_*']; found layers {sorted(adata.layers)} and obsm {sorted(adata.obsm)}. "
                "Preprocess it (`explorer fit` does) or open a raw file, which the app preprocesses."
            )
            raise InputError(msg)
        self._memo.clear()
        self._fates_written = {}
        self._computed.clear()
        self._per_fit.clear()
        self._shared = shared_memo(adata)
        # one Fit for every session: its streamlines and projections are computed once
        stored = self._shared.get("stored fit", lambda: fit_from_adata(adata))
        fits: dict[str, Fit] = {stored.label: stored} if stored is not None else {}
        preferred = Key.obsm.UMAP if Key.obsm.UMAP in bases else bases[0]
        # the cells coloured by their types (readouts.cluster_column), as a categorical colouring
        types = readouts.cluster_column(adata)
        default_color = types if types is not None and readouts.is_categorical(adata.obs[types]) else None
        if default_color is None:
            categorical = [c for c in adata.obs.columns if readouts.is_categorical(adata.obs[c])]
            default_color = categorical[0] if categorical else COLOR_EXPRESSION
        labels = list(fits)
        with self._batched(), param.parameterized.batch_call_watchers(self):
            self.param.basis.objects = bases
            self.param.color_by.objects = readouts.color_options(adata, fits, self._all_fates({}, adata))
            for p in (self.param.model, self.param.compare_a, self.param.compare_b):
                p.objects = labels
            self.param.update(
                fates={},
                fate_bases={},
                fate_terminal=[],
                diagnostics={},
                walks=None,
                trajectory=None,
                perturbation=None,
                fate_states=default_n_states(adata.n_obs),
                adata=adata,
                dataset=name,
                dataset_path=path,
                basis=preferred,
                color_by=default_color,
                results=fits,
                model=labels[0] if labels else None,
                compare_a=labels[0] if labels else None,
                compare_b=None,
                cell=None,
                selected=np.empty(0, dtype=np.int64),
                gene=self._default_gene(adata, stored),
                error="",
                status=f"{name}: {adata.n_obs:,} cells x {adata.n_vars:,} genes",
            )
        self._placed_a = self.compare_a

    @staticmethod
    def _default_gene(adata: AnnData, fit: Fit | None) -> str:
        """The fit's best velocity gene by its goodness of fit, else its first velocity gene.

        Of the :data:`_DEFAULT_GENE_CANDIDATES` best, the first whose ``Ms`` is above 0 in
        at least :data:`_DEFAULT_GENE_MIN_SHARE` of the cells (else the best): a stored
        steady-state fit of the 3,696-cell pancreas opened on Stmn2 (R² 0.996), above 0 in
        5% of the cells, a phase portrait of 31 points on a line and the rest at the origin
        (until 2026-12-05; now Ghrl).
        """
        if fit is not None:
            trusted = np.asarray(fit.result.velocity_genes, dtype=bool)
            if fit.result.likelihood is not None:
                like = fit.result.likelihood.where(trusted).dropna()
                if len(like):
                    ranked = like.sort_values(ascending=False, kind="stable").index
                    ms = adata.layers.get(Key.layers.MS)
                    for gene in ranked[:_DEFAULT_GENE_CANDIDATES] if ms is not None else ():
                        column = readouts.dense_column(ms, adata.var_names.get_loc(gene))
                        if np.mean(column > 0) >= _DEFAULT_GENE_MIN_SHARE:
                            return str(gene)
                    return str(ranked[0])
            if trusted.any():  # no figure to rank by: at least a gene it fitted
                return str(adata.var_names[np.argmax(trusted)])
        return str(adata.var_names[0])

    def load(self, name: str) -> Job | None:
        """Open the dataset file ``name`` (relative to ``data_dir``) in the background.

        Raw files are preprocessed as ``explorer fit`` does. Progress goes to
        ``progress``/``status``; a bad file leaves the current dataset and sets ``error``
        to the same message the CLI prints.
        """
        try:
            path = resolve_under(self.data_dir, name)
            if path.suffix.lower() not in DATASET_SUFFIXES:
                msg = f"Expected a dataset file ending in {', '.join(DATASET_SUFFIXES)}; found {name!r}."
                raise InputError(msg)  # noqa: TRY301 - one place turns input errors into the message
            if not is_dataset(path):
                msg = f"No file {name!r} in the data directory {Path(self.data_dir).resolve()}."
                raise InputError(msg)  # noqa: TRY301
        except InputError as err:
            self.error = str(err)
            return None
        return self._start(
            lambda progress: load_dataset(path, progress=progress),
            on_done=lambda adata: self._loaded(adata, name, path),
            what=f"loading {name}",
        )

    def _loaded(self, adata: AnnData, name: str, path: Path) -> None:
        try:
            self.set_data(adata, name=name, path=path)
        except InputError as err:
            self.error = str(err)

    # ----------------------------------------------------------- selection
    def select_gene(self, name: str) -> None:
        """Make ``name`` the selected gene (exact name, else the one case-insensitive match)."""
        names = self.adata.var_names
        folded = [] if name in names else [g for g in names if g.lower() == str(name).strip().lower()]
        if name in names or len(folded) == 1:
            with self._batched():
                self.gene = str(name) if name in names else str(folded[0])
            return
        query = str(name).strip().lower()
        close = [g for g in names if query and query in g.lower()][:5] or difflib.get_close_matches(
            str(name), [str(g) for g in names], n=5
        )
        hint = f" Similar names: {', '.join(close)}." if close else ""
        msg = f"Gene {name!r} not found among the {len(names):,} genes of {self.dataset}.{hint}"
        raise InputError(msg)

    def select_cell(self, index: int | None) -> None:
        """Make cell ``index`` (a row of ``adata``) the selected cell; None clears it."""
        if index is not None:
            index = int(index)
            if not 0 <= index < self.adata.n_obs:
                msg = f"Cell index {index} is out of range; the dataset has {self.adata.n_obs:,} cells."
                raise InputError(msg)
        with self._batched():
            self.cell = index

    def select_cells(self, indices: Any) -> None:
        """Make ``indices`` (rows of ``adata``) the selected group of cells; empty clears it."""
        idx = np.unique(np.asarray(indices, dtype=np.int64).ravel())
        if idx.size and (idx[0] < 0 or idx[-1] >= self.adata.n_obs):
            msg = f"Cell indices must lie in [0, {self.adata.n_obs}); found {idx[0]}..{idx[-1]}."
            raise InputError(msg)
        with self._batched():
            self.selected = idx

    def select_cell_at(
        self,
        where: Literal["embedding", "phase", "time"],
        x: float,
        y: float,
        *,
        what: Literal["Ms", "Mu", "velocity"] = "Ms",
    ) -> int:
        """Select the cell nearest to a click at ``(x, y)`` on a plot; returns its index.

        ``where`` names the plot: the embedding, the phase portrait (``Ms``, ``Mu``) or
        the time view (latent time against ``what``).
        """
        if where == "embedding":
            xy = self.embedding()
            index = nearest(xy[:, 0], xy[:, 1], x, y)
        elif where == "phase":
            index = nearest(self.gene_values("Ms"), self.gene_values("Mu"), x, y)
        else:
            t = self.latent_time()
            if t is None:
                msg = "The time view has no latent time to pick a cell by; run a model that has one."
                raise InputError(msg)
            index = nearest(t, self.gene_values(what), x, y)
        self.select_cell(index)
        return index

    def select_cells_in(
        self, *, bounds: tuple[float, float, float, float] | None = None, polygon: Any = None
    ) -> None:
        """Select the cells of the embedding inside a box ``(x0, y0, x1, y1)`` or a lasso polygon."""
        xy = self.embedding()
        if polygon is not None and len(polygon) >= 3:  # noqa: PLR2004 - a polygon needs three vertices
            self.select_cells(points_in_polygon(xy[:, 0], xy[:, 1], polygon))
        elif bounds is not None:
            self.select_cells(points_in_box(xy[:, 0], xy[:, 1], bounds))

    def select_gene_near(
        self, x: float, y: float, *, plot: Literal["quality", "reconstruction"] = "quality"
    ) -> str | None:
        """Select the gene nearest to a click on an A-against-B plot (fit quality, log10 MSE)."""
        if plot == "reconstruction":
            found = self.compare_reconstruction()
            table = None if found is None else found.table
        else:
            table = self.compare_quality()
        if table is None or table.empty:
            return None
        a, b = table["a"].to_numpy(dtype=float), table["b"].to_numpy(dtype=float)
        if plot == "reconstruction":
            a, b = readouts.log10_positive(a), readouts.log10_positive(b)
        i = nearest(a, b, x, y)
        self.select_gene(table["gene"].iloc[i])
        return self.gene

    # ---------------------------------------------------------------- runs
    def run_model(self, model: str, **params: Any) -> Job | None:
        """Fit ``model`` with ``params`` in the background; None if it is cached (then it becomes active).

        The fit lands in ``results`` (keyed by model and parameters) and becomes the
        active model; progress goes to ``progress``, failures to ``error``.
        """
        if model not in MODELS:
            self.error = f"Invalid model {model!r}. Valid options are: {', '.join(MODELS.keys())}."
            return None
        if self.running:
            self.error = "A job is already running; wait for it or press Cancel."
            return None
        key = fit_key(model, params)
        for label, fit in self.results.items():
            if fit.key == key:
                self.model = label
                self.status = f"{label}: cached"
                return None
        label = fit_label(model, params, model_defaults(model))
        adata, basis = self.adata, self.basis
        # a model that learns from another's fit (vector_field's base) uses the session's, not a refit
        base = base_fit(model, params, self.results, active=self.model)
        if base is not None:
            others = {k: v for k, v in params.items() if k != "base"}
            label = f"{fit_label(model, others, model_defaults(model))} on {base.label}"
            key = (key[0], (*key[1], ("base fit", repr(base.key))))
            for name, fit in self.results.items():
                if fit.key == key:
                    self.model = name
                    self.status = f"{name}: cached"
                    return None

        def fit(progress: Callable[[Progress], None]) -> Fit:
            data = adata if base is None else with_fit(adata, base)
            found = fit_and_derive(data, model, params, basis=basis, label=label, progress=progress)
            found.key = key
            return found

        return self._start(fit, on_done=self._add_fit, what=f"fitting {label}")

    def _add_fit(self, fit: Fit) -> None:
        results = {**self.results, fit.label: fit}
        labels = list(results)
        bases = list(self.param.basis.objects)
        bases += [b for b in readouts.fit_bases(fit) if b not in bases]
        with self._batched(), param.parameterized.batch_call_watchers(self):
            self.param.basis.objects = bases
            for p in (self.param.model, self.param.compare_a, self.param.compare_b):
                p.objects = labels
            self.param.color_by.objects = readouts.color_options(self.adata, results, self._all_fates())
            previous = self.model
            new = bool(previous) and previous != fit.label
            # B: the new fit; A: the fit shown before it (a refit with other parameters is
            # compared with the one it varies), unless A was picked in the Compare tab since
            # (until 2026-12-04 A stayed the first fit: the file's, for the sample)
            compare_a = self.compare_a
            if compare_a is None or compare_a == self._placed_a:
                compare_a = previous if new else compare_a or fit.label
                self._placed_a = compare_a
            self.param.update(
                results=results,
                model=fit.label,
                compare_a=compare_a,
                compare_b=fit.label if new else self.compare_b,
            )

    def cancel_run(self) -> None:
        """Stop the running job at its next progress report."""
        if self._job is not None and self._job.running:
            self._job.cancel()
            self.status = "cancelling..."

    def stop_job(self) -> None:
        """Ask the running job to stop, changing nothing else (the page may be gone: its tab closed)."""
        if self._job is not None:
            self._job.cancel()

    def release(self) -> None:
        """Let go of the data, fits and caches (the session ended); stops a running job.

        No watcher runs: the views are not redrawn (their page is gone).
        """
        self.stop_job()
        self._job = None
        self._memo.clear()
        self._fates_written = {}
        self._computed.clear()
        self._per_fit.clear()
        self._pending = {}
        self._shared = Memo(1)
        with param.parameterized.discard_events(self):
            self.param.update(
                fates={},
                fate_bases={},
                fate_terminal=[],
                diagnostics={},
                walks=None,
                trajectory=None,
                perturbation=None,
                results={},
                model=None,
                compare_a=None,
                compare_b=None,
                cell=None,
                selected=np.empty(0, dtype=np.int64),
                adata=None,
                dispatch=None,
                batch=None,
            )

    @property
    def job(self) -> Job | None:
        """The last job started in this session."""
        return self._job

    def _start(
        self,
        target: Callable[..., Any],
        *,
        on_done: Callable[[Any], None],
        what: str,
        on_failed: Callable[[BaseException], None] | None = None,
    ) -> Job:
        def progress(p: Progress) -> None:
            self.param.update(progress=p.fraction, status=f"{what}: {p.message}" if p.message else what)

        def done(value: Any) -> None:
            notices = list(dict.fromkeys(job.warnings))
            self.param.update(running=False, progress=1.0, status=f"{what}: done", notices=notices)
            on_done(value)

        def failed(err: BaseException) -> None:
            message = (
                str(err) if isinstance(err, InputError) else f"{what} failed: {type(err).__name__}: {err}"
            )
            # what explorer warned on the way stays readable beside the error (a refusal of
            # fates came without the warning that 6 macrostates had become 5)
            notices = list(dict.fromkeys(job.warnings))
            self.param.update(
                running=False, progress=0.0, status=f"{what}: failed", error=message, notices=notices
            )
            if on_failed is not None:
                on_failed(err)

        def cancelled() -> None:
            self.param.update(running=False, progress=0.0, status=f"{what}: cancelled")

        self.param.update(running=True, progress=0.0, status=what, error="", notices=[])
        job = self._job = Job(
            target,
            on_progress=progress,
            on_done=done,
            on_error=failed,
            on_cancelled=cancelled,
            dispatch=self.dispatch,
            name=f"explorer-{what}",
        )
        return job.start()

    # ------------------------------------------------------ fates and walks
    def file_fates(self, adata: AnnData | None = None) -> readouts.FateInfo | None:
        """Return the fates stored in the dataset (``explorer fates`` or CellRank wrote them), or None."""
        adata = self.adata if adata is None else adata
        return self._shared.get("file fates", lambda: readouts.fates_from_adata(adata))

    def _all_fates(
        self, computed: dict[str, readouts.FateInfo] | None = None, adata: AnnData | None = None
    ) -> list[readouts.FateInfo]:
        found = [self.file_fates(adata), *(self.fates if computed is None else computed).values()]
        return [f for f in found if f is not None]

    def active_fates(self) -> readouts.FateInfo | None:
        """Fates of the active fit if computed in this session, else the file's, else None."""
        fit = self.fit
        if fit is not None and fit.label in self.fates:
            return self.fates[fit.label]
        return self.file_fates()

    def compute_fates(self, *, n_states: int | None = None) -> Job | None:
        """Compute the active fit's terminal states and fate probabilities in the background.

        As ``explorer fates`` (:func:`explorer.app.fits.fit_fates`); progress goes to
        ``progress``, failures to ``error``. When done, the fates join ``fates`` and the
        cells are coloured by the terminal states found. ``n_states``: macrostates
        (default: ``fate_states``), on a ``fate_mode`` velocity kernel; the terminal states
        are ``fate_terminal`` where it names some of the macrostates the fit's last
        computation found (only the absorption is computed again), else those stable
        enough. Fates already computed with these settings are reused; other settings
        compute them again.
        """
        n_states = self.fate_states if n_states is None else int(n_states)
        fit = self.fit
        if fit is None:
            self.error = "Fates need a velocity fit: run a model first."
            return None
        if self.running:
            self.error = "A job is already running; wait for it or press Cancel."
            return None
        mode = self.fate_mode
        basis = self._basis_for(fit.label, n_states, mode)
        offered = set(basis.macro.names) if basis is not None else set()
        terminal = [t for t in self.fate_terminal if t in offered]
        found = self.fates.get(fit.label)
        if found is not None and found.answers(n_states, terminal, mode):
            # the boxes offer these fates' macrostates again (a failed try with others replaced them)
            self.fate_bases = {**self.fate_bases, fit.label: self._fates_written[fit.label]}
            self.color_by = readouts.COLOR_TERMINAL
            self.status = f"fates of {fit.label}: cached"
            return None
        adata = self.adata
        return self._start(
            lambda progress: fit_fates(
                adata,
                fit,
                n_states=n_states,
                terminal_states=terminal,
                mode=mode,
                basis=basis,
                progress=progress,
            ),
            on_done=lambda done: self._add_fates(fit.label, *done),
            on_failed=lambda err: self._offer_macrostates(fit.label, err),
            what=f"fates of {fit.label}",
        )

    def terminal_choices(self) -> list[tuple[str, float]]:
        """The macrostates to choose the active fit's terminal states from, with their stability.

        Each macrostate's name and coarse self-transition, from the fit's last Compute fates
        with the current number of macrostates (also one that found none stable enough);
        empty before it.
        """
        fit = self.fit
        basis = self._basis_for(fit.label, self.fate_states, self.fate_mode) if fit is not None else None
        return [] if basis is None else basis.choices()

    def _basis_for(self, label: str, n_states: int, mode: str) -> FateBasis | None:
        """Kernel and macrostates of ``label``'s fates for these settings: its last try, else its fates shown."""
        for basis in (self.fate_bases.get(label), self._fates_written.get(label)):
            if basis is not None and basis.serves(n_states, mode):
                return basis
        return None

    def _add_fates(self, label: str, found: readouts.FateInfo, basis: FateBasis) -> None:
        fates = {**self.fates, label: found}
        self._fates_written[label] = basis
        with self._batched(), param.parameterized.batch_call_watchers(self):
            self.param.color_by.objects = readouts.color_options(
                self.adata, self.results, self._all_fates(fates)
            )
            self.param.update(
                fates=fates,
                fate_bases={**self.fate_bases, label: basis},
                color_by=readouts.COLOR_TERMINAL if self.model == label else self.color_by,
            )
            if self.model == label:
                self.fate_terminal = list(found.names)
        how = "chosen" if found.chosen else "stable enough"
        self.status = f"fates of {label}: terminal states ({how}) {', '.join(found.names)}"

    def _offer_macrostates(self, label: str, err: BaseException) -> None:
        """No macrostate was stable enough: offer them all (``terminal_choices``) to choose from."""
        if isinstance(err, NoTerminalStateFound):
            with self._batched(), param.parameterized.batch_call_watchers(self):
                self.fate_bases = {**self.fate_bases, label: err.basis}
                if self.model == label:
                    self.fate_terminal = []

    def _follow_fates(self, *_: Any) -> None:
        """The terminal states shown: the active fit's fates with these macrostates, else none chosen."""
        fit = self.fit
        found = self.fates.get(fit.label) if fit is not None else None
        self.fate_terminal = (
            list(found.names)
            if found is not None and (found.n_states, found.mode) == (self.fate_states, self.fate_mode)
            else []
        )

    def start_walks(
        self, index: int | None = None, *, n_walks: int = N_WALKS, n_steps: int = N_WALK_STEPS
    ) -> None:
        """Random walks from cell ``index`` (default: the selected one) on the active fit's transitions.

        :func:`explorer.graph.transition.random_walks` (seeded), kept in ``walks`` with the
        clusters they end in; None clears them.
        """
        index = self.cell if index is None else index
        fit = self.fit
        if index is None:
            with self._batched():
                self.walks = None
            return
        if fit is None or fit.transitions is None:
            self.error = "Random walks need a transition matrix: run a model on data with a neighbour graph."
            return
        walks = random_walks(fit.transitions, int(index), n_steps=n_steps, n_walks=n_walks, seed=0)
        found = readouts.RandomWalks(
            start=int(index), walks=walks, ends=readouts.walk_ends(self.adata, walks), fit=fit.label
        )
        with self._batched():
            self.walks = found

    def walk_paths(self) -> list[np.ndarray]:
        """Return the walks to draw on the current basis (the first 30), or none."""
        if self.walks is None:
            return []
        return readouts.walk_paths(self.embedding(), self.walks.walks)

    def cell_fates(self, index: int | None = None) -> pd.DataFrame | None:
        """Cell ``index``'s (default: the selected one's) fate probabilities under :meth:`active_fates`."""
        index = self.cell if index is None else index
        return None if index is None else readouts.cell_fates(self.active_fates(), index)

    # ------------------------------------------------------------ diagnostics
    def compute_diagnostics(self) -> Job | None:
        """Flag the active fit's genes not to trust (:func:`.fits.fit_diagnostics`), off the loop."""
        fit = self.fit
        if fit is None:
            self.error = "Trust diagnostics need a fit: run a model first."
            return None
        if self.running:
            self.error = "A job is already running; wait for it or press Cancel."
            return None
        adata = self.adata
        return self._start(
            lambda progress: fit_diagnostics(adata, fit, progress=progress),
            on_done=lambda flags: self._add_diagnostics(fit.label, flags),
            what=f"trust diagnostics of {fit.label}",
        )

    def _add_diagnostics(self, label: str, flags: pd.DataFrame) -> None:
        with self._batched():
            self.diagnostics = {**self.diagnostics, label: flags}
        flagged = self._flagged_genes(flags)
        fit = self.results.get(label)
        status = f"trust diagnostics of {label}: {int(flagged.sum()):,} genes flagged"
        if fit is not None:  # the note under the gene table counts the velocity genes among them
            used = int((flagged & np.asarray(fit.result.velocity_genes, dtype=bool)).sum())
            status += f", {used:,} of them velocity genes"
        self.status = status

    def _flagged_genes(self, flags: pd.DataFrame) -> np.ndarray:
        """``(n_vars,)`` the genes the diagnostics table ``flags`` flags, in ``var_names`` order."""
        return flags[Key.var.DIAG_FLAGGED].reindex(self.adata.var_names).fillna(value=False).to_numpy(bool)

    def flagged(self) -> np.ndarray | None:
        """``(n_vars,)`` the active fit's flagged velocity genes, or None before its diagnostics."""
        flags = self.diagnostics.get(self.model) if self.model else None
        if flags is None:
            return None
        return self._flagged_genes(flags) & np.asarray(self.fit.result.velocity_genes, dtype=bool)

    def recompute_without_flagged(self) -> Job | None:
        """Re-derive the active fit's velocity graph without its flagged genes; the result is a new fit."""
        drop = self.flagged()
        fit = self.fit
        if drop is None or not drop.any():
            self.error = (
                "No flagged velocity genes: compute the trust diagnostics first (or none was flagged)."
            )
            return None
        if self.running:
            self.error = "A job is already running; wait for it or press Cancel."
            return None
        adata = self.adata
        basis = self.basis if self.basis in adata.obsm else next(iter(self.param.basis.objects))
        label = f"{fit.label} without {int(drop.sum())} flagged genes"
        return self._start(
            lambda progress: without_genes(adata, fit, drop, basis=basis, label=label, progress=progress),
            on_done=self._add_fit,
            what=f"recomputing {fit.label} without flagged genes",
        )

    # --------------------------------------------------- background read-outs
    def _background(self, key: Hashable, compute: Callable[[], Any], what: str) -> Any:
        """Compute a read-out too slow for a click (over ~100 ms) off the event loop.

        Returns the value when it is known; otherwise starts it on a worker thread (once)
        and returns None; ``readout_revision`` is bumped when it lands, so views that
        depend on it draw it then. Failures go to ``error``. Independent of the fit job:
        a Run may go on meanwhile.
        """
        if key in self._computed:
            return self._computed.get(key, lambda: None)
        if key in self._pending:
            return None

        def done(value: Any) -> None:
            self._pending.pop(key, None)
            self._computed.get(key, lambda: value)
            with self._batched():
                self.readout_revision += 1

        def failed(err: BaseException) -> None:
            self._pending.pop(key, None)
            message = (
                str(err) if isinstance(err, InputError) else f"{what} failed: {type(err).__name__}: {err}"
            )
            self.error = message

        self._pending[key] = job = Job(
            lambda _progress: compute(),
            on_done=done,
            on_error=failed,
            dispatch=self.dispatch,
            name=f"explorer-{what}",
        )
        job.start()
        return None

    def background_jobs(self) -> list[Job]:
        """List the read-outs under way (tests wait for them)."""
        return list(self._pending.values())

    # -------------------------------------------------------------- export
    def results_adata(self) -> AnnData:
        """Copy the data and write the active fit in, with its fates if the session computed them.

        :func:`explorer.app.fits.results_adata`; the fates are those shown for the fit (its
        last Compute fates that succeeded), under CellRank 2's keys.
        """
        fit = self.fit
        fates = self._fates_written.get(fit.label) if fit else None
        return results_adata(self.adata, fit, fates, file_fit=fit is not None and fit is self._file_fit())

    def _file_fit(self) -> Fit | None:
        """The fit the dataset file holds (shared by the sessions), or None."""
        return self._shared.get("stored fit", lambda: fit_from_adata(self.adata))

    def export_h5ad(self, name: str, *, overwrite: bool = False) -> Path:
        """Write :meth:`results_adata` to ``name`` under ``data_dir``, atomically.

        An existing file is replaced only with ``overwrite`` (the page asks first); the
        session's input file never is. The name is checked before any work.

        Returns
        -------
        The path written.

        Raises
        ------
        InputError
            For a name outside ``data_dir``, not ending in ``.h5ad``, too long, naming a
            folder or the input file.
        ExistingFileError
            When the file exists and ``overwrite`` is false (an :class:`InputError`).
        OSError
            When the file system refuses the write (permissions, a full disk).
        """
        path = export_target(self.data_dir, name, protect=(self.dataset_path,), overwrite=overwrite)
        adata = self.results_adata()
        write_new(lambda tmp: write(adata, tmp), path, overwrite=overwrite)
        fit = self.fit
        if fit is not None and fit.label in self._fates_written:
            self.status = f"saved {path.name} (the fit and its fates)"
        elif fit is not None and fit is not self._file_fit() and self.file_fates() is not None:
            self.status = (
                f"saved {path.name} (the fit; the file's fates, computed from its own velocity, "
                "left out: Compute fates for this fit to save its own)"
            )
        else:
            self.status = f"saved {path.name}"
        return path

    # ------------------------------------------------------------ read-outs
    # Thin delegates to explorer.app.readouts with this session's data, fit and selection,
    # remembered where a click would otherwise compute them again.
    @property
    def fit(self) -> Fit | None:
        """The active fit, or None."""
        return self.results.get(self.model) if self.model else None

    @property
    def gene_index(self) -> int:
        """Column of the selected gene."""
        return int(self.adata.var_names.get_loc(self.gene))

    def embedding(self, basis: str | None = None) -> np.ndarray:
        """``(n_obs, 2)`` read-only coordinates on ``basis`` (default: current), shared by sessions.

        A basis that only a fit of this session holds (a UMAP of DeepVelo's rates run with
        ``rate_umap``) is read from that fit and kept with the session.
        """
        key = basis or self.basis
        if key not in self.adata.obsm:
            holder = next((f for f in self.results.values() if key in (f.result.obsm or {})), None)
            if holder is not None:
                return self._remember(
                    ("fit embedding", holder.label, key), lambda: readouts.fit_embedding(holder, key)
                )
        return self._shared.get(("embedding", key), lambda: readouts.embedding(self.adata, key))

    def gene_values(
        self, what: Literal["Ms", "Mu", "velocity"], gene: str | None = None, fit: Fit | None = None
    ) -> np.ndarray:
        """Return ``(n_obs,)`` values of a gene (default: selected); velocity of ``fit`` (default: active)."""
        gene = gene or self.gene
        fit = (fit or self.fit) if what == "velocity" else None
        j = int(self.adata.var_names.get_loc(gene))
        # a click reads the same columns several times (phase portrait, time plots, curves)
        key = ("column", what, gene, None if fit is None else fit.label)
        return self._remember(key, lambda: readouts.gene_values(self.adata, what, j, fit))

    def latent_time(self, fit: Fit | None = None) -> np.ndarray | None:
        """Latent time of ``fit`` (default: the active one) if it shows one, else ``obs['latent_time']``."""
        return readouts.latent_time(self.adata, fit or self.fit)

    def fit_shows(self, fit: Fit | None = None) -> frozenset[str]:
        """Say what ``fit`` (default: the active one) can show (:func:`explorer.app.readouts.fit_shows`)."""
        fit = fit or self.fit
        return readouts.fit_shows(fit) if fit is not None else frozenset()

    def coloring(self, color_by: str | None = None) -> Coloring:
        """Return the per-cell colour values for ``color_by`` (default: the current choice)."""
        what = color_by or self.color_by
        fit = self.fit
        key = None
        if what in self.adata.obs and readouts.is_categorical(self.adata.obs[what]):
            key = self._shared.get(("color_key", what), lambda: readouts.color_key(self.adata, what))
        gene = self.gene if what in readouts.GENE_COLORINGS else None
        column = None
        if what == COLOR_EXPRESSION or (what == COLOR_VELOCITY and fit is not None):
            column = self.gene_values("Ms" if what == COLOR_EXPRESSION else "velocity")  # read once
        fates = (
            self.active_fates()
            if what.startswith(readouts.FATE_PREFIX) or what == readouts.COLOR_TERMINAL
            else None
        )
        return self._remember(
            (
                "coloring",
                what,
                gene,
                None if fit is None else fit.label,
                None if fates is None else fates.key,  # recomputed fates of a fit: another key
            ),
            lambda: readouts.coloring(
                self.adata, what, fit=fit, gene=self.gene, key=key, column=column, fates=fates
            ),
        )

    def velocity_embedding(self, fit: Fit | None = None) -> np.ndarray | None:
        """``(n_obs, 2)`` velocity of ``fit`` (default: active) on the current basis, projected once."""
        fit = fit or self.fit
        if fit is None:
            return None
        if self.basis not in fit.velocity_embedding:
            if fit.derived is None and fit.transitions is None:
                self._derive_stored(fit)
            v = readouts.project(fit, self.embedding())
            if v is not None:  # kept with the fit: an export writes it
                fit.velocity_embedding[self.basis] = v
        return fit.velocity_embedding.get(self.basis)

    def _derive_stored(self, fit: Fit) -> None:
        """Give a fit that has velocity only (a file without a velocity graph, transition matrix or
        projection) its velocity graph, as ``explorer fit`` would, computed in the background.

        Until it lands the fit draws no streamlines (:meth:`streamlines_note` says why); then
        ``readout_revision`` is bumped and the fit carries the graph, its transition matrix and
        (where the file had none) its confidence for every session showing it. Sessions that
        open the file while it runs wait for it rather than start their own
        (:meth:`~explorer.app.memo.Memo.get_once`).
        """
        adata = self.adata
        if Key.obsp.DISTANCES not in adata.obsp or adata.n_obs > AUTO_GRAPH_CELLS:
            return
        basis = self.basis
        shared = self._shared  # one computation for every session that opens the file meanwhile
        derived = self._background(
            ("velocity graph", fit.key),
            lambda: shared.get_once(
                ("velocity graph", fit.key, basis), lambda: derive(adata, fit.result, basis=basis)
            ),
            f"velocity graph of {fit.label}",
        )
        if derived is not None:
            fit.derived = derived
            fit.transitions = derived.transitions
            if fit.confidence is None:
                fit.confidence = derived.confidence

    def streamlines_note(self) -> str:
        """Why the embedding shows no streamlines though they are asked for ('' when it shows them)."""
        fit = self.fit
        if fit is None or not self.show_streamlines or self.streamlines():
            return ""
        if ("velocity graph", fit.key) in self._pending:
            return f"Streamlines: computing the velocity graph of {fit.label} ..."
        if fit.derived is not None or fit.transitions is not None or self.basis in fit.velocity_embedding:
            return ""
        prefix = f"No streamlines: {fit.label} has velocity but no velocity graph (obsp['velocity_graph']) "
        if self.adata.n_obs > AUTO_GRAPH_CELLS:
            return (
                f"{prefix}or transition matrix, and at {self.adata.n_obs:,} cells the app does not compute one "
                f"on opening (up to {AUTO_GRAPH_CELLS:,}). `explorer fit` on the file computes it."
            )
        if Key.obsp.DISTANCES not in self.adata.obsp:
            return (
                f"{prefix}or transition matrix, and the data has no neighbour graph (obsp['distances']) to "
                "compute one from. `explorer fit` on the file computes the neighbour graph, the fit and its "
                "velocity graph."
            )
        return ""

    def streamlines(self) -> list[np.ndarray]:
        """Streamlines of the active fit on the current basis (computed once per fit and basis)."""
        fit = self.fit
        if fit is None:
            return []
        if self.basis not in fit.streamlines:
            v = self.velocity_embedding(fit)
            if v is None:
                return []
            fit.streamlines[self.basis] = readouts.streamlines(self.embedding(), v)
        return fit.streamlines[self.basis]

    def arrow_grid(self) -> Any:
        """Velocity averaged on a grid over the embedding (a ``GridField``), or None."""
        v = self.velocity_embedding()
        if v is None:
            return None
        return self._remember(
            ("grid", self.model, self.basis), lambda: readouts.arrow_grid(self.embedding(), v)
        )

    def phase_fits(self) -> list[PhaseFit]:
        """For each fit, what the phase portrait draws for the selected gene (:func:`readouts.phase_fits`).

        Computed once per gene and set of fits: a click reads it for the plot, its axes and
        the legend (each a read of the fits' gene times from disk at atlas scale).
        """
        fits = tuple((label, fit.key, id(fit)) for label, fit in self.results.items())
        return self._remember(
            ("phase fits", self.gene_index, self.model, fits),
            lambda: readouts.phase_fits(
                self.gene_values("Ms"),
                self.gene_values("Mu"),
                self.results,
                j=self.gene_index,
                active=self.model,
                lineages={label: self.lineages(fit) for label, fit in self.results.items()},
                fit_t=lambda fit: self._fit_t(fit, self.gene_index),
            ),
        )

    def _fit_t(self, fit: Fit, j: int) -> np.ndarray:
        """Gene ``j``'s ``fit_t`` under ``fit`` as stored (read once a click: phase curve, time curves)."""
        layer = fit.result.layers[Key.layers.FIT_T]
        return self._remember(("fit_t", fit.key, j), lambda: read_column(layer, j))

    def lineages(self, fit: Fit | None = None) -> readouts.Lineages | None:
        """Lineages of ``fit``'s (default: active) cells by cell state (:func:`readouts.lineages`), or None."""
        fit = fit or self.fit
        if fit is None:
            return None
        return self._per_fit.get(("lineages", fit.key), lambda: readouts.lineages(self.adata, fit))

    def time_groups(self, fit: Fit | None = None) -> readouts.Lineages | None:
        """The groups the time views draw a line each for: ``fit``'s lineages, else its cell types."""
        fit = fit or self.fit
        if fit is None:
            return None
        found = self.lineages(fit)
        if found is not None:
            return found
        adata = self.adata
        return self._shared.get("type groups", lambda: readouts.type_groups(adata))

    # ---------------------------------------------------------- vector field
    def field_info(self, fit: Fit | None = None) -> readouts.FieldInfo | None:
        """``fit``'s (default: active) vector field on the current basis (:func:`readouts.field_info`), once."""
        fit = fit or self.fit
        if fit is None or self.adata is None or not readouts.has_field(self.adata, fit):
            return None
        basis = self.basis
        return self._per_fit.get(
            ("field", fit.key, basis),
            lambda: readouts.field_info(self.adata, fit, self.embedding(basis), basis=basis),
        )

    def _follow_cell(self, *_: Any) -> None:
        """Integrate the selected cell's path on the active fit's field (None without a cell or a field)."""
        info = self.field_info() if self.cell is not None else None
        found = None
        if info is not None:
            try:
                found = readouts.field_trajectory(info, self.cell)
            except InputError as err:
                self.error = str(err)
        if found is not None or self.trajectory is not None:
            with self._batched():
                self.trajectory = found

    def fixed_points(self) -> readouts.FixedPoints | None:
        """The active fit's fixed points on the current basis, or None without a field."""
        info = self.field_info()
        if info is None:
            return None
        key = ("fixed points", info.label, info.basis)
        return self._per_fit.get(key, lambda: readouts.fixed_points(info))

    def run_perturbation(self, gene: str, *, factor: float, cells: Any = None) -> Job | None:
        """Perturb ``gene`` by ``factor`` in ``cells`` (default: the selected group, else the selected cell).

        Runs :func:`readouts.field_perturbation` on the active fit's field in the
        background (progress per RK4 step, Cancel stops it); the result lands in
        ``perturbation``. Bad input (no field, no cells, an unknown gene) goes to ``error``.
        """
        info = self.field_info()
        if info is None:
            self.error = "Perturbations need a vector field: run vector_field (with its base model) first."
            return None
        if self.running:
            self.error = "A job is already running; wait for it or press Cancel."
            return None
        if cells is None:
            cells = self.selected if len(self.selected) else ([] if self.cell is None else [self.cell])
        idx = np.asarray(cells, dtype=np.int64).ravel()
        if gene not in info.genes:
            close = [g for g in info.genes if str(gene).strip().lower() in g.lower()][:5]
            hint = f" Similar: {', '.join(close)}." if close and str(gene).strip() else ""
            self.error = (
                f"Gene {gene!r} is not one of the field's {len(info.genes)} genes (its state's genes); "
                f"choose one of them.{hint}"
            )
            return None
        if idx.size == 0:
            self.error = "No cells to perturb: click a cell, or box/lasso a group of cells on the embedding."
            return None
        fates = self.active_fates()  # read here, not in the job's thread
        return self._start(
            lambda progress: readouts.field_perturbation(
                info, gene, cells=idx, factor=float(factor), progress=progress, fates=fates
            ),
            on_done=self._perturbed,
            what=f"perturbing {gene} (x{factor:g}) in {idx.size:,} cells",
        )

    def _perturbed(self, found: readouts.PerturbationRun) -> None:
        with self._batched():
            self.perturbation = found

    def velocity_gap(self) -> str | None:
        """Why the active fit gives the selected gene no velocity (:func:`.readouts.velocity_gap`)."""
        if self.adata is None or self.gene is None:
            return None
        fit = self.fit
        # the velocity column the plots read (no second read from a store)
        velocity = self.gene_values("velocity") if fit is not None else None
        return readouts.velocity_gap(self.adata, fit, self.gene_index, velocity)

    def time_curve(self, what: Literal["Ms", "Mu", "velocity"]) -> tuple[np.ndarray, np.ndarray, str] | None:
        """``(t, value, kind)``: the selected gene's curve against latent time, or None without latent time.

        See :func:`explorer.app.readouts.time_curve`: the active fit's values binned along
        latent time (``kind="fit"``), else the observed values' mean (``"trend"``). None too
        where the active fit's lineage lines (:meth:`lineage_lines`) stand for the fit: the
        mean over all cells at a time mixes lineages whose values part, and drew a line
        through none of their cells (the bundled sample's gene_0003 from 0.6 on, between
        lineage A's rise and lineage B's zero).
        """
        found = self._time_values(what)
        if found is None:
            return None
        t_used, _, fitted, observed, bins = found
        if self.lineage_lines(what):
            return None
        return readouts.time_curve(t_used, observed, fitted, bins=bins)

    def lineage_lines(self, what: Literal["Ms", "Mu", "velocity"]) -> tuple[readouts.LineageLine, ...] | None:
        """Each lineage's (or cell type's) mean of the values :meth:`time_curve` averages, or None.

        The active fit's lineages (:meth:`lineages`; VeloVAE's full model) on the time views
        (:func:`explorer.app.readouts.lineage_lines`): its predicted ``Ms`` / ``Mu`` and its
        velocity per lineage, in place of the red line, which would mix the lineages at each time.
        A fit without lineages gets a line per cell type (:func:`explorer.app.readouts.type_groups`)
        of its predicted ``Ms`` / ``Mu`` and its velocity; on the ``Ms`` and ``Mu`` plots of a
        gene it does not predict, the mean of the observed values (the red line) stays.
        """
        fit = self.fit
        found = self.time_groups() if fit is not None and self.adata is not None else None
        values = None if found is None else self._time_values(what)
        if values is None:
            return None
        t_used, cells, fitted, observed, _ = values
        if fitted is None and found.kind == "type" and what != "velocity":
            return None  # a gene the fit does not predict: the mean of its observed values
        # remembered: time_curve asks whether there are lines before the view draws them
        return self._remember(
            ("lineage lines", fit.key, self.gene_index, what),
            lambda: readouts.lineage_lines(t_used, observed if fitted is None else fitted, found, cells=cells),
        )

    def _time_values(self, what: Literal["Ms", "Mu", "velocity"]) -> tuple[Any, ...] | None:
        """``(t, cells, fitted, observed, bins)`` the time views average, or None without latent time.

        ``cells``: the even sample of cells ``t`` is of (None: all); ``fitted`` the active
        fit's values there (:func:`.readouts.fitted_at_cells`), else None and ``observed``
        the gene's values; ``bins``: :func:`.geometry.time_bins` of ``t``.
        """
        t = self.latent_time()
        if t is None:
            return None
        fit = self.fit
        time_of = fit.label if fit is not None and "latent_time" in self.fit_shows(fit) else "obs"
        # many cells: the curve is the mean over an even sample of them (CURVE_CELLS, about
        # 1,700 a bin), not every cell: at 10^6 cells evaluating the fit at every cell and
        # binning it took most of a gene click
        cells = None
        if len(t) > CURVE_CELLS:
            cells = self._shared.get(("curve cells", len(t)), lambda: even_sample(len(t), CURVE_CELLS))
        t_used = t if cells is None else t[cells]
        bins = self._remember(("time bins", time_of), lambda: time_bins(t_used))
        j = self.gene_index
        # the three time plots read one evaluation of the curve
        at_cells = (
            None
            if fit is None
            else self._remember(
                ("fitted", fit.key, j),
                lambda: readouts.fitted_at_cells(fit, j, cells, fit_t=lambda fit: self._fit_t(fit, j)),
            )
        )
        fitted = None if at_cells is None else at_cells.get(what)
        observed = None
        if fitted is None:
            observed = self.gene_values(what) if cells is None else self.gene_values(what)[cells]
        return t_used, cells, fitted, observed, bins

    def cell_info(self, index: int | None = None) -> CellInfo | None:
        """Collect what the inspector shows for cell ``index`` (default: the selected cell)."""
        index = self.cell if index is None else index
        if index is None:
            return None
        fit = self.fit
        return readouts.cell_info(
            self.adata,
            fit,
            index,
            n_targets=self.n_targets,
            t=self.latent_time(),
            conf=readouts.confidence(self.adata, fit),
            t_sd=readouts.latent_time_sd(fit),
            t_spread=readouts.latent_time_start_spread(fit),
            t_rank_width=readouts.latent_time_rank_width(fit),
        )

    def gene_table(self) -> pd.DataFrame:
        """One row per gene: mean Ms/Mu, the active fit's per-gene figures (:func:`readouts.gene_table`)."""
        means = self._shared.get("means", lambda: readouts.gene_means(self.adata))
        flags = self.diagnostics.get(self.model) if self.model else None
        return readouts.gene_table(self.adata.var_names, means, self.fit, flags)

    def compare_fits(self) -> tuple[Fit | None, Fit | None]:
        """Return the two fits picked for comparison."""
        return self.results.get(self.compare_a), self.results.get(self.compare_b)

    def compare_quality(self) -> pd.DataFrame | None:
        """Per-gene goodness of fit of A and B (columns gene, a, b), genes fitted by both."""
        return readouts.compare_quality(self.adata.var_names, *self.compare_fits())

    def compare_agreement(self) -> np.ndarray | None:
        """Per-cell cosine of A's and B's velocity (remembered per pair)."""
        a, b = self.compare_fits()
        if a is None or b is None:
            return None
        return self._remember(
            ("agreement", a.key, b.key),
            lambda: readouts.velocity_agreement(a.result.velocity, b.result.velocity),
        )

    def compare_reconstruction(self) -> readouts.ReconstructionComparison | None:
        """Per-gene reconstruction error of A and B (:func:`readouts.compare_reconstruction`), or None.

        Computed in the background (a second or so on the pancreas): None until it lands,
        and for fits that do not both predict ``(u, s)`` (:meth:`reconstruction_pending` tells).
        """
        a, b = self.compare_fits()
        predicts = {"cell_points", "curve"}
        if a is None or b is None or not (predicts & self.fit_shows(a) and predicts & self.fit_shows(b)):
            return None
        adata = self.adata
        return self._background(
            ("reconstruction", a.key, b.key),
            lambda: readouts.compare_reconstruction(adata, a, b),
            "reconstruction error",
        )

    def reconstruction_pending(self) -> bool:
        """Whether the reconstruction of the compared pair is being computed."""
        a, b = self.compare_fits()
        return a is not None and b is not None and ("reconstruction", a.key, b.key) in self._pending

    def compute_metrics(self, transitions: str | None = None) -> None:
        """Score every fit (:func:`readouts.model_metrics`) for ``transitions`` ``"A>B, C>D"``, off the loop.

        Bad transitions (an unknown cluster) go to ``error``; the table is
        :meth:`metrics_table` once it lands.
        """
        if transitions is not None:
            self.metric_transitions = transitions
        column = readouts.cluster_column(self.adata)
        clusters = self.adata.obs[column].cat.categories if column else []
        try:
            pairs = readouts.parse_transitions(self.metric_transitions, clusters)
        except InputError as err:
            self.error = str(err)
            return
        self.error = ""
        self.metrics_table(pairs, start=True)

    def metrics_table(
        self, pairs: list[tuple[str, str]] | None = None, *, start: bool = False
    ) -> readouts.MetricsTable | None:
        """Return every fit's metrics for the current transitions if computed (``start``: compute them)."""
        if pairs is None:
            column = readouts.cluster_column(self.adata)
            clusters = self.adata.obs[column].cat.categories if column else []
            try:
                pairs = readouts.parse_transitions(self.metric_transitions, clusters)
            except InputError:
                return None
        fits = dict(self.results)
        key = ("metrics", tuple(f.key for f in fits.values()), tuple(pairs))
        if not start and key not in self._computed:
            return None
        adata = self.adata
        return self._background(key, lambda: readouts.model_metrics(adata, fits, pairs), "metrics")
