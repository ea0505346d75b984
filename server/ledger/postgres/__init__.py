"""The PostgreSQL ledger backend: a ledger shared by every sidecar of a fleet.

`ledger.py` holds `PostgresLedger` and its concurrency contract; `schema.py` the
tables and the migrations the sidecar runs itself.
"""

from .ledger import PostgresLedger

__all__ = ["PostgresLedger"]
