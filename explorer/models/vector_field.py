"""A learned, continuous vector field over the cell state: trajectories, fixed points, perturbations.

RNA-velocity models give a velocity per observed cell; this model learns a smooth field
``dx/dt = f(x)`` over a low-dimensional cell state ``x``, so that one can ask where any
state goes next (Dynamo, Qiu et al. 2022; TrajectoryNet, Tong et al. 2020; OT-CFM and
[SF]2M, Tong et al. 2024). The network and its tensor code are in
:mod:`explorer.models._vf_module`.

**State.** By default ``x = (log1p(Ms) - mean) W``, the first ``n_pcs`` principal
components of the cells' smoothed log abundances over the field's genes. A velocity
``v = dMs/dt`` of any fitted model is carried into that space exactly, by the chain rule
and the loadings: ``dx/dt = (v / (1 + Ms)) W``; and back: the gene-space velocity of the
field is ``(f(x) W^T) * (1 + Ms)``. ``transform="none"`` uses ``Ms`` itself. With
``space=`` an ``obsm`` key (a model's latent space such as VeloVAE's ``cell_state``, or
an embedding) the state is that array, and velocities come from ``obsm['velocity_<key>']``.

**Objectives** (``objective=``): ``"velocity"`` matching (regress ``f(x_i)`` on the cell's
velocity), ``"flow"`` matching (OT-CFM between consecutive time groups: a capture-time
column ``time_key``, or bins of the base model's latent time), or ``"both"`` (the
velocities rescaled to the flow's median speed). Optional Jacobian penalties:
``jacobian_weight`` (``||J||_F^2``) smooths the field, ``jacobian_l1`` (L1 on the
off-diagonal gene coupling ``W J W^T``) makes it sparse.

**Outputs** (:meth:`VectorFieldResult.to_adata`): the field at every cell in the state
space (``obsm['vf_velocity']``), in gene space (``layers['velocity']``, so the velocity
graph, projection and fates of :mod:`explorer.graph` work on it as on any model) and on
the embedding (``obsm['vf_velocity_<basis>']``, and a grid in
``uns['vector_field']['grid']``); divergence, curl and speed per cell; fixed points with
their Jacobian eigenvalues, type and support by the cells' paths (basin, visits). From a
fitted AnnData: :func:`simulate_trajectories`, :func:`perturb` and :func:`gene_jacobian`
(:func:`load_field` rebuilds the network from the file).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.spatial import cKDTree

from explorer._types import FitCancelled, InputError, Progress, model_param, report
from explorer.graph.streamlines import velocity_on_grid
from explorer.keys import Key
from explorer.models import MODELS, get_model
from explorer.models.base import Hyperparameters, VelocityResult, require_layers
from explorer.models.dynamical import _dense32, _import_torch, _resolve_device

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import torch
    from anndata import AnnData

    from explorer._types import FloatArray, ProgressCallback

logger = logging.getLogger(__name__)

Objective = Literal["velocity", "flow", "both"]
GeneChoice = Literal["auto", "velocity_genes", "all"]
Transform = Literal["log1p", "none"]
Device = Literal["auto", "cpu", "cuda"]

#: neighbours that set the local length scale h (median distance to the k-th nearest cell)
_SCALE_NEIGHBORS = 10
#: neighbours averaged when a state is carried onto the embedding
_EMBED_NEIGHBORS = 15
#: a zero of f counts as a fixed point when ||f|| is below this share of the median cell speed
_FIXED_TOL = 1e-2
#: and when it lies within this many h of an observed cell
_FIXED_NEAR = 3.0
#: a path farther than this many h from every cell is pulled fully back toward them (at
#: one h, paths from the simulator's root cells stopped at the branch point, between the
#: branches; that threshold was needed only while the field had no off-cells term)
_ESCAPE = 2.0
#: eigenvalues whose real part is within this share of the largest |eigenvalue| are neutral
_EIG_TOL = 1e-6
#: support of a fixed point by the cells: paths of this many RK4 steps (default dt: one
#: length scale at the median speed each) from a seeded draw of this many cells ...
_SUPPORT_CELLS, _SUPPORT_STEPS = 500, 200
#: ... ending (attractor) or passing (saddle, repeller) within this many h of it, for at
#: least this share of them (1%: 5 of the 500 paths)
_SUPPORT_NEAR, _SUPPORT_SHARE = 2.0, 0.01
#: the gene-coupling L1 penalty is estimated at this many cells of each batch, on this
#: many random rows and as many columns of the gene Jacobian (unbiased; on the pancreas
#: the penalty costs 1.7x the fit's CPU at 16 cells, 2.6x at 64, with the same figures)
_COUPLING_CELLS, _COUPLING_GENES = 16, 64


class VectorField(Hyperparameters):
    """A neural vector field ``dx/dt = f(x)`` over the cell state, trained on velocities and/or time.

    Parameters
    ----------
    base
        Model whose velocity (or latent time) the field learns from. Its fit is used when
        the data holds it (``layers['velocity']`` with ``uns['velocity_params']['model']``
        equal to ``base``); otherwise it is fitted first. ``None``: use whatever
        ``layers['velocity']`` (and ``obs['latent_time']``) the data holds. The default
        is the dynamical model: on the pancreas the stochastic velocity of the Ductal and
        Ngn3 low EP cells has no component toward the endocrine progenitors (cosine of
        their mean velocity with the way to Ngn3 high EP -0.12 and 0.00, against 0.26 and
        0.61 for the dynamical velocity), so a field learned from it makes a sink at the
        Ductal / Ngn3 low EP boundary: an attractor outside the endocrine clusters (README).
    objective
        ``"velocity"`` matching, ``"flow"`` matching (OT-CFM on time groups) or ``"both"``.
    space
        ``"pca"`` (the PCA of ``log1p(Ms)`` over the field's genes) or an ``obsm`` key
        (``"cell_state"``, ``"X_umap"``...) used as the state; velocities then come from
        ``obsm['velocity_<key>']`` (projected, not exact), gene Jacobians and
        perturbations are not available.
    n_pcs
        Dimension of the PCA state.
    genes
        Genes of the PCA state: ``"velocity_genes"`` (the base's trusted genes, whose
        velocity is known), ``"all"``, or ``"auto"`` (velocity genes when a velocity is
        used, all genes for flow matching alone).
    transform
        ``"log1p"``: the state is the PCA of ``log1p(Ms)``; ``"none"``: of ``Ms``.
    time_key
        obs column of times for flow matching (capture times, or any number per cell);
        ``None``: the base model's ``latent_time``.
    n_time_bins
        A time column with more distinct values than this is cut into this many
        quantile bins (each bin's time is its cells' mean time).
    hidden
        Widths of the MLP's hidden layers.
    epochs
        Passes over the cells (one step per ``batch_size`` cells).
    batch_size
        Cells per step (velocity matching) and per time group (flow matching's OT
        minibatches).
    learning_rate
        Adam's learning rate, annealed (cosine) to 5% of it over the epochs.
    jacobian_weight
        Weight of the Jacobian penalty ``||J||_F^2`` (standardised units): smoothness; 0
        turns it off.
    jacobian_l1
        Weight of the L1 penalty on the gene coupling, the off-diagonal entries of the
        Jacobian carried back to genes ``W J W^T`` (of ``J`` itself for an obsm state):
        sparsity, few genes driving each gene's velocity
        (:func:`explorer.models._vf_module.coupling_l1`); 0 turns it off.
    sigma
        Reach of the copies of the training points that teach the field what to do off
        the cells: each copy is displaced in a random direction by a length drawn
        uniformly up to ``sigma`` times the length scale ``h`` (median distance of a
        cell to its 10th nearest cell in the state); 0 turns them off.
    restore
        Pull of those copies back toward their point: a copy displaced by ``h`` is
        taught the point's velocity plus ``restore`` times the median speed toward it
        (see :func:`explorer.models._vf_module.restoring_loss`). Without it the field is
        unconstrained off the cells, in the many directions of the state they do not
        span: on the pancreas its zeros then all lay 6-30 length scales off the data
        and were saddles, and plain-ODE paths diverged; with it the ends of the data
        attract, and paths stay near the cells.
    n_fixed_point_starts
        Cells (seeded draw) the fixed-point search starts from. Each fixed point found
        is then checked against paths from 500 cells (``basin``, ``visits``,
        ``supported``; :func:`fixed_point_table`).
    cluster_key
        obs column naming the cell groups (fixed points and trajectory ends are named
        after the group of their nearest cell).
    basis
        Embedding the field is carried onto (``obsm['X_<basis>']``); skipped if absent.
    seed
        Seed of the weights, batches, OT minibatches and noise.
    device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.

    Examples
    --------
    >>> result = VectorField(base="dynamical").fit(adata)  # doctest: +SKIP
    >>> result.to_adata(adata)  # doctest: +SKIP
    >>> paths = simulate_trajectories(adata, cells=adata.obs["clusters"] == "Ngn3 high EP")  # doctest: +SKIP
    """

    name: ClassVar[str] = "vector_field"
    param_ranges: ClassVar[dict[str, str]] = {
        "n_pcs": "[1, inf)",
        "n_time_bins": "[2, inf)",
        "hidden": "[1, inf)",
        "epochs": "[1, inf)",
        "batch_size": "[2, inf)",
        "learning_rate": "(0, inf)",
        "jacobian_weight": "[0, inf)",
        "jacobian_l1": "[0, inf)",
        "sigma": "[0, inf)",
        "restore": "[0, inf)",
        "n_fixed_point_starts": "[0, inf)",
    }

    def __init__(
        self,
        *,
        base: str | None = "dynamical",
        objective: Objective = "velocity",
        space: str = "pca",
        n_pcs: int = 30,
        genes: GeneChoice = "auto",
        transform: Transform = "log1p",
        time_key: str | None = None,
        n_time_bins: int = 10,
        hidden: tuple[int, ...] = (128, 128),
        epochs: int = 200,
        batch_size: int = 256,
        learning_rate: float = 3e-3,
        jacobian_weight: float = 0.0,
        jacobian_l1: float = 0.0,
        sigma: float = 3.0,
        restore: float = 1.0,
        n_fixed_point_starts: int = 200,
        cluster_key: str = Key.obs.CLUSTERS,
        basis: str = "umap",
        seed: int = 0,
        device: Device = "auto",
    ) -> None:
        self.base = base
        self.objective = objective
        self.space = space
        self.n_pcs = n_pcs
        self.genes = genes
        self.transform = transform
        self.time_key = time_key
        self.n_time_bins = n_time_bins
        self.hidden = hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.jacobian_weight = jacobian_weight
        self.jacobian_l1 = jacobian_l1
        self.sigma = sigma
        self.restore = restore
        self.n_fixed_point_starts = n_fixed_point_starts
        self.cluster_key = cluster_key
        self.basis = basis
        self.seed = seed
        self.device = device

    # ------------------------------------------------------------------------------ inputs

    @property
    def _uses_velocity(self) -> bool:
        return self.objective in ("velocity", "both")

    @property
    def _uses_flow(self) -> bool:
        return self.objective in ("flow", "both")

    def _base_fit(self, adata: AnnData, progress: _Fraction) -> _Base:
        """Return the base model's velocity, trusted genes and latent time, read from ``adata`` or fitted."""
        needs_time = self._uses_flow and self.time_key is None
        if not self._uses_velocity and not needs_time:
            return _Base(None, None, None)
        if self.base is None:
            if self._uses_velocity and Key.layers.VELOCITY not in adata.layers:
                msg = (
                    "vector_field with base=None uses the velocity the data holds, but it has no "
                    f"layers['velocity'] (layers: {sorted(adata.layers)}). Fit a model first, or pass "
                    f"base='stochastic' (or another of {', '.join(m for m in MODELS if m != self.name)})."
                )
                raise InputError(msg)
            return _Base.from_adata(adata)
        if self.base == self.name or self.base not in MODELS:
            valid = ", ".join(repr(m) for m in MODELS if m != self.name)
            msg = f"vector_field: invalid base {self.base!r}. Valid options are: {valid}."
            raise InputError(msg)
        stored = adata.uns.get(Key.uns.VELOCITY_PARAMS, {})
        stored_model = stored.get("model") if isinstance(stored, dict) else None
        if stored_model == self.base and Key.layers.VELOCITY in adata.layers:
            logger.info("vector_field: using the %s velocity the data holds", self.base)
            return _Base.from_adata(adata)
        require_layers(adata, self.name)
        logger.info("vector_field: fitting the base model %s first", self.base)
        result = get_model(self.base, seed=self.seed).fit(adata, progress=progress.base(self.base))
        return _Base(result.velocity, result.velocity_genes, result.latent_time)

    def _check(self, adata: AnnData) -> None:
        if self.space == "pca":
            require_layers(adata, self.name, (Key.layers.MS,))
        elif _obsm_key(adata, self.space) is None:
            msg = (
                f"vector_field: space {self.space!r} is neither 'pca' nor an obsm key; adata.obsm has "
                f"{sorted(adata.obsm)}. Pass space='pca' or one of those."
            )
            raise InputError(msg)
        if self._uses_flow and self.time_key is not None and self.time_key not in adata.obs:
            msg = (
                f"vector_field: time_key {self.time_key!r} is not an obs column; the obs columns are "
                f"{list(adata.obs.columns)}. Pass the column of capture times, or time_key=None to use "
                "the base model's latent time."
            )
            raise InputError(msg)
        if len(self.hidden) == 0:
            msg = "Expected at least one hidden layer in hidden, e.g. (128, 128); found ()."
            raise InputError(msg)

    def _times(self, adata: AnnData, base: _Base) -> np.ndarray:
        if self.time_key is not None:
            values = adata.obs[self.time_key]
            try:
                t = np.asarray(pd.to_numeric(values.astype(str) if values.dtype == "category" else values))
            except (ValueError, TypeError):
                t = None
            if t is None or not np.isfinite(t.astype(float)).all():
                msg = (
                    f"vector_field: time_key {self.time_key!r} must hold a finite number per cell "
                    f"(capture times); found values such as {list(values.astype(str).unique()[:5])}."
                )
                raise InputError(msg)
            return t.astype(np.float64)
        if base.latent_time is None:
            msg = (
                f"Flow matching needs times: the base model {self.base!r} gives no latent time and no "
                "time_key was given. Pass time_key='<obs column of capture times>' or a base with a "
                "latent time (base='dynamical' or 'velovae')."
            )
            raise InputError(msg)
        return np.asarray(base.latent_time, dtype=np.float64)

    # ------------------------------------------------------------------------------ fit

    def fit(self, adata: AnnData, *, progress: ProgressCallback | None = None) -> VectorFieldResult:
        """Train the field on ``adata`` (left unchanged) and compute what it gives.

        Returns
        -------
        A :class:`VectorFieldResult`. ``to_adata`` writes layers ``velocity`` (the field in
        gene space, NaN outside its genes), obs ``vf_divergence``, ``vf_curl``,
        ``vf_speed``, obsm ``vf_state``, ``vf_velocity`` and ``vf_velocity_<basis>``,
        varm ``vf_loadings`` (PCA state) and uns ``vector_field`` (weights, state
        definition, time step, fixed points, grid).

        Raises
        ------
        InputError
            Missing layers, an unknown base or space, no times for flow matching.
        FitCancelled
            From ``progress``, which is called once per epoch.
        """
        torch = _import_torch()
        from explorer.models._vf_module import (
            VectorFieldMLP,
            coupling_l1,
            flow_loss,
            flow_targets,
            jacobian_penalty,
            restoring_loss,
            velocity_loss,
        )

        self._check(adata)
        base_runs = (
            self.base is not None and self._uses_velocity or (self._uses_flow and self.time_key is None)
        )
        frac = _Fraction(progress, 0.0)
        base = self._base_fit(adata, frac)
        frac = _Fraction(progress, 0.3 if base_runs else 0.0)
        device = _resolve_device(self.device)
        state = self._state(adata, base)
        x = state.x
        n_obs, dim = x.shape
        tree = cKDTree(x)
        h = _length_scale(tree, x)

        v = state.v
        groups = None
        if self._uses_flow:
            groups = _TimeGroups.build(self._times(adata, base), self.n_time_bins)
        rng = np.random.default_rng(self.seed)
        flow_speed = None
        if groups is not None:
            x0, x1, dts = groups.sample(x, rng, self.batch_size)
            flow_speed = np.sqrt((((x1 - x0) / dts) ** 2).sum(1))
        if v is not None and flow_speed is not None:
            # both objectives: velocities in the flow's time unit (same median speed)
            v_speed = np.median(np.linalg.norm(v, axis=1))
            v = v * (np.median(flow_speed) / max(v_speed, 1e-30))
        targets = v if v is not None else (x1 - x0) / dts
        speed = np.sqrt((targets**2).mean(0)).astype(np.float32)
        speed = np.maximum(speed, 1e-6 * max(float(speed.max()), 1e-30))
        spread = np.maximum(x.std(0), 1e-6 * max(float(x.std(0).max()), 1e-30)).astype(np.float32)

        batch = min(self.batch_size, n_obs)
        n_steps = -(-n_obs // batch)
        total = self.epochs + 2  # the epochs, fixed points, the rest
        history: list[float] = []
        clock = time.perf_counter()
        logger.info(
            "vector_field: %d cells in %d dimensions, objective %s, %d epochs of %d steps on %s",
            n_obs,
            dim,
            self.objective,
            self.epochs,
            n_steps,
            device,
        )
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            _one_thread(device),
        ):
            torch.manual_seed(self.seed)
            gen = torch.Generator().manual_seed(self.seed)
            X = torch.from_numpy(x).to(device)
            V = torch.from_numpy(v.astype(np.float32)).to(device) if v is not None else None
            model = VectorFieldMLP(
                dim, X.mean(0), torch.from_numpy(spread), torch.from_numpy(speed), hidden=self.hidden
            ).to(device)
            v_norm = float((V**2).sum(1).mean()) if V is not None else 1.0
            f_norm = float((flow_speed**2).mean()) if flow_speed is not None else 1.0
            jac_scale = torch.from_numpy(spread / speed).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=self.learning_rate)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=self.epochs * n_steps, eta_min=0.05 * self.learning_rate
            )
            sigma = self.sigma * h
            # the pull back toward the cells: a point displaced by h returns at `restore`
            # times the median speed
            median_speed = float(np.median(np.linalg.norm(targets, axis=1)))
            rate = self.restore * median_speed / h
            # the coupling penalty's unit: a typical Jacobian entry, the median speed per h
            coupling_unit = max(median_speed / h, 1e-30)
            coupling_w = (
                torch.from_numpy(state.W).to(device) if state.W is not None and self.jacobian_l1 > 0 else None
            )
            for epoch in range(self.epochs):
                model.train()
                order = torch.randperm(n_obs, generator=gen)
                total_loss = 0.0
                for step in range(n_steps):
                    loss = torch.zeros((), device=device)
                    cells = order[step * batch : (step + 1) * batch].to(device)
                    points = []
                    if V is not None:
                        loss = loss + velocity_loss(model, X[cells], V[cells], v_norm)
                        points.append((X[cells], V[cells], v_norm))
                    if groups is not None:
                        a, b, dt = groups.sample(x, rng, batch)
                        xs, target = flow_targets(
                            torch.from_numpy(a).to(device),
                            torch.from_numpy(b).to(device),
                            torch.from_numpy(dt.astype(np.float32)).to(device),
                            generator=gen,
                        )
                        loss = loss + flow_loss(model, xs, target, f_norm)
                        points.append((xs, target, f_norm))
                    if sigma > 0:
                        for pts, tgt, norm in points:
                            loss = loss + restoring_loss(
                                model, pts, tgt, sigma=sigma, rate=rate, norm=norm, generator=gen
                            )
                    if self.jacobian_weight > 0:
                        loss = loss + self.jacobian_weight * jacobian_penalty(
                            model, X[cells], scale=jac_scale, generator=gen
                        )
                    if self.jacobian_l1 > 0:
                        loss = loss + self.jacobian_l1 * coupling_l1(
                            model,
                            X[cells[:_COUPLING_CELLS]],
                            loadings=coupling_w,
                            rate=coupling_unit,
                            n_genes=_COUPLING_GENES,
                            generator=gen,
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total_loss += float(loss.detach()) / n_steps
                history.append(total_loss)
                frac.at((epoch + 1) / total, f"epoch {epoch + 1}/{self.epochs}: loss {total_loss:.4f}")
            train_s = time.perf_counter() - clock
            model.eval()
            fitted = _Fitted(model, device, x, tree, h)
            f_cells = fitted.field_at(x)
            speed_cells = np.linalg.norm(f_cells, axis=1)
            dt_default = h / max(float(np.median(speed_cells)), 1e-30)
            div, curl = fitted.divergence_curl(x)
            frac.at((self.epochs + 1) / total, "fixed points")
            fixed = fitted.fixed_points(
                n_starts=self.n_fixed_point_starts, seed=self.seed, speed=float(np.median(speed_cells))
            )
            fixed.update(_cell_support(fixed, model, device, x, tree, h, dt_default, seed=self.seed))
        self.module_ = model
        self.history_ = history
        self.timings_ = {"train": train_s, "total": time.perf_counter() - clock}
        logger.info("vector_field: trained in %.1f s", train_s)

        clusters = _labels(adata, self.cluster_key)
        basis_key = Key.obsm.embedding(self.basis)
        emb = np.asarray(adata.obsm[basis_key], dtype=np.float64)[:, :2] if basis_key in adata.obsm else None
        obsm: dict[str, np.ndarray] = {Key.obsm.VF_STATE: x, Key.obsm.VF_VELOCITY: f_cells.astype(np.float32)}
        grid = None
        if emb is not None:
            mapper = _EmbeddingMap(tree, emb, h)
            delta = dt_default
            v_emb = (mapper(x + delta * f_cells) - mapper(x)) / delta
            obsm[Key.obsm.vf_velocity(basis_key)] = v_emb.astype(np.float32)
            g = velocity_on_grid(emb, v_emb)
            grid = {"basis": basis_key, "x": g.x, "y": g.y, "u": g.u, "v": g.v}
            fixed["embedding"] = (
                mapper(fixed["state"]).astype(np.float32)
                if len(fixed["state"])
                else np.zeros((0, 2), np.float32)
            )
        nearest = tree.query(fixed["state"])[1] if len(fixed["state"]) else np.zeros(0, dtype=int)
        fixed["cell"] = np.asarray(adata.obs_names[nearest], dtype=str)
        fixed["cluster"] = np.asarray(clusters[nearest], dtype=str) if clusters is not None else fixed["cell"]

        velocity, velocity_genes, loadings = self._gene_velocity(adata, state, f_cells)
        payload = {
            "space": state.space,
            "transform": self.transform,
            "genes": np.asarray(state.genes, dtype=str),
            "mean": state.mean,
            "hidden": np.asarray(self.hidden, dtype=np.int64),
            "weights": {k.replace(".", "_"): t.detach().cpu().numpy() for k, t in model.state_dict().items()},
            "weight_names": np.asarray(list(model.state_dict()), dtype=str),
            "dt": float(dt_default),
            "length_scale": float(h),
            "median_speed": float(np.median(speed_cells)),
            "cluster_key": self.cluster_key,
            "fixed_points": fixed,
            "history": np.asarray(history, dtype=np.float32),
            "train_seconds": float(train_s),
        }
        if grid is not None:
            payload["grid"] = grid
        frac.at(1.0, "done")
        obs = pd.DataFrame(
            {
                Key.obs.VF_DIVERGENCE: div,
                Key.obs.VF_CURL: curl,
                Key.obs.VF_SPEED: speed_cells.astype(np.float32),
            },
            index=adata.obs_names.copy(),
        )
        return VectorFieldResult(
            model=self.name,
            params=self.get_params(),
            obs_names=adata.obs_names.copy(),
            var_names=adata.var_names.copy(),
            velocity=velocity,
            gene_params=pd.DataFrame(index=adata.var_names.copy()),
            velocity_genes=velocity_genes,
            latent_time=base.latent_time,
            obs=obs,
            obsm=obsm,
            field_data=payload,
            loadings=loadings,
        )

    # ------------------------------------------------------------------------------ state

    def _state(self, adata: AnnData, base: _Base) -> _State:
        if self.space != "pca":
            key = _obsm_key(adata, self.space)
            x = np.ascontiguousarray(np.asarray(adata.obsm[key], dtype=np.float32))
            v = None
            if self._uses_velocity:
                vkey = Key.obsm.velocity(key) if key.startswith("X_") else f"velocity_{key}"
                if vkey not in adata.obsm:
                    msg = (
                        f"vector_field: velocity matching in space {key!r} needs the velocity in that "
                        f"space, obsm[{vkey!r}], which is absent (obsm has {sorted(adata.obsm)}). Project "
                        "it first, use space='pca' (exact), or objective='flow'."
                    )
                    raise InputError(msg)
                v = np.asarray(adata.obsm[vkey], dtype=np.float32)
            return _State(
                x=x, v=v, space=key, genes=np.zeros(0, dtype=str), cols=None, W=None, mean=np.zeros(0)
            )
        velocity = base.velocity
        choice = self.genes
        if choice == "auto":
            choice = "velocity_genes" if self._uses_velocity else "all"
        Ms = adata.layers[Key.layers.MS]
        spread = _column_std(Ms) > 0
        mask = spread.copy()
        if velocity is not None:
            mask &= np.isfinite(velocity).all(0)
        if choice == "velocity_genes":
            if base.velocity_genes is None:
                msg = (
                    "vector_field: genes='velocity_genes' needs a velocity fit; "
                    f"pass {model_param('genes', 'all')}."
                )
                raise InputError(msg)
            mask &= np.asarray(base.velocity_genes, dtype=bool)
        cols = np.flatnonzero(mask)
        if len(cols) < 2:  # noqa: PLR2004
            msg = (
                f"vector_field: found {len(cols)} usable gene(s) for the PCA state ({choice}, with spread "
                "in Ms and a finite velocity); expected at least 2. "
                f"Pass {model_param('genes', 'all')} or fit another base."
            )
            raise InputError(msg)
        S = _dense32(Ms[:, cols]).astype(np.float64)
        T = np.log1p(S) if self.transform == "log1p" else S
        mean = T.mean(0)
        k = max(1, min(self.n_pcs, len(cols), adata.n_obs - 1))
        W = _pca_loadings(T - mean, k)
        x = ((T - mean) @ W).astype(np.float32)
        v = None
        if self._uses_velocity:
            dv = np.nan_to_num(np.asarray(velocity[:, cols], dtype=np.float64))
            if self.transform == "log1p":
                dv = dv / (1.0 + S)
            v = (dv @ W).astype(np.float32)
        return _State(x=x, v=v, space="pca", genes=np.asarray(adata.var_names[cols], dtype=str), cols=cols,
                      W=W.astype(np.float32), mean=mean.astype(np.float32))  # fmt: skip

    def _gene_velocity(
        self, adata: AnnData, state: _State, f_cells: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        n_obs, n_vars = adata.n_obs, adata.n_vars
        velocity = np.full((n_obs, n_vars), np.nan, dtype=np.float32)
        genes = np.zeros(n_vars, dtype=bool)
        if state.cols is None:
            return velocity, genes, None
        dv = f_cells.astype(np.float64) @ state.W.T.astype(np.float64)
        if self.transform == "log1p":
            dv = dv * (1.0 + _dense32(adata.layers[Key.layers.MS][:, state.cols]))
        velocity[:, state.cols] = dv
        genes[state.cols] = True
        loadings = np.zeros((n_vars, state.W.shape[1]), dtype=np.float32)
        loadings[state.cols] = state.W
        return velocity, genes, loadings


# ---------------------------------------------------------------------------------- result


@dataclass(frozen=True, slots=True)
class VectorFieldResult(VelocityResult):
    """A :class:`~explorer.models.base.VelocityResult` with the field itself.

    Attributes
    ----------
    field_data
        What ``uns['vector_field']`` holds: network weights, state definition (space,
        transform, genes, mean), time step ``dt``, length scale, fixed points, grid.
    loadings
        ``(n_vars, n_pcs)`` loadings of the PCA state (``varm['vf_loadings']``; zero
        rows for genes outside the state), or None for an ``obsm`` state.
    """

    field_data: dict[str, Any] = field(default_factory=dict)
    loadings: FloatArray | None = None

    def to_adata(self, adata: AnnData, *, keep_derived: bool = False) -> None:
        """Write as :meth:`VelocityResult.to_adata`, plus uns ``vector_field`` and varm ``vf_loadings``."""
        VelocityResult.to_adata(self, adata, keep_derived=keep_derived)
        adata.uns[Key.uns.VECTOR_FIELD] = self.field_data
        if self.loadings is not None:
            adata.varm[Key.varm.VF_LOADINGS] = self.loadings
        elif Key.varm.VF_LOADINGS in adata.varm:
            del adata.varm[Key.varm.VF_LOADINGS]


# ---------------------------------------------------------------------------------- helpers


@dataclass(frozen=True, slots=True)
class _Base:
    velocity: np.ndarray | None
    velocity_genes: np.ndarray | None
    latent_time: np.ndarray | None

    @classmethod
    def from_adata(cls, adata: AnnData) -> _Base:
        velocity = None
        if Key.layers.VELOCITY in adata.layers:
            velocity = _dense32(adata.layers[Key.layers.VELOCITY])
        genes = None
        if velocity is not None:
            genes = (
                adata.var[Key.var.VELOCITY_GENES].to_numpy(dtype=bool)
                if Key.var.VELOCITY_GENES in adata.var
                else np.isfinite(velocity).all(0)
            )
        t = adata.obs[Key.obs.LATENT_TIME].to_numpy(np.float64) if Key.obs.LATENT_TIME in adata.obs else None
        return cls(velocity, genes, t)


@dataclass(frozen=True, slots=True)
class _State:
    x: np.ndarray
    v: np.ndarray | None
    space: str
    genes: np.ndarray
    cols: np.ndarray | None
    W: np.ndarray | None
    mean: np.ndarray


class _Fraction:
    """Progress of the whole fit as a fraction: the base fit (when it runs) fills the first 30%."""

    SCALE = 1000

    def __init__(self, progress: ProgressCallback | None, start: float) -> None:
        self.progress, self.start = progress, start

    def at(self, fraction: float, message: str) -> None:
        done = int(self.SCALE * (self.start + (1 - self.start) * fraction))
        report(self.progress, done, self.SCALE, message)

    def base(self, name: str) -> ProgressCallback | None:
        if self.progress is None:
            return None

        def forward(p: Progress) -> None:
            report(self.progress, int(self.SCALE * 0.3 * p.fraction), self.SCALE, f"base {name}: {p.message}")

        return forward


@dataclass(frozen=True, slots=True)
class _TimeGroups:
    """Cells grouped by time: consecutive groups are paired for flow matching."""

    members: list[np.ndarray]
    times: np.ndarray

    @classmethod
    def build(cls, t: np.ndarray, n_bins: int) -> _TimeGroups:
        values = np.unique(t)
        if len(values) <= n_bins:
            labels = np.searchsorted(values, t)
        else:
            edges = np.quantile(t, np.linspace(0, 1, n_bins + 1)[1:-1])
            labels = np.searchsorted(np.unique(edges), t, side="right")
        members = [np.flatnonzero(labels == g) for g in np.unique(labels)]
        members = [m for m in members if len(m)]
        times = np.asarray([t[m].mean() for m in members])
        if len(members) < 2:  # noqa: PLR2004
            msg = f"Flow matching needs at least two time groups; the times hold {len(members)}."
            raise InputError(msg)
        return cls(members, times)

    def sample(self, x: np.ndarray, rng: np.random.Generator, m: int) -> tuple[np.ndarray, ...]:
        """OT-paired ``(x0, x1, dt)``: ``m`` cells of each group and of the next, paired exactly."""
        from explorer.models._vf_module import ot_pairs

        x0s, x1s, dts = [], [], []
        for g in range(len(self.members) - 1):
            a, b = self.members[g], self.members[g + 1]
            ia = rng.choice(a, m, replace=len(a) < m)
            ib = rng.choice(b, m, replace=len(b) < m)
            perm = ot_pairs(x[ia], x[ib])
            x0s.append(x[ia])
            x1s.append(x[ib[perm]])
            dts.append(np.full((m, 1), self.times[g + 1] - self.times[g]))
        return np.concatenate(x0s), np.concatenate(x1s), np.concatenate(dts)


@contextmanager
def _one_thread(device: Any) -> Iterator[None]:
    """Run torch's CPU ops on one thread, then restore the count.

    The field is a small MLP on batches of a few hundred cells: its matrix products are
    far too small to share, and on a loaded 2-core machine two OpenMP threads made each
    training step 35 times slower in CPU time (72 ms against 2 ms, measured) than one.
    """
    import torch

    if device is not None and getattr(device, "type", device) == "cuda":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _obsm_key(adata: AnnData, space: str) -> str | None:
    for key in (space, Key.obsm.embedding(space)):
        if key in adata.obsm:
            return key
    return None


def _column_std(matrix: Any) -> np.ndarray:
    if sparse.issparse(matrix):
        m = np.asarray(matrix.mean(0)).ravel()
        m2 = np.asarray(matrix.multiply(matrix).mean(0)).ravel()
        return np.sqrt(np.maximum(m2 - m * m, 0))
    return np.asarray(matrix).std(0)


def _pca_loadings(centered: np.ndarray, k: int) -> np.ndarray:
    """``(n_genes, k)`` orthonormal loadings of the first ``k`` principal components.

    Eigenvectors of the covariance (``n_genes x n_genes``, accumulated in blocks of
    cells), each signed so that its largest loading is positive: deterministic, no seed.
    """
    cov = np.zeros((centered.shape[1], centered.shape[1]))
    for i in range(0, len(centered), 8192):
        block = centered[i : i + 8192]
        cov += block.T @ block
    vals, vecs = np.linalg.eigh(cov / max(len(centered) - 1, 1))
    vecs = vecs[:, np.argsort(vals)[::-1][:k]]
    signs = np.sign(vecs[np.abs(vecs).argmax(0), np.arange(vecs.shape[1])])
    return vecs * np.where(signs == 0, 1.0, signs)


def _length_scale(tree: cKDTree, x: np.ndarray) -> float:
    k = min(_SCALE_NEIGHBORS + 1, len(x))
    d, _ = tree.query(x, k=k)
    d = np.atleast_2d(d)
    h = float(np.median(d[:, -1]))
    return h if h > 0 else float(np.abs(x).max() or 1.0)


def _labels(adata: AnnData, key: str | None) -> np.ndarray | None:
    if key is None or key not in adata.obs:
        return None
    return adata.obs[key].astype(str).to_numpy()


class _EmbeddingMap:
    """Carry states onto the embedding: Gaussian-weighted mean of the 15 nearest cells' positions.

    The width is the state's length scale ``h``; a point far from every cell takes the
    position of the nearest few (weights are relative to the nearest cell's distance).
    """

    def __init__(self, tree: cKDTree, embedding: np.ndarray, h: float) -> None:
        self.tree, self.embedding, self.h = tree, embedding, h

    def __call__(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        k = min(_EMBED_NEIGHBORS, self.tree.n)
        d, idx = self.tree.query(points, k=k)
        d, idx = d.reshape(len(points), k), idx.reshape(len(points), k)
        w = np.exp(-0.5 * (d**2 - d[:, :1] ** 2) / self.h**2)
        w /= w.sum(1, keepdims=True)
        return np.einsum("nk,nkd->nd", w, self.embedding[idx])


class _Fitted:
    """A trained field with the cells' states: evaluation, Jacobians, fixed points, integration."""

    def __init__(self, model: Any, device: Any, x: np.ndarray, tree: cKDTree, h: float) -> None:
        self.model, self.device, self.x, self.tree, self.h = model, device, x, tree, h

    def _t(self, a: np.ndarray) -> torch.Tensor:
        import torch

        return torch.as_tensor(np.asarray(a, dtype=np.float32), device=self.device)

    def field_at(self, points: np.ndarray, *, chunk: int = 65536) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(points), chunk):
                out.append(self.model(self._t(points[i : i + chunk])).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.x.shape[1]), np.float32)

    def jacobians(self, points: np.ndarray) -> np.ndarray:
        from explorer.models._vf_module import jacobians

        return jacobians(self.model, self._t(points)).detach().cpu().numpy()

    def divergence_curl(self, points: np.ndarray, *, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
        """Per point: trace of ``J`` and ``sqrt(2) ||(J - J^T)/2||_F`` (``|curl|`` in two dimensions)."""
        div, curl = [], []
        for i in range(0, len(points), chunk):
            J = self.jacobians(points[i : i + chunk]).astype(np.float64)
            div.append(np.trace(J, axis1=1, axis2=2))
            A = 0.5 * (J - J.transpose(0, 2, 1))
            curl.append(np.sqrt(2.0) * np.sqrt((A**2).sum((1, 2))))
        return np.concatenate(div).astype(np.float32), np.concatenate(curl).astype(np.float32)

    def fixed_points(self, *, n_starts: int, seed: int, speed: float) -> dict[str, np.ndarray]:
        """Zeros of the field near the cells, deduplicated, with Jacobian eigenvalues and type."""
        from explorer.models._vf_module import fixed_points

        dim = self.x.shape[1]
        empty = {
            "state": np.zeros((0, dim), np.float32),
            "residual": np.zeros(0, np.float32),
            "eig_real": np.zeros((0, dim), np.float32),
            "eig_imag": np.zeros((0, dim), np.float32),
            "type": np.zeros(0, dtype="<U10"),
        }
        if n_starts == 0:
            return empty
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(self.x), min(n_starts, len(self.x)), replace=False)
        points, res = fixed_points(self.model, self._t(self.x[idx]))
        points, res = points.detach().cpu().numpy().astype(np.float64), res.detach().cpu().numpy()
        near = self.tree.query(points)[0] <= _FIXED_NEAR * self.h
        ok = np.isfinite(res) & (res <= _FIXED_TOL * speed) & near
        points, res = points[ok], res[ok]
        kept: list[int] = []
        for i in np.argsort(res):
            if all(np.linalg.norm(points[i] - points[j]) > self.h for j in kept):
                kept.append(int(i))
        if not kept:
            return empty
        points, res = points[kept], res[kept]
        J = self.jacobians(points).astype(np.float64)
        eig = np.linalg.eigvals(J)
        order = np.argsort(-eig.real, axis=1)
        eig = np.take_along_axis(eig, order, axis=1)
        return {
            "state": points.astype(np.float32),
            "residual": res.astype(np.float32),
            "eig_real": eig.real.astype(np.float32),
            "eig_imag": eig.imag.astype(np.float32),
            "type": np.asarray([classify(e) for e in eig], dtype="<U10"),
        }


def _cell_support(
    fixed: dict[str, np.ndarray],
    model: Any,
    device: Any,
    x: np.ndarray,
    tree: cKDTree,
    h: float,
    dt: float,
    *,
    seed: int,
) -> dict[str, np.ndarray]:
    """Whether the cells support each fixed point: ``basin``, ``visits`` (shares) and ``supported``.

    A zero of the learned field need not be one of the cells' dynamics: the off-cells
    term and the network's smoothing can make one where no cell goes (on the pancreas,
    an attractor in Beta that no path reached). So paths are integrated as
    :func:`simulate_trajectories` does (:data:`_SUPPORT_STEPS` steps of the default
    ``dt``) from a seeded draw of :data:`_SUPPORT_CELLS` cells; ``basin`` is the share
    of them that end within :data:`_SUPPORT_NEAR` length scales of the point (and nearer
    it than any other), ``visits``
    the share that pass that close at any step. An attractor is supported when its
    basin, a saddle or repeller when its visits, reach :data:`_SUPPORT_SHARE`.
    """
    states = np.asarray(fixed["state"], dtype=np.float64)
    k = len(states)
    if k == 0:
        none = np.zeros(0, np.float32)
        return {"basin": none, "visits": none.copy(), "supported": np.zeros(0, bool)}
    rng = np.random.default_rng(seed)
    starts = x[np.sort(rng.choice(len(x), min(_SUPPORT_CELLS, len(x)), replace=False))]
    placeholder = np.zeros(0, dtype=str)
    runner = FittedField(
        model=model, device=device, states=x, dt=dt, length_scale=h, genes=placeholder, cols=None,
        loadings=None, mean=np.zeros(0, np.float32), transform="none", tree=tree,
    )  # fmt: skip
    paths = runner.integrate(starts, n_steps=_SUPPORT_STEPS).astype(np.float64)
    near = _SUPPORT_NEAR * h
    closest = np.full((len(starts), k), np.inf)
    for step in range(paths.shape[1]):
        d = np.linalg.norm(paths[:, step, None, :] - states[None], axis=2)
        closest = np.minimum(closest, d)
    end = np.linalg.norm(paths[:, -1, None, :] - states[None], axis=2)
    basin = ((end <= near) & (end == end.min(1, keepdims=True))).mean(0)
    visits = (closest <= near).mean(0)
    attractor = np.asarray(fixed["type"]) == "attractor"
    supported = np.where(attractor, basin >= _SUPPORT_SHARE, visits >= _SUPPORT_SHARE)
    return {"basin": basin.astype(np.float32), "visits": visits.astype(np.float32), "supported": supported}


def classify(eigenvalues: np.ndarray) -> str:
    """``"attractor"`` (all real parts < 0), ``"repeller"`` (all > 0), ``"saddle"`` (both signs).

    Real parts within ``1e-6`` of the largest ``|eigenvalue|`` of zero count as neither;
    a point with only such and negative ones is ``"attractor"``-like and reported as
    ``"neutral"`` when none is negative.
    """
    re = np.real(eigenvalues)
    tol = _EIG_TOL * max(float(np.abs(eigenvalues).max()), 1e-30)
    pos, neg = (re > tol).any(), (re < -tol).any()
    if pos and neg:
        return "saddle"
    if pos:
        return "repeller"
    if neg:
        return "attractor"
    return "neutral"


# ---------------------------------------------------------------------------------- a fitted field


@dataclass
class FittedField:
    """The field of a fitted AnnData, rebuilt from ``uns['vector_field']`` (:func:`load_field`).

    Attributes
    ----------
    states
        ``(n_obs, dim)`` the cells' states.
    dt
        The default time step: one step moves a cell at the median speed by the length scale.
    length_scale
        Median distance of a cell to its 10th nearest cell in the state space.
    genes, cols, loadings, mean, transform
        The PCA state's genes (names and columns of ``adata``), loadings ``(n_genes, dim)``,
        mean and transform; ``cols`` is None for an ``obsm`` state.
    """

    model: Any
    device: Any
    states: np.ndarray
    dt: float
    length_scale: float
    genes: np.ndarray
    cols: np.ndarray | None
    loadings: np.ndarray | None
    mean: np.ndarray
    transform: str
    tree: cKDTree = field(repr=False)

    def fitted(self) -> _Fitted:
        """Return the evaluator behind the methods below (field, Jacobians, divergence and curl)."""
        return _Fitted(self.model, self.device, self.states, self.tree, self.length_scale)

    def field_at(self, points: np.ndarray) -> np.ndarray:
        """``(n, dim)`` field at ``(n, dim)`` states."""
        return self.fitted().field_at(points)

    def integrate(
        self,
        starts: np.ndarray,
        *,
        n_steps: int,
        dt: float | None = None,
        on_data: bool = True,
        hold: int | None = None,
        level: np.ndarray | None = None,
        check: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """``(n, n_steps + 1, dim)`` RK4 paths from ``(n, dim)`` states.

        Parameters
        ----------
        on_data
            After each RK4 step, pull the point toward the Gaussian-weighted mean of its
            15 nearest cells' states (width: the length scale), less the pull's part
            along the step: a projected integrator that keeps paths on the cells without
            slowing them. Paths of the plain ODE (``False``) stay near the cells where
            the off-cells term (``sigma``, ``restore``) holds them (the pancreas), but
            can drift to a zero of the field beyond the end of the data (the
            simulator's observed sample). A full pull (toward the mean, along the step
            too) traps paths at a branch point, between the two branches' cells.
        hold
            A position among :attr:`genes` that is held: its velocity is removed from
            the field (carried back by the same loadings) and, after each step, its
            coordinate ``W_g . x`` is reset to ``level`` (``(n,)``, one per path), so the
            gene stays where it was put (a sustained knock-down or overexpression).
        """
        import torch

        from explorer.models._vf_module import rk4

        step = self.dt if dt is None else dt
        model = self.model
        w = None
        if hold is not None:
            w = torch.as_tensor(self.loadings[hold], dtype=torch.float32, device=self.device)

            def held(x: torch.Tensor) -> torch.Tensor:
                f = self.model(x)
                return f - (f @ w)[:, None] * w[None, :]

            model = held
        project = _EmbeddingMap(self.tree, self.states.astype(np.float64), self.length_scale)
        x = np.asarray(starts, dtype=np.float32)
        path = [x]
        with torch.inference_mode(), _one_thread(self.device):
            for i in range(n_steps):
                nxt = rk4(model, torch.as_tensor(x, device=self.device), dt=step, n_steps=1)[:, -1]
                nxt = nxt.float().cpu().numpy().astype(np.float64)
                if on_data:
                    # near the cells, the pull toward them less its part along the step:
                    # it keeps the path on the cells without slowing it (a full pull traps
                    # paths at a branch point, between the two branches' cells); a path
                    # that has left them (beyond _ESCAPE h) gets the full pull back
                    move = nxt - x
                    pull = project(nxt) - nxt
                    along = (pull * move).sum(1) / np.maximum((move * move).sum(1), 1e-30)
                    near = self.tree.query(nxt)[0] <= _ESCAPE * self.length_scale
                    nxt = nxt + pull - np.where(near, along, 0.0)[:, None] * move
                x = nxt.astype(np.float32)
                if hold is not None and level is not None:
                    wn = self.loadings[hold].astype(np.float64)
                    x = (x + ((level - x @ wn) / (wn @ wn))[:, None] * wn[None, :]).astype(np.float32)
                path.append(x)
                if check is not None:
                    check(i + 1)
        return np.stack(path, axis=1)

    def states_of(self, adata: AnnData) -> np.ndarray:
        """``(n_obs, dim)`` states of other cells (layer ``Ms``): the fit's genes, transform, loadings."""
        if self.cols is None:
            msg = "States of new cells need a field over the PCA state (space='pca')."
            raise InputError(msg)
        cols = adata.var_names.get_indexer(self.genes)
        if (cols < 0).any():
            lacking = list(self.genes[cols < 0][:5])
            msg = f"The cells lack {int((cols < 0).sum())} of the field's genes (e.g. {lacking})."
            raise InputError(msg)
        S = _dense32(adata.layers[Key.layers.MS][:, cols]).astype(np.float64)
        T = np.log1p(S) if self.transform == "log1p" else S
        return ((T - self.mean) @ self.loadings.astype(np.float64)).astype(np.float32)

    def nearest_cells(self, points: np.ndarray) -> np.ndarray:
        """``(n,)`` index of the nearest observed cell of each ``(n, dim)`` state."""
        return np.asarray(self.tree.query(np.asarray(points, dtype=np.float64))[1])


def load_field(adata: AnnData, *, device: Device = "cpu") -> FittedField:
    """Rebuild the field a :class:`VectorField` fit wrote into ``adata`` (``uns['vector_field']``).

    Raises
    ------
    InputError
        When ``adata`` holds no vector field.
    """
    torch = _import_torch()
    from explorer.models._vf_module import VectorFieldMLP

    data = adata.uns.get(Key.uns.VECTOR_FIELD)
    if not isinstance(data, dict) or "weights" not in data or Key.obsm.VF_STATE not in adata.obsm:
        msg = (
            "Expected a vector-field fit (uns['vector_field'] and obsm['vf_state']); found uns keys "
            f"{sorted(adata.uns)}. Fit one first: `explorer fit DATA --model vector_field --out fit.h5ad` "
            "(or VectorField().fit(adata).to_adata(adata))."
        )
        raise InputError(msg)
    dev = _resolve_device(device)
    names = [str(n) for n in np.asarray(data["weight_names"])]
    state_dict = {n: torch.as_tensor(np.asarray(data["weights"][n.replace(".", "_")])) for n in names}
    states = np.asarray(adata.obsm[Key.obsm.VF_STATE], dtype=np.float32)
    dim = states.shape[1]
    hidden = tuple(int(h) for h in np.asarray(data["hidden"]).ravel())
    model = VectorFieldMLP(
        dim, state_dict["center"], state_dict["spread"], state_dict["speed"], hidden=hidden
    )
    model.load_state_dict(state_dict)
    model.to(dev).eval()
    genes = np.asarray(data.get("genes", np.zeros(0, dtype=str))).astype(str)
    cols = loadings = None
    if str(data["space"]) == "pca":
        cols = adata.var_names.get_indexer(genes)
        if (cols < 0).any() or Key.varm.VF_LOADINGS not in adata.varm:
            msg = (
                "The vector field's genes or loadings (varm['vf_loadings']) are missing from the data; "
                "refit it."
            )
            raise InputError(msg)
        loadings = np.asarray(adata.varm[Key.varm.VF_LOADINGS])[cols].astype(np.float32)
    return FittedField(
        model=model,
        device=dev,
        states=states,
        dt=float(data["dt"]),
        length_scale=float(data["length_scale"]),
        genes=genes,
        cols=cols,
        loadings=loadings,
        mean=np.asarray(data["mean"], dtype=np.float32),
        transform=str(data["transform"]),
        tree=cKDTree(states.astype(np.float64)),
    )


def _cell_index(adata: AnnData, cells: Any) -> np.ndarray:
    """Cells as integer positions: a boolean mask, positions or obs names."""
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (adata.n_obs,):
            msg = f"Expected a boolean mask of {adata.n_obs} cells; found shape {arr.shape}."
            raise InputError(msg)
        idx = np.flatnonzero(arr)
    elif arr.dtype.kind in "iu":
        idx = arr.astype(np.int64).ravel()
    else:
        idx = adata.obs_names.get_indexer(arr.astype(str).ravel())
        if (idx < 0).any():
            missing = list(arr.astype(str).ravel()[idx < 0][:5])
            msg = f"Cells not found in the data: {missing}. Pass obs names, positions or a mask."
            raise InputError(msg)
    if len(idx) == 0:
        msg = "No start cells: the selection is empty. Choose at least one cell."
        raise InputError(msg)
    return idx


def simulate_trajectories(
    adata: AnnData,
    cells: Any,
    *,
    n_steps: int = 100,
    dt: float | None = None,
    on_data: bool = True,
    basis: str = "umap",
    cluster_key: str | None = None,
    field: FittedField | None = None,
    check: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Integrate the learned field from ``cells`` (RK4) and place the paths on the embedding.

    Parameters
    ----------
    adata
        A fitted AnnData (``uns['vector_field']``).
    cells
        Start cells: a boolean mask, positions or obs names.
    n_steps, dt
        Number of RK4 steps and their size (default ``uns['vector_field']['dt']``: one
        step moves a cell at the median speed by the length scale).
    on_data
        Keep the paths on the cells (:meth:`FittedField.integrate`); ``False``: the
        plain ODE.
    basis
        Embedding the paths are carried onto (Gaussian-weighted mean of the 15 nearest
        cells' positions in the state space); skipped when absent.
    cluster_key
        obs column naming the end groups (default: the one the fit used).
    field
        A :func:`load_field` result to reuse.

    Returns
    -------
    One row per start cell and step: ``cell`` (start cell's name), ``step``, ``time``
    (``step * dt``), ``<basis>_1``, ``<basis>_2``, ``nearest_cell`` (of the point),
    ``end_cell`` and ``end_cluster`` (the nearest observed cell at the path's end and its group).
    """
    fld = field or load_field(adata)
    idx = _cell_index(adata, cells)
    paths = fld.integrate(fld.states[idx], n_steps=n_steps, dt=dt, on_data=on_data, check=check)
    return _paths_frame(
        adata, fld, idx, paths, dt=fld.dt if dt is None else dt, basis=basis, cluster_key=cluster_key
    )


def _paths_frame(
    adata: AnnData,
    fld: FittedField,
    idx: np.ndarray,
    paths: np.ndarray,
    *,
    dt: float,
    basis: str,
    cluster_key: str | None,
) -> pd.DataFrame:
    n, steps, dim = paths.shape
    flat = paths.reshape(-1, dim)
    nearest = fld.nearest_cells(flat)
    end = nearest.reshape(n, steps)[:, -1]
    key = cluster_key or str(adata.uns[Key.uns.VECTOR_FIELD].get("cluster_key", Key.obs.CLUSTERS))
    labels = _labels(adata, key)
    frame = {
        "cell": np.repeat(np.asarray(adata.obs_names[idx]), steps),
        "step": np.tile(np.arange(steps), n),
        "time": np.tile(np.arange(steps) * dt, n),
    }
    basis_key = Key.obsm.embedding(basis)
    if basis_key in adata.obsm:
        emb = np.asarray(adata.obsm[basis_key], dtype=np.float64)[:, :2]
        coords = _EmbeddingMap(fld.tree, emb, fld.length_scale)(flat)
        name = basis_key.removeprefix("X_")
        frame[f"{name}_1"], frame[f"{name}_2"] = coords[:, 0], coords[:, 1]
    frame["nearest_cell"] = np.asarray(adata.obs_names[nearest])
    frame["end_cell"] = np.repeat(np.asarray(adata.obs_names[end]), steps)
    frame["end_cluster"] = np.repeat(
        labels[end] if labels is not None else np.asarray(adata.obs_names[end]), steps
    )
    return pd.DataFrame(frame)


@dataclass(frozen=True, slots=True)
class Perturbation:
    """What :func:`perturb` found.

    Attributes
    ----------
    gene, factor, value
        The perturbation: the gene's ``Ms`` set to ``value`` or multiplied by ``factor``.
    cells
        Names of the perturbed start cells.
    control, perturbed
        Fate distribution of the unperturbed and perturbed runs: with fate probabilities
        (``measure == "fate probabilities"``), the mean over the start cells of the fate
        probabilities of the observed cell nearest to each path's end; without, the share
        of the start cells whose path ends nearest to a cell of each group.
    control_end, perturbed_end
        Per start cell, the group its path ends in (the cell type of the observed cell
        nearest to the path's end; without cell types, that cell's most likely fate).
    control_paths, perturbed_paths
        With ``keep_paths``: the ``(cells, n_steps + 1, dim)`` paths in the field's state.
    measure
        ``"fate probabilities"`` or ``"nearest cluster"``: what ``control``/``perturbed`` hold.
    """

    gene: str
    factor: float | None
    value: float | None
    cells: pd.Index
    control: pd.Series
    perturbed: pd.Series
    control_end: pd.Series
    perturbed_end: pd.Series
    control_paths: np.ndarray | None = None
    perturbed_paths: np.ndarray | None = None
    measure: Literal["fate probabilities", "nearest cluster"] = "nearest cluster"

    @property
    def shift(self) -> pd.Series:
        """``perturbed - control`` per fate."""
        return self.perturbed - self.control

    def table(self) -> pd.DataFrame:
        """One row per fate: control, perturbed, shift."""
        return pd.DataFrame({"control": self.control, "perturbed": self.perturbed, "shift": self.shift})


def perturb(
    adata: AnnData,
    gene: str,
    *,
    cells: Any,
    factor: float | None = None,
    value: float | None = None,
    n_steps: int = 100,
    dt: float | None = None,
    hold: bool = True,
    on_data: bool = True,
    cluster_key: str | None = None,
    use_fates: bool = True,
    fates: pd.DataFrame | None = None,
    field: FittedField | None = None,
    check: Callable[[int], None] | None = None,
    keep_paths: bool = False,
) -> Perturbation:
    """In-silico perturbation: set or scale a gene in ``cells``, integrate, compare fates.

    The gene's smoothed abundance ``Ms`` is multiplied by ``factor`` (0: knock-out) or set
    to ``value``; the state moves by exactly that change carried through the transform
    and the loadings. With ``hold`` (default) the gene's own velocity is then removed
    from the field all along the path and its coordinate reset after each step, so it
    stays at the set level (a sustained knock-down); without, only the start moves.
    Both runs integrate ``n_steps`` RK4 steps (``on_data`` and ``check``, called at every
    step, as :meth:`FittedField.integrate`); ``keep_paths`` keeps their whole paths.

    Parameters
    ----------
    use_fates, fates
        The fate distribution is the mean, over the start cells, of the fate
        probabilities of the observed cell nearest to each path's end: those of
        ``fates`` (``(n_obs, n_fates)``, rows in ``adata``'s order, columns named by
        fate) or else of CellRank's ``obsm['lineages_fwd']`` (``explorer fates``; names
        from obs ``term_states_fwd``). Without either, or with ``use_fates=False``, it
        is the share of the start cells whose path ends nearest to a cell of each group
        (``cluster_key``); ``Perturbation.measure`` says which.

    Returns
    -------
    A :class:`Perturbation`; ``.shift`` is the change in fate distribution.

    Raises
    ------
    InputError
        Neither or both of ``factor``/``value``, a gene outside the field's genes, or a
        field not in PCA space.
    """
    if (factor is None) == (value is None):
        msg = "Pass exactly one of factor= (e.g. 0 for a knock-out) and value= (the gene's new Ms)."
        raise InputError(msg)
    fld = field or load_field(adata)
    if fld.cols is None:
        msg = "Perturbations need a field over the PCA state (space='pca'); this one is over an obsm space."
        raise InputError(msg)
    where = np.flatnonzero(fld.genes == gene)
    if len(where) == 0:
        hint = (
            "it is not in the data" if gene not in adata.var_names else "it is not one of the field's genes"
        )
        msg = (
            f"Gene {gene!r} cannot be perturbed: {hint} ({len(fld.genes)} genes, e.g. "
            f"{list(fld.genes[:5])}). Choose one of them, or refit with --param genes=all."
        )
        raise InputError(msg)
    g = int(where[0])
    idx = _cell_index(adata, cells)
    s = _dense32(adata.layers[Key.layers.MS][idx][:, [fld.cols[g]]])[:, 0].astype(np.float64)
    new = s * factor if factor is not None else np.full_like(s, float(value))
    if (new < 0).any():
        msg = (
            f"The perturbed abundance must be >= 0; found {float(new.min()):.3g}. "
            "Use factor >= 0 or value >= 0."
        )
        raise InputError(msg)
    # where the paths end is named by fate probabilities, else by cell types: checked before
    # the integration (it raised after it, and asked a user of the app or the CLI to pass an
    # argument they cannot, even where the session's fates would have named the ends)
    key = cluster_key or str(adata.uns[Key.uns.VECTOR_FIELD].get("cluster_key", Key.obs.CLUSTERS))
    labels = _labels(adata, key)
    use_fates = use_fates and (fates is not None or Key.obsm.FATE_PROBABILITIES in adata.obsm)
    if labels is None and not use_fates:
        from explorer.graph.fates import DEFAULT_N_CELLS, most_states

        types = f"add the cell types as obs[{key!r}] (from Python, cluster_key= names another column)"
        todo = (
            f"Compute fates first (`explorer fates`, or Compute fates in the app), or {types}"
            if most_states(adata.n_obs) >= 2  # noqa: PLR2004 - two macrostates, as fates.macrostates asks
            # fates would be refused: only the types are left to suggest
            else f"Fates need {2 * DEFAULT_N_CELLS} cells at least and the data has {adata.n_obs}: {types}"
        )
        msg = (
            f"Cannot say where the perturbed cells go: there are no fate probabilities and no cell "
            f"types in obs[{key!r}] (obs has {list(adata.obs.columns)}). {todo}."
        )
        raise InputError(msg)
    shift = np.log1p(new) - np.log1p(s) if fld.transform == "log1p" else new - s
    starts = fld.states[idx]
    moved = starts + shift[:, None] * fld.loadings[g][None, :]
    control_paths = fld.integrate(starts, n_steps=n_steps, dt=dt, on_data=on_data, check=check)
    level = moved @ fld.loadings[g].astype(np.float64)
    perturbed_paths = fld.integrate(
        moved, n_steps=n_steps, dt=dt, on_data=on_data, hold=g if hold else None, level=level, check=check
    )
    control, perturbed = control_paths[:, -1], perturbed_paths[:, -1]
    end_c, end_p = fld.nearest_cells(control), fld.nearest_cells(perturbed)
    names = pd.Index(adata.obs_names[idx])
    if use_fates and fates is None and Key.obsm.FATE_PROBABILITIES in adata.obsm:
        probs = np.asarray(adata.obsm[Key.obsm.FATE_PROBABILITIES], dtype=np.float64)
        fates = pd.DataFrame(probs, columns=_fate_names(adata, probs.shape[1]))
    if use_fates and fates is not None:
        if fates.shape[0] != adata.n_obs:
            msg = f"Expected fate probabilities for the {adata.n_obs} cells; found {fates.shape[0]} rows."
            raise InputError(msg)
        probs = fates.to_numpy(dtype=np.float64)
        dist_c = pd.Series(probs[end_c].mean(0), index=[str(c) for c in fates.columns])
        dist_p = pd.Series(probs[end_p].mean(0), index=[str(c) for c in fates.columns])
        measure = "fate probabilities"
        if labels is None:  # no cell types: a cell's group is its most likely fate
            labels = np.asarray([str(c) for c in fates.columns])[probs.argmax(1)]
    else:
        measure = "nearest cluster"
        cats = sorted(set(labels))
        dist_c = pd.Series(labels[end_c]).value_counts(normalize=True).reindex(cats, fill_value=0.0)
        dist_p = pd.Series(labels[end_p]).value_counts(normalize=True).reindex(cats, fill_value=0.0)
    return Perturbation(
        gene=gene,
        factor=factor,
        value=value,
        cells=names,
        control=dist_c,
        perturbed=dist_p,
        control_end=pd.Series(labels[end_c], index=names),
        perturbed_end=pd.Series(labels[end_p], index=names),
        control_paths=control_paths if keep_paths else None,
        perturbed_paths=perturbed_paths if keep_paths else None,
        measure=measure,
    )


def fixed_point_table(adata: AnnData) -> pd.DataFrame:
    """The fixed points a fit found (``uns['vector_field']['fixed_points']``), one row each.

    Returns
    -------
    Columns ``type`` (attractor, saddle, repeller, neutral), ``cluster`` and ``cell`` (of
    the nearest observed cell), ``residual`` (``||f||`` there), ``unstable`` (number of
    Jacobian eigenvalues with a positive real part), ``distance`` (to the nearest cell,
    in length scales), ``basin`` and ``visits`` (shares of the cells' paths ending, or
    passing, within two length scales of it), ``supported`` (an attractor with a basin,
    a saddle or repeller with visits, of at least 1% of the paths; fits made before
    this check: all True) and, when the fit carried them onto an embedding, ``x``,
    ``y`` there. Empty (same columns) when none was found.

    Raises
    ------
    InputError
        When ``adata`` holds no vector field.
    """
    data = adata.uns.get(Key.uns.VECTOR_FIELD)
    if not isinstance(data, dict) or "fixed_points" not in data or Key.obsm.VF_STATE not in adata.obsm:
        msg = (
            "Expected a vector-field fit (uns['vector_field'] and obsm['vf_state']); found none. Fit one "
            "first: `explorer fit DATA --model vector_field --out fit.h5ad`."
        )
        raise InputError(msg)
    fixed = data["fixed_points"]
    states = np.asarray(fixed["state"], dtype=np.float64).reshape(-1, adata.obsm[Key.obsm.VF_STATE].shape[1])
    tree = cKDTree(np.asarray(adata.obsm[Key.obsm.VF_STATE], dtype=np.float64))
    dist = tree.query(states)[0] if len(states) else np.zeros(0)
    frame = pd.DataFrame(
        {
            "type": np.asarray(fixed["type"], dtype=str),
            "cluster": np.asarray(fixed.get("cluster", np.zeros(0, dtype=str)), dtype=str),
            "cell": np.asarray(fixed.get("cell", np.zeros(0, dtype=str)), dtype=str),
            "residual": np.asarray(fixed["residual"], dtype=np.float64),
            "unstable": (np.asarray(fixed["eig_real"]).reshape(len(states), states.shape[1]) > 0).sum(1),
            "distance": dist / float(data.get("length_scale", 1.0)),
            "basin": np.asarray(fixed.get("basin", np.full(len(states), np.nan)), dtype=np.float64),
            "visits": np.asarray(fixed.get("visits", np.full(len(states), np.nan)), dtype=np.float64),
            "supported": np.asarray(fixed.get("supported", np.ones(len(states), bool)), dtype=bool),
        }
    )
    emb = np.asarray(fixed.get("embedding", np.zeros((0, 2))), dtype=np.float64)
    if emb.shape == (len(states), 2):
        frame["x"], frame["y"] = emb[:, 0], emb[:, 1]
    return frame


def _fate_names(adata: AnnData, n: int) -> list[str]:
    states = adata.obs.get(Key.obs.TERMINAL_STATES)
    if states is not None and hasattr(states, "cat") and len(states.cat.categories) == n:
        return [str(c) for c in states.cat.categories]
    return [f"fate_{i}" for i in range(n)]


def gene_jacobian(
    adata: AnnData,
    pairs: Sequence[tuple[str, str]],
    *,
    cells: Any = None,
    field: FittedField | None = None,
) -> pd.DataFrame:
    """Per-cell Jacobians of the field carried back to genes: ``d velocity_target / d Ms_regulator``.

    With the state ``x = (T(Ms) - mean) W`` and the gene velocity ``v = (W f(x)) / T'(Ms)``
    (``T = log1p``: ``T' = 1 / (1 + Ms)``), the chain rule gives, per cell,
    ``dv_i / ds_j = delta_ij (W f)_i + (1 + s_i) / (1 + s_j) (W J W^T)_ij`` (``T`` the
    identity: ``(W J W^T)_ij``). Only the PCA state's genes have one.

    Parameters
    ----------
    pairs
        ``(regulator, target)`` gene names.
    cells
        Cells to evaluate at (mask, positions or names); default all.

    Returns
    -------
    ``(n_cells, n_pairs)`` DataFrame, columns ``"d <target> / d <regulator>"``, indexed
    by the cells' names (:func:`compute_gene_jacobian` writes it to ``obsm['vf_jacobian']``).
    """
    fld = field or load_field(adata)
    if fld.cols is None:
        msg = "Gene Jacobians need a field over the PCA state (space='pca'); this one is over an obsm space."
        raise InputError(msg)
    position = {g: i for i, g in enumerate(fld.genes)}
    missing = sorted({g for pair in pairs for g in pair if g not in position})
    if missing:
        msg = (
            f"Genes {missing} are not among the field's {len(fld.genes)} genes (e.g. {list(fld.genes[:5])})."
        )
        raise InputError(msg)
    idx = np.arange(adata.n_obs) if cells is None else _cell_index(adata, cells)
    x = fld.states[idx]
    J = fld.fitted().jacobians(x).astype(np.float64)
    W = fld.loadings.astype(np.float64)
    f = fld.field_at(x).astype(np.float64)
    out = {}
    for regulator, target in pairs:
        i, j = position[target], position[regulator]
        core = np.einsum("a,nab,b->n", W[i], J, W[j])
        if fld.transform == "log1p":
            s = _dense32(adata.layers[Key.layers.MS][idx][:, fld.cols[[i, j]]]).astype(np.float64)
            value = (1 + s[:, 0]) / (1 + s[:, 1]) * core
            if i == j:
                value = value + f @ W[i]
        else:
            value = core
        out[f"d {target} / d {regulator}"] = value.astype(np.float32)
    return pd.DataFrame(out, index=pd.Index(adata.obs_names[idx]))


def compute_gene_jacobian(adata: AnnData, pairs: Sequence[tuple[str, str]]) -> None:
    """:func:`gene_jacobian` at every cell, written to ``obsm['vf_jacobian']`` (a DataFrame).

    Returns
    -------
    Nothing; sets obsm ``vf_jacobian``.
    """
    adata.obsm[Key.obsm.VF_JACOBIAN] = gene_jacobian(adata, pairs)


def cancellable(progress: ProgressCallback | None, total: int, message: str) -> Callable[[int], None]:
    """Return a ``check`` for :meth:`FittedField.integrate` that reports each step (and so can cancel)."""

    def check(step: int) -> None:
        report(progress, step, total, message)

    return check


__all__ = [
    "FitCancelled",
    "FittedField",
    "Perturbation",
    "VectorField",
    "VectorFieldResult",
    "cancellable",
    "classify",
    "compute_gene_jacobian",
    "fixed_point_table",
    "gene_jacobian",
    "load_field",
    "perturb",
    "simulate_trajectories",
]
