"""A first look at the sidecar's cost: CheckSend round trips and CheckSendBatch rate.

Starts a real sidecar (SQLite ledger in a temporary folder, synchronous=FULL)
on a free port in this process and calls it over a real channel:

    python bench/roundtrip.py [--calls 2000] [--batch 1000] [--batches 20]

Prints p50/p99 of CheckSend for new and for already-active contacts (one
caller) and CheckSendBatch decisions per second for new and active contacts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from quota_sidecar.client.v1 import quota_pb2 as pb
from quota_sidecar.client.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.app import Sidecar
from quota_sidecar.server.settings import Settings


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(
            address="127.0.0.1:0", ledger=str(Path(folder) / "bench.db"), metrics_address="", admin_token="bench"
        ).validate()
        sidecar = Sidecar(settings, registry=CollectorRegistry())
        sidecar.start()
        try:
            with grpc.insecure_channel(sidecar.address) as channel:
                admin = pb_grpc.QuotaAdminServiceStub(channel)
                quota = pb_grpc.QuotaServiceStub(channel)
                admin.PutPlan(
                    pb.PutPlanRequest(
                        tenant_id="bench",
                        plan=pb.Plan(
                            plan_name="bench",
                            metering=pb.METERING_CYCLE_ACTIVE,
                            enforcement=pb.ENFORCEMENT_HARD,
                            contact_limit=100_000_000,
                            counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
                        ),
                    ),
                    metadata=(("authorization", "Bearer bench"),),
                )
                rows = []
                for label in ("new", "active"):
                    samples = []
                    for i in range(args.calls):
                        request = pb.CheckSendRequest(tenant_id="bench", contact_id=f"c{i}", channel=1, kind=1)
                        started = time.perf_counter()
                        quota.CheckSend(request, timeout=5)
                        samples.append(time.perf_counter() - started)
                    rows.append(
                        (
                            f"CheckSend {label} contact",
                            percentile(samples, 0.5) * 1e3,
                            percentile(samples, 0.99) * 1e3,
                            len(samples) / sum(samples),
                        )
                    )
                for label in ("new", "active"):
                    elapsed = []
                    for b in range(args.batches):
                        ids = [f"b{b}-{i}" for i in range(args.batch)]
                        request = pb.CheckSendBatchRequest(tenant_id="bench", channel=1, kind=1, contact_ids=ids)
                        started = time.perf_counter()
                        quota.CheckSendBatch(request, timeout=60)
                        elapsed.append(time.perf_counter() - started)
                    rate = args.batch / statistics.median(elapsed)
                    rows.append(
                        (
                            f"CheckSendBatch {args.batch} {label}",
                            percentile(elapsed, 0.5) * 1e3,
                            percentile(elapsed, 0.99) * 1e3,
                            rate,
                        )
                    )
        finally:
            sidecar.stop(1)
    print(f"{'scenario':32} {'p50 ms':>9} {'p99 ms':>9} {'per second':>12}")
    for name, p50, p99, rate in rows:
        print(f"{name:32} {p50:9.3f} {p99:9.3f} {rate:12,.0f}")


if __name__ == "__main__":
    main()
