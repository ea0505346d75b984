"""The RPCs as the two clients make them: one `Call` per RPC, built from friendly
arguments, saying which service it goes to, how its answer is read and what the
fail-open or fail-closed policy answers when the sidecar gives none. The sync and the
async client differ only in how they send a Call; `ClientConfig` holds what they share.
"""

from __future__ import annotations

import functools
import random
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from quota_sidecar.api.v1 import quota_pb2

from ._errors import DeadlineExceeded, QuotaError, Unavailable, error_from_status
from ._results import (
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
)
from ._retry import Retry
from ._wire import EnumArg, ProtoEnum, TimestampArg, enum_value, id_list, message, to_timestamp

Q = TypeVar("Q", bound=Message)
P = TypeVar("P", bound=Message)
R = TypeVar("R")

FailMode = Literal["closed", "open"]

DEFAULT_TIMEOUT = 0.1
DEFAULT_ADMIN_TIMEOUT = 5.0

# A sidecar on the same host comes back within moments of a restart; gRPC's default
# reconnect backoff (1 s, growing to 120 s) would keep the channel failing fast long
# after it is back.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


@dataclass(frozen=True)
class Call(Generic[Q, P, R]):
    """One RPC: `method` of the data-plane or (`admin`) the admin stub, sent `request`
    (a Q), answers a P that `read` turns into the caller's R."""

    method: str
    request: Q
    read: Callable[[P], R]
    admin: bool = False
    fallback: Callable[[str, Unavailable], R] | None = None


SendCall = Call[quota_pb2.CheckSendRequest, quota_pb2.CheckSendResponse, SendDecision]
BatchCall = Call[quota_pb2.CheckSendBatchRequest, quota_pb2.CheckSendBatchResponse, BatchDecision]


class ClientConfig:
    """The settings both clients share, validated once."""

    def __init__(
        self,
        target: str,
        *,
        admin_token: str | None,
        timeout: float,
        admin_timeout: float,
        retries: int | Retry,
        fail_mode: FailMode,
        channel_options: Sequence[tuple[str, Any]],
    ) -> None:
        if not target:
            raise ValueError("target must name the sidecar, e.g. '127.0.0.1:50051' or 'unix:///run/quota.sock'")
        if timeout <= 0 or admin_timeout <= 0:
            raise ValueError("timeout and admin_timeout must be positive seconds")
        if fail_mode not in ("closed", "open"):
            raise ValueError(f"fail_mode must be 'closed' or 'open', got {fail_mode!r}")
        self.target = target
        self.timeout = float(timeout)
        self.admin_timeout = float(admin_timeout)
        self.retry = Retry.of(retries)
        self.fail_mode: FailMode = fail_mode
        given = dict(channel_options)
        self.channel_options = [(k, v) for k, v in DEFAULT_CHANNEL_OPTIONS if k not in given] + list(given.items())
        self._admin_metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else None

    @property
    def fallback_decision(self) -> str:
        return "ALLOW" if self.fail_mode == "open" else "DENY"

    def deadline(self, call: Call[Q, P, R], timeout: float | None) -> float:
        if timeout is not None:
            return timeout
        return self.admin_timeout if call.admin else self.timeout

    def attempts(self, call: Call[Q, P, R], timeout: float | None, rng: random.Random) -> Attempts:
        return Attempts(self.deadline(call, timeout), self.retry, rng)

    def give_up(self, call: Call[Q, P, R], error: QuotaError, cause: BaseException | None = None) -> R:
        """The fail-mode fallback of a check call the sidecar did not answer; else raises `error`."""
        if call.fallback is not None and isinstance(error, Unavailable):
            return call.fallback(self.fallback_decision, error)
        raise error from cause

    def metadata(self, call: Call[Q, P, R]) -> tuple[tuple[str, str], ...] | None:
        return self._admin_metadata if call.admin else None


class Attempts:
    """The tries of one call, all within the call's one deadline: each try's gRPC timeout
    is what remains of it, and a retry whose pause would outlast it is not made, so the
    call (its retries and its fallback included) ends within its timeout."""

    __slots__ = ("_ends", "_rng", "_retry", "_started", "made")

    def __init__(self, seconds: float, retry: Retry, rng: random.Random) -> None:
        self._started = time.monotonic()
        self._ends = self._started + seconds
        self._retry = retry
        self._rng = rng
        self.made = 0

    def next_timeout(self) -> float | None:
        """The timeout of the next try: what remains of the call's; None once nothing does."""
        remaining = self._ends - time.monotonic()
        if remaining <= 0:
            return None
        self.made += 1
        return remaining

    def pause(self) -> float | None:
        """Seconds to wait before retrying after UNAVAILABLE; None when the Retry allows no
        more tries or the pause would leave no time for one."""
        now = time.monotonic()
        pause = self._retry.pause(self.made, now - self._started, self._rng)
        if pause is None or now + pause >= self._ends:
            return None
        return pause


