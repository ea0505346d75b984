"""The Python client of the quota sidecar (protobuf package quota.v1).

    from quota_sidecar.client import QuotaClient

    with QuotaClient("127.0.0.1:50051", fail_mode="open") as quota:
        decision = quota.check_send("tenant-1", "contact-42", "CAMPAIGN")
        if decision.decision == "ALLOW":
            ...

`AsyncQuotaClient` offers the same methods as coroutines. Results name enum values by
their short names and keep the protobuf response as `raw`; errors are the exceptions
drawn in `quota_sidecar.client._errors`, all subclasses of `QuotaError`. The generated
messages and stubs are in `quota_sidecar.api.v1` (re-exported as `quota_sidecar.client.v1`).
"""

from ._async import AsyncQuotaClient
from ._calls import DEFAULT_ADMIN_TIMEOUT, DEFAULT_TIMEOUT, FailMode
from ._errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from ._results import (
    ActiveContact,
    ActiveContactsPage,
    ActivityRecord,
    BatchDecision,
    ContactAddDecision,
    ContactState,
    EnrollDecision,
    Invoice,
    InvoiceLine,
    Plan,
    PlanChange,
    SendDecision,
    SendResult,
    Usage,
    UsageEvent,
)
from ._retry import Retry
from ._sync import QuotaClient

__all__ = [
    "DEFAULT_ADMIN_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "ActiveContact",
    "ActiveContactsPage",
    "ActivityRecord",
    "AsyncQuotaClient",
    "BatchDecision",
    "ContactAddDecision",
    "ContactState",
    "DeadlineExceeded",
    "EnrollDecision",
    "FailMode",
    "Internal",
    "InvalidArgument",
    "Invoice",
    "InvoiceLine",
    "NotFound",
    "PermissionDenied",
    "Plan",
    "PlanChange",
    "QuotaClient",
    "QuotaError",
    "ResourceExhausted",
    "Retry",
    "SendDecision",
    "SendResult",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Usage",
    "UsageEvent",
]

# Public classes report the public module, as in tracebacks: quota_sidecar.client.NotFound.
for _name in __all__:
    _value = globals()[_name]
    if isinstance(_value, type):
        _value.__module__ = __name__
del _name, _value
