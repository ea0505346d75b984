"""The sidecar's scenarios, each against the real `quota-sidecar serve` process.

The call scenarios (checksend, batch, coalesce, rename, floods) share one sidecar
on a fresh ledger, whose tenants have a CYCLE_ACTIVE / HARD plan with a contact
limit no run reaches. The memory, serving, tenants and restart scenarios work on
filled ledgers (bench/fills.py); sweep fills its own. The stall scenarios (floods,
sweep, restart) time a lone caller's CheckSend while something big runs, against
the same calls without it in the same run. Contact ids are random 16-hex-character strings made before
any timing starts; every answer is checked (ALLOW, and newly active or not as the
scenario expects), so a figure never counts refused or failed calls.
"""

from __future__ import annotations

import functools
import itertools
import random
import sqlite3
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from fills import FILTERS_TIMEOUT, FilledLedger, Ledgers, bench_plan, send_batch, tenant_contacts, tenant_ids
from floors import GrpcFloor
from processes import SidecarProcess
from session import Session
from timing import latencies, new_contact_ids, percentile, rate_in_threads, split

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.client import QuotaClient

TENANT = "bench"
NEVER_REACHED = 10_000_000
UNARY_TIMEOUT = 10.0
BATCH_TIMEOUT = 600.0
MAX_BATCH = 10_000


class WrongAnswer(RuntimeError):
    pass


def send_request(tenant_id: str, contact_id: str) -> pb.CheckSendRequest:
    return pb.CheckSendRequest(
        tenant_id=tenant_id, contact_id=contact_id, channel=pb.CHANNEL_EMAIL, kind=pb.MESSAGE_KIND_CAMPAIGN
    )


def _expect(answer: pb.CheckSendResponse, newly_active: bool) -> None:
    if answer.decision != pb.DECISION_ALLOW or answer.newly_active != newly_active:
        raise WrongAnswer(
            f"CheckSend answered {pb.Decision.Name(answer.decision)} {pb.Reason.Name(answer.reason)}"
            f" newly_active={answer.newly_active}, expected ALLOW newly_active={newly_active}"
        )


def _checked_call(
    stub: pb_grpc.QuotaServiceStub, request: pb.CheckSendRequest, newly_active: bool
) -> Callable[[], None]:
    def call() -> None:
        _expect(stub.CheckSend(request, timeout=UNARY_TIMEOUT), newly_active)

    return call


def caller(channel: grpc.Channel, requests: Sequence[pb.CheckSendRequest], newly_active: bool) -> Callable[[], int]:
    """One concurrent caller: its own stub on the shared channel."""
    stub = pb_grpc.QuotaServiceStub(channel)

    def run() -> int:
        for request in requests:
            _expect(stub.CheckSend(request, timeout=UNARY_TIMEOUT), newly_active)
        return len(requests)

    return run


def _activate(stub: pb_grpc.QuotaServiceStub, tenant_id: str, ids: list[str]) -> None:
    for at in range(0, len(ids), MAX_BATCH):
        chunk = ids[at : at + MAX_BATCH]
        answer = stub.CheckSendBatch(send_batch(tenant_id, chunk), timeout=BATCH_TIMEOUT)
        if answer.allowed != len(chunk):
            raise WrongAnswer(f"CheckSendBatch allowed {answer.allowed} of {len(chunk)}")


def call_sidecar(session: Session) -> SidecarProcess:
    """The sidecar the call scenarios share, its tenant's plan stored."""
    sidecar = SidecarProcess(session.processes, session.folder / "calls.db")
    try:
        sidecar.start()
        sidecar.put_plan(TENANT, bench_plan(NEVER_REACHED, (pb.ACTIVITY_KIND_STATUS_RENAMED,)))
    except BaseException:
        sidecar.kill()
        raise
    return sidecar


