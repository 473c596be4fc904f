"""maccore_torch.testing.curvature_blocks against the exact NumPy oracles and the exactness
propositions (docs/math.md P-K1 … P-K4): GGN / EF blocks equal the oracles' on MLPs, KFAC equals the
GGN in the exact cases (deep linear nets, per-location conv nets, pooled conv nets), the MC Fisher
converges to the GGN, and every supported layer type and conv geometry is handled."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("maccore_torch")

from torch import nn  # noqa: E402

import maccore  # noqa: E402
from maccore import testing  # noqa: E402
from maccore.testing._blocks import conv_rows_nchw  # noqa: E402
from maccore_torch.testing import curvature_blocks, loss_info, supported_layers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F64 = torch.float64


def close(actual, desired, **kw):
    return testing.assert_curvature_close(actual, desired, dtype="float64", **kw)


def kron(pair):
    A, G = pair
    return np.kron(G, A)


class Pool(nn.Module):
    """Pool a [N, S, D] sequence over S (the reduce setting)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, z):
        return z.mean(1) if self.how == "mean" else z.sum(1)


def torch_mlp(case: testing.MLPCase, *, pool: bool = False) -> nn.Sequential:
    """The torch twin of an MLPCase, in float64 (same weights)."""
    act = {"identity": None, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}[case.activation]
    mods: list[nn.Module] = []
    for i, (w, b) in enumerate(zip(case.weights, case.biases)):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None).to(F64)
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(w))
            if b is not None:
                lin.bias.copy_(torch.as_tensor(b))
        mods.append(lin)
        if act is not None and i < len(case.weights) - 1:
            mods.append(act())
    if pool:
        mods.append(Pool(case.pool))
    return nn.Sequential(*mods)


def _loss(case):
    return {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}[case.loss](
        reduction=case.reduction)


def _targets(case, reduce: bool):
    y = case.y[:, 0] if reduce else case.y
    if case.loss == "ce":
        return torch.as_tensor(y.argmax(-1))
    return torch.as_tensor(y)


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _deep_linear(rng, n=4, s=3, widths=(5, 6, 4, 3)):
    ws = [rng.standard_normal((widths[i + 1], widths[i])) / math.sqrt(widths[i]) for i in range(len(widths) - 1)]
    bs = [rng.standard_normal(w) for w in widths[1:]]
    bs[1] = None  # one layer without bias
    return ws, bs, rng.standard_normal((n, s, widths[0]))


# ------------------------------------------------------------------------------------------------
# against the NumPy oracles
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_deep_linear_expand_ggn_ef_kfac(reduction):
    """P-K2/P-K3: GGN and EF equal the oracle's; KFAC-expand (type-II) equals the GGN."""
    rng = np.random.default_rng(0)
    ws, bs, x = _deep_linear(rng)
    case = testing.MLPCase(ws, bs, x, rng.standard_normal((4, 3, 3)), loss="mse", reduction=reduction)
    model, args = torch_mlp(case), (nn.MSELoss(reduction=reduction), torch.as_tensor(x), torch.as_tensor(case.y))
    ggn, ef = (curvature_blocks(model, *args, kind=k) for k in ("ggn", "ef"))
    kf = curvature_blocks(model, *args, kind="kfac-expand")
    assert list(ggn) == _linear_names(model)
    for i, name in enumerate(ggn):
        close(ggn[name], testing.ggn_block(case, i))
        close(ef[name], testing.ef_block(case, i))
        close(kron(kf[name]), ggn[name])
        A, G = kf[name]
        close(A, maccore.input_factor(maccore.linear_rows(testing.mlp_io(case)[0][i], bias=bs[i] is not None)))
        assert G.shape == (ws[i].shape[0],) * 2


@pytest.mark.parametrize("reduction,pool", [("sum", "mean"), ("mean", "sum"), ("mean", "mean")])
def test_deep_linear_reduce(reduction, pool):
    """P-K4: KFAC-reduce equals the GGN when the shared axis is pooled; expand does not (control)."""
    rng = np.random.default_rng(1)
    ws, bs, x = _deep_linear(rng)
    case = testing.MLPCase(ws, bs, x, rng.standard_normal((4, 1, 3)), loss="mse", reduction=reduction,
                           setting="reduce", pool=pool)
    model = torch_mlp(case, pool=True)
    args = (nn.MSELoss(reduction=reduction), torch.as_tensor(x), torch.as_tensor(case.y[:, 0]))
    ggn = curvature_blocks(model, *args, kind="ggn")
    red = curvature_blocks(model, *args, kind="kfac-reduce")
    exp = curvature_blocks(model, *args, kind="kfac-expand")
    for i, name in enumerate(ggn):
        close(ggn[name], testing.ggn_block(case, i))
        close(kron(red[name]), ggn[name])
    ok, err, _ = testing.curvature_report(kron(exp["0"]), ggn["0"], dtype="float64")
    assert not ok and err > 1e-2


