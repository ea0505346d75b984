"""The built wheel: what `pip install quota-sidecar` and the container image get.

Builds a wheel from a copy of the working tree once per module and checks that
it installs nothing but the `quota_sidecar` package (no bare `server`, `client`
or `quota` that could shadow other distributions), that it carries the
generated stubs with their type stubs, and that it declares both commands.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "quota_sidecar"
STUBS = [f"{PACKAGE}/api/v1/{name}" for name in ("quota_pb2.py", "quota_pb2.pyi", "quota_pb2_grpc.py")]
COMMANDS = {
    "quota-sidecar": "quota_sidecar.server.command:main",
    "quotactl": "quota_sidecar.client.cli:main",
}
# What the `server` extra adds, by distribution and by the top-level module each installs.
SERVER_DISTRIBUTIONS = {"rbloom", "sqlite-utils", "prometheus-client", "pyyaml"}
SERVER_MODULES = {"rbloom", "sqlite_utils", "prometheus_client", "yaml", "grpc_health", "grpc_reflection"}
# Local state that must not leak into the build (and would slow the copy down).
NOT_SOURCE_NAMES = (".git", ".venv", "node_modules", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")
NOT_SOURCES = shutil.ignore_patterns(*NOT_SOURCE_NAMES, "*.db*")


def build_requirements_installed() -> bool:
    """Whether this interpreter already has every [build-system] requirement, so no index is needed."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for text in requires:
        requirement = Requirement(text)
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        if not requirement.specifier.contains(installed, prereleases=True):
            return False
    return True


