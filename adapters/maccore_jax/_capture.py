"""Shared pieces of the capture helpers: a per-forward recorder and nesting of ``{path: array}``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from maccore_jax.specs import layer_name, lookup


class Recorder:
    """Inputs and outputs of the tapped layers of ONE forward pass, keyed by path tuples."""

    def __init__(self, perturbations: Any = None):
        self.inputs: dict[tuple, Any] = {}
        self.outputs: dict[tuple, Any] = {}
        self.perts = None if perturbations is None else lookup(perturbations, "perturbations")
        self.used: set[str] = set()
        self.level: dict[tuple, int] = {}
        self.deepest: dict[tuple, int] = {}

    def record(self, path: tuple, x: Any, call: Any) -> Any:
        """Record ``x``, run ``call(x)`` and add the layer's perturbation to its output.

        A subclass whose ``__call__`` reaches the tapped base-class ``__call__`` (``super()``) is
        recorded at the innermost call, the one that applies the weights.
        """
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

    def finish(self) -> None:
        if self.perts is not None:
            unused = sorted(set(self.perts) - self.used)
            if unused:
                raise ValueError(
                    f"perturbations given for {unused}, which were not called in the forward"
                )


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
