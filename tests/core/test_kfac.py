"""Exact KFAC: factors, π-damping, damped inverses, kfac_apply, the stateful preconditioner
(docs/math.md, T1, T2, T11, T16). Exactness against the GGN is in test_exactness.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import maccore as mc
from maccore.testing import kfac_damped_matrix
from tests.conftest import asarray, assert_close, to_numpy, tol
from tests.core.helpers import assert_like, kron_inv_apply, rand, seeds, spd, stats_dtype_of, xgiven

dampings = st.sampled_from([1e-2, 0.1, 1.0, 5.0])
modes = st.sampled_from(["tikhonov", "pi", "exact"])


@xgiven(seed=seeds, r=st.integers(1, 6), d=st.integers(1, 4), d_out=st.integers(1, 4),
        R=st.sampled_from([2.0, 1.0, 0.25, 1 / 12]))
def test_factors(xp, dtype, seed, r, d, d_out, R):
    """A = rowsᵀrows / #rows (a plain mean), G = (1/R) Σ g gᵀ (T2), G ⊗ A row-major (T1)."""
    rng = np.random.default_rng(seed)
    x_np, x = rand(xp, dtype, rng, r, d)
    g_np, g = rand(xp, dtype, rng, r, d_out)
    t = tol(xp, dtype)
    A = mc.input_factor(x)
    G = mc.gradient_factor(g, reduction_factor=R)
    sdt = stats_dtype_of(xp, dtype)
    assert_like(A, x, dtype=sdt)
    assert_like(G, g, dtype=sdt)
    assert_close(A, x_np.T @ x_np / r, **t)
    assert_close(G, g_np.T @ g_np / R, **t)
    K = mc.kfac_dense(A, G)
    assert_like(K, A)
    assert_close(K, np.kron(to_numpy(G), to_numpy(A)), **t)


@xgiven(seed=seeds, da=st.integers(1, 4), dg=st.integers(1, 4), lam=dampings,
        rank_a=st.integers(0, 4), zero_g=st.booleans())
def test_pi_dampings(xp, dtype, seed, da, dg, lam, rank_a, zero_g):
    """π = sqrt((tr A/d_A)/(tr G/d_G)), λ_A = π√λ, λ_G = √λ/π, λ_Aλ_G = λ; a zero trace gives π = 1."""
    rng = np.random.default_rng(seed)
    A_np = spd(rng, da, rank=min(rank_a, da))
    G_np = np.zeros((dg, dg)) if zero_g else spd(rng, dg, scale=3.0)
    A, G = asarray(xp, A_np, dtype), asarray(xp, G_np, dtype)
    la, lg = mc.pi_dampings(A, G, lam)
    ta, tg = np.trace(A_np) / da, np.trace(G_np) / dg
    pi = np.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
    t = tol(xp, dtype)
    assert_close(la, np.asarray(pi * np.sqrt(lam)), **t)
    assert_close(lg, np.asarray(np.sqrt(lam) / pi), **t)
    assert_close(to_numpy(la) * to_numpy(lg), np.asarray(lam), **t)


@xgiven(seed=seeds, d=st.integers(1, 5), lam=dampings, rank=st.integers(0, 5))
def test_damped_inverse(xp, dtype, seed, d, lam, rank):
    rng = np.random.default_rng(seed)
    M_np = spd(rng, d, rank=min(rank, d))
    M = asarray(xp, M_np, dtype)
    inv = mc.damped_inverse(M, lam)
    assert_like(inv, M)
    I = to_numpy(inv)
    assert np.array_equal(I, I.T)  # symmetrised
    assert_close(I, np.linalg.inv(M_np + lam * np.eye(d)), **tol(xp, dtype, 4))