def checksend(
    session: Session, sidecar: SidecarProcess, floor: GrpcFloor | None = None, figures: str = "checksend"
) -> None:
    """CheckSend p50/p99 of one caller and calls/s of `threads` callers, new then active contacts,
    stored under `figures` (`checksend.new.p50_ms` ...); with `floor`, one run of the floor's figures
    right before each run of these."""
    s = session.sizes
    stub = sidecar.quota()
    warm = [send_request(TENANT, c) for c in new_contact_ids(s.warmup)]
    latencies([_checked_call(stub, r, True) for r in warm])
    latencies([_checked_call(stub, r, False) for r in warm])
    for _ in range(session.repeat):
        if floor is not None:
            floor.measure()
        requests = [send_request(TENANT, c) for c in new_contact_ids(s.calls)]
        for label, newly in (("new", True), ("active", False)):
            samples = latencies([_checked_call(stub, r, newly) for r in requests])
            session.results.add(f"{figures}.{label}.p50_ms", percentile(samples, 0.5) * 1e3)
            session.results.add(f"{figures}.{label}.p99_ms", percentile(samples, 0.99) * 1e3)
        parts = split([send_request(TENANT, c) for c in new_contact_ids(s.concurrent_calls)], s.threads)
        for label, newly in (("new", True), ("active", False)):
            rate = rate_in_threads([caller(sidecar.channel(), part, newly) for part in parts])
            session.results.add(f"{figures}.{label}.rate", rate)


def batch(session: Session, sidecar: SidecarProcess, figures: str = "batch") -> None:
    """CheckSendBatch decisions/s (median over batches), new contacts then the same ones active,
    stored under `figures` (`batch.new.rate` ...)."""
    s = session.sizes
    stub = sidecar.quota()
    warm = [send_batch(TENANT, new_contact_ids(s.batch)) for _ in range(2)]
    _batch_rate(stub, warm, new=True)
    _batch_rate(stub, warm, new=False)
    for _ in range(session.repeat):
        requests = [send_batch(TENANT, new_contact_ids(s.batch)) for _ in range(s.batches)]
        session.results.add(f"{figures}.new.rate", _batch_rate(stub, requests, new=True))
        session.results.add(f"{figures}.active.rate", _batch_rate(stub, requests, new=False))


def _batch_rate(stub: pb_grpc.QuotaServiceStub, requests: list[pb.CheckSendBatchRequest], *, new: bool) -> float:
    """Median decisions/s over the batches; `new`: every contact is expected to be newly active,
    otherwise every one already active."""
    rates = []
    for request in requests:
        size = len(request.contact_ids)
        elapsed = latencies([functools.partial(batch_call, stub, request, size if new else 0)])[0]
        rates.append(size / elapsed)
    return statistics.median(rates)


def batch_call(stub: pb_grpc.QuotaServiceStub, request: pb.CheckSendBatchRequest, newly_active: int) -> None:
    answer = stub.CheckSendBatch(request, timeout=BATCH_TIMEOUT)
    if answer.allowed != len(request.contact_ids) or answer.newly_active != newly_active:
        raise WrongAnswer(
            f"CheckSendBatch allowed {answer.allowed}, newly active {answer.newly_active}"
            f" of {len(request.contact_ids)}; expected all allowed, {newly_active} newly active"
        )


def coalesce(session: Session, sidecar: SidecarProcess) -> None:
    """CheckSend through one QuotaClient from `callers` threads: plain unary vs coalesced."""
    s = session.sizes
    clients: dict[str, QuotaClient] = {}
    try:
        try:
            clients["plain"] = QuotaClient(sidecar.address, coalesce=False, timeout=UNARY_TIMEOUT)
            clients["coalesced"] = QuotaClient(sidecar.address, coalesce=True, timeout=UNARY_TIMEOUT)
        except TypeError:
            clients["plain"] = QuotaClient(sidecar.address, timeout=UNARY_TIMEOUT)
            for label in ("new", "active"):
                session.results.missing(
                    f"coalesce.coalesced.{label}.rate", "QuotaClient does not accept coalesce= in this checkout"
                )
        for client in clients.values():
            ids = new_contact_ids(max(s.warmup, s.callers))
            for newly in (True, False):
                rate_in_threads([_client_caller(client, part, newly) for part in split(ids, s.callers)])
        for _ in range(session.repeat):
            for mode, client in clients.items():
                parts = split(new_contact_ids(s.coalesce_calls), s.callers)
                for label, newly in (("new", True), ("active", False)):
                    rate = rate_in_threads([_client_caller(client, part, newly) for part in parts])
                    session.results.add(f"coalesce.{mode}.{label}.rate", rate)
    finally:
        for client in clients.values():
            client.close()


