"""The learned vector field's network and the tensor code around it.

An autonomous field ``dx/dt = f(x)`` over a low-dimensional cell state ``x`` (the PCA
space by default), kept apart from the AnnData wrapper (:mod:`explorer.models.vector_field`),
which builds the tensors, trains and extracts, as scvi-tools keeps its modules.

- **Network** (:class:`VectorFieldMLP`): a multilayer perceptron with smooth (SiLU)
  activations, so that its Jacobian, divergence and curl are continuous; inputs are
  centred and scaled by the data's spread and outputs multiplied by a fixed speed scale,
  so that the weights start at the right order of magnitude whatever the units.
- **Velocity matching** (:func:`velocity_loss`): mean squared error between ``f(x_i)``
  and the cells' velocities in the same space, over the mean squared velocity (unit-free).
- **Flow matching** (:func:`flow_targets`, :func:`flow_loss`, :func:`ot_pairs`): OT-CFM (Tong et al. 2024,
  "Improving and generalizing flow-based generative models with minibatch optimal
  transport"): cells of consecutive time groups are paired by exact optimal transport
  on equal-size minibatches (an assignment problem, solved exactly by
  :func:`scipy.optimize.linear_sum_assignment`), and ``f`` is regressed on the
  straight-line velocity ``(x1 - x0) / (t1 - t0)`` at points drawn on the segment. No
  ODE is integrated while training. The field here is autonomous (``f(x)``, not
  ``f(x, t)``), so that it has fixed points.
- **Off the data** (:func:`restoring_loss`): noisy copies of the training points are
  taught the same velocity plus a pull back toward the point, so that paths stay near
  the cells.
- **Jacobian penalty** (:func:`jacobian_penalty`): Hutchinson's estimate of
  ``||J||_F^2`` from vector-Jacobian products with Gaussian probes. With orthonormal
  loadings ``W`` the gene-space Jacobian ``W J W^T`` has the same Frobenius norm, so
  this smooths the gene coupling too.
- **Sparse gene coupling** (:func:`coupling_l1`): an L1 penalty on the off-diagonal
  entries of the Jacobian carried back to genes, ``W J W^T``, estimated on random rows
  and columns (the lasso's route to few nonzero couplings).
- **Integration** (:func:`rk4`): fixed-step classical Runge-Kutta, batched over cells.
- **Fixed points** (:func:`fixed_points`): damped Newton (Levenberg-Marquardt) on
  ``f(x) = 0`` from many starts at once, with batched Jacobians.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


class VectorFieldMLP(nn.Module):
    """``f(x) = speed * g((x - center) / spread)`` with ``g`` an MLP with SiLU activations.

    Parameters
    ----------
    dim
        Dimension of the cell state.
    center, spread
        ``(dim,)`` centre and scale of the states (inputs are standardised with them).
    speed
        ``(dim,)`` typical velocity per coordinate: the network's outputs are multiplied
        by it, so that ``g`` works with numbers of order one.
    hidden
        Widths of the hidden layers.
    """

    def __init__(
        self,
        dim: int,
        center: torch.Tensor,
        spread: torch.Tensor,
        speed: torch.Tensor,
        hidden: Sequence[int] = (128, 128),
    ) -> None:
        super().__init__()
        widths = [dim, *hidden, dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.SiLU())
        self.net = nn.Sequential(*layers)
        self.register_buffer("center", center.clone().float())
        self.register_buffer("spread", spread.clone().float())
        self.register_buffer("speed", speed.clone().float())
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, dim)`` velocities at ``(n, dim)`` states."""
        return self.net((x - self.center) / self.spread) * self.speed


def velocity_loss(field: nn.Module, x: torch.Tensor, v: torch.Tensor, norm: float) -> torch.Tensor:
    """``mean ||f(x) - v||^2 / norm``, with ``norm`` the mean ``||v||^2`` over all cells."""
    return ((field(x) - v) ** 2).sum(1).mean() / norm


