"""The SQLite ledger's group-commit writer: one connection, one thread, one fsync per group.

Callers hand the writer units of work; it takes every unit pending, runs each inside
its own savepoint of one `BEGIN IMMEDIATE` transaction, commits once, and only then
answers the callers: concurrent decisions share one fsync, and none is acknowledged
before it is durable. A caller that finds no commit under way and no unit waiting
commits its own unit on its own thread. Each unit says how many rows it writes about
(its weight); a transaction holds light units, or heavy ones up to COMMIT_WEIGHT, so
a light unit queued behind many heavy ones waits for one of them at most, not for
all of them. Built dedupe filters (dedupe.py) are installed between two commits.

A commit that fails fails every unit in it with LedgerUnavailable and leaves nothing
half-written (SQLite rolls the transaction back); the dedupe filters are dropped, as
they may hold contacts of the rolled-back units.
"""

from __future__ import annotations

import itertools
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from ...domain.errors import LedgerUnavailable
from .. import CommitObserver, LedgerTx, by_deadline
from .dedupe import Builds, Install
from .tx import Transaction

T = TypeVar("T")
log = logging.getLogger("quota_sidecar.ledger")

# A transaction holds units of at most SMALL_UNIT, or heavier ones weighing at most
# COMMIT_WEIGHT together (always one); the rest wait for the next transaction, light
# ones first: one large call's unit at a time holds the writer. While light units keep
# coming (one taken in the last LIGHT_RECENT_S seconds), a large call commits unit by
# unit (SQLiteLedger.transact_units), so the next light one waits for one unit at most.
COMMIT_WEIGHT = 512
SMALL_UNIT = 32
LIGHT_RECENT_S = 0.1


class _Stop:
    pass


class _Wake:
    """Wakes the writer thread for units a caller's own commit set aside."""


_STOP = _Stop()
_WAKE = _Wake()
Unit = tuple[Callable[[LedgerTx], Any], Future[Any], int]


class FailingObserver(Protocol):
    """Told when commits start failing (with why) and when they stop."""

    def __call__(self, failing: bool, why: object = None) -> None: ...


