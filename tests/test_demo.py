"""``python -m maccore demo --quick`` runs end to end on every installed backend.

Every requested method appears in the table: methods the adapter implements must produce finite
numbers; a method the adapter does not implement (yet) must be reported as ``unavailable`` with a
reason, never faked.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maccore.cli import demo as _demo

ROOT = Path(__file__).resolve().parents[1]
# adapter attribute that implements each maccore method
ADAPTER_NAMES = {"torch": {"mac": "MAC", "kfac": "KFAC", "singd": "SINGD"},
                 "jax": {"mac": "mac", "kfac": "kfac", "singd": "singd"}}


def _adapter(backend: str):
    sys.path.insert(0, str(ROOT / "adapters"))
    try:
        return importlib.import_module(f"maccore_{backend}")
    except ImportError as exc:
        pytest.skip(f"maccore_{backend} not importable: {exc}")
    finally:
        sys.path.remove(str(ROOT / "adapters"))


def _implemented(backend: str, method: str) -> bool:
    if method in ("sgd", "adamw"):
        return True
    try:
        return hasattr(_adapter(backend), ADAPTER_NAMES[backend][method])
    except Exception:  # an adapter package without the attribute (lazy __getattr__)
        return False


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_demo_quick_end_to_end(backend, tmp_path):
    pytest.importorskip("torch" if backend == "torch" else "jax")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    _adapter(backend)
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "maccore", "demo", "--backend", backend, "--quick", "--no-progress",
         "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"demo --quick --backend {backend}: {elapsed:.1f}s")

    results = json.loads((tmp_path / f"results_{backend}.json").read_text())
    table = (tmp_path / f"table_{backend}.md").read_text()
    assert table in proc.stdout  # the printed table is the one written to disk
    got = {(r["model"], r["method"]): r for r in results}
    assert set(got) == {(m, k) for m in _demo.MODELS for k in _demo.METHODS}
    for (model, method), r in got.items():
        assert f"| {model}" in table and f"| {method}" in table
        if _implemented(backend, method):
            assert r["status"] == "ok", f"{model}/{method} is implemented but {r['status']}: {r['reason']}"
            for key in ("final_train_loss", "test_accuracy", "wall_clock_s"):
                assert math.isfinite(r[key]), (model, method, key, r[key])
            assert 0.0 <= r["test_accuracy"] <= 1.0
            assert r["state_bytes"] > 0 and r["steps"] > 0 and r["curve_loss"]
        else:
            assert r["status"] == "unavailable" and r["reason"], (model, method, r)
            assert f"unavailable: {r['reason']}" in table

    png = tmp_path / f"loss_{backend}.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_demo_rejects_unknown_names():
    from maccore.cli import main

    with pytest.raises(SystemExit, match="unknown methods"):
        main(["demo", "--methods", "sgd,lbfgs"])
    with pytest.raises(SystemExit, match="unknown models"):
        main(["demo", "--models", "resnet"])


def test_data_and_batches_are_deterministic():
    pytest.importorskip("sklearn")
    import numpy as np

    cfg = _demo.DemoConfig(quick=True)
    a, b = _demo.load_data("mlp", cfg), _demo.load_data("mlp", cfg)
    assert a["x_train"].shape == (1437, 1, 8, 8) and a["x_test"].shape == (360, 1, 8, 8)
    np.testing.assert_array_equal(a["x_train"], b["x_train"])
    s = _demo.load_data("transformer", cfg)
    np.testing.assert_array_equal(np.sort(s["x_train"], axis=1), s["y_train"])
    batches = _demo.batch_indices(100, 32, 2, seed=0)
    assert len(batches) == 6 and all(len(i) == 32 for i in batches)
    np.testing.assert_array_equal(batches[0], _demo.batch_indices(100, 32, 2, seed=0)[0])


def test_table_and_state_memory_helpers():
    ok = _demo.RunResult("torch", "mlp", "sgd", "ok", final_train_loss=0.5, test_accuracy=0.9,
                         wall_clock_s=1.0, state_bytes=2048, steps=3)
    na = _demo.RunResult("torch", "mlp", "singd", "unavailable", reason="not implemented yet")
    table = _demo.format_table([ok, na])
    assert "0.5000" in table and "90.0%" in table and "2.0 KiB" in table
    assert "unavailable: not implemented yet" in table


def test_accepted_kwargs_reports_what_it_drops():
    def f(model, *, lr, momentum=0.9):
        return model

    ok, ignored = _demo.accepted_kwargs(f, {"lr": 0.1, "momentum": 0.5, "T": 5})
    assert ok == {"lr": 0.1, "momentum": 0.5} and ignored == ["T"]
    ok, ignored = _demo.accepted_kwargs(lambda **kw: kw, {"T": 5})
    assert ok == {"T": 5} and ignored == []


def test_torch_state_bytes_counts_maccore_state():
    """Optimizer-state memory includes maccore's per-layer state, never the parameters."""
    torch = pytest.importorskip("torch")
    mt = _adapter("torch")
    demo = importlib.import_module("maccore_torch.demo")
    if not hasattr(mt, "MAC"):
        pytest.skip("maccore_torch.MAC not implemented")
    model = demo.MLP()
    n_params = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    sizes = {}
    for name, opt in (("sgd", torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)),
                      ("mac", mt.MAC(model, lr=0.1))):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sizes[name] = demo.state_bytes(opt, model)
        if name == "mac":
            opt.preconditioner.remove_hooks() if hasattr(opt, "preconditioner") else None
    assert sizes["sgd"] == 4 * n_params  # one momentum buffer per parameter
    # MAC: the same momentum buffers plus at least one float32 mean of length d̃ per layer
    assert sizes["mac"] >= 4 * n_params + 4 * (65 + 129 + 65)


def test_curve_rejects_nonfinite_loss_and_fail_marks_the_row():
    """A NaN/Inf loss stops a run: Curve.record raises, RunResult.fail turns it into a failed row."""
    curve = _demo.Curve()
    curve.record(0, 1.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FloatingPointError, match="loss became"):
            curve.record(1, bad)
    assert curve.losses == [1.0]
    res = _demo.RunResult("torch", "mlp", "mac", "ok")
    try:
        curve.record(3, float("nan"))
    except FloatingPointError as exc:
        assert res.fail(exc, show_traceback=False) is res
    assert res.status == "failed" and res.reason == "FloatingPointError: loss became nan at step 3"
