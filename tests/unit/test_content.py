"""ketch.content: blobs, resumable ingests, verified commits, namespaces, disk full."""

from __future__ import annotations

import errno
import gc as _pygc
import hashlib
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ketch import errdefs, topics
from ketch.content import ContentStore, Info, Writer, check_digest
from ketch.metadata import LeaseResource, Store


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


HELLO = b"hello, world\n"
HELLO_D = sha(HELLO)


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, Any]] = []

    def __call__(self, namespace: str, message: Any) -> None:
        self.seen.append((namespace, topics.of(message), message))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "meta.db") as s:
        yield s


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def cs(tmp_path: Path, store: Store, events: Events) -> ContentStore:
    return ContentStore(tmp_path / "content", store, publish=events, lock_timeout=0.05)


def put(cs: ContentStore, data: bytes, ns: str = "default", ref: str | None = None, **labels: str) -> Info:
    with cs.writer(ns, ref or f"put-{sha(data)}", total=len(data), expected=sha(data)) as w:
        w.write(data)
        return w.commit(len(data), sha(data), labels)


def blob_files(cs: ContentStore) -> set[str]:
    return {f"sha256:{n}" for n in os.listdir(os.path.join(cs.root, "blobs", "sha256"))}


def ingest_dirs(cs: ContentStore) -> list[str]:
    return os.listdir(os.path.join(cs.root, "ingest"))


# --- writing and reading -----------------------------------------------------------------------


def test_single_shot_write_and_commit(cs: ContentStore) -> None:
    w = cs.writer("default", "ref-1", total=len(HELLO), expected=HELLO_D)
    assert w.status().offset == 0 and w.status().total == len(HELLO)
    assert w.write(HELLO) == len(HELLO)
    assert w.digest() == HELLO_D
    info = w.commit(len(HELLO), HELLO_D, {"app": "x"})
    assert (info.digest, info.size, info.labels) == (HELLO_D, len(HELLO), {"app": "x"})
    assert cs.info("default", HELLO_D) == info
    path = cs.blob_path(HELLO_D)
    assert Path(path).read_bytes() == HELLO
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o222 == 0, "blobs are read-only"
    assert ingest_dirs(cs) == [], "the ingest is gone after commit"
    with pytest.raises(errdefs.NotFound):
        cs.status("default", "ref-1")
    with pytest.raises(errdefs.FailedPrecondition, match="closed"):
        w.write(b"more")


def test_write_in_chunks_with_offsets(cs: ContentStore) -> None:
    data = os.urandom(300_000)
    with cs.writer("default", "chunks") as w:
        for off in range(0, len(data), 65536):
            assert w.write(data[off:off + 65536], offset=off) == min(off + 65536, len(data))
        with pytest.raises(errdefs.OutOfRange, match=r"write @5 must occur at current offset 300000"):
            w.write(b"x", offset=5)
        info = w.commit(len(data), sha(data))
    assert info.size == len(data)
    with cs.reader("default", sha(data)) as r:
        assert r.read() == data


def test_offset_zero_restarts_the_write(cs: ContentStore) -> None:
    with cs.writer("default", "restart") as w:
        w.write(b"garbage that is thrown away")
        w.write(HELLO, offset=0)
        assert w.status().offset == len(HELLO)
        assert w.commit(0, HELLO_D).digest == HELLO_D


def test_resume_after_close(cs: ContentStore) -> None:
    data = os.urandom(100_000)
    w = cs.writer("default", "resumable", total=len(data))
    w.write(data[:40_000])
    w.close()
    st = cs.status("default", "resumable")
    assert (st.ref, st.offset, st.total) == ("resumable", 40_000, len(data))
    w2 = cs.writer("default", "resumable", total=len(data))
    assert w2.status().offset == 40_000
    assert w2.status().started_at == pytest.approx(st.started_at)
    w2.write(data[40_000:], offset=40_000)
    assert w2.commit(len(data), sha(data)).size == len(data)


def test_resume_after_a_crash(tmp_path: Path, store: Store) -> None:
    """The daemon dies mid-write (no close): a new process resumes from the data on disk."""
    data = os.urandom(70_000)
    crashed = ContentStore(tmp_path / "content", store)
    w = crashed.writer("default", "layer-0", total=len(data), expected=sha(data))
    w.write(data[:50_000])
    # a new daemon: a new ContentStore on the same root, a new Writer on the same ref
    reborn = ContentStore(tmp_path / "content", store)
    assert reborn.status("default", "layer-0").offset == 50_000
    w2 = reborn.writer("default", "layer-0", total=len(data), expected=sha(data))
    assert w2.status().offset == 50_000
    with pytest.raises(errdefs.OutOfRange):
        w2.write(data[40_000:], offset=40_000)
    w2.write(data[50_000:], offset=50_000)
    assert w2.commit(len(data), sha(data)).digest == sha(data)
    del w


