"""Paired timing harness: candidate and baseline are timed alternately, ratios per pair."""

from __future__ import annotations

import gc
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Result:
    name: str
    baseline: str
    target: float | None  # ratio must be <= target (None: report only)
    ratios: list[float] = field(default_factory=list)
    unit: str = "time"
    note: str = ""
    higher_is_better: bool = False

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def status(self) -> str:
        if self.target is None:
            return "report"
        if self.higher_is_better:
            if self.median >= self.target:
                return "PASS"
            return "MISS" if max(self.ratios) < self.target else "NOISY"
        if self.median <= self.target:
            return "PASS"
        # missed by more than the noise: even the best pair is above the target
        return "MISS" if min(self.ratios) > self.target else "NOISY"


def time_once(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    if sync:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def paired_ratios(
    candidate: Callable[[], object],
    baseline: Callable[[], object],
    *,
    repeats: int,
    inner: int = 1,
    warmup: int = 2,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Ratios candidate/baseline of ``repeats`` alternating measurements (each the min of ``inner``)."""
    for _ in range(warmup):
        candidate()
        baseline()
    ratios = []
    gc.disable()
    try:
        for i in range(repeats):
            order = (candidate, baseline) if i % 2 == 0 else (baseline, candidate)
            times = {}
            for fn in order:
                times[fn] = min(time_once(fn, sync) for _ in range(inner))
            ratios.append(times[candidate] / times[baseline])
    finally:
        gc.enable()
    return ratios


def machine_info() -> str:
    import importlib

    parts = [platform.platform(), platform.processor() or platform.machine(), f"python {platform.python_version()}"]
    for mod in ("numpy", "torch", "jax", "cupy"):
        try:
            m = importlib.import_module(mod)
            parts.append(f"{mod} {m.__version__}")
        except Exception:
            pass
    try:
        import os

        parts.append(f"{os.cpu_count()} cpus")
    except Exception:
        pass
    return ", ".join(parts)


def print_table(results: list[Result]) -> None:
    head = f"{'benchmark':<52} {'baseline':<34} {'min':>7} {'median':>7} {'max':>7} {'target':>8}  status"
    print(head)
    print("-" * len(head))
    for r in results:
        tgt = "-" if r.target is None else (f">={r.target:g}" if r.higher_is_better else f"<={r.target:g}")
        print(
            f"{r.name:<52} {r.baseline:<34} {min(r.ratios):7.3f} {r.median:7.3f} {max(r.ratios):7.3f} "
            f"{tgt:>8}  {r.status}" + (f"  ({r.note})" if r.note else "")
        )