class Writer:
    """Commits units of work in groups on the writer's connection (`tx`). `heal` is run
    before and after each commit and answers why the ledger's file cannot be written
    now (None when it can); `failing` is told when commits start and stop failing;
    `on_commit` gets each commit's seconds, units and success."""

    def __init__(
        self,
        builds: Builds,
        *,
        max_batch: int,
        heal: Callable[[], str | None],
        failing: FailingObserver,
        on_commit: CommitObserver | None,
        light_recent_s: float = LIGHT_RECENT_S,
    ) -> None:
        self.max_batch = max_batch
        self.on_commit = on_commit
        self.tx: Transaction | None = None
        self.time_us = 0
        self.light_recent_s = light_recent_s
        self.light_at = float("-inf")
        self.open = False
        # Held by whoever commits (the writer thread or a caller leading), and by the
        # ledger's watcher while it probes or writes the file back.
        self.writing = threading.Lock()
        self._builds = builds
        self._heal = heal
        self._failing = failing
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._state = threading.Lock()
        self._signals = 0
        self._held = 0
        self._aside: list[Unit] = []
        self._thread: threading.Thread | None = None

    def start(self, tx: Transaction, time_us: int) -> None:
        """Takes units from now on, committing them through `tx`, from the ledger time `time_us`."""
        self.tx = tx
        self.time_us = time_us
        self.open = True
        self._thread = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
        self._thread.start()

    def stop(self) -> bool:
        """Takes no more units; the thread commits those queued and ends (`join`). False
        when it was not taking units."""
        with self._state:
            if not self.open:
                return False
            self.open = False
            self._queue.put(_STOP)
        return True

    def join(self) -> None:
        """Waits for the thread to commit what was queued before the stop and end."""
        if self._thread is not None:
            self._thread.join()

    def detach(self) -> None:
        """Lets go of the writer's transaction, once nothing commits any more."""
        with self.writing:
            self.tx = None

    def hand_over(self, install: Install, patience: float) -> bool:
        """Queues built filters for the writer and waits until they are installed; False
        once the writer stops taking work (checked every `patience` seconds)."""
        with self._state:
            if not self.open:
                return False
            self._signals += 1
            self._queue.put(install)
        while not install.done.wait(patience):
            if not self.open:
                return False
        return True

    @property
    def light_waits(self) -> bool:
        """Whether a unit waits for the writer, or a light one was taken in the last
        `light_recent_s` seconds (small calls are coming: the next may be on its way)."""
        return bool(self.queued_units) or time.monotonic() - self.light_at < self.light_recent_s

    @property
    def queued_units(self) -> int:
        """Units of work waiting for the writer."""
        with self._state:
            return self._queue.qsize() - self._signals + self._held + len(self._aside)

    def transact(self, work: Callable[[LedgerTx], T], *, weight: int = 1, deadline: float | None = None) -> T:
        """Runs `work` in a committed transaction. A caller that finds no commit under
        way and no unit waiting commits itself; otherwise its unit waits in the queue
        for the writer thread's next group commit. `weight`: about
        how many contacts (or tenants) the unit writes, so heavy units share no
        transaction with each other beyond COMMIT_WEIGHT. `deadline` as `Ledger.transact` takes it."""
        work = by_deadline(work, deadline)
        future: Future[T] = Future()
        unit = (work, future, weight)
        with self._state:
            if not self.open:
                raise LedgerUnavailable("the ledger is not open")
            # Leads only when no other unit waits: a caller committing unit after unit
            # would otherwise win the writing lock again and again over the writer
            # thread holding another caller's unit.
            waiting = self._held or self._aside or not self._queue.empty()
            leading = not waiting and self.writing.acquire(blocking=False)
            if not leading:
                self._queue.put(unit)
        if leading:
            try:
                stopping = self._commit_queued([], unit)
                if stopping or self._aside:
                    with self._state:
                        self._signals += 0 if stopping else 1
                        self._queue.put(_STOP if stopping else _WAKE)
            finally:
                self.writing.release()
        return future.result()

    def _write_loop(self) -> None:
        """Commits what callers queued while another commit was under way, and the
        units set aside by the last transaction (also after the stop, before closing)."""
        stopping = False
        while not stopping or self._aside:
            try:
                item = self._queue.get(block=not (stopping or self._aside))
            except queue.Empty:
                item = None
            held = isinstance(item, tuple)
            with self._state:
                if held:
                    self._held = 1
                elif isinstance(item, (Install, _Wake)):
                    self._signals -= 1
            with self.writing:
                if held:
                    with self._state:
                        self._held = 0
                stopping = self._commit_queued([], item) or stopping

    def _commit_queued(self, batch: list[tuple[Callable[[LedgerTx], Any], Future[Any]]], item: Any = None) -> bool:
        """Under the writing lock: takes the units set aside by the last transaction, then
        `item` and queued units (up to max_batch), installs built filters met on the
        way, commits them as one transaction. Heavy units beyond COMMIT_WEIGHT are set
        aside for the next one. Returns whether the stop was met."""
        stopping = False
        heavy = 0
        aside, self._aside = self._aside, []
        waiting = [u for u in aside if u[2] <= SMALL_UNIT] + [u for u in aside if u[2] > SMALL_UNIT] + [item]
        for met in itertools.chain(waiting, self._drained(batch)):
            if met is _STOP:
                stopping = True
            elif isinstance(met, Install):
                met(self.tx)
            elif isinstance(met, tuple):
                heavy = self._take(batch, met, heavy)
        if batch:
            assert self.tx is not None
            self._commit(self.tx, batch)
        return stopping

    def _drained(self, batch: list[tuple[Callable[[LedgerTx], Any], Future[Any]]]) -> Iterator[Any]:
        """Items taken from the queue while the transaction has room, up to the stop."""
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, (Install, _Wake)):
                with self._state:
                    self._signals -= 1
            yield item
            if item is _STOP:
                return

    def _take(self, batch: list[tuple[Callable[[LedgerTx], Any], Future[Any]]], unit: Unit, heavy: int) -> int:
        """Adds the unit to the transaction or sets it aside for the next. A transaction
        holds light units, or heavy ones weighing up to COMMIT_WEIGHT together (one at
        least), whichever it meets first. `heavy` and the result: the weight of its
        heavy units, -1 when it holds light ones, 0 when it is empty."""
        work, future, weight = unit
        if weight <= SMALL_UNIT:
            self.light_at = time.monotonic()
            fits, after = heavy <= 0, -1
        else:
            fits, after = heavy == 0 or 0 < heavy <= COMMIT_WEIGHT - weight, max(heavy, 0) + weight
        if not fits:
            self._aside.append(unit)
            return heavy
        batch.append((work, future))
        return after

    def _commit(self, tx: Transaction, batch: list[tuple[Callable[[LedgerTx], Any], Future[Any]]]) -> None:
        problem = self._heal()
        if problem is not None:
            self._fail(batch, problem)
            return
        conn = tx.conn
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            changes = conn.total_changes
            tx.noted_us = self.time_us
            alone = len(batch) == 1
            for work, future in batch:
                if not alone:
                    conn.execute("SAVEPOINT unit")
                mark, noted = len(tx.committed), tx.noted_us
                try:
                    result = work(tx)
                except BaseException as exc:
                    if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                        raise
                    conn.execute("ROLLBACK" if alone else "ROLLBACK TO unit")
                    if not alone:
                        conn.execute("RELEASE unit")
                    del tx.committed[mark:]
                    tx.noted_us = noted
                    tx.forget()
                    outcomes.append((future, None, exc))
                    continue
                if not alone:
                    conn.execute("RELEASE unit")
                outcomes.append((future, result, None))
            if conn.in_transaction:
                stamped = self._stamp(tx, changes)
                conn.execute("COMMIT")
                self.time_us = max(self.time_us, stamped)
        except sqlite3.Error as exc:
            tx.committed.clear()
            tx.forget()
            self._abort(conn, batch, exc)
            return
        problem = self._heal()
        if problem is not None:
            tx.committed.clear()
            tx.forget()
            self._fail(batch, problem)
            return
        self._builds.dispatch()
        callbacks, tx.committed = tx.committed, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("a callback after a ledger commit failed")
        self._failing(False)
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, len(batch), True)
        for future, result, error in outcomes:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _stamp(self, tx: Transaction, changes: int) -> int:
        """Inside the commit: moves the stored ledger time to the latest instant the
        batch's committed units noted, when the batch wrote anything (a batch that
        only read, a retry answered from its stored result, leaves the file as it
        was); returns it."""
        if tx.noted_us <= self.time_us or tx.conn.total_changes == changes:
            return self.time_us
        tx.conn.execute(
            "INSERT INTO ledger_time (id, at_us) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at_us = excluded.at_us",
            (tx.noted_us,),
        )
        return tx.noted_us

    def _abort(self, conn: sqlite3.Connection, batch: list[tuple[Any, Future[Any]]], exc: sqlite3.Error) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("rollback after a failed commit failed")
        self._fail(batch, f"the ledger cannot commit: {exc}")

    def _fail(self, batch: list[tuple[Any, Future[Any]]], why: str) -> None:
        """Answers every unit of a commit that did not happen with UNAVAILABLE."""
        self._builds.filters.forget()
        self._builds.abandon()
        self._failing(True, why)
        if self.on_commit is not None:
            self.on_commit(0.0, len(batch), False)
        error = LedgerUnavailable(why)
        for _, future in batch:
            future.set_exception(error)
