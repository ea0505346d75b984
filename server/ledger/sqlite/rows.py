"""The SQLite ledger's reads: the SQL behind every `LedgerReader` method.

`Reader` reads over one connection inside a transaction the caller opened; readers
use it on their own connections, and the writer's transaction (tx.py) extends it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from ...domain.model import (
    Activation,
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
from .. import Lease

_KEY = "(SELECT cycle_key FROM cycle_keys WHERE tenant_id = ? AND cycle_start_us = ?)"
CONTEXT_COLUMNS = "tenant_id, cycle_start_us, cycle_end_us, contact_limit, sends_limit, currency, plan_name"


def request_key(tenant_id: str, rpc: str, request_id: str) -> bytes:
    """128 bits naming a request_id within its tenant and RPC (ids hold no NUL)."""
    name = f"{tenant_id}\x00{rpc}\x00{request_id}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(name, digest_size=16).digest()


class Reader:
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
        return active_among(self.conn, f"cycle_key = {_KEY}", (tenant_id, cycle_start_us), contact_ids)

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
            f"SELECT r.fingerprint, r.reply, {CONTEXT_COLUMNS} FROM request_replies r"
            " JOIN usage_contexts c ON c.id = r.context WHERE r.key = ?",
            (request_key(tenant_id, rpc, request_id),),
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
        seq: int = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM usage_events").fetchone()[0]
        return seq

    def lease(self, name: str) -> Lease | None:
        row = self.conn.execute("SELECT holder, expires_us FROM leases WHERE name = ?", (name,)).fetchone()
        return Lease(row[0], row[1], time.time_ns() // 1000) if row else None


def active_among(conn: sqlite3.Connection, key_sql: str, key: tuple[Any, ...], contact_ids: Sequence[str]) -> set[str]:
    if not contact_ids:
        return set()
    if len(contact_ids) == 1:
        sql = f"SELECT contact_id FROM cycle_activations WHERE {key_sql} AND contact_id = ?"
        return {r[0] for r in conn.execute(sql, (*key, contact_ids[0]))}
    sql = f"SELECT contact_id FROM cycle_activations WHERE {key_sql} AND contact_id IN (SELECT value FROM json_each(?))"
    return {r[0] for r in conn.execute(sql, (*key, json.dumps(contact_ids)))}
