"""Regression tests for core edge cases: overflow-free MAC scale, guarded π-damping, empty batches,
non-float dtypes and unusable damping values (each written from a reproducer that failed before)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import maccore as mc
from tests.conftest import asarray, assert_close, to_numpy, tol


def _mac_oracle(g, a, lam):
    """λ·G (aaᵀ + λI)⁻¹ in float64 (a may be huge): with a = c·s, Sherman–Morrison gives
    G − (G s) sᵀ / (λ/c² + sᵀs), evaluated without forming aᵀa."""
    a = np.asarray(a, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    c = np.abs(a).max()
    s = a / c
    return g - np.outer(g @ s, s) / (lam / c**2 + s @ s)


@pytest.mark.parametrize("size", [1e20, 3e19, 1e30, 1e37])
def test_mac_apply_large_activations_float32(xp, size):
    rng = np.random.default_rng(0)
    g_np = rng.standard_normal((4, 6))
    a_np = np.abs(rng.standard_normal(6)) * size
    a_np[-1] = 1.0  # the bias entry
    g, a = asarray(xp, g_np, xp.float32), asarray(xp, a_np, xp.float32)
    out = mc.mac_apply(g, a, 1.0)
    want = _mac_oracle(to_numpy(g), to_numpy(a), 1.0)
    rel = np.linalg.norm(to_numpy(out) - want) / np.linalg.norm(want)
    assert rel < 1e-4, rel  # was 0.38–0.55 off: âᵀâ overflowed and the raw gradient came back
    # the projection removed the component along â: (G â) ≈ λ/(λ + âᵀâ)·… ≈ 0 relative to ‖G‖‖â‖
    assert np.all(np.isfinite(to_numpy(out)))


@pytest.mark.parametrize("scale", ["reference", "inverse"])
@pytest.mark.parametrize("big", [0, 1])
def test_mac_apply_overflow_guard_per_head(xp, scale, big):
    """Per-head factors are rescaled each by its own c = max|â_h|: a head near the overflow limit
    next to an ordinary one leaves the ordinary head's λ + âᵀâ unscaled (divided by the large
    head's c², λ/c² and ‖â/c‖² would underflow to subnormals and 1/(…) overflow float32)."""
    rng = np.random.default_rng(4)
    g_np = rng.standard_normal((4, 3))  # two heads: rows 0–1 use mean[0], rows 2–3 mean[1]
    a_np = np.array([[1e-3, 2e-3, -1e-3], [1e-3, 2e-3, -1e-3]])
    a_np[big] = [1e19, -2e19, 3e19]
    lam = 1e-3
    g, a = asarray(xp, g_np, xp.float32), asarray(xp, a_np, xp.float32)
    out = mc.mac_apply(g, a, lam, scale=scale)
    gf, af = to_numpy(g), to_numpy(a)
    want = np.concatenate([_mac_oracle(gf[2 * h:2 * h + 2], af[h], lam) for h in (0, 1)])
    if scale == "inverse":
        want = want / lam
    t = tol(xp, xp.float32)
    assert_close(out, want, **t, scale=np.abs(gf).max() / (lam if scale == "inverse" else 1.0))


def test_mac_apply_normal_activations_bit_identical_to_unscaled_formula():
    """The overflow guard does not touch ordinary inputs (c = 1): same bits as the plain formula."""
    rng = np.random.default_rng(1)
    g = rng.standard_normal((5, 7)).astype(np.float32)
    a = (rng.standard_normal(7) * 3).astype(np.float32)
    inv = np.float32(1.0) / (np.float32(0.5) + np.sum(a * a, keepdims=True))
    from maccore import _delegate

    want, _ = _delegate.mac_rank1(np, g, None, a, inv.reshape(()), None)
    np.testing.assert_array_equal(mc.mac_apply(g, a, 0.5), want)


@pytest.mark.parametrize("ta,tg", [(1.0, 1e-45), (1.0, 1e-30), (1e30, 1e-30), (1e-30, 1e30),
                                   (1e-45, 1.0), (1.0, 1.0)])
def test_pi_dampings_extreme_trace_ratios(xp, ta, tg):
    for dtype in (xp.float32, xp.float64):
        A = asarray(xp, ta * np.eye(3), dtype)
        G = asarray(xp, tg * np.eye(2), dtype)
        lam = 1e-3
        la, lg = (float(v) for v in mc.pi_dampings(A, G, lam))
        tiny = float(xp.finfo(dtype).smallest_normal)
        assert math.isfinite(la) and math.isfinite(lg) and la >= tiny and lg >= tiny, (la, lg)
        assert la * lg == pytest.approx(lam, rel=1e-5)
        ta_d, tg_d = float(to_numpy(A)[0, 0]), float(to_numpy(G)[0, 0])
        want = math.sqrt(ta_d / tg_d) * math.sqrt(lam) if ta_d > 0 and tg_d > 0 else math.sqrt(lam)
        if min(ta_d, tg_d) < tiny:  # a subnormal trace (flushed to 0 by some backends): either
            assert la == pytest.approx(want, rel=1e-5) or la == pytest.approx(math.sqrt(lam))
        elif want >= tiny and lam / want >= tiny and want < float(xp.finfo(dtype).max):
            assert la == pytest.approx(want, rel=1e-5)  # the definition where it is representable
        else:
            assert la == pytest.approx(math.sqrt(lam), rel=1e-6)  # equal split fallback


