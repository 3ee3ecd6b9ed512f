"""scVelo's dynamical model, fitted for all genes at once as tensors.

The model (Bergen et al. 2020, Nat. Biotechnol. 38:1408) describes each gene by the
splicing ODE of :mod:`explorer.kinetics` with an induction phase (rate
``alpha``) until a switch time ``t_`` and a repression phase after it, and gives every
cell a time per gene. Like scVelo's ``tl.recover_dynamics`` it alternates assigning
times (projection of each cell onto the curve, four states: induction, repression and
the two steady states) and updating the parameters (expectation-maximisation), but for
a whole batch of genes at once as arrays (:mod:`explorer.models._em`: numpy around
compiled kernels on the CPU, where torch is not even imported; torch on CUDA), so it is
many times faster than fitting gene after gene.

Beyond scVelo:

- an optional gene-specific onset ``t_on`` on the gene-shared time axis (the basic model
  of VeloVAE, Gu et al. 2022), fitted after the latent time as a diagnostic; genes
  induced measurably after the root cells are flagged in ``var['fit_uses_t_on']``. The
  gene's curve, ``fit_t`` and velocities keep onset 0 on the gene's own clock, and
  :func:`explorer.kinetics.fitted_gene` draws exactly them;
- per-gene diagnostics: R² of the fitted curve, share of cells in each state, and the
  kinetic signal ``beta / (beta + gamma)`` and detection power ``s_inf * u_inf`` of
  Bergen et al. 2021 (Mol. Syst. Biol. 17:e10282, Box 1).

Output follows scVelo's conventions (``fit_*`` columns, ``fit_t`` layer, times aligned to
a total of ``t_max = 20``), so ``scv.pl.scatter(adata, basis=gene)`` draws our curves.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from explorer import kinetics
from explorer._process import set_up_process
from explorer._types import InputError, no_velocity_gene, report
from explorer.graph import latent_time as lt_mod
from explorer.graph.latent_time import neighbor_average_matrix
from explorer.graph.transition import (
    neighbors_for_graph,
    sparse_dense_product,
    transition_matrix,
    velocity_graphs,
)
from explorer.keys import Key
from explorer.models.base import Hyperparameters, VelocityResult, require_layers
from explorer.models.steady_state import genes_to_fit

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import torch
    from anndata import AnnData

    from explorer._types import ProgressCallback

logger = logging.getLogger(__name__)

#: float32 elements per ``(n_genes, n_cells)`` tensor of one gene batch; the EM keeps a
#: few dozen such tensors alive, so 2**22 (16 MiB each) bounds memory to well under 1 GiB
_BATCH_ELEMENTS = 1 << 22
#: above this many cells the root cells come from a cheaper velocity graph and eigen
#: solve (see ``Dynamical._latent_time``); at and below it, exactly scVelo's
_LARGE_GRAPH_CELLS = 20_000
#: steps of the backward chain that replace the root-cell eigen solve above that size
_LARGE_GRAPH_POWER_STEPS = 1000
#: below this many weighted cells in its EM a gene's fit is reported as poorly determined
_MIN_CELLS_EM = 30
#: cells used to choose the onset and switch times of the shared-time fit by grid search
_GRID_CELLS = 300
#: cells used for the shared-time fits that decide on the onset times
_ONSET_CELLS = 1000
#: onset and induction length candidates of that grid, as shares of ``t_max``
_GRID_T_ON = (-0.6, -0.4, -0.2, 0.0, 0.15, 0.3, 0.45, 0.6)
_GRID_DURATION = (0.15, 0.3, 0.5, 0.75, 1.0)
#: clock-speed factors of the grid (rates relative to the gene's own aligned fit)
_GRID_RATE = (0.5, 1.0, 2.0)
#: coordinate-search rounds refining the shared-time fits
_ONSET_ROUNDS = 5

#: factors on the initial u scaling (and so on beta / gamma, the curvature) tried before
#: the EM, like scVelo's initialize_scaling grid around std_u / std_s
_SHAPE_FACTORS = (0.5, 0.7, 1.0, 1.4, 2.0)

GeneSelection = Literal["velocity_genes", "all"]
Device = Literal["auto", "cpu", "cuda"]

_STATE_COLUMNS = (
    Key.var.FIT_FRAC_REPRESSION,
    Key.var.FIT_FRAC_INDUCTION,
    Key.var.FIT_FRAC_STEADY_OFF,
    Key.var.FIT_FRAC_STEADY_ON,
)


@dataclass(frozen=True, slots=True)
class _BatchFit:
    """Results of one gene batch, aligned to ``t_max``, as numpy arrays."""

    params: dict[str, np.ndarray]  # per gene, by var key: the columns of gene_params
    em: _GeneEM
    fit_t: np.ndarray  # (n_obs, n_genes) time (neighbour-smoothed with smooth_time)
    latent_t: np.ndarray  # (n_obs, n_genes) neighbour-smoothed time, for the latent time
    velocity: np.ndarray
    velocity_u: np.ndarray
    loss_history: list[np.ndarray]
    #: the batch's prepared data (:func:`explorer.models._em.prepare`), kept for the onset
    #: fit only when asked (``keep_data``), else None
    data: Any = None


@dataclass(frozen=True, slots=True)
class _GeneEM:
    """Per gene, what the EM hands on to the onset fit and diagnostics but not to ``var``."""

    #: ``(n_genes,)`` prior ratio ``gamma / fit_beta`` in count units (the EM's regulariser);
    #: NaN where not recoverable
    ratio: np.ndarray
    #: ``(n_genes,)`` whether the gene had enough weighted cells and kept an amplitude above the floor
    recoverable: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[_GeneEM]) -> _GeneEM:
        """Join the batches' genes, in order."""
        return cls(
            ratio=np.concatenate([p.ratio for p in parts]),
            recoverable=np.concatenate([p.recoverable for p in parts]),
        )


#: the array library of the EM on the CPU: ``"numpy"`` (around the compiled kernels of
#: :mod:`explorer.models._em_kernels`; torch is not imported) or ``"torch"`` (the CUDA
#: path's code run on the CPU: the tests compare the two)
CPU_BACKEND: Literal["numpy", "torch"] = "numpy"


