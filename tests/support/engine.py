"""Calls to the decision engine as the engine tier makes them: a model-2 plan, sends, batches and
activities for one tenant at a fixed instant of its cycle."""

from __future__ import annotations

from datetime import UTC, datetime

from quota_sidecar.server.domain.clock import to_us
from quota_sidecar.server.domain.model import (
    ActivityKind,
    ActivityOutcome,
    BatchOutcome,
    Channel,
    Enforcement,
    MessageKind,
    Metering,
    SendOutcome,
)
from quota_sidecar.server.engine import ActivityRequest, BatchRequest, Engine, PlanInput, SendRequest

T = "tenant-a"
ANCHOR = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
CAMPAIGN = MessageKind.CAMPAIGN
AUTOMATION = MessageKind.AUTOMATION
TRANSACTIONAL = MessageKind.TRANSACTIONAL
MESSAGE_SENT = ActivityKind.MESSAGE_SENT


def plan(limit: int = 3, **fields: object) -> PlanInput:
    """A model-2 plan: CYCLE_ACTIVE, HARD, campaigns and automations count."""
    base: dict[str, object] = dict(
        metering=Metering.CYCLE_ACTIVE,
        enforcement=Enforcement.HARD,
        contact_limit=limit,
        cycle_anchor_us=to_us(ANCHOR),
        counted_kinds=(CAMPAIGN, AUTOMATION),
        counted_activities=(MESSAGE_SENT,),
        plan_name="test",
    )
    base.update(fields)
    return PlanInput(**base)  # type: ignore[arg-type]


def send(engine: Engine, contact: str, kind: MessageKind = CAMPAIGN, tenant: str = T, **kw: object) -> SendOutcome:
    return engine.check_send(SendRequest(tenant, contact, Channel.EMAIL, kind, **kw))  # type: ignore[arg-type]


def batch(engine: Engine, ids: list[str], kind: MessageKind = CAMPAIGN, tenant: str = T, **kw: object) -> BatchOutcome:
    return engine.check_send_batch(BatchRequest(tenant, Channel.EMAIL, kind, ids, **kw))  # type: ignore[arg-type]


def record(
    engine: Engine, ids: list[str], kind: ActivityKind = MESSAGE_SENT, tenant: str = T, **kw: object
) -> ActivityOutcome:
    return engine.record_activity(ActivityRequest(tenant, kind, ids, **kw))  # type: ignore[arg-type]
