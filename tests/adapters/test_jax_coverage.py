"""issue #13 (JAX): the coverage contract (``maccore_jax.report``, warnings, ``strict``) and
general dense kernels (linen ``DenseGeneral`` / NNX ``LinearGeneral``) flattened to a matrix."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maccore
import maccore_jax as mj

nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")


class Gen(nnx.Module):
    def __init__(self, r):
        self.a = nnx.LinearGeneral(6, (2, 4), rngs=r)
        self.b = nnx.LinearGeneral((2, 4), 3, axis=(-2, -1), rngs=r)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def test_undeclared_3d_kernel_warns_strict_raises_and_message():
    m = Gen(nnx.Rngs(0))
    params = nnx.state(m, nnx.Param)
    rep = mj.report(params, method="MAC")
    assert "0 preconditioned layers" in rep and "WARNING" in rep and "Dense(in_ndim=...)" in rep
    assert "Conv" not in rep  # the old message wrongly suggested a 4-D Conv
    with pytest.warns(UserWarning, match="look like linear maps"):
        mj.mac(0.1).init(params)
    with pytest.raises(ValueError, match="strict=True"):
        mj.kfac(0.1, strict=True).init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mj.mac(0.1, layers=mj.nnx.layer_specs(m), strict=True).init(params)


def test_report_lists_every_leaf_with_reason():
    params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
              "LayerNorm_0": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
              "Embed_0": {"embedding": jnp.ones((10, 3))},
              "Dense_1": {"kernel": jnp.ones((4, 2))}}
    rep = mj.report(params, skip_layers=["Dense_1"], method="KFAC")
    assert "KFAC: 1 preconditioned layers, 2/6 parameters" in rep
    assert "embedding (a lookup" in rep and "skip_layers" in rep and "(scale/shift)" in rep


def test_broadcast_leaves_are_not_suspicious():
    params = {"cls_token": jnp.zeros((1, 1, 4)), "pos_embedding": jnp.zeros((1, 3, 4)),
              "Dense_0": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}}
    rep = mj.report(params, method="MAC")
    assert "WARNING" not in rep and rep.count("broadcast over the batch") == 2, rep
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mj.mac(0.1, strict=True).init(params)
    with pytest.raises(ValueError, match="strict=True"):  # a real leading dimension: suspicious
        mj.mac(0.1, strict=True).init({**params, "pos_embedding": jnp.zeros((2, 3, 4))})


def _loss(model, perts, x, y):
    out, acts = mj.nnx.apply(model, x, perturbations=perts)
    return jnp.mean((out - y) ** 2), acts


@pytest.mark.parametrize("method", ["mac", "kfac"])
def test_linear_general_update_equals_core(method):
    m = Gen(nnx.Rngs(0))
    specs = mj.nnx.layer_specs(m)
    assert specs == {"a": mj.Dense(in_ndim=1), "b": mj.Dense(in_ndim=2)}
    params = nnx.state(m, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (5, 7, 6))
    y = jax.random.normal(jax.random.key(2), (5, 7, 3))
    perts = mj.nnx.output_zeros(m, x)
    (_, acts), (g, gp) = nnx.value_and_grad(_loss, argnums=(0, 1), has_aux=True)(m, perts, x, y)
    R = 1.0 / (x.shape[0] * x.shape[1] * 3)  # the loss is a mean over every output entry
    kw = {"reduction_factor": R} if method == "kfac" else {}
    scale = {"mac": mj.scale_by_mac, "kfac": mj.scale_by_kfac}[method]
    tx = scale(layers=specs, t_cov=1, t_inv=1, damping=0.5, **kw)
    upd, _ = tx.update(g, tx.init(params), params, activations=acts, output_grads=gp)
    for name, d_in, d_out in (("a", 6, 8), ("b", 8, 3)):
        k, b = g[name]["kernel"][...], g[name]["bias"][...]
        G = maccore.grad_matrix(jnp.reshape(k, (d_in, d_out)).T, b.reshape(-1))
        rows = maccore.linear_rows(jnp.reshape(acts[name], (-1, d_in)), bias=True)
        if method == "mac":
            want = maccore.mac_apply(G, maccore.mean_activation(rows), 0.5)
        else:
            gr = maccore.grad_rows(jnp.reshape(gp[name], (-1, d_out)))
            A = maccore.input_factor(rows)
            Gf = maccore.gradient_factor(gr, reduction_factor=R)
            want = maccore.kfac_apply(G, A, Gf, 0.5)
        got = maccore.grad_matrix(jnp.reshape(upd[name]["kernel"][...], (d_in, d_out)).T,
                                  upd[name]["bias"][...].reshape(-1))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=1e-6)


def test_linen_dense_general_captured_and_declared():
    class M(linen.Module):
        @linen.compact
        def __call__(self, x):
            h = linen.DenseGeneral((2, 4))(x)
            return linen.DenseGeneral(3, axis=(-2, -1))(jnp.tanh(h))

    model = M()
    x = jnp.ones((2, 5, 6))
    v = model.init(jax.random.key(0), x)
    specs = mj.linen.layer_specs(model, v, x)
    assert specs == {"DenseGeneral_0": mj.Dense(in_ndim=1), "DenseGeneral_1": mj.Dense(in_ndim=2)}
    _, acts = mj.linen.apply(model, v, x)
    assert acts["DenseGeneral_1"].shape == (2, 5, 2, 4)
    tx = mj.mac(0.1, layers=specs)
    st = tx.init(v["params"])
    g = jax.tree.map(jnp.ones_like, v["params"])
    upd, _ = tx.update(g, st, v["params"], activations=acts)
    assert jax.tree.map(jnp.shape, upd) == jax.tree.map(jnp.shape, v["params"])
