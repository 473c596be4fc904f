"""KFAC exactness propositions P-K1 … P-K13 (the cases of ``docs/verify.md``) and the MAC corollary.

The exact GGN / empirical-Fisher blocks come from the float64 NumPy oracles of
:mod:`maccore.testing`; the library builds rows, factors, Kronecker products and damped inverses on
each backend from the same data and is compared with eps-derived tolerances. Negative controls
assert a relative error far above those tolerances.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import maccore as mc
from maccore import testing
from maccore.testing import MLPCase, backprop_grads, ef_block, ggn_block, mlp_io, reduction_factor
from tests.conftest import asarray, assert_close, to_numpy, tol
from tests.core.helpers import kron_inv_apply, rand, rel_err, seeds, xgiven

NEG = 0.05  # a negative control must miss the oracle by at least 5 % (tolerances are ≤ 0.6 %)

# ---------------------------------------------------------------------------------------------
# case construction and the library side


def make_case(rng, *, n, s, dims, bias, loss="mse", reduction="sum", activation="identity",
              setting="expand", pool="mean", pool_after=None, x=None, wscale=1.0):
    """A random token-wise MLP case with layer widths ``dims = [D, h1, ..., C]``."""
    L = len(dims) - 1
    weights = [wscale * rng.standard_normal((dims[i + 1], dims[i])) / np.sqrt(dims[i]) for i in range(L)]
    if isinstance(bias, bool):
        bias = [bias] * L
    biases = [rng.standard_normal(dims[i + 1]) if bias[i] else None for i in range(L)]
    if x is None:
        x = rng.standard_normal((n, s, dims[0]))
    c = dims[-1]
    t = s if setting == "expand" else 1
    if loss == "mse":
        y = rng.standard_normal((n, t, c))
    elif loss == "ce":
        y = np.eye(c)[rng.integers(0, c, size=(n, t))]
    else:
        y = (rng.random((n, t, c)) < 0.5).astype(np.float64)
    return MLPCase(weights, biases, x, y, loss=loss, reduction=reduction, activation=activation,
                   setting=setting, pool=pool, pool_after=pool_after)


def lib_factors(xp, dtype, case, layer, *, kind="expand", fisher="type2", x_shape=None, R=None):
    """(A, G) built by maccore on backend ``xp`` from the case's layer inputs and backpropagated
    gradients (autograd form). ``x_shape`` reshapes the layer input (extra shared axes)."""
    inputs, _, _ = mlp_io(case)
    x = inputs[layer]  # [N, S_l, d]
    g = backprop_grads(case, layer, fisher=fisher)  # [K, N, S_l, d_out]
    k, n = g.shape[0], g.shape[1]
    if x_shape is not None:
        x = x.reshape((n,) + tuple(x_shape) + (x.shape[-1],))
        g = g.reshape((k * n,) + tuple(x_shape) + (g.shape[-1],))
    else:
        g = g.reshape((k * n,) + g.shape[2:])
    reduce = kind == "reduce"
    rows = mc.linear_rows(asarray(xp, x, dtype), bias=case.biases[layer] is not None, reduce=reduce)
    grows = mc.grad_rows(asarray(xp, g, dtype), reduce=reduce)
    R = reduction_factor(case) if R is None else R
    return mc.input_factor(rows), mc.gradient_factor(grows, reduction_factor=R)


def lib_kfac(xp, dtype, case, layer, **kw):
    A, G = lib_factors(xp, dtype, case, layer, **kw)
    return mc.kfac_dense(A, G)


def assert_exact(xp, dtype, kfac, oracle, what=""):
    assert_close(kfac, oracle, **tol(xp, dtype, 4), err_msg=what)


def assert_not_exact(kfac, oracle, what=""):
    err = rel_err(kfac, oracle)
    assert err > NEG, f"negative control {what}: KFAC matches the oracle (relative error {err:.2e})"


losses = st.sampled_from(["mse", "ce", "bce"])
reductions = st.sampled_from(["sum", "mean"])
acts = st.sampled_from(["tanh", "sigmoid", "relu"])
widths = st.integers(1, 3)

# ---------------------------------------------------------------------------------------------
# P-K1 single datum


@xgiven(seed=seeds, depth=st.integers(1, 3), w=widths, c=st.integers(2, 3), bias=st.booleans(),
        loss=losses, reduction=reductions, act=acts, copies=st.integers(1, 3))
def test_pk1_single_datum(xp, dtype, seed, depth, w, c, bias, loss, reduction, act, copies):
    """Type-II KFAC = GGN and EF-KFAC = EF for every layer when the data set is one datum (or N
    identical copies), any activation, MSE/CE/BCE, sum/mean."""
    rng = np.random.default_rng(seed)
    dims = [w + 1] + [w + 1] * (depth - 1) + [c]
    x = np.broadcast_to(rng.standard_normal((1, 1, dims[0])), (copies, 1, dims[0])).copy()
    case = make_case(rng, n=copies, s=1, dims=dims, bias=bias, loss=loss, reduction=reduction,
                     activation=act, x=x)
    case.y = np.broadcast_to(case.y[:1], case.y.shape).copy()  # identical copies of one datum
    for layer in range(depth):
        assert_exact(xp, dtype, lib_kfac(xp, dtype, case, layer), ggn_block(case, layer), f"GGN layer {layer}")
        assert_exact(xp, dtype, lib_kfac(xp, dtype, case, layer, fisher="empirical"), ef_block(case, layer),
                     f"EF layer {layer}")


# ---------------------------------------------------------------------------------------------
# P-K2 deep linear regression


@xgiven(seed=seeds, depth=st.integers(1, 3), w=widths, c=st.integers(1, 3), n=st.integers(2, 5),
        bias=st.booleans(), reduction=reductions)
def test_pk2_deep_linear(xp, dtype, seed, depth, w, c, n, bias, reduction):
    """Deep linear net, MSE, any N: type-II KFAC = GGN for every layer; EF-KFAC ≠ EF (negative
    control: Δ = f_n − y_n depends on n)."""
    rng = np.random.default_rng(seed)
    dims = [w + 1] + [w + 2] * (depth - 1) + [c]
    case = make_case(rng, n=n, s=1, dims=dims, bias=bias, reduction=reduction)
    for layer in range(depth):
        assert_exact(xp, dtype, lib_kfac(xp, dtype, case, layer), ggn_block(case, layer), f"layer {layer}")
    # negative control: the residual Δ_n = f_n − y_n is non-zero for datum 0 only and datum 0's
    # input differs from the others (zero inputs), so EF = datum 0's term while EF-KFAC pairs it
    # with the mean input factor (relative error ≥ (N−1)/N · 0.98 by construction)
    x = np.zeros((n, 1, dims[0]))
    x[0, 0, 0] = 2.0
    ef_case = make_case(rng, n=n, s=1, dims=dims, bias=bias, reduction=reduction, x=x)
    ef_case.weights, ef_case.biases = case.weights, case.biases
    r = np.zeros((n, 1, c))
    r[0, 0] = 5.0 * np.ones(c) / np.sqrt(c)
    ef_case.y = mlp_io(ef_case)[2] - r
    assert_not_exact(lib_kfac(xp, dtype, ef_case, 0, fisher="empirical"), ef_block(ef_case, 0), "EF with N > 1")


@xgiven(seed=seeds, depth=st.integers(1, 2), bias=st.booleans(), reduction=reductions,
        sizes=st.sampled_from([(2, 5), (1, 4), (3, 1, 2)]))
def test_pk2_unequal_minibatches(xp, dtype, seed, depth, bias, reduction, sizes):
    """Mini-batches of unequal sizes with global normalisation (A weighted by row counts, G summed
    with the global R) reproduce the full-batch GGN; an unweighted mean of per-batch A does not."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    # the first batch's inputs dominate (×4 vs ×½): the weighted and the unweighted mean of the
    # per-batch input factors then weigh it n_0/N vs 1/#batches
    scale = np.concatenate([np.full(b, 4.0 if i == 0 else 0.5) for i, b in enumerate(sizes)])
    x = rng.standard_normal((n, 1, 3)) * scale[:, None, None]
    case = make_case(rng, n=n, s=1, dims=[3] + [3] * (depth - 1) + [2], bias=bias, reduction=reduction, x=x)
    inputs, _, _ = mlp_io(case)
    layer = 0
    x = inputs[layer][:, 0]
    g = backprop_grads(case, layer)[:, :, 0]  # [K, N, d_out], global R
    R = reduction_factor(case)
    A_w = A_u = G = 0
    start = 0
    for b in sizes:
        xb = asarray(xp, x[start : start + b], dtype)
        gb = asarray(xp, g[:, start : start + b].reshape(-1, g.shape[-1]), dtype)
        Ab = mc.input_factor(mc.linear_rows(xb, bias=bias))
        A_w = A_w + (b / n) * Ab
        A_u = A_u + Ab / len(sizes)
        G = G + mc.gradient_factor(gb, reduction_factor=R)
        start += b
    oracle = ggn_block(case, layer)
    assert_exact(xp, dtype, mc.kfac_dense(A_w, G), oracle)
    assert_not_exact(mc.kfac_dense(A_u, G), oracle, "unweighted mean of per-batch input factors")


