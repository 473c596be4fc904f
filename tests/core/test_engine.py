"""maccore.engine — the per-layer engine both adapters drive — against float64 NumPy oracles.

Every method (MAC, SMAC, KFAC in its three damping modes, SINGD) goes through the same cycle the
adapters run: capture per micro-batch → pool → finalize → update → refresh → apply. The oracles
below are written from the definitions (means of rows, (1/R)·Σ g gᵀ with R = 1/N, the damped
curvature matrices), never from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import maccore as mc
from maccore import engine
from tests.conftest import asarray, assert_close, to_numpy, tol
from tests.core.helpers import assert_like, is_jax

LIN = mc.LayerSpec(mc.LayerKind.LINEAR, 4, 3, True, name="fc")
LIN_NB = mc.LayerSpec(mc.LayerKind.LINEAR, 4, 3, False, name="fc_nb")

METHODS = {
    "mac": lambda: engine.mac_method(stat_decay=0.9, damping=0.3),
    "mac-inverse": lambda: engine.mac_method(stat_decay=0.9, damping=0.3, scale="inverse"),
    "smac": lambda: engine.mac_method(stat_decay=0.9, damping=0.3, diagonal=True),
    "kfac-tikhonov": lambda: engine.kfac_method(stat_decay=0.9, damping=0.1),
    "kfac-pi": lambda: engine.kfac_method(stat_decay=0.9, damping=0.1, damping_mode="pi"),
    "kfac-exact": lambda: engine.kfac_method(stat_decay=0.9, damping=0.1, damping_mode="exact"),
    "kfac-sum": lambda: engine.kfac_method(stat_decay=0.9, damping=0.1, loss_average=None),
    "singd": lambda: engine.singd_method(damping=0.1, lr_cov=0.05),
}


def _with_ones(x):
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)


def _oracle_stats(name, x, g):
    """The finalized statistics of the concatenated batch, from their definitions (float64)."""
    xt = _with_ones(x)
    n = x.shape[0]
    if name.startswith("mac") or name == "smac":
        out = {"mean": xt.mean(axis=0)}
        if name == "smac":
            out["diag"] = (g * g).mean(axis=0)
        return out
    if name.startswith("kfac"):
        r = 1.0 if name == "kfac-sum" else 1.0 / n  # loss = R·Σ terms
        return {"A": xt.T @ xt / n, "G": g.T @ g / r}
    raise AssertionError(name)


def _cycle(method, spec, xp, dtype, xs, gs, *, reduction_factor=None):
    """Capture every micro-batch, pool, finalize, update once, refresh: the engine's step."""
    state = method.init(spec, xp=xp, dtype=dtype)
    pooled = {}
    for x, g in zip(xs, gs):
        pooled = engine.pool_stats(pooled, method.input_statistics(spec, state, x))
        if method.wants_grads(spec):
            pooled = engine.pool_stats(pooled, method.grad_statistics(spec, state, g))
    fin = method.finalize(spec, state, pooled, reduction_factor=reduction_factor)
    stats = {k: v for k, (v, w) in fin.items()}
    state = method.update(spec, state, stats)
    return method.refresh(spec, state), fin


@pytest.mark.parametrize("name", ["mac", "smac", "kfac-tikhonov", "kfac-sum"])
def test_pooled_micro_batches_equal_the_concatenated_batch(xp, dtype, name):
    rng = np.random.default_rng(1)
    sizes = (5, 2, 9)
    xs_np = [rng.standard_normal((s, 4)) for s in sizes]
    gs_np = [rng.standard_normal((s, 3)) for s in sizes]
    xs = [asarray(xp, x, dtype) for x in xs_np]
    gs = [asarray(xp, g, dtype) for g in gs_np]
    method = METHODS[name]()
    _, fin = _cycle(method, LIN, xp, dtype, xs, gs)
    want = _oracle_stats(name, np.concatenate([to_numpy(x) for x in xs]),
                         np.concatenate([to_numpy(g) for g in gs]))
    assert set(fin) == set(want)
    for k, v in want.items():
        assert_close(fin[k][0], v, **tol(xp, dtype), err_msg=k)


def test_singd_pooled_statistics_equal_the_concatenated_batch(xp, dtype):
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((s, 4)) for s in (3, 6)]
    gs = [rng.standard_normal((s, 3)) for s in (3, 6)]
    method = engine.singd_method(structures=("dense", "dense"), damping=0.1)
    state = method.init(LIN, xp=xp, dtype=dtype)
    pooled = {}
    for x, g in zip(xs, gs):
        pooled = engine.pool_stats(pooled, method.input_statistics(LIN, state, asarray(xp, x, dtype)))
        pooled = engine.pool_stats(pooled, method.grad_statistics(LIN, state, asarray(xp, g, dtype)))
    fin = method.finalize(LIN, state, pooled)
    x, g = np.concatenate(xs), np.concatenate(gs)
    xt = _with_ones(x)
    # K = C = I at init: H_K = A, H_C = G with R = 1/N
    assert_close(fin["H_K"][0], (xt.T @ xt / len(x)).reshape(-1), **tol(xp, dtype))
    assert_close(fin["H_C"][0], (g.T @ g * len(g)).reshape(-1), **tol(xp, dtype))


def test_explicit_reduction_factor_overrides_loss_average(xp):
    rng = np.random.default_rng(3)
    x, g = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    method = engine.kfac_method(loss_average="batch", reduction_factor=0.5)
    _, fin = _cycle(method, LIN, xp, xp.float64, [asarray(xp, x)], [asarray(xp, g)])
    assert_close(fin["G"][0], g.T @ g / 0.5, rtol=1e-12, atol=1e-12)
    _, fin = _cycle(method, LIN, xp, xp.float64, [asarray(xp, x)], [asarray(xp, g)],
                    reduction_factor=2.0)
    assert_close(fin["G"][0], g.T @ g / 2.0, rtol=1e-12, atol=1e-12)


