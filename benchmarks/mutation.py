"""Mutation testing of the core maths modules with mutmut 3 (not part of CI: it takes hours).

    python -m benchmarks.mutation                       # every core module, 150 mutants each
    python -m benchmarks.mutation --modules mac,kfac --sample 60 --seed 1
    python -m benchmarks.mutation --modules ema --sample 0      # 0: every semantic mutant

For each module the repository's ``maccore/`` and ``tests/`` are copied to ``--workdir/<module>``
(the working tree is never mutated: other people run tests in it), the ``[tool.mutmut]`` section
of ``pyproject.toml`` is specialised to that module and its test files (``TESTS`` below), mutmut
generates every mutant, the mutants that only change an error message are set aside (see
:func:`message_only`), a seeded random sample of the rest is run, and the score per module is
printed: tested / killed / survived (no test reaching the mutated function counts as survived) /
score. The surviving mutants' diffs are written to ``--workdir/<module>/survivors.txt``.

The tests run as in CI's fast profile, on NumPy and array_api_strict only
(``MACCORE_TEST_BACKENDS=numpy,array_api_strict``, ``HYPOTHESIS_PROFILE=ci``); torch, JAX and CuPy
are made unimportable in the runs (their tests skip), since mutmut forks one process per mutant
and JAX's threads do not survive a fork. Needs ``pip install mutmut`` (3.8; the mutant generation
step uses its Python API, checked below).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The core maths modules and the tests/core files that test each of them. mutmut runs, for every
# mutant, only those of a module's tests that reach the mutated function (it records which in a
# first traced run).
SHARED = ["tests/core/test_edge_cases.py", "tests/core/test_bad_input.py", "tests/core/test_devices.py",
          "tests/core/test_options.py"]
TESTS = {
    "mac": ["tests/core/test_mac.py"],
    "kfac": ["tests/core/test_kfac.py", "tests/core/test_exactness.py"],
    "ema": ["tests/core/test_ema.py"],
    "rows": ["tests/core/test_rows.py", "tests/core/test_exactness.py"],
    "singd": ["tests/core/test_singd.py"],
    "engine": ["tests/core/test_engine.py"],
}


def test_files(module: str, source: Path) -> list[str]:
    """The test files run against ``module``'s mutants: ``TESTS[module]``, the module's further
    ``tests/core/test_<module>_*.py`` files (e.g. ``test_kfac_update_control.py``) and ``SHARED``."""
    extra = sorted(str(f.relative_to(source)) for f in (source / "tests" / "core").glob(f"test_{module}_*.py"))
    files = TESTS[module] + [f for f in extra if f not in TESTS[module]] + SHARED
    return [f for f in files if (source / f).exists()]


BLOCKED = ("torch", "jax", "jaxlib", "cupy", "cupyx", "flax", "equinox", "optax")

# mutmut's statuses (its exit codes) grouped for the score
KILLED = {1: "killed", 3: "killed", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout",
          255: "timeout", -11: "segfault", -9: "segfault"}
SURVIVED = {0: "survived", 5: "no tests", 33: "no tests"}

_GENERATE = """
import os
try:
    from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants, setup_source_paths
except ImportError as exc:
    raise SystemExit(f"benchmarks.mutation needs mutmut 3.8 (its generation API moved?): {exc}")
os.makedirs("mutants", exist_ok=True)
copy_src_dir()
copy_also_copy_files()
setup_source_paths()
create_mutants(1)
"""

_RUN = """
import sys


class Blocked:  # `import torch` raises ImportError: pytest.importorskip skips
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ImportError(f"{name} is not importable in mutation runs")


