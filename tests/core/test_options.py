"""Every mode, kind and option of the core parametrised explicitly — not left to random draws —
each against an independent float64 oracle (NumPy from the definitions, or ``maccore.testing``'s
dense references), plus the paths mutation testing found unchecked (``python -m
benchmarks.mutation``, benchmarks/README.md): input dtypes other than the statistics dtype,
``out=`` arrays, heads, the first-layer inverse, float64 retries, zero-size shapes, namespace
checks. Hypothesis adds random breadth in the per-module test files.

JAX is left out here: eager XLA compiles every new shape (the same code paths run jitted in the
``test_jit_equals_eager`` tests of the per-module files).
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

import maccore as mc
from maccore import engine
from maccore.ema import EmaState, ema_weight
from maccore.rows import normalize_padding
from maccore.singd import singd as singd_factory
from maccore.testing import kfac_damped_matrix, kfac_damped_solve, mac_dense_preconditioner
from tests.conftest import _selected_backends, asarray, assert_close, load_backend, to_numpy, tol
from tests.core.helpers import assert_like, rand
from tests.core.test_rows import im2col_loops

BACKENDS = [b for b in _selected_backends() if b != "jax.numpy"]


@pytest.fixture(params=BACKENDS)
def xp(request):
    return load_backend(request.param)


def low_dtype(xp, name):
    dt = getattr(xp, name, None)
    if dt is None:
        pytest.skip(f"{xp.__name__} has no {name}")
    return dt


def cast(xp, a, dtype):
    """float64 data → ``dtype`` (via float32 for half types); returns (exact float64 copy, array)."""
    arr = asarray(xp, a, xp.float32 if dtype not in (xp.float32, xp.float64) else dtype)
    arr = arr if arr.dtype == dtype else xp.astype(arr, dtype)
    return to_numpy(arr), arr


def other_backend(xp):
    """A second namespace for the mixed-namespace checks (NumPy, or array_api_strict on NumPy)."""
    import array_api_compat

    if "array_api_strict" in xp.__name__:
        return array_api_compat.array_namespace(np.empty(0))
    return pytest.importorskip("array_api_strict")


def lowp_tol(dtype_name):
    return {"rtol": 2e-2, "atol": 2e-2} if dtype_name == "bfloat16" else {"rtol": 4e-3, "atol": 4e-3}


# =============================================================================================
# MAC


def mac_oracle(g, mean, lam, *, scale, z=None):
    """Row blocks of ``g`` times the dense damped MAC inverse of their head's mean, then
    ``diag(1/(z + λ))`` (float64, maccore.testing's stable dense form)."""
    m = np.atleast_2d(mean)
    rows = g.shape[0] // m.shape[0]
    out = np.concatenate([g[h * rows:(h + 1) * rows] @ mac_dense_preconditioner(m[h], lam, scale=scale)
                          for h in range(m.shape[0])])
    return out if z is None else out / (z + lam)[:, None]


@pytest.mark.parametrize("scale", ["reference", "inverse"])
@pytest.mark.parametrize("smac", [False, True], ids=["mac", "smac"])
@pytest.mark.parametrize("heads", [None, 1, 3], ids=["1d", "h1", "h3"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_mac_apply_every_option(xp, dtype, scale, smac, heads, split):
    rng = np.random.default_rng(1)
    lam = 0.3
    g_np, g = rand(xp, dtype, rng, 6, 5)
    shape = (5,) if heads is None else (heads, 5)
    a_np, a = rand(xp, dtype, rng, *shape, shift=0.7)
    z_np, z = (None, None) if not smac else rand(xp, dtype, rng, 6, scale=0.5, shift=1.0)
    want = mac_oracle(g_np, a_np, lam, scale=scale, z=z_np)
    t = tol(xp, dtype, 4)
    if split:
        w, b = mc.mac_apply(g[:, :4], a, lam, scale=scale, grad_diag=z, grad_bias=g[:, 4])
        assert_like(w, g)
        assert_like(b, g)
        assert_close(w, want[:, :4], **t)
        assert_close(b, want[:, 4], **t)
    else:
        out = mc.mac_apply(g, a, lam, scale=scale, grad_diag=z)
        assert_like(out, g)
        assert_close(out, want, **t)


@pytest.mark.parametrize("low", ["float16", "bfloat16"])
@pytest.mark.parametrize("heads", [None, 3])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_mac_apply_half_precision_gradients(xp, low, heads, split):
    """Half-precision gradients with a float32 mean: computed in float32, returned in the
    gradient's dtype."""
    dt = low_dtype(xp, low)
    rng = np.random.default_rng(2)
    g_np, g = cast(xp, rng.standard_normal((6, 5)), dt)
    a_np, a = rand(xp, xp.float32, rng, *((5,) if heads is None else (heads, 5)), shift=0.5)
    want = mac_oracle(g_np, a_np, 0.5, scale="inverse")
    if split:
        w, b = mc.mac_apply(g[:, :4], a, 0.5, scale="inverse", grad_bias=g[:, 4])
        assert w.dtype == dt and b.dtype == dt
        assert_close(w, want[:, :4], **lowp_tol(low))
        assert_close(b, want[:, 4], **lowp_tol(low))
    else:
        out = mc.mac_apply(g, a, 0.5, scale="inverse")
        assert out.dtype == dt
        assert_close(out, want, **lowp_tol(low))


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_mac_apply_float32_gradient_float64_statistics(xp, split):
    """A float64 mean makes the computation float64 (standard path); the float32 result is the
    float64 oracle rounded once, for the bias column too."""
    rng = np.random.default_rng(3)
    g_np, g = rand(xp, xp.float32, rng, 4, 5)
    a_np, a = rand(xp, xp.float64, rng, 5, shift=1.0)
    z_np, z = rand(xp, xp.float32, rng, 4, shift=1.0)
    want = mac_oracle(g_np, a_np, 0.2, scale="reference", z=np.abs(z_np))
    t = {"rtol": 2 * float(np.finfo(np.float32).eps), "atol": 4 * float(np.finfo(np.float32).eps)}
    zz = xp.abs(z)
    if split:
        w, b = mc.mac_apply(g[:, :4], a, 0.2, grad_diag=zz, grad_bias=g[:, 4])
        assert w.dtype == xp.float32 and b.dtype == xp.float32
        assert_close(w, want[:, :4], **t)
        assert_close(b, want[:, 4], **t)
    else:
        out = mc.mac_apply(g, a, 0.2, grad_diag=zz)
        assert out.dtype == xp.float32
        assert_close(out, want, **t)


def test_mac_apply_smac_diagonal_of_another_dtype(xp):
    """A float32 ẑ with float64 statistics is widened, not the computation narrowed."""
    rng = np.random.default_rng(23)
    g_np, g = rand(xp, xp.float64, rng, 4, 5)
    a_np, a = rand(xp, xp.float64, rng, 5, shift=1.0)
    z_np, z = rand(xp, xp.float32, rng, 4, scale=0.3, shift=1.0)
    for split in (False, True):
        out = mc.mac_apply(g[:, :4], a, 0.2, grad_diag=z, grad_bias=g[:, 4]) if split else \
            mc.mac_apply(g, a, 0.2, grad_diag=z)
        out = xp.concat([out[0], xp.reshape(out[1], (4, 1))], axis=1) if split else out
        assert out.dtype == xp.float64
        assert_close(out, mac_oracle(g_np, a_np, 0.2, scale="reference", z=z_np), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("R", [None, 0.25])
def test_smac_diag_reduction_factor(xp, R):
    """mac(diagonal=True, diag_reduction_factor=R): ẑ = (1/R) Σ_rows g⊙g; None: E_rows[g⊙g]."""
    rng = np.random.default_rng(24)
    pc = mc.mac(decay=0.0, damping=0.5, diagonal=True, diag_reduction_factor=R)
    s = pc.init(3, 2, xp=xp, dtype=xp.float64)
    gr_np, gr = rand(xp, xp.float64, rng, 6, 2)
    s = pc.refresh(pc.update(s, rand(xp, xp.float64, rng, 6, 3)[1], gr))
    want = (gr_np**2).mean(axis=0) if R is None else (gr_np**2).sum(axis=0) / R
    assert_close(s.diag_hat, want, **tol(xp, xp.float64))


@pytest.mark.parametrize("mixed", [False, True], ids=["same-dtype", "float64-mean"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("where", ["new", "inplace"])
def test_mac_apply_out(xp, mixed, split, where):
    """``out=``: the result lands in the given arrays (new ones: the inputs stay untouched; the
    inputs themselves: in place), on the fast and the standard (mixed dtype) paths."""
    if "array_api_strict" in xp.__name__:
        pytest.skip("array_api_strict arrays are immutable (out= raises TypeError, tested below)")
    rng = np.random.default_rng(4)
    g_np, g = rand(xp, xp.float32, rng, 4, 6)
    a_np, a = rand(xp, xp.float64 if mixed else xp.float32, rng, 6, shift=1.0)
    want = mac_oracle(g_np, a_np, 0.4, scale="reference")
    t = tol(xp, xp.float32, 2)
    gw, gb = g[:, :5], g[:, 5]
    if "torch" in xp.__name__:
        gw, gb = gw.contiguous(), gb.contiguous()
    if where == "new":
        outs = (xp.zeros((4, 5), dtype=xp.float32), xp.zeros((4,), dtype=xp.float32)) if split else \
            xp.zeros((4, 6), dtype=xp.float32)
    else:
        outs = (gw, gb) if split else g
    if split:
        res = mc.mac_apply(gw, a, 0.4, grad_bias=gb, out=outs)
        assert res[0] is outs[0] and res[1] is outs[1]
        assert_close(outs[0], want[:, :5], **t)
        assert_close(outs[1], want[:, 5], **t)
        if where == "new":
            assert_close(gw, g_np[:, :5], rtol=0, atol=0)
            assert_close(gb, g_np[:, 5], rtol=0, atol=0)
    else:
        res = mc.mac_apply(g, a, 0.4, out=outs)
        assert res is outs
        assert_close(outs, want, **t)
        if where == "new":
            assert_close(g, g_np, rtol=0, atol=0)


def test_mac_apply_out_checked(xp):
    g = xp.ones((3, 4), dtype=xp.float32)
    a = xp.ones((4,), dtype=xp.float32)
    with pytest.raises(ValueError, match="'out' must have the shape and dtype"):
        mc.mac_apply(g, a, 1.0, out=xp.zeros((3, 5), dtype=xp.float32))
    with pytest.raises(ValueError, match="'out' must have the shape and dtype"):
        mc.mac_apply(g, a, 1.0, out=xp.zeros((3, 4), dtype=xp.float64))
    with pytest.raises(ValueError, match=r"'out \(bias\)' must have"):
        mc.mac_apply(g[:, :3], a, 1.0, grad_bias=g[:, 3], out=(g[:, :3], xp.zeros((4,), dtype=xp.float32)))
    with pytest.raises(TypeError, match="out must be a pair"):
        mc.mac_apply(g[:, :3], a, 1.0, grad_bias=g[:, 3], out=g)
    with pytest.raises(ValueError, match="'out' must have the shape and dtype"):
        mc.mac_apply(g, a, 1.0, out=object())
    with pytest.raises(ValueError, match="'out' must have the shape and dtype"):
        mc.mac_apply(g, a, 1.0, out=types.SimpleNamespace(shape=(3, 4)))
    if "array_api_strict" in xp.__name__:
        with pytest.raises(TypeError, match="immutable"):
            mc.mac_apply(g, a, 1.0, out=xp.zeros((3, 4), dtype=xp.float32))


@pytest.mark.parametrize("smac", [False, True], ids=["mac", "smac"])
@pytest.mark.parametrize("grads", ["float32", "float64"])
def test_first_layer_apply(xp, smac, grads):
    """Ĝ (A + λI)⁻¹, left-multiplied by diag(1/(ẑ + λ)) for SMAC; computed in the inverse's
    dtype (float64 here, also for float32 gradients and a float32 ẑ), returned in the gradient's."""
    rng = np.random.default_rng(5)
    gdt = getattr(xp, grads)
    g_np, g = rand(xp, gdt, rng, 3, 4)
    M = rng.standard_normal((6, 4))
    inv_np = np.linalg.inv(M.T @ M / 6 + 0.3 * np.eye(4))
    inv = asarray(xp, inv_np)
    z_np, z = rand(xp, xp.float32, rng, 3, shift=2.0)
    out = mc.first_layer_apply(g, inv, 0.3, grad_diag=z if smac else None)
    assert_like(out, g)
    want = g_np @ inv_np
    if smac:
        want = want / (z_np + 0.3)[:, None]
    t = tol(xp, gdt) if grads == "float32" else {"rtol": 1e-13, "atol": 1e-13}
    assert_close(out, want, **t)


@pytest.mark.parametrize("scale", ["reference", "inverse"])
@pytest.mark.parametrize("smac", [False, True], ids=["mac", "smac"])
@pytest.mark.parametrize("heads", [None, 1, 2], ids=["1d", "h1", "h2"])
def test_mac_to_dense_every_option(xp, dtype, scale, smac, heads):
    """to_dense = D ⊗ (ââᵀ + λI)/s, block-diagonal over heads (d_out > H and d̃ > 1, so a wrong head
    or row block shows), and apply multiplies with its inverse."""
    rng = np.random.default_rng(6)
    lam, d_out, d_t = 0.4, 4, 3
    pc = mc.mac(decay=0.0, damping=lam, scale=scale, diagonal=smac)
    s = pc.init(d_t, d_out, xp=xp, heads=heads, dtype=dtype)
    for leaf in (s.mean.value, s.mean.weight, s.mean_hat) + ((s.diag.value, s.diag_hat) if smac else ()):
        assert_like(leaf, s.mean.value, dtype=dtype)
    shape = (d_t,) if heads is None else (heads, d_t)
    m_np, m = rand(xp, dtype, rng, *shape, shift=0.5)
    gr_np, gr = rand(xp, dtype, rng, 7, d_out)
    s = pc.refresh(pc.update(s, grad_rows=gr if smac else None, mean=m))
    blocks = np.atleast_2d(m_np)
    rows = d_out // blocks.shape[0]
    z = (gr_np**2).mean(axis=0) + lam if smac else np.ones(d_out)
    s_ = lam if scale == "reference" else 1.0
    want = np.zeros((d_out * d_t, d_out * d_t))
    for r in range(d_out):
        a = blocks[r // rows]
        want[r * d_t:(r + 1) * d_t, r * d_t:(r + 1) * d_t] = z[r] * (np.outer(a, a) + lam * np.eye(d_t)) / s_
    dense = pc.to_dense(s, d_out)
    assert_like(dense, s.mean_hat)
    assert_close(dense, want, **tol(xp, dtype, 2))
    g_np, g = rand(xp, dtype, rng, d_out, d_t)
    assert_close(pc.apply(s, g), np.linalg.solve(want, g_np.reshape(-1)).reshape(d_out, d_t),
                 **tol(xp, dtype, 8))


@pytest.mark.parametrize("smac", [False, True], ids=["mac", "smac"])
def test_mac_to_dense_with_first_layer_inverse(xp, dtype, smac):
    """With a first-layer inverse the curvature of every row is (A + λI) (times ẑ + λ for SMAC),
    whatever the scale; the inverse is given in float64, the state may be float32."""
    rng = np.random.default_rng(7)
    lam, d_out, d_t = 0.25, 3, 4
    method = engine.mac_method(damping=lam, diagonal=smac)
    spec = mc.LayerSpec(mc.LayerKind.LINEAR, d_t - 1, d_out, True)
    X = rng.standard_normal((9, d_t))
    A = X.T @ X / 9
    st = engine.with_first_layer(method.init(spec, xp=xp, dtype=dtype),
                                 asarray(xp, np.linalg.inv(A + lam * np.eye(d_t))))
    z = np.ones(d_out)
    if smac:
        gr_np, gr = rand(xp, dtype, rng, 5, d_out)
        pooled = engine.pool_stats({}, method.input_statistics(spec, st, rand(xp, dtype, rng, 5, d_t - 1)[1]))
        pooled = engine.pool_stats(pooled, method.grad_statistics(spec, st, gr))
        fin = method.finalize(spec, st, pooled)
        st = method.refresh(spec, method.update(spec, st, {k: v for k, (v, w) in fin.items()}))
        z = (gr_np**2).mean(axis=0) + lam
    dense = method.curvature_dense(spec, st)
    assert dense.dtype == st.mean_hat.dtype
    assert_close(dense, np.kron(np.diag(z), A + lam * np.eye(d_t)), **tol(xp, dtype, 4))
    g_np, g = rand(xp, dtype, rng, d_out, d_t)
    out = method.apply(spec, st, g)
    assert_like(out, g)
    assert_close(out, g_np @ np.linalg.inv(A + lam * np.eye(d_t)) / z[:, None], **tol(xp, dtype, 4))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", [None, "bool", "bool-NM", "bool-B1NM", "additive", "additive-inf",
                                  "additive-other-dtype"])
def test_attention_probs_every_mask(xp, dtype, causal, mask):
    """softmax over keys of every causal × mask combination against a NumPy oracle, with rows of
    very different score magnitudes (the row max must be taken per row) and fully masked rows
    (zeros); probabilities in the statistics dtype."""
    rng = np.random.default_rng(8)
    b, h, n, dh = 2, 2, 4, 3
    q_np = rng.standard_normal((b, h, n, dh))
    q_np[:, :, 1] *= 2000.0 if dtype == xp.float64 else 200.0  # far beyond exp's range
    q_np, q = cast(xp, q_np, dtype)
    k_np, k = rand(xp, dtype, rng, b, h, n, dh)
    s = q_np @ np.swapaxes(k_np, -1, -2) / math.sqrt(dh)
    keep = np.ones((b, h, n, n), dtype=bool)
    if causal:
        keep &= np.tril(np.ones((n, n), dtype=bool))
    m = None
    if mask is not None and mask.startswith("bool"):
        shape = {"bool": (b, h, n, n), "bool-NM": (n, n), "bool-B1NM": (b, 1, n, n)}[mask]
        mk = rng.random(shape) < 0.6
        mk[..., 0] = mask != "bool"  # "bool": key 0 masked too, so some rows are fully masked
        mk[..., 2, :] = False  # query 2 sees nothing
        keep &= np.broadcast_to(mk, keep.shape)
        m = asarray(xp, mk)
    elif mask is not None:
        bias = rng.standard_normal((b, 1, n, n))
        if mask == "additive-inf":
            bias[..., 3, 1:] = -np.inf
        mdt = xp.float64 if mask == "additive-other-dtype" and dtype == xp.float32 else (
            xp.float32 if mask == "additive-other-dtype" else dtype)
        bias, m = cast(xp, bias, mdt)
        s = s + bias
    p = mc.attention_probs(q, k, causal=causal, mask=m)
    assert_like(p, q, dtype=dtype)
    z = np.where(keep, s, -np.inf)
    mx = z.max(axis=-1, keepdims=True)
    e = np.where(keep & np.isfinite(z), np.exp(z - np.where(np.isfinite(mx), mx, 0.0)), 0.0)
    tot = e.sum(axis=-1, keepdims=True)
    want = e / np.where(tot > 0, tot, 1.0)
    # the scores' own rounding (relative to their size) passes into the probabilities
    err = 8 * float(np.abs(s[np.isfinite(s)]).max()) * float(xp.finfo(dtype).eps)
    assert_close(p, want, **{k: v + err for k, v in tol(xp, dtype, 2).items()})
    if mask == "bool":
        assert np.all(to_numpy(p)[..., 2, :] == 0)


def test_attention_probs_integer_inputs(xp):
    """Integer queries and keys are accepted; the softmax runs in float32."""
    q = xp.reshape(xp.arange(12, dtype=xp.int32), (1, 1, 4, 3)) % 3
    k = xp.reshape(xp.arange(12, dtype=xp.int32), (1, 1, 4, 3)) % 2
    p = mc.attention_probs(q, k, causal=True)
    assert p.dtype == xp.float32
    s = to_numpy(q) @ to_numpy(k)[0, 0].T / math.sqrt(3)
    z = np.where(np.tril(np.ones((4, 4), dtype=bool)), s, -np.inf)
    want = np.exp(z - z.max(-1, keepdims=True))
    assert_close(p, want / want.sum(-1, keepdims=True), **tol(xp, xp.float32))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dts", [("float64", "float32"), ("float32", "float64"), ("int32", "float64")],
                         ids=lambda d: "-".join(d))
def test_attention_probs_mixed_dtypes(xp, causal, dts):
    """q and k of different dtypes: both are taken in q's statistics dtype (as x's in
    attention_weighted_mean), so the probabilities have one dtype whatever k's is."""
    rng = np.random.default_rng(8)
    b, h, n, dh = 2, 2, 3, 4
    qdt, kdt = getattr(xp, dts[0]), getattr(xp, dts[1])
    if dts[0] == "int32":
        q = xp.astype(asarray(xp, rng.integers(-2, 3, (b, h, n, dh))), qdt)
        q_np = to_numpy(q)
    else:
        q_np, q = rand(xp, qdt, rng, b, h, n, dh)
    k_np, k = rand(xp, kdt, rng, b, h, n, dh)
    p = mc.attention_probs(q, k, causal=causal)
    sdt = xp.float64 if dts[0] == "float64" else xp.float32
    assert_like(p, q, dtype=sdt)
    s = q_np @ np.swapaxes(k_np, -1, -2) / math.sqrt(dh)
    if causal:
        s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    assert_close(p, e / e.sum(axis=-1, keepdims=True), **tol(xp, sdt))


@pytest.mark.parametrize("mode", ["reference", "per_head"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dts", [("float64", "float32"), ("float32", "float64"), ("int32", "float32")],
                         ids=lambda d: "-".join(d))
def test_attention_weighted_mean_mixed_dtypes(xp, mode, bias, dts):
    """x and attn of different dtypes: both are taken in x's statistics dtype, so float64 inputs
    are averaged in float64 even with float32 probabilities."""
    rng = np.random.default_rng(9)
    b, h, n, d = 2, 3, 4, 2
    xdt, adt = getattr(xp, dts[0]), getattr(xp, dts[1])
    if dts[0] == "int32":
        x = xp.astype(asarray(xp, rng.integers(-3, 4, (b, n, d))), xdt)
        x_np = to_numpy(x)
    else:
        x_np, x = rand(xp, xdt, rng, b, n, d)
    logits = rng.standard_normal((b, h, n, n))
    attn_np, attn = cast(xp, np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), adt)
    out = mc.attention_weighted_mean(x, attn, bias=bias, mode=mode)
    sdt = xp.float64 if dts[0] == "float64" else xp.float32
    assert_like(out, x, dtype=sdt)
    xt = np.concatenate([x_np, np.ones((b, n, 1))], axis=-1) if bias else x_np
    if mode == "reference":
        want = attn_np.mean(axis=(0, 1, 2)) @ xt.mean(axis=0)
    else:
        want = np.einsum("bhij,bjd->hd", attn_np, xt) / (b * n)
    if bias:  # exactly 1 by construction
        want[..., -1] = 1.0
    t = {"rtol": 1e-13, "atol": 1e-13} if sdt == xp.float64 else tol(xp, xp.float32)
    assert_close(out, want, **t)


def test_statistics_of_integer_rows(xp):
    """Integer rows and gradient rows are accepted by every statistic (taken in float32)."""
    x_np = np.arange(12).reshape(4, 3) % 5 - 2.0
    x = xp.astype(asarray(xp, x_np), xp.int32)
    t = tol(xp, xp.float32)
    for got, want in ((mc.mean_activation(x), x_np.mean(0)), (mc.input_factor(x), x_np.T @ x_np / 4),
                      (mc.gradient_factor(x, reduction_factor=0.5), x_np.T @ x_np / 0.5),
                      (mc.gradient_diagonal(x), (x_np**2).mean(0)),
                      (mc.gradient_diagonal(x, reduction_factor=2.0), (x_np**2).sum(0) / 2.0)):
        assert got.dtype == xp.float32
        assert_close(got, want, **t)


def test_statistics_of_empty_and_featureless_rows(xp):
    """No rows raises; rows without features give empty statistics (the check is on axis 0)."""
    none, featureless = xp.zeros((0, 3), dtype=xp.float32), xp.zeros((4, 0), dtype=xp.float32)
    for f in (mc.mean_activation, mc.input_factor, mc.gradient_diagonal):
        with pytest.raises(ValueError, match="has no rows"):
            f(none)
    assert tuple(mc.mean_activation(featureless).shape) == (0,)
    assert tuple(mc.input_factor(featureless).shape) == (0, 0)
    assert tuple(mc.gradient_diagonal(featureless).shape) == (0,)


def test_mixed_namespaces_and_missing_arrays_raise(xp):
    """Every entry point names an array from another library, and a missing one, as TypeError from
    its own checks (instead of failing later inside the maths, or in a helper, with another
    error)."""
    oxp = other_backend(xp)
    g, a, M, G = xp.ones((2, 3)), xp.ones((3,)), xp.eye(3), xp.eye(2)
    og, oa, oM, oG = oxp.ones((2, 3)), oxp.ones((3,)), oxp.eye(3), oxp.eye(2)
    q, oq = xp.ones((1, 1, 2, 3)), oxp.ones((1, 1, 2, 3))
    pc = mc.kfac(mode="exact")
    s = pc.init(3, 2, xp=xp)
    e = mc.ema_init((3,), xp=xp)
    ms = mc.mac().init(3, xp=xp)
    mixed = [
        lambda: mc.mac_apply(og, a, 1.0), lambda: mc.mac_apply(g, oa, 1.0),
        lambda: mc.mac_apply(g, a, 1.0, grad_diag=oxp.ones((2,))),
        lambda: mc.mac_apply(g[:, :2], a, 1.0, grad_bias=oxp.ones((2,))),
        lambda: mc.first_layer_apply(og, M, 1.0), lambda: mc.first_layer_apply(g, oM, 1.0),
        lambda: mc.first_layer_apply(g, M, 1.0, grad_diag=oxp.ones((2,))),
        lambda: mc.attention_probs(oq, q), lambda: mc.attention_probs(q, oq),
        lambda: mc.attention_probs(q, q, mask=oxp.ones((2, 2), dtype=oxp.bool)),
        lambda: mc.attention_weighted_mean(oxp.ones((1, 2, 3)), xp.ones((1, 1, 2, 2)), bias=True),
        lambda: mc.attention_weighted_mean(xp.ones((1, 2, 3)), oxp.ones((1, 1, 2, 2)), bias=True),
        lambda: mc.kfac_apply(og, M, G, 0.1), lambda: mc.kfac_apply(g, oM, G, 0.1),
        lambda: mc.kfac_apply(g, M, oG, 0.1), lambda: mc.kfac_dense(M, oG), lambda: mc.kfac_dense(oM, G),
        lambda: mc.pi_dampings(M, oG, 0.1),
        lambda: pc.update(s, A=oM, G=xp.eye(2, dtype=xp.float32)),
        lambda: pc.update(s, A=xp.eye(3, dtype=xp.float32), G=oG), lambda: pc.apply(s, og),
        lambda: mc.ema_update(e, oa, decay=0.5), lambda: mc.ema_update(mc.ema_init((3,), xp=oxp), a, decay=0.5),
    ]
    missing = [
        lambda: mc.mac_apply(None, a, 1.0), lambda: mc.mac_apply(g, None, 1.0),
        lambda: mc.first_layer_apply(None, M, 1.0), lambda: mc.first_layer_apply(g, None, 1.0),
        lambda: mc.attention_weighted_mean(None, xp.ones((1, 1, 2, 2)), bias=True),
        lambda: mc.kfac_apply(None, M, G, 0.1), lambda: mc.kfac_apply(g, M, None, 0.1),
        lambda: mc.kfac_dense(None, G), lambda: mc.kfac_dense(M, None), lambda: mc.damped_inverse(None, 1.0),
        lambda: mc.input_factor(None), lambda: mc.gradient_factor(None, reduction_factor=1.0),
        lambda: mc.ema_update(e, None, decay=0.5), lambda: mc.ema_update(e._replace(value=None), a, decay=0.5),
        lambda: mc.ema_debiased(e._replace(value=None), decay=0.5),
        lambda: ema_weight(e._replace(value=None, weight=None), decay=0.5),
        lambda: pc.update(s._replace(a=s.a._replace(value=None)), A=xp.eye(3), G=G),
        lambda: mc.mac().update(ms._replace(mean=ms.mean._replace(value=None)), mean=a),
        lambda: pc.apply(s, None),
    ]
    for i, f in enumerate(mixed):
        with pytest.raises(TypeError, match="mixed namespaces") as err:
            f()
            pytest.fail(f"mixed case {i} did not raise")
        assert not str(err.value).startswith("ema_update") or i >= len(mixed) - 2, (i, err.value)
    for i, f in enumerate(missing):
        with pytest.raises(TypeError, match="must be an array, got None"):
            f()
            pytest.fail(f"missing case {i} did not raise")
    with pytest.raises(ValueError, match="does not broadcast to the scores"):
        mc.attention_probs(q, q, mask=xp.ones((3, 2), dtype=xp.bool))
    for k in (xp.ones((2, 1, 2, 3)), xp.ones((1, 2, 2, 3)), xp.ones((1, 1, 2, 2))):
        with pytest.raises(ValueError, match="must agree in batch, heads and head dim"):
            mc.attention_probs(q, k)
    with pytest.raises(TypeError, match="must be an array"):
        mc.attention_weighted_mean(None, xp.ones((1, 1, 2, 2)), bias=True)
    for f in (lambda: mc.mean_activation(None), lambda: mc.gradient_diagonal(None),
              lambda: mc.split_qkv(None, 2), lambda: mc.attention_probs(None, q)):
        with pytest.raises(TypeError, match="must be an array, got None"):
            f()
    for n in (2.0, True, 0):
        with pytest.raises(ValueError, match="num_heads must be a positive integer"):
            mc.split_qkv(xp.ones((1, 2, 6)), n)
    for attn in (xp.ones((1, 1, 3, 2)), xp.ones((1, 1, 2, 3)), xp.ones((2, 1, 2, 2))):
        with pytest.raises(ValueError, match="'attn' of shape .* does not match 'x'"):
            mc.attention_weighted_mean(xp.ones((1, 2, 3)), attn, bias=True)
    st = mc.mac().init(3, xp=xp)
    with pytest.raises(TypeError, match="mac.update: arrays from mixed namespaces"):
        mc.mac().update(st, mean=oxp.ones((3,), dtype=oxp.float32))
    with pytest.raises(ValueError, match=r"'q' \[1, 1, 2, 0\] has head dimension 0"):
        mc.attention_probs(xp.ones((1, 1, 2, 0)), xp.ones((1, 1, 2, 0)))
    for f in (lambda: mc.gradient_diagonal(g, reduction_factor=(1.0, 2.0)),
              lambda: mc.mac(diagonal=True, diag_reduction_factor=(1.0, 2.0))):
        with pytest.raises(TypeError, match="single positive number"):
            f()
    with pytest.raises(ValueError, match="'grad_bias' of shape \\[3\\] must be \\[2\\]"):
        mc.mac_apply(g[:, :2], a, 1.0, grad_bias=xp.ones((3,)))
    with pytest.raises(ValueError, match="'inverse' of shape \\[2, 2\\] does not match"):
        mc.first_layer_apply(g, xp.eye(2), 1.0)


@pytest.mark.parametrize("mode", ["tikhonov", "pi", "exact"])
def test_damping_below_the_dtype_range(xp, mode):
    """A damping that rounds to a subnormal in the computation's dtype is refused by the entry
    point itself, in every mode (exact mode inverts no factor that would check it)."""
    g, M = xp.ones((2, 3), dtype=xp.float32), xp.eye(3, dtype=xp.float32)
    with pytest.raises(ValueError, match="kfac_apply: damping 1e-46 is below the smallest normal"):
        mc.kfac_apply(g, M, xp.eye(2, dtype=xp.float32), 1e-46, mode=mode)


def test_pair_dampings_only_where_meaningful():
    """A (λ_G, λ_A) pair is KFAC-tikhonov only: MAC, π/exact KFAC and single inverses refuse it."""
    M = np.eye(3)
    for f in (lambda: mc.mac(damping=(0.1, 0.2)), lambda: mc.damped_inverse(M, (0.1, 0.2)),
              lambda: mc.pi_dampings(M, M, (0.1, 0.2)), lambda: mc.mac_apply(np.ones((2, 3)), np.ones(3), (0.1, 0.2)),
              lambda: mc.kfac(mode="pi", damping=(0.1, 0.2)), lambda: mc.kfac(mode="exact", damping=(0.1, 0.2)),
              # a reduction factor is one number (a pair would broadcast over G's columns)
              lambda: mc.gradient_factor(np.ones((4, 2)), reduction_factor=(1.0, 2.0))):
        with pytest.raises((TypeError, ValueError), match="single positive number|only meaningful"):
            f()
    mc.kfac(mode="tikhonov", damping=(0.1, 0.2))  # accepted


# =============================================================================================
# KFAC

KFAC_CASES = [("tikhonov", 0.3), ("tikhonov", (0.2, 0.7)), ("pi", 0.3), ("exact", 0.3)]
KFAC_IDS = ["tikhonov", "tikhonov-pair", "pi", "exact"]


def _factors(rng, d_t=4, d_out=3, low_rank=False):
    X = rng.standard_normal((1 if low_rank else 8, d_t)) + 0.5
    Gr = rng.standard_normal((8, d_out)) * 2.0
    return X.T @ X / X.shape[0], Gr.T @ Gr / 8


@pytest.mark.parametrize(("mode", "damping"), KFAC_CASES, ids=KFAC_IDS)
@pytest.mark.parametrize("low_rank", [False, True], ids=["full", "rank1"])
def test_kfac_apply_every_mode(xp, dtype, mode, damping, low_rank):
    rng = np.random.default_rng(10)
    A_np, G_np = _factors(rng, low_rank=low_rank)
    A_np, A = cast(xp, A_np, dtype)
    G_np, G = cast(xp, G_np, dtype)
    g_np, g = rand(xp, dtype, rng, 3, 4)
    out = mc.kfac_apply(g, A, G, damping, mode=mode)
    assert_like(out, g)
    assert_close(out, kfac_damped_solve(g_np, A_np, G_np, damping, mode=mode), **tol(xp, dtype, 8))


@pytest.mark.parametrize(("mode", "damping"), KFAC_CASES, ids=KFAC_IDS)
@pytest.mark.parametrize("grads", ["float16", "bfloat16", "float64"])
def test_kfac_apply_gradient_dtype_differs_from_statistics(xp, mode, damping, grads):
    """Half-precision gradients with float32 factors come back in their own dtype; a float64
    gradient with float32 factors is preconditioned in float64 (factors widened, not the gradient
    narrowed)."""
    gdt = low_dtype(xp, grads)
    rng = np.random.default_rng(11)
    A_np, A = cast(xp, _factors(rng)[0], xp.float32)
    G_np, G = cast(xp, _factors(rng)[1], xp.float32)
    g_np, g = cast(xp, rng.standard_normal((3, 4)), gdt)
    out = mc.kfac_apply(g, A, G, damping, mode=mode)
    assert out.dtype == gdt
    want = kfac_damped_solve(g_np, A_np, G_np, damping, mode=mode)
    assert_close(out, want, **(lowp_tol(grads) if grads != "float64" else {"rtol": 1e-10, "atol": 1e-10}))


@pytest.mark.parametrize(("mode", "damping"), KFAC_CASES, ids=KFAC_IDS)
def test_kfac_preconditioner_every_mode(xp, dtype, mode, damping):
    """The stateful KFAC in each mode: the initial state (dtype, identity cache), EMA of the
    factors, refresh (inverses or eigendecompositions), apply and to_dense against
    maccore.testing's dense damped matrices (π-mode included)."""
    rng = np.random.default_rng(12)
    decay = 0.6
    pc = mc.kfac(decay=decay, damping=damping, mode=mode)
    s = pc.init(4, 3, xp=xp, dtype=dtype)
    for leaf in s:
        if leaf is not None and not isinstance(leaf, tuple):
            assert_like(leaf, s.a.value)
    g_np, g = rand(xp, dtype, rng, 3, 4)
    first = pc.apply(s, g)  # before any statistics: identity cache (exact: the eigenvalues are 0)
    assert_like(first, g)
    assert_close(first, g_np / (damping if mode == "exact" else 1.0), **tol(xp, dtype))
    As, Gs = [], []
    for i in range(3):
        A_np, G_np = _factors(rng, low_rank=i == 1)
        A_np, A = cast(xp, A_np, dtype)
        G_np, G = cast(xp, G_np, dtype)
        s = pc.update(s, A=A, G=G)
        As.append(A_np)
        Gs.append(G_np)
    s = pc.refresh(s)
    w = np.array([(1 - decay) * decay ** (3 - i) for i in range(1, 4)]) / (1 - decay**3)
    A_np = np.tensordot(w, np.stack(As), axes=1)
    G_np = np.tensordot(w, np.stack(Gs), axes=1)
    t = tol(xp, dtype, 8)
    if mode == "exact":
        assert_close(s.a_evals, np.linalg.eigvalsh(A_np), **t)
        assert_close(s.g_evals, np.linalg.eigvalsh(G_np), **t)
    dense = pc.to_dense(s)
    assert_like(dense, s.a.value)
    assert_close(dense, kfac_damped_matrix(A_np, G_np, damping, mode=mode), **t)
    out = pc.apply(s, g)
    assert_like(out, g)
    assert_close(out, kfac_damped_solve(g_np, A_np, G_np, damping, mode=mode), **t)


def test_damped_inverse_retries_in_float64(xp):
    """M + λI singular in float32 (λ = 1e-10 is lost next to 1) but not in float64: the float64
    inverse is returned in float32."""
    M = xp.ones((2, 2), dtype=xp.float32)
    inv = mc.damped_inverse(M, 1e-10)
    assert_like(inv, M)
    want = np.linalg.inv(np.ones((2, 2)) + 1e-10 * np.eye(2))
    assert_close(inv, want, rtol=1e-5, atol=0, scale=1.0)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_damped_inverse_that_overflows_float32(xp):
    """M + λI singular in float32 and invertible in float64 only with an inverse beyond float32's
    range (an indefinite M; λ − |M| = 1e-40): a DecompositionError, not an infinite inverse."""
    M = asarray(xp, np.array([[-1e-30]]), xp.float32)
    lam = float(np.float32(1e-30)) + 1e-40
    with pytest.raises(mc.DecompositionError, match="exists in float64 but overflows .*float32"):
        mc.damped_inverse(M, lam)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_exact_mode_retries_the_eigendecomposition_in_float64(xp):
    """A factor whose symmetrisation overflows float32 is decomposed in float64."""
    pc = mc.kfac(decay=0.5, damping=0.1, mode="exact")
    s = pc.init(2, 2, xp=xp, dtype=xp.float32)
    A = asarray(xp, np.diag([2.5e38, 1.0]), xp.float32)
    s = pc.refresh(pc.update(s, A=A, G=xp.eye(2, dtype=xp.float32)))
    assert s.a_evals.dtype == xp.float32
    assert_close(s.a_evals, np.array([1.0, 2.5e38]), rtol=1e-6, atol=0, scale=1.0)
    assert_close(xp.abs(s.a_inv), np.array([[0.0, 1.0], [1.0, 0.0]]), rtol=0, atol=1e-6, scale=1.0)


# =============================================================================================
# EMA


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 0)])
def test_ema_zero_size(xp, shape):
    s = mc.ema_init(shape, xp=xp, dtype=xp.float64)
    s = mc.ema_update(s, xp.zeros(shape, dtype=xp.float64), decay=0.9)
    d = mc.ema_debiased(s, decay=0.9)
    assert tuple(d.shape) == shape and int(s.count) == 1


@pytest.mark.parametrize("shape", [(-1,), (2, -3), (True,), (2.0,), [3], (np.float64(3),), "3"])
def test_ema_rejects_bad_shapes(xp, shape):
    with pytest.raises(ValueError, match="shape must be a tuple of non-negative ints"):
        mc.ema_init(shape, xp=xp)


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_ema_integer_statistic_and_power_fallback(xp, dt):
    """An integer statistic is folded in the state's dtype; a state without ``weight`` debiases
    with 1 − β^count computed in the value's dtype."""
    dtype = getattr(xp, dt)
    s = mc.ema_update(mc.ema_init((3,), xp=xp, dtype=dtype), xp.asarray([1, 2, 3]), decay=0.75)
    assert s.value.dtype == dtype
    assert_close(s.value, 0.25 * np.array([1.0, 2.0, 3.0]), **tol(xp, dtype))
    hand = EmaState(count=xp.asarray(3, dtype=xp.int32), value=asarray(xp, [0.5, -1.0], dtype))
    w = ema_weight(hand, decay=0.75)
    assert_like(w, hand.value)
    assert_close(w, np.asarray(1 - 0.75**3), **tol(xp, dtype))
    assert_close(mc.ema_debiased(hand, decay=0.75), np.array([0.5, -1.0]) / (1 - 0.75**3), **tol(xp, dtype))


def test_ema_power_fallback_on_another_device():
    """The power fallback builds β on the state's device (array_api_strict refuses to mix)."""
    strict = pytest.importorskip("array_api_strict")
    dev = strict.Device("device1")
    hand = EmaState(count=strict.asarray(2, dtype=strict.int32, device=dev),
                    value=strict.asarray([0.19, 0.38], dtype=strict.float32, device=dev))
    w = ema_weight(hand, decay=0.9)
    assert w.device == dev and w.dtype == strict.float32
    assert_close(mc.ema_debiased(hand, decay=0.9), np.array([1.0, 2.0]), **tol(strict, strict.float32))


# =============================================================================================
# rows: conv geometry, dispatch through LayerSpec

# (kernel, stride, padding, dilation, depthwise): stride, dilation, "same" (odd/even kernels,
# with and without dilation), "valid", asymmetric padding, one-sided geometry
CONV_CASES = [
    ((3, 3), (1, 1), 0, (1, 1), False),
    ((3, 2), (2, 1), 1, (1, 1), False),
    ((2, 3), (1, 2), (1, 0), (2, 1), False),
    ((3, 3), (1, 1), "same", (1, 1), False),
    ((2, 2), (1, 1), "same", (1, 1), False),
    ((3, 2), (1, 1), "same", (2, 3), False),
    ((2, 2), (1, 1), "valid", (1, 2), False),
    ((3, 3), (2, 2), ((1, 0), (0, 2)), (1, 1), False),
    ((1, 1), (2, 3), ((0, 1), (2, 0)), (1, 1), False),
    ((3, 3), (1, 1), ((2, 0), (0, 0)), (1, 1), False),
    ((3, 3), (1, 1), "same", (2, 2), True),
    ((2, 3), (2, 1), ((0, 1), (1, 1)), (1, 2), True),
]


@pytest.mark.parametrize(("k", "stride", "padding", "dilation", "depthwise"), CONV_CASES,
                         ids=[f"k{c[0]}-s{c[1]}-p{c[2]}-d{c[3]}{'-dw' if c[4] else ''}".replace(" ", "")
                              for c in CONV_CASES])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_geometry_through_layer_spec(xp, k, stride, padding, dilation, depthwise, bias):
    """ConvSpec normalises the geometry; to_rows / to_grad_rows / the engine's mean patch of a
    conv LayerSpec equal the loop im2col in expand and reduce form."""
    rng = np.random.default_rng(13)
    n, c, h, w = 2, 3, 6, 7
    x_np, x = rand(xp, xp.float64, rng, n, c, h, w)
    cs = mc.ConvSpec(kernel_size=k, stride=stride, padding=padding, dilation=dilation,
                     groups=c if depthwise else 1)
    rows_np, (oh, ow) = im2col_loops(x_np, k, stride, padding, dilation, depthwise=depthwise)
    d_in = rows_np.shape[1]
    spec = mc.LayerSpec(mc.LayerKind.CONV2D, d_in, c if depthwise else 4, bias, conv=cs)
    if bias:
        rows_np = np.concatenate([rows_np, np.ones((rows_np.shape[0], 1))], axis=1)
    assert mc.conv2d_output_size((h, w), k, stride=stride, padding=cs.padding, dilation=dilation) == (oh, ow)
    t = tol(xp, xp.float64)
    assert_close(mc.to_rows(spec, x), rows_np, rtol=0, atol=0)
    assert_close(mc.to_rows(spec, x, reduce=True), rows_np.reshape(n, -1, rows_np.shape[1]).mean(1), **t)
    assert_close(engine.mean_rows(spec, x), rows_np.mean(0), **t)
    x32 = xp.astype(x, xp.float32)
    assert engine.mean_rows(spec, x32).dtype == xp.float32
    assert engine.mean_rows(LAYERS["linear-bias"], x32[:, 0, :1, :3]).dtype == xp.float32
    assert engine.num_rows(spec, x) == rows_np.shape[0]
    g_np, g = rand(xp, xp.float64, rng, n, spec.d_out, oh, ow)
    assert_close(mc.to_grad_rows(spec, g), g_np.transpose(0, 2, 3, 1).reshape(-1, spec.d_out), rtol=0, atol=0)
    assert_close(mc.to_grad_rows(spec, g, reduce=True), g_np.sum(axis=(2, 3)), **t)


def test_conv_spec_normalises_padding():
    """"same" puts the extra pixel of an even (dilated) extent bottom/right, as torch does."""
    assert mc.ConvSpec(kernel_size=(2, 3), padding="same").padding == ((0, 1), (1, 1))
    assert mc.ConvSpec(kernel_size=(2, 3), padding="same", dilation=(3, 2)).padding == ((1, 2), (2, 2))
    assert mc.ConvSpec(kernel_size=3, padding=(1, 2)).padding == ((1, 1), (2, 2))
    assert mc.ConvSpec(kernel_size=3, padding="valid").padding == ((0, 0), (0, 0))
    cs = mc.ConvSpec(kernel_size=3, stride=2, dilation=[2, 1])
    assert (cs.kernel_size, cs.stride, cs.dilation, cs.padding) == ((3, 3), (2, 2), (2, 1), ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="same.*stride 1"):
        mc.ConvSpec(kernel_size=3, stride=(1, 2), padding="same")


@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 3, 2)], ids=["1", "2", "3"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_rows_through_layer_spec(xp, lead, bias):
    rng = np.random.default_rng(14)
    x_np, x = rand(xp, xp.float64, rng, *lead, 4)
    spec = mc.LayerSpec(mc.LayerKind.LINEAR, 4, 3, bias)
    flat = x_np.reshape(-1, 4)
    red = x_np.reshape(lead[0], -1, 4).mean(1) if len(lead) > 1 else flat
    if bias:
        flat, red = (np.concatenate([r, np.ones((r.shape[0], 1))], axis=1) for r in (flat, red))
    assert_close(mc.to_rows(spec, x), flat, rtol=0, atol=0)
    assert_close(mc.to_rows(spec, x, reduce=True), red, **tol(xp, xp.float64))
    g_np, g = rand(xp, xp.float64, rng, *lead, 3)
    gred = g_np.reshape(lead[0], -1, 3).sum(1) if len(lead) > 1 else g_np.reshape(-1, 3)
    assert_close(mc.to_grad_rows(spec, g, reduce=True), gred, **tol(xp, xp.float64))


def test_conv_arguments_checked_and_defaulted(xp):
    """Geometry arguments: defaults (stride 1, dilation 1), and every invalid value is a
    ValueError (not an accepted float, bool or negative size)."""
    assert mc.conv2d_output_size((6, 7), 3) == (4, 5)
    assert mc.conv2d_output_size([6, 7], (2, 3), padding="same") == (6, 7)
    assert normalize_padding("same", 3) == ((1, 1), (1, 1))
    assert normalize_padding("same", (2, 4)) == ((0, 1), (1, 2))
    for bad in (dict(stride=(1, 0)), dict(stride=(0, 1)), dict(dilation=(0, 1)), dict(dilation=(1, 0)),
                dict(kernel_size=(0, 3)), dict(kernel_size=(3, 0))):
        kw = {"kernel_size": 3, **bad}
        with pytest.raises(ValueError, match="must be >= 1"):
            mc.conv2d_output_size((6, 7), kw.pop("kernel_size"), **kw)
    for hw in (6, (6,), (6, -1), (6.0, 7), (True, 7), "67"):
        with pytest.raises(ValueError, match="hw must be a pair of non-negative ints"):
            mc.conv2d_output_size(hw, 3)
    for k in ((2.0, 3), (True, 2), (1, 2, 3), "3", 2.5):
        with pytest.raises(ValueError, match="kernel_size must be an int or a pair of ints"):
            mc.ConvSpec(kernel_size=k)


def test_conv_integer_inputs(xp):
    """Integer images and output gradients are accepted (statistics in float32)."""
    x_np = (np.arange(2 * 2 * 4 * 5).reshape(2, 2, 4, 5) % 7) - 3.0
    x = xp.astype(asarray(xp, x_np), xp.int32)
    rows_np, _ = im2col_loops(x_np, (2, 2), (1, 1), 1, (1, 1))
    rows_np = np.concatenate([rows_np, np.ones((rows_np.shape[0], 1))], axis=1)
    assert_close(mc.conv2d_rows(x, 2, padding=1, bias=True), rows_np, rtol=0, atol=0)
    mean = mc.conv2d_mean_patch(x, 2, padding=1, bias=True)
    assert mean.dtype == xp.float32
    assert_close(mean, rows_np.mean(0), **tol(xp, xp.float32))
    assert_close(mc.conv2d_grad_rows(x, reduce=True), x_np.sum(axis=(2, 3)), rtol=0, atol=0)
    assert_close(mc.conv2d_grad_rows(x), x_np.transpose(0, 2, 3, 1).reshape(-1, 2), rtol=0, atol=0)


def test_rows_argument_checks(xp):
    """Missing or mixed arrays, bad weight shapes and bad conv geometry are named by the function
    that received them; 2-D input with reduce=True has no shared axis (rows unchanged, also
    empty or integer ones)."""
    oxp = other_backend(xp)
    spec = mc.LayerSpec(mc.LayerKind.LINEAR, 3, 2, False)
    with pytest.raises(TypeError, match="must be an array"):
        mc.grad_matrix(None)
    with pytest.raises(TypeError, match="must be an array"):
        mc.grad_matrix(None, xp.ones((3,)))
    with pytest.raises(TypeError, match="grad_matrix: arrays from mixed namespaces"):
        mc.grad_matrix(xp.ones((3, 2)), oxp.ones((3,)))
    for f in (lambda: mc.to_rows(spec, None), lambda: mc.to_grad_rows(spec, None)):
        with pytest.raises(TypeError, match=r"to_(grad_)?rows \(linear\): argument '[xg]' must be an array"):
            f()
    for ws in ((3,), (3, 0), (3, True), (3, 2.0), "ab", 6):
        with pytest.raises(ValueError, match="weight_shape must be a tuple of at least 2 positive ints"):
            mc.split_grad_matrix(xp.ones((3, 2)), ws, bias=False)
    for bad in (dict(stride=(1, 0)), dict(stride=(0, 1)), dict(dilation=(1, 0)), dict(dilation=(0, 1)),
                dict(kernel_size=(0, 2)), dict(kernel_size=(2, 0))):
        kw = {"kernel_size": 2, **bad}
        with pytest.raises(ValueError, match="conv2d_rows: kernel_size, stride and dilation must be >= 1"):
            mc.conv2d_rows(xp.ones((1, 1, 4, 4)), kw.pop("kernel_size"), bias=False, **kw)
    with pytest.raises(ValueError, match=r"'grad_weight' of shape \[3, 0\] is empty"):
        mc.grad_matrix(xp.ones((3, 0)))
    for shape in ((1, 0, 4, 4), (1, 1, 0, 4), (1, 1, 4, 0)):
        with pytest.raises(ValueError, match=r"conv2d_rows: argument 'x' of shape \[.*\] has an empty C, H or W"):
            mc.conv2d_rows(xp.ones(shape), 1, bias=False)
        with pytest.raises(ValueError, match="conv2d_grad_rows: argument 'g' .* has an empty C, H or W"):
            mc.conv2d_grad_rows(xp.ones(shape))
    with pytest.raises(ValueError, match=r"input feature size: expected 3, got -1 \(input shape \[\]\)"):
        mc.to_rows(spec, xp.asarray(1.0))
    assert mc.QkvSpec(num_heads=1).num_heads == 1
    for mode in ("reference", "per_head", "off"):
        assert mc.QkvSpec(num_heads=2, mode=mode, causal=True).mode == mode
    with pytest.raises(ValueError, match="QkvSpec.mode must be"):
        mc.QkvSpec(num_heads=2, mode="perhead")
    for f in (lambda: mc.conv2d_rows(None, 3, bias=False), lambda: mc.conv2d_grad_rows(None),
              lambda: mc.conv2d_mean_patch(None, 3, bias=False), lambda: mc.linear_rows(None, bias=False),
              lambda: mc.grad_rows(None), lambda: mc.split_grad_matrix(None, (2, 2), bias=False)):
        with pytest.raises(TypeError, match="must be an array, got None"):
            f()
    for n in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="num_heads must be >= 1"):
            mc.QkvSpec(num_heads=n)
    empty = mc.linear_rows(xp.zeros((0, 3)), bias=False, reduce=True)
    assert tuple(empty.shape) == (0, 3)
    ints = mc.linear_rows(xp.ones((2, 3), dtype=xp.int32), bias=False, reduce=True)
    assert ints.dtype == xp.int32 and tuple(ints.shape) == (2, 3)
    assert mc.grad_rows(xp.ones((2, 3), dtype=xp.int32), reduce=True).dtype == xp.int32


