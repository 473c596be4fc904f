"""optax transformations: one schedule engine (:func:`scale_by_curvature`) and one :class:`Method` per
curvature method (MAC, KFAC; a third plugs in the same way).

``tx.update(grads, state, params, activations=acts, output_grads=gouts, **extra)``:

1. at ``count % t_cov == 0`` every layer's batch statistics (``Method.statistics``) are computed,
   averaged across devices (``lax.pmean`` over ``axis_name``) and folded into the running averages;
2. at ``count % t_inv == 0`` the caches are rebuilt (``Method.refresh``); both happen at count 0;
3. every layer's gradient is preconditioned (``Method.apply``); other leaves pass through.

Both schedule branches are ``lax.cond`` on the traced count, so the update jits as a whole.

Non-finite steps (``on_nonfinite``, :func:`skip_nonfinite`): a step whose gradients, statistics,
refreshed caches or updates hold NaN/Inf returns zero updates and the state exactly as it was
(counters included), with ``jnp.where`` so it works under ``jit``; ``"raise"`` raises
``FloatingPointError`` (eagerly; under ``jit`` from a host callback, surfacing as a
``JaxRuntimeError`` that carries the message). See ``docs/numerics.md``.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, NamedTuple

import array_api_compat
import jax
import jax.numpy as jnp
import maccore
import optax
from jax import lax

from maccore_jax.specs import Layer, discover, layer_name, lookup

__all__ = [
    "CurvatureState",
    "AttentionMacState",
    "MomentumState",
    "Method",
    "scale_by_curvature",
    "mac_method",
    "kfac_method",
    "scale_by_mac",
    "scale_by_kfac",
    "mac",
    "kfac",
    "momentum",
    "skip_nonfinite",
]

_NONFINITE = (None, "skip", "raise")


def _xp() -> Any:
    return array_api_compat.array_namespace(jnp.zeros(()))


class CurvatureState(NamedTuple):
    """``count``: optimizer steps taken (0-d int32); ``layers``: per-layer core states by layer name."""

    count: jax.Array
    layers: dict[str, Any]


class Method(NamedTuple):
    """What a curvature method does with one layer; the engine handles trees, schedule and devices.

    - ``init(layer, dtype) -> state``
    - ``statistics(layer, x, g, w, b, extra) -> pytree``: this batch's statistics from the layer input
      ``x``, output gradient ``g`` (``None`` unless ``needs_output_grads``) and parameters ``w``, ``b``
      (``None`` unless ``needs_params(layer)``); the engine averages them across devices.
    - ``update(layer, state, stats) -> state`` (fold into the EMAs), ``refresh(layer, state) -> state``,
      ``apply(layer, state, grad_mat) -> grad_mat``.
    """

    name: str
    init: Callable[..., Any]
    statistics: Callable[..., Any]
    update: Callable[..., Any]
    refresh: Callable[..., Any]
    apply: Callable[..., Any]
    needs_output_grads: bool = False
    needs_params: Callable[[Layer], bool] = lambda layer: False


def scale_by_curvature(
    method: Method,
    *,
    t_cov: int = 5,
    t_inv: int = 50,
    layers: Mapping | None = None,
    attention: Mapping | None = None,
    layout: str = "flax",
    axis_name: str | None = None,
    on_nonfinite: str | None = "skip",
) -> optax.GradientTransformationExtraArgs:
    """Precondition the gradients of every discovered layer with ``method`` (see module docstring).

    ``on_nonfinite``: ``"skip"`` (zero updates, curvature state unchanged), ``"raise"`` or ``None``
    (no check); see :func:`skip_nonfinite`.
    """
    if not isinstance(method, Method):
        raise TypeError(f"scale_by_curvature: method must be a maccore_jax.Method, got {method!r}")
    where = f"scale_by_{method.name}"
    for nm, v in (("t_cov", t_cov), ("t_inv", t_inv)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{where}: {nm} must be a positive integer, got {v!r}")
    _check_on_nonfinite(on_nonfinite, where)

    excluded = {layer_name(k) for k, v in (layers or {}).items() if v is None}

    def find(tree):
        return discover(tree, layout=layout, layers=layers, attention=attention)

    def init_fn(params):
        found, leaves, _ = find(params)
        states = {}
        for n, layer in found.items():
            dt = leaves[layer.weight_index].dtype
            states[n] = method.init(layer, jnp.float64 if dt == jnp.float64 else jnp.float32)
        return CurvatureState(jnp.zeros((), jnp.int32), states)

    def update_fn(updates, state, params=None, *, activations=None, output_grads=None, **extra):
        if params is not None:
            _check_like(updates, params, where)
        found, leaves, treedef = find(updates)
        if set(found) != set(state.layers):
            raise ValueError(
                f"{where}: the state was initialised for layers {sorted(state.layers)} but "
                f"the gradients have layers {sorted(found)}"
            )
        acts = _match(activations, found, "activations", where, excluded)
        gouts = (
            _match(output_grads, found, "output_grads", where, excluded)
            if method.needs_output_grads
            else {}
        )
        pleaves = None
        if any(method.needs_params(layer) for layer in found.values()):
            if params is None:
                raise ValueError(f"{where}: attention layers need params= in update")
            pleaves = find(params)[1]
        for n, layer in found.items():
            layer.check_input(acts[n])
            if method.needs_output_grads:
                layer.check_output_grad(acts[n], gouts[n])

        def collect(ls):
            new = {}
            for n, layer in found.items():
                w = b = None
                if pleaves is not None and method.needs_params(layer):
                    w = pleaves[layer.weight_index]
                    b = None if layer.bias_index is None else pleaves[layer.bias_index]
                with _layer_errors(where, n):
                    stats = method.statistics(layer, acts[n], gouts.get(n), w, b, extra)
                    if axis_name is not None:
                        stats = jax.tree.map(lambda s: lax.pmean(s, axis_name), stats)
                    new[n] = method.update(layer, ls[n], stats)
            return new

        def refresh(ls):
            new = {}
            for n, layer in found.items():
                with _layer_errors(where, n):
                    new[n] = method.refresh(layer, ls[n])
            return new

        ls = dict(state.layers)
        ls = lax.cond(maccore.is_due(state.count, t_cov), collect, lambda s: s, ls)
        ls = lax.cond(maccore.is_due(state.count, t_inv), refresh, lambda s: s, ls)
        out = list(leaves)
        for n, layer in found.items():
            gb = None if layer.bias_index is None else leaves[layer.bias_index]
            with _layer_errors(where, n):
                mat = method.apply(layer, ls[n], layer.grad_mat(leaves[layer.weight_index], gb))
            w, b = layer.split(mat)
            out[layer.weight_index] = w
            if b is not None:
                out[layer.bias_index] = b
        return jax.tree_util.tree_unflatten(treedef, out), CurvatureState(
            optax.safe_int32_increment(state.count), ls
        )

    return skip_nonfinite(
        optax.GradientTransformationExtraArgs(init_fn, update_fn), on_nonfinite=on_nonfinite
    )


def _check_like(updates: Any, params: Any, where: str) -> None:
    """The gradients must have the tree structure and leaf shapes of the parameters."""
    flat_u, tu = jax.tree_util.tree_flatten_with_path(updates)
    flat_p, tp = jax.tree_util.tree_flatten_with_path(params)
    if tu != tp:
        names_u = sorted(jax.tree_util.keystr(k) for k, _ in flat_u)
        names_p = sorted(jax.tree_util.keystr(k) for k, _ in flat_p)
        raise ValueError(
            f"{where}: the gradient tree does not have the structure of params (leaves only in "
            f"the gradients: {sorted(set(names_u) - set(names_p))}; only in params: "
            f"{sorted(set(names_p) - set(names_u))})"
        )
    for (path, u), (_, p) in zip(flat_u, flat_p):
        su, sp = getattr(u, "shape", None), getattr(p, "shape", None)
        if su != sp:
            raise ValueError(
                f"{where}: gradient {jax.tree_util.keystr(path)} has shape "
                f"{None if su is None else list(su)}, the parameter {None if sp is None else list(sp)}"
            )


class _layer_errors:
    """Re-raise core errors (``DecompositionError``, ``ValueError``, ``TypeError``) naming the layer."""

    def __init__(self, where: str, name: str):
        self.prefix = f"{where}: layer {name!r}"

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or not isinstance(exc, (maccore.DecompositionError, ValueError, TypeError)):
            return False
        if self.prefix in str(exc):
            return False
        try:
            renamed = typ(f"{self.prefix}: {exc}")
        except Exception:  # an exception type with a custom constructor: keep it as it is
            return False
        raise renamed from exc


def _check_on_nonfinite(on_nonfinite: Any, where: str) -> None:
    if on_nonfinite not in _NONFINITE:
        raise ValueError(f"{where}: on_nonfinite must be one of {_NONFINITE}, got {on_nonfinite!r}")


def _all_finite(tree: Any) -> jax.Array:
    flags = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not flags:
        return jnp.asarray(True)
    return jnp.all(jnp.stack(flags))


_NONFINITE_MSG = (
    "maccore_jax: non-finite gradients, statistics or updates; the step was skipped and the "
    "optimizer state left unchanged"
)


def _raise_if_bad(ok: Any) -> None:
    if not bool(ok):
        raise FloatingPointError(_NONFINITE_MSG)


def skip_nonfinite(
    inner: optax.GradientTransformation, *, on_nonfinite: str | None = "skip"
) -> optax.GradientTransformationExtraArgs:
    """Make ``inner`` skip non-finite steps exactly: when the incoming gradients, the updates or
    the new state (running averages, caches, momenta) hold a NaN or Inf, the step returns zero
    updates and the OLD state, counters included — so a skipped step is as if the batch had not
    been seen. The state has the structure of ``inner``'s (checkpoints stay interchangeable).

    Args:
        inner: any optax transformation (extra ``update`` keyword arguments are passed through).
        on_nonfinite: ``"skip"``; ``"raise"`` — ``FloatingPointError`` when called eagerly; under
            ``jax.jit`` the error is raised by a host callback and surfaces as a
            ``jax.errors.JaxRuntimeError`` carrying the message; ``None`` returns ``inner`` as is.

    Unlike ``optax.apply_if_finite`` it keeps no counter of its own and never lets a non-finite
    step through. :func:`mac` and :func:`kfac` wrap their whole chain with it; ``scale_by_*``
    wrap only the preconditioner (the rest of your chain then sees zero updates).
    """
    _check_on_nonfinite(on_nonfinite, "skip_nonfinite")
    inner = optax.with_extra_args_support(inner)
    if on_nonfinite is None:
        return inner

    def update_fn(updates, state, params=None, **extra):
        new_updates, new_state = inner.update(updates, state, params, **extra)
        ok = _all_finite((updates, new_updates, new_state))
        if on_nonfinite == "raise":
            try:
                concrete = bool(ok)
            except jax.errors.ConcretizationTypeError:
                jax.debug.callback(_raise_if_bad, ok)
            else:
                if not concrete:
                    raise FloatingPointError(_NONFINITE_MSG)

        def pick(new, old):
            return jnp.where(ok, new, old) if hasattr(new, "dtype") else new

        out = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
        return out, jax.tree.map(pick, new_state, state)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _match(
    tree: Any, found: dict[str, Layer], what: str, where: str, excluded: set
) -> dict[str, Any]:
    if tree is None:
        raise ValueError(
            f"{where}: update needs {what}= (a tree like params with each layer's "
            f"{'input' if what == 'activations' else 'output gradient'}), for layers {list(found)}"
        )
    got = lookup(tree, what)
    missing = [n for n in found if n not in got]
    if missing:
        desc = ", ".join(
            f"{n!r} ({found[n].layout} weight {list(found[n].weight_shape)})" for n in missing
        )
        raise ValueError(
            f"{where}: {what} missing for layer(s) {desc}; pass them, or exclude a layer "
            f"with layers={{name: None}}. {what} has {sorted(got)}"
        )
    extra = sorted(set(got) - set(found) - excluded)
    if extra:
        raise ValueError(
            f"{where}: {what} given for {extra}, which are not preconditioned layers of the "
            f"gradient tree (layers: {sorted(found)})"
        )
    return got


# ---- MAC -------------------------------------------------------------------------------------------
class AttentionMacState(NamedTuple):
    """A fused qkv layer: ``main`` (ā, for the Q and K rows) and ``value`` (attention-weighted v̄)."""

    main: maccore.MacState
    value: maccore.MacState


def mac_method(
    *, stat_decay: float = 0.95, damping: float = 1.0, scale: str = "reference"
) -> Method:
    """MAC (MATH.md §3): ā per layer, the attention-weighted v̄ for the V rows of declared qkv layers."""
    pc = maccore.mac(decay=stat_decay, damping=damping, scale=scale)

    def init(layer, dtype):
        st = pc.init(layer.d_tilde, layer.d_out, xp=_xp(), dtype=dtype)
        if layer.qkv is None:
            return st
        heads = layer.qkv.num_heads if layer.qkv.mode == "per_head" else None
        return AttentionMacState(
            st, pc.init(layer.d_tilde, layer.d_out, xp=_xp(), heads=heads, dtype=dtype)
        )

    def statistics(layer, x, g, w, b, extra):
        if layer.qkv is None:
            return layer.mean(x)
        q, k, _ = maccore.split_qkv(layer.forward(x, w, b), layer.qkv.num_heads)
        attn = maccore.attention_probs(q, k, causal=layer.qkv.causal)
        return layer.mean(x), maccore.attention_weighted_mean(
            x, attn, bias=layer.has_bias, mode=layer.qkv.mode
        )

    def update(layer, st, stats):
        if layer.qkv is None:
            return pc.update(st, mean=stats)
        return AttentionMacState(
            pc.update(st.main, mean=stats[0]), pc.update(st.value, mean=stats[1])
        )

    def refresh(layer, st):
        if layer.qkv is None:
            return pc.refresh(st)
        return AttentionMacState(pc.refresh(st.main), pc.refresh(st.value))

    def apply(layer, st, mat):
        if layer.qkv is None:
            return pc.apply(st, mat)
        d = layer.d_out // 3
        return jnp.concatenate(
            [pc.apply(st.main, mat[: 2 * d]), pc.apply(st.value, mat[2 * d :])], axis=0
        )

    return Method(
        "mac",
        init,
        statistics,
        update,
        refresh,
        apply,
        needs_params=lambda layer: layer.qkv is not None,
    )


# ---- KFAC ------------------------------------------------------------------------------------------
def kfac_method(
    *,
    stat_decay: float = 0.95,
    damping: Any = 1e-3,
    damping_mode: str = "tikhonov",
    kfac_approx: str = "expand",
    reduction_factor: float | None = None,
) -> Method:
    """Exact KFAC (MATH.md §1): A from the inputs, G = (1/R) Σ g gᵀ from the output gradients.

    ``reduction_factor`` R (e.g. ``1/N`` for a loss averaged over N samples on this device) may instead
    be passed to each ``update(..., reduction_factor=R)``.
    """
    pc = maccore.kfac(decay=stat_decay, damping=damping, mode=damping_mode)
    reduce = maccore.KFACType(kfac_approx) is maccore.KFACType.REDUCE

    def init(layer, dtype):
        return pc.init(layer.d_tilde, layer.d_out, xp=_xp(), dtype=dtype)

    def statistics(layer, x, g, w, b, extra):
        r = extra.get("reduction_factor", reduction_factor)
        if r is None:
            raise ValueError(
                "scale_by_kfac: the reduction factor R is required (the loss is R·Σ terms, e.g. "
                "R = 1/N for a mean over N samples): pass reduction_factor= to scale_by_kfac "
                "or to update"
            )
        A = maccore.input_factor(layer.rows(x, reduce=reduce))
        G = maccore.gradient_factor(layer.grad_rows(g, reduce=reduce), reduction_factor=r)
        return A, G

    def update(layer, st, stats):
        return pc.update(st, A=stats[0], G=stats[1])

    return Method(
        "kfac",
        init,
        statistics,
        update,
        lambda layer, st: pc.refresh(st),
        lambda layer, st, mat: pc.apply(st, mat),
        needs_output_grads=True,
    )


# ---- public transformations ------------------------------------------------------------------------
def scale_by_mac(
    *,
    stat_decay: float = 0.95,
    damping: float = 1.0,
    t_cov: int = 5,
    t_inv: int = 50,
    scale: str = "reference",
    attention: Mapping | None = None,
    layers: Mapping | None = None,
    layout: str = "flax",
    axis_name: str | None = None,
    on_nonfinite: str | None = "skip",
) -> optax.GradientTransformationExtraArgs:
    """The MAC preconditioner alone; chain it with any optax optimizer.

    Args:
        stat_decay, damping, scale: as :func:`maccore.mac` (β, λ, ``"reference"`` | ``"inverse"``).
        t_cov, t_inv: statistics every ``t_cov`` steps, cache refresh every ``t_inv`` steps.
        attention: ``{layer name: QKV(num_heads=...)}`` for fused qkv dense layers (layout (3, H, d_h)).
        layers: ``{layer name: Dense() | Conv(...) | QKV(...) | None}``; conv layers must be declared.
        layout: ``"flax"`` (``kernel`` [d_in, d_out] / HWIO, NHWC inputs) or ``"equinox"`` (``weight``
            [d_out, d_in] / OIHW, NCHW inputs).
        axis_name: average the batch statistics over this mapped axis (``shard_map``/``pmap``);
            the gradients are averaged by the caller, as usual with optax (``lax.pmean``). With
            equal shards this reproduces the single-device statistics of the full batch (KFAC:
            pass the per-device reduction factor, e.g. 1/N_local).
        on_nonfinite: ``"skip"`` (default): a step with NaN/Inf gradients, statistics or updates
            returns zero updates and leaves the curvature state unchanged; ``"raise"``; ``None``
            (no check). Wrap your whole chain in :func:`skip_nonfinite` to keep its momenta too.
    """
    return scale_by_curvature(
        mac_method(stat_decay=stat_decay, damping=damping, scale=scale),
        t_cov=t_cov,
        t_inv=t_inv,
        layers=layers,
        attention=attention,
        layout=layout,
        axis_name=axis_name,
        on_nonfinite=on_nonfinite,
    )


def scale_by_kfac(
    *,
    reduction_factor: float | None = None,
    stat_decay: float = 0.95,
    damping: Any = 1e-3,
    damping_mode: str = "tikhonov",
    kfac_approx: str = "expand",
    t_cov: int = 1,
    t_inv: int = 10,
    layers: Mapping | None = None,
    layout: str = "flax",
    axis_name: str | None = None,
    on_nonfinite: str | None = "skip",
) -> optax.GradientTransformationExtraArgs:
    """The exact-KFAC preconditioner alone. ``update`` needs ``activations=`` and ``output_grads=``.

    Args:
        reduction_factor: R of the loss L = R·Σ terms that ``grads``/``output_grads`` come from
            (MATH.md §1.2), or pass ``reduction_factor=`` to each update.
        damping_mode: ``"tikhonov"`` (damping λ or a pair (λ_G, λ_A)), ``"pi"`` or ``"exact"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` (MATH.md §1.6).
        Others as :func:`scale_by_mac`.
    """
    method = kfac_method(
        stat_decay=stat_decay,
        damping=damping,
        damping_mode=damping_mode,
        kfac_approx=kfac_approx,
        reduction_factor=reduction_factor,
    )
    return scale_by_curvature(
        method,
        t_cov=t_cov,
        t_inv=t_inv,
        layers=layers,
        layout=layout,
        axis_name=axis_name,
        on_nonfinite=on_nonfinite,
    )


class MomentumState(NamedTuple):
    count: jax.Array
    trace: Any


def momentum(decay: float = 0.9, *, nesterov: bool = False) -> optax.GradientTransformation:
    """Heavy ball b ← μb + ĝ (b₀ = 0), direction b; Nesterov (MATH.md §3.6): direction ĝ at the first
    step, ĝ + μb afterwards."""

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


def _check_number(v: Any, name: str, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{where}: {name} must be a number, got {type(v).__name__} {v!r}")
    if not (v >= 0 and v < float("inf")):
        raise ValueError(f"{where}: {name} must be >= 0 and finite, got {v!r}")


def _check_optimizer_args(learning_rate: Any, mom: Any, weight_decay: Any, where: str) -> None:
    """momentum and weight_decay ≥ 0 and finite; a plain-number learning rate likewise (schedules
    and arrays are the caller's)."""
    _check_number(mom, "momentum", where)
    _check_number(weight_decay, "weight_decay", where)
    if not callable(learning_rate) and not hasattr(learning_rate, "dtype"):
        _check_number(learning_rate, "learning_rate", where)


def _optimizer(
    pre, learning_rate, mom, nesterov, weight_decay, weight_decay_mask, on_nonfinite, where
):
    _check_optimizer_args(learning_rate, mom, weight_decay, where)
    if not isinstance(nesterov, bool):
        raise TypeError(f"{where}: nesterov must be True or False, got {nesterov!r}")
    parts = [pre, momentum(mom, nesterov=nesterov)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return skip_nonfinite(optax.chain(*parts), on_nonfinite=on_nonfinite)


def mac(
    learning_rate: Any,
    *,
    momentum: float = 0.9,
    stat_decay: float = 0.95,
    damping: float = 1.0,
    weight_decay: float = 0.0,
    t_cov: int = 5,
    t_inv: int = 50,
    scale: str = "reference",
    nesterov: bool = False,
    attention: Mapping | None = None,
    layers: Mapping | None = None,
    layout: str = "flax",
    axis_name: str | None = None,
    weight_decay_mask: Any = None,
    on_nonfinite: str | None = "skip",
) -> optax.GradientTransformationExtraArgs:
    """MAC with heavy-ball momentum and decoupled weight decay: b ← μb + ĝ, p ← (1 − η wd) p − η b
    (= ``maccore_torch.MAC(weight_decay_mode="decoupled")``). ``learning_rate`` may be a schedule.

    ``on_nonfinite="skip"`` (default) skips a step with NaN/Inf gradients, statistics or updates
    exactly: zero updates, every state (running averages, momenta, counters, schedule count)
    unchanged, as ``maccore_torch.MAC`` does; ``"raise"``; ``None`` (no check)."""
    _check_on_nonfinite(on_nonfinite, "mac")
    pre = scale_by_mac(
        stat_decay=stat_decay,
        damping=damping,
        t_cov=t_cov,
        t_inv=t_inv,
        scale=scale,
        attention=attention,
        layers=layers,
        layout=layout,
        axis_name=axis_name,
        on_nonfinite=None,
    )
    return _optimizer(
        pre, learning_rate, momentum, nesterov, weight_decay, weight_decay_mask, on_nonfinite, "mac"
    )


def kfac(
    learning_rate: Any,
    *,
    reduction_factor: float | None = None,
    momentum: float = 0.9,
    stat_decay: float = 0.95,
    damping: Any = 1e-3,
    damping_mode: str = "tikhonov",
    kfac_approx: str = "expand",
    weight_decay: float = 0.0,
    t_cov: int = 1,
    t_inv: int = 10,
    nesterov: bool = False,
    layers: Mapping | None = None,
    layout: str = "flax",
    axis_name: str | None = None,
    weight_decay_mask: Any = None,
    on_nonfinite: str | None = "skip",
) -> optax.GradientTransformationExtraArgs:
    """Exact KFAC with the same momentum / decoupled weight decay (and ``on_nonfinite``) as
    :func:`mac`."""
    _check_on_nonfinite(on_nonfinite, "kfac")
    pre = scale_by_kfac(
        reduction_factor=reduction_factor,
        stat_decay=stat_decay,
        damping=damping,
        damping_mode=damping_mode,
        kfac_approx=kfac_approx,
        t_cov=t_cov,
        t_inv=t_inv,
        layers=layers,
        layout=layout,
        axis_name=axis_name,
        on_nonfinite=None,
    )
    return _optimizer(
        pre, learning_rate, momentum, nesterov, weight_decay, weight_decay_mask, on_nonfinite, "kfac"
    )
