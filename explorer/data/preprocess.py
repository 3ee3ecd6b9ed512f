"""scVelo-compatible preprocessing: gene filter, per-cell normalisation, log1p, gene selection.

``filter_and_normalize`` does what scVelo 0.2's
``scv.pp.filter_and_normalize(adata, min_shared_counts=20, n_top_genes=2000, log=True)``
did, which in scVelo 0.3.4 is ``scv.pp.filter_and_normalize(adata, min_shared_counts=20)``
followed by ``sc.pp.log1p`` and scanpy's
``sc.pp.highly_variable_genes(flavor="seurat", n_top_genes=2000, subset=True)``.
The defaults are :data:`explorer._types.PREPROCESS`. :func:`explorer.pipeline.prepare`
runs this, then the graph steps (PCA, kNN graph, moments ``Ms``/``Mu``, UMAP); this
module only works on the count matrices and never imports :mod:`explorer.graph`.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from explorer._types import PREPROCESS, InputError, option
from explorer.data.io import MAX_VALUE, validate_counts
from explorer.keys import Key

logger = logging.getLogger(__name__)

#: scVelo's ``not_yet_normalized`` looks at the first five cells only
_N_ROWS_CHECKED = 5
#: the velocity graph compares velocity vectors across genes: one gene gives no direction
MIN_GENES = 2
#: scVelo 0.2 advised log1p when the first ten cells of X sum as their spliced counts do
_N_ROWS_LOG_ADVISED = 10
#: log1p of any count stays far below this; expm1 of float32 overflows above 88.7
MAX_LOGGED = 30.0
#: scVelo adds var['gene_count_corr'] only when more genes than this are left
_GENE_COUNT_CORR_MIN_GENES = 3000


def check_options(
    *,
    min_shared_counts: int = PREPROCESS.min_shared_counts,
    n_top_genes: int | None = PREPROCESS.n_top_genes,
    n_pcs: int = PREPROCESS.n_pcs,
    n_neighbors: int = PREPROCESS.n_neighbors,
) -> None:
    """Check the preprocessing options' types and ranges before any work starts.

    Raises
    ------
    InputError
        For a non-integer option, ``min_shared_counts < 0``, ``n_top_genes < 1``,
        ``n_pcs < 1`` or ``n_neighbors < 2``; the message names the option as the caller
        passes it (``--n-pcs`` on the command line, ``n_pcs=`` in Python).
    """
    lowest = {"min_shared_counts": 0, "n_top_genes": 1, "n_pcs": 1, "n_neighbors": 2}
    why = {
        "min_shared_counts": "0 keeps every gene",
        "n_top_genes": "None keeps every gene that passes the filter",
        "n_pcs": "principal components for the neighbour graph",
        "n_neighbors": "the cell itself and at least one neighbour",
    }
    values = {
        "min_shared_counts": min_shared_counts,
        "n_top_genes": n_top_genes,
        "n_pcs": n_pcs,
        "n_neighbors": n_neighbors,
    }
    for name, value in values.items():
        if name == "n_top_genes" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            msg = (
                f"{name} must be a whole number; found {value!r}. Pass e.g. {option(name)}{lowest[name] + 1}."
            )
            raise InputError(msg)
        if value < lowest[name]:
            msg = (
                f"{name} must be at least {lowest[name]} ({why[name]}); found {value}. "
                f"Pass {option(name)} with a value of at least {lowest[name]}."
            )
            raise InputError(msg)


def is_preprocessed(adata: AnnData) -> bool:
    """Whether ``adata`` already has the first-order moments ``Ms`` and ``Mu``.

    Such data (e.g. written by scVelo or by explorer) is used as it is: normalising it
    again would change the values the moments were computed from.
    """
    return Key.layers.MS in adata.layers and Key.layers.MU in adata.layers


def looks_like_counts(matrix: sparse.spmatrix | np.ndarray) -> bool:
    """Whether the first five rows hold whole numbers (within 1e-3), as scVelo's ``not_yet_normalized``."""
    head = matrix[:_N_ROWS_CHECKED]
    values = head.data if sparse.issparse(head) else np.asarray(head)
    return bool(np.allclose(np.ravel(values) % 1, 0, atol=1e-3))


