"""Billing-cycle arithmetic: calendar months from the tenant's anchor, in UTC.

Cycle k starts at the anchor moved k calendar months, with the day clamped to
that month's length against the anchor's own day (SG-7): an anchor on Jan 31
gives Feb 28 (Feb 29 in a leap year), then Mar 31. Cycles are half-open
[start, end).

A tenant's cycles follow one anchor only between re-anchors: a plan stored with
an anchor that moves the boundaries closes the cycle running then, a short cycle,
and the next one starts at that instant and runs to the new anchor's next
boundary (`cycle_within`; the engine finds the span from the plan history).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import datetime

from .clock import from_us, to_us


@dataclass(frozen=True, slots=True)
class Cycle:
    start_us: int
    end_us: int

    def contains(self, instant_us: int) -> bool:
        return self.start_us <= instant_us < self.end_us


def _shift(anchor: datetime, months: int) -> datetime:
    index = anchor.year * 12 + (anchor.month - 1) + months
    year, month = divmod(index, 12)
    month += 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def cycle_start(anchor_us: int, months: int) -> int:
    """The start of the cycle `months` cycles after the one starting at the anchor."""
    return to_us(_shift(from_us(anchor_us), months))


_RECENT: dict[int, Cycle] = {}
_RECENT_MAX = 65_536


def cycle_at(anchor_us: int, instant_us: int) -> Cycle:
    """The cycle that contains `instant_us` (cycles extend before the anchor too).
    The last cycle found for each anchor is remembered: the current one is asked
    for on every call."""
    recent = _RECENT.get(anchor_us)
    if recent is not None and recent.start_us <= instant_us < recent.end_us:
        return recent
    found = _find_cycle(anchor_us, instant_us)
    if len(_RECENT) >= _RECENT_MAX:
        _RECENT.clear()
    _RECENT[anchor_us] = found
    return found


def _find_cycle(anchor_us: int, instant_us: int) -> Cycle:
    anchor = from_us(anchor_us)
    instant = from_us(instant_us)
    k = (instant.year - anchor.year) * 12 + (instant.month - anchor.month)
    while cycle_start(anchor_us, k) > instant_us:
        k -= 1
    while cycle_start(anchor_us, k + 1) <= instant_us:
        k += 1
    return Cycle(cycle_start(anchor_us, k), cycle_start(anchor_us, k + 1))


def same_boundaries(anchor_us: int, other_us: int) -> bool:
    """Whether two anchors give the same cycle boundaries: with the day clamped against
    the anchor's own day, the boundaries depend only on its day of month and time of day."""
    a, b = from_us(anchor_us), from_us(other_us)
    return a.day == b.day and a.time() == b.time()


def cycle_within(anchor_us: int, instant_us: int, since_us: int | None, until_us: int | None) -> Cycle:
    """The cycle containing `instant_us` of a tenant whose cycles follow the anchor from
    `since_us` (the re-anchor that started them; None: always) until `until_us` (the next
    re-anchor; None: none yet): the anchor's cycle cut at either instant."""
    found = cycle_at(anchor_us, instant_us)
    start = found.start_us if since_us is None else max(found.start_us, since_us)
    end = found.end_us if until_us is None else min(found.end_us, until_us)
    if start == found.start_us and end == found.end_us:
        return found
    return Cycle(start, end)
