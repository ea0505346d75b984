"""The dedupe filters: which contacts are certainly not active yet in a cycle, and how
they are built from the ledger's rows.

One scalable bloom filter (rbloom layers, each twice the last and with half its
false-positive rate) per tenant and cycle. It only speeds things up: "certainly
new" skips a ledger look-up, "maybe active" is always confirmed in the ledger,
so a false positive costs one look-up and never miscounts.

A filter exists for a tenant and cycle only once it has been loaded from the
ledger's rows for that cycle; until then every contact is "maybe active". The
owner (the ledger's writer) is the only thread that touches a filter in use.
`Builds` is what the writer records while filters are built, `FilterBuilder` the
thread that reads the rows, `Install` a set of built filters handed to the writer,
and `DedupeCollector` the filters' figures at scrape time. A filter knows every
contact only while this process is the ledger's only writer (files.py).
"""

from __future__ import annotations

import logging
import math
import queue
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from rbloom import Bloom

from .. import LedgerReader

log = logging.getLogger("quota_sidecar.ledger")

MIN_CAPACITY = 32
BUILDS_PER_READ = 1_000
# Built filters are handed to the writer this many at a time, the next only once it has
# installed the last: an install runs between two commits, and 1,000 at once (with a
# read of the figures each) held the writer for tens of milliseconds after a restart.
INSTALLS_PER_UNIT = 64
ROWS_PER_READ = 65_536


@dataclass(slots=True)
class _Layer:
    bloom: Bloom
    capacity: int
    items: int = 0


