"""MAC: mean-activation rank-1 input factor with damped Sherman–Morrison inverse (docs/math.md).

Row-major: the MAC curvature of a layer is ``F = I_{d_out} ⊗ (āāᵀ + λI)`` and its inverse is applied
in rank-1 form, never forming a d̃×d̃ matrix (T19):

    reference scale:  U = G − (G â) âᵀ / (λ + âᵀâ)      (= λ · G (ââᵀ + λI)⁻¹, the published code)
    inverse scale:    U = G (ââᵀ + λI)⁻¹ = reference / λ

SMAC multiplies from the left by ``diag(1 / (ẑ + λ))`` with ẑ a running diagonal of the gradient
factor. For a fused qkv projection the V rows use the attention-weighted mean (§3.5).
"""

from __future__ import annotations

import math

import array_api_extra as xpx
from typing import Any, NamedTuple

from maccore import _delegate
from maccore._typing import Preconditioner
from maccore._xp import (
    Array,
    alias_keyword,
    check_damping,
    check_damping_range,
    check_decay,
    check_flag,
    check_floating,
    check_ndim,
    check_positive_int,
    check_xp,
    device_of,
    namespace,
    shape_str,
    stats_dtype,
    to_stats,
)
from maccore.ema import EmaState, ema_debiased, ema_init, ema_update

__all__ = [
    "MacState",
    "mean_activation",
    "gradient_diagonal",
    "attention_probs",
    "split_qkv",
    "attention_weighted_mean",
    "mac_apply",
    "first_layer_apply",
    "mac",
    "MAC_SCALES",
]

MAC_SCALES = ("reference", "inverse")


def mean_activation(rows: Array) -> Array:
    """ā = mean of the input rows ``[R, d̃]`` → ``[d̃]`` in the statistics dtype (≥ float32)."""
    xp = namespace(rows=rows, where="mean_activation", optional=())
    check_floating(xp, rows, "rows", "mean_activation", integer_ok=True)
    check_ndim(rows, 2, "rows", "mean_activation")
    if rows.shape[0] == 0:
        raise ValueError("mean_activation: 'rows' has no rows (shape [0, ...])")
    return xp.mean(to_stats(xp, rows), axis=0)


def gradient_diagonal(grad_rows: Array, *, reduction_factor: float | None = None) -> Array:
    """Diagonal gradient factor ``z`` for SMAC from output-gradient rows ``[R, d_out]``.

    ``reduction_factor=None``: ``E_rows[g ⊙ g]`` (the published SMAC statistic); otherwise the
    canonical ``diag(G) = (1/R) Σ_rows g ⊙ g`` (docs/math.md, SMAC remark).
    """
    xp = namespace(grad_rows=grad_rows, where="gradient_diagonal", optional=())
    check_floating(xp, grad_rows, "grad_rows", "gradient_diagonal", integer_ok=True)
    check_ndim(grad_rows, 2, "grad_rows", "gradient_diagonal")
    if grad_rows.shape[0] == 0:
        raise ValueError("gradient_diagonal: 'grad_rows' has no rows (shape [0, ...])")
    g = to_stats(xp, grad_rows)
    if reduction_factor is None:
        return xp.mean(g * g, axis=0)
    check_damping(reduction_factor, "reduction_factor", "gradient_diagonal", pair=False)
    return xp.sum(g * g, axis=0) / reduction_factor


