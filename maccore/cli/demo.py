"""``python -m maccore demo``: its options and the framework-free parts (data, hyper-parameters,
seeds, results, table, plot, provenance).

The framework code (models, training loops, optimizers) lives in the adapters
(``maccore_torch.demo``, ``maccore_jax.demo``); both use the data, hyper-parameters and reporting
defined here, so the two backends run the same experiment, and their ``compare`` functions (the
same comparison on a model and data of the user's) write the same table, plot and ``run.json``.
NumPy, scikit-learn, matplotlib and tqdm are imported lazily inside the functions that need them,
the framework only when the subcommand runs (:func:`run_command`).

Every run writes to a fresh folder (:func:`prepare_out`): ``table_<backend>.md``,
``results_<backend>.json`` (every run, every curve), ``loss_<backend>.png`` and ``run.json`` (the
full configuration, library versions, threads, machine and date: :func:`environment`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

MODELS = ("mlp", "cnn", "transformer")
METHODS = ("sgd", "adamw", "mac", "kfac", "singd")

#: Default epochs per model (``--epochs`` overrides).
EPOCHS = {"mlp": 20, "cnn": 20, "transformer": 12}
#: Epochs with ``--quick``: enough for every method to at least halve its initial loss.
QUICK_EPOCHS = {"mlp": 3, "cnn": 3, "transformer": 16}
#: Seeds per (model, method) by default: the full run and ``--quick``.
SEEDS, QUICK_SEEDS = 3, 1
BATCH_SIZE = 64

#: The sorting task of the transformer: sequences of LENGTH tokens from VOCAB symbols.
SORT = {"vocab": 16, "length": 12, "n_train": 4096, "n_test": 1024}
SORT_QUICK = {"vocab": 8, "length": 8, "n_train": 512, "n_test": 256}

#: Transformer size (both frameworks).
TRANSFORMER = {"d_model": 32, "heads": 4, "layers": 2, "mlp_ratio": 2}
TRANSFORMER_QUICK = {"d_model": 16, "heads": 2, "layers": 1, "mlp_ratio": 2}

#: Gradient-norm clipping of the raw gradients (before preconditioning), per model; all methods.
CLIP_NORM = {"transformer": 1.0}

#: Where runs go by default (each in a fresh timestamped subfolder).
DEFAULT_OUT = Path("maccore-demo")


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


def custom_hparams(methods: Sequence[str], overrides: dict[str, dict[str, Any]] | None = None
                   ) -> dict[str, dict[str, Any]]:
    """Hyper-parameters of ``compare`` (a model of the user's): the digits models' settings per
    method, updated with ``overrides`` (``{method: {name: value}}``; unknown methods are errors)."""
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(METHODS))
    if bad:
        raise ValueError(f"hparams: unknown methods {bad}; choose from {list(METHODS)}")
    base = _digits_hparams()
    return {m: {**base[m], **overrides.get(m, {})} for m in methods}


def check_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` as a list; raises ``ValueError`` when empty or with an unknown name."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods:
        raise ValueError(f"methods: empty; choose from {list(METHODS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods: unknown {bad}; choose from {list(METHODS)}")
    return methods


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


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists and anything JSON cannot hold as its ``repr``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy / framework scalars
        return jsonable(value.item())
    return repr(value)


def effective_settings(fn: Any, kwargs: dict[str, Any], *, args: Sequence[Any] = (),
                       skip: Sequence[str] = ("model", "params")) -> dict[str, Any]:
    """Every argument of ``fn(*args, **kwargs)`` with its default filled in (JSON-able), for
    ``run.json``: the hyper-parameters a run actually used, including those left at defaults."""
    import inspect

    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
    except (TypeError, ValueError):
        values = dict(kwargs)
    for extra in [n for n, v in values.items() if isinstance(v, dict) and n in ("kwargs", "options")]:
        values.update(values.pop(extra))
    return {k: jsonable(v) for k, v in values.items() if k not in skip}


class Unavailable(Exception):
    """A method that cannot run on this install (e.g. not implemented yet in the adapter)."""


class OutputError(Exception):
    """The output folder cannot be created or written (checked before any training)."""


@dataclass
class DemoConfig:
    """What ``python -m maccore demo`` was asked to do.

    ``out`` is the parent folder: the run writes to a fresh timestamped subfolder of it
    (``run_dir``, set by :func:`prepare_out`), or into ``out`` itself with ``force``.
    ``seed`` is the first seed; the run uses ``seed, seed + 1, ..., seed + seeds - 1``.
    """

    backend: str = "torch"
    models: Sequence[str] = MODELS
    methods: Sequence[str] = METHODS
    epochs: int | None = None
    out: Path = DEFAULT_OUT
    seed: int = 0
    seeds: int | None = None
    quick: bool = False
    progress: bool = True
    force: bool = False
    run_dir: Path | None = None

    def validate(self) -> None:
        """Raises ``ValueError`` with the reason for a bad setting (the CLI's parser checks the
        same before; this guards direct callers)."""
        for what, names, known in (("models", self.models, MODELS), ("methods", self.methods, METHODS)):
            if not names:
                raise ValueError(f"--{what}: empty list; choose from {','.join(known)}")
            bad = [m for m in names if m not in known]
            if bad:
                raise ValueError(f"--{what}: unknown {what} {bad}; choose from {list(known)}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("--epochs must be >= 1")
        if self.seed < 0:
            raise ValueError("--seed must be >= 0")
        if self.seeds is not None and self.seeds < 1:
            raise ValueError("--seeds must be >= 1")
        self.out = Path(self.out)

    @property
    def n_seeds(self) -> int:
        if self.seeds is not None:
            return self.seeds
        return QUICK_SEEDS if self.quick else SEEDS

    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.n_seeds)]

    def epochs_for(self, model: str) -> int:
        if self.epochs is not None:
            return self.epochs
        return (QUICK_EPOCHS if self.quick else EPOCHS)[model]

    def transformer_size(self) -> dict[str, int]:
        return dict(TRANSFORMER_QUICK if self.quick else TRANSFORMER)

    def run_name(self) -> str:
        return f"{time.strftime('%Y%m%d-%H%M%S')}-{self.backend}{'-quick' if self.quick else ''}"

    def describe(self) -> dict[str, Any]:
        """The full configuration for ``run.json`` (the adapters add the optimizers' settings)."""
        return {
            "backend": self.backend,
            "models": list(self.models),
            "methods": list(self.methods),
            "seeds": self.seed_list(),
            "quick": self.quick,
            "epochs": {m: self.epochs_for(m) for m in self.models},
            "batch_size": BATCH_SIZE,
            "clip_norm": {m: CLIP_NORM[m] for m in self.models if m in CLIP_NORM},
            "data": {
                "digits": "scikit-learn load_digits, stratified 80/20 split (random_state = seed), "
                          "standardised with the training mean/std" if {"mlp", "cnn"} & set(self.models) else None,
                "sort_task": dict(SORT_QUICK if self.quick else SORT) if "transformer" in self.models else None,
            },
            "transformer": self.transformer_size() if "transformer" in self.models else None,
            "hparams": {m: {k: dict(HPARAMS[m][k]) for k in self.methods} for m in self.models},
            "out": str(self.out),
            "force": self.force,
        }


@dataclass
class RunResult:
    """One (model, method, seed) run. ``status``: ``"ok"``, ``"unavailable"`` or ``"failed"``."""

    backend: str
    model: str
    method: str
    status: str
    reason: str = ""
    seed: int = 0
    initial_train_loss: float = math.nan
    final_train_loss: float = math.nan
    test_loss: float = math.nan
    test_accuracy: float = math.nan
    wall_clock_s: float = math.nan
    compile_s: float = math.nan
    state_bytes: int = -1
    steps: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    curve_step: list[int] = field(default_factory=list)
    curve_time: list[float] = field(default_factory=list)
    curve_loss: list[float] = field(default_factory=list)

    def fail(self, exc: BaseException, *, show_traceback: bool = True) -> RunResult:
        """Mark the run failed with ``exc`` (and print its traceback to stderr); returns self."""
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


def load_data(model: str, cfg: DemoConfig, seed: int | None = None) -> dict[str, Any]:
    """The data set of ``model`` for ``seed`` (default ``cfg.seed``): digits for the MLP/CNN (the
    split depends on the seed), the sorting task for the transformer (generated from the seed)."""
    seed = cfg.seed if seed is None else seed
    return sort_task(seed, quick=cfg.quick) if model == "transformer" else digits(seed)


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


def interactive() -> bool:
    """Whether stdout and stderr are both terminals (progress bars only then: no ``\\r`` in logs)."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress(iterable: Iterable[Any], *, total: int | None, desc: str, enabled: bool) -> Iterator[Any]:
    """A tqdm progress bar (stderr) when enabled and both stdout and stderr are terminals, else
    the plain iterable."""
    if not enabled or not interactive():
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
# Statistics over seeds
# ------------------------------------------------------------------------------------------------


@dataclass
class Stat:
    """Mean, sample standard deviation (0 for one value), min and max of the finite values."""

    n: int
    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
        if not v:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        mean = sum(v) / len(v)
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        return cls(len(v), mean, std, min(v), max(v))


#: The metrics summarised per (model, method): key, label, better ("lower" / "higher").
METRICS = (("final_train_loss", "final train loss", "lower"),
           ("test_accuracy", "test accuracy", "higher"),
           ("test_loss", "test loss", "lower"),
           ("wall_clock_s", "wall-clock", "lower"))


@dataclass
class Summary:
    """The runs of one (backend, model, method) over the seeds."""

    backend: str
    model: str
    method: str
    seeds: list[int]
    ok: int
    status: str
    reason: str
    stats: dict[str, Stat]
    state_bytes: int
    compile_s: float

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stats"] = {k: jsonable(asdict(v)) for k, v in self.stats.items()}
        return jsonable(d)


def summarize(results: Sequence[RunResult]) -> list[Summary]:
    """One :class:`Summary` per (backend, model, method), in the order of first appearance."""
    groups: dict[tuple[str, str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.backend, r.model, r.method), []).append(r)
    out = []
    for (backend, model, method), rs in groups.items():
        ok = [r for r in rs if r.status == "ok"]
        bad = [r for r in rs if r.status != "ok"]
        if not ok:
            status = bad[0].status
        else:
            status = "ok" if not bad else "partly failed"
        reasons = []
        for r in rs:
            text = (f"seed {r.seed} {r.status}: {r.reason}" if r.status != "ok" and ok else
                    (f"{r.status}: {r.reason}" if r.status != "ok" else r.reason))
            if text and text not in reasons:
                reasons.append(text)
        compile_s = sum(r.compile_s for r in ok if math.isfinite(r.compile_s)) if ok else math.nan
        out.append(Summary(
            backend, model, method, [r.seed for r in rs], len(ok), status, "; ".join(reasons),
            {key: Stat.of(getattr(r, key) for r in ok) for key, _, _ in METRICS},
            max((r.state_bytes for r in ok), default=-1),
            compile_s if any(math.isfinite(r.compile_s) for r in ok) else math.nan))
    return out


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


def fmt_loss(x: float) -> str:
    """A loss: four decimals from 0.01 up, scientific notation below (``3.1e-06``, never
    ``0.0000``)."""
    if not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 0.01:
        return f"{x:.4f}"
    return f"{x:.1e}"


def _fmt_acc(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{100 * x:.1f}"


def _fmt_s(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.2f}"


def _cell(st: Stat, fmt: Callable[[float], str], unit: str = "") -> str:
    if st.n == 0:
        return "-"
    if st.n == 1:
        return fmt(st.mean) + unit
    return f"{fmt(st.mean)} ± {fmt(st.std)}{unit}"


def _range(st: Stat, fmt: Callable[[float], str], unit: str = "") -> str:
    return "-" if st.n == 0 else f"{fmt(st.min)}–{fmt(st.max)}{unit}"


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def line(vals):
        return "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def format_table(results: Sequence[RunResult]) -> str:
    """A Markdown table, one row per (model, method): final train loss, test accuracy (or test
    loss when no run has an accuracy), wall-clock and optimizer-state memory.

    With several seeds every metric is ``mean ± standard deviation`` over the seeds, and the loss
    and accuracy get a ``min–max`` column (the spread :func:`compare_text` tests against).
    """
    summaries = summarize(results)
    multi = any(len(s.seeds) > 1 for s in summaries)
    use_acc = any(s.stats["test_accuracy"].n for s in summaries)
    use_test_loss = not use_acc and any(s.stats["test_loss"].n for s in summaries)
    head = ["backend", "model", "method"] + (["seeds"] if multi else []) + ["final train loss"]
    head += ["train loss min–max"] if multi else []
    if use_acc:
        head += ["test acc [%]"] + (["test acc min–max"] if multi else [])
    if use_test_loss:
        head += ["test loss"] + (["test loss min–max"] if multi else [])
    head += ["wall-clock [s]", "optimizer state", "note"]
    rows = []
    for s in summaries:
        row = [s.backend, s.model, s.method] + ([f"{s.ok}/{len(s.seeds)}"] if multi else [])
        if s.ok == 0:
            n_metric = len(head) - len(row) - 1
            rows.append(row + ["-"] * n_metric + [s.reason])
            continue
        st = s.stats
        row.append(_cell(st["final_train_loss"], fmt_loss))
        row += [_range(st["final_train_loss"], fmt_loss)] if multi else []
        if use_acc:
            row.append(_cell(st["test_accuracy"], _fmt_acc))
            row += [_range(st["test_accuracy"], _fmt_acc)] if multi else []
        if use_test_loss:
            row.append(_cell(st["test_loss"], fmt_loss))
            row += [_range(st["test_loss"], fmt_loss)] if multi else []
        note = s.reason
        if math.isfinite(s.compile_s):
            note = "; ".join(x for x in (f"compile {s.compile_s:.1f}s (not in wall-clock)", note) if x)
        row += [_cell(st["wall_clock_s"], _fmt_s), _fmt_bytes(s.state_bytes), note]
        rows.append(row)
    return _markdown(head, rows)


def compare_text(results: Sequence[RunResult]) -> str:
    """Which differences between methods exceed the seed spread, per model and metric.

    Two methods differ beyond the spread when their min–max ranges over the seeds do not overlap
    (every seed of one is better than every seed of the other); overlapping ranges are reported
    as within the spread: not evidence of a difference. One seed has no spread, so nothing is
    called a difference.
    """
    summaries = [s for s in summarize(results) if s.ok > 0]
    if not summaries:
        return "No run finished: nothing to compare."
    n_seeds = max(s.ok for s in summaries)
    if n_seeds < 2:
        return ("One seed per method: there is no spread to compare against, so no difference "
                "in the table is evidence that one method is better (run 3 or more seeds: --seeds 3, or "
                "seeds=3 in compare).")
    lines = [f"Differences beyond the seed spread ({n_seeds} seeds; 'a < b': a's min–max range "
             "lies entirely below b's; 'a ~ b': the ranges overlap, which is no evidence of a "
             "difference):"]
    metrics = [("final_train_loss", "final train loss", True)]
    if any(s.stats["test_accuracy"].n for s in summaries):
        metrics.append(("test_accuracy", "test accuracy", False))
    elif any(s.stats["test_loss"].n for s in summaries):
        metrics.append(("test_loss", "test loss", True))
    keys = []
    for s in summaries:
        if (s.backend, s.model) not in keys:
            keys.append((s.backend, s.model))
    for backend, model in keys:
        group = [s for s in summaries if (s.backend, s.model) == (backend, model)]
        for key, label, lower in metrics:
            ranked = sorted((s for s in group if s.stats[key].n),
                            key=lambda s: s.stats[key].mean if lower else -s.stats[key].mean)
            if len(ranked) < 2:
                continue
            beyond: dict[str, list[str]] = {}
            within = []
            for i, a in enumerate(ranked):
                for b in ranked[i + 1:]:
                    sa, sb = a.stats[key], b.stats[key]
                    if (sa.max < sb.min) if lower else (sa.min > sb.max):
                        beyond.setdefault(a.method, []).append(b.method)
                    else:
                        within.append(f"{a.method} ~ {b.method}")
            op = "<" if lower else ">"
            parts = [f"{a} {op} {', '.join(bs)}" for a, bs in beyond.items()]
            where = f"{model} ({backend})" if len(set(b for b, _ in keys)) > 1 else model
            lines.append(f"  {where}, {label} ({lower and 'lower' or 'higher'} is better): "
                         f"beyond the spread: {'; '.join(parts) or 'none'}. "
                         f"Within the spread: {', '.join(within) or 'none'}.")
    return "\n".join(lines)


COLORS = {"sgd": "tab:gray", "adamw": "tab:blue", "mac": "tab:red", "kfac": "tab:green",
          "singd": "tab:purple"}


def plot(results: Sequence[RunResult], path: Path) -> Path:
    """Loss vs step (top row) and vs training wall-clock (bottom row), one column per model: the
    mean over the seeds as a line, the min–max band of the seeds shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in results if r.status == "ok" and r.curve_loss]
    models: list[str] = []
    for r in ok:
        if r.model not in models:
            models.append(r.model)
    models = models or ["(none)"]
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.4), squeeze=False)
    for j, m in enumerate(models):
        runs = [r for r in ok if r.model == m]
        methods: list[str] = []
        for r in runs:
            if r.method not in methods:
                methods.append(r.method)
        n_seeds = max((sum(1 for r in runs if r.method == k) for k in methods), default=0)
        for k in methods:
            rs = [r for r in runs if r.method == k]
            n = min(len(r.curve_loss) for r in rs)
            loss = np.array([r.curve_loss[:n] for r in rs])
            steps = np.array(rs[0].curve_step[:n])
            times = np.array([r.curve_time[:n] for r in rs]).mean(0)
            kw = {"label": k, "color": COLORS.get(k), "lw": 1.4}
            for ax, x in ((axes[0, j], steps), (axes[1, j], times)):
                ax.plot(x, loss.mean(0), **kw)
                if len(rs) > 1:
                    ax.fill_between(x, loss.min(0), loss.max(0), color=COLORS.get(k), alpha=0.2,
                                    lw=0)
        backend = runs[0].backend if runs else ""
        seeds = f", {n_seeds} seeds: mean, min–max shaded" if n_seeds > 1 else ""
        axes[0, j].set_title(f"{m} ({backend}{seeds})", fontsize=9)
        axes[0, j].set_xlabel("step")
        axes[1, j].set_xlabel("training wall-clock [s] (mean over seeds)" if n_seeds > 1
                              else "training wall-clock [s]")
        for i in range(2):
            axes[i, j].set_yscale("log")
            axes[i, j].grid(alpha=0.3)
            axes[i, j].set_ylabel("train loss (smoothed)")
        if runs:
            axes[0, j].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# Output folder and provenance
