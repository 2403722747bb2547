"""Durable renames fsync their directory: ketch.files and the places that must survive a power
cut (a committed blob, a snapshot's directory, the server's uuid, state written atomically).

The fsyncs are observed, not mocked: a wrapper around os.fsync records what each real fsync
was given (the path of the fd and, for a directory, its entries at that moment) and then
runs it. A directory fsync that lists the new name shows the rename was flushed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ketch.files import rename_durable, write_atomic

Seen = list[tuple[str, list[str] | None]]


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Seen:
    """Every fsync from now on: (path, the directory's entries then, or None for a file)."""
    real = os.fsync
    seen: Seen = []

    def recording(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        seen.append((path, sorted(os.listdir(path)) if stat.S_ISDIR(os.fstat(fd).st_mode) else None))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return seen


def test_write_atomic_fsyncs_the_file_then_its_directory_after_the_rename(tmp_path: Path, fsyncs: Seen) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    write_atomic(target, b"new")
    assert target.read_text() == "new"
    (file_path, file_entries), (dir_path, entries) = fsyncs
    assert file_entries is None and file_path.startswith(str(tmp_path / ".state.json."))
    assert dir_path == str(tmp_path) and entries == ["state.json"]  # renamed, the temporary gone


def test_runtime_state_is_written_without_fsyncs(tmp_path: Path, fsyncs: Seen) -> None:
    write_atomic(tmp_path / "address", b"unix:///s", durable=False)
    assert (tmp_path / "address").read_text() == "unix:///s" and fsyncs == []


def test_rename_durable_fsyncs_the_directory_of_the_new_name(tmp_path: Path, fsyncs: Seen) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "in" / "blob").write_bytes(b"x")
    rename_durable(tmp_path / "in" / "blob", tmp_path / "out" / "blob")
    assert fsyncs == [(str(tmp_path / "out"), ["blob"])]


def test_a_committed_blob_is_flushed_into_its_directory(tmp_path: Path, fsyncs: Seen) -> None:
    import hashlib

    from ketch.content import ContentStore
    from ketch.metadata import Store

    data = b"a layer"
    hexdigest = hashlib.sha256(data).hexdigest()
    with Store(tmp_path / "meta.db") as store:
        content = ContentStore(tmp_path / "content", store)
        with content.writer("default", "ref") as w:
            w.write(data)
            w.commit(len(data), "sha256:" + hexdigest)
    blobs = str(tmp_path / "content" / "blobs" / "sha256")
    data_fsync = [i for i, (p, e) in enumerate(fsyncs) if e is None and p.endswith("/data")]
    dir_fsync = [i for i, (p, e) in enumerate(fsyncs) if p == blobs and e is not None and hexdigest in e]
    assert data_fsync and dir_fsync and data_fsync[0] < dir_fsync[0], fsyncs


def test_a_new_snapshot_directory_is_flushed_before_its_record(tmp_path: Path, fsyncs: Seen) -> None:
    from ketch.snapshots import NativeSnapshotter

    with NativeSnapshotter(tmp_path / "native") as sn:
        sn.prepare("default", "k")
    assert (str(tmp_path / "native" / "snapshots"), ["1"]) in fsyncs


def test_the_server_uuid_is_written_durably(tmp_path: Path, fsyncs: Seen) -> None:
    from ketch.services.system import server_uuid

    made = server_uuid(str(tmp_path))
    assert (str(tmp_path), ["uuid"]) in fsyncs
    assert server_uuid(str(tmp_path)) == made
