"""Issues 4 and 16: the deploy/ examples (one sidecar on SQLite; a fleet on PostgreSQL) and the Grafana files
agree with the image, the sidecar's settings and each other.

There is no Docker or Kubernetes engine (nor a Grafana server) where these tests run, so
nothing here starts a container: the files are validated statically. Every YAML and JSON
file must parse; images are pinned; the host paths compose mounts exist; the ports the
sidecar is given (read through the sidecar's own settings parser, flags over QUOTA_*
variables over the Dockerfile's ENV) match the Dockerfile's EXPOSE, the published and
container ports, the probes, the Prometheus scrape target and the prometheus.io
annotations; the Secret, PersistentVolumeClaim and volumes the pod names exist; the fleet's
ledger URL (the example Secret's, the compose environment's) builds the PostgreSQL ledger
and carries no password; and the
dashboard follows the conventions Grafana provisioning and the end-to-end test rely on
(stable uid, no numeric ids, the `datasource` variable everywhere, only known variables
in queries). The queries themselves are run against a real Prometheus elsewhere.
"""

from __future__ import annotations

import json
import re
import shlex
import tempfile
import tomllib
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from quota_sidecar.server.app import LIVENESS, READINESS
from quota_sidecar.server.ledger.factory import open_ledger
from quota_sidecar.server.ledger.postgres import PostgresLedger
from quota_sidecar.server.ledger.sqlite import sqlite_path
from quota_sidecar.server.probe import connectable_address
from quota_sidecar.server.settings import Settings, settings_from

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "deploy" / "compose.yaml"
COMPOSE_FLEET = REPO / "deploy" / "compose.postgres.yaml"
KUBERNETES = REPO / "deploy" / "kubernetes"
KUBERNETES_FLEET = REPO / "deploy" / "kubernetes-postgres"
KUSTOMIZATIONS = [KUBERNETES, KUBERNETES_FLEET]
POD_MONITOR = REPO / "deploy" / "prometheus-operator" / "podmonitor.yaml"
GRAFANA = REPO / "monitoring" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "quota-sidecar.json"
DASHBOARD_PROVIDER = GRAFANA / "provisioning" / "dashboards" / "quota-sidecar.yml"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"

