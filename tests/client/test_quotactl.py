"""quotactl against the real sidecar (fixture `sidecar`): in-process through main(argv),
and once through the installed console script. Rule ids refer to domain.md."""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.client import QuotaClient
from quota_sidecar.client.cli import (
    ADDRESS_ENV,
    ADMIN_TOKEN_ENV,
    ADMIN_TOKEN_FILE_ENV,
    COMMANDS,
    EXIT_BROKEN_PIPE,
    EXIT_DENY,
    EXIT_NOT_NOW,
    EXIT_SERVER_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    PRESETS,
    build_parser,
    main,
)
from quota_sidecar.server.domain.presets import PRESETS as SERVER_PRESETS

TENANT = "tenant-1"
PLAN_SET = (
    f"plan set {TENANT} --name P --metering CYCLE_ACTIVE --enforcement HARD"
    " --limit 3 --counted-kinds CAMPAIGN,AUTOMATION"
).split()

Run = Callable[..., tuple[int, str, str]]


def fields(out: str) -> dict[str, str]:
    """The `key   value` lines of human output."""
    pairs = (re.split(r" {2,}", line.strip(), maxsplit=1) for line in out.splitlines() if line.strip())
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


@pytest.fixture(autouse=True)
def no_quota_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    monkeypatch.delenv(ADMIN_TOKEN_FILE_ENV, raising=False)


@pytest.fixture
def run_at(capsys: pytest.CaptureFixture[str]) -> Callable[[str], Run]:
    def at(address: str, token: str | None = None) -> Run:
        def run(*argv: str) -> tuple[int, str, str]:
            options = ["--address", address] + (["--admin-token", token] if token else [])
            status = main([*options, *argv])
            out, err = capsys.readouterr()
            return status, out, err

        return run

    return at


@pytest.fixture
def quotactl(sidecar, run_at: Callable[..., Run]) -> Run:
    """quotactl with the admin token, against a sidecar where TENANT has plan P."""
    run = run_at(sidecar.address, sidecar.admin_token)
    status, _, err = run(*PLAN_SET)
    assert status == 0, err
    return run


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = list(_subcommands(sub, f"{prefix}{name} "))
                yield from nested or [f"{prefix}{name}"]


def test_commands_names_every_command() -> None:
    assert sorted(COMMANDS) == sorted(_subcommands(build_parser({})))


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command.split(), "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: quotactl {command}")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["plan"],
        ["usage"],
        ["check", TENANT],
        ["check", TENANT, "c1", "--kind", "LETTER"],
        ["usage", TENANT, "--cycle", "last month"],
        ["plan", "set", TENANT, "--limit", "-1"],
        ["plan", "set", TENANT, "--counted-kinds", "CAMPAIGN,POSTCARD"],
        ["plan", "set", TENANT, "--source-rule", "IMPORT"],
        ["--timeout", "0", "usage", TENANT],
        ["--address", "", "usage", TENANT],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == EXIT_USAGE
    assert "quotactl" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["usage", TENANT], ["check", TENANT, "c1"], ["plan", "get", TENANT]])
def test_unreachable_sidecar_exits_3_with_one_line(free_address: str, run_at: Callable[..., Run], argv) -> None:
    status, out, err = run_at(free_address, "token")(*argv)
    assert status == EXIT_UNREACHABLE
    assert out == ""
    assert err.startswith("quotactl: UNAVAILABLE: ") and err.count("\n") == 1


def test_plan_set_and_get_in_human_and_json_form(quotactl: Run) -> None:
    status, out, _ = quotactl(*PLAN_SET, "--notify", "0.8,1.0", "--source-rule", "IMPORT=REFUSE_IF_EXCEEDS")
    assert status == 0
    shown = fields(out)
    assert shown["metering"] == "CYCLE_ACTIVE" and shown["enforcement"] == "HARD"
    assert shown["counted kinds"] == "CAMPAIGN, AUTOMATION"
    assert shown["notify at"] == "0.8, 1.0"
    assert shown["source rules"] == "IMPORT=REFUSE_IF_EXCEEDS"
    assert "active contacts   0 / 3 (0%)" in out

    status, out, _ = quotactl("plan", "get", TENANT)
    assert status == 0 and fields(out)["contact limit"] == "3 + 0 add-ons"

    status, out, _ = quotactl("plan", "get", TENANT, "--json")
    plan = json.loads(out)["plan"]
    assert (plan["plan_name"], plan["metering"], plan["contact_limit"]) == ("P", "METERING_CYCLE_ACTIVE", 3)
    assert plan["counted_kinds"] == ["MESSAGE_KIND_CAMPAIGN", "MESSAGE_KIND_AUTOMATION"]


