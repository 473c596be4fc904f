"""maccore imports and works with torch, jax and cupy blocked, and its maths modules name no
framework anywhere: neither ``import torch`` nor ``importlib.import_module("torch")``.

Only the delegation layer (``maccore/_delegate.py``, which reaches a framework when the caller's
arrays come from it), ``maccore/testing/`` (conformance checks on every backend) and
``maccore/cli/`` (the demo) may import a framework, and only lazily, inside functions.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
    from maccore import testing

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
    case = testing.MLPCase([rng.standard_normal((2, 3))], [None], rng.standard_normal((2, 1, 3)),
                           rng.standard_normal((2, 1, 2)))
    testing.ggn_block(case, 0)

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
    assert {"maccore.rows", "maccore.mac", "maccore.kfac", "maccore.ema", "maccore.checkpoint", "maccore.verify",
            "maccore.testing", "maccore.testing.conformance", "maccore.cli", "maccore.cli.demo",
            "maccore.cli.verify"} <= set(out["modules"])
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


# ---- static scan: no framework import in the maths modules, dynamic imports included --------------
FRAMEWORKS = ("torch", "jax", "jaxlib", "cupy", "cupyx", "flax", "equinox", "optax")
#: may import a framework (lazily): everything else under maccore/ is scanned
ALLOWED = ("maccore/_delegate.py", "maccore/testing/", "maccore/cli/")


def framework_imports(source: str, filename: str = "<snippet>") -> list[str]:
    """Every place in ``source`` that imports a framework: ``import torch``, ``from jax import ...``,
    ``importlib.import_module("torch")`` (also through an alias or ``name=``) and
    ``__import__("jax")``. A dynamic import whose name is not a string literal is reported too:
    it cannot be checked."""
    tree = ast.parse(source, filename)
    loaders = {"__import__"}  # local names bound to importlib.import_module / __import__
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "importlib":
            loaders |= {a.asname or a.name for a in node.names if a.name in ("import_module", "__import__")}

    def framework(name) -> bool:
        return isinstance(name, str) and name.split(".")[0] in FRAMEWORKS

    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if framework(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and framework(node.module):
                found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
            if not (name in loaders or name in ("import_module", "__import__")):
                continue
            arg = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                if framework(arg.value):
                    found.append(f"{where}: {name}({arg.value!r})")
            else:
                found.append(f"{where}: {name}(<computed name>) cannot be checked")
    return found


def _scanned_modules() -> list[Path]:
    out = []
    for path in sorted((ROOT / "maccore").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if not any(rel == a or rel.startswith(a) for a in ALLOWED):
            out.append(path)
    return out


def test_scanner_catches_every_form_of_framework_import():
    """Negative control: the scanner sees static, dynamic and aliased imports in a snippet."""
    snippet = textwrap.dedent(
        """
        import importlib
        import numpy as np
        from importlib import import_module as load
        from . import rows

        def f():
            importlib.import_module("torch")

        def g(name):
            import jax.numpy as jnp
            from flax import linen
            mod = __import__("optax")
            return load("cupy.linalg"), importlib.import_module(name=name), importlib.import_module(name)
        """
    )
    found = framework_imports(snippet)
    assert any("import_module('torch')" in f for f in found), found
    assert any("import jax.numpy" in f for f in found)
    assert any("from flax import" in f for f in found)
    assert any("__import__('optax')" in f for f in found)
    assert any("load('cupy.linalg')" in f for f in found)
    assert sum("<computed name>" in f for f in found) == 2
    assert len(found) == 7, found
    # and nothing on framework-free code (numpy, relative imports, a maccore submodule by name)
    clean = "import numpy\nimport importlib\nfrom . import rows\nimportlib.import_module('maccore.rows')\n"
    assert framework_imports(clean) == []


def test_maths_modules_name_no_framework():
    """No module of maccore/ outside testing/, cli/ and _delegate.py imports a framework, not even
    through importlib or __import__."""
    modules = _scanned_modules()
    rel = {p.relative_to(ROOT).as_posix() for p in modules}
    assert {"maccore/__init__.py", "maccore/__main__.py", "maccore/checkpoint.py", "maccore/verify.py",
            "maccore/mac.py", "maccore/kfac.py", "maccore/rows.py"} <= rel
    assert not any(r.startswith(("maccore/testing/", "maccore/cli/")) for r in rel)
    found = []
    for path in modules:
        found += framework_imports(path.read_text(), path.relative_to(ROOT).as_posix())
    assert not found, "framework imports in the maths modules:\n" + "\n".join(found)


def test_ruff_lint_allows_framework_imports_only_where_the_scan_does():
    """pyproject.toml's import lint (TID251) is lifted inside maccore/ exactly for ALLOWED."""
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    lifted = {pat for pat, rules in cfg["per-file-ignores"].items() if "TID251" in rules}
    inside = {pat for pat in lifted if pat.startswith("maccore")}
    assert inside == {"maccore/_delegate.py", "maccore/testing/**", "maccore/cli/**"}
    banned = cfg["flake8-tidy-imports"]["banned-api"]
    assert set(FRAMEWORKS) <= set(banned)
    assert "importlib.import_module" in banned  # (ruff cannot ban the builtin __import__: the scan does)
