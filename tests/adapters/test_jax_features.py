"""maccore_jax over the core engine: ``skip_layers``, SMAC's output gradients, the first-layer
inverse (:func:`maccore_jax.fit_first_layer`, kept by portable checkpoints), ``weight_decay_mode``,
``optax.inject_hyperparams`` and the keyword lists. (Trajectories against ``maccore_torch``:
``test_parity_features.py``.)"""

from __future__ import annotations

import inspect

import pytest

from tests.adapters._jax_common import to_np, tree_allclose
from tests.adapters.test_jax_transform import LAYERS, NPX, ref_layers, step_data, sub, tree_params

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import maccore  # noqa: E402
import maccore_jax as mj  # noqa: E402


def _updates(tx, steps=2, *, gouts=False):
    state = tx.init(tree_params())
    outs = []
    for t in range(steps):
        grads, acts, go = step_data(t)
        kw = {"output_grads": go} if gouts else {}
        u, state = jax.jit(tx.update)(grads, state, tree_params(), activations=acts, **kw)
        outs.append(u)
    return outs, state


def test_skip_layers_is_layers_none():
    a, sa = _updates(mj.scale_by_mac(t_cov=1, t_inv=1, layers={**LAYERS, "head": None}))
    b, sb = _updates(mj.scale_by_mac(t_cov=1, t_inv=1, layers=LAYERS, skip_layers=["head"]))
    tree_allclose(a, b, rtol=0, atol=0)
    tree_allclose(sa, sb, rtol=0, atol=0)
    assert "head" not in sb.layers
    np.testing.assert_array_equal(np.asarray(b[0]["head"]["kernel"]),
                                  np.asarray(step_data(0)[0]["head"]["kernel"]))
    with pytest.raises(ValueError, match=r"unknown layers \['nope'\]"):
        mj.scale_by_mac(layers=LAYERS, skip_layers=["nope"]).init(tree_params())
    with pytest.raises(TypeError, match="skip_layers must be a list of layer names"):
        mj.scale_by_mac(layers=LAYERS, skip_layers="head")


def test_smac_needs_output_grads_and_keeps_plain_mac_on_qkv_layers():
    tx = mj.scale_by_mac(diagonal=True, t_cov=1, t_inv=1, layers=LAYERS)
    grads, acts, gouts = step_data(0)
    with pytest.raises(ValueError, match="needs output_grads="):
        tx.update(grads, tx.init(tree_params()), activations=acts)
    outs, state = _updates(tx, gouts=True)
    ref = maccore.mac(stat_decay=0.95, damping=1.0, diagonal=True)
    for n, (rows, grows, to_mat, from_mat) in ref_layers(*step_data(0)[1:]).items():
        d_t, d_out = rows.shape[1], grows.shape[1]
        st = ref.refresh(ref.update(ref.init(d_t, d_out, xp=NPX, dtype=np.float64), rows, grows))
        want = from_mat(ref.apply(st, to_mat(sub(grads, n))))
        got = sub(outs[0], n)
        for k in want:
            np.testing.assert_allclose(to_np(got[k]), want[k], rtol=2e-5, atol=2e-5, err_msg=n)
        assert state.layers[n].diag is not None
    params = {"qkv": {"kernel": jnp.ones((4, 12)), "bias": jnp.zeros(12)}}
    st = mj.scale_by_mac(diagonal=True, attention={"qkv": mj.QKV(num_heads=2)}).init(params)
    assert st.layers["qkv"].diag is None and st.layers["qkv"].mean.value.shape == (3, 5)


def _fit_reference(xs_nhwc, damping):
    a = [maccore.conv2d_rows(to_np(x).transpose(0, 3, 1, 2), kernel_size=(3, 3), stride=2,
                             padding=((1, 0), (0, 1)), bias=True) for x in xs_nhwc]
    moment = sum(r.T @ r / r.shape[0] for r in a) / len(a)
    return np.linalg.inv(moment + damping * np.eye(moment.shape[0]))