def test_check_counts_a_contact_once_and_a_dry_run_not_at_all_SG_8(quotactl: Run) -> None:
    status, out, _ = quotactl("check", TENANT, "c1")
    assert status == 0
    shown = fields(out)
    assert (shown["decision"], shown["reason"], shown["newly active"]) == ("ALLOW", "NEW_CONTACT_COUNTED", "yes")
    assert "active contacts   1 / 3 (33%)" in out

    status, out, _ = quotactl("check", TENANT, "c1", "--kind", "automation", "--json")
    answer = json.loads(out)
    assert (answer["decision"], answer["reason"]) == ("DECISION_ALLOW", "REASON_ALREADY_ACTIVE")
    assert (answer["usage"]["active_contacts"], answer["usage"]["sends"]) == (1, 2)

    status, out, _ = quotactl("check", TENANT, "c2", "--dry-run")
    assert status == 0 and fields(out)["reason"] == "NEW_CONTACT_COUNTED"
    _, out, _ = quotactl("usage", TENANT)
    assert "active contacts   1 / 3 (33%)" in out


def test_a_denial_is_an_answer_not_an_error_SG_2(quotactl: Run) -> None:
    for contact in ("c1", "c2", "c3"):
        quotactl("check", TENANT, contact)
    status, out, err = quotactl("check", TENANT, "c4")
    assert status == 0 and err == ""
    assert (fields(out)["decision"], fields(out)["reason"]) == ("DENY", "CONTACT_LIMIT_REACHED")


def test_usage_in_human_and_json_form(sidecar, quotactl: Run) -> None:
    quotactl("check", TENANT, "c1")
    status, out, _ = quotactl("usage", TENANT)
    assert status == 0
    shown = fields(out)
    assert (shown["tenant"], shown["plan"], shown["state"]) == (TENANT, "P", "OK")
    # The plan was stored just now, so the cycle starts now.
    anchor = sidecar.clock.now().isoformat().replace("+00:00", "Z")
    assert shown["cycle"].startswith(f"{anchor} .. ")
    assert "active contacts   1 / 3 (33%)" in out.splitlines()

    status, out, _ = quotactl("usage", TENANT, "--json")
    usage = json.loads(out)["usage"]
    assert (usage["active_contacts"], usage["contact_limit"], usage["state"]) == (1, 3, "USAGE_STATE_OK")


def test_usage_of_a_past_cycle_SG_7(sidecar, quotactl: Run) -> None:
    quotactl("check", TENANT, "c1")
    last_cycle = sidecar.clock.now().isoformat()
    sidecar.clock.advance(32 * 86400)
    assert "active contacts   0 / 3 (0%)" in quotactl("usage", TENANT)[1]
    assert "active contacts   1 / 3 (33%)" in quotactl("usage", TENANT, "--cycle", last_cycle)[1]


def test_contact_in_human_and_json_form(quotactl: Run) -> None:
    quotactl("check", TENANT, "c1")
    status, out, _ = quotactl("contact", TENANT, "c1")
    assert status == 0
    assert (fields(out)["contact"], fields(out)["active this cycle"]) == ("c1", "yes")
    contact = json.loads(quotactl("contact", TENANT, "c1", "--json")[1])["contact"]
    assert (contact["contact_id"], contact["active_this_cycle"]) == ("c1", True)


def test_active_contacts_as_table_csv_and_json(quotactl: Run) -> None:
    for contact in ("c1", "c2", "c3"):
        quotactl("check", TENANT, contact)
    status, out, _ = quotactl("active-contacts", TENANT)
    assert status == 0
    assert out.splitlines()[0].split() == ["CONTACT", "ACTIVATED", "AT", "ACTIVITY", "COUNTED", "UNTIL"]
    assert out.splitlines()[-1] == "3 active contacts"

    rows = list(csv.DictReader(io.StringIO(quotactl("active-contacts", TENANT, "--csv")[1])))
    assert sorted(row["contact_id"] for row in rows) == ["c1", "c2", "c3"]
    assert all(row["activated_at"].endswith("Z") for row in rows)

    listed = json.loads(quotactl("active-contacts", TENANT, "--json")[1])
    assert sorted(contact["contact_id"] for contact in listed["contacts"]) == ["c1", "c2", "c3"]


