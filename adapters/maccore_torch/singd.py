"""SINGD / IKFAC for PyTorch driving :func:`maccore.engine.singd_method` (docs/math.md).

Arguments and their meaning follow the published ``singd`` package (``SINGD(model, lr=…, momentum=…,
damping=…, alpha1=…, weight_decay=…, T=…, loss_average=…, lr_cov=…, structures=…, kfac_approx=…,
kfac_like=…, preconditioner_dtype=…, init_grad_scale=…, normalize_lr_cov=…)``); the formulas live
in the core (the engine's statistics are :func:`maccore.singd.singd_input_statistics` /
:func:`maccore.singd.singd_grad_statistics`); this module only validates the arguments and evaluates
the ``lr_cov`` schedule.

Per collecting step (``t % T == 0``, ``t`` = completed optimizer steps):

- forward hooks turn each layer input into canonical rows ``x̃`` (bias 1 last; ``kfac_approx``
  ``"expand"``: one row per token/location, ``"reduce"``: the mean over the shared axes), scale them
  by ``1/√R`` (``R`` rows, so ``aᵀa = A``) and keep ``H_K = Π_K(Kᵀ A K)`` — computed as
  ``K.from_inner(aᵀ)`` without forming ``A``;
- tensor hooks on the layer outputs take the autograd output-gradient rows ``g`` and keep
  ``Π_C(Cᵀ g gᵀ C)``; at ``step()`` it is scaled by ``1/R_loss`` so that it equals
  ``H_C = Π_C(Cᵀ G C)`` with the canonical ``G = (1/R_loss) Σ g gᵀ``, where ``loss_average="batch"``
  (default) means ``R_loss = 1/N`` (``N`` samples seen by the layer in the step),
  ``"batch+sequence"`` ``1/(N·S)`` (Conv2d: ``1/(N·OH·OW)``), ``None`` a summed loss (``R = 1``);
  ``reduction_factor=`` overrides all of them;
- ``step()`` calls the core ``update`` (momenta ``m_K``, ``m_C`` and factors ``K``, ``C``; docs/math.md
  §5.2) with ``lr_cov`` (a float, or a callable of the step count ``t``), then every step replaces the
  gradient by ``C Cᵀ ∇W̃ K Kᵀ``; :class:`SINGD` adds ``γ W`` (weight decay AFTER preconditioning),
  ``b ← α2 b + d`` and ``W ← W − β2 b`` (docs/math.md).

Gradient accumulation: all forwards/backwards of a collecting step are pooled as one batch (row-
weighted mean of ``H_K``; ``H_C`` summed and scaled by the total number of loss terms), so the usual
``(loss / n_micro).backward()`` accumulation equals one big batch, as for :class:`maccore_torch.KFAC`.

Precision: ``preconditioner_dtype=(dtype_K, dtype_C)`` keeps ``K``, ``m_K``, ``H_K`` and the input rows
in ``dtype_K`` and ``C``, ``m_C``, ``H_C`` and the gradient rows in ``dtype_C`` (``None``: the parameter
dtype); ``torch.bfloat16`` is supported (only products, sums and traces are used). With a
``GradScaler`` (``grad_scaler=``) the output-gradient rows are divided by the scale of their own
backward pass, so ``H_C`` is exact and no correction factor is needed (``init_grad_scale`` is accepted
for compatibility and recorded only).

Only ``nn.Linear`` and ``nn.Conv2d`` weights (and the out-projection of ``nn.MultiheadAttention``) are
preconditioned; any other parameter handed to :class:`SINGD` gets the same momentum / weight-decay
update with its raw gradient (``opt.report()`` lists them; ``warn_unsupported`` warns once).
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

import maccore
from maccore.engine import singd_method

from maccore_torch._base import HookedPreconditioner
from maccore_torch.optimizer import CurvatureOptimizer
from maccore_torch.specs import Layer

__all__ = ["SINGD", "SINGDPreconditioner"]


class SINGDPreconditioner(HookedPreconditioner):
    """The SINGD preconditioner alone: rewrites ``.grad`` of every Linear/Conv2d layer with
    ``C Cᵀ ∇W̃ K Kᵀ`` (use with any torch optimizer, or through :class:`SINGD`).

    Args:
        model: the module whose Linear/Conv2d layers are preconditioned (found by type).
        damping: λ. alpha1: Riemannian momentum α1 ∈ [0, 1) (0 with ``kfac_like``).
        T: update period of the preconditioner (statistics are only captured on those steps).
        lr_cov: β1, a float or a callable ``t -> float`` of the completed-step count.
        structures: ``(structure_K, structure_C)`` names (``"dense"``, ``"diagonal"``,
            ``"block30diagonal"``, ``"hierarchical15_15"``, ``"triltoeplitz"``, ``"triutoeplitz"``,
            … see :func:`maccore.structures.get`).
        kfac_like: the IKFAC update. kfac_approx: ``"expand"`` or ``"reduce"``.
        loss_average / reduction_factor: the loss reduction (module docstring).
        preconditioner_dtype: ``(dtype_K, dtype_C)``; ``None`` = the parameter dtype.
        init_grad_scale: accepted for compatibility with ``singd`` (not needed, see module docstring).
        normalize_lr_cov: ``s = ½(1 − α1)`` and β1 divided by ``max(1, max|m|)``.
        params, skip_layers, grad_scaler, on_nonfinite, process_group, warn_after, reset_after: as
            :class:`maccore_torch.KFACPreconditioner`.
    """

    method = "SINGD"
    roles = frozenset({"linear", "conv2d", "qkv", "mha_out"})

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: float = 1e-3,
        alpha1: float = 0.5,
        T: int = 10,
        lr_cov: float | Callable[[int], float] = 1e-2,
        structures: tuple[Any, Any] = ("dense", "dense"),
        kfac_like: bool = False,
        kfac_approx: str = "expand",
        loss_average: str | None = "batch",
        reduction_factor: float | None = None,
        preconditioner_dtype: tuple[Any, Any] = (None, None),
        init_grad_scale: float = 1.0,
        normalize_lr_cov: bool = False,
        params: Iterable[Any] | None = None,
        skip_layers: Iterable[str] | None = None,
        grad_scaler: Any = None,
        on_nonfinite: str | None = "skip",
        process_group: Any = None,
        strict: bool = False,
        warn_after: int | None = 10,
        reset_after: int | None = None,
    ):
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive integer, got {T!r}")
        if not callable(lr_cov):
            if isinstance(lr_cov, bool) or not isinstance(lr_cov, numbers.Real) or not (
                math.isfinite(lr_cov) and lr_cov >= 0
            ):
                raise ValueError(f"lr_cov must be a float >= 0 or a callable step -> float, got {lr_cov!r}")
        if isinstance(init_grad_scale, bool) or not isinstance(init_grad_scale, numbers.Real) or not (
            math.isfinite(init_grad_scale) and init_grad_scale > 0
        ):
            raise ValueError(f"init_grad_scale must be a positive number, got {init_grad_scale!r}")
        if not isinstance(kfac_like, bool) or not isinstance(normalize_lr_cov, bool):
            raise TypeError("kfac_like and normalize_lr_cov must be True or False")
        with warnings.catch_warnings(record=True) as caught:  # re-issue at the user's call site
            warnings.simplefilter("always")
            curvature = singd_method(
                damping=damping, alpha1=alpha1, lr_cov=lr_cov, structures=structures,
                kfac_like=kfac_like, kfac_approx=kfac_approx, loss_average=loss_average,
                reduction_factor=reduction_factor, preconditioner_dtype=preconditioner_dtype,
                normalize_lr_cov=normalize_lr_cov,
            )
        for w in caught:
            warnings.warn(str(w.message).replace("singd:", "SINGD:"), w.category, stacklevel=3)
        self.damping, self.T, self.lr_cov = damping, T, lr_cov
        self.structures = tuple(structures) if isinstance(structures, (tuple, list)) else structures
        self.kfac_like, self.normalize_lr_cov = kfac_like, normalize_lr_cov
        self.kfac_approx = maccore.KFACType(kfac_approx)
        self.loss_average, self.reduction_factor = loss_average, reduction_factor
        self.preconditioner_dtype = preconditioner_dtype
        self.init_grad_scale = float(init_grad_scale)
        self.alpha1 = 0.0 if kfac_like else float(alpha1)
        super().__init__(model, curvature, t_cov=T, t_inv=T, params=params, skip_layers=skip_layers,
                         grad_scaler=grad_scaler, on_nonfinite=on_nonfinite, process_group=process_group, strict=strict,
                         warn_after=warn_after, reset_after=reset_after)

    def current_lr_cov(self) -> float:
        """β1 at the current step (``lr_cov(t)`` for a schedule)."""
        return float(self.lr_cov(self.t)) if callable(self.lr_cov) else float(self.lr_cov)

    def _update_kwargs(self) -> dict:
        return {"lr_cov": self.current_lr_cov()}

    def _describe(self, layer: Layer) -> str:
        st = layer.state
        variant = "IKFAC" if self.kfac_like else "SINGD"
        return (f"{variant} {self.kfac_approx.value} (K: {type(st.K).__name__} {st.K.dtype}, "
                f"C: {type(st.C).__name__} {st.C.dtype})").replace("torch.", "")

    def _hyperparameters(self) -> dict:
        lr_cov = self.lr_cov if not callable(self.lr_cov) else repr(self.lr_cov)
        return {"t_cov": self.t_cov, "t_inv": self.t_inv, "T": self.T, "damping": self.damping,
                "alpha1": self.alpha1, "lr_cov": lr_cov, "structures": [str(s) for s in self.structures],
                "kfac_like": self.kfac_like, "kfac_approx": self.kfac_approx.value,
                "loss_average": self.loss_average, "reduction_factor": self.reduction_factor,
                "preconditioner_dtype": [str(d) for d in self.preconditioner_dtype],
                "init_grad_scale": self.init_grad_scale, "normalize_lr_cov": self.normalize_lr_cov}

    def factors(self) -> dict[str, tuple[Any, Any]]:
        """``{layer name: (K, C)}``: the structured factors (``apply`` = ``C Cᵀ ∇W̃ K Kᵀ``)."""
        return {l.name: (l.state.K, l.state.C) for l in self.layers}


class SINGD(CurvatureOptimizer):
    """SINGD (docs/math.md) as a ``torch.optim.Optimizer`` with the ``singd`` package's arguments.

    Update per parameter: ``d = ĝ + weight_decay·W`` (ĝ the preconditioned gradient; weight decay
    AFTER preconditioning), ``b ← momentum·b + d`` (b₀ = 0), ``W ← W − lr·b``. ``lr``, ``momentum``
    and ``weight_decay`` may differ per param group; the curvature options are global (see
    :class:`SINGDPreconditioner`). ``warn_unsupported``: warn when parameters outside
    Linear/Conv2d layers are handed to the optimizer (they get the update with the raw gradient).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        params: Iterable[Any] | None = None,
        lr: float = 1e-3,
        momentum: float = 0.9,
        damping: float = 1e-3,
        alpha1: float = 0.5,
        weight_decay: float = 0.0,
        T: int = 10,
        loss_average: str | None = "batch",
        lr_cov: float | Callable[[int], float] = 1e-2,
        structures: tuple[Any, Any] = ("dense", "dense"),
        kfac_approx: str = "expand",
        warn_unsupported: bool = True,
        kfac_like: bool = False,
        preconditioner_dtype: tuple[Any, Any] = (None, None),
        init_grad_scale: float = 1.0,
        normalize_lr_cov: bool = False,
        reduction_factor: float | None = None,
        skip_layers: Iterable[str] | None = None,
        grad_scaler: Any = None,
        on_nonfinite: str | None = "skip",
        process_group: Any = None,
        strict: bool = False,
        warn_after: int | None = 10,
        reset_after: int | None = None,
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False,
                        weight_decay_mode="coupled")
        make = functools.partial(
            SINGDPreconditioner, model, damping=damping, alpha1=alpha1, T=T, lr_cov=lr_cov,
            structures=structures, kfac_like=kfac_like, kfac_approx=kfac_approx,
            loss_average=loss_average, reduction_factor=reduction_factor,
            preconditioner_dtype=preconditioner_dtype, init_grad_scale=init_grad_scale,
            normalize_lr_cov=normalize_lr_cov, skip_layers=skip_layers, grad_scaler=grad_scaler,
            on_nonfinite=on_nonfinite, process_group=process_group, strict=strict,
            warn_after=warn_after, reset_after=reset_after,
        )
        super().__init__(model, params, defaults, make)
        if warn_unsupported:
            owned = {id(p) for l in self.preconditioner.layers for p in (l.weight, l.bias) if p is not None}
            other = [p for g in self.param_groups for p in g["params"] if id(p) not in owned]
            if other:
                warnings.warn(
                    f"SINGD: {len(other)} parameter(s) are not in a supported layer (Linear/Conv2d) "
                    "and get momentum SGD with their raw gradient; see opt.report()",
                    UserWarning, stacklevel=2,
                )

    def factors(self) -> dict[str, tuple[Any, Any]]:
        """See :meth:`SINGDPreconditioner.factors`."""
        return self.preconditioner.factors()
