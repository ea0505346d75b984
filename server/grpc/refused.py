"""Counting the calls gRPC refuses before their handler runs.

A request over --max-message-bytes, or one beyond --max-pending-calls, is answered
RESOURCE_EXHAUSTED by gRPC itself: no handler runs, so the handlers' own counting
(`quota_calls_total`) never sees it. gRPC does run the server's interceptors first, when
the call arrives. `RefusedCalls` wraps each call's handler so that receiving the request
(or starting a streaming one) marks the call as reached; once gRPC is done with a call
and lets its handler go, a call never reached is reported, by method. A caller that
hangs up before its request arrived is reported so too: it never reached a handler
either.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import grpc


class _Arrival:
    """Lives exactly as long as gRPC keeps the call's handler (its wrappers hold it)."""

    __slots__ = ("__weakref__",)


class RefusedCalls(grpc.ServerInterceptor):
    def __init__(self, refused: Callable[[str], None]) -> None:
        self._refused = refused

    def _gone(self, reached: list[bool], method: str) -> None:
        if not reached[0]:
            self._refused(method)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        arrival, reached = _Arrival(), [False]
        weakref.finalize(arrival, self._gone, reached, method)
        parse = handler.request_deserializer

        def received(raw: bytes, _held: _Arrival = arrival) -> Any:
            reached[0] = True
            return parse(raw) if parse is not None else raw

        def started(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext, _held: _Arrival = arrival) -> Any:
                reached[0] = True
                return behavior(request, context)

            return run

        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(handler.unary_unary, received, serialize)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(handler.unary_stream, received, serialize)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(started(handler.stream_unary), parse, serialize)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(started(handler.stream_stream), parse, serialize)
