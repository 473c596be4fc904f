"""SINGD / IKFAC for PyTorch via the core :func:`maccore.singd` (MATH.md §5).

Arguments and their meaning follow the published ``singd`` package (``SINGD(model, lr=…, momentum=…,
damping=…, alpha1=…, weight_decay=…, T=…, loss_average=…, lr_cov=…, structures=…, kfac_approx=…,
kfac_like=…, preconditioner_dtype=…, init_grad_scale=…, normalize_lr_cov=…)``); the formulas live
in the core, this module only captures rows and schedules the calls.

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
- ``step()`` calls the core ``update`` (momenta ``m_K``, ``m_C`` and factors ``K``, ``C``; MATH.md
  §5.2) with ``lr_cov`` (a float, or a callable of the step count ``t``), then every step replaces the
  gradient by ``C Cᵀ ∇W̃ K Kᵀ``; :class:`SINGD` adds ``γ W`` (weight decay AFTER preconditioning),
  ``b ← α2 b + d`` and ``W ← W − β2 b`` (MATH.md §5.3).

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

import torch
from torch import nn

import maccore
from maccore.singd import SingdState
from maccore.singd import singd as _core_singd
from maccore_torch._base import (
    XP,
    CurvatureOptimizer,
    HookedPreconditioner,
    _Acc,
    loss_terms,
    unreduce,
)
from maccore_torch.attention import MhaCapture
from maccore_torch.specs import Layer

__all__ = ["SINGD", "SINGDPreconditioner"]

_LOSS_AVERAGE = (None, "batch", "batch+sequence")


def _flat(structure: Any) -> torch.Tensor:
    """The parameters of a structure as one 1-D tensor (pooled / all-reduced like any statistic)."""
    parts = [p.reshape(-1) for p in structure]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _unflat(flat: torch.Tensor, template: Any) -> Any:
    """Inverse of :func:`_flat` with the class and parameter shapes of ``template``."""
    out, offset = [], 0
    for p in template:
        n = p.numel()
        out.append(flat[offset:offset + n].reshape(p.shape))
        offset += n
    return type(template)(*out)


def _to_dtype(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``x · scale`` computed in the wider of ``x.dtype`` and ``dtype``, then cast to ``dtype``."""
    wide = torch.promote_types(x.dtype, dtype)
    y = x.to(wide) * scale
    return y if y.dtype == dtype else y.to(dtype)


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
        params, skip_layers, grad_scaler, on_nonfinite, process_group: as
            :class:`maccore_torch.KFACPreconditioner`.
    """

    method = "SINGD"
    roles = frozenset({"linear", "conv2d", "qkv", "mha_out"})
    grad_keys = ("H_C",)

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
    ):
        self.kfac_approx = maccore.KFACType(kfac_approx)
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive integer, got {T!r}")
        if loss_average not in _LOSS_AVERAGE:
            raise ValueError(f"loss_average must be one of {_LOSS_AVERAGE}, got {loss_average!r}")
        if reduction_factor is not None and not (
            isinstance(reduction_factor, numbers.Real) and not isinstance(reduction_factor, bool)
            and math.isfinite(reduction_factor) and reduction_factor > 0
        ):
            raise ValueError(f"reduction_factor must be a positive number, got {reduction_factor!r}")
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
        self.damping, self.T, self.lr_cov = damping, T, lr_cov
        self.structures = tuple(structures) if isinstance(structures, (tuple, list)) else structures
        self.kfac_like, self.normalize_lr_cov = kfac_like, normalize_lr_cov
        self.loss_average, self.reduction_factor = loss_average, reduction_factor
        self.preconditioner_dtype = preconditioner_dtype
        self.init_grad_scale = float(init_grad_scale)
        with warnings.catch_warnings(record=True) as caught:  # re-issue at the user's call site
            warnings.simplefilter("always")
            self._pc = _core_singd(
                structures=structures, alpha1=alpha1, lr_cov=0.0, damping=damping,
                kfac_like=kfac_like, normalize_lr_cov=normalize_lr_cov,
                preconditioner_dtype=preconditioner_dtype,
            )
        for w in caught:
            warnings.warn(str(w.message).replace("singd:", "SINGD:"), w.category, stacklevel=3)
        self.alpha1 = 0.0 if kfac_like else float(alpha1)
        super().__init__(model, t_cov=T, t_inv=T, params=params, skip_layers=skip_layers,
                         grad_scaler=grad_scaler, on_nonfinite=on_nonfinite, process_group=process_group)

    @property
    def _reduce(self) -> bool:
        return self.kfac_approx is maccore.KFACType.REDUCE

    # ------------------------------------------------------------------ per-layer core calls
    def _init_state(self, layer: Layer) -> SingdState:
        w = layer.weight
        return self._pc.init(layer.spec.d_tilde, layer.spec.d_out, xp=XP, dtype=w.dtype, device=w.device)

    def _templates(self, layer: Layer) -> dict[str, torch.Tensor]:
        return {"H_K": _flat(layer.state.K), "H_C": _flat(layer.state.C)}

    def _input_stats(self, layer: Layer, spec: maccore.LayerSpec, x: torch.Tensor) -> dict:
        K = layer.state.K
        rows = maccore.to_rows(spec, x, reduce=self._reduce)
        n = int(rows.shape[0])
        a = _to_dtype(rows, 1.0 / math.sqrt(n), K.dtype)  # aᵀa = A
        return {"H_K": (_flat(K.from_inner(a.T)), n, "mean")}

    def _forward_stats(self, layer, spec, x, out) -> dict:
        return self._input_stats(layer, spec, x)

    def _mha_stats(self, layer: Layer, cap: MhaCapture) -> dict:
        return self._input_stats(layer, layer.spec, cap.context)  # role "mha_out" only

    def _wants_grads(self, layer: Layer) -> bool:
        return True

    def _backward_scale(self) -> float:
        sc = self.grad_scaler
        if sc is None or not sc.is_enabled():
            return 1.0
        return self._scale_stamp if self._scale_stamp is not None else float(sc.get_scale())

    def _grad_stats(self, layer, spec, g) -> dict:
        C = layer.state.C
        rows = maccore.to_grad_rows(spec, g, reduce=self._reduce)
        terms = loss_terms(spec, g, self.loss_average)
        gr = _to_dtype(rows, 1.0 / self._backward_scale(), C.dtype)  # unscaled by the GradScaler
        return {"H_C": (_flat(C.from_inner(gr.T)), terms, "sum")}

    def _finalize(self, layer: Layer, key: str, acc: _Acc) -> tuple[torch.Tensor, float]:
        if key != "H_C":
            return acc.value, acc.weight
        return unreduce(acc.value, acc.weight, self.reduction_factor, self.loss_average), 1.0

    def current_lr_cov(self) -> float:
        """β1 at the current step (``lr_cov(t)`` for a schedule)."""
        return float(self.lr_cov(self.t)) if callable(self.lr_cov) else float(self.lr_cov)

    def _fold(self, layer: Layer, stats: dict) -> None:
        if "H_K" in stats and "H_C" in stats:
            st = layer.state
            H = (_unflat(stats["H_K"], st.K), _unflat(stats["H_C"], st.C))
            layer.state = self._pc.update(st, statistics=H, lr_cov=self.current_lr_cov())
            layer.updates += 1

    def _refresh(self, layer: Layer) -> None:
        pass  # SINGD keeps no cache

    def _apply(self, layer: Layer, grad_mat: torch.Tensor) -> torch.Tensor:
        return self._pc.apply(layer.state, grad_mat)

    def _describe(self, layer: Layer) -> str:
        st = layer.state
        variant = "IKFAC" if self.kfac_like else "SINGD"
        return (f"{variant} {self.kfac_approx.value} (K: {type(st.K).__name__} {st.K.dtype}, "
                f"C: {type(st.C).__name__} {st.C.dtype})").replace("torch.", "")

    def _hyperparameters(self) -> dict:
        lr_cov = self.lr_cov if not callable(self.lr_cov) else repr(self.lr_cov)
        return {**super()._hyperparameters(), "T": self.T, "damping": self.damping,
                "alpha1": self.alpha1, "lr_cov": lr_cov, "structures": [str(s) for s in self.structures],
                "kfac_like": self.kfac_like, "kfac_approx": self.kfac_approx.value,
                "loss_average": self.loss_average, "reduction_factor": self.reduction_factor,
                "preconditioner_dtype": [str(d) for d in self.preconditioner_dtype],
                "init_grad_scale": self.init_grad_scale, "normalize_lr_cov": self.normalize_lr_cov}

    def factors(self) -> dict[str, tuple[Any, Any]]:
        """``{layer name: (K, C)}``: the structured factors (``apply`` = ``C Cᵀ ∇W̃ K Kᵀ``)."""
        return {l.name: (l.state.K, l.state.C) for l in self.layers}


class SINGD(CurvatureOptimizer):
    """SINGD (MATH.md §5) as a ``torch.optim.Optimizer`` with the ``singd`` package's arguments.

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
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False,
                        weight_decay_mode="coupled")
        make = functools.partial(
            SINGDPreconditioner, model, damping=damping, alpha1=alpha1, T=T, lr_cov=lr_cov,
            structures=structures, kfac_like=kfac_like, kfac_approx=kfac_approx,
            loss_average=loss_average, reduction_factor=reduction_factor,
            preconditioner_dtype=preconditioner_dtype, init_grad_scale=init_grad_scale,
            normalize_lr_cov=normalize_lr_cov, skip_layers=skip_layers, grad_scaler=grad_scaler,
            on_nonfinite=on_nonfinite, process_group=process_group,
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
