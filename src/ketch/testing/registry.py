"""A private docker-registry (Debian's, distribution 2.8) on a loopback port, plain HTTP, with
optional htpasswd authentication; and a push of locally built blobs and manifests into it."""

from __future__ import annotations

import base64
import contextlib
import http.client
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from ketch.testing import images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bcrypt(password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # the registry's htpasswd wants bcrypt, which glibc's crypt makes

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))


class Registry:
    def __init__(self, address: str, credentials: tuple[str, str] | None) -> None:
        self.address = address
        self.credentials = credentials

    def _headers(self) -> dict[str, str]:
        if self.credentials is None:
            return {}
        token = base64.b64encode(":".join(self.credentials).encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                 ) -> http.client.HTTPResponse:
        host, port = self.address.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request(method, path, body=body, headers={**self._headers(), **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp

    def push(self, repo: str, tag: str, blobs: Sequence[images.Blob], manifest: images.Blob) -> None:
        """The distribution API's monolithic upload of ``blobs``, then ``manifest`` as ``tag``."""
        for blob in blobs:
            resp = self._request("POST", f"/v2/{repo}/blobs/uploads/")
            assert resp.status == 202, resp.status
            location = resp.getheader("Location") or ""
            path = location.split(self.address, 1)[-1] if "://" in location else location
            sep = "&" if "?" in path else "?"
            resp = self._request("PUT", f"{path}{sep}digest={blob.digest}", blob.data,
                                 {"Content-Type": "application/octet-stream"})
            assert resp.status == 201, (resp.status, blob.digest)
        resp = self._request("PUT", f"/v2/{repo}/manifests/{tag}", manifest.data, {"Content-Type": manifest.media_type})
        assert resp.status == 201, resp.status

    def push_image(self, repo: str, tag: str, image: images.Image) -> None:
        self.push(repo, tag, [image.config, *image.layers], image.manifest)


@contextlib.contextmanager
def serving(base: Path, credentials: tuple[str, str] | None = None) -> Iterator[Registry]:
    """docker-registry under ``base`` on a free loopback port, until the block ends (ended by
    PID); with ``credentials``, every request needs them (htpasswd)."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise RuntimeError("docker-registry is not installed (Debian's docker-registry package; scripts/setup)")
    port = _free_port()
    auth = ""
    if credentials is not None:
        (base / "htpasswd").write_text(f"{credentials[0]}:{_bcrypt(credentials[1])}\n")
        auth = f"auth:\n  htpasswd:\n    realm: ketch-test\n    path: {base}/htpasswd\n"
    config = base / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {base}/data\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n{auth}")
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield Registry(f"127.0.0.1:{port}", credentials)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
