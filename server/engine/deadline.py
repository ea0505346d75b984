"""The deadline of the call being served, so that work which waited past it is not done.

The gRPC layer sets it for the duration of a call (`serving_until`); the ledger checks
it when a unit of work is about to run (`within_deadline`). A caller whose deadline
has passed has been told DEADLINE_EXCEEDED and does not know the decision, so the
decision is not made: nothing is counted for an answer nobody received.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from ..domain.errors import DeadlineExceeded

T = TypeVar("T")
A = TypeVar("A")

_DEADLINE: ContextVar[float | None] = ContextVar("call_deadline", default=None)


@contextmanager
def serving_until(remaining_s: float | None) -> Iterator[None]:
    """Within the block, work started by this thread must begin within `remaining_s` seconds."""
    token = _DEADLINE.set(None if remaining_s is None else time.monotonic() + remaining_s)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def within_deadline(work: Callable[[A], T]) -> Callable[[A], T]:
    """`work`, refusing to run once the current call's deadline has passed."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return work

    def guarded(arg: A) -> T:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed while the call waited for the ledger; nothing was done")
        return work(arg)

    return guarded