# ---------------------------------------------------------------------------------------------
# P-K3 expand with weight sharing (several shared axes, conv variant)


@xgiven(seed=seeds, depth=st.integers(1, 3), n=st.integers(1, 3),
        shared=st.sampled_from([(3,), (2, 2), (2, 1, 3)]), bias=st.booleans(), reduction=reductions)
def test_pk3_expand(xp, dtype, seed, depth, n, shared, bias, reduction):
    rng = np.random.default_rng(seed)
    s = int(np.prod(shared))
    case = make_case(rng, n=n, s=s, dims=[3] + [2] * (depth - 1) + [2], bias=bias, reduction=reduction)
    for layer in range(depth):
        kf = lib_kfac(xp, dtype, case, layer, x_shape=shared)
        assert_exact(xp, dtype, kf, ggn_block(case, layer), f"layer {layer}, shared axes {shared}")


def _conv_setup(rng, xp, dtype, *, n, c_in, hw, k, stride, padding, c_mid, c_out, bias, reduction,
                setting):
    """Conv2d (as a linear layer on the independent loop im2col patches) → Linear, as an MLPCase."""
    from tests.core.test_rows import im2col_loops

    x_img = rng.standard_normal((n, c_in) + hw)
    patches, (oh, ow) = im2col_loops(x_img, k, stride, padding, (1, 1))
    p = oh * ow
    case = make_case(rng, n=n, s=p, dims=[patches.shape[1], c_mid, c_out], bias=bias, reduction=reduction,
                     setting=setting, pool="mean", pool_after=0 if setting == "reduce" else None,
                     x=patches.reshape(n, p, -1))
    return case, x_img, (oh, ow)


