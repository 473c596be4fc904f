"""maccore_jax transformations: adapter == core (NumPy reference loop), jit == eager, optimizer
semantics, checkpointing, and clear errors on bad input."""

from __future__ import annotations

import pickle

import pytest

from tests.adapters._jax_common import F32, MLP, normal, to_np, tree_allclose

import array_api_compat
import jax
import jax.numpy as jnp
import numpy as np
import optax

import maccore
import maccore_jax as mj

NPX = array_api_compat.array_namespace(np.empty(0))
N = 4
CONV = dict(kernel_size=(3, 3), stride=2, padding=((1, 0), (0, 1)))
LAYERS = {"conv": mj.Conv(stride=2, padding=((1, 0), (0, 1)))}


def tree_params():
    return {
        "conv": {"kernel": normal(0, (3, 3, 2, 4)), "bias": normal(1, (4,))},
        "block": {"dense": {"kernel": normal(2, (4, 5)), "bias": normal(3, (5,))}},
        "head": {"kernel": normal(4, (5, 3))},
        "norm": {"scale": normal(5, (5,)), "bias": normal(6, (5,))},
    }


def step_data(t):
    """Gradients, layer inputs (NHWC / [N, S, d]) and layer output gradients of step t."""
    s = 100 * (t + 1)
    grads = jax.tree.map(lambda p: normal(s + p.size, p.shape), tree_params())
    acts = {
        "conv": normal(s + 1, (N, 7, 6, 2)) + 0.5,
        "block": {"dense": normal(s + 2, (N, 3, 4)) + 1.0},
        "head": jax.nn.relu(normal(s + 3, (N, 5))),
    }
    gouts = {
        "conv": normal(s + 4, (N, 3, 3, 4), 0.1),
        "block": {"dense": normal(s + 5, (N, 3, 5), 0.1)},
        "head": normal(s + 6, (N, 3), 0.1),
    }
    return grads, acts, gouts


# ---- the reference: the core on NumPy float64, layout conversions written out by hand ----------------
def ref_layers(acts, gouts, reduce=False):
    """name -> (rows, grad_rows, to_mat, from_mat)."""
    x = to_np(acts["conv"]).transpose(0, 3, 1, 2)
    out = {
        "conv": (
            maccore.conv2d_rows(x, bias=True, reduce=reduce, **CONV),
            None
            if gouts is None
            else maccore.conv2d_grad_rows(
                to_np(gouts["conv"]).transpose(0, 3, 1, 2), reduce=reduce
            ),
            lambda g: np.concatenate(
                [
                    to_np(g["kernel"]).transpose(3, 2, 0, 1).reshape(4, -1),
                    to_np(g["bias"])[:, None],
                ],
                1,
            ),
            lambda m: {
                "kernel": m[:, :-1].reshape(4, 2, 3, 3).transpose(2, 3, 1, 0),
                "bias": m[:, -1],
            },
        ),
        "block/dense": (
            maccore.linear_rows(to_np(acts["block"]["dense"]), bias=True, reduce=reduce),
            None
            if gouts is None
            else maccore.grad_rows(to_np(gouts["block"]["dense"]), reduce=reduce),
            lambda g: np.concatenate([to_np(g["kernel"]).T, to_np(g["bias"])[:, None]], 1),
            lambda m: {"kernel": m[:, :-1].T, "bias": m[:, -1]},
        ),
        "head": (
            maccore.linear_rows(to_np(acts["head"]), bias=False),
            None if gouts is None else maccore.grad_rows(to_np(gouts["head"])),
            lambda g: to_np(g["kernel"]).T,
            lambda m: {"kernel": m.T},
        ),
    }
    return out


def sub(tree, name):
    for k in name.split("/"):
        tree = tree[k]
    return tree


def ref_run(pc, steps, t_cov, t_inv, *, kfac_r=None, reduce=False):
    d = {"conv": (19, 4), "block/dense": (5, 5), "head": (5, 3)}
    states = {n: pc.init(dt, do, xp=NPX, dtype=np.float64) for n, (dt, do) in d.items()}
    outs = []
    for t in range(steps):
        grads, acts, gouts = step_data(t)
        lay = ref_layers(acts, gouts if kfac_r else None, reduce)
        new = jax.tree.map(to_np, grads)
        for n, (rows, grows, to_mat, from_mat) in lay.items():
            if t % t_cov == 0:
                states[n] = (
                    pc.update(states[n], rows, grows, reduction_factor=kfac_r)
                    if kfac_r
                    else pc.update(states[n], rows)
                )
            if t % t_inv == 0:
                states[n] = pc.refresh(states[n])
            node = sub(new, n)
            node.update(from_mat(pc.apply(states[n], to_mat(sub(grads, n)))))
        outs.append(new)
    return outs, states