def _dense_curvature(name, stats, damping):
    """The damped dense curvature of one refreshed state (debias of one EMA update = the batch)."""
    if name in ("mac", "mac-inverse", "smac"):
        a = stats["mean"]
        block = np.outer(a, a) + damping * np.eye(a.size)
        if name != "mac-inverse":
            block = block / damping  # reference scale: apply = λ·G(ââᵀ+λI)⁻¹
        z = stats["diag"] + damping if name == "smac" else np.ones(3)
        return np.kron(np.diag(z), block)
    A, G = stats["A"], stats["G"]
    if name == "kfac-exact":
        return np.kron(G, A) + damping * np.eye(G.shape[0] * A.shape[0])
    if name == "kfac-pi":
        pi = math.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
        la, lg = pi * math.sqrt(damping), math.sqrt(damping) / pi
    else:
        la = lg = damping
    return np.kron(G + lg * np.eye(G.shape[0]), A + la * np.eye(A.shape[0]))


@pytest.mark.parametrize("name", [n for n in METHODS if n != "singd"])
def test_apply_inverts_the_dense_curvature(xp, dtype, name):
    rng = np.random.default_rng(4)
    x, g = rng.standard_normal((7, 4)) + 0.5, rng.standard_normal((7, 3))
    method = METHODS[name]()
    damping = method.hyperparameters["damping"]
    state, _ = _cycle(method, LIN, xp, dtype, [asarray(xp, x, dtype)], [asarray(xp, g, dtype)])
    xr, gr = to_numpy(asarray(xp, x, dtype)), to_numpy(asarray(xp, g, dtype))
    curv = _dense_curvature(name, _oracle_stats(name.replace("-tikhonov", "").replace("-pi", "")
                                                .replace("-exact", "") if not name.startswith("kfac")
                                                else "kfac-sum" if name == "kfac-sum" else "kfac",
                                                xr, gr), damping)
    grad_np = rng.standard_normal((3, 5))
    grad = asarray(xp, grad_np, dtype)
    out = method.apply(LIN, state, grad)
    assert_like(out, grad)
    want = np.linalg.solve(curv, grad_np.reshape(-1)).reshape(3, 5)
    t = tol(xp, dtype, factor=10.0)
    assert_close(out, want, **t)
    assert_close(method.curvature_dense(LIN, state), curv, **t)
    assert_close(method.preconditioner_dense(LIN, state), np.linalg.inv(curv), **t)


def test_singd_dense_views_are_inverses(xp):
    rng = np.random.default_rng(5)
    method = engine.singd_method(damping=0.1, lr_cov=0.1, alpha1=0.0)
    state, _ = _cycle(method, LIN, xp, xp.float64, [asarray(xp, rng.standard_normal((8, 4)))],
                      [asarray(xp, rng.standard_normal((8, 3)))])
    P = to_numpy(method.preconditioner_dense(LIN, state))
    grad = rng.standard_normal((3, 5))
    out = method.apply(LIN, state, asarray(xp, grad))
    assert_close(out, (P @ grad.reshape(-1)).reshape(3, 5), rtol=1e-10, atol=1e-10)
    assert_close(method.curvature_dense(LIN, state), np.linalg.inv(P), rtol=1e-8, atol=1e-8)
    assert not np.allclose(P, np.eye(15))  # the update moved the factors


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("spec", [LIN, LIN_NB], ids=["bias", "nobias"])
def test_apply_split_equals_apply(xp, dtype, name, spec):
    rng = np.random.default_rng(6)
    method = METHODS[name]()
    state, _ = _cycle(method, spec, xp, dtype, [asarray(xp, rng.standard_normal((6, 4)) + 1, dtype)],
                      [asarray(xp, rng.standard_normal((6, 3)), dtype)])
    gw_np, gb_np = rng.standard_normal((3, 4)), rng.standard_normal(3)
    gw, gb = asarray(xp, gw_np, dtype), (asarray(xp, gb_np, dtype) if spec.has_bias else None)
    whole = method.apply(spec, state, mc.grad_matrix(gw, gb))
    w, b = engine.apply_split(method, spec, state, gw, gb)
    want_w, want_b = mc.split_grad_matrix(whole, (3, 4), bias=spec.has_bias)
    assert_close(w, want_w, **tol(xp, dtype))
    if spec.has_bias:
        assert_close(b, want_b, **tol(xp, dtype))
    assert_close(gw, gw_np if dtype == xp.float64 else to_numpy(asarray(xp, gw_np, dtype)),
                 rtol=0, atol=0)  # not in place: input untouched
    if is_jax(xp) or "strict" in xp.__name__:
        with pytest.raises(TypeError, match="immutable|mutable"):
            engine.apply_split(method, spec, state, gw, gb, inplace=True)
        return
    w2, b2 = engine.apply_split(method, spec, state, gw, gb, inplace=True)
    assert w2 is gw and (b2 is gb)
    assert_close(gw, want_w, **tol(xp, dtype))
    if spec.has_bias:
        assert_close(gb, want_b, **tol(xp, dtype))


@pytest.mark.parametrize("case", ["grad_shape", "bias_shape", "integer", "state_shape",
                                  "foreign_state", "tiny_damping"])
def test_apply_split_mac_refuses_what_the_trusted_route_does_not_check(case):
    """``apply_split`` checks per call only what gradients can get wrong and sends anything
    unexpected through ``mac_apply``'s full validation: every bad case raises its named error
    (never a raw backend error, never a silently wrong result)."""
    rng = np.random.default_rng(8)
    method = engine.mac_method(damping=1e-40 if case == "tiny_damping" else 0.5)
    state, _ = _cycle(engine.mac_method(damping=0.5), LIN, np, np.float64,
                      [rng.standard_normal((6, 4))], [rng.standard_normal((6, 3))])
    gw, gb = rng.standard_normal((3, 4)), rng.standard_normal(3)
    expect = (ValueError, "does not match|must be")
    if case == "grad_shape":
        gw = rng.standard_normal((3, 5))
    elif case == "bias_shape":
        gb = rng.standard_normal(4)
    elif case == "integer":
        gw, expect = np.ones((3, 4), dtype=np.int64), (TypeError, "floating")
    elif case == "state_shape":
        state = state._replace(mean_hat=np.ones(7))
    elif case == "foreign_state":
        array_api_strict = pytest.importorskip("array_api_strict")
        state = state._replace(mean_hat=array_api_strict.asarray(state.mean_hat))
        expect = (TypeError, "mean")
    else:  # λ = 1e-40 is no normal float32: float32 statistics cannot carry it
        state = state._replace(mean_hat=state.mean_hat.astype(np.float32))
        gw, gb = gw.astype(np.float32), gb.astype(np.float32)
        expect = (ValueError, "smallest normal")
    with pytest.raises(expect[0], match=expect[1]):
        engine.apply_split(method, LIN, state, gw, gb)


