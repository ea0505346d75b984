"""The PostgreSQL ledger backend: a ledger shared by every sidecar of a fleet.

`ledger.py` holds `PostgresLedger` and its concurrency contract, `rows.py` its reads,
`tx.py` its writes and tenant locks; `schema.py` the tables and the migrations the
sidecar runs itself. `from_url` is how the factory
(ledger/factory.py) builds one from a `postgresql://` or `postgres://` URL.
"""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .. import LedgerOptionError, LedgerOptions
from .ledger import PostgresLedger


def from_url(url: str, options: LedgerOptions) -> PostgresLedger:
    """The ledger at the libpq URL `url`, not yet open, told of commits and readiness as
    `options` says. The backend settings in `options.backend` are other backends' own
    (the SQLite file's synchronous mode, its filters' rate): none applies here. A URL that
    libpq cannot parse is refused as the `ledger` setting, before anything connects; the
    refusal never repeats the URL, which may hold a password."""
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        problem = str(exc).strip().replace(url, "the URL")
        raise LedgerOptionError("ledger", f"not a PostgreSQL URL: {problem}") from None
    return PostgresLedger(
        url, on_commit=options.on_commit, on_ready=options.on_ready, check_interval=options.check_interval
    )


__all__ = ["PostgresLedger", "from_url"]
