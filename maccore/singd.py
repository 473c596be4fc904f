"""SINGD / IKFAC per-layer preconditioner (docs/math.md), backend-neutral.

State: structured factors ``K`` (input side, ``d̃ × d̃``) and ``C`` (output side, ``d_out × d_out``)
of a structure class (``maccore.structures``), initialised to ``I``, and their Riemannian momenta
``m_K``, ``m_C`` (``None`` when ``alpha1 = 0``). The preconditioned gradient is

    apply(state, ∇W̃) = C Cᵀ ∇W̃ K Kᵀ                                           (docs/math.md)

Statistics (docs/math.md). ``rows`` are the canonical input rows ``x̃`` ``[R, d̃]`` (bias column of ones
last); ``grad_rows`` are the autograd output-gradient rows ``g`` ``[R', d_out]`` of a loss
``L = reduction_factor · Σ terms``. They are rescaled so that ``aᵀa = A = E_r[x̃x̃ᵀ]`` and
``gᵀg = G = (1/reduction_factor) Σ g gᵀ`` (the canonical factors of §1.4/§1.6), and

    H_K = Π_K(Kᵀ A K),    H_C = Π_C(Cᵀ G C)

are computed structure-wise without forming ``A`` or ``G``.

Update (docs/math.md; ``s = ½``, or ``½(1 - α1)`` with ``normalize_lr_cov``; ``u`` the grad-scale
correction; ``λ`` the damping; ``avgtr(X) = tr(X)/dim``):

- INGD / SINGD (``kfac_like=False``)::

    m_K ← α1 m_K + s [u·avgtr(H_C)·H_K + λ·avgtr(Π_C(CᵀC))·Π_K(KᵀK) − I]
    m_C ← α1 m_C + s [u·avgtr(H_K)·H_C + λ·avgtr(Π_K(KᵀK))·Π_C(CᵀC) − I]

- IKFAC (``kfac_like=True``, forces ``α1 = 0``)::

    m_K ← s [H_K + λ Π_K(KᵀK) − I],     m_C ← s [u·H_C + λ Π_C(CᵀC) − I]

- then ``K ← K − β_K K m_K``, ``C ← C − β_C C m_C`` (i.e. ``K (I − β m)``) with ``β = lr_cov``,
  or ``β_K = β / max(1, max|m_K|)`` with ``normalize_lr_cov``.

No step counter lives in the state: the update period ``T`` and any ``lr_cov`` schedule belong to the
adapter, which passes the current value through ``update(..., lr_cov=...)``. The state holds no
cache, so ``refresh`` is the identity. Only matrix products, sums and traces are used (no inverse, no
decomposition), so the factors may be kept in bfloat16 (``preconditioner_dtype``): ``K``, ``m_K``,
``H_K`` and the input rows use ``dtype_K``; ``C``, ``m_C``, ``H_C`` and the gradient rows use
``dtype_C``; ``apply`` casts its result back to the gradient's dtype.

Dense factors (performance, same maths to round-off): the symmetric products ``KᵀK``, ``Kᵀ A K``,
``K Kᵀ`` compute their upper blocks only and mirror the lower one (:func:`_sym_mm`); ``H_K`` forms
``A = aᵀa`` first when the batch has more than ``2 d̃`` rows (``2R d̃²`` → about ``R d̃² + 2 d̃³``); and
``apply`` multiplies with ``C Cᵀ`` (or ``K Kᵀ``) instead of ``C`` then ``Cᵀ`` where the shapes make that
no dearer even for one apply (:class:`_OuterCache`: about ``d_out ≤ d̃``), the product kept between
preconditioner updates while the factor's array is unchanged (torch's version counter), so a new
or modified factor is never served a stale product and a cached result equals a fresh one.

``to_dense(state)`` returns the dense **inverse-curvature** approximation that ``apply`` multiplies
with, ``P = (C Cᵀ) ⊗ (K Kᵀ)`` in row-major ``vec`` (so ``vec_r(apply(G)) = P vec_r(G)``), in at least
float32.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from typing import Any, NamedTuple

import array_api_compat as compat

from maccore import structures as _structures
from maccore._typing import Preconditioner
from maccore._xp import check_positive_int, namespace, shape_str
from maccore.structures import StructureOps, StructureType
from maccore.structures.dense import Dense

__all__ = ["SingdState", "singd", "singd_statistics", "singd_input_statistics", "singd_grad_statistics"]

_WHERE = "singd"


class SingdState(NamedTuple):
    """Per-layer SINGD state (a pytree of structures; no step counter).

    ``K``: input-side factor ``[d̃, d̃]``; ``C``: output-side factor ``[d_out, d_out]``;
    ``m_K``, ``m_C``: their momenta (``None`` when ``alpha1 = 0``).
    """

    K: StructureOps
    C: StructureOps
    m_K: StructureOps | None
    m_C: StructureOps | None


# ---------------------------------------------------------------------------------------------
# validation helpers


def _check_number(value: Any, name: str, *, positive: bool, where: str = _WHERE) -> None:
    """Python numbers must be finite and > 0 (``positive``) or ≥ 0; arrays (traced) pass."""
    if compat.is_array_api_obj(value):
        if value.ndim != 0:
            raise ValueError(f"{where}: {name} must be a scalar, got shape {shape_str(value)}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {value!r}")
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        want = "positive" if positive else "non-negative"
        raise ValueError(f"{where}: {name} must be {want} and finite, got {value!r}")


def _is_array(value: Any) -> bool:
    """An array (not a Python or NumPy scalar number)."""
    return compat.is_array_api_obj(value) and not isinstance(value, numbers.Real)


def _readable(value: Any) -> float | None:
    """The value of a number or a 0-d array, ``None`` when it cannot be read (traced under jit)."""
    if not _is_array(value):
        return float(value)
    try:
        return float(value)
    except Exception:  # jax.errors.ConcretizationTypeError: a traced value
        return None


def _check_real(xp: Any, x: Any, name: str, where: str) -> None:
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{where}: argument {name!r} must have a real floating dtype, got {x.dtype} "
            f"(shape {shape_str(x)})"
        )


def _check_rows(x: Any, name: str, d: int, what: str, where: str) -> None:
    if x.ndim != 2 or x.shape[1] != d or x.shape[0] < 1:
        raise ValueError(
            f"{where}: argument {name!r} must have shape [R, {d}] (R ≥ 1, {what} = {d}), "
            f"got shape {shape_str(x)}"
        )


def _resolve_dtype(xp: Any, dt: Any, fallback: Any, name: str) -> Any:
    if dt is None:
        return fallback
    if isinstance(dt, str):
        if not hasattr(xp, dt):
            raise ValueError(f"{_WHERE}: {name}={dt!r} is not a dtype of {xp.__name__}")
        return getattr(xp, dt)
    return dt


def _as_structure_type(s: Any, name: str) -> StructureType:
    if isinstance(s, (str, StructureType)):
        return _structures.get(s)
    raise TypeError(
        f"{_WHERE}: {name} must be a structure name or maccore.structures.StructureType, got {s!r}"
    )


def _scaled(xp: Any, x: Any, scale: Any, dtype: Any) -> Any:
    """``x · scale`` computed in the wider of ``x.dtype`` and ``dtype``, then cast to ``dtype``."""
    wide = xp.result_type(x.dtype, dtype)
    y = (x if x.dtype == wide else xp.astype(x, wide)) * scale
    return y if y.dtype == dtype else xp.astype(y, dtype)


def _inv_sqrt(xp: Any, value: Any, dtype: Any) -> Any:
    """``1/sqrt(value)`` for a number (Python float) or a 0-d array (cast to ``dtype``)."""
    if compat.is_array_api_obj(value):
        v = value if value.dtype == dtype else xp.astype(value, dtype)
        return 1.0 / xp.sqrt(v)
    return 1.0 / math.sqrt(float(value))


# ---------------------------------------------------------------------------------------------
# dense fast paths (same maths as the structure methods, to round-off)

_SYM_SPLIT = 1024  # split a symmetric product into 2×2 blocks while its side is at least this


def _sym_mm(xp: Any, X: Any, Y: Any) -> Any:
    """``X @ Y`` (``[d, n] @ [n, d]``) for a product that is symmetric in exact arithmetic
    (``KᵀK``, ``Y Yᵀ``, ``Kᵀ(A K)``): the diagonal blocks (recursively) and the upper off-diagonal
    block are multiplied, the lower one is its transpose — 3/4 of the multiply-adds per level
    (5/8 for ``d ≥ 2·_SYM_SPLIT``). Entries equal those of ``X @ Y`` to round-off."""
    d = int(X.shape[0])
    if d < _SYM_SPLIT:
        return X @ Y
    h = d // 2
    S11 = _sym_mm(xp, X[:h, :], Y[:, :h])
    S12 = X[:h, :] @ Y[:, h:]
    S22 = _sym_mm(xp, X[h:, :], Y[:, h:])
    top = xp.concat([S11, S12], axis=1)
    bottom = xp.concat([xp.matrix_transpose(S12), S22], axis=1)
    return xp.concat([top, bottom], axis=0)


def _is_dense(F: Any) -> bool:
    return isinstance(F, Dense)


def _from_inner(F: StructureOps, X: Any = None) -> StructureOps:
    """``F.from_inner(X)`` = ``Π(Fᵀ X Xᵀ F)`` (``X = None``: ``Π(FᵀF)``); for a dense ``F`` with ``X``
    in its dtype through the cheaper symmetric route (``Π`` is the identity there).

    With ``X`` ``[d, R]``: ``(FᵀX)(FᵀX)ᵀ`` costs ``R d²`` plus the symmetric ``R d²``; forming
    ``X Xᵀ`` (symmetric) and then ``Fᵀ (X Xᵀ F)`` costs the symmetric ``R d²`` plus ``d³`` plus the
    symmetric ``d³``: chosen when ``R > 2 d`` (many rows per layer, as in early conv layers)."""
    if not _is_dense(F):
        return F.from_inner() if X is None else F.from_inner(X)
    xp = F.xp
    K = F.mat
    Kt = xp.matrix_transpose(K)
    if X is None:
        return Dense(_sym_mm(xp, Kt, K))
    if X.ndim != 2 or X.dtype != K.dtype or int(X.shape[0]) != F.dim:
        return F.from_inner(X)  # the structure validates / promotes
    d, R = int(X.shape[0]), int(X.shape[1])
    if R > 2 * d:
        A = _sym_mm(xp, X, xp.matrix_transpose(X))  # X Xᵀ
        return Dense(_sym_mm(xp, Kt, A @ K))
    Y = Kt @ X
    return Dense(_sym_mm(xp, Y, xp.matrix_transpose(Y)))


def _sym_cost(d: int) -> float:
    """Multiply-adds of :func:`_sym_mm` at side ``d`` relative to the plain product."""
    return 1.0 if d < _SYM_SPLIT else 0.25 + 0.5 * _sym_cost(d // 2)


class _OuterCache:
    """``F Fᵀ`` of dense factors for ``apply``: ``(F Fᵀ) X`` instead of ``F (Fᵀ X)``.

    The route depends on the shapes only: a factor of side ``d`` applied to ``X`` with ``n``
    columns goes through ``F Fᵀ`` when ``_sym_cost(d) · d ≤ n`` — then forming ``F Fᵀ`` and one
    product costs no more than the two products, even for a single apply — so a run and its
    resumed copy take the same route. The product is kept while the factor's array lives and is
    not written in place: keyed on ``id`` of the array with a weak reference (an entry leaves with
    its array) and checked against torch's version counter (``_version``). Arrays without one
    (NumPy, CuPy: writes are not visible) and JAX arrays (tracers under ``jit``) form ``F Fᵀ``
    afresh each time. A kept product is the one that would be formed again: bit for bit the same
    result, cached or not."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple] = {}  # id -> (weakref, version, F Fᵀ)

    @staticmethod
    def use(F: StructureOps, n: int) -> bool:
        return _is_dense(F) and _sym_cost(F.dim) * F.dim <= n

    @staticmethod
    def cacheable(arr: Any) -> bool:
        return (getattr(arr, "_version", None) is not None and not compat.is_jax_array(arr)
                and not getattr(arr, "requires_grad", False))

    def _retire(self, key: int, ref: Any) -> None:
        entry = self.entries.get(key)
        if entry is not None and entry[0] is ref:
            del self.entries[key]

    def outer(self, F: StructureOps, n: int) -> Any:
        """``F Fᵀ`` when that route is taken (see the class), else ``None``: use ``F (Fᵀ X)``."""
        if not self.use(F, n):
            return None
        xp, arr = F.xp, F.mat
        if not self.cacheable(arr):
            return _sym_mm(xp, arr, xp.matrix_transpose(arr))
        key, version = id(arr), arr._version
        entry = self.entries.get(key)
        if entry is not None and entry[0]() is arr and entry[1] == version:
            return entry[2]
        Q = _sym_mm(xp, arr, xp.matrix_transpose(arr))
        try:
            ref = weakref.ref(arr, lambda r, k=key: self._retire(k, r))
        except TypeError:
            return Q
        self.entries[key] = (ref, version, Q)
        return Q


