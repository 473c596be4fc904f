"""maccore_jax.testing.curvature_blocks equals the torch reference on the same network (MLP and
Conv → Flatten → Linear with an asymmetric conv geometry), for every kind; and the JAX-side
options (generic losses, non-linen apply functions) behave as documented."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
fnn = pytest.importorskip("flax.linen")
pytest.importorskip("maccore_torch")
pytest.importorskip("maccore_jax")

import jax.numpy as jnp  # noqa: E402
from torch import nn  # noqa: E402

from maccore import testing  # noqa: E402
from maccore_jax import testing as jt  # noqa: E402
from maccore_torch.testing import curvature_blocks as torch_blocks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KINDS = ["ggn", "ef", "mc", "hessian", "kfac-expand", "kfac-reduce", "mac"]


class JaxCNN(fnn.Module):
    @fnn.compact
    def __call__(self, x):  # NHWC
        x = fnn.Conv(3, (3, 3), strides=(2, 1), padding=((1, 1), (2, 2)), kernel_dilation=(1, 2), name="conv")(x)
        x = jnp.tanh(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch's Flatten order
        return fnn.Dense(3, name="fc")(x)


class JaxMLP(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        x = jnp.tanh(fnn.Dense(5, name="l0")(x))
        return fnn.Dense(3, use_bias=False, name="l1")(x)


def _np(t):
    return t.detach().double().numpy()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    tm = nn.Sequential(nn.Conv2d(2, 3, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2)), nn.Tanh(),
                       nn.Flatten(), nn.Linear(3 * 3 * 5, 3))
    x, y = torch.randn(4, 2, 6, 5), torch.randint(0, 3, (4,))
    params = {"params": {
        "conv": {"kernel": jnp.asarray(_np(tm[0].weight).transpose(2, 3, 1, 0)), "bias": jnp.asarray(_np(tm[0].bias))},
        "fc": {"kernel": jnp.asarray(_np(tm[3].weight).T), "bias": jnp.asarray(_np(tm[3].bias))}}}
    return tm, x, y, JaxCNN().apply, params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(y.numpy())


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(1)
    tm = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False))
    x, y = torch.randn(6, 2, 4), torch.randn(6, 2, 3)  # tokens: the expand setting
    params = {"params": {"l0": {"kernel": jnp.asarray(_np(tm[0].weight).T), "bias": jnp.asarray(_np(tm[0].bias))},
                         "l1": {"kernel": jnp.asarray(_np(tm[2].weight).T)}}}
    return tm, x, y, JaxMLP().apply, params, jnp.asarray(x.numpy()), jnp.asarray(y.numpy())


@pytest.mark.parametrize("kind", KINDS)
def test_cnn_torch_equals_jax(cnn, kind):
    tm, x, y, apply, params, xj, yj = cnn
    kw = {"mc_samples": 3, "seed": 5} if kind == "mc" else {}
    a = torch_blocks(tm, nn.CrossEntropyLoss(), x, y, kind=kind, **kw)
    b = jt.curvature_blocks(apply, params, jt.CrossEntropyLoss(), xj, yj, kind=kind, **kw)
    assert list(a) == ["0", "3"] and list(b) == ["conv", "fc"]
    testing.assert_curvature_close(list(b.values()), list(a.values()), dtype="float64")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mlp_torch_equals_jax(mlp, kind, reduction):
    tm, x, y, apply, params, xj, yj = mlp
    kw = {"mc_samples": 2} if kind == "mc" else {}
    a = torch_blocks(tm, nn.MSELoss(reduction=reduction), x, y, kind=kind, **kw)
    b = jt.curvature_blocks(apply, params, jt.MSELoss(reduction), xj, yj, kind=kind, **kw)
    testing.assert_curvature_close(list(b.values()), list(a.values()), dtype="float64")


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_kfac_fisher_variants_equal(cnn, fisher):
    tm, x, y, apply, params, xj, yj = cnn
    a = torch_blocks(tm, nn.CrossEntropyLoss(), x, y, kind="kfac-reduce", fisher=fisher, mc_samples=2)
    b = jt.curvature_blocks(apply, params, jt.CrossEntropyLoss(), xj, yj, kind="kfac-reduce", fisher=fisher,
                            mc_samples=2)
    testing.assert_curvature_close(list(b.values()), list(a.values()), dtype="float64")


def test_generic_loss_and_plain_functions(mlp):
    tm, x, y, apply, params, xj, yj = mlp
    ref = jt.curvature_blocks(apply, params, jt.MSELoss("sum"), xj, yj, kind="ef")
    generic = jt.curvature_blocks(apply, params, lambda f, t: ((f - t) ** 2).sum(), xj, yj, kind="ef",
                                  reduction_factor=2.0)
    testing.assert_curvature_close(generic, ref, dtype="float64")
    with pytest.raises(ValueError, match="reduction factor"):
        jt.curvature_blocks(apply, params, lambda f, t: ((f - t) ** 2).sum(), xj, yj, kind="ef")

    def plain(p, z):  # no Flax modules: parameter-space kinds work, factor kinds cannot observe layers
        h = jnp.tanh(z @ p["params"]["l0"]["kernel"] + p["params"]["l0"]["bias"])
        return h @ p["params"]["l1"]["kernel"]

    testing.assert_curvature_close(jt.curvature_blocks(plain, params, jt.MSELoss(), xj, yj, kind="ggn"),
                                   jt.curvature_blocks(apply, params, jt.MSELoss(), xj, yj, kind="ggn"),
                                   dtype="float64")
    with pytest.raises(ValueError, match="Flax linen"):
        jt.curvature_blocks(plain, params, jt.MSELoss(), xj, yj, kind="kfac-expand")
    assert jt.supported_layers(params) == ["l0", "l1"]
    with pytest.raises(ValueError, match="unknown layers"):
        jt.curvature_blocks(apply, params, jt.MSELoss(), xj, yj, kind="ggn", layers=["l2"])
