"""Time as the engine sees it: an injected clock, never a hidden global."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

UTC = UTC
MICROS = 1_000_000


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


def to_us(instant: datetime) -> int:
    if instant.tzinfo is None:
        raise ValueError("naive datetime: give an aware UTC instant")
    delta = instant - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * MICROS + delta.microseconds


def from_us(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
