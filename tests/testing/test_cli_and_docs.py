"""``python -m maccore verify`` shows sizes and oracles and links docs/math.md; ``--against`` runs or
skips with a reason; every proposition label the code, tests and CLI cite is stated in docs/math.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from maccore.cli import main
from maccore.testing import against, conformance

ROOT = Path(__file__).resolve().parents[2]
LABEL = re.compile(r"\b(P-K\d+[a-c]?|M-P\d+|S-T\d+)\b")


def test_verify_prints_sizes_oracles_and_math_link(capsys):
    assert main(["verify", "--backends", "numpy", "--dtypes", "float64", "--checks", "kfac.apply.pi"]) == 0
    out = capsys.readouterr().out
    assert "docs/math.md" in out
    assert "sizes:  A 5×5" in out and "oracle: π from its definition" in out and "[P-K11b]" in out
    assert main(["verify", "--list"]) == 0
    out = capsys.readouterr().out
    for info in conformance.check_details():
        assert info.name in out and info.sizes and info.oracle
    assert "docs/math.md" in out


def test_against_unknown_and_skips(capsys):
    with pytest.raises(SystemExit) as exc:  # an unknown library is a usage error (argparse)
        main(["verify", "--against", "nope"])
    assert exc.value.code == 2
    assert main(["verify", "--against", "kfac-jax"]) == 0  # not installed here, or not automated: a skip
    out = capsys.readouterr().out
    assert "SKIP" in out and ("not installed" in out or "no automated comparison" in out)


def test_against_missing_library_is_a_skip_with_reason(monkeypatch):
    monkeypatch.setitem(against._MODULES, "curvlinops", "curvlinops_not_a_module")
    res = against.run_against("curvlinops")
    assert [r.status for r in res] == ["skip"]
    assert "not installed" in res[0].detail and "pip install curvlinops-for-pytorch" in res[0].detail


@pytest.mark.parametrize("library", ["curvlinops", "backpack"])
def test_against_installed_library(library, capsys):
    pytest.importorskip(library)
    pytest.importorskip("torch")
    assert main(["verify", "--against", library]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out


def _cited_labels() -> set[str]:
    found = set()
    files = [*sorted((ROOT / "maccore").rglob("*.py")), *sorted((ROOT / "adapters").rglob("*.py")),
             *sorted((ROOT / "tests").rglob("*.py")), *sorted((ROOT / "docs").rglob("*.md"))]
    for path in files:
        if path.name == "math.md":
            continue
        found |= set(LABEL.findall(path.read_text(encoding="utf-8")))
    for info in conformance.check_details():
        found |= set(LABEL.findall(info.propositions))
    return found


def test_every_cited_proposition_is_stated_in_math_md():
    text = (ROOT / "docs" / "math.md").read_text(encoding="utf-8")
    stated = set(re.findall(r"\*\*(P-K\d+[a-c]?|M-P\d+|S-T\d+)\b", text))
    for sub in re.findall(r"\*\*(P-K\d+)\*\*[^\n]*\(a\)", text):
        stated |= {f"{sub}a", f"{sub}b", f"{sub}c"}
    missing = sorted(_cited_labels() - stated)
    assert not missing, f"cited but not stated in docs/math.md: {missing}"
    for label in sorted(stated):
        if f"**{label}" in text:  # (P-K11a … c are stated inside P-K11's paragraph)
            assert "Tested in" in text.split(f"**{label}")[1].split("\n\n")[0], label


def test_new_code_cites_no_private_document():
    for path in [*(ROOT / "maccore" / "testing").glob("*.py"), ROOT / "maccore" / "cli" / "verify.py",
                 ROOT / "adapters" / "maccore_torch" / "testing.py", ROOT / "adapters" / "maccore_jax" / "testing.py",
                 *(ROOT / "tests" / "testing").glob("*.py"), ROOT / "docs" / "math.md", ROOT / "docs" / "verify.md"]:
        text = path.read_text(encoding="utf-8")
        assert "MATH" + ".md" not in text and "ANCHORS" + ".md" not in text, path


@pytest.mark.parametrize("module", ["maccore_torch.testing", "maccore_jax.testing"])
def test_adapter_testing_docstring_examples(module):
    """The ``>>>`` examples of the adapters' testing modules (test_doc_examples covers the core)."""
    import doctest
    import importlib

    pytest.importorskip(module.split(".")[0].replace("maccore_", ""))
    mod = importlib.import_module(module)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(mod, module):
        runner.run(test)
    assert runner.failures == 0
