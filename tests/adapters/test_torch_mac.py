"""maccore_torch.MAC / MACPreconditioner: adapter == core, and == an independent step-by-step
reimplementation of docs/math.md (plain torch, dense P) over many steps."""

from __future__ import annotations

import copy
import io
import math

import pytest

from tests.adapters.torch_helpers import (
    Capture,
    assert_params_close,
    grad_mat_of,
    grad_rows_of,
    mac_dense,
    params_of,
    rows_of,
)

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import array_api_compat  # noqa: E402

import maccore  # noqa: E402
import maccore_torch as mt  # noqa: E402

DT = torch.float64
XP = array_api_compat.array_namespace(torch.empty(0))


def _supported(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


class RefNet(nn.Module):
    """Conv → Linear → LayerNorm (unsupported) → Linear without bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc1 = nn.Linear(3 * 4 * 4, 6)
        self.ln = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        h = F.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.ln(self.fc1(h))))


def _data(steps, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
            for _ in range(steps)]


def _groups(model):
    """Two param groups: most parameters, and the LayerNorm with its own lr and no weight decay."""
    ln = list(model.ln.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in ln)]
    return [{"params": rest}, {"params": ln, "lr": 0.03, "weight_decay": 0.0}]


def reference_mac(model, data, *, lr, momentum, stat_decay, damping, weight_decay, t_cov, t_inv,
                  mode, nesterov, lr_factor):
    """docs/math.md + §3.6 written out with dense P matrices, independent of the adapter."""
    layers = _supported(model)
    d_tilde = {id(l): rows_of(l, torch.zeros(1, 2, 4, 4, dtype=DT) if isinstance(l, nn.Conv2d)
                              else torch.zeros(1, l.in_features, dtype=DT)).shape[1] for l in layers}
    ema = {id(l): torch.zeros(d_tilde[id(l)], dtype=DT) for l in layers}
    P = {id(l): torch.eye(d_tilde[id(l)], dtype=DT) for l in layers}
    groups = [(g["params"], g.get("lr", lr), g.get("weight_decay", weight_decay)) for g in _groups(model)]
    bufs: dict[int, torch.Tensor] = {}
    k = 0
    inputs: dict[int, torch.Tensor] = {}
    handles = [l.register_forward_hook(lambda m, a, o: inputs.__setitem__(id(m), a[0].detach()))
               for l in layers]
    trajectory = []
    for t, (x, y) in enumerate(data):
        inputs.clear()
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if t % t_cov == 0:  # the hook's EMA update (one forward per step) and k += 1
            for l in layers:
                a = rows_of(l, inputs[id(l)]).mean(0)
                ema[id(l)] = stat_decay * ema[id(l)] + (1 - stat_decay) * a
            k += 1
        with torch.no_grad():
            for l in layers:
                if t % t_inv == 0:
                    P[id(l)] = mac_dense(ema[id(l)] / (1 - stat_decay ** k), damping)
                V = grad_mat_of(l) @ P[id(l)]
                d_w = l.weight[0].numel()
                l.weight.grad = V[:, :d_w].reshape(l.weight.shape).clone()
                if l.bias is not None:
                    l.bias.grad = V[:, d_w].clone()
            for params, glr, wd in groups:
                eta = glr * lr_factor(t)
                for p in params:
                    g = p.grad
                    first = id(p) not in bufs
                    if mode == "coupled":
                        d = g + wd * p
                        bufs[id(p)] = d.clone() if first else momentum * bufs[id(p)] + d
                        p -= eta * bufs[id(p)]
                    elif not nesterov:
                        bufs[id(p)] = g.clone() if first else momentum * bufs[id(p)] + g
                        p.mul_(1 - eta * wd).sub_(eta * bufs[id(p)])
                    else:  # nanoGPT nag_step
                        if first:
                            bufs[id(p)] = g.clone()
                            d = g
                        else:
                            bufs[id(p)] = momentum * bufs[id(p)] + g
                            d = g + momentum * bufs[id(p)]
                        p.mul_(1 - eta * wd).sub_(eta * d)
        trajectory.append(params_of(model))
    for h in handles:
        h.remove()
    return trajectory


@pytest.mark.parametrize(
    "mode,nesterov", [("coupled", False), ("decoupled", False), ("decoupled", True)]
)
def test_matches_reference_reimplementation(mode, nesterov):
    torch.manual_seed(0)
    model = RefNet().to(DT)
    twin = copy.deepcopy(model)
    data = _data(23)
    hp = dict(lr=0.1, momentum=0.9, stat_decay=0.8, damping=0.5, weight_decay=1e-2, t_cov=3, t_inv=7)
    lr_factor = lambda t: 0.95 ** t  # noqa: E731  (an LR schedule on both sides)
    expected = reference_mac(twin, data, mode=mode, nesterov=nesterov, lr_factor=lr_factor, **hp)
    opt = mt.MAC(model, params=_groups(model), nesterov=nesterov, weight_decay_mode=mode, **hp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    for t, (x, y) in enumerate(data):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        assert_params_close(params_of(model), expected[t], what=f"step {t}")
    assert opt.t == len(data)
    # the EMA count k counts collecting steps (t = 0, 3, ..., 21), not optimizer steps (T9)
    assert int(opt.preconditioner.layers[0].state.mean.count) == math.ceil(len(data) / 3)


def _conv_model():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=4),  # depthwise, 'same', dilation
        nn.ReLU(),
        nn.Conv2d(4, 3, (2, 3), padding=(1, 0)),
        nn.Flatten(),
        nn.Linear(30, 3),
    )


def _mlp3d_model():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False))


@pytest.mark.parametrize("kind", ["conv", "mlp3d"])
@pytest.mark.parametrize("diagonal", [False, True])
def test_adapter_equals_core(kind, diagonal):
    """Preconditioned grads == core mac_apply on means of independently computed rows."""
    torch.manual_seed(1)
    model = (_conv_model() if kind == "conv" else _mlp3d_model()).to(DT)
    x = torch.randn(2, 2, 7, 7, dtype=DT) if kind == "conv" else torch.randn(3, 4, 4, dtype=DT)
    layers = _supported(model)
    cap = Capture(layers)
    lam, beta = 0.3, 0.9
    pre = mt.MACPreconditioner(model, stat_decay=beta, damping=lam, t_cov=1, t_inv=1, diagonal=diagonal)
    pc = maccore.mac(decay=beta, damping=lam, diagonal=diagonal)
    core = {}
    for step in range(3):
        cap.clear()
        model.zero_grad()
        (model(x + 0.1 * step) ** 2).sum().backward()
        raw = {id(l): grad_mat_of(l) for l in layers}
        pre.step()
        for l in layers:
            rows = rows_of(l, cap.inputs(l)[0])
            st = core.get(id(l)) or pc.init(rows.shape[1], l.weight.shape[0], xp=XP, dtype=DT)
            g_rows = grad_rows_of(l, cap.grads[id(l)][0]) if diagonal else None
            st = pc.refresh(pc.update(st, rows, g_rows))
            core[id(l)] = st
            want = pc.apply(st, raw[id(l)])
            torch.testing.assert_close(grad_mat_of(l), want, rtol=1e-10, atol=1e-12)
            # and the mean is the plain row mean of the batch (debiased EMA, first step)
            if step == 0:
                torch.testing.assert_close(st.mean_hat, rows.mean(0), rtol=1e-12, atol=1e-12)
    cap.remove()


@pytest.mark.parametrize("kind", ["conv", "mlp3d"])
@pytest.mark.parametrize("scale", ["reference", "inverse"])
@pytest.mark.parametrize("diagonal", [False, True])
def test_scale_and_diagonal_equal_dense_formula(kind, scale, diagonal):
    """``MAC(scale=..., diagonal=...)`` == diag(1/(ẑ+λ)) Ĝ (ââᵀ + λI)⁻¹ · s (s = λ for the
    reference scale, 1 for the inverse scale), with â and ẑ the debiased EMAs of the core's
    statistics (:func:`maccore.mean_activation`, :func:`maccore.gradient_diagonal`) of the captured
    inputs and output gradients, and the inverse formed densely (not by the rank-1 code)."""
    torch.manual_seed(13)
    model = (_conv_model() if kind == "conv" else _mlp3d_model()).to(DT)
    x = torch.randn(2, 2, 7, 7, dtype=DT) if kind == "conv" else torch.randn(3, 4, 4, dtype=DT)
    layers = _supported(model)
    cap = Capture(layers)
    lam, beta = 0.3, 0.8
    pre = mt.MACPreconditioner(model, stat_decay=beta, damping=lam, t_cov=1, t_inv=1, scale=scale,
                               diagonal=diagonal)
    ema_a = {id(l): 0.0 for l in layers}
    ema_z = {id(l): 0.0 for l in layers}
    for k in range(1, 4):
        cap.clear()
        model.zero_grad()
        (model(x + 0.2 * k) ** 2).sum().backward()
        raw = {id(l): grad_mat_of(l) for l in layers}
        pre.step()
        for l in layers:
            a = maccore.mean_activation(rows_of(l, cap.inputs(l)[0]))
            z = maccore.gradient_diagonal(grad_rows_of(l, cap.grads[id(l)][0]))
            ema_a[id(l)] = beta * ema_a[id(l)] + (1 - beta) * a
            ema_z[id(l)] = beta * ema_z[id(l)] + (1 - beta) * z
            a_hat, z_hat = ema_a[id(l)] / (1 - beta ** k), ema_z[id(l)] / (1 - beta ** k)
            P = torch.linalg.inv(torch.outer(a_hat, a_hat) + lam * torch.eye(a_hat.shape[0], dtype=DT))
            want = raw[id(l)] @ P * (lam if scale == "reference" else 1.0)
            if diagonal:
                want = want / (z_hat + lam)[:, None]
            torch.testing.assert_close(grad_mat_of(l), want, rtol=1e-10, atol=1e-12)
    cap.remove()


class QkvBlock(nn.Module):
    """A timm-style attention block with a fused qkv projection, layout (3, H, d_h)."""

    def __init__(self, d=6, heads=2, causal=False):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.heads, self.causal = heads, causal

    def forward(self, x):
        b, n, d = x.shape
        h = self.heads
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        if self.causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(o)


def _expected_qkv_grad(G, x, attn, heads, mode, lam):
    """V rows: head-averaged batch-factorised v̄ (reference) or exact per-head means."""
    b, n, d = x.shape
    xt = torch.cat([x, torch.ones(b, n, 1, dtype=DT)], -1)
    a = xt.reshape(-1, d + 1).mean(0)
    out = G.clone()
    out[: 2 * d] = G[: 2 * d] @ mac_dense(a, lam)
    if mode == "reference":
        vbar = attn.mean((0, 1, 2)) @ xt.mean(0)
        out[2 * d:] = G[2 * d:] @ mac_dense(vbar, lam)
    elif mode == "per_head":
        vh = torch.einsum("bhij,bjd->hd", attn, xt) / (b * n)
        dh = d // heads
        for h in range(heads):
            rows = slice(2 * d + h * dh, 2 * d + (h + 1) * dh)
            out[rows] = G[rows] @ mac_dense(vh[h], lam)
    else:
        out[2 * d:] = G[2 * d:] @ mac_dense(a, lam)
    return out


@pytest.mark.parametrize("mode,causal", [("reference", False), ("per_head", False), ("per_head", True),
                                         ("off", False)])
def test_declared_fused_qkv(mode, causal):
    torch.manual_seed(2)
    heads, lam = 2, 0.7
    model = QkvBlock(heads=heads, causal=causal).to(DT)
    x = torch.randn(3, 5, 6, dtype=DT)
    pre = mt.MACPreconditioner(model, damping=lam, t_cov=1, t_inv=1,
                               attention={"qkv": mt.QKV(num_heads=heads, mode=mode, causal=causal)})
    cap = Capture([model.qkv])
    (model(x) ** 2).sum().backward()
    G = grad_mat_of(model.qkv)
    out = cap.records[id(model.qkv)]
    with torch.no_grad():
        qkv_out = model.qkv(x)
    b, n, d = x.shape
    q, k, _ = qkv_out.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    attn = s.softmax(-1)
    assert len(out) == 1
    pre.step()
    want = _expected_qkv_grad(G, x, attn, heads, mode, lam)
    torch.testing.assert_close(grad_mat_of(model.qkv), want, rtol=1e-10, atol=1e-12)
    assert f"V: {mode}" in pre.report()


class MhaNet(nn.Module):
    def __init__(self, e=8, heads=2, batch_first=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=batch_first)
        self.head = nn.Linear(e, 2)

    def forward(self, x, **kw):
        o, _ = self.attn(x, x, x, **kw)
        return self.head(o)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_capture_reproduces_torch(batch_first):
    """The recomputed probabilities and context equal torch's own, with masks and cross-attention."""
    from maccore_torch.attention import capture_mha

    torch.manual_seed(3)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).to(DT)
    B, L, S = 3, 4, 6
    shape = (lambda n: (B, n, 8)) if batch_first else (lambda n: (n, B, 8))
    x, mem = torch.randn(*shape(L), dtype=DT), torch.randn(*shape(S), dtype=DT)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -2:] = True
    float_mask = torch.randn(B * 2, L, S, dtype=DT)
    cases = [
        ((x, x, x), {}),
        ((x, x, x), {"attn_mask": causal}),
        ((x, mem, mem), {"key_padding_mask": kpm}),
        ((x, mem, mem), {"attn_mask": float_mask,
                         "key_padding_mask": torch.zeros(B, S, dtype=DT).masked_fill(kpm, float("-inf"))}),
    ]
    for args, kw in cases:
        out, w = mha(*args, need_weights=True, average_attn_weights=False, **kw)
        cap = capture_mha(mha, args, kw)
        torch.testing.assert_close(cap.attn, w, rtol=1e-10, atol=1e-12)
        ctx_out = mha.out_proj(cap.context)
        torch.testing.assert_close(ctx_out, out if batch_first else out.transpose(0, 1))
        assert cap.self_attention == (args[1] is args[0])


