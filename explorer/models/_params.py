"""Check a model's hyperparameters against its constructor's annotations and declared ranges.

Every model's constructor lists its hyperparameters as annotated keyword-only arguments
(:class:`~explorer.models.base.Hyperparameters`); :func:`check_params` reads those
annotations (``int``, ``float``, ``bool``, ``str``, ``None``, ``Literal``, unions,
``tuple[...]`` and sequences) and the class's ``param_ranges`` (interval notation such as
``"[0, inf)"``), so that a wrong value is refused with a message when the model is built,
before any data is read, and not with a ``TypeError`` deep inside the fit.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import math
import re
import sys
import types
import typing
from typing import Any, Literal, Union

import numpy as np

from explorer._types import CALLER, InputError

_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*$")


@functools.cache
def init_hints(cls: type) -> dict[str, tuple[Any, Any]]:
    """Keyword-only constructor arguments of ``cls``: name -> (annotation or None, default)."""
    init = inspect.unwrap(cls.__init__)
    module = sys.modules.get(init.__module__)
    namespace: dict[str, Any] = {**vars(typing), **vars(collections.abc), "np": np}
    if module is not None:
        namespace.update(vars(module))
    hints: dict[str, tuple[Any, Any]] = {}
    for p in inspect.signature(init).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        hint = p.annotation
        if hint is inspect.Parameter.empty:
            hint = None
        elif isinstance(hint, str):
            try:
                hint = eval(hint, namespace)  # noqa: S307 - the class's own annotation, as typing.get_type_hints does
            except Exception:  # noqa: BLE001 - a type only known to type checkers: not checked
                hint = None
        hints[p.name] = (hint, p.default)
    return hints


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def conforms(value: Any, hint: Any) -> bool:  # noqa: PLR0911 - one branch per kind of annotation
    """Whether ``value`` matches the annotation ``hint`` (unknown annotations match anything)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if hint is float:
        return _is_number(value) and not math.isnan(float(value))
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (tuple, list, np.ndarray)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:  # noqa: PLR2004 - tuple[X, ...]
            return all(conforms(v, args[0]) for v in value)
        return not args or (
            len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args, strict=True))
        )
    if origin in (list, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
            return False
        return not args or all(conforms(v, args[0]) for v in value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def describe(hint: Any) -> str:  # noqa: PLR0911 - one branch per kind of annotation
    """Words for an annotation: ``int | None`` -> ``'a whole number or None'``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is None or hint is type(None):
        return "None"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    words = {bool: "True or False", int: "a whole number", float: "a number", str: "a text"}
    if hint in words:
        return words[hint]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:  # noqa: PLR2004
            return f"a list of {describe(args[0]).removeprefix('a ')}s"
        return f"{len(args)} values ({', '.join(describe(a) for a in args)})"
    if origin in (list, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection):
        return f"a list of {describe(args[0]).removeprefix('a ')}s" if args else "a list"
    return getattr(hint, "__name__", str(hint))


def _parse_interval(spec: str) -> tuple[float, float, bool, bool]:
    match = _INTERVAL.match(spec)
    if match is None:
        msg = f"Expected a range in interval notation such as '[0, inf)'; found {spec!r}."
        raise ValueError(msg)
    left, low, high, right = match.groups()
    return float(low), float(high), left == "[", right == "]"


def _range_words(spec: str) -> str:
    low, high, low_closed, high_closed = _parse_interval(spec)
    parts = []
    if math.isfinite(low):
        parts.append(f"{'>=' if low_closed else '>'} {low:g}")
    if math.isfinite(high):
        parts.append(f"{'<=' if high_closed else '<'} {high:g}")
    return " and ".join(parts) or "finite"


def in_range(value: Any, spec: str) -> bool:
    """Whether every number in ``value`` (a number, or a tuple/list of them) lies in ``spec``."""
    low, high, low_closed, high_closed = _parse_interval(spec)
    numbers = value if isinstance(value, (tuple, list, np.ndarray)) else [value]
    for v in numbers:
        if not _is_number(v):
            continue  # None, text, ...: the annotation decides
        x = float(v)
        if math.isnan(x):
            return False
        if x < low or (x == low and not low_closed) or x > high or (x == high and not high_closed):
            return False
    return True


def check_params(cls: type, params: collections.abc.Mapping[str, Any]) -> None:
    """Refuse hyperparameters of the wrong type or out of range with an :class:`InputError`.

    Names the constructor does not take are left to it (Python raises ``TypeError``).

    Raises
    ------
    InputError
        Saying which parameter, what was expected (type, range, default) and what was found.
    """
    hints = init_hints(cls)
    ranges: collections.abc.Mapping[str, str] = getattr(cls, "param_ranges", {})
    for name, value in params.items():
        if name not in hints:
            continue
        hint, default = hints[name]
        expected = None
        if hint is not None and not conforms(value, hint):
            expected = describe(hint)
        elif name in ranges and not in_range(value, ranges[name]):
            expected = f"{describe(hint) if hint is not None else 'a value'} {_range_words(ranges[name])}"
        if expected is not None:
            shown = "" if default is inspect.Parameter.empty else f" (default {default!r})"
            if typing.get_origin(hint) is Literal:
                what_to_do = f"Valid options are: {', '.join(repr(a) for a in typing.get_args(hint))}."
            else:
                example = "" if default is inspect.Parameter.empty else _example(name, default)
                what_to_do = f"Pass {example or 'a valid value'}, or leave it out for the default."
            msg = (
                f"{getattr(cls, 'name', cls.__name__)!s} model: {name} must be {expected}{shown}; "
                f"found {value!r} ({type(value).__name__}). {what_to_do}"
            )
            raise InputError(msg)


def _example(name: str, default: Any) -> str:
    """``max_iter=10`` in Python, ``--param max_iter=10`` on the command line."""
    if CALLER.get() == "cli":
        text = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
        return f"e.g. --param {name}={text}"
    return f"e.g. {name}={default!r}"
