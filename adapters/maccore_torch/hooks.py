"""Capture: module hooks that hand each layer's arrays to the engine's statistics functions.

On steps that collect statistics, a forward hook per module passes the layer input (and for fused
qkv projections / ``nn.MultiheadAttention`` the attention probabilities recomputed in
:mod:`maccore_torch.attention`) to ``CurvatureMethod.input_statistics``, and registers a tensor
hook on the output whose gradient goes to ``CurvatureMethod.grad_statistics`` (only for layers
where ``wants_grads``). Micro-batches of one step are pooled with :func:`maccore.engine.pool_stats`
into ``Layer.acc`` (forwards) and ``Layer.grad_acc`` (backwards). Only modules in training mode
with grad enabled contribute. Hooks are attached only while the step collects statistics, and only
to modules with a layer that still wants them (e.g. not a first layer with a fixed inverse).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

import maccore
from maccore.engine import CurvatureMethod, pool_stats

from maccore_torch.attention import capture_mha, qkv_probs, to_batch_first
from maccore_torch.numerics import LossScale, stats_mode
from maccore_torch.specs import Layer

__all__ = ["LayerCapture", "layer_inputs"]


def _unsqueeze0(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0)


# Lifetime (issue 16): the module hooks hold their LayerCapture by weak reference, so they never
# keep a preconditioner alive; when the capture is garbage (its preconditioner was deleted) a
# finalizer removes the hooks. _HOOKED lists the live captures per module (to warn about two).
_HOOKED: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()


def _call_weak(ref: Any, name: str, *args: Any) -> None:
    """``capture.name(*args)`` while the capture lives — and only for its own modules (a
    ``copy.deepcopy`` of the model copies the hooks, not the capture)."""
    capture = ref()
    if capture is None:
        return
    module = args[1] if name == "_on_forward" else args[0]
    if module is capture.model or id(module) in capture._by_module:
        getattr(capture, name)(*args)


def _remove_all(handles: dict, extra: list) -> None:
    for h in list(handles.values()) + extra:
        h.remove()
    handles.clear()
    extra.clear()


class LayerCapture:
    """The hooks of one preconditioner on its model (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: list[Layer], method: CurvatureMethod,
                 loss_scale: LossScale):
        self.model, self.layers, self.method, self.loss_scale = model, layers, method, loss_scale
        self._by_module: dict[int, tuple[nn.Module, list[Layer]]] = {}
        for layer in layers:
            for m in layer.modules:
                self._by_module.setdefault(id(m), (m, []))[1].append(layer)
        self._handles: dict[int, Any] = {}
        self._active = False
        self._removed = False
        me = weakref.ref(self)
        self._scale_hook = (model.register_forward_pre_hook(
            functools.partial(_call_weak, me, "_on_model_forward"))
            if loss_scale.scaler is not None else None)
        self._finalizer = weakref.finalize(self, _remove_all, self._handles,
                                           [] if self._scale_hook is None else [self._scale_hook])
        self._warn_if_hooked()

    def _warn_if_hooked(self) -> None:
        """Warn when another live (not removed) capture hooks one of these modules."""
        clash = []
        for m, layers in self._by_module.values():
            owners = _HOOKED.setdefault(m, weakref.WeakSet())
            if any(not other._removed for other in owners):
                clash.append(layers[0].name)
            owners.add(self)
        if clash:
            level, frame = 1, sys._getframe()  # point at the first line outside maccore_torch
            here = os.path.dirname(os.path.abspath(__file__))
            while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
                frame, level = frame.f_back, level + 1
            warnings.warn(
                f"{self.method.name.upper()}: modules {clash} are already hooked by another live "
                "maccore optimizer or preconditioner; both collect statistics on every forward. "
                "Call remove_hooks() on the old one (or delete it) first", UserWarning,
                stacklevel=level)

    # ------------------------------------------------------------------ attaching
    def _wanted(self, layer: Layer) -> bool:
        spec = layer.spec
        return self.method.wants_input(spec, layer.state) or self.method.wants_grads(spec)

    def sync(self, collecting: bool) -> None:
        """Attach the forward hooks for a collecting step (to the modules whose layers want
        statistics), detach them otherwise."""
        self._active = collecting and not self._removed
        want = set()
        if self._active:
            want = {key for key, (_, layers) in self._by_module.items()
                    if any(self._wanted(layer) for layer in layers)}
        for key in [k for k in self._handles if k not in want]:
            self._handles.pop(key).remove()
        for key in want:
            if key not in self._handles:
                m, layers = self._by_module[key]
                hook = functools.partial(_call_weak, weakref.ref(self), "_on_forward", layers)
                self._handles[key] = m.register_forward_hook(hook, with_kwargs=True)

    def remove(self) -> None:
        """Detach from the model for good."""
        if self._scale_hook is not None:
            self._scale_hook.remove()
            self._scale_hook = None
        self._removed = True
        self.sync(False)

    # ------------------------------------------------------------------ statistics
    def discard(self) -> None:
        """Drop every statistic gathered since the last step."""
        for layer in self.layers:
            layer.acc = {}
            layer.grad_acc = {}

    def reset_gradient_statistics(self) -> None:
        """Drop the output-gradient statistics gathered since the last step (``zero_grad``)."""
        for layer in self.layers:
            layer.grad_acc = {}

    def _on_model_forward(self, module: nn.Module, args: tuple) -> None:
        """With a GradScaler: statistics gathered at another loss scale belong to a skipped step."""
        if not (self._active and module.training and torch.is_grad_enabled() and self.loss_scale.enabled):
            return
        if self.loss_scale.changed():
            self.discard()

    def _on_forward(self, layers: list[Layer], module: nn.Module, args: tuple, kwargs: dict,
                    output: Any) -> None:
        if not (self._active and module.training and torch.is_grad_enabled()):
            return
        if isinstance(module, nn.MultiheadAttention):
            self._on_forward_mha(layers, module, args, kwargs, output)
            return
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        method = self.method
        for layer in layers:
            spec = layer.specs[id(module)]
            xs, out, fix = x.detach(), output.detach(), None
            if spec.kind is maccore.LayerKind.CONV2D and xs.ndim == 3:  # unbatched [C, H, W]
                xs, out, fix = xs.unsqueeze(0), out.unsqueeze(0), _unsqueeze0
            if method.wants_input(spec, layer.state):
                with stats_mode(xs):
                    attn = None
                    if method.wants_attention(spec) and out.ndim == 3:
                        attn = qkv_probs(out, spec.qkv)
                    stats = method.input_statistics(spec, layer.state, xs, attn=attn)
                layer.acc = pool_stats(layer.acc, stats)
            if output.requires_grad and method.wants_grads(spec):
                output.register_hook(functools.partial(self._on_grad, layer, spec, fix))

    def _on_forward_mha(self, layers: list[Layer], module: nn.MultiheadAttention, args: tuple,
                        kwargs: dict, output: Any) -> None:
        method = self.method
        need = [layer for layer in layers if method.wants_input(layer.spec, layer.state)]
        if need:
            with stats_mode(module.in_proj_weight):
                cap = capture_mha(module, args, kwargs)
                for layer in need:
                    spec = layer.spec
                    if layer.role == "mha_out":
                        stats = method.input_statistics(spec, layer.state, cap.context)
                    elif cap.self_attention:
                        attn = cap.attn if method.wants_attention(spec) else None
                        stats = method.input_statistics(spec, layer.state, cap.query, attn=attn)
                    else:
                        stats = method.input_statistics(spec, layer.state, cap.query, key=cap.key,
                                                        value=cap.value)
                    layer.acc = pool_stats(layer.acc, stats)
        out = output[0] if isinstance(output, tuple) else output
        for layer in layers:
            if layer.role == "mha_out" and out.requires_grad and method.wants_grads(layer.spec):
                fix = functools.partial(to_batch_first, batch_first=module.batch_first)
                out.register_hook(functools.partial(self._on_grad, layer, layer.spec, fix))

    def _on_grad(self, layer: Layer, spec: maccore.LayerSpec, fix: Callable | None,
                 grad: torch.Tensor) -> None:
        g = grad.detach() if fix is None else fix(grad.detach())
        with stats_mode(g):
            stats = self.method.grad_statistics(spec, layer.state, g,
                                                grad_scale=self.loss_scale.current())
        layer.grad_acc = pool_stats(layer.grad_acc, stats)


class _Captured(Exception):
    """Raised by the pre-hook of :func:`layer_inputs` to stop the forward at the layer."""


def layer_inputs(model: nn.Module, module: nn.Module, batches: Iterable[Any], *,
                 device: Any = None, name: str = "") -> Iterator[torch.Tensor]:
    """The input of ``module`` for each of ``batches`` (model inputs, or ``(input, target, ...)``
    tuples): the model runs under ``no_grad`` only up to the module (a forward pre-hook stops it)."""
    seen: list[torch.Tensor] = []

    def grab(_m, args):
        seen.append(args[0].detach())
        raise _Captured

    handle = module.register_forward_pre_hook(grab)
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if isinstance(x, torch.Tensor) and device is not None:
                x = x.to(device)
            seen.clear()
            with torch.no_grad():
                try:
                    model(x)
                except _Captured:
                    pass
            if not seen:
                raise RuntimeError(f"fit_first_layer: layer {name} did not run in the forward pass")
            yield seen[0]
    finally:
        handle.remove()
