"""Capture for Equinox: layer inputs (and output gradients) from the forward that computes the loss.

Equinox modules map ONE sample; :func:`apply` vmaps the model over the batch axis itself (the layer
inputs are recorded inside the vmapped function, then stacked)::

    def loss_fn(model, perts, x, y):
        out, acts = maccore_jax.equinox.apply(model, x, perturbations=perts)
        return loss(out, y), acts

    perts = maccore_jax.equinox.output_zeros(model, x)                    # KFAC only
    (l, acts), (grads, gouts) = eqx.filter_value_and_grad(...)  # or jax.value_and_grad on filtered params
    tx = maccore_jax.mac(0.1, layout="equinox", layers=maccore_jax.equinox.layer_specs(model))
    updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_array), activations=acts)

``acts`` is a flat ``{"layers/0": x}`` dict keyed by layer name (the path of the ``eqx.nn.Linear`` /
``eqx.nn.Conv2d`` in the model); the transformations accept it in place of a nested tree. Layers are
tapped by wrapping them (``eqx.tree_at``) inside the forward, so gradients still flow to the original
model. A tapped layer is called once per forward, directly by the per-sample forward or under
``jax.vmap`` (the token-wise pattern ``jax.vmap(self.linear)(x)``): the input of a vmapped call is
recorded whole (``[N, d]`` per sample, ``[B, N, d]`` in ``acts``) through a
``jax.custom_batching.custom_vmap`` — the same statistics as applying the layer to the stacked
tokens. A layer called under any other transformation inside the forward (``lax.scan``,
``eqx.filter_checkpoint``, an inner ``jit``) is an error naming it.

Attention (``eqx.nn.MultiheadAttention``): its ``value_proj`` entry is a
:class:`maccore_jax.AttentionInput` ``(x, probs)`` with the attention probabilities ``[B, H, N, M]``
recomputed exactly as Equinox computes them — softmax(q kᵀ/√d_qk) of the captured ``query_proj`` /
``key_proj`` outputs with the call's ``mask`` (2-D or per-head 3-D), by Equinox's own
``dot_product_attention_weights`` (before attention dropout). A call with ``process_heads`` (e.g.
rotary embeddings) or a subclass overriding ``__call__`` changes q/k between the projections and
the scores: it is refused (``apply(..., attention=False)`` records plain inputs; declare the value
projection ``Dense()``). :func:`layer_specs` declares ``value_proj`` as
``QKV(num_heads=H, layout="v")``.
"""

from __future__ import annotations

import contextvars
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from maccore_jax._capture import Recorder, zeros
from maccore_jax.specs import QKV, Conv, Dense, layer_name

__all__ = ["ATTENTION_TYPES", "LAYER_TYPES", "apply", "output_zeros", "layer_specs"]

LAYER_TYPES = (eqx.nn.Linear, eqx.nn.Conv2d)
ATTENTION_TYPES = (eqx.nn.MultiheadAttention,)
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("maccore_jax_equinox_recorder")

try:  # Equinox's own score/softmax (the probabilities are recomputed exactly as it does)
    from equinox.nn._attention import dot_product_attention_weights as _eqx_weights
except ImportError:  # pragma: no cover - a future Equinox moving it: the same computation
    def _eqx_weights(query, key, mask=None):
        query = query / math.sqrt(query.shape[-1])
        logits = jnp.einsum("sd,Sd->sS", query, key)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(logits.dtype, jnp.float32)
        return jax.nn.softmax(logits.astype(dtype)).astype(logits.dtype)


class _Tap(eqx.Module):
    layer: eqx.Module
    path: tuple = eqx.field(static=True)

    def __call__(self, x, *args, **kwargs):
        return _ACTIVE.get().record(self.path, x, lambda v: self.layer(v, *args, **kwargs))


class _AttentionTap(eqx.Module):
    """An ``eqx.nn.MultiheadAttention`` (its projections tapped) that records the attention
    probabilities for its value projection."""

    mha: eqx.Module
    path: tuple = eqx.field(static=True)

    def __call__(self, query, key_, value, mask=None, *, process_heads=None, **kwargs):
        rec = _ACTIVE.get()
        name = layer_name(self.path)
        hint = ("pass apply(..., attention=False) and declare its value projection Dense() "
                "(layer_specs(model, attention_mode='off'))")
        if process_heads is not None:
            raise ValueError(
                f"attention module {name!r}: process_heads (e.g. rotary embeddings) transforms q/k "
                f"between the projections and the scores; its attention probabilities cannot be "
                f"recomputed from the captured projections. {hint}"
            )
        cls = type(self.mha)
        base = eqx.nn.MultiheadAttention
        if cls.__call__ is not base.__call__ or cls._project is not base._project:
            raise ValueError(
                f"attention module {name!r}: {cls.__name__} overrides __call__/_project, so its "
                f"attention probabilities cannot be recomputed from the projections. {hint}"
            )
        if not rec.at_base():
            raise ValueError(
                f"attention module {name!r} is called under a JAX transformation inside the "
                f"per-sample forward; its probabilities cannot be captured. {hint}"
            )
        out = self.mha(query, key_, value, mask, **kwargs)
        outs = {layer_name(p): y for p, y in rec.outputs.items()}
        ins = {layer_name(p): p for p in rec.inputs}
        pre = f"{name}/" if name else ""
        q, k = outs.get(f"{pre}query_proj"), outs.get(f"{pre}key_proj")
        value_path = ins.get(f"{pre}value_proj")
        if q is None or k is None or value_path is None:
            raise ValueError(
                f"attention module {name!r}: its query_proj/key_proj/value_proj were not captured "
                f"(layer_types must include eqx.nn.Linear). {hint}"
            )
        h = self.mha.num_heads
        qh = jnp.reshape(q, (q.shape[0], h, -1))
        kh = jnp.reshape(k, (k.shape[0], h, -1))
        if mask is not None and mask.ndim == 3:
            probs = jax.vmap(_eqx_weights, in_axes=(1, 1, 0))(qh, kh, mask)
        else:
            probs = jax.vmap(lambda a, b: _eqx_weights(a, b, mask), in_axes=(1, 1))(qh, kh)
        rec.attention[value_path] = probs  # [H, N, M] per sample
        return out


