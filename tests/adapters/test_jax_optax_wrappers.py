"""maccore_jax inside optax's training-loop wrappers (float64, under ``jax.jit``):

- ``optax.inject_hyperparams(maccore_jax.mac | kfac | singd)`` with NO ``static_args``: schedules of
  the learning rate and of the damping give, step by step, the run with those constants; injected
  periods (``t_cov``, ``t_inv``, ``T``) and ``stat_decay`` equal the static ones;
- ``optax.multi_transform`` / ``optax.masked``: MAC (KFAC, SINGD) on a subset of the layers equals
  the method run alone on those layers, the other layers get the other transformation's update;
  activations of masked-out layers are ignored;
- ``maccore_jax.MultiSteps``: k micro-batches give the parameters of one step on the concatenated
  batch (statistics pooled over every micro-batch), where ``optax.MultiSteps`` does not.
"""

from __future__ import annotations

import functools

import pytest

from tests.adapters._jax_common import to_np, x64_module  # noqa: F401  (import path of maccore_jax)

import array_api_compat  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import maccore  # noqa: E402
import maccore_jax as mj  # noqa: E402
from maccore import engine  # noqa: E402

F64 = jnp.float64
SIZES = {"l1": (5, 6, True), "l2": (6, 4, True), "l3": (4, 3, False)}  # d_in, d_out, bias


pytestmark = pytest.mark.usefixtures("x64_module")  # float64 oracles (_jax_common)


# ---- a three-layer MLP written out by hand (inputs and output gradients of every layer) ----------
def init_params(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for n, (di, do, bias) in SIZES.items():
        out[n] = {"kernel": jnp.asarray(rng.standard_normal((di, do)) / np.sqrt(di), F64)}
        if bias:
            out[n]["bias"] = jnp.asarray(0.1 * rng.standard_normal(do), F64)
    return out


def data(steps, rows, seed=1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((steps, rows, SIZES["l1"][0])), F64)
    y = jnp.asarray(rng.standard_normal((steps, rows, SIZES["l3"][1])), F64)
    return x, y


def _loss(params, perts, x, y, summed):
    acts, h = {}, x
    for i, n in enumerate(SIZES):
        acts[n] = h
        z = h @ params[n]["kernel"] + perts[n]
        if "bias" in params[n]:
            z = z + params[n]["bias"]
        h = jnp.tanh(z) if i < len(SIZES) - 1 else z
    terms = 0.5 * jnp.sum((h - y) ** 2, axis=-1)
    return (jnp.sum(terms) if summed else jnp.mean(terms)), acts


@functools.partial(jax.jit, static_argnames="summed")
def batch(params, x, y, summed=False):
    """(gradients, layer inputs, layer output gradients) of the batch-mean (or summed) loss."""
    perts = {n: jnp.zeros((x.shape[0], SIZES[n][1]), F64) for n in SIZES}
    (g, gouts), acts = jax.grad(_loss, argnums=(0, 1), has_aux=True)(params, perts, x, y, summed)
    return g, acts, gouts


def run(tx, x, y, params=None, *, micro=1, summed=False):
    """Train ``tx`` over ``x[s]`` (each step's batch cut into ``micro`` equal micro-batches)."""
    params = init_params() if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update)
    n = x.shape[1] // micro
    for s in range(x.shape[0]):
        for i in range(micro):
            g, a, go = batch(params, x[s, i * n:(i + 1) * n], y[s, i * n:(i + 1) * n],
                             summed=summed)
            u, state = update(g, state, params, activations=a, output_grads=go)
            params = optax.apply_updates(params, u)
    return params, state


