"""maccore.testing.convert: other libraries' layouts and scalings → maccore's.

Each helper is checked against matrices hand-built in the other convention (always), and against
curvlinops and BackPACK themselves where they are installed (skipped otherwise)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

from maccore import testing
from maccore.testing import convert


def _sum_outer(vs):
    return sum(np.outer(v, v) for v in vs)


def _params(rng, d_out, d_in, k=3):
    """k random (W, b) pairs: the same vectors in several layouts."""
    return [(rng.standard_normal((d_out, d_in)), rng.standard_normal(d_out)) for _ in range(k)]


def test_parameter_order_hand_built():
    rng = np.random.default_rng(0)
    pairs = _params(rng, 3, 4)
    ours = _sum_outer([np.concatenate([W, b[:, None]], axis=1).reshape(-1) for W, b in pairs])
    torch_order = _sum_outer([np.concatenate([W.reshape(-1), b]) for W, b in pairs])
    flax_order = _sum_outer([np.concatenate([W.T.reshape(-1), b]) for W, b in pairs])
    testing.assert_curvature_close(convert.from_parameter_layout(torch_order, (3, 4)), ours, dtype="float64")
    testing.assert_curvature_close(
        convert.from_parameter_layout(flax_order, (3, 4), weight_order="column"), ours, dtype="float64")
    back = convert.to_parameter_layout(ours, (3, 4))
    testing.assert_curvature_close(back, torch_order, dtype="float64")
    # no bias; conv weight shapes flatten their trailing dims
    Ws = [rng.standard_normal((2, 3, 2, 2)) for _ in range(2)]
    ours = _sum_outer([W.reshape(2, -1).reshape(-1) for W in Ws])
    theirs = _sum_outer([W.reshape(-1) for W in Ws])
    testing.assert_curvature_close(convert.from_parameter_layout(theirs, (2, 3, 2, 2), bias=False), ours,
                                   dtype="float64")
    # a vector (a gradient) converts too; 1728 of 1764 entries differ before reordering (6×7 block)
    W, b = rng.standard_normal((6, 6)), rng.standard_normal(6)
    vt, vo = np.concatenate([W.reshape(-1), b]), np.concatenate([W, b[:, None]], 1).reshape(-1)
    assert np.array_equal(convert.from_parameter_layout(vt, (6, 6)), vo)
    assert (np.outer(vt, vt) != np.outer(vo, vo)).sum() > 1500
    with pytest.raises(ValueError, match="expected a vector"):
        convert.from_parameter_layout(np.ones((3, 3)), (3, 4))


def test_column_major_hand_built():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((4, 4))
    A = A @ A.T
    G = rng.standard_normal((3, 3))
    G = G @ G.T
    # A ⊗ G acts on vec_c(W̃): (A ⊗ G) vec_c(X) = vec_c(G X A) — check with an explicit X
    X = rng.standard_normal((3, 4))
    assert np.allclose(np.kron(A, G) @ X.reshape(-1, order="F"), (G @ X @ A).reshape(-1, order="F"))
    got = convert.from_column_major(np.kron(A, G), 3, 4)
    testing.assert_curvature_close(got, np.kron(G, A), dtype="float64")
    K = testing.commutation_matrix(3, 4)
    testing.assert_curvature_close(got, K @ np.kron(A, G) @ K.T, dtype="float64")
    testing.assert_curvature_close(convert.to_column_major(got, 3, 4), np.kron(A, G), dtype="float64")


def test_curvlinops_scaling_hand_built():
    rng = np.random.default_rng(2)
    pairs = _params(rng, 2, 3)
    ours = _sum_outer([np.concatenate([W, b[:, None]], 1).reshape(-1) for W, b in pairs])
    theirs = _sum_outer([np.concatenate([W.reshape(-1), b]) for W, b in pairs])
    got = convert.from_curvlinops(2 * theirs, (2, 3), fisher_type="empirical", loss="mse")
    testing.assert_curvature_close(got, ours, dtype="float64")
    for ft, loss in (("type-2", "mse"), ("empirical", "ce"), ("mc", "mse")):
        testing.assert_curvature_close(convert.from_curvlinops(theirs, (2, 3), fisher_type=ft, loss=loss),
                                       ours, dtype="float64")
    A, G = convert.from_curvlinops_kfac(np.eye(4), 2 * np.eye(2), fisher_type="empirical", loss="mse")
    assert np.array_equal(G, np.eye(2)) and np.array_equal(A, np.eye(4))
    with pytest.raises(ValueError, match="fisher_type"):
        convert.from_curvlinops(theirs, (2, 3), fisher_type="ggn")


def test_backpack_and_kfac_jax_hand_built():
    rng = np.random.default_rng(3)
    P = 9
    rows = rng.standard_normal((2, P, 5))  # [N, P, C·k·k] patches of one conv
    A_exp = rows.reshape(-1, 5).T @ rows.reshape(-1, 5) / (2 * P)
    g = rng.standard_normal((2, P, 3))
    G_red = g.sum(1).T @ g.sum(1)
    A_bp = sum(r.T @ r for r in rows) / 2  # Σ_p, mean over the batch
    A, G = convert.from_backpack_kfac([G_red, A_bp], output_locations=P)
    testing.assert_curvature_close((A, G), (A_exp, G_red), dtype="float64")
    with pytest.raises(ValueError, match="two factors"):
        convert.from_backpack_kfac([G_red])
    # kfac-jax: Flax kernel order, empirical Fisher ÷ N once more
    pairs = _params(rng, 2, 3)
    ours = _sum_outer([np.concatenate([W, b[:, None]], 1).reshape(-1) for W, b in pairs])
    theirs = _sum_outer([np.concatenate([W.T.reshape(-1), b]) for W, b in pairs])
    testing.assert_curvature_close(convert.from_kfac_jax(theirs, (3, 2)), ours, dtype="float64")
    testing.assert_curvature_close(
        convert.from_kfac_jax(theirs / 8, (3, 2), estimator="empirical", batch_size=8), ours, dtype="float64")
    with pytest.raises(ValueError, match="batch_size"):
        convert.from_kfac_jax(theirs, (3, 2), estimator="empirical")


# ------------------------------------------------------------------------------------------------
# against the libraries (optional)
# ------------------------------------------------------------------------------------------------


def _torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("maccore_torch")
    return torch


def _mlp(torch):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    return model, x


def _dense(op, n):
    import torch

    return (op @ torch.eye(n, dtype=torch.float64)).detach().numpy()


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_against_curvlinops_mlp(loss_name):
    torch = _torch()
    curvlinops = pytest.importorskip("curvlinops")
    from torch import nn

    from maccore_torch.testing import curvature_blocks

    model, x = _mlp(torch)
    if loss_name == "mse":
        loss, y = nn.MSELoss(), torch.randn(6, 3, dtype=torch.float64)
    else:
        loss, y = nn.CrossEntropyLoss(), torch.tensor([0, 1, 2, 0, 1, 2])
    layer = model[2]
    params = [layer.weight, layer.bias]
    n = 3 * 6
    data = [(x, y)]
    kw = {"check_deterministic": False}
    ggn = _dense(curvlinops.GGNLinearOperator(model, loss, params, data, **kw), n)
    ef = _dense(curvlinops.EFLinearOperator(model, loss, params, data, **kw), n)
    hess = _dense(curvlinops.HessianLinearOperator(model, loss, params, data, **kw), n)
    kfac = _dense(curvlinops.KFACLinearOperator(model, loss, params, data, fisher_type="type-2",
                                                separate_weight_and_bias=False, **kw), n)
    ours = {k: curvature_blocks(model, loss, x, y, kind=k, layers=["2"])["2"] for k in ("ggn", "ef", "hessian")}
    A, G = curvature_blocks(model, loss, x, y, kind="kfac-expand", layers=["2"])["2"]
    shape = tuple(layer.weight.shape)
    testing.assert_curvature_close(convert.from_curvlinops(ggn, shape), ours["ggn"], dtype="float64")
    testing.assert_curvature_close(convert.from_curvlinops(hess, shape), ours["hessian"], dtype="float64")
    testing.assert_curvature_close(
        convert.from_curvlinops(ef, shape, fisher_type="empirical", loss=loss_name), ours["ef"], dtype="float64")
    testing.assert_curvature_close(convert.from_curvlinops(kfac, shape), np.kron(G, A), dtype="float64")
    if loss_name == "mse":  # the factor 2 is real: without the conversion it fails
        with pytest.raises(AssertionError, match="pure scale error"):
            testing.assert_curvature_close(convert.from_parameter_layout(ef, shape), ours["ef"], dtype="float64")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_against_curvlinops_conv_kfac(approx):
    torch = _torch()
    curvlinops = pytest.importorskip("curvlinops")
    from torch import nn

    from maccore_torch.testing import curvature_blocks

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 3 * 3, 4)).double()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    loss = nn.CrossEntropyLoss()
    conv = model[0]
    op = curvlinops.KFACLinearOperator(model, loss, [conv.weight, conv.bias], [(x, y)], fisher_type="type-2",
                                       kfac_approx=approx, separate_weight_and_bias=False,
                                       check_deterministic=False)
    theirs = convert.from_curvlinops(_dense(op, 3 * 19), tuple(conv.weight.shape))
    A, G = curvature_blocks(model, loss, x, y, kind=f"kfac-{approx}", layers=["0"])["0"]
    testing.assert_curvature_close(theirs, np.kron(G, A), dtype="float64")


def test_against_backpack_conv_kflr():
    torch = _torch()
    pytest.importorskip("backpack")
    from backpack import backpack, extend
    from backpack.extensions import KFLR
    from torch import nn

    from maccore_torch.testing import curvature_blocks

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2)).double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (3,))
    expand = curvature_blocks(model, nn.CrossEntropyLoss(), x, y, kind="kfac-expand")
    reduce = curvature_blocks(model, nn.CrossEntropyLoss(), x, y, kind="kfac-reduce")
    ext = extend(copy.deepcopy(model))
    loss = extend(nn.CrossEntropyLoss())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with backpack(KFLR()):
            loss(ext(x), y).backward()
    A, G = convert.from_backpack_kfac(ext[0].weight.kflr, output_locations=16)
    testing.assert_curvature_close(A, expand["0"][0][:-1, :-1], dtype="float64")
    testing.assert_curvature_close(G, reduce["0"][1], dtype="float64")
    A, G = convert.from_backpack_kfac(ext[3].weight.kflr)  # Linear: maccore's factors
    testing.assert_curvature_close((A, G), (expand["3"][0][:-1, :-1], expand["3"][1]), dtype="float64")
