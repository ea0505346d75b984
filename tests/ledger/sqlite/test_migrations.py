"""Schema creation and upgrades: each migration step commits together with its version
number, so a kill at any statement boundary of a first start or an upgrade leaves a
ledger that opens, with its data intact. The kills are real: a forked child runs the
migration and sends itself SIGKILL as its n-th SQL statement starts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import sqlite_utils

import quota_sidecar.server.ledger.sqlite.schema as ledger_schema
from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.domain.clock import to_us
from quota_sidecar.server.domain.cycles import cycle_at
from quota_sidecar.server.domain.model import Enforcement, MessageKind, Metering, Plan
from quota_sidecar.server.ledger.sqlite import SCHEMA_VERSION, SQLiteLedger, migrate

from support.process import AUTH, Process, start

T = "tenant-m"
ANCHOR_US = to_us(datetime(2026, 1, 15, 8, 0, tzinfo=UTC))
FEB = cycle_at(ANCHOR_US, to_us(datetime(2026, 2, 20, tzinfo=UTC)))
MAR = cycle_at(ANCHOR_US, to_us(datetime(2026, 3, 20, tzinfo=UTC)))
# The schema of version 5 as the releases that built it with sqlite_utils' table helpers made it.
V5 = 5
V5_SCHEMA = Path(__file__).with_name("ledger_schema_v5.sql")

Row = tuple[object, ...]
ACTIVATIONS: list[Row] = [
    (T, FEB.start_us, "a", FEB.start_us + 5, "CAMPAIGN", 3),
    (T, FEB.start_us, "b", FEB.start_us + 9, "MESSAGE_SENT", 0),
    (T, MAR.start_us, "a", MAR.start_us + 1, "CAMPAIGN", 1),
    ("other", FEB.start_us, "a", FEB.start_us + 2, "CAMPAIGN", 2),
]


def populate(path: Path) -> None:
    """Rows of every kind the ledger at `path` holds at its version, as a sidecar of that version wrote them:
    plans, contacts held and switching (MK-6) with the tenant's holdings where the version keeps them,
    activations and usage figures, a stored result, an audit entry; the figures equal their rows."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            held = Plan(Metering.HELD_CONTACTS, Enforcement.OVERAGE, 10, ANCHOR_US, marketing_contacts_only=True)
            active = Plan(Metering.CYCLE_ACTIVE, Enforcement.HARD, 10, ANCHOR_US, counted_kinds=(MessageKind.CAMPAIGN,))
            conn.execute("INSERT INTO plans VALUES (?, ?, ?)", (T, held.to_json(), ANCHOR_US))
            conn.execute("INSERT INTO plans VALUES ('other', ?, ?)", (active.to_json(), ANCHOR_US))
            conn.executemany(
                "INSERT INTO contacts (tenant_id, contact_id, held, marketing, marketing_until_next_update,"
                " marketing_source_type, marketing_source_id, updated_at_us) VALUES (?, ?, ?, ?, ?, 'FORM', 'f1', ?)",
                [
                    (T, "kept", 1, 1, 0, FEB.start_us + 1),
                    (T, "due", 1, 1, 1, FEB.start_us + 2),
                    (T, "pending", 1, 1, 1, MAR.start_us + 3),
                    (T, "gone", 0, 0, 0, MAR.start_us + 4),
                    (T, "plain", 1, 0, 0, MAR.start_us + 5),
                ],
            )
            conn.executemany(
                "INSERT INTO usage (tenant_id, cycle_start_us, active_contacts, sends) VALUES (?, ?, ?, ?)",
                [(T, FEB.start_us, 2, 3), (T, MAR.start_us, 1, 1), ("other", FEB.start_us, 1, 2)],
            )
            conn.execute(
                "INSERT INTO request_results VALUES (?, 'CheckSend', 'r1', ?, 'fp', '{}', ?)",
                (T, MAR.start_us, MAR.start_us + 7),
            )
            conn.execute(
                "INSERT INTO audit (at_us, tenant_id, cycle_start_us, rpc, request_id, contact_id, decision, reason,"
                " active_delta, sends_delta, held_delta) VALUES (?, ?, ?, 'CheckSend', 'r1', 'a', 'ALLOW',"
                " 'NEW_CONTACT_COUNTED', 1, 1, 0)",
                (MAR.start_us + 7, T, MAR.start_us),
            )
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'holdings'").fetchone():
                conn.execute("INSERT INTO holdings VALUES (?, ?, 4, 3, 2)", (T, MAR.start_us))
                conn.execute(
                    "UPDATE usage SET held_end = 4, held_peak = 4, marketing_end = 3, marketing_peak = 3"
                    " WHERE tenant_id = ? AND cycle_start_us = ?",
                    (T, MAR.start_us),
                )
            kind = conn.execute("SELECT type FROM sqlite_master WHERE name = 'activations'").fetchone()[0]
            if kind == "table":
                conn.executemany("INSERT INTO activations VALUES (?, ?, ?, ?, ?, ?)", ACTIVATIONS)
            else:
                for tenant_id, cycle_start_us, contact_id, at_us, activity, sends in ACTIVATIONS:
                    conn.execute(
                        "INSERT OR IGNORE INTO cycle_keys (tenant_id, cycle_start_us) VALUES (?, ?)",
                        (tenant_id, cycle_start_us),
                    )
                    conn.execute("INSERT OR IGNORE INTO activity_names (name) VALUES (?)", (activity,))
                    conn.execute(
                        "INSERT INTO cycle_activations SELECT k.cycle_key, ?, ?, n.code, ? FROM cycle_keys k,"
                        " activity_names n WHERE k.tenant_id = ? AND k.cycle_start_us = ? AND n.name = ?",
                        (contact_id, at_us - cycle_start_us, sends, tenant_id, cycle_start_us, activity),
                    )
    finally:
        conn.close()


