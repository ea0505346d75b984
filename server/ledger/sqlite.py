"""The embedded SQLite ledger: WAL mode, group commit, a dedupe filter in front.

One writer thread owns the write connection. Callers hand it units of work;
it takes every unit pending, runs each inside its own savepoint of one
`BEGIN IMMEDIATE` transaction, commits once, and only then answers the
callers: concurrent decisions share one fsync, and none is acknowledged before
it is durable. Readers use their own connections and see committed state.
Each unit says how many rows it writes about (its weight); a transaction holds
light units, or heavy ones up to COMMIT_WEIGHT, so a light unit queued behind many
heavy ones waits for one of them at most, not for all of them.

An exclusive `flock` on the database file itself keeps a second sidecar off the
same ledger, whatever name reaches the file (a symlink, a hard link): the dedupe
filters and the writer's counters are exact only while this process is the only
writer, and a hard link would even give the file a second WAL.

Faults of the store are answered, never hidden. A commit that fails (disk full,
file made read-only, I/O error) fails every unit in it with LedgerUnavailable,
leaves nothing half-written (SQLite rolls the transaction back) and marks the
ledger not ready; a watcher thread then tries a small write every
`check_interval` seconds and marks it ready again once one commits. A ledger
file (or its WAL) removed underneath the sidecar is written back from the
connection that still holds it, before any commit that went into the removed
file is acknowledged, so nothing acknowledged is lost with it.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import astuple, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from ..domain.cycles import cycle_at
from ..domain.errors import LedgerUnavailable
from ..domain.model import (
    Activation,
    AuditEntry,
    ContactRecord,
    Counters,
    HeldSpan,
    Holdings,
    NoticeState,
    Reanchor,
    StoredPlan,
    StoredResult,
    Usage,
    UsageContext,
    UsageEvent,
    UsageEventType,
    UsageFigure,
)
from ..engine.deadline import within_deadline
from . import HELD_SPANS_KEPT_US, HELD_SPANS_PER_CONTACT, Ledger, LedgerReader, LedgerTx
from .dedupe import CycleFilter, DedupeFilters
from .verify import Mismatch, find_mismatches

T = TypeVar("T")
log = logging.getLogger("quota_sidecar.ledger")

SYNCHRONOUS_MODES = ("FULL", "EXTRA", "NORMAL")
STARTUP_TENANTS_LOGGED = 20


def sqlite_path(url: str) -> Path:
    """The file behind `sqlite:///relative.db`, `sqlite:////abs.db` or a bare path."""
    if url.startswith("sqlite:///"):
        rest = url[len("sqlite:///") :]
        if not rest:
            raise ValueError("the sqlite URL names no file")
        return Path(rest)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ValueError(f"unsupported ledger scheme {scheme!r}: use sqlite:///PATH or a file path")
    if not url:
        raise ValueError("the ledger path is empty")
    return Path(url)


def _v1(db: sqlite_utils.Database) -> None:
    db.execute(
        "CREATE TABLE plans (tenant_id TEXT PRIMARY KEY, plan_json TEXT NOT NULL, updated_at_us INTEGER NOT NULL)"
    )
    db.execute(
        "CREATE TABLE contacts (tenant_id TEXT, contact_id TEXT, held INTEGER NOT NULL, marketing INTEGER NOT NULL,"
        " marketing_until_next_update INTEGER NOT NULL, marketing_source_type TEXT DEFAULT '',"
        " marketing_source_id TEXT DEFAULT '', updated_at_us INTEGER NOT NULL, PRIMARY KEY (tenant_id, contact_id))"
    )
    db.execute(
        "CREATE TABLE activations (tenant_id TEXT, cycle_start_us INTEGER, contact_id TEXT,"
        " activated_at_us INTEGER NOT NULL, activity TEXT NOT NULL, sends INTEGER NOT NULL,"
        " PRIMARY KEY (tenant_id, cycle_start_us, contact_id))"
    )
    db.execute(
        "CREATE TABLE usage (tenant_id TEXT, cycle_start_us INTEGER, active_contacts INTEGER NOT NULL,"
        " sends INTEGER NOT NULL, PRIMARY KEY (tenant_id, cycle_start_us))"
    )
    db.execute(
        "CREATE TABLE request_results (tenant_id TEXT, rpc TEXT, request_id TEXT, cycle_start_us INTEGER NOT NULL,"
        " fingerprint TEXT NOT NULL, response_json TEXT NOT NULL, created_at_us INTEGER NOT NULL,"
        " PRIMARY KEY (tenant_id, rpc, request_id))"
    )
    db.execute(
        "CREATE TABLE audit (seq INTEGER PRIMARY KEY, at_us INTEGER NOT NULL, tenant_id TEXT NOT NULL,"
        " cycle_start_us INTEGER NOT NULL, rpc TEXT NOT NULL, request_id TEXT, contact_id TEXT,"
        " decision TEXT NOT NULL, reason TEXT NOT NULL, active_delta INTEGER, sends_delta INTEGER,"
        " held_delta INTEGER)"
    )
    db.execute("CREATE INDEX idx_audit_tenant_id_cycle_start_us ON audit (tenant_id, cycle_start_us)")


def _v2(db: sqlite_utils.Database) -> None:
    """Held-contact metering: the MK-6 switch instant and the held-since instant per
    contact, a tenant's held and marketing counts, per-cycle end and peak counts,
    and the plan in force over time (invoices of past cycles)."""
    for column in ("marketing_until_us", "held_since_us"):
        db.execute(f"ALTER TABLE contacts ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
    for column in ("held_end", "held_peak", "marketing_end", "marketing_peak"):
        db.execute(f"ALTER TABLE usage ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
    db.execute(
        "CREATE TABLE holdings (tenant_id TEXT PRIMARY KEY, cycle_start_us INTEGER NOT NULL, held INTEGER NOT NULL,"
        " marketing INTEGER NOT NULL, pending INTEGER NOT NULL)"
    )
    db.execute(
        "CREATE TABLE plan_versions (tenant_id TEXT, effective_us INTEGER, plan_json TEXT NOT NULL,"
        " PRIMARY KEY (tenant_id, effective_us))"
    )
    db.execute("UPDATE contacts SET held_since_us = updated_at_us WHERE held = 1")
    db.execute(
        "INSERT INTO plan_versions (tenant_id, effective_us, plan_json) SELECT tenant_id, 0, plan_json FROM plans"
    )
    anchors = {
        tenant_id: json.loads(plan_json)["cycle_anchor_us"]
        for tenant_id, plan_json in db.execute("SELECT tenant_id, plan_json FROM plans").fetchall()
    }
    for tenant_id, last_update_us in db.execute(
        "SELECT tenant_id, MAX(updated_at_us) FROM contacts GROUP BY tenant_id"
    ).fetchall():
        anchor = anchors.get(tenant_id, 0)
        current = cycle_at(anchor, last_update_us)
        flagged = db.execute(
            "SELECT contact_id, updated_at_us FROM contacts"
            " WHERE tenant_id = ? AND held = 1 AND marketing = 1 AND marketing_until_next_update = 1",
            (tenant_id,),
        ).fetchall()
        for contact_id, updated_at_us in flagged:
            until = cycle_at(anchor, updated_at_us).end_us
            if until <= current.start_us:
                db.execute(
                    "UPDATE contacts SET marketing = 0, marketing_until_next_update = 0"
                    " WHERE tenant_id = ? AND contact_id = ?",
                    (tenant_id, contact_id),
                )
            else:
                db.execute(
                    "UPDATE contacts SET marketing_until_us = ? WHERE tenant_id = ? AND contact_id = ?",
                    (until, tenant_id, contact_id),
                )
        held, marketing, pending = db.execute(
            "SELECT COALESCE(SUM(held), 0), COALESCE(SUM(held * marketing), 0),"
            " COALESCE(SUM(held * marketing * marketing_until_next_update), 0) FROM contacts WHERE tenant_id = ?",
            (tenant_id,),
        ).fetchone()
        db.execute(
            "INSERT INTO holdings (tenant_id, cycle_start_us, held, marketing, pending) VALUES (?, ?, ?, ?, ?)",
            (tenant_id, current.start_us, held, marketing, pending),
        )
        db.execute(
            "INSERT INTO usage (tenant_id, cycle_start_us, active_contacts, sends, held_end, held_peak,"
            " marketing_end, marketing_peak) VALUES (?, ?, 0, 0, ?, ?, ?, ?)"
            " ON CONFLICT (tenant_id, cycle_start_us) DO UPDATE SET held_end = excluded.held_end,"
            " held_peak = excluded.held_peak, marketing_end = excluded.marketing_end,"
            " marketing_peak = excluded.marketing_peak",
            (tenant_id, current.start_us, held, held, marketing, marketing),
        )


def _v3(db: sqlite_utils.Database) -> None:
    """Notifications: each figure's notice state and the outbox of usage events, with
    the position each consumer (the webhook) has delivered up to. AUTOINCREMENT keeps
    a sequence from ever being reused, so a resume point stays valid."""
    db.execute(
        "CREATE TABLE notices (tenant_id TEXT, figure INTEGER, level REAL NOT NULL, cycle_start_us INTEGER NOT NULL,"
        " last_at_us INTEGER NOT NULL, PRIMARY KEY (tenant_id, figure))"
    )
    db.execute(
        "CREATE TABLE usage_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE,"
        " at_us INTEGER NOT NULL, tenant_id TEXT NOT NULL, type INTEGER NOT NULL, figure INTEGER NOT NULL,"
        " threshold REAL NOT NULL, usage_json TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX usage_events_tenant ON usage_events (tenant_id, seq)")
    db.execute("CREATE TABLE event_cursors (consumer TEXT PRIMARY KEY, seq INTEGER NOT NULL)")


def _v4(db: sqlite_utils.Database) -> None:
    """Compact activations, the ledger's bulk: one row per contact and cycle, keyed by
    a small integer per tenant cycle (`cycle_keys`) instead of the tenant id and the
    cycle start, the activation instant as an offset into the cycle and the activity
    as a code (`activity_names`), in a WITHOUT ROWID table so the contact id is
    stored once. `activations` stays readable as a view with the former columns.
    Sends under CYCLE_ACTIVE are no longer audited contact by contact: each
    activation row carries its contact's sends."""
    db.execute(
        "CREATE TABLE cycle_keys (cycle_key INTEGER PRIMARY KEY, tenant_id TEXT NOT NULL,"
        " cycle_start_us INTEGER NOT NULL, UNIQUE (tenant_id, cycle_start_us))"
    )
    db.execute("CREATE TABLE activity_names (code INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)")
    db.execute(
        "CREATE TABLE cycle_activations (cycle_key INTEGER NOT NULL, contact_id TEXT NOT NULL,"
        " activated_after_us INTEGER NOT NULL, activity INTEGER NOT NULL, sends INTEGER NOT NULL,"
        " PRIMARY KEY (cycle_key, contact_id)) WITHOUT ROWID"
    )
    db.execute(
        "INSERT INTO cycle_keys (tenant_id, cycle_start_us)"
        " SELECT DISTINCT tenant_id, cycle_start_us FROM activations ORDER BY 1, 2"
    )
    db.execute("INSERT INTO activity_names (name) SELECT DISTINCT activity FROM activations ORDER BY 1")
    db.execute(
        "INSERT INTO cycle_activations SELECT k.cycle_key, a.contact_id, a.activated_at_us - a.cycle_start_us,"
        " n.code, a.sends FROM activations a"
        " JOIN cycle_keys k ON k.tenant_id = a.tenant_id AND k.cycle_start_us = a.cycle_start_us"
        " JOIN activity_names n ON n.name = a.activity ORDER BY 1, 2"
    )
    db.execute("DROP TABLE activations")
    db.execute(
        "CREATE VIEW activations AS SELECT k.tenant_id, k.cycle_start_us, a.contact_id,"
        " k.cycle_start_us + a.activated_after_us AS activated_at_us, n.name AS activity, a.sends"
        " FROM cycle_activations a JOIN cycle_keys k ON k.cycle_key = a.cycle_key"
        " JOIN activity_names n ON n.code = a.activity"
    )


