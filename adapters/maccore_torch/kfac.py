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

Update-size control (docs/kfac.md): with ``kl_clip=κ`` every preconditioned gradient of the step is
scaled by the one factor ν = min(1, sqrt(κ / Σ_layers η²⟨P, G⟩)) of
:func:`maccore.kl_clip_scale` (kfac-pytorch's KL clipping; η the layer's learning rate). The
adapter only gathers P and G; the formula is the core's. ``KFAC`` clips by default
(``kl_clip=1e-3``, η from the layer's param group); ``KFACPreconditioner`` does not know the
step size of the optimizer that follows it and clips only when given ``kl_clip`` and ``lr``.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Iterable

import torch
from torch import nn

import maccore
from maccore.engine import kfac_method
from maccore.kfac import kl_clip_factor, kl_clip_inner

from maccore_torch._base import HookedPreconditioner
from maccore_torch.optimizer import CurvatureOptimizer
from maccore_torch.specs import Layer

__all__ = ["KFAC", "KFACPreconditioner"]

DEFAULT_DAMPING = 0.1  # docs/kfac.md: 1e-3 diverges on every zoo model without kl_clip, on BERT and ViT with it
DEFAULT_KL_CLIP = 1e-3


def _check_kl_clip(kl_clip: Any) -> Any:
    """κ is validated up front by the core function itself (a positive finite number)."""
    if kl_clip is not None:
        z = torch.zeros(1)
        maccore.kl_clip_scale(z, z, kl_clip=kl_clip)
    return kl_clip


def _check_lr(lr: Any) -> Any:
    if lr is None or callable(lr):
        return lr
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (lr >= 0 and lr < float("inf")):
        raise ValueError(f"KFACPreconditioner: lr must be None, a number >= 0 or a callable of the "
                         f"step count, got {lr!r}")
    return float(lr)


class KFACPreconditioner(HookedPreconditioner):
    """Exact KFAC preconditioner rewriting ``.grad`` (use before any torch optimizer).

    Args:
        model: the module whose Linear/Conv2d layers are preconditioned (found by type).
        stat_decay: EMA decay of A and G. damping: λ (a ``(λ_G, λ_A)`` pair in tikhonov mode).
        t_cov / t_inv: statistics / inversion periods.
        kfac_approx: ``"expand"`` or ``"reduce"``. damping_mode: ``"tikhonov"``, ``"pi"``,
            ``"exact"`` (docs/math.md).
        loss_average / reduction_factor: the loss reduction (module docstring).
        kl_clip: κ of the KL clipping (module docstring); ``None`` (default here) disables it.
            Needs ``lr``.
        lr: the learning rate η of the optimizer that applies the preconditioned gradients (a
            number, or a callable of the step count :attr:`t`); only read by ``kl_clip``.
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
        damping: Any = DEFAULT_DAMPING,
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
        kl_clip: float | None = None,
        lr: float | Callable[[int], float] | None = None,
    ):
        self.kl_clip = _check_kl_clip(kl_clip)
        self.lr = _check_lr(lr)
        if self.kl_clip is not None and self.lr is None:
            raise ValueError("KFACPreconditioner: kl_clip needs the learning rate lr of the "
                             "optimizer that applies the preconditioned gradients")
        self.last_kl_scale: torch.Tensor | None = None  # ν of the last step (kl_clip)
        self._kl_terms: list | None = None
        self._kl_lrs: dict | None = None
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

    def _hyperparameters(self) -> dict:
        return {**super()._hyperparameters(), "kl_clip": self.kl_clip}

    # ------------------------------------------------------------------ KL clipping
    def _layer_lr(self, layer: Layer) -> float:
        """η of ``layer`` for the KL clipping (:class:`KFAC` reads the layer's param group)."""
        return float(self.lr(self.t)) if callable(self.lr) else self.lr

    def _precondition(self, layer: Layer, state: Any = None) -> None:
        terms = self._kl_terms
        if terms is None or layer.weight.grad is None:  # (no weight gradient: not preconditioned)
            super()._precondition(layer, state)
            return
        params = [p for p in (layer.weight, layer.bias) if p is not None and p.grad is not None]
        raw = [p.grad.detach().clone() for p in params]
        super()._precondition(layer, state)
        new = [p.grad for p in params]
        terms.append((params, kl_clip_inner(new, raw, lr=self._layer_lr(layer))))

    def _prepare(self, check: Iterable[torch.Tensor] | None, measure: bool = False):
        """The base step, and with ``kl_clip`` the preconditioned gradients of every layer scaled
        by the one factor ν of :func:`maccore.kfac.kl_clip_factor` (a device tensor, no sync)."""
        self.last_kl_scale = None
        if self.kl_clip is None:
            return super()._prepare(check, measure)
        self._kl_lrs = None
        self._kl_terms = []
        try:
            pending = super()._prepare(check, measure)
            terms = self._kl_terms
        finally:
            self._kl_terms = None
        if pending is not None and terms:
            nu = kl_clip_factor([t for _, t in terms], kl_clip=self.kl_clip)
            seen = set()
            for params, _ in terms:
                for p in params:
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                    if p.grad.requires_grad or p.grad.is_sparse:
                        p.grad = p.grad * nu.to(p.grad.dtype)
                    else:
                        p.grad.mul_(nu.to(p.grad.dtype))
            self.last_kl_scale = nu
        return pending

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer name: (A, G)}``: the debiased running factors (canonical split)."""
        return {l.name: (maccore.ema_debiased(l.state.a, decay=self.stat_decay),
                         maccore.ema_debiased(l.state.g, decay=self.stat_decay)) for l in self.layers}


class KFAC(CurvatureOptimizer):
    """Exact KFAC + momentum SGD as a ``torch.optim.Optimizer``.

    Same update rule as :class:`maccore_torch.MAC` (per-group ``lr``, ``momentum``,
    ``weight_decay``, ``nesterov``, ``weight_decay_mode``); curvature options as
    :class:`KFACPreconditioner`. ``kl_clip`` (default ``1e-3``, ``None`` disables) clips the
    preconditioned gradients with η = the current ``lr`` of each layer's param group (LR
    schedulers included), before momentum and weight decay (docs/kfac.md).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 0.01,
        momentum: float = 0.9,
        stat_decay: float = 0.95,
        damping: Any = DEFAULT_DAMPING,
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
        kl_clip: float | None = DEFAULT_KL_CLIP,
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        weight_decay_mode=weight_decay_mode)
        make = functools.partial(
            KFACPreconditioner, model, stat_decay=stat_decay, damping=damping, t_cov=t_cov, t_inv=t_inv,
            kfac_approx=kfac_approx, damping_mode=damping_mode, loss_average=loss_average,
            reduction_factor=reduction_factor, skip_layers=skip_layers, grad_scaler=grad_scaler,
            on_nonfinite=on_nonfinite, process_group=process_group, strict=strict,
            warn_after=warn_after, reset_after=reset_after, kl_clip=kl_clip,
            lr=None if kl_clip is None else (lambda t: float(self.defaults["lr"])),  # see _layer_lr
        )
        super().__init__(model, params, defaults, make)
        self.preconditioner._layer_lr = self._layer_lr

    def _layer_lr(self, layer: Layer) -> float:
        """The current ``lr`` of the param group holding the layer's weight (read once per step)."""
        pre = self.preconditioner
        if pre._kl_lrs is None:
            pre._kl_lrs = {id(p): g["lr"] for g in self.param_groups for p in g["params"]}
        return float(pre._kl_lrs.get(id(layer.weight), self.defaults["lr"]))

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """See :meth:`KFACPreconditioner.factors`."""
        return self.preconditioner.factors()
