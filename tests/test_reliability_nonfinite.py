"""Non-finite values and failed decompositions (docs/numerics.md), in both adapters.

- a step with NaN/Inf activations, gradients or statistics is skipped (``on_nonfinite="skip"``) or
  raises (``"raise"``), and leaves running averages, caches, momenta and counters bit-for-bit as
  they were — including a NaN that reaches ONLY the statistics of a collecting step (an extra
  forward pass) while the gradients are finite;
- a GradScaler overflow step (skipped by the scaler) leaves no statistics behind;
- a failed KFAC inverse names the layer and leaves the optimizer as it was;
- long run: 2,000 MAC steps on a small CNN on scikit-learn digits with 1% NaN-injected batches end
  bit-for-bit where the run without those batches ends (``t`` counts accepted steps only, so the
  t_cov / t_inv schedule of the accepted steps is that of the clean run); the same, shorter, under
  ``jax.jit``.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

pytest.importorskip("torch")

from tests.adapters import torch_helpers  # noqa: E402,F401  (adapter import path)

import array_api_compat  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import maccore  # noqa: E402
import maccore_torch as mt  # noqa: E402

DT = torch.float32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SmallCNN(nn.Module):
    """8×8 digits: conv 1→8 (3×3, pad 1) → relu → conv 8→12 (3×3, stride 2, pad 1) → relu →
    linear 192→10."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.flatten(1))


def _snapshot(opt):
    """Everything a step may change: parameters, per-layer states, counters, momenta."""
    pre = opt.preconditioner
    layers = {l.name: (maccore.checkpoint.flatten_state(l.state)[0], l.updates) for l in pre.layers}
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    moms = [opt.state[p].get("momentum_buffer") for g in opt.param_groups for p in g["params"]]
    return pre.t, layers, params, [None if m is None else m.clone() for m in moms]


def _equal(x, y):
    """Bit for bit, a NaN equal to a NaN in the same place (a diverged state kept as it was)."""
    if not x.is_floating_point():
        return torch.equal(x, y)
    nx, ny = torch.isnan(x), torch.isnan(y)
    return torch.equal(nx, ny) and torch.equal(torch.where(nx, 0, x), torch.where(ny, 0, y))


def _assert_same(a, b):
    t1, l1, p1, m1 = a
    t2, l2, p2, m2 = b
    assert t1 == t2
    for name in l1:
        assert l1[name][1] == l2[name][1], name
        for k in l1[name][0]:
            assert _equal(l1[name][0][k], l2[name][0][k]), f"{name}/{k}"
    for x, y in zip(p1 + m1, p2 + m2):
        assert (x is None and y is None) or _equal(x, y)


def _clone(model):
    """A copy of the weights (``copy.deepcopy`` would also copy the optimizer's hooks)."""
    twin = SmallCNN()
    twin.load_state_dict(model.state_dict())
    return twin


def _digits_batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=DT), torch.randint(0, 10, (n,), generator=g)


def _good_step(model, opt, seed):
    x, y = _digits_batch(seed=seed)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return _stepped(opt)


def _stepped(opt) -> bool:
    """``opt.step()``; whether the step was taken (``t`` counts taken steps only)."""
    t = opt.t
    opt.step()
    return opt.t == t + 1


def _bad_step(model, opt, where, seed=99):
    x, y = _digits_batch(seed=seed)
    opt.zero_grad()
    if where == "input":  # NaN activations: statistics and gradients
        x[0, 0, 3, 3] = float("nan")
        F.cross_entropy(model(x), y).backward()
    elif where == "grad":  # an Inf gradient only
        F.cross_entropy(model(x), y).backward()
        model.fc.bias.grad[1] = float("inf")
    elif where == "stats_only":  # an extra forward of a NaN batch: statistics only
        F.cross_entropy(model(x), y).backward()
        xn = x.clone()
        xn[:, :, 0, 0] = float("nan")
        model(xn)
    elif where == "overflow":  # a loss that overflows (e.g. fp16): Inf gradients and KFAC's G
        (F.cross_entropy(model(x), y) * 1e38 * 1e38).backward()
    return _stepped(opt)


