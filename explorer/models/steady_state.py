"""The steady-state (velocyto) and stochastic (scVelo) velocity models.

Both assume each gene has an induction steady state where ``u = gamma' s`` with
``gamma' = gamma / beta`` and read velocity as the deviation from it,
``v = Mu - gamma' Ms`` (La Manno et al. 2018). The ratio comes from a regression through
the origin on the cells in the extreme upper quantile of ``u/max(u) + s/max(s)``, where
the steady states should lie. The stochastic model (Bergen et al. 2020) adds the second
moments, ``2 <s^2> - <s>`` against ``2 <us> + <u>``, and solves both equations jointly
by generalised least squares.

Everything follows scVelo 0.3.4 (``scvelo.tools.velocity`` with ``mode="deterministic"``
and ``mode="stochastic"``, ``scvelo.core.LinearRegression``,
``scvelo.tools.optimization.leastsq_generalized``/``get_weight``), vectorised over genes:
the same quantile bounds, the same R² (from the quantile fit, since ``velocity()``
passes ``r2_adjusted=None``), the same velocity-gene rule and the same fallbacks.
Grouped fits (``groupby``/``groups_for_fit``) and ``mode="bayes"`` are not implemented.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from explorer._types import InputError, report
from explorer.graph.moments import second_order_moments
from explorer.keys import Key
from explorer.models.base import Hyperparameters, VelocityResult, require_layers

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from explorer._types import BoolArray, FloatArray, ProgressCallback

logger = logging.getLogger(__name__)

#: scVelo's floor on the per-gene maxima when it normalises u and s to [0, 1]
_MAX_FLOOR = 1e-3

# ----------------------------------------------------------------------------- pure maths


def column_percentile(a: np.ndarray, q: float) -> np.ndarray:
    """``np.percentile(a, q, axis=0)`` (linear method), with one partition instead of two.

    The value above the ``floor`` order statistic is the minimum of the partitioned upper
    part, which is cheaper than asking ``np.partition`` for a second ``kth``; the
    interpolation is numpy's ``_lerp``, so the result is bit-identical.
    """
    n = a.shape[0]
    virtual = q / 100 * (n - 1)
    lo = int(np.floor(virtual))
    frac = virtual - lo
    if a.ndim == 2 and a.shape[1] > 1 and a.flags.c_contiguous:
        # each column's values contiguous (a transposed copy): the partition runs along
        # memory, half the time of partitioning the strided columns, and the order
        # statistics are the same numbers (the caller's mask, built from them on ``a``
        # itself, is the same bit for bit and in the same layout)
        part = np.ascontiguousarray(a.T)  # a copy (a is 2-D with several columns), sorted in place
        part.partition(lo, axis=1)
        part = part.T
    else:
        part = np.partition(a, lo, axis=0)
    below = part[lo]
    above = part[lo + 1 :].min(axis=0) if lo + 1 < n else below
    diff = above - below
    return above - diff * (1 - frac) if frac >= 0.5 else below + diff * frac


def extreme_quantile_mask(
    x: FloatArray, y: FloatArray | None = None, *, perc: float | tuple[float, float] = 95
) -> BoolArray:
    """Cells in the extreme quantiles of ``x/max(x) + y/max(y)``, per gene.

    scVelo's ``get_weight`` (and the trimming in ``LinearRegression``): with a single
    ``perc`` the cells at or above that percentile; with ``(lower, upper)`` those at or
    below the lower or at or above the upper percentile. Without ``y``, ``x`` is used as
    it is (not normalised). Maxima are floored at ``1e-3`` as scVelo does.

    Parameters
    ----------
    x, y
        ``(n_obs, n_vars)`` abundances (e.g. ``Ms``, ``Mu``).
    perc
        Percentile(s) in [0, 100].

    Returns
    -------
    ``(n_obs, n_vars)`` boolean mask.
    """
    if y is None:
        norm = np.asarray(x)
    else:
        norm = x / np.clip(x.max(axis=0), _MAX_FLOOR, None) + y / np.clip(y.max(axis=0), _MAX_FLOOR, None)
    if np.ndim(perc) == 0:
        return norm >= column_percentile(norm, float(perc))
    lower, upper = (column_percentile(norm, float(p)) for p in perc)
    return (norm <= lower) | (norm >= upper)


def _colsum(a: np.ndarray) -> np.ndarray:
    return a.sum(axis=0, dtype=np.float64)


def _coldot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # float32 accumulation as scVelo's sparse ``prod_sum``, without the temporary product
    return np.einsum("ij,ij->j", a, b).astype(np.float64)


def _quantile_perc(perc: float | tuple[float, float], *, fit_offset: bool) -> float | tuple[float, float]:
    """Keep only the upper percentile of ``perc`` for a fit through the origin, as scVelo does."""
    return perc[1] if not fit_offset and np.ndim(perc) == 1 else perc


def linear_regression(
    x: FloatArray,
    y: FloatArray,
    *,
    perc: float | tuple[float, float] | None = None,
    fit_offset: bool = False,
    mask: BoolArray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene least squares ``y ~ offset + gamma x``, optionally on extreme quantiles.

    scVelo's ``LinearRegression(fit_intercept=fit_offset, percentile=perc)``: without
    an offset only the upper percentile of ``perc`` is used; with an offset both tails,
    and genes whose offset comes out negative are refitted through the origin (offset 0).
    NaN slopes (genes without signal) become 0.

    Parameters
    ----------
    x, y
        ``(n_obs, n_vars)`` regressor and response.
    perc
        Extreme-quantile percentiles, or ``None`` for all cells.
    fit_offset
        Fit an intercept.
    mask
        The extreme-quantile mask if already computed (``perc`` is then ignored).

    Returns
    -------
    ``(offset, gamma)``, each ``(n_vars,)`` float64.
    """
    if mask is None and perc is not None:
        mask = extreme_quantile_mask(x, y, perc=_quantile_perc(perc, fit_offset=fit_offset))
    if mask is not None:
        x, y = x * mask, y * mask
        n = mask.sum(axis=0)
    else:
        n = np.full(x.shape[1], x.shape[0])
    xx, xy = _coldot(x, x), _coldot(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        if fit_offset:
            mx, my = _colsum(x) / n, _colsum(y) / n
            gamma = (xy / n - mx * my) / (xx / n - mx**2)
            offset = my - gamma * mx
            negative = offset < 0
            gamma[negative] = xy[negative] / xx[negative]
            offset = np.clip(offset, 0, None)
        else:
            gamma = xy / xx
            offset = np.zeros_like(gamma)
    gamma[np.isnan(gamma)] = 0
    offset[np.isnan(offset)] = 0
    return offset, gamma


def r_squared(residual: FloatArray, total: FloatArray) -> np.ndarray:
    """Per-gene ``1 - sum(residual²) / sum(total²)``; 0 where undefined (scVelo's ``R_squared``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1 - np.einsum("ij,ij->j", residual, residual, dtype=np.float64) / np.einsum(
            "ij,ij->j", total, total, dtype=np.float64
        )
    r2[np.isnan(r2)] = 0
    return r2


def generalized_least_squares(
    x: FloatArray,
    y: FloatArray,
    x2: FloatArray,
    y2: FloatArray,
    res_std: np.ndarray,
    res2_std: np.ndarray,
    *,
    perc: float | tuple[float, float] | None = None,
    fit_offset: bool = False,
    fit_offset2: bool = False,
    mask_xy: BoolArray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-gene joint fit of ``y = offset + gamma x`` and ``y2 = offset2 + gamma x2``.

    scVelo's ``leastsq_generalized``: each equation is weighted by the inverse standard
    deviation of its residuals (``res_std``, ``res2_std``), the first-order rows keep only
    the extreme-quantile cells (of ``x/max + y/max``, or of ``x`` alone), the second-order
    rows keep all cells, and ``gamma = pinv(A'A) A'b`` gene by gene, here batched.

    ``mask_xy`` is the extreme-quantile mask of ``x/max + y/max`` if already computed
    (the deterministic fit uses the same one).

    Returns
    -------
    ``(offset, offset2, gamma)``, each ``(n_vars,)``.
    """
    if perc is not None:
        perc = _quantile_perc(perc, fit_offset=fit_offset)
        if mask_xy is None:
            mask_xy = extreme_quantile_mask(x, y, perc=perc)
        mask = mask_xy | extreme_quantile_mask(x, perc=perc)
        x, y = x * mask, y * mask
    n_obs, n_vars = x.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        w1, w2 = 1 / np.asarray(res_std, dtype=np.float64), 1 / np.asarray(res2_std, dtype=np.float64)
        # Gram matrix of the columns [offset1?, offset2?, x] of the stacked design
        xx = _coldot(x, x) * w1**2 + _coldot(x2, x2) * w2**2
        xy = _coldot(x, y) * w1**2 + _coldot(x2, y2) * w2**2
        cols: list[tuple[str, np.ndarray, np.ndarray]] = []  # (name, <c, x>, <c, y>)
        diag: list[np.ndarray] = []
        if fit_offset:
            cols.append(("offset", _colsum(x) * w1**2, _colsum(y) * w1**2))
            diag.append(n_obs * w1**2)
        if fit_offset2:
            cols.append(("offset2", _colsum(x2) * w2**2, _colsum(y2) * w2**2))
            diag.append(n_obs * w2**2)
    k = len(cols) + 1
    gram = np.zeros((n_vars, k, k))
    rhs = np.zeros((n_vars, k))
    for i, (_, cx, cy) in enumerate(cols):
        gram[:, i, i] = diag[i]
        gram[:, i, -1] = gram[:, -1, i] = cx
        rhs[:, i] = cy
    gram[:, -1, -1] = xx
    rhs[:, -1] = xy
    finite = np.isfinite(gram).all(axis=(1, 2)) & np.isfinite(rhs).all(axis=1)
    coef = np.zeros((n_vars, k))
    if finite.any():
        coef[finite] = np.einsum("gij,gj->gi", np.linalg.pinv(gram[finite]), rhs[finite])
    offset, offset2 = np.zeros(n_vars), np.zeros(n_vars)
    for i, (name, _, _) in enumerate(cols):
        (offset if name == "offset" else offset2)[:] = coef[:, i]
    gamma = coef[:, -1]
    for arr in (offset, offset2, gamma):
        arr[np.isnan(arr)] = 0
    return offset, offset2, gamma


def select_velocity_genes(
    r2: np.ndarray,
    gamma: np.ndarray,
    Ms: FloatArray,
    Mu: FloatArray,
    *,
    min_r2: float = 0.01,
    min_ratio: float = 0.01,
    highly_variable: BoolArray | None = None,
) -> BoolArray:
    """Velocity genes as scVelo picks them: ``r2 > min_r2``, ``gamma > min_ratio``, ``Ms``, ``Mu`` not all 0.

    Restricted to ``highly_variable`` when given. If fewer than two genes pass, scVelo
    falls back to the genes with R² above its 80th percentile (and warns); so do we.
    """
    genes = (r2 > min_r2) & (gamma > min_ratio) & (Ms > 0).any(axis=0) & (Mu > 0).any(axis=0)
    if highly_variable is not None:
        genes &= np.asarray(highly_variable, dtype=bool)
    if genes.sum() < 2:
        passed = int(genes.sum())
        threshold = np.percentile(r2, 80)
        genes = r2 > threshold
        logger.warning(
            "Very low signal in splicing dynamics: %d genes pass min_r2=%s and min_ratio=%s; "
            "using the %d genes with R² above its 80th percentile (%.4f) as velocity genes.",
            passed,
            min_r2,
            min_ratio,
            int(genes.sum()),
            threshold,
        )
    return genes


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True, slots=True)
class _RatioFit:
    """The deterministic steady-state fit of every gene, as :meth:`SteadyState._fit_ratios` returns it."""

    Ms: FloatArray  # (n_obs, n_vars) the moments the fit read, dense float32
    Mu: FloatArray
    mask: BoolArray  # (n_obs, n_vars) cells in the extreme quantiles of each gene
    offset: np.ndarray  # (n_vars,) intercepts (0 without fit_offset)
    gamma: np.ndarray  # (n_vars,) steady-state ratios
    r2: np.ndarray  # (n_vars,)
    genes: BoolArray  # (n_vars,) velocity genes
    velocity: FloatArray  # (n_obs, n_vars) Mu - gamma Ms (- offset)
    offset2: np.ndarray | None = None  # (n_vars,) second-moment intercepts (stochastic, fit_offset2)