def out_of_time() -> DeadlineExceeded:
    return DeadlineExceeded("the call's deadline passed before it was answered")


def _request_id(request_id: str | None, dry_run: bool) -> str:
    # One id per logical call, made before the first try, so every retry repeats it
    # and the sidecar answers a repeat with its first answer (counting nothing twice).
    if request_id is not None:
        return request_id
    return "" if dry_run else uuid.uuid4().hex


def _stamp(value: TimestampArg | None, field: str) -> dict[str, timestamp_pb2.Timestamp]:
    return {} if value is None else {field: to_timestamp(value, field)}


def check_send(
    tenant_id: str,
    contact_id: str,
    kind: EnumArg,
    channel: EnumArg,
    queued_since: TimestampArg | None,
    dry_run: bool,
    request_id: str | None,
) -> SendCall:
    request = message(
        quota_pb2.CheckSendRequest,
        tenant_id=tenant_id,
        contact_id=contact_id,
        channel=enum_value(quota_pb2.Channel, channel, "channel"),
        kind=enum_value(quota_pb2.MessageKind, kind, "kind"),
        dry_run=dry_run,
        request_id=_request_id(request_id, dry_run),
        **_stamp(queued_since, "queued_since"),
    )
    return Call("CheckSend", request, SendDecision.from_pb, fallback=SendDecision.from_fallback)


def merged_check_send(tenant_id: str, contact_id: str, kind: EnumArg, channel: EnumArg) -> SendCall:
    """A CheckSend the client may merge into a CheckSendBatch: no queued_since, no dry run
    and no request_id yet (it gets one only if it goes out alone; a batch has its own).
    Mail workers repeat the same kind and channel, so their wire numbers are remembered."""
    request = message(
        quota_pb2.CheckSendRequest,
        tenant_id=tenant_id,
        contact_id=contact_id,
        channel=_remembered(quota_pb2.Channel, channel, "channel"),
        kind=_remembered(quota_pb2.MessageKind, kind, "kind"),
    )
    return Call("CheckSend", request, SendDecision.from_pb, fallback=SendDecision.from_fallback)


def _remembered(enum: ProtoEnum, value: EnumArg, field: str) -> int:
    if type(value) is str or type(value) is int:
        return _enum_number(enum, value, field)
    return enum_value(enum, value, field)


@functools.lru_cache(maxsize=256)
def _enum_number(enum: ProtoEnum, value: EnumArg, field: str) -> int:
    return enum_value(enum, value, field)


def check_send_batch(
    tenant_id: str,
    contact_ids: str | Iterable[str],
    kind: EnumArg,
    channel: EnumArg,
    dry_run: bool,
    request_id: str | None,
) -> BatchCall:
    ids = id_list(contact_ids, "contact_ids")
    request = message(
        quota_pb2.CheckSendBatchRequest,
        tenant_id=tenant_id,
        contact_ids=ids,
        channel=enum_value(quota_pb2.Channel, channel, "channel"),
        kind=enum_value(quota_pb2.MessageKind, kind, "kind"),
        dry_run=dry_run,
        request_id=_request_id(request_id, dry_run),
    )

    def fallback(decision: str, error: Unavailable) -> BatchDecision:
        return BatchDecision.from_fallback(decision, ids, error)

    return Call("CheckSendBatch", request, BatchDecision.from_pb, fallback=fallback)


def check_contact_add(
    tenant_id: str,
    contact_ids: str | Iterable[str],
    source: EnumArg,
    marketing: bool | None,
    dry_run: bool,
    request_id: str | None,
) -> Call[quota_pb2.CheckContactAddRequest, quota_pb2.CheckContactAddResponse, ContactAddDecision]:
    request = message(
        quota_pb2.CheckContactAddRequest,
        tenant_id=tenant_id,
        contact_ids=id_list(contact_ids, "contact_ids"),
        source=enum_value(quota_pb2.ContactSource, source, "source"),
        dry_run=dry_run,
        request_id=_request_id(request_id, dry_run),
    )
    if marketing is not None:
        request.marketing = marketing
    return Call("CheckContactAdd", request, ContactAddDecision.from_pb, fallback=ContactAddDecision.from_fallback)


def check_enroll(
    tenant_id: str, contact_id: str, automation_id: str
) -> Call[quota_pb2.CheckEnrollRequest, quota_pb2.CheckEnrollResponse, EnrollDecision]:
    request = message(
        quota_pb2.CheckEnrollRequest, tenant_id=tenant_id, contact_id=contact_id, automation_id=automation_id
    )
    return Call("CheckEnroll", request, EnrollDecision.from_pb, fallback=EnrollDecision.from_fallback)


