"""The test tiers, read from the source with `ast`.

Each test module lives in the folder of its tier; what tests share lives in
`tests/support` (and the crash harness `tests/crash_load.py`, which is also a script),
so no test module imports another, nor a conftest, wherever the import statement is.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
TIERS = {"domain", "engine", "ledger", "service", "client", "process", "monitoring", "deploy", "docs"}
# Modules at the top of tests/ besides the tiers: these checks of the layout.
TOP = {"test_layout.py", "test_tiers.py"}


def modules_of_tests() -> list[Path]:
    return sorted(TESTS.rglob("test_*.py"))


def imported_test_modules(source: str, filename: str = "<source>") -> list[str]:
    """The test modules and conftests that `source` imports, by the name it imports them under."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else ["." * node.level + (node.module or "")]
            if node.level or not node.module:
                names += [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            last = name.rsplit(".", 1)[-1]
            if name.startswith(".") or last.startswith("test_") or last == "conftest" or name.split(".")[0] in TIERS:
                found.append(name)
    return found


def test_every_test_module_lives_in_its_tier() -> None:
    misplaced = [
        str(path.relative_to(TESTS))
        for path in modules_of_tests()
        if path.parent == TESTS
        and path.name not in TOP
        or path.parent != TESTS
        and path.relative_to(TESTS).parts[0] not in TIERS
    ]
    assert not misplaced
    assert {path.relative_to(TESTS).parts[0] for path in modules_of_tests() if path.parent != TESTS} == TIERS


def test_no_test_module_or_support_module_imports_a_test_module() -> None:
    sources = [*modules_of_tests(), *sorted((TESTS / "support").glob("*.py")), TESTS / "crash_load.py"]
    sources += sorted(TESTS.rglob("conftest.py"))
    assert len(sources) > 40, f"the walk found only {sources}"
    found = {str(p.relative_to(TESTS)): imported_test_modules(p.read_text(), str(p)) for p in sources}
    assert {path: names for path, names in found.items() if names} == {}


def test_the_import_finder_finds_test_modules_however_imported() -> None:
    source = "\n".join(
        [
            "from test_engine import plan",
            "import conftest",
            "def f():",
            "    from engine.test_held import add",
            "    from . import test_models",
            "from support.engine import plan",
            "import quota_sidecar.server.engine",
        ]
    )
    assert imported_test_modules(source) == ["test_engine", "conftest", "engine.test_held", ".", "test_models"]