def _dense32(matrix: Any) -> np.ndarray:
    if hasattr(matrix, "toarray"):
        matrix = matrix.toarray()
    return np.asarray(matrix, dtype=np.float32)


def _residual(Ms: FloatArray, Mu: FloatArray, gamma: np.ndarray, offset: np.ndarray | None) -> FloatArray:
    """``Mu - gamma Ms (- offset)`` in float32, with one temporary (the velocity)."""
    out = Ms * -gamma.astype(np.float32)
    out += Mu
    if offset is not None:
        out -= offset.astype(np.float32)
    return out


class SteadyState(Hyperparameters):
    """velocyto's steady-state model, as scVelo's ``tl.velocity(mode="deterministic")``.

    Parameters
    ----------
    perc
        Percentiles of the extreme-quantile fit; without an offset only the upper one is
        used (scVelo's default ``[5, 95]``).
    fit_offset
        Fit ``u = offset + gamma s`` instead of a line through the origin.
    min_r2, min_ratio
        Velocity genes need R² above ``min_r2`` and gamma above ``min_ratio``.
    r2_adjusted
        ``False`` (what ``scv.tl.velocity`` does): R² of the extreme-quantile line over
        all cells. ``True``: R² of a least-squares line through all cells.
    use_highly_variable
        Restrict velocity genes to ``var['highly_variable']`` when it exists.
    constrain_ratio
        Clip gamma to ``(low, high)``, or to at most a single value; ``None`` leaves it.
    seed
        Unused (the fit has no randomness); every model takes one, so fits can be
        requested the same way.

    Examples
    --------
    >>> result = SteadyState().fit(adata)  # doctest: +SKIP
    >>> result.to_adata(adata)  # doctest: +SKIP
    """

    name: ClassVar[str] = "steady_state"
    param_ranges: ClassVar[dict[str, str]] = {"perc": "[0, 100]", "constrain_ratio": "[0, inf)"}

    def __init__(
        self,
        *,
        perc: tuple[float, float] = (5, 95),
        fit_offset: bool = False,
        min_r2: float = 0.01,
        min_ratio: float = 0.01,
        r2_adjusted: bool = False,
        use_highly_variable: bool = True,
        constrain_ratio: float | tuple[float, float] | None = None,
        seed: int = 0,
    ) -> None:
        self.perc = perc
        self.fit_offset = fit_offset
        self.min_r2 = min_r2
        self.min_ratio = min_ratio
        self.r2_adjusted = r2_adjusted
        self.use_highly_variable = use_highly_variable
        self.constrain_ratio = constrain_ratio
        self.seed = seed

    def _check(self, adata: AnnData) -> None:
        require_layers(adata, self.name)

    def _fit_ratios(self, adata: AnnData) -> _RatioFit:
        Ms, Mu = _dense32(adata.layers[Key.layers.MS]), _dense32(adata.layers[Key.layers.MU])
        mask = extreme_quantile_mask(Ms, Mu, perc=_quantile_perc(self.perc, fit_offset=self.fit_offset))
        offset, gamma = linear_regression(Ms, Mu, fit_offset=self.fit_offset, mask=mask)
        if self.constrain_ratio is not None:
            bounds = np.atleast_1d(self.constrain_ratio)
            low, high = (None, bounds[0]) if bounds.size < 2 else (bounds[0], bounds[1])
            gamma = np.clip(gamma, low, high)
        velocity = _residual(Ms, Mu, gamma, offset if self.fit_offset else None)
        residual = velocity
        if self.r2_adjusted:
            r2_offset, r2_gamma = linear_regression(Ms, Mu, fit_offset=self.fit_offset)
            residual = _residual(Ms, Mu, r2_gamma, r2_offset if self.fit_offset else None)
        r2 = r_squared(residual, Mu - Mu.mean(axis=0))
        hv = None
        if self.use_highly_variable and Key.var.HIGHLY_VARIABLE in adata.var:
            hv = adata.var[Key.var.HIGHLY_VARIABLE].to_numpy(dtype=bool)
        genes = select_velocity_genes(
            r2, gamma, Ms, Mu, min_r2=self.min_r2, min_ratio=self.min_ratio, highly_variable=hv
        )
        return _RatioFit(
            Ms=Ms, Mu=Mu, mask=mask, offset=offset, gamma=gamma, r2=r2, genes=genes, velocity=velocity
        )

    def _result(self, adata: AnnData, fit: _RatioFit) -> VelocityResult:
        gamma32, offset32 = fit.gamma.astype(np.float32), fit.offset.astype(np.float32)
        velocity = fit.velocity
        r2 = fit.r2.astype(np.float32)
        columns = {Key.var.GAMMA: gamma32, Key.var.R2: r2}
        if self.fit_offset:
            columns[Key.var.OFFSET] = offset32
        if fit.offset2 is not None:
            columns[Key.var.OFFSET2] = fit.offset2.astype(np.float32)
        var_names = adata.var_names.copy()
        return VelocityResult(
            model=self.name,
            params=self.get_params(),
            obs_names=adata.obs_names.copy(),
            var_names=var_names,
            velocity=np.ascontiguousarray(velocity, dtype=np.float32),
            gene_params=pd.DataFrame(columns, index=var_names),
            velocity_genes=np.asarray(fit.genes, dtype=bool),
            likelihood=pd.Series(r2, index=var_names, name=Key.var.R2),
        )

    def fit(self, adata: AnnData, *, progress: ProgressCallback | None = None) -> VelocityResult:
        """Fit gamma per gene on layers ``Ms``/``Mu``; ``adata`` is left unchanged.

        Returns
        -------
        A :class:`~explorer.models.base.VelocityResult` with ``velocity = Mu - gamma Ms``
        for every gene, ``gene_params`` columns ``velocity_gamma`` and ``velocity_r2``
        (plus ``velocity_offset`` with ``fit_offset``), the velocity genes and R² as
        likelihood.
        """
        self._check(adata)
        report(progress, 0, 1, "steady-state ratios")
        fit = self._fit_ratios(adata)
        report(progress, 1, 1, "steady-state ratios")
        return self._result(adata, fit)


