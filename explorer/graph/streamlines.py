"""A smoothed velocity field on a grid and its streamlines, as polylines (plain numpy).

:func:`velocity_on_grid` averages the projected velocities of the cells near each grid
node with gaussian weights and masks nodes far from any cell, as scVelo's
``compute_velocity_on_grid`` (behind ``pl.velocity_embedding_stream``) does.
:func:`compute_streamlines` integrates that field into evenly spaced streamlines, like
matplotlib's ``streamplot``: lines start from seeds on a coarse occupancy grid (denser
regions first), run forward and backward with a fixed-step midpoint (RK2) rule, and stop
where the field is masked or vanishes, where they turn back, after ``max_length``, or
where they enter a cell of the occupancy grid that a line already passes through. The
lines are returned as ``(n_points, 2)`` arrays for drawing (HoloViews ``Path``) or
export; :func:`pack_polylines` joins them into one NaN-separated array. Everything is
deterministic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.spatial import cKDTree

if TYPE_CHECKING:
    from explorer._types import BoolArray, FloatArray

logger = logging.getLogger(__name__)

Direction = Literal["both", "forward", "backward"]
_DIRECTIONS: tuple[str, ...] = ("both", "forward", "backward")

#: scVelo: 50 grid nodes per axis at density 1, the range padded by 1 % on each side.
_GRID_NODES = 50
_GRID_PAD = 0.01
#: scVelo: nodes whose gaussian mass is below ``min_mass`` % of the 99th percentile of
#: all nodes' mass are empty (``compute_velocity_on_grid``, arrows variant).
_MASS_PERCENTILE = 99.0
#: above this many cells (with the default ``n_neighbors``) :func:`velocity_on_grid` sums
#: the gaussian weights over binned cells instead of scVelo's ``n_obs / 50`` nearest cells
#: per node: at 10^6 cells that is 20,000 neighbours for each of 2,500 nodes, a minute
_BINNED_ABOVE = 100_000
#: bins per gaussian width in the binned sum, and the kernel's reach in widths
_BINS_PER_SIGMA = 4
_KERNEL_REACH = 4.0
#: matplotlib ``streamplot``: a 30 x 30 occupancy grid at density 1; lengths in axes units.
_MASK_CELLS = 30
#: integration step, as a share of one occupancy cell (matplotlib's adaptive RK12 never
#: steps more than one cell; a quarter keeps the fixed-step RK2 close to it).
_STEP_PER_CELL = 0.25
#: a turn sharper than this (cosine between successive steps) ends a line: it has
#: reached a sink or a fold of the field and would only oscillate.
_MIN_TURN_COSINE = 0.0


@dataclass(frozen=True, slots=True)
class GridField:
    """A velocity field sampled on a regular grid.

    Attributes
    ----------
    x, y
        ``(nx,)`` and ``(ny,)`` node coordinates, increasing.
    u, v
        ``(ny, nx)`` velocity components; NaN at masked nodes.
    mass
        ``(ny, nx)`` gaussian weight of the cells around each node (cell density).
    """

    x: FloatArray
    y: FloatArray
    u: FloatArray
    v: FloatArray
    mass: FloatArray

    def __post_init__(self) -> None:
        shape = (len(self.y), len(self.x))
        for name in ("u", "v", "mass"):
            if getattr(self, name).shape != shape:
                msg = (
                    f"Expected GridField.{name} of shape {shape} (ny, nx), found {getattr(self, name).shape}."
                )
                raise ValueError(msg)

    @property
    def valid(self) -> BoolArray:
        """``(ny, nx)`` True where the field is defined."""
        return np.isfinite(self.u) & np.isfinite(self.v)

    @property
    def speed(self) -> FloatArray:
        """``(ny, nx)`` norm of the field (NaN where masked)."""
        return np.hypot(self.u, self.v)


def velocity_on_grid(
    X_emb: FloatArray,
    V_emb: FloatArray,
    *,
    density: float = 1.0,
    smooth: float = 0.5,
    n_neighbors: int | None = None,
    min_mass: float = 1.0,
    cutoff_perc: float = 5.0,
) -> GridField:
    """Gaussian-smoothed velocities on a grid (scVelo's ``compute_velocity_on_grid``).

    Parameters
    ----------
    X_emb
        ``(n_obs, 2)`` cell positions.
    V_emb
        ``(n_obs, 2)`` projected velocities (:func:`~explorer.graph.projection.project_velocity`).
    density
        Grid nodes per axis are ``50 * density``.
    smooth
        Gaussian width as a share of the grid spacing (scVelo: 0.5).
    n_neighbors
        Cells averaged per node; default ``n_obs / 50`` (scVelo), at least 1.
    min_mass
        Nodes whose gaussian mass is below ``min_mass`` % of the 99th percentile of the
        nodes' mass are masked (scVelo's rule for its arrow grid: empty regions).
    cutoff_perc
        Also mask nodes whose neighbours' mean absolute velocity is below this
        percentile over the grid (scVelo's stream rule: near-still regions).

    Returns
    -------
    The :class:`GridField`. Velocities are ``sum_k w_k v_k / max(1, sum_k w_k)`` over the
    node's nearest cells, with ``w`` the gaussian density of the distance, as in scVelo.

    Above ``_BINNED_ABOVE`` cells with the default ``n_neighbors``, the sums run over every
    cell within four gaussian widths of the node instead (cells binned at a quarter width,
    the binned sums smoothed by a gaussian filter; :func:`_binned_sums`), and the
    near-still rule uses the gaussian-weighted mean speed: the same field where the
    ``n_obs / 50`` nearest cells reach beyond the kernel, in a second rather than a minute
    at 10^6 cells.
    """
    X = np.asarray(X_emb, dtype=np.float64)
    V = np.asarray(V_emb, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != 2 or V.shape != X.shape:
        msg = f"Expected X_emb and V_emb of shape (n_obs, 2), found {X.shape} and {V.shape}."
        raise ValueError(msg)
    ok = np.isfinite(X).all(axis=1) & np.isfinite(V).all(axis=1)
    X, V = X[ok], V[ok]
    if len(X) < 2:
        msg = f"Expected at least 2 cells with finite positions and velocities, found {len(X)}."
        raise ValueError(msg)
    n_nodes = max(int(_GRID_NODES * density), 2)
    axes = []
    for dim in range(2):
        lo, hi = X[:, dim].min(), X[:, dim].max()
        pad = _GRID_PAD * abs(hi - lo) if hi > lo else 0.5
        axes.append(np.linspace(lo - pad, hi + pad, n_nodes))
    gx, gy = np.meshgrid(axes[0], axes[1])
    nodes = np.column_stack([gx.ravel(), gy.ravel()])

    sigma = np.mean([a[1] - a[0] for a in axes]) * smooth
    if n_neighbors is None and len(X) > _BINNED_ABOVE:
        mass, weighted_v, still = _binned_sums(X, V, axes, sigma)
    else:
        k = max(1, min(len(X), int(len(X) / 50) if n_neighbors is None else int(n_neighbors)))
        dists, neighs = cKDTree(X).query(nodes, k=k)
        dists, neighs = dists.reshape(len(nodes), k), neighs.reshape(len(nodes), k)
        weight = np.exp(-0.5 * (dists / sigma) ** 2)
        mass = weight.sum(axis=1)
        weighted_v = np.einsum("nk,nkd->nd", weight, V[neighs])
        still = np.abs(V[neighs]).mean(axis=1).sum(axis=1)
    norm = 1.0 / (sigma * np.sqrt(2.0 * np.pi))  # scVelo's gaussian density (1-D normalisation)
    mass, weighted_v = mass * norm, weighted_v * norm
    grid_v = weighted_v / np.maximum(1.0, mass)[:, None]

    empty = mass < min_mass / 100.0 * np.percentile(mass, _MASS_PERCENTILE)
    empty |= still < np.percentile(still, cutoff_perc)
    grid_v[empty] = np.nan
    shape = (n_nodes, n_nodes)
    return GridField(
        x=axes[0].astype(np.float32),
        y=axes[1].astype(np.float32),
        u=grid_v[:, 0].reshape(shape).astype(np.float32),
        v=grid_v[:, 1].reshape(shape).astype(np.float32),
        mass=mass.reshape(shape).astype(np.float32),
    )


def _binned_sums(
    X: FloatArray, V: FloatArray, axes: list[FloatArray], sigma: float
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per grid node: ``sum w``, ``sum w v`` and the ``w``-weighted mean of ``|vx| + |vy|``.

    ``w = exp(-d^2 / 2 sigma^2)`` over every cell within ``_KERNEL_REACH`` widths of the
    node. The cells are binned on a fine grid (``_BINS_PER_SIGMA`` bins per ``sigma``,
    starting at the first node), the binned counts and sums smoothed by a separable
    gaussian filter and read at the nodes by bilinear interpolation between bin centres;
    the filter's normalisation is undone, so the sums are the kernel sums up to each
    cell's shift to its bin centre (at most an eighth of ``sigma``) and the interpolation
    between bins a quarter of ``sigma`` apart.
    """
    h = sigma / _BINS_PER_SIGMA
    sigma_bins = float(_BINS_PER_SIGMA)
    margin = int(np.ceil(_KERNEL_REACH * sigma_bins)) + 1
    edges, node_bins = [], []
    for a in axes:
        step = a[1] - a[0]
        per_step = step / h  # bins between two nodes (not an integer in general)
        # bin centres at a[0] + (i - margin) * h; node j sits in bin margin + j * per_step
        n_bins = int(np.ceil((a[-1] - a[0]) / h)) + 2 * margin + 1
        edges.append(a[0] + (np.arange(n_bins + 1) - margin - 0.5) * h)
        node_bins.append(margin + np.arange(len(a)) * per_step)
    speed = np.abs(V).sum(axis=1)
    layers = [np.histogram2d(X[:, 1], X[:, 0], bins=(edges[1], edges[0]), weights=w)[0]
              for w in (None, V[:, 0], V[:, 1], speed)]  # fmt: skip
    # gaussian_filter normalises its 1-D kernel to sum 1: scale back to the plain sum of exp
    offsets = np.arange(-int(_KERNEL_REACH * sigma_bins + 0.5), int(_KERNEL_REACH * sigma_bins + 0.5) + 1)
    kernel_sum = float(np.exp(-0.5 * (offsets / sigma_bins) ** 2).sum()) ** 2
    gy, gx = np.meshgrid(node_bins[1], node_bins[0], indexing="ij")
    smoothed = []
    for layer in layers:
        f = gaussian_filter(layer, sigma_bins, mode="constant", truncate=_KERNEL_REACH) * kernel_sum
        smoothed.append(map_coordinates(f, [gy.ravel(), gx.ravel()], order=1))
    mass, vx, vy, speed_sum = smoothed
    still = speed_sum / np.maximum(mass, 1e-12)
    return mass, np.column_stack([vx, vy]), still


def compute_streamlines(
    X_emb: FloatArray,
    V_emb: FloatArray,
    *,
    density: float = 1.0,
    grid_density: float = 1.0,
    smooth: float = 0.5,
    min_mass: float = 1.0,
    cutoff_perc: float = 5.0,
    max_length: float = 4.0,
    min_length: float = 0.1,
    direction: Direction = "both",
) -> list[FloatArray]:
    """Streamlines of the smoothed velocity field of cells in an embedding.

    Parameters
    ----------
    X_emb, V_emb
        ``(n_obs, 2)`` cell positions and projected velocities.
    density
        Closeness of the lines: at most one line per cell of a ``30 * density`` square
        occupancy grid (matplotlib's ``streamplot`` convention; scVelo draws with 2).
    grid_density, smooth, min_mass, cutoff_perc
        The field, see :func:`velocity_on_grid`.
    max_length, min_length
        Longest line and shortest kept line, in widths of the plot (matplotlib's 4.0
        and 0.1).
    direction
        Integrate ``"forward"``, ``"backward"`` or ``"both"`` ways from each seed.

    Returns
    -------
    Polylines, each a ``(n_points, 2)`` float32 array in embedding coordinates that runs
    along the flow (first point upstream).
    """
    field = velocity_on_grid(
        X_emb, V_emb, density=grid_density, smooth=smooth, min_mass=min_mass, cutoff_perc=cutoff_perc
    )
    return streamlines_from_field(
        field, density=density, max_length=max_length, min_length=min_length, direction=direction
    )


def streamlines_from_field(
    field: GridField,
    *,
    density: float = 1.0,
    max_length: float = 4.0,
    min_length: float = 0.1,
    direction: Direction = "both",
) -> list[FloatArray]:
    """Integrate evenly spaced streamlines of a :class:`GridField` (see :func:`compute_streamlines`)."""
    if direction not in _DIRECTIONS:
        msg = f"Invalid direction {direction!r}. Valid options are: {list(_DIRECTIONS)}."
        raise ValueError(msg)
    if density <= 0 or max_length <= 0:
        msg = f"Expected density > 0 and max_length > 0, found {density} and {max_length}."
        raise ValueError(msg)
    flow = _AxesField(field)
    n_mask = max(int(_MASK_CELLS * density), 1)
    step = _STEP_PER_CELL / n_mask
    n_steps = int(np.ceil(max_length / step))

    # seeds: centres of the occupancy cells where the field is defined, densest first
    centres = (np.arange(n_mask) + 0.5) / n_mask
    sx, sy = np.meshgrid(centres, centres)
    seeds = np.column_stack([sx.ravel(), sy.ravel()])
    ok = flow.defined(seeds)
    seeds = seeds[ok]
    if len(seeds) == 0:
        return []
    order = np.argsort(-flow.mass_at(seeds), kind="stable")
    seeds = seeds[order]

    forward = flow.integrate(seeds, step, n_steps, +1.0) if direction != "backward" else None
    backward = flow.integrate(seeds, step, n_steps, -1.0) if direction != "forward" else None

    occupied = np.zeros(n_mask * n_mask, dtype=bool)
    lines: list[FloatArray] = []
    for s in range(len(seeds)):
        seed_cell = _cell_ids(seeds[s : s + 1], n_mask)[0]
        if occupied[seed_cell]:
            continue
        parts, own = [], np.zeros(0, dtype=np.int64)
        for path in (backward, forward):
            if path is None:
                parts.append(np.zeros((0, 2)))
                continue
            points = _valid_prefix(path[:, s])
            cells = _cell_ids(points, n_mask)
            keep = _unblocked_prefix(cells, occupied, own, seed_cell)
            parts.append(points[1:keep])  # the seed itself is added once below
            own = np.concatenate([own, cells[:keep]])
        back, fwd = parts
        line = np.concatenate([back[::-1], seeds[s : s + 1], fwd])
        if len(line) < 2 or _length(line) < min_length:
            continue
        occupied[own] = True
        occupied[seed_cell] = True
        lines.append(flow.to_data(line))
    logger.debug("%d streamlines from %d seeds", len(lines), len(seeds))
    return lines


def pack_polylines(lines: list[FloatArray]) -> FloatArray:
    """Join polylines into one ``(n, 2)`` float32 array with a NaN row between lines.

    The format HoloViews ``Path`` / bokeh ``multi_line`` and most plotting tools read as
    separate lines; an empty list gives a ``(0, 2)`` array.
    """
    if not lines:
        return np.zeros((0, 2), dtype=np.float32)
    gap = np.full((1, 2), np.nan, dtype=np.float32)
    chunks: list[np.ndarray] = []
    for i, line in enumerate(lines):
        if i:
            chunks.append(gap)
        chunks.append(np.asarray(line, dtype=np.float32).reshape(-1, 2))
    return np.concatenate(chunks)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


class _AxesField:
    """The grid field in axes units ([0, 1] on both axes), bilinearly interpolated."""

    def __init__(self, field: GridField) -> None:
        self.x0, self.x1 = float(field.x[0]), float(field.x[-1])
        self.y0, self.y1 = float(field.y[0]), float(field.y[-1])
        width = self.x1 - self.x0 if self.x1 > self.x0 else 1.0
        height = self.y1 - self.y0 if self.y1 > self.y0 else 1.0
        self.width, self.height = width, height
        valid = field.valid
        self.u = np.where(valid, field.u / width, 0.0).astype(np.float64)
        self.v = np.where(valid, field.v / height, 0.0).astype(np.float64)
        self.valid = valid
        self.mass = field.mass.astype(np.float64)
        self.ny, self.nx = valid.shape

    def _corners(self, p: np.ndarray) -> tuple[np.ndarray, ...]:
        gx = np.clip(p[:, 0], 0.0, 1.0) * (self.nx - 1)
        gy = np.clip(p[:, 1], 0.0, 1.0) * (self.ny - 1)
        i0 = np.minimum(np.floor(gx).astype(np.int64), self.nx - 2)
        j0 = np.minimum(np.floor(gy).astype(np.int64), self.ny - 2)
        return i0, j0, gx - i0, gy - j0

    def _interp(
        self, grid: np.ndarray, i0: np.ndarray, j0: np.ndarray, fx: np.ndarray, fy: np.ndarray
    ) -> np.ndarray:
        return (
            grid[j0, i0] * (1 - fx) * (1 - fy)
            + grid[j0, i0 + 1] * fx * (1 - fy)
            + grid[j0 + 1, i0] * (1 - fx) * fy
            + grid[j0 + 1, i0 + 1] * fx * fy
        )

    def defined(self, p: np.ndarray) -> np.ndarray:
        """Inside the domain, all four surrounding nodes valid."""
        inside = (p[:, 0] >= 0) & (p[:, 0] <= 1) & (p[:, 1] >= 0) & (p[:, 1] <= 1)
        i0, j0, _, _ = self._corners(p)
        v = self.valid
        return inside & v[j0, i0] & v[j0, i0 + 1] & v[j0 + 1, i0] & v[j0 + 1, i0 + 1]

    def mass_at(self, p: np.ndarray) -> np.ndarray:
        return self._interp(self.mass, *self._corners(p))

    def direction(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the unit flow direction at ``p`` and whether it is defined there."""
        corners = self._corners(p)
        d = np.column_stack([self._interp(self.u, *corners), self._interp(self.v, *corners)])
        norm = np.hypot(d[:, 0], d[:, 1])
        ok = self.defined(p) & (norm > 0) & np.isfinite(norm)
        return np.divide(d, norm[:, None], out=np.zeros_like(d), where=ok[:, None]), ok

    def integrate(self, seeds: np.ndarray, step: float, n_steps: int, sign: float) -> np.ndarray:
        """``(n_steps + 1, n_seeds, 2)`` midpoint-rule paths; NaN after each one stops."""
        paths = np.full((n_steps + 1, len(seeds), 2), np.nan)
        paths[0] = seeds
        active = np.arange(len(seeds))
        previous = np.zeros((len(seeds), 2))
        for t in range(n_steps):
            if active.size == 0:
                break
            p = paths[t, active]
            k1, ok1 = self.direction(p)
            k2, ok2 = self.direction(p + 0.5 * step * sign * k1)
            new = p + step * sign * k2
            turn = np.einsum("ij,ij->i", k2, previous[active])
            ok = ok1 & ok2 & self.defined(new) & ((t == 0) | (turn > _MIN_TURN_COSINE))
            paths[t + 1, active[ok]] = new[ok]
            previous[active[ok]] = k2[ok]
            active = active[ok]
        return paths

    def to_data(self, points: np.ndarray) -> np.ndarray:
        out = np.empty_like(points, dtype=np.float32)
        out[:, 0] = self.x0 + points[:, 0] * self.width
        out[:, 1] = self.y0 + points[:, 1] * self.height
        return out


def _valid_prefix(path: np.ndarray) -> np.ndarray:
    """Rows of ``path`` up to its first NaN."""
    bad = np.flatnonzero(~np.isfinite(path).all(axis=1))
    return path[: bad[0]] if bad.size else path


def _cell_ids(points: np.ndarray, n_mask: int) -> np.ndarray:
    ij = np.clip((points * n_mask).astype(np.int64), 0, n_mask - 1)
    return ij[:, 1] * n_mask + ij[:, 0]


def _unblocked_prefix(cells: np.ndarray, occupied: np.ndarray, own: np.ndarray, seed_cell: int) -> int:
    """How many leading points a line keeps before it enters an occupied cell.

    A cell blocks when another line passes through it, when this line's other half
    does (``own``, except the seed's cell), or when this half left it before and comes
    back (matplotlib's rule: a line never crosses itself or another line's cells).
    """
    n = len(cells)
    if n == 0:
        return 0
    changed = np.concatenate([[True], cells[1:] != cells[:-1]])
    run_start = np.maximum.accumulate(np.where(changed, np.arange(n), 0))
    _, first = np.unique(cells, return_index=True)
    first_seen = first[np.searchsorted(np.unique(cells), cells)]
    other_half = np.isin(cells, own[own != seed_cell]) if own.size else np.zeros(n, dtype=bool)
    blocked = (occupied[cells] & (cells != seed_cell)) | (first_seen < run_start) | other_half
    hit = np.flatnonzero(blocked)
    return int(hit[0]) if hit.size else n


def _length(line: np.ndarray) -> float:
    return float(np.hypot(*np.diff(line, axis=0).T).sum())
