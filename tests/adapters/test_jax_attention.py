"""issue #13 (JAX): attention-aware MAC for separate q/k/v projections (``nnx.MultiHeadAttention``,
``eqx.nn.MultiheadAttention``) and capture of token-wise (``jax.vmap``) Equinox layers.

Float64 throughout. Oracles are independent of the capture: nnx's own ``sow_weights`` probabilities
(a separate call), or softmax(q kᵀ/√d) recomputed here from the Equinox module's own submodules; the
value projection's MAC update is compared with ``maccore.mac_apply`` on
``maccore.attention_weighted_mean`` of those arrays, q/k (and a negative control for V) with the
plain mean ā.
"""

from __future__ import annotations

import warnings

import pytest

from tests.adapters._jax_common import to_np, x64_module  # noqa: F401  (path setup for maccore_jax)

import jax
import jax.numpy as jnp
import numpy as np

import maccore
import maccore_jax as mj

nnx = pytest.importorskip("flax.nnx")
eqx = pytest.importorskip("equinox")

F64 = jnp.float64
LAM = 0.5


pytestmark = pytest.mark.usefixtures("x64_module")  # float64 oracles (_jax_common)


def rand(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype=F64)


def close(a, b, rtol=1e-10, atol=1e-12, msg=""):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol,
                               atol=atol, err_msg=msg)


def rows_mean(x):
    return maccore.mean_activation(maccore.linear_rows(jnp.reshape(x, (-1, x.shape[-1])), bias=True))


def value_mean(x, probs, mode, kv_heads=None):
    v = maccore.attention_weighted_mean(x, probs, bias=True, mode=mode)
    if mode == "per_head" and kv_heads is not None and kv_heads != probs.shape[1]:
        v = jnp.mean(jnp.reshape(v, (kv_heads, -1, v.shape[-1])), axis=1)
    return v


# ---- Flax nnx -------------------------------------------------------------------------------------
class NnxNet(nnx.Module):
    def __init__(self, rngs, kv_heads=None):
        self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=6, qkv_features=8,
                                           num_kv_heads=kv_heads, decode=False, rngs=rngs,
                                           param_dtype=F64)
        self.head = nnx.Linear(6, 3, rngs=rngs, param_dtype=F64)

    def __call__(self, x, mask=None):
        return self.head(jnp.tanh(self.attn(x, mask=mask, is_causal=True)).mean(1))


def _nnx_loss(m, x, y, mask):
    out, acts = mj.nnx.apply(m, x, mask=mask)
    return jnp.mean((out - y) ** 2), acts


def _padding_mask(b, n):
    keep = jnp.arange(n)[None, :] < jnp.asarray([n, n - 2, n - 1])[:b, None]  # [B, N]
    return keep[:, None, None, :] & keep[:, None, :, None]  # [B, 1, N, N]


