"""Native fast paths (maccore/_delegate.py) against the standard-only formulation they replace and
a float64 dense formula, and the torch adapter's in-place step against the generic path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import maccore
from maccore import _delegate
from tests.conftest import asarray, assert_close, to_numpy, tol


@pytest.fixture(autouse=True)
def _blas_route_at_any_thread_count(monkeypatch):
    """The tests force torch CPU tensors onto the NumPy/BLAS kernel or off it with
    ``_CPU_BLAS_MIN``, whatever torch's thread count in the test process (the thread rule has its
    own test below)."""
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MAX_THREADS", 1 << 30)

MAC_CASES = [  # (d_out, n, heads, bias)
    (1, 1, None, True),
    (7, 5, None, True),
    (7, 5, None, False),
    (64, 300, None, True),
    (12, 9, 3, True),
    (12, 9, 3, False),
    (24, 17, 12, True),
]
ROW_SCALES = ["none", "inverse", "smac", "smac_inverse"]
LAM = 0.7


def _mac_data(d_out, n, heads, bias, row_scale, seed=0):
    """float64 NumPy operands of ``mac_rank1`` and the dense result
    ``diag(r) (G̃ − inv·(G̃ a) aᵀ)`` per row block, with ``inv = 1/(λ + aᵀa)``."""
    rng = np.random.default_rng(seed)
    gw = rng.standard_normal((d_out, n))
    gb = rng.standard_normal(d_out) if bias else None
    shape = (n + bias,) if heads is None else (heads, n + bias)
    a = rng.standard_normal(shape) + 0.5
    if bias:
        a[..., n] = 1.0
    inv = 1.0 / (LAM + np.sum(a * a, axis=-1, keepdims=True))  # [1] or [H, 1]
    inv = inv.reshape(()) if heads is None else inv
    z = rng.uniform(0.1, 2.0, d_out)
    rs = {"none": None, "inverse": 1.0 / LAM, "smac": 1.0 / (z + LAM),
          "smac_inverse": 1.0 / (z + LAM) / LAM}[row_scale]
    g_full = gw if gb is None else np.concatenate([gw, gb[:, None]], axis=1)
    d_t = g_full.shape[1]
    a2 = a.reshape(-1, d_t)
    inv2 = np.asarray(inv).reshape(-1)
    r = d_out // a2.shape[0]
    want = np.empty_like(g_full)
    for h in range(a2.shape[0]):  # one dense [d̃, d̃] matrix per row block
        M = np.eye(d_t) - inv2[h] * np.outer(a2[h], a2[h])
        want[h * r:(h + 1) * r] = g_full[h * r:(h + 1) * r] @ M
    if rs is not None:
        want = want * (np.reshape(rs, (-1, 1)) if np.ndim(rs) else rs)
    return gw, gb, a, inv, rs, want


def _conv(xp, dtype, v):
    if v is None or isinstance(v, float):
        return v
    return asarray(xp, np.asarray(v), dtype)


def _check_split(w, b, want, n, bias, t):
    assert_close(w, want[:, :n], **t)
    if bias:
        assert_close(b, want[:, n], **t)
    else:
        assert b is None


@pytest.mark.parametrize("row_scale", ROW_SCALES)
@pytest.mark.parametrize("d_out,n,heads,bias", MAC_CASES)
def test_mac_rank1_standard_equals_dense(xp, dtype, d_out, n, heads, bias, row_scale):
    """The standard-only form equals the dense formula on every backend (one factor / per head,
    bias column split or absent, no / scalar / per-row scales)."""
    gw, gb, a, inv, rs, want = _mac_data(d_out, n, heads, bias, row_scale)
    c = lambda v: _conv(xp, dtype, v)  # noqa: E731
    w, b = _delegate.mac_rank1_standard(xp, c(gw), c(gb), c(a), c(inv), c(rs))
    assert w.dtype == dtype and tuple(w.shape) == (d_out, n)
    _check_split(w, b, want, n, bias, tol(xp, dtype))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("row_scale", ROW_SCALES)
@pytest.mark.parametrize("d_out,n,heads,bias", MAC_CASES)
def test_mac_rank1_equals_standard(xp, dtype, d_out, n, heads, bias, row_scale, inplace):
    """The dispatching entry point: ``None`` (the caller's standard path) or the standard result,
    written into the inputs when ``inplace`` (NumPy, torch), leaving them untouched otherwise."""
    gw, gb, a, inv, rs, want = _mac_data(d_out, n, heads, bias, row_scale, seed=1)
    c = lambda v: _conv(xp, dtype, v)  # noqa: E731
    args = (c(gw), c(gb), c(a), c(inv), c(rs))
    std_w, std_b = _delegate.mac_rank1_standard(xp, *args)
    g0 = [None if v is None else to_numpy(v).copy() for v in args[:2]]
    got = _delegate.mac_rank1(xp, *args, inplace=inplace)
    if got is None:  # no fast path for this backend / shape
        return
    w, b = got
    t = tol(xp, dtype)
    assert w.dtype == dtype and tuple(w.shape) == (d_out, n)
    _check_split(w, b, want, n, bias, t)
    assert_close(w, to_numpy(std_w), **t)
    if bias:
        assert_close(b, to_numpy(std_b), **t)
    if inplace:
        assert w is args[0] and (not bias or b is args[1])
    else:
        assert np.array_equal(to_numpy(args[0]), g0[0])
        assert not bias or np.array_equal(to_numpy(args[1]), g0[1])


def _torch_xp():
    torch = pytest.importorskip("torch")
    import array_api_compat

    return torch, array_api_compat.array_namespace(torch.empty(0))


@pytest.mark.parametrize("cpu_blas", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("row_scale", ROW_SCALES)
@pytest.mark.parametrize("dt", ["float32", "float64"])
@pytest.mark.parametrize("d_out,n,heads,bias", MAC_CASES)
def test_mac_rank1_torch_paths(d_out, n, heads, bias, dt, row_scale, inplace, cpu_blas, monkeypatch):
    """torch: the NumPy/BLAS kernel on shared memory (``cpu_blas``: forced on for these small
    tensors, one factor only) and torch's mv/addr (bmm/baddbmm per head) kernels both equal the
    dense formula and the standard form, in place into the same storage or into new tensors."""
    torch, xp = _torch_xp()
    if cpu_blas:
        pytest.importorskip("scipy")
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", 0 if cpu_blas else 1 << 62)
    dtype = getattr(torch, dt)
    gw, gb, a, inv, rs, want = _mac_data(d_out, n, heads, bias, row_scale, seed=2)
    c = lambda v: _conv(xp, dtype, v)  # noqa: E731
    args = (c(gw), c(gb), c(a), c(inv), c(rs))
    std_w, std_b = _delegate.mac_rank1_standard(xp, *args)
    if heads is None:  # which kernel runs
        assert _delegate._cpu_blas_ok(args[0], args[1], args[2]) == cpu_blas
    ptrs = (args[0].data_ptr(), None if gb is None else args[1].data_ptr())
    g0 = [None if v is None else v.clone() for v in args[:2]]
    w, b = _delegate.mac_rank1(xp, *args, inplace=inplace)
    t = {"rtol": 1e-5, "atol": 1e-5} if dt == "float32" else {"rtol": 1e-12, "atol": 1e-12}
    _check_split(w, b, want, n, bias, t)
    torch.testing.assert_close(w, std_w, **t)
    if bias:
        torch.testing.assert_close(b, std_b, **t)
    if inplace:
        assert w.data_ptr() == ptrs[0] and (not bias or b.data_ptr() == ptrs[1])
    else:
        assert torch.equal(args[0], g0[0]) and (not bias or torch.equal(args[1], g0[1]))


def test_rank1_split_torch_parts_matches_standard():
    """The pre-split torch kernel (explicit ``coef``, per head) equals the standard form."""
    torch, xp = _torch_xp()
    gw, gb, a, inv, _, want = _mac_data(12, 9, 3, True, "none", seed=3)
    gw, gb, a, inv = (torch.as_tensor(v) for v in (gw, gb, a, inv))
    coef = a * inv
    n = gw.shape[1]
    w, b = _delegate.rank1_split_torch_parts(gw, gb, a[:, :n], a[:, n], coef[:, :n], coef[:, n], inplace=False)
    sw, sb = _delegate.mac_rank1_standard(xp, gw, gb, a, inv, None)
    torch.testing.assert_close(w, sw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, sb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w, torch.as_tensor(want[:, :n]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("heads", [None, 3])
def test_rank1_split_torch_parts_scaled(heads):
    """``scale`` s with ``c = a``: the same as ``coef = s·a`` (no second vector of size d̃)."""
    torch, _ = _torch_xp()
    gw, gb, a, inv, _, want = _mac_data(12, 9, heads, True, "none", seed=4)
    gw, gb, a, inv = (torch.as_tensor(v) for v in (gw, gb, a, inv))
    n = gw.shape[1]
    w, b = _delegate.rank1_split_torch_parts(gw, gb, a[..., :n], a[..., n], a[..., :n], a[..., n],
                                            inplace=True, scale=inv)
    torch.testing.assert_close(w, torch.as_tensor(want[:, :n]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, torch.as_tensor(want[:, n]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("blas", [True, False])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("dt", ["float32", "float64", "float16"])
@pytest.mark.parametrize("chunk", [64, 4096, 1 << 19])
@pytest.mark.parametrize("m,n", [(1, 1), (33, 7), (300, 2000), (2000, 3), (0, 5), (4, 0)])
def test_mac_rank1_numpy_blocks(chunk, m, n, dt, layout, blas, monkeypatch):
    """NumPy: the cache-blocked loop (BLAS ?ger through SciPy, or ufuncs) equals the standard form
    for any block size (1 row … the whole matrix) and leaves ``g`` untouched; layouts and dtypes it
    does not take (Fortran order, strided views, float16) are left to the standard path (``None``)."""
    import array_api_compat

    if blas and dt != "float16":
        pytest.importorskip("scipy")
    else:
        monkeypatch.setattr(_delegate, "_GER", {"f": None, "d": None, "e": None})
    xp = array_api_compat.array_namespace(np.empty(0))
    monkeypatch.setattr(_delegate, "_CHUNK_BYTES", chunk)
    rng = np.random.default_rng(m + n)
    g = rng.standard_normal((m, 2 * n) if layout == "strided" else (m, n)).astype(dt)
    g = g[:, ::2] if layout == "strided" else (np.asfortranarray(g) if layout == "F" else g)
    a = rng.standard_normal(n).astype(dt)
    inv = np.asarray(1.0 / (1.0 + a.astype(np.float64) @ a), dtype=dt)
    g0 = g.copy()
    got = _delegate.mac_rank1(xp, g, None, a, inv, None)
    if dt == "float16" or (layout != "C" and not g.flags.c_contiguous):
        assert got is None
        return
    fast, fb = got
    std, _ = _delegate.mac_rank1_standard(xp, g, None, a, inv, None)
    assert fb is None and fast.dtype == g.dtype and fast.shape == (m, n)
    assert np.array_equal(g, g0)
    if m and n:
        t = {"float32": 1e-5, "float64": 1e-12}[dt]
        np.testing.assert_allclose(fast.astype(np.float64), std.astype(np.float64), rtol=t,
                                   atol=t * max(1.0, float(np.abs(std.astype(np.float64)).max())))


def test_mac_rank1_numpy_without_scipy(monkeypatch):
    """No SciPy: the ufunc loop, the same result as with BLAS."""
    import array_api_compat

    pytest.importorskip("scipy")
    xp = array_api_compat.array_namespace(np.empty(0))
    rng = np.random.default_rng(0)
    g = rng.standard_normal((50, 40)).astype(np.float32)
    gb = rng.standard_normal(50).astype(np.float32)
    a = rng.standard_normal(41).astype(np.float32)
    inv = np.asarray(1.0 / (1.0 + a @ a), dtype=np.float32)
    w1, b1 = _delegate.mac_rank1(xp, g, gb, a, inv, None)
    monkeypatch.setattr(_delegate, "_GER", {"f": None, "d": None})
    w2, b2 = _delegate.mac_rank1(xp, g, gb, a, inv, None)
    np.testing.assert_allclose(w1, w2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b1, b2, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the torch adapter's in-place MAC step against the generic path (grad matrix → method.apply → split)


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


def _generic(maccore, pre, layer, gw, gb):
    """The preconditioned gradients by the generic path: grad matrix → method.apply → split."""
    mat = maccore.grad_matrix(gw, gb)
    out = pre.curvature.apply(layer.spec, layer.state, mat)
    return maccore.split_grad_matrix(out, tuple(gw.shape), bias=gb is not None)


@pytest.mark.parametrize("cpu_blas", [False, True])
@pytest.mark.parametrize("scale", ["reference", "inverse"])
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_torch_adapter_inplace_step_equals_generic(scale, diagonal, dt, cpu_blas, monkeypatch):
    """The adapter's step (``maccore.engine.apply_split`` in place: torch kernels, or with
    ``cpu_blas`` the NumPy/BLAS kernel on shared memory, forced for these small layers) writes into
    the existing ``.grad`` tensors exactly what the generic path computes."""
    torch, mt = _adapter()
    if cpu_blas:
        pytest.importorskip("scipy")
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", 0 if cpu_blas else 1 << 62)
    import maccore
    from torch import nn

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
    t = {"rtol": 1e-5, "atol": 1e-6} if dt == "float32" else {"rtol": 1e-12, "atol": 1e-13}
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
            ptrs = {l.name: (l.weight.grad.data_ptr(), None if l.bias is None else l.bias.grad.data_ptr())
                    for l in pre.layers}
            pre.step()
            for layer in pre.layers:
                want_w, want_b = _generic(maccore, pre, layer, *grads[layer.name])
                torch.testing.assert_close(layer.weight.grad, want_w, **t)
                assert layer.weight.grad.data_ptr() == ptrs[layer.name][0]  # written in place
                if layer.bias is not None:
                    torch.testing.assert_close(layer.bias.grad, want_b, **t)
                    assert layer.bias.grad.data_ptr() == ptrs[layer.name][1]


def test_torch_adapter_low_precision_grads_in_place():
    """bfloat16 gradients (float32 statistics): computed in float32, written back into the
    bfloat16 ``.grad`` tensors; equal to the generic path."""
    torch, mt = _adapter()
    import maccore
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(torch.bfloat16)
    pre = mt.MACPreconditioner(model, damping=0.5, t_cov=1, t_inv=1)
    model(torch.randn(8, 6, dtype=torch.bfloat16)).float().square().sum().backward()
    grads = {l.name: (l.weight.grad.clone(), l.bias.grad.clone()) for l in pre.layers}
    ptrs = {l.name: l.weight.grad.data_ptr() for l in pre.layers}
    pre.step()
    for layer in pre.layers:
        want_w, want_b = _generic(maccore, pre, layer, *grads[layer.name])
        assert layer.weight.grad.dtype == torch.bfloat16 and layer.weight.grad.data_ptr() == ptrs[layer.name]
        torch.testing.assert_close(layer.weight.grad, want_w)
        torch.testing.assert_close(layer.bias.grad, want_b)


def test_torch_adapter_channels_last_in_place_graph_grads_replaced():
    """A channels-last conv gradient (no ``[d_out, -1]`` view) is still rewritten in place; a
    gradient that is part of a graph (``create_graph=True``) is replaced by a new tensor. Both equal
    the generic path."""
    torch, mt = _adapter()
    import maccore
    from torch import nn

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2)).double()
    pre = mt.MACPreconditioner(model, damping=0.5, t_cov=1, t_inv=1)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    model(x).square().sum().backward()
    conv, lin = pre.layers
    conv.weight.grad = conv.weight.grad.contiguous(memory_format=torch.channels_last)
    assert not conv.weight.grad.is_contiguous()
    lin.weight.grad = lin.weight.grad.clone().requires_grad_()
    grads = {l.name: (l.weight.grad.detach().clone(), l.bias.grad.clone()) for l in pre.layers}
    conv_grad, lin_grad = conv.weight.grad, lin.weight.grad
    pre.step()
    assert conv.weight.grad is conv_grad and lin.weight.grad is not lin_grad
    for layer in pre.layers:
        want_w, want_b = _generic(maccore, pre, layer, *grads[layer.name])
        torch.testing.assert_close(layer.weight.grad.detach(), want_w, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(layer.bias.grad, want_b, rtol=1e-12, atol=1e-13)


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


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_rank1_rows_blas1_holds_blas_at_one_thread(inplace, bias, monkeypatch):
    """The kernel runs with the BLAS libraries at one thread (seen from inside the kernel) and
    restores their setting; the result is the kernel's, with the bias column, in place or not."""
    pytest.importorskip("threadpoolctl")
    ctl = _delegate._blas_controller()
    if ctl is None:
        pytest.skip("threadpoolctl finds no BLAS library")
    seen = []
    real = _delegate.rank1_rows_numpy

    def spy(*args, **kw):
        seen.append([lib.num_threads for lib in ctl.lib_controllers])
        return real(*args, **kw)

    rng = np.random.default_rng(3)
    m, n = 41, 19
    g = rng.standard_normal((m, n))
    gb = rng.standard_normal(m) if bias else None
    a, c = rng.standard_normal(n), rng.standard_normal(n)
    kw = dict(ab=0.3, cb=-0.7) if bias else {}
    want, want_b = np.empty_like(g), None if gb is None else np.empty_like(gb)
    real(g, a, c, want, gb=gb, gb_out=want_b, scale=np.float64(0.2), **kw)
    with ctl.limit(limits=2):  # a threaded BLAS, as a user's default would be
        before = [lib.num_threads for lib in ctl.lib_controllers]
        g2, gb2 = g.copy(), None if gb is None else gb.copy()
        out = g2 if inplace else np.empty_like(g)
        out_b = None if gb is None else (gb2 if inplace else np.empty_like(gb))
        monkeypatch.setattr(_delegate, "rank1_rows_numpy", spy)
        _delegate.rank1_rows_blas1(g2, a, c, out, gb=gb2, gb_out=out_b, scale=np.float64(0.2), **kw)
        assert [lib.num_threads for lib in ctl.lib_controllers] == before
    assert seen == [[1] * len(before)]
    assert np.array_equal(out, want)
    if bias:
        assert np.array_equal(out_b, want_b)
    if inplace:
        assert out is g2 and (out_b is gb2)
    else:
        assert np.array_equal(g2, g) and (gb is None or np.array_equal(gb2, gb))


