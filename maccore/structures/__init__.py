"""SINGD structure classes (docs/math.md) and a name registry.

Every class is an immutable ``NamedTuple`` of its parameter arrays (a JAX pytree for free; memory
proportional to the parameter count) with

- class methods ``eye(d, *, xp, dtype=None, device=None, **opts)``, ``zeros(...)`` and
  ``from_dense(S, **opts)`` (the projection ``Π`` of a symmetric matrix),
- methods ``to_dense()``, ``matmul(X)`` (``K @ X``), ``rmatmat(X)`` (``Kᵀ @ X``),
  ``from_inner(X=None)`` (``Π(Kᵀ X Xᵀ K)``, ``X = None``: ``Π(KᵀK)``), ``average_trace()``,
  ``diag_add(c)``, ``add``, ``sub``, ``mul`` (scalar), ``compose`` (structured product, stays in the
  class), ``max_abs()`` (max |parameter|), ``frobenius_norm()``, ``astype(dtype)``,
- operators on the represented matrix: ``K + M``, ``K - M``, ``c * K``, ``K @ M``, ``K @ X``.

``get(name, **opts)`` returns a :class:`StructureType` that binds the options (``block_size``,
``k1``/``k2``) so that SINGD can call ``eye``/``zeros``/``from_dense`` uniformly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from maccore.structures._base import StructureOps
from maccore.structures.block_diagonal import BlockDiagonal
from maccore.structures.dense import Dense
from maccore.structures.diagonal import Diagonal
from maccore.structures.hierarchical import Hierarchical, hierarchical_sizes
from maccore.structures.toeplitz import TrilToeplitz, TriuToeplitz
from maccore.structures.triangular import (
    TrilBottomRightDiag,
    TrilTopLeftDiag,
    TriuBottomRightDiag,
    TriuTopLeftDiag,
)

__all__ = [
    "BlockDiagonal",
    "Dense",
    "Diagonal",
    "Hierarchical",
    "StructureOps",
    "StructureType",
    "TrilBottomRightDiag",
    "TrilToeplitz",
    "TrilTopLeftDiag",
    "TriuBottomRightDiag",
    "TriuToeplitz",
    "TriuTopLeftDiag",
    "get",
    "hierarchical_sizes",
    "names",
]

_CLASSES: dict[str, type] = {
    "dense": Dense,
    "diagonal": Diagonal,
    "block_diagonal": BlockDiagonal,
    "hierarchical": Hierarchical,
    "tril_toeplitz": TrilToeplitz,
    "triu_toeplitz": TriuToeplitz,
    "tril_bottom_right_diag": TrilBottomRightDiag,
    "tril_top_left_diag": TrilTopLeftDiag,
    "triu_bottom_right_diag": TriuBottomRightDiag,
    "triu_top_left_diag": TriuTopLeftDiag,
}

#: options each class requires (all keyword, all positive integers)
_OPTIONS: dict[str, tuple[str, ...]] = {
    "block_diagonal": ("block_size",),
    "hierarchical": ("k1", "k2"),
}

#: aliases named like the published singd package
_ALIASES: dict[str, str] = {"triltoeplitz": "tril_toeplitz", "triutoeplitz": "triu_toeplitz"}
_BLOCK_RE = re.compile(r"block(\d+)diagonal")
_HIER_RE = re.compile(r"hierarchical(\d+)_(\d+)")


@dataclass(frozen=True)
class StructureType:
    """A structure class with its options bound (what ``get`` returns)."""

    name: str
    cls: type
    options: dict[str, int] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.name, self.cls, tuple(sorted(self.options.items()))))

    def eye(self, d: int, *, xp: Any, dtype: Any = None, device: Any = None) -> StructureOps:
        """The identity ``d × d`` in this structure."""
        return self.cls.eye(d, xp=xp, dtype=dtype, device=device, **self.options)

    def zeros(self, d: int, *, xp: Any, dtype: Any = None, device: Any = None) -> StructureOps:
        """The zero ``d × d`` matrix in this structure."""
        return self.cls.zeros(d, xp=xp, dtype=dtype, device=device, **self.options)

    def from_dense(self, S: Any) -> StructureOps:
        """The projection ``Π(S)`` of a symmetric ``d × d`` matrix."""
        return self.cls.from_dense(S, **self.options)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"StructureType({self.name!r}{', ' + opts if opts else ''})"


def names() -> tuple[str, ...]:
    """The canonical structure names (aliases ``block{b}diagonal``, ``hierarchical{k1}_{k2}``,
    ``triltoeplitz`` and ``triutoeplitz`` are accepted too)."""
    return tuple(_CLASSES)


def get(name: str | StructureType, **opts: Any) -> StructureType:
    """Look up a structure by name and bind its options.

    ``get("block_diagonal", block_size=30)`` and ``get("block30diagonal")`` are the same;
    likewise ``get("hierarchical", k1=15, k2=15)`` and ``get("hierarchical15_15")``.

    Raises:
        ValueError: unknown name (the message lists the known ones), missing/unknown options.
    """
    if isinstance(name, StructureType):
        if opts:
            raise ValueError(f"options {sorted(opts)} given together with a bound {name!r}")
        return name
    if not isinstance(name, str):
        raise TypeError(f"structure name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if (m := _BLOCK_RE.fullmatch(key)) is not None:
        if opts:
            raise ValueError(f"structure {name!r} takes no options, got {sorted(opts)}")
        key, opts = "block_diagonal", {"block_size": int(m.group(1))}
    elif (m := _HIER_RE.fullmatch(key)) is not None:
        if opts:
            raise ValueError(f"structure {name!r} takes no options, got {sorted(opts)}")
        key, opts = "hierarchical", {"k1": int(m.group(1)), "k2": int(m.group(2))}
    if key not in _CLASSES:
        known = ", ".join(names()) + ", block{b}diagonal, hierarchical{k1}_{k2}"
        raise ValueError(f"unknown structure {name!r}; known structures: {known}")
    wanted = _OPTIONS.get(key, ())
    missing = [o for o in wanted if o not in opts]
    extra = [o for o in opts if o not in wanted]
    if missing or extra:
        raise ValueError(
            f"structure {key!r} needs options {list(wanted)}; missing {missing}, unexpected {extra}"
        )
    for k, v in opts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"structure {key!r}: option {k} must be a positive integer, got {v!r}")
    return StructureType(key, _CLASSES[key], dict(opts))