def test_damped_inverse_unchecked(xp, dtype):
    """``checked=False``: the checked result where the inverse exists (bit for bit, nothing
    retried); a non-finite result where it does not (NaN; JAX's own infinities), instead of the
    float64 retry and the error; a bool flag."""
    rng = np.random.default_rng(5)
    M = asarray(xp, spd(rng, 4, rank=2), dtype)
    for lam in (1e-3, 0.5):
        assert np.array_equal(to_numpy(mc.damped_inverse(M, lam, checked=False)),
                              to_numpy(mc.damped_inverse(M, lam)))
    singular = asarray(xp, np.diag([-0.5, 1.0]), dtype)  # M + 0.5 I has a zero pivot
    out = to_numpy(mc.damped_inverse(singular, 0.5, checked=False))
    assert not np.isfinite(out).all()
    with pytest.raises(mc.DecompositionError, match=r"could not invert factor of shape \[2, 2\]"):
        mc.damped_inverse(singular, 0.5)
    nan = asarray(xp, np.array([[1.0, np.nan], [np.nan, 1.0]]), dtype)
    assert not np.isfinite(to_numpy(mc.damped_inverse(nan, 0.1, checked=False))).any()
    with pytest.raises(TypeError, match="checked"):
        mc.damped_inverse(M, 0.1, checked=1)
    assert_close(to_numpy(mc.damped_inverse(M, 0.5, checked=False)),
                 np.linalg.inv(to_numpy(M).astype(np.float64) + 0.5 * np.eye(4)), **tol(xp, dtype, 4))


def test_damped_inverse_rejects_nan(xp, dtype):
    M = asarray(xp, np.array([[1.0, np.nan], [np.nan, 1.0]]), dtype)
    with pytest.raises(mc.DecompositionError, match=r"could not invert G of shape \[2, 2\]"):
        mc.damped_inverse(M, 0.1, name="G")
    with pytest.raises(mc.DecompositionError, match=r"\[2, 2\]"):
        mc.kfac_apply(xp.ones((2, 2), dtype=dtype), M, M, 0.1, mode="exact")


@xgiven(seed=seeds, d_out=st.integers(1, 4), d_t=st.integers(1, 4), lam=dampings, mode=modes,
        low_rank=st.booleans())
def test_kfac_apply_equals_dense_inverse(xp, dtype, seed, d_out, d_t, lam, mode, low_rank):
    """The three damping modes against dense inverses of their damped Kronecker matrices."""
    rng = np.random.default_rng(seed)
    A_np = spd(rng, d_t, rank=1 if low_rank else None)
    G_np = spd(rng, d_out, scale=2.0)
    A, G = asarray(xp, A_np, dtype), asarray(xp, G_np, dtype)
    g_np, g = rand(xp, dtype, rng, d_out, d_t)
    out = mc.kfac_apply(g, A, G, lam, mode=mode)
    assert_like(out, g)
    if mode == "exact":
        M = np.kron(G_np, A_np) + lam * np.eye(d_out * d_t)
    else:
        la, lg = (lam, lam)
        if mode == "pi":
            pi = np.sqrt((np.trace(A_np) / d_t) / (np.trace(G_np) / d_out))
            la, lg = pi * np.sqrt(lam), np.sqrt(lam) / pi
        M = np.kron(G_np + lg * np.eye(d_out), A_np + la * np.eye(d_t))
    assert_close(out, kron_inv_apply(M, g_np), **tol(xp, dtype, 8))


def test_tikhonov_pair(xp, dtype):
    """``damping=(λ_G, λ_A)`` in tikhonov mode."""
    rng = np.random.default_rng(2)
    A_np, G_np = spd(rng, 3), spd(rng, 2)
    g_np, g = rand(xp, dtype, rng, 2, 3)
    out = mc.kfac_apply(g, asarray(xp, A_np, dtype), asarray(xp, G_np, dtype), (0.3, 2.0))
    M = np.kron(G_np + 0.3 * np.eye(2), A_np + 2.0 * np.eye(3))
    assert_close(out, kron_inv_apply(M, g_np), **tol(xp, dtype, 4))


@xgiven(2, seed=seeds, d_out=st.integers(1, 3), d_t=st.integers(1, 4), lam=dampings, mode=modes,
        k=st.integers(1, 3), decay=st.sampled_from([0.0, 0.5, 0.95]), pair=st.booleans())
