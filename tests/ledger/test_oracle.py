"""The oracle "figures equal rows" (tests/support/oracle.py) over every ledger backend: it
passes on a ledger the engine wrote, and it catches a figure made to differ from its rows
through the backend itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from quota_sidecar.server.domain.clock import FakeClock
from quota_sidecar.server.domain.model import Holdings
from quota_sidecar.server.engine import Engine
from quota_sidecar.server.ledger import Ledger, LedgerTx

from support.backends import BACKENDS, Backend
from support.engine import T, batch, plan, send
from support.held import T as HELD
from support.held import add, ids, preset
from support.oracle import FiguresDiffer, assert_figures_equal_rows


@pytest.fixture(params=BACKENDS)
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    backend: Backend = request.param
    if backend.on_postgres:
        request.getfixturevalue("postgres_server")
    with backend.store(tmp_path):
        lg = backend.make(tmp_path)
        lg.open()
        try:
            yield lg
        finally:
            lg.close()


@pytest.fixture
def written(ledger: Ledger, clock: FakeClock) -> Engine:
    """A CYCLE_ACTIVE tenant with sends in two cycles and a held-contacts tenant with contacts."""
    engine = Engine(ledger, clock)
    engine.put_plan(T, plan(10))
    batch(engine, ["a", "b", "c"])
    send(engine, "a")
    clock.advance(30 * 86_400)
    batch(engine, ["a", "d"])
    engine.put_plan(HELD, preset("contact-limit", contact_limit=20))
    add(engine, ids("h", 5))
    return engine


def test_a_ledger_the_engine_wrote_has_figures_equal_to_rows_SG_1_SG_6(ledger: Ledger, written: Engine) -> None:
    """SG-1, SG-6: each cycle's active contacts and sends are its activations and their sends."""
    found = assert_figures_equal_rows(ledger)
    assert found[T].figures() == [(3, 4, 3, 4), (2, 2, 2, 2)]
    assert found[T].active_ids() == {"a", "b", "c", "d"}
    assert found[HELD].counted_holdings() == (5, 5, 0)


def test_sends_counted_without_an_activation_are_caught(ledger: Ledger, written: Engine) -> None:
    """A cycle's sends raised through the backend with no activation behind them differ from its rows."""
    cycle = written.get_usage(T).cycle_start_us
    ledger.transact(lambda tx: tx.count_sends(T, cycle, 1))
    with pytest.raises(FiguresDiffer, match=rf"{T} cycle {cycle}: figures say 2 active / 3 sends, activations 2 / 2"):
        assert_figures_equal_rows(ledger)


def test_holdings_that_differ_from_the_contacts_are_caught(ledger: Ledger, written: Engine) -> None:
    """AC-2: the held count is the contacts held; holdings written through the backend with one more differ."""

    def one_more(tx: LedgerTx) -> None:
        now = tx.holdings(HELD)
        assert now is not None
        tx.put_holdings(HELD, Holdings(now.cycle_start_us, now.held + 1, now.marketing, now.pending))

    ledger.transact(one_more)
    with pytest.raises(
        FiguresDiffer, match=rf"{HELD}: holdings say held/marketing/pending \(6, 5, 0\), contacts \(5, 5, 0\)"
    ):
        assert_figures_equal_rows(ledger)
