"""The checked optimizer step of the torch adapter (``on_nonfinite="skip"``/``"raise"``) writes the
momentum update in place when a magnitude bound proves it finite, and otherwise decides out of
place. Both paths must give the step of ``on_nonfinite=None`` bit for bit, and a step whose update
would overflow must be skipped exactly (parameters, momenta, curvature state, counters unchanged).
"""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("torch")

from tests.adapters import torch_helpers  # noqa: E402,F401  (adapter import path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import maccore_torch as mt  # noqa: E402
from maccore_torch import numerics  # noqa: E402
from maccore_torch import optimizer as opt_mod  # noqa: E402
from maccore import engine as maccore_engine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 300), nn.Tanh(), nn.Linear(300, 400), nn.Tanh(),
                         nn.Linear(400, 3)).to(dtype)


def _state(opt):
    """Everything a step may change (parameters, per-layer states, counters, momenta)."""
    from tests.test_reliability_nonfinite import _snapshot

    return _snapshot(opt)


def _equal(a, b):
    assert a[0] == b[0]
    for name in a[1]:
        assert a[1][name][1] == b[1][name][1]
        for k, v in a[1][name][0].items():
            assert torch.equal(v, b[1][name][0][k]), f"{name}/{k}"
    for x, y in zip(a[2] + a[3], b[2] + b[3]):
        if x is None or y is None:
            assert x is None and y is None
        else:  # equal bit for bit (NaN where the other has NaN)
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def _groups(model, kw):
    """Two param groups (the last layer in its own, with its own hyper-parameters)."""
    *rest, last = list(model.parameters())[:-2], list(model.parameters())[-2:]
    return [{"params": rest[0]}, {"params": last, "lr": kw["lr"] / 2, "momentum": 0.5}]


@pytest.mark.parametrize("method", ["MAC", "SMAC", "KFAC", "SINGD"])
@pytest.mark.parametrize("variant", ["coupled", "decoupled", "nesterov", "groups"])
def test_checked_step_equals_unchecked_step_bit_for_bit(method, variant):
    """``"skip"`` (in place after the bound, or out of place) == ``None`` (no checks), 7 steps
    across the statistics and refresh periods, for every update rule."""
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    rule = {"decoupled": {"weight_decay_mode": "decoupled"},
            "nesterov": {"nesterov": True}}.get(variant, {})  # per param group (SINGD's too)
    x, y = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
    runs = []
    for checked, bounded in ((None, True), ("skip", True), ("skip", False)):
        model = _model()
        params = (_groups(model, kw) if variant == "groups"
                  else [{"params": list(model.parameters()), **rule}])
        make = {"MAC": lambda: mt.MAC(model, params=params, t_cov=2, t_inv=3, **kw),
                "SMAC": lambda: mt.MAC(model, params=params, diagonal=True, t_cov=2, t_inv=3, **kw),
                "KFAC": lambda: mt.KFAC(model, params=params, t_cov=2, t_inv=3, **kw),
                "SINGD": lambda: mt.SINGD(model, params=params, T=2, **kw)}[method]
        opt = make()
        opt.preconditioner.on_nonfinite = checked
        taken = []
        if not bounded:  # force the out-of-place path
            opt._bounded_step = lambda *args: False
        for _ in range(7):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if bounded and checked is not None:
                assert opt._bounded_step([]), "the bound should hold for an ordinary step"
            opt.step()
            taken.append(opt.t)
        assert taken == list(range(1, 8))
        runs.append(_state(opt))
    _equal(runs[0], runs[1])
    _equal(runs[0], runs[2])


def _hand_step(model, opt, grads):
    """One step with gradients set by hand (no forward: no statistics)."""
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = opt.t
        opt.step()
    return opt.t == t + 1, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_an_overflowing_update_is_skipped_exactly(dtype):
    """Finite gradients, parameters and momenta whose update overflows (p − ηĝ beyond the dtype's
    range): the bound fails, the out-of-place path finds the overflow and skips exactly."""
    model = _model(dtype=dtype)
    opt = mt.MAC(model, lr=1.0, momentum=0.0, weight_decay=0.0, t_cov=100, t_inv=100)
    big = torch.finfo(dtype).max
    with torch.no_grad():
        model[0].weight[0, 0] = big * 0.75
    grads = [torch.zeros_like(p) for p in model.parameters()]
    grads[0][0, 0] = -big * 0.75  # â = 0 before any statistics: ĝ = G (finite), p − ĝ = 1.5·max
    before = _state(opt)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    assert not opt._bounded_step([])
    ok, msgs = _hand_step(model, opt, grads)
    assert not ok and any("non-finite preconditioner or update" in m for m in msgs), msgs
    _equal(_state(opt), before)
    # the same magnitudes with an update that stays in range: taken, by the out-of-place path
    grads[0][0, 0] = big * 0.5
    ok, msgs = _hand_step(model, opt, grads)
    assert ok and not msgs
    assert model[0].weight[0, 0].item() == pytest.approx(float(big) * 0.25, rel=1e-2)


