"""Client-side coalescing of CheckSend: concurrent calls from one process for the same
tenant, channel and kind leave as one CheckSendBatch, and each caller gets the answer a
CheckSend of its own would have given. This module owns what the blocking and the
asyncio client share and that does no I/O: which calls may be merged, the lane each one
waits in, when a batch leaves, and how a batch's answer or failure becomes each caller's
outcome. The clients do the waiting, the waking and the sending.

A lane holds the calls of one (tenant_id, channel, kind):

- A call arriving while nothing of its lane is in flight or queued goes out at once as
  its own CheckSend, so a lone caller waits for nothing; unless the lane's last answer
  went to several callers less than `window` seconds ago: those callers are likely
  coming back, and the call queues to leave with them.
- A call arriving while others are in flight or queued joins the lane's queue.
- The queue leaves as one batch as soon as the lane has a free slot (fewer than
  MAX_IN_FLIGHT calls of the lane in flight) and either `max_batch` calls are ready,
  or as many as the lane's last answer went to when that was a batch (everyone came
  back), or `window` seconds have passed since the later of: its oldest call queued,
  the lane's last answer. So `window` bounds how long queued calls wait for company
  once the sidecar could take them; the wait for a free slot is bounded only by each
  caller's deadline.
- A batch takes the queued calls in arrival order, up to `max_batch`, skipping a contact
  it already holds: two sends to one contact are two messages, while a batch repeats a
  repeated id's first decision and counts it once, so the second waits for the next
  batch. A batch of one call goes out as that call's own CheckSend.
"""

from __future__ import annotations

import functools
import math
import uuid
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from quota_sidecar.api.v1 import quota_pb2

from ._calls import Call, SendCall, check_send_batch
from ._errors import DeadlineExceeded, Internal, InvalidArgument, QuotaError, Unavailable
from ._results import SendDecision, Usage
from ._wire import enum_name

W = TypeVar("W")

DEFAULT_WINDOW = 0.0005
DEFAULT_MAX_BATCH = 1000
MAX_BATCH = 10_000
# Two calls in flight per lane: while one batch is decided the next one gathers and
# leaves, instead of waiting for the first to come back.
MAX_IN_FLIGHT = 2

LaneKey = tuple[str, int, int]
BatchResponse = quota_pb2.CheckSendBatchResponse


def mergeable(queued_since: object, dry_run: bool, request_id: str | None) -> bool:
    """Whether a CheckSend may be merged: not a dry run (it counts nothing, and its batch
    would be a dry run too), no `queued_since` (CheckSendBatch has none, and AC-9 needs
    it), no request_id of the caller's (a retry with that id must get the first answer,
    and a batch has its own)."""
    return queued_since is None and not dry_run and request_id is None


def lane_key(request: quota_pb2.CheckSendRequest) -> LaneKey:
    return (request.tenant_id, request.channel, request.kind)


@dataclass(frozen=True, slots=True)
class Answer:
    """The caller's decision."""

    decision: SendDecision


@dataclass(frozen=True, slots=True)
class Raise:
    """The error the caller raises, its own instance."""

    error: Exception


@dataclass(frozen=True, slots=True)
class Alone:
    """The caller sends its own CheckSend, as if it had not been merged."""


@dataclass(frozen=True, slots=True)
class Send:
    """The caller sends this batch for everyone in it (the blocking client)."""

    batch: Batch[Any]


Outcome = Answer | Raise | Alone | Send
ALONE = Alone()


class Member(Generic[W]):
    """One caller's CheckSend in a lane. `wake` is how the client wakes it (a lock or a
    future); `outcome` is set once, when it is settled; `after` is the caller the
    blocking client wakes next, once this one is awake."""

    __slots__ = ("call", "contact_id", "deadline", "queued_at", "wake", "outcome", "after")

    def __init__(self, call: SendCall, deadline: float, queued_at: float, wake: W) -> None:
        self.call = call
        self.contact_id = call.request.contact_id
        self.deadline = deadline
        self.queued_at = queued_at
        self.wake = wake
        self.outcome: Outcome | None = None
        self.after: Member[W] | None = None

    def own_call(self) -> SendCall:
        """The caller's CheckSend as it goes out alone, with a request_id of its own, made
        the first time (a merged call needs none: its batch has one)."""
        request = self.call.request
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        return self.call

    def expired(self, fallback_decision: str) -> Answer:
        """The answer when the caller's deadline passes first: its fail-mode fallback,
        as a CheckSend that got no answer in time."""
        return Answer(SendDecision.from_fallback(fallback_decision, DeadlineExceeded(DeadlineExceeded.code.name)))


