"""SINGD / IKFAC (MATH.md §5) as optax transformations over the core :func:`maccore.singd`.

- :func:`singd_method` — the :class:`~maccore_jax.Method` plug-in for :func:`scale_by_curvature`;
- :func:`scale_by_singd` — the preconditioner alone (``C Cᵀ ∇W̃ K Kᵀ`` per layer);
- :func:`singd` — the full optimizer of the published ``singd`` package: preconditioner, then weight
  decay added AFTER preconditioning, then heavy-ball momentum, then the learning rate
  (``d = ĝ + γ W``, ``b ← α2 b + d``, ``W ← W − β2 b``; MATH.md §5.3).

``tx.update(grads, state, params, activations=acts, output_grads=gouts)``: on steps with
``count % T == 0`` the layer inputs and output gradients give ``H_K = Π_K(Kᵀ A K)`` and
``H_C = Π_C(Cᵀ G C)`` (computed by the core from the rows, never forming ``A`` or ``G``), with the
canonical ``A = E_rows[x̃x̃ᵀ]`` and ``G = (1/R) Σ g gᵀ``. The loss reduction ``R`` follows
``loss_average`` like ``maccore_torch.SINGD``: ``"batch"`` (default, a loss averaged over the ``N``
samples of the batch: ``R = 1/N``), ``"batch+sequence"`` (``R = 1/(N·S)``, conv: ``1/(N·OH·OW)``),
``None`` (a summed loss, ``R = 1``); ``reduction_factor=`` (here or per ``update``) overrides it.

The per-layer state is :class:`SingdLayerState` (the core :class:`maccore.singd.SingdState` and the
number of preconditioner updates ``k``): an ``lr_cov`` schedule is evaluated at the step count of the
update, ``k·T`` (the same count ``maccore_torch.SINGD`` passes), since the engine keeps the step count
to itself.

``axis_name``: the rows of every device are gathered (``lax.all_gather``), so every device computes
the statistics of the union of the shards, weighted like the device mean of the per-shard ``A`` and
``G`` (equal shards); pass the per-device loss reduction (``loss_average`` infers it per device).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import array_api_compat
import jax
import jax.numpy as jnp
import optax
from jax import lax

import maccore
from maccore.singd import SingdState
from maccore.singd import singd as _core_singd

from maccore_jax.transform import (
    Method,
    _check_number,
    _check_on_nonfinite,
    _check_optimizer_args,
    scale_by_curvature,
    skip_nonfinite,
)
from maccore_jax.transform import momentum as _momentum

__all__ = ["SingdLayerState", "scale_by_singd", "singd", "singd_method"]

_LOSS_AVERAGE = (None, "batch", "batch+sequence")


def _xp() -> Any:
    return array_api_compat.array_namespace(jnp.zeros(()))


class SingdLayerState(NamedTuple):
    """``singd``: the core state (``K``, ``C``, ``m_K``, ``m_C``); ``updates``: preconditioner
    updates so far (0-d int32)."""

    singd: SingdState
    updates: jax.Array


def singd_method(
    *,
    damping: float = 1e-3,
    alpha1: float = 0.5,
    lr_cov: float | Callable[[Any], Any] = 1e-2,
    structures: tuple[Any, Any] = ("dense", "dense"),
    kfac_like: bool = False,
    kfac_approx: str = "expand",
    loss_average: str | None = "batch",
    reduction_factor: float | None = None,
    preconditioner_dtype: tuple[Any, Any] = (None, None),
    normalize_lr_cov: bool = False,
    T: int = 10,
    axis_name: str | None = None,
) -> Method:
    """SINGD as a :class:`Method` (statistics: the layer's input rows and output-gradient rows and
    the loss reduction; update: the core ``update``; apply: ``C Cᵀ ∇W̃ K Kᵀ``).

    ``T`` must equal the ``t_cov`` given to :func:`scale_by_curvature` (it maps update numbers to
    step counts for an ``lr_cov`` schedule); ``axis_name`` must be the engine's (rows are gathered).
    """
    where = "singd"
    if loss_average not in _LOSS_AVERAGE:
        raise ValueError(f"{where}: loss_average must be one of {_LOSS_AVERAGE}, got {loss_average!r}")
    if reduction_factor is not None:
        _check_number(reduction_factor, "reduction_factor", where)
        if reduction_factor == 0:
            raise ValueError(f"{where}: reduction_factor must be positive, got 0")
    if not callable(lr_cov):
        _check_number(lr_cov, "lr_cov", where)
    if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 1:
        raise ValueError(f"{where}: T must be a positive integer, got {T!r}")
    pc = _core_singd(
        structures=structures,
        alpha1=alpha1,
        lr_cov=0.0,
        damping=damping,
        kfac_like=kfac_like,
        normalize_lr_cov=normalize_lr_cov,
        preconditioner_dtype=preconditioner_dtype,
    )
    reduce = maccore.KFACType(kfac_approx) is maccore.KFACType.REDUCE

    def init(layer, dtype):
        st = pc.init(layer.d_tilde, layer.d_out, xp=_xp(), dtype=dtype)
        return SingdLayerState(st, jnp.zeros((), jnp.int32))

    def statistics(layer, x, g, w, b, extra):
        r = extra.get("reduction_factor", reduction_factor)
        if r is None:
            if loss_average is None:
                r = 1.0
            elif loss_average == "batch":
                r = 1.0 / g.shape[0]
            else:
                r = 1.0 / (g.size // layer.d_out)
        rows = layer.rows(x, reduce=reduce)
        grows = layer.grad_rows(g, reduce=reduce)
        if axis_name is not None:  # identical on every device afterwards (the engine's pmean keeps it)
            rows = lax.all_gather(rows, axis_name, tiled=True)
            grows = lax.all_gather(grows, axis_name, tiled=True)
            r = jnp.asarray(r, jnp.float64 if rows.dtype == jnp.float64 else jnp.float32)
            r = r * lax.psum(jnp.ones((), r.dtype), axis_name)
        return rows, grows, r

    def update(layer, st, stats):
        rows, grows, r = stats
        if isinstance(st.updates, jax.core.Tracer):  # state traced (lax.cond), rows maybe concrete
            rows, grows = (
                jnp.copy(a) if not isinstance(a, jax.core.Tracer) else a for a in (rows, grows)
            )  # (an untouched eager input would look like it lives on another device to the core)
        step = st.updates * T
        beta = lr_cov(step) if callable(lr_cov) else lr_cov
        if hasattr(beta, "ndim"):
            beta = jnp.asarray(beta).reshape(())
        new = pc.update(st.singd, rows, grows, reduction_factor=r, lr_cov=beta)
        return SingdLayerState(new, optax.safe_int32_increment(st.updates))

    return Method(
        "singd",
        init,
        statistics,
        update,
        lambda layer, st: st,  # SINGD keeps no cache
        lambda layer, st, mat: pc.apply(st.singd, mat),
        needs_output_grads=True,
    )


def scale_by_singd(
    *,
    damping: float = 1e-3,
    alpha1: float = 0.5,
    T: int = 10,
    lr_cov: float | Callable[[Any], Any] = 1e-2,
    structures: tuple[Any, Any] = ("dense", "dense"),
    kfac_like: bool = False,
    kfac_approx: str = "expand",
    loss_average: str | None = "batch",
    reduction_factor: float | None = None,
    preconditioner_dtype: tuple[Any, Any] = (None, None),
    normalize_lr_cov: bool = False,
    layers: Mapping | None = None,
    layout: str = "flax",
    axis_name: str | None = None,
    on_nonfinite: str | None = "skip",
) -> optax.GradientTransformationExtraArgs:
    """The SINGD preconditioner alone. ``update`` needs ``activations=`` and ``output_grads=``.

    Args:
        damping, alpha1, lr_cov (float or schedule of the step count), structures, kfac_like,
            normalize_lr_cov, preconditioner_dtype (``(dtype_K, dtype_C)``, e.g. ``jnp.bfloat16``):
            as :func:`maccore.singd` (MATH.md §5).
        T: statistics and preconditioner update every ``T`` steps.
        kfac_approx: ``"expand"`` or ``"reduce"``. loss_average / reduction_factor: the loss
            reduction (module docstring).
        layers, layout, axis_name, on_nonfinite: as :func:`maccore_jax.scale_by_kfac`.
    """
    method = singd_method(
        damping=damping,
        alpha1=alpha1,
        lr_cov=lr_cov,
        structures=structures,
        kfac_like=kfac_like,
        kfac_approx=kfac_approx,
        loss_average=loss_average,
        reduction_factor=reduction_factor,
        preconditioner_dtype=preconditioner_dtype,
        normalize_lr_cov=normalize_lr_cov,
        T=T,
        axis_name=axis_name,
    )
    return scale_by_curvature(
        method,
        t_cov=T,
        t_inv=T,
        layers=layers,
        layout=layout,
        axis_name=axis_name,
        on_nonfinite=on_nonfinite,
    )


def singd(
    learning_rate: Any = 1e-3,
    *,
    momentum: float = 0.9,
    damping: float = 1e-3,
    alpha1: float = 0.5,
    weight_decay: float = 0.0,
    T: int = 10,
    lr_cov: float | Callable[[Any], Any] = 1e-2,
    structures: tuple[Any, Any] = ("dense", "dense"),
    kfac_like: bool = False,
    kfac_approx: str = "expand",
    loss_average: str | None = "batch",
    reduction_factor: float | None = None,
    preconditioner_dtype: tuple[Any, Any] = (None, None),
    normalize_lr_cov: bool = False,
    layers: Mapping | None = None,
    layout: str = "flax",
    axis_name: str | None = None,
    weight_decay_mask: Any = None,
    on_nonfinite: str | None = "skip",
) -> optax.GradientTransformationExtraArgs:
    """SINGD with the published update (= ``maccore_torch.SINGD``): ``d = ĝ + weight_decay·W``
    (weight decay AFTER preconditioning), ``b ← momentum·b + d`` (b₀ = 0), ``W ← W − lr·b``.

    ``learning_rate`` may be a schedule. Leaves outside the preconditioned layers get the same
    update with their raw gradient. ``on_nonfinite="skip"`` skips a NaN/Inf step exactly (every
    state unchanged). Other arguments as :func:`scale_by_singd`.
    """
    where = "singd"
    _check_on_nonfinite(on_nonfinite, where)
    _check_optimizer_args(learning_rate, momentum, weight_decay, where)
    pre = scale_by_singd(
        damping=damping,
        alpha1=alpha1,
        T=T,
        lr_cov=lr_cov,
        structures=structures,
        kfac_like=kfac_like,
        kfac_approx=kfac_approx,
        loss_average=loss_average,
        reduction_factor=reduction_factor,
        preconditioner_dtype=preconditioner_dtype,
        normalize_lr_cov=normalize_lr_cov,
        layers=layers,
        layout=layout,
        axis_name=axis_name,
        on_nonfinite=None,
    )
    parts = [pre]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts += [_momentum(momentum), optax.scale_by_learning_rate(learning_rate)]
    return skip_nonfinite(optax.chain(*parts), on_nonfinite=on_nonfinite)