@pytest.mark.parametrize("zero", ["A", "G", "both"])
def test_pi_dampings_zero_trace_falls_back_quietly(xp, zero):
    """A zero factor (a layer whose inputs or output gradients are all 0, e.g. dead ReLUs) has no
    trace ratio: the split is the equal one, λ_A = λ_G = √λ, without the backend warning about
    log(0) or a division by zero along the way."""
    import warnings

    lam = 1e-2
    for dtype in (xp.float32, xp.float64):
        A = asarray(xp, (0.0 if zero in ("A", "both") else 2.0) * np.eye(3), dtype)
        G = asarray(xp, (0.0 if zero in ("G", "both") else 0.5) * np.eye(2), dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            la, lg = mc.pi_dampings(A, G, lam)
        want = math.sqrt(lam)
        assert float(la) == pytest.approx(want, rel=1e-6) and float(lg) == pytest.approx(want, rel=1e-6)


def test_kfac_pi_mode_tiny_gradients_trains():
    """loss × 1e-20: the π split must not blame a damping the user never set."""
    rng = np.random.default_rng(2)
    rows = mc.linear_rows(rng.standard_normal((16, 3)).astype(np.float32), bias=True)
    grows = (rng.standard_normal((16, 2)) * 1e-24).astype(np.float32)
    pc = mc.kfac(mode="pi", damping=1e-3)
    st = pc.refresh(pc.update(pc.init(4, 2, xp=np), rows, grows, reduction_factor=1.0))
    out = pc.apply(st, (rng.standard_normal((2, 4)) * 1e-20).astype(np.float32))
    assert np.all(np.isfinite(out))


def test_empty_batches_raise(xp):
    z = lambda *s: asarray(xp, np.zeros(s))  # noqa: E731
    with pytest.raises(ValueError, match="gradient_diagonal: 'grad_rows' has no rows"):
        mc.gradient_diagonal(z(0, 3))
    with pytest.raises(ValueError, match="conv2d_mean_patch: 'x' of shape \\[0, 2, 5, 5\\] has no samples"):
        mc.conv2d_mean_patch(z(0, 2, 5, 5), 3, bias=True)
    with pytest.raises(ValueError, match="attention_weighted_mean: 'x' of shape \\[0, 3, 4\\] is empty"):
        mc.attention_weighted_mean(z(0, 3, 4), z(0, 1, 3, 3), bias=True)
    with pytest.raises(ValueError, match="attention_probs: 'k' .* has no keys"):
        mc.attention_probs(z(1, 1, 2, 4), z(1, 1, 0, 4))
    with pytest.raises(ValueError, match="conv2d_grad_rows: 'g' of shape \\[0, 3, 2, 2\\] has no samples"):
        mc.conv2d_grad_rows(z(0, 3, 2, 2))
    with pytest.raises(ValueError, match="mean_activation: 'rows' has no rows"):
        mc.mean_activation(z(0, 3))


def test_integer_input_with_reduce(xp):
    x = xp.reshape(xp.arange(24), (2, 3, 4))
    rows = mc.linear_rows(x, bias=True, reduce=True)
    want = np.concatenate([np.arange(24).reshape(2, 3, 4).mean(1), np.ones((2, 1))], axis=1)
    assert_close(rows, want, rtol=1e-6, atol=1e-6)
    assert_close(mc.grad_rows(x, reduce=True), np.arange(24).reshape(2, 3, 4).sum(1), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["bool", "int", "complex"])
def test_split_functions_reject_non_float(xp, kind):
    if kind == "complex" and not hasattr(xp, "complex64"):
        pytest.skip("no complex dtype")
    if kind == "bool":
        arr = xp.ones((2, 6), dtype=xp.bool)
    elif kind == "int":
        arr = xp.ones((2, 6), dtype=xp.int32)
    else:
        arr = xp.ones((2, 6), dtype=xp.complex64)
    with pytest.raises(TypeError, match="split_grad_matrix: argument 'mat' must have a real floating"):
        mc.split_grad_matrix(arr, (2, 6), bias=False)
    with pytest.raises(TypeError, match="split_qkv: argument 'out' must have a real floating"):
        mc.split_qkv(xp.reshape(arr, (1, 2, 6)), 1)


@pytest.mark.parametrize("bad,err,match", [
    (Fraction(1, 2), TypeError, "must be a float or int, got Fraction"),
    (10**400, ValueError, "not representable as a float"),
    (1e-46, ValueError, "below the smallest normal float32"),
])
def test_unusable_dampings(bad, err, match):
    g = np.ones((2, 3), np.float32)
    a = np.ones(3, np.float32)
    with pytest.raises(err, match=match):
        mc.mac_apply(g, a, bad)
    with pytest.raises(err, match=match):
        mc.kfac_apply(g, np.eye(3, dtype=np.float32), np.eye(2, dtype=np.float32), bad)
    with pytest.raises(err, match=match):
        mc.damped_inverse(np.eye(3, dtype=np.float32), bad)


def test_tiny_damping_fine_in_float64():
    g = np.ones((2, 3))
    out = mc.mac_apply(g, np.ones(3), 1e-46)
    assert np.all(np.isfinite(out))


def test_mac_apply_overflow_guard_keeps_the_damping_exact():
    """With â near the overflow limit and λ near the dtype's maximum, λ/c² is not negligible next to
    ‖â/c‖²: the rescaled form must keep λ's exact weight (λ/c², not λ/c)."""
    lim = math.sqrt(np.finfo(np.float64).max / 2) / 4
    a = np.array([1.5 * lim, 1.2 * lim])
    lam = 1e308
    g = np.random.default_rng(3).standard_normal((3, 2))
    out = mc.mac_apply(g, a, lam)
    np.testing.assert_allclose(out, _mac_oracle(g, a, lam), rtol=1e-12, atol=1e-12)
    assert not np.allclose(out, g, rtol=1e-3)  # the projection is not negligible here