# ---------------------------------------------------------------------------------------------
# statistics


def singd_statistics(
    state: SingdState, rows: Any, grad_rows: Any, *, reduction_factor: Any
) -> tuple[StructureOps, StructureOps]:
    """``(H_K, H_C) = (Π_K(Kᵀ A K), Π_C(Cᵀ G C))`` of one batch, in the factors' dtypes.

    Args:
        state: a :class:`SingdState`.
        rows: canonical input rows ``[R, d̃]`` (bias column of ones last); ``A = E_r[x̃x̃ᵀ]``.
        grad_rows: autograd output-gradient rows ``[R', d_out]`` of a loss
            ``L = reduction_factor · Σ terms``; ``G = (1/reduction_factor) Σ g gᵀ``.
        reduction_factor: the ``R`` of docs/math.md (``1`` for sum losses, ``1/#terms`` for means).

    With gradient accumulation, sum the returned statistics (``H + H'``) over micro-batches and pass
    them to ``update(..., statistics=(H_K, H_C))``.
    """
    return (singd_input_statistics(state, rows),
            singd_grad_statistics(state, grad_rows, reduction_factor=reduction_factor))


def _check_singd_state(state: Any, where: str) -> None:
    if not isinstance(state, SingdState):
        raise TypeError(f"{where}: state must be a SingdState, got {type(state).__name__}")