def rel_diff(a, b):
    """max over leaves of max|a − b| / max|b|."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / np.max(np.abs(np.asarray(v))))
               for u, v in zip(la, lb))


def sub(tree, names):
    return {n: tree[n] for n in names}


BUILDERS = {  # partials keep the signature optax.inject_hyperparams binds against
    "mac": functools.partial(mj.mac, t_cov=1, t_inv=1),
    "kfac": functools.partial(mj.kfac, t_cov=1, t_inv=1),
    "singd": functools.partial(mj.singd, T=1),
}


# ---- 1. optax.inject_hyperparams -----------------------------------------------------------------
def lr_sched(t):
    return 0.05 * (1.0 + t)


def damping_sched(base):
    return lambda t: base * (1.0 + 3.0 * t)


@pytest.mark.parametrize("name,damping", [("mac", 0.5), ("kfac", 1e-2), ("singd", 1e-2)])
def test_inject_hyperparams_schedules_need_no_static_args(name, damping):
    """Schedules of learning_rate and damping = the run with each step's constants."""
    make = BUILDERS[name]
    x, y = data(3, 8)
    kw = {"alpha1": 0.5} if name == "singd" else {}
    tx = optax.inject_hyperparams(make)(learning_rate=lr_sched, damping=damping_sched(damping),
                                        **kw)
    state = tx.init(init_params())
    injected = set(state.hyperparams)
    assert {"learning_rate", "damping", "momentum"} <= injected
    assert ({"T", "alpha1", "lr_cov"} if name == "singd" else {"t_cov", "t_inv", "stat_decay"}) \
        <= injected
    got, _ = run(tx, x, y)

    # the reference: at step t a fresh optimizer with the Python constants of step t (eager), the
    # state carried on
    params = init_params()
    ref_state = make(learning_rate=lr_sched(0), damping=damping, **kw).init(params)
    for t in range(x.shape[0]):
        g, a, go = batch(params, x[t], y[t])
        step = make(learning_rate=lr_sched(t), damping=damping_sched(damping)(t), **kw)
        u, ref_state = step.update(g, ref_state, params, activations=a, output_grads=go)
        params = optax.apply_updates(params, u)
    assert rel_diff(got, params) < 1e-12

    # negative controls: the schedules matter (constant lr/damping; scheduled lr, constant damping)
    const, _ = run(make(learning_rate=lr_sched(0), damping=damping, **kw), x, y)
    assert rel_diff(const, params) > 1e-3
    lr_only, _ = run(optax.inject_hyperparams(make)(learning_rate=lr_sched, damping=damping, **kw),
                     x, y)
    assert rel_diff(lr_only, params) > 1e-4


@pytest.mark.parametrize("name", ["mac", "kfac", "singd"])
def test_injected_periods_and_decay_equal_static(name):
    make = BUILDERS[name]
    x, y = data(5, 8)
    kw = {"T": 2} if name == "singd" else {"t_cov": 2, "t_inv": 3, "stat_decay": 0.8}
    tx = optax.inject_hyperparams(make)(learning_rate=0.1, **kw)
    state = tx.init(init_params())
    for k in kw:  # injected as 0-d arrays (traced inside the jitted update)
        assert k in state.hyperparams and state.hyperparams[k].shape == ()
    got, _ = run(tx, x, y)
    want, _ = run(make(learning_rate=0.1, **kw), x, y)
    assert rel_diff(got, want) < 1e-13
    # the injected period is used: a different one gives another run
    other = {"T": 1} if name == "singd" else {**kw, "t_cov": 1}
    assert rel_diff(run(optax.inject_hyperparams(make)(learning_rate=0.1, **other), x, y)[0],
                    want) > 1e-6


def test_injected_period_changed_in_the_state():
    """``state.hyperparams['t_cov']`` set between steps takes effect (no retrace needed)."""
    x, y = data(4, 8)
    tx = optax.inject_hyperparams(mj.mac)(learning_rate=0.1, t_cov=3, t_inv=1)
    params, state = init_params(), None
    state = tx.init(params)
    ref_tx = mj.mac(0.1, t_cov=1, t_inv=1)
    ref_p, ref_state = init_params(), ref_tx.init(params)
    update = jax.jit(tx.update)
    state.hyperparams["t_cov"] = jnp.asarray(1, state.hyperparams["t_cov"].dtype)
    for t in range(x.shape[0]):
        g, a, go = batch(params, x[t], y[t])
        u, state = update(g, state, params, activations=a)
        params = optax.apply_updates(params, u)
        g, a, go = batch(ref_p, x[t], y[t])
        u, ref_state = ref_tx.update(g, ref_state, ref_p, activations=a)
        ref_p = optax.apply_updates(ref_p, u)
    assert rel_diff(params, ref_p) < 1e-13


