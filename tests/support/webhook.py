"""A real HTTP webhook receiver, and the gRPC calls that make a tenant cross a threshold."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.domain.clock import MICROS, to_us

from support.engine import ANCHOR
from support.process import AUTH


def grpc_plan(limit: int) -> dict[str, object]:
    return dict(
        plan_name="P",
        metering=pb.METERING_CYCLE_ACTIVE,
        enforcement=pb.ENFORCEMENT_HARD,
        contact_limit=limit,
        counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
        notify_thresholds=[0.8, 1.0],
        cycle_anchor=to_pb_ts(to_us(ANCHOR)),
    )


Answer = int | Callable[[BaseHTTPRequestHandler], None]


class Receiver:
    """A real HTTP server that records each POST and answers with the next queued answer:
    a status, or a function writing the answer itself (recorded before it runs, as it may
    never finish). Every request's method and path is kept in `requests`; a GET is
    answered 200."""

    def __init__(self, answers: list[Answer] | None = None) -> None:
        self.answers = list(answers or [])
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.requests: list[tuple[str, str]] = []
        self.arrived = threading.Condition()
        self.closing = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                answer = receiver.answers.pop(0) if receiver.answers else 204
                if callable(answer):
                    receiver.record(self, body)
                    answer(self)
                    return
                self.send_response(answer)
                self.end_headers()
                receiver.record(self, body)

            def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
                self.send_response(200)
                self.end_headers()
                receiver.record(self, b"")

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def record(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        with self.arrived:
            self.requests.append((request.command, request.path))
            if request.command == "POST":
                self.received.append((dict(request.headers), body))
            self.arrived.notify_all()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/quota-events"

    def wait_for(self, count: int, timeout: float = 20) -> list[tuple[dict[str, str], bytes]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.received) >= count, timeout), (
                f"the webhook received {len(self.received)} posts, expected {count}"
            )
            return list(self.received)

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


def cross_80_percent(address: str, tenant: str) -> None:
    """Puts a 10-contact plan on `tenant` and sends to 8 contacts over gRPC: one crossing (CR-8)."""
    with grpc.insecure_channel(address) as channel:
        admin = pb_grpc.QuotaAdminServiceStub(channel)
        quota = pb_grpc.QuotaServiceStub(channel)
        admin.PutPlan(pb.PutPlanRequest(tenant_id=tenant, plan=pb.Plan(**grpc_plan(10))), metadata=AUTH, timeout=10)
        for i in range(8):
            request = pb.CheckSendRequest(
                tenant_id=tenant, contact_id=f"c{i}", channel=pb.CHANNEL_EMAIL, kind=pb.MESSAGE_KIND_CAMPAIGN
            )
            assert quota.CheckSend(request, timeout=10).decision == pb.DECISION_ALLOW


def to_pb_ts(us: int) -> Timestamp:
    return Timestamp(seconds=us // MICROS)