# ------------------------------------------------------------------------------------------------


def prepare_out(out: Path | str, name: str, *, force: bool = False) -> Path:
    """Create the folder a run writes to and check that it is writable; returns it.

    Without ``force``: a fresh subfolder ``out/name`` (``name-2``, ``name-3``, ... when taken), so
    a run never overwrites an earlier one. With ``force``: ``out`` itself, even when it already
    holds files (files of the same name are overwritten). Raises :class:`OutputError` when the
    folder cannot be created or written.
    """
    out = Path(out)
    try:
        if force:
            run_dir = out
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            out.mkdir(parents=True, exist_ok=True)
            run_dir, i = out / name, 1
            while True:
                try:
                    run_dir.mkdir()
                    break
                except FileExistsError:
                    i += 1
                    run_dir = out / f"{name}-{i}"
        probe = run_dir / ".maccore-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(f"cannot write to the output folder {str(out)!r}: {reason} "
                          f"({type(exc).__name__}); choose another with --out") from exc
    return run_dir


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict[str, Any] | None:
    """Commit and dirty flag of the source checkout maccore runs from (None when not one)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def environment(libraries: Sequence[str] = (), threads: dict[str, Any] | None = None,
                **extra: Any) -> dict[str, Any]:
    """Library versions (maccore, numpy, scikit-learn, matplotlib and ``libraries``), thread
    settings, machine (platform, CPU count), Python, the git commit of a source checkout, the
    command line and the date, for ``run.json``."""
    import datetime

    import maccore

    versions = {"maccore": maccore.__version__}
    for dist in ("numpy", "scikit-learn", "matplotlib", *libraries):
        versions[dist] = _version(dist)
    env_threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                               "OPENBLAS_NUM_THREADS", "XLA_FLAGS") if k in os.environ}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]),
        "versions": versions,
        "python": platform.python_version(),
        "threads": {**(threads or {}), **env_threads},
        "machine": {"platform": platform.platform(), "machine": platform.machine(),
                    "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
                    "node": platform.node()},
        "git": _git(),
        **extra,
    }


def settings_by_run(results: Sequence[RunResult]) -> dict[str, dict[str, Any]]:
    """``{model: {method: settings}}`` from the first run of each pair that recorded them."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        if r.settings and r.method not in out.get(r.model, {}):
            out.setdefault(r.model, {})[r.method] = r.settings
    return out


