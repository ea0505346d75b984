"""The one error hierarchy of the sidecar.

Denial is data (a Decision with a Reason); these are failures. The gRPC layer
maps each class to one status code in one place (service.STATUS_OF)::

    QuotaError
    ├── InvalidArgument      INVALID_ARGUMENT, names the offending field
    ├── NotFound             NOT_FOUND (a tenant with no plan, an unknown contact)
    ├── Unauthenticated      UNAUTHENTICATED (no admin credential)
    ├── PermissionDenied     PERMISSION_DENIED (a wrong one, or none configured)
    ├── LedgerUnavailable    UNAVAILABLE (the ledger cannot commit or is not open)
    └── DeadlineExceeded     DEADLINE_EXCEEDED (the call's deadline passed before its work ran)
"""

from __future__ import annotations


class QuotaError(Exception):
    """Base of every failure the sidecar reports to a caller."""


class InvalidArgument(QuotaError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NotFound(QuotaError):
    pass


class Unauthenticated(QuotaError):
    pass


class PermissionDenied(QuotaError):
    pass


class LedgerUnavailable(QuotaError):
    pass


class DeadlineExceeded(QuotaError):
    pass
