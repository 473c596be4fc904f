"""``python -m maccore verify``: the conformance checks of :mod:`maccore.testing.conformance` on
every installed backend, printed as a pass/fail table (exit status 1 on any failure), after the
problem sizes and the oracle of every check; ``--against LIB`` compares maccore's references with
curvlinops / BackPACK / kfac-jax where installed (:mod:`maccore.testing.against`).

The propositions the checks cite (P-K…, M-P…, S-T…) are stated in ``docs/math.md``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_parser", "run_command", "MATH_DOC"]

#: Where the propositions cited by the checks are stated.
MATH_DOC = "docs/math.md"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``verify`` subcommand to the subparsers ``sub`` of the ``maccore`` parser."""
    v = sub.add_parser(
        "verify",
        help="run the conformance checks on every installed backend",
        description="Checks the core against exact float64 oracles (exact-KFAC propositions, MAC "
        "properties, rank-1 vs dense inverse, KFAC damping modes, im2col) and NumPy on every "
        "installed backend; prints each check's problem sizes and oracle, then a pass/fail table, "
        "and exits 1 on any failure. The propositions are stated in docs/math.md.",
    )
    v.add_argument("--backends", type=_csv, default=None,
                   help="comma-separated subset of numpy,array_api_strict,torch,jax,cupy "
                   "(default: every installed one)")
    v.add_argument("--dtypes", type=_csv, default=["float64", "float32"],
                   help="comma-separated dtypes (default: float64,float32)")
    v.add_argument("--checks", type=_csv, default=None, help="comma-separated subset of checks")
    v.add_argument("--list", action="store_true",
                   help="list the checks with their propositions, problem sizes and oracles, and exit")
    v.add_argument("--against", type=_csv, default=None, metavar="LIB[,LIB]",
                   help="compare maccore's references with another library instead: "
                   "curvlinops, backpack, kfac-jax (skipped with the reason when not installed)")
    v.add_argument("--quiet", action="store_true", help="do not print the sizes and oracles")
    v.add_argument("--perturb-oracle", type=float, default=0.0, metavar="EPS",
                   help="self-test of the harness: add EPS·max(1, |oracle|) to every oracle; "
                   "the run must then FAIL")
    return v


def run_command(args: argparse.Namespace) -> int:
    """Run ``verify`` with parsed ``args``; returns the exit status (0 pass, 1 fail, 2 no backend)."""
    from maccore.testing import conformance

    if args.list:
        print(conformance.format_details())
        print(f"\npropositions: {MATH_DOC}")
        return 0
    if getattr(args, "against", None):
        return _run_against(args.against)
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
    if not getattr(args, "quiet", False):
        infos = conformance.check_details()
        if args.checks is not None:
            infos = [i for i in infos if i.name in args.checks]
        print(f"\nchecks: propositions (stated in {MATH_DOC}), problem sizes, oracles")
        print(conformance.format_details(infos) + "\n", flush=True)
    results = conformance.run_checks(backends, dtypes=args.dtypes, checks=args.checks, perturb=perturb)
    print(conformance.format_table(results))
    failed = sum(not r.passed for r in results)
    print(f"\n{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _run_against(libraries: list[str]) -> int:
    from maccore.testing import against

    unknown = [lib for lib in libraries if lib not in against.LIBRARIES]
    if unknown:
        print(f"maccore verify: unknown --against {unknown}; known: {', '.join(against.LIBRARIES)}",
              file=sys.stderr)
        return 2
    results = []
    for lib in libraries:
        results.extend(against.run_against(lib))
    print(f"maccore's float64 references (maccore_torch.testing.curvature_blocks) vs {', '.join(libraries)}; "
          "other libraries' layouts converted with maccore.testing.convert")
    print(against.format_against(results))
    failed = sum(r.status == "fail" for r in results)
    skipped = sum(r.status == "skip" for r in results)
    passed = len(results) - failed - skipped
    print(f"\n{passed} passed, {failed} failed, {skipped} skipped (conventions: docs/verify.md; "
          f"propositions: {MATH_DOC})")
    return 1 if failed else 0
