"""KFAC's update-size control (issue 13): the KL-clipping factor ν of :func:`maccore.kl_clip_scale`
against a float64 dense oracle — the preconditioned gradients computed with the dense inverse of
each layer's damped Kronecker matrix, ν by hand from ν = min(1, sqrt(κ / Σ_l η_l² ⟨P_l, G_l⟩)) —
in the clipping-active and -inactive branches, and the robust cases (⟨P, G⟩ ≤ 0, NaN, ±∞, η = 0).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import strategies as st

import maccore as mc
from maccore.kfac import kl_clip_factor, kl_clip_inner
from tests.conftest import asarray, assert_close, to_numpy, tol
from tests.core.helpers import assert_like, kron_inv_apply, seeds, spd, stats_dtype_of, xgiven


def _dense_layers(rng, shapes, lam):
    """Per layer (A, G, grad) and the float64 dense-oracle preconditioned gradient
    vec_r⁻¹[((G+λI) ⊗ (A+λI))⁻¹ vec_r(grad)]."""
    out = []
    for d_out, d_t in shapes:
        A, G = spd(rng, d_t, rank=max(1, d_t - 1)), spd(rng, d_out)
        grad = rng.standard_normal((d_out, d_t))
        M = np.kron(G + lam * np.eye(d_out), A + lam * np.eye(d_t))
        out.append((A, G, grad, kron_inv_apply(M, grad)))
    return out


def _nu_oracle(layers, kl_clip, lrs):
    s = sum(eta * eta * float(np.sum(P * g)) for (_, _, g, P), eta in zip(layers, lrs))
    return min(1.0, math.sqrt(kl_clip / s)), s


@xgiven(seed=seeds, n_layers=st.integers(1, 3), lam=st.sampled_from([1e-3, 1e-2, 0.1, 1.0]),
        active=st.booleans(), per_layer_lr=st.booleans())
def test_nu_matches_dense_oracle(xp, dtype, seed, n_layers, lam, active, per_layer_lr):
    """ν (and Σ η²⟨P, G⟩) from kfac_apply's preconditioned gradients equals the hand-computed ν of
    the dense float64 oracle; κ is chosen so that clipping is active (ν < 1) or inactive (ν = 1)."""
    if dtype == xp.float32 and lam < 1e-2:
        lam = 1e-2  # float32 inverses of factors damped by 1e-3 lose too many digits to compare
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(1, 4)), int(rng.integers(1, 5))) for _ in range(n_layers)]
    layers = _dense_layers(rng, shapes, lam)
    lrs = [float(rng.uniform(0.01, 0.5)) for _ in layers] if per_layer_lr else [0.1] * n_layers
    _, s = _nu_oracle(layers, 1.0, lrs)
    kl_clip = 0.01 * s if active else 100.0 * s
    want, _ = _nu_oracle(layers, kl_clip, lrs)
    assert (want < 1.0) == active

    pre, grads = [], []
    for A, G, g, _ in layers:
        gx = asarray(xp, g, dtype)
        pre.append(mc.kfac_apply(gx, asarray(xp, A, dtype), asarray(xp, G, dtype), lam))
        grads.append(gx)
    lr = lrs if per_layer_lr else 0.1
    nu = mc.kl_clip_scale(pre, grads, kl_clip=kl_clip, lr=lr)
    assert_like(nu, grads[0], dtype=stats_dtype_of(xp, dtype))
    assert nu.shape == ()
    # the inverses of the damped factors lose digits (conditioning up to ~1e3 each): the tolerance
    # is that of the preconditioned gradient, not of one product
    t = tol(xp, dtype, factor=10.0)
    inner = kl_clip_inner(pre, grads, lr=lr)
    assert_close(inner, np.asarray(s), rtol=t["rtol"], atol=t["atol"] * abs(s))
    assert_close(nu, np.asarray(want), rtol=t["rtol"], atol=t["atol"])
    if not active:
        assert float(to_numpy(nu)) == 1.0  # the min picks exactly 1
    # the per-layer partial sums give the same ν (how the torch adapter visits its layers)
    parts = [kl_clip_inner(p, g, lr=eta) for p, g, eta in zip(pre, grads, lrs)]
    assert_close(kl_clip_factor(parts, kl_clip=kl_clip), np.asarray(want), rtol=t["rtol"],
                 atol=t["atol"])


def test_dense_oracle_float64_exact():
    """The float64 numpy path reproduces the oracle to round-off, both branches."""
    rng = np.random.default_rng(0)
    layers = _dense_layers(rng, [(3, 4), (2, 5)], 1e-2)
    pre = [mc.kfac_apply(g, A, G, 1e-2) for A, G, g, _ in layers]
    for (_, _, _, P), p in zip(layers, pre):
        np.testing.assert_allclose(p, P, rtol=1e-9)
    grads = [g for _, _, g, _ in layers]
    for kl in (1e-6, 1e6):
        want, _ = _nu_oracle(layers, kl, [0.3, 0.3])
        got = float(mc.kl_clip_scale(pre, grads, kl_clip=kl, lr=0.3))
        assert got == pytest.approx(want, rel=1e-12)
    assert want == 1.0


def test_scaling_bounds_the_kl_estimate():
    """The step ηνP has the quadratic-model KL ½(ηνP)ᵀF(ηνP) = ½ν²η²⟨P, G⟩ (F P = G): after
    clipping ν²η²⟨P, G⟩ = κ exactly."""
    rng = np.random.default_rng(1)
    layers = _dense_layers(rng, [(4, 6)], 1e-3)
    (_, _, g, P), = layers
    nu = float(mc.kl_clip_scale(P, g, kl_clip=1e-3, lr=0.05))
    assert nu < 1
    assert nu**2 * 0.05**2 * float(np.sum(P * g)) == pytest.approx(1e-3, rel=1e-12)


@pytest.mark.parametrize("case, want", [
    ("zero_grad", 1.0),        # ⟨P, G⟩ = 0: nothing to clip
    ("negative", 1.0),         # ⟨P, G⟩ < 0 (an indefinite preconditioner): no clipping, no NaN
    ("zero_lr", 1.0),          # η = 0: s = 0
    ("nan", 1.0),              # NaN: left to the non-finite-step checks, ν itself stays finite
    ("inf", 0.0),              # s = +∞ (the update overflowed): the update is dropped
    ("neg_inf", 1.0),          # s = −∞: as a negative s
    ("tiny", 1.0),             # s subnormal: κ/s overflows to ∞, the min gives 1
])
def test_robust_cases(xp, dtype, case, want):
    g_np = np.array([[1.0, -2.0], [0.5, 3.0]])
    p_np, lr = 2.0 * g_np, 0.1
    if case == "zero_grad":
        g_np, p_np = 0.0 * g_np, 0.0 * g_np
    elif case == "negative":
        p_np = -p_np
    elif case == "zero_lr":
        lr = 0.0
    elif case == "nan":
        p_np = p_np.copy()
        p_np[0, 0] = np.nan
    elif case == "inf":
        p_np = p_np.copy()
        p_np[0, 0] = np.inf
        g_np = np.abs(g_np)
    elif case == "neg_inf":
        p_np = p_np.copy()
        p_np[0, 0] = -np.inf
        g_np = np.abs(g_np)
    elif case == "tiny":
        p_np = g_np * (1e-200 if dtype == xp.float64 else 1e-25)
        lr = 1e-10
    p, g = asarray(xp, p_np, dtype), asarray(xp, g_np, dtype)
    nu = mc.kl_clip_scale(p, g, kl_clip=1e-3, lr=lr)
    got = float(to_numpy(nu))
    assert math.isfinite(got) and 0.0 <= got <= 1.0
    assert got == want


def test_traced_learning_rate_and_kl_clip_under_jit():
    """η and κ may be 0-d arrays (a schedule or ``optax.inject_hyperparams`` under ``jax.jit``)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    g = jnp.asarray([[3.0, 4.0]])

    @jax.jit
    def f(lr, kl):
        return mc.kl_clip_scale(2 * g, g, kl_clip=kl, lr=lr)

    got = float(f(jnp.asarray(0.1), jnp.asarray(1e-3)))
    assert got == pytest.approx(math.sqrt(1e-3 / (0.01 * 50.0)), rel=1e-6)


