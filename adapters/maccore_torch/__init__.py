"""maccore_torch: thin PyTorch adapter over the backend-neutral ``maccore`` core.

- :class:`MAC` / :class:`MACPreconditioner` — MAC and SMAC (docs/math.md), reference-exact.
- :class:`KFAC` / :class:`KFACPreconditioner` — exact KFAC with canonical factor scaling (§1).
- :func:`layer_spec` — the type registry (``functools.singledispatch``) deciding which modules are
  preconditioned; :data:`QKV` (= :class:`maccore.QkvSpec`) declares fused qkv projections;
  :class:`AttentionModule` declares attention modules that return their probabilities
  (separate q/k/v projections, Hugging Face eager attention; :func:`find_attention` /
  ``attention="auto"`` finds them).

The adapter only discovers layers, captures arrays with hooks and moves gradients; each optimizer
drives a :class:`maccore.engine.CurvatureMethod` (statistics, pooling, schedule, update, refresh,
apply: every formula lives in ``maccore``). Modules: ``specs`` (layer discovery), ``hooks`` and
``attention`` (capture), ``numerics`` (finite checks, GradScaler), ``distributed`` (all-reduce),
``_base`` (the driver), ``optimizer`` (momentum / weight decay), ``report``.
``opt.report()`` prints which parameter got which preconditioner.
:func:`save_portable` / :func:`load_portable` write and read framework-neutral checkpoints
(:mod:`maccore.checkpoint`) that ``maccore_jax`` reads too.
"""

from maccore import QkvSpec

from maccore_torch._base import HookedPreconditioner
from maccore_torch.attention import AttentionModule
from maccore_torch.kfac import KFAC, KFACPreconditioner
from maccore_torch.mac import MAC, MACPreconditioner
from maccore_torch.optimizer import CurvatureOptimizer
from maccore_torch.portable import load_portable, save_portable
from maccore_torch.singd import SINGD, SINGDPreconditioner
from maccore_torch.specs import UnsupportedLayerError, discover_layers, find_attention, layer_spec
from maccore_torch import testing  # noqa: F401,E402  (maccore_torch.testing.curvature_blocks)

QKV = QkvSpec

__all__ = [
    "AttentionModule",
    "KFAC",
    "KFACPreconditioner",
    "MAC",
    "MACPreconditioner",
    "QKV",
    "SINGD",
    "SINGDPreconditioner",
    "QkvSpec",
    "CurvatureOptimizer",
    "HookedPreconditioner",
    "UnsupportedLayerError",
    "discover_layers",
    "find_attention",
    "layer_spec",
    "load_portable",
    "save_portable",
]
