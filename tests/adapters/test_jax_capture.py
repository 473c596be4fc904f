"""Capture helpers (Flax linen, Flax nnx, Equinox): the captured inputs and output gradients come from the
forward that computes the loss and are consistent with the parameter gradients:
∇W̃ = grad_rowsᵀ · rows for every layer (this pins the NHWC→NCHW conversion, the HWIO/OIHW reshape
order, "SAME" padding at stride 2 and the bias column)."""

from __future__ import annotations

import pytest

from tests.adapters._jax_common import F32, normal, to_np, tree_allclose

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import maccore
import maccore_jax as mj
from maccore_jax.specs import discover


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3), strides=2, padding="SAME", param_dtype=F32)(x))
        x = nn.relu(nn.Conv(4, (2, 3), padding="VALID", kernel_dilation=(1, 2), param_dtype=F32)(x))
        x = nn.Dense(5, param_dtype=F32)(x)  # applied per location: weight sharing over [N, H, W]
        x = jnp.tanh(x).mean(axis=(1, 2))
        return nn.Dense(2, use_bias=False, param_dtype=F32)(x)


def check_identity(grads, acts, gouts, *, layout, layers):
    found, leaves, _ = discover(grads, layout=layout, layers=layers)
    got_a, got_g = mj.specs.lookup(acts, "a"), mj.specs.lookup(gouts, "g")
    assert set(found) == set(got_a) == set(got_g)
    for n, layer in found.items():
        gb = None if layer.bias_index is None else leaves[layer.bias_index]
        mat = to_np(layer.grad_mat(leaves[layer.weight_index], gb))
        x, g = layer.nchw(got_a[n]), layer.nchw(got_g[n])
        spec = layer.core_spec(x)
        rows, grows = to_np(maccore.to_rows(spec, x)), to_np(maccore.to_grad_rows(spec, g))
        np.testing.assert_allclose(mat, grows.T @ rows, rtol=2e-4, atol=2e-5, err_msg=n)


def test_linen_capture_matches_gradients():
    model = LinenNet()
    x, y = normal(0, (3, 9, 14, 2)), normal(1, (3, 2))
    variables = model.init(jax.random.key(0), x)
    specs = mj.linen.layer_specs(model, variables, x)
    assert specs["Conv_0"] == mj.Conv(padding="SAME", stride=2, dilation=1, groups=1)
    assert specs["Conv_1"].dilation == (1, 2) and specs["Dense_0"] == mj.Dense()
    perts = mj.linen.output_zeros(model, variables, x)
    assert jax.tree.map(jnp.shape, perts) == {
        "Conv_0": (3, 5, 7, 3),
        "Conv_1": (3, 4, 3, 4),
        "Dense_0": (3, 4, 3, 5),
        "Dense_1": (3, 2),
    }

    @jax.jit
    def grads(params, perts):
        def loss(p, q):
            out, acts = mj.linen.apply(model, {"params": p}, x, perturbations=q)
            return jnp.sum((out - y) ** 2), (acts, out)

        (_, (acts, out)), g = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, perts)
        return g, acts, out

    (g, gouts), acts, out = grads(variables["params"], perts)
    np.testing.assert_allclose(to_np(out), to_np(model.apply(variables, x)), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(acts["Conv_0"]), np.asarray(x))
    assert jax.tree.structure(gouts) == jax.tree.structure(acts)
    check_identity(g, acts, gouts, layout="flax", layers=specs)


