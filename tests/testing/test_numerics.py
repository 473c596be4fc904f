"""maccore.testing's dense damped inverses against a 60-digit mpmath reference: every documented
error bound holds on ill-conditioned inputs (docs/math.md, P-K11 and M-P1 references), and
π-damping follows its definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings

import maccore
from maccore import testing
from maccore.testing import strategies as mst

mp = pytest.importorskip("mpmath")
DPS = 60


def _mp(M):
    """Exact float64 → mpmath matrix (every float64 is an mpf exactly)."""
    M = np.atleast_2d(np.asarray(M, np.float64))
    return mp.matrix([[mp.mpf(float(v)) for v in row] for row in M])


def _rel_fro(X, R) -> float:
    """‖X − R‖_F / ‖R‖_F with X float64, R an mpmath matrix (exact subtraction at 60 digits)."""
    X = np.atleast_2d(X)
    num = mp.mpf(0)
    den = mp.mpf(0)
    for i in range(R.rows):
        for j in range(R.cols):
            d = mp.mpf(float(X[i, j])) - R[i, j]
            num += d * d
            den += R[i, j] * R[i, j]
    return float(mp.sqrt(num / den))


def _damped(M, lam):
    n = M.shape[0]
    return _mp(M) + mp.mpf(float(lam)) * mp.eye(n)


def _ill_conditioned(rng, n, log_span):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = 10.0 ** rng.uniform(-log_span, 3, n)
    M = (q * w) @ q.T
    return (M + M.T) / 2


CASES = [(seed, n, span, lam) for seed, (n, span, lam) in enumerate(
    [(3, 14, 1e-6), (5, 12, 1e-4), (6, 10, 1e-2), (4, 16, 1.0), (7, 8, 1e2), (2, 15, 1e-6), (8, 13, 3e-5)])]


@pytest.mark.parametrize("seed,n,span,lam", CASES)
def test_dense_damped_inverse_meets_its_bound(seed, n, span, lam):
    with mp.workdps(DPS):
        M = _ill_conditioned(np.random.default_rng(seed), n, span)
        X = testing.dense_damped_inverse(M, lam)
        truth = _damped(M, lam) ** -1
        err = _rel_fro(X, truth)
        bound = testing.inverse_error_bound(M, lam)
        assert err <= bound, (err, bound)
        rhs = np.random.default_rng(seed + 100).standard_normal((n, 2))
        x = testing.dense_damped_solve(M, rhs, lam)
        assert _rel_fro(x, truth * _mp(rhs)) <= bound


@pytest.mark.parametrize("lam", [1e-6, 1e-3, 1.0, 1e2])
@pytest.mark.parametrize("mean_scale", [1e-2, 1.0, 1e3])
def test_mac_dense_preconditioner_meets_its_bound_where_inv_fails(lam, mean_scale):
    """The closed form stays at ~d·ε even when ‖ā‖²/λ = 1e12, where inverting the formed matrix
    ``ââᵀ + λI`` loses up to κ·ε (the old oracle)."""
    rng = np.random.default_rng(int(lam * 1e6) % 97 + int(mean_scale))
    a = mean_scale * (rng.standard_normal(7) + 3.0)
    with mp.workdps(DPS):
        am = _mp(a.reshape(-1, 1))
        exact = am * am.T + mp.mpf(lam) * mp.eye(7)
        truth = exact ** -1
        for scale, ref in (("reference", truth * mp.mpf(lam)), ("inverse", truth)):
            P = testing.mac_dense_preconditioner(a, lam, scale=scale)
            assert _rel_fro(P, ref) <= testing.mac_error_bound(a)
        # and maccore.mac_apply (rank-1, the code under test) agrees within the same order
        g = rng.standard_normal((3, 7))
        got = maccore.mac_apply(g, a, lam)
        want = truth * mp.mpf(lam)
        assert _rel_fro(got, _mp(g) * want) <= 1e3 * testing.mac_error_bound(a) * max(1.0, float(np.abs(g).max()))


@pytest.mark.parametrize("mode", ["tikhonov", "pi", "exact"])
def test_kfac_damped_solve_meets_its_bound(mode):
    rng = np.random.default_rng(3)
    A = _ill_conditioned(rng, 4, 9)
    G = _ill_conditioned(rng, 3, 6) * 1e-4
    grad = rng.standard_normal((3, 4))
    lam = 1e-3
    with mp.workdps(DPS):
        K = testing.kfac_damped_matrix(A, G, lam, mode=mode)
        # the matrix itself from its definition at 60 digits
        if mode == "exact":
            Km = _mp(np.kron(G, A)) + mp.mpf(lam) * mp.eye(12)
        else:
            la, lg = testing.pi_dampings(A, G, lam) if mode == "pi" else (lam, lam)
            Gm = _mp(G) + mp.mpf(lg) * mp.eye(3)
            Am = _mp(A) + mp.mpf(la) * mp.eye(4)
            Km = mp.matrix(12, 12)
            for i in range(3):
                for j in range(3):
                    for k in range(4):
                        for m_ in range(4):
                            Km[i * 4 + k, j * 4 + m_] = Gm[i, j] * Am[k, m_]
        assert _rel_fro(K, Km) <= 16 * 2.0**-53
        u = testing.kfac_damped_solve(grad, A, G, lam, mode=mode)
        truth = mp.lu_solve(Km, _mp(grad.reshape(-1, 1)))
        cond = testing.kfac_condition_number(A, G, lam, mode=mode)
        bound = 8 * 12 * 2.0**-53 * cond
        assert _rel_fro(u.reshape(-1, 1), truth) <= bound
        # the core's kfac_apply (eigen / Cholesky route) is within the dtype-and-κ tolerance
        testing.assert_curvature_close(maccore.kfac_apply(grad, A, G, lam, mode=mode), u,
                                       dtype="float64", cond=cond)


def test_pi_dampings_from_the_definition():
    rng = np.random.default_rng(0)
    A = _ill_conditioned(rng, 5, 3)
    G = _ill_conditioned(rng, 3, 3) * 1e-3
    lam = 0.2
    la, lg = testing.pi_dampings(A, G, lam)
    pi = math.sqrt((np.trace(A) / 5) / (np.trace(G) / 3))
    assert la == pytest.approx(pi * math.sqrt(lam), rel=1e-14)
    assert lg == pytest.approx(math.sqrt(lam) / pi, rel=1e-14)
    assert la * lg == pytest.approx(lam, rel=1e-14)
    # the core's split is the same
    from maccore.kfac import pi_dampings as core_pi_dampings

    cla, clg = core_pi_dampings(A, G, lam)
    assert float(cla) == pytest.approx(la, rel=1e-12) and float(clg) == pytest.approx(lg, rel=1e-12)
    # guard: a zero trace gives the equal split
    assert testing.pi_dampings(A, np.zeros((3, 3)), 4.0) == (2.0, 2.0)


def test_inverse_rejects_indefinite_and_bad_damping():
    with pytest.raises(ValueError, match="not positive definite"):
        testing.dense_damped_inverse(-np.eye(3), 0.5)
    with pytest.raises(ValueError, match="damping"):
        testing.dense_damped_inverse(np.eye(3), -1.0)
    with pytest.raises(ValueError, match="square"):
        testing.dense_damped_inverse(np.ones((2, 3)), 1.0)
    assert testing.condition_number(np.diag([0.0, 1.0]), 0.0) == math.inf


@settings(max_examples=10, deadline=None, database=None)
@given(M=mst.spd_matrices(max_size=5), lam=mst.dampings())
def test_inverse_bound_property(M, lam):
    """Hypothesis over ill-conditioned PSD matrices (κ up to ~1e18) and dampings 1e-6…1e2."""
    with mp.workdps(DPS):
        X = testing.dense_damped_inverse(M, lam)
        assert _rel_fro(X, _damped(M, lam) ** -1) <= testing.inverse_error_bound(M, lam)


@settings(max_examples=10, deadline=None, database=None)
@given(acts=mst.activations(d=5, max_cond=1e8), lam=mst.dampings())
def test_mac_bound_property(acts, lam):
    a = acts.mean(axis=0)
    with mp.workdps(DPS):
        am = _mp(a.reshape(-1, 1))
        truth = (am * am.T + mp.mpf(lam) * mp.eye(5)) ** -1 * mp.mpf(lam)
        assert _rel_fro(testing.mac_dense_preconditioner(a, lam), truth) <= testing.mac_error_bound(a)
