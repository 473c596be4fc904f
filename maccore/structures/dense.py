"""Dense structure: a full ``d × d`` matrix; ``Π(S) = S``."""

from __future__ import annotations

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
    diagonal,
    inner_columns,
    promote,
    resolve_xp,
)

__all__ = ["Dense"]


class _DenseFields(NamedTuple):
    mat: Array  # [d, d]


class Dense(StructureOps, _DenseFields):
    """A full ``d × d`` matrix (``d²`` parameters)."""

    __slots__ = ()
    name = "dense"

    @property
    def dim(self) -> int:
        return int(self.mat.shape[0])

    @classmethod
    def eye(cls, d: int, *, xp: Any, dtype: Any = None, device: Any = None) -> Dense:
        d = check_dim_arg(d)
        xp = resolve_xp(xp)
        return cls(xp.eye(d, dtype=default_dtype(xp, dtype), device=device))

    @classmethod
    def zeros(cls, d: int, *, xp: Any, dtype: Any = None, device: Any = None) -> Dense:
        d = check_dim_arg(d)
        xp = resolve_xp(xp)
        return cls(xp.zeros((d, d), dtype=default_dtype(xp, dtype), device=device))

    @classmethod
    def from_dense(cls, S: Array) -> Dense:
        """``Π(S) = S`` (``S`` symmetric)."""
        check_square(S, "S", "Dense.from_dense")
        return cls(S)

    def to_dense(self) -> Array:
        return self.mat

    def matmul(self, X: Array) -> Array:
        xp = self.xp
        X2, flat = as_columns(xp, X, self.dim, "X", "Dense.matmul")
        K, X2 = promote(xp, self.mat, X2)
        out = K @ X2
        return out[:, 0] if flat else out

    def rmatmat(self, X: Array) -> Array:
        xp = self.xp
        X2, flat = as_columns(xp, X, self.dim, "X", "Dense.rmatmat")
        K, X2 = promote(xp, self.mat, X2)
        out = xp.matrix_transpose(K) @ X2
        return out[:, 0] if flat else out

    def from_inner(self, X: Array | None = None) -> Dense:
        """``Π(Kᵀ X Xᵀ K)`` (``X = None``: ``Π(Kᵀ K)``)."""
        xp = self.xp
        Y = xp.matrix_transpose(self.mat) if X is None else self.rmatmat(inner_columns(xp, X, self))
        return Dense(Y @ xp.matrix_transpose(Y))

    def average_trace(self) -> Array:
        xp = self.xp
        return xp.sum(diagonal(xp, self.mat)) / self.dim

    def diag_add(self, c: Any) -> Dense:
        xp = self.xp
        eye = xp.eye(self.dim, dtype=self.dtype, device=compat.device(self.mat))
        return Dense(self.mat + eye * cast_scalar(xp, c, self.mat))

    def compose(self, other: Dense) -> Dense:
        self._check_same(other, "compose")
        return Dense(self.mat @ other.mat)
