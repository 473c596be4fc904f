"""Check the framework adapters against the core (``python -m maccore verify --adapters``).

Every check runs one step of an adapter's preconditioner — ``maccore_torch``'s
``MACPreconditioner`` / ``KFACPreconditioner`` / ``SINGDPreconditioner`` (``.grad`` then holds the
preconditioned gradient) or ``maccore_jax``'s ``scale_by_mac`` / ``scale_by_kfac`` /
``scale_by_singd`` — on a tiny float64 model with statistics and refresh on every step
(``t_cov = t_inv = 1``, SINGD ``T = 1``). Independently of the adapter's capture, the check records
each layer's input and output gradient itself (torch: its own forward hooks and
``register_full_backward_hook``; JAX: ``jax.vjp`` through zero perturbations of the layer outputs),
recomputes the expected update with the public core (:func:`maccore.engine.mac_method` /
:func:`~maccore.engine.kfac_method` / :func:`~maccore.engine.singd_method`: ``init`` →
``input_statistics`` / ``grad_statistics`` → :func:`~maccore.engine.pool_stats` → ``finalize``
with the loss's reduction factor → ``update`` → ``refresh`` → ``apply``) in NumPy, and compares
with :func:`maccore.testing.curvature_report` (float64 tolerance).

Models: ``mlp`` (a Linear layer with a bias and one without, cross-entropy averaged over the
batch), ``mlp-sum`` (the same with a summed loss, ``loss_average=None``), ``cnn`` (two Conv2d
layers, one strided and without bias, and a Linear head) and ``tokens`` (a token-wise Linear
layer, mean-pooled before the head: the KFAC-reduce setting). A framework (or its adapter) that is
not installed gives ``skip`` rows with the reason. No framework is imported before a check runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["FRAMEWORKS", "CHECKS", "AdapterResult", "run_adapter_checks", "format_adapter_results"]

FRAMEWORKS = ("torch", "jax")

#: ``(check name, method, hyperparameters, models)``: the configurations every framework runs.
CHECKS: tuple[tuple[str, str, dict, tuple[str, ...]], ...] = (
    ("mac.reference", "mac", {"stat_decay": 0.9, "damping": 0.5, "scale": "reference"}, ("mlp", "cnn")),
    ("mac.inverse", "mac", {"stat_decay": 0.9, "damping": 0.5, "scale": "inverse"}, ("mlp", "cnn")),
    ("smac", "mac", {"stat_decay": 0.9, "damping": 0.5, "diagonal": True}, ("mlp", "cnn")),
    ("kfac.tikhonov.expand", "kfac", {"stat_decay": 0.9, "damping": 0.1, "damping_mode": "tikhonov"},
     ("mlp", "mlp-sum", "cnn")),
    ("kfac.pi.expand", "kfac", {"stat_decay": 0.9, "damping": 0.1, "damping_mode": "pi"}, ("mlp", "cnn")),
    ("kfac.exact.expand", "kfac", {"stat_decay": 0.9, "damping": 0.1, "damping_mode": "exact"},
     ("mlp", "cnn")),
    ("kfac.tikhonov.reduce", "kfac", {"stat_decay": 0.9, "damping": 0.1, "damping_mode": "tikhonov",
                                      "kfac_approx": "reduce"}, ("tokens",)),
    ("kfac.pi.reduce", "kfac", {"stat_decay": 0.9, "damping": 0.1, "damping_mode": "pi",
                                "kfac_approx": "reduce"}, ("tokens",)),
    ("kfac.exact.reduce", "kfac", {"stat_decay": 0.9, "damping": 0.1, "damping_mode": "exact",
                                   "kfac_approx": "reduce"}, ("tokens",)),
    ("singd.dense", "singd", {"damping": 0.01, "lr_cov": 0.1, "structures": ("dense", "dense")},
     ("mlp", "mlp-sum", "cnn")),
    ("singd.diagonal", "singd", {"damping": 0.01, "lr_cov": 0.1, "structures": ("diagonal", "diagonal")},
     ("mlp", "cnn")),
)

_PIP = {"torch": "torch", "jax": "jax optax"}


@dataclass
class AdapterResult:
    """One check: ``status`` ``"pass"``, ``"fail"`` or ``"skip"``; ``error`` the worst relative
    Frobenius error over the model's parameters (``None`` when skipped); ``sizes`` the problem;
    ``detail`` the mismatch report or the reason for a skip."""

    framework: str
    check: str
    model: str
    status: str
    error: float | None = None
    sizes: str = ""
    detail: str = ""


# ---------------------------------------------------------------------------------------------
# the models, as plain data shared by both frameworks

@dataclass(frozen=True)
class _Layer:
    name: str  # the torch module name
    kind: str  # "linear" | "conv"
    d_in: int  # linear: features; conv: input channels
    d_out: int
    bias: bool
    kernel: int = 1
    stride: int = 1
    padding: int = 0


# N, input shape (without N), classes, layers, summed loss?
_MODELS: dict[str, tuple[int, tuple[int, ...], int, tuple[_Layer, ...], bool]] = {
    "mlp": (8, (5,), 4, (_Layer("0", "linear", 5, 6, True), _Layer("2", "linear", 6, 4, False)), False),
    "mlp-sum": (8, (5,), 4, (_Layer("0", "linear", 5, 6, True), _Layer("2", "linear", 6, 4, False)), True),
    "cnn": (4, (2, 6, 6), 3, (_Layer("0", "conv", 2, 3, True, 3, 1, 1),
                              _Layer("2", "conv", 3, 4, False, 3, 2, 1),
                              _Layer("5", "linear", 4 * 3 * 3, 3, True)), False),
    "tokens": (6, (4, 5), 3, (_Layer("0", "linear", 5, 6, True), _Layer("3", "linear", 6, 3, True)), False),
}


def _sizes(model: str) -> str:
    n, shape, classes, layers, summed = _MODELS[model]
    parts = []
    for lay in layers:
        b = "+b" if lay.bias else ""
        if lay.kind == "conv":
            parts.append(f"Conv {lay.d_in}→{lay.d_out} {lay.kernel}×{lay.kernel}/s{lay.stride}{b}")
        else:
            parts.append(f"Linear {lay.d_in}→{lay.d_out}{b}")
    loss = "CE sum (R=1)" if summed else f"CE mean (R=1/{n})"
    pooled = ", tokens mean-pooled" if model == "tokens" else ""
    return f"x {n}×{'×'.join(map(str, shape))}: {', '.join(parts)}{pooled}; {loss}"


def _data(model: str) -> dict[str, Any]:
    """Float64 NumPy weights (torch layout: ``[d_out, d_in]`` / OIHW), inputs and labels."""
    import numpy as np

    n, shape, classes, layers, _ = _MODELS[model]
    rng = np.random.default_rng(0)
    params = {}
    for lay in layers:
        wshape = (lay.d_out, lay.d_in, lay.kernel, lay.kernel) if lay.kind == "conv" else (lay.d_out, lay.d_in)
        fan_in = lay.d_in * lay.kernel * lay.kernel
        params[lay.name] = (rng.standard_normal(wshape) / np.sqrt(fan_in),
                            0.3 * rng.standard_normal(lay.d_out) if lay.bias else None)
    x = rng.standard_normal((n, *shape))
    y = rng.integers(0, classes, size=n)
    return {"params": params, "x": x, "y": y}


# ---------------------------------------------------------------------------------------------
# the expected update, from the core on captured arrays (NumPy, float64)

def _spec(lay: _Layer):
    from maccore import ConvSpec, LayerKind, LayerSpec

    if lay.kind == "conv":
        cs = ConvSpec(kernel_size=(lay.kernel, lay.kernel), stride=(lay.stride, lay.stride),
                      padding=(lay.padding, lay.padding), in_channels=lay.d_in)
        return LayerSpec(LayerKind.CONV2D, lay.d_in * lay.kernel * lay.kernel, lay.d_out, lay.bias,
                         conv=cs, name=lay.name)
    return LayerSpec(LayerKind.LINEAR, lay.d_in, lay.d_out, lay.bias, name=lay.name)


def _core_method(method: str, cfg: dict, loss_average: str | None):
    from maccore import engine

    if method == "mac":
        return engine.mac_method(**cfg)
    if method == "kfac":
        return engine.kfac_method(**cfg, loss_average=loss_average)
    return engine.singd_method(**cfg, loss_average=loss_average)


def _expected(method: str, cfg: dict, model: str, x: dict, g: dict, gw: dict, gb: dict,
              loss_average: str | None) -> dict[str, Any]:
    """``{layer: (weight gradient, bias gradient)}`` (torch layout) preconditioned by the core from
    the captured inputs ``x`` (NCHW / ``[..., d_in]``), output gradients ``g`` and raw gradients."""
    import array_api_compat
    import numpy as np

    from maccore import engine, grad_matrix, split_grad_matrix

    n, _, _, layers, summed = _MODELS[model]
    R = 1.0 if summed else 1.0 / n  # the loss's reduction factor: L = R · Σ_n loss_n
    xp = array_api_compat.array_namespace(np.zeros(0))
    meth = _core_method(method, cfg, loss_average)
    out = {}
    for lay in layers:
        spec = _spec(lay)
        state = meth.init(spec, xp=xp, dtype=np.float64)
        stats: dict = {}
        if meth.wants_input(spec, state):
            stats = engine.pool_stats(stats, meth.input_statistics(spec, state, x[lay.name]))
        if meth.wants_grads(spec):
            stats = engine.pool_stats(stats, meth.grad_statistics(spec, state, g[lay.name]))
        final = meth.finalize(spec, state, stats, reduction_factor=R)
        state = meth.update(spec, state, {k: v for k, (v, _) in final.items()})
        state = meth.refresh(spec, state)
        w = gw[lay.name]
        mat = meth.apply(spec, state, grad_matrix(w.reshape(w.shape[0], -1), gb.get(lay.name)))
        pw, pb = split_grad_matrix(mat, tuple(w.shape), bias=lay.bias)
        out[lay.name] = (np.asarray(pw), None if pb is None else np.asarray(pb))
    return out


def _compare(framework: str, check: str, model: str, actual: dict, desired: dict,
             raw: tuple[dict, dict]) -> AdapterResult:
    import numpy as np

    from maccore.testing._assert import curvature_report

    for name, (w, _) in desired.items():  # a check where nothing is preconditioned proves nothing
        g = raw[0][name]
        if np.linalg.norm(w - g) <= 1e-8 * np.linalg.norm(g):
            return AdapterResult(framework, check, model, "fail", None, _sizes(model),
                                 f"vacuous: the core left layer {name!r}'s gradient unchanged")

    act = {f"{k}.{p}": v for k, (w, b) in actual.items() for p, v in (("weight", w), ("bias", b))
           if v is not None}
    des = {f"{k}.{p}": v for k, (w, b) in desired.items() for p, v in (("weight", w), ("bias", b))
           if v is not None}
    ok, err, msg = curvature_report(act, des, dtype="float64")
    return AdapterResult(framework, check, model, "pass" if ok else "fail", err, _sizes(model),
                         "" if ok else msg)


# ---------------------------------------------------------------------------------------------
# torch

def _torch_model(model: str, data: dict):
    import torch
    from torch import nn

    _, _, _, layers, _ = _MODELS[model]

    def mod(lay: _Layer) -> nn.Module:
        if lay.kind == "conv":
            m = nn.Conv2d(lay.d_in, lay.d_out, lay.kernel, stride=lay.stride, padding=lay.padding,
                          bias=lay.bias)
        else:
            m = nn.Linear(lay.d_in, lay.d_out, bias=lay.bias)
        m = m.double()
        w, b = data["params"][lay.name]
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(w))
            if b is not None:
                m.bias.copy_(torch.from_numpy(b))
        return m

    m = {lay.name: mod(lay) for lay in layers}
    if model in ("mlp", "mlp-sum"):
        return nn.Sequential(m["0"], nn.Tanh(), m["2"])
    if model == "cnn":
        return nn.Sequential(m["0"], nn.Tanh(), m["2"], nn.Tanh(), nn.Flatten(), m["5"])

    class Pool(nn.Module):
        def forward(self, t):
            return t.mean(dim=1)

    return nn.Sequential(m["0"], nn.Tanh(), Pool(), m["3"])


def _every_step(method: str, cfg: dict, summed: bool) -> dict:
    """``cfg`` plus statistics and refresh on every step, and the loss convention (summed or
    batch-mean) for the methods that take one: the same keywords for both adapters."""
    kw = dict(cfg)
    loss_average = None if summed else "batch"
    if method == "singd":
        kw.update(T=1, loss_average=loss_average)
    else:
        kw.update(t_cov=1, t_inv=1)
        if method == "kfac":
            kw["loss_average"] = loss_average
    return kw


def _torch_check(pre_cls: Any, check: str, method: str, cfg: dict, model: str) -> AdapterResult:
    import torch
    from torch import nn

    _, _, _, layers, summed = _MODELS[model]
    data = _data(model)
    net = _torch_model(model, data)
    kw = _every_step(method, cfg, summed)
    pre = pre_cls(net, on_nonfinite=None, **kw)
    modules = dict(net.named_modules())
    xs, gs, handles = {}, {}, []
    for lay in layers:  # the check's own capture, independent of the adapter's hooks
        m = modules[lay.name]
        handles.append(m.register_forward_hook(
            lambda _m, a, _o, n=lay.name: xs.__setitem__(n, a[0].detach().numpy().copy())))
        handles.append(m.register_full_backward_hook(
            lambda _m, _gi, go, n=lay.name: gs.__setitem__(n, go[0].detach().numpy().copy())))
    try:
        x = torch.from_numpy(data["x"]).requires_grad_(True)  # (full backward hooks of the first layer)
        y = torch.from_numpy(data["y"])
        loss = nn.functional.cross_entropy(net(x), y, reduction="sum" if summed else "mean")
        loss.backward()
        gw = {lay.name: modules[lay.name].weight.grad.numpy().copy() for lay in layers}
        gb = {lay.name: modules[lay.name].bias.grad.numpy().copy() for lay in layers if lay.bias}
        pre.step()
        actual = {lay.name: (modules[lay.name].weight.grad.detach().numpy(),
                             modules[lay.name].bias.grad.detach().numpy() if lay.bias else None)
                  for lay in layers}
    finally:
        for h in handles:
            h.remove()
        remove = getattr(pre, "remove_hooks", None)
        if callable(remove):
            remove()
    desired = _expected(method, cfg, model, xs, gs, gw, gb, None if summed else "batch")
    return _compare("torch", check, model, actual, desired, (gw, gb))


def _run_torch(selected: list) -> list[AdapterResult]:
    try:
        import torch  # noqa: F401

        from maccore.testing.against import _import_adapter

        mt = _import_adapter("maccore_torch")
    except ImportError as exc:
        return _skipped("torch", selected, f"{exc} (pip install {_PIP['torch']})")
    classes = {"mac": mt.MACPreconditioner, "kfac": mt.KFACPreconditioner,
               "singd": mt.SINGDPreconditioner}
    return [_guard("torch", check, model,
                   lambda: _torch_check(classes[method], check, method, cfg, model))
            for check, method, cfg, model in selected]


# ---------------------------------------------------------------------------------------------
# JAX (Flax-layout parameters: kernel [d_in, d_out] / HWIO, NHWC inputs)

def _device_array(a: Any) -> Any:
    """A JAX array of the NumPy array ``a`` (a plain transfer: no XLA program is compiled)."""
    import jax
    import numpy as np

    return jax.device_put(np.ascontiguousarray(a))


def _jax_problem(model: str) -> tuple[dict, dict, dict, dict, dict]:
    """``(names, params, grads, activations, output_grads)`` of ``model`` in Flax layout; the
    output gradients are the gradients of zero perturbations added to the layer outputs
    (``jax.vjp``), all under one ``jax.jit`` (one compilation per model)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    _, _, _, layers, summed = _MODELS[model]
    data = _data(model)
    names = {lay.name: f"{'Conv' if lay.kind == 'conv' else 'Dense'}_{lay.name}" for lay in layers}
    params = {}
    for lay in layers:
        w, b = data["params"][lay.name]
        kernel = np.transpose(w, (2, 3, 1, 0)) if lay.kind == "conv" else w.T  # OIHW→HWIO, [d_in, d_out]
        params[names[lay.name]] = {"kernel": _device_array(kernel)} | (
            {"bias": _device_array(b)} if b is not None else {})
    x = data["x"]
    if model == "cnn":
        x = np.transpose(x, (0, 2, 3, 1))  # NHWC
    x, y = _device_array(x), _device_array(data["y"])

    def layer(lay, p, h, pert, acts):
        acts[names[lay.name]] = h
        if lay.kind == "conv":
            pad = ((lay.padding, lay.padding),) * 2
            out = lax.conv_general_dilated(h, p["kernel"], (lay.stride, lay.stride), pad,
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            out = h @ p["kernel"]
        if "bias" in p:
            out = out + p["bias"]
        acts["out:" + names[lay.name]] = out
        return out + pert[names[lay.name]] if pert is not None else out

    def loss_fn(p, pert):
        acts: dict = {}
        h = x
        for i, lay in enumerate(layers):
            if model == "cnn" and lay.kind == "linear":
                h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)  # flatten as torch does
            h = layer(lay, p[names[lay.name]], h, pert, acts)
            if i < len(layers) - 1:
                h = jnp.tanh(h)
                if model == "tokens":
                    h = h.mean(axis=1)
        logp = jax.nn.log_softmax(h, axis=-1)
        nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
        return (nll.sum() if summed else nll.mean()), acts

    # zero perturbations of the layer outputs (shapes without computing): their gradients are the g's
    shapes = jax.eval_shape(lambda p: loss_fn(p, None)[1], params)
    perts = {names[lay.name]: _device_array(np.zeros(shapes["out:" + names[lay.name]].shape))
             for lay in layers}

    @jax.jit
    def run(p, pert):
        _, vjp, acts = jax.vjp(loss_fn, p, pert, has_aux=True)
        grads, gouts = vjp(jnp.ones((), x.dtype))
        return grads, {k: v for k, v in acts.items() if not k.startswith("out:")}, gouts

    grads, acts, gouts = _compile(run, params, perts)(params, perts)
    return names, params, grads, acts, gouts


