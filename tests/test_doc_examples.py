"""Every ``python`` code block of README.md and docs/**/*.md runs.

Blocks written as doctests (``>>>``) are collected by pytest's ``--doctest-glob='*.md'`` (see
pyproject.toml); the plain blocks are executed here, each in a fresh namespace. A block that needs
a framework which is not installed is skipped with the reason.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import maccore

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _blocks():
    for path in FILES:
        if not path.exists():
            continue
        for i, m in enumerate(FENCE.finditer(path.read_text())):
            code = m.group(1)
            if ">>>" in code:
                continue  # a doctest: pytest --doctest-glob runs it
            yield pytest.param(code, id=f"{path.relative_to(ROOT)}#{i}")


def _needs(code: str) -> list[str]:
    mods = set(re.findall(r"^\s*(?:import|from)\s+([A-Za-z_][\w]*)", code, re.M))
    return sorted(mods & {"torch", "jax", "optax", "flax", "equinox", "maccore_torch", "maccore_jax"})


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_code_block_runs(code, monkeypatch):
    adapters = str(ROOT / "adapters")
    if adapters not in sys.path:
        monkeypatch.syspath_prepend(adapters)
    for mod in _needs(code):
        pytest.importorskip(mod)
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_example__"})


def test_readme_has_an_example_per_framework():
    text = (ROOT / "README.md").read_text()
    blocks = [m.group(1) for m in FENCE.finditer(text)]
    assert any("maccore_torch" in b for b in blocks)
    assert any("maccore_jax" in b for b in blocks)
    assert any("numpy" in b and "maccore_" not in b for b in blocks)
    for b in blocks:
        assert len(b.strip().splitlines()) <= 10, b


MODULES = sorted(m.name for m in pkgutil.walk_packages(maccore.__path__, "maccore."))


@pytest.mark.parametrize("name", MODULES)
def test_module_docstring_examples(name):
    """``>>>`` examples in the core's docstrings (the core only: adapters' modules import frameworks)."""
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = doctest.DocTestRunner(optionflags=flags)
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} doctest failure(s) in {name} (see captured stdout)"
