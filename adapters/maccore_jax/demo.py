"""JAX half of ``python -m maccore demo`` (``--backend jax``).

The same experiment as the torch demo (data, hyper-parameters and reporting from
:mod:`maccore.cli.demo`): an MLP and a CNN on scikit-learn's digits and a tiny transformer (fused
qkv dense layer declared as attention) on a generated sorting task, trained with ``optax.sgd``,
``optax.adamw`` and the optax transformations ``maccore_jax.mac``, ``kfac`` and ``singd``, over
several seeds. :func:`compare` runs the same comparison (methods × seeds, table, plot,
``run.json``) on a Flax linen model and batches of your own.

The models are plain functions over Flax-layout parameter dicts (a layer is ``{"kernel": [d_in,
d_out] or HWIO, "bias": [d_out]}``, NHWC images). Their forward pass returns the layer inputs
(``activations``) and adds a zero array to every layer output, whose gradient is that layer's
output gradient (``output_grads``, what KFAC needs). Each training step is one ``jax.jit``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maccore.cli import demo as _demo
from maccore.cli.demo import DemoConfig, RunResult, Unavailable

__all__ = ["init_model", "forward", "build_optimizer", "make_transform", "state_bytes", "train_one",
           "run", "compare"]

Params = dict[str, Any]


# ------------------------------------------------------------------------------------------------
# Models: init and a forward pass that records layer inputs and takes output perturbations
# ------------------------------------------------------------------------------------------------


def _dense_init(key, d_in: int, d_out: int) -> Params:
    k1, k2 = jax.random.split(key)
    bound = 1.0 / math.sqrt(d_in)  # torch.nn.Linear's default init
    return {"kernel": jax.random.uniform(k1, (d_in, d_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k2, (d_out,), jnp.float32, -bound, bound)}


def _conv_init(key, k: int, c_in: int, c_out: int) -> Params:
    k1, k2 = jax.random.split(key)
    bound = 1.0 / math.sqrt(c_in * k * k)
    return {"kernel": jax.random.uniform(k1, (k, k, c_in, c_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k2, (c_out,), jnp.float32, -bound, bound)}


def _ln_init(d: int) -> Params:
    return {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}


def init_model(name: str, data: dict[str, Any], cfg: DemoConfig, key) -> tuple[Params, dict[str, Any]]:
    """Parameters (Flax layout) and static model info of ``name``."""
    keys = iter(jax.random.split(key, 32))
    c = data["classes"]
    if name == "mlp":
        return {"fc1": _dense_init(next(keys), 64, 128), "fc2": _dense_init(next(keys), 128, 64),
                "fc3": _dense_init(next(keys), 64, c)}, {}
    if name == "cnn":
        return {"conv1": _conv_init(next(keys), 3, 1, 16), "conv2": _conv_init(next(keys), 3, 16, 32),
                "fc": _dense_init(next(keys), 32 * 4 * 4, c)}, {}
    size = cfg.transformer_size()
    d, h, r = size["d_model"], size["heads"], size["mlp_ratio"]
    p: Params = {"tok": {"embedding": jax.random.normal(next(keys), (data["vocab"], d))},  # as nn.Embedding
                 "pos": 0.02 * jax.random.normal(next(keys), (data["length"], d))}
    for i in range(size["layers"]):
        p[f"block{i}"] = {"ln1": _ln_init(d), "qkv": _dense_init(next(keys), d, 3 * d),
                          "proj": _dense_init(next(keys), d, d), "ln2": _ln_init(d),
                          "fc1": _dense_init(next(keys), d, r * d), "fc2": _dense_init(next(keys), r * d, d)}
    p["ln_f"] = _ln_init(d)
    p["head"] = _dense_init(next(keys), d, data["vocab"])
    return p, {"heads": h, "layers": size["layers"]}


class _Tape:
    """Records each layer's input and adds its zero perturbation to the output."""

    def __init__(self, perturb: dict[str, Any] | None) -> None:
        self.perturb = perturb
        self.acts: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}

    def __call__(self, name: str, x, y):
        self.acts[name] = x
        self.outputs[name] = y
        return y if self.perturb is None else y + self.perturb[name]


def _dense(tape: _Tape, name: str, p: Params, x):
    return tape(name, x, x @ p["kernel"] + p["bias"])


