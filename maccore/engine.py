"""The per-layer curvature engine, written once for every adapter.

A training step of a curvature method, for one layer, is always the same five moves:

1. **capture** — on steps where the schedule collects statistics, the adapter hands the layer's
   input ``x`` (and, for fused attention projections, the attention probabilities) to
   :attr:`CurvatureMethod.input_statistics`, and its output gradient ``g`` to
   :attr:`CurvatureMethod.grad_statistics`; each returns ``{key: Stat}``;
2. **pool** — micro-batches of one step (gradient accumulation) are pooled with :func:`pool_stats`
   (row-weighted means, or sums of loss terms), so they equal one big batch;
3. **finalize** — :attr:`CurvatureMethod.finalize` turns the pooled sums into statistics (the
   reduction factor of the loss, :func:`reduction_factor`) and returns ``{key: (value, weight)}``;
   an adapter that averages across devices takes the ``weight``-weighted mean of the values;
4. **update / refresh** — :func:`schedule` says whether this step folds the statistics into the
   running averages (``update``) and rebuilds the cache that ``apply`` reads (``refresh``);
5. **apply** — every step, the gradient matrix ``[d_out, d̃]`` (bias column last) is
   preconditioned (``apply``; ``apply_split`` for weight and bias gradients held separately,
   optionally in place).

Everything here is a pure function over arrays of any Array-API namespace plus the small
NamedTuple states of :mod:`maccore.mac`, :mod:`maccore.kfac` and :mod:`maccore.singd`; the adapters
(``maccore_torch``, ``maccore_jax``) only discover layers, capture arrays and move gradients.
Non-finite statistics are caught by :func:`all_finite` before anything is folded, so a bad batch
never reaches the running averages.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable, Mapping, NamedTuple

from maccore import _delegate
from maccore._xp import (
    Array,
    check_damping,
    check_flag,
    device_of,
    is_due,
    namespace,
    shape_str,
)
from maccore.kfac import KfacState, damped_inverse, gradient_factor, input_factor, kfac
from maccore.mac import (
    MAC_SCALES,
    MacState,
    attention_weighted_mean,
    gradient_diagonal,
    mac,
    mac_apply_trusted,
    mac_inplace_torch,
    mean_activation,
)
from maccore.rows import (
    KFACType,
    LayerKind,
    LayerSpec,
    conv2d_mean_patch,
    conv2d_output_size,
    grad_matrix,
    split_grad_matrix,
    to_grad_rows,
    to_rows,
)
from maccore.singd import (
    singd,
    singd_grad_statistics,
    singd_input_statistics,
)

__all__ = [
    "LOSS_AVERAGES",
    "CurvatureMethod",
    "Stat",
    "all_finite",
    "apply_gain_bound",
    "apply_split",
    "data_parallel_grad_scale",
    "first_layer_inverse",
    "kfac_method",
    "loss_terms",
    "mac_method",
    "mean_rows",
    "num_rows",
    "pool",
    "pool_stats",
    "qkv_mean",
    "reduction_factor",
    "schedule",
    "singd_method",
    "with_first_layer",
]

LOSS_AVERAGES = (None, "batch", "batch+sequence")


# ---------------------------------------------------------------------------------------------
# statistics of one step: capture, pooling, reduction factor


class Stat(NamedTuple):
    """One captured statistic of one layer.

    ``kind="mean"``: ``value`` is a mean over ``weight`` rows (pooled as a weighted mean);
    ``kind="sum"``: ``value`` is a sum over ``weight`` loss terms (pooled by adding both).
    """

    value: Array
    weight: float
    kind: str


def pool(acc: Stat | None, new: Stat) -> Stat:
    """``acc`` and ``new`` pooled into one statistic (the statistic of the concatenated batches)."""
    if new.kind not in ("mean", "sum"):
        raise ValueError(f"pool: kind must be 'mean' or 'sum', got {new.kind!r}")
    if acc is None:
        return Stat(new.value, float(new.weight), new.kind)
    if acc.kind != new.kind:
        raise ValueError(f"pool: cannot pool a {acc.kind!r} statistic with a {new.kind!r} one")
    if tuple(acc.value.shape) != tuple(new.value.shape):
        raise ValueError(
            f"pool: statistics of shapes {shape_str(acc.value)} and {shape_str(new.value)} differ"
        )
    total = float(acc.weight) + float(new.weight)
    if new.kind == "sum":
        return Stat(acc.value + new.value, total, "sum")
    if total == 0:
        return acc
    return Stat(acc.value + (new.value - acc.value) * (float(new.weight) / total), total, "mean")


def pool_stats(acc: Mapping[str, Stat], new: Mapping[str, Stat]) -> dict[str, Stat]:
    """Pool every key of ``new`` into ``acc`` (a new dict; neither input is changed)."""
    out = dict(acc)
    for key, stat in new.items():
        out[key] = pool(out.get(key), stat)
    return out


def num_rows(spec: LayerSpec, x: Array) -> int:
    """Rows behind one input ``x`` of the layer (tokens; conv: output locations, × channels for
    depthwise layers)."""
    if spec.kind is LayerKind.CONV2D:
        cs = spec.conv
        x4 = x.shape if len(x.shape) == 4 else (1, *x.shape)
        oh, ow = conv2d_output_size(tuple(x4[-2:]), cs.kernel_size, stride=cs.stride,
                                    padding=cs.padding, dilation=cs.dilation)
        n = x4[0] * oh * ow
        return n * x4[1] if spec.depthwise else n
    return max(1, math.prod(x.shape[:-1]))


def mean_rows(spec: LayerSpec, x: Array) -> Array:
    """ā = E_rows[x̃] of a layer input (conv: :func:`maccore.conv2d_mean_patch`, no im2col
    materialised), ``[d̃]`` in the statistics dtype."""
    if spec.kind is LayerKind.CONV2D:
        cs = spec.conv
        return conv2d_mean_patch(x, cs.kernel_size, stride=cs.stride, padding=cs.padding,
                                 dilation=cs.dilation, bias=spec.has_bias, groups=cs.groups)
    xp = namespace(x=x, where=f"layer {spec.name!r}")
    if x.ndim < 1 or x.shape[-1] != spec.d_in:
        raise ValueError(
            f"layer {spec.name!r}: input of shape {shape_str(x)} does not have {spec.d_in} features "
            "in its last axis"
        )
    mean = mean_activation(xp.reshape(x, (-1, spec.d_in)))
    if not spec.has_bias:
        return mean
    return xp.concat([mean, xp.ones((1,), dtype=mean.dtype, device=device_of(mean))])


def loss_terms(spec: LayerSpec, g_shape: tuple[int, ...], loss_average: str | None) -> int:
    """Loss terms behind one output gradient of shape ``g_shape``: the batch size, or for
    ``loss_average="batch+sequence"`` every position (batch × sequence / spatial)."""
    if loss_average not in LOSS_AVERAGES:
        raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {loss_average!r}")
    shape = tuple(g_shape)
    if loss_average == "batch+sequence":
        channels = shape[1] if spec.kind is LayerKind.CONV2D else shape[-1]
        return math.prod(shape) // max(1, channels)
    return shape[0] if len(shape) >= 2 else 1


def _reduction_factor(terms: float, *, loss_average: str | None,
                      reduction_factor: float | None = None) -> float:
    """The R of a loss ``L = R·Σ terms`` (MAC/KFAC/SINGD divide gradient statistics by it): the
    given ``reduction_factor``; else 1 for a summed loss (``loss_average=None``); else ``1/terms``
    for a loss averaged over its ``terms`` terms."""
    if reduction_factor is not None:
        check_damping(reduction_factor, "reduction_factor", "reduction_factor", pair=False)
        if isinstance(reduction_factor, numbers.Real):
            return float(reduction_factor)
        return reduction_factor  # a 0-d array, e.g. traced under jax.jit: used as it is
    if loss_average not in LOSS_AVERAGES:
        raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {loss_average!r}")
    if loss_average is None:
        return 1.0
    if not terms > 0:
        raise ValueError(f"reduction_factor: no loss terms were seen (terms={terms!r})")
    return 1.0 / float(terms)


reduction_factor = _reduction_factor


def schedule(count: Any, *, t_cov: Any, t_inv: Any) -> tuple[Any, Any]:
    """``(collect, refresh)`` for the step with ``count`` completed steps: statistics are folded
    when ``count % t_cov == 0`` and caches rebuilt when ``count % t_inv == 0`` (both at 0). Works
    on Python ints and on traced 0-d arrays (the adapter branches with ``lax.cond`` there); the
    periods may be 0-d integer arrays too (``optax.inject_hyperparams``), then both predicates are
    array arithmetic (:func:`maccore.is_due`)."""
    return is_due(count, t_cov), is_due(count, t_inv)


def all_finite(arrays: Any) -> Any:
    """Whether every floating entry of ``arrays`` (an iterable of arrays, ``None`` skipped) is finite,
    as a 0-d boolean array of the first array's namespace (``True`` for none). One reduction per
    array, combined once: the adapter syncs at most once per step."""
    arrs = [a for a in arrays if a is not None]
    if not arrs:
        return True
    xp = namespace(array=arrs[0], where="all_finite")
    flags = [xp.all(xp.isfinite(a)) for a in arrs
             if xp.isdtype(a.dtype, ("real floating", "complex floating"))]
    if not flags:
        return xp.asarray(True, device=device_of(arrs[0]))
    return xp.all(xp.stack([xp.asarray(f, device=device_of(flags[0])) for f in flags]))


def first_layer_inverse(moment: Array, damping: Any, *, name: str = "first layer") -> Array:
    """``(A + λI)⁻¹`` of the first layer's input second moment ``A = E_rows[x̃x̃ᵀ]`` (the mean of the
    per-batch :func:`maccore.input_factor` over the fitting batches): the true inverse the
    published ResNet/ViT runs use for the first layer (:func:`with_first_layer`)."""
    return damped_inverse(moment, damping, name=f"{name} input covariance")


def with_first_layer(state: MacState, inverse: Array) -> MacState:
    """``state`` with its first-layer inverse fixed (``apply`` multiplies by ``inverse``)."""
    if not isinstance(state, MacState):
        raise TypeError(
            f"with_first_layer: the first-layer inverse is a MAC feature; state must be a "
            f"maccore.MacState, got {type(state).__name__}"
        )
    d = state.mean.value.shape[-1]
    if tuple(inverse.shape) != (d, d):
        raise ValueError(
            f"with_first_layer: inverse of shape {shape_str(inverse)} does not match the layer's "
            f"d̃ = {d} (expected [{d}, {d}])"
        )
    if state.mean.value.ndim != 1:
        raise ValueError("with_first_layer: not for fused attention projections (per-head factors)")
    return state._replace(first_inv=inverse)


def _stats_dtype(xp: Any, dtype: Any) -> Any:
    return xp.float64 if dtype == xp.float64 else xp.float32


def _known_zero(count: Any) -> bool:
    """``count == 0`` where it can be known without tracing (eager arrays, ints)."""
    try:
        return bool(count == 0)
    except Exception:  # traced (jax.jit): unknown; the adapters never refresh an unseen layer
        return False


# ---------------------------------------------------------------------------------------------
# the method protocol


class CurvatureMethod(NamedTuple):
    """A per-layer curvature method with fixed signatures (MAC/SMAC, KFAC, SINGD implement it).

    - ``init(spec, *, xp, dtype=None, device=None) -> state``: ``spec`` a :class:`maccore.LayerSpec`;
      ``dtype`` the parameter dtype (statistics are kept in at least float32).
    - ``input_statistics(spec, state, x, *, attn=None, key=None, value=None) -> {key: Stat}``: one
      forward's statistics from the layer input ``x``; fused qkv layers (``spec.qkv``) also take
      the attention probabilities ``attn [B, H, N, N]``, or for cross-attention the ``key`` and
      ``value`` inputs of the projection's K and V blocks.
    - ``grad_statistics(spec, state, g, *, grad_scale=1.0) -> {key: Stat}``: one backward's
      statistics from the output gradient ``g`` (divided by ``grad_scale``, the loss scale of
      mixed precision).
    - ``finalize(spec, state, pooled, *, reduction_factor=None) -> {key: (value, weight)}``:
      pooled statistics of one step → what ``update`` takes; devices average values by weight.
    - ``update(spec, state, stats, *, lr_cov=None) -> state``: fold one step's statistics (needs
      every key of ``keys(spec, state)``; otherwise the state is returned unchanged).
    - ``refresh(spec, state, *, checked=True) -> state``: rebuild the cache ``apply`` reads;
      ``checked=False``: read nothing on the host (no device synchronisation) — what does not
      invert comes out non-finite instead of being retried or raising (KFAC; the others read
      nothing either way).
    - ``apply(spec, state, grad_mat) -> grad_mat``: ``[d_out, d̃]``, bias column last.
    - ``curvature_dense(spec, state)``: the damped curvature whose inverse ``apply`` multiplies
      with; ``preconditioner_dense(spec, state)``: the matrix ``P`` with
      ``vec_r(apply(G)) = P vec_r(G)`` (row-major vec; verification at small sizes).
    - ``keys(spec, state)``, ``wants_input(spec, state)``, ``wants_grads(spec)``,
      ``wants_attention(spec)``: what the adapter has to capture for this layer.
    - ``templates(spec, state) -> {key: array}``: an array of each finalized statistic's shape and
      dtype (what a device that saw no batch of this layer contributes, with weight 0).
    - ``hyperparameters``: the method's settings by keyword.
    - ``grad_stats_scale_with_loss`` (default ``False``): whether ``grad_statistics`` is a plain
      statistic of the output-gradient rows that no reduction factor renormalises (SMAC's
      published E_rows[g⊙g]), so that it scales with the square of the loss's normalisation.
      KFAC's G and SINGD's H_C are divided by the reduction factor of the local batch, which
      cancels the normalisation: they are the same whatever the loss's normalisation. Under data
      parallelism (each of W ranks takes the mean loss of its rows, the gradients are averaged
      over the ranks) the effective loss is the global mean, whose output gradient is the rank's
      ``g / W``: a method with this flag must see its rows divided by W to match one process on
      the concatenated batch. Adapters pass ``grad_scale=``:func:`data_parallel_grad_scale`.
    - ``refresh_can_fail`` (default ``False``): whether ``refresh(..., checked=False)`` can leave
      a non-finite cache that a checked refresh would repair or report (KFAC's inverses and
      eigendecompositions: the float64 retry, :class:`maccore.DecompositionError`). Adapters that
      check a step read such caches once after an unchecked refresh and redo the failures.
    """

    name: str
    init: Callable[..., Any]
    input_statistics: Callable[..., dict]
    grad_statistics: Callable[..., dict]
    finalize: Callable[..., dict]
    update: Callable[..., Any]
    refresh: Callable[..., Any]
    apply: Callable[..., Any]
    curvature_dense: Callable[..., Any]
    preconditioner_dense: Callable[..., Any]
    keys: Callable[..., tuple]
    wants_input: Callable[..., bool]
    wants_grads: Callable[..., bool]
    wants_attention: Callable[..., bool]
    templates: Callable[..., dict]
    hyperparameters: Mapping[str, Any]
    grad_stats_scale_with_loss: bool = False
    refresh_can_fail: bool = False


def data_parallel_grad_scale(method: CurvatureMethod, world_size: Any,
                             grad_scale: Any = 1.0) -> Any:
    """The ``grad_scale`` an adapter passes to ``method.grad_statistics`` on one of
    ``world_size`` data-parallel ranks (devices of a mapped axis) whose gradients are averaged
    across the ranks, each rank's loss normalised by its own rows (the usual convention of DDP,
    FSDP and ``lax.pmean``); ``grad_scale`` is the loss scale of mixed precision (1.0 without).

    The loss each rank backpropagates is ``world_size`` times its share of the effective
    (global-mean) loss, so for a method whose gradient statistic is not renormalised by the
    batch size (:attr:`CurvatureMethod.grad_stats_scale_with_loss`, SMAC) the rows are divided by
    ``world_size`` as well: ``grad_scale · world_size``. For the other methods ``grad_scale`` is
    returned unchanged (their statistics are invariant). ``world_size`` is a positive int (or a
    concrete integer array, e.g. ``jax.lax.psum(1, axis_name)``); 1 outside data parallelism.
    """
    if not method.grad_stats_scale_with_loss:
        return grad_scale
    try:
        if isinstance(world_size, bool):
            raise TypeError
        world_size = operator.index(world_size)  # ints, NumPy integers, concrete 0-d int arrays
    except TypeError:
        raise TypeError(f"data_parallel_grad_scale: world_size must be a positive integer "
                        f"(a concrete value), got {world_size!r}") from None
    if world_size < 1:
        raise ValueError(f"data_parallel_grad_scale: world_size must be >= 1, got {world_size}")
    return grad_scale if world_size == 1 else grad_scale * world_size


def _mean_stats(pooled: Mapping[str, Stat]) -> dict[str, tuple[Array, float]]:
    return {k: (s.value, s.weight) for k, s in pooled.items()}


def _dense_inverse(m: Array) -> Array:
    xp = namespace(m=m, where="preconditioner_dense")
    return xp.linalg.inv(m)


def apply_split(method: CurvatureMethod, spec: LayerSpec, state: Any, grad_weight: Array,
                grad_bias: Array | None, *, inplace: bool = False) -> tuple[Array, Array | None]:
    """``method.apply`` on weight and bias gradients held separately (weight of any rank:
    flattened to ``[d_out, d_in]``), returned in their shapes. ``inplace=True`` (NumPy, CuPy,
    torch) writes the result into the given arrays; MAC does so on its fast paths without
    forming the gradient matrix."""
    mac = method.name in ("mac", "smac") and isinstance(state, MacState) and state.first_inv is None
    if (mac and inplace and (grad_bias is not None or not spec.has_bias)
            and mac_inplace_torch(grad_weight, grad_bias, state.mean_hat, state.diag_hat,
                                  method.hyperparameters["damping"], method.hyperparameters["scale"])):
        return grad_weight, grad_bias  # torch: the layer's prepared kernel, written in place
    xp = namespace(grad_weight=grad_weight, grad_bias=grad_bias, where="apply_split",
                   optional=("grad_bias",))
    wshape = tuple(grad_weight.shape)
    if spec.has_bias and grad_bias is None:
        grad_bias = xp.zeros((wshape[0],), dtype=grad_weight.dtype, device=device_of(grad_weight))
    if mac:
        w2 = xp.reshape(grad_weight, (wshape[0], -1))
        cfg = method.hyperparameters
        out = None
        if inplace and _delegate.shares_memory(xp, w2, grad_weight):
            out = w2 if grad_bias is None else (w2, grad_bias)  # written in place by the kernel
        res = mac_apply_trusted(w2, state.mean_hat, cfg["damping"], state.diag_hat,
                                cfg["scale"], grad_bias, out)
        w, b = (res, None) if grad_bias is None else res
        if out is not None:
            return grad_weight, grad_bias
        w = xp.reshape(w, wshape)
        if inplace:
            return _write(xp, grad_weight, grad_bias, w, b)
        return w, b
    mat = grad_matrix(grad_weight, grad_bias)
    w, b = split_grad_matrix(method.apply(spec, state, mat), wshape, bias=grad_bias is not None)
    return _write(xp, grad_weight, grad_bias, w, b) if inplace else (w, b)


def apply_gain_bound(method: CurvatureMethod, spec: LayerSpec, state: Any) -> float | None:
    """A bound κ on the entrywise growth of ``method.apply`` for the layer: every entry of the
    preconditioned gradient (weight and bias, as :func:`apply_split` writes them) is at most
    κ · max|G̃| for every finite ``state``, whatever its values; ``None`` where no bound is known
    without reading the state (KFAC, SINGD, SMAC — its row scale 1/(ẑ + λ) reads ẑ —, MAC's fixed
    first-layer inverse). A caller that knows max|G̃| can then bound the preconditioned gradient
    without reading it.

    MAC (rank-1 form): ĝ_ij = r·(G̃_ij − v_i·a_j / (λ + aᵀa)) with v = G̃a, so
    |ĝ_ij| ≤ r·max|G̃|·(1 + ‖a‖₁‖a‖∞ / ‖a‖₂²) ≤ r·max|G̃|·(1 + √d̃) (‖a‖₁ ≤ √d̃‖a‖₂,
    ‖a‖∞ ≤ ‖a‖₂; per head alike), r = 1 (``scale="reference"``) or 1/λ (``"inverse"``). Doubled
    for rounding (the products are accumulated in the statistics dtype, at least float32)."""
    if method.name != "mac" or not isinstance(state, MacState) or state.first_inv is not None:
        return None
    cfg = method.hyperparameters
    rows = 1.0 if cfg["scale"] == "reference" else 1.0 / float(cfg["damping"])
    return 2.0 * rows * (1.0 + math.sqrt(spec.d_tilde))


def _write(xp: Any, grad_weight: Array, grad_bias: Array | None, w: Array, b: Array | None
           ) -> tuple[Array, Array | None]:
    _delegate.write_into(xp, grad_weight, w)
    if b is not None:
        _delegate.write_into(xp, grad_bias, b)
    return grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# MAC / SMAC


def _qkv_heads(spec: LayerSpec) -> int | None:
    """Row-block factors of a fused (3, H, d_h) projection: 3 (Q, K, V), or 3H per head; of a
    value projection (layout ``"v"``): one factor ``[d̃]``, or H_kv per head."""
    if spec.qkv is None:
        return None
    if spec.qkv.layout == "v":
        return spec.qkv.kv_heads if spec.qkv.mode == "per_head" else None
    return 3 * spec.qkv.num_heads if spec.qkv.mode == "per_head" else 3


def _stack_qkv(xp: Any, aq: Array, ak: Array, v: Array, spec: LayerSpec) -> Array:
    """Row-block means of a (3, H, d_h) projection: ``[3, d̃]``, or ``[3H, d̃]`` per head."""
    if spec.qkv.mode != "per_head":
        return xp.stack([aq, ak, v])
    h = spec.qkv.num_heads
    d = aq.shape[-1]

    def rep(m: Array) -> Array:
        return m if m.ndim == 2 else xp.broadcast_to(xp.reshape(m, (1, d)), (h, d))

    return xp.concat([rep(aq), rep(ak), rep(v)], axis=0)


def qkv_mean(spec: LayerSpec, x: Array, *, attn: Array | None = None, key: Array | None = None,
             value: Array | None = None) -> Array:
    """MAC's row-block means of a fused qkv projection (``spec.qkv``): Q and K rows use ā, V rows
    the attention-weighted mean (:func:`maccore.attention_weighted_mean` of ``attn``; mode
    ``"off"``: ā); for cross-attention (``key``/``value`` given) each block the plain mean of its
    own input. A value projection alone (layout ``"v"``) gets only the V mean (``[d̃]``, or per
    value head ``[H_kv, d̃]``: the mean of the per-head means of its query-head group)."""
    xp = namespace(x=x, where=f"layer {spec.name!r}")
    if spec.qkv.layout == "v":
        return _value_mean(xp, spec, x, attn=attn, key=key, value=value)
    aq = mean_rows(spec, x)
    if key is not None or value is not None:
        if key is None or value is None:
            raise ValueError(f"layer {spec.name!r}: cross-attention needs both key and value")
        return _stack_qkv(xp, aq, mean_rows(spec, key), mean_rows(spec, value), spec)
    if spec.qkv.mode == "off":
        return _stack_qkv(xp, aq, aq, aq, spec)
    if x.ndim != 3:
        raise ValueError(
            f"layer {spec.name!r}: a fused qkv projection needs input [B, N, d], got {shape_str(x)}"
        )
    if attn is None:
        raise ValueError(f"layer {spec.name!r}: attention-aware MAC needs the attention probabilities")
    v = attention_weighted_mean(x, attn, bias=spec.has_bias, mode=spec.qkv.mode)
    return _stack_qkv(xp, aq, aq, v, spec)


def _value_mean(xp: Any, spec: LayerSpec, x: Array, *, attn: Array | None, key: Array | None,
                value: Array | None) -> Array:
    """:func:`qkv_mean` of a value projection alone (``spec.qkv.layout == "v"``)."""
    where = f"layer {spec.name!r}"
    if key is not None or value is not None:
        raise ValueError(f"{where}: a value projection takes its own input only (no key/value)")
    if spec.qkv.mode == "off":
        return mean_rows(spec, x)
    if x.ndim != 3:
        raise ValueError(f"{where}: a value projection needs input [B, N, d], got {shape_str(x)}")
    if attn is None:
        raise ValueError(f"{where}: attention-aware MAC needs the attention probabilities")
    h, hkv = spec.qkv.num_heads, spec.qkv.kv_heads
    if attn.ndim != 4 or attn.shape[1] != h:
        raise ValueError(f"{where}: attention probabilities {shape_str(attn)} do not have "
                         f"num_heads={h} heads ([B, H, N, N])")
    v = attention_weighted_mean(x, attn, bias=spec.has_bias, mode=spec.qkv.mode)
    if spec.qkv.mode == "per_head" and hkv != h:  # grouped-query attention: mean per group
        v = xp.mean(xp.reshape(v, (hkv, h // hkv, v.shape[-1])), axis=1)
    return v


def mac_method(*, stat_decay: float = 0.95, damping: float = 1.0, scale: str = "reference",
               diagonal: bool = False) -> CurvatureMethod:
    """MAC (``diagonal=False``) or SMAC (``diagonal=True``) as a :class:`CurvatureMethod`.

    Per layer: the EMA of the batch mean activation ā (Linear: mean of the rows, bias entry 1;
    Conv2d: mean patch); fused qkv projections (``spec.qkv``) keep one factor per row block (Q, K:
    ā; V: the attention-weighted mean), per head with ``mode="per_head"``; a value projection alone
    (``spec.qkv.layout == "v"``) keeps the attention-weighted mean only (per value head with
    ``"per_head"``). SMAC adds the EMA of the output-gradient diagonal E_rows[g⊙g] for plain layers
    and value projections (not fused qkv projections). A first-layer
    inverse (:func:`with_first_layer`) replaces the rank-1 form for that layer.

    SMAC's statistic is not divided by the loss's reduction factor, so it follows the loss's
    normalisation (``grad_stats_scale_with_loss=True``): under data parallelism the adapters pass
    ``grad_scale=``:func:`data_parallel_grad_scale` to ``grad_statistics``.
    """
    check_flag(diagonal, "diagonal", "mac_method")
    if scale not in MAC_SCALES:
        raise ValueError(f"mac_method: scale must be one of {MAC_SCALES}, got {scale!r}")
    plain = mac(decay=stat_decay, damping=damping, scale=scale)
    diag = mac(decay=stat_decay, damping=damping, scale=scale, diagonal=True)

    def uses_diag(spec: LayerSpec) -> bool:  # a value projection alone is a plain dense layer
        return diagonal and (spec.qkv is None or spec.qkv.layout == "v")

    def core(spec: LayerSpec):
        return diag if uses_diag(spec) else plain

    def init(spec, *, xp, dtype=None, device=None):
        dt = xp.float32 if dtype is None else _stats_dtype(xp, dtype)
        return core(spec).init(spec.d_tilde, spec.d_out, xp=xp, heads=_qkv_heads(spec), dtype=dt,
                               device=device)

    def wants_input(spec, state):
        return state.first_inv is None or uses_diag(spec)

    def input_statistics(spec, state, x, *, attn=None, key=None, value=None):
        if not wants_input(spec, state):
            return {}
        if spec.qkv is None:
            mean = mean_rows(spec, x)
        else:
            mean = qkv_mean(spec, x, attn=attn, key=key, value=value)
        return {"mean": Stat(mean, num_rows(spec, x), "mean")}

    def grad_statistics(spec, state, g, *, grad_scale=1.0):
        if not uses_diag(spec):
            return {}
        rows = to_grad_rows(spec, g)
        if grad_scale != 1.0:
            rows = rows / grad_scale
        return {"diag": Stat(gradient_diagonal(rows), int(rows.shape[0]), "mean")}

    def finalize(spec, state, pooled, *, reduction_factor=None):
        del spec, state, reduction_factor  # MAC's statistics are means of rows
        return _mean_stats(pooled)

    def keys(spec, state):
        return ("mean", "diag") if uses_diag(spec) else ("mean",)

    def update(spec, state, stats, *, lr_cov=None):
        del lr_cov
        if any(k not in stats for k in keys(spec, state)):
            return state
        return core(spec).update(state, mean=stats["mean"], grad_diag=stats.get("diag"))

    def refresh(spec, state, *, checked=True):
        del checked  # nothing to read: the debiased running averages
        return core(spec).refresh(state)

    def apply(spec, state, grad_mat):
        return core(spec).apply(state, grad_mat)

    def curvature_dense(spec, state):
        return core(spec).to_dense(state, spec.d_out)

    def preconditioner_dense(spec, state):
        return _dense_inverse(curvature_dense(spec, state))

    return CurvatureMethod(
        "smac" if diagonal else "mac", init, input_statistics, grad_statistics, finalize, update,
        refresh, apply, curvature_dense, preconditioner_dense, keys, wants_input,
        lambda spec: uses_diag(spec), lambda spec: spec.qkv is not None and spec.qkv.mode != "off",
        lambda spec, state: ({"mean": state.mean.value} | (
            {"diag": state.diag.value} if uses_diag(spec) else {})),
        {"stat_decay": stat_decay, "damping": damping, "scale": scale, "diagonal": diagonal},
        # SMAC's E_rows[g⊙g] is the published statistic, not divided by the reduction factor
        grad_stats_scale_with_loss=diagonal,
    )


# ---------------------------------------------------------------------------------------------
# KFAC


def _check_loss(loss_average: Any, rf: Any, where: str) -> None:
    if loss_average not in LOSS_AVERAGES:
        raise ValueError(f"{where}: loss_average must be one of {LOSS_AVERAGES}, got {loss_average!r}")
    if rf is not None:
        check_damping(rf, "reduction_factor", where, pair=False)


def _finalize_loss_sums(pooled: Mapping[str, Stat], key: str, loss_average: str | None,
                        rf: float | None) -> dict[str, tuple[Array, float]]:
    """Finalize pooled statistics whose ``key`` entry is a sum over loss terms of autograd
    gradients (KFAC's G, SINGD's H_C): divided by the loss's reduction factor R, weight 1 across
    devices (every rank's G is already a per-loss statistic); the rest are row means."""
    out = _mean_stats({k: s for k, s in pooled.items() if k != key})
    if key in pooled:
        s = pooled[key]
        out[key] = (s.value / _reduction_factor(s.weight, loss_average=loss_average,
                                                reduction_factor=rf), 1.0)
    return out


def _grad_rows_unscaled(spec: LayerSpec, g: Array, reduce: bool, grad_scale: Any) -> Array:
    rows = to_grad_rows(spec, g, reduce=reduce)
    return rows if grad_scale == 1.0 else rows / grad_scale


def kfac_method(*, stat_decay: float = 0.95, damping: Any = 1e-3, damping_mode: str = "tikhonov",
                kfac_approx: str = "expand", loss_average: str | None = "batch",
                reduction_factor: float | None = None) -> CurvatureMethod:
    """Exact KFAC as a :class:`CurvatureMethod`: A = E_rows[x̃x̃ᵀ] from the inputs, G = (1/R) Σ g gᵀ
    from the output gradients, with R from ``reduction_factor`` or ``loss_average`` (pooled over
    every micro-batch of the step: ``"batch"`` R = 1/N, ``"batch+sequence"`` R = 1/(N·S),
    ``None`` R = 1); ``kfac_approx`` ``"expand"`` or ``"reduce"``. A layer never observed is left
    unpreconditioned."""
    _check_loss(loss_average, reduction_factor, "kfac_method")
    reduce = KFACType(kfac_approx) is KFACType.REDUCE
    pc = kfac(decay=stat_decay, damping=damping, mode=damping_mode)
    rf_default = reduction_factor

    def init(spec, *, xp, dtype=None, device=None):
        dt = xp.float32 if dtype is None else _stats_dtype(xp, dtype)
        return pc.init(spec.d_tilde, spec.d_out, xp=xp, dtype=dt, device=device)

    def input_statistics(spec, state, x, *, attn=None, key=None, value=None):
        del state, attn, key, value
        rows = to_rows(spec, x, reduce=reduce)
        return {"A": Stat(input_factor(rows), int(rows.shape[0]), "mean")}

    def grad_statistics(spec, state, g, *, grad_scale=1.0):
        del state
        rows = _grad_rows_unscaled(spec, g, reduce, grad_scale)
        return {"G": Stat(gradient_factor(rows, reduction_factor=1.0),
                          loss_terms(spec, tuple(g.shape), loss_average), "sum")}

    def finalize(spec, state, pooled, *, reduction_factor=None):
        return _finalize_loss_sums(pooled, "G", loss_average,
                                   rf_default if reduction_factor is None else reduction_factor)

    def keys(spec, state):
        return ("A", "G")

    def update(spec, state, stats, *, lr_cov=None):
        if "A" not in stats or "G" not in stats:
            return state
        return pc.update(state, A=stats["A"], G=stats["G"])

    def refresh(spec, state, *, checked=True):
        if checked:
            if _known_zero(state.a.count):  # never observed: nothing to invert
                return state
            return pc.refresh(state)
        # nothing read on the host: a layer never observed keeps its cache, chosen on the device
        new = pc.refresh(state, checked=False)
        xp = namespace(count=state.a.count, where="kfac.refresh")
        unseen = state.a.count == 0
        keep = [(old if old is None else xp.where(unseen, old, value))
                for old, value in zip(state[2:], new[2:])]
        return new._replace(**dict(zip(KfacState._fields[2:], keep)))

    def apply(spec, state, grad_mat):
        # never observed: leave the gradient as it is. The tikhonov/pi caches start as identities,
        # so that holds as it is; the exact mode's eigenbasis cache does not, and the gradient is
        # chosen on the device (no host read per layer and step)
        out = pc.apply(state, grad_mat)
        if damping_mode == "exact":
            xp = namespace(grad_mat=grad_mat, count=state.a.count, where="kfac.apply")
            out = xp.where(state.a.count == 0, grad_mat, out)
        return out

    def curvature_dense(spec, state):
        return pc.to_dense(state)

    def preconditioner_dense(spec, state):
        return _dense_inverse(pc.to_dense(state))

    return CurvatureMethod(
        "kfac", init, input_statistics, grad_statistics, finalize, update, refresh, apply,
        curvature_dense, preconditioner_dense, keys, lambda spec, state: True, lambda spec: True,
        lambda spec: False, lambda spec, state: {"A": state.a.value, "G": state.g.value},
        {"stat_decay": stat_decay, "damping": damping, "damping_mode": damping_mode,
         "kfac_approx": KFACType(kfac_approx).value, "loss_average": loss_average,
         "reduction_factor": reduction_factor},
        refresh_can_fail=True,
    )


# ---------------------------------------------------------------------------------------------
# SINGD


def _flat(xp: Any, structure: Any) -> Array:
    """The parameters of a structure as one 1-D array (pooled / averaged like any statistic)."""
    parts = [xp.reshape(p, (-1,)) for p in structure]
    return parts[0] if len(parts) == 1 else xp.concat(parts)


def _unflat(xp: Any, flat: Array, template: Any) -> Any:
    """Inverse of :func:`_flat` with the class and parameter shapes of ``template``."""
    out, offset = [], 0
    for p in template:
        n = math.prod(p.shape)
        out.append(xp.reshape(flat[offset:offset + n], tuple(p.shape)))
        offset += n
    return type(template)(*out)


def singd_method(*, damping: float = 1e-3, alpha1: float = 0.5, lr_cov: Any = 1e-2,
                 structures: tuple[Any, Any] = ("dense", "dense"), kfac_like: bool = False,
                 kfac_approx: str = "expand", loss_average: str | None = "batch",
                 reduction_factor: float | None = None,
                 preconditioner_dtype: tuple[Any, Any] = (None, None),
                 normalize_lr_cov: bool = False) -> CurvatureMethod:
    """SINGD / IKFAC as a :class:`CurvatureMethod` (the core :func:`maccore.singd` per layer).

    Statistics: ``H_K = Π_K(Kᵀ A K)`` from the input rows (row-weighted mean over micro-batches)
    and ``H_C = Π_C(Cᵀ G C)`` from the output-gradient rows (summed, then divided by the reduction
    factor as for KFAC). ``lr_cov`` is a number; a schedule is evaluated by the adapter and passed
    to ``update(..., lr_cov=)``."""
    _check_loss(loss_average, reduction_factor, "singd_method")
    reduce = KFACType(kfac_approx) is KFACType.REDUCE
    pc = singd(structures=structures, alpha1=alpha1, lr_cov=0.0 if callable(lr_cov) else lr_cov,
               damping=damping, kfac_like=kfac_like, normalize_lr_cov=normalize_lr_cov,
               preconditioner_dtype=preconditioner_dtype)
    rf_default = reduction_factor

    def init(spec, *, xp, dtype=None, device=None):
        return pc.init(spec.d_tilde, spec.d_out, xp=xp, dtype=dtype, device=device)

    def input_statistics(spec, state, x, *, attn=None, key=None, value=None):
        del attn, key, value
        rows = to_rows(spec, x, reduce=reduce)
        xp = namespace(rows=rows, where="singd")
        return {"H_K": Stat(_flat(xp, singd_input_statistics(state, rows)), int(rows.shape[0]),
                            "mean")}

    def grad_statistics(spec, state, g, *, grad_scale=1.0):
        rows = to_grad_rows(spec, g, reduce=reduce)
        xp = namespace(rows=rows, where="singd")
        s = float(grad_scale)
        H = singd_grad_statistics(state, rows, reduction_factor=s * s)
        return {"H_C": Stat(_flat(xp, H), loss_terms(spec, tuple(g.shape), loss_average), "sum")}

    def finalize(spec, state, pooled, *, reduction_factor=None):
        return _finalize_loss_sums(pooled, "H_C", loss_average,
                                   rf_default if reduction_factor is None else reduction_factor)

    def keys(spec, state):
        return ("H_K", "H_C")

    def update(spec, state, stats, *, lr_cov=None):
        if "H_K" not in stats or "H_C" not in stats:
            return state
        xp = namespace(H_K=stats["H_K"], where="singd")
        H = (_unflat(xp, stats["H_K"], state.K), _unflat(xp, stats["H_C"], state.C))
        return pc.update(state, statistics=H, lr_cov=lr_cov)

    def curvature_dense(spec, state):
        return _dense_inverse(pc.to_dense(state))

    return CurvatureMethod(
        "singd", init, input_statistics, grad_statistics, finalize, update,
        lambda spec, state, *, checked=True: pc.refresh(state),  # reads nothing either way
        lambda spec, state, grad_mat: pc.apply(state, grad_mat),
        curvature_dense, lambda spec, state: pc.to_dense(state), keys,
        lambda spec, state: True, lambda spec: True, lambda spec: False,
        lambda spec, state: {"H_K": _flat(namespace(K=state.K[0], where="singd"), state.K),
                             "H_C": _flat(namespace(C=state.C[0], where="singd"), state.C)},
        {"damping": damping, "alpha1": 0.0 if kfac_like else alpha1, "structures": structures,
         "kfac_like": kfac_like, "kfac_approx": KFACType(kfac_approx).value,
         "loss_average": loss_average, "reduction_factor": reduction_factor,
         "preconditioner_dtype": preconditioner_dtype, "normalize_lr_cov": normalize_lr_cov},
    )