def _v5(db: sqlite_utils.Database) -> None:
    """One row the fault watcher rewrites to learn whether the store takes writes again."""
    db.execute("CREATE TABLE ledger_checks (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at_us INTEGER NOT NULL)")


def _compact_request_results(db: sqlite_utils.Database) -> None:
    """Answers kept for retries in their packed form (replies.py), keyed by a digest of
    tenant, RPC and request_id, in insertion order (`seq`) so pruning by age reads the
    oldest first; the usage context of an answer stored once in `usage_contexts`
    (`used_us`: when an answer last took it, so unused ones are pruned too). Answers
    kept as JSON in `request_results` are still answered, until they are pruned."""
    db.execute(
        "CREATE TABLE usage_contexts (id INTEGER PRIMARY KEY, tenant_id TEXT NOT NULL,"
        " cycle_start_us INTEGER NOT NULL, cycle_end_us INTEGER NOT NULL, contact_limit INTEGER NOT NULL,"
        " sends_limit INTEGER NOT NULL, currency TEXT NOT NULL, plan_name TEXT NOT NULL, used_us INTEGER NOT NULL,"
        " UNIQUE (tenant_id, cycle_start_us, cycle_end_us, contact_limit, sends_limit, currency, plan_name))"
    )
    db.execute(
        "CREATE TABLE request_replies (seq INTEGER PRIMARY KEY, key BLOB NOT NULL, at_s INTEGER NOT NULL,"
        " fingerprint BLOB NOT NULL, context INTEGER NOT NULL, reply BLOB NOT NULL)"
    )
    db.execute("CREATE UNIQUE INDEX request_replies_key ON request_replies (key)")


def _record_reanchors(db: sqlite_utils.Database) -> None:
    """Re-anchors: the instants at which a plan with a new anchor closed a tenant's cycle,
    with the anchor of the cycle that closed, so past cycles stay where they were."""
    db.execute(
        "CREATE TABLE reanchors (tenant_id TEXT NOT NULL, at_us INTEGER NOT NULL,"
        " anchor_before_us INTEGER NOT NULL, PRIMARY KEY (tenant_id, at_us)) WITHOUT ROWID"
    )


def _keep_ledger_time(db: sqlite_utils.Database) -> None:
    """Ledger time: the latest instant a committed write decided at, so a wall clock
    stepped back, even across a restart, never dates a decision before a stored one.
    Starts at the latest instant the ledger already stores where the sidecar's own
    clock wrote it (activation instants and the cycles they open can be a caller's,
    and are left out)."""
    db.execute("CREATE TABLE ledger_time (id INTEGER PRIMARY KEY CHECK (id = 1), at_us INTEGER NOT NULL)")
    db.execute(
        "INSERT INTO ledger_time (id, at_us) SELECT 1, MAX(at_us) FROM ("
        " SELECT MAX(updated_at_us) AS at_us FROM plans UNION ALL SELECT MAX(effective_us) FROM plan_versions"
        " UNION ALL SELECT MAX(updated_at_us) FROM contacts UNION ALL SELECT MAX(at_us) FROM audit"
        " UNION ALL SELECT MAX(created_at_us) FROM request_results UNION ALL SELECT MAX(at_us) FROM usage_events"
        " UNION ALL SELECT MAX(cycle_start_us) FROM holdings) HAVING MAX(at_us) IS NOT NULL"
    )


def _remember_tenant_file_entries(db: sqlite_utils.Database) -> None:
    """The digest of each tenant's `--tenants` file entry as last applied, so a start applies
    an entry only when it changed and keeps a PutPlan made since."""
    db.execute(
        "CREATE TABLE tenant_file_entries (tenant_id TEXT PRIMARY KEY, digest TEXT NOT NULL,"
        " applied_at_us INTEGER NOT NULL)"
    )


def _keep_held_spans(db: sqlite_utils.Database) -> None:
    """When each contact counted under HELD_CONTACTS: one row per span held (`marketing` 0)
    and per span held as a marketing contact (`marketing` 1), `to_us` NULL while open, so the
    contacts behind any cycle's invoice line can be listed. Triggers on `contacts` write the
    spans in the transaction that changes the contact, whatever path changes it (a contact
    change, or the MK-6 switch, which ends the span at the switch instant). Seeded from the
    contacts held now (spans of contacts no longer held were not recorded before).

    A contact's first row has no spans yet (contacts rows are never deleted); later, a span
    that ended at the instant it opens again is reopened by deleting it first: a trigger
    cannot rely on INSERT OR REPLACE, as the statement firing it sets the policy.
    Opening a span prunes the contact's spans (HELD_SPANS_KEPT_US, HELD_SPANS_PER_CONTACT):
    only an opening adds a row."""
    db.execute(
        "CREATE TABLE held_spans (tenant_id TEXT NOT NULL, contact_id TEXT NOT NULL, marketing INTEGER NOT NULL,"
        " from_us INTEGER NOT NULL, to_us INTEGER, PRIMARY KEY (tenant_id, marketing, contact_id, from_us))"
        " WITHOUT ROWID"
    )
    db.execute(
        "INSERT INTO held_spans SELECT tenant_id, contact_id, 0, held_since_us, NULL FROM contacts WHERE held = 1"
    )
    db.execute(
        "INSERT INTO held_spans SELECT tenant_id, contact_id, 1, held_since_us, NULL FROM contacts"
        " WHERE held = 1 AND marketing = 1"
    )
    contact = "tenant_id = NEW.tenant_id AND contact_id = NEW.contact_id"

    def keep_latest(marketing: int, when: str) -> str:
        span = f"{contact} AND marketing = {marketing}"
        return (
            f"DELETE FROM held_spans WHERE {span} AND {when} AND from_us < (SELECT from_us FROM held_spans"
            f" WHERE {span} ORDER BY from_us DESC LIMIT 1 OFFSET {HELD_SPANS_PER_CONTACT - 1});"
        )

    held_from, marketing_from = "NEW.held_since_us", "NEW.updated_at_us"
    opens_held = "OLD.held = 0 AND NEW.held = 1"
    opens_marketing = "NOT (OLD.held = 1 AND OLD.marketing = 1) AND NEW.held = 1 AND NEW.marketing = 1"
    db.execute(
        "CREATE TRIGGER contacts_held_spans_insert AFTER INSERT ON contacts WHEN NEW.held = 1 BEGIN"
        f" INSERT INTO held_spans VALUES (NEW.tenant_id, NEW.contact_id, 0, {held_from}, NULL);"
        f" INSERT INTO held_spans SELECT NEW.tenant_id, NEW.contact_id, 1, {marketing_from}, NULL"
        " WHERE NEW.marketing = 1; END"
    )
    db.execute(
        "CREATE TRIGGER contacts_held_spans_update AFTER UPDATE OF held, marketing ON contacts"
        " WHEN OLD.held != NEW.held OR (OLD.held AND OLD.marketing) != (NEW.held AND NEW.marketing) BEGIN"
        f" UPDATE held_spans SET to_us = NEW.updated_at_us WHERE {contact} AND marketing = 0 AND to_us IS NULL"
        " AND OLD.held = 1 AND NEW.held = 0;"
        " UPDATE held_spans SET to_us = CASE WHEN NEW.held = 1 AND OLD.marketing_until_us > 0"
        f" THEN OLD.marketing_until_us ELSE NEW.updated_at_us END WHERE {contact} AND marketing = 1"
        " AND to_us IS NULL AND OLD.held = 1 AND OLD.marketing = 1 AND NOT (NEW.held = 1 AND NEW.marketing = 1);"
        f" DELETE FROM held_spans WHERE {contact} AND marketing = 0 AND from_us = {held_from} AND {opens_held};"
        f" INSERT INTO held_spans SELECT NEW.tenant_id, NEW.contact_id, 0, {held_from}, NULL WHERE {opens_held};"
        f" DELETE FROM held_spans WHERE {contact} AND marketing = 1 AND from_us = {marketing_from}"
        f" AND {opens_marketing};"
        f" INSERT INTO held_spans SELECT NEW.tenant_id, NEW.contact_id, 1, {marketing_from}, NULL"
        f" WHERE {opens_marketing};"
        f" DELETE FROM held_spans WHERE {contact} AND marketing IN (0, 1)"
        f" AND to_us < NEW.updated_at_us - {HELD_SPANS_KEPT_US} AND ({opens_held} OR {opens_marketing});"
        f" {keep_latest(0, opens_held)} {keep_latest(1, opens_marketing)} END"
    )


