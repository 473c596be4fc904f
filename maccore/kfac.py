"""Exact KFAC, the verification reference (docs/math.md; canonical split).

    A = E_rows[x̃ x̃ᵀ]                 (plain mean; independent of N and loss reduction)
    G = (1/R) Σ_rows gᵃ gᵃᵀ            (autograd gradients of L = R·Σ terms; R explicit)
    KFAC(vec_r W̃) = G ⊗ A,   natural gradient  G⁻¹ ∇W̃ A⁻¹

Damping modes of :func:`kfac_apply`:
    ``"tikhonov"``  (G + λ_G I)⁻¹ ∇W̃ (A + λ_A I)⁻¹ with λ_A = λ_G = λ (or a pair ``(λ_G, λ_A)``)
    ``"pi"``        factored Tikhonov: π = sqrt((tr A/d_A)/(tr G/d_G)), λ_A = π√λ, λ_G = √λ/π
                    (π = 1 when either trace is 0, so λ_A λ_G = λ always holds)
    ``"exact"``     (G ⊗ A + λ I)⁻¹ via eigendecompositions of A and G

Update-size control (KL clipping, as in kfac-pytorch; docs/kfac.md): with P_l the preconditioned
and G_l the raw gradient of layer l and η_l its learning rate,

    ν = min(1, sqrt(κ / Σ_l η_l² ⟨P_l, G_l⟩_F)),   P_l ← ν P_l   for every layer

(:func:`kl_clip_scale`; :func:`kl_clip_inner` + :func:`kl_clip_factor` when the layers are
visited one at a time). ν is a 0-d array: no host synchronisation.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import array_api_compat
import array_api_extra as xpx

from maccore import _delegate
from maccore._typing import Preconditioner
from maccore._xp import (
    Array,
    alias_keyword,
    check_damping,
    check_damping_range,
    check_decay,
    check_flag,
    check_floating,
    check_ndim,
    check_positive_int,
    check_xp,
    device_of,
    namespace,
    shape_str,
    to_stats,
)
from maccore.ema import EmaState, ema_debiased, ema_init, ema_update

__all__ = [
    "KFAC_MODES",
    "KfacState",
    "input_factor",
    "gradient_factor",
    "pi_dampings",
    "damped_inverse",
    "kfac_apply",
    "kfac_dense",
    "kfac",
    "kl_clip_factor",
    "kl_clip_inner",
    "kl_clip_scale",
]

KFAC_MODES = ("tikhonov", "pi", "exact")


class DecompositionError(RuntimeError):
    """A factor could not be inverted or eigendecomposed, even after the float64 retry."""


def input_factor(rows: Array) -> Array:
    """A = E_rows[x̃ x̃ᵀ] = rowsᵀ rows / R → ``[d̃, d̃]`` in the statistics dtype."""
    xp = namespace(rows=rows, where="input_factor", optional=())
    check_floating(xp, rows, "rows", "input_factor", integer_ok=True)
    check_ndim(rows, 2, "rows", "input_factor")
    if rows.shape[0] == 0:
        raise ValueError("input_factor: 'rows' has no rows (shape [0, ...])")
    r = to_stats(xp, rows)
    return (xp.matrix_transpose(r) @ r) / r.shape[0]


def gradient_factor(grad_rows: Array, *, reduction_factor: float) -> Array:
    """G = (1/R) Σ_rows g gᵀ for autograd gradients of L = R·Σ(terms) (docs/math.md; T2).

    Examples: mean-reduced CE over N samples → R = 1/N; summed MSE → R = 2. For type-II vectors that
    already carry √R, pass ``reduction_factor=1``.
    """
    xp = namespace(grad_rows=grad_rows, where="gradient_factor", optional=())
    check_floating(xp, grad_rows, "grad_rows", "gradient_factor", integer_ok=True)
    check_ndim(grad_rows, 2, "grad_rows", "gradient_factor")
    check_damping(reduction_factor, "reduction_factor", "gradient_factor", pair=False)
    g = to_stats(xp, grad_rows)
    return (xp.matrix_transpose(g) @ g) / reduction_factor


def _ns(x: Array) -> Any:
    return array_api_compat.array_namespace(x)


def _check_factor(m: Array, name: str, where: str) -> None:
    check_floating(_ns(m), m, name, where)
    check_ndim(m, 2, name, where)
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"{where}: factor {name!r} must be square, got shape {shape_str(m)}")


def pi_dampings(A: Array, G: Array, damping: Any) -> tuple[Array, Array]:
    """(λ_A, λ_G) of factored Tikhonov (π-) damping with λ_A·λ_G = λ (docs/math.md; T16)."""
    xp = namespace(A=A, G=G, where="pi_dampings", optional=())
    _check_factor(A, "A", "pi_dampings")
    _check_factor(G, "G", "pi_dampings")
    check_damping(damping, "damping", "pi_dampings", pair=False)
    ta = xp.sum(xp.linalg.diagonal(A)) / A.shape[0]
    tg = xp.sum(xp.linalg.diagonal(G)) / G.shape[0]
    ok = xp.logical_and(ta > 0, tg > 0)
    one = xp.ones_like(ta)
    # the ratio of the two traces may not be representable (tiny gradients, loss × 1e-20): π is
    # taken in the log domain and both dampings must come out positive and finite in the factors'
    # dtype; otherwise the split falls back to the equal one (π = 1), so λ_A·λ_G = λ always holds
    logs = (xp.log(xp.where(ok, ta, one)) - xp.log(xp.where(ok, tg, one))) / 2
    root = math.sqrt(damping)
    la, lg = root * xp.exp(logs), root * xp.exp(-logs)
    tiny = float(xp.finfo(la.dtype).smallest_normal)
    good = xp.logical_and(xp.logical_and(xp.isfinite(la), xp.isfinite(lg)),
                          xp.logical_and(la >= tiny, lg >= tiny))
    fallback = xp.full_like(la, root)
    return xp.where(good, la, fallback), xp.where(good, lg, fallback)


def _eye_like(xp: Any, m: Array) -> Array:
    return xp.eye(m.shape[0], dtype=m.dtype, device=device_of(m))


def _finite(xp: Any, x: Array) -> bool:
    try:
        return bool(xp.all(xp.isfinite(x)))
    except Exception:  # traced values (jax.jit): cannot inspect, trust the result
        return True


def damped_inverse(M: Array, damping: Any, *, name: str = "factor", checked: bool = True) -> Array:
    """``(M + λI)⁻¹`` of a symmetric PSD factor, symmetrised, in M's dtype (≥ float32).

    Numerical policy (``checked=True``): if the inverse fails or is non-finite in float32 it is
    retried in float64; if that fails too a :class:`DecompositionError` names the factor. Deciding
    that reads the result on the host (a device synchronisation on GPUs). ``checked=False``: one
    attempt, nothing read — an inverse that does not exist comes back non-finite (NaN), to be
    caught by whatever checks the result later (the torch optimizers read all the inverses of a
    refresh at once, and redo the failures checked).
    """
    xp = namespace(M=M, where="damped_inverse", optional=())
    _check_factor(M, name, "damped_inverse")
    check_flag(checked, "checked", "damped_inverse")
    check_damping(damping, "damping", "damped_inverse", pair=False, read=checked)
    Ms = to_stats(xp, M)
    check_damping_range(xp, damping, Ms.dtype, "damping", "damped_inverse")

    def attempt(x: Array) -> Array | None:
        try:
            inv = xp.linalg.inv(x + damping * _eye_like(xp, x))
        except Exception:
            return None
        inv = (inv + xp.matrix_transpose(inv)) / 2
        return inv if _finite(xp, inv) else None

    if not checked:
        inv = _delegate.inverse_unchecked(xp, Ms + damping * _eye_like(xp, Ms))
        return (inv + xp.matrix_transpose(inv)) / 2
    inv = attempt(Ms)
    if inv is None and Ms.dtype != xp.float64:
        inv64 = attempt(xp.astype(Ms, xp.float64))
        inv = None if inv64 is None else xp.astype(inv64, Ms.dtype)
        if inv is not None and not _finite(xp, inv):
            raise DecompositionError(
                f"damped_inverse: the inverse of {name} of shape {shape_str(M)} with damping "
                f"{damping!r} exists in float64 but overflows {Ms.dtype}; increase the damping"
            )
    if inv is None:
        raise DecompositionError(
            f"damped_inverse: could not invert {name} of shape {shape_str(M)} with damping {damping!r} "
            "(also failed in float64; check the statistics for NaN/Inf)"
        )
    return inv


def _eigh(xp: Any, M: Array, name: str, checked: bool = True) -> tuple[Array, Array]:
    """Eigendecomposition with the float64 retry; negative round-off eigenvalues clamp to 0.
    ``checked=False``: the result's finiteness is not read (a decomposition that raises is still
    retried; torch's own ``eigh`` reads its status on the host either way)."""

    def attempt(x):
        try:
            w, q = xp.linalg.eigh((x + xp.matrix_transpose(x)) / 2)
        except Exception:
            return None
        return (w, q) if not checked or (_finite(xp, w) and _finite(xp, q)) else None

    out = attempt(M)
    if out is None and M.dtype != xp.float64:
        out64 = attempt(xp.astype(M, xp.float64))
        out = None if out64 is None else (xp.astype(out64[0], M.dtype), xp.astype(out64[1], M.dtype))
    if out is None:
        raise DecompositionError(
            f"eigh failed for {name} of shape {shape_str(M)} (also in float64; check the "
            "statistics for NaN/Inf)"
        )
    w, q = out
    return xp.maximum(w, xp.zeros_like(w)), q


