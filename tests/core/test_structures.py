"""SINGD structures (docs/math.md, tests S-T3) against independent NumPy float64 oracles.

The oracle of every class is its *support mask* (which entries may be non-zero, written from the
index rules of the table in §5.5) plus, for Toeplitz classes, the tie classes (diagonals). The
projection oracle applies the rule stated under the table: mutual entries copied, one-sided entries
get ``S_ij + S_ji``, tied entries averaged.
"""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import is_jax_namespace
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from maccore import structures
from maccore.structures import toeplitz
from tests.conftest import asarray, assert_close, to_numpy, tol
from tests.core.helpers import xgiven

# (name, options) covering all ten classes (+ degenerate block/hierarchy sizes via random d)
SPECS: list[tuple[str, dict]] = [
    ("dense", {}),
    ("diagonal", {}),
    ("block_diagonal", {"block_size": 3}),
    ("hierarchical", {"k1": 2, "k2": 3}),
    ("tril_toeplitz", {}),
    ("triu_toeplitz", {}),
    ("tril_bottom_right_diag", {}),
    ("tril_top_left_diag", {}),
    ("triu_bottom_right_diag", {}),
    ("triu_top_left_diag", {}),
]
SPEC_IDS = [n for n, _ in SPECS]
# A few sizes hit every degenerate case (d < block, d % block == 0, d ≤ k1, k1 < d ≤ k1 + k2,
# d > k1 + k2) while keeping the number of distinct shapes small (JAX compiles per shape).
DIMS = (1, 2, 4, 6, 8)


# ------------------------------------------------------------------------------------------------
# NumPy float64 oracles (independent of maccore)


def hier_sizes(d: int, k1: int, k2: int) -> tuple[int, int, int]:
    if d <= k1:
        return d, 0, 0
    if d <= k1 + k2:
        return k1, 0, d - k1
    return k1, d - k1 - k2, k2


