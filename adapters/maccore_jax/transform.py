"""The optax glue of the core engine: :func:`scale_by_curvature` drives any
:class:`maccore.CurvatureMethod` (MAC/SMAC, KFAC, SINGD — :mod:`maccore.engine`) over a
parameter tree, and :func:`skip_nonfinite` makes a transformation skip non-finite steps exactly.

``tx.update(grads, state, params, activations=acts, output_grads=gouts, reduction_factor=R)``, per
preconditioned layer (:func:`maccore_jax.specs.discover`), with ``(collect, refresh) =
maccore.engine.schedule(count, t_cov=..., t_inv=...)``:

1. ``collect``: ``method.input_statistics`` of the layer input (fused qkv layers also get the
   attention probabilities, recomputed from the projection output), ``method.grad_statistics`` of
   the output gradient (methods that want it), ``method.finalize`` (the loss reduction:
   ``reduction_factor=`` of this update, else the method's own), ``lax.pmean`` over
   ``axis_name``, ``method.update``;
2. ``refresh``: ``method.refresh``;
3. every step: ``method.apply`` to the layer's gradient matrix ``[d_out, d̃]``; other leaves pass
   through.

Both branches are ``lax.cond`` on the traced count, so the update jits as a whole. The adapter only
moves arrays between layouts (Flax/Equinox ↔ the core's row-major ``[W | b]``, NHWC ↔ NCHW); every
formula is the engine's, shared with ``maccore_torch``.

Non-finite steps (``on_nonfinite``, :func:`skip_nonfinite`): a step whose gradients, statistics,
refreshed caches or updates hold NaN/Inf returns zero updates and the state exactly as it was
(step count included; only :attr:`CurvatureState.consecutive_skips` advances), with ``jnp.where``
so it works under ``jit``; ``"raise"`` raises
``FloatingPointError`` (eagerly; under ``jit`` from a host callback, surfacing as a
``JaxRuntimeError`` that carries the message). See ``docs/numerics.md``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import array_api_compat
import jax
import jax.numpy as jnp
import maccore
import optax
from jax import lax
from maccore import engine

from maccore_jax.specs import Layer, coverage, discover, layer_name, lookup, skip_names
from maccore_jax.validation import check_on_nonfinite, check_period

__all__ = [
    "CurvatureState",
    "curvature_states",
    "scale_by_curvature",
    "skip_nonfinite",
]

XP = array_api_compat.array_namespace(jnp.zeros(()))


class CurvatureState(NamedTuple):
    """``count``: optimizer steps taken (0-d int32); ``layers``: the engine's per-layer states by
    layer name (``method.init``: a fused qkv layer's MAC state is one :class:`maccore.MacState`
    with ``[3, d̃]`` — or per head ``[3H, d̃]`` — factors, as in ``maccore_torch``).

    ``consecutive_skips``: steps skipped for non-finite values since the last accepted step (0-d
    int32, kept by :func:`skip_nonfinite`; readable under ``jit``: a run whose counter keeps
    growing is stuck). ``nonfinite_layers``: ``{layer name: 0-d bool}``, the layers whose new
    state or preconditioned gradient was not finite during the current run of skipped steps
    (computed with ``reset_after``; all ``False`` after an accepted step)."""

    count: jax.Array
    layers: dict[str, Any]
    consecutive_skips: Any = None
    nonfinite_layers: Any = None


def _is_curvature(x: Any) -> bool:
    return isinstance(x, CurvatureState)


def curvature_states(state: Any) -> list[CurvatureState]:
    """Every :class:`CurvatureState` inside an optax state (e.g. of ``optax.chain(...)``)."""
    return [x for x in jax.tree.leaves(state, is_leaf=_is_curvature) if _is_curvature(x)]


def map_curvature_states(fn: Callable[[CurvatureState], CurvatureState], state: Any) -> Any:
    """``state`` with every :class:`CurvatureState` inside replaced by ``fn(it)``."""
    return jax.tree.map(lambda x: fn(x) if _is_curvature(x) else x, state, is_leaf=_is_curvature)


def _stats_dtype(dtype: Any) -> Any:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def scale_by_curvature(
    method: maccore.CurvatureMethod,
    *,
    t_cov: int = 5,
    t_inv: int = 50,
    layers: Mapping | None = None,
    skip_layers: Iterable[str] | None = None,
    attention: Mapping | None = None,
    layout: str = "flax",
    axis_name: str | None = None,
    on_nonfinite: str | None = "skip",
    lr_cov: float | Callable[[Any], Any] | None = None,
    reset_after: int | None = None,
    strict: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Precondition the gradients of every discovered layer with ``method`` (module docstring).

    Args:
        method: a :class:`maccore.CurvatureMethod` (``maccore.mac_method(...)``,
            ``maccore.kfac_method(...)``, ``maccore.singd_method(...)``).
        t_cov, t_inv: statistics every ``t_cov`` steps, cache refresh every ``t_inv`` steps
            (both at step 0).
        layers: ``{layer name: Dense() | Conv(...) | QKV(...) | None}``; conv layers must be
            declared, ``None`` leaves a layer unpreconditioned (its gradient passes through).
        skip_layers: layer names left unpreconditioned (the same as ``layers={name: None}``, as
            ``maccore_torch``'s keyword).
        attention: ``{layer name: QKV(num_heads=...)}`` for fused qkv dense layers (output layout
            (3, H, d_h)); MAC then needs ``params`` in ``update`` (the attention probabilities are
            recomputed from the projection output).
        layout: ``"flax"`` (``kernel`` [d_in, d_out] / HWIO, NHWC inputs) or ``"equinox"``
            (``weight`` [d_out, d_in] / OIHW, NCHW inputs).
        axis_name: average the statistics over this mapped axis (``shard_map``/``pmap``); the
            gradients are averaged by the caller, as usual with optax (``lax.pmean``). Every device
            holds a shard of the same shape, so the engine's row-weighted mean is the plain mean:
            with equal shards this reproduces the single-device statistics of the full batch
            (KFAC/SINGD: the loss reduction is per device, e.g. ``loss_average="batch"``).
        on_nonfinite: ``"skip"`` (default): a step with NaN/Inf gradients, statistics or updates
            returns zero updates and leaves the curvature state unchanged; ``"raise"``; ``None``
            (no check). Wrap your whole chain in :func:`skip_nonfinite` to keep its momenta too.
        lr_cov: SINGD's preconditioner learning rate, a number or a schedule of the step count,
            passed to ``method.update(..., lr_cov=)``; ``None`` uses the method's own.
        reset_after: automatic recovery (``None``, the default: off). From the ``reset_after``-th
            consecutive skipped step on (:attr:`CurvatureState.consecutive_skips`), the layers
            whose state or preconditioned gradient was not finite (``nonfinite_layers``) start
            each step from the method's initial state, until a step is accepted.
        strict: coverage contract (:func:`maccore_jax.report`): at ``init``, a leaf that looks
            like a linear map but is not preconditioned (e.g. an undeclared 3-D
            ``DenseGeneral`` kernel) is a ``UserWarning``, with ``strict=True`` a ``ValueError``;
            zero preconditioned layers is always a warning.

    ``update(..., reduction_factor=R)`` overrides the method's loss reduction for that update
    (KFAC, SINGD).
    """
    if not isinstance(method, maccore.CurvatureMethod):
        raise TypeError(
            f"scale_by_curvature: method must be a maccore.CurvatureMethod (e.g. "
            f"maccore.mac_method()), got {type(method).__name__}"
        )
    where = f"scale_by_{method.name}"
    t_cov = check_period(t_cov, "t_cov", where)
    t_inv = check_period(t_inv, "t_inv", where)
    check_on_nonfinite(on_nonfinite, where)
    if reset_after is not None:
        reset_after = check_period(reset_after, "reset_after", where)
    skip = skip_names(skip_layers)
    excluded = {layer_name(k) for k, v in (layers or {}).items() if v is None} | set(skip)

    def find(tree, undeclared=None):
        return discover(tree, layout=layout, layers=layers, attention=attention, skip=skip,
                        undeclared=undeclared)

    def init_fn(params):
        _check_coverage(params, where, strict, layout=layout, layers=layers,
                        attention=attention, skip=skip)
        found, leaves, _ = find(params)
        states = {}
        for n, layer in found.items():
            dtype = _stats_dtype(leaves[layer.weight_index].dtype)
            with _layer_errors(where, n):
                states[n] = method.init(layer.core_spec(), xp=XP, dtype=dtype)
        return CurvatureState(jnp.zeros((), jnp.int32), states, jnp.zeros((), jnp.int32),
                              {n: jnp.zeros((), bool) for n in states})

    def update_fn(updates, state, params=None, *, activations=None, output_grads=None,
                  reduction_factor=None, **extra):
        del extra  # other transformations' arguments (optax.chain passes them to everyone)
        if params is not None:
            _check_like(updates, params, where)
        undeclared: list = []
        found, leaves, treedef = find(updates, undeclared)
        if set(found) != set(state.layers):
            raise ValueError(
                f"{where}: the state was initialised for layers {sorted(state.layers)} but "
                f"the gradients have layers {sorted(found)}"
            )
        acts = _match(activations, found, list(found), "activations", where,
                      excluded | set(undeclared))
        for n, layer in found.items():
            layer.check_input(acts[n])
        xs = {n: layer.nchw(acts[n]) for n, layer in found.items()}
        specs = {n: layer.core_spec(xs[n]) for n, layer in found.items()}
        want_g = [n for n in found if method.wants_grads(specs[n])]
        gouts = {}
        if want_g:
            gouts = _match(output_grads, found, want_g, "output_grads", where,
                           excluded | set(undeclared))
            for n in want_g:
                found[n].check_output_grad(acts[n], gouts[n])
        want_attn = [n for n in found if method.wants_attention(specs[n])]
        pleaves = None
        if want_attn:
            if params is None:
                raise ValueError(
                    f"{where}: attention layers {want_attn} need params= in update (their "
                    "attention probabilities are recomputed from the projection output)"
                )
            pleaves = find(params)[1]
        beta = lr_cov(state.count) if callable(lr_cov) else lr_cov
        if hasattr(beta, "ndim"):
            beta = jnp.reshape(jnp.asarray(beta), ())

        def collect(ls):
            new = {}
            for n, layer in found.items():
                spec, st, x = specs[n], ls[n], xs[n]
                with _layer_errors(where, n):
                    stats = {}
                    if method.wants_input(spec, st):
                        attn = _attention(layer, spec, x, pleaves) if n in want_attn else None
                        stats = method.input_statistics(spec, st, x, attn=attn)
                    if n in want_g:
                        g = method.grad_statistics(spec, st, layer.nchw(gouts[n], output=True))
                        stats = engine.pool_stats(stats, g)
                    final = method.finalize(spec, st, stats, reduction_factor=reduction_factor)
                    values = {k: v for k, (v, _) in final.items()}
                    if axis_name is not None:  # equal weights on every device (same shapes):
                        # the engine's weight-weighted mean across devices is the plain mean
                        values = {k: lax.pmean(v, axis_name) for k, v in values.items()}
                    new[n] = method.update(spec, st, values, lr_cov=beta)
            return new

        def refresh(ls):
            new = {}
            for n in found:
                with _layer_errors(where, n):
                    new[n] = method.refresh(specs[n], ls[n])
            return new

        due_stats, due_refresh = engine.schedule(state.count, t_cov=t_cov, t_inv=t_inv)
        ls = dict(state.layers)
        if reset_after is not None:  # recovery: the offending layers restart from init
            due_reset = state.consecutive_skips >= reset_after
            for n, layer in found.items():
                leaf = leaves[layer.weight_index]
                fresh = method.init(specs[n], xp=XP, dtype=_stats_dtype(leaf.dtype))
                fresh = _keep_first_layer(fresh, ls[n])
                use = due_reset & state.nonfinite_layers[n]
                ls[n] = jax.tree.map(lambda a, b: jnp.where(use, a, b), fresh, ls[n])
        ls = lax.cond(due_stats, collect, lambda s: s, ls)
        ls = lax.cond(due_refresh, refresh, lambda s: s, ls)
        out = list(leaves)
        bad = {}
        for n, layer in found.items():
            gb = None if layer.bias_index is None else leaves[layer.bias_index]
            with _layer_errors(where, n):
                mat = method.apply(specs[n], ls[n], layer.grad_mat(leaves[layer.weight_index], gb))
            bad[n] = (~_all_finite((ls[n], mat)) if reset_after is not None
                      else jnp.zeros((), bool))
            w, b = layer.split(mat)
            out[layer.weight_index] = w
            if b is not None:
                out[layer.bias_index] = b
        return jax.tree_util.tree_unflatten(treedef, out), CurvatureState(
            optax.safe_int32_increment(state.count), ls, jnp.zeros((), jnp.int32), bad
        )

    return skip_nonfinite(
        optax.GradientTransformationExtraArgs(init_fn, update_fn), on_nonfinite=on_nonfinite
    )


