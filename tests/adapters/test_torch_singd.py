"""maccore_torch.SINGD: adapter == core applied to independently computed rows (Linear + Conv2d,
T > 1, structures, IKFAC, reduce), the §5.3 update with weight decay after preconditioning,
gradient accumulation, GradScaler, state_dict round trip and bfloat16 factors."""

from __future__ import annotations

import io

import pytest

from tests.adapters.torch_helpers import Capture, grad_mat_of, grad_rows_of, params_of, rows_of

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import maccore  # noqa: E402
import maccore_torch as mt  # noqa: E402
from maccore_torch.singd import SINGD, SINGDPreconditioner  # noqa: E402

DT = torch.float64
N = 6


class Net(nn.Module):
    def __init__(self, dtype=DT):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 4)
        self.head = nn.Linear(4, 3, bias=False)
        self.to(dtype)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc(h)))


def batches(steps, dtype=DT, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, 2, 4, 4, generator=g, dtype=dtype) + 0.2,
             torch.randint(0, 3, (N,), generator=g)) for _ in range(steps)]


def _ref_rows(mod, x, g, reduce):
    """Independent (rows, grad_rows) of one layer; ``reduce``: mean input / summed gradient rows."""
    r, gr = rows_of(mod, x), grad_rows_of(mod, g)
    if reduce and isinstance(mod, nn.Conv2d):
        r = r.reshape(N, -1, r.shape[1]).mean(1)
        gr = g.sum((2, 3))
    return r, gr


def reference_run(model, data, *, lr, momentum, weight_decay, T, lr_cov, reduce=False, **core_kw):
    """SINGD from the core alone: rows from plain hooks, R = 1/N (batch-averaged loss)."""
    pc = maccore.singd(**core_kw)
    mods = [model.conv, model.fc, model.head]
    cap = Capture(mods)
    states = {id(m): pc.init(m.weight[0].numel() + (m.bias is not None), m.weight.shape[0], xp=torch, dtype=DT)
              for m in mods}
    bufs = {}
    for t, (x, y) in enumerate(data):
        cap.clear()
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for m in mods:
                if t % T == 0:
                    r, gr = _ref_rows(m, cap.inputs(m)[0], cap.grads[id(m)][0], reduce)
                    beta = lr_cov(t) if callable(lr_cov) else lr_cov
                    states[id(m)] = pc.update(states[id(m)], r, gr, reduction_factor=1.0 / N, lr_cov=beta)
                nat = pc.apply(states[id(m)], grad_mat_of(m))
                w = m.weight.reshape(m.weight.shape[0], -1)
                wt = torch.cat([w, m.bias[:, None]], 1) if m.bias is not None else w
                d = nat + weight_decay * wt  # weight decay AFTER preconditioning (§5.3)
                b = bufs[id(m)] = momentum * bufs.get(id(m), torch.zeros_like(d)) + d
                new = wt - lr * b
                m.weight.copy_(new[:, : w.shape[1]].reshape(m.weight.shape))
                if m.bias is not None:
                    m.bias.copy_(new[:, -1])
    cap.remove()
    return states


