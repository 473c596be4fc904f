"""Namespace, device, dtype and validation helpers shared by every core module.

Everything here works on any Array-API namespace reached through ``array_api_compat``;
nothing imports torch, jax or cupy.
"""

from __future__ import annotations

import numbers
from typing import Any

import array_api_compat as compat

Array = Any
Namespace = Any

__all__ = [
    "namespace",
    "device_of",
    "stats_dtype",
    "to_stats",
    "check_ndim",
    "check_dim",
    "check_damping",
    "is_due",
    "shape_str",
]


def shape_str(x: Array) -> str:
    """Shape of ``x`` as ``[a, b, c]`` for error messages."""
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _where(where: str | None) -> str:
    return f"{where}: " if where else ""


def namespace(*, where: str | None = None, **arrays: Array) -> Namespace:
    """Return the common Array-API namespace of the named arrays (``None`` values are ignored).

    Raises:
        TypeError: when an argument is not an array or the arrays come from different libraries
            (the message names every argument with its namespace and shape).
        ValueError: when the arrays live on different devices.
    """
    named = {k: v for k, v in arrays.items() if v is not None}
    spaces = {}
    for name, arr in named.items():
        if not compat.is_array_api_obj(arr):
            raise TypeError(
                f"{_where(where)}argument {name!r} must be an array, got {type(arr).__name__}"
            )
        spaces[name] = compat.array_namespace(arr)
    uniq = {id(xp): xp for xp in spaces.values()}
    if len(uniq) > 1:
        desc = ", ".join(
            f"{n}: {spaces[n].__name__} {shape_str(named[n])}" for n in named
        )
        raise TypeError(f"{_where(where)}arrays from mixed namespaces ({desc})")
    if not uniq:
        raise TypeError(f"{_where(where)}no array argument given")
    xp = next(iter(uniq.values()))
    devices = {name: compat.device(arr) for name, arr in named.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        desc = ", ".join(f"{n}: {d}" for n, d in devices.items())
        raise ValueError(f"{_where(where)}arrays on different devices ({desc})")
    return xp


def device_of(x: Array) -> Any:
    """Device of ``x`` (``array_api_compat.device``)."""
    return compat.device(x)


def stats_dtype(xp: Namespace, dtype: Any) -> Any:
    """The dtype statistics are accumulated in: float64 for float64 input, else float32."""
    return xp.float64 if dtype == xp.float64 else xp.float32


def to_stats(xp: Namespace, x: Array, dtype: Any = None) -> Array:
    """Cast ``x`` to ``dtype`` (default: its statistics dtype) without copying when it already is."""
    dtype = stats_dtype(xp, x.dtype) if dtype is None else dtype
    return x if x.dtype == dtype else xp.astype(x, dtype)


def check_ndim(x: Array, ndim: int | tuple[int, ...], name: str, where: str | None = None) -> None:
    """Raise ``ValueError`` unless ``x.ndim`` equals ``ndim`` (or is one of them)."""
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in allowed:
        want = " or ".join(str(a) for a in allowed)
        raise ValueError(
            f"{_where(where)}argument {name!r} must have {want} dimensions, "
            f"got shape {shape_str(x)}"
        )


def check_dim(
    actual: int, expected: int, what: str, where: str | None = None, detail: str = ""
) -> None:
    """Raise ``ValueError`` naming ``what`` when two sizes disagree."""
    if actual != expected:
        extra = f" ({detail})" if detail else ""
        raise ValueError(f"{_where(where)}{what}: expected {expected}, got {actual}{extra}")


def check_damping(
    damping: Any, name: str = "damping", where: str | None = None, *, pair: bool = True
) -> None:
    """Damping must be a positive finite number (traced/array values are checked elsewhere).

    ``pair=True`` also accepts a tuple of such numbers (KFAC's ``(λ_G, λ_A)``); with ``pair=False``
    a tuple raises ``TypeError``.
    """
    if isinstance(damping, bool):
        raise TypeError(f"{_where(where)}{name} must be a positive number, got {damping!r}")
    if isinstance(damping, numbers.Real):
        if not (damping > 0 and damping != float("inf")):
            raise ValueError(f"{_where(where)}{name} must be positive and finite, got {damping!r}")
    elif isinstance(damping, tuple):
        if not pair:
            raise TypeError(f"{_where(where)}{name} must be a single positive number, got {damping!r}")
        for i, d in enumerate(damping):
            check_damping(d, f"{name}[{i}]", where, pair=False)


def is_due(count: Any, period: int) -> Any:
    """``count % period == 0``: the schedule predicate adapters evaluate (ints or traced arrays)."""
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be a positive integer, got {period!r}")
    return count % period == 0