def test_bad_injected_values_are_rejected_when_concrete():
    params = init_params()
    with pytest.raises(ValueError, match="t_cov must be a positive integer, got 0"):
        optax.inject_hyperparams(mj.mac)(learning_rate=0.1, t_cov=0).init(params)
    with pytest.raises(ValueError, match="T must be a positive integer"):
        optax.inject_hyperparams(mj.singd)(learning_rate=0.1, T=-1).init(params)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        optax.inject_hyperparams(mj.kfac)(learning_rate=0.1, stat_decay=1.0).init(params)
    with pytest.raises(ValueError, match=r"alpha1 must lie in \[0, 1\)"):
        optax.inject_hyperparams(mj.singd)(learning_rate=0.1, alpha1=1.5).init(params)
    with pytest.raises(ValueError, match="t_inv must be a positive integer or a 0-d integer"):
        mj.scale_by_mac(t_inv=jnp.asarray(2.0))
    # Python inputs keep their messages
    with pytest.raises(ValueError, match="t_cov must be a positive integer, got 0"):
        mj.mac(0.1, t_cov=0)


def test_core_schedule_and_decay_accept_arrays():
    """``maccore.is_due`` / ``engine.schedule`` with array periods are array arithmetic (under
    jit); ``check_decay`` checks array values when it can read them; NumPy errors unchanged."""
    f = jax.jit(lambda c, p, q: engine.schedule(c, t_cov=p, t_inv=q))
    for c in range(7):
        got = f(jnp.int32(c), jnp.int32(2), jnp.int32(3))
        assert (bool(got[0]), bool(got[1])) == (c % 2 == 0, c % 3 == 0)
    assert bool(maccore.is_due(4, np.asarray(2))) and not bool(maccore.is_due(3, np.asarray(2)))
    with pytest.raises(ValueError, match="period must be a positive integer, got 0"):
        maccore.is_due(3, 0)
    with pytest.raises(ValueError, match="period must be a positive integer, got 0"):
        maccore.is_due(3, np.asarray(0))
    st = maccore.ema_init((2,), xp=array_api_compat.array_namespace(jnp.zeros(1)), dtype=F64)
    x = jnp.asarray([1.0, 2.0], F64)
    traced = jax.jit(lambda d: maccore.ema_update(st, x, decay=d).value)(jnp.asarray(0.25, F64))
    np.testing.assert_allclose(np.asarray(traced), 0.75 * np.asarray(x), rtol=1e-15)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got 1.0"):
        maccore.ema_update(st, x, decay=jnp.asarray(1.0, F64))
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got 1.5"):
        maccore.ema_update(st, x, decay=1.5)
    with pytest.raises(TypeError, match="decay must be a number in"):
        maccore.ema_update(st, x, decay="0.9")


# ---- 2. optax.multi_transform / optax.masked -----------------------------------------------------
SUBSET, REST = ["l1", "l3"], ["l2"]
LABELS = {"l1": "curv", "l2": "other", "l3": "curv"}


def _labels(params):
    return {n: jax.tree.map(lambda _: LABELS[n], params[n]) for n in params}


@pytest.mark.parametrize("name", ["mac", "kfac", "singd"])
def test_multi_transform_subset_equals_method_alone(name):
    """Lockstep on the same gradients: the subset's updates are the method's alone on those
    layers, the rest are adam's; activations of the adam layers are ignored."""
    make = BUILDERS[name]
    x, y = data(3, 8)
    multi = optax.multi_transform({"curv": make(learning_rate=0.1), "other": optax.adam(1e-2)},
                                  _labels)
    alone, adam = make(learning_rate=0.1), optax.adam(1e-2)
    params = init_params()
    sm, sa, sd = multi.init(params), alone.init(sub(params, SUBSET)), adam.init(sub(params, REST))
    for t in range(x.shape[0]):
        g, a, go = batch(params, x[t], y[t])
        um, sm = jax.jit(multi.update)(g, sm, params, activations=a, output_grads=go)
        ua, sa = jax.jit(alone.update)(sub(g, SUBSET), sa, sub(params, SUBSET),
                                       activations=sub(a, SUBSET), output_grads=sub(go, SUBSET))
        ud, sd = adam.update(sub(g, REST), sd, sub(params, REST))
        assert rel_diff(sub(um, SUBSET), ua) < 1e-13
        assert rel_diff(sub(um, REST), ud) < 1e-13
        # negative control: the subset really is preconditioned (not a plain momentum step)
        plain = jax.tree.map(lambda g_: -0.1 * g_, sub(g, SUBSET))
        if t == 0:
            assert rel_diff(sub(um, SUBSET), plain) > 1e-2
        params = optax.apply_updates(params, um)
    # masked-out layers: their activation / output-gradient entries are never read
    g, a, go = batch(params, x[0], y[0])
    junk = {**a, "l2": jnp.zeros((1, 1), F64)}
    junk_go = {**go, "l2": jnp.zeros((1, 1), F64)}
    u1, _ = multi.update(g, sm, params, activations=a, output_grads=go)
    u2, _ = multi.update(g, sm, params, activations=junk, output_grads=junk_go)
    assert rel_diff(u1, u2) == 0.0