@xgiven(2, seed=seeds, n=st.integers(1, 2), c_in=st.integers(1, 2), k=st.sampled_from([(1, 1), (2, 2), (3, 2)]),
        padding=st.sampled_from([1, "same", ((1, 0), (0, 1))]), bias=st.booleans(), reduction=reductions)
def test_pk3_conv_expand(xp, dtype, seed, n, c_in, k, padding, bias, reduction):
    """Conv2d with spatial outputs → per-location Linear, per-location MSE: KFAC-expand is exact for
    both layers; the conv rows/gradient rows come from conv2d_rows / conv2d_grad_rows."""
    rng = np.random.default_rng(seed)
    case, x_img, (oh, ow) = _conv_setup(rng, xp, dtype, n=n, c_in=c_in, hw=(3, 4), k=k, stride=(1, 1),
                                        padding=padding, c_mid=2, c_out=2, bias=bias, reduction=reduction,
                                        setting="expand")
    R = reduction_factor(case)
    rows = mc.conv2d_rows(asarray(xp, x_img, dtype), k, padding=padding, bias=bias)
    g = backprop_grads(case, 0)  # [K, N, P, C_mid]
    g_img = g.reshape(-1, oh, ow, g.shape[-1]).transpose(0, 3, 1, 2)  # [K·N, C_mid, OH, OW]
    grows = mc.conv2d_grad_rows(asarray(xp, g_img, dtype))
    kf = mc.kfac_dense(mc.input_factor(rows), mc.gradient_factor(grows, reduction_factor=R))
    assert_exact(xp, dtype, kf, ggn_block(case, 0), "conv layer")
    assert_exact(xp, dtype, lib_kfac(xp, dtype, case, 1), ggn_block(case, 1), "linear layer")


# ---------------------------------------------------------------------------------------------
# P-K4 reduce


@xgiven(seed=seeds, depth=st.integers(1, 3), n=st.integers(1, 3), s=st.integers(2, 4), bias=st.booleans(),
        reduction=reductions, pool=st.sampled_from(["sum", "mean"]))