HELD_KINDS = ["MESSAGE_KIND_CAMPAIGN", "MESSAGE_KIND_AUTOMATION"]
PRESET_FIELDS = {
    "contact-limit": (
        ["--limit", "1000"],
        {
            "metering": "METERING_HELD_CONTACTS",
            "enforcement": "ENFORCEMENT_GRACE",
            "marketing_contacts_only": False,
            "contact_limit": 1000,
            "grace_percent": 10,
            "source_rules": [
                {"source": "CONTACT_SOURCE_API", "policy": "SOURCE_POLICY_OVER_LIMIT_ALLOWED"},
                {"source": "CONTACT_SOURCE_FORM", "policy": "SOURCE_POLICY_OVER_LIMIT_ALLOWED"},
                {"source": "CONTACT_SOURCE_IMPORT", "policy": "SOURCE_POLICY_REFUSE_IF_EXCEEDS"},
                {"source": "CONTACT_SOURCE_MANUAL", "policy": "SOURCE_POLICY_BLOCKED_AT_LIMIT"},
            ],
            "counted_kinds": HELD_KINDS,
            "counted_activities": [],
            "max_queue": "86400s",
            "notify_thresholds": [0.9, 1.0],
            "renotify_interval": "1296000s",
            "overage_unit_price": "",
        },
    ),
    "active-cycle-hard": (
        ["--limit", "500"],
        {
            "metering": "METERING_CYCLE_ACTIVE",
            "enforcement": "ENFORCEMENT_HARD",
            "marketing_contacts_only": False,
            "contact_limit": 500,
            "grace_percent": 0,
            "sends_per_contact": 10,
            "counted_kinds": HELD_KINDS,
            "counted_activities": ["ACTIVITY_KIND_MESSAGE_SENT"],
            "notify_thresholds": [0.8, 1.0],
            "overage_unit_price": "",
        },
    ),
    "active-cycle-overage": (
        ["--name", "GROW"],
        {
            "plan_name": "GROW",
            "metering": "METERING_CYCLE_ACTIVE",
            "enforcement": "ENFORCEMENT_OVERAGE",
            "marketing_contacts_only": False,
            "contact_limit": 250,
            "overage_unit_price": "0.25",
            "currency": "EUR",
            "counted_kinds": [*HELD_KINDS, "MESSAGE_KIND_TRANSACTIONAL", "MESSAGE_KIND_ONE_TO_ONE"],
            "counted_activities": [
                "ACTIVITY_KIND_CONTACT_CREATED",
                "ACTIVITY_KIND_STATUS_CHANGED",
                "ACTIVITY_KIND_MESSAGE_SENT",
                "ACTIVITY_KIND_NOTE_ADDED",
                "ACTIVITY_KIND_PROPERTY_CHANGED",
                "ACTIVITY_KIND_STATUS_RENAMED",
            ],
            "notify_thresholds": [0.8, 1.0],
        },
    ),
    "marketing-contacts": (
        ["--limit", "1000"],
        {
            "metering": "METERING_HELD_CONTACTS",
            "enforcement": "ENFORCEMENT_OVERAGE",
            "marketing_contacts_only": True,
            "contact_limit": 1000,
            "counted_kinds": HELD_KINDS,
            "counted_activities": [],
            "notify_thresholds": [0.8, 0.9, 1.0],
            "overage_unit_price": "",
        },
    ),
}


def test_quotactl_offers_the_servers_presets() -> None:
    """Models 1-4 (AC-6, SG-2, CR-5, MK-1): `plan set --preset` offers exactly the presets the sidecar knows."""
    assert PRESETS == tuple(SERVER_PRESETS)


@pytest.mark.parametrize("preset", PRESET_FIELDS)
def test_plan_set_with_each_preset_stores_the_presets_fields_AC_7_SG_3_CR_3_MK_1(quotactl: Run, preset: str) -> None:
    """AC-7, SG-3, CR-3, CR-6, MK-1: each preset fills the fields of api.md's table, shown by
    `plan get --json` and in human form."""
    options, expected = PRESET_FIELDS[preset]
    status, out, err = quotactl("plan", "set", TENANT, "--preset", preset, *options)
    assert status == 0, err
    assert fields(out)["preset"] == preset
    plan = json.loads(quotactl("plan", "get", TENANT, "--json")[1])["plan"]
    assert plan["preset"] == preset
    assert {name: plan[name] for name in expected} == expected
    shown = fields(quotactl("plan", "get", TENANT)[1])
    assert shown["marketing contacts only"] == ("yes" if expected["marketing_contacts_only"] else "no")


OVERRIDES = {
    "plan name in any case": (
        ["--preset", "active-cycle-overage", "--name", "grow"],
        {"contact_limit": 250, "overage_unit_price": "0.25"},
    ),
    "limit beats the plan name": (
        ["--preset", "active-cycle-overage", "--name", "SCALE", "--limit", "100"],
        {"contact_limit": 100},
    ),
    "price and currency": (
        ["--preset", "active-cycle-overage", "--name", "START", "--overage-unit-price", "0.30", "--currency", "USD"],
        {"contact_limit": 50, "overage_unit_price": "0.30", "currency": "USD"},
    ),
    "grace and thresholds": (
        ["--preset", "contact-limit", "--limit", "1000", "--grace-percent", "20", "--notify", "0.5"],
        {"grace_percent": 20, "notify_thresholds": [0.5], "enforcement": "ENFORCEMENT_GRACE"},
    ),
    "a hard limit drops the grace": (
        ["--preset", "contact-limit", "--limit", "1000", "--enforcement", "HARD"],
        {"enforcement": "ENFORCEMENT_HARD", "grace_percent": 0, "metering": "METERING_HELD_CONTACTS"},
    ),
    "one source rule replaces the preset's": (
        ["--preset", "contact-limit", "--limit", "1000", "--source-rule", "IMPORT=OVER_LIMIT_ALLOWED"],
        {"source_rules": [{"source": "CONTACT_SOURCE_IMPORT", "policy": "SOURCE_POLICY_OVER_LIMIT_ALLOWED"}]},
    ),
    "a sends limit replaces sends per contact": (
        ["--preset", "active-cycle-hard", "--limit", "500", "--sends-limit", "1000"],
        {"sends_limit": 1000, "sends_per_contact": 0},
    ),
    "marketing contacts without a preset": (
        [
            "--metering",
            "HELD_CONTACTS",
            "--enforcement",
            "OVERAGE",
            "--limit",
            "10",
            "--counted-kinds",
            "CAMPAIGN",
            "--marketing-contacts-only",
        ],
        {"marketing_contacts_only": True, "preset": ""},
    ),
}