def test_preconditioner_contract(xp, dtype, seed, d_out, d_t, lam, mode, k, decay, pair):
    """apply == to_dense⁻¹ (row-major vec), refresh idempotent, EMA of A and G, dtype/device kept."""
    rng = np.random.default_rng(seed)
    damping = (lam, 2 * lam) if pair and mode == "tikhonov" else lam
    pc = mc.kfac(decay=decay, damping=damping, mode=mode)
    s = pc.init(d_t, d_out, xp=xp, dtype=dtype)
    sdt = stats_dtype_of(xp, dtype)
    assert s.a.value.dtype == sdt and s.g.value.dtype == sdt
    As, Gs = [], []
    R = 0.5
    for i in range(k):
        r = int(rng.integers(1, 6))
        x_np, x = rand(xp, dtype, rng, r, d_t)
        gr_np, gr = rand(xp, dtype, rng, r, d_out)
        if i % 2:
            s = pc.update(s, x, gr, reduction_factor=R)
        else:  # precomputed factors
            s = pc.update(s, A=mc.input_factor(x), G=mc.gradient_factor(gr, reduction_factor=R))
        As.append(x_np.T @ x_np / r)
        Gs.append(gr_np.T @ gr_np / R)
    s = pc.refresh(s)
    s2 = pc.refresh(s)
    for a, b in zip(s, s2):
        if a is not None and not isinstance(a, tuple):
            assert np.array_equal(to_numpy(a), to_numpy(b))
    # the unchecked refresh (nothing read on the host) builds the same cache, bit for bit
    for a, b in zip(s, pc.refresh(s, checked=False)):
        if a is not None and not isinstance(a, tuple):
            assert np.array_equal(to_numpy(a), to_numpy(b))
    w = np.array([(1 - decay) * decay ** (k - i) for i in range(1, k + 1)]) / (1 - decay**k)
    A_np = np.tensordot(w, np.stack(As), axes=1)
    G_np = np.tensordot(w, np.stack(Gs), axes=1)
    t = tol(xp, dtype, 8)
    dense = pc.to_dense(s)
    assert_like(dense, s.a.value)
    D = to_numpy(dense)
    # every mode against maccore.testing's dense damped matrix, written from the definitions (π
    # from the traces of the factors, not from the code under test)
    assert_close(D, kfac_damped_matrix(A_np, G_np, damping, mode=mode), **t)
    g_np, g = rand(xp, dtype, rng, d_out, d_t)
    out = pc.apply(s, g)
    assert_like(out, g)
    assert_close(out, kron_inv_apply(D, g_np), **t)
    # update without refresh leaves apply unchanged (the cache is rebuilt only by refresh)
    x_np, x = rand(xp, dtype, rng, 3, d_t, shift=2.0)
    s3 = pc.update(s, x, rand(xp, dtype, rng, 3, d_out)[1], reduction_factor=R)
    assert np.array_equal(to_numpy(pc.apply(s3, g)), to_numpy(out))