@pytest.mark.parametrize("mode,kv", [("reference", None), ("per_head", None), ("per_head", 2)])
def test_nnx_value_mean_and_update_equal_core(mode, kv):
    m = NnxNet(nnx.Rngs(0), kv_heads=kv)
    x, y = rand(1, (3, 5, 6)), rand(2, (3, 3))
    mask = _padding_mask(3, 5)
    specs = mj.nnx.layer_specs(m, attention_mode=mode)
    assert specs["attn/value"] == mj.QKV(num_heads=4, mode=mode, layout="v", num_kv_heads=kv)
    assert specs["attn/query"] == specs["attn/key"] == mj.Dense(in_ndim=1)
    (_, acts), g = nnx.value_and_grad(_nnx_loss, has_aux=True)(m, x, y, mask)
    got = acts["attn"]["value"]
    assert isinstance(got, mj.AttentionInput) and not hasattr(m.attn, "attention_weights")
    # oracle: the module's own sown weights, from a separate call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        m.attn(x, mask=mask, is_causal=True, sow_weights=True)
    oracle = m.attn.attention_weights.get_value()[-1]
    del m.attn.attention_weights
    assert oracle.shape == (3, 4, 5, 5)
    close(got.probs, oracle, rtol=0, atol=0)
    assert float(jnp.max(jnp.abs(jnp.triu(oracle[0], 1)))) == 0.0  # causal flag honoured
    assert float(jnp.max(jnp.abs(oracle[1, :, :3, 3:]))) == 0.0  # padding mask honoured (fully
    # masked query rows are uniform in flax: they are what the model computes, and are kept)
    close(got.x, x, rtol=0, atol=0)
    params = nnx.as_pure(nnx.state(m, nnx.Param))
    grads = nnx.as_pure(nnx.state(g, nnx.Param))
    tx = mj.scale_by_mac(layers=specs, t_cov=1, t_inv=1, damping=LAM)
    upd, st = jax.jit(tx.update)(grads, tx.init(params), params, activations=acts)
    vbar = value_mean(x, oracle, mode, kv)
    assert st.layers["attn/value"].mean.value.shape == vbar.shape
    for name, mean in (("value", vbar), ("query", rows_mean(x)), ("key", rows_mean(x))):
        k, b = grads["attn"][name]["kernel"], grads["attn"][name]["bias"]
        G = maccore.grad_matrix(jnp.reshape(k, (6, -1)).T, b.reshape(-1))
        got_u = maccore.grad_matrix(jnp.reshape(upd["attn"][name]["kernel"], (6, -1)).T,
                                    upd["attn"][name]["bias"].reshape(-1))
        close(got_u, maccore.mac_apply(G, mean, LAM), msg=name)
        if name == "value":  # negative control: the plain mean gives a different update
            plain = maccore.mac_apply(G, rows_mean(x), LAM)
            assert float(jnp.max(jnp.abs(got_u - plain))) > 1e-4
            assert float(jnp.max(jnp.abs(vbar - rows_mean(x)))) > 1e-3