def x_is_logged(adata: AnnData) -> bool:
    """Whether ``adata.X`` is log-transformed already, for X that is not raw counts.

    Logged when scanpy's ``uns['log1p']`` marker is there. Otherwise not logged when X
    still holds the spliced values (scVelo 0.2's ``log_advised`` test: the first ten cells
    sum the same), when its largest value is above :data:`MAX_LOGGED` (no log1p of a
    count gets there; ``expm1`` of it overflows float32 soon after), or when it has
    negative values below -1 (no log1p gives those; such X is scaled and is left alone
    too). Anything else is taken as logged without the marker.
    """
    if Key.uns.LOG1P in adata.uns:
        return True
    X = adata.X
    values = X.data if sparse.issparse(X) else np.asarray(X)
    if values.size == 0:
        return True
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() < -1:
        return True  # scaled/centred: log1p would make NaN; leave it to the user
    if Key.layers.SPLICED in adata.layers:
        head_x = X[:_N_ROWS_LOG_ADVISED].sum()
        head_s = adata.layers[Key.layers.SPLICED][:_N_ROWS_LOG_ADVISED].sum()
        if np.allclose(float(head_x), float(head_s)):
            return False
    return not (finite.size and finite.max() > MAX_LOGGED)


def shared_counts(
    spliced: sparse.spmatrix | np.ndarray, unspliced: sparse.spmatrix | np.ndarray
) -> np.ndarray:
    """Per gene, spliced + unspliced counts summed over the cells where both are > 0.

    This is scVelo's ``min_shared_counts`` statistic (``filter_genes``).

    Returns
    -------
    Array of shape ``(n_vars,)``, float64.
    """
    if sparse.issparse(spliced) or sparse.issparse(unspliced):
        s, u = sparse.csr_matrix(spliced), sparse.csr_matrix(unspliced)
        both = (s > 0).multiply(u > 0)
        total = both.multiply(s) + both.multiply(u)
        return np.asarray(total.sum(axis=0), dtype=np.float64).ravel()
    s, u = np.asarray(spliced), np.asarray(unspliced)
    both = (s > 0) & (u > 0)
    return np.where(both, s + u, 0).sum(axis=0, dtype=np.float64)


def size_factors(counts_per_cell: np.ndarray) -> np.ndarray:
    """Divisors of scVelo's ``normalize_per_cell``: cell size / median cell size.

    ``counts_after`` is the median of ``counts_per_cell`` (1 if that is 0), and a cell
    with no counts gets divisor 1 so that it stays all zeros. The arithmetic keeps the
    dtype of ``counts_per_cell`` (float32 cell sizes give float32 divisors, as in scVelo).
    """
    counts = np.asarray(counts_per_cell)
    if not np.issubdtype(counts.dtype, np.floating):
        counts = counts.astype(np.float64)
    after = np.median(counts)
    after += after == 0
    factors = counts / after
    factors += factors == 0
    return factors


def filter_and_normalize(
    adata: AnnData,
    *,
    min_shared_counts: int = PREPROCESS.min_shared_counts,
    n_top_genes: int | None = PREPROCESS.n_top_genes,
    log: bool = True,
) -> None:
    """Filter genes, normalise X/spliced/unspliced per cell, log1p X, keep variable genes.

    In place, as scVelo (0.3.4 + scanpy) does it:

    1. ``obs['initial_size_spliced']``, ``obs['initial_size_unspliced']``,
       ``obs['initial_size']``: counts per cell over *all* genes, before filtering (kept
       if present).
    2. Keep genes whose shared counts (spliced + unspliced over cells where both are
       detected) reach ``min_shared_counts``.
    3. Divide each of X, spliced, unspliced by its initial size over the median initial
       size (so a cell's counts sum to the median *unfiltered* size); layers that do not
       look like counts are left alone. ``obs['n_counts']`` = normalised X per cell.
    4. ``log1p`` of X (only when X was normalised here; scanpy's ``uns['log1p']`` marks it).
    5. scanpy's ``highly_variable_genes(flavor="seurat", n_top_genes=...)`` on log X,
       keeping only those genes.

    Parameters
    ----------
    adata
        Data with raw counts in ``layers['spliced']`` / ``layers['unspliced']``.
    min_shared_counts
        Minimum shared counts for a gene to be kept.
    n_top_genes
        Number of highly variable genes to keep; ``None`` keeps all genes that pass
        the filter.
    log
        Whether to log1p X.

    Returns
    -------
    Nothing; sets obs ``initial_size``, ``initial_size_spliced``,
    ``initial_size_unspliced``, ``n_counts``; var ``highly_variable``, ``means``,
    ``dispersions``, ``dispersions_norm`` (and ``gene_count_corr`` when more than 3,000
    genes pass the filter); uns ``log1p``; subsets the genes.

    Raises
    ------
    InputError
        When layers are missing or no gene passes the filter.
    """
    validate_counts(adata)
    if adata.X is None:
        adata.X = adata.layers[Key.layers.SPLICED].copy()
    _check_x(adata)
    _set_initial_size(adata)

    n_before = adata.n_vars
    keep = (
        shared_counts(adata.layers[Key.layers.SPLICED], adata.layers[Key.layers.UNSPLICED])
        >= min_shared_counts
    )
    if not keep.any():
        msg = (
            f"no genes left after filtering: none of the {n_before} genes has min_shared_counts="
            f"{min_shared_counts} (spliced + unspliced counts over cells where both are detected). "
            "Lower `min_shared_counts` or check that the layers hold raw counts."
        )
        raise InputError(msg)
    _keep_genes(adata, keep)
    logger.info("kept %d of %d genes with >= %d shared counts", adata.n_vars, n_before, min_shared_counts)

    normalised_x = _normalize_per_cell(adata)

    if log:
        if normalised_x and Key.uns.LOG1P not in adata.uns:
            _log1p(adata)
        elif not normalised_x and not x_is_logged(adata):
            # counts normalised elsewhere, or continuous values (scVelo's simulator): log
            # them as scVelo's pipeline does (`sc.pp.log1p`), never hand unlogged values to
            # the seurat flavour, whose expm1 overflows on them
            logger.warning("X is not raw counts and not log-transformed: taking log1p of it")
            _log1p(adata, copy=True)
        else:
            logger.info("X not log-transformed: it is marked or looks logged already")

    if n_top_genes is not None:
        _select_highly_variable(adata, n_top_genes=n_top_genes)


