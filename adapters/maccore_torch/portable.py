"""Portable checkpoints for the torch optimizers: :func:`save_portable` / :func:`load_portable`.

The file (layout: :mod:`maccore.checkpoint`) holds every preconditioned layer's core state, the step
count, the momentum buffers (layer buffers in the canonical ``[d_out, d̃]`` gradient-matrix layout,
other parameters' buffers in their own shape) and MAC's fixed first-layer inverse. It loads into
``maccore_jax.load_portable`` (MAC/KFAC on Dense/Conv layers), into another torch optimizer of the
same method and model, or into NumPy arrays via :func:`maccore.checkpoint.load`.

Layers and parameters are named by their torch module / parameter names (``"fc1"``,
``"ln.weight"``; tied layers ``"a+b"``); ``names={saved: new}`` renames them on save or load (e.g.
``{"fc1": "Dense_0"}`` towards Flax). What ``load_portable`` restores: the core states, the update
counts, the step count, the momentum buffers (a layer without a saved buffer starts a fresh one) and
the first-layer inverse. Learning rates, weight decay and the other settings stay those of the
optimizer you load into (the saved ones are in the header, for reference).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

import maccore
from maccore import checkpoint as ck

from maccore_torch._base import CurvatureOptimizer, HookedPreconditioner

__all__ = ["save_portable", "load_portable"]

_EXTRAS = ("first_inv",)


def _to_numpy(t: torch.Tensor) -> Any:
    """A tensor as a host NumPy array for :mod:`maccore.checkpoint` (which knows no framework).

    NumPy has no bfloat16: such tensors become float32 (lossless); loading casts every array back to
    the dtype of the optimizer it is loaded into."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return t.numpy()


def _to_tensor(a: Any, like: torch.Tensor | None = None, *, device: Any = None,
               dtype: Any = None) -> torch.Tensor:
    """A NumPy array read from a checkpoint as a tensor on ``like``'s device and dtype (or the
    given ``device`` / ``dtype``)."""
    if like is not None:
        device, dtype = like.device, like.dtype
    return torch.as_tensor(np.asarray(a)).to(device=device, dtype=dtype)


def _without_first_inv(state: Any) -> Any:
    """The state without MAC's fixed first-layer inverse: the file keeps it as the layer's extra
    ``first_inv`` entry (format version 1), not as a state field."""
    if getattr(state, "first_inv", None) is not None:
        return state._replace(first_inv=None)
    return state


def _split(opt: Any, where: str) -> tuple[HookedPreconditioner, CurvatureOptimizer | None]:
    if isinstance(opt, CurvatureOptimizer):
        return opt.preconditioner, opt
    if isinstance(opt, HookedPreconditioner):
        return opt, None
    raise TypeError(
        f"{where}: expected a maccore_torch optimizer (MAC, KFAC) or preconditioner, got "
        f"{type(opt).__name__}"
    )


def _param_names(pre: HookedPreconditioner) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, p in pre.model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    return names


def _other_params(pre: HookedPreconditioner, opt: CurvatureOptimizer) -> dict[str, torch.Tensor]:
    """Optimizer parameters outside the preconditioned layers, by parameter name."""
    in_layers = {id(p) for l in pre.layers for p in (l.weight, l.bias) if p is not None}
    names = _param_names(pre)
    out = {}
    for g in opt.param_groups:
        for p in g["params"]:
            if id(p) not in in_layers:
                out[names.get(id(p), f"param{len(out)}")] = p
    return out


def save_portable(opt: Any, path: Any, *, names: Mapping[str, str] | None = None) -> None:
    """Write the curvature state, step count and momentum buffers of ``opt`` (a
    :class:`maccore_torch.MAC` / :class:`maccore_torch.KFAC`, or a preconditioner: no momentum)
    to ``path`` (an ``.npz`` file, see :mod:`maccore.checkpoint`). Checkpoint between steps:
    statistics of a step in progress are not saved. ``names``: ``{torch name: saved name}``."""
    where = "maccore_torch.save_portable"
    pre, optim = _split(opt, where)
    layers = {}
    for l in pre.layers:
        arrays, types = ck.flatten_state(_without_first_inv(l.state))
        mom = None
        if optim is not None:
            bw = optim.state.get(l.weight, {}).get("momentum_buffer")
            if bw is not None:
                bb = None
                if l.bias is not None:
                    bb = optim.state.get(l.bias, {}).get("momentum_buffer")
                    bb = torch.zeros_like(l.bias) if bb is None else bb.to(bw.dtype)
                mom = maccore.grad_matrix(bw.detach(), None if bb is None else bb.detach())
        extra = {} if l.first_inv is None else {"first_inv": _to_numpy(l.first_inv)}
        layers[l.name] = ck.LayerEntry(
            kind=l.spec.kind.value,
            d_out=l.spec.d_out,
            d_tilde=l.spec.d_tilde,
            has_bias=l.bias is not None,
            state={k: _to_numpy(v) for k, v in arrays.items()},
            state_types=types,
            updates=l.updates,
            momentum=None if mom is None else _to_numpy(mom),
            extra=extra,
        )
    params = {}
    hyper = dict(pre._hyperparameters())
    if optim is not None:
        for name, p in _other_params(pre, optim).items():
            buf = optim.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                params[name] = _to_numpy(buf)
        hyper["param_groups"] = [
            {k: v for k, v in g.items() if k != "params"} for g in optim.param_groups
        ]
    ck.save(
        path,
        ck.Checkpoint(
            method=pre.method,
            step=pre.t,
            layers=ck.rename_entries(layers, names, where),
            params=ck.rename_entries(params, names, where),
            hyperparameters=hyper,
            source="torch",
        ),
    )


