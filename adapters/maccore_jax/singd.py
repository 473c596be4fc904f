"""SINGD / IKFAC (docs/math.md) as optax transformations: :func:`scale_by_singd` (the preconditioner
``C Cᵀ ∇W̃ K Kᵀ`` per layer, the core's :func:`maccore.singd_method` driven by
:func:`maccore_jax.scale_by_curvature`) and :func:`singd` (the full optimizer of the published
``singd`` package: weight decay added AFTER preconditioning, heavy-ball momentum, learning rate;
``d = ĝ + γ W``, ``b ← α2 b + d``, ``W ← W − β2 b``; docs/math.md).

``tx.update(grads, state, params, activations=acts, output_grads=gouts)``: on steps with
``count % T == 0`` the layer inputs and output gradients give ``H_K = Π_K(Kᵀ A K)`` and
``H_C = Π_C(Cᵀ G C)`` with ``A = E_rows[x̃x̃ᵀ]`` and ``G = (1/R) Σ g gᵀ``; ``R`` follows
``loss_average`` like ``maccore_torch.SINGD`` (``"batch"``, ``"batch+sequence"``, ``None``) unless
``reduction_factor=`` (here or per ``update``) is given. An ``lr_cov`` schedule is evaluated at the
step count of the update, as ``maccore_torch.SINGD`` does. The per-layer state is the core's
:class:`maccore.SingdState`. ``axis_name``: ``H_K`` and ``H_C`` are averaged across devices (they
are linear in ``A`` and ``G``: equal shards give the statistics of the union).

The implementation lives in :mod:`maccore_jax.optimizers`; this module keeps the import path.
"""

from __future__ import annotations

from maccore.engine import singd_method

from maccore_jax.optimizers import scale_by_singd, singd

__all__ = ["scale_by_singd", "singd", "singd_method"]
