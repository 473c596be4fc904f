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
    "check_decay",
    "check_floating",
    "check_positive_int",
    "check_flag",
    "check_xp",
    "is_due",
    "shape_str",
]


def shape_str(x: Array) -> str:
    """Shape of ``x`` as ``[a, b, c]`` for error messages."""
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _where(where: str | None) -> str:
    return f"{where}: " if where else ""


def namespace(
    *, where: str | None = None, optional: tuple[str, ...] | None = None, **arrays: Array
) -> Namespace:
    """Return the common Array-API namespace of the named arrays.

    ``optional``: the names that may be ``None`` (ignored); every other ``None`` raises
    ``TypeError``. ``optional=None`` (legacy) ignores every ``None``.

    Raises:
        TypeError: when an argument is not an array or the arrays come from different libraries
            (the message names every argument with its namespace and shape).
        ValueError: when the arrays live on different devices.
    """
    if optional is not None:
        for name, arr in arrays.items():
            if arr is None and name not in optional:
                raise TypeError(f"{_where(where)}argument {name!r} must be an array, got None")
    vals = [v for v in arrays.values() if v is not None]
    if vals:  # fast path: arrays of one known type on one device (the per-step case)
        t = type(vals[0])
        xp = _NAMESPACE.get(t)
        if xp is not None and all(type(v) is t for v in vals):
            if len(vals) == 1:
                return xp
            get = _DEVICE.get(t)
            if get is not None:
                d0 = get(vals[0])
                if all(get(v) == d0 for v in vals[1:]):
                    return xp
    named = {k: v for k, v in arrays.items() if v is not None}
    spaces = {}
    for name, arr in named.items():
        spaces[name] = _namespace_of(arr, name, where)
    uniq = {id(xp): xp for xp in spaces.values()}
    if len(uniq) > 1:
        desc = ", ".join(
            f"{n}: {spaces[n].__name__} {shape_str(named[n])}" for n in named
        )
        raise TypeError(f"{_where(where)}arrays from mixed namespaces ({desc})")
    if not uniq:
        raise TypeError(f"{_where(where)}no array argument given")
    xp = next(iter(uniq.values()))
    if len(named) == 1:
        return xp
    get = _DEVICE.get(type(next(iter(named.values()))), compat.device)
    devices = {name: get(arr) for name, arr in named.items()}
    # A traced jax array has no device (None): it matches any device.
    known = [d for d in devices.values() if d is not None]
    if any(d != known[0] for d in known[1:]):
        desc = ", ".join(f"{n}: {d}" for n, d in devices.items())
        raise ValueError(f"{_where(where)}arrays on different devices ({desc})")
    return xp


# Array type -> its namespace, and a device getter, for the libraries whose namespace depends on
# the type alone (the per-call overhead of array_api_compat's detection dominates small layers).
_NAMESPACE: dict[type, Any] = {}
_DEVICE: dict[type, Any] = {}
_CACHEABLE = ("numpy", "torch", "jax", "jaxlib", "cupy", "array_api_strict")


def _namespace_of(arr: Any, name: str, where: str | None) -> Any:
    t = type(arr)
    xp = _NAMESPACE.get(t)
    if xp is not None:
        return xp
    if not compat.is_array_api_obj(arr):
        raise TypeError(f"{_where(where)}argument {name!r} must be an array, got {t.__name__}")
    xp = compat.array_namespace(arr)
    if t.__module__.split(".")[0] in _CACHEABLE:
        _NAMESPACE[t] = xp
        if compat.is_torch_array(arr):
            _DEVICE[t] = _torch_device
    return xp


def _torch_device(x: Any) -> Any:
    return x.device


