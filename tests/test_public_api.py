"""The public surface: every name in ``__all__`` exists and is documented (the public API contract)."""

from __future__ import annotations

import enum
import importlib
from pathlib import Path

import pytest

import maccore

# the names the public API promises at the top level
PROMISED = {
    "linear_rows", "conv2d_rows", "conv2d_mean_patch", "grad_rows", "conv2d_grad_rows", "grad_matrix",
    "split_grad_matrix", "mean_activation", "attention_probs", "attention_weighted_mean", "mac_apply",
    "input_factor", "gradient_factor", "kfac_apply", "kfac_dense", "mac", "kfac", "Preconditioner",
}

CORE_MODULES = ["maccore", "maccore.ema", "maccore.rows", "maccore.mac", "maccore.kfac", "maccore.testing",
                "maccore.testing.conformance", "maccore.verify", "maccore.checkpoint", "maccore.cli"]


def _own_doc(obj) -> str:
    """The object's own docstring (not a default inherited or generated one)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
        generated = f"{obj.__name__}({', '.join(obj._fields)})"
        if doc == generated:
            return ""
    if isinstance(obj, type) and issubclass(obj, enum.Enum) and doc in (None, "An enumeration."):
        return ""
    return (doc or "").strip()


def test_all_is_sorted_unique_and_complete():
    names = maccore.__all__
    assert len(names) == len(set(names)), "duplicates in maccore.__all__"
    assert list(names) == sorted(names), "maccore.__all__ is not sorted"
    missing = PROMISED - set(names)
    assert not missing, f"public names missing from maccore.__all__: {sorted(missing)}"
    assert isinstance(maccore.__version__, str) and maccore.__version__
    assert maccore.__doc__ and maccore.__doc__.strip()


@pytest.mark.parametrize("modname", CORE_MODULES)
def test_names_exist_and_are_documented(modname):
    mod = importlib.import_module(modname)
    assert mod.__doc__ and mod.__doc__.strip(), f"{modname} has no module docstring"
    assert hasattr(mod, "__all__"), f"{modname} has no __all__"
    undocumented = []
    for name in mod.__all__:
        assert hasattr(mod, name), f"{modname}.__all__ lists {name!r}, which does not exist"
        obj = getattr(mod, name)
        if isinstance(obj, (str, tuple, int, float)):  # constants (e.g. LOSSES, MAC_SCALES)
            continue
        if not _own_doc(obj):
            undocumented.append(name)
    assert not undocumented, f"{modname}: undocumented public names {undocumented}"


def test_submodule_names_reexported():
    """Everything the core modules export is reachable from the package or its submodule."""
    for modname in ("maccore.rows", "maccore.mac", "maccore.kfac", "maccore.ema"):
        mod = importlib.import_module(modname)
        for name in mod.__all__:
            if name in maccore.__all__:
                assert getattr(maccore, name) is getattr(mod, name), f"maccore.{name} is not {modname}.{name}"


def test_verify_is_the_former_name_of_testing():
    """``maccore.verify`` (the public API contract) keeps working: the same objects as :mod:`maccore.testing`."""
    testing = importlib.import_module("maccore.testing")
    verify = importlib.import_module("maccore.verify")
    assert list(verify.__all__) == list(testing.__all__)
    for name in testing.__all__:
        assert getattr(verify, name) is getattr(testing, name), name
    assert testing.conformance is importlib.import_module("maccore.testing.conformance")


def test_command_line_entry_points():
    """``python -m maccore`` and the ``maccore`` script both run :func:`maccore.cli.main`."""
    main_mod = importlib.import_module("maccore.__main__")
    cli = importlib.import_module("maccore.cli")
    assert main_mod.main is cli.main
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"maccore": "maccore.cli:main"}
