"""Canonical rows: linear/conv2d input rows, gradient rows, gradient matrices (docs/math.md,
§1.7, T5, T6, T17; M-P9, M-P10)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import maccore as mc
from maccore.rows import normalize_padding
from tests.conftest import asarray, assert_close, to_numpy, tol
from tests.core.helpers import assert_like, rand, seeds, stats_dtype_of, xgiven

# ---------------------------------------------------------------------------------------------
# independent im2col (plain loops over output locations and kernel taps)


def _pads(padding, k, d):
    """Padding → ((top, bottom), (left, right)); 'same' as torch (extra pixel bottom/right)."""
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        out = []
        for kk, dd in zip(k, d):
            total = dd * (kk - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding[0], int):
        return ((padding[0], padding[0]), (padding[1], padding[1]))
    return tuple(tuple(p) for p in padding)


def im2col_loops(x, k, stride, padding, dilation, *, depthwise=False):
    """rows[(n, p), (c, i, j)] (or rows[(n, c, p), (i, j)] for depthwise) with explicit loops."""
    n_, c_, h, w = x.shape
    (pt, pb), (pl, pr) = _pads(padding, k, dilation)
    xpad = np.zeros((n_, c_, h + pt + pb, w + pl + pr))
    xpad[:, :, pt : pt + h, pl : pl + w] = x
    kh, kw = k
    sh, sw = stride
    dh, dw = dilation
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    rows = []
    if depthwise:
        for n in range(n_):
            for c in range(c_):
                for a in range(oh):
                    for b in range(ow):
                        rows.append(
                            [xpad[n, c, a * sh + i * dh, b * sw + j * dw] for i in range(kh) for j in range(kw)]
                        )
    else:
        for n in range(n_):
            for a in range(oh):
                for b in range(ow):
                    rows.append(
                        [
                            xpad[n, c, a * sh + i * dh, b * sw + j * dw]
                            for c in range(c_)
                            for i in range(kh)
                            for j in range(kw)
                        ]
                    )
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), -1), (oh, ow)


@st.composite
def conv_cases(draw, allow_depthwise=True):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kind = draw(st.sampled_from(["int", "pair", "asym", "valid", "same"]))
    sh, sw = (1, 1) if kind == "same" else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if kind == "int":
        padding = draw(st.integers(0, 2))
    elif kind == "pair":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    elif kind == "asym":
        padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(2))
    else:
        padding = kind
    h = dh * (kh - 1) + 1 + draw(st.integers(0, 3))
    w = dw * (kw - 1) + 1 + draw(st.integers(0, 3))
    n = draw(st.integers(1, 2))
    c = draw(st.integers(1, 3))
    depthwise = allow_depthwise and c > 1 and draw(st.booleans())
    return dict(n=n, c=c, h=h, w=w, k=(kh, kw), stride=(sh, sw), padding=padding, dilation=(dh, dw),
                depthwise=depthwise)


def _conv_kwargs(case):
    return dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                groups=case["c"] if case["depthwise"] else 1)


# ---------------------------------------------------------------------------------------------
# linear rows


@xgiven(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=0, max_size=3), d=st.integers(1, 4),
       bias=st.booleans())
def test_linear_rows(xp, dtype, seed, lead, d, bias):
    rng = np.random.default_rng(seed)
    x_np, x = rand(xp, dtype, rng, *lead, d)
    rows = mc.linear_rows(x, bias=bias)
    assert_like(rows, x)
    want = x_np.reshape(-1, d)
    if bias:
        want = np.concatenate([want, np.ones((want.shape[0], 1))], axis=1)
        assert np.all(to_numpy(rows)[:, -1] == 1.0)  # T5: bias entry last and exactly 1
    assert_close(rows, want, rtol=0, atol=0)

    if len(lead) >= 2:  # reduce: per-sample MEAN over the shared axes
        red = mc.linear_rows(x, bias=bias, reduce=True)
        assert_like(red, x)
        want_r = x_np.reshape(lead[0], -1, d).mean(axis=1)
        if bias:
            want_r = np.concatenate([want_r, np.ones((lead[0], 1))], axis=1)
            assert np.all(to_numpy(red)[:, -1] == 1.0)
        assert_close(red, want_r, **tol(xp, dtype))


@xgiven(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), d=st.integers(1, 4))
def test_grad_rows(xp, dtype, seed, lead, d):
    rng = np.random.default_rng(seed)
    g_np, g = rand(xp, dtype, rng, *lead, d)
    rows = mc.grad_rows(g)
    assert_like(rows, g)
    assert_close(rows, g_np.reshape(-1, d), rtol=0, atol=0)
    red = mc.grad_rows(g, reduce=True)
    assert_like(red, g)
    want = g_np.reshape(lead[0], -1, d).sum(axis=1) if len(lead) > 1 else g_np.reshape(-1, d)
    assert_close(red, want, **tol(xp, dtype))  # T17: gradients are SUMMED


# ---------------------------------------------------------------------------------------------
# conv rows against the loop im2col


@xgiven(2, case=conv_cases(), bias=st.booleans(), seed=seeds)
def test_conv2d_rows_match_loops(xp, dtype, case, bias, seed):
    rng = np.random.default_rng(seed)
    x_np, x = rand(xp, dtype, rng, case["n"], case["c"], case["h"], case["w"])
    want, (oh, ow) = im2col_loops(x_np, case["k"], case["stride"], case["padding"], case["dilation"],
                                  depthwise=case["depthwise"])
    kw_ = _conv_kwargs(case)
    assert mc.conv2d_output_size((case["h"], case["w"]), case["k"], stride=case["stride"],
                                 padding=case["padding"], dilation=case["dilation"]) == (oh, ow)
    rows = mc.conv2d_rows(x, case["k"], bias=bias, **kw_)
    assert_like(rows, x)
    if bias:
        want = np.concatenate([want, np.ones((want.shape[0], 1))], axis=1)
    assert_close(rows, want, rtol=0, atol=0)  # pure data movement: bit-exact

    # reduce: per-sample mean over output locations (and channels for depthwise)
    red = mc.conv2d_rows(x, case["k"], bias=bias, reduce=True, **kw_)
    assert_like(red, x)
    assert_close(red, want.reshape(case["n"], -1, want.shape[1]).mean(axis=1), **tol(xp, dtype))

    # conv2d_mean_patch == mean(conv2d_rows) in the statistics dtype, never materialising patches
    mean = mc.conv2d_mean_patch(x, case["k"], bias=bias, **kw_)
    assert_like(mean, x, dtype=stats_dtype_of(xp, dtype))
    assert_close(mean, want.mean(axis=0), **tol(xp, dtype))
    if bias:
        assert float(to_numpy(mean)[-1]) == 1.0


@xgiven(2, case=conv_cases(), seed=seeds)
def test_conv_rows_reproduce_torch_conv_and_weight_grad(xp, dtype, case, seed):
    """T6 / M-P9: rows @ W.reshape(C_out, -1)ᵀ is torch's conv output and
    grad_W.reshape(C_out, -1) == conv2d_grad_rows(g)ᵀ @ conv2d_rows(x) (patch order = weight order)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(seed)
    n, c = case["n"], case["c"]
    x_np, x = rand(xp, dtype, rng, n, c, case["h"], case["w"])
    depthwise = case["depthwise"]
    c_out = c if depthwise else int(rng.integers(1, 4))
    w_np = rng.standard_normal((c_out, 1 if depthwise else c) + tuple(case["k"]))
    b_np = rng.standard_normal(c_out)
    (pt, pb), (pl, pr) = _pads(case["padding"], case["k"], case["dilation"])
    xt = torch.tensor(x_np, dtype=torch.float64)
    wt = torch.tensor(w_np, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(b_np, dtype=torch.float64, requires_grad=True)
    yt = F.conv2d(F.pad(xt, (pl, pr, pt, pb)), wt, bt, stride=case["stride"], dilation=case["dilation"],
                  groups=c if depthwise else 1)
    if case["padding"] == "same":  # our 'same' is torch's 'same'
        ys = F.conv2d(xt, wt, bt, padding="same", dilation=case["dilation"], groups=c if depthwise else 1)
        assert torch.allclose(ys, yt)
    g_np = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(g_np))
    gw_ref = wt.grad.numpy().reshape(c_out, -1)
    gb_ref = bt.grad.numpy()

    t = tol(xp, dtype, factor=4)
    rows = mc.conv2d_rows(x, case["k"], bias=True, **_conv_kwargs(case))
    g = asarray(xp, g_np, dtype)
    if depthwise:
        p = yt.shape[2] * yt.shape[3]
        r4 = xp.reshape(rows, (n, c, p, -1))
        g4 = xp.reshape(g, (n, c, p, 1))
        gmat = xp.sum(xp.sum(g4 * r4, axis=2), axis=0)  # [C, kk + 1]
        out = xp.reshape(r4[..., :-1] @ xp.reshape(asarray(xp, w_np, dtype), (c, -1, 1)), (n, c, p))
        out = out + xp.reshape(asarray(xp, b_np, dtype), (1, c, 1))
        assert_close(out, yt.detach().numpy().reshape(n, c, p), **t)
    else:
        grows = mc.conv2d_grad_rows(g)
        assert_like(grows, g)
        gmat = xp.matrix_transpose(grows) @ rows
        wmat = mc.grad_matrix(asarray(xp, w_np, dtype), asarray(xp, b_np, dtype))
        out = rows @ xp.matrix_transpose(wmat)  # [N·P, C_out]
        assert_close(out, yt.detach().numpy().reshape(n, c_out, -1).transpose(0, 2, 1).reshape(-1, c_out), **t)
        # reduce gradient rows: SUM over locations
        red = mc.conv2d_grad_rows(g, reduce=True)
        assert_close(red, g_np.reshape(n, c_out, -1).sum(axis=2), **t)
    want = np.concatenate([gw_ref, gb_ref[:, None]], axis=1)
    assert_close(gmat, want, **t)
    # the library's own gradient matrix of torch's gradients has the same layout
    assert_close(mc.grad_matrix(asarray(xp, wt.grad.numpy(), dtype), asarray(xp, gb_ref, dtype)), want, **t)


