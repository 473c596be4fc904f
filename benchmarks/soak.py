"""Soak test (not a CI test): long runs with injected faults must finish with finite parameters.

    python -m benchmarks.soak                  # 3,000 steps × MAC/KFAC/SINGD × torch/JAX
    python -m benchmarks.soak --steps 500 --frameworks torch --methods mac

Every run trains a small MLP (64 → 32 → 10, tanh) on scikit-learn's 8×8 digits (Gaussian blobs
when scikit-learn is missing), batch 32, with the method's optimizer (torch: ``maccore_torch.MAC``
/ ``KFAC`` / ``SINGD``; JAX: ``maccore_jax.mac`` / ``kfac`` / ``singd`` under ``jax.jit``), all
with ``reset_after=5`` (docs/numerics.md). On about ``--fault-rate`` (1%) of the steps one fault of
five kinds, in turn, is injected:

- ``nan_input``: a NaN pixel in the batch (NaN activations, statistics and gradients);
- ``inf_grad``: one gradient entry set to +Inf after the backward pass;
- ``nan_loss``: the loss multiplied by NaN (every gradient NaN);
- ``stats_only``: a NaN reaches only the statistics (torch: an extra forward of a NaN batch; JAX:
  the first layer's activations) while the gradients are finite — skipped on statistics steps,
  unread (harmless) on the others;
- ``diverge``: one layer's curvature state is overwritten with +Inf (a preconditioner that
  diverged): every step is skipped until ``reset_after`` consecutive skips restart that layer.

Reported per run: steps, accepted and skipped steps, faults injected, layer resets, final train
loss and accuracy (on the full data), whether every parameter is finite, the resident set size
(RSS) after the warm-up (step 100), its growth to the end and over the second half (a leak would
grow in both), and the wall time. Before the measured JAX runs an unreported 1,500-step JAX run
takes the runtime's one-time memory growth (``--no-jax-warmup`` to see it). The exit status is 1
when a run ended with non-finite parameters or did not finish.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ("nan_input", "inf_grad", "nan_loss", "stats_only", "diverge")
METHODS = ("mac", "kfac", "singd")
FRAMEWORKS = ("torch", "jax")
BATCH, HIDDEN, RESET_AFTER, WARMUP = 32, 32, 5, 100


def _adapters_on_path() -> None:
    if str(ROOT / "adapters") not in sys.path:
        sys.path.insert(0, str(ROOT / "adapters"))


def rss_mib() -> float:
    """The current resident set size in MiB (Linux ``/proc``; else the peak from ``getrusage``)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 10, 1797)
        centers = rng.standard_normal((10, 64))
        x = centers[y] + 0.8 * rng.standard_normal((1797, 64))
        return x.astype(np.float32), y.astype(np.int64)
    d = load_digits()
    return (d.data / 16.0 - 0.3).astype(np.float32), d.target.astype(np.int64)


def schedule(steps: int, rate: float, seed: int) -> dict[int, str]:
    """``{step: fault}``: about ``rate`` of the steps, the five kinds in turn."""
    rng = np.random.default_rng(seed)
    at = sorted(int(i) for i in np.flatnonzero(rng.random(steps) < rate) if i >= 10)
    return {i: FAULTS[k % len(FAULTS)] for k, i in enumerate(at)}


# ---- torch --------------------------------------------------------------------------------------------
def run_torch(method: str, steps: int, faults: dict[int, str], seed: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    _adapters_on_path()
    import maccore
    import maccore_torch as mt

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    xs, ys = (torch.from_numpy(a) for a in data(seed))
    model = nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 10))
    kw = dict(reset_after=RESET_AFTER, warn_after=None)
    opt = {"mac": lambda: mt.MAC(model, lr=0.05, momentum=0.9, t_cov=2, t_inv=10, **kw),
           "kfac": lambda: mt.KFAC(model, lr=0.05, momentum=0.9, damping=0.1, t_cov=1, t_inv=10, **kw),
           "singd": lambda: mt.SINGD(model, lr=0.01, momentum=0.9, T=2, lr_cov=1e-2, **kw)}[method]()
    pre = opt.preconditioner
    rng = np.random.default_rng(seed + 1)
    accepted = resets = 0
    rss0 = rss_half = None
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for i in range(steps):
            if i == WARMUP:
                gc.collect()
                rss0 = rss_mib()
            if i == steps // 2:
                gc.collect()
                rss_half = rss_mib()
            idx = torch.from_numpy(rng.integers(0, len(xs), BATCH))
            x, y = xs[idx].clone(), ys[idx]
            fault = faults.get(i)
            if fault == "nan_input":
                x[0, 5] = float("nan")
            if fault == "diverge":
                layer = pre.layers[i % len(pre.layers)]
                arrays, types = maccore.checkpoint.flatten_state(layer.state)
                layer.state = maccore.checkpoint.unflatten_state(
                    layer.state, {k: torch.full_like(v, float("inf")) if v.is_floating_point() else v
                                  for k, v in arrays.items()}, types)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if fault == "nan_loss":
                loss = loss * float("nan")
            loss.backward()
            if fault == "inf_grad":
                model[0].weight.grad[1, 2] = float("inf")
            if fault == "stats_only":
                xn = x.clone()
                xn[:, 7] = float("nan")
                model(xn)
            t = opt.t
            opt.step()
            accepted += opt.t == t + 1
            resets += len(pre._last_reset) if opt.t == t else 0
        wall = time.perf_counter() - t0
    with torch.no_grad():
        out = model(xs)
        final_loss = float(F.cross_entropy(out, ys))
        acc = float((out.argmax(1) == ys).float().mean())
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    gc.collect()
    return _report("torch", method, steps, faults, accepted, resets, final_loss, acc, finite,
                   rss0, rss_half, rss_mib(), wall, len(caught))