def _client_caller(client: QuotaClient, contact_ids: Sequence[str], newly_active: bool) -> Callable[[], int]:
    def run() -> int:
        for contact_id in contact_ids:
            d = client.check_send(TENANT, contact_id, "CAMPAIGN")
            if d.fallback or d.decision != "ALLOW" or d.newly_active != newly_active:
                raise WrongAnswer(
                    f"check_send answered {d.decision} {d.reason} newly_active={d.newly_active}"
                    f" fallback={d.fallback} ({d.error}), expected ALLOW newly_active={newly_active}"
                )
        return len(contact_ids)

    return run


def rename(session: Session, sidecar: SidecarProcess) -> None:
    """RecordActivity STATUS_RENAMED with `rename_contacts` contacts, all active already: seconds per call."""
    s = session.sizes
    stub = sidecar.quota()
    ids = new_contact_ids(s.rename_contacts)
    _activate(stub, TENANT, ids)
    request = pb.RecordActivityRequest(tenant_id=TENANT, kind=pb.ACTIVITY_KIND_STATUS_RENAMED, contact_ids=ids)

    def call() -> None:
        answer = stub.RecordActivity(request, timeout=BATCH_TIMEOUT)
        if answer.recorded != len(ids) or answer.newly_active != 0:
            raise WrongAnswer(f"RecordActivity recorded {answer.recorded}, newly active {answer.newly_active}")

    latencies([call])
    for _ in range(session.repeat):
        samples = latencies([call] * s.rename_calls)
        session.results.add("rename.seconds", statistics.median(samples))


def retention(session: Session) -> None:
    """Ledger bytes per CheckSend to an active contact under a fresh request_id (as the Python
    client sends one): while every answer is still kept, and at steady state, once answers
    past --request-retention are pruned as fast as they come (--prune-interval 0.1 s). Each
    run waits for the answers of the run before to be pruned first."""
    keep = session.sizes.retention_seconds
    sidecar = SidecarProcess(
        session.processes,
        session.folder / "retention.db",
        flags=["--request-retention", str(keep), "--prune-interval", "0.1"],
    )
    sidecar.start()
    try:
        sidecar.put_plan(TENANT, bench_plan(NEVER_REACHED))
        stub = sidecar.quota()
        contacts = new_contact_ids(100)
        for c in contacts:
            stub.CheckSend(send_request(TENANT, c), timeout=UNARY_TIMEOUT)
        for _ in range(session.repeat):
            time.sleep(keep + 0.5)
            started = time.monotonic()
            before, sent = ledger_bytes(sidecar.ledger), _send_for(stub, contacts, keep * 0.8)
            session.results.add("retention.kept_bytes_per_call", (ledger_bytes(sidecar.ledger) - before) / sent)
            _send_for(stub, contacts, started + 2 * keep - time.monotonic())
            before, sent = ledger_bytes(sidecar.ledger), _send_for(stub, contacts, 2 * keep)
            session.results.add("retention.steady_bytes_per_call", (ledger_bytes(sidecar.ledger) - before) / sent)
    finally:
        sidecar.stop()


def _send_for(stub: pb_grpc.QuotaServiceStub, contacts: Sequence[str], seconds: float) -> int:
    """CheckSends to active contacts, each under a fresh request_id, for `seconds`; returns how many."""
    until, sent = time.monotonic() + seconds, 0
    while time.monotonic() < until:
        request = send_request(TENANT, contacts[sent % len(contacts)])
        request.request_id = uuid.uuid4().hex
        _checked_call(stub, request, False)()
        sent += 1
    return sent


