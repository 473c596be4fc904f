"""Backend / dtype fixtures, eps-derived tolerances and hypothesis profiles.

Backends come from ``MACCORE_TEST_BACKENDS`` (comma separated; default: all of
numpy, array_api_strict, torch, jax.numpy, cupy). A backend that is not installed, or cupy without a
GPU, is skipped with a reason; an unknown name is an error.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "jax.numpy", "cupy")

settings.register_profile(
    "ci",
    max_examples=12,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _selected_backends():
    raw = os.environ.get("MACCORE_TEST_BACKENDS")
    names = ALL_BACKENDS if not raw else tuple(n.strip() for n in raw.split(",") if n.strip())
    unknown = [n for n in names if n not in ALL_BACKENDS]
    if unknown:
        raise pytest.UsageError(f"MACCORE_TEST_BACKENDS: unknown backends {unknown}; know {ALL_BACKENDS}")
    return names


def cupy_or_skip():
    """The ``cupy`` module, or skip the test: CuPy not installed or no usable CUDA device."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("cupy: no CUDA device")
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"cupy: no usable CUDA device ({exc})")
    return cupy


def load_backend(name: str):
    """Return the array_api_compat-wrapped namespace of backend ``name`` or skip."""
    import array_api_compat

    if name == "numpy":
        return array_api_compat.array_namespace(np.empty(0))
    if name == "array_api_strict":
        strict = pytest.importorskip("array_api_strict")
        return strict
    if name == "torch":
        torch = pytest.importorskip("torch")
        return array_api_compat.array_namespace(torch.empty(0))
    if name == "jax.numpy":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return array_api_compat.array_namespace(jnp.empty(0))
    if name == "cupy":
        return array_api_compat.array_namespace(cupy_or_skip().empty(0))
    raise AssertionError(name)


@pytest.fixture
def one_torch_thread():
    """Tiny kernels: one torch thread is fastest and robust to a busy host (restored afterwards).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=_selected_backends())
def xp(request):
    return load_backend(request.param)


@pytest.fixture(params=["float32", "float64"])
def dtype(request, xp):
    return getattr(xp, request.param)


# ---------------------------------------------------------------------------------------------
# Tolerances: the one place that says how close is close.
#
# ``assert_close(actual, desired, rtol=, atol=, scale=)`` checks every entry on its own:
#
#     |actual − desired| ≤ rtol · |desired| + atol · scale
#
# - ``rtol`` is relative PER ENTRY: a small entry is held to the same relative accuracy as a large
#   one (the old check multiplied ``atol`` by max|desired|, so entries below ≈ 1e-3 of the largest
#   one went unchecked in float32).
# - ``atol · scale`` is a floor for entries that cancel to (nearly) zero, where no relative accuracy
#   exists. ``scale`` is the problem's scale: by default the largest |desired| entry (1 when all
#   are 0); a test whose result is much smaller than the data it is computed from passes that
#   data's scale explicitly.
# - ``tol(xp, dtype, factor)`` derives both from the dtype's machine epsilon ε:
#   rtol = factor · (4·√ε for float32 and lower, 1e3·ε for float64): the accumulated rounding of
#   the short reductions and small inverses of these tests, with headroom;
#   atol = factor · 64·ε: the floor, a few ulps of the scale per accumulated operation.
#   ``factor`` widens both for longer computations (a few solves, EMA chains), never per entry.
# - Below that, the smallest normal number of ``actual``'s dtype: backends may flush subnormal
#   results to zero (XLA does), so differences below it are not errors.


def tol(xp, dtype, factor: float = 1.0) -> dict:
    """``rtol`` (per entry) and ``atol`` (floor, relative to the problem's scale) for ``dtype``;
    see the comment above."""
    eps = float(xp.finfo(dtype).eps)
    r = factor * (1e3 * eps if eps < 1e-10 else 4 * eps**0.5)
    return {"rtol": r, "atol": factor * 64 * eps}


def to_numpy(x) -> np.ndarray:
    """Any backend array to a float64 numpy array (via DLPack-free paths)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        return x.detach().cpu().to(dtype=__import__("torch").float64).numpy()
    if mod.startswith("cupy"):
        return x.get().astype(np.float64)
    if "array_api_strict" in mod:
        return np.asarray(x._array, dtype=np.float64)
    return np.asarray(x, dtype=np.float64)


def asarray(xp, a, dtype=None):
    """numpy data → backend array; floating data gets ``dtype`` (default float64)."""
    a = np.asarray(a)
    if a.dtype.kind == "f":
        return xp.asarray(a.astype(np.float64), dtype=xp.float64 if dtype is None else dtype)
    return xp.asarray(a)


def _smallest_normal(x) -> float:
    try:
        import array_api_compat

        return float(array_api_compat.array_namespace(x).finfo(x.dtype).smallest_normal)
    except Exception:  # a Python or NumPy scalar, an integer array
        return float(np.finfo(np.float64).smallest_normal)


def assert_close(actual, desired, *, rtol, atol, scale=None, err_msg=""):
    """Entrywise ``|actual − desired| ≤ rtol·|desired| + max(atol·scale, smallest normal)`` after
    conversion to float64 NumPy (see "Tolerances" above); ``scale`` defaults to max|desired| (1
    when that is 0)."""
    tiny = _smallest_normal(actual)
    a = to_numpy(actual)
    d = to_numpy(desired) if not isinstance(desired, np.ndarray) else np.asarray(desired, dtype=np.float64)
    assert a.shape == d.shape, f"shape {a.shape} != {d.shape} {err_msg}"
    if scale is None:
        big = float(np.max(np.abs(d))) if d.size else 0.0
        scale = big if big > 0 and np.isfinite(big) else 1.0
    np.testing.assert_allclose(a, d, rtol=rtol, atol=max(atol * scale, tiny), err_msg=err_msg)


# The fuzz suite's outcome table, summed over pytest-xdist workers (tests/_fuzz_report.py).
from tests._fuzz_report import pytest_sessionfinish, pytest_terminal_summary  # noqa: E402,F401

try:
    import xdist  # noqa: F401,E402
except ImportError:  # the worker hook exists only with pytest-xdist
    pass
else:
    from tests._fuzz_report import pytest_testnodedown  # noqa: E402,F401
