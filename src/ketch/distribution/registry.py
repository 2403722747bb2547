"""A client for the OCI distribution API (a registry's ``/v2/``): resolve a reference to a
manifest descriptor, fetch manifests and blobs. Blocking (urllib): callers run it in a thread.

- HTTPS everywhere but on loopback hosts (``localhost``, ``127.0.0.1``, ``[::1]``), which are
  spoken to in plain HTTP, as containerd's CRI does by default (``plain_http`` decides
  otherwise); Docker Hub is ``registry-1.docker.io``.
- The proxy comes from the environment (``HTTPS_PROXY``, ``NO_PROXY``), the trusted CAs from
  the system and ``SSL_CERT_FILE``/``SSL_CERT_DIR``.
- Authentication as the registry asks in its 401: ``Bearer`` (a token from the realm it
  names, for the repository's pull scope, with the credentials if any) or ``Basic``.
  Credentials are never sent to a host a blob download is redirected to.
- Errors: NotFound for an unknown repository, manifest or blob; PermissionDenied when the
  registry refuses the credentials; Unavailable when it cannot be reached.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from ketch import errdefs
from ketch.distribution import manifests
from ketch.distribution.manifests import INDEX_TYPES
from ketch.distribution.reference import DOCKER_HUB, Reference

__all__ = ["MANIFEST_TYPES", "Credentials", "Fetched", "Registry", "RemoteDescriptor"]

#: what a manifest request accepts: an index or a single-platform manifest, OCI or Docker
MANIFEST_TYPES = (*INDEX_TYPES, *manifests.MANIFEST_TYPES)

#: (username, password) for a registry host, or None
Credentials = Callable[[str], "tuple[str, str] | None"]

_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class RemoteDescriptor:
    media_type: str
    digest: str
    size: int


@dataclass
class Fetched:
    """An open response: read it, then close it."""

    body: IO[bytes]
    size: int

    def close(self) -> None:
        self.body.close()


def _no_credentials(host: str) -> tuple[str, str] | None:
    return None


class Registry:
    def __init__(self, credentials: Credentials = _no_credentials, *, timeout: float = 60.0,
                 plain_http: bool | None = None) -> None:
        self._credentials = credentials
        self._timeout = timeout
        self._plain_http = plain_http
        self._tokens: dict[tuple[str, str], str] = {}  # (host, repository) -> Authorization header
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ssl.create_default_context()))

    def endpoint(self, ref: Reference) -> str:
        host = "registry-1.docker.io" if ref.domain == DOCKER_HUB else ref.domain
        plain = self._plain_http
        if plain is None:
            plain = host.rsplit(":", 1)[0] in _LOOPBACK or host.startswith("[::1]")
        return f"{'http' if plain else 'https'}://{host}/v2/{ref.path}"

    def resolve(self, ref: Reference) -> RemoteDescriptor:
        """The descriptor of the manifest (or index) ``ref`` names."""
        url = f"{self.endpoint(ref)}/manifests/{ref.object}"
        with self._open(ref, url, "HEAD", accept=MANIFEST_TYPES) as resp:
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            digest = resp.headers.get("Docker-Content-Digest", "")
            size = int(resp.headers.get("Content-Length") or -1)
        if ref.digest:
            digest = ref.digest
        if not digest or size < 0 or media_type not in MANIFEST_TYPES:
            # the headers are not enough: fetch the manifest and look at it
            import hashlib

            with self._open(ref, url, "GET", accept=MANIFEST_TYPES) as resp:
                body = resp.read()
                media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            digest = ref.digest or f"sha256:{hashlib.sha256(body).hexdigest()}"
            size = len(body)
            if media_type not in MANIFEST_TYPES:
                media_type = json.loads(body).get("mediaType", "") or media_type
        if media_type not in MANIFEST_TYPES:
            raise errdefs.Unimplemented(f"{ref}: unsupported manifest media type {media_type!r}")
        return RemoteDescriptor(media_type, digest, size)

    def fetch(self, ref: Reference, desc: RemoteDescriptor, *, manifest: bool = False) -> Fetched:
        """Open the manifest or blob ``desc`` of ``ref``'s repository for reading."""
        kind = "manifests" if manifest else "blobs"
        resp = self._open(ref, f"{self.endpoint(ref)}/{kind}/{desc.digest}", "GET",
                          accept=(desc.media_type,) if manifest else ())
        return Fetched(resp, int(resp.headers.get("Content-Length") or desc.size))

    # -- requests and authentication ------------------------------------------------------

    def _open(self, ref: Reference, url: str, method: str, *, accept: tuple[str, ...] = ()) -> Any:
        key = (ref.domain, ref.path)
        for attempt in range(2):
            req = urllib.request.Request(url, method=method)
            if accept:
                req.add_header("Accept", ", ".join(accept))
            if key in self._tokens:  # unredirected: never sent to where a blob redirects
                req.add_unredirected_header("Authorization", self._tokens[key])
            try:
                return self._opener.open(req, timeout=self._timeout)
            except urllib.error.HTTPError as e:
                challenge = e.headers.get("WWW-Authenticate", "") if e.code == 401 else ""
                e.close()
                if challenge and attempt == 0:
                    self._tokens[key] = self._authorize(ref, challenge)
                    continue
                raise self._error(ref, url, e.code) from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise errdefs.Unavailable(f"{ref}: cannot reach {urllib.parse.urlsplit(url).netloc}: {reason}") from None
        raise AssertionError("unreachable")

    def _authorize(self, ref: Reference, challenge: str) -> str:
        scheme, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        creds = self._credentials(ref.domain)
        basic = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode() if creds else ""
        if scheme.lower() == "basic":
            if not basic:
                raise errdefs.PermissionDenied(f"{ref}: the registry asks for credentials and none are configured")
            return basic
        if scheme.lower() != "bearer" or "realm" not in params:
            raise errdefs.Unimplemented(f"{ref}: unsupported registry authentication {challenge!r}")
        query = {"scope": f"repository:{ref.path}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        req = urllib.request.Request(f"{params['realm']}?{urllib.parse.urlencode(query)}")
        if basic:
            req.add_unredirected_header("Authorization", basic)
        try:
            with self._opener.open(req, timeout=self._timeout) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in (401, 403):
                raise errdefs.PermissionDenied(f"{ref}: the registry's token service refused the credentials") from None
            raise errdefs.Unavailable(f"{ref}: token service {params['realm']} answered {e.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise errdefs.Unavailable(f"{ref}: token service {params['realm']}: {e}") from None
        token = answer.get("token") or answer.get("access_token")
        if not token:
            raise errdefs.Unavailable(f"{ref}: the token service gave no token")
        return f"Bearer {token}"

    @staticmethod
    def _error(ref: Reference, url: str, code: int) -> errdefs.KetchError:
        what = urllib.parse.urlsplit(url).path
        if code == 404:
            return errdefs.NotFound(f"{ref}: not found ({what})")
        if code in (401, 403):
            return errdefs.PermissionDenied(f"{ref}: the registry refused access ({code}); check the credentials")
        if code == 429:
            return errdefs.ResourceExhausted(f"{ref}: the registry's rate limit was reached")
        return errdefs.Unavailable(f"{ref}: the registry answered {code} for {what}")
