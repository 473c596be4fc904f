"""Cross-framework parity of SINGD: the same MLP / CNN, weights copied, the same 20 batches, trained
with ``maccore_torch.SINGD`` and ``maccore_jax.singd`` must end with the same parameters (float32)."""

from __future__ import annotations

import pytest

from tests.adapters._jax_common import CNN, MLP, to_np
from tests.adapters.test_parity_torch_jax import (
    PAIRS,
    TorchCNN,
    TorchMLP,
    data,
    flax_params,
    loss_jax,
    loss_torch,
)

torch = pytest.importorskip("torch")
maccore_torch = pytest.importorskip("maccore_torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import maccore_jax as mj  # noqa: E402
from maccore_jax.singd import singd as jax_singd  # noqa: E402
from maccore_torch.singd import SINGD  # noqa: E402

CASES = {  # torch and jax get the same keyword arguments (lr ↔ learning_rate)
    "ingd_dense_T2_schedule": dict(
        lr=0.05, momentum=0.9, damping=0.05, alpha1=0.5, weight_decay=0.01, T=2,
        lr_cov=lambda t: 0.1 / (1.0 + 0.1 * t),
    ),
    "ikfac_diag_toeplitz": dict(
        lr=0.05, momentum=0.5, damping=0.1, alpha1=0.0, kfac_like=True, weight_decay=0.0, T=1,
        lr_cov=0.05, structures=("diagonal", "triltoeplitz"),
    ),
    "normalized_reduce_T3": dict(
        lr=0.03, momentum=0.8, damping=0.01, alpha1=0.3, weight_decay=0.02, T=3, lr_cov=0.2,
        normalize_lr_cov=True, kfac_approx="reduce", structures=("block4diagonal", "dense"),
    ),
}


def train_torch(kind, cfg, tmodel):
    opt = SINGD(tmodel, **cfg)
    for x, y in data(kind):
        opt.zero_grad()
        loss_torch(tmodel(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    return tmodel


def train_jax(kind, cfg, params):
    cfg = dict(cfg)
    model = MLP() if kind == "mlp" else CNN()
    x0 = data(kind)[0][0] if kind == "mlp" else data(kind)[0][0].transpose(0, 2, 3, 1)
    layers = mj.linen.layer_specs(model, {"params": params}, jnp.asarray(x0))
    tx = jax_singd(cfg.pop("lr"), **cfg, layers=layers)

    @jax.jit
    def step(p, s, x, y):
        perts = mj.linen.output_zeros(model, {"params": p}, x)

        def loss(p, q):
            out, acts = mj.linen.apply(model, {"params": p}, x, perturbations=q)
            return loss_jax(out, y), acts

        (_, acts), (g, go) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, perts)
        u, s = tx.update(g, s, p, activations=acts, output_grads=go)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for x, y in data(kind):
        x = x if kind == "mlp" else x.transpose(0, 2, 3, 1)  # NCHW → NHWC
        params, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
    return params


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("case", list(CASES))
def test_singd_torch_and_jax_trajectories_agree(kind, case):
    torch.manual_seed(0)
    tmodel = TorchMLP() if kind == "mlp" else TorchCNN()
    start = flax_params(tmodel, PAIRS[kind])
    final_jax = train_jax(kind, CASES[case], start)
    final_torch = flax_params(train_torch(kind, CASES[case], tmodel), PAIRS[kind])
    moved = max(
        float(np.max(np.abs(to_np(a) - to_np(b))))
        for a, b in zip(jax.tree.leaves(final_torch), jax.tree.leaves(start))
    )
    assert moved > 1e-3, "training did not move the weights"
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(final_jax)[0], jax.tree.leaves(final_torch)
    ):
        np.testing.assert_allclose(
            to_np(a), to_np(b), rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path)
        )