def build_from_a_copy(
    work: Path, command: list[str], isolation_off: str, ignore: Callable[[Any, list[str]], set[str]], glob: str
) -> Path:
    """Runs a build `command` (its output folder appended by the caller) on a copy of the checkout in
    `work`/src; returns the one artifact matching `glob` in `work`/dist. setuptools writes build/ and
    *.egg-info beside pyproject.toml; the copy keeps them out of the checkout."""
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=ignore)
    if build_requirements_installed():
        command = [*command, isolation_off]
    result = subprocess.run(
        [*command, str(source)], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, f"{' '.join(command[:4])} failed:\n{result.stdout}\n{result.stderr}"
    built = list((work / "dist").glob(glob))
    assert len(built) == 1, f"expected one {glob}, found {[p.name for p in (work / 'dist').iterdir()]}"
    return built[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    work = tmp_path_factory.mktemp("wheel")
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--disable-pip-version-check",
        "-w",
        str(work / "dist"),
    ]
    built = build_from_a_copy(work, command, "--no-build-isolation", NOT_SOURCES, "quota_sidecar-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def dist_info(archive: zipfile.ZipFile, name: str) -> str:
    matches = [n for n in archive.namelist() if n.endswith(f".dist-info/{name}") and n.count("/") == 1]
    assert len(matches) == 1, f"the wheel has {len(matches)} .dist-info/{name}"
    return archive.read(matches[0]).decode()


def test_only_quota_sidecar_is_importable_at_top_level(wheel: zipfile.ZipFile) -> None:
    top_level = {
        name.split("/")[0].removesuffix(".py")
        for name in wheel.namelist()
        if not name.split("/")[0].endswith((".dist-info", ".data"))
    }
    assert top_level == {PACKAGE}, f"the wheel installs top-level {sorted(top_level - {PACKAGE})}"
    data = [name for name in wheel.namelist() if name.split("/")[0].endswith(".data")]
    assert not data, f"the wheel installs files outside site-packages/{PACKAGE}: {data}"


def test_generated_stubs_and_type_stubs_are_inside(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    missing = [stub for stub in STUBS if stub not in names]
    assert not missing, f"the wheel lacks {missing}"
    generated = wheel.read(f"{PACKAGE}/api/v1/quota_pb2_grpc.py").decode()
    assert f"from {PACKAGE}.api.v1 import quota_pb2" in generated


def test_every_package_is_marked_typed(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    missing = [part for part in ("api", "server", "client") if f"{PACKAGE}/{part}/py.typed" not in names]
    assert not missing, f"the wheel has no py.typed in {missing}"


def test_the_client_still_offers_the_stubs_as_client_v1(wheel: zipfile.ZipFile) -> None:
    # Users import the stubs from quota_sidecar.client.v1; it re-exports quota_sidecar.api.v1.
    assert f"{PACKAGE}/client/v1/__init__.py" in wheel.namelist()


def test_health_probe_and_its_dependency_are_inside(wheel: zipfile.ZipFile) -> None:
    assert f"{PACKAGE}/server/probe.py" in wheel.namelist()
    assert "grpcio-health-checking" in {r.name for r in requirements(wheel)}


def requirements(archive: zipfile.ZipFile) -> list[Requirement]:
    metadata = dist_info(archive, "METADATA").splitlines()
    return [Requirement(line.split(":", 1)[1]) for line in metadata if line.startswith("Requires-Dist:")]


def test_the_base_distribution_requires_only_grpcio_and_protobuf(wheel: zipfile.ZipFile) -> None:
    """Issue 17 item 5: installing the client pulls grpcio and protobuf alone; the sidecar's
    dependencies come with the `server` extra, which `test` pulls in."""
    base = {r.name for r in requirements(wheel) if r.marker is None}
    assert base == {"grpcio", "protobuf"}
    server = {
        r.name.lower() for r in requirements(wheel) if r.marker is not None and r.marker.evaluate({"extra": "server"})
    }
    assert SERVER_DISTRIBUTIONS <= server
    test = [r for r in requirements(wheel) if r.marker is not None and r.marker.evaluate({"extra": "test"})]
    assert any(r.name == "quota-sidecar" and "server" in r.extras for r in test)


def test_the_client_installs_and_imports_without_the_server(
    wheel: zipfile.ZipFile, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Issue 17 item 5: the wheel, installed with its own requirements only (pip resolves
    grpcio and protobuf) in a fresh venv, imports quota_sidecar.client and its stubs, finds
    none of the server's modules, and `quota-sidecar` ends with one clear line."""
    work = tmp_path_factory.mktemp("bare")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, stdin=subprocess.DEVNULL)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    assert wheel.filename is not None
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", wheel.filename],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert installed.returncode == 0, installed.stderr
    probe = (
        "import importlib.util, quota_sidecar.client, quota_sidecar.client.v1.quota_pb2;"
        f"print(sorted(m for m in {sorted(SERVER_MODULES)!r} if importlib.util.find_spec(m)))"
    )
    imported = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"
    serve = subprocess.run(
        [str(bin_dir / "quota-sidecar"), "serve"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert serve.returncode == 2
    lines = serve.stderr.strip().splitlines()
    assert len(lines) == 1 and "quota-sidecar[server]" in lines[0], serve.stderr
    quotactl = subprocess.run([str(bin_dir / "quotactl"), "--help"], capture_output=True, text=True, timeout=60)
    assert quotactl.returncode == 0, quotactl.stderr


def test_commands_are_declared(wheel: zipfile.ZipFile) -> None:
    entry_points = configparser.ConfigParser()
    entry_points.read_string(dist_info(wheel, "entry_points.txt"))
    assert entry_points.has_section("console_scripts"), "the wheel declares no commands"
    declared = dict(entry_points.items("console_scripts"))
    assert {name: declared.get(name) for name in COMMANDS} == COMMANDS


def test_commands_point_at_modules_inside_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    missing = {
        command: target
        for command, target in COMMANDS.items()
        if target.split(":")[0].replace(".", "/") + ".py" not in names
    }
    assert not missing, f"commands whose module is not in the wheel: {missing}"


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist `python -m build --sdist` makes from a copy of the checkout, unpacked."""
    work = tmp_path_factory.mktemp("sdist")
    command = [sys.executable, "-m", "build", "--sdist", "--outdir", str(work / "dist")]
    # Unlike the wheel's copy, this one keeps tests/data's ledgers: the tests read them.
    built = build_from_a_copy(
        work, command, "--no-isolation", shutil.ignore_patterns(*NOT_SOURCE_NAMES), "quota_sidecar-*.tar.gz"
    )
    with tarfile.open(built) as archive:
        archive.extractall(work / "unpacked", filter="data")
    (unpacked,) = (work / "unpacked").iterdir()
    return unpacked


def test_the_sdist_declares_its_license_and_carries_it(sdist: Path) -> None:
    """Issue 17 item 6: an SPDX `License-Expression` (PEP 639), the LICENSE file, classifiers."""
    metadata = (sdist / "PKG-INFO").read_text().splitlines()
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    assert "Apache License" in (sdist / "LICENSE").read_text()


def test_the_sdist_carries_what_its_tests_read(sdist: Path) -> None:
    """Issue 17 item 6: every file the checkout's tests/, docs/, protos/, monitoring/ and
    deploy/ hold is in the sdist."""
    for folder in ("tests", "docs", "protos", "monitoring", "deploy"):
        here = {p.relative_to(ROOT) for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        there = {p.relative_to(sdist) for p in (sdist / folder).rglob("*") if p.is_file()}
        assert here - there == set(), f"{folder}/ files missing from the sdist"


def test_tests_run_from_the_unpacked_sdist(sdist: Path) -> None:
    """Issue 17 item 6: the sdist's own tests pass when run from its unpacked tree (against
    the package this interpreter has installed): the rule-coverage and documentation checks,
    which read tests/ and docs/ from beside them."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "tests/docs/test_rules.py",
            "tests/docs/test_docs.py",
        ],
        cwd=sdist,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
