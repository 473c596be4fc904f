"""maccore_torch is a thin adapter: it reaches the core through public names only (no
``maccore._delegate``, ``maccore._xp`` or any other private module). ``maccore.testing`` (the
reference tooling shared by both adapters' ``testing`` modules) is not part of the core."""

from __future__ import annotations

import ast
from pathlib import Path

ADAPTER = Path(__file__).resolve().parents[2] / "adapters" / "maccore_torch"


def _private(module: str) -> bool:
    parts = module.split(".")
    if parts[0] != "maccore" or parts[1:2] == ["testing"]:
        return False
    return any(p.startswith("_") for p in parts[1:])


def test_torch_adapter_imports_only_public_core_names():
    bad = []
    for path in sorted(ADAPTER.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "maccore" or node.module.startswith("maccore."):
                    bad += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                            if _private(f"{node.module}.{a.name}") or _private(node.module)]
            elif isinstance(node, ast.Import):
                bad += [f"{path.name}: import {a.name}" for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "maccore" and node.attr.startswith("_"):
                    bad.append(f"{path.name}:{node.lineno}: maccore.{node.attr}")
    assert not bad, f"maccore_torch uses private core modules: {bad}"