@pytest.mark.parametrize("bad", ["nan_param", "inf_momentum", "nan_grad_unpreconditioned"])
def test_non_finite_parameters_or_momenta_fail_the_bound(bad):
    """A non-finite parameter, momentum buffer or raw gradient of a parameter outside the
    preconditioned layers makes the bound fail (M is NaN/Inf): the step is decided exactly."""
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    opt = mt.MAC(model, lr=0.1)
    x, y = torch.randn(8, 4), torch.arange(8) % 2
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    norm = model[1]
    with torch.no_grad():
        if bad == "nan_param":
            norm.weight[0] = float("nan")
        elif bad == "inf_momentum":
            opt.state[norm.weight]["momentum_buffer"][1] = float("inf")
        else:
            norm.bias.grad[0] = float("nan")
    assert not opt._bounded_step([])
    before = _state(opt)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    _equal(_state(opt), before)


def _peak(group):
    """The peak of ``_bounds`` relative to M when M bounds |ĝ|, |p| and |b| alike."""
    return opt_mod._bounds(group, 1.0, 1.0, 1.0)[0]


def test_growth_bounds_every_intermediate():
    """``_bounds`` with g = p = b = 1 bounds |ĝ'|, |b'|, |d| and |p'| relative to M for each rule (worked values)."""
    base = dict(lr=0.1, momentum=0.9, weight_decay=0.5, nesterov=False, weight_decay_mode="coupled")
    # coupled: ĝ' ≤ 1.5M, b' ≤ 0.9M + 1.5M = 2.4M, p' ≤ M + 0.1·2.4M = 1.24M  -> 2.4
    assert _peak(base) == pytest.approx(2.4)
    # nesterov: d ≤ 1.5 + 0.9·2.4 = 3.66; p' ≤ 1 + 0.366 -> 3.66
    assert _peak({**base, "nesterov": True}) == pytest.approx(3.66)
    # a large learning rate: p' ≤ M + 10·2.4M = 25M
    assert _peak({**base, "lr": 10.0}) == pytest.approx(25.0)
    # decoupled: ĝ' = ĝ, b' ≤ 1.9M; |1 − 10·0.5| = 4 -> p' ≤ 4M + 10·1.9M = 23M
    assert _peak({**base, "lr": 10.0, "weight_decay_mode": "decoupled"}) == pytest.approx(23.0)


def test_max_abs_per_dtype_with_nan_and_inf():
    """``_max_abs``: the exact largest magnitude per dtype, tiny tensors pooled, larger ones
    reduced where they live (empty ones ignored); NaN and Inf reported."""
    small = [torch.tensor([1.0, -3.0]), torch.tensor([2.5])]
    large = torch.zeros(numerics._TINY + 1)
    large[7] = -4.5
    d64 = torch.tensor([-7.0], dtype=torch.float64)
    got = opt_mod._max_abs(small + [large, d64, torch.zeros(0)])
    assert opt_mod._max_abs([torch.zeros(0)]) == {}
    assert got == {(torch.device("cpu"), torch.float32): 4.5, (torch.device("cpu"), torch.float64): 7.0}
    large[3] = float("nan")
    assert opt_mod._max_abs([large] + small)[(torch.device("cpu"), torch.float32)] != \
        opt_mod._max_abs([large] + small)[(torch.device("cpu"), torch.float32)]  # NaN
    small[0][0] = float("-inf")
    assert opt_mod._max_abs(small)[(torch.device("cpu"), torch.float32)] == float("inf")


def _oracle_update(rule, first, p, g, b, lr, mu, wd):
    """The update rule of ``CurvatureOptimizer`` in float64 (docstring): (new p, new b)."""
    p, g = p.double(), g.double()
    coupled = rule != "decoupled"
    g1 = g + wd * p if coupled else g
    b1 = g1 if first else mu * b.double() + g1
    d = (g1 if first else g1 + mu * b1) if rule == "nesterov" else b1
    keep = 1.0 if coupled else 1.0 - lr * wd
    return keep * p - lr * d, b1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rule", ["coupled", "decoupled", "nesterov"])