def _split_damping(xp: Any, A: Array, G: Array, damping: Any, mode: str) -> tuple[Any, Any]:
    if mode == "tikhonov":
        if isinstance(damping, tuple):
            return damping[1], damping[0]
        return damping, damping
    if isinstance(damping, tuple):
        raise ValueError(f"kfac: a (λ_G, λ_A) damping pair is only meaningful in mode 'tikhonov', not {mode!r}")
    return pi_dampings(A, G, damping)


def _check_apply_args(grad_mat, A, G, damping, mode, where):
    xp = namespace(grad_mat=grad_mat, A=A, G=G, where=where, optional=())
    check_floating(xp, grad_mat, "grad_mat", where)
    check_ndim(grad_mat, 2, "grad_mat", where)
    _check_factor(A, "A", where)
    _check_factor(G, "G", where)
    if mode not in KFAC_MODES:
        raise ValueError(f"{where}: mode must be one of {KFAC_MODES}, got {mode!r}")
    check_damping(damping, "damping", where, pair=mode == "tikhonov")
    d_out, d_t = grad_mat.shape
    if A.shape[0] != d_t or G.shape[0] != d_out:
        raise ValueError(
            f"{where}: 'grad_mat' of shape {shape_str(grad_mat)} needs A [{d_t}, {d_t}] and "
            f"G [{d_out}, {d_out}], got A {shape_str(A)} and G {shape_str(G)}"
        )
    return xp


