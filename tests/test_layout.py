"""The direction of the packages, read from the source with `ast`.

`quota_sidecar.api` holds the contract (the generated stubs and the credential files
both sides read); the server and the client import it and never each other. Inside
the server no import cycle exists, counting imports inside functions and under
TYPE_CHECKING, and only the process module imports the gRPC layer.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each top-level source folder and the package it installs as (pyproject's package-dir).
PACKAGES = {"api": "quota_sidecar.api", "server": "quota_sidecar.server", "client": "quota_sidecar.client"}
GRPC_LAYER = "quota_sidecar.server.grpc.service"


def modules(folder: str) -> dict[str, Path]:
    """Every module of the package in `folder`, by dotted name."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([PACKAGES[folder], *parts])] = path
    return found


def imports(name: str, path: Path) -> Iterator[tuple[str, ...]]:
    """What each import statement of the module imports, wherever the statement is: per
    imported name, the dotted names it may be, most specific first (`from a import b`
    imports the module a.b when there is one, else the name b of a)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name,) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            yield from ((f"{base}.{alias.name}", base) for alias in node.names)


def import_graph(folder: str) -> dict[str, set[str]]:
    """Which modules of the package each of its modules imports."""
    found = modules(folder)
    graph = {}
    for name, path in found.items():
        targets = (next((c for c in candidates if c in found), None) for candidates in imports(name, path))
        graph[name] = {target for target in targets if target} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as the modules along it, or None when it is acyclic."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def imports_of(folder: str, package: str) -> dict[str, list[str]]:
    """The modules in `folder` that import something of `package`, with what they import."""
    found: dict[str, list[str]] = {}
    for name, path in modules(folder).items():
        hits = sorted(
            {c for candidates in imports(name, path) for c in candidates if c == package or c.startswith(f"{package}.")}
        )
        if hits:
            found[name] = hits
    return found


def test_the_server_imports_nothing_from_the_client() -> None:
    assert imports_of("server", "quota_sidecar.client") == {}


def test_the_client_imports_nothing_from_the_server() -> None:
    assert imports_of("client", "quota_sidecar.server") == {}


def test_the_api_package_imports_neither_side() -> None:
    assert imports_of("api", "quota_sidecar.server") == {}
    assert imports_of("api", "quota_sidecar.client") == {}


def test_no_import_cycle_among_server_modules() -> None:
    graph = import_graph("server")
    assert len(graph) > 10, f"the walk found only {sorted(graph)}"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_no_import_cycle_among_client_modules() -> None:
    graph = import_graph("client")
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_only_the_process_imports_the_grpc_layer() -> None:
    importers = {name for name, targets in import_graph("server").items() if GRPC_LAYER in targets}
    assert importers == {"quota_sidecar.server.app"}


def test_the_cycle_finder_finds_a_cycle_through_a_package_and_its_module() -> None:
    graph = {"p": {"p.a"}, "p.a": {"p"}, "q": set()}
    assert find_cycle(graph) == ["p", "p.a", "p"]
    assert find_cycle({"p": {"p.a", "p.b"}, "p.a": {"p.b"}, "p.b": set()}) is None


def test_client_v1_re_exports_the_api_stubs() -> None:
    import quota_sidecar.client.v1.quota_pb2 as dotted
    from quota_sidecar.api.v1 import quota_pb2, quota_pb2_grpc
    from quota_sidecar.client.v1 import quota_pb2 as client_pb2
    from quota_sidecar.client.v1 import quota_pb2_grpc as client_pb2_grpc

    assert client_pb2 is quota_pb2 and dotted is quota_pb2
    assert client_pb2_grpc is quota_pb2_grpc
    assert client_pb2.CheckSendRequest is quota_pb2.CheckSendRequest


def test_only_the_factory_and_the_verify_command_name_a_ledger_backend() -> None:
    """style.md 3 (the ledger behind one small interface): the sidecar builds its ledger through the factory,
    so settings, the app, the engine and the metrics name no backend; `quota-sidecar verify` checks SQLite files."""
    backend = "quota_sidecar.server.ledger.sqlite"
    outside = {name for name in imports_of("server", backend) if name != backend and not name.startswith(f"{backend}.")}
    assert outside == {"quota_sidecar.server.ledger.factory", "quota_sidecar.server.cli"}