@dataclass(slots=True)
class CycleFilter:
    """A scalable bloom filter of the contacts active in one tenant's cycle."""

    fp_rate: float
    layers: list[_Layer] = field(default_factory=list)

    @classmethod
    def sized(cls, capacity: int, fp_rate: float) -> CycleFilter:
        f = cls(fp_rate)
        f._grow(max(capacity, MIN_CAPACITY))
        return f

    def _grow(self, capacity: int) -> None:
        rate = self.fp_rate / (2 ** len(self.layers))
        self.layers.append(_Layer(Bloom(capacity, rate), capacity))

    def __contains__(self, contact_id: str) -> bool:
        return any(contact_id in layer.bloom for layer in self.layers)

    def maybe_among(self, contact_ids: Sequence[str]) -> list[str]:
        """The contacts that may be in the filter (all that are, and false positives)."""
        if len(self.layers) == 1:
            contains = self.layers[0].bloom.__contains__
            return [c for c in contact_ids if contains(c)]
        return [c for c in contact_ids if c in self]

    def recount(self, items: int) -> None:
        """Sets how many contacts the filter holds, when the ledger says so exactly (a
        contact added twice, or not at all because it already read as maybe, is one)."""
        earlier = sum(layer.items for layer in self.layers[:-1])
        self.layers[-1].items = max(0, items - earlier)

    def not_among(self, contact_ids: Sequence[str]) -> list[str]:
        """The contacts certainly not in the filter."""
        return [c for c in dict.fromkeys(contact_ids) if c not in self]

    def add_all(self, contact_ids: Sequence[str]) -> None:
        """Adds contacts, growing a layer at a time as each fills."""
        done = 0
        while done < len(contact_ids):
            layer = self.layers[-1]
            room = layer.capacity - layer.items
            if room <= 0:
                self._grow(layer.capacity * 2)
                continue
            chunk = contact_ids[done : done + room]
            layer.bloom.update(chunk)
            layer.items += len(chunk)
            done += len(chunk)

    @property
    def items(self) -> int:
        return sum(layer.items for layer in self.layers)

    @property
    def size_bytes(self) -> int:
        return sum(layer.bloom.size_in_bits // 8 for layer in self.layers)

    @property
    def estimated_fp_rate(self) -> float:
        """The chance that a contact not in the filter reads as "maybe", from each
        layer's fill: (1 - e^(-k n / m))^k with the k an optimally sized layer uses."""
        clear = 1.0
        for layer in self.layers:
            bits = layer.bloom.size_in_bits
            hashes = max(1, round(bits / layer.capacity * math.log(2)))
            clear *= 1.0 - (1.0 - math.exp(-hashes * layer.items / bits)) ** hashes
        return 1.0 - clear


@dataclass(slots=True)
class FilterStats:
    lookups: int = 0
    certainly_new: int = 0
    confirmed_false_positives: int = 0


class DedupeFilters:
    """The filters of the most recent cycles of every tenant, least recently used evicted."""

    def __init__(self, fp_rate: float = 0.001, max_filters: int = 100_000) -> None:
        if not 0 < fp_rate < 1:
            raise ValueError("fp_rate must be between 0 and 1")
        self.fp_rate = fp_rate
        self.max_filters = max_filters
        self._filters: OrderedDict[tuple[str, int], CycleFilter] = OrderedDict()
        self.stats = FilterStats()
        self.building = 0
        self._lock = threading.Lock()
        self._reading = threading.Lock()
        self._touched: set[tuple[str, int]] = set()
        self._sizes: dict[tuple[str, int], tuple[int, int]] = {}
        self._fp: dict[tuple[str, int], float] = {}
        self._items = 0
        self._bytes = 0

    def get(self, tenant_id: str, cycle_start_us: int) -> CycleFilter | None:
        key = (tenant_id, cycle_start_us)
        f = self._filters.get(key)
        if f is not None:
            self._filters.move_to_end(key)
        return f

    def sized(self, capacity: int) -> CycleFilter:
        """An empty filter for `capacity` contacts at the target false-positive rate."""
        return CycleFilter.sized(capacity, self.fp_rate)

    def put(self, tenant_id: str, cycle_start_us: int, f: CycleFilter) -> None:
        self._filters[(tenant_id, cycle_start_us)] = f
        self._filters.move_to_end((tenant_id, cycle_start_us))
        touched = [(tenant_id, cycle_start_us)]
        while len(self._filters) > self.max_filters:
            touched.append(self._filters.popitem(last=False)[0])
        self.touched(*touched)

    def touched(self, *keys: tuple[str, int]) -> None:
        """Marks filters whose contacts changed (or that came or went) since the figures
        were last read; reading them then costs only what changed."""
        with self._lock:
            self._touched.update(keys)

    def forget(self, tenant_id: str | None = None) -> None:
        """Drops filters (one tenant's, or all) so they are reloaded from the ledger."""
        gone = [k for k in self._filters if tenant_id is None or k[0] == tenant_id]
        for key in gone:
            del self._filters[key]
        self.touched(*gone)

    def __len__(self) -> int:
        return len(self._filters)

    def _refresh(self) -> None:
        """Brings the running figures up to date with the filters touched since."""
        with self._reading:
            self._refresh_touched()

    def _refresh_touched(self) -> None:
        with self._lock:
            touched, self._touched = self._touched, set()
        for key in touched:
            items, size = self._sizes.pop(key, (0, 0))
            self._items -= items
            self._bytes -= size
            self._fp.pop(key, None)
            f = self._filters.get(key)
            if f is not None:
                items, size = f.items, f.size_bytes
                self._sizes[key] = (items, size)
                self._items += items
                self._bytes += size
                self._fp[key] = f.estimated_fp_rate

    @property
    def items(self) -> int:
        self._refresh()
        return self._items

    @property
    def size_bytes(self) -> int:
        self._refresh()
        return self._bytes

    @property
    def estimated_fp_rate(self) -> float:
        """The highest estimated false-positive rate of any filter (0 with none)."""
        self._refresh()
        return max(self._fp.values(), default=0.0)


def _cycle_size(conn: sqlite3.Connection, key: tuple[str, int]) -> tuple[int | None, int]:
    """A tenant cycle's key and its count of active contacts."""
    row = conn.execute(
        "SELECT k.cycle_key, COALESCE(u.active_contacts, 0) FROM cycle_keys k LEFT JOIN usage u"
        " ON u.tenant_id = k.tenant_id AND u.cycle_start_us = k.cycle_start_us"
        " WHERE k.tenant_id = ? AND k.cycle_start_us = ?",
        key,
    ).fetchone()
    return (row[0], row[1]) if row else (None, 0)


@dataclass(slots=True)
class _Build:
    capacity: int
    pending: list[str] = field(default_factory=list)


class Builds:
    """Dedupe filters built from the ledger's rows in the background (at start-up, on
    a cycle's first use, and bigger when one outgrows its size), so neither SERVING
    nor the writer waits for a read of millions of rows. From the moment a build is
    asked for, the writer records every contact it activates in that cycle; the
    build starts only once the transaction that asked for it has committed, so the
    builder's snapshot holds every contact activated before the recording began; the
    writer installs the built filter with the recorded contacts added. A contact is
    in the snapshot, in the record, or both: the built filter misses no active
    contact. Recorded contacts of a rolled-back unit only add false positives,
    which the ledger confirms."""

    def __init__(self, filters: DedupeFilters) -> None:
        self.filters = filters
        self.running: dict[tuple[str, int], _Build] = {}
        self.generation = 0
        self.requested: list[tuple[tuple[str, int], int, int]] = []
        self.asked: queue.SimpleQueue[list[tuple[tuple[str, int], int, int]] | None] = queue.SimpleQueue()

    def request(self, key: tuple[str, int], capacity: int) -> None:
        """Starts recording; the build itself is handed over by `dispatch`."""
        if key not in self.running:
            self.running[key] = _Build(capacity)
            self.requested.append((key, capacity, self.generation))
            self.filters.building = len(self.running)

    def dispatch(self) -> None:
        """Hands the builds asked for to the builder, once what was written before is committed."""
        if self.requested:
            self.asked.put(self.requested)
            self.requested = []

    def record(self, key: tuple[str, int], contact_ids: Sequence[str]) -> None:
        build = self.running.get(key)
        if build is not None:
            build.pending.extend(contact_ids)

    def finish(self, key: tuple[str, int], generation: int) -> list[str] | None:
        """The contacts recorded while the build ran; None if it was abandoned."""
        if generation != self.generation:
            return None
        build = self.running.pop(key, None)
        self.filters.building = len(self.running)
        return None if build is None else build.pending

    def abandon(self) -> None:
        self.running.clear()
        self.requested.clear()
        self.generation += 1
        self.filters.building = 0


Built = list[tuple[tuple[str, int], CycleFilter | None, int]]


class Install:
    """Built filters handed to the writer, which installs them between commits."""

    __slots__ = ("builds", "built", "done")

    def __init__(self, builds: Builds, built: Built) -> None:
        self.builds = builds
        self.built = built
        self.done = threading.Event()

    def __call__(self, tx: LedgerReader | None) -> None:
        """Installs the filters; `tx` is the writer's transaction (None once it closed)."""
        try:
            self._install(tx)
        finally:
            self.done.set()

    def _install(self, tx: LedgerReader | None) -> None:
        for key, f, generation in self.built:
            pending = self.builds.finish(key, generation)
            if pending is None or f is None:
                continue
            # Without contacts recorded during the build the rows read are the cycle's
            # active contacts, exactly; only otherwise is the count read again (a read
            # per filter held the writer for seconds when 100,000 were installed).
            if pending and tx is not None:
                f.add_all(f.not_among(pending))
                f.recount(tx.counters(*key).active_contacts)
            self.builds.filters.put(key[0], key[1], f)


def request_latest(conn: sqlite3.Connection, builds: Builds) -> None:
    """Asks for the filter of every tenant's latest cycle, biggest first."""
    latest = conn.execute(
        "SELECT tenant_id, cycle_start_us, active_contacts FROM usage u WHERE cycle_start_us ="
        " (SELECT MAX(cycle_start_us) FROM usage WHERE tenant_id = u.tenant_id) ORDER BY active_contacts DESC"
    ).fetchall()
    for tenant_id, cycle_start_us, _ in latest:
        builds.request((tenant_id, cycle_start_us), 0)
    builds.dispatch()


class FilterBuilder:
    """The thread that builds the filters asked for (`Builds.asked`) from the rows, on a
    connection of its own, and hands them to the writer (`hand_over`, which answers
    False once the ledger closed). A connection made before the ledger file was
    written back (`generation` moved on) is replaced by one to the file now there."""

    def __init__(
        self,
        builds: Builds,
        connect: Callable[[], sqlite3.Connection],
        generation: Callable[[], int],
        hand_over: Callable[[Install], bool],
    ) -> None:
        self.builds = builds
        self.filters = builds.filters
        self._connect = connect
        self._generation = generation
        self._hand_over = hand_over
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._build_loop, name="filter-builder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.builds.asked.put(None)
        if self._thread is not None:
            self._thread.join()

    def _build_loop(self) -> None:
        conn = self._connect()
        generation = self._generation()
        try:
            while True:
                asked = self.builds.asked.get()
                if asked is None:
                    return
                if generation != self._generation():
                    try:
                        fresh = self._connect()
                    except sqlite3.Error:
                        pass
                    else:
                        conn.close()
                        conn, generation = fresh, self._generation()
                for start in range(0, len(asked), BUILDS_PER_READ):
                    self._build_some(conn, asked[start : start + BUILDS_PER_READ])
        finally:
            conn.close()

    def _build_some(self, conn: sqlite3.Connection, asked: list[tuple[tuple[str, int], int, int]]) -> None:
        """Builds filters and hands them to the writer in one install: small cycles in
        one read transaction, a big one in chunks of rows, each in a transaction of its
        own, so no snapshot is held long enough to keep the WAL from being checkpointed
        (a contact committed between chunks is in a later chunk or in the record)."""
        built: Built = []
        try:
            conn.execute("BEGIN")
            try:
                sizes = [(key, capacity, generation, _cycle_size(conn, key)) for key, capacity, generation in asked]
                small = [entry for entry in sizes if entry[3][1] <= ROWS_PER_READ]
                for key, capacity, generation, (cycle_key, count) in small:
                    f = self.filters.sized(max(capacity, count * 5 // 4))
                    if cycle_key is not None:
                        rows = conn.execute(
                            "SELECT contact_id FROM cycle_activations WHERE cycle_key = ?", (cycle_key,)
                        )
                        f.add_all([r[0] for r in rows])
                    built.append((key, f, generation))
            finally:
                conn.execute("COMMIT")
            for key, capacity, generation, (cycle_key, count) in sizes:
                if count > ROWS_PER_READ:
                    size = max(capacity, count * 5 // 4)
                    big = self.filters.sized(size) if cycle_key is None else self._build_big(conn, cycle_key, size)
                    built.append((key, big, generation))
        except sqlite3.Error as exc:
            log.warning("building dedupe filters failed (%s); their contacts are confirmed in the ledger", exc)
            done = {key for key, _, _ in built}
            built += [(key, None, generation) for key, _, generation in asked if key not in done]
        for start in range(0, len(built), INSTALLS_PER_UNIT):
            if not self._hand_over(Install(self.builds, built[start : start + INSTALLS_PER_UNIT])):
                return

    def _build_big(self, conn: sqlite3.Connection, cycle_key: int, capacity: int) -> CycleFilter:
        f = self.filters.sized(capacity)
        after = ""
        while True:
            conn.execute("BEGIN")
            try:
                chunk = conn.execute(
                    "SELECT contact_id FROM cycle_activations WHERE cycle_key = ? AND contact_id > ?"
                    " ORDER BY contact_id LIMIT ?",
                    (cycle_key, after, ROWS_PER_READ),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
            if not chunk:
                return f
            f.add_all([r[0] for r in chunk])
            after = chunk[-1][0]


class DedupeCollector(Collector):
    """The dedupe filters' figures, read at scrape time."""

    def __init__(self, filters: DedupeFilters) -> None:
        self.filters = filters

    def collect(self) -> Iterator[Metric]:
        filters = self.filters
        yield GaugeMetricFamily(
            "quota_dedupe_filters", "Dedupe filters held in memory (tenant cycles)", value=len(filters)
        )
        yield GaugeMetricFamily("quota_dedupe_filter_items", "Contacts held in the dedupe filters", value=filters.items)
        yield GaugeMetricFamily(
            "quota_dedupe_filters_building",
            "Dedupe filters being built from the ledger; until one is, its contacts are confirmed in the ledger",
            value=filters.building,
        )
        yield GaugeMetricFamily(
            "quota_dedupe_filter_bytes", "Memory of the dedupe filters' bit arrays", value=filters.size_bytes
        )
        yield GaugeMetricFamily(
            "quota_dedupe_filter_false_positive_ratio",
            "Estimated false-positive ratio of the fullest dedupe filter, from its fill",
            value=filters.estimated_fp_rate,
        )
        yield GaugeMetricFamily(
            "quota_dedupe_filter_false_positive_ratio_target",
            "The false-positive ratio the dedupe filters are sized for (--filter-fp-rate)",
            value=filters.fp_rate,
        )
        stats = filters.stats
        yield CounterMetricFamily("quota_dedupe_lookups", "Dedupe look-ups since start", value=stats.lookups)
        yield CounterMetricFamily(
            "quota_dedupe_certainly_new", "Look-ups the filter answered without the ledger", value=stats.certainly_new
        )
        yield CounterMetricFamily(
            "quota_dedupe_confirmed_false_positives",
            "Filter 'maybe' answers that the ledger showed to be new contacts",
            value=stats.confirmed_false_positives,
        )
