"""The JAX model zoo (issue #13): a Flax NNX transformer (``nnx.MultiHeadAttention``, causal) and an
Equinox transformer (``eqx.nn.MultiheadAttention`` with a causal mask, token-wise ``jax.vmap`` MLPs)
in tiny configs × MAC / KFAC / SINGD: the preconditioned and skipped layers
(``maccore_jax.report``), attention detected (the value projections get the attention-weighted
mean under MAC), the loss decreases over 20 steps, and the adapter's update equals the core
function on the captured arrays."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")
eqx = pytest.importorskip("equinox")

try:
    import maccore_jax as mj
except ImportError:  # the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "adapters"))
    import maccore_jax as mj

import jax.numpy as jnp
import numpy as np
import optax

import maccore

F32 = jnp.float32
STEPS = 20
V, D, H, N, B, L = 16, 8, 2, 6, 4, 1  # vocabulary, width, heads, tokens, batch, blocks


def _ids():
    return jnp.asarray(np.random.default_rng(1).integers(0, V, (B, N + 1)), jnp.int32)


def _xent(logits, targets):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


# ---- models ---------------------------------------------------------------------------------------
class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(H, D, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.fc1 = nnx.Linear(D, 2 * D, rngs=rngs)
        self.fc2 = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x), is_causal=True)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class NnxPos(nnx.Module):
    def __init__(self):
        self.embedding = nnx.Param(0.02 * jax.random.normal(jax.random.key(5), (N, D)))


class NnxGPT(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.pos = NnxPos()  # a learned positional embedding (leaf "pos/embedding")
        self.blocks = nnx.List([NnxBlock(rngs) for _ in range(L)])
        self.ln_f = nnx.LayerNorm(D, rngs=rngs)
        self.head = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids) + self.pos.embedding[...]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class EqxBlock(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 3)
        self.ln1, self.ln2 = eqx.nn.LayerNorm(D), eqx.nn.LayerNorm(D)
        self.attn = eqx.nn.MultiheadAttention(H, D, use_query_bias=True, use_key_bias=True,
                                              use_value_bias=True, use_output_bias=True, key=k[0])
        self.fc1 = eqx.nn.Linear(D, 2 * D, key=k[1])
        self.fc2 = eqx.nn.Linear(2 * D, D, key=k[2])

    def __call__(self, x):  # x [N, D]: one sequence
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h, mask=jnp.tril(jnp.ones((x.shape[0],) * 2, bool)))
        h = jax.vmap(self.ln2)(x)
        return x + jax.vmap(self.fc2)(jax.nn.gelu(jax.vmap(self.fc1)(h)))


class EqxPos(eqx.Module):
    embedding: jax.Array


class EqxGPT(eqx.Module):
    embed: eqx.nn.Embedding
    pos: EqxPos
    blocks: list
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, L + 3)
        self.embed = eqx.nn.Embedding(V, D, key=k[0])
        self.pos = EqxPos(0.02 * jax.random.normal(k[1], (N, D)))
        self.blocks = [EqxBlock(k[2 + i]) for i in range(L)]
        self.ln_f = eqx.nn.LayerNorm(D)
        self.head = eqx.nn.Linear(D, V, key=k[-1])

    def __call__(self, ids):  # ids [N]
        x = jax.vmap(self.embed)(ids) + self.pos.embedding
        for blk in self.blocks:
            x = blk(x)
        return jax.vmap(self.head)(jax.vmap(self.ln_f)(x))


# ---- the two frameworks behind one interface ----------------------------------------------------
class NnxCase:
    layout = "flax"
    value = "value"

    def __init__(self):
        model = NnxGPT(nnx.Rngs(0))
        self.specs = mj.nnx.layer_specs(model)
        self.graphdef, p, self.rest = nnx.split(model, nnx.Param, ...)
        self._p = nnx.as_pure(p)

    def params(self):
        return self._p

    def grads(self, ids, want_g):
        m = nnx.merge(self.graphdef, self._p, self.rest)
        x, t = ids[:, :-1], ids[:, 1:]
        perts = mj.nnx.output_zeros(m, x) if want_g else {}

        def loss_fn(model, q):
            out, acts = mj.nnx.apply(model, x, perturbations=q if want_g else None)
            return _xent(out, t), acts

        (loss, acts), (g, gouts) = nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(m, perts)
        return loss, acts, nnx.as_pure(nnx.state(g, nnx.Param)), gouts

    def set_params(self, p):
        self._p = p

    def layer(self, tree, name):
        node = tree
        for k in name.split("/"):
            node = node[int(k) if k.isdigit() and not isinstance(node, dict) else k]
        return node

    def grad_matrix(self, node):
        k, b = node["kernel"], node["bias"]
        return maccore.grad_matrix(jnp.reshape(k, (D, -1)).T, b.reshape(-1))

    def act(self, acts, name):
        return mj.specs.lookup(acts, "acts")[name]


class EqxCase:
    layout = "equinox"
    value = "value_proj"

    def __init__(self):
        self.model = EqxGPT(jax.random.key(0))
        self.specs = mj.equinox.layer_specs(self.model)
        self._p, self.static = eqx.partition(self.model, eqx.is_array)

    def params(self):
        return self._p

    def grads(self, ids, want_g):
        x, t = ids[:, :-1], ids[:, 1:]
        static = self.static
        perts = mj.equinox.output_zeros(eqx.combine(self._p, static), x) if want_g else {}

        def loss_fn(p, q):
            out, acts = mj.equinox.apply(eqx.combine(p, static), x,
                                         perturbations=q if want_g else None)
            return _xent(out, t), acts

        (loss, acts), (g, gouts) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(self._p, perts)
        return loss, acts, g, gouts

    def set_params(self, p):
        self._p = p

    def layer(self, tree, name):
        node = tree
        for k in name.split("/"):
            node = node[int(k)] if k.isdigit() else getattr(node, k)
        return node

    def grad_matrix(self, node):
        return maccore.grad_matrix(node.weight, node.bias)

    def act(self, acts, name):
        return acts[name]


CASES = {"nnx": NnxCase, "equinox": EqxCase}


def _tx(kind, case):
    kw = dict(layers=case.specs, layout=case.layout, strict=True)
    if kind == "mac":
        return mj.mac(0.05, t_cov=1, t_inv=5, **kw)
    if kind == "kfac":
        return mj.kfac(0.05, damping=0.1, **kw)
    return mj.singd(0.05, **kw)


def _expected(case):
    v = case.value
    proj = ("query", "key", "value", "out") if v == "value" else (
        "query_proj", "key_proj", "value_proj", "output_proj")
    names = {f"blocks/{i}/{p}" for i in range(L) for p in (*[f"attn/{q}" for q in proj], "fc1", "fc2")}
    return names | {"head"}, {f"blocks/{i}/attn/{v}" for i in range(L)}


@pytest.mark.parametrize("kind", ["mac", "kfac", "singd"])
@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_zoo_trains_and_reports(framework, kind):
    case = CASES[framework]()
    params = case.params()
    pre, values = _expected(case)
    found, skipped = mj.specs.coverage(params, layout=case.layout, layers=case.specs)
    assert set(found) == pre, sorted(found)
    assert all(found[v].qkv is not None and found[v].qkv.layout == "v" for v in values)
    assert not [s for s in skipped if s.suspicious]
    skip_names = {s.parameter for s in skipped}
    emb = "embed/embedding" if framework == "nnx" else "embed/weight"
    assert {emb, "pos/embedding", "ln_f/scale" if framework == "nnx" else "ln_f/weight"} <= skip_names
    rep = mj.report(params, layout=case.layout, layers=case.specs, method=kind.upper())
    assert rep.count("attention value (H=2, reference)") == 2 * L  # kernel/weight and bias rows
    tx = _tx(kind, case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        state = tx.init(params)
    ids = _ids()
    want_g = kind != "mac"

    @jax.jit
    def step(p, st):
        case.set_params(p)
        loss, acts, g, gouts = case.grads(ids, want_g)
        u, st = tx.update(g, st, p, activations=acts, output_grads=gouts if want_g else None)
        return optax.apply_updates(p, u), st, loss

    losses = []
    p = params
    for _ in range(STEPS):
        p, state, loss = step(p, state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_zoo_value_projection_update_equals_core(framework):
    """MAC on the captured arrays: the value projection of block 0 gets
    ``mac_apply(G, attention_weighted_mean(x, probs))``, the query projection ``mac_apply(G, ā)``."""
    case = CASES[framework]()
    params = case.params()
    _, acts, g, _ = case.grads(_ids(), False)
    tx = mj.scale_by_mac(layers=case.specs, layout=case.layout, t_cov=1, t_inv=1, damping=0.7)
    upd, _ = tx.update(g, tx.init(params), params, activations=acts)
    q = "query" if framework == "nnx" else "query_proj"
    for proj in (case.value, q):
        name = f"blocks/0/attn/{proj}"
        a = case.act(acts, name)
        if proj == case.value:
            assert isinstance(a, mj.AttentionInput) and a.probs.shape == (B, H, N, N)
            mean = maccore.attention_weighted_mean(a.x, a.probs, bias=True)
        else:
            mean = maccore.mean_activation(maccore.linear_rows(a.reshape(-1, D), bias=True))
        want = maccore.mac_apply(case.grad_matrix(case.layer(g, name)), mean, 0.7)
        got = case.grad_matrix(case.layer(upd, name))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-7,
                                   err_msg=name)
