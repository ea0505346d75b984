"""Issue 4 end to end: a real Prometheus (Debian's package) scrapes a real `quota-sidecar serve`
under load, runs every dashboard query and the alert rules, and warns of the tenant near its limit."""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc

from support.monitoring import ALERTS, FULL_TENANT, NEAR_TENANT, TENANTS, dashboard, load_tenants, panel_targets
from support.process import AUTH, Process, start
from support.serving import free_port

pytestmark = pytest.mark.process

PROMETHEUS = Path("/usr/bin/prometheus")
DEADLINE_SECONDS = 60
# What Grafana would put in place of the dashboard's variables: every job, instance and tenant.
VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "job": ".*", "instance": ".*", "tenant": ".*"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def grafana_substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in VARIABLES:
            raise AssertionError(f"the dashboard uses ${name}, which is not one of {sorted(VARIABLES)}: {expr}")
        return VARIABLES[name]

    return _VARIABLE.sub(value, expr)


@dataclass
class Prometheus:
    proc: subprocess.Popen
    url: str
    log: Path

    def get(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as response:
            return json.load(response)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_prometheus(tmp_path: Path, target: str) -> Prometheus:
    if not PROMETHEUS.is_file():
        pytest.fail(f"{PROMETHEUS} is missing: install Debian's prometheus package (.ci/run does)")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [{"job_name": "quota-sidecar", "static_configs": [{"targets": [target]}]}],
            }
        )
    )
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={address}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Prometheus(proc, f"http://{address}", log)


class Traffic:
    """A mail worker sending for `acme` (new and already active contacts) until stopped, so
    that every rate() has calls, decisions and commits between two scrapes."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.stopped = threading.Event()
        self.errors: list[grpc.RpcError] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            quota = pb_grpc.QuotaServiceStub(channel)
            n = 0
            while not self.stopped.wait(0.02):
                request = pb.CheckSendRequest(
                    tenant_id="acme",
                    contact_id=f"acme-{n % 60}",
                    channel=pb.CHANNEL_EMAIL,
                    kind=pb.MESSAGE_KIND_CAMPAIGN,
                )
                n += 1
                try:
                    quota.CheckSend(request, timeout=5)
                except grpc.RpcError as exc:
                    self.errors.append(exc)
                    return

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)


@dataclass
class Findings:
    """What Prometheus showed at the last poll; `missing` lists what is not there yet."""

    missing: list[str] = field(default_factory=list)
    near_limit_tenants: set[str] = field(default_factory=set)
    firing: list[dict] = field(default_factory=list)


def has_data(result: list[dict]) -> bool:
    """True when some series has a number (Grafana draws NaN as no data)."""
    values = [s["value"][1] for s in result if "value" in s]
    values += [v for s in result for _, v in s.get("values", [])]
    return any(not math.isnan(float(v)) for v in values)


def look(prometheus: Prometheus, queries: list[tuple[str, str]]) -> Findings:
    found = Findings()
    targets = prometheus.get("/api/v1/targets")["data"]["activeTargets"]
    health = [t["health"] for t in targets if t["labels"].get("job") == "quota-sidecar"]
    if health != ["up"]:
        found.missing.append(f"the quota-sidecar target is {health or 'not listed'}: {targets}")
    for title, expr in queries:
        try:
            answer = prometheus.get("/api/v1/query", query=expr)
        except urllib.error.HTTPError as exc:
            found.missing.append(f"panel {title!r}: {expr}\n    Prometheus refused it: {exc.read().decode()}")
            continue
        data = answer["data"]
        result = data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]
        if not has_data(result):
            found.missing.append(f"panel {title!r}: {expr}\n    no data: {result}")
    found.firing = [a for a in prometheus.get("/api/v1/alerts")["data"]["alerts"] if a["state"] == "firing"]
    found.near_limit_tenants = {
        a["labels"].get("tenant", "") for a in found.firing if a["labels"]["alertname"] == "QuotaTenantNearLimit"
    }
    if NEAR_TENANT not in found.near_limit_tenants:
        found.missing.append(f"QuotaTenantNearLimit is not firing for {NEAR_TENANT!r}")
    at_limit = {
        a["labels"].get("tenant") for a in found.firing if a["labels"]["alertname"] == "QuotaTenantAtOrOverLimit"
    }
    if FULL_TENANT not in at_limit:
        found.missing.append(f"QuotaTenantAtOrOverLimit is not firing for {FULL_TENANT!r}")
    return found


def test_prometheus_scrapes_the_sidecar_runs_every_panel_and_warns_of_the_tenant_near_its_limit(
    tmp_path: Path, processes: list[Process]
) -> None:
    """Issue 4 "Done when" (AC-1, CR-8, MK-2): a real Prometheus scrapes a running sidecar under a
    short load; the target is up, every dashboard panel's query returns data, QuotaTenantNearLimit
    fires for the tenant at 0.9 of its limit and for no other tenant, and QuotaTenantAtOrOverLimit
    for the tenant at its limit."""
    queries = [(title, grafana_substitute(expr)) for title, expr in panel_targets(dashboard())]
    assert queries, "the dashboard has no panel queries"
    sidecar = start(tmp_path / "ledger.db")
    processes.append(sidecar)
    sidecar.wait_serving()
    load_tenants(sidecar.address, AUTH)

    prometheus = start_prometheus(tmp_path, sidecar.metrics_address)
    try:
        with Traffic(sidecar.address) as traffic:
            found = Findings(missing=["Prometheus never became ready"])
            deadline = time.monotonic() + DEADLINE_SECONDS
            while time.monotonic() < deadline:
                if prometheus.proc.poll() is not None:
                    break
                if prometheus.ready():
                    found = look(prometheus, queries)
                    if not found.missing:
                        break
                time.sleep(0.5)
        assert not traffic.errors, f"the load got errors: {traffic.errors}"
        assert prometheus.proc.poll() is None, f"prometheus exited:\n{prometheus.log.read_text()[-3000:]}"
        assert not found.missing, f"after {DEADLINE_SECONDS}s:\n" + "\n".join(found.missing)
        assert found.near_limit_tenants == {NEAR_TENANT}, (
            f"QuotaTenantNearLimit fired for {sorted(found.near_limit_tenants)}; "
            f"tenants and (limit, contacts): {TENANTS}"
        )
    finally:
        prometheus.stop()