@pytest.mark.parametrize("first", [True, False])
def test_momentum_update_matches_float64_oracle(dtype, rule, first, monkeypatch):
    """``_momentum_update`` against the rule in float64, tolerance from the dtype; float32/float64
    take torch's fused SGD kernel (except Nesterov's first step, whose d = ĝ' is not torch's),
    bfloat16 the ``_foreach_*`` ops (the fused CPU kernel is wrong in bfloat16)."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(40, 33), (33,), (5,)]  # vectorised bodies and scalar tails
    ps = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    gs = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    olds = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    lr, mu, wd = 0.3, 0.9, 0.2
    want = [_oracle_update(rule, first, p, g, b, lr, mu, wd) for p, g, b in zip(ps, gs, olds)]
    group = dict(lr=lr, momentum=mu, weight_decay=wd, nesterov=rule == "nesterov",
                 weight_decay_mode="decoupled" if rule == "decoupled" else "coupled")
    calls = []
    real = torch._fused_sgd_
    monkeypatch.setattr(torch, "_fused_sgd_", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    gs0 = [g.clone() for g in gs]
    bufs = [torch.full_like(g, float("nan")) for g in gs] if first else [b.clone() for b in olds]
    got_p = [p.clone() for p in ps]
    opt_mod._momentum_update(group, got_p, gs, bufs, [0, 1, 2] if first else [])
    eps = torch.finfo(dtype).eps
    for (wp, wb), p, b in zip(want, got_p, bufs):
        torch.testing.assert_close(p.double(), wp, rtol=16 * eps, atol=16 * eps)
        torch.testing.assert_close(b.double(), wb, rtol=16 * eps, atol=16 * eps)
    for g, g0 in zip(gs, gs0):  # the gradients are only read
        assert torch.equal(g, g0)
    fused = dtype != torch.bfloat16 and not (rule == "nesterov" and first)
    assert len(calls) == (1 if fused else 0)
    if calls:
        assert calls[0]["weight_decay"] == (0.0 if rule == "decoupled" else wd)
        assert calls[0]["is_first_step"] is first


def test_momentum_update_mixed_first_and_later_buffers():
    """One group with a parameter on its first step beside ones with momentum: both kernels
    (fused calls per first/later, the ops for the rest) give the float64 rule."""
    gen = torch.Generator().manual_seed(4)
    ps = [torch.randn(7, 9, generator=gen), torch.randn(9, generator=gen, dtype=torch.float64),
          torch.randn(9, generator=gen).bfloat16()]
    gs = [torch.randn_like(p, dtype=torch.float32).to(p.dtype) for p in ps]
    olds = [torch.randn_like(p, dtype=torch.float32).to(p.dtype) for p in ps]
    group = dict(lr=0.1, momentum=0.8, weight_decay=0.1, nesterov=True, weight_decay_mode="coupled")
    bufs = [torch.empty_like(olds[0]), olds[1].clone(), olds[2].clone()]
    got = [p.clone() for p in ps]
    opt_mod._momentum_update(group, got, gs, bufs, [0])
    for i, (p, g, b) in enumerate(zip(ps, gs, olds)):
        wp, wb = _oracle_update("nesterov", i == 0, p, g, b, 0.1, 0.8, 0.1)
        eps = torch.finfo(p.dtype).eps
        torch.testing.assert_close(got[i].double(), wp, rtol=16 * eps, atol=16 * eps)
        torch.testing.assert_close(bufs[i].double(), wb, rtol=16 * eps, atol=16 * eps)


def test_bounds_worked_values():
    """``_bounds(group, g, p, b)`` = (peak, p', b') by the triangle inequality per rule."""
    base = dict(lr=0.1, momentum=0.9, weight_decay=0.5, nesterov=False, weight_decay_mode="coupled")
    # ĝ' ≤ 2 + 0.5·3 = 3.5, b' ≤ 0.9·5 + 3.5 = 8, p' ≤ 3 + 0.1·8 = 3.8
    assert opt_mod._bounds(base, 2.0, 3.0, 5.0) == pytest.approx((8.0, 3.8, 8.0))
    # Nesterov: d ≤ 3.5 + 0.9·8 = 10.7, p' ≤ 3 + 1.07
    assert opt_mod._bounds({**base, "nesterov": True}, 2.0, 3.0, 5.0) == pytest.approx((10.7, 4.07, 8.0))
    # decoupled, η = 10: ĝ' = ĝ ≤ 2, b' ≤ 6.5, |1 − 5|·3 = 12, p' ≤ 12 + 65 = 77
    dec = {**base, "lr": 10.0, "weight_decay_mode": "decoupled"}
    assert opt_mod._bounds(dec, 2.0, 3.0, 5.0) == pytest.approx((77.0, 77.0, 6.5))


def _held(opt):
    """Measured max |p| and max |b| per (device, dtype)."""
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            b = opt.state[p].get("momentum_buffer") if p in opt.state else None
            key = (p.device, p.dtype)
            mp, mb = out.get(key, (0.0, 0.0))
            out[key] = (max(mp, p.abs().max().item()),
                        mb if b is None else max(mb, b.abs().max().item()))
    return out


@pytest.mark.parametrize("variant", ["coupled", "decoupled", "nesterov", "groups"])
def test_tracked_bounds_hold_and_spare_the_parameter_pass(variant, monkeypatch):
    """Between two measurements the bounds carried through each update bound the real |p| and
    |b| (large learning rate: they grow every step), the steps read only the gradients and
    states, and P and B are measured again after ``_REMEASURE`` steps, after an in-place write
    to a parameter and after a momentum buffer is replaced."""
    monkeypatch.setattr(opt_mod, "_REMEASURE", 5)
    kw = dict(lr=0.5, momentum=0.9, weight_decay=0.1)
    rule = {"decoupled": {"weight_decay_mode": "decoupled"}, "nesterov": {"nesterov": True}}.get(variant, {})
    model = _model()
    params = (_groups(model, kw) if variant == "groups"
              else [{"params": list(model.parameters()), **rule}])
    opt = mt.MAC(model, params=params, t_cov=2, t_inv=3, **kw)
    x, y = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
    n_params = len(list(model.parameters()))
    ids = {id(p) for p in model.parameters()}
    read = []
    real = opt_mod._max_abs
    monkeypatch.setattr(opt_mod, "_max_abs", lambda ts: (read.append(list(ts)), real(ts))[1])

    def step():
        read.clear()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pb = [ts for ts in read if any(id(t) in ids for t in ts)]  # the p/b measurement, if any
        return len(pb[0]) if pb else None

    measured = [step() for _ in range(12)]
    # measured at step 1 and then every 5 steps (the buffers step 1 created are seen as its writes)
    assert [m is not None for m in measured] == [i % 5 == 0 for i in range(12)]
    assert measured[0] == n_params and measured[5] == 2 * n_params  # parameters (and buffers)
    for key, (p, b) in _held(opt).items():
        bp, bb = opt._track[1][key]
        assert p <= bp and b <= bb
        assert bp < 1e3 * max(p, 1.0)  # a bound, not a blow-up
    with torch.no_grad():
        model[0].weight[0, 0] = 1.0  # an in-place write: seen
    assert step() is not None
    buf = opt.state[model[2].weight]
    buf["momentum_buffer"] = buf["momentum_buffer"].clone()  # a replaced buffer: seen
    assert step() is not None
    assert step() is None


@pytest.mark.parametrize("layout", ["channels_last_param", "channels_last_all", "strided_view"])
def test_momentum_update_layouts(layout, monkeypatch):
    """The fused kernel pairs the elements of the three buffers by position: a channels-last
    parameter with a contiguous momentum buffer (e.g. one loaded from a checkpoint) or a
    non-contiguous parameter takes the ``_foreach_*`` ops; three channels-last tensors take the
    kernel; every case gives the float64 rule."""
    gen = torch.Generator().manual_seed(5)
    if layout == "strided_view":
        p = torch.randn(6, 8, generator=gen)[:, ::2]
        g, b = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    else:
        cl = torch.channels_last
        p = torch.randn(4, 3, 5, 5, generator=gen).to(memory_format=cl)
        g = torch.randn(4, 3, 5, 5, generator=gen).to(memory_format=cl)
        b = torch.randn(4, 3, 5, 5, generator=gen)
        if layout == "channels_last_all":
            b = b.to(memory_format=cl)
    want = _oracle_update("coupled", False, p, g, b, 0.1, 0.9, 0.1)
    calls = []
    real = torch._fused_sgd_
    monkeypatch.setattr(torch, "_fused_sgd_", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    group = dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=False, weight_decay_mode="coupled")
    opt_mod._momentum_update(group, [p], [g], [b], [])
    assert len(calls) == (1 if layout == "channels_last_all" else 0)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(p.double(), want[0], rtol=16 * eps, atol=16 * eps)
    torch.testing.assert_close(b.double(), want[1], rtol=16 * eps, atol=16 * eps)


def test_mac_gain_bound_spares_the_gradient_pass(monkeypatch):
    """MAC: on a step that changes no state, the raw gradients' magnitudes (read by the step's
    first check) times the layers' gain bound replace reading the preconditioned gradients, so
    the checked step reads nothing more; the bound holds for the gradients it replaces; a state
    that was never seen finite (here: put in place by hand, as a load would) is read through its
    gradients first, and a NaN there is skipped exactly."""
    monkeypatch.setattr(opt_mod, "_REMEASURE", 10**6)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.LayerNorm(20), nn.Linear(20, 3))
    opt = mt.MAC(model, lr=0.05, momentum=0.9, weight_decay=1e-2, t_cov=3, t_inv=3)
    pre = opt.preconditioner
    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(2)), torch.arange(16) % 3
    reads, raws = [], []
    real_max, real_prepare = opt_mod._max_abs, pre._prepare
    monkeypatch.setattr(opt_mod, "_max_abs", lambda ts: (reads.append(len(ts)), real_max(ts))[1])

    def prepare(check, measure=False):
        pending = real_prepare(check, measure)
        raws.append(None if pending is None else dict(pending.raw))
        return pending

    monkeypatch.setattr(pre, "_prepare", prepare)

    def step():
        reads.clear()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return list(reads)

    seen = [step() for _ in range(7)]
    # steps 1, 4, 7 collect statistics and refresh (t_cov = t_inv = 3): new states are read;
    # step 1 also measures p and b; steps 2, 3, 5, 6 read nothing
    assert [bool(r) for r in seen] == [True, False, False, True, False, False, True]
    key = (torch.device("cpu"), torch.float32)
    kappa = max(maccore_engine.apply_gain_bound(pre.curvature, l.spec, l.state) for l in pre.layers)
    for p in model.parameters():  # .grad holds ĝ after the step: within the bound used
        assert p.grad.abs().max().item() <= raws[-1][key] * kappa
    layer = pre.layers[1]
    layer.state = layer.state._replace(mean_hat=torch.full_like(layer.state.mean_hat, float("nan")))
    params = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    t = opt.t
    with pytest.warns(RuntimeWarning, match="non-finite preconditioner or update"):
        assert step()  # read: a state not seen finite
    assert opt.t == t
    for p, v, b in zip(model.parameters(), params, bufs):
        assert torch.equal(p, v) and torch.equal(opt.state[p]["momentum_buffer"], b)


def test_mac_gain_bound_catches_what_the_raw_magnitudes_alone_would_miss():
    """Raw gradients of magnitude max/20 (below the in-place limit max/16) whose preconditioned
    gradient overflows (v = G̃â with ‖â‖₁ = 64): the gain bound sends the step to the exact
    path, which skips it; an in-place write of a trusted â is read again (its version)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 2, bias=False))
    opt = mt.MAC(model, lr=1.0, momentum=0.0, weight_decay=0.0, t_cov=1000, t_inv=1000)
    layer = opt.preconditioner.layers[0]
    assert _hand_step(model, opt, [torch.ones(2, 64)]) == (True, [])  # step 0 refreshes â
    layer.state = layer.state._replace(mean_hat=torch.ones(64))
    ok, msgs = _hand_step(model, opt, [torch.ones(2, 64)])
    assert ok and not msgs and opt._finite[id(layer)][0] is layer.state.mean_hat  # read once
    big = torch.full((2, 64), torch.finfo(torch.float32).max / 20)
    before = [p.detach().clone() for p in model.parameters()]
    ok, msgs = _hand_step(model, opt, [big])
    assert not ok and any("non-finite preconditioner or update" in m for m in msgs), msgs
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with torch.no_grad():
        layer.state.mean_hat[0] = float("nan")  # in place: no longer known finite
    ok, msgs = _hand_step(model, opt, [torch.ones(2, 64)])
    assert not ok and any("non-finite preconditioner or update" in m for m in msgs), msgs
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
