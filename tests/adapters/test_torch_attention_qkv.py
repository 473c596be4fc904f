"""Attention-aware MAC for attention modules that return their probabilities (issue 13):
separate q/k/v projections (Hugging Face Llama with GQA + RoPE + causal mask, BERT with a padding
mask, ViT) and GPT-2's fused ``c_attn``, declared with ``maccore_torch.AttentionModule`` or
``attention="auto"``.

Oracles (float64, independent of the adapter): the probabilities come from a SEPARATE forward with
``output_attentions=True``, the value projection's input from a plain forward hook, and the
attention-weighted means from explicit einsum formulas (docs/math.md, attention) and from
``maccore.attention_weighted_mean``; the MAC update is checked against ``maccore.mac_apply``.
Tolerances: ``tests.conftest.tol`` (dtype-derived).
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import array_api_compat  # noqa: E402

import maccore  # noqa: E402
import maccore_torch as mt  # noqa: E402
import tests.zoo.conftest  # noqa: E402,F401  (hides a broken torchvision from transformers)
from tests.conftest import assert_close, tol  # noqa: E402

# ViT's cls_token / position_embeddings are reported as "look like linear maps" (coverage)
pytestmark = pytest.mark.filterwarnings("ignore:MAC.*look like linear maps:UserWarning")

DT = torch.float64
XP = array_api_compat.array_namespace(torch.empty(0))
TOL = tol(XP, DT, 4.0)  # a few reductions over B·N·N terms
LAM = 0.7


@pytest.fixture(scope="module")
def tr():
    return pytest.importorskip("transformers")


# ------------------------------------------------------------------ tiny models (no downloads)

def _llama(tr, impl="eager", bias=True):
    cfg = tr.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         attention_bias=bias, attn_implementation=impl, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    return tr.LlamaForCausalLM(cfg)


def _bert(tr, impl="eager"):
    cfg = tr.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0, attn_implementation=impl)
    return tr.BertForMaskedLM(cfg)


def _gpt2(tr, impl="eager"):
    cfg = tr.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, attn_implementation=impl)
    return tr.GPT2LMHeadModel(cfg)


def _vit(tr, impl="eager"):
    cfg = tr.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32,
                       intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
                       attn_implementation=impl)
    return tr.ViTForImageClassification(cfg)


# name: (builder, attention module of block i, value projection (relative), fused?)
MODELS = {
    "llama": (_llama, "model.layers.{}.self_attn", "v_proj", False),
    "bert": (_bert, "bert.encoder.layer.{}.attention.self", "value", False),
    "gpt2": (_gpt2, "transformer.h.{}.attn", "c_attn", True),
    "vit": (_vit, "vit.layers.{}.attention", "v_proj", False),
}


def _make(tr, name, impl="eager"):
    torch.manual_seed(0)
    return MODELS[name][0](tr, impl).to(DT).train()


def _batch(name):
    """(forward kwargs, loss function) — BERT and GPT-2 with a padding mask (keys masked)."""
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        x = torch.randn(3, 3, 8, 8, generator=g, dtype=DT)
        y = torch.tensor([0, 2, 1])
        return {"pixel_values": x}, lambda out: nn.functional.cross_entropy(out.logits, y)
    ids = torch.randint(1, 64, (3, 7), generator=g)
    kw = {"input_ids": ids}
    if name in ("bert", "gpt2"):
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[0, 5:] = 0
        mask[2, 3:] = 0
        kw["attention_mask"] = mask
    return kw, lambda out: (out.logits ** 2).mean()


def _declare(name, mode):
    _, attn_name, proj, fused = MODELS[name]
    kind = "qkv" if fused else "value"
    return {attn_name.format(i): mt.AttentionModule(mode=mode, **{kind: proj}) for i in range(2)}


def _bias_col(x):
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)


def _oracle_vbar(x, attn, mode, kv_heads, bias):
    """docs/math.md: reference Σ_j ᾱ_j x̄_j; per_head (1/(BN)) Σ_{b,i} Σ_j α_{bhij} x̃_{bj}, value
    head g = mean over its query-head group (written out, independent of the core). The bias
    entry is Σ_j ᾱ_j = 1, exactly 1 (M-P5; Hugging Face computes the softmax in float32 even for
    a float64 model, so the returned rows sum to 1 only within float32 rounding)."""
    b, n = x.shape[:2]
    if mode == "reference":
        out = (attn.mean((0, 1, 2)) @ x.mean(0))[None]
    else:
        per = torch.einsum("bhij,bjd->hd", attn, x) / (b * n)
        h = attn.shape[1]
        out = per.reshape(kv_heads, h // kv_heads, -1).mean(1)
    out = _bias_col(out) if bias else out
    return out[0] if mode == "reference" else out


def _own_probs_and_inputs(model, name, kw):
    """A separate no-grad forward: the model's own probabilities (output_attentions=True) and
    the input of each declared projection (forward hooks)."""
    _, attn_name, proj, _ = MODELS[name]
    mods = [model.get_submodule(f"{attn_name.format(i)}.{proj}") for i in range(2)]
    seen = {}
    hs = [m.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0].detach()))
          for i, m in enumerate(mods)]
    with torch.no_grad():
        out = model(**kw, output_attentions=True)
    for h in hs:
        h.remove()
    return [a.detach() for a in out.attentions], [seen[0], seen[1]], mods


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


ERRORS: dict = {}  # measured max relative deviations (printed by test_report_deviations)


@pytest.mark.parametrize("mode", ["reference", "per_head"])
@pytest.mark.parametrize("name", ["llama", "bert", "gpt2", "vit"])
def test_value_mean_and_update_equal_oracle(tr, name, mode):
    """The V factor the adapter feeds the engine == attention_weighted_mean of the model's own
    probabilities and the value projection's input (float64), and the MAC update of the value /
    fused projection == maccore.mac_apply on those arrays; plain ā (negative control) differs."""
    model = _make(tr, name)
    kw, loss_fn = _batch(name)
    pre = mt.MACPreconditioner(model, damping=LAM, t_cov=1, t_inv=1,
                               attention=_declare(name, mode))
    fused = MODELS[name][3]
    probs, inputs, mods = _own_probs_and_inputs(model, name, kw)
    loss_fn(model(**kw)).backward()
    grads = [(m.weight.grad.clone(), None if m.bias is None else m.bias.grad.clone()) for m in mods]
    fed = []
    for i, m in enumerate(mods):
        layer = next(l for l in pre.layers if l.modules[0] is m)
        assert layer.attention is not None and layer.attention.name == MODELS[name][1].format(i)
        fed.append(layer.acc["mean"].value.clone())
    pre.step()
    for i, m in enumerate(mods):
        x, attn, bias = inputs[i], probs[i], m.bias is not None
        kv = next(l for l in pre.layers if l.modules[0] is m).spec.qkv.kv_heads
        core = maccore.attention_weighted_mean(x, attn, bias=bias, mode=mode)
        if mode == "per_head" and kv != attn.shape[1]:
            core = core.reshape(kv, -1, core.shape[-1]).mean(1)
        want_v = _oracle_vbar(x, attn, mode, kv, bias)
        assert_close(core, want_v, **TOL)
        abar = maccore.mean_activation(maccore.linear_rows(x, bias=bias))
        if fused:  # rows Q, K: ā; V: v̄ (per head: H blocks each)
            got_v = fed[i][2:] if mode == "reference" else fed[i][2 * attn.shape[1]:]
            got_q = fed[i][0]
            assert_close(got_q, abar, **TOL)
        else:
            got_v = fed[i]
        assert_close(got_v.reshape(want_v.shape), want_v, **TOL)
        ERRORS[(name, mode, "vbar")] = _rel_err(got_v.reshape(want_v.shape), want_v)
        # the update: transposed storage (GPT-2 Conv1D) handled by the adapter
        gw, gb = grads[i]
        transposed = fused
        G = maccore.grad_matrix(gw.T if transposed else gw, gb)
        if fused:  # Q, K rows: ā; V rows: v̄ ([d̃], or [H, d̃] on H equal row blocks)
            d = G.shape[0] // 3
            want = torch.cat([maccore.mac_apply(G[: 2 * d], abar, LAM),
                              maccore.mac_apply(G[2 * d:], want_v, LAM)])
        else:
            want = maccore.mac_apply(G, want_v, LAM)
        got = maccore.grad_matrix(m.weight.grad.T if transposed else m.weight.grad,
                                  None if m.bias is None else m.bias.grad)
        assert_close(got, want, **TOL)
        ERRORS[(name, mode, "update")] = _rel_err(got, want)
        plain = maccore.mac_apply(G, abar, LAM)  # negative control: plain MAC on all rows
        assert float((got - plain).abs().max()) > 1e3 * TOL["rtol"] * float(plain.abs().max())
    assert "attention-weighted V" in pre.report() or fused


def test_query_key_keep_plain_mean(tr):
    """q_proj / k_proj are plain dense layers: ā of their input, no attention weighting."""
    model = _make(tr, "llama")
    kw, loss_fn = _batch("llama")
    pre = mt.MACPreconditioner(model, damping=LAM, t_cov=1, t_inv=1, attention="auto")
    seen = {}
    q = model.model.layers[0].self_attn.q_proj
    h = q.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0].detach()))
    loss_fn(model(**kw)).backward()
    h.remove()
    layer = next(l for l in pre.layers if l.modules[0] is q)
    assert layer.spec.qkv is None and layer.attention is None
    want = maccore.mean_activation(maccore.linear_rows(seen["x"], bias=True))
    assert_close(layer.acc["mean"].value, want, **TOL)


def test_gqa_per_head_maps_value_heads_to_query_groups(tr):
    """Llama num_key_value_heads=2 < num_heads=4: per_head keeps 2 factors, value head g gets
    the mean of query heads 2g, 2g+1 (repeat_kv order); the state has shape [H_kv, d̃]."""
    model = _make(tr, "llama")
    kw, loss_fn = _batch("llama")
    pre = mt.MACPreconditioner(model, damping=LAM, t_cov=1, t_inv=1,
                               attention=_declare("llama", "per_head"))
    probs, inputs, mods = _own_probs_and_inputs(model, "llama", kw)
    loss_fn(model(**kw)).backward()
    layer = next(l for l in pre.layers if l.modules[0] is mods[0])
    assert layer.spec.qkv.num_heads == 4 and layer.spec.qkv.kv_heads == 2
    got = layer.acc["mean"].value
    assert got.shape == (2, 33)
    x = inputs[0]
    a = probs[0]
    for g in range(2):
        heads = [torch.einsum("bij,bjd->d", a[:, h], x) / (a.shape[0] * a.shape[2])
                 for h in (2 * g, 2 * g + 1)]
        assert_close(got[g, :-1], (heads[0] + heads[1]) / 2, **TOL)
        assert float(got[g, -1]) == 1.0
    pre.step()
    assert tuple(layer.state.mean_hat.shape) == (2, 33)


def test_reference_and_per_head_differ_and_off_is_plain(tr):
    model = _make(tr, "bert")
    kw, loss_fn = _batch("bert")
    fed = {}
    for mode in ("reference", "per_head", "off"):
        pre = mt.MACPreconditioner(model, damping=LAM, t_cov=1, t_inv=1,
                                   attention=_declare("bert", mode))
        model.zero_grad()
        loss_fn(model(**kw)).backward()
        layer = next(l for l in pre.layers if l.name == "bert.encoder.layer.0.attention.self.value")
        fed[mode] = layer.acc["mean"].value.clone()
        if mode == "off":
            assert "value projection (V: off" in pre.report()
        pre.remove_hooks()
    assert fed["per_head"].shape == (4, 33) and fed["reference"].shape == (33,)
    assert float((fed["per_head"].mean(0) - fed["reference"]).abs().max()) > 1e-6
    assert float((fed["off"] - fed["reference"]).abs().max()) > 1e-6


def test_sdpa_model_is_refused_at_construction(tr):
    model = _make(tr, "llama", impl="sdpa")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn.*attn_implementation='sdpa'.*"
                                         r"attn_implementation=\"eager\""):
        mt.MAC(model, attention="auto")
    mt.MAC(model, attention=_declare("llama", "off"))  # plain MAC needs no probabilities


def test_missing_probabilities_at_first_step(tr):
    """Switched to sdpa after construction: the first collecting forward raises, naming the
    module — never a silent fall-back to plain MAC."""
    model = _make(tr, "llama")
    kw, _ = _batch("llama")
    opt = mt.MAC(model, attention="auto")
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn.*returned no attention "
                                           r"probabilities.*eager"):
        model(**kw)
    del opt


def test_auto_finds_hf_attention(tr):
    for name in MODELS:
        model = _make(tr, name)
        found = mt.find_attention(model)
        _, attn_name, proj, fused = MODELS[name]
        assert set(found) == {attn_name.format(i) for i in range(2)}, found
        assert all((d.qkv if fused else d.value) == proj for d in found.values())
        rep = mt.MAC(model, attention="auto").report()
        v = f"{attn_name.format(0)}.{proj}"
        rows = [r for r in rep.splitlines() if f"probabilities of {attn_name.format(0)})" in r]
        assert rows and all(f" {v} " in r for r in rows), rep


def test_auto_without_attention_modules_warns():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="attention='auto' found no attention module"):
        mt.MAC(model, attention="auto")


def test_smac_value_projection_keeps_its_diagonal(tr):
    """SMAC: a value projection is a plain dense layer with the attention-weighted mean, so it
    keeps the diagonal output factor: update == mac_apply(G, v̄, λ, grad_diag=z)."""
    model = _make(tr, "llama")
    kw, loss_fn = _batch("llama")
    pre = mt.MACPreconditioner(model, damping=LAM, diagonal=True, t_cov=1, t_inv=1,
                               attention=_declare("llama", "reference"))
    probs, inputs, mods = _own_probs_and_inputs(model, "llama", kw)
    out = {}

    def grab(m, a, o):
        o.register_hook(lambda g: out.__setitem__("g", g.detach()))

    h = mods[0].register_forward_hook(grab)
    loss_fn(model(**kw)).backward()
    h.remove()
    m = mods[0]
    G = maccore.grad_matrix(m.weight.grad.clone(), m.bias.grad.clone())
    z = maccore.gradient_diagonal(maccore.grad_rows(out["g"]))
    pre.step()
    want = maccore.mac_apply(G, _oracle_vbar(inputs[0], probs[0], "reference", 2, True), LAM,
                             grad_diag=z)
    assert_close(maccore.grad_matrix(m.weight.grad, m.bias.grad), want, **TOL)
    assert "attention-weighted V" in pre.report() and "SMAC diagonal" in pre.report()


# ------------------------------------------------------------------ hand-written modules

class TimmLikeAttention(nn.Module):
    """timm's Attention: fused qkv (3, H, d_h), optional q/k LayerNorm before the scores; keeps
    its probabilities in ``last_attn``."""

    def __init__(self, d=8, heads=2, qk_norm=False):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm = nn.LayerNorm(self.dh) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.dh) if qk_norm else nn.Identity()
        self.proj = nn.Linear(d, d)
        self.last_attn = None

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q @ k.transpose(-1, -2) / math.sqrt(self.dh)).softmax(-1)
        self.last_attn = attn.detach()
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x))


def test_qk_norm_refused_when_probabilities_are_recomputed():
    """The issue's timm ViT with qk_norm=True: recomputing softmax(q kᵀ/√d_h) from the qkv output
    skips q_norm/k_norm, so it is refused (with the fix in the message); Identity norms and
    mode "off" are accepted."""
    model = Block(TimmLikeAttention(qk_norm=True)).to(DT)
    with pytest.raises(mt.UnsupportedLayerError,
                       match=r"attn\.q_norm \(LayerNorm\).*attn\.k_norm.*AttentionModule"):
        mt.MAC(model, attention={"attn.qkv": mt.QKV(num_heads=2)})
    mt.MAC(model, attention={"attn.qkv": mt.QKV(num_heads=2, mode="off")})
    mt.MAC(Block(TimmLikeAttention(qk_norm=False)), attention={"attn.qkv": mt.QKV(num_heads=2)})


@pytest.mark.parametrize("mode", ["reference", "per_head"])
def test_qk_norm_with_the_modules_own_probabilities(mode):
    """The same module declared with AttentionModule(qkv=..., probs=...): the statistics use the
    probabilities it computed WITH its q/k norms (== the oracle); recomputing them without the
    norms would differ (negative control)."""
    torch.manual_seed(3)
    model = Block(TimmLikeAttention(qk_norm=True)).to(DT)
    with torch.no_grad():
        model.attn.q_norm.weight.mul_(3.0)
    x = torch.randn(4, 5, 8, dtype=DT)
    decl = mt.AttentionModule(qkv="qkv", mode=mode, num_heads=2, probs=lambda m, out: m.last_attn)
    pre = mt.MACPreconditioner(model, damping=LAM, t_cov=1, t_inv=1, attention={"attn": decl})
    model(x).pow(2).mean().backward()
    layer = next(l for l in pre.layers if l.name == "attn.qkv")
    attn = model.attn.last_attn
    want = _oracle_vbar(x, attn, mode, 2, True)
    got = layer.acc["mean"].value
    got_v = got[2] if mode == "reference" else got[4:]
    assert_close(got_v, want, **TOL)
    with torch.no_grad():
        recomputed = mt.attention.qkv_probs(model.attn.qkv(x), maccore.QkvSpec(num_heads=2))
    wrong = _oracle_vbar(x, recomputed, mode, 2, True)
    assert float((wrong - want).abs().max()) > 1e-4


class CrossAttention(nn.Module):
    """Separate projections; keys/values from a memory of another length (L != S)."""

    def __init__(self, d=8, heads=2, average=False):
        super().__init__()
        self.heads, self.dh, self.average = heads, d // heads, average
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mem):
        b, n, d = x.shape
        s = mem.shape[1]
        q = self.q_proj(x).reshape(b, n, self.heads, self.dh).transpose(1, 2)
        k = self.k_proj(mem).reshape(b, s, self.heads, self.dh).transpose(1, 2)
        v = self.v_proj(mem).reshape(b, s, self.heads, self.dh).transpose(1, 2)
        attn = (q @ k.transpose(-1, -2) / math.sqrt(self.dh)).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return out, (attn.mean(1) if self.average else attn)


class CrossNet(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = CrossAttention(**kw)

    def forward(self, x, mem):
        return self.attn(x, mem)[0]


def test_cross_attention_and_shape_mismatch_are_refused():
    model = CrossNet().to(DT)
    pre = mt.MACPreconditioner(model, t_cov=1, t_inv=1,
                               attention={"attn": mt.AttentionModule(value="v_proj", num_heads=2)})
    x, mem = torch.randn(2, 3, 8, dtype=DT), torch.randn(2, 5, 8, dtype=DT)
    with pytest.raises(ValueError, match=r"attention\['attn'\].*\[2, 2, 3, 5\].*\[2, 5, 8\].*attn\.v_proj"
                                         r".*cross-attention"):
        model(x, mem)
    pre.remove_hooks()
    model = CrossNet(average=True).to(DT)
    pre = mt.MACPreconditioner(model, t_cov=1, t_inv=1,
                               attention={"attn": mt.AttentionModule(value="v_proj", num_heads=2)})
    with pytest.raises(ValueError, match=r"\[2, 5, 5\].*attn\.v_proj"):
        model(mem, mem)


def test_cross_attention_with_equal_lengths_is_exact():
    """L == S: the value projection's input is the memory; Σ_j α_ij W_V m_j is still the value
    path, so the weighted mean of the memory rows is exact."""
    model = CrossNet().to(DT)
    pre = mt.MACPreconditioner(model, t_cov=1, t_inv=1,
                               attention={"attn": mt.AttentionModule(value="v_proj", num_heads=2)})
    x, mem = torch.randn(2, 4, 8, dtype=DT), torch.randn(2, 4, 8, dtype=DT)
    model(x, mem).sum().backward()
    with torch.no_grad():
        attn = model.attn(x, mem)[1]
    layer = next(l for l in pre.layers if l.name == "attn.v_proj")
    assert_close(layer.acc["mean"].value, _oracle_vbar(mem, attn, "reference", 2, True), **TOL)


def test_declaration_errors(tr):
    with pytest.raises(ValueError, match="exactly one of value= .* and qkv="):
        mt.AttentionModule(value="v_proj", qkv="qkv")
    with pytest.raises(ValueError, match="exactly one"):
        mt.AttentionModule()
    with pytest.raises(ValueError, match="mode must be one of"):
        mt.AttentionModule(value="v", mode="exact")
    model = _make(tr, "llama")
    with pytest.raises(ValueError, match=r"LlamaAttention has no submodule 'value'"):
        mt.MAC(model, attention={"model.layers.0.self_attn": mt.AttentionModule(value="value")})
    with pytest.raises(ValueError, match="names the attention MODULE"):
        mt.MAC(model, attention={"model.layers.0.self_attn.v_proj": mt.AttentionModule(value="x")})
    with pytest.raises(ValueError, match="attention must be a mapping or 'auto'"):
        mt.MAC(model, attention="all")
    net = CrossNet()
    with pytest.raises(ValueError, match=r"cannot read the number of heads.*num_heads=H"):
        mt.MAC(net, attention={"attn": mt.AttentionModule(value="v_proj")})


def test_qkvspec_value_layout_validation():
    with pytest.raises(ValueError, match="num_kv_heads must be a positive divisor"):
        maccore.QkvSpec(num_heads=4, layout="v", num_kv_heads=3)
    with pytest.raises(ValueError, match="needs layout='v'"):
        maccore.QkvSpec(num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="layout must be"):
        maccore.QkvSpec(num_heads=4, layout="kv")
    assert maccore.QkvSpec(num_heads=4, layout="v").kv_heads == 4


def test_float32_model_within_float32_tolerance(tr):
    """A float32 model: the fed V mean (statistics in float32) vs the float64 oracle of the same
    float32 probabilities and inputs, within the float32 tolerance."""
    torch.manual_seed(0)
    model = _bert(tr).train()
    kw, loss_fn = _batch("bert")
    pre = mt.MACPreconditioner(model, damping=LAM, t_cov=1, t_inv=1,
                               attention=_declare("bert", "per_head"))
    probs, inputs, mods = _own_probs_and_inputs(model, "bert", kw)
    loss_fn(model(**kw)).backward()
    for i, m in enumerate(mods):
        layer = next(l for l in pre.layers if l.modules[0] is m)
        got = layer.acc["mean"].value
        assert got.dtype == torch.float32
        want = _oracle_vbar(inputs[i].double(), probs[i].double(), "per_head", 4, True)
        assert_close(got, want, **tol(XP, torch.float32))
        ERRORS[("bert-float32", "per_head", "vbar")] = _rel_err(got.double(), want)


def test_gradient_accumulation_pools_forwards(tr):
    """Two forwards in one collecting step: the value factor is the row-weighted mean of the two
    forwards' attention-weighted means (each from its own probabilities)."""
    model = _make(tr, "llama")
    pre = mt.MACPreconditioner(model, damping=LAM, t_cov=1, t_inv=1, attention="auto")
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(1, 64, (2, 6), generator=g), torch.randint(1, 64, (3, 6), generator=g)]
    want = []
    for ids in batches:
        probs, inputs, _ = _own_probs_and_inputs(model, "llama", {"input_ids": ids})
        want.append(_oracle_vbar(inputs[0], probs[0], "reference", 2, True))
    for ids in batches:
        (model(input_ids=ids).logits ** 2).mean().backward()
    layer = next(l for l in pre.layers if l.name == "model.layers.0.self_attn.v_proj")
    assert_close(layer.acc["mean"].value, (2 * want[0] + 3 * want[1]) / 5, **TOL)
    pre.step()
    assert not pre._capture._waiting