def test_pk4_reduce(xp, dtype, seed, depth, n, s, bias, reduction, pool):
    """Token-wise deep linear net, sum/mean pooling, MSE: KFAC-reduce = GGN for every layer;
    KFAC-expand ≠ GGN (negative control)."""
    rng = np.random.default_rng(seed)
    case = make_case(rng, n=n, s=s, dims=[3] + [3] * (depth - 1) + [2], bias=bias, reduction=reduction,
                     setting="reduce", pool=pool)
    for layer in range(depth):
        oracle = ggn_block(case, layer)
        assert_exact(xp, dtype, lib_kfac(xp, dtype, case, layer, kind="reduce"), oracle, f"layer {layer}")
    assert_not_exact(lib_kfac(xp, dtype, case, 0, kind="expand"), ggn_block(case, 0), "expand in reduce setting")


@xgiven(2, seed=seeds, n=st.integers(1, 3), c_in=st.integers(1, 2), k=st.sampled_from([(2, 2), (3, 3)]),
        stride=st.sampled_from([(1, 1), (2, 1)]), bias=st.booleans(), reduction=reductions)
def test_pk4_conv_reduce(xp, dtype, seed, n, c_in, k, stride, bias, reduction):
    """Conv2d → global average pool → Linear, MSE: KFAC-reduce (conv2d_rows(reduce=True),
    conv2d_grad_rows(reduce=True)) is exact for both layers."""
    rng = np.random.default_rng(seed)
    case, x_img, (oh, ow) = _conv_setup(rng, xp, dtype, n=n, c_in=c_in, hw=(4, 4), k=k, stride=stride,
                                        padding=1, c_mid=2, c_out=2, bias=bias, reduction=reduction,
                                        setting="reduce")
    R = reduction_factor(case)
    rows = mc.conv2d_rows(asarray(xp, x_img, dtype), k, stride=stride, padding=1, bias=bias, reduce=True)
    g = backprop_grads(case, 0)
    g_img = g.reshape(-1, oh, ow, g.shape[-1]).transpose(0, 3, 1, 2)
    grows = mc.conv2d_grad_rows(asarray(xp, g_img, dtype), reduce=True)
    kf = mc.kfac_dense(mc.input_factor(rows), mc.gradient_factor(grows, reduction_factor=R))
    assert_exact(xp, dtype, kf, ggn_block(case, 0), "conv layer")
    assert_exact(xp, dtype, lib_kfac(xp, dtype, case, 1, kind="reduce"), ggn_block(case, 1), "linear layer")
    # the mean patch (no materialised patches) is the reduce rows' mean
    mean = mc.conv2d_mean_patch(asarray(xp, x_img, dtype), k, stride=stride, padding=1, bias=bias)
    assert_close(mean, to_numpy(rows).mean(axis=0), **tol(xp, dtype))


# ---------------------------------------------------------------------------------------------
# P-K5 intermediate reduction


@xgiven(seed=seeds, n=st.integers(1, 3), bias=st.booleans(), reduction=reductions,
        pool=st.sampled_from(["sum", "mean"]))
def test_pk5_intermediate_reduction(xp, dtype, seed, n, bias, reduction, pool):
    """L = 4, x [N, 5, 7], pooling after layer 2: (a) KFAC-reduce = GGN for all layers; (b) after the
    pool expand ≡ reduce; (c) before it the gradient rows are identical across s, G_red = S·G_exp,
    and KFAC-expand ≠ GGN."""
    rng = np.random.default_rng(seed)
    S = 5
    case = make_case(rng, n=n, s=S, dims=[7, 3, 3, 3, 2], bias=bias, reduction=reduction, setting="reduce",
                     pool=pool, pool_after=1)
    t = tol(xp, dtype, 4)
    for layer in range(4):
        oracle = ggn_block(case, layer)
        A_r, G_r = lib_factors(xp, dtype, case, layer, kind="reduce")
        assert_exact(xp, dtype, mc.kfac_dense(A_r, G_r), oracle, f"(a) layer {layer}")
        A_e, G_e = lib_factors(xp, dtype, case, layer, kind="expand")
        if layer >= 2:  # (b)
            assert_close(A_e, to_numpy(A_r), **t)
            assert_close(G_e, to_numpy(G_r), **t)
        else:  # (c)
            g = backprop_grads(case, layer)
            assert np.allclose(g, g[:, :, :1], rtol=1e-12, atol=1e-14)
            assert_close(G_r, S * to_numpy(G_e), **t)
            assert_not_exact(mc.kfac_dense(A_e, G_e), oracle, f"expand before the pool, layer {layer}")


