"""The runtime: tasks (a container's processes, in a shim) and the shims that serve them.

A Python caller (a gRPC servicer, the CRI layer, tests) uses :class:`TaskManager` to create,
find and delete tasks, and the :class:`Task` objects it returns for everything else; nothing
outside this package builds a shim request.
"""

from __future__ import annotations

from ketch.runtime.manager import CreateOptions, ShimGroup, TaskManager
from ketch.runtime.shim import Launcher, ShimClient, ShimLauncher, ShimParams, Stdio
from ketch.runtime.task import UNKNOWN_EXIT, Exit, Phase, Task

__all__ = [
    "UNKNOWN_EXIT",
    "CreateOptions",
    "Exit",
    "Launcher",
    "Phase",
    "ShimClient",
    "ShimGroup",
    "ShimLauncher",
    "ShimParams",
    "Stdio",
    "Task",
    "TaskManager",
]