SIDECAR_SERVICE = "quota-sidecar"
FLEET_SIDECARS = ("quota-sidecar-1", "quota-sidecar-2", "quota-sidecar-3")
POSTGRES_SERVICE = "postgres"
PROMETHEUS_JOB = "quota-sidecar"
PROMETHEUS_DEFAULT_CONFIG = "/etc/prometheus/prometheus.yml"
PROMETHEUS_PORT = 9090
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
VARIABLES = {"datasource", "job", "instance", "tenant"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval"}
TENANT_METRICS = {"quota_tenant_usage_ratio", "quota_tenant_usage_state"}
RATIO_METRICS = {
    "quota_tenant_usage_ratio",
    "quota_dedupe_filter_false_positive_ratio",
    "quota_dedupe_filter_false_positive_ratio_target",
}

YAML_FILES = sorted(
    [
        COMPOSE,
        COMPOSE_FLEET,
        DASHBOARD_PROVIDER,
        DATASOURCES,
        *KUBERNETES.glob("*.yaml"),
        *KUBERNETES_FLEET.glob("*.yaml"),
    ]
)


# ----------------------------------------------------------------------------- reading the files


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dockerfile_instructions(every_stage: bool = False) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage (of every stage with `every_stage`), continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    last_from = max(i for i, text in enumerate(logical) if text.upper().startswith("FROM "))
    instructions = []
    for text in logical[0 if every_stage else last_from :]:
        word, _, rest = text.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def dockerfile_exposed() -> set[int]:
    return {
        int(port.split("/")[0]) for word, rest in dockerfile_instructions() if word == "EXPOSE" for port in rest.split()
    }


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def dockerfile_json(instruction: str) -> list[str]:
    values = [rest for word, rest in dockerfile_instructions() if word == instruction]
    assert values, f"the Dockerfile has no {instruction}"
    return json.loads(values[-1])


def dockerfile_uid() -> int:
    users = [rest for word, rest in dockerfile_instructions() if word == "USER"]
    assert users, "the Dockerfile sets no USER"
    return int(users[-1].split(":")[0])


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def host_of(address: str) -> str:
    return address.rpartition(":")[0].strip("[]")


def sidecar_settings(argv: list[str], environment: Mapping[str, str]) -> Settings:
    """What the sidecar would run with: the image's CMD/ENTRYPOINT, its ENV, then the given argv and environment."""
    entrypoint = dockerfile_json("ENTRYPOINT")
    assert entrypoint == ["quota-sidecar"], f"the image's entrypoint changed: {entrypoint}"
    argv = argv or dockerfile_json("CMD")
    assert argv[0] == "serve", f"the sidecar is not started with `serve`: {argv}"
    return settings_from(argv[1:], {**dockerfile_env(), **environment})


# ----------------------------------------------------------------------------- compose


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


def compose(path: Path = COMPOSE) -> dict[str, Any]:
    return load_yaml(path)


def services(path: Path = COMPOSE) -> dict[str, Any]:
    return compose(path)["services"]


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment, each ${VAR...} interpolation replaced by a non-blank stand-in."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: _INTERPOLATION.sub(lambda m: f"stand-in-for-{m.group(1)}", str(value)) for name, value in env.items()}


def command_of(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def bind_mounts(service: Mapping[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of a service's bind mounts, host paths resolved against deploy/."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((COMPOSE.parent / source).resolve(), target))
    return mounts


def host_path(service: Mapping[str, Any], container_path: str) -> Path:
    """The repository file a container path of `service` shows, through its bind mounts."""
    wanted = PurePosixPath(container_path)
    for source, target in bind_mounts(service):
        mounted = PurePosixPath(target)
        if wanted == mounted or mounted in wanted.parents:
            return source / wanted.relative_to(mounted)
    raise AssertionError(f"{container_path} is not inside any bind mount of the service")


def container_ports(service: Mapping[str, Any]) -> set[int]:
    return {int(str(published).split(":")[-1].split("/")[0]) for published in service.get("ports", [])}


def compose_sidecar_settings() -> Settings:
    return sidecar_settings(command_of(services()[SIDECAR_SERVICE]), environment_of(services()[SIDECAR_SERVICE]))


def prometheus_config() -> tuple[Path, dict[str, Any]]:
    prometheus = services()["prometheus"]
    flags = [word.split("=", 1)[1] for word in command_of(prometheus) if word.startswith("--config.file=")]
    path = host_path(prometheus, flags[-1] if flags else PROMETHEUS_DEFAULT_CONFIG)
    assert path.is_file(), f"Prometheus would read {path}, which does not exist"
    return path, load_yaml(path)


def scrape_job(config: Mapping[str, Any]) -> dict[str, Any]:
    jobs = [job for job in config.get("scrape_configs", []) if job["job_name"] == PROMETHEUS_JOB]
    assert len(jobs) == 1, f"expected one scrape job named {PROMETHEUS_JOB}, got {len(jobs)}"
    return jobs[0]


# ----------------------------------------------------------------------------- kubernetes


def manifests(directory: Path = KUBERNETES) -> list[dict[str, Any]]:
    documents = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        documents.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return documents


def of_kind(kind: str, directory: Path = KUBERNETES) -> list[dict[str, Any]]:
    return [doc for doc in manifests(directory) if doc["kind"] == kind]


def pod_spec(directory: Path = KUBERNETES) -> dict[str, Any]:
    (deployment,) = of_kind("Deployment", directory)
    return deployment["spec"]["template"]["spec"]


def pod_containers(directory: Path = KUBERNETES) -> list[dict[str, Any]]:
    spec = pod_spec(directory)
    return [*spec.get("initContainers", []), *spec["containers"]]


def sidecar_container(directory: Path = KUBERNETES) -> dict[str, Any]:
    found = [c for c in pod_containers(directory) if c["name"] == "quota-sidecar"]
    assert len(found) == 1, "the pod has no container named quota-sidecar"
    return found[0]


def example_secret_value(directory: Path, ref: Mapping[str, str]) -> str:
    """The value a secretKeyRef reads from the example Secret beside the manifests (secret.yaml)."""
    secrets = {doc["metadata"]["name"]: doc for doc in of_kind("Secret", directory)}
    assert ref["name"] in secrets, f"no Secret {ref['name']}"
    return {**secrets[ref["name"]].get("data", {}), **secrets[ref["name"]].get("stringData", {})}[ref["key"]]


def sidecar_environment(directory: Path = KUBERNETES, mounted: Path | None = None) -> dict[str, str]:
    """The sidecar container's environment, secretKeyRefs read from the example Secrets. With
    `mounted`, the Secret volumes the sidecar mounts are written under it as the kubelet
    would (a file per key, at mountPath under `mounted`) and paths into them point there."""
    moved: dict[str, str] = {}
    if mounted is not None:
        volumes = {v["name"]: v for v in pod_spec(directory).get("volumes", [])}
        for mount in sidecar_container(directory).get("volumeMounts", []):
            secret = volumes[mount["name"]].get("secret")
            if secret is None:
                continue
            target = mounted / mount["mountPath"].lstrip("/")
            target.mkdir(parents=True)
            (doc,) = [d for d in of_kind("Secret", directory) if d["metadata"]["name"] == secret["secretName"]]
            for key, value in {**doc.get("data", {}), **doc.get("stringData", {})}.items():
                (target / key).write_text(value)
            moved[mount["mountPath"]] = str(target)
    env = {}
    for e in sidecar_container(directory).get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            env[e["name"]] = example_secret_value(directory, ref)
        else:
            value = e.get("value", f"stand-in-for-{e['name']}")
            for path, target in moved.items():
                if value.startswith(path + "/"):
                    value = target + value.removeprefix(path)
            env[e["name"]] = value
    return env


def kubernetes_sidecar_settings(directory: Path = KUBERNETES) -> Settings:
    """The settings the sidecar container runs with, its Secret volumes mounted."""
    container = sidecar_container(directory)
    argv = [*container.get("command", [])[1:], *container.get("args", [])]
    with tempfile.TemporaryDirectory() as mounted:
        return sidecar_settings(argv, sidecar_environment(directory, Path(mounted)))


# ----------------------------------------------------------------------------- the dashboard


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def targets() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in all_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            yield panel, target


def walk(node: Any, path: str = "$") -> Iterator[tuple[str, Any, Any]]:
    """(path, key, value) of every key in a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}[{index}]")


def walk_datasource_refs() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, key, value in walk(dashboard()):
        if key == "datasource" and isinstance(value, dict):
            yield path, key, value


def metric_selectors(expr: str) -> Iterator[tuple[str, str]]:
    """(metric name, label matchers) of every quota_* and process_* selector in a PromQL expression."""
    for match in re.finditer(r"\b((?:quota|process)_\w+)(\{([^}]*)\})?", expr):
        yield match.group(1), match.group(3) or ""


# ============================================================================= tests: parsing


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_parses(path: Path) -> None:
    """Issue 4: every deploy/ and provisioning YAML file parses (each document of it)."""
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert documents, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in documents)


def test_the_deploy_files_are_where_the_docs_say() -> None:
    """Issue 4 and 16: the compose files and Kubernetes examples (SQLite and PostgreSQL), the dashboard and both
    provisioning files exist."""
    kustomizations = [directory / "kustomization.yaml" for directory in KUSTOMIZATIONS]
    for path in (COMPOSE, COMPOSE_FLEET, DASHBOARD, DASHBOARD_PROVIDER, DATASOURCES, POD_MONITOR, *kustomizations):
        assert path.is_file(), f"missing {path.relative_to(REPO)}"


# ============================================================================= tests: compose


def test_compose_runs_the_sidecar_prometheus_and_grafana() -> None:
    """Issue 4: compose has the sidecar (built from the repository's Dockerfile), Prometheus and Grafana."""
    assert set(services()) == {SIDECAR_SERVICE, "prometheus", "grafana"}
    build = services()[SIDECAR_SERVICE]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context / build.get("dockerfile", "Dockerfile") == DOCKERFILE


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_FLEET], ids=lambda p: p.name)
def test_compose_images_are_pinned(path: Path) -> None:
    """Issue 4, issue 17 item 11: every image pulled from a registry is pinned by digest beside
    its tag (`name:tag@sha256:...`, never `latest`), so the example runs exactly what was
    written for; the image built from this tree (each service with `build`) is tagged with the
    project's version."""
    for name, service in services(path).items():
        image = service.get("image")
        assert image, f"service {name} names no image"
        if "build" in service:
            assert image.rpartition(":")[2] == project_version(), f"service {name}: {image}"
            continue
        pinned = re.fullmatch(r"([\w./-]+):([\w.-]+)@sha256:([0-9a-f]{64})", image)
        assert pinned, f"service {name}: {image} is not name:tag@sha256:<digest>"
        assert pinned.group(2) != "latest", f"service {name}: {image}"
    assert any("build" in service for service in services(path).values())


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_FLEET], ids=lambda p: p.name)
def test_compose_sidecars_are_confined_as_in_kubernetes(path: Path) -> None:
    """Issue 17 item 11: each sidecar service runs on a read-only root filesystem (temporary
    files in a tmpfs, the SQLite ledger on its volume), without capabilities and unable to
    gain privileges, as the Kubernetes examples' securityContext says."""
    sidecars = {name: s for name, s in services(path).items() if "build" in s}
    assert sidecars
    for name, service in sidecars.items():
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert "/tmp" in service.get("tmpfs", []), name
        mounts = [v.split(":")[1] for v in service.get("volumes", [])]
        ledger = service["environment"]["QUOTA_LEDGER"]
        if ledger.startswith("sqlite:"):
            assert any(sqlite_path(ledger).is_relative_to(m) for m in mounts), f"{name}: the ledger is not on a volume"


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_FLEET], ids=lambda p: p.name)
def test_compose_mounts_only_paths_that_exist_in_the_repository(path: Path) -> None:
    """Issue 4: every host path compose mounts exists in the repository; named volumes are declared."""
    declared = set(compose(path).get("volumes") or {})
    for name, service in services(path).items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                host = (path.parent / source).resolve()
                assert host.exists(), f"service {name} mounts {source}, which does not exist"
                assert REPO in host.parents, f"service {name} mounts {source}, outside the repository"
            else:
                assert source in declared, f"service {name} uses volume {source}, not declared under volumes:"


