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
import warnings
from typing import Any, Iterable, Mapping

import array_api_compat
import torch
from torch import nn

import maccore
from maccore.engine import CurvatureMethod, apply_split, schedule

from maccore_torch import distributed
from maccore_torch.hooks import LayerCapture
from maccore_torch.numerics import LossScale, all_finite
from maccore_torch.optimizer import CurvatureOptimizer  # noqa: F401  (re-exported: portable.py)
from maccore_torch.report import parameter_table
from maccore_torch.specs import Layer, discover_layers

__all__ = ["HookedPreconditioner", "XP"]

XP = array_api_compat.array_namespace(torch.empty(0))
_NONFINITE = (None, "skip", "raise")


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
        return saved.detach().to(device=template.device, dtype=template.dtype).clone()
    if isinstance(saved, torch.Tensor):  # e.g. a first-layer inverse where the template has none
        return saved.detach().to(device).clone()
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
    ):
        for nm, v in (("t_cov", t_cov), ("t_inv", t_inv)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be a positive integer, got {v!r}")
        if on_nonfinite not in _NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_NONFINITE}, got {on_nonfinite!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.curvature = curvature
        self.t_cov, self.t_inv = t_cov, t_inv
        self.loss_scale = LossScale(grad_scaler)
        self.grad_scaler = grad_scaler
        self.on_nonfinite = on_nonfinite
        self.process_group = process_group
        self._t = 0
        found = discover_layers(model, attention=attention, skip=skip_layers, param_ids=_param_ids(params))
        self.layers: list[Layer] = [l for l in found if l.role in self.roles]
        for layer in self.layers:
            w = layer.weight
            with _layer_errors(self.method, layer):
                layer.state = curvature.init(layer.spec, xp=XP, dtype=w.dtype, device=w.device)
        self._capture = LayerCapture(model, self.layers, curvature, self.loss_scale)
        self._sync_hooks()

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

        Returns ``False`` — and changes nothing but dropping this step's statistics — when a
        gradient (of the layers, or of ``check``) or a statistic is not finite
        (``on_nonfinite="skip"``: a ``RuntimeWarning``; ``"raise"``: ``FloatingPointError``;
        ``None``: no check, no device sync).
        """
        collect, refresh = schedule(self._t, t_cov=self.t_cov, t_inv=self.t_inv)
        stats = self._gather() if collect else [{} for _ in self.layers]
        if self.on_nonfinite is not None:
            params = self._layer_params() if check is None else list(check)
            if not all_finite([p.grad for p in params] + [v for s in stats for v in s.values()]):
                self._discard()
                msg = (f"{self.method}: non-finite gradients or statistics at step {self.t}; the step "
                       "was skipped and the curvature state left unchanged")
                if self.on_nonfinite == "raise":
                    raise FloatingPointError(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
                return False
        method = self.curvature
        snapshot = [(layer.state, layer.updates) for layer in self.layers]
        try:
            if collect:
                kw = self._update_kwargs()
                for layer, s in zip(self.layers, stats):
                    if s:
                        with _layer_errors(self.method, layer):
                            full = all(k in s for k in method.keys(layer.spec, layer.state))
                            layer.state = method.update(layer.spec, layer.state, s, **kw)
                            layer.updates += full
            if refresh:
                for layer in self.layers:
                    with _layer_errors(self.method, layer):
                        layer.state = method.refresh(layer.spec, layer.state)
        except Exception:  # a failed update / refresh leaves every layer as it was before the step
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
        """``.grad`` ← the preconditioned gradient (:func:`maccore.engine.apply_split`), written in
        place where the gradients allow it; otherwise ``.grad`` is replaced."""
        gw = layer.weight.grad
        if gw is None:
            return
        gb = None if layer.bias is None else layer.bias.grad
        inplace = _writable(gw) and (gb is None or _writable(gb))
        w, b = apply_split(self.curvature, layer.spec, layer.state, gw, gb, inplace=inplace)
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
        as a separate ``"first_inv"`` entry per layer). Changes nothing when it raises."""
        if state_dict.get("method") != self.method:
            raise ValueError(f"load_state_dict: state of method {state_dict.get('method')!r}, expected {self.method!r}")
        saved = state_dict["layers"]
        names = [l.name for l in self.layers]
        missing, unexpected = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        if missing or unexpected:
            raise ValueError(f"load_state_dict: layers differ (missing {missing}, unexpected {unexpected})")
        new = {}
        for layer in self.layers:
            entry = saved[layer.name]
            tree = entry["state"]
            if "first_inv" in entry:  # the previous format
                tree = _legacy_qkv_off(layer, tree)
            state = _from_tree(layer.state, tree, layer.name, layer.weight.device)
            if isinstance(state, maccore.MacState):
                fi = entry.get("first_inv", state.first_inv)
                state = state._replace(first_inv=None)
                if fi is not None:
                    fi = fi.detach().to(device=layer.weight.device, dtype=state.mean_hat.dtype)
                    with _layer_errors(self.method, layer):
                        state = maccore.engine.with_first_layer(state, fi)
            new[layer.name] = (state, int(entry["updates"]))
        for layer in self.layers:
            layer.state, layer.updates = new[layer.name]
        self.t = int(state_dict["t"])
        self._discard()

    def _on_first_layer_fixed(self, layer: Layer) -> None:
        """A layer's state changed what it captures (a fixed first-layer inverse): re-attach."""
        self._sync_hooks()

    def remove_hooks(self) -> None:
        """Detach from the model (no more statistics are collected)."""
        self._capture.remove()

    def report(self, params: Iterable[torch.Tensor] | None = None) -> str:
        """A table of every parameter (default: the model's trainable ones), its layer and the
        preconditioner it gets."""
        text, n_pre, n_all = parameter_table(self.model, self.layers, self._describe, params)
        head = (f"{self.method}: {len(self.layers)} preconditioned layers, {n_pre}/{n_all} "
                f"parameters preconditioned (t_cov={self.t_cov}, t_inv={self.t_inv}, step {self.t})")
        return head + "\n" + text
