"""Former name of :mod:`maccore.testing` (exact float64 oracles and assertion helpers), kept working.

Every name here is the one of :mod:`maccore.testing`; new code imports ``maccore.testing``.
"""

from maccore import testing as _testing
from maccore.testing import *  # noqa: F403

__all__ = list(_testing.__all__)
