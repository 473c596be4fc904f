"""Native fast paths for the few operations the Array API standard has no fused form for.

Each function takes the namespace first and falls back to a standard-only implementation
(:mod:`maccore._agnostic` style, inline here); tests check every fast path against the fallback.
"""

from __future__ import annotations

from typing import Any

import array_api_compat as compat

Array = Any

# Bytes per block of the chunked NumPy rank-1 update: a block (plus its matvec) stays in cache, so
# the gradient is read from memory once and the result written once.
_CHUNK_BYTES = 1 << 19

# dtype char -> SciPy's BLAS ?ger (a fused in-place rank-1 update), or None (no SciPy / dtype).
_GER: dict[str, Any] = {}


def _blas_ger(dtype: Any) -> Any:
    key = dtype.char
    if key not in _GER:
        try:
            from scipy.linalg import blas
        except Exception:  # SciPy is optional: the ufunc loop below is the fallback
            _GER[key] = None
        else:
            _GER[key] = {"f": getattr(blas, "sger", None), "d": getattr(blas, "dger", None)}.get(key)
    return _GER[key]


def rank1_update_standard(xp: Any, g: Array, a: Array, coef: Array) -> Array:
    """``g − (g @ a) coefᵀ`` with standard operations only."""
    ga = g @ a
    return g - xp.reshape(ga, (-1, 1)) * xp.reshape(coef, (1, -1))


def rank1_update(xp: Any, g: Array, a: Array, coef: Array) -> Array:
    """``g − (g @ a) coefᵀ`` for ``g [m, n]``, ``a, coef [n]``; never forms an n×n matrix.

    NumPy: a cache-blocked loop (one read and one write of ``g``; BLAS ``?ger`` through SciPy when
    it is installed). torch: ``addr`` (a fused BLAS
    rank-1 update). Everything else: :func:`rank1_update_standard`.
    """
    if compat.is_numpy_namespace(xp):
        return _rank1_numpy(g, a, coef)
    if compat.is_torch_namespace(xp):
        import torch  # only reached when the caller already uses torch

        return torch.addr(g, g @ a, coef, alpha=-1)
    return rank1_update_standard(xp, g, a, coef)