@pytest.mark.parametrize("mode", ["reference", "per_head"])
def test_multihead_attention_by_type(mode):
    torch.manual_seed(4)
    lam, heads = 0.5, 2
    model = MhaNet(heads=heads).to(DT)
    x = torch.randn(3, 5, 8, dtype=DT)
    attention = {"attn": mt.QKV(num_heads=heads, mode=mode)} if mode != "reference" else None
    pre = mt.MACPreconditioner(model, damping=lam, t_cov=1, t_inv=1, attention=attention)
    rep = pre.report()
    assert "attn.in_proj_weight" in rep and "attn.out_proj.weight" in rep
    (model(x) ** 2).sum().backward()
    mha = model.attn
    G_in = torch.cat([mha.in_proj_weight.grad, mha.in_proj_bias.grad[:, None]], 1)
    G_out = grad_mat_of(mha.out_proj)
    with torch.no_grad():
        _, w = mha(x, x, x, need_weights=True, average_attn_weights=False)
        v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)[..., 16:].reshape(3, 5, heads, 4).transpose(1, 2)
        ctx = (w @ v).transpose(1, 2).reshape(3, 5, 8)
    pre.step()
    want_in = _expected_qkv_grad(G_in, x, w, heads, mode, lam)
    got_in = torch.cat([mha.in_proj_weight.grad, mha.in_proj_bias.grad[:, None]], 1)
    torch.testing.assert_close(got_in, want_in, rtol=1e-10, atol=1e-12)
    a_out = rows_of(mha.out_proj, ctx).mean(0)
    torch.testing.assert_close(grad_mat_of(mha.out_proj), G_out @ mac_dense(a_out, lam), rtol=1e-10, atol=1e-12)


