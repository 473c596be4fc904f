"""Reference curvature blocks of a JAX model (Flax parameter layout), for testing curvature code.

:func:`curvature_blocks` is the JAX twin of ``maccore_torch.testing.curvature_blocks``: one float64
NumPy block per layer — a dict of the parameter tree holding ``kernel`` (``[d_in, d_out]`` dense or
HWIO conv) and optional ``bias`` — in maccore's convention (row-major ``vec([W | b])``, bias last,
``W = kernelᵀ`` resp. the kernel as ``[C_out, C_in/g, kh, kw]``). It differentiates in float64
(``jax.enable_x64``) and shares the definitions with the torch version
(:mod:`maccore.testing._blocks`), so the same network gives the same blocks in both frameworks.

- The parameter-space kinds (``"ggn"``, ``"ef"``, ``"mc"``, ``"hessian"``) work for any
  ``apply_fn(params, inputs)``: Flax linen / nnx-as-function, Equinox or plain functions, as long
  as the parameters are a Flax-layout tree.
- The factor kinds (``"kfac-expand"``, ``"kfac-reduce"``, ``"mac"``) need the layer inputs and
  output gradients; they are observed with :func:`flax.linen.intercept_methods`, so
  ``apply_fn`` must run Flax linen ``nn.Dense`` / ``nn.Conv`` modules (e.g. ``model.apply``).

Losses: :class:`CrossEntropyLoss`, :class:`MSELoss`, :class:`BCEWithLogitsLoss` have PyTorch's
semantics (MSE without ½, mean over every entry) and carry their reduction factor and likelihood;
any other ``loss_fn(outputs, targets)`` works with ``reduction_factor=`` (and ``likelihood=`` for
``"mc"``).

Example:

>>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
>>> from maccore_jax.testing import curvature_blocks, CrossEntropyLoss
>>> model = nn.Sequential([nn.Dense(3), nn.tanh, nn.Dense(2)])
>>> x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
>>> y = jnp.asarray(np.arange(8) % 2)
>>> params = model.init(jax.random.PRNGKey(0), x)
>>> blocks = curvature_blocks(model.apply, params, CrossEntropyLoss(), x, y, kind="ggn")
>>> {name: b.shape for name, b in blocks.items()}
{'layers_0': (15, 15), 'layers_2': (8, 8)}
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np

from maccore.testing import _blocks as B
from maccore.testing.convert import from_parameter_layout

__all__ = ["curvature_blocks", "CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss", "supported_layers"]

#: Eigenvectors of the output Hessian backpropagated at once.
_CHUNK = 32


# --------------------------------------------------------------------------------------------
# losses with PyTorch semantics
# --------------------------------------------------------------------------------------------


class _Loss:
    likelihood: str = ""

    def __init__(self, reduction: str = "mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def _reduce(self, terms):
        return terms.sum() if self.reduction == "sum" else terms.mean()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"


class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy over the LAST axis (JAX convention); integer labels or class
    probabilities. ``R = 1`` (sum) or ``1/#labels`` (mean)."""

    likelihood = "categorical"

    def __call__(self, logits, targets):
        import jax
        import jax.numpy as jnp

        logp = jax.nn.log_softmax(logits, axis=-1)
        if jnp.issubdtype(jnp.asarray(targets).dtype, jnp.integer):
            terms = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        else:
            terms = -(targets * logp).sum(axis=-1)
        return self._reduce(terms)

    def reduction_factor(self, outputs, targets) -> float:
        return 1.0 if self.reduction == "sum" else 1.0 / (int(np.prod(outputs.shape)) // outputs.shape[-1])


class MSELoss(_Loss):
    """``Σ (f − y)²`` or its mean over every entry (``torch.nn.MSELoss``): ``R = 2`` or
    ``2/outputs.size`` (maccore writes the squared error as ``c = ½‖f − y‖²``)."""

    likelihood = "gaussian"

    def __call__(self, outputs, targets):
        return self._reduce((outputs - targets) ** 2)

    def reduction_factor(self, outputs, targets) -> float:
        return 2.0 if self.reduction == "sum" else 2.0 / int(np.prod(outputs.shape))


class BCEWithLogitsLoss(_Loss):
    """Binary cross-entropy on logits (``torch.nn.BCEWithLogitsLoss``): ``R = 1`` or
    ``1/outputs.size``."""

    likelihood = "bernoulli"

    def __call__(self, logits, targets):
        import jax

        terms = -(targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits))
        return self._reduce(terms)

    def reduction_factor(self, outputs, targets) -> float:
        return 1.0 if self.reduction == "sum" else 1.0 / int(np.prod(outputs.shape))


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------