def write_run_json(run_dir: Path, info: dict[str, Any]) -> Path:
    path = Path(run_dir) / "run.json"
    path.write_text(json.dumps(jsonable(info), indent=1) + "\n")
    return path


@dataclass
class Comparison:
    """What a comparison produced: every run, the table and the seed-spread text as printed, and
    the folder with ``table_<backend>.md``, ``results_<backend>.json``, ``loss_<backend>.png`` and
    ``run.json``."""

    results: list[RunResult]
    table: str
    spread: str
    out: Path
    files: dict[str, Path]

    def summaries(self) -> list[Summary]:
        return summarize(self.results)


def write_outputs(results: Sequence[RunResult], run_dir: Path, backend: str, info: dict[str, Any],
                  *, started: float | None = None, log: Callable[[str], None] = print) -> Comparison:
    """Print the table and the seed-spread text; write ``table_<backend>.md``,
    ``results_<backend>.json``, ``loss_<backend>.png`` and ``run.json`` (``info`` plus the
    optimizers' settings, the per-method summaries and the files) under ``run_dir``."""
    run_dir = Path(run_dir)
    table = format_table(results)
    spread = compare_text(results)
    log("")
    log(table)
    log("")
    log(spread)
    files = {"table": run_dir / f"table_{backend}.md", "results": run_dir / f"results_{backend}.json",
             "plot": run_dir / f"loss_{backend}.png", "run": run_dir / "run.json"}
    files["table"].write_text(table + "\n\n" + spread + "\n")
    files["results"].write_text(json.dumps([jsonable(asdict(r)) for r in results], indent=1))
    plot(results, files["plot"])
    info = dict(info)
    info.setdefault("config", {})["optimizers"] = settings_by_run(results)
    failed = [r for r in results if r.status != "ok"]
    info["status"] = "ok" if not failed else f"{len(failed)} of {len(results)} runs not ok"
    if started is not None:
        info["total_wall_clock_s"] = round(time.perf_counter() - started, 2)
    info["summary"] = [s.to_json() for s in summarize(results)]
    info["spread"] = spread.splitlines()
    info["files"] = {k: p.name for k, p in files.items()}
    write_run_json(run_dir, info)
    log(f"\nwrote {files['table']}, {files['results']}, {files['plot']}, {files['run']}")
    return Comparison(list(results), table, spread, run_dir, files)


