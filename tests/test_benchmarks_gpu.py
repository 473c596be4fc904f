"""``benchmarks/gpu.py`` (the GPU rows for a lent device) without a GPU: the CPU smoke run, the
n/a path without CUDA, failures reported per section; and ``bench_train.Trainer``'s CPU path
unchanged by its ``device`` argument.

The tests named ``cuda``/``cupy`` run only where a device is present (``bash benchmarks/gpu.sh``
selects them with ``-k "cuda or cupy"``): maccore's results and MAC's training steps on the
device against the CPU."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import bench_train, gpu  # noqa: E402  (bench_train needs torch)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


# ------------------------------------------------------------------------------------------------
# Without a GPU
# ------------------------------------------------------------------------------------------------


def test_trainer_device_defaults_to_cpu_and_changes_nothing_there():
    assert inspect.signature(bench_train.Trainer).parameters["device"].default == "cpu"
    x, y, _ = bench_train.digits()
    t = bench_train.Trainer(bench_train.CNN, "SGD", x[:64], y[:64], 32)
    assert t.device == torch.device("cpu") and t._sync is None
    assert all(p.device.type == "cpu" for p in t.model.parameters())
    # the batches are the plain slices, as before the argument existed
    assert len(t.batches) == 2 and torch.equal(t.batches[1][0], x[32:64]) and torch.equal(t.batches[1][1], y[32:64])
    # the same model and steps as a Trainer given device="cpu" explicitly
    u = bench_train.Trainer(bench_train.CNN, "SGD", x[:64], y[:64], 32, device="cpu")
    for tr in (t, u):
        assert tr.step() > 0
    for p, q in zip(t.model.parameters(), u.model.parameters()):
        assert torch.equal(p, q)


def test_cpu_smoke_run_produces_every_row(monkeypatch, capsys):
    got = {}
    real = gpu.run
    monkeypatch.setattr(gpu, "run", lambda *a, **k: got.setdefault("out", real(*a, **k)))
    assert gpu.main(["--device", "cpu", "--repeats", "2"]) == 0
    rows, failed = got["out"]
    assert failed == []
    decoder = "torch-cpu Llama-style decoder (1 layers, d=32, 16 tokens) b8 (smoke): MAC step"
    assert [r.name for r in rows] == [
        "torch-cpu (smoke) mac_apply bandwidth f32 64x48",
        "torch-cpu (smoke) mac_apply fast path 64x48 streamed",
        "torch-cpu ViT digits b32 (smoke): MAC step",
        "torch-cpu ViT digits b32 (smoke): MAC step, fast paths",
    ] + ([decoder, decoder + ", fast paths"] if _has_transformers() else [decoder])
    # smoke: numbers, no targets (a busy CPU must not fail a run that checks code paths)
    for r in rows if _has_transformers() else rows[:4]:
        assert r.status == "report" and r.available and all(x > 0 for x in r.ratios), r
    assert rows[0].higher_is_better and "GB/s" in rows[0].note
    out = capsys.readouterr().out
    assert "smoke run" in out and "torch-cpu ViT digits b32 (smoke): MAC step" in out and "total" in out


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except Exception:
        return False
    return True


def test_without_cuda_every_row_is_na_and_exit_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    called = []
    monkeypatch.setattr(gpu, "run", lambda *a, **k: called.append(1))
    assert gpu.main([]) == 0
    assert called == []  # nothing measured
    out = capsys.readouterr().out
    assert "NO CUDA DEVICE" in out
    for name in ("torch-cuda mac_apply bandwidth f32 4096x4096", "torch-cuda mac_apply bandwidth f32 768x3072",
                 "cupy mac_apply bandwidth f32 4096x4096", "torch-cuda ViT digits b128: MAC step",
                 "torch-cuda Llama-style decoder (4 layers, d=128, 64 tokens) b16: MAC step"):
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert "n/a" in line and "no CUDA device" in line
    assert " PASS" not in out and " MISS" not in out


def test_a_failing_section_is_reported_the_others_run_and_exit_1(monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")

    monkeypatch.setattr(gpu, "vit_rows", boom)
    monkeypatch.setattr(gpu, "decoder_rows", lambda *a, **k: [])
    assert gpu.main(["--device", "cpu"]) == 1
    out = capsys.readouterr()
    line = next(ln for ln in out.out.splitlines() if ln.startswith("torch-cpu ViT digits b32 (smoke): MAC step"))
    assert "n/a" in line and "FAILED: RuntimeError: CUDA error: an illegal memory access was encountered" in line
    assert "torch-cpu (smoke) mac_apply bandwidth f32 64x48" in out.out  # the other sections ran
    assert "section(s) FAILED" in out.out and "Traceback" in out.err


def test_rows_with_targets_get_a_status(monkeypatch):
    """The device rows' targets: bandwidth ≥ 0.7 (higher is better), fast ≤ plain, MAC ≤ 1.10 SGD."""
    gen = torch.Generator().manual_seed(0)

    def make(shape, k):
        return [torch.randn(*shape, generator=gen) for _ in range(k)], torch.randn(shape[1], generator=gen)

    rows = gpu.bandwidth_rows("t", make, lambda g: g.clone(), None, shapes=((32, 16),), repeats=3,
                              pool_bytes=1 << 13, call_bytes=1 << 13)
    assert [r.target for r in rows] == [0.7, 1.0] and rows[0].higher_is_better and not rows[1].higher_is_better
    assert all(r.status in ("PASS", "NOISY", "MISS") and len(r.ratios) == 3 for r in rows)
    times = {"SGD": [1.0, 1.0], "MAC": [1.05, 1.2], "MAC-plain": [1.1, 1.1]}
    mac, fast = gpu.step_rows("m", times, 50, 1.10)
    assert (mac.target, mac.status, fast.target) == (1.10, "NOISY", 1.0)
    assert "20.00 ms/step" in mac.note  # median SGD: 1 s per block of 50


