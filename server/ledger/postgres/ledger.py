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

Round trips. A unit's BEGIN travels with its first statement, which is the tenant's lock
(`SELECT ... FOR UPDATE`, the row inserted first when the tenant is new). What the unit
said it would read of the tenant (`LedgerTx.read_ahead`: a send decision's plan, notice
states, stored result, and the figures and activations of the cycle it expects) follows
the lock in the same pipeline: under READ COMMITTED each statement of a pipeline takes
its snapshot when it starts, so those reads run once the lock is granted and see every
commit of the tenant before it (one statement joining the lock to them would not: a
statement that waited for a row lock sees the other tables as they were when it
started). The unit's reads of exactly those rows are answered from what was fetched,
until it writes what they show; anything else is read from the store, and nothing
fetched outlives the transaction. Writes whose answers the unit does not need (its
activations and the figures they raise, its stored result, notice states, audit rows)
are sent with its next statement or, mostly, with the ledger time it keeps and COMMIT,
in one round trip: a CheckSend is two round trips, one more when it adds an event (its
sequence is read back). A write the database refuses so fails the unit at the latest
at its commit, which then does not happen.

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

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
import psycopg.errors
import psycopg_pool

from ...domain.errors import LedgerUnavailable
from .. import CommitObserver, Ledger, LedgerReader, LedgerTx, by_deadline
from .rows import OPEN_STATES, Reader
from .schema import migrate
from .tx import Transaction

T = TypeVar("T")
log = logging.getLogger("quota_sidecar.ledger")

# How many times a unit aborted as a deadlock (or a serialization failure) is run.
ATTEMPTS = 8
RETRY_PAUSE_S = 0.005
_RETRIED = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
# Errors of the store, not of a unit: the connection or the server failed.
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed)


def _configure(conn: psycopg.Connection) -> None:
    """Every connection: transactions opened explicitly, commits durable whatever the server's default."""
    conn.autocommit = True
    conn.execute("SET synchronous_commit = on")


class PostgresLedger(Ledger):
    """The ledger in a PostgreSQL database (a libpq URL: `postgresql://user@host:port/db?...`),
    shared by any number of sidecars."""

    # What a unit runs in: the SQL of each read and write, and the tenant locks.
    transaction = Transaction

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
        tx = self.transaction(conn)
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
            if conn.info.transaction_status in OPEN_STATES:
                conn.execute("ROLLBACK")
            raise
        return result

    def _committed(self, tx: Transaction, stamped: int) -> None:
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
                    return work(Reader(conn))
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