def check_floating(
    xp: Namespace, x: Array, name: str, where: str | None = None, *, integer_ok: bool = False
) -> None:
    """Raise ``TypeError`` unless ``x`` has a real floating dtype (or an integer one with
    ``integer_ok``): booleans and complex numbers are never statistics or gradients."""
    kinds = ("real floating", "integral") if integer_ok else "real floating"
    if not xp.isdtype(x.dtype, kinds):
        want = "a real floating or integer" if integer_ok else "a real floating"
        raise TypeError(
            f"{_where(where)}argument {name!r} must have {want} dtype, got {x.dtype} "
            f"(shape {shape_str(x)})"
        )


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
    damping: Any, name: str = "damping", where: str | None = None, *, pair: bool = True,
    read: bool = True,
) -> None:
    """Damping must be a positive finite number, or a 0-d real floating array (its value is
    checked where it can be read: not when traced, nor with ``read=False``, which reads nothing
    on the host).

    ``pair=True`` also accepts a tuple of two such numbers (KFAC's ``(λ_G, λ_A)``); with
    ``pair=False`` a tuple raises ``TypeError``.
    """
    if isinstance(damping, bool):
        raise TypeError(f"{_where(where)}{name} must be a positive number, got {damping!r}")
    if isinstance(damping, numbers.Real):
        if not isinstance(damping, (int, float)) and type(damping).__module__ != "numpy":
            raise TypeError(  # Fraction, Decimal, ...: arrays cannot be multiplied by them
                f"{_where(where)}{name} must be a float or int, got {type(damping).__name__} "
                f"{damping!r}"
            )
        try:
            value = float(damping)
        except OverflowError:
            raise ValueError(
                f"{_where(where)}{name} is not representable as a float: {str(damping)[:20]}…"
            ) from None
        if not (value > 0 and value != float("inf")):
            raise ValueError(f"{_where(where)}{name} must be positive and finite, got {damping!r}")
    elif isinstance(damping, tuple):
        if not pair:
            raise TypeError(f"{_where(where)}{name} must be a single positive number, got {damping!r}")
        if len(damping) != 2:
            raise ValueError(
                f"{_where(where)}{name} must be a number or a pair (λ_G, λ_A), got {damping!r}"
            )
        for i, d in enumerate(damping):
            check_damping(d, f"{name}[{i}]", where, pair=False)
    elif compat.is_array_api_obj(damping):
        xp = compat.array_namespace(damping)
        if damping.ndim != 0 or not xp.isdtype(damping.dtype, "real floating"):
            raise TypeError(
                f"{_where(where)}{name} must be a number or a 0-d real floating array, got an "
                f"array of shape {shape_str(damping)} and dtype {damping.dtype}"
            )
        if not read:
            return
        try:
            value = float(damping)
        except Exception:  # a traced value (jax.jit): checked where it is made
            return
        check_damping(value, name, where, pair=False)
    else:
        raise TypeError(
            f"{_where(where)}{name} must be a positive number, got {type(damping).__name__} "
            f"{damping!r}"
        )


def check_damping_range(xp: Namespace, damping: Any, dtype: Any, name: str = "damping",
                        where: str | None = None) -> None:
    """A damping given as a number must be a normal number of the dtype the computation runs in
    (below it, ``λ`` rounds to 0 or a subnormal and the damped inverse is lost)."""
    values = damping if isinstance(damping, tuple) else (damping,)
    tiny = float(xp.finfo(dtype).smallest_normal)
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < tiny:
            raise ValueError(
                f"{_where(where)}{name} {v!r} is below the smallest normal "
                f"{getattr(dtype, '__name__', dtype)} ({tiny:.3g}); "
                "use a larger damping or float64 statistics"
            )


def check_decay(decay: Any, name: str = "decay", where: str | None = None) -> None:
    """An EMA decay must be a real number in ``[0, 1)``, or a 0-d real floating array (e.g. a
    hyper-parameter injected by ``optax.inject_hyperparams``): its value is checked when it can be
    read, a traced value (``jax.jit``) is used as it is."""
    if compat.is_array_api_obj(decay) and not isinstance(decay, numbers.Real):
        xp = compat.array_namespace(decay)
        if decay.ndim != 0 or not xp.isdtype(decay.dtype, "real floating"):
            raise TypeError(
                f"{_where(where)}{name} must be a number in [0, 1) or a 0-d real floating array, "
                f"got an array of shape {shape_str(decay)} and dtype {decay.dtype}"
            )
        value = _concrete(decay)
        if value is None:
            return
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{_where(where)}{name} must be in [0, 1), got {value!r}")
        return
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(
            f"{_where(where)}{name} must be a number in [0, 1), got {type(decay).__name__} {decay!r}"
        )
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"{_where(where)}{name} must be in [0, 1), got {decay!r}")