@pytest.mark.parametrize("options, expected", OVERRIDES.values(), ids=OVERRIDES.keys())
def test_plan_set_options_override_the_preset_CR_3_AC_7_SG_3(quotactl: Run, options: list[str], expected) -> None:
    """CR-3, AC-7, SG-3, MK-1: an option given beside --preset wins over the preset's value."""
    status, _, err = quotactl("plan", "set", TENANT, *options)
    assert status == 0, err
    plan = json.loads(quotactl("plan", "get", TENANT, "--json")[1])["plan"]
    assert {name: plan[name] for name in expected} == expected


@pytest.mark.parametrize(
    "options, field",
    [
        (["--preset", "gold", "--limit", "5"], "plan.preset"),
        (["--preset", "active-cycle-overage", "--name", "PRO"], "plan.contact_limit"),
        (
            ["--preset", "active-cycle-hard", "--limit", "5", "--marketing-contacts-only"],
            "plan.marketing_contacts_only",
        ),
    ],
)
def test_plan_set_refusals_name_the_field_and_keep_the_plan_CR_3(quotactl: Run, options: list[str], field: str) -> None:
    """CR-3, MK-1: a preset plan the sidecar refuses exits 1 with one line naming the field; the old plan stays."""
    status, out, err = quotactl("plan", "set", TENANT, *options)
    assert (status, out) == (EXIT_SERVER_ERROR, "")
    assert err.startswith(f"quotactl: INVALID_ARGUMENT: {field}: ") and err.count("\n") == 1
    assert json.loads(quotactl("plan", "get", TENANT, "--json")[1])["plan"]["plan_name"] == "P"


def _table_rows(out: str, header: str) -> list[list[str]]:
    """The rows of the table under `header`, split into cells, up to the next blank line."""
    lines = out.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(re.split(r" {2,}", line.strip()))
    return rows


def test_invoice_in_human_and_json_form_with_exact_amounts_CR_3_CR_6(sidecar, quotactl: Run) -> None:
    """CR-3, CR-6: START includes 50 contacts; with 53 active the invoice bills 3 x 0.25 = 0.75 EUR,
    as a table of lines with the total, and as the GetInvoice message in JSON."""
    quotactl("plan", "set", TENANT, "--preset", "active-cycle-overage", "--name", "START")
    activity = pb.RecordActivityRequest(
        tenant_id=TENANT, kind=pb.ACTIVITY_KIND_NOTE_ADDED, contact_ids=[f"c{n}" for n in range(53)]
    )
    sidecar.quota().RecordActivity(activity, timeout=10)

    status, out, err = quotactl("invoice", TENANT)
    assert (status, err) == (0, "")
    assert _table_rows(out, "DESCRIPTION") == [
        ["DESCRIPTION", "QUANTITY", "UNIT PRICE", "AMOUNT", "CURRENCY"],
        ["Contacts included in the plan (START)", "50", "0.00", "0.00", "EUR"],
        ["Contacts active this cycle", "53", "0.00", "0.00", "EUR"],
        ["Overage contacts", "3", "0.25", "0.75", "EUR"],
    ]
    shown = fields(out)
    assert (shown["tenant"], shown["plan"], shown["total"]) == (TENANT, "START", "0.75 EUR")
    assert shown["cycle"].startswith(sidecar.clock.now().isoformat().replace("+00:00", "Z"))

    status, out, _ = quotactl("invoice", TENANT, "--json")
    invoice = json.loads(out)
    assert invoice["lines"] == [
        {
            "description": "Contacts included in the plan (START)",
            "quantity": 50,
            "unit_price": "0.00",
            "amount": "0.00",
            "currency": "EUR",
        },
        {
            "description": "Contacts active this cycle",
            "quantity": 53,
            "unit_price": "0.00",
            "amount": "0.00",
            "currency": "EUR",
        },
        {"description": "Overage contacts", "quantity": 3, "unit_price": "0.25", "amount": "0.75", "currency": "EUR"},
    ]
    usage = invoice["usage"]
    assert (usage["overage_contacts"], usage["overage_amount"], usage["peak_contacts"]) == (3, "0.75", 53)


