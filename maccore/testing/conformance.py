"""Cross-backend conformance checks behind ``python -m maccore verify``.

Every check computes something with the core on one backend (numpy, array_api_strict, torch CPU/CUDA,
jax, cupy: whatever is installed) and compares it with an exact float64 NumPy oracle from
:mod:`maccore.testing` or with an independent NumPy reference. The error reported is the largest
absolute deviation divided by ``max(1, max|oracle|)``; a check passes when that error stays below a
tolerance derived from the dtype (float64: 1e-9, float32: 2e-4).

Families:

- ``kfac.exact.*``: the exactness propositions of KFAC (``docs/verify.md``: deep linear nets, expand and reduce
  settings with weight sharing, a single datum through a nonlinear net): ``G ⊗ A`` built from the
  canonical rows equals the exact GGN / empirical-Fisher block. ``kfac.control.*`` are negative
  controls: an approximation that must *not* match (they pass when the error is large).
- ``kfac.apply.*``: the three damping modes of :func:`maccore.kfac_apply` against the dense
  inverse of the damped Kronecker matrix, and the stateful :func:`maccore.kfac` against its
  ``to_dense``.
- ``mac.*``: MAC properties (rank-1 vs dense inverse, spectrum, zero mean,
  bias entry and EMA weights, attention-weighted means).
- ``rows.*``: im2col against a naive loop oracle and the convolution it encodes.
- ``singd.structures``: the SINGD structure classes' projections and products.
- ``agree.*``: the backend's result equals NumPy's result for the same core call.

The checks never import a framework at module import time: backends are loaded with
:mod:`importlib` inside :func:`available_backends`, so ``import maccore.testing`` stays
framework-free.

Example (NumPy only, so it runs anywhere):

>>> from maccore.testing.conformance import run_checks
>>> results = run_checks(backends=["numpy"], dtypes=["float64"])
>>> all(r.passed for r in results)
True

A perturbed oracle must make the checks fail (this is how the harness itself is tested):

>>> bad = run_checks(backends=["numpy"], dtypes=["float64"],
...                  perturb=lambda name, oracle: oracle * 1.01 + 0.01)
>>> any(not r.passed for r in bad)
True
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "BACKENDS",
    "Backend",
    "CheckResult",
    "CheckInfo",
    "available_backends",
    "check_names",
    "check_details",
    "run_checks",
    "format_table",
    "format_details",
]

#: Backend names understood by :func:`available_backends` (``torch`` covers CPU and CUDA).
BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "cupy")

#: Tolerances on the scaled error, by dtype name.
TOLERANCES = {"float64": 1e-9, "float32": 2e-4}

Perturb = Callable[[str, Any], Any]


def _np():
    import numpy as np

    return np


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------


@dataclass
class Backend:
    """One array library on one device: how to move float64 NumPy data there and back."""

    name: str
    xp: Any
    device: Any = None
    label: str = ""
    dtypes: tuple[str, ...] = ("float64", "float32")
    enter: Callable[[], Any] | None = None  # e.g. enable jax x64; returns a restore callable

    def asarray(self, a: Any, dtype: str) -> Any:
        np = _np()
        a = np.asarray(a)
        if a.dtype.kind in "fc":
            a = a.astype(np.float64)
            return self.xp.asarray(a, dtype=getattr(self.xp, dtype), device=self.device)
        if a.dtype.kind == "b":
            return self.xp.asarray(a, device=self.device)
        return self.xp.asarray(a, dtype=self.xp.int64 if dtype == "float64" else self.xp.int32,
                               device=self.device)

    def to_numpy(self, x: Any) -> Any:
        from maccore.testing._oracles import to_numpy

        return to_numpy(x)


def _compat_ns(arr: Any) -> Any:
    import array_api_compat

    return array_api_compat.array_namespace(arr)


def _load(name: str) -> list[Backend]:
    """Backends (one per device) for library ``name``; ``[]`` when it is not installed."""
    try:
        if name == "numpy":
            np = importlib.import_module("numpy")
            return [Backend("numpy", _compat_ns(np.empty(0)), None, "numpy")]
        if name == "array_api_strict":
            strict = importlib.import_module("array_api_strict")
            return [Backend("array_api_strict", strict, None, "array_api_strict")]
        if name == "torch":
            torch = importlib.import_module("torch")
            xp = _compat_ns(torch.empty(0))
            out = [Backend("torch", xp, torch.device("cpu"), "torch:cpu")]
            if torch.cuda.is_available():
                out.append(Backend("torch", xp, torch.device("cuda"), "torch:cuda"))
            return out
        if name == "jax":
            jax = importlib.import_module("jax")
            jnp = importlib.import_module("jax.numpy")

            def enter() -> Callable[[], None]:
                old = bool(jax.config.read("jax_enable_x64"))
                jax.config.update("jax_enable_x64", True)
                return lambda: jax.config.update("jax_enable_x64", old)

            dev = jax.devices()[0]
            return [Backend("jax", _compat_ns(jnp.empty(0)), dev, f"jax:{dev.platform}", enter=enter)]
        if name == "cupy":
            cupy = importlib.import_module("cupy")
            if cupy.cuda.runtime.getDeviceCount() < 1:
                return []
            return [Backend("cupy", _compat_ns(cupy.empty(0)), None, "cupy:cuda")]
    except Exception:  # not installed, or no usable device
        return []
    raise ValueError(f"unknown backend {name!r}; known: {BACKENDS}")


def available_backends(names: Iterable[str] | None = None) -> list[Backend]:
    """Installed backends among ``names`` (default: all of :data:`BACKENDS`), one per device."""
    names = BACKENDS if names is None else tuple(names)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; known: {list(BACKENDS)}")
    out: list[Backend] = []
    for n in names:
        out.extend(_load(n))
    return out


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    """Outcome of one check on one backend and dtype.

    ``error``: worst scaled error (``None`` if the check raised); ``passed``: within tolerance
    (negative controls: *outside* it); ``detail``: exception text or a note.
    """

    check: str
    backend: str
    dtype: str
    error: float | None
    tol: float
    passed: bool
    negative: bool = False
    detail: str = ""


@dataclass
class _Ctx:
    backend: Backend
    dtype: str
    perturb: Perturb | None
    rng: Any = field(default=None)

    def arr(self, a: Any) -> Any:
        return self.backend.asarray(a, self.dtype)

    def np(self, x: Any) -> Any:
        return self.backend.to_numpy(x)

    def oracle(self, name: str, value: Any) -> Any:
        np = _np()
        value = np.asarray(value, dtype=np.float64)
        return value if self.perturb is None else np.asarray(self.perturb(name, value), np.float64)


def _err(actual: Any, desired: Any) -> float:
    np = _np()
    a, d = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    if a.shape != d.shape:
        raise AssertionError(f"shape mismatch: {list(a.shape)} vs oracle {list(d.shape)}")
    if not a.size:
        return 0.0
    diff = np.abs(a - d)
    if not np.all(np.isfinite(diff)):
        return math.inf
    return float(diff.max() / max(1.0, float(np.abs(d).max())))


# ----------------------------------------------------------------------------------------------
# Checks. Each returns the worst scaled error over its cases.
# ----------------------------------------------------------------------------------------------

_CHECKS: list[tuple[str, Callable[[_Ctx], float], bool, str]] = []


def _check(name: str, *, negative: bool = False, doc: str = ""):
    def deco(fn):
        _CHECKS.append((name, fn, negative, doc or (fn.__doc__ or "").strip().splitlines()[0]))
        return fn

    return deco


def check_names() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every check, in run order."""
    return [(n, d) for n, _, _, d in _CHECKS]


