"""Shared machinery of the SINGD structure classes (docs/math.md).

Every structure is a ``NamedTuple`` whose fields are *only* its parameter arrays, so a structure is a
pytree in JAX for free (and pickles), and every piece of metadata (dimension, block size, hierarchy
sizes) is read off the parameter shapes: nothing static has to be registered anywhere.

The operations common to all classes live in the mixin :class:`StructureOps`; a concrete class is
declared as ``class Dense(StructureOps, _DenseFields)`` (mixin first, so its operators win over
tuple's ``+``/``*``) where ``_DenseFields`` is the NamedTuple of
its parameters. Arithmetic operators act on the *represented matrices* (``K + M``, ``c * K``,
``K @ M``), not on the tuples.

Conventions: a structure ``K`` represents a ``d × d`` matrix; ``K.matmul(X)`` is ``K @ X`` and
``K.rmatmat(X)`` is ``Kᵀ @ X`` for ``X`` of shape ``[d, n]`` (or ``[d]``); ``K.from_inner(X)`` is
``Π(Kᵀ X Xᵀ K)`` (``X = None``: ``Π(Kᵀ K)``). Nothing mutates its inputs; dtype and device come
from the parameters (or the inputs), never from library defaults.
"""

from __future__ import annotations

import numbers
from typing import Any

import array_api_compat as compat

Array = Any
Namespace = Any

__all__ = ["StructureOps"]


# --------------------------------------------------------------------------------------------
# small helpers (array-API only)


def resolve_xp(xp: Namespace) -> Namespace:
    """Accept a raw library module (``numpy``, ``torch``, ``jax.numpy``) or a compat namespace."""
    if xp is None:
        raise TypeError("an array namespace `xp` is required")
    try:
        return compat.array_namespace(xp.asarray(0.0))
    except Exception as exc:  # pragma: no cover - defensive
        raise TypeError(f"xp={xp!r} is not an array namespace") from exc


def default_dtype(xp: Namespace, dtype: Any) -> Any:
    """``dtype`` or, explicitly, float32."""
    return xp.float32 if dtype is None else dtype


def shape_str(x: Array) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def check_dim_arg(d: Any, name: str = "d") -> int:
    if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
        raise ValueError(f"{name} must be a positive integer, got {d!r}")
    return int(d)


def check_square(S: Array, name: str, where: str) -> tuple[Namespace, int]:
    """Raise ``ValueError`` unless ``S`` is a 2-D square array; return its namespace and size."""
    if not compat.is_array_api_obj(S):
        raise TypeError(f"{where}: argument {name!r} must be an array, got {type(S).__name__}")
    if S.ndim != 2 or S.shape[0] != S.shape[1] or S.shape[0] < 1:
        raise ValueError(
            f"{where}: argument {name!r} must be a non-empty square matrix [d, d], "
            f"got shape {shape_str(S)}"
        )
    return compat.array_namespace(S), int(S.shape[0])


def diagonal(xp: Namespace, S: Array) -> Array:
    """Main diagonal of the trailing two (square) axes: ``[..., d, d] -> [..., d]``."""
    d = S.shape[-1]
    lead = tuple(S.shape[:-2])
    flat = xp.reshape(S, lead + (d * d,))
    return flat[..., :: d + 1]


def diag_matrix(xp: Namespace, v: Array) -> Array:
    """``[d] -> [d, d]`` diagonal matrix with dtype/device of ``v``."""
    d = v.shape[0]
    eye = xp.eye(d, dtype=v.dtype, device=compat.device(v))
    return eye * v[:, None]


def cast_scalar(xp: Namespace, c: Any, like: Array) -> Any:
    """A Python number stays a number; an array scalar is cast to ``like``'s dtype (no promotion)."""
    if compat.is_array_api_obj(c):
        if c.ndim != 0:
            raise ValueError(f"expected a scalar (0-d array or number), got shape {shape_str(c)}")
        return c if c.dtype == like.dtype else xp.astype(c, like.dtype)
    if isinstance(c, bool) or not isinstance(c, numbers.Number):
        raise TypeError(f"expected a scalar (0-d array or number), got {type(c).__name__}")
    return c


def as_columns(xp: Namespace, X: Array, d: int, name: str, where: str) -> tuple[Array, bool]:
    """Validate ``X`` of shape ``[d]`` or ``[d, n]``; return the 2-D view and whether it was 1-D."""
    if not compat.is_array_api_obj(X):
        raise TypeError(f"{where}: argument {name!r} must be an array, got {type(X).__name__}")
    if X.ndim not in (1, 2) or X.shape[0] != d:
        raise ValueError(
            f"{where}: argument {name!r} must have shape [{d}] or [{d}, n] to match the "
            f"{d}×{d} structure, got shape {shape_str(X)}"
        )
    if X.ndim == 1:
        return xp.reshape(X, (d, 1)), True
    return X, False


def inner_columns(xp: Namespace, X: Array, K: Any) -> Array:
    """Validate the ``X`` of ``K.from_inner(X)``: shape ``[d, n]`` (or ``[d]``), returned 2-D."""
    X2, _ = as_columns(xp, X, K.dim, "X", f"{type(K).__name__}.from_inner")
    return X2


def promote(xp: Namespace, a: Array, b: Array) -> tuple[Array, Array]:
    """Cast ``a`` and ``b`` to their common result dtype (only when they differ)."""
    if a.dtype == b.dtype:
        return a, b
    dt = xp.result_type(a.dtype, b.dtype)
    return (a if a.dtype == dt else xp.astype(a, dt)), (b if b.dtype == dt else xp.astype(b, dt))


