"""A real gRPC server in front of the sidecar that records, holds and loses answers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from quota_sidecar.api.v1 import quota_pb2

TIMEOUT = 5.0
# Longer than any test runs.
NEVER = 600.0


class Proxy:
    """Records every call (method and request, in arrival order) and forwards it with its
    authorization. While `holding`, a call waits for release() before it is forwarded.
    The first `lose` answers to `lose_method` are thrown away after the sidecar gave them
    and replaced by UNAVAILABLE, as when a connection drops after the sidecar committed."""

    def __init__(self, upstream: str, *, holding: bool = False, lose_method: str = "", lose: int = 0) -> None:
        self.calls: list[tuple[str, Any]] = []
        self._changed = threading.Condition()
        self._released = threading.Event()
        if not holding:
            self._released.set()
        self._lose_method = lose_method
        self._lose = lose
        self._upstream = grpc.insecure_channel(upstream)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        self._server.add_generic_rpc_handlers([self])
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method.rsplit("/", 1)[-1]
        forward = self._upstream.unary_unary(details.method)
        metadata = [(k, v) for k, v in details.invocation_metadata if k == "authorization"]

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            message = getattr(quota_pb2, method + "Request", None)
            with self._changed:
                self.calls.append((method, message.FromString(request) if message else request))
                lost = method == self._lose_method and self._lose > 0
                self._lose -= lost
                self._changed.notify_all()
            self._released.wait(NEVER)
            try:
                answer = forward(request, metadata=metadata, timeout=TIMEOUT)
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details())
            if lost:
                context.abort(grpc.StatusCode.UNAVAILABLE, "proxy lost the answer")
            return answer

        return grpc.unary_unary_rpc_method_handler(handle)

    def sent(self, method: str) -> list[Any]:
        """The requests of `method` forwarded so far, in arrival order."""
        with self._changed:
            return [request for name, request in self.calls if name == method]

    def wait_for(self, what: str, done: Callable[[Proxy], bool]) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: done(self), TIMEOUT * 2), f"the proxy never saw {what}"

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._released.set()
        self._server.stop(0).wait()
        self._upstream.close()
