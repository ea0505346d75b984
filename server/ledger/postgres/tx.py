"""The writes of the PostgreSQL ledger: the SQL of `LedgerTx` inside one unit's
transaction, the tenant locks it takes before its first read of a tenant (with what the
unit said it would read of it, `read_ahead`), and what it keeps for later: the writes
whose answers the unit does not need, sent with its next statement or its COMMIT (a
pipeline), the ledger time it noted and its after-commit callbacks."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.errors

from ...domain.model import (
    Activation,
    AuditEntry,
    ContactRecord,
    Holdings,
    NoticeState,
    Reanchor,
    StoredResult,
    UsageEvent,
    UsageFigure,
)
from .. import ReadAhead
from .ahead import Fetched, Fetching, ReaderAhead
from .rows import CONTEXT_COLUMNS, FOUND_BY_KEY, NOW_US, stored_id

LOCK = "SELECT 1 FROM tenants WHERE tenant_id = %s FOR UPDATE"
# A write kept for later: its SQL, and its arguments (a list of them, run as executemany, when `many`).
Pending = tuple[str, Sequence[Any], bool]


class Transaction(ReaderAhead):
    """A unit's view inside its transaction: reads see the unit's own writes."""

    lock = LOCK

    def __init__(self, conn: psycopg.Connection) -> None:
        super().__init__(conn)
        self.begun = False
        self.committed: list[Callable[[], None]] = []
        self.noted_us = 0
        self.wrote = False
        self.ordered = False
        self.held: list[str] = []
        self.ahead: dict[str, ReadAhead] = {}
        self.fetched = Fetched()
        self.pending: list[Pending] = []

    def read_ahead(self, tenant_id: str, ahead: ReadAhead) -> None:
        if tenant_id not in self.held:
            self.ahead[tenant_id] = ahead

    def _enter(self, tenant_id: str) -> None:
        """Holds the tenant until the commit, before anything of it is read: the unit's
        reads then stay true until it commits (a new tenant's row is inserted first; an
        insert that meets another's waits for it, and the row is then locked as it is).
        What the unit said it would read of the tenant is fetched in the lock's round
        trip, and kept only if the lock found the row: without it, it was read unheld."""
        if tenant_id in self.held:
            return
        ahead = self.ahead.pop(tenant_id, None)
        with self._pipeline():
            self._send_pending()
            lock = self.conn.execute(self.lock, (tenant_id,))
            fetching = Fetching(self.conn, tenant_id, ahead) if ahead is not None else None
        if lock.fetchone() is not None:
            if fetching is not None:
                fetching.into(self.fetched)
        else:
            added = self._run(
                "INSERT INTO tenants (tenant_id) VALUES (%s) ON CONFLICT (tenant_id) DO NOTHING", (tenant_id,)
            ).rowcount
            if not added:
                self._one(self.lock, (tenant_id,))
        self.held.append(tenant_id)

    @contextmanager
    def _pipeline(self) -> Iterator[None]:
        """One round trip. A refused count (`_counted`: a NULL written to `usage.sends`)
        is the LookupError the SQLite ledger raises at once."""
        try:
            with self.conn.pipeline():
                yield
        except psycopg.errors.NotNullViolation as exc:
            raise LookupError(f"a change found other rows than it was given: {exc}") from exc

    def _send_pending(self) -> None:
        """In a pipeline: BEGIN if the transaction has not begun, then the writes kept for later."""
        if not self.begun:
            self.begun = True
            self.conn.execute("BEGIN")
        for sql, args, many in self.pending:
            if many:
                self.conn.cursor().executemany(sql, args)
            else:
                self.conn.execute(sql, args)
        self.pending.clear()

    def _run(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        """A statement whose answer the unit needs: in the round trip of BEGIN, when the
        transaction has not begun, and of the writes kept for later."""
        if self.begun and not self.pending:
            return self.conn.execute(sql, args)
        with self._pipeline():
            self._send_pending()
            return self.conn.execute(sql, args)

    def _later(self, sql: str, args: Sequence[Any], *, many: bool = False) -> None:
        """A write whose answer the unit does not need: sent before its next statement."""
        self.pending.append((sql, args, many))

    def _write(self, tenant_id: str) -> None:
        self._enter(tenant_id)
        self.wrote = True

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.committed.append(callback)

    def note_time(self, at_us: int) -> None:
        self.noted_us = max(self.noted_us, at_us)

    def commit(self) -> int:
        """Sends the writes kept for later, keeps the instant the unit noted, when it
        wrote, and commits, in one round trip; returns the instant kept (0: none)."""
        if not self.begun and not self.pending:
            return 0
        with self._pipeline():
            self._send_pending()
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
        self.fetched.forget(tenant_id, "plan")
        self._later(
            "INSERT INTO plans (tenant_id, plan_json, updated_at_us) VALUES (%s, %s, %s)"
            " ON CONFLICT (tenant_id) DO UPDATE SET plan_json = excluded.plan_json,"
            " updated_at_us = excluded.updated_at_us",
            (tenant_id, plan_json, at_us),
        )
        latest = self.plan_at(tenant_id, at_us + 1)
        if latest is not None and latest.plan_json == plan_json:
            return
        self._later(
            "INSERT INTO plan_versions (tenant_id, effective_us, plan_json) VALUES (%s, %s, %s)"
            " ON CONFLICT (tenant_id, effective_us) DO UPDATE SET plan_json = excluded.plan_json",
            (tenant_id, at_us, plan_json),
        )

    def put_reanchor(self, tenant_id: str, reanchor: Reanchor) -> None:
        self._write(tenant_id)
        self._later(
            "INSERT INTO reanchors (tenant_id, at_us, anchor_before_us) VALUES (%s, %s, %s)"
            " ON CONFLICT (tenant_id, at_us) DO NOTHING",
            (tenant_id, reanchor.at_us, reanchor.anchor_before_us),
        )

    def put_file_entry(self, tenant_id: str, digest: str, at_us: int) -> None:
        self._write(tenant_id)
        self._later(
            "INSERT INTO tenant_file_entries (tenant_id, digest, applied_at_us) VALUES (%s, %s, %s)"
            " ON CONFLICT (tenant_id) DO UPDATE SET digest = excluded.digest, applied_at_us = excluded.applied_at_us",
            (tenant_id, digest, at_us),
        )

    def put_holdings(self, tenant_id: str, holdings: Holdings) -> None:
        self._write(tenant_id)
        self._later(
            "INSERT INTO holdings (tenant_id, cycle_start_us, held, marketing, pending) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (tenant_id) DO UPDATE SET cycle_start_us = excluded.cycle_start_us,"
            " held = excluded.held, marketing = excluded.marketing, pending = excluded.pending",
            (tenant_id, holdings.cycle_start_us, holdings.held, holdings.marketing, holdings.pending),
        )

    def record_held(self, tenant_id: str, cycle_start_us: int, held: int, marketing: int) -> None:
        self._write(tenant_id)
        self.fetched.forget(tenant_id, "counters")
        self._later(
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
        self._later(
            "UPDATE contacts SET marketing_until_us = %s WHERE tenant_id = %s AND marketing_until_us > 0",
            (until_us, tenant_id),
        )

    def count_sends(self, tenant_id: str, cycle_start_us: int, sends: int) -> None:
        self._write(tenant_id)
        self.fetched.forget(tenant_id, "counters")
        self._later(
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
            rows=len(activations),
        )

    def add_sends(self, tenant_id: str, cycle_start_us: int, contact_id: str, sends: int) -> None:
        self._write(tenant_id)
        self._counted(
            tenant_id,
            cycle_start_us,
            "UPDATE activations SET sends = sends + %s WHERE tenant_id = %s AND cycle_start_us = %s"
            " AND contact_id = %s RETURNING %s::bigint AS sends",
            (sends, tenant_id, cycle_start_us, contact_id, sends),
            new=False,
            rows=1,
        )

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
            rows=len(contact_ids),
        )

    def send_to_active(self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str]) -> None:
        self._write(tenant_id)
        if not contact_ids:
            return
        self._counted(
            tenant_id,
            cycle_start_us,
            f"UPDATE activations SET sends = sends + 1 WHERE ctid = ANY(ARRAY({FOUND_BY_KEY.format(column='ctid')}))"
            " RETURNING 1::bigint AS sends",
            (list(contact_ids), tenant_id, cycle_start_us),
            new=False,
            rows=len(contact_ids),
        )

    def _counted(
        self, tenant_id: str, cycle_start_us: int, change: str, args: Sequence[Any], *, new: bool, rows: int
    ) -> None:
        """Runs `change` (an INSERT or UPDATE of activations returning the sends each row
        adds) and raises the cycle's figures by what it changed, in one statement sent
        later (`_later`): the contacts it activated when `new`, and their sends. A change
        that finds other than `rows` rows (a contact sent to that is not active) writes
        the sends as NULL, which the column refuses: the statement, and with it the
        unit, fails, as LookupError (`_pipeline`)."""
        self.fetched.forget(tenant_id, "counters", "active")
        self._later(
            f"WITH change AS ({change}), n AS (SELECT COUNT(*) AS rows, COALESCE(SUM(sends), 0) AS sends FROM change)"
            " INSERT INTO usage (tenant_id, cycle_start_us, active_contacts, sends)"
            " SELECT %s, %s, CASE WHEN %s THEN rows ELSE 0 END, CASE WHEN rows = %s THEN sends END FROM n"
            " ON CONFLICT (tenant_id, cycle_start_us) DO UPDATE SET"
            " active_contacts = usage.active_contacts + excluded.active_contacts,"
            " sends = usage.sends + excluded.sends",
            (*args, tenant_id, cycle_start_us, new, rows),
        )

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
        self._later(
            "INSERT INTO contacts (tenant_id, contact_id, held, marketing, marketing_until_next_update,"
            " marketing_source_type, marketing_source_id, updated_at_us, marketing_until_us, held_since_us)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (tenant_id, contact_id) DO UPDATE SET held = excluded.held,"
            " marketing = excluded.marketing, marketing_until_next_update = excluded.marketing_until_next_update,"
            " marketing_source_type = excluded.marketing_source_type,"
            " marketing_source_id = excluded.marketing_source_id, updated_at_us = excluded.updated_at_us,"
            " marketing_until_us = excluded.marketing_until_us, held_since_us = excluded.held_since_us",
            rows,
            many=True,
        )

    def store_result(self, tenant_id: str, rpc: str, request_id: str, result: StoredResult, at_us: int) -> None:
        assert result.context is not None
        self._write(tenant_id)
        self.fetched.forget(tenant_id, "result")
        c = result.context
        self._later(
            "INSERT INTO request_results (tenant_id, rpc, request_id, fingerprint, reply,"
            f" {CONTEXT_COLUMNS}, created_at_us)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                tenant_id,
                rpc,
                stored_id(request_id),
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
        self.fetched.forget(None, "result")
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
            self._later(
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
                stored_id(e.request_id) if e.request_id is not None else None,
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
        self._later(
            "INSERT INTO audit (at_us, tenant_id, cycle_start_us, rpc, request_id, contact_id, decision,"
            " reason, active_delta, sends_delta, held_delta) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            rows,
            many=True,
        )

    def put_notice(self, tenant_id: str, figure: UsageFigure, state: NoticeState) -> None:
        self._write(tenant_id)
        self.fetched.put_notice(tenant_id, figure.value, state)
        self._later(
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
        self._later(
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
        self._later(
            "INSERT INTO event_cursors (consumer, seq) VALUES (%s, %s)"
            " ON CONFLICT (consumer) DO UPDATE SET seq = GREATEST(event_cursors.seq, excluded.seq)",
            (consumer, seq),
        )

    def take_lease(self, name: str, holder: str, ttl_us: int) -> bool:
        """One statement: the row is taken (or renewed) only where it is free, expired or
        the holder's, and a racing taker waits for this one's row lock and then sees it."""
        row = self._one(
            f"INSERT INTO leases (name, holder, expires_us) VALUES (%s, %s, {NOW_US} + %s)"
            " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_us = excluded.expires_us"
            f" WHERE leases.holder = excluded.holder OR leases.expires_us <= {NOW_US} RETURNING holder",
            (name, holder, ttl_us),
        )
        return row is not None

    def release_lease(self, name: str, holder: str) -> None:
        self._later(
            f"UPDATE leases SET expires_us = LEAST(expires_us, {NOW_US}) WHERE name = %s AND holder = %s",
            (name, holder),
        )
