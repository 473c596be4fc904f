"""MAC / SMAC for PyTorch: :class:`MACPreconditioner` (rewrites ``.grad``) and :class:`MAC`
(a ``torch.optim.Optimizer``), reproducing MATH.md §3.2–3.7 with the core :func:`maccore.mac`.

Per layer the forward hook computes the batch mean activation ā (Linear: mean of the rows,
bias entry 1 last; Conv2d: :func:`maccore.conv2d_mean_patch`, no im2col materialised), the step
folds it into the EMA (one update per collecting step), refreshes â every ``t_inv`` steps and
applies ``Ĝ − (Ĝâ)âᵀ/(λ + âᵀâ)`` (``scale="reference"``) in rank-1 form.

Fused qkv layers (declared ``attention={"blocks.0.attn.qkv": QKV(num_heads=H)}``, or any
``nn.MultiheadAttention``): the Q and K row blocks use ā, the V rows the attention-weighted mean
(:func:`maccore.attention_weighted_mean`; ``mode="reference"``: one head-averaged, batch-factorised
v̄; ``"per_head"``: the exact mean of each head applied to its d_h rows; ``"off"``: ā everywhere).
For cross-attention (query is not key/value) the Q, K and V blocks use the plain means of their own
inputs (no attention weighting). SMAC (``diagonal=True``) adds the left factor diag(1/(ẑ+λ)) with
ẑ the EMA of E_rows[g⊙g] of the output gradients (not for qkv / MHA in-projections, as the
published code).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import torch
from torch import nn

import maccore
from maccore import _delegate

from maccore_torch._base import XP, CurvatureOptimizer, HookedPreconditioner, stats_mode
from maccore_torch.attention import MhaCapture, qkv_probs
from maccore_torch.specs import Layer

__all__ = ["MAC", "MACPreconditioner"]


def _num_rows(spec: maccore.LayerSpec, x: torch.Tensor) -> int:
    if spec.kind is maccore.LayerKind.CONV2D:
        cs = spec.conv
        oh, ow = maccore.conv2d_output_size(tuple(x.shape[-2:]), cs.kernel_size, stride=cs.stride,
                                            padding=cs.padding, dilation=cs.dilation)
        n = x.shape[0] * oh * ow
        return n * x.shape[1] if spec.depthwise else n
    return max(1, x.numel() // x.shape[-1])


def row_mean(spec: maccore.LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """ā = E_rows[x̃] of a layer input ``x`` (float32, or float64 for float64 input)."""
    if spec.kind is maccore.LayerKind.CONV2D:
        cs = spec.conv
        return maccore.conv2d_mean_patch(x, cs.kernel_size, stride=cs.stride, padding=cs.padding,
                                         dilation=cs.dilation, bias=spec.has_bias, groups=cs.groups)
    if x.shape[-1] != spec.d_in:
        raise ValueError(f"{spec.name}: input of shape {list(x.shape)} does not have {spec.d_in} features")
    mean = maccore.mean_activation(x.reshape(-1, x.shape[-1]))  # the rows of maccore.linear_rows(x, bias=False)
    return torch.cat([mean, mean.new_ones(1)]) if spec.has_bias else mean


def _stack_qkv(aq: torch.Tensor, ak: torch.Tensor, v: torch.Tensor, qkv: maccore.QkvSpec) -> torch.Tensor:
    """Row-block means of a (3, H, d_h) fused projection: ``[3, d̃]``, or ``[3H, d̃]`` per head."""
    if qkv.mode != "per_head":
        return torch.stack([aq, ak, v])
    h = qkv.num_heads
    vh = v if v.ndim == 2 else v.expand(h, -1)
    return torch.cat([aq.expand(h, -1), ak.expand(h, -1), vh])


class MACPreconditioner(HookedPreconditioner):
    """MAC (``diagonal=False``) or SMAC (``diagonal=True``) preconditioner for any torch optimizer.

    Call ``step()`` after ``backward()`` (and after ``scaler.unscale_(opt)`` under AMP) and before
    ``opt.step()``; it rewrites ``.grad`` of the supported layers (``p.grad = ...``).

    Args:
        model: the module whose ``nn.Linear`` / ``nn.Conv2d`` / ``nn.MultiheadAttention`` (and
            declared fused qkv) layers are preconditioned (found by type).
        stat_decay: EMA decay β. damping: λ. t_cov / t_inv: statistics / refresh periods.
        scale: ``"reference"`` (published code, λ·(ââᵀ+λI)⁻¹) or ``"inverse"`` ((ââᵀ+λI)⁻¹).
        attention: ``{module name: maccore.QkvSpec}`` for fused qkv Linear layers (layout (3, H, d_h)
            along the output) and optional modes for ``nn.MultiheadAttention`` modules.
        params: the parameters being optimised (default: all trainable ones); layers outside are
            left alone.
        diagonal: SMAC's diagonal output factor.
        skip_layers: module names to leave unpreconditioned.
        grad_scaler: the ``torch.amp.GradScaler`` in use (SMAC divides its gradient statistics by
            the squared scale).
        on_nonfinite: ``"skip"`` (warn, skip), ``"raise"`` or ``None`` (no check, no sync).
        process_group: for the statistics all-reduce (default: the world).
    """

    method = "MAC"
    grad_keys = ("diag",)

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
    ):
        self.stat_decay, self.damping, self.scale, self.diagonal = stat_decay, damping, scale, diagonal
        self._pc = maccore.mac(decay=stat_decay, damping=damping, scale=scale)
        self._pc_diag = maccore.mac(decay=stat_decay, damping=damping, scale=scale, diagonal=True)
        if diagonal:
            self.method = "SMAC"
        super().__init__(model, t_cov=t_cov, t_inv=t_inv, params=params, attention=attention,
                         skip_layers=skip_layers, grad_scaler=grad_scaler, on_nonfinite=on_nonfinite,
                         process_group=process_group)

    # -- per-layer configuration
    def _uses_diag(self, layer: Layer) -> bool:
        return self.diagonal and layer.role in ("linear", "conv2d", "mha_out")

    def _core(self, layer: Layer) -> maccore.Preconditioner:
        return self._pc_diag if self._uses_diag(layer) else self._pc

    @staticmethod
    def _heads(layer: Layer) -> int | None:
        qkv = layer.spec.qkv
        if layer.role == "mha" or (layer.role == "qkv" and qkv.mode != "off"):
            return 3 * qkv.num_heads if qkv.mode == "per_head" else 3
        return None

    def _init_state(self, layer: Layer) -> maccore.MacState:
        w = layer.weight
        return self._core(layer).init(layer.spec.d_tilde, layer.spec.d_out, xp=XP, heads=self._heads(layer),
                                      dtype=w.dtype, device=w.device)

    def _collects_mean(self, layer: Layer) -> bool:
        return layer.first_inv is None or self._uses_diag(layer)

    def _templates(self, layer: Layer) -> dict[str, torch.Tensor]:
        out = {"mean": layer.state.mean.value} if self._collects_mean(layer) else {}
        if self._uses_diag(layer):
            out["diag"] = layer.state.diag.value
        return out

    # -- statistics
    def _forward_stats(self, layer, spec, x, out) -> dict:
        if not self._collects_mean(layer):
            return {}
        if layer.role == "qkv":
            mean = self._qkv_mean(spec, x, out)
        else:
            mean = row_mean(spec, x)
        return {"mean": (mean, _num_rows(spec, x), "mean")}

    @staticmethod
    def _qkv_mean(spec: maccore.LayerSpec, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"{spec.name}: a fused qkv layer needs input [B, N, d], got {list(x.shape)}")
        a = row_mean(spec, x)
        qkv = spec.qkv
        if qkv.mode == "off":
            return a
        v = maccore.attention_weighted_mean(x, qkv_probs(out, qkv), bias=spec.has_bias, mode=qkv.mode)
        return _stack_qkv(a, a, v, qkv)

    def _mha_stats(self, layer: Layer, cap: MhaCapture) -> dict:
        spec = layer.spec
        if layer.role == "mha_out":
            if not self._collects_mean(layer):
                return {}
            return {"mean": (row_mean(spec, cap.context), _num_rows(spec, cap.context), "mean")}
        qkv = spec.qkv
        aq = row_mean(spec, cap.query)
        if not cap.self_attention:
            mean = _stack_qkv(aq, row_mean(spec, cap.key), row_mean(spec, cap.value), qkv)
        elif qkv.mode == "off":
            mean = _stack_qkv(aq, aq, aq, qkv)
        else:
            v = maccore.attention_weighted_mean(cap.query, cap.attn, bias=spec.has_bias, mode=qkv.mode)
            mean = _stack_qkv(aq, aq, v, qkv)
        return {"mean": (mean, _num_rows(spec, cap.query), "mean")}

    def _wants_grads(self, layer: Layer) -> bool:
        return self._uses_diag(layer)

    def _grad_stats(self, layer, spec, g) -> dict:
        rows = maccore.to_grad_rows(spec, g)
        return {"diag": (maccore.gradient_diagonal(rows), rows.shape[0], "mean")}

    # -- core calls
    def _fold(self, layer: Layer, stats: dict) -> None:
        if "mean" not in stats:
            return
        if self._uses_diag(layer):
            if "diag" not in stats:
                return
            layer.state = self._core(layer).update(layer.state, mean=stats["mean"], grad_diag=stats["diag"])
        else:
            layer.state = self._core(layer).update(layer.state, mean=stats["mean"])
        layer.updates += 1

    def _refresh(self, layer: Layer) -> None:
        layer.state = self._core(layer).refresh(layer.state)

    def _fast_terms(self, layer: Layer) -> tuple:
        """``(â_w, â_b, s)`` of the current state: views of â split into weight part
        and bias entry and the 0-d ``s = 1/(λ + âᵀâ)`` (``None`` for per-head factors); cached until the next
        refresh (keyed on the identity of the state's ``mean_hat``, which every refresh or load
        replaces). No vector beyond the state is kept: ``â/(λ + âᵀâ) = s·â``."""
        st = layer.state
        c = layer.cache
        if c is not None and c[0] is st.mean_hat:
            return c[1]
        a = st.mean_hat
        # one 0-d scalar per layer; per-head factors ([H, d̃]) recompute their [H, 1] each step
        inv = self._inv_norm(a)[0] if a.ndim == 1 else None
        n = a.shape[-1] - (1 if layer.bias is not None else 0)
        bias = layer.bias is not None
        terms = (a[..., :n], a[..., n] if bias else None, inv)
        layer.cache = (st.mean_hat, terms)
        return terms

    def _inv_norm(self, a: torch.Tensor) -> torch.Tensor:
        return 1.0 / (self.damping + torch.sum(a * a, dim=-1, keepdim=True))  # as maccore.mac_apply

    def _precondition(self, layer: Layer) -> None:
        """``maccore.mac_apply`` computed in place on ``.grad`` (no concatenation of weight and
        bias gradients, no copies; :func:`maccore._delegate.rank1_split_torch_parts`), when the
        gradients are contiguous, of the statistics dtype and not part of a graph; otherwise the
        generic path (grad matrix → core ``apply`` → split)."""
        gw = layer.weight.grad
        if gw is None:
            return
        gb = None if layer.bias is None else layer.bias.grad
        if (layer.first_inv is not None or (layer.bias is not None and gb is None)
                or gw.dtype != layer.state.mean_hat.dtype or gw.requires_grad or not gw.is_contiguous()
                or (gb is not None and (gb.dtype != gw.dtype or gb.requires_grad or not gb.is_contiguous()))):
            super()._precondition(layer)
            return
        aw, ab, inv = self._fast_terms(layer)
        if inv is None:
            inv = self._inv_norm(layer.state.mean_hat)
        g2 = gw if gw.ndim == 2 else gw.view(gw.shape[0], -1)
        _delegate.rank1_split_torch_parts(g2, gb, aw, ab, aw, ab, inplace=True, scale=inv)
        if self.scale == "inverse":
            g2.div_(self.damping)
            if gb is not None:
                gb.div_(self.damping)
        z = layer.state.diag_hat
        if z is not None:  # SMAC: diag(1/(ẑ + λ)) from the left, as maccore.mac_apply
            div = z + self.damping
            g2.div_(div.unsqueeze(1))
            if gb is not None:
                gb.div_(div)

    def _apply(self, layer: Layer, grad_mat: torch.Tensor) -> torch.Tensor:
        if layer.first_inv is None:
            return self._core(layer).apply(layer.state, grad_mat)
        inv = layer.first_inv
        u = grad_mat.to(inv.dtype) @ inv  # Ĝ P_first, a true inverse (MATH.md §3.4, T8)
        if self._uses_diag(layer):  # SMAC: diag(1/(ẑ+λ)) Ĝ P_first (a zero mean leaves only Z)
            u = maccore.mac_apply(u, torch.zeros_like(inv[0]), self.damping,
                                  grad_diag=layer.state.diag_hat)
        return u.to(grad_mat.dtype)

    def _describe(self, layer: Layer) -> str:
        smac = " + SMAC diagonal" if self._uses_diag(layer) else ""
        if layer.first_inv is not None:
            return f"first-layer inverse (A+λI)^-1{smac}"
        if layer.role in ("qkv", "mha"):
            qkv = layer.spec.qkv
            return f"MAC fused qkv (V: {qkv.mode}, H={qkv.num_heads})"
        return f"MAC rank-1 ({layer.spec.kind.value}){smac}"

    def _hyperparameters(self) -> dict:
        return {**super()._hyperparameters(), "stat_decay": self.stat_decay, "damping": self.damping,
                "scale": self.scale, "diagonal": self.diagonal}

    # -- first layer
    def _on_first_layer_fixed(self, layer: Layer) -> None:
        if not self._uses_diag(layer):
            self._remove_hook(layer)

    def fit_first_layer(self, batches: Iterable[Any], *, layer: str | None = None) -> str:
        """Fix the first layer's preconditioner to the full damped inverse ``(A + λI)⁻¹``.

        ``A`` is the mean over ``batches`` of the per-batch second moments E_rows[x̃x̃ᵀ] of the
        layer's input (MATH.md §3.4). ``batches`` yields model inputs or ``(input, target, ...)``
        tuples; the model runs under ``no_grad`` only up to the layer. ``layer``: its name (default:
        the first supported Linear/Conv2d layer). The inverse is never refreshed and the layer's
        forward hook is removed (kept for SMAC's gradient diagonal). Under ``torch.distributed``
        the per-batch moments of all ranks are averaged. Returns the layer name.
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

        class _Captured(Exception):
            pass

        seen: list[torch.Tensor] = []

        def grab(_m, args):
            seen.append(args[0].detach())
            raise _Captured

        handle = module.register_forward_pre_hook(grab)
        total, count = None, 0
        try:
            with torch.no_grad():
                for batch in batches:
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    if isinstance(x, torch.Tensor):
                        x = x.to(target.weight.device)
                    seen.clear()
                    try:
                        self.model(x)
                    except _Captured:
                        pass
                    if not seen:
                        raise RuntimeError(f"fit_first_layer: layer {target.name} did not run in the forward pass")
                    with stats_mode(seen[0]):
                        a = maccore.input_factor(maccore.to_rows(spec, seen[0]))
                    total = a if total is None else total + a
                    count += 1
        finally:
            handle.remove()
        if count == 0:
            raise ValueError("fit_first_layer: 'batches' is empty")
        if self._distributed():
            (total, _), = self._all_reduce_weighted([(total / count, float(count), total)])
        else:
            total = total / count
        target.first_inv = maccore.damped_inverse(total, self.damping, name=f"{target.name} input covariance")
        self._on_first_layer_fixed(target)
        return target.name


class MAC(CurvatureOptimizer):
    """MAC as a ``torch.optim.Optimizer`` (MATH.md §3.2–3.6; defaults of the published code).

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
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        weight_decay_mode=weight_decay_mode)
        make = functools.partial(
            MACPreconditioner, model, stat_decay=stat_decay, damping=damping, t_cov=t_cov, t_inv=t_inv,
            scale=scale, attention=attention, diagonal=diagonal, skip_layers=skip_layers,
            grad_scaler=grad_scaler, on_nonfinite=on_nonfinite, process_group=process_group,
        )
        super().__init__(model, params, defaults, make)

    def fit_first_layer(self, batches: Iterable[Any], *, layer: str | None = None) -> str:
        """See :meth:`MACPreconditioner.fit_first_layer`."""
        return self.preconditioner.fit_first_layer(batches, layer=layer)