def test_intermediate_pool_oracle_against_autograd():
    """The oracle's intermediate pooling (added for P-K5) against torch autograd with a tanh net."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for pool in ("sum", "mean"):
        case = make_case(rng, n=2, s=3, dims=[3, 2, 2, 2], bias=[True, False, True], loss="ce",
                         reduction="mean", activation="tanh", setting="reduce", pool=pool, pool_after=0)
        R = reduction_factor(case)
        for layer in range(3):
            W = [torch.tensor(w) for w in case.weights]
            b = [None if v is None else torch.tensor(v) for v in case.biases]
            wt = torch.cat([W[layer], b[layer][:, None]], 1) if b[layer] is not None else W[layer]

            def f(theta, n_):
                Wl = list(W)
                bl = list(b)
                m = theta.reshape(wt.shape)
                Wl[layer] = m[:, : W[layer].shape[1]]
                if b[layer] is not None:
                    bl[layer] = m[:, -1]
                h = torch.tensor(case.x[n_])
                for i in range(3):
                    z = h @ Wl[i].T + (0 if bl[i] is None else bl[i])
                    if i < 2:
                        h = torch.tanh(z)
                        if i == 0:
                            h = h.sum(0, keepdim=True) if pool == "sum" else h.mean(0, keepdim=True)
                    else:
                        h = z
                return h[0]

            theta = wt.reshape(-1)
            ggn = 0
            for n_ in range(2):
                J = torch.autograd.functional.jacobian(lambda t: f(t, n_), theta).numpy()
                sm = torch.softmax(f(theta, n_), 0).numpy()
                H = np.diag(sm) - np.outer(sm, sm)
                ggn = ggn + R * J.T @ H @ J
            testing.assert_close(ggn_block(case, layer), ggn, rtol=1e-10, atol=1e-12, what=f"{pool} {layer}")


# ---------------------------------------------------------------------------------------------
# P-K6 forward-only (G = I) and P-K7 MAC corollary


@xgiven(seed=seeds, n=st.integers(1, 3), s=st.integers(1, 3), d=st.integers(1, 3), c=st.integers(1, 3),
        bias=st.booleans(), reduction=reductions, setting=st.sampled_from(["expand", "reduce"]))
def test_pk6_forward_only(xp, dtype, seed, n, s, d, c, bias, reduction, setting):
    """Single Linear, MSE: GGN = 2NS·(I ⊗ A_exp) (sum) or (2/C)·(I ⊗ A_exp) (mean); reduce with
    mean pooling: 2N·(I ⊗ E_n[x̄x̄ᵀ]) (sum) or (2/C)·(…) (mean)."""
    rng = np.random.default_rng(seed)
    case = make_case(rng, n=n, s=s, dims=[d, c], bias=bias, reduction=reduction, setting=setting, pool="mean")
    rows = mc.linear_rows(asarray(xp, case.x, dtype), bias=bias, reduce=setting == "reduce")
    foof = mc.kfac_dense(mc.input_factor(rows), xp.eye(c, dtype=dtype))
    terms = n * s if setting == "expand" else n
    kappa = 2.0 * terms if reduction == "sum" else 2.0 / c
    assert_exact(xp, dtype, kappa * foof, ggn_block(case, 0))


@xgiven(seed=seeds, copies=st.integers(1, 3), s=st.integers(1, 2), d=st.integers(1, 3), c=st.integers(1, 3),
        bias=st.booleans(), reduction=reductions, lam=st.sampled_from([0.01, 0.3, 1.0, 4.0]))
def test_pk7_mac_exactness(xp, dtype, seed, copies, s, d, c, bias, reduction, lam):
    """All rows equal: MAC(∇W̃) = λ·vec⁻¹[(GGN/κ + λI)⁻¹ vec ∇W̃] (reference scale) and the inverse
    scale is that divided by λ."""
    rng = np.random.default_rng(seed)
    x = np.broadcast_to(rng.standard_normal(d), (copies, s, d)).copy()
    case = make_case(rng, n=copies, s=s, dims=[d, c], bias=bias, reduction=reduction, x=x)
    kappa = 2.0 * copies * s if reduction == "sum" else 2.0 / c
    ggn = ggn_block(case, 0)
    rows = mc.linear_rows(asarray(xp, x, dtype), bias=bias)
    abar = mc.mean_activation(rows)
    g_np, g = rand(xp, dtype, rng, c, d + bias)
    want = lam * kron_inv_apply(ggn / kappa + lam * np.eye(ggn.shape[0]), g_np)
    assert_close(mc.mac_apply(g, abar, lam), want, **tol(xp, dtype, 4))
    assert_close(mc.mac_apply(g, abar, lam, scale="inverse"), want / lam, **tol(xp, dtype, 4))


# ---------------------------------------------------------------------------------------------
# P-K8 loss-reduction scaling, P-K9 flattening, P-K10 multi-dimensional outputs


@xgiven(seed=seeds, n=st.integers(1, 3), s=st.integers(1, 3), c=st.integers(2, 3), loss=losses,
        fisher=st.sampled_from(["type2", "empirical"]))
def test_pk8_reduction_scaling(xp, dtype, seed, n, s, c, loss, fisher):
    """KFAC(mean) = KFAC(sum) with G divided by N·#terms per datum (×C for MSE/BCE); A unchanged."""
    rng = np.random.default_rng(seed)
    case_sum = make_case(rng, n=n, s=s, dims=[2, 3, c], bias=True, loss=loss, reduction="sum", activation="tanh")
    case_mean = MLPCase(case_sum.weights, case_sum.biases, case_sum.x, case_sum.y, loss=loss, reduction="mean",
                        activation="tanh")
    factor = n * s * (c if loss in ("mse", "bce") else 1)
    t = tol(xp, dtype, 4)
    for layer in range(2):
        A_s, G_s = lib_factors(xp, dtype, case_sum, layer, fisher=fisher)
        A_m, G_m = lib_factors(xp, dtype, case_mean, layer, fisher=fisher)
        assert_close(A_m, to_numpy(A_s), **t)
        assert_close(G_m, to_numpy(G_s) / factor, **t)
        oracle = (ggn_block if fisher == "type2" else ef_block)(case_mean, layer)
        assert_close(oracle, (ggn_block if fisher == "type2" else ef_block)(case_sum, layer) / factor,
                     rtol=1e-10, atol=1e-12)


