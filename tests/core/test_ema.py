"""The EMA primitive (docs/math.md, M-P5, M-P6, T9)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

from maccore import ema_debiased, ema_init, ema_update
from maccore.ema import EmaState, ema_weight
from tests.conftest import asarray, assert_close, to_numpy, tol
from tests.core.helpers import assert_like, is_jax, rand, seeds, xgiven

decays = st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.95, 0.99, 0.999])


def _reference(xs, decay):
    """float64 loop: raw EMA and explicit weights w_i = (1−β)β^{k−i}/(1−β^k) (M-P6)."""
    v = np.zeros_like(xs[0])
    for x in xs:
        v = decay * v + (1 - decay) * x
    k = len(xs)
    w = np.array([(1 - decay) * decay ** (k - i) for i in range(1, k + 1)]) / (1 - decay**k)
    return v, np.tensordot(w, np.stack(xs), axes=1), w


def test_init(xp, dtype):
    s = ema_init((3, 2), xp=xp, dtype=dtype)
    assert isinstance(s, EmaState)
    assert s.value.shape == (3, 2) and s.value.dtype == dtype
    assert s.count.dtype == xp.int32 and int(s.count) == 0
    assert np.all(to_numpy(s.value) == 0)
    # count == 0: the debiased value is zero, not NaN
    d = ema_debiased(s, decay=0.9)
    assert_like(d, s.value)
    assert np.all(to_numpy(d) == 0)
    assert ema_init((2,), xp=xp).value.dtype == xp.float32


@xgiven(seed=seeds, decay=decays, k=st.integers(1, 12), d=st.integers(1, 5))
def test_update_matches_formula(xp, dtype, seed, decay, k, d):
    rng = np.random.default_rng(seed)
    xs_np, xs = zip(*(rand(xp, dtype, rng, d) for _ in range(k)))
    s = ema_init((d,), xp=xp, dtype=dtype)
    for x in xs:
        s = ema_update(s, x, decay=decay)
    raw, deb, w = _reference(list(xs_np), decay)
    assert abs(w.sum() - 1) < 1e-12
    assert int(s.count) == k
    assert_like(s.value, xs[0])
    t = tol(xp, dtype)
    assert_close(s.value, raw, **t)
    out = ema_debiased(s, decay=decay)
    assert_like(out, xs[0])
    assert_close(out, deb, **t)
    assert_close(ema_weight(s, decay=decay), np.asarray(1 - decay**k), **t)


@xgiven(seed=seeds, k=st.integers(10, 30))
def test_constant_statistic_and_exact_one(xp, dtype, seed, k):
    """M-P6: constant per-batch statistic ⇒ debiased = that constant; an entry that is exactly 1
    in every update debiases to exactly 1 (M-P5, the bias entry of ā), for every decay and count."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal(3)
    x = asarray(xp, np.concatenate([c, [1.0]]), dtype)
    for decay in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 0.999):
        s = ema_init((4,), xp=xp, dtype=dtype)
        for _ in range(k):
            s = ema_update(s, x, decay=decay)
            d = to_numpy(ema_debiased(s, decay=decay))
            assert d[3] == 1.0, f"bias entry {d[3]!r} != 1 after {int(s.count)} updates (decay {decay})"
            assert_close(d[:3], to_numpy(x)[:3], **tol(xp, dtype))


def test_handbuilt_state_without_weight(xp, dtype):
    """A state without ``weight`` falls back to 1 − β^count."""
    v = asarray(xp, np.array([0.19, 0.38]), dtype)
    s = EmaState(count=xp.asarray(2, dtype=xp.int32), value=v)
    assert_close(ema_debiased(s, decay=0.9), np.array([1.0, 2.0]), **tol(xp, dtype))


def test_dtype_kept_and_no_mutation(xp, dtype):
    """Statistics keep the state's dtype; inputs are not mutated."""
    s = ema_init((3,), xp=xp, dtype=xp.float32)
    x_np = np.array([1.0, 2.0, 3.0])
    x = asarray(xp, x_np, dtype)
    s2 = ema_update(s, x, decay=0.5)
    assert s2.value.dtype == xp.float32
    assert np.all(to_numpy(s.value) == 0) and int(s.count) == 0
    assert np.all(to_numpy(x) == x_np)


def test_shape_mismatch(xp):
    s = ema_init((3,), xp=xp)
    with pytest.raises(ValueError, match=r"statistic of shape \[4\].*running average of shape \[3\]"):
        ema_update(s, xp.ones((4,), dtype=xp.float32), decay=0.9)


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_jit_equals_eager(dt):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    dtype = getattr(jnp, dt)
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(np.concatenate([rng.standard_normal(4), [1.0]]), dtype=dtype) for _ in range(6)]

    def step(s, x):
        s = ema_update(s, x, decay=0.9)
        return s, ema_debiased(s, decay=0.9)

    jstep = jax.jit(step)
    se = sj = ema_init((5,), xp=jnp, dtype=dtype)
    for x in xs:
        se, de = step(se, x)
        sj, dj = jstep(sj, x)
        assert dj.dtype == dtype and int(sj.count) == int(se.count)
        assert_close(dj, to_numpy(de), **tol(jnp, dtype))
        assert float(dj[-1]) == 1.0
    assert is_jax(jnp)
