"""Velocity models behind one interface, and a registry of them by name.

Each entry is a :class:`ModelSpec`: where the class lives and what a fit of it can show
(:data:`Show`). The app draws what a fit's spec declares and never asks which model it
is, so adding a model means writing its module and one :func:`register_model` line here.

Entries are resolved lazily, so ``import explorer`` does not import torch; only asking
for a torch model (``get_model("dynamical")``) does.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any, Literal, get_args

from explorer._types import MissingInputError
from explorer.models.base import VelocityModel, VelocityResult

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

#: What a fit can show, beyond the velocity every model gives:
#:
#: - ``"curve"``: one fitted trajectory per gene from its ``var`` row
#:   (:func:`explorer.kinetics.fitted_gene`) and per-cell gene times ``layers['fit_t']``;
#: - ``"cell_points"``: each cell's predicted ``(u, s)`` in ``layers['predicted_u']`` and
#:   ``layers['predicted_s']`` (models whose fit is not one curve per gene);
#: - ``"cell_rates"``: per-cell rates in ``layers['rate_alpha' | 'rate_beta' | 'rate_gamma']``;
#: - ``"latent_time"``: a time per cell shared by all genes, ``obs['latent_time']``;
#: - ``"uncertainty"``: a per-cell velocity uncertainty, ``obs['velocity_uncertainty']``.
Show = Literal["curve", "cell_points", "cell_rates", "latent_time", "uncertainty"]
SHOWS: tuple[str, ...] = get_args(Show)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One registry entry: the model's name, where its class is and what its fits show."""

    name: str
    #: ``"module:Class"`` under ``explorer.models``, a full ``"package.module:Class"``, or the class
    target: str | type[VelocityModel]
    shows: frozenset[str] = frozenset()
    #: one line for menus and ``explorer fit --help``
    description: str = ""

    def load(self) -> type[VelocityModel]:
        """Import and return the model class."""
        if isinstance(self.target, type):
            return self.target
        module, cls = self.target.split(":")
        module = module if "." in module else f"explorer.models.{module}"
        return getattr(import_module(module), cls)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str, target: str | type[VelocityModel], *, shows: Iterable[str] = (), description: str = ""
) -> ModelSpec:
    """Add (or replace) the model ``name`` in :data:`MODELS`.

    Parameters
    ----------
    name
        Registry name, also the result's ``model`` and ``uns['velocity_params']['model']``.
    target
        The class, or ``"module:Class"`` (relative to ``explorer.models`` unless dotted),
        imported on first use.
    shows
        What a fit can show, from :data:`SHOWS`.
    description
        One line for menus.

    Returns
    -------
    The registered :class:`ModelSpec`.
    """
    shows = frozenset(shows)
    unknown = sorted(shows - set(SHOWS))
    if unknown:
        msg = f"Invalid shows {unknown} for model {name!r}. Valid options are: {', '.join(SHOWS)}."
        raise ValueError(msg)
    spec = ModelSpec(name=name, target=target, shows=shows, description=description)
    _REGISTRY[name] = spec
    return spec


def unregister_model(name: str) -> None:
    """Remove ``name`` from :data:`MODELS` (tests that register a toy model clean up with it)."""
    _REGISTRY.pop(name, None)


register_model(
    "steady_state", "steady_state:SteadyState", description="velocyto's steady-state ratio (deterministic)"
)
register_model(
    "stochastic", "steady_state:Stochastic", description="scVelo's stochastic model (second moments)"
)
register_model(
    "dynamical",
    "dynamical:Dynamical",
    shows=("curve", "latent_time"),
    description="scVelo's dynamical model: EM with switch time and latent time",
)
register_model(
    "deepvelo",
    "gcn:DeepVelo",
    shows=("cell_rates",),
    description="DeepVelo: per-cell kinetic rates from a graph convolutional network",
)
register_model(
    "velovae",
    "vae:VeloVAE",
    shows=("cell_points", "latent_time", "uncertainty"),
    description=(
        "VeloVAE: variational mixture of ODEs with latent time, cell state and uncertainty; "
        "n_starts=2 (two fits, twice the time) gives time intervals that hold where lineages differ"
    ),
)
register_model(
    "vector_field",
    "vector_field:VectorField",
    description=(
        "a neural vector field over the cell state (velocity / OT flow matching): "
        "trajectories, fixed points, perturbations"
    ),
)


class _Models:
    """Read-only mapping ``name -> model class`` that imports each class on first use."""

    def __getitem__(self, name: str) -> type[VelocityModel]:
        return self.spec(name).load()

    def spec(self, name: str) -> ModelSpec:
        """Return the registry entry of ``name``.

        Raises :class:`~explorer._types.MissingInputError` (also a ``KeyError``), listing
        the valid names, if there is none.
        """
        if name not in _REGISTRY:
            valid = ", ".join(repr(n) for n in _REGISTRY)
            msg = f"Invalid model {name!r}. Valid options are: {valid}."
            raise MissingInputError(msg)
        return _REGISTRY[name]

    def shows(self, name: str) -> frozenset[str]:
        """What a fit of ``name`` can show; empty for a name not registered (a foreign file)."""
        return _REGISTRY[name].shows if name in _REGISTRY else frozenset()

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)

    def keys(self) -> list[str]:
        """Return the registered model names."""
        return list(_REGISTRY)


MODELS = _Models()


def get_model(name: str, **params: Any) -> VelocityModel:
    """Build the model registered as ``name`` with hyperparameters ``params``."""
    return MODELS[name](**params)


__all__ = [
    "MODELS",
    "SHOWS",
    "ModelSpec",
    "Show",
    "VelocityModel",
    "VelocityResult",
    "get_model",
    "register_model",
    "unregister_model",
]