def ledger_bytes(path: Path) -> int:
    """The bytes of the ledger's pages in use (free pages left by pruning excluded; its
    WAL's committed pages included), read from the file."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()


def memory(session: Session, ledgers: Ledgers) -> None:
    """RSS growth per million contacts activated, dedupe bytes per contact and ledger bytes
    per contact, from `repeat` fresh fills of one tenant (at its limit)."""
    n = session.sizes.memory_contacts
    for run in range(session.repeat):
        filled = ledgers.fill(1, n, keep=run == session.repeat - 1)
        session.results.add("memory.rss_per_million", (filled.rss_after - filled.rss_before) / n * 1e6)
        if filled.dedupe_items >= n:
            session.results.add("memory.dedupe_bytes_per_contact", filled.dedupe_bytes / filled.dedupe_items)
        else:
            session.results.missing(
                "memory.dedupe_bytes_per_contact", f"the filters held {filled.dedupe_items:,.0f} of {n:,} contacts"
            )
        session.results.add("ledger.bytes_per_contact", filled.bytes_on_disk / n)
        ledgers.discard(filled)


def serving(session: Session, ledgers: Ledgers) -> None:
    """Seconds from spawning `quota-sidecar serve` to health SERVING over a ledger of M active
    contacts, and to its dedupe filters holding all M; then RSS and dedupe bytes per contact."""
    for contacts in session.sizes.serving_contacts:
        filled = ledgers.get(1, contacts)
        _restart(session, filled)
        for _ in range(session.repeat):
            key = f"serving.{contacts}"
            figures = _restart(session, filled)
            session.results.add(f"{key}.s", figures["serving"])
            if figures["filters"] is None:
                session.results.missing(f"{key}.filters_s", f"filters not loaded within {FILTERS_TIMEOUT:.0f} s")
                continue
            session.results.add(f"{key}.filters_s", figures["filters"])
            session.results.add(f"{key}.rss_mb", figures["rss"] / 1e6)
            session.results.add(f"{key}.dedupe_bytes_per_contact", figures["dedupe_bytes"] / contacts)


def _restart(session: Session, filled: FilledLedger) -> dict[str, float | None]:
    with SidecarProcess(session.processes, filled.path) as sidecar:
        serving_s = sidecar.start()
        filters_s = sidecar.wait_filters(filled.contacts, FILTERS_TIMEOUT)
        rss = sidecar.rss_bytes()
        metrics = sidecar.metrics()
    return {
        "serving": serving_s,
        "filters": filters_s,
        "rss": rss,
        "dedupe_bytes": metrics.get("quota_dedupe_filter_bytes", 0.0),
    }


class _TenantSample:
    """Random picks of a filled ledger's active contacts: batches of one tenant's contacts and
    single contacts, each from a random tenant."""

    def __init__(self, filled: FilledLedger, batch: int, seed: int) -> None:
        self.filled = filled
        self.names = tenant_ids(filled.tenants)
        self.size = min(batch, min(filled.counts))
        self.rng = random.Random(seed)

    def batches(self, n: int) -> list[pb.CheckSendBatchRequest]:
        out = []
        for _ in range(n):
            t = self.rng.randrange(self.filled.tenants)
            start = self.rng.randrange(self.filled.counts[t] - self.size + 1)
            out.append(send_batch(self.names[t], tenant_contacts(t, start, self.size)))
        return out

    def singles(self, n: int) -> list[pb.CheckSendRequest]:
        out = []
        for _ in range(n):
            t = self.rng.randrange(self.filled.tenants)
            contact = tenant_contacts(t, self.rng.randrange(self.filled.counts[t]), 1)[0]
            out.append(send_request(self.names[t], contact))
        return out


def tenants(session: Session, ledgers: Ledgers) -> None:
    """The same total of active contacts in 1 tenant and in `tenants` tenants: batch decisions/s
    (batches of the tenants' active contacts, spread over tenants), CheckSend p50 (active
    contacts of random tenants), RSS and dedupe after SERVING, ledger bytes per contact and
    time to SERVING and to the dedupe filters holding every contact (the figures after it are
    taken once they do). Both layouts use the same batch size, at most one tenant's share."""
    s = session.sizes
    for count in (1, s.tenants):
        filled = ledgers.get(count, s.tenant_contacts)
        session.progress(f"tenants: {count:,} tenant(s), {session.repeat} start(s)")
        sample = _TenantSample(filled, s.batch, seed=count)
        key = f"tenants.{count}"
        session.results.add(f"{key}.batch_size", sample.size)
        session.results.add(f"{key}.ledger_bytes_per_contact", filled.bytes_on_disk / filled.contacts)
        for _ in range(session.repeat):
            warm_batches, timed_batches = sample.batches(2), sample.batches(s.batches)
            warm_singles, timed_singles = sample.singles(s.warmup), sample.singles(s.calls)
            with SidecarProcess(session.processes, filled.path) as sidecar:
                seconds = sidecar.start()
                filters_s = sidecar.wait_filters(filled.contacts, FILTERS_TIMEOUT)
                rss = sidecar.rss_bytes()
                metrics = sidecar.metrics()
                stub = sidecar.quota()
                _batch_rate(stub, warm_batches, new=False)
                latencies([_checked_call(stub, r, False) for r in warm_singles])
                rate = _batch_rate(stub, timed_batches, new=False)
                samples = latencies([_checked_call(stub, r, False) for r in timed_singles])
            session.results.add(f"{key}.serving_s", seconds)
            session.results.add(f"{key}.rss_mb", rss / 1e6)
            if filters_s is None:
                session.results.missing(f"{key}.filters_s", f"filters not loaded within {FILTERS_TIMEOUT:.0f} s")
            else:
                session.results.add(f"{key}.filters_s", filters_s)
                session.results.add(
                    f"{key}.dedupe_bytes_per_contact",
                    metrics.get("quota_dedupe_filter_bytes", 0.0) / filled.contacts,
                )
            session.results.add(f"{key}.batch_rate", rate)
            session.results.add(f"{key}.p50_ms", percentile(samples, 0.5) * 1e3)


