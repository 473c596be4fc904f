"""``torch.distributed``: the weighted all-reduce of finalized statistics.

Every rank finalizes its pooled statistics (``CurvatureMethod.finalize`` → ``{key: (value,
weight)}``); the ranks then take the ``weight``-weighted mean of each value, so every rank folds
the statistics of the global batch and applies the same preconditioner. A rank that saw no batch of
a layer contributes zeros of the template's shape (``CurvatureMethod.templates``) with weight 0.
One collective per (dtype, device).

FSDP2 (``torch.distributed.fsdp.fully_shard``): a parameter is a ``DTensor`` sharded by rows
(``Shard(0)``, ``torch.chunk`` layout: the weight's rows and the bias entries of a layer are chunked
identically). The statistics are all-reduced as above; the preconditioner is applied to each rank's
own rows (:func:`precondition_shard`) without gathering the gradient. That is exact only when the
preconditioner is row-local — every row of ``[W | b]`` is multiplied by a ``d̃ × d̃`` matrix and at
most scaled by a per-row factor: MAC, SMAC, the first-layer inverse, SINGD with a diagonal
output-side factor ``C``. :func:`check_shardable` refuses the others (KFAC, SINGD with a
non-diagonal ``C``, transposed weights, fused qkv / attention projections) at construction.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import math

import torch
import torch.distributed as dist

import maccore
from maccore.engine import apply_split

try:  # the public DTensor (torch >= 2.4); older torch has no FSDP2
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = Shard = None

__all__ = ["average_statistics", "check_shardable", "is_distributed", "is_sharded", "local_rows",
           "precondition_shard", "weighted_mean", "world_size"]

Entry = tuple[torch.Tensor | None, float, torch.Tensor]  # (value or None, weight, template)


def is_distributed(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank in ``group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: Any = None) -> int:
    """The number of ranks in ``group`` when ``torch.distributed`` is initialised with more than
    one (:func:`is_distributed`), else 1: the data-parallel world size the statistics of SMAC are
    normalised by (``maccore.engine.data_parallel_grad_scale``)."""
    return dist.get_world_size(group) if is_distributed(group) else 1


def weighted_mean(entries: Sequence[Entry], group: Any = None) -> list[tuple[torch.Tensor, float]]:
    """Cross-rank weighted means of ``(value, weight, template)`` entries: ``(Σ w·v / Σ w, Σ w)``
    per entry (``Σ w = 0``: zeros). A ``None`` value contributes weight 0."""
    groups: dict[tuple, list[int]] = {}
    for i, (_, _, tmpl) in enumerate(entries):
        groups.setdefault((tmpl.dtype, tmpl.device), []).append(i)
    out: list[Any] = [None] * len(entries)
    for (dtype, device), idx in groups.items():
        parts, weights = [], []
        for i in idx:
            v, w, tmpl = entries[i]
            use = v is not None and w > 0
            parts.append((v.to(dtype) * w).reshape(-1) if use
                         else torch.zeros(tmpl.numel(), dtype=dtype, device=device))
            weights.append(float(w) if use else 0.0)
        flat = torch.cat(parts + [torch.tensor(weights, dtype=dtype, device=device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        total_w = flat[-len(idx):].tolist()
        offset = 0
        for i, w in zip(idx, total_w):
            tmpl = entries[i][2]
            chunk = flat[offset:offset + tmpl.numel()].reshape(tmpl.shape)
            offset += tmpl.numel()
            out[i] = (chunk / w if w > 0 else chunk, w)
    return out


def average_statistics(local: Sequence[Mapping[str, tuple[torch.Tensor, float]]],
                       templates: Sequence[Mapping[str, torch.Tensor]], group: Any = None
                       ) -> list[dict[str, tuple[torch.Tensor, float]]]:
    """Per layer ``{key: (value, weight)}`` averaged over the ranks. ``templates`` (per layer, the
    same keys on every rank) fixes the collective's layout."""
    keys, entries = [], []
    for i, tmpls in enumerate(templates):
        for k, tmpl in tmpls.items():
            v, w = local[i].get(k, (None, 0.0))
            keys.append((i, k))
            entries.append((v, w, tmpl))
    out: list[dict] = [{} for _ in templates]
    for (i, k), vw in zip(keys, weighted_mean(entries, group)):
        out[i][k] = vw
    return out


# ---------------------------------------------------------------------------------------------
# FSDP2: row-sharded parameters (DTensor, Shard(0))


def is_sharded(t: Any) -> bool:
    """Whether ``t`` (a parameter or gradient) is a ``DTensor`` (FSDP2 / tensor parallel)."""
    return DTensor is not None and isinstance(t, DTensor)


def _shard_mesh_dim(t: Any) -> int | None:
    """The mesh dimension ``t`` is sharded on along tensor dim 0 (the others replicated);
    ``None`` for any other layout."""
    shard = [i for i, p in enumerate(t.placements) if isinstance(p, Shard)]
    if len(shard) != 1 or t.placements[shard[0]].dim != 0:
        return None
    if any(not p.is_replicate() for i, p in enumerate(t.placements) if i != shard[0]):
        return None
    return shard[0]


