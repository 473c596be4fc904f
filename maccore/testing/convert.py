"""Convert curvature from other libraries' layouts and scalings to maccore's (NumPy float64).

maccore's convention: one block per layer over ``vec_r(W̃)``, ``W̃ = [W | b]`` of shape
``[d_out, d̃]`` flattened row-major, so the bias of output ``o`` sits right after the weights of row
``o``; KFAC is ``G ⊗ A`` with ``A = E_rows[x̃x̃ᵀ]`` (the ``1`` of ``x̃`` last) and ``G`` carrying the
loss reduction factor ``R`` (``docs/math.md``, "Conventions").

Other conventions this module converts from (``docs/verify.md`` has the table):

- **Parameter order** (torch ``named_parameters``, curvlinops' dense matrices): ``[vec W, b]`` —
  all weights first (``W.flatten()``, row-major), then the bias. :func:`from_parameter_layout`.
- **Column-major** ``vec_c(W̃)`` (the maths literature, ``A ⊗ G``) and Flax/kfac-jax kernels
  ``[d_in, d_out]`` flattened row-major (= column-major in ``W``): :func:`from_column_major`,
  ``from_parameter_layout(..., weight_order="column")``.
- **curvlinops** (checked against curvlinops 3.0): GGN, Hessian, MC Fisher and KFAC factors equal
  maccore's; its empirical Fisher of ``MSELoss`` is twice maccore's (curvlinops takes the squared
  error without the ½ of maccore's ``c = ½‖f − y‖²``). :func:`from_curvlinops`,
  :func:`from_curvlinops_kfac`.
- **BackPACK** KFLR/KFAC factors ``[G, A]`` per weight (checked against BackPACK 1.7): for
  ``Conv2d`` a third convention — the input factor of KFAC-*expand* summed over the ``P`` output
  locations (``A_bp = P·A_expand``) with the gradient factor of KFAC-*reduce*
  (``G_bp = G_reduce``: gradients summed over the locations before the outer product); the bias
  has its own factor, so the joint ``[W | b]`` input factor is not available.
  ``Linear`` layers (``P = 1``) match maccore's factors. :func:`from_backpack_kfac`.
- **kfac-jax**: Flax layout (``kernel [d_in, d_out]``), and its empirical-Fisher estimates divide
  by the batch size once more than maccore's: :func:`from_kfac_jax` (layout and scaling tested on
  hand-built matrices only — kfac-jax is not a test dependency).

Example — a curvature matrix in torch's parameter order ``[W.flatten(), b]`` to maccore's:

>>> import numpy as np
>>> from maccore.testing import convert
>>> W = np.arange(6.0).reshape(2, 3); b = np.array([10.0, 20.0])
>>> torch_order = np.concatenate([W.reshape(-1), b])          # a vector in parameter order
>>> convert.from_parameter_layout(torch_order, W.shape)       # → vec_r([W | b])
array([ 0.,  1.,  2., 10.,  3.,  4.,  5., 20.])
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = [
    "parameter_permutation",
    "from_parameter_layout",
    "to_parameter_layout",
    "from_column_major",
    "to_column_major",
    "from_curvlinops",
    "from_curvlinops_kfac",
    "from_backpack_kfac",
    "from_kfac_jax",
]

CURVLINOPS_FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
LOSSES = ("mse", "ce", "bce")


def _np():
    import numpy as np

    return np


def _arr(x: Any):
    from maccore.testing._oracles import to_numpy

    return to_numpy(x)


def _dims(weight_shape: Sequence[int], weight_order: str) -> tuple[int, int]:
    shape = tuple(int(s) for s in weight_shape)
    if len(shape) < 2:
        raise ValueError(f"weight_shape must have at least 2 dims ([d_out, d_in, ...]), got {shape}")
    if weight_order not in ("row", "column"):
        raise ValueError(f"weight_order must be 'row' or 'column', got {weight_order!r}")
    return shape[0], math.prod(shape[1:])


def parameter_permutation(weight_shape: Sequence[int], *, bias: bool = True, weight_order: str = "row"):
    """Index array ``p`` with ``ours = theirs[p]`` for a vector in parameter order ``[vec W, b]``.

    ``weight_shape`` is maccore's weight shape ``[d_out, d_in, ...]`` (conv: ``[C_out, C_in/g, kh,
    kw]``; trailing dims flatten row-major into ``d_in``). ``weight_order="row"``: the weights come
    as ``W.flatten()`` (torch, curvlinops); ``"column"``: as ``Wᵀ.flatten()`` (a Flax dense kernel
    ``[d_in, d_out]``, kfac-jax). The bias ``b [d_out]`` follows the weights when ``bias``.
    """
    np = _np()
    d_out, d_in = _dims(weight_shape, weight_order)
    dt = d_in + (1 if bias else 0)
    o, j = np.meshgrid(np.arange(d_out), np.arange(dt), indexing="ij")  # our [d_out, d̃] grid
    if weight_order == "row":
        src = o * d_in + j
    else:
        src = j * d_out + o
    if bias:
        src[:, d_in] = d_out * d_in + np.arange(d_out)
    return src.reshape(-1)


def _permute(x, p, inverse: bool):
    np = _np()
    x = _arr(x)
    n = p.shape[0]
    if inverse:
        q = np.empty_like(p)
        q[p] = np.arange(n)
        p = q
    if x.ndim == 1 and x.shape[0] == n:
        return x[p]
    if x.ndim == 2 and x.shape == (n, n):
        return x[np.ix_(p, p)]
    raise ValueError(f"expected a vector [{n}] or a block [{n}, {n}], got shape {list(x.shape)}")


def from_parameter_layout(x: Any, weight_shape: Sequence[int], *, bias: bool = True,
                          weight_order: str = "row"):
    """A vector ``[P]`` or block ``[P, P]`` in parameter order ``[vec W, b]`` → maccore's
    ``vec_r([W | b])`` (see :func:`parameter_permutation`)."""
    return _permute(x, parameter_permutation(weight_shape, bias=bias, weight_order=weight_order), False)


def to_parameter_layout(x: Any, weight_shape: Sequence[int], *, bias: bool = True,
                        weight_order: str = "row"):
    """Inverse of :func:`from_parameter_layout`: maccore's ``vec_r([W | b])`` → ``[vec W, b]``."""
    return _permute(x, parameter_permutation(weight_shape, bias=bias, weight_order=weight_order), True)


