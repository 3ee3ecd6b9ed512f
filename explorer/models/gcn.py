"""DeepVelo: cell-specific kinetic rates from a graph convolutional network.

Cui, Maan, Taylor & Wang (2022), "A deep learning framework for estimating cell-specific
kinetic rates of RNA velocity" (DeepVelo). Instead of one ``alpha, beta, gamma`` per
gene, every cell gets its own, from a graph convolutional network over the cells' kNN
graph (:mod:`explorer.models._gcn_module`). A gene with several kinetic regimes (the
first pitfall of Bergen et al. 2021, Mol. Syst. Biol. 17:e10282) then gets the right
velocity sign in each, where one ``gamma`` per gene puts one regime's steady-state line
through the other's cells.

The network is trained self-supervised: each cell's velocity should point from the cell
toward the mean of its forward candidates among its nearest neighbours in PCA space
(and away from the backward ones), with a Pearson term that makes the velocity grow with
``u`` and fall with ``s``. Nothing is known of time or of the cell types; the graph and
candidates are the kNN graph that :func:`explorer.pipeline.prepare` stores in
``obsp['distances']``.

Besides the model, this module has :func:`compute_rate_umap`, a UMAP of the cells' rate
vectors as an embedding basis (opt-in: it costs a UMAP).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from explorer._types import InputError, no_velocity_gene, report
from explorer.graph.metrics import velocity_consistency, velocity_consistency_by_type
from explorer.graph.transition import knn_indices
from explorer.keys import Key
from explorer.models.base import Hyperparameters, VelocityResult, require_layers
from explorer.models.dynamical import _dense32, _import_torch, _resolve_device, _torch_sparse
from explorer.models.steady_state import genes_to_fit

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from anndata import AnnData

    from explorer._types import ProgressCallback
    from explorer.models._gcn_module import VeloGCN

logger = logging.getLogger(__name__)

GeneSelection = Literal["all", "velocity_genes"]
Device = Literal["auto", "cpu", "cuda"]

#: up to this many cells a fit is full-batch unless ``batch_size`` is given
_FULL_BATCH_CELLS = 10_000
#: cells per mini-batch above it
_BATCH_CELLS = 1024


class DeepVelo(Hyperparameters):
    """DeepVelo (Cui et al. 2022): per-cell, per-gene ``alpha, beta, gamma`` from a GCN.

    Parameters
    ----------
    genes
        Genes to fit: ``"velocity_genes"`` (those the steady-state model keeps, as the
        dynamical model's default: 4x fewer than ``"all"`` on the pancreas, so 4x less
        time and memory), ``"all"`` (the paper) or a list of names. Genes without
        spread in ``Ms`` or ``Mu`` are fitted but not trusted (``velocity_genes`` False).
    hidden
        Widths of the stacked graph convolutions (the paper: two of 64).
    dropout
        Dropout after each convolution while training (the paper: 0.2).
    n_graph_neighbors
        Nearest cells, the cell itself included, that make a cell's edges in the GCN
        graph (taken from ``obsp['distances']``, then made symmetric; the paper: 20).
    n_candidates
        Nearest cells, the cell itself included, whose other members are the candidate
        future and past states (the paper: 30, so 29 neighbours). At most the
        neighbours ``obsp['distances']`` holds (29 after ``prepare``'s default 30).
    epochs
        Passes over all cells (the paper: 100).
    learning_rate, lr_decay
        Adam's learning rate (with AMSGrad) and its factor per epoch (the paper: 1e-3
        and 0.97). The default 3e-3 is higher than the paper's: here the rates are
        factors on per-gene starting rates, and with 1e-3 100 full-batch steps leave
        them too close to those.
    lambda_u, lambda_s
        Weights of ``corr(v, u)`` and ``corr(v, -s)`` in the Pearson term (the
        paper's ``coeff_u = coeff_s = 1``, relative to its own scaling of the terms).
        The neighbour terms are unit-free here (each gene's squared errors over its mean
        squared displacement), so the weights are not the reference's; the default 0.1
        keeps the term small because it works against per-cell rates: per gene and
        across all cells, ``corr(v, u) + corr(v, -s)`` is largest for
        ``v ~ u / sd(u) - s / sd(s)``, one rate ratio for every cell. On two simulated
        kinetic regimes (``tests/models/test_gcn.py``) the faster regime's clear cells
        got the right sign in 0.78-0.82 (model seeds 0-5) with weight 1 and the
        unspliced term's gradient reaching ``beta``, 0.84-0.89 with that gradient
        stopped (:meth:`~explorer.models._gcn_module.VeloGCN.velocities`) and
        0.89-0.94 with weight 0.1 as well.
    batch_size
        Cells per mini-batch. ``None``: full-batch up to 10,000 cells, 1,024 above. A
        mini-batch computes the rates of its cells from their
        ``(len(hidden) - 1)``-hop neighbourhood only (the first convolution's
        ``A_hat X`` is computed once), so memory per step does not grow with the data.
    cluster_key
        obs column of cell types for the cell-type-wise consistency; skipped (with a
        log message) when the data has none.
    rate_umap
        Also compute a UMAP of the cells' rate vectors (:func:`rate_umap`, seeded by
        ``seed``) into the result's ``obsm['X_rates_umap']``, an embedding basis. Off by
        default: it costs a UMAP (:func:`compute_rate_umap` does the same afterwards).
    seed
        Seed of the weights, dropout and batch order.
    device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.

    Examples
    --------
    >>> result = DeepVelo(epochs=100).fit(adata)  # doctest: +SKIP
    >>> result.to_adata(adata)  # doctest: +SKIP
    >>> compute_rate_umap(adata)  # obsm['X_rates_umap']  # doctest: +SKIP
    """

    name: ClassVar[str] = "deepvelo"
    param_ranges: ClassVar[dict[str, str]] = {
        "hidden": "[1, inf)",
        "dropout": "[0, 1)",
        "n_graph_neighbors": "[1, inf)",
        "n_candidates": "[2, inf)",
        "epochs": "[1, inf)",
        "learning_rate": "(0, inf)",
        "lr_decay": "(0, 1]",
        "lambda_u": "[0, inf)",
        "lambda_s": "[0, inf)",
        "batch_size": "[1, inf)",
    }

    def __init__(
        self,
        *,
        genes: GeneSelection | Sequence[str] = "velocity_genes",
        hidden: tuple[int, ...] = (64, 64),
        dropout: float = 0.2,
        n_graph_neighbors: int = 20,
        n_candidates: int = 30,
        epochs: int = 100,
        learning_rate: float = 3e-3,
        lr_decay: float = 0.97,
        lambda_u: float = 0.1,
        lambda_s: float = 0.1,
        batch_size: int | None = None,
        cluster_key: str = Key.obs.CLUSTERS,
        rate_umap: bool = False,
        seed: int = 0,
        device: Device = "auto",
    ) -> None:
        self.genes = genes
        self.hidden = hidden
        self.dropout = dropout
        self.n_graph_neighbors = n_graph_neighbors
        self.n_candidates = n_candidates
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.lr_decay = lr_decay
        self.lambda_u = lambda_u
        self.lambda_s = lambda_s
        self.batch_size = batch_size
        self.cluster_key = cluster_key
        self.rate_umap = rate_umap
        self.seed = seed
        self.device = device

    # ------------------------------------------------------------------------------ checks

    def _check(self, adata: AnnData) -> None:
        require_layers(adata, self.name)
        if Key.obsp.DISTANCES not in adata.obsp:
            msg = (
                "The deepvelo model needs the kNN graph obsp['distances'] (its GCN graph and "
                f"candidate neighbours); adata.obsp has {sorted(adata.obsp)}. Run "
                "explorer.pipeline.prepare(adata) or explorer.graph.neighbors.compute_neighbors(adata)."
            )
            raise InputError(msg)
        if len(self.hidden) == 0:
            msg = "Expected at least one graph convolution in hidden, e.g. (64, 64); found ()."
            raise InputError(msg)

    def _select_genes(self, adata: AnnData) -> np.ndarray:
        """``(n_vars,)`` mask of the genes to fit (:func:`~explorer.models.steady_state.genes_to_fit`)."""
        return genes_to_fit(adata, self.genes)

    # ------------------------------------------------------------------------------ fit

    def fit(self, adata: AnnData, *, progress: ProgressCallback | None = None) -> VelocityResult:
        """Train the network on layers ``Mu``/``Ms`` and the kNN graph; ``adata`` is left unchanged.

        Returns
        -------
        A :class:`~explorer.models.base.VelocityResult` with the spliced velocity
        ``beta u - gamma s`` and unspliced velocity ``alpha - beta u`` (NaN for genes
        not fitted); ``layers['rate_alpha']``, ``['rate_beta']``, ``['rate_gamma']``:
        each cell's rates, float32, NaN for genes not fitted (``3 x 4 x n_obs x n_vars``
        bytes: 89 MB for 3,696 cells x 2,000 genes); ``gene_params`` with the medians
        over cells ``fit_rate_alpha``, ``fit_rate_beta``, ``fit_rate_gamma``; and per
        cell ``obs['velocity_consistency']`` (mean cosine with the kNN neighbours'
        velocities) and, where ``obs[cluster_key]`` exists,
        ``obs['velocity_consistency_type']`` (mean cosine with all cells of its type),
        both over the velocity genes.

        Raises
        ------
        InputError
            Without layers ``Ms``/``Mu`` or obsp ``distances``, or for unknown genes.
        FitCancelled
            From ``progress``, which is called once per epoch.
        """
        torch = _import_torch()
        from explorer.models._gcn_module import CandidateSearch, VeloGCN

        self._check(adata)
        device = _resolve_device(self.device)
        cols = np.flatnonzero(self._select_genes(adata))
        if len(cols) == 0:
            raise no_velocity_gene()
        n_obs, n_fit = adata.n_obs, len(cols)
        Mu = _dense32(adata.layers[Key.layers.MU][:, cols])
        Ms = _dense32(adata.layers[Key.layers.MS][:, cols])
        distances = adata.obsp[Key.obsp.DISTANCES]
        # column order within a row is free (uniform weights); sorted, as CSR products want
        candidates = np.sort(knn_indices(distances, n_neighbors=self.n_candidates - 1), axis=1)
        graph = knn_indices(distances, n_neighbors=max(self.n_graph_neighbors - 1, 1))
        adjacency = _normalized_adjacency(graph)
        std_u, std_s = Mu.std(0), Ms.std(0)
        spread = (std_u > 0) & (std_s > 0)
        # node features [u, s], each gene over its spread; A_hat X is fixed: computed once
        features = np.hstack([Mu / np.where(std_u > 0, std_u, 1), Ms / np.where(std_s > 0, std_s, 1)])
        first = np.asarray(adjacency @ features, dtype=np.float32)
        del features

        batch = self.batch_size or (n_obs if n_obs <= _FULL_BATCH_CELLS else _BATCH_CELLS)
        batch = min(batch, n_obs)
        n_steps = -(-n_obs // batch)
        logger.info(
            "deepvelo: %d genes x %d cells, %d epochs of %d step(s) on %s",
            n_fit, n_obs, self.epochs, n_steps, device,
        )

        clock = time.perf_counter()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            # one (n_obs, 2 n_genes) copy of [s, u] on the device; S and U are views of it
            X = torch.from_numpy(np.hstack([Ms, Mu])).to(device)
            S, U = X[:, :n_fit], X[:, n_fit:]
            inv_s, inv_u, base = _start(Ms, Mu, candidates, device)
            search = CandidateSearch(torch.from_numpy(candidates).to(device), X, inv_s, inv_u)
            model = VeloGCN(n_fit, base, hidden=self.hidden, dropout=self.dropout).to(device)
            first_t = torch.from_numpy(first).to(device)
            full_batch = batch == n_obs
            full_adj = _torch_sparse(adjacency, device) if full_batch else None
            blocks = _Blocks(adjacency, first_t, model.n_layers, full_adj, device)
            opt = torch.optim.Adam(model.parameters(), lr=self.learning_rate, amsgrad=True)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=self.lr_decay)
            gen = torch.Generator().manual_seed(self.seed)
            history: list[dict[str, float]] = []
            # the Pearson term's targets are fixed data: once for a full batch
            full_corr = _pearson_targets(U, S) if full_batch else None
            total = self.epochs + 1
            for epoch in range(self.epochs):
                model.train()
                order = None if full_batch else torch.randperm(n_obs, generator=gen).to(device)
                sums: dict[str, float] = {}
                for start in range(0, n_obs, batch):
                    if order is None:  # all cells in order: no copies of S, U, candidates
                        cells, u, s, corr = None, U, S, full_corr
                        inputs, adjs = first_t, [full_adj] * (model.n_layers - 1)
                    else:
                        cells = order[start : start + batch]
                        u, s = U[cells], S[cells]
                        inputs, adjs = blocks(cells)
                        corr = _pearson_targets(u, s)
                    v = model.velocities(inputs, adjs, u, s)
                    targets = search.targets(v[:, :n_fit], cells)
                    losses = model.loss(v, targets, *corr, lambda_u=self.lambda_u, lambda_s=self.lambda_s)
                    opt.zero_grad(set_to_none=True)
                    losses["total"].backward()
                    opt.step()
                    share = v.shape[0] / n_obs
                    for k, val in losses.items():
                        sums[k] = sums.get(k, 0.0) + float(val.detach()) * share
                sched.step()
                history.append(sums)
                message = f"epoch {epoch + 1}/{self.epochs}: loss {sums['total']:.4f}"
                report(progress, epoch + 1, total, message)
            train_s = time.perf_counter() - clock

            model.eval()
            alpha_np = np.empty((n_obs, n_fit), dtype=np.float32)
            beta_np, gamma_np = np.empty_like(alpha_np), np.empty_like(alpha_np)
            agreement = _Correlation(n_fit, device)
            with torch.inference_mode():
                for start in range(0, n_obs, batch):
                    cells = torch.arange(start, min(start + batch, n_obs), device=device)
                    a, b, g = model(*blocks(cells), U[cells])
                    sl = slice(start, start + len(cells))
                    alpha_np[sl], beta_np[sl], gamma_np[sl] = (x.float().cpu().numpy() for x in (a, b, g))
                    # how each gene's velocity follows its training target, over all cells
                    v_s = b * U[cells] - g * S[cells]
                    agreement.add(v_s, search.targets(v_s, cells).target[:, :n_fit])
        # learned state, for diagnostics
        self.module_ = model
        self.history_ = history
        self.timings_ = {"train": train_s, "total": time.perf_counter() - clock}
        logger.info("deepvelo: trained in %.1f s", train_s)

        velocity = beta_np * Mu - gamma_np * Ms
        velocity_u = alpha_np - beta_np * Mu
        rates = (alpha_np, beta_np, gamma_np)
        result = self._result(adata, cols, spread, velocity, velocity_u, rates, agreement.value())
        report(progress, total, total, "rates and consistency")
        return result

    def _result(
        self,
        adata: AnnData,
        cols: np.ndarray,
        spread: np.ndarray,
        velocity: np.ndarray,
        velocity_u: np.ndarray,
        rates: tuple[np.ndarray, np.ndarray, np.ndarray],
        displacement_r: np.ndarray,
    ) -> VelocityResult:
        n_obs, n_vars = adata.n_obs, adata.n_vars

        def full(x: np.ndarray) -> np.ndarray:
            out = np.full((n_obs, n_vars), np.nan, dtype=np.float32)
            out[:, cols] = x
            return out

        def per_gene(x: np.ndarray) -> np.ndarray:
            out = np.full(n_vars, np.nan, dtype=np.float32)
            out[cols] = np.median(x, axis=0)
            return out

        velocity_genes = np.zeros(n_vars, dtype=bool)
        velocity_genes[cols] = spread & np.isfinite(velocity).all(0)
        alpha, beta, gamma = rates
        gene_params = pd.DataFrame(
            {
                Key.var.FIT_RATE_ALPHA: per_gene(alpha),
                Key.var.FIT_RATE_BETA: per_gene(beta),
                Key.var.FIT_RATE_GAMMA: per_gene(gamma),
            },
            index=adata.var_names.copy(),
        )
        fit_r = np.full(n_vars, np.nan, dtype=np.float32)
        fit_r[cols] = displacement_r
        gene_params[Key.var.FIT_DISPLACEMENT_R] = fit_r
        trusted = velocity[:, velocity_genes[cols]]
        neighbors = knn_indices(adata.obsp[Key.obsp.DISTANCES])
        obs = {Key.obs.VELOCITY_CONSISTENCY: velocity_consistency(trusted, neighbors)}
        if self.cluster_key in adata.obs:
            obs[Key.obs.VELOCITY_CONSISTENCY_TYPE] = velocity_consistency_by_type(
                trusted, adata.obs[self.cluster_key].to_numpy()
            )
        else:
            logger.info(
                "deepvelo: no obs[%r]; the cell-type-wise consistency is not computed", self.cluster_key
            )
        obsm = None
        if self.rate_umap:
            obsm = {Key.obsm.RATES_UMAP: rate_umap(alpha, beta, gamma, seed=self.seed)}
        return VelocityResult(
            model=self.name,
            params=self.get_params(),
            obs_names=adata.obs_names.copy(),
            var_names=adata.var_names.copy(),
            velocity=full(velocity),
            gene_params=gene_params,
            velocity_genes=velocity_genes,
            # the per-gene goodness of fit: how well the gene's velocity follows its target
            likelihood=gene_params[Key.var.FIT_DISPLACEMENT_R].rename(Key.var.FIT_DISPLACEMENT_R),
            velocity_u=full(velocity_u),
            layers={
                Key.layers.RATE_ALPHA: full(alpha),
                Key.layers.RATE_BETA: full(beta),
                Key.layers.RATE_GAMMA: full(gamma),
            },
            obs=pd.DataFrame(obs, index=adata.obs_names.copy()),
            obsm=obsm,
        )


# ---------------------------------------------------------------------------------- helpers


class _Correlation:
    """Per-gene Pearson correlation over cells of two ``(n_cells, n_genes)`` tensors, fed in batches."""

    def __init__(self, n_genes: int, device: Any) -> None:
        torch = _import_torch()
        self.sums = torch.zeros(5, n_genes, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: Any, y: Any) -> None:
        """Add a batch: the column sums of ``x``, ``y``, ``x^2``, ``y^2`` and ``x y``."""
        torch = _import_torch()
        x, y = x.double(), y.double()
        self.sums += torch.stack([x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0)])
        self.n += x.shape[0]

    def value(self) -> np.ndarray:
        """``(n_genes,)`` float32 correlations; NaN for a gene constant in either tensor."""
        sx, sy, sxx, syy, sxy = (v.cpu().numpy() for v in self.sums)
        n = max(self.n, 1)
        cov = sxy / n - sx * sy / n**2
        var = (sxx / n - (sx / n) ** 2) * (syy / n - (sy / n) ** 2)
        safe = np.sqrt(np.where(var > 0, var, 1.0))
        return np.where(var > 0, cov / safe, np.nan).astype(np.float32)


def _normalized_adjacency(indices: np.ndarray) -> sparse.csr_matrix:
    """``D^-1/2 (A + I) D^-1/2`` of the symmetrised kNN graph given by ``(n_obs, k)`` indices."""
    n, k = indices.shape
    rows = np.repeat(np.arange(n), k)
    A = sparse.csr_matrix((np.ones(n * k, dtype=np.float32), (rows, indices.ravel())), shape=(n, n))
    A = A.maximum(A.T).tolil()
    A.setdiag(1.0)
    A = sparse.csr_matrix(A, dtype=np.float32)
    d = np.asarray(A.sum(1)).ravel()
    inv = sparse.diags((1.0 / np.sqrt(d)).astype(np.float32))
    out = sparse.csr_matrix(inv @ A @ inv, dtype=np.float32)
    out.sort_indices()
    return out


class _Blocks:
    """The inputs of the network for a set of output cells: rows of ``A_hat X`` and ``A_hat`` blocks.

    For ``L`` convolutions the output cells need the convolution ``L - 1`` of their
    neighbours, which needs that of their neighbours' neighbours, and so on down to the
    first, a linear map of the fixed rows ``A_hat X``: a mini-batch takes its
    ``(L - 1)``-hop neighbourhood and no more. A full batch uses the whole matrix.
    """

    def __init__(
        self,
        adjacency: sparse.csr_matrix,
        first: torch.Tensor,
        n_layers: int,
        full: torch.Tensor | None,
        device: torch.device,
    ) -> None:
        self.adjacency = adjacency
        self.first = first
        self.n_layers = n_layers
        self.full = full
        self.device = device

    def __call__(self, cells: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        import torch

        n = self.adjacency.shape[0]
        everything = len(cells) == n and bool((cells == torch.arange(n, device=cells.device)).all())
        if self.full is not None and everything:
            return self.first, [self.full] * (self.n_layers - 1)
        sets = [cells.cpu().numpy()]
        for _ in range(self.n_layers - 1):
            cur = sets[-1]
            sets.append(np.union1d(cur, self.adjacency[cur].indices))
        sets.reverse()  # sets[0]: cells of the first convolution; sets[-1]: the output cells
        adjs = []
        for rows, cols in zip(sets[1:], sets[:-1], strict=True):
            adjs.append(_torch_sparse(self.adjacency[rows][:, cols], self.device))
        first = self.first[torch.from_numpy(sets[0]).to(self.device)]
        return first, adjs


def _pearson_targets(u: torch.Tensor, s: torch.Tensor) -> tuple[Any, Any]:
    """The Pearson term's ``corr(., u)`` and ``corr(., -s)``, over cells with ``u > 0`` resp. ``s > 0``."""
    from explorer.models._gcn_module import PearsonTarget

    return PearsonTarget(u, u > 0), PearsonTarget(-s, s > 0)


