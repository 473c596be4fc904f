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

from maccore_jax.specs import (
    LAYOUTS,
    Layer,
    _keys,
    coverage,
    discover,
    layer_name,
    lookup,
    skip_names,
    split_attention,
)
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
    (computed with ``reset_after``; all ``False`` after an accepted step).

    ``pooled`` (``pool_micro_batches=True`` only, else ``None``): ``{layer name: {key: (value,
    weight)}}``, the statistics of the micro-batches seen since the last step (:class:`MultiSteps`;
    a row-weighted mean or a sum of loss terms as :func:`maccore.engine.pool`, weight 0 when
    empty); the next step pools them with its own batch, then they are zero again."""

    count: jax.Array
    layers: dict[str, Any]
    consecutive_skips: Any = None
    nonfinite_layers: Any = None
    pooled: Any = None


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
    pool_micro_batches: bool = False,
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
            (KFAC/SINGD: the loss reduction is per device, e.g. ``loss_average="batch"``; SMAC:
            each device's loss is the mean over its shard, and its output-gradient rows are
            divided by the axis size, ``maccore.engine.data_parallel_grad_scale``).
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
        pool_micro_batches: keep :attr:`CurvatureState.pooled`, so that :class:`MultiSteps` can
            pool the statistics of every micro-batch of a step (gradient accumulation); a plain
            update is unchanged (it pools its own batch with the empty pool).

    ``update(..., reduction_factor=R)`` overrides the method's loss reduction for that update
    (KFAC, SINGD). ``update(..., accumulate_only=True)`` (``pool_micro_batches=True``; what
    :class:`MultiSteps` passes between steps): pool this micro-batch's statistics (when due at
    the coming step) into ``pooled`` and change nothing else (the updates pass through).

    Inside ``optax.masked`` / ``optax.multi_transform`` the transformation sees the parameters of
    its subset (masked-out leaves are ``optax.MaskedNode``): only layers of the subset are
    preconditioned — exactly as without the mask — and ``activations`` / ``output_grads`` entries
    of masked-out layers are ignored. A layer is masked as a whole (its kernel and its bias
    together; a ``ValueError`` otherwise).

    Numeric hyper-parameters (``t_cov``, ``t_inv``, the method's damping and decay) may be 0-d
    arrays, traced under ``jit`` (``optax.inject_hyperparams`` with no ``static_args``).
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
    if not isinstance(pool_micro_batches, bool):
        raise TypeError(f"{where}: pool_micro_batches must be True or False, got "
                        f"{pool_micro_batches!r}")
    skip = skip_names(skip_layers)
    excluded = {layer_name(k) for k, v in (layers or {}).items() if v is None} | set(skip)

    def find(tree, undeclared=None):
        return discover(tree, layout=layout, layers=layers, attention=attention, skip=skip,
                        undeclared=undeclared)

    def init_fn(params):
        _check_coverage(params, where, strict, layout=layout, layers=layers,
                        attention=attention, skip=skip)
        found, leaves, _ = find(params)
        _check_masked(params, layout, where)
        states = {}
        for n, layer in found.items():
            dtype = _stats_dtype(leaves[layer.weight_index].dtype)
            with _layer_errors(where, n):
                states[n] = method.init(layer.core_spec(), xp=XP, dtype=dtype)
        pooled = None
        if pool_micro_batches:
            pooled = {n: _empty_pool(method.templates(found[n].core_spec(), st))
                      for n, st in states.items()}
        return CurvatureState(jnp.zeros((), jnp.int32), states, jnp.zeros((), jnp.int32),
                              {n: jnp.zeros((), bool) for n in states}, pooled)

    def update_fn(updates, state, params=None, *, activations=None, output_grads=None,
                  reduction_factor=None, accumulate_only=False, **extra):
        del extra  # other transformations' arguments (optax.chain passes them to everyone)
        if not isinstance(accumulate_only, bool):
            raise TypeError(f"{where}: accumulate_only must be True or False (a Python bool), "
                            f"got {accumulate_only!r}")
        if accumulate_only and state.pooled is None:
            raise ValueError(f"{where}: accumulate_only=True needs a state built with "
                             "pool_micro_batches=True")
        if params is not None:
            _check_like(updates, params, where)
        undeclared: list = []
        found, leaves, treedef = find(updates, undeclared)
        if set(found) != set(state.layers):
            raise ValueError(
                f"{where}: the state was initialised for layers {sorted(state.layers)} but "
                f"the gradients have layers {sorted(found)}"
            )
        masked = _check_masked(updates, layout, where)
        acts = _match(activations, found, list(found), "activations", where,
                      excluded | set(undeclared), masked)
        acts, probs = split_attention(acts)  # value projections: AttentionInput(x, probs)
        for n, layer in found.items():
            layer.check_input(acts[n])
        xs = {n: layer.nchw(acts[n]) for n, layer in found.items()}
        specs = {n: layer.core_spec(xs[n]) for n, layer in found.items()}
        want_g = [n for n in found if method.wants_grads(specs[n])]
        gouts = {}
        if want_g:
            gouts = _match(output_grads, found, want_g, "output_grads", where,
                           excluded | set(undeclared), masked)
            for n in want_g:
                found[n].check_output_grad(acts[n], gouts[n])
        want_attn = [n for n in found if method.wants_attention(specs[n])]
        recompute = [n for n in want_attn if n not in probs and specs[n].qkv.layout != "v"]
        pleaves = None
        if recompute:
            if params is None:
                raise ValueError(
                    f"{where}: attention layers {recompute} need params= in update (their "
                    "attention probabilities are recomputed from the projection output)"
                )
            pleaves = find(params)[1]
        beta = lr_cov(state.count) if callable(lr_cov) else lr_cov
        # data parallelism over axis_name (per-device mean losses, pmean-ed gradients): the
        # engine's rule for methods whose gradient statistic is not renormalised (SMAC)
        world = 1 if axis_name is None else lax.psum(1, axis_name)
        grad_scale = engine.data_parallel_grad_scale(method, world)
        if hasattr(beta, "ndim"):
            beta = jnp.reshape(jnp.asarray(beta), ())

        def batch_stats(n, st):
            """This update's ``{key: Stat}`` of layer ``n`` (before ``finalize``)."""
            layer, spec, x = found[n], specs[n], xs[n]
            stats = {}
            if method.wants_input(spec, st):
                attn = None
                if n in want_attn:
                    attn = probs[n] if n in probs else _attention(layer, spec, x, pleaves)
                stats = method.input_statistics(spec, st, x, attn=attn)
            if n in want_g:
                g = method.grad_statistics(spec, st, layer.nchw(gouts[n], output=True),
                                           grad_scale=grad_scale)
                stats = engine.pool_stats(stats, g)
            return stats

        def accumulate(pooled):
            new = dict(pooled)
            for n in found:
                with _layer_errors(where, n):
                    new[n] = _pool_into(pooled[n], batch_stats(n, state.layers[n]))
            return new

        def collect(ls):
            new = {}
            for n, layer in found.items():
                spec, st = specs[n], ls[n]
                with _layer_errors(where, n):
                    stats = batch_stats(n, st)
                    rf = reduction_factor
                    if state.pooled is not None:  # with the micro-batches since the last step
                        pool = _pool_into(state.pooled[n], stats)
                        stats = {k: engine.Stat(pool[k][0], pool[k][1], s.kind)
                                 for k, s in stats.items()}
                        rf = _pooled_reduction(method, stats, rf)
                    final = method.finalize(spec, st, stats, reduction_factor=rf)
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
        if accumulate_only:  # a micro-batch between steps: pool its statistics, nothing else
            pooled = _cond(due_stats, accumulate, state.pooled)
            return updates, state._replace(pooled=pooled)
        ls = dict(state.layers)
        if reset_after is not None:  # recovery: the offending layers restart from init
            due_reset = state.consecutive_skips >= reset_after
            for n, layer in found.items():
                leaf = leaves[layer.weight_index]
                fresh = method.init(specs[n], xp=XP, dtype=_stats_dtype(leaf.dtype))
                fresh = _keep_first_layer(fresh, ls[n])
                use = due_reset & state.nonfinite_layers[n]
                ls[n] = jax.tree.map(lambda a, b: jnp.where(use, a, b), fresh, ls[n])
        ls = _cond(due_stats, collect, ls)
        ls = _cond(due_refresh, refresh, ls)
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
        pooled = None if state.pooled is None else jax.tree.map(jnp.zeros_like, state.pooled)
        return jax.tree_util.tree_unflatten(treedef, out), CurvatureState(
            optax.safe_int32_increment(state.count), ls, jnp.zeros((), jnp.int32), bad, pooled
        )

    return skip_nonfinite(
        optax.GradientTransformationExtraArgs(init_fn, update_fn), on_nonfinite=on_nonfinite
    )