def check_positive_int(v: Any, name: str, where: str | None = None) -> int:
    """``v`` must be a positive integer (not a bool); returns it as ``int``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{_where(where)}{name} must be a positive integer, got {v!r}")
    return int(v)


def check_flag(v: Any, name: str, where: str | None = None) -> bool:
    """``v`` must be a boolean (Python or NumPy); returns it as ``bool``."""
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return bool(v)
    raise TypeError(f"{_where(where)}{name} must be True or False, got {type(v).__name__} {v!r}")


def check_xp(xp: Any, where: str | None = None) -> None:
    """``xp`` must be an Array-API namespace (e.g. ``array_api_compat.array_namespace(x)``)."""
    if not all(hasattr(xp, a) for a in ("zeros", "float32", "asarray", "eye")):
        raise TypeError(
            f"{_where(where)}xp must be an Array-API namespace (e.g. "
            f"array_api_compat.array_namespace(x)), got {type(xp).__name__} {xp!r}"
        )


def _concrete(x: Any) -> Any:
    """The Python value of a 0-d array, or ``None`` when it cannot be read (a traced jax value)."""
    try:
        return x.item() if hasattr(x, "item") else float(x)
    except Exception:  # jax.errors.ConcretizationTypeError and friends: traced
        return None


def check_period(period: Any, name: str = "period", where: str | None = None) -> Any:
    """A positive integer period (statistics / refresh schedules): a Python int (returned as
    ``int``) or a 0-d integer array (e.g. injected by ``optax.inject_hyperparams``; its value is
    checked when it can be read, a traced value is used as it is; returned as it is)."""
    if type(period) is int and period >= 1:  # the common case, without the array probes
        return period
    if compat.is_array_api_obj(period) and not isinstance(period, numbers.Integral):
        xp = compat.array_namespace(period)
        if period.ndim != 0 or not xp.isdtype(period.dtype, "integral"):
            raise ValueError(
                f"{_where(where)}{name} must be a positive integer or a 0-d integer array, got an "
                f"array of shape {shape_str(period)} and dtype {period.dtype}"
            )
        value = _concrete(period)
        if value is not None and value < 1:
            raise ValueError(f"{_where(where)}{name} must be a positive integer, got {int(value)!r}")
        return period
    if isinstance(period, bool) or not isinstance(period, numbers.Integral) or period < 1:
        raise ValueError(f"{_where(where)}{name} must be a positive integer, got {period!r}")
    return int(period)


def is_due(count: Any, period: Any) -> Any:
    """``count % period == 0``: the schedule predicate adapters evaluate. ``count`` an int or a 0-d
    integer array (traced under ``jax.jit``); ``period`` as :func:`check_period` accepts it — with
    arrays the predicate is array arithmetic, a 0-d boolean array."""
    if type(count) is int and type(period) is int and period >= 1:  # every eager step
        return count % period == 0
    check_period(period)
    if isinstance(count, bool) or not (
        isinstance(count, numbers.Integral) or compat.is_array_api_obj(count)
    ):
        raise TypeError(f"is_due: count must be an integer, got {type(count).__name__} {count!r}")
    return count % period == 0


def alias_keyword(value: Any, default: Any, alias: Any, name: str, alias_name: str, where: str) -> Any:
    """One keyword under two names (the core's short one and the adapters' one)."""
    if alias is None:
        return value
    if value != default:
        raise TypeError(f"{where}: give {name!r} or {alias_name!r}, not both")
    return alias
