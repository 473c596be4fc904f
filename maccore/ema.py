"""The one exponential-moving-average primitive shared by MAC, KFAC and SINGD.

Convention (as optax's ``ema``): ``value = decay * value + (1 - decay) * x``; ``count`` counts EMA
*updates* (not optimizer steps, docs/math.md T9). The debiased estimate is
``value / (1 - decay**count)``. The total weight ``1 - decay**count`` is accumulated alongside the
value (``weight = decay * weight + (1 - decay) * 1``) with exactly the arithmetic of the value, so an
entry that is constant across updates debiases to that constant bit-for-bit (docs/math.md M-P5: the bias
entry of â is exactly 1). States without a ``weight`` fall back to the power, computed in the
value's dtype (at least float32) so it cannot round to 1 in low precision.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from maccore._xp import (
    Array,
    check_decay,
    check_floating,
    check_xp,
    device_of,
    namespace,
    stats_dtype,
)

__all__ = ["EmaState", "ema_init", "ema_update", "ema_debiased", "ema_weight"]


class EmaState(NamedTuple):
    """Running average. ``count``: 0-d int32 array, number of updates; ``value``: the raw EMA;
    ``weight``: 0-d, the total weight ``1 - decay**count`` accumulated like ``value`` (``None`` in
    states built by hand: the weight is then recomputed from ``count``)."""

    count: Array
    value: Array
    weight: Array | None = None


def _check_state(state: Any, where: str) -> None:
    if not isinstance(state, EmaState):
        raise TypeError(f"{where}: state must be a maccore.EmaState, got {type(state).__name__}")


def ema_init(shape: tuple[int, ...], *, xp: Any, dtype: Any = None, device: Any = None) -> EmaState:
    """A zero EMA of the given shape (dtype defaults to float32)."""
    check_xp(xp, "ema_init")
    if not (
        isinstance(shape, tuple)
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise ValueError(f"ema_init: shape must be a tuple of non-negative ints, got {shape!r}")
    dtype = xp.float32 if dtype is None else dtype
    return EmaState(
        count=xp.zeros((), dtype=xp.int32, device=device),
        value=xp.zeros(shape, dtype=dtype, device=device),
        weight=xp.zeros((), dtype=dtype, device=device),
    )


def ema_update(state: EmaState, x: Array, *, decay: float) -> EmaState:
    """Fold ``x`` into the EMA: ``decay * value + (1 - decay) * x``; ``count += 1``."""
    _check_state(state, "ema_update")
    check_decay(decay, "decay", "ema_update")
    xp = namespace(value=state.value, x=x, where="ema_update", optional=())
    check_floating(xp, x, "x", "ema_update", integer_ok=True)
    if tuple(x.shape) != tuple(state.value.shape):
        raise ValueError(
            f"ema_update: statistic of shape {list(x.shape)} does not match the running average "
            f"of shape {list(state.value.shape)}"
        )
    x = xp.astype(x, state.value.dtype) if x.dtype != state.value.dtype else x
    weight = state.weight
    if weight is not None:
        # the same expression as for the value: an entry that is 1 in every update equals weight
        one = xp.ones_like(weight)
        weight = decay * weight + (1.0 - decay) * one
    return EmaState(
        count=state.count + 1, value=decay * state.value + (1.0 - decay) * x, weight=weight
    )


def ema_weight(state: EmaState, *, decay: float) -> Array:
    """``1 - decay**count`` (the total weight of the EMA), 0-d in the value's dtype."""
    _check_state(state, "ema_weight")
    check_decay(decay, "decay", "ema_weight")
    xp = namespace(value=state.value, where="ema_weight", optional=())
    if state.weight is not None:
        return state.weight
    dt = stats_dtype(xp, state.value.dtype)
    count = xp.astype(state.count, dt)
    return 1.0 - xp.pow(xp.asarray(decay, dtype=dt, device=device_of(count)), count)


def ema_debiased(state: EmaState, *, decay: float) -> Array:
    """Bias-corrected average ``value / (1 - decay**count)``; zeros while ``count == 0``."""
    _check_state(state, "ema_debiased")
    xp = namespace(value=state.value, where="ema_debiased", optional=())
    w = ema_weight(state, decay=decay)
    safe = xp.astype(xp.where(w > 0, w, xp.ones_like(w)), state.value.dtype)
    out = state.value / safe
    # XLA may divide by a broadcast scalar as a multiplication by its reciprocal, which is not
    # correctly rounded: an entry equal to the weight (e.g. the bias entry of ā, M-P5) must be 1.
    return xp.where(state.value == safe, xp.ones_like(out), out)
