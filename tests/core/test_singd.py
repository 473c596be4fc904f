"""SINGD core (docs/math.md, tests S-T1, S-T2, S-T4, S-T5, S-T6) against NumPy float64 oracles.

The dense reference ``ref_singd`` below is an independent transcription of §5.1/§5.2 with dense
matrices and the support-mask projection oracle of ``test_structures.project``.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from array_api_compat import is_jax_namespace
from hypothesis import given
from hypothesis import strategies as st

from maccore import structures
from maccore.singd import SingdState, singd, singd_statistics
from tests.conftest import asarray, assert_close, to_numpy, tol
from tests.core.helpers import xgiven
from tests.core.test_structures import project

# structure pairs (K side, C side) covering all ten classes; names as accepted by structures.get
PAIRS = [
    ("dense", "diagonal"),
    ("block3diagonal", "hierarchical2_3"),
    ("tril_toeplitz", "triu_toeplitz"),
    ("tril_bottom_right_diag", "tril_top_left_diag"),
    ("triu_bottom_right_diag", "triu_top_left_diag"),
]


def oracle_spec(name: str) -> tuple[str, dict]:
    """(canonical name, options) of a structure name, for the NumPy projection oracle."""
    T = structures.get(name)
    return T.name, dict(T.options)


# ------------------------------------------------------------------------------------------------
# NumPy float64 reference (docs/math.md, dense matrices)


def avgtr(X: np.ndarray) -> float:
    return float(np.trace(X)) / X.shape[0]


def ref_singd(batches, *, sK, sC, alpha1, lr_cov, damping, kfac_like, normalize, u=1.0):
    """Run the SINGD preconditioner update on ``batches = [(rows, grad_rows, R), ...]``.

    Returns ``(K, C, m_K, m_C)`` as dense float64 arrays.
    """
    nK, oK = oracle_spec(sK)
    nC, oC = oracle_spec(sC)
    dK, dC = batches[0][0].shape[1], batches[0][1].shape[1]
    IK, IC = np.eye(dK), np.eye(dC)
    K, C = IK.copy(), IC.copy()
    mK, mC = np.zeros((dK, dK)), np.zeros((dC, dC))
    if kfac_like:
        alpha1 = 0.0
    s = 0.5 * (1 - alpha1) if normalize else 0.5
    for rows, grads, R in batches:
        A = rows.T @ rows / rows.shape[0]  # E_r[x̃x̃ᵀ]
        G = grads.T @ grads / R  # (1/R) Σ g gᵀ
        HK = project(nK, oK, K.T @ A @ K)
        HC = project(nC, oC, C.T @ G @ C)
        PK = project(nK, oK, K.T @ K)
        PC = project(nC, oC, C.T @ C)
        if kfac_like:
            gK = HK + damping * PK - IK
            gC = u * HC + damping * PC - IC
        else:
            gK = u * avgtr(HC) * HK + damping * avgtr(PC) * PK - IK
            gC = u * avgtr(HK) * HC + damping * avgtr(PK) * PC - IC
        mK = alpha1 * mK + s * gK
        mC = alpha1 * mC + s * gC
        bK = lr_cov / max(1.0, np.abs(mK).max()) if normalize else lr_cov
        bC = lr_cov / max(1.0, np.abs(mC).max()) if normalize else lr_cov
        K = K @ (IK - bK * mK)
        C = C @ (IC - bC * mC)
    return K, C, mK, mC


def make_batch(rng, R, dK, dC, *, mean_loss: bool):
    """Input rows (bias column of ones last) and autograd gradient rows ``g = red · ĝ`` of a sum
    (``red = 1``) or mean (``red = 1/R``) loss, scaled so that ``G = (1/red) Σ g gᵀ ≈ I``."""
    rows = np.concatenate([rng.standard_normal((R, dK - 1)), np.ones((R, 1))], axis=1)
    red = 1.0 / R if mean_loss else 1.0
    ghat = rng.standard_normal((R, dC)) * (1.0 if mean_loss else 1.0 / np.sqrt(R))
    return rows, red * ghat, red


# ------------------------------------------------------------------------------------------------
# JAX: run the update under jax.jit (one compile per configuration; eager XLA compiles are slow)

_JITTED: dict = {}


def run(xp, key, fn, *args):
    if not is_jax_namespace(xp):
        return fn(*args)
    import jax

    if key not in _JITTED:
        _JITTED[key] = jax.jit(fn)
    return _JITTED[key](*args)


def loop(xp, n, body, state):
    """``for i in range(n): state = body(i, state)`` — a ``fori_loop`` under JAX (one traced body)."""
    if is_jax_namespace(xp):
        import jax

        return jax.lax.fori_loop(0, n, body, state)
    for i in range(n):
        state = body(i, state)
    return state


def scalar(xp, v, dtype):
    """A hyper-parameter passed as a 0-d array (traced under jit, no recompiles)."""
    return asarray(xp, np.asarray(v), dtype)


# ------------------------------------------------------------------------------------------------
# S-T6: equivalence with the dense reference


def _cases():
    out = []
    for i, (sK, sC) in enumerate(PAIRS):
        # alpha1 = 0: alternate INGD / IKFAC; alpha1 = 0.5: alternate normalize_lr_cov
        out.append(pytest.param(sK, sC, 0.0, i % 2 == 1, i % 3 == 0, id=f"{sK}-{sC}-a0"))
        out.append(pytest.param(sK, sC, 0.5, False, i % 2 == 0, id=f"{sK}-{sC}-a0.5"))
    return out


@pytest.mark.parametrize(("sK", "sC", "alpha1", "kfac_like", "normalize"), _cases())
@xgiven(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_matches_dense_reference(xp, dtype, sK, sC, alpha1, kfac_like, normalize, data, seed):
    """S-T6: several steps of update, then apply and to_dense, against ``ref_singd``."""
    jax = is_jax_namespace(xp)
    dK = data.draw(st.just(7) if jax else st.sampled_from((1, 3, 7)), label="dK")
    dC = data.draw(st.just(6) if jax else st.sampled_from((2, 6)), label="dC")
    lr_cov = data.draw(st.sampled_from((0.05, 0.2)), label="lr_cov")
    u = data.draw(st.sampled_from((1.0, 0.5)), label="u")
    mean_loss = data.draw(st.booleans(), label="mean_loss")
    damping = 1e-2
    rng = np.random.default_rng(seed)
    R = 5
    batches = [make_batch(rng, R, dK, dC, mean_loss=mean_loss) for _ in range(3)]
    pc = singd(
        structures=(sK, sC),
        alpha1=alpha1,
        lr_cov=0.123,
        damping=damping,
        kfac_like=kfac_like,
        normalize_lr_cov=normalize,
    )
    grad_mat = rng.standard_normal((dC, dK))

    def simulate(rows, grads, reds, lr, u, grad_mat):
        state = pc.init(dK, dC, xp=xp, dtype=dtype)

        def body(i, state):
            return pc.update(
                state,
                rows[i, ...],
                grads[i, ...],
                reduction_factor=reds[i],
                lr_cov=lr,
                grad_scale_correction=u,
            )

        state = loop(xp, len(batches), body, state)
        assert pc.refresh(state) is state
        return state, pc.apply(state, grad_mat), pc.to_dense(state)

    state, out, P = run(
        xp,
        ("st6", sK, sC, alpha1, kfac_like, normalize, str(dtype)),
        simulate,
        asarray(xp, np.stack([b[0] for b in batches]), dtype),
        asarray(xp, np.stack([b[1] for b in batches]), dtype),
        asarray(xp, np.asarray([b[2] for b in batches]), dtype),
        scalar(xp, lr_cov, dtype),
        scalar(xp, u, dtype),
        asarray(xp, grad_mat, dtype),
    )
    K, C, mK, mC = ref_singd(
        batches,
        sK=sK,
        sC=sC,
        alpha1=alpha1,
        lr_cov=lr_cov,
        damping=damping,
        kfac_like=kfac_like,
        normalize=normalize,
        u=u,
    )
    t = tol(xp, dtype, factor=4.0)
    assert isinstance(state, SingdState)
    assert state.K.dtype == dtype and state.C.dtype == dtype
    assert_close(state.K.to_dense(), K, err_msg="K", **t)
    assert_close(state.C.to_dense(), C, err_msg="C", **t)
    if alpha1 > 0:
        assert_close(state.m_K.to_dense(), mK, err_msg="m_K", **t)
        assert_close(state.m_C.to_dense(), mC, err_msg="m_C", **t)
    else:
        assert state.m_K is None and state.m_C is None
    # parameter update direction C Cᵀ ∇W̃ K Kᵀ and the dense (row-major) view
    assert out.dtype == dtype
    assert_close(out, C @ C.T @ grad_mat @ K @ K.T, err_msg="apply", **t)
    assert_close(P, np.kron(C @ C.T, K @ K.T), err_msg="to_dense", **t)
    assert_close(to_numpy(P) @ grad_mat.reshape(-1), to_numpy(out).reshape(-1), **t)


# ------------------------------------------------------------------------------------------------
# S-T1: IKFAC first-order theorem (docs/math.md)


def _spd(rng, d, lo=0.5, hi=2.0):
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (Q * rng.uniform(lo, hi, d)) @ Q.T


@given(seed=st.integers(0, 2**32 - 1))
def test_ikfac_first_order(xp, dtype, seed):
    """K Kᵀ after one kfac_like step = ((1-β) S + β U + λ I)⁻¹ + O(β²): error ratio ≈ 100/decade."""
    if dtype != xp.float64:
        pytest.skip("S-T1 resolves O(β²) errors down to 1e-10: float64 only")
    rng = np.random.default_rng(seed)
    dK, dC, lam, R = 4, 3, 0.1, 6
    SK, SC = _spd(rng, dK), _spd(rng, dC)
    K0 = np.linalg.cholesky(np.linalg.inv(SK + lam * np.eye(dK)))
    C0 = np.linalg.cholesky(np.linalg.inv(SC + lam * np.eye(dC)))
    rows = rng.standard_normal((R, dK))
    grads = rng.standard_normal((R, dC))
    U, G = rows.T @ rows / R, grads.T @ grads
    pc = singd(kfac_like=True, alpha1=0.0, damping=lam)

    def step(K0, C0, rows, grads, lr):
        state = pc.init(dK, dC, xp=xp, dtype=dtype)
        state = state._replace(K=structures.Dense(K0), C=structures.Dense(C0))
        new = pc.update(state, rows, grads, reduction_factor=1.0, lr_cov=lr)
        return new.K.to_dense(), new.C.to_dense()

    errs = {"K": [], "C": []}
    for beta in (1e-2, 1e-3, 1e-4):
        K1, C1 = run(
            xp,
            "st1",
            step,
            asarray(xp, K0),
            asarray(xp, C0),
            asarray(xp, rows),
            asarray(xp, grads),
            scalar(xp, beta, dtype),
        )
        K1, C1 = to_numpy(K1), to_numpy(C1)
        target_K = np.linalg.inv((1 - beta) * SK + beta * U + lam * np.eye(dK))
        target_C = np.linalg.inv((1 - beta) * SC + beta * G + lam * np.eye(dC))
        errs["K"].append(np.abs(K1 @ K1.T - target_K).max())
        errs["C"].append(np.abs(C1 @ C1.T - target_C).max())
    for side, e in errs.items():
        ratios = [e[0] / e[1], e[1] / e[2]]
        assert all(60 < r < 160 for r in ratios), (side, e, ratios)


# ------------------------------------------------------------------------------------------------
# S-T2 / S-T4: fixed points of the iteration with constant statistics


def _iterate(xp, key, pc, init_args, rows, grads, n_iter):
    """``pc.init(*init_args)`` then ``n_iter`` updates with constant statistics (jitted
    ``fori_loop`` under JAX); returns the dense ``K``, ``C``."""
    dK, dC, dtype = init_args

    def iterate(rows, grads):
        state = pc.init(dK, dC, xp=xp, dtype=dtype)
        body = lambda i, s: pc.update(s, rows, grads, reduction_factor=1.0)
        state = loop(xp, n_iter, body, state)
        return state.K.to_dense(), state.C.to_dense()

    K, C = run(xp, key, iterate, rows, grads)
    return to_numpy(K), to_numpy(C)


@pytest.mark.parametrize("alpha1", [0.0, 0.5])
def test_ingd_fixed_point(xp, dtype, alpha1):
    """S-T2: KKᵀ = (c U + λ c′ I)⁻¹ and CCᵀ = (κ G + λ κ′ I)⁻¹ at the INGD fixed point."""
    if dtype != xp.float64:
        pytest.skip("S-T2 checks the fixed point to 1e-9: float64 only")
    rng = np.random.default_rng(1)
    dK, dC, R, lam = 4, 3, 20, 0.1
    rows = np.concatenate([rng.standard_normal((R, dK - 1)), np.ones((R, 1))], axis=1)
    grads = rng.standard_normal((R, dC)) / np.sqrt(R)
    U, G = rows.T @ rows / R, grads.T @ grads
    pc = singd(alpha1=alpha1, lr_cov=0.5, damping=lam)
    K, C = _iterate(
        xp, ("st2", alpha1), pc, (dK, dC, dtype), asarray(xp, rows), asarray(xp, grads), 120
    )
    c, c1 = avgtr(C.T @ G @ C), avgtr(C.T @ C)
    k, k1 = avgtr(K.T @ U @ K), avgtr(K.T @ K)
    assert_close(K @ K.T, np.linalg.inv(c * U + lam * c1 * np.eye(dK)), rtol=1e-9, atol=1e-9)
    assert_close(C @ C.T, np.linalg.inv(k * G + lam * k1 * np.eye(dC)), rtol=1e-9, atol=1e-9)
    # negative control: the undamped-trace variant is *not* the fixed point
    assert np.abs(K @ K.T - np.linalg.inv(U + lam * np.eye(dK))).max() > 1e-3


def test_diagonal_kfac_like_limit(xp, dtype):
    """S-T4: diagonal structures, kfac_like, constant U, G: KKᵀ → diag(1/(diag U + λ))."""
    rng = np.random.default_rng(2)
    dK, dC, R, lam = 5, 4, 12, 0.05
    rows = rng.standard_normal((R, dK))
    grads = rng.standard_normal((R, dC)) / 3
    U, G = rows.T @ rows / R, grads.T @ grads
    pc = singd(
        structures=("diagonal", "diagonal"), kfac_like=True, alpha1=0.0, lr_cov=0.5, damping=lam
    )
    K, C = _iterate(
        xp,
        ("st4", str(dtype)),
        pc,
        (dK, dC, dtype),
        asarray(xp, rows, dtype),
        asarray(xp, grads, dtype),
        60,
    )
    k, c = np.diag(K), np.diag(C)
    t = tol(xp, dtype, factor=4.0)
    assert_close(k * k, 1.0 / (np.diag(U) + lam), **t)
    assert_close(c * c, 1.0 / (np.diag(G) + lam), **t)


# ------------------------------------------------------------------------------------------------
# S-T5: H_K, H_C scaling against the canonical A, G of docs/math.md


@pytest.mark.parametrize("setting", ["expand", "reduce"])
@pytest.mark.parametrize("loss", ["sum", "mean"])
@pytest.mark.parametrize(("sK", "sC"), [("dense", "dense"), ("block2diagonal", "tril_toeplitz")])
@given(seed=st.integers(0, 2**32 - 1))
def test_statistics_scaling(xp, dtype, setting, loss, sK, sC, seed):
    rng = np.random.default_rng(seed)
    N, S, d_in, d_out = 3, 4, 3, 2
    x = rng.standard_normal((N, S, d_in))
    ghat = rng.standard_normal((N, S, d_out))  # criterion-level (R-free) output gradients
    xt = np.concatenate([x, np.ones((N, S, 1))], axis=-1)  # x̃ = [x, 1]
    if setting == "expand":  # one loss term per (n, s)
        R = 1.0 / (N * S) if loss == "mean" else 1.0
        rows = xt.reshape(N * S, d_in + 1)
        grad_rows = (R * ghat).reshape(N * S, d_out)  # autograd gradients g^a = R ĝ
        A = np.einsum("nsi,nsj->ij", xt, xt) / (N * S)  # E_rows[x̃x̃ᵀ]
        G = R * np.einsum("nsi,nsj->ij", ghat, ghat)  # R Σ ĝĝᵀ
    else:  # shared axis reduced before the loss: one loss term per n
        R = 1.0 / N if loss == "mean" else 1.0
        rows = xt.mean(axis=1)  # per-sample mean (bias entry stays 1)
        grad_rows = (R * ghat).sum(axis=1)  # SUM over the shared axis
        A = rows.T @ rows / N
        G = R * np.einsum("ni,nj->ij", ghat.sum(axis=1), ghat.sum(axis=1))
    pc = singd(structures=(sK, sC))
    d_tilde = d_in + 1
    TK, TC = structures.get(sK), structures.get(sC)
    nK, oK = oracle_spec(sK)
    nC, oC = oracle_spec(sC)
    SK = np.eye(d_tilde) + 0.3 * _spd(rng, d_tilde)
    SC = np.eye(d_out) + 0.3 * _spd(rng, d_out)

    def compute(rows, grad_rows, red, SK, SC):
        state = pc.init(d_tilde, d_out, xp=xp, dtype=dtype)
        at_eye = singd_statistics(state, rows, grad_rows, reduction_factor=red)
        K, C = TK.from_dense(SK), TC.from_dense(SC)
        general = singd_statistics(state._replace(K=K, C=C), rows, grad_rows, reduction_factor=red)
        return [H.to_dense() for H in at_eye + general] + [K.to_dense(), C.to_dense()]

    HK0, HC0, HK, HC, Kd, Cd = run(
        xp,
        ("st5", sK, sC, setting, str(dtype)),
        compute,
        asarray(xp, rows, dtype),
        asarray(xp, grad_rows, dtype),
        scalar(xp, R, dtype),
        asarray(xp, SK, dtype),
        asarray(xp, SC, dtype),
    )
    t = tol(xp, dtype, factor=4.0)
    assert_close(HK0, project(nK, oK, A), err_msg="H_K = Π(A) at K = I", **t)
    assert_close(HC0, project(nC, oC, G), err_msg="H_C = Π(G) at C = I", **t)
    # with non-trivial factors: Π(Kᵀ A K), Π(Cᵀ G C)
    Kd, Cd = to_numpy(Kd), to_numpy(Cd)
    assert_close(HK, project(nK, oK, Kd.T @ A @ Kd), **t)
    assert_close(HC, project(nC, oC, Cd.T @ G @ Cd), **t)


def test_update_from_statistics_equals_update_from_rows(xp, dtype):
    rng = np.random.default_rng(4)
    rows, grads, red = make_batch(rng, 6, 4, 3, mean_loss=True)
    pc = singd(structures=("hierarchical2_1", "diagonal"), alpha1=0.5, lr_cov=0.3)

    def compute(r, g, red):
        state = pc.init(4, 3, xp=xp, dtype=dtype)
        a = pc.update(state, r, g, reduction_factor=red)
        b = pc.update(state, statistics=singd_statistics(state, r, g, reduction_factor=red))
        return a, b

    a, b = run(
        xp,
        ("stats", str(dtype)),
        compute,
        asarray(xp, rows, dtype),
        asarray(xp, grads, dtype),
        scalar(xp, red, dtype),
    )
    for x, y in zip(a, b):
        assert_close(x.to_dense(), to_numpy(y.to_dense()), rtol=0, atol=0)
    assert not np.allclose(to_numpy(a.K.to_dense()), np.eye(4))  # the update did something


# ------------------------------------------------------------------------------------------------
# dtypes: per-factor preconditioner dtypes, bf16 factors


def test_preconditioner_dtype_per_factor(xp):
    pc = singd(preconditioner_dtype=(xp.float64, None))
    rng = np.random.default_rng(5)
    rows, grads, red = make_batch(rng, 4, 3, 2, mean_loss=False)

    def compute(rows, grads, grad_mat):
        state0 = pc.init(3, 2, xp=xp, dtype=xp.float32)
        state = pc.update(state0, rows, grads, reduction_factor=red)
        return state0, state, pc.apply(state, grad_mat), pc.to_dense(state)

    state0, state, out, P = run(
        xp,
        "pdtype",
        compute,
        asarray(xp, rows, xp.float32),
        asarray(xp, grads, xp.float32),
        asarray(xp, rng.standard_normal((2, 3)), xp.float32),
    )
    for s in (state0, state):
        assert s.K.dtype == xp.float64 and s.C.dtype == xp.float32
        assert s.m_K.dtype == xp.float64 and s.m_C.dtype == xp.float32
    assert out.dtype == xp.float32
    assert P.dtype == xp.float64


def _bf16_libs():
    out = []
    for mod_name in ("torch", "jax.numpy"):
        try:
            mod = __import__(mod_name, fromlist=["_"])
        except ImportError:  # pragma: no cover
            continue
        out.append(pytest.param(mod, id=mod_name))
    return out


@pytest.mark.parametrize("lib", _bf16_libs())
@pytest.mark.parametrize(("sK", "sC"), [("dense", "dense"), ("tril_toeplitz", "hierarchical2_3")])
def test_bfloat16_factors_stay_finite(lib, sK, sC):
    """bf16 K, C on an ill-conditioned A (cond 1e6, λ = 1e-4) where a bf16 inverse fails: SINGD stays
    finite and within a few % of the float32 run."""
    import array_api_compat

    xp = array_api_compat.array_namespace(lib.zeros(1))
    if is_jax_namespace(xp) and sK != "dense":
        pytest.skip("XLA compiles bf16 graphs slowly; JAX bf16 structures: test_structures")
    rng = np.random.default_rng(0)
    dK, dC = 16, 8
    Q, _ = np.linalg.qr(rng.standard_normal((dK, dK)))
    ev = np.logspace(-4, 2, dK)
    rows = np.sqrt(ev * dK)[:, None] * Q.T  # rowsᵀ rows / dK = Q diag(ev) Qᵀ
    grads = rng.standard_normal((dK, dC)) * 0.3
    A = rows.T @ rows / dK + 1e-4 * np.eye(dK)
    # what KFAC would need: a bf16 inverse/Cholesky of A + λI (unsupported or garbage)
    try:
        Ainv = to_numpy(xp.linalg.inv(asarray(xp, A, xp.bfloat16)))
        bad = not np.all(np.isfinite(Ainv)) or (
            np.linalg.norm(Ainv - np.linalg.inv(A)) > 1e-2 * np.linalg.norm(np.linalg.inv(A))
        )
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        bad = True
    assert bad
    dense = {}
    for label, pdt in (("f32", (None, None)), ("bf16", ("bfloat16", "bfloat16"))):
        pc = singd(
            structures=(sK, sC),
            lr_cov=0.1,
            damping=1e-4,
            normalize_lr_cov=True,
            preconditioner_dtype=pdt,
        )

        def simulate(rows, grads, grad_mat, pc=pc):
            state = pc.init(dK, dC, xp=xp, dtype=xp.float32)
            body = lambda i, s: pc.update(s, rows, grads, reduction_factor=1.0)
            state = loop(xp, 40, body, state)
            return state, pc.apply(state, grad_mat), pc.to_dense(state)

        state, out, P = run(
            xp,
            ("bf16", sK, sC, label),
            simulate,
            asarray(xp, rows, xp.float32),
            asarray(xp, grads, xp.float32),
            asarray(xp, rng.standard_normal((dC, dK)), xp.float32),
        )
        if label == "bf16":
            assert state.K.dtype == xp.bfloat16 and state.C.dtype == xp.bfloat16
            assert state.m_K.dtype == xp.bfloat16 and state.m_C.dtype == xp.bfloat16
        assert out.dtype == xp.float32 and np.all(np.isfinite(to_numpy(out)))
        dense[label] = to_numpy(P)
    assert np.all(np.isfinite(dense["bf16"]))
    rel = np.linalg.norm(dense["bf16"] - dense["f32"]) / np.linalg.norm(dense["f32"])
    assert rel < 0.1, rel


# ------------------------------------------------------------------------------------------------
# configuration, errors, immutability


def test_init_and_momentum_allocation():
    pc = singd(alpha1=0.0)
    s = pc.init(3, 2, xp=np)
    assert s.m_K is None and s.m_C is None
    assert s.K.dtype == np.float32  # explicit default
    np.testing.assert_array_equal(s.K.to_dense(), np.eye(3))
    s = singd(structures=("block30diagonal", "hierarchical15_15")).init(40, 33, xp=np)
    assert isinstance(s.K, structures.BlockDiagonal) and isinstance(s.C, structures.Hierarchical)
    assert isinstance(s.m_K, structures.BlockDiagonal)
    with pytest.warns(UserWarning, match="alpha1"):
        pc = singd(kfac_like=True, alpha1=0.5)
    assert pc.init(2, 2, xp=np).m_K is None


def test_errors():
    pc = singd()
    state = pc.init(4, 3, xp=np, dtype=np.float64)
    rows, grads = np.ones((5, 4)), np.ones((5, 3))
    with pytest.raises(ValueError, match=r"'rows'.*\[R, 4\].*\[5, 3\]"):
        pc.update(state, np.ones((5, 3)), grads, reduction_factor=1.0)
    with pytest.raises(ValueError, match=r"'rows'.*\[4\]"):
        pc.update(state, np.ones(4), grads, reduction_factor=1.0)
    with pytest.raises(ValueError, match=r"'grad_rows'.*\[R, 3\].*\[5, 4\]"):
        pc.update(state, rows, np.ones((5, 4)), reduction_factor=1.0)
    with pytest.raises(ValueError, match="reduction_factor"):
        pc.update(state, rows, grads)
    with pytest.raises(ValueError, match="reduction_factor must be positive"):
        pc.update(state, rows, grads, reduction_factor=0.0)
    with pytest.raises(ValueError, match="lr_cov"):
        pc.update(state, rows, grads, reduction_factor=1.0, lr_cov=-1.0)
    with pytest.raises(ValueError, match="either"):
        pc.update(state, rows, grads, statistics=(state.K, state.C))
    with pytest.raises(ValueError, match="statistics H_K"):
        pc.update(state, statistics=(state.C, state.C))
    with pytest.raises(ValueError, match=r"'grad_mat'.*\[3, 4\].*\[4, 3\]"):
        pc.apply(state, np.ones((4, 3)))
    with pytest.raises(TypeError, match="'grad_mat'.*real floating"):
        pc.apply(state, np.ones((3, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="'rows'.*real floating"):
        pc.update(state, rows.astype(np.complex128), grads, reduction_factor=1.0)
    with pytest.raises(TypeError, match="SingdState"):
        pc.apply((state.K, state.C), np.ones((3, 4)))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="mixed namespaces"):
        pc.update(state, torch.ones(5, 4, dtype=torch.float64), grads, reduction_factor=1.0)
    with pytest.raises(ValueError, match="unknown structure"):
        singd(structures=("dense", "banded"))
    with pytest.raises(ValueError, match="alpha1"):
        singd(alpha1=1.0)
    with pytest.raises(ValueError, match="damping"):
        singd(damping=-1e-3)
    with pytest.raises(ValueError, match="pair"):
        singd(structures=("dense",))
    with pytest.raises(ValueError, match="not a dtype"):
        singd(preconditioner_dtype=("bfloat17", None)).init(2, 2, xp=np)


def test_inputs_not_mutated():
    rng = np.random.default_rng(6)
    rows, grads, red = make_batch(rng, 5, 4, 3, mean_loss=True)
    grad_mat = rng.standard_normal((3, 4))
    pc = singd(structures=("tril_toeplitz", "dense"), alpha1=0.5)
    state = pc.init(4, 3, xp=np, dtype=np.float64)
    state = pc.update(state, rows, grads, reduction_factor=red)
    copies = [np.array(p, copy=True) for f in state for p in f]
    r0, g0, m0 = rows.copy(), grads.copy(), grad_mat.copy()
    pc.update(state, rows, grads, reduction_factor=red)
    pc.apply(state, grad_mat)
    pc.to_dense(state)
    np.testing.assert_array_equal(rows, r0)
    np.testing.assert_array_equal(grads, g0)
    np.testing.assert_array_equal(grad_mat, m0)
    for p, p0 in zip((p for f in state for p in f), copies):
        np.testing.assert_array_equal(p, p0)


def _steps(xp, pc, dtype, n=3):
    """Three update steps of a [3 → 2] layer from fixed data; the state's dense arrays."""
    rng = np.random.default_rng(21)
    state = pc.init(3, 2, xp=xp, dtype=dtype)
    for _ in range(n):
        rows = asarray(xp, rng.standard_normal((5, 3)), dtype)
        grads = asarray(xp, rng.standard_normal((5, 2)), dtype)
        state = pc.update(state, rows, grads, reduction_factor=1.0)
    return [None if x is None else to_numpy(x.to_dense()) for x in state]


