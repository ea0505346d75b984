"""The processes a run starts: the real `quota-sidecar serve` and the no-op floor server.

Every process is started through `Processes`, which kills whatever is still
running when the run ends, however it ends. Their logs go to files in the run's
temporary folder and are quoted when a process fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from noop_server import METHOD

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc

BENCH = Path(__file__).resolve().parent
ADMIN_TOKEN = "bench-admin-token"
STOP_TIMEOUT = 120.0
# A channel that polls a starting server must retry within milliseconds, not the
# default backoff of a second and more, or the time to SERVING would be the backoff's.
FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 5),
    ("grpc.min_reconnect_backoff_ms", 5),
    ("grpc.max_reconnect_backoff_ms", 20),
)


class ProcessFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sidecar_command() -> str:
    """`quota-sidecar` of the interpreter running the bench (the project's venv)."""
    beside = Path(sys.executable).parent / "quota-sidecar"
    if beside.exists():
        return str(beside)
    raise ProcessFailed(f"no quota-sidecar beside {sys.executable}: install the project into that environment")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


FILTERS_POLL_S = 0.25


class Processes:
    """Starts child processes and kills those still running on close()."""

    def __init__(self, folder: Path, synchronous: str = "FULL") -> None:
        self.folder = folder
        self.synchronous = synchronous
        self._running: list[subprocess.Popen[bytes]] = []
        self._count = 0
        self.logs: list[Path] = []

    def spawn(self, args: list[str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        self._count += 1
        log = self.folder / f"{self._count:03d}-{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_")}
        with log.open("wb") as out:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        self._running.append(proc)
        self.logs.append(log)
        return proc, log

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        if proc in self._running:
            self._running.remove(proc)

    def close(self) -> None:
        for proc in self._running:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._running.clear()


def wait_serving(channel: grpc.Channel, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Polls the health service until it answers SERVING for the whole server."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ProcessFailed(f"exited with code {proc.returncode} before SERVING:\n{tail(log)}")
        try:
            answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise ProcessFailed(f"not SERVING after {timeout:.0f} s:\n{tail(log)}")
        time.sleep(0.002)


class SidecarProcess:
    """One `quota-sidecar serve` on free ports, over a SQLite ledger file (a Path) or the ledger a
    URL names (a str: `postgresql://...`)."""

    def __init__(
        self,
        processes: Processes,
        ledger: Path | str,
        *,
        serving_timeout: float = 3600.0,
        flags: Sequence[str] = (),
    ) -> None:
        self.processes = processes
        self.ledger = ledger
        self.flags = list(flags)
        self.serving_timeout = serving_timeout
        self.port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None
        self.spawned_at = 0.0
        self._channel: grpc.Channel | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {ADMIN_TOKEN}"),)

    def start(self) -> float:
        """Starts the process; returns the seconds from spawning it to health SERVING."""
        # The SQLite synchronous mode is the run's, and means nothing to another backend.
        on_sqlite = isinstance(self.ledger, Path)
        args = [
            sidecar_command(),
            "serve",
            "--address",
            self.address,
            "--ledger",
            str(self.ledger),
            "--admin-token",
            ADMIN_TOKEN,
            "--metrics-address",
            f"127.0.0.1:{self.metrics_port}",
            *(("--sqlite-synchronous", self.processes.synchronous) if on_sqlite else ()),
            *self.flags,
        ]
        self._channel = grpc.insecure_channel(self.address, options=FAST_RECONNECT)
        self.spawned_at = time.perf_counter()
        self.proc, self.log = self.processes.spawn(args, "sidecar")
        wait_serving(self._channel, self.proc, self.log, self.serving_timeout)
        return time.perf_counter() - self.spawned_at

    def wait_filters(self, contacts: int, timeout: float) -> float | None:
        """Seconds from spawning the process until its dedupe filters hold `contacts` contacts
        (`quota_dedupe_filter_items`), or None if they do not within `timeout` seconds. Polled
        every FILTERS_POLL_S: a scrape sums over every filter, which with 100,000 tenants
        takes a third of a second of the sidecar's time, so polling faster slows what it times."""
        deadline = time.monotonic() + timeout
        while True:
            if self.metrics().get("quota_dedupe_filter_items", 0.0) >= contacts:
                return time.perf_counter() - self.spawned_at
            if time.monotonic() > deadline:
                return None
            time.sleep(FILTERS_POLL_S)

    def wait_logged(self, text: str, timeout: float) -> bool:
        """Whether the process's log shows `text` within `timeout` seconds (polled every FILTERS_POLL_S)."""
        assert self.log is not None, "start() first"
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                return False
            time.sleep(FILTERS_POLL_S)
        return True

    def channel(self) -> grpc.Channel:
        assert self._channel is not None, "start() first"
        return self._channel

    def quota(self) -> pb_grpc.QuotaServiceStub:
        return pb_grpc.QuotaServiceStub(self.channel())

    def admin(self) -> pb_grpc.QuotaAdminServiceStub:
        return pb_grpc.QuotaAdminServiceStub(self.channel())

    def put_plan(self, tenant_id: str, plan: pb.Plan) -> None:
        self.admin().PutPlan(pb.PutPlanRequest(tenant_id=tenant_id, plan=plan), metadata=self.auth, timeout=60)

    def rss_bytes(self) -> int:
        """VmRSS of the sidecar process, from /proc/PID/status."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise ProcessFailed("no VmRSS in /proc/PID/status")

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of the sidecar's /metrics page."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.partition(" ")
                try:
                    samples[name] = float(value)
                except ValueError:
                    continue
        return samples

    def stop(self) -> None:
        """SIGTERM, then waits for the drain and the ledger's close; exit code 0 expected."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.processes.forget(proc)
                raise ProcessFailed(f"did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM") from None
        self.processes.forget(proc)
        if proc.returncode != 0:
            assert self.log is not None
            raise ProcessFailed(f"exited with code {proc.returncode} after SIGTERM:\n{tail(self.log)}")

    def __enter__(self) -> SidecarProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            self.stop()
        else:
            self.kill()

    def kill(self) -> None:
        """Ends the process at once (after a failure; `stop()` is the clean way)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.processes.forget(self.proc)
            self.proc = None


class NoopServerProcess:
    """bench/noop_server.py in its own process, on a free port."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> NoopServerProcess:
        self.proc, log = self.processes.spawn([sys.executable, str(BENCH / "noop_server.py"), str(self.port)], "noop")
        with grpc.insecure_channel(self.address, options=FAST_RECONNECT) as channel:
            ping = channel.unary_unary(METHOD)
            deadline = time.monotonic() + 60
            while True:
                if self.proc.poll() is not None:
                    raise ProcessFailed(f"the no-op server exited with code {self.proc.returncode}:\n{tail(log)}")
                try:
                    ping(b"", timeout=1)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise ProcessFailed(f"the no-op server did not answer:\n{tail(log)}") from None
                    time.sleep(0.01)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.processes.forget(self.proc)
            self.proc = None