def test_compose_sidecar_listens_where_the_image_exposes_and_publishes() -> None:
    """Issue 4: the sidecar's gRPC and metrics ports (as its settings resolve them) are the EXPOSEd ones,
    bound on every interface (Prometheus scrapes from another container), and are the container ports published."""
    settings = compose_sidecar_settings()
    ports = {port_of(settings.address), port_of(settings.metrics_address)}
    assert ports == dockerfile_exposed()
    assert host_of(settings.address) == "0.0.0.0"
    assert host_of(settings.metrics_address) == "0.0.0.0"
    assert container_ports(services()[SIDECAR_SERVICE]) == ports


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_FLEET], ids=lambda p: p.name)
def test_compose_publishes_ports_on_loopback_only(path: Path) -> None:
    """Issue 4: the example publishes nothing beyond the host's loopback (the data-plane RPCs take no credential)."""
    for name, service in services(path).items():
        for published in service.get("ports", []):
            assert str(published).startswith("127.0.0.1:"), f"service {name} publishes {published} on every interface"


def test_compose_ledger_is_on_a_named_volume() -> None:
    """Issue 4: the ledger file is on a named volume, so it outlives the container."""
    ledger = PurePosixPath(sqlite_path(compose_sidecar_settings().ledger).as_posix())
    named = [
        volume.split(":")[1]
        for volume in services()[SIDECAR_SERVICE].get("volumes", [])
        if not volume.startswith((".", "/"))
    ]
    assert any(PurePosixPath(target) in ledger.parents for target in named), f"{ledger} is not on a named volume"