def test_invoice_of_a_past_cycle_on_an_annual_plan_CR_7(sidecar, quotactl: Run) -> None:
    """CR-7: an annual plan's overage is invoiced monthly: each cycle's invoice stands on its own."""
    quotactl("plan", "set", TENANT, "--preset", "active-cycle-overage", "--name", "START", "--interval", "ANNUAL")
    activity = pb.RecordActivityRequest(
        tenant_id=TENANT, kind=pb.ACTIVITY_KIND_CONTACT_CREATED, contact_ids=[f"c{n}" for n in range(58)]
    )
    sidecar.quota().RecordActivity(activity, timeout=10)
    last_cycle = sidecar.clock.now().isoformat()
    sidecar.clock.advance(32 * 86400)

    out = quotactl("invoice", TENANT, "--cycle", last_cycle)[1]
    assert _table_rows(out, "DESCRIPTION")[-1] == [
        "Overage contacts (annual plan, overage invoiced monthly)",
        "8",
        "0.25",
        "2.00",
        "EUR",
    ]
    assert fields(out)["total"] == "2.00 EUR"
    out = quotactl("invoice", TENANT)[1]
    assert _table_rows(out, "DESCRIPTION")[-1][1:4] == ["0", "0.25", "0.00"]
    assert fields(out)["total"] == "0.00 EUR"


def _add(sidecar, ids: list[str], *, marketing: bool = True) -> None:
    request = pb.CheckContactAddRequest(
        tenant_id=TENANT, source=pb.CONTACT_SOURCE_API, contact_ids=ids, marketing=marketing
    )
    assert sidecar.quota().CheckContactAdd(request, timeout=5).decision == pb.DECISION_ALLOW


def _record(sidecar, kind: int, ids: list[str], **extra: object) -> None:
    request = pb.RecordActivityRequest(tenant_id=TENANT, kind=kind, contact_ids=ids, **extra)
    sidecar.quota().RecordActivity(request, timeout=5)


def test_active_contacts_of_a_held_contacts_tenant_AC_10_MK_1(sidecar, quotactl: Run) -> None:
    """AC-10, MK-1: under HELD_CONTACTS the contacts behind the invoice are those held (model 4: the
    marketing ones) at some time in the cycle; a deleted contact stays listed with when it stopped
    counting, and a past cycle lists its own."""
    quotactl("plan", "set", TENANT, "--preset", "contact-limit", "--limit", "5")
    _add(sidecar, ["a", "b", "c"])
    _record(sidecar, pb.ACTIVITY_KIND_CONTACT_DELETED, ["b"])
    held_since = sidecar.clock.now().isoformat().replace("+00:00", "Z")
    status, out, _ = quotactl("active-contacts", TENANT, "--csv")
    assert status == 0
    assert list(csv.reader(io.StringIO(out))) == [
        ["contact_id", "activated_at", "activity", "counted_until"],
        ["a", held_since, "HELD_CONTACT", ""],
        ["b", held_since, "HELD_CONTACT", held_since],
        ["c", held_since, "HELD_CONTACT", ""],
    ]
    assert quotactl("active-contacts", TENANT)[1].splitlines()[-1] == "3 held contacts"

    quotactl("plan", "set", TENANT, "--preset", "marketing-contacts", "--limit", "5")
    _add(sidecar, ["n1"], marketing=False)
    rows = list(csv.DictReader(io.StringIO(quotactl("active-contacts", TENANT, "--csv")[1])))
    assert [(row["contact_id"], row["activity"]) for row in rows] == [
        ("a", "MARKETING_CONTACT"),
        ("b", "MARKETING_CONTACT"),
        ("c", "MARKETING_CONTACT"),
    ]
    assert quotactl("active-contacts", TENANT)[1].splitlines()[-1] == "3 marketing contacts"

    last_month = (sidecar.clock.now() - timedelta(days=40)).isoformat()
    status, out, _ = quotactl("active-contacts", TENANT, "--cycle", last_month, "--csv")
    assert (status, out) == (0, "contact_id,activated_at,activity,counted_until\n")