def kfac_apply(grad_mat: Array, A: Array, G: Array, damping: Any, *, mode: str = "tikhonov") -> Array:
    """Precondition ``grad_mat [d_out, d̃]`` with the damped inverse of ``G ⊗ A`` (see module doc)."""
    where = "kfac_apply"
    xp = _check_apply_args(grad_mat, A, G, damping, mode, where)
    g = to_stats(xp, grad_mat)
    check_damping_range(xp, damping, g.dtype, "damping", where)
    As, Gs = to_stats(xp, A, g.dtype), to_stats(xp, G, g.dtype)
    if mode == "exact":
        wa, qa = _eigh(xp, As, "A")
        wg, qg = _eigh(xp, Gs, "G")
        u = _exact_apply(xp, g, qa, wa, qg, wg, damping)
    else:
        la, lg = _split_damping(xp, As, Gs, damping, mode)
        u = damped_inverse(Gs, lg, name="G") @ g @ damped_inverse(As, la, name="A")
    return u if u.dtype == grad_mat.dtype else xp.astype(u, grad_mat.dtype)


def _exact_apply(xp, g, qa, wa, qg, wg, damping):
    rot = xp.matrix_transpose(qg) @ g @ qa
    denom = xp.reshape(wg, (-1, 1)) * xp.reshape(wa, (1, -1)) + damping
    return qg @ (rot / denom) @ xp.matrix_transpose(qa)


def kfac_dense(A: Array, G: Array) -> Array:
    """``G ⊗ A``: the row-major-vec KFAC matrix (small sizes, verification only)."""
    xp = namespace(A=A, G=G, where="kfac_dense", optional=())
    _check_factor(A, "A", "kfac_dense")
    _check_factor(G, "G", "kfac_dense")
    return xpx.kron(G, A, xp=xp)