@dataclass(frozen=True)
class CheckInfo:
    """What a check compares: the propositions it tests (labels of ``docs/math.md``), the problem
    sizes it runs on and the oracle it compares with."""

    name: str
    propositions: str
    sizes: str
    oracle: str


_DEEP = "deep linear net 5→6→4→3 with biases, N=4 samples × S=3 tokens"
_DETAILS = {
    "kfac.exact.deep_linear_expand": (
        "P-K2, P-K3", f"{_DEEP}; MSE sum and mean (R = 2, 2/36)",
        "exact GGN blocks from explicit Jacobians (testing.ggn_block), blocks 36², 28², 15²"),
    "kfac.exact.deep_linear_reduce": (
        "P-K4", f"{_DEEP}, tokens pooled (sum, mean) before MSE sum / mean: 4 settings",
        "exact GGN blocks (testing.ggn_block)"),
    "kfac.exact.single_datum": (
        "P-K1", "one datum through a tanh MLP 5→6→4→3; CE and BCE (mean)",
        "exact GGN and empirical-Fisher blocks (testing.ggn_block / ef_block)"),
    "kfac.control.expand_in_reduce": (
        "P-K4 (negative control)", f"{_DEEP}, mean pooling, MSE sum; layer 0 (36×36 block)",
        "exact GGN block; must differ by > 1e-3"),
    "kfac.apply.tikhonov": (
        "P-K11a", "A 5×5, G 4×4, gradient 4×5; λ = 0.1 and the pair (λ_G, λ_A) = (0.3, 0.05)",
        "LU solve with the dense 20×20 matrix (G+λ_G I)⊗(A+λ_A I)"),
    "kfac.apply.pi": (
        "P-K11b", "A 5×5 (trace scale 10), G 4×4 (scale 0.01), gradient 4×5; λ = 0.2",
        "π from its definition + LU solve with the dense 20×20 damped matrix"),
    "kfac.apply.exact": (
        "P-K11c", "A 5×5, G 4×4, gradient 4×5; λ = 0.05",
        "LU solve with the dense 20×20 matrix G⊗A + λI"),
    "kfac.stateful.to_dense": (
        "P-K11, T9", "rows 12×5, gradient rows 12×3, two EMA updates (β = 0.9), λ = 0.1, 3 modes",
        "float64 EMA of the batch factors with explicit debiasing + dense 15×15 solve"),
    "mac.rank1_vs_dense": (
        "M-P1", "gradient 6×5, ā ∈ R⁵, λ ∈ {0.5, 3}, both scales; 3 heads × 2 rows; SMAC diagonal",
        "λ(āāᵀ+λI)⁻¹ from its closed-form spectral decomposition (testing.mac_dense_preconditioner)"),
    "mac.spectrum": (
        "M-P2", "d̃ = 6, λ = 0.8, one row along ā and one orthogonal to it",
        "the eigenvalues λ/(λ+‖ā‖²) and 1 in closed form"),
    "mac.zero_mean_identity": ("M-P4", "gradient 4×7, ā = 0, λ = 1", "the identity"),
    "mac.ema_bias_entry": (
        "M-P5, M-P6", "3 batches of 7×4 inputs (+ bias), β = 0.9",
        "explicit EMA weights (1−β)β^(k−i)/(1−β^k); bias entry exactly 1"),
    "mac.attention": (
        "M-P8", "B = 2, H = 3 heads, N = 4 tokens, d_h = 5; inputs 2×4×6; causal and not",
        "NumPy softmax and the per-head weighted-mean definition"),
    "rows.conv2d_im2col": (
        "M-P9, T6", "x 2×3×7×6; kernels 3×3 and 2×3; strides, padding, dilation varied",
        "a naive loop im2col and a direct convolution"),
    "singd.structures": (
        "S-T3", "6×6 symmetric matrix, X 6×3, every registered structure",
        "closed-form projections Π and NumPy products"),
    "agree.numpy": (
        "M-P10", "rows of a 3×2×6×6 image batch and a 3×4×5 sequence, 4×6 gradient, 6×6 / 4×4 factors",
        "NumPy's float64 result of the same core calls"),
}


