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

Attention (``nnx.MultiHeadAttention``): the ``value`` projection's entry is a
:class:`maccore_jax.AttentionInput` ``(x, probs)``: its input and the attention probabilities
``[B, H, N, M]`` the module itself computes — the layer is called with ``sow_weights=True`` and the
sown ``attention_weights`` are taken back out of the module (masks, ``is_causal`` and grouped
key/value heads included; before attention dropout). :func:`layer_specs` declares that projection
``QKV(num_heads=H, layout="v")`` (MAC: the attention-weighted mean for V; q/k: the plain mean).
``apply(..., attention=False)`` records plain inputs only.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

from flax import nnx

from maccore_jax._capture import Recorder, nest, zeros
from maccore_jax.specs import QKV, Conv, Dense, layer_name

__all__ = ["ATTENTION_TYPES", "LAYER_TYPES", "apply", "output_zeros", "layer_specs"]

LAYER_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv)
ATTENTION_TYPES = (nnx.MultiHeadAttention,)
_SOWN = "attention_weights"  # the name nnx's dot_product_attention_weights sows under


def _layers(model, layer_types):
    return {
        id(node): tuple(path)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, layer_types)
    }


def _patched(model, types):
    """``{class: original __call__}`` of every class on the MROs of the instances of ``types``."""
    index = _layers(model, types)
    classes = {
        cls
        for _, node in nnx.iter_graph(model)
        if id(node) in index
        for cls in type(node).__mro__
        if "__call__" in cls.__dict__ and issubclass(cls, types)
    }
    return index, {cls: cls.__dict__["__call__"] for cls in classes}


def _take_sown(mha, name: str, keep: bool) -> Any:
    """The last attention weights ``mha`` sowed (an attribute, or an ``nnx.capture``
    collection), removed from it unless ``keep`` (the caller asked for them itself)."""
    for var in getattr(mha, "__captures__", ()) or ():
        if type(var) is nnx.Intermediate and _SOWN in var:
            vals = var[_SOWN]
            if not keep:
                if isinstance(vals, tuple) and len(vals) > 1:
                    var[_SOWN] = vals[:-1]
                else:
                    del var[_SOWN]
            return vals[-1] if isinstance(vals, tuple) else vals
    var = vars(mha).get(_SOWN)
    if var is None:
        raise ValueError(
            f"attention module {name!r} ({type(mha).__name__}) did not sow its attention weights "
            f"(a custom attention_fn?): the attention-aware capture needs them; pass "
            f"apply(..., attention=False) and declare its value projection Dense (layer_specs(model, "
            f"attention_mode='off'))"
        )
    vals = var.get_value()
    if not keep:
        if isinstance(vals, tuple) and len(vals) > 1:
            var.set_value(vals[:-1])
        else:
            delattr(mha, _SOWN)
    return vals[-1] if isinstance(vals, tuple) else vals


@contextlib.contextmanager
def _swapped(originals, wrap):
    """Each class's ``__call__`` replaced by ``wrap(original)`` while the block runs."""
    try:
        for cls, orig in originals.items():
            cls.__call__ = wrap(orig)
        yield
    finally:
        for cls, orig in originals.items():
            cls.__call__ = orig


@contextlib.contextmanager
def _attention_tapped(model, rec):
    """Call every ``nnx.MultiHeadAttention`` with ``sow_weights=True`` and record the sown
    probabilities for its ``value`` projection (the module is left as it was)."""
    index, originals = _patched(model, ATTENTION_TYPES)
    # the base class only: a subclass's own __call__ may not take sow_weights (one calling
    # super().__call__ is captured there)
    originals = {cls: f for cls, f in originals.items() if cls in ATTENTION_TYPES}

    def wrap(orig):
        def __call__(self, *a, **kw):
            path = index.get(id(self))
            if path is None:
                return orig(self, *a, **kw)
            name = layer_name(path)
            if not rec.at_base():
                raise ValueError(
                    f"attention module {name!r} is called under a JAX transformation inside the "
                    "forward (nnx.vmap/scan/remat); its probabilities cannot be captured. Pass "
                    "apply(..., attention=False) and declare its value projection Dense"
                )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Using 'Module.sow", DeprecationWarning)
                out = orig(self, *a, **{**kw, "sow_weights": True})
            probs = _take_sown(self, name, keep=bool(kw.get("sow_weights", False)))
            rec.attention[tuple(path) + ("value",)] = probs
            return out

        return __call__

    with _swapped(originals, wrap):
        yield


