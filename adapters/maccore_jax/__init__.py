"""maccore_jax: MAC/SMAC, exact KFAC and SINGD as optax transformations — a thin adapter over the
core's curvature engine (:mod:`maccore.engine`, shared with ``maccore_torch``) — with capture
helpers for Flax and Equinox.

- :func:`mac` / :func:`kfac` / :func:`singd`: full optimizers (preconditioner → momentum and weight
  decay in ``weight_decay_mode`` ``"decoupled"`` or ``"coupled"`` → learning rate, the update of
  ``maccore_torch``); :func:`scale_by_mac` / :func:`scale_by_kfac` / :func:`scale_by_singd`: the
  preconditioners alone. All are ``optax.GradientTransformationExtraArgs``:
  ``tx.update(grads, state, params, activations=acts[, output_grads=gouts])``. Same keyword names,
  defaults and meaning as ``maccore_torch`` (``stat_decay``, ``damping``, ``damping_mode``,
  ``kfac_approx``, ``t_cov``, ``t_inv``, ``scale``, ``diagonal``, ``weight_decay_mode``,
  ``loss_average``, ``reduction_factor``, ``skip_layers``).
- :func:`fit_first_layer`: MAC's first-layer true inverse in an optimizer state.
- Layers: :class:`Dense`, :class:`Conv` (declared geometry), :data:`QKV` (fused attention
  projection, or with ``layout="v"`` the value projection of separate q/k/v projections, whose
  activation is an :class:`AttentionInput` with the probabilities), layouts ``"flax"`` and
  ``"equinox"``.
- Capture: :mod:`maccore_jax.linen`, :mod:`maccore_jax.nnx`, :mod:`maccore_jax.equinox` (imported
  lazily), each with ``apply`` (output and layer inputs from one forward), ``output_zeros`` (the
  perturbations whose gradients are the layer output gradients, for KFAC/SMAC/SINGD) and
  ``layer_specs``.
- Any :class:`maccore.CurvatureMethod` (``mac_method``, ``kfac_method``, ``singd_method``)
  plugs into :func:`scale_by_curvature`.
- Reliability: ``on_nonfinite="skip"`` (default) / :func:`skip_nonfinite` skip a step with NaN/Inf
  exactly (zero updates, state unchanged); :func:`save_portable` / :func:`load_portable` write and
  read framework-neutral checkpoints (:mod:`maccore.checkpoint`) that ``maccore_torch`` reads too.
"""

from __future__ import annotations

import importlib
import warnings

from maccore.engine import CurvatureMethod, kfac_method, mac_method, singd_method

from maccore_jax.first_layer import fit_first_layer
from maccore_jax.optimizers import MomentumState, kfac, mac, momentum, scale_by_kfac, scale_by_mac
# (imported from the submodule, which is then loaded: ``maccore_jax.singd`` is the function)
from maccore_jax.singd import scale_by_singd, singd
from maccore_jax.portable import load_portable, save_portable
from maccore_jax.report import report
from maccore_jax.specs import QKV, AttentionInput, Conv, Dense, Layer
from maccore_jax.transform import (CurvatureState, MultiSteps, scale_by_curvature,
                                 skip_nonfinite)
from maccore_jax import testing  # noqa: F401,E402  (maccore_jax.testing.curvature_blocks)

__all__ = [
    "AttentionInput",
    "Conv",
    "CurvatureMethod",
    "CurvatureState",
    "Dense",
    "Layer",
    "MomentumState",
    "MultiSteps",
    "QKV",
    "equinox",
    "fit_first_layer",
    "kfac",
    "kfac_method",
    "linen",
    "load_portable",
    "mac",
    "mac_method",
    "momentum",
    "nnx",
    "report",
    "save_portable",
    "scale_by_curvature",
    "scale_by_kfac",
    "scale_by_mac",
    "scale_by_singd",
    "singd",
    "singd_method",
    "skip_nonfinite",
]

_LAZY = ("linen", "nnx", "equinox")
_DEPRECATED = {"Method": "CurvatureMethod"}  # the adapter's former plug-in type: the core protocol


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"maccore_jax.{name}")
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(f"maccore_jax.{name} is deprecated; use maccore.{new}", DeprecationWarning,
                      stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module 'maccore_jax' has no attribute {name!r}")
