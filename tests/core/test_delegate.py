"""Native fast paths (maccore/_delegate.py and the torch adapter's in-place MAC step) against the
standard-only formulation they replace."""

from __future__ import annotations

import numpy as np
import pytest

from maccore import _delegate
from tests.conftest import asarray, assert_close, to_numpy, tol

SPLIT_CASES = [  # (d_out, n, heads, bias)
    (1, 1, None, True),
    (7, 5, None, True),
    (7, 5, None, False),
    (64, 300, None, True),
    (12, 9, 3, True),
    (12, 9, 3, False),
    (24, 17, 12, True),
]


def _split_data(xp, dtype, d_out, n, heads, bias, seed=0):
    rng = np.random.default_rng(seed)
    gw = rng.standard_normal((d_out, n))
    gb = rng.standard_normal(d_out) if bias else None
    shape = (n + bias,) if heads is None else (heads, n + bias)
    a = rng.standard_normal(shape) + 0.5
    if bias:
        a[..., n] = 1.0
    coef = a / (0.7 + np.sum(a * a, axis=-1, keepdims=True))
    g_full = gw if gb is None else np.concatenate([gw, gb[:, None]], axis=1)
    if heads is None:
        want = g_full - np.outer(g_full @ a, coef)
    else:
        gh = g_full.reshape(heads, d_out // heads, -1)
        want = (gh - (gh @ a[:, :, None]) * coef[:, None, :]).reshape(d_out, -1)
    conv = lambda v: None if v is None else asarray(xp, v, dtype)  # noqa: E731
    return conv(gw), conv(gb), conv(a), conv(coef), g_full, want


@pytest.mark.parametrize("d_out,n,heads,bias", SPLIT_CASES)
def test_rank1_update_split_standard(xp, dtype, d_out, n, heads, bias):
    """The split (weight, bias) form equals the rank-1 update of the concatenated matrix."""
    gw, gb, a, coef, _, want = _split_data(xp, dtype, d_out, n, heads, bias)
    new_w, new_b = _delegate.rank1_update_split_standard(xp, gw, gb, a, coef)
    assert new_w.dtype == dtype and tuple(new_w.shape) == (d_out, n)
    assert_close(new_w, want[:, :n], **tol(xp, dtype))
    if bias:
        assert new_b.dtype == dtype and tuple(new_b.shape) == (d_out,)
        assert_close(new_b, want[:, n], **tol(xp, dtype))
    else:
        assert new_b is None
    # the dispatching entry point agrees with the standard form on every backend
    fw, fb = _delegate.rank1_update_split(xp, gw, gb, a, coef)
    assert_close(fw, to_numpy(new_w), **tol(xp, dtype))
    if bias:
        assert_close(fb, to_numpy(new_b), **tol(xp, dtype))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dt", ["float32", "float64"])
@pytest.mark.parametrize("d_out,n,heads,bias", SPLIT_CASES)
def test_rank1_update_split_torch_fast_path(dt, d_out, n, heads, bias, inplace):
    """torch mv/bmm + addr/baddbmm/addcmul (optionally in place) against the standard form."""
    torch = pytest.importorskip("torch")
    import array_api_compat

    xp = array_api_compat.array_namespace(torch.empty(0))
    dtype = getattr(torch, dt)
    gw, gb, a, coef, _, _ = _split_data(xp, dtype, d_out, n, heads, bias, seed=1)
    std_w, std_b = _delegate.rank1_update_split_standard(xp, gw, gb, a, coef)
    gw0, gb0 = gw.clone(), None if gb is None else gb.clone()
    fw, fb = _delegate.rank1_update_split(xp, gw, gb, a, coef, inplace=inplace)
    assert fw.dtype == dtype and fw.shape == gw.shape
    assert_close(fw, to_numpy(std_w), **tol(xp, dtype))
    if bias:
        assert_close(fb, to_numpy(std_b), **tol(xp, dtype))
    if inplace:  # written into the given tensors
        assert fw.data_ptr() == gw.data_ptr() and (not bias or fb.data_ptr() == gb.data_ptr())
    else:  # inputs untouched
        assert torch.equal(gw, gw0) and (not bias or torch.equal(gb, gb0))


def test_rank1_update_split_torch_parts_matches_unsplit():
    """The pre-split entry point (what the adapter caches) equals the unsplit one."""
    torch = pytest.importorskip("torch")
    import array_api_compat

    xp = array_api_compat.array_namespace(torch.empty(0))
    gw, gb, a, coef, _, _ = _split_data(xp, torch.float64, 12, 9, 3, True, seed=2)
    n = gw.shape[1]
    w1, b1 = _delegate.rank1_update_split(xp, gw, gb, a, coef)
    w2, b2 = _delegate.rank1_split_torch_parts(gw, gb, a[:, :n], a[:, n], coef[:, :n], coef[:, n], inplace=False)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)


