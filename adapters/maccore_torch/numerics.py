"""Finite checks and mixed precision: what the torch adapter needs beyond the core's maths.

- :func:`all_finite`: whether every gradient and statistic of a step is finite, with ONE host
  sync per step (``maccore.engine.all_finite`` semantics, fused per device and dtype);
- :func:`max_abs`: the largest magnitude per device and dtype, with one host sync (the checked
  optimizer step's bounds);
- :func:`stats_mode`: no autograd and no autocast while statistics are computed (float32 or
  float64 statistics whatever the autocast dtype);
- :class:`LossScale`: the ``torch.amp.GradScaler`` seen by the hooks — the loss scale of the
  backward in progress (the engine divides output gradients by it) and the detection of statistics
  that belong to a step the scaler skipped.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch

import maccore

__all__ = ["LossScale", "all_finite", "max_abs", "stats_mode"]


def _fused_flag(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """0-d ``True`` where every tensor (one device, one dtype) is finite, with one fused kernel:
    the ``GradScaler`` check ``torch._amp_foreach_non_finite_check_and_unscale_`` at scale 1 (×1
    leaves every value bit for bit unchanged). ``None`` where that private kernel is unavailable."""
    fused = getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None)
    if fused is None:
        return None
    dev = tensors[0].device
    found = torch.zeros((), dtype=torch.float32, device=dev)
    try:
        fused(tensors, found, torch.ones((), dtype=torch.float32, device=dev))
    except (NotImplementedError, RuntimeError, TypeError):  # device / dtype without the kernel
        return None
    return found == 0


# Tensors with fewer elements are concatenated per device and dtype for one reduction by
# :func:`max_abs`; larger ones are reduced where they live.
_TINY = 1 << 12


def max_abs(tensors: list) -> dict | None:
    """``{(device, dtype): max |x|}`` over the floating tensors of ``tensors`` (``None`` skipped;
    NaN where one holds a NaN, ``inf`` where one holds an Inf), read-only (nothing written into
    the tensors), one host sync. ``None`` where a tensor cannot be reduced this way (sparse, a
    tensor subclass such as FSDP2's DTensor, a device without the kernel)."""
    groups: dict[tuple, list] = {}
    for t in tensors:
        if t is None or not t.is_floating_point():
            continue
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.is_sparse:
            return None
        groups.setdefault((t.device, t.dtype), []).append(t)
    out = {}
    with torch.no_grad():
        try:
            for key, ts in groups.items():
                # one aminmax per tensor, except that the tiny ones are concatenated first
                # (copying them costs less than a reduction call each). Measured in the running
                # step, right after the backward pass (old threshold 65536 → 4096 elements):
                # the benchmarks' CNN (8 gradients) 184 → 137 µs, ViT (31) 224 → 186 µs, a
                # 34-layer MLP of width 64 (68) 297 → 265 µs
                tiny = [t.reshape(-1) for t in ts if 0 < t.numel() < _TINY]
                ext = [v for t in ts if t.numel() >= _TINY for v in torch.aminmax(t)]
                if tiny:
                    ext += torch.aminmax(torch.cat(tiny) if len(tiny) > 1 else tiny[0])
                if ext:
                    out[key] = torch.stack(ext).abs().amax()
            if len(out) == 1:
                (key, v), = out.items()
                return {key: v.item()}
            # in float64 on the host: exact for every floating dtype (float32 would turn a
            # finite float64 magnitude beyond its range into inf)
            vals = torch.stack([v.to("cpu").double() for v in out.values()]).tolist() if out else []
        except (NotImplementedError, RuntimeError, TypeError):  # a device / dtype without the kernel
            return None
    return dict(zip(out, vals))


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether every floating entry of ``tensors`` (``None`` skipped) is finite, with one host sync.
    Sharded tensors (FSDP2 DTensors) are checked on their local shards and the answer is agreed
    over their meshes (one small all-reduce), so every rank skips the same steps."""
    from maccore_torch import distributed  # noqa: PLC0415

    local, groups = distributed.localize(tensors)
    flag = _local_all_finite(local)
    return distributed.agree(flag, groups) if groups else flag


def _local_all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """:func:`all_finite` on plain tensors, with one host sync.

    Per (device, dtype) one fused kernel (:func:`_fused_flag`); tensors that are part of a graph
    (``create_graph=True``), sparse ones and groups without the kernel go through the public
    :func:`maccore.engine.all_finite` (one reduction per tensor)."""
    fused: dict[tuple, list[torch.Tensor]] = {}
    rest: dict[Any, list[torch.Tensor]] = {}
    for t in tensors:
        if t is None or not t.is_floating_point():
            continue
        if t.requires_grad or t.is_sparse:
            rest.setdefault(t.device, []).append(t.detach())
        else:
            fused.setdefault((t.device, t.dtype), []).append(t)
    flags = []
    for (dev, _), group in fused.items():
        flag = _fused_flag(group)
        if flag is None:
            rest.setdefault(dev, []).extend(group)
        else:
            flags.append(flag)
    for group in rest.values():
        group = [t.to_dense() if t.is_sparse else t for t in group]
        flags.append(maccore.engine.all_finite(group))
    if not flags:
        return True
    if len(flags) == 1:
        return bool(flags[0])
    dev = flags[0].device
    return bool(torch.stack([f.to(dev) for f in flags]).all())


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled() if device_type == "cuda" else True
    except RuntimeError:  # device types without autocast support
        return False


@contextlib.contextmanager
def _no_grad_no_autocast(device_type: str):
    with torch.no_grad():
        try:
            ctx = torch.autocast(device_type=device_type, enabled=False)
        except Exception:  # device types without autocast support
            ctx = contextlib.nullcontext()
        with ctx:
            yield


def stats_mode(t: torch.Tensor):
    """No autograd and no autocast while statistics are computed (float32 statistics, T11).

    Outside autocast regions this is a plain ``torch.no_grad()`` (building an autocast context on
    every hook call costs more than the statistic of a small layer)."""
    device_type = t.device.type
    if _autocast_enabled(device_type):
        return _no_grad_no_autocast(device_type)
    return torch.no_grad()


class LossScale:
    """The loss scale of a ``torch.amp.GradScaler`` (``None``: no scaler, scale 1).

    ``scaler.step(opt)`` does not call ``opt.step()`` after an overflow and ``scaler.update()``
    then lowers the scale, so statistics gathered at a scale other than the current one belong to
    an abandoned step: :meth:`changed` (called at every collecting forward of the model, one
    ``get_scale()`` each) says so. :meth:`current` is the scale of the backward in progress, read
    from that stamp (no device sync in the gradient hooks).
    """

    def __init__(self, scaler: Any):
        if scaler is not None and not all(hasattr(scaler, a) for a in ("get_scale", "is_enabled")):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}"
            )
        self.scaler = scaler
        self._stamp: float | None = None

    @property
    def enabled(self) -> bool:
        return self.scaler is not None and bool(self.scaler.is_enabled())

    def changed(self) -> bool:
        """Record the scale of this forward; ``True`` when it differs from the one the step's
        statistics so far were gathered at."""
        scale = float(self.scaler.get_scale())
        changed = self._stamp is not None and scale != self._stamp
        self._stamp = scale
        return changed

    def current(self) -> float:
        """The loss scale of the backward in progress (1.0 without an enabled scaler)."""
        if not self.enabled:
            return 1.0
        return self._stamp if self._stamp is not None else float(self.scaler.get_scale())

    def reset(self) -> None:
        self._stamp = None