def record_activity(
    tenant_id: str,
    contact_ids: str | Iterable[str],
    kind: EnumArg,
    occurred_at: TimestampArg | None,
    marketing: bool,
    source_type: str,
    source_id: str,
    request_id: str | None,
) -> Call[quota_pb2.RecordActivityRequest, quota_pb2.RecordActivityResponse, ActivityRecord]:
    request = message(
        quota_pb2.RecordActivityRequest,
        tenant_id=tenant_id,
        contact_ids=id_list(contact_ids, "contact_ids"),
        kind=enum_value(quota_pb2.ActivityKind, kind, "kind"),
        marketing=marketing,
        source_type=source_type,
        source_id=source_id,
        request_id=_request_id(request_id, False),
        **_stamp(occurred_at, "occurred_at"),
    )
    return Call("RecordActivity", request, ActivityRecord.from_pb)


def get_usage(
    tenant_id: str, cycle_start: TimestampArg | None
) -> Call[quota_pb2.GetUsageRequest, quota_pb2.GetUsageResponse, Usage]:
    request = message(quota_pb2.GetUsageRequest, tenant_id=tenant_id, **_stamp(cycle_start, "cycle_start"))
    return Call("GetUsage", request, lambda response: Usage.from_pb(response.usage))


def watch_request(tenant_id: str, after_sequence: int, follow: bool) -> quota_pb2.WatchUsageEventsRequest:
    return message(
        quota_pb2.WatchUsageEventsRequest, tenant_id=tenant_id, after_sequence=after_sequence, backlog_only=not follow
    )


def watch_ended(exc: BaseException, closed: bool) -> bool:
    """Whether a watch stream's failure ends the watch quietly, as it does once the client
    is closed; UNAVAILABLE is dialled again (False); any other failure raises, a gRPC one
    as the client's error."""
    if closed:
        return True
    if not isinstance(exc, grpc.RpcError):
        raise exc
    code, details = status_of(exc)
    if code is not grpc.StatusCode.UNAVAILABLE:
        raise error_from_status(code, details) from exc
    return False


def reconnect_pause(failures: int) -> float:
    """Seconds before dialling a watch stream again: 0.1 s doubling to 10 s."""
    return min(10.0, 0.1 * 2.0 ** max(0, failures - 1))


def put_plan(
    tenant_id: str, plan: Plan | quota_pb2.Plan
) -> Call[quota_pb2.PutPlanRequest, quota_pb2.PutPlanResponse, PlanChange]:
    wire_plan = plan if isinstance(plan, quota_pb2.Plan) else plan.to_pb()
    request = message(quota_pb2.PutPlanRequest, tenant_id=tenant_id, plan=wire_plan)
    return Call("PutPlan", request, PlanChange.from_pb, admin=True)


def get_plan(tenant_id: str) -> Call[quota_pb2.GetPlanRequest, quota_pb2.GetPlanResponse, Plan]:
    request = message(quota_pb2.GetPlanRequest, tenant_id=tenant_id)
    return Call("GetPlan", request, lambda response: Plan.from_pb(response.plan), admin=True)


def get_contact(
    tenant_id: str, contact_id: str
) -> Call[quota_pb2.GetContactRequest, quota_pb2.GetContactResponse, ContactState]:
    request = message(quota_pb2.GetContactRequest, tenant_id=tenant_id, contact_id=contact_id)
    return Call("GetContact", request, lambda response: ContactState.from_pb(response.contact), admin=True)


def list_active_contacts(
    tenant_id: str, cycle_start: TimestampArg | None, page_size: int, page_token: str
) -> Call[quota_pb2.ListActiveContactsRequest, quota_pb2.ListActiveContactsResponse, ActiveContactsPage]:
    request = message(
        quota_pb2.ListActiveContactsRequest,
        tenant_id=tenant_id,
        page_size=page_size,
        page_token=page_token,
        **_stamp(cycle_start, "cycle_start"),
    )
    return Call("ListActiveContacts", request, ActiveContactsPage.from_pb, admin=True)


def get_invoice(
    tenant_id: str, cycle_start: TimestampArg | None
) -> Call[quota_pb2.GetInvoiceRequest, quota_pb2.GetInvoiceResponse, Invoice]:
    request = message(quota_pb2.GetInvoiceRequest, tenant_id=tenant_id, **_stamp(cycle_start, "cycle_start"))
    return Call("GetInvoice", request, Invoice.from_pb, admin=True)


def status_of(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str | None]:
    """The status code and message of a failed call, from the sync or the aio stack.

    CANCELLED reads as UNAVAILABLE: this client never cancels a call it is waiting for, so
    the call was cancelled on the way, before any answer (a sidecar stopping cancels the
    calls it had not started), and is retried and falls back like any other unanswered call."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    if code is grpc.StatusCode.CANCELLED:
        return grpc.StatusCode.UNAVAILABLE, f"the call was cancelled before it was answered ({details})"
    return code, details