@pytest.mark.parametrize("blas", [True, False])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("dt", ["float32", "float64", "float16"])
@pytest.mark.parametrize("chunk", [64, 4096, 1 << 19])
@pytest.mark.parametrize("m,n", [(1, 1), (33, 7), (300, 2000), (2000, 3), (0, 5), (4, 0)])
def test_rank1_numpy_fast_path(chunk, m, n, dt, layout, blas, monkeypatch):
    """The cache-blocked NumPy loop (BLAS ?ger through SciPy, or ufuncs) equals the standard form for
    any block size (1 row … the whole matrix), dtype and memory layout, and leaves ``g`` untouched."""
    import array_api_compat

    if blas and dt != "float16":
        pytest.importorskip("scipy")
    xp = array_api_compat.array_namespace(np.empty(0))
    monkeypatch.setattr(_delegate, "_CHUNK_BYTES", chunk)
    rng = np.random.default_rng(m + n)
    g = rng.standard_normal((m, 2 * n) if layout == "strided" else (m, n)).astype(dt)
    g = g[:, ::2] if layout == "strided" else (np.asfortranarray(g) if layout == "F" else g)
    a = rng.standard_normal(n).astype(dt)
    coef = (a / (1.0 + a.astype(np.float64) @ a)).astype(dt)
    g0 = g.copy()
    fast = _delegate._rank1_numpy(g, a, coef, blas=blas)
    std = _delegate.rank1_update_standard(xp, g, a, coef)
    assert fast.dtype == g.dtype and fast.shape == (m, n)
    assert np.array_equal(g, g0)
    if m and n:
        t = {"float16": 2e-2, "float32": 1e-5, "float64": 1e-12}[dt]
        np.testing.assert_allclose(fast.astype(np.float64), std.astype(np.float64), rtol=t,
                                   atol=t * max(1.0, float(np.abs(std.astype(np.float64)).max())))
    # the dispatching entry point takes the same path
    np.testing.assert_array_equal(_delegate.rank1_update(xp, g, a, coef), _delegate._rank1_numpy(g, a, coef))


def test_rank1_numpy_without_scipy(monkeypatch):
    """No SciPy: the ufunc loop, same result."""
    import array_api_compat

    xp = array_api_compat.array_namespace(np.empty(0))
    monkeypatch.setattr(_delegate, "_GER", {"f": None, "d": None})
    rng = np.random.default_rng(0)
    g = rng.standard_normal((50, 40)).astype(np.float32)
    a = rng.standard_normal(40).astype(np.float32)
    coef = (a / (1.0 + a @ a)).astype(np.float32)
    np.testing.assert_array_equal(_delegate.rank1_update(xp, g, a, coef), _delegate._rank1_numpy(g, a, coef, blas=False))


# ---------------------------------------------------------------------------------------------
# the torch adapter's in-place MAC step against the generic path (grad matrix → core apply → split)


def _adapter():
    torch = pytest.importorskip("torch")
    try:
        import maccore_torch
    except ImportError:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "adapters"))
        import maccore_torch
    return torch, maccore_torch