@pytest.mark.filterwarnings("ignore:.*kfac_like=True uses no Riemannian momentum")
@pytest.mark.parametrize("alpha1", [0.0, 0.5])
@pytest.mark.parametrize("kfac_like", [False, True])
def test_hyperparameters_as_0d_arrays(xp, alpha1, kfac_like):
    """alpha1, lr_cov and damping given as 0-d arrays (injected or scheduled hyperparameters) give
    the numbers of the same Python floats; an array alpha1 keeps the momentum buffers even when it
    is 0 (its value may change later; the factors then follow the floats' momentum-free steps)."""
    dt = xp.float64
    floats = dict(alpha1=alpha1, lr_cov=0.05, damping=1e-3, kfac_like=kfac_like)
    arrays = {k: (xp.asarray(v, dtype=dt) if k != "kfac_like" else v) for k, v in floats.items()}
    want = _steps(xp, singd(**floats), dt)
    got = _steps(xp, singd(**arrays), dt)
    t = tol(xp, dt)
    for g, w in zip(got[:2], want[:2]):
        assert_close(g, w, **t)
    if alpha1 == 0.0 or kfac_like:
        assert want[2] is None and want[3] is None  # floats: no momentum without alpha1
    if kfac_like:
        assert got[2] is None and got[3] is None  # kfac_like sets alpha1 to 0 whatever its type
    else:
        assert got[2] is not None and got[3] is not None
        if alpha1 != 0.0:
            assert_close(got[2], want[2], **t)
            assert_close(got[3], want[3], **t)


