"""``python -m maccore verify``: the conformance checks of :mod:`maccore.testing.conformance` on
every installed backend, printed as a pass/fail table (exit status 1 on any failure), after the
problem sizes and the oracle of every check; ``--adapters`` checks the torch / JAX optimizers'
updates against the core (:mod:`maccore.testing.adapters_check`); ``--against LIB`` compares maccore's references with
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


def _names(what: str, known: Any) -> Any:
    """An argparse ``type``: a non-empty comma-separated subset of ``known()``; anything else is a
    usage error (exit status 2, no traceback; a failed check exits 1)."""

    def parse(value: str) -> list[str]:
        names = _csv(value)
        if not names:
            raise argparse.ArgumentTypeError(f"empty list {value!r}: name at least one {what}")
        valid = list(known())
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what}{'s' if len(unknown) > 1 else ''} {unknown}; known: {', '.join(valid)}")
        return names

    return parse


def _known_backends() -> Any:
    from maccore.testing import conformance

    return conformance.BACKENDS


def _known_dtypes() -> Any:
    from maccore.testing import conformance

    return conformance.TOLERANCES


def _known_checks() -> Any:
    from maccore.testing import conformance

    return [n for n, _ in conformance.check_names()]


def _known_libraries() -> Any:
    from maccore.testing import against

    return against.LIBRARIES


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
    v.add_argument("--backends", type=_names("backend", _known_backends), default=None,
                   help="comma-separated subset of numpy,array_api_strict,torch,jax,cupy "
                   "(default: every installed one)")
    v.add_argument("--dtypes", type=_names("dtype", _known_dtypes), default=["float64", "float32"],
                   help="comma-separated dtypes (default: float64,float32)")
    v.add_argument("--checks", type=_names("check", _known_checks), default=None,
                   help="comma-separated subset of checks (see --list)")
    v.add_argument("--list", action="store_true",
                   help="list the checks with their propositions, problem sizes and oracles, and exit")
    other = v.add_mutually_exclusive_group()
    other.add_argument("--against", type=_names("library", _known_libraries), default=None,
                       metavar="LIB[,LIB]",
                       help="compare maccore's references with another library instead: "
                       "curvlinops, backpack, kfac-jax (skipped with the reason when not installed)")
    other.add_argument("--adapters", action="store_true",
                       help="check the torch and JAX optimizers' updates against the core on "
                       "captured arrays instead (MAC, SMAC, KFAC, SINGD on tiny float64 models; "
                       "a framework that is not installed is skipped with the reason)")
    v.add_argument("--quiet", action="store_true", help="do not print the sizes and oracles")
    v.add_argument("--perturb-oracle", type=float, default=0.0, metavar="EPS",
                   help="self-test of the harness: add EPS·max(1, |oracle|) to every oracle; "
                   "the run must then FAIL")
    return v


def run_command(args: argparse.Namespace) -> int:
    """Run ``verify`` with parsed ``args``; returns the exit status (0 pass, 1 fail, 2 no backend).
    Bad ``--backends`` / ``--dtypes`` / ``--checks`` / ``--against`` lists are usage errors of the
    parser (exit status 2, no traceback)."""
    from maccore.testing import conformance

    if args.list:
        print(conformance.format_details())
        print(f"\npropositions: {MATH_DOC}")
        return 0
    if getattr(args, "against", None):
        return _run_against(args.against)
    if getattr(args, "adapters", False):
        return _run_adapters()
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


def _run_adapters() -> int:
    from maccore.testing import adapters_check

    print("one step of each adapter's preconditioner (float64, t_cov = t_inv = 1, SINGD T = 1) vs "
          "the core (maccore.engine) on the layer inputs and output gradients captured by the "
          "check itself; error: worst relative Frobenius error over the parameters")
    results = adapters_check.run_adapter_checks()
    print(adapters_check.format_adapter_results(results))
    failed = sum(r.status == "fail" for r in results)
    skipped = sum(r.status == "skip" for r in results)
    passed = len(results) - failed - skipped
    print(f"\n{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0
