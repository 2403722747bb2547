"""The CRI's gRPC faces on ketchd's socket: ``runtime.v1.RuntimeService`` and
``runtime.v1.ImageService``. Decode, call the CRI core, encode; errors become gRPC statuses as
in every servicer (:func:`ketch.services._common.unary`). What is not built yet answers
Unimplemented (grpc's default for a method a servicer does not define).
"""

from __future__ import annotations

import glob
import os
import socket

import grpc

from ketch import __version__, config
from ketch.api.k8s.cri.runtime.v1 import api_pb2 as cri
from ketch.api.k8s.cri.runtime.v1 import api_pb2_grpc
from ketch import errdefs
from ketch.cri.containers import Containers, StreamIO
from ketch.cri.images import CriImages
from ketch.cri.sandbox import Pods
from ketch.cri.streaming import StreamServer
from ketch.services._common import unary

__all__ = ["RuntimeService", "ImageService", "StreamingRuntime", "register"]

#: what Version answers: the CRI version spoken, and the runtime behind it
API_VERSION = "v1"
RUNTIME_NAME = "ketchd"


def network_ready(cfg: config.CRI) -> tuple[bool, str]:
    """Whether a CNI network is configured (a .conf, .conflist or .json in the conf dir),
    and why not."""
    found = [p for ext in ("*.conf", "*.conflist", "*.json") for p in glob.glob(os.path.join(cfg.cni_conf_dir, ext))]
    if found:
        return True, ""
    return False, f"no network config found in {cfg.cni_conf_dir}: cni plugin not initialized"


class StreamingRuntime:
    """What the streaming server runs its requests on."""

    def __init__(self, pods: Pods, containers: Containers) -> None:
        self._pods = pods
        self._containers = containers

    async def exec(self, ref: str, cmd: list[str], tty: bool, io: StreamIO) -> int:
        return await self._containers.exec(ref, cmd, tty, io)

    async def attach(self, ref: str, io: StreamIO) -> None:
        await self._containers.attach(ref, io)

    async def port_forward(self, sandbox_id: str, port: int) -> socket.socket:
        return await self._pods.port_forward(sandbox_id, port)


