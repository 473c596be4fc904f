"""maccore.testing.strategies: valid draws, R ≠ 1 batches, dampings over 1e-6…1e2, ill-conditioned
activations, and property tests of the core built on them; hypothesis is imported lazily."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from hypothesis import given, settings

import maccore
from maccore import testing
from maccore.testing import strategies as mst
from maccore.testing._blocks import conv_rows_nchw

ROOT = Path(__file__).resolve().parents[2]
FAST = settings(max_examples=15, deadline=None, database=None)


@FAST
@given(lam=mst.dampings())
def test_dampings_range(lam):
    assert 1e-6 <= lam <= 1e2


@FAST
@given(batch=mst.batches())
def test_batches_have_r_not_one(batch):
    assert batch.reduction_factor != 1.0
    n, s, _ = batch.x.shape
    assert n >= 2 and batch.grads.shape[:2] == (n, s)


@FAST
@given(geo=mst.conv_geometries(groups=False), seed=mst.dampings())
def test_conv_rows_against_an_independent_im2col(geo, seed):
    """maccore.conv2d_rows (the core) equals the references' NumPy im2col on drawn geometries."""
    oh, ow = geo.output_size
    assert oh >= 1 and ow >= 1
    x = np.random.default_rng(int(seed * 1e6) % 2**32).standard_normal((2, geo.in_channels, geo.height, geo.width))
    rows = maccore.conv2d_rows(x, geo.kernel_size, stride=geo.stride, padding=geo.padding,
                               dilation=geo.dilation, bias=geo.bias)
    ref = conv_rows_nchw(x, geo.kernel_size, geo.stride, tuple((p, p) for p in geo.padding), geo.dilation, 1)
    ref = ref.reshape(-1, ref.shape[-1])
    if geo.bias:
        ref = np.concatenate([ref, np.ones((len(ref), 1))], axis=1)
    assert rows.shape[1] == geo.d_tilde
    testing.assert_curvature_close(rows, ref, dtype="float64")


@FAST
@given(case=mst.mlp_cases())
def test_kfac_exactness_property(case):
    """P-K1 … P-K4 on drawn cases: canonical rows → G ⊗ A equals the exact GGN block."""
    inputs, _, _ = testing.mlp_io(case)
    R = testing.reduction_factor(case)
    reduce = case.setting == "reduce"
    for layer in range(len(case.weights)):
        g = testing.backprop_grads(case, layer)
        rows = maccore.linear_rows(inputs[layer], bias=case.biases[layer] is not None, reduce=reduce)
        grows = np.concatenate([maccore.grad_rows(g[k], reduce=reduce) for k in range(len(g))])
        A = maccore.input_factor(rows)
        G = maccore.gradient_factor(grows, reduction_factor=R)
        testing.assert_curvature_close(np.kron(G, A), testing.ggn_block(case, layer), dtype="float64")


@FAST
@given(x=mst.activations(d=4, max_cond=1e8), lam=mst.dampings())
def test_mac_apply_on_ill_conditioned_activations(x, lam):
    """The core's rank-1 MAC against the closed-form reference; κ of āāᵀ+λI can reach 1e12."""
    a = x.mean(axis=0)
    g = np.random.default_rng(0).standard_normal((3, 4))
    want = g @ testing.mac_dense_preconditioner(a, lam)
    testing.assert_curvature_close(maccore.mac_apply(g, a, lam), want, dtype="float64")


def test_import_without_hypothesis():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "hypothesis":
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        import maccore.testing
        from maccore.testing import strategies
        try:
            strategies.dampings()
        except ImportError as e:
            assert "pip install hypothesis" in str(e)
        else:
            raise SystemExit("no ImportError")
        assert "hypothesis" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
