"""Failing storage under the real `quota-sidecar serve`: a full filesystem, a ledger made
read-only, its files removed underneath.

api.md Errors: "The ledger cannot commit (disk full, read-only, database gone) —
UNAVAILABLE; the decision is not acknowledged and nothing is half-written." Each fault
is injected for real: a small tmpfs mounted for the test and filled, the immutable
attribute set on the ledger's files (which refuses writes even to the file descriptors
the sidecar already holds, even as root), the files or their directory deleted. After
each, the fault is cleared and the sidecar must recover by itself, and a restart must
find every acknowledged decision (SG-2, SG-8).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc

from support.process import Process, ledger_rows, put_plan, start

pytestmark = pytest.mark.process

CHECK = ("--ledger-check-interval", "0.05")


class HealthWatch:
    """Every status the health service streams to a watcher, in order."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.seen: list[str] = []
        self.changed = threading.Condition()
        self.stream = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest())
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for r in self.stream:
                with self.changed:
                    self.seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
                    self.changed.notify_all()
        except grpc.RpcError:
            pass

    def wait_for(self, status: str, after: int = 0, timeout: float = 20) -> int:
        """Waits until `status` is streamed at or after position `after`; returns its position."""
        with self.changed:
            found = self.changed.wait_for(lambda: status in self.seen[after:], timeout=timeout)
            assert found, f"health never streamed {status} after {self.seen[:after]}; saw {self.seen[after:]}"
            return self.seen.index(status, after)

    def close(self) -> None:
        self.stream.cancel()
        self.channel.close()


