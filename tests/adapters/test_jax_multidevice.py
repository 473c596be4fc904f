"""Multi-device == single-device for the JAX adapter (2 host CPU devices, shard_map, axis_name).

The device count must be set before jax initialises, and other tests import jax first, so the check
runs in a fresh interpreter (``_jax_multidevice_script.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.adapters._jax_common import ADAPTERS, ROOT


@pytest.mark.distributed
def test_shard_map_statistics_match_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    env["PYTHONPATH"] = os.pathsep.join(
        [ADAPTERS, ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.pop("JAX_ENABLE_X64", None)
    script = Path(__file__).with_name("_jax_multidevice_script.py")
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}"
    lines = proc.stdout.splitlines()
    assert {"mac ok", "smac ok", "kfac ok"} <= set(lines), proc.stdout
