"""``torch.distributed``: the weighted all-reduce of finalized statistics.

Every rank finalizes its pooled statistics (``CurvatureMethod.finalize`` → ``{key: (value,
weight)}``); the ranks then take the ``weight``-weighted mean of each value, so every rank folds
the statistics of the global batch and applies the same preconditioner. A rank that saw no batch of
a layer contributes zeros of the template's shape (``CurvatureMethod.templates``) with weight 0.
One collective per (dtype, device).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

__all__ = ["average_statistics", "is_distributed", "weighted_mean"]

Entry = tuple[torch.Tensor | None, float, torch.Tensor]  # (value or None, weight, template)


def is_distributed(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank in ``group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


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