CASES = {
    "dense": dict(structures=("dense", "dense"), alpha1=0.5),
    "diag_toeplitz_normalized": dict(structures=("diagonal", "triltoeplitz"), alpha1=0.3,
                                     normalize_lr_cov=True),
    "ikfac_block_reduce": dict(structures=("block2diagonal", "dense"), alpha1=0.0, kfac_like=True,
                               reduce=True),
    "hierarchical": dict(structures=("hierarchical3_2", "triutoeplitz"), alpha1=0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_equals_core_on_independent_rows(case):
    kw = dict(CASES[case])
    reduce = kw.pop("reduce", False)
    hp = dict(lr=0.1, momentum=0.8, weight_decay=0.03, T=2, damping=0.05)
    lr_cov = (lambda t: 0.05 / (1 + t)) if case == "dense" else 0.1
    torch.manual_seed(3)
    ref_model, model = Net(), Net()
    model.load_state_dict(ref_model.state_dict())
    data = batches(5)
    ref = reference_run(ref_model, data, lr_cov=lr_cov, reduce=reduce, lr=hp["lr"], momentum=hp["momentum"],
                        weight_decay=hp["weight_decay"], T=hp["T"], damping=hp["damping"], **kw)
    opt = SINGD(model, lr_cov=lr_cov, kfac_approx="reduce" if reduce else "expand", **hp, **kw)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.t == 5
    for name, m in (("conv", ref_model.conv), ("fc", ref_model.fc), ("head", ref_model.head)):
        st, st_ref = opt.preconditioner.states()[name], ref[id(m)]
        for a, b in zip(st.K, st_ref.K):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(st.C, st_ref.C):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(params_of(model), params_of(ref_model)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_statistics_only_on_update_steps_and_identity_start():
    """T = 3: factors change at t = 0, 3 only; before any statistic the gradient passes unchanged."""
    torch.manual_seed(0)
    model = Net()
    pre = SINGDPreconditioner(model, T=3, lr_cov=0.1, damping=0.1)
    snap = []
    for t, (x, y) in enumerate(batches(5)):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        snap.append(pre.states()["fc"].K.mat.clone())
    assert not torch.equal(snap[0], torch.eye(13, dtype=DT))
    assert torch.equal(snap[0], snap[1]) and torch.equal(snap[1], snap[2])
    assert not torch.equal(snap[2], snap[3]) and torch.equal(snap[3], snap[4])


def test_gradient_accumulation_equals_one_batch():
    torch.manual_seed(1)
    m1, m2 = Net(), Net()
    m2.load_state_dict(m1.state_dict())
    o1, o2 = SINGD(m1, lr=0.1, T=1, lr_cov=0.1), SINGD(m2, lr=0.1, T=1, lr_cov=0.1)
    for x, y in batches(3):
        o1.zero_grad()
        F.cross_entropy(m1(x), y).backward()
        o1.step()
        o2.zero_grad()
        for sl in (slice(0, 2), slice(2, N)):  # unequal micro-batches, mean-loss accumulation
            (F.cross_entropy(m2(x[sl]), y[sl]) * (sl.stop - sl.start) / N).backward()
        o2.step()
    for a, b in zip(params_of(m1), params_of(m2)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_grad_scaler_gives_the_unscaled_result():
    torch.manual_seed(2)
    m1, m2 = Net(torch.float32), Net(torch.float32)
    m2.load_state_dict(m1.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    o1 = SINGD(m1, lr=0.1, T=1, lr_cov=0.1)
    o2 = SINGD(m2, lr=0.1, T=1, lr_cov=0.1, grad_scaler=scaler, init_grad_scale=2.0**12)
    for x, y in batches(3, torch.float32):
        o1.zero_grad()
        F.cross_entropy(m1(x), y).backward()
        o1.step()
        o2.zero_grad()
        scaler.scale(F.cross_entropy(m2(x), y)).backward()
        scaler.step(o2)
        scaler.update()
    assert o2.t == 3
    for a, b in zip(params_of(m1), params_of(m2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(4)
    data = batches(7)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01, T=2, lr_cov=0.1, alpha1=0.5,
              structures=("dense", "diagonal"))
    m1 = Net()
    o1 = SINGD(m1, **kw)

    def step(m, o, x, y):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()

    for x, y in data[:3]:
        step(m1, o1, x, y)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    m2 = Net()
    o2 = SINGD(m2, **kw)
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["opt"])
    assert o2.t == 3
    for x, y in data[3:]:
        step(m1, o1, x, y)
        step(m2, o2, x, y)
    for a, b in zip(params_of(m1), params_of(m2)):
        assert torch.equal(a, b)
    for n, st in o1.preconditioner.states().items():
        st2 = o2.preconditioner.states()[n]
        for f in ("K", "C", "m_K", "m_C"):
            for a, b in zip(getattr(st, f), getattr(st2, f)):
                assert torch.equal(a, b)


def test_bfloat16_factors_stay_finite_and_track_float32():
    torch.manual_seed(5)
    m32, m16 = Net(torch.float32), Net(torch.float32)
    m16.load_state_dict(m32.state_dict())
    start = params_of(m32)
    kw = dict(lr=0.05, T=1, lr_cov=0.05, damping=1e-3, structures=("dense", "dense"))
    o32 = SINGD(m32, **kw)
    o16 = SINGD(m16, preconditioner_dtype=(torch.bfloat16, torch.bfloat16), **kw)
    for x, y in batches(20, torch.float32):
        for m, o in ((m32, o32), (m16, o16)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            assert o.step() is None
    assert o16.t == 20
    for name, st in o16.preconditioner.states().items():
        for f in ("K", "C", "m_K", "m_C"):
            for p in getattr(st, f):
                assert p.dtype == torch.bfloat16 and bool(torch.isfinite(p).all()), (name, f)
        st32 = o32.preconditioner.states()[name]
        torch.testing.assert_close(st.K.mat.float(), st32.K.mat, rtol=0.05, atol=0.05)
    for p in m16.parameters():
        assert p.dtype == torch.float32 and bool(torch.isfinite(p).all())
    for a, b, c in zip(params_of(m16), params_of(m32), start):  # bf16 rounding drifts, boundedly
        assert float((a - b).norm()) < 0.5 * float((b - c).norm())


def test_kfac_like_warns_and_drops_momentum():
    with pytest.warns(UserWarning, match="alpha1"):
        opt = SINGD(Net(), kfac_like=True, alpha1=0.5)
    st = opt.preconditioner.states()["fc"]
    assert st.m_K is None and st.m_C is None


def test_exported_and_report():
    assert mt.SINGD is SINGD and mt.SINGDPreconditioner is SINGDPreconditioner
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="not in a supported layer"):
        opt = SINGD(model)
    rep = opt.report()
    assert "SINGD expand" in rep and "none (raw gradient)" in rep


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_average"):
        SINGD(Net(), loss_average="mean")
    with pytest.raises(ValueError, match="lr_cov"):
        SINGD(Net(), lr_cov=-1.0)
    with pytest.raises(ValueError, match="structure"):
        SINGD(Net(), structures=("nope", "dense"))
    with pytest.raises(ValueError, match="T"):
        SINGD(Net(), T=0)