def _conv(tape: _Tape, name: str, p: Params, x):
    y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return tape(name, x, y + p["bias"])


def _layer_norm(p: Params, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def forward(name: str, info: dict[str, Any], params: Params, x, perturb=None):
    """Logits and the layer inputs ``{layer path: input}`` (paths as in the params tree)."""
    tape = _Tape(perturb)
    if name == "mlp":
        h = x.reshape(x.shape[0], -1)
        h = jax.nn.relu(_dense(tape, "fc1", params["fc1"], h))
        h = jax.nn.relu(_dense(tape, "fc2", params["fc2"], h))
        return _dense(tape, "fc3", params["fc3"], h), tape
    if name == "cnn":
        h = jax.nn.relu(_conv(tape, "conv1", params["conv1"], x))
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        h = jax.nn.relu(_conv(tape, "conv2", params["conv2"], h))
        return _dense(tape, "fc", params["fc"], h.reshape(h.shape[0], -1)), tape
    heads = info["heads"]
    h = params["tok"]["embedding"][x] + params["pos"]
    b, n, d = h.shape
    for i in range(info["layers"]):
        p = params[f"block{i}"]
        a = _layer_norm(p["ln1"], h)
        qkv = _dense(tape, f"block{i}/qkv", p["qkv"], a)
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
        att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / math.sqrt(d // heads), axis=-1)
        ctx = (att @ v).swapaxes(1, 2).reshape(b, n, d)
        h = h + _dense(tape, f"block{i}/proj", p["proj"], ctx)
        m = jax.nn.gelu(_dense(tape, f"block{i}/fc1", p["fc1"], _layer_norm(p["ln2"], h)),
                        approximate=False)
        h = h + _dense(tape, f"block{i}/fc2", p["fc2"], m)
    return _dense(tape, "head", params["head"], _layer_norm(params["ln_f"], h)), tape


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = v
    return out


# ------------------------------------------------------------------------------------------------
# Optimizers
# ------------------------------------------------------------------------------------------------


def _adapter(name: str) -> Any:
    try:
        import maccore_jax
    except Exception as exc:  # pragma: no cover - depends on the install
        raise Unavailable(f"maccore_jax cannot be imported ({type(exc).__name__}: {exc})") from exc
    try:
        return getattr(maccore_jax, name)
    except AttributeError:
        raise Unavailable(f"maccore_jax.{name} is not implemented yet") from None


def make_transform(method: str, hparams: dict[str, Any], *, layers: Any = None, attention: Any = None,
                   reduction_factor: float | None = None):
    """``(optax transform, needs, settings, note)`` for ``method`` with ``hparams``
    (``maccore_torch`` names: ``lr`` is the learning rate). ``needs`` ⊆ {"acts", "output_grads"}
    says what ``update`` receives; ``settings``: every argument of the transform with its default
    filled in (for ``run.json``); ``note``: hyper-parameters the transform does not accept.
    ``layers`` (``{name: Dense()/Conv(...)}``) goes to MAC, KFAC and SINGD, ``attention`` to MAC,
    ``reduction_factor`` (when given, else ``loss_average``) to KFAC and SINGD."""
    hp = dict(hparams)
    lr = hp.pop("lr")
    if method == "sgd":
        wd, mom, nesterov = hp.pop("weight_decay", 0.0), hp.pop("momentum", 0.0), hp.pop("nesterov", False)
        tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=mom, nesterov=nesterov))
        settings = {"weight_decay (coupled, optax.add_decayed_weights)": wd,
                    **_demo.effective_settings(optax.sgd, {"learning_rate": lr, "momentum": mom,
                                                           "nesterov": nesterov})}
        return tx, set(), settings, f"ignored: {', '.join(sorted(hp))}" if hp else ""
    if method == "adamw":
        kw, ignored = _demo.accepted_kwargs(optax.adamw, hp)
        return (optax.adamw(lr, **kw), set(),
                _demo.effective_settings(optax.adamw, {"learning_rate": lr, **kw}),
                f"ignored: {', '.join(ignored)}" if ignored else "")
    if method not in ("mac", "kfac", "singd"):
        raise ValueError(f"unknown method {method!r}; choose from {list(_demo.METHODS)}")
    fn = _adapter(method)
    if layers:
        hp.setdefault("layers", layers)
    if method == "mac" and attention:
        hp.setdefault("attention", attention)
    if method != "mac" and reduction_factor is not None:
        hp.setdefault("reduction_factor", reduction_factor)
    kw, ignored = _demo.accepted_kwargs(fn, hp)
    needs = {"acts"} if method == "mac" else {"acts", "output_grads"}
    return (fn(lr, **kw), needs, _demo.effective_settings(fn, {"learning_rate": lr, **kw}),
            f"ignored: {', '.join(ignored)}" if ignored else "")