def test_mac_apply_numpy_holds_blas_at_one_thread(monkeypatch):
    """NumPy's mac_apply takes the one-BLAS-thread kernel and equals the standard-only path."""
    calls = []
    real = _delegate.rank1_rows_blas1
    monkeypatch.setattr(_delegate, "rank1_rows_blas1",
                        lambda *args, **kw: calls.append(args[0].shape) or real(*args, **kw))
    rng = np.random.default_rng(0)
    g, a = rng.standard_normal((30, 7)), rng.standard_normal(7)
    got = maccore.mac_apply(g, a, 0.5)
    monkeypatch.setattr(_delegate, "FAST_PATHS", False)
    want = maccore.mac_apply(g, a, 0.5)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    assert calls == [(30, 7)]


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


def _torch_blas_xp():
    torch, xp = _torch_xp()
    pytest.importorskip("scipy")
    return torch, xp


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_torch_cpu_blas_path_equals_torch_kernels(dt, bias, inplace, monkeypatch):
    """Above the size threshold (here forced to 0) torch CPU tensors take rank1_rows_numpy; the
    result equals torch's mv + addr path, in place into the same storage or into a new tensor."""
    torch, xp = _torch_blas_xp()
    dtype = getattr(torch, dt)
    gen = torch.Generator().manual_seed(3)
    gw = torch.randn(41, 29, generator=gen, dtype=dtype)
    gb = torch.randn(41, generator=gen, dtype=dtype) if bias else None
    a = torch.randn(29 + bias, generator=gen, dtype=dtype)
    s = torch.tensor(0.3, dtype=dtype)
    t = {"rtol": 1e-5, "atol": 1e-5} if dt == "float32" else {"rtol": 1e-12, "atol": 1e-12}
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", 1 << 62)  # torch's kernels
    assert not _delegate._cpu_blas_ok(gw, gb, a)
    want_w, want_b = _delegate.mac_rank1(xp, gw.clone(), None if gb is None else gb.clone(), a, s, None)
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", 0)  # the NumPy/BLAS kernel
    assert _delegate._cpu_blas_ok(gw, gb, a)
    gw0, gb0 = gw.clone(), None if gb is None else gb.clone()
    w, b = _delegate.mac_rank1(xp, gw, gb, a, s, None, inplace=inplace)
    torch.testing.assert_close(w, want_w, **t)
    if bias:
        torch.testing.assert_close(b, want_b, **t)
    else:
        assert b is None
    if inplace:
        assert w.data_ptr() == gw.data_ptr() and (not bias or b.data_ptr() == gb.data_ptr())
    else:
        assert torch.equal(gw, gw0) and (not bias or torch.equal(gb, gb0))
        assert w.dtype == dtype and w.is_contiguous()


