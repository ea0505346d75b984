"""Calls to the decision engine for a held-contacts tenant: presets anchored on ANCHOR and contact adds."""

from __future__ import annotations

from quota_sidecar.server.domain.clock import to_us
from quota_sidecar.server.domain.model import ContactAddOutcome, ContactSource
from quota_sidecar.server.engine import ContactAddRequest, Engine, PlanInput

from support.engine import ANCHOR

T = "tenant-h"


def preset(name: str, **fields: object) -> PlanInput:
    return PlanInput(**{"preset": name, "cycle_anchor_us": to_us(ANCHOR), **fields})  # type: ignore[arg-type]


def add(engine: Engine, ids: list[str], source: ContactSource = ContactSource.API, **kw: object) -> ContactAddOutcome:
    return engine.check_contact_add(ContactAddRequest(T, source, ids, **kw))  # type: ignore[arg-type]


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]
