"""Shared types: the ``Preconditioner`` tuple of pure functions (optax style)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple


class Preconditioner(NamedTuple):
    """A per-layer preconditioner as four pure functions plus a dense view for verification.

    - ``init(d_in_tilde, d_out, *, xp, dtype=None, device=None, **kw) -> state``
    - ``update(state, rows, grad_rows=None, **kw) -> state``: fold one batch of statistics into the
      running averages (no cache rebuild).
    - ``refresh(state) -> state``: rebuild the cache that ``apply`` reads (debiased mean, inverses,
      ...).
    - ``apply(state, grad_mat) -> grad_mat``: precondition a ``[d_out, d̃]`` gradient matrix.
    - ``to_dense(state, d_out) -> [d_out·d̃, d_out·d̃]`` (row-major vec), tests and oracles only:
      for MAC and KFAC the damped curvature matrix whose inverse ``apply`` multiplies with; for
      SINGD, which never forms a curvature, the preconditioner itself ``(CCᵀ) ⊗ (KKᵀ)`` that
      ``apply`` multiplies with.

    The states are NamedTuples of arrays, i.e. pytrees; no step counter lives inside them.
    """

    init: Callable[..., Any]
    update: Callable[..., Any]
    refresh: Callable[[Any], Any]
    apply: Callable[[Any, Any], Any]
    to_dense: Callable[[Any], Any]
