"""Communication volume and per-rank memory of the torch adapter under torch.distributed.

    python -m benchmarks.comms                     # widths 256 512 1024 2048, 2 CPU processes (gloo)
    python -m benchmarks.comms --widths 128 256    # other widths

Model: ``Linear(w, w) → ReLU → Linear(w, w) → ReLU → Linear(w, 10)`` (float32), batch 16 per rank.

1. DDP: the bytes every rank passes to ``dist.all_reduce`` during one statistics step of each
   method (``t_cov = t_inv = 1``, step 0), counted by wrapping ``torch.distributed.all_reduce`` in
   this script (the library is unchanged). DDP's own gradient all-reduce runs in its C++ reducer
   and is not counted; the parameter bytes (what it moves per step) are printed beside it.
2. FSDP2 (``fully_shard`` on every Linear and the root): per rank, the bytes of the local
   parameter shards, of MAC's (and SMAC's) curvature state (replicated: ``O(d̃)`` per layer) and of
   the momentum buffers (sharded like the parameters), after 2 steps. KFAC cannot run under FSDP2
   (its output-side inverse mixes the rows of the sharded gradient); its state size under DDP is
   given for comparison.

Prints two markdown tables (the ones in docs/distributed.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

try:
    import maccore_torch as mt
except ImportError:  # a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
    import maccore_torch as mt

WORLD = 2
BATCH = 16
METHODS = {
    "MAC": lambda m: mt.MAC(m, lr=0.01, t_cov=1, t_inv=1),
    "SMAC": lambda m: mt.MAC(m, lr=0.01, t_cov=1, t_inv=1, diagonal=True),
    "KFAC": lambda m: mt.KFAC(m, lr=0.01, damping=0.1, t_cov=1, t_inv=1),
    "SINGD": lambda m: mt.SINGD(m, lr=0.01, T=1, warn_unsupported=False),
    "SINGD (dense K, diagonal C)": lambda m: mt.SINGD(m, lr=0.01, T=1, structures=("dense", "diagonal"),
                                                      warn_unsupported=False),
}
FSDP_METHODS = ("MAC", "SMAC", "SINGD (dense K, diagonal C)")


def _net(w: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))


def _nbytes(ts) -> int:
    out = 0
    for t in ts:
        if t is None:
            continue
        if hasattr(t, "to_local"):
            t = t.to_local()
        out += t.numel() * t.element_size()
    return out


def _state_bytes(opt) -> int:
    from maccore.checkpoint import flatten_state  # noqa: PLC0415
    pre = opt.preconditioner
    return sum(_nbytes(flatten_state(l.state)[0].values()) for l in pre.layers)


class _Counter:
    """Wraps ``dist.all_reduce``: calls and bytes."""

    def __init__(self):
        self.calls, self.bytes = 0, 0
        self._orig = dist.all_reduce

    def __enter__(self):
        def wrapped(tensor, *args, **kwargs):
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return self._orig(tensor, *args, **kwargs)
        dist.all_reduce = wrapped
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def _step(model, opt, rank, seed, w):
    g = torch.Generator().manual_seed(seed * WORLD + rank)
    x = torch.randn(BATCH, w, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _worker(rank, init_file, widths, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    rows = []
    try:
        for w in widths:
            params = sum(p.numel() for p in _net(w).parameters())
            for name, make in METHODS.items():
                model = _net(w)
                ddp = nn.parallel.DistributedDataParallel(model)
                opt = make(model)
                with _Counter() as c:
                    _step(ddp, opt, rank, 0, w)
                rows.append(("ddp", w, name, params * 4, c.calls, c.bytes, _state_bytes(opt)))
                del ddp, opt, model
            from torch.distributed.fsdp import fully_shard  # noqa: PLC0415
            for name in FSDP_METHODS:
                model = _net(w)
                for m in model:
                    if isinstance(m, nn.Linear):
                        fully_shard(m)
                fully_shard(model)
                opt = METHODS[name](model)
                with _Counter() as c:
                    for s in range(2):
                        _step(model, opt, rank, s, w)
                mom = _nbytes(st.get("momentum_buffer") for st in opt.state.values())
                rows.append(("fsdp", w, name, _nbytes(model.parameters()), c.calls // 2, c.bytes // 2,
                             _state_bytes(opt), mom))
                del opt, model
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(rows, out)


def _mib(b: float) -> str:
    return f"{b / 2**20:.3f} MiB" if b < 2**20 * 10 else f"{b / 2**20:.1f} MiB"


def _kib(b: float) -> str:
    return f"{b / 2**10:.1f} KiB" if b < 2**20 else _mib(b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.pt")
        mp.spawn(_worker, args=(os.path.join(d, "init"), args.widths, out), nprocs=WORLD, join=True)
        rows = torch.load(out)
    print(f"torch {torch.__version__}, {WORLD} processes (gloo), float32, batch {BATCH} per rank\n")
    print("DDP: bytes passed to dist.all_reduce per statistics step (per rank), and the curvature "
          "state per rank")
    print("\n| width | parameters (= DDP gradient all-reduce) | method | all-reduce calls | "
          "all-reduce bytes | ratio to MAC | curvature state |")
    print("|---|---|---|---|---|---|---|")
    mac = {r[1]: r[5] for r in rows if r[0] == "ddp" and r[2] == "MAC"}
    for kind, w, name, pbytes, calls, nbytes, state, *_ in rows:
        if kind == "ddp":
            print(f"| {w} | {_mib(pbytes)} | {name} | {calls} | {_kib(nbytes)} | "
                  f"{nbytes / mac[w]:.0f}× | {_kib(state)} |")
    print("\nFSDP2: per rank, after 2 steps (every Linear and the root fully_shard-ed)")
    print("\n| width | method | parameter shard | momentum (sharded) | curvature state (replicated) "
          "| all-reduce calls per step (statistics + finiteness flags) | all-reduce bytes per step |")
    print("|---|---|---|---|---|---|---|")
    for kind, w, name, pbytes, calls, nbytes, state, *rest in rows:
        if kind == "fsdp":
            print(f"| {w} | {name} | {_mib(pbytes)} | {_mib(rest[0])} | {_kib(state)} | {calls} | "
                  f"{_kib(nbytes)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
