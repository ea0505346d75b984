"""Fixtures for the tiers whose tests run on every ledger backend (their conftest imports
them): the sidecar or engine of each test runs on a SQLite file in the test's folder and on
a PostgreSQL schema of its own (dropped afterwards), so every call is shown to answer the
same on both. A test that reads the SQLite file itself (it asks for `db_path`, or reads the
running sidecar's file) runs on SQLite alone: `sqlite_only` deselects its PostgreSQL run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from quota_sidecar.server.domain.clock import FakeClock
from quota_sidecar.server.engine import Engine
from quota_sidecar.server.ledger.factory import open_ledger

from support.postgres import ensure_server, schema_for, schema_url
from support.sidecar import RunningSidecar, start_sidecar


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty ledger private to the test, on each backend in turn."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    ensure_server()
    with schema_for(tmp_path) as schema:
        yield schema_url(schema)


@pytest.fixture
def engine(clock: FakeClock, ledger_url: str) -> Iterator[Engine]:
    """An engine (no server) over the test's ledger, on each backend in turn."""
    ledger = open_ledger(ledger_url)
    ledger.open()
    try:
        yield Engine(ledger, clock)
    finally:
        ledger.close()


@pytest.fixture
def sidecar(tmp_path: Path, clock: FakeClock, ledger_url: str) -> Iterator[RunningSidecar]:
    running = start_sidecar(tmp_path / "ledger.db", clock, ledger=ledger_url)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def sidecar_with_metrics(tmp_path: Path, clock: FakeClock, ledger_url: str) -> Iterator[RunningSidecar]:
    running = start_sidecar(tmp_path / "ledger.db", clock, metrics=True, ledger=ledger_url)
    try:
        yield running
    finally:
        running.stop()


def sqlite_only(items: list[pytest.Item], config: pytest.Config) -> None:
    """Deselects the PostgreSQL run of the tests that read the SQLite file (`db_path`)."""
    kept, dropped = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        on_postgres = params is not None and params.params.get("ledger_url") == "postgres"
        (dropped if on_postgres and "db_path" in getattr(item, "fixturenames", ()) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
