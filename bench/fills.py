"""Ledgers holding N active contacts in T tenants, filled through the real sidecar.

A fill starts `quota-sidecar serve` on a fresh ledger file, stores one plan per
tenant with PutPlan, activates every contact with CheckSendBatch calls of up to
10,000 contacts, then stops the process with SIGTERM. Its measurements (RSS before
the activations and after them once the dedupe filters hold every contact, the
filters' figures, the bytes on disk) are the memory and ledger figures; the ledger
itself is kept for the scenarios that restart a sidecar on it.

Contact ids are 16 hexadecimal characters, random but reproducible per tenant
(`tenant_contacts`), so a scenario can name any tenant's active contacts again
without the run holding millions of them in memory.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from floors import ledger_bytes, remove_ledger
from processes import SidecarProcess
from session import Session
from timing import shares

from quota_sidecar.api.v1 import quota_pb2 as pb

FILL_TIMEOUT = 600.0
FILTERS_TIMEOUT = 600.0


def bench_plan(contact_limit: int, activities: tuple[int, ...] = ()) -> pb.Plan:
    """A CYCLE_ACTIVE / HARD plan counting CAMPAIGN sends (and the given activities)."""
    return pb.Plan(
        plan_name="bench",
        metering=pb.METERING_CYCLE_ACTIVE,
        enforcement=pb.ENFORCEMENT_HARD,
        contact_limit=contact_limit,
        counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
        counted_activities=list(activities),
    )


def send_batch(tenant_id: str, contact_ids: list[str]) -> pb.CheckSendBatchRequest:
    return pb.CheckSendBatchRequest(
        tenant_id=tenant_id, channel=pb.CHANNEL_EMAIL, kind=pb.MESSAGE_KIND_CAMPAIGN, contact_ids=contact_ids
    )


def tenant_ids(count: int) -> list[str]:
    return [f"tenant-{i:06d}" for i in range(count)]


def tenant_contacts(tenant: int, start: int, count: int) -> list[str]:
    """Contacts start..start+count of a tenant: 16 hex characters each, the same on every call."""
    salt = f"bench:{tenant}:".encode()
    return [hashlib.blake2b(salt + b"%d" % i, digest_size=8).hexdigest() for i in range(start, start + count)]


@dataclass(frozen=True)
class FilledLedger:
    path: Path
    tenants: int
    contacts: int
    counts: tuple[int, ...]
    bytes_on_disk: int
    start_empty_s: float
    rss_before: int
    rss_after: int
    dedupe_bytes: float
    dedupe_items: float


class Ledgers:
    """Filled ledgers of this run by (tenants, contacts), filled once and then shared."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._kept: dict[tuple[int, int], FilledLedger] = {}
        self._fills = 0

    def get(self, tenants: int, contacts: int) -> FilledLedger:
        found = self._kept.get((tenants, contacts))
        return found if found is not None else self.fill(tenants, contacts)

    def fill(self, tenants: int, contacts: int, *, keep: bool = True) -> FilledLedger:
        """A fresh ledger with `contacts` active contacts dealt over `tenants` tenants,
        each tenant's plan limit being its share (a tenant at its limit)."""
        s = self.session
        self._fills += 1
        path = s.folder / f"ledger-{self._fills:02d}-{tenants}t-{contacts}c.db"
        s.progress(f"filling a ledger: {contacts:,} active contacts in {tenants:,} tenant(s)")
        counts = shares(contacts, tenants)
        names = tenant_ids(tenants)
        step = min(s.sizes.fill_batch, 10_000)
        with SidecarProcess(s.processes, path) as sidecar:
            start_empty = sidecar.start()
            s.results.add("serving.empty.s", start_empty)
            with ThreadPoolExecutor(8) as pool:
                plans = [bench_plan(max(1, n)) for n in counts]
                list(pool.map(sidecar.put_plan, names, plans))
            rss_before = sidecar.rss_bytes()
            quota = sidecar.quota()

            def activate(job: tuple[int, int]) -> None:
                tenant, start = job
                ids = tenant_contacts(tenant, start, min(step, counts[tenant] - start))
                answer = quota.CheckSendBatch(send_batch(names[tenant], ids), timeout=FILL_TIMEOUT)
                if answer.newly_active != len(ids):
                    raise RuntimeError(f"fill: {answer.newly_active} of {len(ids)} contacts activated")

            jobs = [(t, at) for t in range(tenants) for at in range(0, counts[t], step)]
            in_flight = 2 if min(counts) >= step else 8
            with ThreadPoolExecutor(in_flight) as pool:
                list(pool.map(activate, jobs))
            sidecar.wait_filters(contacts, FILTERS_TIMEOUT)
            rss_after = sidecar.rss_bytes()
            metrics = sidecar.metrics()
        filled = FilledLedger(
            path=path,
            tenants=tenants,
            contacts=contacts,
            counts=tuple(counts),
            bytes_on_disk=ledger_bytes(path),
            start_empty_s=start_empty,
            rss_before=rss_before,
            rss_after=rss_after,
            dedupe_bytes=metrics.get("quota_dedupe_filter_bytes", 0.0),
            dedupe_items=metrics.get("quota_dedupe_filter_items", 0.0),
        )
        s.progress(f"filled: {filled.bytes_on_disk:,} bytes on disk")
        if keep:
            self._kept[(tenants, contacts)] = filled
        return filled

    def discard(self, filled: FilledLedger) -> None:
        if self._kept.get((filled.tenants, filled.contacts)) is not filled:
            remove_ledger(filled.path)