# =============================================================================================
# SINGD


@pytest.mark.parametrize(("state_dt", "rows_dt"), [("float32", "float64"), ("float64", "float32"),
                                                   ("float32", "float32")])
@pytest.mark.parametrize("pdt", [(None, None), ("float64", None), (None, "float32")],
                         ids=["same", "K-f64", "C-f32"])
@pytest.mark.parametrize("R", [1, 5])
def test_singd_rows_of_another_dtype(xp, state_dt, rows_dt, pdt, R):
    """Rows and gradient rows of another dtype than the factors (each factor's dtype given by name
    or inherited), single-row batches and an array-valued reduction factor: one update against the
    dense float64 reference."""
    from tests.core.test_singd import make_batch, ref_singd

    rng = np.random.default_rng(15)
    rows, grads, red = make_batch(rng, R, 3, 2, mean_loss=True)
    pc = singd_factory(structures=("dense", "diagonal"), alpha1=0.5, lr_cov=0.2, damping=1e-2,
                       preconditioner_dtype=pdt)
    s = pc.init(3, 2, xp=xp, dtype=getattr(xp, state_dt))
    kdt = getattr(xp, pdt[0] or state_dt)
    cdt = getattr(xp, pdt[1] or state_dt)
    assert s.K.dtype == kdt and s.C.dtype == cdt
    rows, r = cast(xp, rows, getattr(xp, rows_dt))
    grads, g = cast(xp, grads, getattr(xp, rows_dt))
    s = pc.update(s, r, g, reduction_factor=asarray(xp, np.asarray(red), xp.float64))
    K, C, _, _ = ref_singd([(rows, grads, red)], sK="dense", sC="diagonal", alpha1=0.5, lr_cov=0.2,
                           damping=1e-2, kfac_like=False, normalize=False)
    assert s.K.dtype == kdt and s.C.dtype == cdt
    t = tol(xp, xp.float32 if xp.float32 in (kdt, cdt) else xp.float64, 4)  # K's step reads C's trace
    assert_close(s.K.to_dense(), K, **t)
    assert_close(s.C.to_dense(), C, **t)


