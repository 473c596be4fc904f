"""KFAC that trains at its defaults (issue 13): the KL clipping of both adapters is the core's
:func:`maccore.kl_clip_scale` (torch == JAX, the same ν every step, float64), ``kl_clip=None``
reproduces the unclipped update exactly, and the default damping / ``kl_clip`` decrease the loss
where the previous defaults (damping 1e-3, no clipping) diverge.

The transformer zoo cases (GPT-2, Llama, BERT) are in ``tests/zoo/test_zoo_torch.py``; the JAX
models here are a Flax linen CNN and a Flax NNX transformer (docs/kfac.md has the measured losses).
"""

from __future__ import annotations

import math
import warnings

import pytest

from tests.adapters._jax_common import F32, to_np

torch = pytest.importorskip("torch")
maccore_torch = pytest.importorskip("maccore_torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import maccore  # noqa: E402
import maccore_jax as mj  # noqa: E402
from tests.adapters.test_parity_torch_jax import (  # noqa: E402
    PAIRS,
    R,
    TorchMLP,
    data,
    flax_params,
    jax_model_layers,
    jax_stepper,
    loss_torch,
)

STEPS = 20
# active clipping on the parity MLP (ν < 1 on most steps): a large step and a small budget
CLIP = dict(momentum=0.5, stat_decay=0.9, damping=0.3, weight_decay=0.01, t_cov=1, t_inv=2,
            reduction_factor=R)
LR, KL = 0.5, 1e-3


# ---- torch == JAX: the same ν -----------------------------------------------------------------
def _torch_run(kl_clip, *, lr=LR, steps=STEPS):
    torch.manual_seed(0)
    tmodel = TorchMLP().to(torch.float64)
    opt = maccore_torch.KFAC(tmodel, lr=lr, kl_clip=kl_clip, weight_decay_mode="decoupled", **CLIP)
    nus = []
    for x, y in data("mlp")[:steps]:
        opt.zero_grad()
        loss_torch(tmodel(torch.from_numpy(x).double()), torch.from_numpy(y).double()).backward()
        opt.step()
        nu = opt.preconditioner.last_kl_scale
        nus.append(None if nu is None else float(nu))
    with jax.enable_x64(True):
        final = jax.tree.map(lambda a: np.array(to_np(a)), flax_params(tmodel, PAIRS["mlp"], jnp.float64))
    return final, nus


def _start64():
    torch.manual_seed(0)
    return jax.tree.map(lambda a: np.array(to_np(a)), flax_params(TorchMLP(), PAIRS["mlp"]))


def _jax_tx(kl_clip, lr=LR, layers=None):
    return mj.kfac(learning_rate=lr, kl_clip=kl_clip, layers=layers, **CLIP)


def _jax_run(kl_clip, *, lr=LR, steps=STEPS):
    start = _start64()
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), start)
        model, layers = jax_model_layers("mlp", params)
        tx = _jax_tx(kl_clip, lr, layers)
        batches = [(x.astype(np.float64), y.astype(np.float64)) for x, y in data("mlp")[:steps]]
        final, _ = jax_stepper("mlp", model, tx, output_grads=True)(params, tx.init(params), batches)
        return jax.tree.map(lambda a: np.array(to_np(a)), final)


def _jax_first_nu():
    """ν of JAX's first step: the ratio of the clipped to the unclipped first update (the
    momentum buffer starts at the preconditioned gradient), on the preconditioned leaves."""
    start = _start64()
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), start)
        model, layers = jax_model_layers("mlp", params)
        x, y = (jnp.asarray(a.astype(np.float64)) for a in data("mlp")[0])
        perts = mj.linen.output_zeros(model, {"params": params}, x)

        def loss(p, q):
            out, acts = mj.linen.apply(model, {"params": p}, x, perturbations=q)
            return jnp.mean(jnp.sum((out - y) ** 2, -1)), acts

        (_, acts), (g, go) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, perts)
        ups = []
        for kl in (KL, None):
            tx = _jax_tx(kl, layers=layers)
            u, _ = tx.update(g, tx.init(params), params, activations=acts, output_grads=go)
            ups.append(u)
        # first step: u = −η(νP + wd·p) (decoupled weight decay after the clipping): the pairs
        # (−u/η − wd·p) of the clipped and the unclipped update
        wd = CLIP["weight_decay"]
        return [(-to_np(a) / LR - wd * to_np(p), -to_np(b) / LR - wd * to_np(p))
                for a, b, p in zip(jax.tree.leaves(ups[0]), jax.tree.leaves(ups[1]),
                                   jax.tree.leaves(params))]