# ---- jax ------------------------------------------------------------------------------------------------
def run_jax(method: str, steps: int, faults: dict[int, str], seed: int) -> dict:
    _adapters_on_path()
    import jax
    import jax.numpy as jnp
    import optax

    import maccore_jax as mj
    from maccore_jax.transform import curvature_states, map_curvature_states

    xs_np, ys_np = data(seed)
    xs, ys = jnp.asarray(xs_np), jnp.asarray(ys_np)
    rng = np.random.default_rng(seed)
    params = {
        "Dense_0": {"kernel": jnp.asarray(rng.standard_normal((64, HIDDEN)) * 64**-0.5, jnp.float32),
                    "bias": jnp.zeros(HIDDEN, jnp.float32)},
        "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((HIDDEN, 10)) * HIDDEN**-0.5,
                                          jnp.float32),
                    "bias": jnp.zeros(10, jnp.float32)},
    }
    kw = dict(momentum=0.9, reset_after=RESET_AFTER)
    tx = {"mac": lambda: mj.mac(0.05, t_cov=2, t_inv=10, weight_decay_mode="coupled", **kw),
          "kfac": lambda: mj.kfac(0.05, damping=0.1, t_cov=1, t_inv=10, **kw),
          "singd": lambda: mj.singd(0.01, T=2, lr_cov=1e-2, **kw)}[method]()
    needs_gouts = method != "mac"

    def forward(p, x, q):
        h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"] + q["Dense_0"])
        out = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] + q["Dense_1"]
        return out, {"Dense_0": x, "Dense_1": h}

    @jax.jit
    def step(p, s, x, y, x_stats, grad_poison, loss_scale):
        zeros = {"Dense_0": jnp.zeros((x.shape[0], HIDDEN)), "Dense_1": jnp.zeros((x.shape[0], 10))}

        def loss_fn(p, q):
            out, acts = forward(p, x, q)
            ce = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
            return ce * loss_scale, acts

        (_, acts), (g, go) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(p, zeros)
        acts = {**acts, "Dense_0": x_stats}  # the statistics' input (a NaN only there: stats_only)
        g = {**g, "Dense_0": {**g["Dense_0"],
                              "kernel": g["Dense_0"]["kernel"].at[2, 1].add(grad_poison)}}
        u, s = tx.update(g, s, p, activations=acts, output_grads=go if needs_gouts else None)
        return optax.apply_updates(p, u), s

    def poison(c: Any, name: str) -> Any:
        bad = jax.tree.map(lambda a: jnp.full_like(a, jnp.inf) if jnp.issubdtype(a.dtype, jnp.floating)
                           else a, c.layers[name])
        return c._replace(layers={**c.layers, name: bad})

    state = tx.init(params)
    r = np.random.default_rng(seed + 1)
    accepted = resets = 0
    rss0 = rss_half = None
    t0 = time.perf_counter()
    for i in range(steps):
        if i == WARMUP:
            gc.collect()
            rss0 = rss_mib()
        if i == steps // 2:
            gc.collect()
            rss_half = rss_mib()
        idx = r.integers(0, len(xs_np), BATCH)
        x = xs_np[idx].copy()
        fault = faults.get(i)
        if fault == "nan_input":
            x[0, 5] = np.nan
        xstat = x
        if fault == "stats_only":
            xstat = x.copy()
            xstat[:, 7] = np.nan
        if fault == "diverge":
            name = ("Dense_0", "Dense_1")[i % 2]
            state = map_curvature_states(lambda c: poison(c, name), state)
        before = int(curvature_states(state)[0].count)
        skips_before = int(curvature_states(state)[0].consecutive_skips)
        params, state = step(params, state, jnp.asarray(x), ys[idx], jnp.asarray(xstat),
                             jnp.float32(np.inf if fault == "inf_grad" else 0.0),
                             jnp.float32(np.nan if fault == "nan_loss" else 1.0))
        c = curvature_states(state)[0]
        ok = int(c.count) == before + 1
        accepted += ok
        resets += ok and skips_before >= RESET_AFTER
    jax.block_until_ready(params)
    wall = time.perf_counter() - t0
    out, _ = forward(params, xs, {"Dense_0": 0.0, "Dense_1": 0.0})
    final_loss = float(optax.softmax_cross_entropy_with_integer_labels(out, ys).mean())
    acc = float((out.argmax(1) == ys).mean())
    finite = all(bool(np.isfinite(np.asarray(v)).all()) for v in jax.tree.leaves(params))
    gc.collect()
    return _report("jax", method, steps, faults, accepted, resets, final_loss, acc, finite,
                   rss0, rss_half, rss_mib(), wall, None)


