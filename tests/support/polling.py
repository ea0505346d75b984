"""Waiting for a condition another thread or process brings about."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], bool], what: str, deadline_s: float = 20.0) -> None:
    """Polls a condition (a safety deadline, not a timing assertion)."""
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.001)
