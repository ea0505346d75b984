"""Crash consistency of the real `quota-sidecar serve` process: SIGKILL at random moments under concurrent
load, restart on the same ledger, and the checks of tests/crash_load.py after every restart.

`QUOTA_CRASH_KILLS` sets the number of kill points (default 5) and `QUOTA_CRASH_SEED` the seed (default
random; the seed is printed so a failure can be replayed, also with `tests/crash_load.py --seed N`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from crash_load import CEILING_TENANTS, WORKERS, Summary, run, seed_from

from support.process import Process

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def crashes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Summary]:
    """One harness run of QUOTA_CRASH_KILLS kill points, shared by the tests below."""
    kills = int(os.environ.get("QUOTA_CRASH_KILLS", "5"))
    seed = seed_from(os.environ.get("QUOTA_CRASH_SEED"))
    started: list[Process] = []
    try:
        summary = run(tmp_path_factory.mktemp("crash") / "ledger.db", kills, seed, processes=started)
        print(summary.report())
        assert len(summary.kills) == kills, summary.report()
        yield summary
    finally:
        for p in started:
            if p.proc.poll() is None:
                p.proc.kill()
            p.proc.wait()


def test_every_kill_lands_on_running_load(crashes: Summary) -> None:
    """Each SIGKILL came while every worker was still calling, after calls were acknowledged since the
    previous restart; calls cut off by the kills were all retried after the restart, and nothing failed
    before a kill or in the sidecar's log."""
    report = crashes.report()
    print(crashes.line())
    assert all(k.workers_running == WORKERS and k.acknowledged > 0 for k in crashes.kills), report
    assert crashes.unknown > 0, report
    assert crashes.retries_resolved > 0, report
    assert not crashes.problems.get("unexpected") and not crashes.problems.get("sidecar log"), report


def test_no_acknowledged_decision_is_lost_or_counted_twice(crashes: Summary) -> None:
    """Domain 'Nothing that was decided and acknowledged is lost', SG-6, SG-8, CR-1, CR-2, AC-2..AC-5, AC-10:
    after every kill each acknowledged ALLOW is active, each contact an acknowledged CheckContactAdd added is
    held until an acknowledged deletion, each acknowledged counted activity is active; once the cut-off calls
    are answered the ledger holds exactly what the answers say, every activation reported newly_active once,
    and every stored figure equals its rows."""
    report = crashes.report()
    print(crashes.line())
    assert crashes.allows > 0 and crashes.allow_checks > 0, report
    assert crashes.losses == 0, report
    for kind in ("phantom", "figures", "double count", "answer"):
        assert not crashes.problems.get(kind), report


def test_request_id_retries_after_restart_return_the_first_answer(crashes: Summary) -> None:
    """api.md request_id (durable like the decision it repeats), SG-8: acknowledged calls sent again with their
    request_id after a restart get their original answer, decisions, reasons, newly_active and usage alike,
    and count nothing twice."""
    report = crashes.report()
    print(crashes.line())
    assert crashes.retries_compared > 0, report
    assert not crashes.problems.get("retry mismatch") and not crashes.problems.get("retry"), report


def test_no_ceiling_is_passed_across_crashes(crashes: Summary) -> None:
    """SG-2 hard limit, AC-7 grace ceiling (limit + floor(limit x 10 / 100)), SG-3 sends limit, SG-4 raised
    limits, AC-4/AC-5 IMPORT and MANUAL never past the limit, AC-6 held sends blocked past the ceiling: no
    answer shows a figure past its ceiling and the distinct contacts allowed never outnumber the plan's; the
    load did reach every limit, so the checks bite."""
    report = crashes.report()
    print(crashes.line())
    assert crashes.over_admissions == 0, report
    for tenant in CEILING_TENANTS:
        assert crashes.limited[tenant], report
    assert crashes.limited["hard"]["REASON_CONTACT_LIMIT_REACHED"], report
    assert crashes.limited["grace"]["REASON_OVER_GRACE"], report
    assert crashes.limited["sends"]["REASON_SENDS_LIMIT_REACHED"], report
    assert crashes.limited["held"], report