def test_commit_with_wrong_digest_leaves_no_blob(cs: ContentStore) -> None:
    wrong = sha(b"something else")
    w = cs.writer("default", "bad-digest")
    w.write(HELLO)
    with pytest.raises(errdefs.FailedPrecondition) as info:
        w.commit(len(HELLO), wrong)
    assert str(info.value) == f"unexpected commit digest {HELLO_D}, expected {wrong}: failed precondition"
    assert blob_files(cs) == set()
    with pytest.raises(errdefs.NotFound):
        cs.info("default", HELLO_D)
    with pytest.raises(errdefs.NotFound):
        cs.info("default", wrong)
    # as containerd: the writer is closed, the ingest is kept for the client to abort or redo
    with pytest.raises(errdefs.FailedPrecondition):
        w.write(b"x")
    assert cs.status("default", "bad-digest").offset == len(HELLO)
    cs.abort("default", "bad-digest")
    assert ingest_dirs(cs) == []
    with pytest.raises(errdefs.NotFound, match="reference bad-digest"):
        cs.status("default", "bad-digest")


def test_commit_with_wrong_size_leaves_no_blob(cs: ContentStore) -> None:
    w = cs.writer("default", "bad-size")
    w.write(HELLO)
    with pytest.raises(errdefs.FailedPrecondition) as info:
        w.commit(len(HELLO) + 1, HELLO_D)
    assert str(info.value) == f"unexpected commit size {len(HELLO)}, expected {len(HELLO) + 1}: failed precondition"
    assert blob_files(cs) == set()
    # the ingest is resumable: a new writer can finish it properly
    with cs.writer("default", "bad-size") as w2:
        assert w2.status().offset == len(HELLO)
        assert w2.commit(len(HELLO), HELLO_D).digest == HELLO_D


def test_invalid_commit_labels_close_the_writer(cs: ContentStore) -> None:
    w = cs.writer("default", "labels")
    w.write(HELLO)
    with pytest.raises(errdefs.InvalidArgument, match="must hold a digest"):
        w.commit(0, "", {"containerd.io/gc.ref.content.l.0": "not-a-digest"})
    assert blob_files(cs) == set()
    with pytest.raises(errdefs.FailedPrecondition):
        w.commit()


def test_already_exists(cs: ContentStore) -> None:
    put(cs, HELLO)
    with pytest.raises(errdefs.AlreadyExists) as info:
        cs.writer("default", "again", expected=HELLO_D)
    assert str(info.value) == f"content {HELLO_D}: already exists"
    # without an expected digest the writer opens; the commit finds the blob and says so
    w = cs.writer("default", "again")
    w.write(HELLO)
    with pytest.raises(errdefs.AlreadyExists, match="content sha256:"):
        w.commit(len(HELLO), HELLO_D)
    assert ingest_dirs(cs) == [] and cs.list_statuses("default") == []
    assert [i.digest for i in cs.list("default")] == [HELLO_D]


def test_a_ref_has_one_live_writer(cs: ContentStore) -> None:
    w = cs.writer("default", "busy")
    with pytest.raises(errdefs.Unavailable) as info:
        cs.writer("default", "busy")
    assert str(info.value).startswith("ref busy locked for ")
    assert str(info.value).endswith(": unavailable")
    cs.writer("other", "busy").close()  # refs are per namespace
    w.close()
    cs.writer("default", "busy").close()
    # a shared write holds its ref too
    put(cs, HELLO, "ns-a")
    shared = cs.writer("ns-b", "take", expected=HELLO_D)
    with pytest.raises(errdefs.Unavailable):
        cs.writer("ns-b", "take", expected=HELLO_D)
    shared.commit()
    cs.writer("ns-b", "take").close()


def test_concurrent_writers_from_threads(cs: ContentStore) -> None:
    results: list[str] = []
    barrier = threading.Barrier(8)

    def run() -> None:
        barrier.wait()
        try:
            w = cs.writer("default", "contended")
        except errdefs.Unavailable:
            results.append("locked")
            return
        results.append("opened")
        threading.Event().wait(0.2)
        w.close()

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("opened") == 1 and results.count("locked") == 7


