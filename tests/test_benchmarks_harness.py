"""The benchmark tooling itself (no timing assertions): status rules and a tiny core run."""

from __future__ import annotations

import math

import pytest

from benchmarks import bench_core
from benchmarks._harness import Result, paired_ratios


@pytest.mark.parametrize(
    "ratios,target,higher,want",
    [
        ([0.9, 1.0, 1.1], 1.05, False, "PASS"),
        ([1.0, 1.2, 1.3], 1.1, False, "NOISY"),
        ([1.2, 1.3, 1.4], 1.1, False, "MISS"),
        ([0.8, 0.75, 0.9], 0.7, True, "PASS"),
        ([0.5, 0.6, 0.75], 0.7, True, "NOISY"),
        ([0.5, 0.6, 0.65], 0.7, True, "MISS"),
        ([1.0, 2.0], None, False, "report"),
        ([math.nan], 1.0, False, "n/a"),
    ],
)
def test_status_rules(ratios, target, higher, want):
    assert Result("x", "y", target, ratios, higher_is_better=higher).status == want


def test_paired_ratios_alternate_and_count():
    calls = []
    r = paired_ratios(lambda: calls.append("c"), lambda: calls.append("b"), repeats=4, inner=2, warmup=1)
    assert len(r) == 4 and all(x > 0 for x in r)
    # warm-up (c, b), then pairs alternating the order: c c b b | b b c c | ...
    assert calls[:2] == ["c", "b"] and calls[2:6] == ["c", "c", "b", "b"] and calls[6:10] == ["b", "b", "c", "c"]


def test_core_rows_run_on_small_shapes(monkeypatch):
    """Every mac_apply row is produced (warm, streamed, in place, floor) for each library present."""
    monkeypatch.setattr(bench_core, "SHAPES", ((64, 48),))
    rows = bench_core._numpy_mac(3, quick=True)
    names = [r.name for r in rows]
    assert [n.split(" 64x48")[0] for n in names[:5]] == [
        "numpy mac_apply f32", "numpy mac_apply f32", "numpy mac_apply fast path",
        "numpy MAC in place (adapter kernel)", "numpy floor: one elementwise pass g*1"]
    fast = rows[2]
    assert fast.baseline == "plain path (fast paths off)" and fast.target == 1.0
    assert all(len(r.ratios) == 3 and r.available for r in rows)
    assert "2 arrays cycled" in rows[1].baseline  # quick: a pool of two


def test_plain_path_switch_takes_the_standard_path(monkeypatch):
    """The benchmarks' plain path really bypasses the native kernels (and restores them)."""
    import numpy as np

    from maccore import _delegate

    calls = []
    real = _delegate.mac_rank1_standard
    monkeypatch.setattr(_delegate, "mac_rank1_standard", lambda *a, **k: calls.append(1) or real(*a, **k))
    g, a = np.ones((4, 3), dtype=np.float32), np.ones(3, dtype=np.float32)
    bench_core._mac(g, a)
    assert calls == []  # NumPy float32: the native kernel
    np.testing.assert_allclose(bench_core._plain_mac(g, a), bench_core._mac(g, a), rtol=1e-6)
    assert calls == [1] and _delegate.FAST_PATHS


@pytest.mark.parametrize("arg", ["x", "-1", ""])
def test_run_rejects_bad_thread_settings(arg, capsys):
    from benchmarks import run

    with pytest.raises(SystemExit) as exc:
        run.main(["--threads", arg, "--only", "core"])
    assert exc.value.code == 2 and "--threads" in capsys.readouterr().err