def _rank1_numpy(g: Array, a: Array, coef: Array, *, blas: bool = True) -> Array:
    """Cache-blocked ``g − (g a) coefᵀ``. With SciPy (float32/float64): per block a copy, a matvec
    and BLAS ``?ger`` in place (one fused pass); otherwise (or ``blas=False``) the matvec and two
    ufunc passes (outer product, subtraction)."""
    import numpy as np

    m, n = g.shape
    ger = _blas_ger(g.dtype) if blas and a.dtype == g.dtype == coef.dtype and g.size else None
    out = np.empty_like(g, order="C")
    step = max(1, _CHUNK_BYTES // max(1, n * g.itemsize))
    ga = np.empty((min(step, m),), dtype=g.dtype)
    for start in range(0, m, step):
        stop = min(m, start + step)
        o = out[start:stop]
        v = ga[: stop - start]
        if ger is not None:
            np.copyto(o, g[start:stop])
            np.matmul(o, a, out=v)
            # o is C-contiguous, so o.T is Fortran-ordered: ?ger updates it in place,
            # o.T ← o.T − coef vᵀ  ⇔  o ← o − v coefᵀ
            r = ger(-1.0, coef, v, a=o.T, overwrite_a=1)
            if r.ctypes.data != o.ctypes.data:  # the wrapper had to copy (never expected)
                np.copyto(o, r.T)
        else:
            blk = g[start:stop]
            np.matmul(blk, a, out=v)
            np.multiply(v[:, None], coef[None, :], out=o)
            np.subtract(blk, o, out=o)
    return out


def rank1_update_split_standard(xp: Any, gw: Array, gb: Array | None, a: Array, coef: Array
                                ) -> tuple[Array, Array | None]:
    """:func:`rank1_update_split` with standard operations only."""
    d_out, n = gw.shape
    if a.ndim == 1:
        v = gw @ a[:n]
        if gb is not None:
            v = v + gb * a[n]
        new_w = gw - xp.reshape(v, (d_out, 1)) * xp.reshape(coef[:n], (1, n))
        return new_w, (None if gb is None else gb - v * coef[n])
    h = a.shape[0]
    r = d_out // h
    gh = xp.reshape(gw, (h, r, n))
    v = gh @ xp.reshape(a[:, :n], (h, n, 1))  # [H, r, 1]
    if gb is not None:
        v = v + xp.reshape(gb, (h, r, 1)) * xp.reshape(a[:, n], (h, 1, 1))
    new_w = xp.reshape(gh - v * xp.reshape(coef[:, :n], (h, 1, n)), (d_out, n))
    if gb is None:
        return new_w, None
    new_b = xp.reshape(xp.reshape(gb, (h, r)) - xp.reshape(v, (h, r)) * xp.reshape(coef[:, n], (h, 1)), (d_out,))
    return new_w, new_b


def rank1_update_split(xp: Any, gw: Array, gb: Array | None, a: Array, coef: Array, *,
                       inplace: bool = False) -> tuple[Array, Array | None]:
    """``G̃ − (G̃ a) coefᵀ`` for ``G̃ = [gw | gb]`` returned split as ``(weight part, bias part)``,
    without concatenating ``gw`` and ``gb`` (the bias column is last, as in :func:`maccore.grad_matrix`).

    ``gw [d_out, n]``, ``gb [d_out]`` or ``None``; ``a``, ``coef`` ``[n + (gb is not None)]``, or
    ``[H, n (+1)]``: row block h of H equal blocks uses ``a[h]``, ``coef[h]``.

    torch: ``mv``/``bmm`` + fused ``addr``/``baddbmm`` and ``addcmul``; ``inplace=True`` writes the
    result into ``gw`` and ``gb`` (a contiguous ``gw``; no allocation but the ``[d_out]`` vector
    ``G̃ a``). Everything else (and ``inplace=False`` arrays of other libraries):
    :func:`rank1_update_split_standard`.
    """
    if compat.is_torch_namespace(xp):
        return _rank1_split_torch(gw, gb, a, coef, inplace)
    return rank1_update_split_standard(xp, gw, gb, a, coef)


def _rank1_split_torch(gw: Array, gb: Array | None, a: Array, coef: Array, inplace: bool
                       ) -> tuple[Array, Array | None]:
    n = gw.shape[1]
    if gb is None:
        return rank1_split_torch_parts(gw, None, a, None, coef, None, inplace=inplace)
    if a.ndim == 1:
        return rank1_split_torch_parts(gw, gb, a[:n], a[n], coef[:n], coef[n], inplace=inplace)
    return rank1_split_torch_parts(gw, gb, a[:, :n], a[:, n], coef[:, :n], coef[:, n], inplace=inplace)


def rank1_split_torch_parts(gw: Array, gb: Array | None, aw: Array, ab: Array | None, cw: Array,
                            cb: Array | None, *, inplace: bool, scale: Array | None = None
                            ) -> tuple[Array, Array | None]:
    """The torch kernel of :func:`rank1_update_split` with ``a`` and ``coef`` pre-split into their
    weight parts ``aw, cw`` (``[n]`` or ``[H, n]``) and bias entries ``ab, cb`` (0-d or ``[H]``;
    ``None`` without bias), for callers that cache the split (the torch adapter, per refresh).

    ``scale`` (0-d, or ``[H, 1]`` per head): use ``coef = scale · c`` without forming it — the
    product ``G̃ a`` is scaled instead (MAC: ``c = a``, ``scale = 1/(λ + aᵀa)``, so no second
    vector of size d̃ is kept)."""
    import torch  # only reached when the caller already uses torch

    if aw.ndim == 1:
        v = torch.mv(gw, aw)
        if gb is not None:
            v.addcmul_(gb, ab)
        if scale is not None:
            v.mul_(scale)
        if inplace:
            gw.addr_(v, cw, alpha=-1)
            if gb is not None:
                gb.addcmul_(v, cb, value=-1)
            return gw, gb
        return torch.addr(gw, v, cw, alpha=-1), (None if gb is None else torch.addcmul(gb, v, cb, value=-1))
    d_out, n = gw.shape
    h = aw.shape[0]
    r = d_out // h
    gh = gw.view(h, r, n) if inplace else gw.reshape(h, r, n)
    v = torch.bmm(gh, aw.unsqueeze(-1))  # [H, r, 1]
    if gb is not None:
        v.addcmul_(gb.reshape(h, r, 1), ab.reshape(h, 1, 1))
    if scale is not None:
        v.mul_(scale.reshape(h, 1, 1))
    cw3 = cw.unsqueeze(1)  # [H, 1, n]
    if inplace:
        gh.baddbmm_(v, cw3, alpha=-1)
        if gb is not None:
            gb.view(h, r).addcmul_(v.view(h, r), cb.reshape(h, 1), value=-1)
        return gw, gb
    new_w = torch.baddbmm(gh, v, cw3, alpha=-1).reshape(d_out, n)
    if gb is None:
        return new_w, None
    return new_w, torch.addcmul(gb.reshape(h, r), v.view(h, r), cb.reshape(h, 1), value=-1).reshape(d_out)
