"""MAC: rank-1 damped inverse, statistics, attention V-branch, SMAC, the stateful preconditioner
(docs/math.md, M-P1…M-P10, T5, T7, T10, T19)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import maccore as mc
from maccore import _delegate
from maccore.testing import kfac_damped_solve, mac_dense_preconditioner
from tests.conftest import asarray, assert_close, to_numpy, tol
from tests.core.helpers import assert_like, kron_inv_apply, rand, seeds, stats_dtype_of, xgiven

dampings = st.sampled_from([1e-2, 0.1, 0.5, 1.0, 3.0, 10.0])
scales = st.sampled_from(["reference", "inverse"])


# ---------------------------------------------------------------------------------------------
# mac_apply: M-P1 … M-P4


@xgiven(seed=seeds, d_out=st.integers(1, 5), d_t=st.integers(1, 6), lam=dampings, scale=scales,
       act=st.sampled_from([0.1, 1.0, 3.0]))
def test_mac_apply_equals_dense_inverse(xp, dtype, seed, d_out, d_t, lam, scale, act):
    """M-P1: the rank-1 form equals λ·G(ââᵀ+λI)⁻¹ (reference) or G(ââᵀ+λI)⁻¹ (inverse)."""
    rng = np.random.default_rng(seed)
    g_np, g = rand(xp, dtype, rng, d_out, d_t)
    a_np, a = rand(xp, dtype, rng, d_t, scale=act, shift=act)
    out = mc.mac_apply(g, a, lam, scale=scale)
    assert_like(out, g)
    # the float64 dense inverse of the oracle loses cond(ââᵀ+λI) = (λ+‖â‖²)/λ in accuracy; the
    # rank-1 form does not, so the oracle's own error is added to the dtype's tolerance
    oracle_err = 8 * (lam + float(a_np @ a_np)) / lam * float(np.finfo(np.float64).eps)
    t = {k: v + oracle_err for k, v in tol(xp, dtype, 2).items()}
    assert_close(out, g_np @ mac_dense_preconditioner(a_np, lam, scale=scale), **t)
    if scale == "inverse":  # inverse = reference / λ
        ref = to_numpy(mc.mac_apply(g, a, lam))
        assert_close(out, ref / lam, **tol(xp, dtype))


@xgiven(seed=seeds, d_t=st.integers(2, 6), lam=dampings)
def test_spectrum(xp, dtype, seed, d_t, lam):
    """M-P2: P â = λ/(λ+‖â‖²) â, P v = v for v ⊥ â, P symmetric with 0 < eig ≤ 1."""
    rng = np.random.default_rng(seed)
    a_np, a = rand(xp, dtype, rng, d_t, shift=0.5)
    P = to_numpy(mc.mac_apply(xp.eye(d_t, dtype=dtype), a, lam))  # G = I ⇒ U = P
    t = tol(xp, dtype)
    assert_close(P, P.T, **t)
    nrm2 = float(a_np @ a_np)
    assert_close(P @ a_np, lam / (lam + nrm2) * a_np, **t)
    v = rng.standard_normal(d_t)
    v -= (v @ a_np) / nrm2 * a_np
    assert_close(P @ v, v, **t)
    ev = np.linalg.eigvalsh((P + P.T) / 2)
    assert ev.min() > 0 and ev.max() <= 1 + t["rtol"]
    assert_close(np.sort(ev)[0], lam / (lam + nrm2), **t)


@xgiven(seed=seeds, d_out=st.integers(1, 4), d_t=st.integers(1, 5), lam=dampings,
       c=st.sampled_from([0.1, 0.5, 2.0, 7.0]))
def test_scale_invariance(xp, dtype, seed, d_out, d_t, lam, c):
    """M-P3: P(c â, c² λ) = P(â, λ)."""
    rng = np.random.default_rng(seed)
    _, g = rand(xp, dtype, rng, d_out, d_t)
    a_np, a = rand(xp, dtype, rng, d_t)
    a_c = asarray(xp, c * a_np, dtype)
    assert_close(mc.mac_apply(g, a_c, c * c * lam), to_numpy(mc.mac_apply(g, a, lam)), **tol(xp, dtype))


def test_zero_mean_is_identity(xp, dtype):
    """M-P4: ā = 0 (no bias, zero-mean inputs) ⇒ MAC returns the gradient bit-for-bit."""
    rng = np.random.default_rng(7)
    g_np, g = rand(xp, dtype, rng, 4, 5)
    pc = mc.mac(decay=0.9, damping=0.3)
    s = pc.init(5, xp=xp, dtype=dtype)
    for _ in range(3):
        x_np = rng.standard_normal(5)
        rows = asarray(xp, np.stack([x_np, -x_np]), dtype)  # two cancelling rows: ā = 0 exactly
        s = pc.refresh(pc.update(s, rows))
    assert np.all(to_numpy(s.mean_hat) == 0)
    out = pc.apply(s, g)
    assert_like(out, g)
    assert np.array_equal(to_numpy(out), g_np)
    assert np.array_equal(to_numpy(mc.mac_apply(g, xp.zeros((5,), dtype=dtype), 2.0)), g_np)


@xgiven(2, seed=seeds, rows_=st.integers(1, 6), d_in=st.integers(1, 5), lam=dampings)
def test_equal_rows_is_lambda_foof(xp, dtype, seed, rows_, d_in, lam):
    """M-P7: all rows equal ⇒ A = āāᵀ exactly and MAC = λ × FOOF with the same λ."""
    rng = np.random.default_rng(seed)
    x_np = np.broadcast_to(rng.standard_normal(d_in), (rows_, d_in))
    rows = mc.linear_rows(asarray(xp, x_np, dtype), bias=True)
    a = mc.mean_activation(rows)
    A = mc.input_factor(rows)
    assert_close(A, np.outer(to_numpy(a), to_numpy(a)), **tol(xp, dtype))
    g_np, g = rand(xp, dtype, rng, 3, d_in + 1)
    foof = g @ mc.damped_inverse(A, lam)
    assert_close(mc.mac_apply(g, a, lam), lam * to_numpy(foof), **tol(xp, dtype, 4))


# ---------------------------------------------------------------------------------------------
# statistics: mean activation, EMA (M-P5, M-P6), SMAC diagonal


@xgiven(seed=seeds, n=st.integers(1, 6), d=st.integers(1, 4), bias=st.booleans())
def test_mean_activation(xp, dtype, seed, n, d, bias):
    rng = np.random.default_rng(seed)
    x_np, x = rand(xp, dtype, rng, n, d)
    m = mc.mean_activation(mc.linear_rows(x, bias=bias))
    assert_like(m, x, dtype=stats_dtype_of(xp, dtype))
    want = x_np.mean(axis=0)
    if bias:
        want = np.concatenate([want, [1.0]])
        assert float(to_numpy(m)[-1]) == 1.0
    assert_close(m, want, **tol(xp, dtype))


@xgiven(seed=seeds, k=st.integers(1, 8), decay=st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99]),
       lam=dampings)
def test_ema_weights_and_bias_entry(xp, dtype, seed, k, decay, lam):
    """M-P5: â's bias entry is exactly 1 after EMA + debiasing; M-P6: â = Σ w_i ā_i with
    w_i = (1−β)β^{k−i}/(1−β^k); apply reads the mean frozen at the last refresh."""
    rng = np.random.default_rng(seed)
    pc = mc.mac(decay=decay, damping=lam)
    s = pc.init(4, xp=xp, dtype=dtype)
    assert s.mean.value.dtype == stats_dtype_of(xp, dtype)
    means = []
    for _ in range(k):
        x_np, x = rand(xp, dtype, rng, int(rng.integers(1, 5)), 3, shift=1.0)
        means.append(np.concatenate([x_np.mean(axis=0), [1.0]]))
        s = pc.refresh(pc.update(s, mc.linear_rows(x, bias=True)))
        m = to_numpy(s.mean_hat)
        assert m[-1] == 1.0, f"bias entry {m[-1]!r} after {len(means)} updates"
    w = np.array([(1 - decay) * decay ** (k - i) for i in range(1, k + 1)]) / (1 - decay**k)
    assert_close(s.mean_hat, w @ np.stack(means), **tol(xp, dtype))
    # update without refresh: apply still uses the old â (the cache lags by design)
    g_np, g = rand(xp, dtype, rng, 2, 4)
    before = to_numpy(pc.apply(s, g))
    x2 = asarray(xp, rng.standard_normal((3, 3)) + 5.0, dtype)
    s2 = pc.update(s, mc.linear_rows(x2, bias=True))
    assert np.array_equal(to_numpy(pc.apply(s2, g)), before)
    assert not np.allclose(to_numpy(pc.apply(pc.refresh(s2), g)), before)


@xgiven(seed=seeds, r=st.integers(1, 6), d_out=st.integers(1, 4), lam=dampings)
def test_smac_diagonal(xp, dtype, seed, r, d_out, lam):
    """SMAC: z = E_rows[g⊙g] (published) or (1/R)Σ g⊙g (canonical); V = diag(1/(z+λ)) · MAC(Ĝ)."""
    rng = np.random.default_rng(seed)
    gr_np, gr = rand(xp, dtype, rng, r, d_out)
    z = mc.gradient_diagonal(gr)
    assert_like(z, gr, dtype=stats_dtype_of(xp, dtype))
    assert_close(z, (gr_np**2).mean(axis=0), **tol(xp, dtype))
    z2 = mc.gradient_diagonal(gr, reduction_factor=0.25)
    assert_close(z2, (gr_np**2).sum(axis=0) / 0.25, **tol(xp, dtype))
    g_np, g = rand(xp, dtype, rng, d_out, 3)
    a_np, a = rand(xp, dtype, rng, 3)
    out = mc.mac_apply(g, a, lam, grad_diag=z)
    assert_like(out, g)
    want = (g_np @ mac_dense_preconditioner(a_np, lam)) / (to_numpy(z) + lam)[:, None]
    assert_close(out, want, **tol(xp, dtype, 2))


# ---------------------------------------------------------------------------------------------
# attention (M-P8, T10)


def _softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@xgiven(seed=seeds, b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 4), dh=st.integers(1, 3))
def test_attention_probs(xp, dtype, seed, b, h, n, dh):
    rng = np.random.default_rng(seed)
    q_np, q = rand(xp, dtype, rng, b, h, n, dh)
    k_np, k = rand(xp, dtype, rng, b, h, n, dh)
    s = q_np @ np.swapaxes(k_np, -1, -2) / np.sqrt(dh)
    t = tol(xp, dtype)
    p = mc.attention_probs(q, k)
    assert_like(p, q, dtype=stats_dtype_of(xp, dtype))
    assert_close(p, _softmax(s), **t)
    # causal mask by hand: query i sees keys j ≤ i only
    want = np.zeros_like(s)
    for i in range(n):
        want[..., i, : i + 1] = _softmax(s[..., i, : i + 1])
    pc = to_numpy(mc.attention_probs(q, k, causal=True))
    assert_close(pc, want, **t)
    assert np.all(pc[..., np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] == 0)
    # boolean mask (True = attend) and additive bias
    keep = rng.random((n, n)) < 0.6
    keep[:, 0] = True
    pm = mc.attention_probs(q, k, mask=asarray(xp, keep))
    want_m = np.where(keep, np.exp(s - s.max(-1, keepdims=True)), 0.0)
    assert_close(pm, want_m / want_m.sum(-1, keepdims=True), **t)
    bias_np, bias = rand(xp, dtype, rng, n, n)
    assert_close(mc.attention_probs(q, k, mask=bias), _softmax(s + bias_np), **t)
    # fully masked query rows give zeros, not NaN
    none = np.zeros((n, n), dtype=bool)
    assert np.all(to_numpy(mc.attention_probs(q, k, mask=asarray(xp, none))) == 0)


@pytest.mark.parametrize("mask", ["bool", "additive"])
def test_attention_probs_fused_softmax_only_without_mask(xp, mask, monkeypatch):
    """The backends' fused softmax (torch.softmax, jax.nn.softmax) gives NaN on a row whose keys
    are all masked (-inf); attention_probs uses it only without a mask, so fully masked rows stay
    zero on every backend. A stand-in with the fused kernels' NaN behaviour makes the dispatch
    observable on NumPy / array_api_strict (whose standard path is otherwise the only one)."""
    calls = []

    def fused(xp_, s):  # softmax over the last axis as torch / JAX compute it: NaN on all -inf rows
        calls.append(tuple(s.shape))
        mx = xp_.max(s, axis=-1, keepdims=True)
        e = xp_.exp(s - mx)
        return e / xp_.sum(e, axis=-1, keepdims=True)

    monkeypatch.setattr(_delegate, "softmax_last", fused)
    rng = np.random.default_rng(5)
    q_np, q = rand(xp, xp.float64, rng, 1, 2, 3, 2)
    k_np, k = rand(xp, xp.float64, rng, 1, 2, 3, 2)
    s = q_np @ np.swapaxes(k_np, -1, -2) / np.sqrt(2)
    t = tol(xp, xp.float64)
    assert_close(mc.attention_probs(q, k), _softmax(s), **t)  # no mask: the fused kernel
    assert calls == [(1, 2, 3, 3)]
    keep = np.ones((3, 3), dtype=bool)
    keep[1] = False  # query 1 sees no key
    if mask == "bool":
        m = asarray(xp, keep)
    else:
        m = asarray(xp, np.where(keep, 0.0, -np.inf))
    want = np.zeros_like(s)  # rows 0 and 2 keep every key; row 1 none
    want[..., [0, 2], :] = _softmax(s[..., [0, 2], :])
    assert_close(mc.attention_probs(q, k, mask=m), want, **t)
    assert calls == [(1, 2, 3, 3)]


@xgiven(seed=seeds, b=st.integers(1, 3), h=st.integers(1, 3), n=st.integers(1, 4), d=st.integers(1, 4),
       bias=st.booleans())
def test_attention_weighted_mean(xp, dtype, seed, b, h, n, d, bias):
    """Reference mode = Σ_j ᾱ_j x̄_j; per-head mode = exact mean of the attention-weighted inputs;
    the bias entry is exactly 1 in both (M-P5)."""
    rng = np.random.default_rng(seed)
    x_np, x = rand(xp, dtype, rng, b, n, d)
    attn_np = _softmax(rng.standard_normal((b, h, n, n)))
    attn = asarray(xp, attn_np, dtype)
    xt = np.concatenate([x_np, np.ones((b, n, 1))], axis=-1) if bias else x_np
    ref = mc.attention_weighted_mean(x, attn, bias=bias)
    per = mc.attention_weighted_mean(x, attn, bias=bias, mode="per_head")
    assert_like(ref, x, dtype=stats_dtype_of(xp, dtype))
    assert_like(per, x, dtype=stats_dtype_of(xp, dtype))
    t = tol(xp, dtype)
    abar = attn_np.mean(axis=(0, 1, 2))
    assert_close(ref, abar @ xt.mean(axis=0), **t)
    exact = np.einsum("bhij,bjd->hd", attn_np, xt) / (b * n)  # (1/(BN)) Σ_{b,i} Σ_j α x̃_j
    assert_close(per, exact, **t)
    if bias:
        assert to_numpy(ref)[-1] == 1.0 and np.all(to_numpy(per)[:, -1] == 1.0)


@xgiven(seed=seeds, b=st.integers(1, 3), h=st.integers(1, 3), n=st.integers(1, 4), d=st.integers(1, 4))
def test_attention_special_cases(xp, dtype, seed, b, h, n, d):
    """M-P8: uniform attention (W_Q = 0) ⇒ v̄ = ā and P^V = P; identical, batch-independent
    attention ⇒ per-head = reference for every head."""
    rng = np.random.default_rng(seed)
    x_np, x = rand(xp, dtype, rng, b, n, d, shift=0.5)
    t = tol(xp, dtype)
    _, k = rand(xp, dtype, rng, b, h, n, 2)
    uniform = mc.attention_probs(xp.zeros((b, h, n, 2), dtype=dtype), k)
    assert_close(uniform, np.full((b, h, n, n), 1.0 / n), **t)
    abar = to_numpy(mc.mean_activation(mc.linear_rows(x, bias=True)))
    v_ref = mc.attention_weighted_mean(x, uniform, bias=True)
    assert_close(v_ref, abar, **t)
    assert_close(mc.attention_weighted_mean(x, uniform, bias=True, mode="per_head"),
                 np.broadcast_to(abar, (h, d + 1)), **t)
    g_np, g = rand(xp, dtype, rng, 2 * h, d + 1)
    assert_close(mc.mac_apply(g, v_ref, 0.5),
                 to_numpy(mc.mac_apply(g, asarray(xp, abar, dtype), 0.5)), **t)

    same = _softmax(rng.standard_normal((n, n)))
    attn = asarray(xp, np.broadcast_to(same, (b, h, n, n)), dtype)
    ref = to_numpy(mc.attention_weighted_mean(x, attn, bias=True))
    per = mc.attention_weighted_mean(x, attn, bias=True, mode="per_head")
    assert_close(per, np.broadcast_to(ref, (h, d + 1)), **t)


@xgiven(seed=seeds, b=st.integers(1, 2), n=st.integers(1, 3), h=st.integers(1, 3), dh=st.integers(1, 3))
def test_split_qkv_layout(xp, dtype, seed, b, n, h, dh):
    """Output layout (3, H, d_h): rows [0, D) = Q, [D, 2D) = K, [2D, 3D) = V, head h owns
    [h·d_h, (h+1)·d_h) inside each; the split round-trips."""
    rng = np.random.default_rng(seed)
    dd = h * dh
    o_np, o = rand(xp, dtype, rng, b, n, 3 * dd)
    q, k, v = mc.split_qkv(o, h)
    for part, idx in ((q, 0), (k, 1), (v, 2)):
        assert_like(part, o)
        assert part.shape == (b, h, n, dh)
        for hh in range(h):
            lo = idx * dd + hh * dh
            assert_close(to_numpy(part)[:, hh], o_np[:, :, lo : lo + dh], rtol=0, atol=0)
    back = xp.concat([xp.reshape(xp.permute_dims(p, (0, 2, 1, 3)), (b, n, dd)) for p in (q, k, v)], axis=2)
    assert_close(back, o_np, rtol=0, atol=0)


@xgiven(seed=seeds, h=st.integers(1, 3), rows_per=st.integers(1, 3), d_t=st.integers(1, 5), lam=dampings,
       scale=scales)
def test_per_head_mean_applies_to_row_blocks(xp, dtype, seed, h, rows_per, d_t, lam, scale):
    rng = np.random.default_rng(seed)
    g_np, g = rand(xp, dtype, rng, h * rows_per, d_t)
    a_np, a = rand(xp, dtype, rng, h, d_t, shift=0.3)
    z_np = rng.random(h * rows_per)
    out = mc.mac_apply(g, a, lam, scale=scale, grad_diag=asarray(xp, z_np, dtype))
    assert_like(out, g)
    want = np.concatenate([
        g_np[i * rows_per : (i + 1) * rows_per] @ mac_dense_preconditioner(a_np[i], lam, scale=scale)
        for i in range(h)
    ]) / (z_np + lam)[:, None]
    assert_close(out, want, **tol(xp, dtype, 2))


# ---------------------------------------------------------------------------------------------
# the stateful preconditioner: contract (apply = to_dense⁻¹, refresh idempotent, dtype/device)


@xgiven(2, seed=seeds, d_out=st.integers(1, 3), d_t=st.integers(1, 4), lam=dampings, scale=scales,
       diagonal=st.booleans(), heads=st.sampled_from([None, 1, 3]), k=st.integers(1, 3))
def test_preconditioner_contract(xp, dtype, seed, d_out, d_t, lam, scale, diagonal, heads, k):
    rng = np.random.default_rng(seed)
    if heads is not None:
        d_out = heads * d_out
    pc = mc.mac(decay=0.9, damping=lam, scale=scale, diagonal=diagonal)
    s = pc.init(d_t, d_out, xp=xp, heads=heads, dtype=dtype)
    sdt = stats_dtype_of(xp, dtype)
    assert s.mean.value.dtype == sdt and s.mean_hat.dtype == sdt
    for _ in range(k):
        gr = rand(xp, dtype, rng, 5, d_out)[1] if diagonal else None
        if heads is None:
            s = pc.update(s, rand(xp, dtype, rng, 4, d_t, shift=0.5)[1], gr)
        else:
            s = pc.update(s, grad_rows=gr, mean=rand(xp, sdt, rng, heads, d_t, shift=0.5)[1])
    s = pc.refresh(s)
    s2 = pc.refresh(s)  # idempotent
    for leaf_a, leaf_b in zip(_leaves(s), _leaves(s2)):
        assert np.array_equal(to_numpy(leaf_a), to_numpy(leaf_b))
    g_np, g = rand(xp, dtype, rng, d_out, d_t)
    out = pc.apply(s, g)
    assert_like(out, g)
    dense = pc.to_dense(s, d_out)
    assert_like(dense, s.mean_hat)
    D = to_numpy(dense)
    assert_close(D, D.T, rtol=0, atol=0)
    assert np.linalg.eigvalsh(D).min() > 0
    assert_close(out, kron_inv_apply(D, g_np), **tol(xp, dtype, 4))


def _leaves(state):
    out = []
    for v in state:
        if v is None:
            continue
        if isinstance(v, tuple):
            out.extend(_leaves(v))
        else:
            out.append(v)
    return out


# ---------------------------------------------------------------------------------------------
# native fast paths (maccore/_delegate.py) against the standard-only form


@pytest.mark.parametrize("dt", ["float32", "float64"])
@pytest.mark.parametrize("m,n", [(1, 1), (7, 5), (1000, 100), (300, 2000)])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_rank1_numpy_fast_path(dt, m, n, layout):
    import array_api_compat

    xp = array_api_compat.array_namespace(np.empty(0))
    rng = np.random.default_rng(m * n)
    g = rng.standard_normal((m, 2 * n) if layout == "strided" else (m, n)).astype(dt)
    g = g[:, ::2] if layout == "strided" else (np.asfortranarray(g) if layout == "F" else g)
    a = rng.standard_normal(n).astype(dt)
    coef = (a / (1.0 + a @ a)).astype(dt)
    inv = np.asarray(1.0 / (1.0 + a @ a), dtype=dt)
    g0 = g.copy()
    if m * n * np.dtype(dt).itemsize > 2 * _delegate._CHUNK_BYTES:  # several cache blocks
        assert m > max(1, _delegate._CHUNK_BYTES // (n * np.dtype(dt).itemsize))
    native = _delegate.mac_rank1(xp, g, None, a, inv, None)
    assert (native is None) == (not g.flags.c_contiguous)  # the blocked kernel takes C order
    fast = mc.mac_apply(g, a, 1.0)
    std, _ = _delegate.mac_rank1_standard(xp, g, None, a, inv, None)
    assert fast.dtype == g.dtype and fast.shape == g.shape
    if native is not None:
        assert_close(native[0], to_numpy(std), **({"rtol": 1e-4, "atol": 1e-4} if dt == "float32"
                                                  else {"rtol": 1e-11, "atol": 1e-11}))
    assert np.array_equal(g, g0)  # input untouched
    ref = g.astype(np.float64) - np.outer(g.astype(np.float64) @ a, coef)
    t = {"rtol": 1e-4, "atol": 1e-4} if dt == "float32" else {"rtol": 1e-11, "atol": 1e-11}
    assert_close(fast, to_numpy(std), **t)
    assert_close(fast, ref, **t)


@pytest.mark.parametrize("dt", ["float32", "float64"])
@pytest.mark.parametrize("transposed", [False, True])
def test_rank1_torch_addr(dt, transposed):
    torch = pytest.importorskip("torch")
    import array_api_compat

    xp = array_api_compat.array_namespace(torch.empty(0))
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, dt)
    g = torch.randn(40, 30, generator=gen, dtype=dtype)
    g = g.T if transposed else g
    a = torch.randn(g.shape[1], generator=gen, dtype=dtype)
    inv = 1.0 / (0.5 + a @ a)
    g0 = g.clone()
    fast, _ = _delegate.mac_rank1(xp, g, None, a, inv, None)
    std, _ = _delegate.mac_rank1_standard(xp, g, None, a, inv, None)
    assert_close(mc.mac_apply(g, a, 0.5), to_numpy(std), **tol(xp, dtype))
    assert fast.dtype == dtype and torch.equal(g, g0)
    assert_close(fast, to_numpy(std), **tol(xp, dtype))


def test_mac_apply_never_forms_square_matrix():
    """T19: memory ≈ the gradient, not d̃² (numpy allocations are visible to tracemalloc)."""
    import tracemalloc

    import array_api_compat  # noqa: F401

    rng = np.random.default_rng(0)
    d_out, d_t = 4, 6000
    g = rng.standard_normal((d_out, d_t))
    a = rng.standard_normal(d_t)
    mc.mac_apply(g, a, 1.0)  # warm up
    tracemalloc.start()
    out = mc.mac_apply(g, a, 1.0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert out.shape == g.shape
    assert peak < 10 * g.nbytes < d_t * d_t * 8 / 100, f"peak {peak} bytes"


# ---------------------------------------------------------------------------------------------
# jax.jit == eager


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_jit_equals_eager(dt):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    dtype = getattr(jnp, dt)
    t = tol(jnp, dtype)
    rng = np.random.default_rng(5)
    g = jnp.asarray(rng.standard_normal((6, 5)), dtype=dtype)
    a = jnp.asarray(rng.standard_normal(5), dtype=dtype)
    ah = jnp.asarray(rng.standard_normal((3, 5)), dtype=dtype)
    z = jnp.asarray(rng.random(6), dtype=dtype)

    def f(g, a, ah, z):
        return (mc.mac_apply(g, a, 0.7), mc.mac_apply(g, ah, 0.7, grad_diag=z, scale="inverse"))

    for e, j in zip(f(g, a, ah, z), jax.jit(f)(g, a, ah, z)):
        assert j.dtype == dtype
        assert_close(j, to_numpy(e), **t)

    x = jnp.asarray(rng.standard_normal((2, 4, 4)), dtype=dtype)
    qkv = jnp.asarray(rng.standard_normal((2, 4, 6)), dtype=dtype)

    def attn(x, qkv):
        q, k, _ = mc.split_qkv(qkv, 2)
        p = mc.attention_probs(q, k, causal=True)
        return mc.attention_weighted_mean(x, p, bias=True), mc.attention_weighted_mean(x, p, bias=True,
                                                                                      mode="per_head")

    for e, j in zip(attn(x, qkv), jax.jit(attn)(x, qkv)):
        assert_close(j, to_numpy(e), **t)

    pc = mc.mac(decay=0.9, damping=0.5, diagonal=True)
    xin = jnp.asarray(rng.standard_normal((7, 4)), dtype=dtype)
    gr = jnp.asarray(rng.standard_normal((7, 6)), dtype=dtype)

    def step(s, x, gr, g):
        s = pc.refresh(pc.update(s, mc.linear_rows(x, bias=True), gr))
        return s, pc.apply(s, g)

    se = sj = pc.init(5, 6, xp=jnp, dtype=dtype)
    jstep = jax.jit(step)
    eps = float(jnp.finfo(dtype).eps)
    for i in range(3):
        se, oe = step(se, xin + i, gr, g)
        sj, oj = jstep(sj, xin + i, gr, g)
        assert oj.dtype == dtype
        assert_close(oj, to_numpy(oe), **t)
        assert float(se.mean_hat[-1]) == 1.0  # eager: exact (M-P5)
        # jit: XLA folds (Σ/R)·(1−β) into Σ·((1−β)/R), which is not correctly rounded: ≤ 2 ulp
        assert abs(float(sj.mean_hat[-1]) - 1.0) <= 2 * eps
    assert_close(pc.to_dense(sj, 6), to_numpy(pc.to_dense(se, 6)), **t)


# ---------------------------------------------------------------------------------------------
# low precision (T11) and backend equivalence (M-P10)


@pytest.mark.parametrize("low", ["float16", "bfloat16"])
def test_low_precision_inputs(xp, low):
    """Half-precision inputs: statistics in float32, results back in the input's dtype."""
    dt = getattr(xp, low, None)
    if dt is None:
        pytest.skip(f"{xp.__name__} has no {low}")
    rng = np.random.default_rng(0)
    x = asarray(xp, rng.standard_normal((6, 4)), xp.float32)
    try:
        x = xp.astype(x, dt)
    except Exception as exc:  # pragma: no cover - depends on the backend
        pytest.skip(f"{xp.__name__} cannot cast to {low}: {exc}")
    rows = mc.linear_rows(x, bias=True)
    assert rows.dtype == dt
    a = mc.mean_activation(rows)
    A = mc.input_factor(rows)
    assert a.dtype == xp.float32 and A.dtype == xp.float32
    assert float(to_numpy(a)[-1]) == 1.0
    img = xp.reshape(x, (1, 1, 6, 4))
    assert mc.conv2d_mean_patch(img, 2, bias=True).dtype == xp.float32
    g = xp.astype(asarray(xp, rng.standard_normal((3, 5)), xp.float32), dt)
    g32 = to_numpy(g)
    G = mc.gradient_factor(xp.astype(rows[:, :3], xp.float32), reduction_factor=1.0)
    for out, want in (
        (mc.mac_apply(g, a, 0.5), g32 @ mac_dense_preconditioner(to_numpy(a), 0.5)),
        (mc.kfac_apply(g, A, G, 0.5), kfac_damped_solve(g32, to_numpy(A), to_numpy(G), 0.5)),
    ):
        assert out.dtype == dt
        assert_close(out, want, rtol=2e-2, atol=2e-2)