def _remember_audit_pruning(db: sqlite_utils.Database) -> None:
    """How far audit pruning reached: rows dated before `before_us` may be gone, so the
    sends of held-contact cycles that started before it (summed from the audit) can no
    longer be checked against their rows, only bounded by them."""
    db.execute("CREATE TABLE audit_pruned (id INTEGER PRIMARY KEY CHECK (id = 1), before_us INTEGER NOT NULL)")


# Each step runs inside the one transaction migrate() opens for it, which it must not end
# (no commit of its own), so that the step and its version number commit together.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _v1,
    _v2,
    _v3,
    _v4,
    _v5,
    _compact_request_results,
    _record_reanchors,
    _keep_ledger_time,
    _remember_tenant_file_entries,
    _keep_held_spans,
    _remember_audit_pruning,
]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(path: Path, target: int | None = None) -> int:
    """Brings the schema at `path` to `target` (SCHEMA_VERSION when not given; an older
    one builds a ledger as an earlier release left it); returns the version found.

    Each step runs in one `BEGIN IMMEDIATE` transaction that also sets its version
    number, so a process killed at any point leaves the ledger at one version or the
    next, never between. The version is read again inside each transaction: a second
    process migrating the same file meanwhile waits for the lock and finds the step done.
    """
    goal = SCHEMA_VERSION if target is None else target
    if not 0 <= goal <= SCHEMA_VERSION:
        raise ValueError(f"target version {goal} is not one of 0..{SCHEMA_VERSION}")
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        _use_wal(conn)
        found = version = _schema_version(conn, path)
        if found > goal:
            raise ValueError(f"ledger {path} is at schema version {found}, past the target version {goal}")
        db = sqlite_utils.Database(conn)
        while version < goal:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = _schema_version(conn, path)
                if version < goal:
                    step = MIGRATIONS[version]
                    step(db)
                    if not conn.in_transaction:
                        raise RuntimeError(f"the migration step {step.__name__} committed part of itself on its own")
                    version += 1
                    conn.execute(f"PRAGMA user_version = {version}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return found
    finally:
        conn.close()


def _use_wal(conn: sqlite3.Connection, patience: float = 30.0) -> None:
    """Switches the file to WAL (atomic on its own; it cannot run inside a transaction).
    When two connections switch one file at once, SQLite answers one of them "locked"
    without waiting out its busy timeout: that one tries again until the other is done."""
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.005)


def _schema_version(conn: sqlite3.Connection, path: Path) -> int:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise ValueError(f"ledger {path} has schema version {version}, newer than this sidecar's {SCHEMA_VERSION}")
    return version


_KEY = "(SELECT cycle_key FROM cycle_keys WHERE tenant_id = ? AND cycle_start_us = ?)"
_CONTEXT = "tenant_id, cycle_start_us, cycle_end_us, contact_limit, sends_limit, currency, plan_name"
# A usage context's `used_us` is rewritten at most this often; one unused for longer
# than the request retention and this is taken by no answer kept.
CONTEXT_REFRESH_US = 3600 * 1_000_000


def _request_key(tenant_id: str, rpc: str, request_id: str) -> bytes:
    """128 bits naming a request_id within its tenant and RPC (ids hold no NUL)."""
    name = f"{tenant_id}\x00{rpc}\x00{request_id}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(name, digest_size=16).digest()


def _prune_oldest(conn: sqlite3.Connection, table: str, key: str, age: str, before: int, limit: int) -> int:
    """Deletes, among the `limit` oldest rows of `table` by `key`, those whose `age` is below `before`."""
    return conn.execute(
        f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} ORDER BY {key} LIMIT ?) AND {age} < ?",
        (limit, before),
    ).rowcount


