"""The SQLite ledger's writes: the writer's transaction, the SQL behind every `LedgerTx` method.

`Transaction` runs on the writer's one connection, inside the transaction the
writer (writer.py) opened. It remembers rows only this process writes (plans,
cycle figures, cycle keys, activity codes, usage contexts) so a decision reads
them once, and consults the dedupe filters (dedupe.py) before looking a contact
up; both stay exact only because the flock (files.py) keeps every other writer
off the file. What a unit rolled back wrote is forgotten with it (`forget`).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import astuple
from itertools import repeat
from typing import TypeVar

from ...domain.model import (
    Activation,
    AuditEntry,
    ContactRecord,
    Counters,
    Holdings,
    NoticeState,
    Reanchor,
    StoredPlan,
    StoredResult,
    UsageContext,
    UsageEvent,
    UsageFigure,
)
from .. import ReadAhead
from .dedupe import Builds, CycleFilter, DedupeFilters
from .rows import CONTEXT_COLUMNS, Reader, active_among, request_key

# The writer forgets what it remembers of one kind of row once it holds this many.
_REMEMBERED = 100_000
# A usage context's `used_us` is rewritten at most this often; one unused for longer
# than the request retention and this is taken by no answer kept.
CONTEXT_REFRESH_US = 3600 * 1_000_000


K = TypeVar("K")
V = TypeVar("V")


def _remember(cache: dict[K, V], key: K, value: V) -> None:
    """What the writer remembers of rows only it writes, bounded."""
    if len(cache) >= _REMEMBERED:
        cache.clear()
    cache[key] = value


def _prune_oldest(conn: sqlite3.Connection, table: str, key: str, age: str, before: int, limit: int) -> int:
    """Deletes, among the `limit` oldest rows of `table` by `key`, those whose `age` is below `before`."""
    return conn.execute(
        f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} ORDER BY {key} LIMIT ?) AND {age} < ?",
        (limit, before),
    ).rowcount


class Transaction(Reader):
    """The writer's view inside a transaction: reads see the transaction's own writes."""

    def __init__(self, conn: sqlite3.Connection, filters: DedupeFilters, builds: Builds) -> None:
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

    def read_ahead(self, tenant_id: str, ahead: ReadAhead) -> None:
        """Nothing to fetch ahead: a read here is no round trip, and what this writer
        remembers already spares the repeated ones."""

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
        found = set() if key is None or not maybe else active_among(self.conn, "cycle_key = ?", (key,), maybe)
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
                request_key(tenant_id, rpc, request_id),
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
            f"INSERT INTO usage_contexts ({CONTEXT_COLUMNS}, used_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            f" ON CONFLICT ({CONTEXT_COLUMNS}) DO UPDATE SET used_us = MAX(used_us, excluded.used_us)"
            " RETURNING id, used_us",
            (*astuple(context), at_us),
        ).fetchone()
        context_id: int = row[0]
        _remember(self._contexts, context, (context_id, row[1]))
        return context_id

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

    def take_lease(self, name: str, holder: str, ttl_us: int) -> bool:
        """Always taken: this sidecar is the file's only writer (its flock), so whoever held
        the lease before is a process that is gone."""
        self.conn.execute(
            "INSERT OR REPLACE INTO leases (name, holder, expires_us) VALUES (?, ?, ?)",
            (name, holder, time.time_ns() // 1000 + ttl_us),
        )
        return True

    def release_lease(self, name: str, holder: str) -> None:
        self.conn.execute(
            "UPDATE leases SET expires_us = MIN(expires_us, ?) WHERE name = ? AND holder = ?",
            (time.time_ns() // 1000, name, holder),
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