def acc_dtype(xp: Namespace, dtype: Any) -> Any:
    """float64 stays, everything else (bf16, f16, f32) is accumulated in float32."""
    return xp.float64 if dtype == xp.float64 else xp.float32


def superdiag_sums(xp: Namespace, M: Array) -> Array:
    """``s[k] = Σ_i M[i, i + k]`` for ``k = 0..d-1`` of a square matrix (pad-and-reshape trick)."""
    d = M.shape[0]
    dev = compat.device(M)
    padded = xp.concat([M, xp.zeros((d, d), dtype=M.dtype, device=dev)], axis=1)  # [d, 2d]
    flat = xp.concat([xp.reshape(padded, (2 * d * d,)), xp.zeros((d,), dtype=M.dtype, device=dev)])
    sheared = xp.reshape(flat, (d, 2 * d + 1))[:, :d]  # sheared[i, k] = M[i, i + k] (0 past end)
    return xp.sum(sheared, axis=0)


# --------------------------------------------------------------------------------------------
# the mixin


class StructureOps:
    """Operations shared by every structure class (mixed into a NamedTuple of parameter arrays)."""

    __slots__ = ()

    #: NumPy (and NumPy-like) arrays defer ``array * K`` to ``K.__rmul__`` instead of treating the
    #: tuple of parameters as a sequence to broadcast against
    __array_ufunc__ = None
    __array_priority__ = 1000

    #: registry name of the class (set by each subclass)
    name: str = "structure"

    # ---- metadata -------------------------------------------------------------------------

    @property
    def xp(self) -> Namespace:
        return compat.array_namespace(*self)

    @property
    def dim(self) -> int:
        """Size ``d`` of the represented ``d × d`` matrix."""
        raise NotImplementedError

    @property
    def dtype(self) -> Any:
        return self[0].dtype

    @property
    def device(self) -> Any:
        return compat.device(self[0])

    @property
    def num_params(self) -> int:
        """Number of stored parameters (memory footprint in elements)."""
        n = 0
        for p in self:
            k = 1
            for s in p.shape:
                k *= int(s)
            n += k
        return n

    def __repr__(self) -> str:
        shapes = ", ".join(f"{f}={shape_str(p)}" for f, p in zip(self._fields, self))  # type: ignore[attr-defined]
        return f"{type(self).__name__}(d={self.dim}, {shapes}, dtype={self.dtype})"

    # ---- generic parameter-wise operations -----------------------------------------------------

    def _check_same(self, other: Any, what: str) -> None:
        if type(other) is not type(self):
            raise TypeError(
                f"{what}: both operands must be {type(self).__name__}, got {type(other).__name__}"
            )
        mine = [tuple(p.shape) for p in self]
        theirs = [tuple(p.shape) for p in other]
        if mine != theirs:
            raise ValueError(
                f"{what}: {type(self).__name__} operands have different parameter shapes "
                f"{mine} and {theirs}"
            )

    def astype(self, dtype: Any):
        """The same structure with every parameter cast to ``dtype`` (no copy when equal)."""
        xp = self.xp
        return type(self)(*(p if p.dtype == dtype else xp.astype(p, dtype) for p in self))

    def add(self, other):
        """``self + other`` (same class and shapes)."""
        self._check_same(other, "add")
        xp = self.xp
        return type(self)(
            *(a + (b if b.dtype == a.dtype else xp.astype(b, a.dtype)) for a, b in zip(self, other))
        )

    def sub(self, other):
        """``self - other`` (same class and shapes)."""
        return self.add(other.mul(-1.0))

    def mul(self, c: Any):
        """Scalar multiple ``c · self`` (``c``: number or 0-d array; the parameter dtype is kept)."""
        xp = self.xp
        return type(self)(*(p * cast_scalar(xp, c, p) for p in self))

    def max_abs(self) -> Array:
        """Infinity norm over the parameters, ``max |θ|`` (= max |entry| of the matrix), 0-d."""
        xp = self.xp
        parts = [xp.max(xp.abs(xp.reshape(p, (-1,)))) for p in self if _size(p) > 0]
        if len(parts) == 1:
            return parts[0]
        return xp.max(xp.stack(parts))

    def frobenius_norm(self) -> Array:
        """Frobenius norm of the represented matrix, accumulated in ≥ float32, 0-d, param dtype."""
        xp = self.xp
        acc = acc_dtype(xp, self.dtype)
        total = sum(xp.sum(xp.astype(p, acc) ** 2) for p in self if _size(p) > 0)
        return xp.astype(xp.sqrt(total), self.dtype)

    def compose(self, other):
        """Structured product ``self @ other``; stays in the class."""
        raise NotImplementedError

    # ---- operators on the represented matrices ---------------------------------------------------

    def __add__(self, other):  # type: ignore[override]
        return self.add(other)

    def __sub__(self, other):
        return self.sub(other)

    def __neg__(self):
        return self.mul(-1.0)

    def __mul__(self, c):  # type: ignore[override]
        return self.mul(c)

    def __rmul__(self, c):  # type: ignore[override]
        return self.mul(c)

    def __matmul__(self, other):
        if isinstance(other, StructureOps):
            return self.compose(other)
        return self.matmul(other)


def _size(p: Array) -> int:
    n = 1
    for s in p.shape:
        n *= int(s)
    return n