def _check_coverage(params: Any, where: str, strict: bool, **kw: Any) -> None:
    """The coverage contract at ``init`` (see :func:`maccore_jax.report`)."""
    found, skipped = coverage(params, **kw)
    bad = [s for s in skipped if s.suspicious]
    if bad:
        msg = (f"{where}: {len(bad)} parameter(s) look like linear maps but are not "
               f"preconditioned: " + "; ".join(f"{s.parameter}: {s.reason}" for s in bad))
        if strict:
            raise ValueError(msg + " (strict=True)")
        warnings.warn(msg, UserWarning, stacklevel=4)
    if not found:
        warnings.warn(f"{where}: 0 preconditioned layers — every gradient passes through "
                      f"unchanged (see maccore_jax.report)", UserWarning, stacklevel=4)


def _keep_first_layer(fresh: Any, old: Any) -> Any:
    """A fresh MAC state keeps the layer's fixed first-layer inverse (not a statistic)."""
    first = getattr(old, "first_inv", None)
    return fresh if first is None else fresh._replace(first_inv=first)


def _attention(layer: Layer, spec: maccore.LayerSpec, x: Any, pleaves: list) -> Any:
    """The attention probabilities ``[B, H, N, N]`` of a fused qkv layer, from q and k of its
    output (recomputed from the input and the current parameters)."""
    w = pleaves[layer.weight_index]
    b = None if layer.bias_index is None else pleaves[layer.bias_index]
    q, k, _ = maccore.split_qkv(layer.forward(x, w, b), spec.qkv.num_heads)
    return maccore.attention_probs(q, k, causal=spec.qkv.causal)


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
                f"{None if su is None else list(su)}, the parameter "
                f"{None if sp is None else list(sp)}"
            )