class _Reader:
    """Reads over one connection; used by readers and, with the filter, the writer."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def plan(self, tenant_id: str) -> StoredPlan | None:
        row = self.conn.execute(
            "SELECT plan_json, updated_at_us FROM plans WHERE tenant_id = ?", (tenant_id,)
        ).fetchone()
        return StoredPlan(row[0], row[1]) if row else None

    def plan_at(self, tenant_id: str, before_us: int) -> StoredPlan | None:
        row = self.conn.execute(
            "SELECT plan_json, effective_us FROM plan_versions WHERE tenant_id = ? AND effective_us < ?"
            " ORDER BY effective_us DESC LIMIT 1",
            (tenant_id, before_us),
        ).fetchone()
        return StoredPlan(row[0], row[1]) if row else None

    def reanchors_around(self, tenant_id: str, instant_us: int) -> tuple[int | None, Reanchor | None]:
        since = self.conn.execute(
            "SELECT MAX(at_us) FROM reanchors WHERE tenant_id = ? AND at_us <= ?", (tenant_id, instant_us)
        ).fetchone()[0]
        after = self.conn.execute(
            "SELECT at_us, anchor_before_us FROM reanchors WHERE tenant_id = ? AND at_us > ? ORDER BY at_us LIMIT 1",
            (tenant_id, instant_us),
        ).fetchone()
        return since, Reanchor(*after) if after else None

    def counters(self, tenant_id: str, cycle_start_us: int) -> Counters:
        row = self.conn.execute(
            "SELECT active_contacts, sends, held_end, held_peak, marketing_end, marketing_peak FROM usage"
            " WHERE tenant_id = ? AND cycle_start_us = ?",
            (tenant_id, cycle_start_us),
        ).fetchone()
        return Counters(*row) if row else Counters()

    def holdings(self, tenant_id: str) -> Holdings | None:
        row = self.conn.execute(
            "SELECT cycle_start_us, held, marketing, pending FROM holdings WHERE tenant_id = ?", (tenant_id,)
        ).fetchone()
        return Holdings(*row) if row else None

    def activation(self, tenant_id: str, cycle_start_us: int, contact_id: str) -> Activation | None:
        row = self.conn.execute(
            "SELECT activated_at_us, activity, sends FROM activations"
            " WHERE tenant_id = ? AND cycle_start_us = ? AND contact_id = ?",
            (tenant_id, cycle_start_us, contact_id),
        ).fetchone()
        return Activation(contact_id, row[0], row[1], row[2]) if row else None

    def active_among(self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str]) -> set[str]:
        return _active_among(self.conn, f"cycle_key = {_KEY}", (tenant_id, cycle_start_us), contact_ids)

    def contact(self, tenant_id: str, contact_id: str) -> ContactRecord | None:
        row = self.conn.execute(
            "SELECT held, marketing, marketing_until_next_update, marketing_source_type, marketing_source_id,"
            " marketing_until_us, held_since_us FROM contacts WHERE tenant_id = ? AND contact_id = ?",
            (tenant_id, contact_id),
        ).fetchone()
        if not row:
            return None
        return ContactRecord(contact_id, bool(row[0]), bool(row[1]), bool(row[2]), row[3], row[4], row[5], row[6])

    def counted_contacts(
        self, tenant_id: str, marketing_only: bool, at_us: int, after_contact_id: str, limit: int
    ) -> list[ContactRecord]:
        marketing = (
            " AND marketing = 1 AND (marketing_until_us = 0 OR marketing_until_us > ?)" if marketing_only else ""
        )
        args: tuple[Any, ...] = (tenant_id, after_contact_id) + ((at_us,) if marketing_only else ()) + (limit,)
        rows = self.conn.execute(
            "SELECT contact_id, held, marketing, marketing_until_next_update, marketing_source_type,"
            " marketing_source_id, marketing_until_us, held_since_us FROM contacts"
            f" WHERE tenant_id = ? AND held = 1 AND contact_id > ?{marketing} ORDER BY contact_id LIMIT ?",
            args,
        ).fetchall()
        return [ContactRecord(r[0], bool(r[1]), bool(r[2]), bool(r[3]), r[4], r[5], r[6], r[7]) for r in rows]

    def held_spans(
        self,
        tenant_id: str,
        marketing_only: bool,
        start_us: int,
        end_us: int,
        after: tuple[str, int],
        limit: int,
        contact_id: str | None = None,
    ) -> list[HeldSpan]:
        """An open marketing span whose MK-6 switch is due ends at the switch instant,
        though the switch itself is written by the tenant's next change. A span that starts
        in the cycle is in it even when it ended at once: the peak counted it."""
        one = " AND h.contact_id = ?" if contact_id is not None else ""
        rows = self.conn.execute(
            "SELECT h.contact_id, h.from_us, COALESCE(h.to_us, CASE WHEN h.marketing = 1"
            " AND c.marketing_until_us > 0 THEN c.marketing_until_us END) AS until FROM held_spans h"
            " JOIN contacts c ON c.tenant_id = h.tenant_id AND c.contact_id = h.contact_id"
            " WHERE h.tenant_id = ? AND h.marketing = ? AND (h.contact_id, h.from_us) > (?, ?)"
            " AND h.from_us < ? AND (h.from_us >= ? OR until IS NULL OR until > ?)"
            f"{one} ORDER BY h.contact_id, h.from_us LIMIT ?",
            (tenant_id, int(marketing_only), after[0], after[1], end_us, start_us, start_us)
            + ((contact_id,) if contact_id is not None else ())
            + (limit,),
        ).fetchall()
        return [HeldSpan(*row) for row in rows]

    def active_contacts(
        self, tenant_id: str, cycle_start_us: int, after_contact_id: str, limit: int
    ) -> list[Activation]:
        rows = self.conn.execute(
            "SELECT contact_id, activated_at_us, activity, sends FROM activations"
            " WHERE tenant_id = ? AND cycle_start_us = ? AND contact_id > ?"
            " ORDER BY contact_id LIMIT ?",
            (tenant_id, cycle_start_us, after_contact_id, limit),
        ).fetchall()
        return [Activation(*row) for row in rows]

    def stored_result(self, tenant_id: str, rpc: str, request_id: str) -> StoredResult | None:
        row = self.conn.execute(
            f"SELECT r.fingerprint, r.reply, {_CONTEXT} FROM request_replies r"
            " JOIN usage_contexts c ON c.id = r.context WHERE r.key = ?",
            (_request_key(tenant_id, rpc, request_id),),
        ).fetchone()
        if row is not None:
            return StoredResult(row[0], row[1], UsageContext(*row[2:]))
        row = self.conn.execute(
            "SELECT fingerprint, response_json FROM request_results WHERE tenant_id = ? AND rpc = ? AND request_id = ?",
            (tenant_id, rpc, request_id),
        ).fetchone()
        return StoredResult(bytes.fromhex(row[0]), legacy_json=row[1]) if row else None

    def tenants(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT tenant_id FROM plans ORDER BY tenant_id")]

    def file_entry(self, tenant_id: str) -> str | None:
        row = self.conn.execute("SELECT digest FROM tenant_file_entries WHERE tenant_id = ?", (tenant_id,)).fetchone()
        return row[0] if row else None

    def notice(self, tenant_id: str, figure: UsageFigure) -> NoticeState | None:
        row = self.conn.execute(
            "SELECT level, cycle_start_us, last_at_us FROM notices WHERE tenant_id = ? AND figure = ?",
            (tenant_id, figure.value),
        ).fetchone()
        return NoticeState(*row) if row else None

    def raised_notices(self) -> list[tuple[str, UsageFigure, NoticeState]]:
        rows = self.conn.execute(
            "SELECT tenant_id, figure, level, cycle_start_us, last_at_us FROM notices WHERE level > 0"
            " ORDER BY tenant_id, figure"
        )
        return [(r[0], UsageFigure(r[1]), NoticeState(r[2], r[3], r[4])) for r in rows]

    def events_after(self, after_seq: int, tenant_id: str, limit: int) -> list[UsageEvent]:
        where = " AND tenant_id = ?" if tenant_id else ""
        args: tuple[Any, ...] = (after_seq, tenant_id, limit) if tenant_id else (after_seq, limit)
        rows = self.conn.execute(
            "SELECT seq, event_id, type, figure, tenant_id, threshold, at_us, usage_json FROM usage_events"
            f" WHERE seq > ?{where} ORDER BY seq LIMIT ?",
            args,
        )
        return [
            UsageEvent(
                r[1],
                UsageEventType(r[2]),
                UsageFigure(r[3]),
                r[4],
                r[5],
                r[6],
                Usage.from_dict(json.loads(r[7])),
                r[0],
            )
            for r in rows
        ]

    def event_cursor(self, consumer: str) -> int:
        row = self.conn.execute("SELECT seq FROM event_cursors WHERE consumer = ?", (consumer,)).fetchone()
        return row[0] if row else 0

    def pending_events(self, after_seq: int) -> tuple[int, int | None]:
        count, oldest = self.conn.execute(
            "SELECT COUNT(*), MIN(at_us) FROM usage_events WHERE seq > ?", (after_seq,)
        ).fetchone()
        return count, oldest

    def last_event_seq(self) -> int:
        return self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM usage_events").fetchone()[0]


def _active_among(conn: sqlite3.Connection, key_sql: str, key: tuple[Any, ...], contact_ids: Sequence[str]) -> set[str]:
    if not contact_ids:
        return set()
    if len(contact_ids) == 1:
        sql = f"SELECT contact_id FROM cycle_activations WHERE {key_sql} AND contact_id = ?"
        return {r[0] for r in conn.execute(sql, (*key, contact_ids[0]))}
    sql = f"SELECT contact_id FROM cycle_activations WHERE {key_sql} AND contact_id IN (SELECT value FROM json_each(?))"
    return {r[0] for r in conn.execute(sql, (*key, json.dumps(contact_ids)))}


_REMEMBERED = 100_000
# A transaction holds units of at most SMALL_UNIT, or heavier ones weighing at most
# COMMIT_WEIGHT together (always one); the rest wait for the next transaction, light
# ones first: one large call's unit at a time holds the writer.
COMMIT_WEIGHT = 512
SMALL_UNIT = 32
BUILDS_PER_READ = 1_000
# Built filters are handed to the writer this many at a time, the next only once it has
# installed the last: an install runs between two commits, and 1,000 at once (with a
# read of the figures each) held the writer for tens of milliseconds after a restart.
INSTALLS_PER_UNIT = 64
ROWS_PER_READ = 65_536


def _cycle_size(conn: sqlite3.Connection, key: tuple[str, int]) -> tuple[int | None, int]:
    """A tenant cycle's key and its count of active contacts."""
    row = conn.execute(
        "SELECT k.cycle_key, COALESCE(u.active_contacts, 0) FROM cycle_keys k LEFT JOIN usage u"
        " ON u.tenant_id = k.tenant_id AND u.cycle_start_us = k.cycle_start_us"
        " WHERE k.tenant_id = ? AND k.cycle_start_us = ?",
        key,
    ).fetchone()
    return (row[0], row[1]) if row else (None, 0)


K = TypeVar("K")
V = TypeVar("V")


def _remember(cache: dict[K, V], key: K, value: V) -> None:
    """What the writer remembers of rows only it writes, bounded."""
    if len(cache) >= _REMEMBERED:
        cache.clear()
    cache[key] = value


@dataclass(slots=True)
class _Build:
    capacity: int
    pending: list[str] = field(default_factory=list)


class _Builds:
    """Dedupe filters built from the ledger's rows in the background (at start-up, on
    a cycle's first use, and bigger when one outgrows its size), so neither SERVING
    nor the writer waits for a read of millions of rows. From the moment a build is
    asked for, the writer records every contact it activates in that cycle; the
    build starts only once the transaction that asked for it has committed, so the
    builder's snapshot holds every contact activated before the recording began; the
    writer installs the built filter with the recorded contacts added. A contact is
    in the snapshot, in the record, or both: the built filter misses no active
    contact. Recorded contacts of a rolled-back unit only add false positives,
    which the ledger confirms."""

    def __init__(self, filters: DedupeFilters) -> None:
        self.filters = filters
        self.running: dict[tuple[str, int], _Build] = {}
        self.generation = 0
        self.requested: list[tuple[tuple[str, int], int, int]] = []
        self.asked: queue.SimpleQueue[list[tuple[tuple[str, int], int, int]] | None] = queue.SimpleQueue()

    def request(self, key: tuple[str, int], capacity: int) -> None:
        """Starts recording; the build itself is handed over by `dispatch`."""
        if key not in self.running:
            self.running[key] = _Build(capacity)
            self.requested.append((key, capacity, self.generation))
            self.filters.building = len(self.running)

    def dispatch(self) -> None:
        """Hands the builds asked for to the builder, once what was written before is committed."""
        if self.requested:
            self.asked.put(self.requested)
            self.requested = []

    def record(self, key: tuple[str, int], contact_ids: Sequence[str]) -> None:
        build = self.running.get(key)
        if build is not None:
            build.pending.extend(contact_ids)

    def finish(self, key: tuple[str, int], generation: int) -> list[str] | None:
        """The contacts recorded while the build ran; None if it was abandoned."""
        if generation != self.generation:
            return None
        build = self.running.pop(key, None)
        self.filters.building = len(self.running)
        return None if build is None else build.pending

    def abandon(self) -> None:
        self.running.clear()
        self.requested.clear()
        self.generation += 1
        self.filters.building = 0


class _Install:
    """Built filters handed to the writer, which installs them between commits."""

    __slots__ = ("ledger", "built", "done")

    def __init__(self, ledger: SQLiteLedger, built: list[tuple[tuple[str, int], CycleFilter | None, int]]) -> None:
        self.ledger = ledger
        self.built = built
        self.done = threading.Event()

    def __call__(self) -> None:
        try:
            self._install()
        finally:
            self.done.set()

    def _install(self) -> None:
        ledger = self.ledger
        for key, f, generation in self.built:
            pending = ledger._builds.finish(key, generation)
            if pending is None or f is None:
                continue
            # Without contacts recorded during the build the rows read are the cycle's
            # active contacts, exactly; only otherwise is the count read again (a read
            # per filter held the writer for seconds when 100,000 were installed).
            if pending and ledger._tx is not None:
                f.add_all(f.not_among(pending))
                f.recount(ledger._tx.counters(*key).active_contacts)
            ledger.filters.put(key[0], key[1], f)