def restoring_loss(
    field: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    sigma: float,
    rate: float,
    norm: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Teach the field off the data: at ``x + d``, ``target - rate * d``, with ``|d|`` up to ``sigma``.

    The cells sit on a thin manifold of the state space, and nothing else tells the
    network what to do beside it: a path integrated over an unconstrained field drifts
    off within a few steps and then diverges. Here a point displaced from a cell is
    taught the cell's velocity plus a pull back toward the cell, at ``rate`` (1/time).
    The displacement ``d`` has a uniform random direction and a length drawn uniformly
    in ``[0, sigma]``: Gaussian noise in many dimensions would put every copy on a thin
    shell at ``sigma * sqrt(dim)``, leaving the field untaught inside and outside it.
    Averaged over the cells around a point, the pulls along the manifold cancel and
    those across it add up: a (multi-scale) denoising estimate of the score of the
    cells' density, the term [SF]2M (Tong et al. 2024) adds to the flow's drift, which
    keeps paths near the cells, splits them at a branch point toward either branch
    (between two branches the pulls toward each make a saddle) and makes the ends of
    the data attracting.
    """
    eps = torch.randn(x.shape, generator=generator).to(x.device)
    length = sigma * torch.rand((x.shape[0], 1), generator=generator).to(x.device)
    d = eps / eps.norm(dim=1, keepdim=True).clamp_min(1e-12) * length
    return ((field(x + d) - (target - rate * d)) ** 2).sum(1).mean() / norm


def ot_pairs(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """Exact optimal transport between two equal-size uniform minibatches.

    With ``m`` points on each side and uniform weights the optimal plan is a permutation
    (Birkhoff-von Neumann), so it is the assignment of least total squared distance.

    Returns
    -------
    ``(m,)`` indices: ``x0[i]`` is paired with ``x1[perm[i]]``.
    """
    cost = ((x0[:, None, :] - x1[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def flow_targets(
    x0: torch.Tensor, x1: torch.Tensor, dt: torch.Tensor, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """OT-CFM's regression points and targets for paired points ``x0 -> x1`` a time ``dt`` apart.

    A point ``x_s = (1 - s) x0 + s x1`` is drawn on each segment (``s ~ U(0, 1)``); its
    target is the straight-line velocity ``(x1 - x0) / dt``. ``dt`` is ``(m, 1)``.
    """
    s = torch.rand((x0.shape[0], 1), generator=generator).to(x0.device)
    return (1 - s) * x0 + s * x1, (x1 - x0) / dt


def flow_loss(field: nn.Module, xs: torch.Tensor, target: torch.Tensor, norm: float) -> torch.Tensor:
    """``mean ||f(x_s) - target||^2 / norm`` (``norm``: the mean squared target, so unit-free)."""
    return ((field(xs) - target) ** 2).sum(1).mean() / norm


def jacobian_penalty(
    field: nn.Module, x: torch.Tensor, *, scale: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Hutchinson's estimate of ``mean ||J||_F^2`` (one Gaussian probe per point), unit-free.

    ``E ||eps^T J||^2 = ||J||_F^2`` for ``eps ~ N(0, I)``; the Jacobian is of the field in
    standardised coordinates (``scale`` = spread / speed per coordinate), so the penalty
    does not depend on the units of the state.
    """
    x = x.detach().requires_grad_(requires_grad=True)
    out = field(x)
    eps = torch.randn(out.shape, generator=generator).to(x.device)
    (vjp,) = torch.autograd.grad(out, x, grad_outputs=eps, create_graph=True)
    return ((vjp * scale) ** 2).sum(1).mean() / x.shape[1]


def coupling_l1(
    field: nn.Module,
    x: torch.Tensor,
    *,
    loadings: torch.Tensor | None,
    rate: float,
    n_genes: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Mean L1 norm of a gene's couplings to the other genes, ``W J W^T`` off the diagonal, unit-free.

    The field's Jacobian carried back to genes is ``W J W^T`` (``(n_genes, n_genes)`` per
    point, with ``W`` the ``(n_genes, dim)`` loadings; the gene Jacobian of
    :func:`explorer.models.vector_field.gene_jacobian` is it times a positive per-cell factor
    off the diagonal, so the two have the same zeros). Its off-diagonal entries are how
    strongly one gene's level drives another's velocity: an L1 penalty on them is the
    lasso of sparse regulatory coupling (Dynamo's Jacobian analysis reads them as
    regulation; Qiu et al. 2022). The diagonal (each gene's own decay) is left free. It
    is estimated without forming the whole matrix: ``n_genes`` random rows and as many
    columns of ``W J W^T`` at each point (an unbiased estimate of the mean off-diagonal
    ``|entry|``), times the number of genes, so the value is the mean over genes of the
    L1 norm of its row, over ``rate`` (a typical Jacobian entry, the median speed per
    length scale). ``loadings=None`` penalises ``J`` itself (an obsm state).
    """
    from torch.func import jacrev, vmap

    single = jacrev(lambda p: field(p[None])[0])
    J = vmap(single)(x)  # (n, dim, dim), differentiable in the field's weights
    total = J.shape[1] if loadings is None else loadings.shape[0]
    m = min(n_genes, total)
    rows = torch.randperm(total, generator=generator)[:m].to(x.device)
    cols = torch.randperm(total, generator=generator)[:m].to(x.device)
    if loadings is None:
        G = J[:, rows][:, :, cols]
    else:
        G = loadings[rows] @ J @ loadings[cols].T
    off = (rows[:, None] != cols[None, :]).to(G.dtype)
    share = off.sum().clamp_min(1.0)
    return (G.abs() * off).sum((1, 2)).mean() / share * (total - 1) / rate


def rk4(
    field: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    *,
    dt: float,
    n_steps: int,
    check: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Integrate ``dx/dt = field(x)`` by fixed-step classical Runge-Kutta from ``(n, dim)`` starts.

    Returns
    -------
    ``(n, n_steps + 1, dim)``: the starts, then the state after each step.
    """
    path = [x0]
    x = x0
    for step in range(n_steps):
        k1 = field(x)
        k2 = field(x + 0.5 * dt * k1)
        k3 = field(x + 0.5 * dt * k2)
        k4 = field(x + dt * k3)
        x = x + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        path.append(x)
        if check is not None:
            check(step + 1)
    return torch.stack(path, dim=1)


def jacobians(
    field: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, chunk: int = 4096
) -> torch.Tensor:
    """``(n, dim, dim)`` Jacobians ``J[i, a, b] = d f_a / d x_b`` at ``(n, dim)`` points."""
    from torch.func import jacrev, vmap

    single = jacrev(lambda p: field(p[None])[0])
    return torch.cat([vmap(single)(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])


def fixed_points(
    field: Callable[[torch.Tensor], torch.Tensor],
    starts: torch.Tensor,
    *,
    n_iter: int = 50,
    damping: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeros of ``field`` by Levenberg-Marquardt from each of ``(n, dim)`` starts, batched.

    Each iteration solves ``(J^T J + lambda I) d = -J^T f``; ``lambda`` of each start
    shrinks tenfold after a step that lowers ``||f||`` and grows tenfold after one that
    does not (which is then not taken).

    Returns
    -------
    ``(points, residual)``: ``(n, dim)`` end points and ``(n,)`` ``||f||`` there.
    """
    x = starts.clone()
    n, dim = x.shape
    lam = torch.full((n,), damping, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        res = field(x).norm(dim=1)
    eye = torch.eye(dim, dtype=x.dtype, device=x.device)
    for _ in range(n_iter):
        J = jacobians(field, x).detach()
        with torch.no_grad():
            f = field(x)
            JtJ = J.transpose(1, 2) @ J
            scale = torch.diagonal(JtJ, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
            A = JtJ + (lam * scale)[:, None, None] * eye
            step = torch.linalg.solve(A, -(J.transpose(1, 2) @ f[:, :, None]))[:, :, 0]
            new = x + step
            new_res = field(new).norm(dim=1)
            better = new_res < res
            x = torch.where(better[:, None], new, x)
            res = torch.where(better, new_res, res)
            lam = torch.where(better, lam / 10, lam * 10).clamp(1e-9, 1e9)
            if bool((lam >= 1e9).all()):  # every start stalled: no step lowers ||f||
                break
    return x, res
