"""The Snapshots servicer in-process (grpc.aio) over the native snapshotter: bad enums are
InvalidArgument, and the core publishes the snapshot events."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from ketch import topics
from ketch.api.containerd.services.snapshots.v1 import snapshots_pb2 as sapi
from ketch.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from ketch.metadata import Store
from ketch.services.images import Snapshots
from ketch.snapshots import NativeSnapshotter
from ketch.snapshots.service import SnapshotService
from ketch.testing.channel import channel_for

NS = [("containerd-namespace", "default")]


def test_update_with_a_kind_out_of_range_is_invalid_argument(tmp_path: Path) -> None:
    async def main() -> None:
        events: list[str] = []
        collected: list[int] = []
        sn = NativeSnapshotter(str(tmp_path / "native"))
        with Store(tmp_path / "meta.db") as store:
            service = SnapshotService({"native": sn}, store.leases, lambda ns, e: events.append(topics.of(e)),
                                      lambda: collected.append(1))

            def register(server: grpc.aio.Server) -> None:
                snapshots_pb2_grpc.add_SnapshotsServicer_to_server(Snapshots(service), server)

            async with asyncio.timeout(10), channel_for(register) as ch:
                stub: Any = snapshots_pb2_grpc.SnapshotsStub(ch)
                await stub.Prepare(sapi.PrepareSnapshotRequest(snapshotter="native", key="k"), metadata=NS)
                bad = sapi.UpdateSnapshotRequest(snapshotter="native", info=sapi.Info(name="k", kind=99))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Update(bad, metadata=NS)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "snapshot kind 99" in (info.value.details() or "")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Prepare(sapi.PrepareSnapshotRequest(snapshotter="zfs", key="z"), metadata=NS)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                await stub.Remove(sapi.RemoveSnapshotRequest(snapshotter="native", key="k"), metadata=NS)
        sn.close()
        assert events == ["/snapshot/prepare", "/snapshot/remove"] and collected == [1]

    asyncio.run(main())
