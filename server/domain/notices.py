"""When a tenant is told about its usage (AC-1, CR-8, MK-2, SG-4): the notice rules.

A plan's `notify_thresholds` are ratios of the limit (0.8, 0.9, 1.0). Each
figure (contacts against the contact limit, sends against the sends limit) keeps
a `NoticeState`: the highest threshold announced. Within a cycle a threshold is
announced once, when the figure first reaches it, so a count moving around a
threshold does not repeat the event. A new cycle, or a new plan, re-arms the
thresholds the figure is now below (a CYCLE_ACTIVE count starts again from 0; an
upgrade lowers the ratio), so reaching them again is announced again. While a
figure stays at or above a threshold, a reminder follows every
`renotify_interval` (AC-1's 15 days) until it falls below (an upgrade, or
deleted contacts).

Pure functions: the engine applies them inside the transaction that changed the
figure, and the reminder sweep applies them with `remind=True`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .model import NoticeState, Usage, UsageEventType, UsageFigure


@dataclass(frozen=True, slots=True)
class Notice:
    type: UsageEventType
    figure: UsageFigure
    threshold: float


def ratio_of(usage: Usage, figure: UsageFigure) -> float:
    if figure is UsageFigure.CONTACTS:
        return usage.usage_ratio
    return usage.sends / usage.sends_limit if usage.sends_limit else 0.0


def level_of(thresholds: Sequence[float], ratio: float) -> float:
    """The highest threshold the ratio has reached (0.0 when none)."""
    return max((t for t in thresholds if ratio >= t), default=0.0)


def settled(state: NoticeState | None, level: float, cycle_start_us: int) -> bool:
    """True when a figure at `level` in this cycle needs no event and no write."""
    return state is not None and state.cycle_start_us == cycle_start_us and level <= state.level


def evaluate(
    thresholds: Sequence[float],
    figure: UsageFigure,
    ratio: float,
    cycle_start_us: int,
    state: NoticeState | None,
    now_us: int,
    *,
    rearm: bool = False,
    renotify_us: int = 0,
    remind: bool = False,
) -> tuple[NoticeState, list[Notice]]:
    """The figure's next notice state and the events to write for it."""
    level = level_of(thresholds, ratio)
    if state is None:
        state = NoticeState(0.0, cycle_start_us, 0)
    if rearm or state.cycle_start_us != cycle_start_us:
        state = NoticeState(min(state.level, level), cycle_start_us, state.last_at_us)
    if level > state.level:
        crossed = [
            Notice(UsageEventType.THRESHOLD_CROSSED, figure, t) for t in sorted(thresholds) if state.level < t <= level
        ]
        return NoticeState(level, cycle_start_us, now_us), crossed
    if remind and level > 0 and renotify_us and now_us - state.last_at_us >= renotify_us:
        return NoticeState(state.level, cycle_start_us, now_us), [Notice(UsageEventType.REMINDER, figure, level)]
    return state, []
