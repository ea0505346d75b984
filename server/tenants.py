"""The `--tenants` file: plans to store at start, validated exactly like PutPlan.

A tenant's entry is applied when the tenant has no plan yet or the entry differs from
the one applied last (its digest is kept in the ledger); otherwise the stored plan,
perhaps changed by PutPlan since, is left alone.

YAML or JSON, a mapping `tenants: {TENANT_ID: PLAN}` where PLAN uses the field
names of quota.v1.Plan (protobuf JSON), enum values with or without their
prefix (`CYCLE_ACTIVE` or `METERING_CYCLE_ACTIVE`), durations as "86400s" and
the anchor as an RFC 3339 timestamp.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from quota_sidecar.api.v1 import quota_pb2 as pb

from .domain.errors import QuotaError
from .domain.model import StoredPlan
from .domain.plans import validate_plan
from .engine import Engine
from .grpc.convert import plan_input
from .ledger import LedgerReader, LedgerTx

ENUM_PREFIX = {
    "metering": "METERING_",
    "enforcement": "ENFORCEMENT_",
    "billing_interval": "BILLING_INTERVAL_",
    "billingInterval": "BILLING_INTERVAL_",
    "counted_kinds": "MESSAGE_KIND_",
    "countedKinds": "MESSAGE_KIND_",
    "counted_activities": "ACTIVITY_KIND_",
    "countedActivities": "ACTIVITY_KIND_",
    "source": "CONTACT_SOURCE_",
    "policy": "SOURCE_POLICY_",
}


# The start-up log names at most this many tenants per kind of change.
LOGGED_NAMES = 20


class TenantsFileError(ValueError):
    pass


def _prefixed(prefix: str, value: Any) -> Any:
    if isinstance(value, str) and not value.upper().startswith(prefix):
        return prefix + value.upper()
    return value.upper() if isinstance(value, str) else value


def _normalise(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        prefix = ENUM_PREFIX.get(key)
        if key in ("source_rules", "sourceRules") and isinstance(value, list):
            out[key] = [_normalise(v) if isinstance(v, dict) else v for v in value]
        elif prefix and isinstance(value, list):
            out[key] = [_prefixed(prefix, v) for v in value]
        elif prefix:
            out[key] = _prefixed(prefix, value)
        else:
            out[key] = value
    return out


def read_plans(path: Path) -> dict[str, pb.Plan]:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TenantsFileError(f"--tenants {path}: cannot be read: {exc}".splitlines()[0]) from None
    if not isinstance(document, dict) or not isinstance(document.get("tenants"), dict):
        raise TenantsFileError(f"--tenants {path}: expected a mapping 'tenants: {{TENANT_ID: PLAN}}'")
    plans: dict[str, pb.Plan] = {}
    for tenant_id, raw in document["tenants"].items():
        if not isinstance(raw, dict):
            raise TenantsFileError(f"--tenants {path}: tenant {tenant_id!r}: the plan must be a mapping")
        try:
            plan = json_format.ParseDict(_normalise(raw), pb.Plan())
        except json_format.ParseError as exc:
            raise TenantsFileError(f"--tenants {path}: tenant {tenant_id!r}: {exc}") from None
        plan.given_fields.paths.extend(_repeated_keys(raw))
        plans[str(tenant_id)] = plan
    return plans


def _repeated_keys(raw: dict[str, Any]) -> list[str]:
    """The repeated Plan fields the entry names: present, even as `[]`, they are given."""
    descriptor = pb.Plan.DESCRIPTOR
    named = (descriptor.fields_by_name.get(key) or descriptor.fields_by_camelcase_name.get(key) for key in raw)
    return sorted({f.name for f in named if f is not None and f.is_repeated})


def check_tenants(path: Path) -> dict[str, pb.Plan]:
    """Reads the file and validates every plan as PutPlan would, storing nothing."""
    plans = read_plans(path)
    for tenant_id, plan in plans.items():
        try:
            validate_plan(tenant_id, plan_input(plan))
        except QuotaError as exc:
            raise TenantsFileError(f"--tenants {path}: tenant {tenant_id!r}: {exc}") from None
    return plans


@dataclass(frozen=True)
class TenantsLoaded:
    """What a start did with each tenant of the file."""

    created: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    # The entry is the one applied last: the stored plan, perhaps changed by PutPlan since, stays.
    kept: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{label}: {_names(ids)}"
            for label, ids in (("created", self.created), ("changed", self.changed), ("left as stored", self.kept))
            if ids
        ]
        return "; ".join(parts) or "no tenants"


def _names(ids: list[str]) -> str:
    shown = ", ".join(ids[:LOGGED_NAMES])
    return shown if len(ids) <= LOGGED_NAMES else f"{shown} and {len(ids) - LOGGED_NAMES} more"


def entry_digest(plan: pb.Plan) -> str:
    """The digest of a file entry as parsed, so that formatting, key order and comments do not count."""
    return hashlib.sha256(plan.SerializeToString(deterministic=True)).hexdigest()


def load_tenants(engine: Engine, path: Path, plans: dict[str, pb.Plan] | None = None) -> TenantsLoaded:
    """Stores the plan of each tenant of the file (already read when `plans` is given) that
    has no plan yet or whose entry differs from the one applied last; the first invalid one
    stops with one clear line.

    The plan and the entry's digest are written in two transactions: the file is loaded
    before the sidecar serves, so nothing can come between them, and a crash between them
    only makes the next start apply the same entry again."""
    if plans is None:
        plans = read_plans(path)
    loaded = TenantsLoaded()
    for tenant_id, plan in plans.items():
        digest = entry_digest(plan)
        stored, applied = engine.ledger.read(partial(_stored_entry, tenant_id))
        if stored is not None and applied == digest:
            loaded.kept.append(tenant_id)
            continue
        try:
            engine.put_plan(tenant_id, plan_input(plan))
        except QuotaError as exc:
            raise TenantsFileError(f"--tenants {path}: tenant {tenant_id!r}: {exc}") from None
        at = engine.clock.now_us()
        engine.ledger.transact(partial(_put_entry, tenant_id, digest, at))
        (loaded.created if stored is None else loaded.changed).append(tenant_id)
    return loaded


def _stored_entry(tenant_id: str, r: LedgerReader) -> tuple[StoredPlan | None, str | None]:
    """The tenant's stored plan and the digest of its file entry as applied last."""
    return r.plan(tenant_id), r.file_entry(tenant_id)


def _put_entry(tenant_id: str, digest: str, at_us: int, tx: LedgerTx) -> None:
    tx.put_file_entry(tenant_id, digest, at_us)
