"""Shared pieces of the capture helpers: a per-forward recorder and nesting of ``{path: array}``.

A layer may be called under ``jax.vmap`` inside the model (the Equinox pattern
``jax.vmap(self.linear)(x)``, or ``eqx.nn.MultiheadAttention``'s projections): the recorder then
records the layer through a :func:`jax.custom_batching.custom_vmap` whose batching rule runs at the
level of the vmap's caller, where the whole batched input (e.g. every token) is recorded — the same
array as applying the layer to the stacked tokens. Any other transformation between the capture and
the layer (``lax.scan``, ``jax.checkpoint``, an inner ``jit``) is reported by name in
:meth:`Recorder.finish`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.extend.core import get_opaque_trace_state

from maccore_jax.specs import AttentionInput, layer_name, lookup


def _level() -> Any:
    return get_opaque_trace_state(convention="flax")


class Recorder:
    """Inputs and outputs of the tapped layers of ONE forward pass, keyed by path tuples.

    ``attention``: ``{value projection path: probabilities [..., H, N, M]}`` recorded by the
    attention-aware helpers; :meth:`inputs_with_attention` wraps those inputs in
    :class:`~maccore_jax.specs.AttentionInput`."""

    def __init__(self, perturbations: Any = None):
        self.inputs: dict[tuple, Any] = {}
        self.outputs: dict[tuple, Any] = {}
        self.attention: dict[tuple, Any] = {}
        self.perts = None if perturbations is None else lookup(perturbations, "perturbations")
        self.used: set[str] = set()
        self.level: dict[tuple, int] = {}
        self.deepest: dict[tuple, int] = {}
        self.base = _level()  # the trace of the forward: layers called here are recorded directly
        self.nested: set[tuple] = set()  # layers called under an inner transformation

    def at_base(self) -> bool:
        return _level() == self.base

    def record(self, path: tuple, x: Any, call: Any) -> Any:
        """Record ``x``, run ``call(x)`` and add the layer's perturbation to its output.

        A subclass whose ``__call__`` reaches the tapped base-class ``__call__`` (``super()``) is
        recorded at the innermost call, the one that applies the weights. Under ``jax.vmap``
        inside the forward, the batched input is recorded at the vmap's caller (module docstring).
        """
        if not self.at_base():
            return self._nested(path, x, call)
        name = layer_name(path)
        level = self.level.get(path, 0)
        if level == 0 and path in self.inputs:
            raise ValueError(
                f"layer {name!r} was called twice in one forward pass; reused layers are "
                "not supported by the capture helpers"
            )
        self.inputs[path] = x
        self.level[path] = level + 1
        self.deepest[path] = max(self.deepest.get(path, 0), level + 1)
        try:
            y = call(x)
        finally:
            self.level[path] = level
        if self.deepest[path] != level + 1:  # an inner call was recorded
            return y
        if self.perts is not None:
            if name not in self.perts:
                raise ValueError(
                    f"perturbations: no entry for layer {name!r} (have {sorted(self.perts)})"
                )
            p = self.perts[name]
            if tuple(p.shape) != tuple(y.shape):
                raise ValueError(
                    f"perturbations: layer {name!r} outputs {list(y.shape)} but its "
                    f"perturbation has shape {list(p.shape)}"
                )
            y = y + p.astype(y.dtype)
            self.used.add(name)
        self.outputs[path] = y
        return y

    def _nested(self, path: tuple, x: Any, call: Any) -> Any:
        """The layer runs under a transformation inside the forward: if it is ``jax.vmap``, its
        batching rule records the batched input one level up (recursively, for nested vmaps)."""
        self.nested.add(path)
        f = custom_vmap(lambda v: call(v))

        @f.def_vmap
        def rule(axis_size, in_batched, xb):
            if not in_batched[0]:
                xb = jnp.broadcast_to(xb, (axis_size, *jnp.shape(xb)))
            return self.record(path, xb, jax.vmap(call)), True

        return f(x)

    def finish(self) -> None:
        lost = sorted(layer_name(p) for p in self.nested if p not in self.inputs)
        if lost:
            raise ValueError(
                f"layer(s) {lost} were called inside a JAX transformation other than jax.vmap "
                "(lax.scan, jax.checkpoint/remat, an inner jit, ...) within the forward; the capture "
                "helpers record a layer called directly by the forward or under jax.vmap only. Call "
                "the layer outside the transformation, or exclude it (skip_layers=[...])"
            )
        if self.perts is not None:
            unused = sorted(set(self.perts) - self.used)
            if unused:
                raise ValueError(
                    f"perturbations given for {unused}, which were not called in the forward"
                )

    def inputs_with_attention(self) -> dict[tuple, Any]:
        """:attr:`inputs`, the value projections' inputs wrapped with their probabilities."""
        out = dict(self.inputs)
        for path, probs in self.attention.items():
            if path in out:
                out[path] = AttentionInput(out[path], probs)
        return out


def nest(flat: dict[tuple, Any]) -> dict:
    """``{('a', 'b'): x}`` → ``{'a': {'b': x}}``."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def zeros(shapes: Any) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