@pytest.mark.parametrize("loss", ["mse", "ce", "bce"])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_single_datum_nonlinear(loss, activation):
    """P-K1: one datum through a nonlinear MLP: GGN/EF equal the oracle's, type-II KFAC = GGN,
    empirical KFAC = EF, for every layer."""
    rng = np.random.default_rng(2)
    ws = [rng.standard_normal((6, 4)), rng.standard_normal((5, 6)), rng.standard_normal((3, 5))]
    bs = [rng.standard_normal(6), None, rng.standard_normal(3)]
    x = rng.standard_normal((1, 1, 4))
    y = np.zeros((1, 1, 3))
    y[0, 0, 2] = 1.0
    if loss == "mse":
        y = rng.standard_normal((1, 1, 3))
    case = testing.MLPCase(ws, bs, x, y, loss=loss, reduction="mean", activation=activation)
    model = torch_mlp(case)
    args = (_loss(case), torch.as_tensor(x[:, 0]), _targets(case, True))
    ggn, ef = (curvature_blocks(model, *args, kind=k) for k in ("ggn", "ef"))
    k2 = curvature_blocks(model, *args, kind="kfac-expand")
    ke = curvature_blocks(model, *args, kind="kfac-expand", fisher="empirical")
    for i, name in enumerate(ggn):
        close(ggn[name], testing.ggn_block(case, i))
        close(ef[name], testing.ef_block(case, i))
        close(kron(k2[name]), ggn[name])
        close(kron(ke[name]), ef[name])


def test_hessian_equals_ggn_on_the_last_layer_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x, y = torch.randn(5, 3, dtype=F64), torch.tensor([0, 1, 1, 0, 1])
    hess = curvature_blocks(model, nn.CrossEntropyLoss(), x, y, kind="hessian")
    ggn = curvature_blocks(model, nn.CrossEntropyLoss(), x, y, kind="ggn")
    close(hess["2"], ggn["2"])  # the output is linear in the last layer
    assert not testing.curvature_report(hess["0"], ggn["0"], dtype="float64")[0]
    # and the Hessian is the autograd Hessian of the loss (torch order → ours)
    from maccore.testing.convert import from_parameter_layout

    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()

    def loss_of(theta):
        W, bb = theta[:12].reshape(4, 3), theta[12:]
        h = torch.tanh(x @ W.T + bb)
        return nn.functional.cross_entropy(model[2](h), y)

    H = torch.autograd.functional.hessian(loss_of, torch.cat([w.reshape(-1), b])).numpy()
    close(hess["0"], from_parameter_layout(H, (4, 3)))