sys.meta_path.insert(0, Blocked())
from mutmut.__main__ import cli
cli(["run", "--max-children", "{jobs}", *sys.argv[1:]])
"""


# ---------------------------------------------------------------------------------------------
# which mutants only change an error message


# Parameters that only label an error message (the validation helpers of maccore/_xp.py and the
# modules' private checks name the argument and the function being checked with them). An argument
# passed to such a parameter, positionally or by keyword, is message text.
_LABEL_PARAMS = {"name", "where", "what", "arg", "alias_name", "detail"}


def _call_name(node: ast.Call) -> str:
    f = node.func
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute):
        return f.attr
    return ""


def _label_argument(call: ast.Call, node) -> bool:
    """``node`` is passed to ``call`` as a label parameter."""
    if node in call.args:
        params = _SIGNATURES.get(_call_name(call))
        i = call.args.index(node)
        return params is not None and i < len(params[0]) and params[0][i] in _LABEL_PARAMS
    return False


def _differences(a, b, parents):
    """(a, b, parents) for every minimal place where two ASTs differ; ``a``/``b`` are lists when
    an element was removed from a list (a call's arguments)."""
    if type(a) is not type(b):
        yield a, b, parents
    elif isinstance(a, list):
        if len(a) != len(b):
            yield a, b, parents
            return
        for x, y in zip(a, b):
            yield from _differences(x, y, parents)
    elif isinstance(a, ast.AST):
        for field in a._fields:
            va, vb = getattr(a, field, None), getattr(b, field, None)
            if isinstance(va, (list, ast.AST)) or isinstance(vb, (list, ast.AST)):
                yield from _differences(va, vb, parents + [a])
            elif va != vb:
                yield a, b, parents
    elif a != b:
        yield a, b, parents


def _stringish(n) -> bool:
    """A message text: a string literal, an f-string, or the None that replaced one."""
    return isinstance(n, ast.JoinedStr) or (
        isinstance(n, ast.Constant) and (isinstance(n.value, str) or n.value is None))


# calls that format None without raising (inside an f-string of an error message)
_SAFE_ON_NONE = {"type", "repr", "str", "getattr"}
# expressions that cannot raise (what a message variable may be computed from)
_HARMLESS = (ast.Constant, ast.Name, ast.Load, ast.Compare, ast.BoolOp, ast.IfExp, ast.UnaryOp,
             ast.JoinedStr, ast.FormattedValue, ast.cmpop, ast.boolop, ast.unaryop)


def _in_message(chain) -> bool:
    """``chain`` (outermost first, the node last) lies in an error message: inside a ``raise`` or a
    ``warnings.warn`` call, or passed to a validation helper as a label (positionally, or as
    ``where=``/``name=``)."""
    for p in chain:
        if isinstance(p, ast.Raise) or (isinstance(p, ast.Call) and _call_name(p) == "warn"):
            return True
    i = len(chain) - 1  # a label formatted into an f-string is used where that string is
    while i > 0 and isinstance(chain[i - 1], (ast.FormattedValue, ast.JoinedStr)):
        i -= 1
    node, parent = chain[i], chain[i - 1] if i > 0 else None
    if isinstance(parent, ast.keyword):
        return parent.arg in _LABEL_PARAMS
    return isinstance(parent, ast.Call) and _label_argument(parent, node)


def _parents(root: ast.AST) -> dict:
    out = {}
    for n in ast.walk(root):
        for c in ast.iter_child_nodes(n):
            out[c] = n
    return out


def _chain(node, parents) -> list:
    out = [node]
    while out[-1] in parents:
        out.append(parents[out[-1]])
    return out[::-1]


def message_variables(func: ast.FunctionDef) -> set[str]:
    """Local names that are only read inside error messages (``where``, ``what``, the label of a
    loop over checks)."""
    parents = _parents(func)
    a = func.args
    assigned = {p.arg for p in a.posonlyargs + a.args + a.kwonlyargs}
    for n in ast.walk(func):
        if isinstance(n, ast.Assign):
            assigned |= {t.id for t in n.targets if isinstance(t, ast.Name)}
        elif isinstance(n, ast.For):
            targets = n.target.elts if isinstance(n.target, ast.Tuple) else [n.target]
            assigned |= {t.id for t in targets if isinstance(t, ast.Name)}
    loads: dict[str, list] = {}
    for n in ast.walk(func):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in assigned:
            loads.setdefault(n.id, []).append(_chain(n, parents))
    return {name for name, chains in loads.items() if all(_in_message(c) for c in chains)}


def _message_difference(a, b, parents, msgvars) -> bool:
    parent = parents[-1] if parents else None

    def label(n):  # message text: a string, a message variable, or text chosen without calls
        return _stringish(n) or (isinstance(n, ast.Name) and n.id in msgvars) or (
            isinstance(n, (ast.BoolOp, ast.IfExp, ast.JoinedStr))
            and all(isinstance(m, _HARMLESS + (ast.Attribute,)) for m in ast.walk(n)))

    if isinstance(a, list) and a and all(isinstance(k, ast.keyword) for k in a + b):
        kept = {ast.dump(k) for k in b}  # a `where=` / `name=` label dropped (all have defaults)
        dropped = [k for k in a if ast.dump(k) not in kept]
        return len(a) == len(b) + len(dropped) and all(k.arg in _LABEL_PARAMS for k in dropped)
    if isinstance(a, list):  # a positional argument dropped: only labels shift, into label
        if not (isinstance(parent, ast.Call) and len(a) == len(b) + 1):  # parameters with defaults
            return False
        sig = _SIGNATURES.get(_call_name(parent))
        i = next((k for k, (x, y) in enumerate(zip(a, b)) if ast.dump(x) != ast.dump(y)), len(b))
        return (sig is not None and len(a) <= len(sig[0]) and len(b) >= len(sig[0]) - sig[1]
                and all(label(x) and sig[0][j] in _LABEL_PARAMS for j, x in enumerate(a) if j >= i)
                and [ast.dump(x) for x in a[i + 1:]] == [ast.dump(y) for y in b[i:]])
    chain = parents + [a]
    if any(isinstance(p, ast.Raise) or (isinstance(p, ast.Call) and _call_name(p) == "warn")
           for p in chain):
        if _stringish(a) and _stringish(b):
            return True
        # a formatted value of the message replaced by None where formatting it cannot raise (a
        # different exception type, as list(None) would give, is a behaviour change)
        if any(isinstance(p, ast.JoinedStr) for p in parents) and isinstance(b, ast.Constant) \
                and b.value is None:
            return isinstance(parent, ast.FormattedValue) or (
                isinstance(parent, ast.Call) and _call_name(parent) in _SAFE_ON_NONE)
        return False
    # inside the value of `var = ...` with var a message variable, computed harmlessly
    for k, p in enumerate(parents):
        if isinstance(p, ast.Assign) and (parents[k + 1] if k + 1 < len(parents) else a) is p.value:
            if all(isinstance(t, ast.Name) and t.id in msgvars for t in p.targets) and isinstance(
                    b, ast.AST) and all(isinstance(n, _HARMLESS) for n in ast.walk(b)):
                return True
    # a string of `for label, ... in (("a", ...), ...)` bound to a message variable
    if len(parents) >= 3 and isinstance(parents[-1], ast.Tuple) and isinstance(parents[-2], ast.Tuple) \
            and isinstance(parents[-3], ast.For) and parents[-3].iter is parents[-2] \
            and isinstance(parents[-3].target, ast.Tuple) and _stringish(a) and _stringish(b):
        pos = parents[-1].elts.index(a)
        t = parents[-3].target.elts
        return pos < len(t) and isinstance(t[pos], ast.Name) and t[pos].id in msgvars
    if isinstance(a, (ast.boolop, ast.cmpop, ast.operator, ast.unaryop)) or (
            _stringish(a) and _stringish(b) and isinstance(parent, (ast.BoolOp, ast.IfExp))):
        # an operator or a text inside a label expression (`spec.name or "linear layer"`)
        return any(_in_message(parents[:k + 1]) for k in range(1, len(parents)))
    if not (label(a) and label(b)) or parent is None:
        return False
    if isinstance(parent, ast.arguments):  # the default value of a label parameter
        pos = parent.posonlyargs + parent.args
        owner = None
        for default, arg in zip(parent.defaults, pos[len(pos) - len(parent.defaults):]):
            owner = arg if default is a else owner
        for default, arg in zip(parent.kw_defaults, parent.kwonlyargs):
            owner = arg if default is a else owner
        return owner is not None and owner.arg in msgvars
    return _in_message(parents + [a])


def message_only(orig: ast.FunctionDef, mutant: ast.FunctionDef) -> bool:
    """Whether ``mutant`` differs from ``orig`` only in what an error message says: every
    difference is message text inside a ``raise`` statement or a ``warnings.warn`` call, a label
    passed to a label parameter (``name``, ``where``, ``what``, ... of the validation helpers,
    positionally or by keyword, or dropped where it has a default), or the value of a local
    variable or parameter read only in such places (``where``, ``what``, the label of a loop over
    checks, the default ``name`` of a factor)."""
    diffs = []
    for field in ("args", "body", "decorator_list", "returns"):
        diffs += list(_differences(getattr(orig, field), getattr(mutant, field), [orig]))
    msgvars = message_variables(orig)
    return bool(diffs) and all(_message_difference(a, b, p, msgvars) for a, b, p in diffs)


# name → (positional parameter names, number of defaults) of the functions of the core modules
_SIGNATURES: dict[str, tuple[list[str], int]] = {}


def _signatures(*trees: ast.AST) -> dict[str, tuple[list[str], int]]:
    out = {}
    for tree in trees:
        for n in ast.walk(tree):
            if isinstance(n, ast.FunctionDef) and not n.name.startswith(("x_", "xǁ")):
                out.setdefault(n.name, ([p.arg for p in n.args.posonlyargs + n.args.args],
                                        len(n.args.defaults)))
    return out


def _functions(tree: ast.AST) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def mutants_of(module_dir: Path, module: str) -> dict[str, dict]:
    """Every generated mutant of ``maccore/<module>.py``: name → {message_only, diff}."""
    src = module_dir / "mutants" / "maccore" / f"{module}.py"
    meta = json.loads((module_dir / "mutants" / "maccore" / f"{module}.py.meta").read_text())
    tree = ast.parse(src.read_text())
    funcs = _functions(tree)
    _SIGNATURES.clear()
    _SIGNATURES.update(_signatures(*(ast.parse(f.read_text()) for f in sorted(
        (module_dir / "maccore").glob("*.py")))))
    out = {}
    for key in meta["exit_code_by_key"]:
        fname = key.rpartition(".")[2]
        orig = funcs[fname.partition("__mutmut_")[0] + "__mutmut_orig"]
        mut = funcs[fname]
        a = ast.unparse(orig).replace(orig.name, "f", 1).splitlines()
        b = ast.unparse(mut).replace(mut.name, "f", 1).splitlines()
        diff = "\n".join(line for line in difflib.unified_diff(a, b, lineterm="", n=1)
                         if not line.startswith(("---", "+++")))
        out[key] = {"message_only": message_only(orig, mut), "diff": diff}
    return out


# ---------------------------------------------------------------------------------------------
# preparing a copy, running mutmut


def mutmut_section(module: str, source: Path) -> str:
    """The repository's ``[tool.mutmut]`` with ``only_mutate`` and the test selection of one
    module."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    cfg = dict(tomllib.loads((source / "pyproject.toml").read_text())["tool"]["mutmut"])
    cfg["only_mutate"] = [f"maccore/{module}.py"]
    cfg["pytest_add_cli_args_test_selection"] = test_files(module, source)
    lines = ["[tool.mutmut]"]
    for k, v in cfg.items():
        lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def prepare(module: str, workdir: Path, source: Path) -> Path:
    d = workdir / module
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    shutil.copytree(source / "maccore", d / "maccore", ignore=ignore)
    (d / "tests").mkdir()
    for f in (source / "tests").glob("*.py"):  # conftest.py and the helpers it imports
        if not f.name.startswith("test_"):
            shutil.copy2(f, d / "tests" / f.name)
    shutil.copytree(source / "tests" / "core", d / "tests" / "core", ignore=ignore)
    text = (source / "pyproject.toml").read_text()
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)
    (d / "pyproject.toml").write_text(text.rstrip() + "\n\n" + mutmut_section(module, source))
    return d


def _env() -> dict:
    env = dict(os.environ)
    env.update(MACCORE_TEST_BACKENDS="numpy,array_api_strict", HYPOTHESIS_PROFILE="ci",
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    return env


def status_counts(module_dir: Path, module: str, names: list[str]) -> dict[str, list[str]]:
    meta = json.loads((module_dir / "mutants" / "maccore" / f"{module}.py.meta").read_text())
    codes = meta["exit_code_by_key"]
    out: dict[str, list[str]] = {"killed": [], "survived": [], "other": []}
    for n in names:
        c = codes.get(n)
        out["killed" if c in KILLED else "survived" if c in SURVIVED else "other"].append(n)
    return out


def run_module(module: str, args) -> dict:
    t0 = time.time()
    if args.rescore:  # the mutants already run in --workdir, classified again
        d = args.workdir / module
        muts = mutants_of(d, module)
        semantic = sorted(k for k, v in muts.items() if not v["message_only"])
        codes = json.loads((d / "mutants" / "maccore" / f"{module}.py.meta").read_text())["exit_code_by_key"]
        picked = [k for k in semantic if codes.get(k) is not None]
    else:
        d = prepare(module, args.workdir, args.source)
        env = _env()
        with open(d / "mutmut.log", "w") as log:
            subprocess.run([sys.executable, "-c", _GENERATE], cwd=d, env=env, stdout=log, stderr=log,
                           check=True)
            muts = mutants_of(d, module)
            semantic = sorted(k for k, v in muts.items() if not v["message_only"])
            rng = random.Random(f"{args.seed}:{module}")
            picked = semantic if args.sample <= 0 or args.sample >= len(semantic) else sorted(
                rng.sample(semantic, args.sample))
            print(f"{module}: {len(muts)} mutants, {len(muts) - len(semantic)} only change an error "
                  f"message, running {len(picked)} (log: {d / 'mutmut.log'})", flush=True)
            code = _RUN.replace("{blocked!r}", repr(BLOCKED)).replace("{jobs}", str(args.jobs))
            subprocess.run([sys.executable, "-c", code, *picked], cwd=d, env=env, stdout=log, stderr=log)
    res = status_counts(d, module, picked)
    with open(d / "survivors.txt", "w") as f:
        for n in res["survived"] + res["other"]:
            f.write(f"# {n}\n{muts[n]['diff']}\n\n")
    tested = len(res["killed"]) + len(res["survived"])
    return {"module": module, "mutants": len(muts), "message_only": len(muts) - len(semantic),
            "tested": tested, "killed": len(res["killed"]), "survived": res["survived"],
            "other": res["other"], "score": len(res["killed"]) / tested if tested else float("nan"),
            "seconds": time.time() - t0, "dir": d, "diffs": {n: muts[n]["diff"] for n in res["survived"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mutation", description=__doc__.split("\n")[0])
    p.add_argument("--modules", default=",".join(TESTS),
                   help=f"comma-separated subset of {','.join(TESTS)} (default: all)")
    p.add_argument("--sample", type=int, default=150,
                   help="semantic mutants drawn per module (0: all of them); default 150")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (default 1)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/maccore-mutation"),
                   help="where the copies live (default /tmp/maccore-mutation; replaced per module)")
    p.add_argument("--source", type=Path, default=ROOT,
                   help="the checkout whose maccore/ and tests/ are copied (default: this one)")
    p.add_argument("--rescore", action="store_true",
                   help="run nothing: score the mutants already run in --workdir again")
    p.add_argument("--show-survivors", action="store_true", help="print the survivors' diffs")
    args = p.parse_args(argv)
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = [m for m in modules if m not in TESTS]
    if unknown:
        p.error(f"unknown modules {unknown}; know {list(TESTS)}")
    if shutil.which("mutmut") is None and not args.rescore:
        p.error("mutmut is not installed: pip install mutmut")
    args.workdir = args.workdir.resolve()
    args.source = args.source.resolve()
    if args.source == args.workdir or args.source in args.workdir.parents:
        p.error("--workdir must lie outside the repository")
    rows = []
    for m in modules:
        r = run_module(m, args)
        rows.append(r)
        if args.show_survivors:
            for n, diff in r["diffs"].items():
                print(f"  survived {n}\n" + "\n".join("    " + ln for ln in diff.splitlines()))
    print()
    print(f"{'module':<20} {'mutants':>8} {'msg-only':>8} {'tested':>7} {'killed':>7} {'survived':>9} "
          f"{'score':>7} {'minutes':>8}")
    for r in rows:
        print(f"maccore/{r['module'] + '.py':<12} {r['mutants']:>8} {r['message_only']:>8} {r['tested']:>7} "
              f"{r['killed']:>7} {len(r['survived']):>9} {100 * r['score']:>6.1f}% {r['seconds'] / 60:>8.1f}")
        if r["other"]:
            print(f"  not run / unknown status: {len(r['other'])} (see {r['dir'] / 'mutmut.log'})")
    print(f"\nsurvivors' diffs: {args.workdir}/<module>/survivors.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
