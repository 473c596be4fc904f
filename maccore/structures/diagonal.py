"""Diagonal structure: ``d`` parameters; ``Π(S) = Diag(diag S)``."""

from __future__ import annotations

from typing import Any, NamedTuple

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

__all__ = ["Diagonal"]


class _DiagonalFields(NamedTuple):
    diag: Array  # [d]


class Diagonal(StructureOps, _DiagonalFields):
    """A diagonal matrix stored as its diagonal (``d`` parameters)."""

    __slots__ = ()
    name = "diagonal"

    @property
    def dim(self) -> int:
        return int(self.diag.shape[0])

    @classmethod
    def eye(cls, d: int, *, xp: Any, dtype: Any = None, device: Any = None) -> Diagonal:
        d = check_dim_arg(d)
        xp = resolve_xp(xp)
        return cls(xp.ones((d,), dtype=default_dtype(xp, dtype), device=device))

    @classmethod
    def zeros(cls, d: int, *, xp: Any, dtype: Any = None, device: Any = None) -> Diagonal:
        d = check_dim_arg(d)
        xp = resolve_xp(xp)
        return cls(xp.zeros((d,), dtype=default_dtype(xp, dtype), device=device))

    @classmethod
    def from_dense(cls, S: Array) -> Diagonal:
        """``Π(S) = Diag(diag S)``."""
        xp, _ = check_square(S, "S", "Diagonal.from_dense")
        return cls(diagonal(xp, S))

    def to_dense(self) -> Array:
        return diag_matrix(self.xp, self.diag)

    def matmul(self, X: Array) -> Array:
        xp = self.xp
        X2, flat = as_columns(xp, X, self.dim, "X", "Diagonal.matmul")
        k, X2 = promote(xp, self.diag, X2)
        out = k[:, None] * X2
        return out[:, 0] if flat else out

    def rmatmat(self, X: Array) -> Array:
        xp = self.xp
        X2, flat = as_columns(xp, X, self.dim, "X", "Diagonal.rmatmat")
        k, X2 = promote(xp, self.diag, X2)
        out = k[:, None] * X2
        return out[:, 0] if flat else out

    def from_inner(self, X: Array | None = None) -> Diagonal:
        """``Π(Kᵀ X Xᵀ K) = Diag(Σ_n (K X)²)`` without forming ``d × d``."""
        xp = self.xp
        if X is None:
            return Diagonal(self.diag * self.diag)
        Y = self.rmatmat(inner_columns(xp, X, self))
        return Diagonal(xp.sum(Y * Y, axis=1))

    def average_trace(self) -> Array:
        return self.xp.mean(self.diag)

    def diag_add(self, c: Any) -> Diagonal:
        return Diagonal(self.diag + cast_scalar(self.xp, c, self.diag))

    def compose(self, other: Diagonal) -> Diagonal:
        self._check_same(other, "compose")
        return Diagonal(self.diag * other.diag)