MAKERS = {
    "MAC": lambda m, **kw: mt.MAC(m, lr=0.05, t_cov=1, t_inv=1, **kw),
    "SMAC": lambda m, **kw: mt.MAC(m, lr=0.05, t_cov=1, t_inv=1, diagonal=True, **kw),
    "KFAC": lambda m, **kw: mt.KFAC(m, lr=0.05, damping=0.1, t_cov=1, t_inv=1, **kw),
}


@pytest.mark.parametrize("where", ["input", "grad", "stats_only", "overflow"])
@pytest.mark.parametrize("method", list(MAKERS))
def test_torch_nonfinite_step_leaves_everything_unchanged(method, where):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = MAKERS[method](model)
    for s in range(3):
        assert _good_step(model, opt, s)
    before = _snapshot(opt)
    with pytest.warns(RuntimeWarning, match=r"non-finite gradients or statistics at step 3"):
        assert _bad_step(model, opt, where) is False
    _assert_same(_snapshot(opt), before)
    # ... and the run goes on exactly as without the bad step
    twin = _clone(model)
    topt = MAKERS[method](twin)
    topt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch aliases loaded tensors
    for s in range(3, 5):
        _good_step(model, opt, s)
        _good_step(twin, topt, s)
    _assert_same(_snapshot(opt), _snapshot(topt))

    strict = MAKERS[method](_clone(model), on_nonfinite="raise")
    strict.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = _snapshot(strict)
    with pytest.raises(FloatingPointError, match="non-finite"):
        _bad_step(strict.preconditioner.model, strict, where)
    _assert_same(_snapshot(strict), before)


def test_torch_nonfinite_on_a_step_that_does_not_collect():
    """A NaN in an extra forward of a step that collects no statistics changes nothing at all."""
    torch.manual_seed(1)
    model = SmallCNN()
    opt = mt.MAC(model, lr=0.05, t_cov=2, t_inv=2)
    _good_step(model, opt, 0)
    before = {l.name: l.state.mean.value.clone() for l in opt.preconditioner.layers}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _bad_step(model, opt, "stats_only")  # t = 1: not collecting, the step proceeds
    for l in opt.preconditioner.layers:
        assert torch.equal(l.state.mean.value, before[l.name])
    assert opt.t == 2


@pytest.mark.parametrize("method", ["MAC", "KFAC"])
def test_grad_scaler_overflow_step_leaves_no_statistics(method):
    """``scaler.step(opt)`` skips an overflowed step without calling ``opt.step()``; its forward
    statistics must not be pooled into the next step: the run equals the run without it."""
    torch.manual_seed(2)
    model = SmallCNN()
    twin = copy.deepcopy(model)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    opts = [MAKERS[method](m, grad_scaler=sc) for m, sc in zip((model, twin), scalers)]
    seeds = [0, 1, 2, "overflow", 3, 4]
    for i, (m, opt, sc) in enumerate(zip((model, twin), opts, scalers)):
        for s in seeds:
            if s == "overflow" and i == 1:
                continue  # the twin never sees the overflowed batch
            x, y = _digits_batch(seed=7 if s == "overflow" else s)
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y)
            if s == "overflow":
                loss = loss * float("inf")
            sc.scale(loss).backward()
            sc.step(opt)
            sc.update()
    assert opts[0].t == opts[1].t == 5
    # scales differ (the overflow halved one) by a power of two: unscaling is exact
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for la, lb in zip(opts[0].preconditioner.layers, opts[1].preconditioner.layers):
        for (k, va), vb in zip(maccore.checkpoint.flatten_state(la.state)[0].items(),
                               maccore.checkpoint.flatten_state(lb.state)[0].values()):
            torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-7, msg=f"{la.name}/{k}")


# ---- failed decompositions -----------------------------------------------------------------------
def _singular_inv_ex(real, dtype):
    """``torch.linalg.inv_ex`` reporting every ``dtype`` matrix singular (status 1)."""
    def inv_ex(x, *, check_errors=False):
        inv, info = real(x, check_errors=check_errors)
        return inv, (torch.ones_like(info) if x.dtype == dtype else info)
    return inv_ex