def local_rows(t: Any) -> tuple[int, int]:
    """``(start, stop)``: the global rows (dim 0) of a ``Shard(0)`` DTensor held by this rank
    (``torch.chunk`` layout, as FSDP2 and DTensor shard). Checked against the local shape."""
    dim = _shard_mesh_dim(t)
    if dim is None:
        raise ValueError(f"expected a DTensor sharded on dim 0 (FSDP2), got placements {t.placements}")
    n, world = int(t.shape[0]), t.device_mesh.size(dim)
    coord = t.device_mesh.get_local_rank(dim)
    chunk = math.ceil(n / world) if n else 0
    start = min(coord * chunk, n)
    stop = min(start + chunk, n)
    local = int(t.to_local().shape[0])
    if local != stop - start:
        raise RuntimeError(f"unexpected row sharding: rank {coord} of {world} holds {local} of {n} "
                           f"rows, expected rows [{start}, {stop})")
    return start, stop


def _why_not_row_local(method: str, curvature: Any, layer: Any) -> str | None:
    """Why ``layer``'s preconditioner cannot be applied to a row shard (``None``: it can)."""
    if curvature.name == "kfac":
        return ("the output-side factor's inverse (G + λI)⁻¹ mixes the rows of the gradient, which "
                "FSDP2 shards by rows (use MAC / SMAC, SINGD with a diagonal output-side factor, "
                "or DDP)")
    for name, p in (("weight", layer.weight), ("bias", layer.bias)):
        if p is not None and is_sharded(p) and _shard_mesh_dim(p) is None:
            return (f"its {name} is sharded as {p.placements}; only row sharding (Shard(0), as "
                    "FSDP2 does) is supported")
    if layer.transposed:
        return ("its weight is stored [d_in, d_out], so FSDP2 shards it by input columns and the "
                "preconditioner mixes them")
    state = layer.state
    if isinstance(state, maccore.MacState):
        if layer.spec.qkv is not None or state.mean.value.ndim != 1:
            return ("its row blocks (fused qkv / per-head factors) have their own factors; "
                    "sharded row blocks are not supported")
        return None
    if isinstance(state, maccore.SingdState):
        from maccore.structures.diagonal import Diagonal  # noqa: PLC0415
        if not isinstance(state.C, Diagonal):
            return (f"the output-side factor C ({type(state.C).__name__}) mixes the rows of the "
                    "gradient, which FSDP2 shards by rows; pass structures=(<any>, \"diagonal\")")
        return None
    return f"{method} is not known to be row-local"


def check_shardable(method: str, curvature: Any, layers: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the first layer with a sharded (DTensor) weight whose
    preconditioner is not row-local (see the module docstring)."""
    for layer in layers:
        if not (is_sharded(layer.weight) or (layer.bias is not None and is_sharded(layer.bias))):
            continue
        why = _why_not_row_local(method, curvature, layer)
        if why is not None:
            raise ValueError(f"{method} layer {layer.name!r} cannot be preconditioned under FSDP2 "
                             f"(sharded parameters): {why}")


def _row_state(state: Any, start: int, stop: int) -> Any:
    """The rows ``[start, stop)`` of a row-local state (per-row entries sliced; the rest kept)."""
    if isinstance(state, maccore.MacState):
        if state.diag_hat is None:
            return state
        return state._replace(diag_hat=state.diag_hat[start:stop])
    C = type(state.C)(state.C.diag[start:stop])
    return state._replace(C=C, m_C=None if state.m_C is None else type(state.m_C)(state.m_C.diag[start:stop]))


def precondition_shard(curvature: Any, layer: Any, state: Any) -> None:
    """Precondition this rank's rows of a row-sharded (FSDP2) layer in place: ``grad.to_local()``
    and the matching bias entries, with the per-row parts of ``state`` sliced to them."""
    gw = layer.weight.grad
    gb = None if layer.bias is None else layer.bias.grad
    start, stop = local_rows(gw)
    lw = gw.to_local()
    lb = None
    if gb is not None:
        if not is_sharded(gb) or local_rows(gb) != (start, stop):
            raise RuntimeError(f"layer {layer.name!r}: the bias gradient is not sharded like the "
                               "weight's rows")
        lb = gb.to_local()
    if stop == start:
        return
    if lw.requires_grad or (lb is not None and lb.requires_grad):
        raise RuntimeError(f"layer {layer.name!r}: sharded gradients that are part of a graph "
                           "(create_graph=True) are not supported")
    apply_split(curvature, layer.spec, _row_state(state, start, stop), lw, lb, inplace=True)


def localize(tensors: Any) -> tuple[list, list]:
    """DTensors replaced by their local shards, and the process groups of their meshes (for
    :func:`agree`: a decision about sharded tensors must be the same on every rank)."""
    out, groups = [], {}
    for t in tensors:
        if is_sharded(t):
            for g in t.device_mesh.get_all_groups():
                groups.setdefault(id(g), g)
            t = t.to_local()
        out.append(t)
    return out, list(groups.values())


def agree(flag: bool, groups: Sequence[Any]) -> bool:
    """``flag`` and-ed over the ranks of ``groups`` (one small all-reduce per group)."""
    for g in groups:
        t = torch.tensor([0.0 if flag else 1.0])
        if dist.get_backend(g) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g)
        flag = float(t) == 0.0
    return flag