@pytest.mark.filterwarnings("ignore:.*kfac_like=True uses no Riemannian momentum")
@pytest.mark.parametrize("kfac_like", [False, True])
def test_float64_array_hyperparameters_on_float32_factors(xp, kfac_like):
    """0-d float64 arrays for lr_cov and damping on float32 factors (the scalar factors of one
    update term are multiplied in the wider dtype first) give the Python floats' numbers."""
    floats = dict(lr_cov=0.05, damping=1e-3, kfac_like=kfac_like)
    arrays = {k: (xp.asarray(v, dtype=xp.float64) if k != "kfac_like" else v)
              for k, v in floats.items()}
    want = _steps(xp, singd(**floats), xp.float32)
    got = _steps(xp, singd(**arrays), xp.float32)
    for g, w in zip(got[:2], want[:2]):
        assert_close(g, w, **tol(xp, xp.float32))


def test_sym_cost_worked_values():
    """The multiply-adds of the symmetric product relative to the plain one: 1 below the split,
    3/4 for one level, 1/4 + 1/2 · 3/4 = 5/8 for two."""
    ms = importlib.import_module("maccore.singd")
    k = ms._SYM_SPLIT
    assert ms._sym_cost(k - 1) == 1.0
    assert ms._sym_cost(k) == 0.75
    assert ms._sym_cost(2 * k) == 0.625
    assert ms._sym_cost(4 * k) == 0.25 + 0.5 * 0.625


