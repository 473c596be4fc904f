"""Block-diagonal structure (docs/math.md ``block30diagonal`` generalised to any block size).

``d = nb·b + r`` with ``nb = d // b`` full ``b × b`` blocks followed by one trailing ``r × r`` block
(``r = d mod b``, possibly empty). ``Π(S)`` keeps the diagonal blocks of ``S``.
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
    diagonal,
    inner_columns,
    promote,
    resolve_xp,
)

__all__ = ["BlockDiagonal"]


def _check_block_size(block_size: Any) -> int:
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, numbers.Integral)
        or block_size < 1
    ):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    return int(block_size)


class _BlockDiagonalFields(NamedTuple):
    blocks: Array  # [nb, b, b]
    last: Array  # [r, r], r = d mod b (may be 0)


class BlockDiagonal(StructureOps, _BlockDiagonalFields):
    """Block-diagonal matrix: ``nb`` blocks of size ``b`` and a trailing ``r × r`` block."""

    __slots__ = ()
    name = "block_diagonal"

    @property
    def dim(self) -> int:
        nb, b = int(self.blocks.shape[0]), int(self.blocks.shape[1])
        return nb * b + int(self.last.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.blocks.shape[1])

    @classmethod
    def _sizes(cls, d: int, block_size: int) -> tuple[int, int]:
        return d // block_size, d % block_size

    @classmethod
    def eye(
        cls, d: int, *, block_size: int, xp: Any, dtype: Any = None, device: Any = None
    ) -> BlockDiagonal:
        d, b = check_dim_arg(d), _check_block_size(block_size)
        xp = resolve_xp(xp)
        dt = default_dtype(xp, dtype)
        nb, r = cls._sizes(d, b)
        blocks = xp.zeros((nb, b, b), dtype=dt, device=device) + xp.eye(b, dtype=dt, device=device)
        return cls(blocks, xp.eye(r, dtype=dt, device=device))

    @classmethod
    def zeros(
        cls, d: int, *, block_size: int, xp: Any, dtype: Any = None, device: Any = None
    ) -> BlockDiagonal:
        d, b = check_dim_arg(d), _check_block_size(block_size)
        xp = resolve_xp(xp)
        dt = default_dtype(xp, dtype)
        nb, r = cls._sizes(d, b)
        return cls(
            xp.zeros((nb, b, b), dtype=dt, device=device), xp.zeros((r, r), dtype=dt, device=device)
        )

    @classmethod
    def from_dense(cls, S: Array, *, block_size: int) -> BlockDiagonal:
        """``Π(S)``: the diagonal blocks of ``S``."""
        xp, d = check_square(S, "S", "BlockDiagonal.from_dense")
        b = _check_block_size(block_size)
        nb, _ = cls._sizes(d, b)
        m = nb * b
        S4 = xp.reshape(S[:m, :m], (nb, b, nb, b))
        pairs = xp.reshape(xp.permute_dims(S4, (0, 2, 1, 3)), (nb * nb, b, b))
        return cls(pairs[:: nb + 1, ...], S[m:, m:])

    def to_dense(self) -> Array:
        xp = self.xp
        nb, b, r = int(self.blocks.shape[0]), self.block_size, int(self.last.shape[0])
        m = nb * b
        dev, dt = compat.device(self.blocks), self.dtype
        eye_nb = xp.eye(nb, dtype=dt, device=dev)
        top = xp.reshape(eye_nb[:, None, :, None] * self.blocks[:, :, None, :], (m, m))
        return xp.concat(
            [
                xp.concat([top, xp.zeros((m, r), dtype=dt, device=dev)], axis=1),
                xp.concat([xp.zeros((r, m), dtype=dt, device=dev), self.last], axis=1),
            ],
            axis=0,
        )

    def _apply(self, X: Array, transpose: bool, where: str) -> Array:
        xp = self.xp
        X2, flat = as_columns(xp, X, self.dim, "X", where)
        blocks, X2 = promote(xp, self.blocks, X2)
        last, _ = promote(xp, self.last, X2)
        if transpose:
            blocks, last = xp.matrix_transpose(blocks), xp.matrix_transpose(last)
        nb, b = int(blocks.shape[0]), self.block_size
        m, n = nb * b, int(X2.shape[1])
        top = xp.reshape(blocks @ xp.reshape(X2[:m, :], (nb, b, n)), (m, n))
        out = xp.concat([top, last @ X2[m:, :]], axis=0)
        return out[:, 0] if flat else out

    def matmul(self, X: Array) -> Array:
        return self._apply(X, False, "BlockDiagonal.matmul")

    def rmatmat(self, X: Array) -> Array:
        return self._apply(X, True, "BlockDiagonal.rmatmat")

    def from_inner(self, X: Array | None = None) -> BlockDiagonal:
        """``Π(Kᵀ X Xᵀ K)`` block by block, never forming ``d × d``."""
        xp = self.xp
        if X is None:  # Π(KᵀK) = blockwise KᵢᵀKᵢ
            bt, lt = xp.matrix_transpose(self.blocks), xp.matrix_transpose(self.last)
            return BlockDiagonal(bt @ self.blocks, lt @ self.last)
        Y = self.rmatmat(inner_columns(xp, X, self))
        nb, b = int(self.blocks.shape[0]), self.block_size
        m, n = nb * b, int(Y.shape[1])
        Yb = xp.reshape(Y[:m, :], (nb, b, n))
        Yl = Y[m:, :]
        return BlockDiagonal(Yb @ xp.matrix_transpose(Yb), Yl @ xp.matrix_transpose(Yl))

    def average_trace(self) -> Array:
        xp = self.xp
        return (xp.sum(diagonal(xp, self.blocks)) + xp.sum(diagonal(xp, self.last))) / self.dim

    def diag_add(self, c: Any) -> BlockDiagonal:
        xp = self.xp
        dev, dt = compat.device(self.blocks), self.dtype
        c = cast_scalar(xp, c, self.blocks)
        b, r = self.block_size, int(self.last.shape[0])
        return BlockDiagonal(
            self.blocks + c * xp.eye(b, dtype=dt, device=dev),
            self.last + c * xp.eye(r, dtype=self.last.dtype, device=dev),
        )

    def compose(self, other: BlockDiagonal) -> BlockDiagonal:
        self._check_same(other, "compose")
        return BlockDiagonal(self.blocks @ other.blocks, self.last @ other.last)
