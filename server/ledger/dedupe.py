"""The per-cycle dedupe filter: which contacts are certainly not active yet.

One scalable bloom filter (rbloom layers, each twice the last and with half its
false-positive rate) per tenant and cycle. It only speeds things up: "certainly
new" skips a ledger look-up, "maybe active" is always confirmed in the ledger,
so a false positive costs one look-up and never miscounts.

A filter exists for a tenant and cycle only once it has been loaded from the
ledger's rows for that cycle; until then every contact is "maybe active". The
owner (the ledger's writer) is the only thread that touches it.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from rbloom import Bloom

MIN_CAPACITY = 32


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
