"""What the PostgreSQL ledger promises beyond the ledger contract: its schema made by
several sidecars starting at once, durable commits whatever the server's default, and
failures of the database answered UNAVAILABLE and recovered from by itself (issue 16,
Durable and Failures). Each test on a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from quota_sidecar.server.domain.errors import LedgerUnavailable
from quota_sidecar.server.ledger import LedgerOptionError, LedgerOptions, LedgerTx
from quota_sidecar.server.ledger.factory import open_ledger
from quota_sidecar.server.ledger.postgres import PostgresLedger
from quota_sidecar.server.ledger.postgres.schema import SCHEMA_VERSION

from support.postgres import admin, schema_for, schema_url
from support.waiting import wait_until

T = "tenant-a"
C1 = 1_771_142_400_000_000


@pytest.fixture
def url(postgres_server: None, tmp_path: Path) -> Iterator[str]:
    with schema_for(tmp_path) as schema:
        yield schema_url(schema)


def test_sidecars_opening_an_empty_database_at_once_all_come_up(url: str):
    """issue 16: several sidecars starting at once on an empty database must all come up; the schema
    is made once, at the current version."""
    ledgers = [PostgresLedger(url) for _ in range(4)]
    start = threading.Barrier(len(ledgers))
    errors: list[BaseException] = []

    def open_one(lg: PostgresLedger) -> None:
        start.wait(20)
        try:
            lg.open()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(lg,)) for lg in ledgers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        assert all(lg.ready for lg in ledgers)
        ledgers[0].transact(lambda tx: tx.put_plan(T, "p", 1))
        assert [lg.read(lambda r: r.plan(T) is not None) for lg in ledgers] == [True] * len(ledgers)
        assert ledgers[1].transact(lambda tx: tx.conn.execute("SELECT version FROM ledger_schema").fetchall()) == [
            (SCHEMA_VERSION,)
        ]
    finally:
        for lg in ledgers:
            lg.close()


def test_commits_are_synchronous_even_when_the_connection_asks_otherwise(url: str):
    """issue 16 Durable: an ALLOW is acknowledged only after PostgreSQL committed it with
    synchronous_commit on, whatever the server, role or URL default."""
    lg = PostgresLedger(url + "%20-csynchronous_commit%3Doff")
    lg.open()
    try:
        assert lg.transact(lambda tx: tx.conn.execute("SHOW synchronous_commit").fetchone()) == ("on",)
    finally:
        lg.close()


def test_an_unreachable_database_is_unavailable_at_open():
    """issue 16 Failures: PostgreSQL down at start is LedgerUnavailable, and the ledger is not ready."""
    lg = PostgresLedger("postgresql://postgres@127.0.0.1:1/postgres", connect_timeout=1)
    with pytest.raises(LedgerUnavailable):
        lg.open()
    assert not lg.ready


def test_a_connection_broken_at_commit_is_unavailable_and_the_ledger_recovers_by_itself(url: str):
    """issue 16 Durable and Failures: a commit whose outcome is unknown (the connection broken under
    it) is LedgerUnavailable, never a silent success; the ledger says it is not ready, then ready
    again by itself once a connection works, and the unit that failed left nothing."""
    readiness: list[bool] = []
    lg = PostgresLedger(url, on_ready=readiness.append, check_interval=0.05)
    lg.open()
    try:

        def broken(tx: LedgerTx) -> None:
            tx.put_plan(T, "lost", 1)
            pid = tx.conn.info.backend_pid
            admin(f"SELECT pg_terminate_backend({pid}, 5000)")

        with pytest.raises(LedgerUnavailable):
            lg.transact(broken)
        wait_until(lambda: readiness == [False, True], "the ledger ready again")
        assert lg.ready
        lg.transact(lambda tx: tx.count_sends(T, C1, 1))
        assert lg.read(lambda r: (r.plan(T), r.counters(T, C1).sends)) == (None, 1)
    finally:
        lg.close()


def test_a_call_that_waited_too_long_for_a_busy_pool_is_unavailable_while_the_ledger_stays_ready(url: str):
    """issue 16 Failures: health says NOT_SERVING only while the database cannot be reached; a call that
    found every pooled connection busy for too long is UNAVAILABLE alone."""
    lg = PostgresLedger(url, pool_size=1, connect_timeout=0.5)
    lg.open()
    entered, release = threading.Event(), threading.Event()

    def hold(tx: LedgerTx) -> None:
        entered.set()
        release.wait(20)

    holder = threading.Thread(target=lambda: lg.transact(hold))
    holder.start()
    try:
        assert entered.wait(20)
        with pytest.raises(LedgerUnavailable):
            lg.transact(lambda tx: tx.count_sends(T, C1, 1))
        assert lg.ready
    finally:
        release.set()
        holder.join(20)
    try:
        lg.transact(lambda tx: tx.count_sends(T, C1, 1))
        assert lg.read(lambda r: r.counters(T, C1).sends) == 1
    finally:
        lg.close()


def test_the_time_of_a_unit_that_wrote_for_no_tenant_is_kept_across_a_reopen(url: str):
    """Ledger time (the module docstring): a unit that wrote without holding a tenant (the webhook's
    cursor) keeps its instant in the one ledger_time row; one that only tried to prune, deleting
    nothing, keeps none."""
    lg = PostgresLedger(url)
    lg.open()
    try:
        lg.transact(lambda tx: (tx.put_event_cursor("webhook", 3), tx.note_time(700)))
        lg.transact(lambda tx: (tx.prune_audit(10**18, 100), tx.note_time(900)))
        assert lg.time_us == 700
    finally:
        lg.close()
    again = PostgresLedger(url)
    again.open()
    try:
        assert again.time_us == 700
        assert again.read(lambda r: r.event_cursor("webhook")) == 3
    finally:
        again.close()


def test_the_factory_builds_it_from_a_postgres_url_with_the_sidecars_hooks(url: str):
    """issue 16 (`--ledger postgresql://...`, `postgres://` too): the factory builds a PostgresLedger
    from either scheme, told of each commit and of its readiness as the sidecar asks."""
    commits: list[bool] = []
    readiness: list[bool] = []
    options = LedgerOptions(on_commit=lambda s, n, ok: commits.append(ok), on_ready=readiness.append)
    for scheme_url in (url, url.replace("postgresql://", "postgres://", 1)):
        lg = open_ledger(scheme_url, options)
        assert isinstance(lg, PostgresLedger)
        lg.open()
        try:
            lg.transact(lambda tx: tx.count_sends(T, C1, 1))
        finally:
            lg.close()
    assert commits == [True, True]
    assert readiness == []  # never failed, so never told


@pytest.mark.parametrize(
    "url", ["postgresql://quota:s3cret@db.example/quota?nonsense=1", "postgres://quota:s3cret@[db.example/quota"]
)
def test_a_url_libpq_cannot_parse_is_refused_as_the_ledger_setting_without_its_password(url: str):
    """style.md 5 (bad configuration fails at start with one clear line), issue 16 (the password never
    logged): a malformed PostgreSQL URL is a LedgerOptionError naming `ledger`, before any connection."""
    with pytest.raises(LedgerOptionError) as refused:
        open_ledger(url)
    assert refused.value.option == "ledger" and "not a PostgreSQL URL" in refused.value.problem
    assert "s3cret" not in str(refused.value)