def test_a_dropped_writer_lets_go_of_its_ref(cs: ContentStore) -> None:
    w = cs.writer("default", "dropped")
    w.write(b"abc")
    del w
    _pygc.collect()
    with cs.writer("default", "dropped") as w2:
        assert w2.status().offset == 3


def test_read_at_ranges(cs: ContentStore) -> None:
    data = bytes(range(256)) * 40
    put(cs, data)
    with cs.reader("default", sha(data)) as r:
        assert r.size == len(data)
        assert r.read_at(0, 10) == data[:10]
        assert r.read_at(1000, 500) == data[1000:1500]
        assert r.read_at(len(data) - 5, 100) == data[-5:]
        assert r.read_at(len(data), 10) == b""
        with pytest.raises(errdefs.OutOfRange, match=f"read past object length {len(data)} bytes"):
            r.read_at(len(data) + 1, 1)
        assert r.read_at(-1, 1) == data[:1]  # the Read rules (test_content_read.py)
        r.seek(100)
        assert r.read(3) == data[100:103] and r.tell() == 103
    # the Read service's rules: size 0 = to the end, negative offset = 0, chunked
    assert b"".join(cs.read("default", sha(data), 0, 0, chunk_size=4096)) == data
    assert b"".join(cs.read("default", sha(data), -4, 10)) == data[:10]
    assert b"".join(cs.read("default", sha(data), 10_000, 1_000_000)) == data[10_000:]
    assert len(list(cs.read("default", sha(data), chunk_size=1000))) == 11
    with pytest.raises(errdefs.OutOfRange):
        cs.read("default", sha(data), len(data) + 1)
    with pytest.raises(errdefs.NotFound, match="content digest"):
        cs.reader("default", HELLO_D)


# --- records: info, list, update, delete ----------------------------------------------------------


def test_list_info_update_with_filters_and_fieldpaths(cs: ContentStore) -> None:
    a = put(cs, b"a", kind="config", app="one")
    b = put(cs, b"bb", kind="layer")
    c = put(cs, b"ccc")
    assert [i.digest for i in cs.list("default")] == sorted([a.digest, b.digest, c.digest])
    assert [i.digest for i in cs.list("default", ["labels.kind==layer"])] == [b.digest]
    assert {i.digest for i in cs.list("default", ["labels.kind"])} == {a.digest, b.digest}
    assert [i.digest for i in cs.list("default", [f"digest=={c.digest}"])] == [c.digest]
    assert [i.digest for i in cs.list("default", ["size==2"])] == [b.digest]
    assert {i.digest for i in cs.list("default", ["labels.kind==config", "size==3"])} == {a.digest, c.digest}
    with pytest.raises(errdefs.InvalidArgument):
        cs.list("default", ["labels.kind=="])

    # one label: set, change, remove; others untouched
    upd = cs.update("default", Info(a.digest, labels={"app": "two", "new": "1"}), ["labels.app"])
    assert upd.labels == {"kind": "config", "app": "two"} and upd.updated_at >= a.updated_at
    upd = cs.update("default", Info(a.digest, labels={}), ["labels.kind"])
    assert upd.labels == {"app": "two"}
    # all labels, with or without the path
    assert cs.update("default", Info(a.digest, labels={"x": "y"}), ["labels"]).labels == {"x": "y"}
    assert cs.update("default", Info(a.digest, labels={"z": "1", "empty": ""})).labels == {"z": "1"}
    assert cs.info("default", a.digest).labels == {"z": "1"}
    assert cs.info("default", a.digest).created_at == a.created_at and cs.info("default", a.digest).size == 1

    with pytest.raises(errdefs.InvalidArgument, match='cannot update "size" field on content info'):
        cs.update("default", Info(a.digest, size=5), ["size"])
    with pytest.raises(errdefs.NotFound, match=f"content digest {HELLO_D}: not found"):
        cs.update("default", Info(HELLO_D, labels={"a": "b"}))
    # gc references must be digests; any digest algorithm go-digest knows is fine
    with pytest.raises(errdefs.InvalidArgument, match="containerd.io/gc.ref.content.m.0"):
        cs.update("default", Info(a.digest, labels={"containerd.io/gc.ref.content.m.0": "nope"}))
    cs.update("default", Info(a.digest, labels={"containerd.io/gc.ref.content.m.0": b.digest,
                                                "containerd.io/gc.ref.snapshot.overlayfs": "any key"}))
    with pytest.raises(errdefs.InvalidArgument, match="greater than maximum size"):
        cs.update("default", Info(a.digest, labels={"big": "x" * 5000}))


