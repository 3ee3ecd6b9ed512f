"""The interface every velocity model shares, and the result it returns.

A model's constructor only stores hyperparameters; ``fit(adata, progress=...)`` reads
the AnnData, leaves it untouched and returns a :class:`VelocityResult`; writing is a
separate step, ``result.to_adata(adata)``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from scipy import sparse

from explorer._types import InputError
from explorer._version import __version__
from explorer.keys import Key
from explorer.models._params import check_params

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

    from explorer._types import BoolArray, FloatArray, ProgressCallback


@runtime_checkable
class VelocityModel(Protocol):
    """What explorer needs of a velocity model."""

    name: ClassVar[str]

    def fit(self, adata: AnnData, *, progress: ProgressCallback | None = None) -> VelocityResult:
        """Fit to ``adata`` (layers ``Ms``/``Mu`` present) without modifying it."""
        ...

    def get_params(self) -> dict[str, Any]:
        """Hyperparameters, by the constructor's names."""
        ...


class Hyperparameters:
    """``get_params()``, ``repr`` and checks from the constructor's keyword-only arguments.

    scikit-learn's convention: the constructor stores each hyperparameter under its own
    name, so the signature is the one list of them. Each subclass's constructor checks
    its arguments against their annotations and the class's ``param_ranges`` before it
    runs (:func:`explorer.models._params.check_params`): a wrong type or a value out of
    range raises :class:`~explorer._types.InputError` when the model is built.
    """

    #: allowed values of numeric hyperparameters, in interval notation (``"[0, inf)"``);
    #: for a tuple, each of its numbers
    param_ranges: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def checked_init(self: Hyperparameters, *args: Any, **params: Any) -> None:
            cls.check_params(params)
            init(self, *args, **params)

        cls.__init__ = checked_init  # type: ignore[method-assign]

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        """Raise :class:`~explorer._types.InputError` for a value of the wrong type or out of range."""
        check_params(cls, params)

    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]

    def get_params(self) -> dict[str, Any]:
        """Hyperparameters, by the constructor's names."""
        return {name: getattr(self, name) for name in self._param_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def require_layers(
    adata: AnnData, model: str, keys: tuple[str, ...] = (Key.layers.MS, Key.layers.MU)
) -> None:
    """Raise :class:`~explorer._types.InputError` unless ``adata`` has every layer in ``keys``, not all 0.

    A layer held in memory (numpy or scipy sparse) that is 0 in every cell and gene has no
    data to fit: ``Mu`` so, with its unspliced counts lost on the way (a loom whose
    ``unspliced`` layer was not read, zeros in its place), gave VeloVAE a fit of every gene
    with nothing in it and the other models a message about velocity genes.
    """
    missing = [k for k in keys if k not in adata.layers]
    if missing:
        msg = (
            f"The {model!r} model needs layers {list(keys)}; {missing} not found "
            f"(adata.layers has {list(adata.layers)}). Run explorer.pipeline.prepare(adata) "
            "first (or explorer.graph.moments.compute_moments(adata) on normalised data)."
        )
        raise InputError(msg)
    for key in keys:
        layer = adata.layers[key]
        if sparse.issparse(layer):
            empty = not layer.count_nonzero()
        else:  # the first cells settle almost every layer at once
            dense = isinstance(layer, np.ndarray) and layer.size > 0
            empty = dense and not np.any(layer[:64]) and not np.any(layer)
        if empty:
            counts = "unspliced" if key == Key.layers.MU else "spliced"
            msg = (
                f"The {model!r} model found layers[{key!r}] 0 in every cell and gene "
                f"({adata.n_obs:,} x {adata.n_vars:,}): there are no {counts} counts to fit. Check "
                f"that the file's {counts} layer holds the counts (name it with --{counts}-layer, "
                f"or explorer.data.io.read(path, {counts}_layer=...) in Python), then preprocess again."
            )
            raise InputError(msg)


def _check_shape(name: str, value: np.ndarray | None, expected: tuple[int, ...]) -> None:
    if value is not None and tuple(value.shape) != expected:
        msg = (
            f"VelocityResult.{name} has shape {tuple(value.shape)}; "
            f"expected {expected} (from obs_names/var_names)."
        )
        raise ValueError(msg)


def _uns_safe(value: Any) -> Any:
    """Turn ``value`` into something h5ad can store in ``uns`` (no None, no tuples)."""
    if value is None:
        return "None"
    if isinstance(value, Mapping):
        return {str(k): _uns_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_uns_safe(v) for v in value]
        if all(isinstance(v, (int, float, np.number)) for v in items):
            return np.asarray(items)
        return [str(v) for v in items]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool, np.number, np.ndarray)):
        return value
    return str(value)


