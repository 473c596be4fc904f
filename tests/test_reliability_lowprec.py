"""Low precision (docs/numerics.md): bfloat16 / float16 inputs never lower the precision of the
statistics, the inverses or the rank-1 algebra (T11), and KFAC's float64 retry.

- ``mac_apply`` / ``kfac_apply`` on bf16/f16 gradients (torch, jax) return the input dtype, are
  finite, equal the float32 computation rounded once, and match a float64 reference within the
  dtype's rounding — including sizes where float16 arithmetic would overflow;
- statistics of low-precision rows are float32;
- the adapters keep float32 states for bf16 models (and under torch autocast);
- KFAC's float64 retry: a float32 inverse / eigendecomposition that fails is redone in float64
  and equals the float64 dense result; an inverse that only exists beyond float32 raises a
  ``DecompositionError`` naming the factor.
"""

from __future__ import annotations

import numpy as np
import pytest

import maccore

torch = pytest.importorskip("torch")

from tests.adapters import torch_helpers  # noqa: E402,F401  (adapter import path)

import array_api_compat  # noqa: E402

import maccore_torch as mt  # noqa: E402

LOW = ["bfloat16", "float16"]


def _eps(name):
    return {"bfloat16": 2.0**-8, "float16": 2.0**-11}[name]


def _backends():
    out = [("torch", lambda a, dt: torch.asarray(a, dtype=getattr(torch, dt)),
            lambda x: x.float().numpy().astype(np.float64))]
    try:
        import jax.numpy as jnp

        out.append(("jax", lambda a, dt: jnp.asarray(a, dtype=getattr(jnp, dt)),
                    lambda x: np.asarray(x.astype(jnp.float32), dtype=np.float64)))
    except ImportError:  # pragma: no cover
        pass
    return out


BACKENDS = _backends()


def _problem(seed, d_out=24, d_t=33, big=False):
    rng = np.random.default_rng(seed)
    scale = 40.0 if big else 1.0
    g = rng.standard_normal((d_out, d_t)) * scale
    a = rng.standard_normal(d_t) * scale + 0.5
    a[-1] = 1.0
    rows = rng.standard_normal((64, d_t)) * scale
    grows = rng.standard_normal((64, d_out)) * scale
    return g, a, rows, grows


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("dt", LOW)
@pytest.mark.parametrize("backend", [b[0] for b in BACKENDS])
def test_mac_apply_low_precision(backend, dt, big):
    _, mk, back = next(b for b in BACKENDS if b[0] == backend)
    g, a, _, _ = _problem(0, big=big)
    G, A = mk(g, dt), mk(a, dt)
    g32, a32 = back(G), back(A)  # the rounded inputs, exactly
    for scale in ("reference", "inverse"):
        out = maccore.mac_apply(G, A, 0.7, scale=scale)
        assert str(out.dtype).endswith(dt)
        o = back(out)
        assert np.all(np.isfinite(o))
        # = the float32 computation on the same (rounded) inputs, rounded once
        ref32 = maccore.mac_apply(mk(g32, "float32"), mk(a32, "float32"), 0.7, scale=scale)
        np.testing.assert_array_equal(o, back(mk(back(ref32), dt)))
        # and the float64 truth within the dtype's rounding (in float16 ‖a‖² alone would overflow)
        want = g32 - np.outer(g32 @ a32, a32) / (0.7 + a32 @ a32)
        if scale == "inverse":
            want = want / 0.7
        tol = 8 * _eps(dt) * max(1.0, float(np.max(np.abs(want))))
        np.testing.assert_allclose(o, want, rtol=0, atol=tol)


@pytest.mark.parametrize("mode", ["tikhonov", "pi", "exact"])
@pytest.mark.parametrize("dt", LOW)
@pytest.mark.parametrize("backend", [b[0] for b in BACKENDS])
def test_kfac_apply_low_precision(backend, dt, mode):
    _, mk, back = next(b for b in BACKENDS if b[0] == backend)
    g, _, rows, grows = _problem(1, d_out=6, d_t=9)
    A = maccore.input_factor(mk(rows, dt))
    Gf = maccore.gradient_factor(mk(grows, dt), reduction_factor=1 / 64)
    assert str(A.dtype).endswith("float32") and str(Gf.dtype).endswith("float32")
    Gm = mk(g, dt)
    out = maccore.kfac_apply(Gm, A, Gf, 0.3, mode=mode)
    assert str(out.dtype).endswith(dt)
    o = back(out)
    assert np.all(np.isfinite(o))
    ref32 = maccore.kfac_apply(mk(back(Gm), "float32"), A, Gf, 0.3, mode=mode)
    np.testing.assert_array_equal(o, back(mk(back(ref32), dt)))
    # float64 dense reference
    A64, G64, g64 = back(A), back(Gf), back(Gm)
    if mode == "exact":
        dense = np.kron(G64, A64) + 0.3 * np.eye(A64.shape[0] * G64.shape[0])
        want = np.linalg.solve(dense, g64.reshape(-1)).reshape(g64.shape)
    else:
        if mode == "pi":
            pi = np.sqrt((np.trace(A64) / A64.shape[0]) / (np.trace(G64) / G64.shape[0]))
            la, lg = pi * np.sqrt(0.3), np.sqrt(0.3) / pi
        else:
            la = lg = 0.3
        want = (np.linalg.inv(G64 + lg * np.eye(6)) @ g64 @ np.linalg.inv(A64 + la * np.eye(9)))
    tol = 8 * _eps(dt) * max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(o, want, rtol=0, atol=tol)