def test_hyperparameter_ranges(xp):
    """alpha1 ∈ [0, 1), lr_cov ≥ 0 and damping ≥ 0, numbers or 0-d arrays (damping 0 is allowed:
    SINGD's factors carry no inverse that it would make singular)."""
    singd(damping=0.0)
    singd(damping=xp.asarray(0.0, dtype=xp.float64), lr_cov=xp.asarray(0.0, dtype=xp.float64))
    for a in (1.0, 1.5, xp.asarray(1.0, dtype=xp.float64)):
        with pytest.raises(ValueError, match=r"alpha1 must lie in \[0, 1\)"):
            singd(alpha1=a)
    for name in ("alpha1", "lr_cov", "damping"):
        with pytest.raises(ValueError, match=f"{name} must be non-negative and finite"):
            singd(**{name: xp.asarray(-0.25, dtype=xp.float64)})



@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_to_dense_in_the_factors_dtype(xp, dt):
    """to_dense is (C Cᵀ) ⊗ (K Kᵀ) in the factors' dtype (float32 factors: a float32 matrix)."""
    dtype = getattr(xp, dt)
    pc = singd()
    rng = np.random.default_rng(4)
    state = pc.init(3, 2, xp=xp, dtype=dtype)
    state = pc.update(state, asarray(xp, rng.standard_normal((5, 3)), dtype),
                      asarray(xp, rng.standard_normal((5, 2)), dtype), reduction_factor=1.0)
    D = pc.to_dense(state)
    assert D.dtype == dtype
    K, C = to_numpy(state.K.to_dense()), to_numpy(state.C.to_dense())
    assert_close(D, np.kron(C @ C.T, K @ K.T), **tol(xp, dtype))