def test_fit_first_layer_true_inverse():
    torch.manual_seed(5)
    model = RefNet().to(DT)
    lam = 0.4
    batches = [torch.randn(4, 2, 4, 4, dtype=DT), (torch.randn(7, 2, 4, 4, dtype=DT), torch.zeros(7)),
               torch.randn(2, 2, 4, 4, dtype=DT)]
    pre = mt.MACPreconditioner(model, damping=lam, t_cov=1, t_inv=1)
    assert pre.fit_first_layer(batches) == "conv"
    xs = [b[0] if isinstance(b, tuple) else b for b in batches]
    A = sum(rows_of(model.conv, xb).T @ rows_of(model.conv, xb) / rows_of(model.conv, xb).shape[0]
            for xb in xs) / len(xs)
    P = torch.linalg.inv(A + lam * torch.eye(A.shape[0], dtype=DT))
    torch.testing.assert_close(pre.layers[0].state.first_inv, P, rtol=1e-10, atol=1e-12)  # in the MacState
    assert pre.layers[0].first_inv is pre.layers[0].state.first_inv
    x, y = _data(1)[0]
    F.cross_entropy(model(x), y).backward()
    G = grad_mat_of(model.conv)
    pre.step()
    torch.testing.assert_close(grad_mat_of(model.conv), G @ P, rtol=1e-10, atol=1e-12)
    assert int(pre.layers[0].state.mean.count) == 0  # its hook is gone: no statistics
    assert int(pre.layers[1].state.mean.count) == 1
    assert "first-layer inverse" in pre.report()


