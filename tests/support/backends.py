"""Every ledger backend the contract suite runs over, and how a test holds a backend's writer.

SQLite runs on a file in the test's folder; PostgreSQL on a schema of its own, dropped
after the test (support/postgres.py), on the local server started for the session if down."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest

from quota_sidecar.server.ledger import Ledger, LedgerTx
from quota_sidecar.server.ledger.postgres import PostgresLedger
from quota_sidecar.server.ledger.sqlite import SQLiteLedger

from support.postgres import schema_at, schema_for, schema_url

CommitObserver = Callable[[float, int, bool], None]


@dataclass(frozen=True)
class Backend:
    name: str
    # a ledger (not yet opened) at `location`, a directory private to the test;
    # two ledgers made at the same location share one store
    make: Callable[..., Ledger]
    # the store at a location exists within the block and is gone after it
    store: Callable[[Path], AbstractContextManager[object]]
    # how many units are queued for the writer and not yet taken: lets a test line
    # units up behind a blocked writer so they share one group commit (None: the
    # backend runs each unit in its own transaction, and queues none)
    pending: Callable[[Ledger], int] | None = None
    # how many contacts the tenant's cycle filter is sized for, None while it has none
    # yet (the field is None for a backend that keeps no filter)
    filter_capacity: Callable[[Ledger, str, int], int | None] | None = None
    # whether it runs on the PostgreSQL server (started for the session if down)
    on_postgres: bool = False


def _sqlite_make(location: Path, on_commit: CommitObserver | None = None) -> Ledger:
    return SQLiteLedger(location / "ledger.db", on_commit=on_commit)


def _sqlite_pending(ledger: Ledger) -> int:
    assert isinstance(ledger, SQLiteLedger)
    return ledger.queued_units


def _sqlite_capacity(ledger: Ledger, tenant_id: str, cycle_start_us: int) -> int | None:
    assert isinstance(ledger, SQLiteLedger)
    f = ledger.filters.get(tenant_id, cycle_start_us)
    return None if f is None else sum(layer.capacity for layer in f.layers)


def _postgres_make(location: Path, on_commit: CommitObserver | None = None) -> Ledger:
    return PostgresLedger(schema_url(schema_at(location)), on_commit=on_commit)


SQLITE = Backend("sqlite", _sqlite_make, lambda location: nullcontext(), _sqlite_pending, _sqlite_capacity)
POSTGRES = Backend("postgres", _postgres_make, schema_for, on_postgres=True)
BACKENDS = [pytest.param(SQLITE, id="sqlite"), pytest.param(POSTGRES, id="postgres")]
# Group commit (units queued behind the writer, sharing one transaction) is the SQLite
# backend's own; PostgreSQL runs each unit in its own transaction, in parallel.
GROUPING = [pytest.param(SQLITE, id="sqlite")]
# One writer per store: the SQLite backend's filters and caches are exact only so.
SINGLE_WRITER = [pytest.param(SQLITE, id="sqlite")]
# Several ledgers (several sidecars) writing one store at once.
SHARED = [pytest.param(POSTGRES, id="postgres")]


class _Call:
    """transact(work) on a thread, with its result or exception."""

    def __init__(
        self, ledger: Ledger, work: Callable[[LedgerTx], object], weight: int = 1, deadline: float | None = None
    ) -> None:
        self.result: object = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = ledger.transact(work, weight=weight, deadline=deadline)
            except BaseException as exc:  # noqa: BLE001
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(30)
        assert not self.thread.is_alive(), "transact never returned"


@contextmanager
def writer_blocked(ledger: Ledger) -> Iterator[None]:
    """Holds the writer inside one unit until the block exits."""
    entered, release = threading.Event(), threading.Event()

    def gate(tx: LedgerTx) -> str:
        entered.set()
        release.wait(30)
        return "gate"

    call = _Call(ledger, gate)
    assert entered.wait(20), "the writer never ran the gate unit"
    try:
        yield
    finally:
        release.set()
        call.join()
        assert call.error is None and call.result == "gate"
