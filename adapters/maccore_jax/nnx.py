"""Capture for Flax nnx: layer inputs (and output gradients) from the forward that computes the loss.

::

    def loss_fn(model, perts, x, y):
        out, acts = maccore_jax.nnx.apply(model, x, perturbations=perts)
        return loss(out, y), acts

    perts = maccore_jax.nnx.output_zeros(model, x)                       # KFAC only
    grad_fn = nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (l, acts), (grads, gouts) = grad_fn(model, perts, x, y)
    optimizer.update(model, grads, activations=acts, output_grads=gouts)  # nnx.Optimizer(model, tx, wrt=nnx.Param)

``acts`` is nested like ``nnx.state(model, nnx.Param)`` with each ``nnx.Linear``/``nnx.Conv`` replaced by
its input. The layer classes' ``__call__`` are wrapped for the duration of the forward only (the
instances are found with ``nnx.iter_graph``); do not run two captures concurrently in threads.
"""

from __future__ import annotations

import contextlib
from typing import Any

from flax import nnx

from maccore_jax._capture import Recorder, nest, zeros
from maccore_jax.specs import Conv, Dense, layer_name

__all__ = ["LAYER_TYPES", "apply", "output_zeros", "layer_specs"]

LAYER_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv)


def _layers(model, layer_types):
    return {
        id(node): tuple(path)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, layer_types)
    }


@contextlib.contextmanager
def _tapped(model, layer_types, rec):
    index = _layers(model, layer_types)
    # every class on the layers' MROs that defines __call__ (a subclass calling super().__call__ is
    # recorded at the innermost call, the one applying the weights)
    classes = {
        cls
        for _, node in nnx.iter_graph(model)
        if id(node) in index
        for cls in type(node).__mro__
        if "__call__" in cls.__dict__ and issubclass(cls, layer_types)
    }
    originals = {cls: cls.__dict__["__call__"] for cls in classes}

    def wrap(orig):
        def __call__(self, x, *a, **kw):
            path = index.get(id(self))
            if path is None:
                return orig(self, x, *a, **kw)
            return rec.record(path, x, lambda v: orig(self, v, *a, **kw))

        return __call__

    try:
        for cls, orig in originals.items():
            cls.__call__ = wrap(orig)
        yield
    finally:
        for cls, orig in originals.items():
            cls.__call__ = orig


def _run(model, args, kwargs, perturbations, layer_types):
    rec = Recorder(perturbations)
    with _tapped(model, layer_types, rec):
        out = model(*args, **kwargs)
    rec.finish()
    return out, rec


def apply(
    model: nnx.Module,
    *args: Any,
    perturbations: Any = None,
    layer_types: tuple = LAYER_TYPES,
    **kwargs: Any,
) -> tuple[Any, dict]:
    """``model(*args, **kwargs)`` → ``(output, acts)`` (one forward pass)."""
    out, rec = _run(model, args, kwargs, perturbations, layer_types)
    return out, nest(rec.inputs)


def output_zeros(
    model: nnx.Module, *args: Any, layer_types: tuple = LAYER_TYPES, **kwargs: Any
) -> dict:
    """Zero perturbations shaped like every captured layer's output (abstract evaluation)."""

    def f(m):
        return nest(_run(m, args, kwargs, None, layer_types)[1].outputs)

    return zeros(nnx.eval_shape(f, model))


def layer_specs(model: nnx.Module) -> dict[str, Any]:
    """``{name: Dense() | Conv(...) | None}`` from the module types: ``nnx.Linear`` → Dense,
    ``nnx.LinearGeneral`` (trailing contracted axes, no batch axes) → ``Dense(in_ndim=...)``, ``nnx.Conv``
    → Conv with its strides/padding/dilation/groups, any other module owning a ``kernel`` → None."""
    specs: dict[str, Any] = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        name = layer_name(tuple(path))
        if isinstance(node, nnx.Linear):
            specs[name] = Dense()
        elif isinstance(node, nnx.LinearGeneral):  # kernel [*in, *out]: flattened to a matrix
            axes = tuple(node.axis)
            k = len(axes)
            ok = not tuple(getattr(node, "batch_axis", None) or ()) and sorted(axes) == list(range(-k, 0))
            specs[name] = Dense(in_ndim=k) if ok else None
        elif (
            isinstance(node, nnx.Conv)
            and len(node.kernel_size) == 2
            and node.input_dilation in (None, 1)
            and not (
                isinstance(node.padding, str) and node.padding.upper() not in ("SAME", "VALID")
            )
        ):
            pad = node.padding
            if not isinstance(pad, (str, int)):
                pad = tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)
            specs[name] = Conv(
                padding=pad,
                stride=_pair(node.strides),
                dilation=_pair(node.kernel_dilation),
                groups=node.feature_group_count,
            )
        elif isinstance(getattr(node, "kernel", None), nnx.Param):
            specs[name] = None
    return specs


def _pair(v: Any) -> Any:
    if v is None:
        return 1
    return v if isinstance(v, int) else tuple(v)
