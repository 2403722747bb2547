"""ketchd: containerd's gRPC API over ketch's parts, assembled explicitly here.

    ketchd [--config FILE] [--root DIR] [--state DIR] [--address SOCK] [--log-level LEVEL]
    ketchd config default
    ketchd install-units [--prefix DIR]

Start-up: load the configuration, open the metadata store, reload every task from its bundle
(reconnecting to live shims, burying dead ones), then listen: the ttrpc socket for shims'
events first, the gRPC socket last, so a client that can connect finds every task as it is.
What only some clients need loads right after, off the loop (the content store, images,
snapshots, diff and leases; then the CRI): a call to those waits for them. Then remove what a
crash left on disk (``gc.reclaim``: files and directories no record wants). SIGTERM or SIGINT
stops serving and disconnects from the shims; containers keep running.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from ketch import __version__, config, errdefs, systemd, topics, ttrpc

if TYPE_CHECKING:
    import socket

    from ketch.content import ContentStore
    from ketch.metadata import Store
    from ketch.services.deferred import Deferred
    from ketch.snapshots import Snapshotter

log = logging.getLogger("ketchd")

#: how long after the API serves again the events held while ketchd started (exits that shims
#: kept during the outage, burials of shims that died meanwhile) wait for reconnecting
#: clients to resubscribe before they are broadcast
RESUBSCRIBE_GRACE = 0.5


def setup_logging(level: str, fmt: str) -> None:
    from ketch import logfields

    root = logging.getLogger()
    root.handlers[:] = [logfields.handler(sys.stderr, fmt)]
    root.setLevel({"trace": "DEBUG", "warn": "WARNING"}.get(level, level.upper()))


def _prepare_socket_dir(path: str) -> None:
    """Make the socket's directory and remove a stale socket; refuse a socket in use."""
    import socket

    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        return
    except OSError:
        os.unlink(path)  # nobody answers: left by a daemon that died
        return
    finally:
        probe.close()
    raise errdefs.FailedPrecondition(f"{path} is in use: is another ketchd running?")


def _template_socket(cfg: config.Config) -> str:
    """Where the shim template listens: in the state directory, not in ``s/`` (every socket
    there is a shim's)."""
    if not cfg.runtime.shim_template:
        return ""
    path = os.path.join(cfg.state, "shim-template.sock")
    if len(path.encode()) > 107:
        log.warning("no shim template: %s is too long for a unix socket", path)
        return ""
    return path


def _inherited_listener(cfg: config.Config, sd: systemd.Systemd) -> socket.socket | None:
    """The gRPC socket systemd handed over (socket activation), if any; ``grpc.address`` becomes
    its path, the one clients and shims are told."""
    listener = sd.grpc_listener()
    if listener is None:
        return None
    path = systemd.socket_path(listener)
    if path and path != cfg.grpc.address:
        log.info("serving gRPC on the inherited socket %s, not %s", path, cfg.grpc.address)
        cfg.grpc.address = path
    return listener


async def _listen(server: Any, cfg: config.Config, adoption: systemd.Adoption | None) -> None:
    """Start ``server`` on ``grpc.address``, or on the inherited socket (socket activation)."""
    if adoption is None:
        _prepare_socket_dir(cfg.grpc.address)
        server.add_insecure_port(f"unix://{cfg.grpc.address}")
        await server.start()
        os.chmod(cfg.grpc.address, 0o660)
        os.chown(cfg.grpc.address, cfg.grpc.uid, cfg.grpc.gid)
        return
    server.add_insecure_port(adoption.address)
    await server.start()
    try:
        adoption.start()
    except OSError as e:
        await server.stop(None)
        raise errdefs.FailedPrecondition(f"socket activation: {e}; run ketchd without ketchd.socket") from None


