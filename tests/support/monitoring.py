"""The alert rules and the Grafana dashboard as the monitoring tests read them, and the tenants they load."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "monitoring" / "prometheus"
ALERTS = RULES_DIR / "alerts.yml"
DASHBOARD = REPO / "monitoring" / "grafana" / "dashboards" / "quota-sidecar.json"
# The tenants `load_tenants` sets up: each one's contact limit and the new contacts it sends to.
NEAR_TENANT = "near"
FULL_TENANT = "full"
TENANTS = {"calm": (10, 6), NEAR_TENANT: (10, 9), FULL_TENANT: (4, 5), "acme": (1000, 30)}


def dashboard() -> dict:
    if not DASHBOARD.is_file():
        pytest.fail(f"the Grafana dashboard {DASHBOARD.relative_to(REPO)} is missing")
    return json.loads(DASHBOARD.read_text())


def panel_targets(node: object, title: str = "") -> Iterator[tuple[str, str]]:
    """(panel title, expr) of every query target, in rows and nested panels too."""
    if isinstance(node, dict):
        title = node.get("title", title) if "targets" in node or "panels" in node else title
        for target in node.get("targets", []):
            if isinstance(target, dict) and target.get("expr"):
                yield title, target["expr"]
        for key, value in node.items():
            if key != "targets":
                yield from panel_targets(value, title)
    elif isinstance(node, list):
        for item in node:
            yield from panel_targets(item, title)


def load_tenants(address: str, auth: tuple[tuple[str, str], ...]) -> None:
    """Plans for four tenants and sends to new contacts: `calm` at 0.6 of its limit, `near` at 0.9
    (past its 0.8 notify threshold), `full` at its limit with one send denied, `acme` far below."""
    with grpc.insecure_channel(address) as channel:
        admin = pb_grpc.QuotaAdminServiceStub(channel)
        quota = pb_grpc.QuotaServiceStub(channel)
        for tenant, (limit, sends) in TENANTS.items():
            admin.PutPlan(
                pb.PutPlanRequest(
                    tenant_id=tenant,
                    plan=pb.Plan(
                        plan_name="P",
                        metering=pb.METERING_CYCLE_ACTIVE,
                        enforcement=pb.ENFORCEMENT_HARD,
                        contact_limit=limit,
                        counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
                        notify_thresholds=[0.8, 1.0],
                    ),
                ),
                metadata=auth,
                timeout=10,
            )
            for n in range(sends):
                quota.CheckSend(
                    pb.CheckSendRequest(
                        tenant_id=tenant,
                        contact_id=f"{tenant}-{n}",
                        channel=pb.CHANNEL_EMAIL,
                        kind=pb.MESSAGE_KIND_CAMPAIGN,
                    ),
                    timeout=10,
                )