def _jax_check(mj: Any, check: str, method: str, cfg: dict, model: str, problems: dict) -> AdapterResult:
    import jax
    import numpy as np

    _, _, _, layers, summed = _MODELS[model]
    if model not in problems:
        problems[model] = _jax_problem(model)
    names, params, grads, acts, gouts = problems[model]

    kw = _every_step(method, cfg, summed)
    decl = {names[lay.name]: mj.Conv(padding=lay.padding, stride=lay.stride)
            for lay in layers if lay.kind == "conv"}
    scale_by = {"mac": mj.scale_by_mac, "kfac": mj.scale_by_kfac, "singd": mj.scale_by_singd}[method]
    tx = scale_by(**kw, layers=decl or None, on_nonfinite=None)
    # one XLA compilation per check (eagerly, every op and lax.cond branch would compile)
    step = jax.jit(lambda g, p, a, o: tx.update(g, tx.init(p), p, activations=a, output_grads=o)[0])
    upd = _compile(step, grads, params, acts, gouts)(grads, params, acts, gouts)

    def nchw(a, lay):
        a = np.asarray(a, dtype=np.float64)
        return np.transpose(a, (0, 3, 1, 2)) if lay.kind == "conv" else a

    def oihw(k, lay):
        k = np.asarray(k, dtype=np.float64)
        return np.transpose(k, (3, 2, 0, 1)) if lay.kind == "conv" else k.T

    xs = {lay.name: nchw(acts[names[lay.name]], lay) for lay in layers}
    gs = {lay.name: nchw(gouts[names[lay.name]], lay) for lay in layers}
    gw = {lay.name: oihw(grads[names[lay.name]]["kernel"], lay) for lay in layers}
    gb = {lay.name: np.asarray(grads[names[lay.name]]["bias"]) for lay in layers if lay.bias}
    actual = {lay.name: (oihw(upd[names[lay.name]]["kernel"], lay),
                         np.asarray(upd[names[lay.name]]["bias"]) if lay.bias else None)
              for lay in layers}
    desired = _expected(method, cfg, model, xs, gs, gw, gb, None if summed else "batch")
    return _compare("jax", check, model, actual, desired, (gw, gb))


