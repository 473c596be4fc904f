"""PyTorch half of ``python -m maccore demo`` (``--backend torch``).

Trains an MLP and a small CNN on scikit-learn's digits and a tiny transformer (fused qkv Linear,
declared as attention for MAC) on a generated sorting task, with SGD(momentum), AdamW and
``maccore_torch``'s MAC, KFAC and SINGD, over several seeds. Data, hyper-parameters and reporting
come from :mod:`maccore.cli.demo` so that ``--backend jax`` runs the same experiment.

:func:`compare` runs the same comparison (methods × seeds, table, plot, ``run.json``) on a model
and data loader of your own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from maccore.cli import demo as _demo
from maccore.cli.demo import DemoConfig, RunResult, Unavailable

__all__ = ["MLP", "CNN", "TinyTransformer", "build_model", "build_optimizer", "make_optimizer",
           "state_bytes", "evaluate", "fit", "train_one", "run", "compare"]


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


def make_optimizer(method: str, model: nn.Module, hparams: dict[str, Any], *,
                   attention: Any = None, loss_average: str = "batch"
                   ) -> tuple[torch.optim.Optimizer, dict[str, Any], str]:
    """``(optimizer, settings, note)`` for ``method`` on ``model`` with ``hparams`` (``maccore_torch``
    names). ``settings``: every constructor argument with its default filled in (for
    ``run.json``); ``note``: hyper-parameters the constructor does not accept (reported in the
    table). MAC and KFAC use decoupled weight decay unless ``hparams`` says otherwise; KFAC and
    SINGD get ``loss_average`` unless ``hparams`` sets it. Raises :class:`Unavailable` when the
    adapter lacks the method."""
    hp = dict(hparams)
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), **hp), _demo.effective_settings(torch.optim.SGD, hp), ""
    if method == "adamw":
        return (torch.optim.AdamW(model.parameters(), **hp),
                _demo.effective_settings(torch.optim.AdamW, hp), "")
    if method == "mac":
        cls = _adapter("MAC")
        hp.setdefault("weight_decay_mode", "decoupled")  # as maccore_jax.mac: the same update rule
        if attention:
            hp.setdefault("attention", attention)
    elif method == "kfac":
        cls = _adapter("KFAC")
        hp.setdefault("weight_decay_mode", "decoupled")
        hp.setdefault("loss_average", loss_average)
    elif method == "singd":
        cls = _adapter("SINGD")
        # SINGD keeps the published singd package's argument names and its coupled weight decay
        hp.setdefault("loss_average", loss_average)
        hp.setdefault("warn_unsupported", False)  # embeddings/norms train unpreconditioned, by design
    else:
        raise ValueError(f"unknown method {method!r}; choose from {list(_demo.METHODS)}")
    kw, ignored = _demo.accepted_kwargs(cls, hp)
    opt = cls(model, **kw)
    return opt, _demo.effective_settings(cls, kw), f"ignored: {', '.join(ignored)}" if ignored else ""


def build_optimizer(method: str, model: nn.Module, model_name: str) -> torch.optim.Optimizer:
    """The optimizer of ``method`` with the demo's hyper-parameters for ``model_name`` (raises
    :class:`Unavailable`)."""
    return _demo_optimizer(method, model, model_name)[0]


def _demo_optimizer(method: str, model: nn.Module, model_name: str):
    attention = None
    if method == "mac" and isinstance(model, TinyTransformer):
        QKV = _adapter("QKV")
        attention = {n: QKV(num_heads=h) for n, h in model.attention_layers().items()}
    # the transformer's loss is a mean over samples and tokens: R = 1/(N·S)
    average = "batch+sequence" if model_name == "transformer" else "batch"
    return make_optimizer(method, model, _demo.HPARAMS[model_name][method], attention=attention,
                          loss_average=average)


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
# Training (shared by the demo and compare)
# ------------------------------------------------------------------------------------------------


def _xent(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over every position: ``[B, C]`` logits or ``[B, S, C]`` per token."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[..., torch.Tensor]
             ) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` over ``(inputs, targets)`` batches in eval mode.

    Batch losses are weighted by the number of target elements. The accuracy (``argmax`` of the
    last axis against integer targets of the output's leading shape) is NaN when the targets are
    not class labels."""
    was_training = model.training
    model.eval()
    dev = _device(model)
    loss_sum, correct, count, classify = 0.0, 0, 0, True
    for xb, yb in batches:
        xb, yb = xb.to(dev), yb.to(dev)
        out = model(xb)
        n = yb.numel()
        loss_sum += float(loss_fn(out, yb)) * n
        if classify and not yb.is_floating_point() and out.shape[:-1] == yb.shape:
            correct += int((out.argmax(-1) == yb).sum())
        else:
            classify = False
        count += n
    model.train(was_training)
    if count == 0:
        return math.nan, math.nan
    return loss_sum / count, (correct / count if classify else math.nan)