def test_singd_configuration_checks(xp):
    """Malformed configurations are ValueErrors; kfac_like warns (at the caller) only when it
    overrides a non-zero alpha1."""
    import warnings

    for bad in (dict(structures=("dense",)), dict(structures="ab"),
                dict(structures=("dense", "dense", "dense")), dict(preconditioner_dtype=(None,)),
                dict(preconditioner_dtype="ab")):
        with pytest.raises(ValueError, match="must be a pair"):
            singd_factory(**bad)
    with pytest.warns(UserWarning, match="alpha1") as rec:
        singd_factory(kfac_like=True, alpha1=0.5)
    # attributed to the caller (mutation testing wraps every core function in one more frame)
    assert rec[0].filename == __file__ or "mutmut" in rec[0].filename, rec[0].filename
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        singd_factory(kfac_like=True, alpha1=0.0)
    pc = singd_factory()
    s = pc.init(3, 2, xp=xp, dtype=xp.float64)
    rows, grads = xp.ones((4, 3), dtype=xp.float64), xp.ones((4, 2), dtype=xp.float64)
    with pytest.raises(ValueError, match="lr_cov must be a scalar"):
        pc.update(s, rows, grads, reduction_factor=1.0, lr_cov=xp.ones((2,), dtype=xp.float64))
    with pytest.raises(ValueError, match="grad_scale_correction must be positive"):
        pc.update(s, rows, grads, reduction_factor=1.0, grad_scale_correction=0.0)
    for r, g, red in ((rows, None, 1.0), (None, grads, 1.0), (rows, grads, None)):
        with pytest.raises(ValueError, match="pass rows, grad_rows and reduction_factor"):
            pc.update(s, r, g, reduction_factor=red)
    H = (s.K, s.C)
    for r, g in ((rows, None), (None, grads), (rows, grads)):
        with pytest.raises(ValueError, match="either rows/grad_rows or statistics"):
            pc.update(s, r, g, statistics=H)
    for bad in ((s.K,), (s.K, s.C, s.C), s.K):
        with pytest.raises(ValueError, match="statistics must be a pair"):
            pc.update(s, statistics=bad)
    with pytest.raises(ValueError, match=r"'rows' must have shape \[R, 3\] \(R ≥ 1"):
        pc.update(s, xp.zeros((0, 3), dtype=xp.float64), xp.zeros((0, 2), dtype=xp.float64),
                  reduction_factor=1.0)
    frozen = pc.update(s, rows, grads, reduction_factor=1.0, lr_cov=0.0)  # β = 0: the factors stay
    assert_close(frozen.K.to_dense(), np.eye(3), rtol=0, atol=0)
    oxp = other_backend(xp)
    for r, g in ((oxp.ones((4, 3)), grads), (rows, oxp.ones((4, 2)))):
        with pytest.raises(TypeError, match="mixed namespaces"):
            pc.update(s, r, g, reduction_factor=1.0)
    with pytest.raises(TypeError, match="mixed namespaces"):
        pc.apply(s, oxp.ones((2, 3)))
    other = pc.init(3, 2, xp=oxp, dtype=oxp.float64)
    for mixed in (s._replace(C=other.C), s._replace(K=other.K)):
        for f in (lambda: pc.apply(mixed, xp.ones((2, 3), dtype=xp.float64)), lambda: pc.to_dense(mixed)):
            with pytest.raises(TypeError, match="mixed namespaces"):
                f()
    for bad in (dict(lr_cov=True), dict(damping=True), dict(alpha1=False), dict(lr_cov="0.1")):
        with pytest.raises(TypeError, match="must be a real number"):
            singd_factory(**bad)


