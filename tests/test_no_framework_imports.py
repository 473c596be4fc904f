"""maccore imports and works with torch, jax and cupy blocked (STYLE.md P3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "jax", "jaxlib", "cupy", "cupyx", "flax", "equinox", "optax")

SCRIPT = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    BLOCKED = {blocked!r}
    attempts = []

    class Block:
        def find_spec(self, name, path=None, target=None):
            root = name.split(".")[0]
            if root in BLOCKED:
                attempts.append(name)
                raise ImportError(f"blocked by test: {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    for mod in list(sys.modules):
        assert mod.split(".")[0] not in BLOCKED, mod

    import numpy as np
    import maccore
    from maccore import verify

    # import every core submodule (the CLI entry point may import backends on demand)
    names = []
    for info in pkgutil.walk_packages(maccore.__path__, "maccore."):
        if info.name.split(".")[-1] == "__main__":
            continue
        importlib.import_module(info.name)
        names.append(info.name)

    # exercise the numpy paths end to end (including the numpy fast path in _delegate)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 6))
    rows = maccore.conv2d_rows(x, 3, padding=1, bias=True)
    g = rng.standard_normal((4, rows.shape[1]))
    u = maccore.mac_apply(g, maccore.mean_activation(rows), 1.0)
    pc = maccore.kfac(mode="exact")
    s = pc.refresh(pc.update(pc.init(rows.shape[1], 4, xp=np), rows, rng.standard_normal((rows.shape[0], 4)),
                             reduction_factor=1.0))
    v = pc.apply(s, g)
    pm = maccore.mac(diagonal=True)
    sm = pm.refresh(pm.update(pm.init(rows.shape[1], 4, xp=np), rows, rng.standard_normal((rows.shape[0], 4))))
    w = pm.apply(sm, g)
    case = verify.MLPCase([rng.standard_normal((2, 3))], [None], rng.standard_normal((2, 1, 3)),
                          rng.standard_normal((2, 1, 2)))
    verify.ggn_block(case, 0)

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({{"loaded": loaded, "attempts": attempts, "modules": names,
                       "shapes": [list(u.shape), list(v.shape), list(w.shape)]}}))
    """
).format(blocked=BLOCKED)


def test_import_without_frameworks():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSTARTUP",)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert proc.returncode == 0, f"import failed with the frameworks blocked:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [], f"framework modules were imported: {out['loaded']}"
    assert {"maccore.rows", "maccore.mac", "maccore.kfac", "maccore.ema", "maccore.verify"} <= set(out["modules"])
    assert out["shapes"] == [[4, 28], [4, 28], [4, 28]]


def test_blocker_is_effective():
    """Negative control: the same blocker makes an explicit torch import fail."""
    code = SCRIPT.split("import numpy as np")[0] + textwrap.dedent(
        """
        try:
            import torch  # noqa: F401
        except ImportError as e:
            print("blocked:", e)
        else:
            raise SystemExit("torch import was not blocked")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "blocked: blocked by test: torch" in proc.stdout