def _log_run(r: RunResult, log: Callable[[str], None]) -> None:
    head = f"  {r.model:>11s} {r.method:>5s} seed {r.seed}"
    if r.status == "ok":
        acc = f"  test acc {100 * r.test_accuracy:.1f}%" if math.isfinite(r.test_accuracy) else (
            f"  test loss {fmt_loss(r.test_loss)}" if math.isfinite(r.test_loss) else "")
        log(f"{head}: loss {fmt_loss(r.initial_train_loss)} -> {fmt_loss(r.final_train_loss)}{acc}"
            f"  {r.wall_clock_s:.2f}s" + (f" ({r.reason})" if r.reason else ""))
    else:
        log(f"{head}: {r.status} ({r.reason})")


TrainOne = Callable[[str, str, dict[str, Any], DemoConfig, int], RunResult]


def run_pairs(cfg: DemoConfig, train_one: TrainOne, log: Callable[[str], None] = print,
              env: dict[str, Any] | None = None) -> list[RunResult]:
    """Train every requested (model, method) pair for every seed with an adapter's
    ``train_one(model, method, data, cfg, seed)``, log one line per run, write the table, JSON,
    plot and ``run.json`` to ``cfg.run_dir`` (created by :func:`prepare_out` when unset); return
    every run."""
    cfg.validate()
    started = time.perf_counter()
    if cfg.run_dir is None:
        cfg.run_dir = prepare_out(cfg.out, cfg.run_name(), force=cfg.force)
    info = {"kind": "demo", "config": cfg.describe(), "environment": env or environment()}
    write_run_json(cfg.run_dir, {**info, "status": "running"})
    results = []
    for model_name in cfg.models:
        for seed in cfg.seed_list():
            data = load_data(model_name, cfg, seed)
            for method in cfg.methods:
                r = train_one(model_name, method, data, cfg, seed)
                r.seed = seed
                results.append(r)
                _log_run(r, log)
    write_outputs(results, cfg.run_dir, cfg.backend, info, started=started, log=log)
    return results


