"""Native fast paths for the few operations the Array API standard has no fused form for.

Each function takes the namespace first and falls back to a standard-only implementation
(:mod:`maccore._agnostic` style, inline here); tests check every fast path against the fallback.
"""

from __future__ import annotations

from typing import Any

import array_api_compat as compat

Array = Any

# Rows per block of the chunked NumPy rank-1 update: keeps a block (plus its matvec) in cache so
# the gradient is read from memory once and written once.
_CHUNK_BYTES = 1 << 18


def rank1_update_standard(xp: Any, g: Array, a: Array, coef: Array) -> Array:
    """``g − (g @ a) coefᵀ`` with standard operations only."""
    ga = g @ a
    return g - xp.reshape(ga, (-1, 1)) * xp.reshape(coef, (1, -1))


def rank1_update(xp: Any, g: Array, a: Array, coef: Array) -> Array:
    """``g − (g @ a) coefᵀ`` for ``g [m, n]``, ``a, coef [n]``; never forms an n×n matrix.

    NumPy: a cache-blocked loop (one read and one write of ``g``). torch: ``addr`` (a fused BLAS
    rank-1 update). Everything else: :func:`rank1_update_standard`.
    """
    if compat.is_numpy_namespace(xp):
        return _rank1_numpy(g, a, coef)
    if compat.is_torch_namespace(xp):
        import torch  # only reached when the caller already uses torch

        return torch.addr(g, g @ a, coef, alpha=-1)
    return rank1_update_standard(xp, g, a, coef)


def _rank1_numpy(g: Array, a: Array, coef: Array) -> Array:
    import numpy as np

    m, n = g.shape
    out = np.empty_like(g)
    step = max(1, _CHUNK_BYTES // max(1, n * g.itemsize))
    ga = np.empty((min(step, m),), dtype=g.dtype)
    for start in range(0, m, step):
        stop = min(m, start + step)
        blk = g[start:stop]
        v = np.matmul(blk, a, out=ga[: stop - start])
        o = out[start:stop]
        np.multiply(v[:, None], coef[None, :], out=o)
        np.subtract(blk, o, out=o)
    return out