def _cond(pred: Any, fn: Callable[[Any], Any], tree: Any) -> Any:
    """``fn(tree)`` where ``pred`` holds, else ``tree`` (``lax.cond``; a Python ``bool`` branches
    in Python). The result keeps ``tree``'s dtypes: a hyper-parameter injected as an array of a
    wider dtype (``optax.inject_hyperparams(..., hyperparam_dtype=...)``) must not widen the
    state."""

    def run(t):
        return jax.tree.map(lambda new, old: new.astype(old.dtype) if new.dtype != old.dtype
                            else new, fn(t), t)

    if isinstance(pred, bool):
        return run(tree) if pred else tree
    return lax.cond(pred, run, lambda t: t, tree)


# ---- micro-batch pools (pool_micro_batches=True) -------------------------------------------------
def _empty_pool(templates: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (value, weight)}`` zeros shaped like ``method.templates`` (statistics dtype)."""
    return {k: (jnp.zeros(t.shape, t.dtype), jnp.zeros((), t.dtype)) for k, t in templates.items()}


def _pool_into(pool: Mapping[str, tuple[Any, Any]], stats: Mapping[str, Any]) -> dict:
    """``pool`` with this batch's ``{key: Stat}`` pooled in (:func:`maccore.engine.pool` on
    arrays: a row-weighted running mean, or sums of loss terms); keys without a statistic stay."""
    out = dict(pool)
    for k, s in stats.items():
        if k not in pool:
            raise ValueError(f"statistic {k!r} has no pool (pool keys: {sorted(pool)})")
        acc, w_acc = pool[k]
        v = jnp.reshape(jnp.asarray(s.value), acc.shape).astype(acc.dtype)
        w = jnp.asarray(s.weight, acc.dtype)
        total = w_acc + w
        if s.kind == "sum":
            out[k] = (acc + v, total)
        elif s.kind == "mean":
            frac = w / jnp.where(total > 0, total, jnp.ones_like(total))
            out[k] = (acc + (v - acc) * frac, total)
        else:
            raise ValueError(f"statistic {k!r}: kind must be 'mean' or 'sum', got {s.kind!r}")
    return out


def _pooled_reduction(method: maccore.CurvatureMethod, stats: Mapping[str, Any], rf: Any) -> Any:
    """The loss reduction R of pooled statistics whose weights are arrays: the given ``rf``, the
    method's own ``reduction_factor``, else for a loss averaged over its terms (``loss_average``
    not ``None``) ``1/terms`` of the pooled sum statistic (what ``finalize`` computes from a
    Python weight)."""
    if rf is not None:
        return rf
    hp = method.hyperparameters
    if hp.get("reduction_factor") is not None or hp.get("loss_average", None) is None:
        return None
    sums = [s for s in stats.values() if s.kind == "sum"]
    return None if not sums else 1.0 / sums[0].weight


# ---- optax.masked / optax.multi_transform --------------------------------------------------------
def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _check_masked(tree: Any, layout: str, where: str) -> list[str]:
    """The names of the masked-out parts of ``tree`` (``optax.MaskedNode`` leaves: a layer, or a
    whole subtree given by a prefix mask); a layer whose kernel is in the subset and whose bias is
    masked out, or the other way round, raises (a layer is preconditioned as a whole)."""
    wkey = LAYOUTS[layout]
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)[0]
    masked, parts = [], {}
    for path, leaf in flat:
        keys = tuple(str(k) for k in _keys(path))
        is_param = bool(keys) and keys[-1] in (wkey, "bias")
        if is_param:
            parts.setdefault(keys[:-1], {})[keys[-1]] = _is_masked(leaf)
        if _is_masked(leaf):
            masked.append("/".join(keys[:-1] if is_param else keys))
    for node, members in parts.items():
        name = "/".join(node)
        if len(members) == 2 and members[wkey] != members["bias"]:
            inside, outside = (wkey, "bias") if not members[wkey] else ("bias", wkey)
            raise ValueError(
                f"{where}: layer {name!r} has its {inside} in the masked subset but its "
                f"{outside} masked out (optax.masked / multi_transform); a layer is "
                f"preconditioned as a whole: mask its {wkey} and bias together (e.g. a prefix "
                f"mask {{{name!r}: True}})"
            )
    return masked


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + "/") for p in prefixes)


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
    output (recomputed from the input and the current parameters). A value projection
    (``layout="v"``) takes them from its activation entry (:class:`AttentionInput`)."""
    if spec.qkv.layout == "v":
        raise ValueError(
            "an attention value projection (QKV(layout='v')) needs the attention probabilities: "
            "pass its activation as maccore_jax.AttentionInput(x, probs) (the nnx/equinox capture "
            "helpers do), or declare it Dense() (plain MAC)"
        )
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
           excluded: set, masked: Iterable[str] = ()) -> dict[str, Any]:
    """``{layer name: array}`` of ``tree`` for the layers ``need`` (entries for other
    preconditioned or excluded layers, and for layers under the ``masked`` names — masked out by
    ``optax.masked`` — are allowed, entries for unknown layers are not)."""
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
    extra = sorted(n for n in set(got) - set(found) - excluded if not _under(n, masked))
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


