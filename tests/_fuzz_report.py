"""The fuzz suite's outcome table (tests/test_reliability_fuzz.py), also under ``pytest -n 2``.

Each process counts its generated calls per target and outcome class in the fuzz module; an
xdist worker hands its counts to the controller (``workeroutput``), which sums them. At the end of
a session that ran every fuzz target, the table is printed and the session fails when fewer than
``MIN_CALLS`` calls were made (a partial run, e.g. ``-k``, is only reported). Hooks re-exported by
``tests/conftest.py``.
"""

from __future__ import annotations

import collections
import json
import sys

_MODULE = "tests.test_reliability_fuzz"
_KEY = "maccore_fuzz"


def _local() -> tuple[collections.Counter, set] | None:
    mod = sys.modules.get(_MODULE)
    if mod is None:
        return None
    return collections.Counter(mod.OUTCOMES), set(mod.TARGETS)


def pytest_testnodedown(node, error):  # xdist controller: a worker finished
    data = getattr(node, "workeroutput", {}).get(_KEY)
    if data is None:
        return
    agg = node.config.__dict__.setdefault("_maccore_fuzz", [collections.Counter(), set()])
    counts, targets = json.loads(data)
    for t, c, n in counts:
        agg[0][(t, c)] += n
    agg[1].update(targets)


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    local = _local()
    if hasattr(config, "workeroutput"):  # an xdist worker: hand the counts over
        if local is not None:
            config.workeroutput[_KEY] = json.dumps(
                [[[t, c, n] for (t, c), n in local[0].items()], sorted(local[1])])
        return
    counts, targets = config.__dict__.get("_maccore_fuzz") or local or (None, None)
    if not targets:
        return
    ran = {t for t, _ in counts}
    mod = sys.modules.get(_MODULE)
    need = getattr(mod, "MIN_CALLS", 2000) * getattr(mod, "_SCALE", 1) if mod else 2000
    total = sum(counts.values())
    complete = not (targets - ran)
    config._maccore_fuzz_report = (counts, ran, total, complete, need)
    if complete and total < need and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    report = getattr(config, "_maccore_fuzz_report", None)
    if report is None:
        return
    counts, ran, total, complete, need = report
    by_class = collections.Counter()
    for (_, c), n in counts.items():
        by_class[c] += n
    tr = terminalreporter
    tr.section("fuzz outcomes (tests/test_reliability_fuzz.py)")
    tr.write_line(f"{total} generated calls over {len(ran)} targets: {by_class['accepted']} "
                  f"accepted-correct, {by_class['clear_error']} clear errors, {by_class['skipped']} "
                  "exactly skipped steps; 0 unclear errors, 0 state changes on rejection (each "
                  "would fail its test)")
    if not complete:
        tr.write_line("(a partial run: not every fuzz target ran, the total is not checked)")
    elif total < need:
        tr.write_line(f"FAILED: fewer than {need} generated calls")