class Batch(Generic[W]):
    """Queued calls leaving together. `call` is their CheckSendBatch, None for a batch of
    one (it goes out as that call's CheckSend); `sender` is the member with the latest
    deadline, so the batch's deadline is every member's bound and none waits past its own."""

    def __init__(self, members: list[Member[W]]) -> None:
        self.members = members
        self.sender = max(members, key=lambda member: member.deadline)
        self.deadline = self.sender.deadline
        self.call: Call[quota_pb2.CheckSendBatchRequest, BatchResponse, BatchResponse] | None = None
        if len(members) > 1:
            first = members[0].call.request
            merged = check_send_batch(
                first.tenant_id,
                [member.contact_id for member in members],
                first.kind,
                first.channel,
                False,
                None,
            )
            self.call = Call(merged.method, merged.request, _raw)

    def answers(self, response: quota_pb2.CheckSendBatchResponse) -> list[Outcome]:
        """Each member's outcome from the batch's answer: its result as a CheckSend answer
        with the usage after the batch. A DEFER is asked again alone, as it is the only
        decision whose CheckSend answer carries more (retry_after); it counted nothing."""
        results = response.results
        if len(results) != len(self.members):
            message = f"CheckSendBatch answered {len(results)} results for {len(self.members)} contacts"
            return [Raise(Internal(message)) for _ in self.members]
        has_usage = response.HasField("usage")
        usage = Usage.from_pb(response.usage) if has_usage else None
        outcomes: list[Outcome] = []
        for result in results:
            if result.decision == quota_pb2.DECISION_DEFER:
                outcomes.append(ALONE)
                continue
            raw = quota_pb2.CheckSendResponse(
                decision=result.decision,
                reason=result.reason,
                newly_active=result.newly_active,
                usage=response.usage if has_usage else None,
            )
            decision = SendDecision(
                decision=_name(quota_pb2.Decision, result.decision),
                reason=_name(quota_pb2.Reason, result.reason),
                newly_active=result.newly_active,
                usage=usage,
                retry_after=None,
                raw=raw,
            )
            outcomes.append(Answer(decision))
        return outcomes

    def failed(self, error: QuotaError, fallback_decision: str) -> list[Outcome]:
        """Each member's outcome when the batch got no answer: what it would have got
        alone. INVALID_ARGUMENT refuses the whole batch for one caller's input, so each
        asks again alone and only that caller gets it; UNAVAILABLE (after the retries) and
        DEADLINE_EXCEEDED give each its fail-mode fallback; any other error, NOT_FOUND
        for the tenant among them, is every member's."""
        if isinstance(error, InvalidArgument):
            return [ALONE for _ in self.members]
        if isinstance(error, Unavailable):
            return [Answer(SendDecision.from_fallback(fallback_decision, error)) for _ in self.members]
        return [Raise(type(error)(error.message, error.code)) for _ in self.members]

    def unsent(self) -> list[Outcome]:
        """Each member's outcome when the batch could not be sent at all (the channel is
        closed, ...): each sends alone and meets the same failure itself."""
        return [ALONE for _ in self.members]


def _raw(response: BatchResponse) -> BatchResponse:
    return response


_name = functools.lru_cache(maxsize=64)(enum_name)


class Lane(Generic[W]):
    """The calls of one (tenant_id, channel, kind): how many are in flight, who waits, and
    when the last call came back to how many callers. `timer` is the client's: the member
    or loop timer that makes the queue leave when its window ends."""

    __slots__ = ("key", "in_flight", "queue", "answered_at", "answered", "timer")

    def __init__(self, key: LaneKey) -> None:
        self.key = key
        self.in_flight = 0
        self.queue: list[Member[W]] = []
        self.answered_at = -math.inf
        self.answered = 0
        self.timer: object = None

    def gathers_until(self, window: float) -> float:
        """The end of the queue's window: `window` after its oldest call queued or the
        lane's last answer, whichever is later."""
        return max(self.queue[0].queued_at, self.answered_at) + window

    def idle(self, now: float, window: float) -> bool:
        """Nothing in flight or queued, and no callers likely coming back."""
        if self.in_flight or self.queue:
            return False
        return self.answered <= 1 or now >= self.answered_at + window


