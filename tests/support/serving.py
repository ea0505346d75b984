"""A real sidecar process: started as `quota-sidecar serve` on a free loopback port, and seen from
outside through its status on the standard gRPC health service."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(ledger_url: str, address: str, metrics_address: str, admin_token: str, *extra: str) -> subprocess.Popen[str]:
    """The real `quota-sidecar serve` of this installation, its output piped."""
    return subprocess.Popen(
        [
            str(BIN / "quota-sidecar"),
            "serve",
            "--address",
            address,
            "--ledger",
            ledger_url,
            "--metrics-address",
            metrics_address,
            "--admin-token",
            admin_token,
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def health_status(address: str, service: str = "") -> str:
    """SERVING, NOT_SERVING ... as the sidecar at `address` reports it for `service` (""
    the whole server: readiness), or UNREACHABLE (SERVICE_UNKNOWN: an unknown name)."""
    try:
        with grpc.insecure_channel(address) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    except grpc.RpcError as exc:
        return "SERVICE_UNKNOWN" if exc.code() is grpc.StatusCode.NOT_FOUND else "UNREACHABLE"


def wait_for_status(proc: subprocess.Popen[str], address: str, status: str, timeout: float = 30) -> None:
    """Until the sidecar `proc` at `address` reports `status`; fails if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stderr = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"sidecar exited {proc.returncode}: {stderr}")
        if health_status(address) == status:
            return
        time.sleep(0.02)
    raise AssertionError(f"sidecar {address} never reported {status}")