def test_compose_health_probe_asks_the_bound_grpc_port() -> None:
    """Issue 4: the image's HEALTHCHECK (the probe reads QUOTA_ADDRESS) reaches the port the sidecar binds."""
    healthcheck = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    assert healthcheck and "quota_sidecar.server.probe" in healthcheck[-1]
    sidecar = services()[SIDECAR_SERVICE]
    env = {**dockerfile_env(), **environment_of(sidecar)}
    probed = connectable_address(env["QUOTA_ADDRESS"])
    assert port_of(probed) == port_of(compose_sidecar_settings().address)
    assert host_of(probed) in ("127.0.0.1", "localhost")


def test_compose_asks_for_the_admin_token_instead_of_writing_one_down() -> None:
    """Issue 4: no admin token is committed; compose refuses to start until QUOTA_ADMIN_TOKEN is set."""
    value = services()[SIDECAR_SERVICE]["environment"]["QUOTA_ADMIN_TOKEN"]
    assert re.fullmatch(r"\$\{QUOTA_ADMIN_TOKEN:\?[^}]+\}", value), value


def test_compose_fleet_runs_three_sidecars_beside_postgresql() -> None:
    """Issue 16: compose.postgres.yaml runs PostgreSQL and three sidecars built from the repository's Dockerfile,
    each listening where the image EXPOSEs on every interface and published on ports of its own."""
    fleet = services(COMPOSE_FLEET)
    assert set(fleet) == {POSTGRES_SERVICE, *FLEET_SIDECARS}
    published: list[str] = []
    for name in FLEET_SIDECARS:
        build = fleet[name]["build"]
        assert (COMPOSE_FLEET.parent / build["context"]).resolve() / build.get("dockerfile", "Dockerfile") == DOCKERFILE
        settings = sidecar_settings(command_of(fleet[name]), environment_of(fleet[name]))
        ports = {port_of(settings.address), port_of(settings.metrics_address)}
        assert ports == dockerfile_exposed() == container_ports(fleet[name])
        assert host_of(settings.address) == host_of(settings.metrics_address) == "0.0.0.0"
        published += [str(p).rsplit(":", 1)[0] for p in fleet[name]["ports"]]
    assert len(published) == len(set(published)), f"two sidecars publish one host port: {published}"