def _commutation_perm(d_out: int, d_tilde: int):
    np = _np()
    o, j = np.meshgrid(np.arange(d_out), np.arange(d_tilde), indexing="ij")
    return (j * d_out + o).reshape(-1)  # ours[o·d̃ + j] = theirs[j·d_out + o]


def from_column_major(x: Any, d_out: int, d_tilde: int):
    """``vec_c(W̃)`` → ``vec_r(W̃)`` for ``W̃ [d_out, d̃]`` (vector or block): turns the
    literature's ``A ⊗ G`` into maccore's ``G ⊗ A``."""
    return _permute(x, _commutation_perm(int(d_out), int(d_tilde)), False)


def to_column_major(x: Any, d_out: int, d_tilde: int):
    """Inverse of :func:`from_column_major`: ``vec_r(W̃)`` → ``vec_c(W̃)``."""
    return _permute(x, _commutation_perm(int(d_out), int(d_tilde)), True)


def _check_choice(value: str, allowed: Sequence[str], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _curvlinops_scale(fisher_type: str, loss: str) -> float:
    _check_choice(fisher_type, CURVLINOPS_FISHER_TYPES, "fisher_type")
    _check_choice(loss, LOSSES, "loss")
    return 0.5 if (fisher_type == "empirical" and loss == "mse") else 1.0


def from_curvlinops(block: Any, weight_shape: Sequence[int], *, bias: bool = True,
                    fisher_type: str = "type-2", loss: str = "ce"):
    """A dense curvlinops block (``GGNLinearOperator``, ``EFLinearOperator``,
    ``FisherMCLinearOperator``, ``HessianLinearOperator`` or ``KFACLinearOperator`` with
    ``separate_weight_and_bias=False``, restricted to one layer's ``[weight, bias]``) → maccore's.

    Reorders from torch's parameter order and undoes the factor 2 of curvlinops' empirical Fisher
    for ``MSELoss`` (``fisher_type="empirical"``, ``loss="mse"``). ``fisher_type`` uses curvlinops'
    names (``"type-2"`` also stands for the GGN and the Hessian).
    """
    scale = _curvlinops_scale(fisher_type, loss)
    return scale * from_parameter_layout(block, weight_shape, bias=bias, weight_order="row")


def from_curvlinops_kfac(A: Any, G: Any, *, fisher_type: str = "type-2", loss: str = "ce"):
    """curvlinops' Kronecker factors (``input_covariances`` / ``gradient_covariances``) → maccore's
    ``(A, G)``. curvlinops uses maccore's split (``A`` a plain mean, bias last); only the
    empirical Fisher of ``MSELoss`` differs, by a factor 2 in ``G``."""
    return _arr(A), _curvlinops_scale(fisher_type, loss) * _arr(G)


def from_backpack_kfac(factors: Sequence[Any], *, output_locations: int = 1):
    """BackPACK's ``weight.kflr`` / ``weight.kfac`` list ``[G_bp, A_bp]`` → maccore factors
    ``(A_expand_w, G_reduce)``.

    ``output_locations`` is ``P = OH·OW`` for ``Conv2d`` (``1`` for ``Linear``). BackPACK's conv
    input factor is ``P·A_expand`` restricted to the weights (no bias row), its gradient factor is
    maccore's KFAC-*reduce* ``G``; so compare ``A_expand_w`` with
    ``curvature_blocks(..., kind="kfac-expand")[layer][0][:-1, :-1]`` (without the ``[:-1, :-1]``
    for a layer without bias) and ``G_reduce`` with ``kind="kfac-reduce"``'s ``G``. For ``Linear``
    layers both settings coincide.
    """
    if len(factors) != 2:
        raise ValueError(f"expected BackPACK's two factors [G, A], got {len(factors)}")
    p = int(output_locations)
    if p < 1:
        raise ValueError(f"output_locations must be >= 1, got {output_locations!r}")
    G_bp, A_bp = (_arr(f) for f in factors)
    return A_bp / p, G_bp


def from_kfac_jax(block: Any, kernel_shape: Sequence[int], *, bias: bool = True,
                  estimator: str = "ggn", batch_size: int | None = None):
    """A kfac-jax dense block of a Flax ``Dense`` layer over ``[kernel.flatten(), bias]``
    (``kernel [d_in, d_out]``) → maccore's.

    ``estimator="empirical"`` multiplies by ``batch_size`` (kfac-jax's empirical Fisher divides by
    the batch size once more than maccore's); ``"ggn"`` / ``"fisher"`` only reorder.
    """
    _check_choice(estimator, ("ggn", "fisher", "empirical"), "estimator")
    d_in, d_out = (int(s) for s in kernel_shape)
    out = from_parameter_layout(block, (d_out, d_in), bias=bias, weight_order="column")
    if estimator == "empirical":
        if batch_size is None or int(batch_size) < 1:
            raise ValueError("from_kfac_jax: estimator='empirical' needs batch_size >= 1")
        out = out * int(batch_size)
    return out