@pytest.mark.parametrize("backend", [b[0] for b in BACKENDS])
def test_statistics_of_float16_rows_are_float32_and_do_not_overflow(backend):
    """Values of 300 over 1,000 rows: sums of squares reach 9e7, far beyond float16's 65504."""
    _, mk, back = next(b for b in BACKENDS if b[0] == backend)
    rng = np.random.default_rng(2)
    rows = mk(300.0 + rng.standard_normal((1000, 5)), "float16")
    r64 = back(rows)
    for fn, want in (
        (maccore.mean_activation, r64.mean(0)),
        (maccore.input_factor, r64.T @ r64 / 1000),
        (lambda r: maccore.gradient_factor(r, reduction_factor=1.0), r64.T @ r64),
        (lambda r: maccore.gradient_diagonal(r), (r64 * r64).mean(0)),
    ):
        out = fn(rows)
        assert str(out.dtype).endswith("float32")
        np.testing.assert_allclose(back(out), want, rtol=1e-5)
    x = mk(300.0 + rng.standard_normal((4, 2, 6, 6)), "float16")
    mean = maccore.conv2d_mean_patch(x, 3, padding=1, bias=True)
    assert str(mean.dtype).endswith("float32")
    rows_c = maccore.conv2d_rows(mk(back(x), "float32"), 3, padding=1, bias=True)
    np.testing.assert_allclose(back(mean), back(rows_c).mean(0), rtol=1e-5)


# ---- adapters keep float32 state --------------------------------------------------------------------
def test_torch_bf16_model_keeps_float32_state():
    torch.manual_seed(0)
    for make in (lambda m: mt.MAC(m, lr=0.05, t_cov=1, t_inv=1),
                 lambda m: mt.KFAC(m, lr=0.05, t_cov=1, t_inv=1, damping=0.1)):
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        model = model.to(torch.bfloat16)
        opt = make(model)
        for _ in range(3):
            x = torch.randn(16, 6, dtype=torch.bfloat16)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x).float(), torch.randint(0, 3, (16,))).backward()
            opt.step()
        assert opt.t == 3
        for layer in opt.preconditioner.layers:
            for k, v in maccore.checkpoint.flatten_state(layer.state)[0].items():
                if v.is_floating_point():
                    assert v.dtype == torch.float32, (layer.name, k)
                    assert torch.isfinite(v).all()
        assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())


def test_torch_autocast_statistics_are_float32():
    """Under bf16 autocast the layer inputs are bf16; the running means stay float32 and equal
    the float32 statistics of those inputs."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = mt.MACPreconditioner(model, t_cov=1, t_inv=1)
    seen = []
    model[2].register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    x = torch.randn(16, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert seen[0].dtype == torch.bfloat16
    out.float().sum().backward()
    opt.step()
    st = opt.layers[1].state
    assert st.mean.value.dtype == torch.float32
    want = torch.cat([seen[0].float().mean(0), torch.ones(1)])
    torch.testing.assert_close(st.mean_hat, want, rtol=1e-6, atol=1e-7)


def test_jax_bf16_params_keep_float32_state():
    jax = pytest.importorskip("jax")
    from tests.adapters import _jax_common  # noqa: F401

    import jax.numpy as jnp

    import maccore_jax as mj

    bf = jnp.bfloat16
    params = {"Dense_0": {"kernel": jnp.ones((4, 5), bf) * 0.1, "bias": jnp.zeros(5, bf)}}
    for tx in (mj.mac(0.1, t_cov=1, t_inv=1),
               mj.kfac(0.1, reduction_factor=0.25, t_cov=1, t_inv=1, damping=0.1)):
        state = tx.init(params)
        g = jax.tree.map(lambda p: jnp.full(p.shape, 0.3, bf), params)
        acts = {"Dense_0": jnp.asarray(np.random.default_rng(0).standard_normal((4, 4)), bf)}
        gouts = {"Dense_0": jnp.full((4, 5), 0.1, bf)}
        u, state = jax.jit(lambda g, s, a, go, tx=tx: tx.update(g, s, params, activations=a,
                                                                output_grads=go))(g, state, acts, gouts)
        assert int(state[0].count) == 1
        for leaf in jax.tree.leaves(state[0].layers):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32
        for leaf in jax.tree.leaves(u):
            assert leaf.dtype == bf and bool(jnp.all(jnp.isfinite(leaf)))


# ---- KFAC float64 retry -------------------------------------------------------------------------------
NPX = array_api_compat.array_namespace(np.empty(0))
TPX = array_api_compat.array_namespace(torch.empty(0))


def _ill_conditioned(n=12, seed=3, lo=-7, hi=3):
    """A PSD factor with eigenvalues from 10**lo to 10**hi."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.logspace(lo, hi, n)) @ q.T