def _cuda_possible() -> bool:
    """Whether torch might find a CUDA device, answered without importing torch where possible.

    No when torch is a CPU build (``+cpu`` in its version) or, on Linux, when no NVIDIA
    driver is loaded; otherwise torch is imported and asked.
    """
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    from importlib.metadata import PackageNotFoundError, version

    try:
        if "+cpu" in version("torch"):
            return False
    except PackageNotFoundError:
        return False
    if sys.platform == "darwin":
        return False
    if sys.platform.startswith("linux") and not (
        os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")
    ):
        return False
    return bool(_import_torch().cuda.is_available())


def _em_device(device: str) -> torch.device | None:
    """Where the EM runs: ``None`` for numpy on the CPU (torch not imported), else a torch device.

    ``"auto"`` is CUDA when there is one; ``"cpu"`` runs numpy, or torch on the CPU when
    :data:`CPU_BACKEND` says ``"torch"``.
    """
    _check_device_name(device)
    if CPU_BACKEND == "numpy" and (device == "cpu" or (device == "auto" and not _cuda_possible())):
        return None
    _import_torch()
    resolved = _resolve_device(device)
    return None if resolved.type == "cpu" and CPU_BACKEND == "numpy" else resolved


def _on_device(x: np.ndarray, device: torch.device | None) -> Any:
    """``x`` as the EM's array on ``device``: itself for numpy (``None``), else a torch tensor there."""
    if device is None:
        return x
    import torch

    return torch.from_numpy(x).to(device)


def _inference_mode(device: torch.device | None) -> Any:
    """torch's inference mode for a torch device; for numpy, IEEE results without warnings, as torch.

    (A gene without weighted cells has an infinite quantile, ``inf - inf`` is NaN, and
    the NaN is masked out after; numpy would warn on the way.)
    """
    if device is None:
        return np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore")
    import torch

    return torch.inference_mode()


def _import_torch() -> Any:
    """Import torch (lazily: see ``explorer/__init__.py``) after :func:`~explorer._process.set_up_process`."""
    set_up_process()
    import torch

    return torch


def _check_device_name(device: str) -> None:
    """Refuse a device other than ``auto``, ``cpu`` and ``cuda`` (an :class:`InputError`)."""
    if device not in ("auto", "cpu", "cuda"):
        msg = f"Invalid device {device!r}. Valid options are: 'auto', 'cpu', 'cuda'."
        raise InputError(msg)


def _resolve_device(device: str) -> torch.device:
    """The torch device for ``device``; asking for CUDA where torch finds none is bad input.

    Bad input, not a traceback: ``--param device=cuda`` on a machine without a GPU (or with
    torch's CPU build) is a user's choice the message answers.
    """
    import torch

    _check_device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "the CPU-only build"
        msg = (
            f"device='cuda' was asked for, but torch ({torch.__version__}, {build}) finds no CUDA "
            "device here; use device='auto' (CUDA where there is one) or 'cpu'."
        )
        raise InputError(msg)
    return torch.device(device)


def _warn_few_em_cells(params: dict[str, np.ndarray], em: _GeneEM, names: pd.Index) -> None:
    """Log a warning naming the fitted genes whose EM saw fewer than ``_MIN_CELLS_EM`` weighted cells."""
    few = (params[Key.var.FIT_N_CELLS_EM] < _MIN_CELLS_EM) & em.recoverable
    if few.any():
        logger.warning(
            "%d gene(s) were fitted on fewer than %d cells with both Mu and Ms above 0 (e.g. %s): "
            "their kinetics are poorly determined; see var['%s'].",
            int(few.sum()),
            _MIN_CELLS_EM,
            ", ".join(map(str, names[few][:5])),
            Key.var.FIT_N_CELLS_EM,
        )


def _graph_recursion(large: bool) -> int | None:  # noqa: FBT001
    """``n_recurse_neighbors`` of the latent time's velocity graph: scVelo's default, or the direct kNN."""
    return 1 if large else None


def _aligned_readouts(
    data: Any, p: Any, t: Any, state: Any, ratio: Any, t_max: float, with_velocities: bool  # noqa: FBT001
) -> tuple[Any, ...]:
    """The EM's read-outs of a gene batch after its final assignment, per gene.

    scVelo's ``align_dynamics`` (each gene's time stretched to a total of ``t_max``), then
    the curve at the cells' times, once for the likelihood, R² and (``with_velocities``)
    the velocities at those times. Returns ``(factor, aligned params, aligned times,
    likelihood, R², velocity, velocity_u)``, the velocities None without them.
    """
    from explorer.models import _em

    m = _em.alignment_factor(t, p, t_max)
    p = p.replace(alpha=p.alpha / m, beta=p.beta / m, gamma=p.gamma / m, t_=p.t_ * m, t_on=p.t_on * m)
    t = t * m
    at = _em.curve(t, p)
    lik = _em.likelihood(data, p, t, ratio, at=at)
    r2 = _em.r2(data, p, t, at=at)
    vs, vu = _em.velocities(data, p, t, state, at=at) if with_velocities else (None, None)
    return m, p, t, lik, r2, vs, vu


def _batch_seed(seed: int, start: int) -> int:
    """Seed of the gene batch starting at gene ``start``: distinct per batch, fixed by ``seed``."""
    return int(np.random.SeedSequence([seed, start]).generate_state(1)[0])


def _torch_sparse(matrix: sparse.spmatrix, device: torch.device) -> torch.Tensor:
    """``matrix`` as a coalesced float32 sparse COO tensor on ``device`` (the smoother's, DeepVelo's)."""
    import torch

    coo = sparse.coo_matrix(matrix)
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64)).to(device)
    values = torch.from_numpy(coo.data.astype(np.float32)).to(device)
    # built on the device: copying a sparse tensor to CUDA warned (torch 2.11, H200, 2026-12-04)
    # that its invariant checks were implicitly off, an error under the tests' filterwarnings
    return torch.sparse_coo_tensor(idx, values, coo.shape, check_invariants=True).coalesce()