def test_conv2d_rows_known_values(xp, dtype):
    """A hand-checked 1×1×3×3 example: stride 2, padding 1, 2×2 kernel."""
    x = asarray(xp, np.arange(1.0, 10.0).reshape(1, 1, 3, 3), dtype)
    rows = mc.conv2d_rows(x, 2, stride=2, padding=1, bias=False)
    want = np.array([[0, 0, 0, 1], [0, 0, 2, 3], [0, 4, 0, 7], [5, 6, 8, 9]], dtype=np.float64)
    assert_close(rows, want, rtol=0, atol=0)


def test_normalize_padding():
    assert normalize_padding(1, 3) == ((1, 1), (1, 1))
    assert normalize_padding((1, 2), 3) == ((1, 1), (2, 2))
    assert normalize_padding(((0, 1), (2, 3)), 3) == ((0, 1), (2, 3))
    assert normalize_padding("valid", 3) == ((0, 0), (0, 0))
    assert normalize_padding("same", (2, 3), 1, (1, 2)) == ((0, 1), (2, 2))
    with pytest.raises(ValueError, match="same.*stride 1"):
        normalize_padding("same", 3, 2)
    with pytest.raises(ValueError, match="non-negative"):
        normalize_padding(-1, 3)


# ---------------------------------------------------------------------------------------------
# gradient matrices and dispatch


