"""Hierarchical structure (docs/math.md ``hierarchical15_15`` generalised to any ``k1, k2``).

The represented matrix, with row/column blocks of sizes ``K1, dc, K2``::

    [[A, B1,       B2],
     [0, Diag(C),  0 ],
     [0, D,        E ]]          B = [B1 | B2]  (K1 × (d - K1))

Sizes for dimension ``d``: ``d ≤ k1`` → only ``A`` (``K1 = d``); ``d ≤ k1 + k2`` → ``K1 = k1``,
``dc = 0``, ``K2 = d - k1``; otherwise ``K1 = k1``, ``K2 = k2``, ``dc = d - k1 - k2``.
``Π(S)``: ``A = S₁₁``, ``B = S₁,₂₃ + S₂₃,₁ᵀ``, ``C = diag S₂₂``, ``D = S₃₂ + S₂₃ᵀ``, ``E = S₃₃``
(one-sided off-diagonal blocks get ``S_ij + S_ji``).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import array_api_compat as compat

from maccore.structures._base import (
    Array,
    StructureOps,
    as_columns,
    cast_scalar,
    check_dim_arg,
    check_square,
    default_dtype,
    diag_matrix,
    diagonal,
    inner_columns,
    promote,
    resolve_xp,
)

__all__ = ["Hierarchical", "hierarchical_sizes"]


def _check_k(k: Any, name: str) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


def hierarchical_sizes(d: int, k1: int, k2: int) -> tuple[int, int, int]:
    """Block sizes ``(K1, dc, K2)`` of a ``d × d`` hierarchical matrix with options ``k1, k2``."""
    d, k1, k2 = check_dim_arg(d), _check_k(k1, "k1"), _check_k(k2, "k2")
    if d <= k1:
        return d, 0, 0
    if d <= k1 + k2:
        return k1, 0, d - k1
    return k1, d - k1 - k2, k2


class _HierarchicalFields(NamedTuple):
    A: Array  # [K1, K1]
    B: Array  # [K1, dc + K2]
    C: Array  # [dc]
    D: Array  # [K2, dc]
    E: Array  # [K2, K2]


class Hierarchical(StructureOps, _HierarchicalFields):
    """Hierarchical (dense head, diagonal middle, dense tail) matrix, ``≈ (k1 + k2 + 1)·d`` params."""

    __slots__ = ()
    name = "hierarchical"

    @property
    def sizes(self) -> tuple[int, int, int]:
        return int(self.A.shape[0]), int(self.C.shape[0]), int(self.E.shape[0])

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    @classmethod
    def _build(cls, d, k1, k2, xp, dtype, device, fill_eye: bool) -> Hierarchical:
        K1, dc, K2 = hierarchical_sizes(d, k1, k2)
        xp = resolve_xp(xp)
        dt = default_dtype(xp, dtype)
        z = lambda *s: xp.zeros(s, dtype=dt, device=device)
        if fill_eye:
            return cls(
                xp.eye(K1, dtype=dt, device=device),
                z(K1, dc + K2),
                xp.ones((dc,), dtype=dt, device=device),
                z(K2, dc),
                xp.eye(K2, dtype=dt, device=device),
            )
        return cls(z(K1, K1), z(K1, dc + K2), z(dc), z(K2, dc), z(K2, K2))

    @classmethod
    def eye(
        cls, d: int, *, k1: int, k2: int, xp: Any, dtype: Any = None, device: Any = None
    ) -> Hierarchical:
        return cls._build(d, k1, k2, xp, dtype, device, True)

    @classmethod
    def zeros(
        cls, d: int, *, k1: int, k2: int, xp: Any, dtype: Any = None, device: Any = None
    ) -> Hierarchical:
        return cls._build(d, k1, k2, xp, dtype, device, False)

    @classmethod
    def from_dense(cls, S: Array, *, k1: int, k2: int) -> Hierarchical:
        """``Π(S)`` of docs/math.md"""
        xp, d = check_square(S, "S", "Hierarchical.from_dense")
        K1, dc, _ = hierarchical_sizes(d, k1, k2)
        j = K1 + dc
        A = S[:K1, :K1]
        B = S[:K1, K1:] + xp.matrix_transpose(S[K1:, :K1])
        C = diagonal(xp, S[K1:j, K1:j])
        D = S[j:, K1:j] + xp.matrix_transpose(S[K1:j, j:])
        E = S[j:, j:]
        return cls(A, B, C, D, E)

    def to_dense(self) -> Array:
        xp = self.xp
        K1, dc, K2 = self.sizes
        dev, dt = compat.device(self.A), self.dtype
        z = lambda *s: xp.zeros(s, dtype=dt, device=dev)
        row1 = xp.concat([self.A, self.B], axis=1)
        row2 = xp.concat([z(dc, K1), diag_matrix(xp, self.C), z(dc, K2)], axis=1)
        row3 = xp.concat([z(K2, K1), self.D, self.E], axis=1)
        return xp.concat([row1, row2, row3], axis=0)

    def _params_like(self, X: Array) -> tuple[Array, ...]:
        xp = self.xp
        return tuple(promote(xp, p, X)[0] for p in self)

    def matmul(self, X: Array) -> Array:
        xp = self.xp
        X2, flat = as_columns(xp, X, self.dim, "X", "Hierarchical.matmul")
        A, B, C, D, E = self._params_like(X2)
        X2 = promote(xp, self.A, X2)[1]
        K1, dc, _ = self.sizes
        j = K1 + dc
        X1, Xc, X3 = X2[:K1, :], X2[K1:j, :], X2[j:, :]
        out = xp.concat([A @ X1 + B @ X2[K1:, :], C[:, None] * Xc, D @ Xc + E @ X3], axis=0)
        return out[:, 0] if flat else out

    def rmatmat(self, X: Array) -> Array:
        xp = self.xp
        X2, flat = as_columns(xp, X, self.dim, "X", "Hierarchical.rmatmat")
        A, B, C, D, E = self._params_like(X2)
        X2 = promote(xp, self.A, X2)[1]
        K1, dc, _ = self.sizes
        j = K1 + dc
        X1, Xc, X3 = X2[:K1, :], X2[K1:j, :], X2[j:, :]
        T = xp.matrix_transpose
        tail = xp.concat([C[:, None] * Xc + T(D) @ X3, T(E) @ X3], axis=0) + T(B) @ X1
        out = xp.concat([T(A) @ X1, tail], axis=0)
        return out[:, 0] if flat else out

    def from_inner(self, X: Array | None = None) -> Hierarchical:
        """``Π(Kᵀ X Xᵀ K)`` (``X = None``: ``Π(KᵀK)``) from blocks; never forms ``d × d``."""
        xp = self.xp
        T = xp.matrix_transpose
        K1, dc, _ = self.sizes
        if X is None:
            A, B, C, D, E = self
            B1, B2 = B[:, :dc], B[:, dc:]
            return Hierarchical(
                T(A) @ A,
                2.0 * (T(A) @ B),
                xp.sum(B1 * B1, axis=0) + C * C + xp.sum(D * D, axis=0),
                2.0 * (T(B2) @ B1 + T(E) @ D),
                T(B2) @ B2 + T(E) @ E,
            )
        Y = self.rmatmat(inner_columns(xp, X, self))
        j = K1 + dc
        Y1, Yc, Y3 = Y[:K1, :], Y[K1:j, :], Y[j:, :]
        return Hierarchical(
            Y1 @ T(Y1),
            2.0 * (Y1 @ T(Y[K1:, :])),
            xp.sum(Yc * Yc, axis=1),
            2.0 * (Y3 @ T(Yc)),
            Y3 @ T(Y3),
        )

    def average_trace(self) -> Array:
        xp = self.xp
        tr = xp.sum(diagonal(xp, self.A)) + xp.sum(self.C) + xp.sum(diagonal(xp, self.E))
        return tr / self.dim

    def diag_add(self, c: Any) -> Hierarchical:
        xp = self.xp
        c = cast_scalar(xp, c, self.A)
        dev, dt = compat.device(self.A), self.dtype
        K1, _, K2 = self.sizes
        return Hierarchical(
            self.A + c * xp.eye(K1, dtype=dt, device=dev),
            self.B,
            self.C + c,
            self.D,
            self.E + c * xp.eye(K2, dtype=dt, device=dev),
        )

    def compose(self, other: Hierarchical) -> Hierarchical:
        self._check_same(other, "compose")
        xp = self.xp
        _, dc, _ = self.sizes
        A, B, C, D, E = self
        A2, B2_, C2, D2, E2 = other
        B1, B2 = B[:, :dc], B[:, dc:]
        BL = xp.concat([B1 * C2[None, :] + B2 @ D2, B2 @ E2], axis=1)
        return Hierarchical(A @ A2, A @ B2_ + BL, C * C2, D * C2[None, :] + E @ D2, E @ E2)
