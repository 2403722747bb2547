"""ketch: a container supervisor that does containerd's job and speaks its protocols.

``from ketch import Client, AsyncClient`` gives the client library (:mod:`ketch.client`),
loaded on first use: the shim's start path imports this package and must stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ketch.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Client", "AsyncClient"):
        import ketch.client

        return getattr(ketch.client, name)
    raise AttributeError(f"module 'ketch' has no attribute {name!r}")