@pytest.mark.slow  # cross-framework, XLA compiles
def test_torch_and_jax_apply_the_same_nu():
    final_torch, nus = _torch_run(KL)
    assert all(n is not None and 0 < n <= 1 for n in nus)
    assert sum(n < 1 for n in nus) >= STEPS // 2, nus  # the clipping is active
    for clipped, unclipped in _jax_first_nu():  # JAX's first step is scaled by torch's ν
        np.testing.assert_allclose(clipped, nus[0] * unclipped, rtol=1e-9,
                                   atol=1e-12 * float(np.max(np.abs(unclipped))))
    final_jax = _jax_run(KL)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(final_jax)[0],
                            jax.tree.leaves(final_torch)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=jax.tree_util.keystr(path))
    # negative control: without the clipping both frameworks end elsewhere
    off = _jax_run(None)
    assert max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(off), jax.tree.leaves(final_jax))) > 1e-3


def test_torch_nu_is_the_core_formula():
    """ν of the first torch step, recomputed by hand from the captured gradients and the core's
    unclipped preconditioned gradients: sqrt(κ / (η² Σ⟨P, G⟩))."""
    torch.manual_seed(0)
    tmodel = TorchMLP().to(torch.float64)
    x, y = (torch.from_numpy(a).double() for a in data("mlp")[0])
    loss_torch(tmodel(x), y).backward()
    raw = {n: p.grad.clone() for n, p in tmodel.named_parameters()}
    pre = maccore_torch.KFACPreconditioner(tmodel, damping=0.3, t_inv=1, reduction_factor=R)
    tmodel.zero_grad()
    loss_torch(tmodel(x), y).backward()
    pre.step()
    P = {n: p.grad.clone() for n, p in tmodel.named_parameters()}
    s = sum(LR**2 * float((P[n] * raw[n]).sum()) for n in raw)
    want = min(1.0, math.sqrt(KL / s))
    assert want < 1
    torch.manual_seed(0)
    tmodel = TorchMLP().to(torch.float64)
    pre = maccore_torch.KFACPreconditioner(tmodel, damping=0.3, t_inv=1, reduction_factor=R,
                                           kl_clip=KL, lr=LR)
    loss_torch(tmodel(x), y).backward()
    pre.step()
    assert float(pre.last_kl_scale) == pytest.approx(want, rel=1e-12)
    for n, p in tmodel.named_parameters():
        torch.testing.assert_close(p.grad, want * P[n], rtol=1e-12, atol=0)


# ---- kl_clip=None: the unclipped update, exactly ------------------------------------------------
def test_kl_clip_none_is_the_unclipped_update_torch():
    """``kl_clip=None`` takes the unclipped path (no ν); a budget that never clips (ν = 1 exactly)
    gives the same trajectory bit for bit, and the first step equals the core's kfac_apply."""
    off, nus = _torch_run(None)
    assert nus == [None] * STEPS
    never, nus_never = _torch_run(1e30)
    assert nus_never == [1.0] * STEPS
    for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(never)):
        np.testing.assert_array_equal(a, b)
    # one step, momentum 0: p ← p − η·kfac_apply(G_mat, A, G, λ) with the step's own factors
    torch.manual_seed(0)
    tmodel = TorchMLP().to(torch.float64)
    opt = maccore_torch.KFAC(tmodel, lr=LR, momentum=0.0, damping=0.3, t_inv=1,
                             reduction_factor=R, kl_clip=None)
    before = {n: p.detach().clone() for n, p in tmodel.named_parameters()}
    x, y = (torch.from_numpy(a).double() for a in data("mlp")[0])
    loss_torch(tmodel(x), y).backward()
    grads = {n: p.grad.clone() for n, p in tmodel.named_parameters()}
    opt.step()
    factors = opt.factors()
    for layer in ("l0", "l1", "l2"):
        mod = getattr(tmodel, layer)
        gb = None if mod.bias is None else grads[f"{layer}.bias"]
        G = maccore.grad_matrix(grads[f"{layer}.weight"], gb)
        A, Gf = factors[layer]
        want = maccore.kfac_apply(G, A, Gf, 0.3)
        gw, gbias = maccore.split_grad_matrix(want, tuple(mod.weight.shape), bias=gb is not None)
        torch.testing.assert_close(mod.weight.detach(), before[f"{layer}.weight"] - LR * gw,
                                   rtol=1e-13, atol=1e-15)
        if gb is not None:
            torch.testing.assert_close(mod.bias.detach(), before[f"{layer}.bias"] - LR * gbias,
                                       rtol=1e-13, atol=1e-15)