@pytest.mark.parametrize("kind,fisher", [("mc", None), ("kfac-expand", "mc")])
def test_mc_converges_to_ggn(kind, fisher):
    """The MC Fisher's error to the GGN shrinks like 1/√M (P-K1/P-K2: lim MC = GGN)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    x, y = torch.randn(1, 3, dtype=F64), torch.tensor([2])
    kw = {} if fisher is None else {"fisher": fisher}
    ref_kind = "ggn" if kind == "mc" else "kfac-expand"
    ref = curvature_blocks(model, nn.CrossEntropyLoss(), x, y, kind=ref_kind)
    errs = []
    for m in (4, 64, 2048):
        got = curvature_blocks(model, nn.CrossEntropyLoss(), x, y, kind=kind, mc_samples=m, seed=3, **kw)
        errs.append(max(testing.curvature_report(got[k] if kind == "mc" else kron(got[k]),
                                                 ref[k] if kind == "mc" else kron(ref[k]),
                                                 dtype="float64")[1] for k in ref))
    assert errs[2] < errs[0] and errs[2] < 0.1, errs
    # same seed, same draws
    a = curvature_blocks(model, nn.CrossEntropyLoss(), x, y, kind=kind, mc_samples=5, seed=7, **kw)
    b = curvature_blocks(model, nn.CrossEntropyLoss(), x, y, kind=kind, mc_samples=5, seed=7, **kw)
    close(a, b)


# ------------------------------------------------------------------------------------------------
# convolutions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride,padding,dilation,mode", [
    (1, 1, 1, "zeros"), (2, 2, 2, "zeros"), (1, "same", 1, "zeros"), (1, 1, 1, "reflect"), ((2, 1), (0, 2), (1, 2), "zeros"),
])
def test_conv_per_location_expand_exact(stride, padding, dilation, mode):
    """P-K3 conv variant: Conv2d → 1×1 Conv2d, MSE per output location: KFAC-expand = GGN for both
    layers, and the GGN equals the oracle on independently built im2col patches."""
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, dilation=dilation, padding_mode=mode).to(F64)
    head = nn.Conv2d(3, 2, 1).to(F64)
    model = nn.Sequential(conv, head)
    x = torch.randn(3, 2, 6, 7, dtype=F64)
    out = model(x).detach()
    y = torch.randn_like(out)
    for reduction in ("sum", "mean"):
        args = (nn.MSELoss(reduction=reduction), x, y)
        ggn = curvature_blocks(model, *args, kind="ggn")
        kf = curvature_blocks(model, *args, kind="kfac-expand")
        for name in ggn:
            close(kron(kf[name]), ggn[name])
    if mode == "zeros" and padding != "same":
        pads = tuple((p, p) for p in ((padding,) * 2 if isinstance(padding, int) else padding))
        st = (stride,) * 2 if isinstance(stride, int) else stride
        dl = (dilation,) * 2 if isinstance(dilation, int) else dilation
        patches = conv_rows_nchw(x.numpy(), (3, 3), st, pads, dl, 1)[:, :, 0]  # [N, P, 18]
        n, p = patches.shape[:2]
        case = testing.MLPCase(
            [conv.weight.detach().numpy().reshape(3, -1), head.weight.detach().numpy().reshape(2, 3)],
            [conv.bias.detach().numpy(), head.bias.detach().numpy()], patches,
            y.numpy().reshape(n, 2, p).transpose(0, 2, 1), loss="mse", reduction="mean")
        ggn = curvature_blocks(model, nn.MSELoss(), x, y, kind="ggn")
        close(ggn["0"], testing.ggn_block(case, 0))
        close(ggn["1"], testing.ggn_block(case, 1))


def test_conv_pool_reduce_exact_and_cnn_blocks():
    """P-K4 conv variant (Conv2d → average pool → Linear, MSE): KFAC-reduce = GGN; and on the usual
    Conv → ReLU → Flatten → Linear network every kind returns the right shapes, the MAC factor is
    maccore's mean patch (the core checked against the reference)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(3, 2)).to(F64)
    x, y = torch.randn(4, 2, 5, 5, dtype=F64), torch.randn(4, 2, dtype=F64)
    ggn = curvature_blocks(model, nn.MSELoss(), x, y, kind="ggn")
    red = curvature_blocks(model, nn.MSELoss(), x, y, kind="kfac-reduce")
    for name in ggn:
        close(kron(red[name]), ggn[name])
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    xc, yc = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    mac = curvature_blocks(cnn, nn.CrossEntropyLoss(), xc, yc, kind="mac")
    rows = maccore.conv2d_rows(xc.double().numpy(), 3, stride=2, padding=1, bias=True)
    a = maccore.mean_activation(rows)
    close(mac["0"][0], np.outer(a, a))
    assert np.array_equal(mac["0"][1], np.eye(4))
    for kind in ("ggn", "ef", "hessian"):
        blocks = curvature_blocks(cnn, nn.CrossEntropyLoss(), xc, yc, kind=kind)
        assert {k: v.shape for k, v in blocks.items()} == {"0": (4 * 28,) * 2, "3": (5 * 65,) * 2}
    assert cnn[0].weight.dtype == torch.float32  # the user's model is untouched


