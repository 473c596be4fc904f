"""The model zoo (issue #13): real architectures built from tiny configs (no downloads).

``transformers`` imports ``torchvision`` when it is installed; a torchvision wheel that does not
match the pinned torch fails at import (``operator torchvision::nms does not exist``). We probe it
in a subprocess once and, when broken, hide it (``sys.modules["torchvision"] = None``) so that
``transformers`` treats it as absent. timm needs a working torchvision: its cases skip with the
reason.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def _torchvision_state() -> str:
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode == 0:
        return ""
    last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
    return last


TORCHVISION_BROKEN = _torchvision_state() if "torchvision" not in sys.modules else ""
if TORCHVISION_BROKEN:
    sys.modules["torchvision"] = None  # transformers then sees no torchvision


@pytest.fixture(scope="session")
def transformers():
    return pytest.importorskip("transformers")