class Sender:
    """One mail worker: CheckSendBatch of new contacts, remembering what was acknowledged."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.QuotaServiceStub(self.channel)
        self.allowed: set[str] = set()
        self.refused: list[list[str]] = []
        self.n = 0

    def batch(self, size: int) -> grpc.StatusCode:
        ids = [f"c{self.n + i}" for i in range(size)]
        self.n += size
        try:
            r = self.stub.CheckSendBatch(
                pb.CheckSendBatchRequest(tenant_id="t", contact_ids=ids, channel=1, kind=1), timeout=10
            )
        except grpc.RpcError as exc:
            self.refused.append(ids)
            return exc.code()
        self.allowed |= {x.contact_id for x in r.results if x.decision == pb.DECISION_ALLOW}
        return grpc.StatusCode.OK

    def close(self) -> None:
        self.channel.close()


def assert_ledger_whole(ledger: Path, allowed: set[str], refused: list[list[str]]) -> None:
    """Every acknowledged ALLOW is in the ledger, every figure equals its rows, and a refused
    batch left no trace (nothing half-written)."""
    ids = ledger_rows(ledger).active_ids()
    assert allowed <= ids, f"acknowledged but lost: {sorted(allowed - ids)[:5]}"
    for batch in refused:
        written = ids & set(batch)
        assert not written or written == set(batch), f"a refused batch is half-written: {sorted(written)[:5]}"


def serve(ledger: Path, processes: list[Process]) -> Process:
    """The real sidecar on `ledger`, SERVING, with tenant t on a plan far from its limit."""
    p = start(ledger, *CHECK)
    processes.append(p)
    p.wait_serving()
    put_plan(p.address, 100_000)
    return p


def restart_and_check(p: Process, sender: Sender, processes: list[Process]) -> None:
    p.proc.send_signal(signal.SIGKILL)
    p.proc.wait()
    again = start(p.ledger, *CHECK)
    processes.append(again)
    again.wait_serving()
    assert_ledger_whole(p.ledger, sender.allowed, sender.refused)
    with grpc.insecure_channel(again.address) as ch:
        usage = pb_grpc.QuotaServiceStub(ch).GetUsage(pb.GetUsageRequest(tenant_id="t"), timeout=5).usage
    assert usage.active_contacts == len(ledger_rows(p.ledger).active_ids())


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs mounted for the test (the CI machine runs the suite as root)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_filesystem_is_unavailable_not_serving_then_recovers_by_itself(
    small_fs: Path, processes: list[Process]
) -> None:
    """api.md Errors (disk full), SG-2, SG-8: on a full filesystem a batch gets UNAVAILABLE and
    leaves no trace, health streams NOT_SERVING; once space is freed the sidecar takes writes
    again without a restart, and nothing acknowledged is lost across a kill -9."""
    p = serve(small_fs / "ledger.db", processes)
    watch = HealthWatch(p.address)
    sender = Sender(p.address)
    try:
        watch.wait_for("SERVING")
        assert sender.batch(100) == grpc.StatusCode.OK
        filler = small_fs / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        codes = [sender.batch(2000) for _ in range(3)]
        assert codes == [grpc.StatusCode.UNAVAILABLE] * 3
        down = watch.wait_for("NOT_SERVING")
        assert_ledger_whole(p.ledger, sender.allowed, sender.refused)

        filler.unlink()
        watch.wait_for("SERVING", after=down)
        assert sender.batch(2000) == grpc.StatusCode.OK
        assert p.health() == "SERVING"
    finally:
        watch.close()
        sender.close()
    restart_and_check(p, sender, processes)


def test_read_only_ledger_is_unavailable_not_serving_then_recovers_by_itself(
    tmp_path: Path, processes: list[Process]
) -> None:
    """api.md Errors (read-only), SG-2, SG-8: with the ledger's files made immutable, calls that
    write get UNAVAILABLE and health says NOT_SERVING until the files are writable again; then
    the sidecar takes writes by itself and a kill -9 loses nothing acknowledged. Issue 17
    item 3: meanwhile readiness ("", "readiness", each service) is NOT_SERVING and liveness
    stays SERVING, so a liveness probe never restarts a sidecar that recovers by itself."""
    ledger = tmp_path / "ledger.db"
    p = serve(ledger, processes)
    sender = Sender(p.address)
    files = [str(ledger), f"{ledger}-wal"]
    try:
        assert sender.batch(50) == grpc.StatusCode.OK
        subprocess.run(["chattr", "+i", *files], check=True)
        try:
            assert sender.batch(50) == grpc.StatusCode.UNAVAILABLE
            assert p.health() == "NOT_SERVING"
            assert sender.batch(1) == grpc.StatusCode.UNAVAILABLE
            readiness = ("", "readiness", "quota.v1.QuotaService", "quota.v1.QuotaAdminService")
            assert {name: p.health(name) for name in (*readiness, "liveness")} == {
                **dict.fromkeys(readiness, "NOT_SERVING"),
                "liveness": "SERVING",
            }
            with grpc.insecure_channel(p.address) as ch:
                usage = pb_grpc.QuotaServiceStub(ch).GetUsage(pb.GetUsageRequest(tenant_id="t"), timeout=5).usage
            assert usage.active_contacts == len(sender.allowed)
        finally:
            subprocess.run(["chattr", "-i", *files], check=True)
        p.wait_serving()
        assert sender.batch(50) == grpc.StatusCode.OK
        assert (p.health("readiness"), p.health("liveness")) == ("SERVING", "SERVING")
    finally:
        sender.close()
    restart_and_check(p, sender, processes)


def test_ledger_files_removed_underneath_are_written_back_and_nothing_is_lost(
    tmp_path: Path, processes: list[Process]
) -> None:
    """Domain 'an acknowledged ALLOW is durable', SG-8: the ledger, its WAL and shared-memory
    files deleted while the sidecar runs are written back whole from the files it still holds
    before any later decision is acknowledged, so a kill -9 right after loses nothing, from
    before the removal or after it."""
    ledger = tmp_path / "ledger.db"
    p = serve(ledger, processes)
    sender = Sender(p.address)
    try:
        assert sender.batch(300) == grpc.StatusCode.OK
        for suffix in ("", "-wal", "-shm"):
            Path(f"{ledger}{suffix}").unlink()
        assert sender.batch(300) == grpc.StatusCode.OK
        assert ledger.exists()
        assert p.health() == "SERVING"
    finally:
        sender.close()
    restart_and_check(p, sender, processes)
    assert len(sender.allowed) == 600


def test_ledger_directory_removed_is_unavailable_until_it_is_back(tmp_path: Path, processes: list[Process]) -> None:
    """api.md Errors (database gone), SG-8: with the ledger's directory deleted the ledger cannot
    be written back: writes get UNAVAILABLE and health NOT_SERVING; once the directory exists
    again the sidecar writes the ledger back by itself, SERVING again, nothing acknowledged lost."""
    home = tmp_path / "state"
    ledger = home / "ledger.db"
    p = serve(ledger, processes)
    watch = HealthWatch(p.address)
    sender = Sender(p.address)
    try:
        watch.wait_for("SERVING")
        assert sender.batch(200) == grpc.StatusCode.OK
        shutil.rmtree(home)
        down = watch.wait_for("NOT_SERVING")
        assert sender.batch(10) == grpc.StatusCode.UNAVAILABLE
        home.mkdir()
        watch.wait_for("SERVING", after=down)
        assert ledger.exists()
        assert sender.batch(200) == grpc.StatusCode.OK
    finally:
        watch.close()
        sender.close()
    restart_and_check(p, sender, processes)
