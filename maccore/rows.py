"""Canonical rows: layer inputs and output gradients as the matrices every method consumes.

Formats (docs/math.md; row-major everywhere):

- ``rows``: ``[R, d̃]`` input rows x̃ = [x, 1]; the bias entry (exactly 1) is the LAST column and is
  present only when the layer has a bias (d̃ = d_in + 1), else d̃ = d_in.
- ``grad_rows``: ``[R, d_out]`` autograd gradients of the loss w.r.t. the layer output rows.
- ``grad_mat``: ``[d_out, d̃]`` = [∇W reshaped to [d_out, -1] | ∇b]; conv weights flatten to
  ``[C_out, C_in·kh·kw]`` in (c, i, j) order with j fastest, which is the patch order of
  :func:`conv2d_rows`.

Expand vs reduce (docs/math.md): *expand* makes one row per application of the shared weight
(token, patch); *reduce* makes one row per sample: inputs are AVERAGED over the shared axes,
output gradients SUMMED over them (T17).
"""

from __future__ import annotations

import enum
import functools
import numbers
from dataclasses import dataclass
from typing import Any

import array_api_extra as xpx

from maccore._xp import (
    Array,
    check_dim,
    check_flag,
    check_floating,
    check_ndim,
    device_of,
    namespace,
    shape_str,
    stats_dtype,
)

__all__ = [
    "KFACType",
    "LayerKind",
    "ConvSpec",
    "QkvSpec",
    "LayerSpec",
    "linear_rows",
    "conv2d_rows",
    "conv2d_mean_patch",
    "conv2d_output_size",
    "grad_rows",
    "conv2d_grad_rows",
    "grad_matrix",
    "split_grad_matrix",
    "to_rows",
    "to_grad_rows",
    "normalize_padding",
]


class KFACType(str, enum.Enum):
    """How weight sharing is handled (docs/math.md)."""

    EXPAND = "expand"
    REDUCE = "reduce"


class LayerKind(str, enum.Enum):
    """The layer types the core turns into rows: ``LINEAR`` (any ``[..., d_in]`` input) and ``CONV2D``
    (NCHW input, im2col patches)."""

    LINEAR = "linear"
    CONV2D = "conv2d"


Padding = Any  # int | (ph, pw) | ((top, bottom), (left, right)) | "valid" | "same"


def _pair(v: Any, name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(
        isinstance(i, int) and not isinstance(i, bool) for i in v
    ):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def normalize_padding(
    padding: Padding, kernel_size: Any, stride: Any = 1, dilation: Any = 1
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Padding as ``((top, bottom), (left, right))``.

    Accepts an int, ``(ph, pw)``, explicit ``((top, bottom), (left, right))`` (asymmetric), ``"valid"``,
    or ``"same"`` (only for stride 1, as PyTorch; the extra pixel of an even kernel goes to the
    bottom/right, as in ``torch.nn.Conv2d(padding="same")``).
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0), (0, 0))
        if padding == "same":
            if (sh, sw) != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride {(sh, sw)}")
            out = []
            for k, d in ((kh, dh), (kw, dw)):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return (out[0], out[1])
        raise ValueError(f"padding must be an int, a pair, a pair of pairs, 'valid' or 'same'; got {padding!r}")
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(
        isinstance(p, (tuple, list)) for p in padding
    ):
        (t, b), (lf, r) = (_pair(padding[0], "padding[0]"), _pair(padding[1], "padding[1]"))
        pads = ((t, b), (lf, r))
    else:
        ph, pw = _pair(padding, "padding")
        pads = ((ph, ph), (pw, pw))
    if any(p < 0 for pair in pads for p in pair):
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return pads