def check_details() -> list[CheckInfo]:
    """:class:`CheckInfo` of every check, in run order (what ``python -m maccore verify`` prints)."""
    out = []
    for name, doc in check_names():
        props, sizes, oracle = _DETAILS.get(name, ("", "", doc))
        out.append(CheckInfo(name, props, sizes, oracle))
    return out


def format_details(infos: Sequence[CheckInfo] | None = None) -> str:
    """One paragraph per check: propositions (``docs/math.md``), problem sizes, oracle."""
    infos = check_details() if infos is None else infos
    lines = []
    for info in infos:
        lines.append(f"{info.name}  [{info.propositions}]" if info.propositions else info.name)
        lines.append(f"    sizes:  {info.sizes}")
        lines.append(f"    oracle: {info.oracle}")
    return "\n".join(lines)


def _deep_linear(rng, *, n=4, s=3, d=5, widths=(6, 4, 3), bias=True):
    ws, bs, d_in = [], [], d
    for w in widths:
        ws.append(rng.standard_normal((w, d_in)) / math.sqrt(d_in))
        bs.append(rng.standard_normal(w) if bias else None)
        d_in = w
    return ws, bs, rng.standard_normal((n, s, d))


def _kfac_vs_block(ctx: _Ctx, case, *, reduce: bool, fisher: str = "type2") -> float:
    """Worst error of ``G ⊗ A`` (factors computed on the backend) vs the exact block, all layers."""
    import maccore as mc
    from maccore.testing import _oracles as V

    np = _np()
    inputs, _, _ = V.mlp_io(case)
    R = V.reduction_factor(case)
    worst = 0.0
    for layer in range(len(case.weights)):
        g = V.backprop_grads(case, layer, fisher=fisher)  # [K, N, S, d_out]
        bias = case.biases[layer] is not None
        rows = mc.linear_rows(ctx.arr(inputs[layer]), bias=bias, reduce=reduce)
        grows = [mc.grad_rows(ctx.arr(g[k]), reduce=reduce) for k in range(g.shape[0])]
        xp = ctx.backend.xp
        gr = xp.concat(grows, axis=0) if len(grows) > 1 else grows[0]
        A = mc.input_factor(rows)
        G = mc.gradient_factor(gr, reduction_factor=R)
        kf = ctx.np(mc.kfac_dense(A, G))
        block = V.ggn_block(case, layer) if fisher == "type2" else V.ef_block(case, layer)
        worst = max(worst, _err(kf, ctx.oracle(f"block{layer}", block)))
    del np
    return worst


@_check("kfac.exact.deep_linear_expand")
def _kfac_expand(ctx: _Ctx) -> float:
    """P-K2/P-K3: type-II KFAC-expand == exact GGN, deep linear net with weight sharing (MSE sum/mean)."""
    from maccore.testing import _oracles as V

    worst = 0.0
    for red in ("sum", "mean"):
        ws, bs, x = _deep_linear(ctx.rng)
        y = ctx.rng.standard_normal(x.shape[:2] + (ws[-1].shape[0],))
        case = V.MLPCase(ws, bs, x, y, loss="mse", reduction=red, setting="expand")
        worst = max(worst, _kfac_vs_block(ctx, case, reduce=False))
    return worst


