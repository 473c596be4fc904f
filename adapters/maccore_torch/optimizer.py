"""``torch.optim.Optimizer`` front end: one preconditioner + the momentum / weight-decay update.

:class:`CurvatureOptimizer` owns a :class:`maccore_torch.HookedPreconditioner`; ``step()`` lets
it precondition ``.grad`` (skipping the whole step when it reports non-finite values) and then
applies the update of docs/math.md per param group (torch's fused SGD kernel where it is exact,
``torch._foreach_*`` ops otherwise: :func:`_momentum_update`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping

import torch
from torch import nn

import maccore.engine
from maccore_torch import distributed
from maccore_torch.numerics import all_finite
from maccore_torch.numerics import max_abs as _max_abs

__all__ = ["CurvatureOptimizer"]

_WD_MODES = ("coupled", "decoupled")


def _foreach_copy(dst: list, src: list) -> None:
    """``torch._foreach_copy_``; per tensor for FSDP2 DTensors (no foreach sharding rule)."""
    if any(distributed.is_sharded(t) for t in dst):
        for d, s in zip(dst, src):
            d.copy_(s)
    else:
        torch._foreach_copy_(dst, src)


def _bounds(group: Mapping, g: float, p: float, b: float) -> tuple[float, float, float]:
    """``(peak, p', b')`` for the update of ``group`` given g ≥ |ĝ|, p ≥ |p| and b ≥ |b|: bounds
    on every value it computes, on the new |p| and on the new |b| (the triangle inequality per
    rule): ĝ' = ĝ + wd·p, b' = μb + ĝ', d = ĝ' + μb' (Nesterov), p' = (1 − η·wd)p − ηd."""
    lr, mu, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
    coupled = group["weight_decay_mode"] == "coupled"
    gp = g + (wd * p if coupled else 0.0)
    bn = mu * b + gp
    d = gp + mu * bn if group["nesterov"] else bn
    kept = p if coupled else abs(1.0 - lr * wd) * p
    pn = kept + lr * d
    return max(gp, bn, d, p, kept, pn), pn, bn


# Accepted in-place steps between two measurements of |p| and |b|; in between, bounds carried
# from the last measurement through each update stand in (CurvatureOptimizer._bounded_step).
_REMEASURE = 64

# torch's fused SGD kernel (``torch._fused_sgd_``, what ``torch.optim.SGD(fused=True)`` runs):
# weight decay, momentum and the parameter update in one pass per tensor instead of four (a
# temporary ĝ + wd·p, b·μ, b + ĝ', p − ηb), for the dtypes where it is exact. Its CPU kernel gives
# wrong results for bfloat16 / float16 in torch 2.13 (measured: |error| ≈ 0.4 after one step of
# unit-scale values), so those take the ``_foreach_*`` ops.
_FUSED_DTYPES = (torch.float32, torch.float64)
_FUSED_TYPES = (torch.Tensor, nn.Parameter)


def _fusable(p: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch's fused kernel computes the update of ``p`` exactly: float32/float64 dense
    tensors of one device, all three contiguous (or all channels-last) with the same strides —
    the fused CPU kernel walks the three buffers in step, so mixed layouts would pair wrong
    elements (measured: a channels-last parameter with a contiguous buffer)."""
    return (type(p) in _FUSED_TYPES and type(g) is torch.Tensor and type(b) is torch.Tensor
            and p.dtype in _FUSED_DTYPES and p.device.type in ("cpu", "cuda")
            and g.dtype == p.dtype == b.dtype and g.device == p.device == b.device
            and g.layout == torch.strided == b.layout and p.stride() == g.stride() == b.stride()
            and (p.is_contiguous() or (p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last))))