# ---------------------------------------------------------------------------------------
# steps


def check_genes(adata: AnnData, *, n_before: int | None = None, min_shared_counts: int = 0) -> None:
    """Refuse fewer than :data:`MIN_GENES` genes, in the data or left after filtering (``n_before`` given).

    Raises
    ------
    InputError
        With what was found and what to do.
    """
    if adata.n_vars >= MIN_GENES:
        return
    if n_before is None:
        msg = (
            f"too few genes: found {adata.n_obs} cells x {adata.n_vars} gene; RNA velocity needs at least "
            f"{MIN_GENES} genes (the velocity graph compares velocity vectors across genes). "
            "Load the full gene set (velocyto/STARsolo output), not a single gene."
        )
    else:
        msg = (
            f"too few genes left after filtering: {adata.n_vars} of the {n_before} genes passed "
            f"(min_shared_counts={min_shared_counts} and gene selection); velocity needs at least "
            f"{MIN_GENES}. Lower {option('min_shared_counts')} or load more genes."
        )
    raise InputError(msg)


def _check_x(adata: AnnData) -> None:
    """X feeds gene selection and PCA: refuse non-finite or overflowing values with a message."""
    X = adata.X
    values = np.asarray(X.data if sparse.issparse(X) else X).ravel()
    if values.size == 0:
        return
    n_bad = int(np.count_nonzero(~np.isfinite(values)))
    if n_bad:
        msg = (
            f"X has {n_bad} non-finite values (NaN or inf); expected finite expression values, as "
            "explorer selects genes and computes the PCA on X. Fix those values, or store the "
            "spliced counts as X."
        )
        raise InputError(msg)
    highest = float(np.abs(values).max())
    if highest > MAX_VALUE:
        msg = (
            f"X has values up to {highest:g}; expected counts or normalised values below {MAX_VALUE:g} "
            "(larger ones overflow in the variance). Store the spliced counts as X."
        )
        raise InputError(msg)


def _keep_genes(adata: AnnData, keep: np.ndarray) -> None:
    """Keep the genes where ``keep`` is True, in place: AnnData's ``_inplace_subset_var``, leaner.

    The same result (X, layers, var, varm, varp cut to the genes; obs, obsm, obsp, uns kept),
    built from the sliced arrays instead of a copy of a view of the whole object: on the
    pancreas 28 ms instead of 110 ms a subset (``benchmarks/bench_core.py``, "filter_and_normalize").
    """
    if keep.all():
        return
    idx = np.flatnonzero(keep)

    def genes(matrix: Any) -> Any:
        return None if matrix is None else matrix[:, idx]

    def rows(values: Any) -> Any:  # varm may hold data frames, whose [] picks columns
        return values.iloc[idx] if isinstance(values, pd.DataFrame) else values[idx]

    kept = AnnData(
        X=genes(adata.X),
        obs=adata.obs,
        var=adata.var.iloc[idx].copy(),
        uns=adata.uns,
        obsm=dict(adata.obsm),
        obsp=dict(adata.obsp),
        varm={k: rows(v) for k, v in adata.varm.items()},
        varp={k: rows(v)[:, idx] for k, v in adata.varp.items()},
        layers={k: genes(v) for k, v in adata.layers.items()},
    )
    adata._init_as_actual(kept)