LONE = "lone"
# What the sidecar logs once its metrics board holds every tenant (server/app.py).
BOARD_LOADED = "tenant figures for metrics loaded"


def _lone_calls(stub: pb_grpc.QuotaServiceStub, count: int) -> list[float]:
    """Seconds each of `count` CheckSends of the lone tenant took (new contacts, one at a time)."""
    return latencies([_checked_call(stub, send_request(LONE, c), True) for c in new_contact_ids(count)])


def _lone_for(stub: pb_grpc.QuotaServiceStub, seconds: float) -> list[float]:
    """The lone tenant's CheckSends, one at a time, for `seconds` (at least 10 calls)."""
    samples: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end or len(samples) < 10:
        samples += _lone_calls(stub, 1)
    return samples


class _Load:
    """Callers repeating a call in threads until stopped; `started` once each has made its first call."""

    def __init__(self, calls: Sequence[Callable[[], None]]) -> None:
        self._stop = threading.Event()
        self._first = threading.Barrier(len(calls) + 1)
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run, args=(call,), daemon=True) for call in calls]

    def _run(self, call: Callable[[], None]) -> None:
        first = True
        try:
            while first or not self._stop.is_set():
                call()
                if first:
                    first = False
                    self._first.wait()
        except BaseException as exc:
            self.errors.append(exc)
            self._first.abort()

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        self._first.wait(BATCH_TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        if self.errors:
            raise self.errors[0]


def _flooding_batch(stub: pb_grpc.QuotaServiceStub, tenant_id: str, size: int) -> Callable[[], None]:
    """CheckSendBatch of `size` contacts, made in turn from a few prepared requests (new, then active)."""
    requests = [send_batch(tenant_id, new_contact_ids(size)) for _ in range(3)]
    turn = itertools.cycle(requests)

    def call() -> None:
        request = next(turn)
        answer = stub.CheckSendBatch(request, timeout=BATCH_TIMEOUT)
        if answer.allowed != len(request.contact_ids):
            raise WrongAnswer(f"CheckSendBatch allowed {answer.allowed} of {len(request.contact_ids)}")

    return call


def _flooding_activity(stub: pb_grpc.QuotaServiceStub, tenant_id: str, size: int) -> Callable[[], None]:
    request = pb.RecordActivityRequest(
        tenant_id=tenant_id, kind=pb.ACTIVITY_KIND_STATUS_RENAMED, contact_ids=new_contact_ids(size)
    )

    def call() -> None:
        answer = stub.RecordActivity(request, timeout=BATCH_TIMEOUT)
        if answer.recorded != size:
            raise WrongAnswer(f"RecordActivity recorded {answer.recorded} of {size}")

    return call


def floods(session: Session, sidecar: SidecarProcess) -> None:
    """A lone CheckSend of one tenant, p99 unloaded and while other tenants flood the sidecar:
    `floods` callers of CheckSendBatch x`flood_batch`, then one RecordActivity x`flood_activity`."""
    s = session.sizes
    stub = sidecar.quota()
    flooders = [f"flood-{i}" for i in range(s.floods)]
    for tenant_id in (LONE, *flooders):
        sidecar.put_plan(tenant_id, bench_plan(NEVER_REACHED, (pb.ACTIVITY_KIND_STATUS_RENAMED,)))
    _lone_calls(stub, s.warmup)
    loads = {
        "batches": lambda: [_flooding_batch(sidecar.quota(), t, s.flood_batch) for t in flooders],
        "activity": lambda: [_flooding_activity(sidecar.quota(), flooders[0], s.flood_activity)],
    }
    for _ in range(session.repeat):
        unloaded = _lone_for(stub, s.flood_seconds)
        session.results.add("floods.unloaded.p99_ms", percentile(unloaded, 0.99) * 1e3)
        for label, make in loads.items():
            with _Load(make()):
                loaded = _lone_for(stub, s.flood_seconds)
            session.results.add(f"floods.{label}.p99_ms", percentile(loaded, 0.99) * 1e3)
            session.results.add(f"floods.{label}.max_ms", max(loaded) * 1e3)


def sweep(session: Session, ledgers: Ledgers) -> None:
    """A lone CheckSend's p99 over a ledger of `sweep_tenants` tenants past a notify threshold
    (reminders due every second): with the reminder sweep off (an hour apart), and while it
    runs every second; each timed once the dedupe filters hold every contact and the
    metrics board every tenant (the seconds after a start are the restart scenario's)."""
    s = session.sizes
    path = session.folder / f"sweep-{s.sweep_tenants}.db"
    names = [f"swept-{i:06d}" for i in range(s.sweep_tenants)]
    quiet = ("--reminder-interval", "3600")
    session.progress(f"sweep: {s.sweep_tenants:,} tenants past a threshold")
    with SidecarProcess(session.processes, path, flags=quiet) as sidecar:
        sidecar.start()
        plan = bench_plan(2)
        plan.notify_thresholds.append(0.5)
        plan.renotify_interval.FromSeconds(1)
        sidecar.put_plan(LONE, bench_plan(NEVER_REACHED))
        quota = sidecar.quota()

        def past_threshold(tenant_id: str) -> None:
            sidecar.put_plan(tenant_id, plan)
            answer = quota.CheckSendBatch(send_batch(tenant_id, new_contact_ids(2)), timeout=UNARY_TIMEOUT)
            if answer.allowed != 2:
                raise WrongAnswer(f"CheckSendBatch allowed {answer.allowed} of 2")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(past_threshold, names))
    for _ in range(session.repeat):
        for label, extra in (("without", quiet), ("during", ("--reminder-interval", "1"))):
            with SidecarProcess(session.processes, path, flags=extra) as sidecar:
                sidecar.start()
                loaded = sidecar.wait_filters(2 * s.sweep_tenants, FILTERS_TIMEOUT) is not None
                if not (loaded and sidecar.wait_logged(BOARD_LOADED, FILTERS_TIMEOUT)):
                    raise WrongAnswer(f"the filters and the metrics board were not loaded within {FILTERS_TIMEOUT} s")
                stub = sidecar.quota()
                _lone_calls(stub, s.warmup)
                samples = _lone_for(stub, s.sweep_seconds)
            session.results.add(f"sweep.{label}.p99_ms", percentile(samples, 0.99) * 1e3)
            session.results.add(f"sweep.{label}.max_ms", max(samples) * 1e3)


