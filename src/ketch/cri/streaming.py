"""The CRI streaming server: where the URLs that Exec, Attach and PortForward answer point.

The RuntimeService call records the request under a random single-use token that expires
after :data:`TOKEN_TTL` (as the kubelet's streaming server) and answers
``http://<address>:<port>/{exec,attach,portforward}/<token>``. The client (kubectl through the
kubelet, crictl, critest: Kubernetes' client-go) connects there and asks for an HTTP/1.1
upgrade to SPDY/3.1, naming the protocols it speaks in ``X-Stream-Protocol-Version`` headers:

* exec and attach: ``v4.channel.k8s.io`` (the exit status as a JSON metav1.Status on the error
  stream), ``v3`` (adds a resize stream), ``v2``, ``channel.k8s.io``; the client opens one
  stream per part (``streamType`` header: error, stdin, stdout, stderr, resize); once those the
  request asked for are there, the process runs;
* port forward: ``portforward.k8s.io``; per forwarded connection the client opens an error
  stream and a data stream, both with ``port`` and ``requestID`` headers; the data is copied
  to and from 127.0.0.1:<port> inside the pod's network namespace, and a failure is written to
  the error stream.

The first protocol of the client's list that we speak is chosen, as Kubernetes'
httpstream.Handshake does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ketch import errdefs, spdy
from ketch.api.k8s.cri.runtime.v1 import api_pb2 as cri
from ketch.cri.containers import StreamIO

__all__ = ["StreamServer", "TOKEN_TTL", "Runtime", "REMOTECOMMAND_PROTOCOLS", "PORTFORWARD_PROTOCOL"]

log = logging.getLogger("ketch.cri.streaming")

#: how long an Exec/Attach/PortForward URL may wait for its client
TOKEN_TTL = 60.0
#: the most requests waiting for their client at once (as the kubelet's token cache)
MAX_TOKENS = 1000
#: how long a client has to open the streams of an exec or attach
STREAM_CREATION_TIMEOUT = 30.0
#: how long a client has to send its request
REQUEST_TIMEOUT = 30.0

V4, V3, V2, V1 = "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"
REMOTECOMMAND_PROTOCOLS = (V4, V3, V2, V1)
PORTFORWARD_PROTOCOL = "portforward.k8s.io"


class Runtime(Protocol):
    """What the streaming server runs requests on (the CRI's containers and pods)."""

    async def exec(self, ref: str, cmd: list[str], tty: bool, io: StreamIO) -> int: ...

    async def attach(self, ref: str, io: StreamIO) -> None: ...

    async def port_forward(self, sandbox_id: str, port: int) -> socket.socket: ...


Request = cri.ExecRequest | cri.AttachRequest | cri.PortForwardRequest


@dataclass
class _Pending:
    request: Request
    expires: float


class _HttpError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


class StreamServer:
    def __init__(self, runtime: Runtime, address: str = "127.0.0.1", port: int = 0) -> None:
        self._runtime = runtime
        self._address = address or "127.0.0.1"
        self._port = port
        self._pending: dict[str, _Pending] = {}
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._address, self._port)
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("CRI streaming server on %s", self.base_url)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in list(self._sessions):
            session.cancel()
        if self._sessions:
            await asyncio.wait(self._sessions, timeout=5)

    @property
    def base_url(self) -> str:
        host = f"[{self._address}]" if ":" in self._address else self._address
        return f"http://{host}:{self._port}"

    # -- tokens -----------------------------------------------------------------------------

    def url(self, request: Request) -> str:
        """Keep ``request`` for its client; the URL it is to come to."""
        now = time.monotonic()
        for token in [t for t, p in self._pending.items() if p.expires <= now]:
            del self._pending[token]
        if len(self._pending) >= MAX_TOKENS:
            raise errdefs.ResourceExhausted("too many streaming requests are waiting for their client; try again")
        token = secrets.token_urlsafe(24)
        self._pending[token] = _Pending(request, now + TOKEN_TTL)
        kind = {"ExecRequest": "exec", "AttachRequest": "attach", "PortForwardRequest": "portforward"}[
            type(request).__name__]
        return f"{self.base_url}/{kind}/{token}"

    def _take(self, kind: str, token: str) -> Request:
        pending = self._pending.pop(token, None)
        if pending is None or pending.expires <= time.monotonic():
            raise _HttpError(404, "Not Found", "unknown or expired streaming token")
        want = {"exec": cri.ExecRequest, "attach": cri.AttachRequest, "portforward": cri.PortForwardRequest}[kind]
        if not isinstance(pending.request, want):
            raise _HttpError(404, "Not Found", f"the token is not for {kind}")
        return pending.request

    # -- HTTP -------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await self._session(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - one client's failure is logged, the server goes on
            log.exception("streaming session failed")
        finally:
            self._sessions.discard(task)
            if not writer.is_closing():
                writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            return
        try:
            kind, token, headers = _parse_head(head)
            request = self._take(kind, token)
            upgrade = ",".join(headers.get("upgrade", [])).lower()
            if "spdy/3.1" not in upgrade:
                raise _HttpError(400, "Bad Request", "this endpoint speaks SPDY/3.1: ask for an upgrade to it")
            offered = [p.strip() for v in headers.get("x-stream-protocol-version", []) for p in v.split(",")]
            served = (PORTFORWARD_PROTOCOL,) if kind == "portforward" else REMOTECOMMAND_PROTOCOLS
            protocol = next((p for p in offered if p in served), None)
            if offered and protocol is None:
                raise _HttpError(403, "Forbidden", f"none of the protocols {offered} is served here: "
                                                   f"{', '.join(served)}")
        except _HttpError as e:
            body = f"{e}\n".encode()
            writer.write(f"HTTP/1.1 {e.status} {e.reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            return
        chosen = f"X-Stream-Protocol-Version: {protocol}\r\n" if protocol else ""
        writer.write(("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                      f"{chosen}\r\n").encode())
        await writer.drain()
        conn = spdy.ServerConnection(reader, writer)
        try:
            if isinstance(request, cri.PortForwardRequest):
                await self._port_forward(conn, request)
            else:
                await self._remote_command(conn, request, protocol or V1)
        finally:
            await conn.close()

    # -- exec and attach ----------------------------------------------------------------------

    async def _remote_command(self, conn: spdy.ServerConnection, request: cri.ExecRequest | cri.AttachRequest,
                              protocol: str) -> None:
        expected = {"error"}
        if request.stdin:
            expected.add("stdin")
        if request.stdout:
            expected.add("stdout")
        if request.stderr and not request.tty:
            expected.add("stderr")
        if request.tty and protocol in (V4, V3):
            expected.add("resize")
        streams: dict[str, spdy.Stream] = {}
        try:
            await asyncio.wait_for(_gather_streams(conn, expected, streams), STREAM_CREATION_TIMEOUT)
        except asyncio.TimeoutError:
            log.info("streaming client opened %s of the streams %s in time; giving up", sorted(streams),
                     sorted(expected))
            return
        if "error" not in streams:
            return  # the connection ended first

        def writer(name: str) -> Callable[[bytes], Awaitable[None]] | None:
            stream = streams.get(name)
            return stream.write if stream is not None else None

        stdin = streams.get("stdin")
        resize = streams.get("resize")
        io = StreamIO(stdin=stdin.read if stdin is not None else None, stdout=writer("stdout"),
                      stderr=writer("stderr"), resizes=_sizes(resize) if resize is not None else None)
        if isinstance(request, cri.ExecRequest):
            run: Awaitable[Any] = self._runtime.exec(request.container_id, list(request.cmd), request.tty, io)
        else:
            run = self._runtime.attach(request.container_id, io)
        running = asyncio.ensure_future(run)
        gone = asyncio.ensure_future(conn.done.wait())
        try:
            await asyncio.wait([running, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not running.done():  # the client went away: so does what it ran
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await running
                return
        for name in ("stdout", "stderr"):
            if name in streams:
                await streams[name].close()
        error = streams["error"]
        failure = running.exception()
        if isinstance(request, cri.ExecRequest) and failure is None and running.result() != 0:
            code = running.result()
            message = (f"command terminated with non-zero exit code: error executing command {list(request.cmd)}, "
                       f"exit code {code}")
            await error.write(_status(protocol, message, "NonZeroExitCode", 500,
                                      {"causes": [{"reason": "ExitCode", "message": str(code)}]}))
        elif failure is not None:
            log.info("streaming %s of %s: %s", type(request).__name__, request.container_id, failure)
            await error.write(_status(protocol, f"Internal error occurred: {_message(failure)}", "InternalError",
                                      500, {"causes": [{"message": _message(failure)}]}))
        elif protocol == V4:
            await error.write(json.dumps({"metadata": {}, "status": "Success"}).encode())
        await error.close()

    # -- port forward -------------------------------------------------------------------------

    async def _port_forward(self, conn: spdy.ServerConnection, request: cri.PortForwardRequest) -> None:
        pairs: dict[str, dict[str, spdy.Stream]] = {}
        forwards: set[asyncio.Task[None]] = set()
        try:
            while (stream := await conn.accept()) is not None:
                kind, rid = stream.headers.get("streamtype", ""), stream.headers.get("requestid", "")
                if kind not in ("data", "error"):
                    await stream.reset()
                    continue
                pair = pairs.setdefault(rid, {})
                if kind in pair:
                    await stream.reset()
                    continue
                pair[kind] = stream
                if len(pair) == 2:
                    del pairs[rid]
                    t = asyncio.ensure_future(self._forward(request.pod_sandbox_id, pair["data"], pair["error"]))
                    forwards.add(t)
                    t.add_done_callback(forwards.discard)
        finally:
            for t in list(forwards):
                t.cancel()
            if forwards:
                await asyncio.wait(forwards, timeout=5)

    async def _forward(self, sandbox_id: str, data: spdy.Stream, error: spdy.Stream) -> None:
        raw = data.headers.get("port", "")
        try:
            port = int(raw)
            if not 0 < port < 65536:
                raise ValueError
        except ValueError:
            await error.write(f"invalid port {raw!r}: a port is 1 to 65535".encode())
            await error.close()
            await data.close()
            return
        try:
            sock = await self._runtime.port_forward(sandbox_id, port)
        except (OSError, errdefs.KetchError) as e:
            await error.write(f"failed to connect to localhost:{port} inside namespace of pod {sandbox_id}: "
                              f"{_message(e)}".encode())
            await error.close()
            await data.close()
            return
        reader, writer = await asyncio.open_connection(sock=sock)

        async def inbound() -> None:  # client -> pod
            while chunk := await data.read():
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        async def outbound() -> None:  # pod -> client
            while chunk := await reader.read(1 << 16):
                await data.write(chunk)
            await data.close()

        copies = [asyncio.ensure_future(inbound()), asyncio.ensure_future(outbound())]
        try:
            await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
            if copies[1].done():
                # the pod's end closed: what the client still sends goes nowhere; give it a moment
                await asyncio.wait(copies, timeout=1)
            else:
                await copies[1]
        except (ConnectionError, OSError) as e:
            await error.write(f"port forward to {port}: {e}".encode())
        finally:
            for c in copies:
                c.cancel()
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await data.close()
                await error.close()


async def _gather_streams(conn: spdy.ServerConnection, expected: set[str], streams: dict[str, spdy.Stream]) -> None:
    while not expected <= streams.keys():
        stream = await conn.accept()
        if stream is None:
            return
        kind = stream.headers.get("streamtype", "")
        if kind not in expected or kind in streams:
            await stream.reset()
            continue
        streams[kind] = stream


async def _sizes(stream: spdy.Stream) -> AsyncIterator[tuple[int, int]]:
    """The terminal sizes the client sends: JSON objects {"Width": w, "Height": h}, one after
    another (client-go writes each with a newline)."""
    decoder = json.JSONDecoder()
    buf = ""
    while chunk := await stream.read():
        buf += chunk.decode(errors="replace")
        while True:
            buf = buf.lstrip()
            if not buf:
                break
            try:
                size, end = decoder.raw_decode(buf)
            except json.JSONDecodeError:
                break
            buf = buf[end:]
            if isinstance(size, dict):
                yield int(size.get("Width", 0)), int(size.get("Height", 0))


def _status(protocol: str, message: str, reason: str, code: int, details: dict[str, Any]) -> bytes:
    """A failure as the protocol reports it: a metav1.Status for v4, its message before."""
    if protocol != V4:
        return message.encode()
    return json.dumps({"metadata": {}, "status": "Failure", "message": message, "reason": reason,
                       "details": details, "code": code}).encode()


def _message(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _parse_head(head: bytes) -> tuple[str, str, dict[str, list[str]]]:
    """(kind, token, headers by lower-case name) of an HTTP/1.1 request head."""
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise _HttpError(400, "Bad Request", "malformed request line") from None
    if not version.startswith("HTTP/1."):
        raise _HttpError(400, "Bad Request", f"{version} is not spoken here")
    if method not in ("GET", "POST"):
        raise _HttpError(405, "Method Not Allowed", f"{method} is not allowed here")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _HttpError(400, "Bad Request", f"malformed header line {line!r}")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    parts = target.split("?", 1)[0].strip("/").split("/")
    if len(parts) != 2 or parts[0] not in ("exec", "attach", "portforward"):
        raise _HttpError(404, "Not Found", f"no such streaming endpoint {target!r}")
    return parts[0], parts[1], headers
