"""The embedded SQLite ledger, split by job.

- `ledger.py`: `SQLiteLedger`, opening, reading, closing, and recovery from faults;
- `schema.py`: every schema step (`MIGRATIONS`), `migrate`, `SCHEMA_VERSION`;
- `rows.py`: the reads; `tx.py`: the writes, inside the writer's transaction;
- `writer.py`: the group-commit writer thread;
- `dedupe.py`: the dedupe bloom filters, built from the rows in the background;
- `files.py`: the ledger's URL, its file lock, and writing a removed file back.

`from_url` is how the factory (ledger/factory.py) builds one from a URL and options.
"""

from __future__ import annotations

from .. import LedgerOptionError, LedgerOptions
from .files import sqlite_path
from .ledger import SYNCHRONOUS_MODES, SQLiteLedger
from .schema import MIGRATIONS, SCHEMA_VERSION, _keep_held_spans, _keep_ledger_time, migrate

# The options this backend reads from `LedgerOptions.backend`, by setting name.
SYNCHRONOUS = "sqlite_synchronous"
FP_RATE = "filter_fp_rate"


def from_url(url: str, options: LedgerOptions) -> SQLiteLedger:
    """The ledger at `url` (sqlite:///PATH or a file path), not yet open; LedgerOptionError
    names the setting it refuses."""
    try:
        path = sqlite_path(url)
    except ValueError as exc:
        raise LedgerOptionError("ledger", str(exc)) from None
    synchronous = str(options.backend.get(SYNCHRONOUS, "FULL"))
    if synchronous.upper() not in SYNCHRONOUS_MODES:
        raise LedgerOptionError(SYNCHRONOUS, f"one of {', '.join(SYNCHRONOUS_MODES)}")
    fp_rate = options.backend.get(FP_RATE, 0.001)
    if not isinstance(fp_rate, int | float) or not 0 < fp_rate < 1:
        raise LedgerOptionError(FP_RATE, "must be between 0 and 1")
    return SQLiteLedger(
        path,
        synchronous=synchronous,
        filter_fp_rate=float(fp_rate),
        on_commit=options.on_commit,
        on_ready=options.on_ready,
        check_interval=options.check_interval,
    )


__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SYNCHRONOUS_MODES",
    "SQLiteLedger",
    "_keep_held_spans",
    "_keep_ledger_time",
    "from_url",
    "migrate",
    "sqlite_path",
]