def _chunks(x: torch.Tensor, y: torch.Tensor, size: int = 512) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def fit(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[Any], *,
        loss_fn: Callable[..., torch.Tensor], clip_norm: float | None = None, total: int | None = None,
        desc: str = "", progress: bool = True) -> _demo.Curve:
    """One optimizer step per ``(inputs, targets)`` batch; returns the loss curve with the training
    wall-clock (forward + backward + step). A NaN/Inf loss raises ``FloatingPointError``."""
    curve = _demo.Curve(every=max(1, (total or 0) // 200))
    dev = _device(model)
    model.train()
    for step, (xb, yb) in enumerate(_demo.progress(batches, total=total, desc=desc, enabled=progress)):
        xb, yb = xb.to(dev), yb.to(dev)
        curve.start()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        if clip_norm:  # raw gradients, before any preconditioning (as the nanoGPT recipe)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        opt.step()
        value = loss.item()  # synchronises, so the clock covers the whole step
        curve.stop()
        curve.record(step, value)
    return curve


def _close(opt: Any) -> None:
    """Remove the optimizer's module hooks (if it has any) so the next run starts clean."""
    for obj in (opt, getattr(opt, "preconditioner", None)):
        remove = getattr(obj, "remove_hooks", None)
        if callable(remove):
            try:
                remove()
            except Exception:  # pragma: no cover - best effort
                pass
            return


def train_one(model_name: str, method: str, data: dict[str, Any], cfg: DemoConfig,
              seed: int | None = None) -> RunResult:
    """Train one demo model with one method and one seed; never raises (failures become a
    ``failed`` row)."""
    seed = cfg.seed if seed is None else seed
    res = RunResult("torch", model_name, method, "ok", seed=seed)
    torch.manual_seed(seed)
    model = build_model(model_name, data, cfg)
    try:
        opt, res.settings, note = _demo_optimizer(method, model, model_name)
    except Unavailable as exc:
        res.status, res.reason = "unavailable", str(exc)
        return res
    except Exception as exc:
        return res.fail(exc)
    x_tr, y_tr = torch.as_tensor(data["x_train"]), torch.as_tensor(data["y_train"])
    x_te, y_te = torch.as_tensor(data["x_test"]), torch.as_tensor(data["y_test"])
    res.initial_train_loss, _ = evaluate(model, _chunks(x_tr, y_tr), _xent)
    idx = _demo.batch_indices(x_tr.shape[0], _demo.BATCH_SIZE, cfg.epochs_for(model_name), seed)
    try:
        curve = fit(model, opt, ((x_tr[i], y_tr[i]) for i in idx), loss_fn=_xent,
                    clip_norm=_demo.CLIP_NORM.get(model_name), total=len(idx),
                    desc=f"torch {model_name:>11s} {method:>5s} seed {seed}", progress=cfg.progress)
    except Exception as exc:
        _close(opt)
        return res.fail(exc)
    res.final_train_loss, _ = evaluate(model, _chunks(x_tr, y_tr), _xent)
    res.test_loss, res.test_accuracy = evaluate(model, _chunks(x_te, y_te), _xent)
    res.take_curve(curve)
    res.reason = note
    res.state_bytes = state_bytes(opt, model)
    res.steps = len(idx)
    _close(opt)
    return res


def _threads() -> dict[str, Any]:
    return {"torch.get_num_threads": torch.get_num_threads(),
            "torch.get_num_interop_threads": torch.get_num_interop_threads()}


def run(cfg: DemoConfig, *, log: Callable[[str], None] = print) -> list[RunResult]:
    """Run every requested (model, method) pair for every seed, print the table and the seed
    spread, write the plot, results and ``run.json``; return every run."""
    torch.set_num_threads(1)  # small models: one thread gives steadier timings on shared cores
    log(f"maccore demo (torch {torch.__version__}, {torch.get_num_threads()} thread, "
        f"seeds {cfg.seed_list()}{', quick' if cfg.quick else ''})")
    env = _demo.environment(("torch",), _threads(), device="cpu")
    return _demo.run_pairs(cfg, train_one, log, env)


# ------------------------------------------------------------------------------------------------
# The user's own model
# ------------------------------------------------------------------------------------------------


def compare(
    model_fn: Callable[[], nn.Module],
    train_loader: Iterable[Any],
    test_loader: Iterable[Any] | None = None,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    methods: Sequence[str] = _demo.METHODS,
    seeds: int | Sequence[int] = 3,
    epochs: int = 1,
    hparams: dict[str, dict[str, Any]] | None = None,
    attention: dict[str, Any] | None = None,
    clip_norm: float | None = None,
    name: str = "model",
    out: str | Path = _demo.DEFAULT_OUT,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> _demo.Comparison:
    """Compare SGD, AdamW, MAC, KFAC and SINGD on your model and data: every method × every seed,
    the demo's table (mean ± std and min–max over the seeds), the seed-spread text, the loss plot
    and ``run.json``, written to a fresh subfolder of ``out``.

    Args:
        model_fn: builds a fresh model, ``model_fn() -> nn.Module``; called after
            ``torch.manual_seed(seed)``, so every method starts a seed from the same weights.
        train_loader: ``(inputs, targets)`` batches, iterated once per epoch (a ``DataLoader``, or
            a list of tensor pairs). Batches are moved to the model's device.
        test_loader: optional held-out batches for the test loss and accuracy.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, averaged over the batch (default:
            cross-entropy over the last axis of the outputs, per token for ``[B, S, C]``). KFAC and
            SINGD assume a mean over samples (``loss_average="batch"``); for a mean over tokens too,
            pass ``hparams={"kfac": {"loss_average": "batch+sequence"}, "singd": {...}}``.
        methods: subset of ``("sgd", "adamw", "mac", "kfac", "singd")``.
        seeds: how many seeds (``0, 1, ...``) or the seeds themselves.
        epochs: passes over ``train_loader`` per run.
        hparams: ``{method: {name: value}}`` updating the defaults, the demo's digits settings
            (``maccore.cli.demo.HPARAMS["mlp"]``, e.g. ``{"mac": {"lr": 0.05, "damping": 1.0,
            ...}}``; names as ``torch.optim`` / ``maccore_torch``). Tune ``lr`` for your problem.
        attention: ``{qualified name of a fused qkv Linear: maccore_torch.QKV(num_heads=h)}`` for
            MAC's attention-aware preconditioning.
        clip_norm: clip the raw gradients to this norm before every step (all methods).
        name: label of the model in the table and the output folder's name.
        out: parent folder; the run writes to ``out/<date>-<time>-torch-<name>/`` (``force``:
            into ``out`` itself, even if it holds files).
        progress: progress bars (only when stdout and stderr are terminals).
        log: where the per-run lines, the table and the spread text go (``print``).

    Returns:
        a :class:`maccore.cli.demo.Comparison`: ``results`` (one :class:`RunResult` per method
        and seed: losses, accuracy, wall-clock, optimizer-state bytes, curve), ``table``,
        ``spread``, ``out`` (the folder) and ``files``. A method that raises becomes a
        ``failed`` row (with the traceback on stderr); the comparison goes on.

    Example::

        cmp = compare(lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)),
                      [(torch.randn(64, 8), torch.randint(0, 3, (64,))) for _ in range(10)],
                      methods=("sgd", "mac"), seeds=2, epochs=3)
        print(cmp.table)
    """
    methods = _demo.check_methods(methods)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or any(s < 0 for s in seed_list):
        raise ValueError(f"seeds: need at least one seed, all >= 0; got {seeds!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    hp = _demo.custom_hparams(methods, hparams)
    loss_fn = loss_fn or _xent
    try:
        n_batches: int | None = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        n_batches = None
    total = n_batches * epochs if n_batches is not None else None

    def train(method: str, seed: int) -> RunResult:
        res = RunResult("torch", name, method, "ok", seed=seed)
        torch.manual_seed(seed)
        model = model_fn()
        try:
            opt, res.settings, note = make_optimizer(method, model, hp[method], attention=attention)
        except Unavailable as exc:
            res.status, res.reason = "unavailable", str(exc)
            return res
        except Exception as exc:
            return res.fail(exc)
        try:
            res.initial_train_loss, _ = evaluate(model, train_loader, loss_fn)
            torch.manual_seed(seed)  # the same shuffles (DataLoader) and dropout for every method
            epoch_batches = (b for _ in range(epochs) for b in train_loader)
            curve = fit(model, opt, epoch_batches, loss_fn=loss_fn, clip_norm=clip_norm,
                        total=total, desc=f"torch {name} {method:>5s} seed {seed}",
                        progress=progress)
            res.final_train_loss, _ = evaluate(model, train_loader, loss_fn)
            if test_loader is not None:
                res.test_loss, res.test_accuracy = evaluate(model, test_loader, loss_fn)
        except Exception as exc:
            _close(opt)
            return res.fail(exc)
        res.take_curve(curve)
        res.reason = note
        res.state_bytes = state_bytes(opt, model)
        res.steps = len(curve.steps) if total is None else total
        _close(opt)
        return res

    torch.manual_seed(seed_list[0])
    probe = model_fn()
    config = {
        "name": name,
        "model_fn": getattr(model_fn, "__qualname__", repr(model_fn)),
        "model": repr(probe)[:4000],
        "parameters": sum(p.numel() for p in probe.parameters()),
        "loss_fn": getattr(loss_fn, "__qualname__", repr(loss_fn)),
        "methods": methods,
        "seeds": seed_list,
        "epochs": epochs,
        "train_batches_per_epoch": n_batches,
        "test_batches": (len(test_loader) if hasattr(test_loader, "__len__") else None)  # type: ignore[arg-type]
        if test_loader is not None else None,
        "hparams": hp,
        "hparams_overrides": hparams or {},
        "attention": attention,
        "clip_norm": clip_norm,
        "out": str(out),
        "force": force,
    }
    env = _demo.environment(("torch",), _threads(), device=str(_device(probe)))
    del probe
    log(f"maccore compare (torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{name}: methods {methods}, seeds {seed_list}, {epochs} epochs)")
    return _demo.run_custom("torch", name, methods, seed_list, train, out=out, force=force,
                            config=config, env=env, log=log)