def test_torch_cpu_blas_path_above_one_thread_only_with_blas_held(monkeypatch):
    """With more torch intra-op threads than ``_CPU_BLAS_MAX_THREADS`` (default one), torch CPU
    tensors take the BLAS kernel only in place and with the BLAS held at one thread
    (threadpoolctl); otherwise they keep torch's kernels — a threaded BLAS would compete with
    torch's pool. Both routes give the same result."""
    torch, xp = _torch_blas_xp()
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", 0)
    g, a = torch.randn(40, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MAX_THREADS", 1)
    old = torch.get_num_threads()
    held = _delegate._blas_controller() is not None
    calls = []
    real = _delegate.rank1_rows_blas1
    monkeypatch.setattr(_delegate, "rank1_rows_blas1",
                        lambda *args, **kw: calls.append(args[0].shape[0]) or real(*args, **kw))
    try:
        torch.set_num_threads(1)
        assert _delegate._cpu_blas_ok(g, None, a)
        torch.set_num_threads(2)
        assert _delegate._cpu_blas_ok(g, None, a) == held
        assert not _delegate._cpu_blas_ok(g, None, a, inplace=False)  # out of place: torch's
        got = g.clone()
        maccore.mac_apply(got, a, 0.5, out=got)
        assert calls == ([40] if held else [])
        assert not torch.equal(maccore.mac_apply(g, a, 0.5), g) and calls == ([40] if held else [])
        monkeypatch.setattr(_delegate, "_CPU_BLAS_ONE_THREAD", False)
        assert not _delegate._cpu_blas_ok(g, None, a)
        want = maccore.mac_apply(g, a, 0.5)  # torch's mv + addr
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    finally:
        torch.set_num_threads(old)


def test_torch_cpu_blas_inplace_bumps_autograd_version(monkeypatch):
    """An in-place write through NumPy is visible to autograd: a tensor saved for backward and
    then preconditioned in place makes backward raise, exactly as with torch's own in-place ops."""
    torch, _ = _torch_blas_xp()
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
    torch, _ = _torch_blas_xp()
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

    torch, xp = _torch_blas_xp()
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", 0)
    g = torch.randn(9, 5)
    g[2, 3] = float("inf")
    g[4, 1] = float("nan")
    a = torch.randn(5)
    s = torch.tensor(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = _delegate.mac_rank1(xp, g, None, a, s, None)
        w, _ = _delegate.mac_rank1(xp, g.clone(), None, a, s, None, inplace=True)
    monkeypatch.setattr(_delegate, "_CPU_BLAS_MIN", 1 << 62)
    want, _ = _delegate.mac_rank1(xp, g, None, a, s, None)
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