class _Tx(_Reader):
    """The writer's view inside a transaction: reads see the transaction's own writes."""

    def __init__(self, conn: sqlite3.Connection, filters: DedupeFilters, builds: _Builds) -> None:
        super().__init__(conn)
        self.filters = filters
        self.builds = builds
        self.committed: list[Callable[[], None]] = []
        self.noted_us = 0
        self._keys: dict[tuple[str, int], int] = {}
        self._codes: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._plans: dict[str, StoredPlan] = {}
        self._counters: dict[tuple[str, int], Counters] = {}
        self._contexts: dict[UsageContext, tuple[int, int]] = {}

    def forget(self) -> None:
        """Drops what the writer remembers of rows a rolled-back transaction wrote."""
        self._contexts.clear()
        self._keys.clear()
        self._codes.clear()
        self._names.clear()
        self._plans.clear()
        self._counters.clear()

    def plan(self, tenant_id: str) -> StoredPlan | None:
        found = self._plans.get(tenant_id)
        if found is None:
            found = super().plan(tenant_id)
            if found is not None:
                _remember(self._plans, tenant_id, found)
        return found

    def counters(self, tenant_id: str, cycle_start_us: int) -> Counters:
        key = (tenant_id, cycle_start_us)
        found = self._counters.get(key)
        if found is None:
            found = super().counters(tenant_id, cycle_start_us)
            _remember(self._counters, key, found)
        return found

    def _key(self, tenant_id: str, cycle_start_us: int, *, create: bool) -> int | None:
        found = self._keys.get((tenant_id, cycle_start_us))
        if found is not None:
            return found
        row = self.conn.execute(
            "SELECT cycle_key FROM cycle_keys WHERE tenant_id = ? AND cycle_start_us = ?", (tenant_id, cycle_start_us)
        ).fetchone()
        if row is not None:
            found = row[0]
        elif create:
            found = self.conn.execute(
                "INSERT INTO cycle_keys (tenant_id, cycle_start_us) VALUES (?, ?)", (tenant_id, cycle_start_us)
            ).lastrowid
        if found is not None:
            self._keys[(tenant_id, cycle_start_us)] = found
        return found

    def _code(self, activity: str) -> int:
        found = self._codes.get(activity)
        if found is None:
            row = self.conn.execute("SELECT code FROM activity_names WHERE name = ?", (activity,)).fetchone()
            if row is not None:
                found = row[0]
            else:
                found = self.conn.execute("INSERT INTO activity_names (name) VALUES (?)", (activity,)).lastrowid
            assert found is not None
            self._codes[activity] = found
            self._names[found] = activity
        return found

    def _name(self, code: int) -> str:
        found = self._names.get(code)
        if found is None:
            found = self.conn.execute("SELECT name FROM activity_names WHERE code = ?", (code,)).fetchone()[0]
            self._names[code] = found
            self._codes[found] = code
        return found

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.committed.append(callback)

    def note_time(self, at_us: int) -> None:
        if at_us > self.noted_us:
            self.noted_us = at_us

    def _filter(self, tenant_id: str, cycle_start_us: int) -> CycleFilter | None:
        """The cycle's filter; None while it is being built from the ledger's rows (a
        build is asked for the first time), when every contact is "maybe"."""
        f = self.filters.get(tenant_id, cycle_start_us)
        if f is None:
            self.builds.request((tenant_id, cycle_start_us), 0)
        return f

    def activation(self, tenant_id: str, cycle_start_us: int, contact_id: str) -> Activation | None:
        """Through the cycle's filter (the figures count only look-ups a filter answered)."""
        stats = self.filters.stats
        f = self._filter(tenant_id, cycle_start_us)
        if f is not None:
            stats.lookups += 1
            if contact_id not in f:
                stats.certainly_new += 1
                return None
        key = self._key(tenant_id, cycle_start_us, create=False)
        row = None
        if key is not None:
            row = self.conn.execute(
                "SELECT activated_after_us, activity, sends FROM cycle_activations"
                " WHERE cycle_key = ? AND contact_id = ?",
                (key, contact_id),
            ).fetchone()
        if row is None:
            if f is not None:
                stats.confirmed_false_positives += 1
            return None
        return Activation(contact_id, cycle_start_us + row[0], self._name(row[1]), row[2])

    def active_among(self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str]) -> set[str]:
        """The bloom filter answers "certainly new" for most new contacts; the rest
        (every active one and the false positives) are confirmed in one query."""
        f = self._filter(tenant_id, cycle_start_us)
        maybe = contact_ids if f is None else f.maybe_among(contact_ids)
        key = self._key(tenant_id, cycle_start_us, create=False)
        found = set() if key is None or not maybe else _active_among(self.conn, "cycle_key = ?", (key,), maybe)
        if f is not None:
            stats = self.filters.stats
            stats.lookups += len(contact_ids)
            stats.certainly_new += len(contact_ids) - len(maybe)
            stats.confirmed_false_positives += len(maybe) - len(found)
        return found

    def put_plan(self, tenant_id: str, plan_json: str, at_us: int) -> None:
        self.conn.execute(
            "INSERT INTO plans (tenant_id, plan_json, updated_at_us) VALUES (?, ?, ?)"
            " ON CONFLICT (tenant_id) DO UPDATE SET plan_json = excluded.plan_json,"
            " updated_at_us = excluded.updated_at_us",
            (tenant_id, plan_json, at_us),
        )
        _remember(self._plans, tenant_id, StoredPlan(plan_json, at_us))
        latest = self.plan_at(tenant_id, at_us + 1)
        if latest is not None and latest.plan_json == plan_json:
            return
        self.conn.execute(
            "INSERT INTO plan_versions (tenant_id, effective_us, plan_json) VALUES (?, ?, ?)"
            " ON CONFLICT (tenant_id, effective_us) DO UPDATE SET plan_json = excluded.plan_json",
            (tenant_id, at_us, plan_json),
        )

    def put_reanchor(self, tenant_id: str, reanchor: Reanchor) -> None:
        self.conn.execute(
            "INSERT INTO reanchors (tenant_id, at_us, anchor_before_us) VALUES (?, ?, ?)"
            " ON CONFLICT (tenant_id, at_us) DO NOTHING",
            (tenant_id, reanchor.at_us, reanchor.anchor_before_us),
        )

    def put_file_entry(self, tenant_id: str, digest: str, at_us: int) -> None:
        self.conn.execute(
            "INSERT INTO tenant_file_entries (tenant_id, digest, applied_at_us) VALUES (?, ?, ?)"
            " ON CONFLICT (tenant_id) DO UPDATE SET digest = excluded.digest, applied_at_us = excluded.applied_at_us",
            (tenant_id, digest, at_us),
        )

    def put_holdings(self, tenant_id: str, holdings: Holdings) -> None:
        self.conn.execute(
            "INSERT INTO holdings (tenant_id, cycle_start_us, held, marketing, pending) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (tenant_id) DO UPDATE SET cycle_start_us = excluded.cycle_start_us,"
            " held = excluded.held, marketing = excluded.marketing, pending = excluded.pending",
            (tenant_id, holdings.cycle_start_us, holdings.held, holdings.marketing, holdings.pending),
        )

    def record_held(self, tenant_id: str, cycle_start_us: int, held: int, marketing: int) -> None:
        self.conn.execute(
            "INSERT INTO usage (tenant_id, cycle_start_us, active_contacts, sends, held_end, held_peak,"
            " marketing_end, marketing_peak) VALUES (?, ?, 0, 0, ?, ?, ?, ?)"
            " ON CONFLICT (tenant_id, cycle_start_us) DO UPDATE SET held_end = excluded.held_end,"
            " held_peak = MAX(held_peak, excluded.held_peak), marketing_end = excluded.marketing_end,"
            " marketing_peak = MAX(marketing_peak, excluded.marketing_peak)",
            (tenant_id, cycle_start_us, held, held, marketing, marketing),
        )
        self._counters.pop((tenant_id, cycle_start_us), None)

    def switch_marketing(self, tenant_id: str, due_us: int) -> int:
        return self.conn.execute(
            "UPDATE contacts SET marketing = 0, marketing_until_next_update = 0, marketing_until_us = 0"
            " WHERE tenant_id = ? AND marketing_until_us > 0 AND marketing_until_us <= ?",
            (tenant_id, due_us),
        ).rowcount

    def reschedule_marketing(self, tenant_id: str, until_us: int) -> None:
        self.conn.execute(
            "UPDATE contacts SET marketing_until_us = ? WHERE tenant_id = ? AND marketing_until_us > 0",
            (until_us, tenant_id),
        )

    def count_sends(self, tenant_id: str, cycle_start_us: int, sends: int) -> None:
        self._bump(tenant_id, cycle_start_us, 0, sends)

    def activate(self, tenant_id: str, cycle_start_us: int, activations: Sequence[Activation]) -> None:
        if not activations:
            return
        f = self._filter(tenant_id, cycle_start_us)
        key = self._key(tenant_id, cycle_start_us, create=True)
        code = self._code
        self.conn.executemany(
            "INSERT INTO cycle_activations (cycle_key, contact_id, activated_after_us, activity, sends)"
            " VALUES (?, ?, ?, ?, ?)",
            [(key, a.contact_id, a.activated_at_us - cycle_start_us, code(a.activity), a.sends) for a in activations],
        )
        self._added(f, tenant_id, cycle_start_us, [a.contact_id for a in activations])
        self._bump(tenant_id, cycle_start_us, len(activations), sum(a.sends for a in activations))

    def _added(self, f: CycleFilter | None, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str]) -> None:
        """Puts newly active contacts in the cycle's filter (and in any build of it); a
        filter that outgrew its size is built again bigger."""
        if f is not None:
            f.add_all(contact_ids)
            self.filters.touched((tenant_id, cycle_start_us))
            if len(f.layers) > 1:
                self.builds.request((tenant_id, cycle_start_us), f.items * 3 // 2)
        self.builds.record((tenant_id, cycle_start_us), contact_ids)

    def add_sends(self, tenant_id: str, cycle_start_us: int, contact_id: str, sends: int) -> None:
        key = self._key(tenant_id, cycle_start_us, create=False)
        changed = self.conn.execute(
            "UPDATE cycle_activations SET sends = sends + ? WHERE cycle_key = ? AND contact_id = ?",
            (sends, key, contact_id),
        ).rowcount
        if changed != 1:
            raise LookupError(f"no activation of {contact_id!r} to add sends to")
        self._bump(tenant_id, cycle_start_us, 0, sends)

    def send_to_new(
        self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str], at_us: int, activity: str
    ) -> None:
        if not contact_ids:
            return
        f = self._filter(tenant_id, cycle_start_us)
        key = self._key(tenant_id, cycle_start_us, create=True)
        offset, code = at_us - cycle_start_us, self._code(activity)
        self.conn.executemany(
            "INSERT INTO cycle_activations (cycle_key, contact_id, activated_after_us, activity, sends)"
            " VALUES (?, ?, ?, ?, 1)",
            zip(repeat(key), contact_ids, repeat(offset), repeat(code)),
        )
        self._added(f, tenant_id, cycle_start_us, contact_ids)
        self._bump(tenant_id, cycle_start_us, len(contact_ids), len(contact_ids))

    def send_to_active(self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str]) -> None:
        if not contact_ids:
            return
        key = self._key(tenant_id, cycle_start_us, create=False)
        if len(contact_ids) == 1:
            sql = "UPDATE cycle_activations SET sends = sends + 1 WHERE cycle_key = ? AND contact_id = ?"
            changed = self.conn.execute(sql, (key, contact_ids[0])).rowcount
        else:
            sql = (
                "UPDATE cycle_activations SET sends = sends + 1"
                " WHERE cycle_key = ? AND contact_id IN (SELECT value FROM json_each(?))"
            )
            changed = self.conn.execute(sql, (key, json.dumps(contact_ids))).rowcount
        if changed != len(contact_ids):
            raise LookupError(f"{len(contact_ids) - changed} of the contacts sent to are not active")
        self._bump(tenant_id, cycle_start_us, 0, len(contact_ids))

    def _bump(self, tenant_id: str, cycle_start_us: int, active: int, sends: int) -> None:
        self.conn.execute(
            "INSERT INTO usage (tenant_id, cycle_start_us, active_contacts, sends) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (tenant_id, cycle_start_us) DO UPDATE SET"
            " active_contacts = active_contacts + excluded.active_contacts, sends = sends + excluded.sends",
            (tenant_id, cycle_start_us, active, sends),
        )
        k = self._counters.get((tenant_id, cycle_start_us))
        if k is not None:
            self._counters[(tenant_id, cycle_start_us)] = Counters(
                k.active_contacts + active, k.sends + sends, k.held_end, k.held_peak, k.marketing_end, k.marketing_peak
            )

    def put_contacts(self, tenant_id: str, contacts: Iterable[ContactRecord], at_us: int) -> None:
        self.conn.executemany(
            "INSERT INTO contacts (tenant_id, contact_id, held, marketing, marketing_until_next_update,"
            " marketing_source_type, marketing_source_id, updated_at_us, marketing_until_us, held_since_us)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (tenant_id, contact_id) DO UPDATE SET held = excluded.held,"
            " marketing = excluded.marketing, marketing_until_next_update = excluded.marketing_until_next_update,"
            " marketing_source_type = excluded.marketing_source_type,"
            " marketing_source_id = excluded.marketing_source_id, updated_at_us = excluded.updated_at_us,"
            " marketing_until_us = excluded.marketing_until_us, held_since_us = excluded.held_since_us",
            [
                (
                    tenant_id,
                    c.contact_id,
                    int(c.held),
                    int(c.marketing),
                    int(c.marketing_until_next_update),
                    c.marketing_source_type,
                    c.marketing_source_id,
                    at_us,
                    c.marketing_until_us,
                    c.held_since_us,
                )
                for c in contacts
            ],
        )

    def store_result(self, tenant_id: str, rpc: str, request_id: str, result: StoredResult, at_us: int) -> None:
        assert result.context is not None
        self.conn.execute(
            "INSERT INTO request_replies (key, at_s, fingerprint, context, reply) VALUES (?, ?, ?, ?, ?)",
            (
                _request_key(tenant_id, rpc, request_id),
                at_us // 1_000_000,
                result.fingerprint,
                self._context(result.context, at_us),
                result.packed,
            ),
        )

    def _context(self, context: UsageContext, at_us: int) -> int:
        """The id of a usage context, stored the first time; its `used_us` kept within CONTEXT_REFRESH_US."""
        found = self._contexts.get(context)
        if found is not None and found[1] >= at_us - CONTEXT_REFRESH_US:
            return found[0]
        row = self.conn.execute(
            f"INSERT INTO usage_contexts ({_CONTEXT}, used_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            f" ON CONFLICT ({_CONTEXT}) DO UPDATE SET used_us = MAX(used_us, excluded.used_us)"
            " RETURNING id, used_us",
            (*astuple(context), at_us),
        ).fetchone()
        _remember(self._contexts, context, (row[0], row[1]))
        return row[0]

    def prune_results(self, before_us: int, limit: int) -> int:
        pruned = _prune_oldest(self.conn, "request_replies", "seq", "at_s", before_us // 1_000_000, limit)
        pruned += _prune_oldest(self.conn, "request_results", "rowid", "created_at_us", before_us, limit - pruned)
        if pruned < limit:
            unused = "DELETE FROM usage_contexts WHERE used_us < ?"
            if self.conn.execute(unused, (before_us - CONTEXT_REFRESH_US,)).rowcount:
                self._contexts.clear()
        return pruned

    def prune_events(self, before_us: int, through_seq: int, limit: int) -> int:
        return self.conn.execute(
            "DELETE FROM usage_events WHERE seq IN (SELECT seq FROM usage_events WHERE seq <= ? ORDER BY seq LIMIT ?)"
            " AND at_us < ?",
            (through_seq, limit, before_us),
        ).rowcount

    def prune_audit(self, before_us: int, limit: int) -> int:
        deleted = _prune_oldest(self.conn, "audit", "seq", "at_us", before_us, limit)
        if deleted:
            self.conn.execute(
                "INSERT INTO audit_pruned (id, before_us) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET before_us = MAX(before_us, excluded.before_us)",
                (before_us,),
            )
        return deleted

    def put_notice(self, tenant_id: str, figure: UsageFigure, state: NoticeState) -> None:
        self.conn.execute(
            "INSERT INTO notices (tenant_id, figure, level, cycle_start_us, last_at_us) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (tenant_id, figure) DO UPDATE SET level = excluded.level,"
            " cycle_start_us = excluded.cycle_start_us, last_at_us = excluded.last_at_us",
            (tenant_id, figure.value, state.level, state.cycle_start_us, state.last_at_us),
        )

    def add_event(self, event: UsageEvent) -> int:
        cursor = self.conn.execute(
            "INSERT INTO usage_events (event_id, at_us, tenant_id, type, figure, threshold, usage_json)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                event.event_id,
                event.at_us,
                event.tenant_id,
                event.type.value,
                event.figure.value,
                event.threshold,
                json.dumps(event.usage.to_dict(), separators=(",", ":")),
            ),
        )
        return cursor.lastrowid or 0

    def put_event_cursor(self, consumer: str, seq: int) -> None:
        self.conn.execute(
            "INSERT INTO event_cursors (consumer, seq) VALUES (?, ?)"
            " ON CONFLICT (consumer) DO UPDATE SET seq = MAX(seq, excluded.seq)",
            (consumer, seq),
        )

    def audit(self, entries: Iterable[AuditEntry]) -> None:
        self.conn.executemany(
            "INSERT INTO audit (at_us, tenant_id, cycle_start_us, rpc, request_id, contact_id, decision,"
            " reason, active_delta, sends_delta, held_delta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    e.at_us,
                    e.tenant_id,
                    e.cycle_start_us,
                    e.rpc,
                    e.request_id,
                    e.contact_id,
                    e.decision,
                    e.reason,
                    e.active_delta,
                    e.sends_delta,
                    e.held_delta,
                )
                for e in entries
            ],
        )