class _layer_errors:
    """Re-raise core errors (``DecompositionError``, ``ValueError``, ``TypeError``) naming the
    layer."""

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


def _match(tree: Any, found: dict[str, Layer], need: list[str], what: str, where: str,
           excluded: set) -> dict[str, Any]:
    """``{layer name: array}`` of ``tree`` for the layers ``need`` (entries for other
    preconditioned or excluded layers are allowed, entries for unknown layers are not)."""
    if tree is None:
        raise ValueError(
            f"{where}: update needs {what}= (a tree like params with each layer's "
            f"{'input' if what == 'activations' else 'output gradient'}), for layers {need}"
        )
    got = lookup(tree, what)
    missing = [n for n in need if n not in got]
    if missing:
        desc = ", ".join(
            f"{n!r} ({found[n].layout} weight {list(found[n].weight_shape)})" for n in missing
        )
        raise ValueError(
            f"{where}: {what} missing for layer(s) {desc}; pass them, or exclude a layer "
            f"with skip_layers=[name] (or layers={{name: None}}). {what} has {sorted(got)}"
        )
    extra = sorted(set(got) - set(found) - excluded)
    if extra:
        raise ValueError(
            f"{where}: {what} given for {extra}, which are not preconditioned layers of the "
            f"gradient tree (layers: {sorted(found)})"
        )
    return got