@pytest.mark.parametrize("kw, err", [
    (dict(kl_clip=0.0), ValueError),
    (dict(kl_clip=-1.0), ValueError),
    (dict(kl_clip=float("nan")), ValueError),
    (dict(kl_clip=float("inf")), ValueError),
    (dict(kl_clip=True), TypeError),
    (dict(kl_clip=(1e-3, 1e-3)), TypeError),
])
def test_bad_kl_clip(kw, err):
    g = np.ones((2, 2))
    with pytest.raises(err, match="kl_clip"):
        mc.kl_clip_scale(g, g, **kw)


def test_bad_shapes_and_lengths():
    g = np.ones((2, 2))
    with pytest.raises(ValueError, match="differ"):
        mc.kl_clip_scale(np.ones((2, 3)), g, kl_clip=1e-3)
    with pytest.raises(ValueError, match="2 preconditioned gradients but 1"):
        mc.kl_clip_scale([g, g], [g], kl_clip=1e-3)
    with pytest.raises(ValueError, match="learning rates"):
        mc.kl_clip_scale([g, g], [g, g], kl_clip=1e-3, lr=[0.1])
    with pytest.raises(ValueError, match="no gradients"):
        mc.kl_clip_scale([], [], kl_clip=1e-3)
    with pytest.raises(ValueError, match="0-d"):
        kl_clip_factor(np.ones(2), kl_clip=1e-3)
    # (None, None) pairs (a layer without bias) are left out
    assert float(mc.kl_clip_scale([g, None], [g, None], kl_clip=1.0)) == 0.5  # sqrt(1 / ⟨g, g⟩)