def singd_input_statistics(state: SingdState, rows: Any) -> StructureOps:
    """``H_K = Π_K(Kᵀ A K)`` of one batch of canonical input rows ``[R, d̃]`` (``A = E_r[x̃x̃ᵀ]``),
    in K's dtype, without forming ``A``."""
    where = f"{_WHERE}.statistics"
    _check_singd_state(state, where)
    K = state.K
    xp = namespace(rows=rows, K=K[0], where=where)
    _check_rows(rows, "rows", K.dim, "d̃ of K", where)
    _check_real(xp, rows, "rows", where)
    a = _scaled(xp, rows, 1.0 / math.sqrt(int(rows.shape[0])), K.dtype)  # aᵀa = A
    return _from_inner(K, xp.matrix_transpose(a))


def singd_grad_statistics(state: SingdState, grad_rows: Any, *, reduction_factor: Any) -> StructureOps:
    """``H_C = Π_C(Cᵀ G C)`` with ``G = (1/reduction_factor) Σ g gᵀ`` of one batch of output-gradient
    rows ``[R', d_out]``, in C's dtype, without forming ``G``."""
    where = f"{_WHERE}.statistics"
    _check_singd_state(state, where)
    C = state.C
    xp = namespace(grad_rows=grad_rows, C=C[0], where=where)
    _check_rows(grad_rows, "grad_rows", C.dim, "d_out of C", where)
    _check_real(xp, grad_rows, "grad_rows", where)
    _check_number(reduction_factor, "reduction_factor", positive=True, where=where)
    wide_g = xp.result_type(grad_rows.dtype, C.dtype)
    g = _scaled(xp, grad_rows, _inv_sqrt(xp, reduction_factor, wide_g), C.dtype)  # gᵀg = G
    return _from_inner(C, xp.matrix_transpose(g))