@xgiven(seed=seeds, d_out=st.integers(1, 4), rest=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       bias=st.booleans())
def test_grad_matrix_roundtrip(xp, dtype, seed, d_out, rest, bias):
    rng = np.random.default_rng(seed)
    w_np, w = rand(xp, dtype, rng, d_out, *rest)
    b_np, b = rand(xp, dtype, rng, d_out)
    mat = mc.grad_matrix(w, b if bias else None)
    assert_like(mat, w)
    want = w_np.reshape(d_out, -1)
    if bias:
        want = np.concatenate([want, b_np[:, None]], axis=1)  # bias LAST column
    assert_close(mat, want, rtol=0, atol=0)
    w2, b2 = mc.split_grad_matrix(mat, (d_out, *rest), bias=bias)
    assert_like(w2, w)
    assert_close(w2, w_np, rtol=0, atol=0)
    if bias:
        assert_close(b2, b_np, rtol=0, atol=0)
    else:
        assert b2 is None


def test_to_rows_dispatch(xp, dtype):
    rng = np.random.default_rng(1)
    x_np, x = rand(xp, dtype, rng, 2, 3, 4)
    spec = mc.LayerSpec(mc.LayerKind.LINEAR, d_in=4, d_out=5, has_bias=True)
    assert spec.d_tilde == 5
    assert_close(mc.to_rows(spec, x), to_numpy(mc.linear_rows(x, bias=True)), rtol=0, atol=0)
    assert_close(mc.to_rows(spec, x, reduce=True), to_numpy(mc.linear_rows(x, bias=True, reduce=True)),
                 rtol=0, atol=0)
    g_np, g = rand(xp, dtype, rng, 2, 3, 5)
    assert_close(mc.to_grad_rows(spec, g, reduce=True), g_np.sum(axis=1), **tol(xp, dtype))
    with pytest.raises(ValueError, match=r"input feature size: expected 4, got 3.*\[2, 3, 3\]"):
        mc.to_rows(spec, x[..., :3])

    xc_np, xc = rand(xp, dtype, rng, 2, 3, 5, 5)
    cs = mc.ConvSpec(kernel_size=3, stride=2, padding=((1, 0), (0, 1)), dilation=1)
    cspec = mc.LayerSpec(mc.LayerKind.CONV2D, d_in=27, d_out=4, has_bias=False, conv=cs)
    want, _ = im2col_loops(xc_np, (3, 3), (2, 2), ((1, 0), (0, 1)), (1, 1))
    assert_close(mc.to_rows(cspec, xc), want, rtol=0, atol=0)
    gc_np, gc = rand(xp, dtype, rng, 2, 4, 2, 2)
    assert_close(mc.to_grad_rows(cspec, gc), gc_np.transpose(0, 2, 3, 1).reshape(-1, 4), rtol=0, atol=0)
    dspec = mc.LayerSpec(mc.LayerKind.CONV2D, d_in=9, d_out=3, has_bias=True,
                         conv=mc.ConvSpec(kernel_size=3, padding="same", groups=3))
    assert mc.to_rows(dspec, xc).shape == (2 * 3 * 25, 10)
    bad = mc.LayerSpec(mc.LayerKind.CONV2D, d_in=10, d_out=4, has_bias=False, conv=cs)
    with pytest.raises(ValueError, match="patch size: expected 10, got 27"):
        mc.to_rows(bad, xc)


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_jit_equals_eager(dt):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    dtype = getattr(jnp, dt)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 3, 6, 5)), dtype=dtype)
    kw = dict(stride=(2, 1), padding=((1, 0), (2, 1)), dilation=(1, 2), bias=True)

    def f(x):
        return (mc.conv2d_rows(x, (2, 3), **kw), mc.conv2d_mean_patch(x, (2, 3), **kw),
                mc.conv2d_rows(x, 3, padding="same", bias=True, groups=3, reduce=True),
                mc.linear_rows(x, bias=True, reduce=True), mc.conv2d_grad_rows(x, reduce=True))

    for e, j in zip(f(x), jax.jit(f)(x)):
        assert j.dtype == e.dtype and j.shape == e.shape
        assert_close(j, to_numpy(e), **tol(jnp, dtype))