def test_multi_transform_training_with_frozen_layers_equals_mac_alone():
    """End to end: MAC on l1 and l3, l2 frozen (set_to_zero) = MAC alone training l1 and l3 of
    the same model with l2 held constant."""
    x, y = data(4, 8)
    multi = optax.multi_transform(
        {"curv": mj.mac(0.1, t_cov=1, t_inv=2), "other": optax.set_to_zero()}, _labels)
    got, _ = run(multi, x, y)

    frozen = init_params()
    alone = mj.mac(0.1, t_cov=1, t_inv=2)
    p = sub(frozen, SUBSET)
    state = alone.init(p)
    for t in range(x.shape[0]):
        g, a, _ = batch({**frozen, **p}, x[t], y[t])
        u, state = jax.jit(alone.update)(sub(g, SUBSET), state, p, activations=sub(a, SUBSET))
        p = optax.apply_updates(p, u)
    assert rel_diff(sub(got, SUBSET), p) < 1e-13
    assert rel_diff(sub(got, REST), sub(frozen, REST)) == 0.0
    # negative control: MAC on every layer (nothing frozen) is another run
    everything, _ = run(mj.mac(0.1, t_cov=1, t_inv=2), x, y)
    assert rel_diff(sub(everything, SUBSET), p) > 1e-4


def test_masked_prefix_mask_and_chain():
    """``optax.masked`` with a prefix mask ({layer: bool}) around the preconditioner, chained with
    sgd: the subset is preconditioned as by the preconditioner alone."""
    x, y = data(2, 8)
    mask = {"l1": True, "l2": False, "l3": True}
    tx = optax.chain(optax.masked(mj.scale_by_mac(t_cov=1, t_inv=1), mask), optax.sgd(0.1))
    pre = mj.scale_by_mac(t_cov=1, t_inv=1)
    params = init_params()
    st, sp = tx.init(params), pre.init(sub(params, SUBSET))
    for t in range(x.shape[0]):
        g, a, _ = batch(params, x[t], y[t])
        u, st = jax.jit(tx.update)(g, st, params, activations=a)
        v, sp = pre.update(sub(g, SUBSET), sp, sub(params, SUBSET), activations=sub(a, SUBSET))
        assert rel_diff(sub(u, SUBSET), jax.tree.map(lambda z: -0.1 * z, v)) < 1e-13
        assert rel_diff(sub(u, REST), jax.tree.map(lambda z: -0.1 * z, sub(g, REST))) < 1e-15
        params = optax.apply_updates(params, u)


def test_masked_errors():
    params = init_params()
    g, a, go = batch(params, *[v[0] for v in data(1, 4)])
    # a layer split by the mask (kernel preconditioned, bias not) is refused: it cannot be
    # preconditioned as it would be without the mask
    split = {"l1": {"kernel": True, "bias": False}, "l2": False, "l3": True}
    tx = optax.masked(mj.scale_by_mac(), split)
    with pytest.raises(ValueError, match=r"layer 'l1' has its kernel in the masked subset but "
                                         r"its bias masked out"):
        tx.init(params)
    rev = {"l1": {"kernel": False, "bias": True}, "l2": False, "l3": True}
    with pytest.raises(ValueError, match=r"layer 'l1' has its bias in the masked subset"):
        optax.masked(mj.scale_by_mac(), rev).init(params)
    # entries for layers that exist nowhere are still an error
    tx = optax.masked(mj.scale_by_mac(), {"l1": True, "l2": False, "l3": True})
    st = tx.init(params)
    with pytest.raises(ValueError, match=r"activations given for \['nope'\]"):
        tx.update(g, st, params, activations={**a, "nope": a["l1"]})
    # a preconditioned layer's activations are still required
    with pytest.raises(ValueError, match="activations missing for layer"):
        tx.update(g, st, params, activations=sub(a, ["l2", "l3"]))


