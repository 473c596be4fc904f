"""Capture: module hooks that hand each layer's arrays to the engine's statistics functions.

On steps that collect statistics, a forward hook per module passes the layer input (and for fused
qkv projections / ``nn.MultiheadAttention`` the attention probabilities recomputed in
:mod:`maccore_torch.attention`) to ``CurvatureMethod.input_statistics``, and registers a tensor
hook on the output whose gradient goes to ``CurvatureMethod.grad_statistics`` (only for layers
where ``wants_grads``). Micro-batches of one step are pooled with :func:`maccore.engine.pool_stats`
into ``Layer.acc`` (forwards) and ``Layer.grad_acc`` (backwards). Only modules in training mode
with grad enabled contribute. Each module keeps ONE hook for the capture's lifetime; a per-module
gate (:class:`_Gate`) decides whether it calls in — on for the steps that collect statistics and
only for modules with a layer that still wants them (e.g. not a first layer with a fixed inverse).
A projection declared with :class:`~maccore_torch.AttentionModule` keeps its input until the hook
of its attention module reads the probabilities the module returned (``_on_attention``).

``torch.compile`` (docs/models/torch.md, "Training loops"): dynamo traces module hooks into the
graph and does not guard on hook dictionaries, so hooks attached or detached after the first
compile would be ignored or stale. Hence the hooks stay attached, the gate is read by the hook
itself (dynamo guards on it: one compiled variant per gate value, never a baked-in decision),
every hook also reads ``_REGISTRY.epoch`` (changed whenever a capture attaches or detaches, so
cached graphs are retraced), and the statistics themselves are computed outside the graph (a
``torch._dynamo``-disabled call: a graph break at each hooked module on collecting steps only).

Copies: the hooks are :class:`_CaptureHook` objects holding their capture by weak reference; a
``copy.deepcopy``, ``pickle`` or ``torch.save`` of the model turns them into :class:`_InertHook`
placeholders that do nothing (a copy — e.g. an EMA model — never feeds the optimizer).
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
from maccore.engine import CurvatureMethod, data_parallel_grad_scale, pool_stats

from maccore_torch.attention import capture_mha, module_probs, qkv_probs, to_batch_first
from maccore_torch.numerics import LossScale, stats_mode
from maccore_torch.specs import Layer

__all__ = ["LayerCapture", "layer_inputs"]


def _unsqueeze0(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0)


# Lifetime (issue 16): the module hooks hold their LayerCapture by weak reference, so they never
# keep a preconditioner alive; when the capture is garbage (its preconditioner was deleted) a
# finalizer removes the hooks. _HOOKED lists the live captures per module (to warn about two).
_HOOKED: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()


class _Registry:
    """``epoch`` changes whenever a capture attaches or detaches its hooks; every hook reads it, so
    graphs compiled by ``torch.compile`` before the change fail their guards and are retraced
    (dynamo does not guard on the hook dictionaries themselves)."""

    def __init__(self) -> None:
        self.epoch = "0"
        self.count = 0

    def bump(self) -> None:
        self.count += 1
        self.epoch = str(self.count)  # a string: dynamo guards on its exact value


_REGISTRY = _Registry()


class _Gate:
    """Whether one module's hook calls into its capture (``on``: a collecting step and a layer
    of the module wants statistics). Read by the hook, so dynamo guards on it."""

    def __init__(self) -> None:
        self.on = False


def _dispatch(ref: Any, name: str, key: int | None, args: tuple) -> None:
    """``capture.name(*args)`` while the capture lives and only for its own modules (a shallow
    copy of a module shares its hook dictionary)."""
    capture = ref()
    if capture is None or capture._removed:
        return
    if key is None:  # the model's pre-hook: (module, args)
        if args[0] is capture.model:
            getattr(capture, name)(*args)
        return
    entry = capture._by_module.get(key)  # a module's forward hook: (module, args, kwargs, output)
    if entry is not None and entry[0] is args[0]:
        capture.fired += 1
        getattr(capture, name)(entry[1], *args)


# the statistics run outside any torch.compile graph (a graph break on collecting steps only):
# ``torch._disable_dynamo`` runs ``_dispatch`` under ``torch._dynamo.disable`` (nothing in it is
# traced), importing torch._dynamo lazily, so eager-only programs never import it
_dispatch_eager_only = torch._disable_dynamo(_dispatch)
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def _dispatch_outside(*args: Any) -> None:
    """The hook's eager path. Once torch._dynamo is loaded, a frame called from a compiled
    region's eager fallback would itself be compiled: go through the disabled call then too."""
    if "torch._dynamo" in sys.modules:
        _dispatch_eager_only(*args)
    else:
        _dispatch(*args)


class _CaptureHook:
    """A module hook of a :class:`LayerCapture`: a plain object holding the capture by weak
    reference (it never keeps a preconditioner alive). ``copy.deepcopy`` / ``pickle`` /
    ``torch.save`` of the hooked model store an :class:`_InertHook` in its place."""

    def __init__(self, capture: "LayerCapture", name: str, key: int | None, gate: _Gate):
        self.ref, self.name, self.key, self.gate = weakref.ref(capture), name, key, gate

    def __call__(self, *args: Any) -> None:
        if _REGISTRY.epoch == "" or not self.gate.on:
            return None
        if _is_compiling():
            _dispatch_eager_only(self.ref, self.name, self.key, args)
        else:
            _dispatch_outside(self.ref, self.name, self.key, args)
        return None

    def __reduce__(self) -> tuple:
        return (_InertHook, ())