def test_commutation_matrix():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 4))
    K = testing.commutation_matrix(3, 4)
    assert np.array_equal(K @ X.reshape(-1, order="F"), X.reshape(-1))
    assert np.array_equal(K @ K.T, np.eye(12))


@xgiven(seed=seeds, depth=st.integers(1, 2), n=st.integers(1, 3), bias=st.booleans(), reduction=reductions)
def test_pk9_row_vs_column_major(xp, dtype, seed, depth, n, bias, reduction):
    """K(A⊗G)Kᵀ = G⊗A, and the column-major GGN KᵀGGN_rK equals A⊗G in the exact case."""
    rng = np.random.default_rng(seed)
    case = make_case(rng, n=n, s=2, dims=[3] + [2] * depth, bias=bias, reduction=reduction)
    layer = depth - 1
    A, G = lib_factors(xp, dtype, case, layer)
    d_out, d_t = G.shape[0], A.shape[0]
    K = testing.commutation_matrix(d_out, d_t)
    row_major = to_numpy(mc.kfac_dense(A, G))  # G ⊗ A
    col_major = mc.kfac_dense(G, A)  # A ⊗ G
    t = tol(xp, dtype, 4)
    assert_close(K @ to_numpy(col_major) @ K.T, row_major, **t)
    ggn = ggn_block(case, layer)
    assert_exact(xp, dtype, col_major, K.T @ ggn @ K, "column-major")
    if d_out > 1 and d_t > 1:  # the conventions are not interchangeable
        assert rel_err(col_major, ggn) > NEG


@xgiven(seed=seeds, n=st.integers(1, 2), s1=st.integers(1, 3), s2=st.integers(1, 3), bias=st.booleans(),
        reduction=reductions)
def test_pk10_multidim_outputs(xp, dtype, seed, n, s1, s2, bias, reduction):
    """Outputs [N, S1, S2, C] with per-element loss: same KFAC as the flattened [N·S1·S2, C] model,
    and both equal the GGN."""
    rng = np.random.default_rng(seed)
    case = make_case(rng, n=n, s=s1 * s2, dims=[2, 3, 2], bias=bias, reduction=reduction)
    flat = MLPCase(case.weights, case.biases, case.x.reshape(n * s1 * s2, 1, -1),
                   case.y.reshape(n * s1 * s2, 1, -1), reduction=reduction)
    assert reduction_factor(flat) == reduction_factor(case)
    t = tol(xp, dtype, 4)
    for layer in range(2):
        oracle = ggn_block(case, layer)
        testing.assert_close(ggn_block(flat, layer), oracle, rtol=1e-10, atol=1e-12)
        multi = lib_kfac(xp, dtype, case, layer, x_shape=(s1, s2))
        assert_exact(xp, dtype, multi, oracle, f"layer {layer}")
        assert_close(lib_kfac(xp, dtype, flat, layer), to_numpy(multi), **t)