def test_fit_first_layer_is_the_damped_inverse_in_the_state(tmp_path):
    tx = mj.mac(0.1, damping=0.7, t_cov=1, t_inv=1, layers=LAYERS)
    params = tree_params()
    acts = [step_data(t)[1] for t in range(3)]
    state = mj.fit_first_layer(tx.init(params), [a["conv"] for a in acts], damping=0.7,
                               layer="conv", params=params, layers=LAYERS)
    inv = _fit_reference([a["conv"] for a in acts], 0.7)
    np.testing.assert_allclose(to_np(state[0].layers["conv"].first_inv), inv, rtol=1e-4, atol=1e-5)
    # activation trees (as the capture helpers return them) give the same; the default params
    # tree is the momentum trace
    again = mj.fit_first_layer(tx.init(params), acts, damping=0.7, layer="conv", layers=LAYERS)
    tree_allclose(again, state, rtol=0, atol=0)
    # apply multiplies by the fixed inverse; the layer's running mean is no longer collected
    pre = mj.scale_by_mac(damping=0.7, t_cov=1, t_inv=1, layers=LAYERS)
    s = mj.fit_first_layer(pre.init(params), acts, damping=0.7, layer="conv", layers=LAYERS,
                           params=params)
    grads, a0, _ = step_data(0)
    u, s = jax.jit(pre.update)(grads, s, activations=a0)
    _, _, to_mat, from_mat = ref_layers(a0, None)["conv"]
    want = from_mat(to_mat(grads["conv"]) @ inv)
    for k in want:
        np.testing.assert_allclose(to_np(u["conv"][k]), want[k], rtol=1e-4, atol=1e-4)
    assert int(s.layers["conv"].mean.count) == 0 and int(s.layers["head"].mean.count) == 1
    # portable checkpoints keep it (as maccore_torch's extra ``first_inv``)
    mj.save_portable(tmp_path / "f.npz", state, layers=LAYERS)
    back = mj.load_portable(tmp_path / "f.npz", tx.init(params), layers=LAYERS)
    np.testing.assert_array_equal(np.asarray(back[0].layers["conv"].first_inv),
                                  np.asarray(state[0].layers["conv"].first_inv))


def test_fit_first_layer_errors():
    params = tree_params()
    acts = [step_data(0)[1]]
    state = mj.mac(0.1, layers=LAYERS).init(params)
    with pytest.raises(ValueError, match=r"no dense/conv layer named 'nope'"):
        mj.fit_first_layer(state, acts, damping=1.0, layer="nope", layers=LAYERS)
    with pytest.raises(ValueError, match="'batches' is empty"):
        mj.fit_first_layer(state, [], damping=1.0, layers=LAYERS)
    with pytest.raises(ValueError, match=r"layer 'head': batches of shape \[4, 7\]"):
        mj.fit_first_layer(state, [jnp.ones((4, 7))], damping=1.0, layer="head", layers=LAYERS)
    kstate = mj.kfac(0.1, layers=LAYERS).init(params)
    with pytest.raises(TypeError, match="first-layer inverse is a MAC feature"):
        mj.fit_first_layer(kstate, acts, damping=1.0, layers=LAYERS)
    with pytest.raises(ValueError, match="exactly one maccore_jax curvature state"):
        mj.fit_first_layer(optax.sgd(0.1).init(params), acts, damping=1.0)
    with pytest.raises(ValueError, match="damping"):
        mj.fit_first_layer(state, acts, damping=-1.0, layers=LAYERS)


def test_weight_decay_mode_coupled_is_added_before_momentum():
    lr, mu, wd = 0.3, 0.8, 0.05
    pre = mj.scale_by_mac(t_cov=2, t_inv=3, layers=LAYERS)
    tx = mj.mac(lr, momentum=mu, weight_decay=wd, t_cov=2, t_inv=3, layers=LAYERS,
                weight_decay_mode="coupled")
    sp, so = pre.init(tree_params()), tx.init(tree_params())
    p = tree_params()
    b = jax.tree.map(jnp.zeros_like, p)
    for t in range(3):
        grads, acts, _ = step_data(t)
        g, sp = jax.jit(pre.update)(grads, sp, activations=acts)
        b = jax.tree.map(lambda b_, g_, p_: mu * b_ + g_ + wd * p_, b, g, p)
        expected = jax.tree.map(lambda p_, b_: p_ - lr * b_, p, b)
        u, so = jax.jit(tx.update)(grads, so, p, activations=acts)
        p = optax.apply_updates(p, u)
        tree_allclose(p, expected, rtol=1e-5, atol=1e-6)
    for make in (mj.mac, mj.kfac, mj.singd):
        with pytest.raises(ValueError, match="weight_decay_mode must be one of"):
            make(0.1, weight_decay_mode="l2")


