"""A sidecar's decision path in a process of its own (a PostgresLedger and an Engine),
for races between processes on one PostgreSQL store."""

from __future__ import annotations

from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from quota_sidecar.server.domain.clock import FakeClock
from quota_sidecar.server.domain.model import Channel, Decision, MessageKind
from quota_sidecar.server.engine import Engine, SendRequest
from quota_sidecar.server.ledger.postgres import PostgresLedger


def check_new_contacts(
    url: str, now_us: int, tenant_id: str, contact_ids: list[str], go: Barrier, answers: Queue[tuple[str, object]]
) -> None:
    """Once every racer has reached `go`, CheckSends each contact in turn; puts the contacts ALLOWed (or the error)."""
    ledger = PostgresLedger(url)
    ledger.open()
    try:
        engine = Engine(ledger, FakeClock(now_us))
        go.wait(60)
        allowed = []
        for contact_id in contact_ids:
            outcome = engine.check_send(SendRequest(tenant_id, contact_id, Channel.EMAIL, MessageKind.CAMPAIGN))
            if outcome.decision.decision == Decision.ALLOW:
                allowed.append(contact_id)
        answers.put(("allowed", allowed))
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        answers.put(("error", repr(exc)))
    finally:
        ledger.close()
