"""Fuzz the API (hypothesis): malformed and non-finite inputs to every public core function and to
each optimizer's construction and step (torch MAC/KFAC, jax mac/kfac).

The contract (docs/numerics.md): a call either succeeds or raises ``ValueError``, ``TypeError`` or
``maccore.DecompositionError`` whose message names the function, the argument or the layer — never
an ``AttributeError``, ``IndexError``, ``ZeroDivisionError`` or a backend's own error — and a
rejected call changes nothing: inputs are never mutated, optimizer states and parameters stay as
they were. Non-finite values are not errors for the stateless core functions (they propagate, or a
decomposition raises ``DecompositionError``); optimizer steps skip them (``on_nonfinite="skip"``,
state unchanged) or raise ``FloatingPointError`` (``"raise"``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import maccore

torch = pytest.importorskip("torch")

from tests.adapters import torch_helpers  # noqa: E402,F401  (adapter import path)

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import maccore_torch as mt  # noqa: E402

ALLOWED = (ValueError, TypeError, maccore.DecompositionError)


pytestmark = pytest.mark.usefixtures("one_torch_thread")
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# ---- values ---------------------------------------------------------------------------------------
DIMS = st.sampled_from([0, 1, 2, 3, 4, 5])
DTYPES = ["float32", "float32", "float64", "float16", "bfloat16", "int64", "bool", "complex64"]
SPECIALS = [np.nan, np.inf, -np.inf, 1e38, -0.0]


@st.composite
def arrays(draw, shape=None, max_rank=4):
    """An array of a random backend, shape and dtype, sometimes holding NaN/Inf/huge values."""
    if shape is None:
        rank = draw(st.integers(0, max_rank))
        shape = tuple(draw(DIMS) for _ in range(rank))
    dtype = draw(st.sampled_from(DTYPES))
    backend = draw(st.sampled_from(["numpy", "torch", "torch"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    a = rng.standard_normal(shape)
    if a.size and draw(st.booleans()):
        flat = a.reshape(-1)
        flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from(SPECIALS))
    if backend == "numpy":
        if dtype == "bfloat16":
            dtype = "float32"
        return a.astype(dtype) if dtype != "complex64" else (a + 1j).astype(np.complex64)
    t = torch.from_numpy(a)
    if dtype == "complex64":
        return torch.complex(t.float(), t.float())
    return t.to(getattr(torch, dtype))


JUNK = st.sampled_from([None, "abc", 1.5, 3, [[1.0, 2.0]], {"a": 1}, (1, 2), True])
ARG = st.one_of(arrays(), arrays(), arrays(), JUNK)
NUM = st.sampled_from([1.0, 0.5, 1e-3, 0, -1.0, np.nan, np.inf, "x", None, True, (0.1, 0.2),
                       (0.1,), (1, 2, 3), 1j, np.float32(0.3), np.ones(2), 3, [1, 2]])
INT = st.sampled_from([1, 2, 3, 0, -1, 2.5, "a", None, True, (1, 2), (1, 2, 3), ((1, 0), (0, 1)),
                       "same", "valid", "bogus"])
FLAG = st.sampled_from([True, False, None, "yes", 1, np.bool_(True)])
MODE = st.sampled_from(["reference", "inverse", "tikhonov", "pi", "exact", "per_head", "off",
                        "bogus", None, 3])


def _fit(shape):
    return arrays(shape=shape)


# ---- the functions ------------------------------------------------------------------------------
NPX = maccore._xp.namespace(x=np.ones(1))


def _spec():
    return st.sampled_from([
        maccore.LayerSpec(maccore.LayerKind.LINEAR, 3, 2, True),
        maccore.LayerSpec(maccore.LayerKind.CONV2D, 9, 2, False, conv=maccore.ConvSpec(3)),
        maccore.LayerSpec(maccore.LayerKind.CONV2D, 9, 2, False),
        None, "linear",
    ])


def _state(kind):
    if kind == "ema":
        return st.sampled_from([maccore.ema_init((3,), xp=NPX), None, np.ones(3), (1, 2)])
    if kind == "mac":
        return st.sampled_from([maccore.mac().init(3, 2, xp=NPX),
                                maccore.kfac().init(3, 2, xp=NPX), None])
    return st.sampled_from([maccore.kfac().init(3, 2, xp=NPX),
                            maccore.mac().init(3, 2, xp=NPX), None])


ANY = st.one_of(ARG, _fit((2, 3)), _fit((3,)), _fit((3, 3)), _fit((2, 2)))

CALLS = {
    "linear_rows": (lambda d: maccore.linear_rows(d.draw(ANY), bias=d.draw(FLAG),
                                                  reduce=d.draw(FLAG)), ["x", "bias", "reduce"]),
    "grad_rows": (lambda d: maccore.grad_rows(d.draw(ANY), reduce=d.draw(FLAG)), ["g", "reduce"]),
    "conv2d_rows": (lambda d: maccore.conv2d_rows(
        d.draw(st.one_of(ARG, _fit((2, 2, 5, 5)))), d.draw(INT), stride=d.draw(INT),
        padding=d.draw(INT), dilation=d.draw(INT), bias=d.draw(FLAG), reduce=d.draw(FLAG),
        groups=d.draw(INT)), ["x", "kernel_size", "stride", "padding", "dilation", "groups", "bias"]),
    "conv2d_mean_patch": (lambda d: maccore.conv2d_mean_patch(
        d.draw(st.one_of(ARG, _fit((2, 2, 5, 5)))), d.draw(INT), stride=d.draw(INT),
        padding=d.draw(INT), dilation=d.draw(INT), bias=d.draw(FLAG), groups=d.draw(INT)),
        ["x", "kernel_size", "stride", "padding", "dilation", "groups", "bias"]),
    "conv2d_output_size": (lambda d: maccore.conv2d_output_size(
        d.draw(st.sampled_from([(5, 5), (1, 1), 5, "a", (0, 0), (-1, 3)])), d.draw(INT),
        stride=d.draw(INT), padding=d.draw(INT), dilation=d.draw(INT)),
        ["hw", "kernel_size", "stride", "padding", "dilation"]),
    "conv2d_grad_rows": (lambda d: maccore.conv2d_grad_rows(
        d.draw(st.one_of(ARG, _fit((2, 3, 2, 2)))), reduce=d.draw(FLAG)), ["g", "reduce"]),
    "grad_matrix": (lambda d: maccore.grad_matrix(d.draw(ANY), d.draw(st.one_of(ANY, st.none()))),
                    ["grad_weight", "grad_bias"]),
    "split_grad_matrix": (lambda d: maccore.split_grad_matrix(
        d.draw(ANY), d.draw(st.sampled_from([(2, 3), (2, 2), (3,), (), (2, -3), (2, "a"), None, 3,
                                             (2, 1, 1, 1), (True, 2)])), bias=d.draw(FLAG)),
        ["mat", "weight_shape", "bias"]),
    "to_rows": (lambda d: maccore.to_rows(d.draw(_spec()), d.draw(st.one_of(ANY, _fit((1, 1, 4, 4)))),
                                          reduce=d.draw(FLAG)), ["spec", "x", "reduce"]),
    "to_grad_rows": (lambda d: maccore.to_grad_rows(d.draw(_spec()), d.draw(ANY),
                                                    reduce=d.draw(FLAG)), ["spec", "g", "reduce"]),
    "mean_activation": (lambda d: maccore.mean_activation(d.draw(ANY)), ["rows"]),
    "gradient_diagonal": (lambda d: maccore.gradient_diagonal(
        d.draw(ANY), reduction_factor=d.draw(st.one_of(NUM, st.none()))),
        ["grad_rows", "reduction_factor"]),
    "attention_probs": (lambda d: maccore.attention_probs(
        d.draw(st.one_of(ARG, _fit((1, 2, 3, 4)))), d.draw(st.one_of(ARG, _fit((1, 2, 3, 4)))),
        causal=d.draw(FLAG), mask=d.draw(st.one_of(st.none(), ARG, _fit((3, 3)), _fit((1, 1, 3, 3))))),
        ["q", "k", "mask", "causal"]),
    "split_qkv": (lambda d: maccore.split_qkv(d.draw(st.one_of(ARG, _fit((1, 2, 6)))), d.draw(INT)),
                  ["out", "num_heads"]),
    "attention_weighted_mean": (lambda d: maccore.attention_weighted_mean(
        d.draw(st.one_of(ARG, _fit((1, 3, 4)))), d.draw(st.one_of(ARG, _fit((1, 2, 3, 3)))),
        bias=d.draw(FLAG), mode=d.draw(MODE)), ["x", "attn", "bias", "mode"]),
    "mac_apply": (lambda d: maccore.mac_apply(
        d.draw(ANY), d.draw(ANY), d.draw(NUM), grad_diag=d.draw(st.one_of(st.none(), ANY, _fit((2,)))),
        scale=d.draw(MODE)), ["grad_mat", "mean", "damping", "grad_diag", "scale"]),
    "input_factor": (lambda d: maccore.input_factor(d.draw(ANY)), ["rows"]),
    "gradient_factor": (lambda d: maccore.gradient_factor(
        d.draw(ANY), reduction_factor=d.draw(NUM)), ["grad_rows", "reduction_factor"]),
    "pi_dampings": (lambda d: maccore.pi_dampings(d.draw(ANY), d.draw(ANY), d.draw(NUM)),
                    ["A", "G", "damping"]),
    "damped_inverse": (lambda d: maccore.damped_inverse(d.draw(ANY), d.draw(NUM), name="F"),
                       ["M", "damping", "F"]),
    "kfac_apply": (lambda d: maccore.kfac_apply(d.draw(ANY), d.draw(ANY), d.draw(ANY), d.draw(NUM),
                                                mode=d.draw(MODE)),
                   ["grad_mat", "A", "G", "damping", "mode"]),
    "kfac_dense": (lambda d: maccore.kfac_dense(d.draw(ANY), d.draw(ANY)), ["A", "G"]),
    "ema_init": (lambda d: maccore.ema_init(
        d.draw(st.sampled_from([(3,), (-1,), 3, None, ("a",), (2, 2)])),
        xp=d.draw(st.sampled_from([NPX, None, np, "numpy"]))), ["shape", "xp"]),
    "ema_update": (lambda d: maccore.ema_update(d.draw(_state("ema")), d.draw(ANY), decay=d.draw(NUM)),
                   ["state", "x", "decay"]),
    "ema_debiased": (lambda d: maccore.ema_debiased(d.draw(_state("ema")), decay=d.draw(NUM)),
                     ["state", "decay"]),
    "is_due": (lambda d: maccore.is_due(d.draw(st.sampled_from([0, 3, -1, np.int32(4), "a", 1.5])),
                                        d.draw(INT)), ["count", "period"]),
    "mac": (lambda d: maccore.mac(decay=d.draw(NUM), damping=d.draw(NUM), scale=d.draw(MODE),
                                  diagonal=d.draw(FLAG),
                                  diag_reduction_factor=d.draw(st.one_of(st.none(), NUM))),
            ["decay", "damping", "scale", "diagonal", "diag_reduction_factor"]),
    "kfac": (lambda d: maccore.kfac(decay=d.draw(NUM), damping=d.draw(NUM), mode=d.draw(MODE)),
             ["decay", "damping", "mode"]),
    "mac.init": (lambda d: maccore.mac().init(d.draw(INT), d.draw(INT), xp=NPX,
                                              heads=d.draw(st.one_of(st.none(), INT))),
                 ["d_tilde", "d_out", "heads"]),
    "kfac.init": (lambda d: maccore.kfac().init(d.draw(INT), d.draw(INT),
                                                xp=d.draw(st.sampled_from([NPX, None]))),
                  ["d_tilde", "d_out", "xp"]),
    "mac.update": (lambda d: maccore.mac().update(
        d.draw(_state("mac")), d.draw(st.one_of(st.none(), ANY)),
        mean=d.draw(st.one_of(st.none(), ANY, _fit((3,))))), ["state", "rows", "mean"]),
    "mac.apply": (lambda d: maccore.mac().apply(d.draw(_state("mac")), d.draw(ANY)),
                  ["state", "grad_mat"]),
    "kfac.update": (lambda d: maccore.kfac().update(
        d.draw(_state("kfac")), d.draw(st.one_of(st.none(), ANY)), d.draw(st.one_of(st.none(), ANY)),
        reduction_factor=d.draw(st.one_of(st.none(), NUM)), A=d.draw(st.one_of(st.none(), ANY)),
        G=d.draw(st.one_of(st.none(), ANY))),
        ["state", "rows", "grad_rows", "reduction_factor", "A", "G"]),
    "kfac.refresh": (lambda d: maccore.kfac(mode=d.draw(st.sampled_from(["tikhonov", "exact"]))).refresh(
        d.draw(_state("kfac"))), ["state"]),
    "kfac.apply": (lambda d: maccore.kfac().apply(d.draw(_state("kfac")), d.draw(ANY)),
                   ["state", "grad_mat"]),
    "ConvSpec": (lambda d: maccore.ConvSpec(d.draw(INT), stride=d.draw(INT), padding=d.draw(INT),
                                            dilation=d.draw(INT), groups=d.draw(INT)),
                 ["kernel_size", "stride", "padding", "dilation", "groups"]),
    "QkvSpec": (lambda d: maccore.QkvSpec(d.draw(INT), mode=d.draw(MODE), causal=d.draw(FLAG)),
                ["num_heads", "mode"]),
}


def _informative(msg: str, fn: str, args: list[str]) -> bool:
    words = [fn.split(".")[0], *args, "ConvSpec", "QkvSpec", "LayerSpec"]
    return len(msg) > 20 and any(w in msg for w in words)


def _bits(x):
    """The bytes of an array (NaN-safe equality)."""
    if isinstance(x, np.ndarray):
        return x.reshape(-1).view(np.uint8).copy()
    if x.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    return x.detach().clone().reshape(-1).view(torch.uint8).clone()


class _Recorder:
    """Wraps hypothesis' ``data``; keeps the bytes of every drawn array to check none is mutated."""

    def __init__(self, data):
        self.data, self.drawn = data, []

    def draw(self, strategy):
        v = self.data.draw(strategy)
        if isinstance(v, (np.ndarray, torch.Tensor)):
            self.drawn.append((v, _bits(v)))
        return v