def test_contact_shows_the_marketing_status_and_its_source_MK_5_MK_6(sidecar, quotactl: Run) -> None:
    """MK-5, MK-6: `contact` shows held, active this cycle, marketing, the until-next-update
    flag and the type and id of the source that set the status; the switch to
    non-marketing shows from the next cycle."""
    quotactl("plan", "set", TENANT, "--preset", "marketing-contacts", "--limit", "5")
    _add(sidecar, ["c1"])
    shown = fields(quotactl("contact", TENANT, "c1")[1])
    assert (shown["held"], shown["marketing"], shown["until next update"]) == ("yes", "yes", "no")
    assert (shown["source type"], shown["source id"]) == ("API", "-")

    _record(
        sidecar,
        pb.ACTIVITY_KIND_MARKETING_STATUS_SET,
        ["c1"],
        marketing=False,
        source_type="WORKFLOW",
        source_id="wf-7",
    )
    status, out, _ = quotactl("contact", TENANT, "c1")
    assert status == 0
    shown = fields(out)
    assert {key: shown[key] for key in ("held", "active this cycle", "marketing", "until next update")} == {
        "held": "yes",
        "active this cycle": "yes",
        "marketing": "yes",
        "until next update": "yes",
    }
    assert (shown["source type"], shown["source id"]) == ("WORKFLOW", "wf-7")
    contact = json.loads(quotactl("contact", TENANT, "c1", "--json")[1])["contact"]
    assert (contact["marketing_until_next_update"], contact["marketing_source_id"]) == (True, "wf-7")

    sidecar.clock.advance(32 * 86400)
    shown = fields(quotactl("contact", TENANT, "c1")[1])
    assert (shown["held"], shown["marketing"], shown["until next update"]) == ("yes", "no", "no")


def test_usage_shows_the_peak_of_held_contacts_AC_10_MK_2(sidecar, quotactl: Run) -> None:
    """AC-10, MK-2: deleting contacts lowers the count at once; the cycle's peak, on which
    overage is billed, stays and is shown."""
    quotactl("plan", "set", TENANT, "--preset", "contact-limit", "--limit", "5")
    _add(sidecar, ["a", "b", "c"])
    _record(sidecar, pb.ACTIVITY_KIND_CONTACT_DELETED, ["a", "b"])
    shown = fields(quotactl("usage", TENANT)[1])
    assert (shown["active contacts"], shown["peak contacts"]) == ("1 / 5 (20%)", "3")
    usage = json.loads(quotactl("usage", TENANT, "--json")[1])["usage"]
    assert (usage["active_contacts"], usage["peak_contacts"]) == (1, 3)


def test_plan_set_help_names_every_preset_and_the_new_option(capsys: pytest.CaptureFixture[str]) -> None:
    """MK-1, CR-3: `plan set --help` lists the four presets and --marketing-contacts-only."""
    assert main(["plan", "set", "--help"]) == 0
    text = "".join(capsys.readouterr().out.split())
    assert all(preset in text for preset in PRESETS)
    assert "--marketing-contacts-only" in text


def test_server_errors_exit_1_with_one_line(sidecar, quotactl: Run, run_at: Callable[..., Run]) -> None:
    status, out, err = quotactl("usage", "no-such-tenant")
    assert (status, out) == (EXIT_SERVER_ERROR, "")
    assert err == "quotactl: NOT_FOUND: tenant 'no-such-tenant' has no plan\n"

    status, _, err = quotactl("check", TENANT, "")
    assert status == EXIT_SERVER_ERROR
    assert err.startswith("quotactl: INVALID_ARGUMENT: ") and "contact_id" in err

    status, _, err = run_at(sidecar.address)("plan", "get", TENANT)
    assert status == EXIT_SERVER_ERROR and err.startswith("quotactl: UNAUTHENTICATED: ")
    status, _, err = run_at(sidecar.address, "wrong")("plan", "get", TENANT)
    assert status == EXIT_SERVER_ERROR and err.startswith("quotactl: PERMISSION_DENIED: ")


def test_address_and_token_come_from_the_environment(
    sidecar, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], free_address: str
) -> None:
    monkeypatch.setenv(ADDRESS_ENV, sidecar.address)
    monkeypatch.setenv(ADMIN_TOKEN_ENV, sidecar.admin_token)
    assert main(PLAN_SET) == 0
    monkeypatch.setenv(ADDRESS_ENV, free_address)
    assert main(["usage", TENANT]) == EXIT_UNREACHABLE
    assert main(["usage", TENANT, "--address", sidecar.address]) == 0
    assert "active contacts   0 / 3 (0%)" in capsys.readouterr().out