def attention_probs(q: Array, k: Array, *, causal: bool = False, mask: Array | None = None) -> Array:
    """softmax(q kᵀ / √d_h) over keys → ``[B, H, N, M]`` in the statistics dtype.

    Args:
        q: ``[B, H, N, d_h]`` queries; k: ``[B, H, M, d_h]`` keys.
        causal: query i attends only to keys j ≤ i.
        mask: optional boolean array broadcastable to ``[B, H, N, M]`` (True = attend), or a
            floating additive bias (e.g. relative-position bias or −inf for masked keys).
            Fully masked query rows get all-zero probabilities.
    """
    where = "attention_probs"
    xp = namespace(q=q, k=k, mask=mask, where=where, optional=("mask",))
    check_floating(xp, q, "q", where, integer_ok=True)
    check_floating(xp, k, "k", where, integer_ok=True)
    check_flag(causal, "causal", where)
    check_ndim(q, 4, "q", where)
    check_ndim(k, 4, "k", where)
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention_probs: 'q' {shape_str(q)} and 'k' {shape_str(k)} must agree in batch, heads "
            "and head dim"
        )
    if q.shape[3] == 0:
        raise ValueError(f"{where}: 'q' {shape_str(q)} has head dimension 0")
    if k.shape[2] == 0:
        raise ValueError(f"{where}: 'k' {shape_str(k)} has no keys: the softmax over keys is undefined")
    if mask is not None:
        if mask.dtype != xp.bool:
            check_floating(xp, mask, "mask", where)
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        ms = tuple(mask.shape)
        if len(ms) > 4 or any(m not in (1, t) for m, t in zip(ms[::-1], target[::-1])):
            raise ValueError(
                f"{where}: 'mask' of shape {shape_str(mask)} does not broadcast to the scores "
                f"{list(target)} ([B, H, N, M])"
            )
    sdt = stats_dtype(xp, q.dtype)
    qs, ks = to_stats(xp, q, sdt), to_stats(xp, k, sdt)
    scores = (qs @ xp.matrix_transpose(ks)) / math.sqrt(q.shape[3])
    n, m = q.shape[2], k.shape[2]
    keep = None
    if causal:
        i = xp.reshape(xp.arange(n, device=device_of(q)), (n, 1))
        j = xp.reshape(xp.arange(m, device=device_of(q)), (1, m))
        keep = j <= i
    if mask is not None:
        if mask.dtype == xp.bool:
            keep = mask if keep is None else xp.logical_and(keep, mask)
        else:
            scores = scores + to_stats(xp, mask, sdt)
    neg = xp.asarray(-math.inf, dtype=sdt, device=device_of(q))
    if keep is not None:
        scores = xp.where(keep, scores, neg)
    if mask is None and m > 0:  # every row keeps a key (causal keeps key 0): a fused softmax is exact
        fused = _delegate.softmax_last(xp, scores)
        if fused is not None:
            return fused
    mx = xp.max(scores, axis=-1, keepdims=True)
    mx = xp.where(xp.isfinite(mx), mx, xp.zeros_like(mx))
    e = xp.exp(scores - mx)
    s = xp.sum(e, axis=-1, keepdims=True)
    return e / xp.where(s > 0, s, xp.ones_like(s))


def split_qkv(out: Array, num_heads: int) -> tuple[Array, Array, Array]:
    """Split a fused qkv output ``[B, N, 3D]`` with layout (3, H, d_h) into q, k, v ``[B, H, N, d_h]``."""
    xp = namespace(out=out, where="split_qkv", optional=())
    check_floating(xp, out, "out", "split_qkv")
    check_ndim(out, 3, "out", "split_qkv")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"split_qkv: num_heads must be a positive integer, got {num_heads!r}")
    b, n, three_d = out.shape
    if three_d % (3 * num_heads):
        raise ValueError(
            f"split_qkv: output features {three_d} of {shape_str(out)} are not divisible by "
            f"3 · num_heads = {3 * num_heads}"
        )
    dh = three_d // (3 * num_heads)
    t = xp.permute_dims(xp.reshape(out, (b, n, 3, num_heads, dh)), (2, 0, 3, 1, 4))
    return t[0, ...], t[1, ...], t[2, ...]


