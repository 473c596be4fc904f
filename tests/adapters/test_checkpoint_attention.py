"""Portable checkpoints of attention layers cross frameworks: a fused qkv layer keeps ONE
``maccore.MacState`` (``[3, d̃]`` factors, ``[3H, d̃]`` per head) in both adapters, so a run
started in torch, continued in JAX and finished in torch follows the all-torch trajectory."""

from __future__ import annotations

import pytest

from tests.adapters._jax_common import to_np
from tests.adapters.test_parity_features import (
    HEADS,
    MAC,
    TOKEN_PAIRS,
    TorchTokens,
    batches,
    model_layers,
)
from tests.adapters.test_parity_torch_jax import flax_params, jax_stepper, loss_torch

torch = pytest.importorskip("torch")
maccore_torch = pytest.importorskip("maccore_torch")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import maccore  # noqa: E402
import maccore_jax as mj  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPLIT = 3  # steps per leg: torch, then JAX, then torch again


def _torch_steps(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        loss_torch(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()


def _to_torch(model, params):
    with torch.no_grad():
        for tname, fname in TOKEN_PAIRS.items():
            mod = getattr(model, tname)
            mod.weight.copy_(torch.from_numpy(np.asarray(to_np(params[fname]["kernel"])).T.copy()))
            mod.bias.copy_(torch.from_numpy(np.asarray(to_np(params[fname]["bias"])).copy()))


@pytest.mark.parametrize("mode", ["reference", "per_head"])
def test_attention_checkpoint_torch_jax_torch(mode, tmp_path):
    qkv = maccore.QkvSpec(num_heads=HEADS, mode=mode)
    kw = dict(MAC, attention={"qkv": qkv})
    data = batches("tokens")[: 3 * SPLIT]
    torch.manual_seed(0)
    ref = TorchTokens()
    model = TorchTokens()
    model.load_state_dict(ref.state_dict())
    ref_opt = maccore_torch.MAC(ref, **kw)
    _torch_steps(ref, ref_opt, data)  # the reference: torch all the way

    opt = maccore_torch.MAC(model, **kw)
    _torch_steps(model, opt, data[:SPLIT])
    p1 = tmp_path / "torch.npz"
    maccore_torch.save_portable(opt, p1)
    assert tuple(opt.preconditioner.states()["qkv"].mean.value.shape) == (
        (3 * HEADS, 5) if mode == "per_head" else (3, 5))

    params = flax_params(model, TOKEN_PAIRS)
    jmodel, layers = model_layers("tokens", params)
    jkw = {k: v for k, v in kw.items() if k != "lr"}
    tx = mj.mac(kw["lr"], **jkw, layers=layers)
    state = mj.load_portable(p1, tx.init(params), layers=layers)
    assert int(state[0].count) == SPLIT
    params, state = jax_stepper("tokens", jmodel, tx, output_grads=False)(params, state, data[SPLIT:2 * SPLIT])
    p2 = tmp_path / "jax.npz"
    mj.save_portable(p2, state, layers=layers)

    model2 = TorchTokens()
    _to_torch(model2, params)
    opt2 = maccore_torch.MAC(model2, **kw)
    maccore_torch.load_portable(opt2, p2)
    assert opt2.t == 2 * SPLIT
    _torch_steps(model2, opt2, data[2 * SPLIT:])

    final, want = flax_params(model2, TOKEN_PAIRS), flax_params(ref, TOKEN_PAIRS)
    moved = max(float(np.max(np.abs(to_np(a) - to_np(b))))
                for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(flax_params(model, TOKEN_PAIRS))))
    assert moved > 1e-4  # the last leg moved the parameters
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(final)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(to_np(a)), np.asarray(to_np(b)), rtol=2e-4, atol=2e-5,
                                   err_msg=jax.tree_util.keystr(path))
