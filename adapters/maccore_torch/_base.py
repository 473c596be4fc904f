"""The driver shared by every torch preconditioner: a :class:`maccore.engine.CurvatureMethod` run
over the model's layers.

:class:`HookedPreconditioner` discovers layers by type (:mod:`maccore_torch.specs`), captures
statistics with hooks (:mod:`maccore_torch.hooks`) and, in ``step()``, runs the engine: finalize
the pooled statistics, average them across ranks (:mod:`maccore_torch.distributed`), check that
everything is finite (:mod:`maccore_torch.numerics`), fold them (``update``), rebuild the caches
(``refresh``) and rewrite ``.grad`` with :func:`maccore.engine.apply_split` (in place). A method
subclass only builds its ``CurvatureMethod`` and describes its layers; all maths is in the core.

Schedule (docs/math.md; :func:`maccore.engine.schedule`): with ``t`` the number of completed
optimizer steps, statistics are collected during the forward/backward passes of steps with
``t % t_cov == 0`` — only by modules in training mode with grad enabled — and folded as ONE update
in ``step()``; caches are refreshed when ``t % t_inv == 0``; at ``t = 0`` both happen.

Gradient accumulation: every forward (and backward) of a collecting step contributes; the
statistics are pooled over all of them before the single update (:func:`maccore.engine.pool_stats`:
equal to the statistics of the concatenated micro-batches). Output-gradient statistics are also
cleared by ``zero_grad()`` (they belong to the gradients: a step the ``GradScaler`` skipped leaves
no stale, overflowed statistics behind).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import warnings
from typing import Any, Iterable, Mapping

import array_api_compat
import torch
from torch import nn

import maccore
from maccore.engine import CurvatureMethod, apply_split, schedule

from maccore_torch import distributed
from maccore_torch.hooks import LayerCapture
from maccore_torch.numerics import LossScale, all_finite, max_abs
from maccore_torch.optimizer import CurvatureOptimizer  # noqa: F401  (re-exported: portable.py)
from maccore_torch.report import parameter_table
from maccore_torch.specs import Layer, Skipped, UnsupportedLayerError, coverage, discover_layers

__all__ = ["HookedPreconditioner", "XP"]

XP = array_api_compat.array_namespace(torch.empty(0))
_NONFINITE = (None, "skip", "raise")


def _unwrap_compiled(model: Any) -> Any:
    """The module inside a ``torch.compile(model)`` wrapper (``OptimizedModule``): layer names,
    hooks and checkpoints are those of the eager model; its forwards go through the compiled
    graph (the hooks cooperate with it, :mod:`maccore_torch.hooks`)."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(dynamo, "OptimizedModule", None)
    while wrapper is not None and isinstance(model, wrapper):
        model = model._orig_mod
    return model


def _dynamo_compiled() -> bool:
    """Whether ``torch.compile`` has compiled any graph in this process."""
    utils = sys.modules.get("torch._dynamo.utils")
    counters = getattr(utils, "counters", None)
    try:
        return bool(counters and counters["stats"]["unique_graphs"])
    except Exception:  # a torch version without this counter
        return False


_NO_PICKLE = ("{cls} cannot be pickled or copied: it holds hooks on its model. Checkpoint with "
              "state_dict() and restore with load_state_dict() on a new {cls} built on the model "
              "(torch.save(model) / copy.deepcopy(model) work and leave inert hooks on the copy)")


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


