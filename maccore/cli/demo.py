"""``python -m maccore demo``: its options and the framework-free parts (data, hyper-parameters,
results, table, plot).

The framework code (models, training loops, optimizers) lives in the adapters
(``maccore_torch.demo``, ``maccore_jax.demo``); both use the data, hyper-parameters and reporting
defined here, so the two backends run the same experiment. NumPy, scikit-learn, matplotlib and tqdm
are imported lazily inside the functions that need them, the framework only when the subcommand
runs (:func:`run_command`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

MODELS = ("mlp", "cnn", "transformer")
METHODS = ("sgd", "adamw", "mac", "kfac", "singd")

#: Default epochs per model (``--epochs`` overrides; ``--quick`` uses 1).
EPOCHS = {"mlp": 20, "cnn": 20, "transformer": 12}
BATCH_SIZE = 64

#: The sorting task of the transformer: sequences of LENGTH tokens from VOCAB symbols.
SORT = {"vocab": 16, "length": 12, "n_train": 4096, "n_test": 1024}
SORT_QUICK = {"vocab": 8, "length": 8, "n_train": 512, "n_test": 256}

#: Transformer size (both frameworks).
TRANSFORMER = {"d_model": 32, "heads": 4, "layers": 2, "mlp_ratio": 2}
TRANSFORMER_QUICK = {"d_model": 16, "heads": 2, "layers": 1, "mlp_ratio": 2}

#: Gradient-norm clipping of the raw gradients (before preconditioning), per model; all methods.
CLIP_NORM = {"transformer": 1.0}


def _digits_hparams() -> dict[str, dict[str, Any]]:
    """The two digits models (MLP, CNN) share their hyper-parameters; a fresh dict per model."""
    return {
        "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "adamw": {"lr": 2e-3, "weight_decay": 1e-2},
        "mac": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "stat_decay": 0.95,
                "damping": 1.0, "t_cov": 5, "t_inv": 10},
        "kfac": {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "stat_decay": 0.95,
                 "damping": 0.1, "t_cov": 5, "t_inv": 10},
        "singd": {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "damping": 0.1,
                  "alpha1": 0.5, "lr_cov": 0.05, "T": 5},
    }


#: Hyper-parameters per (model, method). Names follow ``maccore_torch``; the jax demo maps them.
#: MAC uses its published defaults except t_inv (refreshed more often on these short runs).
HPARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "mlp": _digits_hparams(),
    "cnn": _digits_hparams(),
    "transformer": {
        "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
        "adamw": {"lr": 3e-3, "weight_decay": 1e-2},
        "mac": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "stat_decay": 0.95,
                "damping": 1.0, "t_cov": 5, "t_inv": 10},
        "kfac": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "stat_decay": 0.95,
                 "damping": 1.0, "t_cov": 5, "t_inv": 10},
        "singd": {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "damping": 0.1,
                  "alpha1": 0.5, "lr_cov": 0.05, "T": 5},
    },
}


def accepted_kwargs(fn: Any, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split ``kwargs`` into those ``fn`` accepts and the names it does not (reported, not hidden).

    Used for adapter optimizers whose exact signature may still change (SINGD): the demo passes
    the hyper-parameters the constructor knows and lists the others in the table's note column.
    """
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return dict(kwargs), []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs), []
    ok = {k: v for k, v in kwargs.items() if k in params}
    return ok, sorted(set(kwargs) - set(ok))


class Unavailable(Exception):
    """A method that cannot run on this install (e.g. not implemented yet in the adapter)."""


