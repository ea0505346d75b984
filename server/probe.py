"""The health probe: one call to the standard gRPC health service of a running sidecar.

It owns the client side of `grpc.health.v1.Health/Check` as used by container
HEALTHCHECKs, Kubernetes exec probes and `quota-sidecar health`: turning the
sidecar's listen address into one a client can connect to, asking for the
status of the whole server (or one named service) and mapping the answer to a
single status name and an exit code. It does not serve health; the server does.

Run as `python -m quota_sidecar.server.probe [--address A] [--timeout S] [--service N]`
(with `--tls-ca` and, for mutual TLS, `--tls-cert`/`--tls-key` when the port speaks
TLS); it prints one line and exits 0 only when the answer is SERVING.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quota_sidecar.api.credentials import TLS_FLAGS, tls_credentials

DEFAULT_ADDRESS = "127.0.0.1:50051"
ADDRESS_ENV = "QUOTA_ADDRESS"
DEFAULT_TIMEOUT = 2.0

SERVING = "SERVING"
UNREACHABLE = "UNREACHABLE"
SERVICE_UNKNOWN = "SERVICE_UNKNOWN"

# Hosts a server binds to ("every interface") that a client cannot connect to,
# and the loopback name to probe instead.
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "[::]": "localhost"}

# A probe talks to its own container or pod; an HTTP(S)_PROXY set for the
# service's outbound traffic must not reroute it.
_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


def connectable_address(address: str) -> str:
    """Returns `address` with a wildcard bind host (0.0.0.0, [::], empty) replaced by loopback.

    Addresses with a scheme (`unix:///path.sock`, `dns:///host:port`, ...) are returned unchanged.
    """
    if ":/" in address or address.startswith(("unix:", "unix-abstract:", "ipv4:", "ipv6:", "dns:")):
        return address
    host, sep, port = address.rpartition(":")
    if not sep:
        return address
    if host in _WILDCARD_HOSTS:
        return f"{_WILDCARD_HOSTS[host]}:{port}"
    return address


def check(
    address: str,
    timeout: float = DEFAULT_TIMEOUT,
    service: str = "",
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> str:
    """Asks the health service at `address` for the status of `service` ("" = the whole server).

    Returns the status name the server answered ("SERVING", "NOT_SERVING",
    "UNKNOWN"), "SERVICE_UNKNOWN" when the server does not know `service`, or
    "UNREACHABLE" when no health service answered within `timeout` seconds.
    """
    target = connectable_address(address)
    if credentials is None:
        channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
    else:
        options = [*_CHANNEL_OPTIONS, *([("grpc.ssl_target_name_override", server_name)] if server_name else [])]
        channel = grpc.secure_channel(target, credentials, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            # typeshed's HealthStub leaves out the generated Check (grpc_health-stubs 1.0.0.20261021).
            response: health_pb2.HealthCheckResponse = stub.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return SERVICE_UNKNOWN
            return UNREACHABLE
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _positive_seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Probes once, prints `<STATUS> <address>` and returns 0 when SERVING, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="quota-sidecar health",
        description="Check a running quota-sidecar through the standard gRPC health service.",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS,
        help=f"host:port or unix:///path.sock (default: ${ADDRESS_ENV}, else {DEFAULT_ADDRESS}); "
        "a 0.0.0.0 or [::] host is probed on loopback",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for the answer (default: {DEFAULT_TIMEOUT})",
    )
    parser.add_argument(
        "--service",
        default="",
        help='the service whose status to ask for (default: "", the whole server)',
    )
    for flag, env, what in (
        *TLS_FLAGS,
        (
            "--tls-server-name",
            "QUOTA_TLS_SERVER_NAME",
            "the name the server's certificate carries, when not the address's host",
        ),
    ):
        parser.add_argument(flag, default=os.environ.get(env) or None, help=f"{what} (default: ${env})")
    args = parser.parse_args(argv)
    try:
        credentials = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    status = check(
        args.address,
        timeout=args.timeout,
        service=args.service,
        credentials=credentials,
        server_name=args.tls_server_name,
    )
    print(f"{status} {connectable_address(args.address)}")
    return 0 if status == SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