@_check("kfac.exact.deep_linear_reduce")
def _kfac_reduce(ctx: _Ctx) -> float:
    """P-K4: type-II KFAC-reduce == exact GGN when the shared axis is pooled (sum/mean) before MSE."""
    from maccore.testing import _oracles as V

    worst = 0.0
    for red in ("sum", "mean"):
        for pool in ("sum", "mean"):
            ws, bs, x = _deep_linear(ctx.rng)
            y = ctx.rng.standard_normal((x.shape[0], 1, ws[-1].shape[0]))
            case = V.MLPCase(ws, bs, x, y, loss="mse", reduction=red, setting="reduce", pool=pool)
            worst = max(worst, _kfac_vs_block(ctx, case, reduce=True))
    return worst


@_check("kfac.exact.single_datum")
def _kfac_single(ctx: _Ctx) -> float:
    """P-K1: one datum through a tanh MLP, CE and BCE: type-II KFAC == GGN and EF-KFAC == EF."""
    from maccore.testing import _oracles as V

    np = _np()
    worst = 0.0
    for loss in ("ce", "bce"):
        ws, bs, x = _deep_linear(ctx.rng, n=1, s=1)
        c = ws[-1].shape[0]
        y = np.zeros((1, 1, c))
        y[0, 0, 1] = 1.0
        case = V.MLPCase(ws, bs, x, y, loss=loss, reduction="mean", activation="tanh")
        worst = max(worst, _kfac_vs_block(ctx, case, reduce=False))
        worst = max(worst, _kfac_vs_block(ctx, case, reduce=False, fisher="empirical"))
    return worst


@_check("kfac.control.expand_in_reduce", negative=True)
def _kfac_control(ctx: _Ctx) -> float:
    """Negative control: KFAC-expand is NOT the GGN in the reduce setting (must differ)."""
    from maccore.testing import _oracles as V

    ws, bs, x = _deep_linear(ctx.rng)
    y = ctx.rng.standard_normal((x.shape[0], 1, ws[-1].shape[0]))
    case = V.MLPCase(ws, bs, x, y, loss="mse", reduction="sum", setting="reduce", pool="mean")
    # expand-style rows (one per token, no pooling) for the first layer: not exact here
    import maccore as mc

    inputs, _, _ = V.mlp_io(case)
    g = V.backprop_grads(case, 0)
    rows = mc.linear_rows(ctx.arr(inputs[0]), bias=True)
    xp = ctx.backend.xp
    gr = xp.concat([mc.grad_rows(ctx.arr(g[k])) for k in range(g.shape[0])], axis=0)
    A = mc.input_factor(rows)
    G = mc.gradient_factor(gr, reduction_factor=V.reduction_factor(case))
    return _err(ctx.np(mc.kfac_dense(A, G)), ctx.oracle("block0", V.ggn_block(case, 0)))


def _spd(rng, n: int, scale: float = 1.0):
    m = rng.standard_normal((n, 2 * n))
    return scale * (m @ m.T) / (2 * n)


def _dense_solve(M, grad):
    np = _np()
    return np.linalg.solve(M, grad.reshape(-1)).reshape(grad.shape)


@_check("kfac.apply.tikhonov")
def _kfac_tikhonov(ctx: _Ctx) -> float:
    """P-K11a: kfac_apply(mode='tikhonov') == dense ((G+λI)⊗(A+λI))⁻¹ vec(∇W̃), also a (λ_G, λ_A) pair."""
    import maccore as mc

    np = _np()
    A, G = _spd(ctx.rng, 5), _spd(ctx.rng, 4, 3.0)
    grad = ctx.rng.standard_normal((4, 5))
    worst = 0.0
    for lam in (0.1, (0.3, 0.05)):
        lg, la = lam if isinstance(lam, tuple) else (lam, lam)
        u = mc.kfac_apply(ctx.arr(grad), ctx.arr(A), ctx.arr(G), lam, mode="tikhonov")
        dense = np.kron(G + lg * np.eye(4), A + la * np.eye(5))
        worst = max(worst, _err(ctx.np(u), ctx.oracle("tikhonov", _dense_solve(dense, grad))))
    return worst


@_check("kfac.apply.pi")
def _kfac_pi(ctx: _Ctx) -> float:
    """P-K11b: π-damping: λ_A = π√λ, λ_G = √λ/π, π² = (tr A/d_A)/(tr G/d_G); vs the dense inverse."""
    import maccore as mc

    np = _np()
    A, G = _spd(ctx.rng, 5, 10.0), _spd(ctx.rng, 4, 0.01)
    grad = ctx.rng.standard_normal((4, 5))
    lam = 0.2
    pi = math.sqrt((np.trace(A) / 5) / (np.trace(G) / 4))
    la, lg = pi * math.sqrt(lam), math.sqrt(lam) / pi
    u = mc.kfac_apply(ctx.arr(grad), ctx.arr(A), ctx.arr(G), lam, mode="pi")
    dense = np.kron(G + lg * np.eye(4), A + la * np.eye(5))
    scale = max(1.0, float(np.abs(_dense_solve(dense, grad)).max()))
    return _err(ctx.np(u) / scale, ctx.oracle("pi", _dense_solve(dense, grad)) / scale)


