"""What the ledger keeps: the bound on a plan's notify_thresholds."""

from __future__ import annotations

import grpc
import pytest

from quota_sidecar.client.v1 import quota_pb2 as pb

from conftest import RunningSidecar

# -- a plan's notify_thresholds ------------------------------------------------------------------


def test_put_plan_with_too_many_notify_thresholds_is_invalid_and_stores_nothing(sidecar: RunningSidecar):
    """Each threshold crossed writes an event in the deciding call's transaction: a plan lists at
    most 10, more is INVALID_ARGUMENT naming notify_thresholds and changes nothing."""
    base = dict(preset="contact-limit", contact_limit=100)
    many = [round(0.05 * i, 2) for i in range(1, 12)]
    with pytest.raises(grpc.RpcError) as refused:
        sidecar.put_plan("new", notify_thresholds=many, **base)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "notify_thresholds" in refused.value.details()
    admin = sidecar.admin()
    with pytest.raises(grpc.RpcError) as missing:
        admin.GetPlan(pb.GetPlanRequest(tenant_id="new"), metadata=sidecar.auth, timeout=5)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    sidecar.put_plan("kept", notify_thresholds=many[:10], **base)
    with pytest.raises(grpc.RpcError) as again:
        sidecar.put_plan("kept", notify_thresholds=many, **base)
    assert again.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    kept = admin.GetPlan(pb.GetPlanRequest(tenant_id="kept"), metadata=sidecar.auth, timeout=5).plan
    assert list(kept.notify_thresholds) == many[:10]