@pytest.mark.parametrize("argv", [["--device", "gpu"], ["--device", "cuda:x"], ["--repeats", "0"]])
def test_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu.main(argv)
    assert exc.value.code == 2


def test_na_row_names_match_the_rows_a_device_run_makes():
    """The n/a table without a device names the rows a device run produces."""
    secs = gpu._sections("cuda", 5, quick=False)
    names = [n for _, _, ns in secs for n in ns]
    assert names[:2] == [f"torch-cuda mac_apply bandwidth f32 {m}x{n}" for m, n in gpu.SHAPES]
    assert gpu.decoder_name("cuda", 4, 128, 64, 16) + ": MAC step" in names
    assert len(gpu._sections("cuda", 5, quick=True)) == len(secs) - 1  # --quick: no larger decoder


# ------------------------------------------------------------------------------------------------
# On a device (skipped without one)
# ------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("heads", [0, 4])
def test_cuda_mac_apply_matches_cpu(dtype, heads):
    import maccore

    dt = getattr(torch, dtype)
    g = torch.randn(256, 96, dtype=dt, generator=torch.Generator().manual_seed(1))
    a = torch.randn(*((heads,) if heads else ()), 96, dtype=dt, generator=torch.Generator().manual_seed(2))
    want = maccore.mac_apply(g, a, 0.5)
    got = maccore.mac_apply(g.cuda(), a.cuda(), 0.5)
    plain = gpu._plain(lambda: maccore.mac_apply(g.cuda(), a.cuda(), 0.5))()
    assert got.device.type == "cuda" and got.dtype == dt
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.cpu(), want, **tol)
    torch.testing.assert_close(plain.cpu(), want, **tol)


def _cupy_or_skip():
    from tests.conftest import cupy_or_skip

    return cupy_or_skip()


def test_cupy_mac_apply_matches_numpy():
    cupy = _cupy_or_skip()
    import maccore

    rng = np.random.default_rng(0)
    g = rng.standard_normal((256, 96), dtype=np.float32)
    a = rng.standard_normal(96, dtype=np.float32)
    got = maccore.mac_apply(cupy.asarray(g), cupy.asarray(a), 0.5)
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(got), maccore.mac_apply(g, a, 0.5), rtol=1e-4, atol=1e-5)


def _train(trainer, steps: int) -> list[torch.Tensor]:
    trainer.steps(steps)
    return [p.detach().cpu() for p in trainer.model.parameters()]


@needs_cuda
@pytest.mark.parametrize("model", ["ViT", "decoder"])
def test_cuda_mac_training_steps_match_cpu(model):
    """12 MAC steps (statistics at steps 1, 6, 11; the first refresh) on the device equal those on
    the CPU; the optimizer's state stays on the device."""
    if model == "ViT":
        x, y, _ = bench_train.digits()
        make = lambda dev: bench_train.Trainer(bench_train.ViT, "MAC", x[:96], y[:96], 32, device=dev)  # noqa: E731
    else:
        pytest.importorskip("transformers")
        make = lambda dev: gpu.decoder_trainers(dev, layers=1, d=32, tokens=16, batch=8,  # noqa: E731
                                                 optimizers=("MAC",))["MAC"]
    cuda = make("cuda")
    got = _train(cuda, 12)
    want = _train(make("cpu"), 12)
    assert cuda.skipped == 0
    for p, q in zip(got, want):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    for st in cuda.opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.ndim:
                assert v.device.type == "cuda"


@needs_cuda
def test_cuda_benchmark_rows_run_at_tiny_sizes(monkeypatch):
    """Every device section of ``python -m benchmarks.gpu`` at tiny sizes: rows, no failure."""
    monkeypatch.setattr(gpu, "SHAPES", ((256, 128),))
    monkeypatch.setattr(gpu, "POOL_BYTES", 1 << 20)
    monkeypatch.setattr(gpu, "CALL_BYTES", 1 << 20)
    monkeypatch.setattr(gpu, "vit_rows", lambda dev, rounds, smoke: _vit_tiny(dev, rounds))
    real = gpu.decoder_rows
    monkeypatch.setattr(gpu, "decoder_rows", lambda dev, rounds, **kw: real(
        dev, 2, layers=1, d=32, tokens=16, batch=8, target=kw["target"], block=5))
    rows, failed = gpu.run("cuda", repeats=2, quick=True)
    assert failed == []
    assert all(r.available for r in rows if not r.name.startswith("cupy")), rows
    assert any(r.name.startswith("torch-cuda mac_apply bandwidth") for r in rows)


def _vit_tiny(device, rounds):
    x, y, _ = bench_train.digits()
    tr = {o: bench_train.Trainer(bench_train.ViT, o, x[:64], y[:64], 32, device=device)
          for o in ("SGD", "MAC", "MAC-plain")}
    return gpu.step_rows("torch-cuda ViT tiny", bench_train.interleaved_blocks(tr, rounds=2, block=5), 5, 1.10)


def test_smoke_rows_are_finite():
    """The smoke sizes' bandwidth row: finite fractions (no division by a zero time)."""
    rows = gpu.torch_bandwidth("cpu", 2, True)
    assert all(math.isfinite(x) and x > 0 for r in rows for x in r.ratios)
