"""Compare maccore's references with other curvature libraries (``python -m maccore verify --against``).

Each comparison builds a small torch model, asks the other library for its curvature, converts it
with :mod:`maccore.testing.convert` and compares it with ``maccore_torch.testing.curvature_blocks``
using :func:`maccore.testing.assert_curvature_close` (float64). A library that is not installed is
reported as skipped, with the reason; nothing here imports a framework before a comparison runs.

- ``curvlinops``: GGN, Hessian, empirical Fisher (its factor 2 for MSE undone) and KFAC of an MLP's
  last layer (MSE and cross-entropy), and KFAC-expand / -reduce of a strided Conv2d.
- ``backpack``: KFLR of a Conv2d (input factor of KFAC-expand summed over locations, gradient
  factor of KFAC-reduce) and of a Linear layer.
- ``kfac-jax``: only the layout and scaling helpers exist (:func:`maccore.testing.convert.from_kfac_jax`,
  tested on hand-built matrices); the automated comparison is reported as not available.
"""

from __future__ import annotations

import copy
import importlib
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["LIBRARIES", "AgainstResult", "run_against", "format_against"]

LIBRARIES = ("curvlinops", "backpack", "kfac-jax")
_MODULES = {"curvlinops": "curvlinops", "backpack": "backpack", "kfac-jax": "kfac_jax"}
_PIP = {"curvlinops": "curvlinops-for-pytorch", "backpack": "backpack-for-pytorch", "kfac-jax": "kfac-jax"}


@dataclass
class AgainstResult:
    """One comparison: ``status`` is ``"pass"``, ``"fail"`` or ``"skip"``; ``error`` the relative
    Frobenius error (``None`` when skipped); ``detail`` the sizes, or the reason for a skip, or the
    mismatch report."""

    library: str
    check: str
    status: str
    error: float | None = None
    detail: str = ""


