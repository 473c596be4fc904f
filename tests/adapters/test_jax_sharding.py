"""Parameters sharded over a device mesh (4 host CPU devices, ``NamedSharding``, model-parallel
kernels split on their output axis) give the same MAC / SMAC / KFAC / SINGD updates as unsharded
parameters (float64, relative to the update size ≤ 1e-10), and the updates and new parameters keep
the parameters' sharding (leaves left replicated get the sharding XLA gives plain SGD's update).

The device count must be set before jax initialises, so the check runs in a fresh interpreter
(``_jax_sharding_script.py``), as ``test_jax_multidevice.py`` does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.adapters._jax_common import ADAPTERS, ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_sharded_parameters_match_unsharded():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["PYTHONPATH"] = os.pathsep.join(
        [ADAPTERS, ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    script = Path(__file__).with_name("_jax_sharding_script.py")
    proc = subprocess.run(
        [sys.executable, str(script), "x64"], env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}"
    for name in ("mac", "smac", "kfac", "singd", "singd-diag"):
        assert f"{name} ok float64" in proc.stdout, proc.stdout
