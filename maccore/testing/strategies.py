"""Hypothesis strategies for property-testing curvature code (public; NumPy float64 data).

Each function returns a :mod:`hypothesis` strategy built from public Hypothesis API only.
``hypothesis`` is imported when a strategy is built, so ``import maccore.testing`` (and this
module) works without it. Array data are drawn as a seed and generated with NumPy, which keeps
examples fast and shrinkable.

- :func:`dampings`: log-uniform dampings over ``[1e-6, 1e2]``.
- :func:`linear_layers` / :func:`conv_geometries`: layer shapes (conv: kernel, stride, padding,
  dilation, groups, input size — always a non-empty output).
- :func:`batches`: a loss setting with its reduction factor ``R`` (``R ≠ 1`` by default, so
  forgetting ``R`` is visible) and a batch of inputs / autograd-style output gradients.
- :func:`activations`: layer inputs whose second moment ``E[x̃x̃ᵀ]`` has a prescribed
  condition number (up to ``1e8`` by default) and a large mean, the hard case for inverses.
- :func:`spd_matrices`: symmetric positive semi-definite matrices with a log-uniform spectrum.
- :func:`mlp_cases`: :class:`maccore.testing.MLPCase` instances in the exactness settings.

Example (a property test of the stable dense inverse):

>>> import numpy as np
>>> from hypothesis import given, settings
>>> from maccore import testing
>>> from maccore.testing import strategies as mst
>>> @settings(max_examples=5, deadline=None, database=None)
... @given(M=mst.spd_matrices(max_size=4), lam=mst.dampings())
... def test_inverse(M, lam):
...     X = testing.dense_damped_inverse(M, lam)
...     I = np.eye(len(M))
...     residual = np.linalg.norm(X @ (M + lam * I) - I)
...     assert residual <= np.linalg.norm(M + lam * I) * np.linalg.norm(X) * 1e-12
>>> test_inverse()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LinearLayer",
    "ConvGeometry",
    "Batch",
    "dampings",
    "linear_layers",
    "conv_geometries",
    "batches",
    "activations",
    "spd_matrices",
    "mlp_cases",
]


def _st():
    try:
        from hypothesis import strategies as st
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "maccore.testing.strategies needs hypothesis: pip install hypothesis "
            "(or maccore[test])"
        ) from exc
    return st


def _np():
    import numpy as np

    return np


def _rngs():
    st = _st()
    np = _np()
    return st.integers(0, 2**32 - 1).map(np.random.default_rng)


@dataclass(frozen=True)
class LinearLayer:
    """A linear layer's shape: ``d_in``, ``d_out``, whether it has a bias; ``d_tilde`` = d̃."""

    d_in: int
    d_out: int
    bias: bool

    @property
    def d_tilde(self) -> int:
        return self.d_in + (1 if self.bias else 0)


