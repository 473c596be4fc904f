"""maccore_jax SINGD: adapter == core (NumPy float64 reference loop, T > 1, structures, IKFAC,
reduce, lr_cov schedule), the optimizer update (weight decay after preconditioning, then momentum),
jit == eager, pickle round trip, bfloat16 factors."""

from __future__ import annotations

import pickle

import pytest

from tests.adapters._jax_common import to_np, tree_allclose
from tests.adapters.test_jax_transform import (
    LAYERS,
    N,
    NPX,
    ref_layers,
    step_data,
    sub,
    tree_params,
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import maccore  # noqa: E402
import maccore_jax as mj  # noqa: E402
from maccore_jax.singd import scale_by_singd, singd, singd_method  # noqa: E402

DIMS = {"conv": (19, 4), "block/dense": (5, 5), "head": (5, 3)}


def run(tx, steps, *, jit=True, state=None, start=0):
    state = tx.init(tree_params()) if state is None else state
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for t in range(start, start + steps):
        grads, acts, gouts = step_data(t)
        u, state = update(grads, state, tree_params(), activations=acts, output_grads=gouts)
        outs.append(u)
    return outs, state


def ref_run(steps, T, lr_cov, reduce=False, **core_kw):
    """The core on NumPy float64; loss averaged over the batch (R = 1/N)."""
    pc = maccore.singd(**core_kw)
    states = {n: pc.init(dt, do, xp=NPX, dtype=np.float64) for n, (dt, do) in DIMS.items()}
    outs = []
    for t in range(steps):
        grads, acts, gouts = step_data(t)
        new = jax.tree.map(to_np, grads)
        for n, (rows, grows, to_mat, from_mat) in ref_layers(acts, gouts, reduce).items():
            if t % T == 0:
                beta = lr_cov(t) if callable(lr_cov) else lr_cov
                states[n] = pc.update(states[n], rows, grows, reduction_factor=1.0 / N, lr_cov=float(beta))
            sub(new, n).update(from_mat(pc.apply(states[n], to_mat(sub(grads, n)))))
        outs.append(new)
    return outs, states


CASES = {
    "dense_schedule": dict(structures=("dense", "dense"), alpha1=0.5),
    "diag_toeplitz_normalized": dict(structures=("diagonal", "triltoeplitz"), alpha1=0.3,
                                     normalize_lr_cov=True),
    "ikfac_block_reduce": dict(structures=("block2diagonal", "dense"), alpha1=0.0, kfac_like=True,
                               reduce=True),
    "hierarchical": dict(structures=("hierarchical3_2", "triutoeplitz"), alpha1=0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_singd_adapter_equals_core(case):
    kw = dict(CASES[case])
    reduce = kw.pop("reduce", False)
    lr_cov = (lambda t: 0.2 / (1 + t)) if case == "dense_schedule" else 0.1
    tx = scale_by_singd(T=2, lr_cov=lr_cov, damping=0.05, layers=LAYERS,
                        kfac_approx="reduce" if reduce else "expand", **kw)
    outs, state = run(tx, 5)
    ref, ref_states = ref_run(5, 2, lr_cov, reduce, damping=0.05, **kw)
    for o, r in zip(outs, ref):
        tree_allclose(o, r, rtol=1e-4, atol=1e-5)
    assert int(state.count) == 5
    for n, st in ref_states.items():
        got = state.layers[n]  # the core state, as maccore_torch keeps it
        assert isinstance(got, maccore.SingdState)
        for a, b in zip(got.K, st.K):
            np.testing.assert_allclose(to_np(a), b, rtol=1e-4, atol=1e-5)
        for a, b in zip(got.C, st.C):
            np.testing.assert_allclose(to_np(a), b, rtol=1e-4, atol=1e-5)


def test_loss_average_and_reduction_factor():
    """``loss_average="batch"`` infers R = 1/N; an explicit reduction factor (here or per update)
    gives the same; ``None`` means R = 1."""
    kw = dict(T=1, lr_cov=0.1, layers=LAYERS)
    a, _ = run(scale_by_singd(**kw), 2)
    b, _ = run(scale_by_singd(reduction_factor=1.0 / N, **kw), 2)
    tree_allclose(a, b, rtol=1e-6, atol=1e-7)
    tx = scale_by_singd(loss_average=None, **kw)
    grads, acts, gouts = step_data(0)
    s0 = tx.init(tree_params())
    c, _ = tx.update(grads, s0, activations=acts, output_grads=gouts)
    d, _ = tx.update(grads, s0, activations=acts, output_grads=gouts, reduction_factor=1.0)
    tree_allclose(c, d, rtol=0, atol=0)
    e, _ = tx.update(grads, s0, activations=acts, output_grads=gouts, reduction_factor=1.0 / N)
    tree_allclose(e, a[0], rtol=1e-6, atol=1e-7)


def test_optimizer_weight_decay_after_preconditioning_then_momentum():
    lr, mom, wd = 0.1, 0.8, 0.05
    pre = scale_by_singd(T=2, lr_cov=0.1, layers=LAYERS)
    tx = singd(lr, momentum=mom, weight_decay=wd, T=2, lr_cov=0.1, layers=LAYERS)
    pre_outs, _ = run(pre, 4)
    outs, _ = run(tx, 4)
    p = tree_params()
    b = jax.tree.map(jnp.zeros_like, p)
    for u_pre, u in zip(pre_outs, outs):
        b = jax.tree.map(lambda b, g, w: mom * b + (g + wd * w), b, u_pre, p)
        tree_allclose(u, jax.tree.map(lambda x: -lr * x, b), rtol=1e-5, atol=1e-6)


def test_jit_equals_eager():
    def make():
        return singd(0.1, weight_decay=0.01, T=2, lr_cov=lambda t: 0.1 / (1 + t), alpha1=0.5,
                     structures=("dense", "diagonal"), layers=LAYERS)

    eager, s1 = run(make(), 3, jit=False)
    jitted, s2 = run(make(), 3, jit=True)
    for a, b in zip(eager, jitted):
        tree_allclose(a, b, rtol=1e-5, atol=1e-6)
    tree_allclose(s1, s2, rtol=1e-5, atol=1e-6)


def test_pickle_round_trip_resumes_identically():
    tx = singd(0.1, weight_decay=0.01, T=2, lr_cov=0.1, layers=LAYERS)
    _, state = run(tx, 3)
    restored = pickle.loads(pickle.dumps(jax.device_get(state)))
    tree_allclose(restored, state, rtol=0, atol=0)
    a, sa = run(tx, 3, state=state, start=3)
    b, sb = run(tx, 3, state=restored, start=3)
    for x, y in zip(a, b):
        tree_allclose(x, y, rtol=0, atol=0)
    tree_allclose(sa, sb, rtol=0, atol=0)


def test_bfloat16_factors_under_jit():
    tx = scale_by_singd(T=1, lr_cov=0.1, layers=LAYERS, preconditioner_dtype=(jnp.bfloat16, "bfloat16"))
    outs, state = run(tx, 6)
    ref, _ = run(scale_by_singd(T=1, lr_cov=0.1, layers=LAYERS), 6)
    for n in DIMS:
        st = state.layers[n]
        for f in ("K", "C", "m_K", "m_C"):
            for p in getattr(st, f):
                assert p.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(p))), (n, f)
    for u, r in zip(jax.tree.leaves(outs), jax.tree.leaves(ref)):
        assert u.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(u)))
        np.testing.assert_allclose(to_np(u), to_np(r), rtol=0.1, atol=0.05 * float(jnp.max(jnp.abs(r))))


