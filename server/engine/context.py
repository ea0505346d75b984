"""What the engine's jobs share: the ledger and its time, the parsed-plan cache, the
notice states already known, and the usage board; and the ways every job runs its
work, in a ledger transaction (`transact`), in units of contacts (`in_units`), and
with the notices and board a change of figures calls for (`observe`).

One per process and thread-safe: the caches only ever hold what the ledger says
(a plan is reused while its stored JSON is unchanged; a notice state is put only
after its transaction commits, and read only while the ledger is its store's sole
writer: another sidecar may re-arm a threshold this one last saw told).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import TypeVar

from ..domain.clock import Clock, LedgerTime
from ..domain.cycles import Cycle
from ..domain.errors import NotFound
from ..domain.figures import current_cycle, cycle_of
from ..domain.model import NoticeState, Plan, Usage, UsageEvent, UsageFigure
from ..domain.notices import evaluate, level_of, ratio_of, settled
from ..ledger import Ledger, LedgerReader, LedgerTx, ReadAhead
from ..metrics.board import UsageBoard
from .deadline import call_deadline

R = TypeVar("R")


class EngineContext:
    """The state and the ways of working that the engine's job modules share."""

    def __init__(
        self,
        ledger: Ledger,
        clock: Clock,
        on_events: Callable[[Sequence[UsageEvent]], None] | None,
        unit_contacts: int,
    ) -> None:
        self.ledger = ledger
        self.clock = LedgerTime(clock, lambda: ledger.time_us)
        self.unit_contacts = unit_contacts
        self.board = UsageBoard()
        self.on_events = on_events
        self._plans: dict[str, tuple[str, Plan]] = {}
        self._notices: dict[tuple[str, UsageFigure], NoticeState] = {}

    def transact(self, unit: Callable[[LedgerTx], R], *, weight: int = 1) -> R:
        """Runs `unit` in a ledger transaction that keeps the ledger time it decided at;
        `weight` as `Ledger.transact` takes it."""
        return self.ledger.transact(self._timed(unit), weight=weight, deadline=call_deadline())

    def _timed(self, unit: Callable[[LedgerTx], R]) -> Callable[[LedgerTx], R]:
        def timed(tx: LedgerTx) -> R:
            result = unit(tx)
            tx.note_time(self.clock.latest_us)
            return result

        return timed

    def in_units(self, contact_ids: Sequence[str], unit: Callable[..., R]) -> list[R]:
        """Commits `unit(tx, ids=, index=)` over the call's contacts: all in one unit, or
        its distinct contacts in request order, `unit_contacts` at a time, each unit
        deciding after the ones before it (`Ledger.transact_units`); returns their answers."""
        unique = list(dict.fromkeys(contact_ids))
        size = self.unit_contacts
        if len(unique) <= size:
            return [self.transact(partial(unit, ids=contact_ids, index=0), weight=len(contact_ids))]
        parts = [unique[i : i + size] for i in range(0, len(unique), size)]
        units = [self._timed(partial(unit, ids=ids, index=i)) for i, ids in enumerate(parts)]
        return self.ledger.transact_units(units, weights=[len(ids) for ids in parts], deadline=call_deadline())

    def cut_of(self, contact_ids: Sequence[str]) -> tuple[int, ...]:
        """Part of the fingerprint of a call over `contact_ids`: () when it is one unit,
        (unit_contacts,) when `in_units` cuts it. Each unit's answer is kept by its place
        in the cut, so a retry cut otherwise (another unit size, on another backend or
        version) is refused as another request rather than read against other contacts."""
        return (self.unit_contacts,) if len(set(contact_ids)) > self.unit_contacts else ()

    def read_ahead(self, tx: LedgerTx, tenant_id: str, contact_ids: Sequence[str], rpc: str, request_id: str) -> None:
        """Tells the ledger what a send decision will read of the tenant: the plan, the
        notice states, the stored result of the request_id, and, in the current cycle of
        the plan this process last read, the figures and which of the contacts are active.
        That plan may have changed since: the cycle is only where to look, and a read of
        another cycle goes to the store."""
        cached = self._plans.get(tenant_id)
        cycle = current_cycle(cached[1], self.clock.now_us()) if cached is not None else None
        ahead = ReadAhead(
            cycle.start_us if cycle is not None else None, contact_ids, (rpc, request_id) if request_id else None
        )
        tx.read_ahead(tenant_id, ahead)

    def plan(self, reader: LedgerReader, tenant_id: str) -> Plan:
        """The tenant's current plan; NotFound without one."""
        stored = reader.plan(tenant_id)
        if stored is None:
            raise NotFound(f"tenant {tenant_id!r} has no plan")
        cached = self._plans.get(tenant_id)
        if cached is not None and cached[0] == stored.plan_json:
            return cached[1]
        plan = Plan.from_json(stored.plan_json)
        self._plans[tenant_id] = (stored.plan_json, plan)
        return plan

    def plan_of_cycle(self, r: LedgerReader, tenant_id: str, plan: Plan, at_us: int | None) -> tuple[Plan, Cycle]:
        """The cycle of the current `plan` containing `at_us` (default now) and the plan in
        force at its end: a past cycle is reported and invoiced under the plan it ended with."""
        now = self.clock.now_us()
        cycle = cycle_of(r, tenant_id, plan, at_us if at_us is not None else now)
        if cycle.end_us <= now:
            stored = r.plan_at(tenant_id, cycle.end_us)
            if stored is not None:
                plan = Plan.from_json(stored.plan_json)
        return plan, cycle

    def observe(
        self, tx: LedgerTx, plan: Plan, usage: Usage, now: int, *, rearm: bool = False, remind: bool = False
    ) -> list[UsageEvent]:
        """After a change to a tenant's figures, in its transaction: writes the events
        of thresholds crossed (or reminders due) to the outbox, and once committed puts
        the usage on the board. A figure whose notice state is settled costs no read."""
        tenant_id = usage.tenant_id
        events: list[UsageEvent] = []
        states: list[tuple[tuple[str, UsageFigure], NoticeState]] = []
        for figure in UsageFigure:
            ratio = ratio_of(usage, figure)
            key = (tenant_id, figure)
            known = self._notices.get(key) if self.ledger.sole_writer else None
            level = level_of(plan.notify_thresholds, ratio)
            if not rearm and not remind and settled(known, level, usage.cycle_start_us):
                continue
            stored = tx.notice(tenant_id, figure)
            state, notices = evaluate(
                plan.notify_thresholds,
                figure,
                ratio,
                usage.cycle_start_us,
                stored,
                now,
                rearm=rearm,
                renotify_us=plan.renotify_interval_us,
                remind=remind,
            )
            if state != stored and (stored is not None or state.level > 0):
                tx.put_notice(tenant_id, figure, state)
            states.append((key, state))
            for n in notices:
                event = UsageEvent(uuid.uuid4().hex, n.type, n.figure, tenant_id, n.threshold, now, usage)
                events.append(replace(event, sequence=tx.add_event(event)))

        def committed() -> None:
            self.board.put(usage)
            self._notices.update(states)
            if events and self.on_events is not None:
                self.on_events(events)

        tx.after_commit(committed)
        return events