def test_state_dict_round_trip_per_head(tr):
    model = _make(tr, "llama")
    kw, loss_fn = _batch("llama")
    decl = _declare("llama", "per_head")
    pre = mt.MACPreconditioner(model, damping=LAM, t_cov=1, t_inv=1, attention=decl)
    loss_fn(model(**kw)).backward()
    pre.step()
    pre2 = mt.MACPreconditioner(_make(tr, "llama"), damping=LAM, attention=decl)
    pre2.load_state_dict(pre.state_dict())
    v = "model.layers.0.self_attn.v_proj"
    assert_close(pre2.states()[v].mean_hat, pre.states()[v].mean_hat, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"v_proj"):  # a reference-mode state has shape [d̃]
        mt.MACPreconditioner(_make(tr, "llama"), attention="auto").load_state_dict(pre.state_dict())


def test_core_value_layout_on_numpy():
    """The core's value-projection statistics (QkvSpec layout "v") are backend-neutral: NumPy
    float64 against the written-out formulas, GQA grouping included; mode "off" is ā."""
    import numpy as np

    from maccore.engine import mac_method, qkv_mean

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6))
    s = rng.standard_normal((2, 4, 5, 5))
    attn = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    for mode in ("reference", "per_head", "off"):
        spec = maccore.LayerSpec(maccore.LayerKind.LINEAR, 6, 6, True, name="v",
                                 qkv=maccore.QkvSpec(num_heads=4, mode=mode, layout="v",
                                                     num_kv_heads=2))
        got = qkv_mean(spec, x, attn=attn)
        if mode == "off":
            want = maccore.mean_activation(maccore.linear_rows(x, bias=True))
        else:
            want = _oracle_vbar(torch.from_numpy(x), torch.from_numpy(attn), mode, 2, True).numpy()
        assert_close(got, want, **tol(np, np.float64))
        state = mac_method().init(spec, xp=array_api_compat.array_namespace(x), dtype=np.float64)
        assert state.mean_hat.shape == want.shape
    bad = maccore.LayerSpec(maccore.LayerKind.LINEAR, 6, 6, True, name="v",
                            qkv=maccore.QkvSpec(num_heads=2, layout="v"))
    with pytest.raises(ValueError, match=r"layer 'v'.*num_heads=2"):
        qkv_mean(bad, x, attn=attn)


