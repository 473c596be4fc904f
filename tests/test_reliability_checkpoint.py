"""Portable checkpoints (maccore.checkpoint, maccore_torch/maccore_jax save_portable/load_portable).

- save in torch → load in jax → continue gives the torch trajectory, and the reverse (MAC with
  decoupled weight decay, which both adapters implement identically; MLP and CNN, so both the dense
  [d_out, d_in] ↔ [d_in, d_out] and the conv OIHW ↔ HWIO momentum layouts are converted);
- torch → torch round trips (SMAC, KFAC exact damping, MAC's first-layer inverse) resume exactly;
- the file loads into NumPy core states;
- a mismatched model, method or format version raises a clear ValueError and changes nothing.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")

from tests.adapters import torch_helpers  # noqa: E402,F401  (adapter import path)
from tests.adapters._jax_common import to_np  # noqa: E402
from tests.adapters.test_parity_torch_jax import flax_params as _aliased_flax_params  # noqa: E402
from tests.adapters.test_parity_torch_jax import (  # noqa: E402
    PAIRS,
    R,
    TorchCNN,
    TorchMLP,
    data,
    jax_model_layers,
    jax_stepper,
    loss_torch,
)

import array_api_compat  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import maccore  # noqa: E402
import maccore_jax as mj  # noqa: E402
import maccore_torch as mt  # noqa: E402
from maccore import checkpoint as ck  # noqa: E402

torch.set_default_dtype(torch.float32)

SPLIT = 7  # steps before the checkpoint (mid-way through a t_cov / t_inv cycle)
MAC_CFG = dict(momentum=0.9, stat_decay=0.9, damping=0.5, weight_decay=0.05, t_cov=2, t_inv=3)
KFAC_CFG = dict(
    momentum=0.5, stat_decay=0.9, damping=0.3, weight_decay=0.01, t_cov=1, t_inv=2,
    reduction_factor=R,
)


def flax_params(model, pairs):
    """Flax params holding COPIES of the torch weights (jnp.asarray may alias NumPy memory,
    which the torch model keeps updating in place)."""
    return jax.tree.map(lambda a: jnp.array(to_np(a).astype(np.float32)),
                        _aliased_flax_params(model, pairs))


def _torch_opt(method, model):
    if method == "mac":
        return mt.MAC(model, lr=0.05, weight_decay_mode="decoupled", **MAC_CFG)
    return mt.KFAC(model, lr=0.02, weight_decay_mode="decoupled", **KFAC_CFG)


def _jax_tx(method, layers):
    if method == "mac":
        return mj.mac(0.05, layers=layers, **MAC_CFG)
    return mj.kfac(0.02, layers=layers, **KFAC_CFG)


def _torch_steps(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        loss_torch(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()


def _jax_setup(kind, method, params):
    model, layers = jax_model_layers(kind, params)
    tx = _jax_tx(method, layers)
    return tx, layers, jax_stepper(kind, model, tx, output_grads=method == "kfac")


def _to_torch(model, params, pairs):
    """Copy Flax params (kernel [in, out] / HWIO) into the torch model."""
    with torch.no_grad():
        for tname, fname in pairs.items():
            mod = getattr(model, tname)
            k = to_np(params[fname]["kernel"])
            w = k.T if k.ndim == 2 else k.transpose(3, 2, 0, 1)
            mod.weight.copy_(torch.from_numpy(w.astype(np.float32)))
            if mod.bias is not None:
                mod.bias.copy_(torch.from_numpy(to_np(params[fname]["bias"]).astype(np.float32)))


def _assert_tree_close(a, b, rtol=2e-4, atol=2e-5):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(to_np(x), to_np(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kind,method", [("mlp", "mac"), ("cnn", "mac"), ("mlp", "kfac")])
def test_torch_to_jax_continues_the_torch_trajectory(kind, method, tmp_path):
    torch.manual_seed(0)
    batches = data(kind)
    tmodel = TorchMLP() if kind == "mlp" else TorchCNN()
    start = flax_params(tmodel, PAIRS[kind])
    opt = _torch_opt(method, tmodel)
    _torch_steps(tmodel, opt, batches[:SPLIT])
    path = tmp_path / "ckpt.npz"
    mt.save_portable(opt, path)
    mid = flax_params(tmodel, PAIRS[kind])
    _torch_steps(tmodel, opt, batches[SPLIT:])  # the reference: torch all the way
    final_torch = flax_params(tmodel, PAIRS[kind])

    tx, layers, run = _jax_setup(kind, method, start)
    state = mj.load_portable(path, tx.init(mid), layers=layers, names=PAIRS[kind])
    assert int(state[0].count) == SPLIT
    final_jax, _ = run(mid, state, batches[SPLIT:])
    moved = max(float(np.max(np.abs(to_np(a) - to_np(b))))
                for a, b in zip(jax.tree.leaves(final_torch), jax.tree.leaves(mid)))
    assert moved > 1e-3
    _assert_tree_close(final_jax, final_torch)


@pytest.mark.parametrize("kind,method", [("mlp", "mac"), ("cnn", "mac"), ("mlp", "kfac")])
def test_jax_to_torch_continues_the_jax_trajectory(kind, method, tmp_path):
    torch.manual_seed(1)
    batches = data(kind)
    tmodel = TorchMLP() if kind == "mlp" else TorchCNN()
    start = flax_params(tmodel, PAIRS[kind])
    tx, layers, run = _jax_setup(kind, method, start)
    mid, state = run(start, tx.init(start), batches[:SPLIT])
    path = tmp_path / "ckpt.npz"
    to_torch_names = {f: t for t, f in PAIRS[kind].items()}
    mj.save_portable(path, state, layers=layers, names=to_torch_names)
    final_jax, _ = run(mid, state, batches[SPLIT:])

    _to_torch(tmodel, mid, PAIRS[kind])
    opt = _torch_opt(method, tmodel)
    mt.load_portable(opt, path)
    assert opt.t == SPLIT
    _torch_steps(tmodel, opt, batches[SPLIT:])
    _assert_tree_close(final_jax, flax_params(tmodel, PAIRS[kind]))


def test_names_can_be_mapped_on_either_side(tmp_path):
    """``names`` on save (torch names → Flax names) or on load (the reverse) give the same state."""
    torch.manual_seed(2)
    tmodel = TorchMLP()
    opt = _torch_opt("mac", tmodel)
    _torch_steps(tmodel, opt, data("mlp")[:3])
    start = flax_params(tmodel, PAIRS["mlp"])
    tx, layers, _ = _jax_setup("mlp", "mac", start)
    mt.save_portable(opt, tmp_path / "a.npz", names=PAIRS["mlp"])
    mt.save_portable(opt, tmp_path / "b.npz")
    sa = mj.load_portable(tmp_path / "a.npz", tx.init(start), layers=layers)
    sb = mj.load_portable(tmp_path / "b.npz", tx.init(start), layers=layers, names=PAIRS["mlp"])
    for a, b in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- torch → torch -----------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.fc(self.ln(h))


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 1, 5, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
            for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


MAKERS = {
    "smac_nesterov": lambda m: mt.MAC(m, lr=0.05, t_cov=2, t_inv=3, diagonal=True, nesterov=True),
    "kfac_exact": lambda m: mt.KFAC(m, lr=0.05, damping=0.1, damping_mode="exact", t_inv=2),
    "mac_first_layer": lambda m: mt.MAC(m, lr=0.05, t_cov=1, t_inv=2),
}


@pytest.mark.parametrize("which", list(MAKERS))
def test_torch_round_trip_resumes_exactly(which, tmp_path):
    torch.manual_seed(3)
    model = Net()
    twin = copy.deepcopy(model)
    batches = _batches(9)
    opt = MAKERS[which](model)
    if which == "mac_first_layer":
        opt.fit_first_layer([b[0] for b in batches[:2]])
    _train(model, opt, batches[:5])
    mt.save_portable(opt, tmp_path / "c.npz")
    twin.load_state_dict(model.state_dict())
    opt2 = MAKERS[which](twin)
    mt.load_portable(opt2, tmp_path / "c.npz")
    assert opt2.t == opt.t == 5
    _train(model, opt, batches[5:])
    _train(twin, opt2, batches[5:])
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_loads_into_numpy_core_states(tmp_path):
    torch.manual_seed(4)
    model = Net()
    opt = mt.KFAC(model, lr=0.05, t_inv=1)
    _train(model, opt, _batches(3))
    mt.save_portable(opt, tmp_path / "k.npz")
    ckpt = ck.load(tmp_path / "k.npz")
    assert ckpt.method == "KFAC" and ckpt.step == 3 and ckpt.source == "torch"
    assert ckpt.format_version == ck.FORMAT_VERSION
    assert set(ckpt.params) == {"ln.weight", "ln.bias"}
    npx = array_api_compat.array_namespace(np.empty(0))
    pc = maccore.kfac()
    for layer in opt.preconditioner.layers:
        e = ckpt.layers[layer.name]
        st = ck.unflatten_state(pc.init(e.d_tilde, e.d_out, xp=npx), e.state, e.state_types)
        assert isinstance(st.a_inv, np.ndarray)
        np.testing.assert_array_equal(st.a_inv, layer.state.a_inv.numpy())
        assert int(st.a.count) == layer.updates == 3
        w = opt.state[layer.weight]["momentum_buffer"]
        np.testing.assert_array_equal(e.momentum[:, :-1], w.reshape(w.shape[0], -1).numpy())


# ---- mismatches ----------------------------------------------------------------------------------
def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _same(a, b):
    la = jax.tree.leaves(a, is_leaf=lambda x: isinstance(x, torch.Tensor))
    lb = jax.tree.leaves(b, is_leaf=lambda x: isinstance(x, torch.Tensor))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


def test_mismatches_raise_and_change_nothing(tmp_path):
    torch.manual_seed(5)
    model = Net()
    opt = mt.MAC(model, lr=0.05, t_cov=1, t_inv=1)
    _train(model, opt, _batches(2))
    path = tmp_path / "m.npz"
    mt.save_portable(opt, path)

    other = mt.MAC(Net(), lr=0.05)
    _train(other.preconditioner.model, other, _batches(1, seed=9))
    before = _snapshot(other)

    kfac = mt.KFAC(Net())
    with pytest.raises(ValueError, match=r"holds a MAC state but the optimizer is KFAC"):
        mt.load_portable(kfac, path)
    smac = mt.MAC(Net(), diagonal=True)
    with pytest.raises(ValueError, match=r"holds a MAC state but the optimizer is SMAC"):
        mt.load_portable(smac, path)

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 5)

    with pytest.raises(ValueError, match=r"layer 'fc' is linear \[5, 5\].*but linear \[3, 5\]"):
        mt.load_portable(mt.MAC(Wider()), path)

    class Renamed(Net):
        def __init__(self):
            super().__init__()
            self.head = self.fc
            del self.fc

        def forward(self, x):
            return self.head(self.ln(torch.relu(self.conv(x)).mean(dim=(2, 3))))

    with pytest.raises(ValueError, match=r"layer names differ.*\['head'\].*\['fc'\].*names="):
        mt.load_portable(mt.MAC(Renamed()), path)
    mt.load_portable(mt.MAC(Renamed()), path, names={"fc": "head"})  # mapped: fine

    with pytest.raises(ValueError, match=r"momentum for parameters \['zz'\]"):
        mt.load_portable(other, path, names={"ln.weight": "zz"})
    _same(_snapshot(other), before)  # failed loads changed nothing

    # unknown format version / not a checkpoint / a corrupt header
    with np.load(path) as z:
        files = {k: z[k] for k in z.files}
    header = json.loads(str(files["__maccore__"]))
    header["format_version"] = 99
    bad = tmp_path / "v99.npz"
    with open(bad, "wb") as f:
        np.savez(f, **{**files, "__maccore__": np.asarray(json.dumps(header))})
    with pytest.raises(ValueError, match=r"unknown format_version 99"):
        mt.load_portable(other, bad)
    plain = tmp_path / "plain.npz"
    with open(plain, "wb") as f:
        np.savez(f, x=np.ones(3))
    with pytest.raises(ValueError, match="not a maccore portable checkpoint"):
        mt.load_portable(other, plain)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz"):
        ck.load(junk)
    _same(_snapshot(other), before)


def test_jax_mismatches(tmp_path):
    torch.manual_seed(6)
    tmodel = TorchMLP()
    opt = _torch_opt("mac", tmodel)
    _torch_steps(tmodel, opt, data("mlp")[:2])
    path = tmp_path / "t.npz"
    mt.save_portable(opt, path)
    start = flax_params(tmodel, PAIRS["mlp"])
    tx, layers, _ = _jax_setup("mlp", "mac", start)
    with pytest.raises(ValueError, match=r"layer names differ.*Dense_0.*names="):
        mj.load_portable(path, tx.init(start), layers=layers)
    ktx, _, _ = _jax_setup("mlp", "kfac", start)
    with pytest.raises(ValueError, match="holds a MAC state but the optimizer is KFAC"):
        mj.load_portable(path, ktx.init(start), layers=layers, names=PAIRS["mlp"])
    with pytest.raises(ValueError, match="exactly one maccore_jax curvature state"):
        mj.load_portable(path, optax.sgd(0.1).init(start))
    # SMAC's diagonal is not a maccore_jax state: the method differs
    smac = mt.MAC(TorchMLP(), diagonal=True)
    mt.save_portable(smac, tmp_path / "s.npz")
    with pytest.raises(ValueError, match="holds a SMAC state"):
        mj.load_portable(tmp_path / "s.npz", tx.init(start), names=PAIRS["mlp"])


def test_core_checkpoint_api_errors(tmp_path):
    npx = array_api_compat.array_namespace(np.empty(0))
    st = maccore.mac().init(3, 2, xp=npx)
    arrays, types = ck.flatten_state(st)
    assert set(arrays) == {"mean/count", "mean/value", "mean/weight", "mean_hat"}
    assert types == {"": "MacState", "mean": "EmaState"}
    with pytest.raises(ValueError, match=r"field 'mean_hat' has shape \[4\], expected \[3\]"):
        ck.unflatten_state(st, {**arrays, "mean_hat": np.zeros(4)})
    with pytest.raises(ValueError, match=r"field 'mean/weight' of MacState is missing"):
        ck.unflatten_state(st, {k: v for k, v in arrays.items() if k != "mean/weight"})
    with pytest.raises(ValueError, match=r"fields \['diag/value'\] are not part of MacState"):
        ck.unflatten_state(st, {**arrays, "diag/value": np.zeros(2)})
    kst = maccore.kfac().init(3, 2, xp=npx)
    with pytest.raises(ValueError, match="saved state types"):
        ck.unflatten_state(kst, *ck.flatten_state(st))
    with pytest.raises(TypeError, match="expected a core state"):
        ck.flatten_state(np.zeros(3))
    with pytest.raises(TypeError, match="Checkpoint"):
        ck.save(tmp_path / "x.npz", {"method": "MAC"})
    entry = ck.LayerEntry("linear", 2, 3, True, arrays, types, momentum=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"momentum of layer 'l' has shape \[3, 2\], expected"):
        ck.save(tmp_path / "x.npz", ck.Checkpoint("MAC", 0, {"l": entry}))
    # bfloat16 (NumPy's extension type, as jax arrays convert) / float16 arrays are stored as
    # float32, the exact path is used
    for low in (np.asarray(jnp.ones((2, 3), jnp.bfloat16)), np.ones((2, 3), np.float16)):
        entry = ck.LayerEntry("linear", 2, 3, True, arrays, types, momentum=low)
        ck.save(tmp_path / "noext", ck.Checkpoint("mac", 1, {"l": entry}))
        back = ck.load(tmp_path / "noext")
        assert back.method == "MAC" and back.layers["l"].momentum.dtype == np.float32
    # the core knows no framework: a torch bfloat16 tensor (no NumPy dtype) is refused with a clear
    # error, maccore_torch converts its tensors itself (below)
    entry = ck.LayerEntry("linear", 2, 3, True, arrays, types,
                          momentum=torch.ones(2, 3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="convert it to a host NumPy array first"):
        ck.save(tmp_path / "x.npz", ck.Checkpoint("mac", 1, {"l": entry}))


def test_torch_bfloat16_model_round_trip(tmp_path):
    """maccore_torch converts bfloat16 tensors to float32 NumPy for the core and back on load."""
    torch.manual_seed(7)
    model = Net().to(torch.bfloat16)
    opt = mt.MAC(model, lr=0.05, t_cov=1, t_inv=1)
    _train(model, opt, [(x.to(torch.bfloat16), y) for x, y in _batches(2)])
    mt.save_portable(opt, tmp_path / "b.npz")
    ckpt = ck.load(tmp_path / "b.npz")
    w = opt.state[model.fc.weight]["momentum_buffer"]
    assert w.dtype == torch.bfloat16 and ckpt.layers["fc"].momentum.dtype == np.float32
    np.testing.assert_array_equal(ckpt.layers["fc"].momentum[:, :-1], w.float().numpy())
    twin = Net().to(torch.bfloat16)
    opt2 = mt.MAC(twin, lr=0.05, t_cov=1, t_inv=1)
    mt.load_portable(opt2, tmp_path / "b.npz")
    assert opt2.t == opt.t == 2
    got = opt2.state[twin.fc.weight]["momentum_buffer"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, w)


# ---- SINGD (states are NamedTuples of structures: flattened the same way) ----------------------------
SINGD_CFG = dict(lr=0.05, momentum=0.9, damping=0.05, alpha1=0.5, weight_decay=0.01, T=2,
                 lr_cov=lambda t: 0.1 / (1.0 + 0.1 * t), structures=("dense", "diagonal"))


def test_singd_torch_to_jax_continues_the_torch_trajectory(tmp_path):
    singd_torch = pytest.importorskip("maccore_torch.singd")
    singd_jax = pytest.importorskip("maccore_jax.singd")
    torch.manual_seed(7)
    batches = data("mlp")
    tmodel = TorchMLP()
    opt = singd_torch.SINGD(tmodel, **SINGD_CFG)
    _torch_steps(tmodel, opt, batches[:SPLIT])
    mt.save_portable(opt, tmp_path / "s.npz", names=PAIRS["mlp"])
    mid = flax_params(tmodel, PAIRS["mlp"])
    _torch_steps(tmodel, opt, batches[SPLIT:])
    final_torch = flax_params(tmodel, PAIRS["mlp"])

    model, layers = jax_model_layers("mlp", mid)
    cfg = dict(SINGD_CFG)
    tx = singd_jax.singd(cfg.pop("lr"), **cfg, layers=layers)
    state = mj.load_portable(tmp_path / "s.npz", tx.init(mid), layers=layers)
    p, _ = jax_stepper("mlp", model, tx, output_grads=True)(mid, state, batches[SPLIT:])
    _assert_tree_close(p, final_torch)