def _import_adapter(name: str):
    """``maccore_torch.testing``, also from a source checkout that is not installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name not in (name.split(".")[0], name):
            raise
        adapters = Path(__file__).resolve().parents[2] / "adapters"
        if not adapters.is_dir():
            raise
        sys.path.insert(0, str(adapters))
        return importlib.import_module(name)


def _compare(library: str, check: str, sizes: str, actual: Any, desired: Any) -> AgainstResult:
    from maccore.testing._assert import curvature_report

    ok, err, msg = curvature_report(actual, desired, dtype="float64")
    return AgainstResult(library, check, "pass" if ok else "fail", err, sizes if ok else f"{sizes}\n{msg}")


def _dense(op: Any, n: int):
    import torch

    return (op @ torch.eye(n, dtype=torch.float64)).detach().cpu().numpy()


def _curvlinops() -> list[AgainstResult]:
    import numpy as np
    import torch
    from torch import nn

    import curvlinops

    from maccore.testing import convert

    blocks = _import_adapter("maccore_torch.testing").curvature_blocks
    out = []
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    for loss_name, loss, y in (("mse", nn.MSELoss(), torch.randn(6, 3, dtype=torch.float64)),
                               ("ce", nn.CrossEntropyLoss(), torch.tensor([0, 1, 2, 0, 1, 2]))):
        layer = model[2]
        params, data, n = [layer.weight, layer.bias], [(x, y)], 18
        shape = tuple(layer.weight.shape)
        sizes = f"MLP 4→5→3 (tanh), N = 6, {type(loss).__name__}(mean), last layer (18×18 block)"
        kw = {"check_deterministic": False}
        ops = {
            "ggn": (curvlinops.GGNLinearOperator, "type-2"),
            "hessian": (curvlinops.HessianLinearOperator, "type-2"),
            "ef": (curvlinops.EFLinearOperator, "empirical"),
        }
        for kind, (cls, ft) in ops.items():
            theirs = convert.from_curvlinops(_dense(cls(model, loss, params, data, **kw), n), shape,
                                             fisher_type=ft, loss=loss_name)
            ours = blocks(model, loss, x, y, kind=kind, layers=["2"])["2"]
            out.append(_compare("curvlinops", f"{kind}.{loss_name}", sizes, theirs, ours))
        op = curvlinops.KFACLinearOperator(model, loss, params, data, fisher_type="type-2",
                                           separate_weight_and_bias=False, **kw)
        A, G = blocks(model, loss, x, y, kind="kfac-expand", layers=["2"])["2"]
        out.append(_compare("curvlinops", f"kfac.{loss_name}", sizes,
                            convert.from_curvlinops(_dense(op, n), shape), np.kron(G, A)))
    torch.manual_seed(1)
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(27, 4)).double()
    xc = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    yc = torch.randint(0, 4, (5,))
    conv = cnn[0]
    for approx in ("expand", "reduce"):
        op = curvlinops.KFACLinearOperator(cnn, nn.CrossEntropyLoss(), [conv.weight, conv.bias], [(xc, yc)],
                                           fisher_type="type-2", kfac_approx=approx,
                                           separate_weight_and_bias=False, check_deterministic=False)
        A, G = blocks(cnn, nn.CrossEntropyLoss(), xc, yc, kind=f"kfac-{approx}", layers=["0"])["0"]
        out.append(_compare("curvlinops", f"kfac-{approx}.conv2d",
                            "Conv2d(2→3, 3×3, stride 2, padding 1) → ReLU → Linear, N = 5, CE (57×57 block)",
                            convert.from_curvlinops(_dense(op, 57), tuple(conv.weight.shape)), np.kron(G, A)))
    return out


def _backpack() -> list[AgainstResult]:
    import torch
    from backpack import backpack, extend
    from backpack.extensions import KFLR
    from torch import nn

    from maccore.testing import convert

    blocks = _import_adapter("maccore_torch.testing").curvature_blocks
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)).double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (3,))
    expand = blocks(model, nn.CrossEntropyLoss(), x, y, kind="kfac-expand")
    reduce = blocks(model, nn.CrossEntropyLoss(), x, y, kind="kfac-reduce")
    ext = extend(copy.deepcopy(model))
    loss = extend(nn.CrossEntropyLoss())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with backpack(KFLR()):
            loss(ext(x), y).backward()
    sizes = "Conv2d(2→3, 3×3, padding 1) → ReLU → Linear(48→2), N = 3, CE; KFLR factors"
    A, G = convert.from_backpack_kfac(ext[0].weight.kflr, output_locations=16)
    res = [_compare("backpack", "kflr.conv2d.A (= P·A_expand)", sizes, A, expand["0"][0][:-1, :-1]),
           _compare("backpack", "kflr.conv2d.G (= G_reduce)", sizes, G, reduce["0"][1])]
    A, G = convert.from_backpack_kfac(ext[3].weight.kflr)
    res.append(_compare("backpack", "kflr.linear", sizes, (A, G), (expand["3"][0][:-1, :-1], expand["3"][1])))
    return res


def _kfac_jax() -> list[AgainstResult]:
    return [AgainstResult("kfac-jax", "dense blocks", "skip", None,
                          "kfac-jax is installed, but no automated comparison is implemented yet; convert its "
                          "blocks with maccore.testing.convert.from_kfac_jax and compare with "
                          "maccore_jax.testing.curvature_blocks (docs/verify.md)")]


_RUNNERS: dict[str, Callable[[], list[AgainstResult]]] = {
    "curvlinops": _curvlinops, "backpack": _backpack, "kfac-jax": _kfac_jax}


def run_against(library: str) -> list[AgainstResult]:
    """Run the comparisons with ``library`` (one of :data:`LIBRARIES`); a missing library (or
    torch) gives one ``"skip"`` result naming the reason."""
    if library not in LIBRARIES:
        raise ValueError(f"unknown library {library!r}; known: {list(LIBRARIES)}")
    needs = [_MODULES[library]] + ([] if library == "kfac-jax" else ["torch"])
    for mod in needs:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            pip = _PIP[library] if mod == _MODULES[library] else mod
            return [AgainstResult(library, "all", "skip", None,
                                  f"{mod} is not installed ({exc.__class__.__name__}: {exc}); "
                                  f"pip install {pip}")]
    try:
        return _RUNNERS[library]()
    except Exception as exc:  # a crash is a failure, reported with its message
        return [AgainstResult(library, "all", "fail", None, f"{type(exc).__name__}: {exc}")]


def format_against(results: list[AgainstResult]) -> str:
    """Plain-text report: one line per comparison, failure reports and skip reasons indented."""
    lines = []
    width = max((len(r.check) for r in results), default=5)
    for r in results:
        err = "" if r.error is None else f"{r.error:.1e}"
        head, *rest = (r.detail or "").split("\n")
        lines.append(f"{r.library:10s} {r.check:{width}s}  {r.status.upper():4s} {err:>8s}  {head}".rstrip())
        lines.extend("    " + s for s in rest)
    return "\n".join(lines)