#: the key of ``uns['velocity_params']`` that lists what :meth:`VelocityResult.to_adata` wrote
FIT_KEYS = "fit_keys"


def _drop_earlier_fit_keys(adata: AnnData, written: Mapping[str, list[str]]) -> None:
    """Remove what an earlier explorer fit wrote into ``adata`` and this one does not rewrite.

    Only keys listed in the earlier fit's ``uns['velocity_params']['fit_keys']`` go: an
    earlier VeloVAE's ``obs['latent_time_std']`` would otherwise sit beside a later
    dynamical fit's ``latent_time`` as if it were its SD. Columns the file had from
    elsewhere (the user's, scVelo's) are kept.
    """
    earlier = adata.uns.get(Key.uns.VELOCITY_PARAMS, {})
    earlier = earlier.get(FIT_KEYS) if isinstance(earlier, Mapping) else None
    if not isinstance(earlier, Mapping):
        return
    for kind, where in (("layers", adata.layers), ("obsm", adata.obsm)):
        for key in {str(k) for k in np.atleast_1d(earlier.get(kind, []))} - set(written[kind]):
            where.pop(key, None)
    for kind, frame in (("obs", adata.obs), ("var", adata.var)):
        gone = sorted({str(k) for k in np.atleast_1d(earlier.get(kind, []))} - set(written[kind]))
        frame.drop(columns=[c for c in gone if c in frame.columns], inplace=True)


def _drop_derived(adata: AnnData, model: str) -> None:
    """Remove what was computed from the velocity in ``adata`` (fates, graphs), warning of each."""
    from explorer.graph.fates import drop_fates
    from explorer.graph.transition import drop_velocity_graphs

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")  # noqa: PLR2004

    removed = drop_fates(adata)
    if removed:
        logger.warning(
            "Removed the fates computed from the earlier velocity (%s): run `explorer fates` "
            "(or Compute fates in the app) for this %s fit.",
            listed(removed),
            model,
        )
    removed = drop_velocity_graphs(adata)
    if removed:
        logger.warning(
            "Removed the velocity graph, transitions and projections computed from the earlier "
            "velocity (%s): explorer.pipeline.derive(adata, result).to_adata(adata) computes them "
            "for this %s fit (`explorer fit` does).",
            listed(removed),
            model,
        )


