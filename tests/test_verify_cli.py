"""``python -m maccore verify`` and :mod:`maccore.testing.conformance`: healthy installs pass, a
perturbed oracle fails, and the table names every check and backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maccore.cli import main
from maccore.testing import conformance

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters"),
                                                       os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "maccore", "verify", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_verify_cli_healthy_install_exits_zero_on_every_backend():
    proc = _cli("--dtypes", "float64")  # float32 on every backend: test_float32_in_process
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name, _ in conformance.check_names():
        assert name in out
    assert "numpy" in out
    for lib, label in (("array_api_strict", "array_api_strict"), ("torch", "torch:cpu"), ("jax", "jax:")):
        try:
            __import__(lib)
        except ImportError:
            continue
        assert label in out, f"{lib} is installed but missing from the verify table"
    assert "FAIL " not in out.split("cells:")[0]
    assert "failure(s)" not in out
    assert " 0 failed" in out


def test_float32_in_process():
    res = conformance.run_checks(["numpy", "array_api_strict", "torch"], dtypes=["float32"])
    assert res and all(r.passed for r in res), conformance.format_table(res)


def test_verify_cli_perturbed_oracle_exits_nonzero():
    proc = _cli("--backends", "numpy", "--perturb-oracle", "1e-3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout
    assert "failure(s)" in proc.stdout


def test_main_in_process_list_and_exit_codes(capsys):
    assert main(["verify", "--list"]) == 0
    assert "kfac.exact.deep_linear_expand" in capsys.readouterr().out
    assert main(["verify", "--backends", "numpy", "--dtypes", "float64"]) == 0
    assert main(["verify", "--backends", "numpy", "--dtypes", "float64", "--perturb-oracle", "1e-6"]) == 1


@pytest.mark.parametrize("name", [n for n, _ in conformance.check_names()])
def test_every_check_detects_a_perturbed_oracle(name):
    """Each check (except the negative controls) must fail when its oracle is wrong by 1e-6."""
    healthy = conformance.run_checks(["numpy"], dtypes=["float64"], checks=[name])
    assert [r.passed for r in healthy] == [True], conformance.format_table(healthy)
    bad = conformance.run_checks(["numpy"], dtypes=["float64"], checks=[name],
                                 perturb=lambda _n, o: o + 1e-6 * max(1.0, float(np.abs(o).max())))
    if bad[0].negative:
        assert bad[0].passed  # a negative control is insensitive to small oracle errors
    else:
        assert not bad[0].passed, conformance.format_table(bad)


def test_run_checks_reports_crashes_as_failures(monkeypatch):
    def boom(_name, _oracle):
        raise RuntimeError("oracle exploded")

    res = conformance.run_checks(["numpy"], dtypes=["float64"], checks=["mac.spectrum"], perturb=boom)
    assert not res[0].passed and res[0].error is None
    assert "oracle exploded" in conformance.format_table(res)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown backends"):
        conformance.available_backends(["numpyy"])
    with pytest.raises(ValueError, match="unknown checks"):
        conformance.run_checks(["numpy"], checks=["nope"])


def test_import_maccore_stays_framework_free():
    code = ("import sys, maccore, maccore.testing, maccore.testing.conformance, maccore.verify, "
            "maccore.cli, maccore.cli.demo, maccore.cli.verify, maccore.__main__; "
            "bad = [m for m in ('torch', 'jax', 'cupy', 'sklearn', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("args,word", [
    (("--backends", "nope"), "--backends"),
    (("--backends", ","), "--backends"),
    (("--dtypes", "float8"), "--dtypes"),
    (("--dtypes", ""), "--dtypes"),
    (("--checks", "nope"), "--checks"),
    (("--checks", ","), "--checks"),
    (("--against", ","), "--against"),
])
def test_bad_arguments_are_usage_errors(args, word, capsys):
    """A bad list is a usage error: exit status 2 (a failed check is 1), no traceback, and an
    empty list never passes with 0 checks (issue 16)."""
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--quiet", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and word in err and "Traceback" not in err, err


def test_bad_arguments_exit_2_from_the_command_line():
    proc = _cli("--checks", ",")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert "--checks" in proc.stderr and "passed" not in proc.stdout
