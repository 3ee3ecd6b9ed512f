"""Reconstruction error of any model that predicts each cell's ``(u, s)``, on train and held-out cells.

One function scores every model the same way, as VeloVAE's paper (Gu et al. 2022,
Tables 1 and 4) and its ``velovae`` package (``get_mse``, ``get_mae``) do:

- MSE: mean over cells and genes of ``(Mu - u_hat)^2 + (Ms - s_hat)^2``;
- MAE: mean over cells and genes of ``|Mu - u_hat| + |Ms - s_hat|``;
- log-likelihood: per cell, the Gaussian log-density of both residuals summed over genes,
  each gene's noise ``sigma_u``, ``sigma_s`` being its root mean squared residual on the
  *training* cells (the maximum-likelihood noise), so held-out cells are scored with
  noise fitted without them; averaged over cells.

Genes a model did not fit (NaN predictions) are left out, so compare two models on the
genes both fitted (:func:`common_genes`). :func:`predicted_abundances` reads the
prediction of a fit written into an AnnData: ``layers['predicted_u']`` /
``['predicted_s']`` (VeloVAE), or the dynamical model's curve at each cell's gene time
``layers['fit_t']`` through :func:`explorer.kinetics.trajectory`, exactly as
:func:`explorer.kinetics.fitted_gene` draws it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from explorer import kinetics
from explorer.keys import Key

if TYPE_CHECKING:
    from anndata import AnnData

    from explorer._types import BoolArray, FloatArray


@dataclass(frozen=True, slots=True)
class ReconstructionError:
    """Scores of one prediction.

    Attributes
    ----------
    summary
        ``mse_train``, ``mse_test``, ``mae_train``, ``mae_test``, ``loglik_train``,
        ``loglik_test`` (NaN for an empty set) and ``n_genes``.
    per_gene
        The same figures per gene, ``(n_vars,)`` rows (NaN for genes not predicted).
    """

    summary: dict[str, float]
    per_gene: pd.DataFrame


def _dense(x: object) -> np.ndarray:
    arr = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    return np.asarray(arr, dtype=np.float64)


def reconstruction_error(
    Mu: FloatArray,
    Ms: FloatArray,
    u_hat: FloatArray,
    s_hat: FloatArray,
    *,
    train: BoolArray | None = None,
    genes: BoolArray | None = None,
    var_names: pd.Index | None = None,
) -> ReconstructionError:
    """MSE, MAE and Gaussian log-likelihood of ``(u_hat, s_hat)`` on train and held-out cells.

    Parameters
    ----------
    Mu, Ms
        ``(n_obs, n_vars)`` observed moments.
    u_hat, s_hat
        ``(n_obs, n_vars)`` predictions; NaN for genes not predicted.
    train
        ``(n_obs,)`` cells the model was trained on; ``None``: all cells are training
        cells and the held-out figures are NaN.
    genes
        ``(n_vars,)`` genes to score (default: those predicted for every cell).
    var_names
        Index of :attr:`ReconstructionError.per_gene`.

    Returns
    -------
    A :class:`ReconstructionError`.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.ones((4, 2))
    >>> reconstruction_error(x, x, x + 1, x, train=np.array([1, 1, 0, 0], bool)).summary["mse_test"]
    1.0
    """
    Mu, Ms, u_hat, s_hat = (_dense(a) for a in (Mu, Ms, u_hat, s_hat))
    if not (Mu.shape == Ms.shape == u_hat.shape == s_hat.shape):
        msg = (
            f"Expected observed and predicted (u, s) of the same shape; found Mu {Mu.shape}, Ms {Ms.shape}, "
            f"u_hat {u_hat.shape}, s_hat {s_hat.shape}."
        )
        raise ValueError(msg)
    n_obs, n_vars = Mu.shape
    train = np.ones(n_obs, dtype=bool) if train is None else np.asarray(train, dtype=bool)
    predicted = np.isfinite(u_hat).all(0) & np.isfinite(s_hat).all(0)
    genes = predicted if genes is None else np.asarray(genes, dtype=bool) & predicted
    ru, rs = Mu - u_hat, Ms - s_hat
    sq = ru * ru + rs * rs
    ab = np.abs(ru) + np.abs(rs)
    with np.errstate(invalid="ignore", divide="ignore"):
        # noise per gene from the training cells only (MLE), floored to stay finite
        sigma_u = np.sqrt(np.mean(ru[train] ** 2, axis=0)) if train.any() else np.full(n_vars, np.nan)
        sigma_s = np.sqrt(np.mean(rs[train] ** 2, axis=0)) if train.any() else np.full(n_vars, np.nan)
        floor = 1e-6 * (np.nanmax(np.abs(Ms)) + 1.0)
        sigma_u, sigma_s = np.maximum(sigma_u, floor), np.maximum(sigma_s, floor)
        logpdf = (
            -0.5 * (ru / sigma_u) ** 2
            - 0.5 * (rs / sigma_s) ** 2
            - np.log(sigma_u)
            - np.log(sigma_s)
            - math.log(2 * math.pi)
        )
    summary: dict[str, float] = {"n_genes": int(genes.sum())}
    per_gene: dict[str, np.ndarray] = {}
    for name, cells in (("train", train), ("test", ~train)):
        if cells.any() and genes.any():
            summary[f"mse_{name}"] = float(sq[np.ix_(cells, genes)].mean())
            summary[f"mae_{name}"] = float(ab[np.ix_(cells, genes)].mean())
            summary[f"loglik_{name}"] = float(logpdf[np.ix_(cells, genes)].sum(1).mean())
        else:
            for k in ("mse", "mae", "loglik"):
                summary[f"{k}_{name}"] = float("nan")
        for k, arr in (("mse", sq), ("mae", ab), ("loglik", logpdf)):
            col = np.full(n_vars, np.nan)
            if cells.any():
                col[genes] = arr[np.ix_(cells, genes)].mean(0)
            per_gene[f"{k}_{name}"] = col
    index = var_names if var_names is not None else pd.RangeIndex(n_vars)
    return ReconstructionError(summary, pd.DataFrame(per_gene, index=index))


def predicted_abundances(adata: AnnData) -> tuple[np.ndarray, np.ndarray]:
    """``(u_hat, s_hat)``, each ``(n_obs, n_vars)``, of the fit written into ``adata``.

    ``layers['predicted_u']`` and ``['predicted_s']`` when the model wrote them (VeloVAE);
    otherwise the dynamical model's on/off curve of each gene (``var['fit_alpha']``,
    ``fit_beta``, ``fit_gamma``, ``fit_t_``, ``fit_scaling``, offsets ``fit_u0``,
    ``fit_s0``) at the cell's gene time ``layers['fit_t']``, as
    :func:`explorer.kinetics.fitted_gene` reads it. NaN for genes without a fit.

    Raises
    ------
    ValueError
        If ``adata`` holds neither.
    """
    layers = adata.layers
    if Key.layers.PREDICTED_U in layers and Key.layers.PREDICTED_S in layers:
        return _dense(layers[Key.layers.PREDICTED_U]), _dense(layers[Key.layers.PREDICTED_S])
    needed = (Key.var.FIT_ALPHA, Key.var.FIT_BETA, Key.var.FIT_GAMMA, Key.var.FIT_T_)
    if Key.layers.FIT_T not in layers or any(k not in adata.var for k in needed):
        msg = (
            "Expected a fit that predicts each cell's (u, s): layers 'predicted_u'/'predicted_s' "
            f"(VeloVAE) or layers 'fit_t' with var {list(needed)} (dynamical model); found layers "
            f"{sorted(layers)}. Fit one of those models first."
        )
        raise ValueError(msg)
    var = adata.var

    def col(key: str, default: float) -> np.ndarray:
        x = var[key].to_numpy(dtype=np.float64) if key in var else np.full(adata.n_vars, default)
        return np.where(np.isfinite(x), x, default) if key in (Key.var.FIT_U0, Key.var.FIT_S0) else x

    alpha, beta, gamma, t_ = (col(k, np.nan) for k in needed)
    scaling = col(Key.var.FIT_SCALING, 1.0)
    u0, s0 = col(Key.var.FIT_U0, 0.0), col(Key.var.FIT_S0, 0.0)
    ok = np.isfinite(alpha + beta + gamma + t_ + scaling) & (beta > 0) & (gamma > 0) & (scaling > 0)
    t = _dense(layers[Key.layers.FIT_T])
    safe = np.where(ok, 1.0, np.nan)
    # kinetics.fitted_gene's convention: the ODE's splicing rate is fit_beta * fit_scaling
    u, s = kinetics.trajectory(
        t,
        np.maximum(np.nan_to_num(t_, nan=1.0), 0.0),
        np.maximum(np.nan_to_num(alpha, nan=0.0), 0.0),
        np.nan_to_num(beta * scaling, nan=1.0),
        np.nan_to_num(gamma, nan=1.0),
    )
    return (u * scaling + u0) * safe, (s + s0) * safe


def common_genes(*predictions: np.ndarray) -> np.ndarray:
    """``(n_vars,)`` genes every prediction covers for every cell (finite throughout)."""
    out = None
    for p in predictions:
        ok = np.isfinite(p).all(0)
        out = ok if out is None else out & ok
    return out
