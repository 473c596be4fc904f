"""Run every benchmark and print ratios against baselines measured in the same run.

    python -m benchmarks.run            # full sizes, at the default threads and at one thread
    python -m benchmarks.run --quick    # small sizes, few repeats: a smoke run
    python -m benchmarks.run --only train --repeats 21 --threads 1

Every benchmark runs twice by default: at the libraries' default thread counts (what a user gets:
torch's intra-op pool and NumPy's BLAS pool as they start) and with one compute thread; the table
shows both, tagged ``[default threads]`` / ``[1 thread]``. The rows "fast path vs plain path" time
each native fast path behind ``maccore.mac_apply`` against the standard-only path it replaces
(the same call with the fast paths switched off), target ≤ 1: a fast path that loses at either
thread count is a MISS and the command fails.

Every ratio is candidate / baseline of measurements taken side by side (alternating, or for the
training steps interleaved step by step), shown as min / median / max over the repeats. Status:
PASS (median meets the target), NOISY (median misses, but some repeat meets it: within the noise),
MISS (every repeat misses: missed by more than the noise), report (no target), n/a (unavailable).

Exit status 1 when a target is MISSed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from benchmarks import bench_core
from benchmarks._harness import machine_info, print_table


def _threads(n: int) -> contextlib.AbstractContextManager:
    """Limit torch's intra-op threads and the BLAS/OpenMP pools of NumPy to ``n`` (0: defaults)."""
    stack = contextlib.ExitStack()
    if n <= 0:
        return stack
    try:
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(n)
        stack.callback(torch.set_num_threads, old)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        stack.enter_context(threadpool_limits(limits=n))
    except ImportError:
        print("note: threadpoolctl is not installed; NumPy's BLAS keeps its own thread count")
    return stack


def _label(n: int) -> str:
    return "default threads" if n == 0 else f"{n} thread" + ("s" if n > 1 else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    p.add_argument("--repeats", type=int, default=None, help="paired repeats per benchmark")
    p.add_argument("--only", choices=["core", "train"], default=None)
    p.add_argument("--threads", default="0,1",
                   help="comma-separated compute-thread settings for torch and NumPy's BLAS, each run in "
                        "turn (0: the libraries' defaults; default '0,1': both)")
    args = p.parse_args(argv)
    try:
        settings = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        p.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if not settings or min(settings) < 0:
        p.error(f"--threads must be integers >= 0, got {args.threads!r}")
    repeats = args.repeats or (5 if args.quick else 15)
    print(f"machine: {machine_info()}")
    print(f"threads: {', '.join(_label(n) for n in settings)}; repeats: {repeats}" + ("; quick" if args.quick else ""))
    results = []
    for n in settings:
        part = []
        with _threads(n):
            if args.only in (None, "core"):
                part += bench_core.run(repeats, args.quick)
            if args.only in (None, "train"):
                try:
                    from benchmarks import bench_train
                except ImportError as exc:  # torch or the adapter missing
                    print(f"training benchmarks unavailable: {exc}")
                else:
                    part += bench_train.run(repeats, args.quick)
        for r in part:
            r.name = f"{r.name} [{_label(n)}]"
        results += part
    print_table(results)
    try:
        import os

        print("load average at the end: %.1f/%.1f/%.1f" % os.getloadavg())
    except (AttributeError, OSError):
        pass
    missed = [r for r in results if r.status == "MISS"]
    if missed:
        print(f"\n{len(missed)} target(s) missed: " + ", ".join(r.name for r in missed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