def test_gradient_accumulation_equals_big_batch():
    """Unequal micro-batches with loss weights n_i/N: statistics pooled by rows == one batch."""
    torch.manual_seed(6)
    model = RefNet().to(DT)
    twin = copy.deepcopy(model)
    kw = dict(lr=0.1, stat_decay=0.9, damping=0.5, t_cov=1, t_inv=2)
    opt, opt2 = mt.MAC(model, **kw), mt.MAC(twin, **kw)
    for x, y in _data(4, n=8):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt2.zero_grad()
        for sl in (slice(0, 3), slice(3, 8)):
            (F.cross_entropy(twin(x[sl]), y[sl]) * (sl.stop - sl.start) / 8).backward()
        opt2.step()
    assert_params_close(params_of(model), params_of(twin), rtol=1e-9, atol=1e-11)


def test_eval_and_no_grad_forwards_do_not_count():
    torch.manual_seed(7)
    model = RefNet().to(DT)
    twin = copy.deepcopy(model)
    opt, opt2 = mt.MAC(model, t_cov=1, t_inv=1), mt.MAC(twin, t_cov=1, t_inv=1)
    probe = torch.randn(3, 2, 4, 4, dtype=DT) * 10
    for x, y in _data(3):
        for m, o in ((model, opt), (twin, opt2)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
        twin.eval()
        twin(probe)  # eval mode, grad enabled
        twin.train()
        with torch.no_grad():
            twin(probe)  # training mode, no grad
        with torch.inference_mode():
            twin(probe)
        opt.step()
        opt2.step()
    assert_params_close(params_of(model), params_of(twin), rtol=0, atol=0)


def test_bf16_autocast_statistics_in_float32():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    pre = mt.MACPreconditioner(model, t_cov=1, t_inv=1, stat_decay=0.5)
    cap = Capture([model[0], model[2]])
    x = torch.randn(32, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().pow(2).mean()
    loss.backward()
    assert cap.inputs(model[2])[0].dtype == torch.bfloat16
    pre.step()
    for layer, m in zip(pre.layers, (model[0], model[2])):
        assert layer.state.mean.value.dtype == torch.float32
        want = rows_of(m, cap.inputs(m)[0].float()).mean(0)
        torch.testing.assert_close(layer.state.mean_hat, want, rtol=1e-6, atol=1e-6)
        assert m.weight.grad.dtype == torch.float32


def _train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("diagonal", [False, True])
def test_checkpoint_round_trip(diagonal):
    torch.manual_seed(9)
    data = _data(11)
    model = RefNet().to(DT)
    kw = dict(t_cov=2, t_inv=3, stat_decay=0.9, diagonal=diagonal)
    opt = mt.MAC(model, **kw)
    opt.fit_first_layer([d[0] for d in data[:2]])
    _train(model, opt, data[:5])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, data[5:])
    final = params_of(model)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2 = RefNet().to(DT)
    model2.load_state_dict(ckpt["model"])
    opt2 = mt.MAC(model2, **kw)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.t == 5
    _train(model2, opt2, data[5:])
    assert_params_close(params_of(model2), final, rtol=0, atol=0)


def _previous_format(sd):
    """A MAC state_dict as written before the first-layer inverse moved into the MacState: a
    separate ``"first_inv"`` entry per layer and no ``first_inv`` field in the state."""
    sd = copy.deepcopy(sd)
    for entry in sd["maccore"]["layers"].values():
        entry["first_inv"] = entry["state"].pop("first_inv")
    return sd


@pytest.mark.parametrize("diagonal", [False, True])
def test_checkpoint_of_the_previous_format_loads(diagonal):
    torch.manual_seed(9)
    data = _data(8)
    model = RefNet().to(DT)
    model2 = copy.deepcopy(model)
    kw = dict(t_cov=2, t_inv=3, stat_decay=0.9, diagonal=diagonal)
    opt = mt.MAC(model, **kw)
    opt.fit_first_layer([d[0] for d in data[:2]])
    _train(model, opt, data[:4])
    sd = opt.state_dict()
    assert "first_inv" in sd["maccore"]["layers"]["conv"]["state"]
    old = _previous_format(sd)
    model2.load_state_dict(model.state_dict())
    _train(model, opt, data[4:])
    opt2 = mt.MAC(model2, **kw)  # no fit_first_layer: the inverse comes from the checkpoint
    opt2.load_state_dict(old)
    assert opt2.t == opt2.count == 4
    torch.testing.assert_close(opt2.preconditioner.layers[0].state.first_inv,
                               opt.preconditioner.layers[0].state.first_inv, rtol=0, atol=0)
    _train(model2, opt2, data[4:])
    assert_params_close(params_of(model2), params_of(model), rtol=0, atol=0)
    if not diagonal:  # the fixed layer's hook is gone after loading, as after fit_first_layer
        assert int(opt2.preconditioner.layers[0].state.mean.count) == 0


def test_previous_format_fused_qkv_off_loads():
    """The previous format kept one factor [d̃] for a declared fused qkv layer in mode "off"; the
    engine keeps the three equal row-block factors [3, d̃]."""
    torch.manual_seed(2)
    kw = dict(damping=0.7, t_cov=1, t_inv=1, attention={"qkv": mt.QKV(num_heads=2, mode="off")})
    model = QkvBlock(heads=2).to(DT)
    pre = mt.MACPreconditioner(model, **kw)
    (model(torch.randn(3, 5, 6, dtype=DT)) ** 2).sum().backward()
    pre.step()
    sd = copy.deepcopy(pre.state_dict())
    for entry in sd["layers"].values():
        st = entry["state"]
        entry["first_inv"] = st.pop("first_inv")
        if st["mean"]["value"].ndim == 2:  # the old single factor
            st["mean"]["value"], st["mean_hat"] = st["mean"]["value"][0], st["mean_hat"][0]
    pre2 = mt.MACPreconditioner(QkvBlock(heads=2).to(DT), **kw)
    pre2.load_state_dict(sd)
    st, st2 = pre.states()["qkv"], pre2.states()["qkv"]
    assert tuple(st2.mean_hat.shape) == (3, 7)
    torch.testing.assert_close(st2.mean_hat, st.mean_hat, rtol=0, atol=0)
    torch.testing.assert_close(st2.mean.value, st.mean.value, rtol=0, atol=0)


def test_step_counter_is_also_count():
    model = RefNet().to(DT)
    opt = mt.MAC(model, t_cov=1, t_inv=1)
    _train(model, opt, _data(2))
    assert opt.t == opt.count == opt.preconditioner.count == 2
    with pytest.raises(AttributeError):
        opt.count = 0
    with pytest.raises(AttributeError):
        opt.preconditioner.count = 0


def test_preconditioner_before_torch_sgd_equals_mac():
    torch.manual_seed(10)
    model = RefNet().to(DT)
    twin = copy.deepcopy(model)
    kw = dict(stat_decay=0.9, damping=0.5, t_cov=2, t_inv=3)
    opt = mt.MAC(model, lr=0.05, momentum=0.8, weight_decay=0.0, **kw)
    pre = mt.MACPreconditioner(twin, **kw)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.8)
    for x, y in _data(7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sgd.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        pre.step()
        sgd.step()
    assert_params_close(params_of(model), params_of(twin), rtol=1e-12, atol=1e-14)


def test_grouped_conv_rejected_with_name():
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 6, 3, groups=2))
    with pytest.raises(mt.UnsupportedLayerError, match=r"\b1: grouped Conv2d with groups=2"):
        mt.MAC(model)
    opt = mt.MAC(model, skip_layers=["1"])
    rep = opt.report()
    assert "1.weight" in rep and "none (raw gradient)" in rep
    with pytest.raises(ValueError, match="no submodule named"):
        mt.MAC(model, skip_layers=["nope"])


