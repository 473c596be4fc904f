"""Failures leave the old data intact; optimizers do not outlive themselves (issue 16).

- ``load_state_dict`` of the torch optimizers is atomic: a state with one bad entry (a wrong
  shape in the last layer, a misshapen momentum buffer, a bad step count) raises ``ValueError``
  and leaves momenta, curvature states and the step count exactly as they were;
- saving a portable checkpoint is atomic: under a full disk (``RLIMIT_FSIZE`` in a subprocess)
  the save fails and the previous good checkpoint still loads;
- the hooks do not outlive the optimizer: after ``del opt`` the model has no maccore hooks left
  and the preconditioner is garbage; a second optimizer on the same modules is warned about.
"""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
import textwrap
import warnings
import weakref
from pathlib import Path

import pytest

pytest.importorskip("torch")

from tests.adapters import torch_helpers  # noqa: E402,F401  (adapter import path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import maccore  # noqa: E402
import maccore_torch as mt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


def _model():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


MAKERS = {
    "MAC": lambda m: mt.MAC(m, lr=0.05, t_cov=1, t_inv=1),
    "KFAC": lambda m: mt.KFAC(m, lr=0.05, damping=0.1, t_cov=1, t_inv=1),
    "SINGD": lambda m: mt.SINGD(m, lr=0.05, T=1),
}


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _snapshot(opt):
    pre = opt.preconditioner
    layers = {l.name: ({k: v.clone() for k, v in maccore.checkpoint.flatten_state(l.state)[0].items()},
                       l.updates) for l in pre.layers}
    moms = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for i, s in enumerate(opt.state[p] for g in opt.param_groups for p in g["params"])}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return pre.t, layers, moms, groups


def _assert_same(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert a[1][name][1] == b[1][name][1]
        for k, v in a[1][name][0].items():
            assert torch.equal(v, b[1][name][0][k]), f"{name}/{k}"
    assert a[2].keys() == b[2].keys()
    for i in a[2]:
        assert a[2][i].keys() == b[2][i].keys()
        for k in a[2][i]:
            assert torch.equal(a[2][i][k], b[2][i][k])
    assert a[3] == b[3]


def _first_leaf(tree, floating=False):
    """``(mapping, key)`` of the first tensor in a nested state tree."""
    for k, v in tree.items():
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or not floating):
            return tree, k
        if isinstance(v, dict):
            found = _first_leaf(v, floating)
            if found:
                return found
    return None


def _corrupt(sd, how):
    sd = copy.deepcopy(sd)
    pre = sd["maccore"]
    last = list(pre["layers"])[-1]
    if how == "last_layer_shape":  # the reproducer: the LAST layer's state has one wrong shape
        tree, key = _first_leaf(pre["layers"][last]["state"])
        tree[key] = torch.zeros(tuple(tree[key].shape) + (2,))
    elif how == "momentum_shape":
        sd["state"][0]["momentum_buffer"] = torch.zeros(7)
    elif how == "momentum_type":
        sd["state"][1]["momentum_buffer"] = "zeros"
    elif how == "step":
        pre["t"] = "ten"
    elif how == "negative_step":
        pre["t"] = -3
    elif how == "updates":
        pre["layers"][last]["updates"] = -1
    elif how == "nonfinite_state":
        tree, key = _first_leaf(pre["layers"][last]["state"], floating=True)
        tree[key] = torch.full_like(tree[key], float("nan"))
    elif how == "groups":
        sd["param_groups"] = sd["param_groups"][:0]
    elif how == "no_layers":
        del pre["layers"]
    return sd


@pytest.mark.parametrize("how", ["last_layer_shape", "momentum_shape", "momentum_type", "step",
                                 "negative_step", "updates", "nonfinite_state", "groups",
                                 "no_layers"])