def attention_weighted_mean(x: Array, attn: Array, *, bias: bool, mode: str = "reference") -> Array:
    """Mean input of the value path of a fused qkv projection (docs/math.md).

    Args:
        x: ``[B, N, d_in]`` input of the qkv projection.
        attn: ``[B, H, N, N]`` attention probabilities (rows sum to 1 over keys).
        bias: the projection has a bias (append the constant 1, last).
        mode: ``"reference"`` — Σ_j ᾱ_j x̄_j with ᾱ averaged over batch, heads and queries and x̄
            the batch mean (the published code) → ``[d̃]``; ``"per_head"`` — the exact per-head
            mean (1/(B N)) Σ_{b,i} Σ_j α_{b,h,i,j} x̃_{b,j} → ``[H, d̃]``.
    """
    xp = namespace(x=x, attn=attn, where="attention_weighted_mean", optional=())
    check_floating(xp, x, "x", "attention_weighted_mean", integer_ok=True)
    check_floating(xp, attn, "attn", "attention_weighted_mean")
    check_flag(bias, "bias", "attention_weighted_mean")
    check_ndim(x, 3, "x", "attention_weighted_mean")
    check_ndim(attn, 4, "attn", "attention_weighted_mean")
    b, n, _ = x.shape
    if b == 0 or n == 0:
        raise ValueError(
            f"attention_weighted_mean: 'x' of shape {shape_str(x)} is empty (no samples or tokens)"
        )
    if attn.shape[0] != b or attn.shape[2] != n or attn.shape[3] != n:
        raise ValueError(
            f"attention_weighted_mean: 'attn' of shape {shape_str(attn)} does not match 'x' of shape "
            f"{shape_str(x)} (expected [{b}, H, {n}, {n}])"
        )
    if mode not in ("reference", "per_head"):
        raise ValueError(f"attention_weighted_mean: mode must be 'reference' or 'per_head', got {mode!r}")
    sdt = stats_dtype(xp, x.dtype)
    xs = to_stats(xp, x, sdt)
    a = to_stats(xp, attn, sdt)
    if mode == "reference":
        abar = xp.mean(a, axis=(0, 1, 2))  # [N]
        xbar = xp.mean(xs, axis=0)  # [N, d_in]
        out = xp.reshape(xp.reshape(abar, (1, n)) @ xbar, (1, -1))
    else:
        ah = xp.mean(a, axis=2)  # [B, H, N]
        out = xp.mean(ah @ xs, axis=0)  # [B, H, d_in] -> [H, d_in]
    if bias:
        # The bias entry is Σ_j ᾱ_j = 1 for attention rows summing to 1; set it exactly (M-P5)
        # instead of inheriting the round-off of the probability sum.
        ones = xp.ones((out.shape[0], 1), dtype=sdt, device=device_of(out))
        out = xp.concat([out, ones], axis=1)
    return xp.reshape(out, (-1,)) if mode == "reference" else out


