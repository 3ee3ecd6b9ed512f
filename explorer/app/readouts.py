"""What the views show, as pure functions of (data, fit, selection): no Panel, no state.

Each function takes the dataset (an AnnData, read only), a fit (:class:`~explorer.app.jobs.Fit`
or its :class:`~explorer.VelocityResult`) and the selection (a gene's column index, a
cell's row), and returns arrays or small frozen records that :mod:`explorer.app.plots`
draws. The session's :class:`~explorer.app.state.ExplorerState` decides when to call
them and remembers their results; tests call them directly.

What a fit can show comes from the model registry (:func:`fit_shows`): a fit draws a
fitted curve, per-cell predicted points, per-cell rates, a latent time or an
uncertainty because its :class:`~explorer.models.ModelSpec` declares it, never because
of its model's name. A fit read from a file whose model is not registered shows what its
data holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from explorer import kinetics
from explorer._types import InputError, Progress
from explorer.app.escape import hex_colors
from explorer.app.geometry import binned_mean, even_sample, time_bins
from explorer.data.io import read_column
from explorer.graph.projection import project_velocity as _project_on_transitions
from explorer.graph.streamlines import compute_streamlines, velocity_on_grid
from explorer.keys import Key
from explorer.models import MODELS

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from explorer.app.jobs import Fit
    from explorer.models.base import VelocityResult

#: colourings besides the categorical obs columns (which are offered by their own names)
COLOR_LATENT_TIME = "latent time"
COLOR_CONFIDENCE = "velocity confidence"
COLOR_UNCERTAINTY = "velocity uncertainty"
#: the posterior SD of the active fit's own latent time (VeloVAE's ``obs['latent_time_std']``)
COLOR_TIME_SD = "latent time SD"
#: how to read both uncertainty colourings: measured against simulations' truth
#: (benchmarks/trust_truth.py, the VeloVAE section of the README), neither ranks the cells by
#: their error, which is mostly the model's (a lineage's shared bias) and not the posterior's
UNCERTAINTY_NOTE = (
    "the spread of the model's posterior: where the model is unsure, not where it is wrong "
    "(on simulations it does not rank the cells by their error)"
)
#: how to read the time SD of a fit whose SD holds a second start's shift (VeloVAE's default
#: since 2026-12-05, ``obs['latent_time_start_shift']``; README, "VeloVAE", "The time SD with a
#: second start"): measured against simulations' truth, as the note above
TIME_SD_NOTE = (
    "the posterior's spread with how far a fit from another start places the cell: on 10 of 12 "
    "two-lineage simulations its 90 % intervals held 84-97 % of the true times, and on 10 it ranked "
    "the cells by their error (Spearman 0.37-0.75); where both fits err alike it is too narrow"
)
#: how to read scVelo's velocity confidence (same measurement): coherent is not correct
CONFIDENCE_NOTE = (
    "how well a cell's velocity agrees with its neighbours': coherent, not necessarily correct "
    "(on simulations it does not rank the cells by their error)"
)
#: where the active fit's latent time depends on its start (VeloVAE's ``obs['latent_time_start_spread']``)
COLOR_TIME_SPREAD = "latent time start spread"
#: the width of each cell's interval of place in the ordering, in cells (VeloVAE's
#: ``obs['latent_time_rank_width']``)
COLOR_TIME_RANK_WIDTH = "latent time rank width"
#: how to read it: measured against simulations' truth (README, "VeloVAE", "The time's uncertainty in cells")
RANK_WIDTH_NOTE = (
    "how much of the ordering the cell's place is unsure over, its posterior interval in cells with "
    "the two starts' disagreement; on 16 of 21 simulations it ranked the cells by their rank error "
    "(Spearman 0.2 or more; a perfect model's interval: 18)"
)
COLOR_EXPRESSION = "gene: expression (Ms)"
COLOR_VELOCITY = "gene: velocity"
#: a vector field's divergence per cell (``obs['vf_divergence']``), offered when a fit holds one
COLOR_DIVERGENCE = "vector field: divergence"
#: per-cell rates of the selected gene (fits that show ``"cell_rates"``), by layer
COLOR_RATES: dict[str, str] = {
    "gene: rate alpha (transcription)": Key.layers.RATE_ALPHA,
    "gene: rate beta (splicing)": Key.layers.RATE_BETA,
    "gene: rate gamma (degradation)": Key.layers.RATE_GAMMA,
}
#: every continuous colouring a session can offer
CONTINUOUS_COLORINGS = (
    COLOR_LATENT_TIME,
    COLOR_CONFIDENCE,
    COLOR_UNCERTAINTY,
    COLOR_TIME_SD,
    COLOR_TIME_SPREAD,
    COLOR_TIME_RANK_WIDTH,
    COLOR_EXPRESSION,
    COLOR_VELOCITY,
    *COLOR_RATES,
    COLOR_DIVERGENCE,
)
#: colourings that change with the selected gene
GENE_COLORINGS = (COLOR_EXPRESSION, COLOR_VELOCITY, *COLOR_RATES)

#: a category-to-colour map read from ``uns['<column>_colors']`` (scanpy's convention) or
#: else taken from this palette (Glasbey's distinct colours, as colorcet orders them)
FALLBACK_PALETTE = (
    "#d60000", "#8c3bff", "#018700", "#00acc6", "#97ff00", "#ff7ed1", "#6b004f", "#ffa52f",
    "#573b00", "#005659", "#0000dd", "#00fdcf", "#a17569", "#bcb6ff", "#95b577", "#bf03b8",
    "#645474", "#790000", "#0774d8", "#fdf490", "#004b00", "#8e7900", "#ff7266", "#edb8b8",
)  # fmt: skip

#: per-gene figures of the gene table: ``var`` key -> (header, what it means). A column is
#: shown only for a fit that has it; where two keys share a header the first one wins
#: (a dynamical fit's ``fit_r2`` before a stale steady-state ``velocity_r2`` in the file)
GENE_COLUMNS: dict[str, tuple[str, str]] = {
    Key.var.FIT_LIKELIHOOD: ("likelihood", "mean likelihood of the cells under the fitted curve (scVelo)"),
    Key.var.FIT_R2: ("R²", "R² of the fit against Mu/Ms"),
    Key.var.FIT_DISPLACEMENT_R: (
        "displacement r",
        "correlation over cells of the velocity with the cells' mean displacement to their "
        "future minus past neighbours (DeepVelo's training target)",
    ),
    Key.var.R2: ("R²", "R² of the steady-state line u = γ s against the extreme cells"),
    Key.var.FIT_ALPHA: ("alpha", "transcription rate"),
    Key.var.FIT_BETA: ("beta", "splicing rate, scVelo's convention (the ODE's is beta × scaling)"),
    Key.var.FIT_GAMMA: ("gamma", "degradation rate"),
    Key.var.GAMMA: ("gamma", "steady-state ratio u/s (degradation over splicing)"),
    Key.var.FIT_RATE_ALPHA: ("alpha", "median over cells of the per-cell transcription rate"),
    Key.var.FIT_RATE_BETA: ("beta", "median over cells of the per-cell splicing rate"),
    Key.var.FIT_RATE_GAMMA: ("gamma", "median over cells of the per-cell degradation rate"),
    Key.var.FIT_T_: (
        "switch time",
        "time the gene switches from induction to repression (none: it does not switch off)",
    ),
    Key.var.FIT_SCALING: ("scaling", "scale of u relative to s"),
    Key.var.FIT_KINETIC_SIGNAL: (
        "kinetic signal",
        "β/(β+γ), β the ODE's splicing rate (beta × scaling): 0 = a straight line, "
        "1 = maximal curvature (Bergen et al. 2021, Box 1). Not a trust check: the fitted "
        "rates do not recover it (Spearman with the truth -0.12 to 0.20 on three two-lineage simulations)",
    ),
    Key.var.FIT_DETECTION_POWER: ("detection power", "s∞·u∞, expression at steady state (same Box)"),
}
#: header of a fit's goodness of fit when no column above holds it
FIT_QUALITY = "fit quality"
TRUST = "trust"
TRUST_NOTES = "trust notes"

#: scVelo's ``tl.latent_time(min_likelihood=0.1)``: genes below it do not inform the latent time
MIN_LIKELIHOOD = 0.1
#: scVelo's ``tl.velocity_genes(min_r2=0.01)`` for the steady-state models
MIN_R2 = 0.01
#: detection power below this quantile of the fitted genes counts as weak (it has units)
WEAK_DETECTION_QUANTILE = 0.25
#: above this share of cells in the two steady states, induction and repression rest on few cells
MAX_STEADY_SHARE = 0.8
#: fewer weighted cells in the EM than this: explorer.models.dynamical warns the fit is poorly determined
MIN_CELLS_EM = 30

#: at most this many cells' predicted points per fit in the phase portrait (an even sample)
MAX_CELL_POINTS = 5_000
#: at most this many per-cell velocity arrows per fit in the phase portrait (an even sample)
MAX_CELL_ARROWS = 400


def _normal_quantile(p: float) -> float:
    """Quantile of the standard normal (scipy's, imported here only: the read-outs stay light)."""
    from scipy.stats import norm

    return float(norm.ppf(p))


@dataclass(frozen=True, slots=True)
class Coloring:
    """Per-cell colour values: ``kind`` says how to read ``values``.

    ``"category"``: ``values`` are category codes into ``categories`` with ``color_key``
    (category -> hex colour, fixed for the dataset); ``"continuous"``: float values (NaN
    drawn grey), on a diverging colour map centred on 0 when ``diverging``; ``"none"``:
    nothing to colour by (``label`` says why).
    """

    kind: Literal["category", "continuous", "none"]
    values: np.ndarray
    label: str
    categories: tuple[str, ...] = ()
    color_key: dict[str, str] | None = None
    diverging: bool = False
    #: how to read the values, shown under the plot beside the colour bar (empty: nothing to add)
    note: str = ""


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
    #: ``(k, 2)`` predicted ``(s, u)`` of (a sample of) the cells, for fits that show ``"cell_points"``
    points: np.ndarray | None = None
    #: ``(k, 4)`` each sampled cell's ``(s, u, ds, du)`` from its own rates (fits that show
    #: ``"cell_rates"``; :func:`cell_arrows`)
    arrows: np.ndarray | None = None
    #: each lineage's predicted ``(s, u)`` along latent time (fits with a cell state; :func:`lineage_curves`)
    lineages: tuple[LineageCurve, ...] | None = None
    #: the layers the fit draws for a gene that has them (``"curve"``, ``"line"``, ``"points"``,
    #: ``"arrows"``), whether or not this gene has: drawn empty when it has not, so that the
    #: portrait keeps its layers from gene to gene (:func:`explorer.app.plots.phase_fit_layers`)
    kinds: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class CellInfo:
    """What the cell inspector shows for the selected cell."""

    index: int
    name: str
    cluster: str | None
    latent_time: float | None
    confidence: float | None
    targets: pd.DataFrame  # columns: index, cell, cluster, probability; most likely first
    #: posterior standard deviation of the latent time (same scale), when the fit has one
    latent_time_sd: float | None = None
    #: the cell's rank distance between the fit's two initial times (VeloVAE), when it has one
    latent_time_start_spread: float | None = None
    #: the width of the cell's 90% interval of place in the ordering, a share of the cells (VeloVAE)
    latent_time_rank_width: float | None = None

    def latent_time_interval(self, level: float = 0.9) -> tuple[float, float] | None:
        """Return the central ``level`` interval ``t ± z sd`` of a Gaussian (None without an SD).

        A latent time on [0, 1] (the first cell to the last) keeps its interval within it: a
        place before the first cell or after the last is not on the axis (VeloVAE's SD with the
        second start's shift reaches past the ends, 0.768-1.063 for a late Epsilon cell).
        """
        if self.latent_time is None or self.latent_time_sd is None or not np.isfinite(self.latent_time_sd):
            return None
        z = float(_normal_quantile(0.5 + level / 2))
        t, half = self.latent_time, z * self.latent_time_sd
        if 0.0 <= t <= 1.0:
            return max(t - half, 0.0), min(t + half, 1.0)
        return t - half, t + half


@dataclass(frozen=True, slots=True)
class TrustCheck:
    """One per-gene check of the trust summary: the ``var`` column it reads and what passing means."""

    key: str
    name: str
    passes: str
    fails: str


#: the checks behind ``trust``, in the order the notes list them
TRUST_CHECKS: tuple[TrustCheck, ...] = (
    TrustCheck(
        Key.var.FIT_LIKELIHOOD,
        "fit",
        f"likelihood ≥ {MIN_LIKELIHOOD} (scVelo's threshold for the latent time)",
        "low likelihood",
    ),
    TrustCheck(
        Key.var.FIT_R2,
        "fit",
        f"R² of the predictions ≥ {MIN_R2} (scVelo's threshold for a dynamical fit's velocity genes)",
        "low R²",
    ),
    TrustCheck(Key.var.R2, "fit", f"R² ≥ {MIN_R2} (scVelo's threshold for velocity genes)", "low R²"),
    TrustCheck(
        Key.var.FIT_DETECTION_POWER,
        "detection",
        f"detection power above the lowest {WEAK_DETECTION_QUANTILE:.0%} of fitted genes",
        "weakly detected",
    ),
    TrustCheck(
        Key.var.FIT_FRAC_STEADY_ON,
        "transient cells",
        f"at most {MAX_STEADY_SHARE:.0%} of cells in the two steady states",
        "mostly steady",
    ),
    TrustCheck(
        Key.var.FIT_N_CELLS_EM,
        "cells",
        f"at least {MIN_CELLS_EM} cells with Mu and Ms above 0 carried the fit",
        "few cells",
    ),
)
#: a note, not a check: the gene's own clock starts later than the latent time
ONSET_NOTE = "induced after the root cells"
#: the check the trust diagnostics add once they ran (:func:`explorer.diagnostics.flag_genes`);
#: its ``fails`` is followed by the gene's reasons
DIAGNOSTICS_CHECK = TrustCheck(
    Key.var.DIAG_FLAGGED,
    "diagnostics",
    "not flagged by the trust diagnostics (differential kinetics across clusters, transcriptional "
    "boost, unstable; column flag)",
    "flagged",
)


# ----------------------------------------------------------------- the data
def dense_column(matrix: Any, j: int, dtype: type = np.float32) -> np.ndarray:
    """Column ``j`` of a dense, sparse or on-disk ``(n_obs, n_vars)`` matrix as ``dtype`` ``(n_obs,)``.

    A layer left on disk (:func:`explorer.data.io.read_zarr_lazy`) is read straight from
    its store (:func:`explorer.data.io.read_column`).
    """
    return np.ascontiguousarray(read_column(matrix, j), dtype=dtype)


def is_categorical(series: pd.Series) -> bool:
    """Whether an obs column is categorical (offered as a colouring by its name)."""
    return isinstance(series.dtype, pd.CategoricalDtype)


#: obs columns of cell types by their usual names (scVelo's, then common annotations and
#: scanpy's clusterings), looked for in this order, any case, before any other categorical column
CELL_TYPE_COLUMNS = (Key.obs.CLUSTERS, "cell_type", "celltype", "cell_types", "leiden", "louvain")


def cluster_column(adata: AnnData) -> str | None:
    """Name the obs column of cell types: the first of :data:`CELL_TYPE_COLUMNS`, else the first categorical.

    A named column counts when it is categorical (``clusters`` whatever its type, as before).
    So a data set whose first categorical column is a batch or a sample, with its cell
    types under ``cell_type``, is coloured, scored and split into lineages by the types.

    Examples
    --------
    >>> import pandas as pd
    >>> from anndata import AnnData
    >>> obs = pd.DataFrame({"batch": ["a", "b"], "Cell_Type": ["x", "y"]}, index=["c0", "c1"])
    >>> cluster_column(AnnData(obs=obs.astype("category")))
    'Cell_Type'
    """
    obs = adata.obs
    named = named_type_column(obs)
    return named if named is not None else next((c for c in obs.columns if is_categorical(obs[c])), None)


def named_type_column(obs: pd.DataFrame) -> str | None:
    """The cell types' column under a usual name (:data:`CELL_TYPE_COLUMNS`), else None (no guess)."""
    if Key.obs.CLUSTERS in obs:
        return Key.obs.CLUSTERS
    by_name = {str(c).lower(): c for c in obs.columns}
    for name in CELL_TYPE_COLUMNS:
        column = by_name.get(name)
        if column is not None and is_categorical(obs[column]):
            return column
    return None


def embedding(adata: AnnData, basis: str) -> np.ndarray:
    """``(n_obs, 2)`` float32 coordinates on ``basis``, C-ordered and read-only."""
    xy = np.array(np.asarray(adata.obsm[basis])[:, :2], dtype=np.float32, order="C")
    xy.flags.writeable = False
    return xy


def fit_bases(fit: Fit | VelocityResult) -> list[str]:
    """List the embeddings a fit holds (obsm ``X_*``, 2+ columns: ``X_rates_umap``), offered as bases."""
    obsm = _result(fit).obsm or {}
    return [
        k
        for k, v in obsm.items()
        if k.startswith("X_") and np.asarray(v).ndim == 2 and np.asarray(v).shape[1] >= 2
    ]  # noqa: PLR2004


def fit_embedding(fit: Fit | VelocityResult, basis: str) -> np.ndarray:
    """``(n_obs, 2)`` float32 coordinates of an embedding the fit holds (:func:`fit_bases`), read-only."""
    xy = np.array(np.asarray(_result(fit).obsm[basis])[:, :2], dtype=np.float32, order="C")
    xy.flags.writeable = False
    return xy


def gene_means(adata: AnnData) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``Ms`` and ``Mu`` per gene, ``(n_vars,)`` each."""
    ms, mu = adata.layers[Key.layers.MS], adata.layers[Key.layers.MU]
    return np.asarray(ms.mean(axis=0)).ravel(), np.asarray(mu.mean(axis=0)).ravel()


def color_key(adata: AnnData, column: str) -> dict[str, str]:
    """Map the categories of an obs column to fixed colours (``uns['<column>_colors']`` if valid)."""
    cats = [str(c) for c in adata.obs[column].cat.categories]
    stored = adata.uns.get(f"{column}_colors")
    colors = hex_colors(stored, len(cats))  # valid colours only: they go into CSS and Bokeh
    if colors is None:
        colors = [FALLBACK_PALETTE[i % len(FALLBACK_PALETTE)] for i in range(len(cats))]
    return dict(zip(cats, colors, strict=False))


# ----------------------------------------------------------------- the fits
def _result(fit: Fit | VelocityResult) -> VelocityResult:
    return getattr(fit, "result", fit)


def held(fit: Fit | VelocityResult) -> frozenset[str]:
    """Say what ``fit``'s arrays could show, whatever its model declares (:data:`explorer.models.SHOWS`)."""
    result = _result(fit)
    gp, layers = result.gene_params, result.layers
    out = set()
    rates = (Key.var.FIT_ALPHA, Key.var.FIT_BETA, Key.var.FIT_GAMMA, Key.var.FIT_T_)
    if Key.layers.FIT_T in layers and all(k in gp for k in rates):
        out.add("curve")
    if Key.layers.PREDICTED_U in layers and Key.layers.PREDICTED_S in layers:
        out.add("cell_points")
    if any(key in layers for key in COLOR_RATES.values()):
        out.add("cell_rates")
    if result.latent_time is not None:
        out.add("latent_time")
    if result.uncertainty is not None:
        out.add("uncertainty")
    return frozenset(out)


def fit_shows(fit: Fit | VelocityResult) -> frozenset[str]:
    """Say what the app draws for ``fit``: its registered model's ``shows``, where its data holds them.

    A fit of a model that is not registered (a file written by another tool) shows what
    its data holds (:func:`held`).
    """
    result = _result(fit)
    if result.model in MODELS:
        return MODELS.shows(result.model) & held(result)
    return held(result)


def gene_values(
    adata: AnnData, what: Literal["Ms", "Mu", "velocity"], j: int, fit: Fit | VelocityResult | None = None
) -> np.ndarray:
    """``(n_obs,)`` ``Ms``/``Mu`` of gene ``j``, or its velocity under ``fit`` (NaN without a fit)."""
    if what == "velocity":
        if fit is None:
            return np.full(adata.n_obs, np.nan, dtype=np.float32)
        return dense_column(_result(fit).velocity, j)
    return dense_column(adata.layers[Key.layers.MS if what == "Ms" else Key.layers.MU], j)


def velocity_gap(
    adata: AnnData, fit: Fit | VelocityResult | None, j: int, velocity: np.ndarray | None = None
) -> str | None:
    """Why ``fit`` gives gene ``j`` no velocity to draw (plain text, not escaped), or None when it gives one.

    A vector field's velocity covers the genes of its state only (the base model's
    velocity genes by default): another gene's column is NaN, so the velocity-over-time
    plot would be empty axes without a word. ``velocity``: gene ``j``'s velocity column
    under ``fit`` when the caller has read it already.
    """
    if fit is None:
        return None
    if np.isfinite(gene_values(adata, "velocity", j, fit) if velocity is None else velocity).any():
        return None
    gene, result = str(adata.var_names[j]), _result(fit)
    found = _field_data(adata, fit)
    if found is not None:
        genes = np.asarray(found[0].get("genes", np.zeros(0, dtype=str))).astype(str)
        if len(genes) == 0:
            return f"no velocity to draw for {gene}: this vector field is over an embedding, not genes"
        return (
            f"no velocity to draw for {gene}: it is not among the {len(genes):,} genes of the vector "
            "field's state (its base model's velocity genes); pick one of those, or fit the field with "
            "genes=all"
        )
    return f"no velocity to draw for {gene}: the {result.model} fit gives it none (not fitted)"


def _obs_values(adata: AnnData, key: str) -> np.ndarray | None:
    obs = adata.obs
    return obs[key].to_numpy(np.float32) if key in obs else None


def latent_time(adata: AnnData, fit: Fit | VelocityResult | None) -> np.ndarray | None:
    """Latent time of ``fit`` (if it shows one), else ``obs['latent_time']``, else None."""
    if fit is not None and "latent_time" in fit_shows(fit):
        return np.asarray(_result(fit).latent_time, dtype=np.float32)
    return _obs_values(adata, Key.obs.LATENT_TIME)


def confidence(adata: AnnData, fit: Fit | None) -> np.ndarray | None:
    """Velocity confidence of ``fit``, else ``obs['velocity_confidence']``, else None."""
    if fit is not None and fit.confidence is not None:
        return fit.confidence
    return _obs_values(adata, Key.obs.VELOCITY_CONFIDENCE)


def uncertainty(adata: AnnData, fit: Fit | VelocityResult | None) -> np.ndarray | None:
    """Per-cell uncertainty of ``fit`` (if it shows one), else ``obs['velocity_uncertainty']``, else None."""
    if fit is not None and "uncertainty" in fit_shows(fit):
        return np.asarray(_result(fit).uncertainty, dtype=np.float32)
    return _obs_values(adata, Key.obs.VELOCITY_UNCERTAINTY)


def cell_rate(fit: Fit | VelocityResult, layer: str, j: int) -> np.ndarray | None:
    """``(n_obs,)`` per-cell rate ``layer`` (``rate_alpha``...) of gene ``j``, if ``fit`` shows rates."""
    result = _result(fit)
    if "cell_rates" not in fit_shows(result) or layer not in result.layers:
        return None
    return dense_column(result.layers[layer], j)


def color_options(adata: AnnData, fits: Mapping[str, Fit], fates: Sequence[FateInfo] = ()) -> list[str]:
    """List what the cells can be coloured by: categorical obs columns, then the continuous colourings.

    Uncertainty is offered when a fit shows one or the file holds one, the latent time's SD
    when a fit has one (:func:`latent_time_sd`); per-cell rates when a
    fit shows them; a vector field's divergence when a fit has one; fate probabilities (and
    computed terminal states) for every terminal
    state in ``fates`` (the file's and those the session computed).
    """
    shows = frozenset().union(*(fit_shows(f) for f in fits.values())) if fits else frozenset()
    options = [c for c in adata.obs.columns if is_categorical(adata.obs[c])]
    options += [COLOR_LATENT_TIME, COLOR_CONFIDENCE]
    if "uncertainty" in shows or Key.obs.VELOCITY_UNCERTAINTY in adata.obs:
        options.append(COLOR_UNCERTAINTY)
    if any(latent_time_sd(f) is not None for f in fits.values()):
        options.append(COLOR_TIME_SD)
    if any(latent_time_start_spread(f) is not None for f in fits.values()):
        options.append(COLOR_TIME_SPREAD)
    if any(latent_time_rank_width(f) is not None for f in fits.values()):
        options.append(COLOR_TIME_RANK_WIDTH)
    options += [COLOR_EXPRESSION, COLOR_VELOCITY]
    if "cell_rates" in shows:
        options += list(COLOR_RATES)
    if any(field_coloring(adata, f) is not None for f in fits.values()):
        options.append(COLOR_DIVERGENCE)
    for found in fates:
        options += [o for o in fate_options(found) if o not in options]
    return options


def coloring(
    adata: AnnData,
    what: str,
    *,
    fit: Fit | None = None,
    gene: str | None = None,
    key: dict[str, str] | None = None,
    column: np.ndarray | None = None,
    fates: FateInfo | None = None,
) -> Coloring:
    """Per-cell colour values for ``what`` (an obs column or one of :data:`CONTINUOUS_COLORINGS`).

    ``fit`` is the active fit, ``gene`` the selected gene, ``key`` the column's colour map
    if already known (default: :func:`color_key`) and ``column`` the gene's ``Ms`` or
    velocity if already read (:func:`gene_values`; the phase portrait reads them too);
    ``fates`` the fates a ``"fate: <state>"`` colouring reads (:func:`fate_coloring`).
    """
    obs = adata.obs
    if what in obs and is_categorical(obs[what]):
        column = obs[what]
        return Coloring(
            kind="category",
            values=column.cat.codes.to_numpy(),
            label=what,
            categories=tuple(str(c) for c in column.cat.categories),
            color_key=key if key is not None else color_key(adata, what),
        )
    if what.startswith(FATE_PREFIX) or what == COLOR_TERMINAL:
        return fate_coloring(fates, what, adata.n_obs)
    j = int(adata.var_names.get_loc(gene)) if gene is not None and what in GENE_COLORINGS else -1
    values: np.ndarray | None
    if what == COLOR_LATENT_TIME:
        values, why = latent_time(adata, fit), "no latent time: run a model that orders cells in time"
    elif what == COLOR_CONFIDENCE:
        values, why = confidence(adata, fit), "no velocity confidence: run a model"
    elif what == COLOR_UNCERTAINTY:
        values, why = uncertainty(adata, fit), "the active model reports no uncertainty"
    elif what == COLOR_TIME_SD:
        values, why = latent_time_sd(fit), "the active model reports no latent-time SD (VeloVAE does)"
    elif what == COLOR_TIME_SPREAD:
        values = latent_time_start_spread(fit)
        why = "the active model reports no start spread (VeloVAE does, without capture times)"
    elif what == COLOR_TIME_RANK_WIDTH:
        values, why = latent_time_rank_width(fit), "the active model reports no rank width (VeloVAE does)"
    elif what == COLOR_EXPRESSION and j >= 0:
        values, why = (column if column is not None else gene_values(adata, "Ms", j)), ""
    elif what == COLOR_VELOCITY and j >= 0:
        if fit is None:
            values, why = None, "no velocity: run a model"
        else:
            values, why = (column if column is not None else gene_values(adata, "velocity", j, fit)), ""
    elif what == COLOR_DIVERGENCE:
        values, why = field_coloring(adata, fit), "the active model has no vector field"
    elif what in COLOR_RATES and j >= 0:
        values = cell_rate(fit, COLOR_RATES[what], j) if fit is not None else None
        why = "the active model has no per-cell rates"
    else:
        values, why = None, f"cannot colour by {what!r}"
    if values is None:
        return Coloring(kind="none", values=np.zeros(adata.n_obs, dtype=np.float32), label=why)
    label = f"{gene} {what.removeprefix('gene: ')}" if what in GENE_COLORINGS else what
    diverging = what in (COLOR_VELOCITY, COLOR_DIVERGENCE)  # both signed: 0 in the middle
    # measured for VeloVAE's own: not said of another tool's column read from a file
    own_uncertainty = fit is not None and "uncertainty" in fit_shows(fit)
    ours = what == COLOR_TIME_SD or (what == COLOR_UNCERTAINTY and own_uncertainty)
    notes = {COLOR_CONFIDENCE: CONFIDENCE_NOTE, COLOR_TIME_RANK_WIDTH: RANK_WIDTH_NOTE}
    note = UNCERTAINTY_NOTE if ours else notes.get(what, "")
    if what == COLOR_TIME_SD and _own_time_column(fit, Key.obs.LATENT_TIME_START_SHIFT) is not None:
        note = TIME_SD_NOTE
    return Coloring(kind="continuous", values=values, label=label, diverging=diverging, note=note)


def agreement_coloring(values: np.ndarray | None, n_obs: int) -> Coloring:
    """Colour the Compare tab's map by the cosine of two fits' velocities (:func:`velocity_agreement`)."""
    if values is None:
        return Coloring(kind="none", values=np.zeros(n_obs, dtype=np.float32), label="pick two fits")
    return Coloring(kind="continuous", values=values, label="velocity agreement (cosine)")


# ------------------------------------------------------------ the embedding
def project(fit: Fit, xy: np.ndarray) -> np.ndarray | None:
    """``(n_obs, 2)`` velocity of ``fit`` on the embedding ``xy``, or None without a transition matrix.

    scVelo's signed projection as :func:`explorer.pipeline.derive` computes it when the fit
    has its velocity graphs, else the projection on its transition matrix (a file with
    ``T_fwd`` only).
    """
    if fit.derived is not None:
        return fit.derived.project(xy)
    if fit.transitions is not None:
        return np.asarray(_project_on_transitions(fit.transitions, xy))
    return None


def streamlines(xy: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    """Streamlines of the velocity ``v`` on the embedding ``xy`` (polylines ``(n_points, 2)``)."""
    return compute_streamlines(xy, v)


def arrow_grid(xy: np.ndarray, v: np.ndarray) -> Any:
    """Velocity averaged on a grid over the embedding (a ``GridField``)."""
    # half scVelo's grid density: 25 x 25 arrows stay readable beside the streamlines
    return velocity_on_grid(xy, v, density=0.5)


def transition_targets(fit: Fit | None, index: int, n_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cells, probabilities)``: the ``n_targets`` likeliest next cells of cell ``index``, in order."""
    if fit is None or fit.transitions is None:
        return np.empty(0, dtype=np.int64), np.empty(0)
    row = fit.transitions[index]
    cols, probs = row.indices, row.data
    keep = cols != index
    cols, probs = cols[keep], probs[keep]
    order = np.argsort(-probs, kind="stable")[:n_targets]
    return cols[order].astype(np.int64), probs[order].astype(float)


def _own_time_column(fit: Fit | VelocityResult | None, key: str) -> np.ndarray | None:
    """``(n_obs,)`` obs column ``key`` of a fit that shows its own latent time, or None.

    A column about a latent time (its SD, its start spread) without the fit's own time
    would describe another clock.
    """
    if fit is None or "latent_time" not in fit_shows(fit):
        return None
    obs = _result(fit).obs
    if obs is None or key not in obs:
        return None
    return obs[key].to_numpy(dtype=np.float64)


def latent_time_sd(fit: Fit | VelocityResult | None) -> np.ndarray | None:
    """``(n_obs,)`` posterior SD of ``fit``'s own latent time (obs ``latent_time_std``; VeloVAE), or None."""
    return _own_time_column(fit, Key.obs.LATENT_TIME_STD)


def latent_time_start_spread(fit: Fit | VelocityResult | None) -> np.ndarray | None:
    """``(n_obs,)`` the rank distance of ``fit``'s two starts (obs ``latent_time_start_spread``), or None."""
    return _own_time_column(fit, Key.obs.LATENT_TIME_START_SPREAD)


def latent_time_rank_width(fit: Fit | VelocityResult | None) -> np.ndarray | None:
    """``(n_obs,)`` each cell's interval of place in ``fit``'s ordering, in cells, or None.

    VeloVAE's ``obs['latent_time_rank_width']`` (:func:`explorer.models.vae.rank_width`).
    """
    return _own_time_column(fit, Key.obs.LATENT_TIME_RANK_WIDTH)


def cell_info(
    adata: AnnData,
    fit: Fit | None,
    index: int,
    *,
    n_targets: int,
    t: np.ndarray | None = None,
    conf: np.ndarray | None = None,
    t_sd: np.ndarray | None = None,
    t_spread: np.ndarray | None = None,
    t_rank_width: np.ndarray | None = None,
) -> CellInfo:
    """Collect what the inspector shows for cell ``index``: cluster, ``t`` ± ``t_sd``, ``conf``, targets.

    ``t_spread``: the cell's start spread (VeloVAE's ``obs['latent_time_start_spread']``);
    ``t_rank_width``: its interval of place in cells (``obs['latent_time_rank_width']``).
    """
    column = cluster_column(adata)
    clusters = adata.obs[column].to_numpy() if column else None  # index it, never convert all cells
    cells, probs = transition_targets(fit, index, n_targets)
    rows = pd.DataFrame({"index": cells, "probability": probs})
    rows.insert(1, "cell", adata.obs_names[cells].astype(str))
    rows.insert(2, "cluster", clusters[cells].astype(str) if clusters is not None else "")
    return CellInfo(
        index=index,
        name=str(adata.obs_names[index]),
        cluster=str(clusters[index]) if clusters is not None else None,
        latent_time=float(t[index]) if t is not None else None,
        confidence=float(conf[index]) if conf is not None else None,
        targets=rows,
        latent_time_sd=float(t_sd[index]) if t_sd is not None and t is not None else None,
        latent_time_start_spread=float(t_spread[index]) if t_spread is not None and t is not None else None,
        latent_time_rank_width=(
            float(t_rank_width[index]) if t_rank_width is not None and t is not None else None
        ),
    )


# --------------------------------------------------------- phase and time
def cell_points(fit: Fit | VelocityResult, j: int, *, max_points: int = MAX_CELL_POINTS) -> np.ndarray | None:
    """``(k, 2)`` predicted ``(s, u)`` of gene ``j`` for an even sample of the (finite) cells, or None."""
    result = _result(fit)
    if "cell_points" not in fit_shows(result):
        return None
    s = dense_column(result.layers[Key.layers.PREDICTED_S], j, np.float64)
    u = dense_column(result.layers[Key.layers.PREDICTED_U], j, np.float64)
    ok = np.flatnonzero(np.isfinite(s) & np.isfinite(u))
    if ok.size == 0:
        return None
    ok = ok[even_sample(ok.size, max_points)]
    return np.column_stack([s[ok], u[ok]])


def cell_arrows(
    fit: Fit | VelocityResult,
    ms: np.ndarray,
    mu: np.ndarray,
    j: int,
    *,
    max_arrows: int = MAX_CELL_ARROWS,
) -> np.ndarray | None:
    """``(k, 4)`` rows ``(s, u, ds, du)``: each sampled cell's velocity from its own rates, or None.

    For a fit that shows ``"cell_rates"`` with all three rate layers: at the cell's
    observed ``(Ms, Mu)``, ``du = alpha_i - beta_i u_i`` and ``ds = beta_i u_i - gamma_i s_i``
    (DeepVelo's equations, rates of cell ``i``). An even sample of at most ``max_arrows``
    cells whose values are all finite, so the portrait stays light.
    """
    result = _result(fit)
    keys = (Key.layers.RATE_ALPHA, Key.layers.RATE_BETA, Key.layers.RATE_GAMMA)
    if "cell_rates" not in fit_shows(result) or any(k not in result.layers for k in keys):
        return None
    alpha, beta, gamma = (dense_column(result.layers[k], j, np.float64) for k in keys)
    s, u = np.asarray(ms, dtype=np.float64), np.asarray(mu, dtype=np.float64)
    du = alpha - beta * u
    ds = beta * u - gamma * s
    ok = np.flatnonzero(np.isfinite(s) & np.isfinite(u) & np.isfinite(ds) & np.isfinite(du))
    if ok.size == 0:
        return None
    ok = ok[even_sample(ok.size, max_arrows)]
    return np.column_stack([s[ok], u[ok], ds[ok], du[ok]])


def phase_fits(
    ms: np.ndarray,
    mu: np.ndarray,
    fits: Mapping[str, Fit],
    *,
    j: int,
    active: str | None,
    lineages: Mapping[str, Lineages | None] | None = None,
    fit_t: Callable[[Fit], np.ndarray] | None = None,
) -> list[PhaseFit]:
    """For each fit, what the phase portrait draws for gene ``j`` (``ms``, ``mu``: its cells' values).

    A fit that shows ``"curve"`` gets its trajectory from
    :func:`explorer.kinetics.fitted_gene` (the parameters that produced ``fit_t`` and the
    velocities; the shared-axis onset ``fit_t_on`` is a diagnostic, never drawn), up to the
    latest cell's gene time, and the steady-state line ``u = (scaling γ / β) s``; a fit
    with a ``velocity_gamma`` column the line ``u = γ s``. Lines stay inside the cells'
    range (:func:`explorer.kinetics.steady_state_line`). A fit that shows
    ``"cell_points"`` gets its cells' predicted ``(s, u)`` (:func:`cell_points`), one that
    shows ``"cell_rates"`` each sampled cell's own velocity (:func:`cell_arrows`); one
    with lineages in ``lineages`` (label -> :func:`lineages`) a curve per lineage
    (:func:`lineage_curves`). ``fit_t``: returns a fit's ``fit_t`` column of gene ``j`` as
    stored (a caller that keeps the column read, so a store's column is read once a click).
    """
    s_max = float(np.nanmax(ms)) if np.isfinite(ms).any() else 1.0
    u_max = float(np.nanmax(mu)) if np.isfinite(mu).any() else 1.0
    out = []
    for label, fit in fits.items():
        shows = fit_shows(fit)
        params = fit.result.gene_params
        gp = params.iloc[j]
        kinds = {
            kind
            for kind, shown in (
                ("curve", "curve" in shows),
                ("line", "curve" in shows or Key.var.GAMMA in params.columns),
                ("points", "cell_points" in shows),
                ("arrows", "cell_rates" in shows),
            )
            if shown
        }
        slope: float | None = None
        s = u = None
        if Key.var.GAMMA in gp and np.isfinite(gp[Key.var.GAMMA]):
            slope = float(gp[Key.var.GAMMA])
        gene = kinetics.fitted_gene(gp) if "curve" in shows else None
        if gene is not None:
            # u = (gamma / beta) s for the model's u = Mu / scaling: Mu = scaling gamma / beta s
            slope = gene.scaling * gene.gamma / gene.beta
            column = fit_t(fit) if fit_t is not None else read_column(fit.result.layers[Key.layers.FIT_T], j)
            times = np.asarray(column, dtype=np.float32)
            s, u = gene.phase_curve(float(np.nanmax(times)) if np.isfinite(times).any() else np.nan)
        out.append(
            PhaseFit(
                label=label,
                active=label == active,
                slope=slope,
                s=s,
                u=u,
                line=kinetics.steady_state_line(slope, s_max, u_max),
                points=cell_points(fit, j),
                arrows=cell_arrows(fit, ms, mu, j),
                lineages=lineage_curves(fit, j, (lineages or {}).get(label)),
                kinds=frozenset(kinds),
            )
        )
    return out


def fitted_at_cells(
    fit: Fit | VelocityResult | None,
    j: int,
    cells: np.ndarray | None = None,
    *,
    fit_t: Callable[[Fit | VelocityResult], np.ndarray] | None = None,
) -> dict[str, np.ndarray] | None:
    """``{"Ms", "Mu"[, "velocity"]}``: values of gene ``j`` that ``fit`` predicts per cell, or None.

    A fit that shows ``"curve"``: the fitted ``s``/``u``/velocity at each cell's gene time
    (as the phase portrait), from one evaluation of the curve; one that shows
    ``"cell_points"``: its predicted ``s``/``u`` (no predicted velocity). ``cells``: only
    these cells (indices), in their order; default all ``(n_obs,)``. ``fit_t``: returns ``fit``'s
    ``fit_t`` column of gene ``j`` (all cells; a caller that keeps the column read).
    """
    if fit is None:
        return None
    result = _result(fit)
    shows = fit_shows(result)

    def column(layer: str) -> np.ndarray:
        # the cells picked first, then converted: a tenth of the copy at 10^6 cells
        if layer == Key.layers.FIT_T and fit_t is not None:
            values = fit_t(fit)
        else:
            values = read_column(result.layers[layer], j)
        return np.ascontiguousarray(values if cells is None else values[cells], dtype=np.float64)

    if "curve" in shows:
        gene = kinetics.fitted_gene(result.gene_params.iloc[j])
        if gene is not None:
            uu, ss, vs = gene.at(column(Key.layers.FIT_T))
            return {"Ms": ss, "Mu": uu, "velocity": vs}
    if "cell_points" in shows:
        return {
            what: column(layer) for what, layer in (("Ms", Key.layers.PREDICTED_S), ("Mu", Key.layers.PREDICTED_U))
        }
    return None


def time_curve(
    t: np.ndarray,
    observed: np.ndarray | None,
    fitted: np.ndarray | None,
    *,
    bins: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, Literal["fit", "trend"]]:
    """``(t, value, kind)``: a gene's curve against latent time ``t``, averaged in bins of ``t``.

    The fit's values per cell (:func:`fitted_at_cells`, ``kind="fit"``) when there are any,
    else the ``observed`` values (``kind="trend"``; needed only then). ``bins`` may pass
    :func:`~explorer.app.geometry.time_bins` of ``t`` computed before.

    The fit's curve is broken (NaN) at a bin whose mean no cell's fitted value is within
    :data:`CURVE_GAP_SHARE` of the gene's fitted range of: the cells at that time part
    (two lineages, one expressing the gene and one not, each cell at its own gene time), and
    the mean lay between them, a line through none of the cells (the dynamical model on the
    bundled sample's gene_0003 from latent time 0.5 on).
    """
    bins = bins if bins is not None else time_bins(t)
    values, kind = (observed, "trend") if fitted is None else (fitted, "fit")
    x, y = binned_mean(t, values, bins=bins)
    if kind == "fit" and len(y):
        y = _break_between_cells(np.asarray(values, dtype=np.float64), bins[0], len(bins[1]), y)
    return x, y, kind


#: the fit's time curve is broken at a bin whose nearest cell is farther from the bin's mean
#: than this share of the gene's fitted range (:func:`time_curve`)
CURVE_GAP_SHARE = 0.05


def _break_between_cells(
    values: np.ndarray, which: np.ndarray, n_bins: int, mean: np.ndarray
) -> np.ndarray:
    """``mean`` (the filled bins' means, as :func:`binned_mean` gives them), NaN where no cell is near it."""
    ok = (which >= 0) & np.isfinite(values)
    which, values = which[ok], values[ok]
    filled = np.bincount(which, minlength=n_bins) > 0
    per_bin = np.full(n_bins, np.nan)
    per_bin[filled] = mean
    nearest = np.full(n_bins, np.inf)
    np.minimum.at(nearest, which, np.abs(values - per_bin[which]))
    span = float(values.max() - values.min()) if len(values) else 0.0
    apart = nearest[filled] > CURVE_GAP_SHARE * span
    return np.where(apart, np.nan, mean)


# --------------------------------------------------------------- gene table
def _check_values(gene_params: pd.DataFrame, check: TrustCheck) -> np.ndarray:
    values = pd.to_numeric(gene_params[check.key], errors="coerce").to_numpy(dtype=float)
    if check.key == Key.var.FIT_FRAC_STEADY_ON:
        off = gene_params.get(Key.var.FIT_FRAC_STEADY_OFF)
        values = values + (0.0 if off is None else pd.to_numeric(off, errors="coerce").to_numpy(dtype=float))
    return values


def trust_checks(gene_params: pd.DataFrame, *, scvelo_likelihood: bool = True) -> list[TrustCheck]:
    """List the :data:`TRUST_CHECKS` a fit's ``gene_params`` allow (their column, with a finite value).

    One goodness-of-fit check, the first of: the likelihood, the R² of the fit's
    predictions (``fit_r2``), the steady-state line's R². ``scvelo_likelihood`` says whether
    ``fit_likelihood`` is scVelo's EM likelihood (a fit that shows ``"curve"``), which
    :data:`MIN_LIKELIHOOD` is the threshold for; another model's likelihood (VeloVAE's:
    scVelo's formula without its cell weights, above 0.1 for every gene of a fit that
    explains any variance) is not judged by it, and its ``fit_r2`` is.
    """
    out, fit_checked = [], False
    for check in TRUST_CHECKS:
        if check.key not in gene_params or (check.name == "fit" and fit_checked):
            continue
        if check.key == Key.var.FIT_LIKELIHOOD and not scvelo_likelihood:
            continue
        if np.isfinite(_check_values(gene_params, check)).any():
            out.append(check)
            fit_checked = fit_checked or check.name == "fit"
    return out


def gene_trust(
    gene_params: pd.DataFrame,
    *,
    scvelo_likelihood: bool = True,
    flags: pd.Series | None = None,
    fitted: np.ndarray | None = None,
) -> pd.DataFrame | None:
    """Per gene, the share of :func:`trust_checks` it passes and notes on those it fails.

    Only the checks the fit's columns allow count; a gene with none of their values
    finite (not fitted) gets NaN. ``fit_uses_t_on`` adds a note, not a check. None when the
    fit has no column any check reads. ``flags``, the trust diagnostics' reasons per gene
    (``diag_flag_reason`` indexed by gene, ``""`` where none), adds
    :data:`DIAGNOSTICS_CHECK` for every fitted gene: a flagged one fails it, with its
    reasons in words in the notes (until 2026-12-05 a flagged gene kept its green light and
    "passes every check"). For a fit no check can read (DeepVelo, a vector field), the
    diagnostics alone judge the genes in ``fitted`` (``(n_vars,)`` bool, its velocity genes).

    Returns
    -------
    A frame indexed like ``gene_params`` with columns ``trust`` (0 to 1) and ``trust notes``.
    """
    checks = trust_checks(gene_params, scvelo_likelihood=scvelo_likelihood)
    if not checks and (flags is None or fitted is None):
        return None
    n = len(gene_params)
    passed = np.zeros(n)
    counted = np.zeros(n)
    notes = [[] for _ in range(n)]
    for check in checks:
        values = _check_values(gene_params, check)
        finite = np.isfinite(values)
        if check.key == Key.var.FIT_LIKELIHOOD:
            ok = values >= MIN_LIKELIHOOD
        elif check.key in (Key.var.R2, Key.var.FIT_R2):
            ok = values >= MIN_R2
        elif check.key == Key.var.FIT_DETECTION_POWER:
            ok = values > np.quantile(values[finite], WEAK_DETECTION_QUANTILE)
        elif check.key == Key.var.FIT_FRAC_STEADY_ON:
            ok = values <= MAX_STEADY_SHARE
        else:  # cells in the EM
            ok = values >= MIN_CELLS_EM
        ok &= finite
        passed += ok
        counted += finite
        for i in np.flatnonzero(finite & ~ok):
            notes[i].append(check.fails)
    if flags is not None:
        reasons = flags.reindex(gene_params.index).fillna("").astype(str).to_numpy()
        judged = counted > 0 if checks else np.asarray(fitted, dtype=bool)
        passed += judged & (reasons == "")
        counted += judged
        for i in np.flatnonzero(judged & (reasons != "")):
            words = ", ".join(FLAG_WORDS.get(r, r) for r in reasons[i].split(","))
            notes[i].append(f"{DIAGNOSTICS_CHECK.fails}: {words}")
    if Key.var.FIT_USES_T_ON in gene_params:
        onset = gene_params[Key.var.FIT_USES_T_ON].to_numpy()
        for i in np.flatnonzero(pd.notna(onset) & (onset == True)):  # noqa: E712 - bool or 0/1 columns
            notes[i].append(ONSET_NOTE)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(counted > 0, passed / counted, np.nan)
    return pd.DataFrame({TRUST: score, TRUST_NOTES: ["; ".join(x) for x in notes]}, index=gene_params.index)


#: the trust-diagnostics column of the gene table (explorer.diagnostics' flags, when computed)
FLAG = "flag"

#: what each reason of explorer.diagnostics.flag_genes is called on the page
FLAG_WORDS = {
    "differential_kinetics": "differential kinetics across clusters",
    "boost": "transcriptional boost",
    "unstable": "unstable",
}


def flags_summary(flags: pd.DataFrame, flagged: np.ndarray, var_names: pd.Index, *, has_types: bool) -> str:
    """The note under the gene table on the trust flags: how many genes, and for which reasons.

    ``flags`` is :func:`explorer.diagnostics.gene_diagnostics`' table (``diag_flag_reason``),
    ``flagged`` the flagged velocity genes (in ``var_names`` order). Each reason is counted
    among them (a gene with two counts twice); without cell types (``has_types``) the note
    says the differential kinetic test did not run (it named it as a reason anyway).

    Examples
    --------
    >>> flags = pd.DataFrame({"diag_flag_reason": ["boost", "", "boost,unstable"]}, index=list("abc"))
    >>> flags_summary(flags, np.array([True, False, True]), pd.Index(list("abc")), has_types=True)
    '**2** velocity genes flagged (column *flag*): transcriptional boost 2, unstable 1.'
    """
    reasons = flags[Key.var.DIAG_FLAG_REASON].reindex(var_names).fillna("").astype(str).to_numpy()[flagged]
    counts = {word: sum(key in r.split(",") for r in reasons) for key, word in FLAG_WORDS.items()}
    shown = ", ".join(f"{word} {n:,}" for word, n in counts.items() if n)
    note = f"**{int(flagged.sum()):,}** velocity genes flagged (column *{FLAG}*)"
    note += f": {shown}." if shown else "."
    if not has_types:
        note += f" No cell types, so {FLAG_WORDS['differential_kinetics']} were not tested."
    return note


def gene_table(
    var_names: pd.Index,
    means: tuple[np.ndarray, np.ndarray],
    fit: Fit | VelocityResult | None,
    flags: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per gene: mean ``Ms``/``Mu``, then what the fit says about the gene.

    Columns: ``gene``, ``mean Ms``, ``mean Mu``; with a fit, ``trust`` and ``trust notes``
    (:func:`gene_trust`) when the fit has a figure they read, the headers of
    :data:`GENE_COLUMNS` the fit has a value for, its goodness of fit as ``fit quality``
    when none of those holds it, and ``velocity gene``. A column that would be all NaN
    is left out: a steady-state fit's R² appears as ``R²``, never as a likelihood. With
    ``flags`` (:func:`explorer.app.fits.fit_diagnostics`), ``flag``: the reasons a gene is
    flagged (``differential_kinetics``, ``boost``, ``unstable``), empty for the others; a
    flagged gene also fails ``trust``'s :data:`DIAGNOSTICS_CHECK`.
    """
    table = pd.DataFrame({"gene": var_names.astype(str), "mean Ms": means[0], "mean Mu": means[1]})
    if fit is None:
        return table
    result = _result(fit)
    gp = result.gene_params
    reasons = None if flags is None else flags[Key.var.DIAG_FLAG_REASON]
    fitted = np.asarray(result.velocity_genes, dtype=bool)
    trust = gene_trust(gp, scvelo_likelihood="curve" in fit_shows(result), flags=reasons, fitted=fitted)
    if trust is not None:
        table[TRUST] = trust[TRUST].to_numpy()
        table[TRUST_NOTES] = trust[TRUST_NOTES].to_numpy()
    quality_keys = (Key.var.FIT_LIKELIHOOD, Key.var.FIT_R2, Key.var.R2, Key.var.FIT_DISPLACEMENT_R)
    for key, (header, _) in GENE_COLUMNS.items():
        if key in gp and header not in table:
            values = pd.to_numeric(gp[key], errors="coerce").to_numpy(dtype=float)
            if np.isfinite(values).any():
                table[header] = values
    if result.likelihood is not None and not any(k in gp for k in quality_keys):
        table[FIT_QUALITY] = result.likelihood.to_numpy(dtype=float)
    table["velocity gene"] = np.asarray(result.velocity_genes, dtype=bool)
    if flags is not None:
        table[FLAG] = flags[Key.var.DIAG_FLAG_REASON].reindex(var_names).fillna("").astype(str).to_numpy()
    return table


def column_help(table: pd.DataFrame, gene_params: pd.DataFrame | None = None) -> dict[str, str]:
    """Explain each column of :func:`gene_table` (built from ``gene_params``), for header tooltips."""
    text: dict[str, str] = {}
    for key, (header, meaning) in GENE_COLUMNS.items():
        # the key that filled the header: the first one the fit has (see gene_table)
        if header not in text and (gene_params is None or key in gene_params):
            text[header] = meaning
    text.update(
        {
            "gene": "gene name (type in the box to filter)",
            "mean Ms": "mean smoothed spliced abundance",
            "mean Mu": "mean smoothed unspliced abundance",
            TRUST: "share of the fit checks the gene passes (green: all); see the notes and the legend",
            TRUST_NOTES: "the checks the gene fails",
            FIT_QUALITY: "the model's per-gene goodness of fit",
            "velocity gene": "used for the velocity graph and the embedding",
            FLAG: "trust diagnostics: differential kinetics across clusters, transcriptional boost, unstable",
        }
    )
    return {c: text[c] for c in table.columns if c in text}


def trust_legend(fit: Fit | VelocityResult | None, *, diagnosed: bool = False) -> list[str]:
    """One line per check of :func:`gene_trust` that ``fit``'s columns allow, then the onset note.

    ``diagnosed``: the trust diagnostics ran, and :data:`DIAGNOSTICS_CHECK` counts too.
    """
    if fit is None:
        return []
    gene_params = _result(fit).gene_params
    checks = trust_checks(gene_params, scvelo_likelihood="curve" in fit_shows(fit))
    if diagnosed:  # for a fit no other check reads (DeepVelo), the one check
        checks.append(DIAGNOSTICS_CHECK)
    lines = [f"{check.name}: {check.passes} — else “{check.fails}”" for check in checks]
    if lines and Key.var.FIT_USES_T_ON in gene_params:
        lines.append(f"note “{ONSET_NOTE}”: the gene's own clock starts after latent time 0 (not a failure)")
    return lines


# ----------------------------------------------------------------- compare
def own_latent_time(fit: Fit | VelocityResult | None) -> np.ndarray | None:
    """``(n_obs,)`` latent time of ``fit`` itself if it shows one (never the file's ``obs``), else None.

    The Compare tab sets two fits' times against each other: a fit without its own must
    not borrow the dataset's (it would look like perfect agreement).
    """
    if fit is None or "latent_time" not in fit_shows(fit):
        return None
    return np.asarray(_result(fit).latent_time, dtype=np.float32)


def quality_name(fit: Fit | VelocityResult | None) -> str:
    """Name of ``fit``'s per-gene goodness of fit: ``likelihood``, ``R²``, or ``fit quality``."""
    likelihood = None if fit is None else _result(fit).likelihood
    if likelihood is None or likelihood.name not in GENE_COLUMNS:
        return FIT_QUALITY
    return GENE_COLUMNS[likelihood.name][0]


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


def quality_axes(a: Fit | VelocityResult, b: Fit | VelocityResult) -> tuple[str, str, str]:
    """Axis labels and title of the per-gene fit-quality plot of A against B: honest about scales.

    Each model reports its own measure: scVelo's likelihood of the dynamical model (a
    Gaussian of the distance to the curve, noise per gene, on the cells scVelo weights),
    VeloVAE's (scVelo's formula on its per-cell predictions over all training cells, without
    those weights: close, not one scale), an R². Two fits are on one scale when they
    are fits of one model (any parameters) or both report the steady-state line's R²
    (``var['velocity_r2']``, computed alike by every steady-state model). Otherwise the
    title says so and points at the reconstruction error (:func:`compare_reconstruction`:
    one scorer, the same cells and genes), and a measure both name alike (a likelihood)
    carries its model's name on its axis.
    """
    ra, rb = _result(a), _result(b)
    name_a, name_b = quality_name(a), quality_name(b)
    if one_scale(a, b):
        return f"A: {name_a}", f"B: {name_b}", "per-gene fit quality (click a gene)"
    if name_a == name_b:
        name_a, name_b = f"{name_a} ({ra.model})", f"{name_b} ({rb.model})"
    # short enough for the 400-pixel plot (the page cut a longer one after 45 characters)
    title = "not one scale: see reconstruction error"
    return f"A: {name_a}", f"B: {name_b}", title


def one_scale(a: Fit | VelocityResult, b: Fit | VelocityResult) -> bool:
    """Whether A's and B's per-gene fit quality are one measure (:func:`quality_axes`).

    Only then does the diagonal of their scatter mean something.
    """
    ra, rb = _result(a), _result(b)
    if ra.likelihood is None or rb.likelihood is None or ra.likelihood.name != rb.likelihood.name:
        return False
    return ra.model == rb.model or ra.likelihood.name == Key.var.R2


def compare_quality(
    var_names: pd.Index, a: Fit | VelocityResult | None, b: Fit | VelocityResult | None
) -> pd.DataFrame | None:
    """Per-gene goodness of fit of A and B (columns gene, a, b) for the genes both fitted, or None.

    Each fit's own measure: :func:`quality_axes` says whether the two are on one scale.
    """
    if a is None or b is None:
        return None
    ra, rb = _result(a), _result(b)
    if ra.likelihood is None or rb.likelihood is None:
        return None
    table = pd.DataFrame(
        {
            "gene": var_names.astype(str),
            "a": ra.likelihood.to_numpy(dtype=float),
            "b": rb.likelihood.to_numpy(dtype=float),
        }
    )
    return table[np.isfinite(table["a"]) & np.isfinite(table["b"])].reset_index(drop=True)


# ------------------------------------------------------- reconstruction
@dataclass(frozen=True, slots=True)
class ReconstructionComparison:
    """Per-gene reconstruction error of fits A and B on the same cells (the Compare tab).

    ``table`` has columns ``gene``, ``a``, ``b`` (MSE of ``(Mu, Ms)`` per gene,
    :func:`explorer.models.metrics.reconstruction_error`) for the genes both predict;
    ``cells`` says which cells were scored, ``n_cells`` how many; ``summary`` is each
    fit's MSE over those genes and cells.
    """

    table: pd.DataFrame
    cells: str
    n_cells: int
    summary: tuple[float, float]


def predictions(fit: Fit | VelocityResult) -> tuple[np.ndarray, np.ndarray] | None:
    """``(u_hat, s_hat)``, each ``(n_obs, n_vars)``, of a fit that shows ``"cell_points"`` or ``"curve"``.

    :func:`explorer.models.metrics.predicted_abundances` on the fit's own layers and
    per-gene parameters (VeloVAE's predicted points, the dynamical model's curve at each
    cell's gene time); None for a fit that predicts no abundances (NaN: genes not fitted).
    """
    from explorer.models.metrics import predicted_abundances

    result = _result(fit)
    if not {"cell_points", "curve"} & fit_shows(result):
        return None
    keys = (Key.layers.PREDICTED_U, Key.layers.PREDICTED_S, Key.layers.FIT_T)
    light = AnnData(
        obs=pd.DataFrame(index=result.obs_names),
        var=result.gene_params.copy(),
        layers={k: result.layers[k] for k in keys if k in result.layers},
    )
    return predicted_abundances(light)


def held_out_cells(*fits: Fit | VelocityResult | None) -> tuple[np.ndarray | None, str]:
    """``(mask, words)``: the cells every fit held out of its training (obs ``fit_train`` False).

    Fits that recorded no split do not restrict the cells. None (score all cells) when no
    fit recorded one, or when the fits held out no cell in common; ``words`` says which.
    """
    masks = []
    for fit in fits:
        obs = None if fit is None else _result(fit).obs
        if obs is not None and Key.obs.FIT_TRAIN in obs:
            masks.append(~obs[Key.obs.FIT_TRAIN].to_numpy(dtype=bool))
    if not masks:
        return None, "all cells (no fit recorded held-out cells)"
    held = np.logical_and.reduce(masks)
    if not held.any():
        return None, "all cells (the fits held out no cell in common)"
    who = "both fits" if len(masks) > 1 else "the fit that recorded a split"
    return held, f"held-out cells ({int(held.sum()):,} cells that {who} did not train on)"


def compare_reconstruction(
    adata: AnnData, a: Fit | VelocityResult | None, b: Fit | VelocityResult | None
) -> ReconstructionComparison | None:
    """Per-gene MSE of A's and B's predicted ``(u, s)`` on the held-out cells (:func:`held_out_cells`).

    Scored by :func:`explorer.models.metrics.reconstruction_error`, the one function
    every model is scored by, on the genes both predict for every cell. None unless both
    fits predict abundances (:func:`predictions`).
    """
    from explorer.models.metrics import common_genes, reconstruction_error

    if a is None or b is None:
        return None
    pa, pb = predictions(a), predictions(b)
    if pa is None or pb is None:
        return None
    held, words = held_out_cells(a, b)
    genes = common_genes(*pa, *pb)
    mu = np.asarray(_dense_layer(adata.layers[Key.layers.MU]), dtype=np.float64)
    ms = np.asarray(_dense_layer(adata.layers[Key.layers.MS]), dtype=np.float64)
    # reconstruction_error scores "test" on cells outside `train`
    train = None if held is None else ~held
    column = "mse_train" if held is None else "mse_test"
    errors = [
        reconstruction_error(mu, ms, u, s, train=train, genes=genes, var_names=adata.var_names)
        for u, s in (pa, pb)
    ]
    table = pd.DataFrame(
        {
            "gene": adata.var_names.astype(str),
            "a": errors[0].per_gene[column].to_numpy(),
            "b": errors[1].per_gene[column].to_numpy(),
        }
    )
    table = table[genes & np.isfinite(table["a"]) & np.isfinite(table["b"])].reset_index(drop=True)
    n_cells = adata.n_obs if held is None else int(held.sum())
    return ReconstructionComparison(
        table=table,
        cells=words,
        n_cells=n_cells,
        summary=(errors[0].summary[column], errors[1].summary[column]),
    )


def log10_positive(values: np.ndarray) -> np.ndarray:
    """log10 of the positive values, NaN elsewhere (the reconstruction plot's axes: MSEs span decades)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)


def _dense_layer(matrix: Any) -> np.ndarray:
    return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)


# -------------------------------------------------------------------- fates
#: colourings by fate probability are offered as this prefix + the terminal state's name
FATE_PREFIX = "fate: "
#: the terminal states a session computed (a file's own are its obs column ``term_states_fwd``)
COLOR_TERMINAL = "terminal states (computed)"


@dataclass(frozen=True, slots=True)
class FateInfo:
    """Terminal states and each cell's probability of reaching each (CellRank 2's ``lineages_fwd``).

    ``names``: the terminal states; ``probabilities``: ``(n_obs, len(names))``;
    ``terminal``: ``(n_obs,)`` code into ``names`` of the terminal state a cell belongs to
    (-1: none); ``colors``: name -> colour; ``source``: where they come from, in words.
    Fates computed in the session also carry how: ``n_states`` (the macrostates asked for),
    ``mode`` (the velocity kernel's) and ``chosen`` (terminal states named by the user, not
    CellRank's stability rule); a file's have ``n_states`` 0. The macrostates found are
    the state's (``ExplorerState.terminal_choices``).
    """

    names: tuple[str, ...]
    probabilities: np.ndarray
    terminal: np.ndarray
    colors: dict[str, str]
    source: str
    n_states: int = 0
    mode: str = "deterministic"
    chosen: bool = False

    @property
    def key(self) -> tuple:
        """What tells these fates from others of the same source (a memo key)."""
        return (self.source, self.n_states, self.mode, self.names, self.chosen)

    def answers(self, n_states: int, terminal: Sequence[str], mode: str = "deterministic") -> bool:
        """Whether these are the fates asked for: ``n_states`` macrostates, ``terminal``, ``mode``.

        ``terminal`` names the terminal states; empty asks for CellRank's stability rule.
        """
        if (self.n_states, self.mode) != (n_states, mode):
            return False
        return set(terminal) == set(self.names) if terminal else not self.chosen


def fates_from_adata(adata: AnnData) -> FateInfo | None:
    """Read the fates stored in a file (``explorer fates`` or CellRank 2 wrote them), or None.

    Reads obsm ``lineages_fwd`` (columns: the categories of obs ``term_states_fwd``) and
    ``uns['term_states_fwd_colors']`` when they are valid colours.
    """
    key_probs, key_states = Key.obsm.FATE_PROBABILITIES, Key.obs.TERMINAL_STATES
    if (
        key_probs not in adata.obsm
        or key_states not in adata.obs
        or not is_categorical(adata.obs[key_states])
    ):
        return None
    probs = np.asarray(adata.obsm[key_probs], dtype=np.float32)
    states = adata.obs[key_states]
    names = tuple(str(c) for c in states.cat.categories)
    if probs.ndim != 2 or probs.shape[1] != len(names):  # noqa: PLR2004
        return None
    return FateInfo(
        names=names,
        probabilities=probs,
        terminal=states.cat.codes.to_numpy().astype(np.int64),
        colors=color_key(adata, key_states),
        source="the file",
    )


def fate_options(fates: FateInfo | None) -> list[str]:
    """List the colourings ``fates`` offers: one per terminal state, and the computed terminal states."""
    if fates is None:
        return []
    return [
        *(f"{FATE_PREFIX}{name}" for name in fates.names),
        *([COLOR_TERMINAL] if fates.source != "the file" else []),
    ]


def fate_coloring(fates: FateInfo | None, what: str, n_obs: int) -> Coloring:
    """Colour cells by a fate probability (``"fate: <state>"``) or by the computed terminal states."""
    if fates is None:
        return Coloring(
            kind="none",
            values=np.zeros(n_obs, dtype=np.float32),
            label="no fates for the active fit: press Compute fates",
        )
    if what == COLOR_TERMINAL:
        return Coloring(
            kind="category",
            values=fates.terminal,
            label=f"terminal states ({fates.source})",
            categories=fates.names,
            color_key=fates.colors,
        )
    name = what.removeprefix(FATE_PREFIX)
    if name not in fates.names:
        return Coloring(
            kind="none",
            values=np.zeros(n_obs, dtype=np.float32),
            label=f"no terminal state {name!r} in the fates of {fates.source}",
        )
    values = fates.probabilities[:, fates.names.index(name)]
    return Coloring(
        kind="continuous", values=values, label=f"probability of reaching {name} ({fates.source})"
    )


def cell_fates(fates: FateInfo | None, index: int) -> pd.DataFrame | None:
    """Cell ``index``'s probability of reaching each terminal state, likeliest first (state, probability)."""
    if fates is None:
        return None
    p = fates.probabilities[index]
    table = pd.DataFrame({"state": list(fates.names), "probability": p.astype(float)})
    return table.sort_values("probability", ascending=False, kind="stable").reset_index(drop=True)


# ------------------------------------------------------------- random walks
@dataclass(frozen=True, slots=True)
class RandomWalks:
    """Random walks from one cell on a fit's transition matrix, and where they ended.

    ``walks``: ``(n_walks, n_steps + 1)`` cell indices (column 0 the start); ``ends``: a
    table of the end cells' clusters (columns ``cluster``, ``walks``, ``share``), most
    walks first; ``fit``: the fit's label.
    """

    start: int
    walks: np.ndarray
    ends: pd.DataFrame
    fit: str


def walk_ends(adata: AnnData, walks: np.ndarray) -> pd.DataFrame:
    """Count the walks by the cluster of their last cell (columns cluster, walks, share), most first.

    Without cell types (:func:`cluster_column`) no rows: there is nothing to count them by
    (the page said all of them ended in "—").
    """
    column = cluster_column(adata)
    last = np.asarray(walks)[:, -1]
    labels = adata.obs[column].to_numpy()[last].astype(str) if column else np.empty(0, dtype=str)
    counts = pd.Series(labels, dtype=str).value_counts(sort=True)
    return pd.DataFrame(
        {
            "cluster": counts.index.astype(str),
            "walks": counts.to_numpy(dtype=np.int64),
            "share": counts.to_numpy(dtype=float) / max(len(last), 1),
        }
    )


def walk_paths(xy: np.ndarray, walks: np.ndarray, *, max_paths: int = 30) -> list[np.ndarray]:
    """Return the first ``max_paths`` walks as polylines ``(n_steps + 1, 2)`` on the embedding ``xy``."""
    return [np.asarray(xy[w], dtype=np.float64) for w in np.asarray(walks)[:max_paths]]


# ------------------------------------------------------------------ metrics
def parse_transitions(text: str, clusters: Any) -> list[tuple[str, str]]:
    """Read ``"A>B, C>D"`` into ``[("A", "B"), ("C", "D")]``, checking each name is a cluster.

    Raises
    ------
    InputError
        For a pair without ``>`` or a name that is not among ``clusters`` (the message
        lists the valid names).
    """
    valid = [str(c) for c in clusters]
    pairs = []
    for item in (p.strip() for p in str(text).split(",")):
        if not item:
            continue
        if item.count(">") != 1:
            msg = f"Expected transitions as 'source>target' separated by commas; found {item!r}."
            raise InputError(msg)
        source, target = (x.strip() for x in item.split(">"))
        unknown = [x for x in (source, target) if x not in valid]
        if unknown and not valid:
            msg = (
                f"Cannot score {item!r}: the data has no cell types (an obs column such as "
                "'clusters') to name a transition's source and target. Leave the transitions "
                "empty, or open data with cell types."
            )
            raise InputError(msg)
        if unknown:
            msg = f"Unknown cluster {unknown[0]!r} in {item!r}. Valid options are: {', '.join(valid)}."
            raise InputError(msg)
        pairs.append((source, target))
    return pairs


@dataclass(frozen=True, slots=True)
class MetricsTable:
    """The Compare tab's scores: one row per fit (``table``), per fit its per-cluster means.

    ``per_cell`` maps each fit's label to its ``(n_obs,)`` per-cell scores, one column per
    column of ``table`` that has them (``cbdir[A>B]``, ``icvcoh``, ``consistency``,
    ``consistency_type``, ``velocity_confidence``, ``MSE``: NaN for the cells a score
    leaves out); ``clusters`` is each cell's cluster (None without clusters); ``per_gene``
    maps each fit's label to its genes' terms of each ``cbdir[A>B]`` (one row per gene,
    summing to the CBDir: :func:`explorer.graph.metrics.cross_boundary_gene_terms`).
    """

    table: pd.DataFrame
    per_cluster: dict[str, pd.DataFrame]
    per_cell: dict[str, pd.DataFrame] = field(default_factory=dict)
    clusters: np.ndarray | None = None
    per_gene: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MetricDetail:
    """What a click on the metrics table shows: a table, a sentence, and per-cell values to colour by.

    ``values`` (``(n_obs,)``, NaN for cells not scored) and ``label`` are the clicked fit's
    per-cell scores of the clicked metric; None when the click has none (a fit's name).
    ``genes`` (a transition's CBDir only) holds the genes that carry it, described by
    ``genes_title`` (:func:`transition_genes`).
    """

    title: str
    table: pd.DataFrame
    values: np.ndarray | None = None
    label: str = ""
    genes: pd.DataFrame | None = None
    genes_title: str = ""


#: genes listed under a clicked transition's CBDir (those with the largest terms of the clicked fit)
TRANSITION_GENES_SHOWN = 20


def transition_genes(
    found: MetricsTable, model: str, metric: str, n: int = TRANSITION_GENES_SHOWN
) -> pd.DataFrame | None:
    """The genes that carry fit ``model``'s ``cbdir[A>B]`` (``metric``): its ``n`` largest terms.

    A gene's term is its share of the CBDir (the terms of all genes sum to it): positive where
    its velocity points from A towards B, negative where it points back, weighted by the
    gene's share of the velocity's and the displacement's lengths. Columns ``gene``, then
    one per fit with terms, rows ordered by the clicked fit's term (most backward first).
    None without terms (a fit scored before they were kept, or no scored cell).
    """
    clicked = found.per_gene.get(model)
    if clicked is None or metric not in clicked:
        return None
    terms = clicked[metric].dropna()
    if terms.empty:
        return None
    top = terms.loc[terms.abs().nlargest(n).index].sort_values().index
    table = pd.DataFrame({"gene": [str(g) for g in top]})
    for label, per_gene in found.per_gene.items():
        if metric in per_gene:
            table[label] = per_gene[metric].reindex(top).to_numpy(dtype=np.float64)
    return table


#: the metrics table's summary of several per-cell scores -> the per-cell column it averages
_PER_CELL_OF = {
    "consistency": Key.obs.VELOCITY_CONSISTENCY,
    "consistency_type": Key.obs.VELOCITY_CONSISTENCY_TYPE,
    "velocity_confidence": Key.obs.VELOCITY_CONFIDENCE,
}


def _cluster_means(columns: dict[str, np.ndarray], clusters: np.ndarray | None) -> pd.DataFrame:
    """Per cluster (and ``all cells`` first), the mean of each column over its finite values, and the cells scored."""
    groups = {"all cells": np.ones(len(next(iter(columns.values()))), dtype=bool)}
    if clusters is not None:
        groups.update({str(c): clusters == c for c in pd.unique(clusters)})
    rows = []
    for name, cells in groups.items():
        row: dict[str, Any] = {"cluster": name}
        scored = np.zeros(cells.sum(), dtype=bool)
        for label, values in columns.items():
            x = np.asarray(values, dtype=np.float64)[cells]
            ok = np.isfinite(x)
            scored |= ok
            row[label] = float(x[ok].mean()) if ok.any() else float("nan")
        row["cells scored"] = int(scored.sum())
        if row["cells scored"]:
            rows.append(row)
    return pd.DataFrame(rows, columns=["cluster", *columns, "cells scored"])


def metric_detail(found: MetricsTable, model: str, metric: str) -> MetricDetail | None:
    """The detail behind one cell of the metrics table: row ``model``, column ``metric``.

    - the ``model`` column (or ``MSE cells``): that fit's per-cluster means of every per-cell score;
    - ``cbdir``: every transition's CBDir, one column per fit;
    - any other metric with per-cell scores (``cbdir[A>B]``, ``icvcoh[A]``, ``icvcoh``,
      ``consistency``, ``consistency_type``, ``velocity_confidence``, ``MSE``): its mean
      per cluster over the cells it scores, one column per fit, with ``all cells`` first,
      and the clicked fit's per-cell values (to colour the cells by); a transition's CBDir
      also the genes that carry it (:func:`transition_genes`).

    None for an unknown fit or column.
    """
    if model not in found.per_cluster or metric not in found.table.columns:
        return None
    if metric in ("model", "MSE cells"):
        return MetricDetail(f"Per cluster, {model} (mean over its cells)", found.per_cluster[model])
    fits = list(found.table["model"].astype(str))
    if metric == "cbdir":
        names = [c for c in found.table.columns if c.startswith("cbdir[")]
        table = found.table.set_index("model")[names].T.rename_axis("transition").reset_index()
        table.columns = ["transition", *fits]
        return MetricDetail("CBDir per transition (cbdir is their mean)", table)
    clusters = found.clusters
    if metric.startswith("icvcoh"):
        column = "icvcoh"
        inside = (
            np.isin(clusters, [metric[len("icvcoh[") : -1]])
            if metric.startswith("icvcoh[")
            else np.isin(clusters, [c[len("icvcoh[") : -1] for c in found.table.columns if c.startswith("icvcoh[")])
        )
    else:
        column, inside = metric, None
    per_model = {}
    for label in fits:
        cells = found.per_cell.get(label)
        if cells is None or column not in cells:
            continue
        values = cells[column].to_numpy(dtype=np.float64).copy()
        if inside is not None:
            values[~inside] = np.nan
        per_model[label] = values
    if not per_model:
        return None
    where = "over the source cells with neighbours in the target" if metric.startswith("cbdir[") else "over its cells"
    values = per_model.get(model)
    genes = transition_genes(found, model, metric) if metric.startswith("cbdir[") else None
    return MetricDetail(
        f"{metric} per cluster, mean {where}, every fit",
        _cluster_means(per_model, clusters),
        values,
        f"{metric}, {model} (per cell)",
        genes,
        (
            f"The genes that carry {metric} for {model}: each gene's term (all genes' terms sum to "
            "the CBDir; below 0 the gene's velocity points back from the source to the target), "
            f"the {len(genes)} largest in size of {model}, most backward first. Click a gene to select it."
            if genes is not None
            else ""
        ),
    )


def metric_coloring(detail: MetricDetail | None, n_obs: int) -> Coloring | None:
    """Colour the cells by a clicked metric's per-cell values (None when the detail has none)."""
    if detail is None or detail.values is None:
        return None
    return Coloring(kind="continuous", values=detail.values.astype(np.float32), label=detail.label)


def model_metrics(
    adata: AnnData, fits: Mapping[str, Fit], transitions: list[tuple[str, str]]
) -> MetricsTable:
    """Score every fit by :func:`explorer.models.metrics.model_metrics`, the one metrics function.

    Each fit is written into a light AnnData that shares ``adata``'s arrays (the data is
    never written to) and scored there: CBDir per transition and their mean, ICVCoh of
    the clusters named and their mean, overall and cell-type-wise consistency, velocity
    confidence (recomputed alike for every fit), and reconstruction MSE for fits that
    predict ``(u, s)``: on the cells the fit held out when it recorded a split (``MSE
    cells``: ``held-out``), else on all cells.

    Returns
    -------
    A :class:`MetricsTable`: ``table`` has a ``model`` column (the fit's label), then the
    summary names of :func:`explorer.models.metrics.model_metrics` (``cbdir[A>B]``,
    ``cbdir``, ``icvcoh[A]``, ``icvcoh``, ``consistency``, ``consistency_type``,
    ``velocity_confidence``), ``MSE`` and ``MSE cells``; ``per_cluster`` maps each label
    to the per-cluster means of the per-cell scores.
    """
    from explorer.models.metrics import model_metrics as score

    column = cluster_column(adata)
    rows, per_cluster, per_cell, per_gene = [], {}, {}, {}
    for label, fit in fits.items():
        result = _result(fit)
        light = AnnData(
            obs=adata.obs[[column]].copy() if column else pd.DataFrame(index=adata.obs_names),
            var=pd.DataFrame(index=adata.var_names),
            layers={k: adata.layers[k] for k in (Key.layers.MS, Key.layers.MU)},
            obsp={k: adata.obsp[k] for k in (Key.obsp.DISTANCES,) if k in adata.obsp},
        )
        result.to_adata(light)
        found = score(light, transitions=transitions, cluster_key=column or Key.obs.CLUSTERS)
        summary = found.summary
        held = Key.obs.FIT_TRAIN in light.obs and np.isfinite(summary.get("mse_test", np.nan))
        row = {"model": label}
        row.update({k: v for k, v in summary.items() if k.startswith(("cbdir", "icvcoh"))})
        for k in ("consistency", "consistency_type", "velocity_confidence"):
            row[k] = summary.get(k, float("nan"))
        row["MSE"] = summary.get("mse_test" if held else "mse", float("nan"))
        row["MSE cells"] = ("held-out" if held else "all") if np.isfinite(row["MSE"]) else ""
        rows.append(row)
        per_cluster[label] = found.per_cluster.rename_axis("cluster").reset_index()
        per_gene[label] = found.per_gene
        cells = found.per_cell.rename(columns={v: k for k, v in _PER_CELL_OF.items()})
        cells = cells.drop(columns=[c for c in ("mse", "mae") if c in cells])
        if "mse" in found.per_cell:
            mse = found.per_cell["mse"].to_numpy(dtype=np.float64).copy()
            if held:  # the table's MSE is the held-out cells'
                mse[light.obs[Key.obs.FIT_TRAIN].to_numpy(dtype=bool)] = np.nan
            cells["MSE"] = mse
        per_cell[label] = cells
    clusters = adata.obs[column].astype(str).to_numpy() if column else None
    return MetricsTable(pd.DataFrame(rows), per_cluster, per_cell, clusters, per_gene)


# ------------------------------------------------------------- vector field
#: RK4 steps of the path drawn from a clicked cell (each moves a cell at the median speed by
#: about one length scale: 100 cross the pancreas from Ngn3 high EP to the endocrine cells)
TRAJECTORY_STEPS = 100
#: paths of a perturbation drawn on the embedding (the fate shift counts every start cell)
MAX_PERTURBED_PATHS = 30


@dataclass(frozen=True, slots=True)
class FieldInfo:
    """A fit's learned vector field, ready to integrate (:func:`field_info`).

    ``adata`` is a light AnnData holding what :mod:`explorer.models.vector_field` reads (the
    field's ``uns``/``obsm``/``varm`` keys, ``Ms``, the cluster column and the embedding
    ``basis``, sharing the data's arrays); ``field`` the rebuilt
    :class:`~explorer.models.vector_field.FittedField`; ``genes`` the genes a perturbation
    can move (the PCA state's; empty for a field over an ``obsm`` space).
    """

    label: str
    adata: AnnData
    field: Any
    basis: str
    genes: tuple[str, ...]


def has_field(adata: AnnData, fit: Fit | VelocityResult | None) -> bool:
    """Whether ``fit`` carries a vector field (its own, or the file's when it is the file's fit)."""
    return fit is not None and _field_data(adata, fit) is not None


def _field_data(adata: AnnData, fit: Fit | VelocityResult) -> tuple[dict, np.ndarray, Any] | None:
    """``(uns['vector_field'], obsm['vf_state'], varm['vf_loadings'] or None)`` of ``fit``, or None."""
    result = _result(fit)
    data = getattr(result, "field_data", None)
    state = (result.obsm or {}).get(Key.obsm.VF_STATE)
    if isinstance(data, dict) and data and state is not None:
        return data, state, getattr(result, "loadings", None)
    # a field read from a file: VelocityResult.from_adata keeps no field, the file does
    stored = adata.uns.get(Key.uns.VECTOR_FIELD)
    if (
        result.model == "vector_field"
        and isinstance(stored, dict)
        and Key.obsm.VF_STATE in adata.obsm
        and getattr(fit, "key", ("", ()))[1] == (("source", "'file'"),)
    ):
        return stored, np.asarray(adata.obsm[Key.obsm.VF_STATE]), adata.varm.get(Key.varm.VF_LOADINGS)
    return None


def field_info(adata: AnnData, fit: Fit, xy: np.ndarray, *, basis: str) -> FieldInfo | None:
    """Rebuild ``fit``'s vector field (:func:`explorer.models.vector_field.load_field`), or None.

    ``xy`` are the cells' coordinates on ``basis`` (where paths are drawn). The data is
    never written to: the field's keys go into a light AnnData sharing its arrays.
    """
    from explorer.models.vector_field import load_field

    found = _field_data(adata, fit)
    if found is None:
        return None
    data, state, loadings = found
    column = cluster_column(adata)
    name = basis.removeprefix("X_")
    light = AnnData(
        obs=adata.obs[[column]].copy() if column else pd.DataFrame(index=adata.obs_names),
        var=pd.DataFrame(index=adata.var_names),
        layers={Key.layers.MS: adata.layers[Key.layers.MS]},
        obsm={Key.obsm.VF_STATE: np.asarray(state), Key.obsm.embedding(name): np.asarray(xy)[:, :2]},
        varm={Key.varm.VF_LOADINGS: np.asarray(loadings)} if loadings is not None else {},
        uns={Key.uns.VECTOR_FIELD: {**data, "cluster_key": column or data.get("cluster_key")}},
    )
    fld = load_field(light)
    genes = tuple(str(g) for g in fld.genes) if fld.cols is not None else ()
    return FieldInfo(label=fit.label, adata=light, field=fld, basis=name, genes=genes)


@dataclass(frozen=True, slots=True)
class Trajectory:
    """A path integrated on the learned field from one cell (:func:`field_trajectory`).

    ``path``: ``(n_steps + 1, 2)`` on the embedding; ``end_cell``/``end_cluster``: the
    observed cell nearest to the path's end and its cluster; ``fit``: the fit's label.
    """

    start: int
    path: np.ndarray
    end_cell: str
    end_cluster: str
    n_steps: int
    fit: str


def field_trajectory(info: FieldInfo, index: int, *, n_steps: int = TRAJECTORY_STEPS) -> Trajectory:
    """Integrate ``info``'s field from cell ``index`` (:func:`.vector_field.simulate_trajectories`)."""
    from explorer.models.vector_field import simulate_trajectories

    frame = simulate_trajectories(
        info.adata, np.array([int(index)]), n_steps=n_steps, basis=info.basis, field=info.field
    )
    path = frame[[f"{info.basis}_1", f"{info.basis}_2"]].to_numpy(dtype=np.float64)
    return Trajectory(
        start=int(index),
        path=path,
        end_cell=str(frame["end_cell"].iloc[-1]),
        end_cluster=str(frame["end_cluster"].iloc[-1]),
        n_steps=n_steps,
        fit=info.label,
    )


@dataclass(frozen=True, slots=True)
class FixedPoints:
    """The field's fixed points on the embedding: ``xy`` ``(k, 2)``, ``kind`` (attractor...), ``cluster``."""

    xy: np.ndarray
    kind: tuple[str, ...]
    cluster: tuple[str, ...]


def fixed_points(info: FieldInfo) -> FixedPoints:
    """Where the field's fixed points (``uns['vector_field']['fixed_points']``) lie on the embedding.

    On the basis the fit carried them to (``fixed_points['embedding']``, the weighted mean
    of the nearest cells' positions, as paths are carried), else at their nearest cell.
    Only those the cells support (``fixed_points['supported']``, when the fit has it:
    see :func:`explorer.models.vector_field.fixed_point_table`).
    """
    data = info.adata.uns[Key.uns.VECTOR_FIELD]
    fixed = dict(data.get("fixed_points", {}))
    states = np.asarray(fixed.get("state", np.zeros((0, 0))), dtype=np.float32)
    if states.ndim != 2 or len(states) == 0:  # noqa: PLR2004
        return FixedPoints(np.zeros((0, 2)), (), ())
    keep = np.asarray(fixed.get("supported", np.ones(len(states), bool)), dtype=bool)
    if keep.shape == (len(states),) and not keep.all():
        for name in ("type", "embedding"):
            if name in fixed and len(fixed[name]) == len(states):
                fixed[name] = np.asarray(fixed[name])[keep]
        states = states[keep]
        if len(states) == 0:
            return FixedPoints(np.zeros((0, 2)), (), ())
    nearest_cells = info.field.nearest_cells(states)
    grid_basis = str((data.get("grid") or {}).get("basis", ""))
    stored = np.asarray(fixed.get("embedding", np.zeros((0, 2))), dtype=np.float64)
    if grid_basis == Key.obsm.embedding(info.basis) and stored.shape == (len(states), 2):
        xy = stored
    else:
        xy = np.asarray(info.adata.obsm[Key.obsm.embedding(info.basis)], dtype=np.float64)[nearest_cells]
    column = cluster_column(info.adata)
    labels = info.adata.obs[column].astype(str).to_numpy() if column else np.asarray(info.adata.obs_names)
    return FixedPoints(
        xy=xy,
        kind=tuple(str(k) for k in np.asarray(fixed.get("type", ["?"] * len(states)))),
        cluster=tuple(str(c) for c in labels[nearest_cells]),
    )


@dataclass(frozen=True, slots=True)
class PerturbationRun:
    """An in-silico perturbation on a fit's field (:func:`field_perturbation`).

    ``table``: one row per fate (index), columns ``control``, ``perturbed`` and ``shift``
    (:func:`explorer.models.vector_field.perturb`): with fate probabilities, the mean fate
    probabilities of the cells nearest to the paths' ends; without, the share of the
    start cells whose path ends nearest to each cluster; ``measure`` says which, in words;
    ``control_paths``/``perturbed_paths``: polylines on the embedding of an even sample of
    at most :data:`MAX_PERTURBED_PATHS` start cells, unperturbed and perturbed.
    """

    gene: str
    factor: float
    n_cells: int
    n_steps: int
    fit: str
    basis: str
    table: pd.DataFrame
    control_paths: list[np.ndarray]
    perturbed_paths: list[np.ndarray]
    measure: str = "nearest cluster"


def _carry(field: Any, points: np.ndarray, xy: np.ndarray, k: int = 15) -> np.ndarray:
    """``(n, 2)`` places of states on the embedding, as the field carries its paths there.

    The Gaussian-weighted mean (width: the field's length scale) of the positions of the
    ``k`` nearest cells in the state, weights relative to the nearest one
    (:func:`explorer.models.vector_field.simulate_trajectories` places its paths so).
    """
    k = min(k, len(xy))
    d, idx = field.tree.query(np.asarray(points, dtype=np.float64), k=k)
    d, idx = d.reshape(len(points), k), idx.reshape(len(points), k)
    w = np.exp(-0.5 * (d**2 - d[:, :1] ** 2) / field.length_scale**2)
    w /= w.sum(1, keepdims=True)
    return np.einsum("nk,nkd->nd", w, np.asarray(xy, dtype=np.float64)[idx])


def field_perturbation(
    info: FieldInfo,
    gene: str,
    *,
    cells: Any,
    factor: float,
    n_steps: int = TRAJECTORY_STEPS,
    progress: Any = None,
    max_paths: int = MAX_PERTURBED_PATHS,
    fates: FateInfo | None = None,
) -> PerturbationRun:
    """Scale ``gene``'s ``Ms`` by ``factor`` in ``cells`` (rows), integrate, and compare where they go.

    The fate shift is :func:`explorer.models.vector_field.perturb` (the gene held at its new
    level all along the path) over every start cell: with ``fates`` (the session's or the
    file's, :class:`FateInfo`), the mean fate probabilities of the cells nearest to the
    paths' ends; without, the clusters of those cells. The paths drawn are those of an
    even sample of ``max_paths`` of its cells. ``progress`` (a
    :class:`~explorer.ProgressCallback`) sees every RK4 step, and can stop the run there.

    Raises
    ------
    InputError
        An empty selection, a factor below 0, a gene outside the field's genes or a field
        over an ``obsm`` space (from :func:`~explorer.models.vector_field.perturb`).
    """
    from explorer.models.vector_field import perturb

    idx = np.unique(np.asarray(cells, dtype=np.int64).ravel())
    if idx.size == 0:
        msg = "No cells to perturb: click a cell, or box/lasso a group of cells on the embedding."
        raise InputError(msg)
    if not np.isfinite(factor) or factor < 0:
        msg = f"Expected a factor >= 0 (0: knock-out, 0.5: halve, 2: double); found {factor}."
        raise InputError(msg)
    sample = even_sample(idx.size, max_paths)  # positions in idx of the paths drawn
    total, done = 2 * n_steps, [0]

    def check(_step: int) -> None:
        done[0] += 1
        if progress is not None:
            progress(Progress(min(done[0], total), total, f"perturbing {gene}"))

    fld = info.field
    probabilities = None
    if fates is not None and fates.probabilities.shape[0] == info.adata.n_obs:
        probabilities = pd.DataFrame(fates.probabilities, columns=list(fates.names))
    found = perturb(
        info.adata, gene, cells=idx, factor=float(factor), n_steps=n_steps, field=fld, check=check,
        keep_paths=True, fates=probabilities,
    )  # fmt: skip
    control, perturbed = found.control_paths[sample], found.perturbed_paths[sample]
    xy = np.asarray(info.adata.obsm[Key.obsm.embedding(info.basis)])

    def on_embedding(paths: np.ndarray) -> list[np.ndarray]:
        n, steps, dim = paths.shape
        return list(_carry(fld, paths.reshape(-1, dim), xy).reshape(n, steps, 2))

    return PerturbationRun(
        gene=gene,
        factor=float(factor),
        n_cells=int(idx.size),
        n_steps=n_steps,
        fit=info.label,
        basis=info.basis,
        table=found.table(),
        control_paths=on_embedding(control),
        perturbed_paths=on_embedding(perturbed),
        measure=(
            f"fate probabilities ({fates.source}) of the cells nearest to the paths' ends"
            if found.measure == "fate probabilities" and fates is not None
            else "the cluster nearest to each path's end (no fate probabilities: Compute fates for those)"
        ),
    )


def field_coloring(adata: AnnData, fit: Fit | VelocityResult | None) -> np.ndarray | None:
    """``(n_obs,)`` divergence of ``fit``'s field per cell (``obs['vf_divergence']``), or None."""
    if fit is None:
        return None
    obs = _result(fit).obs
    if obs is not None and Key.obs.VF_DIVERGENCE in obs:
        return obs[Key.obs.VF_DIVERGENCE].to_numpy(dtype=np.float64)
    if _field_data(adata, fit) is not None and Key.obs.VF_DIVERGENCE in adata.obs:
        return adata.obs[Key.obs.VF_DIVERGENCE].to_numpy(dtype=np.float64)
    return None


# ------------------------------------------------------------- lineages in the phase portrait
#: k-means centres sought among the late cells' cell states when the data have no cell
#: types (one lineage each)
LINEAGE_CENTRES = 8
#: share of cells, latest in latent time, whose cell states the k-means centres are sought among
LATE_SHARE = 0.3
#: a cell type ends a lineage when its median latent time is at least this quantile of all cells'
END_TYPE_QUANTILE = 0.5
#: a lineage needs this share of the cells to get a curve
MIN_LINEAGE_SHARE = 0.02
#: bins of cells along each lineage's curve (about as many cells in each), and the fewest
#: cells a bin needs; a gap in time of 1/LINEAGE_BINS of the lineage's span (or more for a
#: small lineage, see _cell_bins) breaks the curve
LINEAGE_BINS, MIN_BIN_CELLS = 20, 5
#: cells a bin holds at least where its stretch has twice as many: the pancreas' Epsilon
#: (142 cells) in bins of 8 drew Ghrl's dynamical fit zig-zagging by about 100 (see _cell_bins)
LINE_BIN_CELLS = 20


#: the most cell types the time views draw a line each for (:func:`type_groups`); with more,
#: the red line over all cells stays
MAX_TYPE_LINES = 12


@dataclass(frozen=True, slots=True)
class Lineages:
    """Cells split into lineages by a fit's cell state (:func:`lineages`), or by type (:func:`type_groups`).

    ``codes``: ``(n_obs,)`` lineage of each cell (-1: none); ``names``: each lineage's name
    (the cell type it ends in, else ``lineage k``; or the cell type); ``colors``: its cell
    type's colour (a palette's where they are not types); ``kind``: ``"lineage"`` or ``"type"``;
    ``typed``: whether the names are cell types (false for k-means lineages on data without
    types, whose colours no cell on the embedding has).
    """

    codes: np.ndarray
    names: tuple[str, ...]
    colors: tuple[str, ...]
    kind: Literal["lineage", "type"] = "lineage"
    typed: bool = True


@dataclass(frozen=True, slots=True)
class LineageCurve:
    """One lineage's predicted ``(s, u)`` of a gene along latent time (means in time bins)."""

    name: str
    color: str
    s: np.ndarray
    u: np.ndarray
    kind: Literal["lineage"] = "lineage"  # as LineageLine's (the exports label both by it)
    typed: bool = True  # as Lineages'


@dataclass(frozen=True, slots=True)
class LineageLine:
    """One lineage's (or cell type's) mean of a gene's value against latent time (means in time bins)."""

    name: str
    color: str
    t: np.ndarray
    value: np.ndarray
    kind: Literal["lineage", "type"] = "lineage"
    typed: bool = True  # as Lineages'


def _cell_state(adata: AnnData, fit: Fit | VelocityResult) -> np.ndarray | None:
    result = _result(fit)
    state = (result.obsm or {}).get(Key.obsm.CELL_STATE)
    if state is None and getattr(fit, "key", ("", ()))[1] == (("source", "'file'"),):
        state = adata.obsm.get(Key.obsm.CELL_STATE)  # the file's own fit: its obsm stayed in the file
    return None if state is None else np.asarray(state, dtype=np.float64)


def lineages(adata: AnnData, fit: Fit | VelocityResult) -> Lineages | None:
    """Split the cells into lineages by ``fit``'s cell state (VeloVAE's full model), or None.

    For a fit that shows ``"cell_points"`` and ``"latent_time"`` and has a cell state
    (``obsm['cell_state']``, VeloVAE's ``c``, whose decoder sets each cell's transcription
    rates), standardised. With cell types (:func:`cluster_column`), every type whose median
    latent time is in the later half of all cells' (:data:`END_TYPE_QUANTILE`) ends a
    lineage named after it, at its cells' mean state. So a small terminal type placed a
    little earlier than the large ones (the pancreas' Epsilon, 4% of the cells) has its
    own; k-means centres of the latest 30% of cells' states, drawn mostly from the large
    types, missed it (and still do where there are no cell types: :data:`LINEAGE_CENTRES`
    seeded centres among the latest :data:`LATE_SHARE` of cells). Every cell joins the
    lineage of its nearest end; ends nearest to under :data:`MIN_LINEAGE_SHARE` of the cells
    (or under ``2 MIN_BIN_CELLS``, too few for a line) are dropped and their cells join the
    nearest end kept.
    """
    result = _result(fit)
    shows = fit_shows(result)
    state = _cell_state(adata, fit)
    t = result.latent_time
    needs = {"cell_points", "latent_time"}
    if state is None or t is None or not needs <= shows or state.shape[0] != adata.n_obs:
        return None
    t = np.asarray(t, dtype=np.float64)
    ok = np.isfinite(t) & np.isfinite(state).all(1)
    if ok.sum() < LINEAGE_CENTRES * MIN_BIN_CELLS:
        return None
    z = (state - state[ok].mean(0)) / np.maximum(state[ok].std(0), 1e-12)
    column = cluster_column(adata)
    ends = None if column is None else _type_ends(adata.obs[column].astype(str).to_numpy(), z, t, ok)
    by_type = ends is not None
    if ends is None:
        ends = _kmeans_ends(z, np.flatnonzero(ok & (t >= np.quantile(t[ok], 1 - LATE_SHARE))))
    names, centres = ends
    distance = ((z[:, None, :] - centres[None]) ** 2).sum(-1)
    counts = np.bincount(np.argmin(distance, axis=1)[ok], minlength=len(names))
    least = max(MIN_LINEAGE_SHARE * adata.n_obs, 2 * MIN_BIN_CELLS)  # fewer would draw no line
    keep = np.flatnonzero(counts >= least)
    if len(keep) == 0:
        return None
    # the cells of a dropped end join the nearest kept one
    codes = np.where(ok, np.argmin(distance[:, keep], axis=1), -1)
    # k-means lineages are numbered from 1 as shown (100 dentate gyrus cells showed "lineage 1, 3, 6")
    names = [names[i] for i in keep] if by_type else _kmeans_names(len(keep))
    colors = _group_colors(adata, column if by_type else None, names)
    return Lineages(codes=codes, names=tuple(names), colors=colors, typed=by_type)


def _group_colors(adata: AnnData, column: str | None, names: Sequence[str]) -> tuple[str, ...]:
    """Each group's cell-type colour (:func:`color_key` of ``column``), else the fallback palette's."""
    key = color_key(adata, column) if column else {}
    return tuple(key.get(n, FALLBACK_PALETTE[i % len(FALLBACK_PALETTE)]) for i, n in enumerate(names))


def type_groups(adata: AnnData) -> Lineages | None:
    """The cells grouped by cell type, for the time views of a fit without lineages, or None.

    For data with cell types (:func:`cluster_column`) whose types with at least
    ``2 MIN_BIN_CELLS`` cells number 2 to :data:`MAX_TYPE_LINES`: each such type is a
    group (``kind="type"``), smaller types' cells none. The time views then draw the fit's
    predicted values averaged along latent time within each type, not over all cells: where
    types overlap in time with different values the mean over all cells runs through none
    of them (the dynamical model on the pancreas: over all cells Gcg's fitted values peaked
    at 187 among Alpha cells that reach 400, whose own line reaches 296; Ghrl's at 75 among
    Epsilon cells up to 580, whose own line reaches 297).
    """
    column = cluster_column(adata)
    if column is None:
        return None
    labels = adata.obs[column].astype(str).to_numpy()
    names, counts = np.unique(labels, return_counts=True)
    names = names[counts >= 2 * MIN_BIN_CELLS]
    if not 2 <= len(names) <= MAX_TYPE_LINES:  # noqa: PLR2004 - one type is the line over all cells
        return None
    codes = pd.Categorical(labels, categories=names).codes.astype(np.int64)  # -1: a smaller type
    names = tuple(str(n) for n in names)
    return Lineages(codes=codes, names=names, colors=_group_colors(adata, column, names), kind="type")


def _type_ends(
    labels: np.ndarray, z: np.ndarray, t: np.ndarray, ok: np.ndarray
) -> tuple[list[str], np.ndarray] | None:
    """``(names, centres)``: the cell types that end lineages (:func:`lineages`), or None if none does."""
    later_half = np.quantile(t[ok], END_TYPE_QUANTILE)
    names, centres = [], []
    for name in sorted(set(labels[ok])):
        mine = ok & (labels == name)
        if mine.sum() >= MIN_BIN_CELLS and np.median(t[mine]) >= later_half:
            names.append(name)
            centres.append(z[mine].mean(0))
    return (names, np.array(centres)) if names else None


def _kmeans_ends(z: np.ndarray, late: np.ndarray) -> tuple[list[str], np.ndarray]:
    """``(names, centres)``: seeded k-means centres of the late cells' states, named ``lineage k``."""
    from scipy.cluster.vq import kmeans2

    # no more centres than distinct states (k-means divided by empty clusters' sizes there)
    distinct = len(np.unique(z[late], axis=0))
    centres, _ = kmeans2(z[late], min(LINEAGE_CENTRES, distinct), seed=0, minit="++")
    return _kmeans_names(len(centres)), centres


def _kmeans_names(n: int) -> list[str]:
    """``lineage 1`` to ``lineage n``: the names of lineages found without cell types."""
    return [f"lineage {c + 1}" for c in range(n)]


def lineage_curves(
    fit: Fit | VelocityResult, j: int, found: Lineages | None
) -> tuple[LineageCurve, ...] | None:
    """Each lineage's predicted ``(s, u)`` of gene ``j`` along latent time, or None without lineages.

    Per lineage, the cells' predicted ``(s, u)`` (``layers['predicted_s'/'predicted_u']``)
    are averaged in bins of about ``1/LINEAGE_BINS`` of its cells each, consecutive in
    latent time (:func:`_cell_bins`): the path the model's cells of that lineage take
    through the phase plane, broken (a NaN) across a stretch of time without cells.
    """
    if found is None or not found.names:
        return None
    result = _result(fit)
    t = np.asarray(result.latent_time, dtype=np.float64)
    s = dense_column(result.layers[Key.layers.PREDICTED_S], j, np.float64)
    u = dense_column(result.layers[Key.layers.PREDICTED_U], j, np.float64)
    binned = _lineage_means(t, found.codes, found, {"s": s, "u": u})
    return tuple(
        LineageCurve(name=name, color=color, s=m["s"], u=m["u"], typed=found.typed)
        for name, color, m in binned
    )


def lineage_lines(
    t: np.ndarray, values: np.ndarray, found: Lineages | None, *, cells: np.ndarray | None = None
) -> tuple[LineageLine, ...] | None:
    """Each lineage's mean of ``values`` against its mean latent time ``t``, or None without lineages.

    As :func:`lineage_curves` bins each lineage's cells, for the time views: ``values``
    (one per cell of ``t``) are a gene's predicted ``Ms`` or ``Mu``, or its velocity.
    ``cells``: the cells ``t`` and ``values`` are of (an even sample of many), else all.
    Across a stretch of time without cells, a lineage's line breaks (a NaN).
    """
    if found is None or not found.names:
        return None
    codes = found.codes if cells is None else found.codes[cells]
    t = np.asarray(t, dtype=np.float64)
    binned = _lineage_means(t, codes, found, {"t": t, "value": np.asarray(values, dtype=np.float64)})
    return tuple(
        LineageLine(name=name, color=color, t=m["t"], value=m["value"], kind=found.kind, typed=found.typed)
        for name, color, m in binned
    )


def _lineage_means(
    t: np.ndarray, codes: np.ndarray, found: Lineages, columns: dict[str, np.ndarray]
) -> list[tuple[str, str, dict[str, np.ndarray]]]:
    """Per lineage with two bins: its name, colour and each column's mean in its bins of cells.

    Each lineage's cells in time order (:func:`_cell_bins`): bins of about an equal number
    of consecutive cells, so the line follows the cells where they crowd in time, with a
    NaN across a stretch of time without cells, which breaks the line.
    """
    finite = np.isfinite(t)
    for values in columns.values():
        finite &= np.isfinite(values)
    out = []
    for i, (name, color) in enumerate(zip(found.names, found.colors, strict=True)):
        mine = np.flatnonzero((codes == i) & finite)
        mine = mine[np.argsort(t[mine])]
        starts, stops, breaks = _cell_bins(t[mine])
        if len(starts) < 2:  # noqa: PLR2004 - a curve needs two points
            continue
        means = {}
        for key, values in columns.items():
            total = np.concatenate([[0.0], np.cumsum(values[mine])])
            means[key] = np.insert((total[stops] - total[starts]) / (stops - starts), breaks, np.nan)
        out.append((name, color, means))
    return out


def _cell_bins(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``(starts, stops, breaks)``: bins of a lineage's cells, ``t`` its cells' times in order.

    The cells are cut where two in a row lie further apart than 1/:data:`LINEAGE_BINS` of
    the lineage's time span, or three times the widest gap ``n`` evenly random cells leave
    (``span ln(n) / n``) if that is wider: a stretch without cells, not the spacing of a
    small lineage (50 random cells were cut almost every time at 1/20). Each stretch of at
    least ``2 MIN_BIN_CELLS`` cells is cut into two bins or more of ``len(t) / LINEAGE_BINS``
    consecutive cells or more (at least :data:`LINE_BIN_CELLS`, so the mean of a small
    type's bin is not one of a handful of cells), shorter stretches left out
    (one bin between two breaks would draw nothing). Bin ``k`` holds cells
    ``starts[k]:stops[k]``; ``breaks``: the bins before which a stretch left a gap. Equal
    bins of time rather than of cells gave the pancreas' Beta cells, all between latent
    time 0.88 and 1 and ordered within it (Ins2 from 3 to 93 along it), two bins, whose
    last mean (43) ended Beta's Ins2 curve among cells that reach 109. Cells at one time
    stay in one bin, and with discrete times ``n`` above is the number of distinct times
    (four capture days are not four stretches apart).
    """
    n = len(t)
    if n < 2 * MIN_BIN_CELLS:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), []
    span = float(t[-1] - t[0]) or 1.0
    distinct = 1 + int(np.count_nonzero(np.diff(t) > 0))  # n, or the levels of discrete times
    gap = max(span / LINEAGE_BINS, 3 * span * np.log(max(distinct, 2)) / distinct)
    edges = np.concatenate([[0], np.flatnonzero(np.diff(t) > gap) + 1, [n]])
    size = max(LINE_BIN_CELLS, -(-n // LINEAGE_BINS))
    stretches: list[np.ndarray] = []  # each kept stretch's bin edges
    breaks: list[int] = []
    kept = 0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if hi - lo < 2 * MIN_BIN_CELLS:
            continue
        bins = np.array_split(np.arange(lo, hi), max(2, (hi - lo) // size))  # sizes differ by 1 at most
        # a bin edge inside a run of equal times moves to the run's start: cells at one time
        # share a bin, whose mean does not depend on their order (discrete times split across
        # bins drew a vertical zig-zag set by the input order)
        cuts = np.unique(np.searchsorted(t, t[[b[0] for b in bins[1:]]], side="left"))
        cuts = np.concatenate([[lo], cuts[cuts > lo], [hi]])
        if len(cuts) < 3:  # noqa: PLR2004 - one bin draws no line
            continue
        if kept:
            breaks.append(kept)
        stretches.append(cuts)
        kept += len(cuts) - 1
    if not stretches:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), []
    return (
        np.concatenate([cuts[:-1] for cuts in stretches]),
        np.concatenate([cuts[1:] for cuts in stretches]),
        breaks,
    )
