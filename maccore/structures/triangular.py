"""Triangular structures with a diagonal block (docs/math.md), ``2d - 1`` parameters each.

With the *hub* index ``h`` (``0`` for the ``*_bottom_right_diag`` classes, ``d - 1`` for the
``*_top_left_diag`` ones) and the other indices ``o``, each class stores ``corner = K[h, h]``,
``diag = diag(K)[o]`` and the vector ``off`` of the one non-zero off-diagonal line:

=========================  ==================  =========================
class                      matrix              ``off``
=========================  ==================  =========================
TrilBottomRightDiag        ``[[a, 0], [b, C]]``  column ``K[1:, 0]``
TrilTopLeftDiag            ``[[A, 0], [b, c]]``  row ``K[d-1, :d-1]``
TriuBottomRightDiag        ``[[a, b], [0, C]]``  row ``K[0, 1:]``
TriuTopLeftDiag            ``[[A, b], [0, c]]``  column ``K[:d-1, d-1]``
=========================  ==================  =========================

(``A``, ``C`` diagonal.) ``Π(S)``: ``corner = S_hh``, ``diag = diag(S)_o``, ``off = S_oh + S_hoᵀ``.
"""

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
    diag_matrix,
    diagonal,
    inner_columns,
    promote,
    resolve_xp,
)

__all__ = [
    "TrilBottomRightDiag",
    "TrilTopLeftDiag",
    "TriuBottomRightDiag",
    "TriuTopLeftDiag",
]


class _TriangularFields(NamedTuple):
    corner: Array  # [1]      K[h, h]
    off: Array  # [d - 1]     the off-diagonal line (column K[o, h] or row K[h, o])
    diag: Array  # [d - 1]    diag(K)[o]


