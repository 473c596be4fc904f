"""Dense float64 references for damped inverses, with error bounds (NumPy; never ``np.linalg.inv``).

Every reference here is computed by a backward-stable method (a symmetric eigendecomposition or an
LU solve with partial pivoting) or by a closed form, and each documents a bound on its own error
relative to the exact result of its float64 inputs. ``tests/testing/test_numerics.py`` checks every
bound against a 60-digit ``mpmath`` computation on ill-conditioned inputs.

Notation: ``ε = 2⁻⁵³`` (float64 unit roundoff), ``n`` the matrix size and
``κ = (λ_max(M) + λ) / (λ_min(M) + λ)`` the 2-norm condition number of the damped matrix
(:func:`condition_number`). Errors are relative Frobenius errors ``‖X̂ − X‖_F / ‖X‖_F``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "condition_number",
    "dense_damped_inverse",
    "dense_damped_solve",
    "mac_dense_preconditioner",
    "pi_dampings",
    "kfac_damped_matrix",
    "kfac_damped_solve",
    "kfac_condition_number",
    "inverse_error_bound",
    "mac_error_bound",
]

#: float64 unit roundoff ε = 2⁻⁵³.
EPS64 = 2.0**-53


def _np():
    import numpy as np

    return np


def _sym(M: Any, name: str = "M"):
    from maccore.testing._oracles import to_numpy

    np = _np()
    M = to_numpy(M)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {list(M.shape)}")
    if not np.all(np.isfinite(M)):
        raise ValueError(f"{name} has non-finite entries")
    return (M + M.T) / 2


def _check_damping(damping: Any, name: str = "damping") -> float:
    lam = float(damping)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {damping!r}")
    return lam


def condition_number(M: Any, damping: float = 0.0) -> float:
    """2-norm condition number ``κ = (λ_max + λ) / (λ_min + λ)`` of ``M + λI`` (``M`` symmetric).

    ``inf`` when ``M + λI`` is singular or indefinite. This is the ``cond`` to pass to
    :func:`maccore.testing.assert_curvature_close` when comparing anything computed from
    ``(M + λI)⁻¹``.
    """
    np = _np()
    lam = _check_damping(damping)
    w = np.linalg.eigvalsh(_sym(M))
    lo, hi = float(w[0]) + lam, float(w[-1]) + lam
    if lo <= 0:
        return math.inf
    return hi / lo


def inverse_error_bound(M: Any, damping: float) -> float:
    """Relative Frobenius error bound ``8·n·ε·κ`` of :func:`dense_damped_inverse` and
    :func:`dense_damped_solve` (``κ`` from :func:`condition_number`)."""
    n = _sym(M).shape[0]
    return 8.0 * n * EPS64 * condition_number(M, damping)


def dense_damped_inverse(M: Any, damping: float):
    """``(M + λI)⁻¹`` of a symmetric matrix in float64, by a symmetric eigendecomposition.

    ``M = Q diag(w) Qᵀ`` (``np.linalg.eigh`` of the symmetrised input), then
    ``Q diag(1/(w + λ)) Qᵀ``. The decomposition is backward stable, so the result is the exact
    inverse of ``M + E + λI`` with ``‖E‖₂ ≤ c·n·ε·‖M‖₂``.

    Error bound (checked against a 60-digit reference): ``‖X̂ − X‖_F / ‖X‖_F ≤ 8·n·ε·κ`` with
    ``κ = (λ_max + λ)/(λ_min + λ)`` (:func:`inverse_error_bound`). No result is more accurate than
    that from the entries of ``M`` alone: rounding ``M`` to float64 already moves the inverse by
    about ``ε·κ``.

    Raises:
        ValueError: ``M + λI`` is not positive definite (an eigenvalue ``w_i + λ ≤ 0``).
    """
    np = _np()
    lam = _check_damping(damping)
    w, Q = np.linalg.eigh(_sym(M))
    d = w + lam
    if d.size and float(d.min()) <= 0:
        raise ValueError(
            f"dense_damped_inverse: M + λI is not positive definite (smallest eigenvalue of M "
            f"{float(w.min()):.3e}, damping {lam:g})"
        )
    X = (Q / d) @ Q.T
    return (X + X.T) / 2


def dense_damped_solve(M: Any, rhs: Any, damping: float):
    """``(M + λI)⁻¹ rhs`` in float64 by an LU solve (``np.linalg.solve``, partial pivoting).

    ``rhs`` is a vector ``[n]`` or a matrix ``[n, k]``. Error bound:
    ``‖x̂ − x‖ / ‖x‖ ≤ 8·n·ε·κ`` (:func:`inverse_error_bound`).
    """
    from maccore.testing._oracles import to_numpy

    np = _np()
    lam = _check_damping(damping)
    Ms = _sym(M)
    b = to_numpy(rhs)
    if b.shape[0] != Ms.shape[0]:
        raise ValueError(f"rhs has {b.shape[0]} rows, M is {Ms.shape[0]}×{Ms.shape[0]}")
    return np.linalg.solve(Ms + lam * np.eye(Ms.shape[0]), b)


def mac_error_bound(mean: Any) -> float:
    """Relative Frobenius error bound ``8·(d + 4)·ε`` of :func:`mac_dense_preconditioner`
    (``d`` the length of ``ā``; independent of ``λ`` and of ``‖ā‖``)."""
    from maccore.testing._oracles import to_numpy

    d = to_numpy(mean).reshape(-1).shape[0]
    return 8.0 * (d + 4) * EPS64


def mac_dense_preconditioner(mean: Any, damping: float, *, scale: str = "reference"):
    """Dense ``λ(ââᵀ+λI)⁻¹`` (``scale="reference"``) or ``(ââᵀ+λI)⁻¹`` (``"inverse"``), float64.

    This is what :func:`maccore.mac_apply` multiplies by without forming it. Computed from the
    exact spectral decomposition of ``ââᵀ + λI`` rather than by inverting a matrix:
    with ``u = â/‖â‖``, the eigenvalue along ``u`` is ``‖â‖² + λ`` and every direction orthogonal
    to ``u`` has eigenvalue ``λ``, so ``(ââᵀ+λI)⁻¹ = (I − uuᵀ)/λ + uuᵀ/(‖â‖²+λ)``. No matrix is
    formed from ``ââᵀ``, so an ill-conditioned case (``‖â‖² ≫ λ``) loses no accuracy.

    Error bound (checked against a 60-digit reference): ``‖P̂ − P‖_F / ‖P‖_F ≤ 8·(d+4)·ε`` for
    every ``λ > 0`` and ``â`` (:func:`mac_error_bound`).
    """
    from maccore.testing._oracles import to_numpy

    np = _np()
    lam = _check_damping(damping)
    if lam == 0:
        raise ValueError("mac_dense_preconditioner: damping must be > 0")
    if scale not in ("reference", "inverse"):
        raise ValueError(f"scale must be 'reference' or 'inverse', got {scale!r}")
    a = to_numpy(mean).reshape(-1)
    d = a.shape[0]
    norm = float(np.linalg.norm(a))  # scaled, no overflow
    eye = np.eye(d)
    if norm == 0.0:
        return eye if scale == "reference" else eye / lam
    u = a / norm
    uu = np.outer(u, u)
    along = lam / (norm * norm + lam) if norm < 1e150 else 0.0  # λ/(‖â‖²+λ), the reference scale
    P = (eye - uu) + along * uu  # = λ(ââᵀ+λI)⁻¹
    return P if scale == "reference" else P / lam


def pi_dampings(A: Any, G: Any, damping: float) -> tuple[float, float]:
    """``(λ_A, λ_G)`` of factored Tikhonov (π-) damping, from its definition, in float64.

    ``π = sqrt((tr A / d_A) / (tr G / d_G))``, ``λ_A = π·√λ``, ``λ_G = √λ / π`` (so
    ``λ_A·λ_G = λ``). When either trace is not positive, ``π = 1`` (both dampings ``√λ``).
    """
    np = _np()
    lam = _check_damping(damping)
    A, G = _sym(A, "A"), _sym(G, "G")
    ta, tg = float(np.trace(A)) / A.shape[0], float(np.trace(G)) / G.shape[0]
    root = math.sqrt(lam)
    if not (ta > 0 and tg > 0):
        return root, root
    pi = math.sqrt(ta / tg)
    return pi * root, root / pi


def _dampings(A, G, damping, mode):
    if mode == "tikhonov":
        if isinstance(damping, tuple):
            lg, la = damping
            return _check_damping(la), _check_damping(lg)
        lam = _check_damping(damping)
        return lam, lam
    if isinstance(damping, tuple):
        raise ValueError(f"a (λ_G, λ_A) damping pair is only meaningful in mode 'tikhonov', not {mode!r}")
    if mode == "pi":
        return pi_dampings(A, G, damping)
    raise ValueError(f"mode must be 'tikhonov', 'pi' or 'exact', got {mode!r}")


def kfac_damped_matrix(A: Any, G: Any, damping: Any, *, mode: str = "tikhonov"):
    """The dense damped KFAC matrix whose inverse :func:`maccore.kfac_apply` applies (row-major vec).

    ``"tikhonov"``: ``(G + λ_G I) ⊗ (A + λ_A I)`` with ``λ_A = λ_G = λ`` or a pair ``(λ_G, λ_A)``;
    ``"pi"``: the same with the π-dampings of :func:`pi_dampings`; ``"exact"``: ``G ⊗ A + λI``.
    Small sizes only (``(d_out·d̃)²`` entries).
    """
    np = _np()
    A, G = _sym(A, "A"), _sym(G, "G")
    if mode == "exact":
        lam = _check_damping(damping)
        return np.kron(G, A) + lam * np.eye(A.shape[0] * G.shape[0])
    la, lg = _dampings(A, G, damping, mode)
    return np.kron(G + lg * np.eye(G.shape[0]), A + la * np.eye(A.shape[0]))


def kfac_condition_number(A: Any, G: Any, damping: Any, *, mode: str = "tikhonov") -> float:
    """Condition number of :func:`kfac_damped_matrix` from the factors' spectra (no dense matrix).

    The eigenvalues of ``(G + λ_G I) ⊗ (A + λ_A I)`` are the products ``(γ_i + λ_G)(a_j + λ_A)``;
    those of ``G ⊗ A + λI`` are ``γ_i a_j + λ``.
    """
    np = _np()
    A, G = _sym(A, "A"), _sym(G, "G")
    wa, wg = np.linalg.eigvalsh(A), np.linalg.eigvalsh(G)
    if mode == "exact":
        lam = _check_damping(damping)
        ev = np.outer(wg, wa).reshape(-1) + lam
    else:
        la, lg = _dampings(A, G, damping, mode)
        ev = np.outer(wg + lg, wa + la).reshape(-1)
    lo, hi = float(ev.min()), float(ev.max())
    return math.inf if lo <= 0 else hi / lo


def kfac_damped_solve(grad_mat: Any, A: Any, G: Any, damping: Any, *, mode: str = "tikhonov"):
    """Dense reference of :func:`maccore.kfac_apply`: ``vec⁻¹[K⁻¹ vec_r(∇W̃)]`` with
    ``K = kfac_damped_matrix(A, G, damping, mode=mode)``, by one LU solve of size ``d_out·d̃``.

    Error bound: ``8·n·ε·κ`` relative (``n = d_out·d̃``, ``κ`` from :func:`kfac_condition_number`).
    """
    from maccore.testing._oracles import to_numpy

    np = _np()
    g = to_numpy(grad_mat)
    A, G = _sym(A, "A"), _sym(G, "G")
    if g.shape != (G.shape[0], A.shape[0]):
        raise ValueError(f"grad_mat must have shape [d_out, d̃] = {[G.shape[0], A.shape[0]]}, got {list(g.shape)}")
    K = kfac_damped_matrix(A, G, damping, mode=mode)
    return np.linalg.solve(K, g.reshape(-1)).reshape(g.shape)