class KfacState(NamedTuple):
    """Per-layer KFAC state: EMAs of A and G and the cache built by ``refresh``.

    Modes ``tikhonov``/``pi``: ``a_inv``/``g_inv`` are the damped inverses and the ``*_evals`` are
    ``None``. Mode ``exact``: ``a_inv``/``g_inv`` hold the eigenvectors and ``a_evals``/``g_evals``
    the eigenvalues.
    """

    a: EmaState
    g: EmaState
    a_inv: Array
    g_inv: Array
    a_evals: Array | None = None
    g_evals: Array | None = None


def _check_state(state: Any, where: str) -> None:
    if not isinstance(state, KfacState):
        raise TypeError(f"{where}: state must be a maccore.KfacState, got {type(state).__name__}")


def kfac(*, decay: float = 0.95, damping: Any = 1e-3, mode: str = "tikhonov",
         stat_decay: float | None = None, damping_mode: str | None = None) -> Preconditioner:
    """The stateful exact-KFAC preconditioner of one layer.

    ``init(d_tilde, d_out, *, xp, dtype=None, device=None)``;
    ``update(state, rows=None, grad_rows=None, *, reduction_factor=None, A=None, G=None)``
    folds one batch's factors (from rows, or precomputed) into the EMAs;
    ``refresh(state, *, checked=True)`` debiases the EMAs and rebuilds the inverses/eigenbases
    (``checked=False``: nothing read on the host, :func:`damped_inverse`); ``apply(state, grad_mat)``;
    ``to_dense(state)`` is the damped dense curvature whose inverse ``apply`` multiplies with.
    ``stat_decay`` / ``damping_mode`` are the adapters' names for ``decay`` / ``mode``.
    """
    decay = alias_keyword(decay, 0.95, stat_decay, "decay", "stat_decay", "kfac")
    mode = alias_keyword(mode, "tikhonov", damping_mode, "mode", "damping_mode", "kfac")
    if mode not in KFAC_MODES:
        raise ValueError(f"kfac: mode must be one of {KFAC_MODES}, got {mode!r}")
    check_damping(damping, "damping", "kfac", pair=mode == "tikhonov")
    check_decay(decay, "decay", "kfac")

    def init(d_tilde: int, d_out: int, *, xp: Any, dtype: Any = None, device: Any = None) -> KfacState:
        check_xp(xp, "kfac.init")
        d_tilde = check_positive_int(d_tilde, "d_tilde", "kfac.init")
        d_out = check_positive_int(d_out, "d_out", "kfac.init")
        dtype = xp.float32 if dtype is None or dtype != xp.float64 else xp.float64
        a = ema_init((d_tilde, d_tilde), xp=xp, dtype=dtype, device=device)
        g = ema_init((d_out, d_out), xp=xp, dtype=dtype, device=device)
        ia = xp.eye(d_tilde, dtype=dtype, device=device)
        ig = xp.eye(d_out, dtype=dtype, device=device)
        if mode == "exact":
            return KfacState(a, g, ia, ig, xp.zeros((d_tilde,), dtype=dtype, device=device),
                             xp.zeros((d_out,), dtype=dtype, device=device))
        return KfacState(a, g, ia, ig)

    def update(state: KfacState, rows: Array | None = None, grad_rows: Array | None = None, *,
               reduction_factor: float | None = None, A: Array | None = None, G: Array | None = None) -> KfacState:
        _check_state(state, "kfac.update")
        if A is None:
            if rows is None:
                raise ValueError("kfac.update: give 'rows' or 'A'")
            A = input_factor(rows)
        if G is None:
            if grad_rows is None or reduction_factor is None:
                raise ValueError("kfac.update: give 'grad_rows' with 'reduction_factor', or 'G'")
            G = gradient_factor(grad_rows, reduction_factor=reduction_factor)
        for name, new, ema in (("A", A, state.a), ("G", G, state.g)):
            xp = namespace(**{name: new}, running=ema.value, where="kfac.update", optional=())
            check_floating(xp, new, name, "kfac.update")
            if tuple(new.shape) != tuple(ema.value.shape):
                raise ValueError(
                    f"kfac.update: batch factor {name} of shape {shape_str(new)} does not match the "
                    f"running factor of shape {shape_str(ema.value)}"
                )
        return state._replace(a=ema_update(state.a, A, decay=decay), g=ema_update(state.g, G, decay=decay))

    def refresh(state: KfacState, *, checked: bool = True) -> KfacState:
        _check_state(state, "kfac.refresh")
        xp = namespace(a=state.a.value, where="kfac.refresh")
        A = ema_debiased(state.a, decay=decay)
        G = ema_debiased(state.g, decay=decay)
        if mode == "exact":
            wa, qa = _eigh(xp, A, "A", checked)
            wg, qg = _eigh(xp, G, "G", checked)
            return state._replace(a_inv=qa, g_inv=qg, a_evals=wa, g_evals=wg)
        la, lg = _split_damping(xp, A, G, damping, mode)
        return state._replace(a_inv=damped_inverse(A, la, name="A", checked=checked),
                              g_inv=damped_inverse(G, lg, name="G", checked=checked))

    def apply(state: KfacState, grad_mat: Array) -> Array:
        _check_state(state, "kfac.apply")
        xp = namespace(grad_mat=grad_mat, a_inv=state.a_inv, where="kfac.apply", optional=())
        check_floating(xp, grad_mat, "grad_mat", "kfac.apply")
        check_ndim(grad_mat, 2, "grad_mat", "kfac.apply")
        if tuple(grad_mat.shape) != (state.g_inv.shape[0], state.a_inv.shape[0]):
            raise ValueError(
                f"kfac.apply: 'grad_mat' of shape {shape_str(grad_mat)} does not match the layer's "
                f"factors ([{state.g_inv.shape[0]}, {state.a_inv.shape[0]}])"
            )
        g = to_stats(xp, grad_mat, state.a_inv.dtype)
        if mode == "exact":
            u = _exact_apply(xp, g, state.a_inv, state.a_evals, state.g_inv, state.g_evals, damping)
        else:
            u = state.g_inv @ g @ state.a_inv
        return u if u.dtype == grad_mat.dtype else xp.astype(u, grad_mat.dtype)

    def to_dense(state: KfacState, d_out: int | None = None) -> Array:
        del d_out  # implied by the factors
        xp = namespace(a=state.a.value, where="kfac.to_dense")
        A = ema_debiased(state.a, decay=decay)
        G = ema_debiased(state.g, decay=decay)
        if mode == "exact":
            n = A.shape[0] * G.shape[0]
            return kfac_dense(A, G) + damping * xp.eye(n, dtype=A.dtype, device=device_of(A))
        la, lg = _split_damping(xp, A, G, damping, mode)
        return kfac_dense(A + la * _eye_like(xp, A), G + lg * _eye_like(xp, G))

    return Preconditioner(init, update, refresh, apply, to_dense)


