"""A SQLite ledger file read from outside the sidecar: every row of it, for tests about the file itself
(a dry run leaves every row as it was), and the backend's own `LedgerReader` over a file a running
`quota-sidecar serve` holds, for the oracle (support/oracle.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quota_sidecar.server.ledger import LedgerReader
from quota_sidecar.server.ledger.sqlite.rows import Reader


def snapshot(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table and view, read straight from the SQLite file."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') ORDER BY name")
        ]
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}
    finally:
        conn.close()


@contextmanager
def file_reader(path: Path) -> Iterator[LedgerReader]:
    """The SQLite backend's reader over its own connection to the file, inside one read
    transaction: a consistent view of what is committed, whoever holds the ledger."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        conn.execute("BEGIN")
        yield Reader(conn)
    finally:
        conn.close()