def _row_sums(matrix: sparse.spmatrix | np.ndarray) -> np.ndarray:
    # float32 sums, as scVelo's ``get_size`` (``X.sum(1)``) gives for float32 data
    return np.asarray(matrix.sum(axis=1)).ravel()


def _set_initial_size(adata: AnnData) -> None:
    """Set cell sizes over all genes once, before filtering (scVelo's ``set_initial_size``)."""
    for layer, key in (
        (Key.layers.UNSPLICED, Key.obs.INITIAL_SIZE_UNSPLICED),
        (Key.layers.SPLICED, Key.obs.INITIAL_SIZE_SPLICED),
    ):
        if key not in adata.obs:
            adata.obs[key] = _row_sums(adata.layers[layer])
    if Key.obs.INITIAL_SIZE not in adata.obs:
        adata.obs[Key.obs.INITIAL_SIZE] = _row_sums(adata.X)


def _scale_rows(matrix: sparse.spmatrix | np.ndarray, divisors: np.ndarray) -> sparse.spmatrix | np.ndarray:
    """Return ``matrix`` with each row divided by ``divisors``, in its own dtype.

    A new array, not in place: X and a layer may share memory (``adata.X =
    adata.layers['spliced']``), and scaling one in place would normalise the other twice.
    """
    scale = 1.0 / divisors
    if sparse.issparse(matrix):
        matrix = sparse.csr_matrix(matrix)
        # the same float products as scikit-learn's inplace_csr_row_scale, which scVelo calls
        data = (matrix.data * np.repeat(scale, np.diff(matrix.indptr))).astype(matrix.dtype, copy=False)
        return sparse.csr_matrix((data, matrix.indices.copy(), matrix.indptr.copy()), shape=matrix.shape)
    matrix = np.asarray(matrix)
    return (matrix * scale[:, None]).astype(matrix.dtype, copy=False)


def _normalize_per_cell(adata: AnnData) -> bool:
    """Normalise as scVelo's ``normalize_per_cell``; return whether X was normalised."""
    normalised_x = False
    for layer, size_key in (
        ("X", Key.obs.INITIAL_SIZE),
        (Key.layers.SPLICED, Key.obs.INITIAL_SIZE_SPLICED),
        (Key.layers.UNSPLICED, Key.obs.INITIAL_SIZE_UNSPLICED),
    ):
        matrix = adata.X if layer == "X" else adata.layers[layer]
        if not looks_like_counts(matrix):
            logger.warning("did not normalise %s: it does not look like raw counts", layer)
            continue
        if not np.issubdtype(matrix.dtype, np.floating):
            matrix = matrix.astype(np.float32)
        divisors = size_factors(np.asarray(adata.obs[size_key]))
        matrix = _scale_rows(matrix, divisors)
        if layer == "X":
            adata.X = matrix
            normalised_x = True
            if adata.n_vars > _GENE_COUNT_CORR_MIN_GENES and Key.var.GENE_COUNT_CORR not in adata.var:
                adata.var[Key.var.GENE_COUNT_CORR] = _gene_count_corr(matrix)
        else:
            adata.layers[layer] = matrix
    adata.obs[Key.obs.N_COUNTS] = _row_sums(adata.X)
    return normalised_x


def _gene_count_corr(matrix: sparse.spmatrix | np.ndarray) -> np.ndarray:
    """Per gene, Pearson correlation with the number of genes detected per cell (scVelo, 4 digits)."""
    n_detected = np.asarray((matrix > 0).sum(axis=1), dtype=np.float64).ravel()
    n = matrix.shape[0]
    y = n_detected - n_detected.mean()
    if sparse.issparse(matrix):
        sum_x = np.asarray(matrix.sum(axis=0), dtype=np.float64).ravel()
        sum_xx = np.asarray(matrix.multiply(matrix).sum(axis=0), dtype=np.float64).ravel()
        sum_xy = np.asarray(matrix.T @ y, dtype=np.float64).ravel()
    else:
        x = np.asarray(matrix, dtype=np.float64)
        sum_x, sum_xx, sum_xy = x.sum(0), (x * x).sum(0), x.T @ y
    ss_x = sum_xx - sum_x**2 / n
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = sum_xy / np.sqrt(ss_x * (y @ y))
    return np.round(corr, 4)


