"""AsyncQuotaClient: the asyncio client over a grpc.aio channel."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from . import _calls
from ._calls import (
    DEFAULT_ADMIN_TIMEOUT,
    DEFAULT_TIMEOUT,
    Call,
    ClientConfig,
    FailMode,
    status_of,
)
from ._errors import Unavailable, error_from_status
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
from .v1 import quota_pb2, quota_pb2_grpc

R = TypeVar("R")


class AsyncQuotaClient:
    """An asyncio client for the quota sidecar's QuotaService and QuotaAdminService,
    with the same methods and arguments as QuotaClient, each a coroutine.

    target: "127.0.0.1:50051", "unix:///run/quota.sock" or any gRPC target.
    admin_token: sent as `authorization: Bearer <token>` on admin calls only.
    timeout: the deadline of every data-plane call, in seconds (a sidecar call takes
        tens of milliseconds); admin_timeout: that of every admin call. Each method
        takes `timeout=` to override it for one call.
    retries: how many times to retry an UNAVAILABLE answer, or a Retry for full control.
    fail_mode: what the check calls answer when the sidecar cannot be reached
        (UNAVAILABLE after the retries, or DEADLINE_EXCEEDED): "closed" denies, "open"
        allows; either result has `fallback=True`. Other calls raise Unavailable.
    credentials: channel credentials for TLS; None uses a plaintext channel.
    channel_options: extra gRPC channel arguments, overriding the client's defaults.

    Build it inside the event loop that uses it (grpc.aio binds a channel to its loop).
    Use it as an async context manager, or await close().
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
        options = self._config.channel_options
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = quota_pb2_grpc.QuotaServiceStub(self._channel)
        self._admin_stub = quota_pb2_grpc.QuotaAdminServiceStub(self._channel)
        self._random = random.Random()

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

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncQuotaClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _invoke(self, call: Call[R], timeout: float | None) -> R:
        method = getattr(self._admin_stub if call.admin else self._stub, call.method)
        deadline = self._config.deadline(call, timeout)
        metadata = self._config.metadata(call)
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await method(call.request, timeout=deadline, metadata=metadata)
            except grpc.RpcError as exc:
                code, details = status_of(exc)
                if code is grpc.StatusCode.UNAVAILABLE:
                    pause = self._config.retry.pause(attempt, time.monotonic() - started, self._random)
                    if pause is not None:
                        await asyncio.sleep(pause)
                        continue
                error = error_from_status(code, details)
                if call.fallback is not None and isinstance(error, Unavailable):
                    return call.fallback(self._config.fallback_decision, error)
                raise error from exc
            return call.read(response)

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
        "" to send none."""
        call = _calls.check_send(tenant_id, contact_id, kind, channel, queued_since, dry_run, request_id)
        return await self._invoke(call, timeout)

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
        it ends once the events already committed are read."""
        seen = after_sequence
        failures = 0
        while True:
            stream = self._stub.WatchUsageEvents(_calls.watch_request(tenant_id, seen, follow))
            try:
                async for response in stream:
                    failures = 0
                    event = UsageEvent.from_pb(response.event)
                    seen = event.sequence
                    yield event
            except grpc.RpcError as exc:
                code, details = status_of(exc)
                if code is not grpc.StatusCode.UNAVAILABLE:
                    raise error_from_status(code, details) from exc
            else:
                if not follow:
                    return
            finally:
                stream.cancel()
            failures += 1
            await asyncio.sleep(_calls.reconnect_pause(failures))

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
