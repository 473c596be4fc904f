"""Cross-framework parity of the features both adapters take from the core engine: SMAC
(``diagonal=True``), the first-layer true inverse, coupled and decoupled weight decay, KFAC's
``loss_average`` (``"batch"``; ``"batch+sequence"`` on a token model) and per-head attention on a
fused qkv layer. The same model (weights copied), data and hyper-parameters, trained for 10 steps
with ``maccore_torch`` and ``maccore_jax`` (statistics and refreshes several times), end at the
same parameters: float64 to 1e-10 relative, float32 to 1e-4. Each case also has a negative
control: a deliberately different JAX setting (the other weight-decay mode, no SMAC diagonal, ...)
must NOT match, so the comparison can tell the settings apart."""

from __future__ import annotations

import math

import pytest

from tests.adapters._jax_common import F32, to_np
from tests.adapters.test_parity_torch_jax import (
    PAIRS,
    TorchCNN,
    TorchMLP,
    assert_same_trajectory,
    data,
    flax_params,
    jax_model_layers,
    jax_stepper,
    loss_torch,
)

torch = pytest.importorskip("torch")
maccore_torch = pytest.importorskip("maccore_torch")

import flax.linen as fnn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from torch import nn  # noqa: E402

import maccore  # noqa: E402
import maccore_jax as mj  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 10
B, S, D, HEADS = 4, 5, 4, 2  # token model: batch, sequence, width, heads
TOL = {"float64": dict(rtol=1e-10, atol=1e-10), "float32": dict(rtol=1e-4, atol=1e-5)}
MAC = dict(lr=0.05, momentum=0.9, stat_decay=0.9, damping=0.5, weight_decay=0.05, t_cov=2,
           t_inv=3, weight_decay_mode="decoupled")
KFAC = dict(lr=0.02, momentum=0.5, stat_decay=0.9, damping=0.3, weight_decay=0.01, t_cov=1,
            t_inv=2, weight_decay_mode="decoupled")


# ---- a token model with a fused qkv projection (layout (3, H, d_h)) in both frameworks ------
class TorchTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, 3)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // HEADS), dim=-1)
        return self.out(torch.tanh((att @ v).transpose(1, 2).reshape(b, n, D)))