def _dense32(matrix: Any) -> np.ndarray:
    arr = matrix.toarray() if sparse.issparse(matrix) else np.asarray(matrix)
    return np.ascontiguousarray(arr, dtype=np.float32)


class _Smoother:
    """Average ``(n_genes, n_cells)`` arrays over each cell's neighbours (scVelo's connectivities).

    On the CPU (``device`` None or a CPU torch device) through a compiled CSR product
    with the cells in parallel (scipy's sums, in its order), on numpy arrays or the
    tensors' numpy views: building torch's sparse tensor (its invariant check and
    coalescing) cost more than the products.
    """

    def __init__(self, weights: sparse.csr_matrix, device: torch.device | None) -> None:
        self.csr: sparse.csr_matrix | None = None
        self.matrix: torch.Tensor | None = None
        if device is None or device.type == "cpu":
            self.csr = sparse.csr_matrix(weights, dtype=np.float32)
            return
        self.matrix = _torch_sparse(weights, device)

    def __call__(self, x: Any) -> Any:
        if self.csr is not None:
            if isinstance(x, np.ndarray):
                return np.ascontiguousarray(sparse_dense_product(self.csr, x.T).T)
            import torch

            return torch.from_numpy(np.ascontiguousarray(sparse_dense_product(self.csr, x.numpy().T).T))
        import torch

        return torch.sparse.mm(self.matrix, x.T.contiguous()).T


