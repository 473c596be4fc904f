"""maccore: framework-agnostic curvature core (MAC, exact KFAC, SINGD) on any Array-API backend."""

from maccore._typing import Preconditioner
from maccore._xp import is_due
from maccore.ema import EmaState, ema_debiased, ema_init, ema_update

__version__ = "0.1.0"

__all__ = [
    "Preconditioner",
    "is_due",
    "EmaState",
    "ema_init",
    "ema_update",
    "ema_debiased",
]
