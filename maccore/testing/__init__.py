"""Testing tools for curvature code: exact float64 oracles, assertion helpers, conformance checks.

Public, for users verifying their own curvature implementation and for maccore's own tests. The
oracles are pure NumPy float64 (no autodiff); see ``docs/verify.md`` for a worked example.

- Exact oracles: :class:`MLPCase` (a token-wise MLP, optionally with weight sharing and a pooled
  output), :func:`mlp_io`, :func:`ggn_block`, :func:`ef_block`, :func:`backprop_grads`,
  :func:`reduction_factor`, :func:`commutation_matrix`, and the dense references
  :func:`dense_damped_inverse` and :func:`mac_dense_preconditioner`.
- Comparisons: :func:`allclose_report` / :func:`assert_close` (report the worst entries),
  :func:`to_numpy` (any backend array → float64 NumPy).
- :mod:`maccore.testing.conformance`: the cross-backend checks behind ``python -m maccore verify``.

Importing this package imports no array library: NumPy, and a framework (torch, jax, cupy) when a
conformance check runs on it, are imported inside the functions that use them. ``maccore.verify``
is the former name of the oracles and still works.
"""

from __future__ import annotations

from typing import Any

from maccore.testing._oracles import (
    ACTIVATIONS,
    LOSSES,
    MLPCase,
    allclose_report,
    assert_close,
    backprop_grads,
    commutation_matrix,
    dense_damped_inverse,
    ef_block,
    ggn_block,
    mac_dense_preconditioner,
    mlp_io,
    reduction_factor,
    to_numpy,
)

__all__ = [
    "LOSSES",
    "ACTIVATIONS",
    "MLPCase",
    "reduction_factor",
    "mlp_io",
    "ggn_block",
    "ef_block",
    "backprop_grads",
    "commutation_matrix",
    "dense_damped_inverse",
    "mac_dense_preconditioner",
    "allclose_report",
    "assert_close",
    "to_numpy",
]

_SUBMODULES = ("conformance",)


def __getattr__(name: str) -> Any:
    """``maccore.testing.conformance`` without an explicit import (loaded on first access)."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