def test_nnx_attention_off_and_errors():
    m = NnxNet(nnx.Rngs(0))
    x = rand(1, (2, 5, 6))
    _, acts = mj.nnx.apply(m, x, attention=False)
    assert not isinstance(acts["attn"]["value"], mj.AttentionInput)
    assert mj.nnx.layer_specs(m, attention_mode="off")["attn/value"] == mj.Dense(in_ndim=1)
    with pytest.raises(ValueError, match="attention_mode"):
        mj.nnx.layer_specs(m, attention_mode="exact")
    # a value projection declared attention-aware without probabilities: a clear error
    params = nnx.as_pure(nnx.state(m, nnx.Param))
    tx = mj.scale_by_mac(layers=mj.nnx.layer_specs(m), t_cov=1, t_inv=1)
    with pytest.raises(ValueError, match=r"'attn/value'.*AttentionInput"):
        tx.update(params, tx.init(params), params, activations=acts)
    # a model that sows the weights itself keeps them (the capture reads them, removes nothing)
    class UserSow(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.MultiHeadAttention(2, 4, decode=False, rngs=rngs, param_dtype=F64)

        def __call__(self, x):
            return self.attn(x, sow_weights=True)

    u = UserSow(nnx.Rngs(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _, a = mj.nnx.apply(u, rand(4, (2, 3, 4)))
    kept = u.attn.attention_weights.get_value()
    assert len(kept) == 1
    close(a["attn"]["value"].probs, kept[-1], rtol=0, atol=0)
    # a custom attention_fn that does not sow: refused by name
    m.attn.attention_fn = lambda q, k, v, **kw: nnx.dot_product_attention(q, k, v, mask=kw["mask"])
    with pytest.raises(ValueError, match=r"'attn'.*did not sow"):
        mj.nnx.apply(m, x)


# ---- Equinox --------------------------------------------------------------------------------------
class EqxNet(eqx.Module):
    attn: eqx.nn.MultiheadAttention
    mlp: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 3)
        self.attn = eqx.nn.MultiheadAttention(4, 6, qk_size=3, vo_size=2, use_query_bias=True,
                                              use_key_bias=True, use_value_bias=True,
                                              use_output_bias=True, dtype=F64, key=k[0])
        self.mlp = eqx.nn.Linear(6, 6, dtype=F64, key=k[1])
        self.head = eqx.nn.Linear(6, 3, dtype=F64, key=k[2])

    def __call__(self, x, mask=None):
        h = x + self.attn(x, x, x, mask)
        h = jax.vmap(self.mlp)(jnp.tanh(h))  # token-wise
        return self.head(h.mean(0))


def _eqx_probs(mha, x, mask):
    """softmax(q kᵀ/√d) from the module's own projections, written out here (float64)."""
    q = jax.vmap(jax.vmap(mha.query_proj))(x).reshape(x.shape[0], x.shape[1], mha.num_heads, -1)
    k = jax.vmap(jax.vmap(mha.key_proj))(x).reshape(x.shape[0], x.shape[1], mha.num_heads, -1)
    s = jnp.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1)


@pytest.mark.parametrize("mode,mask_kind", [("reference", "causal"), ("per_head", "per_head"),
                                            ("reference", None)])
def test_equinox_value_mean_and_update_equal_core(mode, mask_kind):
    m = EqxNet(jax.random.key(0))
    x, y = rand(1, (3, 5, 6)), rand(2, (3, 3))
    mask = None
    if mask_kind == "causal":
        mask = jnp.tril(jnp.ones((5, 5), bool))
    elif mask_kind == "per_head":
        mask = jnp.asarray(np.random.default_rng(3).random((4, 5, 5)) < 0.6) | jnp.eye(5, dtype=bool)
    specs = mj.equinox.layer_specs(m, attention_mode=mode)
    assert specs["attn/value_proj"] == mj.QKV(num_heads=4, mode=mode, layout="v")
    params, static = eqx.partition(m, eqx.is_array)

    def loss_fn(p):
        out, acts = mj.equinox.apply(eqx.combine(p, static), x, mask=mask)
        return jnp.mean((out - y) ** 2), acts

    (loss, acts), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    ref_out = jax.vmap(lambda a: m(a, mask))(x)
    close(loss, jnp.mean((ref_out - y) ** 2))  # the capture does not change the forward
    got = acts["attn/value_proj"]
    oracle = _eqx_probs(m.attn, x, mask)
    close(got.probs, oracle, rtol=1e-12, atol=1e-14)
    close(got.x, x, rtol=0, atol=0)
    tx = mj.scale_by_mac(layers=specs, layout="equinox", t_cov=1, t_inv=1, damping=LAM)
    upd, _ = jax.jit(tx.update)(g, tx.init(params), params, activations=acts)
    vbar = value_mean(x, oracle, mode)
    h = x + jax.vmap(lambda a: m.attn(a, a, a, mask))(x)
    for name, inp, mean in (("value_proj", x, vbar), ("query_proj", x, rows_mean(x)),
                            ("mlp", jnp.tanh(h), rows_mean(jnp.tanh(h)))):
        lin_g = getattr(g.attn, name, None) if name != "mlp" else g.mlp
        lin_u = getattr(upd.attn, name, None) if name != "mlp" else upd.mlp
        G = maccore.grad_matrix(lin_g.weight, lin_g.bias)
        close(maccore.grad_matrix(lin_u.weight, lin_u.bias), maccore.mac_apply(G, mean, LAM),
              rtol=1e-9, atol=1e-11, msg=name)
        if name == "mlp":  # the token-wise capture = the layer applied to the stacked tokens
            close(acts["mlp"], jnp.tanh(h), rtol=1e-12, atol=1e-13)
        if name == "value_proj":
            plain = maccore.mac_apply(G, rows_mean(x), LAM)
            assert float(jnp.max(jnp.abs(maccore.grad_matrix(lin_u.weight, lin_u.bias) - plain))) > 1e-4


def test_equinox_attention_refusals():
    m = EqxNet(jax.random.key(0))
    x = rand(1, (2, 5, 6))

    class Rope(eqx.Module):
        attn: eqx.nn.MultiheadAttention

        def __call__(self, x):
            return self.attn(x, x, x, process_heads=lambda q, k, v: (q * 2, k, v))

    r = Rope(m.attn)
    with pytest.raises(ValueError, match=r"'attn'.*process_heads"):
        mj.equinox.apply(r, x)
    _, acts = mj.equinox.apply(r, x, attention=False)  # the documented way out
    assert acts["attn/value_proj"].shape == (2, 5, 6)


# ---- Equinox token-wise capture (jax.vmap inside the model) ---------------------------------------
class TokenNet(eqx.Module):
    inp: eqx.nn.Linear
    per_head: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 3)
        self.inp = eqx.nn.Linear(4, 6, dtype=F64, key=k[0])
        self.per_head = eqx.nn.Linear(3, 3, use_bias=False, dtype=F64, key=k[1])
        self.out = eqx.nn.Linear(6, 2, dtype=F64, key=k[2])

    def __call__(self, x):  # x [N, 4]
        h = jnp.tanh(jax.vmap(self.inp)(x))  # [N, 6]
        h = jax.vmap(jax.vmap(self.per_head))(h.reshape(-1, 2, 3)).reshape(-1, 6)  # nested vmaps
        return jax.vmap(self.out)(h).sum(0)


