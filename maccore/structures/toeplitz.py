"""Triangular Toeplitz structures (docs/math.md ``triltoeplitz`` / ``triutoeplitz``).

Both store ``δ = (δ_0, …, δ_{d-1})`` (``d`` parameters): the lower one has ``K[i, j] = δ_{i-j}``
(``i ≥ j``; first column ``δ``), the upper one ``K[i, j] = δ_{j-i}`` (``j ≥ i``; first row ``δ``).
``Π(S)``: ``δ_0 = mean(diag₀ S)``, ``δ_k = (Σ k-th sub-diagonal + Σ k-th super-diagonal) / (d - k)``.

Products with a triangular Toeplitz matrix are (anti-)causal convolutions; for ``d ≥ FFT_MIN_DIM``
they are computed with the array-API ``fft`` extension in ``O(n d log d)`` (float32 at least), below
that (or when a namespace has no ``fft``) with a transient dense ``d × d`` Toeplitz matrix.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat as compat

from maccore.structures._base import (
    Array,
    Namespace,
    StructureOps,
    acc_dtype,
    as_columns,
    cast_scalar,
    check_dim_arg,
    check_square,
    default_dtype,
    inner_columns,
    promote,
    resolve_xp,
    superdiag_sums,
)

__all__ = ["FFT_MIN_DIM", "TrilToeplitz", "TriuToeplitz"]

#: dimension from which Toeplitz products use the FFT (module attribute; tests lower it)
FFT_MIN_DIM = 64


def _use_fft(xp: Namespace, d: int) -> bool:
    return d >= FFT_MIN_DIM and hasattr(xp, "fft")


def _tril_dense(xp: Namespace, delta: Array) -> Array:
    """Dense lower-triangular Toeplitz matrix with first column ``delta``."""
    d = int(delta.shape[0])
    dev = compat.device(delta)
    r = xp.arange(d, device=dev)
    idx = r[:, None] - r[None, :]
    safe = xp.where(idx >= 0, idx, xp.zeros_like(idx))
    vals = xp.reshape(xp.take(delta, xp.reshape(safe, (-1,)), axis=0), (d, d))
    return xp.where(idx >= 0, vals, xp.zeros_like(vals))


def _fft_cast(xp: Namespace, x: Array) -> Array:
    dt = acc_dtype(xp, x.dtype)
    return x if x.dtype == dt else xp.astype(x, dt)


def tril_matmul(xp: Namespace, delta: Array, X: Array) -> Array:
    """``T(δ) @ X`` for ``X [d, n]``: ``out[i] = Σ_{j ≤ i} δ_{i-j} X[j]`` (causal convolution)."""
    d = int(delta.shape[0])
    if _use_fft(xp, d):
        n = 2 * d
        Fd = xp.fft.rfft(_fft_cast(xp, delta), n=n, axis=0)
        FX = xp.fft.rfft(_fft_cast(xp, X), n=n, axis=0)
        out = xp.fft.irfft(Fd[:, None] * FX, n=n, axis=0)[:d, ...]
        return xp.astype(out, X.dtype) if out.dtype != X.dtype else out
    return _tril_dense(xp, delta) @ X


def tril_rmatmat(xp: Namespace, delta: Array, X: Array) -> Array:
    """``T(δ)ᵀ @ X``: ``out[i] = Σ_t X[i + t] δ_t`` (anti-causal correlation)."""
    d = int(delta.shape[0])
    if _use_fft(xp, d):
        n = 2 * d
        Fd = xp.fft.rfft(_fft_cast(xp, delta), n=n, axis=0)
        FX = xp.fft.rfft(_fft_cast(xp, X), n=n, axis=0)
        out = xp.fft.irfft(xp.conj(Fd)[:, None] * FX, n=n, axis=0)[:d, ...]
        return xp.astype(out, X.dtype) if out.dtype != X.dtype else out
    return xp.matrix_transpose(_tril_dense(xp, delta)) @ X


def autocorr_sums(xp: Namespace, Y: Array) -> Array:
    """``s[k] = Σ_n Σ_t Y[t + k, n] Y[t, n]`` = sums of the k-th super-diagonals of ``Y Yᵀ``."""
    d = int(Y.shape[0])
    if _use_fft(xp, d):
        n = 2 * d
        F = xp.fft.rfft(_fft_cast(xp, Y), n=n, axis=0)
        power = xp.sum(F * xp.conj(F), axis=1)
        out = xp.fft.irfft(power, n=n, axis=0)[:d]
        return xp.astype(out, Y.dtype) if out.dtype != Y.dtype else out
    return superdiag_sums(xp, Y @ xp.matrix_transpose(Y))


def _proj_from_sums(xp: Namespace, s_sym: Array, d: int) -> Array:
    """Coefficients from symmetric diagonal sums: ``δ_0 = s_0/d``, ``δ_k = 2 s_k/(d-k)``."""
    counts = xp.astype(d - xp.arange(d, device=compat.device(s_sym)), s_sym.dtype)
    factor = xp.concat([counts[:1], counts[1:] / 2.0])
    return s_sym / factor


class _ToeplitzFields(NamedTuple):
    coeffs: Array  # [d]: δ_0 (diagonal), δ_1, ... (k-th off-diagonal)


class _Toeplitz(StructureOps, _ToeplitzFields):
    __slots__ = ()
    _lower: bool = True

    @property
    def dim(self) -> int:
        return int(self.coeffs.shape[0])

    @classmethod
    def eye(cls, d: int, *, xp: Any, dtype: Any = None, device: Any = None):
        d = check_dim_arg(d)
        xp = resolve_xp(xp)
        dt = default_dtype(xp, dtype)
        return cls(
            xp.concat(
                [
                    xp.ones((1,), dtype=dt, device=device),
                    xp.zeros((d - 1,), dtype=dt, device=device),
                ]
            )
        )

    @classmethod
    def zeros(cls, d: int, *, xp: Any, dtype: Any = None, device: Any = None):
        d = check_dim_arg(d)
        xp = resolve_xp(xp)
        return cls(xp.zeros((d,), dtype=default_dtype(xp, dtype), device=device))

    @classmethod
    def from_dense(cls, S: Array):
        """``Π(S)``: average of each diagonal, one-sided diagonals counted from both sides."""
        xp, d = check_square(S, "S", f"{cls.__name__}.from_dense")
        sup = superdiag_sums(xp, S)
        sub = superdiag_sums(xp, xp.matrix_transpose(S))
        counts = xp.astype(d - xp.arange(d, device=compat.device(S)), S.dtype)
        total = xp.concat([sup[:1], sup[1:] + sub[1:]])
        return cls(total / counts)

    def to_dense(self) -> Array:
        xp = self.xp
        T = _tril_dense(xp, self.coeffs)
        return T if self._lower else xp.matrix_transpose(T)

    def matmul(self, X: Array) -> Array:
        xp = self.xp
        X2, flat = as_columns(xp, X, self.dim, "X", f"{type(self).__name__}.matmul")
        delta, X2 = promote(xp, self.coeffs, X2)
        out = tril_matmul(xp, delta, X2) if self._lower else tril_rmatmat(xp, delta, X2)
        return out[:, 0] if flat else out

    def rmatmat(self, X: Array) -> Array:
        xp = self.xp
        X2, flat = as_columns(xp, X, self.dim, "X", f"{type(self).__name__}.rmatmat")
        delta, X2 = promote(xp, self.coeffs, X2)
        out = tril_rmatmat(xp, delta, X2) if self._lower else tril_matmul(xp, delta, X2)
        return out[:, 0] if flat else out

    def from_inner(self, X: Array | None = None):
        """``Π(Kᵀ X Xᵀ K)`` from diagonal sums of ``Y Yᵀ`` (``Y = Kᵀ X``), never forming ``d × d``
        for ``d ≥ FFT_MIN_DIM``. ``X = None``: ``Π(KᵀK)`` from ``s_k = Σ_t (d-k-t) δ_t δ_{t+k}``
        (the same for the lower and the upper class)."""
        xp = self.xp
        d = self.dim
        if X is None:
            delta = self.coeffs
            w = xp.astype(d - xp.arange(d, device=compat.device(delta)), delta.dtype)
            s = tril_rmatmat(xp, delta, (w * delta)[:, None])[:, 0]
        else:
            Y = self.rmatmat(inner_columns(xp, X, self))
            s = autocorr_sums(xp, Y)
        return type(self)(_proj_from_sums(xp, s, d))

    def average_trace(self) -> Array:
        return self.coeffs[0]

    def diag_add(self, c: Any):
        xp = self.xp
        c = cast_scalar(xp, c, self.coeffs)
        return type(self)(xp.concat([self.coeffs[:1] + c, self.coeffs[1:]]))

    def compose(self, other):
        """Product of two same-sided triangular Toeplitz matrices: ``δ'' = (δ * δ')[:d]``."""
        self._check_same(other, "compose")
        xp = self.xp
        return type(self)(tril_matmul(xp, self.coeffs, other.coeffs[:, None])[:, 0])

    def frobenius_norm(self) -> Array:
        """``sqrt(Σ_k (d - k) δ_k²)`` (each coefficient fills one diagonal)."""
        xp = self.xp
        d = self.dim
        acc = acc_dtype(xp, self.dtype)
        c = xp.astype(self.coeffs, acc)
        w = xp.astype(d - xp.arange(d, device=compat.device(c)), acc)
        return xp.astype(xp.sqrt(xp.sum(w * c * c)), self.dtype)


class TrilToeplitz(_Toeplitz):
    """Lower-triangular Toeplitz matrix ``K[i, j] = δ_{i-j}`` (``d`` parameters)."""

    __slots__ = ()
    name = "tril_toeplitz"
    _lower = True


class TriuToeplitz(_Toeplitz):
    """Upper-triangular Toeplitz matrix ``K[i, j] = δ_{j-i}`` (``d`` parameters)."""

    __slots__ = ()
    name = "triu_toeplitz"
    _lower = False