def test_attention_dropout_uses_the_weights_of_that_forward(tr):
    """Documented behaviour with attention dropout p > 0 in training: the statistics use the
    dropped-out, 1/(1−p)-rescaled weights the module returned in THAT forward (the value path's
    actual inputs); the bias entry stays exactly 1."""
    torch.manual_seed(0)
    cfg = tr.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.5, attn_implementation="eager")
    model = tr.BertForMaskedLM(cfg).to(DT).train()
    name = "bert.encoder.layer.0.attention.self"
    pre = mt.MACPreconditioner(model, t_cov=1, t_inv=1, attention="auto")
    seen = {}
    attn_mod = model.get_submodule(name)
    h1 = attn_mod.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o[1].detach()))
    h2 = attn_mod.value.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0].detach()))
    ids = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(2))
    (model(input_ids=ids).logits ** 2).mean().backward()
    h1.remove(), h2.remove()
    assert float((seen["attn"] == 0).double().mean()) > 0.2  # dropout did act
    got = next(l for l in pre.layers if l.name == f"{name}.value").acc["mean"].value
    assert_close(got, _oracle_vbar(seen["x"], seen["attn"], "reference", 4, True), **TOL)
    assert float(got[-1]) == 1.0


def test_report_deviations():
    """Prints the measured max relative deviations of the tests above (pytest -s)."""
    wide = [v for k, v in ERRORS.items() if "float32" not in k[0]]
    if wide:  # (under pytest-xdist this worker may have run none of the float64 cases)
        worst = max(wide)
        print("\nmax relative error vs float64 oracle:", f"{worst:.2e}",
              {"/".join(k): f"{v:.1e}" for k, v in sorted(ERRORS.items())})
        assert worst < TOL["rtol"] * 10