def test_equinox_vmapped_layers_capture_equals_stacked_tokens():
    m = TokenNet(jax.random.key(0))
    x, y = rand(1, (3, 5, 4)), rand(2, (3, 2))
    params, static = eqx.partition(m, eqx.is_array)
    perts = mj.equinox.output_zeros(m, x)
    assert jax.tree.map(jnp.shape, perts) == {"inp": (3, 5, 6), "per_head": (3, 5, 2, 3),
                                              "out": (3, 5, 2)}

    def loss_fn(p, q):
        out, acts = mj.equinox.apply(eqx.combine(p, static), x, perturbations=q)
        return jnp.mean((out - y) ** 2), acts

    (loss, acts), (g, gouts) = jax.jit(jax.value_and_grad(loss_fn, (0, 1), has_aux=True))(params, perts)
    close(loss, jnp.mean((jax.vmap(m)(x) - y) ** 2))
    h1 = jnp.tanh(x @ m.inp.weight.T + m.inp.bias)  # the stacked tokens, written out
    close(acts["inp"], x, rtol=0, atol=0)
    close(acts["per_head"], h1.reshape(3, 5, 2, 3), rtol=1e-13, atol=1e-14)
    # the output gradients are the loss gradients w.r.t. the stacked outputs: ∇W = Σ g xᵀ
    for name, lin in (("inp", m.inp), ("per_head", m.per_head), ("out", m.out)):
        xa, ga = acts[name].reshape(-1, lin.in_features), gouts[name].reshape(-1, lin.out_features)
        close(getattr(g, name).weight, ga.T @ xa, rtol=1e-10, atol=1e-13, msg=name)
    for kind in ("mac", "kfac"):
        scale = {"mac": mj.scale_by_mac, "kfac": mj.scale_by_kfac}[kind]
        kw = {"reduction_factor": 1.0 / 6} if kind == "kfac" else {}
        tx = scale(layout="equinox", t_cov=1, t_inv=1, damping=LAM, **kw)
        upd, _ = tx.update(g, tx.init(params), params, activations=acts, output_grads=gouts)
        rows = maccore.linear_rows(acts["per_head"].reshape(-1, 3), bias=False)
        G = g.per_head.weight
        if kind == "mac":
            want = maccore.mac_apply(G, maccore.mean_activation(rows), LAM)
        else:
            gr = maccore.grad_rows(gouts["per_head"].reshape(-1, 3))
            want = maccore.kfac_apply(G, maccore.input_factor(rows),
                                      maccore.gradient_factor(gr, reduction_factor=1.0 / 6), LAM)
        close(upd.per_head.weight, want, rtol=1e-9, atol=1e-12, msg=kind)


def test_equinox_layer_under_scan_is_named():
    class Scanned(eqx.Module):
        lin: eqx.nn.Linear

        def __call__(self, x):
            def step(c, t):
                return c + self.lin(t), None
            return jax.lax.scan(step, jnp.zeros(2, F64), x)[0]

    m = Scanned(eqx.nn.Linear(4, 2, dtype=F64, key=jax.random.key(0)))
    with pytest.raises(ValueError, match=r"\['lin'\].*other than jax.vmap"):
        mj.equinox.apply(m, rand(0, (2, 5, 4)))
