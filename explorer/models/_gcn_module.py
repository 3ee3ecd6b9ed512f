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
  alike and the terms are unit-free.
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
        h = self.dropout(torch.relu(self.convs[0](first)))
        for conv, adj in zip(self.convs[1:], adjacency, strict=True):
            h = self.dropout(torch.relu(conv(torch.sparse.mm(adj, h))))
        z = self.head(h).view(-1, 3, self.n_genes)
        factor = nn.functional.softplus(z + _SOFTPLUS_ONE) + _MIN_RATE
        beta = self.base[1] * factor[:, 1]
        gamma = self.base[2] * factor[:, 2]
        # alpha relative to the unspliced steady state beta u (plus a floor, so that cells
        # without u can be induced): the network starts from du/dt = alpha - beta u near 0
        alpha = (beta * u_out + self.base[0]) * factor[:, 0]
        return alpha, beta, gamma

    @staticmethod
    def velocity(
        alpha: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor, u: torch.Tensor, s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Spliced and unspliced velocity: ``beta u - gamma s`` and ``alpha - beta u``."""
        return beta * u - gamma * s, alpha - beta * u

    @staticmethod
    def loss(
        v_s: torch.Tensor,
        v_u: torch.Tensor,
        targets: CandidateTargets,
        corr_u: PearsonTarget,
        corr_s: PearsonTarget,
        *,
        lambda_u: float,
        lambda_s: float,
    ) -> dict[str, torch.Tensor]:
        """The paper's objective on one batch of cells.

        ``corr_u`` and ``corr_s`` are :class:`PearsonTarget` of the batch's ``u`` and
        ``-s`` (fixed data: built once per batch, or once for a full batch).

        Returns
        -------
        ``{"total", "forward", "backward", "pearson"}``: ``L+ + L- + L_pearson`` and its terms.
        """
        fwd = ((v_s - targets.fwd_s) * targets.inv_scale_s).square().mean() + (
            (v_u - targets.fwd_u) * targets.inv_scale_u
        ).square().mean()
        bwd = ((v_s + targets.bwd_s) * targets.inv_scale_s).square().mean() + (
            (v_u + targets.bwd_u) * targets.inv_scale_u
        ).square().mean()
        pearson = -(lambda_u * corr_u.correlation(v_s).mean() + lambda_s * corr_s.correlation(v_s).mean())
        return {"total": fwd + bwd + pearson, "forward": fwd, "backward": bwd, "pearson": pearson}


class CandidateTargets:
    """Mean displacements to the forward and backward candidates of a batch of cells.

    Attributes
    ----------
    fwd_s, fwd_u, bwd_s, bwd_u
        ``(n_batch, n_genes)`` mean of ``x_j - x_i`` over the candidates with positive
        (forward) and negative (backward) cosine between ``s_j - s_i`` and ``v_i``; zero
        where a cell has none.
    inv_scale_s, inv_scale_u
        ``(n_genes,)`` one over each gene's root mean squared displacement.
    """

    __slots__ = ("bwd_s", "bwd_u", "fwd_s", "fwd_u", "inv_scale_s", "inv_scale_u")

    def __init__(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            setattr(self, k, v)


@torch.no_grad()
def candidate_targets(
    v_s: torch.Tensor,
    cells: torch.Tensor,
    candidates: torch.Tensor,
    S: torch.Tensor,
    U: torch.Tensor,
    inv_scale_s: torch.Tensor,
    inv_scale_u: torch.Tensor,
    *,
    S_T: torch.Tensor | None = None,
) -> CandidateTargets:
    """Split each cell's candidates by the sign of their cosine with ``v_s`` and average each side.

    Sparse products keep it to ``O(n_batch k n_genes)`` work without materialising the
    ``(n_batch, k, n_genes)`` displacements: ``s_j . v_i`` for every candidate pair is a
    sampled product (SDDMM), and each side's mean ``x_j`` a sparse-dense product.

    Parameters
    ----------
    v_s
        ``(n_batch, n_genes)`` spliced velocity of the batch (no gradient flows through
        the targets, as in the reference implementation).
    cells
        ``(n_batch,)`` indices of the batch's cells in ``S`` / ``U``.
    candidates
        ``(n_obs, k)`` candidate indices of every cell, each row sorted.
    S, U
        ``(n_obs, n_genes)`` spliced and unspliced abundances of all cells.
    S_T
        ``S.T`` contiguous, if the caller keeps one (else made here).

    Returns
    -------
    The batch's :class:`CandidateTargets`.
    """
    n_batch = v_s.shape[0]
    n_obs = S.shape[0]
    k = candidates.shape[1]
    device = v_s.device
    crow = torch.arange(0, n_batch * k + 1, k, device=device)
    col = candidates[cells].reshape(-1)
    S_T = S.T.contiguous() if S_T is None else S_T
    s_i, u_i = S[cells], U[cells]
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Sparse CSR tensor support is in beta", category=UserWarning
        )
        pattern = torch.sparse_csr_tensor(
            crow, col, torch.ones(n_batch * k, device=device, dtype=v_s.dtype), (n_batch, n_obs),
            check_invariants=False,
        )  # fmt: skip
        # (s_j - s_i) . v_i = s_j . v_i - s_i . v_i: only its sign matters (the cosine's)
        s_j_v = torch.sparse.sampled_addmm(pattern, v_s, S_T, beta=0.0).values().view(n_batch, k)
        dot = s_j_v - (s_i * v_s).sum(1, keepdim=True)
        out = {}
        for side, mask in (("fwd", dot > 0), ("bwd", dot < 0)):
            w = mask.to(v_s.dtype)
            total = w.sum(1, keepdim=True)
            w = w / total.clamp(min=1.0)
            weights = torch.sparse_csr_tensor(
                crow, col, w.reshape(-1), (n_batch, n_obs), check_invariants=False
            )
            has = (total > 0).to(v_s.dtype)
            out[f"{side}_s"] = weights @ S - has * s_i
            out[f"{side}_u"] = weights @ U - has * u_i
    return CandidateTargets(**out, inv_scale_s=inv_scale_s, inv_scale_u=inv_scale_u)


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

