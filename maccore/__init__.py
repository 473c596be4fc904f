"""maccore: framework-agnostic curvature core (MAC, exact KFAC, SINGD) on any Array-API backend.

Every function takes arrays of any Array-API namespace (numpy, cupy, torch, jax.numpy,
array_api_strict) and returns the same namespace, device and dtype as its main input.
Conventions (row-major, bias last, canonical A/G split): see ``docs/conventions.md``.
"""

from maccore import checkpoint  # noqa: F401  (portable checkpoints: maccore.checkpoint)
from maccore._typing import Preconditioner
from maccore._xp import check_period, is_due
from maccore.ema import EmaState, ema_debiased, ema_init, ema_update
from maccore.kfac import (
    DecompositionError,
    KfacState,
    damped_inverse,
    gradient_factor,
    input_factor,
    kfac,
    kfac_apply,
    kfac_dense,
    kl_clip_scale,
    pi_dampings,
)
from maccore.mac import (
    MacState,
    attention_probs,
    attention_weighted_mean,
    gradient_diagonal,
    mac,
    first_layer_apply,
    mac_apply,
    mean_activation,
    split_qkv,
)
from maccore import structures
from maccore.singd import SingdState, singd, singd_statistics
from maccore import engine
from maccore.engine import CurvatureMethod, kfac_method, mac_method, singd_method
from maccore.rows import (
    ConvSpec,
    KFACType,
    LayerKind,
    LayerSpec,
    QkvSpec,
    conv2d_grad_rows,
    conv2d_mean_patch,
    conv2d_output_size,
    conv2d_rows,
    grad_matrix,
    grad_rows,
    linear_rows,
    split_grad_matrix,
    to_grad_rows,
    to_rows,
)

__version__ = "0.1.0"

__all__ = [
    "ConvSpec",
    "CurvatureMethod",
    "DecompositionError",
    "EmaState",
    "KFACType",
    "KfacState",
    "LayerKind",
    "LayerSpec",
    "MacState",
    "Preconditioner",
    "QkvSpec",
    "SingdState",
    "attention_probs",
    "attention_weighted_mean",
    "check_period",
    "conv2d_grad_rows",
    "conv2d_mean_patch",
    "conv2d_output_size",
    "conv2d_rows",
    "damped_inverse",
    "ema_debiased",
    "ema_init",
    "ema_update",
    "engine",
    "first_layer_apply",
    "grad_matrix",
    "grad_rows",
    "gradient_diagonal",
    "gradient_factor",
    "input_factor",
    "is_due",
    "kfac",
    "kfac_apply",
    "kfac_dense",
    "kfac_method",
    "kl_clip_scale",
    "linear_rows",
    "mac",
    "mac_apply",
    "mac_method",
    "mean_activation",
    "pi_dampings",
    "singd",
    "singd_method",
    "singd_statistics",
    "split_grad_matrix",
    "split_qkv",
    "structures",
    "to_grad_rows",
    "to_rows",
]
