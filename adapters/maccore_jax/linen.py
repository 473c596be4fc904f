"""Capture for Flax linen: layer inputs (and output gradients) from the forward that computes the loss.

::

    def loss_fn(params, perts, x, y):
        out, acts = maccore_jax.linen.apply(model, {"params": params}, x, perturbations=perts)
        return loss(out, y), acts

    perts = maccore_jax.linen.output_zeros(model, {"params": params}, x)     # KFAC only
    (l, acts), (grads, gouts) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(params, perts, x, y)
    updates, state = tx.update(grads, state, params, activations=acts, output_grads=gouts)

``acts``/``output_zeros`` are nested like ``variables["params"]``: each ``nn.Dense``/``nn.Conv`` dict is
replaced by its input / a zero array shaped like its output. The zero *perturbation* is added to the
layer output, so its gradient is the gradient of the loss w.r.t. that output. Calls are intercepted
with ``nn.intercept_methods``; a layer may be called once per forward (no ``nn.scan``/shared layers).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from maccore_jax._capture import Recorder, nest, zeros
from maccore_jax.specs import Conv, Dense, layer_name

__all__ = ["LAYER_TYPES", "apply", "output_zeros", "layer_specs"]

LAYER_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv)


def _run(model, variables, args, kwargs, perturbations, layer_types, modules=None):
    rec = Recorder(perturbations)

    def interceptor(next_fun, a, kw, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, layer_types):
            return next_fun(*a, **kw)
        path = tuple(mod.path)
        if modules is not None:
            modules[path] = mod
        if a:
            return rec.record(path, a[0], lambda x: next_fun(x, *a[1:], **kw))
        x = kw.pop("inputs")
        return rec.record(path, x, lambda x: next_fun(inputs=x, **kw))

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, *args, **kwargs)
    rec.finish()
    return out, rec


def apply(
    model: nn.Module,
    variables: Any,
    *args: Any,
    perturbations: Any = None,
    layer_types: tuple = LAYER_TYPES,
    **kwargs: Any,
) -> tuple[Any, dict]:
    """``model.apply(variables, *args, **kwargs)`` → ``(output, acts)`` (one forward pass)."""
    out, rec = _run(model, variables, args, kwargs, perturbations, layer_types)
    return out, nest(rec.inputs)


def output_zeros(
    model: nn.Module, variables: Any, *args: Any, layer_types: tuple = LAYER_TYPES, **kwargs: Any
) -> dict:
    """Zero perturbations shaped like every captured layer's output (abstract evaluation, no FLOPs)."""
    shapes = jax.eval_shape(
        lambda: nest(_run(model, variables, args, kwargs, None, layer_types)[1].outputs)
    )
    return zeros(shapes)


def layer_specs(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``{name: Dense() | Conv(...) | None}`` for every ``nn.Dense``/``nn.Conv`` the forward calls, read
    from the modules (strides, padding, dilation, groups), to pass as ``layers=`` to the transformations.
    Convs the core does not support (1-D/3-D, input dilation, circular padding) map to None: their
    parameters get the plain momentum update."""
    modules: dict = {}
    jax.eval_shape(lambda: _run(model, variables, args, kwargs, None, LAYER_TYPES, modules)[0])
    specs: dict[str, Any] = {}
    for path, mod in modules.items():
        name = layer_name(path)
        if isinstance(mod, nn.Dense):
            specs[name] = Dense()
            continue
        if isinstance(mod, nn.DenseGeneral):  # kernel [*in, *out]: flattened to a matrix
            specs[name] = _general(mod.axis, mod.batch_dims)
            continue
        pad = mod.padding
        if (
            mod.input_dilation not in (None, 1)
            or len(mod.kernel_size) != 2
            or isinstance(pad, str)
            and pad.upper() not in ("SAME", "VALID")
        ):
            specs[name] = None  # not supported (1-D/3-D, input dilation, circular/causal padding)
            continue
        if not isinstance(pad, (str, int)):
            pad = tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)
        specs[name] = Conv(
            padding=pad,
            stride=_pair(mod.strides),
            dilation=_pair(mod.kernel_dilation),
            groups=mod.feature_group_count,
        )
    return specs


def _pair(v: Any) -> Any:
    if v is None:
        return 1
    return v if isinstance(v, int) else tuple(v)


def _general(axis: Any, batch_dims: Any) -> Any:
    """``Dense(in_ndim=k)`` for a DenseGeneral contracting the k trailing input axes, else None."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    k = len(axes)
    if tuple(batch_dims or ()) or sorted(axes) != list(range(-k, 0)):
        return None  # batch dims or non-trailing contracted axes: not supported
    return Dense(in_ndim=k)
