"""Reference curvature blocks of a torch model, for testing curvature code (yours or maccore's).

:func:`curvature_blocks` returns one float64 NumPy block per ``nn.Linear`` / ``nn.Conv2d`` (stride,
padding incl. strings and padding modes, dilation, groups), transformers-style ``Conv1D`` (weight
``[d_in, d_out]``) and ``nn.MultiheadAttention`` in-projection, in maccore's convention: row-major
``vec([W | b])``, bias last (``docs/math.md``). It differentiates a float64 deep copy of the model
with ``torch.func`` and its own forward hooks, independently of maccore's optimizers and their
hooks; the definitions themselves are shared with ``maccore_jax.testing``
(:mod:`maccore.testing._blocks`).

Example — the GGN block of a small classifier's last layer, in float64:

>>> import torch, numpy as np
>>> from torch import nn
>>> from maccore_torch.testing import curvature_blocks
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
>>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
>>> blocks = curvature_blocks(model, nn.CrossEntropyLoss(), x, y, kind="ggn")
>>> {name: b.shape for name, b in blocks.items()}
{'0': (15, 15), '2': (8, 8)}
>>> A, G = curvature_blocks(model, nn.CrossEntropyLoss(), x, y, kind="kfac-expand")["2"]
>>> A.shape, G.shape
((4, 4), (2, 2))
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from maccore.testing import _blocks as B
from maccore.testing.convert import from_parameter_layout

__all__ = ["curvature_blocks", "loss_info", "supported_layers"]

#: Eigenvectors of the output Hessian backpropagated at once (memory: this many copies of the
#: layer outputs).
_CHUNK = 32


# --------------------------------------------------------------------------------------------
# loss metadata
# --------------------------------------------------------------------------------------------


def _class_axis(out_ndim: int, loss_fn: Any, class_axis: int | None) -> int:
    if class_axis is not None:
        return class_axis % max(out_ndim, 1)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return 1 if out_ndim >= 2 else 0
    return max(out_ndim - 1, 0)


def loss_info(loss_fn: Any, outputs: torch.Tensor, targets: Any, *,
              reduction_factor: float | None = None, likelihood: str | None = None,
              class_axis: int | None = None) -> B.LossInfo:
    """Reduction factor ``R``, likelihood and class axis of ``loss_fn`` at these outputs/targets.

    Detected for ``nn.CrossEntropyLoss`` (``R = 1`` for ``"sum"``, ``1/#labels`` for ``"mean"``;
    categorical), ``nn.MSELoss`` (``R = 2``, ``2/outputs.numel()``; gaussian: maccore writes the
    squared error as ``c = ½‖f − y‖²``) and ``nn.BCEWithLogitsLoss`` (``R = 1``,
    ``1/outputs.numel()``; bernoulli). Explicit ``reduction_factor`` / ``likelihood`` win; any
    other callable needs them for the kinds that use them.
    """
    ax = _class_axis(outputs.ndim, loss_fn, class_axis)
    R, lik = None, None
    red = getattr(loss_fn, "reduction", None)
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)) and red not in ("mean", "sum"):
        raise ValueError(f"curvature_blocks: loss reduction must be 'mean' or 'sum', got {red!r}")
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            raise ValueError("curvature_blocks: CrossEntropyLoss with class weights or label smoothing "
                             "is not a categorical likelihood; pass a plain CrossEntropyLoss")
        t = torch.as_tensor(targets)
        if not t.is_floating_point() and bool((t == loss_fn.ignore_index).any()):
            raise ValueError("curvature_blocks: targets contain ignore_index; remove those terms")
        labels = t.numel() if not t.is_floating_point() else outputs.numel() // outputs.shape[ax]
        R, lik = (1.0 if red == "sum" else 1.0 / labels), "categorical"
    elif isinstance(loss_fn, nn.MSELoss):
        R, lik = (2.0 if red == "sum" else 2.0 / outputs.numel()), "gaussian"
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise ValueError("curvature_blocks: BCEWithLogitsLoss with weight/pos_weight is not supported")
        R, lik = (1.0 if red == "sum" else 1.0 / outputs.numel()), "bernoulli"
    if reduction_factor is not None:
        R = float(reduction_factor)
        if not (R > 0 and math.isfinite(R)):
            raise ValueError(f"reduction_factor must be a positive number, got {reduction_factor!r}")
    if likelihood is not None:
        if likelihood not in B.LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {list(B.LIKELIHOODS)}, got {likelihood!r}")
        lik = likelihood
    return B.LossInfo(R, lik, ax)


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``weight [d_in, d_out]``, ``x @ weight + bias``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None \
        and m.weight.ndim == 2


class _Layer:
    def __init__(self, name: str, module: nn.Module, kind: str):
        self.name, self.module, self.kind = name, module, kind
        if kind == "linear":
            self.params = {"weight": f"{name}.weight" if name else "weight"}
            w = module.weight
            shape = tuple(w.shape)
            order = "row"
        elif kind == "conv1d":
            self.params = {"weight": f"{name}.weight" if name else "weight"}
            shape = (module.weight.shape[1], module.weight.shape[0])
            order = "column"
        elif kind == "conv2d":
            self.params = {"weight": f"{name}.weight" if name else "weight"}
            shape = tuple(module.weight.shape)
            order = "row"
        else:  # MultiheadAttention in-projection
            if module.in_proj_weight is None:
                raise ValueError(f"{name}: MultiheadAttention with separate q/k/v weights (kdim/vdim) "
                                 "is not supported")
            self.params = {"weight": f"{name}.in_proj_weight" if name else "in_proj_weight"}
            shape = tuple(module.in_proj_weight.shape)
            order = "row"
        bias_attr = "in_proj_bias" if kind == "attention" else "bias"
        has_bias = getattr(module, bias_attr, None) is not None
        if has_bias:
            self.params["bias"] = f"{name}.{bias_attr}" if name else bias_attr
        self.order = order
        self.info = B.LayerInfo(name if kind != "attention" else f"{name}.in_proj" if name else "in_proj",
                                shape, has_bias, "conv2d" if kind == "conv2d" else kind,
                                getattr(module, "groups", 1) if kind == "conv2d" else 1)


def supported_layers(model: nn.Module) -> list[str]:
    """Names of the layers :func:`curvature_blocks` returns blocks for (in module order)."""
    return [lay.info.name for lay in _discover(model)]


def _discover(model: nn.Module) -> list[_Layer]:
    out: list[_Layer] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out.append(_Layer(name, m, "attention"))
        elif isinstance(m, nn.Linear):
            out.append(_Layer(name, m, "linear"))
        elif isinstance(m, nn.Conv2d):
            out.append(_Layer(name, m, "conv2d"))
        elif _is_conv1d(m):
            out.append(_Layer(name, m, "conv1d"))
    return out


def _inside_mha(model: nn.Module) -> set[str]:
    inner = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            for sub, _ in m.named_modules():
                if sub:
                    inner.add(f"{name}.{sub}" if name else sub)
    return inner


def _conv_padding(m: nn.Conv2d, hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    pad = m.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0), (0, 0)
        out = []
        for k, d in zip(m.kernel_size, m.dilation):  # "same" (stride 1)
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)  # type: ignore[return-value]
    return (pad[0], pad[0]), (pad[1], pad[1])


# --------------------------------------------------------------------------------------------
# main entry
# --------------------------------------------------------------------------------------------


def _drop_hooks(m: nn.Module) -> None:
    """Remove the hooks the copy inherited (a user's or an optimizer's statistics hooks must not run
    on the reference's forward passes, and backward hooks break ``torch.func``); forward
    pre-hooks that compute the weights (``weight_norm``, ``spectral_norm``) are kept."""
    keep: tuple[type, ...] = ()
    try:
        from torch.nn.utils.spectral_norm import SpectralNorm
        from torch.nn.utils.weight_norm import WeightNorm

        keep = (WeightNorm, SpectralNorm)
    except ImportError:  # pragma: no cover - old or future torch
        pass
    for sub in m.modules():
        for attr in ("_forward_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            d = getattr(sub, attr, None)
            if isinstance(d, dict):
                d.clear()
        pre = getattr(sub, "_forward_pre_hooks", None)
        if isinstance(pre, dict):
            for k in [k for k, h in pre.items() if not isinstance(h, keep)]:
                del pre[k]
                kw = getattr(sub, "_forward_pre_hooks_with_kwargs", None)
                if isinstance(kw, dict):
                    kw.pop(k, None)
        if hasattr(sub, "_is_full_backward_hook"):
            sub._is_full_backward_hook = None


def _as_float64(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64) if x.is_floating_point() else x.detach()
    if isinstance(x, (tuple, list)):
        return type(x)(_as_float64(v) for v in x)
    if isinstance(x, Mapping):
        return {k: _as_float64(v) for k, v in x.items()}
    return x


def _call(model: nn.Module, inputs: Any):
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def curvature_blocks(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
    *,
    kind: str,
    layers: Iterable[str] | None = None,
    mc_samples: int = 1,
    seed: int = 0,
    reduction_factor: float | None = None,
    likelihood: str | None = None,
    class_axis: int | None = None,
    fisher: str = "type-2",
) -> dict[str, Any]:
    """Exact float64 curvature of every supported layer of ``model`` on one batch.

    Args:
        model: a ``nn.Module``; it is deep-copied and cast to float64 (the original is untouched).
            Use ``model.eval()`` if it has dropout: the function must be deterministic. Hooks
            registered on the model (yours, an optimizer's) do not run on the copy, except the
            forward pre-hooks of ``weight_norm`` / ``spectral_norm``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``: ``nn.CrossEntropyLoss`` / ``nn.MSELoss``
            / ``nn.BCEWithLogitsLoss`` (reduction and likelihood detected) or any callable (then
            pass ``reduction_factor`` and, for ``"mc"``, ``likelihood``).
        inputs: the batch (a tensor, or a tuple / dict of model arguments); batch axis first.
        targets: the targets ``loss_fn`` expects.
        kind: one of

            - ``"ggn"``: ``Jᵀ (∇²_F L) J`` (the generalised Gauss-Newton, = type-II Fisher);
            - ``"hessian"``: ``∇²_θ L`` restricted to the layer;
            - ``"ef"``: empirical Fisher ``(1/R) Σ_terms gₜgₜᵀ`` with ``gₜ`` the gradient of the
              loss through term ``t`` only (maccore's scaling: equal to the GGN's when the
              labels are replaced by samples of the model);
            - ``"mc"``: Monte-Carlo Fisher, the same with ``mc_samples`` draws of labels from
              the model (``seed``), averaged; converges to ``"ggn"``;
            - ``"kfac-expand"`` / ``"kfac-reduce"``: the Kronecker factors ``(A, G)`` from their
              definitions (``docs/math.md``, "KFAC"), canonical split: ``A`` a plain mean of
              ``x̃x̃ᵀ`` over rows (expand: every token / output location; reduce: per-sample means
              over the shared axes), ``G`` carrying ``R``. ``fisher`` selects the backpropagated
              vectors: ``"type-2"`` (exact loss Hessian, default), ``"empirical"`` or ``"mc"``.
              ``np.kron(G, A)`` is the KFAC block in the layout of the other kinds;
            - ``"mac"``: ``(āāᵀ, I)``: MAC's rank-1 input factor (``ā = E_rows[x̃]``) paired with
              the identity gradient factor it assumes — the preconditioner MAC applies is
              ``λ(āāᵀ + λI)⁻¹`` on the input side.

        layers: names (from ``model.named_modules()``; ``"<name>.in_proj"`` for an attention
            in-projection) to restrict to; default all supported layers. The factor kinds skip
            ``nn.MultiheadAttention`` (its projections are not observable by hooks).
        mc_samples / seed: draws and seed of ``"mc"`` (and ``fisher="mc"``); NumPy's generator,
            so ``maccore_jax.testing`` draws the same labels.
        reduction_factor, likelihood, class_axis: override the detected loss metadata
            (:func:`loss_info`); ``class_axis`` is the output axis of one loss term (classes of a
            cross-entropy: 1; features of MSE: last).

    Returns:
        ``{layer name: block [d_out·d̃, d_out·d̃]}`` (``[W | b]`` row-major, bias last) or, for the
        factor kinds, ``{layer name: (A [d̃, d̃], G [d_out, d_out])}``; float64 NumPy.
    """
    B.check_kind(kind, fisher)
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
    m = copy.deepcopy(model).to(torch.float64)
    for p in m.parameters():
        p.requires_grad_(False)
    _drop_hooks(m)
    for sub in m.modules():
        if isinstance(sub, nn.Dropout) and sub.training and sub.p > 0:
            raise ValueError("curvature_blocks: the model has active dropout; call model.eval() first")
    x = _as_float64(inputs)
    y = _as_float64(targets)
    found = _discover(m)
    if kind in B.FACTOR_KINDS:
        inner = _inside_mha(m)
        found = [lay for lay in found if lay.kind != "attention" and lay.name not in inner]
    names = [lay.info.name for lay in found]
    if layers is not None:
        want = list(layers)
        unknown = [n for n in want if n not in names]
        if unknown:
            raise ValueError(f"curvature_blocks: unknown or unsupported layers {unknown} for "
                             f"kind={kind!r}; available: {names}")
        found = [lay for lay in found if lay.info.name in want]
    if not found:
        raise ValueError("curvature_blocks: the model has no supported layer (Linear, Conv2d, Conv1D, "
                         "MultiheadAttention)")

    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = {k: v.detach() for k, v in m.named_buffers()}
    with torch.no_grad():
        out = _call(m, x)
    if not isinstance(out, torch.Tensor):
        raise TypeError("curvature_blocks: the model must return one tensor (the loss input)")
    info = loss_info(loss_fn, out, y, reduction_factor=reduction_factor, likelihood=likelihood,
                     class_axis=class_axis)
    needs_R = B.needs_reduction(kind, fisher)
    if needs_R and info.reduction_factor is None:
        raise ValueError(f"curvature_blocks: kind={kind!r} needs the loss reduction factor R "
                         "(L = R·Σ terms): pass reduction_factor=")

    def loss_of_out(f, t=y):
        return loss_fn(f, t)

    def hess_F() -> np.ndarray:
        Hf = torch.func.hessian(loss_of_out)(out)
        return Hf.reshape(out.numel(), out.numel()).detach().cpu().numpy()

    def grad_F(t) -> np.ndarray:
        return torch.func.grad(loss_of_out)(out, t).reshape(-1).detach().cpu().numpy()

    def draws() -> list[Any]:
        rng = np.random.default_rng(seed)
        out_np, t_np = out.detach().cpu().numpy(), y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        res = []
        for _ in range(mc_samples):
            s = B.sample_targets(out_np, info, t_np, rng)
            res.append(torch.as_tensor(s, device=out.device))
        return res

    if kind in B.PARAM_KINDS:
        return _param_blocks(m, found, params, buffers, x, y, out, info, kind, loss_fn,
                             hess_F, grad_F, draws)
    return _factor_blocks(m, found, x, y, out, info, kind, fisher, loss_fn, hess_F, grad_F, draws)


def _param_blocks(m, found, params, buffers, x, y, out, info, kind, loss_fn, hess_F, grad_F, draws):
    res: dict[str, Any] = {}
    H = hess_F() if kind == "ggn" else None
    idx = B.term_index(tuple(out.shape), info.class_axis)
    grads: list[np.ndarray] = []
    if kind == "ef":
        grads = [grad_F(y)]
    elif kind == "mc":
        grads = [grad_F(t) for t in draws()]
    for lay in found:
        keys = [lay.params["weight"]] + ([lay.params["bias"]] if "bias" in lay.params else [])
        p0 = tuple(params[k] for k in keys)

        def f_of(*ps, _keys=keys):
            full = dict(params)
            full.update(dict(zip(_keys, ps)))
            full.update(buffers)
            if isinstance(x, Mapping):
                return torch.func.functional_call(m, full, (), x)
            return torch.func.functional_call(m, full, tuple(x) if isinstance(x, (tuple, list)) else (x,))

        if kind == "hessian":
            def total(*ps):
                return loss_fn(f_of(*ps), y)

            hs = torch.func.hessian(total, argnums=tuple(range(len(p0))))(*p0)
            sizes = [p.numel() for p in p0]
            rows = [torch.cat([hs[i][j].reshape(sizes[i], sizes[j]) for j in range(len(p0))], dim=1)
                    for i in range(len(p0))]
            block = torch.cat(rows, dim=0).detach().cpu().numpy()
            block = (block + block.T) / 2
        else:
            js = torch.func.jacrev(lambda *ps: f_of(*ps).reshape(-1), argnums=tuple(range(len(p0))))(*p0)
            J = torch.cat([j.reshape(out.numel(), -1) for j in js], dim=1).detach().cpu().numpy()
            if kind == "ggn":
                block = B.ggn(J, H)
            else:
                block = sum(B.outer_by_term(J, g, idx, info.reduction_factor) for g in grads) / len(grads)
        res[lay.info.name] = from_parameter_layout(block, lay.info.weight_shape, bias=lay.info.bias,
                                                   weight_order=lay.order)
    return res


def _layer_rows(lay: _Layer, xin: torch.Tensor) -> np.ndarray:
    """Input rows ``[N, S, d̃]`` (bias column last) of one layer from its input tensor."""
    mod = lay.module
    if lay.kind in ("linear", "conv1d"):
        xi = xin.detach().cpu().numpy()
        n = xi.shape[0] if xi.ndim > 1 else 1
        rows = xi.reshape(n, -1, xi.shape[-1])
    else:
        xi = xin.detach()
        pads = _conv_padding(mod, tuple(xi.shape[-2:]))
        if xi.ndim == 3:
            xi = xi.unsqueeze(0)
        (pt, pb), (pl, pr) = pads
        mode = mod.padding_mode if mod.padding_mode != "zeros" else "constant"
        xi = torch.nn.functional.pad(xi, (pl, pr, pt, pb), mode=mode)
        # torch's own im2col: [N, C·kh·kw, P], features (c, i, j), j fastest
        cols = torch.nn.functional.unfold(xi, mod.kernel_size, dilation=mod.dilation, padding=0,
                                          stride=mod.stride)
        n, f, p = cols.shape
        g = mod.groups
        cols = cols.reshape(n, g, f // g, p).permute(0, 3, 1, 2)  # [N, P, g, f/g]
        rows = cols.reshape(n, p * g, f // g).detach().cpu().numpy()
    return B.with_bias(rows, lay.info.bias)


def _out_rows(lay: _Layer, z: torch.Tensor) -> torch.Tensor:
    """Layer output as ``[N, S, d_out]`` (conv: channels last)."""
    if lay.kind == "conv2d":
        if z.ndim == 3:
            z = z.unsqueeze(0)
        n, c = z.shape[:2]
        return z.reshape(n, c, -1).transpose(1, 2)
    n = z.shape[0] if z.ndim > 1 else 1
    return z.reshape(n, -1, z.shape[-1])


def _factor_blocks(m, found, x, y, out, info, kind, fisher, loss_fn, hess_F, grad_F, draws):
    inputs: dict[str, torch.Tensor] = {}
    shapes: dict[str, torch.Size] = {}
    deltas: dict[str, torch.Tensor] = {}
    mode = {"inject": False}
    handles = []

    def hook(lay):
        def fn(module, args, output):
            if mode["inject"]:
                return output + deltas[lay.info.name]
            inputs[lay.info.name] = args[0].detach()
            shapes[lay.info.name] = output.shape
            return None
        return fn

    for lay in found:
        handles.append(lay.module.register_forward_hook(hook(lay)))
    try:
        with torch.no_grad():
            _call(m, x)
        missing = [lay.info.name for lay in found if lay.info.name not in inputs]
        if missing:
            raise ValueError(f"curvature_blocks: layers {missing} were not called by the forward pass")
        res: dict[str, Any] = {}
        rows = {lay.info.name: _layer_rows(lay, inputs[lay.info.name]) for lay in found}
        if kind == "mac":
            for lay in found:
                a = B.mean_input(rows[lay.info.name])
                res[lay.info.name] = (np.outer(a, a), np.eye(lay.info.d_out))
            return res
        setting = "expand" if kind == "kfac-expand" else "reduce"
        names = [lay.info.name for lay in found]
        zeros = {k: torch.zeros(shapes[k], dtype=out.dtype, device=out.device) for k in names}

        def F_of(ds):
            deltas.clear()
            deltas.update(ds)
            return _call(m, x).reshape(-1)

        mode["inject"] = True
        if fisher == "type-2":
            # G = Σ_r D_rᵀ H D_r without materialising D = ∂F/∂Z: backpropagate H's eigenvectors
            w, Q = B.hessian_eig(hess_F())
            _, vjp_fn = torch.func.vjp(F_of, zeros)
            acc = {k: 0.0 for k in names}
            qt = torch.as_tensor(Q.T.copy(), dtype=out.dtype, device=out.device)
            for start in range(0, qt.shape[0], _CHUNK):
                vs = torch.func.vmap(vjp_fn)(qt[start:start + _CHUNK])[0]
                for lay in found:
                    k = lay.info.name
                    acc[k] = acc[k] + B.gradient_factor_type2_vjp(
                        _out_rows_batched(lay, vs[k], shapes[k]), w[start:start + _CHUNK], setting)
        else:
            targets = [y] if fisher == "empirical" else draws()

            def loss_of(ds, t):
                return loss_fn(F_of(ds).reshape(out.shape), t)

            gz = [torch.func.grad(loss_of)(zeros, t) for t in targets]
        for lay in found:
            k = lay.info.name
            A = B.input_factor(rows[k], rows[k].shape[0], setting)
            if fisher == "type-2":
                G = acc[k]
                G = (G + G.T) / 2
            else:
                G = sum(B.gradient_factor_rows(_out_rows(lay, g[k]).detach().cpu().numpy(), info.reduction_factor,
                                               setting) for g in gz) / len(gz)
            res[k] = (A, G)
        return res
    finally:
        mode["inject"] = False
        deltas.clear()
        for h in handles:
            h.remove()


def _out_rows_batched(lay: _Layer, Dk: torch.Tensor, zshape) -> np.ndarray:
    """``∂F/∂Z`` ``[M, *z.shape]`` → ``[M, N, S, d_out]``."""
    Mo = Dk.shape[0]
    D = Dk.reshape((Mo,) + tuple(zshape))
    if lay.kind == "conv2d":
        if D.ndim == 4:  # unbatched conv input
            D = D.unsqueeze(1)
        n, c = D.shape[1:3]
        return D.reshape(Mo, n, c, -1).transpose(2, 3).detach().cpu().numpy()
    n = D.shape[1] if D.ndim > 2 else 1
    return D.reshape(Mo, n, -1, D.shape[-1]).detach().cpu().numpy()