@dataclass(frozen=True, slots=True)
class VelocityResult:
    """What a fit learned, aligned to the cells and genes it was fitted on.

    Attributes
    ----------
    model
        Registry name of the model (``"steady_state"``, ``"dynamical"``, ...).
    params
        Hyperparameters actually used (seed included).
    obs_names, var_names
        The cells and genes the arrays are aligned to.
    velocity
        ``(n_obs, n_vars)`` spliced velocity; NaN for genes the model did not fit.
    gene_params
        Per-gene fit figures indexed by ``var_names``, columns named by their AnnData
        ``var`` keys (``velocity_gamma``, ``fit_alpha``, ...): written to ``var`` as they are.
    velocity_genes
        ``(n_vars,)`` genes whose velocity is trusted for the graph and embedding.
    likelihood
        ``(n_vars,)`` per-gene goodness of fit (R² for the steady-state models, the
        displacement correlation ``fit_displacement_r`` for DeepVelo).
    velocity_u, latent_time, uncertainty
        Optional: unspliced velocity ``(n_obs, n_vars)``, gene-shared time ``(n_obs,)``
        and per-cell uncertainty ``(n_obs,)``.
    layers
        Further ``(n_obs, n_vars)`` arrays by layer key (``fit_t``).
    obs
        Further per-cell columns by obs key (``root_cells``), indexed by ``obs_names``.
    obsm
        Optional further ``(n_obs, k)`` arrays by obsm key (VeloVAE's ``cell_state``).
    """

    model: str
    params: dict[str, Any]
    obs_names: pd.Index
    var_names: pd.Index
    velocity: FloatArray
    gene_params: pd.DataFrame
    velocity_genes: BoolArray
    likelihood: pd.Series | None = None
    velocity_u: FloatArray | None = None
    latent_time: FloatArray | None = None
    uncertainty: FloatArray | None = None
    layers: dict[str, FloatArray] = field(default_factory=dict)
    obs: pd.DataFrame | None = None
    obsm: dict[str, FloatArray] | None = None

    def __post_init__(self) -> None:
        n_obs, n_vars = len(self.obs_names), len(self.var_names)
        _check_shape("velocity", self.velocity, (n_obs, n_vars))
        _check_shape("velocity_u", self.velocity_u, (n_obs, n_vars))
        _check_shape("velocity_genes", self.velocity_genes, (n_vars,))
        _check_shape("latent_time", self.latent_time, (n_obs,))
        _check_shape("uncertainty", self.uncertainty, (n_obs,))
        for key, arr in self.layers.items():
            _check_shape(f"layers[{key!r}]", arr, (n_obs, n_vars))
        if not self.gene_params.index.equals(self.var_names):
            msg = "VelocityResult.gene_params must be indexed by var_names in the same order."
            raise ValueError(msg)
        if self.likelihood is not None and not self.likelihood.index.equals(self.var_names):
            msg = "VelocityResult.likelihood must be indexed by var_names in the same order."
            raise ValueError(msg)
        if self.obs is not None and not self.obs.index.equals(self.obs_names):
            msg = "VelocityResult.obs must be indexed by obs_names in the same order."
            raise ValueError(msg)
        for key, arr in (self.obsm or {}).items():
            if arr.ndim != 2 or arr.shape[0] != n_obs:  # noqa: PLR2004
                msg = f"VelocityResult.obsm[{key!r}] has shape {tuple(arr.shape)}; expected ({n_obs}, k)."
                raise ValueError(msg)

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return len(self.obs_names)

    @property
    def n_vars(self) -> int:
        """Number of genes."""
        return len(self.var_names)

    def to_adata(self, adata: AnnData, *, keep_derived: bool = False) -> None:
        """Write the result into ``adata`` under scVelo's keys, in place.

        ``adata`` must have the same cells and genes, in the same order, as the fit. What
        was computed from a velocity already in ``adata`` is removed, with a warning,
        unless ``keep_derived`` (the same fit written back, as the app's export of a file's
        own fit): its fates (CellRank 2's keys, ``explorer fates``;
        :func:`explorer.graph.fates.drop_fates`) and its velocity graphs, transition
        matrices, projections and confidences
        (:func:`explorer.graph.transition.drop_velocity_graphs`), which
        :func:`explorer.pipeline.derive` computes for this fit (``explorer fit`` does).

        Returns
        -------
        None; sets ``layers['velocity']`` (and ``velocity_u`` and the keys of
        :attr:`layers`), every column of :attr:`gene_params` in ``var``,
        ``var['velocity_genes']``, ``obs['latent_time']`` and
        ``obs['velocity_uncertainty']`` when present, the columns of :attr:`obs`, the
        arrays of :attr:`obsm` (and removes an earlier fit's ``layers['velocity_variance']``
        when this fit has none), and ``uns['velocity_params']`` (``mode``, ``model``, ``params``, ``explorer_version``).
        """
        if not adata.obs_names.equals(self.obs_names) or not adata.var_names.equals(self.var_names):
            msg = (
                f"This {self.model!r} result was fitted on {self.n_obs} cells x {self.n_vars} genes, "
                f"but the AnnData has {adata.n_obs} x {adata.n_vars} with different names or order. "
                "Write it into the AnnData it was fitted on (or a copy of it)."
            )
            raise ValueError(msg)
        written = self._written_keys()
        _drop_earlier_fit_keys(adata, written)
        if not keep_derived and Key.layers.VELOCITY in adata.layers:
            _drop_derived(adata, self.model)
        for key, arr in self.layer_arrays().items():
            adata.layers[key] = arr
        if Key.layers.VELOCITY_VARIANCE not in self.layers:
            # an earlier fit's velocity variance would pair with this fit's velocity in the fates kernel
            adata.layers.pop(Key.layers.VELOCITY_VARIANCE, None)
        for col in self.gene_params.columns:
            adata.var[col] = self.gene_params[col].to_numpy()
        adata.var[Key.var.VELOCITY_GENES] = np.asarray(self.velocity_genes, dtype=bool)
        if self.latent_time is not None:
            adata.obs[Key.obs.LATENT_TIME] = self.latent_time
        if self.uncertainty is not None:
            adata.obs[Key.obs.VELOCITY_UNCERTAINTY] = self.uncertainty
        if self.obs is not None:
            for col in self.obs.columns:
                adata.obs[col] = self.obs[col].to_numpy()
        for key, arr in (self.obsm or {}).items():
            adata.obsm[key] = arr
        adata.uns[Key.uns.VELOCITY_PARAMS] = _uns_safe(
            {
                "mode": self.model,
                "model": self.model,
                "params": self.params,
                "seed": self.params.get("seed"),
                "explorer_version": __version__,
                FIT_KEYS: {kind: np.asarray(keys, dtype=str) for kind, keys in written.items()},
            }
        )

    def layer_arrays(self) -> dict[str, np.ndarray]:
        """Return the per-cell layers :meth:`to_adata` writes, by key, in its order.

        ``velocity``, ``velocity_u`` when present, then :attr:`layers` (the very arrays).
        """
        out = {Key.layers.VELOCITY: self.velocity}
        if self.velocity_u is not None:
            out[Key.layers.VELOCITY_U] = self.velocity_u
        out.update(self.layers)
        return out

    def _written_keys(self) -> dict[str, list[str]]:
        """Return the ``layers``, ``var``, ``obs`` and ``obsm`` keys :meth:`to_adata` writes for this fit."""
        obs = [Key.obs.LATENT_TIME] if self.latent_time is not None else []
        obs += [Key.obs.VELOCITY_UNCERTAINTY] if self.uncertainty is not None else []
        return {
            "layers": list(self.layer_arrays()),
            "var": [*self.gene_params.columns, Key.var.VELOCITY_GENES],
            "obs": obs + [str(c) for c in (() if self.obs is None else self.obs.columns) if c not in obs],
            "obsm": list(self.obsm or {}),
        }

    @classmethod
    def from_adata(cls, adata: AnnData, *, model: str | None = None) -> VelocityResult:
        """Rebuild the result that :meth:`to_adata` wrote into ``adata``.

        Reads the keys :meth:`to_adata` writes: ``uns['velocity_params']`` (the model's
        name and parameters), ``layers['velocity']`` (and ``velocity_u``, ``fit_t``),
        the model's per-gene ``var`` columns (scVelo's ``velocity_*`` and ``fit_*`` names),
        ``var['velocity_genes']``, ``obs['latent_time']``,
        ``obs['velocity_uncertainty']`` and ``obs['root_cells']``. Arrays are taken as
        stored (float32 as written); parameters get back the Python types
        :meth:`to_adata` had to change for h5ad (``"None"`` -> None, arrays -> tuples).
        Per-cell layers read back: ``fit_t``, ``predicted_u``/``predicted_s`` and
        ``rate_alpha``/``rate_beta``/``rate_gamma``, ``rho`` and ``velocity_variance``.

        Parameters
        ----------
        adata
            The AnnData a fit was written into.
        model
            Name for a fit whose file names no model (``layers['velocity']`` written by
            another tool without ``uns['velocity_params']``); by default such a file raises.

        Raises
        ------
        ValueError
            If ``adata`` has no ``layers['velocity']`` or no ``uns['velocity_params']``
            naming the model.

        Examples
        --------
        >>> result.to_adata(adata)  # doctest: +SKIP
        >>> VelocityResult.from_adata(adata).velocity_genes.sum()  # doctest: +SKIP
        """
        stored = adata.uns.get(Key.uns.VELOCITY_PARAMS)
        if isinstance(stored, Mapping):
            model = stored.get("model", stored.get("mode", model))
        if Key.layers.VELOCITY not in adata.layers or model is None:
            msg = (
                "Expected a fit written by VelocityResult.to_adata: layers['velocity'] and "
                f"uns['velocity_params'] with the model's name; found layers {sorted(adata.layers)} and "
                f"uns['velocity_params'] = {stored!r}. Fit a model first (`explorer fit`)."
            )
            raise ValueError(msg)
        params = stored.get("params", {}) if isinstance(stored, Mapping) else {}
        params = {str(k): _from_uns(v) for k, v in params.items()} if isinstance(params, Mapping) else {}

        def dense(key: str) -> FloatArray | None:
            if key not in adata.layers:
                return None
            arr = adata.layers[key]
            if type(arr).__module__.startswith("dask"):
                # a store opened lazily (explorer.data.io.read_zarr_lazy): read a gene's chunks when asked
                return arr
            return np.asarray(arr.toarray() if hasattr(arr, "toarray") else arr)

        # the model's own columns: scVelo's velocity_* (steady state) and fit_* (dynamical) names
        columns = [
            c
            for c in adata.var.columns
            if c != Key.var.VELOCITY_GENES and c.startswith(("velocity_", "fit_"))
        ]
        likelihood = None
        for key in (Key.var.FIT_LIKELIHOOD, Key.var.R2, Key.var.FIT_DISPLACEMENT_R):
            if key in adata.var:
                likelihood = adata.var[key].copy()
                break
        velocity = dense(Key.layers.VELOCITY)
        genes = (
            adata.var[Key.var.VELOCITY_GENES].to_numpy(dtype=bool)
            if Key.var.VELOCITY_GENES in adata.var
            else np.asarray(np.isfinite(velocity).all(axis=0))  # computed chunk by chunk when lazy
        )
        obs_cols = [
            c
            for c in (
                Key.obs.ROOT_CELLS, Key.obs.LATENT_TIME_STD, Key.obs.LATENT_TIME_CV, Key.obs.FIT_TRAIN,
                Key.obs.LATENT_TIME_START_SPREAD, Key.obs.LATENT_TIME_RANK_WIDTH,
                Key.obs.LATENT_TIME_STD_POSTERIOR, Key.obs.LATENT_TIME_START_SHIFT,
                Key.obs.VELOCITY_CONSISTENCY, Key.obs.VELOCITY_CONSISTENCY_TYPE,
            )  # fmt: skip
            if c in adata.obs
        ]
        obs = adata.obs

        def per_cell(key: str) -> FloatArray | None:
            return obs[key].to_numpy() if key in obs else None

        per_cell_layers = (
            Key.layers.FIT_T,
            Key.layers.PREDICTED_U,
            Key.layers.PREDICTED_S,
            Key.layers.RATE_ALPHA,
            Key.layers.RATE_BETA,
            Key.layers.RATE_GAMMA,
            Key.layers.RHO,
            Key.layers.VELOCITY_VARIANCE,
        )
        layers = {key: arr for key in per_cell_layers if (arr := dense(key)) is not None}
        obsm = {
            key: np.asarray(adata.obsm[key])
            for key in (Key.obsm.CELL_STATE, Key.obsm.CELL_STATE_STD, Key.obsm.RATES_UMAP)
            if key in adata.obsm
        }
        return cls(
            model=str(model),
            params=params,
            obs_names=adata.obs_names.copy(),
            var_names=adata.var_names.copy(),
            velocity=velocity,
            gene_params=adata.var[columns].copy(),
            velocity_genes=genes,
            likelihood=likelihood,
            velocity_u=dense(Key.layers.VELOCITY_U),
            latent_time=per_cell(Key.obs.LATENT_TIME),
            uncertainty=per_cell(Key.obs.VELOCITY_UNCERTAINTY),
            layers=layers,
            obs=obs[obs_cols].copy() if obs_cols else None,
            obsm=obsm or None,
        )


def _from_uns(value: Any) -> Any:
    """Undo :func:`_uns_safe` for a parameter: ``"None"`` -> None, arrays -> tuples, numpy -> Python."""
    if isinstance(value, str) and value == "None":
        return None
    if isinstance(value, np.ndarray):
        return tuple(v.item() for v in value.ravel())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _from_uns(v) for k, v in value.items()}
    return value
