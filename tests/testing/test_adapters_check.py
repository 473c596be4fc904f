"""``python -m maccore verify --adapters`` (:mod:`maccore.testing.adapters_check`): the real
adapters pass, a deliberately broken adapter fails its checks with exit status 1, a missing
framework is a skip with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from maccore.cli import main
from maccore.testing import adapters_check

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "adapters"))  # a source checkout whose adapters are not installed

# one configuration of each method, for the in-process tests (the CLI test runs them all)
FEW = tuple(c for c in adapters_check.CHECKS if c[0] in ("mac.reference", "kfac.pi.expand", "singd.dense"))


def test_cli_adapters_passes_on_the_real_adapters():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "maccore", "verify", "--adapters"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for check, _, _, models in adapters_check.CHECKS:
        assert check in out
    for word in ("mlp", "cnn", "tokens", "CE mean (R=1/8)", "Conv 3→4 3×3/s2", "0 failed"):
        assert word in out
    rows = [line for line in out.splitlines() if line.startswith(("torch ", "jax "))]
    assert len(rows) == 2 * len(adapters_check.check_list())
    assert all(" PASS " in r or " SKIP " in r for r in rows), out


def _scaled(fn, factor=1.01):
    """``fn`` whose returned weight and bias gradients are multiplied by ``factor``."""
    def wrapped(*args, **kwargs):
        w, b = fn(*args, **kwargs)
        w.mul_(factor)
        if b is not None:
            b.mul_(factor)
        return w, b
    return wrapped


def test_broken_torch_adapter_fails_with_exit_1(monkeypatch, capsys):
    pytest.importorskip("torch")
    import maccore_torch._base as base

    monkeypatch.setattr(base, "apply_split", _scaled(base.apply_split))
    monkeypatch.setattr(adapters_check, "CHECKS", FEW)
    monkeypatch.setattr(adapters_check, "FRAMEWORKS", ("torch",))
    assert main(["verify", "--adapters"]) == 1
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("torch ")]
    assert rows and all(" FAIL " in r for r in rows), out
    assert "pure scale error" in out  # the report says what kind of bug it is


def test_broken_jax_adapter_fails(monkeypatch):
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    import jax
    import maccore_jax.optimizers as opt
    import optax

    def broken(make):
        def scale_by(*args, **kwargs):
            tx = make(*args, **kwargs)

            def update(updates, state, params=None, **extra):
                new, state = tx.update(updates, state, params, **extra)
                return jax.tree.map(lambda u: 1.01 * u, new), state
            return optax.GradientTransformationExtraArgs(tx.init, update)
        return scale_by

    monkeypatch.setattr(opt, "scale_by_curvature", broken(opt.scale_by_curvature))  # MAC, KFAC, SINGD
    monkeypatch.setattr(adapters_check, "CHECKS", FEW[:2])
    results = adapters_check.run_adapter_checks(["jax"])
    assert results and all(r.status == "fail" for r in results), adapters_check.format_adapter_results(results)


def test_missing_framework_is_a_skip_with_the_reason(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jax", None)  # import jax → ImportError
    monkeypatch.setattr(adapters_check, "CHECKS", FEW[:1])
    monkeypatch.setattr(adapters_check, "FRAMEWORKS", ("jax",))
    assert main(["verify", "--adapters"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("jax ")]
    assert rows and all(" SKIP " in r for r in rows), out
    assert "skipped: " in out and "pip install jax" in out


def test_adapters_and_against_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--adapters", "--against", "curvlinops"])
    assert exit_.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