def run_custom(backend: str, name: str, methods: Sequence[str], seeds: Sequence[int],
               train_one: Callable[[str, int], RunResult], *, out: Path | str, force: bool,
               config: dict[str, Any], env: dict[str, Any], log: Callable[[str], None] = print
               ) -> Comparison:
    """The loop of the adapters' ``compare``: ``train_one(method, seed)`` for every seed and method,
    then the same table, plot and ``run.json`` as the demo, in a fresh subfolder of ``out``."""
    started = time.perf_counter()
    run_dir = prepare_out(out, f"{time.strftime('%Y%m%d-%H%M%S')}-{backend}-{name}", force=force)
    info = {"kind": "compare", "config": config, "environment": env}
    write_run_json(run_dir, {**info, "status": "running"})
    results = []
    for seed in seeds:
        for method in methods:
            r = train_one(method, seed)
            r.seed = seed
            results.append(r)
            _log_run(r, log)
    return write_outputs(results, run_dir, backend, info, started=started, log=log)


# ------------------------------------------------------------------------------------------------
# The subcommand
# ------------------------------------------------------------------------------------------------


def _names(kind: str, known: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: a non-empty comma-separated subset of ``known``."""

    def parse(value: str) -> list[str]:
        names = [v.strip() for v in value.split(",") if v.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"empty list; choose from {','.join(known)}")
        bad = [n for n in names if n not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {kind} {bad}; choose from {','.join(known)}")
        return names

    parse.__name__ = f"{kind} list"
    return parse


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n

    parse.__name__ = "integer"
    return parse


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to the subparsers ``sub`` of the ``maccore`` parser."""
    d = sub.add_parser(
        "demo",
        help="train small models with SGD, AdamW, MAC, KFAC and SINGD and compare them",
        description="Trains an MLP and a CNN on scikit-learn's bundled digits and a tiny transformer "
        "on a generated sorting task with every method and several seeds; prints a table (final "
        "train loss, test accuracy, wall-clock, optimizer-state bytes: mean ± std and min–max over "
        "the seeds) and which differences exceed the seed spread, and writes a loss plot, the "
        "results and run.json (configuration, versions, machine, date) to a fresh folder.",
    )
    d.add_argument("--backend", choices=("torch", "jax"), default="torch",
                   help="framework adapter to run through (default: torch)")
    d.add_argument("--models", type=_names("models", MODELS), default=list(MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    d.add_argument("--methods", type=_names("methods", METHODS), default=list(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    d.add_argument("--epochs", type=_int_at_least(1), default=None,
                   help="epochs per run (default: mlp 20, cnn 20, transformer 12; --quick: "
                        f"{QUICK_EPOCHS['mlp']}, {QUICK_EPOCHS['cnn']}, {QUICK_EPOCHS['transformer']})")
    d.add_argument("--seeds", type=_int_at_least(1), default=None,
                   help=f"seeds per model and method (default: {SEEDS}; --quick: {QUICK_SEEDS})")
    d.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="first seed (data split, init, batch order); the runs use seed, seed+1, ...")
    d.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="parent folder: each run writes to a fresh timestamped subfolder of it "
                        f"(default: ./{DEFAULT_OUT})")
    d.add_argument("--force", action="store_true",
                   help="write into --out itself, even if it already holds files (no subfolder)")
    d.add_argument("--quick", action="store_true",
                   help="reduced sizes and one seed for a smoke test (seconds per backend)")
    d.add_argument("--no-progress", action="store_true",
                   help="disable progress bars (they are off anyway when stdout/stderr is not a terminal)")
    return d


def run_command(args: argparse.Namespace) -> int:
    """Run ``demo`` with parsed ``args`` through the adapter of ``args.backend``; returns the exit
    status (0: every run finished, 1: a run failed or a method is unavailable, 2: bad usage,
    unwritable output folder or framework not installed)."""
    from maccore.cli import import_adapter_module

    cfg = DemoConfig(
        backend=args.backend,
        models=args.models,
        methods=args.methods,
        epochs=args.epochs,
        out=args.out,
        seed=args.seed,
        seeds=args.seeds,
        quick=args.quick,
        progress=not args.no_progress,
        force=args.force,
    )
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"maccore demo: error: {exc}", file=sys.stderr)
        return 2
    framework = "torch" if args.backend == "torch" else "jax"
    if importlib.util.find_spec(framework) is None:
        print(f"maccore demo --backend {args.backend}: {framework} is not installed; "
              f'pip install -e ".[{args.backend},demo]"', file=sys.stderr)
        return 2
    try:  # before any training: a bad --out fails in a second, not after the whole run
        cfg.run_dir = prepare_out(cfg.out, cfg.run_name(), force=cfg.force)
    except OutputError as exc:
        print(f"maccore demo: error: {exc}", file=sys.stderr)
        return 2
    if args.quick and framework == "jax":
        # a smoke test compiles ~15 tiny train steps: XLA's cheapest CPU pipeline halves that time
        # (must be set before jax creates its backend; results are unchanged)
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_backend_optimization_level" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0"
                                       " --xla_llvm_disable_expensive_passes=true").strip()
    module = import_adapter_module(f"maccore_{args.backend}.demo")
    results = module.run(cfg)
    bad = [r for r in results if r.status != "ok"]
    if bad:
        print(f"maccore demo: {len(bad)} of {len(results)} runs did not finish: "
              + "; ".join(f"{r.model}/{r.method}/seed {r.seed}: {r.status}" for r in bad[:5]),
              file=sys.stderr)
    return 0 if not bad else 1
