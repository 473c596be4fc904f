"""KFAC at its defaults (issue 13): loss at step 0 and after 20 steps on the model zoo, with and
without the KL clipping, for the numbers in docs/kfac.md.

    python benchmarks/kfac_defaults.py torch          # HF GPT-2 / Llama / BERT / ViT (tiny configs)
    python benchmarks/kfac_defaults.py jax            # Flax linen CNN, Flax NNX transformer
    python benchmarks/kfac_defaults.py torch --lr 0.05 --models gpt2,vit

Every run: 20 steps on one fixed batch (memorisation), seed 0, CPU, float32. The configurations:
``defaults`` (damping 0.1, kl_clip 1e-3), ``no clip`` (damping 0.1, kl_clip None), ``old`` (the
previous defaults: damping 1e-3, no clipping) and ``old + clip`` (damping 1e-3, kl_clip 1e-3).
Prints one markdown row per model and configuration: loss at step 0, after step 20, the lowest
loss, skipped steps (torch) and the smallest ν of the run (torch).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "adapters")]

CONFIGS = {
    "defaults": {},
    "no clip": {"kl_clip": None},
    "old": {"damping": 1e-3, "kl_clip": None},
    "old + clip": {"damping": 1e-3, "kl_clip": 1e-3},
}
STEPS = 20


def _vit(tr):
    cfg = tr.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tr.ViTForImageClassification(cfg)


def torch_run(name: str, lr: float, **kw):
    import torch

    import tests.zoo.conftest  # noqa: F401  (hides a torchvision that does not match torch)
    import transformers as tr

    import maccore_torch as mt
    from tests.zoo.test_zoo_torch import MODELS

    models = {**MODELS, "vit": _vit}
    torch.manual_seed(0)
    model = models[name](tr)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = mt.KFAC(model, lr=lr, **kw)
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        px, lab = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)

        def loss_fn():
            return model(pixel_values=px, labels=lab).loss
    else:
        ids = torch.randint(1, 64, (4, 12), generator=g)

        def loss_fn():
            return model(input_ids=ids, labels=ids).loss

    losses, nus = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(STEPS):
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            nu = opt.preconditioner.last_kl_scale
            if nu is not None:
                nus.append(float(nu))
    return losses, opt.preconditioner.skipped_steps, (min(nus) if nus else None)


def jax_run(name: str, lr: float, **kw):
    from tests.adapters.test_kfac_defaults import linen_cnn_losses, nnx_transformer_losses

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = linen_cnn_losses if name == "linen_cnn" else nnx_transformer_losses
        return f(learning_rate=lr, **kw), None, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("framework", choices=("torch", "jax"))
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--models", default=None, help="comma-separated subset")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    args = ap.parse_args(argv)
    names = (args.models.split(",") if args.models else
             ["gpt2", "llama", "bert", "vit"] if args.framework == "torch"
             else ["linen_cnn", "nnx_transformer"])
    run = torch_run if args.framework == "torch" else jax_run
    print("| model | configuration | lr | loss step 0 | loss step 20 | lowest | skipped | min ν |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        for cfg in args.configs.split(","):
            losses, skipped, nu = run(name, args.lr, **CONFIGS[cfg])
            finite = [v for v in losses if math.isfinite(v)]
            low = f"{min(finite):.4g}" if finite else "-"
            print(f"| {name} | {cfg} | {args.lr:g} | {losses[0]:.4g} | {losses[-1]:.4g} | {low} | "
                  f"{'-' if skipped is None else skipped} | {'-' if nu is None else f'{nu:.3g}'} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
