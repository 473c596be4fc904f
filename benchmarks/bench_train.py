"""Training-step benchmarks (torch CPU): full step time and optimizer-state memory of
``maccore_torch.MAC`` against ``torch.optim.SGD`` (momentum) and ``maccore_torch.KFAC`` (SINGD when
the adapter has it), on scikit-learn's bundled 8×8 digits.

Models: a small CNN (two 3×3 convolutions, two Linear layers) and a small ViT (2×2 patches →
16 tokens, two pre-LN blocks with a fused ``qkv`` Linear declared as
``attention={name: maccore_torch.QKV(num_heads=4)}``), batch 128.

Timing: one measurement is a BLOCK of ``BLOCK`` = 50 full training steps (zero_grad, forward,
backward, ``opt.step()``) on pre-built batches, so MAC's schedule (statistics every t_cov = 5
steps, refresh every t_inv = 50) is amortised exactly as in training: every block contains the
same number of statistics steps and refreshes. The optimizers' trainers advance step by step in
turn (order rotated every step), so the i-th blocks of all optimizers cover the same stretch of
wall time and a burst of load from other processes cancels in the ratios (candidate / baseline
of the same block). KFAC runs with damping 1.0 (its default 1e-3 diverges here; skipped steps
would be timed too cheap and are reported when they occur).

Memory: bytes of every tensor the optimizer holds (``optimizer.state`` plus the maccore per-layer
states and caches reachable from the optimizer object; parameters and gradients excluded) against
SGD-with-momentum's state + 2·Σ d̃ float32, Σ over the Kronecker factors (a fused qkv projection
has three: its Q, K and V rows). 0-d scalars (EMA count and weight, the cached 1/(λ + âᵀâ)) are
listed separately in the note.

Layer-count scaling: per-step time of MAC minus SGD on MLPs with 4 and 32 hidden layers of the
same width; (overhead(32) − overhead(4)) / 28 is the per-layer cost of MAC's step, reported in µs
and relative to SGD's own per-layer step time.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

try:  # installed, or on PYTHONPATH
    import maccore_torch
except ImportError:  # a plain checkout: the import package lives in adapters/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
    import maccore_torch
from maccore_torch.demo import Attention  # the demo transformer's fused-qkv self-attention

from benchmarks._harness import Result, hide_broken_torchvision
from maccore import _delegate

BATCH = 128
BLOCK = 50  # steps per timed block = MAC's default t_inv (a multiple of t_cov = 5 and of KFAC's t_inv = 10)
LR = 0.01
KFAC_DAMPING = 1.0  # KFAC's default 1e-3 (and 0.1) diverges on these models at this LR: skipped steps
#                    would be timed too cheap, NaN weights too slow


# ------------------------------------------------------------------------------------------------
# Data and models
# ------------------------------------------------------------------------------------------------


def digits() -> tuple[torch.Tensor, torch.Tensor, str]:
    """Standardised digits ``[1797, 1, 8, 8]`` float32 and int64 labels (random stand-ins with
    the same shapes when scikit-learn is missing; the timing does not depend on the values)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        g = torch.Generator().manual_seed(0)
        return torch.randn(1797, 1, 8, 8, generator=g), torch.randint(0, 10, (1797,), generator=g), "random"
    ds = load_digits()
    x = torch.tensor(ds.images, dtype=torch.float32)[:, None]
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(ds.target, dtype=torch.int64), "sklearn digits"


class CNN(nn.Module):
    """conv3×3(1→16) · ReLU · conv3×3(16→32) · ReLU · maxpool2 · Linear(512→64) · ReLU · Linear(→10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """2×2 patches of the 8×8 image (16 tokens of 4 pixels) · Linear(4→64) + position embedding ·
    2 blocks (4 heads, MLP ratio 2) · LayerNorm · mean over tokens · Linear(64→10)."""

    def __init__(self, d: int = 64, heads: int = 4, depth: int = 2, patch: int = 2) -> None:
        super().__init__()
        self.patch, self.heads = patch, heads
        self.embed = nn.Linear(patch * patch, d)
        self.pos = nn.Parameter(0.02 * torch.randn((8 // patch) ** 2, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        b = x.shape[0]
        t = x.reshape(b, 8 // p, p, 8 // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        h = self.embed(t) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h).mean(1))

    def attention(self) -> dict[str, Any]:
        return {f"blocks.{i}.attn.qkv": maccore_torch.QKV(num_heads=self.heads) for i in range(len(self.blocks))}


class MLP(nn.Module):
    """64 → width, ``depth`` hidden Linear(width→width) + ReLU, → 10."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x.flatten(1)))
        for m in self.hidden:
            h = F.relu(m(h))
        return self.out(h)