@pytest.mark.parametrize("cpu_blas", [False, True])
@pytest.mark.parametrize("scale", ["reference", "inverse"])
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_torch_adapter_inplace_step_equals_generic(scale, diagonal, dt, cpu_blas, monkeypatch):
    """The adapter's in-place step (torch kernels, or with ``cpu_blas`` the NumPy/BLAS kernel on
    shared memory, forced for these small layers) equals the core's apply on the gradient matrix."""
    torch, mt = _adapter()
    if cpu_blas:
        pytest.importorskip("scipy")
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", 0 if cpu_blas else 1 << 62)
    import maccore
    from torch import nn

    from maccore_torch._base import HookedPreconditioner

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.qkv = nn.Linear(4, 12)
            self.proj = nn.Linear(4, 4, bias=False)
            self.head = nn.Linear(4 * 4, 3)

        def forward(self, x):
            h = torch.relu(self.conv(x))  # [B, 4, 2, 2]
            t = h.flatten(2).transpose(1, 2)  # [B, 4 tokens, 4]
            b, n, d = t.shape
            q, k, v = self.qkv(t).reshape(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
            t = self.proj((att @ v).transpose(1, 2).reshape(b, n, d))
            return self.head(t.flatten(1))

    dtype = getattr(torch, dt)
    for mode in ("reference", "per_head", "off"):
        torch.manual_seed(0)
        model = Net().to(dtype)
        pre = mt.MACPreconditioner(model, damping=0.3, t_cov=1, t_inv=1, scale=scale, diagonal=diagonal,
                                   attention={"qkv": mt.QKV(num_heads=2, mode=mode)})
        x = torch.randn(5, 2, 2, 2, dtype=dtype)
        for _ in range(2):
            model.zero_grad()
            model(x).square().sum().backward()
            grads = {l.name: (l.weight.grad.clone(), None if l.bias is None else l.bias.grad.clone())
                     for l in pre.layers}
            ptrs = {l.name: l.weight.grad.data_ptr() for l in pre.layers}
            pre.step()
            for layer in pre.layers:
                gw, gb = grads[layer.name]
                mat = maccore.grad_matrix(gw, gb)
                want = pre._core(layer).apply(layer.state, mat)
                got = maccore.grad_matrix(layer.weight.grad, None if layer.bias is None else layer.bias.grad)
                t = {"rtol": 1e-5, "atol": 1e-6} if dt == "float32" else {"rtol": 1e-12, "atol": 1e-13}
                torch.testing.assert_close(got, want, **t)
                assert layer.weight.grad.data_ptr() == ptrs[layer.name]  # written in place
            # the generic path on the same gradients gives the same result
            layer = pre.layers[0]
            layer.weight.grad, layer.bias.grad = (g.clone() for g in grads[layer.name])
            HookedPreconditioner._precondition(pre, layer)
            want = pre._core(layer).apply(layer.state, maccore.grad_matrix(*grads[layer.name]))
            torch.testing.assert_close(maccore.grad_matrix(layer.weight.grad, layer.bias.grad), want,
                                       **({"rtol": 1e-5, "atol": 1e-6} if dt == "float32" else {}))


def test_torch_adapter_falls_back_for_low_precision_grads():
    """bfloat16 gradients (float32 statistics) take the generic path: core apply in float32."""
    torch, mt = _adapter()
    import maccore
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(torch.bfloat16)
    pre = mt.MACPreconditioner(model, damping=0.5, t_cov=1, t_inv=1)
    model(torch.randn(8, 6, dtype=torch.bfloat16)).float().square().sum().backward()
    grads = {l.name: (l.weight.grad.clone(), l.bias.grad.clone()) for l in pre.layers}
    pre.step()
    for layer in pre.layers:
        want = pre._core(layer).apply(layer.state, maccore.grad_matrix(*grads[layer.name]))
        got = maccore.grad_matrix(layer.weight.grad, layer.bias.grad)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("heads", [None, 3])
def test_rank1_update_split_torch_parts_scaled(heads):
    """``scale`` s with ``c = a``: the same as ``coef = s·a`` (how the adapter avoids a coef vector)."""
    torch = pytest.importorskip("torch")
    import array_api_compat

    xp = array_api_compat.array_namespace(torch.empty(0))
    gw, gb, a, coef, _, want = _split_data(xp, torch.float64, 12, 9, heads, True, seed=3)
    n = gw.shape[1]
    s = 1.0 / (0.7 + torch.sum(a * a, dim=-1, keepdim=True))
    if heads is None:
        s = s[0]
    w, b = _delegate.rank1_split_torch_parts(gw, gb, a[..., :n], a[..., n], a[..., :n], a[..., n],
                                            inplace=True, scale=s)
    torch.testing.assert_close(w, torch.as_tensor(want[:, :n]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, torch.as_tensor(want[:, n]), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# rank1_rows_numpy: in place, bias column and scale (the kernel behind NumPy and torch CPU)


@pytest.mark.parametrize("blas", [True, False])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("chunk", [64, 1 << 20])
@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_rank1_rows_numpy(dt, chunk, scaled, bias, inplace, blas, monkeypatch):
    """``out ← g − v coefᵀ``, ``v = s·(g a + gb·ab)``, ``gb_out ← gb − v·cb`` equals the float64
    dense formula on the concatenated matrix, for one-row blocks and one block, in place or not."""
    if blas:
        pytest.importorskip("scipy")
    monkeypatch.setattr(_delegate, "_CHUNK_BYTES", chunk)
    rng = np.random.default_rng(7)
    m, n = 37, 23
    g = rng.standard_normal((m, n)).astype(dt)
    gb = rng.standard_normal(m).astype(dt) if bias else None
    a = rng.standard_normal(n + 1).astype(dt)
    c = rng.standard_normal(n + 1).astype(dt)
    s = np.asarray(0.37, dtype=dt) if scaled else None
    full = g.astype(np.float64) if gb is None else np.concatenate([g, gb[:, None]], 1).astype(np.float64)
    af = a[: full.shape[1]].astype(np.float64)
    want = full - np.outer((0.37 if scaled else 1.0) * (full @ af), c[: full.shape[1]])
    g0, gb0 = g.copy(), None if gb is None else gb.copy()
    out = g if inplace else np.empty_like(g)
    gb_out = None if gb is None else (gb if inplace else np.empty_like(gb))
    _delegate.rank1_rows_numpy(g, a[:n], c[:n], out, gb=gb, ab=a[n], cb=c[n], gb_out=gb_out, scale=s, blas=blas)
    t = {"float32": 2e-5, "float64": 1e-12}[dt]
    np.testing.assert_allclose(out, want[:, :n], rtol=t, atol=t * np.abs(want).max())
    if bias:
        np.testing.assert_allclose(gb_out, want[:, n], rtol=t, atol=t * np.abs(want).max())
    if inplace:
        assert out is g and (gb_out is gb)
    else:  # inputs untouched
        assert np.array_equal(g, g0) and (gb is None or np.array_equal(gb, gb0))


def test_l2_bytes_parses_sysfs(tmp_path):
    """The block size follows the L2 size sysfs reports, clamped to [256 KiB, 4 MiB]."""
    f = tmp_path / "size"
    for text, want in [("1024K\n", 1 << 20), ("2M", 2 << 20), ("48K", 1 << 18), ("64M", 1 << 22)]:
        f.write_text(text)
        assert _delegate._l2_bytes(str(f)) == want
    f.write_text("garbage")
    assert _delegate._l2_bytes(str(f)) == 1 << 20
    assert _delegate._l2_bytes(str(tmp_path / "missing"), default=12345) == 12345


# ---------------------------------------------------------------------------------------------
# torch CPU tensors through the NumPy/BLAS kernel (shared memory) against torch's own kernels


def _torch_xp():
    torch = pytest.importorskip("torch")
    pytest.importorskip("scipy")
    import array_api_compat

    return torch, array_api_compat.array_namespace(torch.empty(0))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_torch_cpu_blas_path_equals_torch_kernels(dt, bias, inplace, monkeypatch):
    """Above the size threshold (here forced to 0) torch CPU tensors take rank1_rows_numpy; the
    result equals torch's mv + addr path, in place into the same storage or into a new tensor."""
    torch, xp = _torch_xp()
    dtype = getattr(torch, dt)
    gen = torch.Generator().manual_seed(3)
    gw = torch.randn(41, 29, generator=gen, dtype=dtype)
    gb = torch.randn(41, generator=gen, dtype=dtype) if bias else None
    a = torch.randn(30, generator=gen, dtype=dtype)
    s = torch.tensor(0.3, dtype=dtype)
    ab = a[29] if bias else None
    t = {"rtol": 1e-5, "atol": 1e-5} if dt == "float32" else {"rtol": 1e-12, "atol": 1e-12}
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", 1 << 62)  # torch's kernels
    assert not _delegate._cpu_blas_ok(gw, gb, a)
    want_w, want_b = _delegate.rank1_split_torch_parts(gw.clone(), None if gb is None else gb.clone(), a[:29], ab,
                                                       a[:29], ab, inplace=False, scale=s)
    want_f = _delegate.rank1_update(xp, gw, a[:29], a[:29] * s)
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", 0)  # the NumPy/BLAS kernel
    assert _delegate._cpu_blas_ok(gw, gb, a)
    gw0, gb0 = gw.clone(), None if gb is None else gb.clone()
    w, b = _delegate.rank1_split_torch_parts(gw, gb, a[:29], ab, a[:29], ab, inplace=inplace, scale=s)
    torch.testing.assert_close(w, want_w, **t)
    if bias:
        torch.testing.assert_close(b, want_b, **t)
    else:
        assert b is None
    if inplace:
        assert w.data_ptr() == gw.data_ptr() and (not bias or b.data_ptr() == gb.data_ptr())
    else:
        assert torch.equal(gw, gw0) and (not bias or torch.equal(gb, gb0))
    f = _delegate.rank1_update(xp, gw0, a[:29], a[:29] * s)
    assert f.dtype == dtype and f.is_contiguous()
    torch.testing.assert_close(f, want_f, **t)


def test_torch_cpu_blas_inplace_bumps_autograd_version(monkeypatch):
    """An in-place write through NumPy is visible to autograd: a tensor saved for backward and
    then preconditioned in place makes backward raise, exactly as with torch's own in-place ops."""
    torch, _ = _torch_xp()
    a = torch.randn(6)
    for blas_min in (0, 1 << 62):
        monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", blas_min)
        g = torch.randn(8, 6)
        w = torch.randn(8, 6, requires_grad=True)
        loss = (g * w).sum()  # saves g for backward
        v0 = g._version
        _delegate.rank1_split_torch_parts(g, None, a, None, a, None, inplace=True)
        assert g._version > v0
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_torch_cpu_blas_path_only_where_memory_can_be_shared(monkeypatch):
    """Autograd, low precision, non-contiguous, mixed dtypes, torch.func transforms and
    small gradients keep torch's own kernels."""
    torch, _ = _torch_xp()
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", 0)
    g = torch.randn(8, 6)
    a = torch.randn(6)
    assert _delegate._cpu_blas_ok(g, a)
    assert not _delegate._cpu_blas_ok(g.clone().requires_grad_(), a)
    assert not _delegate._cpu_blas_ok(g, a.clone().requires_grad_())
    assert not _delegate._cpu_blas_ok(g.to(torch.bfloat16), a.to(torch.bfloat16))
    assert not _delegate._cpu_blas_ok(g.half(), a.half())
    assert not _delegate._cpu_blas_ok(g.t(), torch.randn(8))
    assert not _delegate._cpu_blas_ok(g, a.double())
    assert not _delegate._cpu_blas_ok(g[None], a)
    assert not _delegate._cpu_blas_ok(torch.nn.Parameter(g), a)  # subclasses: torch's own kernels
    assert _delegate._cpu_blas_ok(g, a) and not g.requires_grad
    with torch.inference_mode():
        gi = torch.randn(8, 6)
    assert not _delegate._cpu_blas_ok(gi, a)  # torch forbids in-place updates of these outside
    seen = []
    torch.func.vmap(lambda x: seen.append(_delegate._cpu_blas_ok(x, a)) or x)(g[None].expand(2, 8, 6))
    assert seen == [False]
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", g.numel() + 1)
    assert not _delegate._cpu_blas_ok(g, a)


def test_torch_cpu_blas_path_propagates_nonfinite_silently(monkeypatch):
    """inf/nan in the gradient propagate as with torch's kernels, without NumPy warnings."""
    import warnings

    torch, xp = _torch_xp()
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", 0)
    g = torch.randn(9, 5)
    g[2, 3] = float("inf")
    g[4, 1] = float("nan")
    a = torch.randn(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _delegate.rank1_update(xp, g, a, a)
        w, _ = _delegate.rank1_split_torch_parts(g.clone(), None, a, None, a, None, inplace=True)
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", 1 << 62)
    want = _delegate.rank1_update(xp, g, a, a)
    for got in (out, w):
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
        torch.testing.assert_close(got[torch.isfinite(want)], want[torch.isfinite(want)])


@pytest.mark.parametrize("causal", [False, True])
def test_attention_probs_fused_softmax_equals_composed(xp, dtype, causal, monkeypatch):
    """torch / JAX: attention_probs uses the backend's fused softmax when no row can be fully masked;
    the result equals the standard max / exp / sum / divide composition."""
    import maccore

    rng = np.random.default_rng(11)
    q = asarray(xp, 3 * rng.standard_normal((2, 3, 5, 4)), dtype)
    k = asarray(xp, 3 * rng.standard_normal((2, 3, 5, 4)), dtype)
    fused = maccore.attention_probs(q, k, causal=causal)
    calls = []
    real = _delegate.softmax_last
    monkeypatch.setattr(_delegate, "softmax_last", lambda xp_, x: calls.append(1) or None)
    composed = maccore.attention_probs(q, k, causal=causal)
    assert calls == [1]  # the hook is consulted on this path
    assert_close(fused, to_numpy(composed), **tol(xp, dtype))
    import array_api_compat as compat

    has_fused = compat.is_torch_namespace(xp) or compat.is_jax_namespace(xp)
    assert (real(xp, composed) is not None) == has_fused
