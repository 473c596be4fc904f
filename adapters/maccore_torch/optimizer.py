"""``torch.optim.Optimizer`` front end: one preconditioner + the momentum / weight-decay update.

:class:`CurvatureOptimizer` owns a :class:`maccore_torch.HookedPreconditioner`; ``step()`` lets
it precondition ``.grad`` (skipping the whole step when it reports non-finite values) and then
applies the update of docs/math.md with ``torch._foreach_*`` ops, per param group.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping

import torch
from torch import nn

__all__ = ["CurvatureOptimizer"]

_WD_MODES = ("coupled", "decoupled")


class CurvatureOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` = a :class:`maccore_torch.HookedPreconditioner` + momentum and weight decay.

    Per parameter (preconditioned or not), with ĝ its (preconditioned) gradient, per param group:
    ``"coupled"`` (docs/math.md CIFAR): d = ĝ + wd·p, b = μb + d, p ← p − ηb;
    ``"decoupled"``: b = μb + ĝ, p ← (1 − η·wd)p − ηb;
    ``nesterov=True`` (nanoGPT ``nag_step``): first step b = ĝ', d = ĝ'; later b = μb + ĝ',
    d = ĝ' + μb, then the weight-decay rule above (ĝ' = ĝ + wd·p when coupled).
    """

    def __init__(self, model: nn.Module, params: Any, defaults: dict,
                 make_preconditioner: Callable[..., Any]):
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self._check_group(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        flat = [p for g in self.param_groups for p in g["params"]]
        self.preconditioner = make_preconditioner(params=flat)

    @staticmethod
    def _check_group(group: Mapping) -> None:
        for key in ("lr", "momentum", "weight_decay"):
            v = group.get(key, 0.0)
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = float(v)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{key} must be a number, got {type(v).__name__} {v!r}")
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{key} must be >= 0 and finite, got {group[key]!r}")
        if not isinstance(group.get("nesterov", False), bool):
            raise TypeError(f"nesterov must be True or False, got {group['nesterov']!r}")
        if group.get("weight_decay_mode", "coupled") not in _WD_MODES:
            raise ValueError(f"weight_decay_mode must be one of {_WD_MODES}, got {group['weight_decay_mode']!r}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "preconditioner"):
            self._check_group(self.param_groups[-1])

    @property
    def t(self) -> int:
        """Number of completed (not skipped) optimizer steps."""
        return self.preconditioner.t

    @property
    def count(self) -> int:
        """The step counter under its name in the core and in ``maccore_jax`` (= :attr:`t`)."""
        return self.preconditioner.t

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"]]
        if not self.preconditioner.step(check=params):
            return loss
        for group in self.param_groups:
            self._update_group(group)
        return loss

    def _update_group(self, group: dict) -> None:
        """The momentum / weight-decay update of one param group with ``torch._foreach_*`` ops
        (a constant number of kernel launches per group, not per parameter)."""
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        coupled = group["weight_decay_mode"] == "coupled"
        ps = [p for p in group["params"] if p.grad is not None]
        if not ps:
            return
        gs = [p.grad for p in ps]
        if coupled and wd != 0:
            gs = list(torch._foreach_add(gs, ps, alpha=wd))
        bufs, new, old_b, old_g = [], [], [], []
        for p, g in zip(ps, gs):
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.detach().clone()
                new.append(len(bufs))
            else:
                old_b.append(buf)
                old_g.append(g)
            bufs.append(buf)
        if old_b:
            torch._foreach_mul_(old_b, mu)
            torch._foreach_add_(old_b, old_g)
        if group["nesterov"]:
            ds = list(torch._foreach_add(gs, bufs, alpha=mu))
            for i in new:  # first step: d = ĝ'
                ds[i] = gs[i]
        else:
            ds = bufs
        if not coupled and wd != 0:
            torch._foreach_mul_(ps, 1.0 - lr * wd)
        torch._foreach_add_(ps, ds, alpha=-lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.preconditioner.reset_gradient_statistics()

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["maccore"] = self.preconditioner.state_dict()
        return sd

    def load_state_dict(self, state_dict: Mapping) -> None:
        sd = dict(state_dict)
        pre = sd.pop("maccore", None)
        super().load_state_dict(sd)
        if pre is not None:
            self.preconditioner.load_state_dict(pre)

    def report(self) -> str:
        """Which parameter gets which preconditioner (unpreconditioned ones get momentum SGD)."""
        return self.preconditioner.report([p for g in self.param_groups for p in g["params"]])