def test_compose_fleet_ledger_is_the_postgresql_service() -> None:
    """Issue 16: every sidecar's ledger is a libpq URL naming the postgres service, its database and user, with
    no password in it (PGPASSWORD carries it, the one compose asks for, as the server's); the sidecars wait for
    the server's health check; the database is on a named volume and published nowhere; synchronous_commit is
    left on; no credential is written down."""
    fleet = services(COMPOSE_FLEET)
    postgres = fleet[POSTGRES_SERVICE]
    server_env = postgres["environment"]
    password = server_env["POSTGRES_PASSWORD"]
    assert re.fullmatch(r"\$\{QUOTA_PG_PASSWORD:\?[^}]+\}", password), password
    assert "healthcheck" in postgres and not postgres.get("ports")
    assert any(
        v.split(":")[1] == "/var/lib/postgresql/data" for v in postgres["volumes"] if not v.startswith((".", "/"))
    )
    assert "synchronous_commit" not in " ".join([*command_of(postgres), *map(str, server_env.values())])
    for name in FLEET_SIDECARS:
        env = fleet[name]["environment"]
        url = sidecar_settings(command_of(fleet[name]), environment_of(fleet[name])).ledger
        parts = urllib.parse.urlsplit(url)
        assert parts.scheme in ("postgresql", "postgres") and parts.password is None, url
        assert (parts.hostname, parts.username, parts.path.lstrip("/")) == (
            POSTGRES_SERVICE,
            server_env["POSTGRES_USER"],
            server_env["POSTGRES_DB"],
        )
        assert isinstance(open_ledger(url), PostgresLedger)
        assert env["PGPASSWORD"] == password
        assert re.fullmatch(r"\$\{QUOTA_ADMIN_TOKEN:\?[^}]+\}", env["QUOTA_ADMIN_TOKEN"])
        assert fleet[name]["depends_on"][POSTGRES_SERVICE]["condition"] == "service_healthy"


def test_the_image_serves_both_ledgers() -> None:
    """Issue 16: the image installs the postgres extra, so the one image runs on SQLite and on PostgreSQL."""
    runs = " ".join(rest for word, rest in dockerfile_instructions(every_stage=True) if word == "RUN")
    assert re.search(r"\[server,postgres\]", runs) and "quota_sidecar-" in runs, runs


def test_prometheus_scrapes_the_sidecars_metrics_port() -> None:
    """Issue 4: the Prometheus compose runs has one `quota-sidecar` job whose target is the sidecar service's
    metrics port, and the rule files it names are mounted beside it."""
    path, config = prometheus_config()
    targets = [t for static in scrape_job(config).get("static_configs", []) for t in static["targets"]]
    assert targets == [f"{SIDECAR_SERVICE}:{port_of(compose_sidecar_settings().metrics_address)}"]
    for rule_file in config.get("rule_files", []):
        assert (path.parent / rule_file).is_file(), f"{path.name} loads {rule_file}, which is not mounted beside it"
    assert config.get("rule_files"), "Prometheus loads no alert rules"


def test_grafana_sees_the_provisioning_and_the_dashboard() -> None:
    """Issue 4: Grafana's provisioning folder is mounted, the dashboard provider's path is where compose mounts
    the dashboards, and the home dashboard is the quota-sidecar one."""
    grafana = services()["grafana"]
    assert host_path(grafana, "/etc/grafana/provisioning") == GRAFANA / "provisioning"
    (provider,) = load_yaml(DASHBOARD_PROVIDER)["providers"]
    assert provider["type"] == "file"
    assert host_path(grafana, provider["options"]["path"]) == DASHBOARD.parent
    home = environment_of(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home) == DASHBOARD