def test_torch_failed_inverse_names_the_layer_and_changes_nothing(monkeypatch):
    torch.manual_seed(3)
    model = SmallCNN()
    opt = mt.KFAC(model, lr=0.05, damping=0.1, t_cov=1, t_inv=2)
    for s in range(2):
        _good_step(model, opt, s)
    before = _snapshot(opt)
    xp = array_api_compat.array_namespace(torch.empty(0))

    def broken(x):
        raise RuntimeError("linalg.inv: singular (simulated)")

    # the step's first, unchecked attempt (torch.linalg.inv_ex) reports every factor singular;
    # the checked retry (linalg.inv, float32 then float64) fails too
    monkeypatch.setattr(torch.linalg, "inv_ex", _singular_inv_ex(torch.linalg.inv_ex, torch.float32))
    monkeypatch.setattr(xp.linalg, "inv", broken)
    x, y = _digits_batch(seed=5)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(maccore.DecompositionError,
                       match=r"KFAC layer 'c1': damped_inverse: could not invert A of shape \[10, 10\]"
                             r".*also failed in float64"):
        opt.step()
    _assert_same(_snapshot(opt), before)
    monkeypatch.undo()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert _stepped(opt)


def test_torch_float64_retry_is_used_by_the_adapter(monkeypatch):
    """The float32 inverse fails → the float64 retry's result is used (equal to the float64
    dense inverse), and training goes on."""
    torch.manual_seed(4)
    model = SmallCNN()
    opt = mt.KFAC(model, lr=0.05, damping=0.1, t_cov=1, t_inv=1)
    xp = array_api_compat.array_namespace(torch.empty(0))
    real = xp.linalg.inv
    calls = {"f32": 0, "f64": 0}

    def only_f64(x):
        if x.dtype == torch.float32:
            calls["f32"] += 1
            raise RuntimeError("float32 inverse failed (simulated)")
        calls["f64"] += 1
        return real(x)

    monkeypatch.setattr(torch.linalg, "inv_ex", _singular_inv_ex(torch.linalg.inv_ex, torch.float32))
    monkeypatch.setattr(xp.linalg, "inv", only_f64)
    _good_step(model, opt, 0)
    assert calls["f32"] == calls["f64"] == 2 * len(opt.preconditioner.layers)
    for l in opt.preconditioner.layers:
        A = maccore.ema_debiased(l.state.a, decay=0.95).double()
        want = torch.linalg.inv(A + 0.1 * torch.eye(A.shape[0], dtype=torch.float64))
        assert l.state.a_inv.dtype == torch.float32
        torch.testing.assert_close(l.state.a_inv.double(), want, rtol=1e-6, atol=1e-6)


# ---- jax --------------------------------------------------------------------------------------------


def _jax():
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    from tests.adapters import _jax_common  # noqa: F401

    import jax
    import jax.numpy as jnp
    import optax

    import maccore_jax as mj

    return jax, jnp, optax, mj


def _skip_free(tree):
    """``tree`` without the skip counters of its curvature states (``consecutive_skips``,
    ``nonfinite_layers``: the only part of the state a skipped step changes)."""
    from maccore_jax.transform import map_curvature_states

    return map_curvature_states(
        lambda c: c._replace(consecutive_skips=None, nonfinite_layers=None), tree)


def _skips(tree):
    from maccore_jax.transform import curvature_states

    return [int(c.consecutive_skips) for c in curvature_states(tree)]


