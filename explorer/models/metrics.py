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
genes both fitted (:func:`common_genes`).

:func:`model_metrics` gathers every score of one fit written into an AnnData (CBDir and
ICVCoh for given transitions, DeepVelo's consistencies, velocity confidence, Spearman
correlation of the latent time with capture times, reconstruction error), as ``explorer
compare`` tabulates them for several models. :func:`predicted_abundances` reads the
prediction of a fit written into an AnnData: ``layers['predicted_u']`` /
``['predicted_s']`` (VeloVAE), or the dynamical model's curve at each cell's gene time
``layers['fit_t']`` through :func:`explorer.kinetics.trajectory`, exactly as
:func:`explorer.kinetics.fitted_gene` draws it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from explorer import kinetics
from explorer.graph.metrics import (
    cross_boundary_correctness_per_cell,
    cross_boundary_gene_terms,
    in_cluster_coherence,
    velocity_consistency,
    velocity_consistency_by_type,
)
from explorer.graph.transition import knn_indices, velocity_confidence
from explorer.keys import Key

if TYPE_CHECKING:
    from anndata import AnnData

    from explorer._types import BoolArray, FloatArray

#: entries (cells x genes) of the block of genes :func:`reconstruction_error` and
#: :func:`gene_likelihood` score at a time (8 MB of float64; 4 million entries were 0.2 GB
#: of temporaries at 100,000 cells)
_BLOCK_ENTRIES = 1 << 20