def _log1p(adata: AnnData, *, copy: bool = False) -> None:
    """log1p of X, in place, or on a copy when X may share memory with a layer."""
    X = adata.X
    if copy:
        X = sparse.csr_matrix(X, copy=True) if sparse.issparse(X) else np.array(X, copy=True)
        if not np.issubdtype(X.dtype, np.floating):
            X = X.astype(np.float32)
        adata.X = X
    if sparse.issparse(X):
        np.log1p(X.data, out=X.data)
    else:
        np.log1p(X, out=X)
    # scanpy's marker; highly_variable_genes reads the base from it
    adata.uns[Key.uns.LOG1P] = {"base": None}


def _varies(matrix: sparse.spmatrix | np.ndarray) -> np.ndarray:
    """``(n_vars,)`` whether each gene takes more than one value over the cells."""
    if sparse.issparse(matrix):  # scipy's min/max count the implicit zeros
        csc = sparse.csc_matrix(matrix)
        return csc.max(axis=0).toarray().ravel() > csc.min(axis=0).toarray().ravel()
    dense = np.asarray(matrix)
    return dense.max(axis=0) > dense.min(axis=0)


def _select_highly_variable(adata: AnnData, *, n_top_genes: int) -> None:
    if Key.uns.LOG1P not in adata.uns:
        # scanpy's seurat flavour expects log data and warns otherwise; scVelo 0.2 marked
        # unlogged data the same way when the user passed log=False
        logger.info("selecting variable genes on X that is not log-transformed")
    if not _varies(adata.X).any():
        msg = (
            f"every one of the {adata.n_vars} genes has the same value in all {adata.n_obs} cells; "
            "expected expression that varies between cells (velocity needs it). Check that the "
            "layers hold per-cell counts."
        )
        raise InputError(msg)
    # scanpy (and the sklearn, numba and matplotlib it loads) only when genes are selected:
    # `explorer fit` on preprocessed data never needs it, and importing it is a second of start-up
    import scanpy as sc

    with warnings.catch_warnings(record=True) as caught:
        # e.g. "n_top_genes > number of normalized dispersions" for constant genes: scanpy
        # then keeps every gene with a dispersion, which is what we want; say so in the log
        warnings.simplefilter("always")
        sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n_top_genes)
    for w in caught:
        logger.info("selecting variable genes: %s", w.message)
    # what subset=True does, without its copy of the whole AnnData (see _keep_genes)
    _keep_genes(adata, adata.var["highly_variable"].to_numpy(dtype=bool))
    logger.info("kept %d highly variable genes", adata.n_vars)


def highly_variable_from_moments(
    mean: np.ndarray, var: np.ndarray, *, n_top_genes: int, n_bins: int = 20
) -> dict[str, np.ndarray]:
    """scanpy's ``highly_variable_genes(flavor="seurat")`` from per-gene mean and variance.

    The streamed preprocessing (:func:`explorer.stream.prepare_streamed`) never holds X:
    it sums ``expm1(log X)`` and its square per gene over blocks of cells, and this does
    the rest as scanpy 1.11 does it: log dispersion against ``log1p`` mean, 20 equal-width
    bins of the mean, dispersions z-scored within their bin (a bin of one gene gets a
    normalised dispersion of 1), and the ``n_top_genes`` largest kept.

    Parameters
    ----------
    mean, var
        ``(n_vars,)`` mean and variance (``ddof=1``) of the normalised, unlogged X, float64.
    n_top_genes
        Genes to keep (all genes with a dispersion when there are fewer).

    Returns
    -------
    ``means``, ``dispersions``, ``dispersions_norm`` (float32) and ``highly_variable``
    (bool), as scanpy writes them into ``var``.
    """
    mean = np.array(mean, dtype=np.float64)
    mean[mean == 0] = 1e-12
    dispersion = np.asarray(var, dtype=np.float64) / mean
    dispersion[dispersion == 0] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(dispersion)
    mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    stats = stats.loc[df["mean_bin"]].set_index(df.index)
    norm = ((df["dispersions"] - stats["avg"]) / stats["dev"]).to_numpy()
    finite = norm[~np.isnan(norm)]
    n = min(n_top_genes, len(mean), finite.size)
    if n == 0:
        highly_variable = np.zeros(len(mean), dtype=bool)
    else:
        cut = np.sort(finite)[::-1][n - 1]
        highly_variable = np.nan_to_num(norm, nan=-np.inf) >= cut
    return {
        Key.var.HIGHLY_VARIABLE: highly_variable,
        "means": mean,
        "dispersions": dispersion,
        "dispersions_norm": norm.astype(np.float32),
    }
