"""The PostgreSQL scenarios (issue 16): one sidecar on PostgreSQL beside the SQLite one, and
1 vs `--fleet-sidecars` sidecars sharing one PostgreSQL ledger.

Each ledger is a schema of its own in the database `--postgres` names, made for it and
dropped when the run ends; the sidecars reach it through the URL's search_path. The
PostgreSQL server is the caller's (the local cluster by default): the bench does not start
it. `postgres` runs the SQLite sidecar's CheckSend and CheckSendBatch scenarios on a sidecar
over PostgreSQL. `fleet` starts 1 and then N sidecars on a fresh schema each and measures,
with the same callers going round the sidecars: CheckSend calls/s to new contacts of one
tenant and of a tenant per caller, CheckSendBatch decisions/s of one tenant, and a race at a
HARD limit (the contacts admitted past it: the goal is none).
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import grpc
import psycopg
import scenarios
from fills import bench_plan, send_batch
from processes import SidecarProcess
from scenarios import NEVER_REACHED, UNARY_TIMEOUT, WrongAnswer, batch_call, caller, send_request
from session import Session
from sizes import Sizes
from timing import new_contact_ids, rate_in_threads, split

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
ONE_TENANT = "bench-fleet"
RACE_TENANT = "bench-race"


class Schemas:
    """Schemas made for the run's ledgers in one PostgreSQL database, dropped on close()."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.made: list[str] = []

    def fresh(self) -> str:
        """The URL of a ledger in a new, empty schema."""
        name = f"quota_bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.server, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        self.made.append(name)
        separator = "&" if "?" in self.server else "?"
        return f"{self.server}{separator}options=-csearch_path%3D{name}"

    def close(self) -> None:
        if not self.made:
            return
        with psycopg.connect(self.server, autocommit=True, connect_timeout=5) as conn:
            for name in self.made:
                conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        self.made.clear()


def postgres(session: Session, schemas: Schemas) -> None:
    """The checksend and batch scenarios on one sidecar over PostgreSQL, with `postgres_calls` calls where
    the SQLite sidecar makes `calls` and `concurrent_calls` (a decision takes longer: the run stays short)."""
    s = session.sizes
    sized = dataclasses.replace(
        session, sizes=dataclasses.replace(s, calls=s.postgres_calls, concurrent_calls=s.postgres_calls)
    )
    with SidecarProcess(session.processes, schemas.fresh()) as sidecar:
        sidecar.start()
        sidecar.put_plan(scenarios.TENANT, bench_plan(NEVER_REACHED))
        scenarios.checksend(sized, sidecar, figures="postgres.checksend")
        scenarios.batch(sized, sidecar, figures="postgres.batch")


@contextmanager
def fleet_of(session: Session, schemas: Schemas, size: int) -> Iterator[list[SidecarProcess]]:
    """`size` sidecars on one fresh schema, started one after another (the first creates it)."""
    url = schemas.fresh()
    sidecars = [SidecarProcess(session.processes, url) for _ in range(size)]
    try:
        for sidecar in sidecars:
            sidecar.start()
        yield sidecars
    except BaseException:
        for sidecar in sidecars:
            sidecar.kill()
        raise
    for sidecar in sidecars:
        sidecar.stop()


def fleet(session: Session, schemas: Schemas) -> None:
    """1 and then `fleet_sidecars` sidecars on one schema each: the same callers, going round them."""
    s = session.sizes
    tenants = [f"bench-tenant-{n}" for n in range(s.threads)]
    for size in sorted({1, s.fleet_sidecars}):
        with fleet_of(session, schemas, size) as sidecars:
            for tenant_id in (ONE_TENANT, *tenants):
                sidecars[0].put_plan(tenant_id, bench_plan(NEVER_REACHED))
            channels = [sidecar.channel() for sidecar in sidecars]
            rate_in_threads(_callers(channels, [ONE_TENANT] * s.threads, s.warmup))
            for _ in range(session.repeat):
                one = rate_in_threads(_callers(channels, [ONE_TENANT] * s.threads, s.postgres_calls))
                session.results.add(f"fleet.{size}.one_tenant.rate", one)
                each = rate_in_threads(_callers(channels, tenants, s.postgres_calls))
                session.results.add(f"fleet.{size}.tenants.rate", each)
                session.results.add(f"fleet.{size}.batch.rate", _batch_rate(channels, s))
            if size == s.fleet_sidecars:
                for _ in range(session.repeat):
                    session.results.add("fleet.race.over_admitted", _race(sidecars, s))


def _callers(channels: Sequence[grpc.Channel], tenant_of: Sequence[str], count: int) -> list[Callable[[], int]]:
    """One caller per entry of `tenant_of`, sending CheckSend for its share of `count` new contacts of that
    tenant, through the sidecars in turn (caller n through sidecar n mod their number)."""
    parts = split(new_contact_ids(count), len(tenant_of))
    return [
        caller(channels[n % len(channels)], [send_request(tenant_of[n], c) for c in part], True)
        for n, part in enumerate(parts)
    ]


def _batch_rate(channels: Sequence[grpc.Channel], s: Sizes) -> float:
    """Decisions/s of `fleet_sidecars` callers (as many whatever the sidecars), each sending `batches`
    batches of `batch` new contacts of one tenant through its sidecar, the callers dealt round them."""

    def sender(n: int) -> Callable[[], int]:
        stub = pb_grpc.QuotaServiceStub(channels[n % len(channels)])
        requests = [send_batch(ONE_TENANT, new_contact_ids(s.batch)) for _ in range(s.batches)]

        def run() -> int:
            for request in requests:
                batch_call(stub, request, s.batch)
            return s.batches * s.batch

        return run

    return rate_in_threads([sender(n) for n in range(s.fleet_sidecars)])


def _race(sidecars: list[SidecarProcess], s: Sizes) -> int:
    """`threads` callers going round the sidecars ask for twice `race_limit` new contacts of a fresh tenant
    whose HARD limit is `race_limit`; returns how many were admitted past it (the goal: none)."""
    tenant_id = f"{RACE_TENANT}-{uuid.uuid4().hex[:8]}"
    sidecars[0].put_plan(tenant_id, bench_plan(s.race_limit))
    admitted = [0] * s.threads
    parts = split(new_contact_ids(2 * s.race_limit), s.threads)
    stubs = [pb_grpc.QuotaServiceStub(sidecars[n % len(sidecars)].channel()) for n in range(s.threads)]
    rate_in_threads([functools.partial(_racer, stubs[n], tenant_id, part, admitted, n) for n, part in enumerate(parts)])
    if sum(admitted) < s.race_limit:
        raise WrongAnswer(
            f"{sum(admitted)} of {2 * s.race_limit} new contacts admitted under a limit of {s.race_limit}"
        )
    return sum(admitted) - s.race_limit


def _racer(
    stub: pb_grpc.QuotaServiceStub, tenant_id: str, contacts: Sequence[str], admitted: list[int], slot: int
) -> int:
    """CheckSend of each contact; notes in `admitted[slot]` how many were newly counted."""
    for contact_id in contacts:
        answer = stub.CheckSend(send_request(tenant_id, contact_id), timeout=UNARY_TIMEOUT)
        admitted[slot] += answer.decision == pb.DECISION_ALLOW and answer.newly_active
    return len(contacts)
