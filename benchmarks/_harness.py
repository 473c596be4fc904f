"""Paired timing harness: candidate and baseline are timed alternately, ratios per pair."""

from __future__ import annotations

import gc
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable


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
    def available(self) -> bool:
        return any(not math.isnan(r) for r in self.ratios)

    @property
    def status(self) -> str:
        if not self.available:
            return "n/a"
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


def interleaved_times(
    fns: dict[Any, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[Any, list[float]]:
    """Seconds of ``repeats`` rounds; every round times each function once, in an order rotated
    from round to round, so ratios of the i-th entries compare measurements taken side by side."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out: dict[Any, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for i in range(repeats):
            k = i % len(names)
            order = names[k:] + names[:k]
            if (i // len(names)) % 2:
                order = order[::-1]
            for n in order:
                out[n].append(time_once(fns[n], sync))
    finally:
        gc.enable()
    return out


def torchvision_import_error() -> str:
    """The last line of the error importing ``torchvision`` raises, probed in a subprocess (``""``
    when it imports or was imported already). A torchvision wheel that does not match the pinned
    torch fails at import (``operator torchvision::nms does not exist``), and ``transformers``
    imports it when it is installed."""
    import subprocess
    import sys

    if "torchvision" in sys.modules:
        return ""
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode == 0:
        return ""
    return (probe.stderr.strip().splitlines() or ["import failed"])[-1]


def hide_broken_torchvision() -> str:
    """Make a torchvision that fails at import look absent (``sys.modules["torchvision"] = None``),
    so ``transformers`` works without it; returns the import error (``""``: nothing hidden)."""
    import sys

    err = torchvision_import_error()
    if err:
        sys.modules["torchvision"] = None
    return err


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> str:
    """Platform, CPU, core count, load average (concurrent processes) and library versions."""
    import importlib
    import os

    parts = [platform.platform(), _cpu_model(), f"{os.cpu_count()} cpus"]
    try:
        parts.append("load average %.1f/%.1f/%.1f" % os.getloadavg())
    except (AttributeError, OSError):
        pass
    parts.append(f"python {platform.python_version()}")
    for mod in ("maccore", "numpy", "scipy", "torch", "jax", "cupy", "sklearn"):
        try:
            m = importlib.import_module(mod)
            parts.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception:
            pass
    return ", ".join(parts)


def print_table(results: list[Result]) -> None:
    wn = max([len("benchmark")] + [len(r.name) for r in results])
    wb = max([len("baseline")] + [len(r.baseline) for r in results])
    head = f"{'benchmark':<{wn}} {'baseline':<{wb}} {'min':>7} {'median':>7} {'max':>7} {'target':>8}  status"
    print(head)
    print("-" * len(head))
    for r in results:
        tgt = "-" if r.target is None else (f">={r.target:g}" if r.higher_is_better else f"<={r.target:g}")
        if r.available:
            vals = [x for x in r.ratios if not math.isnan(x)]
            nums = f"{min(vals):7.3f} {statistics.median(vals):7.3f} {max(vals):7.3f}"
        else:
            nums = f"{'-':>7} {'-':>7} {'-':>7}"
        print(f"{r.name:<{wn}} {r.baseline:<{wb}} {nums} {tgt:>8}  {r.status}" + (f"  ({r.note})" if r.note else ""))
