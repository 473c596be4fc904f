"""Attention capture: recompute what a hook cannot see (q, k, attention probabilities, context).

Only model recomputation lives here (the projections, reshapes and masks torch applies); the
statistics themselves are core calls (:func:`maccore.split_qkv`, :func:`maccore.attention_probs`,
:func:`maccore.attention_weighted_mean`). Everything runs on gated steps only, in float32.

``nn.MultiheadAttention`` calls ``F.linear`` on its ``out_proj`` weight, so hooks on ``out_proj``
never fire: its input (the attention context) is recomputed here from the recomputed probabilities.
Attention dropout cannot be reproduced, so with ``dropout > 0`` the out-projection statistics are
those of the dropout-free context.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import maccore

__all__ = ["MhaCapture", "capture_mha", "qkv_probs"]


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