class _InertHook:
    """What a :class:`_CaptureHook` becomes in a copy of the model: a hook that does nothing (the
    copy is not the optimizer's model; its forwards collect no statistics)."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __repr__(self) -> str:
        return "<maccore_torch inert hook (a copy of a hooked model)>"


def _remove_all(handles: dict, extra: list) -> None:
    for h in list(handles.values()) + extra:
        h.remove()
    handles.clear()
    extra.clear()
    _REGISTRY.bump()


class LayerCapture:
    """The hooks of one preconditioner on its model (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: list[Layer], method: CurvatureMethod,
                 loss_scale: LossScale, world_size: Callable[[], int] | None = None):
        self.model, self.layers, self.method, self.loss_scale = model, layers, method, loss_scale
        # the number of data-parallel ranks whose gradients are averaged (1: one process)
        self.world_size = world_size or (lambda: 1)
        self._by_module: dict[int, tuple[nn.Module, list[Layer]]] = {}
        for layer in layers:
            for m in layer.modules:
                self._by_module.setdefault(id(m), (m, []))[1].append(layer)
            if layer.attention is not None:  # its attention module returns the probabilities
                src = layer.attention.module
                self._by_module.setdefault(id(src), (src, []))[1].append(layer)
        self._waiting: dict[int, list] = {}  # id(layer) -> inputs waiting for the probabilities
        self._handles: dict[int, Any] = {}
        self._gates: dict[int, _Gate] = {}
        self._active = False
        self._removed = False
        self.fired = 0  # module hooks that called in since the last discard()
        # one hook per module for the capture's lifetime (see the module docstring)
        for key, (m, _) in self._by_module.items():
            gate = self._gates[key] = _Gate()
            self._handles[key] = m.register_forward_hook(
                _CaptureHook(self, "_on_forward", key, gate), with_kwargs=True)
        self._scale_gate = _Gate()
        self._scale_hook = (model.register_forward_pre_hook(
            _CaptureHook(self, "_on_model_forward", None, self._scale_gate))
            if loss_scale.scaler is not None else None)
        _REGISTRY.bump()
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
        """Open the gates of the hooks for a collecting step (of the modules whose layers want
        statistics), close them otherwise. The hooks themselves stay attached."""
        self._active = collecting and not self._removed
        for key, (_, layers) in self._by_module.items():
            gate = self._gates.get(key)
            if gate is None:
                continue
            on = self._active and any(self._wanted(layer) for layer in layers)
            if gate.on != on:
                gate.on = on
        if self._scale_gate.on != self._active:
            self._scale_gate.on = self._active

    def remove(self) -> None:
        """Detach from the model for good."""
        self._removed = True
        self.sync(False)
        if self._scale_hook is not None:
            self._scale_hook.remove()
            self._scale_hook = None
        for h in self._handles.values():
            h.remove()
        self._handles.clear()
        _REGISTRY.bump()

    # ------------------------------------------------------------------ statistics
    def discard(self) -> None:
        """Drop every statistic gathered since the last step."""
        self.fired = 0
        self._waiting.clear()
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
        src = layers[0].attention
        if src is not None and module is src.module:
            self._on_attention(layers, module, output)
            return
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
            if (layer.attention is not None and method.wants_attention(spec)
                    and method.wants_input(spec, layer.state)):
                # completed by the attention module's hook, with the probabilities it returns
                self._waiting.setdefault(id(layer), []).append(xs)
            elif method.wants_input(spec, layer.state):
                with stats_mode(xs):
                    attn = None
                    if method.wants_attention(spec) and out.ndim == 3:
                        attn = qkv_probs(out, spec.qkv)
                    stats = method.input_statistics(spec, layer.state, xs, attn=attn)
                layer.acc = pool_stats(layer.acc, stats)
            if output.requires_grad and method.wants_grads(spec):
                output.register_hook(functools.partial(self._on_grad, layer, spec, fix))

    def _on_attention(self, layers: list[Layer], module: nn.Module, output: Any) -> None:
        """An :class:`~maccore_torch.AttentionModule` returned: the inputs its projections saw in
        this forward get their statistics with the probabilities it returned."""
        waiting = [(layer, self._waiting.pop(id(layer), [])) for layer in layers
                   if layer.attention is not None and layer.attention.module is module]
        if not (self._active and module.training and torch.is_grad_enabled()):
            return
        for layer, inputs in waiting:
            if not inputs:
                continue  # the projection did not collect in this forward
            if len(inputs) > 1:
                raise RuntimeError(f"attention[{layer.attention.name!r}]: {layer.name} ran "
                                   f"{len(inputs)} times in one forward of its attention module")
            x, spec = inputs[0], layer.spec
            with stats_mode(x):
                attn = module_probs(layer.attention, output, x, layer.name, spec.qkv.num_heads)
                stats = self.method.input_statistics(spec, layer.state, x, attn=attn)
            layer.acc = pool_stats(layer.acc, stats)

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
        # the loss scale, and under data parallelism the world size for methods whose gradient
        # statistic is not renormalised by the batch size (SMAC): the engine's rule
        grad_scale = data_parallel_grad_scale(self.method, self.world_size(),
                                              self.loss_scale.current())
        with stats_mode(g):
            stats = self.method.grad_statistics(spec, layer.state, g, grad_scale=grad_scale)
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
