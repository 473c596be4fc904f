"""Cross-framework parity of SINGD: the same MLP / CNN, weights copied, the same 20 batches, trained
with ``maccore_torch.SINGD`` and ``maccore_jax.singd`` must end with the same parameters (float32)."""

from __future__ import annotations

import pytest

from tests.adapters.test_parity_torch_jax import (
    PAIRS,
    TorchCNN,
    TorchMLP,
    assert_same_trajectory,
    data,
    flax_params,
    jax_model_layers,
    loss_torch,
    run_jax,
)

torch = pytest.importorskip("torch")
maccore_torch = pytest.importorskip("maccore_torch")


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
    model, layers = jax_model_layers(kind, params)
    tx = jax_singd(cfg.pop("lr"), **cfg, layers=layers)
    return run_jax(kind, model, tx, params, output_grads=True)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("case", list(CASES))
def test_singd_torch_and_jax_trajectories_agree(kind, case):
    torch.manual_seed(0)
    tmodel = TorchMLP() if kind == "mlp" else TorchCNN()
    start = flax_params(tmodel, PAIRS[kind])
    final_jax = train_jax(kind, CASES[case], start)
    final_torch = flax_params(train_torch(kind, CASES[case], tmodel), PAIRS[kind])
    assert_same_trajectory(start, final_torch, final_jax)