# ---------------------------------------------------------------------------------------------
# the factory


def singd(
    *,
    structures: tuple[Any, Any] = ("dense", "dense"),
    alpha1: float = 0.5,
    lr_cov: float = 1e-2,
    damping: float = 1e-3,
    kfac_like: bool = False,
    normalize_lr_cov: bool = False,
    preconditioner_dtype: tuple[Any, Any] = (None, None),
) -> Preconditioner:
    """SINGD preconditioner (docs/math.md) as ``init/update/refresh/apply/to_dense`` pure functions.

    Args:
        structures: ``(structure_K, structure_C)``, each a name of :func:`maccore.structures.get`
            (``"dense"``, ``"diagonal"``, ``"block30diagonal"``, ``"hierarchical15_15"``,
            ``"tril_toeplitz"``, …) or a bound :class:`~maccore.structures.StructureType`.
        alpha1: Riemannian momentum ``α1 ∈ [0, 1)`` (forced to 0 with ``kfac_like``).
        lr_cov: preconditioner learning rate ``β1 ≥ 0`` (override per call: ``update(lr_cov=)``).
        damping: ``λ ≥ 0``.
        kfac_like: use the IKFAC update instead of the INGD one.
        normalize_lr_cov: ``s = ½(1 − α1)`` and ``β_K = β1 / max(1, max|m_K|)`` (same for C).
        preconditioner_dtype: ``(dtype_K, dtype_C)``; ``None`` = the ``dtype`` given to ``init``.
            Strings (``"bfloat16"``) are looked up in the namespace.

    Returns:
        A :class:`maccore.Preconditioner`:

        - ``init(d_in_tilde, d_out, *, xp, dtype=None, device=None) -> SingdState``: ``dtype``
            defaults to float32; ``K = C = I``, momenta zero;
        - ``update(state, rows=None, grad_rows=None, *, reduction_factor=None, statistics=None,
            grad_scale_correction=1.0, lr_cov=None) -> SingdState``: one preconditioner step;
        - ``refresh(state) -> state`` (identity);
        - ``apply(state, grad_mat) -> C Cᵀ grad_mat K Kᵀ`` in the factor dtypes, cast back;
        - ``to_dense(state) -> (C Cᵀ) ⊗ (K Kᵀ)`` (row-major; the inverse-curvature view).
    """
    if not (isinstance(structures, (tuple, list)) and len(structures) == 2):
        raise ValueError(f"{_WHERE}: structures must be a pair (K, C), got {structures!r}")
    if not (isinstance(preconditioner_dtype, (tuple, list)) and len(preconditioner_dtype) == 2):
        raise ValueError(
            f"{_WHERE}: preconditioner_dtype must be a pair (dtype_K, dtype_C), "
            f"got {preconditioner_dtype!r}"
        )
    struct_K = _as_structure_type(structures[0], "structures[0]")
    struct_C = _as_structure_type(structures[1], "structures[1]")
    _check_number(alpha1, "alpha1", positive=False)
    _check_number(lr_cov, "lr_cov", positive=False)
    _check_number(damping, "damping", positive=False)
    # alpha1, lr_cov and damping may be 0-d arrays (optax.inject_hyperparams; traced under jit):
    # their values are checked where they can be read and never branched on otherwise. An array
    # alpha1 always keeps the momentum buffers (alpha1 = 0 then gives the same numbers).
    alpha1_value = _readable(alpha1)
    if alpha1_value is not None and not alpha1_value < 1:
        raise ValueError(f"{_WHERE}: alpha1 must lie in [0, 1), got {alpha1!r}")
    for name, v in (("lr_cov", lr_cov), ("damping", damping), ("alpha1", alpha1)):
        value = _readable(v)
        if _is_array(v) and value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{_WHERE}: {name} must be non-negative and finite, got {value!r}")
    if kfac_like:
        if alpha1_value is not None and alpha1_value != 0:
            warnings.warn(
                f"{_WHERE}: kfac_like=True uses no Riemannian momentum; alpha1={alpha1} is set "
                "to 0",
                UserWarning,
                stacklevel=2,
            )
        alpha1 = alpha1_value = 0.0
    array_alpha1 = _is_array(alpha1)
    alpha1 = alpha1 if array_alpha1 else float(alpha1)
    use_momentum = array_alpha1 or alpha1 != 0.0
    s = 0.5 * (1.0 - alpha1) if normalize_lr_cov else 0.5
    default_lr_cov = lr_cov if _is_array(lr_cov) else float(lr_cov)
    lam = damping if _is_array(damping) else float(damping)
    outer_cache = _OuterCache()  # K Kᵀ / C Cᵀ of dense factors between updates (apply)

    def init(d_in_tilde: int, d_out: int, *, xp: Any, dtype: Any = None, device: Any = None):
        d_in_tilde = check_positive_int(d_in_tilde, "d_in_tilde", "singd.init")
        d_out = check_positive_int(d_out, "d_out", "singd.init")
        xp = _structures._base.resolve_xp(xp)
        base = xp.float32 if dtype is None else dtype
        dt_K = _resolve_dtype(xp, preconditioner_dtype[0], base, "preconditioner_dtype[0]")
        dt_C = _resolve_dtype(xp, preconditioner_dtype[1], base, "preconditioner_dtype[1]")
        K = struct_K.eye(d_in_tilde, xp=xp, dtype=dt_K, device=device)
        C = struct_C.eye(d_out, xp=xp, dtype=dt_C, device=device)
        if use_momentum:
            m_K = struct_K.zeros(d_in_tilde, xp=xp, dtype=dt_K, device=device)
            m_C = struct_C.zeros(d_out, xp=xp, dtype=dt_C, device=device)
        else:
            m_K = m_C = None
        return SingdState(K, C, m_K, m_C)

    def _check_state(state: Any, where: str) -> None:
        if not isinstance(state, SingdState):
            raise TypeError(f"{where}: state must be a SingdState, got {type(state).__name__}")

    def _check_stat(H: Any, F: StructureOps, name: str, where: str) -> StructureOps:
        if type(H) is not type(F) or [p.shape for p in H] != [p.shape for p in F]:
            raise ValueError(
                f"{where}: statistics {name} must be a {F!r}-shaped {type(F).__name__}, got {H!r}"
            )
        return H.astype(F.dtype)

    def _coef(*factors: Any) -> Any:
        """The product of scalar factors (numbers and 0-d arrays; arrays in at least float32),
        applied to a factor in one pass instead of one pass per factor."""
        out = 1.0
        for f in factors:
            if compat.is_array_api_obj(f):
                xp = compat.array_namespace(f)
                if f.dtype not in (xp.float32, xp.float64):
                    f = xp.astype(f, xp.float32)
                if compat.is_array_api_obj(out) and out.dtype != f.dtype:
                    wide = xp.result_type(out.dtype, f.dtype)
                    out, f = xp.astype(out, wide), xp.astype(f, wide)
            out = out * f
        return out

    def _step(F, m, H, P, tr_other_H, tr_other_P, u, beta, factor_u: bool):
        """New (factor, momentum) for one side; see the module docstring.

        ``s·g`` is formed as ``c_H·H + c_P·P − s·I`` with the scalar factors multiplied first (one
        pass per term), and ``F − β F m`` as ``F + (−β)(F m)``: the same numbers to round-off."""
        if kfac_like:
            c_H = _coef(s, u) if factor_u else s
            c_P = _coef(s, lam)
        else:
            c_H = _coef(s, tr_other_H, u)
            c_P = _coef(s, tr_other_P, lam)
        sg = H.mul(c_H).add(P.mul(c_P)).diag_add(-s)
        m_new = sg if m is None else m.mul(alpha1).add(sg)
        if normalize_lr_cov:
            xp = F.xp
            mx = m_new.max_abs()
            mx = xp.astype(mx, xp.float64 if mx.dtype == xp.float64 else xp.float32)
            beta = beta / xp.maximum(mx, xp.ones_like(mx))
        F_new = F.add(F.compose(m_new).mul(-beta))
        return F_new, (m_new if use_momentum else None)

    def update(
        state: SingdState,
        rows: Any = None,
        grad_rows: Any = None,
        *,
        reduction_factor: Any = None,
        statistics: tuple[StructureOps, StructureOps] | None = None,
        grad_scale_correction: Any = 1.0,
        lr_cov: Any = None,
    ) -> SingdState:
        where = f"{_WHERE}.update"
        _check_state(state, where)
        if statistics is None:
            if rows is None or grad_rows is None or reduction_factor is None:
                raise ValueError(
                    f"{where}: pass rows, grad_rows and reduction_factor, or statistics=(H_K, H_C)"
                )
            H_K, H_C = singd_statistics(state, rows, grad_rows, reduction_factor=reduction_factor)
        else:
            if rows is not None or grad_rows is not None:
                raise ValueError(f"{where}: pass either rows/grad_rows or statistics, not both")
            if not (isinstance(statistics, (tuple, list)) and len(statistics) == 2):
                raise ValueError(f"{where}: statistics must be a pair (H_K, H_C)")
            H_K = _check_stat(statistics[0], state.K, "H_K", where)
            H_C = _check_stat(statistics[1], state.C, "H_C", where)
        beta = default_lr_cov if lr_cov is None else lr_cov
        _check_number(beta, "lr_cov", positive=False, where=where)
        _check_number(grad_scale_correction, "grad_scale_correction", positive=True, where=where)
        u = grad_scale_correction
        K, C = state.K, state.C
        P_K = _from_inner(K)  # Π_K(KᵀK)
        P_C = _from_inner(C)  # Π_C(CᵀC)
        tr = {}
        if not kfac_like:
            tr = {
                "HK": H_K.average_trace(),
                "HC": H_C.average_trace(),
                "PK": P_K.average_trace(),
                "PC": P_C.average_trace(),
            }
        K_new, m_K = _step(
            K, state.m_K, H_K, P_K, tr.get("HC"), tr.get("PC"), u, beta, factor_u=False
        )
        C_new, m_C = _step(
            C, state.m_C, H_C, P_C, tr.get("HK"), tr.get("PK"), u, beta, factor_u=True
        )
        return SingdState(K_new, C_new, m_K, m_C)

    def refresh(state: SingdState) -> SingdState:
        _check_state(state, f"{_WHERE}.refresh")
        return state

    def apply(state: SingdState, grad_mat: Any) -> Any:
        where = f"{_WHERE}.apply"
        _check_state(state, where)
        K, C = state.K, state.C
        xp = namespace(grad_mat=grad_mat, K=K[0], C=C[0], where=where)
        if grad_mat.ndim != 2 or tuple(grad_mat.shape) != (C.dim, K.dim):
            raise ValueError(
                f"{where}: argument 'grad_mat' must have shape [{C.dim}, {K.dim}] "
                f"([d_out, d̃]), got shape {shape_str(grad_mat)}"
            )
        _check_real(xp, grad_mat, "grad_mat", where)
        Gt = xp.matrix_transpose(grad_mat)
        Gt = Gt if Gt.dtype == K.dtype else xp.astype(Gt, K.dtype)
        QK = outer_cache.outer(K, C.dim)  # K Kᵀ, or None
        KKG = K.matmul(K.rmatmat(Gt)) if QK is None else QK @ Gt
        right = xp.matrix_transpose(KKG)  # ∇W̃ K Kᵀ
        right = right if right.dtype == C.dtype else xp.astype(right, C.dtype)
        QC = outer_cache.outer(C, K.dim)  # C Cᵀ, or None
        out = C.matmul(C.rmatmat(right)) if QC is None else QC @ right  # C Cᵀ ∇W̃ K Kᵀ
        return out if out.dtype == grad_mat.dtype else xp.astype(out, grad_mat.dtype)

    def to_dense(state: SingdState) -> Any:
        _check_state(state, f"{_WHERE}.to_dense")
        K, C = state.K, state.C
        xp = namespace(K=K[0], C=C[0], where=f"{_WHERE}.to_dense")
        wide = xp.float64 if xp.float64 in (K.dtype, C.dtype) else xp.float32
        Kd = xp.astype(K.to_dense(), wide)
        Cd = xp.astype(C.to_dense(), wide)
        KK = Kd @ xp.matrix_transpose(Kd)
        CC = Cd @ xp.matrix_transpose(Cd)
        n = C.dim * K.dim
        return xp.reshape(CC[:, None, :, None] * KK[None, :, None, :], (n, n))

    return Preconditioner(init=init, update=update, refresh=refresh, apply=apply, to_dense=to_dense)