class _Layer:
    def __init__(self, path: tuple[str, ...], node: dict):
        self.path = path
        self.name = "/".join(p for p in (path[1:] if path and path[0] == "params" else path))
        k = node["kernel"]
        self.kernel_shape = tuple(k.shape)
        self.conv = k.ndim == 4
        if self.conv:
            kh, kw, ci, co = self.kernel_shape
            shape = (co, ci, kh, kw)
        else:
            shape = (self.kernel_shape[1], self.kernel_shape[0])
        self.info = B.LayerInfo(self.name, shape, "bias" in node and node["bias"] is not None,
                                "conv2d" if self.conv else "linear")

    def to_torch_order(self, kernel):
        """kernel (Flax) → maccore's weight ``[d_out, d_in, ...]`` (a transpose)."""
        return kernel.transpose(3, 2, 0, 1) if self.conv else kernel.T

    def from_vector(self, vec):
        """Flat torch-order ``[vec W, b]`` → ``{"kernel", "bias"}`` in Flax layout."""
        shape = self.info.weight_shape
        nw = int(np.prod(shape))
        W = vec[:nw].reshape(shape)
        kernel = W.transpose(2, 3, 1, 0) if self.conv else W.T
        out = {"kernel": kernel}
        if self.info.bias:
            out["bias"] = vec[nw:]
        return out


def _walk(tree: Any, path: tuple[str, ...] = ()) -> list[_Layer]:
    out: list[_Layer] = []
    if isinstance(tree, dict) or hasattr(tree, "items"):
        items = list(tree.items())
        if any(k == "kernel" for k, _ in items):
            k = tree["kernel"]
            if getattr(k, "ndim", 0) in (2, 4):
                return [_Layer(path, dict(items))]
        for k, v in items:
            out.extend(_walk(v, path + (str(k),)))
    return out


def supported_layers(params: Any) -> list[str]:
    """Names of the layers of a Flax-layout parameter tree (paths joined by ``/``, without the
    leading ``"params"`` collection), in tree order."""
    return [lay.name for lay in _walk(params)]