def ledger_at(path: Path, version: int) -> Path:
    """A ledger at `version` with rows in it; version 0 is no file at all (a first start)."""
    if version:
        migrate(path, target=version)
        populate(path)
    return path


def copy(source: Path, target: Path) -> Path:
    for suffix in ("", "-wal"):
        if Path(f"{source}{suffix}").exists():
            shutil.copyfile(f"{source}{suffix}", f"{target}{suffix}")
    return target


def remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def open_and_close(path: Path) -> None:
    """What a sidecar's start does to the ledger: open it (migrating it), then close it."""
    ledger = SQLiteLedger(path)
    ledger.open()
    ledger.close()


def dump(path: Path) -> tuple[int, list[Row], dict[str, list[Row]]]:
    """The version, the schema and every table's rows."""
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        schema = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        rows = {
            name: sorted(conn.execute(f'SELECT * FROM "{name}"').fetchall(), key=repr)
            for kind, name, _, _ in schema
            if kind == "table"
        }
        return version, schema, rows
    finally:
        conn.close()


Trigger = Callable[[int, str], bool]


def fork(work: Callable[[], None]) -> int:
    """A forked child running `work`: it exits 0 when `work` returns, 1 (printing why) when it raises."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def migrate_killed(path: Path, kill_at: Trigger) -> bool:
    """Migrates `path` in a forked child that sends itself SIGKILL as the first SQL statement for which
    `kill_at(number, sql)` holds starts; whether it was killed (False: the migration finished first)."""

    def traced_migration() -> None:
        started = 0
        connect = sqlite3.connect

        def on_statement(sql: str) -> None:
            nonlocal started
            started += 1
            if kill_at(started, sql):
                os.kill(os.getpid(), signal.SIGKILL)

        def traced(*args: object, **kwargs: object) -> sqlite3.Connection:
            conn = connect(*args, **kwargs)  # type: ignore[arg-type]
            conn.set_trace_callback(on_statement)
            return conn

        sqlite3.connect = traced  # type: ignore[assignment]
        migrate(path)

    pid = fork(traced_migration)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the migration failed in the child"
    return False


def test_a_kill_at_any_statement_of_a_first_start_or_an_upgrade_leaves_a_ledger_that_opens(tmp_path: Path) -> None:
    """Durability, SG-8: from every earlier version (none: a first start; with rows from v1 on), the
    migration is killed as each of its statements starts in turn; the ledger then opens with the real
    SQLiteLedger, reaches the current version, and holds exactly what an uninterrupted upgrade gives:
    the same schema and every row, the activations intact (SG-1, MK-6 switches applied once)."""
    boundaries: dict[int, int] = {}
    for version in range(SCHEMA_VERSION):
        origin = ledger_at(tmp_path / f"v{version}.db", version)
        reference = copy(origin, tmp_path / f"v{version}-reference.db")
        open_and_close(reference)
        expected = dump(reference)
        assert expected[0] == SCHEMA_VERSION
        if version:
            conn = sqlite3.connect(reference)
            assert sorted(conn.execute("SELECT * FROM activations")) == sorted(ACTIVATIONS)
            conn.close()
        n = 0
        while True:
            n += 1
            victim = copy(origin, tmp_path / "victim.db")
            if not migrate_killed(victim, lambda number, _sql, n=n: number == n):
                break
            try:
                open_and_close(victim)
            except Exception as exc:
                raise AssertionError(f"killed at statement {n} of the upgrade from v{version}: {exc}") from exc
            assert dump(victim) == expected, f"killed at statement {n} of the upgrade from v{version}"
            remove(victim)
        remove(victim)
        boundaries[version] = n - 1
    print(f"statement boundaries killed at, by starting version: {boundaries}")
    assert all(count > 0 for count in boundaries.values())


def test_two_processes_racing_a_first_start_both_finish_on_one_schema(tmp_path: Path) -> None:
    """Two processes migrating one new ledger at the same instant: both finish, and the ledger has
    the current schema once (each step re-reads the version inside its own write transaction)."""
    expected = dump(ledger_at(tmp_path / "alone.db", SCHEMA_VERSION))
    for attempt in range(10):
        path = tmp_path / f"race-{attempt}.db"
        gate_read, gate_write = os.pipe()

        def at_the_gate(path: Path = path, gate: tuple[int, int] = (gate_read, gate_write)) -> None:
            os.close(gate[1])
            os.read(gate[0], 1)
            migrate(path)

        pids = [fork(at_the_gate) for _ in range(2)]
        os.close(gate_read)
        os.close(gate_write)
        statuses = [os.waitpid(pid, 0)[1] for pid in pids]
        assert [os.waitstatus_to_exitcode(s) for s in statuses] == [0, 0], f"attempt {attempt}"
        version, schema, _ = dump(path)
        assert (version, schema) == expected[:2]


def shape(conn: sqlite3.Connection) -> dict[str, object]:
    """Every table, index and view: its SQL with quoting and spacing set aside, and for tables each column
    (type, NOT NULL, default, key position) and each index (unique, origin, partial, its columns)."""
    described: dict[str, object] = {}
    for kind, name, sql in conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name"):
        words = " ".join((sql or "").replace('"', "").split())
        entry: list[object] = [kind, re.sub(r" ?([(),]) ?", r"\1", words)]
        if kind == "table":
            entry.append(conn.execute(f"PRAGMA table_xinfo('{name}')").fetchall())
            for index in conn.execute(f"PRAGMA index_list('{name}')").fetchall():
                entry.append((index[1:], conn.execute(f"PRAGMA index_xinfo('{index[1]}')").fetchall()))
        described[name] = entry
    return described


def test_the_rewritten_steps_make_the_schema_earlier_releases_made(tmp_path: Path) -> None:
    """Each step is plain SQL now, committed in one transaction; the v5 schema it makes is the one the
    earlier releases made with sqlite_utils' table helpers (their schema is checked in as they stored it):
    the same tables, columns, types, defaults, NOT NULL, keys, indexes and view."""
    path = tmp_path / "ledger.db"
    migrate(path, target=V5)
    made = sqlite3.connect(path)
    earlier = sqlite3.connect(":memory:")
    try:
        earlier.executescript(V5_SCHEMA.read_text())
        assert shape(made) == shape(earlier)
        version = made.execute("PRAGMA user_version").fetchone()[0]
        mode = made.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        made.close()
        earlier.close()
    assert (version, mode) == (V5, "wal")


def test_an_older_target_is_refused_and_a_newer_ledger_is_left_alone(tmp_path: Path) -> None:
    """migrate never goes back: a target below the ledger's version, or a ledger newer than this sidecar, is
    refused and changes nothing."""
    path = ledger_at(tmp_path / "ledger.db", 2)
    before = dump(path)
    with pytest.raises(ValueError, match="version 2"):
        migrate(path, target=1)
    with pytest.raises(ValueError, match="target"):
        migrate(path, target=SCHEMA_VERSION + 1)
    assert dump(path) == before


@pytest.mark.process
def test_the_sidecar_serves_a_ledger_killed_inside_an_upgrade(tmp_path: Path, processes: list[Process]) -> None:
    """The issue's case: a kill between two ALTER TABLE statements of the v1 to v2 step once left a ledger
    that never opened again (duplicate column name). The real sidecar now starts on it, serves the
    tenant's plan, stops cleanly, and the ledger holds what an uninterrupted upgrade gives."""
    origin = ledger_at(tmp_path / "v1.db", 1)
    reference = copy(origin, tmp_path / "reference.db")
    open_and_close(reference)
    altered = 0

    def second_alter(_number: int, sql: str) -> bool:
        nonlocal altered
        altered += sql.startswith("ALTER TABLE")
        return altered == 2

    assert migrate_killed(origin, second_alter)
    p = start(origin)
    processes.append(p)
    p.wait_serving()
    with grpc.insecure_channel(p.address) as ch:
        plan = pb_grpc.QuotaAdminServiceStub(ch).GetPlan(pb.GetPlanRequest(tenant_id=T), metadata=AUTH, timeout=10)
    assert plan.plan.metering == pb.METERING_HELD_CONTACTS
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(timeout=30) == 0
    assert dump(origin) == dump(reference)


def test_a_step_that_commits_on_its_own_is_stopped_before_its_version_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step must leave the commit to migrate(), which sets its version in the same transaction; one that
    commits itself is stopped, naming it, and the ledger keeps the version it had."""

    def _commits_itself(db: sqlite_utils.Database) -> None:
        db.execute("CREATE TABLE extra (id INTEGER PRIMARY KEY)")
        db.conn.commit()

    monkeypatch.setattr(ledger_schema, "MIGRATIONS", [*ledger_schema.MIGRATIONS, _commits_itself])
    monkeypatch.setattr(ledger_schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    path = tmp_path / "ledger.db"
    with pytest.raises(RuntimeError, match="_commits_itself"):
        migrate(path)
    assert dump(path)[0] == SCHEMA_VERSION