def test_the_token_comes_from_a_file_named_by_flag_or_environment(
    sidecar, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Issue 14.12: `--admin-token-file` / QUOTA_ADMIN_TOKEN_FILE keep the token out of the
    command line (the trailing newline of the file is not part of it); a file that cannot
    be read, or a token given both ways, is bad usage with one line."""
    token = tmp_path / "token"
    token.write_text(f"{sidecar.admin_token}\n")
    monkeypatch.setenv(ADDRESS_ENV, sidecar.address)
    assert main([*PLAN_SET, "--admin-token-file", str(token)]) == 0
    monkeypatch.setenv(ADMIN_TOKEN_FILE_ENV, str(token))
    assert main(["plan", "get", TENANT]) == 0
    capsys.readouterr()
    missing = tmp_path / "missing"
    assert main(["plan", "get", TENANT, "--admin-token-file", str(missing)]) == EXIT_USAGE
    assert (
        capsys.readouterr().err == f"quotactl: --admin-token-file: cannot read {missing}: No such file or directory\n"
    )
    monkeypatch.setenv(ADMIN_TOKEN_ENV, sidecar.admin_token)
    assert main(["plan", "get", TENANT]) == EXIT_USAGE
    assert capsys.readouterr().err == (
        "quotactl: --admin-token-file: --admin-token (or QUOTA_ADMIN_TOKEN) is given too; give one\n"
    )


def _installed_quotactl() -> str:
    found = shutil.which("quotactl", path=str(Path(sys.executable).parent)) or shutil.which("quotactl")
    assert found, "the quotactl console script is not installed (pip install -e .)"
    return found


def test_installed_console_script(sidecar, quotactl: Run, free_address: str) -> None:
    quotactl("check", TENANT, "c1")
    env = {**os.environ, ADDRESS_ENV: sidecar.address, ADMIN_TOKEN_ENV: sidecar.admin_token}
    done = subprocess.run(
        [_installed_quotactl(), "usage", TENANT, "--json"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["usage"]["active_contacts"] == 1

    env[ADDRESS_ENV] = free_address
    done = subprocess.run([_installed_quotactl(), "usage", TENANT], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == EXIT_UNREACHABLE
    assert done.stderr.startswith("quotactl: UNAVAILABLE: ")


def test_a_reader_that_stops_early_ends_quotactl_quietly(sidecar, quotactl: Run) -> None:
    """`quotactl active-contacts … --csv | head` (the contacts behind an invoice line, SG-2) ends
    without a traceback when the reader closes the pipe."""
    sidecar.put_plan(
        "big",
        metering=pb.METERING_CYCLE_ACTIVE,
        enforcement=pb.ENFORCEMENT_HARD,
        contact_limit=5_000,
        counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
    )
    sidecar.quota().CheckSendBatch(
        pb.CheckSendBatchRequest(
            tenant_id="big",
            channel=pb.CHANNEL_EMAIL,
            kind=pb.MESSAGE_KIND_CAMPAIGN,
            contact_ids=[f"contact-{i:05d}@example.com" for i in range(3_000)],
        ),
        timeout=30,
    )
    env = {**os.environ, ADDRESS_ENV: sidecar.address, ADMIN_TOKEN_ENV: sidecar.admin_token}
    proc = subprocess.Popen(
        [_installed_quotactl(), "active-contacts", "big", "--csv"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "contact_id,activated_at,activity,counted_until\n"
    proc.stdout.close()
    assert proc.wait(30) == EXIT_BROKEN_PIPE
    assert proc.stderr.read() == ""
    proc.stderr.close()


def test_events_lists_thresholds_crossed_and_follows_as_json_lines(sidecar, run_at: Callable[..., Run]) -> None:
    """CR-8 / MK-2 from the shell: the events kept, one tenant's or all, and JSON lines."""
    run = run_at(sidecar.address, sidecar.admin_token)
    for tenant in ("a", "b"):
        status, _, err = run(
            *f"plan set {tenant} --name P --metering CYCLE_ACTIVE --enforcement HARD".split(),
            *"--limit 4 --counted-kinds CAMPAIGN --notify 0.5,1.0".split(),
        )
        assert status == 0, err
    for contact in ("c1", "c2", "c3", "c4"):
        assert run("check", "a", contact)[0] == 0
    assert run("check", "b", "c1")[0] == 0
    assert run("check", "b", "c2")[0] == 0
    status, out, err = run("events")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "SEQ",
        "OCCURRED",
        "AT",
        "TENANT",
        "TYPE",
        "FIGURE",
        "THRESHOLD",
        "COUNT",
        "LIMIT",
        "STATE",
    ]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[2], r[3], r[5], r[6], r[7], r[8]) for r in rows] == [
        ("1", "a", "THRESHOLD_CROSSED", "0.5", "2", "4", "WARNING"),
        ("2", "a", "THRESHOLD_CROSSED", "1", "4", "4", "AT_LIMIT"),
        ("3", "b", "THRESHOLD_CROSSED", "0.5", "2", "4", "WARNING"),
    ]
    status, out, _ = run("events", "a", "--after", "1", "--json")
    assert status == 0
    (document,) = [json.loads(line) for line in out.splitlines()]
    assert (document["sequence"], document["tenant_id"], document["threshold"]) == (2, "a", 1.0)
    assert run("events", "nobody")[0] == 1


def test_version_names_the_installed_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 17 item 10: `quotactl --version` prints the version pip installed."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"quotactl {importlib.metadata.version('quota-sidecar')}"


