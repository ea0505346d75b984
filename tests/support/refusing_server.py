"""A real gRPC server that refuses every call, noting the deadline each attempt came with."""

from __future__ import annotations

import itertools
import threading
from concurrent import futures

import grpc

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.client import Retry


class RefusingServer:
    """A real gRPC server that answers every call UNAVAILABLE after REFUSAL_DELAY seconds. It
    notes each attempt as it arrives: the method, the request_id it carries (a retry repeats
    its call's) and the deadline it came with (`context.time_remaining()`)."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, str, float | None]] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self._server.add_generic_rpc_handlers([self])
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method.rsplit("/", 1)[-1]

        def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
            request_id = getattr(pb, method + "Request").FromString(request).request_id
            self.attempts.append((method, request_id, context.time_remaining()))
            threading.Event().wait(REFUSAL_DELAY)
            context.abort(grpc.StatusCode.UNAVAILABLE, "refused")

        return grpc.unary_unary_rpc_method_handler(refuse)

    def calls(self) -> dict[str, list[float | None]]:
        """The deadlines each logical call's attempts arrived with, in order, by request_id."""
        calls: dict[str, list[float | None]] = {}
        for _method, request_id, remaining in self.attempts:
            calls.setdefault(request_id, []).append(remaining)
        return calls

    def assert_each_call_kept_one_deadline(self, timeout: float) -> None:
        """Every attempt of a call fits what is left of that call's `timeout`: the first
        arrived with at most `timeout`, each later one with at most what the one before it
        had less the REFUSAL_DELAY that attempt spent; so no more attempts than fit."""
        assert self.attempts
        for request_id, deadlines in self.calls().items():
            assert request_id and None not in deadlines
            assert deadlines[0] <= timeout + DEADLINE_SLACK
            for before, after in itertools.pairwise(deadlines):
                assert after <= before - REFUSAL_DELAY + DEADLINE_SLACK, deadlines
            assert len(deadlines) <= 1 + int(timeout // REFUSAL_DELAY), deadlines

    def close(self) -> None:
        self._server.stop(0).wait()


# How long RefusingServer takes to refuse; a deadline as the server reads it may be later
# than the client's by the time the request took to arrive and by gRPC rounding it up.
REFUSAL_DELAY = 0.08
DEADLINE_SLACK = 0.03
# Retries that would each fit the whole timeout: only the call's one deadline stops them.
EAGER_RETRY = Retry(attempts=6, backoff=0.001, max_elapsed=5.0)
