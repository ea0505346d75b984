"""Fixtures of the process tier."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.postgres import schema_for, schema_url


@pytest.fixture
def ledger_url(postgres_server: None, tmp_path: Path) -> Iterator[str]:
    """A fresh PostgreSQL schema for a fleet's ledger, dropped after the test."""
    with schema_for(tmp_path) as schema:
        yield schema_url(schema)
