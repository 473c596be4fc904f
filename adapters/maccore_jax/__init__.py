"""maccore_jax: MAC and exact KFAC as optax transformations, with capture helpers for Flax and Equinox.

- :func:`mac` / :func:`kfac`: full optimizers (preconditioner → heavy-ball momentum → decoupled weight
  decay → learning rate); :func:`scale_by_mac` / :func:`scale_by_kfac`: the preconditioners alone.
  All are ``optax.GradientTransformationExtraArgs``:
  ``tx.update(grads, state, params, activations=acts[, output_grads=gouts])``.
- Layers: :class:`Dense`, :class:`Conv` (declared geometry), :data:`QKV` (fused attention projection),
  layouts ``"flax"`` and ``"equinox"``.
- Capture: :mod:`maccore_jax.linen`, :mod:`maccore_jax.nnx`, :mod:`maccore_jax.equinox` (imported
  lazily), each with ``apply`` (output and layer inputs from one forward), ``output_zeros`` (the
  perturbations whose gradients are the layer output gradients, for KFAC) and ``layer_specs``.
- New methods plug into :func:`scale_by_curvature` as a :class:`Method`.
- Reliability: ``on_nonfinite="skip"`` (default) / :func:`skip_nonfinite` skip a step with NaN/Inf
  exactly (zero updates, state unchanged); :func:`save_portable` / :func:`load_portable` write and
  read framework-neutral checkpoints (:mod:`maccore.checkpoint`) that ``maccore_torch`` reads too.
"""

from __future__ import annotations

import importlib

from maccore_jax.portable import load_portable, save_portable
from maccore_jax.singd import SingdLayerState, scale_by_singd, singd, singd_method
from maccore_jax.specs import QKV, Conv, Dense, Layer
from maccore_jax.transform import (
    AttentionMacState,
    CurvatureState,
    Method,
    MomentumState,
    kfac,
    kfac_method,
    mac,
    mac_method,
    momentum,
    scale_by_curvature,
    scale_by_kfac,
    scale_by_mac,
    skip_nonfinite,
)

__all__ = [
    "AttentionMacState",
    "Conv",
    "CurvatureState",
    "Dense",
    "Layer",
    "Method",
    "MomentumState",
    "QKV",
    "equinox",
    "kfac",
    "kfac_method",
    "linen",
    "load_portable",
    "mac",
    "mac_method",
    "momentum",
    "nnx",
    "save_portable",
    "scale_by_curvature",
    "scale_by_kfac",
    "scale_by_mac",
    "scale_by_singd",
    "singd",
    "singd_method",
    "SingdLayerState",
    "skip_nonfinite",
]

_LAZY = ("linen", "nnx", "equinox")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"maccore_jax.{name}")
    raise AttributeError(f"module 'maccore_jax' has no attribute {name!r}")
