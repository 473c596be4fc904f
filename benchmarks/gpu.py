"""The GPU rows of the performance issue in one short run, for the few minutes of a lent device.

    python -m benchmarks.gpu                  # CUDA device 0: every row (about 2-3 minutes on an H200)
    python -m benchmarks.gpu --quick          # fewer repeats, the small decoder only (about 1 minute)
    python -m benchmarks.gpu --device cpu     # smoke run on the CPU: tiny sizes, no targets (CI, tests)
    bash benchmarks/gpu.sh                    # on a lent device: CUDA checks, this table, the CuPy suite

Rows (targets from the issue):

- ``mac_apply`` bandwidth, float32 4096×4096 and 768×3072, torch CUDA and CuPy (where CuPy sees a
  device): effective bytes moved by ``mac_apply`` (it reads the gradient twice and writes the
  result once) per second, as a fraction of the device's copy bandwidth (read once, write once),
  target ≥ 0.7. Each timed call runs a loop over a pool of distinct gradients several times the
  L2 cache (so every call reads from HBM, as an optimizer step does after the backward pass) and
  synchronises once at its end; copy, ``mac_apply`` and the plain path are interleaved round by
  round. The notes give the absolute GB/s.
- ``mac_apply`` fast path against the plain path (``_delegate.FAST_PATHS`` off), torch CUDA:
  target ≤ 1 (a fast path may never lose).
- Training steps ON THE DEVICE, as ``benchmarks.bench_train`` times them on the CPU: the ViT on
  the 8×8 digits (batch 128) and the Llama-style decoder (Hugging Face ``LlamaForCausalLM``, 4
  layers, d=128, 64 tokens, batch 16, ``attention="auto"``), ``maccore_torch.MAC`` against
  ``torch.optim.SGD`` (momentum) — target ≤ 1.10 — and MAC's fast paths against its plain path
  (target ≤ 1). Blocks of 50 steps, the optimizers advancing step by step in turn; every step is
  synchronised with the device at both ends. Without ``--quick`` a larger decoder (d=512,
  256 tokens) is reported too (no target): the small models are bound by kernel launches.

Status as in ``python -m benchmarks.run``: PASS / NOISY / MISS / report / n/a. Exit status 1 when
a target is MISSed or a row FAILED with an exception (its traceback is printed, the other rows
still run); without a CUDA device the command says so, prints the rows as n/a and exits 0.

Ratios are candidate / baseline, except the bandwidth rows (fraction of copy bandwidth, higher
is better).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import maccore
from benchmarks._harness import Result, interleaved_times, machine_info, print_table

# The sizes; float32.
SHAPES = ((4096, 4096), (768, 3072))
SMOKE_SHAPES = ((64, 48),)
# Distinct gradients cycled through by the bandwidth rows: several times the H200's 60 MB L2.
POOL_BYTES = 512 << 20
# Bytes one timed call of the copy moves at the least (loops of calls, one synchronisation).
CALL_BYTES = 4 << 30
BW_TARGET = 0.7
STEP_TARGET = 1.10
BLOCK = 50  # steps per timed block (bench_train.BLOCK: MAC's t_inv)
SMOKE_BLOCK = 5


# ------------------------------------------------------------------------------------------------
# Device
# ------------------------------------------------------------------------------------------------


def cuda_status(device: str) -> tuple[bool, str]:
    """(usable, one line): whether torch sees the CUDA device ``device``, and what it is (or why not)."""
    try:
        import torch
    except ImportError as exc:
        return False, f"torch not importable ({exc})"
    built = torch.version.cuda or "none"
    if not torch.cuda.is_available():
        return False, f"torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA {built})"
    dev = torch.device(device)
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx >= torch.cuda.device_count():
        return False, f"{device}: only {torch.cuda.device_count()} CUDA device(s)"
    p = torch.cuda.get_device_properties(idx)
    parts = [f"{torch.cuda.get_device_name(idx)}", f"cuda:{idx} of {torch.cuda.device_count()}",
             f"compute capability {p.major}.{p.minor}", f"{p.total_memory / 2**30:.0f} GiB",
             f"{p.multi_processor_count} SMs"]
    l2 = getattr(p, "L2_cache_size", 0)
    if l2:
        parts.append(f"L2 {l2 / 2**20:.0f} MiB")
    parts.append(f"torch {torch.__version__} (CUDA {built})")
    return True, ", ".join(parts)


def _cupy_device(device: str) -> tuple[Any, str]:
    """(cupy or None, why not): CuPy with the device of ``device`` current."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library it cannot load
        return None, f"cupy not importable ({type(exc).__name__})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # pragma: no cover - depends on the machine
        return None, f"cupy sees no device ({type(exc).__name__}: {exc})"
    idx = int(device.split(":", 1)[1]) if ":" in device else 0
    if idx >= n:
        return None, f"cupy sees {n} device(s)"
    cupy.cuda.Device(idx).use()
    return cupy, ""


