"""Shared helpers for the core tests: backend identity checks, data, oracle glue."""

from __future__ import annotations

import functools
import hashlib
import inspect

import array_api_compat as compat
import numpy as np
from hypothesis import strategies as st

from tests.conftest import asarray, to_numpy

seeds = st.integers(min_value=0, max_value=2**32 - 1)


def backend_name(xp) -> str:
    return xp.__name__.replace("array_api_compat.", "")


def is_jax(xp) -> bool:
    return "jax" in xp.__name__


def stats_dtype_of(xp, dtype):
    return xp.float64 if dtype == xp.float64 else xp.float32


def assert_like(out, like, *, dtype=None):
    """``out`` has the namespace and device of ``like`` and the given dtype (default: like's)."""
    assert compat.array_namespace(out) is compat.array_namespace(like), (
        f"namespace {compat.array_namespace(out).__name__} != {compat.array_namespace(like).__name__}"
    )
    want = like.dtype if dtype is None else dtype
    assert out.dtype == want, f"dtype {out.dtype} != {want}"
    assert compat.device(out) == compat.device(like), f"device {compat.device(out)} != {compat.device(like)}"


def rand(xp, dtype, rng, *shape, scale=1.0, shift=0.0):
    """Gaussian data made in float64 numpy, moved to the backend as ``dtype``; returns (np, xp)."""
    a = shift + scale * rng.standard_normal(shape)
    if dtype is not None:
        # round-trip through the target dtype so the float64 oracle sees exactly the same numbers
        a = to_numpy(asarray(xp, a, dtype))
    return a, asarray(xp, a, dtype)


def rel_err(a, b) -> float:
    a, b = to_numpy(a) if not isinstance(a, np.ndarray) else a, to_numpy(b) if not isinstance(b, np.ndarray) else b
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def kron_inv_apply(M, grad):
    """vec_r⁻¹[M⁻¹ vec_r(grad)] in float64 numpy (dense reference)."""
    g = np.asarray(grad, dtype=np.float64)
    return np.linalg.solve(M, g.reshape(-1)).reshape(g.shape)


def spd(rng, d, *, rank=None, scale=1.0):
    """A random symmetric PSD matrix (rank-deficient when ``rank < d``)."""
    r = d if rank is None else rank
    b = rng.standard_normal((d, r))
    return scale * (b @ b.T) / max(r, 1)


def examples_for(xp, div: int = 1) -> int:
    """Example budget of a backend: the active profile's count (divided by ``div`` for slow tests);
    jax.numpy compiles every eager op once per shape, so it gets a quarter of that."""
    from hypothesis import settings

    n = settings.default.max_examples // div
    if is_jax(xp):
        n //= 4
    return max(2, n)


def _seed_of(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def run_given(xp, f, *, name: str, div: int = 1, **strategies) -> None:
    """Run ``f(**drawn)`` under ``@given(**strategies)`` with the per-backend example budget
    (:func:`examples_for`). ``name`` identifies the test: under a derandomised profile (CI) it
    seeds the examples through the public ``hypothesis.seed``, so tests sharing one wrapper still
    draw their own examples."""
    from hypothesis import given, seed, settings

    test = settings(max_examples=examples_for(xp, div))(given(**strategies)(f))
    if settings.default.derandomize:
        test = seed(_seed_of(name))(test)
    test()


def xgiven(_div: int = 1, **strategies):
    """``@given(**strategies)`` for pytest tests that take the ``xp`` fixture (and any other
    fixtures or parameters), with the per-backend example budget of :func:`run_given`.

    The decorated function ``f(xp, ..., **drawn)`` is run by Hypothesis inside the test; pytest
    sees the signature of ``f`` without the drawn arguments.
    """

    def deco(f):
        sig = inspect.signature(f)
        name = f"{f.__module__}.{f.__qualname__}"

        @functools.wraps(f)
        def test(**kwargs):
            def inner(**drawn):
                f(**kwargs, **drawn)

            inner.__name__ = inner.__qualname__ = f.__name__
            run_given(kwargs["xp"], inner, name=name, div=_div, **strategies)

        test.__signature__ = sig.replace(
            parameters=[p for n, p in sig.parameters.items() if n not in strategies])
        del test.__wrapped__  # pytest reads the signature above, not f's
        return test

    return deco