def _check_stdio(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> None:
    """As the kubelet's streaming server checks an exec or attach."""
    if tty and stderr:
        raise errdefs.InvalidArgument("tty and stderr cannot both be true")
    if not (stdin or stdout or stderr):
        raise errdefs.InvalidArgument("one of stdin, stdout, or stderr must be set")


class RuntimeService(api_pb2_grpc.RuntimeServiceServicer):
    def __init__(self, cfg: config.CRI, pods: Pods, containers: Containers, streams: StreamServer) -> None:
        self._cfg = cfg
        self._pods = pods
        self._containers = containers
        self._streams = streams

    async def _stop_pod_containers(self, sandbox_id: str) -> None:
        for meta in self._containers.in_pod(sandbox_id):
            await self._containers.stop(meta.id, 0)

    async def _remove_pod_containers(self, sandbox_id: str) -> None:
        for meta in self._containers.in_pod(sandbox_id):
            await self._containers.remove(meta.id)

    @unary
    async def Version(self, request: cri.VersionRequest, context: grpc.aio.ServicerContext) -> cri.VersionResponse:
        return cri.VersionResponse(version="0.1.0", runtime_name=RUNTIME_NAME, runtime_version=__version__,
                                   runtime_api_version=API_VERSION)

    @unary
    async def Status(self, request: cri.StatusRequest, context: grpc.aio.ServicerContext) -> cri.StatusResponse:
        ready, why = network_ready(self._cfg)
        conditions = [
            cri.RuntimeCondition(type="RuntimeReady", status=True),
            cri.RuntimeCondition(type="NetworkReady", status=ready, reason="" if ready else "NetworkPluginNotReady",
                                 message=why),
        ]
        return cri.StatusResponse(status=cri.RuntimeStatus(conditions=conditions))

    @unary
    async def UpdateRuntimeConfig(self, request: cri.UpdateRuntimeConfigRequest,
                                  context: grpc.aio.ServicerContext) -> cri.UpdateRuntimeConfigResponse:
        # the pod CIDR is the CNI configuration's business here, as with containerd's default
        return cri.UpdateRuntimeConfigResponse()


    # -- pod sandboxes ----------------------------------------------------------------------

    @unary
    async def RunPodSandbox(self, request: cri.RunPodSandboxRequest,
                            context: grpc.aio.ServicerContext) -> cri.RunPodSandboxResponse:
        return cri.RunPodSandboxResponse(pod_sandbox_id=await self._pods.run(request.config, request.runtime_handler))

    @unary
    async def StopPodSandbox(self, request: cri.StopPodSandboxRequest,
                             context: grpc.aio.ServicerContext) -> cri.StopPodSandboxResponse:
        await self._pods.stop(request.pod_sandbox_id, self._stop_pod_containers)
        return cri.StopPodSandboxResponse()

    @unary
    async def RemovePodSandbox(self, request: cri.RemovePodSandboxRequest,
                               context: grpc.aio.ServicerContext) -> cri.RemovePodSandboxResponse:
        await self._pods.remove(request.pod_sandbox_id, self._stop_pod_containers, self._remove_pod_containers)
        return cri.RemovePodSandboxResponse()

    @unary
    async def PodSandboxStatus(self, request: cri.PodSandboxStatusRequest,
                               context: grpc.aio.ServicerContext) -> cri.PodSandboxStatusResponse:
        status, info = await self._pods.status(request.pod_sandbox_id, request.verbose)
        return cri.PodSandboxStatusResponse(status=status, info=info)

    @unary
    async def ListPodSandbox(self, request: cri.ListPodSandboxRequest,
                             context: grpc.aio.ServicerContext) -> cri.ListPodSandboxResponse:
        f = request.filter if request.HasField("filter") else None
        return cri.ListPodSandboxResponse(items=await self._pods.list(f))

    # -- containers -------------------------------------------------------------------------

    @unary
    async def CreateContainer(self, request: cri.CreateContainerRequest,
                              context: grpc.aio.ServicerContext) -> cri.CreateContainerResponse:
        return cri.CreateContainerResponse(container_id=await self._containers.create(
            request.pod_sandbox_id, request.config, request.sandbox_config))

    @unary
    async def StartContainer(self, request: cri.StartContainerRequest,
                             context: grpc.aio.ServicerContext) -> cri.StartContainerResponse:
        await self._containers.start(request.container_id)
        return cri.StartContainerResponse()

    @unary
    async def StopContainer(self, request: cri.StopContainerRequest,
                            context: grpc.aio.ServicerContext) -> cri.StopContainerResponse:
        await self._containers.stop(request.container_id, request.timeout)
        return cri.StopContainerResponse()

    @unary
    async def RemoveContainer(self, request: cri.RemoveContainerRequest,
                              context: grpc.aio.ServicerContext) -> cri.RemoveContainerResponse:
        await self._containers.remove(request.container_id)
        return cri.RemoveContainerResponse()

    @unary
    async def ListContainers(self, request: cri.ListContainersRequest,
                             context: grpc.aio.ServicerContext) -> cri.ListContainersResponse:
        f = request.filter if request.HasField("filter") else None
        return cri.ListContainersResponse(containers=await self._containers.list(f))

    @unary
    async def ContainerStatus(self, request: cri.ContainerStatusRequest,
                              context: grpc.aio.ServicerContext) -> cri.ContainerStatusResponse:
        status, info = await self._containers.status(request.container_id, request.verbose)
        return cri.ContainerStatusResponse(status=status, info=info)

    @unary
    async def UpdateContainerResources(self, request: cri.UpdateContainerResourcesRequest,
                                       context: grpc.aio.ServicerContext) -> cri.UpdateContainerResourcesResponse:
        await self._containers.update_resources(request.container_id, request.linux)
        return cri.UpdateContainerResourcesResponse()

    @unary
    async def ReopenContainerLog(self, request: cri.ReopenContainerLogRequest,
                                 context: grpc.aio.ServicerContext) -> cri.ReopenContainerLogResponse:
        await self._containers.reopen_log(request.container_id)
        return cri.ReopenContainerLogResponse()

    @unary
    async def ExecSync(self, request: cri.ExecSyncRequest, context: grpc.aio.ServicerContext) -> cri.ExecSyncResponse:
        return await self._containers.exec_sync(request.container_id, request.cmd, request.timeout)

    async def _running(self, ref: str) -> str:
        meta = self._containers.get(ref)
        if await self._containers.state(meta) != cri.ContainerState.CONTAINER_RUNNING:
            raise errdefs.FailedPrecondition(f"container {meta.id} is not running")
        return meta.id

    @unary
    async def Exec(self, request: cri.ExecRequest, context: grpc.aio.ServicerContext) -> cri.ExecResponse:
        _check_stdio(request.stdin, request.stdout, request.stderr, request.tty)
        if not request.cmd:
            raise errdefs.InvalidArgument("exec needs a command")
        kept = cri.ExecRequest()
        kept.CopyFrom(request)
        kept.container_id = await self._running(request.container_id)
        return cri.ExecResponse(url=self._streams.url(kept))

    @unary
    async def Attach(self, request: cri.AttachRequest, context: grpc.aio.ServicerContext) -> cri.AttachResponse:
        _check_stdio(request.stdin, request.stdout, request.stderr, request.tty)
        kept = cri.AttachRequest()
        kept.CopyFrom(request)
        kept.container_id = await self._running(request.container_id)
        return cri.AttachResponse(url=self._streams.url(kept))

    @unary
    async def PortForward(self, request: cri.PortForwardRequest,
                          context: grpc.aio.ServicerContext) -> cri.PortForwardResponse:
        sandbox = self._pods.get(request.pod_sandbox_id)
        if await self._pods.state(sandbox) != cri.PodSandboxState.SANDBOX_READY:
            raise errdefs.FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
        bad = [p for p in request.port if not 0 < p < 65536]
        if bad:
            raise errdefs.InvalidArgument(f"invalid ports {list(bad)}: a port is 1 to 65535")
        kept = cri.PortForwardRequest(pod_sandbox_id=sandbox.id, port=list(request.port))
        return cri.PortForwardResponse(url=self._streams.url(kept))

    @unary
    async def ContainerStats(self, request: cri.ContainerStatsRequest,
                             context: grpc.aio.ServicerContext) -> cri.ContainerStatsResponse:
        return cri.ContainerStatsResponse(stats=await self._containers.stats(self._containers.get(request.container_id)))

    @unary
    async def ListContainerStats(self, request: cri.ListContainerStatsRequest,
                                 context: grpc.aio.ServicerContext) -> cri.ListContainerStatsResponse:
        f = request.filter
        out = []
        for meta in self._containers.all():
            if f.id and not meta.id.startswith(f.id):
                continue
            if f.pod_sandbox_id and not meta.sandbox_id.startswith(f.pod_sandbox_id):
                continue
            if any(meta.container_config.labels.get(k) != v for k, v in f.label_selector.items()):
                continue
            out.append(await self._containers.stats(meta))
        return cri.ListContainerStatsResponse(stats=out)


class ImageService(api_pb2_grpc.ImageServiceServicer):
    def __init__(self, images: CriImages) -> None:
        self._images = images

    @unary
    async def ListImages(self, request: cri.ListImagesRequest,
                         context: grpc.aio.ServicerContext) -> cri.ListImagesResponse:
        wanted = request.filter.image.image if request.HasField("filter") else ""
        infos = self._images.list()
        if wanted:
            found = self._images.find(wanted)
            infos = [found] if found is not None else []
        return cri.ListImagesResponse(images=[info.message() for info in infos])

    @unary
    async def ImageStatus(self, request: cri.ImageStatusRequest,
                          context: grpc.aio.ServicerContext) -> cri.ImageStatusResponse:
        info = self._images.find(request.image.image)
        if info is None:
            return cri.ImageStatusResponse()
        return cri.ImageStatusResponse(image=info.message(), info=info.verbose() if request.verbose else {})

    @unary
    async def PullImage(self, request: cri.PullImageRequest, context: grpc.aio.ServicerContext) -> cri.PullImageResponse:
        auth = request.auth if request.HasField("auth") else None
        return cri.PullImageResponse(image_ref=await self._images.pull(request.image.image, auth))

    @unary
    async def RemoveImage(self, request: cri.RemoveImageRequest,
                          context: grpc.aio.ServicerContext) -> cri.RemoveImageResponse:
        await self._images.remove(request.image.image)
        return cri.RemoveImageResponse()

    @unary
    async def ImageFsInfo(self, request: cri.ImageFsInfoRequest,
                          context: grpc.aio.ServicerContext) -> cri.ImageFsInfoResponse:
        return cri.ImageFsInfoResponse(image_filesystems=[await self._images.fs_info()])


def register(server: grpc.aio.Server, cfg: config.CRI, images: CriImages, pods: Pods, containers: Containers,
             streams: StreamServer) -> None:
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(RuntimeService(cfg, pods, containers, streams), server)
    api_pb2_grpc.add_ImageServiceServicer_to_server(ImageService(images), server)
