"""The model zoo (issue #13): real architectures built from tiny configs (no downloads).

``transformers`` imports ``torchvision`` when it is installed; a torchvision wheel that does not
match the pinned torch fails at import (``operator torchvision::nms does not exist``). We probe it
in a subprocess once and, when broken, hide it (``sys.modules["torchvision"] = None``) so that
``transformers`` treats it as absent. timm needs a working torchvision: its cases skip with the
reason.
"""

from __future__ import annotations

import pytest

from benchmarks._harness import hide_broken_torchvision

TORCHVISION_BROKEN = hide_broken_torchvision()  # transformers then sees no torchvision


@pytest.fixture(scope="session")
def transformers():
    return pytest.importorskip("transformers")