# ---- non-finite steps -----------------------------------------------------------------------------
_NONFINITE_MSG = (
    "maccore_jax: non-finite gradients, statistics or updates; the step was skipped and the "
    "optimizer state left unchanged"
)


def _all_finite(tree: Any) -> Any:
    """:func:`maccore.engine.all_finite` of every floating leaf of ``tree`` (a 0-d bool array)."""
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]
    return jnp.asarray(engine.all_finite(leaves))


def _raise_if_bad(ok: Any) -> None:
    if not bool(ok):
        raise FloatingPointError(_NONFINITE_MSG)


def _count_skip(ok: Any, picked: Any, new: Any, old: Any) -> Any:
    """The curvature states of a step's result: an accepted step keeps the new counters, a
    skipped one the old state with ``consecutive_skips + 1`` and the offending layers OR'ed."""
    if old.consecutive_skips is None:  # a state built without counters: left as it is
        return picked
    skips = jnp.where(ok, picked.consecutive_skips, optax.safe_int32_increment(old.consecutive_skips))
    layers = {n: jnp.where(ok, new.nonfinite_layers[n], old.nonfinite_layers[n] | new.nonfinite_layers[n])
              for n in old.nonfinite_layers}
    return picked._replace(consecutive_skips=skips, nonfinite_layers=layers)


