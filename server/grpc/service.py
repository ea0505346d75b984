"""The gRPC servicers: convert messages to plain values, call the engine, map errors.

Every failure is mapped to a status code here and only here (`STATUS_OF`); no
stack trace reaches a client. INVALID_ARGUMENT carries a google.rpc.BadRequest
detail naming the field.
"""

from __future__ import annotations

import functools
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc

from ..domain.clock import MICROS
from ..domain.errors import (
    DeadlineExceeded,
    InvalidArgument,
    LedgerUnavailable,
    NotFound,
    PermissionDenied,
    QuotaError,
    Unauthenticated,
)
from ..domain.model import (
    Activation,
    ActivityKind,
    BatchOutcome,
    Channel,
    ContactSource,
    ContactState,
    Invoice,
    MessageKind,
    SendDecision,
)
from ..engine import ActivityRequest, BatchRequest, ContactAddRequest, Engine, SendRequest
from ..engine.deadline import serving_until
from ..metrics.prometheus import Metrics
from ..outbox.delivery import EventFeed
from .convert import (
    MAX_TIMESTAMP_S,
    MIN_TIMESTAMP_S,
    duration_pb,
    enum_of,
    instant_of,
    plan_input,
    plan_pb,
    timestamp_pb,
    usage_event_pb,
    usage_pb,
)

log = logging.getLogger("quota_sidecar.service")
WATCH_READ_AHEAD = 100
WATCH_POLL_S = 1.0

STATUS_OF: dict[type[QuotaError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    LedgerUnavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# The cycle containing a requested instant, and the months beside it that cycle
# arithmetic reads, must fall within years 1..9999.
CYCLE_MARGIN_S = 62 * 86_400
# Event sequences are signed 64-bit integers on every backend; none comes after this one.
MAX_SEQUENCE = 2**63 - 1


def _cycle_instant(field: str, message: Any, name: str) -> int | None:
    """An instant that selects a billing cycle (`cycle_start` of a request)."""
    at = instant_of(field, message, name)
    if at is not None and not (
        (MIN_TIMESTAMP_S + CYCLE_MARGIN_S) * MICROS <= at <= (MAX_TIMESTAMP_S - CYCLE_MARGIN_S) * MICROS
    ):
        raise InvalidArgument(field, "is too close to year 1 or year 9999 to select a billing cycle")
    return at


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes do not parse as its message (invalid UTF-8 in a string, a
    broken wire format): handed to the servicer so it is refused as bad input, where
    gRPC's own deserializer would answer INTERNAL."""

    message: str
    problem: str

    def refuse(self) -> InvalidArgument:
        return InvalidArgument("request", f"is not a valid {self.message}: {self.problem}")


def _parser(message: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def parse(data: bytes) -> Message | Undecodable:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return Undecodable(message.DESCRIPTOR.full_name, str(exc) or "the bytes do not parse")

    return parse


def register(server: grpc.Server, service: str, servicer: object) -> None:
    """Serves `servicer` as the quota.v1 service named `service`, as the generated
    add_*_to_server would, except that requests that do not parse reach the servicer
    as `Undecodable`."""
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_parser(request),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)


def _decision_fields(d: SendDecision) -> dict[str, Any]:
    return {"decision": d.decision.value, "reason": d.reason.value, "newly_active": d.newly_active}


def _abort(context: grpc.ServicerContext, exc: QuotaError) -> None:
    code = STATUS_OF[type(exc)]
    if isinstance(exc, InvalidArgument):
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.problem)]
            )
        )
        status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(exc), details=[detail])
        context.abort_with_status(rpc_status.to_status(status))
    context.abort(code, str(exc))


def _code_name(exc: Exception) -> str:
    return STATUS_OF[type(exc)].name if isinstance(exc, QuotaError) else "INTERNAL"


def _answer_failure(context: grpc.ServicerContext, method: str, exc: Exception) -> None:
    """Ends the call with the status code of a failure; anything unexpected is logged
    here and reaches the client as INTERNAL without a stack trace."""
    if isinstance(exc, QuotaError):
        _abort(context, exc)
    log.exception("%s failed", method)
    context.abort(grpc.StatusCode.INTERNAL, "internal error; see the sidecar's log")