# ------------------------------------------------------------------------------------------------
# mac_apply bandwidth
# ------------------------------------------------------------------------------------------------


def _plain(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with maccore's native fast paths switched off (the standard-only path)."""
    from maccore import _delegate

    def run():
        _delegate.FAST_PATHS = False
        try:
            return fn()
        finally:
            _delegate.FAST_PATHS = True

    return run


def bandwidth_rows(lib: str, make, copy, sync, *, shapes, repeats: int, pool_bytes: int | None = None,
                   call_bytes: int | None = None, target: float | None = BW_TARGET,
                   fast_vs_plain: bool = True) -> list[Result]:
    """Rows for one library: ``make(shape, k)`` returns ``k`` float32 gradients and a vector ``a``;
    ``copy(g)`` copies; ``sync()`` waits for the device (``None`` on the CPU).

    One timed call runs ``loops`` calls (at least the pool, at least ``call_bytes`` of copy
    traffic) cycling through the pool, then synchronises: the synchronisation and the launch
    queue's start are amortised over the loop, as in a training step."""
    pool_bytes = POOL_BYTES if pool_bytes is None else pool_bytes
    call_bytes = CALL_BYTES if call_bytes is None else call_bytes
    out = []
    for m, n in shapes:
        nbytes = m * n * 4
        k = max(2, pool_bytes // nbytes)
        loops = max(k, -(-call_bytes // (2 * nbytes)))
        t = _bandwidth_times(make, copy, sync, (m, n), k, loops, repeats, fast_vs_plain)
        copy_gbs = 2 * nbytes * loops / statistics.median(t["copy"]) / 1e9
        mac_gbs = 3 * nbytes * loops / statistics.median(t["mac"]) / 1e9
        # fraction = (3 passes / t_mac) / (2 passes / t_copy), per round
        frac = [1.5 * c / mt for c, mt in zip(t["copy"], t["mac"])]
        out.append(Result(f"{lib} mac_apply bandwidth f32 {m}x{n}", f"device copy bandwidth ({k} arrays cycled)",
                          target, frac, higher_is_better=True,
                          note=f"median copy {copy_gbs:.0f} GB/s, mac_apply {mac_gbs:.0f} GB/s effective "
                               f"(3 passes); {loops} calls per timing, "
                               f"{statistics.median(t['mac']) / loops * 1e6:.1f} us/call"))
        if fast_vs_plain:
            out.append(Result(f"{lib} mac_apply fast path {m}x{n} streamed", "plain path (fast paths off)",
                              None if target is None else 1.0,
                              [f / p for f, p in zip(t["mac"], t["plain"])],
                              note="a fast path must never lose to the path it replaces"))
    return out


def _bandwidth_times(make, copy, sync, shape, k: int, loops: int, repeats: int,
                     fast_vs_plain: bool) -> dict[str, list[float]]:
    """Seconds per timed call of copy, mac_apply (and the plain path), interleaved round by round;
    the pool is freed on return."""
    pool, a = make(shape, k)

    def looped(fn):
        it = itertools.cycle(pool)

        def run():
            for _ in range(loops):
                fn(next(it))
        return run

    mac = looped(lambda g: maccore.mac_apply(g, a, 1.0))
    fns = {"copy": looped(copy), "mac": mac}
    if fast_vs_plain:
        fns["plain"] = _plain(mac)
    return interleaved_times(fns, repeats=repeats, warmup=1, sync=sync)


def torch_bandwidth(device: str, repeats: int, smoke: bool) -> list[Result]:
    import torch

    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)

    def make(shape, k):
        pool = [torch.randn(*shape, generator=gen, device=dev) for _ in range(k)]
        return pool, torch.randn(shape[1], generator=gen, device=dev)

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
    lib = "torch-cuda" if dev.type == "cuda" else f"torch-{dev.type} (smoke)"
    if smoke:
        return bandwidth_rows(lib, make, lambda g: g.clone(), sync, shapes=SMOKE_SHAPES, repeats=repeats,
                              pool_bytes=1 << 16, call_bytes=1 << 16, target=None)
    return bandwidth_rows(lib, make, lambda g: g.clone(), sync, shapes=SHAPES, repeats=repeats)


def cupy_bandwidth(device: str, repeats: int) -> list[Result]:
    cupy, why = _cupy_device(device)
    if cupy is None:
        return [Result(f"cupy mac_apply bandwidth f32 {m}x{n}", "device copy bandwidth", BW_TARGET, [math.nan],
                       higher_is_better=True, note=why) for m, n in SHAPES]
    rs = cupy.random.RandomState(0)

    def make(shape, k):
        pool = [rs.standard_normal(shape, dtype=cupy.float32) for _ in range(k)]
        return pool, rs.standard_normal(shape[1], dtype=cupy.float32)

    # CuPy has no native fast path behind mac_apply: no fast-vs-plain row
    return bandwidth_rows("cupy", make, lambda g: g.copy(), cupy.cuda.Device().synchronize, shapes=SHAPES,
                          repeats=repeats, fast_vs_plain=False)


# ------------------------------------------------------------------------------------------------
# Training steps on the device
# ------------------------------------------------------------------------------------------------


def step_rows(name: str, times: dict[str, list[float]], block: int, target: float | None) -> list[Result]:
    """MAC / SGD (``target``) and MAC's fast paths / plain path from interleaved block times
    (:func:`benchmarks.bench_train._mac_rows`)."""
    from benchmarks import bench_train

    return bench_train._mac_rows(name, times, target, block=block)


def _trainers(make_model, x, y, batch: int, device: str) -> dict[str, Any]:
    from benchmarks import bench_train

    return {o: bench_train.Trainer(make_model, o, x, y, batch, device=device) for o in ("SGD", "MAC", "MAC-plain")}


def _timed(trainers: dict[str, Any], rounds: int, block: int) -> dict[str, list[float]]:
    from benchmarks import bench_train

    return bench_train.interleaved_blocks(trainers, rounds=rounds, block=block)


def vit_rows(device: str, rounds: int, smoke: bool) -> list[Result]:
    from benchmarks import bench_train

    dev = device.split(":")[0]
    x, y, source = bench_train.digits()
    block = SMOKE_BLOCK if smoke else BLOCK
    if smoke:
        x, y = x[:64], y[:64]
    batch = 32 if smoke else bench_train.BATCH
    name = f"torch-{dev} ViT digits b{batch}" + (" (smoke)" if smoke else "")
    rows = step_rows(name, _timed(_trainers(bench_train.ViT, x, y, batch, device), rounds, block), block,
                     None if smoke else STEP_TARGET)
    if source != "sklearn digits":
        for r in rows:
            r.note += "; random data (scikit-learn missing)"
    return rows


def decoder_name(device: str, layers: int, d: int, tokens: int, batch: int) -> str:
    return f"torch-{device.split(':')[0]} Llama-style decoder ({layers} layers, d={d}, {tokens} tokens) b{batch}"


def make_decoder(layers: int, d: int, tokens: int) -> tuple[Any, Any] | None:
    """bench_train's Llama-style decoder (:func:`benchmarks.bench_train.make_decoder`)."""
    from benchmarks import bench_train

    return bench_train.make_decoder(layers, d, tokens)


def decoder_trainers(device: str, *, layers: int, d: int, tokens: int, batch: int,
                     optimizers=("SGD", "MAC", "MAC-plain")) -> dict[str, Any] | None:
    """bench_train Trainers of the decoder on ``device`` (10 batches of random tokens)."""
    from benchmarks import bench_train

    import torch

    made = make_decoder(layers, d, tokens)
    if made is None:
        return None
    Decoder, cfg = made
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (10 * batch, tokens), generator=g)
    trainers = {o: bench_train.Trainer(Decoder, o, ids, ids[:, 1:], batch, device=device) for o in optimizers}
    for t in trainers.values():  # next-token targets flattened like the logits
        t.batches = [(xb, yb.reshape(-1)) for xb, yb in t.batches]
    return trainers


def decoder_rows(device: str, rounds: int, *, layers: int, d: int, tokens: int, batch: int,
                 target: float | None, block: int = BLOCK, label: str = "") -> list[Result]:
    """MAC / SGD and fast / plain rows of the decoder trained on ``device``."""
    name = decoder_name(device, layers, d, tokens, batch) + label
    trainers = decoder_trainers(device, layers=layers, d=d, tokens=tokens, batch=batch)
    if trainers is None:
        return [Result(f"{name}: MAC step", "SGD(momentum) step", target, [math.nan],
                       note="transformers not installed")]
    rows = step_rows(name, _timed(trainers, rounds, block), block, target)
    for r in rows:
        r.note += '; attention="auto"'
    return rows


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _sections(device: str, repeats: int, quick: bool) -> list[tuple[str, Callable[[], list[Result]], list[str]]]:
    """(title, rows, the row names it produces: for n/a rows when it cannot run)."""
    smoke = not device.startswith("cuda")
    dev = device.split(":")[0]
    rounds = max(2, repeats // 3) if smoke else repeats
    secs: list[tuple[str, Callable[[], list[Result]], list[str]]] = []
    if smoke:
        secs.append(("torch mac_apply bandwidth (smoke)", lambda: torch_bandwidth(device, max(2, repeats), True),
                     [f"torch-{dev} (smoke) mac_apply bandwidth f32 64x48"]))
        secs.append(("ViT steps (smoke)", lambda: vit_rows(device, rounds, True),
                     [f"torch-{dev} ViT digits b32 (smoke): MAC step"]))
        kw = dict(layers=1, d=32, tokens=16, batch=8, target=None, block=SMOKE_BLOCK, label=" (smoke)")
        secs.append(("decoder steps (smoke)", lambda: decoder_rows(device, rounds, **kw),
                     [decoder_name(device, 1, 32, 16, 8) + " (smoke): MAC step"]))
        return secs
    shapes = [f"f32 {m}x{n}" for m, n in SHAPES]
    secs.append(("torch-cuda mac_apply bandwidth", lambda: torch_bandwidth(device, repeats, False),
                 [f"torch-cuda mac_apply bandwidth {s}" for s in shapes]))
    secs.append(("cupy mac_apply bandwidth", lambda: cupy_bandwidth(device, repeats),
                 [f"cupy mac_apply bandwidth {s}" for s in shapes]))
    secs.append(("ViT steps", lambda: vit_rows(device, rounds, False),
                 [f"torch-{dev} ViT digits b128: MAC step"]))
    small = dict(layers=4, d=128, tokens=64, batch=16)
    secs.append(("Llama-style decoder steps", lambda: decoder_rows(device, rounds, target=STEP_TARGET, **small),
                 [decoder_name(device, **small) + ": MAC step"]))
    if not quick:
        large = dict(layers=4, d=512, tokens=256, batch=16)
        secs.append(("larger decoder steps (report)",
                     lambda: decoder_rows(device, max(3, rounds // 2), target=None, **large),
                     [decoder_name(device, **large) + ": MAC step"]))
    return secs


def _na(names: list[str], note: str) -> list[Result]:
    return [Result(n, "-", None, [math.nan], note=note) for n in names]


def run(device: str = "cuda", repeats: int = 15, quick: bool = False) -> tuple[list[Result], list[str]]:
    """(rows, titles of the sections that FAILED with an exception); every section runs."""
    import torch

    results: list[Result] = []
    failed: list[str] = []
    threads = torch.get_num_threads()
    if not device.startswith("cuda"):  # the CPU smoke run: tiny kernels, robust to a busy host
        torch.set_num_threads(1)
    denormal = torch.set_flush_denormal(True)  # as bench_train.run (CPU-side arithmetic only)
    try:
        for title, fn, names in _sections(device, repeats, quick):
            t0 = time.perf_counter()
            try:
                rows = fn()
            except Exception as exc:
                traceback.print_exc()
                failed.append(title)
                msg = " ".join(str(exc).split())
                rows = _na(names, f"FAILED: {type(exc).__name__}: {msg[:160]}")
            results += rows
            print(f"[{time.perf_counter() - t0:6.1f} s] {title}", flush=True)
    finally:
        torch.set_num_threads(threads)
        if denormal:
            torch.set_flush_denormal(False)
    return results, failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats, no larger decoder")
    p.add_argument("--repeats", type=int, default=None,
                   help="rounds per row (default 15, 5 with --quick, 2 with --device cpu)")
    p.add_argument("--device", default="cuda",
                   help="cuda, cuda:N, or cpu: a smoke run with tiny sizes and no targets (default cuda)")
    args = p.parse_args(argv)
    device = args.device
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        p.error(f"--device must be cuda, cuda:N or cpu, got {device!r}")
    smoke = device == "cpu"
    repeats = args.repeats if args.repeats is not None else 2 if smoke else 5 if args.quick else 15
    if repeats < 1:
        p.error("--repeats must be >= 1")
    t0 = time.perf_counter()
    print(f"machine: {machine_info()}", flush=True)
    if smoke:
        print(f"device: cpu (smoke run: tiny sizes, no targets); repeats: {repeats}")
    else:
        ok, info = cuda_status(device)
        if not ok:
            print(f"NO CUDA DEVICE: {info}; the GPU rows are n/a (nothing was measured)")
            print_table(_na([n for _, _, names in _sections(device, repeats, args.quick) for n in names],
                            "no CUDA device"))
            return 0
        print(f"device: {info}")
        print(f"repeats: {repeats}" + ("; quick" if args.quick else ""), flush=True)
        if ":" in device:
            import torch

            torch.cuda.set_device(torch.device(device))
    results, failed = run(device, repeats, args.quick)
    print()
    print_table(results)
    print(f"total {time.perf_counter() - t0:.1f} s")
    missed = [r for r in results if r.status == "MISS"]
    if missed:
        print(f"\n{len(missed)} target(s) missed: " + ", ".join(r.name for r in missed))
    if failed:
        print(f"\n{len(failed)} section(s) FAILED (tracebacks above): " + ", ".join(failed))
    return 1 if missed or failed else 0


if __name__ == "__main__":
    sys.exit(main())
