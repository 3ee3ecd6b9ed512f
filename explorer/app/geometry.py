"""Plain-array geometry for the app: nearest point to a click, points in a box or lasso, time bins.

Nothing here knows about AnnData, fits or Panel: the state calls these with the arrays
a plot shows.
"""

from __future__ import annotations

import numpy as np
from matplotlib.path import Path as MplPath

#: how many bins of latent time a time view's curve averages over
TIME_BINS = 60


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
    inside = MplPath(np.asarray(polygon, dtype=np.float64)).contains_points(np.column_stack([x, y]))
    return np.flatnonzero(inside)


def points_in_box(x: np.ndarray, y: np.ndarray, bounds: tuple[float, float, float, float]) -> np.ndarray:
    """Find the points inside ``bounds = (x0, y0, x1, y1)`` (corners in any order)."""
    x0, y0, x1, y1 = bounds
    keep = (x >= min(x0, x1)) & (x <= max(x0, x1)) & (y >= min(y0, y1)) & (y <= max(y0, y1))
    return np.flatnonzero(keep)


def time_bins(x: np.ndarray, *, n_bins: int = TIME_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Assign ``x`` to ``n_bins`` equal bins: ``(bin per value, -1 for NaN; bin centres)``.

    Plain arithmetic rather than a search: it runs on every gene click at a million cells.
    """
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.full(len(x), -1, dtype=np.int64), np.empty(0)
    lo, hi = float(x[finite].min()), float(x[finite].max())
    span = (hi - lo) or 1.0
    # NaN cannot be cast to an integer: put it at lo, then mark it -1
    which = np.clip(((np.where(finite, x, lo) - lo) / span * n_bins).astype(np.int64), 0, n_bins - 1)
    which[~finite] = -1
    centres = lo + (np.arange(n_bins) + 0.5) * span / n_bins
    return which, centres


def binned_mean(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_bins: int = TIME_BINS,
    bins: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``y`` in ``n_bins`` equal bins of ``x`` (empty bins left out), for a trend curve.

    ``bins`` may pass :func:`time_bins` of ``x`` computed before.
    """
    which, centres = bins if bins is not None else time_bins(x, n_bins=n_bins)
    y = np.asarray(y, dtype=np.float64)
    ok = (which >= 0) & np.isfinite(y)
    n = len(centres)
    if not ok.all():  # the same sums in the same order; no copies when every value counts
        which, y = which[ok], y[ok]
    counts = np.bincount(which, minlength=n)
    sums = np.bincount(which, weights=y, minlength=n)
    filled = counts > 0
    return centres[filled], sums[filled] / counts[filled]


def even_sample(n: int, k: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``min(n, k)`` of ``n`` items, the same for the same arguments."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))
