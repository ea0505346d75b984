"""The PostgreSQL ledger: one database shared by every sidecar of a fleet.

Each `transact` unit is one READ COMMITTED transaction on a pooled connection, and
returns once PostgreSQL has committed it with `synchronous_commit = on` (set on every
connection, whatever the server's default), so an ALLOW is acknowledged only once it
is durable. `read` runs in a REPEATABLE READ READ ONLY transaction: one consistent
snapshot for the whole read. Nothing read is kept across transactions: other sidecars
write the same rows, so no figure, filter or plan cached here could stay true.

Concurrency contract. The engine reads, decides and writes through the unit, as if it
were the only writer. To make that true across sidecars, a unit holds each tenant
exclusively from before its first read of that tenant until it commits: the first
time the unit names a tenant it locks the tenant's row in `tenants` (`SELECT ... FOR
UPDATE`, the row inserted first when the tenant is new). Units of one tenant thus run
one after another fleet-wide, and each sees every figure its predecessors committed;
units of different tenants run in parallel. A unit that touches several tenants (the
reminder sweep) may meet another in the opposite order: PostgreSQL aborts one of them
as a deadlock, and that unit is run again from the start in a new transaction, up to
ATTEMPTS times. Every unit may be re-run so: its effects outside the transaction are
the `after_commit` callbacks, and those of an attempt that failed are dropped, never
run.

Round trips. A unit's BEGIN travels with its first statement, and the ledger time it
keeps with its COMMIT (pipeline mode); activations and the figures they raise are one
statement. The tenant's lock stays a statement of its own: under READ COMMITTED a
statement that waited for a row lock sees the other tables it joins as they were when
it started, so the reads that follow it are statements of their own, each with a
fresh snapshot taken once the tenant is held.

A unit that raises is rolled back and its exception reaches the caller; the ledger
stays ready. A failure of PostgreSQL itself (unreachable, restarting, a connection
broken, even during COMMIT, when the outcome is unknown) is LedgerUnavailable: the
caller's retry with the same request_id finds the first answer if that commit did
happen. The ledger is then not ready, and calls are answered UNAVAILABLE at once,
until a watcher thread, every `check_interval` seconds, has the pool drop its broken
connections and one small query succeeds; the pool reconnects by itself.

The outbox. Events are rare (thresholds crossed), so each unit that adds one takes the
next sequence from the one `event_sequence` row with an UPDATE, whose row lock it keeps
until it commits: the next unit adding an event waits for that commit, so sequence
order is commit order, and a reader taking `seq > cursor` never skips an event that
commits late. A unit that rolls back also rolls its sequence back: no gaps. In this
process, the commit of such a unit and its callbacks run under one lock, so events
reach the callbacks in sequence order too.

Ledger time. Each unit that wrote raises the `time_us` of the tenants it holds to the
instant it noted, on the rows it has locked anyway: one fleet-wide row written by every
unit would make all tenants' units wait for each other. A unit that wrote but held no
tenant (pruning, the webhook's cursor) raises the one `ledger_time` row instead; such
units are rare. `time_us` is the latest instant this ledger knows of: the greatest of
all those rows when it opened, then raised by its own commits. A decision is thus never
dated before one this sidecar committed, nor before any committed before it started.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.errors
import psycopg_pool

from ...domain.errors import LedgerUnavailable
from ...domain.model import (
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
from .. import CommitObserver, Ledger, LedgerReader, LedgerTx, by_deadline
from .schema import migrate

T = TypeVar("T")
log = logging.getLogger("quota_sidecar.ledger")

# How many times a unit aborted as a deadlock (or a serialization failure) is run.
ATTEMPTS = 8
RETRY_PAUSE_S = 0.005
_RETRIED = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
# Errors of the store, not of a unit: the connection or the server failed.
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed)
_CONTEXT = "cycle_start_us, cycle_end_us, contact_limit, sends_limit, currency, plan_name"
_CONTACT = (
    "contact_id, held, marketing, marketing_until_next_update, marketing_source_type,"
    " marketing_source_id, marketing_until_us, held_since_us"
)

_OPEN = (psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR)

# The activations of a set of contacts (the array parameter), each found by its own probe
# of the primary key: a plan that stays right whatever the planner thinks of the table. A
# join or `contact_id = ANY(...)` was planned (as a prepared statement, on a table not yet
# analyzed) as a scan of the whole cycle, and a batch of 500 took 200 ms at 20,000 rows.
# `column`: `c` for the contact ids, `ctid` for the rows, which the unit may update at once
# (it holds the tenant: no other transaction moves them).
_FOUND = (
    "SELECT {column} FROM unnest(%s::text[]) c, LATERAL (SELECT ctid FROM activations"
    " WHERE tenant_id = %s AND cycle_start_us = %s AND contact_id = c LIMIT 1) a"
)


def _contact(row: tuple[Any, ...]) -> ContactRecord:
    return ContactRecord(*row)


class _Reader:
    """Reads over one connection inside a transaction someone else opened."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def _enter(self, tenant_id: str) -> None:
        """Called before anything is read or written of the tenant; a reader needs nothing."""

    def _run(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self.conn.execute(sql, args)

    def _one(self, sql: str, args: Sequence[Any]) -> tuple[Any, ...] | None:
        return self._run(sql, args).fetchone()

    def plan(self, tenant_id: str) -> StoredPlan | None:
        self._enter(tenant_id)
        row = self._one("SELECT plan_json, updated_at_us FROM plans WHERE tenant_id = %s", (tenant_id,))
        return StoredPlan(row[0], row[1]) if row else None

    def plan_at(self, tenant_id: str, before_us: int) -> StoredPlan | None:
        self._enter(tenant_id)
        row = self._one(
            "SELECT plan_json, effective_us FROM plan_versions WHERE tenant_id = %s AND effective_us < %s"
            " ORDER BY effective_us DESC LIMIT 1",
            (tenant_id, before_us),
        )
        return StoredPlan(row[0], row[1]) if row else None

    def reanchors_around(self, tenant_id: str, instant_us: int) -> tuple[int | None, Reanchor | None]:
        self._enter(tenant_id)
        row = self._one(
            "SELECT (SELECT MAX(at_us) FROM reanchors WHERE tenant_id = %s AND at_us <= %s), n.at_us,"
            " n.anchor_before_us FROM (SELECT 1) o LEFT JOIN LATERAL (SELECT at_us, anchor_before_us FROM reanchors"
            " WHERE tenant_id = %s AND at_us > %s ORDER BY at_us LIMIT 1) n ON true",
            (tenant_id, instant_us, tenant_id, instant_us),
        )
        assert row is not None
        return row[0], Reanchor(row[1], row[2]) if row[1] is not None else None

    def counters(self, tenant_id: str, cycle_start_us: int) -> Counters:
        self._enter(tenant_id)
        row = self._one(
            "SELECT active_contacts, sends, held_end, held_peak, marketing_end, marketing_peak FROM usage"
            " WHERE tenant_id = %s AND cycle_start_us = %s",
            (tenant_id, cycle_start_us),
        )
        return Counters(*row) if row else Counters()

    def holdings(self, tenant_id: str) -> Holdings | None:
        self._enter(tenant_id)
        row = self._one(
            "SELECT cycle_start_us, held, marketing, pending FROM holdings WHERE tenant_id = %s", (tenant_id,)
        )
        return Holdings(*row) if row else None

    def activation(self, tenant_id: str, cycle_start_us: int, contact_id: str) -> Activation | None:
        self._enter(tenant_id)
        row = self._one(
            "SELECT activated_at_us, activity, sends FROM activations"
            " WHERE tenant_id = %s AND cycle_start_us = %s AND contact_id = %s",
            (tenant_id, cycle_start_us, contact_id),
        )
        return Activation(contact_id, row[0], row[1], row[2]) if row else None

    def active_among(self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str]) -> set[str]:
        self._enter(tenant_id)
        if not contact_ids:
            return set()
        rows = self._run(_FOUND.format(column="c"), (list(contact_ids), tenant_id, cycle_start_us))
        return {r[0] for r in rows}

    def contact(self, tenant_id: str, contact_id: str) -> ContactRecord | None:
        self._enter(tenant_id)
        row = self._one(
            f"SELECT {_CONTACT} FROM contacts WHERE tenant_id = %s AND contact_id = %s", (tenant_id, contact_id)
        )
        return _contact(row) if row else None

    def active_contacts(
        self, tenant_id: str, cycle_start_us: int, after_contact_id: str, limit: int
    ) -> list[Activation]:
        self._enter(tenant_id)
        rows = self._run(
            "SELECT contact_id, activated_at_us, activity, sends FROM activations"
            " WHERE tenant_id = %s AND cycle_start_us = %s AND contact_id > %s ORDER BY contact_id LIMIT %s",
            (tenant_id, cycle_start_us, after_contact_id, limit),
        )
        return [Activation(*row) for row in rows]

    def counted_contacts(
        self, tenant_id: str, marketing_only: bool, at_us: int, after_contact_id: str, limit: int
    ) -> list[ContactRecord]:
        self._enter(tenant_id)
        marketing = " AND marketing AND (marketing_until_us = 0 OR marketing_until_us > %s)" if marketing_only else ""
        args: tuple[Any, ...] = (tenant_id, after_contact_id) + ((at_us,) if marketing_only else ()) + (limit,)
        rows = self._run(
            f"SELECT {_CONTACT} FROM contacts WHERE tenant_id = %s AND held AND contact_id > %s{marketing}"
            " ORDER BY contact_id LIMIT %s",
            args,
        )
        return [_contact(r) for r in rows]

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
        self._enter(tenant_id)
        one = " AND s.contact_id = %s" if contact_id is not None else ""
        rows = self._run(
            "SELECT contact_id, from_us, until FROM (SELECT h.contact_id, h.from_us, COALESCE(h.to_us,"
            " CASE WHEN h.marketing AND c.marketing_until_us > 0 THEN c.marketing_until_us END) AS until"
            " FROM held_spans h JOIN contacts c ON c.tenant_id = h.tenant_id AND c.contact_id = h.contact_id"
            " WHERE h.tenant_id = %s AND h.marketing = %s AND (h.contact_id, h.from_us) > (%s, %s)"
            " AND h.from_us < %s) s"
            f" WHERE (s.from_us >= %s OR s.until IS NULL OR s.until > %s){one} ORDER BY contact_id, from_us LIMIT %s",
            (tenant_id, marketing_only, after[0], after[1], end_us, start_us, start_us)
            + ((contact_id,) if contact_id is not None else ())
            + (limit,),
        )
        return [HeldSpan(*row) for row in rows]

    def stored_result(self, tenant_id: str, rpc: str, request_id: str) -> StoredResult | None:
        self._enter(tenant_id)
        row = self._one(
            f"SELECT fingerprint, reply, {_CONTEXT} FROM request_results"
            " WHERE tenant_id = %s AND rpc = %s AND request_id = %s",
            (tenant_id, rpc, request_id),
        )
        if row is None:
            return None
        return StoredResult(bytes(row[0]), bytes(row[1]), UsageContext(tenant_id, *row[2:]))

    def tenants(self) -> list[str]:
        return [r[0] for r in self._run("SELECT tenant_id FROM plans ORDER BY tenant_id")]

    def file_entry(self, tenant_id: str) -> str | None:
        self._enter(tenant_id)
        row = self._one("SELECT digest FROM tenant_file_entries WHERE tenant_id = %s", (tenant_id,))
        return row[0] if row else None

    def notice(self, tenant_id: str, figure: UsageFigure) -> NoticeState | None:
        self._enter(tenant_id)
        row = self._one(
            "SELECT level, cycle_start_us, last_at_us FROM notices WHERE tenant_id = %s AND figure = %s",
            (tenant_id, figure.value),
        )
        return NoticeState(*row) if row else None

    def raised_notices(self) -> list[tuple[str, UsageFigure, NoticeState]]:
        rows = self._run(
            "SELECT tenant_id, figure, level, cycle_start_us, last_at_us FROM notices WHERE level > 0"
            " ORDER BY tenant_id, figure"
        )
        return [(r[0], UsageFigure(r[1]), NoticeState(r[2], r[3], r[4])) for r in rows]

    def events_after(self, after_seq: int, tenant_id: str, limit: int) -> list[UsageEvent]:
        where = " AND tenant_id = %s" if tenant_id else ""
        args: tuple[Any, ...] = (after_seq, tenant_id, limit) if tenant_id else (after_seq, limit)
        rows = self._run(
            "SELECT seq, event_id, type, figure, tenant_id, threshold, at_us, usage_json FROM usage_events"
            f" WHERE seq > %s{where} ORDER BY seq LIMIT %s",
            args,
        )
        return [
            UsageEvent(
                r[1], UsageEventType(r[2]), UsageFigure(r[3]), r[4], r[5], r[6], Usage.from_dict(json.loads(r[7])), r[0]
            )
            for r in rows
        ]

    def event_cursor(self, consumer: str) -> int:
        row = self._one("SELECT seq FROM event_cursors WHERE consumer = %s", (consumer,))
        return row[0] if row else 0

    def pending_events(self, after_seq: int) -> tuple[int, int | None]:
        row = self._one("SELECT COUNT(*), MIN(at_us) FROM usage_events WHERE seq > %s", (after_seq,))
        assert row is not None
        return row[0], row[1]

    def last_event_seq(self) -> int:
        """The sequence of the last event committed: the counter moves only with commits."""
        row = self._one("SELECT last FROM event_sequence WHERE id = 1", ())
        assert row is not None
        return int(row[0])