class _Stop:
    pass


class _Wake:
    """Wakes the writer thread for units a caller's own commit set aside."""


FileId = tuple[int, int]


def _file_id(path: Path | str) -> FileId | None:
    """The (device, inode) naming a file, or None when nothing is at `path`."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hold(path: Path) -> int:
    """An open descriptor of the ledger file at `path` (created when missing) with an
    exclusive flock on it. The lock is on the file, not on a name, so a second sidecar
    reaching it through a symlink or a hard link meets it too. flock locks belong to
    the open file description and never touch the POSIX byte-range locks SQLite takes
    on the same file, so they neither conflict nor get dropped with them.

    Two sidecars creating the file at once open the same new file (O_CREAT alone) and
    one of them gets the lock. A name given to another file between the open and the
    lock (the holder writing the ledger back) is opened again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.fstat(fd)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LedgerUnavailable(f"ledger {path} is in use by {holder}") from None
        except OSError:
            os.close(fd)
            raise
        if _file_id(path) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)


def _holder(fd: int) -> str:
    """Who holds the flock on the file open at `fd`, from Linux's /proc/locks
    ("N: FLOCK ADVISORY WRITE pid major:minor:inode ...", device numbers in hex)."""
    st = os.fstat(fd)
    file = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                # A pid of 0 is a holder outside this process's pid namespace.
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == file and fields[4].isdigit():
                    if int(fields[4]) > 0:
                        return f"another sidecar (pid {fields[4]})"
    except OSError:
        pass
    return "another sidecar"