def _open_store(cfg: config.Config) -> Store:
    """What serving containerd's first calls needs: the modules of tasks, containers, namespaces
    and events, and the metadata store (SQLite). Run in a thread, so that ketchd's event loop
    is never held, not even while it starts."""
    import grpc  # noqa: F401  (imported here, off the loop, for serve)

    import ketch.events
    import ketch.runtime
    import ketch.services.events
    import ketch.services.metadata
    import ketch.services.system
    import ketch.services.tasks  # noqa: F401
    from ketch.metadata import Store
    from ketch.services.system import server_uuid

    if cfg.metrics.address:  # only then: prometheus_client takes a while to import
        import ketch.metrics  # noqa: F401
    for d in (cfg.root, cfg.state):
        os.makedirs(d, mode=0o711, exist_ok=True)
    server_uuid(cfg.root)  # made (and fsynced) on the first start: here rather than on the loop
    return Store(os.path.join(cfg.root, "meta.db"))


def _open_snapshotters(cfg: config.Config) -> dict[str, Snapshotter]:
    """The rest of the core's modules (content, images, snapshots, diff, GC) and the
    snapshotters (SQLite files; overlayfs is probed with a mount); in a thread too."""
    import ketch.content
    import ketch.gc
    import ketch.images
    import ketch.services  # noqa: F401
    from ketch.snapshots import NativeSnapshotter, OverlaySnapshotter, supported

    snapshotters: dict[str, Snapshotter] = {"native": NativeSnapshotter(os.path.join(cfg.root, "snapshots", "native"))}
    overlay_root = os.path.join(cfg.root, "snapshots", "overlayfs")
    os.makedirs(overlay_root, mode=0o700, exist_ok=True)
    if supported(overlay_root):
        snapshotters["overlayfs"] = OverlaySnapshotter(overlay_root)
    else:
        log.warning("overlayfs is not supported under %s; only the native snapshotter is loaded", overlay_root)
    return snapshotters


def _close_disk(store: Store, snapshotters: dict[str, Snapshotter]) -> None:
    """Close what :func:`_open_store` and :func:`_open_snapshotters` opened (SQLite checkpoints
    its log: blocking)."""
    for snapshotter in snapshotters.values():
        snapshotter.close()
    store.close()