def _nan_step(opt, model, where):
    x, y = _data(1)[0]
    if where == "input":
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if where == "grad":
        model.ln.weight.grad[0] = float("inf")  # an unpreconditioned parameter
    return opt.step()


@pytest.mark.parametrize("where", ["grad", "input"])
def test_nonfinite_step_skipped_state_untouched(where):
    torch.manual_seed(11)
    model = RefNet().to(DT)
    opt = mt.MAC(model, t_cov=1, t_inv=1)
    _train(model, opt, _data(2))
    before_params = params_of(model)
    before_state = copy.deepcopy(opt.state_dict())
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _nan_step(opt, model, where)
    assert_params_close(params_of(model), before_params, rtol=0, atol=0)
    after = opt.state_dict()
    assert after["maccore"]["t"] == before_state["maccore"]["t"] == 2
    for name, entry in before_state["maccore"]["layers"].items():
        new = after["maccore"]["layers"][name]["state"]
        assert torch.equal(new["mean"]["value"], entry["state"]["mean"]["value"])
        assert torch.equal(new["mean_hat"], entry["state"]["mean_hat"])
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], before_state["state"][
            [i for i, q in enumerate(model.parameters()) if q is p][0]]["momentum_buffer"])
    strict = mt.MAC(model, t_cov=1, t_inv=1, on_nonfinite="raise")
    with pytest.raises(FloatingPointError):
        _nan_step(strict, model, where)
    assert strict.t == 0


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_tied_linear_layers_pool_rows():
    torch.manual_seed(12)
    model = Tied().to(DT)
    pre = mt.MACPreconditioner(model, t_cov=1, t_inv=1)
    assert [l.name for l in pre.layers] == ["a+b"]
    cap = Capture([model.a, model.b])
    x = torch.randn(5, 4, dtype=DT)
    model(x).sum().backward()
    G = grad_mat_of(model.a)
    pre.step()
    rows = torch.cat([rows_of(model.a, cap.inputs(model.a)[0]), rows_of(model.b, cap.inputs(model.b)[0])])
    torch.testing.assert_close(pre.layers[0].state.mean_hat, rows.mean(0))
    torch.testing.assert_close(grad_mat_of(model.a), G @ mac_dense(rows.mean(0), 1.0))