@pytest.mark.parametrize("hw", [(2, 5), (5, 2)], ids=["short", "narrow"])
def test_conv_input_too_small_in_one_dimension(xp, hw):
    """An input that a 3×3 kernel fits along one spatial axis only has no output positions: refused,
    not turned into an empty or wrongly shaped row matrix."""
    x = xp.ones((1, 2, *hw), dtype=xp.float64)
    for f in (lambda: mc.conv2d_rows(x, 3, bias=False), lambda: mc.conv2d_mean_patch(x, 3, bias=True)):
        with pytest.raises(ValueError, match="is smaller than the dilated kernel"):
            f()
    rows = mc.conv2d_rows(x, (2, 2), bias=False)  # a kernel that fits: (h−1)(w−1) positions
    assert tuple(rows.shape) == ((hw[0] - 1) * (hw[1] - 1), 8)


def test_feature_rows_refuse_empty_inputs(xp):
    """No features, or nothing to pool over with reduce=True: a ValueError naming the argument and
    its shape."""
    cases = [
        (lambda: mc.linear_rows(xp.ones((2, 0)), bias=False), r"'x' of shape \[2, 0\] has no features"),
        (lambda: mc.grad_rows(xp.ones((3, 0))), r"'g' of shape \[3, 0\] has no output features"),
        (lambda: mc.linear_rows(xp.ones((2, 0, 3)), bias=True, reduce=True),
         r"'x' of shape \[2, 0, 3\] is empty \(reduce=True\)"),
        (lambda: mc.grad_rows(xp.ones((0, 2, 3)), reduce=True), r"'g' of shape \[0, 2, 3\] is empty"),
    ]
    for f, msg in cases:
        with pytest.raises(ValueError, match=msg):
            f()