def _flat_params(params: Iterable[Any]) -> Iterable[Any]:
    for p in params:
        if isinstance(p, Mapping):
            yield from p["params"]
        else:
            yield p


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside maccore_torch and torch (the caller of
    ``step()``), for warnings raised from inside a step."""
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415

    skip = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))
    level, frame = 0, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level + 1


def _skip_count(v: Any, name: str) -> int | None:
    """``warn_after`` / ``reset_after``: ``None`` (never) or a positive number of skipped steps."""
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"{name} must be None or a positive integer, got {v!r}")
    return v


def _to_tree(x: Any) -> Any:
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return {f: _to_tree(getattr(x, f)) for f in x._fields}
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    return x


def _from_tree(template: Any, saved: Any, where: str, device: Any) -> Any:
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        if isinstance(template, maccore.MacState) and isinstance(saved, Mapping) and "first_inv" not in saved:
            saved = {**saved, "first_inv": None}  # saved before the inverse moved into the state
        if not isinstance(saved, Mapping) or set(saved) != set(template._fields):
            raise ValueError(f"load_state_dict: {where}: saved state does not match {type(template).__name__}")
        return type(template)(*[_from_tree(getattr(template, f), saved[f], f"{where}.{f}", device)
                                for f in template._fields])
    if isinstance(template, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or tuple(saved.shape) != tuple(template.shape):
            got = list(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise ValueError(f"load_state_dict: {where}: expected shape {list(template.shape)}, got {got}")
        if saved.is_floating_point() != template.is_floating_point() or saved.is_complex() or \
                saved.dtype == torch.bool:
            raise ValueError(f"load_state_dict: {where}: expected a {template.dtype} tensor, got "
                             f"{saved.dtype}")
        return saved.detach().to(device=template.device, dtype=template.dtype).clone()
    if template is None:
        if saved is None:
            return None
        if isinstance(saved, torch.Tensor) and where.endswith(".first_inv"):
            return saved.detach().to(device).clone()  # a first-layer inverse (checked by the caller)
        raise ValueError(f"load_state_dict: {where}: this state has no such field (None), got "
                         f"{type(saved).__name__}")
    if type(saved) is not type(template):
        raise ValueError(f"load_state_dict: {where}: expected {type(template).__name__}, got "
                         f"{type(saved).__name__}")
    return saved


def _legacy_qkv_off(layer: Layer, saved: Mapping) -> Mapping:
    """Checkpoints of the previous format kept ONE factor ``[d̃]`` for a declared fused qkv layer
    in mode ``"off"``; the engine keeps the three equal row-block factors ``[3, d̃]``."""
    qkv = layer.spec.qkv
    mean = saved.get("mean") if isinstance(saved, Mapping) else None
    if (layer.role != "qkv" or qkv is None or qkv.mode != "off" or not isinstance(mean, Mapping)
            or getattr(mean.get("value"), "ndim", None) != 1):
        return saved

    def rows3(t: Any) -> Any:
        return t.unsqueeze(0).expand(3, -1).clone() if isinstance(t, torch.Tensor) and t.ndim == 1 else t

    return {**saved, "mean": {**mean, "value": rows3(mean["value"])}, "mean_hat": rows3(saved["mean_hat"])}


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


def _writable(t: torch.Tensor) -> bool:
    """Whether ``.grad`` may be rewritten in place: not part of a graph (``create_graph=True``)."""
    return not t.requires_grad and not t.is_sparse


def _leaves(state: Any) -> list:
    """The tensors of a core state (nested NamedTuples; ``None`` fields left out)."""
    out = []
    for v in state:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, tuple):
            out += _leaves(v)
    return out


class _Pending:
    """A step computed but not committed: the new per-layer states and update counts (``changed``:
    the indices of the layers whose state this step changed) and the preconditioned gradients."""

    def __init__(self, layers: list[Layer], states: list, updates: list[int], changed: set[int],
                 check: list | None, raw: dict | None = None):
        self.layers, self.states, self.updates = layers, states, updates
        self.changed, self.check = changed, check
        # {(device, dtype): max |x|} over the raw gradients and statistics (``_prepare(measure=True)``)
        self.raw = raw

    def _layer_tensors(self, i: int, grads: bool = True) -> list:
        layer = self.layers[i]
        out = [layer.weight.grad, None if layer.bias is None else layer.bias.grad] if grads else []
        if i in self.changed:
            out += _leaves(self.states[i])
        return out

    def checked(self, grads: bool = True) -> list:
        """Every tensor the step produced: the changed states and (``grads``) the preconditioned
        gradients."""
        return [t for i in range(len(self.layers)) for t in self._layer_tensors(i, grads)]

    def offenders(self, candidates: Mapping[int, list]) -> list[Layer]:
        """The layers whose new state, preconditioned gradient or update (``candidates``) is not
        finite (one device sync per layer: only on the rare skipped step)."""
        bad = []
        for i, layer in enumerate(self.layers):
            ts = self._layer_tensors(i)
            for p in (layer.weight, layer.bias):
                if p is not None:
                    ts += candidates.get(id(p), [])
            if not all_finite(ts):
                bad.append(layer)
        return bad


class HookedPreconditioner:
    """Base of the per-method preconditioners (see the module docstring).

    Subclass contract: call ``super().__init__(model, curvature, ...)`` with the method's
    :class:`maccore.engine.CurvatureMethod`; set ``method`` (the name saved in checkpoints) and
    ``roles`` (the layer roles it handles); optionally override ``_describe`` (for ``report()``),
    ``_hyperparameters`` and ``_update_kwargs`` (keywords of ``CurvatureMethod.update``).
    """

    method = "base"
    roles: frozenset = frozenset({"linear", "conv2d", "qkv", "mha", "mha_out"})

    def __init__(
        self,
        model: nn.Module,
        curvature: CurvatureMethod,
        *,
        t_cov: int,
        t_inv: int,
        params: Iterable[Any] | None = None,
        attention: Mapping[str, maccore.QkvSpec] | None = None,
        skip_layers: Iterable[str] | None = None,
        grad_scaler: Any = None,
        on_nonfinite: str | None = "skip",
        process_group: Any = None,
        strict: bool = False,
        warn_after: int | None = 10,
        reset_after: int | None = None,
    ):
        for nm, v in (("t_cov", t_cov), ("t_inv", t_inv)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be a positive integer, got {v!r}")
        if on_nonfinite not in _NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_NONFINITE}, got {on_nonfinite!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model = _unwrap_compiled(model)
        self.model = model
        self._compile_warned = False
        self.curvature = curvature
        self.t_cov, self.t_inv = t_cov, t_inv
        self.loss_scale = LossScale(grad_scaler)
        self.grad_scaler = grad_scaler
        self.on_nonfinite = on_nonfinite
        self.process_group = process_group
        self._t = 0
        self.warn_after = _skip_count(warn_after, "warn_after")
        self.reset_after = _skip_count(reset_after, "reset_after")
        self.consecutive_skips = 0  # skipped steps since the last accepted one
        self.skipped_steps = 0  # skipped steps in all
        self._last_reset: list[Layer] = []  # layers re-initialised by the last skipped step
        params = None if params is None else list(params)  # (a generator is read twice)
        self._grad_scope = _param_ids(params)
        self.strict = bool(strict)
        self._attention = (attention if isinstance(attention, str)  # "auto": discover_layers
                           else dict(attention or {}))
        self._skip_names = list(skip_layers or ())
        self._params = None if params is None else list(_flat_params(params))
        self.layers: list[Layer] = []
        self.skipped: list[Skipped] = []
        self._capture = None
        self._discover(self._params)

    def _discover(self, params: list | None, scope: list | None = None) -> None:
        """Find the layers of ``params`` (all trainable ones when ``None``) not yet handled,
        initialise their states, re-attach the hooks and rebuild the coverage list (warning
        about / refusing suspicious skips and an empty layer list)."""
        ids = None if params is None else {id(p) for p in params}
        have = {id(l.weight) for l in self.layers}
        found = discover_layers(self.model, attention=self._attention, skip=self._skip_names,
                                param_ids=ids)
        new = [l for l in found if l.role in self.roles and id(l.weight) not in have]
        self._other = {m_name: f"{self.method} does not handle {l.role} layers"
                       for l in found if l.role not in self.roles
                       for m_name in [l.name.split("+")[0].rsplit(".", 1)[0] if l.role == "mha"
                                      else l.name.split("+")[0]]}
        for layer in new:
            w = layer.weight
            with _layer_errors(self.method, layer):
                layer.state = self.curvature.init(layer.spec, xp=XP, dtype=w.dtype, device=w.device)
        distributed.check_shardable(self.method, self.curvature, new)  # FSDP2: row-local only
        self.layers = self.layers + new
        if self._capture is not None:
            self._capture.remove()
        # (a partial, not a bound method: the capture must not keep the optimizer alive)
        self._capture = LayerCapture(self.model, self.layers, self.curvature, self.loss_scale,
                                     world_size=functools.partial(distributed.world_size,
                                                                  self.process_group))
        self._sync_hooks()
        self._check_coverage(params if scope is None else scope)

    def _check_coverage(self, params: list | None) -> None:
        self.skipped = coverage(self.model, self.layers, self._params, skip=self._skip_names,
                                other=self._other)
        scope = None if params is None else {id(p) for p in params}
        names = {n: p for n, p in self.model.named_parameters()}
        bad = [s for s in self.skipped if s.suspicious
               and (scope is None or id(names.get(s.parameter)) in scope)]
        if bad:
            msg = (f"{self.method}: {len(bad)} parameter(s) look like linear maps but are not "
                   f"preconditioned: " + "; ".join(f"{s.parameter}: {s.reason}" for s in bad))
            if self.strict:
                raise UnsupportedLayerError(msg + " (strict=True)")
            warnings.warn(msg, UserWarning, stacklevel=4)
        if not self.layers:
            warnings.warn(f"{self.method}: 0 preconditioned layers — every parameter gets the raw "
                          f"gradient (see report())", UserWarning, stacklevel=4)

    def add_params(self, params: Iterable[Any]) -> None:
        """Extend the optimised parameters (``add_param_group``): their layers are discovered and
        preconditioned, the others listed in :attr:`skipped` with the reason."""
        extra = list(_flat_params(params))
        if self._params is not None:
            known = {id(p) for p in self._params}
            self._params = self._params + [p for p in extra if id(p) not in known]
        self._discover(self._params, scope=extra)

    # ------------------------------------------------------------------ schedule
    @property
    def t(self) -> int:
        """Number of completed (not skipped) steps; decides the statistics / refresh schedule."""
        return self._t

    @t.setter
    def t(self, value: int) -> None:
        self._t = int(value)
        self._sync_hooks()

    @property
    def count(self) -> int:
        """The step counter under its name in the core and in ``maccore_jax`` (= :attr:`t`)."""
        return self._t

    @property
    def collecting(self) -> bool:
        """Whether forwards/backwards of the current step contribute statistics."""
        return bool(maccore.is_due(self._t, self.t_cov))

    def _sync_hooks(self) -> None:
        self._capture.sync(self.collecting)

    # ------------------------------------------------------------------ method hooks (override)
    def _describe(self, layer: Layer) -> str:
        return self.method

    def _hyperparameters(self) -> dict:
        return {"t_cov": self.t_cov, "t_inv": self.t_inv, **self.curvature.hyperparameters}

    def _update_kwargs(self) -> dict:
        return {}

    # ------------------------------------------------------------------ statistics
    def reset_gradient_statistics(self) -> None:
        """Drop the output-gradient statistics gathered since the last step (``zero_grad`` does)."""
        self._capture.reset_gradient_statistics()

    def _discard(self) -> None:
        self._capture.discard()
        self.loss_scale.reset()

    def _gather(self) -> list[dict[str, torch.Tensor]]:
        """This step's finalized statistics per layer (averaged across ranks), ``{key: value}``."""
        method = self.curvature
        local = []
        for layer in self.layers:
            pooled = {**layer.acc, **layer.grad_acc}
            with _layer_errors(self.method, layer):
                local.append(method.finalize(layer.spec, layer.state, pooled) if pooled else {})
        if distributed.is_distributed(self.process_group):
            templates = [method.templates(l.spec, l.state) for l in self.layers]
            local = distributed.average_statistics(local, templates, self.process_group)
        return [{k: v for k, (v, w) in d.items() if w > 0} for d in local]

    # ------------------------------------------------------------------ step
    def _layer_params(self) -> list[torch.Tensor]:
        return [p for l in self.layers for p in (l.weight, l.bias) if p is not None]

    @torch.no_grad()
    def step(self, *, check: Iterable[torch.Tensor] | None = None) -> bool:
        """Fold this step's statistics (collecting steps), refresh the caches (every ``t_inv``
        steps) and replace ``.grad`` of every preconditioned layer by its preconditioned gradient.

        Returns ``False`` and skips the step exactly when a gradient (of the layers, or of
        ``check``), a statistic, a refreshed preconditioner or a preconditioned gradient is not
        finite (``on_nonfinite="skip"``: a ``RuntimeWarning``; ``"raise"``: ``FloatingPointError``;
        ``None``: no check, no device sync). A skipped step leaves the curvature state, the update
        counts and :attr:`t` bit for bit as they were, drops this step's statistics and sets
        ``.grad`` of the model's parameters (those of ``params`` when given, and of ``check``) to
        ``None`` — so a following ``torch.optim`` step leaves them unchanged, as ``zero_grad()``
        would. After ``warn_after`` consecutive skips one more warning says that training is
        stuck; ``reset_after`` re-initialises the state of the layers whose preconditioner or
        update was not finite (docs/numerics.md).
        """
        pending = self._prepare(check)
        if pending is None:
            return False
        if self.on_nonfinite is not None and not all_finite(pending.checked()):
            self._reject(pending)
            return False
        self._commit(pending)
        return True

    def _prepare(self, check: Iterable[torch.Tensor] | None, measure: bool = False) -> _Pending | None:
        """The first half of a step: check gradients and statistics, compute the new states (not
        assigned yet) and precondition ``.grad``. ``None``: the step was skipped (non-finite
        gradients or statistics). ``measure``: the check reads their largest magnitudes too
        (``_Pending.raw``, same single host sync) where it can."""
        collect, refresh = schedule(self._t, t_cov=self.t_cov, t_inv=self.t_inv)
        if collect:
            self._check_captured()
        stats = self._gather() if collect else [{} for _ in self.layers]
        check = None if check is None else list(check)
        raw = None
        if self.on_nonfinite is not None:
            params = self._layer_params() if check is None else check
            tensors = [p.grad for p in params] + [v for s in stats for v in s.values()]
            raw = max_abs(tensors) if measure else None
            finite = (all(math.isfinite(v) for v in raw.values()) if raw is not None
                      else all_finite(tensors))
            if not finite:
                bad = self._data_offenders(stats) if self.reset_after is not None else []
                self._skip(f"non-finite gradients or statistics at step {self.t}", check, bad)
                return None
        method = self.curvature
        states = [layer.state for layer in self.layers]
        updates = [layer.updates for layer in self.layers]
        changed = set()
        try:
            if collect:
                kw = self._update_kwargs()
                for i, (layer, s) in enumerate(zip(self.layers, stats)):
                    if s:
                        with _layer_errors(self.method, layer):
                            full = all(k in s for k in method.keys(layer.spec, states[i]))
                            states[i] = method.update(layer.spec, states[i], s, **kw)
                            updates[i] += full
                            changed.add(i)
            if refresh:
                # nothing read on the host per layer: what does not invert comes out non-finite;
                # checked steps then read all the new caches at once (one host sync) and redo the
                # layers that failed with the retry policy (float64, DecompositionError)
                before, failed = list(states), set()
                for i, layer in enumerate(self.layers):
                    with _layer_errors(self.method, layer):
                        try:
                            states[i] = method.refresh(layer.spec, states[i], checked=False)
                        except maccore.DecompositionError:  # raised even unchecked (torch's eigh)
                            if self.on_nonfinite is None:
                                raise
                            failed.add(i)
                        changed.add(i)
                if self.on_nonfinite is not None and method.refresh_can_fail:
                    self._retry_refresh(before, states, failed)
        except Exception:  # a failed update / refresh leaves every layer as it was before the step
            self._discard()
            raise
        for layer, state in zip(self.layers, states):
            with _layer_errors(self.method, layer):
                self._precondition(layer, state)
        return _Pending(self.layers, states, updates, changed, check, raw)

    def _retry_refresh(self, before: list, states: list, failed: set) -> None:
        """After an unchecked refresh of every layer (``before``: the states it started from,
        ``states``: the refreshed ones, replaced here where redone; ``failed``: the layers whose
        unchecked refresh raised): one finiteness check of all the arrays the refresh made; where
        one is not finite, or the refresh raised, that layer's refresh runs again checked. A
        state that is itself not finite cannot be decomposed: that is a non-finite step (skipped
        by the caller's check: the layer keeps ``before``), not an error."""
        made = []  # per layer: the tensors the refresh made (not carried over from ``before``)
        for old, new in zip(before, states):
            was = {id(t) for t in _leaves(old)}
            made.append([t for t in _leaves(new) if id(t) not in was])
        if not failed and all_finite([t for ts in made for t in ts]):
            return
        method = self.curvature
        for i, layer in enumerate(self.layers):
            if i not in failed and all_finite(made[i]):
                continue
            with _layer_errors(self.method, layer):
                try:
                    states[i] = method.refresh(layer.spec, before[i])
                except maccore.DecompositionError:
                    if all_finite(_leaves(before[i])):
                        raise

    def _commit(self, pending: _Pending) -> None:
        """The second half of an accepted step: assign the new states, advance :attr:`t`."""
        for layer, state, updates in zip(self.layers, pending.states, pending.updates):
            layer.state, layer.updates = state, updates
        self._discard()
        self.consecutive_skips = 0
        self.t += 1

    def _reject(self, pending: _Pending, candidates: Mapping[int, list] | None = None) -> None:
        """Skip a step whose new preconditioner or update is not finite (the states computed by
        :meth:`_prepare` are dropped). ``candidates``: ``{id(param): [tensors]}`` of the update
        the optimizer would have written (new values, momenta)."""
        bad = pending.offenders(candidates or {})
        names = ", ".join(repr(l.name) for l in bad) or "outside the preconditioned layers"
        self._skip(f"non-finite preconditioner or update at step {self.t} (layers {names})",
                   pending.check, bad)

    def _data_offenders(self, stats: list[dict]) -> list[Layer]:
        """On a step with non-finite gradients or statistics: the layers to blame — a state that is
        not finite, or non-finite statistics of a layer whose gradients are finite (statistics
        that depend on the state, as SINGD's)."""
        bad = []
        for layer, st in zip(self.layers, stats):
            grads = [layer.weight.grad, None if layer.bias is None else layer.bias.grad]
            if not all_finite(_leaves(layer.state)) or (all_finite(grads) and not all_finite(list(st.values()))):
                bad.append(layer)
        return bad

    def _reset_layer(self, layer: Layer) -> None:
        """The method's initial state for ``layer`` (a fixed first-layer inverse is kept)."""
        w = layer.weight
        old = layer.state
        state = self.curvature.init(layer.spec, xp=XP, dtype=w.dtype, device=w.device)
        first = getattr(old, "first_inv", None)
        if first is not None:
            state = maccore.engine.with_first_layer(state, first)
        layer.state, layer.updates = state, 0

    def _skip(self, why: str, check: list | None, offenders: list[Layer]) -> None:
        """Skip the step: drop its statistics and gradients, count it, warn (or raise); with
        ``reset_after``, every ``reset_after`` consecutive skips re-initialise ``offenders``
        (listed in ``_last_reset`` for the optimizer, which drops their momenta)."""
        self._last_reset = []
        self._discard()
        self._clear_grads(check)
        msg = f"{self.method}: {why}; the step was skipped and the curvature state left unchanged"
        if self.on_nonfinite == "raise":
            raise FloatingPointError(msg)
        self.consecutive_skips += 1
        self.skipped_steps += 1
        stacklevel = _user_stacklevel()
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)
        if self.warn_after is not None and self.consecutive_skips == self.warn_after:
            warnings.warn(
                f"{self.method}: {self.consecutive_skips} consecutive steps were skipped at step "
                f"{self.t} (non-finite values): training is not progressing. Lower the learning "
                "rate (SINGD: lr_cov), raise the damping, check the data, or pass reset_after=k to "
                "reset the state of the offending layers (docs/numerics.md)",
                RuntimeWarning, stacklevel=stacklevel)
        if self.reset_after is not None and offenders and self.consecutive_skips % self.reset_after == 0:
            for layer in offenders:
                self._reset_layer(layer)
            self._last_reset = list(offenders)
            warnings.warn(
                f"{self.method}: reset the curvature state of layers "
                f"{', '.join(repr(l.name) for l in offenders)} after {self.consecutive_skips} "
                f"consecutive skipped steps (reset_after={self.reset_after})",
                RuntimeWarning, stacklevel=stacklevel)

    def _clear_grads(self, check: list | None) -> None:
        """``.grad = None`` for the preconditioner's parameters (and ``check``): a skipped step
        has no gradient a following optimizer could apply."""
        scope = self._grad_scope
        params = [p for p in self.model.parameters() if scope is None or id(p) in scope]
        for p in params + self._layer_params() + (check or []):
            p.grad = None

    def _precondition(self, layer: Layer, state: Any = None) -> None:
        """``.grad`` ← the preconditioned gradient (:func:`maccore.engine.apply_split`; ``state``:
        default the layer's), written in place where the gradients allow it; otherwise ``.grad``
        is replaced."""
        gw = layer.weight.grad
        if gw is None:
            return
        if distributed.is_sharded(gw):  # FSDP2: this rank's rows only (distributed.py)
            distributed.precondition_shard(self.curvature, layer, layer.state if state is None else state)
            return
        gb = None if layer.bias is None else layer.bias.grad
        inplace = _writable(gw) and (gb is None or _writable(gb))
        if layer.transposed:  # weight stored [d_in, d_out]: the core sees the [d_out, d_in] view
            gw = gw.t()
        state = layer.state if state is None else state
        w, b = apply_split(self.curvature, layer.spec, state, gw, gb, inplace=inplace)
        if layer.transposed:
            w = w.t()
        if not inplace:
            layer.weight.grad = w.contiguous()
            if gb is not None:
                layer.bias.grad = b.contiguous()

    # ------------------------------------------------------------------ state
    def states(self) -> dict[str, Any]:
        """``{layer name: core state}`` (NamedTuples of tensors, read-only views)."""
        return {l.name: l.state for l in self.layers}

    def state_dict(self) -> dict:
        """Per-layer core states (running averages, counters, caches, MAC's first-layer inverse)
        and the step count. Statistics of a step in progress are not saved: checkpoint between
        steps."""
        return {
            "method": self.method,
            "t": self.t,
            "hyperparameters": self._hyperparameters(),
            "layers": {l.name: {"state": _to_tree(l.state), "updates": l.updates} for l in self.layers},
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Load a :meth:`state_dict`, also one of the previous format (MAC's first-layer inverse
        as a separate ``"first_inv"`` entry per layer). Everything is validated before anything
        is assigned: a ``ValueError`` (naming the layer and field) changes nothing."""
        self._assign_state(self._stage_state_dict(state_dict))

    def _stage_state_dict(self, state_dict: Any) -> tuple[dict, int]:
        """The validated content of a :meth:`state_dict`, ``({layer name: (state, updates)},
        t)``; nothing is assigned. Raises ``ValueError``."""
        where = "load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(state_dict).__name__}")
        if state_dict.get("method") != self.method:
            raise ValueError(f"{where}: state of method {state_dict.get('method')!r}, expected {self.method!r}")
        t = state_dict.get("t")
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"{where}: the step count 't' must be an integer >= 0, got {t!r}")
        saved = state_dict.get("layers")
        if not isinstance(saved, Mapping):
            raise ValueError(f"{where}: 'layers' must be a mapping of layer states, got "
                             f"{type(saved).__name__}")
        names = [l.name for l in self.layers]
        missing, unexpected = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        if missing or unexpected:
            raise ValueError(f"{where}: layers differ (missing {missing}, unexpected {unexpected})")
        new = {}
        for layer in self.layers:
            entry = saved[layer.name]
            lw = f"{where}: layer {layer.name!r}"
            if not isinstance(entry, Mapping) or "state" not in entry:
                raise ValueError(f"{lw}: expected a mapping with 'state' and 'updates'")
            updates = entry.get("updates")
            if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
                raise ValueError(f"{lw}: 'updates' must be an integer >= 0, got {updates!r}")
            tree = entry["state"]
            if "first_inv" in entry:  # the previous format
                tree = _legacy_qkv_off(layer, tree)
            state = _from_tree(layer.state, tree, layer.name, layer.weight.device)
            if isinstance(state, maccore.MacState):
                fi = entry.get("first_inv", state.first_inv)
                state = state._replace(first_inv=None)
                if fi is not None:
                    if not isinstance(fi, torch.Tensor):
                        raise ValueError(f"{lw}: 'first_inv' must be a tensor, got {type(fi).__name__}")
                    fi = fi.detach().to(device=layer.weight.device, dtype=state.mean_hat.dtype)
                    with _layer_errors(self.method, layer):
                        try:
                            state = maccore.engine.with_first_layer(state, fi)
                        except TypeError as exc:
                            raise ValueError(str(exc)) from exc
            arrays = maccore.checkpoint.flatten_state(state)[0]
            bad = sorted(k for k, v in arrays.items() if v.is_floating_point() and not all_finite([v]))
            if bad:
                raise ValueError(f"{lw}: the state holds NaN/Inf in {bad}")
            new[layer.name] = (state, updates)
        return new, t

    def _assign_state(self, staged: tuple[dict, int]) -> None:
        new, t = staged
        for layer in self.layers:
            layer.state, layer.updates = new[layer.name]
        self.t = t
        self.consecutive_skips = 0
        self._discard()

    def _on_first_layer_fixed(self, layer: Layer) -> None:
        """A layer's state changed what it captures (a fixed first-layer inverse): re-attach."""
        self._sync_hooks()

    def _check_captured(self) -> None:
        """A collecting step where no hook ran although layers in training mode have gradients,
        after ``torch.compile`` compiled something: the model was most likely compiled (and run)
        BEFORE this preconditioner attached its hooks — dynamo does not see hooks added later,
        so no statistics would ever be collected. Warn once (it cannot be told apart for sure
        from gradients set by hand without a forward)."""
        capture = self._capture
        if self._compile_warned or capture is None or capture._removed or capture.fired:
            return
        if not any(l.weight.grad is not None and any(m.training for m in l.modules)
                   for l in self.layers) or not _dynamo_compiled():
            return
        self._compile_warned = True
        warnings.warn(
            f"{self.method}: step {self.t} collects statistics but none of the preconditioner's "
            "hooks ran although its layers have gradients. If the model was run through "
            "torch.compile before this optimizer was created, the compiled graph does not call "
            "hooks attached later: create the optimizer before the first compiled forward, or "
            "call torch.compiler.reset() after creating it. The same happens when another "
            "instance of the model's class (one without these hooks) was compiled first: dynamo "
            "reuses its graph because by default it does not guard on module hooks; set "
            "torch._dynamo.config.skip_nnmodule_hook_guards = False before compiling "
            "(docs/models/torch.md, 'Training loops')", RuntimeWarning, stacklevel=_user_stacklevel())

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(_NO_PICKLE.format(cls=type(self).__name__))

    def remove_hooks(self) -> None:
        """Detach from the model (no more statistics are collected)."""
        self._capture.remove()

    def report(self, params: Iterable[torch.Tensor] | None = None) -> str:
        """A table of every parameter (default: the model's trainable ones), its layer and the
        preconditioner it gets."""
        reasons = {s.parameter: s.reason for s in self.skipped}
        if params is not None:
            reasons.update({s.parameter: s.reason for s in coverage(
                self.model, self.layers, params, skip=self._skip_names, other=self._other)})
        text, n_pre, n_all = parameter_table(self.model, self.layers, self._describe, params,
                                             reasons=reasons)
        head = (f"{self.method}: {len(self.layers)} preconditioned layers, {n_pre}/{n_all} "
                f"parameters preconditioned (t_cov={self.t_cov}, t_inv={self.t_inv}, step {self.t})")
        return head + "\n" + text
