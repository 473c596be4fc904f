"""The one exponential-moving-average primitive shared by MAC, KFAC and SINGD.

Convention (as optax's ``ema``): ``value = decay * value + (1 - decay) * x``; ``count`` counts EMA
*updates* (not optimizer steps, MATH.md T9). The debiased estimate is
``value / (1 - decay**count)``; the power is computed in the value's dtype (at least float32) so it
cannot round to 1 in low precision.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from maccore._xp import Array, device_of, namespace, stats_dtype

__all__ = ["EmaState", "ema_init", "ema_update", "ema_debiased", "ema_weight"]


class EmaState(NamedTuple):
    """Running average. ``count``: 0-d int32 array, number of updates; ``value``: the raw EMA."""

    count: Array
    value: Array


def ema_init(shape: tuple[int, ...], *, xp: Any, dtype: Any = None, device: Any = None) -> EmaState:
    """A zero EMA of the given shape (dtype defaults to float32)."""
    dtype = xp.float32 if dtype is None else dtype
    return EmaState(
        count=xp.zeros((), dtype=xp.int32, device=device),
        value=xp.zeros(shape, dtype=dtype, device=device),
    )


def ema_update(state: EmaState, x: Array, *, decay: float) -> EmaState:
    """Fold ``x`` into the EMA: ``decay * value + (1 - decay) * x``; ``count += 1``."""
    xp = namespace(value=state.value, x=x, where="ema_update")
    if tuple(x.shape) != tuple(state.value.shape):
        raise ValueError(
            f"ema_update: statistic of shape {list(x.shape)} does not match the running average "
            f"of shape {list(state.value.shape)}"
        )
    x = xp.astype(x, state.value.dtype) if x.dtype != state.value.dtype else x
    return EmaState(count=state.count + 1, value=decay * state.value + (1.0 - decay) * x)


def ema_weight(state: EmaState, *, decay: float) -> Array:
    """``1 - decay**count`` (the total weight of the EMA), 0-d in the value's dtype."""
    xp = namespace(value=state.value, where="ema_weight")
    dt = stats_dtype(xp, state.value.dtype)
    count = xp.astype(state.count, dt)
    return 1.0 - xp.pow(xp.asarray(decay, dtype=dt, device=device_of(count)), count)


def ema_debiased(state: EmaState, *, decay: float) -> Array:
    """Bias-corrected average ``value / (1 - decay**count)``; zeros while ``count == 0``."""
    xp = namespace(value=state.value, where="ema_debiased")
    w = ema_weight(state, decay=decay)
    safe = xp.where(w > 0, w, xp.ones_like(w))
    out = state.value / xp.astype(safe, state.value.dtype)
    return out
