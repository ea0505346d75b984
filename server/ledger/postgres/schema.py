"""The PostgreSQL ledger's schema and its migrations, run by the sidecar itself.

The schema lives in the connection's current schema (the first of its `search_path`),
so one database can hold several ledgers side by side. `ledger_schema` holds the
version; each step of MIGRATIONS runs in one transaction that also sets the version
it reaches, so a sidecar killed at any point leaves the schema at one version or the
next. The steps are serialized by a transaction-level advisory lock named after the
schema: sidecars starting at once on an empty database wait for each other, read the
version again under the lock and find the step done.

Every table a tenant's work writes is keyed by `tenant_id` first, so the ledger can be
distributed by tenant (Citus: `create_distributed_table(t, 'tenant_id')` for each of
them, colocated). A unit of the data plane touches one tenant's rows only. The few
rows that are not a tenant's (`ledger_schema`, `event_sequence`, `event_cursors`,
`ledger_time`, `audit_pruned`, `leases`) are small, written rarely, and would be reference or
local tables. Text keys use the "C" collation: listings page by contact id in the byte
order of their UTF-8 (code point order), as the SQLite ledger does, whatever the
database's default collation.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg

from .. import HELD_SPANS_KEPT_US, HELD_SPANS_PER_CONTACT

Step = Callable[[psycopg.Connection], None]

_KEY = 'TEXT COLLATE "C" NOT NULL'


def _ledger(conn: psycopg.Connection) -> None:
    """The ledger's tables as the SQLite ledger's latest schema holds them, one row per
    fact (no compaction yet), plus `tenants`: one row per tenant that every unit of work
    locks before it reads the tenant's figures, and that keeps the tenant's ledger time."""
    for statement in (
        f"CREATE TABLE tenants (tenant_id {_KEY} PRIMARY KEY, time_us BIGINT NOT NULL DEFAULT 0)",
        f"CREATE TABLE plans (tenant_id {_KEY} PRIMARY KEY, plan_json TEXT NOT NULL, updated_at_us BIGINT NOT NULL)",
        f"CREATE TABLE plan_versions (tenant_id {_KEY}, effective_us BIGINT NOT NULL, plan_json TEXT NOT NULL,"
        " PRIMARY KEY (tenant_id, effective_us))",
        f"CREATE TABLE reanchors (tenant_id {_KEY}, at_us BIGINT NOT NULL, anchor_before_us BIGINT NOT NULL,"
        " PRIMARY KEY (tenant_id, at_us))",
        f"CREATE TABLE tenant_file_entries (tenant_id {_KEY} PRIMARY KEY, digest TEXT NOT NULL,"
        " applied_at_us BIGINT NOT NULL)",
        f"CREATE TABLE holdings (tenant_id {_KEY} PRIMARY KEY, cycle_start_us BIGINT NOT NULL, held BIGINT NOT NULL,"
        " marketing BIGINT NOT NULL, pending BIGINT NOT NULL)",
        f"CREATE TABLE usage (tenant_id {_KEY}, cycle_start_us BIGINT NOT NULL,"
        " active_contacts BIGINT NOT NULL DEFAULT 0, sends BIGINT NOT NULL DEFAULT 0,"
        " held_end BIGINT NOT NULL DEFAULT 0, held_peak BIGINT NOT NULL DEFAULT 0,"
        " marketing_end BIGINT NOT NULL DEFAULT 0, marketing_peak BIGINT NOT NULL DEFAULT 0,"
        " PRIMARY KEY (tenant_id, cycle_start_us))",
        f"CREATE TABLE activations (tenant_id {_KEY}, cycle_start_us BIGINT NOT NULL, contact_id {_KEY},"
        " activated_at_us BIGINT NOT NULL, activity TEXT NOT NULL, sends BIGINT NOT NULL,"
        " PRIMARY KEY (tenant_id, cycle_start_us, contact_id))",
        f"CREATE TABLE contacts (tenant_id {_KEY}, contact_id {_KEY}, held BOOLEAN NOT NULL,"
        " marketing BOOLEAN NOT NULL, marketing_until_next_update BOOLEAN NOT NULL,"
        " marketing_source_type TEXT NOT NULL DEFAULT '', marketing_source_id TEXT NOT NULL DEFAULT '',"
        " updated_at_us BIGINT NOT NULL, marketing_until_us BIGINT NOT NULL DEFAULT 0,"
        " held_since_us BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (tenant_id, contact_id))",
        f"CREATE TABLE held_spans (tenant_id {_KEY}, marketing BOOLEAN NOT NULL, contact_id {_KEY},"
        " from_us BIGINT NOT NULL, to_us BIGINT, PRIMARY KEY (tenant_id, marketing, contact_id, from_us))",
        f"CREATE TABLE request_results (tenant_id {_KEY}, rpc TEXT NOT NULL, request_id TEXT NOT NULL,"
        " fingerprint BYTEA NOT NULL, reply BYTEA NOT NULL, cycle_start_us BIGINT NOT NULL,"
        " cycle_end_us BIGINT NOT NULL, contact_limit BIGINT NOT NULL, sends_limit BIGINT NOT NULL,"
        " currency TEXT NOT NULL, plan_name TEXT NOT NULL, created_at_us BIGINT NOT NULL,"
        " PRIMARY KEY (tenant_id, rpc, request_id))",
        "CREATE INDEX request_results_age ON request_results (created_at_us)",
        f"CREATE TABLE audit (tenant_id {_KEY}, seq BIGINT GENERATED ALWAYS AS IDENTITY, at_us BIGINT NOT NULL,"
        " cycle_start_us BIGINT NOT NULL, rpc TEXT NOT NULL, request_id TEXT, contact_id TEXT,"
        " decision TEXT NOT NULL, reason TEXT NOT NULL, active_delta BIGINT, sends_delta BIGINT,"
        " held_delta BIGINT, PRIMARY KEY (tenant_id, seq))",
        "CREATE INDEX audit_seq ON audit (seq)",
        "CREATE TABLE audit_pruned (id INTEGER PRIMARY KEY CHECK (id = 1), before_us BIGINT NOT NULL)",
        f"CREATE TABLE notices (tenant_id {_KEY}, figure INTEGER NOT NULL, level DOUBLE PRECISION NOT NULL,"
        " cycle_start_us BIGINT NOT NULL, last_at_us BIGINT NOT NULL, PRIMARY KEY (tenant_id, figure))",
        f"CREATE TABLE usage_events (tenant_id {_KEY}, seq BIGINT NOT NULL, event_id TEXT NOT NULL,"
        " at_us BIGINT NOT NULL, type INTEGER NOT NULL, figure INTEGER NOT NULL,"
        " threshold DOUBLE PRECISION NOT NULL, usage_json TEXT NOT NULL, PRIMARY KEY (tenant_id, seq),"
        " UNIQUE (tenant_id, event_id))",
        "CREATE INDEX usage_events_seq ON usage_events (seq)",
        "CREATE TABLE event_sequence (id INTEGER PRIMARY KEY CHECK (id = 1), last BIGINT NOT NULL)",
        "INSERT INTO event_sequence (id, last) VALUES (1, 0)",
        f"CREATE TABLE event_cursors (consumer {_KEY} PRIMARY KEY, seq BIGINT NOT NULL)",
        "CREATE TABLE ledger_time (id INTEGER PRIMARY KEY CHECK (id = 1), at_us BIGINT NOT NULL)",
    ):
        conn.execute(statement)
    _keep_held_spans(conn)


def _keep_held_spans(conn: psycopg.Connection) -> None:
    """The held spans of each contact, written by triggers on `contacts` in the statement
    that changes the contact, whatever path changes it (a contact change, or the MK-6
    switch, which ends a marketing span at the switch instant): the same rules as the
    SQLite ledger's triggers, statement for statement. A span that ended at the instant
    it opens again is reopened; opening a span prunes the contact's spans
    (HELD_SPANS_KEPT_US, HELD_SPANS_PER_CONTACT). The functions keep the search path they
    were created under, so they reach this ledger's tables whoever fires them."""
    contact = "tenant_id = NEW.tenant_id AND contact_id = NEW.contact_id"

    def keep_latest(marketing: str) -> str:
        span = f"{contact} AND marketing = {marketing}"
        return (
            f"DELETE FROM held_spans WHERE {span} AND from_us < (SELECT from_us FROM held_spans"
            f" WHERE {span} ORDER BY from_us DESC LIMIT 1 OFFSET {HELD_SPANS_PER_CONTACT - 1});"
        )

    conn.execute(
        "CREATE FUNCTION contacts_held_spans_insert() RETURNS trigger LANGUAGE plpgsql"
        " SET search_path FROM CURRENT AS $$ BEGIN"
        " INSERT INTO held_spans VALUES (NEW.tenant_id, false, NEW.contact_id, NEW.held_since_us, NULL);"
        " IF NEW.marketing THEN"
        " INSERT INTO held_spans VALUES (NEW.tenant_id, true, NEW.contact_id, NEW.updated_at_us, NULL);"
        " END IF; RETURN NULL; END $$"
    )
    conn.execute(
        "CREATE TRIGGER contacts_held_spans_insert AFTER INSERT ON contacts FOR EACH ROW WHEN (NEW.held)"
        " EXECUTE FUNCTION contacts_held_spans_insert()"
    )
    conn.execute(
        "CREATE FUNCTION contacts_held_spans_update() RETURNS trigger LANGUAGE plpgsql"
        " SET search_path FROM CURRENT AS $$"
        " DECLARE opens_held boolean := NOT OLD.held AND NEW.held;"
        " opens_marketing boolean := NOT (OLD.held AND OLD.marketing) AND NEW.held AND NEW.marketing;"
        " BEGIN"
        " IF OLD.held AND NOT NEW.held THEN"
        f" UPDATE held_spans SET to_us = NEW.updated_at_us WHERE {contact} AND NOT marketing AND to_us IS NULL;"
        " END IF;"
        " IF OLD.held AND OLD.marketing AND NOT (NEW.held AND NEW.marketing) THEN"
        " UPDATE held_spans SET to_us = CASE WHEN NEW.held AND OLD.marketing_until_us > 0"
        f" THEN OLD.marketing_until_us ELSE NEW.updated_at_us END WHERE {contact} AND marketing AND to_us IS NULL;"
        " END IF;"
        " IF opens_held THEN"
        f" DELETE FROM held_spans WHERE {contact} AND NOT marketing AND from_us = NEW.held_since_us;"
        " INSERT INTO held_spans VALUES (NEW.tenant_id, false, NEW.contact_id, NEW.held_since_us, NULL);"
        " END IF;"
        " IF opens_marketing THEN"
        f" DELETE FROM held_spans WHERE {contact} AND marketing AND from_us = NEW.updated_at_us;"
        " INSERT INTO held_spans VALUES (NEW.tenant_id, true, NEW.contact_id, NEW.updated_at_us, NULL);"
        " END IF;"
        " IF opens_held OR opens_marketing THEN"
        f" DELETE FROM held_spans WHERE {contact} AND to_us < NEW.updated_at_us - {HELD_SPANS_KEPT_US};"
        " END IF;"
        f" IF opens_held THEN {keep_latest('false')} END IF;"
        f" IF opens_marketing THEN {keep_latest('true')} END IF;"
        " RETURN NULL; END $$"
    )
    conn.execute(
        "CREATE TRIGGER contacts_held_spans_update AFTER UPDATE OF held, marketing ON contacts FOR EACH ROW"
        " WHEN (OLD.held <> NEW.held OR (OLD.held AND OLD.marketing) <> (NEW.held AND NEW.marketing))"
        " EXECUTE FUNCTION contacts_held_spans_update()"
    )


