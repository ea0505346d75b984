"""The client library against a real `quota-sidecar serve` process that is stopped,
frozen (SIGSTOP), slowed by a busy ledger, or killed and restarted under load.

Checks never hang and never raise for an unreachable sidecar: they answer the client's
fail mode marked `fallback=True`; other calls raise Unavailable. A retry carries the
first try's request_id, so a call that crossed a freeze or a restart counts once, even
when its first answer was committed and then lost with the connection (a TCP relay
between one client and the sidecar holds and drops it). Both QuotaClient and
AsyncQuotaClient are tested; the asyncio client runs on an event loop of its own,
driven from the test's threads. Rule ids refer to domain.md.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import pytest

from quota_sidecar.client import (
    AsyncQuotaClient,
    DeadlineExceeded,
    QuotaClient,
    Retry,
    SendDecision,
    Unavailable,
)

from support.process import TOKEN, Process, ledger_rows, put_plan, start
from support.serving import free_port

pytestmark = pytest.mark.process

T = TypeVar("T")
TENANT = "t"
SAFETY = 30.0
SHORT = 0.3
PATIENT = 5.0
RESTARTS = 2
CLIENTS = ["QuotaClient", "AsyncQuotaClient"]
FAIL_MODES = [("closed", "DENY"), ("open", "ALLOW")]


class AsyncDriven:
    """An AsyncQuotaClient built and run on an event loop in a thread of its own; each
    method is called from blocking code and waits for its coroutine (SAFETY bounds a hang)."""

    def __init__(self, target: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def build() -> AsyncQuotaClient:
            return AsyncQuotaClient(target, **options)

        self.client = self._run(build())

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=SAFETY)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._run(method(*args, **kwargs))

        return call

    def close(self) -> None:
        try:
            self._run(self.client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=SAFETY)
            self._loop.close()

    def __enter__(self) -> AsyncDriven:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


Client = QuotaClient | AsyncDriven


def connect(kind: str, target: str, **options: Any) -> Client:
    if kind == "QuotaClient":
        return QuotaClient(target, **options)
    return AsyncDriven(target, **options)


class Background:
    """A call running in a thread of its own; `result()` is its result (or its exception,
    raised there) and fails the test if the call has not returned within SAFETY seconds,
    a bound far above any deadline the call was given."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._outcome: list[tuple[bool, Any]] = []
        self._call = call
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome.append((True, self._call()))
        except BaseException as exc:
            self._outcome.append((False, exc))

    def result(self) -> Any:
        self._thread.join(SAFETY)
        assert self._outcome, "the call hung instead of returning"
        ok, value = self._outcome[0]
        if not ok:
            raise value
        return value


def returned(call: Callable[[], T]) -> T:
    """The call's result, failing the test if it hangs (see Background)."""
    return Background(call).result()


