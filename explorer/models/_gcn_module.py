"""DeepVelo's network: a graph convolutional network giving every cell its own kinetic rates.

Cui, Maan, Taylor & Wang (2022), "A deep learning framework for estimating cell-specific
kinetic rates of RNA velocity" (DeepVelo). The network is kept apart from the AnnData
wrapper (:mod:`explorer.models.gcn`), which builds the tensors, trains and extracts.

- **Encoder.** Stacked graph convolutions ``H' = relu(A_hat H W + b)`` over the cells' kNN
  graph, ``A_hat = D^-1/2 (A + I) D^-1/2`` (Kipf & Welling 2017), on node features
  ``[u, s]`` (each gene divided by its spread, so that all genes weigh alike).
  ``A_hat X`` is the same in every epoch, so the caller passes it precomputed: the first
  layer is then a plain linear map of its rows, and a mini-batch of cells only needs
  the ``(n_layers - 1)``-hop neighbourhood of its cells.
- **Head.** A fully connected layer gives, per cell and gene, ``alpha, beta, gamma > 0``:
  ``beta`` and ``gamma`` as a softplus factor on fixed per-gene starting values
  (``base``), so training starts from gene-level rates of the right scale and learns
  each cell's departure from them; ``alpha`` as a factor on ``beta u + alpha_0`` (the
  transcription that holds ``u`` steady, plus a small floor so cells without ``u`` can
  be induced), so ``du/dt = alpha - beta u`` starts near 0.
- **Velocity.** ``v = beta * u - gamma * s`` (spliced) and ``v_u = alpha - beta * u``.
- **Objective** (:meth:`VeloGCN.loss`, the paper's ``L+ + L- + L_pearson``):
  for each cell, the candidates are its nearest neighbours in PCA space; ``L+`` pulls
  ``x_i + v_i`` (``x = [s, u]``) toward the mean of the candidates whose spliced
  displacement ``s_j - s_i`` has positive cosine with ``v_i``, and ``L-`` pulls
  ``x_i - v_i`` toward the mean of those with negative cosine (uniform weights);
  ``L_pearson = -(lambda_u corr(v, u) + lambda_s corr(v, -s))``, per gene across the
  cells of the batch (cells with zero ``u``, resp. ``s``, left out, as the reference
  implementation does), averaged over genes. The squared errors are divided per gene by
  the gene's mean squared displacement to its candidates, so that every gene weighs
  alike and the terms are unit-free. The unspliced half trains ``alpha`` only
  (:meth:`VeloGCN.velocities`).
- **Cost.** Each step needs, besides the network, one sampled product (the sign of
  ``(s_j - s_i) . v_i`` for every candidate pair) and one sparse-dense product (the sum
  over the forward candidates; the backward sum is the fixed total minus it), and
  ``L+ + L-`` is summed as ``w (2 v (v - (f - b)) + f^2 + b^2)``: the same value and
  gradient as the two squared errors in a third of the passes over the data
  (:class:`CandidateSearch`, :meth:`VeloGCN.loss`).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Sequence

#: ``softplus(_SOFTPLUS_ONE) == 1``: the head's zero output gives the base rates
_SOFTPLUS_ONE = math.log(math.e - 1.0)
#: floor on rates (relative to the base), so that velocities stay defined
_MIN_RATE = 1e-4


class VeloGCN(nn.Module):
    """GCN encoder and fully connected head: per-cell, per-gene ``alpha, beta, gamma``.

    Parameters
    ----------
    n_genes
        Genes (the input has ``2 * n_genes`` features: ``u`` then ``s``).
    base
        ``(3, n_genes)`` positive per-gene ``alpha_0, beta, gamma`` to start from.
    hidden
        Widths of the graph convolutions (the paper: ``(64, 64)``).
    dropout
        Dropout after each convolution while training (the paper: 0.2).
    """

    def __init__(
        self, n_genes: int, base: torch.Tensor, hidden: Sequence[int] = (64, 64), dropout: float = 0.2
    ) -> None:
        super().__init__()
        widths = [2 * n_genes, *hidden]
        self.convs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.head = nn.Linear(widths[-1], 3 * n_genes)
        # small head: every cell starts at its gene's base rates and departs from them
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("base", base.clone())
        self.n_genes = n_genes

    @property
    def n_layers(self) -> int:
        """Number of graph convolutions."""
        return len(self.convs)

    def _rates(
        self, first: torch.Tensor, adjacency: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``alpha``'s factor, ``beta`` and ``gamma`` of the output cells (see :meth:`forward`)."""
        h = self.dropout(torch.relu(self.convs[0](first)))
        for conv, adj in zip(self.convs[1:], adjacency, strict=True):
            h = self.dropout(torch.relu(conv(torch.sparse.mm(adj, h))))
        z = self.head(h).view(-1, 3, self.n_genes)
        factor = nn.functional.softplus(z + _SOFTPLUS_ONE) + _MIN_RATE
        return factor[:, 0], self.base[1] * factor[:, 1], self.base[2] * factor[:, 2]

    def _alpha(self, alpha_factor: torch.Tensor, bu: torch.Tensor) -> torch.Tensor:
        # alpha relative to the unspliced steady state beta u (plus a floor, so that cells
        # without u can be induced): the network starts from du/dt = alpha - beta u near 0
        return (bu + self.base[0]) * alpha_factor

    def forward(
        self, first: torch.Tensor, adjacency: Sequence[torch.Tensor], u_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rates of the output cells.

        Parameters
        ----------
        first
            Rows of ``A_hat X`` for the cells the first convolution is computed on.
        adjacency
            One sparse block of ``A_hat`` per further convolution: rows are the cells
            of that layer, columns the cells of the layer before (all of each row's
            neighbours among them); the last block's rows are the output cells.
        u_out
            ``(n_out, n_genes)`` unspliced abundances of the output cells.

        Returns
        -------
        ``alpha, beta, gamma``, each ``(n_out, n_genes)``, positive.
        """
        alpha_factor, beta, gamma = self._rates(first, adjacency)
        return self._alpha(alpha_factor, beta * u_out), beta, gamma

    def velocities(
        self, first: torch.Tensor, adjacency: Sequence[torch.Tensor], u_out: torch.Tensor, s_out: torch.Tensor
    ) -> torch.Tensor:
        """``(n_out, 2 n_genes)``: the spliced velocity ``beta u - gamma s``, then ``alpha - beta u``.

        The unspliced velocity's gradient reaches ``alpha`` only (``beta u`` enters it
        detached): ``beta`` and ``gamma`` are trained by the spliced velocity, as in the
        reference implementation's default, which has no unspliced term. Through ``beta``
        the unspliced term pulled a faster-degrading regime toward the wrong spliced sign
        (see :class:`~explorer.models.gcn.DeepVelo`, ``lambda_u``).
        """
        alpha_factor, beta, gamma = self._rates(first, adjacency)
        bu = beta * u_out
        bu_fixed = bu.detach()
        return torch.cat([bu - gamma * s_out, self._alpha(alpha_factor, bu_fixed) - bu_fixed], dim=1)

    @staticmethod
    def loss(
        v: torch.Tensor,
        targets: CandidateTargets,
        corr_u: PearsonTarget,
        corr_s: PearsonTarget,
        *,
        lambda_u: float,
        lambda_s: float,
    ) -> dict[str, torch.Tensor]:
        """The paper's objective on one batch of cells.

        ``v`` is :meth:`velocities`' ``[v_s, v_u]``. ``L+ + L-``, the weighted squared
        errors ``w (v - f)^2 + w (v + b)^2`` of the forward and backward mean
        displacements ``f, b`` (:class:`CandidateTargets`), is summed as
        ``w (2 v (v - (f - b)) + f^2 + b^2)``: the same value and gradient in a third of
        the passes over the data. ``corr_u`` and ``corr_s`` are :class:`PearsonTarget`
        of the batch's ``u`` and ``-s`` (fixed data: built once per batch, or once for a
        full batch).

        Returns
        -------
        ``{"total", "neighbors", "pearson"}``: ``L+ + L- + L_pearson``, ``L+ + L-`` and
        ``L_pearson``.
        """
        n_genes = v.shape[1] // 2
        n_cells = v.shape[0] * n_genes  # each of the s and u halves is a mean over these
        neighbors = 2.0 * (targets.weight * v * (v - targets.target)).sum() / n_cells + targets.const
        v_s = v[:, :n_genes]
        pearson = -(lambda_u * corr_u.correlation(v_s).mean() + lambda_s * corr_s.correlation(v_s).mean())
        return {"total": neighbors + pearson, "neighbors": neighbors, "pearson": pearson}


class CandidateTargets:
    """Mean displacements to the forward and backward candidates of a batch of cells.

    Attributes
    ----------
    forward, backward
        ``(n_batch, 2 n_genes)`` mean of ``x_j - x_i`` (``x = [s, u]``) over the
        candidates with positive (forward) and negative (backward) cosine between
        ``s_j - s_i`` and ``v_i``; zero where a cell has none.
    target
        ``forward - backward``.
    weight
        ``(2 n_genes,)`` one over each gene's mean squared displacement (``s`` then ``u``).
    const
        ``sum(weight (forward^2 + backward^2)) / (n_batch n_genes)``, the part of
        ``L+ + L-`` that does not depend on ``v``.
    """

    __slots__ = ("backward", "const", "forward", "target", "weight")

    def __init__(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            setattr(self, k, v)


class CandidateSearch:
    """Each cell's candidate future and past cells, and their mean displacements for a velocity.

    Everything fixed is prepared once: ``S.T``, the sum of ``x_j`` over
    each cell's candidates and the full batch's sparsity pattern. Per batch,
    :meth:`targets` then needs one sampled product (``s_j . v_i`` for every candidate
    pair) and one sparse-dense product (the sum over the forward candidates; the
    backward sum is the total minus it), ``O(n_batch k n_genes)`` work without
    materialising the ``(n_batch, k, n_genes)`` displacements.

    Parameters
    ----------
    candidates
        ``(n_obs, k)`` candidate indices of every cell, each row sorted.
    X
        ``(n_obs, 2 n_genes)``: the spliced abundances of all cells, then the unspliced.
    inv_scale_s, inv_scale_u
        ``(n_genes,)`` one over each gene's root mean squared displacement.
    """

    def __init__(
        self, candidates: torch.Tensor, X: torch.Tensor, inv_scale_s: torch.Tensor, inv_scale_u: torch.Tensor
    ) -> None:
        n_obs, k = candidates.shape
        self.n_obs, self.k, self.n_genes = n_obs, k, X.shape[1] // 2
        self.candidates = candidates
        self.X = X
        self.S_T = X[:, : self.n_genes].T.contiguous()
        self.weight = torch.cat([inv_scale_s, inv_scale_u]).square()
        self._full_crow = self._crow(n_obs, X.device)
        self._full_col = candidates.reshape(-1)
        with torch.no_grad():
            ones = torch.ones(n_obs * k, device=X.device, dtype=X.dtype)
            self.totals = _csr(self._full_crow, self._full_col, ones, (n_obs, n_obs)) @ X

    def _crow(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.arange(0, n * self.k + 1, self.k, device=device)

    @torch.no_grad()
    def targets(self, v_s: torch.Tensor, cells: torch.Tensor | None = None) -> CandidateTargets:
        """Split each cell's candidates by the sign of their cosine with ``v_s`` and average each side.

        Parameters
        ----------
        v_s
            ``(n_batch, n_genes)`` spliced velocity of the batch (no gradient flows through
            the targets, as in the reference implementation).
        cells
            ``(n_batch,)`` indices of the batch's cells; ``None`` for all cells in order.

        Returns
        -------
        The batch's :class:`CandidateTargets`.
        """
        v_s = v_s.detach()
        k, n_obs, g = self.k, self.n_obs, self.n_genes
        if cells is None:
            crow, col, x_i, totals = self._full_crow, self._full_col, self.X, self.totals
        else:
            crow, col = self._crow(len(cells), v_s.device), self.candidates[cells].reshape(-1)
            x_i, totals = self.X[cells], self.totals[cells]
        s_i = x_i[:, :g]
        n_batch = v_s.shape[0]
        ones = torch.ones(n_batch * k, device=v_s.device, dtype=v_s.dtype)
        pattern = _csr(crow, col, ones, (n_batch, n_obs))
        # (s_j - s_i) . v_i = s_j . v_i - s_i . v_i: only its sign matters (the cosine's)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
            s_j_v = torch.sparse.sampled_addmm(pattern, v_s, self.S_T, beta=0.0).values().view(n_batch, k)
        dot = s_j_v - (s_i * v_s).sum(1, keepdim=True)
        pos, neg = dot > 0, dot < 0
        w_pos = pos.to(v_s.dtype)
        sum_pos = _csr(crow, col, w_pos.reshape(-1), (n_batch, n_obs)) @ self.X
        sum_neg = totals - sum_pos
        zero = ~(pos | neg)
        if bool(zero.any()):  # exactly orthogonal candidates (a zero velocity) are on neither side
            sum_neg -= _csr(crow, col, zero.to(v_s.dtype).reshape(-1), (n_batch, n_obs)) @ self.X
        out = {}
        for side, total, mask in (("forward", sum_pos, pos), ("backward", sum_neg, neg)):
            count = mask.sum(1, keepdim=True).to(v_s.dtype)
            has = (count > 0).to(v_s.dtype)
            out[side] = total / count.clamp(min=1.0) - has * x_i
        f, b = out["forward"], out["backward"]
        const = (self.weight * (f.square() + b.square())).sum() / (n_batch * g)
        return CandidateTargets(forward=f, backward=b, target=f - b, weight=self.weight, const=const)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class PearsonTarget:
    """Pearson correlation with a fixed ``y``, per column, over the rows where ``mask`` holds.

    ``y``'s centred values and norm are computed once; :meth:`correlation` then costs a
    few passes over ``x``. The numerator needs no centring of ``x``: the centred ``y``
    sums to zero over the rows used and is zero elsewhere.
    """

    def __init__(self, y: torch.Tensor, mask: torch.Tensor) -> None:
        with torch.no_grad():
            self.mask = mask.to(y.dtype)
            self.n = self.mask.sum(0).clamp(min=1.0)
            yc = (y - (y * self.mask).sum(0) / self.n) * self.mask
            self.yc = yc
            self.y_norm2 = yc.square().sum(0)

    def correlation(self, x: torch.Tensor) -> torch.Tensor:
        """``(n_genes,)`` correlations; 0 for a column with fewer than two rows or no spread."""
        num = (x * self.yc).sum(0)
        xm = x * self.mask
        x_ss = (xm * x).sum(0) - xm.sum(0).square() / self.n
        den = torch.sqrt(x_ss.clamp(min=0.0) * self.y_norm2)
        return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))