def test_delete_drops_the_reference_and_publishes(cs: ContentStore, events: Events) -> None:
    put(cs, HELLO)
    cs.delete("default", HELLO_D)
    with pytest.raises(errdefs.NotFound):
        cs.info("default", HELLO_D)
    assert HELLO_D in blob_files(cs), "the file waits for garbage collection"
    ((ns, topic, msg),) = events.seen
    assert (ns, topic, type(msg).DESCRIPTOR.full_name, msg.digest) == (
        "default", "/content/delete", "containerd.events.ContentDelete", HELLO_D)
    with pytest.raises(errdefs.NotFound, match=f"content digest {HELLO_D}: not found"):
        cs.delete("default", HELLO_D)
    assert cs.sweep().blobs == (HELLO_D,)
    assert blob_files(cs) == set()


def test_digests_are_checked_before_any_path(cs: ContentStore) -> None:
    for bad in ("", "sha256:", "sha256:" + "A" * 64, "sha256:abc", "sha256:../../etc/passwd",
                "../../etc/passwd", "sha256:" + "0" * 63 + "/"):
        with pytest.raises(errdefs.InvalidArgument):
            cs.info("default", bad)
        with pytest.raises(errdefs.InvalidArgument):
            cs.blob_path(bad)
        if bad:  # no expected digest is fine for a writer
            with pytest.raises(errdefs.InvalidArgument):
                cs.writer("default", "r", expected=bad)
    sha512 = "sha512:" + "ab" * 64
    with pytest.raises(errdefs.Unimplemented, match="sha256 blobs only"):
        cs.info("default", sha512)
    with pytest.raises(errdefs.Unimplemented):
        cs.writer("default", "r", expected=sha512)
    assert check_digest(HELLO_D) == HELLO_D


def test_namespace_is_required(cs: ContentStore) -> None:
    with pytest.raises(errdefs.FailedPrecondition, match="namespace is required"):
        cs.writer("", "r")
    with pytest.raises(errdefs.InvalidArgument, match="namespace validation"):
        cs.list("a/b")
    with pytest.raises(errdefs.InvalidArgument, match="ref must not be empty"):
        cs.writer("default", "")


# --- namespaces ------------------------------------------------------------------------------------


def test_a_blob_is_seen_only_in_its_namespace(cs: ContentStore) -> None:
    put(cs, HELLO, "ns-a")
    assert cs.info("ns-a", HELLO_D).size == len(HELLO)
    with pytest.raises(errdefs.NotFound):
        cs.info("ns-b", HELLO_D)
    with pytest.raises(errdefs.NotFound):
        cs.reader("ns-b", HELLO_D)
    assert cs.list("ns-b") == []


def test_a_second_namespace_takes_an_existing_blob_without_data(cs: ContentStore) -> None:
    put(cs, HELLO, "ns-a", kind="a")
    put(cs, b"more", "ns-a")
    w = cs.writer("ns-b", "ref", total=0, expected=HELLO_D)
    st = w.status()
    assert (st.offset, st.total, st.expected) == (len(HELLO), len(HELLO), HELLO_D)
    assert cs.status("ns-b", "ref").offset == len(HELLO)
    assert ingest_dirs(cs) == [], "a shared write needs no ingest directory"
    info = w.commit(len(HELLO), HELLO_D, {"kind": "b"})
    assert info.labels == {"kind": "b"}
    assert cs.info("ns-a", HELLO_D).labels == {"kind": "a"}, "labels are per namespace"
    with cs.reader("ns-b", HELLO_D) as r:
        assert r.read() == HELLO
    assert cs.usage() == {"ns-a": (2, len(HELLO) + 4), "ns-b": (1, len(HELLO))}
    # deleting it in one namespace leaves it to the other
    cs.delete("ns-a", HELLO_D)
    assert cs.sweep().blobs == ()
    assert cs.info("ns-b", HELLO_D).size == len(HELLO)
    # for ketchd's metrics: what each namespace holds; each blob was ingested once
    assert cs.usage() == {"ns-a": (1, 4), "ns-b": (1, len(HELLO))}
    assert cs.ingested == len(HELLO) + 4