def test_grafana_datasource_is_the_compose_prometheus() -> None:
    """Issue 4: the provisioned datasource is the compose Prometheus, with a fixed uid the dashboard never names,
    and the scrape interval Prometheus uses (so $__rate_interval spans enough scrapes)."""
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://prometheus:{PROMETHEUS_PORT}"
    assert PROMETHEUS_PORT in container_ports(services()["prometheus"])
    assert source["uid"] and source["uid"] not in {ref["uid"] for _, _, ref in walk_datasource_refs()}
    _, config = prometheus_config()
    interval = scrape_job(config).get("scrape_interval") or config["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == interval


# ============================================================================= tests: kubernetes


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_kustomization_lists_every_manifest_but_the_example_secret(directory: Path) -> None:
    """Issue 4: `kubectl apply -k deploy/kubernetes` applies every manifest, except the Secret whose token is a
    placeholder (it is created with kubectl create secret instead)."""
    listed = load_yaml(directory / "kustomization.yaml")["resources"]
    for name in listed:
        assert (directory / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    on_disk = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk - {"secret.yaml"}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_every_manifest_names_its_api_kind_and_name(directory: Path) -> None:
    """Issue 4: each Kubernetes document has apiVersion, kind and metadata.name."""
    for doc in manifests(directory):
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), doc


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_pod_runs_a_worker_beside_the_sidecar(directory: Path) -> None:
    """Issue 4: the pod runs the user's worker and the sidecar (at the project's version), the worker dialing it
    on localhost; a sidecar declared as an init container keeps running (restartPolicy Always) instead of
    blocking the worker."""
    names = {c["name"] for c in pod_containers(directory)}
    assert names == {"mail-worker", "quota-sidecar"}
    assert sidecar_container(directory)["image"].endswith(f"/quota-sidecar:{project_version()}")
    grpc_port = port_of(kubernetes_sidecar_settings(directory).address)
    (worker,) = pod_spec(directory)["containers"]
    dials = [e["value"] for e in worker.get("env", []) if str(e.get("value", "")).startswith("localhost:")]
    assert dials == [f"localhost:{grpc_port}"]
    if sidecar_container(directory) in pod_spec(directory).get("initContainers", []):
        assert sidecar_container(directory)["restartPolicy"] == "Always"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_sidecar_container_ports_match_its_flags_and_the_image(directory: Path) -> None:
    """Issue 4: the container ports are the gRPC and metrics ports the flags give, which the image EXPOSEs,
    both bound on every interface (the kubelet probes and Prometheus scrapes the pod's IP)."""
    settings = kubernetes_sidecar_settings(directory)
    ports = {p["name"]: p["containerPort"] for p in sidecar_container(directory)["ports"]}
    assert ports == {"grpc": port_of(settings.address), "metrics": port_of(settings.metrics_address)}
    assert set(ports.values()) == dockerfile_exposed()
    assert host_of(settings.address) == "0.0.0.0"
    assert host_of(settings.metrics_address) == "0.0.0.0"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_sidecar_probes_ask_the_grpc_health_service_on_the_grpc_port(directory: Path) -> None:
    """Issue 4: readiness and liveness (and startup) are native gRPC probes on the port gRPC
    listens on. Issue 17 item 3: liveness asks for the name that stays SERVING while the
    ledger fails (LIVENESS), readiness and startup for the one that does not (READINESS)."""
    grpc_port = port_of(kubernetes_sidecar_settings(directory).address)
    container = sidecar_container(directory)
    assert {"readinessProbe", "livenessProbe"} <= set(container)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in container:
            assert container[probe]["grpc"]["port"] == grpc_port, probe
    asked = {probe: container[probe]["grpc"].get("service", "") for probe in ("readinessProbe", "livenessProbe")}
    assert asked == {"readinessProbe": READINESS, "livenessProbe": LIVENESS}
    assert container.get("startupProbe", {}).get("grpc", {}).get("service", READINESS) == READINESS


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_pod_is_annotated_for_scraping_on_the_metrics_port(directory: Path) -> None:
    """Issue 4: prometheus.io/scrape, port (the metrics port the flags give) and path annotate the pod."""
    (deployment,) = of_kind("Deployment", directory)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port_of(kubernetes_sidecar_settings(directory).metrics_address))
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_the_pod_monitor_scrapes_the_metrics_port_as_the_job_the_alerts_expect(directory: Path) -> None:
    """Issue 17 item 8: for the Prometheus Operator, deploy/prometheus-operator/podmonitor.yaml
    selects the example's pods by their labels, scrapes the sidecar's port named `metrics` at
    the annotated path, and names the job as alerts.yml and the dashboard expect."""
    (monitor,) = list(yaml.safe_load_all(POD_MONITOR.read_text()))
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    (deployment,) = of_kind("Deployment", directory)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in sidecar_container(directory)["ports"]}
    assert endpoint["port"] in ports
    assert ports[endpoint["port"]] == port_of(kubernetes_sidecar_settings(directory).metrics_address)
    assert endpoint["path"] == deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    assert {"action": "replace", "targetLabel": "job", "replacement": PROMETHEUS_JOB} in endpoint["relabelings"]
    assert f'job="{PROMETHEUS_JOB}"' in (REPO / "monitoring" / "prometheus" / "alerts.yml").read_text()


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_the_admin_token_comes_from_a_mounted_file_and_the_pod_has_no_api_token(directory: Path) -> None:
    """Issue 17 item 11: the sidecar reads the admin token from the Secret mounted read-only
    (QUOTA_ADMIN_TOKEN_FILE), never from a variable; the file is readable by the pod's group,
    which the sidecar's user is in; and no service account token is mounted into the pod."""
    spec = pod_spec(directory)
    assert spec["automountServiceAccountToken"] is False
    env = {e["name"]: e for e in sidecar_container(directory).get("env", [])}
    assert "QUOTA_ADMIN_TOKEN" not in env
    (secret,) = [d for d in of_kind("Secret", directory) if d["metadata"]["name"] == "quota-sidecar-admin"]
    assert kubernetes_sidecar_settings(directory).admin_token == secret["stringData"]["admin-token"]
    mounts = {m["name"]: m for m in sidecar_container(directory)["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    (token_volume,) = [
        name for name, v in volumes.items() if v.get("secret", {}).get("secretName") == "quota-sidecar-admin"
    ]
    assert mounts[token_volume]["readOnly"] is True
    assert env["QUOTA_ADMIN_TOKEN_FILE"]["value"].startswith(mounts[token_volume]["mountPath"] + "/")
    mode = volumes[token_volume]["secret"]["defaultMode"]
    assert mode & 0o040 and not mode & 0o007, oct(mode)
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_network_policy_admits_the_metrics_port_and_not_grpc(directory: Path) -> None:
    """Issue 4: other pods reach the metrics port; the unauthenticated gRPC port stays for the worker beside it."""
    settings = kubernetes_sidecar_settings(directory)
    (policy,) = of_kind("NetworkPolicy", directory)
    (deployment,) = of_kind("Deployment", directory)
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    admitted = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert port_of(settings.metrics_address) in admitted
    assert port_of(settings.address) not in admitted


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_secrets_claims_and_volumes_the_pod_names_exist(directory: Path) -> None:
    """Issue 4: each secretKeyRef names a Secret and key defined beside it, each claim a PVC there,
    and each volumeMount a volume of the pod."""
    secrets = {doc["metadata"]["name"]: doc for doc in of_kind("Secret", directory)}
    claims = {doc["metadata"]["name"] for doc in of_kind("PersistentVolumeClaim", directory)}
    volumes = {v["name"]: v for v in pod_spec(directory).get("volumes", [])}
    for container in pod_containers(directory):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] in secrets, f"no Secret {ref['name']}"
                secret = secrets[ref["name"]]
                assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container['name']} mounts unknown volume {mount['name']}"
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims


