"""The SQLite ledger's schema: every step from an empty file to SCHEMA_VERSION, and `migrate`.

A step is a function of one open transaction; `migrate` runs each in its own
`BEGIN IMMEDIATE` with the version number it reaches, so a ledger is always at one
version or the next. Steps are never edited once released: a ledger an earlier
release left is brought forward by the same steps it would have met.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

from ...domain.cycles import cycle_at
from .. import HELD_SPANS_KEPT_US, HELD_SPANS_PER_CONTACT


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


def _keep_leases(db: sqlite_utils.Database) -> None:
    """Named leases (the webhook's delivery, the reminder sweep): who last held each and
    until when. The only writer of its file holds every lease it asks for."""
    db.execute("CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_us INTEGER NOT NULL)")


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
    _keep_leases,
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
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise ValueError(f"ledger {path} has schema version {version}, newer than this sidecar's {SCHEMA_VERSION}")
    return version