def test_apply_split_mac_valid_calls_never_reach_the_full_validation(monkeypatch):
    """Valid gradients (bias, SMAC diagonal, in place) take the trusted route only: the full
    validation of ``mac_apply`` is not run per call; a foreign ``out`` pair is sent to it."""
    import importlib

    mac_mod = importlib.import_module("maccore.mac")  # (maccore.mac is also the function)
    rng = np.random.default_rng(9)
    method = engine.mac_method(damping=0.5, diagonal=True)
    state, _ = _cycle(method, LIN, np, np.float64, [rng.standard_normal((6, 4))],
                      [rng.standard_normal((6, 3))])
    gw, gb = rng.standard_normal((3, 4)), rng.standard_normal(3)
    want = engine.apply_split(method, LIN, state, gw, gb)
    monkeypatch.setattr(mac_mod, "mac_apply", lambda *a, **k: pytest.fail("full validation ran"))
    for inplace in (False, True):
        w, b = engine.apply_split(method, LIN, state, gw.copy(), gb.copy(), inplace=inplace)
        assert_close(w, want[0], rtol=1e-13, atol=1e-13)
        assert_close(b, want[1], rtol=1e-13, atol=1e-13)
    monkeypatch.undo()
    w2 = gw.reshape(3, 4)
    for out in ((np.empty((3, 5)), gb), (w2, np.empty(5))):  # one of the pair foreign, misfit
        with pytest.raises(ValueError, match="shape and dtype"):
            mac_mod.mac_apply_trusted(w2, state.mean_hat, 0.5, None, "reference", gb, out)


def test_first_layer_inverse(xp, dtype):
    rng = np.random.default_rng(7)
    batches = [rng.standard_normal((s, 4)) + 0.3 for s in (5, 8)]
    damping = 0.2
    A = sum(_with_ones(to_numpy(asarray(xp, b, dtype))).T @ _with_ones(to_numpy(asarray(xp, b, dtype)))
            / len(b) for b in batches) / len(batches)
    moments = [mc.input_factor(mc.to_rows(LIN, asarray(xp, b, dtype))) for b in batches]
    inv = engine.first_layer_inverse(sum(moments[1:], moments[0]) / len(moments), damping)
    assert_close(inv, np.linalg.inv(A + damping * np.eye(5)), **tol(xp, dtype, factor=10))
    for diagonal in (False, True):
        method = engine.mac_method(damping=damping, diagonal=diagonal)
        st0 = method.init(LIN, xp=xp, dtype=dtype)
        st = engine.with_first_layer(st0, inv)
        assert method.wants_input(LIN, st) is diagonal  # SMAC still needs its gradient diagonal
        g = rng.standard_normal((9, 3))
        st, _ = (st, None)
        pooled = engine.pool_stats({}, method.input_statistics(LIN, st, asarray(xp, batches[0], dtype)))
        pooled = engine.pool_stats(pooled, method.grad_statistics(LIN, st, asarray(xp, g, dtype)))
        st = method.refresh(LIN, method.update(LIN, st, {k: v for k, (v, w) in
                                                         method.finalize(LIN, st, pooled).items()}))
        grad_np = rng.standard_normal((3, 5))
        out = method.apply(LIN, st, asarray(xp, grad_np, dtype))
        want = grad_np @ np.linalg.inv(A + damping * np.eye(5))
        if diagonal:
            gr = to_numpy(asarray(xp, g, dtype))
            want = want / ((gr * gr).mean(axis=0) + damping)[:, None]
        assert_close(out, want, **tol(xp, dtype, factor=10))
        w, b = engine.apply_split(method, LIN, st, asarray(xp, grad_np[:, :4], dtype),
                                  asarray(xp, grad_np[:, 4], dtype))
        assert_close(w, want[:, :4], **tol(xp, dtype, factor=10))
    with pytest.raises(ValueError, match="does not match"):
        engine.with_first_layer(st0, inv[:3, :3])
    with pytest.raises(TypeError, match="MAC feature"):
        engine.with_first_layer(engine.kfac_method().init(LIN, xp=xp), inv)


@pytest.mark.parametrize("mode", ["reference", "per_head", "off"])
def test_qkv_statistics(xp, mode):
    rng = np.random.default_rng(8)
    b, n, d, h = 2, 5, 6, 2
    spec = mc.LayerSpec(mc.LayerKind.LINEAR, d, 3 * d, True, qkv=mc.QkvSpec(num_heads=h, mode=mode),
                        name="qkv")
    x_np = rng.standard_normal((b, n, d))
    logits = rng.standard_normal((b, h, n, n))
    attn_np = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    method = engine.mac_method()
    st = method.init(spec, xp=xp, dtype=xp.float64)
    stats = method.input_statistics(spec, st, asarray(xp, x_np), attn=asarray(xp, attn_np))
    xt = np.concatenate([x_np, np.ones((b, n, 1))], axis=-1)
    a = xt.reshape(-1, d + 1).mean(0)
    if mode == "off":
        want = np.stack([a, a, a])
    elif mode == "reference":
        v = attn_np.mean(axis=(0, 1, 2)) @ xt.mean(0)
        want = np.stack([a, a, v])
    else:
        v = np.einsum("bhij,bjd->hd", attn_np, xt) / (b * n)
        want = np.concatenate([np.tile(a, (h, 1)), np.tile(a, (h, 1)), v])
    assert stats["mean"].weight == b * n
    assert_close(stats["mean"].value, want, rtol=1e-12, atol=1e-12)
    assert tuple(st.mean.value.shape) == want.shape
    assert method.wants_attention(spec) is (mode != "off")
    # cross-attention: each block uses the plain mean of its own input
    k_np, v_np = rng.standard_normal((b, 3, d)), rng.standard_normal((b, 3, d))
    cross = method.input_statistics(spec, st, asarray(xp, x_np), key=asarray(xp, k_np),
                                    value=asarray(xp, v_np))["mean"].value
    m = lambda t: np.concatenate([t.reshape(-1, d).mean(0), [1.0]])  # noqa: E731
    rep = h if mode == "per_head" else 1
    want = np.concatenate([np.tile(m(x_np), (rep, 1)), np.tile(m(k_np), (rep, 1)),
                           np.tile(m(v_np), (rep, 1))])
    assert_close(cross, want, rtol=1e-12, atol=1e-12)
    if mode != "off":
        with pytest.raises(ValueError, match="attention probabilities"):
            method.input_statistics(spec, st, asarray(xp, x_np))


