"""The ledger factory (server/ledger/factory.py): a URL's scheme chooses the backend, and the
backend reads and checks its own options, naming the setting it refuses (style.md 3 and 5:
the ledger behind one small interface; bad configuration fails at start with one clear line)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from quota_sidecar.server.domain.model import Activation, Counters
from quota_sidecar.server.ledger import LedgerOptionError, LedgerOptions
from quota_sidecar.server.ledger.factory import POSTGRES_MODULE, open_ledger
from quota_sidecar.server.ledger.sqlite import SQLiteLedger

C1 = 1_771_142_400_000_000


@pytest.mark.parametrize("form", ["plain", "sqlite"])
def test_a_file_path_or_a_sqlite_url_opens_the_sqlite_ledger_with_the_options_given(tmp_path: Path, form: str) -> None:
    path = tmp_path / "deep" / "ledger.db"
    commits: list[tuple[int, bool]] = []
    ledger = open_ledger(
        str(path) if form == "plain" else f"sqlite:///{path}",
        LedgerOptions(
            on_commit=lambda seconds, units, ok: commits.append((units, ok)),
            backend={"sqlite_synchronous": "normal", "filter_fp_rate": 0.01},
        ),
    )
    assert isinstance(ledger, SQLiteLedger)
    assert (ledger.path, ledger.synchronous, ledger.filters.fp_rate) == (path, "NORMAL", 0.01)
    assert not path.exists(), "a ledger is built by the factory and created only by open()"
    ledger.open()
    try:
        ledger.transact(lambda tx: tx.activate("t", C1, [Activation("a", C1 + 1, "CAMPAIGN", 1)]))
        assert ledger.read(lambda r: r.counters("t", C1)) == Counters(1, 1)
    finally:
        ledger.close()
    assert path.is_file() and (1, True) in commits


@pytest.mark.parametrize(
    ("url", "backend", "option", "problem"),
    [
        ("sqlite:///", {}, "ledger", "names no file"),
        ("", {}, "ledger", "empty"),
        ("mysql://db/quota", {}, "ledger", "unsupported ledger scheme 'mysql'"),
        ("l.db", {"sqlite_synchronous": "SOMETIMES"}, "sqlite_synchronous", "one of FULL, EXTRA, NORMAL"),
        ("l.db", {"filter_fp_rate": 1.5}, "filter_fp_rate", "between 0 and 1"),
        ("l.db", {"filter_fp_rate": 0}, "filter_fp_rate", "between 0 and 1"),
    ],
)
def test_the_backend_refuses_a_bad_url_or_option_naming_the_setting(
    url: str, backend: dict[str, object], option: str, problem: str
) -> None:
    with pytest.raises(LedgerOptionError) as refused:
        open_ledger(url, LedgerOptions(backend=backend))
    assert refused.value.option == option and problem in refused.value.problem


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "POSTGRESQL"])
def test_a_postgres_url_without_the_postgres_backend_installed_is_one_clear_refusal(
    scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PostgreSQL backend is imported only for its URLs; where it cannot be imported (here: made
    unimportable, as without its driver) the URL is refused as a setting, not with a traceback."""
    monkeypatch.setitem(sys.modules, POSTGRES_MODULE, None)
    with pytest.raises(LedgerOptionError) as refused:
        open_ledger(f"{scheme}://quota@db.example/quota")
    assert refused.value.option == "ledger" and "PostgreSQL" in refused.value.problem