def test_nnx_capture_and_optimizer():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(
                2, 3, (3, 3), strides=2, padding="SAME", rngs=rngs, param_dtype=F32
            )
            self.layers = nnx.List(
                [
                    nnx.Linear(3, 4, rngs=rngs, param_dtype=F32),
                    nnx.Linear(4, 2, use_bias=False, rngs=rngs, param_dtype=F32),
                ]
            )
            self.norm = nnx.LayerNorm(4, rngs=rngs, param_dtype=F32)

        def __call__(self, x):
            x = jax.nn.relu(self.conv(x)).mean(axis=(1, 2))
            return self.layers[1](self.norm(jnp.tanh(self.layers[0](x))))

    model = Net(nnx.Rngs(0))
    x, y = normal(0, (5, 7, 8, 2)), normal(1, (5, 2))
    specs = mj.nnx.layer_specs(model)
    assert set(specs) == {"conv", "layers/0", "layers/1"}
    perts = mj.nnx.output_zeros(model, x)
    assert jax.tree.map(jnp.shape, perts) == {
        "conv": (5, 4, 4, 3),
        "layers": {0: (5, 4), 1: (5, 2)},
    }

    def loss_fn(m, q):
        out, acts = mj.nnx.apply(m, x, perturbations=q)
        return jnp.mean(jnp.sum((out - y) ** 2, -1)), acts

    (_, acts), (g, gouts) = nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(model, perts)
    check_identity(nnx.as_pure(nnx.state(g, nnx.Param)), acts, gouts, layout="flax", layers=specs)
    assert type(model.layers[0]).__call__ is nnx.Linear.__call__  # the class patch is undone

    # nnx.Optimizer forwards activations/output_grads to tx.update; compare with optax directly
    tx = mj.kfac(
        0.05, reduction_factor=1 / 5, layers=specs, t_cov=1, t_inv=1, damping=0.1, weight_decay=0.1
    )
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    ref_u, _ = tx.update(
        nnx.as_pure(nnx.state(g, nnx.Param)),
        tx.init(params),
        params,
        activations=acts,
        output_grads=gouts,
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(m, o, q):
        (loss, a), (gr, go) = nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(m, q)
        o.update(m, gr, activations=a, output_grads=go)
        return loss

    step(model, opt, perts)
    new = nnx.as_pure(nnx.state(model, nnx.Param))
    tree_allclose(new, optax.apply_updates(params, ref_u), rtol=1e-5, atol=1e-6)


def test_equinox_capture_and_layout():
    import equinox as eqx

    class Net(eqx.Module):
        conv: eqx.nn.Conv2d
        layers: list
        emb: eqx.nn.Embedding

        def __init__(self, key):
            k = jax.random.split(key, 4)
            self.conv = eqx.nn.Conv2d(2, 3, 3, stride=2, padding=1, key=k[0])
            self.layers = [
                eqx.nn.Linear(3, 4, key=k[1]),
                eqx.nn.Linear(4, 2, use_bias=False, key=k[2]),
            ]
            self.emb = eqx.nn.Embedding(5, 2, key=k[3])

        def __call__(self, x):
            x = jax.nn.relu(self.conv(x)).mean(axis=(1, 2))
            return self.layers[1](jnp.tanh(self.layers[0](x))) + self.emb.weight[0]

    model = Net(jax.random.key(0))
    model = jax.tree.map(lambda a: a.astype(F32) if eqx.is_inexact_array(a) else a, model)
    x, y = normal(0, (5, 2, 7, 8)), normal(1, (5, 2))
    specs = mj.equinox.layer_specs(model)
    assert specs == {
        "conv": mj.Conv(padding=((1, 1), (1, 1)), stride=(2, 2), dilation=(1, 1), groups=1),
        "layers/0": mj.Dense(),
        "layers/1": mj.Dense(),
        "emb": None,
    }
    perts = mj.equinox.output_zeros(model, x)
    assert jax.tree.map(jnp.shape, perts) == {
        "conv": (5, 3, 4, 4),
        "layers/0": (5, 4),
        "layers/1": (5, 2),
    }
    params, static = eqx.partition(model, eqx.is_array)

    def loss_fn(p, q):
        out, acts = mj.equinox.apply(eqx.combine(p, static), x, perturbations=q)
        return jnp.mean(jnp.sum((out - y) ** 2, -1)), acts

    (_, acts), (g, gouts) = jax.jit(jax.value_and_grad(loss_fn, (0, 1), has_aux=True))(
        params, perts
    )
    np.testing.assert_array_equal(np.asarray(acts["conv"]), np.asarray(x))
    check_identity(g, acts, gouts, layout="equinox", layers=specs)
    tx = mj.mac(0.1, layout="equinox", layers=specs, t_cov=1, t_inv=1)
    u, _ = jax.jit(tx.update)(g, tx.init(params), params, activations=acts)
    assert u.conv.bias.shape == (3, 1, 1) and jnp.all(jnp.isfinite(u.conv.weight))
    with pytest.raises(ValueError, match=r"activations missing for layer\(s\) 'emb'"):
        tx = mj.mac(0.1, layout="equinox", layers={"conv": specs["conv"]})
        tx.update(g, tx.init(params), params, activations=acts)


def test_depthwise_conv_mac():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(6, (3, 3), padding="SAME", feature_group_count=3, param_dtype=F32)(x)
            return nn.Dense(2, param_dtype=F32)(x.mean(axis=(1, 2)))

    model, x = Net(), normal(0, (2, 5, 5, 3))
    variables = model.init(jax.random.key(0), x)
    specs = mj.linen.layer_specs(model, variables, x)
    assert specs["Conv_0"].groups == 3
    _, acts = mj.linen.apply(model, variables, x)
    tx = mj.scale_by_mac(layers=specs, t_cov=1, t_inv=1)
    grads = jax.tree.map(jnp.ones_like, variables["params"])
    u, st = jax.jit(tx.update)(grads, tx.init(variables["params"]), activations=acts)
    assert st.layers["Conv_0"].mean_hat.shape == (10,) and u["Conv_0"]["kernel"].shape == (
        3,
        3,
        1,
        6,
    )
    import maccore

    ref = maccore.conv2d_mean_patch(
        to_np(x).transpose(0, 3, 1, 2), 3, padding=1, bias=True, groups=3
    )
    np.testing.assert_allclose(to_np(st.layers["Conv_0"].mean_hat), ref, rtol=1e-5, atol=1e-6)


def test_capture_errors():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(4, param_dtype=F32)
            return d(d(x))

    x = normal(0, (2, 4))
    v = Twice().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="'Dense_0' was called twice"):
        mj.linen.apply(Twice(), v, x)
    model = LinenNet()
    x = normal(0, (3, 9, 14, 2))
    v = model.init(jax.random.key(0), x)
    perts = mj.linen.output_zeros(model, v, x)
    with pytest.raises(
        ValueError,
        match=r"layer 'Dense_1' outputs \[3, 2\] but its perturbation has shape \[3, 7\]",
    ):
        mj.linen.apply(model, v, x, perturbations={**perts, "Dense_1": jnp.zeros((3, 7), F32)})
    with pytest.raises(ValueError, match="no entry for layer 'Dense_1'"):
        mj.linen.apply(
            model, v, x, perturbations={k: p for k, p in perts.items() if k != "Dense_1"}
        )