@contextlib.contextmanager
def _tapped(model, layer_types, rec):
    # every class on the layers' MROs that defines __call__ (a subclass calling super().__call__ is
    # recorded at the innermost call, the one applying the weights)
    index, originals = _patched(model, layer_types)

    def wrap(orig):
        def __call__(self, x, *a, **kw):
            path = index.get(id(self))
            if path is None:
                return orig(self, x, *a, **kw)
            return rec.record(path, x, lambda v: orig(self, v, *a, **kw))

        return __call__

    with _swapped(originals, wrap):
        yield


def _run(model, args, kwargs, perturbations, layer_types, attention=False):
    rec = Recorder(perturbations)
    with _tapped(model, layer_types, rec), (
        _attention_tapped(model, rec) if attention else contextlib.nullcontext()
    ):
        out = model(*args, **kwargs)
    rec.finish()
    return out, rec


def apply(
    model: nnx.Module,
    *args: Any,
    perturbations: Any = None,
    layer_types: tuple = LAYER_TYPES,
    attention: bool = True,
    **kwargs: Any,
) -> tuple[Any, dict]:
    """``model(*args, **kwargs)`` → ``(output, acts)`` (one forward pass). ``attention``: record
    the probabilities of every ``nnx.MultiHeadAttention`` for its value projection (module
    docstring)."""
    out, rec = _run(model, args, kwargs, perturbations, layer_types, attention)
    return out, nest(rec.inputs_with_attention())


def output_zeros(
    model: nnx.Module, *args: Any, layer_types: tuple = LAYER_TYPES, **kwargs: Any
) -> dict:
    """Zero perturbations shaped like every captured layer's output (abstract evaluation)."""

    def f(m):
        return nest(_run(m, args, kwargs, None, layer_types)[1].outputs)

    return zeros(nnx.eval_shape(f, model))


def layer_specs(model: nnx.Module, *, attention_mode: str = "reference") -> dict[str, Any]:
    """``{name: Dense() | Conv(...) | QKV(...) | None}`` from the module types: ``nnx.Linear`` →
    Dense, ``nnx.LinearGeneral`` (trailing contracted axes, no batch axes) → ``Dense(in_ndim=...)``,
    ``nnx.Conv`` → Conv with its strides/padding/dilation/groups, any other module owning a
    ``kernel`` → None. The ``value`` projection of an ``nnx.MultiHeadAttention`` →
    ``QKV(num_heads=H, mode=attention_mode, layout="v", num_kv_heads=...)`` (``attention_mode``
    ``"reference"`` or ``"per_head"``; ``"off"`` keeps it a plain ``Dense(in_ndim=1)``)."""
    if attention_mode not in ("reference", "per_head", "off"):
        raise ValueError(
            f"layer_specs: attention_mode must be 'reference', 'per_head' or 'off', got "
            f"{attention_mode!r}"
        )
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
    if attention_mode != "off":
        for path, node in nnx.iter_graph(model):
            value = layer_name(tuple(path) + ("value",))
            if isinstance(node, ATTENTION_TYPES) and isinstance(specs.get(value), Dense):
                h, kv = node.num_heads, node.num_kv_heads
                specs[value] = QKV(num_heads=h, mode=attention_mode, layout="v",
                                   num_kv_heads=None if kv == h else kv)
    return specs


def _pair(v: Any) -> Any:
    if v is None:
        return 1
    return v if isinstance(v, int) else tuple(v)