def test_method_plugs_into_engine_and_exports():
    m = singd_method()  # the core engine's method (lr_cov 1e-2, as scale_by_singd's default)
    assert isinstance(m, maccore.CurvatureMethod) and m.name == "singd"
    assert singd_method is maccore.singd_method
    tx = mj.scale_by_curvature(m, t_cov=3, t_inv=3, layers=LAYERS)
    a, _ = run(tx, 4)
    b, _ = run(scale_by_singd(T=3, layers=LAYERS), 4)
    for x, y in zip(a, b):
        tree_allclose(x, y, rtol=0, atol=0)
    assert mj.singd is singd and mj.scale_by_singd is scale_by_singd and mj.singd_method is singd_method


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_average"):
        singd(0.1, loss_average="mean")
    with pytest.raises(ValueError, match="T must be a positive integer"):
        scale_by_singd(T=0)
    with pytest.raises(ValueError, match="structure"):
        singd_method(structures=("nope", "dense"))
    with pytest.warns(UserWarning, match="alpha1"):
        singd_method(kfac_like=True, alpha1=0.5)
    with pytest.raises(ValueError, match="output_grads"):
        tx = scale_by_singd(layers=LAYERS)
        grads, acts, _ = step_data(0)
        tx.update(grads, tx.init(tree_params()), activations=acts)


def test_axis_name_equals_single_device_on_the_union():
    """Two mapped shards (loss averaged per shard) == one device on the concatenated batch (the
    global loss is the mean of the shard losses, so its output gradients are the shard's halved)."""
    kw = dict(T=1, lr_cov=0.1, damping=0.05, layers=LAYERS)
    tx_dev = scale_by_singd(axis_name="d", **kw)
    tx_one = scale_by_singd(**kw)
    s_dev, s_one = tx_dev.init(tree_params()), tx_one.init(tree_params())
    split = lambda t: jax.tree.map(lambda a: a.reshape(2, a.shape[0] // 2, *a.shape[1:]), t)  # noqa: E731
    for t in range(2):
        grads, acts, gouts = step_data(t)
        u_one, s_one = tx_one.update(grads, s_one, activations=acts,
                                     output_grads=jax.tree.map(lambda g: g / 2, gouts))
        upd = jax.vmap(lambda g, s, a, go: tx_dev.update(g, s, activations=a, output_grads=go),
                       in_axes=(None, None, 0, 0), out_axes=(0, 0), axis_name="d")
        u_dev, s_all = upd(grads, s_dev, split(acts), split(gouts))
        s_dev = jax.tree.map(lambda x: x[0], s_all)
        for a, b in zip(jax.tree.leaves(u_dev), jax.tree.leaves(u_one)):
            np.testing.assert_allclose(to_np(a[0]), to_np(b), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(to_np(a[1]), to_np(b), rtol=1e-4, atol=1e-5)
    tree_allclose(s_dev, s_one, rtol=1e-4, atol=1e-5)