def skip_nonfinite(
    inner: optax.GradientTransformation, *, on_nonfinite: str | None = "skip",
    check_params: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Make ``inner`` skip non-finite steps exactly: when the incoming gradients, the updates or
    the new state (running averages, caches, momenta) hold a NaN or Inf, the step returns zero
    updates and the OLD state, step counts included — so a skipped step is as if the batch had not
    been seen (only the skip counters below advance). The state has the structure of ``inner``'s
    (checkpoints stay interchangeable).

    Args:
        inner: any optax transformation (extra ``update`` keyword arguments are passed through).
        on_nonfinite: ``"skip"``; ``"raise"`` — ``FloatingPointError`` when called eagerly; under
            ``jax.jit`` the error is raised by a host callback and surfaces as a
            ``jax.errors.JaxRuntimeError`` carrying the message; ``None`` returns ``inner`` as is.
        check_params: also require the new parameter values ``params + updates`` to be finite
            (for transformations whose updates are the final ones, as :func:`maccore_jax.mac`;
            when ``update`` gets ``params``).

    Every :class:`CurvatureState` inside the state counts the skipped steps in a row
    (``consecutive_skips``, 0 after an accepted step): under ``jit`` that is how to see that a
    run is stuck (every step skipped).

    Unlike ``optax.apply_if_finite`` it adds no state of its own (the counters live in the
    curvature states) and never lets a non-finite step through. :func:`maccore_jax.mac`, :func:`~maccore_jax.kfac` and
    :func:`~maccore_jax.singd` wrap their whole chain with it; ``scale_by_*`` wrap only the
    preconditioner (the rest of your chain then sees zero updates).
    """
    check_on_nonfinite(on_nonfinite, "skip_nonfinite")
    inner = optax.with_extra_args_support(inner)
    if on_nonfinite is None:
        return inner

    def update_fn(updates, state, params=None, **extra):
        new_updates, new_state = inner.update(updates, state, params, **extra)
        ok = _all_finite((updates, new_updates, new_state))
        if check_params and params is not None:
            ok = ok & _all_finite(jax.tree.map(
                lambda p, u: p + u if hasattr(u, "dtype") else None, params, new_updates))
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
        picked = jax.tree.map(pick, new_state, state)
        counted = jax.tree.map(
            lambda p, n, o: _count_skip(ok, p, n, o) if _is_curvature(p) else p,
            picked, new_state, state, is_leaf=_is_curvature)
        return out, counted

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
