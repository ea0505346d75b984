"""Time as the engine sees it: an injected clock, never a hidden global."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

UTC = UTC
MICROS = 1_000_000
STEP_TOLERANCE_US = MICROS

log = logging.getLogger("quota_sidecar.clock")


class Clock(Protocol):
    def now_us(self) -> int:
        """Microseconds since the Unix epoch, UTC."""


class SystemClock:
    def now_us(self) -> int:
        return time.time_ns() // 1000


class FakeClock:
    """A settable clock for tests; thread-safe."""

    def __init__(self, start: datetime | int) -> None:
        self._lock = threading.Lock()
        self._now = start if isinstance(start, int) else to_us(start)

    def now_us(self) -> int:
        with self._lock:
            return self._now

    def now(self) -> datetime:
        return from_us(self.now_us())

    def set(self, instant: datetime | int) -> None:
        with self._lock:
            self._now = instant if isinstance(instant, int) else to_us(instant)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += round(seconds * MICROS)


class LedgerTime:
    """The instant the engine decides at: the wall clock, but never earlier than the
    latest instant already decided at or committed to the ledger (`committed_us`).
    A wall clock stepped back (NTP, a VM resumed, an operator) would otherwise put a
    decision before one already stored, even in the previous cycle, and the figures
    of the two cycles would disagree with their rows. While the wall clock is behind
    by more than STEP_TOLERANCE_US, decisions are made at ledger time and the step is
    logged once (again for a later step, once the clock has caught up).

    Thread-safe; readers and writers share one floor. A read raises it too (to an
    instant the wall clock already showed), which can only make a later decision
    later, never earlier than a stored one; the ledger keeps what writers note."""

    def __init__(self, clock: Clock, committed_us: Callable[[], int]) -> None:
        self.clock = clock
        self._committed_us = committed_us
        self._lock = threading.Lock()
        self._latest = 0
        self._stepped = False

    def now_us(self) -> int:
        wall = self.clock.now_us()
        with self._lock:
            latest = max(self._latest, self._committed_us())
            if wall >= latest:
                self._latest = wall
                self._stepped = False
                return wall
            self._latest = latest
            warn = not self._stepped and latest - wall > STEP_TOLERANCE_US
            self._stepped = self._stepped or warn
        if warn:
            log.warning("clock stepped back by %.3f s; deciding at ledger time", (latest - wall) / MICROS)
        return latest

    @property
    def latest_us(self) -> int:
        """The latest instant handed out so far."""
        with self._lock:
            return self._latest


def to_us(instant: datetime) -> int:
    if instant.tzinfo is None:
        raise ValueError("naive datetime: give an aware UTC instant")
    delta = instant - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * MICROS + delta.microseconds


def from_us(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