@pytest.mark.parametrize("mode", ["reference", "per_head", "off"])
@pytest.mark.parametrize("kv", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_value_projection_statistics(xp, mode, kv, bias):
    """A value projection alone (layout "v", grouped-query attention with H_kv value heads):
    one factor from the attention-weighted mean, or one per value head (the mean of its group's
    per-head means), or the plain mean with mode "off"; against float64 einsum oracles."""
    rng = np.random.default_rng(18)
    b, n, d, h, dh = 2, 4, 3, 4, 2
    spec = mc.LayerSpec(mc.LayerKind.LINEAR, d, kv * dh, bias,
                        qkv=mc.QkvSpec(num_heads=h, mode=mode, layout="v", num_kv_heads=kv), name="v")
    x_np = rng.standard_normal((b, n, d))
    logits = rng.standard_normal((b, h, n, n))
    attn_np = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    x, attn = asarray(xp, x_np), asarray(xp, attn_np)
    xt = np.concatenate([x_np, np.ones((b, n, 1))], axis=-1) if bias else x_np
    if mode == "off":
        want = xt.reshape(-1, xt.shape[-1]).mean(0)
    elif mode == "reference":
        want = attn_np.mean(axis=(0, 1, 2)) @ xt.mean(0)
    else:
        per_head = np.einsum("bhij,bjd->hd", attn_np, xt) / (b * n)  # [H, d̃]
        want = per_head.reshape(kv, h // kv, -1).mean(1)  # consecutive query heads share a KV head
    t = {"rtol": 1e-12, "atol": 1e-12}
    assert_close(engine.qkv_mean(spec, x, attn=attn), want, **t)
    method = engine.mac_method()
    st = method.init(spec, xp=xp, dtype=xp.float64)
    assert tuple(st.mean.value.shape) == want.shape
    stats = method.input_statistics(spec, st, x, attn=attn)
    assert_close(stats["mean"].value, want, **t)
    assert method.wants_attention(spec) is (mode != "off")
    with pytest.raises(ValueError, match="takes its own input only"):
        engine.qkv_mean(spec, x, attn=attn, key=x, value=x)
    if mode != "off":
        with pytest.raises(ValueError, match=r"needs input \[B, N, d\], got \[8, 3\]"):
            engine.qkv_mean(spec, xp.reshape(x, (b * n, d)), attn=attn)
        with pytest.raises(ValueError, match="needs the attention probabilities"):
            engine.qkv_mean(spec, x)
        for bad in (attn[:, :2, ...], xp.reshape(attn, (b, h, n * n))):
            with pytest.raises(ValueError, match=f"do not have num_heads={h} heads"):
                engine.qkv_mean(spec, x, attn=bad)


@pytest.mark.parametrize("depthwise", [False, True])
def test_num_rows_of_an_unbatched_conv_input(xp, depthwise):
    """A conv input [C, H, W] (no batch axis) has the rows of the batch of one [1, C, H, W]."""
    c = 4
    spec = mc.LayerSpec(mc.LayerKind.CONV2D, 9 if depthwise else 9 * c, c, True, name="conv",
                        conv=mc.ConvSpec(kernel_size=3, padding=1, groups=c if depthwise else 1))
    x = asarray(xp, np.ones((c, 5, 6)))
    assert engine.num_rows(spec, x) == engine.num_rows(spec, xp.reshape(x, (1, c, 5, 6))) == 30 * (
        c if depthwise else 1)


def test_value_projection_refuses_key_or_value_and_keeps_smac_diagonal(xp):
    """A value projection takes its own input only: a key OR a value alone is refused; with
    SMAC its gradient diagonal is kept (fused qkv layers have none)."""
    spec = mc.LayerSpec(mc.LayerKind.LINEAR, 3, 4, True, qkv=mc.QkvSpec(num_heads=2, layout="v"), name="v")
    x = asarray(xp, np.ones((2, 3, 3)))
    attn = asarray(xp, np.full((2, 2, 3, 3), 1 / 3))
    for kw in ({"key": x}, {"value": x}):
        with pytest.raises(ValueError, match="takes its own input only"):
            engine.qkv_mean(spec, x, attn=attn, **kw)
        with pytest.raises(ValueError, match="takes its own input only"):
            engine.mac_method().input_statistics(spec, engine.mac_method().init(spec, xp=xp), x, attn=attn, **kw)
    smac = engine.mac_method(diagonal=True)
    st = smac.init(spec, xp=xp, dtype=xp.float64)
    assert smac.keys(spec, st) == ("mean", "diag")
    g = asarray(xp, np.arange(24.0).reshape(2, 3, 4))
    assert_close(smac.grad_statistics(spec, st, g)["diag"].value,
                 (np.arange(24.0).reshape(6, 4) ** 2).mean(0), rtol=1e-12, atol=0)
    fused = mc.LayerSpec(mc.LayerKind.LINEAR, 3, 6, True, qkv=mc.QkvSpec(num_heads=2), name="qkv")
    assert smac.keys(fused, smac.init(fused, xp=xp, dtype=xp.float64)) == ("mean",)


def test_conv_statistics_match_im2col(xp):
    rng = np.random.default_rng(9)
    spec = mc.LayerSpec(mc.LayerKind.CONV2D, 2 * 3 * 3, 4, True,
                        conv=mc.ConvSpec(kernel_size=3, stride=2, padding=1), name="conv")
    x = asarray(xp, rng.standard_normal((2, 2, 7, 6)))
    rows = to_numpy(mc.conv2d_rows(x, 3, stride=2, padding=1, bias=True))
    assert engine.num_rows(spec, x) == rows.shape[0]
    assert_close(engine.mean_rows(spec, x), rows.mean(0), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal((2, 4, 4, 3))
    assert engine.loss_terms(spec, g.shape, "batch") == 2
    assert engine.loss_terms(spec, g.shape, "batch+sequence") == 2 * 4 * 3
    assert engine.loss_terms(spec, g.shape, None) == 2


def test_loss_terms_and_reduction_factor():
    assert engine.loss_terms(LIN, (8, 5, 3), "batch") == 8
    assert engine.loss_terms(LIN, (8, 5, 3), "batch+sequence") == 40
    assert engine.loss_terms(LIN, (3,), "batch") == 1
    assert engine.reduction_factor(8, loss_average="batch") == 1 / 8
    assert engine.reduction_factor(8, loss_average=None) == 1.0
    assert engine.reduction_factor(8, loss_average="batch", reduction_factor=2.0) == 2.0
    with pytest.raises(ValueError, match="loss_average"):
        engine.reduction_factor(8, loss_average="mean")
    with pytest.raises(ValueError, match="no loss terms"):
        engine.reduction_factor(0, loss_average="batch")
    with pytest.raises(ValueError):
        engine.reduction_factor(8, loss_average="batch", reduction_factor=-1.0)
    with pytest.raises(ValueError, match="loss_average"):
        engine.kfac_method(loss_average="tokens")


def test_schedule_and_pool_rules():
    assert [engine.schedule(c, t_cov=2, t_inv=3) for c in range(4)] == [
        (True, True), (False, False), (True, False), (False, True)]
    a = engine.Stat(np.array([1.0, 3.0]), 1, "mean")
    b = engine.Stat(np.array([4.0, 0.0]), 2, "mean")
    p = engine.pool(a, b)
    np.testing.assert_allclose(p.value, [3.0, 1.0])
    assert p.weight == 3
    s = engine.pool(engine.Stat(np.ones(2), 4, "sum"), engine.Stat(np.ones(2), 6, "sum"))
    np.testing.assert_allclose(s.value, [2.0, 2.0])
    assert s.weight == 10
    with pytest.raises(ValueError, match="cannot pool"):
        engine.pool(a, engine.Stat(np.ones(2), 1, "sum"))
    with pytest.raises(ValueError, match="shapes"):
        engine.pool(a, engine.Stat(np.ones(3), 1, "mean"))
    acc = {"x": a}
    out = engine.pool_stats(acc, {"x": b, "y": b})
    assert acc == {"x": a} and set(out) == {"x", "y"}


def test_all_finite(xp):
    ok = asarray(xp, np.ones(3))
    bad = asarray(xp, np.array([1.0, np.nan]))
    inf = asarray(xp, np.array([np.inf]))
    assert bool(engine.all_finite([ok, None, ok]))
    assert not bool(engine.all_finite([ok, bad]))
    assert not bool(engine.all_finite([inf]))
    assert bool(engine.all_finite([]))


def test_kfac_never_observed_layer_is_left_alone():
    method = engine.kfac_method()
    st = method.init(LIN, xp=np, dtype=np.float64)
    st = method.refresh(LIN, st)  # nothing to invert yet
    g = np.random.default_rng(10).standard_normal((3, 5))
    np.testing.assert_array_equal(method.apply(LIN, st, g), g)
    st2 = method.update(LIN, st, {"A": np.eye(5)})  # a statistic missing: no update
    assert st2 is st


def test_templates_match_finalized_statistics():
    rng = np.random.default_rng(11)
    for name, make in METHODS.items():
        method = make()
        st = method.init(LIN, xp=np, dtype=np.float64)
        _, fin = _cycle(method, LIN, np, np.float64, [rng.standard_normal((4, 4))],
                        [rng.standard_normal((4, 3))])
        tmpl = method.templates(LIN, st)
        assert set(tmpl) == set(fin) == set(method.keys(LIN, st)), name
        for k in tmpl:
            assert tuple(tmpl[k].shape) == tuple(fin[k][0].shape), (name, k)


def test_core_factories_accept_the_adapters_keywords():
    rng = np.random.default_rng(12)
    rows = mc.linear_rows(rng.standard_normal((6, 4)), bias=True)
    g = rng.standard_normal((3, 5))
    a, b = mc.mac(decay=0.8), mc.mac(stat_decay=0.8)
    sa = a.refresh(a.update(a.init(5, xp=np), rows))
    sb = b.refresh(b.update(b.init(5, xp=np), rows))
    np.testing.assert_array_equal(a.apply(sa, g), b.apply(sb, g))
    grows = rng.standard_normal((6, 3))
    k1, k2 = mc.kfac(mode="pi", decay=0.7), mc.kfac(damping_mode="pi", stat_decay=0.7)
    s1 = k1.refresh(k1.update(k1.init(5, 3, xp=np), rows, grows, reduction_factor=1.0))
    s2 = k2.refresh(k2.update(k2.init(5, 3, xp=np), rows, grows, reduction_factor=1.0))
    np.testing.assert_array_equal(k1.apply(s1, g), k2.apply(s2, g))
    k3 = mc.kfac(decay=0.7)
    s3 = k3.refresh(k3.update(k3.init(5, 3, xp=np), rows, grows, reduction_factor=1.0))
    assert not np.allclose(k1.apply(s1, g), k3.apply(s3, g))  # the mode mattered
    with pytest.raises(TypeError, match="not both"):
        mc.mac(decay=0.5, stat_decay=0.9)
    with pytest.raises(TypeError, match="not both"):
        mc.kfac(mode="exact", damping_mode="pi")


def test_kfac_unobserved_layer_identity_for_every_mode():
    g = np.random.default_rng(13).standard_normal((3, 5))
    for mode in ("tikhonov", "pi", "exact"):
        method = engine.kfac_method(damping_mode=mode, damping=0.3)
        st = method.refresh(LIN, method.init(LIN, xp=np, dtype=np.float64))
        np.testing.assert_array_equal(method.apply(LIN, st, g), g)


def test_torch_mac_factor_memo_follows_in_place_writes():
    torch = pytest.importorskip("torch")
    from maccore import _delegate

    rng = np.random.default_rng(14)
    g = torch.tensor(rng.standard_normal((4, 6)))
    a = torch.tensor(rng.standard_normal(6))
    first = mc.mac_apply(g, a, 0.5)
    assert torch.equal(mc.mac_apply(g, a, 0.5), first)  # served from the memo
    with torch.no_grad():
        a.mul_(3.0)  # an in-place write bumps the version: the memo must not serve the old factor
    want = mc.mac_apply(g.numpy(), a.numpy(), 0.5)
    np.testing.assert_allclose(mc.mac_apply(g, a, 0.5).numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mc.mac_apply(g, a, 2.0).numpy(), mc.mac_apply(g.numpy(), a.numpy(), 2.0),
                               rtol=1e-12, atol=1e-12)  # another damping: recomputed
    assert len(_delegate._FACTORS) <= 256


def test_single_row_inputs(xp):
    """A 1-D input is one row of a linear layer: one row counted, its mean is itself (with the
    bias entry 1); an input with one leading row likewise."""
    x_np = np.array([0.5, -1.0, 2.0, 3.0])
    for x in (asarray(xp, x_np), asarray(xp, x_np[None, :])):
        assert engine.num_rows(LIN, x) == 1
        assert_close(engine.mean_rows(LIN, x), np.append(x_np, 1.0), rtol=0, atol=0)
        assert_close(engine.mean_rows(LIN_NB, x), x_np, rtol=0, atol=0)
    assert engine.num_rows(LIN, asarray(xp, np.ones((2, 3, 4)))) == 6


def test_singd_method_preconditioner_dtype_and_partial_statistics(xp):
    """singd_method passes preconditioner_dtype to the core (factors kept in float64 over float32
    statistics), and an update whose statistics lack one side (H_K or H_C) leaves the state as it
    is (a step with no backward pass, or no forward capture)."""
    method = engine.singd_method(preconditioner_dtype=(xp.float64, xp.float64))
    st = method.init(LIN, xp=xp, dtype=xp.float32)
    assert st.K.to_dense().dtype == xp.float64 and st.C.to_dense().dtype == xp.float64
    plain = engine.singd_method().init(LIN, xp=xp, dtype=xp.float32)
    assert plain.K.to_dense().dtype == xp.float32
    rng = np.random.default_rng(3)
    x = asarray(xp, rng.standard_normal((5, 4)), xp.float32)
    g = asarray(xp, rng.standard_normal((5, 3)), xp.float32)
    stats = {**method.input_statistics(LIN, st, x), **method.grad_statistics(LIN, st, g)}
    stats = {k: v.value for k, v in stats.items()}
    for k in ("H_K", "H_C"):
        partial = {key: v for key, v in stats.items() if key != k}
        assert method.update(LIN, st, partial) is st
    new = method.update(LIN, st, stats)
    assert new is not st and new.K.to_dense().dtype == xp.float64


def test_method_arguments_checked_at_construction(xp):
    """A reduction factor must be one positive number for every method, checked when the method
    is made (not at the first finalize); cross-attention needs both key and value."""
    for make in (engine.kfac_method, engine.singd_method):
        for bad in (-1.0, 0.0, float("inf"), (1.0, 2.0), True):
            with pytest.raises((TypeError, ValueError), match="reduction_factor"):
                make(reduction_factor=bad)
    spec = mc.LayerSpec(mc.LayerKind.LINEAR, 3, 9, True, qkv=mc.QkvSpec(num_heads=1), name="qkv")
    x = xp.ones((1, 2, 3), dtype=xp.float64)
    for kw in ({"key": x}, {"value": x}):
        with pytest.raises(ValueError, match="cross-attention needs both key and value"):
            engine.qkv_mean(spec, x, **kw)


# ---------------------------------------------------------------------------------------------
# data parallelism: W ranks, each with the mean loss of its rows, gradients averaged over ranks


def test_grad_stats_scale_with_loss_flag_and_data_parallel_grad_scale():
    """Only SMAC's gradient statistic (E_rows[g⊙g], not renormalised by the reduction factor)
    scales with the loss's normalisation; the rule multiplies the loss scale by the world size for
    it alone."""
    flags = {name: make().grad_stats_scale_with_loss for name, make in METHODS.items()}
    assert flags == {name: name == "smac" for name in METHODS}, flags
    assert engine.singd_method().grad_stats_scale_with_loss is False
    smac, kfac = METHODS["smac"](), METHODS["kfac-tikhonov"]()
    assert engine.data_parallel_grad_scale(smac, 4) == 4
    assert engine.data_parallel_grad_scale(smac, 4, 128.0) == 512.0  # with a loss scale
    assert engine.data_parallel_grad_scale(smac, np.int64(2), 3.0) == 6.0
    assert engine.data_parallel_grad_scale(smac, 1, 8.0) == 8.0
    assert engine.data_parallel_grad_scale(kfac, 4, 128.0) == 128.0
    assert engine.data_parallel_grad_scale(METHODS["mac"](), 4) == 1.0
    for bad in (0, -2):
        with pytest.raises(ValueError, match="world_size"):
            engine.data_parallel_grad_scale(smac, bad)
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="world_size"):
            engine.data_parallel_grad_scale(smac, bad)
    # a method built by hand (the NamedTuple's default): invariant, nothing to rescale
    hand = engine.CurvatureMethod(*smac[:-2])
    assert hand.grad_stats_scale_with_loss is False and hand.refresh_can_fail is False
    assert engine.data_parallel_grad_scale(hand, 4, 2.0) == 2.0


@pytest.mark.parametrize("name", ["smac", "kfac-tikhonov", "singd"])
def test_data_parallel_statistics_equal_the_concatenated_batch(xp, dtype, name):
    """W ranks of n rows: each backpropagates the mean loss of its rows, so its output-gradient
    rows are W times those of the global-mean loss. With ``grad_scale=data_parallel_grad_scale``
    and the weight-weighted mean over ranks (what the adapters do) the finalized statistics equal
    one process on the concatenated batch; without it SMAC's are W² too large."""
    world, n = 3, 4
    rng = np.random.default_rng(21)
    x_np = rng.standard_normal((world * n, 4))
    dl = rng.standard_normal((world * n, 3))  # ∂ℓ_i/∂z_i of every loss term
    method = METHODS[name]()
    st = method.init(LIN, xp=xp, dtype=dtype)

    def finalized(x, g, grad_scale=1.0):
        stats = {**method.input_statistics(LIN, st, asarray(xp, x, dtype)),
                 **method.grad_statistics(LIN, st, asarray(xp, g, dtype), grad_scale=grad_scale)}
        return method.finalize(LIN, st, stats)

    def across_ranks(scale):
        per_rank = [finalized(x_np[r * n:(r + 1) * n], dl[r * n:(r + 1) * n] / n, scale)
                    for r in range(world)]  # the rank's own mean loss: ∂/∂z_i = ∂ℓ_i/∂z_i / n
        out = {}
        for k in per_rank[0]:
            w = [float(f[k][1]) for f in per_rank]
            out[k] = sum(to_numpy(f[k][0]) * wi for f, wi in zip(per_rank, w)) / sum(w)
        return out

    single = {k: to_numpy(v) for k, (v, _) in finalized(x_np, dl / (world * n)).items()}
    ranks = across_ranks(engine.data_parallel_grad_scale(method, world))
    assert set(ranks) == set(single)
    for k in single:
        assert_close(ranks[k], single[k], **tol(xp, dtype), err_msg=f"{name} {k}")
    if name == "smac":  # the negative control: the rank's rows as they are
        naive = across_ranks(1.0)
        assert_close(naive["diag"], world ** 2 * single["diag"], **tol(xp, dtype))


def _torch_mac_state(method, spec, rng, heads=None):
    """A refreshed MAC/SMAC state of ``spec`` in torch float32 (random statistics)."""
    torch = pytest.importorskip("torch")
    state = method.init(spec, xp=compat_torch(), dtype=torch.float32)
    mean = torch.tensor(rng.standard_normal(tuple(state.mean.value.shape)), dtype=torch.float32)
    stats = {"mean": mean}
    if state.diag is not None:
        stats["diag"] = torch.tensor(rng.random(spec.d_out) + 0.1, dtype=torch.float32)
    return method.refresh(spec, method.update(spec, state, stats))


def compat_torch():
    import array_api_compat.torch as xp_torch

    return xp_torch


@pytest.mark.parametrize("variant", ["mac", "smac_inverse", "no_bias", "qkv_per_head", "conv"])
def test_apply_split_torch_plan_equals_the_checked_path(variant, monkeypatch):
    """torch, in place: the layer's prepared plan writes the same bits as the checked route
    (``mac_apply_trusted``) for MAC, SMAC with the inverse scale, no bias, per-head qkv factors and
    a conv weight; the plan is taken (the checked route is not reached)."""
    torch = pytest.importorskip("torch")
    import importlib

    engine_mod = importlib.import_module("maccore.engine")
    rng = np.random.default_rng(11)
    bias = variant != "no_bias"
    if variant == "qkv_per_head":
        spec = mc.LayerSpec(mc.LayerKind.LINEAR, 8, 24, True, qkv=mc.QkvSpec(num_heads=2, mode="per_head"))
        shape = (24, 8)
    elif variant == "conv":
        spec = mc.LayerSpec(mc.LayerKind.CONV2D, 12, 5, True, conv=mc.ConvSpec(kernel_size=(2, 2)))
        shape = (5, 3, 2, 2)
    else:
        spec = mc.LayerSpec(mc.LayerKind.LINEAR, 7, 4, bias)
        shape = (4, 7)
    method = engine.mac_method(damping=0.3, diagonal=variant == "smac_inverse",
                               scale="inverse" if variant == "smac_inverse" else "reference")
    state = _torch_mac_state(method, spec, rng)
    gw = torch.tensor(rng.standard_normal(shape), dtype=torch.float32)
    gb = torch.tensor(rng.standard_normal(shape[0]), dtype=torch.float32) if bias else None
    real = engine_mod.mac_apply_trusted
    want_w, want_b = engine.apply_split(method, spec, state, gw.clone(),
                                        None if gb is None else gb.clone())  # out of place: checked
    monkeypatch.setattr(engine_mod, "mac_apply_trusted",
                        lambda *a, **k: pytest.fail("the checked route ran"))
    for _ in range(2):  # the plan is made, then reused
        w, b = gw.clone(), None if gb is None else gb.clone()
        got = engine.apply_split(method, spec, state, w, b, inplace=True)
        assert got[0] is w and got[1] is b
        assert torch.equal(w, want_w)
        assert b is None or torch.equal(b, want_b)
    monkeypatch.setattr(engine_mod, "mac_apply_trusted", real)


def test_apply_split_torch_plan_follows_the_state():
    """The plan is remade when â is written in place, when the state is new, when the damping
    or the SMAC diagonal changes; gradients it does not cover (another dtype, not contiguous,
    autograd, the fast paths off) take the checked route and give its results."""
    torch = pytest.importorskip("torch")
    from maccore import _delegate

    rng = np.random.default_rng(12)
    spec = mc.LayerSpec(mc.LayerKind.LINEAR, 6, 3, True)
    method = engine.mac_method(damping=0.5, diagonal=True)
    state = _torch_mac_state(method, spec, rng)
    gw = torch.tensor(rng.standard_normal((3, 6)), dtype=torch.float32)
    gb = torch.tensor(rng.standard_normal(3), dtype=torch.float32)

    def both(method, state, gw=gw, gb=gb):
        want = engine.apply_split(method, spec, state, gw.clone(), gb.clone())
        w, b = gw.clone(), gb.clone()
        engine.apply_split(method, spec, state, w, b, inplace=True)
        torch.testing.assert_close(w, want[0], rtol=0, atol=0)
        torch.testing.assert_close(b, want[1], rtol=0, atol=0)
        return w

    first = both(method, state)
    both(engine.mac_method(damping=0.5, diagonal=True, scale="inverse"), state)
    both(method, state)
    with torch.no_grad():
        state.mean_hat.mul_(2.0)  # written in place: version bumped
    assert not torch.equal(both(method, state), first)
    state.diag_hat.add_(1.0)
    both(method, state)
    both(engine.mac_method(damping=2.0, diagonal=True), state)
    both(method, _torch_mac_state(method, spec, rng))
    # not covered: float64 gradients of a float32 state, a transposed view, the fast paths off
    both(method, state, gw.double(), gb.double())
    wt = torch.tensor(rng.standard_normal((6, 3)), dtype=torch.float32).t()
    want = engine.apply_split(method, spec, state, wt.clone(), gb.clone())
    w = wt.clone()
    engine.apply_split(method, spec, state, w, gb.clone(), inplace=True)
    torch.testing.assert_close(w, want[0], rtol=0, atol=0)
    assert not _delegate.torch_mac_plan(wt, gb, state.mean_hat, state.diag_hat, 0.5, "reference",
                                        lambda xp, sdt: pytest.fail("planned"))
    g7 = torch.ones(3, 7, dtype=torch.float64)  # fits â without a bias, but not its dtype
    assert not _delegate.torch_mac_plan(g7, None, state.mean_hat, state.diag_hat, 0.5, "reference",
                                        lambda xp, sdt: pytest.fail("planned"))
    _delegate.FAST_PATHS = False
    try:
        assert not _delegate.torch_mac_plan(gw.clone(), gb.clone(), state.mean_hat, state.diag_hat,
                                            0.5, "reference", lambda xp, sdt: pytest.fail("planned"))
    finally:
        _delegate.FAST_PATHS = True
    with pytest.raises(ValueError, match="does not match|shape"):  # a misfit: the checked errors
        engine.apply_split(method, spec, state, torch.ones(3, 5), gb.clone(), inplace=True)


def test_apply_split_torch_plan_leaves_with_its_state():
    """A plan holds the factor tensors of its state's â: it is dropped when that â is."""
    torch = pytest.importorskip("torch")
    import gc

    from maccore import _delegate

    rng = np.random.default_rng(13)
    spec = mc.LayerSpec(mc.LayerKind.LINEAR, 5, 2, True)
    method = engine.mac_method()
    state = _torch_mac_state(method, spec, rng)
    key = id(state.mean_hat)
    engine.apply_split(method, spec, state, torch.ones(2, 5), torch.ones(2), inplace=True)
    assert key in _delegate._PLANS
    del state
    gc.collect()
    assert key not in _delegate._PLANS


@pytest.mark.parametrize("scale", ["reference", "inverse"])
@pytest.mark.parametrize("heads", [None, 2])
def test_apply_gain_bound_holds(scale, heads):
    """max|ĝ| ≤ κ·max|G̃| (float64) for random and adversarial â and G̃ — a single large entry of
    â, â along G̃'s rows, a zero â — with and without per-head factors; ``None`` for SMAC, KFAC,
    SINGD and a fixed first-layer inverse."""
    rng = np.random.default_rng(14)
    d_in, d_out = 9, 6
    qkv = None if heads is None else mc.QkvSpec(num_heads=heads, mode="per_head")
    spec = mc.LayerSpec(mc.LayerKind.LINEAR, d_in, 3 * d_out if qkv else d_out, True, qkv=qkv)
    method = engine.mac_method(damping=0.05, scale=scale)
    state = method.init(spec, xp=np, dtype=np.float64)
    kappa = engine.apply_gain_bound(method, spec, state)
    assert kappa == pytest.approx(2 * (1 if scale == "reference" else 20) * (1 + np.sqrt(d_in + 1)))
    shape = tuple(state.mean_hat.shape)
    spiky = np.zeros(shape)
    spiky[..., 0] = 1e3
    for mean in (rng.standard_normal(shape), spiky, np.zeros(shape), np.ones(shape) * 1e-4):
        st = state._replace(mean_hat=mean)
        for _ in range(20):
            g = rng.standard_normal((spec.d_out, d_in + 1)) * rng.choice([1e-3, 1.0, 1e3])
            if rng.random() < 0.5:  # rows aligned with â (the largest v)
                a = mean if mean.ndim == 1 else mean[0]
                g = np.sign(a + 1e-300)[None, :] * np.abs(g)
            w, b = engine.apply_split(method, spec, st, g[:, :d_in].copy(), g[:, d_in].copy())
            got = max(np.abs(w).max(), np.abs(b).max())
            assert got <= kappa / 2 * np.abs(g).max() * (1 + 1e-12)
    smac = engine.mac_method(diagonal=True)
    assert engine.apply_gain_bound(smac, spec, smac.init(spec, xp=np, dtype=np.float64)) is None
    for other in (engine.kfac_method(), engine.singd_method()):
        assert engine.apply_gain_bound(other, LIN, other.init(LIN, xp=np, dtype=np.float64)) is None
    first = engine.with_first_layer(state, np.eye(d_in + 1)) if heads is None else None
    if first is not None:
        assert engine.apply_gain_bound(method, spec, first) is None


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unchecked_refresh_matches_the_checked_one(xp, dtype, name):
    """``refresh(..., checked=False)`` (nothing read on the host) builds the checked refresh's
    state bit for bit, for a layer observed once and for one never observed (KFAC keeps its
    initial cache then, chosen on the device); the exact mode's ``apply`` leaves a never-observed
    layer's gradient as it is; only KFAC declares a refresh that can fail."""
    method = METHODS[name]()
    rng = np.random.default_rng(11)
    x = asarray(xp, rng.standard_normal((6, 4)), dtype)
    g = asarray(xp, rng.standard_normal((6, 3)), dtype)
    fresh = method.init(LIN, xp=xp, dtype=dtype)
    seen = _cycle(method, LIN, xp, dtype, [x], [g])[0]
    for state in (fresh, seen):
        got = method.refresh(LIN, state, checked=False)
        want = method.refresh(LIN, state)
        got, want = (mc.checkpoint.flatten_state(s)[0] for s in (got, want))
        assert got.keys() == want.keys()
        for k in got:
            assert np.array_equal(to_numpy(got[k]), to_numpy(want[k]), equal_nan=True), k
    assert method.refresh_can_fail is name.startswith("kfac")
    if name == "kfac-exact":
        grad = asarray(xp, rng.standard_normal((3, 5)), dtype)
        assert np.array_equal(to_numpy(method.apply(LIN, fresh, grad)), to_numpy(grad))
        assert not np.array_equal(to_numpy(method.apply(LIN, method.refresh(LIN, seen), grad)),
                                  to_numpy(grad))