class Tokens(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        b, n, _ = x.shape
        h = fnn.Dense(3 * D, name="qkv", param_dtype=F32)(x).reshape(b, n, 3, HEADS, D // HEADS)
        q, k, v = jnp.transpose(h, (2, 0, 3, 1, 4))
        att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / math.sqrt(D // HEADS), axis=-1)
        ctx = jnp.swapaxes(att @ v, 1, 2).reshape(b, n, D)
        return fnn.Dense(3, name="out", param_dtype=F32)(jnp.tanh(ctx))


TORCH_MODELS = {"mlp": TorchMLP, "cnn": TorchCNN, "tokens": TorchTokens}
TOKEN_PAIRS = {"qkv": "qkv", "out": "out"}


def batches(kind):
    if kind != "tokens":
        return data(kind)[:STEPS]
    rng = np.random.default_rng(11)
    return [(rng.standard_normal((B, S, D)).astype(np.float32) + 0.2,
             rng.standard_normal((B, S, 3)).astype(np.float32)) for _ in range(STEPS)]


def model_layers(kind, params):
    if kind != "tokens":
        return jax_model_layers(kind, params)
    model = Tokens()
    return model, mj.linen.layer_specs(model, {"params": params}, jnp.zeros((B, S, D), F32))


# ---- the cases: the same keywords for both frameworks (lr ↔ learning_rate), and a negative control
QKV = maccore.QkvSpec(num_heads=HEADS, mode="per_head")
CASES = {  # name: (model kinds, method, keyword arguments, negative control: JAX keywords changed)
    "smac": (("mlp", "cnn"), "mac", dict(MAC, diagonal=True), dict(diagonal=False)),
    "first_layer": (("mlp", "cnn"), "mac", MAC, dict(fit=False)),
    "coupled_nesterov": (("mlp",), "mac", dict(MAC, nesterov=True, weight_decay_mode="coupled"),
                         dict(weight_decay_mode="decoupled")),
    "decoupled": (("mlp",), "mac", MAC, dict(weight_decay_mode="coupled")),
    "kfac_coupled_batch": (("mlp", "cnn"), "kfac",
                           dict(KFAC, loss_average="batch", weight_decay_mode="coupled"),
                           dict(loss_average=None)),
    "kfac_batch_sequence": (("tokens",), "kfac", dict(KFAC, loss_average="batch+sequence"),
                            dict(loss_average="batch")),
    "attention_per_head": (("tokens",), "mac", dict(MAC, attention={"qkv": QKV}),
                           dict(attention={"qkv": maccore.QkvSpec(num_heads=HEADS)})),
}
PARAMS = [pytest.param(case, kind, dtype, id=f"{case}-{kind}-{dtype}")
          for case, spec in CASES.items() for kind in spec[0] for dtype in ("float64", "float32")]
FIT = 3  # batches the first-layer inverse is fitted on


def torch_run(case, kind, dtype, tmodel):
    _, method, kw, _ = CASES[case]
    tdt = getattr(torch, dtype)
    tmodel.to(tdt)
    opt = getattr(maccore_torch, method.upper())(tmodel, **kw)
    data_ = batches(kind)
    if case == "first_layer":
        opt.fit_first_layer([(torch.from_numpy(x).to(tdt), None) for x, _ in data_[:FIT]])
    for x, y in data_:
        opt.zero_grad()
        loss_torch(tmodel(torch.from_numpy(x).to(tdt)), torch.from_numpy(y).to(tdt)).backward()
        opt.step()
    pairs = TOKEN_PAIRS if kind == "tokens" else PAIRS[kind]
    with jax.enable_x64(dtype == "float64"):
        final = flax_params(tmodel, pairs, getattr(jnp, dtype))
        return jax.tree.map(lambda a: np.array(to_np(a)), final)


def jax_run(case, kind, dtype, start, **override):
    _, factory, kw, _ = CASES[case]
    kw = {**kw, **override}
    fit = kw.pop("fit", case == "first_layer")
    kw["learning_rate"] = kw.pop("lr")
    ndt = getattr(np, dtype)
    params = jax.tree.map(lambda a: jnp.asarray(a.astype(ndt)), start)
    model, layers = model_layers(kind, params)
    tx = getattr(mj, factory)(**kw, layers=layers)
    state = tx.init(params)
    data_ = [(x.astype(ndt), y.astype(ndt)) for x, y in batches(kind)]
    if fit:
        first = [x.transpose(0, 2, 3, 1) if kind == "cnn" else x for x, _ in data_[:FIT]]
        state = mj.fit_first_layer(state, [jnp.asarray(x) for x in first], damping=kw["damping"],
                                   params=params, layers=layers)
    needs_g = factory == "kfac" or kw.get("diagonal", False)
    final, _ = jax_stepper(kind, model, tx, output_grads=needs_g)(params, state, data_)
    return jax.tree.map(lambda a: np.array(to_np(a)), final)


def _rel_diff(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(np.max(np.abs(x - y))) / max(1e-300, float(np.max(np.abs(y))))
               for x, y in zip(la, lb))


@pytest.mark.parametrize("case,kind,dtype", PARAMS)
def test_feature_trajectories_agree(case, kind, dtype):
    torch.manual_seed(0)
    tmodel = TORCH_MODELS[kind]()
    pairs = TOKEN_PAIRS if kind == "tokens" else PAIRS[kind]
    start = jax.tree.map(lambda a: np.array(to_np(a)), flax_params(tmodel, pairs))  # a copy
    with jax.enable_x64(dtype == "float64"):
        final_jax = jax_run(case, kind, dtype, start)
        negative = None
        if dtype == "float64":
            negative = jax_run(case, kind, dtype, start, **CASES[case][3])
    final_torch = torch_run(case, kind, dtype, tmodel)
    assert_same_trajectory(start, final_torch, final_jax, **TOL[dtype])
    if negative is not None:  # the comparison can tell this setting from a different one
        assert _rel_diff(negative, final_torch) > 1e-6, f"{case}: the negative control matches"
