"""What the engine is asked, as plain values: the data plane's requests, the retention
`prune` applies, and the checks every request's contact list passes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..domain.errors import InvalidArgument
from ..domain.model import DAY_US, ActivityKind, Channel, ContactSource, MessageKind
from ..domain.plans import MAX_ID_BYTES, check_id

MAX_BATCH = 10_000
MAX_ACTIVITY_CONTACTS = 100_000


@dataclass(frozen=True, slots=True)
class SendRequest:
    tenant_id: str
    contact_id: str
    channel: Channel | None
    kind: MessageKind | None
    queued_since_us: int | None = None
    dry_run: bool = False
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class BatchRequest:
    tenant_id: str
    channel: Channel | None
    kind: MessageKind | None
    contact_ids: Sequence[str]
    dry_run: bool = False
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class ActivityRequest:
    tenant_id: str
    kind: ActivityKind | None
    contact_ids: Sequence[str]
    occurred_at_us: int | None = None
    marketing: bool = False
    source_type: str = ""
    source_id: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class ContactAddRequest:
    tenant_id: str
    source: ContactSource | None
    contact_ids: Sequence[str]
    dry_run: bool = False
    marketing: bool | None = None
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Retention:
    """How long the ledger keeps what no figure is computed from: answers kept for
    retries of a request_id, outbox events (once delivered) and audit rows."""

    requests_us: int = DAY_US
    events_us: int = 7 * DAY_US
    audit_us: int = 90 * DAY_US


def check_ids(field: str, ids: Sequence[str], maximum: int) -> None:
    """A call's contact list: at least one, at most `maximum`, each a valid id."""
    if not ids:
        raise InvalidArgument(field, "must list at least one contact")
    if len(ids) > maximum:
        raise InvalidArgument(field, f"lists {len(ids)} contacts; at most {maximum:,} per call")
    if "" not in ids and max(map(len, ids)) <= MAX_ID_BYTES // 4 and "\x00" not in "".join(ids):
        return
    for i, contact_id in enumerate(ids):
        check_id(f"{field}[{i}]", contact_id)