@dataclass
class DemoConfig:
    """What ``python -m maccore demo`` was asked to do."""

    backend: str = "torch"
    models: Sequence[str] = MODELS
    methods: Sequence[str] = METHODS
    epochs: int | None = None
    out: Path = Path("maccore-demo")
    seed: int = 0
    quick: bool = False
    progress: bool = True

    def validate(self) -> None:
        bad = [m for m in self.models if m not in MODELS]
        if bad:
            raise SystemExit(f"maccore demo: unknown models {bad}; choose from {list(MODELS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise SystemExit(f"maccore demo: unknown methods {bad}; choose from {list(METHODS)}")
        if self.epochs is not None and self.epochs < 1:
            raise SystemExit("maccore demo: --epochs must be >= 1")
        self.out = Path(self.out)

    def epochs_for(self, model: str) -> int:
        if self.epochs is not None:
            return self.epochs
        return 1 if self.quick else EPOCHS[model]

    def transformer_size(self) -> dict[str, int]:
        return dict(TRANSFORMER_QUICK if self.quick else TRANSFORMER)


@dataclass
class RunResult:
    """One (model, method) run. ``status``: ``"ok"``, ``"unavailable"`` or ``"failed"``."""

    backend: str
    model: str
    method: str
    status: str
    reason: str = ""
    final_train_loss: float = math.nan
    test_accuracy: float = math.nan
    wall_clock_s: float = math.nan
    state_bytes: int = -1
    steps: int = 0
    curve_step: list[int] = field(default_factory=list)
    curve_time: list[float] = field(default_factory=list)
    curve_loss: list[float] = field(default_factory=list)

    def fail(self, exc: BaseException, *, show_traceback: bool) -> RunResult:
        """Mark the run failed with ``exc`` (and print its traceback when asked); returns self."""
        self.status = "failed"
        self.reason = f"{type(exc).__name__}: {exc}"
        if show_traceback:
            traceback.print_exc()
        return self

    def take_curve(self, curve: Curve) -> None:
        """Copy the training wall-clock and the recorded loss curve."""
        self.wall_clock_s = curve.elapsed
        self.curve_step, self.curve_time, self.curve_loss = curve.steps, curve.times, curve.losses


# ------------------------------------------------------------------------------------------------
# Data (NumPy; the adapters convert)
# ------------------------------------------------------------------------------------------------


def digits(seed: int = 0) -> dict[str, Any]:
    """scikit-learn's bundled 8×8 digits (1797 images, no download), stratified 80/20 split.

    Returns float32 images standardised with the training mean/std as ``x_train [N, 1, 8, 8]``,
    ``x_test``, and int64 labels ``y_train``, ``y_test``.
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = ds.images.astype(np.float32)[:, None, :, :]
    y = ds.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    mu, sd = float(x_tr.mean()), float(x_tr.std())
    return {
        "x_train": (x_tr - mu) / sd,
        "y_train": y_tr,
        "x_test": (x_te - mu) / sd,
        "y_test": y_te,
        "classes": 10,
    }


def sort_task(seed: int = 0, *, quick: bool = False) -> dict[str, Any]:
    """Generated sequence-to-sequence task: output the input tokens in ascending order.

    ``x_*``: int64 ``[N, L]`` tokens in ``[0, vocab)``; ``y_*``: the sorted sequences. Accuracy is
    per token.
    """
    import numpy as np

    spec = SORT_QUICK if quick else SORT
    rng = np.random.default_rng(10_000 + seed)
    n = spec["n_train"] + spec["n_test"]
    x = rng.integers(0, spec["vocab"], size=(n, spec["length"]), dtype=np.int64)
    y = np.sort(x, axis=1)
    k = spec["n_train"]
    return {"x_train": x[:k], "y_train": y[:k], "x_test": x[k:], "y_test": y[k:],
            "classes": spec["vocab"], "vocab": spec["vocab"], "length": spec["length"]}


def load_data(model: str, cfg: DemoConfig) -> dict[str, Any]:
    """The data set of ``model``: digits for the MLP/CNN, the sorting task for the transformer."""
    return sort_task(cfg.seed, quick=cfg.quick) if model == "transformer" else digits(cfg.seed)


def batch_indices(n: int, batch_size: int, epochs: int, seed: int) -> list[Any]:
    """Shuffled mini-batch index arrays for all epochs (the same for every method and backend).

    The last partial batch of an epoch is dropped so every step has the same shape (one jit trace).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        perm = rng.permutation(n)
        out.extend(perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
    return out


def progress(iterable: Iterable[Any], *, total: int, desc: str, enabled: bool) -> Iterator[Any]:
    """A tqdm progress bar (stderr) when enabled, else the plain iterable."""
    if not enabled:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True))


class Curve:
    """Loss curve recorder: a smoothed training loss against step and training wall-clock."""

    def __init__(self, every: int = 1) -> None:
        self.every = max(1, every)
        self.steps: list[int] = []
        self.times: list[float] = []
        self.losses: list[float] = []
        self.elapsed = 0.0
        self._t0 = 0.0
        self._ema: float | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.elapsed += time.perf_counter() - self._t0

    def record(self, step: int, loss: float) -> None:
        """Add one step's loss; a NaN/Inf loss raises ``FloatingPointError`` (the run failed)."""
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}")
        self._ema = loss if self._ema is None else 0.9 * self._ema + 0.1 * loss
        if step % self.every == 0:
            self.steps.append(step)
            self.times.append(self.elapsed)
            self.losses.append(self._ema)


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def _fmt_bytes(n: int) -> str:
    if n < 0:
        return "-"
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.2f} MiB"