@pytest.mark.parametrize(("state_dt", "grad_dt"), [("float32", "float64"), ("float64", "float32")])
def test_singd_apply_gradient_of_another_dtype(xp, state_dt, grad_dt):
    """apply computes in the factors' dtype and returns the gradient's."""
    from tests.core.test_singd import make_batch, ref_singd

    rng = np.random.default_rng(22)
    rows, grads, red = make_batch(rng, 6, 3, 2, mean_loss=False)
    pc = singd_factory(structures=("dense", "dense"), lr_cov=0.3, damping=1e-2)
    sdt, gdt = getattr(xp, state_dt), getattr(xp, grad_dt)
    rows, r = cast(xp, rows, sdt)
    grads, g = cast(xp, grads, sdt)
    s = pc.update(pc.init(3, 2, xp=xp, dtype=sdt), r, g, reduction_factor=red)
    K, C, _, _ = ref_singd([(rows, grads, red)], sK="dense", sC="dense", alpha1=0.5, lr_cov=0.3,
                           damping=1e-2, kfac_like=False, normalize=False)
    gm_np, gm = cast(xp, rng.standard_normal((2, 3)), gdt)
    out = pc.apply(s, gm)
    assert_like(out, gm)
    assert_close(out, C @ C.T @ gm_np @ K @ K.T, **tol(xp, xp.float32, 4))


