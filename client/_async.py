"""AsyncQuotaClient: the asyncio client over a grpc.aio channel."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterable, Sequence
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
from ._coalesce import ALONE, Answer, Batch, Lane, Lanes, Member, Outcome, Raise, settle
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


class AsyncQuotaClient:
    """An asyncio client for the quota sidecar's QuotaService and QuotaAdminService,
    with the same methods and arguments as QuotaClient, each a coroutine.

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
    coalesce: merge check_send calls made at the same time by this client's tasks
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

    Build it inside the event loop that uses it (grpc.aio binds a channel to its loop).
    Use it as an async context manager, or await close(); calls still waiting then get
    an answer or an error.
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
        self._lanes: Lanes[asyncio.Future[Outcome]] = Lanes(coalesce_window, coalesce_max)
        self._coalesce = bool(coalesce) and coalesce_max > 1
        self._batches: set[asyncio.Task[None]] = set()
        options = self._config.channel_options
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = quota_pb2_grpc.QuotaServiceStub(self._channel)
        self._admin_stub = quota_pb2_grpc.QuotaAdminServiceStub(self._channel)
        self._random = random.Random()
        self._closed = asyncio.Event()

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

    async def close(self) -> None:
        self._closed.set()
        queued = self._lanes.close()
        for member in settle(queued, [ALONE for _ in queued]):
            _resolve(member)
        await self._channel.close()
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    async def __aenter__(self) -> AsyncQuotaClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _invoke(self, call: Call[Q, P, R], timeout: float | None) -> R:
        method = getattr(self._admin_stub if call.admin else self._stub, call.method)
        metadata = self._config.metadata(call)
        attempts = self._config.attempts(call, timeout, self._random)
        while (remaining := attempts.next_timeout()) is not None:
            try:
                response = await method(call.request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as exc:
                code, details = status_of(exc)
                if code is grpc.StatusCode.UNAVAILABLE and (pause := attempts.pause()) is not None:
                    await asyncio.sleep(pause)
                    continue
                return self._config.give_up(call, error_from_status(code, details), exc)
            return call.read(response)
        return self._config.give_up(call, _calls.out_of_time())

    async def check_send(
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
            return await self._coalesced(_calls.merged_check_send(tenant_id, contact_id, kind, channel), timeout)
        call = _calls.check_send(tenant_id, contact_id, kind, channel, queued_since, dry_run, request_id)
        return await self._invoke(call, timeout)

    async def _coalesced(self, call: SendCall, timeout: float | None) -> SendDecision:
        lanes = self._lanes
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        member = Member(call, now + self._config.deadline(call, timeout), now, loop.create_future())
        lane, alone = lanes.join(_coalesce.lane_key(call.request), member)
        if alone:
            try:
                return await self._alone(member)
            finally:
                lanes.finish(lane, time.monotonic(), 1)
                self._dispatch(lane)
        self._dispatch(lane)
        expiry = loop.call_later(member.deadline - now, self._expire, lane, member)
        try:
            outcome = await member.wake
        except asyncio.CancelledError:
            if lanes.withdraw(lane, member):
                self._dispatch(lane)
            raise
        finally:
            expiry.cancel()
        if isinstance(outcome, Answer):
            return outcome.decision
        if isinstance(outcome, Raise):
            raise outcome.error
        return await self._alone(member)

    def _dispatch(self, lane: Lane[asyncio.Future[Outcome]]) -> None:
        """Starts a task for each batch that may leave now, and a timer for the end of
        the queue's window when that is what it waits for."""
        lanes = self._lanes
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        while (batch := lanes.take(lane, now)) is not None:
            task = loop.create_task(self._send(lane, batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
        ends = lanes.window_ends(lane, now)
        if ends is not None and lane.timer is None:
            lane.timer = loop.call_later(ends - now, self._window_ended, lane)

    def _window_ended(self, lane: Lane[asyncio.Future[Outcome]]) -> None:
        lane.timer = None
        self._dispatch(lane)

    def _expire(self, lane: Lane[asyncio.Future[Outcome]], member: Member[asyncio.Future[Outcome]]) -> None:
        if self._lanes.withdraw(lane, member):
            self._dispatch(lane)
        for expired in settle([member], [member.expired(self._config.fallback_decision)]):
            _resolve(expired)

    async def _alone(self, member: Member[asyncio.Future[Outcome]]) -> SendDecision:
        remaining = member.deadline - time.monotonic()
        if remaining <= 0:
            return member.expired(self._config.fallback_decision).decision
        return await self._invoke(member.own_call(), remaining)

    async def _send_alone(self, member: Member[asyncio.Future[Outcome]], remaining: float) -> list[Outcome]:
        try:
            return [Answer(await self._invoke(member.own_call(), remaining))]
        except QuotaError as error:
            return [Raise(error)]

    async def _send(self, lane: Lane[asyncio.Future[Outcome]], batch: Batch[asyncio.Future[Outcome]]) -> None:
        """Sends a batch for everyone in it and settles them, within the latest of their
        deadlines; a batch of one as that caller's own CheckSend."""
        outcomes = batch.unsent()
        try:
            remaining = batch.deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise error_from_status(grpc.StatusCode.DEADLINE_EXCEEDED, None)
                if batch.call is None:
                    outcomes = await self._send_alone(batch.sender, remaining)
                else:
                    outcomes = batch.answers(await self._invoke(batch.call, remaining))
            except QuotaError as error:
                outcomes = batch.failed(error, self._config.fallback_decision)
            except Exception:
                # The call could not be made (a closed channel, ...): each caller then
                # makes its own and meets the same failure there.
                outcomes = batch.unsent()
        finally:
            for member in settle(batch.members, outcomes):
                _resolve(member)
            self._lanes.finish(lane, time.monotonic(), len(batch.members))
            self._dispatch(lane)

    async def check_send_batch(
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
        return await self._invoke(call, timeout)

    async def check_contact_add(
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
        return await self._invoke(call, timeout)

    async def check_enroll(
        self,
        tenant_id: str,
        contact_id: str,
        automation_id: str,
        *,
        timeout: float | None = None,
    ) -> EnrollDecision:
        """May this contact enter an automation (AC-8 with the AC-7 grace)?"""
        return await self._invoke(_calls.check_enroll(tenant_id, contact_id, automation_id), timeout)

    async def record_activity(
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
        return await self._invoke(call, timeout)

    async def get_usage(
        self,
        tenant_id: str,
        *,
        cycle_start: TimestampArg | None = None,
        timeout: float | None = None,
    ) -> Usage:
        """The figures of the cycle containing `cycle_start` (default: the current one)."""
        return await self._invoke(_calls.get_usage(tenant_id, cycle_start), timeout)

    async def watch_usage_events(
        self, tenant_id: str = "", *, after_sequence: int = 0, follow: bool = True
    ) -> AsyncIterator[UsageEvent]:
        """Usage events after `after_sequence` (0: every event kept), then each new one as
        it is committed, for as long as the iterator is used; one tenant's, or every
        tenant's when `tenant_id` is empty. A sidecar that stops or restarts is dialled
        again and the stream resumes after the last event yielded, so none is skipped;
        store `sequence` to resume after your own restart. Errors other than
        UNAVAILABLE raise (NOT_FOUND for a tenant without a plan). With `follow=False`
        it ends once the events already committed are read. It ends when the client is
        closed."""
        seen = after_sequence
        failures = 0
        while not self._closed.is_set():
            try:
                stream = self._stub.WatchUsageEvents(_calls.watch_request(tenant_id, seen, follow))
                try:
                    async for response in stream:
                        failures = 0
                        event = UsageEvent.from_pb(response.event)
                        seen = event.sequence
                        yield event
                finally:
                    stream.cancel()
            except (grpc.RpcError, grpc.aio.UsageError, asyncio.CancelledError) as exc:
                # Closing the channel cancels the stream (CancelledError from the read, though
                # the task is not cancelled), or refuses the next dial with UsageError.
                if _calls.watch_ended(exc, self._closed.is_set() and not _cancelling()):
                    return
            else:
                if not follow:
                    return
            failures += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), _calls.reconnect_pause(failures))

    async def put_plan(
        self,
        tenant_id: str,
        plan: Plan | quota_pb2.Plan,
        *,
        timeout: float | None = None,
    ) -> PlanChange:
        """Creates or replaces the tenant's plan (admin)."""
        return await self._invoke(_calls.put_plan(tenant_id, plan), timeout)

    async def get_plan(self, tenant_id: str, *, timeout: float | None = None) -> Plan:
        """The tenant's plan (admin)."""
        return await self._invoke(_calls.get_plan(tenant_id), timeout)

    async def get_contact(self, tenant_id: str, contact_id: str, *, timeout: float | None = None) -> ContactState:
        """One contact as the ledger knows it (admin)."""
        return await self._invoke(_calls.get_contact(tenant_id, contact_id), timeout)

    async def list_active_contacts(
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
        return await self._invoke(call, timeout)

    async def iter_active_contacts(
        self,
        tenant_id: str,
        *,
        cycle_start: TimestampArg | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[ActiveContact]:
        """Every contact active in a cycle, fetching page after page (admin); `timeout`
        applies to each page."""
        page_token = ""
        while True:
            page = await self.list_active_contacts(
                tenant_id, cycle_start=cycle_start, page_size=page_size, page_token=page_token, timeout=timeout
            )
            for contact in page.contacts:
                yield contact
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    async def get_invoice(
        self,
        tenant_id: str,
        *,
        cycle_start: TimestampArg | None = None,
        timeout: float | None = None,
    ) -> Invoice:
        """The billable figures of a cycle (admin; CR-6, CR-7)."""
        return await self._invoke(_calls.get_invoice(tenant_id, cycle_start), timeout)


def _resolve(member: Member[asyncio.Future[Outcome]]) -> None:
    if not member.wake.done():
        assert member.outcome is not None
        member.wake.set_result(member.outcome)


def _cancelling() -> bool:
    """Whether the running task is being cancelled (not merely reading a stream that was)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