@_check("kfac.apply.exact")
def _kfac_exact(ctx: _Ctx) -> float:
    """P-K11c: kfac_apply(mode='exact') == (G⊗A + λI)⁻¹ vec(∇W̃) (eigendecompositions)."""
    import maccore as mc

    np = _np()
    A, G = _spd(ctx.rng, 5), _spd(ctx.rng, 4, 2.0)
    grad = ctx.rng.standard_normal((4, 5))
    lam = 0.05
    u = mc.kfac_apply(ctx.arr(grad), ctx.arr(A), ctx.arr(G), lam, mode="exact")
    dense = np.kron(G, A) + lam * np.eye(20)
    return _err(ctx.np(u), ctx.oracle("exact", _dense_solve(dense, grad)))


@_check("kfac.stateful.to_dense")
def _kfac_stateful(ctx: _Ctx) -> float:
    """kfac(): update → refresh → apply equals the dense damped curvature's inverse (all modes)."""
    import maccore as mc

    np = _np()
    worst = 0.0
    rows = ctx.rng.standard_normal((12, 5))
    rows[:, -1] = 1.0
    grows = ctx.rng.standard_normal((12, 3))
    grad = ctx.rng.standard_normal((3, 5))
    for mode in ("tikhonov", "pi", "exact"):
        pc = mc.kfac(decay=0.9, damping=0.1, mode=mode)
        xp = ctx.backend.xp
        st = pc.init(5, 3, xp=xp, dtype=getattr(xp, ctx.dtype), device=ctx.backend.device)
        st = pc.update(st, ctx.arr(rows), ctx.arr(grows), reduction_factor=1.0 / 12)
        st = pc.update(st, ctx.arr(rows[::-1] * 0.5), ctx.arr(grows * 2.0), reduction_factor=1.0 / 12)
        st = pc.refresh(st)
        u = ctx.np(pc.apply(st, ctx.arr(grad)))
        dense = ctx.np(pc.to_dense(st))
        # oracle built independently: debiased EMA of the two batch factors, float64
        A1, A2 = rows.T @ rows / 12, (rows[::-1] * 0.5).T @ (rows[::-1] * 0.5) / 12
        G1, G2 = 12 * grows.T @ grows, 12 * 4 * grows.T @ grows
        w = 1 - 0.9**2
        A = (0.9 * 0.1 * A1 + 0.1 * A2) / w
        G = (0.9 * 0.1 * G1 + 0.1 * G2) / w
        if mode == "exact":
            ref = np.kron(G, A) + 0.1 * np.eye(15)
        else:
            if mode == "pi":
                pi = math.sqrt((np.trace(A) / 5) / (np.trace(G) / 3))
                la, lg = pi * math.sqrt(0.1), math.sqrt(0.1) / pi
            else:
                la = lg = 0.1
            ref = np.kron(G + lg * np.eye(3), A + la * np.eye(5))
        scale = max(1.0, float(np.abs(ref).max()))
        worst = max(worst, _err(dense / scale, ctx.oracle(f"dense_{mode}", ref) / scale))
        worst = max(worst, _err(u, ctx.oracle(f"apply_{mode}", _dense_solve(ref, grad))))
    return worst


@_check("mac.rank1_vs_dense")
def _mac_rank1(ctx: _Ctx) -> float:
    """M-P1: rank-1 mac_apply == ∇W̃ · λ(ââᵀ+λI)⁻¹ (reference) and (ââᵀ+λI)⁻¹ (inverse); per-head."""
    import maccore as mc
    from maccore.testing import _oracles as V

    np = _np()
    grad = ctx.rng.standard_normal((6, 5))
    a = ctx.rng.standard_normal(5)
    worst = 0.0
    for scale in ("reference", "inverse"):
        for lam in (0.5, 3.0):
            u = mc.mac_apply(ctx.arr(grad), ctx.arr(a), lam, scale=scale)
            ref = grad @ V.mac_dense_preconditioner(a, lam, scale=scale)
            worst = max(worst, _err(ctx.np(u), ctx.oracle(f"mac_{scale}", ref)))
    heads = ctx.rng.standard_normal((3, 5))  # 3 heads x 2 rows each
    u = mc.mac_apply(ctx.arr(grad), ctx.arr(heads), 0.7)
    ref = np.concatenate(
        [grad[2 * h : 2 * h + 2] @ V.mac_dense_preconditioner(heads[h], 0.7) for h in range(3)]
    )
    worst = max(worst, _err(ctx.np(u), ctx.oracle("mac_heads", ref)))
    z = ctx.rng.uniform(0.1, 2.0, size=6)
    u = mc.mac_apply(ctx.arr(grad), ctx.arr(a), 0.5, grad_diag=ctx.arr(z))
    ref = np.diag(1 / (z + 0.5)) @ grad @ V.mac_dense_preconditioner(a, 0.5)
    return max(worst, _err(ctx.np(u), ctx.oracle("smac", ref)))


@_check("mac.spectrum")
def _mac_spectrum(ctx: _Ctx) -> float:
    """M-P2: P â = λ/(λ+‖â‖²) â and P v = v for v ⊥ â (rows of ∇W̃ along and orthogonal to â)."""
    import maccore as mc

    np = _np()
    a = ctx.rng.standard_normal(6)
    v = ctx.rng.standard_normal(6)
    v = v - (v @ a) / (a @ a) * a
    lam = 0.8
    u = ctx.np(mc.mac_apply(ctx.arr(np.stack([a, v])), ctx.arr(a), lam))
    ref = np.stack([lam / (lam + a @ a) * a, v])
    return _err(u, ctx.oracle("spectrum", ref))