def test_unsupported_conv_is_left_to_momentum():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):  # x: [N, L, C]
            x = nn.Conv(3, (3,), padding="SAME", param_dtype=F32)(x)  # 1-D conv: not preconditioned
            return nn.Dense(2, param_dtype=F32)(x.mean(axis=1))

    model, x = Net(), normal(0, (2, 5, 4))
    variables = model.init(jax.random.key(0), x)
    specs = mj.linen.layer_specs(model, variables, x)
    assert specs == {"Conv_0": None, "Dense_0": mj.Dense()}
    _, acts = mj.linen.apply(model, variables, x)
    assert set(acts) == {"Conv_0", "Dense_0"}
    grads = jax.tree.map(jnp.ones_like, variables["params"])
    tx = mj.scale_by_mac(layers=specs, t_cov=1, t_inv=1)
    u, st = jax.jit(tx.update)(grads, tx.init(variables["params"]), activations=acts)
    assert set(st.layers) == {"Dense_0"}
    np.testing.assert_array_equal(np.asarray(u["Conv_0"]["kernel"]), np.ones((3, 4, 3), np.float32))


def test_layer_subclass_calling_super_is_recorded_once():
    class Scaled(nn.Dense):
        def __call__(self, x):
            return 2.0 * super().__call__(x + 1.0)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Scaled(3, param_dtype=F32)(x)

    x = normal(0, (2, 4))
    v = Net().init(jax.random.key(0), x)
    perts = mj.linen.output_zeros(Net(), v, x)

    def loss(p, q):
        out, acts = mj.linen.apply(Net(), {"params": p}, x, perturbations=q)
        return jnp.sum(out**2), (out, acts)

    (_, (out, acts)), (g, gouts) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        v["params"], perts
    )
    np.testing.assert_allclose(to_np(out), to_np(Net().apply(v, x)), rtol=1e-6)
    assert list(acts) == ["Scaled_0"]
    np.testing.assert_allclose(to_np(acts["Scaled_0"]), to_np(x) + 1.0)  # the inner Dense's input
    check_identity(g, acts, gouts, layout="flax", layers={})  # the inner Dense's output gradient
