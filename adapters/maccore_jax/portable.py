"""Portable checkpoints for the optax transformations: :func:`save_portable` / :func:`load_portable`.

The file (layout: :mod:`maccore.checkpoint`) holds every layer's core state, the step count and the
momentum trace of :func:`maccore_jax.mac` / :func:`maccore_jax.kfac` — layer buffers in the
canonical ``[d_out, d̃]`` gradient-matrix layout (a Flax kernel ``[d_in, d_out]`` and a torch weight
``[d_out, d_in]`` give the same matrix; HWIO / OIHW convs likewise), other leaves in their own
shape. It loads into ``maccore_torch.load_portable`` and back.

Layers are named by their parameter path (``"Dense_0"``, ``"Block_0/Dense_1"``), other leaves by
their path too (``"LayerNorm_0/scale"``); ``names={saved: new}`` renames on save or load (e.g.
``{"fc1": "Dense_0"}`` for a checkpoint written by ``maccore_torch``). Pass the same ``layout``,
``layers`` and ``attention`` as to the transformation (conv layers must be declared).

What ``load_portable`` fills in a template state (``tx.init(params)``): the
:class:`~maccore_jax.CurvatureState` (step count and per-layer states), the
:class:`~maccore_jax.MomentumState` (count = step, trace) and the count of an optax learning-rate
schedule; other states of your chain keep the template's values.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from maccore import checkpoint as ck
from maccore import engine

from maccore_jax.optimizers import MomentumState
from maccore_jax.specs import _keys, discover
from maccore_jax.transform import CurvatureState

__all__ = ["save_portable", "load_portable"]

def _to_numpy(x: Any) -> np.ndarray:
    """A JAX array as a host NumPy array for :mod:`maccore.checkpoint` (which knows no framework).
    bfloat16 arrays come out as NumPy's ``ml_dtypes`` bfloat16, which the checkpoint stores as
    float32; loading casts every array back to the dtype of the template state."""
    return np.asarray(jax.device_get(x))


# per-layer state type → method (by name: method plug-ins need not be imported here)
_METHODS = {"MacState": "MAC", "KfacState": "KFAC", "SingdState": "SINGD"}


def _kind(st: Any) -> str:
    name = type(st).__name__
    if name == "MacState" and st.diag is not None:
        return "SMAC"
    return _METHODS.get(name, name.upper())


def _unwrap(st: Any) -> tuple[Any, dict]:
    """``(core state, extras)``: MAC's fixed first-layer inverse is saved as the entry's extra
    ``first_inv`` (as ``maccore_torch`` saves it), not as a state field."""
    fi = getattr(st, "first_inv", None)
    return (st, {}) if fi is None else (st._replace(first_inv=None), {"first_inv": fi})


def _rewrap(core: Any, extra: Mapping[str, Any]) -> Any:
    fi = extra.get("first_inv")
    if fi is None:
        return core
    return engine.with_first_layer(core, jnp.asarray(np.asarray(fi), core.mean.value.dtype))


def _find(state: Any, kind: type) -> list:
    out = []

    def walk(x):
        if isinstance(x, kind):
            out.append(x)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk(state)
    return out


def _replace(state: Any, fn) -> Any:
    """Rebuild ``state`` with ``fn(node)`` applied to every node (``fn`` returns the node or a
    replacement; replaced nodes are not descended into)."""
    new = fn(state)
    if new is not state:
        return new
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*[_replace(v, fn) for v in state])
    if isinstance(state, (tuple, list)):
        return type(state)(_replace(v, fn) for v in state)
    if isinstance(state, dict):
        return type(state)({k: _replace(v, fn) for k, v in state.items()})
    return state


def _parts(state: Any, params: Any, where: str):
    curv = _find(state, CurvatureState)
    if len(curv) != 1:
        raise ValueError(
            f"{where}: expected exactly one maccore_jax curvature state in the optimizer state, "
            f"found {len(curv)} (pass the state of mac/kfac/scale_by_*)"
        )
    moms = _find(state, MomentumState)
    if len(moms) > 1:
        raise ValueError(f"{where}: found {len(moms)} momentum states; expected at most one")
    mom = moms[0] if moms else None
    tree = mom.trace if mom is not None else params
    if tree is None:
        raise ValueError(
            f"{where}: the state has no momentum trace to find the layers in; pass params="
        )
    return curv[0], mom, tree


def _method(curv: CurvatureState, where: str) -> str:
    kinds = {_kind(s) for s in curv.layers.values()}
    if len(kinds) > 1:
        raise ValueError(f"{where}: layers hold states of several methods {sorted(kinds)}")
    return kinds.pop() if kinds else "MAC"


def _leaf_names(tree: Any) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(str(k) for k in _keys(path)) for path, _ in flat]


def _layer_leaves(found: dict) -> set[int]:
    out = set()
    for layer in found.values():
        out.add(layer.weight_index)
        if layer.bias_index is not None:
            out.add(layer.bias_index)
    return out


def save_portable(
    path: Any,
    state: Any,
    params: Any = None,
    *,
    layout: str = "flax",
    layers: Mapping | None = None,
    attention: Mapping | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """Write the curvature state, step count and momentum trace of an optimizer state (of
    :func:`maccore_jax.mac` / :func:`maccore_jax.kfac`, or ``scale_by_*`` — then pass ``params``
    so the layers can be found) to ``path`` (see :mod:`maccore.checkpoint`).
    ``names``: ``{name here: saved name}``."""
    where = "maccore_jax.save_portable"
    curv, mom, tree = _parts(state, params, where)
    found, leaves, _ = discover(tree, layout=layout, layers=layers, attention=attention)
    if set(found) != set(curv.layers):
        raise ValueError(
            f"{where}: the state has layers {sorted(curv.layers)} but the tree has {sorted(found)}; "
            "pass the same layout/layers/attention as to the transformation"
        )
    with_momentum = mom is not None and int(mom.count) > 0
    entries = {}
    for n, layer in found.items():
        core, extra = _unwrap(curv.layers[n])
        arrays, types = ck.flatten_state(core)
        m = None
        if with_momentum:
            gb = None if layer.bias_index is None else leaves[layer.bias_index]
            m = _to_numpy(layer.grad_mat(leaves[layer.weight_index], gb))
        entries[n] = ck.LayerEntry(
            kind=layer.kind.value,
            d_out=layer.d_out,
            d_tilde=layer.d_tilde,
            has_bias=layer.has_bias,
            state={k: _to_numpy(v) for k, v in arrays.items()},
            state_types=types,
            updates=_updates(core),
            momentum=m,
            extra={k: _to_numpy(v) for k, v in extra.items()},
        )
    others = {}
    if with_momentum:
        taken = _layer_leaves(found)
        for i, (name, leaf) in enumerate(zip(_leaf_names(tree), leaves)):
            if i not in taken:
                others[name] = _to_numpy(leaf)
    ck.save(
        path,
        ck.Checkpoint(
            method=_method(curv, where),
            step=int(curv.count),
            layers=ck.rename_entries(entries, names, where),
            params=ck.rename_entries(others, names, where),
            hyperparameters={"layout": layout},
            source="jax",
        ),
    )


def _updates(st: Any) -> int:
    arrays, _ = ck.flatten_state(st)
    counts = [int(v) for k, v in arrays.items() if k.split("/")[-1] == "count"]
    return counts[0] if counts else 0


def load_portable(
    path: Any,
    state: Any,
    params: Any = None,
    *,
    layout: str = "flax",
    layers: Mapping | None = None,
    attention: Mapping | None = None,
    names: Mapping[str, str] | None = None,
) -> Any:
    """Return ``state`` (a template, e.g. ``tx.init(params)``) filled from a portable checkpoint
    written by either adapter.

    ``names``: ``{saved name: name here}`` (e.g. ``{"fc1": "Dense_0"}``). Raises ``ValueError``
    when the method differs, the layer names (after ``names``) or sizes differ, a state field is
    missing or has another shape, or the format version is unknown. Layers without a saved
    momentum buffer (a checkpoint taken before the first step) get a zero trace.
    """
    where = "maccore_jax.load_portable"
    curv, mom, tree = _parts(state, params, where)
    found, leaves, treedef = discover(tree, layout=layout, layers=layers, attention=attention)
    if set(found) != set(curv.layers):
        raise ValueError(
            f"{where}: the state has layers {sorted(curv.layers)} but the tree has {sorted(found)}; "
            "pass the same layout/layers/attention as to the transformation"
        )
    ckpt = ck.load(path)
    target = {n: (l.kind.value, l.d_out, l.d_tilde, l.has_bias) for n, l in found.items()}
    entries = ckpt.select(target, method=_method(curv, where), names=names, where=where)
    new_layers = {}
    for n in found:
        e = entries[n]
        lw = f"{where}: layer {n!r}"
        if set(e.extra) - {"first_inv"}:
            raise ValueError(
                f"{lw}: entries {sorted(set(e.extra) - {'first_inv'})} are not supported by "
                "maccore_jax"
            )
        core = ck.unflatten_state(_unwrap(curv.layers[n])[0], e.state, e.state_types, where=lw)
        new_layers[n] = _rewrap(core, e.extra)
    if not 0 <= ckpt.step <= int(jnp.iinfo(curv.count.dtype).max):
        raise ValueError(f"{where}: step {ckpt.step} does not fit the {curv.count.dtype} step count")
    step = jnp.asarray(ckpt.step, dtype=curv.count.dtype)
    replacements = {id(curv): curv._replace(count=step, layers=new_layers)}
    if mom is not None:
        out = list(leaves)
        for n, layer in found.items():
            m = entries[n].momentum
            wl = leaves[layer.weight_index]
            if m is None:
                w, b = jnp.zeros_like(wl), None
                if layer.bias_index is not None:
                    b = jnp.zeros_like(leaves[layer.bias_index])
            else:
                w, b = layer.split(jnp.asarray(np.asarray(m), dtype=wl.dtype))
            out[layer.weight_index] = w.astype(wl.dtype)
            if layer.bias_index is not None:
                out[layer.bias_index] = b.astype(leaves[layer.bias_index].dtype)
        saved = ckpt.select_params(names, where=where)
        taken = _layer_leaves(found)
        others = {nm: i for i, nm in enumerate(_leaf_names(tree)) if i not in taken}
        unexpected = sorted(set(saved) - set(others))
        if unexpected:
            raise ValueError(
                f"{where}: the checkpoint has momentum for parameters {unexpected} that the "
                f"optimizer does not have (its other leaves: {sorted(others)}); pass names="
            )
        for nm, i in others.items():
            leaf = leaves[i]
            buf = saved.get(nm)
            if buf is None:
                out[i] = jnp.zeros_like(leaf)
                continue
            if tuple(buf.shape) != tuple(leaf.shape):
                raise ValueError(
                    f"{where}: momentum of parameter {nm!r} has shape {list(buf.shape)}, the "
                    f"parameter {list(leaf.shape)}"
                )
            out[i] = jnp.asarray(np.asarray(buf), dtype=leaf.dtype)
        trace = jax.tree_util.tree_unflatten(treedef, out)
        replacements[id(mom)] = MomentumState(jnp.asarray(ckpt.step, dtype=mom.count.dtype), trace)

    def fn(node):
        if id(node) in replacements and isinstance(node, (CurvatureState, MomentumState)):
            return replacements[id(node)]
        if isinstance(node, optax.ScaleByScheduleState):
            return optax.ScaleByScheduleState(jnp.asarray(ckpt.step, dtype=node.count.dtype))
        return node

    return _replace(state, fn)
