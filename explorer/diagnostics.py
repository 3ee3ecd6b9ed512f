"""Per-gene trust diagnostics for any fitted velocity model (the pitfalls of Bergen et al. 2021).

One entry point, :func:`gene_diagnostics`, returns a per-gene table and writes it into
``adata.var`` (keys in :mod:`explorer.keys`):

- **Differential kinetics** (:func:`differential_kinetic_test`): scVelo's likelihood-ratio
  test (``scv.tl.differential_kinetic_test``) of one shared kinetic against a separate
  kinetic in a cluster, with scVelo's statistic, weights and thresholds, computed for all
  genes and clusters at once with array sums instead of scVelo's gene-by-gene loop.
- **Transcriptional boost** (:func:`boost_scores`): unspliced above the fitted curve in
  the gene's late cells.
- **Box 1 statistics** (:func:`box1_statistics`): the dynamical model's own per-gene
  figures (kinetic signal, detection power, curve R², likelihood, state shares).
- **Stability** (:func:`stability`, optional, costs ``n_refits`` fits): the model refitted
  on seeded cell subsamples with other seeds; the spread of each gene's rates and how
  often its velocity keeps its sign.

:func:`flagged_genes` selects the genes a user should not trust, by one documented rule;
:func:`velocity_genes_without_flagged` gives the velocity-gene mask without them and
:func:`result_without_flagged` a fit to recompute the velocity graph from
(:func:`explorer.pipeline.derive`).

Only numpy, scipy and pandas; no Panel, no torch (a stability refit calls the model,
which may use torch itself).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse, stats

from explorer import kinetics
from explorer._types import InputError, Progress
from explorer.keys import Key
from explorer.models import MODELS
from explorer.models.base import _from_uns
from explorer.models.metrics import predicted_abundances

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from explorer._types import BoolArray, ProgressCallback
    from explorer.models.base import VelocityResult

logger = logging.getLogger(__name__)

#: scVelo's significance level of the differential kinetic test (``p < 1e-2``)
DK_ALPHA = 0.01
#: scVelo's smallest cluster that is tested (``min_cells=10``)
DK_MIN_CELLS = 10
#: boost flag: late cells' mean unspliced residual above the other cells', in units of
#: the gene's unspliced standard deviation (calibrated on the simulator, see the README)
BOOST_MIN_SCORE = 0.6
#: boost flag: share of the late cells above the fitted curve
BOOST_MIN_ABOVE = 0.9
#: boost flag: late cells' mean unspliced height above the straight line fitted to the
#: gene's earlier induction cells (units of sd of ``Mu``) must exceed this: an upward kink,
#: which a one-alpha curve (concave) never has. Kept every simulated boost the other two
#: conditions flag and dropped the pancreas dynamical fit's boost flags from 57 to 47 of
#: its 272 velocity genes (see the README)
BOOST_MIN_KINK = 0.0
#: share of a gene's induction cells counted as its late cells
BOOST_LATE_QUANTILE = 0.2
#: fewest induction cells a gene needs for a boost score
BOOST_MIN_CELLS = 20
#: fewest earlier induction cells for the kink's straight line
_KINK_MIN_CELLS = 5
#: stability flag: genes whose velocity keeps its sign in fewer cells than this
STABILITY_MIN_SIGN_AGREEMENT = 0.8
#: grid points per branch for the inside/outside-of-trajectory test
_N_GRID = 50

#: hyperparameters switched off in stability refits when the model has them: they add
#: figures that are not rates or velocities (the onset diagnostic, the latent time)
STABILITY_OVERRIDES: dict[str, Any] = {"fit_t_on": False, "latent_time": False}


def _dense(x: object) -> np.ndarray:
    arr = x.toarray() if sparse.issparse(x) else np.asarray(x)
    return np.asarray(arr, dtype=np.float64)


def _var(adata: AnnData, key: str, default: float = np.nan) -> np.ndarray:
    if key in adata.var:
        return pd.to_numeric(adata.var[key], errors="coerce").to_numpy(dtype=np.float64)
    return np.full(adata.n_vars, default)


@dataclass(frozen=True, slots=True)
class SharedFit:
    """The shared (one-for-all-cells) kinetic of a fit, as points per cell.

    Attributes
    ----------
    u_hat, s_hat
        ``(n_obs, n_vars)`` each cell's point on the model's kinetic, NaN for genes
        without one.
    kind
        ``"curve"`` (dynamical model: on/off curve at the cell's gene time),
        ``"cell_points"`` (a per-cell prediction, VeloVAE's ``predicted_u/s``) or
        ``"line"`` (steady-state models, DeepVelo: the orthogonal projection on the line
        ``u = gamma / beta * s`` (+ offset)).
    """

    u_hat: np.ndarray
    s_hat: np.ndarray
    kind: str


def shared_fit(adata: AnnData) -> SharedFit:
    """Each cell's point on the fit's shared kinetic (see :class:`SharedFit`).

    Raises
    ------
    InputError
        If ``adata`` holds no fit with a curve, per-cell prediction or steady-state slope.
    """
    Mu, Ms = _dense(adata.layers[Key.layers.MU]), _dense(adata.layers[Key.layers.MS])
    try:
        u_hat, s_hat = predicted_abundances(adata)
    except ValueError:
        pass
    else:
        kind = "cell_points" if Key.layers.PREDICTED_U in adata.layers else "curve"
        return SharedFit(u_hat, s_hat, kind)
    # DeepVelo's own rates first: its fits are often written over a file (the bundled
    # sample) that still holds a steady-state fit's velocity_gamma
    if Key.var.FIT_RATE_GAMMA in adata.var and Key.var.FIT_RATE_BETA in adata.var:
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = _var(adata, Key.var.FIT_RATE_GAMMA) / _var(adata, Key.var.FIT_RATE_BETA)
        offset = np.zeros(adata.n_vars)
    elif Key.var.GAMMA in adata.var:
        slope = _var(adata, Key.var.GAMMA)
        offset = np.nan_to_num(_var(adata, Key.var.OFFSET, 0.0))
    else:
        msg = (
            "Expected a velocity fit in the AnnData: a dynamical curve (var 'fit_alpha'... and "
            "layers 'fit_t'), a per-cell prediction (layers 'predicted_u'/'predicted_s') or a "
            f"steady-state slope (var 'velocity_gamma'); found var columns {list(adata.var.columns)}. "
            "Fit a model first (`explorer fit`)."
        )
        raise InputError(msg)
    slope = np.where(np.isfinite(slope) & (slope > 0), slope, np.nan)
    # orthogonal projection of (s, u - offset) on the line u = slope * s
    s_hat = (Ms + slope * (Mu - offset)) / (1 + slope**2)
    return SharedFit(slope * s_hat + offset, s_hat, "line")


def _outside_of_trajectory(adata: AnnData, Mu: np.ndarray, Ms: np.ndarray, std_u, std_s) -> np.ndarray:
    """``(n_obs, n_vars)``: the cell lies on the same side (in ``u``) of both branches of the curve.

    scVelo's ``compute_divergence(mode="outside_of_trajectory")``: a cell's nearest point on
    the induction branch and on the repression branch (here on a grid of ``_N_GRID`` times
    per branch, in units of each layer's standard deviation) are both below it or both
    above it: the cell lies outside the loop of the phase portrait, where a second
    kinetic shows.
    """
    alpha, beta, gamma, t_ = (
        _var(adata, k) for k in (Key.var.FIT_ALPHA, Key.var.FIT_BETA, Key.var.FIT_GAMMA, Key.var.FIT_T_)
    )
    scaling = np.nan_to_num(_var(adata, Key.var.FIT_SCALING, 1.0), nan=1.0)
    u0 = np.nan_to_num(_var(adata, Key.var.FIT_U0, 0.0))
    s0 = np.nan_to_num(_var(adata, Key.var.FIT_S0, 0.0))
    ok = np.isfinite(alpha + beta + gamma + t_) & (beta > 0) & (gamma > 0) & (t_ > 0)
    out = np.ones(Mu.shape, dtype=bool)
    if not ok.any():
        return out
    b_ode = np.where(ok, beta * scaling, 1.0)
    grid = np.linspace(0.0, 1.0, _N_GRID)[None, :]
    # repression runs until u has decayed to 1% of its switch value (scVelo: to the smallest u)
    t_off = np.log(100.0) / b_ode
    genes = np.flatnonzero(ok)
    chunk = max(1, int(2**24 // (Mu.shape[0] * _N_GRID)))
    for start in range(0, len(genes), chunk):
        J = genes[start : start + chunk]
        p = (t_[J, None], alpha[J, None], b_ode[J, None], gamma[J, None])
        signs = []
        for t in (grid * t_[J, None], t_[J, None] + grid * t_off[J, None]):  # (genes, grid)
            u, s = kinetics.trajectory(t, *p)
            ub = (u * scaling[J, None] + u0[J, None]).astype(np.float32)
            sb = (s + s0[J, None]).astype(np.float32)
            su, ss = (1.0 / std_u[J, None]).astype(np.float32), (1.0 / std_s[J, None]).astype(np.float32)
            mu = (Mu[:, J] * su.T).astype(np.float32)[..., None]
            ms = (Ms[:, J] * ss.T).astype(np.float32)[..., None]
            d = (mu - (ub * su)[None]) ** 2 + (ms - (sb * ss)[None]) ** 2  # (cells, genes, grid)
            nearest = d.argmin(2)
            u_near = np.take_along_axis(np.broadcast_to(ub[None], d.shape), nearest[..., None], 2)[..., 0]
            signs.append(np.sign(Mu[:, J] - u_near))
        out[:, J] = signs[0] * signs[1] == 1
    return out


def _std(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n = mask.sum(0)
    mean = np.where(mask, x, 0).sum(0) / np.maximum(n, 1)
    var = np.where(mask, (x - mean) ** 2, 0).sum(0) / np.maximum(n, 1)
    return np.sqrt(var)


def _one_hot(labels: pd.Series) -> tuple[np.ndarray, list[str]]:
    cat = pd.Categorical(labels)
    codes = cat.codes
    onehot = np.zeros((len(codes), len(cat.categories)))
    has = codes >= 0
    onehot[np.flatnonzero(has), codes[has]] = 1.0
    return onehot, [str(c) for c in cat.categories]


def differential_kinetic_test(
    adata: AnnData,
    *,
    groupby: str = Key.obs.CLUSTERS,
    genes: BoolArray | None = None,
    min_cells: int = DK_MIN_CELLS,
    alpha: float = DK_ALPHA,
    fit: SharedFit | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run scVelo's differential kinetic test for all genes and clusters at once.

    For each gene (Bergen et al. 2021; ``scvelo.tl.differential_kinetic_test``), with
    residuals in units of the gene's standard deviations over the cells expressing both
    layers (``Mu > 0`` and ``Ms > 0``):

    1. ``d_i = ((Mu_i - u_hat_i) / sd_u)^2 + ((Ms_i - s_hat_i) / sd_s)^2``, the squared
       distance of cell ``i`` to its point on the model's shared kinetic
       (:func:`shared_fit`), and ``var_x``, scVelo's residual variance
       ``mean(d) - mean(sign(s residual) sqrt(d))^2`` over the gene's upper cells (``u``
       and ``s`` above a third of their largest value below the 99th percentile).
    2. The cluster whose *outer* cells (outside the loop of the phase portrait,
       :func:`_outside_of_trajectory`; all expressed cells for a line or per-cell fit) have
       the largest mean ``d`` gets the alternative kinetic: a line through the origin
       fitted by orthogonal regression on its expressed cells in ``(s, u / scaling)``;
       ``d'_i`` is a cell's squared standardised distance to that line.
    3. Per cluster ``c`` with ``n`` outer cells:
       ``Z = (sum d_i / 2 - sum d'_i) / (var_x sqrt(8 n))`` and ``p_c = P(N(0,1) > Z)``
       (scVelo's normal approximation of the chi-squared likelihood ratio; 1 for a cluster
       with fewer than ``min_cells`` cells). If the worst cluster's ``p`` exceeds ``alpha``,
       steps 2-3 are redone with the upper cells instead of the outer ones (scVelo's
       fallback).

    Parameters
    ----------
    adata
        Fitted cells (layers ``Mu``, ``Ms`` and a fit, see :func:`shared_fit`) with obs
        ``groupby``.
    groupby
        obs column of clusters (or lineages) to test.
    genes
        ``(n_vars,)`` genes to test (default: every gene with a fit); the others get NaN.
    min_cells, alpha
        scVelo's ``min_cells`` (10) and significance level (0.01).
    fit
        :func:`shared_fit` of ``adata``, when already computed.

    Returns
    -------
    ``(table, pvals)``: ``table`` indexed by ``var_names`` with ``fit_diff_kinetics``
    (comma-joined clusters with ``p < alpha``, ``""`` for none, as scVelo),
    ``fit_pval_kinetics`` (the largest of those p-values, NaN for none, as scVelo),
    ``diag_dk_min_pval`` (smallest p-value over clusters) and ``diag_dk_n_clusters``;
    ``pvals`` ``(n_vars, n_clusters)``, scVelo's ``varm['fit_pvals_kinetics']``.
    """
    if groupby not in adata.obs:
        msg = (
            f"obs column {groupby!r} not found; the obs columns are {list(adata.obs.columns)}. "
            "Name the column of clusters to test."
        )
        raise InputError(msg)
    Mu, Ms = _dense(adata.layers[Key.layers.MU]), _dense(adata.layers[Key.layers.MS])
    fit = shared_fit(adata) if fit is None else fit
    scaling = np.nan_to_num(_var(adata, Key.var.FIT_SCALING, 1.0), nan=1.0) if fit.kind == "curve" else 1.0
    scaling = np.where(np.asarray(scaling) > 0, scaling, 1.0) * np.ones(adata.n_vars)
    use = np.isfinite(fit.u_hat).all(0) & np.isfinite(fit.s_hat).all(0)
    if genes is not None:
        use &= np.asarray(genes, dtype=bool)
    onehot, cats = _one_hot(adata.obs[groupby])
    pvals = np.full((adata.n_vars, len(cats)), np.nan)
    table = pd.DataFrame(
        {
            Key.var.FIT_DIFF_KINETICS: pd.Series([""] * adata.n_vars, dtype=object).to_numpy(),
            Key.var.FIT_PVAL_KINETICS: np.nan,
            Key.var.DIAG_DK_MIN_PVAL: np.nan,
            Key.var.DIAG_DK_N_CLUSTERS: 0,
        },
        index=adata.var_names.copy(),
    )
    if not use.any():
        return table, pd.DataFrame(pvals, index=adata.var_names.copy(), columns=cats)
    cols = np.flatnonzero(use)
    Mu, Ms = Mu[:, cols], Ms[:, cols]
    u_hat, s_hat, scaling = fit.u_hat[:, cols], fit.s_hat[:, cols], scaling[cols]
    nonzero = (Mu > 0) & (Ms > 0)

    # scVelo computes var_x with the weights of its EM (expressed, below the 99th percentile)
    with np.errstate(invalid="ignore"):
        ub_u = np.nanpercentile(np.where(nonzero, Mu, np.nan), 99, axis=0)
        ub_s = np.nanpercentile(np.where(nonzero, Ms, np.nan), 99, axis=0)
    clipped = nonzero & (Mu <= ub_u) & (Ms <= ub_s)
    sd_u_c, sd_s_c = _std(Mu, clipped), _std(Ms, clipped)
    upper_c = (
        clipped & (Mu > np.where(clipped, Mu, 0).max(0) / 3) & (Ms > np.where(clipped, Ms, 0).max(0) / 3)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        ru_c, rs_c = (u_hat - Mu) / sd_u_c, (s_hat - Ms) / sd_s_c
        dist_c = ru_c**2 + rs_c**2
        n_up = np.maximum(upper_c.sum(0), 1)
        varx = (np.where(upper_c, dist_c, 0).sum(0) / n_up) - (
            np.where(upper_c, np.sign(rs_c) * np.sqrt(dist_c), 0).sum(0) / n_up
        ) ** 2
    varx = np.where(varx == 0, 1.0, varx)

    # then scVelo re-weights: every expressed cell, standard deviations over them
    sd_u, sd_s = _std(Mu, nonzero), _std(Ms, nonzero)
    sd_u, sd_s = np.where(sd_u > 0, sd_u, 1.0), np.where(sd_s > 0, sd_s, 1.0)
    upper = nonzero & (Mu > np.where(nonzero, Mu, 0).max(0) / 3) & (Ms > np.where(nonzero, Ms, 0).max(0) / 3)
    if fit.kind == "curve":
        sub = adata[:, cols]
        outer = nonzero & _outside_of_trajectory(sub, Mu, Ms, sd_u, sd_s)
    else:
        outer = nonzero.copy()
    dist = ((u_hat - Mu) / sd_u) ** 2 + ((s_hat - Ms) / sd_s) ** 2
    u_sc = Mu / scaling
    n_per_cluster = onehot.sum(0)  # scVelo: all cells of the cluster, not only the weighted ones

    def orth_line(worst: np.ndarray) -> np.ndarray:
        w = nonzero & (onehot[:, worst] > 0)
        a = np.where(w, Ms * u_sc, 0).sum(0)
        b = np.where(w, u_sc**2 - Ms**2, 0).sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (b + np.sqrt(b**2 + 4 * a**2)) / (2 * a)

    def orth_dist(k: np.ndarray) -> np.ndarray:
        s_real = (Ms + k * u_sc) / (1 + k**2)
        return ((s_real - Ms) / sd_s) ** 2 + ((k * s_real - u_sc) * scaling / sd_u) ** 2

    def test(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(n_clusters, n_genes)`` p-values with the alternative from the worst cluster, and its index."""
        counts = onehot.T @ weights
        mse = (onehot.T @ np.where(weights, dist, 0)) / np.maximum(counts, 1)
        mse[counts < min_cells] = 0
        worst = mse.argmax(0)
        k = orth_line(worst)
        d_alt = orth_dist(k)
        stat = onehot.T @ np.where(weights, dist / 2 - d_alt, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = stat / (varx * np.sqrt(8 * counts))
        p = stats.norm.sf(z)
        p = np.where(counts > 0, p, np.nan)
        p[n_per_cluster < min_cells] = 1.0
        return p, worst

    p_outer, worst = test(outer)
    p_worst = p_outer[worst, np.arange(len(cols))]
    redo = ~(p_worst <= alpha)  # NaN counts as not significant, as in scVelo
    p_final = p_outer
    if redo.any():
        p_upper, _ = test(upper)
        p_final = np.where(redo[None, :], p_upper, p_outer)
    pvals[cols] = p_final.T
    sig = pvals < alpha
    table[Key.var.FIT_DIFF_KINETICS] = [
        ",".join(c for c, s in zip(cats, row, strict=True) if s) for row in sig
    ]
    with np.errstate(invalid="ignore"):
        table[Key.var.FIT_PVAL_KINETICS] = np.where(
            sig.any(1), np.nanmax(np.where(sig, pvals, -np.inf), 1), np.nan
        )
    all_nan = ~np.isfinite(pvals).any(1)
    table[Key.var.DIAG_DK_MIN_PVAL] = np.where(
        all_nan, np.nan, np.nanmin(np.where(all_nan[:, None], 1.0, pvals), 1)
    )
    table[Key.var.DIAG_DK_N_CLUSTERS] = sig.sum(1)
    return table, pd.DataFrame(pvals, index=adata.var_names.copy(), columns=cats)


def boost_scores(
    adata: AnnData,
    *,
    late_quantile: float = BOOST_LATE_QUANTILE,
    min_score: float = BOOST_MIN_SCORE,
    min_above: float = BOOST_MIN_ABOVE,
    min_kink: float = BOOST_MIN_KINK,
    fit: SharedFit | None = None,
) -> pd.DataFrame:
    """Transcriptional-boost flag: unspliced above the fitted curve in the gene's late induction cells.

    A boost (Barile et al. 2021: the MURK genes of erythroid maturation) raises
    transcription late in a gene's induction, so its latest induction cells sit above a
    curve fitted with one ``alpha``, where a concave induction curve should hold them. Per
    gene:

    - induction cells: cells expressing both layers (``Mu > 0``, ``Ms > 0``) that the model
      puts on the induction branch: ``fit_t <= fit_t_`` for a model with a per-gene time and
      switch (dynamical), else positive velocity;
    - their order: the gene's time ``layers['fit_t']`` when present, else ``Ms`` (which
      grows monotonically along induction);
    - late cells: the last ``late_quantile`` (20%) of them in that order;
    - residuals ``r = (Mu - u_hat) / sd_u``, ``u_hat`` the cell's point on the shared
      kinetic (:func:`shared_fit`), ``sd_u`` the standard deviation of ``Mu`` over the
      expressed cells;
    - the kink: the late cells' mean ``(Mu - (a + b Ms)) / sd_u``, ``a + b Ms`` the
      least-squares line through the earlier induction cells. A gene whose induction is
      straighter than the fitted (concave) curve has late cells above the curve but on
      that line; a boost lifts them above it.

    Parameters
    ----------
    adata
        A fitted AnnData (layers ``Mu``, ``Ms``, ``velocity`` and a fit, see :func:`shared_fit`).
    late_quantile
        Share of the induction cells that are late.
    min_score, min_above, min_kink
        Flag thresholds (see Returns).
    fit
        :func:`shared_fit` of ``adata``, when already computed.

    Returns
    -------
    DataFrame indexed by ``var_names``: ``diag_boost_score`` = mean ``r`` of the late cells
    minus mean ``r`` of the other induction cells (NaN with fewer than
    :data:`BOOST_MIN_CELLS` induction cells or no fit); ``diag_boost_above`` = share of the
    late cells above the curve (``r > 0``); ``diag_boost_kink`` = the kink (NaN with fewer
    than 5 earlier cells or a constant ``Ms``); ``diag_boost`` = score >= ``min_score``
    (0.6), share >= ``min_above`` (0.9) and kink > ``min_kink`` (0).
    """
    if not 0 < late_quantile < 1:
        msg = f"late_quantile must lie in (0, 1); found {late_quantile}."
        raise InputError(msg)
    Mu, Ms = _dense(adata.layers[Key.layers.MU]), _dense(adata.layers[Key.layers.MS])
    fit = shared_fit(adata) if fit is None else fit
    expressed = (Mu > 0) & (Ms > 0)
    sd_u = _std(Mu, expressed)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (Mu - fit.u_hat) / np.where(sd_u > 0, sd_u, np.nan)
    t_ = _var(adata, Key.var.FIT_T_)
    if Key.layers.FIT_T in adata.layers:
        order = _dense(adata.layers[Key.layers.FIT_T])
    else:
        order = Ms
    if Key.layers.FIT_T in adata.layers and Key.var.FIT_T_ in adata.var:
        induction = order <= t_
    else:
        induction = _dense(adata.layers[Key.layers.VELOCITY]) > 0
    score = np.full(adata.n_vars, np.nan)
    above = np.full(adata.n_vars, np.nan)
    kink = np.full(adata.n_vars, np.nan)
    cells = expressed & induction & np.isfinite(r) & np.isfinite(order)
    for j in np.flatnonzero(cells.sum(0) >= BOOST_MIN_CELLS):
        idx = np.flatnonzero(cells[:, j])
        o = order[idx, j]
        late = o >= np.quantile(o, 1 - late_quantile)
        if late.all() or not late.any():
            continue
        rj = r[idx, j]
        score[j] = rj[late].mean() - rj[~late].mean()
        above[j] = (rj[late] > 0).mean()
        s_early, u_early = Ms[idx[~late], j], Mu[idx[~late], j]
        ds = s_early - s_early.mean()
        if (~late).sum() >= _KINK_MIN_CELLS and (ds @ ds) > 0 and sd_u[j] > 0:
            slope = ((u_early - u_early.mean()) @ ds) / (ds @ ds)
            line = u_early.mean() + slope * (Ms[idx[late], j] - s_early.mean())
            kink[j] = (Mu[idx[late], j] - line).mean() / sd_u[j]
    with np.errstate(invalid="ignore"):
        flag = (score >= min_score) & (above >= min_above) & (kink > min_kink)
    return pd.DataFrame(
        {
            Key.var.DIAG_BOOST_SCORE: score,
            Key.var.DIAG_BOOST_ABOVE: above,
            Key.var.DIAG_BOOST_KINK: kink,
            Key.var.DIAG_BOOST: flag,
        },
        index=adata.var_names.copy(),
    )


#: the dynamical model's Box 1 figures (Bergen et al. 2021) and fit quality, as written by the fit
BOX1_COLUMNS: tuple[str, ...] = (
    Key.var.FIT_KINETIC_SIGNAL,
    Key.var.FIT_DETECTION_POWER,
    Key.var.FIT_R2,
    Key.var.FIT_LIKELIHOOD,
    Key.var.FIT_FRAC_INDUCTION,
    Key.var.FIT_FRAC_REPRESSION,
    Key.var.FIT_FRAC_STEADY_ON,
    Key.var.FIT_FRAC_STEADY_OFF,
)


def box1_statistics(adata: AnnData) -> pd.DataFrame:
    """Return the Box 1 statistics the fit already wrote (``var``), as they are.

    ``fit_kinetic_signal`` (``beta / (beta + gamma)``: 0 a straight line, 1 maximal
    curvature), ``fit_detection_power`` (``s_steady * u_steady``), ``fit_r2`` (the curve's
    R²), ``fit_likelihood`` and the shares of cells in scVelo's four states. Models that
    do not write them (steady-state, DeepVelo, VeloVAE for some) give no such columns.

    Returns
    -------
    DataFrame indexed by ``var_names`` with the columns of :data:`BOX1_COLUMNS` present in ``var``.
    """
    cols = [c for c in BOX1_COLUMNS if c in adata.var]
    return adata.var[cols].copy()


#: per-gene rate columns compared across stability refits, whichever the model writes
_RATE_COLUMNS: tuple[str, ...] = (
    Key.var.FIT_ALPHA,
    Key.var.FIT_BETA,
    Key.var.FIT_GAMMA,
    Key.var.GAMMA,
    Key.var.FIT_RATE_ALPHA,
    Key.var.FIT_RATE_BETA,
    Key.var.FIT_RATE_GAMMA,
)


def stability(
    adata: AnnData,
    *,
    n_refits: int = 3,
    fraction: float = 0.8,
    seed: int = 0,
    model: str | None = None,
    params: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> pd.DataFrame:
    """Per-gene stability of the rates and the velocity sign across seeds and cell subsamples.

    The model of the fit (``uns['velocity_params']``, or ``model``) is refitted
    ``n_refits`` times, refit ``k`` on a seeded subsample of ``fraction`` of the cells with
    seed ``seed + k + 1``, on the cells' own ``Mu``/``Ms`` (the moments are not recomputed,
    so only the model's fit varies) and with :data:`STABILITY_OVERRIDES` applied where the
    model has those hyperparameters.

    Returns
    -------
    DataFrame indexed by ``var_names``: ``diag_rate_sd``, the largest over the model's rate
    columns (``fit_alpha``, ``fit_beta``, ``fit_gamma``, ``velocity_gamma``,
    ``fit_rate_*``) of the standard deviation of ``log(rate)`` over the full fit and the
    refits (0.1 is about 10% spread); ``diag_sign_agreement``, over the refits and the cells
    of each subsample where both velocities are finite and nonzero, the share whose
    velocity has the full fit's sign; ``diag_n_refits``, the refits where the gene was
    fitted. NaN for genes no refit fitted.
    """
    if n_refits < 1:
        msg = f"n_refits must be at least 1; found {n_refits}."
        raise InputError(msg)
    if not 0 < fraction < 1:
        msg = f"fraction must lie in (0, 1); found {fraction}."
        raise InputError(msg)
    stored = dict(adata.uns.get(Key.uns.VELOCITY_PARAMS, {}))
    name = model or stored.get("model")
    if name is None:
        msg = (
            "Expected uns['velocity_params']['model'] (written by every explorer fit) or model=; "
            "found neither. Fit a model first (`explorer fit`) or name the model."
        )
        raise InputError(msg)
    cls = MODELS[name]
    accepted = set(inspect.signature(cls).parameters)
    # the stored parameters went through h5ad's types (None as "None", tuples as arrays)
    base = (
        {str(k): _from_uns(v) for k, v in dict(stored.get("params", {})).items()}
        if params is None
        else dict(params)
    )
    base = {k: v for k, v in base.items() if k in accepted}
    base.update({k: v for k, v in STABILITY_OVERRIDES.items() if k in accepted})
    V_full = _dense(adata.layers[Key.layers.VELOCITY])
    rates_full = {c: _var(adata, c) for c in _RATE_COLUMNS if c in adata.var}
    logs: dict[str, list[np.ndarray]] = {
        c: [np.log(np.where(v > 0, v, np.nan))] for c, v in rates_full.items()
    }
    agree = np.zeros(adata.n_vars)
    count = np.zeros(adata.n_vars)
    n_fitted = np.zeros(adata.n_vars, dtype=int)
    n_sub = max(2, round(fraction * adata.n_obs))
    for k in range(n_refits):
        rng = np.random.default_rng([seed, k])
        idx = np.sort(rng.choice(adata.n_obs, size=n_sub, replace=False))
        sub = adata[idx].copy()
        result = cls(**{**base, "seed": seed + k + 1}).fit(sub)
        V = np.asarray(result.velocity, dtype=np.float64)
        ok = np.isfinite(V) & np.isfinite(V_full[idx]) & (V != 0) & (V_full[idx] != 0)
        agree += (ok & (np.sign(V) == np.sign(V_full[idx]))).sum(0)
        count += ok.sum(0)
        n_fitted += np.isfinite(V).all(0)
        for c in logs:
            x = (
                result.gene_params[c].to_numpy(np.float64)
                if c in result.gene_params
                else np.full(adata.n_vars, np.nan)
            )
            logs[c].append(np.log(np.where(x > 0, x, np.nan)))
        if progress is not None:
            progress(Progress(k + 1, n_refits, f"stability refit {k + 1}/{n_refits}"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # genes without any fit stay NaN
        sds = [np.nanstd(np.vstack(v), axis=0) for v in logs.values()]
        rate_sd = np.nanmax(np.vstack(sds), axis=0) if sds else np.full(adata.n_vars, np.nan)
    sign = np.where(count > 0, agree / np.maximum(count, 1), np.nan)
    rate_sd = np.where(n_fitted > 0, rate_sd, np.nan)
    return pd.DataFrame(
        {Key.var.DIAG_RATE_SD: rate_sd, Key.var.DIAG_SIGN_AGREEMENT: sign, Key.var.DIAG_N_REFITS: n_fitted},
        index=adata.var_names.copy(),
    )


#: the reasons :func:`flagged_genes` gives, in ``diag_flag_reason``
FLAG_REASONS: tuple[str, ...] = ("differential_kinetics", "boost", "unstable")


def flag_genes(
    table: pd.DataFrame, *, min_sign_agreement: float = STABILITY_MIN_SIGN_AGREEMENT
) -> pd.DataFrame:
    """Apply the flag rule to a diagnostics table (:func:`gene_diagnostics`'s columns).

    A gene is flagged when any of these holds (its reasons, comma-joined, in
    ``diag_flag_reason``):

    - ``differential_kinetics``: the differential kinetic test is significant in at least
      one cluster (``diag_dk_n_clusters >= 1``);
    - ``boost``: ``diag_boost``;
    - ``unstable``: stability was computed and ``diag_sign_agreement < min_sign_agreement``
      (0.8: the velocity changes sign in more than a fifth of the cells across refits).

    Returns
    -------
    DataFrame indexed like ``table`` with ``diag_flagged`` (bool) and ``diag_flag_reason`` (str).
    """
    n = len(table)
    tests = {
        "differential_kinetics": table.get(Key.var.DIAG_DK_N_CLUSTERS, pd.Series(0, index=table.index))
        .fillna(0)
        .to_numpy()
        >= 1,
        "boost": table.get(Key.var.DIAG_BOOST, pd.Series(data=False, index=table.index))
        .fillna(value=False)
        .to_numpy(bool),
        "unstable": (
            table[Key.var.DIAG_SIGN_AGREEMENT].to_numpy(np.float64) < min_sign_agreement
            if Key.var.DIAG_SIGN_AGREEMENT in table
            else np.zeros(n, dtype=bool)
        ),
    }
    reasons = [",".join(r for r in FLAG_REASONS if tests[r][i]) for i in range(n)]
    return pd.DataFrame(
        {Key.var.DIAG_FLAGGED: np.array([bool(r) for r in reasons]), Key.var.DIAG_FLAG_REASON: reasons},
        index=table.index,
    )


def gene_diagnostics(
    adata: AnnData,
    *,
    groupby: str | None = Key.obs.CLUSTERS,
    stability_refits: int = 0,
    fraction: float = 0.8,
    seed: int = 0,
    write: bool = True,
    progress: ProgressCallback | None = None,
) -> pd.DataFrame:
    """Every per-gene trust diagnostic of a fitted model, in one table (and in ``adata.var``).

    Parameters
    ----------
    adata
        A fitted AnnData (any explorer model: layers ``Mu``, ``Ms``, ``velocity``).
    groupby
        obs column of clusters for the differential kinetic test; ``None`` skips it.
    stability_refits
        Refits for :func:`stability` (each costs one fit of the model on ``fraction`` of
        the cells); 0 (default) skips it.
    fraction, seed
        Subsample share and seed of the stability refits.
    write
        Write the columns into ``adata.var`` (and the p-values into ``adata.varm``).
    progress
        Receives the stability refits' progress.

    Returns
    -------
    DataFrame indexed by ``var_names``. Columns (all documented in the README, section
    "Trust diagnostics"): ``fit_diff_kinetics``, ``fit_pval_kinetics``,
    ``diag_dk_min_pval``, ``diag_dk_n_clusters`` (:func:`differential_kinetic_test`);
    ``diag_boost_score``, ``diag_boost_above``, ``diag_boost`` (:func:`boost_scores`);
    the Box 1 columns present (:func:`box1_statistics`); ``diag_rate_sd``,
    ``diag_sign_agreement``, ``diag_n_refits`` with ``stability_refits > 0``
    (:func:`stability`); ``diag_flagged``, ``diag_flag_reason`` (:func:`flag_genes`).
    With ``write``, sets those columns in ``adata.var`` (the Box 1 columns are already
    there) and ``adata.varm['fit_pvals_kinetics']`` (DataFrame of per-cluster p-values).
    """
    parts = []
    pvals = None
    fit = shared_fit(adata)
    if groupby is not None:
        dk, pvals = differential_kinetic_test(adata, groupby=groupby, fit=fit)
        parts.append(dk)
    parts.append(boost_scores(adata, fit=fit))
    parts.append(box1_statistics(adata))
    if stability_refits > 0:
        parts.append(
            stability(adata, n_refits=stability_refits, fraction=fraction, seed=seed, progress=progress)
        )
    table = pd.concat(parts, axis=1)
    fitted = np.isfinite(_dense(adata.layers[Key.layers.VELOCITY])).all(0)
    flags = flag_genes(table)
    flags.loc[~fitted, Key.var.DIAG_FLAGGED] = False
    flags.loc[~fitted, Key.var.DIAG_FLAG_REASON] = ""
    table = pd.concat([table, flags], axis=1)
    if write:
        for col in table.columns:
            if col not in BOX1_COLUMNS:
                adata.var[col] = table[col].to_numpy()
        if pvals is not None:
            adata.varm[Key.varm.PVALS_KINETICS] = pvals
    return table


def flagged_genes(adata: AnnData) -> pd.Index:
    """Names of the genes :func:`gene_diagnostics` flagged (``var['diag_flagged']``).

    Raises
    ------
    InputError
        If the diagnostics were not computed.
    """
    if Key.var.DIAG_FLAGGED not in adata.var:
        msg = (
            "Expected var['diag_flagged'] (the trust diagnostics); found none. "
            "Run explorer.diagnostics.gene_diagnostics(adata) first."
        )
        raise InputError(msg)
    return adata.var_names[adata.var[Key.var.DIAG_FLAGGED].fillna(value=False).to_numpy(bool)]


def velocity_genes_without_flagged(adata: AnnData) -> BoolArray:
    """``(n_vars,)`` the fit's velocity genes less the flagged ones.

    Write it to ``var['velocity_genes']`` and recompute the velocity graph
    (:func:`explorer.pipeline.derive`) to get velocity without the genes not to trust.
    """
    flagged = adata.var_names.isin(flagged_genes(adata))
    if Key.var.VELOCITY_GENES in adata.var:
        genes = adata.var[Key.var.VELOCITY_GENES].fillna(value=False).to_numpy(bool)
    else:
        genes = np.isfinite(_dense(adata.layers[Key.layers.VELOCITY])).all(0)
    return genes & ~flagged


def result_without_flagged(result: VelocityResult, flagged: Sequence[str] | pd.Index) -> VelocityResult:
    """Return a copy of ``result`` whose velocity genes leave out ``flagged`` (:func:`flagged_genes`).

    Pass it to :func:`explorer.pipeline.derive` to recompute the velocity graph, transition
    matrix, embedding and confidence without the genes not to trust (the fit itself is kept).

    Raises
    ------
    InputError
        If no velocity gene would be left.
    """
    keep = np.asarray(result.velocity_genes, dtype=bool) & ~result.var_names.isin(list(flagged))
    if not keep.any():
        msg = (
            f"All {int(np.sum(result.velocity_genes))} velocity genes are flagged; none would be left "
            "to compute velocity from. Keep some genes (or relax the flag rule)."
        )
        raise InputError(msg)
    return replace(result, velocity_genes=keep)
