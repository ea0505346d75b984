"""The decision engine: requests as plain values in, decisions and figures out, each unit
of work run through the ledger interface with an injected clock."""

from ..domain.model import PlanInput
from .engine import PRUNE_ROWS, ActivityRequest, BatchRequest, ContactAddRequest, Engine, Retention, SendRequest

__all__ = [
    "PRUNE_ROWS",
    "ActivityRequest",
    "BatchRequest",
    "ContactAddRequest",
    "Engine",
    "PlanInput",
    "Retention",
    "SendRequest",
]
