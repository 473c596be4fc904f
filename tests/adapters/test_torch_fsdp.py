"""FSDP2 (``fully_shard``): 2 CPU processes (gloo) == one process on the concatenated batch.

Every parameter is a ``DTensor`` sharded by rows. The statistics are all-reduced once per
statistics step (the weighted all-reduce of ``maccore_torch.distributed``); the preconditioner is
applied to each rank's rows of ``grad.to_local()`` (row-local methods only: MAC, SMAC, the
first-layer inverse, SINGD with a diagonal output-side factor). The row counts are odd (7, 5, 3)
so the two shards differ in size. Methods that mix rows (KFAC, SINGD with a dense output-side
factor) raise at construction, naming the layer.

Every method uses the usual convention: each rank's loss is the mean over its own rows and FSDP2
averages the gradients. SMAC's statistic E_rows[g⊙g] is not renormalised by the batch size, so
the adapter divides its output-gradient rows by the world size
(``CurvatureMethod.grad_stats_scale_with_loss``).
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.adapters.torch_helpers import params_of

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import maccore_torch as mt  # noqa: E402

try:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    fully_shard = None

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or sys.platform == "win32" or fully_shard is None,
                       reason="needs torch.distributed with FSDP2 (fully_shard)"),
]

WORLD = 2
DT = torch.float32
STEPS = 7  # crosses the statistics (t_cov) and refresh (t_inv) schedules several times


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(80, 7),
                         nn.Tanh(), nn.Linear(7, 3)).to(DT)


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
            for _ in range(STEPS)]


def _fit_batches():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(6, 2, 4, 4, generator=g, dtype=DT) for _ in range(2)]


METHODS = ("MAC", "MAC-unchecked", "SMAC", "MAC-first", "SINGD-dense-diag", "SINGD-diag-diag")


def _make(method, model):
    if method == "MAC":
        return mt.MAC(model, lr=0.1, stat_decay=0.8, damping=0.5, t_cov=2, t_inv=3)
    if method == "MAC-unchecked":  # on_nonfinite=None: the in-place update path, no checks
        return mt.MAC(model, lr=0.1, stat_decay=0.8, damping=0.5, t_cov=2, t_inv=3, on_nonfinite=None,
                      weight_decay_mode="decoupled")
    if method == "SMAC":
        return mt.MAC(model, lr=0.1, stat_decay=0.8, damping=0.5, t_cov=1, t_inv=2, diagonal=True)
    if method == "MAC-first":
        return mt.MAC(model, lr=0.1, stat_decay=0.8, damping=0.5, t_cov=1, t_inv=2)
    if method == "SINGD-dense-diag":
        return mt.SINGD(model, lr=0.05, damping=0.1, T=2, lr_cov=0.05, structures=("dense", "diagonal"),
                        warn_unsupported=False)
    if method == "SINGD-diag-diag":
        return mt.SINGD(model, lr=0.05, damping=0.1, T=1, lr_cov=0.05,
                        structures=("diagonal", "diagonal"), warn_unsupported=False)
    raise AssertionError(method)


REFUSED = {
    "KFAC": lambda m: mt.KFAC(m, lr=0.05, damping=0.3, t_cov=1, t_inv=2),
    "SINGD-dense-dense": lambda m: mt.SINGD(m, lr=0.05, damping=0.1, structures=("dense", "dense"),
                                            warn_unsupported=False),
}


def _shard(t, rank):
    n = t.shape[0] // WORLD
    return t[rank * n:(rank + 1) * n]


def _fsdp(model):
    for m in model:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fully_shard(m)
    fully_shard(model)
    return model


def _full(model):
    return [p.full_tensor().detach().clone() if isinstance(p, DTensor) else p.detach().clone()
            for p in model.parameters()]


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for method in METHODS:
            model = _fsdp(_net())
            assert all(isinstance(p, DTensor) for p in model.parameters())
            opt = _make(method, model)
            if method == "MAC-first":
                opt.fit_first_layer([_shard(b, rank) for b in _fit_batches()])
            for x, y in _data():
                opt.zero_grad()
                F.cross_entropy(model(_shard(x, rank)), _shard(y, rank)).backward()
                opt.step()
            torch.save(_full(model), os.path.join(out_dir, f"{method}-{rank}.pt"))
        errors = {}
        for name, make in REFUSED.items():
            try:
                make(_fsdp(_net()))
                errors[name] = None
            except ValueError as exc:
                errors[name] = str(exc)
        torch.save(errors, os.path.join(out_dir, f"errors-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single(method):
    model = _net()
    opt = _make(method, model)
    if method == "MAC-first":
        opt.fit_first_layer([_shard(b, r) for b in _fit_batches() for r in range(WORLD)])
    for x, y in _data():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return params_of(model)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_equals_single_process(fsdp_run, method):
    single = _single(method)
    ranks = [torch.load(fsdp_run / f"{method}-{r}.pt") for r in range(WORLD)]
    init = params_of(_net())
    moved = max(float((a - b).abs().max()) for a, b in zip(single, init))
    assert moved > 1e-3, f"{method}: the parameters barely moved; the comparison would be vacuous"
    for i, (a, b, s, p0) in enumerate(zip(ranks[0], ranks[1], single, init)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{method} ranks param {i}: {m}")
        # relative to the size of the update (the parameters themselves are O(1))
        err = float((a - s).abs().max()) / max(float((s - p0).abs().max()), 1e-30)
        assert err <= 1e-5, f"{method} param {i}: FSDP2 vs single process, relative error {err:.2e}"
        rel = float((a - s).abs().max()) / float(s.abs().max())
        assert rel <= 1e-6, f"{method} param {i}: FSDP2 vs single process, relative error {rel:.2e}"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_fsdp2_refuses_row_mixing_preconditioners(fsdp_run, name):
    for r in range(WORLD):
        msg = torch.load(fsdp_run / f"errors-{r}.pt")[name]
        assert msg is not None, f"{name} under FSDP2 should raise at construction"
        assert "FSDP2" in msg and "'0'" in msg and "rows" in msg, msg