def _report(framework, method, steps, faults, accepted, resets, loss, acc, finite, rss0, rss_half,
            rss1, wall, warnings_seen) -> dict:
    kinds = {k: sum(1 for f in faults.values() if f == k) for k in FAULTS}
    return {"framework": framework, "method": method, "steps": steps, "accepted": int(accepted),
            "skipped": steps - int(accepted), "faults": len(faults), "fault_kinds": kinds,
            "resets": int(resets), "loss": loss, "accuracy": acc, "finite": finite,
            "rss_after_warmup_mib": rss0, "rss_end_mib": rss1,
            "rss_growth_mib": None if rss0 is None else rss1 - rss0,
            "rss_growth_second_half_mib": None if rss_half is None else rss1 - rss_half,
            "wall_s": wall,
            "warnings": warnings_seen}


def table(rows: list[dict]) -> str:
    head = ("| framework | method | steps | faults | skipped | resets | final loss | train acc | "
            "params finite | RSS after warm-up (MiB) | RSS growth: all / 2nd half (MiB) | wall (s) |")
    lines = [head, "|" + "---|" * 12]

    def mib(v):
        return "n/a" if v is None else f"{v:+.1f}"

    for r in rows:
        lines.append(
            f"| {r['framework']} | {r['method'].upper()} | {r['steps']} | {r['faults']} | "
            f"{r['skipped']} | {r['resets']} | {r['loss']:.3f} | {r['accuracy']:.3f} | "
            f"{'yes' if r['finite'] else '**NO**'} | {r['rss_after_warmup_mib']:.0f} | "
            f"{mib(r['rss_growth_mib'])} / {mib(r['rss_growth_second_half_mib'])} | "
            f"{r['wall_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: mac,kfac,singd")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated: torch,jax")
    p.add_argument("--fault-rate", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--no-jax-warmup", action="store_true",
                   help="skip the unreported 1,500-step JAX run before the measured ones (the first "
                   "JAX run of a process grows the runtime's memory once, by ~35 MiB)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    frameworks = [f for f in args.frameworks.split(",") if f]
    bad = [m for m in methods if m not in METHODS] + [f for f in frameworks if f not in FRAMEWORKS]
    if bad or args.steps <= WARMUP or not 0 <= args.fault_rate < 1:
        p.error(f"bad arguments {bad or ''} (steps must exceed {WARMUP}; 0 <= fault-rate < 1)")
    faults = schedule(args.steps, args.fault_rate, args.seed)
    kinds = ", ".join(f"{k} {sum(f == k for f in faults.values())}" for k in FAULTS)
    print(f"{args.steps} steps, {len(faults)} faults ({kinds}); reset_after={RESET_AFTER}; "
          f"RSS measured after step {WARMUP} and at the end", flush=True)
    rows = []
    if "jax" in frameworks and not args.no_jax_warmup:
        try:
            run_jax("mac", 1500, {}, args.seed)
        except ImportError:
            pass
    for fw in frameworks:
        for m in methods:
            run = run_torch if fw == "torch" else run_jax
            try:
                row = run(m, args.steps, faults, args.seed)
            except ImportError as exc:
                print(f"{fw} {m}: unavailable ({exc})")
                continue
            rows.append(row)
            print(f"{fw:>5} {m:>5}: {row['accepted']} accepted, {row['skipped']} skipped, "
                  f"{row['resets']} resets, loss {row['loss']:.3f}, acc {row['accuracy']:.3f}, "
                  f"finite {row['finite']}, RSS {row['rss_after_warmup_mib']:.0f} → "
                  f"{row['rss_end_mib']:.0f} MiB, {row['wall_s']:.1f} s", flush=True)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if rows and all(r["finite"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