def mac_apply(
    grad_mat: Array,
    mean: Array,
    damping: Any,
    *,
    grad_diag: Array | None = None,
    scale: str = "reference",
    grad_bias: Array | None = None,
    out: Any = None,
) -> Any:
    """Apply the damped MAC inverse to a gradient matrix in rank-1 form.

    The one implementation of MAC's update: every adapter calls it, and the native fast paths
    (a cache-blocked BLAS kernel for NumPy and large CPU tensors, fused torch kernels) live behind
    it in the delegation layer, each tested against the standard-only path.

    Args:
        grad_mat: ``[d_out, d̃]`` gradient matrix (bias last); or, with ``grad_bias``, only its
            weight part ``[d_out, d̃ − 1]`` (the bias column is then ``grad_bias``: no
            concatenation, for callers holding weight and bias gradients separately).
        mean: ``[d̃]`` debiased mean activation â, or ``[H, d̃]``: head h's factor is applied to the
            h-th of H equal row blocks of ``grad_mat``.
        damping: λ > 0.
        grad_diag: optional ``[d_out]`` SMAC diagonal ẑ: the result is left-multiplied by
            ``diag(1 / (ẑ + λ))``.
        scale: ``"reference"`` → G − (G a) aᵀ/(λ + aᵀa) = λ·G(aaᵀ+λI)⁻¹; ``"inverse"`` →
            G(aaᵀ+λI)⁻¹.
        grad_bias: optional ``[d_out]`` bias column (split form, see ``grad_mat``).
        out: where to write the result (NumPy, CuPy or torch arrays only): an array like
            ``grad_mat``, or in split form a pair ``(weight_out, bias_out)``; it may be the inputs
            themselves (in place, no allocation on the fast paths).

    Returns:
        ``[d_out, d̃]`` with the dtype of ``grad_mat`` (computed in ≥ float32), or in split form the
        pair ``(weight part, bias part)``; ``out`` when given. No d̃×d̃ matrix is formed.
    """
    where = "mac_apply"
    xp = namespace(
        grad_mat=grad_mat, mean=mean, grad_diag=grad_diag, grad_bias=grad_bias, where=where,
        optional=("grad_diag", "grad_bias"),
    )
    check_floating(xp, grad_mat, "grad_mat", where)
    check_floating(xp, mean, "mean", where)
    for name, arr in (("grad_diag", grad_diag), ("grad_bias", grad_bias)):
        if arr is not None:
            check_floating(xp, arr, name, where)
    check_ndim(grad_mat, 2, "grad_mat", where)
    check_ndim(mean, (1, 2), "mean", where)
    check_damping(damping, "damping", where, pair=False)
    if scale not in MAC_SCALES:
        raise ValueError(f"{where}: scale must be one of {MAC_SCALES}, got {scale!r}")
    d_out, n = grad_mat.shape
    d_t = n + (grad_bias is not None)
    if mean.shape[-1] != d_t:
        what = "grad_mat + grad_bias" if grad_bias is not None else "grad_mat"
        raise ValueError(
            f"{where}: 'mean' of shape {shape_str(mean)} does not match '{what}' of shape "
            f"{shape_str(grad_mat)} (last dims must agree: d̃ = {d_t})"
        )
    if grad_bias is not None and tuple(grad_bias.shape) != (d_out,):
        raise ValueError(
            f"{where}: 'grad_bias' of shape {shape_str(grad_bias)} must be [{d_out}] for "
            f"'grad_mat' {shape_str(grad_mat)}"
        )
    if mean.ndim == 2 and (mean.shape[0] == 0 or d_out % mean.shape[0]):
        raise ValueError(
            f"{where}: {mean.shape[0]} head factors in 'mean' {shape_str(mean)} do not divide the "
            f"{d_out} rows of 'grad_mat' {shape_str(grad_mat)}"
        )
    if grad_diag is not None and tuple(grad_diag.shape) != (d_out,):
        raise ValueError(
            f"{where}: 'grad_diag' of shape {shape_str(grad_diag)} must be [{d_out}] for 'grad_mat' "
            f"{shape_str(grad_mat)}"
        )
    outs = _check_out(out, grad_mat, grad_bias, where)
    sdt = xp.float64 if xp.float64 in (mean.dtype, grad_mat.dtype) else xp.float32
    check_damping_range(xp, damping, sdt, "damping", where)
    return _mac_apply_checked(xp, grad_mat, mean, damping, grad_diag, scale, grad_bias, outs, sdt)


def mac_apply_trusted(grad_mat: Array, mean: Array, damping: Any, grad_diag: Array | None,
                      scale: str, grad_bias: Array | None, out: Any) -> Any:
    """:func:`mac_apply` for the engine, whose states and hyper-parameters are valid by
    construction: only what a caller's gradients can get wrong is checked here (one namespace
    and device, float32/float64 operands, shapes matching the state); anything else — including every
    error — goes through :func:`mac_apply`, which checks everything and names the problem.
    ``out`` as in :func:`mac_apply`. Saves the per-call validation of a training step's
    layers (docs/benchmarks.md)."""
    xp = namespace(grad_mat=grad_mat, mean=mean, grad_diag=grad_diag, grad_bias=grad_bias,
                   where="mac_apply", optional=("grad_diag", "grad_bias"))
    f32, f64 = xp.float32, xp.float64
    dts = (f32, f64)
    d_out = grad_mat.shape[0] if grad_mat.ndim == 2 else -1
    pair = out if grad_bias is not None else (out, None)
    ok = (grad_mat.ndim == 2 and grad_mat.dtype in dts and mean.dtype in dts
          and mean.shape[-1] == grad_mat.shape[1] + (grad_bias is not None)
          and (mean.ndim == 1 or (mean.ndim == 2 and mean.shape[0] and d_out % mean.shape[0] == 0))
          and (grad_bias is None or (grad_bias.dtype in dts and tuple(grad_bias.shape) == (d_out,)))
          and (grad_diag is None or (grad_diag.dtype in dts and tuple(grad_diag.shape) == (d_out,)))
          and (out is None or (isinstance(pair, tuple) and len(pair) == 2 and pair[0] is grad_mat
                               and pair[1] is grad_bias)))
    sdt = f64 if f64 in (mean.dtype, grad_mat.dtype) else f32
    if not ok or not _damping_ok(xp, damping, sdt):
        return mac_apply(grad_mat, mean, damping, grad_diag=grad_diag, scale=scale,
                         grad_bias=grad_bias, out=out)
    return _mac_apply_checked(xp, grad_mat, mean, damping, grad_diag, scale, grad_bias,
                              None if out is None else pair, sdt)