async def serve(cfg: config.Config, *, ready: asyncio.Future[None] | None = None) -> None:
    """Serve in three steps, each under way as soon as the one before serves: containerd's
    task-facing services (a restarted daemon's clients are waiting), then the content store,
    images, snapshots, diff and leases, then the CRI. A call to a service not loaded yet waits
    for it (:class:`~ketch.services.deferred.Deferred`)."""
    if cfg.log.slow_callback > 0:
        from ketch import slowloop

        slowloop.install(asyncio.get_running_loop(), cfg.log.slow_callback)
    sd = systemd.take()
    watchdog = asyncio.ensure_future(sd.ping_watchdog())
    listener = _inherited_listener(cfg, sd)
    sd.notify("STATUS=opening the store")
    store = await asyncio.to_thread(_open_store, cfg)

    import grpc

    from ketch.events import Exchange, decode_protobuf
    from ketch.runtime import Launcher, ShimParams, TaskManager
    from ketch.services import STORE_SERVICES, register_core, register_store
    from ketch.services.deferred import Deferred
    from ketch.services.events import forward_service

    exchange = Exchange(decoder=decode_protobuf)  # event.<field> filters see the payload
    # what shims forward, and what reloading finds, while ketchd starts waits for the clients
    # that resubscribe once the API serves (see RESUBSCRIBE_GRACE)
    exchange.hold()

    def publish(namespace: str, event: Any) -> None:
        exchange.publish(namespace, topics.of(event), event.DESCRIPTOR.full_name, event.SerializeToString())

    params = ShimParams(
        grpc_address=cfg.grpc.address, ttrpc_address=cfg.ttrpc_address,
        publish_binary=os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else "ketchd",
        debug=cfg.runtime.shim_debug,
        start_timeout=cfg.runtime.shim_start_timeout, delete_timeout=cfg.runtime.shim_delete_timeout,
        template_socket=_template_socket(cfg))
    launcher = Launcher(params, extra_dirs=[os.path.dirname(sys.executable)])
    manager = TaskManager(state=cfg.state, root=cfg.root, launcher=launcher, publish=publish,
                          call_timeout=cfg.runtime.shim_call_timeout, aliases=cfg.runtime.aliases,
                          grouping=cfg.runtime.shim_grouping)

    # shims forward their events here; it must listen before tasks are reloaded
    events_server = ttrpc.Server()
    events_server.register(*forward_service(exchange))
    _prepare_socket_dir(cfg.ttrpc_address)
    ttrpc_started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    ttrpc_task = asyncio.ensure_future(events_server.serve_path(cfg.ttrpc_address, ttrpc_started, mode=0o660))
    await ttrpc_started

    exchange.accept = manager.first_publication
    sd.notify("STATUS=reloading tasks")
    started = time.monotonic()
    await manager.load()
    log.info("reloaded tasks in %.3fs", time.monotonic() - started)
    burial = asyncio.ensure_future(manager.bury_dead())

    telemetry = None
    if cfg.metrics.address:
        from ketch.metrics import Metrics

        telemetry = Metrics(manager=manager, exchange=exchange)
        await telemetry.serve(cfg.metrics.address)
    adoption = systemd.Adoption(listener) if listener is not None else None
    server = grpc.aio.server(interceptors=telemetry.interceptors if telemetry else None, options=[
        ("grpc.max_receive_message_length", cfg.grpc.max_recv_message_size),
        ("grpc.max_send_message_length", cfg.grpc.max_send_message_size),
        *([adoption.channel_option()] if adoption is not None else []),
    ])
    # the content store loads after the core serves: a checkpoint's blobs wait for it
    content_loaded: asyncio.Future[ContentStore] = asyncio.get_running_loop().create_future()
    content_loaded.add_done_callback(lambda f: f.cancelled() or f.exception())  # a failure is reported below
    register_core(server, cfg=cfg, store=store, exchange=exchange, manager=manager, publish=publish,
                  content=lambda: asyncio.shield(content_loaded))
    stored = Deferred(STORE_SERVICES, "the content store")
    server.add_generic_rpc_handlers((stored,))
    # the CRI (its protos, CNI, streaming server) loads once containerd's API serves; a CRI
    # call that comes first waits for it
    cri: Deferred | None = None
    if cfg.cri.enabled:
        cri = Deferred(("/runtime.v1.",), "the CRI")
        server.add_generic_rpc_handlers((cri,))
    await _listen(server, cfg, adoption)
    log.info("ketchd %s serving on %s%s (ttrpc %s)", __version__, cfg.grpc.address,
             " (inherited)" if adoption is not None else "", cfg.ttrpc_address)
    if ready is not None and not ready.done():
        ready.set_result(None)
    sd.notify("READY=1", f"STATUS=serving on {cfg.grpc.address}", f"MAINPID={os.getpid()}")
    asyncio.get_running_loop().call_later(RESUBSCRIBE_GRACE, exchange.release)
    launcher.launch_template()
    snapshotters: dict[str, Snapshotter] = {}
    collector = None
    reclaiming = None
    streams = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        sd.notify("STOPPING=1", "STATUS=shutting down; shims and containers keep running")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping)
    try:
        try:
            snapshotters = await asyncio.to_thread(_open_snapshotters, cfg)
            from ketch.content import ContentStore
            from ketch.gc import Collector
            from ketch.images import ImageService

            content = ContentStore(os.path.join(cfg.root, "content"), store, publish=publish)
            content_loaded.set_result(content)
            collector = Collector(store, content, snapshotters)
            images = ImageService(store, publish=publish)
            stored.load(lambda into: register_store(into, store=store, publish=publish, content=content, images=images,
                                                    snapshotters=snapshotters, collector=collector))
        except BaseException as e:
            stored.fail(str(e) or type(e).__name__)
            if not content_loaded.done():
                content_loaded.set_exception(errdefs.Unavailable(f"the content store did not load: {e}"))
            raise
        if telemetry is not None:
            telemetry.attach(collector=collector, content=content)
        # what a crash left on disk (a prepare's directory, a blob without its row) goes now;
        # no record is judged: clients may already be making some that nothing references yet
        reclaiming = asyncio.ensure_future(collector.reclaim())
        if cri is not None:
            try:
                if cfg.cri.snapshotter not in snapshotters:
                    raise errdefs.InvalidArgument(f"[cri] snapshotter {cfg.cri.snapshotter!r} is not loaded "
                                                  f"(loaded: {', '.join(sorted(snapshotters))})")
                await asyncio.to_thread(_import_cri)  # off the loop: the imports are most of it
                cri_recovery, streams = _start_cri(cri, cfg, store, content, images, snapshotters, collector,
                                                   publish, manager)
                await streams.start()
            except BaseException as e:
                cri.fail(str(e) or type(e).__name__)
                raise
            await cri_recovery
        await stop.wait()
    finally:
        log.info("shutting down; shims and containers keep running")
        burial.cancel()
        if reclaiming is not None:
            reclaiming.cancel()
        await launcher.settle(params.start_timeout)
        if adoption is not None:
            await adoption.stop()
        await server.stop(grace=1.0)
        if telemetry is not None:
            await telemetry.close()
        if streams is not None:
            await streams.close()
        await events_server.shutdown(grace=0.5)
        ttrpc_task.cancel()
        await manager.close()
        if collector is not None:
            await collector.close()
        await asyncio.to_thread(_close_disk, store, snapshotters)
        watchdog.cancel()
        sd.close()
        if adoption is None:  # an inherited socket is systemd's: it stays, listening, for the next ketchd
            try:
                os.unlink(cfg.grpc.address)
            except OSError:
                pass