class Dynamical(Hyperparameters):
    """scVelo's dynamical model (EM over all genes at once), with optional onset times.

    Parameters
    ----------
    genes
        ``"velocity_genes"``: scVelo's default, the genes the steady-state model keeps
        (:class:`~explorer.models.steady_state.SteadyState`, R² > 0.01 on the 5/95 %
        extreme quantiles); ``"all"``: every gene; or a list of gene names.
    max_iter
        Maximum number of EM iterations (each: time assignment, then parameter update).
    tol
        Stop once no gene's loss falls by more than this share in an iteration.
    n_newton
        Gauss-Newton refinements of each cell's projection onto each branch.
    n_rounds
        Coordinate-search rounds per parameter update.
    direct_rounds
        Rounds of a coordinate search on scVelo's loss itself after the EM, each
        candidate's cells projected anew (:func:`explorer.models._em.direct_search`).
        0 (the default): none. 20 gave likelier fits by scVelo's own likelihood (the
        pancreas: higher than scVelo's on 251 genes of 328 against 213 without it) for
        twice the fit's time, but its velocities follow the pancreas' transitions less
        well (cross-boundary correctness 0.232 -> 0.193) and move its fates; the README's
        "direct search" says how much.
    connected_states
        Compare the distances to the four states averaged over each cell's neighbours
        for the final assignment (scVelo's ``fit_connected_states``). Needs
        ``obsp['connectivities']``.
    smooth_time
        Also average ``fit_t``, and the times the velocity is computed at, over each
        cell's neighbours, as scVelo does (its ``time_connectivities``). Off by default:
        a gene's clock wraps around at ``(0, 0)`` (off cells sit at time 0 and at the end
        of repression), and averaging across the wrap puts cells at times far from their
        data (on the pancreas the mean R² of the drawn curves falls from 0.86 to below
        0). The latent time is built from the unsmoothed times either way, for the
        same reason (scVelo's reads the smoothed ones).
    fit_t_on
        After the latent time, fit each gene on the shared time axis with and without an
        onset time ``t_on`` (VeloVAE's basic model) and flag the genes induced after the
        root cells (a diagnostic: the gene's curve and velocities keep onset 0 on the
        gene's own clock).
    t_on_min_gain
        Share by which ``t_on`` must lower a gene's shared-time loss, on held-out cells
        and against the same model without it given the same search, to flag the gene.
    t_max
        Total time every gene's fit is aligned to (scVelo: 20).
    min_likelihood
        Velocity genes need at least this likelihood (scVelo: 0.001).
    latent_time
        Compute the gene-shared latent time and root cells (needs neighbours). Up to
        20,000 cells the root cells come from scVelo's velocity graph (the kNN recursed
        twice) and an exact eigen solve; above, from the direct kNN and 1,000 steps of
        the backward chain, which keeps the step's cost linear in the cells.
    batch_size
        Genes per batch; default fills about ``2**22`` cells x genes.
    max_cells_em
        Run the EM iterations on at most this many cells per gene, a seeded draw from
        the cells that carry the gene's weight (both ``Mu`` and ``Ms`` above 0), so a
        gene of a rare population keeps all its cells; the final time assignment,
        velocities and diagnostics use all cells. Five kinetic parameters per gene are
        well determined by 1,000 cells, and this keeps the EM's cost independent of the
        number of cells; ``None`` runs it on all cells (as scVelo). ``var['fit_n_cells_em']``
        reports each gene's count, and a warning names the genes below 30.
    seed
        Seed of every random choice (cell subsets, eigen solver start).
    device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``. On the CPU the EM runs
        in numpy around compiled kernels and torch is not imported (on a machine without
        an NVIDIA driver or with torch's CPU build, ``"auto"`` finds that out without
        importing torch either).

    Examples
    --------
    >>> result = Dynamical().fit(adata)  # doctest: +SKIP
    >>> result.to_adata(adata)  # doctest: +SKIP
    """

    name: ClassVar[str] = "dynamical"
    param_ranges: ClassVar[dict[str, str]] = {
        "max_iter": "[0, inf)",
        "tol": "[0, inf)",
        "n_newton": "[0, inf)",
        "n_rounds": "[1, inf)",
        "direct_rounds": "[0, inf)",
        "t_on_min_gain": "[0, inf)",
        "t_max": "(0, inf)",
        "min_likelihood": "[0, inf)",
        "batch_size": "[1, inf)",
        "max_cells_em": "[1, inf)",
    }

    def __init__(
        self,
        *,
        genes: GeneSelection | Sequence[str] = "velocity_genes",
        max_iter: int = 10,
        tol: float = 1e-3,
        n_newton: int = 2,
        n_rounds: int = 2,
        direct_rounds: int = 0,
        connected_states: bool = True,
        smooth_time: bool = False,
        fit_t_on: bool = True,
        t_on_min_gain: float = 0.1,
        t_max: float = 20.0,
        min_likelihood: float = 1e-3,
        latent_time: bool = True,
        batch_size: int | None = None,
        max_cells_em: int | None = 1000,
        seed: int = 0,
        device: Device = "auto",
    ) -> None:
        self.genes = genes
        self.max_iter = max_iter
        self.tol = tol
        self.n_newton = n_newton
        self.n_rounds = n_rounds
        self.direct_rounds = direct_rounds
        self.connected_states = connected_states
        self.smooth_time = smooth_time
        self.fit_t_on = fit_t_on
        self.t_on_min_gain = t_on_min_gain
        self.t_max = t_max
        self.min_likelihood = min_likelihood
        self.latent_time = latent_time
        self.batch_size = batch_size
        self.max_cells_em = max_cells_em
        self.seed = seed
        self.device = device

    # ------------------------------------------------------------------------------ checks

    def _check(self, adata: AnnData) -> None:
        require_layers(adata, self.name)
        needs_graph = self.latent_time or self.connected_states
        if needs_graph and Key.obsp.CONNECTIVITIES not in adata.obsp:
            msg = (
                "The dynamical model needs obsp['connectivities'] for latent_time=True or "
                "connected_states=True; "
                f"adata.obsp has {sorted(adata.obsp)}. Run explorer.pipeline.prepare(adata), or pass "
                "latent_time=False, connected_states=False."
            )
            raise InputError(msg)
        if self.max_iter < 0 or self.n_newton < 0 or self.n_rounds < 1:
            msg = f"Expected max_iter >= 0, n_newton >= 0 and n_rounds >= 1; found {self.max_iter}, "
            msg += f"{self.n_newton}, {self.n_rounds}."
            raise ValueError(msg)

    def _select_genes(self, adata: AnnData) -> np.ndarray:
        """``(n_vars,)`` mask of the genes to fit (:func:`~explorer.models.steady_state.genes_to_fit`)."""
        return genes_to_fit(adata, self.genes)

    # ------------------------------------------------------------------------------ fit

    def fit(
        self,
        adata: AnnData,
        *,
        progress: ProgressCallback | None = None,
        on_velocity: Callable[[VelocityResult], None] | None = None,
    ) -> VelocityResult:
        """Fit the genes' kinetics on layers ``Mu``/``Ms``; ``adata`` is left unchanged.

        Parameters
        ----------
        adata
            Cells with layers ``Mu``, ``Ms`` (and obsp ``connectivities``, see ``latent_time``).
        progress
            Receives one report per EM iteration of each gene batch, and one each for the
            latent time and the onsets.
        on_velocity
            Called once, on the fitting thread, as soon as the velocities are final: with
            a result that holds everything but the latent time, the root cells and the
            onset columns (``fit_t_on``, ``fit_uses_t_on``, ``fit_t_on_gain``), and with
            :attr:`velocity_graph_` already set (the latent time computes it first). Its
            velocity, velocity genes and ``fit_t`` are the very arrays of the returned
            result. :func:`explorer.pipeline.run_velocity` starts the velocity graph's
            steps there, in another thread, while the latent time and onsets are fitted.

        Returns
        -------
        A :class:`~explorer.models.base.VelocityResult` with the spliced and unspliced
        velocity (NaN for genes not fitted), ``gene_params`` (scVelo's ``fit_alpha``,
        ``fit_beta``, ``fit_gamma``, ``fit_t_``, ``fit_scaling``, ``fit_std_u``,
        ``fit_std_s``, ``fit_likelihood``, ``fit_u0``, ``fit_s0``,
        ``fit_alignment_scaling``, and ours: ``fit_t_on``, ``fit_uses_t_on``, ``fit_r2``,
        ``fit_kinetic_signal``, ``fit_detection_power``, ``fit_frac_induction``,
        ``fit_frac_repression``, ``fit_frac_steady_on``, ``fit_frac_steady_off``),
        ``layers['fit_t']``, the latent time and ``obs['root_cells']``.
        """
        # before the compiled kernels' OpenMP threads start (and torch's, on CUDA): they
        # spin only briefly when idle (see set_up_process)
        set_up_process()
        self._check(adata)
        self.velocity_graph_: dict[str, Any] | None = None
        device = _em_device(self.device)
        fitted = self._select_genes(adata)
        cols = np.flatnonzero(fitted)
        if len(cols) == 0:
            raise no_velocity_gene()
        n_obs, n_fit = adata.n_obs, len(cols)
        Mu = _dense32(adata.layers[Key.layers.MU][:, cols])
        Ms = _dense32(adata.layers[Key.layers.MS][:, cols])
        smoother = None
        weights = None
        if Key.obsp.CONNECTIVITIES in adata.obsp:
            weights = neighbor_average_matrix(adata.obsp[Key.obsp.CONNECTIVITIES])
            if self.connected_states:
                smoother = _Smoother(weights, device)

        batch = self.batch_size or max(1, _BATCH_ELEMENTS // max(n_obs, 1))
        starts = list(range(0, n_fit, batch))
        n_extra = int(self.latent_time) + int(self.latent_time and self.fit_t_on)
        per_batch = self.max_iter + self.direct_rounds + 1  # progress steps of a gene batch
        total = len(starts) * per_batch + n_extra
        logger.info(
            "dynamical model: %d genes x %d cells in %d batch(es) on %s",
            n_fit, n_obs, len(starts), "cpu (numpy)" if device is None else device,
        )  # fmt: skip

        pattern = self._start_graph_pattern(adata)
        clock, cpu_clock = time.perf_counter(), time.process_time()
        timings: dict[str, float] = {}
        cpu_timings: dict[str, float] = {}
        parts: list[_BatchFit] = []
        # the onset fit prepares the same genes' data as the EM: with one batch (whose data
        # lives through the EM anyway) it is kept for it instead of prepared again
        keep_data = self.latent_time and self.fit_t_on and len(starts) == 1
        with _inference_mode(device):
            for b, start in enumerate(starts):
                sl = slice(start, start + batch)
                parts.append(
                    self._fit_batch(
                        Mu[:, sl], Ms[:, sl], smoother, device,
                        progress=progress, step0=b * per_batch, total=total,
                        seed=_batch_seed(self.seed, start), keep_data=keep_data,
                    )
                )  # fmt: skip
        step = len(starts) * per_batch
        timings["em"] = time.perf_counter() - clock
        cpu_timings["em"] = time.process_time() - cpu_clock

        params = {k: np.concatenate([p.params[k] for p in parts]) for k in parts[0].params}
        em = _GeneEM.concat([p.em for p in parts])
        fit_t = np.concatenate([p.fit_t for p in parts], axis=1)
        latent_t = np.concatenate([p.latent_t for p in parts], axis=1)
        vel = np.concatenate([p.velocity for p in parts], axis=1)
        vel_u = np.concatenate([p.velocity_u for p in parts], axis=1)
        genes_ok = self._velocity_genes(params)
        _warn_few_em_cells(params, em, adata.var_names[cols])
        cell_layers = self._cell_layers(adata, cols, fit_t, vel, vel_u)

        def velocity_known() -> None:
            if on_velocity is not None:
                on_velocity(self._result(adata, cols, params, cell_layers, genes_ok, None, None))

        lt, roots = None, None
        if self.latent_time:
            clock, cpu_clock = time.perf_counter(), time.process_time()
            lt, roots = self._latent_time(
                adata, latent_t, vel, genes_ok, params, cols, weights,
                pattern=pattern, on_graph=velocity_known,
            )  # fmt: skip
            timings["latent_time"] = time.perf_counter() - clock
            cpu_timings["latent_time"] = time.process_time() - cpu_clock
            step += 1
            report(progress, step, total, "latent time")
            if self.fit_t_on:
                clock, cpu_clock = time.perf_counter(), time.process_time()
                prepared = [p.data for p in parts] if keep_data else None
                self._fit_onsets(Mu, Ms, lt, params, em, device, prepared=prepared)
                timings["onsets"] = time.perf_counter() - clock
                cpu_timings["onsets"] = time.process_time() - cpu_clock
                step += 1
                report(progress, step, total, "onset times")
        else:
            velocity_known()
        # learned state, for diagnostics: seconds per stage (wall; CPU of all threads) and
        # the EM loss per iteration
        self.timings_ = timings
        self.cpu_timings_ = cpu_timings
        self.history_ = [np.stack(p.loss_history, axis=0) if p.loss_history else None for p in parts]
        logger.info("dynamical model timings (s): %s", {k: round(v, 2) for k, v in timings.items()})
        logger.info("dynamical model CPU (s): %s", {k: round(v, 2) for k, v in cpu_timings.items()})

        return self._result(adata, cols, params, cell_layers, genes_ok, lt, roots)

    def _fit_batch(
        self,
        u_np: np.ndarray,
        s_np: np.ndarray,
        smoother: _Smoother | None,
        device: torch.device | None,
        *,
        progress: ProgressCallback | None,
        step0: int,
        total: int,
        seed: int,
        keep_data: bool = False,
    ) -> _BatchFit:
        """One gene batch's EM, on ``device`` from :func:`_em_device` (``None``: numpy on the CPU).

        The callers run it under :func:`_inference_mode` of that device.
        """
        from explorer.models import _em

        u = _on_device(np.ascontiguousarray(u_np.T, dtype=np.float32), device)
        s = _on_device(np.ascontiguousarray(s_np.T, dtype=np.float32), device)
        xp = _em._xp(u)
        # numpy's per-gene steps on two halves of the genes, in two threads (same numbers)
        data, recoverable = _em.in_two_halves(_em.prepare, u, s)
        n_obs = u.shape[1]
        em_data = data
        if self.max_cells_em is not None and n_obs > self.max_cells_em:
            # each gene's own draw from the cells that carry its weight (rare populations stay)
            em_data = data.take_cells(_em.weighted_cells(data.weights, self.max_cells_em, seed=seed))
        init = _em.initialize_shape(
            em_data, _em.in_two_halves(_em.initialize, data), factors=_SHAPE_FACTORS, n_newton=self.n_newton
        )
        p, ratio = init.params, init.ratio
        mom = _em.moments(em_data)
        step = xp.full_like(p.alpha, float(np.log(1.5)))
        a = _em.assign(em_data, p, n_newton=self.n_newton)
        prev = None
        history: list[np.ndarray] = []
        for it in range(self.max_iter):
            p, _, step = _em.m_step(em_data, mom, p, a.t, ratio, step, n_rounds=self.n_rounds)
            a = _em.assign(em_data, p, n_newton=self.n_newton, t_prev=a.t)
            loss = _em.to_numpy(_em.em_loss(em_data, mom, p, a.dist, ratio))[:, 0]
            history.append(loss)
            report(progress, step0 + it + 1, total, f"EM iteration {it + 1}/{self.max_iter}")
            if prev is not None:
                gain = float(((prev - loss) / np.maximum(prev, 1e-12)).max())
                if gain < self.tol:
                    break
            prev = loss
        if self.direct_rounds:
            done = step0 + self.max_iter

            def searched(k: int) -> None:
                report(progress, done + k, total, f"direct search round {k}/{self.direct_rounds}")

            p, _ = _em.direct_search(
                em_data, mom, p, ratio, rounds=self.direct_rounds, n_newton=self.n_newton, on_round=searched
            )

        # final assignment on all cells, comparing neighbourhood-averaged distances
        a = _em.assign(data, p, n_newton=self.n_newton, smooth=smoother)
        # an amplitude at its floor is no fit (no weighted cell left on the curve): not recoverable
        recoverable = _em.to_numpy(recoverable & (p.alpha > 2 * _em._TINY)[:, 0])
        # the read-outs, per gene: on two halves of the genes in two threads (same numbers)
        smooth_out = self.smooth_time and smoother is not None
        m, p, t, lik, r2, vs, vu = _em.in_two_halves(
            _aligned_readouts, data, p, a.t, a.state, ratio, self.t_max, not smooth_out
        )
        t_out = smoother(t) if smooth_out else t
        if smooth_out:
            vs, vu = _em.velocities(data, p, t_out, a.state)
        # the latent time reads the unsmoothed times (scVelo's reads its smoothed fit_t):
        # averaging over neighbours mixes off cells placed at time 0 with those at the end
        # of repression into mid-range times (the wrap at (0, 0)), which on scVelo's own
        # simulator cost the latent time up to 0.25 of Spearman correlation
        t_latent = t
        state = _em.to_numpy(a.state)
        fracs = np.stack([(state == k).mean(1, dtype=np.float32) for k in range(4)], 1)
        report(progress, step0 + self.max_iter + self.direct_rounds + 1, total, "velocities")

        def col(x: Any) -> np.ndarray:
            return _em.to_numpy(x).reshape(-1).astype(np.float64)

        bad = ~recoverable[:, None]

        def masked(x: Any) -> np.ndarray:
            return col(np.where(bad, np.nan, _em.to_numpy(x)))

        params = {
            Key.var.FIT_ALPHA: masked(p.alpha),
            Key.var.FIT_BETA: masked(p.beta / p.scaling),
            Key.var.FIT_GAMMA: masked(p.gamma),
            Key.var.FIT_T_: masked(p.t_),
            Key.var.FIT_SCALING: masked(p.scaling),
            Key.var.FIT_STD_U: masked(data.std_u),
            Key.var.FIT_STD_S: masked(data.std_s),
            Key.var.FIT_LIKELIHOOD: masked(lik),
            Key.var.FIT_U0: masked(np.zeros(bad.shape, dtype=np.float32)),
            Key.var.FIT_S0: masked(np.zeros(bad.shape, dtype=np.float32)),
            Key.var.FIT_ALIGNMENT_SCALING: masked(m),
            Key.var.FIT_N_CELLS_EM: col(_em._rsum(em_data.weights)),
            Key.var.FIT_R2: masked(r2),
            # curvature of the phase portrait does not depend on the u scaling: internal beta
            Key.var.FIT_KINETIC_SIGNAL: masked(p.beta / (p.beta + p.gamma)),
            Key.var.FIT_DETECTION_POWER: masked(
                kinetics.detection_power(p.alpha, p.beta, p.gamma, p.scaling)
            ),
        }
        for k, key in enumerate(_STATE_COLUMNS):
            params[key] = masked(fracs[:, k : k + 1])
        em = _GeneEM(ratio=masked(ratio), recoverable=recoverable.astype(bool))

        def cells(x: Any) -> np.ndarray:
            return np.where(bad, np.float32(np.nan), _em.to_numpy(x)).T

        kept = data if keep_data else None
        return _BatchFit(params, em, cells(t_out), cells(t_latent), cells(vs), cells(vu), history, kept)

    def _velocity_genes(self, params: dict[str, np.ndarray]) -> np.ndarray:
        """ScVelo's dynamical velocity genes: likely enough, scaling not extreme."""
        lik, scaling = params[Key.var.FIT_LIKELIHOOD], params[Key.var.FIT_SCALING]
        ok = np.isfinite(lik) & (lik > self.min_likelihood)
        if ok.any():
            # scVelo: fit_scaling within [min(p10, 0.03), max(p90, 3)]
            lb, ub = np.nanpercentile(scaling[ok], [10, 90])
            ok &= (scaling > min(lb, 0.03)) & (scaling < max(ub, 3))
        return ok

    def _latent_time(
        self,
        adata: AnnData,
        fit_t: np.ndarray,
        vel: np.ndarray,
        genes_ok: np.ndarray,
        params: dict[str, np.ndarray],
        cols: np.ndarray,
        weights: sparse.csr_matrix,
        *,
        pattern: Future[sparse.csr_matrix] | None,
        on_graph: Callable[[], None],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Latent time and root-cell score; ``on_graph()`` is called once the velocity graph is set.

        ``pattern``: the velocity graph's neighbour pattern (:meth:`_start_graph_pattern`).
        """
        conn = adata.obsp[Key.obsp.CONNECTIVITIES]
        lik = params[Key.var.FIT_LIKELIHOOD]
        genes = np.isfinite(fit_t).all(0) & (lik >= 0.1)
        if not genes.any():
            genes = np.isfinite(fit_t).all(0)
        large = adata.n_obs > _LARGE_GRAPH_CELLS
        knn = None if pattern is None else pattern.result()
        T_bwd = self._backward_transitions(adata, vel, genes_ok, cols, conn, large=large, pattern=knn)
        on_graph()
        # the root cells' eigen solve (its time mostly in scipy's sparse products, which
        # run outside the GIL) in a second thread, beside the gene times' ranks and
        # smoothing, which need no root cells (their compiled kernels stay on this thread
        # and its OpenMP team): the same numbers as one after the other
        steps = _LARGE_GRAPH_POWER_STEPS if large else None
        with ThreadPoolExecutor(max_workers=1) as pool:
            score = pool.submit(
                lt_mod.root_cells, T_bwd, conn, seed=self.seed, n_power_steps=steps, weights=weights
            )
            clock_times = lt_mod.gene_clock_times(fit_t[:, genes], conn, weights=weights)
            roots = score.result()
        return lt_mod.latent_time_from_gene_times(clock_times, roots, conn, weights=weights), roots

    def _start_graph_pattern(self, adata: AnnData) -> Future[sparse.csr_matrix] | None:
        """Start the velocity graph's neighbour pattern in a second thread, beside the EM.

        The latent time's velocity graph scores the kNN recursed twice
        (:func:`neighbors_for_graph`, about 0.1 s of CPU on the pancreas, mostly scipy's
        sparse products): it needs only the kNN graph, and the EM keeps the second core
        idle between its compiled kernels. None when the latent time does not use it.
        """
        if not self.latent_time or Key.obsp.DISTANCES not in adata.obsp:
            return None
        large = adata.n_obs > _LARGE_GRAPH_CELLS
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explorer-graph-pattern")
        try:
            return pool.submit(neighbors_for_graph, adata, n_recurse_neighbors=_graph_recursion(large))
        finally:
            pool.shutdown(wait=False)  # the thread ends with its one task

    def _backward_transitions(
        self,
        adata: AnnData,
        vel: np.ndarray,
        genes_ok: np.ndarray,
        cols: np.ndarray,
        conn: sparse.spmatrix,
        *,
        large: bool,
        pattern: sparse.csr_matrix | None = None,
    ) -> sparse.csr_matrix:
        """Backward transitions of scVelo's velocity graph of the velocity genes (``velocity_graph_``).

        ``pattern``: the neighbour pattern :func:`neighbors_for_graph` gives for this
        ``large``, if computed already.
        """
        use = genes_ok & np.isfinite(vel).all(0)
        if not use.any():
            use = np.isfinite(vel).all(0)
        Ms = _dense32(adata.layers[Key.layers.MS][:, cols[use]])
        # scVelo scores the twice-recursed kNN (about 150 cells per cell at 30 neighbours)
        # and solves its eigenproblem to machine precision; the solve's Arnoldi restarts
        # grow with the number of cells (356 s of a 390 s fit at 100,000 cells). Above
        # _LARGE_GRAPH_CELLS the direct kNN and a fixed number of backward-chain steps
        # are used instead (root_cells' n_power_steps): the root cells are the top 2% of
        # a smoothed score, and the earliest of them by summed gene time are used.
        if pattern is None and Key.obsp.DISTANCES in adata.obsp:
            pattern = neighbors_for_graph(adata, n_recurse_neighbors=_graph_recursion(large))
        elif pattern is None:
            pattern = sparse.csr_matrix(conn)
        graph, graph_neg = velocity_graphs(Ms, vel[:, use], pattern)
        T_bwd = transition_matrix(graph, graph_neg, backward=True)
        if not large and Key.obsp.DISTANCES in adata.obsp:
            # scVelo's velocity graph itself (the kNN recursed twice, these genes): kept for
            # explorer.pipeline.derive, which would otherwise compute it again
            genes = np.zeros(adata.n_vars, dtype=bool)
            genes[cols[use]] = True
            self.velocity_graph_ = {"graph": graph, "graph_neg": graph_neg, "genes": genes}
        return T_bwd

    def _fit_onsets(
        self,
        Mu: np.ndarray,
        Ms: np.ndarray,
        lt: np.ndarray,
        params: dict[str, np.ndarray],
        em: _GeneEM,
        device: torch.device | None,
        *,
        prepared: Sequence[Any] | None = None,
    ) -> None:
        """Fit every gene on the shared time ``latent_time * t_max`` with and without ``t_on``.

        A diagnostic, never part of the gene's curve (which keeps onset 0 on its own
        clock, ``fit_t``): is the gene induced measurably later than the root cells?
        The null is the same model with ``t_on = 0``, given the same search: each model
        is also refined from the other's optimum, so neither wins by a better start (the
        old comparison gave the onset model 8x the starts, and flagged genes whose best
        onset was 0). Both are fitted on half of each gene's cells (drawn, as in the EM,
        from the cells carrying its weight) and compared on the other half, so the extra
        parameter must help on cells it was not fitted to. Only onsets after the root
        count: an onset before it (a gene already induced in the root cells) cannot be
        told from a latent time that puts the first cells all at 0, and on simulations
        it flagged nearly every gene whose true onset is at the start.

        Adds ``fit_t_on`` (onset on the shared axis where used, else 0; NaN where not
        fitted), ``fit_t_on_gain`` (held-out share of loss removed by ``t_on``) and
        ``fit_uses_t_on`` (gain above ``t_on_min_gain`` and onset after 0) to
        ``params``, in place. ``prepared``: each gene batch's data from
        :func:`explorer.models._em.prepare`, if the EM kept it (the same batches).
        """
        from explorer.models import _em

        def array(x: np.ndarray) -> Any:
            return _on_device(np.ascontiguousarray(x, dtype=np.float32), device)

        def positions(first: int, m: int) -> Any:
            return _on_device(np.arange(first, m, 2), device)

        n_fit = Mu.shape[1]
        t_on_out = np.full(n_fit, np.nan)
        gain_out = np.full(n_fit, np.nan)
        ok_all = em.recoverable
        batch = self.batch_size or max(1, _BATCH_ELEMENTS // max(len(lt), 1))
        t_cells = array(lt.astype(np.float32) * self.t_max)
        grid = {
            "duration_grid": [x * self.t_max for x in _GRID_DURATION],
            "rate_grid": list(_GRID_RATE),
        }
        with _inference_mode(device):
            for b, start in enumerate(range(0, n_fit, batch)):
                sl = slice(start, start + batch)
                if prepared is None:
                    data, _ = _em.prepare(array(Mu[:, sl].T), array(Ms[:, sl].T))
                else:
                    data = prepared[b]
                xp = _em._xp(data.u)
                # a regression on fixed times: a seeded subset of each gene's cells is enough
                idx = _em.weighted_cells(data.weights, _ONSET_CELLS, seed=_batch_seed(self.seed + 1, start))
                data, t = data.take_cells(idx), t_cells[idx]
                m = idx.shape[1]
                fit_pos = positions(0, m)
                test_pos = positions(1, m)
                grid_pos = fit_pos[:: max(1, len(fit_pos) // _GRID_CELLS)]
                fit_data, fit_t = data.take_cells(fit_pos), _em.take_columns(t, fit_pos)
                test_data, test_t = data.take_cells(test_pos), _em.take_columns(t, test_pos)
                grid_data, grid_t = data.take_cells(grid_pos), _em.take_columns(t, grid_pos)

                def vec(key: str, sl: slice = sl) -> Any:
                    return column(params[key], sl)

                def column(values: np.ndarray, sl: slice = sl) -> Any:
                    return array(np.nan_to_num(values[sl], nan=1.0)[:, None])

                start_p = _em.Params(
                    alpha=vec(Key.var.FIT_ALPHA),
                    beta=vec(Key.var.FIT_BETA) * vec(Key.var.FIT_SCALING),
                    gamma=vec(Key.var.FIT_GAMMA),
                    t_=vec(Key.var.FIT_T_),
                    scaling=vec(Key.var.FIT_SCALING),
                    t_on=xp.zeros_like(vec(Key.var.FIT_T_)),
                )
                ratio = column(em.ratio)
                mom = _em.moments(fit_data)

                def refine(
                    p: _em.Params, *, free: bool, data=fit_data, mom=mom, t=fit_t, ratio=ratio, xp=xp
                ) -> tuple[_em.Params, Any]:
                    stp = xp.full_like(p.alpha, float(np.log(1.5)))
                    p, loss, _ = _em.m_step(
                        data, mom, p, t, ratio, stp, n_rounds=_ONSET_ROUNDS, fit_t_on=free
                    )
                    return p, loss

                def best(
                    a: tuple[_em.Params, Any], b: tuple[_em.Params, Any], xp=xp
                ) -> tuple[_em.Params, Any]:
                    better = b[1] < a[1]
                    return a[0].where(better, b[0]), xp.where(better, b[1], a[1])

                c = refine(
                    _em.grid_onset(grid_data, start_p, grid_t, ratio, t_on_grid=[0.0], **grid), free=False
                )
                t_on_grid = [x * self.t_max for x in _GRID_T_ON]
                # the free model from the grid's best and, as it contains the constrained
                # one, also from there: two independent fits, run as one on the genes twice
                # (each gene's numbers are those of its own fit, in half the kernel calls)
                n_genes = c[0].alpha.shape[0]
                from_grid = _em.grid_onset(grid_data, c[0], grid_t, ratio, t_on_grid=t_on_grid, **grid)
                p2, loss2 = refine(
                    _em.stack_genes(from_grid, c[0]),
                    free=True,
                    data=_em.stack_genes(fit_data, fit_data),
                    mom=_em.stack_genes(mom, mom),
                    t=_em.stack_genes(fit_t, fit_t),
                    ratio=_em.stack_genes(ratio, ratio),
                )
                (p_grid, p_c), (l_grid, l_c) = _em.split_genes(p2, n_genes), _em.split_genes(loss2, n_genes)
                f = best((p_grid, l_grid), (p_c, l_c))
                # and the constrained model gets the free one's start: the same search for both
                c = best(c, refine(f[0].replace(t_on=xp.zeros_like(f[0].t_on)), free=False))

                def held_out(p: _em.Params, data=test_data, t=test_t) -> np.ndarray:
                    dist = _em.point_distance(data, p, t)
                    total = _em.to_numpy(_em._sum(dist, data.weights))[:, 0]
                    return total / _em.to_numpy(data.n_weighted)[:, 0].astype(np.float64)

                l0, l1 = held_out(c[0]), held_out(f[0])
                gain_out[sl] = (l0 - l1) / np.maximum(l0, 1e-12)
                t_on_out[sl] = _em.to_numpy(f[0].t_on)[:, 0].astype(np.float64)
        uses = ok_all & (gain_out > self.t_on_min_gain) & (t_on_out > 0)
        params[Key.var.FIT_T_ON] = np.where(ok_all, np.where(uses, t_on_out, 0.0), np.nan)
        params[Key.var.FIT_USES_T_ON] = uses
        params[Key.var.FIT_T_ON_GAIN] = np.where(ok_all, gain_out, np.nan)

    @staticmethod
    def _cell_layers(
        adata: AnnData, cols: np.ndarray, fit_t: np.ndarray, vel: np.ndarray, vel_u: np.ndarray
    ) -> dict[str, np.ndarray]:
        """``velocity``, ``velocity_u`` and ``fit_t`` over all genes (NaN where not fitted), by layer key."""
        n_obs, n_vars = adata.n_obs, adata.n_vars

        def full_cells(x: np.ndarray) -> np.ndarray:
            out = np.full((n_obs, n_vars), np.nan, dtype=np.float32)
            out[:, cols] = x
            return out

        return {
            Key.layers.VELOCITY: full_cells(vel),
            Key.layers.VELOCITY_U: full_cells(vel_u),
            Key.layers.FIT_T: full_cells(fit_t),
        }

    def _result(
        self,
        adata: AnnData,
        cols: np.ndarray,
        params: dict[str, np.ndarray],
        cell_layers: dict[str, np.ndarray],
        genes_ok: np.ndarray,
        lt: np.ndarray | None,
        roots: np.ndarray | None,
    ) -> VelocityResult:
        n_vars = adata.n_vars
        var_names = adata.var_names.copy()
        obs_names = adata.obs_names.copy()

        columns: dict[str, np.ndarray] = {}
        for key, values in params.items():
            if values.dtype == bool:
                out = np.zeros(n_vars, dtype=bool)
            else:
                out = np.full(n_vars, np.nan, dtype=np.float32)
            out[cols] = values
            columns[key] = out
        velocity_genes = np.zeros(n_vars, dtype=bool)
        velocity_genes[cols] = genes_ok
        gene_params = pd.DataFrame(columns, index=var_names)
        obs = None
        if roots is not None:
            obs = pd.DataFrame({Key.obs.ROOT_CELLS: roots.astype(np.float32)}, index=obs_names)
        return VelocityResult(
            model=self.name,
            params=self.get_params(),
            obs_names=obs_names,
            var_names=var_names,
            velocity=cell_layers[Key.layers.VELOCITY],
            gene_params=gene_params,
            velocity_genes=velocity_genes,
            likelihood=pd.Series(
                columns[Key.var.FIT_LIKELIHOOD], index=var_names, name=Key.var.FIT_LIKELIHOOD
            ),
            velocity_u=cell_layers[Key.layers.VELOCITY_U],
            latent_time=None if lt is None else lt.astype(np.float32),
            layers={Key.layers.FIT_T: cell_layers[Key.layers.FIT_T]},
            obs=obs,
        )