def _jax_problem(kind, on_nonfinite="skip"):
    jax, jnp, optax, mj = _jax()
    rng = np.random.default_rng(0)
    params = {
        "Dense_0": {"kernel": jnp.asarray(rng.standard_normal((4, 6)) * 0.5, jnp.float32),
                    "bias": jnp.zeros(6, jnp.float32)},
        "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((6, 3)) * 0.5, jnp.float32)},
    }
    if kind == "mac":
        tx = mj.mac(0.1, t_cov=2, t_inv=3, weight_decay=0.01, on_nonfinite=on_nonfinite)
    else:
        tx = mj.kfac(0.05, reduction_factor=1 / 8, t_cov=1, t_inv=2, damping=0.1,
                     on_nonfinite=on_nonfinite)

    def step(p, s, x, y, extra_act=None):
        return _jax_problem_step(tx, p, s, x, y, extra_act)

    return jax, jnp, tx, params, step


def _jax_problem_step(tx, p, s, x, y, extra_act=None):
    """One step of :func:`_jax_problem`'s model (Dense 4→6, tanh, Dense 6→3, squared error)."""
    jax, jnp, optax, _ = _jax()

    def forward(p, x, q):
        h_in = x
        h = jnp.tanh(h_in @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"] + q["Dense_0"])
        out = h @ p["Dense_1"]["kernel"] + q["Dense_1"]
        return out, {"Dense_0": h_in, "Dense_1": h}

    zeros = {"Dense_0": jnp.zeros((x.shape[0], 6)), "Dense_1": jnp.zeros((x.shape[0], 3))}

    def loss(p, q):
        out, acts = forward(p, x, q)
        return jnp.mean((out - y) ** 2), acts

    (_, acts), (g, go) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, zeros)
    if extra_act is not None:  # statistics from another forward than the gradients
        acts = {**acts, "Dense_0": extra_act}
    u, s = tx.update(g, s, p, activations=acts, output_grads=go)
    return optax.apply_updates(p, u), s


def _jax_batch(jnp, seed, nan=None):
    r = np.random.default_rng(seed)
    x = r.standard_normal((8, 4)).astype(np.float32)
    y = r.standard_normal((8, 3)).astype(np.float32)
    if nan == "input":
        x[1, 2] = np.nan
    if nan == "target":
        y[0, 0] = np.inf
    return jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("where", ["input", "target", "stats_only"])
