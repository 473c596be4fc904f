"""maccore_torch.KFAC / KFACPreconditioner: factors == exact GGN blocks in the exact cases
(docs/math.md P-K2/P-K3/P-K4), adapter == core, loss-reduction scaling, accumulation, checkpoints."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

from tests.adapters.torch_helpers import (
    Capture,
    assert_params_close,
    grad_mat_of,
    grad_rows_of,
    params_of,
    rows_of,
)

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import maccore  # noqa: E402
import maccore_torch as mt  # noqa: E402
from maccore import verify  # noqa: E402

DT = torch.float64


class DeepLinear(nn.Module):
    """Token-wise deep linear net; ``pool="mean"`` averages the outputs over the shared axis."""

    def __init__(self, weights, biases, pool=None):
        super().__init__()
        self.layers = nn.ModuleList()
        for w, b in zip(weights, biases):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None).to(DT)
            with torch.no_grad():
                lin.weight.copy_(torch.as_tensor(w))
                if b is not None:
                    lin.bias.copy_(torch.as_tensor(b))
            self.layers.append(lin)
        self.pool = pool

    def forward(self, x):
        for lin in self.layers:
            x = lin(x)
        return x.mean(1) if self.pool == "mean" else x


@pytest.mark.parametrize("setting", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_factors_equal_exact_ggn_deep_linear(setting, reduction):
    """Type-II KFAC from the adapter's hooks equals the exact GGN block of every layer."""
    rng = np.random.default_rng(0)
    dims = [5, 4, 6, 3]
    weights = [rng.standard_normal((dims[i + 1], dims[i])) for i in range(3)]
    biases = [rng.standard_normal(dims[1]), None, rng.standard_normal(dims[3])]
    n, s = 4, 3
    x = rng.standard_normal((n, s, dims[0]))
    y = rng.standard_normal((n, s if setting == "expand" else 1, dims[3]))
    case = verify.MLPCase(weights, biases, x, y, loss="mse", reduction=reduction, setting=setting, pool="mean")
    R = verify.reduction_factor(case)
    model = DeepLinear(weights, biases, pool="mean" if setting == "reduce" else None)
    pre = mt.KFACPreconditioner(model, t_cov=1, t_inv=1, stat_decay=0.5, kfac_approx=setting,
                                reduction_factor=R)
    xt = torch.as_tensor(x)
    for k in range(dims[3]):  # backpropagate the columns of the loss Hessian's factor (Λ = I)
        (R * model(xt)[..., k].sum()).backward()
    pre.step()
    factors = pre.factors()
    for i in range(3):
        A, G = factors[f"layers.{i}"]
        verify.assert_close(maccore.kfac_dense(A, G), verify.ggn_block(case, i), rtol=1e-9, atol=1e-11,
                            what=f"{setting}/{reduction} layer {i}")


def test_factors_equal_exact_ggn_conv_expand():
    """Conv2d → per-location linear (1×1 conv), per-location MSE: KFAC-expand is exact (P-K3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 1)).to(DT)
    x = torch.randn(2, 2, 4, 4, dtype=DT)
    R = 2.0  # MSELoss(reduction="sum")
    pre = mt.KFACPreconditioner(model, t_cov=1, t_inv=1, stat_decay=0.5, reduction_factor=R)
    for k in range(2):
        (R * model(x)[:, k].sum()).backward()
    pre.step()
    factors = pre.factors()
    for i, conv in enumerate(model):
        shape_w = conv.weight.shape

        def f(wt, conv=conv, shape_w=shape_w):
            w = wt[:, :-1].reshape(shape_w)
            params = {f"{i}.weight": w, f"{i}.bias": wt[:, -1]}
            return torch.func.functional_call(model, params, (x,)).reshape(-1)

        wt = grad_mat_of(conv, conv.weight.detach(), conv.bias.detach())
        J = torch.func.jacrev(f)(wt).reshape(-1, wt.numel())
        A, G = factors[str(i)]
        verify.assert_close(maccore.kfac_dense(A, G), R * J.T @ J, rtol=1e-9, atol=1e-11, what=f"conv {i}")


def _mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


@pytest.mark.parametrize("mode", ["tikhonov", "pi", "exact"])
def test_adapter_equals_core_default_batch_average(mode):
    """CrossEntropy(mean) over N samples: G = N·Σ g gᵀ (R = 1/N), A = E_rows[x̃x̃ᵀ]."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(12, 4)).to(DT)
    layers = [model[0], model[3]]
    cap = Capture(layers)
    lam = 0.1
    pre = mt.KFACPreconditioner(model, t_cov=1, t_inv=1, damping=lam, damping_mode=mode)
    x, y = torch.randn(6, 2, 4, 4, dtype=DT), torch.randint(0, 4, (6,))
    F.cross_entropy(model(x), y).backward()
    raw = {id(l): grad_mat_of(l) for l in layers}
    pre.step()
    for l in layers:
        rows = rows_of(l, cap.inputs(l)[0])
        g = grad_rows_of(l, cap.grads[id(l)][0])
        A = rows.T @ rows / rows.shape[0]
        G = 6 * g.T @ g
        want = maccore.kfac_apply(raw[id(l)], A, G, lam, mode=mode)
        torch.testing.assert_close(grad_mat_of(l), want, rtol=1e-8, atol=1e-10)