def _momentum_update(group: Mapping, ps: list, gs: list, bufs: list, fresh: list[int]) -> None:
    """The update of :class:`CurvatureOptimizer` for one param group, in place on ``ps`` (the
    parameters) and ``bufs`` (their momentum buffers; ``bufs[i]`` for ``i`` in ``fresh``: a new
    buffer, uninitialised, that this step sets to ĝ'); ``gs`` (the gradients) are only read.
    Float32/float64 dense tensors on CPU/CUDA take torch's fused SGD kernel (Nesterov's first
    step excepted: its d = ĝ' is not torch's), the others ``torch._foreach_*`` ops."""
    if not ps:
        return
    lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
    coupled, nesterov = group["weight_decay_mode"] == "coupled", group["nesterov"]
    if not coupled and wd != 0:
        torch._foreach_mul_(ps, 1.0 - lr * wd)  # independent of the momentum: first
    new = set(fresh)
    fused: dict[tuple, list[int]] = {}
    rest = []
    for i, (p, g, b) in enumerate(zip(ps, gs, bufs)):
        if mu != 0 and not (nesterov and i in new) and _fusable(p, g, b):
            fused.setdefault((p.device, p.dtype, i in new), []).append(i)
        else:
            rest.append(i)
    for (_, _, first), idx in fused.items():
        torch._fused_sgd_([ps[i] for i in idx], [gs[i] for i in idx], [bufs[i] for i in idx],
                          weight_decay=wd if coupled else 0.0, momentum=mu, lr=lr, dampening=0.0,
                          nesterov=nesterov, maximize=False, is_first_step=first)
    if not rest:
        return
    ps, gs, bufs = [ps[i] for i in rest], [gs[i] for i in rest], [bufs[i] for i in rest]
    first = [k for k, i in enumerate(rest) if i in new]
    old = [k for k, i in enumerate(rest) if i not in new]
    if coupled and wd != 0:
        gs = list(torch._foreach_add(gs, ps, alpha=wd))
    if first:
        _foreach_copy([bufs[k] for k in first], [gs[k] for k in first])
    if old:
        old_b = [bufs[k] for k in old]
        torch._foreach_mul_(old_b, mu)
        torch._foreach_add_(old_b, [gs[k] for k in old])
    if nesterov:
        ds = list(torch._foreach_add(gs, bufs, alpha=mu))
        for k in first:  # first step: d = ĝ'
            ds[k] = gs[k]
    else:
        ds = bufs
    torch._foreach_add_(ps, ds, alpha=-lr)


class CurvatureOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` = a :class:`maccore_torch.HookedPreconditioner` + momentum and weight decay.

    Per parameter (preconditioned or not), with ĝ its (preconditioned) gradient, per param group:
    ``"coupled"`` (docs/math.md CIFAR): d = ĝ + wd·p, b = μb + d, p ← p − ηb;
    ``"decoupled"``: b = μb + ĝ, p ← (1 − η·wd)p − ηb;
    ``nesterov=True`` (nanoGPT ``nag_step``): first step b = ĝ', d = ĝ'; later b = μb + ĝ',
    d = ĝ' + μb, then the weight-decay rule above (ĝ' = ĝ + wd·p when coupled).
    """

    def __init__(self, model: nn.Module, params: Any, defaults: dict,
                 make_preconditioner: Callable[..., Any]):
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self._check_group(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        flat = [p for g in self.param_groups for p in g["params"]]
        self.preconditioner = make_preconditioner(params=flat)
        # (signature, {(device, dtype): (bound on |p|, bound on |b|)}, steps since measured) of
        # the last in-place update, or None (_bounded_step)
        self._track: tuple | None = None
        # {id(layer): (â, its version)} of MAC states known to be finite (_bounded_step)
        self._finite: dict[int, tuple] = {}

    @staticmethod
    def _check_group(group: Mapping) -> None:
        for key in ("lr", "momentum", "weight_decay"):
            v = group.get(key, 0.0)
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = float(v)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{key} must be a number, got {type(v).__name__} {v!r}")
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{key} must be >= 0 and finite, got {group[key]!r}")
        if not isinstance(group.get("nesterov", False), bool):
            raise TypeError(f"nesterov must be True or False, got {group['nesterov']!r}")
        if group.get("weight_decay_mode", "coupled") not in _WD_MODES:
            raise ValueError(f"weight_decay_mode must be one of {_WD_MODES}, got {group['weight_decay_mode']!r}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._track = None
        if hasattr(self, "preconditioner"):
            self._check_group(self.param_groups[-1])
            # the new parameters' layers are preconditioned too (or listed as skipped, with why)
            self.preconditioner.add_params(self.param_groups[-1]["params"])

    @property
    def t(self) -> int:
        """Number of completed (not skipped) optimizer steps."""
        return self.preconditioner.t

    @property
    def count(self) -> int:
        """The step counter under its name in the core and in ``maccore_jax`` (= :attr:`t`)."""
        return self.preconditioner.t

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Precondition the gradients and apply the update. With ``on_nonfinite`` set (default
        ``"skip"``) the new parameter values and momentum buffers are computed out of place and
        written only when they, the refreshed preconditioners and the preconditioned gradients
        are all finite; otherwise the step is skipped exactly (parameters, momenta, curvature
        state and step count bit for bit unchanged; see :meth:`HookedPreconditioner.step`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"]]
        pre = self.preconditioner
        pending = pre._prepare(params, measure=pre.on_nonfinite is not None)
        if pending is None:
            self._drop_reset_momenta()
            return loss
        # in place: without checks (no device sync), or when a magnitude bound proves the new
        # values finite (one sync); otherwise out of place below, decided exactly
        if pre.on_nonfinite is None or self._bounded_step(pending.checked(grads=False), pending):
            pre._commit(pending)
            for group in self.param_groups:
                self._update_group(group)
            if pre.on_nonfinite is not None and self._track is not None:
                # the bounds of the values just written, valid until anything else writes them
                self._track = (self._signature(), *self._track[1:])
            return loss
        plans = [self._plan_group(group) for group in self.param_groups]
        # finite new values imply finite momenta and preconditioned gradients (p - lr·b with a
        # non-finite b is non-finite, also at lr = 0): the states and the new values suffice
        new = [t for plan in plans for t in plan[1]]
        if not all_finite(pending.checked(grads=False) + new):
            pre._reject(pending, {id(p): [v, b] for plan in plans for p, v, b in zip(*plan)})
            self._drop_reset_momenta()
            return loss
        pre._commit(pending)
        for ps, values, bufs in plans:
            if not ps:
                continue
            _foreach_copy(ps, values)
            olds, news = [], []
            for p, b in zip(ps, bufs):
                state = self.state[p]
                old = state.get("momentum_buffer")
                if old is None:
                    state["momentum_buffer"] = b
                else:
                    olds.append(old)
                    news.append(b)
            if olds:
                _foreach_copy(olds, news)
        return loss

    def _bounded_step(self, states: list, pending: Any = None) -> bool:
        """Whether the in-place update (:meth:`_update_group`) is certain to write finite values:
        every preconditioned gradient ĝ, parameter, momentum buffer and new state is finite and the
        update cannot overflow. Decided from magnitudes per device and dtype (read-only
        reductions, at most one host sync, nothing written): G bounding |ĝ| and |state|, and P
        and B bounding |p| and |b|; every value the update computes is bounded by its arithmetic
        applied to them (:func:`_bounds`) and must stay below 1/16 of the dtype's largest value.

        G: the new states (of the layers this step changed) are measured; so are the
        preconditioned gradients, except where the raw gradients' largest magnitude (read by the
        step's first check, ``pending.raw``) bounds them — gradients left as they are (κ = 1) and
        layers whose method bounds its growth κ (:func:`maccore.engine.apply_gain_bound`: MAC)
        with a state known to be finite (measured when it was made, or through its gradients) —
        so on most steps of a MAC model nothing is read here. P and B are measured every
        ``_REMEASURE`` steps and whenever a parameter or momentum buffer was written or replaced
        since the last step (torch's version counter and data pointer); in between, the bounds
        of the last update stand in (rounding included). (Writes through ``.data`` bypass the
        version counter: they are seen at the next measurement.) ``False`` (a magnitude not
        finite, the bound too large, a sharded or sparse gradient): the caller takes the
        out-of-place path, which decides exactly (docs/numerics.md)."""
        keys = []
        for group in self.param_groups:
            gkeys = set()
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if (g.is_sparse or g.requires_grad or distributed.is_sharded(p)
                        or distributed.is_sharded(g) or not p.is_floating_point()):
                    return False
                gkeys.add((p.device, p.dtype))
            keys.append(gkeys)
        raw = None if pending is None else pending.raw
        gain: dict[tuple, float] = {}  # per key: the largest κ of the gradients bounded by raw
        measure, trusted = self._gradients_to_measure(pending, gain) if raw is not None \
            else ([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None], [])
        sig = self._signature()
        track = self._track
        fresh = track is None or track[2] >= _REMEASURE or track[0] != sig
        if fresh:
            params = [p for g in self.param_groups for p in g["params"]]
            bufs = [b for p in params if (b := self._buffer(p)) is not None]
            held = _max_abs(params + bufs)
            if held is None:
                self._track = None
                return False
            held = {k: (v, v) for k, v in held.items()}
        else:
            held = track[1]
        read = measure + [t for t in states if t is not None]
        mags = _max_abs(read) if read else {}
        if mags is None:
            self._track = None
            return False
        for key, m in (raw or {}).items():  # gradients bounded by the step's first check
            mags[key] = max(mags.get(key, 0.0), m * gain.get(key, 1.0))
        after = {}
        for key in set(mags) | set(held) | {k for ks in keys for k in ks}:
            g = mags.get(key, 0.0)
            p, b = held.get(key, (0.0, 0.0))
            limit = torch.finfo(key[1]).max / 16
            if not (g < limit and p < limit and b < limit):  # (NaN compares False)
                self._track = None
                return False
            peak, pn, bn = g, p, b
            for group, gkeys in zip(self.param_groups, keys):
                if key in gkeys:
                    top, pg, bg = _bounds(group, g, p, b)
                    peak, pn, bn = max(peak, top), max(pn, pg), max(bn, bg)
            if not max(peak, pn, bn) < limit:
                self._track = None
                return False
            grow = 1.0 + 16 * torch.finfo(key[1]).eps  # the update's rounding
            after[key] = (pn * grow, bn * grow)
        self._track = (None, after, 1 if fresh else track[2] + 1)
        for layer, mean in trusted:  # finite now: measured, or behind finite gradients
            self._finite[id(layer)] = (mean, mean._version)
        return True

    def _gradients_to_measure(self, pending: Any, gain: dict) -> tuple[list, list]:
        """``(gradients whose |ĝ| must be read, [(layer, â) known finite once this step's check
        passes])`` for :meth:`_bounded_step`; fills ``gain`` with the largest κ per key of the
        layers whose ĝ the raw magnitudes bound instead."""
        pre = self.preconditioner
        measure, trusted = [], []
        for i, layer in enumerate(pre.layers):
            grads = [p.grad for p in (layer.weight, layer.bias) if p is not None and p.grad is not None]
            if not grads:
                continue
            state = pending.states[i]
            kappa = maccore.engine.apply_gain_bound(pre.curvature, layer.spec, state)
            mean = getattr(state, "mean_hat", None)
            known = self._finite.get(id(layer))
            finite = i in pending.changed or (known is not None and known[0] is mean
                                              and known[1] == mean._version)
            if kappa is None or not finite:
                measure += grads
            else:
                key = (layer.weight.device, layer.weight.dtype)
                gain[key] = max(gain.get(key, 1.0), kappa)
            if kappa is not None:
                trusted.append((layer, mean))
        return measure, trusted

    def _buffer(self, p: torch.Tensor) -> torch.Tensor | None:
        """``p``'s momentum buffer, ``None`` before its first step (nothing added to the state)."""
        state = self.state.get(p)
        return None if state is None else state.get("momentum_buffer")

    def _signature(self) -> list:
        """(version, data pointer) of every parameter and momentum buffer: changes whenever one
        is written in place (not through ``.data``) or replaced."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                b = self._buffer(p)
                out.append((p._version, p.data_ptr(), -1 if b is None else b._version,
                            0 if b is None else b.data_ptr()))
        return out

    def _drop_reset_momenta(self) -> None:
        """Layers the preconditioner re-initialised (``reset_after``) restart their momenta too."""
        for layer in self.preconditioner._last_reset:
            for p in (layer.weight, layer.bias):
                if p is not None and p in self.state:
                    self.state[p].pop("momentum_buffer", None)

    def _plan_group(self, group: dict) -> tuple[list, list, list]:
        """:meth:`_update_group` out of place: ``(params, new values, new momentum buffers)``,
        the same arithmetic (the same kernels, on copies), nothing written."""
        ps = [p for p in group["params"] if p.grad is not None]
        olds = [self._buffer(p) for p in ps]
        values = [p.detach().clone() for p in ps]
        bufs = [torch.empty_like(p.grad) if b is None else b.clone() for p, b in zip(ps, olds)]
        _momentum_update(group, values, [p.grad for p in ps], bufs,
                         [i for i, b in enumerate(olds) if b is None])
        return ps, values, bufs

    def _update_group(self, group: dict) -> None:
        """The momentum / weight-decay update of one param group, in place (a constant number
        of kernel launches per group, not per parameter; :func:`_momentum_update`)."""
        ps = [p for p in group["params"] if p.grad is not None]
        bufs, fresh = [], []
        for i, p in enumerate(ps):
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.empty_like(p.grad)
                fresh.append(i)
            bufs.append(buf)
        _momentum_update(group, ps, [p.grad for p in ps], bufs, fresh)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """``pickle`` / ``copy.deepcopy`` / ``copy.copy`` / ``torch.save(opt)`` raise a clear
        ``TypeError``: the optimizer holds a preconditioner hooked on its model, which a copy
        cannot carry. Checkpoint with :meth:`state_dict` / :meth:`load_state_dict`."""
        from maccore_torch._base import _NO_PICKLE  # noqa: PLC0415  (_base imports this module)

        raise TypeError(_NO_PICKLE.format(cls=type(self).__name__))

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.preconditioner.reset_gradient_statistics()

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["maccore"] = self.preconditioner.state_dict()
        return sd

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Load a :meth:`state_dict` atomically: the momentum buffers (shapes, types), the param
        groups and the preconditioner's state are all validated before anything is assigned; a
        ``ValueError`` changes nothing."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"load_state_dict: expected a mapping, got {type(state_dict).__name__}")
        sd = dict(state_dict)
        pre = sd.pop("maccore", None)
        self._check_momenta(sd)
        staged = None if pre is None else self.preconditioner._stage_state_dict(pre)
        super().load_state_dict(sd)  # validates the groups before it assigns anything
        if staged is not None:
            self.preconditioner._assign_state(staged)

    def _check_momenta(self, sd: Mapping) -> None:
        """The per-parameter state of ``sd`` (torch's layout: parameter index → state) fits."""
        where = "load_state_dict"
        groups, state = sd.get("param_groups"), sd.get("state")
        if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping):
            raise ValueError(f"{where}: expected 'state' and 'param_groups' entries")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{where}: the state has {len(groups)} parameter groups, the "
                             f"optimizer {len(self.param_groups)}")
        for i, (g, mine) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(g, Mapping):
                raise ValueError(f"{where}: parameter group {i} must be a mapping, got {type(g).__name__}")
            ids = g.get("params")
            if (not isinstance(ids, (list, tuple)) or len(ids) != len(mine["params"])
                    or not all(isinstance(j, int) and not isinstance(j, bool) for j in ids)):
                raise ValueError(f"{where}: parameter group {i}: 'params' must list the indices of its "
                                 f"{len(mine['params'])} parameters, got {ids!r}")
            missing = sorted(k for k in self.defaults if k not in g)
            if missing:
                raise ValueError(f"{where}: parameter group {i} lacks {missing}")
            try:
                self._check_group(g)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{where}: parameter group {i}: {exc}") from None
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in groups for i in g["params"]]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: a parameter index appears twice in 'param_groups'")
        if len(ids) != len(params):
            raise ValueError(f"{where}: the state has {len(ids)} parameters, the optimizer "
                             f"{len(params)}")
        index = dict(zip(ids, params))
        for key, st in state.items():
            if key not in index or not isinstance(st, Mapping):
                raise ValueError(f"{where}: state entry {key!r} belongs to no parameter")
            buf = st.get("momentum_buffer")
            if buf is None:
                continue
            p = index[key]
            if not isinstance(buf, torch.Tensor) or tuple(buf.shape) != tuple(p.shape):
                got = list(buf.shape) if isinstance(buf, torch.Tensor) else type(buf).__name__
                raise ValueError(f"{where}: momentum_buffer of parameter {key!r} is {got}, the "
                                 f"parameter {list(p.shape)}")
            if not buf.is_floating_point():
                raise ValueError(f"{where}: momentum_buffer of parameter {key!r} has dtype "
                                 f"{buf.dtype}, not a floating dtype")

    def report(self) -> str:
        """Which parameter gets which preconditioner (unpreconditioned ones get momentum SGD)."""
        return self.preconditioner.report([p for g in self.param_groups for p in g["params"]])