class _Tx(_Reader):
    """A unit's view inside its transaction: reads see the unit's own writes."""

    def __init__(self, conn: psycopg.Connection) -> None:
        super().__init__(conn)
        self.begun = False
        self.committed: list[Callable[[], None]] = []
        self.noted_us = 0
        self.wrote = False
        self.ordered = False
        self.held: list[str] = []

    def _enter(self, tenant_id: str) -> None:
        """Holds the tenant until the commit, before anything of it is read: the unit's
        reads then stay true until it commits (a new tenant's row is inserted first; an
        insert that meets another's waits for it, and the row is then locked as it is)."""
        if tenant_id in self.held:
            return
        lock = "SELECT 1 FROM tenants WHERE tenant_id = %s FOR UPDATE"
        if self._one(lock, (tenant_id,)) is None:
            added = self._run(
                "INSERT INTO tenants (tenant_id) VALUES (%s) ON CONFLICT (tenant_id) DO NOTHING", (tenant_id,)
            ).rowcount
            if not added:
                self._one(lock, (tenant_id,))
        self.held.append(tenant_id)

    def _run(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        """The unit's transaction begins with its first statement, in the same round trip."""
        if self.begun:
            return self.conn.execute(sql, args)
        self.begun = True
        with self.conn.pipeline():
            self.conn.execute("BEGIN")
            return self.conn.execute(sql, args)

    def _begin(self) -> None:
        if not self.begun:
            self.begun = True
            self.conn.execute("BEGIN")

    def _write(self, tenant_id: str) -> None:
        self._enter(tenant_id)
        self.wrote = True

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.committed.append(callback)

    def note_time(self, at_us: int) -> None:
        self.noted_us = max(self.noted_us, at_us)

    def commit(self) -> int:
        """Keeps the instant the unit noted, when it wrote, and commits, in one round trip;
        returns the instant kept (0: none)."""
        if not self.begun:
            return 0
        with self.conn.pipeline():
            stamped = self._stamp()
            self.conn.execute("COMMIT")
        return stamped

    def _stamp(self) -> int:
        if not self.wrote or self.noted_us <= 0:
            return 0
        if self.held:
            self._run(
                "UPDATE tenants SET time_us = GREATEST(time_us, %s) WHERE tenant_id = ANY(%s)",
                (self.noted_us, self.held),
            )
        else:
            self._run(
                "INSERT INTO ledger_time (id, at_us) VALUES (1, %s)"
                " ON CONFLICT (id) DO UPDATE SET at_us = GREATEST(ledger_time.at_us, excluded.at_us)",
                (self.noted_us,),
            )
        return self.noted_us

    def put_plan(self, tenant_id: str, plan_json: str, at_us: int) -> None:
        self._write(tenant_id)
        self._run(
            "INSERT INTO plans (tenant_id, plan_json, updated_at_us) VALUES (%s, %s, %s)"
            " ON CONFLICT (tenant_id) DO UPDATE SET plan_json = excluded.plan_json,"
            " updated_at_us = excluded.updated_at_us",
            (tenant_id, plan_json, at_us),
        )
        latest = self.plan_at(tenant_id, at_us + 1)
        if latest is not None and latest.plan_json == plan_json:
            return
        self._run(
            "INSERT INTO plan_versions (tenant_id, effective_us, plan_json) VALUES (%s, %s, %s)"
            " ON CONFLICT (tenant_id, effective_us) DO UPDATE SET plan_json = excluded.plan_json",
            (tenant_id, at_us, plan_json),
        )

    def put_reanchor(self, tenant_id: str, reanchor: Reanchor) -> None:
        self._write(tenant_id)
        self._run(
            "INSERT INTO reanchors (tenant_id, at_us, anchor_before_us) VALUES (%s, %s, %s)"
            " ON CONFLICT (tenant_id, at_us) DO NOTHING",
            (tenant_id, reanchor.at_us, reanchor.anchor_before_us),
        )

    def put_file_entry(self, tenant_id: str, digest: str, at_us: int) -> None:
        self._write(tenant_id)
        self._run(
            "INSERT INTO tenant_file_entries (tenant_id, digest, applied_at_us) VALUES (%s, %s, %s)"
            " ON CONFLICT (tenant_id) DO UPDATE SET digest = excluded.digest, applied_at_us = excluded.applied_at_us",
            (tenant_id, digest, at_us),
        )

    def put_holdings(self, tenant_id: str, holdings: Holdings) -> None:
        self._write(tenant_id)
        self._run(
            "INSERT INTO holdings (tenant_id, cycle_start_us, held, marketing, pending) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (tenant_id) DO UPDATE SET cycle_start_us = excluded.cycle_start_us,"
            " held = excluded.held, marketing = excluded.marketing, pending = excluded.pending",
            (tenant_id, holdings.cycle_start_us, holdings.held, holdings.marketing, holdings.pending),
        )

    def record_held(self, tenant_id: str, cycle_start_us: int, held: int, marketing: int) -> None:
        self._write(tenant_id)
        self._run(
            "INSERT INTO usage (tenant_id, cycle_start_us, held_end, held_peak, marketing_end, marketing_peak)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (tenant_id, cycle_start_us) DO UPDATE SET held_end = excluded.held_end,"
            " held_peak = GREATEST(usage.held_peak, excluded.held_peak), marketing_end = excluded.marketing_end,"
            " marketing_peak = GREATEST(usage.marketing_peak, excluded.marketing_peak)",
            (tenant_id, cycle_start_us, held, held, marketing, marketing),
        )

    def switch_marketing(self, tenant_id: str, due_us: int) -> int:
        self._write(tenant_id)
        return self._run(
            "UPDATE contacts SET marketing = false, marketing_until_next_update = false, marketing_until_us = 0"
            " WHERE tenant_id = %s AND marketing_until_us > 0 AND marketing_until_us <= %s",
            (tenant_id, due_us),
        ).rowcount

    def reschedule_marketing(self, tenant_id: str, until_us: int) -> None:
        self._write(tenant_id)
        self._run(
            "UPDATE contacts SET marketing_until_us = %s WHERE tenant_id = %s AND marketing_until_us > 0",
            (until_us, tenant_id),
        )

    def count_sends(self, tenant_id: str, cycle_start_us: int, sends: int) -> None:
        self._write(tenant_id)
        self._run(
            "INSERT INTO usage (tenant_id, cycle_start_us, sends) VALUES (%s, %s, %s)"
            " ON CONFLICT (tenant_id, cycle_start_us) DO UPDATE SET sends = usage.sends + excluded.sends",
            (tenant_id, cycle_start_us, sends),
        )

    def activate(self, tenant_id: str, cycle_start_us: int, activations: Sequence[Activation]) -> None:
        self._write(tenant_id)
        if not activations:
            return
        self._counted(
            tenant_id,
            cycle_start_us,
            "INSERT INTO activations (tenant_id, cycle_start_us, contact_id, activated_at_us, activity, sends)"
            " SELECT %s, %s, * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::bigint[]) RETURNING sends",
            (
                tenant_id,
                cycle_start_us,
                [a.contact_id for a in activations],
                [a.activated_at_us for a in activations],
                [a.activity for a in activations],
                [a.sends for a in activations],
            ),
            new=True,
        )

    def add_sends(self, tenant_id: str, cycle_start_us: int, contact_id: str, sends: int) -> None:
        self._write(tenant_id)
        changed = self._counted(
            tenant_id,
            cycle_start_us,
            "UPDATE activations SET sends = sends + %s WHERE tenant_id = %s AND cycle_start_us = %s"
            " AND contact_id = %s RETURNING %s::bigint AS sends",
            (sends, tenant_id, cycle_start_us, contact_id, sends),
            new=False,
        )
        if changed != 1:
            raise LookupError(f"no activation of {contact_id!r} to add sends to")

    def send_to_new(
        self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str], at_us: int, activity: str
    ) -> None:
        self._write(tenant_id)
        if not contact_ids:
            return
        self._counted(
            tenant_id,
            cycle_start_us,
            "INSERT INTO activations (tenant_id, cycle_start_us, contact_id, activated_at_us, activity, sends)"
            " SELECT %s, %s, c, %s, %s, 1 FROM unnest(%s::text[]) c RETURNING sends",
            (tenant_id, cycle_start_us, at_us, activity, list(contact_ids)),
            new=True,
        )

    def send_to_active(self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str]) -> None:
        self._write(tenant_id)
        if not contact_ids:
            return
        changed = self._counted(
            tenant_id,
            cycle_start_us,
            f"UPDATE activations SET sends = sends + 1 WHERE ctid = ANY(ARRAY({_FOUND.format(column='ctid')}))"
            " RETURNING 1::bigint AS sends",
            (list(contact_ids), tenant_id, cycle_start_us),
            new=False,
        )
        if changed != len(contact_ids):
            raise LookupError(f"{len(contact_ids) - changed} of the contacts sent to are not active")

    def _counted(self, tenant_id: str, cycle_start_us: int, change: str, args: Sequence[Any], *, new: bool) -> int:
        """Runs `change` (an INSERT or UPDATE of activations returning the sends each row
        adds) and raises the cycle's figures by what it changed, in one statement: the
        contacts it activated when `new`, and their sends. Returns how many rows it changed."""
        row = self._one(
            f"WITH change AS ({change}), n AS (SELECT COUNT(*) AS rows, COALESCE(SUM(sends), 0) AS sends FROM change)"
            " INSERT INTO usage (tenant_id, cycle_start_us, active_contacts, sends)"
            " SELECT %s, %s, CASE WHEN %s THEN rows ELSE 0 END, sends FROM n WHERE rows > 0"
            " ON CONFLICT (tenant_id, cycle_start_us) DO UPDATE SET"
            " active_contacts = usage.active_contacts + excluded.active_contacts,"
            " sends = usage.sends + excluded.sends RETURNING (SELECT rows FROM n)",
            (*args, tenant_id, cycle_start_us, new),
        )
        return 0 if row is None else row[0]

    def put_contacts(self, tenant_id: str, contacts: Iterable[ContactRecord], at_us: int) -> None:
        self._write(tenant_id)
        rows = [
            (
                tenant_id,
                c.contact_id,
                c.held,
                c.marketing,
                c.marketing_until_next_update,
                c.marketing_source_type,
                c.marketing_source_id,
                at_us,
                c.marketing_until_us,
                c.held_since_us,
            )
            for c in contacts
        ]
        if not rows:
            return
        self._begin()
        with self.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO contacts (tenant_id, contact_id, held, marketing, marketing_until_next_update,"
                " marketing_source_type, marketing_source_id, updated_at_us, marketing_until_us, held_since_us)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (tenant_id, contact_id) DO UPDATE SET held = excluded.held,"
                " marketing = excluded.marketing, marketing_until_next_update = excluded.marketing_until_next_update,"
                " marketing_source_type = excluded.marketing_source_type,"
                " marketing_source_id = excluded.marketing_source_id, updated_at_us = excluded.updated_at_us,"
                " marketing_until_us = excluded.marketing_until_us, held_since_us = excluded.held_since_us",
                rows,
            )

    def store_result(self, tenant_id: str, rpc: str, request_id: str, result: StoredResult, at_us: int) -> None:
        assert result.context is not None
        self._write(tenant_id)
        c = result.context
        self._run(
            f"INSERT INTO request_results (tenant_id, rpc, request_id, fingerprint, reply, {_CONTEXT}, created_at_us)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                tenant_id,
                rpc,
                request_id,
                result.fingerprint,
                result.packed,
                c.cycle_start_us,
                c.cycle_end_us,
                c.contact_limit,
                c.sends_limit,
                c.currency,
                c.plan_name,
                at_us,
            ),
        )

    def _prune(self, table: str, key: str, age: str, before: int, limit: int) -> int:
        """Deletes, among the `limit` oldest rows of `table` by `key`, those whose `age` is below `before`."""
        return self._deleted(
            f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} ORDER BY {key} LIMIT %s) AND {age} < %s",
            (limit, before),
        )

    def _deleted(self, sql: str, args: Sequence[Any]) -> int:
        """Runs a DELETE; the unit wrote only if it deleted something (as SQLite counts changes)."""
        deleted = self._run(sql, args).rowcount
        self.wrote = self.wrote or deleted > 0
        return deleted

    def prune_results(self, before_us: int, limit: int) -> int:
        return self._prune(
            "request_results", "created_at_us, tenant_id, rpc, request_id", "created_at_us", before_us, limit
        )

    def prune_events(self, before_us: int, through_seq: int, limit: int) -> int:
        return self._deleted(
            "DELETE FROM usage_events WHERE seq IN (SELECT seq FROM usage_events WHERE seq <= %s ORDER BY seq LIMIT %s)"
            " AND at_us < %s",
            (through_seq, limit, before_us),
        )

    def prune_audit(self, before_us: int, limit: int) -> int:
        deleted = self._prune("audit", "seq", "at_us", before_us, limit)
        if deleted:
            self._run(
                "INSERT INTO audit_pruned (id, before_us) VALUES (1, %s)"
                " ON CONFLICT (id) DO UPDATE SET before_us = GREATEST(audit_pruned.before_us, excluded.before_us)",
                (before_us,),
            )
        return deleted

    def audit(self, entries: Iterable[AuditEntry]) -> None:
        rows = [
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
        ]
        if not rows:
            return
        self.wrote = True
        self._begin()
        with self.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO audit (at_us, tenant_id, cycle_start_us, rpc, request_id, contact_id, decision,"
                " reason, active_delta, sends_delta, held_delta) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                rows,
            )

    def put_notice(self, tenant_id: str, figure: UsageFigure, state: NoticeState) -> None:
        self._write(tenant_id)
        self._run(
            "INSERT INTO notices (tenant_id, figure, level, cycle_start_us, last_at_us) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (tenant_id, figure) DO UPDATE SET level = excluded.level,"
            " cycle_start_us = excluded.cycle_start_us, last_at_us = excluded.last_at_us",
            (tenant_id, figure.value, state.level, state.cycle_start_us, state.last_at_us),
        )

    def add_event(self, event: UsageEvent) -> int:
        """The sequence comes from the one counter row, locked until this unit commits."""
        self._write(event.tenant_id)
        self.ordered = True
        row = self._one("UPDATE event_sequence SET last = last + 1 WHERE id = 1 RETURNING last", ())
        assert row is not None
        seq: int = row[0]
        self._run(
            "INSERT INTO usage_events (tenant_id, seq, event_id, at_us, type, figure, threshold, usage_json)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                event.tenant_id,
                seq,
                event.event_id,
                event.at_us,
                event.type.value,
                event.figure.value,
                event.threshold,
                json.dumps(event.usage.to_dict(), separators=(",", ":")),
            ),
        )
        return seq

    def put_event_cursor(self, consumer: str, seq: int) -> None:
        self.wrote = True
        self._run(
            "INSERT INTO event_cursors (consumer, seq) VALUES (%s, %s)"
            " ON CONFLICT (consumer) DO UPDATE SET seq = GREATEST(event_cursors.seq, excluded.seq)",
            (consumer, seq),
        )