def gene_blocks(n_obs: int, n_vars: int, entries: int | None = None) -> list[slice]:
    """Consecutive column slices covering ``n_vars`` genes, each about ``entries`` cells x genes.

    ``entries`` defaults to ``_BLOCK_ENTRIES``; a block has at least one gene, and a last
    block of one gene joins the one before: numpy sums a lone column pairwise, and a
    column of a wider block in order, so a gene's figures would differ in the last bit
    from those computed with all genes at once.

    Examples
    --------
    >>> gene_blocks(10, 5, entries=20)
    [slice(0, 2, None), slice(2, 5, None)]
    """
    per_block = max(1, (_BLOCK_ENTRIES if entries is None else entries) // max(n_obs, 1))
    starts = list(range(0, n_vars, per_block))
    if per_block > 1 and len(starts) > 1 and n_vars - starts[-1] == 1:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, [*starts[1:], n_vars], strict=True)]


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
    per_cell
        ``mse``, ``mae`` per cell, ``(n_obs,)`` rows: the mean over the scored genes, for
        training and held-out cells alike.
    """

    summary: dict[str, float]
    per_gene: pd.DataFrame
    per_cell: pd.DataFrame | None = None


def _dense(x: object, dtype: Any = np.float64) -> np.ndarray:
    """``x`` as a dense array, of ``dtype`` (``None``: its own)."""
    arr = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    return np.asarray(arr, dtype=dtype)


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
    Mu, Ms, u_hat, s_hat = (_dense(a, dtype=None) for a in (Mu, Ms, u_hat, s_hat))
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
    # the squared and absolute residuals and the log-likelihood of every cell and gene, made
    # a block of genes at a time in float64 (each gene's noise is its own) and summed there
    # over the cells of each set and over the scored genes of each cell: neither the float64
    # copies of the four inputs nor the three (n_obs, n_vars) figures exist whole (1.9 GB,
    # then 0.5 GB, at 100,000 cells and 200 genes)
    sets = (("train", train), ("test", ~train))
    per_gene = {f"{k}_{name}": np.full(n_vars, np.nan) for name, _ in sets for k in ("mse", "mae", "loglik")}
    cell_sums = {k: np.zeros(n_obs) for k in ("mse", "mae", "loglik")}
    with np.errstate(invalid="ignore", divide="ignore"):
        floor = 1e-6 * (float(np.nanmax(np.abs(Ms))) + 1.0)
        for block in gene_blocks(n_obs, n_vars):
            ru = np.asarray(Mu[:, block], dtype=np.float64) - np.asarray(u_hat[:, block], dtype=np.float64)
            rs = np.asarray(Ms[:, block], dtype=np.float64) - np.asarray(s_hat[:, block], dtype=np.float64)
            # noise per gene from the training cells only (MLE), floored to stay finite
            width = block.stop - block.start
            sigma_u = np.sqrt(np.mean(ru[train] ** 2, axis=0)) if train.any() else np.full(width, np.nan)
            sigma_s = np.sqrt(np.mean(rs[train] ** 2, axis=0)) if train.any() else np.full(width, np.nan)
            sigma_u, sigma_s = np.maximum(sigma_u, floor), np.maximum(sigma_s, floor)
            figures = {
                "mse": ru * ru + rs * rs,
                "mae": np.abs(ru) + np.abs(rs),
                "loglik": (
                    -0.5 * (ru / sigma_u) ** 2
                    - 0.5 * (rs / sigma_s) ** 2
                    - np.log(sigma_u)
                    - np.log(sigma_s)
                    - math.log(2 * math.pi)
                ),
            }
            del ru, rs
            scored = genes[block]
            for k, arr in figures.items():
                for name, cells in sets:
                    if cells.any():
                        per_gene[f"{k}_{name}"][block][scored] = arr[cells][:, scored].mean(0)
                cell_sums[k] += arr[:, scored].sum(1)
    n_genes = int(genes.sum())
    summary: dict[str, float] = {"n_genes": n_genes}
    for name, cells in sets:
        for k in ("mse", "mae", "loglik"):
            value = float("nan")
            if cells.any() and n_genes:
                # the mean over cells and genes; the log-likelihood summed over genes
                value = float(cell_sums[k][cells].mean()) / (1 if k == "loglik" else n_genes)
            summary[f"{k}_{name}"] = value
    index = var_names if var_names is not None else pd.RangeIndex(n_vars)
    nan = np.full(n_obs, np.nan)
    cells = pd.DataFrame(
        {k: cell_sums[k] / n_genes if n_genes else nan for k in ("mse", "mae")}
    )
    return ReconstructionError(summary, pd.DataFrame(per_gene, index=index), cells)


def gene_likelihood(
    Mu: FloatArray, Ms: FloatArray, u_hat: FloatArray, s_hat: FloatArray, *, cells: BoolArray | None = None
) -> np.ndarray:
    """ScVelo's per-gene likelihood of predictions, ``u`` and ``s`` in units of their spread.

    As scVelo's ``get_likelihood`` (and :func:`explorer.models._em.likelihood`) reads a
    dynamical fit: ``d^2 = ((u_hat - u) / sd(u))^2 + ((s_hat - s) / sd(s))^2`` per cell,
    ``varx`` the variance of the distance signed by the spliced residual, and
    ``exp(-mean(d^2) / (2 varx) - log(2 pi varx) / 2)`` over the cells given (all of them,
    without scVelo's cell weights and ratio penalty). It does not depend on a gene's
    expression level, as a Gaussian density in counts does (VeloVAE's `fit_likelihood` was
    that density until 2026-12-05, which put genes of almost no unspliced RNA first).
    ``cells``: an ``(n_obs,)`` mask of the cells to score (default: all). Computed in
    float64 a block of genes at a time (:func:`gene_blocks`).

    Returns
    -------
    ``(n_vars,)`` likelihoods; NaN for a gene without spread or predictions.

    Examples
    --------
    >>> import numpy as np
    >>> u = np.linspace(0, 1, 200)[:, None]
    >>> near, far = gene_likelihood(u, u, u + 0.01, u), gene_likelihood(u, u, u + 0.2 * np.cos(40 * u), u)
    >>> bool(near[0] > far[0])
    True
    """
    arrays = [a if hasattr(a, "toarray") else np.asarray(a) for a in (Mu, Ms, u_hat, s_hat)]
    n_obs, n_vars = arrays[0].shape
    rows = slice(None) if cells is None else np.flatnonzero(np.asarray(cells, dtype=bool))
    loglik = np.empty(n_vars)
    for block in gene_blocks(n_obs if cells is None else len(rows), n_vars):
        mu, ms, uh, sh = (_dense(a[rows, block]) for a in arrays)
        with np.errstate(invalid="ignore", divide="ignore"):
            su, ss = mu.std(axis=0), ms.std(axis=0)
            su, ss = np.where(su > 0, su, np.nan), np.where(ss > 0, ss, np.nan)
            du, ds = (uh - mu) / su, (sh - ms) / ss
            d2 = du * du + ds * ds
            varx = d2.mean(axis=0) - (np.sign(ds) * np.sqrt(d2)).mean(axis=0) ** 2
            varx = np.where(varx > 0, varx, 1.0)  # scVelo replaces a variance of 0 by 1
            loglik[block] = -0.5 * d2.mean(axis=0) / varx - 0.5 * np.log(2 * math.pi * varx)
    return np.exp(loglik)


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


def latent_time_spearman(latent_time: FloatArray, capture_time: FloatArray) -> float:
    """Spearman rank correlation of a latent time with capture times (cells with both finite).

    Returns
    -------
    The correlation in [-1, 1]; NaN with fewer than 3 such cells or a constant input.
    """
    from scipy.stats import spearmanr

    lt = np.asarray(latent_time, dtype=np.float64)
    ct = np.asarray(pd.to_numeric(pd.Series(np.asarray(capture_time)), errors="coerce"), dtype=np.float64)
    ok = np.isfinite(lt) & np.isfinite(ct)
    if ok.sum() < 3 or np.ptp(lt[ok]) == 0 or np.ptp(ct[ok]) == 0:  # noqa: PLR2004
        return float("nan")
    return float(spearmanr(lt[ok], ct[ok])[0])


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """Every score of one fit (:func:`model_metrics`).

    Attributes
    ----------
    summary
        Metric name -> value (NaN where the fit or the data cannot give it); the names are
        those of the README's metrics table.
    per_cell
        ``(n_obs,)`` rows: ``velocity_consistency``, ``velocity_consistency_type``,
        ``icvcoh``, ``velocity_confidence``; ``cbdir[A>B]`` per transition (the cell's
        term of CBDir, NaN outside the scored cells of A); ``mse``, ``mae`` (mean over the
        fit's predicted genes; only for fits that predict ``(u, s)``).
    per_cluster
        One row per cluster: the means of :attr:`per_cell`'s columns over its cells, and
        ``n_cells``.
    per_gene
        One row per gene (``var_names``), a column ``cbdir[A>B]`` per transition: the
        gene's term of that CBDir (:func:`~explorer.graph.metrics.cross_boundary_gene_terms`;
        the terms sum to it, NaN for genes it leaves out): which genes carry the direction.
    """

    summary: dict[str, float]
    per_cell: pd.DataFrame
    per_cluster: pd.DataFrame
    per_gene: pd.DataFrame = field(default_factory=pd.DataFrame)


def model_metrics(
    adata: AnnData,
    *,
    transitions: list[tuple[str, str]] | None = None,
    cluster_key: str = Key.obs.CLUSTERS,
    time_key: str | None = None,
) -> ModelMetrics:
    """All metrics of the fit written into ``adata`` (layers ``velocity``, ``Ms``; obsp ``distances``).

    Velocities are compared on the fit's velocity genes (``var['velocity_genes']``, else
    every gene with finite velocity), as the velocity graph uses them.

    Parameters
    ----------
    adata
        Cells with a fit (``explorer fit`` or ``run_velocity``).
    transitions
        ``(source, target)`` cluster pairs: ``cbdir[source>target]`` for each
        (:func:`~explorer.graph.metrics.cross_boundary_correctness`), their mean
        ``cbdir``, and ``icvcoh[cluster]`` for each cluster named, with their mean
        ``icvcoh``.
    cluster_key
        obs column of clusters (transitions, ICVCoh, cell-type-wise consistency).
    time_key
        obs column of capture times: ``latent_time_spearman`` against ``obs['latent_time']``.

    Returns
    -------
    A :class:`ModelMetrics`. Summary names: ``cbdir[A>B]``, ``cbdir``, ``icvcoh[A]``,
    ``icvcoh``, ``consistency``, ``consistency_type``, ``velocity_confidence``,
    ``latent_time_spearman``, ``mse``, ``mae``, ``loglik`` (training cells: all, or
    ``obs['fit_train']``), ``mse_test``, ``mae_test``, ``loglik_test`` (held-out cells),
    ``n_velocity_genes``.

    Raises
    ------
    ValueError
        If a needed key is missing, or a cluster of ``transitions`` is not in ``cluster_key``.
    """
    missing = [
        k
        for k, slot in (
            (Key.layers.VELOCITY, adata.layers),
            (Key.layers.MS, adata.layers),
            (Key.obsp.DISTANCES, adata.obsp),
        )
        if k not in slot
    ]
    if missing:
        msg = (
            f"Expected a fitted AnnData with {missing}; found layers {sorted(adata.layers)}, obsp "
            f"{sorted(adata.obsp)}. Fit a model first (`explorer fit`)."
        )
        raise ValueError(msg)
    has_clusters = cluster_key in adata.obs
    labels = adata.obs[cluster_key].astype(str).to_numpy() if has_clusters else None
    transitions = list(transitions or [])
    if transitions:
        if labels is None:
            msg = f"Transitions need obs[{cluster_key!r}]; the obs columns are {list(adata.obs.columns)}."
            raise ValueError(msg)
        known = set(labels)
        unknown = sorted({c for pair in transitions for c in pair} - known)
        if unknown:
            msg = (
                f"Clusters {unknown} of the transitions are not in obs[{cluster_key!r}]; its clusters are "
                f"{sorted(known)}."
            )
            raise ValueError(msg)
    V = _dense(adata.layers[Key.layers.VELOCITY])
    genes = np.isfinite(V).all(0)
    if Key.var.VELOCITY_GENES in adata.var:
        vg = adata.var[Key.var.VELOCITY_GENES].fillna(value=False).to_numpy(bool) & genes
        genes = vg if vg.any() else genes
    Vg = V[:, genes]
    indices = knn_indices(adata.obsp[Key.obsp.DISTANCES])
    summary: dict[str, float] = {"n_velocity_genes": int(genes.sum())}
    per_cell = pd.DataFrame(index=adata.obs_names.copy())
    per_cell[Key.obs.VELOCITY_CONSISTENCY] = velocity_consistency(Vg, indices)
    per_cell[Key.obs.VELOCITY_CONSISTENCY_TYPE] = (
        velocity_consistency_by_type(Vg, labels) if labels is not None else np.nan
    )
    per_cell["icvcoh"] = in_cluster_coherence(Vg, indices, labels) if labels is not None else np.nan
    per_cell[Key.obs.VELOCITY_CONFIDENCE] = velocity_confidence(Vg, indices)

    cbdirs = []
    per_gene = pd.DataFrame(index=adata.var_names.copy())
    for source, target in transitions:
        terms = cross_boundary_correctness_per_cell(
            adata, V, source=source, target=target, genes=genes, cluster_key=cluster_key
        )
        per_cell[f"cbdir[{source}>{target}]"] = terms
        per_gene[f"cbdir[{source}>{target}]"] = cross_boundary_gene_terms(
            adata, V, source=source, target=target, genes=genes, cluster_key=cluster_key
        )
        value = float(terms[np.isfinite(terms)].mean()) if np.isfinite(terms).any() else float("nan")
        summary[f"cbdir[{source}>{target}]"] = value
        cbdirs.append(value)
    summary["cbdir"] = float(np.nanmean(cbdirs)) if np.isfinite(cbdirs).any() else float("nan")
    named = list(dict.fromkeys(c for pair in transitions for c in pair))
    icv = per_cell["icvcoh"].to_numpy()
    coh = []
    for c in named:
        vals = icv[(labels == c) & np.isfinite(icv)]
        summary[f"icvcoh[{c}]"] = float(vals.mean()) if vals.size else float("nan")
        coh.append(summary[f"icvcoh[{c}]"])
    summary["icvcoh"] = float(np.nanmean(coh)) if np.isfinite(coh).any() else float("nan")
    for name, col in (
        ("consistency", Key.obs.VELOCITY_CONSISTENCY),
        ("consistency_type", Key.obs.VELOCITY_CONSISTENCY_TYPE),
        ("velocity_confidence", Key.obs.VELOCITY_CONFIDENCE),
    ):
        x = per_cell[col].to_numpy(np.float64)
        summary[name] = float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")

    summary["latent_time_spearman"] = float("nan")
    if time_key is not None:
        if time_key not in adata.obs:
            msg = (
                f"obs column {time_key!r} (capture times) not found; the obs columns are "
                f"{list(adata.obs.columns)}."
            )
            raise ValueError(msg)
        if Key.obs.LATENT_TIME in adata.obs:
            summary["latent_time_spearman"] = latent_time_spearman(
                adata.obs[Key.obs.LATENT_TIME].to_numpy(), adata.obs[time_key].to_numpy()
            )

    for k in ("mse", "mae", "loglik", "mse_test", "mae_test", "loglik_test"):
        summary[k] = float("nan")
    try:
        u_hat, s_hat = predicted_abundances(adata)
    except ValueError:
        pass
    else:
        train = adata.obs[Key.obs.FIT_TRAIN].to_numpy(bool) if Key.obs.FIT_TRAIN in adata.obs else None
        found = reconstruction_error(
            adata.layers[Key.layers.MU], adata.layers[Key.layers.MS], u_hat, s_hat, train=train
        )
        err = found.summary
        for k in ("mse", "mae", "loglik"):
            summary[k] = err[f"{k}_train"]
            summary[f"{k}_test"] = err[f"{k}_test"]
        if found.per_cell is not None:
            for k in ("mse", "mae"):
                per_cell[k] = found.per_cell[k].to_numpy()

    if labels is not None:
        grouped = per_cell.groupby(labels, sort=True)
        per_cluster = grouped.mean()
        per_cluster["n_cells"] = grouped.size()
    else:
        per_cluster = pd.DataFrame(columns=[*per_cell.columns, "n_cells"])
    return ModelMetrics(summary, per_cell, per_cluster, per_gene)
