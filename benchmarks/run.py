"""Run every benchmark and print ratios against baselines measured in the same run.

    python -m benchmarks.run            # full sizes
    python -m benchmarks.run --quick    # small sizes, a smoke run

Exit status 1 when a target is missed by more than the noise (status MISS: even the best of the
paired repeats is past the target).
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import bench_core
from benchmarks._harness import machine_info, print_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    p.add_argument("--repeats", type=int, default=None, help="paired repeats per benchmark")
    p.add_argument("--only", choices=["core", "train"], default=None)
    args = p.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 15)
    print(f"machine: {machine_info()}")
    results = []
    if args.only in (None, "core"):
        results += bench_core.run(repeats, args.quick)
    if args.only in (None, "train"):
        try:
            from benchmarks import bench_train
        except ImportError as exc:  # adapters missing
            print(f"training benchmarks unavailable: {exc}")
        else:
            results += bench_train.run(repeats, args.quick)
    print_table(results)
    missed = [r for r in results if r.status == "MISS"]
    if missed:
        print(f"\n{len(missed)} target(s) missed: " + ", ".join(r.name for r in missed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