class Lanes(Generic[W]):
    """Every lane of one client, and the rules above. Not thread-safe: the blocking client
    holds a lock around it, the asyncio client uses it from its loop only."""

    def __init__(self, window: float, max_batch: int) -> None:
        if not (isinstance(window, (int, float)) and math.isfinite(window) and window >= 0):
            raise ValueError(f"coalesce_window must be a finite number of seconds >= 0, got {window!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"coalesce_max must be a count from 1 to {MAX_BATCH:,}, got {max_batch!r}")
        self.window = float(window)
        self.max_batch = max_batch
        self.closed = False
        self._lanes: dict[LaneKey, Lane[W]] = {}
        self._kept = 0

    def join(self, key: LaneKey, member: Member[W]) -> tuple[Lane[W], bool]:
        """The member's lane, and True when it goes out alone at once (its slot taken)."""
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = Lane(key)
            self._sweep(member.queued_at)
        if self.closed or lane.idle(member.queued_at, self.window):
            lane.in_flight += 1
            return lane, True
        lane.queue.append(member)
        return lane, False

    def take(self, lane: Lane[W], now: float) -> Batch[W] | None:
        """The batch that leaves now, its slot taken, or None while the queue must wait."""
        queue = lane.queue
        if not queue or lane.in_flight >= MAX_IN_FLIGHT:
            return None
        enough = min(self.max_batch, lane.answered) if lane.answered > 1 else self.max_batch
        gathering = now < lane.gathers_until(self.window)
        if gathering and len(queue) < enough:
            return None
        members: list[Member[W]] = []
        waiting: list[Member[W]] = []
        contacts: set[str] = set()
        for member in queue:
            if len(members) < self.max_batch and member.contact_id not in contacts:
                contacts.add(member.contact_id)
                members.append(member)
            else:
                waiting.append(member)
        if gathering and len(members) < enough:
            return None
        lane.queue = waiting
        lane.in_flight += 1
        return Batch(members)

    def window_ends(self, lane: Lane[W], now: float) -> float | None:
        """When the queue leaves if nothing else happens first: the end of its oldest
        call's window while the lane has a free slot; None when it waits for a slot or
        for nothing."""
        if not lane.queue or lane.in_flight >= MAX_IN_FLIGHT:
            return None
        ends = lane.gathers_until(self.window)
        return ends if ends > now else None

    def finish(self, lane: Lane[W], now: float, answered: int) -> None:
        """A call of the lane came back to `answered` callers: its slot is free."""
        lane.in_flight -= 1
        lane.answered_at = now
        lane.answered = answered
        if lane.idle(now, self.window):
            self._forget(lane)

    def withdraw(self, lane: Lane[W], member: Member[W]) -> bool:
        """Takes a caller that gives up out of the queue; False when it already left."""
        try:
            lane.queue.remove(member)
        except ValueError:
            return False
        return True

    def close(self) -> list[Member[W]]:
        """From now on every call goes out alone; returns the queued members, taken out."""
        self.closed = True
        queued: list[Member[W]] = []
        for lane in self._lanes.values():
            queued.extend(lane.queue)
            lane.queue = []
        return queued

    def _forget(self, lane: Lane[W]) -> None:
        if self._lanes.get(lane.key) is lane:
            del self._lanes[lane.key]

    def _sweep(self, now: float) -> None:
        # Lanes are kept while callers may come back; forget the idle ones whenever the
        # count doubles, so that a client serving many tenants keeps only the busy ones.
        if len(self._lanes) > max(64, 2 * self._kept):
            for lane in [lane for lane in self._lanes.values() if lane.idle(now, self.window)]:
                self._forget(lane)
            self._kept = len(self._lanes)


def settle(members: list[Member[W]], outcomes: list[Outcome]) -> list[Member[W]]:
    """Gives each member still unsettled its outcome; returns them, for the client to wake.
    A member settled already (its deadline passed, or it sends the batch) keeps its own."""
    settled: list[Member[W]] = []
    for member, outcome in zip(members, outcomes, strict=True):
        if member.outcome is None:
            member.outcome = outcome
            settled.append(member)
    return settled