def load_portable(opt: Any, path: Any, *, names: Mapping[str, str] | None = None) -> None:
    """Load a portable checkpoint (written by either adapter) into ``opt``.

    ``names``: ``{saved name: torch name}`` for layers and parameters whose names differ (e.g.
    ``{"Dense_0": "fc1"}`` for a checkpoint written by ``maccore_jax``). Raises ``ValueError`` —
    and changes nothing — when the method differs, the layer names (after ``names``) or sizes
    differ, a state field is missing or has another shape, or the format version is unknown.
    """
    where = "maccore_torch.load_portable"
    pre, optim = _split(opt, where)
    ckpt = ck.load(path)
    target = {l.name: (l.spec.kind.value, l.spec.d_out, l.spec.d_tilde, l.bias is not None)
              for l in pre.layers}
    entries = ckpt.select(target, method=pre.method, names=names, where=where)
    # build everything first, assign at the end: a failure leaves the optimizer as it was
    states, firsts, buffers = {}, {}, {}
    for l in pre.layers:
        e = entries[l.name]
        lw = f"{where}: layer {l.name!r}"
        states[l.name] = ck.unflatten_state(_without_first_inv(l.state), e.state, e.state_types,
                                            where=lw)
        unknown = sorted(set(e.extra) - set(_EXTRAS))
        if unknown:
            raise ValueError(f"{lw}: unknown entries {unknown} (written by a newer maccore?)")
        fi = e.extra.get("first_inv")
        if fi is not None:
            if pre.method not in ("MAC", "SMAC") or tuple(fi.shape) != (e.d_tilde, e.d_tilde):
                raise ValueError(f"{lw}: cannot use a first-layer inverse of shape {list(fi.shape)}")
            fi = _to_tensor(fi, device=l.weight.device, dtype=states[l.name].mean_hat.dtype)
        firsts[l.name] = fi
        if optim is not None:
            if e.momentum is None:
                buffers[id(l.weight)] = (l.weight, None)
                if l.bias is not None:
                    buffers[id(l.bias)] = (l.bias, None)
            else:
                mat = _to_tensor(e.momentum, l.weight)
                w, b = maccore.split_grad_matrix(mat, tuple(l.weight.shape), bias=l.bias is not None)
                buffers[id(l.weight)] = (l.weight, w.contiguous())
                if l.bias is not None:
                    buffers[id(l.bias)] = (l.bias, b.to(l.bias.dtype).contiguous())
    if optim is not None:
        saved = ckpt.select_params(names, where=where)
        others = _other_params(pre, optim)
        unexpected = sorted(set(saved) - set(others))
        if unexpected:
            raise ValueError(
                f"{where}: the checkpoint has momentum for parameters {unexpected} that the "
                f"optimizer does not have (its other parameters: {sorted(others)}); pass names="
            )
        for name, p in others.items():
            buf = saved.get(name)
            if buf is not None and tuple(buf.shape) != tuple(p.shape):
                raise ValueError(
                    f"{where}: momentum of parameter {name!r} has shape {list(buf.shape)}, the "
                    f"parameter {list(p.shape)}"
                )
            t = None if buf is None else _to_tensor(buf, p)
            buffers[id(p)] = (p, t)
    for l in pre.layers:
        l.state, l.updates = states[l.name], entries[l.name].updates
        l.first_inv = firsts[l.name]
        if hasattr(l, "cache"):
            l.cache = None
        if l.first_inv is not None:
            pre._on_first_layer_fixed(l)
    for p, buf in buffers.values():
        st = optim.state[p]
        if buf is None:
            st.pop("momentum_buffer", None)
        else:
            st["momentum_buffer"] = buf
    pre._discard()
    pre.consecutive_skips = 0
    pre.t = ckpt.step
