"""Attention capture: recompute what a hook cannot see (q, k, attention probabilities, context).

Only model recomputation lives here (the projections, reshapes and masks torch applies); the
statistics themselves are core calls (:func:`maccore.split_qkv`, :func:`maccore.attention_probs`,
:func:`maccore.attention_weighted_mean`). Everything runs on gated steps only, in float32.

``nn.MultiheadAttention`` calls ``F.linear`` on its ``out_proj`` weight, so hooks on ``out_proj``
never fire: its input (the attention context) is recomputed here from the recomputed probabilities.
Attention dropout cannot be reproduced, so with ``dropout > 0`` the out-projection statistics are
those of the dropout-free context.

Attention modules declared with :class:`AttentionModule` (separate q/k/v projections as in
Hugging Face Llama / BERT / ViT, or a fused qkv projection as GPT-2's ``c_attn``) are NOT
recomputed: the probabilities are the ones the module itself returns (Hugging Face eager
attention: the second output), so RoPE, masks, causal masks and q/k norms are included exactly.
A declared fused qkv ``nn.Linear`` whose probabilities WOULD be recomputed is refused when its
attention module transforms q or k before the scores (:func:`check_recomputable`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import maccore

__all__ = ["AttentionModule", "AttentionSource", "MhaCapture", "capture_mha", "check_recomputable",
           "module_probs", "qkv_probs"]


@dataclass
class MhaCapture:
    """Batch-first float views of one ``nn.MultiheadAttention`` call."""

    query: torch.Tensor  # [B, L, E] inputs of the three projections
    key: torch.Tensor  # [B, S, E]
    value: torch.Tensor  # [B, S, E]
    self_attention: bool  # query, key and value are the same tensor
    attn: torch.Tensor  # [B, H, L, S] probabilities (float32 or float64)
    context: torch.Tensor  # [B, L, E] input of out_proj
    batch_first: bool
    batched: bool


_SIG_CACHE: dict[type, inspect.Signature] = {}


def _bind(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict:
    sig = _SIG_CACHE.get(type(module))
    if sig is None:
        sig = _SIG_CACHE[type(module)] = inspect.signature(module.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """torch mask convention (bool True = masked out, float = additive) → additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def to_batch_first(t: torch.Tensor, batch_first: bool) -> torch.Tensor:
    if t.ndim == 2:
        return t.unsqueeze(0)
    return t if batch_first else t.transpose(0, 1)


