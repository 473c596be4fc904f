"""Host reads of the torch optimizers' steps: every operation that copies a device value to the
host (``.item()``, ``bool()``, ``.tolist()``, linear-algebra status checks) is a device
synchronisation on a GPU. Counted here on the CPU with torch's dispatch and function modes, which
see the same calls: ``on_nonfinite=None`` must read nothing on any step (statistics and refresh
steps included), and the checked step of MAC one value per step when no state changes
(docs/numerics.md, docs/benchmarks.md)."""

from __future__ import annotations

import collections

import pytest

pytest.importorskip("torch")

from tests.adapters import torch_helpers  # noqa: E402,F401  (adapter import path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import maccore_torch as mt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# aten operations that hand a tensor's value to the host (what .item() / bool() / float() run,
# the status checks of torch.linalg, data-dependent shapes)
_READS = ("_local_scalar_dense", "_linalg_check_errors", "nonzero", "masked_select", "unique")


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in _READS:
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


class _ToList(TorchFunctionMode):
    """``Tensor.tolist`` reads the values without an aten operation on the CPU."""

    def __init__(self, seen: collections.Counter) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "tolist":
            self.seen["tolist"] += 1
        return func(*args, **(kwargs or {}))


def _reads(fn) -> collections.Counter:
    mode = _HostReads()
    with _ToList(mode.seen), mode:
        fn()
    return mode.seen


def test_the_counter_sees_host_reads():
    x = torch.ones(3)
    assert _reads(lambda: x.sum().item()) == {"_local_scalar_dense": 1}
    assert _reads(lambda: bool((x > 0).all())) == {"_local_scalar_dense": 1}
    assert _reads(lambda: x.tolist())["tolist"] == 1
    assert _reads(lambda: torch.linalg.inv(torch.eye(2)))["_linalg_check_errors"] == 1
    assert _reads(lambda: torch.linalg.inv_ex(torch.eye(2))) == {}
    assert _reads(lambda: x * 2 + x.sum()) == {}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 16), nn.Tanh(), nn.Linear(16, 5))


_MAKERS = {
    "mac": lambda m, nf: mt.MAC(m, lr=0.05, t_cov=2, t_inv=4, on_nonfinite=nf),
    "smac": lambda m, nf: mt.MAC(m, lr=0.05, t_cov=2, t_inv=4, diagonal=True, on_nonfinite=nf),
    "kfac-tikhonov": lambda m, nf: mt.KFAC(m, lr=0.05, t_cov=2, t_inv=4, on_nonfinite=nf),
    "kfac-pi": lambda m, nf: mt.KFAC(m, lr=0.05, t_cov=2, t_inv=4, damping_mode="pi", on_nonfinite=nf),
    "kfac-exact": lambda m, nf: mt.KFAC(m, lr=0.05, t_cov=2, t_inv=4, damping_mode="exact",
                                        on_nonfinite=nf),
    "singd": lambda m, nf: mt.SINGD(m, lr=0.05, T=2, warn_unsupported=False, on_nonfinite=nf),
}


def _run(name, on_nonfinite, steps=12):
    """Host reads of each ``opt.step()`` (forward and backward not counted), and the optimizer."""
    model = _model()
    opt = _MAKERS[name](model, on_nonfinite)
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(8, 1, 6, 6, generator=gen)
        y = torch.randint(0, 5, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        out.append(_reads(opt.step))
    return out, opt


@pytest.mark.parametrize("name", ["mac", "smac", "kfac-tikhonov", "kfac-pi", "singd"])
def test_unchecked_steps_read_nothing(name):
    """``on_nonfinite=None``: no host read in any step — statistics steps, refresh steps (KFAC's
    inverses, through ``linalg.inv_ex`` whose status stays on the device) and plain ones."""
    reads, opt = _run(name, None)
    assert opt.preconditioner.t == 12
    assert all(r == {} for r in reads), reads


def test_unchecked_kfac_exact_reads_only_in_its_eigendecompositions():
    """The exact mode's eigendecompositions may report their status to the host (torch's
    ``eigh`` has no unchecked variant; on CUDA it synchronises): only refresh steps may read, and
    only that status; every other step reads nothing (the never-observed case of ``apply`` is
    chosen on the device)."""
    reads, _ = _run("kfac-exact", None)
    for t, r in enumerate(reads):
        assert set(r) <= ({"_linalg_check_errors"} if t % 4 == 0 else set()), (t, r)


def test_checked_mac_reads_one_value_on_steps_that_change_no_state():
    """The default checked step of MAC: one host read on steps that fold no statistics and
    refresh nothing (the gradients' finiteness and magnitude together); statistics and refresh
    steps read their new states once more; the first step also measures the parameters."""
    reads, opt = _run("mac", "skip")
    assert opt.preconditioner.t == 12
    for t, r in enumerate(reads[1:], start=1):
        total = sum(r.values())
        assert set(r) <= {"_local_scalar_dense"}, (t, r)
        assert total == (1 if t % 2 else 2), (t, r)


@pytest.mark.parametrize("name", ["kfac-tikhonov", "kfac-pi"])
def test_checked_kfac_refresh_reads_its_inverses_once(name):
    """The checked KFAC step: the inverses of a refresh are computed unchecked and read together
    once (not once per factor and per layer), so a refresh step reads at most one value more than
    a statistics step."""
    reads, opt = _run(name, "skip")
    assert opt.preconditioner.t == 12
    totals = [sum(r.values()) for r in reads]
    assert all(set(r) <= {"_local_scalar_dense"} for r in reads), reads
    stats_steps = [totals[t] for t in range(1, 12) if t % 2 == 0 and t % 4]
    refresh_steps = [totals[t] for t in range(4, 12, 4)]
    assert stats_steps and refresh_steps
    assert max(refresh_steps) <= min(stats_steps) + 1, totals