# ---- gradient accumulation ------------------------------------------------------------------------
def _take_pooled(old: Any, new: Any) -> Any:
    """``old`` with the ``pooled`` fields of its curvature states taken from ``new`` (same
    structure; dtypes kept)."""
    lo, tdef = jax.tree_util.tree_flatten(old, is_leaf=_is_curvature)
    ln = jax.tree_util.tree_flatten(new, is_leaf=_is_curvature)[0]
    out = [o._replace(pooled=jax.tree.map(lambda a, b: b.astype(a.dtype), o.pooled, n.pooled))
           if _is_curvature(o) and o.pooled is not None else o for o, n in zip(lo, ln)]
    return jax.tree_util.tree_unflatten(tdef, out)


def _empty_pools(state: Any) -> Any:
    return map_curvature_states(
        lambda c: c if c.pooled is None else c._replace(
            pooled=jax.tree.map(jnp.zeros_like, c.pooled)), state)


class MultiSteps(optax.MultiSteps):
    """``optax.MultiSteps`` (gradient accumulation over ``every_k_schedule`` micro-batches) that
    also pools the curvature statistics of EVERY micro-batch, so that a step equals one step on
    the concatenated batch (``optax.MultiSteps`` itself keeps the inner state of the last
    micro-batch only, so only its activations would reach the statistics).

    ``opt`` is built with ``pool_micro_batches=True`` (``maccore_jax.mac(...,
    pool_micro_batches=True)``, ``kfac``, ``singd``, ``scale_by_*``, alone or inside
    ``optax.chain`` / ``masked`` / ``multi_transform`` / ``inject_hyperparams``). Every call
    passes the micro-batch's ``activations=`` / ``output_grads=`` as usual. Between steps the
    curvature transformations pool the micro-batch's statistics into
    :attr:`CurvatureState.pooled` (``update(..., accumulate_only=True)``; every other state is
    kept as it was, as ``optax.MultiSteps`` does); at the k-th micro-batch the step runs on the
    accumulated gradients with the pooled statistics of all k micro-batches, and the pools are
    emptied.

    Scaling (so that it equals the full batch): with ``use_grad_mean=True`` (default) the step's
    gradient is the mean of the k micro-batch gradients, i.e. the gradient of the mean loss
    ``(1/k) Σ L_i``; the output gradients of that loss are ``g_i / k``, so ``output_grads`` are
    divided by k before their statistics are taken. With k equal-sized micro-batches and a loss
    averaged over the batch (``loss_average="batch"``, the default; KFAC/SINGD's R is then
    ``1/(k·n)`` from the pooled counts) the statistics are those of the concatenated batch.
    ``use_grad_mean=False`` (summed gradients of ``Σ L_i``) leaves ``output_grads`` as they are:
    the full batch of a summed loss (``loss_average=None``).

    Other arguments as ``optax.MultiSteps`` (``accumulator_dtype`` defaults to float32 there and
    here: pass ``jnp.float64`` for float64 parameters). A micro-batch whose statistics are not
    finite is left out of the pool (its non-finite gradient then skips the step).
    """

    def init(self, params: Any) -> optax.MultiStepsState:
        state = super().init(params)
        plain = [c for c in curvature_states(state.inner_opt_state) if c.pooled is None]
        if plain:
            raise ValueError(
                "maccore_jax.MultiSteps: the wrapped optimizer has curvature transformations "
                "built without pool_micro_batches=True, whose statistics would only see the last "
                "micro-batch; build them with pool_micro_batches=True (e.g. "
                "maccore_jax.mac(lr, pool_micro_batches=True))"
            )
        return state

    def update(self, updates: Any, state: optax.MultiStepsState, params: Any = None,
               **extra_args: Any) -> tuple[Any, optax.MultiStepsState]:
        k_steps = self._every_k_schedule(state.gradient_step)
        should_skip, skip_state = self._should_skip_update_fn(updates, state.gradient_step,
                                                              params)
        if (should_skip.dtype, should_skip.shape) != (jnp.bool_, ()):
            raise ValueError(
                "The `should_skip_update_fn` function should return a boolean scalar array, but "
                f"it returned an array of dtype {should_skip.dtype} and shape {should_skip.shape}"
            )
        if self._use_grad_mean and extra_args.get("output_grads") is not None:
            extra_args = dict(extra_args)
            extra_args["output_grads"] = jax.tree.map(
                lambda g: (g / k_steps).astype(g.dtype), extra_args["output_grads"])

        def keep_dtypes(new, old):
            return jax.tree.map(lambda n, o: jnp.asarray(n).astype(o.dtype), new, old)

        def do_update(updates, state, params):
            acc_grads = jax.tree.map(
                lambda u, acc: self._acc_update(u, acc, n_acc=state.mini_step),
                updates, state.acc_grads)
            grads = optax.tree.cast_like(acc_grads, updates)
            emit = state.mini_step == (k_steps - 1)

            def step(_):
                out, new = self._opt.update(grads, state.inner_opt_state, params=params,
                                            **extra_args)
                return out, keep_dtypes(_empty_pools(new), state.inner_opt_state)

            def pool_only(_):
                out, new = self._opt.update(grads, state.inner_opt_state, params=params,
                                            accumulate_only=True, **extra_args)
                return (jax.tree.map(jnp.zeros_like, out),
                        _take_pooled(state.inner_opt_state, new))

            final_updates, inner = lax.cond(emit, step, pool_only, None)
            new_state = optax.MultiStepsState(
                mini_step=optax.safe_int32_increment(state.mini_step) % k_steps,
                gradient_step=emit * optax.safe_int32_increment(state.gradient_step)
                + (1 - emit) * state.gradient_step,
                inner_opt_state=inner,
                acc_grads=jax.tree.map(
                    lambda ga: jnp.astype((1 - emit) * ga, self._accumulator_dtype), acc_grads),
                skip_state=skip_state,
            )
            return final_updates, new_state

        def skip_update(updates, state, params):
            zeros, _ = jax.eval_shape(
                lambda: do_update(updates, state, params))
            return (jax.tree.map(lambda z: jnp.zeros(z.shape, z.dtype), zeros),
                    state._replace(skip_state=skip_state))

        return lax.cond(should_skip, skip_update, do_update, updates, state, params)