# ---------------------------------------------------------------------------------------------
# P-K11 damped inverses


@xgiven(seed=seeds, depth=st.integers(1, 2), n=st.integers(1, 3), bias=st.booleans(),
        lam=st.sampled_from([1e-2, 0.1, 1.0]), mode=st.sampled_from(["tikhonov", "pi", "exact"]))
def test_pk11_damped_inverses(xp, dtype, seed, depth, n, bias, lam, mode):
    """On exact-case factors: (a) (G+δI)⁻¹·(A+δI)⁻¹ = inv((G+δI)⊗(A+δI)); (b) π-damping with its
    dampings; (c) eigen-based exact damping = inv(GGN + δI) (the damped exact block itself)."""
    rng = np.random.default_rng(seed)
    case = make_case(rng, n=n, s=2, dims=[3] + [2] * depth, bias=bias)
    layer = 0
    A, G = lib_factors(xp, dtype, case, layer)
    A_np, G_np = to_numpy(A), to_numpy(G)
    d_out, d_t = G_np.shape[0], A_np.shape[0]
    g_np, g = rand(xp, dtype, rng, d_out, d_t)
    out = mc.kfac_apply(g, A, G, lam, mode=mode)
    if mode == "exact":
        M = ggn_block(case, layer) + lam * np.eye(d_out * d_t)
    else:
        la = lg = lam
        if mode == "pi":
            pi = np.sqrt((np.trace(A_np) / d_t) / (np.trace(G_np) / d_out))
            la, lg = pi * np.sqrt(lam), np.sqrt(lam) / pi
        M = np.kron(G_np + lg * np.eye(d_out), A_np + la * np.eye(d_t))
    assert_close(out, kron_inv_apply(M, g_np), **tol(xp, dtype, 8))


# ---------------------------------------------------------------------------------------------
# P-K12 weight tying, P-K13 one layer