def _leave_legacy_lock(path: Path) -> None:
    """Earlier releases locked a `.lock` file beside the ledger instead of the ledger. One
    still running on this path (an upgrade under way) holds that lock, and this sidecar
    stays off; a lock file nobody holds is removed, so none is left beside the ledger."""
    legacy = Path(f"{path}.lock")
    try:
        fd = os.open(legacy, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LedgerUnavailable(f"ledger {path} is in use by {_holder(fd)}, through {legacy.name}") from None
        legacy.unlink(missing_ok=True)
    finally:
        os.close(fd)


_STOP = _Stop()
_WAKE = _Wake()
Unit = tuple[Callable[[LedgerTx], Any], Future[Any], int]
CommitObserver = Callable[[float, int, bool], None]


class SQLiteLedger(Ledger):
    """The embedded default ledger in one SQLite file (WAL mode)."""

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: str = "FULL",
        max_batch: int = 1024,
        filter_fp_rate: float = 0.001,
        on_commit: CommitObserver | None = None,
        on_ready: Callable[[bool], None] | None = None,
        check_interval: float = 0.5,
    ) -> None:
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.max_batch = max_batch
        self.filters = DedupeFilters(filter_fp_rate)
        self.on_commit = on_commit
        self.on_ready = on_ready
        self.check_interval = check_interval
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._local = threading.local()
        self._state = threading.Lock()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._open = False
        self._failing = False
        self._builds = _Builds(self.filters)
        self._writing = threading.Lock()
        self._tx: _Tx | None = None
        self._signals = 0
        self._held = 0
        self._aside: list[Unit] = []
        self._builder: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._watch_stop = threading.Event()
        self._files: tuple[FileId | None, FileId | None] = (None, None)
        self._generation = 0
        self._wal = Path(f"{self.path}-wal")
        self._time_us = 0

    @property
    def time_us(self) -> int:
        return self._time_us

    @property
    def ready(self) -> bool:
        return self._open and not self._failing

    def _set_failing(self, failing: bool, why: object = None) -> None:
        if failing == self._failing:
            return
        self._failing = failing
        if failing:
            log.error("ledger commits fail, calls that write get UNAVAILABLE: %s", why)
        else:
            log.warning("ledger commits succeed again")
        if self.on_ready is not None:
            self.on_ready(not failing)

    def _connect(self) -> sqlite3.Connection:
        """A connection to the existing ledger file (never creates one: a file removed
        underneath is written back by the writer, not replaced by an empty one)."""
        uri = f"file:{urllib.parse.quote(str(self.path))}?mode=rw"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA busy_timeout = 30000")
        return conn

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _hold(self.path)
        except OSError as exc:
            raise LedgerUnavailable(f"ledger {self.path} cannot be opened: {exc}") from None
        try:
            _leave_legacy_lock(self.path)
            if os.fstat(self._lock_fd).st_size == 0:
                # A new file: its name is made durable before anything is committed into it.
                _sync_dir(Path(os.path.realpath(self.path)).parent)
            migrate(self.path)
            self._conn = self._connect()
            self._tx = _Tx(self._conn, self.filters, self._builds)
            self._time_us = self._conn.execute("SELECT COALESCE(MAX(at_us), 0) FROM ledger_time").fetchone()[0]
            self._verify()
            self._request_filters()
            self._files = self._files_now()
        except LedgerUnavailable:
            self._let_go()
            raise
        except (ValueError, OSError, sqlite3.Error) as exc:
            self._let_go()
            raise LedgerUnavailable(f"ledger {self.path} cannot be opened: {exc}") from None
        self._open = True
        self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
        self._writer.start()
        self._builder = threading.Thread(target=self._build_loop, name="filter-builder", daemon=True)
        self._builder.start()
        self._watch_stop.clear()
        self._watcher = threading.Thread(target=self._watch_loop, name="ledger-watch", daemon=True)
        self._watcher.start()

    def _let_go(self) -> None:
        """Closes the writer's connection, then the locked descriptor: last, since closing
        any descriptor of the file drops the POSIX locks SQLite holds on it."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _verify(self) -> None:
        """Refuses a ledger whose current figures (each tenant's latest cycle and its
        holdings) disagree with their rows: served, they would allow and bill from a
        wrong count. Logs each tenant's mismatches (the first STARTUP_TENANTS_LOGGED)."""
        assert self._conn is not None
        started = time.perf_counter()
        self._conn.execute("BEGIN")
        try:
            found = find_mismatches(self._conn, every_cycle=False)
        finally:
            self._conn.execute("COMMIT")
        log.info("ledger figures checked against their rows in %.2f s", time.perf_counter() - started)
        if not found:
            return
        tenants: dict[str, list[Mismatch]] = {}
        for m in found:
            tenants.setdefault(m.tenant_id, []).append(m)
        for tenant_id, mismatches in list(tenants.items())[:STARTUP_TENANTS_LOGGED]:
            log.error(
                "ledger figures of tenant %r disagree with their rows: %s",
                tenant_id,
                "; ".join(m.describe() for m in mismatches),
            )
        names = ", ".join(repr(t) for t in list(tenants)[:STARTUP_TENANTS_LOGGED])
        more = len(tenants) - STARTUP_TENANTS_LOGGED
        if more > 0:
            log.error("and %d more tenants whose figures disagree with their rows", more)
            names += f" and {more} more"
        raise ValueError(
            f"the stored figures of tenant {names} disagree with their rows; run"
            f" `quota-sidecar verify --ledger sqlite:///{self.path}` to list every mismatch,"
            " and with --repair to recompute the figures from the rows"
        )

    def _files_now(self) -> tuple[FileId | None, FileId | None]:
        return _file_id(self.path), _file_id(self._wal)

    def _displaced(self) -> bool:
        """Whether the ledger file, or its WAL, is no longer the one the writer holds."""
        db, wal = self._files_now()
        return db != self._files[0] or (self._files[1] is not None and wal != self._files[1])

    def _watch_loop(self) -> None:
        """While commits fail, tries a small write every check_interval seconds;
        writes the ledger back when its file was removed, even when no call comes."""
        while not self._watch_stop.wait(self.check_interval):
            if not (self._failing or self._displaced()):
                continue
            with self._writing:
                if not self._open:
                    return
                problem = self._restore() if self._displaced() else None
                if problem is not None:
                    self._set_failing(True, problem)
                    continue
                if self._failing:
                    self._probe()

    def _probe(self) -> None:
        """Under the writing lock: one small committed write, to learn whether the store takes writes."""
        assert self._conn is not None
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT OR REPLACE INTO ledger_checks (id, checked_at_us) VALUES (1, ?)", (time.time_ns() // 1000,)
            )
            conn.execute("COMMIT")
        except sqlite3.Error:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            return
        self._set_failing(False)

    def _restore(self) -> str | None:
        """Under the writing lock: writes the whole ledger, as the writer's connection
        still sees it, back to its path after the file or its WAL was removed, and
        moves every connection to the new file; returns why it could not. Refuses when
        another file now sits at the path: that may be an operator's restore, and is
        not overwritten."""
        assert self._conn is not None and self._tx is not None
        found = _file_id(self.path)
        if found is not None and found != self._files[0]:
            return f"ledger {self.path} was replaced by another file underneath the sidecar; restart to use that file"
        spare = self.path.with_name(self.path.name + ".restoring")
        try:
            spare.unlink(missing_ok=True)
            # Locked before it takes the ledger's name, so no second sidecar gets in between.
            fd = _hold(spare)
            try:
                target = sqlite3.connect(spare)
                try:
                    self._conn.backup(target)
                finally:
                    target.close()
                for leftover in (self._wal, Path(f"{self.path}-shm")):
                    leftover.unlink(missing_ok=True)
                os.replace(spare, self.path)
                _sync_dir(self.path.parent)
                conn = self._connect()
                conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            except BaseException:
                os.close(fd)
                raise
        except (OSError, sqlite3.Error, LedgerUnavailable) as exc:
            return f"ledger {self.path} was removed underneath the sidecar and cannot be written back yet: {exc}"
        old, self._conn = self._conn, conn
        self._tx.conn = conn
        old.close()
        # The removed file has no name left to reach it by: the lock moves to the new one.
        assert self._lock_fd is not None
        os.close(self._lock_fd)
        self._lock_fd = fd
        self._generation += 1
        self._files = self._files_now()
        log.warning("ledger %s was removed underneath the sidecar; written back whole from the open ledger", self.path)
        return None

    def _request_filters(self) -> None:
        """Asks for the filter of every tenant's latest cycle, biggest first."""
        assert self._conn is not None
        latest = self._conn.execute(
            "SELECT tenant_id, cycle_start_us, active_contacts FROM usage u WHERE cycle_start_us ="
            " (SELECT MAX(cycle_start_us) FROM usage WHERE tenant_id = u.tenant_id) ORDER BY active_contacts DESC"
        ).fetchall()
        for tenant_id, cycle_start_us, _ in latest:
            self._builds.request((tenant_id, cycle_start_us), 0)
        self._builds.dispatch()

    @property
    def queued_units(self) -> int:
        """Units of work waiting for the writer."""
        with self._state:
            return self._queue.qsize() - self._signals + self._held + len(self._aside)

    def _build_loop(self) -> None:
        conn = self._connect()
        generation = self._generation
        try:
            while True:
                asked = self._builds.asked.get()
                if asked is None:
                    return
                if generation != self._generation:
                    try:
                        fresh = self._connect()
                    except sqlite3.Error:
                        pass
                    else:
                        conn.close()
                        conn, generation = fresh, self._generation
                for start in range(0, len(asked), BUILDS_PER_READ):
                    self._build_some(conn, asked[start : start + BUILDS_PER_READ])
        finally:
            conn.close()

    def _build_some(self, conn: sqlite3.Connection, asked: list[tuple[tuple[str, int], int, int]]) -> None:
        """Builds filters and hands them to the writer in one install: small cycles in
        one read transaction, a big one in chunks of rows, each in a transaction of its
        own, so no snapshot is held long enough to keep the WAL from being checkpointed
        (a contact committed between chunks is in a later chunk or in the record)."""
        built: list[tuple[tuple[str, int], CycleFilter | None, int]] = []
        try:
            conn.execute("BEGIN")
            try:
                sizes = [(key, capacity, generation, _cycle_size(conn, key)) for key, capacity, generation in asked]
                small = [entry for entry in sizes if entry[3][1] <= ROWS_PER_READ]
                for key, capacity, generation, (cycle_key, count) in small:
                    f = self.filters.sized(max(capacity, count * 5 // 4))
                    if cycle_key is not None:
                        rows = conn.execute(
                            "SELECT contact_id FROM cycle_activations WHERE cycle_key = ?", (cycle_key,)
                        )
                        f.add_all([r[0] for r in rows])
                    built.append((key, f, generation))
            finally:
                conn.execute("COMMIT")
            for key, capacity, generation, (cycle_key, count) in sizes:
                if count > ROWS_PER_READ:
                    size = max(capacity, count * 5 // 4)
                    big = self.filters.sized(size) if cycle_key is None else self._build_big(conn, cycle_key, size)
                    built.append((key, big, generation))
        except sqlite3.Error as exc:
            log.warning("building dedupe filters failed (%s); their contacts are confirmed in the ledger", exc)
            done = {key for key, _, _ in built}
            built += [(key, None, generation) for key, _, generation in asked if key not in done]
        for start in range(0, len(built), INSTALLS_PER_UNIT):
            install = _Install(self, built[start : start + INSTALLS_PER_UNIT])
            with self._state:
                if not self._open:
                    return
                self._signals += 1
                self._queue.put(install)
            while not install.done.wait(self.check_interval):
                if not self._open:
                    return

    def _build_big(self, conn: sqlite3.Connection, cycle_key: int, capacity: int) -> CycleFilter:
        f = self.filters.sized(capacity)
        after = ""
        while True:
            conn.execute("BEGIN")
            try:
                chunk = conn.execute(
                    "SELECT contact_id FROM cycle_activations WHERE cycle_key = ? AND contact_id > ?"
                    " ORDER BY contact_id LIMIT ?",
                    (cycle_key, after, ROWS_PER_READ),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
            if not chunk:
                return f
            f.add_all([r[0] for r in chunk])
            after = chunk[-1][0]

    def close(self) -> None:
        with self._state:
            if not self._open:
                return
            self._open = False
            self._queue.put(_STOP)
        self._watch_stop.set()
        if self._writer is not None:
            self._writer.join()
        if self._watcher is not None:
            self._watcher.join()
        with self._writing:
            self._tx = None
        self._builds.asked.put(None)
        if self._builder is not None:
            self._builder.join()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
            self._local = threading.local()
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                log.warning("WAL checkpoint at close failed; the WAL is replayed at next open")
        self._let_go()
        log.info("ledger flushed and closed")

    def transact(self, work: Callable[[LedgerTx], T], *, weight: int = 1) -> T:
        """Runs `work` in a committed transaction. A caller that finds no commit under
        way and no unit waiting commits itself; otherwise its unit waits in the queue
        for the writer thread's next group commit. `weight`: about
        how many contacts (or tenants) the unit writes, so heavy units share no
        transaction with each other beyond COMMIT_WEIGHT."""
        work = within_deadline(work)
        future: Future[T] = Future()
        unit = (work, future, weight)
        with self._state:
            if not self._open:
                raise LedgerUnavailable("the ledger is not open")
            # Leads only when no other unit waits: a caller committing unit after unit
            # would otherwise win the writing lock again and again over the writer
            # thread holding another caller's unit.
            waiting = self._held or self._aside or not self._queue.empty()
            leading = not waiting and self._writing.acquire(blocking=False)
            if not leading:
                self._queue.put(unit)
        if leading:
            try:
                stopping = self._commit_queued([], unit)
                if stopping or self._aside:
                    with self._state:
                        self._signals += 0 if stopping else 1
                        self._queue.put(_STOP if stopping else _WAKE)
            finally:
                self._writing.release()
        return future.result()

    def read(self, work: Callable[[LedgerReader], T]) -> T:
        if not self._open:
            raise LedgerUnavailable("the ledger is not open")
        conn = getattr(self._local, "conn", None)
        try:
            if conn is not None and self._local.generation != self._generation:
                with self._readers_lock:
                    self._readers.remove(conn)
                conn.close()
                conn = None
            if conn is None:
                generation = self._generation
                conn = self._connect()
                with self._readers_lock:
                    self._readers.append(conn)
                self._local.conn = conn
                self._local.generation = generation
            conn.execute("BEGIN")
            try:
                return work(_Reader(conn))
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"the ledger cannot be read: {exc}") from exc

    def _write_loop(self) -> None:
        """Commits what callers queued while another commit was under way, and the
        units set aside by the last transaction (also after the stop, before closing)."""
        stopping = False
        while not stopping or self._aside:
            try:
                item = self._queue.get(block=not (stopping or self._aside))
            except queue.Empty:
                item = None
            held = isinstance(item, tuple)
            with self._state:
                if held:
                    self._held = 1
                elif isinstance(item, (_Install, _Wake)):
                    self._signals -= 1
            with self._writing:
                if held:
                    with self._state:
                        self._held = 0
                stopping = self._commit_queued([], item) or stopping

    def _commit_queued(self, batch: list[tuple[Callable[[LedgerTx], Any], Future[Any]]], item: Any = None) -> bool:
        """Under the writing lock: takes the units set aside by the last transaction, then
        `item` and queued units (up to max_batch), installs built filters met on the
        way, commits them as one transaction. Heavy units beyond COMMIT_WEIGHT are set
        aside for the next one. Returns whether the stop was met."""
        stopping = False
        heavy = 0
        aside, self._aside = self._aside, []
        waiting = [u for u in aside if u[2] <= SMALL_UNIT] + [u for u in aside if u[2] > SMALL_UNIT] + [item]
        for met in itertools.chain(waiting, self._drained(batch)):
            if met is _STOP:
                stopping = True
            elif isinstance(met, _Install):
                met()
            elif isinstance(met, tuple):
                heavy = self._take(batch, met, heavy)
        if batch:
            assert self._tx is not None
            self._commit(self._tx, batch)
        return stopping

    def _drained(self, batch: list[tuple[Callable[[LedgerTx], Any], Future[Any]]]) -> Iterator[Any]:
        """Items taken from the queue while the transaction has room, up to the stop."""
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, (_Install, _Wake)):
                with self._state:
                    self._signals -= 1
            yield item
            if item is _STOP:
                return

    def _take(self, batch: list[tuple[Callable[[LedgerTx], Any], Future[Any]]], unit: Unit, heavy: int) -> int:
        """Adds the unit to the transaction or sets it aside for the next. A transaction
        holds light units, or heavy ones weighing up to COMMIT_WEIGHT together (one at
        least), whichever it meets first. `heavy` and the result: the weight of its
        heavy units, -1 when it holds light ones, 0 when it is empty."""
        work, future, weight = unit
        if weight <= SMALL_UNIT:
            fits, after = heavy <= 0, -1
        else:
            fits, after = heavy == 0 or 0 < heavy <= COMMIT_WEIGHT - weight, max(heavy, 0) + weight
        if not fits:
            self._aside.append(unit)
            return heavy
        batch.append((work, future))
        return after

    def _commit(self, tx: _Tx, batch: list[tuple[Callable[[LedgerTx], Any], Future[Any]]]) -> None:
        problem = self._restore() if self._displaced() else None
        if problem is not None:
            self._fail(batch, problem)
            return
        conn = tx.conn
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            changes = conn.total_changes
            tx.noted_us = self._time_us
            alone = len(batch) == 1
            for work, future in batch:
                if not alone:
                    conn.execute("SAVEPOINT unit")
                mark, noted = len(tx.committed), tx.noted_us
                try:
                    result = work(tx)
                except BaseException as exc:
                    if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                        raise
                    conn.execute("ROLLBACK" if alone else "ROLLBACK TO unit")
                    if not alone:
                        conn.execute("RELEASE unit")
                    del tx.committed[mark:]
                    tx.noted_us = noted
                    tx.forget()
                    outcomes.append((future, None, exc))
                    continue
                if not alone:
                    conn.execute("RELEASE unit")
                outcomes.append((future, result, None))
            if conn.in_transaction:
                stamped = self._stamp(tx, changes)
                conn.execute("COMMIT")
                self._time_us = max(self._time_us, stamped)
        except sqlite3.Error as exc:
            tx.committed.clear()
            tx.forget()
            self._abort(conn, batch, exc)
            return
        problem = self._restore() if self._displaced() else None
        if problem is not None:
            tx.committed.clear()
            tx.forget()
            self._fail(batch, problem)
            return
        self._builds.dispatch()
        callbacks, tx.committed = tx.committed, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("a callback after a ledger commit failed")
        self._set_failing(False)
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, len(batch), True)
        for future, result, error in outcomes:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _stamp(self, tx: _Tx, changes: int) -> int:
        """Inside the commit: moves the stored ledger time to the latest instant the
        batch's committed units noted, when the batch wrote anything (a batch that
        only read, a retry answered from its stored result, leaves the file as it
        was); returns it."""
        if tx.noted_us <= self._time_us or tx.conn.total_changes == changes:
            return self._time_us
        tx.conn.execute(
            "INSERT INTO ledger_time (id, at_us) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at_us = excluded.at_us",
            (tx.noted_us,),
        )
        return tx.noted_us

    def _abort(self, conn: sqlite3.Connection, batch: list[tuple[Any, Future[Any]]], exc: sqlite3.Error) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("rollback after a failed commit failed")
        self._fail(batch, f"the ledger cannot commit: {exc}")

    def _fail(self, batch: list[tuple[Any, Future[Any]]], why: str) -> None:
        """Answers every unit of a commit that did not happen with UNAVAILABLE."""
        self.filters.forget()
        self._builds.abandon()
        self._set_failing(True, why)
        if self.on_commit is not None:
            self.on_commit(0.0, len(batch), False)
        error = LedgerUnavailable(why)
        for _, future in batch:
            future.set_exception(error)


__all__ = ["SQLiteLedger", "migrate", "sqlite_path"]
