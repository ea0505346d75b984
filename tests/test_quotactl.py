"""quotactl against the real sidecar (fixture `sidecar`): in-process through main(argv),
and once through the installed console script. Rule ids refer to domain.md."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from quota_sidecar.client.cli import (
    ADDRESS_ENV,
    ADMIN_TOKEN_ENV,
    COMMANDS,
    EXIT_SERVER_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    build_parser,
    main,
)

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


@pytest.fixture
def free_address() -> str:
    """An address where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


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
    assert out.splitlines()[0].split() == ["CONTACT", "ACTIVATED", "AT", "ACTIVITY"]
    assert out.splitlines()[-1] == "3 active contacts"

    rows = list(csv.DictReader(io.StringIO(quotactl("active-contacts", TENANT, "--csv")[1])))
    assert sorted(row["contact_id"] for row in rows) == ["c1", "c2", "c3"]
    assert all(row["activated_at"].endswith("Z") for row in rows)

    listed = json.loads(quotactl("active-contacts", TENANT, "--json")[1])
    assert sorted(contact["contact_id"] for contact in listed["contacts"]) == ["c1", "c2", "c3"]


def test_invoice_reports_unimplemented_in_one_line(quotactl: Run) -> None:
    status, out, err = quotactl("invoice", TENANT, "--json")
    assert (status, out) == (EXIT_SERVER_ERROR, "")
    assert err.startswith("quotactl: UNIMPLEMENTED: ") and len(err.splitlines()) == 1


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