@_check("mac.zero_mean_identity")
def _mac_zero(ctx: _Ctx) -> float:
    """M-P4: â = 0 ⇒ P = I: mac_apply returns ∇W̃ unchanged (MAC ≡ its base optimizer)."""
    import maccore as mc

    np = _np()
    grad = ctx.rng.standard_normal((4, 7))
    u = mc.mac_apply(ctx.arr(grad), ctx.arr(np.zeros(7)), 1.0)
    return _err(ctx.np(u), ctx.oracle("identity", grad))


@_check("mac.ema_bias_entry")
def _mac_ema(ctx: _Ctx) -> float:
    """M-P5/M-P6: after EMA + debiasing, â = Σ w_i ā_i (w_i = (1−β)β^{k−i}/(1−β^k)) and â_bias = 1."""
    import maccore as mc

    np = _np()
    beta = 0.9
    pc = mc.mac(decay=beta, damping=1.0)
    xp = ctx.backend.xp
    st = pc.init(5, xp=xp, dtype=getattr(xp, ctx.dtype), device=ctx.backend.device)
    means = []
    for _ in range(3):
        x = ctx.rng.standard_normal((7, 4)) + 2.0
        rows = mc.linear_rows(ctx.arr(x), bias=True)
        means.append(np.concatenate([x.mean(axis=0), [1.0]]))
        st = pc.update(st, rows)
    st = pc.refresh(st)
    k = len(means)
    w = [(1 - beta) * beta ** (k - 1 - i) / (1 - beta**k) for i in range(k)]
    ref = sum(wi * m for wi, m in zip(w, means))
    got = ctx.np(st.mean_hat)
    return max(_err(got, ctx.oracle("ema", ref)), abs(float(got[-1]) - 1.0))


@_check("mac.attention")
def _mac_attention(ctx: _Ctx) -> float:
    """M-P8 and §3.5: softmax(qkᵀ/√d) vs NumPy; uniform attention ⇒ v̄ = ā; per-head == reference."""
    import maccore as mc

    np = _np()
    b, h, n, dh = 2, 3, 4, 5
    q = ctx.rng.standard_normal((b, h, n, dh))
    k = ctx.rng.standard_normal((b, h, n, dh))
    worst = 0.0
    for causal in (False, True):
        s = q @ np.swapaxes(k, -1, -2) / math.sqrt(dh)
        if causal:
            s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        ref = e / e.sum(axis=-1, keepdims=True)
        got = ctx.np(mc.attention_probs(ctx.arr(q), ctx.arr(k), causal=causal))
        worst = max(worst, _err(got, ctx.oracle("softmax", ref)))
    x = ctx.rng.standard_normal((b, n, 6))
    uniform = np.full((b, h, n, n), 1.0 / n)
    got = ctx.np(mc.attention_weighted_mean(ctx.arr(x), ctx.arr(uniform), bias=True))
    abar = np.concatenate([x.reshape(-1, 6).mean(axis=0), [1.0]])
    worst = max(worst, _err(got, ctx.oracle("uniform", abar)))
    # identical heads and samples: the per-head exact mean equals the head-averaged reference mean
    one = ctx.rng.dirichlet(np.ones(n), size=n)
    same = np.broadcast_to(one, (b, h, n, n)).copy()
    ref_mean = ctx.np(mc.attention_weighted_mean(ctx.arr(x), ctx.arr(same), bias=True))
    per_head = ctx.np(mc.attention_weighted_mean(ctx.arr(x), ctx.arr(same), bias=True, mode="per_head"))
    worst = max(worst, _err(per_head, ctx.oracle("per_head", np.broadcast_to(ref_mean, (h, 7)))))
    # exact per-head mean against its definition (1/(B N)) Σ_{b,i} Σ_j α_{bhij} x̃_{bj}
    att = ctx.rng.dirichlet(np.ones(n), size=(b, h, n))
    xt = np.concatenate([x, np.ones((b, n, 1))], axis=-1)
    ref = np.einsum("bhij,bjd->hd", att, xt) / (b * n)
    got = ctx.np(mc.attention_weighted_mean(ctx.arr(x), ctx.arr(att), bias=True, mode="per_head"))
    return max(worst, _err(got, ctx.oracle("per_head_def", ref)))