def test_reduce_and_batch_sequence_scaling():
    torch.manual_seed(2)
    model = _mlp()
    cap = Capture([model[0], model[2]])
    pre = mt.KFACPreconditioner(model, t_cov=1, t_inv=1, stat_decay=0.5, kfac_approx="reduce",
                                loss_average="batch+sequence")
    n, s = 4, 3
    x = torch.randn(n, s, 5, dtype=DT)
    (model(x) ** 2).mean().backward()
    pre.step()
    for name, l in (("0", model[0]), ("2", model[2])):
        xin = cap.inputs(l)[0]
        xbar = torch.cat([xin.mean(1), torch.ones(n, 1, dtype=DT)], 1)
        gsum = cap.grads[id(l)][0].sum(1)
        A, G = pre.factors()[name]
        torch.testing.assert_close(A, xbar.T @ xbar / n)
        torch.testing.assert_close(G, (n * s) * gsum.T @ gsum)


def test_gradient_accumulation_equals_big_batch():
    torch.manual_seed(3)
    model = _mlp()
    twin = copy.deepcopy(model)
    kw = dict(lr=0.05, damping=0.1, t_cov=1, t_inv=1)
    opt, opt2 = mt.KFAC(model, **kw), mt.KFAC(twin, **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(8, 5, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt2.zero_grad()
        for sl in (slice(0, 3), slice(3, 8)):
            (F.cross_entropy(twin(x[sl]), y[sl]) * (sl.stop - sl.start) / 8).backward()
        opt2.step()
    assert_params_close(params_of(model), params_of(twin), rtol=1e-9, atol=1e-11)
    for (a1, g1), (a2, g2) in zip(opt.factors().values(), opt2.factors().values()):
        torch.testing.assert_close(a1, a2)
        torch.testing.assert_close(g1, g2)


def test_zero_grad_drops_gradient_statistics():
    """A backward whose step never happens (e.g. skipped by GradScaler) leaves no G behind."""
    torch.manual_seed(4)
    model, x = _mlp(), torch.randn(4, 5, dtype=DT)
    opt = mt.KFAC(model, t_cov=1, t_inv=1)
    (model(x) * 1e3).sum().backward()  # statistics of a step that is then abandoned
    opt.zero_grad()
    assert all("G" not in l.acc for l in opt.preconditioner.layers)


def test_multihead_attention_out_proj_only():
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(8, 2, batch_first=False).to(DT)
    model = nn.Sequential()
    model.attn = mha
    pre = mt.KFACPreconditioner(model, t_cov=1, t_inv=1, damping=0.2)
    assert [l.name for l in pre.layers] == ["attn.out_proj"]
    rep = pre.report()
    assert "attn.in_proj_weight" in rep and "none (raw gradient)" in rep
    x = torch.randn(5, 3, 8, dtype=DT)  # [L, B, E]
    outs = []
    out, w = mha(x, x, x, need_weights=True, average_attn_weights=False)
    out.register_hook(outs.append)
    (out ** 2).sum().backward()
    G_raw = grad_mat_of(mha.out_proj)
    with torch.no_grad():
        v = torch.nn.functional.linear(x.transpose(0, 1), mha.in_proj_weight, mha.in_proj_bias)[..., 16:]
        ctx = (w @ v.reshape(3, 5, 2, 4).transpose(1, 2)).transpose(1, 2).reshape(3, 5, 8)
    pre.step()
    rows = rows_of(mha.out_proj, ctx)
    g = outs[0].transpose(0, 1).reshape(-1, 8)
    want = maccore.kfac_apply(G_raw, rows.T @ rows / rows.shape[0], 3 * g.T @ g, 0.2)
    torch.testing.assert_close(grad_mat_of(mha.out_proj), want, rtol=1e-8, atol=1e-10)


def test_checkpoint_round_trip():
    torch.manual_seed(6)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 5, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g))
            for _ in range(8)]
    kw = dict(lr=0.05, damping=0.3, t_cov=2, t_inv=3, damping_mode="exact")

    def train(m, o, batches):
        for x, y in batches:
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()

    model = _mlp()
    opt = mt.KFAC(model, **kw)
    train(model, opt, data[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, data[4:])
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2 = _mlp()
    model2.load_state_dict(ckpt["model"])
    opt2 = mt.KFAC(model2, **kw)
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, data[4:])
    assert_params_close(params_of(model2), params_of(model), rtol=0, atol=0)
    with pytest.raises(ValueError, match="method"):
        mt.MAC(_mlp()).load_state_dict(ckpt["opt"])


def test_bad_arguments():
    with pytest.raises(ValueError):
        mt.KFAC(_mlp(), kfac_approx="sideways")
    with pytest.raises(ValueError, match="loss_average"):
        mt.KFAC(_mlp(), loss_average="tokens")
    with pytest.raises(ValueError, match="t_inv"):
        mt.KFAC(_mlp(), t_inv=0)


@pytest.mark.parametrize("method", ["KFAC", "SMAC"])
def test_grad_scaler_statistics_unscaled(method):
    """With ``grad_scaler=`` the gradient statistics are those of the unscaled loss."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)

    def make(m, sc):
        if method == "KFAC":
            return mt.KFAC(m, lr=0.05, damping=0.3, t_cov=1, t_inv=1, grad_scaler=sc)
        return mt.MAC(m, lr=0.05, t_cov=1, t_inv=1, diagonal=True, damping=0.5, grad_scaler=sc)

    opt, opt2 = make(model, None), make(twin, scaler)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt2.zero_grad()
        scaler.scale(F.cross_entropy(twin(x), y)).backward()
        scaler.step(opt2)
        scaler.update()
    assert_params_close(params_of(model), params_of(twin), rtol=1e-5, atol=1e-6)
    if method == "SMAC":
        for l1, l2 in zip(opt.preconditioner.layers, opt2.preconditioner.layers):
            torch.testing.assert_close(l1.state.diag_hat, l2.state.diag_hat, rtol=1e-5, atol=1e-9)
