"""ketch's Python client for ketchd and containerd 1.6+ (gRPC only, so any such daemon).

``AsyncClient`` is the asyncio API; ``Client`` the same shape, blocking. Errors are ketch's
typed errors (``NotFound``, ``AlreadyExists``, ``FailedPrecondition``, ``Unavailable``…),
made from the daemon's gRPC status codes.
"""

from ketch.client._client import DEFAULT_RUNTIME, AsyncClient, TaskInfo, Version
from ketch.client._containers import Container
from ketch.client._events import Event
from ketch.client._images import Image
from ketch.client._io import Capture, LogURI, Stdio
from ketch.client._metrics import Metrics
from ketch.client._process import ExecResult, ExitStatus, Process, ProcessInfo, Status, Task
from ketch.client._sync import Client
from ketch.errdefs import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KetchError,
    NotFound,
    Unavailable,
    Unimplemented,
)

__all__ = [
    "DEFAULT_RUNTIME", "AlreadyExists", "AsyncClient", "Capture", "Client", "Container", "DeadlineExceeded", "Event", "ExecResult",
    "ExitStatus", "FailedPrecondition", "Image", "InvalidArgument", "KetchError", "LogURI", "Metrics", "NotFound", "Process",
    "ProcessInfo", "Status", "Stdio", "Task", "TaskInfo", "Unavailable", "Unimplemented", "Version",
]