# ---------------------------------------------------------------------------------------------
# update-size control: KL clipping


def _seq(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _check_kl_clip(kl_clip: Any, where: str) -> None:
    check_damping(kl_clip, "kl_clip", where, pair=False)


def kl_clip_inner(preconditioned: Any, grads: Any, *, lr: Any = 1.0) -> Array:
    """``Σ_i η_i² ⟨P_i, G_i⟩`` (elementwise products summed) as a 0-d array of the statistics dtype
    (≥ float32; float64 when an input is float64), on the arrays' device.

    ``preconditioned`` / ``grads``: one array or equally long sequences of arrays (the
    preconditioned and raw gradients of the same parameters, pairwise of one shape; a pair with
    ``None`` on both sides is left out). ``lr``: one learning rate η for all (a number or a 0-d
    array, e.g. traced under ``jax.jit``) or one per pair.
    """
    where = "kl_clip_inner"
    ps, gs = _seq(preconditioned), _seq(grads)
    if len(ps) != len(gs):
        raise ValueError(f"{where}: {len(ps)} preconditioned gradients but {len(gs)} gradients")
    lrs = _seq(lr) if isinstance(lr, (list, tuple)) else [lr] * len(ps)
    if len(lrs) != len(ps):
        raise ValueError(f"{where}: {len(lrs)} learning rates for {len(ps)} gradients")
    terms = []
    xp = None
    for i, (p, g, eta) in enumerate(zip(ps, gs, lrs)):
        if p is None and g is None:
            continue
        xp = namespace(preconditioned=p, grad=g, where=f"{where} (entry {i})", optional=())
        check_floating(xp, p, f"preconditioned[{i}]", where)
        check_floating(xp, g, f"grads[{i}]", where)
        if tuple(p.shape) != tuple(g.shape):
            raise ValueError(
                f"{where}: entry {i}: preconditioned gradient of shape {shape_str(p)} and gradient "
                f"of shape {shape_str(g)} differ"
            )
        dt = xp.result_type(to_stats(xp, p).dtype, to_stats(xp, g).dtype)
        dot = xp.sum(to_stats(xp, p, dt) * to_stats(xp, g, dt))
        terms.append(dot * (eta * eta))
    if xp is None:
        raise ValueError(f"{where}: no gradients given")
    return _sum0(xp, terms)


def _sum0(xp: Any, terms: list) -> Array:
    dt = terms[0].dtype
    for t in terms[1:]:
        dt = xp.result_type(dt, t.dtype)
    total = xp.astype(terms[0], dt)
    for t in terms[1:]:
        total = total + xp.astype(t, dt)
    return total


def kl_clip_factor(inner: Any, *, kl_clip: Any) -> Array:
    """ν = min(1, sqrt(κ / s)) for ``s`` = :func:`kl_clip_inner` (a 0-d array, or a sequence of
    partial sums, e.g. one per layer, which are added), κ = ``kl_clip`` > 0.

    Robust: ``s ≤ 0`` (a zero gradient, or a zero learning rate) and ``s = NaN`` give ν = 1 (no
    clipping: a non-finite gradient is the non-finite-step machinery's to catch); ``s = +∞`` (the
    update overflowed the statistics dtype) gives ν = 0. ν is always finite, in [0, 1], a 0-d
    array of ``s``'s dtype — no host synchronisation.
    """
    where = "kl_clip_factor"
    _check_kl_clip(kl_clip, where)
    terms = [t for t in _seq(inner) if t is not None]
    if not terms:
        raise ValueError(f"{where}: no inner product given")
    xp = namespace(**{f"inner{i}": t for i, t in enumerate(terms)}, where=where, optional=())
    for i, t in enumerate(terms):
        if t.ndim != 0:
            raise ValueError(f"{where}: inner products must be 0-d arrays, entry {i} has shape "
                             f"{shape_str(t)}")
        check_floating(xp, t, f"inner[{i}]", where)
    s = to_stats(xp, _sum0(xp, terms))
    one = xp.ones_like(s)
    ok = xp.logical_and(xp.isfinite(s), s > 0)
    nu = xp.minimum(one, xp.sqrt(kl_clip / xp.where(ok, s, one)))
    return xp.where(ok, nu, xp.where(s == xp.inf, xp.zeros_like(s), one))


def kl_clip_scale(preconditioned: Any, grads: Any, *, kl_clip: Any, lr: Any = 1.0) -> Array:
    """The KL-clipping factor ν = min(1, sqrt(κ / Σ_i η_i² ⟨P_i, G_i⟩)) of kfac-pytorch's
    ``kl_clip`` (docs/kfac.md): scale every preconditioned gradient by ν so that the step's
    second-order KL estimate η²⟨P, G⟩ stays below κ = ``kl_clip``.

    ``preconditioned`` / ``grads`` / ``lr``: as :func:`kl_clip_inner` (all preconditioned layers
    of the step together — the factor is global); the robust policy of :func:`kl_clip_factor`.
    Returns a 0-d array (statistics dtype, on the arrays' device).

    >>> import numpy as np
    >>> g = np.array([[3.0, 4.0]])
    >>> float(kl_clip_scale(2 * g, g, kl_clip=1e-3, lr=0.1))   # ⟨P, G⟩ = 50: sqrt(1e-3/0.5)
    0.044721...
    >>> float(kl_clip_scale(2 * g, g, kl_clip=1.0, lr=0.1))    # within the budget: ν = 1
    1.0
    """
    _check_kl_clip(kl_clip, "kl_clip_scale")
    return kl_clip_factor(kl_clip_inner(preconditioned, grads, lr=lr), kl_clip=kl_clip)
