"""Training-loop features of the torch optimizers (issue 13): ``torch.compile(model)``, copies of
a hooked model (``copy.deepcopy`` — the EMA-model pattern —, ``pickle``, ``torch.save``) and
pickling / copying an optimizer (a clear ``TypeError``; checkpoints go through ``state_dict``).

Every trajectory is compared against the eager / uncopied one, and every test also checks that
statistics were really folded (the layers' ``updates`` counts), so none passes vacuously.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest

from tests.adapters.torch_helpers import params_of  # noqa: F401  (imports maccore_torch)

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import maccore_torch as mt  # noqa: E402
from maccore_torch.hooks import _CaptureHook, _InertHook  # noqa: E402

# t_cov / t_inv small enough that STEPS crosses several statistics and refresh boundaries
CONFIGS = {
    "MAC": (mt.MAC, dict(lr=0.05, t_cov=2, t_inv=3, damping=0.5)),
    "KFAC": (mt.KFAC, dict(lr=0.05, t_cov=2, t_inv=3, damping=0.1)),
    "SINGD": (mt.SINGD, dict(lr=0.05, T=2, damping=0.1, lr_cov=0.05)),
}
PRECONDITIONERS = {
    "MAC": (mt.MACPreconditioner, dict(t_cov=2, t_inv=3)),
    "KFAC": (mt.KFACPreconditioner, dict(t_cov=2, t_inv=3)),
    "SINGD": (mt.SINGDPreconditioner, dict(T=2)),
}
STEPS = 7
FOLDS = 4  # collecting steps among t = 0..6 with t_cov = T = 2: 0, 2, 4, 6


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _cnn(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return _CNN().to(dtype)


def _batches(model, n=STEPS, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (8, 2, 4, 4) if isinstance(model, _CNN) else (8, 4)
    return [(torch.randn(*shape, generator=g).to(dtype), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def _train(forward, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        opt.step()


def _make(name, model, **extra):
    cls, kw = CONFIGS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cls(model, **{**kw, **extra})


def _updates(opt):
    return [layer.updates for layer in opt.preconditioner.layers]


def _assert_same_run(m1, o1, m2, o2, *, rtol, atol):
    """Parameters, momenta and curvature states of two runs agree."""
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda s, n=n: f"{n}: {s}")
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["maccore"]["t"] == s2["maccore"]["t"]
    torch.testing.assert_close(s2["maccore"]["layers"], s1["maccore"]["layers"], rtol=rtol, atol=atol)
    torch.testing.assert_close(s2["state"], s1["state"], rtol=rtol, atol=atol)


def _compiled_graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    """Empty compile caches: dynamo reuses graphs across module instances of one structure, so
    a test's graph count (its proof that the forward was compiled) needs a clean start."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


# ---------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_compiled_model_matches_eager(name, net, fresh_dynamo):
    """``torch.compile(model)`` (aot_eager: dynamo + AOTAutograd, the parts that see the hooks)
    after the optimizer: same folds (4 in 7 steps, not 1 or 0 as before the fix), same trajectory
    as eager."""
    make = _mlp if net == "mlp" else _cnn
    eager = make()
    opt_e = _make(name, eager)
    data = _batches(eager)
    _train(eager, opt_e, data)
    assert _updates(opt_e) == [FOLDS] * len(opt_e.preconditioner.layers)

    model = make()
    opt = _make(name, model)
    compiled = torch.compile(model, backend="aot_eager")
    before = _compiled_graphs()
    _train(compiled, opt, data)
    assert _compiled_graphs() > before  # the forward really went through dynamo
    assert _updates(opt) == _updates(opt_e)
    # measured: bit-identical with torch 2.13 (aot_eager runs the same kernels as eager)
    _assert_same_run(eager, opt_e, model, opt, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_model_inductor_float64(name, fresh_dynamo):
    """The default backend (inductor, fused kernels) in float64: the trajectory equals eager to
    round-off; the optimizer is built on the compiled wrapper (names of the eager model)."""
    eager = _mlp(torch.float64)
    opt_e = _make(name, eager)
    data = _batches(eager, dtype=torch.float64)
    _train(eager, opt_e, data)

    model = _mlp(torch.float64)
    compiled = torch.compile(model)
    opt = _make(name, compiled)
    assert [l.name for l in opt.preconditioner.layers] == ["0", "2"]
    _train(compiled, opt, data)
    assert _updates(opt) == _updates(opt_e) == [FOLDS, FOLDS]
    # measured with torch 2.13 (CPU): max relative parameter difference <= 5e-16
    _assert_same_run(eager, opt_e, model, opt, rtol=1e-11, atol=1e-12)


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.mha(h, h, h)[0].mean(1))


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("MAC", {"diagonal": True}), ("MAC", {}), ("KFAC", {})],
                         ids=["SMAC", "MAC", "KFAC"])