# ------------------------------------------------------------------------------------------------
# dense fast paths: symmetric block products, the Gram route of H_K, the cached C Cᵀ / K Kᵀ of apply


def test_sym_mm_equals_the_plain_product():
    """``_sym_mm`` (upper blocks mirrored, recursively) equals the plain product of a symmetric
    product to round-off, below, at and above the split size."""
    ms = importlib.import_module("maccore.singd")

    rng = np.random.default_rng(0)
    for d, n in ((7, 5), (ms._SYM_SPLIT, 3), (2 * ms._SYM_SPLIT + 3, 6)):
        X = rng.standard_normal((d, n))
        M = rng.standard_normal((n, n))
        M = M + M.T
        for Y in (X.T, M @ X.T):  # X Xᵀ, and X M Xᵀ as Kᵀ (A K)
            S = ms._sym_mm(np, X, Y)
            np.testing.assert_allclose(S, X @ Y, rtol=1e-10, atol=1e-10 * n)
            if d >= ms._SYM_SPLIT:  # the lower off-diagonal block is the mirrored upper one
                h = d // 2
                np.testing.assert_array_equal(S[h:, :h], S[:h, h:].T)


@pytest.mark.parametrize("R", [3, 40])  # R ≤ 2d̃: (KᵀX)(KᵀX)ᵀ; R > 2d̃: Kᵀ (X Xᵀ K)
def test_dense_from_inner_routes_match_float64_oracle(R):
    ms = importlib.import_module("maccore.singd")

    rng = np.random.default_rng(R)
    d = 9
    Km = np.eye(d) + 0.3 * rng.standard_normal((d, d))
    X = rng.standard_normal((d, R))
    K = structures.Dense(Km)
    np.testing.assert_allclose(ms._from_inner(K, X).mat, Km.T @ X @ X.T @ Km, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ms._from_inner(K).mat, Km.T @ Km, rtol=1e-12, atol=1e-12)
    D = structures.get("diagonal").eye(d, xp=np)  # other structures: their own from_inner
    np.testing.assert_allclose(ms._from_inner(D, X).diag, np.sum(X * X, axis=1), rtol=1e-12)