def test_qkv_spec_grouped_query_heads():
    """num_kv_heads (grouped-query attention, layout 'v') must be a positive divisor of num_heads;
    1 (multi-query) and num_heads itself are valid."""
    for kv in (1, 2, 4):
        spec = mc.QkvSpec(num_heads=4, num_kv_heads=kv, layout="v")
        assert spec.num_kv_heads == kv
    for kv in (0, -1, -2, 3, 8, True, 2.0):
        with pytest.raises(ValueError, match="num_kv_heads must be a positive divisor of num_heads=4"):
            mc.QkvSpec(num_heads=4, num_kv_heads=kv, layout="v")


def test_conv_geometry_cache_keeps_every_check():
    """The checked conv geometry is remembered per spatial shape and arguments; a cached call
    never lets through what the checks refuse (True for 1, a smaller input) and gives the same
    means as a fresh computation."""
    import numpy as np

    from maccore import rows

    x = np.arange(2 * 3 * 5 * 5, dtype=np.float64).reshape(2, 3, 5, 5)
    kw = dict(stride=(2, 1), padding=((1, 0), (2, 1)), dilation=(1, 2), bias=True)
    first = mc.conv2d_mean_patch(x, (2, 3), **kw)
    rows._GEOMETRY.clear()
    np.testing.assert_array_equal(mc.conv2d_mean_patch(x, (2, 3), **kw), first)
    np.testing.assert_allclose(first[:-1], mc.conv2d_rows(x, (2, 3), **kw).mean(axis=0)[:-1],
                               rtol=1e-13)
    mc.conv2d_mean_patch(x, (3, 1), bias=False)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        mc.conv2d_mean_patch(x, (3, True), bias=False)
    with pytest.raises(ValueError, match="is smaller than the dilated kernel"):
        mc.conv2d_mean_patch(np.ones((2, 3, 2, 2)), (3, 1), bias=False)
