"""Command line: ``python -m maccore demo``, ``python -m maccore verify`` and ``--version``.

``demo`` trains small models on real data with SGD, AdamW, MAC, KFAC and SINGD over several seeds
and prints a table with the seed spread
(the framework code lives in the adapters: ``maccore_torch.demo`` / ``maccore_jax.demo``, imported
only when the subcommand runs; the shared data, settings and reporting are in
:mod:`maccore.cli.demo`). ``verify`` runs the conformance checks of
:mod:`maccore.testing.conformance` on every installed backend and exits non-zero on a failure
(:mod:`maccore.cli.verify`).

This package is not part of the maths: the curvature modules of ``maccore`` never import it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Sequence

from maccore.cli import demo as _demo_cmd
from maccore.cli import verify as _verify_cmd

__all__ = ["main", "build_parser", "import_adapter_module"]


def build_parser() -> argparse.ArgumentParser:
    """The ``maccore`` argument parser (subcommands ``demo`` and ``verify``)."""
    import maccore

    p = argparse.ArgumentParser(
        prog="maccore",
        description="maccore's command line: 'demo' trains small models with SGD, AdamW, MAC, "
        "KFAC and SINGD over several seeds and compares them; 'verify' runs the conformance "
        "checks on every installed backend.",
        epilog="Run 'python -m maccore demo --help' or 'python -m maccore verify --help' for "
        "their options.",
    )
    p.add_argument("--version", action="version", version=f"maccore {maccore.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,verify}")
    _demo_cmd.add_parser(sub)
    _verify_cmd.add_parser(sub)
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
        adapters = Path(__file__).resolve().parents[2] / "adapters"
        if not (adapters / top).is_dir():
            raise
        sys.path.insert(0, str(adapters))
        return importlib.import_module(name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m maccore`` and the ``maccore`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo_cmd.run_command(args)
    return _verify_cmd.run_command(args)