def support(name: str, opts: dict, d: int) -> np.ndarray:
    """Boolean ``[d, d]`` mask of the entries a member of the class may have non-zero."""
    i, j = np.indices((d, d))
    if name == "dense":
        return np.ones((d, d), bool)
    if name == "diagonal":
        return i == j
    if name == "block_diagonal":
        b = opts["block_size"]
        return (i // b) == (j // b)
    if name == "hierarchical":
        K1, dc, _ = hier_sizes(d, opts["k1"], opts["k2"])
        top = i < K1
        mid = (i >= K1) & (i < K1 + dc)
        bot = i >= K1 + dc
        return top | (mid & (i == j)) | (bot & (j >= K1))
    if name == "tril_toeplitz":
        return i >= j
    if name == "triu_toeplitz":
        return j >= i
    if name == "tril_bottom_right_diag":
        return (i == j) | (j == 0)
    if name == "tril_top_left_diag":
        return (i == j) | (i == d - 1)
    if name == "triu_bottom_right_diag":
        return (i == j) | (i == 0)
    if name == "triu_top_left_diag":
        return (i == j) | (j == d - 1)
    raise AssertionError(name)


def is_toeplitz(name: str) -> bool:
    return name.endswith("toeplitz")


def project(name: str, opts: dict, S: np.ndarray) -> np.ndarray:
    """Π(S) by the rule of docs/math.md (dense float64)."""
    d = S.shape[0]
    m = support(name, opts, d)
    P = np.where(m & m.T, S, np.where(m, S + S.T, 0.0))
    if is_toeplitz(name):
        i, j = np.indices((d, d))
        off = (i - j) if name == "tril_toeplitz" else (j - i)
        for k in range(d):
            sel = m & (off == k)
            P[sel] = P[sel].mean()
    return P


def random_member(
    name: str, opts: dict, d: int, rng: np.random.Generator, *, sym: bool
) -> np.ndarray:
    """A random member of the class; ``sym``: entries whose mirror is in the support are symmetric."""
    m = support(name, opts, d)
    if is_toeplitz(name):
        delta = rng.standard_normal(d)
        i, j = np.indices((d, d))
        off = np.abs(i - j)
        return np.where(m, delta[off], 0.0)
    R = rng.standard_normal((d, d))
    if sym:
        R = np.where(m & m.T, (R + R.T) / 2, R)
    return np.where(m, R, 0.0)


def num_params(name: str, opts: dict, d: int) -> int:
    if name == "dense":
        return d * d
    if name in ("diagonal", "tril_toeplitz", "triu_toeplitz"):
        return d
    if name == "block_diagonal":
        b = opts["block_size"]
        return (d // b) * b * b + (d % b) ** 2
    if name == "hierarchical":
        K1, dc, K2 = hier_sizes(d, opts["k1"], opts["k2"])
        return K1 * K1 + K1 * (dc + K2) + dc + K2 * dc + K2 * K2
    return 2 * d - 1


# ------------------------------------------------------------------------------------------------
# helpers


def stype(name: str, opts: dict) -> structures.StructureType:
    return structures.get(name, **opts)


def from_member(xp, dtype, name, opts, M: np.ndarray):
    """Library structure holding the symmetric-type member ``M`` via ``Π((M + Mᵀ)/2)``."""
    return stype(name, opts).from_dense(asarray(xp, (M + M.T) / 2, dtype))


def random_structure(xp, dtype, name, opts, d, rng):
    """A library structure with independent random parameters (general, non-symmetric member)."""
    Z = stype(name, opts).zeros(d, xp=xp, dtype=dtype)
    return type(Z)(*(asarray(xp, rng.standard_normal(tuple(p.shape)), dtype) for p in Z))


_JITTED: dict = {}


def run(xp, key, fn, *args):
    """``fn(*args)``; for JAX under ``jax.jit`` (structures are pytrees), compiled once per ``key``
    and shapes — this also checks that every operation traces."""
    if not is_jax_namespace(xp):
        return fn(*args)
    import jax

    if key not in _JITTED:
        _JITTED[key] = jax.jit(fn)
    return _JITTED[key](*args)


def dims_for(xp):
    """All degenerate sizes on eager backends; one size on JAX (XLA compiles per shape, slowly)."""
    return st.just(8) if is_jax_namespace(xp) else st.sampled_from(DIMS)


def ncols_for(xp):
    return st.just(3) if is_jax_namespace(xp) else st.sampled_from((1, 3))


seeds = st.integers(0, 2**32 - 1)


def sym_matrix(d: int):
    return hnp.arrays(np.float64, (d, d), elements=st.floats(-2, 2, width=64)).map(
        lambda a: (a + a.T) / 2
    )


# ------------------------------------------------------------------------------------------------
# S-T3: projection, round trip, identity, traces


@pytest.mark.parametrize(("name", "opts"), SPECS, ids=SPEC_IDS)
@xgiven(data=st.data())
def test_projection_matches_oracle(xp, dtype, name, opts, data):
    d = data.draw(dims_for(xp), label="d")
    S = data.draw(sym_matrix(d), label="S")
    T = stype(name, opts)

    def compute(S):
        P = T.from_dense(S)
        return P, P.to_dense(), P.average_trace()

    P, dense, avgtr = run(xp, ("proj", name), compute, asarray(xp, S, dtype))
    assert type(P) is T.cls
    assert P.dtype == dtype
    assert P.dim == d
    assert P.num_params == num_params(name, opts, d)
    assert_close(dense, project(name, opts, S), **tol(xp, dtype))
    assert_close(avgtr, np.trace(S) / d, **tol(xp, dtype))  # Π preserves the (average) trace


@pytest.mark.parametrize(("name", "opts"), SPECS, ids=SPEC_IDS)
@xgiven(data=st.data(), seed=seeds)
def test_roundtrip_and_identity(xp, dtype, name, opts, data, seed):
    d = data.draw(dims_for(xp), label="d")
    rng = np.random.default_rng(seed)
    M = random_member(name, opts, d, rng, sym=True)
    T = stype(name, opts)

    def compute(Msym, eye_dense):
        eye = T.eye(d, xp=xp, dtype=dtype)
        return {
            "roundtrip": T.from_dense(Msym).to_dense(),  # Π((M + Mᵀ)/2)
            "eye": eye.to_dense(),
            "eye_inner": eye.from_inner().to_dense(),  # Π(IᵀI)
            "proj_eye": T.from_dense(eye_dense).to_dense(),  # Π(I)
            "zeros": T.zeros(d, xp=xp, dtype=dtype).to_dense(),
        }

    out = run(
        xp,
        ("roundtrip", name, d, str(dtype)),
        compute,
        asarray(xp, (M + M.T) / 2, dtype),
        asarray(xp, np.eye(d), dtype),
    )
    t = tol(xp, dtype)
    assert_close(out["roundtrip"], M, **t)
    for what in ("eye", "eye_inner", "proj_eye"):
        assert_close(out[what], np.eye(d), err_msg=what, **t)
    assert_close(out["zeros"], np.zeros((d, d)), **t)
    assert out["eye"].dtype == dtype


# ------------------------------------------------------------------------------------------------
# products, inner products, scalar operations


def _products(K, M, X):
    return {
        "K": K.to_dense(),
        "M": M.to_dense(),
        "matmul": K.matmul(X),
        "matmul_op": K @ X,
        "rmatmat": K.rmatmat(X),
        "matvec": K.matmul(X[:, 0]),
        "KM": K @ M,
        "inner": K.from_inner(X),
        "inner_none": K.from_inner(),
    }


@pytest.mark.parametrize(("name", "opts"), SPECS, ids=SPEC_IDS)
@xgiven(data=st.data(), seed=seeds)
def test_products_against_dense(xp, dtype, name, opts, data, seed):
    d = data.draw(dims_for(xp), label="d")
    n = data.draw(ncols_for(xp), label="n")
    rng = np.random.default_rng(seed)
    K = random_structure(xp, dtype, name, opts, d, rng)
    M = random_structure(xp, dtype, name, opts, d, rng)
    X = rng.standard_normal((d, n))
    out = run(xp, "products", _products, K, M, asarray(xp, X, dtype))
    Kd, Md = to_numpy(out["K"]), to_numpy(out["M"])
    # to_dense of a random-parameter member respects the support
    assert np.all(Kd[~support(name, opts, d)] == 0)
    t = tol(xp, dtype)
    assert_close(out["matmul"], Kd @ X, **t)
    assert_close(out["matmul_op"], Kd @ X, **t)
    assert_close(out["rmatmat"], Kd.T @ X, **t)
    assert_close(out["matvec"], Kd @ X[:, 0], **t)  # 1-D right-hand side
    assert out["matmul"].dtype == dtype
    # structured @ structured stays in the class and equals the dense product
    assert type(out["KM"]) is type(K)
    assert_close(out["KM"].to_dense(), Kd @ Md, **t)
    # from_inner: Π(Kᵀ X Xᵀ K) and Π(KᵀK)
    H = out["inner"]
    assert type(H) is type(K) and H.dtype == dtype
    assert_close(H.to_dense(), project(name, opts, Kd.T @ X @ X.T @ Kd), **t)
    assert_close(out["inner_none"].to_dense(), project(name, opts, Kd.T @ Kd), **t)


def _scalars(K, M, c):
    return {
        "K": K.to_dense(),
        "M": M.to_dense(),
        "add": (K + M).to_dense(),
        "add_method": K.add(M).to_dense(),
        "sub": (K - M).to_dense(),
        "mul": (K * c).to_dense(),
        "mul_method": K.mul(c).to_dense(),
        "neg": (-K).to_dense(),
        "diag_add": K.diag_add(c).to_dense(),
        "average_trace": K.average_trace(),
        "max_abs": K.max_abs(),
        "frobenius_norm": K.frobenius_norm(),
        "mul_python": (2.5 * K).to_dense(),  # Python-number scalars
        "diag_add_int": K.diag_add(-1).to_dense(),
    }


@pytest.mark.parametrize(("name", "opts"), SPECS, ids=SPEC_IDS)
@xgiven(data=st.data(), seed=seeds, c=st.floats(-3, 3))
def test_scalar_operations(xp, dtype, name, opts, data, seed, c):
    d = data.draw(dims_for(xp), label="d")
    rng = np.random.default_rng(seed)
    K = random_structure(xp, dtype, name, opts, d, rng)
    M = random_structure(xp, dtype, name, opts, d, rng)
    out = run(xp, "scalars", _scalars, K, M, asarray(xp, np.asarray(c), dtype))
    Kd, Md = to_numpy(out["K"]), to_numpy(out["M"])
    c = float(to_numpy(asarray(xp, np.asarray(c), dtype)))  # c as rounded to dtype
    expect = {
        "add": Kd + Md,
        "add_method": Kd + Md,
        "sub": Kd - Md,
        "mul": c * Kd,
        "mul_method": c * Kd,
        "neg": -Kd,
        "diag_add": Kd + c * np.eye(d),
        "average_trace": np.trace(Kd) / d,
        "max_abs": np.abs(Kd).max(),
        "frobenius_norm": np.linalg.norm(Kd),
        "mul_python": 2.5 * Kd,
        "diag_add_int": Kd - np.eye(d),
    }
    for what, value in expect.items():
        assert_close(out[what], value, err_msg=what, **tol(xp, dtype))
        assert out[what].dtype == dtype, what


# ------------------------------------------------------------------------------------------------
# FFT path of the Toeplitz classes, dense fallback


def _toeplitz_ops(K, M, X):
    return {
        "K": K.to_dense(),
        "M": M.to_dense(),
        "matmul": K.matmul(X),
        "rmatmat": K.rmatmat(X),
        "KM": (K @ M).to_dense(),
        "inner": K.from_inner(X),
        "inner_none": K.from_inner().to_dense(),
    }


@pytest.mark.parametrize("name", ["tril_toeplitz", "triu_toeplitz"])
@pytest.mark.parametrize("fft_min_dim", [1, 10**9], ids=["fft", "dense"])
@xgiven(data=st.data(), seed=seeds)
def test_toeplitz_paths(xp, dtype, name, fft_min_dim, data, seed, monkeypatch):
    monkeypatch.setattr(toeplitz, "FFT_MIN_DIM", fft_min_dim)
    d = data.draw(st.just(33) if is_jax_namespace(xp) else st.sampled_from((1, 2, 7, 33)))
    n = data.draw(ncols_for(xp))
    rng = np.random.default_rng(seed)
    K = random_structure(xp, dtype, name, {}, d, rng)
    M = random_structure(xp, dtype, name, {}, d, rng)
    X = rng.standard_normal((d, n))
    out = run(xp, ("toeplitz", fft_min_dim), _toeplitz_ops, K, M, asarray(xp, X, dtype))
    Kd, Md = to_numpy(out["K"]), to_numpy(out["M"])
    t = tol(xp, dtype, factor=4.0)
    assert_close(out["matmul"], Kd @ X, **t)
    assert_close(out["rmatmat"], Kd.T @ X, **t)
    assert_close(out["KM"], Kd @ Md, **t)
    assert_close(out["inner"].to_dense(), project(name, {}, Kd.T @ X @ X.T @ Kd), **t)
    assert_close(out["inner_none"], project(name, {}, Kd.T @ Kd), **t)
    assert out["inner"].dtype == dtype and out["matmul"].dtype == dtype


def test_toeplitz_default_fft_large(xp):
    """d above the FFT threshold with the module defaults (float64; JAX runs the FFT path jitted
    in ``test_toeplitz_paths``)."""
    if is_jax_namespace(xp):
        pytest.skip("covered jitted by test_toeplitz_paths (eager XLA compiles are slow)")
    rng = np.random.default_rng(0)
    d = toeplitz.FFT_MIN_DIM + 7
    for name in ("tril_toeplitz", "triu_toeplitz"):
        K = random_structure(xp, xp.float64, name, {}, d, rng)
        Kd = to_numpy(K.to_dense())
        X = rng.standard_normal((d, 3))
        H = K.from_inner(asarray(xp, X))
        assert_close(H.to_dense(), project(name, {}, Kd.T @ X @ X.T @ Kd), rtol=1e-11, atol=1e-11)


# ------------------------------------------------------------------------------------------------
# memory, immutability, registry, errors


def test_memory_is_proportional_to_parameters():
    xp = np
    d = 200
    for name, opts in SPECS:
        K = stype(name, opts).eye(d, xp=xp)
        stored = sum(int(np.prod(p.shape)) for p in K)
        assert stored == num_params(name, opts, d)
        if name != "dense":
            assert stored <= 6 * d, (name, stored)  # never a dense d × d (hierarchical: (k1+k2+1)d)
    assert structures.get("block30diagonal").eye(d, xp=xp).num_params <= 31 * d
    assert structures.get("hierarchical15_15").eye(d, xp=xp).num_params <= 32 * d


def test_inputs_not_mutated():
    rng = np.random.default_rng(3)
    d = 7
    for name, opts in SPECS:
        S = rng.standard_normal((d, d))
        S = S + S.T
        X = rng.standard_normal((d, 2))
        S0, X0 = S.copy(), X.copy()
        K = stype(name, opts).from_dense(S)
        params0 = [np.array(p, copy=True) for p in K]
        K.from_inner(X)
        K.matmul(X)
        K.rmatmat(X)
        (K @ K).diag_add(1.0)
        K + K
        2.0 * K
        np.testing.assert_array_equal(S, S0)
        np.testing.assert_array_equal(X, X0)
        for p, p0 in zip(K, params0):
            np.testing.assert_array_equal(p, p0)


def test_registry_names_and_aliases():
    assert set(structures.names()) == {n for n, _ in SPECS}
    b30 = structures.get("block30diagonal")
    assert b30.cls is structures.BlockDiagonal and b30.options == {"block_size": 30}
    assert b30 == structures.get("block_diagonal", block_size=30)
    h = structures.get("hierarchical15_15")
    assert h.cls is structures.Hierarchical and h.options == {"k1": 15, "k2": 15}
    assert structures.get("triltoeplitz").cls is structures.TrilToeplitz
    assert structures.get("triutoeplitz").cls is structures.TriuToeplitz
    assert structures.get(h) is h
    # hierarchical15_15 sizes of the table: d ≤ 15, d ≤ 30, d > 30
    assert structures.hierarchical_sizes(10, 15, 15) == (10, 0, 0)
    assert structures.hierarchical_sizes(20, 15, 15) == (15, 0, 5)
    assert structures.hierarchical_sizes(40, 15, 15) == (15, 10, 15)
    B = structures.get("block30diagonal").eye(65, xp=np)
    assert B.blocks.shape == (2, 30, 30) and B.last.shape == (5, 5)


def test_errors():
    with pytest.raises(ValueError, match="unknown structure 'bogus'.*dense"):
        structures.get("bogus")
    with pytest.raises(ValueError, match="block_size"):
        structures.get("block_diagonal")
    with pytest.raises(ValueError, match="unexpected"):
        structures.get("dense", block_size=3)
    with pytest.raises(ValueError, match="positive integer"):
        structures.get("block_diagonal", block_size=0)
    with pytest.raises(ValueError, match=r"'S'.*\[3, 4\]"):
        structures.Dense.from_dense(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"'S'.*\[3\]"):
        structures.Diagonal.from_dense(np.zeros(3))
    K = structures.get("hierarchical2_2").eye(5, xp=np)
    with pytest.raises(ValueError, match=r"'X'.*\[5, n\].*\[4, 2\]"):
        K.matmul(np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"'X'.*\[6, 1\]"):
        K.from_inner(np.zeros((6, 1)))
    with pytest.raises(TypeError, match="Diagonal"):
        K @ structures.Diagonal.eye(5, xp=np)
    with pytest.raises(ValueError, match="parameter shapes"):
        structures.Dense.eye(3, xp=np) + structures.Dense.eye(4, xp=np)
    with pytest.raises(ValueError, match="positive integer"):
        structures.Dense.eye(0, xp=np)
    with pytest.raises(TypeError, match="scalar"):
        K.mul("2")


# ------------------------------------------------------------------------------------------------
# low precision and JAX pytrees


def _bf16_backends():
    out = []
    try:
        import torch

        out.append(pytest.param((torch, torch.bfloat16), id="torch"))
    except ImportError:  # pragma: no cover
        pass
    try:
        import jax.numpy as jnp

        out.append(pytest.param((jnp, jnp.bfloat16), id="jax"))
    except ImportError:  # pragma: no cover
        pass
    return out


def _bf16_ops(K, X):
    return {
        "K": K.to_dense(),
        "inner": K.from_inner(X),
        "inner_none": K.from_inner().to_dense(),
        "KK": (K @ K).to_dense(),
        "diag_add": K.diag_add(-1.0).to_dense(),
        "matmul": K.matmul(X),
        "rmatmat": K.rmatmat(X),
        "frobenius_norm": K.frobenius_norm(),
        "max_abs": K.max_abs(),
    }


@pytest.mark.parametrize("lib", _bf16_backends())
@pytest.mark.parametrize(("name", "opts"), SPECS, ids=SPEC_IDS)
def test_bfloat16_parameters(lib, name, opts):
    """bf16 parameters: every operation runs, stays bf16 and agrees with float64 to bf16 accuracy."""
    import array_api_compat

    mod, bf16 = lib
    xp = array_api_compat.array_namespace(mod.zeros(1))
    rng = np.random.default_rng(7)
    d = toeplitz.FFT_MIN_DIM + 6 if name.endswith("toeplitz") else 8  # Toeplitz: FFT path
    K = random_structure(xp, bf16, name, opts, d, rng)
    X = asarray(xp, rng.standard_normal((d, 5)), bf16)
    out = run(xp, ("bf16", name), _bf16_ops, K, X)
    Kd, Xd = to_numpy(out["K"]), to_numpy(X)  # the exact bf16 values, as float64
    expect = {
        "inner": project(name, opts, Kd.T @ Xd @ Xd.T @ Kd),
        "inner_none": project(name, opts, Kd.T @ Kd),
        "KK": Kd @ Kd,
        "diag_add": Kd - np.eye(d),
        "matmul": Kd @ Xd,
        "rmatmat": Kd.T @ Xd,
        "frobenius_norm": np.linalg.norm(Kd),
        "max_abs": np.abs(Kd).max(),
    }
    for what, value in expect.items():
        got = out[what].to_dense() if what == "inner" else out[what]
        assert out[what].dtype == bf16, what
        assert np.all(np.isfinite(to_numpy(got))), what
        assert_close(got, value, rtol=0.03, atol=0.03, err_msg=what)


def test_jax_pytree_roundtrip():
    """Structures are pytrees without registration (the jitted runs above rely on it)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    for name, opts in SPECS:
        K = stype(name, opts).eye(6, xp=jnp, dtype=jnp.float32)
        leaves, treedef = jax.tree_util.tree_flatten(K)
        assert len(leaves) == len(K._fields)
        assert all(isinstance(leaf, jax.Array) for leaf in leaves)
        back = jax.tree_util.tree_unflatten(treedef, leaves)
        assert type(back) is type(K) and back.dim == 6
