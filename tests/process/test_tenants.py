"""The `--tenants FILE` option of the real `quota-sidecar serve`: plans loaded at start with
presets, validated exactly like PutPlan; a bad file stops the start with one clear line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.app import Sidecar
from quota_sidecar.server.settings import Settings

from support.process import AUTH, Process, start
from support.serving import BIN

pytestmark = pytest.mark.process

FOUR_MODELS = """\
tenants:
  acme:
    preset: contact-limit
    contactLimit: 1000
  shop:
    preset: active-cycle-hard
    contact_limit: 500
    cycle_anchor: "2026-01-31T00:00:00Z"
  funnel:
    preset: active-cycle-overage
    planName: GROW
    billingInterval: ANNUAL
  crm:
    preset: marketing-contacts
    contactLimit: 2000
    overageUnitPrice: "0.10"
    currency: USD
"""


def plans(address: str, *tenants: str) -> dict[str, pb.Plan]:
    with grpc.insecure_channel(address) as ch:
        admin = pb_grpc.QuotaAdminServiceStub(ch)
        return {t: admin.GetPlan(pb.GetPlanRequest(tenant_id=t), metadata=AUTH, timeout=5).plan for t in tenants}


def test_a_yaml_file_loads_each_model_by_its_preset(tmp_path: Path, processes: list[Process]) -> None:
    """AC-7, SG-3, CR-3, CR-7, MK-1: the four presets from a YAML file, with overrides, at start."""
    path = tmp_path / "tenants.yaml"
    path.write_text(FOUR_MODELS)
    p = start(tmp_path / "ledger.db", "--tenants", str(path))
    processes.append(p)
    p.wait_serving()
    got = plans(p.address, "acme", "shop", "funnel", "crm")
    assert (got["acme"].metering, got["acme"].grace_percent, got["acme"].contact_limit) == (
        pb.METERING_HELD_CONTACTS,
        10,
        1000,
    )
    assert {(r.source, r.policy) for r in got["acme"].source_rules} == {
        (pb.CONTACT_SOURCE_API, pb.SOURCE_POLICY_OVER_LIMIT_ALLOWED),
        (pb.CONTACT_SOURCE_FORM, pb.SOURCE_POLICY_OVER_LIMIT_ALLOWED),
        (pb.CONTACT_SOURCE_IMPORT, pb.SOURCE_POLICY_REFUSE_IF_EXCEEDS),
        (pb.CONTACT_SOURCE_MANUAL, pb.SOURCE_POLICY_BLOCKED_AT_LIMIT),
    }
    assert (got["shop"].sends_per_contact, got["shop"].cycle_anchor.ToJsonString()) == (10, "2026-01-31T00:00:00Z")
    assert (got["funnel"].contact_limit, got["funnel"].overage_unit_price, got["funnel"].billing_interval) == (
        250,
        "0.25",
        pb.BILLING_INTERVAL_ANNUAL,
    )
    assert (got["crm"].marketing_contacts_only, got["crm"].overage_unit_price, got["crm"].currency) == (
        True,
        "0.10",
        "USD",
    )


def test_a_json_file_loads_too_and_a_restart_reloads_it_over_the_ledger(
    tmp_path: Path, processes: list[Process]
) -> None:
    """SG-4: an edited entry replaces the stored plan at the next start; the tenant keeps its figures."""
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": {"shop": {"preset": "active-cycle-hard", "contactLimit": 2}}}))
    ledger = tmp_path / "ledger.db"
    p = start(ledger, "--tenants", str(path))
    processes.append(p)
    p.wait_serving()
    with grpc.insecure_channel(p.address) as ch:
        quota = pb_grpc.QuotaServiceStub(ch)
        for contact in ("a", "b", "c"):
            quota.CheckSend(
                pb.CheckSendRequest(
                    tenant_id="shop", contact_id=contact, channel=pb.CHANNEL_EMAIL, kind=pb.MESSAGE_KIND_CAMPAIGN
                ),
                timeout=5,
            )
    p.proc.terminate()
    assert p.proc.wait(30) == 0

    path.write_text(json.dumps({"tenants": {"shop": {"preset": "active-cycle-hard", "contactLimit": 5}}}))
    again = start(ledger, "--tenants", str(path))
    processes.append(again)
    again.wait_serving()
    with grpc.insecure_channel(again.address) as ch:
        usage = pb_grpc.QuotaServiceStub(ch).GetUsage(pb.GetUsageRequest(tenant_id="shop"), timeout=5).usage
    assert (usage.contact_limit, usage.active_contacts, usage.sends_limit) == (5, 2, 50)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "tenants:\n  acme:\n    preset: contact-limits\n    contactLimit: 10\n",
            "tenant 'acme': plan.preset: unknown preset 'contact-limits'",
        ),
        (
            "tenants:\n  acme:\n    preset: contact-limit\n    contactLimit: 10\n    gracePercent: 150\n",
            "tenant 'acme': plan.grace_percent: must be at most 100",
        ),
        (
            "tenants:\n  funnel:\n    preset: active-cycle-overage\n    planName: GOLD\n",
            "tenant 'funnel': plan.contact_limit: give contact_limit, or a plan_name of START",
        ),
        ("tenants:\n  acme:\n    preset: [contact-limit\n", "cannot be read"),
        ("tenants:\n  acme:\n    metering: HELD\n", "tenant 'acme':"),
        ("- just a list\n", "expected a mapping 'tenants: {TENANT_ID: PLAN}'"),
    ],
)
def test_a_bad_tenants_file_stops_the_start_with_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    """api.md Errors: a plan PutPlan would refuse stops the start, before the port is bound or the ledger made."""
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    result = subprocess.run(
        [str(BIN / "quota-sidecar"), "serve", "--ledger", str(tmp_path / "l.db"), "--tenants", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert len(lines) == 1 and lines[0].startswith(f"quota-sidecar: --tenants {path}: ") and message in lines[0]
    assert not (tmp_path / "l.db").exists()


def test_an_embedded_sidecar_reads_the_file_itself(tmp_path: Path) -> None:
    """CR-3: a Sidecar built in-process from Settings with a tenants file loads it when opened."""
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n  funnel:\n    preset: active-cycle-overage\n    plan_name: EXPAND\n")
    settings = Settings(
        address="127.0.0.1:0", ledger=str(tmp_path / "l.db"), metrics_address="", tenants=str(path)
    ).validate()
    sidecar = Sidecar(settings, registry=CollectorRegistry())
    sidecar.start()
    try:
        assert sidecar.engine.get_plan("funnel").contact_limit == 500
    finally:
        sidecar.stop(0)


def _serving(ledger: Path, path: Path, processes: list[Process]) -> Process:
    p = start(ledger, "--tenants", str(path))
    processes.append(p)
    p.wait_serving()
    return p


def _loaded_line(p: Process) -> str:
    """Stops the sidecar with SIGTERM; the log line saying what the start did with the file."""
    p.proc.terminate()
    _, err = p.proc.communicate(timeout=30)
    assert p.proc.returncode == 0, err
    return next(line for line in err.splitlines() if "tenants file" in line)


def test_a_restart_keeps_a_putplan_upgrade_and_applies_only_an_edited_entry(
    tmp_path: Path, processes: list[Process]
) -> None:
    """SG-4, AC-10: the file's entry for a tenant is applied when the tenant is new or the entry
    differs from the one applied last; a restart with the same entry keeps a PutPlan upgrade made
    since, and the start-up log names the tenants created, changed and left as stored."""
    path = tmp_path / "tenants.yaml"
    acme = "  acme:\n    preset: contact-limit\n    contactLimit: 1000\n"
    path.write_text("tenants:\n" + acme + "  shop:\n    preset: active-cycle-hard\n    contactLimit: 500\n")
    ledger = tmp_path / "ledger.db"
    first = _serving(ledger, path, processes)
    with grpc.insecure_channel(first.address) as ch:
        upgrade = pb.Plan(preset="contact-limit", contact_limit=2000)
        pb_grpc.QuotaAdminServiceStub(ch).PutPlan(
            pb.PutPlanRequest(tenant_id="acme", plan=upgrade), metadata=AUTH, timeout=5
        )
    assert "created: acme, shop" in _loaded_line(first)

    second = _serving(ledger, path, processes)
    got = plans(second.address, "acme", "shop")
    assert (got["acme"].contact_limit, got["shop"].contact_limit) == (2000, 500)
    line = _loaded_line(second)
    assert "left as stored: acme, shop" in line and "changed" not in line

    path.write_text("tenants:\n" + acme + "  shop:\n    preset: active-cycle-hard\n    contactLimit: 800\n")
    third = _serving(ledger, path, processes)
    got = plans(third.address, "acme", "shop")
    assert (got["acme"].contact_limit, got["shop"].contact_limit) == (2000, 800)
    line = _loaded_line(third)
    assert "changed: shop" in line and "left as stored: acme" in line


def test_a_present_key_of_the_file_beats_the_preset_even_when_zero_or_empty(tmp_path: Path) -> None:
    """AC-7, MK-2: `gracePercent: 0` and `notify_thresholds: []` beside a preset are given, like PutPlan's."""
    path = tmp_path / "tenants.yaml"
    path.write_text(
        "tenants:\n  acme:\n    preset: contact-limit\n    contactLimit: 10\n    gracePercent: 0\n"
        "    notify_thresholds: []\n"
    )
    settings = Settings(
        address="127.0.0.1:0", ledger=str(tmp_path / "l.db"), metrics_address="", tenants=str(path)
    ).validate()
    sidecar = Sidecar(settings, registry=CollectorRegistry())
    sidecar.start()
    try:
        plan = sidecar.engine.get_plan("acme")
        assert (plan.grace_percent, plan.notify_thresholds) == (0, ())
    finally:
        sidecar.stop(0)
