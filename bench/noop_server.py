"""The gRPC floor: a no-op unary RPC served by the sidecar's own server stack.

    python bench/noop_server.py PORT

The server is built as `Sidecar.bind` builds the sidecar's (server/app.py):
`grpc.server` over a `futures.ThreadPoolExecutor` with the settings' default
`max_workers`, the same channel options, an insecure port on 127.0.0.1. The one
method takes a few bytes and answers two, with no (de)serializer, through a generic
handler. It runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent import futures

import grpc

from quota_sidecar.server.settings import Settings

SERVICE = "quota.bench.v1.Floor"
METHOD = f"/{SERVICE}/Noop"
RESPONSE = b"\x08\x01"


def _noop(request: bytes, context: grpc.ServicerContext) -> bytes:
    return RESPONSE


def serve(port: int) -> None:
    settings = Settings()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", max(settings.max_message_bytes, 64 * 1024 * 1024)),
            ("grpc.so_reuseport", 0),
        ],
    )
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Noop": grpc.unary_unary_rpc_method_handler(_noop)})
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"noop_server: cannot listen on 127.0.0.1:{port}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    while not stop.wait(1):
        pass
    server.stop(1).wait()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