def test_a_shared_write_that_sends_data_anyway(cs: ContentStore) -> None:
    put(cs, HELLO, "ns-a")
    with cs.writer("ns-b", "ref", expected=HELLO_D) as w:
        w.write(HELLO, offset=0)  # the Write service's truncate-then-write
        assert w.commit(len(HELLO), HELLO_D).digest == HELLO_D
    with pytest.raises(errdefs.FailedPrecondition, match="unexpected commit size"):
        cs.writer("ns-c", "ref", expected=HELLO_D).commit(len(HELLO) + 1, HELLO_D)
    with pytest.raises(errdefs.NotFound):
        cs.info("ns-c", HELLO_D)
    # a size that disagrees with the blob on disk makes it an ordinary write
    w = cs.writer("ns-d", "ref", total=3, expected=HELLO_D)
    assert w.status().offset == 0 and w.status().expected == ""
    w.close()


def test_namespace_with_blobs_cannot_be_deleted(cs: ContentStore, store: Store) -> None:
    put(cs, HELLO, "busy")
    with pytest.raises(errdefs.FailedPrecondition) as info:
        store.namespaces.delete("busy")
    assert str(info.value) == 'namespace "busy" must be empty, but it still has blobs: failed precondition'
    cs.delete("busy", HELLO_D)
    cs.writer("busy", "left-over").close()  # ingests do not hold a namespace
    store.namespaces.delete("busy")


# --- ingests: statuses, abort, leases ----------------------------------------------------------------


def test_statuses_and_abort(cs: ContentStore) -> None:
    for ref in ("layer-1", "layer-2", "config"):
        with cs.writer("default", ref, total=10) as w:
            w.write(b"12345")
    cs.writer("other", "layer-9").close()
    assert [s.ref for s in cs.list_statuses("default")] == ["config", "layer-1", "layer-2"]
    assert [s.ref for s in cs.list_statuses("default", ["ref~=^layer-"])] == ["layer-1", "layer-2"]
    assert all(s.offset == 5 and s.total == 10 for s in cs.list_statuses("default"))
    cs.abort("default", "layer-1")
    with pytest.raises(errdefs.NotFound, match="reference layer-1: not found"):
        cs.abort("default", "layer-1")
    assert [s.ref for s in cs.list_statuses("default")] == ["config", "layer-2"]
    assert len(ingest_dirs(cs)) == 3


def test_abort_under_a_live_writer_fails_its_commit(cs: ContentStore) -> None:
    w = cs.writer("default", "raced")
    w.write(HELLO)
    cs.abort("default", "raced")
    with pytest.raises(errdefs.NotFound, match="aborted"):
        w.commit(len(HELLO), HELLO_D)
    assert blob_files(cs) == set()


def test_leases_hold_ingests_then_blobs(cs: ContentStore, store: Store) -> None:
    store.leases.create("default", "pull")
    w = cs.writer("default", "layer", lease="pull")
    assert store.leases.list_resources("default", "pull") == [LeaseResource("layer", "ingests")]
    assert store.content.get_ingest("default", "layer").expires_at is None
    w.write(HELLO)
    w.commit(len(HELLO), HELLO_D)
    assert store.leases.list_resources("default", "pull") == [LeaseResource(HELLO_D, "content")]
    # asking for a blob the namespace has still leases it (containerd does this before AlreadyExists)
    store.leases.create("default", "second")
    with pytest.raises(errdefs.AlreadyExists):
        cs.writer("default", "again", expected=HELLO_D, lease="second")
    assert store.leases.list_resources("default", "second") == [LeaseResource(HELLO_D, "content")]
    cs.delete("default", HELLO_D, lease="second")
    assert store.leases.list_resources("default", "second") == []
    with pytest.raises(errdefs.NotFound, match="lease"):
        cs.writer("default", "x", lease="missing")
    unleased = cs.writer("default", "unleased")
    assert store.content.get_ingest("default", "unleased").expires_at is not None
    unleased.close()


# --- disk full -----------------------------------------------------------------------------------


def _enospc_after(monkeypatch: pytest.MonkeyPatch, budget: int, code: int = errno.ENOSPC) -> None:
    """os.write writes ``budget`` bytes in all, then fails as a full disk does."""
    real_write = os.write
    left = [budget]

    def write(fd: int, data: Any) -> int:
        if left[0] <= 0:
            raise OSError(code, os.strerror(code))
        n = real_write(fd, bytes(data)[:left[0]])
        left[0] -= n
        return n

    monkeypatch.setattr(os, "write", write)