class Relay:
    """A TCP relay in front of the sidecar: the network between one client and it.
    `hold()` keeps what the sidecar sends from reaching the client (an answer on its way);
    `cut()` drops every connection and refuses new ones, as a network outage would, until
    `resume()`; connections are then relayed to whatever listens at the sidecar's address."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._down = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down:
                client.close()
                continue
            try:
                server = socket.create_connection(self._upstream, timeout=SAFETY)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_sidecar: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_sidecar:
                    self._flowing.wait()
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                s.close()

    def hold(self) -> None:
        self._flowing.clear()

    def cut(self) -> None:
        self._down = True
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._flowing.set()

    def resume(self) -> None:
        self._down = False

    def close(self) -> None:
        self._listener.close()
        self.cut()


def activation_sends(ledger: Path) -> dict[str, int]:
    """Each activated contact of the tenant and the sends its row holds."""
    return {a.contact_id: a.sends for a in ledger_rows(ledger, TENANT).activations()}


def assert_figures_match_rows(ledger: Path) -> None:
    assert ledger_rows(ledger, TENANT).figures()


@pytest.fixture
def sidecar_process(tmp_path: Path, processes: list[Process]) -> Process:
    """A serving `quota-sidecar` process where tenant "t" may e-mail 1,000 contacts (CAMPAIGN counted)."""
    p = start(tmp_path / "ledger.db")
    processes.append(p)
    p.wait_serving()
    put_plan(p.address, 1000)
    return p


def assert_real_new(decision: SendDecision) -> None:
    assert (decision.decision, decision.reason, decision.newly_active, decision.fallback) == (
        "ALLOW",
        "NEW_CONTACT_COUNTED",
        True,
        False,
    )


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("fail_mode, fallback", FAIL_MODES)
def test_an_ended_process_makes_checks_fall_back_and_other_calls_raise_unavailable_SG_1(
    sidecar_process: Process, kind: str, fail_mode: str, fallback: str
) -> None:
    """Once the process has exited (SIGTERM, exit 0), every check answers the fail mode at
    once, marked fallback with the Unavailable it met, and counts nothing (SG-1: no contact
    becomes active without a real ALLOW); usage, activity and admin calls raise Unavailable."""
    p = sidecar_process
    retry = Retry(attempts=3, backoff=0.01)
    with connect(kind, p.address, admin_token=TOKEN, fail_mode=fail_mode, retries=retry, timeout=PATIENT) as client:
        assert_real_new(client.check_send(TENANT, "c1", "CAMPAIGN"))
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=SAFETY) == 0

        sent = returned(lambda: client.check_send(TENANT, "c2", "CAMPAIGN"))
        batch = returned(lambda: client.check_send_batch(TENANT, ["c3", "c4"], "CAMPAIGN"))
        added = returned(lambda: client.check_contact_add(TENANT, ["c5"], "API"))
        enrolled = returned(lambda: client.check_enroll(TENANT, "c1", "welcome"))
        for result in (sent, batch, added, enrolled):
            assert result.fallback is True and result.usage is None
            assert type(result.error) is Unavailable
        assert (sent.decision, sent.newly_active) == (fallback, False)
        assert [(r.contact_id, r.decision) for r in batch.results] == [("c3", fallback), ("c4", fallback)]
        assert (added.decision, added.added) == (fallback, 0)
        assert enrolled.decision == fallback
        for call in (
            lambda: client.get_usage(TENANT),
            lambda: client.record_activity(TENANT, ["c6"], "NOTE_ADDED"),
            lambda: client.get_plan(TENANT),
        ):
            with pytest.raises(Unavailable) as caught:
                returned(call)
            assert caught.value.code is grpc.StatusCode.UNAVAILABLE

    rows = ledger_rows(p.ledger, TENANT)
    assert rows.active_ids() == {"c1"} and rows.figures() == [(1, 1, 1, 1)]


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("fail_mode, fallback", FAIL_MODES)
def test_a_frozen_process_makes_checks_fall_back_at_their_deadline_and_retries_count_once_SG_8(
    sidecar_process: Process, kind: str, fail_mode: str, fallback: str
) -> None:
    """A process frozen with SIGSTOP accepts connections but answers nothing: each check
    returns its fail mode at its deadline (DEADLINE_EXCEEDED, not retried) instead of
    hanging, and GetUsage raises DeadlineExceeded. After SIGCONT calls are answered again,
    and the frozen sends, batch and add asked again with their request_ids get one real
    answer each, asked twice the same one: every contact is counted once (SG-8)."""
    p = sidecar_process
    with connect(kind, p.address, admin_token=TOKEN, fail_mode=fail_mode) as client:
        assert_real_new(client.check_send(TENANT, "c1", "CAMPAIGN", timeout=PATIENT))

        def ask(timeout: float) -> tuple[Any, ...]:
            return (
                returned(lambda: client.check_send(TENANT, "c2", "CAMPAIGN", request_id="send-c2", timeout=timeout)),
                returned(
                    lambda: client.check_send_batch(
                        TENANT, ["c3", "c4"], "CAMPAIGN", request_id="batch-c3-c4", timeout=timeout
                    )
                ),
                returned(lambda: client.check_contact_add(TENANT, ["c5"], "API", request_id="add-c5", timeout=timeout)),
                returned(lambda: client.check_enroll(TENANT, "c1", "welcome", timeout=timeout)),
            )

        p.proc.send_signal(signal.SIGSTOP)
        try:
            frozen = ask(SHORT)
            with pytest.raises(DeadlineExceeded):
                returned(lambda: client.get_usage(TENANT, timeout=SHORT))
        finally:
            p.proc.send_signal(signal.SIGCONT)
        sent, batch, added, enrolled = frozen
        for result in frozen:
            assert result.fallback is True and isinstance(result.error, DeadlineExceeded)
        assert sent.decision == added.decision == enrolled.decision == fallback
        assert {r.decision for r in batch.results} == {fallback}

        first = ask(PATIENT)
        assert first == ask(PATIENT)
        sent, batch, added, enrolled = first
        assert_real_new(sent)
        assert (batch.fallback, batch.allowed, batch.newly_active) == (False, 2, 2)
        assert (added.fallback, added.decision, added.added) == (False, "ALLOW", 1)
        assert (enrolled.fallback, enrolled.decision, enrolled.reason) == (False, "ALLOW", "ALREADY_ACTIVE")
        usage = client.get_usage(TENANT, timeout=PATIENT)
        assert (usage.active_contacts, usage.sends) == (4, 4)
    assert activation_sends(p.ledger) == {"c1": 1, "c2": 1, "c3": 1, "c4": 1}
    assert_figures_match_rows(p.ledger)


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("fail_mode, fallback", FAIL_MODES)
def test_a_busy_ledger_makes_checks_fall_back_and_the_retry_counts_once_SG_8(
    sidecar_process: Process, kind: str, fail_mode: str, fallback: str
) -> None:
    """While another connection holds the ledger's write lock (BEGIN IMMEDIATE), a check
    falls back at its deadline while reads (GetUsage) still answer from the committed
    figures; once the lock is released the check asked again with its request_id gets one
    real answer, and the contact is counted once (SG-8): figures equal rows."""
    p = sidecar_process
    with connect(kind, p.address, fail_mode=fail_mode) as client:
        assert_real_new(client.check_send(TENANT, "c1", "CAMPAIGN", timeout=PATIENT))
        holder = sqlite3.connect(p.ledger, isolation_level=None, timeout=SAFETY)
        try:
            holder.execute("BEGIN IMMEDIATE")
            busy = returned(lambda: client.check_send(TENANT, "c2", "CAMPAIGN", request_id="busy-c2", timeout=SHORT))
            during = returned(lambda: client.get_usage(TENANT, timeout=PATIENT))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert (busy.decision, busy.fallback) == (fallback, True)
        assert isinstance(busy.error, DeadlineExceeded)
        assert (during.active_contacts, during.sends) == (1, 1)

        again = client.check_send(TENANT, "c2", "CAMPAIGN", request_id="busy-c2", timeout=PATIENT)
        assert_real_new(again)
        assert client.check_send(TENANT, "c2", "CAMPAIGN", request_id="busy-c2", timeout=PATIENT) == again
        usage = client.get_usage(TENANT, timeout=PATIENT)
        assert (usage.active_contacts, usage.sends) == (2, 2)
    assert activation_sends(p.ledger) == {"c1": 1, "c2": 1}
    assert_figures_match_rows(p.ledger)


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_send_the_fail_closed_client_denied_on_a_busy_ledger_is_never_counted_SG_1_SG_6(
    sidecar_process: Process, kind: str
) -> None:
    """SG-1, SG-6: a contact becomes active by being e-mailed. When the ledger is busy past a
    send's deadline, the fail-closed client answers DENY and the worker does not e-mail the
    contact; once the lock is released that unanswered decision must not make the contact
    active: the figures equal the answers the client acknowledged."""
    p = sidecar_process
    with connect(kind, p.address, fail_mode="closed") as client:
        assert_real_new(client.check_send(TENANT, "c1", "CAMPAIGN", timeout=PATIENT))
        holder = sqlite3.connect(p.ledger, isolation_level=None, timeout=SAFETY)
        try:
            holder.execute("BEGIN IMMEDIATE")
            denied = returned(lambda: client.check_send(TENANT, "c2", "CAMPAIGN", timeout=SHORT))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert (denied.decision, denied.fallback) == ("DENY", True)
        assert_real_new(client.check_send(TENANT, "c3", "CAMPAIGN", timeout=PATIENT))
        usage = client.get_usage(TENANT, timeout=PATIENT)
    assert activation_sends(p.ledger) == {"c1": 1, "c3": 1}
    assert (usage.active_contacts, usage.sends) == (2, 2)


@dataclass(frozen=True)
class Call:
    contact_id: str
    started: float
    ended: float
    decision: SendDecision


class Workers:
    """Mail workers sending to new contacts through one client until stopped; every call
    is kept with when it started and ended, any exception is kept as a failure."""

    def __init__(self, client: Client, count: int = 3) -> None:
        self.client = client
        self.calls: list[Call] = []
        self.errors: list[BaseException] = []
        self.in_call: list[bool] = [False] * count
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(count)]

    def run(self, n: int) -> None:
        i = 0
        while not self.stopping.is_set():
            contact = f"w{n}-{i}"
            i += 1
            self.in_call[n] = True
            started = time.monotonic()
            try:
                decision = self.client.check_send(TENANT, contact, "CAMPAIGN")
            except BaseException as exc:
                with self.lock:
                    self.errors.append(exc)
                return
            finally:
                self.in_call[n] = False
            with self.lock:
                self.calls.append(Call(contact, started, time.monotonic(), decision))

    def real(self) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if not c.decision.fallback]

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + SAFETY
        while not condition():
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"never happened: {what}"
            time.sleep(0.01)

    def __enter__(self) -> Workers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(SAFETY)
        assert not any(t.is_alive() for t in self.threads), "a worker's call hung"


@pytest.mark.parametrize(
    "kind, stop, fail_mode",
    [
        ("QuotaClient", signal.SIGTERM, "closed"),
        ("QuotaClient", signal.SIGKILL, "open"),
        ("AsyncQuotaClient", signal.SIGTERM, "open"),
        ("AsyncQuotaClient", signal.SIGKILL, "closed"),
    ],
    ids=["sync-SIGTERM", "sync-SIGKILL", "async-SIGTERM", "async-SIGKILL"],
)
def test_a_restart_under_load_loses_nothing_and_counts_each_contact_once_SG_8(
    tmp_path: Path, processes: list[Process], kind: str, stop: signal.Signals, fail_mode: str
) -> None:
    """The process is stopped (SIGTERM: drained, exit 0; or SIGKILL) and started again on the
    same address and ledger, twice, while workers send to new contacts through one client
    retrying UNAVAILABLE. Every call returns, a real decision or a fallback, none raises;
    calls in flight across each restart are answered by the new process. Before each stop
    one more send, through a relay, is decided and committed but its answer is lost with the
    connection, and the network stays down until the new process serves: the client's
    retries cross the restart with the same request_id and get that first answer. Every
    contact a real decision activated is in the ledger, every row holds one send (SG-8: no
    retry across a restart counted twice) and the new process reports those figures."""
    ledger = tmp_path / "ledger.db"
    address = f"127.0.0.1:{free_port()}"
    current = start(ledger, address=address)
    processes.append(current)
    current.wait_serving()
    put_plan(address, 1_000_000)
    exited = 0 if stop == signal.SIGTERM else -signal.SIGKILL
    retry = Retry(attempts=1000, backoff=0.02, max_backoff=0.2, max_elapsed=SAFETY / 2)
    options = {"fail_mode": fail_mode, "timeout": PATIENT, "retries": retry}
    relay = Relay(address)
    lost: dict[str, SendDecision] = {}
    restarts: list[float] = []
    try:
        with connect(kind, address, **options) as client, connect(kind, relay.address, **options) as relayed:
            with Workers(client) as workers:
                for k in range(RESTARTS):
                    wanted = len(workers.real()) + 30
                    workers.wait_until(lambda n=wanted: len(workers.real()) >= n, "30 real decisions before the stop")
                    relayed.get_usage(TENANT)
                    contact = f"x{k}"
                    relay.hold()
                    answer = Background(lambda c=contact: relayed.check_send(TENANT, c, "CAMPAIGN"))
                    workers.wait_until(
                        lambda c=contact: c in activation_sends(ledger), f"the relayed send {contact} committed"
                    )
                    relay.cut()
                    current.proc.send_signal(stop)
                    assert current.proc.wait(timeout=SAFETY) == exited
                    workers.wait_until(lambda: all(workers.in_call), "every worker retrying while nothing listens")
                    restarts.append(time.monotonic())
                    current = start(ledger, address=address)
                    processes.append(current)
                    current.wait_serving()
                    relay.resume()
                    lost[contact] = answer.result()
                wanted = len(workers.real()) + 30
                workers.wait_until(lambda: len(workers.real()) >= wanted, "30 real decisions from the last process")
            assert workers.errors == []
            usage = client.get_usage(TENANT, timeout=PATIENT)
    finally:
        relay.close()

    for decision in lost.values():
        assert_real_new(decision)
    fallbacks = [c for c in workers.calls if c.decision.fallback]
    assert all(c.decision.decision == ("ALLOW" if fail_mode == "open" else "DENY") for c in fallbacks)
    real = workers.real()
    for c in real:
        assert_real_new(c.decision)
    for restarted in restarts:
        assert any(c.started < restarted < c.ended for c in real), "no call was in flight across a restart"
    rows = activation_sends(ledger)
    assert {c.contact_id for c in real} | set(lost) <= set(rows)
    assert set(rows) <= {c.contact_id for c in workers.calls} | set(lost)
    assert set(rows.values()) == {1}
    assert (usage.active_contacts, usage.sends) == (len(rows), len(rows))
    assert_figures_match_rows(ledger)