def _damping_ok(xp: Any, damping: Any, sdt: Any) -> bool:
    """A number λ > 0 that is normal in ``sdt`` (else :func:`mac_apply` raises the error)."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        return False
    return damping >= float(xp.finfo(sdt).smallest_normal) and math.isfinite(damping)


def _mac_apply_checked(xp: Any, grad_mat: Array, mean: Array, damping: Any,
                       grad_diag: Array | None, scale: str, grad_bias: Array | None, outs: Any,
                       sdt: Any) -> Any:
    """The computation of :func:`mac_apply` on checked arguments (``outs``: a pair or ``None``;
    ``sdt``: the statistics dtype)."""
    a, inv, row_scale = _mac_prepare(xp, mean, damping, grad_diag, scale, sdt)
    same = grad_mat.dtype == sdt and (grad_bias is None or grad_bias.dtype == sdt)
    inplace = outs is not None and outs[0] is grad_mat and (outs[1] is grad_bias) and same
    fast = None
    if same:
        fast = _delegate.mac_rank1(xp, grad_mat, grad_bias, a, inv, row_scale, inplace=inplace)
    wrote = fast is not None and inplace  # the native kernel already wrote into the inputs
    if fast is None:
        fast = _delegate.mac_rank1_standard(
            xp, to_stats(xp, grad_mat, sdt),
            None if grad_bias is None else to_stats(xp, grad_bias, sdt), a, inv, row_scale)
    w, b = fast
    w = w if w.dtype == grad_mat.dtype else xp.astype(w, grad_mat.dtype)
    if b is not None and b.dtype != grad_bias.dtype:
        b = xp.astype(b, grad_bias.dtype)
    if outs is not None and not wrote:
        w = _delegate.write_into(xp, outs[0], w)
        if b is not None:
            b = _delegate.write_into(xp, outs[1], b)
    elif outs is not None:
        w, b = outs
    return w if grad_bias is None else (w, b)


def _mac_prepare(xp: Any, mean: Array, damping: Any, grad_diag: Array | None, scale: str,
                 sdt: Any) -> tuple[Array, Array, Any]:
    """``(a, inv, row_scale)`` of :func:`_mac_factor` and the rows' left scale: 1/λ (inverse
    scale) and diag(1/(ẑ + λ)) (SMAC), ``None`` for neither."""
    a, inv = _delegate.memo_factor(xp, mean, damping, sdt, lambda: _mac_factor(xp, mean, damping, sdt))
    row_scale = None if scale == "reference" else 1.0 / damping
    if grad_diag is not None:
        z = 1.0 / (to_stats(xp, grad_diag, sdt) + damping)
        row_scale = z if row_scale is None else z * row_scale
    return a, inv, row_scale


def mac_inplace_torch(grad_mat: Array, grad_bias: Array | None, mean: Array, grad_diag: Array | None,
                      damping: Any, scale: str) -> bool:
    """:func:`mac_apply` written into ``grad_mat`` / ``grad_bias`` for torch tensors through a
    prepared plan (:func:`maccore._delegate.torch_mac_plan`: the factor, the left scale and the
    split of â kept per state, with their tensors' versions); ``False`` (nothing written) where
    the plan does not apply, and the caller takes the checked path. Same kernels, same results."""
    return _delegate.torch_mac_plan(
        grad_mat, grad_bias, mean, grad_diag, damping, scale,
        lambda xp, sdt: _mac_prepare(xp, mean, damping, grad_diag, scale, sdt))


def _mac_factor(xp: Any, mean: Array, damping: Any, sdt: Any) -> tuple[Array, Array]:
    """``(a, 1/(λ/c² + aᵀa))`` with ``a = â/c`` per factor (0-d for one factor, ``[H, 1]`` per head).

    âᵀâ would overflow for ‖â‖ ≳ sqrt(max float) (float32: 1.8e19); a factor that large is divided
    by c = max|â| first: (G â) âᵀ / (λ + âᵀâ) = (G â/c)(â/c)ᵀ / (λ/c² + (â/c)ᵀ(â/c)). Otherwise
    c = 1 and the result is bit-identical to the plain 1/(λ + âᵀâ)."""
    a = to_stats(xp, mean, sdt)
    big = xp.max(xp.abs(a), axis=-1, keepdims=True)
    c = xp.where(big > _overflow_limit(xp, sdt, a.shape[-1]), big, xp.ones_like(big))
    a = a / c
    inv = 1.0 / (damping / c / c + xp.sum(a * a, axis=-1, keepdims=True))
    return a, (xp.reshape(inv, ()) if mean.ndim == 1 else inv)


def _overflow_limit(xp: Any, dtype: Any, d: int) -> float:
    """Largest max|â| for which λ + âᵀâ cannot overflow ``dtype`` (d̃ = ``d`` entries)."""
    return math.sqrt(float(xp.finfo(dtype).max) / max(1, d)) / 4


def _check_out(out: Any, grad_mat: Array, grad_bias: Array | None, where: str) -> Any:
    """``out`` as a pair ``(weight_out, bias_out or None)``, checked against the inputs."""
    if out is None:
        return None
    if grad_bias is None:
        pair = (out, None)
    elif isinstance(out, tuple) and len(out) == 2:
        pair = out
    else:
        raise TypeError(f"{where}: with 'grad_bias', out must be a pair (weight_out, bias_out)")
    for name, o, like in (("out", pair[0], grad_mat), ("out (bias)", pair[1], grad_bias)):
        if like is None:
            continue
        if tuple(getattr(o, "shape", ())) != tuple(like.shape) or getattr(o, "dtype", None) != like.dtype:
            raise ValueError(
                f"{where}: '{name}' must have the shape and dtype of its input "
                f"{shape_str(like)} {like.dtype}, got {getattr(o, 'shape', None)} "
                f"{getattr(o, 'dtype', type(o).__name__)}"
            )
    return pair


class MacState(NamedTuple):
    """Per-layer MAC state.

    mean: EMA of the batch mean activation ā (``[d̃]``, or ``[H, d̃]`` for per-head V factors).
    mean_hat: debiased â frozen at the last refresh (what ``apply`` reads).
    diag / diag_hat: SMAC's EMA of the gradient diagonal and its frozen debiased value
        (``None`` without SMAC).
    first_inv: ``None``, or the first layer's fixed full inverse ``(A + λI)⁻¹`` ``[d̃, d̃]``
        (:func:`maccore.engine.first_layer_inverse`): ``apply`` then multiplies by it instead of
        the rank-1 form, and ``refresh`` leaves it as it is.
    """

    mean: EmaState
    mean_hat: Array
    diag: EmaState | None = None
    diag_hat: Array | None = None
    first_inv: Array | None = None


def mac(
    *,
    decay: float = 0.95,
    damping: float = 1.0,
    scale: str = "reference",
    diagonal: bool = False,
    diag_reduction_factor: float | None = None,
    stat_decay: float | None = None,
) -> Preconditioner:
    """The stateful MAC preconditioner of one layer (pure functions, NamedTuple state).

    Args:
        decay: EMA decay β (``stat_decay``).
        damping: λ > 0.
        scale: ``"reference"`` (published code: λ-scaled inverse) or ``"inverse"`` (textbook).
        diagonal: SMAC — keep a running diagonal gradient factor (needs ``grad_rows`` in ``update``).
        diag_reduction_factor: ``None`` for the published statistic E_rows[g⊙g], else R for the
            canonical (1/R)Σ g⊙g.
        stat_decay: the adapters' name for ``decay`` (give one of them).

    ``init(d_tilde, d_out=None, *, xp, heads=None, dtype=None, device=None)``;
    ``update(state, rows=None, grad_rows=None, *, mean=None, grad_diag=None)`` — give the input rows
    ``[R, d̃]`` or a precomputed batch ``mean`` (e.g. :func:`attention_weighted_mean`);
    ``refresh(state)`` debiases; ``apply(state, grad_mat)``; ``to_dense(state)`` returns the
    curvature ``D ⊗ (ââᵀ + λI)/s`` whose inverse ``apply`` multiplies with (s = λ for the reference
    scale, 1 for the inverse scale; D = I or diag(ẑ + λ)).
    """
    decay = alias_keyword(decay, 0.95, stat_decay, "decay", "stat_decay", "mac")
    check_damping(damping, "damping", "mac", pair=False)
    check_decay(decay, "decay", "mac")
    if scale not in MAC_SCALES:
        raise ValueError(f"mac: scale must be one of {MAC_SCALES}, got {scale!r}")
    check_flag(diagonal, "diagonal", "mac")
    if diag_reduction_factor is not None:
        check_damping(diag_reduction_factor, "diag_reduction_factor", "mac", pair=False)

    def init(d_tilde: int, d_out: int | None = None, *, xp: Any, heads: int | None = None,
             dtype: Any = None, device: Any = None) -> MacState:
        check_xp(xp, "mac.init")
        d_tilde = check_positive_int(d_tilde, "d_tilde", "mac.init")
        if d_out is not None:
            d_out = check_positive_int(d_out, "d_out", "mac.init")
        if heads is not None:
            heads = check_positive_int(heads, "heads", "mac.init")
        dtype = xp.float32 if dtype is None else stats_dtype(xp, dtype)
        shape = (d_tilde,) if heads is None else (heads, d_tilde)
        mean = ema_init(shape, xp=xp, dtype=dtype, device=device)
        diag = diag_hat = None
        if diagonal:
            if d_out is None:
                raise ValueError("mac(diagonal=True).init needs d_out")
            diag = ema_init((d_out,), xp=xp, dtype=dtype, device=device)
            diag_hat = xp.zeros((d_out,), dtype=dtype, device=device)
        return MacState(mean, xp.zeros(shape, dtype=dtype, device=device), diag, diag_hat)

    def update(state: MacState, rows: Array | None = None, grad_rows: Array | None = None, *,
               mean: Array | None = None, grad_diag: Array | None = None) -> MacState:
        _check_state(state, "mac.update")
        if (rows is None) == (mean is None):
            raise ValueError("mac.update: give exactly one of 'rows' or 'mean'")
        if mean is not None:
            xp = namespace(mean=mean, running=state.mean.value, where="mac.update", optional=())
            check_floating(xp, mean, "mean", "mac.update")
        batch = mean_activation(rows) if mean is None else mean
        if tuple(batch.shape) != tuple(state.mean.value.shape):
            raise ValueError(
                f"mac.update: batch mean of shape {shape_str(batch)} does not match the layer's "
                f"running mean of shape {shape_str(state.mean.value)}"
            )
        new = state._replace(mean=ema_update(state.mean, batch, decay=decay))
        if diagonal:
            if state.diag is None:
                raise ValueError(
                    "mac(diagonal=True).update: the state has no gradient diagonal; create it with "
                    "the init of the same mac(diagonal=True)"
                )
            if grad_diag is None:
                if grad_rows is None:
                    raise ValueError("mac(diagonal=True).update needs 'grad_rows' or 'grad_diag'")
                grad_diag = gradient_diagonal(grad_rows, reduction_factor=diag_reduction_factor)
            new = new._replace(diag=ema_update(state.diag, grad_diag, decay=decay))
        return new

    def refresh(state: MacState) -> MacState:
        _check_state(state, "mac.refresh")
        new = state._replace(mean_hat=ema_debiased(state.mean, decay=decay))
        if diagonal:
            new = new._replace(diag_hat=ema_debiased(state.diag, decay=decay))
        return new

    def apply(state: MacState, grad_mat: Array) -> Array:
        _check_state(state, "mac.apply")
        if state.first_inv is not None:
            return first_layer_apply(grad_mat, state.first_inv, damping, grad_diag=state.diag_hat)
        return mac_apply(grad_mat, state.mean_hat, damping, grad_diag=state.diag_hat, scale=scale)

    def to_dense(state: MacState, d_out: int) -> Array:
        return _mac_dense(state, d_out, damping, scale)

    return Preconditioner(init, update, refresh, apply, to_dense)


def first_layer_apply(grad_mat: Array, inverse: Array, damping: Any, *,
                      grad_diag: Array | None = None) -> Array:
    """The first layer's true inverse: ``Ĝ (A + λI)⁻¹`` with the fixed ``inverse`` ``[d̃, d̃]``,
    left-multiplied by SMAC's ``diag(1/(ẑ + λ))`` when ``grad_diag`` is given; computed in the
    inverse's dtype, returned in the gradient's."""
    where = "first_layer_apply"
    xp = namespace(grad_mat=grad_mat, inverse=inverse, grad_diag=grad_diag, where=where,
                   optional=("grad_diag",))
    check_floating(xp, grad_mat, "grad_mat", where)
    check_ndim(grad_mat, 2, "grad_mat", where)
    check_ndim(inverse, 2, "inverse", where)
    if tuple(inverse.shape) != (grad_mat.shape[1], grad_mat.shape[1]):
        raise ValueError(
            f"{where}: 'inverse' of shape {shape_str(inverse)} does not match 'grad_mat' of shape "
            f"{shape_str(grad_mat)} (expected [{grad_mat.shape[1]}, {grad_mat.shape[1]}])"
        )
    u = to_stats(xp, grad_mat, inverse.dtype) @ inverse
    if grad_diag is not None:
        z = to_stats(xp, grad_diag, u.dtype)
        u = u / xp.reshape(z + damping, (-1, 1))
    return u if u.dtype == grad_mat.dtype else xp.astype(u, grad_mat.dtype)


def _check_state(state: Any, where: str) -> None:
    if not isinstance(state, MacState):
        raise TypeError(f"{where}: state must be a maccore.MacState, got {type(state).__name__}")


def _mac_dense(state: MacState, d_out: int, damping: float, scale: str) -> Array:
    """Dense row-major curvature ``D ⊗ (ââᵀ + λI)/s`` (block-diagonal over heads)."""
    xp = namespace(mean_hat=state.mean_hat, where="mac.to_dense")
    a = state.mean_hat
    d_t = a.shape[-1]
    dev = device_of(a)
    s = damping if scale == "reference" else 1.0
    eye = xp.eye(d_t, dtype=a.dtype, device=dev)
    heads = 1 if a.ndim == 1 else a.shape[0]
    a2 = xp.reshape(a, (heads, d_t))
    rows_per = d_out // heads
    z = state.diag_hat
    n = d_out * d_t
    out = xp.zeros((n, n), dtype=a.dtype, device=dev)
    fixed = None if state.first_inv is None else xp.linalg.inv(state.first_inv)  # A + λI
    for r in range(d_out):
        h = r // rows_per
        ah = a2[h, :]
        block = (xp.reshape(ah, (d_t, 1)) * xp.reshape(ah, (1, d_t)) + damping * eye) / s
        if fixed is not None:
            block = xp.astype(fixed, a.dtype)
        if z is not None:
            block = block * (z[r] + damping)
        out = xpx.at(out, (slice(r * d_t, (r + 1) * d_t), slice(r * d_t, (r + 1) * d_t))).set(block)
    return out