def run(tx, steps, *, kfac=False, jit=True):
    state = tx.init(tree_params())
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for t in range(steps):
        grads, acts, gouts = step_data(t)
        kw = {"output_grads": gouts} if kfac else {}
        u, state = update(grads, state, tree_params(), activations=acts, **kw)
        outs.append(u)
    return outs, state


def test_mac_adapter_equals_core():
    tx = mj.scale_by_mac(stat_decay=0.9, damping=0.5, t_cov=2, t_inv=3, layers=LAYERS)
    outs, state = run(tx, 7)
    ref, ref_states = ref_run(maccore.mac(decay=0.9, damping=0.5), 7, 2, 3)
    for o, r in zip(outs, ref):
        tree_allclose(o, r, rtol=2e-5, atol=2e-5)
    assert int(state.count) == 7
    for n, st in ref_states.items():
        assert int(state.layers[n].mean.count) == 4  # EMA updates at t = 0, 2, 4, 6
        np.testing.assert_allclose(
            to_np(state.layers[n].mean_hat), st.mean_hat, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(
    "mode,kfac_approx", [("tikhonov", "expand"), ("pi", "reduce"), ("exact", "expand")]
)
def test_kfac_adapter_equals_core(mode, kfac_approx):
    r = 1.0 / N
    tx = mj.scale_by_kfac(
        reduction_factor=r,
        damping=0.3,
        damping_mode=mode,
        kfac_approx=kfac_approx,
        t_cov=1,
        t_inv=2,
        layers=LAYERS,
    )
    outs, _ = run(tx, 3, kfac=True)
    ref, _ = ref_run(
        maccore.kfac(damping=0.3, mode=mode), 3, 1, 2, kfac_r=r, reduce=kfac_approx == "reduce"
    )
    for o, rr in zip(outs, ref):
        tree_allclose(o, rr, rtol=1e-4, atol=1e-4)


def test_kfac_loss_average_and_reduction_factor_per_update():
    """``loss_average="batch"`` (default, as maccore_torch.KFAC) is R = 1/N; ``reduction_factor=``
    of the transformation or of one (jitted) update overrides it; ``None`` is a summed loss."""
    grads, acts, gouts = step_data(0)
    state = mj.scale_by_kfac(t_cov=1, t_inv=1, layers=LAYERS).init(tree_params())

    def update(tx, **kw):
        return jax.jit(tx.update)(grads, state, activations=acts, output_grads=gouts, **kw)[0]

    default = update(mj.scale_by_kfac(t_cov=1, t_inv=1, layers=LAYERS))
    summed_tx = mj.scale_by_kfac(t_cov=1, t_inv=1, layers=LAYERS, loss_average=None)
    per_update = update(summed_tx, reduction_factor=1.0 / N)
    fixed = update(mj.scale_by_kfac(reduction_factor=1.0 / N, t_cov=1, t_inv=1, layers=LAYERS))
    tree_allclose(default, per_update, rtol=0, atol=0)
    tree_allclose(default, fixed, rtol=0, atol=0)
    summed = update(summed_tx)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(summed), jax.tree.leaves(default))) > 1e-3