def test_inject_hyperparams():
    params = {"d": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    g = jax.tree.map(jnp.ones_like, params)
    acts = {"d": jnp.ones((4, 3))}
    # no static_args needed (every numeric hyper-parameter injected: tests/adapters/
    # test_jax_optax_wrappers.py checks schedules of them); the old static_args still work
    full = optax.inject_hyperparams(mj.mac)(learning_rate=0.1, weight_decay=0.01)
    assert set(full.init(params).hyperparams) == {"learning_rate", "momentum", "weight_decay",
                                                  "damping", "stat_decay", "t_cov", "t_inv"}
    tx = optax.inject_hyperparams(mj.mac, static_args=("stat_decay", "t_cov", "t_inv"))(
        learning_rate=0.1, weight_decay=0.01)
    state = tx.init(params)
    assert set(state.hyperparams) == {"learning_rate", "momentum", "weight_decay", "damping"}
    u_full, _ = jax.jit(full.update)(g, full.init(params), params, activations=acts)
    u, state = jax.jit(tx.update)(g, state, params, activations=acts)
    ref, _ = mj.mac(0.1, weight_decay=0.01).update(g, mj.mac(0.1, weight_decay=0.01).init(params),
                                                   params, activations=acts)
    tree_allclose(u, ref, rtol=1e-6, atol=1e-7)
    tree_allclose(u_full, ref, rtol=1e-6, atol=1e-7)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    u, _ = jax.jit(tx.update)(g, state, params, activations=acts)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u))


def test_keyword_lists_match_maccore_torch():
    """Every optimizer takes the torch keywords of its method (lr ↔ learning_rate)."""
    names = {
        mj.mac: {"momentum", "stat_decay", "damping", "weight_decay", "t_cov", "t_inv", "nesterov",
                 "weight_decay_mode", "scale", "attention", "diagonal", "skip_layers",
                 "on_nonfinite"},
        mj.kfac: {"momentum", "stat_decay", "damping", "weight_decay", "t_cov", "t_inv",
                  "nesterov", "weight_decay_mode", "kfac_approx", "damping_mode", "loss_average",
                  "reduction_factor", "skip_layers", "on_nonfinite"},
        mj.singd: {"momentum", "damping", "alpha1", "weight_decay", "T", "loss_average", "lr_cov",
                   "structures", "kfac_approx", "kfac_like", "preconditioner_dtype",
                   "normalize_lr_cov", "reduction_factor", "skip_layers", "on_nonfinite"},
    }
    for fn, want in names.items():
        params = inspect.signature(fn).parameters
        assert want <= set(params), (fn.__name__, sorted(want - set(params)))
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert inspect.signature(mj.kfac).parameters["loss_average"].default == "batch"
    assert inspect.signature(mj.mac).parameters["weight_decay_mode"].default == "decoupled"
    assert inspect.signature(mj.singd).parameters["weight_decay_mode"].default == "coupled"
    with pytest.raises(TypeError, match="mac: got an unexpected keyword argument 'lr'"):
        mj.mac(0.1, lr=0.1)
    with pytest.raises(TypeError, match="scale_by_kfac: got an unexpected keyword argument"):
        mj.scale_by_kfac(T=3)
    with pytest.warns(DeprecationWarning, match="maccore.CurvatureMethod"):
        assert mj.Method is maccore.CurvatureMethod
    with pytest.raises(TypeError, match="maccore.CurvatureMethod"):
        mj.scale_by_curvature(object())
