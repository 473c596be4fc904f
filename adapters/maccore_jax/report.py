"""``maccore_jax.report``: which parameter leaf gets which preconditioner, and why the others don't
(the coverage contract; ``maccore_torch``'s ``opt.report()`` for JAX)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from maccore_jax.specs import QkvSpec, coverage, skip_names

__all__ = ["report"]


def report(
    params: Any,
    *,
    layout: str = "flax",
    layers: Mapping[str, Any] | None = None,
    attention: Mapping[str, QkvSpec] | None = None,
    skip_layers: Iterable[str] | None = None,
    method: str = "preconditioned",
) -> str:
    """A table of every leaf of ``params``: its layer and preconditioner, or ``none`` with the
    reason it is skipped. Pass the ``layout``, ``layers``, ``attention`` and ``skip_layers`` given
    to the transformation (``method``: the name printed, e.g. ``"MAC"``)."""
    found, skipped = coverage(params, layout=layout, layers=layers, attention=attention,
                              skip=skip_names(skip_layers))
    rows = []
    for name, layer in found.items():
        what = method + (f" attention value (H={layer.qkv.num_heads}, {layer.qkv.mode}) "
                         f"[{layer.d_out}, {layer.d_in}{' + 1' if layer.has_bias else ''}]"
                         if layer.qkv is not None and layer.qkv.layout == "v" else
                         f" fused qkv (H={layer.qkv.num_heads})" if layer.qkv is not None else
                         f" ({layer.kind.value} [{layer.d_out}, {layer.d_in}{' + 1' if layer.has_bias else ''}])")
        leaf = "kernel" if layout == "flax" else "weight"
        rows.append((f"{name}/{leaf}", str(list(layer.weight_shape)), name, what))
        if layer.has_bias:
            rows.append((f"{name}/bias", str(list(layer.bias_shape or ())), name, what))
    for s in skipped:
        flag = "WARNING " if s.suspicious else ""
        rows.append((s.parameter, str(list(s.shape)), "-", f"{flag}none (raw gradient): {s.reason}"))
    n_pre = sum(1 + l.has_bias for l in found.values())
    header = ("parameter", "shape", "layer", "preconditioner")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [f"{method}: {len(found)} preconditioned layers, {n_pre}/{n_pre + len(skipped)} "
             f"parameters preconditioned", fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
