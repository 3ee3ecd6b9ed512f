"""One browser session's state: the data, what is selected, and every fitted model.

:class:`ExplorerState` holds everything a user can change or select (gene, cell,
selected cells, active model, colouring, embedding) and the session's fits; views
render from its parameters and change them only through its intent methods
(:meth:`~ExplorerState.select_gene`, :meth:`~ExplorerState.select_cell`,
:meth:`~ExplorerState.select_cells`, :meth:`~ExplorerState.run_model`, ...). The data
itself may be shared read-only between sessions: nothing here writes into
``state.adata``; fits live in ``state.results`` and are written only into a copy on
export.

The accessors (``gene_values``, ``coloring``, ``phase_fits``, ...) return arrays
ready for :mod:`explorer.app.plots`; nothing in this module draws.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import param
from anndata import AnnData

from explorer._types import InputError, Progress
from explorer.app.escape import hex_colors
from explorer.app.files import DATASET_SUFFIXES, export_target, resolve_under, write_new
from explorer.app.jobs import Fit, Job, fit_and_derive, fit_key, fit_label
from explorer.keys import Key

if TYPE_CHECKING:
    from collections.abc import Callable

    from scipy.sparse import csr_matrix

    from explorer.models.base import VelocityResult

logger = logging.getLogger(__name__)

#: colourings besides the categorical obs columns (which are offered by their own names)
COLOR_LATENT_TIME = "latent time"
COLOR_CONFIDENCE = "velocity confidence"
COLOR_UNCERTAINTY = "velocity uncertainty"
COLOR_EXPRESSION = "gene: expression (Ms)"
COLOR_VELOCITY = "gene: velocity"
CONTINUOUS_COLORINGS = (
    COLOR_LATENT_TIME,
    COLOR_CONFIDENCE,
    COLOR_UNCERTAINTY,
    COLOR_EXPRESSION,
    COLOR_VELOCITY,
)

#: a category-to-colour map read from ``uns['<column>_colors']`` (scanpy's convention) or
#: else taken from this palette (Glasbey's distinct colours, as colorcet orders them)
_FALLBACK_PALETTE = (
    "#d60000", "#8c3bff", "#018700", "#00acc6", "#97ff00", "#ff7ed1", "#6b004f", "#ffa52f",
    "#573b00", "#005659", "#0000dd", "#00fdcf", "#a17569", "#bcb6ff", "#95b577", "#bf03b8",
    "#645474", "#790000", "#0774d8", "#fdf490", "#004b00", "#8e7900", "#ff7266", "#edb8b8",
)  # fmt: skip

#: per-gene columns of the gene table, by their ``var`` key, and the header shown
GENE_COLUMNS: dict[str, str] = {
    Key.var.FIT_LIKELIHOOD: "likelihood",
    Key.var.FIT_R2: "R²",
    Key.var.R2: "R²",
    Key.var.GAMMA: "gamma",
    Key.var.FIT_ALPHA: "alpha",
    Key.var.FIT_BETA: "beta",
    Key.var.FIT_GAMMA: "gamma",
    Key.var.FIT_T_: "switch time",
    Key.var.FIT_SCALING: "scaling",
    Key.var.FIT_KINETIC_SIGNAL: "kinetic signal",
    Key.var.FIT_DETECTION_POWER: "detection power",
}

#: how many bins of latent time the "fitted curve" of the time view averages over
_TIME_BINS = 60

#: points along a fitted phase trajectory
_TRAJECTORY_POINTS = 200


@dataclass(frozen=True, slots=True)
class Coloring:
    """Per-cell colour values: ``kind`` says how to read ``values``.

    ``"category"``: ``values`` are category codes into ``categories`` with ``color_key``
    (category -> hex colour, fixed for the dataset); ``"continuous"``: float values (NaN
    drawn grey); ``"none"``: nothing to colour by (``label`` says why).
    """

    kind: Literal["category", "continuous", "none"]
    values: np.ndarray
    label: str
    categories: tuple[str, ...] = ()
    color_key: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class PhaseFit:
    """What the phase portrait draws for one fit of the selected gene."""

    label: str
    active: bool
    slope: float | None
    s: np.ndarray | None
    u: np.ndarray | None
    #: ``(2, 2)`` end points of the steady-state line ``u = slope * s`` within the cells' range
    line: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class CellInfo:
    """What the cell inspector shows for the selected cell."""

    index: int
    name: str
    cluster: str | None
    latent_time: float | None
    confidence: float | None
    targets: pd.DataFrame  # columns: index, cell, cluster, probability; most likely first


def nearest(x: np.ndarray, y: np.ndarray, x0: float, y0: float) -> int:
    """Index of the point of ``(x, y)`` nearest to ``(x0, y0)``, each axis scaled by its range.

    NaN points are never chosen. Scaling makes a click pick the visually nearest point
    on plots whose axes have different units (the phase portrait, the time view).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    sx = np.nanmax(x) - np.nanmin(x) or 1.0
    sy = np.nanmax(y) - np.nanmin(y) or 1.0
    d = ((x - x0) / sx) ** 2 + ((y - y0) / sy) ** 2
    return int(np.nanargmin(d))