def restart(session: Session, ledgers: Ledgers) -> None:
    """CheckSend to active contacts of random tenants (`tenants` of them) right after a restart,
    for `restart_seconds` from SERVING while the dedupe filters build, against the same calls
    once they are built: the first call, the p99, and the calls over 100 ms."""
    s = session.sizes
    filled = ledgers.get(s.tenants, s.tenant_contacts)
    sample = _TenantSample(filled, 1, seed=13)
    for _ in range(session.repeat):
        with SidecarProcess(session.processes, filled.path) as sidecar:
            sidecar.start()
            stub = sidecar.quota()
            early: list[float] = []
            end = time.monotonic() + s.restart_seconds
            while time.monotonic() < end:
                early += latencies([_checked_call(stub, r, False) for r in sample.singles(20)])
            sidecar.wait_filters(filled.contacts, FILTERS_TIMEOUT)
            steady = latencies([_checked_call(stub, r, False) for r in sample.singles(s.calls)])
        session.results.add("restart.first_ms", early[0] * 1e3)
        session.results.add("restart.early.p99_ms", percentile(early, 0.99) * 1e3)
        session.results.add("restart.early.slow_calls", sum(1 for t in early if t > 0.1))
        session.results.add("restart.steady.p99_ms", percentile(steady, 0.99) * 1e3)
