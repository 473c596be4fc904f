"""``python -m maccore demo`` and the ``compare`` entry points.

- The quick demo runs end to end on every installed backend, every method finishes (a method the
  adapter lacks fails the test: it is never an expected "unavailable") and learns: its final
  training loss is at most 1/LEARN_FACTOR of its loss at initialisation.
- ``--seeds``: mean ± std and min–max columns, the seed-spread text, one run per seed.
- Provenance: every run writes ``run.json`` (configuration, versions, threads, machine, date) to a
  fresh subfolder of ``--out``; ``--force`` writes into ``--out`` itself.
- Usage errors (empty lists, negative seeds, unwritable ``--out``) exit with status 2 before any
  training; ``--version``; no ``\\r`` in non-terminal output; small losses in scientific notation.
- ``maccore_torch.demo.compare`` and ``maccore_jax.demo.compare`` on tiny models (seconds).
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
from maccore.cli import main

ROOT = Path(__file__).resolve().parents[1]
#: Every method's final training loss on the quick run is at most 1/LEARN_FACTOR of its initial one.
LEARN_FACTOR = 2.0


def _adapter(backend: str):
    sys.path.insert(0, str(ROOT / "adapters"))
    try:
        return importlib.import_module(f"maccore_{backend}")
    except ImportError as exc:
        pytest.skip(f"maccore_{backend} not importable: {exc}")
    finally:
        sys.path.remove(str(ROOT / "adapters"))


def _demo_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters"),
                                           os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "maccore", "demo", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _only_subfolder(parent: Path) -> Path:
    subs = [p for p in parent.iterdir() if p.is_dir()]
    assert len(subs) == 1, subs
    return subs[0]


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("jax", marks=pytest.mark.slow),  # about a minute of XLA compiles on 2 cores
])
def test_demo_quick_end_to_end(backend, tmp_path):
    pytest.importorskip("torch" if backend == "torch" else "jax")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    _adapter(backend)
    t0 = time.perf_counter()
    proc = _demo_cli("--backend", backend, "--quick", "--out", str(tmp_path))
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"demo --quick --backend {backend}: {elapsed:.1f}s")
    # progress bars are off when stdout/stderr are not terminals: no carriage returns in logs
    assert "\r" not in proc.stdout and "\r" not in proc.stderr

    run_dir = _only_subfolder(tmp_path)
    assert run_dir.name.endswith(f"-{backend}-quick")
    results = json.loads((run_dir / f"results_{backend}.json").read_text())
    table = (run_dir / f"table_{backend}.md").read_text()
    assert table.split("\n\n")[0] in proc.stdout  # the printed table is the one written to disk
    assert "One seed per method" in table  # --quick: one seed, and the text says what that means
    got = {(r["model"], r["method"]): r for r in results}
    assert set(got) == {(m, k) for m in _demo.MODELS for k in _demo.METHODS}
    assert len(results) == len(got)  # --quick: one seed
    for (model, method), r in got.items():
        # every method of the demo must run: a missing one fails here, never "unavailable"
        assert r["status"] == "ok", f"{backend} {model}/{method}: {r['status']}: {r['reason']}"
        for key in ("initial_train_loss", "final_train_loss", "test_accuracy", "wall_clock_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (model, method, key, r[key])
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["state_bytes"] > 0 and r["steps"] > 0 and r["curve_loss"] and r["settings"]
        assert r["final_train_loss"] <= r["initial_train_loss"] / LEARN_FACTOR, (
            f"{backend} {model}/{method} did not learn: loss {r['initial_train_loss']:.4f} -> "
            f"{r['final_train_loss']:.4f} (must fall by {LEARN_FACTOR}x on the quick run)")

    info = json.loads((run_dir / "run.json").read_text())
    cfg = info["config"]
    assert info["kind"] == "demo" and info["status"] == "ok"
    assert cfg["backend"] == backend and cfg["quick"] is True and cfg["seeds"] == [0]
    assert cfg["epochs"] == _demo.QUICK_EPOCHS and cfg["batch_size"] == _demo.BATCH_SIZE
    for model in _demo.MODELS:
        assert cfg["hparams"][model] == _demo.HPARAMS[model]
        for method in _demo.METHODS:  # the constructor's every argument, defaults included
            settings = cfg["optimizers"][model][method]
            assert len(settings) >= len(_demo.HPARAMS[model][method]), (model, method, settings)
    env = info["environment"]
    libs = ("torch",) if backend == "torch" else ("jax", "jaxlib", "optax")
    for lib in ("maccore", "numpy", "scikit-learn", *libs):
        assert env["versions"][lib], lib
    assert env["threads"] and env["machine"]["cpu_count"] >= 1 and env["machine"]["platform"]
    assert env["date"][:2] == "20" and env["python"]
    assert len(info["summary"]) == len(_demo.MODELS) * len(_demo.METHODS)
    assert set(info["files"].values()) == {p.name for p in run_dir.iterdir()}

    data = (run_dir / f"loss_{backend}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_demo_seeds_fresh_subfolders_and_force(tmp_path):
    """--seeds 2: one run per seed, mean ± std and min–max columns, the spread text; two runs into
    the same --out make two subfolders; --force writes into --out itself."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    args = ["--quick", "--seeds", "2", "--seed", "3", "--models", "mlp", "--methods", "sgd,mac",
            "--epochs", "1"]
    first = _demo_cli(*args, "--out", str(tmp_path / "runs"))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_dir = _only_subfolder(tmp_path / "runs")
    results = json.loads((run_dir / "results_torch.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in results) == [
        ("mac", 3), ("mac", 4), ("sgd", 3), ("sgd", 4)]
    table = (run_dir / "table_torch.md").read_text()
    assert "±" in table and "min–max" in table and "2/2" in table
    assert "Differences beyond the seed spread (2 seeds" in first.stdout
    assert "mlp, final train loss" in first.stdout and "mlp, test accuracy" in first.stdout
    info = json.loads((run_dir / "run.json").read_text())
    assert info["config"]["seeds"] == [3, 4] and info["config"]["epochs"] == {"mlp": 1}
    assert {s["method"]: s["seeds"] for s in info["summary"]} == {"sgd": [3, 4], "mac": [3, 4]}

    second = _demo_cli(*args, "--out", str(tmp_path / "runs"))  # never overwrites the first
    assert second.returncode == 0, second.stderr[-3000:]
    subs = sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert len(subs) == 2 and run_dir in subs
    assert json.loads((run_dir / "run.json").read_text()) == info

    explicit = tmp_path / "explicit"
    explicit.mkdir()
    (explicit / "keep.txt").write_text("mine")
    forced = _demo_cli(*args, "--seeds", "1", "--methods", "sgd", "--force", "--out", str(explicit))
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert {p.name for p in explicit.iterdir()} == {"keep.txt", "run.json", "table_torch.md",
                                                   "results_torch.json", "loss_torch.png"}
    assert json.loads((explicit / "run.json").read_text())["config"]["force"] is True


@pytest.mark.parametrize("argv, message", [
    (["--models", ","], "--models: empty list"),
    (["--models", ""], "--models: empty list"),
    (["--methods", " , "], "--methods: empty list"),
    (["--methods", "sgd,lbfgs"], "unknown methods ['lbfgs']"),
    (["--models", "resnet"], "unknown models ['resnet']"),
    (["--seed", "-1"], "--seed: must be >= 0"),
    (["--seeds", "0"], "--seeds: must be >= 1"),
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--seeds", "two"], "--seeds: not an integer"),
])
def test_demo_usage_errors_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: maccore demo" in err and message in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_demo_unwritable_out_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    t0 = time.perf_counter()
    code = main(["demo", "--quick", "--out", str(blocker / "sub")])
    assert code == 2 and time.perf_counter() - t0 < 10
    captured = capsys.readouterr()
    assert "cannot write to the output folder" in captured.err and str(blocker) in captured.err
    assert "seed 0:" not in captured.out  # no run started
    with pytest.raises(_demo.OutputError):
        _demo.prepare_out(blocker, "x")


def test_prepare_out_makes_fresh_folders(tmp_path):
    a = _demo.prepare_out(tmp_path, "run")
    b = _demo.prepare_out(tmp_path, "run")
    assert a != b and a.name == "run" and b.name == "run-2" and a.is_dir() and b.is_dir()
    (tmp_path / "file").write_text("x")
    assert _demo.prepare_out(tmp_path, "ignored", force=True) == tmp_path
    assert (tmp_path / "file").read_text() == "x"


def test_version_and_help(capsys):
    import maccore

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"maccore {maccore.__version__}"
    for argv in (["--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "``" not in out and "usage: maccore" in out
    assert "--seeds" in out and "--force" in out and "run.json" in out


def test_progress_is_off_without_a_terminal(monkeypatch):
    """stdout redirected (not a TTY): the progress wrapper returns the plain items, no tqdm."""
    import io

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert not _demo.interactive()
    it = _demo.progress([1, 2, 3], total=3, desc="x", enabled=True)
    assert type(it).__module__ != "tqdm.std" and list(it) == [1, 2, 3]


def test_small_losses_use_scientific_notation():
    assert _demo.fmt_loss(3.1e-6) == "3.1e-06" and _demo.fmt_loss(4.7e-3) == "4.7e-03"
    assert _demo.fmt_loss(0.5) == "0.5000" and _demo.fmt_loss(0.0) == "0"
    assert _demo.fmt_loss(float("nan")) == "-"
    runs = [_demo.RunResult("torch", "cnn", "kfac", "ok", final_train_loss=3.1e-6,
                            test_accuracy=0.98, wall_clock_s=1.0, state_bytes=10)]
    table = _demo.format_table(runs)
    assert "3.1e-06" in table and "0.0000" not in table


def _runs(method: str, losses, accs, model="mlp"):
    return [_demo.RunResult("torch", model, method, "ok", seed=i, final_train_loss=loss,
                            test_accuracy=acc, wall_clock_s=1.0, state_bytes=2048, steps=3)
            for i, (loss, acc) in enumerate(zip(losses, accs))]


def test_table_and_spread_over_seeds():
    results = (_runs("sgd", [0.30, 0.32, 0.34], [0.90, 0.91, 0.92])
               + _runs("mac", [0.10, 0.12, 0.14], [0.91, 0.92, 0.93])
               + _runs("adamw", [0.31, 0.35, 0.36], [0.80, 0.81, 0.82]))
    stat = _demo.summarize(results)[0].stats["final_train_loss"]
    assert stat.n == 3 and stat.mean == pytest.approx(0.32) and stat.std == pytest.approx(0.02)
    assert (stat.min, stat.max) == (0.30, 0.34)
    table = _demo.format_table(results)
    assert "0.3200 ± 0.0200" in table and "0.3000–0.3400" in table and "3/3" in table
    assert "91.0 ± 1.0" in table and "90.0–92.0" in table
    text = _demo.compare_text(results)
    loss_line = next(x for x in text.splitlines() if "final train loss" in x)
    acc_line = next(x for x in text.splitlines() if "test accuracy" in x)
    assert "mac < sgd, adamw" in loss_line and "sgd ~ adamw" in loss_line
    assert "mac > adamw" in acc_line and "mac ~ sgd" in acc_line and "sgd > adamw" in acc_line
    one = _demo.compare_text(_runs("sgd", [0.3], [0.9]) + _runs("mac", [0.1], [0.95]))
    assert "One seed per method" in one and "beyond" not in one


def test_table_reports_failed_and_unavailable_rows():
    ok = _runs("sgd", [0.5], [0.9])
    na = [_demo.RunResult("torch", "mlp", "singd", "unavailable", reason="not implemented yet")]
    table = _demo.format_table(ok + na)
    assert "0.5000" in table and "90.0" in table and "2.0 KiB" in table
    assert "unavailable: not implemented yet" in table
    part = _runs("mac", [0.2, 0.3], [0.9, 0.9])
    part[1].status, part[1].reason = "failed", "FloatingPointError: loss became nan at step 3"
    table = _demo.format_table(part)
    assert "1/2" in table and "seed 1 failed: FloatingPointError" in table


def test_data_and_batches_are_deterministic():
    pytest.importorskip("sklearn")
    import numpy as np

    cfg = _demo.DemoConfig(quick=True)
    a, b = _demo.load_data("mlp", cfg), _demo.load_data("mlp", cfg)
    assert a["x_train"].shape == (1437, 1, 8, 8) and a["x_test"].shape == (360, 1, 8, 8)
    np.testing.assert_array_equal(a["x_train"], b["x_train"])
    c = _demo.load_data("mlp", cfg, seed=1)  # another seed, another split
    assert not np.array_equal(a["y_test"], c["y_test"])
    s = _demo.load_data("transformer", cfg)
    np.testing.assert_array_equal(np.sort(s["x_train"], axis=1), s["y_train"])
    batches = _demo.batch_indices(100, 32, 2, seed=0)
    assert len(batches) == 6 and all(len(i) == 32 for i in batches)
    np.testing.assert_array_equal(batches[0], _demo.batch_indices(100, 32, 2, seed=0)[0])
    assert _demo.DemoConfig().seed_list() == [0, 1, 2]
    assert _demo.DemoConfig(quick=True).seed_list() == [0]
    assert _demo.DemoConfig(seed=5, seeds=2).seed_list() == [5, 6]


def test_accepted_kwargs_reports_what_it_drops():
    def f(model, *, lr, momentum=0.9):
        return model

    ok, ignored = _demo.accepted_kwargs(f, {"lr": 0.1, "momentum": 0.5, "T": 5})
    assert ok == {"lr": 0.1, "momentum": 0.5} and ignored == ["T"]
    ok, ignored = _demo.accepted_kwargs(lambda **kw: kw, {"T": 5})
    assert ok == {"T": 5} and ignored == []
    assert _demo.effective_settings(f, {"lr": 0.1}) == {"lr": 0.1, "momentum": 0.9}


def test_torch_state_bytes_counts_maccore_state():
    """Optimizer-state memory includes maccore's per-layer state, never the parameters."""
    torch = pytest.importorskip("torch")
    mt = _adapter("torch")
    demo = importlib.import_module("maccore_torch.demo")
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
            demo._close(opt)
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


def _check_comparison(cmp, backend: str, name: str, seeds: list[int], methods) -> None:
    assert cmp.out.name.endswith(f"-{backend}-{name}")
    assert {p.name for p in cmp.out.iterdir()} == {
        "run.json", f"table_{backend}.md", f"results_{backend}.json", f"loss_{backend}.png"}
    assert [(r.method, r.seed) for r in cmp.results] == [(m, s) for s in seeds for m in methods]
    for r in cmp.results:
        assert r.status == "ok", (r.method, r.status, r.reason)
        assert r.final_train_loss < 0.9 * r.initial_train_loss, (r.method, r.initial_train_loss,
                                                                 r.final_train_loss)
        assert 0.0 <= r.test_accuracy <= 1.0 and math.isfinite(r.test_loss)
        assert r.state_bytes > 0 and r.settings
    assert cmp.table in (cmp.out / f"table_{backend}.md").read_text()
    assert "±" in cmp.table and "Differences beyond the seed spread" in cmp.spread
    info = json.loads((cmp.out / "run.json").read_text())
    assert info["kind"] == "compare" and info["status"] == "ok"
    assert info["config"]["seeds"] == seeds and info["config"]["methods"] == list(methods)
    assert info["config"]["hparams"]["mac"]["lr"] == 0.1  # the override, on the defaults
    assert info["config"]["hparams"]["mac"]["damping"] == _demo.HPARAMS["mlp"]["mac"]["damping"]
    assert info["config"]["optimizers"][name]["mac"]["damping"] == 1.0
    assert info["environment"]["versions"]["maccore"]


def test_torch_compare_on_a_tiny_model(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    _adapter("torch")
    demo = importlib.import_module("maccore_torch.demo")
    from torch import nn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(448, 8, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    train = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 384, 64)]
    lines: list[str] = []
    cmp = demo.compare(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
                       train, [(x[384:], y[384:])], seeds=2, epochs=4, name="tiny",
                       hparams={"mac": {"lr": 0.1}}, out=tmp_path, log=lines.append)
    _check_comparison(cmp, "torch", "tiny", [0, 1], _demo.METHODS)
    assert cmp.table in "\n".join(lines)
    with pytest.raises(ValueError, match="methods: empty"):
        demo.compare(lambda: nn.Linear(8, 3), train, methods=(), out=tmp_path)
    with pytest.raises(ValueError, match="unknown methods"):
        demo.compare(lambda: nn.Linear(8, 3), train, hparams={"lbfgs": {}}, out=tmp_path)


def test_jax_compare_on_a_tiny_model(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    pytest.importorskip("matplotlib")
    _adapter("jax")
    import flax.linen as nn
    import numpy as np

    demo = importlib.import_module("maccore_jax.demo")

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((320, 8)).astype(np.float32)
    y = ((x[:, :3].sum(1) > 0).astype(np.int32) + (x[:, 3] > 1)).astype(np.int32)
    train = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    cmp = demo.compare(Tiny(), train, [(x[256:], y[256:])], seeds=2, epochs=4, name="tiny",
                       hparams={"mac": {"lr": 0.1}}, out=tmp_path, log=lambda s: None)
    _check_comparison(cmp, "jax", "tiny", [0, 1], _demo.METHODS)
