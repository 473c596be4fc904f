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


# ---- issue 16: the loader validates strictly ------------------------------------------------------
def _files(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _rewrite(src, dst, header_edit=None, files_edit=None):
    files = _files(src)
    header = json.loads(str(files["__maccore__"]))
    if header_edit is not None:
        header = header_edit(header) or header
    if files_edit is not None:
        files_edit(header, files)
    files["__maccore__"] = np.asarray(json.dumps(header))
    with open(dst, "wb") as f:
        np.savez(f, **files)
    return dst


def _set(*keys, value):
    """A header edit setting ``header[k0][k1]...`` (``"@"``: the first layer) to ``value``."""
    def edit(h):
        node = h
        for k in keys[:-1]:
            node = node[next(iter(node))] if k == "@" else node[k]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return edit


_DELETE = object()


def _array(field, make):
    """A files edit replacing the first layer's array ``field`` by ``make(old)``."""
    def edit(h, files):
        key = next(iter(h["layers"].values()))["arrays"][field]
        files[key] = make(files[key])
    return edit


BAD_HEADERS = {  # name: (header edit, the field the error must name)
    "header_is_a_list": (lambda h: [h], "header"),
    "method_int": (_set("method", value=3), "method"),
    "step_negative": (_set("step", value=-1), "step"),
    "step_string": (_set("step", value="12"), "step"),
    "step_float": (_set("step", value=12.0), "step"),
    "step_bool": (_set("step", value=True), "step"),
    "step_2_40": (_set("step", value=2**40), "step"),
    "step_2_31": (_set("step", value=2**31), "step"),
    "no_step": (_set("step", value=_DELETE), "step"),
    "source_int": (_set("source", value=3), "source"),
    "hyperparameters_list": (_set("hyperparameters", value=[1]), "hyperparameters"),
    "no_layers": (_set("layers", value=_DELETE), "layers"),
    "layers_list": (_set("layers", value=["conv"]), "layers"),
    "layer_int": (_set("layers", "conv", value=3), "conv"),
    "kind_unknown": (_set("layers", "@", "kind", value="dense"), "kind"),
    "no_kind": (_set("layers", "@", "kind", value=_DELETE), "kind"),
    "d_out_string": (_set("layers", "@", "d_out", value="4"), "d_out"),
    "d_tilde_negative": (_set("layers", "@", "d_tilde", value=-10), "d_tilde"),
    "has_bias_no": (_set("layers", "@", "has_bias", value="no"), "has_bias"),
    "has_bias_int": (_set("layers", "@", "has_bias", value=1), "has_bias"),
    "updates_negative": (_set("layers", "@", "updates", value=-3), "updates"),
    "updates_float": (_set("layers", "@", "updates", value=2.5), "updates"),
    "state_types_int": (_set("layers", "@", "state_types", value=5), "state_types"),
    "arrays_string": (_set("layers", "@", "arrays", value="a0"), "arrays"),
    "array_name_int": (_set("layers", "@", "arrays", "state/mean_hat", value=7), "arrays"),
    "array_missing": (_set("layers", "@", "arrays", "state/mean_hat", value="zz"), "zz"),
    "params_list": (_set("params", value=[1]), "params"),
    "param_arrays_empty": (_set("params", "ln.weight", "arrays", value={}), "ln.weight"),
}
BAD_ARRAYS = {  # name: (files edit, words of the error)
    "nan_state": (_array("state/mean_hat", lambda a: np.full_like(a, np.nan)), "NaN"),
    "inf_state": (_array("state/mean/value", lambda a: np.full_like(a, np.inf)), "NaN or Inf"),
    "inf_momentum": (_array("momentum", lambda a: np.full_like(a, -np.inf)), "momentum"),
    "complex_state": (_array("state/mean_hat", lambda a: a.astype(np.complex64)), "complex"),
    "bool_state": (_array("state/mean_hat", lambda a: a > 0), "bool"),
    "uint8_state": (_array("state/mean_hat", lambda a: a.astype(np.uint8)), "uint8"),
    "negative_count": (_array("state/mean/count", lambda a: a - 100), "counter"),
    "float_count": (_array("state/mean/count", lambda a: a.astype(np.float32)), "integer"),
    "momentum_shape": (_array("momentum", lambda a: a[:, :-1]), "momentum"),
    "object_array": (_array("state/mean_hat", lambda a: np.array([{"a": 1}, None], dtype=object)),
                     "mean_hat"),
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    torch.manual_seed(8)
    model = Net()
    opt = mt.MAC(model, lr=0.05, t_cov=1, t_inv=1)
    _train(model, opt, _batches(2))
    path = tmp_path_factory.mktemp("good") / "good.npz"
    mt.save_portable(opt, path)
    return path


@pytest.mark.parametrize("name", list(BAD_HEADERS) + list(BAD_ARRAYS))
def test_malformed_checkpoints_raise_one_clear_value_error(name, good_checkpoint, tmp_path):
    if name in BAD_HEADERS:
        edit, field = BAD_HEADERS[name]
        bad = _rewrite(good_checkpoint, tmp_path / "bad.npz", header_edit=edit)
    else:
        edit, field = BAD_ARRAYS[name]
        if name == "object_array":  # a pickled payload: refused, never unpickled
            files = _files(good_checkpoint)
            header = json.loads(str(files["__maccore__"]))
            key = header["layers"]["conv"]["arrays"]["state/mean_hat"]
            files[key] = np.array([{"a": 1}, None], dtype=object)
            bad = tmp_path / "bad.npz"
            with open(bad, "wb") as f:
                np.savez(f, **files)
        else:
            bad = _rewrite(good_checkpoint, tmp_path / "bad.npz", files_edit=edit)
    with pytest.raises(ValueError) as err:
        ck.load(bad)
    assert field in str(err.value) and str(bad) in str(err.value), str(err.value)
    model = Net()
    opt = mt.MAC(model, lr=0.05, t_cov=1, t_inv=1)
    _train(model, opt, _batches(1, seed=4))
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        mt.load_portable(opt, bad)
    _same(_snapshot(opt), before)
    mt.load_portable(opt, good_checkpoint)  # the good file still loads


def test_has_bias_must_match(good_checkpoint, tmp_path):
    class NoBias(Net):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3, bias=False)  # the same [d_out, d̃] = [3, 5] as fc(4 → 3)

    with pytest.raises(ValueError, match=r"layer 'fc' has no bias in the optimizer.*has_bias"):
        mt.load_portable(mt.MAC(NoBias()), good_checkpoint)


def test_jax_huge_step_is_a_value_error(tmp_path):
    start = flax_params(TorchMLP(), PAIRS["mlp"])
    tx, layers, _ = _jax_setup("mlp", "mac", start)
    state = tx.init(start)
    path = tmp_path / "j.npz"
    mj.save_portable(path, state, layers=layers)
    for step in (2**31, 2**40):
        bad = _rewrite(path, tmp_path / f"s{step}.npz", header_edit=_set("step", value=step))
        with pytest.raises(ValueError, match=r"'step' must be an integer in \[0, 2147483647\]"):
            mj.load_portable(bad, state, layers=layers)
    ok = _rewrite(path, tmp_path / "ok.npz", header_edit=_set("step", value=2**31 - 1))
    assert int(mj.load_portable(ok, state, layers=layers)[0].count) == 2**31 - 1


def test_unlisted_and_oversized_arrays_are_never_decompressed(good_checkpoint, tmp_path):
    """A small file holding a compressed 256 MiB zero array the header does not list loads
    without decompressing it; a listed array whose .npy header claims more than the layer's
    size is refused before any data is read."""
    import tracemalloc
    import zipfile

    bomb = tmp_path / "bomb.npz"
    bomb.write_bytes(good_checkpoint.read_bytes())
    n = 1 << 28  # bytes of zeros
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("zz.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (n // 4,)})
            chunk = bytes(1 << 22)
            for _ in range(n // len(chunk)):
                f.write(chunk)
    assert bomb.stat().st_size < 2 * good_checkpoint.stat().st_size + (1 << 20)  # ~0.3 MB
    tracemalloc.start()
    try:
        back = ck.load(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert back.step == 2 and peak < (16 << 20), peak  # the unlisted array was never read
    listed = _rewrite(good_checkpoint, tmp_path / "listed.npz",
                      header_edit=_set("layers", "@", "arrays", "state/mean_hat", value="zz"))
    with zipfile.ZipFile(listed, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zz.npy", bomb_header := _npy_header((n // 4,)))
    assert bomb_header
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"'state/mean_hat'.*larger than the header implies"):
            ck.load(listed)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (16 << 20), peak


def _npy_header(shape):
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()
