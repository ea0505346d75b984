"""The decision engine: requests as plain values in, decisions and figures out, each unit
of work run through the ledger interface with an injected clock. `Engine` (engine.py)
is the public face; each job has its module beside it."""

from ..domain.model import PlanInput
from .engine import Engine
from .requests import ActivityRequest, BatchRequest, ContactAddRequest, Retention, SendRequest
from .upkeep import PRUNE_ROWS

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
