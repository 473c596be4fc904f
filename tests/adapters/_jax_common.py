"""Shared fixtures of the JAX adapter tests: import path, small Flax models, float32 data.

Every array is created with an explicit dtype so results do not depend on ``jax_enable_x64`` (which the
core tests switch on in the same process).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")
pytest.importorskip("flax")

try:
    import maccore_jax  # noqa: F401
except ImportError:  # not installed (editable install exposes it); use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "adapters"))
    import maccore_jax  # noqa: F401

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
ADAPTERS = str(Path(__file__).resolve().parents[2] / "adapters")
ROOT = str(Path(__file__).resolve().parents[2])


def normal(seed: int, shape, scale: float = 1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype=F32)


class MLP(nn.Module):
    """Dense(6) → tanh → Dense(5) → relu → Dense(3, no bias)."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(6, param_dtype=F32)(x))
        x = nn.relu(nn.Dense(5, param_dtype=F32)(x))
        return nn.Dense(3, use_bias=False, param_dtype=F32)(x)


class CNN(nn.Module):
    """Conv 3×3 stride 1 pad 1 → relu → Conv 3×3 stride 2 pad 1 → relu → mean pool → Dense(3)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), param_dtype=F32)(x))
        x = nn.relu(nn.Conv(5, (3, 3), strides=2, padding=((1, 1), (1, 1)), param_dtype=F32)(x))
        return nn.Dense(3, param_dtype=F32)(x.mean(axis=(1, 2)))


def to_np(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def tree_allclose(a, b, rtol=1e-5, atol=1e-6):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, f"tree structures differ: {ta} vs {tb}"
    for x, y in zip(la, lb):
        np.testing.assert_allclose(to_np(x), to_np(y), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def x64_module():
    """``jax_enable_x64`` on for a test module (float64 oracles), restored afterwards; a module
    makes it autouse with ``pytestmark = pytest.mark.usefixtures("x64_module")`` after importing
    it."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)