def test_check_exit_status_is_opt_in_SG_2_AC_9(quotactl: Run) -> None:
    """SG-2, AC-9: a DENY or DEFER is an answer (exit 0); with --exit-status it is exit 4 for
    DENY and 5 for DEFER, after the usual output, and ALLOW stays 0."""
    for contact in ("c1", "c2", "c3"):
        status, _, _ = quotactl("check", TENANT, contact, "--exit-status")
        assert status == 0
    status, out, _ = quotactl("check", TENANT, "c4", "--exit-status")
    assert (status, fields(out)["decision"]) == (EXIT_DENY, "DENY")
    status, out, _ = quotactl("check", TENANT, "c4")
    assert (status, fields(out)["decision"]) == (0, "DENY")
    status, out, _ = quotactl("check", TENANT, "c5", "--kind", "AUTOMATION", "--exit-status", "--json")
    assert (status, json.loads(out)["decision"]) == (EXIT_NOT_NOW, "DECISION_DEFER")


def test_add_adds_contacts_and_an_import_is_all_or_nothing_AC_4(sidecar, run_at: Callable[..., Run]) -> None:
    """AC-4: `quotactl add` asks CheckContactAdd; an IMPORT past the limit adds nobody (DENY,
    exit 4 under --exit-status), one within it adds every contact, as GetContact then shows."""
    run = run_at(sidecar.address, sidecar.admin_token)
    plan = "plan set t2 --metering HELD_CONTACTS --enforcement HARD --limit 2 --source-rule IMPORT=REFUSE_IF_EXCEEDS"
    assert run(*plan.split())[0] == 0
    status, out, _ = run("add", "t2", "a", "b", "c", "--source", "IMPORT", "--exit-status")
    assert (status, fields(out)["decision"], fields(out)["added"]) == (EXIT_DENY, "DENY", "0")
    status, out, _ = run("add", "t2", "a", "b", "--source", "import", "--json")
    answer = json.loads(out)
    assert (status, answer["decision"], answer["added"]) == (0, "DECISION_ALLOW", 2)
    _, out, _ = run("contact", "t2", "b", "--json")
    assert json.loads(out)["contact"]["held"] is True


def test_activity_records_what_happened_CR_1(sidecar, quotactl: Run) -> None:
    """CR-1: `quotactl activity` records activity through RecordActivity; its answer and the
    tenant's figures afterwards agree with what the client reads."""
    status, out, _ = quotactl("activity", TENANT, "c7", "c8", "--kind", "MESSAGE_SENT", "--json")
    assert status == 0
    answer = json.loads(out)
    assert answer["recorded"] == 2
    with QuotaClient(sidecar.address) as client:
        usage = client.get_usage(TENANT)
    assert answer["usage"]["active_contacts"] == usage.active_contacts
    status, out, _ = quotactl("activity", TENANT, "c7", "--kind", "NOTE_ADDED")
    assert status == 0 and fields(out)["recorded"] == "1"


def test_enroll_answers_as_check_enroll_does_AC_8(sidecar, quotactl: Run) -> None:
    """AC-8: `quotactl enroll` asks CheckEnroll and reports its decision; counting nothing, it
    answers as the client's check_enroll does for the same contact, before and at the limit."""
    for contact in ("c1", "c2", "c3"):
        quotactl("check", TENANT, contact)
    with QuotaClient(sidecar.address) as client:
        for contact in ("c1", "c9"):
            expected = client.check_enroll(TENANT, contact, "welcome")
            status, out, _ = quotactl("enroll", TENANT, contact, "welcome", "--exit-status")
            assert (fields(out)["decision"], fields(out)["reason"]) == (expected.decision, expected.reason)
            assert status == {"ALLOW": 0, "DENY": EXIT_DENY}.get(expected.decision, EXIT_NOT_NOW)
        assert client.check_enroll(TENANT, "c1", "welcome").decision == "ALLOW"
        assert client.check_enroll(TENANT, "c9", "welcome").decision != "ALLOW"


@pytest.mark.parametrize("argv", [["usage", TENANT], ["check", TENANT, "c1"]])
def test_errors_are_one_json_object_on_stderr_under_json(
    free_address: str, run_at: Callable[..., Run], argv: list[str]
) -> None:
    """Issue 17 item 10: under --json an unreachable sidecar is exit 3 with one JSON object on stderr."""
    status, out, err = run_at(free_address, "token")("--json", *argv)
    assert (status, out) == (EXIT_UNREACHABLE, "")
    assert err.count("\n") == 1
    assert json.loads(err)["error"]["code"] == "UNAVAILABLE"


def test_a_refused_call_is_a_json_error_under_json(sidecar, run_at: Callable[..., Run]) -> None:
    """api.md Errors: a wrong admin token is PERMISSION_DENIED, exit 1, as a JSON object on stderr under --json."""
    status, out, err = run_at(sidecar.address, "not-the-token")("--json", "plan", "get", TENANT)
    assert (status, out) == (EXIT_SERVER_ERROR, "")
    error = json.loads(err)["error"]
    assert error["code"] == "PERMISSION_DENIED" and error["message"]