# =============================================================================================
# documented defaults: a factory called without arguments behaves as with the documented values


def _run_engine(method, xp):
    rng = np.random.default_rng(16)
    spec = mc.LayerSpec(mc.LayerKind.LINEAR, 3, 2, True)
    st = method.init(spec, xp=xp, dtype=xp.float64)
    for _ in range(2):
        pooled = engine.pool_stats({}, method.input_statistics(spec, st, asarray(xp, rng.standard_normal((5, 3)))))
        pooled = engine.pool_stats(pooled, method.grad_statistics(spec, st, asarray(xp, rng.standard_normal((5, 2)))))
        fin = method.finalize(spec, st, pooled)
        st = method.refresh(spec, method.update(spec, st, {k: v for k, (v, w) in fin.items()}))
    return to_numpy(method.apply(spec, st, asarray(xp, rng.standard_normal((2, 4)))))


def _run_core(pc, xp, *, kfac=False):
    rng = np.random.default_rng(17)
    st = pc.init(4, 2, xp=xp, dtype=xp.float64)
    for _ in range(2):
        rows = mc.linear_rows(asarray(xp, rng.standard_normal((5, 3))), bias=True)
        grads = asarray(xp, rng.standard_normal((5, 2)))
        if kfac:
            st = pc.refresh(pc.update(st, rows, grads, reduction_factor=0.5))
        elif isinstance(st, mc.MacState):
            st = pc.refresh(pc.update(st, rows))
        else:
            st = pc.update(st, rows, grads, reduction_factor=0.5)
    return to_numpy(pc.apply(st, asarray(xp, rng.standard_normal((2, 4)))))


