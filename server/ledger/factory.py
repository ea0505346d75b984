"""Builds the ledger a URL names, choosing the backend by the URL's scheme.

`sqlite:///PATH` or a plain file path: the embedded SQLite ledger (`sqlite/`).
`postgresql://` or `postgres://`: the shared PostgreSQL ledger, imported only
when asked for, so the embedded default needs no PostgreSQL driver.

Each backend module builds its ledger with `from_url(url, options)`, reading and
checking its own options.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from . import Ledger, LedgerOptionError, LedgerOptions

POSTGRES_SCHEMES = ("postgresql", "postgres")
POSTGRES_MODULE = "quota_sidecar.server.ledger.postgres"


def open_ledger(url_or_path: str, options: LedgerOptions | None = None) -> Ledger:
    """The ledger at `url_or_path`, built but not yet open (`Ledger.open` creates or
    migrates its store). LedgerOptionError names the setting refused: the URL itself
    (`ledger`) or one of the backend's options."""
    options = options or LedgerOptions()
    scheme = url_or_path.split("://", 1)[0].lower() if "://" in url_or_path else ""
    if scheme in POSTGRES_SCHEMES:
        return _postgres(url_or_path, options)
    if scheme not in ("", "sqlite"):
        raise LedgerOptionError(
            "ledger", f"unsupported ledger scheme {scheme!r}: use sqlite:///PATH, a file path or postgresql://..."
        )
    from .sqlite import from_url

    return from_url(url_or_path, options)


def _postgres(url: str, options: LedgerOptions) -> Ledger:
    try:
        backend = importlib.import_module(POSTGRES_MODULE)
    except ImportError as exc:
        raise LedgerOptionError(
            "ledger", f"the PostgreSQL ledger is not available in this installation ({exc}); use sqlite:///PATH"
        ) from None
    from_url: Callable[[str, LedgerOptions], Ledger] = backend.from_url
    return from_url(url, options)


# A password in a libpq URL: after the user in the authority, or the `password` parameter.
_AUTHORITY_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^/?#@:]*):[^/?#@]*@", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def ledger_as_shown(url_or_path: str) -> str:
    """The ledger's URL as the sidecar logs and prints it: any password replaced by `***`,
    the rest (scheme, user, host, database, other parameters) as given."""
    return _QUERY_PASSWORD.sub(r"\1***", _AUTHORITY_PASSWORD.sub(r"\1:***@", url_or_path))
