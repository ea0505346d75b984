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
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "quota_sidecar"
STUBS = [f"{PACKAGE}/api/v1/{name}" for name in ("quota_pb2.py", "quota_pb2.pyi", "quota_pb2_grpc.py")]
COMMANDS = {
    "quota-sidecar": "quota_sidecar.server.cli:main",
    "quotactl": "quota_sidecar.client.cli:main",
}
# Local state that must not leak into the build (and would slow the copy down).
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "node_modules", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "*.db*"
)


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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    work = tmp_path_factory.mktemp("wheel")
    source, out = work / "src", work / "dist"
    # setuptools writes build/ and *.egg-info beside pyproject.toml; a copy keeps them out of the checkout.
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-w", str(out)]
    if build_requirements_installed():
        command.append("--no-build-isolation")
    result = subprocess.run(
        [*command, str(source)], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}\n{result.stderr}"
    built = list(out.glob("quota_sidecar-*.whl"))
    assert len(built) == 1, f"expected one quota_sidecar wheel, found {[p.name for p in out.iterdir()]}"
    with zipfile.ZipFile(built[0]) as archive:
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
    metadata = dist_info(wheel, "METADATA").splitlines()
    requires = {Requirement(line.split(":", 1)[1]).name for line in metadata if line.startswith("Requires-Dist:")}
    assert "grpcio-health-checking" in requires


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