class _Triangular(StructureOps, _TriangularFields):
    __slots__ = ()
    _hub_first: bool = True  # hub index h = 0 (else d - 1)
    _off_in_column: bool = True  # off = K[o, h] (else off = K[h, o])

    @property
    def dim(self) -> int:
        return int(self.diag.shape[0]) + 1

    @classmethod
    def _slices(cls, d: int) -> tuple[slice, slice]:
        return (slice(0, 1), slice(1, d)) if cls._hub_first else (slice(d - 1, d), slice(0, d - 1))

    def _join(self, xp: Any, hub: Array, others: Array) -> Array:
        return xp.concat([hub, others] if self._hub_first else [others, hub], axis=0)

    @classmethod
    def eye(cls, d: int, *, xp: Any, dtype: Any = None, device: Any = None):
        d = check_dim_arg(d)
        xp = resolve_xp(xp)
        dt = default_dtype(xp, dtype)
        return cls(
            xp.ones((1,), dtype=dt, device=device),
            xp.zeros((d - 1,), dtype=dt, device=device),
            xp.ones((d - 1,), dtype=dt, device=device),
        )

    @classmethod
    def zeros(cls, d: int, *, xp: Any, dtype: Any = None, device: Any = None):
        d = check_dim_arg(d)
        xp = resolve_xp(xp)
        dt = default_dtype(xp, dtype)
        z = xp.zeros((d - 1,), dtype=dt, device=device)
        return cls(xp.zeros((1,), dtype=dt, device=device), z, z)

    @classmethod
    def from_dense(cls, S: Array):
        """``Π(S)``: corner and diagonal copied, the one-sided line gets ``S_oh + S_hoᵀ``."""
        xp, d = check_square(S, "S", f"{cls.__name__}.from_dense")
        hs, os = cls._slices(d)
        corner = xp.reshape(S[hs, hs], (1,))
        off = S[os, hs][:, 0] + S[hs, os][0, :]
        return cls(corner, off, diagonal(xp, S)[os])

    def to_dense(self) -> Array:
        xp = self.xp
        d = self.dim
        dev, dt = compat.device(self.diag), self.dtype
        zc = xp.zeros((d - 1, 1), dtype=dt, device=dev)
        zr = xp.zeros((1, d - 1), dtype=dt, device=dev)
        col = self.off[:, None] if self._off_in_column else zc
        row = zr if self._off_in_column else self.off[None, :]
        corner = xp.reshape(self.corner, (1, 1))
        D = diag_matrix(xp, self.diag)
        if self._hub_first:
            top, bottom = [corner, row], [col, D]
        else:
            top, bottom = [D, col], [row, corner]
        return xp.concat([xp.concat(top, axis=1), xp.concat(bottom, axis=1)], axis=0)

    def _apply(self, X: Array, column: bool, where: str) -> Array:
        xp = self.xp
        X2, flat = as_columns(xp, X, self.dim, "X", where)
        corner, X2 = promote(xp, self.corner, X2)
        off, diag = promote(xp, self.off, X2)[0], promote(xp, self.diag, X2)[0]
        hs, os = self._slices(self.dim)
        Xh, Xo = X2[hs, :], X2[os, :]
        if column:  # K[o, h] = off
            out_h = corner[:, None] * Xh
            out_o = diag[:, None] * Xo + off[:, None] * Xh
        else:  # K[h, o] = off
            out_h = corner[:, None] * Xh + off[None, :] @ Xo
            out_o = diag[:, None] * Xo
        out = self._join(xp, out_h, out_o)
        return out[:, 0] if flat else out

    def matmul(self, X: Array) -> Array:
        return self._apply(X, self._off_in_column, f"{type(self).__name__}.matmul")

    def rmatmat(self, X: Array) -> Array:
        return self._apply(X, not self._off_in_column, f"{type(self).__name__}.rmatmat")

    def from_inner(self, X: Array | None = None):
        """``Π(Kᵀ X Xᵀ K)`` (``X = None``: ``Π(KᵀK)``) in ``O(d n)``."""
        xp = self.xp
        if X is None:
            a, off, diag = self
            if self._off_in_column:
                return type(self)(a * a + xp.sum(off * off), 2.0 * diag * off, diag * diag)
            return type(self)(a * a, 2.0 * off * a, diag * diag + off * off)
        Y = self.rmatmat(inner_columns(xp, X, self))
        hs, os = self._slices(self.dim)
        Yh, Yo = Y[hs, :], Y[os, :]
        return type(self)(
            xp.sum(Yh * Yh, axis=1),
            2.0 * (Yo @ xp.matrix_transpose(Yh))[:, 0],
            xp.sum(Yo * Yo, axis=1),
        )

    def average_trace(self) -> Array:
        xp = self.xp
        return (xp.sum(self.corner) + xp.sum(self.diag)) / self.dim

    def diag_add(self, c: Any):
        c = cast_scalar(self.xp, c, self.diag)
        return type(self)(self.corner + c, self.off, self.diag + c)

    def compose(self, other):
        self._check_same(other, "compose")
        a, off, diag = self
        a2, off2, diag2 = other
        if self._off_in_column:  # (KK')[o, h] = K[o,o] K'[o,h] + K[o,h] K'[h,h]
            new_off = diag * off2 + off * a2
        else:  # (KK')[h, o] = K[h,h] K'[h,o] + K[h,o] K'[o,o]
            new_off = a * off2 + off * diag2
        return type(self)(a * a2, new_off, diag * diag2)


class TrilBottomRightDiag(_Triangular):
    """``[[a, 0], [b, C]]`` with scalar ``a``, column ``b`` and diagonal ``C``."""

    __slots__ = ()
    name = "tril_bottom_right_diag"
    _hub_first = True
    _off_in_column = True


class TrilTopLeftDiag(_Triangular):
    """``[[A, 0], [b, c]]`` with diagonal ``A``, row ``b`` and scalar ``c``."""

    __slots__ = ()
    name = "tril_top_left_diag"
    _hub_first = False
    _off_in_column = False


class TriuBottomRightDiag(_Triangular):
    """``[[a, b], [0, C]]`` with scalar ``a``, row ``b`` and diagonal ``C``."""

    __slots__ = ()
    name = "triu_bottom_right_diag"
    _hub_first = True
    _off_in_column = False


class TriuTopLeftDiag(_Triangular):
    """``[[A, b], [0, c]]`` with diagonal ``A``, column ``b`` and scalar ``c``."""

    __slots__ = ()
    name = "triu_top_left_diag"
    _hub_first = False
    _off_in_column = True
