"""Framework-independent assembly of model-level curvature references (NumPy float64).

``maccore_torch.testing.curvature_blocks`` and ``maccore_jax.testing.curvature_blocks`` compute the
framework parts by autodiff — output Jacobians, the loss Hessian at the outputs, loss gradients,
layer inputs — and hand them to the functions here, which apply the definitions of
``docs/math.md`` ("Curvature matrices", "KFAC"). Both adapters therefore share one implementation
of the definitions, and the framework code only differentiates.

Notation: ``F`` the network output flattened to ``M`` entries; ``J = ∂F/∂θ_l`` ``[M, P]`` in
parameter order; ``H = ∇²_F L`` ``[M, M]``; ``D = ∂F/∂Z_l`` ``[M, rows, d_out]`` (``Z_l`` the layer
output as rows); ``R`` the reduction factor (``L = R·Σ terms``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["KINDS", "FISHERS", "LIKELIHOODS", "LossInfo", "LayerInfo"]

KINDS = ("ggn", "ef", "mc", "hessian", "kfac-expand", "kfac-reduce", "mac")
PARAM_KINDS = ("ggn", "ef", "mc", "hessian")
FACTOR_KINDS = ("kfac-expand", "kfac-reduce", "mac")
FISHERS = ("type-2", "empirical", "mc")
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")


def _np():
    import numpy as np

    return np


@dataclass(frozen=True)
class LossInfo:
    """What the definitions need to know about the loss.

    ``reduction_factor`` ``R`` (``L = R·Σ terms``), ``likelihood`` (for MC sampling; ``None`` if
    unknown) and ``class_axis`` (the output axis that belongs to one loss term: the class axis
    of a cross-entropy, the feature axis of a squared error; every other output index is one
    term).
    """

    reduction_factor: float | None
    likelihood: str | None
    class_axis: int


@dataclass(frozen=True)
class LayerInfo:
    """One preconditioned layer in maccore's layout: ``weight_shape`` ``[d_out, d_in, ...]``
    (conv: ``[C_out, C_in/g, kh, kw]``), whether it has a bias, its type (``"linear"`` /
    ``"conv2d"`` / ``"attention"``) and, for convolutions, the geometry."""

    name: str
    weight_shape: tuple[int, ...]
    bias: bool
    type: str = "linear"
    groups: int = 1

    @property
    def d_out(self) -> int:
        return self.weight_shape[0]

    @property
    def d_tilde(self) -> int:
        n = 1
        for s in self.weight_shape[1:]:
            n *= s
        return n + (1 if self.bias else 0)


def check_kind(kind: str, fisher: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {list(FISHERS)}, got {fisher!r}")


def needs_reduction(kind: str, fisher: str) -> bool:
    return kind in ("ef", "mc") or (kind in ("kfac-expand", "kfac-reduce") and fisher != "type-2")


def term_index(out_shape: tuple[int, ...], class_axis: int):
    """Indices into the flattened output, ``[T, C]``: row ``t`` lists the ``C`` entries of term ``t``."""
    np = _np()
    m = int(np.prod(out_shape)) if out_shape else 1
    idx = np.arange(m).reshape(out_shape)
    if idx.ndim == 0:
        return idx.reshape(1, 1)
    idx = np.moveaxis(idx, class_axis, -1)
    return idx.reshape(-1, idx.shape[-1])


def sample_targets(out, info: LossInfo, targets_like: Any, rng):
    """One draw ``ỹ ~ p(y | f)`` per term (NumPy), in the format of the given targets.

    categorical: class indices (integer targets) or one-hot (floating targets of the output's
    shape), softmax over ``class_axis``; gaussian: ``f + ε``, ``ε ~ N(0, I)`` (the likelihood of
    ``c = ½‖f − y‖²``); bernoulli: ``ỹ ~ Bernoulli(sigmoid(f))``.
    """
    np = _np()
    f = np.asarray(out, np.float64)
    lik = info.likelihood
    if lik == "gaussian":
        return f + rng.standard_normal(f.shape)
    if lik == "bernoulli":
        s = 1.0 / (1.0 + np.exp(-f))
        return (rng.random(f.shape) < s).astype(np.float64)
    if lik == "categorical":
        fm = np.moveaxis(f, info.class_axis, -1)
        e = np.exp(fm - fm.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        c = np.cumsum(p, axis=-1)
        u = rng.random(p.shape[:-1] + (1,))
        labels = np.minimum((u > c).sum(axis=-1), p.shape[-1] - 1)
        t = np.asarray(targets_like)
        if t.dtype.kind in "iu":
            return labels.astype(t.dtype)
        onehot = (labels[..., None] == np.arange(p.shape[-1])).astype(np.float64)
        return np.moveaxis(onehot, -1, info.class_axis)
    raise ValueError(
        f"kind='mc' needs the model's likelihood: pass likelihood= one of {list(LIKELIHOODS)} "
        "(detected automatically for cross-entropy, MSE and BCE-with-logits losses)"
    )


# --------------------------------------------------------------------------------------------
# parameter-space blocks
# --------------------------------------------------------------------------------------------


def ggn(J, H):
    """GGN block ``Jᵀ H J``."""
    np = _np()
    out = J.T @ (H @ J)
    return (out + out.T) / 2 if np.all(np.isfinite(out)) else out


def outer_by_term(J, grads, idx, R: float):
    """``(1/R) Σ_terms u uᵀ`` with ``u_t = J_tᵀ (∇_F L)_t`` — the empirical (one gradient per term)
    or, summed over draws and divided by their number, the MC Fisher."""
    np = _np()
    g = np.asarray(grads, np.float64).reshape(-1)
    Jt = J[idx]  # [T, C, P]
    U = np.einsum("tcp,tc->tp", Jt, g[idx])
    return U.T @ U / R


# --------------------------------------------------------------------------------------------
# Kronecker factors
# --------------------------------------------------------------------------------------------


def input_factor(rows, n_batch: int, setting: str):
    """``A`` from the input rows ``x̃ [N, S, d̃]`` (bias column included): expand
    ``E_{n,s}[x̃x̃ᵀ]``; reduce ``E_n[x̄_n x̄_nᵀ]`` with ``x̄_n = mean_s x̃_{n,s}``."""
    np = _np()
    x = np.asarray(rows, np.float64)
    if setting == "expand":
        r = x.reshape(-1, x.shape[-1])
        return r.T @ r / r.shape[0]
    xb = x.mean(axis=1)
    return xb.T @ xb / xb.shape[0]


def mean_input(rows):
    """``ā = E_rows[x̃]`` (the same for expand and reduce)."""
    np = _np()
    x = np.asarray(rows, np.float64)
    return x.reshape(-1, x.shape[-1]).mean(axis=0)


def hessian_eig(H, rtol: float = 1e-13):
    """``H = Q diag(w) Qᵀ`` restricted to the eigenvalues with ``|w| > rtol·max|w|``: the
    directions to backpropagate for the type-II ``G`` (exact: ``Σ_r D_rᵀ H D_r =
    Σ_k w_k Σ_r (D_rᵀ q_k)(D_rᵀ q_k)ᵀ``)."""
    np = _np()
    Hs = (np.asarray(H, np.float64) + np.asarray(H, np.float64).T) / 2
    w, Q = np.linalg.eigh(Hs)
    top = float(np.abs(w).max()) if w.size else 0.0
    keep = np.abs(w) > rtol * top
    return w[keep], Q[:, keep]


def gradient_factor_type2_vjp(V, w, setting: str):
    """Type-II ``G`` from backpropagated eigenvectors: ``V [K, N, S, d_out]`` holds ``D_rᵀ q_k``
    (one eigenvector of ``H`` per ``k``), ``w [K]`` the eigenvalues. Expand:
    ``Σ_k w_k Σ_r v v ᵀ``; reduce: the per-sample sums over ``S`` first."""
    np = _np()
    V = np.asarray(V, np.float64)
    if setting == "reduce":
        V = V.sum(axis=2, keepdims=True)
    flat = V.reshape(V.shape[0], -1, V.shape[-1])
    return np.einsum("k,krd,kre->de", np.asarray(w, np.float64), flat, flat)


def gradient_factor_rows(gz, R: float, setting: str):
    """``G = (1/R) Σ_rows g gᵀ`` from autograd gradients ``gz [N, S, d_out]`` of ``L`` w.r.t. the
    layer output (expand), or ``(1/R) Σ_n (Σ_s g)(Σ_s g)ᵀ`` (reduce)."""
    np = _np()
    g = np.asarray(gz, np.float64)
    if setting == "reduce":
        g = g.sum(axis=1)
    g = g.reshape(-1, g.shape[-1])
    return g.T @ g / R


def conv_rows_nchw(x, kernel_size, stride, padding, dilation, groups: int):
    """Independent NumPy im2col of an NCHW input with explicit ``padding ((top, bottom), (left,
    right))`` (already-padded zeros): rows ``[N, P, g, C_in/g·kh·kw]`` in ``(c, i, j)`` order,
    ``j`` fastest."""
    np = _np()
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    (pt, pb), (pl, pr) = padding
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    kh, kw = kernel_size
    sh, sw = stride
    dh, dw = dilation
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"convolution output is empty ({oh}×{ow})")
    cols = np.empty((n, c, kh, kw, oh, ow))
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh,
                                  j * dw: j * dw + sw * (ow - 1) + 1: sw]
    cg = c // groups
    cols = cols.reshape(n, groups, cg * kh * kw, oh * ow)
    return np.moveaxis(cols, -1, 1)  # [N, P, g, cg·kh·kw]


def with_bias(rows, bias: bool):
    np = _np()
    if not bias:
        return rows
    return np.concatenate([rows, np.ones(rows.shape[:-1] + (1,))], axis=-1)