def points_in_polygon(x: np.ndarray, y: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Find the points inside ``polygon`` (``(n, 2)`` vertices, as a lasso draws them)."""
    from matplotlib.path import Path as MplPath

    inside = MplPath(np.asarray(polygon, dtype=np.float64)).contains_points(np.column_stack([x, y]))
    return np.flatnonzero(inside)


def points_in_box(x: np.ndarray, y: np.ndarray, bounds: tuple[float, float, float, float]) -> np.ndarray:
    """Find the points inside ``bounds = (x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = bounds
    keep = (x >= min(x0, x1)) & (x <= max(x0, x1)) & (y >= min(y0, y1)) & (y <= max(y0, y1))
    return np.flatnonzero(keep)


def velocity_agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per cell of two ``(n_obs, n_vars)`` velocities, over genes finite in both.

    Cells where either vector is zero get NaN.
    """
    genes = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
    a, b = a[:, genes], b[:, genes]
    dot = np.einsum("ij,ij->i", a, b, dtype=np.float64)
    norm = np.sqrt(
        np.einsum("ij,ij->i", a, a, dtype=np.float64) * np.einsum("ij,ij->i", b, b, dtype=np.float64)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, dot / norm, np.nan).astype(np.float32)


def time_bins(x: np.ndarray, *, n_bins: int = _TIME_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Assign ``x`` to ``n_bins`` equal bins: ``(bin per value, -1 for NaN; bin centres)``.

    Plain arithmetic rather than a search: it runs on every gene click at a million cells.
    """
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.full(len(x), -1, dtype=np.int64), np.empty(0)
    lo, hi = float(x[finite].min()), float(x[finite].max())
    span = (hi - lo) or 1.0
    which = np.clip(((x - lo) / span * n_bins).astype(np.int64, copy=False), 0, n_bins - 1)
    which[~finite] = -1
    centres = lo + (np.arange(n_bins) + 0.5) * span / n_bins
    return which, centres


def binned_mean(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_bins: int = _TIME_BINS,
    bins: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``y`` in ``n_bins`` equal bins of ``x`` (empty bins left out), for a trend curve.

    ``bins`` may pass :func:`time_bins` of ``x`` computed before.
    """
    which, centres = bins if bins is not None else time_bins(x, n_bins=n_bins)
    y = np.asarray(y, dtype=np.float64)
    ok = (which >= 0) & np.isfinite(y)
    n = len(centres)
    counts = np.bincount(which[ok], minlength=n)
    sums = np.bincount(which[ok], weights=y[ok], minlength=n)
    filled = counts > 0
    return centres[filled], sums[filled] / counts[filled]


def _dense_column(matrix: Any, j: int) -> np.ndarray:
    col = matrix[:, j]
    if hasattr(col, "toarray"):
        col = col.toarray()
    return np.asarray(col, dtype=np.float32).ravel()


def _is_categorical(series: pd.Series) -> bool:
    return isinstance(series.dtype, pd.CategoricalDtype)


def result_from_adata(adata: AnnData) -> VelocityResult | None:
    """Read the velocity already stored in ``adata`` (scVelo's keys) as a result, or None.

    Lets a file written by ``explorer fit``, scVelo or an earlier export open with its
    velocity in place.
    """
    from explorer.models import MODELS
    from explorer.models.base import VelocityResult

    if Key.layers.VELOCITY not in adata.layers:
        return None
    params = adata.uns.get(Key.uns.VELOCITY_PARAMS, {})
    mode = (
        str(params.get("model", params.get("mode", "velocity"))) if isinstance(params, dict) else "velocity"
    )
    if mode in MODELS:
        # written by VelocityResult.to_adata (explorer fit, an export, the bundled sample):
        # the model's own parameters and arrays come back as they were
        return VelocityResult.from_adata(adata)
    velocity = adata.layers[Key.layers.VELOCITY]
    velocity = np.asarray(velocity.toarray() if hasattr(velocity, "toarray") else velocity, dtype=np.float32)
    known = [
        k for k in (*GENE_COLUMNS, Key.var.FIT_STD_U, Key.var.FIT_STD_S, Key.var.FIT_T_ON) if k in adata.var
    ]
    gene_params = adata.var[list(dict.fromkeys(known))].copy()
    genes = (
        adata.var[Key.var.VELOCITY_GENES].to_numpy(dtype=bool)
        if Key.var.VELOCITY_GENES in adata.var
        else np.isfinite(velocity).all(axis=0)
    )
    likelihood = None
    for key in (Key.var.FIT_LIKELIHOOD, Key.var.R2):
        if key in adata.var:
            likelihood = adata.var[key].astype(float)
            break
    layers = {}
    if Key.layers.FIT_T in adata.layers:
        layers[Key.layers.FIT_T] = np.asarray(adata.layers[Key.layers.FIT_T], dtype=np.float32)
    obs = adata.obs
    return VelocityResult(
        model=mode,
        params={"source": "file"},
        obs_names=adata.obs_names,
        var_names=adata.var_names,
        velocity=velocity,
        gene_params=gene_params,
        velocity_genes=genes,
        likelihood=likelihood,
        velocity_u=None,
        latent_time=obs[Key.obs.LATENT_TIME].to_numpy(np.float32) if Key.obs.LATENT_TIME in obs else None,
        uncertainty=(
            obs[Key.obs.VELOCITY_UNCERTAINTY].to_numpy(np.float32)
            if Key.obs.VELOCITY_UNCERTAINTY in obs
            else None
        ),
        layers=layers,
    )


def fit_from_adata(adata: AnnData) -> Fit | None:
    """:func:`result_from_adata` with the stored transitions, confidence and projections."""
    result = result_from_adata(adata)
    if result is None:
        return None
    transitions = adata.obsp.get(Key.obsp.TRANSITIONS)
    if transitions is None and Key.obsp.VELOCITY_GRAPH in adata.obsp:
        from explorer.graph.transition import transition_matrix

        transitions = transition_matrix(
            adata.obsp[Key.obsp.VELOCITY_GRAPH], adata.obsp.get(Key.obsp.VELOCITY_GRAPH_NEG)
        )
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
    transitions = None if transitions is None else transitions.tocsr()
    derived = None
    graph, graph_neg = adata.obsp.get(Key.obsp.VELOCITY_GRAPH), adata.obsp.get(Key.obsp.VELOCITY_GRAPH_NEG)
    if graph is not None and graph_neg is not None and transitions is not None:
        from explorer.pipeline import Derived

        # lets the app project on another basis as `explorer fit` does (the signed kernel)
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


#: per-dataset caches by ``id(adata)``; each entry is dropped with its AnnData
_SHARED: dict[int, dict[Any, Any]] = {}
_SHARED_LOCK = threading.Lock()


def shared_cache(adata: AnnData) -> dict[Any, Any]:
    """A cache shared by every session that shows ``adata`` (the same object), dropped with it.

    The server loads a dataset once and every session shows that object read-only, so
    what each would compute alike lives here once: the stored fit (whose streamlines are
    then computed once), embedding coordinates, gene means, colour maps. Arrays put here
    are made read-only.
    """
    key = id(adata)
    with _SHARED_LOCK:
        cache = _SHARED.get(key)
        if cache is None:
            cache = _SHARED[key] = {}
            weakref.finalize(adata, _SHARED.pop, key, None)
    return cache


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def model_defaults(model: str) -> dict[str, Any]:
    """Return the constructor's keyword defaults of ``model`` (for the Run form)."""
    from explorer.models import MODELS

    signature = inspect.signature(MODELS[model].__init__)
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if name != "self" and p.default is not inspect.Parameter.empty
    }


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
    status = param.String(default="", doc="What is going on, in words.")
    progress = param.Number(default=0.0, bounds=(0.0, 1.0), doc="Progress of the running job.")
    running = param.Boolean(default=False, doc="Whether a job runs.")
    error = param.String(default="", doc="Last error message, for the page to show.")
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
        self._cache: dict[Any, Any] = {}
        #: what every session computes alike from the same dataset (see :func:`shared_cache`)
        self._shared: dict[Any, Any] = {}
        if adata is not None:
            self.set_data(adata, name=self.dataset or "data", path=self.dataset_path)

    def _batched(self) -> contextlib.AbstractContextManager[Any]:
        """One page update for everything an action changes (a no-op outside the app)."""
        return self.batch() if self.batch is not None else contextlib.nullcontext()

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
        self._cache = {}
        self._shared = shared_cache(adata)
        fits: dict[str, Fit] = {}
        if "stored fit" not in self._shared:
            # one Fit for every session: its streamlines and projections are computed once
            self._shared["stored fit"] = fit_from_adata(adata)
        stored = self._shared["stored fit"]
        if stored is not None:
            fits[stored.label] = stored
        categorical = [c for c in adata.obs.columns if _is_categorical(adata.obs[c])]
        preferred = Key.obsm.UMAP if Key.obsm.UMAP in bases else bases[0]
        default_color = (
            Key.obs.CLUSTERS
            if Key.obs.CLUSTERS in categorical
            else (categorical[0] if categorical else COLOR_EXPRESSION)
        )
        labels = list(fits)
        with self._batched(), param.parameterized.batch_call_watchers(self):
            self.param.basis.objects = bases
            self.param.color_by.objects = [*categorical, *CONTINUOUS_COLORINGS]
            for p in (self.param.model, self.param.compare_a, self.param.compare_b):
                p.objects = labels
            self.param.update(
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

    @staticmethod
    def _default_gene(adata: AnnData, fit: Fit | None) -> str:
        if fit is not None and fit.result.likelihood is not None:
            like = fit.result.likelihood.where(np.asarray(fit.result.velocity_genes, dtype=bool))
            if like.notna().any():
                return str(like.idxmax())
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
            if not path.is_file():
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
                msg = "The time view has no latent time to pick a cell by; run the dynamical model."
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

    def set_model(self, label: str) -> None:
        """Make the fit ``label`` the active model."""
        if label not in self.results:
            msg = f"No fit named {label!r}; fitted so far: {', '.join(self.results) or 'none'}."
            raise InputError(msg)
        with self._batched():
            self.model = label

    # ---------------------------------------------------------------- runs
    def run_model(self, model: str, **params: Any) -> Job | None:
        """Fit ``model`` with ``params`` in the background; None if it is cached (then it becomes active).

        The fit lands in ``results`` (keyed by model and parameters) and becomes the
        active model; progress goes to ``progress``, failures to ``error``.
        """
        from explorer.models import MODELS

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
        return self._start(
            lambda progress: fit_and_derive(
                adata, model, params, basis=basis, label=label, progress=progress
            ),
            on_done=self._add_fit,
            what=f"fitting {label}",
        )

    def _add_fit(self, fit: Fit) -> None:
        results = {**self.results, fit.label: fit}
        labels = list(results)
        with self._batched(), param.parameterized.batch_call_watchers(self):
            for p in (self.param.model, self.param.compare_a, self.param.compare_b):
                p.objects = labels
            previous = self.model
            self.param.update(
                results=results,
                model=fit.label,
                compare_a=self.compare_a or fit.label,
                compare_b=fit.label if previous and previous != fit.label else self.compare_b,
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
        self._cache = {}
        self._shared = {}
        with param.parameterized.discard_events(self):
            self.param.update(
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

    def _start(self, target: Callable[..., Any], *, on_done: Callable[[Any], None], what: str) -> Job:
        def progress(p: Progress) -> None:
            self.param.update(progress=p.fraction, status=f"{what}: {p.message}" if p.message else what)

        def done(value: Any) -> None:
            self.param.update(running=False, progress=1.0, status=f"{what}: done")
            on_done(value)

        def failed(err: BaseException) -> None:
            message = (
                str(err) if isinstance(err, InputError) else f"{what} failed: {type(err).__name__}: {err}"
            )
            self.param.update(running=False, progress=0.0, status=f"{what}: failed", error=message)

        def cancelled() -> None:
            self.param.update(running=False, progress=0.0, status=f"{what}: cancelled")

        self.param.update(running=True, progress=0.0, status=what, error="")
        self._job = Job(
            target,
            on_progress=progress,
            on_done=done,
            on_error=failed,
            on_cancelled=cancelled,
            dispatch=self.dispatch,
            name=f"explorer-{what}",
        )
        return self._job.start()

    # ------------------------------------------------------------ accessors
    @property
    def fit(self) -> Fit | None:
        """The active fit, or None."""
        return self.results.get(self.model) if self.model else None

    @property
    def gene_index(self) -> int:
        """Column of the selected gene."""
        return int(self.adata.var_names.get_loc(self.gene))

    def embedding(self, basis: str | None = None) -> np.ndarray:
        """``(n_obs, 2)`` coordinates on ``basis`` (default: the current one)."""
        key = basis or self.basis
        cached = self._shared.get(("embedding", key))
        if cached is None:
            cached = _frozen(np.array(np.asarray(self.adata.obsm[key])[:, :2], dtype=np.float32, order="C"))
            self._shared["embedding", key] = cached
        return cached

    def gene_values(
        self, what: Literal["Ms", "Mu", "velocity"], gene: str | None = None, fit: Fit | None = None
    ) -> np.ndarray:
        """Return ``(n_obs,)`` values of a gene (default: selected); velocity of ``fit`` (default: active)."""
        gene = gene or self.gene
        fit = (fit or self.fit) if what == "velocity" else None
        if what == "velocity" and fit is None:
            return np.full(self.adata.n_obs, np.nan, dtype=np.float32)
        # a click reads the same columns several times (phase portrait, time plots, curves):
        # keep the last gene's, since copying a column out of a million rows takes milliseconds
        key = ("column", what, gene, None if fit is None else fit.label)
        cached = self._cache.get(key)
        if cached is None:
            j = int(self.adata.var_names.get_loc(gene))
            if fit is not None:
                cached = np.ascontiguousarray(fit.result.velocity[:, j], dtype=np.float32)
            else:
                layer = Key.layers.MS if what == "Ms" else Key.layers.MU
                cached = _dense_column(self.adata.layers[layer], j)
            stale = [k for k in self._cache if k[0] == "column" and k[2] != gene]
            for k in stale:
                del self._cache[k]
            self._cache[key] = cached
        return cached

    def latent_time(self, fit: Fit | None = None) -> np.ndarray | None:
        """Latent time of ``fit`` (default: the active one), else ``obs['latent_time']``, else None."""
        fit = fit or self.fit
        if fit is not None and fit.result.latent_time is not None:
            return np.asarray(fit.result.latent_time, dtype=np.float32)
        obs = self.adata.obs
        if Key.obs.LATENT_TIME not in obs:
            return None
        if ("obs latent time",) not in self._shared:
            self._shared["obs latent time",] = obs[Key.obs.LATENT_TIME].to_numpy(np.float32)
        return self._shared["obs latent time",]

    def confidence(self) -> np.ndarray | None:
        """Velocity confidence of the active fit, else ``obs['velocity_confidence']``, else None."""
        fit = self.fit
        if fit is not None and fit.confidence is not None:
            return fit.confidence
        obs = self.adata.obs
        return (
            obs[Key.obs.VELOCITY_CONFIDENCE].to_numpy(np.float32)
            if Key.obs.VELOCITY_CONFIDENCE in obs
            else None
        )

    def uncertainty(self) -> np.ndarray | None:
        """Per-cell uncertainty of the active fit, else ``obs['velocity_uncertainty']``, else None."""
        fit = self.fit
        if fit is not None and fit.result.uncertainty is not None:
            return np.asarray(fit.result.uncertainty, dtype=np.float32)
        obs = self.adata.obs
        return (
            obs[Key.obs.VELOCITY_UNCERTAINTY].to_numpy(np.float32)
            if Key.obs.VELOCITY_UNCERTAINTY in obs
            else None
        )

    def color_key(self, column: str) -> dict[str, str]:
        """Map the categories of an obs column to fixed colours (``uns['<column>_colors']`` if valid)."""
        cached = self._shared.get(("color_key", column))
        if cached is None:
            cats = [str(c) for c in self.adata.obs[column].cat.categories]
            stored = self.adata.uns.get(f"{column}_colors")
            colors = hex_colors(stored, len(cats))  # valid colours only: they go into CSS and Bokeh
            if colors is None:
                colors = [_FALLBACK_PALETTE[i % len(_FALLBACK_PALETTE)] for i in range(len(cats))]
            cached = dict(zip(cats, colors, strict=False))
            self._shared["color_key", column] = cached
        return cached

    def coloring(self, color_by: str | None = None) -> Coloring:
        """Return the per-cell colour values for ``color_by`` (default: the current choice)."""
        what = color_by or self.color_by
        obs = self.adata.obs
        if what in obs and _is_categorical(obs[what]):
            column = obs[what]
            return Coloring(
                kind="category",
                values=column.cat.codes.to_numpy(),
                label=what,
                categories=tuple(str(c) for c in column.cat.categories),
                color_key=self.color_key(what),
            )
        values: np.ndarray | None
        if what == COLOR_LATENT_TIME:
            values, why = self.latent_time(), "no latent time: run the dynamical model"
        elif what == COLOR_CONFIDENCE:
            values, why = self.confidence(), "no velocity confidence: run a model"
        elif what == COLOR_UNCERTAINTY:
            values, why = self.uncertainty(), "the active model reports no uncertainty"
        elif what == COLOR_EXPRESSION:
            values, why = self.gene_values("Ms"), ""
        elif what == COLOR_VELOCITY:
            values, why = (
                (self.gene_values("velocity"), "") if self.fit else (None, "no velocity: run a model")
            )
        else:
            values, why = None, f"cannot colour by {what!r}"
        if values is None:
            return Coloring(kind="none", values=np.zeros(self.adata.n_obs, dtype=np.float32), label=why)
        label = (
            f"{self.gene} {what.removeprefix('gene: ')}"
            if what in (COLOR_EXPRESSION, COLOR_VELOCITY)
            else what
        )
        return Coloring(kind="continuous", values=values, label=label)

    def cluster_column(self) -> str | None:
        """Name the obs column of cell types: ``clusters`` if present, else the first categorical one."""
        obs = self.adata.obs
        if Key.obs.CLUSTERS in obs:
            return Key.obs.CLUSTERS
        return next((c for c in obs.columns if _is_categorical(obs[c])), None)

    def velocity_embedding(self, fit: Fit | None = None) -> np.ndarray | None:
        """``(n_obs, 2)`` velocity of ``fit`` (default: active) on the current basis, projected on demand."""
        fit = fit or self.fit
        if fit is None:
            return None
        if self.basis not in fit.velocity_embedding:
            if fit.derived is not None:
                # scVelo's signed projection, as explorer.pipeline.derive computes it
                fit.velocity_embedding[self.basis] = fit.derived.project(self.embedding())
            elif fit.transitions is not None:  # a file with T_fwd but no velocity graph
                from explorer.graph.projection import project_velocity

                fit.velocity_embedding[self.basis] = np.asarray(
                    project_velocity(fit.transitions, self.embedding())
                )
        return fit.velocity_embedding.get(self.basis)

    def streamlines(self) -> list[np.ndarray]:
        """Streamlines of the active fit on the current basis (computed once per fit and basis)."""
        fit = self.fit
        if fit is None:
            return []
        if self.basis not in fit.streamlines:
            v = self.velocity_embedding(fit)
            if v is None:
                return []
            from explorer.graph.streamlines import compute_streamlines

            fit.streamlines[self.basis] = compute_streamlines(self.embedding(), v)
        return fit.streamlines[self.basis]

    def arrow_grid(self) -> Any:
        """Velocity averaged on a grid over the embedding (a ``GridField``), or None."""
        v = self.velocity_embedding()
        if v is None:
            return None
        key = ("grid", self.model, self.basis)
        if key not in self._cache:
            from explorer.graph.streamlines import velocity_on_grid

            # half scVelo's grid density: 25 x 25 arrows stay readable beside the streamlines
            self._cache[key] = velocity_on_grid(self.embedding(), v, density=0.5)
        return self._cache[key]

    def phase_fits(self) -> list[PhaseFit]:
        """For each fit, the steady-state line and fitted curve of the selected gene.

        Both come from :mod:`explorer.models.kinetics`: the curve from
        :func:`~explorer.models.kinetics.fitted_gene` (the parameters that produced
        ``fit_t`` and the velocities; the shared-axis onset ``fit_t_on`` is a diagnostic,
        never drawn), the line ``u = slope * s`` from
        :func:`~explorer.models.kinetics.steady_state_line`, kept inside the cells' range.
        """
        from explorer.models import kinetics

        j = self.gene_index
        ms, mu = self.gene_values("Ms"), self.gene_values("Mu")
        s_max = float(np.nanmax(ms)) if np.isfinite(ms).any() else 1.0
        u_max = float(np.nanmax(mu)) if np.isfinite(mu).any() else 1.0
        out = []
        for label, fit in self.results.items():
            gp = fit.result.gene_params.iloc[j]
            slope: float | None = None
            s = u = None
            if Key.var.GAMMA in gp and np.isfinite(gp[Key.var.GAMMA]):
                slope = float(gp[Key.var.GAMMA])
            gene = kinetics.fitted_gene(gp)
            if gene is not None:
                # u = (gamma / beta) s for the model's u = Mu / scaling: Mu = scaling gamma / beta s
                slope = gene.scaling * gene.gamma / gene.beta
                fit_t = fit.result.layers.get(Key.layers.FIT_T)
                finite = fit_t is not None and np.isfinite(fit_t[:, j]).any()
                s, u = gene.phase_curve(float(np.nanmax(fit_t[:, j])) if finite else np.nan)
            out.append(
                PhaseFit(
                    label=label,
                    active=label == self.model,
                    slope=slope,
                    s=s,
                    u=u,
                    line=kinetics.steady_state_line(slope, s_max, u_max),
                )
            )
        return out

    def time_curve(self, what: Literal["Ms", "Mu", "velocity"]) -> tuple[np.ndarray, np.ndarray, str] | None:
        """``(t, value, kind)``: the selected gene's curve against latent time, or None without latent time.

        For a kinetic fit (``fit_t``, rates) the curve is the fitted ``s``/``u``/velocity at
        each cell's gene time (:func:`explorer.models.kinetics.fitted_gene`, as the phase
        portrait), averaged in bins of latent time (``kind="fit"``); otherwise
        the binned mean of the observed values (``kind="trend"``).
        """
        t = self.latent_time()
        if t is None:
            return None
        from explorer.models import kinetics

        fit = self.fit
        j = self.gene_index
        values = None
        if fit is not None and Key.layers.FIT_T in fit.result.layers:
            gene = kinetics.fitted_gene(fit.result.gene_params.iloc[j])
            if gene is not None:
                uu, ss, vs = gene.at(fit.result.layers[Key.layers.FIT_T][:, j])
                values = {"Ms": ss, "Mu": uu, "velocity": vs}[what]
        kind = "fit" if values is not None else "trend"
        if values is None:
            values = self.gene_values(what)
        fit_time = fit is not None and fit.result.latent_time is not None
        key = ("time bins", fit.label if fit_time else "obs")
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "time bins"}
            self._cache[key] = time_bins(t)
        x, y = binned_mean(t, values, bins=self._cache[key])
        return x, y, kind

    def cell_info(self, index: int | None = None) -> CellInfo | None:
        """Collect what the inspector shows for cell ``index`` (default: the selected cell)."""
        index = self.cell if index is None else index
        if index is None:
            return None
        column = self.cluster_column()
        clusters = self.adata.obs[column].to_numpy() if column else None  # index it, never convert all cells
        t = self.latent_time()
        conf = self.confidence()
        rows = pd.DataFrame({"index": pd.Series(dtype=np.int64), "probability": pd.Series(dtype=float)})
        fit = self.fit
        if fit is not None and fit.transitions is not None:
            row: csr_matrix = fit.transitions[index]
            cols, probs = row.indices, row.data
            keep = cols != index
            cols, probs = cols[keep], probs[keep]
            order = np.argsort(-probs, kind="stable")[: self.n_targets]
            rows = pd.DataFrame(
                {"index": cols[order].astype(np.int64), "probability": probs[order].astype(float)}
            )
        rows.insert(1, "cell", self.adata.obs_names[rows["index"].to_numpy()].astype(str))
        rows.insert(
            2, "cluster", clusters[rows["index"].to_numpy()].astype(str) if clusters is not None else ""
        )
        return CellInfo(
            index=index,
            name=str(self.adata.obs_names[index]),
            cluster=str(clusters[index]) if clusters is not None else None,
            latent_time=float(t[index]) if t is not None else None,
            confidence=float(conf[index]) if conf is not None else None,
            targets=rows,
        )

    def gene_table(self) -> pd.DataFrame:
        """One row per gene: mean Ms/Mu and the active fit's per-gene figures.

        The columns are always the same (``gene``, ``mean Ms``, ``mean Mu``, the headers
        of :data:`GENE_COLUMNS`, ``velocity gene``), NaN where the active fit has no such
        figure, so the table keeps its layout when the model changes.
        """
        if ("means",) not in self._shared:
            ms, mu = self.adata.layers[Key.layers.MS], self.adata.layers[Key.layers.MU]
            self._shared["means",] = (np.asarray(ms.mean(axis=0)).ravel(), np.asarray(mu.mean(axis=0)).ravel())
        mean_s, mean_u = self._shared["means",]
        n = self.adata.n_vars
        table = pd.DataFrame({"gene": self.adata.var_names.astype(str), "mean Ms": mean_s, "mean Mu": mean_u})
        for header in dict.fromkeys(GENE_COLUMNS.values()):
            table[header] = np.full(n, np.nan)
        table["velocity gene"] = np.zeros(n, dtype=bool)
        fit = self.fit
        if fit is not None:
            gp = fit.result.gene_params
            filled: set[str] = set()
            if fit.result.likelihood is not None and Key.var.FIT_LIKELIHOOD not in gp:
                table["likelihood"] = fit.result.likelihood.to_numpy(dtype=float)
                filled.add("likelihood")
            for key, header in GENE_COLUMNS.items():
                if key in gp and header not in filled:
                    table[header] = gp[key].to_numpy(dtype=float)
                    filled.add(header)
            table["velocity gene"] = np.asarray(fit.result.velocity_genes, dtype=bool)
        return table

    def compare_fits(self) -> tuple[Fit | None, Fit | None]:
        """Return the two fits picked for comparison."""
        return self.results.get(self.compare_a), self.results.get(self.compare_b)

    def compare_quality(self) -> pd.DataFrame | None:
        """Per-gene goodness of fit of A and B (columns gene, a, b), genes fitted by both."""
        a, b = self.compare_fits()
        if a is None or b is None or a.result.likelihood is None or b.result.likelihood is None:
            return None
        table = pd.DataFrame(
            {
                "gene": self.adata.var_names.astype(str),
                "a": a.result.likelihood.to_numpy(dtype=float),
                "b": b.result.likelihood.to_numpy(dtype=float),
            }
        )
        return table[np.isfinite(table["a"]) & np.isfinite(table["b"])].reset_index(drop=True)

    def compare_agreement(self) -> np.ndarray | None:
        """Per-cell cosine of A's and B's velocity (cached per pair)."""
        a, b = self.compare_fits()
        if a is None or b is None:
            return None
        key = ("agreement", a.key, b.key)
        if key not in self._cache:
            self._cache[key] = velocity_agreement(a.result.velocity, b.result.velocity)
        return self._cache[key]

    def select_gene_near(self, x: float, y: float) -> str | None:
        """Select the gene nearest to a click on the A-against-B fit-quality plot."""
        table = self.compare_quality()
        if table is None or table.empty:
            return None
        i = nearest(table["a"].to_numpy(), table["b"].to_numpy(), x, y)
        self.select_gene(table["gene"].iloc[i])
        return self.gene

    # --------------------------------------------------------------- export
    def results_adata(self) -> AnnData:
        """Copy the data and write the active fit into it under scVelo's/CellRank's keys.

        Returns
        -------
        A new AnnData: what ``VelocityResult.to_adata`` writes, plus obsp ``T_fwd``
        (CellRank's transition matrix), obsm ``velocity_<basis>`` and obs
        ``velocity_confidence`` when the fit has them.
        """
        out = self.adata.copy()
        fit = self.fit
        if fit is None:
            return out
        fit.result.to_adata(out)
        if fit.derived is not None:  # the graphs, projection and confidence, as `explorer fit` writes them
            fit.derived.to_adata(out)
        if fit.transitions is not None:
            out.obsp[Key.obsp.TRANSITIONS] = fit.transitions
        for basis, v in fit.velocity_embedding.items():
            out.obsm[Key.obsm.velocity(basis)] = v
        if fit.confidence is not None:
            out.obs[Key.obs.VELOCITY_CONFIDENCE] = fit.confidence
        return out

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
        from explorer.data.io import write

        protect = (self.dataset_path,)
        path = export_target(self.data_dir, name, protect=protect, overwrite=overwrite)
        adata = self.results_adata()
        write_new(lambda tmp: write(adata, tmp), path, overwrite=overwrite)
        self.status = f"saved {path.name}"
        return path


def load_dataset(path: Path, *, progress: Any = None) -> AnnData:
    """Read a dataset file and preprocess it when it has no ``Ms``/``Mu`` yet (as ``explorer fit`` does)."""
    from explorer.data.io import read
    from explorer.data.preprocess import is_preprocessed, prepare

    adata = read(path)
    if not is_preprocessed(adata) or Key.obsm.UMAP not in adata.obsm:
        has_basis = any(k.startswith("X_") and k != Key.obsm.PCA for k in adata.obsm)
        prepare(adata, compute_umap=not has_basis, progress=progress)
    return adata
