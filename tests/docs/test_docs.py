"""Docs that tests keep honest: every setting, quotactl command and metric is in the README."""

from __future__ import annotations

import re
import urllib.request
from dataclasses import fields
from pathlib import Path

from support.sidecar import RunningSidecar

from quota_sidecar.client.cli import COMMANDS
from quota_sidecar.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_settings_table() -> None:
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        row = next((line for line in README.splitlines() if line.startswith(f"| `{flag}`")), None)
        assert row is not None, f"{flag} is not in the README's settings table"
        assert f"`QUOTA_{f.name.upper()}`" in row


def test_every_quotactl_command_is_documented() -> None:
    for command in COMMANDS:
        assert f"`{command}`" in README, f"quotactl {command} is not in the README"


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```sh\n(.+?)\n```", README, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c).strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_every_exposed_metric_is_documented(sidecar_with_metrics: RunningSidecar) -> None:
    text = urllib.request.urlopen(sidecar_with_metrics.metrics_url, timeout=5).read().decode()
    names = {m for m in re.findall(r"^# TYPE (quota_\w+) ", text, flags=re.M) if not m.endswith("_created")}
    assert names, "the sidecar exposes no quota_ metrics"
    for name in names:
        documented = {name, f"{name}_total"}
        assert any(f"`{n}" in README for n in documented), f"metric {name} is not in the README"
