"""api.md Presets: "A field given beside a `preset` overrides it, an explicit zero or empty
value included" — over gRPC (proto3 presence, `Plan.given_fields`) and through quotactl,
against a real sidecar on a free port. Rule ids refer to domain.md."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.client.cli import main

T = "tenant-p"


def put(sidecar, **fields: object) -> pb.Plan:
    return sidecar.put_plan(T, **fields).plan


def stored(sidecar) -> pb.Plan:
    return sidecar.admin().GetPlan(pb.GetPlanRequest(tenant_id=T), metadata=sidecar.auth, timeout=5).plan


def test_a_preset_still_fills_the_fields_left_out(sidecar) -> None:
    """AC-7, AC-1, SG-3: left out, the preset's grace, reminders, sends allowance and thresholds apply."""
    plan = put(sidecar, preset="contact-limit", contact_limit=10)
    assert (plan.grace_percent, plan.renotify_interval.seconds, list(plan.notify_thresholds)) == (
        10,
        15 * 86400,
        [0.9, 1.0],
    )
    assert put(sidecar, preset="active-cycle-hard", contact_limit=10).sends_per_contact == 10


def test_a_zero_grace_percent_beside_the_preset_wins_AC_7(sidecar) -> None:
    """AC-7: grace_percent 0 beside contact-limit blocks at the limit itself, not 10% above it."""
    plan = put(sidecar, preset="contact-limit", contact_limit=10, grace_percent=0)
    assert plan.grace_percent == 0 and stored(sidecar).grace_percent == 0
    add = pb.CheckContactAddRequest(tenant_id=T, source=pb.CONTACT_SOURCE_API, contact_ids=[f"c{i}" for i in range(11)])
    assert sidecar.quota().CheckContactAdd(add, timeout=5).usage.state == pb.USAGE_STATE_BLOCKED


def test_a_zero_renotify_interval_beside_the_preset_wins_AC_1(sidecar) -> None:
    """AC-1: renotify_interval 0s beside contact-limit turns the 15-day reminders off."""
    plan = put(sidecar, preset="contact-limit", contact_limit=10, renotify_interval=Duration(seconds=0))
    assert plan.renotify_interval.ToTimedelta().total_seconds() == 0
    assert stored(sidecar).renotify_interval.ToTimedelta().total_seconds() == 0


def test_a_zero_sends_per_contact_beside_the_preset_wins_SG_3(sidecar) -> None:
    """SG-3: sends_per_contact 0 beside active-cycle-hard leaves the sends unlimited."""
    change = sidecar.put_plan(T, preset="active-cycle-hard", contact_limit=10, sends_per_contact=0)
    assert (change.plan.sends_per_contact, change.plan.sends_limit, change.usage.sends_limit) == (0, 0, 0)


def test_no_notify_thresholds_named_in_given_fields_beside_the_preset_win_MK_2(sidecar) -> None:
    """MK-2, CR-8: notify_thresholds given empty (named in given_fields) turns the preset's notifications off."""
    plan = put(
        sidecar, preset="marketing-contacts", contact_limit=10, given_fields=FieldMask(paths=["notify_thresholds"])
    )
    assert list(plan.notify_thresholds) == [] and list(stored(sidecar).notify_thresholds) == []


def test_an_unknown_given_field_is_refused_naming_it(sidecar) -> None:
    """api.md Errors: a path that is not a Plan field is INVALID_ARGUMENT naming given_fields; nothing is stored."""
    with pytest.raises(grpc.RpcError) as refused:
        put(sidecar, preset="contact-limit", contact_limit=10, given_fields=FieldMask(paths=["no_such_field"]))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "plan.given_fields" in refused.value.details()
    with pytest.raises(grpc.RpcError) as missing:
        stored(sidecar)
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND


def test_quotactl_sends_a_zero_or_empty_flag_as_given_AC_1_AC_7_SG_3(sidecar, capsys) -> None:
    """AC-1, AC-7, SG-3, MK-2: `--grace-percent 0`, `--renotify-interval 0s`, `--notify ""` and
    `--sends-per-contact 0` beside --preset beat the preset's values."""
    connection = ["--address", sidecar.address, "--admin-token", sidecar.admin_token]
    argv = ["plan", "set", T, "--preset", "contact-limit", "--limit", "10", "--grace-percent", "0"]
    assert main([*connection, *argv, "--renotify-interval", "0s", "--notify", "", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert (plan.get("grace_percent"), plan.get("renotify_interval"), plan.get("notify_thresholds")) == (0, None, [])
    assert (stored(sidecar).grace_percent, list(stored(sidecar).notify_thresholds)) == (0, [])

    argv = ["plan", "set", T, "--preset", "active-cycle-hard", "--limit", "10", "--sends-per-contact", "0", "--json"]
    assert main([*connection, *argv]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert (plan.get("sends_per_contact"), plan.get("sends_limit")) == (0, 0)
    assert stored(sidecar).sends_per_contact == 0