@pytest.mark.slow  # cross-framework, XLA compiles
def test_kl_clip_none_is_the_unclipped_update_jax():
    off = _jax_run(None, steps=6)
    never = _jax_run(1e30, steps=6)
    for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(never)):
        np.testing.assert_array_equal(a, b)
    # the preconditioner alone does not clip unless asked to
    assert _jax_sig_default("scale_by_kfac", "kl_clip") is None
    assert _jax_sig_default("kfac", "kl_clip") == 1e-3


def _jax_sig_default(name, arg):
    import inspect

    return inspect.signature(getattr(mj, name)).parameters[arg].default


# ---- options ---------------------------------------------------------------------------------
@pytest.mark.slow  # cross-framework, XLA compiles
def test_learning_rate_schedules_feed_the_clipping():
    """η of the clipping is the learning rate of the step: torch reads the param group (LR
    schedulers), JAX evaluates a schedule at the step count."""
    def run_torch(sched):
        torch.manual_seed(0)
        tmodel = TorchMLP().to(torch.float64)
        opt = maccore_torch.KFAC(tmodel, lr=LR if not sched else 2 * LR, kl_clip=KL,
                                 weight_decay_mode="decoupled", **CLIP)
        if sched:
            s = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)
        for x, y in data("mlp")[:4]:
            opt.zero_grad()
            loss_torch(tmodel(torch.from_numpy(x).double()), torch.from_numpy(y).double()).backward()
            opt.step()
            if sched:
                s.step()
        return [p.detach().clone() for p in tmodel.parameters()]

    for a, b in zip(run_torch(False), run_torch(True)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    const = _jax_run(KL, steps=4)
    sched = _jax_run(KL, steps=4, lr=optax.constant_schedule(LR))
    for a, b in zip(jax.tree.leaves(const), jax.tree.leaves(sched)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_option_errors():
    m = TorchMLP()
    with pytest.raises(ValueError, match="kl_clip needs the learning rate"):
        maccore_torch.KFACPreconditioner(m, kl_clip=1e-3)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="kl_clip"):
            maccore_torch.KFAC(TorchMLP(), kl_clip=bad)
    with pytest.raises(ValueError, match="kl_clip needs the learning_rate"):
        mj.scale_by_kfac(kl_clip=1e-3)
    with pytest.raises(ValueError, match="kl_clip"):
        mj.kfac(0.1, kl_clip=-1.0)
    opt = maccore_torch.KFAC(TorchMLP())
    assert opt.preconditioner.kl_clip == 1e-3 and opt.preconditioner.damping == DEFAULT_DAMPING
    assert opt.state_dict()["maccore"]["hyperparameters"]["kl_clip"] == 1e-3


# ---- the defaults train ---------------------------------------------------------------------
DEFAULT_DAMPING = maccore_torch.KFAC.__init__.__kwdefaults__["damping"]


def _torch_mlp_losses(**kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                torch.nn.Tanh(), torch.nn.Linear(64, 4))
    opt = maccore_torch.KFAC(model, **kw)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 20, generator=g), torch.randint(0, 4, (128,), generator=g)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the old defaults skip non-finite steps
        for _ in range(STEPS):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def test_torch_defaults_train_where_the_old_defaults_diverge():
    new = _torch_mlp_losses()  # lr 0.01, damping 0.1, kl_clip 1e-3
    assert all(math.isfinite(v) for v in new) and new[-1] < 0.9 * new[0], new
    old = _torch_mlp_losses(damping=1e-3, kl_clip=None)  # the previous defaults
    assert not old[-1] < 10 * old[0], old  # the loss blows up


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", param_dtype=F32)(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding="SAME", param_dtype=F32)(x))
        return nn.Dense(10, param_dtype=F32)(x.mean(axis=(1, 2)))


