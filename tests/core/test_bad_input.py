"""Bad input raises ValueError/TypeError whose message names the argument and the shapes (the public API contract)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import maccore as mc
from tests.conftest import asarray


def _a(xp, *shape, dtype=None):
    return asarray(xp, np.ones(shape), dtype)


# ---------------------------------------------------------------------------------------------
# wrong ranks


def test_wrong_ranks(xp):
    with pytest.raises(ValueError, match=r"mac_apply: argument 'grad_mat' must have 2 dimensions, got shape \[3\]"):
        mc.mac_apply(_a(xp, 3), _a(xp, 3), 1.0)
    with pytest.raises(ValueError, match=r"mac_apply: argument 'mean' must have 1 or 2 dimensions, got shape \[1, 1, 3\]"):
        mc.mac_apply(_a(xp, 2, 3), _a(xp, 1, 1, 3), 1.0)
    with pytest.raises(ValueError, match=r"conv2d_rows: argument 'x' must have 4 dimensions, got shape \[2, 5, 5\]"):
        mc.conv2d_rows(_a(xp, 2, 5, 5), 3, bias=False)
    with pytest.raises(ValueError, match=r"conv2d_mean_patch: argument 'x' must have 4 dimensions, got shape \[5, 5\]"):
        mc.conv2d_mean_patch(_a(xp, 5, 5), 3, bias=False)
    with pytest.raises(ValueError, match=r"conv2d_grad_rows: argument 'g' must have 4 dimensions, got shape \[2, 3\]"):
        mc.conv2d_grad_rows(_a(xp, 2, 3))
    with pytest.raises(ValueError, match=r"input_factor: argument 'rows' must have 2 dimensions, got shape \[4\]"):
        mc.input_factor(_a(xp, 4))
    with pytest.raises(ValueError, match=r"gradient_factor: argument 'grad_rows' must have 2 dimensions, got shape \[1, 2, 3\]"):
        mc.gradient_factor(_a(xp, 1, 2, 3), reduction_factor=1.0)
    with pytest.raises(ValueError, match=r"mean_activation: argument 'rows' must have 2 dimensions, got shape \[3\]"):
        mc.mean_activation(_a(xp, 3))
    with pytest.raises(ValueError, match=r"gradient_diagonal: argument 'grad_rows' must have 2 dimensions"):
        mc.gradient_diagonal(_a(xp, 3))
    with pytest.raises(ValueError, match=r"attention_probs: argument 'q' must have 4 dimensions, got shape \[2, 3, 4\]"):
        mc.attention_probs(_a(xp, 2, 3, 4), _a(xp, 2, 1, 3, 4))
    with pytest.raises(ValueError, match=r"attention_weighted_mean: argument 'attn' must have 4 dimensions, got shape \[2, 3, 3\]"):
        mc.attention_weighted_mean(_a(xp, 2, 3, 4), _a(xp, 2, 3, 3), bias=True)
    with pytest.raises(ValueError, match=r"split_qkv: argument 'out' must have 3 dimensions, got shape \[2, 6\]"):
        mc.split_qkv(_a(xp, 2, 6), 1)
    with pytest.raises(ValueError, match=r"kfac_apply: argument 'A' must have 2 dimensions, got shape \[3\]"):
        mc.kfac_apply(_a(xp, 2, 3), _a(xp, 3), _a(xp, 2, 2), 0.1)
    with pytest.raises(ValueError, match=r"kfac_apply: factor 'G' must be square, got shape \[2, 3\]"):
        mc.kfac_apply(_a(xp, 2, 3), _a(xp, 3, 3), _a(xp, 2, 3), 0.1)
    with pytest.raises(ValueError, match=r"kfac_dense: factor 'A' must be square, got shape \[3, 2\]"):
        mc.kfac_dense(_a(xp, 3, 2), _a(xp, 2, 2))
    with pytest.raises(ValueError, match=r"damped_inverse: factor 'A' must be square, got shape \[3, 2\]"):
        mc.damped_inverse(_a(xp, 3, 2), 0.1, name="A")
    with pytest.raises(ValueError, match=r"pi_dampings: argument 'G' must have 2 dimensions, got shape \[2\]"):
        mc.pi_dampings(_a(xp, 2, 2), _a(xp, 2), 0.1)
    with pytest.raises(ValueError, match=r"grad_matrix: argument 'grad_weight' must have at least 2 dimensions, got shape \[3\]"):
        mc.grad_matrix(_a(xp, 3))
    with pytest.raises(ValueError, match=r"split_grad_matrix: argument 'mat' must have 2 dimensions, got shape \[6\]"):
        mc.split_grad_matrix(_a(xp, 6), (2, 3), bias=False)
    with pytest.raises(ValueError, match=r"linear_rows: argument 'x' must have at least 1 dimension, got shape \[\]"):
        mc.linear_rows(xp.asarray(1.0), bias=True)


# ---------------------------------------------------------------------------------------------
# mismatched sizes


def test_mismatched_sizes(xp):
    with pytest.raises(ValueError, match=r"'mean' of shape \[4\] does not match 'grad_mat' of shape \[3, 5\]"):
        mc.mac_apply(_a(xp, 3, 5), _a(xp, 4), 1.0)
    with pytest.raises(ValueError, match=r"2 head factors in 'mean' \[2, 5\] do not divide the 3 rows of 'grad_mat' \[3, 5\]"):
        mc.mac_apply(_a(xp, 3, 5), _a(xp, 2, 5), 1.0)
    with pytest.raises(ValueError, match=r"'grad_diag' of shape \[2\] must be \[3\] for 'grad_mat' \[3, 5\]"):
        mc.mac_apply(_a(xp, 3, 5), _a(xp, 5), 1.0, grad_diag=_a(xp, 2))
    with pytest.raises(ValueError, match=r"'grad_mat' of shape \[2, 3\] needs A \[3, 3\] and G \[2, 2\], got A \[4, 4\] and G \[2, 2\]"):
        mc.kfac_apply(_a(xp, 2, 3), _a(xp, 4, 4), _a(xp, 2, 2), 0.1)
    with pytest.raises(ValueError, match=r"'grad_bias' of shape \[4\] does not match 'grad_weight' of shape \[3, 2\]"):
        mc.grad_matrix(_a(xp, 3, 2), _a(xp, 4))
    with pytest.raises(ValueError, match=r"'mat' of shape \[3, 4\] does not match weight shape \[3, 2\] with bias=True"):
        mc.split_grad_matrix(_a(xp, 3, 4), (3, 2), bias=True)
    with pytest.raises(ValueError, match=r"'q' \[1, 2, 3, 4\] and 'k' \[1, 2, 3, 5\] must agree"):
        mc.attention_probs(_a(xp, 1, 2, 3, 4), _a(xp, 1, 2, 3, 5))
    with pytest.raises(ValueError, match=r"'attn' of shape \[2, 1, 4, 4\] does not match 'x' of shape \[2, 3, 5\]"):
        mc.attention_weighted_mean(_a(xp, 2, 3, 5), _a(xp, 2, 1, 4, 4), bias=True)
    with pytest.raises(ValueError, match=r"output features 7 of \[1, 2, 7\] are not divisible by 3 · num_heads = 3"):
        mc.split_qkv(_a(xp, 1, 2, 7), 1)
    with pytest.raises(ValueError, match=r"statistic of shape \[4\] does not match the running average of shape \[3\]"):
        mc.ema_update(mc.ema_init((3,), xp=xp), _a(xp, 4, dtype=xp.float32), decay=0.9)

    pm = mc.mac()
    s = pm.init(4, xp=xp)
    with pytest.raises(ValueError, match=r"mac.update: batch mean of shape \[3\] does not match the layer's running mean of shape \[4\]"):
        pm.update(s, _a(xp, 5, 3))
    with pytest.raises(ValueError, match="exactly one of 'rows' or 'mean'"):
        pm.update(s)
    with pytest.raises(ValueError, match=r"'mean' of shape \[4\] does not match 'grad_mat' of shape \[2, 3\]"):
        pm.apply(pm.refresh(s), _a(xp, 2, 3))

    pk = mc.kfac()
    sk = pk.init(3, 2, xp=xp)
    with pytest.raises(ValueError, match=r"batch factor A of shape \[4, 4\] does not match the running factor of shape \[3, 3\]"):
        pk.update(sk, _a(xp, 5, 4), _a(xp, 5, 2), reduction_factor=1.0)
    with pytest.raises(ValueError, match=r"batch factor G of shape \[3, 3\] does not match the running factor of shape \[2, 2\]"):
        pk.update(sk, _a(xp, 5, 3), _a(xp, 5, 3), reduction_factor=1.0)
    with pytest.raises(ValueError, match="give 'grad_rows' with 'reduction_factor'"):
        pk.update(sk, _a(xp, 5, 3), _a(xp, 5, 2))
    with pytest.raises(ValueError, match=r"kfac.apply: 'grad_mat' of shape \[3, 3\] does not match the layer's factors \(\[2, 3\]\)"):
        pk.apply(pk.refresh(sk), _a(xp, 3, 3))

    spec = mc.LayerSpec(mc.LayerKind.LINEAR, d_in=4, d_out=2, has_bias=False, name="fc1")
    with pytest.raises(ValueError, match=r"fc1: input feature size: expected 4, got 5 \(input shape \[2, 5\]\)"):
        mc.to_rows(spec, _a(xp, 2, 5))


# ---------------------------------------------------------------------------------------------
# mixed namespaces


def test_mixed_namespaces():
    torch = pytest.importorskip("torch")
    g = np.ones((2, 3))
    m = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"mac_apply: arrays from mixed namespaces \(grad_mat: .*numpy \[2, 3\], mean: .*torch \[3\]\)"):
        mc.mac_apply(g, m, 1.0)
    with pytest.raises(TypeError, match=r"kfac_apply: arrays from mixed namespaces \(.*A: .*torch \[3, 3\]"):
        mc.kfac_apply(g, torch.eye(3, dtype=torch.float64), np.eye(2), 0.1)
    with pytest.raises(TypeError, match=r"grad_matrix: arrays from mixed namespaces \(grad_weight: .*numpy \[2, 3\], grad_bias: .*torch \[2\]\)"):
        mc.grad_matrix(g, torch.ones(2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"ema_update: arrays from mixed namespaces"):
        mc.ema_update(mc.ema_init((3,), xp=np), m, decay=0.9)
    with pytest.raises(TypeError, match=r"attention_probs: arrays from mixed namespaces"):
        mc.attention_probs(np.ones((1, 1, 2, 2)), torch.ones(1, 1, 2, 2))
    with pytest.raises(TypeError, match=r"mac_apply: argument 'mean' must be an array, got list"):
        mc.mac_apply(g, [1.0, 2.0, 3.0], 1.0)


def test_mixed_namespaces_strict_numpy():
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match=r"mixed namespaces \(grad_mat: array_api_strict \[2, 3\], mean: .*numpy \[3\]\)"):
        mc.mac_apply(strict.ones((2, 3)), np.ones(3), 1.0)


# ---------------------------------------------------------------------------------------------
# damping ≤ 0, NaN, inf, wrong type


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, 0])
def test_bad_damping(xp, bad):
    g, a = _a(xp, 2, 3), _a(xp, 3)
    A, G = _a(xp, 3, 3), _a(xp, 2, 2)
    msg = rf"damping must be positive and finite, got {bad!r}".replace("(", r"\(")
    with pytest.raises(ValueError, match=rf"mac_apply: {msg}"):
        mc.mac_apply(g, a, bad)
    for mode in ("tikhonov", "pi", "exact"):
        with pytest.raises(ValueError, match=rf"kfac_apply: {msg}"):
            mc.kfac_apply(g, A, G, bad, mode=mode)
        with pytest.raises(ValueError, match=rf"kfac: {msg}"):
            mc.kfac(damping=bad, mode=mode)
    with pytest.raises(ValueError, match=r"kfac_apply: damping\[1\] must be positive and finite"):
        mc.kfac_apply(g, A, G, (0.1, bad))
    with pytest.raises(ValueError, match=rf"mac: {msg}"):
        mc.mac(damping=bad)
    with pytest.raises(ValueError, match=rf"damped_inverse: {msg}"):
        mc.damped_inverse(A, bad)
    with pytest.raises(ValueError, match=rf"pi_dampings: {msg}"):
        mc.pi_dampings(A, G, bad)
    with pytest.raises(ValueError, match=r"gradient_factor: reduction_factor must be positive and finite"):
        mc.gradient_factor(g, reduction_factor=bad)
    with pytest.raises(ValueError, match=r"gradient_diagonal: reduction_factor must be positive and finite"):
        mc.gradient_diagonal(g, reduction_factor=bad)


def test_damping_wrong_type(xp):
    g, a, A, G = _a(xp, 2, 3), _a(xp, 3), _a(xp, 3, 3), _a(xp, 2, 2)
    with pytest.raises(TypeError, match=r"mac_apply: damping must be a single positive number, got \(1.0, 2.0\)"):
        mc.mac_apply(g, a, (1.0, 2.0))
    with pytest.raises(TypeError, match=r"mac: damping must be a positive number, got True"):
        mc.mac(damping=True)
    for mode in ("pi", "exact"):  # a (λ_G, λ_A) pair only makes sense for per-factor Tikhonov
        with pytest.raises(TypeError, match=r"damping must be a single positive number, got \(0.1, 0.2\)"):
            mc.kfac_apply(g, A, G, (0.1, 0.2), mode=mode)
        with pytest.raises(TypeError, match=r"kfac: damping must be a single positive number"):
            mc.kfac(damping=(0.1, 0.2), mode=mode)


def test_bad_options(xp):
    g, a, A, G = _a(xp, 2, 3), _a(xp, 3), _a(xp, 3, 3), _a(xp, 2, 2)
    with pytest.raises(ValueError, match=r"mac_apply: scale must be one of \('reference', 'inverse'\), got 'textbook'"):
        mc.mac_apply(g, a, 1.0, scale="textbook")
    with pytest.raises(ValueError, match=r"kfac_apply: mode must be one of \('tikhonov', 'pi', 'exact'\), got 'eig'"):
        mc.kfac_apply(g, A, G, 0.1, mode="eig")
    with pytest.raises(ValueError, match=r"mac: decay must be in \[0, 1\), got 1.0"):
        mc.mac(decay=1.0)
    with pytest.raises(ValueError, match=r"kfac: decay must be in \[0, 1\), got -0.1"):
        mc.kfac(decay=-0.1)
    with pytest.raises(ValueError, match=r"mode must be 'reference' or 'per_head', got 'off'"):
        mc.attention_weighted_mean(_a(xp, 1, 2, 3), _a(xp, 1, 1, 2, 2), bias=False, mode="off")
    with pytest.raises(ValueError, match=r"split_qkv: num_heads must be a positive integer, got 0"):
        mc.split_qkv(_a(xp, 1, 2, 6), 0)
    with pytest.raises(ValueError, match=r"QkvSpec.mode must be 'reference', 'per_head' or 'off', got 'exact'"):
        mc.QkvSpec(num_heads=2, mode="exact")
    with pytest.raises(ValueError, match=r"num_heads must be >= 1, got 0"):
        mc.QkvSpec(num_heads=0)
    with pytest.raises(ValueError, match=r"period must be a positive integer, got 0"):
        mc.is_due(3, 0)


# ---------------------------------------------------------------------------------------------
# convolutions: grouped, kernel larger than the input, bad geometry


def test_conv_bad_geometry(xp):
    x = _a(xp, 1, 4, 5, 5)
    with pytest.raises(ValueError, match=r"conv2d_rows: grouped convolution with groups=2 and 4 input channels is not supported"):
        mc.conv2d_rows(x, 3, bias=False, groups=2)
    with pytest.raises(ValueError, match=r"conv2d_mean_patch: grouped convolution with groups=2 and 4 input channels"):
        mc.conv2d_mean_patch(x, 3, bias=False, groups=2)
    small = _a(xp, 1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"conv2d_rows: input of shape \[1, 1, 2, 2\] is smaller than the dilated kernel \(3, 3\)"):
        mc.conv2d_rows(small, 3, bias=False)
    with pytest.raises(ValueError, match=r"conv2d_mean_patch: input of shape \[1, 1, 2, 2\] is smaller than the dilated kernel \(2, 2\) \(dilation \(2, 2\)"):
        mc.conv2d_mean_patch(small, 2, dilation=2, bias=True)
    with pytest.raises(ValueError, match=r"padding='same' needs stride 1, got stride \(2, 2\)"):
        mc.conv2d_rows(x, 3, stride=2, padding="same", bias=False)
    with pytest.raises(ValueError, match=r"padding must be non-negative, got \(\(1, -1\), \(0, 0\)\)"):
        mc.conv2d_rows(x, 3, padding=((1, -1), (0, 0)), bias=False)
    with pytest.raises(ValueError, match=r"kernel_size must be an int or a pair of ints, got \(1, 2, 3\)"):
        mc.conv2d_rows(x, (1, 2, 3), bias=False)
    with pytest.raises(ValueError, match=r"conv2d_rows: kernel_size, stride and dilation must be >= 1"):
        mc.conv2d_rows(x, 3, stride=0, bias=False)
    with pytest.raises(ValueError, match=r"padding must be an int, a pair, a pair of pairs, 'valid' or 'same'; got 'full'"):
        mc.conv2d_rows(x, 3, padding="full", bias=False)
    with pytest.raises(ValueError, match=r"groups must be >= 1, got 0"):
        mc.ConvSpec(kernel_size=3, groups=0)