def _configure(conn: psycopg.Connection) -> None:
    """Every connection: transactions opened explicitly, commits durable whatever the server's default."""
    conn.autocommit = True
    conn.execute("SET synchronous_commit = on")


class PostgresLedger(Ledger):
    """The ledger in a PostgreSQL database (a libpq URL: `postgresql://user@host:port/db?...`),
    shared by any number of sidecars."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 8,
        connect_timeout: float = 5.0,
        on_commit: CommitObserver | None = None,
        on_ready: Callable[[bool], None] | None = None,
        check_interval: float = 0.5,
    ) -> None:
        self.url = url
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.on_commit = on_commit
        self.on_ready = on_ready
        self.check_interval = check_interval
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._open = False
        self._failing = False
        self._state = threading.Lock()
        self._ordered = threading.Lock()
        self._time_us = 0
        self._watcher: threading.Thread | None = None
        self._watch_stop = threading.Event()

    @property
    def time_us(self) -> int:
        return self._time_us

    @property
    def _connect_timeout_s(self) -> int:
        """libpq's connect_timeout counts whole seconds."""
        return max(1, round(self.connect_timeout))

    @property
    def ready(self) -> bool:
        return self._open and not self._failing

    def open(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=self._connect_timeout_s) as conn:
                migrate(conn)
                row = conn.execute(
                    "SELECT GREATEST((SELECT MAX(time_us) FROM tenants), (SELECT at_us FROM ledger_time), 0)"
                ).fetchone()
        except (psycopg.Error, ValueError) as exc:
            raise LedgerUnavailable(f"the PostgreSQL ledger cannot be opened: {exc}") from None
        assert row is not None
        self._time_us = row[0]
        self._pool = psycopg_pool.ConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            configure=_configure,
            timeout=self.connect_timeout,
            name="ledger",
            open=True,
        )
        self._failing = False
        self._open = True
        self._watch_stop.clear()
        self._watcher = threading.Thread(target=self._watch_loop, name="ledger-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        with self._state:
            if not self._open:
                return
            self._open = False
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        log.info("ledger closed")

    def _pool_now(self) -> psycopg_pool.ConnectionPool:
        pool = self._pool
        if not self._open or pool is None:
            raise LedgerUnavailable("the ledger is not open")
        if self._failing:
            raise LedgerUnavailable("the PostgreSQL ledger cannot be reached")
        return pool

    def transact(self, work: Callable[[LedgerTx], T], *, weight: int = 1, deadline: float | None = None) -> T:
        """Runs `work` in its own transaction; `weight` changes nothing here (no unit
        waits for another's commit but one of the same tenant)."""
        work = by_deadline(work, deadline)
        pool = self._pool_now()
        started = time.perf_counter()
        try:
            with pool.connection() as conn:
                for attempt in range(1, ATTEMPTS + 1):
                    try:
                        result = self._attempt(conn, work)
                        break
                    except _RETRIED as exc:
                        if attempt == ATTEMPTS:
                            raise LedgerUnavailable(f"a unit of work was aborted {attempt} times: {exc}") from exc
                        log.info("a unit of work was aborted (%s); it runs again", exc)
                        # A short random pause lets the unit it met finish first, rather
                        # than meet it again at once.
                        time.sleep(random.uniform(0, RETRY_PAUSE_S * attempt))
        except _UNAVAILABLE as exc:
            self._failed(exc)
            if self.on_commit is not None:
                self.on_commit(0.0, 1, False)
            raise LedgerUnavailable(f"the PostgreSQL ledger failed: {exc}") from exc
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, 1, True)
        return result

    def _attempt(self, conn: psycopg.Connection, work: Callable[[LedgerTx], T]) -> T:
        """One run of the unit in a new transaction: committed, or rolled back and raised."""
        tx = _Tx(conn)
        try:
            result = work(tx)
            if tx.ordered:
                # Sequence order is commit order fleet-wide (the counter row's lock); this
                # keeps the callbacks of this process in that order too.
                with self._ordered:
                    self._committed(tx, tx.commit())
            else:
                self._committed(tx, tx.commit())
        except BaseException:
            if conn.info.transaction_status in _OPEN:
                conn.execute("ROLLBACK")
            raise
        return result

    def _committed(self, tx: _Tx, stamped: int) -> None:
        with self._state:
            self._time_us = max(self._time_us, stamped)
        for callback in tx.committed:
            try:
                callback()
            except Exception:
                log.exception("a callback after a ledger commit failed")

    def read(self, work: Callable[[LedgerReader], T]) -> T:
        pool = self._pool_now()
        try:
            with pool.connection() as conn:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                try:
                    return work(_Reader(conn))
                finally:
                    if conn.info.transaction_status != psycopg.pq.TransactionStatus.UNKNOWN:
                        conn.execute("ROLLBACK")
        except _UNAVAILABLE as exc:
            self._failed(exc)
            raise LedgerUnavailable(f"the PostgreSQL ledger cannot be read: {exc}") from exc

    def _failed(self, exc: Exception) -> None:
        """Marks the ledger failing, unless only this call failed: every pooled connection
        busy until the wait for one timed out, while the server takes new connections."""
        if isinstance(exc, psycopg_pool.PoolTimeout) and self._reachable():
            return
        self._set_failing(True, exc)

    def _reachable(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=self._connect_timeout_s):
                return True
        except psycopg.Error:
            return False

    def _set_failing(self, failing: bool, why: object = None) -> None:
        with self._state:
            if failing == self._failing:
                return
            self._failing = failing
        if failing:
            log.error("the PostgreSQL ledger fails, calls get UNAVAILABLE: %s", why)
        else:
            log.warning("the PostgreSQL ledger answers again")
        if self.on_ready is not None:
            self.on_ready(not failing)

    def _watch_loop(self) -> None:
        """While failing, drops the pool's broken connections and tries one query, every check_interval."""
        while not self._watch_stop.wait(self.check_interval):
            pool = self._pool
            if not self._failing or pool is None:
                continue
            try:
                pool.check()
                with pool.connection(timeout=self.check_interval) as conn:
                    conn.execute("SELECT 1").fetchone()
            except (psycopg.Error, psycopg_pool.PoolTimeout):
                continue
            self._set_failing(False)


__all__ = ["PostgresLedger"]