def _compile(fn: Any, *args: Any) -> Any:
    """``fn`` (a ``jax.jit`` function) compiled for ``args`` with XLA's cheap CPU pipeline: these
    programs run once, on arrays of a few hundred entries, so compilation is the whole cost."""
    lowered = fn.lower(*args)
    try:
        return lowered.compile({"xla_backend_optimization_level": 0,
                                "xla_llvm_disable_expensive_passes": True})
    except Exception:  # noqa: BLE001  (an XLA without these options: the default pipeline)
        return lowered.compile()


def _run_jax(selected: list) -> list[AdapterResult]:
    try:
        import jax
        import optax  # noqa: F401

        from maccore.testing.against import _import_adapter

        mj = _import_adapter("maccore_jax")
    except ImportError as exc:
        return _skipped("jax", selected, f"{exc} (pip install {_PIP['jax']})")
    x64 = getattr(jax, "enable_x64", None)
    if x64 is None:  # older JAX
        from jax.experimental import enable_x64 as x64
    problems: dict = {}  # model → its captured arrays, computed once
    with x64(True):
        return [_guard("jax", check, model,
                       lambda: _jax_check(mj, check, method, cfg, model, problems))
                for check, method, cfg, model in selected]


# ---------------------------------------------------------------------------------------------

def _skipped(framework: str, selected: list, reason: str) -> list[AdapterResult]:
    return [AdapterResult(framework, check, model, "skip", None, _sizes(model), f"skipped: {reason}")
            for check, _, _, model in selected]


