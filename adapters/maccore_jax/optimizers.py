"""The public optax transformations: the preconditioners ``scale_by_mac`` / ``scale_by_kfac`` /
``scale_by_singd`` (a :mod:`maccore.engine` method driven by :func:`scale_by_curvature`) and the
full optimizers ``mac`` / ``kfac`` / ``singd`` (preconditioner, momentum, weight decay, learning
rate — the update rule of ``maccore_torch.CurvatureOptimizer``).

Each keyword list is written once: a method's own keywords in its ``scale_by_*``, the layer and
device keywords in :func:`scale_by_curvature`, the momentum / weight-decay keywords in
:data:`OPTIMIZER_OPTIONS`; every public function's signature (``inspect.signature``, which
``optax.inject_hyperparams`` binds against) is the union of the lists it accepts.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from maccore import engine
from maccore import kl_clip_scale as maccore_kl_clip_scale

from maccore_jax.specs import discover, skip_names
from maccore_jax.transform import curvature_states, scale_by_curvature, skip_nonfinite
from maccore_jax.validation import (
    check_on_nonfinite,
    check_optimizer,
    check_period,
    check_static,
    is_zero,
)

__all__ = [
    "MomentumState",
    "OPTIMIZER_OPTIONS",
    "kfac",
    "mac",
    "momentum",
    "scale_by_kfac",
    "scale_by_mac",
    "scale_by_singd",
    "singd",
]

_KW = inspect.Parameter.KEYWORD_ONLY


def _signature(*fns: Callable, drop: tuple[str, ...] = ()) -> inspect.Signature:
    """The union of the named parameters of ``fns`` (first occurrence wins, ``**kwargs`` left out;
    ``drop``: names not taken from ``fns[1:]``)."""
    params: dict[str, inspect.Parameter] = {}
    for i, fn in enumerate(fns):
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.VAR_KEYWORD and (i == 0 or p.name not in drop):
                params.setdefault(p.name, p)
    return inspect.Signature(list(params.values()))


def _extends(*others: Callable, drop: tuple[str, ...] = ()):
    """Decorator: ``fn(**own, **rest)`` forwards ``rest`` to ``others``; its signature (checked
    on every call) is the union of its own parameters and theirs."""

    def deco(fn):
        sig = _signature(fn, *others, drop=drop)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                sig.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{fn.__name__}: {exc}") from None
            return fn(*args, **kwargs)

        wrapper.__signature__ = sig
        return wrapper

    return deco


# ---- preconditioners -----------------------------------------------------------------------------
@_extends(scale_by_curvature, drop=("method", "lr_cov"))
def scale_by_mac(
    *,
    stat_decay: float = 0.95,
    damping: float = 1.0,
    t_cov: int = 5,
    t_inv: int = 50,
    scale: str = "reference",
    diagonal: bool = False,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    """The MAC preconditioner alone (``maccore.mac_method``); chain it with any optax optimizer.

    Args:
        stat_decay, damping, scale: EMA decay β, damping λ, ``"reference"`` (λ·(ââᵀ+λI)⁻¹, the
            published code) or ``"inverse"`` ((ââᵀ+λI)⁻¹).
        t_cov, t_inv: statistics every ``t_cov`` steps, cache refresh every ``t_inv`` steps.
        diagonal: SMAC — also the diagonal output factor diag(1/(ẑ+λ)), ẑ the EMA of E_rows[g⊙g];
            ``update`` then needs ``output_grads=`` (as KFAC; fused qkv layers keep plain MAC).
        **options: ``layers``, ``skip_layers``, ``attention``, ``layout``, ``axis_name``,
            ``on_nonfinite`` of :func:`scale_by_curvature`.

    A layer's MAC state can be given the first layer's true inverse with
    :func:`maccore_jax.fit_first_layer`.
    """
    check_static(stat_decay, "stat_decay", "scale_by_mac")
    method = engine.mac_method(stat_decay=stat_decay, damping=damping, scale=scale,
                               diagonal=diagonal)
    return scale_by_curvature(method, t_cov=t_cov, t_inv=t_inv, **options)


@_extends(scale_by_curvature, drop=("method", "lr_cov"))
def scale_by_kfac(
    *,
    stat_decay: float = 0.95,
    damping: Any = 0.1,
    t_cov: int = 1,
    t_inv: int = 10,
    damping_mode: str = "tikhonov",
    kfac_approx: str = "expand",
    loss_average: str | None = "batch",
    reduction_factor: float | None = None,
    kl_clip: float | None = None,
    learning_rate: Any = None,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    """The exact-KFAC preconditioner alone (``maccore.kfac_method``). ``update`` needs
    ``activations=`` and ``output_grads=``.

    Args:
        damping_mode: ``"tikhonov"`` (damping λ or a pair (λ_G, λ_A)), ``"pi"`` or ``"exact"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` (docs/math.md).
        loss_average: the loss the output gradients come from (as ``maccore_torch.KFAC``):
            ``"batch"`` (default; averaged over the N samples of the batch: R = 1/N),
            ``"batch+sequence"`` (also over the shared axes: R = 1/(N·S), conv 1/(N·OH·OW)) or
            ``None`` (summed: R = 1).
        reduction_factor: R of the loss L = R·Σ terms (docs/math.md), overriding ``loss_average``;
            ``update(..., reduction_factor=R)`` overrides both for one update.
        kl_clip: κ of the KL clipping (docs/kfac.md; ``None``, the default here, disables it):
            every preconditioned gradient is scaled by the one factor
            ν = :func:`maccore.kl_clip_scale` of all preconditioned layers. Needs
            ``learning_rate`` (a number, a 0-d array or a schedule of the step count): the step
            size of the optimizer that applies the preconditioned gradients.
            :func:`maccore_jax.kfac` clips by default with its own learning rate.
        Others as :func:`scale_by_mac`.
    """
    check_static(stat_decay, "stat_decay", "scale_by_kfac")
    method = engine.kfac_method(stat_decay=stat_decay, damping=damping, damping_mode=damping_mode,
                                kfac_approx=kfac_approx, loss_average=loss_average,
                                reduction_factor=reduction_factor)
    tx = scale_by_curvature(method, t_cov=t_cov, t_inv=t_inv, **options)
    if kl_clip is None:
        return tx
    if learning_rate is None:
        raise ValueError("scale_by_kfac: kl_clip needs the learning_rate of the optimizer that "
                         "applies the preconditioned gradients")
    return _kl_clipped(tx, kl_clip, learning_rate, options)


def _kl_clipped(tx: optax.GradientTransformationExtraArgs, kl_clip: Any, learning_rate: Any,
                options: dict) -> optax.GradientTransformationExtraArgs:
    """``tx`` (a KFAC preconditioner) followed by the KL clipping: the preconditioned gradients P
    of every preconditioned layer scaled by ν = ``maccore.kl_clip_scale(P, G, kl_clip=κ, lr=η)``
    (G the incoming gradients, η the learning rate at the curvature state's step count). The
    state is ``tx``'s (checkpoints unchanged); other leaves pass through."""
    z = jnp.zeros(1)
    maccore_kl_clip_scale(z, z, kl_clip=kl_clip)  # validates κ up front

    def find(tree):
        return discover(tree, layout=options.get("layout", "flax"), layers=options.get("layers"),
                        attention=options.get("attention"),
                        skip=skip_names(options.get("skip_layers")))

    def update_fn(updates, state, params=None, **extra):
        new, new_state = tx.update(updates, state, params, **extra)
        found, grads, treedef = find(updates)
        idx = [i for layer in found.values() for i in (layer.weight_index, layer.bias_index)
               if i is not None]
        if not idx:
            return new, new_state
        pre = jax.tree_util.tree_leaves(new)
        lr = learning_rate
        if callable(lr):
            lr = lr(curvature_states(state)[0].count)
        nu = maccore_kl_clip_scale([pre[i] for i in idx], [grads[i] for i in idx],
                                   kl_clip=kl_clip, lr=lr)
        out = list(pre)
        for i in idx:
            out[i] = (out[i] * nu).astype(out[i].dtype)
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


@_extends(scale_by_curvature, drop=("method", "lr_cov", "t_cov", "t_inv"))
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
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    """The SINGD preconditioner alone (``maccore.singd_method``; ``C Cᵀ ∇W̃ K Kᵀ`` per layer).
    ``update`` needs ``activations=`` and ``output_grads=``.

    Args:
        damping, alpha1, structures, kfac_like, normalize_lr_cov, preconditioner_dtype: as
            :func:`maccore.singd` (``preconditioner_dtype`` is a pair ``(dtype_K, dtype_C)``, e.g.
            ``jnp.bfloat16``).
        T: statistics and preconditioner update every ``T`` steps.
        lr_cov: β1, a number or a schedule of the step count (evaluated at the step of the update,
            as ``maccore_torch.SINGD``).
        kfac_approx, loss_average, reduction_factor: as :func:`scale_by_kfac`.
        **options: ``layers``, ``skip_layers``, ``attention``, ``layout``, ``axis_name``,
            ``on_nonfinite`` of :func:`scale_by_curvature`.
    """
    where = "scale_by_singd"
    T = check_period(T, "T", where)
    method = engine.singd_method(damping=damping, alpha1=alpha1, lr_cov=lr_cov,
                                 structures=structures, kfac_like=kfac_like,
                                 kfac_approx=kfac_approx, loss_average=loss_average,
                                 reduction_factor=reduction_factor,
                                 preconditioner_dtype=preconditioner_dtype,
                                 normalize_lr_cov=normalize_lr_cov)
    return scale_by_curvature(method, t_cov=T, t_inv=T, lr_cov=lr_cov, **options)


# ---- momentum and the optimizers -----------------------------------------------------------------
class MomentumState(NamedTuple):
    """``count``: steps taken (0-d int32); ``trace``: the momentum buffer b (like the params)."""

    count: jax.Array
    trace: Any


def momentum(decay: float = 0.9, *, nesterov: bool = False) -> optax.GradientTransformation:
    """Heavy ball b ← μb + d (b₀ = 0), direction b; Nesterov (docs/math.md; nanoGPT's
    ``nag_step``): direction d at the first step, d + μb afterwards."""

    def init_fn(params):
        return MomentumState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        trace = jax.tree.map(lambda g, t: decay * t + g, updates, state.trace)
        if nesterov:
            first = state.count == 0
            out = jax.tree.map(lambda g, t: jnp.where(first, g, g + decay * t), updates, trace)
        else:
            out = trace
        return out, MomentumState(optax.safe_int32_increment(state.count), trace)

    return optax.GradientTransformation(init_fn, update_fn)


OPTIMIZER_OPTIONS = (
    inspect.Parameter("momentum", _KW, default=0.9),
    inspect.Parameter("weight_decay", _KW, default=0.0),
    inspect.Parameter("nesterov", _KW, default=False),
    inspect.Parameter("weight_decay_mode", _KW, default="decoupled"),
    inspect.Parameter("weight_decay_mask", _KW, default=None),
    inspect.Parameter("on_nonfinite", _KW, default="skip"),
)
"""The keywords every optimizer adds to its preconditioner's (defaults may differ per optimizer)."""


def _update_rule(pre, learning_rate, momentum_, weight_decay, nesterov, weight_decay_mode,
                 weight_decay_mask, on_nonfinite, where):
    """``maccore_torch.CurvatureOptimizer``'s update after the preconditioner ``pre`` (ĝ):
    ``"coupled"``: d = ĝ + wd·p, b = μb + d, p ← p − ηb; ``"decoupled"``: b = μb + ĝ,
    p ← (1 − η·wd)p − ηb; ``nesterov``: the direction is d (first step) or d + μb."""
    check_optimizer(learning_rate, momentum_, weight_decay, nesterov, weight_decay_mode, where)
    decay = [] if is_zero(weight_decay) else [
        optax.add_decayed_weights(weight_decay, weight_decay_mask)]
    heavy_ball = [momentum(momentum_, nesterov=nesterov)]
    parts = decay + heavy_ball if weight_decay_mode == "coupled" else heavy_ball + decay
    parts = [pre, *parts, optax.scale_by_learning_rate(learning_rate)]
    return skip_nonfinite(optax.chain(*parts), on_nonfinite=on_nonfinite, check_params=True)


def _optimizer(pre: Callable, name: str, doc: str, *, learning_rate: Any = inspect.Parameter.empty,
               forward: tuple[str, ...] = (),
               **defaults: Any) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """The optimizer ``name(learning_rate, **OPTIMIZER_OPTIONS, **pre's keywords)``: the
    preconditioner ``pre`` followed by :func:`_update_rule`. ``defaults`` overrides defaults of
    :data:`OPTIMIZER_OPTIONS` and of ``pre``'s keywords; ``forward``: optimizer options that
    ``pre`` receives too (KFAC's KL clipping reads ``learning_rate``)."""
    head = [inspect.Parameter("learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=learning_rate)]
    head += [p.replace(default=defaults.get(p.name, p.default)) for p in OPTIMIZER_OPTIONS]
    own = {p.name for p in head}
    sig = inspect.Signature(head + [p.replace(default=defaults.get(p.name, p.default))
                                    for p in inspect.signature(pre).parameters.values()
                                    if p.name not in own])

    def factory(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}: {exc}") from None
        bound.apply_defaults()
        rest = dict(bound.arguments)
        opts = {k: rest.pop(k) for k in own}
        check_on_nonfinite(opts["on_nonfinite"], name)
        precond = pre(**rest, **{k: opts[k] for k in forward}, on_nonfinite=None)
        return _update_rule(precond, opts["learning_rate"], opts["momentum"],
                            opts["weight_decay"], opts["nesterov"], opts["weight_decay_mode"],
                            opts["weight_decay_mask"], opts["on_nonfinite"], name)

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = __name__
    factory.__doc__ = doc
    factory.__signature__ = sig
    return factory


mac = _optimizer(scale_by_mac, "mac", """MAC (SMAC with ``diagonal=True``) with heavy-ball
momentum and weight decay — the update of ``maccore_torch.MAC``: the same model, data and hyper-parameters give the same trajectory.

``mac(learning_rate, *, momentum=0.9, weight_decay=0.0, nesterov=False,
weight_decay_mode="decoupled", weight_decay_mask=None, on_nonfinite="skip", **scale_by_mac's
keywords)``. ``learning_rate`` may be a schedule.

- ``weight_decay_mode="decoupled"`` (default, the optax convention): b ← μb + ĝ,
  p ← (1 − η·wd)p − ηb; ``"coupled"`` (``maccore_torch.MAC``'s default, docs/math.md): d = ĝ + wd·p
  after preconditioning, b ← μb + d, p ← p − ηb. ``nesterov``: direction d at the first step,
  d + μb afterwards. ``weight_decay_mask``: as ``optax.add_decayed_weights``.
- ``on_nonfinite="skip"`` (default) skips a step with NaN/Inf gradients, statistics or updates
  exactly: zero updates, every state (running averages, momenta, counters, schedule count)
  unchanged, as ``maccore_torch.MAC`` does; ``"raise"``; ``None`` (no check).
- ``optax.inject_hyperparams(maccore_jax.mac)(learning_rate=...)`` needs no ``static_args``:
  every numeric hyper-parameter (``t_cov``, ``t_inv`` and ``stat_decay`` included) may be an
  injected array or a schedule (the same holds for :func:`kfac` and :func:`singd`).
- Gradient accumulation: :class:`maccore_jax.MultiSteps` with ``pool_micro_batches=True``;
  ``optax.masked`` / ``optax.multi_transform`` precondition a subset of the layers
  (docs/models/jax.md).
""")

kfac = _optimizer(scale_by_kfac, "kfac", """Exact KFAC with the momentum / weight-decay update of
:func:`mac` (= ``maccore_torch.KFAC``): ``kfac(learning_rate, *, momentum=0.9, weight_decay=0.0,
nesterov=False, weight_decay_mode="decoupled", weight_decay_mask=None, on_nonfinite="skip",
kl_clip=1e-3, **scale_by_kfac's keywords)``. ``update`` needs ``activations=`` and
``output_grads=``; the loss reduction follows ``loss_average`` (default ``"batch"``) unless
``reduction_factor=`` is given.

``kl_clip`` (default ``1e-3``; ``None`` disables): the preconditioned gradients are scaled by
ν = min(1, sqrt(κ / Σ_layers η²⟨P, G⟩)) (:func:`maccore.kl_clip_scale`, η = ``learning_rate``
at the step, a schedule included) before weight decay and momentum — as ``maccore_torch.KFAC``
(docs/kfac.md).
""", forward=("learning_rate",), kl_clip=1e-3)

singd = _optimizer(scale_by_singd, "singd", """SINGD with the published update (=
``maccore_torch.SINGD``): ``d = ĝ + weight_decay·W`` (weight decay AFTER preconditioning,
``weight_decay_mode="coupled"``, the default here), ``b ← momentum·b + d`` (b₀ = 0),
``W ← W − lr·b``.

``singd(learning_rate=1e-3, *, momentum=0.9, weight_decay=0.0, nesterov=False,
weight_decay_mode="coupled", weight_decay_mask=None, on_nonfinite="skip", **scale_by_singd's
keywords)``. ``learning_rate`` may be a schedule. Leaves outside the preconditioned layers get the
same update with their raw gradient. ``on_nonfinite="skip"`` skips a NaN/Inf step exactly (every
state unchanged).
""", learning_rate=1e-3, weight_decay_mode="coupled")
