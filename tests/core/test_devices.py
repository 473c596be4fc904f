"""Device propagation without a GPU: array_api_strict has extra devices and refuses to combine
arrays across them, so every core function run on a non-default device must keep its outputs
(and every array it creates internally) on that device. A dropped ``device=`` fails here."""

from __future__ import annotations

import numpy as np
import pytest

import maccore as mc
from maccore import engine

xp = pytest.importorskip("array_api_strict")
DEV = xp.Device("device1")


def _a(*shape, seed=0, shift=0.0):
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape) + shift, device=DEV)


def _on_dev(*arrays):
    for a in arrays:
        if a is None:
            continue
        assert a.device == DEV, f"{a.device} != {DEV}"


def _leaves(state):
    if isinstance(state, tuple):
        for s in state:
            yield from _leaves(s)
    elif hasattr(state, "device"):
        yield state


def test_rows_and_statistics_stay_on_device():
    x = _a(2, 3, 4)
    _on_dev(mc.linear_rows(x, bias=True), mc.linear_rows(x, bias=True, reduce=True),
            mc.grad_rows(x, reduce=True))
    img = _a(2, 3, 6, 5)
    _on_dev(mc.conv2d_rows(img, 3, padding="same", dilation=2, bias=True),
            mc.conv2d_rows(img, 3, stride=2, padding=1, bias=True),
            mc.conv2d_rows(img, 3, padding=1, bias=True, reduce=True),
            mc.conv2d_mean_patch(img, 3, padding=((1, 0), (2, 1)), dilation=2, bias=True),
            mc.conv2d_grad_rows(img), mc.conv2d_grad_rows(img, reduce=True))
    rows = mc.linear_rows(_a(9, 4), bias=True)
    _on_dev(mc.mean_activation(rows), mc.input_factor(rows),
            mc.gradient_factor(_a(9, 3), reduction_factor=0.5), mc.gradient_diagonal(_a(9, 3)),
            mc.gradient_diagonal(_a(9, 3), reduction_factor=2.0))
    w, b = mc.split_grad_matrix(mc.grad_matrix(_a(3, 4), _a(3)), (3, 4), bias=True)
    _on_dev(w, b)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "additive"])
def test_attention_stays_on_device(causal, mask):
    q, k = _a(2, 2, 5, 3), _a(2, 2, 5, 3, seed=1)
    m = None
    if mask == "bool":
        m = xp.asarray(np.random.default_rng(2).random((2, 1, 5, 5)) > 0.3, device=DEV)
    elif mask == "additive":
        m = _a(1, 2, 5, 5, seed=3)
    attn = mc.attention_probs(q, k, causal=causal, mask=m)
    _on_dev(attn)
    x = _a(2, 5, 4)
    for mode in ("reference", "per_head"):
        _on_dev(mc.attention_weighted_mean(x, attn, bias=True, mode=mode))
    _on_dev(*mc.split_qkv(_a(2, 5, 12), 2))


def test_mac_kfac_apply_stay_on_device():
    g, a = _a(6, 5), _a(5, shift=1.0)
    _on_dev(mc.mac_apply(g, a, 0.5), mc.mac_apply(g, a, 0.5, scale="inverse", grad_diag=_a(6) ** 2),
            mc.mac_apply(g, _a(3, 5), 0.5))
    _on_dev(*mc.mac_apply(g[:, :4], a, 0.5, grad_bias=g[:, 4]))
    A = mc.input_factor(mc.linear_rows(_a(10, 4), bias=True))
    G = mc.gradient_factor(_a(10, 6), reduction_factor=1.0)
    for mode in ("tikhonov", "pi", "exact"):
        _on_dev(mc.kfac_apply(g, A, G, 0.1, mode=mode))
    _on_dev(*mc.pi_dampings(A, G, 0.1), mc.damped_inverse(A, 0.1), mc.kfac_dense(A, G))
    _on_dev(mc.first_layer_apply(g, mc.damped_inverse(A, 0.1), 0.1, grad_diag=_a(6) ** 2))


@pytest.mark.parametrize("make", [
    lambda: engine.mac_method(), lambda: engine.mac_method(diagonal=True, scale="inverse"),
    lambda: engine.kfac_method(damping_mode="exact"), lambda: engine.kfac_method(damping_mode="pi"),
    lambda: engine.singd_method(structures=("diagonal", "dense")),
])
def test_engine_methods_keep_state_and_updates_on_device(make):
    method = make()
    spec = mc.LayerSpec(mc.LayerKind.LINEAR, 4, 3, True, name="fc")
    state = method.init(spec, xp=xp, dtype=xp.float64, device=DEV)
    assert all(leaf.device == DEV for leaf in _leaves(state))
    pooled = engine.pool_stats({}, method.input_statistics(spec, state, _a(8, 4)))
    pooled = engine.pool_stats(pooled, method.grad_statistics(spec, state, _a(8, 3)))
    fin = method.finalize(spec, state, pooled)
    state = method.refresh(spec, method.update(spec, state, {k: v for k, (v, w) in fin.items()}))
    assert all(leaf.device == DEV for leaf in _leaves(state))
    _on_dev(method.apply(spec, state, _a(3, 5)), *engine.apply_split(method, spec, state, _a(3, 4), _a(3)))
    _on_dev(*engine.apply_split(method, spec, state, _a(3, 4), None))  # the bias column made here
    _on_dev(method.curvature_dense(spec, state), method.preconditioner_dense(spec, state))
    assert bool(engine.all_finite([_a(2), _a(3)]))


def test_ema_and_schedule_on_device():
    s = mc.ema_init((3,), xp=xp, dtype=xp.float32, device=DEV)
    s = mc.ema_update(s, xp.asarray(np.ones(3), dtype=xp.float32, device=DEV), decay=0.9)
    _on_dev(s.count, s.value, s.weight, mc.ema_debiased(s, decay=0.9))
    assert bool(mc.is_due(s.count, 1))


def test_cross_device_inputs_raise():
    g = xp.asarray(np.ones((3, 5)))  # default device
    with pytest.raises((ValueError, TypeError)):
        mc.mac_apply(g, _a(5), 1.0)