def test_grouped_conv_is_a_sub_block_of_the_dense_conv():
    """groups=2: the GGN block equals the dense conv's GGN restricted to the in-group weights."""
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).to(F64)
    dense = nn.Conv2d(4, 6, 3, padding=1).to(F64)
    with torch.no_grad():
        dense.weight.zero_()
        dense.bias.copy_(conv.bias)
        for g in range(2):
            dense.weight[3 * g: 3 * g + 3, 2 * g: 2 * g + 2] = conv.weight[3 * g: 3 * g + 3]
    head = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(6 * 16, 3)).to(F64)
    x, y = torch.randn(3, 4, 4, 4, dtype=F64), torch.randint(0, 3, (3,))
    gg = curvature_blocks(nn.Sequential(conv, head), nn.CrossEntropyLoss(), x, y, kind="ggn")["0"]
    gd = curvature_blocks(nn.Sequential(dense, head), nn.CrossEntropyLoss(), x, y, kind="ggn")["0"]
    idx = [o * 37 + (o // 3 * 2 + c) * 9 + k for o in range(6) for c in range(2) for k in range(9)]
    idx = np.array(sorted(idx + [o * 37 + 36 for o in range(6)]))
    close(gg, gd[np.ix_(idx, idx)])
    A, G = curvature_blocks(nn.Sequential(conv, head), nn.CrossEntropyLoss(), x, y, kind="kfac-expand")["0"]
    assert A.shape == (19, 19) and G.shape == (6, 6)


# ------------------------------------------------------------------------------------------------
# other layer types, loss metadata, errors
# ------------------------------------------------------------------------------------------------


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D: weight [d_in, d_out], y = x @ weight + bias."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class Block(nn.Module):
    """A transformer block with a fused qkv Linear (timm style) or nn.MultiheadAttention."""

    def __init__(self, d=6, heads=2, mha=False, conv1d=False):
        super().__init__()
        self.heads, self.mha = heads, mha
        if mha:
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        else:
            self.qkv = Conv1D(3 * d, d) if conv1d else nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        if self.mha:
            h = self.attn(x, x, x, need_weights=False)[0]
        else:
            b, n, d = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            h = nn.functional.scaled_dot_product_attention(q, k, v)
            h = self.proj(h.transpose(1, 2).reshape(b, n, d))
        return self.fc(torch.tanh(x + h))


def test_attention_layers_conv1d_and_mha():
    """Conv1D equals the Linear with the transposed weight; nn.MultiheadAttention's in-projection
    and out-projection blocks equal those of the same block written with Linear layers."""
    torch.manual_seed(5)
    lin = Block()
    c1 = Block(conv1d=True)
    mha = Block(mha=True)
    with torch.no_grad():
        c1.qkv.weight.copy_(lin.qkv.weight.T)
        c1.qkv.bias.copy_(lin.qkv.bias)
        mha.attn.in_proj_weight.copy_(lin.qkv.weight)
        mha.attn.in_proj_bias.copy_(lin.qkv.bias)
        for a, b in ((mha.attn.out_proj, lin.proj), (c1.proj, lin.proj), (mha.fc, lin.fc), (c1.fc, lin.fc)):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
    x, y = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    ref = curvature_blocks(lin, nn.MSELoss(), x, y, kind="ggn")
    got = curvature_blocks(c1, nn.MSELoss(), x, y, kind="ggn")
    close(got, ref)
    assert supported_layers(mha) == ["attn.in_proj", "attn.out_proj", "fc"]
    got = curvature_blocks(mha, nn.MSELoss(), x, y, kind="ggn")
    close({"qkv": got["attn.in_proj"], "proj": got["attn.out_proj"], "fc": got["fc"]}, ref)
    for kind in ("kfac-expand", "kfac-reduce", "mac"):
        a = curvature_blocks(lin, nn.MSELoss(), x, y, kind=kind)
        b = curvature_blocks(c1, nn.MSELoss(), x, y, kind=kind)
        close(a, b)
        assert set(curvature_blocks(mha, nn.MSELoss(), x, y, kind=kind)) == {"fc"}  # MHA not observable


def test_loss_metadata():
    out = torch.zeros(4, 3, 5)
    info = loss_info(nn.CrossEntropyLoss(), out, torch.zeros(4, 5, dtype=torch.long))
    assert info.reduction_factor == 1 / 20 and info.likelihood == "categorical" and info.class_axis == 1
    assert loss_info(nn.CrossEntropyLoss(reduction="sum"), out, torch.zeros(4, 5, dtype=torch.long)).reduction_factor == 1
    assert loss_info(nn.MSELoss(), out, out).reduction_factor == 2 / 60
    assert loss_info(nn.MSELoss(reduction="sum"), out, out).reduction_factor == 2
    assert loss_info(nn.BCEWithLogitsLoss(), out, out).reduction_factor == 1 / 60
    info = loss_info(lambda f, t: f.sum(), out, out, reduction_factor=0.5, likelihood="gaussian")
    assert info.reduction_factor == 0.5 and info.likelihood == "gaussian" and info.class_axis == 2
    with pytest.raises(ValueError, match="reduction"):
        loss_info(nn.MSELoss(reduction="none"), out, out)
    with pytest.raises(ValueError, match="label smoothing"):
        loss_info(nn.CrossEntropyLoss(label_smoothing=0.1), out, torch.zeros(4, 5, dtype=torch.long))


def test_sequence_cross_entropy_matches_the_oracle():
    """CE over [N, C, T] logits (torch's class axis 1), mean over N·T labels: EF and GGN match the
    oracle's per-token expand setting with R = 1/(N·T)."""
    rng = np.random.default_rng(6)
    ws = [rng.standard_normal((3, 4))]
    bs = [rng.standard_normal(3)]
    x = rng.standard_normal((2, 5, 4))
    labels = rng.integers(0, 3, (2, 5))
    y = np.eye(3)[labels]
    case = testing.MLPCase(ws, bs, x, y, loss="ce", reduction="mean")

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch_mlp(case)[0]

        def forward(self, z):
            return self.lin(z).transpose(1, 2)  # [N, C, T]

    args = (Seq(), nn.CrossEntropyLoss(), torch.as_tensor(x), torch.as_tensor(labels))
    close(curvature_blocks(*args, kind="ggn")["lin"], testing.ggn_block(case, 0))
    close(curvature_blocks(*args, kind="ef")["lin"], testing.ef_block(case, 0))
    # one layer, N·T > 1 tokens: KFAC is not exact with CE (P-K13), but its factors follow the
    # definitions: A = E[x̃x̃ᵀ], G = R Σ_tokens (diag σ − σσᵀ)
    A, G = curvature_blocks(*args, kind="kfac-expand")["lin"]
    xt = np.concatenate([x, np.ones((2, 5, 1))], -1).reshape(10, 5)
    f = x @ ws[0].T + bs[0]
    sm = np.exp(f - f.max(-1, keepdims=True))
    sm = (sm / sm.sum(-1, keepdims=True)).reshape(10, 3)
    close((A, G), (xt.T @ xt / 10, sum(np.diag(s) - np.outer(s, s) for s in sm) / 10))
    assert not testing.curvature_report(np.kron(G, A), testing.ggn_block(case, 0), dtype="float64")[0]


def test_errors():
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match="kind must be one of"):
        curvature_blocks(model, nn.MSELoss(), x, y, kind="fisher")
    with pytest.raises(ValueError, match="unknown or unsupported layers"):
        curvature_blocks(model, nn.MSELoss(), x, y, kind="ggn", layers=["fc"])
    with pytest.raises(ValueError, match="reduction factor"):
        curvature_blocks(model, lambda f, t: ((f - t) ** 2).sum(), x, y, kind="ef")
    with pytest.raises(ValueError, match="likelihood"):
        curvature_blocks(model, lambda f, t: ((f - t) ** 2).sum(), x, y, kind="mc", reduction_factor=2.0)
    with pytest.raises(ValueError, match="dropout"):
        curvature_blocks(nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)), nn.MSELoss(), x, y, kind="ggn")
    # a generic callable with its R equals the built-in loss
    a = curvature_blocks(model, lambda f, t: ((f - t) ** 2).sum(), x, y, kind="ef", reduction_factor=2.0)
    b = curvature_blocks(model, nn.MSELoss(reduction="sum"), x, y, kind="ef")
    close(a, b)


def test_hooks_on_the_model_do_not_run_on_the_reference():
    """A user's (or an optimizer's) statistics hooks, including full backward hooks that torch.func
    cannot trace, are not run by curvature_blocks and keep their captured values."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    seen = {"forward": 0, "backward": 0}
    model[0].register_forward_hook(lambda m, a, o: seen.__setitem__("forward", seen["forward"] + 1))
    model[2].register_full_backward_hook(lambda m, gi, go: seen.__setitem__("backward", seen["backward"] + 1))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    for kind in ("ggn", "ef", "kfac-expand"):
        curvature_blocks(model, nn.CrossEntropyLoss(), x, y, kind=kind)
    assert seen == {"forward": 0, "backward": 0}
    assert len(model[0]._forward_hooks) == 1 and len(model[2]._backward_hooks) == 1  # untouched