@dataclass(frozen=True)
class ConvGeometry:
    """A Conv2d geometry (NCHW) with a non-empty output; ``padding`` is symmetric per dimension."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    height: int
    width: int
    bias: bool

    @property
    def output_size(self) -> tuple[int, int]:
        """``(OH, OW)``."""
        out = []
        for n, k, s, p, d in zip((self.height, self.width), self.kernel_size, self.stride,
                                 self.padding, self.dilation):
            out.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
        return out[0], out[1]

    @property
    def d_tilde(self) -> int:
        """Row length ``C_in/groups · kh · kw`` (+1 with bias)."""
        kh, kw = self.kernel_size
        return self.in_channels // self.groups * kh * kw + (1 if self.bias else 0)


@dataclass(frozen=True)
class Batch:
    """A batch for a linear layer: inputs ``x [N, S, d_in]``, autograd-style output gradients
    ``g [N, S, d_out]`` of ``L = R·Σ terms`` and the loss setting they came from."""

    x: Any
    grads: Any
    loss: str
    reduction: str
    reduction_factor: float


def dampings(min_value: float = 1e-6, max_value: float = 1e2):
    """Log-uniform dampings in ``[min_value, max_value]`` (default ``1e-6 … 1e2``), both ends
    included as explicit examples."""
    st = _st()
    if not 0 < min_value <= max_value:
        raise ValueError(f"need 0 < min_value <= max_value, got {min_value}, {max_value}")
    lo, hi = math.log10(min_value), math.log10(max_value)
    inner = st.floats(lo, hi, allow_nan=False, allow_infinity=False).map(lambda e: float(10.0**e))
    return st.one_of(st.sampled_from([float(min_value), float(max_value)]), inner)


def linear_layers(*, max_in: int = 8, max_out: int = 6, bias: bool | None = None):
    """:class:`LinearLayer` shapes (``1 ≤ d_in ≤ max_in``, ``1 ≤ d_out ≤ max_out``; ``bias``
    drawn unless fixed)."""
    st = _st()
    b = st.booleans() if bias is None else st.just(bool(bias))
    return st.builds(LinearLayer, st.integers(1, max_in), st.integers(1, max_out), b)


def conv_geometries(*, max_channels: int = 4, max_kernel: int = 3, max_size: int = 7,
                    groups: bool = True):
    """:class:`ConvGeometry` instances: kernels up to ``max_kernel``, strides 1–2, padding
    0–2, dilation 1–2, groups dividing both channel counts (``groups=False``: always 1), and
    input sizes up to ``max_size`` with a non-empty output."""
    st = _st()

    @st.composite
    def draw_geometry(draw):
        g = draw(st.integers(1, 2)) if groups else 1
        cin = g * draw(st.integers(1, max(1, max_channels // g)))
        cout = g * draw(st.integers(1, max(1, max_channels // g)))
        k = (draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel)))
        s = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        p = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        need = [max(1, dd * (kk - 1) + 1 - 2 * pp) for kk, pp, dd in zip(k, p, d)]
        h = draw(st.integers(need[0], max(need[0], max_size)))
        w = draw(st.integers(need[1], max(need[1], max_size)))
        return ConvGeometry(cin, cout, k, s, p, d, g, h, w, draw(st.booleans()))

    return draw_geometry()


def _reduction_factor(loss: str, reduction: str, terms: int, c: int) -> float:
    if loss == "mse":
        return 2.0 if reduction == "sum" else 2.0 / (terms * c)
    if loss == "ce":
        return 1.0 if reduction == "sum" else 1.0 / terms
    return 1.0 if reduction == "sum" else 1.0 / (terms * c)


def batches(layer: LinearLayer | None = None, *, max_n: int = 6, max_s: int = 3,
            unit_reduction: bool = False):
    """:class:`Batch` for ``layer`` (drawn when ``None``): ``N ≥ 2`` samples of ``S`` tokens, a
    loss (``mse`` / ``ce`` / ``bce``, sum or mean) with its reduction factor ``R``, standard-normal
    inputs and output gradients scaled like autograd's (``R·ĝ``).

    With ``unit_reduction=False`` (default) settings with ``R = 1`` are excluded: they hide a
    missing ``1/R`` (the classic bug); ``R`` then ranges over ``2`` and ``1/(N·S·…)``.
    """
    st = _st()
    np = _np()
    layers = linear_layers() if layer is None else st.just(layer)

    @st.composite
    def draw_batch(draw):
        lay = draw(layers)
        n = draw(st.integers(2, max(2, max_n)))
        s = draw(st.integers(1, max(1, max_s)))
        loss = draw(st.sampled_from(("mse", "ce", "bce")))
        reduction = draw(st.sampled_from(("sum", "mean")))
        R = _reduction_factor(loss, reduction, n * s, lay.d_out)
        if not unit_reduction and R == 1.0:
            reduction = "mean"
            R = _reduction_factor(loss, reduction, n * s, lay.d_out)
        rng = draw(_rngs())
        x = rng.standard_normal((n, s, lay.d_in))
        g = R * rng.standard_normal((n, s, lay.d_out))
        return Batch(x, g, loss, reduction, float(R))

    del np
    return draw_batch()


def activations(*, rows: int | None = None, d: int | None = None, max_cond: float = 1e8,
                mean_scale: tuple[float, float] = (1.0, 1e3)):
    """Layer inputs ``x [rows, d]`` whose second moment ``E[xxᵀ]`` is ill-conditioned: singular
    values log-spaced from 1 down to ``1/√cond`` (``cond`` drawn log-uniformly up to
    ``max_cond``) plus a common mean offset of norm in ``mean_scale`` — as after a ReLU, where
    the mean direction dominates ``A`` (the MAC premise)."""
    st = _st()
    np = _np()

    @st.composite
    def draw_acts(draw):
        dd = d if d is not None else draw(st.integers(2, 8))
        r = rows if rows is not None else draw(st.integers(dd + 1, 4 * dd + 4))
        log_c = draw(st.floats(0.0, math.log10(max_cond)))
        m_scale = draw(st.floats(*mean_scale))
        rng = draw(_rngs())
        q, _ = np.linalg.qr(rng.standard_normal((dd, dd)))
        sv = np.logspace(0.0, -log_c / 2, dd)
        z = rng.standard_normal((r, dd))
        z = (z - z.mean(axis=0)) / np.maximum(z.std(axis=0), 1e-12)
        x = (z * sv) @ q.T
        mean = rng.standard_normal(dd)
        return x + m_scale * mean / np.linalg.norm(mean)

    return draw_acts()


def spd_matrices(*, min_size: int = 1, max_size: int = 6, max_cond: float = 1e12,
                 scale: tuple[float, float] = (1e-3, 1e3)):
    """Symmetric PSD matrices ``Q diag(w) Qᵀ`` with ``w`` log-uniform over a range of ratio up to
    ``max_cond`` (and exact zeros now and then: singular factors, e.g. dead units)."""
    st = _st()
    np = _np()

    @st.composite
    def draw_spd(draw):
        n = draw(st.integers(min_size, max_size))
        top = draw(st.floats(math.log10(scale[0]), math.log10(scale[1])))
        span = draw(st.floats(0.0, math.log10(max_cond)))
        singular = draw(st.booleans()) and n > 1
        rng = draw(_rngs())
        w = 10.0 ** (top - span * rng.random(n))
        if singular:
            w[0] = 0.0
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        M = (q * w) @ q.T
        return (M + M.T) / 2

    return draw_spd()


def mlp_cases(*, setting: str | None = None, loss: str | None = None, max_layers: int = 3):
    """:class:`maccore.testing.MLPCase` in the cases where KFAC is exact (``docs/math.md``,
    P-K1 … P-K4): deep linear networks with MSE in the expand or reduce setting (``N ≥ 2``, so
    ``R ≠ 1`` for mean losses), or one datum through a tanh / sigmoid / ReLU network with MSE, CE
    or BCE. ``setting`` / ``loss`` fix the corresponding choice."""
    st = _st()
    np = _np()
    from maccore.testing._oracles import MLPCase

    @st.composite
    def draw_case(draw):
        kind = draw(st.sampled_from(("deep_linear", "single_datum")))
        lo = loss or ("mse" if kind == "deep_linear" else draw(st.sampled_from(("mse", "ce", "bce"))))
        if kind == "deep_linear" and lo != "mse":
            kind = "single_datum"
        sett = setting or draw(st.sampled_from(("expand", "reduce")))
        n_layers = draw(st.integers(1, max_layers))
        widths = [draw(st.integers(1, 5)) for _ in range(n_layers + 1)]
        widths[-1] = max(widths[-1], 2)
        rng = draw(_rngs())
        ws = [rng.standard_normal((widths[i + 1], widths[i])) / math.sqrt(widths[i]) for i in range(n_layers)]
        bs = [rng.standard_normal(widths[i + 1]) if draw(st.booleans()) else None for i in range(n_layers)]
        n = 1 if kind == "single_datum" else draw(st.integers(2, 4))
        s = 1 if kind == "single_datum" else draw(st.integers(1, 3))
        x = rng.standard_normal((n, s, widths[0]))
        c = widths[-1]
        t = s if sett == "expand" else 1
        if lo == "mse":
            y = rng.standard_normal((n, t, c))
        else:
            y = np.zeros((n, t, c))
            y[..., int(rng.integers(c))] = 1.0
        act = "identity" if kind == "deep_linear" else draw(st.sampled_from(("tanh", "sigmoid", "relu")))
        return MLPCase(ws, bs, x, y, loss=lo, reduction=draw(st.sampled_from(("sum", "mean"))),
                       activation=act, setting=sett,
                       pool=draw(st.sampled_from(("sum", "mean"))))

    return draw_case()
