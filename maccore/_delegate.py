"""Native fast paths for the few operations the Array API standard has no fused form for.

Each function takes the namespace first and falls back to a standard-only implementation
(:mod:`maccore._agnostic` style, inline here); tests check every fast path against the fallback.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any

import array_api_compat as compat

Array = Any

_L2_SYSFS = "/sys/devices/system/cpu/cpu0/cache/index2/size"


def _l2_bytes(path: str = _L2_SYSFS, default: int = 1 << 20) -> int:
    """This core's L2 cache size (Linux sysfs ``path``), clamped to [256 KiB, 4 MiB]; ``default``
    where it cannot be read."""
    try:
        with open(path) as f:
            text = f.read().strip().upper()
        size = int(text.rstrip("KMB")) << {"K": 10, "M": 20}.get(text.rstrip("B")[-1:], 0)
    except (OSError, ValueError):
        return default
    return min(max(size, 1 << 18), 1 << 22)


# Bytes per block of the chunked NumPy rank-1 update: a block stays in this core's L2 between its
# matvec and its update, so the gradient is read from memory once and the result written once
# (measured on a 1 MiB-L2 core: 1 MiB blocks beat 256/512 KiB and 2 MiB ones, docs/benchmarks.md).
_CHUNK_BYTES = _l2_bytes()

# dtype char -> SciPy's BLAS ?ger (a fused in-place rank-1 update), or None (no SciPy / dtype).
_GER: dict[str, Any] = {}


def _blas_ger(dtype: Any) -> Any:
    key = dtype.char
    if key not in _GER:
        try:
            from scipy.linalg import blas
        except Exception:  # SciPy is optional: the ufunc loop below is the fallback
            _GER[key] = None
        else:
            _GER[key] = {"f": getattr(blas, "sger", None), "d": getattr(blas, "dger", None)}.get(key)
    return _GER[key]


# Smallest gradient (elements) for which torch CPU tensors take the NumPy/BLAS kernel: below it the
# per-call overhead of the blocked loop outweighs torch's mv + addr.
_CPU_BLAS_MIN = 1 << 18
# Most torch intra-op threads for which torch CPU tensors take that kernel (see _cpu_blas_ok).
_CPU_BLAS_MAX_THREADS = 1

# Whether torch CPU tensors take the kernel at more than _CPU_BLAS_MAX_THREADS torch threads too,
# with the BLAS held to one thread (rank1_rows_blas1; needs threadpoolctl): torch's pool is idle
# meanwhile, so nothing competes for the cores.
_CPU_BLAS_ONE_THREAD = True

# Whether :func:`mac_rank1` may take a native path (``False``: every call takes the standard-only
# path). Only the benchmarks switch it, to time each fast path against the plain path it replaces.
FAST_PATHS = True


def _cpu_blas_ok(g: Array, *vecs: Array | None, inplace: bool = True) -> bool:
    """Whether torch tensors can share memory with NumPy for :func:`rank1_rows_numpy`: CPU,
    float32/float64 alike, plain tensors (no subclass, no autograd, no inference tensors, not
    traced by ``torch.compile`` or ``torch.func``), a C-contiguous ``g`` with at least
    ``_CPU_BLAS_MIN`` elements, SciPy's BLAS present, and either torch running one intra-op
    thread or, for an in-place update (the adapters' case), threadpoolctl at hand to hold the
    BLAS at one thread during the kernel (:func:`rank1_rows_blas1`; out of place, torch's kernels
    at two threads were as fast or faster on the benchmark machine). A BLAS running its own thread pool beside torch's loses to
    torch's ``mv`` + ``addr`` (measured in ``benchmarks/``: a MAC step 3.7× SGD's at the default
    two threads of a 2-core machine with the route, 1.4× without it)."""
    import torch

    threads = torch.get_num_threads()
    if (g.numel() < _CPU_BLAS_MIN
            or (threads > _CPU_BLAS_MAX_THREADS
                and not (inplace and _CPU_BLAS_ONE_THREAD and _blas_controller()))
            or g.device.type != "cpu"
            or g.dtype not in (torch.float32, torch.float64)
            or g.ndim != 2 or not g.is_contiguous() or _blas_ger(_np_dtype(g)) is None
            or torch.compiler.is_compiling()):
        return False
    for t in (g, *vecs):
        if t is None:
            continue
        if (type(t) is not torch.Tensor or t.device.type != "cpu" or t.dtype != g.dtype or t.requires_grad
                or t.is_conj() or t.is_neg() or t.is_inference()
                or torch._C._functorch.is_functorch_wrapped_tensor(t)):
            return False
    return True


def _np_dtype(t: Array) -> Any:
    import numpy as np
    import torch

    return np.dtype(np.float32) if t.dtype == torch.float32 else np.dtype(np.float64)


def rank1_rows_numpy(g: Array, a: Array, coef: Array, out: Array, *, gb: Array | None = None,
                     ab: float = 0.0, cb: float = 0.0, gb_out: Array | None = None,
                     scale: float | None = None, blas: bool = True) -> None:
    """``out ← g − v coefᵀ`` with ``v = scale·(g a + gb·ab)``, and ``gb_out ← gb − v·cb``, over
    blocks of rows that stay in cache: ``g`` is read from memory once and ``out`` written once.

    ``out`` is C-contiguous; it may be ``g`` itself (in place: no copy at all), likewise ``gb_out``
    may be ``gb``. With SciPy (float32/float64 throughout), per block: a copy into ``out`` (unless
    in place), a matvec and BLAS ``?ger`` in place; otherwise (or ``blas=False``) the matvec, an
    outer product and a subtraction (ufuncs).
    """
    import numpy as np

    m, n = g.shape
    inplace = out is g
    ger = (_blas_ger(g.dtype) if blas and a.dtype == g.dtype == coef.dtype == out.dtype and g.size
           else None)
    step = max(1, _CHUNK_BYTES // max(1, n * g.itemsize))
    if scale is not None:  # v = (scale·a)ᵀ g_i + scale·ab·gb_i: scaled once, outside the loop
        a = (a * scale).astype(a.dtype, copy=False)
    w = None if gb is None else gb * (ab if scale is None else ab * scale)
    v_all = np.empty((m,), dtype=out.dtype)
    tmp = None if ger is not None else np.empty((min(step, m), n), dtype=out.dtype)
    for start in range(0, m, step):
        stop = min(m, start + step)
        o = out[start:stop]
        v = v_all[start:stop]
        if ger is not None:
            if not inplace:
                np.copyto(o, g[start:stop])
            np.matmul(o, a, out=v)
        else:
            np.matmul(g[start:stop], a, out=v)
        if w is not None:
            v += w[start:stop]
        if ger is not None:
            # o is C-contiguous, so o.T is Fortran-ordered: ?ger updates it in place,
            # o.T ← o.T − coef vᵀ  ⇔  o ← o − v coefᵀ
            r = ger(-1.0, coef, v, a=o.T, overwrite_a=1)
            if r.ctypes.data != o.ctypes.data:  # the wrapper had to copy (never expected)
                np.copyto(o, r.T)
        else:
            t = tmp[: stop - start]
            np.multiply(v[:, None], coef[None, :], out=t)
            np.subtract(g[start:stop], t, out=o)
    if gb is not None:
        np.subtract(gb, v_all * cb, out=gb_out)


_BLAS_CTL: Any = None  # threadpoolctl's controller of the BLAS libraries (False: unavailable)
# One kernel at a time holds the BLAS at one thread: the limit is process-wide, and interleaved
# limit/restore pairs of concurrent callers could leave the library at one thread.
_BLAS_LOCK = threading.Lock()


def _blas_controller() -> Any:
    """threadpoolctl's ``ThreadpoolController`` restricted to the BLAS libraries NumPy and SciPy
    loaded (both are imported first: threadpoolctl sees loaded libraries only), or ``None``
    (threadpoolctl not installed, or no BLAS library found)."""
    global _BLAS_CTL
    if _BLAS_CTL is None:
        try:
            import numpy as np
            from threadpoolctl import ThreadpoolController

            _blas_ger(np.dtype(np.float32))  # SciPy's BLAS, when present, loaded before the scan
            ctl = ThreadpoolController().select(user_api="blas")
            _BLAS_CTL = ctl if ctl.lib_controllers else False
        except Exception:  # optional: without it the kernel runs at the BLAS's thread count
            _BLAS_CTL = False
    return _BLAS_CTL or None


def rank1_rows_blas1(g: Array, a: Array, coef: Array, out: Array, **kw: Any) -> None:
    """:func:`rank1_rows_numpy` with the BLAS libraries held to one thread (``threadpoolctl``;
    restored afterwards), whatever the thread count they are set to.

    Each block of the kernel is two small BLAS calls (a matvec and a rank-1 update on a block that
    fits in L2): a threaded BLAS wakes and joins its pool for each and loses to one thread — on
    the 2-core benchmark machine the kernel at two BLAS threads took 1.6–3.7× a copy, at one
    thread 0.8–1.5× (docs/benchmarks.md); splitting the rows over threads of our own did not beat
    one thread either (the kernel is bound by memory bandwidth). Without threadpoolctl the kernel
    runs as it is."""
    ctl = _blas_controller()
    if ctl is None:
        rank1_rows_numpy(g, a, coef, out, **kw)
        return
    with _BLAS_LOCK, ctl.limit(limits=1):
        rank1_rows_numpy(g, a, coef, out, **kw)


def inverse_unchecked(xp: Any, x: Array) -> Array:
    """``x⁻¹`` of a square matrix without reading anything on the host; where the inverse does
    not exist the result is not finite (NaN, or the library's infinities). torch:
    ``linalg.inv_ex`` with its status applied on the device (its ``linalg.inv`` reads the status:
    a device synchronisation on GPUs); a library that raises instead (NumPy): NaN."""
    if compat.is_torch_namespace(xp):
        import torch

        inv, info = torch.linalg.inv_ex(x, check_errors=False)
        return torch.where(info == 0, inv, torch.full_like(inv, float("nan")))
    try:
        return xp.linalg.inv(x)
    except Exception:  # numpy.linalg.LinAlgError and the like: singular
        return xp.full_like(x, float("nan"))


def softmax_last(xp: Any, x: Array) -> Array | None:
    """The backend's fused softmax over the last axis (torch, JAX), or ``None`` where the standard
    has to compose it (the caller's max / exp / sum / divide path)."""
    if compat.is_torch_namespace(xp):
        import torch

        return torch.softmax(x, dim=-1)
    if compat.is_jax_namespace(xp):
        import jax

        return jax.nn.softmax(x, axis=-1)
    return None


def mac_rank1_standard(xp: Any, gw: Array, gb: Array | None, a: Array, inv: Array,
                       row_scale: Any) -> tuple[Array, Array | None]:
    """``row_scale ⊙ (G̃ − inv·(G̃ a) aᵀ)`` for ``G̃ = [gw | gb]`` with standard operations only,
    returned split as ``(weight part, bias part)`` (``gb=None``: ``gw`` is the whole matrix).

    ``a [n (+1)]`` with ``inv`` 0-d, or ``a [H, n (+1)]`` with ``inv [H, 1]`` (row block h of H
    equal blocks uses ``a[h]``); ``row_scale``: ``None``, a number, a 0-d array or ``[d_out]``.
    """
    d_out, n = gw.shape
    if a.ndim == 1:
        v = (gw @ a[:n]) if gb is None else (gw @ a[:n] + gb * a[n])
        v = v * xp.reshape(inv, ())
        new_w = gw - xp.reshape(v, (d_out, 1)) * xp.reshape(a[:n], (1, n))
        new_b = None if gb is None else gb - v * a[n]
    else:
        h = a.shape[0]
        r = d_out // h
        gh = xp.reshape(gw, (h, r, n))
        v = gh @ xp.reshape(a[:, :n], (h, n, 1))  # [H, r, 1]
        if gb is not None:
            v = v + xp.reshape(gb, (h, r, 1)) * xp.reshape(a[:, n], (h, 1, 1))
        v = v * xp.reshape(inv, (h, 1, 1))
        new_w = xp.reshape(gh - v * xp.reshape(a[:, :n], (h, 1, n)), (d_out, n))
        new_b = None if gb is None else xp.reshape(
            xp.reshape(gb, (h, r)) - xp.reshape(v, (h, r)) * xp.reshape(a[:, n], (h, 1)), (d_out,))
    if row_scale is not None:
        per_row = getattr(row_scale, "ndim", 0) == 1
        new_w = new_w * (xp.reshape(row_scale, (d_out, 1)) if per_row else row_scale)
        if new_b is not None:
            new_b = new_b * row_scale
    return new_w, new_b


def mac_rank1(xp: Any, gw: Array, gb: Array | None, a: Array, inv: Array, row_scale: Any,
              *, inplace: bool = False) -> tuple[Array, Array | None] | None:
    """The native fast paths behind :func:`maccore.mac_apply` (the contract of
    :func:`mac_rank1_standard`; every operand already in one float dtype), or ``None`` where the
    caller takes the standard path.

    NumPy (one factor, C-contiguous float32/64): the cache-blocked :func:`rank1_rows_numpy` (BLAS
    ``?ger`` through SciPy). torch: the same kernel on CPU tensors that can share memory with NumPy
    (:func:`_cpu_blas_ok`), else fused ``mv``/``addr`` (``bmm``/``baddbmm`` per head).
    ``inplace=True`` writes the result into ``gw``/``gb`` and returns them.
    """
    if not FAST_PATHS:
        return None
    n = gw.shape[1]
    if compat.is_numpy_namespace(xp):
        import numpy as np

        if (a.ndim != 1 or gw.dtype not in (np.float32, np.float64) or not gw.flags.c_contiguous
                or a.dtype != gw.dtype or (gb is not None and gb.dtype != gw.dtype)):
            return None
        out = gw if inplace else np.empty_like(gw, order="C")
        bout = None if gb is None else (gb if inplace else np.empty_like(gb))
        with np.errstate(all="ignore"):
            rank1_rows_blas1(gw, a[:n], a[:n], out, gb=gb,
                             ab=0.0 if gb is None else a[n], cb=0.0 if gb is None else a[n],
                             gb_out=bout, scale=np.asarray(inv, dtype=gw.dtype).reshape(()))
            if row_scale is not None:
                rs = np.asarray(row_scale, dtype=out.dtype)
                np.multiply(out, rs if rs.ndim == 0 else rs[:, None], out=out)
                if bout is not None:
                    np.multiply(bout, rs, out=bout)
        return out, bout
    if compat.is_torch_namespace(xp):
        return _mac_rank1_torch(gw, gb, *_torch_split(a, inv, n, gb is not None), row_scale,
                                inplace=inplace)
    return None


def _torch_split(a: Array, inv: Array, n: int, bias: bool) -> tuple[Array, Array | None, Array]:
    """``(â's weight part, its bias entry or None, the scale)`` as the torch kernel takes them."""
    aw, ab = (a[..., :n], a[..., n]) if bias else (a, None)
    return aw, ab, (inv.reshape(()) if a.ndim == 1 else inv)


def _mac_rank1_torch(gw: Array, gb: Array | None, aw: Array, ab: Array | None, scale: Array,
                     row_scale: Any, *, inplace: bool) -> tuple[Array, Array | None]:
    """The torch branch of :func:`mac_rank1` on â already split."""
    out, bout = rank1_split_torch_parts(gw, gb, aw, ab, aw, ab, inplace=inplace, scale=scale)
    if row_scale is not None:
        per_row = getattr(row_scale, "ndim", 0) == 1
        rw = row_scale.unsqueeze(1) if per_row else row_scale
        if inplace:
            out.mul_(rw)
            if bout is not None:
                bout.mul_(row_scale)
        else:
            out = out * rw
            bout = None if bout is None else bout * row_scale
    return out, bout


# torch: a layer's prepared in-place MAC update (torch_mac_plan), keyed on its mean's identity,
# with the versions of the mean and the gradient diagonal and the hyper-parameters it was made for.
_PLANS: dict[int, tuple] = {}


def torch_mac_plan(gw: Array, gb: Array | None, mean: Array, diag: Array | None, damping: Any,
                   scale: str, prepare: Any) -> bool:
    """Write MAC's preconditioned gradient into the torch tensors ``gw`` (any shape, contiguous:
    flattened to ``[d_out, n]``) and ``gb`` with the factor, left scale and split of â prepared
    once per state (``prepare(xp, sdt)`` → ``(a, inv, row_scale)``, what :func:`mac_rank1`'s
    caller computes each call) and return ``True``; ``False`` (nothing written) for anything the
    plan does not cover — other libraries, autograd or traced tensors, dtypes or devices that
    differ from the state's, shapes that do not match it, the fast paths off — where the caller
    takes its checked path. The kernels are :func:`mac_rank1`'s: the results are the same."""
    torch = sys.modules.get("torch")
    if (not FAST_PATHS or torch is None or type(gw) is not torch.Tensor
            or type(mean) is not torch.Tensor or (gb is not None and type(gb) is not torch.Tensor)
            or (diag is not None and type(diag) is not torch.Tensor)
            or isinstance(damping, bool) or not isinstance(damping, (int, float))):
        return False
    key = (mean._version, None if diag is None else (id(diag), diag._version), float(damping), scale)
    hit = _PLANS.get(id(mean))
    if (hit is None or hit[0]() is not mean or hit[1] != key
            or (hit[3] is not None and hit[3]() is not diag)):
        plan = _torch_plan(torch, mean, diag, prepare)
        if len(_PLANS) >= 1024:
            for old in list(_PLANS)[:256]:
                del _PLANS[old]
        _PLANS[id(mean)] = hit = (weakref.ref(mean, _drop_plan(id(mean))), key, plan,
                                  None if diag is None else weakref.ref(diag))
    plan = hit[2]
    if plan is None:
        return False
    a, inv, row_scale, dt, dev, d_tilde, heads, splits = plan
    d_out = gw.shape[0] if gw.ndim else 0
    bias = gb is not None
    n = d_tilde - bias
    if (gw.dtype != dt or gw.device != dev or gw.requires_grad or not gw.is_contiguous()
            or gw.ndim < 2 or gw.numel() != d_out * n or not d_out or d_out % heads
            or (row_scale is not None and getattr(row_scale, "ndim", 0) == 1
                and row_scale.shape[0] != d_out)
            or (gb is not None and (gb.dtype != dt or gb.device != dev or gb.requires_grad
                                    or tuple(gb.shape) != (d_out,)))
            or torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(gw)
            or gw.is_inference()):
        return False
    split = splits.get(bias)
    if split is None:
        split = splits[bias] = _torch_split(a, inv, n, bias)
    _mac_rank1_torch(gw.view(d_out, n), gb, *split, row_scale, inplace=True)
    return True


def _drop_plan(key: int) -> Any:
    """A weakref callback: the plan of a mean that is gone leaves with it (not a newer one)."""
    def drop(ref: Any) -> None:
        hit = _PLANS.get(key)
        if hit is not None and hit[0] is ref:
            del _PLANS[key]
    return drop


def _torch_plan(torch: Any, mean: Array, diag: Array | None, prepare: Any) -> tuple | None:
    """``(a, inv, row_scale, dtype, device, d̃, heads, {bias: split of â})`` for
    :func:`torch_mac_plan`, or ``None`` for a mean the plan does not cover."""
    if (mean.dtype not in (torch.float32, torch.float64) or mean.ndim not in (1, 2)
            or mean.requires_grad or torch.compiler.is_compiling() or mean.is_inference()
            or torch._C._functorch.is_functorch_wrapped_tensor(mean)
            or (diag is not None and (diag.dtype != mean.dtype or diag.device != mean.device
                                      or diag.requires_grad or diag.ndim != 1))):
        return None
    xp = compat.array_namespace(mean)
    a, inv, row_scale = prepare(xp, mean.dtype)
    heads = 1 if mean.ndim == 1 else mean.shape[0]
    return a, inv, row_scale, mean.dtype, mean.device, mean.shape[-1], heads, {}


def shares_memory(xp: Any, view: Array, base: Array) -> bool:
    """Whether writing into ``view`` writes into ``base`` (a reshaped view of it; NumPy, CuPy,
    torch); ``False`` for namespaces without mutable views."""
    if compat.is_torch_namespace(xp):
        return view.data_ptr() == base.data_ptr() and view.is_contiguous() and base.is_contiguous()
    if compat.is_numpy_namespace(xp) or compat.is_cupy_namespace(xp):
        mod = compat.array_namespace(view)
        return bool(getattr(mod, "shares_memory", lambda *_: False)(view, base)) and view.size == base.size
    return False


# torch: the MAC factor (â/c, 1/(λ/c² + ‖â/c‖²)) of the last few means, keyed on the tensor's
# identity and its version counter (bumped by every in-place write), so a mean that is applied many
# times between two refreshes (an optimizer's state) is prepared once.
_FACTORS: dict[int, tuple[Any, int, Any, Any]] = {}


def memo_factor(xp: Any, mean: Array, damping: Any, dtype: Any, compute: Any) -> Any:
    """``compute()``, remembered for eager torch tensors per (``mean`` identity and version,
    ``damping``, ``dtype``); other namespaces, traced or autograd tensors and array-valued
    dampings compute on each call."""
    if not compat.is_torch_namespace(xp) or not isinstance(damping, (int, float)):
        return compute()
    import torch

    if (mean.requires_grad or torch.compiler.is_compiling() or type(mean) is not torch.Tensor
            or torch._C._functorch.is_functorch_wrapped_tensor(mean)):
        return compute()
    key = (float(damping), dtype)
    hit = _FACTORS.get(id(mean))
    if hit is not None:
        ref, version, k, value = hit
        if ref() is mean and version == mean._version and k == key:
            return value
    value = compute()
    if len(_FACTORS) >= 256:  # bounded: drop the oldest entries (dicts keep insertion order)
        for old in list(_FACTORS)[:64]:
            del _FACTORS[old]
    _FACTORS[id(mean)] = (weakref.ref(mean), mean._version, key, value)
    return value


def write_into(xp: Any, out: Array, value: Array) -> Array:
    """Copy ``value`` into the existing array ``out`` (NumPy, CuPy, torch: mutable arrays) and
    return ``out``; namespaces with immutable arrays (JAX) raise ``TypeError``."""
    if compat.is_torch_namespace(xp):
        import torch

        with torch.no_grad():
            out.copy_(value)
        return out
    if compat.is_numpy_namespace(xp) or compat.is_cupy_namespace(xp):
        out[...] = value
        return out
    raise TypeError(f"out= needs a mutable array (NumPy, CuPy, torch); {type(out).__name__} arrays "
                    "are immutable: use the returned value")


def rank1_split_torch_parts(gw: Array, gb: Array | None, aw: Array, ab: Array | None, cw: Array,
                            cb: Array | None, *, inplace: bool, scale: Array | None = None
                            ) -> tuple[Array, Array | None]:
    """The torch kernel of :func:`rank1_update_split` with ``a`` and ``coef`` pre-split into their
    weight parts ``aw, cw`` (``[n]`` or ``[H, n]``) and bias entries ``ab, cb`` (0-d or ``[H]``;
    ``None`` without bias), for callers that cache the split (the torch adapter, per refresh).

    ``scale`` (0-d, or ``[H, 1]`` per head): use ``coef = scale · c`` without forming it — the
    product ``G̃ a`` is scaled instead (MAC: ``c = a``, ``scale = 1/(λ + aᵀa)``, so no second
    vector of size d̃ is kept)."""
    import torch  # only reached when the caller already uses torch

    if aw.ndim == 1 and _cpu_blas_ok(gw, gb, aw, ab, cw, cb, scale, inplace=inplace):
        import numpy as np

        out = gw if inplace else torch.empty_like(gw, memory_format=torch.contiguous_format)
        bout = None if gb is None else (gb if inplace else torch.empty_like(gb))
        g_np = gw.numpy()  # shares memory; one object for g and out when in place
        gb_np = None if gb is None else gb.numpy()
        with np.errstate(all="ignore"):  # torch semantics: inf/nan propagate without warnings
            rank1_rows_blas1(g_np, aw.numpy(), cw.numpy(), g_np if inplace else out.numpy(),
                             gb=gb_np, ab=None if ab is None else ab.numpy(),
                             cb=None if cb is None else cb.numpy(),
                             gb_out=None if gb is None else (gb_np if inplace else bout.numpy()),
                             scale=None if scale is None else scale.numpy())
        if inplace:  # written behind autograd's back: bump the version counters as torch's ops do
            from torch.autograd.graph import increment_version

            increment_version(gw)
            if gb is not None:
                increment_version(gb)
        return out, bout
    if aw.ndim == 1:
        v = torch.mv(gw, aw)
        if gb is not None:
            v.addcmul_(gb, ab)
        if scale is not None:
            v.mul_(scale)
        if inplace:
            gw.addr_(v, cw, alpha=-1)
            if gb is not None:
                gb.addcmul_(v, cb, value=-1)
            return gw, gb
        return torch.addr(gw, v, cw, alpha=-1), (None if gb is None else torch.addcmul(gb, v, cb, value=-1))
    d_out, n = gw.shape
    h = aw.shape[0]
    r = d_out // h
    gh = gw.view(h, r, n) if inplace else gw.reshape(h, r, n)
    v = torch.bmm(gh, aw.unsqueeze(-1))  # [H, r, 1]
    if gb is not None:
        v.addcmul_(gb.reshape(h, r, 1), ab.reshape(h, 1, 1))
    if scale is not None:
        v.mul_(scale.reshape(h, 1, 1))
    cw3 = cw.unsqueeze(1)  # [H, 1, n]
    if inplace:
        gh.baddbmm_(v, cw3, alpha=-1)
        if gb is not None:
            gb.view(h, r).addcmul_(v.view(h, r), cb.reshape(h, 1), value=-1)
        return gw, gb
    new_w = torch.baddbmm(gh, v, cw3, alpha=-1).reshape(d_out, n)
    if gb is None:
        return new_w, None
    return new_w, torch.addcmul(gb.reshape(h, r), v.view(h, r), cb.reshape(h, 1), value=-1).reshape(d_out)
