"""MAC's first-layer true inverse for the optax transformations: :func:`fit_first_layer`.

The published ResNet / ViT runs precondition the first layer with the full damped inverse of its
input second moment, ``(A + λI)⁻¹`` with ``A`` the mean over some batches of
``maccore.input_factor(rows)`` (docs/math.md), fixed once before training — what
``maccore_torch.MAC.fit_first_layer`` does. Here the inverse is stored in that layer's
:class:`maccore.MacState` (``first_inv``, :func:`maccore.engine.with_first_layer`) inside the
optax state, and ``apply`` multiplies by it from then on; nothing else changes.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import maccore
from maccore import engine

from maccore_jax.optimizers import MomentumState
from maccore_jax.specs import discover, lookup, skip_names
from maccore_jax.transform import CurvatureState, curvature_states, map_curvature_states

__all__ = ["fit_first_layer"]


def _tree(state: Any, params: Any, where: str) -> Any:
    """``params``, or the momentum trace of the state (a tree with the parameters' structure)."""
    if params is not None:
        return params
    moms = _leaves_of(state, MomentumState)
    if len(moms) != 1:
        raise ValueError(
            f"{where}: pass params= (the state has {len(moms)} momentum traces to find the "
            "layers in)"
        )
    return moms[0].trace


def _leaves_of(state: Any, kind: type) -> list:
    return [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind))
            if isinstance(x, kind)]


def fit_first_layer(
    state: Any,
    batches: Iterable[Any],
    *,
    damping: Any,
    layer: str | None = None,
    params: Any = None,
    layout: str = "flax",
    layers: Mapping | None = None,
    skip_layers: Iterable[str] | None = None,
    attention: Mapping | None = None,
) -> Any:
    """Return ``state`` (of :func:`maccore_jax.mac` / :func:`~maccore_jax.scale_by_mac`, alone or
    inside any optax chain) with the first layer preconditioned by its true damped inverse.

    Args:
        state: the optimizer state (e.g. ``tx.init(params)``).
        batches: an iterable of the layer's inputs, one array per batch (Flax layout:
            ``[..., d_in]`` dense, NHWC conv), or of activation trees as returned by the capture helpers
            (``maccore_jax.linen.apply(...)[1]``), from which the layer's entry is taken.
        damping: λ of ``(A + λI)⁻¹`` — the ``damping`` of the transformation (as
            ``maccore_torch.MAC.fit_first_layer``, which uses the optimizer's).
        layer: the layer's name; default: the first non-attention layer in parameter-tree order
            (``jax.tree`` order, e.g. ``"Conv_0"``, ``"Dense_0"``).
        params: the parameter tree (default: the state's momentum trace, which has its structure).
        layout, layers, skip_layers, attention: as given to the transformation (conv layers need
            their declaration: the rows depend on the geometry).

    ``A`` is the mean over ``batches`` of :func:`maccore.input_factor` of each batch's rows, the
    inverse :func:`maccore.engine.first_layer_inverse`, stored with
    :func:`maccore.engine.with_first_layer`. The returned state has a different tree structure
    (the layer state holds the inverse): jitted steps retrace once, and a checkpoint template
    needs the same call (or use :func:`maccore_jax.save_portable` / ``load_portable``).
    """
    where = "maccore_jax.fit_first_layer"
    curv = curvature_states(state)
    if len(curv) != 1:
        raise ValueError(
            f"{where}: expected exactly one maccore_jax curvature state in the optimizer state, "
            f"found {len(curv)} (pass the state of mac/scale_by_mac)"
        )
    curv = curv[0]
    found, _, _ = discover(_tree(state, params, where), layout=layout, layers=layers,
                           attention=attention, skip=skip_names(skip_layers))
    if set(found) != set(curv.layers):
        raise ValueError(
            f"{where}: the state has layers {sorted(curv.layers)} but the tree has "
            f"{sorted(found)}; pass the same layout/layers/skip_layers/attention as to the transformation"
        )
    plain = [n for n, lay in found.items() if lay.qkv is None]
    if layer is None:
        if not plain:
            raise ValueError(f"{where}: the state has no dense/conv layer (only {sorted(found)})")
        layer = plain[0]
    if layer not in plain:
        raise ValueError(f"{where}: no dense/conv layer named {layer!r}; known: {plain}")
    lay, st = found[layer], curv.layers[layer]
    if not isinstance(st, maccore.MacState):
        raise TypeError(
            f"{where}: the first-layer inverse is a MAC feature; layer {layer!r} has a "
            f"{type(st).__name__}"
        )
    total, count = None, 0
    for item in batches:
        x = item if hasattr(item, "shape") else lookup(item, "batches").get(layer)
        if x is None:
            raise ValueError(f"{where}: a batch has no input for layer {layer!r}")
        x = jnp.asarray(x)
        lay.check_input(x, "batches")
        xn = lay.nchw(x)
        a = maccore.input_factor(maccore.to_rows(lay.core_spec(xn), xn))
        total = a if total is None else total + a
        count += 1
    if count == 0:
        raise ValueError(f"{where}: 'batches' is empty")
    inverse = engine.first_layer_inverse(total / count, damping, name=layer)
    fixed = engine.with_first_layer(st, inverse)

    def put(c: CurvatureState) -> CurvatureState:
        return c._replace(layers={**c.layers, layer: fixed})

    return map_curvature_states(put, state)