def test_float32_state_float64_gradient(xp):
    """Statistics in float32, gradient in float64: the result keeps the gradient's dtype."""
    rng = np.random.default_rng(0)
    pc = mc.kfac(damping=0.1)
    s = pc.init(3, 2, xp=xp)
    assert s.a.value.dtype == xp.float32
    s = pc.refresh(pc.update(s, rand(xp, xp.float64, rng, 5, 3)[1], rand(xp, xp.float64, rng, 5, 2)[1],
                             reduction_factor=1.0))
    assert s.a.value.dtype == xp.float32
    g_np, g = rand(xp, xp.float64, rng, 2, 3)
    out = pc.apply(s, g)
    assert_like(out, g)
    assert_close(out, kron_inv_apply(to_numpy(pc.to_dense(s)), g_np), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", ["64-32", "32-64"])
def test_kl_clip_mixed_dtypes_accumulate_in_float64(xp, order):
    """KL clipping: a float64 input makes Σ η²⟨P, G⟩ float64 (as documented), whichever side of a
    pair it is on and in whichever order partial sums of different dtypes come; values against
    float64 sums of the same numbers, ν against its definition min(1, sqrt(κ / s))."""
    from maccore.kfac import kl_clip_factor, kl_clip_inner

    rng = np.random.default_rng(11)
    t = tol(xp, xp.float64)
    a_np, a = rand(xp, xp.float32, rng, 2, 3, shift=2.0)
    b_np, b = rand(xp, xp.float64, rng, 2, 3, shift=2.0)
    for x, y in ((a, b), (b, a)):  # one pair whose two sides differ in dtype
        s = kl_clip_inner(x, y, lr=0.3)
        assert s.dtype == xp.float64
        assert_close(s, np.asarray(0.09 * np.sum(a_np * b_np)), **t)
    dts = (xp.float64, xp.float32) if order == "64-32" else (xp.float32, xp.float64)
    data = [(rand(xp, dt, rng, 2, 3, shift=2.0), rand(xp, dt, rng, 2, 3, shift=2.0)) for dt in dts]
    p, g = [pp for (_, pp), _ in data], [gg for _, (_, gg) in data]
    want = [0.09 * float(np.sum(pn * gn)) for (pn, _), (gn, _) in data]
    t32 = tol(xp, xp.float32)  # the float32 pair's own product is summed in float32
    s = kl_clip_inner(p, g, lr=0.3)  # two pairs of different dtypes in one call
    assert s.dtype == xp.float64
    assert_close(s, np.asarray(sum(want)), **t32)
    parts = [kl_clip_inner(pp, gg, lr=0.3) for pp, gg in zip(p, g)]  # layer by layer
    assert [x.dtype for x in parts] == list(dts)
    kappa = 1e-3 * sum(want)
    nu = kl_clip_factor(parts, kl_clip=kappa)
    assert nu.dtype == xp.float64
    assert_close(nu, np.asarray(np.sqrt(kappa / sum(want))), **t32)
    for ps, gs in (([p[0], None], [g[0], g[1]]), ([p[0], p[1]], [g[0], None])):  # one side missing
        with pytest.raises(TypeError, match="must be an array, got None"):
            kl_clip_inner(ps, gs)


def test_kfac_update_names_the_factor_of_a_wrong_dtype(xp):
    """kfac.update refuses a non-floating batch factor, naming which one (A or G)."""
    pc = mc.kfac()
    s = pc.init(3, 2, xp=xp)
    A, G = xp.eye(3, dtype=xp.float32), xp.eye(2, dtype=xp.float32)
    with pytest.raises(TypeError, match="kfac.update: argument 'A' must have a real floating dtype"):
        pc.update(s, A=xp.astype(A, xp.int32), G=G)
    with pytest.raises(TypeError, match="kfac.update: argument 'G' must have a real floating dtype"):
        pc.update(s, A=A, G=xp.astype(G, xp.int32))


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_jit_equals_eager(dt):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    dtype = getattr(jnp, dt)
    t = tol(jnp, dtype, 4)
    rng = np.random.default_rng(11)
    A = jnp.asarray(spd(rng, 4), dtype=dtype)
    G = jnp.asarray(spd(rng, 3), dtype=dtype)
    g = jnp.asarray(rng.standard_normal((3, 4)), dtype=dtype)
    for mode in ("tikhonov", "pi", "exact"):
        f = lambda g, A, G, mode=mode: mc.kfac_apply(g, A, G, 0.2, mode=mode)
        e, j = f(g, A, G), jax.jit(f)(g, A, G)
        assert j.dtype == dtype
        assert_close(j, to_numpy(e), **t)

        pc = mc.kfac(decay=0.9, damping=0.2, mode=mode)
        x = jnp.asarray(rng.standard_normal((6, 4)), dtype=dtype)
        gr = jnp.asarray(rng.standard_normal((6, 3)), dtype=dtype)

        def step(s, x, gr, g, pc=pc):
            s = pc.refresh(pc.update(s, x, gr, reduction_factor=0.5))
            return s, pc.apply(s, g)

        se = sj = pc.init(4, 3, xp=jnp, dtype=dtype)
        jstep = jax.jit(step)
        for i in range(2):
            se, oe = step(se, x + i, gr, g)
            sj, oj = jstep(sj, x + i, gr, g)
            assert oj.dtype == dtype
            assert_close(oj, to_numpy(oe), **t)
        assert_close(pc.to_dense(sj), to_numpy(pc.to_dense(se)), **t)