@pytest.mark.parametrize("kind", ["mac", "kfac"])
def test_jax_nonfinite_step_returns_the_old_state(kind, where, jit):
    jax, jnp, tx, params, step = _jax_problem(kind)
    run = jax.jit(step) if jit else step
    state = tx.init(params)
    for s in range(2):  # count 2: a collecting step for both methods
        params, state = run(params, state, *_jax_batch(jnp, s))
    x, y = _jax_batch(jnp, 5, nan=None if where == "stats_only" else where)
    extra = None
    if where == "stats_only":
        extra = x.at[3, 0].set(jnp.nan)
    p2, s2 = run(params, state, x, y, extra)
    assert _skips(state) == [0] and _skips(s2) == [1]  # the counter of skipped steps in a row
    for a, b in zip(jax.tree.leaves((params, _skip_free(state))),
                    jax.tree.leaves((p2, _skip_free(s2)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p3, s3 = run(p2, s2, *_jax_batch(jnp, 6))  # an accepted step resets it
    assert _skips(s3) == [0] and int(s3[0].count) == int(s2[0].count) + 1


def test_jax_raise_mode():
    jax, jnp, tx, params, step = _jax_problem("mac", on_nonfinite="raise")
    state = tx.init(params)
    x, y = _jax_batch(jnp, 0, nan="input")
    with pytest.raises(FloatingPointError, match="non-finite"):
        step(params, state, x, y)
    with pytest.raises(Exception, match="non-finite gradients, statistics or updates"):
        jax.block_until_ready(jax.jit(step)(params, state, x, y))
    p, s = jax.jit(step)(params, state, *_jax_batch(jnp, 1))  # a finite step runs
    assert int(s[0].count) == 1


def test_jax_failed_inverse_skips_the_step(monkeypatch):
    """Under tracing the float64 retry cannot inspect values: a non-finite inverse makes the step
    non-finite, which is skipped — the old inverses stay and the refresh is retried next step."""
    jax, jnp, tx, params, step = _jax_problem("kfac")
    state = tx.init(params)
    for s in range(2):  # the next step (count 2) refreshes (t_inv = 2)
        params, state = step(params, state, *_jax_batch(jnp, s))
    monkeypatch.setattr(jnp.linalg, "inv", lambda x: jnp.full_like(x, jnp.nan))
    p2, s2 = jax.jit(step)(params, state, *_jax_batch(jnp, 1))
    assert _skips(s2) == [1]
    for a, b in zip(jax.tree.leaves((params, _skip_free(state))),
                    jax.tree.leaves((p2, _skip_free(s2)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_jax_skip_nonfinite_wraps_any_chain():
    jax, jnp, optax, mj = _jax()
    tx = mj.skip_nonfinite(optax.chain(mj.scale_by_mac(t_cov=1, t_inv=1, on_nonfinite=None),
                                       optax.adam(0.1)))
    params = {"d": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    state = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    acts = {"d": jnp.ones((4, 3))}
    _, s1 = tx.update(g, state, params, activations=acts)
    bad = {"d": {"kernel": jnp.full((3, 2), jnp.nan), "bias": jnp.zeros(2)}}
    u, s2 = tx.update(bad, s1, params, activations=acts)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u))
    assert _skips(s1) == [0] and _skips(s2) == [1]
    for a, b in zip(jax.tree.leaves(_skip_free(s1)), jax.tree.leaves(_skip_free(s2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        mj.skip_nonfinite(optax.sgd(0.1), on_nonfinite="ignore")
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        mj.mac(0.1, on_nonfinite="warn")


# ---- long run -----------------------------------------------------------------------------------
def _digits():
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    x = (d.images / 16.0 - 0.3).astype(np.float32)[:, None]  # [1797, 1, 8, 8]
    return torch.from_numpy(x), torch.from_numpy(d.target.astype(np.int64))


STEPS, BATCH, BAD_RATE = 2000, 32, 0.01


def _schedule():
    """2,000 clean batches; about 1% poisoned batches inserted at random places: a NaN pixel
    (NaN activations, statistics and gradients), an Inf gradient, or an overflowing loss. (A NaN
    reaching only the statistics is skipped on collecting steps only — on the others nothing
    reads it — so it is tested in the unit tests above, not here.)"""
    rng = np.random.default_rng(2024)
    clean = [rng.integers(0, 1797, BATCH) for _ in range(STEPS)]
    poisoned = []
    for idx in clean:
        if rng.random() < BAD_RATE:
            kind = ("input", "grad", "overflow")[rng.integers(3)]
            poisoned.append((rng.integers(0, 1797, BATCH), kind))
        poisoned.append((idx, None))
    return clean, poisoned


def _train_digits(model, opt, batches, data):
    xs, ys = data
    skipped = 0
    for idx, bad in batches:
        x, y = xs[idx].clone(), ys[idx]
        if bad == "input":
            x[0, 0, 4, 4] = float("nan")
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        (loss * float("inf") if bad == "overflow" else loss).backward()
        if bad == "grad":
            model.c2.weight.grad[0, 0, 0, 0] = float("-inf")
        skipped += not _stepped(opt)
    return skipped


def test_long_run_with_nan_batches_equals_the_clean_run():
    data = _digits()
    clean, poisoned = _schedule()
    n_bad = sum(b is not None for _, b in poisoned)
    assert 8 <= n_bad <= 40
    torch.manual_seed(0)
    model = SmallCNN()
    twin = copy.deepcopy(model)
    make = lambda m: mt.MAC(m, lr=0.05, momentum=0.9, damping=1.0, weight_decay=5e-4,  # noqa: E731
                            t_cov=2, t_inv=10)
    opt, topt = make(model), make(twin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        skipped = _train_digits(model, opt, poisoned, data)
    clean_skipped = _train_digits(twin, topt, [(i, None) for i in clean], data)
    assert skipped == n_bad and clean_skipped == 0
    assert opt.t == topt.t == STEPS
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.isfinite(a).all(), n
        assert torch.equal(a, b), n
    _assert_same(_snapshot(opt), _snapshot(topt))
    with torch.no_grad():
        acc = (model(data[0]).argmax(1) == data[1]).float().mean().item()
    assert acc > 0.95, acc


def test_long_run_jax_jit_with_nan_batches_equals_the_clean_run():
    jax, jnp, optax, mj = _jax()
    xs, ys = (t.numpy() for t in _digits())
    xs = xs.reshape(len(xs), -1)
    rng = np.random.default_rng(7)
    params = {
        "Dense_0": {"kernel": jnp.asarray(rng.standard_normal((64, 32)) * 0.1, jnp.float32),
                    "bias": jnp.zeros(32, jnp.float32)},
        "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((32, 10)) * 0.1, jnp.float32),
                    "bias": jnp.zeros(10, jnp.float32)},
    }
    tx = mj.mac(0.05, t_cov=2, t_inv=10, weight_decay=5e-4)

    @jax.jit
    def step(p, s, x, y):
        def loss(p):
            h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
            out = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), {
                "Dense_0": x, "Dense_1": h}

        (_, acts), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, s = tx.update(g, s, p, activations=acts)
        return optax.apply_updates(p, u), s

    steps = 400
    clean = [rng.integers(0, len(xs), BATCH) for _ in range(steps)]
    runs = []
    for poison in (False, True):
        p, s = params, tx.init(params)
        r = np.random.default_rng(3)
        for idx in clean:
            if poison and r.random() < 0.02:
                xb = xs[r.integers(0, len(xs), BATCH)].copy()
                xb[0, 5] = np.nan
                p, s = step(p, s, jnp.asarray(xb), jnp.asarray(ys[idx]))
            p, s = step(p, s, jnp.asarray(xs[idx]), jnp.asarray(ys[idx]))
        runs.append((p, s))
    assert int(runs[1][1][0].count) == steps
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- issue 16: the preconditioned update is checked too; a stuck run says so -----------------------
def _singd_repro(**kw):
    """The reproducer of issue 16: SINGD with lr_cov=10 diverges at the third step (its factors
    and then the parameters overflow)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))
    opt = mt.SINGD(model, lr=0.01, T=1, lr_cov=10.0, **kw)
    x, y = torch.randn(32, 8), torch.randn(32, 5)

    def step():
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        return _stepped(opt)

    return model, opt, step


def test_torch_singd_diverging_update_is_skipped_exactly():
    model, opt, step = _singd_repro(warn_after=3)
    taken = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(8):
            snap = _snapshot(opt)
            ok = step()
            for p in model.parameters():  # the run stays alive: parameters stay finite
                assert torch.isfinite(p).all(), f"non-finite parameters after step {i}"
            if not ok:
                _assert_same(_snapshot(opt), snap)  # skipped exactly, every time
            taken.append(ok)
    assert taken[:2] == [True, True] and not any(taken[2:]), taken
    assert opt.t == 2 and opt.preconditioner.consecutive_skips == 6
    assert opt.preconditioner.skipped_steps == 6
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sum("non-finite preconditioner or update at step 2" in m for m in msgs) == 6
    stuck = [m for m in msgs if "consecutive steps were skipped" in m]
    assert len(stuck) == 1 and "3 consecutive" in stuck[0] and "reset_after" in stuck[0]
    strict = _singd_repro(on_nonfinite="raise")
    strict[2](), strict[2]()
    snap = _snapshot(strict[1])
    with pytest.raises(FloatingPointError, match="non-finite preconditioner or update"):
        strict[2]()
    _assert_same(_snapshot(strict[1]), snap)


def _poison_layer(pre, name, value=float("inf")):
    """Every floating array of layer ``name``'s state set to ``value`` (a diverged preconditioner)."""
    layer = next(l for l in pre.layers if l.name == name)
    arrays, types = maccore.checkpoint.flatten_state(layer.state)
    bad = {k: torch.full_like(v, value) if v.is_floating_point() else v for k, v in arrays.items()}
    layer.state = maccore.checkpoint.unflatten_state(layer.state, bad, types)
    return layer


@pytest.mark.parametrize("mode", ["tikhonov", "pi", "exact"])
def test_torch_kfac_diverged_state_at_a_refresh_is_a_skipped_step(mode):
    """A layer whose running factors diverged (NaN) cannot be inverted or eigendecomposed at a
    refresh — unchecked (torch's eigh raises even then) or retried in float64: with checks on that
    is a skipped step that changes nothing, not a DecompositionError (every damping mode)."""
    torch.manual_seed(5)
    model = SmallCNN()
    opt = mt.KFAC(model, damping=0.1, t_cov=1, t_inv=1, damping_mode=mode, warn_after=None)
    for s in range(2):
        assert _good_step(model, opt, s)
    _poison_layer(opt.preconditioner, "c2", float("nan"))
    before = _snapshot(opt)
    with pytest.warns(RuntimeWarning, match=r"non-finite .* at step 2"):
        assert _good_step(model, opt, 2) is False
    _assert_same(_snapshot(opt), before)


@pytest.mark.parametrize("method", ["MAC", "KFAC", "SINGD"])
def test_torch_reset_after_restarts_a_diverged_layer(method):
    torch.manual_seed(5)
    model = SmallCNN()
    kw = dict(lr=0.05, reset_after=3, warn_after=None)
    opt = {"MAC": lambda: mt.MAC(model, t_cov=1, t_inv=4, **kw),
           "KFAC": lambda: mt.KFAC(model, damping=0.1, t_cov=1, t_inv=4, **kw),
           "SINGD": lambda: mt.SINGD(model, T=1, lr_cov=1e-3, **kw)}[method]()
    for s in range(2):
        assert _good_step(model, opt, s)
    layer = _poison_layer(opt.preconditioner, "c2")
    others = {l.name: maccore.checkpoint.flatten_state(l.state)[0] for l in opt.preconditioner.layers
              if l.name != "c2"}
    with pytest.warns(RuntimeWarning) as rec:
        results = [_good_step(model, opt, s) for s in range(2, 6)]
    assert results == [False, False, False, True], results
    assert any("reset the curvature state of layers 'c2'" in str(w.message) for w in rec)
    assert layer.updates == 1 and opt.t == 3 and opt.preconditioner.consecutive_skips == 0
    for l in opt.preconditioner.layers:
        assert all(torch.isfinite(v).all() for v in maccore.checkpoint.flatten_state(l.state)[0].values()
                   if v.is_floating_point())
    for p in model.parameters():
        assert torch.isfinite(p).all()
    # the other layers were not reset (they folded one more statistic, from the accepted step)
    for l in opt.preconditioner.layers:
        if l.name in others:
            assert l.updates == 3


# ---- issue 16: a skipped step of a preconditioner alone leaves nothing for the next optimizer -------
@pytest.mark.parametrize("make", [
    lambda m: mt.MACPreconditioner(m, t_cov=1, t_inv=1),
    lambda m: mt.KFACPreconditioner(m, damping=0.1, t_cov=1, t_inv=1),
    lambda m: mt.SINGDPreconditioner(m, T=1),
], ids=["MAC", "KFAC", "SINGD"])
def test_torch_preconditioner_skip_clears_the_gradients(make):
    torch.manual_seed(6)
    model = SmallCNN()
    pre = make(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for s in range(2):
        x, y = _digits_batch(seed=s)
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert pre.step()
        sgd.step()
    params = [p.detach().clone() for p in model.parameters()]
    bufs = [sgd.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    x, y = _digits_batch(seed=9)
    x[0, 0, 3, 3] = float("nan")
    sgd.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="non-finite gradients or statistics"):
        assert pre.step() is False
    assert all(p.grad is None for p in model.parameters())
    sgd.step()  # the usual loop goes on: SGD skips parameters without a gradient
    for p, q, b in zip(model.parameters(), params, bufs):
        assert torch.isfinite(p).all()
        assert torch.equal(p, q) and torch.equal(sgd.state[p]["momentum_buffer"], b)


def _jax_singd_repro(**kw):
    """The reproducer of issue 16 in JAX: ``singd`` with lr_cov=10 (Dense 8→16, tanh, Dense 16→5)."""
    jax, jnp, optax, mj = _jax()
    rng = np.random.default_rng(0)
    params = {"Dense_0": {"kernel": jnp.asarray(rng.standard_normal((8, 16)) * 0.3, jnp.float32),
                          "bias": jnp.zeros(16, jnp.float32)},
              "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((16, 5)) * 0.3, jnp.float32),
                          "bias": jnp.zeros(5, jnp.float32)}}
    tx = mj.singd(0.01, T=1, lr_cov=10.0, **kw)
    x = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((32, 5)), jnp.float32)

    @jax.jit
    def step(p, s):
        zeros = {"Dense_0": jnp.zeros((32, 16)), "Dense_1": jnp.zeros((32, 5))}

        def loss(p, q):
            h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"] + q["Dense_0"])
            out = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] + q["Dense_1"]
            return jnp.mean((out - y) ** 2), {"Dense_0": x, "Dense_1": h}

        (_, acts), (g, go) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, zeros)
        u, s = tx.update(g, s, p, activations=acts, output_grads=go)
        return optax.apply_updates(p, u), s

    return jax, mj, params, tx, step


def test_jax_singd_stuck_run_is_visible_in_the_state():
    jax, mj, params, tx, step = _jax_singd_repro()
    state = tx.init(params)
    counts, skips = [], []
    for i in range(6):
        p2, s2 = step(params, state)
        c = mj.transform.curvature_states(s2)[0]
        counts.append(int(c.count))
        skips.append(int(c.consecutive_skips))
        if counts[-1] == (counts[-2] if i else 0):  # skipped: everything else bit for bit
            for a, b in zip(jax.tree.leaves((params, _skip_free(state))),
                            jax.tree.leaves((p2, _skip_free(s2)))):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for leaf in jax.tree.leaves(p2):
            assert np.isfinite(np.asarray(leaf)).all()
        params, state = p2, s2
    assert counts == [1, 2, 2, 2, 2, 2] and skips == [0, 0, 1, 2, 3, 4], (counts, skips)


def test_jax_reset_after_restarts_a_diverged_layer():
    jax, jnp, tx, params, step = _jax_problem("kfac")
    _, _, _, mj = _jax()
    tx = mj.kfac(0.05, reduction_factor=1 / 8, t_cov=1, t_inv=3, damping=0.1, reset_after=2)
    jax_step = jax.jit(lambda p, s, x, y: _jax_problem_step(tx, p, s, x, y))
    state = tx.init(params)
    for s in range(2):
        params, state = jax_step(params, state, *_jax_batch(jnp, s))

    def poison(c):
        bad = jax.tree.map(lambda a: jnp.full_like(a, jnp.inf) if a.dtype == jnp.float32 else a,
                           c.layers["Dense_1"])
        return c._replace(layers={**c.layers, "Dense_1": bad})

    state = mj.transform.map_curvature_states(poison, state)
    d0 = jax.tree.map(np.asarray, mj.transform.curvature_states(state)[0].layers["Dense_0"])
    counts = []
    for s in range(2, 6):
        params, state = jax_step(params, state, *_jax_batch(jnp, s))
        c = mj.transform.curvature_states(state)[0]
        counts.append((int(c.count), int(c.consecutive_skips), bool(c.nonfinite_layers["Dense_1"]),
                       bool(c.nonfinite_layers["Dense_0"])))
    # skipped twice (Dense_1 blamed, Dense_0 not), then Dense_1 restarts from init: accepted
    assert counts[:3] == [(2, 1, True, False), (2, 2, True, False), (3, 0, False, False)], counts
    c = mj.transform.curvature_states(state)[0]
    for leaf in jax.tree.leaves((params, c.layers)):
        assert np.isfinite(np.asarray(leaf)).all()
    assert int(c.layers["Dense_1"].a.count) == 2  # restarted: the folds after the reset only
    assert int(c.layers["Dense_0"].a.count) == int(d0.a.count) + 2