def test_documented_defaults(xp):
    eq = np.testing.assert_array_equal
    eq(_run_core(mc.mac(), xp), _run_core(mc.mac(decay=0.95, damping=1.0, scale="reference"), xp))
    eq(_run_core(mc.kfac(), xp, kfac=True),
       _run_core(mc.kfac(decay=0.95, damping=1e-3, mode="tikhonov"), xp, kfac=True))
    eq(_run_core(singd_factory(), xp), _run_core(singd_factory(
        structures=("dense", "dense"), alpha1=0.5, lr_cov=1e-2, damping=1e-3, kfac_like=False,
        normalize_lr_cov=False), xp))
    eq(_run_engine(engine.mac_method(), xp),
       _run_engine(engine.mac_method(stat_decay=0.95, damping=1.0, scale="reference", diagonal=False), xp))
    eq(_run_engine(engine.kfac_method(), xp),
       _run_engine(engine.kfac_method(stat_decay=0.95, damping=1e-3, damping_mode="tikhonov",
                                      kfac_approx="expand", loss_average="batch"), xp))
    eq(_run_engine(engine.singd_method(), xp),
       _run_engine(engine.singd_method(damping=1e-3, alpha1=0.5, lr_cov=1e-2, structures=("dense", "dense"),
                                       kfac_like=False, kfac_approx="expand", loss_average="batch"), xp))
    assert mc.mac().init(3, xp=xp).mean.value.dtype == xp.float32
    assert mc.kfac().init(3, 2, xp=xp).a.value.dtype == xp.float32
    assert singd_factory().init(3, 2, xp=xp).K.dtype == xp.float32


# =============================================================================================
# the engine: every method × option through capture → pool → finalize → update → refresh → apply

LAYERS = {
    "linear-bias": mc.LayerSpec(mc.LayerKind.LINEAR, 3, 2, True, name="fc"),
    "linear": mc.LayerSpec(mc.LayerKind.LINEAR, 3, 2, False, name="fc"),
    "conv-bias": mc.LayerSpec(mc.LayerKind.CONV2D, 2 * 2 * 3, 2, True, name="conv", conv=mc.ConvSpec(
        kernel_size=(2, 3), stride=(2, 1), padding=((1, 0), (0, 1)))),
    "conv-depthwise": mc.LayerSpec(mc.LayerKind.CONV2D, 3 * 3, 2, True, name="dw", conv=mc.ConvSpec(
        kernel_size=3, padding="same", dilation=(1, 2), groups=2)),
}


def layer_data(spec, rng, n=3, gscale=1.0):
    """A batch for ``spec``: the layer input x and the output gradient g."""
    if spec.kind is mc.LayerKind.LINEAR:
        return rng.standard_normal((n, 4, spec.d_in)) + 0.3, gscale * rng.standard_normal((n, 4, spec.d_out))
    cs = spec.conv
    x = rng.standard_normal((n, 2, 5, 6)) + 0.3
    oh, ow = mc.conv2d_output_size((5, 6), cs.kernel_size, stride=cs.stride, padding=cs.padding,
                                   dilation=cs.dilation)
    return x, gscale * rng.standard_normal((n, spec.d_out, oh, ow))


def layer_rows(spec, x, g):
    """From the definitions: the expand / reduce input rows x̃ and output-gradient rows of a batch,
    and its loss terms per sample ("batch") or per position ("batch+sequence")."""
    n = x.shape[0]
    if spec.kind is mc.LayerKind.LINEAR:
        xt = np.concatenate([x, np.ones(x.shape[:-1] + (1,))], axis=-1) if spec.has_bias else x
        rows = {"expand": xt.reshape(-1, spec.d_tilde), "reduce": xt.mean(axis=1)}
        grows = {"expand": g.reshape(-1, spec.d_out), "reduce": g.sum(axis=1)}
        return rows, grows, {"batch": n, "batch+sequence": n * x.shape[1]}
    cs = spec.conv
    r, (oh, ow) = im2col_loops(x, cs.kernel_size, cs.stride, cs.padding, cs.dilation, depthwise=spec.depthwise)
    if spec.has_bias:
        r = np.concatenate([r, np.ones((r.shape[0], 1))], axis=1)
    rows = {"expand": r, "reduce": r.reshape(n, -1, r.shape[1]).mean(axis=1)}
    grows = {"expand": g.transpose(0, 2, 3, 1).reshape(-1, spec.d_out), "reduce": g.sum(axis=(2, 3))}
    return rows, grows, {"batch": n, "batch+sequence": n * oh * ow}


def run_steps(method, spec, xp, dtype, batches, *, lr_cov=None):
    st = method.init(spec, xp=xp, dtype=dtype)
    for x, g in batches:
        pooled = engine.pool_stats({}, method.input_statistics(spec, st, asarray(xp, x, dtype)))
        if method.wants_grads(spec):
            pooled = engine.pool_stats(pooled, method.grad_statistics(spec, st, asarray(xp, g, dtype)))
        fin = method.finalize(spec, st, pooled)
        st = method.refresh(spec, method.update(spec, st, {k: v for k, (v, w) in fin.items()}, lr_cov=lr_cov))
    return st


