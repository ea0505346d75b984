"""The server's keepalive policy against a real client that pings (issue 17 item 1).

Mail workers keep channels open between campaigns and let gRPC ping them: an idle
@grpc/grpc-js worker with ordinary settings pings every 5 s without calls. gRPC's
server default accepts a ping without data once per 5 minutes and answers the third
early one with GOAWAY `too_many_pings`, dropping the connection. The sidecar accepts
pings as often as every MIN_PING_INTERVAL, with or without calls.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.domain.clock import FakeClock
from quota_sidecar.server.settings import Settings

from support.sidecar import start_sidecar

# Often enough for the server's default policy to strike it out three times over.
CLIENT_PING_MS = 1_000
IDLE_S = 7.0


def test_a_client_pinging_every_second_while_idle_keeps_its_connection(tmp_path: Path, clock: FakeClock) -> None:
    """Issue 17 item 1: a client with keepalive every second and permit-without-calls stays
    connected through seven idle seconds (one connection, READY throughout), and its next
    call goes out on it; the server's keepalive_min_ping_interval allows it."""
    assert Settings().keepalive_min_ping_interval * 1000 <= CLIENT_PING_MS
    running = start_sidecar(tmp_path / "ledger.db", clock)
    channel = grpc.insecure_channel(
        running.address,
        options=[
            ("grpc.keepalive_time_ms", CLIENT_PING_MS),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )
    states: list[grpc.ChannelConnectivity] = []
    changed = threading.Lock()

    def seen(state: grpc.ChannelConnectivity) -> None:
        with changed:
            states.append(state)

    try:
        stub = pb_grpc.QuotaServiceStub(channel)
        running.put_plan(
            "t",
            plan_name="P",
            metering=pb.METERING_CYCLE_ACTIVE,
            enforcement=pb.ENFORCEMENT_HARD,
            contact_limit=10,
            counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
        )
        stub.GetUsage(pb.GetUsageRequest(tenant_id="t"), timeout=5)
        channel.subscribe(seen)
        time.sleep(IDLE_S)
        stub.GetUsage(pb.GetUsageRequest(tenant_id="t"), timeout=5)
        with changed:
            assert set(states) == {grpc.ChannelConnectivity.READY}, states
    finally:
        channel.unsubscribe(seen)
        channel.close()
        running.stop()
