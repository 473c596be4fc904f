"""``python -m maccore verify``: the conformance checks of :mod:`maccore.testing.conformance` on
every installed backend, printed as a pass/fail table (exit status 1 on any failure)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_parser", "run_command"]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``verify`` subcommand to the subparsers ``sub`` of the ``maccore`` parser."""
    v = sub.add_parser(
        "verify",
        help="run the conformance checks on every installed backend",
        description="Checks the core against exact float64 oracles (exact-KFAC propositions, MAC "
        "properties, rank-1 vs dense inverse, KFAC damping modes, im2col) and NumPy on every "
        "installed backend; prints a pass/fail table and exits 1 on any failure.",
    )
    v.add_argument("--backends", type=_csv, default=None,
                   help="comma-separated subset of numpy,array_api_strict,torch,jax,cupy "
                   "(default: every installed one)")
    v.add_argument("--dtypes", type=_csv, default=["float64", "float32"],
                   help="comma-separated dtypes (default: float64,float32)")
    v.add_argument("--checks", type=_csv, default=None, help="comma-separated subset of checks")
    v.add_argument("--list", action="store_true", help="list the checks and exit")
    v.add_argument("--perturb-oracle", type=float, default=0.0, metavar="EPS",
                   help="self-test of the harness: add EPS·max(1, |oracle|) to every oracle; "
                   "the run must then FAIL")
    return v


def run_command(args: argparse.Namespace) -> int:
    """Run ``verify`` with parsed ``args``; returns the exit status (0 pass, 1 fail, 2 no backend)."""
    from maccore.testing import conformance

    if args.list:
        for name, doc in conformance.check_names():
            print(f"{name:32s} {doc}")
        return 0
    perturb = None
    if args.perturb_oracle:
        eps = args.perturb_oracle

        def perturb(_name, oracle):
            import numpy as np

            return oracle + eps * max(1.0, float(np.abs(oracle).max(initial=0.0)))

    backends = conformance.available_backends(args.backends)
    if not backends:
        print("maccore verify: none of the requested backends is installed", file=sys.stderr)
        return 2
    print("backends: " + ", ".join(b.label for b in backends), flush=True)
    results = conformance.run_checks(backends, dtypes=args.dtypes, checks=args.checks, perturb=perturb)
    print(conformance.format_table(results))
    failed = sum(not r.passed for r in results)
    print(f"\n{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0
