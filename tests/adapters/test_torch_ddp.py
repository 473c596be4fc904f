"""torch.distributed: 2 CPU processes (gloo, DDP) == one process on the concatenated batch.

Statistics are all-reduced weighted by row counts, so every rank applies the preconditioner of
the global batch; DDP averages the gradients. MAC (with the first-layer inverse fitted on the
ranks' shards), SMAC, KFAC and SINGD (dense and structured factors) are checked.

SMAC's gradient statistic E_rows[g⊙g] is not renormalised by the batch size: with per-rank mean
losses and DDP's averaged gradients every rank's output-gradient rows are W times those of the
effective (global-mean) loss, and the adapter divides them by the world size
(``CurvatureMethod.grad_stats_scale_with_loss``, ``maccore.engine.data_parallel_grad_scale``).
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.adapters.torch_helpers import assert_params_close, params_of

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import maccore_torch as mt  # noqa: E402

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed"),
]

WORLD = 2
DT = torch.float64


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 8),
                         nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
            for _ in range(6)]


def _fit_batches():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(6, 2, 4, 4, generator=g, dtype=DT) for _ in range(2)]


METHODS = ("MAC", "SMAC", "KFAC", "SINGD", "SINGD-diag")


def _make(method, model):
    if method == "MAC":
        return mt.MAC(model, lr=0.1, stat_decay=0.8, damping=0.5, t_cov=2, t_inv=3)
    if method == "SMAC":  # per-row gradient diagonal: sensitive to the loss's normalisation
        return mt.MAC(model, lr=0.1, stat_decay=0.8, damping=0.05, t_cov=1, t_inv=2, diagonal=True)
    if method == "SINGD":
        return mt.SINGD(model, lr=0.05, damping=0.1, T=2, lr_cov=0.05, warn_unsupported=False)
    if method == "SINGD-diag":
        return mt.SINGD(model, lr=0.05, damping=0.1, T=1, lr_cov=0.05, structures=("diagonal", "dense"),
                        kfac_like=True, alpha1=0.0, warn_unsupported=False)
    return mt.KFAC(model, lr=0.05, damping=0.3, t_cov=1, t_inv=2)


def _shard(t, rank):
    n = t.shape[0] // WORLD
    return t[rank * n:(rank + 1) * n]


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for method in METHODS:
            model = _net()
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = _make(method, model)
            if method == "MAC":
                opt.fit_first_layer([_shard(b, rank) for b in _fit_batches()])
            for x, y in _data():
                opt.zero_grad()
                F.cross_entropy(ddp(_shard(x, rank)), _shard(y, rank)).backward()
                opt.step()
            torch.save(params_of(model), os.path.join(out_dir, f"{method}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for method in METHODS:
        model = _net()
        opt = _make(method, model)
        if method == "MAC":
            opt.fit_first_layer([_shard(b, r) for b in _fit_batches() for r in range(WORLD)])
        for x, y in _data():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        single = params_of(model)
        ranks = [torch.load(tmp_path / f"{method}-{r}.pt") for r in range(WORLD)]
        moved = max(float((a - b).abs().max()) for a, b in zip(single, params_of(_net())))
        assert moved > 1e-3, f"{method}: the parameters barely moved; the comparison would be vacuous"
        assert_params_close(ranks[0], ranks[1], rtol=0, atol=0, what=f"{method} ranks")
        assert_params_close(ranks[0], single, rtol=1e-9, atol=1e-11, what=f"{method} ddp vs single")