def assert_sidecar_runs_as_the_images_user(directory: Path) -> None:
    """The sidecar runs as the image's non-root uid, on a read-only root filesystem, with a memory limit."""
    container = sidecar_container(directory)
    security = {**pod_spec(directory).get("securityContext", {}), **container.get("securityContext", {})}
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == dockerfile_uid()
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert "memory" in container["resources"]["limits"]


def test_sidecar_keeps_its_ledger_on_the_claim_and_runs_as_the_images_user() -> None:
    """Issue 4: the ledger file is on the PVC-backed volume, so the root filesystem can be read-only; the sidecar
    runs as the image's non-root uid; one replica, replaced with Recreate (the ledger has one writer)."""
    container = sidecar_container()
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    ledger = PurePosixPath(sqlite_path(kubernetes_sidecar_settings().ledger).as_posix())
    on_claim = [
        m
        for m in container["volumeMounts"]
        if "persistentVolumeClaim" in volumes[m["name"]] and PurePosixPath(m["mountPath"]) in ledger.parents
    ]
    assert on_claim, f"{ledger} is not on a PersistentVolumeClaim"
    assert_sidecar_runs_as_the_images_user(KUBERNETES)
    (deployment,) = of_kind("Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_the_fleet_runs_three_replicas_on_a_postgresql_url_from_a_secret() -> None:
    """Issue 16: deploy/kubernetes-postgres runs 3 replicas (rolled one by one: every pod may write) whose
    sidecars read the ledger's libpq URL from a Secret, the password apart from it (PGPASSWORD, from the Secret
    too, so it is never part of a URL a log line could show); the URL builds the PostgreSQL ledger; no volume
    holds a ledger; at most one pod is taken down at a time; the sidecar runs as the image's user."""
    (deployment,) = of_kind("Deployment", KUBERNETES_FLEET)
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in sidecar_container(KUBERNETES_FLEET)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert {"QUOTA_LEDGER", "PGPASSWORD"} <= set(refs)
    url = kubernetes_sidecar_settings(KUBERNETES_FLEET).ledger
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme in ("postgresql", "postgres") and parts.password is None, url
    assert isinstance(open_ledger(url), PostgresLedger)
    assert not of_kind("PersistentVolumeClaim", KUBERNETES_FLEET)
    assert all("secret" in volume for volume in pod_spec(KUBERNETES_FLEET).get("volumes", []))
    (budget,) = of_kind("PodDisruptionBudget", KUBERNETES_FLEET)
    assert budget["spec"]["maxUnavailable"] == 1
    assert (
        budget["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert_sidecar_runs_as_the_images_user(KUBERNETES_FLEET)


# ============================================================================= tests: the dashboard


def test_dashboard_has_a_stable_uid_and_no_numeric_ids() -> None:
    """Issue 4: uid "quota-sidecar", top-level id null, and no integer id except panel ids, which are unique."""
    board = dashboard()
    assert board["uid"] == "quota-sidecar"
    assert board["title"] == "quota-sidecar"
    assert "id" in board and board["id"] is None
    panel_ids = [panel["id"] for panel in all_panels(board["panels"])]
    assert all(isinstance(i, int) for i in panel_ids)
    assert len(panel_ids) == len(set(panel_ids))
    panel_paths = set()
    for path, key, value in walk(board):
        if key == "panels":
            panel_paths.update(f"{path}.panels[{i}]" for i in range(len(value)))
    for path, key, value in walk(board):
        if key == "id" and isinstance(value, int):
            assert path in panel_paths, f"numeric id at {path}"


def test_dashboard_uses_the_datasource_variable_everywhere() -> None:
    """Issue 4: every panel, target and query variable uses {"type": "prometheus", "uid": "${datasource}"}."""
    board = dashboard()
    for panel in all_panels(board["panels"]):
        assert panel.get("datasource") == DATASOURCE_REF, panel["title"]
    for panel, target in targets():
        assert target.get("datasource") == DATASOURCE_REF, f"{panel['title']} {target.get('refId')}"
    for path, _, ref in walk_datasource_refs():
        assert ref == DATASOURCE_REF, path


def test_dashboard_templating_is_datasource_job_instance_and_tenant() -> None:
    """Issue 4, issue 17 item 8: the variables are exactly datasource (a Prometheus picker), then
    job, instance and tenant (multi, All), each narrowed by the ones before it."""
    board_variables = dashboard()["templating"]["list"]
    variables = {v["name"]: v for v in board_variables}
    assert [v["name"] for v in board_variables] == ["datasource", "job", "instance", "tenant"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert 'job=~"$job"' in variables["instance"]["definition"]
    assert 'job=~"$job", instance=~"$instance"' in variables["tenant"]["definition"]
    for name, metric in (
        ("job", "quota_build_info"),
        ("instance", "quota_build_info"),
        ("tenant", "quota_tenant_usage_ratio"),
    ):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["multi"] is True and variable["includeAll"] is True
        assert variable["datasource"] == DATASOURCE_REF
        assert re.fullmatch(rf"label_values\({metric}(\{{[^}}]*\}})?, {name}\)", variable["definition"])


def test_every_target_has_an_expression_ref_id_and_legend() -> None:
    """Issue 4: each target has a non-empty expr, a refId unique in its panel and a legendFormat."""
    for panel in all_panels(dashboard()["panels"]):
        ref_ids = [t["refId"] for t in panel.get("targets", [])]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel.get("targets", []):
            assert target.get("expr", "").strip(), f"{panel['title']}: empty expr"
            assert target.get("refId"), f"{panel['title']}: no refId"
            assert target.get("legendFormat"), f"{panel['title']} {target['refId']}: no legendFormat"
        if panel["type"] != "row":
            assert panel.get("targets"), f"{panel['title']} has no query"


def test_queries_use_only_the_known_variables_and_filter_on_them() -> None:
    """Issue 4, issue 17 item 8: a query names only $job, $instance, $tenant, $__rate_interval and
    $__interval, every selector filters on job=~"$job" and instance=~"$instance" (several
    Prometheus jobs may scrape sidecars, one per team or fleet), and the per-tenant series
    also on tenant=~"$tenant"."""
    panel_queries = [(f"{p['title']} {t['refId']}", t["expr"]) for p, t in targets()]
    variable_queries = [
        (f"variable {v['name']}", v["definition"]) for v in dashboard()["templating"]["list"] if "definition" in v
    ]
    for where, expr in panel_queries + variable_queries:
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= (VARIABLES - {"datasource"}) | GRAFANA_BUILTINS, f"{where}: {used}"
    for where, expr in panel_queries:
        for metric, matchers in metric_selectors(expr):
            assert 'job=~"$job"' in matchers, f"{where}: {metric} is not filtered on $job"
            assert 'instance=~"$instance"' in matchers, f"{where}: {metric} is not filtered on $instance"
            if metric in TENANT_METRICS:
                assert 'tenant=~"$tenant"' in matchers, f"{where}: {metric} is not filtered on $tenant"


def test_panels_show_ratios_as_percent_and_latencies_in_seconds() -> None:
    """Issue 4: a graph of a 0-1 ratio uses the percentunit unit; a graph of a *_seconds figure uses seconds."""
    for panel in all_panels(dashboard()["panels"]):
        if panel["type"] not in ("timeseries", "stat", "bargauge"):
            continue
        metrics = {m for t in panel["targets"] for m, _ in metric_selectors(t["expr"])}
        unit = panel["fieldConfig"]["defaults"].get("unit")
        if metrics and metrics <= RATIO_METRICS:
            assert unit == "percentunit", panel["title"]
        if metrics and all(re.search(r"_seconds(_bucket)?$", m) for m in metrics):
            assert unit == "s", panel["title"]
