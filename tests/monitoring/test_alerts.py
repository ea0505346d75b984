"""Issue 4: the alert rules under promtool, a real scrape under `promtool check metrics`, and
every metric that the rules and the Grafana dashboard name present in the sidecar's exposition."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from support.markdown import anchors, slug
from support.monitoring import ALERTS, REPO, RULES_DIR, dashboard, load_tenants
from support.sidecar import RunningSidecar

ALERTS_TEST = RULES_DIR / "alerts_test.yml"
EXAMPLE_CONFIG = RULES_DIR / "prometheus.yml"

ALERT_NAMES = {
    "QuotaTenantNearLimit",
    "QuotaTenantAtOrOverLimit",
    "QuotaTenantBlocked",
    "QuotaTenantInOverage",
    "QuotaSidecarDown",
    "QuotaSidecarNotServing",
    "QuotaLedgerCommitsSlow",
    "QuotaLedgerCommitsFailing",
    "QuotaDedupeFilterSaturated",
    "QuotaWebhookBacklog",
    "QuotaTenantSeriesOmitted",
}
SEVERITIES = {"page", "warning", "info"}


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC = re.compile(r"(?<![\w:])quota_[A-Za-z0-9_:]*")
_SERIES_SUFFIXES = ("_bucket", "_sum", "_count")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: install Debian's prometheus package (.ci/run does)")
    return subprocess.run([path, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_queries(node: object) -> Iterator[str]:
    """Every PromQL text in the dashboard: panel targets and templating queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item)


def metric_names(promql: str) -> set[str]:
    """The `quota_` metric names a PromQL text selects; string literals (label values) are skipped."""
    return set(_METRIC.findall(_STRING.sub('""', promql)))


def family_of(name: str) -> str:
    for suffix in _SERIES_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_alert_rules_pass_promtool_check() -> None:
    """Issue 4: monitoring/prometheus/alerts.yml is valid for `promtool check rules`."""
    assert_ok(promtool("check", "rules", str(ALERTS)))


def test_alert_unit_tests_pass_under_promtool() -> None:
    """Issue 4 "Done when": the alert tests pass under `promtool test rules`."""
    assert_ok(promtool("test", "rules", str(ALERTS_TEST)))


def test_example_prometheus_config_is_valid() -> None:
    """Issue 4: the example scrape config (and the rules it loads) pass `promtool check config`."""
    assert_ok(promtool("check", "config", str(EXAMPLE_CONFIG)))


MONITORING_PAGE = REPO / "docs" / "monitoring.md"


def test_every_alert_is_labelled_annotated_and_unit_tested() -> None:
    """Issue 4, issue 17 item 8: each alert has a severity, a summary, a description and a
    runbook_url leading to the alert's own section of docs/monitoring.md (a heading there),
    and alerts_test.yml shows it both firing and quiet."""
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERT_NAMES
    documented = anchors(MONITORING_PAGE)
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert {"summary", "description", "runbook_url"} <= rule["annotations"].keys(), rule["alert"]
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/monitoring.md" and anchor == slug(rule["alert"]), rule["alert"]
        assert anchor in documented, f"{rule['alert']}: no section #{anchor} in docs/monitoring.md"
    fires: set[str] = set()
    quiet: set[str] = set()
    for group in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in group["alert_rule_test"]:
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fires == ALERT_NAMES, f"never shown firing: {sorted(ALERT_NAMES - fires)}"
    assert quiet == ALERT_NAMES, f"never shown quiet: {sorted(ALERT_NAMES - quiet)}"


def test_a_real_scrape_passes_promtool_check_metrics(sidecar_with_metrics: RunningSidecar) -> None:
    """Issue 4: `promtool check metrics` finds no problem in a scrape of the sidecar after traffic."""
    load_tenants(sidecar_with_metrics.address, sidecar_with_metrics.auth)
    exposition = scrape(sidecar_with_metrics.metrics_url)
    result = promtool("check", "metrics", stdin=exposition)
    assert_ok(result)
    assert not (result.stdout.strip() or result.stderr.strip()), f"lint problems:\n{result.stdout}{result.stderr}"


def test_every_metric_in_the_rules_and_the_dashboard_is_exposed(sidecar_with_metrics: RunningSidecar) -> None:
    """Issue 4: every metric named in alerts.yml and in the Grafana dashboard is in the sidecar's
    exposition, with a tenant above the per-tenant ratio so that per-tenant series exist."""
    referenced: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            referenced.setdefault(name, set()).add(f"alert {rule['alert']}")
    for query in dashboard_queries(dashboard()):
        for name in metric_names(query):
            referenced.setdefault(name, set()).add("the dashboard")
    assert referenced, "no quota_ metric found in the rules or the dashboard"

    load_tenants(sidecar_with_metrics.address, sidecar_with_metrics.auth)
    exposed = {
        sample.name
        for family in text_string_to_metric_families(scrape(sidecar_with_metrics.metrics_url))
        for sample in family.samples
    }
    missing = {
        name: f"{family_of(name)} (in {', '.join(sorted(where))})"
        for name, where in sorted(referenced.items())
        if name not in exposed
    }
    assert not missing, "named but not exposed:\n" + "\n".join(missing.values())
