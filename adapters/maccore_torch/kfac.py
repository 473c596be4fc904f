"""Exact KFAC for PyTorch driving :func:`maccore.engine.kfac_method` (docs/math.md; canonical
split).

Statistics per collecting step: A = E_rows[x̃x̃ᵀ] from forward hooks (rows pooled over all forwards
of the step) and G = (1/R) Σ_rows gᵃgᵃᵀ from tensor hooks on the layer outputs (autograd gradients
of the loss L = R·Σ terms). The reduction factor R of the loss whose gradient the step applies is:

- ``reduction_factor=R`` when given (R of the total loss of the step, accumulation included);
- else ``loss_average="batch"`` (default; a loss averaged over the samples, e.g.
  ``CrossEntropyLoss()``): R = 1/N with N the number of samples seen by the layer during the step
  (summed over accumulated micro-batches, so the usual ``(loss / n_micro).backward()``
  accumulation equals one big batch); ``"batch+sequence"``: also averaged over the shared axes
  (N·S tokens / N·OH·OW locations); ``None``: a summed loss, R = 1.

Under ``torch.distributed`` (gradients averaged across ranks, as DDP does) A is the row-weighted
mean over ranks and G the mean of the ranks' G, which equals single-process training on the
concatenated batch for equally sized shards. ``kfac_approx="reduce"`` averages inputs and SUMS
output gradients over the shared axes (T17). Damping modes: ``"tikhonov"``, ``"pi"``, ``"exact"``.
The in-projection of ``nn.MultiheadAttention`` has no observable output gradient and is left
unpreconditioned (its out-projection is supported); declared fused qkv layers are plain Linear.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import torch
from torch import nn

import maccore
from maccore.engine import kfac_method

from maccore_torch._base import HookedPreconditioner
from maccore_torch.optimizer import CurvatureOptimizer
from maccore_torch.specs import Layer

__all__ = ["KFAC", "KFACPreconditioner"]


class KFACPreconditioner(HookedPreconditioner):
    """Exact KFAC preconditioner rewriting ``.grad`` (use before any torch optimizer).

    Args:
        model: the module whose Linear/Conv2d layers are preconditioned (found by type).
        stat_decay: EMA decay of A and G. damping: λ (a ``(λ_G, λ_A)`` pair in tikhonov mode).
        t_cov / t_inv: statistics / inversion periods.
        kfac_approx: ``"expand"`` or ``"reduce"``. damping_mode: ``"tikhonov"``, ``"pi"``,
            ``"exact"`` (docs/math.md).
        loss_average / reduction_factor: the loss reduction (module docstring).
        params, skip_layers, grad_scaler, on_nonfinite, process_group, warn_after, reset_after: as
            :class:`maccore_torch.MACPreconditioner` (``grad_scaler``: G is divided by the squared
            scale of the backward pass).
    """

    method = "KFAC"
    roles = frozenset({"linear", "conv2d", "qkv", "mha_out"})

    def __init__(
        self,
        model: nn.Module,
        *,
        stat_decay: float = 0.95,
        damping: Any = 1e-3,
        t_cov: int = 1,
        t_inv: int = 10,
        kfac_approx: str = "expand",
        damping_mode: str = "tikhonov",
        loss_average: str | None = "batch",
        reduction_factor: float | None = None,
        params: Iterable[Any] | None = None,
        skip_layers: Iterable[str] | None = None,
        grad_scaler: Any = None,
        on_nonfinite: str | None = "skip",
        process_group: Any = None,
        strict: bool = False,
        warn_after: int | None = 10,
        reset_after: int | None = None,
    ):
        curvature = kfac_method(stat_decay=stat_decay, damping=damping, damping_mode=damping_mode,
                                kfac_approx=kfac_approx, loss_average=loss_average,
                                reduction_factor=reduction_factor)
        self.stat_decay, self.damping, self.damping_mode = stat_decay, damping, damping_mode
        self.kfac_approx = maccore.KFACType(kfac_approx)
        self.loss_average, self.reduction_factor = loss_average, reduction_factor
        super().__init__(model, curvature, t_cov=t_cov, t_inv=t_inv, params=params,
                         skip_layers=skip_layers, grad_scaler=grad_scaler, on_nonfinite=on_nonfinite,
                         process_group=process_group, strict=strict,
                         warn_after=warn_after, reset_after=reset_after)

    def _describe(self, layer: Layer) -> str:
        return f"KFAC {self.kfac_approx.value} ({self.damping_mode} damping)"

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer name: (A, G)}``: the debiased running factors (canonical split)."""
        return {l.name: (maccore.ema_debiased(l.state.a, decay=self.stat_decay),
                         maccore.ema_debiased(l.state.g, decay=self.stat_decay)) for l in self.layers}


class KFAC(CurvatureOptimizer):
    """Exact KFAC + momentum SGD as a ``torch.optim.Optimizer``.

    Same update rule as :class:`maccore_torch.MAC` (per-group ``lr``, ``momentum``,
    ``weight_decay``, ``nesterov``, ``weight_decay_mode``); curvature options as
    :class:`KFACPreconditioner`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 0.01,
        momentum: float = 0.9,
        stat_decay: float = 0.95,
        damping: Any = 1e-3,
        weight_decay: float = 0.0,
        t_cov: int = 1,
        t_inv: int = 10,
        nesterov: bool = False,
        weight_decay_mode: str = "coupled",
        kfac_approx: str = "expand",
        damping_mode: str = "tikhonov",
        loss_average: str | None = "batch",
        reduction_factor: float | None = None,
        params: Iterable[Any] | None = None,
        skip_layers: Iterable[str] | None = None,
        grad_scaler: Any = None,
        on_nonfinite: str | None = "skip",
        process_group: Any = None,
        strict: bool = False,
        warn_after: int | None = 10,
        reset_after: int | None = None,
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        weight_decay_mode=weight_decay_mode)
        make = functools.partial(
            KFACPreconditioner, model, stat_decay=stat_decay, damping=damping, t_cov=t_cov, t_inv=t_inv,
            kfac_approx=kfac_approx, damping_mode=damping_mode, loss_average=loss_average,
            reduction_factor=reduction_factor, skip_layers=skip_layers, grad_scaler=grad_scaler,
            on_nonfinite=on_nonfinite, process_group=process_group, strict=strict,
            warn_after=warn_after, reset_after=reset_after,
        )
        super().__init__(model, params, defaults, make)

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """See :meth:`KFACPreconditioner.factors`."""
        return self.preconditioner.factors()
