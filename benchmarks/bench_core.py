"""Core kernels: ``mac_apply`` against a copy and the dense formulation; ``conv2d_mean_patch``
against unfold-then-mean (time) and the input size (peak extra memory)."""

from __future__ import annotations

import itertools
import tracemalloc

import array_api_compat
import numpy as np

import maccore
from maccore import _delegate
from benchmarks._harness import Result, paired_ratios

SHAPES = ((4096, 4096), (768, 3072), (3072, 768))

# Distinct gradients cycled through by the "streamed" rows: together well over any L3 cache, so
# every call reads its gradient from memory, as an optimizer step does after the backward pass.
POOL_BYTES = 256 << 20


def _mac(g, a):
    return maccore.mac_apply(g, a, 1.0)


def _plain_mac(g, a):
    """``mac_apply`` with the native fast paths switched off: the standard-only path."""
    _delegate.FAST_PATHS = False
    try:
        return maccore.mac_apply(g, a, 1.0)
    finally:
        _delegate.FAST_PATHS = True


def _dense(g, a):
    """The dense formulation: form I − aaᵀ/(1 + aᵀa), then multiply."""
    xp = array_api_compat.array_namespace(g, a)
    return g @ (xp.eye(a.shape[0], dtype=a.dtype) - xp.linalg.outer(a, a) / (1.0 + a @ a))


