"""A real PostgreSQL for the tests: the local cluster on 127.0.0.1:5432 (user postgres,
trust auth), started when it is down, and one schema per test, dropped afterwards."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
CLUSTER = ("15", "main")
START_PATIENCE_S = 30.0


def _reachable() -> bool:
    try:
        with psycopg.connect(SERVER, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def ensure_server() -> None:
    """Starts the cluster if it is down; fails loudly if it cannot be reached after that."""
    if _reachable():
        return
    started = subprocess.run(["pg_ctlcluster", *CLUSTER, "start"], capture_output=True, text=True)
    deadline = time.monotonic() + START_PATIENCE_S
    while time.monotonic() < deadline:
        if _reachable():
            return
        time.sleep(0.2)
    raise RuntimeError(
        f"PostgreSQL at {SERVER} is down and `pg_ctlcluster {' '.join(CLUSTER)} start` did not bring it up"
        f" (exit {started.returncode}): {started.stderr.strip()}"
    )


def schema_url(schema: str) -> str:
    """A libpq URL whose connections use `schema` (and only it)."""
    return f"{SERVER}?options=-csearch_path%3D{schema}"


def admin(sql: str) -> None:
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(sql)


def schema_at(location: Path) -> str:
    """The schema of the store at a test's private directory."""
    return "test_" + hashlib.blake2b(str(location).encode(), digest_size=8).hexdigest()


@contextmanager
def schema_for(location: Path) -> Iterator[str]:
    """The store at `location`: a new empty schema, dropped with everything in it afterwards."""
    name = schema_at(location)
    admin(f"CREATE SCHEMA {name}")
    try:
        yield name
    finally:
        admin(f"DROP SCHEMA {name} CASCADE")


def schema_of(url: str) -> str:
    """The schema a `schema_url` URL's connections use."""
    return url.rpartition("search_path%3D")[2]


def schema_snapshot(schema: str) -> dict[str, list[tuple]]:
    """Every row of every table in the schema."""
    with psycopg.connect(SERVER, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY table_name",
                (schema,),
            )
        ]
        return {t: sorted(conn.execute(f'SELECT * FROM {schema}."{t}"').fetchall(), key=repr) for t in tables}


def schema_query(schema: str, sql: str, args: tuple = ()) -> list[tuple]:
    """The rows of one query (placeholders `%s`) run with `schema` first on the search path."""
    with psycopg.connect(schema_url(schema), autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()
