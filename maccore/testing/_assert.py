"""``assert_curvature_close``: compare curvature (blocks, factors, preconditioned gradients) with a
tolerance that follows the dtype and the conditioning, and a report that helps find the bug.

Tolerance (relative Frobenius error ``‖actual − desired‖_F / ‖desired‖_F``)::

    tol = 1024 · ε(dtype) · max(1, κ)

``ε`` is the unit roundoff of the dtype the *actual* values were computed in (float64 ``1.1e-16``,
float32 ``6.0e-8``, float16 ``4.9e-4``, bfloat16 ``3.9e-3``) and ``κ`` (``cond``) the condition number
of the matrix that was inverted to get them (``1`` for the curvature itself; see
:func:`maccore.testing.condition_number` and :func:`maccore.testing.kfac_condition_number`). The
factor ``1024 = 2¹⁰`` covers the rounding a correct implementation accumulates in sums over up to
about a million rows (errors grow like √rows in practice) plus the error of the float64 reference
(whose bounds are ``8·n·ε₆₄·κ``). For float32 the tolerance is ``6.1e-5·κ``: curvature bugs (a missing
reduction factor, a summed instead of averaged factor, a wrong Kronecker order or bias position, a
wrong damping) are relative errors of order one and stay far above it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

__all__ = ["assert_curvature_close", "curvature_report", "curvature_tolerance", "unit_roundoff"]

#: Safety factor of the tolerance formula (see the module docstring).
TOLERANCE_FACTOR = 1024.0

_ROUNDOFF = (  # checked in this order: "bfloat16" contains "float16"
    ("bfloat16", 2.0**-8),
    ("float16", 2.0**-11),
    ("half", 2.0**-11),
    ("float64", 2.0**-53),
    ("double", 2.0**-53),
    ("float32", 2.0**-24),
)


def _np():
    import numpy as np

    return np


def unit_roundoff(dtype: Any) -> float:
    """Unit roundoff ``ε`` of a floating dtype: a name (``"float32"``), a NumPy / torch / JAX
    dtype, or an array (its dtype is used). float64 ``2⁻⁵³``, float32 ``2⁻²⁴``, float16 ``2⁻¹¹``,
    bfloat16 ``2⁻⁸``."""
    if hasattr(dtype, "dtype") and not isinstance(dtype, type):
        dtype = dtype.dtype
    name = str(getattr(dtype, "__name__", dtype)).lower()
    if name.startswith("<class"):
        name = name.split("'")[1]
    name = name.rsplit(".", 1)[-1]
    for key, eps in _ROUNDOFF:
        if key in name:
            return eps
    if name in ("float", "single"):  # torch.float is float32
        return 2.0**-24
    raise ValueError(f"unknown floating dtype {dtype!r}: pass float64, float32, float16 or bfloat16")


def curvature_tolerance(dtype: Any, cond: float | None = None) -> float:
    """``1024 · ε(dtype) · max(1, cond)``: the relative Frobenius tolerance of
    :func:`assert_curvature_close`."""
    k = 1.0 if cond is None else float(cond)
    if math.isnan(k) or k < 0:
        raise ValueError(f"cond must be >= 0 (a condition number), got {cond!r}")
    return TOLERANCE_FACTOR * unit_roundoff(dtype) * max(1.0, k)


def _fmt_pos(pos) -> str:
    return "(" + ", ".join(str(int(p)) for p in pos) + ")"


def _hints(a, d, tol: float) -> list[str]:
    """Diagnoses of common curvature bugs from the shape of the mismatch."""
    np = _np()
    out: list[str] = []
    dd = float(np.vdot(d, d))
    if dd > 0:
        c = float(np.vdot(a, d)) / dd
        resid = float(np.linalg.norm(a - c * d)) / max(float(np.linalg.norm(a)), 1e-300)
        if resid <= max(tol, 1e-12) and abs(c - 1.0) > tol:
            out.append(
                f"actual ≈ {c:.6g} × desired (residual {resid:.1e}): a pure scale error — a missing "
                "or extra reduction factor R, a sum where a mean belongs (or the reverse), or a "
                "library convention (e.g. a factor 2 for MSE)"
            )
    if a.ndim == 2 and a.shape[0] == a.shape[1]:
        if float(np.linalg.norm(a.T - d)) <= tol * max(float(np.linalg.norm(d)), 1e-300) and \
                float(np.linalg.norm(a - d)) > tol * float(np.linalg.norm(d)):
            out.append("actual ≈ desiredᵀ: transposed")
    if not out and a.size == d.size:
        sa, sd = np.sort(a.reshape(-1)), np.sort(d.reshape(-1))
        nd = max(float(np.linalg.norm(sd)), 1e-300)
        if float(np.linalg.norm(sa - sd)) <= max(tol, 1e-12) * nd:
            out.append(
                "the same entries in different positions: an ordering bug — Kronecker order "
                "(kron(A, G) instead of kron(G, A) for row-major vec), the bias first instead of "
                "last, or column- instead of row-major vec (maccore.testing.convert reorders)"
            )
    return out


def _compare(actual: Any, desired: Any, *, tol: float, top: int) -> tuple[bool, float, str]:
    from maccore.testing._oracles import to_numpy

    np = _np()
    a, d = to_numpy(actual), to_numpy(desired)
    if a.shape != d.shape:
        extra = " (same number of entries: a reshape or layout difference?)" if a.size == d.size else ""
        return False, math.inf, f"shape mismatch: actual {list(a.shape)} vs desired {list(d.shape)}{extra}"
    if not np.all(np.isfinite(a)):
        bad = int((~np.isfinite(a)).sum())
        return False, math.inf, f"actual has {bad} non-finite entries of {a.size}"
    if not np.all(np.isfinite(d)):
        raise ValueError("desired has non-finite entries: the reference itself is broken")
    nd = float(np.linalg.norm(d))
    diff = a - d
    ne = float(np.linalg.norm(diff))
    if nd == 0.0:
        # nothing to be relative to: every entry of actual must be (numerically) zero
        ok = ne == 0.0
        head = f"desired is all zeros; ‖actual‖_F = {ne:.3e}" + ("" if ok else " (must be 0)")
        return ok, (0.0 if ok else math.inf), head
    rel = ne / nd
    ok = rel <= tol
    head = (f"relative Frobenius error {rel:.3e} {'<=' if ok else '>'} tolerance {tol:.3e}; "
            f"‖actual‖_F = {float(np.linalg.norm(a)):.6e}, ‖desired‖_F = {nd:.6e}")
    if ok:
        return True, rel, head
    lines = [head]
    for h in _hints(a, d, tol):
        lines.append("  hint: " + h)
    scale = float(np.abs(d).max())
    err = np.abs(diff).reshape(-1)
    idx = [i for i in np.argsort(err)[::-1][:top] if err[i] > 0]
    lines.append("  worst entries (error relative to max|desired| = " + f"{scale:.3e}):")
    for flat in idx:
        pos = np.unravel_index(int(flat), a.shape)
        lines.append(
            f"    at {_fmt_pos(pos)}: actual {a[pos]: .6e}, desired {d[pos]: .6e}, "
            f"error {err[flat] / scale:.2e}"
        )
    bad = int((np.abs(diff) > tol * scale).sum())
    lines.append(f"  {bad}/{a.size} entries are off by more than tolerance × max|desired|")
    return False, rel, "\n".join(lines)


def _walk(actual: Any, desired: Any, path: str, key: Any = None):
    """Yield (path, top-level key, actual_leaf, desired_leaf) over matching mappings / sequences."""
    if isinstance(desired, Mapping):
        if not isinstance(actual, Mapping):
            raise AssertionError(f"{path or 'value'}: desired is a mapping, actual is {type(actual).__name__}")
        missing = [k for k in desired if k not in actual]
        extra = [k for k in actual if k not in desired]
        if missing or extra:
            raise AssertionError(
                f"{path or 'value'}: keys differ — missing in actual {missing}, unexpected {extra}"
            )
        for k in desired:
            yield from _walk(actual[k], desired[k], f"{path}[{k!r}]", k if key is None else key)
    elif isinstance(desired, (tuple, list)):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(desired):
            raise AssertionError(f"{path or 'value'}: desired is a sequence of {len(desired)}, actual is not")
        names = ("A", "G") if len(desired) == 2 else tuple(str(i) for i in range(len(desired)))
        for i, (x, y) in enumerate(zip(actual, desired)):
            yield from _walk(x, y, f"{path}[{names[i]}]", key)
    else:
        yield path, key, actual, desired


def curvature_report(actual: Any, desired: Any, *, dtype: Any, cond: Any = None,
                     rtol: float | None = None, top: int = 5) -> tuple[bool, float, str]:
    """``(ok, worst relative Frobenius error, report)`` — :func:`assert_curvature_close` without
    raising. Arguments as there."""
    lines: list[str] = []
    ok_all, worst = True, 0.0
    eps = unit_roundoff(dtype)
    leaves = list(_walk(actual, desired, ""))
    for path, key, a, d in leaves:
        c = cond.get(key, None) if isinstance(cond, Mapping) else cond
        tol = rtol if rtol is not None else curvature_tolerance(dtype, c)
        if tol >= 0.5:
            warnings.warn(
                f"{path or 'value'}: tolerance {tol:.2g} (ε = {eps:.2g}, κ = {c}) cannot detect "
                "errors; compare in float64 or with a larger damping",
                RuntimeWarning, stacklevel=3)
        ok, rel, msg = _compare(a, d, tol=tol, top=top)
        ok_all &= ok
        worst = max(worst, rel)
        if not ok or len(leaves) == 1:
            lines.append((f"{path}: " if path else "") + msg)
    kappa = "per entry" if isinstance(cond, Mapping) else f"{1.0 if cond is None else float(cond):.3g}"
    formula = ("tolerance = " + (f"rtol {rtol:g}" if rtol is not None else
               f"1024·ε·max(1, κ), ε = {eps:.3g}, κ = {kappa}"))
    if ok_all and len(leaves) > 1:
        lines.append(f"{len(leaves)} arrays match (worst relative Frobenius error {worst:.3e})")
    lines.append(formula)
    return ok_all, worst, "\n".join(lines)


def assert_curvature_close(actual: Any, desired: Any, *, dtype: Any, cond: Any = None,
                           rtol: float | None = None, what: str = "", top: int = 5) -> float:
    """Raise ``AssertionError`` unless ``actual`` matches the reference ``desired``; return the
    worst relative Frobenius error.

    The error is ``‖actual − desired‖_F / ‖desired‖_F`` (both converted to float64 NumPy), compared
    with ``tol = 1024 · ε(dtype) · max(1, cond)`` (module docstring of
    :mod:`maccore.testing._assert`; ``docs/verify.md``). A correct float32 implementation of a
    curvature block, KFAC factor or preconditioned gradient passes; the usual bugs do not.

    Args:
        actual: the values under test: an array of any backend, or a mapping / tuple of them (e.g.
            ``{layer: block}`` or ``{layer: (A, G)}``), compared entry by entry.
        desired: the float64 reference (same structure), e.g. from
            ``maccore_torch.testing.curvature_blocks``.
        dtype: the dtype ``actual`` was computed in (``"float32"``, ``torch.float32``,
            ``np.float64``, or an array).
        cond: the condition number of the matrix inverted to obtain ``actual`` (``None``: nothing
            was inverted). A mapping gives one per key.
        rtol: override the tolerance formula.
        what: prefix for the error message.
        top: number of worst entries listed.

    The report names the relative error, the norms, the ``top`` worst entries (scaled by
    ``max|desired|``, so zero entries never produce huge ratios) and, when the mismatch has a
    recognisable shape, a hint: a pure scale error (``actual = c·desired``), a transpose, or the
    same entries in other positions (an ordering bug).
    """
    ok, worst, msg = curvature_report(actual, desired, dtype=dtype, cond=cond, rtol=rtol, top=top)
    if not ok:
        raise AssertionError((f"{what}: " if what else "") + "curvature mismatch\n" + msg)
    return worst
