"""Calls while the dedupe filters build after a restart (issue 13, item 9).

At start the ledger asks for every tenant's filter and builds them in the background,
from its rows, on a connection of its own; built filters are handed to the writer,
which installs them between commits, INSTALLS_PER_UNIT at a time. Until its tenant's
filter is installed a CheckSend confirms a new contact with one indexed lookup in the
ledger; it never waits for the build, and it waits for at most one hand-off of built
filters, never for all of them.

The ledger is the real SQLite ledger over a real file. Its connections report the
statements they run (sqlite3's trace callback), which lets a test count the work a call
does and hold the filter builder, or the writer, at a chosen statement. Nothing here
is timed.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from quota_sidecar.server.domain.clock import FakeClock
from quota_sidecar.server.domain.model import Decision
from quota_sidecar.server.engine import Engine
from quota_sidecar.server.ledger.sqlite import SQLiteLedger
from quota_sidecar.server.ledger.sqlite.dedupe import INSTALLS_PER_UNIT

from support.engine import NOW, batch, plan, send
from support.waiting import wait_until

TENANTS = 2 * INSTALLS_PER_UNIT + 72
ROWS_READ = "SELECT contact_id FROM cycle_activations WHERE cycle_key"
HOLD_AT_READ = 10
LIMIT = 1_000
# Not a timing assertion: how long a test waits before calling a call never answered.
SAFETY_S = 30.0


def tenant(i: int) -> str:
    return f"tenant-{i:04d}"


class TracedLedger(SQLiteLedger):
    """The real SQLite ledger whose connections report each statement they start. The
    writer's statements are kept in `writer_statements`, with the number of installed
    filters at each `BEGIN IMMEDIATE` in `filters_at_begin`. The filter builder stops
    before its HOLD_AT_READ-th read of a cycle's rows until `release_build` is set, and
    sets `build_read` once the read transaction of its builds has ended. While
    `gate_writer` is set, the next transaction stops at its BEGIN until `open_writer`."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(path, **options)
        self.writer_statements: list[str] = []
        self.filters_at_begin: list[int] = []
        self.build_held = threading.Event()
        self.release_build = threading.Event()
        self.build_read = threading.Event()
        self.gate_writer = threading.Event()
        self.writer_gated = threading.Event()
        self.open_writer = threading.Event()
        self._reads = 0
        self._untraced_connect = self._file.connect
        self._file.connect = self._traced_connect
        self._builder._connect = self._traced_connect

    def _traced_connect(self) -> sqlite3.Connection:
        conn = self._untraced_connect()
        if threading.current_thread().name == "filter-builder":
            conn.set_trace_callback(self._builder_runs)
        elif getattr(self, "_conn", None) is None:
            conn.set_trace_callback(self._writer_runs)
        return conn

    def _builder_runs(self, statement: str) -> None:
        if statement.startswith(ROWS_READ):
            self._reads += 1
            if self._reads == HOLD_AT_READ:
                self.build_held.set()
                self.release_build.wait()
        elif statement == "COMMIT" and self._reads:
            self.build_read.set()

    def _writer_runs(self, statement: str) -> None:
        self.writer_statements.append(statement)
        if statement == "BEGIN IMMEDIATE":
            self.filters_at_begin.append(len(self.filters))
            if self.gate_writer.is_set():
                self.gate_writer.clear()
                self.writer_gated.set()
                self.open_writer.wait()


def statements_of(ledger: TracedLedger, call: Callable[[], object]) -> Counter[str]:
    """The statements the writer ran for `call`, their literals replaced by `?`. The call
    runs on a thread of its own, so one that is never answered fails the test (after a
    safety deadline) rather than hanging it."""
    mark = len(ledger.writer_statements)
    worker = ThreadPoolExecutor(1)
    try:
        worker.submit(call).result(timeout=SAFETY_S)
    finally:
        worker.shutdown(wait=False)
    return Counter(re.sub(r"'[^']*'|\b\d+\b", "?", s) for s in ledger.writer_statements[mark:])


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """A ledger of TENANTS tenants, each with two active contacts, closed as at a stop."""
    path = tmp_path / "ledger.db"
    ledger = SQLiteLedger(path, synchronous="NORMAL")
    ledger.open()
    try:
        engine = Engine(ledger, FakeClock(NOW))
        for i in range(TENANTS):
            engine.put_plan(tenant(i), plan(LIMIT))
            assert batch(engine, [f"c{i}-1", f"c{i}-2"], tenant=tenant(i)).newly_active == 2
    finally:
        ledger.close()
    return path