class Block(nnx.Module):
    """Pre-LN causal self-attention (a fused qkv nnx.Linear) + MLP."""

    def __init__(self, d, heads, rngs):
        self.heads = heads
        self.ln1 = nnx.LayerNorm(d, rngs=rngs, param_dtype=F32)
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs, param_dtype=F32)
        self.proj = nnx.Linear(d, d, rngs=rngs, param_dtype=F32)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs, param_dtype=F32)
        self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs, param_dtype=F32)
        self.fc2 = nnx.Linear(2 * d, d, rngs=rngs, param_dtype=F32)

    def __call__(self, x):
        b, n, d = x.shape
        h = self.heads

        def heads(t):
            return t.reshape(b, n, h, d // h).transpose(0, 2, 1, 3)

        q, k, v = (heads(t) for t in jnp.split(self.qkv(self.ln1(x)), 3, axis=-1))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // h)
        s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -1e9)
        o = (jax.nn.softmax(s, -1) @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        x = x + self.proj(o)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class NnxTransformer(nnx.Module):
    def __init__(self, rngs, vocab=32, d=32, heads=4, n=12):
        self.emb = nnx.Embed(vocab, d, rngs=rngs, param_dtype=F32)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (n, d), F32))
        self.block = Block(d, heads, rngs)
        self.ln = nnx.LayerNorm(d, rngs=rngs, param_dtype=F32)
        self.head = nnx.Linear(d, vocab, rngs=rngs, param_dtype=F32)

    def __call__(self, ids):
        x = self.emb(ids) + self.pos[...][: ids.shape[1]]
        return self.head(self.ln(self.block(x)))


def linen_cnn_losses(steps=STEPS, **kw):
    model = LinenCNN()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 8, 8, 3)), F32)
    y = jnp.asarray(rng.integers(0, 10, 32))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    tx = mj.kfac(layers=mj.linen.layer_specs(model, {"params": params}, x), **kw)

    @jax.jit
    def step(p, s):
        perts = mj.linen.output_zeros(model, {"params": p}, x)

        def loss(p, q):
            out, acts = mj.linen.apply(model, {"params": p}, x, perturbations=q)
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), acts

        (l, acts), (g, go) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, perts)
        u, s = tx.update(g, s, p, activations=acts, output_grads=go)
        return optax.apply_updates(p, u), s, l

    state, losses = tx.init(params), []
    for _ in range(steps):
        params, state, l = step(params, state)
        losses.append(float(l))
    return losses


def nnx_transformer_losses(steps=STEPS, **kw):
    model = NnxTransformer(nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 32, (8, 12)))
    inp, tgt = ids[:, :-1], ids[:, 1:]
    opt = nnx.Optimizer(model, mj.kfac(layers=mj.nnx.layer_specs(model), **kw), wrt=nnx.Param)

    def loss_fn(m, q):
        out, acts = mj.nnx.apply(m, inp, perturbations=q)
        return optax.softmax_cross_entropy_with_integer_labels(out, tgt).mean(), acts

    @nnx.jit
    def step(m, o):
        q = mj.nnx.output_zeros(m, inp)
        (l, a), (g, go) = nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(m, q)
        o.update(m, g, activations=a, output_grads=go)
        return l

    return [float(step(model, opt)) for _ in range(steps)]


@pytest.mark.slow  # 20 jitted KFAC steps (the XLA compile dominates)
@pytest.mark.parametrize("name", ["linen_cnn", "nnx_transformer"])
def test_jax_defaults_decrease_the_loss(name):
    """``maccore_jax.kfac(0.01)`` — every other option at its default — decreases the loss over 20
    steps on a Flax linen CNN and a Flax NNX transformer (learning rate 0.01: maccore_torch.KFAC's
    default)."""
    losses = (linen_cnn_losses if name == "linen_cnn" else nnx_transformer_losses)(learning_rate=0.01)
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.9 * losses[0], losses