def debiased(values, decay):
    k = len(values)
    w = np.array([(1 - decay) * decay ** (k - i) for i in range(1, k + 1)]) / (1 - decay**k)
    return np.tensordot(w, np.stack(values), axes=1)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("mode", ["tikhonov", "pi", "exact"])
@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
def test_engine_kfac_every_option(xp, dtype, layer, approx, mode, loss_average):
    spec = LAYERS[layer]
    rng = np.random.default_rng(18)
    # gradients scaled so that G stays O(1) for every loss average (condition numbers ≤ 400);
    # the oracle sees the data as rounded to dtype
    data = [tuple(to_numpy(asarray(xp, a, dtype)) for a in layer_data(spec, rng, gscale=0.05))
            for _ in range(2)]
    method = engine.kfac_method(stat_decay=0.5, damping=0.2, damping_mode=mode, kfac_approx=approx,
                                loss_average=loss_average)
    st = run_steps(method, spec, xp, dtype, data)
    As, Gs = [], []
    for x, g in data:
        rows, grows, terms = layer_rows(spec, x, g)
        R = 1.0 if loss_average is None else 1.0 / terms[loss_average]
        As.append(rows[approx].T @ rows[approx] / rows[approx].shape[0])
        Gs.append(grows[approx].T @ grows[approx] / R)
    A, G = debiased(As, 0.5), debiased(Gs, 0.5)
    t = tol(xp, dtype, 16)
    assert_close(method.curvature_dense(spec, st), kfac_damped_matrix(A, G, 0.2, mode=mode), **t)
    grad_np, grad = rand(xp, dtype, rng, spec.d_out, spec.d_tilde)
    out = method.apply(spec, st, grad)
    assert_like(out, grad)
    assert_close(out, kfac_damped_solve(grad_np, A, G, 0.2, mode=mode), **t)


QKV = {m: mc.LayerSpec(mc.LayerKind.LINEAR, 3, 3 * 4, True, name="qkv", qkv=mc.QkvSpec(num_heads=2, mode=m))
       for m in ("reference", "per_head", "off")}


@pytest.mark.parametrize("layer", list(LAYERS) + [f"qkv-{m}" for m in QKV])
@pytest.mark.parametrize("scale", ["reference", "inverse"])
@pytest.mark.parametrize("smac", [False, True], ids=["mac", "smac"])
def test_engine_mac_every_option(xp, dtype, layer, scale, smac):
    """MAC/SMAC through the engine with a non-default decay over two steps: â is the debiased EMA
    of the batch means of x̃ (conv: of the patches; fused qkv: Q, K rows ā, V rows the attention-
    weighted mean, per head with mode "per_head"), ẑ that of E_rows[g⊙g] (not for qkv layers)."""
    rng = np.random.default_rng(19)
    lam = 0.3
    method = engine.mac_method(stat_decay=0.5, damping=lam, scale=scale, diagonal=smac)
    if layer.startswith("qkv"):
        spec = QKV[layer[4:]]
        st = method.init(spec, xp=xp, dtype=dtype)
        means = []
        for _ in range(2):
            x_np, x = rand(xp, dtype, rng, 2, 5, 3, shift=0.3)
            logits = rng.standard_normal((2, 2, 5, 5))
            attn_np, attn = cast(xp, np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), dtype)
            pooled = engine.pool_stats({}, method.input_statistics(spec, st, x, attn=attn))
            assert method.wants_grads(spec) is False
            fin = method.finalize(spec, st, pooled)
            st = method.refresh(spec, method.update(spec, st, {k: v for k, (v, w) in fin.items()}))
            xt = np.concatenate([x_np, np.ones((2, 5, 1))], axis=-1)
            a = xt.reshape(-1, 4).mean(0)
            if spec.qkv.mode == "off":
                means.append(np.stack([a, a, a]))
            elif spec.qkv.mode == "reference":
                means.append(np.stack([a, a, attn_np.mean(axis=(0, 1, 2)) @ xt.mean(0)]))
            else:
                v = np.einsum("bhij,bjd->hd", attn_np, xt) / 10
                means.append(np.concatenate([np.tile(a, (2, 1)), np.tile(a, (2, 1)), v]))
        mean, z = debiased(means, 0.5), None
    else:
        spec = LAYERS[layer]
        data = [tuple(to_numpy(asarray(xp, a, dtype)) for a in layer_data(spec, rng)) for _ in range(2)]
        st = run_steps(method, spec, xp, dtype, data)
        means, diags = [], []
        for x, g in data:
            rows, grows, _ = layer_rows(spec, x, g)
            means.append(rows["expand"].mean(0))
            diags.append((grows["expand"] ** 2).mean(0))
        mean, z = debiased(means, 0.5), (debiased(diags, 0.5) if smac else None)
    grad_np, grad = rand(xp, dtype, rng, spec.d_out, spec.d_tilde)
    out = method.apply(spec, st, grad)
    assert_like(out, grad)
    assert_close(out, mac_oracle(grad_np, mean, lam, scale=scale, z=z), **tol(xp, dtype, 8))
    P = to_numpy(method.preconditioner_dense(spec, st))
    assert_close(P @ grad_np.reshape(-1), to_numpy(out).reshape(-1), **tol(xp, dtype, 16))


SINGD_OPTIONS = [(False, 0.5, False), (False, 0.0, True), (True, 0.0, False), (False, 0.5, True)]