def build_optimizer(method: str, model_name: str, info: dict[str, Any], reduction_factor: float):
    """``(optax transform, needs, note)`` with the demo's hyper-parameters for ``model_name``."""
    tx, needs, _, note = _demo_transform(method, model_name, info, reduction_factor)
    return tx, needs, note


def _demo_transform(method: str, model_name: str, info: dict[str, Any], reduction_factor: float):
    layers, attention = None, None
    if method in ("mac", "kfac", "singd"):
        if model_name == "cnn":
            Conv = _adapter("Conv")
            layers = {"conv1": Conv(padding="SAME"), "conv2": Conv(padding="SAME")}
        if model_name == "transformer" and method == "mac":
            QKV = _adapter("QKV")
            attention = {f"block{i}/qkv": QKV(num_heads=info["heads"]) for i in range(info["layers"])}
    return make_transform(method, _demo.HPARAMS[model_name][method], layers=layers,
                          attention=attention, reduction_factor=reduction_factor)


def state_bytes(state: Any) -> int:
    """Bytes of every array in an optax state (including maccore's per-layer states)."""
    return int(sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state)))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def _xent(logits, y):
    """Softmax cross-entropy with integer labels, averaged over every position."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.reshape(-1, logits.shape[-1]),
                                                           y.reshape(-1)).mean()


def _to_input(model_name: str, x: np.ndarray) -> np.ndarray:
    return x if model_name == "transformer" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # NHWC


def _loop(step, params, opt_state, batches: Iterable[Any], *, total: int | None, desc: str,
          progress: bool):
    """Run the jitted ``step`` over ``(x, y)`` batches; returns ``(params, opt_state, curve)``."""
    curve = _demo.Curve(every=max(1, (total or 0) // 200))
    for i, (xb, yb) in enumerate(_demo.progress(batches, total=total, desc=desc, enabled=progress)):
        xb, yb = jnp.asarray(xb), jnp.asarray(yb)
        curve.start()
        params, opt_state, loss = step(params, opt_state, xb, yb)
        value = float(loss)  # waits for the step
        curve.stop()
        curve.record(i, value)
    return params, opt_state, curve


#: Compiled demo train steps per (model, method, sizes): the seeds reuse them (same shapes).
_STEPS: dict[tuple, Any] = {}


def train_one(model_name: str, method: str, data: dict[str, Any], cfg: DemoConfig,
              seed: int | None = None) -> RunResult:
    """Train one demo model with one method and one seed; never raises (failures become a
    ``failed`` row)."""
    seed = cfg.seed if seed is None else seed
    res = RunResult("jax", model_name, method, "ok", seed=seed)
    params, info = init_model(model_name, data, cfg, jax.random.PRNGKey(seed))
    x_tr = _to_input(model_name, data["x_train"])
    y_tr = data["y_train"]
    x_te = _to_input(model_name, data["x_test"])
    terms = _demo.BATCH_SIZE * (y_tr.shape[1] if y_tr.ndim > 1 else 1)
    key = (model_name, method, cfg.quick, tuple(sorted(info.items())), x_tr.shape[1:])
    try:
        tx, needs, res.settings, note = _demo_transform(method, model_name, info, 1.0 / terms)
        clip = _demo.CLIP_NORM.get(model_name)
        if clip:  # raw gradients, before any preconditioning (as the torch demo)
            tx = optax.chain(optax.clip_by_global_norm(clip), tx)
            res.settings = {"clip_by_global_norm": clip, **res.settings}
    except Unavailable as exc:
        res.status, res.reason = "unavailable", str(exc)
        return res
    except Exception as exc:
        return res.fail(exc)

    def loss_fn(p, perturb, xb, yb):
        logits, tape = forward(model_name, info, p, xb, perturb)
        return _xent(logits, yb), tape.acts

    def step(p, opt_state, xb, yb):
        if "output_grads" in needs:
            shapes = jax.eval_shape(lambda q, x: forward(model_name, info, q, x)[1].outputs, p, xb)
            zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
            (loss, acts), (grads, gouts) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
                p, zeros, xb, yb)
        else:
            (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, None, xb, yb)
            gouts = None
        kw: dict[str, Any] = {}
        if "acts" in needs:
            kw["activations"] = _nest(acts)
        if "output_grads" in needs:
            kw["output_grads"] = _nest(gouts)
        updates, opt_state = tx.update(grads, opt_state, p, **kw)
        return optax.apply_updates(p, updates), opt_state, loss

    idx = _demo.batch_indices(x_tr.shape[0], _demo.BATCH_SIZE, cfg.epochs_for(model_name), seed)
    try:
        res.initial_train_loss, _ = _evaluate(model_name, info, params, x_tr, y_tr)
        opt_state = tx.init(params)
        if key not in _STEPS:
            t0 = time.perf_counter()
            xb0, yb0 = jnp.asarray(x_tr[idx[0]]), jnp.asarray(y_tr[idx[0]])
            _STEPS[key] = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, xb0,
                                                                     yb0).compile()
            res.compile_s = time.perf_counter() - t0
        params, opt_state, curve = _loop(
            _STEPS[key], params, opt_state, ((x_tr[i], y_tr[i]) for i in idx), total=len(idx),
            desc=f"jax   {model_name:>11s} {method:>5s} seed {seed}", progress=cfg.progress)
    except Exception as exc:
        return res.fail(exc)
    res.final_train_loss, _ = _evaluate(model_name, info, params, x_tr, y_tr)
    res.test_loss, res.test_accuracy = _evaluate(model_name, info, params, x_te, data["y_test"])
    res.take_curve(curve)
    res.state_bytes = state_bytes(opt_state)
    res.steps = len(idx)
    res.reason = note
    return res


_METRICS: dict[tuple, Any] = {}


def _evaluate(model_name, info, params, x, y) -> tuple[float, float]:
    key = (model_name, tuple(sorted(info.items())))
    if key not in _METRICS:

        def metrics(p, xb, yb):
            logits, _ = forward(model_name, info, p, xb)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            return losses.sum(), (logits.argmax(-1) == yb).sum()

        _METRICS[key] = jax.jit(metrics)
    loss, correct = _METRICS[key](params, jnp.asarray(x), jnp.asarray(y))
    return float(loss) / y.size, float(correct) / y.size


def _environment(**extra: Any) -> dict[str, Any]:
    dev = jax.devices()[0]
    threads = {"os.cpu_count": os.cpu_count(), "jax.device_count": jax.device_count()}
    return _demo.environment(("jax", "jaxlib", "optax", "flax"), threads,
                             device=f"{dev.platform} ({getattr(dev, 'device_kind', '')})", **extra)


def run(cfg: DemoConfig, *, log: Callable[[str], None] = print) -> list[RunResult]:
    """Run every requested (model, method) pair for every seed, print the table and the seed
    spread, write the plot, results and ``run.json``; return every run. Each (model, method)
    compiles its train step once; the seeds reuse it (compile time in the note column, never in
    the wall-clock)."""
    log(f"maccore demo (jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"seeds {cfg.seed_list()}{', quick' if cfg.quick else ''})")
    return _demo.run_pairs(cfg, train_one, log, _environment())


# ------------------------------------------------------------------------------------------------
# The user's own model
# ------------------------------------------------------------------------------------------------


def compare(
    model: Any,
    train_batches: Iterable[Any],
    test_batches: Iterable[Any] | None = None,
    *,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    methods: Sequence[str] = _demo.METHODS,
    seeds: int | Sequence[int] = 3,
    epochs: int = 1,
    hparams: dict[str, dict[str, Any]] | None = None,
    attention: dict[str, Any] | None = None,
    clip_norm: float | None = None,
    name: str = "model",
    out: str | Path = _demo.DEFAULT_OUT,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> _demo.Comparison:
    """Compare SGD, AdamW, MAC, KFAC and SINGD on your Flax linen model and data: every method ×
    every seed, the demo's table (mean ± std and min–max over the seeds), the seed-spread text,
    the loss plot and ``run.json``, written to a fresh subfolder of ``out``.

    The layer inputs (MAC, KFAC, SINGD) and output gradients (KFAC, SINGD) are captured with
    :mod:`maccore_jax.linen` (every ``nn.Dense`` / ``nn.Conv`` called once per forward), the layer
    geometry with ``maccore_jax.linen.layer_specs``. Each method's train step is one ``jax.jit``
    (compile time reported in the note column, not in the wall-clock).

    Args:
        model: a ``flax.linen.Module`` whose only variables are ``"params"`` (no batch statistics
            or dropout RNG); initialised with ``model.init(jax.random.PRNGKey(seed), x)`` on the
            first training batch, so every method starts a seed from the same weights.
        train_batches: ``(x, y)`` array pairs, iterated once per epoch (a list, or any re-iterable:
            shuffle it yourself). Batches of one shape compile once.
        test_batches: optional held-out batches for the test loss and accuracy.
        loss_fn: ``loss_fn(outputs, y) -> scalar``, averaged over the batch (default: softmax
            cross-entropy with integer labels over the last axis, per token for ``[B, S, C]``).
            KFAC and SINGD assume a mean over samples (``loss_average="batch"``); for a mean over
            tokens too, pass ``hparams={"kfac": {"loss_average": "batch+sequence"}, ...}``.
        methods: subset of ``("sgd", "adamw", "mac", "kfac", "singd")``.
        seeds: how many seeds (``0, 1, ...``) or the seeds themselves.
        epochs: passes over ``train_batches`` per run.
        hparams: ``{method: {name: value}}`` updating the defaults, the demo's digits settings
            (``maccore.cli.demo.HPARAMS["mlp"]``; ``maccore_torch`` names, ``lr`` is the learning
            rate). Tune ``lr`` for your problem.
        attention: ``{layer path, e.g. "Block_0/Dense_0": maccore_jax.QKV(num_heads=h)}`` for
            MAC's attention-aware preconditioning of fused qkv layers.
        clip_norm: clip the raw gradients to this global norm before every update (all methods).
        name, out, force, progress, log: as :func:`maccore_torch.demo.compare` (the run writes
            to ``out/<date>-<time>-jax-<name>/``).

    Returns:
        a :class:`maccore.cli.demo.Comparison` (``results``, ``table``, ``spread``, ``out``,
        ``files``). A method that raises becomes a ``failed`` row; the comparison goes on.
    """
    import maccore_jax

    linen = maccore_jax.linen
    methods = _demo.check_methods(methods)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or any(s < 0 for s in seed_list):
        raise ValueError(f"seeds: need at least one seed, all >= 0; got {seeds!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    hp = _demo.custom_hparams(methods, hparams)
    loss_fn = loss_fn or _xent
    try:
        x0, _ = next(iter(train_batches))
    except StopIteration:
        raise ValueError("train_batches is empty") from None
    x0 = jnp.asarray(x0)
    try:
        n_batches: int | None = len(train_batches)  # type: ignore[arg-type]
    except TypeError:
        n_batches = None
    total = n_batches * epochs if n_batches is not None else None

    def init(seed: int):
        variables = model.init(jax.random.PRNGKey(seed), x0)
        extra = sorted(k for k in variables if k != "params")
        if extra:
            raise ValueError(f"compare: only models whose variables are 'params' are supported; "
                             f"this one also has {extra}")
        return variables

    variables0 = init(seed_list[0])
    layers = linen.layer_specs(model, variables0, x0)

    @jax.jit
    def metrics(p, xb, yb):
        out = model.apply({"params": p}, xb)
        n = yb.size
        loss = loss_fn(out, yb) * n
        if jnp.issubdtype(yb.dtype, jnp.integer) and out.shape[:-1] == yb.shape:
            correct = (out.argmax(-1) == yb).sum()
        else:
            correct = jnp.asarray(-1)
        return loss, correct, n

    def evaluate(params, batches) -> tuple[float, float]:
        loss_sum, correct, count, classify = 0.0, 0, 0, True
        for xb, yb in batches:
            loss, c, n = metrics(params, jnp.asarray(xb), jnp.asarray(yb))
            loss_sum += float(loss)
            classify = classify and int(c) >= 0
            correct += int(c)
            count += int(n)
        if count == 0:
            return math.nan, math.nan
        return loss_sum / count, (correct / count if classify else math.nan)

    built: dict[str, Any] = {}  # per method: transform, needs, settings, note, compiled steps

    def build(method: str) -> dict[str, Any]:
        if method in built:
            return built[method]
        tx, needs, settings, note = make_transform(method, hp[method], layers=layers,
                                                   attention=attention)
        if clip_norm:
            tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
            settings = {"clip_by_global_norm": clip_norm, **settings}

        def loss_of(p, perts, xb, yb):
            out, acts = linen.apply(model, {"params": p}, xb, perturbations=perts)
            return loss_fn(out, yb), acts

        def step(p, opt_state, xb, yb):
            kw: dict[str, Any] = {}
            if "output_grads" in needs:
                perts = linen.output_zeros(model, {"params": p}, xb)
                (loss, acts), (grads, gouts) = jax.value_and_grad(loss_of, (0, 1), has_aux=True)(
                    p, perts, xb, yb)
                kw["output_grads"] = gouts
            else:
                (loss, acts), grads = jax.value_and_grad(loss_of, has_aux=True)(p, None, xb, yb)
            if "acts" in needs:
                kw["activations"] = acts
            updates, opt_state = tx.update(grads, opt_state, p, **kw)
            return optax.apply_updates(p, updates), opt_state, loss

        built[method] = {"tx": tx, "settings": settings, "note": note,
                         "step": jax.jit(step, donate_argnums=(0, 1)), "compiled": None}
        return built[method]

    def train(method: str, seed: int) -> RunResult:
        res = RunResult("jax", name, method, "ok", seed=seed)
        try:
            b = build(method)
        except Unavailable as exc:
            res.status, res.reason = "unavailable", str(exc)
            return res
        except Exception as exc:
            return res.fail(exc)
        res.settings, tx = b["settings"], b["tx"]
        try:
            params = init(seed)["params"]
            res.initial_train_loss, _ = evaluate(params, train_batches)
            opt_state = tx.init(params)
            xb0, yb0 = (jnp.asarray(a) for a in next(iter(train_batches)))
            if b["compiled"] is None:  # compiled once per method; the seeds reuse it
                t0 = time.perf_counter()
                b["compiled"] = b["step"].lower(params, opt_state, xb0, yb0).compile()
                b["shapes"] = (xb0.shape, yb0.shape)
                res.compile_s = time.perf_counter() - t0

            def any_step(p, s, xb, yb):  # a batch of another shape (e.g. the last one) retraces
                if (xb.shape, yb.shape) == b["shapes"]:
                    return b["compiled"](p, s, xb, yb)
                return b["step"](p, s, xb, yb)

            params, opt_state, curve = _loop(
                any_step, params, opt_state, (bt for _ in range(epochs) for bt in train_batches),
                total=total, desc=f"jax {name} {method:>5s} seed {seed}", progress=progress)
            res.final_train_loss, _ = evaluate(params, train_batches)
            if test_batches is not None:
                res.test_loss, res.test_accuracy = evaluate(params, test_batches)
        except Exception as exc:
            return res.fail(exc)
        res.take_curve(curve)
        res.state_bytes = state_bytes(opt_state)
        res.steps = total if total is not None else len(curve.steps)
        res.reason = b["note"]
        return res

    n_params = int(sum(np.size(leaf) for leaf in jax.tree.leaves(variables0["params"])))
    config = {
        "name": name,
        "model": repr(model)[:4000],
        "parameters": n_params,
        "layers": {k: repr(v) for k, v in layers.items()},
        "loss_fn": getattr(loss_fn, "__qualname__", repr(loss_fn)),
        "methods": methods,
        "seeds": seed_list,
        "epochs": epochs,
        "train_batches_per_epoch": n_batches,
        "input_shape": list(x0.shape),
        "hparams": hp,
        "hparams_overrides": hparams or {},
        "attention": attention,
        "clip_norm": clip_norm,
        "out": str(out),
        "force": force,
    }
    log(f"maccore compare (jax {jax.__version__} on {jax.devices()[0].platform}, {name}: "
        f"methods {methods}, seeds {seed_list}, {epochs} epochs)")
    return _demo.run_custom("jax", name, methods, seed_list, train, out=out, force=force,
                            config=config, env=_environment(), log=log)
