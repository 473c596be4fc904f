"""Command line: ``python -m maccore demo`` and ``python -m maccore verify``.

``demo`` trains small models on real data with SGD, AdamW, MAC, KFAC and SINGD and prints a table
(the framework code lives in the adapters: ``maccore_torch.demo`` / ``maccore_jax.demo``, imported
only when the subcommand runs). ``verify`` runs the conformance checks of
:mod:`maccore.conformance` on every installed backend and exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser", "import_adapter_module"]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The ``maccore`` argument parser (subcommands ``demo`` and ``verify``)."""
    from maccore import _demo

    p = argparse.ArgumentParser(prog="maccore", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,verify}")

    d = sub.add_parser(
        "demo",
        help="train small models with SGD, AdamW, MAC, KFAC and SINGD and compare them",
        description="Trains an MLP and a CNN on scikit-learn's bundled digits and a tiny transformer "
        "on a generated sorting task with every method; prints a table (final train loss, test "
        "accuracy, wall-clock, optimizer-state bytes) and writes a loss plot.",
    )
    d.add_argument("--backend", choices=("torch", "jax"), default="torch",
                   help="framework adapter to run through (default: torch)")
    d.add_argument("--models", type=_csv, default=list(_demo.MODELS),
                   help=f"comma-separated subset of {','.join(_demo.MODELS)}")
    d.add_argument("--methods", type=_csv, default=list(_demo.METHODS),
                   help=f"comma-separated subset of {','.join(_demo.METHODS)}")
    d.add_argument("--epochs", type=int, default=None,
                   help="epochs per run (default: per model, see the docs; --quick: 1)")
    d.add_argument("--out", type=Path, default=Path("maccore-demo"),
                   help="output folder for the plot, table and JSON (default: ./maccore-demo)")
    d.add_argument("--seed", type=int, default=0, help="seed for data split, init and batches")
    d.add_argument("--quick", action="store_true",
                   help="reduced sizes for a smoke test (well under a minute per backend)")
    d.add_argument("--no-progress", action="store_true", help="disable progress bars")

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
    return p


def import_adapter_module(name: str):
    """Import ``maccore_torch.demo`` / ``maccore_jax.demo``; falls back to the ``adapters/``
    folder next to the package in a source checkout that is not installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        top = name.split(".")[0]
        if exc.name not in (top, name):
            raise
        adapters = Path(__file__).resolve().parent.parent / "adapters"
        if not (adapters / top).is_dir():
            raise
        sys.path.insert(0, str(adapters))
        return importlib.import_module(name)


def _run_demo(args: argparse.Namespace) -> int:
    from maccore import _demo

    cfg = _demo.DemoConfig(
        backend=args.backend,
        models=args.models,
        methods=args.methods,
        epochs=args.epochs,
        out=args.out,
        seed=args.seed,
        quick=args.quick,
        progress=not args.no_progress,
    )
    cfg.validate()
    framework = "torch" if args.backend == "torch" else "jax"
    if args.quick and framework == "jax":
        # a smoke test compiles ~15 tiny train steps: XLA's cheapest CPU pipeline halves that time
        # (must be set before jax creates its backend; results are unchanged)
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_backend_optimization_level" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0"
                                       " --xla_llvm_disable_expensive_passes=true").strip()
    try:
        importlib.import_module(framework)
    except ImportError:
        print(f"maccore demo --backend {args.backend}: {framework} is not installed; "
              f'pip install -e ".[{args.backend},demo]"', file=sys.stderr)
        return 2
    module = import_adapter_module(f"maccore_{args.backend}.demo")
    results = module.run(cfg)
    return 0 if all(r.status != "failed" for r in results) else 1


def _run_verify(args: argparse.Namespace) -> int:
    from maccore import conformance

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m maccore`` and the ``maccore`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _run_demo(args)
    return _run_verify(args)


if __name__ == "__main__":
    sys.exit(main())