def test_backend_equivalence():
    """M-P10: every installed backend gives the numpy result (float64, eps-derived tolerance); the
    per-dtype checks of every other test compare each backend with the same float64 oracles."""
    from tests.conftest import _selected_backends, load_backend

    rng = np.random.default_rng(42)
    x_np = rng.standard_normal((2, 3, 5, 5))
    g_np = rng.standard_normal((4, 3 * 4 + 1))
    gr_np = rng.standard_normal((2 * 16, 4))

    def run(xp, dtype):
        x = asarray(xp, x_np, dtype)
        rows = mc.conv2d_rows(x, 2, stride=1, padding=((1, 0), (0, 1)), dilation=(2, 1), bias=True)
        a = mc.mean_activation(rows)
        A = mc.input_factor(rows)
        G = mc.gradient_factor(asarray(xp, gr_np, dtype), reduction_factor=0.5)
        g = asarray(xp, g_np, dtype)
        out = [rows, a, mc.mac_apply(g, a, 0.3), mc.mac_apply(g, a, 0.3, scale="inverse")]
        out += [mc.kfac_apply(g, A, G, 0.1, mode=m) for m in ("tikhonov", "pi", "exact")]
        return [to_numpy(o) for o in out]

    import array_api_compat

    np_xp = array_api_compat.array_namespace(np.empty(0))
    ref = run(np_xp, np.float64)
    checked = []
    for name in _selected_backends():
        try:
            xp = load_backend(name)
        except pytest.skip.Exception:
            continue
        for r, o in zip(ref, run(xp, xp.float64)):  # float64: the tightest comparison
            assert_close(o, r, **tol(xp, xp.float64, 8), err_msg=name)
        checked.append(name)
    assert "numpy" in checked and len(checked) >= 2, checked