# ---- 3. gradient accumulation: maccore_jax.MultiSteps --------------------------------------------
K = 3  # micro-batches per step
MS_CASES = {
    "mac": lambda **kw: mj.mac(0.1, t_cov=1, t_inv=1, **kw),
    "smac": lambda **kw: mj.mac(0.1, t_cov=1, t_inv=1, diagonal=True, **kw),
    "kfac": lambda **kw: mj.kfac(0.1, t_cov=1, t_inv=1, damping=1e-2, **kw),
    "kfac-reduce-t2": lambda **kw: mj.kfac(0.1, t_cov=2, t_inv=2, damping=1e-2,
                                           kfac_approx="reduce", **kw),
    "singd": lambda **kw: mj.singd(0.1, T=1, **kw),
    "singd-diag": lambda **kw: mj.singd(0.1, T=1, structures=("diagonal", "dense"), **kw),
}


def multi_steps(tx, **kw):
    return mj.MultiSteps(tx, every_k_schedule=K, accumulator_dtype=F64, **kw)


@pytest.mark.parametrize("name", sorted(MS_CASES))
def test_multisteps_equals_the_concatenated_batch(name):
    make = MS_CASES[name]
    x, y = data(3, 4 * K)
    full, _ = run(make(), x, y)
    got, state = run(multi_steps(make(pool_micro_batches=True)), x, y, micro=K)
    assert rel_diff(got, full) < 1e-11
    # after the last micro-batch the pools are empty again and the step count is the full one
    (curv,) = mj.transform.curvature_states(state.inner_opt_state)
    assert int(curv.count) == x.shape[0] and int(state.gradient_step) == x.shape[0]
    assert all(float(jnp.max(jnp.abs(v))) == 0 for v in jax.tree.leaves(curv.pooled))
    # negative control: optax.MultiSteps keeps only the last micro-batch's statistics
    plain, _ = run(optax.MultiSteps(make(), every_k_schedule=K, accumulator_dtype=F64), x, y,
                   micro=K)
    assert rel_diff(plain, full) > 1e-4


def test_multisteps_with_inject_hyperparams_and_multi_transform():
    """The wrappers compose: MultiSteps(multi_transform(inject_hyperparams(kfac), adam))."""
    x, y = data(2, 4 * K)

    def build(pool):
        kf = optax.inject_hyperparams(mj.kfac)(learning_rate=lr_sched, damping=1e-2, t_cov=1,
                                               t_inv=1, pool_micro_batches=pool)
        return optax.multi_transform({"curv": kf, "other": optax.adam(1e-2)}, _labels)

    full, _ = run(build(False), x, y)
    got, _ = run(multi_steps(build(True)), x, y, micro=K)
    assert rel_diff(got, full) < 1e-11


@pytest.mark.parametrize("name", ["kfac", "singd"])
def test_multisteps_summed_gradients_match_a_summed_loss(name):
    """``use_grad_mean=False``: summed micro-batch gradients = the gradient of the summed loss
    over the concatenated batch; with ``loss_average=None`` the statistics are its too."""
    make = {"kfac": functools.partial(mj.kfac, 0.01, t_cov=1, t_inv=1, damping=1e-2),
            "singd": functools.partial(mj.singd, 0.01, T=1)}[name]
    x, y = data(2, 4 * K)
    full, _ = run(make(loss_average=None), x, y, summed=True)
    tx = multi_steps(make(loss_average=None, pool_micro_batches=True), use_grad_mean=False)
    got, _ = run(tx, x, y, micro=K, summed=True)
    assert rel_diff(got, full) < 1e-11


def test_pool_micro_batches_alone_is_the_plain_optimizer():
    x, y = data(2, 8)
    for make in (MS_CASES["mac"], MS_CASES["kfac"], MS_CASES["singd"]):
        a, _ = run(make(), x, y)
        b, _ = run(make(pool_micro_batches=True), x, y)
        assert rel_diff(b, a) < 1e-13


def test_multisteps_errors():
    params = init_params()
    with pytest.raises(ValueError, match="pool_micro_batches=True"):
        multi_steps(mj.mac(0.1)).init(params)
    g, a, _ = batch(params, *[v[0] for v in data(1, 4)])
    pre = mj.scale_by_mac()
    with pytest.raises(ValueError, match="accumulate_only=True needs a state built with"):
        pre.update(g, pre.init(params), activations=a, accumulate_only=True)
    with pytest.raises(TypeError, match="pool_micro_batches must be True or False"):
        mj.scale_by_mac(pool_micro_batches=1)
