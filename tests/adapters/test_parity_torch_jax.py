"""Cross-framework parity: the same MLP / CNN, weights copied, the same 20 batches, trained with
``maccore_torch`` and ``maccore_jax`` must follow the same trajectory (MAC reference scale with
decoupled weight decay, and exact KFAC). Runs once both adapters are importable."""

from __future__ import annotations

import pytest

from tests.adapters._jax_common import CNN, F32, MLP, to_np

torch = pytest.importorskip("torch")
maccore_torch = pytest.importorskip("maccore_torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from torch import nn  # noqa: E402

import maccore_jax as mj  # noqa: E402

STEPS, N = 20, 8


class TorchMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(torch.tanh(self.l0(x)))))


class TorchCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(2, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.c1(torch.relu(self.c0(x))))
        return self.fc(x.mean(dim=(2, 3)))


PAIRS = {  # torch module name -> flax params path
    "mlp": {"l0": "Dense_0", "l1": "Dense_1", "l2": "Dense_2"},
    "cnn": {"c0": "Conv_0", "c1": "Conv_1", "fc": "Dense_0"},
}


def flax_params(tmodel, pairs, dtype=F32):
    out = {}
    for tname, fname in pairs.items():
        mod = getattr(tmodel, tname)
        w = mod.weight.detach().numpy()
        kernel = (
            w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0)
        )  # [out, in] → [in, out]; OIHW → HWIO
        out[fname] = {"kernel": jnp.asarray(kernel, dtype)}
        if mod.bias is not None:
            out[fname]["bias"] = jnp.asarray(mod.bias.detach().numpy(), dtype)
    return out


def data(kind):
    rng = np.random.default_rng(7)
    shape = (N, 4) if kind == "mlp" else (N, 2, 6, 6)  # torch layout (NCHW)
    return [
        (
            rng.standard_normal(shape).astype(np.float32) + 0.3,
            rng.standard_normal((N, 3)).astype(np.float32),
        )
        for _ in range(STEPS)
    ]


def loss_torch(out, y):
    return ((out - y) ** 2).sum(-1).mean()


def loss_jax(out, y):
    return jnp.mean(jnp.sum((out - y) ** 2, -1))


R = 2.0 / N  # loss = (1/N) Σ ‖f − y‖² = R · Σ ½‖f − y‖²

CASES = {
    "mac": dict(
        common=dict(momentum=0.9, stat_decay=0.9, damping=0.5, weight_decay=0.05, t_cov=2, t_inv=3),
        torch=dict(lr=0.05, weight_decay_mode="decoupled", scale="reference"),
        jax=dict(learning_rate=0.05, scale="reference"),
    ),
    "mac_nesterov": dict(
        common=dict(
            momentum=0.8,
            stat_decay=0.95,
            damping=1.0,
            weight_decay=0.01,
            t_cov=1,
            t_inv=4,
            nesterov=True,
        ),
        torch=dict(lr=0.05, weight_decay_mode="decoupled"),
        jax=dict(learning_rate=0.05),
    ),
    "kfac": dict(
        common=dict(
            momentum=0.5,
            stat_decay=0.9,
            damping=0.3,
            weight_decay=0.01,
            t_cov=1,
            t_inv=2,
            kfac_approx="expand",
            damping_mode="tikhonov",
            reduction_factor=R,
        ),
        torch=dict(lr=0.02, weight_decay_mode="decoupled"),
        jax=dict(learning_rate=0.02),
    ),
    "kfac_reduce_pi": dict(
        common=dict(
            momentum=0.5,
            stat_decay=0.9,
            damping=0.3,
            t_cov=2,
            t_inv=2,
            kfac_approx="reduce",
            damping_mode="pi",
            reduction_factor=R,
        ),
        torch=dict(lr=0.02, weight_decay_mode="decoupled"),
        jax=dict(learning_rate=0.02),
    ),
}


def train_torch(kind, case, tmodel):
    cfg = CASES[case]
    cls = maccore_torch.KFAC if case.startswith("kfac") else maccore_torch.MAC
    opt = cls(tmodel, **cfg["common"], **cfg["torch"])
    for x, y in data(kind):
        opt.zero_grad()
        loss_torch(tmodel(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    return tmodel


def jax_model_layers(kind, params):
    """The flax model of ``kind`` and its layer declarations (found from one forward)."""
    model = MLP() if kind == "mlp" else CNN()
    x0 = data(kind)[0][0] if kind == "mlp" else data(kind)[0][0].transpose(0, 2, 3, 1)
    return model, mj.linen.layer_specs(model, {"params": params}, jnp.asarray(x0))


def jax_stepper(kind, model, tx, *, output_grads):
    """``run(params, state, batches) -> (params, state)``: one jitted step of the optax transform
    ``tx`` per batch of ``kind``; ``output_grads``: also pass the layers' output gradients (KFAC,
    SINGD)."""

    @jax.jit
    def step(p, s, x, y):
        perts = mj.linen.output_zeros(model, {"params": p}, x) if output_grads else None

        def loss(p, q):
            out, acts = mj.linen.apply(model, {"params": p}, x, perturbations=q)
            return loss_jax(out, y), acts

        (_, acts), (g, go) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, perts)
        u, s = tx.update(g, s, p, activations=acts, output_grads=go)
        return optax.apply_updates(p, u), s

    def run(p, s, batches):
        for x, y in batches:
            x = x.transpose(0, 2, 3, 1) if kind == "cnn" else x  # NCHW → NHWC
            p, s = step(p, s, jnp.asarray(x), jnp.asarray(y))
        return p, s

    return run


def run_jax(kind, model, tx, params, *, output_grads):
    """Train ``params`` with ``tx`` from its initial state on every batch of ``data(kind)``."""
    run = jax_stepper(kind, model, tx, output_grads=output_grads)
    return run(params, tx.init(params), data(kind))[0]


def assert_same_trajectory(start, final_torch, final_jax, *, rtol=2e-4, atol=2e-5):
    """Both frameworks moved the weights, and to the same place (float32: rtol 2e-4)."""
    moved = max(
        float(np.max(np.abs(to_np(a) - to_np(b))))
        for a, b in zip(jax.tree.leaves(final_torch), jax.tree.leaves(start))
    )
    assert moved > 1e-3, "training did not move the weights"
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(final_jax)[0], jax.tree.leaves(final_torch)
    ):
        np.testing.assert_allclose(
            to_np(a), to_np(b), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


def train_jax(kind, case, params):
    cfg = CASES[case]
    is_kfac = case.startswith("kfac")
    model, layers = jax_model_layers(kind, params)
    tx = (mj.kfac if is_kfac else mj.mac)(**cfg["common"], **cfg["jax"], layers=layers)
    return run_jax(kind, model, tx, params, output_grads=is_kfac)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_and_jax_trajectories_agree(kind, case):
    torch.manual_seed(0)
    tmodel = TorchMLP() if kind == "mlp" else TorchCNN()
    start = flax_params(tmodel, PAIRS[kind])
    final_jax = train_jax(kind, case, start)
    final_torch = flax_params(train_torch(kind, case, tmodel), PAIRS[kind])
    assert_same_trajectory(start, final_torch, final_jax)
