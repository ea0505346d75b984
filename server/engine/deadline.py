"""The deadline of the call being served, so that work which waited past it is not done.

The gRPC layer sets it for the duration of a call (`serving_until`); the engine passes
it (`call_deadline`) to `Ledger.transact`, which does not start a unit past it. A
caller whose deadline has passed has been told DEADLINE_EXCEEDED and does not know the decision, so the
decision is not made: nothing is counted for an answer nobody received.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_DEADLINE: ContextVar[float | None] = ContextVar("call_deadline", default=None)


@contextmanager
def serving_until(remaining_s: float | None) -> Iterator[None]:
    """Within the block, work started by this thread must begin within `remaining_s` seconds."""
    token = _DEADLINE.set(None if remaining_s is None else time.monotonic() + remaining_s)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def call_deadline() -> float | None:
    """The `time.monotonic()` instant by which the current call's work must begin (None: no deadline)."""
    return _DEADLINE.get()