class Stochastic(SteadyState):
    """scVelo's stochastic model, ``tl.velocity(mode="stochastic")``.

    The deterministic fit first picks the velocity genes; on those, gamma is refitted by
    generalised least squares on the first moments (extreme quantiles) together with the
    second moments (all cells): ``2 Mus + Mu = gamma (2 Mss - Ms)``. Other genes keep
    the deterministic gamma; R² and the velocity genes are the deterministic ones, as in
    scVelo. Needs layers ``spliced``/``unspliced`` (normalised) and obsp
    ``connectivities`` for the second moments.

    Parameters
    ----------
    fit_offset2
        Fit an offset in the second-moment equation too.
    **others
        As :class:`SteadyState`.
    """

    name: ClassVar[str] = "stochastic"

    def __init__(
        self,
        *,
        perc: tuple[float, float] = (5, 95),
        fit_offset: bool = False,
        fit_offset2: bool = False,
        min_r2: float = 0.01,
        min_ratio: float = 0.01,
        r2_adjusted: bool = False,
        use_highly_variable: bool = True,
        constrain_ratio: float | tuple[float, float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            perc=perc,
            fit_offset=fit_offset,
            min_r2=min_r2,
            min_ratio=min_ratio,
            r2_adjusted=r2_adjusted,
            use_highly_variable=use_highly_variable,
            constrain_ratio=constrain_ratio,
            seed=seed,
        )
        self.fit_offset2 = fit_offset2

    def _check(self, adata: AnnData) -> None:
        require_layers(
            adata, self.name, (Key.layers.MS, Key.layers.MU, Key.layers.SPLICED, Key.layers.UNSPLICED)
        )
        if Key.obsp.CONNECTIVITIES not in adata.obsp:
            msg = (
                f"The {self.name!r} model needs the neighbour graph obsp[{Key.obsp.CONNECTIVITIES!r}] "
                f"for second moments; adata.obsp has {list(adata.obsp)}. "
                "Run explorer.pipeline.prepare(adata) first."
            )
            raise InputError(msg)

    def fit(self, adata: AnnData, *, progress: ProgressCallback | None = None) -> VelocityResult:
        """Fit the stochastic model; ``adata`` is left unchanged.

        Returns
        -------
        A :class:`~explorer.models.base.VelocityResult` as :meth:`SteadyState.fit`, with
        gamma from the second-moment fit on the velocity genes (and ``velocity_offset2``
        with ``fit_offset2``).
        """
        self._check(adata)
        report(progress, 0, 2, "steady-state ratios")
        fit = self._fit_ratios(adata)
        report(progress, 1, 2, "second moments")
        idx = fit.genes if fit.genes.any() else np.ones(adata.n_vars, dtype=bool)
        Ms, Mu = fit.Ms[:, idx], fit.Mu[:, idx]
        residual = fit.velocity[:, idx]  # of the deterministic fit
        Mss, Mus = second_order_moments(adata if idx.all() else adata[:, idx])
        var_ss = 2 * Mss - Ms
        cov_us = 2 * Mus + Mu
        offset2_init, gamma2_init = linear_regression(var_ss, cov_us, fit_offset=self.fit_offset2)
        res2 = cov_us - gamma2_init.astype(np.float32) * var_ss - offset2_init.astype(np.float32)
        offset, offset2, gamma = generalized_least_squares(
            Ms,
            Mu,
            var_ss,
            cov_us,
            residual.std(axis=0),
            res2.std(axis=0),
            perc=self.perc,
            fit_offset=self.fit_offset,
            fit_offset2=self.fit_offset2,
            mask_xy=fit.mask[:, idx],  # the deterministic fit's quantiles, same columns
        )
        all_gamma, all_offset = fit.gamma.copy(), fit.offset.copy()
        all_gamma[idx] = gamma
        all_offset[idx] = offset
        velocity = fit.velocity  # the deterministic velocity, its refitted genes replaced in place
        velocity[:, idx] = _residual(Ms, Mu, gamma, offset if self.fit_offset else None)
        all_offset2 = None
        if self.fit_offset2:
            all_offset2 = np.zeros(adata.n_vars)
            all_offset2[idx] = offset2
        report(progress, 2, 2, "second moments")
        fit = dataclasses.replace(
            fit, gamma=all_gamma, offset=all_offset, velocity=velocity, offset2=all_offset2
        )
        return self._result(adata, fit)


def genes_to_fit(adata: AnnData, genes: str | Sequence[str]) -> np.ndarray:
    """``(n_vars,)`` mask of the genes a model fits, as the models' ``genes`` parameter names them.

    ``"all"``; ``"velocity_genes"``: the velocity genes of the deterministic steady-state
    fit without the highly-variable filter (scVelo's ``recover_dynamics`` with
    ``perc=[5, 95]``); or a list of gene names, all of which must be in ``adata``.
    """
    if isinstance(genes, str):
        if genes == "all":
            return np.ones(adata.n_vars, dtype=bool)
        if genes == "velocity_genes":
            return np.asarray(SteadyState(use_highly_variable=False).fit(adata).velocity_genes, dtype=bool)
        msg = f"Invalid genes {genes!r}. Valid options are: 'velocity_genes', 'all', or a list of gene names."
        raise InputError(msg)
    names = pd.Index([str(g) for g in genes])
    unknown = names.difference(adata.var_names)
    if len(unknown):
        msg = f"{len(unknown)} of the genes to fit are not in adata.var_names, e.g. {list(unknown[:5])}."
        raise InputError(msg)
    return np.asarray(adata.var_names.isin(names), dtype=bool)
