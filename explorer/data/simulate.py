"""Seeded synthetic cells from the splicing ODE, with the ground truth written beside them.

Every gene follows the on/off model of :mod:`explorer.kinetics` (La Manno et al.
2018; Bergen et al. 2020): off until ``t_on``, induced with rate ``alpha`` until the
switch time ``t_`` (absolute), then repressed. Cells are drawn along time (and, with
``branches > 1``, into lineages after a branch time); counts are Poisson or negative
binomial around the noise-free abundances.

Parameter convention (scVelo's ``fit_*`` convention, so a fit compares directly): the
ODE runs on ``u / scaling`` with rates ``(alpha, beta * scaling, gamma)``; the observed
unspliced abundance is ``true_u = scaling * u_ode``, so that ``true_velocity = ds/dt =
true_beta * true_u - true_gamma * true_s`` and the induction steady state lies on the
line ``true_u = (true_gamma / true_beta) * true_s``, the slope the steady-state model
estimates. scVelo's ``get_vars`` rebuilds the ODE rate the same way (``fit_beta *
fit_scaling``).

Pitfall genes (``var['true_kind']``), each a known way for velocity models to fail:

- ``"standard"``: one induction long enough to reach its steady state, then repression.
- ``"boost"``: alpha rises by ``true_boost`` halfway through induction (``true_t_boost``),
  the transcriptional boost of Barile et al. 2021 that bends the phase portrait upwards.
- ``"two_regimes"``: gamma differs between two groups of cells (``obs['true_regime']``:
  the lineages when there are several, else a random half): two kinetic regimes that one
  gamma cannot fit (Bergen et al. 2021, "RNA velocity — current challenges").
- ``"steady"``: constant expression, no dynamics; zero true velocity.
- ``"late_induction"``: ``t_on`` well after the start, the gene is silent before it.
- ``"early_repression"``: ``t_`` early, induction stops far from the steady state and
  most cells repress.

With ``branches > 1`` some standard and late genes become lineage programmes
(``var['true_program']``): induced after the branch time in one lineage only.

The defaults draw cells uniformly in time from exactly the on/off model, which a fit of
that model finds easy. Options that make the data harder, as real data are (all off by
default; :data:`HARD` turns them all on):

- ``time_density="uneven"``: cells crowd some stretches of time and thin out in others;
- ``terminal_fraction``: a share of the cells piles up at the end of time, like mature
  cell types that stay in the sample;
- ``rate_sd``: transcription and degradation rates vary from cell to cell;
- ``kinds={"two_regimes": ...}`` with ``branches > 1``: lineage-separated kinetic regimes;
- ``unspliced_capture``: a share of the unspliced molecules is captured (low intronic
  reads).

These options draw from their own random stream, so the defaults' output is unchanged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from explorer import kinetics
from explorer.keys import Key

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("standard", "boost", "two_regimes", "steady", "late_induction", "early_repression")

#: share of genes of each pitfall kind; the rest are "standard"
DEFAULT_KINDS: dict[str, float] = {
    "boost": 0.05,
    "two_regimes": 0.05,
    "steady": 0.05,
    "late_induction": 0.1,
    "early_repression": 0.05,
}

#: options of :func:`simulate` that make the data harder than the fitted model family:
#: uneven time density, a dense terminal population, cell-to-cell rate variation, two
#: lineages with their own degradation regime for a quarter of the genes, and a fifth of
#: the unspliced molecules captured
HARD: dict[str, object] = {
    "time_density": "uneven",
    "terminal_fraction": 0.2,
    "rate_sd": 0.3,
    "branches": 2,
    "kinds": {**DEFAULT_KINDS, "two_regimes": 0.25},
    "unspliced_capture": 0.2,
}

Noise = Literal["poisson", "nb", "none"]
_NOISES = ("poisson", "nb", "none")
TimeDensity = Literal["uniform", "uneven"]
_TIME_DENSITIES = ("uniform", "uneven")
#: terminal cells are drawn uniformly from this last share of the time span
_TERMINAL_SPAN = 0.05
_LINEAGE_NAMES = "ABCDEFGH"
_ROOT = "root"
_SHARED = "shared"


def _loguniform(rng: np.random.Generator, low: float, high: float, size: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(low), np.log(high), size))


def _check_options(noise: str, branches: int, kinds: Mapping[str, float], n_obs: int, n_vars: int) -> None:
    if noise not in _NOISES:
        msg = f"Invalid noise {noise!r}. Valid options are: {', '.join(map(repr, _NOISES))}."
        raise ValueError(msg)
    if not 1 <= branches <= len(_LINEAGE_NAMES):
        msg = f"branches must be between 1 and {len(_LINEAGE_NAMES)}; got {branches}."
        raise ValueError(msg)
    unknown = sorted(set(kinds) - set(KINDS) - {"standard"})
    if unknown:
        msg = f"Unknown gene kinds {unknown} in `kinds`. Valid kinds are: {', '.join(KINDS[1:])}."
        raise ValueError(msg)
    if any(v < 0 for v in kinds.values()) or sum(v for k, v in kinds.items() if k != "standard") > 1:
        msg = f"`kinds` must hold shares >= 0 that sum to at most 1; got {dict(kinds)}."
        raise ValueError(msg)
    if n_obs < 1 or n_vars < 1:
        msg = f"n_obs and n_vars must be positive; got n_obs={n_obs}, n_vars={n_vars}."
        raise ValueError(msg)


def _check_hard_options(
    time_density: str, terminal_fraction: float, rate_sd: float, unspliced_capture: float
) -> None:
    if time_density not in _TIME_DENSITIES:
        msg = f"Invalid time_density {time_density!r}. Valid options are: "
        msg += f"{', '.join(map(repr, _TIME_DENSITIES))}."
        raise ValueError(msg)
    if not 0 <= terminal_fraction < 1:
        msg = f"terminal_fraction must lie in [0, 1); got {terminal_fraction}."
        raise ValueError(msg)
    if rate_sd < 0:
        msg = f"rate_sd must be >= 0; got {rate_sd}."
        raise ValueError(msg)
    if not 0 < unspliced_capture <= 1:
        msg = f"unspliced_capture must lie in (0, 1]; got {unspliced_capture}."
        raise ValueError(msg)


def _uneven_times(rng: np.random.Generator, n: int, t_max: float) -> np.ndarray:
    """``n`` times in ``[0, t_max]`` whose density varies about tenfold along the span.

    The log density is a sum of six Gaussian bumps of random position, width and sign on
    a fine grid; times are drawn from it by inverse transform sampling.
    """
    grid = np.linspace(0.0, t_max, 2001)
    log_density = np.zeros_like(grid)
    for _ in range(6):
        centre = rng.uniform(0.0, t_max)
        width = rng.uniform(0.03, 0.12) * t_max
        log_density += rng.uniform(-1.2, 1.2) * np.exp(-0.5 * ((grid - centre) / width) ** 2)
    density = np.exp(log_density)
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2)])
    return np.interp(rng.uniform(0.0, cdf[-1], n), cdf, grid)


def _assign_kinds(rng: np.random.Generator, n_vars: int, kinds: Mapping[str, float]) -> np.ndarray:
    """Gene kinds: ``round(share * n_vars)`` genes per pitfall kind, at random positions."""
    labels: list[str] = []
    for kind in KINDS[1:]:
        labels += [kind] * round(kinds.get(kind, 0.0) * n_vars)
    labels = labels[:n_vars] + ["standard"] * max(0, n_vars - len(labels))
    return np.asarray(labels, dtype=object)[rng.permutation(n_vars)]


def simulate(
    *,
    n_obs: int = 1000,
    n_vars: int = 100,
    seed: int = 0,
    noise: Noise = "poisson",
    dispersion: float = 0.2,
    branches: int = 1,
    branch_time: float | None = None,
    branch_gene_fraction: float = 0.5,
    kinds: Mapping[str, float] | None = None,
    t_max: float = 20.0,
    cell_times: ArrayLike | None = None,
    steady_counts: tuple[float, float] = (5.0, 50.0),
    unspliced_ratio: tuple[float, float] = (0.1, 0.5),
    beta_range: tuple[float, float] = (1.0, 3.0),
    gamma_range: tuple[float, float] = (0.4, 1.2),
    boost_factor: tuple[float, float] = (2.0, 3.0),
    boost_start: float = 0.5,
    regime_factor: tuple[float, float] = (2.5, 4.0),
    library_size_sd: float = 0.2,
    n_time_bins: int = 4,
    time_density: TimeDensity = "uniform",
    terminal_fraction: float = 0.0,
    rate_sd: float = 0.0,
    unspliced_capture: float = 1.0,
    lineage_rate_range: tuple[float, float] | None = None,
    lineage_rates: Sequence[float] | None = None,
) -> AnnData:
    """Simulate spliced/unspliced counts of ``n_obs`` cells with known kinetics.

    Parameters
    ----------
    n_obs, n_vars
        Number of cells and genes.
    seed
        Seed of the only random generator used; the same seed gives the same data.
    noise
        ``"poisson"``: counts ~ Poisson(size factor x abundance); ``"nb"``: negative
        binomial with variance ``mu + dispersion * mu**2`` (a gamma-Poisson mixture);
        ``"none"``: the abundances times the size factors, unrounded.
    dispersion
        Negative-binomial dispersion (``noise="nb"`` only).
    branches
        Number of lineages. With more than one, each cell is given a lineage, and after
        ``branch_time`` the lineage programmes (see ``branch_gene_fraction``) diverge.
    branch_time
        Absolute time at which lineages split; default ``0.4 * t_max``.
    branch_gene_fraction
        Share of the "standard" and "late_induction" genes that become lineage
        programmes, spread evenly over the lineages (``branches > 1`` only).
    kinds
        Share of genes of each pitfall kind (``"boost"``, ``"two_regimes"``, ``"steady"``,
        ``"late_induction"``, ``"early_repression"``); the rest are ``"standard"``.
        Default :data:`DEFAULT_KINDS`; ``{}`` makes every gene standard.
    t_max
        Cells are drawn uniformly in ``[0, t_max]``.
    cell_times
        ``(n_obs,)`` explicit times in ``[0, t_max]``, instead of uniform draws.
    steady_counts
        Range (log-uniform) of the induction steady state ``alpha / gamma`` of spliced
        counts per gene, before size factors.
    unspliced_ratio
        Range (log-uniform) of ``true_gamma / true_beta``: the unspliced/spliced ratio at
        steady state, the slope the steady-state model estimates.
    beta_range, gamma_range
        Ranges (log-uniform) of the ODE splicing rate ``beta * scaling`` and of ``gamma``.
        With the defaults, standard genes induce for ``0.45-0.6 t_max`` and reach >= 97% of
        their steady state before switching (``gamma * (t_ - t_on) >= 3.6``), so the
        extreme-quantile regression of the steady-state model sees cells at the steady
        state. Their switch times spread over ``[0.2, 1.1] t_max``: some genes start
        induced before ``t = 0`` (progenitor programmes) and some never switch off
        within the window (``true_t_ > t_max``).
    boost_factor, regime_factor
        Ranges of the alpha increase of "boost" genes and of the gamma ratio between the
        two regimes of "two_regimes" genes.
    boost_start
        Share of the induction (from ``t_on`` to ``t_``) after which the alpha of "boost"
        genes rises; the default 0.5 is halfway, values near 1 boost only the late cells
        (the MURK genes of Barile et al. 2021).
    library_size_sd
        Standard deviation of the log size factors (mean size factor 1).
    n_time_bins
        Number of time bins in ``obs['clusters']``.
    time_density
        ``"uniform"``: cells uniform in ``[0, t_max]``; ``"uneven"``: a density that
        varies about tenfold along time (dense and sparse stretches).
    terminal_fraction
        Share of the cells placed in the last 5% of the time span (a dense terminal
        population, in each lineage with ``branches > 1``), the rest drawn by
        ``time_density``.
    rate_sd
        Standard deviation of log-normal cell-to-cell factors (mean 1 on the log scale)
        on every gene's ``alpha`` and ``gamma``, drawn per cell and gene; the
        ground-truth velocity uses each cell's own ``gamma``.
    unspliced_capture
        Share of the unspliced molecules that are counted: the unspliced means are
        multiplied by it before the counts are drawn (``layers['true_u']`` is not).
    lineage_rate_range
        With ``branches > 1``: range ``(low, high)`` (log-uniform) of a factor, drawn per
        lineage and gene, on the transcription rate ``alpha`` of every shared dynamic gene
        (not a lineage programme, not ``"steady"``) in that lineage's cells from the
        branch time on (from ``t_on`` if later) until the gene's switch-off: lineages
        that run the same genes at different rates, the case a per-cell rate factor
        (VeloVAE's ``rho``) models. ``var['true_alpha_<lineage>']`` holds the factors.
        Default ``None``: no factor (drawn from its own random stream, so the other
        outputs are unchanged).
    lineage_rates
        With ``branches > 1``: one factor per lineage, on the same genes and from the same
        time as ``lineage_rate_range`` (multiplied with its per-gene factors when both are
        given): a lineage that runs all its shared genes faster or slower than another,
        as a lineage of smaller cells or lower transcriptional activity would. A
        graph-based pseudotime sees such a lineage's cells as earlier (they move less in
        expression space per unit of time). Default ``None``.

    Returns
    -------
    AnnData with

    - ``layers['spliced']``, ``layers['unspliced']``: counts, float32 CSR (integers unless
      ``noise="none"``); ``X``: a copy of the spliced counts.
    - ``layers['true_s']``, ``layers['true_u']``, ``layers['true_velocity']``: noise-free
      abundances (before size factors) and ``ds/dt``, float32.
    - ``obs['true_t']``, ``obs['true_lineage']`` (``"root"`` before the branch time with
      several lineages), ``obs['clusters']`` (lineage x time bin), ``obs['true_regime']``,
      ``obs['true_size_factor']``.
    - ``var['true_alpha']``, ``true_beta``, ``true_gamma``, ``true_gamma_2``, ``true_t_``,
      ``true_t_on`` (NaN for "steady" genes), ``true_scaling``, ``true_boost``,
      ``true_t_boost``, ``true_kind``, ``true_program``.
    - ``uns['simulation']``: the arguments.

    Examples
    --------
    >>> adata = simulate(n_obs=500, n_vars=50, seed=1, branches=2)
    >>> adata.layers["spliced"].shape
    (500, 50)
    """
    kinds = dict(DEFAULT_KINDS if kinds is None else kinds)
    _check_options(noise, branches, kinds, n_obs, n_vars)
    _check_hard_options(time_density, terminal_fraction, rate_sd, unspliced_capture)
    if not 0 <= boost_start < 1:
        msg = f"boost_start must lie in [0, 1) (a share of the induction); got {boost_start}."
        raise ValueError(msg)
    if lineage_rate_range is not None and not (
        branches > 1 and len(lineage_rate_range) == 2 and 0 < lineage_rate_range[0] <= lineage_rate_range[1]
    ):
        msg = (
            "lineage_rate_range must be (low, high) with 0 < low <= high, and needs branches > 1; "
            f"got {lineage_rate_range!r} with branches={branches}."
        )
        raise ValueError(msg)
    if lineage_rates is not None and not (
        branches > 1 and len(lineage_rates) == branches and all(float(f) > 0 for f in lineage_rates)
    ):
        msg = (
            "lineage_rates must hold one positive factor per lineage, and needs branches > 1; "
            f"got {lineage_rates!r} with branches={branches}."
        )
        raise ValueError(msg)
    if branch_time is None:
        branch_time = 0.4 * t_max
    rng = np.random.default_rng(seed)
    # the options that make the data harder draw from their own stream, so that the
    # default output stays the same
    rng_hard = np.random.default_rng([seed, 1])

    # --- cells: time, lineage, regime, size factor
    if cell_times is None and (time_density != "uniform" or terminal_fraction > 0):
        n_end = round(terminal_fraction * n_obs)
        body = (
            _uneven_times(rng_hard, n_obs - n_end, t_max)
            if time_density == "uneven"
            else rng_hard.uniform(0.0, t_max, n_obs - n_end)
        )
        end = rng_hard.uniform((1 - _TERMINAL_SPAN) * t_max, t_max, n_end)
        t = np.sort(np.concatenate([body, end]))
    elif cell_times is None:
        t = np.sort(rng.uniform(0.0, t_max, n_obs))
    else:
        t = np.asarray(cell_times, dtype=float)
        if t.shape != (n_obs,):
            msg = f"cell_times must have shape ({n_obs},); got {t.shape}."
            raise ValueError(msg)
    lineage_idx = rng.integers(0, branches, n_obs)
    regime = (lineage_idx % 2) if branches > 1 else rng.integers(0, 2, n_obs)
    size_factor = np.exp(rng.normal(0.0, library_size_sd, n_obs))
    size_factor /= size_factor.mean()

    # --- genes: kinds, rates, timing
    kind = _assign_kinds(rng, n_vars, kinds)
    gamma = _loguniform(rng, *gamma_range, n_vars)
    beta_ode = _loguniform(rng, *beta_range, n_vars)
    ratio = _loguniform(rng, *unspliced_ratio, n_vars)
    s_inf = _loguniform(rng, *steady_counts, n_vars)
    alpha = s_inf * gamma
    # ratio = gamma / true_beta and true_beta = beta_ode / scaling (scVelo's fit_beta)
    true_beta = gamma / ratio
    scaling = beta_ode / true_beta

    # switch times spread over the whole time span, with inductions long enough to reach
    # the steady state; genes switched on before t = 0 start at their steady state, so
    # early cells express a progenitor programme that later cells repress (as in real
    # differentiation), which also keeps library composition balanced over time
    t_ = rng.uniform(0.2 * t_max, 1.1 * t_max, n_vars)
    t_on = t_ - rng.uniform(0.45 * t_max, 0.6 * t_max, n_vars)
    late = kind == "late_induction"
    t_on[late] = rng.uniform(0.35 * t_max, 0.5 * t_max, late.sum())
    t_[late] = np.minimum(t_on[late] + rng.uniform(0.3, 0.4, late.sum()) * t_max, 0.95 * t_max)
    early = kind == "early_repression"
    t_on[early] = rng.uniform(0.0, 0.05 * t_max, early.sum())
    t_[early] = rng.uniform(0.1 * t_max, 0.2 * t_max, early.sum())

    # lineage programmes: induced after the branch time, in one lineage only
    program = np.full(n_vars, _SHARED, dtype=object)
    if branches > 1:
        candidates = np.flatnonzero(np.isin(kind, ["standard", "late_induction"]))
        chosen = rng.permutation(candidates)[: round(branch_gene_fraction * len(candidates))]
        program[chosen] = [_LINEAGE_NAMES[i % branches] for i in range(len(chosen))]
        n_ch = len(chosen)
        t_on[chosen] = branch_time + rng.uniform(0.0, 0.1 * t_max, n_ch)
        t_[chosen] = np.minimum(t_on[chosen] + rng.uniform(0.4, 0.55, n_ch) * t_max, 0.95 * t_max)

    boost = np.ones(n_vars)
    is_boost = kind == "boost"
    boost[is_boost] = rng.uniform(*boost_factor, is_boost.sum())
    t_boost = np.full(n_vars, np.nan)
    t_boost[is_boost] = t_on[is_boost] + boost_start * (t_ - t_on)[is_boost]

    gamma_2 = gamma.copy()
    two = kind == "two_regimes"
    gamma_2[two] = gamma[two] * rng.uniform(*regime_factor, two.sum())

    steady = kind == "steady"
    t_on[steady] = np.nan
    t_[steady] = np.nan

    # --- noise-free abundances (n_obs, n_vars), ODE units for u
    lineage_names = np.asarray(list(_LINEAGE_NAMES[:branches]), dtype=object)
    active = (program[None, :] == _SHARED) | (program[None, :] == lineage_names[lineage_idx][:, None])
    alpha_cell = np.where(active, alpha[None, :], 0.0)
    gamma_cell = np.where(regime[:, None] == 1, gamma_2[None, :], gamma[None, :])
    if rate_sd > 0:
        alpha_cell = alpha_cell * np.exp(rng_hard.normal(0.0, rate_sd, alpha_cell.shape))
        gamma_cell = gamma_cell * np.exp(rng_hard.normal(0.0, rate_sd, gamma_cell.shape))
    tt = t[:, None]
    dyn_t_on = np.where(steady, 0.0, t_on)
    dyn_t_ = np.where(steady, t_max + 1.0, t_)
    u_ode, s = kinetics.trajectory(tt, dyn_t_, alpha_cell, beta_ode, gamma_cell, t_on=dyn_t_on)
    # the boost is a second induction of rate (boost - 1) * alpha from t_boost to t_:
    # the ODE is linear with zero start, so the two solutions add up
    if is_boost.any():
        extra = np.where(is_boost, (boost - 1.0), 0.0)[None, :] * alpha_cell
        u_b, s_b = kinetics.trajectory(
            tt, dyn_t_, extra, beta_ode, gamma_cell, t_on=np.where(is_boost, t_boost, 0.0)
        )
        u_ode, s = u_ode + u_b, s + s_b
    lineage_factor = None
    if lineage_rate_range is not None or lineage_rates is not None:
        # each lineage's rate factor from the branch time on: a second induction of rate
        # (factor - 1) * alpha from max(branch_time, t_on) to t_, added by linearity
        lineage_factor = np.ones((branches, n_vars))
        if lineage_rate_range is not None:
            rng_lin = np.random.default_rng([seed, 2])
            lineage_factor = _loguniform(rng_lin, *lineage_rate_range, branches * n_vars)
            lineage_factor = lineage_factor.reshape(branches, n_vars)
        if lineage_rates is not None:
            lineage_factor = lineage_factor * np.asarray(lineage_rates, dtype=float)[:, None]
        scaled = (program == _SHARED) & ~steady
        lineage_factor[:, ~scaled] = 1.0
        extra = (lineage_factor[lineage_idx] - 1.0) * alpha_cell
        start = np.where(scaled, np.maximum(dyn_t_on, branch_time), 0.0)
        u_l, s_l = kinetics.trajectory(tt, dyn_t_, extra, beta_ode, gamma_cell, t_on=start)
        after = (start < dyn_t_)[None, :]
        u_ode, s = u_ode + np.where(after, u_l, 0.0), s + np.where(after, s_l, 0.0)
    u_inf, s_inf_ = kinetics.steady_state(alpha, beta_ode, gamma)
    u_ode = np.where(steady[None, :], u_inf[None, :], u_ode)
    s = np.where(steady[None, :], s_inf_[None, :], s)
    vel = kinetics.velocity(u_ode, s, beta_ode, gamma_cell)
    vel = np.where(steady[None, :], 0.0, vel)
    u = u_ode * scaling[None, :]

    # --- counts
    mu_s, mu_u = s * size_factor[:, None], u * size_factor[:, None]
    if unspliced_capture < 1:
        mu_u = mu_u * unspliced_capture
    spliced, unspliced = (_draw(rng, mu, noise, dispersion) for mu in (mu_s, mu_u))

    # --- annotations
    lineage = np.where(
        (branches > 1) & (t < branch_time), _ROOT, lineage_names[lineage_idx].astype(str)
    ).astype(object)
    lineage_cats = ([_ROOT] if branches > 1 else []) + list(lineage_names)
    edges = np.linspace(0.0, t_max, n_time_bins + 1)[1:-1]
    time_bin = np.digitize(t, edges) + 1
    clusters = np.asarray([f"{lin}_{b}" for lin, b in zip(lineage, time_bin, strict=True)], dtype=object)
    cluster_cats = [f"{lin}_{b}" for lin in lineage_cats for b in range(1, n_time_bins + 1)]
    cluster_cats = [c for c in cluster_cats if c in set(clusters)]

    obs = pd.DataFrame(
        {
            Key.obs.TRUE_T: t.astype(np.float32),
            Key.obs.TRUE_LINEAGE: pd.Categorical(lineage, categories=lineage_cats),
            Key.obs.CLUSTERS: pd.Categorical(clusters, categories=cluster_cats),
            Key.obs.TRUE_REGIME: regime.astype(np.int8),
            Key.obs.TRUE_SIZE_FACTOR: size_factor.astype(np.float32),
        },
        index=pd.Index([f"cell_{i:05d}" for i in range(n_obs)]),
    )
    var = pd.DataFrame(
        {
            Key.var.TRUE_ALPHA: alpha,
            Key.var.TRUE_BETA: true_beta,
            Key.var.TRUE_GAMMA: gamma,
            Key.var.TRUE_GAMMA_2: gamma_2,
            Key.var.TRUE_T_: t_,
            Key.var.TRUE_T_ON: t_on,
            Key.var.TRUE_SCALING: scaling,
            Key.var.TRUE_BOOST: boost,
            Key.var.TRUE_T_BOOST: t_boost,
            Key.var.TRUE_KIND: pd.Categorical(kind.astype(str), categories=list(KINDS)),
            Key.var.TRUE_PROGRAM: pd.Categorical(
                program.astype(str), categories=[_SHARED, *lineage_names.astype(str)]
            ),
        },
        index=pd.Index([f"gene_{j:04d}" for j in range(n_vars)]),
    )
    if lineage_factor is not None:
        for i, name in enumerate(lineage_names):
            var[f"{Key.var.TRUE_ALPHA}_{name}"] = lineage_factor[i] * alpha
    spliced_csr = sparse.csr_matrix(spliced.astype(np.float32))
    adata = AnnData(
        X=spliced_csr.copy(),
        obs=obs,
        var=var,
        layers={
            Key.layers.SPLICED: spliced_csr,
            Key.layers.UNSPLICED: sparse.csr_matrix(unspliced.astype(np.float32)),
            Key.layers.TRUE_S: s.astype(np.float32),
            Key.layers.TRUE_U: u.astype(np.float32),
            Key.layers.TRUE_VELOCITY: vel.astype(np.float32),
        },
    )
    adata.uns[Key.uns.SIMULATION] = {
        "seed": seed,
        "noise": noise,
        "dispersion": dispersion,
        "branches": branches,
        "branch_time": branch_time,
        "branch_gene_fraction": branch_gene_fraction,
        "kinds": {k: float(v) for k, v in kinds.items()},
        "t_max": t_max,
        "cell_times": "uniform" if cell_times is None else "given",
        "time_density": time_density,
        "terminal_fraction": terminal_fraction,
        "rate_sd": rate_sd,
        "unspliced_capture": unspliced_capture,
        "steady_counts": np.asarray(steady_counts),
        "unspliced_ratio": np.asarray(unspliced_ratio),
        "beta_range": np.asarray(beta_range),
        "gamma_range": np.asarray(gamma_range),
        "boost_factor": np.asarray(boost_factor),
        "regime_factor": np.asarray(regime_factor),
        "library_size_sd": library_size_sd,
        "n_time_bins": n_time_bins,
        "convention": "true_u = scaling * u_ode; ODE rates (alpha, beta * scaling, gamma); "
        "true_velocity = true_beta * true_u - true_gamma * true_s (true_gamma_2 in regime 1)",
    }
    if lineage_rate_range is not None:
        adata.uns[Key.uns.SIMULATION]["lineage_rate_range"] = np.asarray(lineage_rate_range, dtype=float)
    if lineage_rates is not None:
        adata.uns[Key.uns.SIMULATION]["lineage_rates"] = np.asarray(lineage_rates, dtype=float)
    if boost_start != 0.5:  # noqa: PLR2004 - recorded only when set, so default files stay byte-identical
        adata.uns[Key.uns.SIMULATION]["boost_start"] = boost_start
    logger.info("simulated %d cells x %d genes (seed %d, noise %s)", n_obs, n_vars, seed, noise)
    return adata


def _draw(rng: np.random.Generator, mu: np.ndarray, noise: str, dispersion: float) -> np.ndarray:
    """Draw counts around the means ``mu``."""
    if noise == "none":
        return mu
    if noise == "nb":
        # gamma-Poisson: E = mu, Var = mu + dispersion * mu^2
        shape = 1.0 / dispersion
        mu = rng.gamma(shape, mu / shape)
    return rng.poisson(mu).astype(float)