def _guard(framework: str, check: str, model: str, fn: Callable[[], AdapterResult]) -> AdapterResult:
    """A check that raises is a failure with the exception as its report."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001  (reported, not swallowed)
        return AdapterResult(framework, check, model, "fail", None, _sizes(model),
                             f"raised {type(exc).__name__}: {exc}")


def check_list() -> list[tuple[str, str, dict, str]]:
    """``(check, method, hyperparameters, model)`` for every row of :data:`CHECKS`."""
    return [(check, method, cfg, model) for check, method, cfg, models in CHECKS for model in models]


def run_adapter_checks(frameworks: Any = None) -> list[AdapterResult]:
    """Run every check on ``frameworks`` (default: :data:`FRAMEWORKS`); a framework that is not
    installed gives ``skip`` results with the reason."""
    frameworks = list(FRAMEWORKS if frameworks is None else frameworks)
    unknown = [f for f in frameworks if f not in FRAMEWORKS]
    if unknown:
        raise ValueError(f"unknown frameworks {unknown}; known: {', '.join(FRAMEWORKS)}")
    selected = check_list()
    out: list[AdapterResult] = []
    for fw in frameworks:
        out.extend(_run_torch(selected) if fw == "torch" else _run_jax(selected))
    return out


def format_adapter_results(results: list[AdapterResult]) -> str:
    """Plain-text table: framework, check, model, result, worst error, problem sizes; failure
    reports and skip reasons indented below their row."""
    wc = max((len(r.check) for r in results), default=5)
    wm = max((len(r.model) for r in results), default=5)
    lines = [f"{'framework':9s} {'check':{wc}s}  {'model':{wm}s}  result  {'error':>8s}  sizes",
             f"{'-' * 9} {'-' * wc}  {'-' * wm}  ------  {'-' * 8}  {'-' * 5}"]
    for r in results:
        err = "" if r.error is None else f"{r.error:.1e}"
        lines.append(f"{r.framework:9s} {r.check:{wc}s}  {r.model:{wm}s}  {r.status.upper():6s}  "
                     f"{err:>8s}  {r.sizes}".rstrip())
        lines.extend("    " + s for s in r.detail.split("\n") if s)
    return "\n".join(lines)
