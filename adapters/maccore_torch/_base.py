"""Machinery shared by every torch curvature method (MAC, KFAC, and later SINGD).

:class:`HookedPreconditioner` discovers layers by type, captures statistics with forward hooks
(and tensor hooks on layer outputs for output-gradient statistics), folds them into the per-layer
core states, refreshes the caches and rewrites ``.grad``. A method subclass only supplies the
per-layer core calls (``_init_state``, ``_forward_stats``, ``_grad_stats``, ``_fold``,
``_refresh``, ``_apply``). :class:`CurvatureOptimizer` is a ``torch.optim.Optimizer`` that owns one
preconditioner and adds the momentum / weight-decay update (MATH.md §3.6).

Schedule (MATH.md §3.2): with ``t`` the number of completed optimizer steps, statistics are
collected during the forward/backward passes of steps with ``t % t_cov == 0`` — only by modules in
training mode with grad enabled — and folded into the EMAs as ONE update in ``step()``; caches are
refreshed when ``t % t_inv == 0``; at ``t = 0`` both happen.

Gradient accumulation: every forward (and backward) of a collecting step contributes; the
statistics are pooled over all of them before the single EMA update (means are weighted by row
counts, i.e. equal to the statistics of the concatenated micro-batches). Output-gradient
statistics are additionally cleared by ``zero_grad()`` (they belong to the gradients: a step the
``GradScaler`` skipped leaves no stale, overflowed statistics behind).

``torch.distributed``: when initialised, the pooled statistics are all-reduced on collecting steps
(one collective per dtype), weighted by row counts, so every rank applies the same preconditioner.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import warnings
from typing import Any, Callable, Iterable, Mapping

import array_api_compat
import torch
import torch.distributed as dist
from torch import nn

import maccore

from maccore_torch.attention import MhaCapture, capture_mha, to_batch_first
from maccore_torch.specs import Layer, discover_layers

__all__ = ["HookedPreconditioner", "CurvatureOptimizer"]

XP = array_api_compat.array_namespace(torch.empty(0))
_NONFINITE = (None, "skip", "raise")
_WD_MODES = ("coupled", "decoupled")


class _Acc:
    """Statistics of one key pooled over the forwards/backwards of one step.

    kind ``"mean"``: running mean weighted by ``weight`` (rows); kind ``"sum"``: plain sums.
    """

    __slots__ = ("value", "weight", "kind")

    def __init__(self, value: torch.Tensor, weight: float, kind: str):
        self.value, self.weight, self.kind = value, float(weight), kind

    def add(self, value: torch.Tensor, weight: float) -> None:
        if self.kind == "sum":
            self.value = self.value + value
            self.weight += float(weight)
        else:
            total = self.weight + float(weight)
            self.value = self.value + (value - self.value) * (float(weight) / total)
            self.weight = total


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


def _unsqueeze0(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0)


def _param_ids(params: Iterable[Any] | None) -> set[int] | None:
    if params is None:
        return None
    ids = set()
    for p in params:
        if isinstance(p, Mapping):
            ids.update(id(q) for q in p["params"])
        else:
            ids.add(id(p))
    return ids


def _to_tree(x: Any) -> Any:
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return {f: _to_tree(getattr(x, f)) for f in x._fields}
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    return x


def _from_tree(template: Any, saved: Any, where: str) -> Any:
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        if not isinstance(saved, Mapping) or set(saved) != set(template._fields):
            raise ValueError(f"load_state_dict: {where}: saved state does not match {type(template).__name__}")
        return type(template)(*[_from_tree(getattr(template, f), saved[f], f"{where}.{f}")
                                for f in template._fields])
    if isinstance(template, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or tuple(saved.shape) != tuple(template.shape):
            got = list(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise ValueError(f"load_state_dict: {where}: expected shape {list(template.shape)}, got {got}")
        return saved.detach().to(device=template.device, dtype=template.dtype).clone()
    return saved


@contextlib.contextmanager
def _layer_errors(method: str, layer: Layer):
    """Re-raise core errors (``DecompositionError``, ``ValueError``, ``TypeError``) naming the layer."""
    try:
        yield
    except (maccore.DecompositionError, ValueError, TypeError) as exc:
        prefix = f"{method} layer {layer.name!r}"
        if prefix in str(exc):
            raise
        try:
            renamed = type(exc)(f"{prefix}: {exc}")
        except Exception:  # an exception type with a custom constructor: keep it as it is
            raise exc from None
        raise renamed from exc


def loss_terms(spec: maccore.LayerSpec, g: torch.Tensor, loss_average: str | None) -> int:
    """Loss terms behind one output gradient ``g``: the batch size, or for
    ``loss_average="batch+sequence"`` every position (batch × sequence / spatial)."""
    if loss_average == "batch+sequence":
        channels = g.shape[1] if spec.kind is maccore.LayerKind.CONV2D else g.shape[-1]
        return g.numel() // channels
    return g.shape[0] if g.ndim >= 2 else 1


def unreduce(total: torch.Tensor, terms: float, reduction_factor: float | None,
             loss_average: str | None) -> torch.Tensor:
    """A gradient-side statistic summed over the step (``terms`` loss terms in all) divided by the
    loss's reduction factor R: the given one, R = 1 for a summed loss (``loss_average=None``),
    else R = 1/N for a loss averaged over its N terms."""
    if reduction_factor is not None:
        return total / reduction_factor
    if loss_average is None:
        return total
    return total * terms


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


class HookedPreconditioner:
    """Base of the per-method preconditioners (see the module docstring for the protocol).

    Subclass contract: ``method`` (name), ``roles`` (layer roles it handles), ``grad_keys``
    (statistics that come from backward passes) and the ``_init_state``, ``_templates``,
    ``_forward_stats``, ``_mha_stats``, ``_wants_grads``, ``_grad_stats``, ``_fold``, ``_refresh``,
    ``_apply``, ``_describe`` methods; ``_finalize`` may turn pooled sums into statistics.
    """

    method = "base"
    roles: frozenset = frozenset({"linear", "conv2d", "qkv", "mha", "mha_out"})
    grad_keys: tuple = ()

    def __init__(
        self,
        model: nn.Module,
        *,
        t_cov: int,
        t_inv: int,
        params: Iterable[Any] | None = None,
        attention: Mapping[str, maccore.QkvSpec] | None = None,
        skip_layers: Iterable[str] | None = None,
        grad_scaler: Any = None,
        on_nonfinite: str | None = "skip",
        process_group: Any = None,
    ):
        for nm, v in (("t_cov", t_cov), ("t_inv", t_inv)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be a positive integer, got {v!r}")
        if on_nonfinite not in _NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_NONFINITE}, got {on_nonfinite!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if grad_scaler is not None and not all(
            hasattr(grad_scaler, a) for a in ("get_scale", "is_enabled")
        ):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
            )
        self.model = model
        self.t_cov, self.t_inv = t_cov, t_inv
        self.grad_scaler = grad_scaler
        self.on_nonfinite = on_nonfinite
        self.process_group = process_group
        self._t = 0
        found = discover_layers(model, attention=attention, skip=skip_layers, param_ids=_param_ids(params))
        self.layers: list[Layer] = [l for l in found if l.role in self.roles]
        for layer in self.layers:
            layer.state = self._init_state(layer)
        # GradScaler: statistics gathered at another loss scale belong to a step the scaler skipped
        self._scale_stamp: float | None = None
        self._scaler_hook = (
            model.register_forward_pre_hook(self._on_model_forward) if grad_scaler is not None else None
        )
        # Forward hooks are attached only while the current step collects statistics (every t_cov
        # steps): the forwards of the other steps run hook-free, at the model's own speed.
        self._hooked: dict[int, tuple[nn.Module, Callable]] = {}
        self._handles: dict[int, Any] = {}
        self._detached = False
        by_module: dict[int, tuple[nn.Module, list[Layer]]] = {}
        for layer in self.layers:
            for m in layer.modules:
                by_module.setdefault(id(m), (m, []))[1].append(layer)
        for key, (m, layers) in by_module.items():
            self._hooked[key] = (m, functools.partial(self._on_forward, layers))
        self._sync_hooks()

    @property
    def t(self) -> int:
        """Number of completed (not skipped) steps; decides the statistics / refresh schedule."""
        return self._t

    @t.setter
    def t(self, value: int) -> None:
        self._t = int(value)
        self._sync_hooks()

    def _sync_hooks(self) -> None:
        """Attach the forward hooks for a collecting step, detach them otherwise."""
        want = not self._detached and self._t % self.t_cov == 0
        if want:
            for key, (m, hook) in self._hooked.items():
                if key not in self._handles:
                    self._handles[key] = m.register_forward_hook(hook, with_kwargs=True)
        elif self._handles:
            for h in self._handles.values():
                h.remove()
            self._handles.clear()

    # ------------------------------------------------------------------ method hooks (override)
    def _init_state(self, layer: Layer) -> Any:
        raise NotImplementedError

    def _templates(self, layer: Layer) -> dict[str, torch.Tensor]:
        """Statistic keys of ``layer`` with a tensor of the final statistic's shape/dtype."""
        raise NotImplementedError

    def _forward_stats(self, layer: Layer, spec: maccore.LayerSpec, x: torch.Tensor,
                       out: torch.Tensor) -> dict:
        raise NotImplementedError

    def _mha_stats(self, layer: Layer, cap: MhaCapture) -> dict:
        raise NotImplementedError

    def _wants_grads(self, layer: Layer) -> bool:
        return False

    def _grad_stats(self, layer: Layer, spec: maccore.LayerSpec, g: torch.Tensor) -> dict:
        raise NotImplementedError

    def _finalize(self, layer: Layer, key: str, acc: _Acc) -> tuple[torch.Tensor, float]:
        """Pooled accumulator → (this rank's statistic, its weight in the cross-rank mean)."""
        value = acc.value
        if key in self.grad_keys:
            value = value / self._grad_scale_sq()
        return value, acc.weight

    def _fold(self, layer: Layer, stats: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _refresh(self, layer: Layer) -> None:
        raise NotImplementedError

    def _apply(self, layer: Layer, grad_mat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _describe(self, layer: Layer) -> str:
        return self.method

    def _hyperparameters(self) -> dict:
        return {"t_cov": self.t_cov, "t_inv": self.t_inv}

    # ------------------------------------------------------------------ capture
    @property
    def collecting(self) -> bool:
        """Whether forwards/backwards of the current step contribute statistics."""
        return bool(maccore.is_due(self.t, self.t_cov))

    def _accumulate(self, layer: Layer, stats: dict) -> None:
        for key, (value, weight, kind) in stats.items():
            acc = layer.acc.get(key)
            if acc is None:
                layer.acc[key] = _Acc(value, weight, kind)
            else:
                acc.add(value, weight)

    def _on_forward(self, layers: list[Layer], module: nn.Module, args: tuple, kwargs: dict,
                    output: Any) -> None:
        if not (module.training and torch.is_grad_enabled() and self.collecting):
            return
        if isinstance(module, nn.MultiheadAttention):
            self._on_forward_mha(layers, module, args, kwargs, output)
            return
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        for layer in layers:
            spec = layer.specs[id(module)]
            xs, out, fix = x.detach(), output.detach(), None
            if spec.kind is maccore.LayerKind.CONV2D and xs.ndim == 3:  # unbatched [C, H, W]
                xs, out, fix = xs.unsqueeze(0), out.unsqueeze(0), _unsqueeze0
            with stats_mode(xs):
                stats = self._forward_stats(layer, spec, xs, out)
            self._accumulate(layer, stats)
            if output.requires_grad and self._wants_grads(layer):
                output.register_hook(functools.partial(self._on_grad, layer, spec, fix))

    def _on_forward_mha(self, layers, module, args, kwargs, output) -> None:
        with stats_mode(module.in_proj_weight):
            cap = capture_mha(module, args, kwargs)
            for layer in layers:
                self._accumulate(layer, self._mha_stats(layer, cap))
        out = output[0] if isinstance(output, tuple) else output
        for layer in layers:
            if layer.role == "mha_out" and out.requires_grad and self._wants_grads(layer):
                fix = functools.partial(to_batch_first, batch_first=module.batch_first)
                out.register_hook(functools.partial(self._on_grad, layer, layer.spec, fix))

    def _on_grad(self, layer: Layer, spec: maccore.LayerSpec, fix: Callable | None,
                 grad: torch.Tensor) -> None:
        g = grad.detach() if fix is None else fix(grad.detach())
        with stats_mode(g):
            stats = self._grad_stats(layer, spec, g)
        self._accumulate(layer, stats)

    def reset_gradient_statistics(self) -> None:
        """Drop the output-gradient statistics gathered since the last step (``zero_grad`` does)."""
        for layer in self.layers:
            for key in self.grad_keys:
                layer.acc.pop(key, None)

    def _discard(self) -> None:
        for layer in self.layers:
            layer.acc.clear()
        self._scale_stamp = None

    def _on_model_forward(self, module: nn.Module, args: tuple) -> None:
        """With ``grad_scaler``: drop the statistics of a step that ``GradScaler`` skipped.

        ``scaler.step(opt)`` does not call ``opt.step()`` after an overflow and ``scaler.update()``
        then lowers the scale, so statistics gathered at a scale other than the current one belong
        to an abandoned step (one ``get_scale()`` per collecting forward of the model).
        """
        sc = self.grad_scaler
        if not (module.training and torch.is_grad_enabled() and self.collecting and sc.is_enabled()):
            return
        scale = float(sc.get_scale())
        if self._scale_stamp is not None and scale != self._scale_stamp:
            self._discard()
        self._scale_stamp = scale

    def _grad_scale_sq(self) -> float:
        sc = self.grad_scaler
        if sc is None or not sc.is_enabled():
            return 1.0
        return float(sc.get_scale()) ** 2

    # ------------------------------------------------------------------ distributed
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1

    def _all_reduce_weighted(self, entries: list[tuple[torch.Tensor | None, float, torch.Tensor]]
                             ) -> list[tuple[torch.Tensor, float]]:
        """Cross-rank weighted means of (value, weight, template) entries, one collective per
        (dtype, device). Missing values (``None``) contribute weight 0."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, _, tmpl) in enumerate(entries):
            groups.setdefault((tmpl.dtype, tmpl.device), []).append(i)
        out: list[Any] = [None] * len(entries)
        for (dtype, device), idx in groups.items():
            parts, weights = [], []
            for i in idx:
                v, w, tmpl = entries[i]
                parts.append((v.to(dtype) * w).reshape(-1) if v is not None and w > 0
                             else torch.zeros(tmpl.numel(), dtype=dtype, device=device))
                weights.append(float(w) if v is not None else 0.0)
            flat = torch.cat(parts + [torch.tensor(weights, dtype=dtype, device=device)])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
            total_w = flat[-len(idx):].tolist()
            offset = 0
            for i, w in zip(idx, total_w):
                tmpl = entries[i][2]
                chunk = flat[offset:offset + tmpl.numel()].reshape(tmpl.shape)
                offset += tmpl.numel()
                out[i] = (chunk / w if w > 0 else chunk, w)
        return out

    def _gather(self) -> list[dict[str, torch.Tensor]]:
        local = [{k: self._finalize(layer, k, acc) for k, acc in layer.acc.items()}
                 for layer in self.layers]
        if self._distributed():
            keys, entries = [], []
            for i, layer in enumerate(self.layers):
                for k, tmpl in self._templates(layer).items():
                    v, w = local[i].get(k, (None, 0.0))
                    keys.append((i, k))
                    entries.append((v, w, tmpl))
            local = [{} for _ in self.layers]
            for (i, k), vw in zip(keys, self._all_reduce_weighted(entries)):
                local[i][k] = vw
        return [{k: v for k, (v, w) in d.items() if w > 0} for d in local]

    # ------------------------------------------------------------------ step
    def _all_finite(self, params: Iterable[torch.Tensor], stats: list[dict]) -> bool:
        """Whether every gradient and statistic is finite, with one host sync.

        One fused check per device (``torch._amp_foreach_non_finite_check_and_unscale_`` with
        scale 1, the kernel ``GradScaler`` uses: ×1 leaves every value bit-for-bit unchanged), so
        the cost does not grow by a kernel launch per parameter; tensors that are part of a graph
        (``create_graph=True``) and devices without that kernel use one sum per tensor.
        """
        parts = [p.grad for p in params if p.grad is not None]
        parts += [v for s in stats for v in s.values()]
        if not parts:
            return True
        by_dev: dict[Any, list[torch.Tensor]] = {}
        slow: list[torch.Tensor] = []
        for t in parts:
            if t.requires_grad or t.is_sparse or not t.is_floating_point():
                slow.append(t)
            else:
                by_dev.setdefault(t.device, []).append(t)
        flags = []
        for dev, ts in by_dev.items():
            found = torch.zeros((), dtype=torch.float32, device=dev)
            try:
                torch._amp_foreach_non_finite_check_and_unscale_(ts, found, torch.ones((), device=dev))
            except (AttributeError, NotImplementedError, RuntimeError, TypeError):
                slow += ts
                continue
            flags.append(found == 0)
        if slow:
            sums = [t.detach().sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
                    for t in slow]
            dev = sums[0].device
            flags.append(torch.isfinite(torch.stack([x.to(device=dev, dtype=torch.float64) for x in sums]).sum()))
        ok = flags[0] if len(flags) == 1 else torch.stack([f.to(flags[0].device) for f in flags]).all()
        return bool(ok)

    def _layer_params(self) -> list[torch.Tensor]:
        return [p for l in self.layers for p in (l.weight, l.bias) if p is not None]

    @torch.no_grad()
    def step(self, *, check: Iterable[torch.Tensor] | None = None) -> bool:
        """Fold this step's statistics (collecting steps), refresh the caches (every ``t_inv``
        steps) and replace ``.grad`` of every preconditioned layer by its preconditioned gradient.

        Returns ``False`` — and changes nothing but dropping this step's statistics — when a
        gradient (of the layers, or of ``check``) or a statistic is not finite
        (``on_nonfinite="skip"``: a ``RuntimeWarning``; ``"raise"``: ``FloatingPointError``;
        ``None``: no check, no device sync).
        """
        stat_step = bool(maccore.is_due(self.t, self.t_cov))
        refresh = bool(maccore.is_due(self.t, self.t_inv))
        stats = self._gather() if stat_step else [{} for _ in self.layers]
        if self.on_nonfinite is not None:
            params = self._layer_params() if check is None else list(check)
            if not self._all_finite(params, stats):
                self._discard()
                msg = (f"{self.method}: non-finite gradients or statistics at step {self.t}; the step "
                       "was skipped and the curvature state left unchanged")
                if self.on_nonfinite == "raise":
                    raise FloatingPointError(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
                return False
        snapshot = [(layer.state, layer.updates) for layer in self.layers]
        try:
            if stat_step:
                for layer, s in zip(self.layers, stats):
                    if s:
                        with _layer_errors(self.method, layer):
                            self._fold(layer, s)
            if refresh:
                for layer in self.layers:
                    with _layer_errors(self.method, layer):
                        self._refresh(layer)
        except Exception:  # a failed fold / refresh leaves every layer as it was before the step
            for layer, (state, updates) in zip(self.layers, snapshot):
                layer.state, layer.updates = state, updates
            self._discard()
            raise
        for layer in self.layers:
            with _layer_errors(self.method, layer):
                self._precondition(layer)
        self._discard()
        self.t += 1
        return True

    def _precondition(self, layer: Layer) -> None:
        gw = layer.weight.grad
        if gw is None:
            return
        has_bias = layer.bias is not None
        gb = layer.bias.grad if has_bias else None
        if has_bias and gb is None:
            gb = torch.zeros_like(layer.bias)
        mat = maccore.grad_matrix(gw, gb)
        out = self._apply(layer, mat)
        w, b = maccore.split_grad_matrix(out, tuple(gw.shape), bias=has_bias)
        layer.weight.grad = w.contiguous()
        if has_bias and layer.bias.grad is not None:
            layer.bias.grad = b.contiguous()

    # ------------------------------------------------------------------ state, report, hooks
    def states(self) -> dict[str, Any]:
        """``{layer name: core state}`` (NamedTuples of tensors, read-only views)."""
        return {l.name: l.state for l in self.layers}

    def state_dict(self) -> dict:
        """Per-layer core states (EMAs, counters, caches), the step count and any fixed inverses.

        Statistics of a step in progress are not saved: checkpoint between steps.
        """
        return {
            "method": self.method,
            "t": self.t,
            "hyperparameters": self._hyperparameters(),
            "layers": {
                l.name: {"state": _to_tree(l.state), "updates": l.updates,
                         "first_inv": None if l.first_inv is None else l.first_inv.detach().clone()}
                for l in self.layers
            },
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        if state_dict.get("method") != self.method:
            raise ValueError(f"load_state_dict: state of method {state_dict.get('method')!r}, expected {self.method!r}")
        saved = state_dict["layers"]
        names = [l.name for l in self.layers]
        missing, unexpected = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        if missing or unexpected:
            raise ValueError(f"load_state_dict: layers differ (missing {missing}, unexpected {unexpected})")
        for layer in self.layers:
            entry = saved[layer.name]
            layer.state = _from_tree(layer.state, entry["state"], layer.name)
            layer.updates = int(entry["updates"])
            fi = entry.get("first_inv")
            layer.first_inv = None if fi is None else fi.detach().to(layer.weight.device).clone()
            if layer.first_inv is not None:
                self._on_first_layer_fixed(layer)
        self.t = int(state_dict["t"])
        self._discard()

    def _on_first_layer_fixed(self, layer: Layer) -> None:
        pass

    def _remove_hook(self, layer: Layer) -> None:
        for m in layer.modules:
            if sum(m in l.modules for l in self.layers) == 1:
                self._hooked.pop(id(m), None)
                h = self._handles.pop(id(m), None)
                if h is not None:
                    h.remove()

    def remove_hooks(self) -> None:
        """Detach from the model (no more statistics are collected)."""
        if self._scaler_hook is not None:
            self._scaler_hook.remove()
            self._scaler_hook = None
        self._detached = True
        self._sync_hooks()

    def report(self, params: Iterable[torch.Tensor] | None = None) -> str:
        """A table of every parameter (default: the model's trainable ones), its layer and the
        preconditioner it gets."""
        names: dict[int, str] = {}
        for n, p in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), n)
        owner: dict[int, tuple[Layer, str]] = {}
        for layer in self.layers:
            for p in (layer.weight, layer.bias):
                if p is not None:
                    owner[id(p)] = (layer, self._describe(layer))
        plist = [p for p in self.model.parameters() if p.requires_grad] if params is None else list(params)
        rows = []
        for p in plist:
            layer_desc = owner.get(id(p))
            rows.append((names.get(id(p), "?"), str(list(p.shape)),
                         layer_desc[0].name if layer_desc else "-",
                         layer_desc[1] if layer_desc else "none (raw gradient)"))
        n_pre = sum(1 for p in plist if id(p) in owner)
        head = (f"{self.method}: {len(self.layers)} preconditioned layers, {n_pre}/{len(plist)} "
                f"parameters preconditioned (t_cov={self.t_cov}, t_inv={self.t_inv}, step {self.t})")
        return head + "\n" + _table(rows, ("parameter", "shape", "layer", "preconditioner"))


class CurvatureOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` = a :class:`HookedPreconditioner` + momentum and weight decay.

    Per parameter (preconditioned or not), with ĝ its (preconditioned) gradient, per param group:
    ``"coupled"`` (MATH.md §3.6 CIFAR): d = ĝ + wd·p, b = μb + d, p ← p − ηb;
    ``"decoupled"``: b = μb + ĝ, p ← (1 − η·wd)p − ηb;
    ``nesterov=True`` (nanoGPT ``nag_step``): first step b = ĝ', d = ĝ'; later b = μb + ĝ',
    d = ĝ' + μb, then the weight-decay rule above (ĝ' = ĝ + wd·p when coupled).
    """

    def __init__(self, model: nn.Module, params: Any, defaults: dict,
                 make_preconditioner: Callable[..., HookedPreconditioner]):
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self._check_group(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        flat = [p for g in self.param_groups for p in g["params"]]
        self.preconditioner = make_preconditioner(params=flat)

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
        if hasattr(self, "preconditioner"):
            self._check_group(self.param_groups[-1])

    @property
    def t(self) -> int:
        """Number of completed (not skipped) optimizer steps."""
        return self.preconditioner.t

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"]]
        if not self.preconditioner.step(check=params):
            return loss
        for group in self.param_groups:
            self._update_group(group)
        return loss

    def _update_group(self, group: dict) -> None:
        """The momentum / weight-decay update of one param group with ``torch._foreach_*`` ops
        (a constant number of kernel launches per group, not per parameter)."""
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        coupled = group["weight_decay_mode"] == "coupled"
        ps = [p for p in group["params"] if p.grad is not None]
        if not ps:
            return
        gs = [p.grad for p in ps]
        if coupled and wd != 0:
            gs = list(torch._foreach_add(gs, ps, alpha=wd))
        bufs, new, old_b, old_g = [], [], [], []
        for p, g in zip(ps, gs):
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.detach().clone()
                new.append(len(bufs))
            else:
                old_b.append(buf)
                old_g.append(g)
            bufs.append(buf)
        if old_b:
            torch._foreach_mul_(old_b, mu)
            torch._foreach_add_(old_b, old_g)
        if group["nesterov"]:
            ds = list(torch._foreach_add(gs, bufs, alpha=mu))
            for i in new:  # first step: d = ĝ'
                ds[i] = gs[i]
        else:
            ds = bufs
        if not coupled and wd != 0:
            torch._foreach_mul_(ps, 1.0 - lr * wd)
        torch._foreach_add_(ps, ds, alpha=-lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.preconditioner.reset_gradient_statistics()

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["maccore"] = self.preconditioner.state_dict()
        return sd

    def load_state_dict(self, state_dict: Mapping) -> None:
        sd = dict(state_dict)
        pre = sd.pop("maccore", None)
        super().load_state_dict(sd)
        if pre is not None:
            self.preconditioner.load_state_dict(pre)

    def report(self) -> str:
        """Which parameter gets which preconditioner (unpreconditioned ones get momentum SGD)."""
        return self.preconditioner.report([p for g in self.param_groups for p in g["params"]])