def _import_cri() -> None:
    """What the CRI needs, imported (in a thread: nothing blocks the loop)."""
    import ketch.cri.containers
    import ketch.cri.sandbox
    import ketch.cri.server
    import ketch.cri.streaming
    import ketch.images.pull  # noqa: F401


def _start_cri(gate: Deferred, cfg: config.Config, store: Any, content: Any, images: Any,
               snapshotters: dict[str, Any], collector: Any, publish: Any,
               manager: Any) -> tuple[Awaitable[None], Any]:
    """The Kubernetes CRI on the same socket, over the same core, served through ``gate``; what
    it must do now that ketchd serves (reattach to running containers' output), and its
    streaming server (exec, attach, port-forward; to be started)."""
    from ketch.cri import cni
    from ketch.cri import images as cri_images
    from ketch.cri import server as cri_server
    from ketch.cri.containers import Containers
    from ketch.cri.sandbox import Pods
    from ketch.cri.streaming import StreamServer
    from ketch.diff.service import DiffService
    from ketch.images.pull import Puller
    from ketch.metadata.local import ContainerService
    from ketch.snapshots.service import SnapshotService

    snapshots = SnapshotService(snapshotters, store.leases, publish, collector.schedule)
    puller = Puller(content, images, snapshots, DiffService(content), store.leases)
    image_manager = cri_images.CriImages(images, content, puller, snapshotter=cfg.cri.snapshotter,
                                         fs_root=os.path.join(cfg.root, "snapshots", cfg.cri.snapshotter),
                                         collect=collector.schedule)
    pods = Pods(images=image_manager, containers=ContainerService(store, publish, manager.exists), tasks=manager,
                snapshots=snapshots, leases=store.leases, cni_runner=cni.CNI(cfg.cri.cni_bin_dir, os.path.join(cfg.state, "cri", "cni")),
                cni_conf_dir=cfg.cri.cni_conf_dir, snapshotter=cfg.cri.snapshotter, runtime=cfg.cri.runtime,
                sandbox_image=cfg.cri.sandbox_image, state_dir=cfg.state,
                restrict_oom_score_adj=cfg.cri.restrict_oom_score_adj, collect=collector.schedule)
    containers = Containers(pods=pods, images=image_manager, containers=ContainerService(store, publish, manager.exists),
                            tasks=manager, snapshots=snapshots, snapshotter=cfg.cri.snapshotter,
                            runtime=cfg.cri.runtime, state_dir=cfg.state)
    streams = StreamServer(cri_server.StreamingRuntime(pods, containers), cfg.cri.stream_server_address,
                           cfg.cri.stream_server_port)
    gate.load(lambda server: cri_server.register(server, cfg.cri, image_manager, pods, containers, streams))
    return containers.recover(), streams