@pytest.mark.parametrize("layer", ["linear-bias", "conv-bias"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
@pytest.mark.parametrize(("kfac_like", "alpha1", "normalize"), SINGD_OPTIONS,
                         ids=["ingd", "ingd-normalized", "ikfac", "ingd-momentum-normalized"])
def test_engine_singd_every_option(xp, layer, approx, loss_average, kfac_like, alpha1, normalize):
    """SINGD through the engine (float64) against the dense reference of test_singd: two updates,
    the second with an lr_cov given to update()."""
    from tests.core.test_singd import ref_singd

    spec = LAYERS[layer]
    rng = np.random.default_rng(20)
    batches = [layer_data(spec, rng) for _ in range(2)]
    method = engine.singd_method(damping=1e-2, alpha1=alpha1, lr_cov=0.1, structures=("dense", "diagonal"),
                                 kfac_like=kfac_like, kfac_approx=approx, loss_average=loss_average,
                                 normalize_lr_cov=normalize)
    st = method.init(spec, xp=xp, dtype=xp.float64)
    ref = []
    for i, (x, g) in enumerate(batches):
        rows, grows, terms = layer_rows(spec, x, g)
        pooled = engine.pool_stats({}, method.input_statistics(spec, st, asarray(xp, x)))
        pooled = engine.pool_stats(pooled, method.grad_statistics(spec, st, asarray(xp, g)))
        fin = method.finalize(spec, st, pooled)
        st = method.update(spec, st, {k: v for k, (v, w) in fin.items()}, lr_cov=0.3 if i else None)
        R = 1.0 if loss_average is None else 1.0 / terms[loss_average]
        ref.append((rows[approx], grows[approx], R))
    # the reference takes one lr_cov: its first step, then the second with the update's lr_cov
    K1, C1, mK, mC = ref_singd(ref[:1], sK="dense", sC="diagonal", alpha1=alpha1, lr_cov=0.1, damping=1e-2,
                               kfac_like=kfac_like, normalize=normalize)
    want = _ref_second_step(ref[1], K1, C1, mK, mC, alpha1=alpha1, kfac_like=kfac_like, normalize=normalize)
    t = {"rtol": 1e-10, "atol": 1e-12}
    assert_close(st.K.to_dense(), want[0], **t)
    assert_close(st.C.to_dense(), want[1], **t)
    assert (st.m_K is None) is (alpha1 == 0)
    grad_np, grad = rand(xp, xp.float64, rng, spec.d_out, spec.d_tilde)
    K, C = want[0], want[1]
    assert_close(method.apply(spec, st, grad), C @ C.T @ grad_np @ K @ K.T, **t)


def _ref_second_step(batch, K, C, mK, mC, *, alpha1, kfac_like, normalize, lr_cov=0.3, lam=1e-2):
    """One more step of test_singd.ref_singd from a given state (dense K, diagonal C)."""
    from tests.core.test_singd import avgtr

    rows, grads, R = batch
    A = rows.T @ rows / rows.shape[0]
    G = grads.T @ grads / R
    IK, IC = np.eye(K.shape[0]), np.eye(C.shape[0])
    HK, HC = K.T @ A @ K, np.diag(np.diag(C.T @ G @ C))
    PK, PC = K.T @ K, np.diag(np.diag(C.T @ C))
    s = 0.5 * (1 - alpha1) if normalize else 0.5
    if kfac_like:
        gK, gC = HK + lam * PK - IK, HC + lam * PC - IC
    else:
        gK = avgtr(HC) * HK + lam * avgtr(PC) * PK - IK
        gC = avgtr(HK) * HC + lam * avgtr(PK) * PC - IC
    mK, mC = alpha1 * mK + s * gK, alpha1 * mC + s * gC
    bK = lr_cov / max(1.0, np.abs(mK).max()) if normalize else lr_cov
    bC = lr_cov / max(1.0, np.abs(mC).max()) if normalize else lr_cov
    return K @ (IK - bK * mK), C @ (IC - bC * mC)


def test_engine_pooling_rules():
    """Pooling a mean with a first batch of weight 0 gives the second; two empty batches give the
    first; loss terms are whole numbers."""
    a, b = engine.Stat(np.array([1.0, 3.0]), 0, "mean"), engine.Stat(np.array([4.0, 0.0]), 1, "mean")
    np.testing.assert_array_equal(engine.pool(a, b).value, b.value)
    assert engine.pool(a, b).weight == 1
    empty = engine.pool(a, engine.Stat(np.array([4.0, 0.0]), 0, "mean"))
    np.testing.assert_array_equal(empty.value, a.value)
    spec = LAYERS["conv-bias"]
    for avg in ("batch", "batch+sequence", None):
        n = engine.loss_terms(spec, (3, 2, 4, 5), avg)
        assert type(n) is int and n == (60 if avg == "batch+sequence" else 3)
    n = engine.loss_terms(LAYERS["linear"], (3, 4, 2), "batch+sequence")
    assert type(n) is int and n == 12
    one = mc.LayerSpec(mc.LayerKind.LINEAR, 3, 1, False)
    assert engine.loss_terms(one, (3, 4, 1), "batch+sequence") == 12
    assert engine.loss_terms(mc.LayerSpec(mc.LayerKind.CONV2D, 9, 1, False, conv=mc.ConvSpec(3)),
                             (3, 1, 4, 5), "batch+sequence") == 60
    assert engine.reduction_factor(1, loss_average="batch") == 1.0
    assert engine.reduction_factor(4, loss_average="batch+sequence") == 0.25


def test_engine_names_hyperparameters_and_dtypes(xp):
    """The methods' names and hyperparameters (what adapters and checkpoints read), the state dtype
    for half/float32 parameters (float32 statistics) and float64 ones."""
    lr = lambda step: 0.1  # noqa: E731  (a schedule: evaluated by the adapter)
    cases = [
        (engine.mac_method(), "mac", {"stat_decay": 0.95, "damping": 1.0, "scale": "reference", "diagonal": False}),
        (engine.mac_method(diagonal=True), "smac", {"stat_decay": 0.95, "damping": 1.0, "scale": "reference",
                                                     "diagonal": True}),
        (engine.kfac_method(kfac_approx="reduce", reduction_factor=0.5), "kfac",
         {"stat_decay": 0.95, "damping": 1e-3, "damping_mode": "tikhonov", "kfac_approx": "reduce",
          "loss_average": "batch", "reduction_factor": 0.5}),
        (engine.singd_method(lr_cov=lr, kfac_like=True, alpha1=0.0, loss_average="batch+sequence"), "singd",
         {"damping": 1e-3, "alpha1": 0.0, "structures": ("dense", "dense"), "kfac_like": True,
          "kfac_approx": "expand", "loss_average": "batch+sequence", "reduction_factor": None,
          "preconditioner_dtype": (None, None), "normalize_lr_cov": False}),
    ]
    spec = LAYERS["linear-bias"]
    for method, name, hyper in cases:
        assert method.name == name
        assert dict(method.hyperparameters) == hyper, name
        for dt, want in (("float32", "float32"), ("float64", "float64")):
            st = method.init(spec, xp=xp, dtype=getattr(xp, dt))
            leaves = [v for v in method.templates(spec, st).values()]
            assert all(v.dtype == getattr(xp, want) for v in leaves), (name, dt)
    half = getattr(xp, "float16", None)
    if half is not None:
        for method in (engine.mac_method(), engine.kfac_method()):
            st = method.init(spec, xp=xp, dtype=half)
            assert all(v.dtype == xp.float32 for v in method.templates(spec, st).values())
    qkv, qkv_off = QKV["reference"], QKV["off"]
    for method in (engine.kfac_method(), engine.singd_method()):
        st = method.init(spec, xp=xp)
        assert method.wants_input(spec, st) is True and method.wants_grads(spec) is True
        assert method.wants_attention(qkv) is False and method.wants_attention(spec) is False
    mac_, smac_ = engine.mac_method(), engine.mac_method(diagonal=True)
    assert (mac_.wants_grads(spec), smac_.wants_grads(spec), smac_.wants_grads(qkv)) == (False, True, False)
    assert (mac_.wants_attention(qkv), mac_.wants_attention(qkv_off), mac_.wants_attention(spec)) == (
        True, False, False)
    assert mac_.keys(spec, None) == ("mean",) and smac_.keys(spec, None) == ("mean", "diag")
    with pytest.raises(TypeError, match="single positive number"):
        engine.kfac_method(reduction_factor=(0.5, 0.5))
    for make in (engine.kfac_method, engine.singd_method):
        with pytest.raises(ValueError, match="loss_average must be one of"):
            make(loss_average="tokens")
    oxp = other_backend(xp)
    mst = mac_.init(spec, xp=xp, dtype=xp.float64)
    with pytest.raises(TypeError, match="apply_split: arrays from mixed namespaces"):
        engine.apply_split(mac_, spec, mst, xp.ones((2, 3), dtype=xp.float64), oxp.ones((2,), dtype=oxp.float64))
    with pytest.raises(ValueError, match="does not have 3 features"):
        engine.mean_rows(spec, xp.ones((4, 2)))
    with pytest.raises(ValueError, match="does not have 3 features"):
        engine.mean_rows(spec, xp.ones((4, 2, 4)))
    assert bool(engine.all_finite([xp.ones((2,), dtype=xp.int32)]))
    assert bool(engine.all_finite([xp.ones((2,)), None, xp.ones((2,), dtype=xp.int32)]))


@pytest.mark.parametrize("diagonal", [False, True], ids=["mac", "smac"])
def test_apply_split_mac_never_forms_the_gradient_matrix(diagonal):
    """MAC's (and SMAC's) apply_split works on the weight and bias gradients as they are (no
    [d_out, d̃] matrix concatenated; in place: no copy of the gradient at all), with the same result
    as apply."""
    import tracemalloc

    spec = mc.LayerSpec(mc.LayerKind.LINEAR, 4096, 64, True)
    method = engine.mac_method(damping=0.5, diagonal=diagonal)
    rng = np.random.default_rng(21)
    grows = rng.standard_normal((8, 64)) if diagonal else None
    st = run_steps(method, spec, np, np.float32, [(rng.standard_normal((8, 4096)), grows)])
    gw = rng.standard_normal((64, 4096)).astype(np.float32)
    gb = rng.standard_normal(64).astype(np.float32)
    want = method.apply(spec, st, mc.grad_matrix(gw, gb))
    for inplace, budget in ((False, 1.5), (True, 0.25)):
        w0, b0 = gw.copy(), gb.copy()
        engine.apply_split(method, spec, st, w0.copy(), b0.copy(), inplace=inplace)  # warm up
        tracemalloc.start()
        w, b = engine.apply_split(method, spec, st, w0, b0, inplace=inplace)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < budget * gw.nbytes, (inplace, peak)
        assert (w is w0) is inplace
        np.testing.assert_allclose(w, want[:, :-1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b, want[:, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["tikhonov", "pi", "exact"])
def test_adapter_keyword_aliases(xp, mode):
    """The adapters' names (damping_mode, stat_decay) select the same configuration as the core's
    (mode, decay); giving both raises."""
    eq = np.testing.assert_array_equal
    eq(_run_core(mc.kfac(damping_mode=mode, stat_decay=0.7, damping=0.1), xp, kfac=True),
       _run_core(mc.kfac(mode=mode, decay=0.7, damping=0.1), xp, kfac=True))
    eq(_run_core(mc.mac(stat_decay=0.7), xp), _run_core(mc.mac(decay=0.7), xp))
    with pytest.raises(TypeError, match="give 'mode' or 'damping_mode', not both"):
        mc.kfac(mode="pi", damping_mode=mode)
    with pytest.raises(TypeError, match="give 'decay' or 'stat_decay', not both"):
        mc.kfac(decay=0.5, stat_decay=0.7)


@pytest.mark.parametrize("name", ["mac", "smac", "kfac", "singd"])
def test_engine_loss_scale_and_missing_bias_gradient(xp, name):
    """grad_statistics divides the gradient by the loss scale of mixed precision (the statistic of
    g·s with grad_scale=s is that of g); apply_split without a bias gradient treats it as zero."""
    spec = LAYERS["linear-bias"]
    rng = np.random.default_rng(25)
    method = {"mac": engine.mac_method(), "smac": engine.mac_method(diagonal=True),
              "kfac": engine.kfac_method(), "singd": engine.singd_method()}[name]
    st = method.init(spec, xp=xp, dtype=xp.float64)
    x, g = (asarray(xp, a) for a in layer_data(spec, rng))
    for k, v in method.grad_statistics(spec, st, g).items():
        for scale in (2.0, 8.0):
            assert_close(method.grad_statistics(spec, st, scale * g, grad_scale=scale)[k].value,
                         to_numpy(v.value), **tol(xp, xp.float64))
    for dt in (xp.float32, xp.float64):
        st = run_steps(method, spec, xp, dt, [tuple(to_numpy(a) for a in (x, g))])
        gw = asarray(xp, rng.standard_normal((2, 3)), dt)
        w0, b0 = engine.apply_split(method, spec, st, gw, None)
        w1, b1 = engine.apply_split(method, spec, st, gw, xp.zeros((2,), dtype=dt))
        assert w0.dtype == dt and b0.dtype == dt
        assert_close(w0, to_numpy(w1), rtol=0, atol=0)
        assert_close(b0, to_numpy(b1), rtol=0, atol=0)


@pytest.mark.parametrize("diagonal", [False, True], ids=["mac", "smac"])
def test_apply_split_inplace_on_a_non_contiguous_conv_gradient(diagonal):
    """In place on a conv weight gradient whose flattening is a copy (a transposed view): the
    result is written back into the given arrays, equal to apply on the gradient matrix."""
    spec = LAYERS["conv-bias"]  # weight [2, 2, 2, 3]
    method = engine.mac_method(damping=0.5, diagonal=diagonal)
    rng = np.random.default_rng(31)
    x, g = layer_data(spec, rng)
    st = run_steps(method, spec, np, np.float64, [(x, g)])
    gw = np.transpose(rng.standard_normal((2, 2, 3, 2)), (0, 1, 3, 2))  # not C-contiguous
    gb = rng.standard_normal(2)
    want = to_numpy(method.apply(spec, st, mc.grad_matrix(gw, gb)))
    w, b = engine.apply_split(method, spec, st, gw, gb, inplace=True)
    assert w is gw and b is gb
    t = tol(np, np.float64)
    assert_close(gw.reshape(2, -1), want[:, :-1], **t)
    assert_close(gb, want[:, -1], **t)


@pytest.mark.parametrize("structures", [("hierarchical2_1", "block2diagonal"), ("tril_toeplitz", "triu_bottom_right_diag"),
                                        ("block2diagonal", "block2diagonal")])
def test_engine_singd_structures_with_several_parameter_arrays(xp, structures):
    """The engine flattens each statistic to one array for pooling and unflattens it for update:
    identical to the core SINGD fed with the same rows (block2diagonal of size 5: two parameter
    arrays, the 2×2 blocks and the last 1×1 block)."""
    spec = LAYERS["linear-bias"]
    if structures == ("block2diagonal", "block2diagonal"):
        spec = mc.LayerSpec(mc.LayerKind.LINEAR, 4, 5, True, name="fc5")
    rng = np.random.default_rng(26)
    x, g = layer_data(spec, rng)
    method = engine.singd_method(structures=structures, loss_average=None, lr_cov=0.2, damping=1e-2)
    st = run_steps(method, spec, xp, xp.float64, [(x, g)])
    pc = singd_factory(structures=structures, lr_cov=0.2, damping=1e-2)
    rows, grows, _ = layer_rows(spec, x, g)
    core = pc.update(pc.init(spec.d_tilde, spec.d_out, xp=xp, dtype=xp.float64), asarray(xp, rows["expand"]),
                     asarray(xp, grows["expand"]), reduction_factor=1.0)
    assert any(len(tuple(f)) > 1 for f in (core.K, core.C))
    for a, b in zip((st.K, st.C, st.m_K, st.m_C), (core.K, core.C, core.m_K, core.m_C)):
        assert type(a) is type(b)
        assert_close(a.to_dense(), to_numpy(b.to_dense()), **tol(xp, xp.float64))


def test_engine_singd_reduction_factor_and_schedule(xp):
    """An explicit reduction_factor overrides the loss average; with an lr_cov schedule (evaluated
    by the adapter) an update without lr_cov leaves the factors as they are."""
    spec = LAYERS["linear-bias"]
    rng = np.random.default_rng(27)
    x, g = layer_data(spec, rng)
    method = engine.singd_method(reduction_factor=0.5, loss_average="batch")
    st = method.init(spec, xp=xp, dtype=xp.float64)
    pooled = engine.pool_stats(method.input_statistics(spec, st, asarray(xp, x)),
                               method.grad_statistics(spec, st, asarray(xp, g)))
    _, grows, _ = layer_rows(spec, x, g)
    H_C, w = method.finalize(spec, st, pooled)["H_C"]
    assert_close(H_C, (grows["expand"].T @ grows["expand"] / 0.5).reshape(-1), **tol(xp, xp.float64))
    sched = engine.singd_method(lr_cov=lambda step: 0.1)
    st = sched.init(spec, xp=xp, dtype=xp.float64)
    fin = sched.finalize(spec, st, pooled)
    st = sched.update(spec, st, {k: v for k, (v, w) in fin.items()})
    assert_close(st.K.to_dense(), np.eye(spec.d_tilde), rtol=0, atol=0)