@pytest.mark.parametrize("kfac", [False, True])
def test_jit_equals_eager(kfac):
    make = (
        (
            lambda: mj.kfac(
                0.1, reduction_factor=0.25, t_cov=2, t_inv=3, layers=LAYERS, weight_decay=0.1
            )
        )
        if kfac
        else (lambda: mj.mac(0.1, t_cov=2, t_inv=3, layers=LAYERS, weight_decay=0.1, nesterov=True))
    )
    eager, s1 = run(make(), 2, kfac=kfac, jit=False)
    jitted, s2 = run(make(), 2, kfac=kfac, jit=True)
    for a, b in zip(eager, jitted):
        tree_allclose(a, b, rtol=1e-5, atol=1e-6)
    tree_allclose(s1, s2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_optimizer_is_momentum_and_decoupled_weight_decay(nesterov):
    lr, mu, wd = 0.3, 0.8, 0.05
    pre = mj.scale_by_mac(t_cov=2, t_inv=3, layers=LAYERS)
    tx = mj.mac(
        lr, momentum=mu, weight_decay=wd, t_cov=2, t_inv=3, layers=LAYERS, nesterov=nesterov
    )
    sp, so = pre.init(tree_params()), tx.init(tree_params())
    pre_update, tx_update = jax.jit(pre.update), jax.jit(tx.update)
    p = tree_params()
    b = jax.tree.map(jnp.zeros_like, p)
    for t in range(4):
        grads, acts, _ = step_data(t)
        g, sp = pre_update(grads, sp, activations=acts)
        b = jax.tree.map(lambda b_, g_: mu * b_ + g_, b, g)
        d = (
            b
            if not nesterov
            else (g if t == 0 else jax.tree.map(lambda g_, b_: g_ + mu * b_, g, b))
        )
        expected = jax.tree.map(lambda p_, d_: (1 - lr * wd) * p_ - lr * d_, p, d)
        u, so = tx_update(grads, so, p, activations=acts)
        p = optax.apply_updates(p, u)
        tree_allclose(p, expected, rtol=1e-5, atol=1e-6)


def test_learning_rate_schedule():
    sched = optax.linear_schedule(0.1, 0.0, 4)
    tx = mj.mac(sched, t_cov=1, t_inv=1, layers=LAYERS)
    state = tx.init(tree_params())
    grads, acts, _ = step_data(0)
    u, _ = jax.jit(tx.update)(grads, state, tree_params(), activations=acts)
    assert np.all(np.isfinite(to_np(u["head"]["kernel"])))


# ---- attention -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,causal", [("reference", False), ("per_head", True)])
def test_attention_adapter_equals_core(mode, causal):
    heads, d, b_, n = 2, 8, 3, 4
    params = {"qkv": {"kernel": normal(10, (d, 3 * d), 0.5), "bias": normal(11, (3 * d,))}}
    spec = mj.QKV(num_heads=heads, mode=mode, causal=causal)
    tx = mj.scale_by_mac(damping=0.7, t_cov=1, t_inv=1, attention={"qkv": spec})
    state = tx.init(params)
    pc = maccore.mac(damping=0.7)
    main = pc.init(d + 1, 3 * d, xp=NPX, dtype=np.float64)
    val = pc.init(
        d + 1, 3 * d, xp=NPX, dtype=np.float64, heads=heads if mode == "per_head" else None
    )
    w, bias = to_np(params["qkv"]["kernel"]), to_np(params["qkv"]["bias"])
    for t in range(2):
        x = normal(20 + t, (b_, n, d))
        g = {"qkv": {"kernel": normal(30 + t, (d, 3 * d)), "bias": normal(40 + t, (3 * d,))}}
        u, state = jax.jit(tx.update)(g, state, params, activations={"qkv": x})
        xn = to_np(x)
        q, k, _ = maccore.split_qkv(xn @ w + bias, heads)
        vbar = maccore.attention_weighted_mean(
            xn, maccore.attention_probs(q, k, causal=causal), bias=True, mode=mode
        )
        main = pc.refresh(pc.update(main, maccore.linear_rows(xn, bias=True)))
        val = pc.refresh(pc.update(val, mean=vbar))
        gm = np.concatenate([to_np(g["qkv"]["kernel"]).T, to_np(g["qkv"]["bias"])[:, None]], 1)
        ref = np.concatenate([pc.apply(main, gm[: 2 * d]), pc.apply(val, gm[2 * d :])], 0)
        np.testing.assert_allclose(to_np(u["qkv"]["kernel"]), ref[:, :-1].T, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(to_np(u["qkv"]["bias"]), ref[:, -1], rtol=2e-5, atol=2e-5)
    # one state layout (as maccore_torch): ONE MacState with a factor per row block (Q, K, V),
    # per head [3H, d̃]; its V factors are the attention-weighted means folded above
    st = state.layers["qkv"]
    blocks = 3 * heads if mode == "per_head" else 3
    assert isinstance(st, maccore.MacState) and tuple(st.mean_hat.shape) == (blocks, d + 1)
    np.testing.assert_allclose(to_np(st.mean_hat[2 * blocks // 3:]),
                               np.broadcast_to(val.mean_hat, (blocks // 3, d + 1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_np(st.mean_hat[0]), main.mean_hat, rtol=1e-5, atol=1e-6)


def test_attention_needs_params():
    params = {"qkv": {"kernel": normal(10, (8, 24))}}
    tx = mj.scale_by_mac(attention={"qkv": mj.QKV(num_heads=2)})
    with pytest.raises(ValueError, match="need params"):
        tx.update(params, tx.init(params), activations={"qkv": normal(1, (2, 3, 8))})
    with pytest.raises(ValueError, match=r"activations of shape \[2, 8\].*\[B, N, 8\]"):
        tx.update(params, tx.init(params), params, activations={"qkv": normal(1, (2, 8))})


# ---- checkpointing ---------------------------------------------------------------------------------
def _trainer(tx):
    model = MLP()

    @jax.jit
    def step(p, s, x, y):
        def loss(p):
            out, acts = mj.linen.apply(model, {"params": p}, x)
            return jnp.mean((out - y) ** 2), acts

        (_, acts), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, s = tx.update(g, s, p, activations=acts)
        return optax.apply_updates(p, u), s

    def train(params, state, steps, start):
        for t in range(start, start + steps):
            params, state = step(params, state, normal(50 + t, (8, 4)), normal(70 + t, (8, 3)))
        return params, state

    return train


def test_checkpoint_round_trip_resumes_identically(tmp_path):
    from flax import serialization

    tx = mj.mac(0.1, weight_decay=0.01, t_cov=2, t_inv=3)
    train = _trainer(tx)
    params = MLP().init(jax.random.key(0), jnp.zeros((1, 4), F32))["params"]
    p_all, s_all = train(params, tx.init(params), 6, 0)
    p3, s3 = train(params, tx.init(params), 3, 0)
    path = tmp_path / "ckpt.pkl"
    path.write_bytes(pickle.dumps((p3, s3)))
    restored = [pickle.loads(path.read_bytes())]
    template = (jax.tree.map(jnp.zeros_like, p3), tx.init(params))
    restored.append(serialization.from_bytes(template, serialization.to_bytes((p3, s3))))
    for p, s in restored:
        assert jax.tree.structure(s) == jax.tree.structure(s3)
        p6, s6 = train(p, s, 3, 3)
        for a, b in zip(jax.tree.leaves((p_all, s_all)), jax.tree.leaves((p6, s6))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- bad input -------------------------------------------------------------------------------------
def _bad(match, *, acts=None, gouts=None, grads=None, kfac=False, layers=LAYERS, init_params=None):
    g, a, go = step_data(0)
    tx = (
        mj.scale_by_kfac(reduction_factor=1.0, layers=layers)
        if kfac
        else mj.scale_by_mac(layers=layers)
    )
    with pytest.raises((ValueError, TypeError), match=match):
        state = tx.init(tree_params() if init_params is None else init_params)
        tx.update(
            g if grads is None else grads,
            state,
            activations=a if acts is None else acts,
            output_grads=go if gouts is None else gouts,
        )


def test_error_missing_activations():
    _, a, _ = step_data(0)
    del a["head"]
    _bad(r"activations missing for layer\(s\) 'head' \(flax weight \[5, 3\]\)", acts=a)
    tx = mj.scale_by_mac(layers=LAYERS)
    with pytest.raises(ValueError, match="needs activations="):
        tx.update(step_data(0)[0], tx.init(tree_params()))


def test_error_extra_activations():
    _, a, _ = step_data(0)
    a["norm"] = a["head"]
    _bad(r"activations given for \['norm'\]", acts=a)


def test_error_wrong_shapes():
    _, a, go = step_data(0)
    _bad(
        r"layer 'head': activations of shape \[4, 7\] do not fit its weight \[5, 3\]",
        acts={**a, "head": normal(0, (4, 7))},
    )
    _bad(
        r"layer 'conv': activations of shape \[4, 3, 7, 6\] .*\[N, H, W, 2\] \(NHWC\)",
        acts={**a, "conv": normal(0, (4, 3, 7, 6))},
    )
    _bad(
        r"layer 'block/dense': output_grads of shape \[4, 3, 6\] do not match its output \[4, 3, 5\]",
        gouts={**go, "block": {"dense": normal(0, (4, 3, 6))}},
        kfac=True,
    )
    _bad(
        r"layer 'conv': output_grads of shape \[4, 4, 4, 4\] do not match its output \[4, 3, 3, 4\]",
        gouts={**go, "conv": normal(0, (4, 4, 4, 4))},
        kfac=True,
    )


def test_error_mismatched_trees():
    p = tree_params()
    del p["head"]
    _bad(
        r"initialised for layers \['block/dense', 'conv'\] but the gradients have layers "
        r"\['block/dense', 'conv', 'head'\]",
        init_params=p,
    )


def test_error_declarations():
    _bad(r"layer 'conv' has a 4-D kernel \[3, 3, 2, 4\]: declare it", layers={})
    _bad(r"unknown layers \['nope'\]", layers={**LAYERS, "nope": mj.Dense()})
    _bad(
        r"layer 'head': declared Conv but its kernel has shape \[5, 3\]",
        layers={**LAYERS, "head": mj.Conv(padding=0)},
    )
    eqx_style = {"lin": {"weight": normal(0, (3, 4)), "bias": normal(1, (3,))}}
    with pytest.raises(ValueError, match="did you mean layout='equinox'"):
        mj.scale_by_mac().init(eqx_style)
    with pytest.raises(ValueError, match="layout must be one of"):
        mj.scale_by_mac(layout="torch").init(eqx_style)


@pytest.mark.parametrize("with_input", [False, True])
def test_excluded_layer_passes_through(with_input):
    g, a, _ = step_data(0)
    if not with_input:  # an excluded layer's captured input is ignored when present
        del a["head"]
    tx = mj.scale_by_mac(layers={**LAYERS, "head": None})
    u, _ = jax.jit(tx.update)(g, tx.init(tree_params()), activations=a)
    np.testing.assert_array_equal(np.asarray(u["head"]["kernel"]), np.asarray(g["head"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(u["norm"]["scale"]), np.asarray(g["norm"]["scale"]))