# ------------------------------------------------------------------------------------------------
# Optimizers
# ------------------------------------------------------------------------------------------------

OPTIMIZERS = ("SGD", "MAC", "MAC-plain", "KFAC", "KFAC@5/50", "SINGD")


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer | None:
    """The optimizer ``name`` with library defaults (curvature schedules included); ``None`` when
    the adapter does not provide it. ``KFAC@5/50``: KFAC on MAC's schedule (t_cov=5, t_inv=50)."""
    attention = model.attention() if isinstance(model, (ViT, _Declares)) else None
    common = dict(lr=LR, momentum=0.9, weight_decay=5e-4)
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), **common)
    if name == "SGD-fused":  # torch's fused SGD kernel (MAC's update runs it too, float32/float64)
        return torch.optim.SGD(model.parameters(), fused=True, **common)
    if name in ("MAC", "MAC-plain"):  # MAC-plain: stepped with the native fast paths off (Trainer)
        return maccore_torch.MAC(model, attention=attention, **common)
    if name == "KFAC":
        return maccore_torch.KFAC(model, damping=KFAC_DAMPING, **common)
    if name == "KFAC@5/50":
        return maccore_torch.KFAC(model, damping=KFAC_DAMPING, t_cov=5, t_inv=50, **common)
    if name == "SINGD":
        cls = getattr(maccore_torch, "SINGD", None)
        return None if cls is None else cls(model, warn_unsupported=False, **common)
    raise ValueError(name)


class Trainer:
    """A model, its optimizer and pre-built batches; ``block()`` runs ``BLOCK`` training steps."""

    def __init__(self, make_model: Callable[[], nn.Module], opt_name: str, x: torch.Tensor,
                 y: torch.Tensor, batch: int, seed: int = 0, device: str | torch.device = "cpu",
                 compiled: bool = False):
        torch.manual_seed(seed)
        # ``device``: the model (built on the CPU from the same seed) and the batches move there
        # before the optimizer is made; on CUDA every timed step is synchronised at both ends
        self.device = torch.device(device)
        on_cpu = self.device.type == "cpu"
        self.model = make_model() if on_cpu else make_model().to(self.device)
        self.opt = make_optimizer(opt_name.removesuffix("-compiled"), self.model)
        # ``compiled``: forwards through ``torch.compile(model)``, created after the optimizer (its
        # hooks are in place before the first compiled forward); the optimizer step stays eager
        self.forward = torch.compile(self.model) if compiled else self.model
        n = (x.shape[0] // batch) * batch
        self.batches = [(x[i:i + batch].contiguous(), y[i:i + batch].contiguous()) for i in range(0, n, batch)]
        if not on_cpu:
            self.batches = [(xb.to(self.device), yb.to(self.device)) for xb, yb in self.batches]
        self._sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else None
        self.k = 0
        self.plain = opt_name.endswith("-plain")

    @property
    def skipped(self) -> int:
        """Steps a maccore optimizer skipped (non-finite values): they would be timed too cheap."""
        t = getattr(self.opt, "t", None)
        return 0 if t is None else self.k - t

    @property
    def available(self) -> bool:
        return self.opt is not None

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.step()

    def step(self) -> float:
        """One training step; returns its wall time in seconds."""
        xb, yb = self.batches[self.k % len(self.batches)]
        self.k += 1
        if self._sync is not None:  # the device's queued work is not this step's
            self._sync()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.forward(xb), yb).backward()
        if self.plain:
            _delegate.FAST_PATHS = False
            try:
                self.opt.step()
            finally:
                _delegate.FAST_PATHS = True
        else:
            self.opt.step()
        if self._sync is not None:  # the step's kernels have finished
            self._sync()
        return time.perf_counter() - t0