def test_disk_full_while_writing(cs: ContentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(10_000)
    w = cs.writer("default", "big", total=len(data))
    w.write(data[:4000])
    _enospc_after(monkeypatch, 2500)  # the next write gets half way, then the disk is full
    with pytest.raises(errdefs.ResourceExhausted) as info:
        w.write(data[4000:])
    assert str(info.value) == "no space left on device writing ingest big"
    assert w.status().offset == 4000, "the failed write is rolled back"
    assert os.path.getsize(os.path.join(cs._ingest_path(cs._store.content.get_ingest("default", "big").bref),
                                        "data")) == 4000
    assert blob_files(cs) == set()
    monkeypatch.undo()
    # space is back: the same writer goes on from where it was
    w.write(data[4000:], offset=4000)
    assert w.commit(len(data), sha(data)).digest == sha(data)


def test_quota_exceeded_while_writing(cs: ContentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    w = cs.writer("default", "quota")
    _enospc_after(monkeypatch, 0, errno.EDQUOT)
    with pytest.raises(errdefs.ResourceExhausted, match="disk quota exceeded writing ingest quota"):
        w.write(HELLO)
    monkeypatch.undo()
    w.close()


def test_disk_full_at_commit(cs: ContentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    w = cs.writer("default", "sync")
    w.write(HELLO)

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(errdefs.ResourceExhausted, match="no space left on device committing ingest sync"):
        w.commit(len(HELLO), HELLO_D)
    monkeypatch.undo()
    assert blob_files(cs) == set()
    with pytest.raises(errdefs.NotFound):
        cs.info("default", HELLO_D)
    with pytest.raises(errdefs.NotFound):
        cs.status("default", "sync")  # its data can no longer be trusted: discarded
    assert ingest_dirs(cs) == []
    assert put(cs, HELLO).digest == HELLO_D, "the store stays usable"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_on_a_real_tmpfs(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True)
    try:
        cs = ContentStore(root, store)
        data = os.urandom(2 << 20)
        w = cs.writer("default", "too-big", total=len(data), expected=sha(data))
        with pytest.raises(errdefs.ResourceExhausted, match="no space left on device writing ingest too-big"):
            for off in range(0, len(data), 256 << 10):
                w.write(data[off:off + (256 << 10)])
        assert 0 < w.status().offset < len(data)
        w.close()
        assert blob_files(cs) == set()
        with pytest.raises(errdefs.NotFound):
            cs.info("default", sha(data))
        cs.abort("default", "too-big")
        small = os.urandom(100_000)
        assert put(cs, small).digest == sha(small)
        with cs.reader("default", sha(small)) as r:
            assert r.read() == small
    finally:
        subprocess.run(["umount", str(root)], check=True)


# --- shape ---------------------------------------------------------------------------------------


def test_writer_has_the_documented_surface() -> None:
    for name in ("write", "commit", "close", "status", "digest", "truncate"):
        assert callable(getattr(Writer, name))


def test_content_images_and_gc_import_no_grpc() -> None:
    code = ("import sys, ketch.content, ketch.images, ketch.gc; "
            "print(any(m.split('.')[0] == 'grpc' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"


def test_write_session_runs_containerd_s_write_protocol(cs: ContentStore) -> None:
    from ketch.content import WriteSession, WriteStep
    from ketch.content._session import COMMIT, STAT, WRITE

    session = WriteSession(cs, "default")
    with pytest.raises(errdefs.InvalidArgument, match="must have a ref"):
        session.step(WriteStep(STAT))
    st, _ = session.step(WriteStep(STAT, ref="r1", total=len(HELLO), expected=HELLO_D))
    assert (st.ref, st.offset, session.total) == ("r1", 0, len(HELLO))
    st, _ = session.step(WriteStep(WRITE, offset=0, data=b"garbage"))
    assert st.offset == 7
    st, _ = session.step(WriteStep(WRITE, offset=0))  # no data at 0: start over
    assert st.offset == 0
    with pytest.raises(errdefs.InvalidArgument, match="unknown write action 7"):
        session.step(WriteStep(7))
    st, digest = session.step(WriteStep(COMMIT, offset=0, data=HELLO, labels={"a": "b"}))
    assert digest == HELLO_D and cs.info("default", HELLO_D).labels == {"a": "b"}
    session.close()