def format_table(results: Sequence[RunResult]) -> str:
    """A Markdown table: final train loss, test accuracy, wall-clock and optimizer-state memory."""
    head = ["backend", "model", "method", "final train loss", "test acc", "wall-clock [s]",
            "optimizer state", "note"]
    rows = []
    for r in results:
        if r.status == "ok":
            rows.append([r.backend, r.model, r.method, f"{r.final_train_loss:.4f}",
                         f"{100 * r.test_accuracy:.1f}%", f"{r.wall_clock_s:.2f}",
                         _fmt_bytes(r.state_bytes), r.reason])
        else:
            rows.append([r.backend, r.model, r.method, "-", "-", "-", "-",
                         f"{r.status}: {r.reason}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def line(vals):
        return "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def plot(results: Sequence[RunResult], path: Path) -> Path:
    """Loss vs step (top row) and vs training wall-clock (bottom row), one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok" and r.curve_loss]
    models = [m for m in MODELS if any(r.model == m for r in ok)] or ["(none)"]
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.4), squeeze=False)
    colors = {"sgd": "tab:gray", "adamw": "tab:blue", "mac": "tab:red", "kfac": "tab:green",
              "singd": "tab:purple"}
    for j, m in enumerate(models):
        for r in (r for r in ok if r.model == m):
            kw = {"label": r.method, "color": colors.get(r.method), "lw": 1.4}
            axes[0, j].plot(r.curve_step, r.curve_loss, **kw)
            axes[1, j].plot(r.curve_time, r.curve_loss, **kw)
        axes[0, j].set_title(f"{m} ({ok[0].backend if ok else ''})")
        axes[0, j].set_xlabel("step")
        axes[1, j].set_xlabel("training wall-clock [s]")
        for i in range(2):
            axes[i, j].set_yscale("log")
            axes[i, j].grid(alpha=0.3)
            axes[i, j].set_ylabel("train loss (smoothed)")
        if any(r.model == m for r in ok):
            axes[0, j].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_pairs(cfg: DemoConfig, train_one: Callable[[str, str, dict[str, Any], DemoConfig], RunResult],
              log: Callable[[str], None]) -> list[RunResult]:
    """Train every requested (model, method) pair with an adapter's ``train_one``, log one line per
    pair (with its note, if any), write the table, JSON and plot; return the rows."""
    results = []
    for model_name in cfg.models:
        data = load_data(model_name, cfg)
        for method in cfg.methods:
            r = train_one(model_name, method, data, cfg)
            results.append(r)
            if r.status == "ok":
                log(f"  {model_name:>11s} {method:>5s}: loss {r.final_train_loss:.4f}  "
                    f"test acc {100 * r.test_accuracy:.1f}%  {r.wall_clock_s:.2f}s"
                    + (f" ({r.reason})" if r.reason else ""))
            else:
                log(f"  {model_name:>11s} {method:>5s}: {r.status} ({r.reason})")
    write_outputs(results, cfg)
    return results


def write_outputs(results: Sequence[RunResult], cfg: DemoConfig, *, extra: str = "") -> dict[str, Path]:
    """Print the table and write ``table.md``, ``results.json`` and ``loss.png`` under ``cfg.out``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    print()
    print(table)
    if extra:
        print(extra)
    paths = {"table": out / f"table_{cfg.backend}.md", "json": out / f"results_{cfg.backend}.json",
             "plot": out / f"loss_{cfg.backend}.png"}
    paths["table"].write_text(table + "\n" + (extra + "\n" if extra else ""))
    paths["json"].write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
    plot(results, paths["plot"])
    print(f"\nwrote {paths['plot']}, {paths['table']}, {paths['json']}")
    return paths


# ------------------------------------------------------------------------------------------------
# The subcommand
# ------------------------------------------------------------------------------------------------


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to the subparsers ``sub`` of the ``maccore`` parser."""
    d = sub.add_parser(
        "demo",
        help="train small models with SGD, AdamW, MAC, KFAC and SINGD and compare them",
        description="Trains an MLP and a CNN on scikit-learn's bundled digits and a tiny transformer "
        "on a generated sorting task with every method; prints a table (final train loss, test "
        "accuracy, wall-clock, optimizer-state bytes) and writes a loss plot.",
    )
    d.add_argument("--backend", choices=("torch", "jax"), default="torch",
                   help="framework adapter to run through (default: torch)")
    d.add_argument("--models", type=_csv, default=list(MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)}")
    d.add_argument("--methods", type=_csv, default=list(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    d.add_argument("--epochs", type=int, default=None,
                   help="epochs per run (default: per model, see the docs; --quick: 1)")
    d.add_argument("--out", type=Path, default=Path("maccore-demo"),
                   help="output folder for the plot, table and JSON (default: ./maccore-demo)")
    d.add_argument("--seed", type=int, default=0, help="seed for data split, init and batches")
    d.add_argument("--quick", action="store_true",
                   help="reduced sizes for a smoke test (well under a minute per backend)")
    d.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return d


def run_command(args: argparse.Namespace) -> int:
    """Run ``demo`` with parsed ``args`` through the adapter of ``args.backend``; returns the exit
    status (0: every run finished, 1: a run failed, 2: the framework is not installed)."""
    from maccore.cli import import_adapter_module

    cfg = DemoConfig(
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
