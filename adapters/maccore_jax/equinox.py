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
model. A tapped layer must be called directly by the per-sample forward (not under its own
``jax.vmap``/``lax.scan``), once per forward.
"""

from __future__ import annotations

import contextvars
from typing import Any

import equinox as eqx
import jax

from maccore_jax._capture import Recorder, zeros
from maccore_jax.specs import Conv, Dense, layer_name

__all__ = ["LAYER_TYPES", "apply", "output_zeros", "layer_specs"]

LAYER_TYPES = (eqx.nn.Linear, eqx.nn.Conv2d)
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("maccore_jax_equinox_recorder")


class _Tap(eqx.Module):
    layer: eqx.Module
    path: tuple = eqx.field(static=True)

    def __call__(self, x, *args, **kwargs):
        return _ACTIVE.get().record(self.path, x, lambda v: self.layer(v, *args, **kwargs))


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


def _run_one(model, args, kwargs, perturbations, layer_types):
    paths = _paths(model, layer_types)
    rec = Recorder(perturbations)
    tapped = eqx.tree_at(
        lambda m: [_get(m, p) for p in paths],
        model,
        replace=[_Tap(_get(model, p), p) for p in paths],
    )
    token = _ACTIVE.set(rec)
    try:
        out = tapped(*args, **kwargs)
    finally:
        _ACTIVE.reset(token)
    rec.finish()
    return (
        out,
        {layer_name(p): v for p, v in rec.inputs.items()},
        {layer_name(p): v for p, v in rec.outputs.items()},
    )


def _run(model, args, kwargs, perturbations, layer_types, batch_axis):
    if batch_axis is None:
        return _run_one(model, args, kwargs, perturbations, layer_types)

    def one(a, p):
        return _run_one(model, a, kwargs, p, layer_types)

    return jax.vmap(one, in_axes=(batch_axis, 0), out_axes=0)(args, perturbations)


def apply(
    model: eqx.Module,
    *args: Any,
    perturbations: Any = None,
    batch_axis: int | None = 0,
    layer_types: tuple = LAYER_TYPES,
    **kwargs: Any,
) -> tuple[Any, dict]:
    """``vmap(model)(*args)`` (or ``model(*args)`` with ``batch_axis=None``) → ``(output, acts)``."""
    out, acts, _ = _run(model, args, kwargs, perturbations, layer_types, batch_axis)
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


def layer_specs(model: eqx.Module) -> dict[str, Any]:
    """``{name: Dense() | Conv(...) | None}``: ``eqx.nn.Linear`` → Dense, ``eqx.nn.Conv2d`` → Conv with its
    stride/padding/dilation/groups, any other module with a ≥2-D ``weight`` (e.g. ``Embedding``) → None."""

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
    return specs
