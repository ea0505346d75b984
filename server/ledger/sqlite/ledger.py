"""The embedded SQLite ledger (`SQLiteLedger`): one file in WAL mode, opened, read and closed.

It puts the package's parts together: the file and its lock (files.py), the schema
(schema.py), the reads (rows.py), the group-commit writer (writer.py) and its
transaction (tx.py), and the dedupe filters built in the background (dedupe.py).
Readers use their own connections, one per thread, and see committed state.

Faults of the store are answered, never hidden. A commit that fails (disk full,
file made read-only, I/O error) marks the ledger not ready; a watcher thread then
tries a small write every `check_interval` seconds and marks it ready again once
one commits. A ledger file (or its WAL) removed underneath the sidecar is written
back from the connection that still holds it, before any commit that went into the
removed file is acknowledged, so nothing acknowledged is lost with it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from prometheus_client.registry import Collector

from ...domain.errors import LedgerUnavailable
from .. import CommitObserver, Ledger, LedgerReader, LedgerTx, by_deadline
from ..verification import Mismatch
from .dedupe import Builds, DedupeCollector, DedupeFilters, FilterBuilder, request_latest
from .files import LedgerFile
from .rows import Reader
from .schema import migrate
from .tx import Transaction
from .verify import find_mismatches
from .writer import COMMIT_WEIGHT, LIGHT_RECENT_S, Writer

T = TypeVar("T")
log = logging.getLogger("quota_sidecar.ledger")

SYNCHRONOUS_MODES = ("FULL", "EXTRA", "NORMAL")
STARTUP_TENANTS_LOGGED = 20


class SQLiteLedger(Ledger):
    """The embedded default ledger in one SQLite file (WAL mode).

    One writer serves every tenant, so a unit of a large call is what a small call of
    any tenant may wait for: units are small (`unit_contacts`), and consecutive units of
    a call share a transaction while no other unit waits (`transact_units`)."""

    unit_contacts = 100

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: str = "FULL",
        max_batch: int = 1024,
        filter_fp_rate: float = 0.001,
        on_commit: CommitObserver | None = None,
        on_ready: Callable[[bool], None] | None = None,
        check_interval: float = 0.5,
        light_recent_s: float = LIGHT_RECENT_S,
    ) -> None:
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.filters = DedupeFilters(filter_fp_rate)
        self.on_ready = on_ready
        self.check_interval = check_interval
        self._file = LedgerFile(self.path, self.synchronous)
        self._conn: sqlite3.Connection | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._failing = False
        self._builds = Builds(self.filters)
        self._writer = Writer(
            self._builds,
            max_batch=max_batch,
            heal=self._heal,
            failing=self._set_failing,
            on_commit=on_commit,
            light_recent_s=light_recent_s,
        )
        self._builder = FilterBuilder(
            self._builds,
            self._file.connect,
            lambda: self._file.generation,
            lambda install: self._writer.hand_over(install, self.check_interval),
        )
        self._watcher: threading.Thread | None = None
        self._watch_stop = threading.Event()

    @property
    def time_us(self) -> int:
        return self._writer.time_us

    @property
    def ready(self) -> bool:
        return self._writer.open and not self._failing

    @property
    def sole_writer(self) -> bool:
        return True

    @property
    def loading(self) -> bool:
        """Whether dedupe filters are being built (their contacts are confirmed in the ledger meanwhile)."""
        return self.filters.building > 0

    def collector(self) -> Collector:
        """The dedupe filters' figures (`quota_dedupe_*`)."""
        return DedupeCollector(self.filters)

    @property
    def queued_units(self) -> int:
        """Units of work waiting for the writer."""
        return self._writer.queued_units

    def _set_failing(self, failing: bool, why: object = None) -> None:
        if failing == self._failing:
            return
        self._failing = failing
        if failing:
            log.error("ledger commits fail, calls that write get UNAVAILABLE: %s", why)
        else:
            log.warning("ledger commits succeed again")
        if self.on_ready is not None:
            self.on_ready(not failing)

    def open(self) -> None:
        try:
            self._file.hold()
        except OSError as exc:
            raise LedgerUnavailable(f"ledger {self.path} cannot be opened: {exc}") from None
        try:
            self._file.prepare()
            migrate(self.path)
            self._conn = self._file.connect()
            tx = Transaction(self._conn, self.filters, self._builds)
            time_us = self._conn.execute("SELECT COALESCE(MAX(at_us), 0) FROM ledger_time").fetchone()[0]
            self._verify()
            request_latest(self._conn, self._builds)
            self._file.remember()
        except LedgerUnavailable:
            self._let_go()
            raise
        except (ValueError, OSError, sqlite3.Error) as exc:
            self._let_go()
            raise LedgerUnavailable(f"ledger {self.path} cannot be opened: {exc}") from None
        self._writer.start(tx, time_us)
        self._builder.start()
        self._watch_stop.clear()
        self._watcher = threading.Thread(target=self._watch_loop, name="ledger-watch", daemon=True)
        self._watcher.start()

    def _let_go(self) -> None:
        """Closes the writer's connection, then the locked descriptor: last, since closing
        any descriptor of the file drops the POSIX locks SQLite holds on it."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._file.release()

    def _verify(self) -> None:
        """Refuses a ledger whose current figures (each tenant's latest cycle and its
        holdings) disagree with their rows: served, they would allow and bill from a
        wrong count. Logs each tenant's mismatches (the first STARTUP_TENANTS_LOGGED)."""
        assert self._conn is not None
        started = time.perf_counter()
        self._conn.execute("BEGIN")
        try:
            found = find_mismatches(self._conn, every_cycle=False)
        finally:
            self._conn.execute("COMMIT")
        log.info("ledger figures checked against their rows in %.2f s", time.perf_counter() - started)
        if not found:
            return
        tenants: dict[str, list[Mismatch]] = {}
        for m in found:
            tenants.setdefault(m.tenant_id, []).append(m)
        for tenant_id, mismatches in list(tenants.items())[:STARTUP_TENANTS_LOGGED]:
            log.error(
                "ledger figures of tenant %r disagree with their rows: %s",
                tenant_id,
                "; ".join(m.describe() for m in mismatches),
            )
        names = ", ".join(repr(t) for t in list(tenants)[:STARTUP_TENANTS_LOGGED])
        more = len(tenants) - STARTUP_TENANTS_LOGGED
        if more > 0:
            log.error("and %d more tenants whose figures disagree with their rows", more)
            names += f" and {more} more"
        raise ValueError(
            f"the stored figures of tenant {names} disagree with their rows; run"
            f" `quota-sidecar verify --ledger sqlite:///{self.path}` to list every mismatch,"
            " and with --repair to recompute the figures from the rows"
        )

    def _watch_loop(self) -> None:
        """While commits fail, tries a small write every check_interval seconds;
        writes the ledger back when its file was removed, even when no call comes."""
        while not self._watch_stop.wait(self.check_interval):
            if not (self._failing or self._file.displaced()):
                continue
            with self._writer.writing:
                if not self._writer.open:
                    return
                problem = self._heal()
                if problem is not None:
                    self._set_failing(True, problem)
                    continue
                if self._failing:
                    self._probe()

    def _probe(self) -> None:
        """Under the writing lock: one small committed write, to learn whether the store takes writes."""
        assert self._conn is not None
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT OR REPLACE INTO ledger_checks (id, checked_at_us) VALUES (1, ?)", (time.time_ns() // 1000,)
            )
            conn.execute("COMMIT")
        except sqlite3.Error:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            return
        self._set_failing(False)

    def _heal(self) -> str | None:
        """Under the writing lock: writes the ledger back when its file (or WAL) was removed;
        why it could not, or None."""
        if not self._file.displaced():
            return None
        assert self._conn is not None
        return self._file.write_back(self._conn, self._move_to)

    def _move_to(self, conn: sqlite3.Connection) -> None:
        """The writer's connection becomes `conn`, to the file written back."""
        assert self._conn is not None and self._writer.tx is not None
        old, self._conn = self._conn, conn
        self._writer.tx.conn = conn
        old.close()

    def close(self) -> None:
        if not self._writer.stop():
            return
        self._watch_stop.set()
        self._writer.join()
        if self._watcher is not None:
            self._watcher.join()
        self._writer.detach()
        self._builder.stop()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
            self._local = threading.local()
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                log.warning("WAL checkpoint at close failed; the WAL is replayed at next open")
        self._let_go()
        log.info("ledger flushed and closed")

    def transact(self, work: Callable[[LedgerTx], T], *, weight: int = 1, deadline: float | None = None) -> T:
        return self._writer.transact(work, weight=weight, deadline=deadline)

    def transact_units(
        self, units: Sequence[Callable[[LedgerTx], T]], *, weights: Sequence[int], deadline: float | None = None
    ) -> list[T]:
        """Consecutive units share a transaction, weighing up to COMMIT_WEIGHT together,
        while no other unit waits for the writer and no small call was committed in the
        last `light_recent_s` seconds: alone, a large call commits as rarely as one cut
        into units of COMMIT_WEIGHT would; among small calls, it commits unit by unit,
        and a small call waits for one unit and its commit, not for a group. A unit
        failing rolls back its group's transaction."""
        answers: list[T] = []
        while len(answers) < len(units):
            first = len(answers)

            def group(tx: LedgerTx, first: int = first) -> list[T]:
                done: list[T] = []
                weight = 0
                for unit, unit_weight in zip(units[first:], weights[first:], strict=True):
                    if done and (weight + unit_weight > COMMIT_WEIGHT or self._writer.light_waits):
                        break
                    done.append(by_deadline(unit, deadline)(tx))
                    weight += unit_weight
                return done

            answers += self.transact(group, weight=min(sum(weights[first:]), COMMIT_WEIGHT), deadline=deadline)
        return answers

    def read(self, work: Callable[[LedgerReader], T]) -> T:
        if not self._writer.open:
            raise LedgerUnavailable("the ledger is not open")
        conn = getattr(self._local, "conn", None)
        try:
            if conn is not None and self._local.generation != self._file.generation:
                with self._readers_lock:
                    self._readers.remove(conn)
                conn.close()
                conn = None
            if conn is None:
                generation = self._file.generation
                conn = self._file.connect()
                with self._readers_lock:
                    self._readers.append(conn)
                self._local.conn = conn
                self._local.generation = generation
            conn.execute("BEGIN")
            try:
                return work(Reader(conn))
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"the ledger cannot be read: {exc}") from exc
