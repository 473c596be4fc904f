"""Argument checks of the optax transformations (shape and value errors are raised where the
arrays are known: :mod:`maccore_jax.transform`).

Every numeric hyper-parameter may be a 0-d array — e.g. under ``optax.inject_hyperparams``, which
turns every number into an array (traced under ``jax.jit``): the learning rate, momentum, weight
decay, damping and the EMA decay ``stat_decay`` enter arithmetic only, and the periods ``t_cov``,
``t_inv`` and ``T`` (0-d integer arrays) enter the schedule as ``count % period == 0`` (array
arithmetic, :func:`maccore.is_due`). Values are checked when they can be read (Python numbers,
concrete arrays); a traced value is used as it is, without Python branching on it. Options that are
not numbers (strings, booleans, layer lists) stay Python values (``inject_hyperparams`` leaves them
static by itself).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

import maccore

__all__ = [
    "NONFINITE",
    "STATIC",
    "STATIC_HINT",
    "WD_MODES",
    "check_nonnegative",
    "check_on_nonfinite",
    "check_optimizer",
    "check_period",
    "check_static",
    "check_weight_decay_mode",
    "is_zero",
]

NONFINITE = (None, "skip", "raise")
WD_MODES = ("coupled", "decoupled")
STATIC = ("stat_decay", "t_cov", "t_inv", "T")
STATIC_HINT = (  # no longer needed: every numeric hyper-parameter may be injected (kept for imports)
    "optax.inject_hyperparams(maccore_jax.mac) injects every numeric hyper-parameter, "
    "t_cov / t_inv / T and stat_decay included; no static_args are needed"
)


def _is_array(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, numbers.Number)


def _value(v: Any) -> float | None:
    """The value of a 0-d array, or ``None`` while it is traced."""
    try:
        return float(v)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return None


def check_nonnegative(v: Any, name: str, where: str) -> None:
    """``v`` ≥ 0 and finite: a Python number, or a 0-d real array (its value checked when known)."""
    if _is_array(v):
        real = any(jnp.issubdtype(v.dtype, k) for k in (jnp.floating, jnp.integer))
        if tuple(v.shape) != () or not real:
            raise TypeError(
                f"{where}: {name} must be a number or a 0-d real array, got an array of shape "
                f"{list(v.shape)} and dtype {v.dtype}"
            )
        value = _value(v)
        if value is None:
            return
        v = value
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{where}: {name} must be a number, got {type(v).__name__} {v!r}")
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{where}: {name} must be >= 0 and finite, got {v!r}")


def check_static(v: Any, name: str, where: str) -> None:
    """A structural hyper-parameter (``stat_decay``): a Python number or a 0-d real array (an
    injected hyper-parameter; its value is checked by the core where it can be read). Kept under
    its old name: these used to have to be Python numbers."""
    if _is_array(v):
        real = any(jnp.issubdtype(v.dtype, k) for k in (jnp.floating, jnp.integer))
        if tuple(v.shape) != () or not real:
            raise TypeError(
                f"{where}: {name} must be a number or a 0-d real array, got an array of shape "
                f"{list(v.shape)} and dtype {v.dtype}"
            )


def check_period(v: Any, name: str, where: str) -> Any:
    """A positive integer period (statistics / refresh): a Python int (returned as ``int``) or a
    0-d integer array (``optax.inject_hyperparams``; the schedule then runs on array arithmetic):
    :func:`maccore.check_period`."""
    return maccore.check_period(v, name, where)


def check_on_nonfinite(on_nonfinite: Any, where: str) -> None:
    if on_nonfinite not in NONFINITE:
        raise ValueError(f"{where}: on_nonfinite must be one of {NONFINITE}, got {on_nonfinite!r}")


def check_weight_decay_mode(mode: Any, where: str) -> None:
    if mode not in WD_MODES:
        raise ValueError(f"{where}: weight_decay_mode must be one of {WD_MODES}, got {mode!r}")


def check_optimizer(learning_rate: Any, momentum: Any, weight_decay: Any, nesterov: Any,
                    weight_decay_mode: Any, where: str) -> None:
    """The momentum / weight-decay options shared by :func:`~maccore_jax.mac`,
    :func:`~maccore_jax.kfac` and :func:`~maccore_jax.singd`; a learning-rate schedule (callable)
    is the caller's."""
    check_nonnegative(momentum, "momentum", where)
    check_nonnegative(weight_decay, "weight_decay", where)
    if not callable(learning_rate):
        check_nonnegative(learning_rate, "learning_rate", where)
    if not isinstance(nesterov, bool):
        raise TypeError(f"{where}: nesterov must be True or False, got {nesterov!r}")
    check_weight_decay_mode(weight_decay_mode, where)


def is_zero(v: Any) -> bool:
    """``v`` is the Python number 0 (an array, even a zero one, may change: it is kept)."""
    return not _is_array(v) and not isinstance(v, bool) and isinstance(v, numbers.Real) and v == 0