def _keep_leases(conn: psycopg.Connection) -> None:
    """Named leases, held by one sidecar of the fleet at a time (the webhook's delivery, the
    reminder sweep) until `expires_us` on the database's clock."""
    conn.execute(f"CREATE TABLE leases (name {_KEY} PRIMARY KEY, holder TEXT NOT NULL, expires_us BIGINT NOT NULL)")


# Each step runs inside the one transaction migrate() opens for it, which it must not end,
# so that the step and its version number commit together.
MIGRATIONS: list[Step] = [_ledger, _keep_leases]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: psycopg.Connection, target: int | None = None) -> int:
    """Brings the schema of `conn`'s current schema to `target` (SCHEMA_VERSION when not
    given); returns the version found. `conn` is in autocommit mode; each step is its
    own transaction, under the schema's advisory lock."""
    goal = SCHEMA_VERSION if target is None else target
    if not 0 <= goal <= SCHEMA_VERSION:
        raise ValueError(f"target version {goal} is not one of 0..{SCHEMA_VERSION}")
    found: int | None = None
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('quota_sidecar.ledger:' || current_schema()))")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS ledger_schema (id INTEGER PRIMARY KEY CHECK (id = 1),"
                " version INTEGER NOT NULL)"
            )
            row = conn.execute("SELECT version FROM ledger_schema").fetchone()
            version = 0 if row is None else row[0]
            if version > SCHEMA_VERSION:
                raise ValueError(f"the ledger has schema version {version}, newer than this sidecar's {SCHEMA_VERSION}")
            if found is None:
                found = version
                if found > goal:
                    raise ValueError(f"the ledger is at schema version {found}, past the target version {goal}")
            if version >= goal:
                return found
            MIGRATIONS[version](conn)
            conn.execute(
                "INSERT INTO ledger_schema (id, version) VALUES (1, %s)"
                " ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                (version + 1,),
            )
