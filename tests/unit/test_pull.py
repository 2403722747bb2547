"""Image references, and pulling from a registry into the content store: a real HTTP exchange
with a small registry served here (a bearer-token challenge, an index, a redirect for blobs),
into a real content store and metadata. Unpacking (it mounts) is tested in interop."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ketch import errdefs
from ketch.content import ContentStore
from ketch.diff.service import DiffService
from ketch.images import ImageService
from ketch.distribution.manifests import chain_ids, host_platform
from ketch.distribution.reference import parse
from ketch.images.pull import Puller
from ketch.metadata import Store
from ketch.snapshots.service import SnapshotService
from ketch.testing import images

NS = "pulltest"


@pytest.mark.parametrize(("ref", "want"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("index.docker.io/team/app:v1", "docker.io/team/app:v1"),
    ("registry.k8s.io/pause:3.6", "registry.k8s.io/pause:3.6"),
    ("localhost/app", "localhost/app:latest"),
    ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000/a/b/c:t"),
    ("quay.io/x/y@sha256:" + "a" * 64, "quay.io/x/y@sha256:" + "a" * 64),
    ("quay.io/x/y:t@sha256:" + "a" * 64, "quay.io/x/y:t@sha256:" + "a" * 64),
])
def test_references_normalize_as_dockers(ref: str, want: str) -> None:
    assert str(parse(ref)) == want


@pytest.mark.parametrize("ref", ["", "Upper/case", "a//b", "x:bad tag", "x@sha256:short", " busybox", "-x"])
def test_bad_references_are_invalid_argument(ref: str) -> None:
    with pytest.raises(errdefs.InvalidArgument, match="invalid reference format"):
        parse(ref)


def test_chain_ids_follow_the_oci_rule() -> None:
    a, b = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    assert chain_ids([a, b]) == [a, "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()]


class _Registry(http.server.BaseHTTPRequestHandler):
    """Serves ``repo`` with a bearer token from /token (basic credentials ``u:p``); blobs
    answer with a redirect to /storage, which must not get the token."""

    blobs: dict[str, tuple[str, bytes]] = {}
    tags: dict[str, str] = {}
    seen: list[tuple[str, str]] = []
    corrupt: set[str] = set()

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization", "")
        self.seen.append((self.path, auth))
        host = f"127.0.0.1:{self.server.server_address[1]}"
        if self.path.startswith("/token"):
            good = "Basic " + base64.b64encode(b"u:p").decode()
            if auth != good or "scope=repository%3Arepo%3Apull" not in self.path:
                return self._send(401)
            return self._send(200, json.dumps({"token": "T0K"}).encode())
        if self.path.startswith("/storage/"):
            digest = self.path.rsplit("/", 1)[1]
            media, data = self.blobs[digest]
            if digest in self.corrupt:
                data = data[:-1] + bytes([data[-1] ^ 1])
            return self._send(200, data)
        if auth != "Bearer T0K":
            return self._send(401, headers={"WWW-Authenticate":
                                            f'Bearer realm="http://{host}/token",service="test",scope="x"'})
        _, v2, repo, kind, obj = self.path.split("/")
        if repo != "repo":
            return self._send(404)
        digest = self.tags.get(obj, obj)
        if digest not in self.blobs:
            return self._send(404)
        media, data = self.blobs[digest]
        if kind == "blobs":
            return self._send(307, headers={"Location": f"http://{host}/storage/{digest}"})
        return self._send(200, data, {"Content-Type": media, "Docker-Content-Digest": digest})


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, images.Image, images.Blob]]:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hello").write_text("hi\n")
    image = images.image_from_dir(root, "x")
    index = images.Blob(images.INDEX, json.dumps({"schemaVersion": 2, "manifests": [
        image.manifest.descriptor(platform={"architecture": "s390x", "os": "linux"}),
        image.manifest.descriptor(platform={"architecture": host_platform()[1], "os": "linux"}),
    ]}).encode())
    _Registry.blobs = {b.digest: (b.media_type, b.data) for b in (*image.blobs, index)}
    _Registry.tags = {"v1": index.digest}
    _Registry.seen = []
    _Registry.corrupt = set()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", image, index
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def puller(tmp_path: Path) -> Iterator[tuple[Puller, Store, ContentStore]]:
    with Store(tmp_path / "meta.db") as store:
        content = ContentStore(tmp_path / "content", store)
        events: list[object] = []
        snapshots = SnapshotService({}, store.leases, lambda ns, ev: events.append(ev), lambda: None)
        yield Puller(content, ImageService(store), snapshots, DiffService(content), store.leases), store, content


def test_pull_follows_the_token_challenge_and_labels_for_gc(
        served: tuple[str, images.Image, images.Blob], puller: tuple[Puller, Store, ContentStore]) -> None:
    address, image, index = served
    p, store, content = puller
    pulled = asyncio.run(p.pull(NS, f"{address}/repo:v1", credentials=lambda host: ("u", "p"), unpack=False))
    assert pulled.image.name == f"{address}/repo:v1"
    assert pulled.image.target.digest == index.digest and pulled.manifest.digest == image.manifest.digest
    assert pulled.config.digest == image.config.digest and pulled.size > 0
    stored = {info.digest: info.labels for info in content.list(NS)}
    assert set(stored) == {b.digest for b in (*image.blobs, index)}
    assert stored[index.digest]["containerd.io/gc.ref.content.m.0"] == image.manifest.digest
    assert stored[image.manifest.digest]["containerd.io/gc.ref.content.config"] == image.config.digest
    assert stored[image.manifest.digest]["containerd.io/gc.ref.content.l.0"] == image.layers[0].digest
    assert stored[image.layers[0].digest][f"containerd.io/distribution.source.{address}"] == "repo"
    # the token went to the registry, never to where blobs were redirected
    assert all(auth == "" for path, auth in _Registry.seen if path.startswith("/storage/"))
    assert any(auth == "Bearer T0K" for path, auth in _Registry.seen if path.startswith("/v2/"))
    # the pull's lease is gone: the image record holds what it fetched
    assert store.leases.list(NS) == []


def test_pull_errors_are_clear_and_leave_no_image(
        served: tuple[str, images.Image, images.Blob], puller: tuple[Puller, Store, ContentStore]) -> None:
    address, image, index = served
    p, store, content = puller
    with pytest.raises(errdefs.PermissionDenied, match="refused the credentials"):
        asyncio.run(p.pull(NS, f"{address}/repo:v1", credentials=lambda host: ("u", "wrong"), unpack=False))
    with pytest.raises(errdefs.NotFound, match="not found"):
        asyncio.run(p.pull(NS, f"{address}/repo:v2", credentials=lambda host: ("u", "p"), unpack=False))
    _Registry.corrupt = {image.layers[0].digest}
    with pytest.raises(errdefs.DataLoss, match="does not match"):
        asyncio.run(p.pull(NS, f"{address}/repo:v1", credentials=lambda host: ("u", "p"), unpack=False))
    with pytest.raises(errdefs.Unavailable, match="cannot reach"):
        asyncio.run(p.pull(NS, "127.0.0.1:1/repo:v1", unpack=False))
    assert ImageService(store).list(NS) == []
    assert store.leases.list(NS) == []
