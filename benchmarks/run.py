"""Run every benchmark and print ratios against baselines measured in the same run.

    python -m benchmarks.run            # full sizes (about 5 minutes on 2 loaded cores)
    python -m benchmarks.run --quick    # small sizes, few repeats: a smoke run
    python -m benchmarks.run --only train --repeats 21

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    p.add_argument("--repeats", type=int, default=None, help="paired repeats per benchmark")
    p.add_argument("--only", choices=["core", "train"], default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads for torch and NumPy's BLAS (default 1: stable ratios on a shared "
                        "machine; 0 keeps the libraries' defaults)")
    args = p.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 15)
    print(f"machine: {machine_info()}")
    print(f"threads: {args.threads or 'library defaults'}; repeats: {repeats}" + ("; quick" if args.quick else ""))
    results = []
    with _threads(args.threads):
        if args.only in (None, "core"):
            results += bench_core.run(repeats, args.quick)
        if args.only in (None, "train"):
            try:
                from benchmarks import bench_train
            except ImportError as exc:  # torch or the adapter missing
                print(f"training benchmarks unavailable: {exc}")
            else:
                results += bench_train.run(repeats, args.quick)
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