def conv2d_output_size(
    hw: tuple[int, int], kernel_size: Any, *, stride: Any = 1, padding: Padding = 0, dilation: Any = 1
) -> tuple[int, int]:
    """Output spatial size ``(OH, OW)`` of a 2-D convolution."""
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    if min(kh, kw, sh, sw, dh, dw) < 1:
        raise ValueError(
            f"conv2d_output_size: kernel_size {(kh, kw)}, stride {(sh, sw)} and dilation "
            f"{(dh, dw)} must be >= 1"
        )
    if not (
        isinstance(hw, (tuple, list))
        and len(hw) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in hw)
    ):
        raise ValueError(f"conv2d_output_size: hw must be a pair of non-negative ints, got {hw!r}")
    (pt, pb), (pl, pr) = normalize_padding(padding, (kh, kw), (sh, sw), (dh, dw))
    oh = (hw[0] + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (hw[1] + pl + pr - dw * (kw - 1) - 1) // sw + 1
    return oh, ow


@dataclass(frozen=True)
class ConvSpec:
    """Static description of a Conv2d layer (NCHW input, OIHW weight)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: Any = 0
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    in_channels: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel_size", _pair(self.kernel_size, "kernel_size"))
        object.__setattr__(self, "stride", _pair(self.stride, "stride"))
        object.__setattr__(self, "dilation", _pair(self.dilation, "dilation"))
        object.__setattr__(
            self, "padding", normalize_padding(self.padding, self.kernel_size, self.stride, self.dilation)
        )
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"ConvSpec: groups must be >= 1, got {self.groups!r}")


@dataclass(frozen=True)
class QkvSpec:
    """A fused qkv projection: output layout (3, H, d_h) along the output features (docs/math.md).

    ``layout="v"``: the layer is the VALUE projection of an attention with separate q/k/v
    projections, output layout (H_kv, d_h): one factor (the attention-weighted mean), or with
    ``mode="per_head"`` one per value head; ``num_kv_heads`` (default ``num_heads``) is H_kv of
    grouped-query attention, whose value head g serves the query heads
    [g·H/H_kv, (g+1)·H/H_kv) (its factor is the mean of theirs).
    """

    num_heads: int
    mode: str = "reference"  # "reference" | "per_head" | "off"
    causal: bool = False
    layout: str = "qkv"  # "qkv" (fused (3, H, d_h)) | "v" (value projection alone, (H_kv, d_h))
    num_kv_heads: int | None = None  # layout "v": value heads H_kv (grouped-query attention)

    def __post_init__(self) -> None:
        n = self.num_heads
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"QkvSpec: num_heads must be >= 1, got {n!r}")
        if self.mode not in ("reference", "per_head", "off"):
            raise ValueError(f"QkvSpec.mode must be 'reference', 'per_head' or 'off', got {self.mode!r}")
        if self.layout not in ("qkv", "v"):
            raise ValueError(f"QkvSpec.layout must be 'qkv' or 'v', got {self.layout!r}")
        kv = self.num_kv_heads
        if kv is not None:
            if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or n % kv:
                raise ValueError(f"QkvSpec: num_kv_heads must be a positive divisor of num_heads={n}, "
                                 f"got {kv!r}")
            if self.layout == "qkv" and kv != n:
                raise ValueError(f"QkvSpec: num_kv_heads={kv} != num_heads={n} needs layout='v' "
                                 "(a fused (3, H, d_h) projection has as many K/V heads as Q heads)")

    @property
    def kv_heads(self) -> int:
        """H_kv: the number of value heads (``num_kv_heads``, default ``num_heads``)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads


@dataclass(frozen=True)
class LayerSpec:
    """What the core needs to know about one layer. Kinds are types, never name substrings."""

    kind: LayerKind
    d_in: int  # without the bias column (conv: C_in/groups · kh · kw, depthwise: kh · kw)
    d_out: int
    has_bias: bool
    conv: ConvSpec | None = None
    qkv: QkvSpec | None = None
    name: str = ""

    @property
    def d_tilde(self) -> int:
        return self.d_in + (1 if self.has_bias else 0)

    @property
    def depthwise(self) -> bool:
        return self.conv is not None and self.conv.groups > 1


def _append_ones(xp: Any, rows: Array) -> Array:
    ones = xp.ones((rows.shape[0], 1), dtype=rows.dtype, device=device_of(rows))
    return xp.concat([rows, ones], axis=1)


def linear_rows(x: Array, *, bias: bool, reduce: bool = False) -> Array:
    """Input rows of a linear layer.

    Args:
        x: ``[..., d_in]`` layer input (at least 1-D).
        bias: append the constant-1 column (last).
        reduce: KFAC-reduce rows: ``x`` is ``[N, S..., d_in]`` and each sample's rows are averaged
            over the shared axes ``S...`` (one row per sample).

    Returns:
        ``[R, d̃]`` with R = prod(leading dims) (expand) or N (reduce), same dtype as ``x``.
    """
    xp = namespace(x=x, where="linear_rows", optional=())
    check_floating(xp, x, "x", "linear_rows", integer_ok=True)
    check_flag(bias, "bias", "linear_rows"), check_flag(reduce, "reduce", "linear_rows")
    rows = _feature_rows(xp, x, "x", "linear_rows", "features", xp.mean if reduce else None)
    return _append_ones(xp, rows) if bias else rows


def grad_rows(g: Array, *, reduce: bool = False) -> Array:
    """Output-gradient rows of a linear layer: ``[..., d_out]`` → ``[R, d_out]``.

    ``reduce=True`` SUMS each sample's gradients over the shared axes (``g`` is ``[N, S..., d_out]``).
    """
    xp = namespace(g=g, where="grad_rows", optional=())
    check_floating(xp, g, "g", "grad_rows", integer_ok=True)
    check_flag(reduce, "reduce", "grad_rows")
    return _feature_rows(xp, g, "g", "grad_rows", "output features", xp.sum if reduce else None)


def _feature_rows(xp: Any, t: Array, arg: str, where: str, what: str, pool: Any) -> Array:
    """``[..., d]`` → ``[R, d]`` rows (a 1-D ``t`` is one row); with ``pool`` (``xp.mean`` or
    ``xp.sum``) a ``[N, S..., d]`` array is first pooled over its shared axes S → ``[N, d]``."""
    if t.ndim < 1:
        raise ValueError(f"{where}: argument '{arg}' must have at least 1 dimension, got shape {shape_str(t)}")
    d = t.shape[-1]
    if d == 0:
        raise ValueError(f"{where}: argument '{arg}' of shape {shape_str(t)} has no {what}")
    if t.ndim == 1:
        t = xp.reshape(t, (1, d))
    if pool is not None and t.ndim > 2:
        if any(s == 0 for s in t.shape):
            raise ValueError(f"{where}: argument '{arg}' of shape {shape_str(t)} is empty (reduce=True)")
        if not xp.isdtype(t.dtype, "real floating"):  # integer input: pool in float32
            t = xp.astype(t, xp.float32)
        t = pool(xp.reshape(t, (t.shape[0], -1, d)), axis=1)
    return xp.reshape(t, (-1, d))


def _check_conv_input(x: Array, where: str, name: str = "x") -> None:
    check_ndim(x, 4, name, where)
    if x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{where}: argument {name!r} of shape {shape_str(x)} has an empty C, H or W axis")


def _pad(xp: Any, x: Array, pads: tuple[tuple[int, int], tuple[int, int]]) -> Array:
    (pt, pb), (pl, pr) = pads
    if pt == pb == pl == pr == 0:
        return x
    width = [(0, 0)] * (x.ndim - 2) + [(pt, pb), (pl, pr)]
    return xpx.pad(x, tuple(width), mode="constant", constant_values=0, xp=xp)


# checked conv geometries, keyed on the input's spatial shape and the repr of the arguments (which
# tells 1 from True and 1.0): a layer's statistics on every collecting step check them once
_GEOMETRY: dict[tuple, tuple] = {}


def _conv_geometry(x: Array, kernel_size, stride, padding, dilation, where: str):
    _check_conv_input(x, where)
    key = (tuple(x.shape[2:]), repr((kernel_size, stride, padding, dilation)))
    hit = _GEOMETRY.get(key)
    if hit is None:
        hit = _check_geometry(x, kernel_size, stride, padding, dilation, where)
        if len(_GEOMETRY) >= 512:
            _GEOMETRY.clear()
        _GEOMETRY[key] = hit
    return hit


def _check_geometry(x: Array, kernel_size, stride, padding, dilation, where: str):
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    if min(kh, kw, sh, sw, dh, dw) < 1:
        raise ValueError(f"{where}: kernel_size, stride and dilation must be >= 1")
    pads = normalize_padding(padding, (kh, kw), (sh, sw), (dh, dw))
    oh, ow = conv2d_output_size(tuple(x.shape[2:]), (kh, kw), stride=(sh, sw), padding=pads, dilation=(dh, dw))
    if oh < 1 or ow < 1:
        raise ValueError(
            f"{where}: input of shape {shape_str(x)} is smaller than the dilated kernel "
            f"{(kh, kw)} (dilation {(dh, dw)}, padding {pads})"
        )
    return (kh, kw), (sh, sw), pads, (dh, dw), (oh, ow)


def _kernel_slices(xpad: Array, k, s, d, o):
    """Yield the strided views xpad[..., i*dh + sh*oh, j*dw + sw*ow] for every (i, j), j fastest."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = k, s, d, o
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw
            yield xpad[..., r0 : r0 + sh * (oh - 1) + 1 : sh, c0 : c0 + sw * (ow - 1) + 1 : sw]


def conv2d_rows(
    x: Array,
    kernel_size: Any,
    *,
    stride: Any = 1,
    padding: Padding = 0,
    dilation: Any = 1,
    bias: bool,
    reduce: bool = False,
    groups: int = 1,
) -> Array:
    """im2col rows of a Conv2d input (NCHW), zero padding included (docs/math.md, T6).

    Each row is one output location's receptive field flattened in (c, i, j) order, j fastest,
    matching ``weight.reshape(C_out, -1)``. ``groups == C_in`` (depthwise): every (n, c, p) is a row
    of length kh·kw shared by all channels (as the published MAC code). Other grouped convolutions
    are rejected. ``reduce=True`` averages the rows of each sample over the output locations.

    Returns:
        ``[N·OH·OW, C·kh·kw (+1)]`` (expand), ``[N·C·OH·OW, kh·kw (+1)]`` (depthwise) or
        ``[N, ·]`` (reduce).
    """
    where = "conv2d_rows"
    xp = namespace(x=x, where=where, optional=())
    check_floating(xp, x, "x", where, integer_ok=True)
    check_flag(bias, "bias", where)
    k, s, pads, d, o = _conv_geometry(x, kernel_size, stride, padding, dilation, where)
    check_flag(reduce, "reduce", where)
    n, c = x.shape[0], x.shape[1]
    if groups != 1 and groups != c:
        raise ValueError(
            f"{where}: grouped convolution with groups={groups} and {c} input channels is not "
            "supported (only groups=1 and depthwise groups=C_in)"
        )
    xpad = _pad(xp, x, pads)
    cols = xp.stack(list(_kernel_slices(xpad, k, s, d, o)), axis=2)  # [N, C, kh*kw, OH, OW]
    p = o[0] * o[1]
    kk = k[0] * k[1]
    if groups == c and groups != 1:
        cols = xp.reshape(cols, (n, c, kk, p))
        cols = xp.permute_dims(cols, (0, 1, 3, 2))  # [N, C, P, kk]
        if reduce:
            rows = xp.mean(xp.reshape(cols, (n, c * p, kk)), axis=1)
        else:
            rows = xp.reshape(cols, (n * c * p, kk))
    else:
        cols = xp.reshape(cols, (n, c * kk, p))
        if reduce:
            rows = xp.mean(cols, axis=2)
        else:
            rows = xp.reshape(xp.permute_dims(cols, (0, 2, 1)), (n * p, c * kk))
    return _append_ones(xp, rows) if bias else rows


def conv2d_mean_patch(
    x: Array,
    kernel_size: Any,
    *,
    stride: Any = 1,
    padding: Padding = 0,
    dilation: Any = 1,
    bias: bool,
    groups: int = 1,
) -> Array:
    """``mean(conv2d_rows(x, ...), axis=0)`` without materialising the patches.

    The batch is summed first (one ``[C, H, W]`` buffer); the sum over the output locations of
    kernel tap (i, j) is then ``R[i] · xs[c] · Kᵀ[:, j]`` with 0/1 selectors ``R`` ``[kh, H]``
    and ``K`` ``[kw, W]`` marking the input rows and columns that tap reads (padding reads
    zeros: it selects nothing), so two small matrix products give every tap of every channel:
    extra memory O(C·H·W) instead of O(N·P·C·kh·kw). Result in the statistics dtype (float32,
    or float64 for float64 input).
    """
    where = "conv2d_mean_patch"
    xp = namespace(x=x, where=where, optional=())
    check_floating(xp, x, "x", where, integer_ok=True)
    check_flag(bias, "bias", where)
    k, s, pads, d, o = _conv_geometry(x, kernel_size, stride, padding, dilation, where)
    n, c = x.shape[0], x.shape[1]
    if n == 0:
        raise ValueError(f"{where}: 'x' of shape {shape_str(x)} has no samples (batch size 0)")
    if groups != 1 and groups != c:
        raise ValueError(
            f"{where}: grouped convolution with groups={groups} and {c} input channels is not supported"
        )
    sdt = stats_dtype(xp, x.dtype)
    dev = device_of(x)
    xs = xp.sum(x, axis=0, dtype=sdt)  # [C, H, W]
    (h, w), (pt, _), (pl, _) = x.shape[2:], *pads
    rows = xp.asarray(_tap_selector(k[0], s[0], d[0], pt, h, o[0]), dtype=sdt, device=dev)
    cols = xp.asarray(_tap_selector(k[1], s[1], d[1], pl, w, o[1]), dtype=sdt, device=dev)
    sums = xp.matmul(xp.matmul(rows, xs), xp.matrix_transpose(cols))  # [C, kh, kw]
    sums = xp.reshape(sums, (c, k[0] * k[1]))
    denom = n * o[0] * o[1]
    if groups == c and groups != 1:
        mean = xp.sum(sums, axis=0) / (denom * c)
    else:
        mean = xp.reshape(sums, (-1,)) / denom
    if bias:
        mean = xp.concat([mean, xp.ones((1,), dtype=sdt, device=device_of(mean))])
    return mean


@functools.lru_cache(maxsize=256)
def _tap_selector(k: int, s: int, d: int, pad: int, n_in: int, n_out: int) -> tuple:
    """``[k][n_in]`` 0/1 (nested tuples): entry (i, t) is 1 when kernel tap i of some output
    position reads input position t (t = i·d − pad + s·q for q < ``n_out``; positions in the
    padding are not inputs)."""
    out = []
    for i in range(k):
        row = [0.0] * n_in
        for q in range(n_out):
            t = i * d - pad + s * q
            if 0 <= t < n_in:
                row[t] = 1.0
        out.append(tuple(row))
    return tuple(out)


def conv2d_grad_rows(g: Array, *, reduce: bool = False) -> Array:
    """Output-gradient rows of a Conv2d: ``[N, C_out, OH, OW]`` → ``[N·OH·OW, C_out]``.

    ``reduce=True`` sums over the output locations → ``[N, C_out]``.
    """
    xp = namespace(g=g, where="conv2d_grad_rows", optional=())
    check_floating(xp, g, "g", "conv2d_grad_rows", integer_ok=True)
    check_flag(reduce, "reduce", "conv2d_grad_rows")
    _check_conv_input(g, "conv2d_grad_rows", "g")
    n, c = g.shape[0], g.shape[1]
    if n == 0:
        raise ValueError(f"conv2d_grad_rows: 'g' of shape {shape_str(g)} has no samples (batch size 0)")
    if reduce:
        return xp.sum(xp.reshape(g, (n, c, -1)), axis=2)
    return xp.reshape(xp.permute_dims(xp.reshape(g, (n, c, -1)), (0, 2, 1)), (-1, c))


def grad_matrix(grad_weight: Array, grad_bias: Array | None = None) -> Array:
    """``[d_out, d̃]`` gradient matrix ``[∇W.reshape(d_out, -1) | ∇b]`` (bias last)."""
    xp = namespace(
        grad_weight=grad_weight, grad_bias=grad_bias, where="grad_matrix", optional=("grad_bias",)
    )
    check_floating(xp, grad_weight, "grad_weight", "grad_matrix")
    if grad_weight.ndim < 2:
        raise ValueError(
            f"grad_matrix: argument 'grad_weight' must have at least 2 dimensions, got shape "
            f"{shape_str(grad_weight)}"
        )
    if any(s == 0 for s in grad_weight.shape):
        raise ValueError(f"grad_matrix: argument 'grad_weight' of shape {shape_str(grad_weight)} is empty")
    d_out = grad_weight.shape[0]
    mat = xp.reshape(grad_weight, (d_out, -1))
    if grad_bias is None:
        return mat
    if tuple(grad_bias.shape) != (d_out,):
        raise ValueError(
            f"grad_matrix: 'grad_bias' of shape {shape_str(grad_bias)} does not match "
            f"'grad_weight' of shape {shape_str(grad_weight)} (expected [{d_out}])"
        )
    if grad_bias.dtype != mat.dtype:
        raise TypeError(
            f"grad_matrix: dtypes of 'grad_weight' ({mat.dtype}) and 'grad_bias' "
            f"({grad_bias.dtype}) differ"
        )
    return xp.concat([mat, xp.reshape(grad_bias, (d_out, 1))], axis=1)


def split_grad_matrix(mat: Array, weight_shape: tuple[int, ...], *, bias: bool) -> tuple[Array, Array | None]:
    """Inverse of :func:`grad_matrix`: ``(grad_weight [weight_shape], grad_bias [d_out] or None)``."""
    xp = namespace(mat=mat, where="split_grad_matrix", optional=())
    check_floating(xp, mat, "mat", "split_grad_matrix")
    check_ndim(mat, 2, "mat", "split_grad_matrix")
    check_flag(bias, "bias", "split_grad_matrix")
    if not (
        isinstance(weight_shape, (tuple, list))
        and len(weight_shape) >= 2
        and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1
                for s in weight_shape)
    ):
        raise ValueError(
            "split_grad_matrix: weight_shape must be a tuple of at least 2 positive ints, got "
            f"{weight_shape!r}"
        )
    weight_shape = tuple(int(s) for s in weight_shape)
    d_out = weight_shape[0]
    d_w = 1
    for s in weight_shape[1:]:
        d_w *= s
    expected = (d_out, d_w + (1 if bias else 0))
    if tuple(mat.shape) != expected:
        raise ValueError(
            f"split_grad_matrix: 'mat' of shape {shape_str(mat)} does not match weight shape "
            f"{list(weight_shape)} with bias={bias} (expected {list(expected)})"
        )
    w = xp.reshape(mat[:, :d_w], weight_shape)
    b = mat[:, d_w] if bias else None
    return w, b


def _check_spec(spec: Any, where: str) -> None:
    if not isinstance(spec, LayerSpec):
        raise TypeError(f"{where}: spec must be a maccore.LayerSpec, got {type(spec).__name__}")
    if spec.kind is LayerKind.CONV2D and not isinstance(spec.conv, ConvSpec):
        raise ValueError(f"{where}: conv2d layer {spec.name!r} has no ConvSpec (spec.conv is None)")


def to_rows(spec: LayerSpec, x: Array, *, reduce: bool = False) -> Array:
    """Input rows of the layer described by ``spec`` (dispatch on its kind)."""
    _check_spec(spec, "to_rows")
    namespace(x=x, where=f"to_rows ({spec.name or spec.kind.value})", optional=())
    if spec.kind is LayerKind.LINEAR:
        check_dim(x.shape[-1] if x.ndim else -1, spec.d_in, "input feature size", spec.name or "linear layer",
                  f"input shape {shape_str(x)}")
        return linear_rows(x, bias=spec.has_bias, reduce=reduce)
    if spec.kind is LayerKind.CONV2D:
        cs = spec.conv
        rows = conv2d_rows(x, cs.kernel_size, stride=cs.stride, padding=cs.padding, dilation=cs.dilation,
                           bias=spec.has_bias, reduce=reduce, groups=cs.groups)
        check_dim(rows.shape[1], spec.d_tilde, "patch size", spec.name or "conv2d layer",
                  f"input shape {shape_str(x)}")
        return rows
    raise ValueError(f"unsupported layer kind {spec.kind!r}; supported: {[k.value for k in LayerKind]}")


def to_grad_rows(spec: LayerSpec, g: Array, *, reduce: bool = False) -> Array:
    """Output-gradient rows of the layer described by ``spec``."""
    _check_spec(spec, "to_grad_rows")
    namespace(g=g, where=f"to_grad_rows ({spec.name or spec.kind.value})", optional=())
    if spec.kind is LayerKind.LINEAR:
        return grad_rows(g, reduce=reduce)
    if spec.kind is LayerKind.CONV2D:
        return conv2d_grad_rows(g, reduce=reduce)
    raise ValueError(f"unsupported layer kind {spec.kind!r}")
