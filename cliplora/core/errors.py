"""Domain errors shared by every stage.

Each error carries the name of the gRPC status code it stands for, so the command line
and the gateway report the same code for the same fault. The mapping to real
`grpc.StatusCode` values lives in one place only (the gateway's error module); nothing
here imports grpc.
"""

from __future__ import annotations

from typing import ClassVar


class CliploraError(Exception):
    """Base class: a fault a user can act on, with a message that says how."""

    code: ClassVar[str] = "INTERNAL"


class InvalidArgument(CliploraError):
    """Bad input: a file, flag, image or request that cannot be used as given."""

    code = "INVALID_ARGUMENT"


class NotFound(CliploraError):
    """A model, version, file or pretrained tag that does not exist."""

    code = "NOT_FOUND"


class FailedPrecondition(CliploraError):
    """The inputs are well formed but the operation must not go on
    (verification failed, a no-op adapter, a repository conflict)."""

    code = "FAILED_PRECONDITION"


class PermissionDenied(CliploraError):
    """A file or folder that cannot be read or written."""

    code = "PERMISSION_DENIED"


class Unavailable(CliploraError):
    """A service (Triton, a weights hub) that cannot be reached now."""

    code = "UNAVAILABLE"


class ResourceExhausted(CliploraError):
    """Too much work or data at once."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(CliploraError):
    """The caller's deadline passed before the answer was ready."""

    code = "DEADLINE_EXCEEDED"
