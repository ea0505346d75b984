"""The exceptions the client raises, and the one place gRPC status codes map to them.

    QuotaError                  base class; `.code` (grpc.StatusCode), `.message`;
    │                           raised itself for a status without a class below
    ├── InvalidArgument         INVALID_ARGUMENT, from the sidecar or from the client's own
    │                           checks of its arguments (also a ValueError)
    ├── NotFound                NOT_FOUND: the tenant has no plan
    ├── Unauthenticated         UNAUTHENTICATED: an admin call without the admin credential
    ├── PermissionDenied        PERMISSION_DENIED: an admin call with a credential refused
    ├── ResourceExhausted       RESOURCE_EXHAUSTED: a gRPC limit, never a quota decision
    ├── Unimplemented           UNIMPLEMENTED: the sidecar does not serve this RPC or setting
    ├── Internal                INTERNAL or UNKNOWN: a fault inside the sidecar
    └── Unavailable             the sidecar gave no answer: UNAVAILABLE after the retries
        │                       (not reachable, or its ledger cannot commit)
        └── DeadlineExceeded    DEADLINE_EXCEEDED: no answer within the call's deadline

Quota exhaustion is never an exception: it is a decision (DENY, DEFER, EXPIRED) with a
reason. The check calls (`check_send`, `check_send_batch`, `check_contact_add`,
`check_enroll`) do not raise `Unavailable`; they return the client's fail-open or
fail-closed decision marked `fallback=True` instead.
"""

from __future__ import annotations

import grpc


class QuotaError(Exception):
    """A call the sidecar did not answer with a result."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    @property
    def code_name(self) -> str:
        """The status code's name, e.g. "NOT_FOUND"."""
        return self.code.name


class InvalidArgument(QuotaError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(QuotaError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(QuotaError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(QuotaError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(QuotaError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unimplemented(QuotaError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(QuotaError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(QuotaError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(Unavailable):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[QuotaError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unimplemented,
        Internal,
        Unavailable,
        DeadlineExceeded,
    )
}
_BY_CODE[grpc.StatusCode.UNKNOWN] = Internal


def error_from_status(code: grpc.StatusCode, details: str | None) -> QuotaError:
    """The exception for a gRPC status, carrying the sidecar's message."""
    cls = _BY_CODE.get(code, QuotaError)
    return cls(details or code.name, code)