def interleaved_blocks(trainers: dict[Any, Any], *, rounds: int, warmup: int = 1,
                       block: int = BLOCK) -> dict[Any, list[float]]:
    """Seconds per block of ``block`` steps, ``rounds`` blocks per trainer (anything with a
    ``step()`` returning its seconds).

    The trainers advance step by step in turn (the order rotated every step), so the i-th blocks of
    all trainers are measured over the same stretch of wall time: a burst of load from other
    processes slows all of them alike and cancels in the ratios. A block spans whole statistics
    (t_cov) and refresh (t_inv) periods, so its time is the amortised cost of the schedule.
    """
    names = list(trainers)
    for _ in range(warmup * block):
        for n in names:
            trainers[n].step()
    out: dict[Any, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            acc = dict.fromkeys(names, 0.0)
            for s in range(block):
                k = s % len(names)
                for n in names[k:] + names[:k]:
                    acc[n] += trainers[n].step()
            for n in names:
                out[n].append(acc[n])
    finally:
        gc.enable()
    return out


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


def _tensor_bytes(obj: Any, seen: set[int], skip: set[int], depth: int = 0) -> tuple[int, int]:
    """(bytes, number of 0-d tensors) reachable from ``obj``; storages counted once, ``skip``
    (the parameters and their gradients) excluded."""
    if depth > 10 or obj is None or isinstance(obj, (nn.Module, str, bytes, int, float, bool)):
        return 0, 0
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        ptr = st.data_ptr()
        if obj.numel() == 0 or ptr in seen or ptr in skip:
            return 0, 0
        seen.add(ptr)
        return st.nbytes(), int(obj.ndim == 0)
    if isinstance(obj, dict):
        items: Any = obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = obj
    elif hasattr(obj, "__dict__") and not callable(obj):
        items = [v for k, v in vars(obj).items() if k not in ("param_groups", "defaults")]
    elif hasattr(obj, "__slots__"):
        items = [getattr(obj, s, None) for s in obj.__slots__]
    else:
        return 0, 0
    total = scalars = 0
    for v in items:
        b, s = _tensor_bytes(v, seen, skip, depth + 1)
        total, scalars = total + b, scalars + s
    return total, scalars


def optimizer_state_bytes(opt: torch.optim.Optimizer, model: nn.Module) -> tuple[int, int]:
    """(bytes, 0-d tensors) of every tensor the optimizer holds: ``opt.state`` and everything
    reachable from the optimizer object (maccore per-layer states), parameters and grads excluded."""
    skip = set()
    for p in model.parameters():
        skip.add(p.untyped_storage().data_ptr())
        if p.grad is not None:
            skip.add(p.grad.untyped_storage().data_ptr())
    seen: set[int] = set()
    b1, s1 = _tensor_bytes(dict(opt.state), seen, skip)
    b2, s2 = _tensor_bytes({k: v for k, v in vars(opt).items() if k != "state"}, seen, skip)
    return b1 + b2, s1 + s2


def _sum_d_tilde(opt: Any) -> tuple[int, int]:
    """(Σ d̃ over preconditioned layers, Σ d̃ over their factors): a fused qkv projection has three
    factors (Q, K and V rows, as three Linear layers would), every other layer one."""
    per_layer = per_factor = 0
    for layer in opt.preconditioner.layers:
        d = layer.spec.d_tilde
        mean = layer.state.mean.value
        per_layer += d
        per_factor += d * (mean.shape[0] if mean.ndim == 2 else 1)
    return per_layer, per_factor


def _memory(name: str, make_model: Callable[[], nn.Module], x, y) -> list[Result]:
    trainers = {o: Trainer(make_model, o, x, y, BATCH) for o in ("SGD", "MAC", "KFAC", "SINGD")}
    trainers = {o: t for o, t in trainers.items() if t.available}
    nbytes = {}
    for o, tr in trainers.items():
        tr.steps(51)  # past the first statistics step and a refresh: every buffer exists
        nbytes[o] = optimizer_state_bytes(tr.opt, tr.model)
    sgd_b, _ = nbytes["SGD"]
    mac_b, scalars = nbytes["MAC"]
    per_layer, per_factor = _sum_d_tilde(trainers["MAC"].opt)
    bound = sgd_b + 2 * per_factor * 4
    scalar_b = 4 * scalars
    note = (f"MAC {mac_b} B, SGD {sgd_b} B, 2·Σd̃·4 = {8 * per_factor} B; "
            f"excl. {scalars} 0-d scalars ({scalar_b} B: EMA count and weight, cached 1/(λ+âᵀâ)): "
            f"with them {mac_b / bound:.4f}")
    base = "SGD-momentum state + 2·Σd̃ f32"
    if per_factor != per_layer:
        base += " (qkv: 3 factors)"
        note += (f"; Σd̃ per module instead of per factor: bound {sgd_b + 8 * per_layer} B, "
                 f"ratio {(mac_b - scalar_b) / (sgd_b + 8 * per_layer):.4f}")
    out = [Result(f"{name}: MAC optimizer-state bytes", base, 1.0, [(mac_b - scalar_b) / bound],
                  unit="memory", note=note)]
    for o in ("KFAC", "SINGD"):
        if o in nbytes:
            out.append(Result(f"{name}: {o} optimizer-state bytes", "SGD-momentum state", None,
                              [nbytes[o][0] / sgd_b], unit="memory", note=f"{nbytes[o][0]} B"))
    return out


# ------------------------------------------------------------------------------------------------
# Benchmarks
# ------------------------------------------------------------------------------------------------


def _step_times(name: str, make_model, x, y, repeats: int) -> list[Result]:
    trainers = {o: Trainer(make_model, o, x, y, BATCH) for o in OPTIMIZERS}
    avail = {o: t for o, t in trainers.items() if t.available}
    times = interleaved_blocks(avail, rounds=repeats)

    def ratios(a: str, b: str) -> list[float]:
        return [ta / tb for ta, tb in zip(times[a], times[b])]

    sgd_ms = statistics.median(times["SGD"]) / BLOCK * 1e3
    mac_ms = statistics.median(times["MAC"]) / BLOCK * 1e3
    skipped = {o: t.skipped for o, t in avail.items() if t.skipped}
    out = [
        Result(f"{name}: MAC step", "SGD(momentum) step", 1.10, ratios("MAC", "SGD"),
               note=f"median SGD {sgd_ms:.2f} ms/step, MAC {mac_ms:.2f} ms/step; blocks of {BLOCK} steps"
                    + (f"; SKIPPED steps {skipped}" if skipped else "")),
        Result(f"{name}: MAC step", "KFAC step (t_cov=1, t_inv=10)", 0.5, ratios("MAC", "KFAC"),
               note=f"floor for any optimizer at least as slow as SGD: SGD/KFAC = "
                    f"{statistics.median(ratios('SGD', 'KFAC')):.3f}"),
        Result(f"{name}: KFAC step (t_cov=1, t_inv=10)", "SGD(momentum) step", None, ratios("KFAC", "SGD")),
        Result(f"{name}: MAC step", "KFAC step (t_cov=5, t_inv=50)", None, ratios("MAC", "KFAC@5/50")),
        Result(f"{name}: KFAC step (t_cov=5, t_inv=50)", "SGD(momentum) step", None,
               ratios("KFAC@5/50", "SGD")),
    ]
    out.append(_fast_row(name, ratios("MAC", "MAC-plain")))
    if "SINGD" in avail:
        out.append(Result(f"{name}: SINGD step", "SGD(momentum) step", None, ratios("SINGD", "SGD")))
    else:
        out.append(Result(f"{name}: SINGD step", "SGD(momentum) step", None, [math.nan],
                          note="unavailable: maccore_torch has no SINGD"))
    return out


def _fast_row(name: str, ratios: list[float], target: float | None = 1.0) -> Result:
    return Result(f"{name}: MAC step, fast paths", "MAC step, plain path (fast paths off)", target, ratios,
                  note="a fast path must never lose to the path it replaces")


def _optimizer_bound_mlp(repeats: int, quick: bool) -> list[Result]:
    """The optimizer-bound MLP 1024-2048-2048-10 at batch 64 (random data: the time does not depend
    on the values), MAC at its defaults (t_cov=5, t_inv=50) against SGD with momentum."""
    g = torch.Generator().manual_seed(0)
    width = 256 if quick else 2048
    x = torch.randn(640, 1024, generator=g)
    y = torch.randint(0, 10, (640,), generator=g)

    def make():
        return nn.Sequential(nn.Linear(1024, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, 10))

    tr = {o: Trainer(make, o, x, y, 64) for o in ("SGD", "MAC", "MAC-plain", "SGD-fused")}
    return _mac_rows(f"torch-cpu MLP 1024-{width}-{width}-10 b64", interleaved_blocks(tr, rounds=repeats), 1.15)


def _mac_rows(name: str, times: dict[str, list[float]], target: float | None, note: str = "",
              block: int = BLOCK) -> list[Result]:
    """MAC / SGD (``target``) and MAC's fast paths / plain path (target 1, none without
    ``target``) from interleaved times of blocks of ``block`` steps; MAC / SGD(fused=True) as a
    report row where ``times`` has it."""
    sgd_ms = statistics.median(times["SGD"]) / block * 1e3
    mac_ms = statistics.median(times["MAC"]) / block * 1e3
    fused = []
    if "SGD-fused" in times:
        fused_ms = statistics.median(times["SGD-fused"]) / block * 1e3
        fused = [Result(f"{name}: MAC step", "SGD(momentum, fused=True) step", None,
                        [m / s for m, s in zip(times["MAC"], times["SGD-fused"])],
                        note=f"median SGD(fused=True) {fused_ms:.2f} ms/step: torch's fused kernel, "
                             "which MAC's momentum update also runs; SGD's default on CPU is per tensor")]
    return [
        Result(f"{name}: MAC step", "SGD(momentum) step", target,
               [m / s for m, s in zip(times["MAC"], times["SGD"])],
               note=f"median SGD {sgd_ms:.2f} ms/step, MAC {mac_ms:.2f} ms/step; blocks of {block} steps{note}"),
        _fast_row(name, [m / p for m, p in zip(times["MAC"], times["MAC-plain"])],
                  None if target is None else 1.0),
    ] + fused


class _Declares:
    """A benchmark model that declares its attention for MAC (``attention()``)."""


def make_decoder(layers: int, d: int, tokens: int) -> tuple[Any, Any] | None:
    """(model class, config) of the Llama-style decoder (``LlamaForCausalLM`` from a config, eager
    attention, grouped-query attention, RoPE; MAC with ``attention="auto"``), the model returning
    logits ``[B·T, V]`` against the next tokens; ``None`` without transformers."""
    hide_broken_torchvision()
    try:
        import transformers as tr
    except ImportError:
        return None
    cfg = tr.LlamaConfig(vocab_size=256, hidden_size=d, intermediate_size=4 * d,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=tokens, attn_implementation="eager")

    class Decoder(nn.Module, _Declares):  # logits [B·T, V] for the trainers' cross-entropy on next tokens
        def __init__(self) -> None:
            super().__init__()
            self.lm = tr.LlamaForCausalLM(cfg)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=ids).logits[:, :-1].reshape(-1, cfg.vocab_size)

        def attention(self) -> str:
            return "auto"

    return Decoder, cfg