@pytest.mark.parametrize("method", list(MAKERS))
def test_load_state_dict_is_atomic(method, how):
    torch.manual_seed(0)
    src_model, dst_model = _model(), _model()
    src, dst = MAKERS[method](src_model), MAKERS[method](dst_model)
    _train(src_model, src, 3, seed=1)
    _train(dst_model, dst, 2, seed=2)  # another state: a partial load would show
    before = _snapshot(dst)
    with pytest.raises(ValueError) as err:
        dst.load_state_dict(_corrupt(src.state_dict(), how))
    assert "load_state_dict" in str(err.value) or how == "groups", str(err.value)
    _assert_same(_snapshot(dst), before)
    dst.load_state_dict(copy.deepcopy(src.state_dict()))  # a good state still loads
    _assert_same(_snapshot(dst), _snapshot(src))


# ---- atomic save ---------------------------------------------------------------------------------
_FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from maccore import checkpoint as ck

    path, limit = sys.argv[1], int(sys.argv[2])
    big = ck.Checkpoint(method="MAC", step=99, layers={}, params={"w": np.ones((256, 256), np.float32)})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        ck.save(path, big)
    except OSError as exc:
        print("failed:", exc)
        sys.exit(3)
    sys.exit(0)
""")


def test_save_is_atomic_under_a_full_disk(tmp_path):
    pytest.importorskip("resource")
    import numpy as np

    from maccore import checkpoint as ck

    path = tmp_path / "ckpt.npz"
    good = ck.Checkpoint(method="MAC", step=7, layers={}, params={"w": np.arange(12.0).reshape(3, 4)})
    ck.save(path, good)
    size = path.stat().st_size
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters"),
                                                        os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", _FULL_DISK, str(path), str(size + 1000)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 3, res.stdout + res.stderr  # the save of the big checkpoint failed
    back = ck.load(path)  # ... and the previous good checkpoint is intact
    assert back.step == 7 and np.array_equal(back.params["w"], good.params["w"])
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]  # no temporary file left behind
    ck.save(path, ck.Checkpoint(method="MAC", step=8, layers={}))  # a save that fits replaces it
    assert ck.load(path).step == 8 and sorted(os.listdir(tmp_path)) == ["ckpt.npz"]


# ---- hooks do not outlive the optimizer ------------------------------------------------------------
def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("method", list(MAKERS))
def test_hooks_go_with_the_optimizer(method):
    model = _model()
    scaler = torch.amp.GradScaler("cpu")
    opt = {"MAC": lambda: mt.MAC(model, lr=0.05, t_cov=1, grad_scaler=scaler),
           "KFAC": lambda: mt.KFAC(model, lr=0.05, grad_scaler=scaler),
           "SINGD": lambda: mt.SINGD(model, lr=0.05, T=1, grad_scaler=scaler)}[method]()
    assert _hook_count(model) > 0
    _train(model, opt, 2, seed=0)
    ref = weakref.ref(opt.preconditioner)
    del opt
    gc.collect()
    assert ref() is None  # nothing keeps the preconditioner alive
    assert _hook_count(model) == 0  # ... and its hooks are gone with it
    x = torch.randn(8, 4)
    model(x).sum().backward()  # the model runs without any maccore work
    with warnings.catch_warnings():  # a new optimizer hooks each module once
        warnings.simplefilter("error")  # no "already hooked" warning: the old one is gone
        opt2 = MAKERS[method](model)
    assert all(len(m._forward_hooks) <= 1 for m in model.modules())
    _train(model, opt2, 1, seed=3)
    assert opt2.t == 1


def test_two_live_optimizers_on_one_module_warn():
    model = _model()
    first = mt.MAC(model, lr=0.05, t_cov=1)
    with pytest.warns(UserWarning, match=r"\['0', '2', '4'\] are already hooked by another live "
                                         r"maccore optimizer"):
        second = mt.KFAC(model, lr=0.05)
    first.preconditioner.remove_hooks()  # one detached, the other deleted: a third does not warn
    del second
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = mt.SINGD(model, lr=0.05, T=1)
    assert third.t == 0