def capture_mha(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> MhaCapture:
    a = _bind(module, args, kwargs)
    q_raw, k_raw, v_raw = a["query"], a["key"], a["value"]
    bf = module.batch_first
    batched = q_raw.ndim == 3
    q_in, k_in, v_in = (to_batch_first(t.detach(), bf) for t in (q_raw, k_raw, v_raw))
    same = q_raw is k_raw and k_raw is v_raw
    h = module.num_heads
    w, b = module.in_proj_weight.detach(), module.in_proj_bias
    b = None if b is None else b.detach()
    if same:
        q, k, v = maccore.split_qkv(F.linear(q_in, w, b), h)
    else:
        q = maccore.split_qkv(F.linear(q_in, w, b), h)[0]
        k = maccore.split_qkv(F.linear(k_in, w, b), h)[1]
        v = maccore.split_qkv(F.linear(v_in, w, b), h)[2]
    bsz, L, S = q.shape[0], q.shape[2], k.shape[2]
    sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    attn_mask, kpm = a.get("attn_mask"), a.get("key_padding_mask")
    mask = None
    causal = False
    if attn_mask is not None:
        m = _additive(attn_mask, sdt)
        mask = m.reshape(bsz, h, L, S) if m.ndim == 3 else m
    elif a.get("is_causal", False):
        causal = True
    if kpm is not None:
        kp = _additive(kpm if kpm.ndim == 2 else kpm.unsqueeze(0), sdt).reshape(-1, 1, 1, S)
        mask = kp if mask is None else mask + kp
    attn = maccore.attention_probs(q, k, causal=causal, mask=mask)
    ctx = (attn @ v.to(attn.dtype)).permute(0, 2, 1, 3).reshape(bsz, L, -1)
    return MhaCapture(q_in, k_in, v_in, same, attn, ctx, bf, batched)


def qkv_probs(out: torch.Tensor, qkv: maccore.QkvSpec) -> torch.Tensor:
    """Attention probabilities ``[B, H, N, N]`` from a fused qkv output ``[B, N, 3D]``."""
    q, k, _ = maccore.split_qkv(out, qkv.num_heads)
    return maccore.attention_probs(q, k, causal=qkv.causal)


# ------------------------------------------------------------------ the model's own probabilities

_MODES = ("reference", "per_head", "off")


@dataclass(frozen=True)
class AttentionModule:
    """Declares an attention MODULE that returns its attention probabilities (``attention=
    {"model.layers.0.self_attn": AttentionModule(value="v_proj")}``).

    The value projection's input factor then uses the attention-weighted mean
    (:func:`maccore.attention_weighted_mean`) of the probabilities this module computes in the
    same forward (Hugging Face eager attention returns ``(attn_output, attn_weights)``: RoPE,
    padding / causal masks and q/k norms are included exactly); the q and k projections keep the
    plain mean activation.

    Args:
        value: relative name of the value projection (separate q/k/v projections: Llama
            ``"v_proj"``, BERT ``"value"``); output layout (H_kv, d_h).
        qkv: instead of ``value``: relative name of a fused (3, H, d_h) qkv projection (GPT-2
            ``"c_attn"``), whose Q/K row blocks keep ā.
        mode: ``"reference"`` (head-averaged, batch-factorised v̄), ``"per_head"`` (the exact mean
            of each head; grouped-query attention: each value head gets the mean over its query
            heads) or ``"off"`` (plain ā, no probabilities needed).
        num_heads / num_kv_heads: the number of (query) heads H and value heads H_kv; default:
            read from the module (``num_heads``, ``num_attention_heads``, ``n_head``, then its
            ``config``; H_kv from ``num_key_value_heads``, default H).
        probs: ``probs(module, output) -> Tensor [B, H, N, N] | None``, how to read the
            probabilities from the module's forward output; default: ``output[1]``.
    """

    value: str | None = None
    qkv: str | None = None
    mode: str = "reference"
    num_heads: int | None = None
    num_kv_heads: int | None = None
    probs: Callable[[nn.Module, Any], Any] | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.qkv is None):
            raise ValueError("AttentionModule: give exactly one of value= (separate q/k/v "
                             "projections) and qkv= (a fused qkv projection)")
        for nm in ("value", "qkv"):
            v = getattr(self, nm)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"AttentionModule: {nm} must be a submodule name, got {v!r}")
        if self.mode not in _MODES:
            raise ValueError(f"AttentionModule: mode must be one of {_MODES}, got {self.mode!r}")
        for nm in ("num_heads", "num_kv_heads"):
            v = getattr(self, nm)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"AttentionModule: {nm} must be a positive integer, got {v!r}")
        if self.probs is not None and not callable(self.probs):
            raise ValueError(f"AttentionModule: probs must be callable, got {type(self.probs).__name__}")

    @property
    def projection(self) -> str:
        """The relative name of the declared projection."""
        return self.value if self.value is not None else self.qkv


@dataclass(eq=False)
class AttentionSource:
    """Where a layer's attention probabilities come from: the declared attention module."""

    name: str  # the attention module's name in the model
    module: nn.Module
    decl: AttentionModule


_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


def _int_attr(module: nn.Module, names: tuple) -> int | None:
    for obj in (module, getattr(module, "config", None)):
        for nm in names:
            v = getattr(obj, nm, None) if obj is not None else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def module_heads(name: str, module: nn.Module, decl: AttentionModule) -> tuple[int, int]:
    """(H, H_kv) of a declared attention module (explicit, else read from the module/config)."""
    h = decl.num_heads or _int_attr(module, _HEAD_ATTRS)
    if h is None:
        raise ValueError(f"attention[{name!r}]: cannot read the number of heads of "
                         f"{type(module).__name__}; pass AttentionModule(..., num_heads=H)")
    kv = decl.num_kv_heads or (_int_attr(module, _KV_ATTRS) if decl.value is not None else None) or h
    if h % kv:
        raise ValueError(f"attention[{name!r}]: num_kv_heads={kv} does not divide num_heads={h}")
    return h, kv


def implementation_error(source: AttentionSource) -> str | None:
    """Why ``source`` cannot return probabilities (a Hugging Face config with a non-eager
    attention implementation), or ``None``."""
    if source.decl.probs is not None:
        return None
    impl = getattr(getattr(source.module, "config", None), "_attn_implementation", None)
    if impl is None or impl == "eager":
        return None
    return (f"attention[{source.name!r}] ({type(source.module).__name__}) uses "
            f"attn_implementation={impl!r}, which does not return the attention probabilities. "
            f"{_EAGER_HINT}")