def _naive_im2col(x, k, stride, pad, dil):
    np = _np()
    n, c, hh, ww = x.shape
    xp_ = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    oh = (hh + 2 * pad[0] - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
    ow = (ww + 2 * pad[1] - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
    rows = []
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                patch = [
                    xp_[b, ch, i * stride[0] + a * dil[0], j * stride[1] + e * dil[1]]
                    for ch in range(c)
                    for a in range(k[0])
                    for e in range(k[1])
                ]
                rows.append(patch)
    return np.asarray(rows), (oh, ow)


@_check("rows.conv2d_im2col")
def _conv_rows(ctx: _Ctx) -> float:
    """M-P9/§1.7: conv2d_rows == naive im2col; mean patch == row mean; rows @ Wᵀ == the conv.

    Strides, padding and dilation are varied; the last comparison checks the (c, i, j) ordering.
    """
    import maccore as mc

    np = _np()
    x = ctx.rng.standard_normal((2, 3, 7, 6))
    worst = 0.0
    for k, st, pad, dil in (((3, 3), (1, 1), (1, 1), (1, 1)), ((2, 3), (2, 1), (0, 2), (1, 2))):
        ref, (oh, ow) = _naive_im2col(x, k, st, pad, dil)
        ref_b = np.concatenate([ref, np.ones((ref.shape[0], 1))], axis=1)
        rows = mc.conv2d_rows(ctx.arr(x), k, stride=st, padding=pad, dilation=dil, bias=True)
        worst = max(worst, _err(ctx.np(rows), ctx.oracle("im2col", ref_b)))
        mean = mc.conv2d_mean_patch(ctx.arr(x), k, stride=st, padding=pad, dilation=dil, bias=True)
        worst = max(worst, _err(ctx.np(mean), ctx.oracle("mean_patch", ref_b.mean(axis=0))))
        w = ctx.rng.standard_normal((4, 3) + k)
        out = ref @ w.reshape(4, -1).T  # [N·OH·OW, C_out]
        conv = np.zeros((2, 4, oh, ow))
        xpd = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
        for a in range(k[0]):
            for e in range(k[1]):
                sl = xpd[:, :, a * dil[0] : a * dil[0] + st[0] * (oh - 1) + 1 : st[0],
                         e * dil[1] : e * dil[1] + st[1] * (ow - 1) + 1 : st[1]]
                conv += np.einsum("nchw,oc->nohw", sl, w[:, :, a, e])
        worst = max(worst, _err(out, ctx.oracle("conv", conv.transpose(0, 2, 3, 1).reshape(-1, 4))))
    return worst


@_check("singd.structures")
def _singd_structures(ctx: _Ctx) -> float:
    """§5.5: SINGD structures' projections Π(S), products and to_dense agree with NumPy oracles.

    Dense, diagonal and block-diagonal projections have closed forms; every structure's ``matmul``
    is compared with its ``to_dense`` and the backend's ``to_dense`` with NumPy's.
    """
    from maccore import structures

    np = _np()
    nx = _compat_ns(np.empty(0))
    m = ctx.rng.standard_normal((6, 6))
    sym = m + m.T
    x = ctx.rng.standard_normal((6, 3))
    opts = {"block_diagonal": {"block_size": 2}, "hierarchical": {"k1": 2, "k2": 2}}
    mask = np.kron(np.eye(3), np.ones((2, 2)))
    exact = {"dense": sym, "diagonal": np.diag(np.diag(sym)), "block_diagonal": sym * mask}
    worst = 0.0
    for name in structures.names():
        st = structures.get(name, **opts.get(name, {}))
        k = st.from_dense(ctx.arr(sym))
        dense = ctx.np(k.to_dense())
        ref = ctx.np(st.from_dense(nx.asarray(sym)).to_dense())  # NumPy float64 result
        worst = max(worst, _err(dense, ctx.oracle(f"{name}_numpy", ref)))
        if name in exact:
            worst = max(worst, _err(dense, ctx.oracle(f"{name}_projection", exact[name])))
        worst = max(worst, _err(ctx.np(k.matmul(ctx.arr(x))), ctx.oracle(f"{name}_matmul", ref @ x)))
    return worst


@_check("agree.numpy")
def _agree(ctx: _Ctx) -> float:
    """M-P10: the same core calls (rows, factors, MAC, KFAC, attention) give NumPy's float64 result."""
    import maccore as mc

    np = _np()
    nx = _compat_ns(np.empty(0))
    x = ctx.rng.standard_normal((3, 2, 6, 6))
    seq = ctx.rng.standard_normal((3, 4, 5))
    grad = ctx.rng.standard_normal((4, 6))
    A, G = _spd(ctx.rng, 6), _spd(ctx.rng, 4)
    a = ctx.rng.standard_normal(6)
    q, k = ctx.rng.standard_normal((2, 2, 3, 4)), ctx.rng.standard_normal((2, 2, 3, 4))

    def calls(asarr):
        return {
            "conv2d_rows": mc.conv2d_rows(asarr(x), 3, stride=2, padding=1, bias=True),
            "conv2d_rows_reduce": mc.conv2d_rows(asarr(x), 2, bias=False, reduce=True),
            "linear_rows_reduce": mc.linear_rows(asarr(seq), bias=True, reduce=True),
            "input_factor": mc.input_factor(mc.linear_rows(asarr(seq), bias=True)),
            "gradient_factor": mc.gradient_factor(mc.grad_rows(asarr(seq), reduce=True),
                                                  reduction_factor=0.25),
            "mac_apply": mc.mac_apply(asarr(grad), asarr(a), 0.3, scale="inverse"),
            "kfac_tikhonov": mc.kfac_apply(asarr(grad), asarr(A), asarr(G), 0.1),
            "kfac_exact": mc.kfac_apply(asarr(grad), asarr(A), asarr(G), 0.1, mode="exact"),
            "attention_probs": mc.attention_probs(asarr(q), asarr(k), causal=True),
        }

    ref = calls(lambda v: nx.asarray(np.asarray(v, np.float64)))
    got = calls(ctx.arr)
    worst = 0.0
    for name, r in ref.items():
        worst = max(worst, _err(ctx.np(got[name]), ctx.oracle(name, np.asarray(r))))
    return worst


# ----------------------------------------------------------------------------------------------
# Runner and table
# ----------------------------------------------------------------------------------------------


def run_checks(
    backends: Sequence[str] | Sequence[Backend] | None = None,
    *,
    dtypes: Sequence[str] = ("float64", "float32"),
    checks: Sequence[str] | None = None,
    perturb: Perturb | None = None,
    seed: int = 0,
) -> list[CheckResult]:
    """Run the conformance checks.

    Args:
        backends: names from :data:`BACKENDS` (or :class:`Backend` objects); default every installed
            one. Names that are not installed are skipped silently (see :func:`available_backends`).
        dtypes: floating dtypes to run in (``"float64"``, ``"float32"``).
        checks: subset of check names (default all, see :func:`check_names`).
        perturb: ``perturb(oracle_name, oracle_array) -> array`` applied to every oracle before the
            comparison: a deliberately wrong oracle must make checks fail (used to test the harness).
        seed: seed of the NumPy generator that draws the test data (same data on every backend).

    Returns:
        One :class:`CheckResult` per (check, backend, dtype).
    """
    np = _np()
    if backends is None or all(isinstance(b, str) for b in backends):
        bks = available_backends(backends)  # type: ignore[arg-type]
    else:
        bks = list(backends)  # type: ignore[arg-type]
    known = {n for n, *_ in _CHECKS}
    if checks is not None:
        unknown = [c for c in checks if c not in known]
        if unknown:
            raise ValueError(f"unknown checks {unknown}; known: {sorted(known)}")
    for dt in dtypes:
        if dt not in TOLERANCES:
            raise ValueError(f"dtype must be one of {list(TOLERANCES)}, got {dt!r}")
    results: list[CheckResult] = []
    for bk in bks:
        restore = bk.enter() if bk.enter else None
        try:
            for dt in dtypes:
                if dt not in bk.dtypes:
                    continue
                tol = TOLERANCES[dt]
                for name, fn, negative, _ in _CHECKS:
                    if checks is not None and name not in checks:
                        continue
                    ctx = _Ctx(bk, dt, perturb, np.random.default_rng(seed))
                    try:
                        err = float(fn(ctx))
                        detail = ""
                    except Exception as exc:  # a crash is a failure, reported with its message
                        err, detail = None, f"{type(exc).__name__}: {exc}"
                    if err is None:
                        ok = False
                    elif negative:
                        ok = err > 1e-3
                    else:
                        ok = err <= tol
                    results.append(CheckResult(name, bk.label, dt, err, tol, ok, negative, detail))
        finally:
            if restore:
                restore()
    return results


def format_table(results: Sequence[CheckResult]) -> str:
    """Plain-text table: one row per check, one column per backend; each cell is ``PASS`` or
    ``FAIL`` followed by the worst error per dtype; failure details follow the table."""
    labels: list[str] = []
    names: list[str] = []
    for r in results:
        if r.backend not in labels:
            labels.append(r.backend)
        if r.check not in names:
            names.append(r.check)
    cells: dict[tuple[str, str], list[CheckResult]] = {}
    for r in results:
        cells.setdefault((r.check, r.backend), []).append(r)

    dts = [d for d in TOLERANCES if any(r.dtype == d for r in results)]

    def cell(rs: list[CheckResult] | None) -> str:
        if not rs:
            return "-"
        tag = "PASS" if all(r.passed for r in rs) else "FAIL"
        by_dt = {r.dtype: r for r in rs}
        errs = []
        for d in dts:
            r = by_dt.get(d)
            errs.append("-" if r is None else "raised" if r.error is None else f"{r.error:.0e}")
        return f"{tag} " + " ".join(errs) + ("*" if rs[0].negative else "")

    header = ["check"] + labels
    rows = [[n] + [cell(cells.get((n, b))) for b in labels] for n in names]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda vals: "  ".join(str(v).ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append("")
    out.append(
        "cells: PASS/FAIL, then the worst error max|actual - oracle| / max(1, max|oracle|) in "
        + " / ".join(dts) + " (tolerance " + " / ".join(f"{TOLERANCES[d]:g}" for d in dts) + ")."
    )
    out.append("* negative control: an approximation that must NOT match, passes when the error is large.")
    bad = [r for r in results if not r.passed]
    if bad:
        out.append("")
        out.append(f"{len(bad)} failure(s):")
        for r in bad:
            e = "raised" if r.error is None else f"error {r.error:.3e} vs tol {r.tol:g}"
            out.append(f"  {r.check} [{r.backend}, {r.dtype}]: {e} {r.detail}".rstrip())
    return "\n".join(out)