def test_tied_embedding_head_preconditioned_as_linear():
    """issue #13: an embedding tied to a Linear head: the head is preconditioned as a linear layer
    on its input (its factors precondition the summed gradient); report() says so."""
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    opt = mt.MAC(LM())
    assert [(l.name, l.tied) for l in opt.preconditioner.layers] == [("head", ["emb"])]
    assert "tied to emb: summed gradient" in opt.report()
    with pytest.warns(UserWarning, match="0 preconditioned layers"):
        opt = mt.MAC(LM(), skip_layers=["head"])
    assert opt.preconditioner.layers == []
    assert "skip_layers" not in opt.report()  # the tied weight is named emb.weight: an Embedding
    assert "emb.weight" in opt.report()


def test_tied_to_other_module_kind_rejected():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.c = nn.Bilinear(4, 4, 4)
            self.c.weight = nn.Parameter(torch.zeros(4, 4, 4))
            self.c.bias = self.a.bias

    with pytest.raises(ValueError, match="tied to layer a"):
        mt.MAC(Odd())


def test_report_lists_every_parameter():
    model = RefNet()
    rep = mt.MAC(model).report()
    for name, _ in model.named_parameters():
        assert name in rep
    assert "MAC rank-1 (conv2d)" in rep and "none (raw gradient)" in rep
