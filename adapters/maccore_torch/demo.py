"""PyTorch half of ``python -m maccore demo`` (``--backend torch``).

Trains an MLP and a small CNN on scikit-learn's digits and a tiny transformer (fused qkv Linear,
declared as attention for MAC) on a generated sorting task, with SGD(momentum), AdamW and
``maccore_torch``'s MAC, KFAC and SINGD. Data, hyper-parameters and reporting come from
:mod:`maccore.cli.demo` so that ``--backend jax`` runs the same experiment.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from maccore.cli import demo as _demo
from maccore.cli.demo import DemoConfig, RunResult, Unavailable

__all__ = ["MLP", "CNN", "TinyTransformer", "build_model", "build_optimizer", "state_bytes", "run"]


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """64 → 128 → 64 → 10 with ReLU."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    """conv3×3(1→16) · ReLU · maxpool2 · conv3×3(16→32) · ReLU · linear(512→10)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` Linear, output layout (3, H, d_h)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp_ratio * d)
        self.fc2 = nn.Linear(mlp_ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, per-token classification head."""

    def __init__(self, vocab: int, length: int, d_model: int, heads: int, layers: int,
                 mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(length, d_model))
        self.blocks = nn.ModuleList(Block(d_model, heads, mlp_ratio) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))

    def attention_layers(self) -> dict[str, int]:
        """Qualified names of the fused qkv Linears and their head counts."""
        return {f"blocks.{i}.attn.qkv": self.heads for i in range(len(self.blocks))}


def build_model(name: str, data: dict[str, Any], cfg: DemoConfig) -> nn.Module:
    if name == "mlp":
        return MLP(data["classes"])
    if name == "cnn":
        return CNN(data["classes"])
    size = cfg.transformer_size()
    return TinyTransformer(data["vocab"], data["length"], size["d_model"], size["heads"],
                           size["layers"], size["mlp_ratio"])


# ------------------------------------------------------------------------------------------------
# Optimizers
# ------------------------------------------------------------------------------------------------


def _adapter(name: str) -> Any:
    try:
        import maccore_torch
    except Exception as exc:  # pragma: no cover - depends on the install
        raise Unavailable(f"maccore_torch cannot be imported ({type(exc).__name__}: {exc})") from exc
    obj = getattr(maccore_torch, name, None)
    if obj is None:
        raise Unavailable(f"maccore_torch.{name} is not implemented yet")
    return obj


def build_optimizer(method: str, model: nn.Module, model_name: str) -> torch.optim.Optimizer:
    """The optimizer of ``method`` with the demo's hyper-parameters (raises :class:`Unavailable`)."""
    hp = dict(_demo.HPARAMS[model_name][method])
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), **hp)
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), **hp)
    if method == "mac":
        MAC = _adapter("MAC")
        kw: dict[str, Any] = {}
        if isinstance(model, TinyTransformer):
            QKV = _adapter("QKV")
            kw["attention"] = {n: QKV(num_heads=h) for n, h in model.attention_layers().items()}
        # decoupled weight decay, as maccore_jax.mac: both backends run the same update rule
        return MAC(model, weight_decay_mode="decoupled", **hp, **kw)
    if method == "kfac":
        KFAC = _adapter("KFAC")
        # the loss is a mean over samples (and tokens): R = 1/(N·S) for the transformer
        average = "batch+sequence" if model_name == "transformer" else "batch"
        return KFAC(model, weight_decay_mode="decoupled", loss_average=average, **hp)
    if method == "singd":
        SINGD = _adapter("SINGD")
        # SINGD keeps the published singd package's argument names (lr, momentum, damping, alpha1,
        # weight_decay, T, lr_cov, loss_average, ...)
        hp["loss_average"] = "batch+sequence" if model_name == "transformer" else "batch"
        hp["warn_unsupported"] = False  # embeddings/norms train unpreconditioned, by design here
        kw, ignored = _demo.accepted_kwargs(SINGD, hp)
        opt = SINGD(model, **kw)
        opt._maccore_demo_note = f"ignored: {', '.join(ignored)}" if ignored else ""
        return opt
    raise ValueError(method)


def _tensors(obj: Any, seen: set[int], skip: set[int], depth: int = 0) -> int:
    """Bytes of the tensors reachable from ``obj`` (dicts, sequences, NamedTuples, plain objects),
    each storage counted once and the model's own parameters excluded."""
    if depth > 8 or obj is None or isinstance(obj, (nn.Module, str, bytes, int, float, bool)):
        return 0
    if isinstance(obj, torch.Tensor):
        if obj.numel() == 0:
            return 0
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen or ptr in skip:
            return 0
        seen.add(ptr)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensors(v, seen, skip, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(_tensors(v, seen, skip, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not callable(obj):
        return sum(_tensors(v, seen, skip, depth + 1) for k, v in vars(obj).items()
                   if k not in ("param_groups", "_optimizer_step_pre_hooks", "defaults"))
    return 0


def state_bytes(opt: torch.optim.Optimizer, model: nn.Module) -> int:
    """Bytes of every tensor the optimizer keeps: ``optimizer.state`` plus any maccore state held
    on the optimizer object (per-layer blocks, inverses, running means), parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = _tensors(dict(opt.state), seen, skip)
    total += _tensors({k: v for k, v in vars(opt).items() if k != "state"}, seen, skip)
    return total


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def _loss(model_name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if model_name == "transformer":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return F.cross_entropy(logits, y)


@torch.no_grad()
def _evaluate(model: nn.Module, model_name: str, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    losses, correct, count = 0.0, 0, 0
    for i in range(0, x.shape[0], 512):
        logits = model(x[i : i + 512])
        yy = y[i : i + 512]
        losses += float(_loss(model_name, logits, yy)) * yy.numel()
        correct += int((logits.argmax(-1) == yy).sum())
        count += yy.numel()
    model.train()
    return losses / count, correct / count


def train_one(model_name: str, method: str, data: dict[str, Any], cfg: DemoConfig) -> RunResult:
    """Train one model with one method; never raises (failures become a ``failed`` row)."""
    res = RunResult("torch", model_name, method, "ok")
    torch.manual_seed(cfg.seed)
    model = build_model(model_name, data, cfg)
    try:
        opt = build_optimizer(method, model, model_name)
    except Unavailable as exc:
        res.status, res.reason = "unavailable", str(exc)
        return res
    except Exception as exc:
        return res.fail(exc, show_traceback=False)
    x_tr = torch.as_tensor(data["x_train"])
    y_tr = torch.as_tensor(data["y_train"])
    epochs = cfg.epochs_for(model_name)
    batches = _demo.batch_indices(x_tr.shape[0], _demo.BATCH_SIZE, epochs, cfg.seed)
    curve = _demo.Curve(every=max(1, len(batches) // 200))
    desc = f"torch {model_name:>11s} {method:>5s}"
    try:
        for step, idx in enumerate(_demo.progress(batches, total=len(batches), desc=desc,
                                                  enabled=cfg.progress)):
            xb, yb = x_tr[idx], y_tr[idx]
            curve.start()
            opt.zero_grad(set_to_none=True)
            loss = _loss(model_name, model(xb), yb)
            loss.backward()
            clip = _demo.CLIP_NORM.get(model_name)
            if clip:  # raw gradients, before any preconditioning (as the nanoGPT recipe)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            value = loss.item()  # synchronises, so the clock covers the whole step
            curve.stop()
            curve.record(step, value)
    except Exception as exc:
        return res.fail(exc, show_traceback=cfg.progress)
    res.final_train_loss, _ = _evaluate(model, model_name, x_tr, y_tr)
    _, res.test_accuracy = _evaluate(model, model_name, torch.as_tensor(data["x_test"]),
                                     torch.as_tensor(data["y_test"]))
    res.take_curve(curve)
    res.reason = getattr(opt, "_maccore_demo_note", "")
    res.state_bytes = state_bytes(opt, model)
    res.steps = len(batches)
    return res


def run(cfg: DemoConfig, *, log: Callable[[str], None] = print) -> list[RunResult]:
    """Run every requested (model, method) pair, print the table, write the plot; return the rows."""
    torch.set_num_threads(1)  # small models: one thread gives steadier timings on shared cores
    log(f"maccore demo (torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"seed {cfg.seed}{', quick' if cfg.quick else ''})")
    return _demo.run_pairs(cfg, train_one, log)