def upgrade_shims(state: str, template: str = "") -> int:
    """Live upgrade: signal the keeper of every ketch shim group whose tasks live under
    ``state`` (SIGHUP; see ketch/shim/keeper.py). Each execs the ketch installed now and
    starts a shim of it, which takes the group over; ketchd reconnects to it. The shim
    template (``template``, its socket) is replaced by one of the new version too, so new
    groups start on it."""
    from ketch.runtime.bundle import walk
    from ketch.shim.keeper import is_keeper, parent_pid

    keepers: set[int] = set()
    for bundle in walk(state, state):
        try:  # the keeper is the parent of the task's serving shim (or, after a takeover, of its init)
            pid = parent_pid(int((bundle.path / "init.pid").read_text()))
            for candidate in (pid, parent_pid(pid)):
                if is_keeper(candidate):
                    keepers.add(candidate)
                    break
        except (OSError, ValueError):
            continue
    for pid in sorted(keepers):
        os.kill(pid, signal.SIGHUP)
        print(f"upgrading the shim group of keeper {pid}")
    if not keepers:
        print(f"no ketch shim group under {state}")
    if template and os.path.exists(template):
        import subprocess

        # the template action of the new binary replaces a template of another version
        binary = os.path.join(os.path.dirname(sys.executable), "containerd-shim-ketch-v2")
        r = subprocess.run([binary, "-socket", template, "template"], capture_output=True, text=True, timeout=30)
        print(f"shim template: pid {r.stdout.strip()}" if r.returncode == 0 else
              f"shim template not replaced: {(r.stdout + r.stderr).strip()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ketchd", description="ketch's daemon: containerd's API, in Python")
    parser.add_argument("--config", "-c", help="TOML configuration file")
    parser.add_argument("--root", help="persistent data directory (default /var/lib/ketch)")
    parser.add_argument("--state", help="runtime state directory (default /run/ketch)")
    parser.add_argument("--address", "-a", help="gRPC socket (default /run/ketch/ketchd.sock)")
    parser.add_argument("--log-level", "-l", help="debug, info, warn, error")
    parser.add_argument("--slow-callback", type=float, metavar="SECONDS",
                        help="asyncio debug mode: log every callback holding the event loop longer")
    parser.add_argument("--prefix", default=systemd.UNIT_DIR, metavar="DIR",
                        help=f"install-units: the directory to write the unit files to (default {systemd.UNIT_DIR})")
    parser.add_argument("--version", "-v", action="version", version=f"ketchd {__version__}")
    parser.add_argument("command", nargs="*", help="'config default' prints the default configuration; "
                        "'upgrade-shims' has every ketch shim group of this state directory switch to the "
                        "ketch installed now, without restarting a container; 'install-units' writes "
                        "ketchd.service and ketchd.socket for systemd, to run this ketchd")
    args = parser.parse_args(argv)
    if args.command == ["config", "default"]:
        sys.stdout.write(config.DEFAULT_TOML)
        return 0
    if args.command == ["install-units"]:
        for path in systemd.install_units(args.prefix):
            print(f"wrote {path}")
        print("then: systemctl daemon-reload && systemctl enable --now ketchd.socket ketchd.service")
        return 0
    if args.command and args.command != ["upgrade-shims"]:
        parser.error(f"unknown command {' '.join(args.command)!r} (want: config default, upgrade-shims, install-units)")
    try:
        cfg = config.load(args.config)
    except errdefs.KetchError as e:
        print(f"ketchd: {e}", file=sys.stderr)
        return 2
    if args.root:
        cfg.root = os.path.abspath(args.root)
    if args.state:
        cfg.state = os.path.abspath(args.state)
    if args.address:
        cfg.grpc.address = os.path.abspath(args.address)
    if args.log_level:
        cfg.log.level = args.log_level
    if args.slow_callback is not None:
        cfg.log.slow_callback = max(0.0, args.slow_callback)
    if args.command == ["upgrade-shims"]:
        return upgrade_shims(cfg.state, _template_socket(cfg))
    setup_logging(cfg.log.level, cfg.log.format)
    try:
        asyncio.run(serve(cfg))
    except errdefs.KetchError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
