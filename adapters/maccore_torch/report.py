"""``report()``: a table of which parameter gets which preconditioner."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from maccore_torch.specs import Layer

__all__ = ["parameter_table", "table"]


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """Left-aligned text columns under ``header`` and a dashed rule."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def parameter_table(model: nn.Module, layers: list[Layer], describe: Callable[[Layer], str],
                    params: Iterable[torch.Tensor] | None = None, *,
                    reasons: Mapping[str, str] | None = None) -> tuple[str, int, int]:
    """``(table, preconditioned, total)`` over ``params`` (default: the model's trainable
    parameters): each parameter's name, shape, layer and preconditioner (``describe(layer)``);
    a skipped parameter gets "none (raw gradient)" and ``reasons[name]`` when given. A weight tied
    to an embedding says so."""
    reasons = dict(reasons or {})
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    owner: dict[int, tuple[Layer, str]] = {}
    for layer in layers:
        for p in (layer.weight, layer.bias):
            if p is not None:
                desc = describe(layer)
                if p is layer.weight and layer.tied:
                    desc += f"; tied to {', '.join(layer.tied)}: summed gradient"
                owner[id(p)] = (layer, desc)
    plist = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    rows = []
    for p in plist:
        got = owner.get(id(p))
        name = names.get(id(p), "?")
        why = reasons.get(name)
        rows.append((name, str(list(p.shape)), got[0].name if got else "-",
                     got[1] if got else ("none (raw gradient)" + (f": {why}" if why else ""))))
    n_pre = sum(1 for p in plist if id(p) in owner)
    return table(rows, ("parameter", "shape", "layer", "preconditioner")), n_pre, len(plist)