def _torch_or_skip():
    return pytest.importorskip("torch")


def _dense_state(torch, rng, dK, dC, steps=2):
    """A dense/dense state after ``steps`` updates (float64 torch), and the preconditioner."""
    pc = singd(structures=("dense", "dense"), alpha1=0.5, lr_cov=0.3, damping=1e-2)
    st_ = pc.init(dK, dC, xp=torch, dtype=torch.float64)
    for _ in range(steps):
        rows = torch.from_numpy(rng.standard_normal((16, dK)))
        g = torch.from_numpy(rng.standard_normal((16, dC)))
        st_ = pc.update(st_, rows, g, reduction_factor=1.0)
    return pc, st_


def _oracle_apply(state, G):
    K, C = state.K.mat.numpy(), state.C.mat.numpy()
    return C @ C.T @ G @ K @ K.T


def test_apply_with_cached_outer_products_matches_float64_oracle():
    """dK ≥ dC (C Cᵀ route) and dK < dC (K Kᵀ route): the cached products give the dense
    float64 oracle to round-off and the same bits as the first (uncached) apply."""
    torch = _torch_or_skip()
    ms = importlib.import_module("maccore.singd")

    rng = np.random.default_rng(1)
    for dK, dC in ((12, 5), (4, 11)):
        pc, state = _dense_state(torch, rng, dK, dC)
        assert ms._OuterCache.use(state.C, dK) == (dC <= dK)
        assert ms._OuterCache.use(state.K, dC) == (dK <= dC)
        G = rng.standard_normal((dC, dK))
        first = pc.apply(state, torch.from_numpy(G))
        for _ in range(3):
            again = pc.apply(state, torch.from_numpy(G))
            assert torch.equal(again, first)
        np.testing.assert_allclose(first.numpy(), _oracle_apply(state, G), rtol=1e-12, atol=1e-12)


