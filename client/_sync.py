"""QuotaClient: the blocking client over a grpc channel."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from quota_sidecar.api.v1 import quota_pb2, quota_pb2_grpc

from . import _calls, _coalesce
from ._calls import (
    DEFAULT_ADMIN_TIMEOUT,
    DEFAULT_TIMEOUT,
    Call,
    ClientConfig,
    FailMode,
    SendCall,
    status_of,
)
from ._coalesce import ALONE, Answer, Batch, Lane, Lanes, Member, Outcome, Raise, Send, settle
from ._errors import QuotaError, error_from_status
from ._results import (
    ActiveContact,
    ActiveContactsPage,
    ActivityRecord,
    BatchDecision,
    ContactAddDecision,
    ContactState,
    EnrollDecision,
    Invoice,
    Plan,
    PlanChange,
    SendDecision,
    Usage,
    UsageEvent,
)
from ._retry import Retry
from ._wire import EnumArg, TimestampArg

Q = TypeVar("Q", bound=Message)
P = TypeVar("P", bound=Message)
R = TypeVar("R")


class QuotaClient:
    """A blocking client for the quota sidecar's QuotaService and QuotaAdminService.

    target: "127.0.0.1:50051", "unix:///run/quota.sock" or any gRPC target.
    admin_token: sent as `authorization: Bearer <token>` on admin calls only.
    timeout: the deadline of every data-plane call, in seconds (a sidecar call takes
        tens of milliseconds); admin_timeout: that of every admin call. Each method
        takes `timeout=` to override it for one call. It bounds the whole call: its
        retries and their pauses fit in it, and the fallback comes once it has passed.
    retries: how many times to retry an UNAVAILABLE answer, or a Retry for full control.
    fail_mode: what the check calls answer when the sidecar cannot be reached
        (UNAVAILABLE after the retries, or DEADLINE_EXCEEDED): "closed" denies, "open"
        allows; either result has `fallback=True`. Other calls raise Unavailable.
    credentials: channel credentials for TLS; None uses a plaintext channel.
    channel_options: extra gRPC channel arguments, overriding the client's defaults.
    coalesce: merge check_send calls made at the same time by this client's threads
        into CheckSendBatch calls, each caller still getting its own SendDecision. A
        call made while no other of its tenant, channel and kind is under way goes out
        at once as its own CheckSend, so a lone caller waits for nothing; calls made
        while others are under way queue and leave together. Dry runs, calls with
        `queued_since` and calls with a `request_id` of the caller's are never merged.
    coalesce_window: how long queued calls wait for company once the sidecar could
        take them, in seconds (the wait for a call in flight to come back is bounded by
        each call's own deadline only); 0 sends them as soon as it can.
    coalesce_max: the most calls one CheckSendBatch carries (1 to 10,000; 1 is the same
        as coalesce=False).

    Use it as a context manager, or call close(); calls still waiting then get an
    answer or an error.
    """

    def __init__(
        self,
        target: str,
        *,
        admin_token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        admin_timeout: float = DEFAULT_ADMIN_TIMEOUT,
        retries: int | Retry = 2,
        fail_mode: FailMode = "closed",
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        coalesce: bool = True,
        coalesce_window: float = _coalesce.DEFAULT_WINDOW,
        coalesce_max: int = _coalesce.DEFAULT_MAX_BATCH,
    ) -> None:
        self._config = ClientConfig(
            target,
            admin_token=admin_token,
            timeout=timeout,
            admin_timeout=admin_timeout,
            retries=retries,
            fail_mode=fail_mode,
            channel_options=channel_options,
        )
        self._lanes: Lanes[Signal] = Lanes(coalesce_window, coalesce_max)
        self._coalesce = bool(coalesce) and coalesce_max > 1
        self._lock = threading.Lock()
        options = self._config.channel_options
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = quota_pb2_grpc.QuotaServiceStub(self._channel)
        self._admin_stub = quota_pb2_grpc.QuotaAdminServiceStub(self._channel)
        self._random = random.Random()
        self._closed = threading.Event()

    @property
    def target(self) -> str:
        return self._config.target

    @property
    def timeout(self) -> float:
        return self._config.timeout

    @property
    def admin_timeout(self) -> float:
        return self._config.admin_timeout

    @property
    def retry(self) -> Retry:
        return self._config.retry

    @property
    def fail_mode(self) -> FailMode:
        return self._config.fail_mode

    @property
    def coalesce(self) -> bool:
        return self._coalesce

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            queued = self._lanes.close()
            _wake_in_turn(settle(queued, [ALONE for _ in queued]))
        self._channel.close()

    def __enter__(self) -> QuotaClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _invoke(self, call: Call[Q, P, R], timeout: float | None) -> R:
        method = getattr(self._admin_stub if call.admin else self._stub, call.method)
        metadata = self._config.metadata(call)
        attempts = self._config.attempts(call, timeout, self._random)
        while (remaining := attempts.next_timeout()) is not None:
            try:
                response = method(call.request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as exc:
                code, details = status_of(exc)
                if code is grpc.StatusCode.UNAVAILABLE and (pause := attempts.pause()) is not None:
                    time.sleep(pause)
                    continue
                return self._config.give_up(call, error_from_status(code, details), exc)
            return call.read(response)
        return self._config.give_up(call, _calls.out_of_time())

    def check_send(
        self,
        tenant_id: str,
        contact_id: str,
        kind: EnumArg,
        *,
        channel: EnumArg = "EMAIL",
        queued_since: TimestampArg | None = None,
        dry_run: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> SendDecision:
        """Decides one message to one contact and, when allowed, counts it.

        A call that is not a dry run gets a fresh request_id when none is given; pass
        "" to send none. With `coalesce` on, calls made at the same time without
        `queued_since`, `dry_run` or `request_id` may travel in one CheckSendBatch under
        its own request_id: each gets the answer it would have got alone, with the
        usage figures after that batch."""
        if self._coalesce and _coalesce.mergeable(queued_since, dry_run, request_id):
            return self._coalesced(_calls.merged_check_send(tenant_id, contact_id, kind, channel), timeout)
        call = _calls.check_send(tenant_id, contact_id, kind, channel, queued_since, dry_run, request_id)
        return self._invoke(call, timeout)

    def _coalesced(self, call: SendCall, timeout: float | None) -> SendDecision:
        lanes = self._lanes
        now = time.monotonic()
        member = Member(call, now + self._config.deadline(call, timeout), now, _signal())
        with self._lock:
            lane, alone = lanes.join(_coalesce.lane_key(call.request), member)
            if not alone:
                self._dispatch(lane, now)
        if alone:
            try:
                return self._alone(member)
            finally:
                self._finish(lane, 1)
        try:
            outcome = self._wait(lane, member)
        except BaseException:
            self._abandon(lane, member)
            raise
        return self._settle(lane, member, outcome)

    def _abandon(self, lane: Lane[Signal], member: Member[Signal]) -> None:
        """A caller interrupted while it waits leaves the queue; a batch it was to send
        sends none, its other callers each going alone."""
        with self._lock:
            now = time.monotonic()
            if self._lanes.withdraw(lane, member):
                self._dispatch(lane, now)
            elif isinstance(member.outcome, Send):
                batch = member.outcome.batch
                _wake_in_turn(settle(batch.members, batch.unsent()))
                self._lanes.finish(lane, now, 0)
                self._dispatch(lane, now)

    def _dispatch(self, lane: Lane[Signal], now: float) -> None:
        """Under the lock: wakes the sender of each batch that may leave now, and the
        queue's oldest caller when the end of its window is what it waits for."""
        lanes = self._lanes
        while (batch := lanes.take(lane, now)) is not None:
            batch.sender.outcome = Send(batch)
            _wake(batch.sender)
        if lane.queue and lane.timer is not lane.queue[0] and lanes.window_ends(lane, now) is not None:
            lane.timer = lane.queue[0]
            _wake(lane.queue[0])

    def _wait(self, lane: Lane[Signal], member: Member[Signal]) -> Outcome:
        """Waits for the caller's outcome: woken by whoever settles it, or by its own
        deadline, or, as the oldest queued caller, by the end of the queue's window."""
        lanes = self._lanes
        timed_out = False
        while True:
            with self._lock:
                now = time.monotonic()
                if member.outcome is None and now >= member.deadline:
                    member.outcome = member.expired(self._config.fallback_decision)
                    if lanes.withdraw(lane, member):
                        self._dispatch(lane, now)
                elif member.outcome is None and (timed_out or lane.timer is member):
                    self._dispatch(lane, now)
                if member.outcome is not None:
                    if member.after is not None:
                        _wake(member.after)
                    return member.outcome
                until = member.deadline
                ends = lanes.window_ends(lane, now)
                if ends is not None and lane.queue[0] is member:
                    lane.timer = member
                    until = min(until, ends)
            timed_out = not member.wake.acquire(timeout=until - now)

    def _settle(self, lane: Lane[Signal], member: Member[Signal], outcome: Outcome) -> SendDecision:
        if isinstance(outcome, Answer):
            return outcome.decision
        if isinstance(outcome, Raise):
            raise outcome.error
        if isinstance(outcome, Send):
            return self._send(lane, outcome.batch, member)
        return self._alone(member)

    def _alone(self, member: Member[Signal]) -> SendDecision:
        remaining = member.deadline - time.monotonic()
        if remaining <= 0:
            return member.expired(self._config.fallback_decision).decision
        return self._invoke(member.own_call(), remaining)

    def _send(self, lane: Lane[Signal], batch: Batch[Signal], sender: Member[Signal]) -> SendDecision:
        """Sends a batch for everyone in it and settles them; the sender has the latest
        deadline, which is the batch's."""
        if batch.call is None:
            try:
                return self._alone(sender)
            finally:
                self._finish(lane, 1)
        outcomes = batch.unsent()
        try:
            remaining = batch.deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise error_from_status(grpc.StatusCode.DEADLINE_EXCEEDED, None)
                outcomes = batch.answers(self._invoke(batch.call, remaining))
            except QuotaError as error:
                outcomes = batch.failed(error, self._config.fallback_decision)
        finally:
            with self._lock:
                own = outcomes[batch.members.index(sender)]
                _wake_in_turn(settle(batch.members, outcomes))
                now = time.monotonic()
                self._lanes.finish(lane, now, len(batch.members))
                self._dispatch(lane, now)
        return self._settle(lane, sender, own)

    def _finish(self, lane: Lane[Signal], answered: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._lanes.finish(lane, now, answered)
            self._dispatch(lane, now)

    def check_send_batch(
        self,
        tenant_id: str,
        contact_ids: str | Iterable[str],
        kind: EnumArg,
        *,
        channel: EnumArg = "EMAIL",
        dry_run: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> BatchDecision:
        """Decides up to 10,000 contacts in request order; `dry_run` is SG-5's pre-flight
        check. A large batch may need a longer `timeout` than the default."""
        call = _calls.check_send_batch(tenant_id, contact_ids, kind, channel, dry_run, request_id)
        return self._invoke(call, timeout)

    def check_contact_add(
        self,
        tenant_id: str,
        contact_ids: str | Iterable[str],
        source: EnumArg,
        *,
        marketing: bool | None = None,
        dry_run: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> ContactAddDecision:
        """May these contacts be added through this source (AC-2..AC-5)? When allowed
        (and not a dry run) they are added; an IMPORT is all or nothing (AC-4).

        `marketing` is the status new contacts get (model 4; None leaves the sidecar's
        default, true). A call that is not a dry run gets a fresh request_id when none
        is given, so a retry after UNAVAILABLE adds nothing twice; pass "" to send none."""
        call = _calls.check_contact_add(tenant_id, contact_ids, source, marketing, dry_run, request_id)
        return self._invoke(call, timeout)

    def check_enroll(
        self,
        tenant_id: str,
        contact_id: str,
        automation_id: str,
        *,
        timeout: float | None = None,
    ) -> EnrollDecision:
        """May this contact enter an automation (AC-8 with the AC-7 grace)?"""
        return self._invoke(_calls.check_enroll(tenant_id, contact_id, automation_id), timeout)

    def record_activity(
        self,
        tenant_id: str,
        contact_ids: str | Iterable[str],
        kind: EnumArg,
        *,
        occurred_at: TimestampArg | None = None,
        marketing: bool = False,
        source_type: str = "",
        source_id: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> ActivityRecord:
        """Records activity that already happened; never refused for quota reasons.
        Gets a fresh request_id when none is given."""
        call = _calls.record_activity(
            tenant_id, contact_ids, kind, occurred_at, marketing, source_type, source_id, request_id
        )
        return self._invoke(call, timeout)

    def get_usage(
        self,
        tenant_id: str,
        *,
        cycle_start: TimestampArg | None = None,
        timeout: float | None = None,
    ) -> Usage:
        """The figures of the cycle containing `cycle_start` (default: the current one)."""
        return self._invoke(_calls.get_usage(tenant_id, cycle_start), timeout)

    def watch_usage_events(
        self, tenant_id: str = "", *, after_sequence: int = 0, follow: bool = True
    ) -> Iterator[UsageEvent]:
        """Usage events after `after_sequence` (0: every event kept), then each new one as
        it is committed, for as long as the iterator is used; one tenant's, or every
        tenant's when `tenant_id` is empty. A sidecar that stops or restarts is dialled
        again and the stream resumes after the last event yielded, so none is skipped;
        store `sequence` to resume after your own restart. Errors other than
        UNAVAILABLE raise (NOT_FOUND for a tenant without a plan). With `follow=False`
        it ends once the events already committed are read. It ends when the client is
        closed, from any thread."""
        seen = after_sequence
        failures = 0
        while not self._closed.is_set():
            try:
                stream = self._stub.WatchUsageEvents(_calls.watch_request(tenant_id, seen, follow))
                try:
                    for response in stream:
                        failures = 0
                        event = UsageEvent.from_pb(response.event)
                        seen = event.sequence
                        yield event
                finally:
                    stream.cancel()
            except (grpc.RpcError, ValueError) as exc:
                # Closing the channel cancels the stream, or refuses the next dial with ValueError.
                if _calls.watch_ended(exc, self._closed.is_set()):
                    return
            else:
                if not follow:
                    return
            failures += 1
            self._closed.wait(_calls.reconnect_pause(failures))

    def put_plan(
        self,
        tenant_id: str,
        plan: Plan | quota_pb2.Plan,
        *,
        timeout: float | None = None,
    ) -> PlanChange:
        """Creates or replaces the tenant's plan (admin)."""
        return self._invoke(_calls.put_plan(tenant_id, plan), timeout)

    def get_plan(self, tenant_id: str, *, timeout: float | None = None) -> Plan:
        """The tenant's plan (admin)."""
        return self._invoke(_calls.get_plan(tenant_id), timeout)

    def get_contact(self, tenant_id: str, contact_id: str, *, timeout: float | None = None) -> ContactState:
        """One contact as the ledger knows it (admin)."""
        return self._invoke(_calls.get_contact(tenant_id, contact_id), timeout)

    def list_active_contacts(
        self,
        tenant_id: str,
        *,
        cycle_start: TimestampArg | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> ActiveContactsPage:
        """One page of the contacts active in a cycle (admin)."""
        call = _calls.list_active_contacts(tenant_id, cycle_start, page_size, page_token)
        return self._invoke(call, timeout)

    def iter_active_contacts(
        self,
        tenant_id: str,
        *,
        cycle_start: TimestampArg | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[ActiveContact]:
        """Every contact active in a cycle, fetching page after page (admin); `timeout`
        applies to each page."""
        page_token = ""
        while True:
            page = self.list_active_contacts(
                tenant_id, cycle_start=cycle_start, page_size=page_size, page_token=page_token, timeout=timeout
            )
            yield from page.contacts
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    def get_invoice(
        self,
        tenant_id: str,
        *,
        cycle_start: TimestampArg | None = None,
        timeout: float | None = None,
    ) -> Invoice:
        """The billable figures of a cycle (admin; CR-6, CR-7)."""
        return self._invoke(_calls.get_invoice(tenant_id, cycle_start), timeout)


# A caller waits on a lock of its own, taken when it queues: waking it is releasing the
# lock, which costs a third of a threading.Event. Wakers hold the client's lock, so the
# lock is released only while taken, never twice.
Signal = threading.Lock


def _signal() -> Signal:
    lock = threading.Lock()
    lock.acquire()
    return lock


def _wake(member: Member[Signal]) -> None:
    if member.wake.locked():
        member.wake.release()


def _wake_in_turn(members: list[Member[Signal]]) -> None:
    """Wakes the first member; each wakes the next once it runs. Woken all at once, they
    would all contend for the GIL, at a cost in CPU that grows with their number."""
    for member, after in itertools.pairwise(members):
        member.after = after
    if members:
        _wake(members[0])
