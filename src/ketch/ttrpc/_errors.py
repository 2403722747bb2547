"""Protocol errors of the sans-IO core, split by whose fault they are.

* LocalProtocolError: *we* asked the core for something the protocol does not allow
  (answer a stream that has no request, send more than 4 MiB, send a request as a server).
  It is raised by the ``send_*`` methods and points at a bug in the caller, or, for the
  size limit, at a message too big to send.
* RemoteProtocolError: the *peer* sent bytes that break the protocol beyond what a per-stream
  answer can repair. Raised by ``next_event``.

Most remote mistakes in ttrpc concern one stream (an oversize frame, an even stream id, a
payload that is not a Request). The core does not raise for those: it reports them as a
ProtocolErrorEvent with the answer to send, and the connection carries on.

Each error carries the gRPC ``code`` (an ``errdefs.Code``) that best describes it, so the
asyncio adapter can turn it into an errdefs error in one place.
"""

from __future__ import annotations

from ketch.errdefs import Code


class ProtocolError(Exception):
    """A ttrpc protocol violation; see LocalProtocolError and RemoteProtocolError."""

    def __init__(self, message: str, code: Code = Code.INTERNAL) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message)
        #: the status code a peer or caller should see for this error
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""
