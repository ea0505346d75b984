"""Shared fixtures: a real sidecar on a free port (in-process, fake clock) and stubs for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from quota_sidecar.server.domain.clock import FakeClock
from quota_sidecar.server.engine import Engine
from quota_sidecar.server.ledger.sqlite import SQLiteLedger

from support.both_backends import sqlite_only
from support.postgres import ensure_server
from support.refusing_server import RefusingServer
from support.sidecar import START, RunningSidecar, start_sidecar


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def engine(db_path: Path, clock: FakeClock) -> Iterator[Engine]:
    """An engine over a real SQLite ledger file (no server)."""
    ledger = SQLiteLedger(db_path)
    ledger.open()
    try:
        yield Engine(ledger, clock)
    finally:
        ledger.close()


@pytest.fixture
def sidecar(tmp_path: Path, clock: FakeClock) -> Iterator[RunningSidecar]:
    running = start_sidecar(tmp_path / "ledger.db", clock)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def sidecar_with_metrics(tmp_path: Path, clock: FakeClock) -> Iterator[RunningSidecar]:
    running = start_sidecar(tmp_path / "ledger.db", clock, metrics=True)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def processes() -> Iterator[list]:
    """Real `quota-sidecar` processes a test started (tests/support/process.py `Process`); killed at the end."""
    started: list = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait()
        p.proc.stdout.close()
        p.proc.stderr.close()


@pytest.fixture
def refusing_server() -> Iterator[RefusingServer]:
    server = RefusingServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres_server() -> None:
    """The local PostgreSQL, started if it is down; a test asking for it fails, never skips, without it."""
    ensure_server()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    sqlite_only(items, config)