def _handled(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Checks access, times the call, counts it by status code and maps failures to status
    codes. A call whose deadline passed before its work ran is not worked on
    (server/engine/deadline.py)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def handler(self: _Servicer, request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "OK"
            self.metrics.call_started()
            try:
                self.authorize(context)
                if isinstance(request, Undecodable):
                    raise request.refuse()
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("the deadline passed while the call waited for a worker; nothing was done")
                with serving_until(remaining):
                    return fn(self, request, context)
            except Exception as exc:
                code = _code_name(exc)
                _answer_failure(context, method, exc)
            finally:
                self.metrics.call_ended()
                self.metrics.call_done(method, code, time.perf_counter() - started)

        return handler

    return wrap


class _Servicer:
    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics

    def authorize(self, context: grpc.ServicerContext) -> None:
        """Refuses a caller without access; checked before anything else of a call."""


class QuotaService(_Servicer, pb_grpc.QuotaServiceServicer):
    def __init__(self, engine: Engine, metrics: Metrics, feed: EventFeed, *, max_watchers: int = 8) -> None:
        super().__init__(engine, metrics)
        self.feed = feed
        self._watchers = threading.BoundedSemaphore(max_watchers)
        self.large_calls = threading.Lock()

    @contextmanager
    def _large_in_turn(self, contacts: int, context: grpc.ServicerContext) -> Iterator[None]:
        """Lets one large call (more contacts than a unit of the engine) work at a time.
        Its Python work (deciding, building a response of thousands of results) holds the
        interpreter lock in turns of the switch interval; several at once made every small
        call wait for a turn behind each of them. The others wait here without the lock,
        and give up with DEADLINE_EXCEEDED, nothing done, when their deadline passes."""
        if contacts <= self.engine.unit_contacts:
            yield
            return
        remaining = context.time_remaining()
        if not self.large_calls.acquire(timeout=-1 if remaining is None else max(remaining, 0.0)):
            raise DeadlineExceeded("the deadline passed while the call waited for the large calls before it")
        try:
            yield
        finally:
            self.large_calls.release()

    @_handled("CheckSend")
    def CheckSend(self, request: pb.CheckSendRequest, context: grpc.ServicerContext) -> pb.CheckSendResponse:
        req = SendRequest(
            tenant_id=request.tenant_id,
            contact_id=request.contact_id,
            channel=enum_of("channel", request.channel, Channel, required=False),
            kind=enum_of("kind", request.kind, MessageKind, required=False),
            queued_since_us=instant_of("queued_since", request, "queued_since"),
            dry_run=request.dry_run,
            request_id=request.request_id,
        )
        outcome = self.engine.check_send(req)
        d = outcome.decision
        self.metrics.decided("CheckSend", d.decision.name, d.reason.name)
        response = pb.CheckSendResponse(**_decision_fields(d), usage=usage_pb(outcome.usage))
        if d.retry_after_us:
            response.retry_after.CopyFrom(duration_pb(d.retry_after_us))
        return response

    @_handled("CheckSendBatch")
    def CheckSendBatch(
        self, request: pb.CheckSendBatchRequest, context: grpc.ServicerContext
    ) -> pb.CheckSendBatchResponse:
        req = BatchRequest(
            tenant_id=request.tenant_id,
            channel=enum_of("channel", request.channel, Channel, required=False),
            kind=enum_of("kind", request.kind, MessageKind, required=False),
            contact_ids=list(request.contact_ids),
            dry_run=request.dry_run,
            request_id=request.request_id,
        )
        with self._large_in_turn(len(req.contact_ids), context):
            return self._batch_response(self.engine.check_send_batch(req))

    def _batch_response(self, outcome: BatchOutcome) -> pb.CheckSendBatchResponse:
        response = pb.CheckSendBatchResponse(
            allowed=outcome.allowed,
            denied=outcome.denied,
            newly_active=outcome.newly_active,
            usage=usage_pb(outcome.usage),
        )
        templates: dict[int, list[Any]] = {}
        add = response.results.add
        for contact_id, d in outcome.results:
            found = templates.get(id(d))
            if found is None:
                found = templates[id(d)] = [pb.CheckSendResult(**_decision_fields(d)), d, 0]
            found[2] += 1
            result = add()
            result.CopyFrom(found[0])
            result.contact_id = contact_id
        for _, d, n in templates.values():
            self.metrics.decided("CheckSendBatch", d.decision.name, d.reason.name, n)
        return response

    @_handled("CheckContactAdd")
    def CheckContactAdd(
        self, request: pb.CheckContactAddRequest, context: grpc.ServicerContext
    ) -> pb.CheckContactAddResponse:
        req = ContactAddRequest(
            tenant_id=request.tenant_id,
            source=enum_of("source", request.source, ContactSource, required=False),
            contact_ids=list(request.contact_ids),
            dry_run=request.dry_run,
            marketing=request.marketing if request.HasField("marketing") else None,
            request_id=request.request_id,
        )
        outcome = self.engine.check_contact_add(req)
        self.metrics.decided("CheckContactAdd", outcome.decision.name, outcome.reason.name)
        return pb.CheckContactAddResponse(
            decision=pb.Decision.ValueType(outcome.decision),
            reason=pb.Reason.ValueType(outcome.reason),
            added=outcome.added,
            usage=usage_pb(outcome.usage),
        )

    @_handled("CheckEnroll")
    def CheckEnroll(self, request: pb.CheckEnrollRequest, context: grpc.ServicerContext) -> pb.CheckEnrollResponse:
        outcome = self.engine.check_enroll(request.tenant_id, request.contact_id, request.automation_id)
        self.metrics.decided("CheckEnroll", outcome.decision.name, outcome.reason.name)
        return pb.CheckEnrollResponse(
            decision=pb.Decision.ValueType(outcome.decision),
            reason=pb.Reason.ValueType(outcome.reason),
            usage=usage_pb(outcome.usage),
        )

    @_handled("RecordActivity")
    def RecordActivity(
        self, request: pb.RecordActivityRequest, context: grpc.ServicerContext
    ) -> pb.RecordActivityResponse:
        req = ActivityRequest(
            tenant_id=request.tenant_id,
            kind=enum_of("kind", request.kind, ActivityKind, required=False),
            contact_ids=list(request.contact_ids),
            occurred_at_us=instant_of("occurred_at", request, "occurred_at"),
            marketing=request.marketing,
            source_type=request.source_type,
            source_id=request.source_id,
            request_id=request.request_id,
        )
        with self._large_in_turn(len(req.contact_ids), context):
            outcome = self.engine.record_activity(req)
        return pb.RecordActivityResponse(
            recorded=outcome.recorded, newly_active=outcome.newly_active, usage=usage_pb(outcome.usage)
        )

    @_handled("GetUsage")
    def GetUsage(self, request: pb.GetUsageRequest, context: grpc.ServicerContext) -> pb.GetUsageResponse:
        at = _cycle_instant("cycle_start", request, "cycle_start")
        return pb.GetUsageResponse(usage=usage_pb(self.engine.get_usage(request.tenant_id, at)))

    def WatchUsageEvents(
        self, request: pb.WatchUsageEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchUsageEventsResponse]:
        """Streams the outbox from `after_sequence`, then waits for commits that add
        events: woken at once by this sidecar's commits, and reading the ledger again at
        least every WATCH_POLL_S for those of other sidecars sharing it. Each stream holds
        a server thread, so at most `max_watchers` run at once; one more gets
        RESOURCE_EXHAUSTED."""
        code = "OK"
        if not self._watchers.acquire(blocking=False):
            self.metrics.calls.labels("WatchUsageEvents", "RESOURCE_EXHAUSTED").inc()
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many WatchUsageEvents streams; retry later")
        try:
            if isinstance(request, Undecodable):
                raise request.refuse()
            seen = min(request.after_sequence, MAX_SEQUENCE)
            while context.is_active() and not self.feed.closed:
                events = self.engine.usage_events(request.tenant_id, seen, WATCH_READ_AHEAD)
                for event in events:
                    yield pb.WatchUsageEventsResponse(event=usage_event_pb(event))
                    seen = event.sequence
                if not events:
                    if request.backlog_only:
                        break
                    self.feed.wait(seen, timeout=WATCH_POLL_S)
        except Exception as exc:
            code = _code_name(exc)
            _answer_failure(context, "WatchUsageEvents", exc)
        finally:
            self._watchers.release()
            self.metrics.calls.labels("WatchUsageEvents", code).inc()


class QuotaAdminService(_Servicer, pb_grpc.QuotaAdminServiceServicer):
    """The control plane; every call needs `authorization: Bearer <admin token>`."""

    def __init__(self, engine: Engine, metrics: Metrics, admin_token: str | None) -> None:
        super().__init__(engine, metrics)
        self._expected = admin_token.encode() if admin_token else None

    def authorize(self, context: grpc.ServicerContext) -> None:
        if self._expected is None:
            raise PermissionDenied("admin RPCs are disabled: the sidecar was started without --admin-token")
        given = next((v for k, v in context.invocation_metadata() if k == "authorization"), None)
        if given is None:
            raise Unauthenticated("admin RPCs need metadata 'authorization: Bearer <token>'")
        raw = given.encode() if isinstance(given, str) else given
        # The scheme name is case-insensitive (RFC 9110 section 11.1, RFC 6750 section 2.1);
        # the token itself is compared byte for byte, in constant time.
        scheme, _, token = raw.partition(b" ")
        if not hmac.compare_digest(token, self._expected) or scheme.lower() != b"bearer":
            raise PermissionDenied("the admin token is not valid")

    @_handled("PutPlan")
    def PutPlan(self, request: pb.PutPlanRequest, context: grpc.ServicerContext) -> pb.PutPlanResponse:
        if not request.HasField("plan"):
            raise InvalidArgument("plan", "is required")
        plan, usage = self.engine.put_plan(request.tenant_id, plan_input(request.plan))
        return pb.PutPlanResponse(plan=plan_pb(plan), usage=usage_pb(usage))

    @_handled("GetPlan")
    def GetPlan(self, request: pb.GetPlanRequest, context: grpc.ServicerContext) -> pb.GetPlanResponse:
        return pb.GetPlanResponse(plan=plan_pb(self.engine.get_plan(request.tenant_id)))

    @_handled("GetContact")
    def GetContact(self, request: pb.GetContactRequest, context: grpc.ServicerContext) -> pb.GetContactResponse:
        c: ContactState = self.engine.get_contact(request.tenant_id, request.contact_id)
        state = pb.ContactState(
            tenant_id=c.tenant_id,
            contact_id=c.contact_id,
            held=c.held,
            active_this_cycle=c.active_this_cycle,
            marketing=c.marketing,
            marketing_until_next_update=c.marketing_until_next_update,
            marketing_source_type=c.marketing_source_type,
            marketing_source_id=c.marketing_source_id,
        )
        if c.active_this_cycle:
            state.activated_at.CopyFrom(timestamp_pb(c.activated_at_us))
        return pb.GetContactResponse(contact=state)

    @_handled("ListActiveContacts")
    def ListActiveContacts(
        self, request: pb.ListActiveContactsRequest, context: grpc.ServicerContext
    ) -> pb.ListActiveContactsResponse:
        at = _cycle_instant("cycle_start", request, "cycle_start")
        rows, token = self.engine.list_active_contacts(request.tenant_id, at, request.page_size, request.page_token)
        return pb.ListActiveContactsResponse(contacts=[_active_pb(a) for a in rows], next_page_token=token)

    @_handled("GetInvoice")
    def GetInvoice(self, request: pb.GetInvoiceRequest, context: grpc.ServicerContext) -> pb.GetInvoiceResponse:
        at = _cycle_instant("cycle_start", request, "cycle_start")
        invoice: Invoice = self.engine.get_invoice(request.tenant_id, at)
        return pb.GetInvoiceResponse(
            usage=usage_pb(invoice.usage),
            lines=[
                pb.InvoiceLine(
                    description=line.description,
                    quantity=line.quantity,
                    unit_price=line.unit_price,
                    amount=line.amount,
                    currency=line.currency,
                )
                for line in invoice.lines
            ],
        )


def _active_pb(a: Activation) -> pb.ActiveContact:
    contact = pb.ActiveContact(
        contact_id=a.contact_id, activated_at=timestamp_pb(a.activated_at_us), activity=a.activity
    )
    if a.counted_until_us:
        contact.counted_until.CopyFrom(timestamp_pb(a.counted_until_us))
    return contact