_EAGER_HINT = ("Build the model with attn_implementation=\"eager\" (e.g. "
               "AutoModelForCausalLM.from_pretrained(..., attn_implementation=\"eager\"), or "
               "Config(..., attn_implementation=\"eager\")); sdpa / flash attention never "
               "materialise the probabilities. Or declare mode=\"off\" (plain MAC).")


def module_probs(source: AttentionSource, output: Any, x: torch.Tensor, layer: str,
                 heads: int) -> torch.Tensor:
    """The probabilities ``[B, H, N, N]`` the attention module returned, checked against the
    declared projection's input ``x [B, N, d]``; a clear error when they are missing or do not
    match (cross-attention with L != S, averaged heads, ...)."""
    decl = source.decl
    if decl.probs is not None:
        attn = decl.probs(source.module, output)
    else:
        attn = output[1] if isinstance(output, (tuple, list)) and len(output) >= 2 else None
    label = f"attention[{source.name!r}] ({type(source.module).__name__})"
    if attn is None:
        raise RuntimeError(
            f"{label} returned no attention probabilities (its second output is None or missing), "
            f"so the value projection {layer!r} cannot get attention-weighted statistics. "
            f"Hugging Face attention returns them only with the eager implementation. "
            f"{_EAGER_HINT} A module of your own: pass AttentionModule(..., probs=fn).")
    if not isinstance(attn, torch.Tensor) or not attn.is_floating_point():
        raise TypeError(f"{label}: the attention probabilities must be a floating tensor, got "
                        f"{type(attn).__name__}")
    if x.ndim != 3:
        raise ValueError(f"{label}: the input of {layer!r} has shape {list(x.shape)}; attention-"
                         f"weighted statistics need [B, N, d]")
    b, n = x.shape[0], x.shape[1]
    if attn.ndim != 4 or attn.shape[0] != b or attn.shape[2] != attn.shape[3] or attn.shape[3] != n:
        cross = attn.ndim == 4 and attn.shape[2] != attn.shape[3]
        why = ("cross-attention or a key/value cache (queries L != keys S) is not supported"
               if cross else f"expected [B={b}, H, N={n}, N={n}]")
        raise ValueError(f"{label}: attention probabilities of shape {list(attn.shape)} "
                         f"[B, H, L, S] do not match the input {list(x.shape)} of {layer!r}: {why}. "
                         f"Declare mode=\"off\" or skip_layers=[{layer!r}] for this layer.")
    if attn.shape[1] != heads:
        raise ValueError(f"{label}: attention probabilities of shape {list(attn.shape)} have "
                         f"{attn.shape[1]} heads, the declaration {heads} (num_heads)")
    return attn.detach()


# attributes of an attention module that transform q or k before the scores
_QK_TRANSFORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_norm", "key_norm",
                  "rotary_emb", "rotary", "rope")


def check_recomputable(name: str, parent_name: str, parent: nn.Module | None) -> None:
    """Refuse to recompute the probabilities of the declared fused qkv layer ``name`` from its
    output when its attention module ``parent`` transforms q or k before the scores (timm
    ``qk_norm=True``: ``q_norm``/``k_norm`` that are not ``nn.Identity``; rotary embeddings):
    the recomputed statistics would be silently wrong."""
    if parent is None:
        return
    found = [a for a in _QK_TRANSFORMS
             if isinstance(getattr(parent, a, None), nn.Module)
             and not isinstance(getattr(parent, a), nn.Identity)]
    if found:
        from maccore_torch.specs import UnsupportedLayerError  # noqa: PLC0415 (import cycle)
        where = parent_name or type(parent).__name__
        what = ", ".join(f"{where}.{a} ({type(getattr(parent, a)).__name__})" for a in found)
        raise UnsupportedLayerError(
            f"attention[{name!r}]: the attention probabilities of a fused qkv layer declared by "
            f"name are recomputed from its output as softmax(q kᵀ/√d_h), but {what} transforms "
            f"q/k before the scores, so the recomputed probabilities (and the V statistics) would "
            f"be wrong. Declare the attention module instead, attention={{{where!r}: "
            f"maccore_torch.AttentionModule(qkv={name.rsplit('.', 1)[-1]!r}, probs=...)}}, so its "
            f"own probabilities are used, or QKV(..., mode=\"off\") for plain MAC.")
