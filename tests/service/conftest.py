"""Fixtures of the service tier: the sidecar (or engine) of each test runs on every ledger
backend, a SQLite file in the test's folder and a PostgreSQL schema of its own (dropped
afterwards), so every RPC is shown to answer the same on both."""

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
