"""JAX half of ``python -m maccore demo`` (``--backend jax``).

The same experiment as the torch demo (data, hyper-parameters and reporting from
:mod:`maccore.cli.demo`): an MLP and a CNN on scikit-learn's digits and a tiny transformer (fused
qkv dense layer declared as attention) on a generated sorting task, trained with ``optax.sgd``,
``optax.adamw`` and the optax transformations ``maccore_jax.mac``, ``kfac`` and ``singd``.

The models are plain functions over Flax-layout parameter dicts (a layer is ``{"kernel": [d_in,
d_out] or HWIO, "bias": [d_out]}``, NHWC images). Their forward pass returns the layer inputs
(``activations``) and adds a zero array to every layer output, whose gradient is that layer's
output gradient (``output_grads``, what KFAC needs). Each training step is one ``jax.jit``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maccore.cli import demo as _demo
from maccore.cli.demo import DemoConfig, RunResult, Unavailable

__all__ = ["init_model", "forward", "build_optimizer", "state_bytes", "run"]

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


def build_optimizer(method: str, model_name: str, info: dict[str, Any], reduction_factor: float):
    """``(optax transform, needs, note)``: ``needs`` ⊆ {"acts", "output_grads", "params"} says what
    ``update`` receives; ``note`` lists hyper-parameters the transform does not accept."""
    hp = dict(_demo.HPARAMS[model_name][method])
    lr, wd = hp.pop("lr"), hp.pop("weight_decay", 0.0)
    if method == "sgd":
        tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=hp["momentum"]))
        return tx, set(), ""
    if method == "adamw":
        return optax.adamw(lr, weight_decay=wd), set(), ""
    conv = {}
    if model_name == "cnn":
        Conv = _adapter("Conv")
        conv = {"conv1": Conv(padding="SAME"), "conv2": Conv(padding="SAME")}
    attention = {}
    if model_name == "transformer":
        QKV = _adapter("QKV")
        attention = {f"block{i}/qkv": QKV(num_heads=info["heads"]) for i in range(info["layers"])}
    if method == "mac":
        mac = _adapter("mac")
        tx = mac(lr, momentum=hp["momentum"], stat_decay=hp["stat_decay"], damping=hp["damping"],
                 weight_decay=wd, t_cov=hp["t_cov"], t_inv=hp["t_inv"], layers=conv or None,
                 attention=attention or None)
        return tx, {"acts", "params"}, ""
    if method == "kfac":
        kfac = _adapter("kfac")
        tx = kfac(lr, reduction_factor=reduction_factor, momentum=hp["momentum"],
                  stat_decay=hp["stat_decay"], damping=hp["damping"], weight_decay=wd,
                  t_cov=hp["t_cov"], t_inv=hp["t_inv"], layers=conv or None)
        return tx, {"acts", "output_grads"}, ""
    if method == "singd":
        singd = _adapter("singd")
        kw, ignored = _demo.accepted_kwargs(singd, {
            **hp, "weight_decay": wd, "layers": conv or None, "reduction_factor": reduction_factor})
        note = f"ignored: {', '.join(ignored)}" if ignored else ""
        return singd(lr, **kw), {"acts", "output_grads"}, note
    raise ValueError(method)


def state_bytes(state: Any) -> int:
    """Bytes of every array in an optax state (including maccore's per-layer states)."""
    return int(sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state)))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits.reshape(-1, logits.shape[-1]),
                                                           y.reshape(-1)).mean()


def _to_input(model_name: str, x: np.ndarray) -> np.ndarray:
    return x if model_name == "transformer" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # NHWC


def train_one(model_name: str, method: str, data: dict[str, Any], cfg: DemoConfig) -> RunResult:
    """Train one model with one method; never raises (failures become a ``failed`` row)."""
    res = RunResult("jax", model_name, method, "ok")
    params, info = init_model(model_name, data, cfg, jax.random.PRNGKey(cfg.seed))
    x_tr = _to_input(model_name, data["x_train"])
    y_tr = data["y_train"]
    terms = _demo.BATCH_SIZE * (y_tr.shape[1] if y_tr.ndim > 1 else 1)
    try:
        tx, needs, note = build_optimizer(method, model_name, info, 1.0 / terms)
        clip = _demo.CLIP_NORM.get(model_name)
        if clip:  # raw gradients, before any preconditioning (as the torch demo)
            tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    except Unavailable as exc:
        res.status, res.reason = "unavailable", str(exc)
        return res
    except Exception as exc:
        return res.fail(exc, show_traceback=False)

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

    epochs = cfg.epochs_for(model_name)
    batches = _demo.batch_indices(x_tr.shape[0], _demo.BATCH_SIZE, epochs, cfg.seed)
    curve = _demo.Curve(every=max(1, len(batches) // 200))
    desc = f"jax   {model_name:>11s} {method:>5s}"
    try:
        opt_state = tx.init(params)
        t0 = time.perf_counter()
        xb0, yb0 = jnp.asarray(x_tr[batches[0]]), jnp.asarray(y_tr[batches[0]])
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, xb0, yb0).compile()
        compile_s = time.perf_counter() - t0
        for i, idx in enumerate(_demo.progress(batches, total=len(batches), desc=desc,
                                               enabled=cfg.progress)):
            xb, yb = jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx])
            curve.start()
            params, opt_state, loss = compiled(params, opt_state, xb, yb)
            value = float(loss)  # waits for the step
            curve.stop()
            curve.record(i, value)
    except Exception as exc:
        return res.fail(exc, show_traceback=cfg.progress)
    res.final_train_loss, _ = _evaluate(model_name, info, params, x_tr, y_tr)
    _, res.test_accuracy = _evaluate(model_name, info, params, _to_input(model_name, data["x_test"]),
                                     data["y_test"])
    res.take_curve(curve)
    res.state_bytes = state_bytes(opt_state)
    res.steps = len(batches)
    res.reason = f"compile {compile_s:.1f}s (not in wall-clock)" + (f"; {note}" if note else "")
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


def run(cfg: DemoConfig, *, log: Callable[[str], None] = print) -> list[RunResult]:
    """Run every requested (model, method) pair, print the table, write the plot; return the rows."""
    log(f"maccore demo (jax {jax.__version__} on {jax.devices()[0].platform}, seed {cfg.seed}"
        f"{', quick' if cfg.quick else ''})")
    return _demo.run_pairs(cfg, train_one, log)