def _start(
    Ms: np.ndarray, Mu: np.ndarray, candidates: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-gene displacement scales and starting rates.

    Returns
    -------
    ``1 / rms(s_j - s_i)``, ``1 / rms(u_j - u_i)`` over all candidate pairs, and the
    ``(3, n_genes)`` base rates: ``gamma / beta`` the least-squares slope of ``u`` on
    ``s`` through the origin, ``beta`` such that ``beta (u - slope s)`` has the spread
    of the displacements, and ``alpha_0 = beta mean(u) / 20``.
    """
    import torch

    n, k = candidates.shape
    # sum_j (x_j - x_i)^2 = sum_j x_j^2 - 2 x_i sum_j x_j + k x_i^2, with C the candidate matrix
    ones = np.ones(n * k, dtype=np.float32)
    C = sparse.csr_matrix((ones, candidates.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))

    def rms_displacement(X: np.ndarray) -> np.ndarray:
        X = X.astype(np.float64)
        total = (C @ (X * X)).sum(0) - 2 * (X * (C @ X)).sum(0) + k * (X * X).sum(0)
        return np.sqrt(np.maximum(total, 0.0) / (n * k))

    rms_s, rms_u = rms_displacement(Ms), rms_displacement(Mu)
    S, U = Ms.astype(np.float64), Mu.astype(np.float64)
    tiny = np.finfo(np.float32).tiny
    slope = (U * S).sum(0) / np.maximum((S * S).sum(0), tiny)
    spread = np.sqrt(((U - slope * S) ** 2).mean(0))
    ok = (spread > 0) & (rms_s > 0)
    beta = np.where(ok, rms_s / np.maximum(spread, tiny), 1.0)
    gamma = np.maximum(beta * slope, 1e-6 * beta)
    # alpha's floor (see VeloGCN): a twentieth of the mean transcription
    alpha = np.maximum(0.05 * beta * U.mean(0), 1e-6 * beta)

    def inv(x: np.ndarray) -> torch.Tensor:
        y = np.where(x > 0, 1.0 / np.maximum(x, tiny), 1.0)
        return torch.from_numpy(y.astype(np.float32)).to(device)

    base = torch.from_numpy(np.stack([alpha, beta, gamma]).astype(np.float32)).to(device)
    return inv(rms_s), inv(rms_u), base


def rate_umap(
    alpha: np.ndarray,
    beta: np.ndarray,
    gamma: np.ndarray,
    *,
    n_pcs: int = 30,
    n_neighbors: int = 30,
    min_dist: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """A UMAP of the cells' per-cell rate vectors.

    Each cell's vector is ``log alpha, log beta, log gamma`` of every gene whose rates are
    finite and positive in all cells, each column standardised; then a seeded PCA
    (``n_pcs`` components) and UMAP (umap-learn, ``n_neighbors``, ``min_dist``: scanpy's
    default 0.5). Cells with the same kinetics sit together, whatever their expression.

    Parameters
    ----------
    alpha, beta, gamma
        ``(n_obs, n_genes)`` per-cell rates (NaN for genes not fitted).
    n_pcs, n_neighbors, min_dist
        PCA components and UMAP settings.
    seed
        Random state of the PCA and the UMAP (UMAP then runs single-threaded).

    Returns
    -------
    ``(n_obs, 2)`` float32.
    """
    import umap
    from sklearn.decomposition import PCA

    blocks = [np.asarray(b, dtype=np.float32) for b in (alpha, beta, gamma)]
    genes = np.all([np.isfinite(b).all(0) & (b > 0).all(0) for b in blocks], axis=0)
    if not genes.any():
        msg = "The rates hold no gene with finite positive rates in every cell; refit 'deepvelo'."
        raise InputError(msg)
    X = np.log(np.hstack([b[:, genes] for b in blocks]))
    sd = X.std(0)
    X = (X - X.mean(0)) / np.where(sd > 0, sd, 1)
    n_comp = max(1, min(n_pcs, X.shape[0] - 1, X.shape[1]))
    pcs = PCA(n_components=n_comp, svd_solver="randomized", random_state=seed).fit_transform(X)
    reducer = umap.UMAP(
        n_neighbors=min(n_neighbors, X.shape[0] - 1), min_dist=min_dist, random_state=seed, n_jobs=1
    )
    return reducer.fit_transform(pcs).astype(np.float32)


def compute_rate_umap(
    adata: AnnData,
    *,
    n_pcs: int = 30,
    n_neighbors: int = 30,
    min_dist: float = 0.5,
    seed: int = 0,
) -> None:
    """A UMAP of the cells' per-cell rate vectors, as an embedding basis (opt-in; :func:`rate_umap`).

    Parameters
    ----------
    adata
        Cells with layers ``rate_alpha``, ``rate_beta``, ``rate_gamma`` (a DeepVelo fit
        written with ``to_adata``).
    n_pcs, n_neighbors, min_dist, seed
        As :func:`rate_umap`.

    Returns
    -------
    Nothing; sets obsm ``X_rates_umap`` ``(n_obs, 2)`` float32.

    Raises
    ------
    InputError
        Without the rate layers (fit ``deepvelo`` and write its result first).
    """
    keys = (Key.layers.RATE_ALPHA, Key.layers.RATE_BETA, Key.layers.RATE_GAMMA)
    missing = [k for k in keys if k not in adata.layers]
    if missing:
        msg = (
            f"A UMAP of the rates needs layers {list(keys)}; {missing} not found (adata.layers has "
            f"{sorted(adata.layers)}). Fit the 'deepvelo' model and write its result first."
        )
        raise InputError(msg)
    adata.obsm[Key.obsm.RATES_UMAP] = rate_umap(
        *(adata.layers[k] for k in keys), n_pcs=n_pcs, n_neighbors=n_neighbors, min_dist=min_dist, seed=seed
    )