def _paths(model, layer_types):
    flat = jax.tree_util.tree_flatten_with_path(
        model, is_leaf=lambda n: isinstance(n, layer_types)
    )[0]
    return [tuple(path) for path, node in flat if isinstance(node, layer_types)]


def _get(tree, path):
    for k in path:
        if hasattr(k, "name"):
            tree = getattr(tree, k.name)
        elif hasattr(k, "idx"):
            tree = tree[k.idx]
        else:
            tree = tree[k.key]
    return tree


def _run_one(model, args, kwargs, perturbations, layer_types, attention=False):
    paths = _paths(model, layer_types)
    mhas = _paths(model, ATTENTION_TYPES) if attention else []
    rec = Recorder(perturbations)
    tapped = eqx.tree_at(
        lambda m: [_get(m, p) for p in paths],
        model,
        replace=[_Tap(_get(model, p), p) for p in paths],
    )
    if mhas == [()]:  # the model is the attention module itself
        tapped = _AttentionTap(tapped, ())
    elif mhas:  # attention modules do not nest
        tapped = eqx.tree_at(
            lambda m: [_get(m, p) for p in mhas],
            tapped,
            replace=[_AttentionTap(_get(tapped, p), p) for p in mhas],
        )
    token = _ACTIVE.set(rec)
    try:
        out = tapped(*args, **kwargs)
    finally:
        _ACTIVE.reset(token)
    rec.finish()
    return (
        out,
        {layer_name(p): v for p, v in rec.inputs_with_attention().items()},
        {layer_name(p): v for p, v in rec.outputs.items()},
    )


def _run(model, args, kwargs, perturbations, layer_types, batch_axis, attention=False):
    if batch_axis is None:
        return _run_one(model, args, kwargs, perturbations, layer_types, attention)

    def one(a, p):
        return _run_one(model, a, kwargs, p, layer_types, attention)

    return jax.vmap(one, in_axes=(batch_axis, 0), out_axes=0)(args, perturbations)


def apply(
    model: eqx.Module,
    *args: Any,
    perturbations: Any = None,
    batch_axis: int | None = 0,
    layer_types: tuple = LAYER_TYPES,
    attention: bool = True,
    **kwargs: Any,
) -> tuple[Any, dict]:
    """``vmap(model)(*args)`` (or ``model(*args)`` with ``batch_axis=None``) → ``(output, acts)``.
    ``attention``: record the probabilities of every ``eqx.nn.MultiheadAttention`` for its value
    projection (module docstring)."""
    out, acts, _ = _run(model, args, kwargs, perturbations, layer_types, batch_axis, attention)
    return out, acts


def output_zeros(
    model: eqx.Module,
    *args: Any,
    batch_axis: int | None = 0,
    layer_types: tuple = LAYER_TYPES,
    **kwargs: Any,
) -> dict:
    """Zero perturbations ``{name: zeros}`` shaped like every captured layer's output (batched)."""
    shapes = eqx.filter_eval_shape(
        lambda m, a: _run(m, a, kwargs, None, layer_types, batch_axis)[2], model, args
    )
    return zeros(shapes)


def layer_specs(model: eqx.Module, *, attention_mode: str = "reference") -> dict[str, Any]:
    """``{name: Dense() | Conv(...) | QKV(...) | None}``: ``eqx.nn.Linear`` → Dense,
    ``eqx.nn.Conv2d`` → Conv with its stride/padding/dilation/groups, any other module with a ≥2-D
    ``weight`` (e.g. ``Embedding``) → None; the ``value_proj`` of an ``eqx.nn.MultiheadAttention`` →
    ``QKV(num_heads=H, mode=attention_mode, layout="v")`` (``"reference"`` or ``"per_head"``;
    ``"off"`` keeps it ``Dense()``)."""
    if attention_mode not in ("reference", "per_head", "off"):
        raise ValueError(
            f"layer_specs: attention_mode must be 'reference', 'per_head' or 'off', got "
            f"{attention_mode!r}"
        )

    def is_layer(n):
        return isinstance(n, eqx.Module) and getattr(getattr(n, "weight", None), "ndim", 0) >= 2

    specs: dict[str, Any] = {}
    for path, node in jax.tree_util.tree_flatten_with_path(model, is_leaf=is_layer)[0]:
        if not is_layer(node):
            continue
        name = layer_name(tuple(path))
        if isinstance(node, eqx.nn.Linear):
            specs[name] = Dense()
        elif isinstance(node, eqx.nn.Conv2d):
            if str(getattr(node, "padding_mode", "ZEROS")).upper() != "ZEROS":
                raise ValueError(
                    f"layer {name!r}: only zero padding is supported, got {node.padding_mode!r}"
                )
            specs[name] = Conv(
                padding=node.padding,
                stride=tuple(node.stride),
                dilation=tuple(node.dilation),
                groups=node.groups,
            )
        else:
            specs[name] = None
    if attention_mode != "off":
        for path in _paths(model, ATTENTION_TYPES):
            value = f"{layer_name(path)}/value_proj" if path else "value_proj"
            if isinstance(specs.get(value), Dense):
                specs[value] = QKV(num_heads=_get(model, path).num_heads, mode=attention_mode,
                                   layout="v")
    return specs
