"""Shared pieces of the torch adapter tests: import fallback, capture hooks, independent rows.

Everything here is plain torch, written independently of the adapter (F.unfold for im2col,
explicit reshapes) so the tests compare the adapter against separately computed quantities.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

try:  # installed (pip install -e .) or on PYTHONPATH
    import maccore_torch  # noqa: F401
except ImportError:  # a plain checkout: the import package lives in adapters/
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "adapters"))
    import maccore_torch  # noqa: F401

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


class Capture:
    """Forward hooks recording every (input, output) of the given modules, in training mode."""

    def __init__(self, modules):
        self.records = {id(m): [] for m in modules}
        self.grads = {id(m): [] for m in modules}
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, args, out):
        if not torch.is_grad_enabled():
            return
        self.records[id(module)].append(args[0].detach().clone())
        if out.requires_grad:
            out.register_hook(lambda g, k=id(module): self.grads[k].append(g.detach().clone()))

    def inputs(self, m):
        return self.records[id(m)]

    def clear(self):
        for v in self.records.values():
            v.clear()
        for v in self.grads.values():
            v.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


def rows_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Independent input rows [R, d̃] of a Linear (any leading dims) or Conv2d (F.unfold) input."""
    if isinstance(module, nn.Linear):
        r = x.reshape(-1, x.shape[-1])
    else:
        pad = module.padding
        if pad == "same":
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
            pad = 0
        if module.groups > 1:  # depthwise: every (n, c, p) is a row of length kh·kw
            n, c, h, w = x.shape
            cols = F.unfold(x.reshape(n * c, 1, h, w), module.kernel_size, dilation=module.dilation,
                            padding=pad, stride=module.stride)
        else:
            cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=pad,
                            stride=module.stride)
        r = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if module.bias is not None:
        r = torch.cat([r, torch.ones(r.shape[0], 1, dtype=r.dtype)], dim=1)
    return r


def grad_rows_of(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return g.reshape(-1, g.shape[-1])
    return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])


def grad_mat_of(module: nn.Module, weight=None, bias=None) -> torch.Tensor:
    gw = module.weight.grad if weight is None else weight
    gw = gw.reshape(gw.shape[0], -1)
    if module.bias is None:
        return gw.clone()
    gb = module.bias.grad if bias is None else bias
    return torch.cat([gw, gb[:, None]], dim=1)


def mac_dense(mean: torch.Tensor, damping: float) -> torch.Tensor:
    """Dense P = I − ââᵀ/(λ + âᵀâ) of the published code."""
    a = mean.to(torch.float64)
    return torch.eye(a.shape[0], dtype=torch.float64) - torch.outer(a, a) / (damping + a @ a)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_close(a, b, rtol=1e-10, atol=1e-12, what=""):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{what} param {i}: {m}")