def _llama_decoder(repeats: int, quick: bool) -> list[Result]:
    """A small Llama-style decoder (Hugging Face ``LlamaForCausalLM`` from a config, eager
    attention: separate q/k/v projections, grouped-query attention, RoPE), MAC with
    ``attention="auto"`` (the value projections get the attention-weighted mean from the model's
    own probabilities) against SGD with momentum; ``n/a`` without ``transformers``."""
    layers, d = (2, 64) if quick else (4, 128)
    name = f"torch-cpu Llama-style decoder ({layers} layers, d={d}, 64 tokens) b16"
    made = make_decoder(layers, d, 64)
    if made is None:
        return [Result(f"{name}: MAC step", "SGD(momentum) step", 1.10, [math.nan],
                       note="transformers not installed")]
    Decoder, cfg = made
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (160, 64), generator=g)
    tokens = ids[:, 1:]

    tr_ = {o: Trainer(Decoder, o, ids, tokens, 16) for o in ("SGD", "MAC", "MAC-plain")}
    for t in tr_.values():  # next-token targets flattened like the logits
        t.batches = [(x, y.reshape(-1)) for x, y in t.batches]
    return _mac_rows(name, interleaved_blocks(tr_, rounds=repeats), 1.10, '; attention="auto"')


def _layer_scaling(x, y, repeats: int, quick: bool) -> list[Result]:
    """MAC's per-step overhead over SGD for MLPs with 4 and 32 hidden layers of equal width."""
    width, batch = 64, 64
    depths = (4, 32)
    tr = {(d, o): Trainer(lambda d=d: MLP(d, width), o, x, y, batch) for d in depths for o in ("SGD", "MAC")}
    times = interleaved_blocks(tr, rounds=repeats)
    per_layer, rel, ratio32 = [], [], []
    for i in range(repeats):
        t = {k: v[i] / BLOCK for k, v in times.items()}
        over = {d: t[(d, "MAC")] - t[(d, "SGD")] for d in depths}
        sgd_layer = (t[(32, "SGD")] - t[(4, "SGD")]) / (depths[1] - depths[0])
        pl = (over[32] - over[4]) / (depths[1] - depths[0])
        per_layer.append(pl * 1e6)
        rel.append(pl / sgd_layer)
        ratio32.append(t[(32, "MAC")] / t[(32, "SGD")])
    med = statistics.median
    return [
        Result("MLP 32 hidden layers (w=64, batch 64): MAC step", "SGD(momentum) step", None, ratio32),
        Result("MLP 4→32 layers: MAC overhead per added layer", "SGD's step time per added layer", None, rel,
               note=f"median {med(per_layer):.1f} µs/layer of MAC overhead (min {min(per_layer):.1f}, "
                    f"max {max(per_layer):.1f})"),
    ]


