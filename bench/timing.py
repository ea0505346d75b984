"""Timing primitives and the store of raw figures every scenario writes to.

A figure is one number per run (`--repeat` runs); the table shows its median and
the JSON file keeps every run's value.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..1) of the samples."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(len(ordered), rank) - 1]


def latencies(calls: Sequence[Callable[[], object]]) -> list[float]:
    """Seconds each call took, made one after another."""
    clock = time.perf_counter
    out = []
    for call in calls:
        started = clock()
        call()
        out.append(clock() - started)
    return out


def rate_in_threads(workers: Sequence[Callable[[], int]]) -> float:
    """Runs each worker in its own thread, all released at once, and returns the
    calls per second they made together (each worker returns how many it made)."""
    start = threading.Barrier(len(workers) + 1)
    made = [0] * len(workers)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        start.wait()
        try:
            made[index] = workers[index]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return sum(made) / elapsed


def new_contact_ids(count: int) -> list[str]:
    """Random 16-hex-character contact ids, as `secrets.token_hex(8)` makes them."""
    text = os.urandom(8 * count).hex()
    return [text[i : i + 16] for i in range(0, 16 * count, 16)]


def shares(total: int, parts: int) -> list[int]:
    """`total` dealt into `parts` nearly equal whole shares."""
    size, extra = divmod(total, parts)
    return [size + (1 if i < extra else 0) for i in range(parts)]


def split(items: Sequence[T], parts: int) -> list[Sequence[T]]:
    """The items dealt into `parts` consecutive slices of nearly equal length."""
    out, at = [], 0
    for share in shares(len(items), parts):
        out.append(items[at : at + share])
        at += share
    return out


@dataclass
class Results:
    """Raw figures by key, one value per run, plus why a figure is missing."""

    figures: dict[str, list[float]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, value: float) -> None:
        self.figures.setdefault(key, []).append(float(value))

    def median(self, key: str) -> float | None:
        runs = self.figures.get(key)
        return statistics.median(runs) if runs else None

    def missing(self, key: str, why: str) -> None:
        self.unavailable.setdefault(key, why)
