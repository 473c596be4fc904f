"""Exact dense float64 oracles and assertion helpers (NumPy; never imported by the maths modules).

For users verifying their own curvature code and for maccore's own tests:

- :func:`mlp_io` / :func:`ggn_block` / :func:`backprop_grads`: a token-wise MLP (optionally with
  weight sharing over ``S`` positions and a final sum/mean reduction over them) and its *exact*
  GGN / empirical-Fisher block for one layer, computed from explicit Jacobians (the exactness
  cases are listed in ``docs/verify.md``).
  ``backprop_grads`` returns the autograd-form output gradients a KFAC implementation would see,
  so ``gradient_factor(grad_rows(g), reduction_factor=R)`` can be checked against the oracle.
- :func:`dense_damped_inverse`, :func:`mac_dense_preconditioner`: dense references for the
  rank-1 and Kronecker damped inverses.
- :func:`allclose_report` / :func:`assert_close`: comparisons that report the worst entries.

Conventions: row-major ``vec_r``, bias last, canonical split (A a plain mean, G carries R),
losses with PyTorch semantics (``MSELoss`` has no ½: c = ½‖f−y‖² with R = 2 for ``sum`` and
2/(N·#terms·C) for ``mean``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

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

LOSSES = ("mse", "ce", "bce")
ACTIVATIONS = ("identity", "tanh", "sigmoid", "relu")


def _np():
    import numpy as np

    return np


def to_numpy(x: Any):
    """Any backend array (numpy, torch, jax, cupy, array_api_strict) → float64 NumPy array."""
    np = _np()
    mod = type(x).__module__
    if mod.startswith("torch"):
        return x.detach().cpu().double().numpy()
    if mod.startswith("cupy"):
        return x.get().astype(np.float64)
    if "array_api_strict" in mod:
        return np.asarray(np.from_dlpack(x), dtype=np.float64)
    return np.asarray(x, dtype=np.float64)


def _act(name: str, z):
    np = _np()
    if name == "identity":
        return z, np.ones_like(z)
    if name == "tanh":
        t = np.tanh(z)
        return t, 1.0 - t * t
    if name == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-z))
        return s, s * (1.0 - s)
    if name == "relu":
        return np.maximum(z, 0.0), (z > 0).astype(z.dtype)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


@dataclass
class MLPCase:
    """A token-wise MLP on inputs ``x [N, S, D]`` with weights ``[d_out, d_in]`` and optional biases.

    ``setting="expand"``: one loss term per (n, s) on the token output ``f[n, s]``.
    ``setting="reduce"``: the outputs are pooled over s (``pool`` = "sum" or "mean") before the loss.
    ``pool_after`` (reduce only): pool the (activated) output of that layer index instead of the
    network output, so later layers see one token per sample (an intermediate reduction, after
    which KFAC-reduce stays exact); ``None`` = after the last layer.
    """

    weights: Sequence[Any]
    biases: Sequence[Any | None]
    x: Any
    y: Any
    loss: str = "mse"
    reduction: str = "sum"
    activation: str = "identity"
    setting: str = "expand"
    pool: str = "mean"
    pool_after: int | None = None


def reduction_factor(case: MLPCase) -> float:
    """The reduction factor R (``docs/conventions.md``) for the case's loss, reduction and
    setting: the loss is L = R·Σ(terms)."""
    n, s, _ = case.x.shape
    c = case.weights[-1].shape[0]
    terms = n * (s if case.setting == "expand" else 1)
    if case.loss == "mse":
        return 2.0 if case.reduction == "sum" else 2.0 / (terms * c)
    if case.loss == "ce":
        return 1.0 if case.reduction == "sum" else 1.0 / terms
    if case.loss == "bce":
        return 1.0 if case.reduction == "sum" else 1.0 / (terms * c)
    raise ValueError(f"loss must be one of {LOSSES}, got {case.loss!r}")


def _pool_layer(case: MLPCase) -> int | None:
    """Index of the layer whose output is pooled *inside* the network (None: none, or the last)."""
    L = len(case.weights)
    if case.setting != "reduce" or case.pool_after is None:
        return None
    if not 0 <= case.pool_after < L:
        raise ValueError(f"pool_after must be a layer index in [0, {L}), got {case.pool_after}")
    return case.pool_after if case.pool_after < L - 1 else None


def mlp_io(case: MLPCase):
    """Forward pass: (layer inputs ``[N, S_l, d_in_l]``, Jacobians D_l ``[N, S_l, C, d_out_l]`` of the
    token output w.r.t. each layer's output, outputs ``f [N, T, C]``).

    Without an intermediate pool S_l = T = S. With ``pool_after = p`` (not the last layer), layers
    after p see S_l = 1, the output is ``f [N, 1, C]`` and the Jacobians of layers ≤ p include the
    pooling weight (1 or 1/S)."""
    np = _np()
    h = np.asarray(case.x, dtype=np.float64)
    s_in = h.shape[1]
    p = _pool_layer(case)
    inputs, derivs = [], []
    L = len(case.weights)
    for i, (w, b) in enumerate(zip(case.weights, case.biases)):
        inputs.append(h)
        z = h @ np.asarray(w, np.float64).T + (0.0 if b is None else np.asarray(b, np.float64))
        if i < L - 1:
            h, dphi = _act(case.activation, z)
            derivs.append(dphi)
            if i == p:
                h = h.sum(axis=1, keepdims=True) if case.pool == "sum" else h.mean(axis=1, keepdims=True)
        else:
            h = z
    f = h
    n, s, c = f.shape
    jac = [None] * L
    D = np.broadcast_to(np.eye(c), (n, s, c, c)).copy()
    jac[L - 1] = D
    for i in range(L - 2, -1, -1):
        D = D @ np.asarray(case.weights[i + 1], np.float64)
        if i == p:  # back through the pooling: every token gets the pooled Jacobian × weight
            D = (1.0 if case.pool == "sum" else 1.0 / s_in) * np.broadcast_to(
                D, (n, s_in) + D.shape[2:]
            )
        D = D * derivs[i][:, :, None, :]
        jac[i] = D
    return inputs, jac, f


def _pooled(case: MLPCase, f):
    if case.setting == "expand" or _pool_layer(case) is not None:
        return f
    return f.sum(axis=1, keepdims=True) if case.pool == "sum" else f.mean(axis=1, keepdims=True)


def _loss_parts(case: MLPCase, f):
    """Per-term gradient ∇c, Hessian Λ and type-II factor S (Λ = S Sᵀ), shapes [..., C(, C)]."""
    np = _np()
    y = np.asarray(case.y, np.float64)
    c = f.shape[-1]
    if case.loss == "mse":
        grad = f - y
        hess = np.broadcast_to(np.eye(c), f.shape + (c,))
        sq = hess
    elif case.loss == "ce":
        e = np.exp(f - f.max(axis=-1, keepdims=True))
        sm = e / e.sum(axis=-1, keepdims=True)
        grad = sm - y  # y one-hot
        hess = np.einsum("...i,ij->...ij", sm, np.eye(c)) - sm[..., :, None] * sm[..., None, :]
        sq = np.sqrt(sm)[..., None, :] * (np.eye(c) - sm[..., :, None])  # columns √σ_k (e_k − σ)
    elif case.loss == "bce":
        s = 1.0 / (1.0 + np.exp(-f))
        grad = s - y
        hess = np.einsum("...i,ij->...ij", s * (1 - s), np.eye(c))
        sq = np.einsum("...i,ij->...ij", np.sqrt(s * (1 - s)), np.eye(c))
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {case.loss!r}")
    return grad, hess, np.asarray(sq)


def _weights_of_pool(case: MLPCase, s: int) -> float:
    """Weight of the final pooling (1 when the pool is inside the network: it is in D)."""
    if case.setting == "expand" or case.pool == "sum" or _pool_layer(case) is not None:
        return 1.0
    return 1.0 / s


def _param_jacobians(case: MLPCase, layer: int):
    """J[n, t] = ∂ f_term / ∂ vec_r(W̃_l): ``[N, T, C, d_out·d̃]`` (T = S for expand, 1 for reduce)."""
    np = _np()
    inputs, jac, f = mlp_io(case)
    x = inputs[layer]
    if case.biases[layer] is not None:
        x = np.concatenate([x, np.ones(x.shape[:-1] + (1,))], axis=-1)
    D = jac[layer]  # [N, S, C, d_out]
    n, s, c, d_out = D.shape
    J = np.einsum("nsco,nsd->nscod", D, x).reshape(n, s, c, -1)
    if case.setting == "reduce":
        J = _weights_of_pool(case, s) * J.sum(axis=1, keepdims=True)
    return J, f


def ggn_block(case: MLPCase, layer: int):
    """Exact GGN (= type-II Fisher) block of layer ``layer`` in row-major vec of W̃ = [W | b]."""
    np = _np()
    J, f = _param_jacobians(case, layer)
    _, hess, _ = _loss_parts(case, _pooled(case, f))
    return reduction_factor(case) * np.einsum("ntcp,ntcd,ntdq->pq", J, hess, J)


def ef_block(case: MLPCase, layer: int):
    """Exact empirical-Fisher block R Σ_terms Jᵀ ∇c ∇cᵀ J of layer ``layer`` (row-major vec)."""
    np = _np()
    J, f = _param_jacobians(case, layer)
    grad, _, _ = _loss_parts(case, _pooled(case, f))
    v = np.einsum("ntcp,ntc->ntp", J, grad)
    return reduction_factor(case) * np.einsum("ntp,ntq->pq", v, v)


def backprop_grads(case: MLPCase, layer: int, *, fisher: str = "type2"):
    """Autograd-form gradients at the layer's output, ``[K, N, S, d_out]``.

    ``fisher="type2"``: K = C backpropagated columns of the loss Hessian's factor, each scaled like
    an autograd gradient of L (i.e. R·Dᵀ·S e_k), so ``gradient_factor(rows, reduction_factor=R)``
    yields R Σ ĝĝᵀ. ``fisher="empirical"``: K = 1, the true autograd gradient R·Dᵀ∇c.
    """
    np = _np()
    inputs, jac, f = mlp_io(case)
    D = jac[layer]  # [N, S, C, d_out]
    n, s, c, d_out = D.shape
    grad, _, sq = _loss_parts(case, _pooled(case, f))  # [N, T, C], [N, T, C, C]
    R = reduction_factor(case)
    w = _weights_of_pool(case, s)
    if fisher == "type2":
        vec = np.moveaxis(sq, -1, 0)  # [K, N, T, C]
    elif fisher == "empirical":
        vec = grad[None]
    else:
        raise ValueError(f"fisher must be 'type2' or 'empirical', got {fisher!r}")
    if case.setting == "reduce":
        vec = np.broadcast_to(vec, (vec.shape[0], n, s, c))
    return R * w * np.einsum("knsc,nsco->knso", vec, D)


def commutation_matrix(m: int, n: int):
    """K with K vec_c(X) = vec_r(X) for X of shape [m, n] (column- to row-major ``vec``)."""
    np = _np()
    K = np.zeros((m * n, m * n))
    for i in range(m):
        for j in range(n):
            K[i * n + j, j * m + i] = 1.0
    return K


def dense_damped_inverse(M, damping: float):
    """``(M + λI)⁻¹`` in float64 by a symmetric eigendecomposition (never ``np.linalg.inv``);
    relative Frobenius error ≤ ``8·n·ε·κ`` (see :func:`maccore.testing.inverse_error_bound`)."""
    from maccore.testing._numerics import dense_damped_inverse as _impl

    return _impl(M, damping)


def mac_dense_preconditioner(mean, damping: float, *, scale: str = "reference"):
    """Dense ``λ(ââᵀ+λI)⁻¹`` (reference) or ``(ââᵀ+λI)⁻¹`` (inverse), float64: what
    :func:`maccore.mac_apply` multiplies by without forming it. Built from the closed-form
    spectral decomposition (relative error ≤ ``8·(d+4)·ε`` for every λ and ā, see
    :func:`maccore.testing.mac_error_bound`)."""
    from maccore.testing._numerics import mac_dense_preconditioner as _impl

    return _impl(mean, damping, scale=scale)


def allclose_report(actual, desired, *, rtol: float, atol: float, top: int = 5):
    """(ok, message): compare as float64; the message lists the ``top`` worst entries."""
    np = _np()
    a, d = to_numpy(actual), to_numpy(desired)
    if a.shape != d.shape:
        return False, f"shape mismatch: actual {list(a.shape)} vs desired {list(d.shape)}"
    err = np.abs(a - d)
    bound = atol + rtol * np.abs(d)
    bad = ~(err <= bound)
    if not bad.any():
        return True, f"max abs error {err.max() if err.size else 0.0:.3e}"
    excess = np.where(bad, err - bound, -np.inf).ravel()
    idx = np.argsort(excess)[::-1][:top]
    scale = float(np.abs(d).max())
    rel = f"{err.max() / scale:.3e}" if scale > 0 else "n/a (desired is all zeros)"
    lines = [
        f"{int(bad.sum())}/{a.size} entries differ (rtol={rtol:g}, atol={atol:g}); max abs error "
        f"{err.max():.3e}, max abs error / max|desired| {rel}; worst:"
    ]
    for flat in idx:
        pos = np.unravel_index(flat, a.shape)
        lines.append(f"  at {tuple(int(p) for p in pos)}: actual {a[pos]:.6e}, desired {d[pos]:.6e}")
    return False, "\n".join(lines)


def assert_close(actual, desired, *, rtol: float = 1e-10, atol: float = 1e-12, what: str = "") -> float:
    """Raise ``AssertionError`` with the worst entries unless ``actual ≈ desired``; return max error."""
    ok, msg = allclose_report(actual, desired, rtol=rtol, atol=atol)
    if not ok:
        raise AssertionError(f"{what}: {msg}" if what else msg)
    np = _np()
    return float(np.max(np.abs(to_numpy(actual) - to_numpy(desired)))) if to_numpy(actual).size else 0.0
