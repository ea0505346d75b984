"""Billing-cycle arithmetic (server/domain/cycles.py): SG-7 and api.md "Plan" (cycle_anchor).

Cycles are calendar months from the tenant's anchor, in UTC, half-open
[start, end); the day is clamped to the month's length against the anchor's
own day each month (anchor Jan 31: Feb 28 / Feb 29, then Mar 31), the anchor's
time of day is kept, and cycles extend before the anchor too.
"""

from __future__ import annotations

import calendar
import random
from datetime import UTC, datetime, timedelta

import pytest

from quota_sidecar.server.domain.clock import from_us, to_us
from quota_sidecar.server.domain.cycles import Cycle, cycle_at, cycle_start, cycle_within, same_boundaries

UTC = UTC


def at(*parts: int) -> int:
    """An instant in microseconds: at(2025, 1, 31, 8, 30) (UTC)."""
    return to_us(datetime(*parts, tzinfo=UTC))  # type: ignore[misc]


def starts(anchor_us: int, ks: range) -> list[datetime]:
    return [from_us(cycle_start(anchor_us, k)) for k in ks]


def d(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


# -- the anchor's own cycle -------------------------------------------------------------------


def test_sg7_cycle_zero_starts_at_the_anchor_itself():
    anchor = at(2025, 3, 14, 9, 26, 53, 589793)
    assert cycle_start(anchor, 0) == anchor
    assert cycle_at(anchor, anchor) == Cycle(anchor, at(2025, 4, 14, 9, 26, 53, 589793))


def test_sg7_plain_monthly_cycles_keep_day_and_time_of_day():
    anchor = at(2025, 1, 15, 8, 0)
    assert starts(anchor, range(0, 4)) == [
        d(2025, 1, 15, 8, 0),
        d(2025, 2, 15, 8, 0),
        d(2025, 3, 15, 8, 0),
        d(2025, 4, 15, 8, 0),
    ]
    assert cycle_at(anchor, at(2025, 3, 1)) == Cycle(at(2025, 2, 15, 8), at(2025, 3, 15, 8))


# -- anchors on the 28th..31st: the day is clamped against the anchor's day, never chained -----


def test_sg7_anchor_jan31_non_leap_year_feb28_then_mar31():
    anchor = at(2025, 1, 31, 10, 0)
    assert starts(anchor, range(0, 13)) == [
        d(2025, 1, 31, 10),
        d(2025, 2, 28, 10),
        d(2025, 3, 31, 10),
        d(2025, 4, 30, 10),
        d(2025, 5, 31, 10),
        d(2025, 6, 30, 10),
        d(2025, 7, 31, 10),
        d(2025, 8, 31, 10),
        d(2025, 9, 30, 10),
        d(2025, 10, 31, 10),
        d(2025, 11, 30, 10),
        d(2025, 12, 31, 10),
        d(2026, 1, 31, 10),
    ]


def test_sg7_anchor_jan31_leap_year_feb29_then_mar31():
    anchor = at(2024, 1, 31)
    assert starts(anchor, range(0, 3)) == [d(2024, 1, 31), d(2024, 2, 29), d(2024, 3, 31)]
    # the February cycle is two days longer in a leap year than the 28-day cycle of 2025
    feb = cycle_at(anchor, at(2024, 3, 15))
    assert feb == Cycle(at(2024, 2, 29), at(2024, 3, 31))


def test_sg7_anchor_jan30_clamps_february_only():
    assert starts(at(2025, 1, 30), range(0, 4)) == [d(2025, 1, 30), d(2025, 2, 28), d(2025, 3, 30), d(2025, 4, 30)]
    assert starts(at(2024, 1, 30), range(0, 3)) == [d(2024, 1, 30), d(2024, 2, 29), d(2024, 3, 30)]


def test_sg7_anchor_jan29_clamps_only_in_non_leap_february():
    assert starts(at(2025, 1, 29), range(0, 3)) == [d(2025, 1, 29), d(2025, 2, 28), d(2025, 3, 29)]
    assert starts(at(2024, 1, 29), range(0, 3)) == [d(2024, 1, 29), d(2024, 2, 29), d(2024, 3, 29)]


def test_sg7_anchor_on_28th_is_never_clamped():
    anchor = at(2025, 1, 28, 23, 59, 59, 999999)
    assert all(
        s.day == 28 and s.time() == d(2025, 1, 28, 23, 59, 59, 999999).time() for s in starts(anchor, range(-30, 30))
    )


def test_sg7_anchor_aug31_follows_30_and_31_day_months():
    assert starts(at(2025, 8, 31), range(0, 7)) == [
        d(2025, 8, 31),
        d(2025, 9, 30),
        d(2025, 10, 31),
        d(2025, 11, 30),
        d(2025, 12, 31),
        d(2026, 1, 31),
        d(2026, 2, 28),
    ]


def test_sg7_anchor_feb29_is_feb28_in_later_non_leap_years_and_feb29_again_in_leap_years():
    anchor = at(2024, 2, 29, 6, 0)
    assert from_us(cycle_start(anchor, 1)) == d(2024, 3, 29, 6)
    assert from_us(cycle_start(anchor, 12)) == d(2025, 2, 28, 6)
    assert from_us(cycle_start(anchor, 13)) == d(2025, 3, 29, 6)
    assert from_us(cycle_start(anchor, 48)) == d(2028, 2, 29, 6)


# -- leap-year rules: 2100 is not leap, 2000 is ----------------------------------------------


def test_sg7_year_2100_is_not_leap():
    anchor = at(2100, 1, 31)
    assert starts(anchor, range(0, 3)) == [d(2100, 1, 31), d(2100, 2, 28), d(2100, 3, 31)]
    assert cycle_at(anchor, at(2100, 2, 28) - 1) == Cycle(at(2100, 1, 31), at(2100, 2, 28))


def test_sg7_year_2000_is_leap():
    anchor = at(2000, 1, 31)
    assert starts(anchor, range(0, 3)) == [d(2000, 1, 31), d(2000, 2, 29), d(2000, 3, 31)]
    assert cycle_at(anchor, at(2000, 2, 29, 12)) == Cycle(at(2000, 2, 29), at(2000, 3, 31))


def test_sg7_year_1900_before_the_epoch_is_not_leap():
    anchor = at(1900, 1, 31)
    assert anchor < 0
    assert starts(anchor, range(0, 3)) == [d(1900, 1, 31), d(1900, 2, 28), d(1900, 3, 31)]


# -- year boundaries ---------------------------------------------------------------------------


def test_sg7_cycle_spanning_new_year():
    anchor = at(2025, 12, 31, 18, 0)
    assert cycle_at(anchor, at(2026, 1, 1)) == Cycle(at(2025, 12, 31, 18), at(2026, 1, 31, 18))
    assert from_us(cycle_start(anchor, 2)) == d(2026, 2, 28, 18)


def test_sg7_anchor_nov30_crosses_year_into_clamped_february():
    assert starts(at(2025, 11, 30), range(0, 4)) == [d(2025, 11, 30), d(2025, 12, 30), d(2026, 1, 30), d(2026, 2, 28)]


def test_sg7_new_year_instant_exactly_on_a_jan1_boundary():
    anchor = at(2024, 1, 1)
    assert cycle_at(anchor, at(2026, 1, 1)) == Cycle(at(2026, 1, 1), at(2026, 2, 1))
    assert cycle_at(anchor, at(2026, 1, 1) - 1) == Cycle(at(2025, 12, 1), at(2026, 1, 1))


# -- the boundary instant: start inclusive, end exclusive --------------------------------------


@pytest.mark.parametrize(
    "anchor, boundary, earlier_start",
    [
        (at(2025, 1, 31, 10), at(2025, 2, 28, 10), at(2025, 1, 31, 10)),
        (at(2025, 1, 31, 10), at(2025, 3, 31, 10), at(2025, 2, 28, 10)),
        (at(2024, 1, 31), at(2024, 2, 29), at(2024, 1, 31)),
        (at(2025, 1, 15, 8), at(2025, 2, 15, 8), at(2025, 1, 15, 8)),
        (
            at(2025, 12, 31, 23, 59, 59, 999999),
            at(2026, 1, 31, 23, 59, 59, 999999),
            at(2025, 12, 31, 23, 59, 59, 999999),
        ),
    ],
)
def test_sg7_boundary_instant_belongs_to_the_new_cycle_and_one_microsecond_before_to_the_old(
    anchor: int, boundary: int, earlier_start: int
):
    new = cycle_at(anchor, boundary)
    old = cycle_at(anchor, boundary - 1)
    assert new.start_us == boundary
    assert old == Cycle(earlier_start, boundary)
    assert old.end_us == new.start_us
    assert old.contains(boundary - 1) and not old.contains(boundary)
    assert new.contains(boundary) and not new.contains(boundary - 1)


def test_sg7_anchor_time_of_day_decides_the_boundary_not_midnight():
    anchor = at(2025, 1, 31, 17, 45, 12, 250)
    boundary = at(2025, 2, 28, 17, 45, 12, 250)
    # Feb 28 at 17:00 is still in the January cycle; only the anchor's time of day starts the next one
    assert cycle_at(anchor, at(2025, 2, 28, 17)).start_us == anchor
    assert cycle_at(anchor, boundary - 1).start_us == anchor
    assert cycle_at(anchor, boundary).start_us == boundary


# -- instants before the anchor: cycles extend backward ----------------------------------------


def test_sg7_instants_before_the_anchor_fall_in_earlier_cycles():
    anchor = at(2025, 3, 31, 12)
    assert from_us(cycle_start(anchor, -1)) == d(2025, 2, 28, 12)
    assert from_us(cycle_start(anchor, -2)) == d(2025, 1, 31, 12)
    assert from_us(cycle_start(anchor, -13)) == d(2024, 2, 29, 12)
    assert cycle_at(anchor, at(2025, 1, 15)) == Cycle(at(2024, 12, 31, 12), at(2025, 1, 31, 12))
    assert cycle_at(anchor, anchor - 1) == Cycle(at(2025, 2, 28, 12), anchor)
    assert cycle_at(anchor, at(2024, 3, 1)) == Cycle(at(2024, 2, 29, 12), at(2024, 3, 31, 12))


def test_sg7_far_before_and_after_the_anchor():
    anchor = at(2025, 5, 31, 1, 2, 3)
    assert cycle_at(anchor, at(1995, 2, 10)) == Cycle(at(1995, 1, 31, 1, 2, 3), at(1995, 2, 28, 1, 2, 3))
    assert cycle_at(anchor, at(2096, 2, 29, 12)) == Cycle(at(2096, 2, 29, 1, 2, 3), at(2096, 3, 31, 1, 2, 3))


# -- property-style: many anchors and instants -------------------------------------------------


def _reference_cycle(anchor: datetime, instant: datetime) -> tuple[datetime, datetime]:
    """An independent oracle: the latest clamped month start at or before the instant."""

    def month_start(year: int, month: int) -> datetime:
        day = min(anchor.day, calendar.monthrange(year, month)[1])
        return anchor.replace(year=year, month=month, day=day)

    def shifted(year: int, month: int, by: int) -> tuple[int, int]:
        y, m = divmod(year * 12 + month - 1 + by, 12)
        return y, m + 1

    for by in (1, 0, -1):
        y, m = shifted(instant.year, instant.month, by)
        start = month_start(y, m)
        if start <= instant:
            ny, nm = shifted(y, m, 1)
            return start, month_start(ny, nm)
    raise AssertionError("unreachable")


def test_sg7_property_every_instant_in_exactly_one_cycle_and_cycles_tile():
    rng = random.Random(20260310)
    lo, hi = at(1971, 1, 1), at(2099, 12, 1)
    anchors = [
        at(y, 1, day, h) for y in (1999, 2000, 2023, 2024, 2025) for day in (1, 15, 28, 29, 30, 31) for h in (0, 23)
    ]
    anchors += [at(2024, 2, 29), at(2100, 1, 31), at(2025, 12, 31, 23, 59, 59, 999999)]
    anchors += [rng.randrange(lo, hi) for _ in range(120)]
    for anchor_us in anchors:
        anchor = from_us(anchor_us)
        instants = [
            rng.randrange(anchor_us - 40 * 366 * 86_400_000_000, anchor_us + 40 * 366 * 86_400_000_000)
            for _ in range(25)
        ]
        # and instants right on and around boundaries
        for k in (-25, -1, 0, 1, 2, 13, 49):
            b = cycle_start(anchor_us, k)
            instants += [b - 1, b, b + 1]
        for t in instants:
            c = cycle_at(anchor_us, t)
            assert c.start_us <= t < c.end_us, (anchor, from_us(t), c)
            assert c.contains(t)
            # the next cycle starts exactly where this one ends, and the previous ends where it starts
            assert cycle_at(anchor_us, c.end_us).start_us == c.end_us
            assert cycle_at(anchor_us, c.start_us - 1).end_us == c.start_us
            assert cycle_at(anchor_us, c.end_us - 1) == c
            start, end = from_us(c.start_us), from_us(c.end_us)
            assert (start, end) == _reference_cycle(anchor, from_us(t)), (anchor, from_us(t))
            # the anchor's time of day is kept; the day is the anchor's, clamped to the month
            assert start.time() == anchor.time() and end.time() == anchor.time()
            assert start.day == min(anchor.day, calendar.monthrange(start.year, start.month)[1])
            assert timedelta(days=28) <= end - start <= timedelta(days=31)


def test_sg7_property_cycle_start_sequence_is_strictly_increasing_and_tiles():
    for anchor_us in (at(2024, 1, 31, 7), at(2023, 5, 30), at(2025, 2, 28), at(2000, 3, 31, 23, 59)):
        previous = None
        for k in range(-60, 61):
            s = cycle_start(anchor_us, k)
            c = cycle_at(anchor_us, s)
            assert c == Cycle(s, cycle_start(anchor_us, k + 1))
            if previous is not None:
                assert previous < s
                assert cycle_at(anchor_us, previous).end_us == s
            previous = s


# -- re-anchoring: the boundaries an anchor gives, and a cycle cut by re-anchors ----------------


def test_sg7_anchors_with_the_same_day_and_time_of_day_give_the_same_boundaries():
    assert same_boundaries(at(2025, 1, 31, 10), at(2027, 8, 31, 10))
    assert same_boundaries(at(2025, 1, 30), at(2025, 6, 30))
    assert not same_boundaries(at(2025, 1, 31), at(2025, 2, 28))  # Feb 28 anchors give Mar 28, not Mar 31
    assert not same_boundaries(at(2025, 1, 15, 8), at(2025, 1, 15, 9))
    for anchor, other in [(at(2025, 1, 31, 10), at(2027, 8, 31, 10)), (at(2025, 1, 30), at(2025, 6, 30))]:
        assert {cycle_at(anchor, i) for i in range(at(2024, 1, 1), at(2027, 1, 1), 86_400_000_000 * 7)} == {
            cycle_at(other, i) for i in range(at(2024, 1, 1), at(2027, 1, 1), 86_400_000_000 * 7)
        }


def test_sg7_a_cycle_within_re_anchors_is_cut_at_either_one():
    anchor = at(2026, 1, 15, 8)
    whole = Cycle(at(2026, 2, 15, 8), at(2026, 3, 15, 8))
    assert cycle_within(anchor, at(2026, 3, 1), None, None) == whole
    assert cycle_within(anchor, at(2026, 3, 1), at(2026, 2, 20), None) == Cycle(at(2026, 2, 20), whole.end_us)
    assert cycle_within(anchor, at(2026, 3, 1), None, at(2026, 3, 10, 12)) == Cycle(whole.start_us, at(2026, 3, 10, 12))
    assert cycle_within(anchor, at(2026, 3, 1), at(2026, 2, 20), at(2026, 3, 2)) == Cycle(
        at(2026, 2, 20), at(2026, 3, 2)
    )
    # re-anchors outside the cycle leave it whole
    assert cycle_within(anchor, at(2026, 3, 1), at(2026, 1, 1), at(2026, 4, 1)) == whole
