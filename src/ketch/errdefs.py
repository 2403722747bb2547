"""One error taxonomy for all of ketch, converted once at each wire boundary.

Core code raises a subclass of :class:`KetchError` with a message naming what was wrong
(``container "web" in namespace "default"``). The ttrpc server and the gRPC servicers turn
it into a status with :func:`to_status`; clients turn a status back into the same class with
:func:`from_status`, so ``except NotFound`` works across a process boundary.

The codes are gRPC's (google.rpc.Code), which ttrpc carries unchanged. containerd's clients
append the class name to the message (``...: not found``); we do the same so that errors read
the same in ``ctr`` whichever daemon produced them.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    OK = 0  #: not an error
    CANCELLED = 1  #: the caller cancelled
    UNKNOWN = 2  #: an error with no better class
    INVALID_ARGUMENT = 3  #: the request itself is wrong, whatever the state
    DEADLINE_EXCEEDED = 4  #: the deadline passed before the operation finished
    NOT_FOUND = 5  #: the object named does not exist
    ALREADY_EXISTS = 6  #: an object with that name exists
    PERMISSION_DENIED = 7  #: the caller may not do this
    RESOURCE_EXHAUSTED = 8  #: a limit was hit (message size, disk)
    FAILED_PRECONDITION = 9  #: the object is not in a state that allows this
    ABORTED = 10  #: a conflict with a concurrent operation
    OUT_OF_RANGE = 11  #: past the end (an offset beyond a blob)
    UNIMPLEMENTED = 12  #: the operation is not supported
    INTERNAL = 13  #: an invariant broke
    UNAVAILABLE = 14  #: the peer cannot be reached right now
    DATA_LOSS = 15  #: unrecoverable data loss
    UNAUTHENTICATED = 16  #: the caller is not known


class KetchError(Exception):
    """Base of every error that crosses a boundary with a status code."""

    code: Code = Code.UNKNOWN
    #: the words containerd appends to a message of this class
    suffix: str = ""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        if self.suffix and not self.message.endswith(self.suffix):
            return f"{self.message}: {self.suffix}" if self.message else self.suffix
        return self.message


class Unknown(KetchError):
    code = Code.UNKNOWN


class Cancelled(KetchError):
    code = Code.CANCELLED
    suffix = "context canceled"


class InvalidArgument(KetchError):
    code = Code.INVALID_ARGUMENT
    suffix = "invalid argument"


class DeadlineExceeded(KetchError):
    code = Code.DEADLINE_EXCEEDED
    suffix = "context deadline exceeded"


class NotFound(KetchError):
    code = Code.NOT_FOUND
    suffix = "not found"


class AlreadyExists(KetchError):
    code = Code.ALREADY_EXISTS
    suffix = "already exists"


class PermissionDenied(KetchError):
    code = Code.PERMISSION_DENIED
    suffix = "permission denied"


class ResourceExhausted(KetchError):
    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(KetchError):
    code = Code.FAILED_PRECONDITION
    suffix = "failed precondition"


class Aborted(KetchError):
    code = Code.ABORTED


class OutOfRange(KetchError):
    code = Code.OUT_OF_RANGE


class Unimplemented(KetchError):
    code = Code.UNIMPLEMENTED
    suffix = "not implemented"


class Internal(KetchError):
    code = Code.INTERNAL


class Unavailable(KetchError):
    code = Code.UNAVAILABLE
    suffix = "unavailable"


class DataLoss(KetchError):
    code = Code.DATA_LOSS


class Unauthenticated(KetchError):
    code = Code.UNAUTHENTICATED


_BY_CODE: dict[int, type[KetchError]] = {
    cls.code: cls
    for cls in (
        Unknown, Cancelled, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}


def to_status(exc: BaseException) -> tuple[int, str]:
    """The (code, message) pair to send for ``exc``; anything not a KetchError is Unknown."""
    if isinstance(exc, KetchError):
        return int(exc.code), str(exc)
    return int(Code.UNKNOWN), str(exc) or type(exc).__name__


def from_status(code: int, message: str) -> KetchError:
    """The error a peer meant by ``(code, message)``; an unknown code becomes Unknown."""
    cls = _BY_CODE.get(code, Unknown)
    return cls(message)