def test_cached_outer_product_is_not_stale():
    """After a preconditioner update (a new factor) and after an in-place write to a factor, apply
    uses the new factor: the result equals the oracle of the current factors."""
    torch = _torch_or_skip()
    rng = np.random.default_rng(2)
    dK, dC = 12, 5  # C Cᵀ is cached
    pc, state = _dense_state(torch, rng, dK, dC)
    G = torch.from_numpy(rng.standard_normal((dC, dK)))
    old = pc.apply(state, G)
    rows = torch.from_numpy(rng.standard_normal((16, dK)))
    g = torch.from_numpy(rng.standard_normal((16, dC)))
    new_state = pc.update(state, rows, g, reduction_factor=1.0)
    new = pc.apply(new_state, G)
    np.testing.assert_allclose(new.numpy(), _oracle_apply(new_state, G.numpy()), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(new, old)
    # the old state is still served its own product
    assert torch.equal(pc.apply(state, G), old)
    # an in-place write to the factor: the kept C Cᵀ must not be used
    with torch.no_grad():
        new_state.C.mat.mul_(1.5)
    np.testing.assert_allclose(pc.apply(new_state, G).numpy(), _oracle_apply(new_state, G.numpy()),
                               rtol=1e-12, atol=1e-12)
    # an array whose id is reused after the factor is freed is not confused with it
    del state, new_state
    import gc

    gc.collect()
    pc2, st2 = _dense_state(torch, rng, dK, dC, steps=1)
    np.testing.assert_allclose(pc.apply(st2, G).numpy(), _oracle_apply(st2, G.numpy()), rtol=1e-12, atol=1e-12)


def test_outer_cache_entries_leave_with_their_factor():
    torch = _torch_or_skip()
    rng = np.random.default_rng(3)
    pc, state = _dense_state(torch, rng, 12, 5)
    cache = next(c.cell_contents for c in pc.apply.__closure__ if type(c.cell_contents).__name__ == "_OuterCache")
    pc.apply(state, torch.from_numpy(rng.standard_normal((5, 12))))
    assert len(cache.entries) == 1
    del state
    import gc

    gc.collect()
    assert len(cache.entries) == 0