@pytest.mark.parametrize("name", list(CALLS))
@FUZZ
@given(data=st.data())
def test_core_functions_fail_only_with_clear_errors(name, data):
    fn, args = CALLS[name]
    rec = _Recorder(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy overflow/invalid warnings on non-finite inputs
        try:
            fn(rec)
        except ALLOWED as exc:
            assert _informative(str(exc), name, args), f"{name}: uninformative {type(exc).__name__}: {exc}"
    for orig, bits in rec.drawn:  # no input was mutated
        now = _bits(orig)
        assert (now == bits).all() if isinstance(now, np.ndarray) else torch.equal(now, bits)


def test_no_input_is_mutated():
    """The stateful core functions are pure: the old state and the inputs are unchanged."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5, 3)).astype(np.float32)
    g = rng.standard_normal((2, 3)).astype(np.float32)
    keep = rows.copy(), g.copy()
    for pc, upd in ((maccore.mac(diagonal=True), dict(rows=rows, grad_rows=rng.standard_normal((5, 2)))),
                    (maccore.kfac(), dict(rows=rows, grad_rows=rng.standard_normal((5, 2)),
                                          reduction_factor=0.2))):
        st0 = pc.init(3, 2, xp=NPX)
        flat0 = {k: v.copy() for k, v in maccore.checkpoint.flatten_state(st0)[0].items()}
        st1 = pc.refresh(pc.update(st0, **upd))
        pc.apply(st1, g)
        for k, v in maccore.checkpoint.flatten_state(st0)[0].items():
            np.testing.assert_array_equal(v, flat0[k])
    np.testing.assert_array_equal(rows, keep[0])
    np.testing.assert_array_equal(g, keep[1])


# ---- torch optimizers -------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.ln = nn.LayerNorm(3)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.ln(torch.relu(self.conv(x)).mean(dim=(2, 3))))


OPT_ARGS = st.fixed_dictionaries({}, optional={
    "lr": NUM, "momentum": NUM, "weight_decay": NUM, "stat_decay": NUM, "damping": NUM,
    "t_cov": INT, "t_inv": INT, "nesterov": FLAG,
    "weight_decay_mode": st.sampled_from(["coupled", "decoupled", "bogus", None]),
    "on_nonfinite": st.sampled_from(["skip", "raise", None, "ignore", 3]),
    "grad_scaler": st.sampled_from([None, "scaler", 3]),
    "skip_layers": st.sampled_from([None, ["fc"], ["nope"], "fc"]),
})
MAC_ARGS = st.fixed_dictionaries({}, optional={"scale": MODE, "diagonal": FLAG})
KFAC_ARGS = st.fixed_dictionaries({}, optional={
    "damping_mode": MODE, "kfac_approx": st.sampled_from(["expand", "reduce", "sideways", None]),
    "loss_average": st.sampled_from(["batch", "batch+sequence", None, "tokens"]),
    "reduction_factor": st.one_of(st.none(), NUM),
})
CTOR_WORDS = ["lr", "momentum", "weight_decay", "decay", "damping", "t_cov", "t_inv", "nesterov",
              "weight_decay_mode", "on_nonfinite", "grad_scaler", "skip_layers", "submodule", "scale",
              "diagonal", "mode", "kfac_approx", "KFACType", "loss_average", "reduction_factor",
              "period"]


@pytest.mark.parametrize("method", ["MAC", "KFAC"])
@FUZZ
@given(common=OPT_ARGS, mac_kw=MAC_ARGS, kfac_kw=KFAC_ARGS)
def test_torch_constructor_arguments(method, common, mac_kw, kfac_kw):
    kw = dict(common, **(mac_kw if method == "MAC" else kfac_kw))
    if kw.get("grad_scaler") == "scaler":
        kw["grad_scaler"] = torch.amp.GradScaler("cpu")
    try:
        opt = getattr(mt, method)(Net(), **kw)
    except ALLOWED as exc:
        assert any(w in str(exc) for w in CTOR_WORDS), f"uninformative: {exc!r}"
        return
    assert isinstance(opt, mt.CurvatureOptimizer)


def _flat(opt):
    pre = opt.preconditioner
    out = [pre.t] + [l.updates for l in pre.layers]
    for l in pre.layers:
        out += list(maccore.checkpoint.flatten_state(l.state)[0].values())
    for g in opt.param_groups:
        for p in g["params"]:
            out.append(p.detach().clone())
            b = opt.state[p].get("momentum_buffer")
            out.append(None if b is None else b.clone())
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


CORRUPT = st.fixed_dictionaries({
    "where": st.sampled_from(["input", "grad", "extra_forward", "loss", "none"]),
    "value": st.sampled_from([np.nan, np.inf, -np.inf]),
    "index": st.integers(0, 10_000),
    "mode": st.sampled_from(["skip", "raise"]),
    "warm": st.integers(0, 3),
})


@pytest.mark.parametrize("method", ["MAC", "SMAC", "KFAC"])
@FUZZ
@given(c=CORRUPT)
def test_torch_step_with_corrupted_values(method, c):
    torch.manual_seed(0)
    model = Net()
    kw = dict(lr=0.05, t_cov=1, t_inv=2, on_nonfinite=c["mode"])
    opt = (mt.KFAC(model, damping=0.1, **kw) if method == "KFAC"
           else mt.MAC(model, diagonal=method == "SMAC", **kw))
    g = torch.Generator().manual_seed(1)
    for _ in range(c["warm"]):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(5, 2, 4, 4, generator=g)), torch.randint(0, 4, (5,), generator=g)).backward()
        opt.step()
    before = _flat(opt)
    x, y = torch.randn(5, 2, 4, 4, generator=g), torch.randint(0, 4, (5,), generator=g)
    opt.zero_grad()
    if c["where"] == "input":
        x.view(-1)[c["index"] % x.numel()] = c["value"]
    loss = F.cross_entropy(model(x), y)
    if c["where"] == "loss":
        loss = loss * c["value"]
    loss.backward()
    if c["where"] == "grad":
        ps = [p for p in model.parameters()]
        p = ps[c["index"] % len(ps)]
        p.grad.view(-1)[c["index"] % p.numel()] = c["value"]
    if c["where"] == "extra_forward":
        xe = x.clone()
        xe.view(-1)[c["index"] % xe.numel()] = c["value"]
        model(xe)
    bad = c["where"] != "none"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if bad and c["mode"] == "raise":
            with pytest.raises(FloatingPointError, match="non-finite"):
                opt.step()
        else:
            opt.step()
    if bad:
        _same(_flat(opt), before)
    else:
        assert opt.t == before[0] + 1
    for p in model.parameters():
        assert torch.isfinite(p).all()


# ---- jax transformations ---------------------------------------------------------------------------
def _jax():
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    from tests.adapters import _jax_common  # noqa: F401

    import jax
    import jax.numpy as jnp

    import maccore_jax as mj

    return jax, jnp, mj


JAX_ARGS = st.fixed_dictionaries({}, optional={
    "momentum": NUM, "weight_decay": NUM, "stat_decay": NUM, "damping": NUM, "t_cov": INT,
    "t_inv": INT, "nesterov": FLAG, "on_nonfinite": st.sampled_from(["skip", "raise", None, "ignore"]),
    "layout": st.sampled_from(["flax", "equinox", "torch"]),
})


@pytest.mark.parametrize("method", ["mac", "kfac"])
@FUZZ
@given(kw=JAX_ARGS, extra=st.fixed_dictionaries({}, optional={
    "scale": MODE, "damping_mode": MODE, "kfac_approx": st.sampled_from(["expand", "reduce", "x"]),
    "reduction_factor": NUM}))
def test_jax_constructor_arguments(method, kw, extra):
    jax, jnp, mj = _jax()
    kw = dict(kw)
    if method == "mac":
        kw.update({k: v for k, v in extra.items() if k == "scale"})
    else:
        kw.update({k: v for k, v in extra.items() if k != "scale"})
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    try:
        tx = getattr(mj, method)(0.1, **kw)
        tx.init(params)
    except ALLOWED as exc:
        assert any(w in str(exc) for w in CTOR_WORDS + ["layout"]), f"uninformative: {exc!r}"


JAX_BAD = st.sampled_from([
    "missing_layer", "extra_layer", "wrong_width", "wrong_rank", "not_array", "none", "int_dtype",
    "nan_act", "inf_grad", "grad_shape", "grad_int", "missing_grad_leaf", "nan_gout", "gout_shape",
    "ok",
])


_JAX_CASES: dict = {}


def _jax_case(method):
    """(tx, params, eager update, jitted update), built once per method (jit caches by input tree)."""
    if method not in _JAX_CASES:
        jax, jnp, mj = _jax()
        rng = np.random.default_rng(0)
        params = {"Dense_0": {"kernel": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32),
                              "bias": jnp.zeros(5, jnp.float32)},
                  "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)}}
        tx = (mj.mac(0.1, t_cov=1, t_inv=1) if method == "mac"
              else mj.kfac(0.1, reduction_factor=0.25, t_cov=1, t_inv=1, damping=0.1))

        def upd(g, s, a, go):
            return tx.update(g, s, params, activations=a, output_grads=go)

        _JAX_CASES[method] = (tx, params, upd, jax.jit(upd))
    return _JAX_CASES[method]


@pytest.mark.parametrize("method", ["mac", "kfac"])
@settings(FUZZ, max_examples=30)
@given(bad=JAX_BAD, jit=st.booleans())
def test_jax_update_with_malformed_inputs(method, bad, jit):
    jax, jnp, mj = _jax()
    tx, params, upd, jupd = _jax_case(method)
    rng = np.random.default_rng(0)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1, jnp.float32), params)
    acts = {"Dense_0": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32),
            "Dense_1": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)}
    gouts = {"Dense_0": jnp.full((4, 5), 0.1, jnp.float32), "Dense_1": jnp.full((4, 3), 0.1, jnp.float32)}
    if bad == "missing_layer":
        del acts["Dense_1"]
    elif bad == "extra_layer":
        acts["Dense_2"] = acts["Dense_1"]
    elif bad == "wrong_width":
        acts["Dense_1"] = jnp.ones((4, 7))
    elif bad == "wrong_rank":
        acts["Dense_0"] = jnp.ones(())
    elif bad == "not_array":
        acts["Dense_0"] = [[1.0, 2.0, 3.0, 4.0]]
    elif bad == "none":
        acts = None
    elif bad == "int_dtype":
        acts["Dense_0"] = jnp.ones((4, 4), jnp.int32)
    elif bad == "nan_act":
        acts["Dense_1"] = acts["Dense_1"].at[0, 0].set(jnp.nan)
    elif bad == "inf_grad":
        grads["Dense_1"]["kernel"] = grads["Dense_1"]["kernel"].at[1, 1].set(jnp.inf)
    elif bad == "grad_shape":
        grads["Dense_1"]["kernel"] = jnp.ones((5, 4))
    elif bad == "grad_int":
        grads["Dense_0"]["bias"] = jnp.ones(5, jnp.int32)
    elif bad == "missing_grad_leaf":
        del grads["Dense_0"]["bias"]
    elif bad == "nan_gout":
        gouts["Dense_0"] = gouts["Dense_0"].at[2, 2].set(jnp.nan)
    elif bad == "gout_shape":
        gouts["Dense_0"] = jnp.ones((4, 6))

    fn = jupd if jit and bad not in ("not_array", "none") else upd
    before = jax.tree.map(np.asarray, state)
    try:
        u, new = fn(grads, state, acts, gouts)
    except ALLOWED as exc:
        msg = str(exc)
        assert any(w in msg for w in ["Dense_0", "Dense_1", "Dense_2", "activations", "output_grads",
                                      "layers", "grad", "tree", "structure"]), f"uninformative: {msg}"
        return
    if bad in ("nan_act", "inf_grad") or (bad == "nan_gout" and method == "kfac"):
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(new)):
            np.testing.assert_array_equal(a, np.asarray(b))
        assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u))
    else:  # MAC does not read output gradients
        ignored = ("nan_gout", "gout_shape") if method == "mac" else ()
        assert bad in ("ok", "int_dtype", *ignored), f"{bad} was accepted"
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
