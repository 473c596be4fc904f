"""KFAC and SINGD on a ResNet-18-sized CNN (torch CPU): step time against SGD with momentum, and
maccore's SINGD against the published ``singd`` package's on the same model, side by side.

    python -m benchmarks.bench_resnet                     # 3 blocks of 10 steps per optimizer
    python -m benchmarks.bench_resnet --repeats 5 --threads 1
    python -m benchmarks.bench_resnet --profile           # where the time of each step goes

The model is the CIFAR variant of ResNet-18 (3×3 stem, four stages of two basic blocks, widths
64–512, batch norm; 11.2 M parameters), written here (no torchvision), on random 32×32 images,
batch 32. Every optimizer uses its curvature schedule at the library defaults except where a
comparison needs equal work: maccore's SINGD and the ``singd`` package's both run dense
structures with ``T=10`` (a preconditioner update every 10 steps), the same ``lr_cov``,
``alpha1`` and damping. A block is 10 steps (one SINGD/KFAC schedule period); the optimizers
advance step by step in turn, so the i-th blocks cover the same stretch of wall time (see
``bench_train``). The ``singd`` rows are ``n/a`` when the package is not installed
(``pip install "torch==<the pinned version>" singd``: benchmark-only, never a dependency).

``--profile`` runs ``torch.profiler`` over one block of each curvature optimizer and prints the
operators that take the most CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:  # installed, or on PYTHONPATH
    import maccore_torch
except ImportError:  # a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
    import maccore_torch

from benchmarks._harness import Result, machine_info, print_table
from benchmarks.bench_train import interleaved_blocks

BATCH = 32
BLOCK = 10
LR = 0.01


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.short(x))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


SINGD_COMMON = dict(lr=LR, momentum=0.9, damping=1e-3, alpha1=0.5, lr_cov=1e-2, T=BLOCK,
                    structures=("dense", "dense"))


def make_optimizer(name: str, model: nn.Module) -> Any:
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    if name == "MAC":
        return maccore_torch.MAC(model, lr=LR, momentum=0.9)
    if name == "KFAC":
        return maccore_torch.KFAC(model, lr=LR, momentum=0.9)
    if name == "SINGD":
        return maccore_torch.SINGD(model, warn_unsupported=False, **SINGD_COMMON)
    if name == "singd package":
        try:
            from singd.optim.optimizer import SINGD
        except ImportError:
            return None
        return SINGD(model, warn_unsupported=False, **SINGD_COMMON)
    raise ValueError(name)


class Trainer:
    def __init__(self, name: str, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = ResNet18()
        self.opt = make_optimizer(name, self.model)
        g = torch.Generator().manual_seed(1)
        self.batches = [(torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
                        for _ in range(4)]
        self.k = 0

    def step(self) -> float:
        x, y = self.batches[self.k % len(self.batches)]
        self.k += 1
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()
        return time.perf_counter() - t0


def run(repeats: int, names=("SGD", "MAC", "KFAC", "SINGD", "singd package")) -> list[Result]:
    trainers = {n: Trainer(n) for n in names}
    missing = [n for n, t in trainers.items() if t.opt is None]
    trainers = {n: t for n, t in trainers.items() if t.opt is not None}
    times = interleaved_blocks(trainers, rounds=repeats, block=BLOCK)
    med = {n: statistics.median(v) / BLOCK * 1e3 for n, v in times.items()}

    def ratios(a: str, b: str) -> list[float]:
        if a not in times or b not in times:
            return [float("nan")]
        return [x / y for x, y in zip(times[a], times[b])]

    label = f"torch-cpu ResNet-18 32x32 b{BATCH}"
    out = [Result(f"{label}: {n} step", "SGD(momentum) step", None, ratios(n, "SGD"),
                  note=f"median {med[n]:.0f} ms/step, SGD {med['SGD']:.0f} ms/step" if n in med else "")
           for n in names if n != "SGD"]
    out.append(Result(f"{label}: SINGD dense step", "singd package's dense step", 0.5,
                      ratios("SINGD", "singd package"),
                      note="singd not installed" if "singd package" in missing else f"T={BLOCK}, same hyperparameters"))
    return out


def profile(names=("KFAC", "SINGD", "singd package"), top: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile as tprofile

    for n in names:
        tr = Trainer(n)
        if tr.opt is None:
            print(f"{n}: unavailable")
            continue
        for _ in range(BLOCK):
            tr.step()
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(BLOCK):
                tr.step()
        print(f"\n== {n}: one block of {BLOCK} steps, top {top} operators by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv=None) -> int:
    from benchmarks.run import _threads

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="blocks of 10 steps per optimizer")
    p.add_argument("--threads", type=int, default=0, help="compute threads (0: library defaults)")
    p.add_argument("--profile", action="store_true", help="profile one block of each curvature optimizer")
    args = p.parse_args(argv)
    print(f"machine: {machine_info()}")
    with _threads(args.threads):
        print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)")
        if args.profile:
            profile()
            return 0
        results = run(args.repeats)
    print_table(results)
    return int(any(r.status == "MISS" for r in results))


if __name__ == "__main__":
    sys.exit(main())