@pytest.mark.parametrize("xp_name", ["numpy", "torch"])
def test_float64_retry_of_a_failed_float32_inverse(xp_name, monkeypatch):
    xp = NPX if xp_name == "numpy" else TPX
    M64 = _ill_conditioned()
    M = xp.asarray(M64.astype(np.float32))
    real = xp.linalg.inv
    dtypes = []

    def float32_fails(x):
        dtypes.append(str(x.dtype))
        if "float32" in str(x.dtype):
            raise np.linalg.LinAlgError("simulated float32 failure")
        return real(x)

    monkeypatch.setattr(xp.linalg, "inv", float32_fails)
    inv = maccore.damped_inverse(M, 1e-3, name="A")
    assert [d.split(".")[-1] for d in dtypes] == ["float32", "float64"]
    assert "float32" in str(inv.dtype)
    m32 = M64.astype(np.float32).astype(np.float64)  # the factor as stored
    want = np.linalg.inv(m32 + 1e-3 * np.eye(12))
    got = np.asarray(inv, dtype=np.float64) if xp_name == "numpy" else inv.double().numpy()
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.max(np.abs(want)))

    # the float32 result is non-finite (e.g. overflow inside the LU) → the same retry
    monkeypatch.setattr(xp.linalg, "inv",
                        lambda x: real(x) * (float("nan") if "float32" in str(x.dtype) else 1.0))
    inv2 = maccore.damped_inverse(M, 1e-3, name="A")
    np.testing.assert_array_equal(np.asarray(inv2) if xp_name == "numpy" else inv2.numpy(),
                                  np.asarray(inv) if xp_name == "numpy" else inv.numpy())


def test_float64_retry_of_a_failed_eigh_in_exact_mode(monkeypatch):
    M64 = _ill_conditioned(8, seed=4, lo=-3, hi=1)
    A = NPX.asarray(M64.astype(np.float32))
    G = NPX.asarray(np.eye(3, dtype=np.float32) * 2.0)
    g = NPX.asarray(np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32))
    real = NPX.linalg.eigh

    def float32_fails(x):
        if x.dtype == np.float32:
            raise np.linalg.LinAlgError("simulated: eigh did not converge")
        return real(x)

    monkeypatch.setattr(NPX.linalg, "eigh", float32_fails)
    out = maccore.kfac_apply(g, A, G, 0.01, mode="exact")
    assert out.dtype == np.float32
    a32 = M64.astype(np.float32).astype(np.float64)
    dense = np.kron(np.eye(3) * 2.0, a32) + 0.01 * np.eye(24)
    want = np.linalg.solve(dense, g.astype(np.float64).reshape(-1)).reshape(3, 8)
    np.testing.assert_allclose(out, want, rtol=1e-3, atol=1e-3 * np.max(np.abs(want)))


def test_inverse_beyond_float32_and_failures_in_both_precisions_raise():
    # a damping below float32's normal range would round away (1/1e-45 overflows float32): it is
    # refused up front, naming the dtype, instead of failing inside the inversion
    M = NPX.asarray(np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"damped_inverse: damping 1e-45 is below the smallest normal float32"):
        maccore.damped_inverse(M, 1e-45, name="A")
    inv64 = maccore.damped_inverse(NPX.asarray(np.zeros((3, 3))), 1e-45, name="A")  # fine in float64
    assert np.all(np.isfinite(np.asarray(inv64)))
    bad = NPX.asarray(np.full((3, 3), np.nan, dtype=np.float32))
    with pytest.raises(maccore.DecompositionError, match=r"could not invert G.*also failed in float64"):
        maccore.damped_inverse(bad, 0.1, name="G")
    with pytest.raises(maccore.DecompositionError, match=r"eigh failed for A.*also in float64"):
        maccore.kfac_apply(NPX.asarray(np.ones((2, 3), np.float32)), bad,
                           NPX.asarray(np.eye(2, dtype=np.float32)), 0.1, mode="exact")
    assert issubclass(maccore.DecompositionError, RuntimeError)