@xgiven(seed=seeds, d=st.integers(2, 3), depth=st.integers(1, 2), bias=st.booleans(), reduction=reductions)
def test_pk12_weight_tying(xp, dtype, seed, d, depth, bias, reduction):
    """A layer applied to both halves of one datum (split → shared layer(s) → concat), N = 1: the
    rows of both uses in one KFAC update are exact; feeding each use as a separate batch (two
    updates of the stateful preconditioner) is not."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2, d))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)  # equally strong uses: neither one dominates
    case = make_case(rng, n=1, s=2, dims=[d] + [2] * depth, bias=bias, reduction=reduction, x=x)
    layer = 0
    oracle = ggn_block(case, layer)
    inputs, _, _ = mlp_io(case)
    x = inputs[layer][0]  # [2 uses, d]
    g = backprop_grads(case, layer)[:, 0]  # [K, 2 uses, d_out]
    R = reduction_factor(case)
    lam = 1e-3
    pc = mc.kfac(decay=0.5, damping=lam, mode="exact")
    d_t, d_out = d + bias, g.shape[-1]
    eye = np.eye(d_t * d_out)

    joint = pc.update(pc.init(d_t, d_out, xp=xp, dtype=dtype),
                      mc.linear_rows(asarray(xp, x, dtype), bias=bias),
                      asarray(xp, g.reshape(-1, d_out), dtype), reduction_factor=R)
    assert_exact(xp, dtype, to_numpy(pc.to_dense(joint)) - lam * eye, oracle, "both uses as rows")

    sep = pc.init(d_t, d_out, xp=xp, dtype=dtype)
    for use in range(2):
        sep = pc.update(sep, mc.linear_rows(asarray(xp, x[use : use + 1], dtype), bias=bias),
                        asarray(xp, g[:, use], dtype), reduction_factor=R)
    assert_not_exact(to_numpy(pc.to_dense(sep)) - lam * eye, oracle, "uses as separate batches")
    # a hook that sees only one use (T15) is not exact either
    one = mc.kfac_dense(*lib_factors_from(xp, dtype, x[:1], g[:, 0], bias, R))
    assert_not_exact(one, oracle, "one use only")


def lib_factors_from(xp, dtype, x, g, bias, R):
    rows = mc.linear_rows(asarray(xp, x, dtype), bias=bias)
    return mc.input_factor(rows), mc.gradient_factor(asarray(xp, g.reshape(-1, g.shape[-1]), dtype),
                                                     reduction_factor=R)


@xgiven(seed=seeds, n=st.integers(2, 6), d=st.integers(1, 3), c=st.integers(2, 3), bias=st.booleans(),
        reduction=reductions)
def test_pk13_one_layer(xp, dtype, seed, n, d, c, bias, reduction):
    """One linear layer: MSE is exact for any N; CE with N > 1 is not (negative control)."""
    rng = np.random.default_rng(seed)
    mse = make_case(rng, n=n, s=1, dims=[d, c], bias=bias, reduction=reduction)
    assert_exact(xp, dtype, lib_kfac(xp, dtype, mse, 0), ggn_block(mse, 0))
    # data alternating between x = e_0 with confident logits (small Hessian Λ) and x = 0 with flat
    # logits (large Λ): GGN − KFAC = ½ R Σ_pairs (Λ_1 − Λ_0) ⊗ (x̃_0x̃_0ᵀ − x̃_1x̃_1ᵀ) is large
    x = np.zeros((n, 1, d))
    x[::2, 0, 0] = 1.0
    ce = make_case(rng, n=n, s=1, dims=[d, c], bias=bias, loss="ce", reduction=reduction, x=x)
    ce.weights = [np.zeros((c, d))]
    ce.weights[0][0, 0] = 8.0
    ce.biases = [np.zeros(c) if bias else None]
    assert_not_exact(lib_kfac(xp, dtype, ce, 0), ggn_block(ce, 0), "CE with N > 1")


# ---------------------------------------------------------------------------------------------
# Monte-Carlo Fisher → GGN (P-K1, P-K2: lim_{M→∞} KFAC^{MC(M)} = GGN)


def _mc_grads(case, layer, m, rng):
    """Autograd-form MC gradients R·Dᵀ(f − ỹ)/√M with ỹ ~ r(y | f), ``[M·N·S, d_out]``."""
    inputs, jac, f = mlp_io(case)
    D = jac[layer]  # [N, S, C, d_out]
    R = reduction_factor(case)
    if case.loss == "mse":  # c = ½‖f − y‖²: ỹ ~ N(f, I)
        delta = rng.standard_normal((m,) + f.shape)
    elif case.loss == "ce":
        e = np.exp(f - f.max(-1, keepdims=True))
        p = e / e.sum(-1, keepdims=True)
        u = rng.random((m,) + f.shape[:-1] + (1,))
        labels = (u > np.cumsum(p, -1)).sum(-1)
        delta = p - np.eye(f.shape[-1])[np.minimum(labels, f.shape[-1] - 1)]
    else:
        s = 1 / (1 + np.exp(-f))
        delta = s - (rng.random((m,) + f.shape) < s)
    g = R * np.einsum("mnsc,nsco->mnso", delta, D) / np.sqrt(m)
    return g.reshape(-1, D.shape[-1])


@pytest.mark.parametrize("loss", ["mse", "ce", "bce"])
def test_pk1_pk2_monte_carlo(xp, dtype, loss):
    """MC-Fisher KFAC with M = 20,000 samples matches the GGN within the curvlinops MC tolerances
    (rtol 0.1, atol 1.5e-2 after normalising by max|GGN|): one datum through a tanh MLP, and a
    deep linear MSE regression with N = 3."""
    rng = np.random.default_rng(123)
    cases = [make_case(rng, n=1, s=1, dims=[3, 3, 3], bias=True, loss=loss, reduction="mean",
                       activation="tanh")]
    if loss == "mse":
        cases.append(make_case(rng, n=3, s=1, dims=[3, 2, 2], bias=True, reduction="sum"))
    for case in cases:
        for layer in range(len(case.weights)):
            inputs, _, _ = mlp_io(case)
            x = inputs[layer]
            rows = mc.linear_rows(asarray(xp, x, dtype), bias=True)
            grows = asarray(xp, _mc_grads(case, layer, 20_000, rng), dtype)
            kf = to_numpy(mc.kfac_dense(mc.input_factor(rows),
                                        mc.gradient_factor(grows, reduction_factor=reduction_factor(case))))
            ggn = ggn_block(case, layer)
            scale = np.abs(ggn).max()
            assert_close(kf / scale, ggn / scale, rtol=0.1, atol=1.5e-2)
            # and it is a Monte-Carlo estimate, not the exact value
            assert rel_err(kf, ggn) > 1e-4