def _set(tree: Any, path: tuple[str, ...], value: dict) -> Any:
    if not path:
        new = dict(tree)
        new.update(value)
        return new
    new = dict(tree)
    new[path[0]] = _set(tree[path[0]], path[1:], value)
    return new


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _pairs(padding: Any, ksize, strides, dil, hw) -> tuple[tuple[int, int], tuple[int, int]]:
    """Flax ``padding`` → explicit ((top, bottom), (left, right))."""
    if isinstance(padding, str):
        p = padding.upper()
        if p == "VALID":
            return (0, 0), (0, 0)
        if p == "SAME":
            out = []
            for n, k, s, d in zip(hw, ksize, strides, dil):
                eff = (k - 1) * d + 1
                o = -(-n // s)
                total = max((o - 1) * s + eff - n, 0)
                out.append((total // 2, total - total // 2))
            return tuple(out)  # type: ignore[return-value]
        raise ValueError(f"curvature_blocks: conv padding {padding!r} is not supported (zero padding only)")
    if isinstance(padding, int):
        return (padding, padding), (padding, padding)
    pads = []
    for p in padding:
        pads.append((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])))
    return tuple(pads)  # type: ignore[return-value]


def _tuple2(v, default=1):
    if v is None:
        return (default, default)
    if isinstance(v, int):
        return (v, v)
    return tuple(int(t) for t in v)


# --------------------------------------------------------------------------------------------
# main entry
# --------------------------------------------------------------------------------------------


def curvature_blocks(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    loss_fn: Callable[[Any, Any], Any],
    inputs: Any,
    targets: Any,
    *,
    kind: str,
    layers: Iterable[str] | None = None,
    mc_samples: int = 1,
    seed: int = 0,
    reduction_factor: float | None = None,
    likelihood: str | None = None,
    class_axis: int = -1,
    fisher: str = "type-2",
) -> dict[str, Any]:
    """Exact float64 curvature of every layer of a Flax-layout parameter tree on one batch.

    Arguments and kinds as ``maccore_torch.testing.curvature_blocks`` (``kind`` ∈ ``"ggn"``,
    ``"ef"``, ``"mc"``, ``"hessian"``, ``"kfac-expand"``, ``"kfac-reduce"``, ``"mac"``), except:

    Args:
        apply_fn: ``apply_fn(params, inputs) -> outputs`` (e.g. a linen ``model.apply``).
        params: the parameter tree (cast to float64 internally; not modified).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; :class:`CrossEntropyLoss`,
            :class:`MSELoss` and :class:`BCEWithLogitsLoss` carry their reduction factor and
            likelihood, other callables need ``reduction_factor`` (and ``likelihood``).
        class_axis: the output axis of one loss term (default last, JAX's convention).

    Layer names are the parameter-tree paths joined by ``/`` without the leading ``"params"``
    (``"Dense_0"``, ``"block/Conv_0"``). Returns ``{name: block}`` or ``{name: (A, G)}``, float64
    NumPy, in maccore's layout.
    """
    import jax

    B.check_kind(kind, fisher)
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
    with jax.enable_x64(True):
        return _run(apply_fn, params, loss_fn, inputs, targets, kind=kind, layers=layers,
                    mc_samples=mc_samples, seed=seed, reduction_factor=reduction_factor,
                    likelihood=likelihood, class_axis=class_axis, fisher=fisher)


def _f64(tree):
    import jax
    import jax.numpy as jnp

    def cast(v):
        a = jnp.asarray(v)
        return a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree_util.tree_map(cast, tree)


def _run(apply_fn, params, loss_fn, inputs, targets, *, kind, layers, mc_samples, seed,
         reduction_factor, likelihood, class_axis, fisher):
    import jax
    import jax.numpy as jnp

    params = _f64(params)
    x = _f64(inputs)
    y = _f64(targets)
    found = _walk(params)
    names = [lay.name for lay in found]
    if layers is not None:
        want = list(layers)
        unknown = [n for n in want if n not in names]
        if unknown:
            raise ValueError(f"curvature_blocks: unknown layers {unknown}; available: {names}")
        found = [lay for lay in found if lay.name in want]
    if not found:
        raise ValueError("curvature_blocks: no layer (a dict with a 2-D or 4-D 'kernel') in params")
    out = apply_fn(params, x)
    ax = class_axis % max(out.ndim, 1)
    R = reduction_factor
    if R is None and hasattr(loss_fn, "reduction_factor"):
        R = loss_fn.reduction_factor(out, y)
    if R is not None and not (float(R) > 0 and math.isfinite(float(R))):
        raise ValueError(f"reduction_factor must be a positive number, got {R!r}")
    lik = likelihood if likelihood is not None else getattr(loss_fn, "likelihood", None) or None
    if lik is not None and lik not in B.LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {list(B.LIKELIHOODS)}, got {lik!r}")
    info = B.LossInfo(None if R is None else float(R), lik, ax)
    if B.needs_reduction(kind, fisher) and info.reduction_factor is None:
        raise ValueError(f"curvature_blocks: kind={kind!r} needs the loss reduction factor R "
                         "(L = R·Σ terms): pass reduction_factor=")
    M = int(np.prod(out.shape))

    def hess_F():
        return np.asarray(jax.hessian(lambda f: loss_fn(f, y))(out)).reshape(M, M)

    def grad_F(t):
        return np.asarray(jax.grad(lambda f: loss_fn(f, t))(out)).reshape(-1)

    def draws():
        rng = np.random.default_rng(seed)
        return [jnp.asarray(B.sample_targets(np.asarray(out), info, np.asarray(y), rng))
                for _ in range(mc_samples)]

    if kind in B.PARAM_KINDS:
        return _param_blocks(apply_fn, params, found, x, y, out, info, kind, loss_fn, hess_F, grad_F, draws)
    return _factor_blocks(apply_fn, params, found, x, y, out, info, kind, fisher, loss_fn, hess_F,
                          grad_F, draws)


def _param_blocks(apply_fn, params, found, x, y, out, info, kind, loss_fn, hess_F, grad_F, draws):
    import jax
    import jax.numpy as jnp

    res: dict[str, Any] = {}
    H = hess_F() if kind == "ggn" else None
    idx = B.term_index(tuple(out.shape), info.class_axis)
    grads = [grad_F(y)] if kind == "ef" else [grad_F(t) for t in draws()] if kind == "mc" else []
    for lay in found:
        node = _get(params, lay.path)
        parts = [lay.to_torch_order(node["kernel"]).reshape(-1)]
        if lay.info.bias:
            parts.append(node["bias"].reshape(-1))
        theta = jnp.concatenate(parts)

        def f_of(vec, _lay=lay):
            sub = _lay.from_vector(vec)
            return apply_fn(_set(params, _lay.path, sub), x)

        if kind == "hessian":
            block = np.asarray(jax.hessian(lambda v: loss_fn(f_of(v), y))(theta))
            block = (block + block.T) / 2
        else:
            J = np.asarray(jax.jacrev(lambda v: f_of(v).reshape(-1))(theta))
            if kind == "ggn":
                block = B.ggn(J, H)
            else:
                block = sum(B.outer_by_term(J, g, idx, info.reduction_factor) for g in grads) / len(grads)
        res[lay.name] = from_parameter_layout(block, lay.info.weight_shape, bias=lay.info.bias,
                                              weight_order="row")
    return res


def _factor_blocks(apply_fn, params, found, x, y, out, info, kind, fisher, loss_fn, hess_F, grad_F,
                   draws):
    import flax.linen as fnn
    import jax
    import jax.numpy as jnp

    by_name = {lay.name: lay for lay in found}
    seen: dict[str, dict] = {}
    deltas: dict[str, Any] = {}
    state = {"inject": False}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, (fnn.Dense, fnn.Conv)):
            return next_fun(*args, **kwargs)
        name = "/".join(mod.path)
        if name not in by_name:
            return next_fun(*args, **kwargs)
        z = next_fun(*args, **kwargs)
        if state["inject"]:
            return z + deltas[name]
        rec = {"x": np.asarray(args[0]), "zshape": tuple(z.shape)}
        if isinstance(mod, fnn.Conv):
            if _tuple2(getattr(mod, "input_dilation", 1)) != (1, 1):
                raise ValueError(f"curvature_blocks: {name}: input_dilation is not supported")
            ks = _tuple2(mod.kernel_size)
            st = _tuple2(mod.strides)
            dil = _tuple2(mod.kernel_dilation)
            rec.update(kernel=ks, strides=st, dilation=dil, groups=int(mod.feature_group_count),
                       padding=_pairs(mod.padding, ks, st, dil, args[0].shape[-3:-1]))
        seen[name] = rec
        return z

    with fnn.intercept_methods(interceptor):
        apply_fn(params, x)
    missing = [n for n in by_name if n not in seen]
    if missing:
        raise ValueError(
            f"curvature_blocks: kind={kind!r} could not observe layers {missing}: the factor kinds "
            "need apply_fn to run Flax linen nn.Dense / nn.Conv modules (e.g. model.apply)")
    rows = {}
    for name, lay in by_name.items():
        rec = seen[name]
        xi = rec["x"]
        if lay.conv:
            xi = xi if xi.ndim == 4 else xi[None]
            cols = B.conv_rows_nchw(np.moveaxis(xi, -1, 1), rec["kernel"], rec["strides"], rec["padding"],
                                    rec["dilation"], rec["groups"])  # [N, P, g, d]
            r = cols.reshape(cols.shape[0], -1, cols.shape[-1])
        else:
            n = xi.shape[0] if xi.ndim > 1 else 1
            r = xi.reshape(n, -1, xi.shape[-1])
        rows[name] = B.with_bias(r, lay.info.bias)
    res: dict[str, Any] = {}
    if kind == "mac":
        for name, lay in by_name.items():
            a = B.mean_input(rows[name])
            res[name] = (np.outer(a, a), np.eye(lay.info.d_out))
        return res
    setting = "expand" if kind == "kfac-expand" else "reduce"
    zeros = {n: jnp.zeros(seen[n]["zshape"], out.dtype) for n in by_name}

    def F_of(ds):
        deltas.clear()
        deltas.update(ds)
        state["inject"] = True
        try:
            with fnn.intercept_methods(interceptor):
                return apply_fn(params, x).reshape(-1)
        finally:
            state["inject"] = False

    def as_rows(name, arr, lead: int):
        """``[lead, *z.shape]`` → ``[lead, N, S, d_out]`` (NHWC conv outputs: channels last)."""
        zs = seen[name]["zshape"]
        a = np.asarray(arr).reshape((lead,) + zs)
        if len(zs) == 1:
            a = a[:, None]
        n = a.shape[1]
        return a.reshape(lead, n, -1, a.shape[-1])

    if fisher == "type-2":
        # G = Σ_r D_rᵀ H D_r without materialising D = ∂F/∂Z: backpropagate H's eigenvectors
        w, Q = B.hessian_eig(hess_F())
        _, vjp_fn = jax.vjp(F_of, zeros)
        acc = {n: 0.0 for n in by_name}
        qt = jnp.asarray(Q.T)
        for start in range(0, qt.shape[0], _CHUNK):
            vs = jax.vmap(vjp_fn)(qt[start:start + _CHUNK])[0]
            for name in by_name:
                chunk = vs[name].shape[0]
                acc[name] = acc[name] + B.gradient_factor_type2_vjp(
                    as_rows(name, vs[name], chunk), w[start:start + _CHUNK], setting)
    else:
        targets = [y] if fisher == "empirical" else draws()
        gz = [jax.grad(lambda ds, t: loss_fn(F_of(ds).reshape(out.shape), t))(zeros, t) for t in targets]
    for name, lay in by_name.items():
        A = B.input_factor(rows[name], rows[name].shape[0], setting)
        if fisher == "type-2":
            G = (acc[name] + acc[name].T) / 2
        else:
            G = sum(B.gradient_factor_rows(as_rows(name, g[name], 1)[0], info.reduction_factor, setting)
                    for g in gz) / len(gz)
        res[name] = (A, G)
    return res
