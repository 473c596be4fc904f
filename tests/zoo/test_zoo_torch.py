"""Hugging Face GPT-2 / Llama / BERT (tiny configs, eager attention) × MAC / KFAC / SINGD: the
preconditioned and skipped layers, MAC with every attention module declared (``attention="auto"``:
the value projections — GPT-2: the fused ``c_attn`` — get the attention-weighted mean of the
probabilities the model returns), the loss decreases over 20 steps, and the adapter's update
equals the core function on captured arrays (attention oracles:
tests/adapters/test_torch_attention_qkv.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import maccore
import maccore_torch as mt

from tests.zoo.conftest import TORCHVISION_BROKEN

STEPS = 20


def _gpt2(tr):
    cfg = tr.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, attn_implementation="eager")
    return tr.GPT2LMHeadModel(cfg)


def _llama(tr):
    cfg = tr.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         attn_implementation="eager")
    return tr.LlamaForCausalLM(cfg)


def _bert(tr):
    cfg = tr.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0,
                        attn_implementation="eager")
    return tr.BertForMaskedLM(cfg)


def _vit(tr):
    cfg = tr.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return tr.ViTForImageClassification(cfg)


MODELS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "vit": _vit}
# (number of preconditioned layers, layer names that must be there, skipped parameter names)
EXPECT = {
    "gpt2": (9, {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "lm_head"},
             {"transformer.wpe.weight", "transformer.ln_f.weight"}),
    "llama": (15, {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"},
              {"model.embed_tokens.weight", "model.norm.weight"}),
    "bert": (14, {"bert.encoder.layer.0.attention.self.query", "cls.predictions.transform.dense"},
             {"bert.embeddings.position_embeddings.weight", "bert.embeddings.LayerNorm.weight"}),
    "vit": (14, {"vit.embeddings.patch_embeddings.projection", "vit.layers.1.attention.v_proj", "classifier"},
            {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "vit.layernorm.weight"}),
}


def _make(name, tr):
    torch.manual_seed(0)
    model = MODELS[name](tr)
    model.train()
    return model


# the attention modules "auto" declares, and the projection whose V statistics they feed
ATTENTION = {"gpt2": ("transformer.h.{}.attn", "c_attn"),
             "llama": ("model.layers.{}.self_attn", "v_proj"),
             "bert": ("bert.encoder.layer.{}.attention.self", "value"),
             "vit": ("vit.layers.{}.attention", "v_proj")}


def _loss(model, name, g):
    """The model's own loss on a fixed random batch (token ids, or 8×8 images for the ViT)."""
    if name == "vit":
        x = torch.randn(8, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        return lambda: model(pixel_values=x, labels=y).loss
    ids = torch.randint(1, 64, (4, 12), generator=g)
    return lambda: model(input_ids=ids, labels=ids).loss


def _opt(kind, model, name):
    if kind == "mac":
        return mt.MAC(model, lr=0.05, attention="auto")
    if kind == "mac_per_head":  # one V factor per (value) head; Llama: GQA groups
        return mt.MAC(model, lr=0.05, attention=mt.find_attention(model, mode="per_head"))
    if kind == "kfac":
        return mt.KFAC(model)  # every option at its default (lr 0.01, damping 0.1, kl_clip 1e-3)
    return mt.SINGD(model, lr=0.05)


_KFAC = pytest.param("kfac", marks=pytest.mark.slow)  # KFAC at its defaults (docs/kfac.md)
_LLAMA = pytest.param("llama", marks=pytest.mark.slow)


@pytest.mark.parametrize("kind", ["mac", "mac_per_head", _KFAC, "singd"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", _LLAMA])
def test_zoo_trains_and_reports(transformers, name, kind):
    model = _make(name, transformers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # SINGD's note on unsupported parameters
        opt = _opt(kind, model, name)
    layers = {l.name for l in opt.preconditioner.layers}
    n, must, skipped = EXPECT[name]
    assert len(layers) == n and must <= layers, sorted(layers)
    assert skipped <= {s.parameter for s in opt.preconditioner.skipped}
    assert not [s for s in opt.preconditioner.skipped if s.suspicious]
    if kind.startswith("mac"):  # every attention module declared, fed by its own probabilities
        module, proj = ATTENTION[name]
        fed = {l.name: l.attention.name for l in opt.preconditioner.layers if l.attention is not None}
        assert fed == {f"{module.format(i)}.{proj}": module.format(i) for i in range(2)}, fed
        assert sum(l.role == "qkv" for l in opt.preconditioner.layers) == (2 if name == "gpt2" else 0)
        report = opt.report()
        for i in range(2):
            assert f"probabilities of {module.format(i)})" in report, report
    if name in ("gpt2", "llama") and kind != "kfac":
        head = next(l for l in opt.preconditioner.layers if l.name == "lm_head")
        assert head.tied or name == "llama"
    compute = _loss(model, name, torch.Generator().manual_seed(1))
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = compute()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_gpt2_conv1d_update_equals_core(transformers):
    """The MAC update of a Conv1D (weight [in, out]) equals maccore.mac_apply on captured rows."""
    model = _make("gpt2", transformers)
    pre = mt.MACPreconditioner(model, t_cov=1, t_inv=1)
    mod = model.transformer.h[0].mlp.c_fc
    seen = []
    h = mod.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    ids = torch.randint(1, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    h.remove()
    G = maccore.grad_matrix(mod.weight.grad.T.clone(), mod.bias.grad.clone())
    want = maccore.mac_apply(G, maccore.mean_activation(maccore.linear_rows(seen[0], bias=True)), 1.0)
    pre.step()
    torch.testing.assert_close(mod.weight.grad, want[:, :-1].T)


@pytest.fixture(scope="module")
def timm():
    if TORCHVISION_BROKEN:
        pytest.skip(f"timm needs a torchvision matching the pinned torch: {TORCHVISION_BROKEN}")
    return pytest.importorskip("timm")


def _timm_vit(timm, qk_norm):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                             num_heads=4, mlp_ratio=2.0, qk_norm=qk_norm)


def _train(model, opt, x, y):
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["mac", _KFAC, "singd"])
def test_timm_vit_trains_with_fused_qkv_attention(timm, kind):
    """timm's ViT (fused qkv Linear, probabilities recomputed from its output: exact without q/k
    norms): every block's qkv declared, the class token and position embedding skipped as
    additive, the loss falls over 20 steps."""
    model = _timm_vit(timm, qk_norm=False)
    attention = {f"blocks.{i}.attn.qkv": mt.QKV(num_heads=4) for i in range(2)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = (mt.MAC(model, lr=0.05, attention=attention, strict=True) if kind == "mac"
               else mt.KFAC(model, strict=True) if kind == "kfac"
               else mt.SINGD(model, lr=0.05, warn_unsupported=False, strict=True))
    layers = {l.name for l in opt.preconditioner.layers}
    assert {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc2", "head"} <= layers
    assert {"cls_token", "pos_embed", "norm.weight"} <= {s.parameter for s in opt.preconditioner.skipped}
    if kind == "mac":
        assert sum(l.role == "qkv" for l in opt.preconditioner.layers) == 2
    g = torch.Generator().manual_seed(1)
    losses = _train(model, opt, torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
    assert losses[-1] < 0.9 * losses[0], losses


def test_timm_vit_qk_norm_is_refused(timm):
    """With qk_norm=True, q and k are normalised between the projection and the scores: the
    probabilities recomputed from the qkv output would be wrong, so MAC refuses (naming the
    layer) instead of approximating; attention off is accepted."""
    model = _timm_vit(timm, qk_norm=True)
    attention = {"blocks.0.attn.qkv": mt.QKV(num_heads=4)}
    with pytest.raises(mt.UnsupportedLayerError, match=r"blocks\.0\.attn\.qkv.*q_norm|q_norm.*blocks\.0"):
        mt.MAC(model, attention=attention)
    mt.MAC(model, attention={"blocks.0.attn.qkv": mt.QKV(num_heads=4, mode="off")})


@pytest.mark.parametrize("kind", ["mac", _KFAC, "singd"])
def test_timm_resnet_trains(timm, kind):
    """timm's ResNet (basic blocks, batch norm): every convolution and the classifier
    preconditioned, batch-norm parameters skipped with their reason, the loss falls."""
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, in_chans=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = (mt.MAC(model, lr=0.05, strict=True) if kind == "mac" else mt.KFAC(model, strict=True)
               if kind == "kfac" else mt.SINGD(model, lr=0.05, warn_unsupported=False, strict=True))
    convs = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {l.name for l in opt.preconditioner.layers} == convs
    assert all(not s.suspicious for s in opt.preconditioner.skipped)
    g = torch.Generator().manual_seed(1)
    losses = _train(model, opt, torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g))
    assert losses[-1] < 0.9 * losses[0], losses


def test_tied_head_report(transformers):
    model = _make("gpt2", transformers)
    rep = mt.MAC(model).report()
    assert "tied to transformer.wte: summed gradient" in rep
    assert isinstance(model.lm_head, nn.Linear)