def _compiled_rows(x, y, repeats: int) -> list[Result]:
    """The digits CNN with ``torch.compile(model)`` (inductor; the optimizers' steps stay eager):
    MAC / SGD when both models are compiled, and MAC's step with the compiled model / the eager
    one. ``n/a`` where inductor cannot compile (no C++ compiler)."""
    name = f"torch-cpu CNN digits b{BATCH}, torch.compile(model)"
    try:
        probe = torch.compile(nn.Linear(2, 2))
        probe(torch.zeros(1, 2))
    except Exception as exc:  # no compiler / unsupported platform
        why = f"torch.compile unavailable: {type(exc).__name__}"
        return [Result(f"{name}: MAC step", "SGD(momentum) step, compiled", 1.10, [math.nan], note=why),
                Result(f"{name}: MAC step", "MAC step, eager model", None, [math.nan], note=why),
                Result(f"{name}: SGD step", "SGD step, eager model", None, [math.nan], note=why)]
    # the SGD and MAC models are instances of one class: dynamo does not guard on module hooks by
    # default, so the graph compiled for the hook-less SGD model would be reused for MAC's and
    # its statistics never collected (MAC warns at its first step); guard on hooks here
    guards = torch._dynamo.config.skip_nnmodule_hook_guards
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    try:
        tr = {"SGD": Trainer(CNN, "SGD", x, y, BATCH, compiled=True),
              "MAC": Trainer(CNN, "MAC", x, y, BATCH, compiled=True),
              "MAC-eager": Trainer(CNN, "MAC", x, y, BATCH),
              "SGD-eager": Trainer(CNN, "SGD", x, y, BATCH)}
        times = interleaved_blocks(tr, rounds=repeats)
    finally:  # the setting is process-wide: restore it
        torch._dynamo.config.skip_nnmodule_hook_guards = guards
    ms = {k: statistics.median(v) / BLOCK * 1e3 for k, v in times.items()}
    return [
        Result(f"{name}: MAC step", "SGD(momentum) step, compiled", 1.10,
               [m / s for m, s in zip(times["MAC"], times["SGD"])],
               note=f"median SGD {ms['SGD']:.2f} ms/step, MAC {ms['MAC']:.2f} ms/step (compiled "
                    f"forward + backward, eager optimizer step)"),
        Result(f"{name}: MAC step", "MAC step, eager model", None,
               [m / e for m, e in zip(times["MAC"], times["MAC-eager"])],
               note=f"median eager {ms['MAC-eager']:.2f} ms/step"),
        Result(f"{name}: SGD step", "SGD step, eager model", None,
               [m / e for m, e in zip(times["SGD"], times["SGD-eager"])],
               note=f"median eager {ms['SGD-eager']:.2f} ms/step"),
    ]


def run(repeats: int, quick: bool) -> list[Result]:
    torch.set_flush_denormal(True)
    print(f"training benchmarks: torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), "
          f"batch {BATCH}, blocks of {BLOCK} steps")
    x, y, source = digits()
    reps = max(3, repeats // 3) if quick else repeats
    out: list[Result] = []
    for name, make in (("CNN", CNN), ("ViT", ViT)):
        label = f"torch-cpu {name} digits b{BATCH}"
        out += _step_times(label, make, x, y, reps)
        out += _memory(label, make, x, y)
    out += _optimizer_bound_mlp(reps, quick)
    out += _llama_decoder(reps, quick)
    out += _layer_scaling(x, y, reps, quick)
    out += _compiled_rows(x, y, reps)
    if source != "sklearn digits":
        for r in out:
            r.note = (r.note + "; " if r.note else "") + "random data (scikit-learn missing)"
    return out