def _mac_rows(lib: str, make, copy, inplace, one_pass, repeats: int, quick: bool) -> list[Result]:
    """Rows for one library: ``make(shape, k)`` returns ``k`` gradients and ``(a, coef)``.

    - warm: the same gradient every call (a 9 MiB one stays in L3: the copy runs at cache speed);
    - streamed: a pool of gradients larger than the caches, candidate and baseline cycle through it;
    - fast path against the plain path (the same call with ``_delegate.FAST_PATHS`` off), streamed:
      target ≤ 1, a fast path may never lose;
    - in place (the adapters' kernel on ``.grad``) and one elementwise pass: reports, streamed;
    - against the dense formulation at d̃ = 4096 (1024 with ``quick``).
    """
    out = []
    for m, n in SHAPES[:1] if quick else SHAPES:
        k = 2 if quick else max(3, POOL_BYTES // (m * n * 4))
        pool, (a, coef) = make((m, n), k)
        g = pool[0]
        r = paired_ratios(lambda: _mac(g, a), lambda: copy(g), repeats=repeats, inner=3)
        out.append(Result(f"{lib} mac_apply f32 {m}x{n} warm", "copy (same array)", 1.5, r))

        def cycled(fn, *args):
            it = itertools.cycle(pool)
            return lambda: fn(next(it), *args)

        inner = max(3, k)
        r = paired_ratios(cycled(_mac, a), cycled(copy), repeats=repeats, inner=inner)
        out.append(Result(f"{lib} mac_apply f32 {m}x{n} streamed", f"copy ({k} arrays cycled)", 1.5, r))
        r = paired_ratios(cycled(_mac, a), cycled(_plain_mac, a), repeats=repeats, inner=inner)
        out.append(Result(f"{lib} mac_apply fast path {m}x{n} streamed", "plain path (fast paths off)", 1.0, r,
                          note="a fast path must never lose to the path it replaces"))
        r = paired_ratios(cycled(inplace, a, coef), cycled(copy), repeats=repeats, inner=inner)
        out.append(Result(f"{lib} MAC in place (adapter kernel) {m}x{n} streamed", f"copy ({k} arrays cycled)",
                          None, r, note="rank-1 update written into the gradient"))
        r = paired_ratios(cycled(one_pass), cycled(copy), repeats=repeats, inner=inner)
        out.append(Result(f"{lib} floor: one elementwise pass g*1 {m}x{n} streamed", f"copy ({k} arrays cycled)",
                          None, r, note="any kernel that reads g and writes a new array"))
    n = 1024 if quick else 4096
    (g,), (a, _) = make((n, n), 1)
    r = paired_ratios(lambda: _mac(g, a), lambda: _dense(g, a), repeats=max(3, repeats // 3))
    out.append(Result(f"{lib} mac_apply f32 {n}x{n}", "dense I-aa^T/(l+a^Ta), matmul", None if quick else 1 / 20, r,
                      note="target: >= 20x faster"))
    return out


def _numpy_mac(repeats: int, quick: bool) -> list[Result]:
    rng = np.random.default_rng(0)

    def make(shape, k):
        pool = [rng.standard_normal(shape, dtype=np.float32) for _ in range(k)]
        a = rng.standard_normal(shape[1], dtype=np.float32)
        return pool, (a, (a / (1.0 + a @ a)).astype(np.float32))

    def inplace(g, a, coef):
        _delegate.rank1_rows_blas1(g, a, coef, g)  # as mac_apply runs it (BLAS at one thread)

    return _mac_rows("numpy", make, lambda g: g.copy(), inplace, lambda g: g * np.float32(1), repeats, quick)


def _torch_mac(repeats: int, quick: bool) -> list[Result]:
    try:
        import torch
    except ImportError:
        return []
    gen = torch.Generator().manual_seed(0)

    def make(shape, k):
        pool = [torch.randn(*shape, generator=gen) for _ in range(k)]
        a = torch.randn(shape[1], generator=gen)
        return pool, (a, a / (1.0 + a @ a))

    def inplace(g, a, coef):
        _delegate.rank1_split_torch_parts(g, None, a, None, coef, None, inplace=True)

    return _mac_rows("torch-cpu", make, lambda g: g.clone(), inplace, lambda g: g * 1.0, repeats, quick)


def _conv(repeats: int, quick: bool) -> list[Result]:
    out = []
    shape = (16, 64, 32, 32) if quick else (128, 64, 32, 32)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape, dtype=np.float32)
    kw = dict(stride=1, padding=1, bias=True)
    cand = lambda: maccore.conv2d_mean_patch(x, 3, **kw)  # noqa: E731
    base = lambda: maccore.conv2d_rows(x, 3, **kw).mean(axis=0)  # noqa: E731
    r = paired_ratios(cand, base, repeats=max(3, repeats // 2))
    out.append(Result(f"numpy conv2d_mean_patch {list(shape)} k3", "conv2d_rows(...).mean(0)", 1.0, r))
    tracemalloc.start()
    tracemalloc.reset_peak()
    cand()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out.append(Result("numpy conv2d_mean_patch peak extra memory", "input bytes", 1.2, [peak / x.nbytes],
                      unit="memory", note=f"peak {peak / 2**20:.1f} MiB, input {x.nbytes / 2**20:.1f} MiB"))
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return out
    xt = torch.from_numpy(x)
    cand = lambda: maccore.conv2d_mean_patch(xt, 3, **kw)  # noqa: E731
    base = lambda: F.unfold(xt, 3, padding=1).mean(dim=(0, 2))  # noqa: E731
    r = paired_ratios(cand, base, repeats=max(3, repeats // 2))
    out.append(Result(f"torch-cpu conv2d_mean_patch {list(shape)} k3", "F.unfold(x).mean", 1.0, r))
    return out


def _gpu(repeats: int, quick: bool) -> list[Result]:
    """Device bandwidth: effective bytes moved by mac_apply (read g twice, write once) per second,
    as a fraction of the device's copy bandwidth (read once, write once)."""
    out = []
    m = n = 4096 if quick else 8192
    try:
        import torch

        if torch.cuda.is_available():
            g = torch.randn(m, n, device="cuda")
            a = torch.randn(n, device="cuda")
            sync = torch.cuda.synchronize
            r = paired_ratios(lambda: g.clone(), lambda: maccore.mac_apply(g, a, 1.0), repeats=repeats,
                              inner=5, sync=sync)
            # ratio = t_copy / t_mac ; bandwidth fraction = (3 passes / t_mac) / (2 passes / t_copy)
            out.append(Result(f"torch-cuda mac_apply bandwidth f32 {m}x{n}", "device copy bandwidth", 0.7,
                              [1.5 * x for x in r], higher_is_better=True))
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            g = cupy.random.standard_normal((m, n), dtype=cupy.float32)
            a = cupy.random.standard_normal(n, dtype=cupy.float32)
            sync = cupy.cuda.Device().synchronize
            r = paired_ratios(lambda: g.copy(), lambda: maccore.mac_apply(g, a, 1.0), repeats=repeats,
                              inner=5, sync=sync)
            out.append(Result(f"cupy mac_apply bandwidth f32 {m}x{n}", "device copy bandwidth", 0.7,
                              [1.5 * x for x in r], higher_is_better=True))
    except Exception:
        pass
    return out


def run(repeats: int, quick: bool) -> list[Result]:
    return _numpy_mac(repeats, quick) + _torch_mac(repeats, quick) + _conv(repeats, quick) + _gpu(repeats, quick)