@pytest.fixture
def restarted(filled: Path) -> Iterator[tuple[TracedLedger, Engine]]:
    """The filled ledger opened again, its filter builder held mid-way."""
    ledger = TracedLedger(filled, synchronous="NORMAL")
    ledger.open()
    try:
        wait_until(ledger.build_held.is_set, "the filter builder to reach its hold")
        yield ledger, Engine(ledger, FakeClock(NOW))
    finally:
        ledger.release_build.set()
        ledger.open_writer.set()
        ledger.close()


def test_while_filters_build_a_checksend_runs_one_indexed_lookup_more_and_never_waits_for_the_build(
    restarted: tuple[TracedLedger, Engine], filled: Path
) -> None:
    """Issue 13 item 9: with the builder held in the middle of its read, CheckSends are
    answered, and one of a new contact runs exactly the statements it runs once the
    filters are built, plus one lookup of the contact in the cycle's activations, which
    SQLite answers from an index."""
    ledger, engine = restarted
    t = tenant(0)
    assert send(engine, "warm-1", tenant=t).decision.decision is Decision.ALLOW
    assert ledger.filters.get(t, engine.get_usage(t).cycle_start_us) is None
    while_building = statements_of(ledger, lambda: send(engine, "new-1", tenant=t))
    assert ledger.build_held.is_set() and ledger.filters.building == TENANTS

    ledger.release_build.set()
    wait_until(lambda: ledger.filters.building == 0, "every filter to be installed")
    steady = statements_of(ledger, lambda: send(engine, "new-2", tenant=t))

    assert steady - while_building == Counter()
    extra = while_building - steady
    assert list(extra.values()) == [1], extra
    [lookup] = extra
    assert lookup.endswith("FROM cycle_activations WHERE cycle_key = ? AND contact_id = ?"), lookup
    conn = sqlite3.connect(f"file:{filled}?mode=ro", uri=True)
    try:
        plan_rows = conn.execute("EXPLAIN QUERY PLAN " + lookup.replace("?", "0")).fetchall()
    finally:
        conn.close()
    assert [row[3].split(" (")[0] for row in plan_rows] == ["SEARCH cycle_activations USING PRIMARY KEY"], plan_rows
    assert engine.get_usage(t).active_contacts == 5


def test_a_call_waits_for_one_hand_off_of_built_filters_not_for_all_of_them(
    restarted: tuple[TracedLedger, Engine],
) -> None:
    """Issue 13 item 9: the builder hands built filters to the writer INSTALLS_PER_UNIT at
    a time, the next only once the last is installed, so a CheckSend queued while the
    writer is busy and the builder has finished its read waits for one hand-off (two,
    should the next arrive while the writer gathers its transaction), not for the
    TENANTS filters built. With every filter handed over at once, the call waits for
    all of them and this fails."""
    ledger, engine = restarted
    answers: dict[str, Any] = {}

    def call(name: str, t: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: answers.setdefault(name, send(engine, f"{name}-new", tenant=t)))
        thread.start()
        return thread

    ledger.gate_writer.set()
    gate = call("gate", tenant(1))
    wait_until(ledger.writer_gated.is_set, "the writer to stop at the gate's transaction")
    waiting = call("waiting", tenant(2))
    wait_until(lambda: ledger.queued_units == 1, "the call to wait for the writer")
    assert "waiting" not in answers

    ledger.release_build.set()
    wait_until(ledger.build_read.is_set, "the builder to finish reading")
    wait_until(lambda: ledger._writer._signals == 1, "the builder to hand its first filters to the writer")
    ledger.open_writer.set()
    gate.join()
    waiting.join()

    assert [answers[name].decision.decision for name in ("gate", "waiting")] == [Decision.ALLOW] * 2
    gate_begin, waiting_begin = ledger.filters_at_begin[-2:]
    assert gate_begin == 0
    assert 0 < waiting_begin <= 2 * INSTALLS_PER_UNIT, waiting_begin
    wait_until(lambda: ledger.filters.building == 0, "every filter to be installed")
    assert len(ledger.filters) == TENANTS