def test_compiled_attention_and_smac_match_eager(name, extra, fresh_dynamo):
    """``nn.MultiheadAttention`` (probabilities recomputed in the hook) and SMAC's gradient
    diagonal (tensor hooks on the outputs) under compile: same folds, same trajectory."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 5, 4, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(5)]
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = _Attn()
        opt = _make(name, model, **extra)
        _train(torch.compile(model, backend="aot_eager") if compiled else model, opt, data)
        runs.append((model, opt))
    (m_e, o_e), (m_c, o_c) = runs
    assert len(o_e.preconditioner.layers) >= 3
    assert _updates(o_c) == _updates(o_e) == [3] * len(o_e.preconditioner.layers)  # t = 0, 2, 4
    _assert_same_run(m_e, o_e, m_c, o_c, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compiled_wrapper_names_and_checkpoint_match_eager(fresh_dynamo):
    """An optimizer built on ``torch.compile(model)`` names its layers as the eager model does, so
    its state_dict loads into an eager optimizer; ``fit_first_layer`` works through the wrapper."""
    model = _mlp()
    compiled = torch.compile(model, backend="aot_eager")
    opt = _make("MAC", compiled)
    assert [l.name for l in opt.preconditioner.layers] == ["0", "2"]
    data = _batches(model, n=3)
    opt.fit_first_layer([x for x, _ in data])
    _train(compiled, opt, data)
    assert _updates(opt)[1] == 2  # t = 0, 2 (the first layer has its fixed inverse)
    twin = _mlp()
    twin.load_state_dict(model.state_dict())
    opt_t = _make("MAC", twin)
    opt_t.load_state_dict(copy.deepcopy(opt.state_dict()))  # (torch shares momentum buffers)
    more = _batches(model, n=3, seed=5)
    _train(compiled, opt, more)
    _train(twin, opt_t, more)
    _assert_same_run(model, opt, twin, opt_t, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_add_param_group_after_compile_is_seen(fresh_dynamo):
    """Layers added (``add_param_group``) after the model was compiled are captured: the hooks'
    epoch guard makes dynamo retrace (dynamo does not guard on hook dictionaries)."""
    runs = []
    for compiled in (False, True):
        model = _mlp()
        opt = _make("KFAC", model, params=list(model[0].parameters()))
        fwd = torch.compile(model, backend="aot_eager") if compiled else model
        data = _batches(model)
        _train(fwd, opt, data[:3])
        opt.add_param_group({"params": list(model[2].parameters())})
        _train(fwd, opt, data[3:])
        runs.append((model, opt))
    (m_e, o_e), (m_c, o_c) = runs
    assert _updates(o_e) == _updates(o_c) == [4, 2]  # layer "2" folded at t = 4, 6
    _assert_same_run(m_e, o_e, m_c, o_c, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_model_compiled_before_the_optimizer_warns_then_reset_fixes_it(fresh_dynamo):
    """A model compiled AND run before the optimizer existed keeps a graph without the hooks:
    the collecting step warns (never silently folds nothing); ``torch.compiler.reset()``
    recompiles with the hooks."""
    model = _mlp()
    compiled = torch.compile(model, backend="aot_eager")
    data = _batches(model)
    compiled(data[0][0]).sum().backward()  # compiled (and cached) without any hook
    model.zero_grad()
    opt = _make("MAC", model)
    with pytest.warns(RuntimeWarning, match="none of the preconditioner's hooks ran"):
        _train(compiled, opt, data[:1])
    assert _updates(opt) == [0, 0]
    torch.compiler.reset()
    _train(compiled, opt, data[1:4])  # t = 1, 2, 3: folds at t = 2
    assert _updates(opt) == [1, 1]


@pytest.mark.slow
def test_hookless_instance_of_the_class_compiled_first_warns_and_hook_guards_fix_it(fresh_dynamo):
    """Another instance of the model's class, without hooks (a baseline / teacher), compiled and
    run first: dynamo reuses its graph for the hooked model (no guard on module hooks by default),
    so the collecting step warns instead of silently folding nothing; with
    ``skip_nnmodule_hook_guards = False`` each instance gets its own graph and statistics."""
    other = _cnn(seed=1)
    data = _batches(other)
    torch.compile(other, backend="aot_eager")(data[0][0]).sum().backward()
    model = _cnn()
    opt = _make("MAC", model)
    with pytest.warns(RuntimeWarning, match="skip_nnmodule_hook_guards = False"):
        _train(torch.compile(model, backend="aot_eager"), opt, data[:1])
    assert _updates(opt) == [0, 0]
    torch.compiler.reset()
    old = torch._dynamo.config.skip_nnmodule_hook_guards
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    try:
        other2 = _cnn(seed=1)
        torch.compile(other2, backend="aot_eager")(data[0][0]).sum().backward()
        model2 = _cnn()
        opt2 = _make("MAC", model2)
        _train(torch.compile(model2, backend="aot_eager"), opt2, data[:3])  # t = 0, 1, 2
        assert _updates(opt2) == [2, 2]
    finally:
        torch._dynamo.config.skip_nnmodule_hook_guards = old


# ---------------------------------------------------------------------------------- model copies
@pytest.mark.parametrize("name", list(CONFIGS))
def test_deepcopy_of_a_hooked_model_is_inert(name):
    """The EMA-model pattern: ``copy.deepcopy(model)`` while the optimizer's hooks are attached.
    The copy runs forward/backward (training mode, collecting steps) without error and feeds
    nothing into the optimizer: its trajectory equals a run without the copy, bit for bit."""
    ref = _mlp()
    opt_r = _make(name, ref)
    data = _batches(ref)
    _train(ref, opt_r, data)

    model = _mlp()
    opt = _make(name, model)
    hooks = [h for m in model.modules() for h in m._forward_hooks.values()]
    assert hooks and all(isinstance(h, _CaptureHook) for h in hooks)
    ema = None
    for i, (x, y) in enumerate(data):
        if i == 1:
            ema = copy.deepcopy(model)
            copies = [h for m in ema.modules() for h in m._forward_hooks.values()]
            assert copies and all(isinstance(h, _InertHook) for h in copies)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if ema is not None:  # extra forwards/backwards of the copy in the middle of a step
            F.cross_entropy(ema(x), y).backward()
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.mul_(0.9).add_(p, alpha=0.1)
        opt.step()
    assert _updates(opt) == _updates(opt_r) == [FOLDS, FOLDS]
    _assert_same_run(ref, opt_r, model, opt, rtol=0, atol=0)
    # the copy takes its own optimizer, which sees only the copy's forwards
    opt_ema = _make(name, ema)
    _train(ema, opt_ema, data[:1])
    assert _updates(opt_ema) == [1, 1]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_torch_save_and_pickle_of_a_hooked_model(name, net):
    """``torch.save(model)`` / ``torch.load(weights_only=False)`` and ``pickle`` of a model with
    the optimizer's hooks attached (on a collecting step, all hooks live): the loaded model
    computes the same outputs, carries only inert hooks, and the original keeps training
    exactly as a run that was never saved."""
    make = _mlp if net == "mlp" else _cnn
    ref = make()
    opt_r = _make(name, ref)
    data = _batches(ref)
    _train(ref, opt_r, data)

    model = make()
    opt = _make(name, model)
    _train(model, opt, data[:2])  # t = 2: a collecting step follows
    assert opt.preconditioner.collecting
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(model))
    x = data[2][0]
    for other in (loaded, unpickled):
        assert all(isinstance(h, _InertHook) for m in other.modules() for h in m._forward_hooks.values())
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
        F.cross_entropy(other(x), data[2][1]).backward()  # no statistics reach `opt`
    model.zero_grad()
    _train(model, opt, data[2:])
    assert _updates(opt) == _updates(opt_r) == [FOLDS] * len(opt.preconditioner.layers)
    _assert_same_run(ref, opt_r, model, opt, rtol=0, atol=0)
    # the loaded model trains with an optimizer of its own
    opt_l = _make(name, loaded)
    _train(loaded, opt_l, data[:3])
    assert _updates(opt_l) == [2] * len(opt_l.preconditioner.layers)


# ---------------------------------------------------------------------------------- optimizer copies
@pytest.mark.parametrize("name", list(CONFIGS))
def test_pickling_or_copying_an_optimizer_raises_a_clear_type_error(name):
    """pickle / deepcopy / copy / torch.save of an optimizer or preconditioner raise ``TypeError``
    pointing to state_dict()/load_state_dict() (before the fix pickling "succeeded" and the
    loaded optimizer failed in zero_grad, and a deep copy had no preconditioner)."""
    model = _mlp()
    opt = _make(name, model)
    _train(model, opt, _batches(model, n=2))
    cls, kw = PRECONDITIONERS[name]
    other = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pre = cls(other, **kw)
    for obj in (opt, opt.preconditioner, pre):
        for copier in (pickle.dumps, copy.deepcopy, copy.copy,
                       lambda o: torch.save(o, io.BytesIO())):
            with pytest.raises(TypeError, match=r"state_dict\(\).*load_state_dict\(\)"):
                copier(obj)
        # the same for containers holding it (a checkpoint dict, the EMA pattern)
        with pytest.raises(TypeError, match="cannot be pickled or copied"):
            copy.deepcopy({"model": model, "opt": obj})
    # the original is untouched and keeps working
    _train(model, opt, _batches(model, n=1, seed=3))
    assert opt.t == 3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_copy_of_model_and_optimizer_continues_identically(name):
    """The supported way to duplicate a run: deepcopy the model (inert hooks), build a new
    optimizer on the copy and load the state_dict: both continue bit for bit alike."""
    model = _mlp()
    opt = _make(name, model)
    data = _batches(model, n=9)
    _train(model, opt, data[:3])  # t = 3: mid-way between statistics and refresh boundaries
    twin = copy.deepcopy(model)
    opt_t = _make(name, twin)
    opt_t.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(model, opt, data[3:])
    _train(twin, opt_t, data[3:])
    assert _updates(opt) == _updates(opt_t) == [5, 5]  # t = 0, 2, 4, 6, 8
    _assert_same_run(model, opt, twin, opt_t, rtol=0, atol=0)
