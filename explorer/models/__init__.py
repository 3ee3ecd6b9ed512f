"""Velocity models behind one interface, and a registry of them by name.

Entries are resolved lazily, so ``import explorer`` does not import torch; only asking
for a torch model (``get_model("dynamical")``) does.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from explorer.models.base import VelocityModel, VelocityResult

if TYPE_CHECKING:
    from collections.abc import Iterator

#: registry name -> "module:Class" under explorer.models
_REGISTRY: dict[str, str] = {
    "steady_state": "steady_state:SteadyState",
    "stochastic": "steady_state:Stochastic",
    "dynamical": "dynamical:Dynamical",
}


class _Models:
    """Read-only mapping ``name -> model class`` that imports each class on first use."""

    def __getitem__(self, name: str) -> type[VelocityModel]:
        if name not in _REGISTRY:
            valid = ", ".join(repr(n) for n in _REGISTRY)
            msg = f"Invalid model {name!r}. Valid options are: {valid}."
            raise KeyError(msg)
        module, cls = _REGISTRY[name].split(":")
        return getattr(import_module(f"explorer.models.{module}"), cls)

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


__all__ = ["MODELS", "VelocityModel", "VelocityResult", "get_model"]
