"""MAC / SMAC for PyTorch: :class:`MACPreconditioner` (rewrites ``.grad``) and :class:`MAC`
(a ``torch.optim.Optimizer``), reproducing docs/math.md by driving
:func:`maccore.engine.mac_method`.

Per layer the engine takes the batch mean activation ā from the captured input (Linear: mean of
the rows, bias entry 1 last; Conv2d: :func:`maccore.conv2d_mean_patch`, no im2col materialised),
the step folds it into the EMA (one update per collecting step), refreshes â every ``t_inv``
steps and applies ``Ĝ − (Ĝâ)âᵀ/(λ + âᵀâ)`` (``scale="reference"``) in rank-1 form, in place on
``.grad`` (:func:`maccore.engine.apply_split`).

Fused qkv layers (declared ``attention={"blocks.0.attn.qkv": QKV(num_heads=H)}``, or any
``nn.MultiheadAttention``): the Q and K row blocks use ā, the V rows the attention-weighted mean
(:func:`maccore.attention_weighted_mean`; ``mode="reference"``: one head-averaged, batch-factorised
v̄; ``"per_head"``: the exact mean of each head applied to its d_h rows; ``"off"``: ā everywhere).
For cross-attention (query is not key/value) the Q, K and V blocks use the plain means of their own
inputs (no attention weighting).

Separate q/k/v projections (Hugging Face Llama, BERT, ViT; declared
``attention={"model.layers.0.self_attn": AttentionModule(value="v_proj")}`` or
``attention="auto"``): q and k keep ā, the value projection gets the attention-weighted mean of
the probabilities the attention module itself returns (``"per_head"``: one factor per value head;
grouped-query attention: the mean over the head's query group). GPT-2's fused ``c_attn`` can take
the model's own probabilities the same way (``AttentionModule(qkv="c_attn")``).

SMAC (``diagonal=True``) adds the left factor diag(1/(ẑ+λ)) with ẑ the EMA of E_rows[g⊙g] of the
output gradients (not for fused qkv / MHA in-projections, as the published code; value projections
of separate q/k/v keep it).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Iterable, Mapping

from torch import nn

import maccore
from maccore.engine import first_layer_inverse, mac_method, with_first_layer

from maccore_torch import distributed
from maccore_torch._base import HookedPreconditioner
from maccore_torch.attention import implementation_error
from maccore_torch.hooks import layer_inputs
from maccore_torch.numerics import stats_mode
from maccore_torch.optimizer import CurvatureOptimizer
from maccore_torch.specs import Layer

__all__ = ["MAC", "MACPreconditioner"]


class MACPreconditioner(HookedPreconditioner):
    """MAC (``diagonal=False``) or SMAC (``diagonal=True``) preconditioner for any torch optimizer.

    Call ``step()`` after ``backward()`` (and after ``scaler.unscale_(opt)`` under AMP) and before
    ``opt.step()``; it rewrites ``.grad`` of the supported layers (``p.grad = ...``). On a step with
    NaN/Inf values it returns ``False`` and sets ``.grad`` of the model's parameters to ``None``,
    so the following ``opt.step()`` changes nothing (docs/numerics.md).

    Args:
        model: the module whose ``nn.Linear`` / ``nn.Conv2d`` / ``nn.MultiheadAttention`` (and
            declared fused qkv) layers are preconditioned (found by type).
        stat_decay: EMA decay β. damping: λ. t_cov / t_inv: statistics / refresh periods.
        scale: ``"reference"`` (published code, λ·(ââᵀ+λI)⁻¹) or ``"inverse"`` ((ââᵀ+λI)⁻¹).
        attention: ``{module name: maccore.QkvSpec}`` for fused qkv Linear layers (layout (3, H, d_h)
            along the output; probabilities recomputed) and optional modes for
            ``nn.MultiheadAttention`` modules; ``{attention module name: AttentionModule(...)}``
            for attention modules returning their probabilities (separate q/k/v projections or a
            fused qkv); ``"auto"``: the Hugging Face attention modules
            (:func:`maccore_torch.find_attention`; build the model with
            ``attn_implementation="eager"``).
        params: the parameters being optimised (default: all trainable ones); layers outside are
            left alone.
        diagonal: SMAC's diagonal output factor.
        skip_layers: module names to leave unpreconditioned.
        grad_scaler: the ``torch.amp.GradScaler`` in use (SMAC divides its gradient statistics by
            the squared scale).
        on_nonfinite: ``"skip"`` (warn, skip), ``"raise"`` or ``None`` (no check, no sync). A
            step is skipped — exactly, ``.grad`` set to ``None`` — when a gradient, statistic,
            refreshed preconditioner or the update is not finite (docs/numerics.md).
        warn_after: after this many consecutive skipped steps, warn once that training is stuck
            (``None``: never). reset_after: after this many consecutive skipped steps,
            re-initialise the state (and the optimizer's momenta) of the layers whose
            preconditioner or update was not finite (``None``, the default: never).
        process_group: for the statistics all-reduce (default: the world). Under data
            parallelism (DDP, FSDP2: each rank's loss the mean over its rows, gradients averaged
            over the group) SMAC divides its output-gradient rows by the group's size, so that
            its statistic E_rows[g⊙g] is that of one process on the concatenated batch.
    """

    method = "MAC"

    def __init__(
        self,
        model: nn.Module,
        *,
        stat_decay: float = 0.95,
        damping: float = 1.0,
        t_cov: int = 5,
        t_inv: int = 50,
        scale: str = "reference",
        attention: Mapping[str, maccore.QkvSpec] | None = None,
        params: Iterable[Any] | None = None,
        diagonal: bool = False,
        skip_layers: Iterable[str] | None = None,
        grad_scaler: Any = None,
        on_nonfinite: str | None = "skip",
        process_group: Any = None,
        strict: bool = False,
        warn_after: int | None = 10,
        reset_after: int | None = None,
    ):
        self.stat_decay, self.damping, self.scale, self.diagonal = stat_decay, damping, scale, diagonal
        if diagonal:
            self.method = "SMAC"
        super().__init__(model, mac_method(stat_decay=stat_decay, damping=damping, scale=scale,
                                           diagonal=diagonal),
                         t_cov=t_cov, t_inv=t_inv, params=params, attention=attention,
                         skip_layers=skip_layers, grad_scaler=grad_scaler, on_nonfinite=on_nonfinite,
                         process_group=process_group, strict=strict,
                         warn_after=warn_after, reset_after=reset_after)
        if attention == "auto" and not any(l.attention is not None or l.role == "mha"
                                           for l in self.layers):
            warnings.warn(f"{self.method}: attention='auto' found no attention module (Hugging "
                          "Face *Attention modules with q/k/v or c_attn projections); every "
                          "projection gets the plain mean activation", UserWarning, stacklevel=2)
        for layer in self.layers:  # sdpa / flash attention returns no probabilities: say so now
            if layer.attention is not None and self.curvature.wants_attention(layer.spec):
                why = implementation_error(layer.attention)
                if why is not None:
                    self.remove_hooks()
                    raise ValueError(f"{self.method}: {why}")

    def _describe(self, layer: Layer) -> str:
        smac = " + SMAC diagonal" if self.curvature.wants_grads(layer.spec) else ""
        if layer.first_inv is not None:
            return f"first-layer inverse (A+λI)^-1{smac}"
        qkv = layer.spec.qkv
        src = "" if layer.attention is None else f", probabilities of {layer.attention.name}"
        if qkv is not None and qkv.layout == "v":
            kv = f", H_kv={qkv.kv_heads}" if qkv.kv_heads != qkv.num_heads else ""
            what = "attention-weighted V" if qkv.mode != "off" else "value projection"
            return f"MAC {what} (V: {qkv.mode}, H={qkv.num_heads}{kv}{src}){smac}"
        if qkv is not None:
            return f"MAC fused qkv (V: {qkv.mode}, H={qkv.num_heads}{src})"
        return f"MAC rank-1 ({layer.spec.kind.value}){smac}"

    def fit_first_layer(self, batches: Iterable[Any], *, layer: str | None = None) -> str:
        """Fix the first layer's preconditioner to the full damped inverse ``(A + λI)⁻¹``.

        ``A`` is the mean over ``batches`` of the per-batch second moments E_rows[x̃x̃ᵀ] of the
        layer's input (docs/math.md). ``batches`` yields model inputs or ``(input, target, ...)``
        tuples; the model runs under ``no_grad`` only up to the layer. ``layer``: its name (default:
        the first supported Linear/Conv2d layer). The inverse is kept in the layer's state
        (``MacState.first_inv``) and never refreshed; the layer's forward hook is removed (kept for
        SMAC's gradient diagonal). Under ``torch.distributed`` the per-batch moments of all ranks
        are averaged. Returns the layer name.
        """
        plain = [l for l in self.layers if l.role in ("linear", "conv2d")]
        if layer is None:
            if not plain:
                raise ValueError("fit_first_layer: the model has no Linear/Conv2d layer")
            target = plain[0]
        else:
            matches = [l for l in plain if layer in l.name.split("+")]
            if not matches:
                raise ValueError(f"fit_first_layer: no Linear/Conv2d layer named {layer!r}; "
                                 f"known: {[l.name for l in plain]}")
            target = matches[0]
        module = target.modules[0]
        spec = target.specs[id(module)]
        total, count = None, 0
        inputs = layer_inputs(self.model, module, batches, device=target.weight.device, name=target.name)
        with contextlib.closing(inputs):
            for x in inputs:
                with stats_mode(x):
                    a = maccore.input_factor(maccore.to_rows(spec, x))
                total = a if total is None else total + a
                count += 1
        if count == 0:
            raise ValueError("fit_first_layer: 'batches' is empty")
        moment = total / count
        if distributed.is_distributed(self.process_group):
            (moment, _), = distributed.weighted_mean([(moment, float(count), moment)], self.process_group)
        inverse = first_layer_inverse(moment, self.damping, name=target.name)
        target.state = with_first_layer(target.state, inverse)
        self._on_first_layer_fixed(target)
        return target.name


class MAC(CurvatureOptimizer):
    """MAC as a ``torch.optim.Optimizer`` (docs/math.md; defaults of the published code).

    Preconditioned layers get ĝ = MAC(∇); every parameter in the param groups then gets the
    momentum update of :class:`maccore_torch._base.CurvatureOptimizer` (``weight_decay_mode``
    ``"coupled"``: d = ĝ + wd·p, b = μb + d, p −= ηb; ``"decoupled"``: b = μb + ĝ,
    p = (1 − η·wd)p − ηb; ``nesterov``: nanoGPT's ``nag_step``). ``lr``, ``momentum``,
    ``weight_decay``, ``nesterov`` and ``weight_decay_mode`` are per param group; the curvature
    hyper-parameters are optimizer-wide. See :class:`MACPreconditioner` for the others.
    ``opt.fit_first_layer(batches)`` fixes the first layer's full damped inverse.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 0.1,
        momentum: float = 0.9,
        stat_decay: float = 0.95,
        damping: float = 1.0,
        weight_decay: float = 5e-4,
        t_cov: int = 5,
        t_inv: int = 50,
        nesterov: bool = False,
        weight_decay_mode: str = "coupled",
        scale: str = "reference",
        attention: Mapping[str, maccore.QkvSpec] | None = None,
        params: Iterable[Any] | None = None,
        diagonal: bool = False,
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
            MACPreconditioner, model, stat_decay=stat_decay, damping=damping, t_cov=t_cov, t_inv=t_inv,
            scale=scale, attention=attention, diagonal=diagonal, skip_layers=skip_layers,
            grad_scaler=grad_scaler, on_nonfinite=on_nonfinite, process_group=process_group, strict=strict,
            warn_after=warn_after, reset_after=reset_after,
        )
        super().__init__(model, params, defaults, make)

    def fit_first_layer(self, batches: Iterable[Any], *, layer: str | None = None) -> str:
        """See :meth:`MACPreconditioner.fit_first_layer`."""
        return self.preconditioner.fit_first_layer(batches, layer=layer)
