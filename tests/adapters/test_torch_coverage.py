"""issue #13: every trainable parameter is preconditioned or listed as skipped with the reason;
``add_param_group``; bias-only fine-tuning; a weight stored ``[in, out]`` (transformers' Conv1D)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import maccore
import maccore_torch as mt

DT = torch.float64


class Conv1D(nn.Module):
    """The layout of ``transformers.pytorch_utils.Conv1D`` (weight ``[nx, nf]``, ``x @ w + b``);
    named like it so the lazy registration applies without importing transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=DT) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf, dtype=DT) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


Conv1D.__module__ = "transformers.pytorch_utils"


class Odd(nn.Module):
    """A module holding a 2-D weight with no layer_spec rule."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, dtype=DT))

    def forward(self, x):
        return x @ self.w


def _net():
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), Odd(), nn.Linear(4, 3)).to(DT)


def test_report_gives_reasons_and_suspicious_warns():
    model = _net()
    with pytest.warns(UserWarning, match=r"2\.w: Odd holds a 2-D parameter"):
        opt = mt.MAC(model)
    rep = opt.report()
    assert "1.weight" in rep and "LayerNorm: not a linear map" in rep
    assert [s.parameter for s in opt.preconditioner.skipped] == ["1.weight", "1.bias", "2.w"]
    assert [s.suspicious for s in opt.preconditioner.skipped] == [False, False, True]
    with pytest.raises(mt.UnsupportedLayerError, match="strict=True"):
        mt.KFAC(_net(), strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = mt.MAC(_net(), skip_layers=["2"], strict=True)
    assert "skip_layers['2']" in opt.report()


class Tokens(nn.Module):
    """A ViT-style embedding: a class token and position embeddings added to the patches."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4, dtype=DT))
        self.pos = nn.Parameter(torch.zeros(1, 3, 4, dtype=DT))

    def forward(self, x):  # [B, 2, 4] -> [B, 3, 4]
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos


def test_broadcast_parameters_are_not_suspicious():
    """[1, …]-shaped 3-D parameters (class token, position embedding) are skipped as additive;
    a 3-D parameter with a real leading dimension still looks like a linear map."""
    model = nn.Sequential(Tokens(), nn.Linear(4, 3)).to(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = mt.MAC(model, strict=True)
    reasons = {s.parameter: (s.suspicious, s.reason) for s in opt.preconditioner.skipped}
    assert set(reasons) == {"0.cls_token", "0.pos"}
    assert all(not sus and "broadcast over the batch" in r for sus, r in reasons.values())
    model[0].pos = nn.Parameter(torch.zeros(2, 3, 4, dtype=DT))
    with pytest.raises(mt.UnsupportedLayerError, match="0.pos"):
        mt.MAC(model, strict=True)


def test_zero_layers_always_warns():
    with pytest.warns(UserWarning, match="0 preconditioned layers"):
        mt.MAC(nn.Sequential(nn.LayerNorm(3)))


def test_add_param_group_is_preconditioned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    opt = mt.MAC(model, params=model[0].parameters(), t_cov=1, t_inv=1, lr=0.1, momentum=0.0,
                 weight_decay=0.0)
    assert [l.name for l in opt.preconditioner.layers] == ["0"]
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.1})
    assert [l.name for l in opt.preconditioner.layers] == ["0", "2"]
    assert "2/4 parameters" not in opt.report() and "4/4 parameters preconditioned" in opt.report()
    x, y = torch.randn(8, 4, dtype=DT), torch.randn(8, 3, dtype=DT)
    before = model[2].weight.detach().clone()
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    h = torch.tanh(model[0](x)).detach()
    G = maccore.grad_matrix(model[2].weight.grad, model[2].bias.grad)
    want = maccore.mac_apply(G, maccore.mean_activation(maccore.linear_rows(h, bias=True)), 1.0)
    opt.step()
    torch.testing.assert_close((before - model[2].weight) / 0.1, want[:, :-1])


def test_bias_only_finetuning():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    for m in (model[0], model[2]):
        m.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="0 preconditioned layers"):
        opt = mt.MAC(model, lr=0.1)
    assert "bias of a layer whose weight is frozen" in opt.report()
    x, y = torch.randn(8, 4, dtype=DT), torch.randn(8, 3, dtype=DT)
    b0 = model[2].bias.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert not torch.equal(b0, model[2].bias)


def test_conv1d_transposed_weight_equals_core():
    torch.manual_seed(2)
    model = nn.Sequential(Conv1D(5, 4), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    pre = mt.MACPreconditioner(model, t_cov=1, t_inv=1, damping=0.5)
    assert [l.name for l in pre.layers] == ["0", "2"] and pre.layers[0].transposed
    x = torch.randn(6, 7, 4, dtype=DT)
    model(x).pow(2).sum().backward()
    G = maccore.grad_matrix(model[0].weight.grad.T, model[0].bias.grad)
    want = maccore.mac_apply(G, maccore.mean_activation(maccore.linear_rows(x, bias=True)), 0.5)
    pre.step()
    torch.testing.assert_close(model[0].weight.grad, want[:, :-1].T)
    torch.testing.assert_close(model[0].bias.grad, want[:, -1])
    for Opt in (mt.KFAC, mt.SINGD):  # the transposition is the adapter's gradient I/O only
        opt = Opt(model)
        assert opt.preconditioner.layers[0].transposed
    # declared as a fused qkv projection
    model = nn.Sequential(Conv1D(12, 4)).to(DT)
    pre = mt.MACPreconditioner(model, attention={"0": mt.QKV(num_heads=2, causal=True)})
    assert pre.layers[0].role == "qkv"


def test_conv1d_real_transformers():
    tr = pytest.importorskip("transformers.pytorch_utils")
    model = nn.Sequential(tr.Conv1D(5, 4))
    pre = mt.MACPreconditioner(model)
    assert pre.layers[0].transposed and pre.layers[0].spec.d_in == 4 and pre.layers[0].spec.d_out == 5
