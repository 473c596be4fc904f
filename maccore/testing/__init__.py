"""Testing tools for curvature code: exact float64 oracles, assertion helpers, conformance checks.

Public, for users verifying their own curvature implementation and for maccore's own tests. The
oracles are pure NumPy float64 (no autodiff); see ``docs/verify.md`` for a worked example.

- Exact oracles: :class:`MLPCase` (a token-wise MLP, optionally with weight sharing and a pooled
  output), :func:`mlp_io`, :func:`ggn_block`, :func:`ef_block`, :func:`backprop_grads`,
  :func:`reduction_factor`, :func:`commutation_matrix`.
- Dense damped inverses computed stably, each with a documented error bound (checked against a
  60-digit ``mpmath`` reference in the tests): :func:`dense_damped_inverse`,
  :func:`dense_damped_solve`, :func:`mac_dense_preconditioner`, :func:`kfac_damped_matrix`,
  :func:`kfac_damped_solve`, π-damping from its definition (:func:`pi_dampings`), condition
  numbers (:func:`condition_number`, :func:`kfac_condition_number`) and the bounds
  (:func:`inverse_error_bound`, :func:`mac_error_bound`).
- Comparisons: :func:`assert_curvature_close` / :func:`curvature_report` (relative Frobenius
  error, tolerance ``1024·ε(dtype)·max(1, κ)``, :func:`curvature_tolerance`), and the entrywise
  :func:`allclose_report` / :func:`assert_close`; :func:`to_numpy` (any backend array → float64
  NumPy).
- :mod:`maccore.testing.convert`: curvlinops / BackPACK / kfac-jax layouts and scalings → maccore's.
- :mod:`maccore.testing.strategies`: Hypothesis strategies (layers, conv geometries, batches with
  ``R ≠ 1``, dampings, ill-conditioned activations); needs ``hypothesis`` only when used.
- :mod:`maccore.testing.conformance`: the cross-backend checks behind ``python -m maccore verify``;
  :mod:`maccore.testing.adapters_check`: the adapter checks behind ``verify --adapters``.

Model-level references (every Linear / Conv2d block of a torch module or a Flax model, by
autodiff in float64) live in the adapters: ``maccore_torch.testing.curvature_blocks`` and
``maccore_jax.testing.curvature_blocks``.

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
from maccore.testing._assert import (
    assert_curvature_close,
    curvature_report,
    curvature_tolerance,
    unit_roundoff,
)
from maccore.testing._numerics import (
    condition_number,
    dense_damped_solve,
    inverse_error_bound,
    kfac_condition_number,
    kfac_damped_matrix,
    kfac_damped_solve,
    mac_error_bound,
    pi_dampings,
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
    "dense_damped_solve",
    "kfac_damped_matrix",
    "kfac_damped_solve",
    "pi_dampings",
    "condition_number",
    "kfac_condition_number",
    "inverse_error_bound",
    "mac_error_bound",
    "assert_curvature_close",
    "curvature_report",
    "curvature_tolerance",
    "unit_roundoff",
    "allclose_report",
    "assert_close",
    "to_numpy",
]

_SUBMODULES = ("conformance", "convert", "strategies", "against", "adapters_check")


def __getattr__(name: str) -> Any:
    """``maccore.testing.conformance`` / ``convert`` / ``strategies`` / ``against`` without an
    explicit import (loaded on first access)."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
