"""``ketch``: a docker-like command line on ketch.client, for ketchd or any containerd 1.6+.

Every command takes ``--address`` and ``--namespace/-n`` (or $KETCH_ADDRESS /
$CONTAINERD_ADDRESS and $KETCH_NAMESPACE / $CONTAINERD_NAMESPACE). Listings print a table, or
one JSON document with ``--json`` (``events --json``: one object a line). An error is one line
on stderr and exit status 1 (2 for a usage error); ``run`` and ``exec`` exit with the process's
status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click

from ketch import __version__
from ketch.client import AsyncClient, Container, KetchError, LogURI, NotFound, Stdio
from ketch.client._images import Image

T = TypeVar("T")

#: label on a container started detached: where its output goes (for ``ketch logs``)
LOG_LABEL = "io.ketch.log"
DEFAULT_LOG_DIR = "/var/log/ketch"


class Fail(Exception):
    """An error for the user: one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class Exit(Exception):
    """Leave with this status (a process's)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _client(ctx: click.Context) -> AsyncClient:
    return AsyncClient(ctx.obj["address"], ctx.obj["namespace"])


def with_client(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run the async command ``fn(client, **params)`` with a client of the global options."""

    @functools.wraps(fn)
    @click.pass_context
    def wrapper(ctx: click.Context, /, **kw: Any) -> None:
        async def main() -> None:
            async with _client(ctx) as c:
                await fn(c, **kw)

        asyncio.run(main())

    return wrapper


def out_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(str(x) for x in r))
    Console(width=max(shutil.get_terminal_size().columns, 120), soft_wrap=True).print(t)


def parse_size(text: str) -> int:
    """``64m``, ``1g``, ``512k``, ``1048576`` → bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", text.strip().lower())
    if not m:
        raise click.BadParameter(f"{text!r} is not a size like 64m or 1g")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f}{unit}" if unit != "B" else f"{int(size)}B"
        size /= 1024
    return f"{size:.1f}TiB"


def signal_number(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return int(signal.Signals[name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()])
    except KeyError:
        raise click.BadParameter(f"unknown signal {name!r}") from None


# -- the group ---------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--address", envvar=["KETCH_ADDRESS", "CONTAINERD_ADDRESS"], default=None, metavar="SOCKET",
              help="the daemon's socket ($KETCH_ADDRESS, $CONTAINERD_ADDRESS; default ketchd's)")
@click.option("--namespace", "-n", envvar=["KETCH_NAMESPACE", "CONTAINERD_NAMESPACE"], default=None,
              help="the namespace ($KETCH_NAMESPACE, $CONTAINERD_NAMESPACE; default 'default')")
@click.version_option(__version__, "--version", prog_name="ketch")
@click.pass_context
def cli(ctx: click.Context, address: str | None, namespace: str | None) -> None:
    """Run and manage containers through ketchd or containerd."""
    ctx.obj = {"address": address, "namespace": namespace}


# -- containers ----------------------------------------------------------------------------------


def _log_dir() -> str:
    return os.environ.get("KETCH_LOG_DIR") or DEFAULT_LOG_DIR


@cli.command(context_settings={"ignore_unknown_options": False, "allow_interspersed_args": False})
@click.option("--rm", "remove", is_flag=True, help="remove the container when it exits")
@click.option("-d", "--detach", is_flag=True, help="run in the background, print its id")
@click.option("-t", "--tty", is_flag=True, help="give it a terminal")
@click.option("-i", "--interactive", is_flag=True, help="connect stdin")
@click.option("-e", "--env", multiple=True, metavar="NAME=VALUE")
@click.option("--name", default=None, help="container id (default: a random one)")
@click.option("--rootfs", type=click.Path(exists=True, file_okay=False), default=None,
              help="run from this root filesystem directory instead of an image")
@click.option("--runtime", default="io.containerd.runc.v2", show_default=True)
@click.option("--memory", "-m", default=None, help="memory limit (64m, 1g)")
@click.option("--cpus", type=float, default=None, help="CPU quota in CPUs (0.5)")
@click.option("--mount", "mounts", multiple=True, metavar="SRC:DST[:ro]", help="bind mount")
@click.option("--log", "log_uri", default=None, metavar="URI",
              help="send output to file:///path or binary:///logger (detached default: a file under $KETCH_LOG_DIR)")
@click.option("--label", "-l", "labels", multiple=True, metavar="KEY=VALUE")
@click.argument("args", nargs=-1, required=False)
@with_client
async def run(c: AsyncClient, remove: bool, detach: bool, tty: bool, interactive: bool, env: tuple[str, ...],
              name: str | None, rootfs: str | None, runtime: str, memory: str | None, cpus: float | None,
              mounts: tuple[str, ...], log_uri: str | None, labels: tuple[str, ...], args: tuple[str, ...]) -> None:
    """Run a command in a new container: ``ketch run [OPTIONS] IMAGE [CMD]...`` or
    ``ketch run [OPTIONS] --rootfs DIR CMD...``."""
    if detach and remove:
        raise click.UsageError("--rm and -d do not go together (a detached container is removed with ketch rm)")
    image = None
    if rootfs is None:
        if not args:
            raise click.UsageError("give an IMAGE, or --rootfs DIR and a command")
        image, args = args[0], args[1:]
    cid = name or f"ketch-{uuid.uuid4().hex[:12]}"
    label_map = {kv.partition("=")[0]: kv.partition("=")[2] for kv in labels}
    if detach and log_uri is None:
        log_uri = f"file://{os.path.join(_log_dir(), c.namespace, cid + '.log')}"
        os.makedirs(os.path.dirname(log_uri[len('file://'):]), exist_ok=True)
    if log_uri:
        label_map[LOG_LABEL] = LogURI(log_uri).uri
    container = await c.create_container(
        cid, rootfs=rootfs, image=image, args=args, env=env, runtime=runtime, terminal=tty, labels=label_map,
        memory=parse_size(memory) if memory else None, cpus=cpus, mounts=mounts)
    try:
        if detach or log_uri:
            task = await container.new_task(LogURI(log_uri) if log_uri else None)
        else:
            stdin = sys.stdin.buffer if interactive else None
            if tty:
                io = Stdio(stdin=stdin, stdout=sys.stdout.fileno(), terminal=True)
            else:
                io = Stdio(stdin=stdin, stdout=sys.stdout.fileno(), stderr=sys.stderr.fileno())
            task = await container.new_task(io)
    except BaseException:
        await container.delete()
        raise
    if detach:
        await task.start()
        click.echo(cid)
        return
    status = await _attach(task, tty, start=True)
    if remove:
        await task.delete(force=True)
        await container.delete()
    raise Exit(status)


async def _attach(process: Any, tty: bool, start: bool) -> int:
    """Start (if asked) and follow ``process`` to its end: signals forwarded, the terminal in
    raw mode and resized with ours; its exit status."""
    loop = asyncio.get_running_loop()
    waiter = process.wait()
    restore = None
    if tty and sys.stdin.isatty():
        import termios
        import tty as ttymod

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        ttymod.setraw(fd)
        restore = functools.partial(termios.tcsetattr, fd, termios.TCSADRAIN, saved)
    try:
        if start:
            await process.start()

        async def resize() -> None:
            size = shutil.get_terminal_size()
            with contextlib.suppress(KetchError):
                await process.resize(size.columns, size.lines)

        def forward(sig: int) -> None:
            asyncio.ensure_future(process.kill(sig))

        if tty:
            await resize()
            loop.add_signal_handler(signal.SIGWINCH, lambda: asyncio.ensure_future(resize()))
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, forward, sig)
        status = await waiter
        await process.io.wait(2.0)
        return int(status.code)
    finally:
        if restore:
            restore()


def _command(container: Container) -> str:
    argv = container.spec.get("process", {}).get("args") or []
    return " ".join(argv)


@cli.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="also containers without a running task")
@click.option("--json", "as_json", is_flag=True)
@with_client
async def ps(c: AsyncClient, show_all: bool, as_json: bool) -> None:
    """List containers and their tasks."""
    tasks = {t.container_id: t for t in await c.tasks()}
    rows: list[dict[str, Any]] = []
    for ct in sorted(await c.containers(), key=lambda x: x.created_at or 0):
        t = tasks.get(ct.id)
        status = t.status.status if t else "no task"
        if not show_all and status not in ("running", "paused", "pausing"):
            continue
        rows.append({"id": ct.id, "image": ct.image or ct.spec.get("root", {}).get("path", ""),
                     "command": _command(ct), "status": status, "pid": t.pid if t else 0,
                     "exit_status": t.status.exit_status if t and status == "stopped" else None,
                     "runtime": ct.runtime, "labels": ct.labels, "created_at": ct.created_at})
    if as_json:
        out_json(rows)
    else:
        table(["CONTAINER", "IMAGE", "COMMAND", "STATUS", "PID"],
              [(r["id"], r["image"], r["command"], _status_text(r), r["pid"] or "-") for r in rows])


def _status_text(row: dict[str, Any]) -> str:
    return f"{row['status']} ({row['exit_status']})" if row["exit_status"] is not None else str(row["status"])


@cli.command(name="exec", context_settings={"allow_interspersed_args": False})
@click.option("-t", "--tty", is_flag=True)
@click.option("-i", "--interactive", is_flag=True)
@click.option("-e", "--env", multiple=True, metavar="NAME=VALUE", help="added to the container's environment")
@click.option("-w", "--workdir", default=None)
@click.option("--exec-id", default=None)
@click.argument("container")
@click.argument("args", nargs=-1, required=True)
@with_client
async def exec_(c: AsyncClient, tty: bool, interactive: bool, env: tuple[str, ...], workdir: str | None,
                exec_id: str | None, container: str, args: tuple[str, ...]) -> None:
    """Run a command in a running container; exits with its status."""
    ct = await c.container(container)
    task = await ct.task()
    stdin = sys.stdin.buffer if interactive else None
    io = (Stdio(stdin=stdin, stdout=sys.stdout.fileno(), terminal=True) if tty else
          Stdio(stdin=stdin, stdout=sys.stdout.fileno(), stderr=sys.stderr.fileno()))
    full_env = None
    if env:
        full_env = [*ct.spec.get("process", {}).get("env", []), *env]
    proc = await task.exec(exec_id or f"exec-{uuid.uuid4().hex[:10]}", args, io=io, env=full_env, cwd=workdir)
    try:
        status = await _attach(proc, tty, start=True)
    finally:
        with contextlib.suppress(KetchError):
            await proc.delete(force=True)
    raise Exit(status)


@cli.command()
@click.option("-f", "--follow", is_flag=True, help="keep printing until the container stops")
@click.argument("container")
@with_client
async def logs(c: AsyncClient, follow: bool, container: str) -> None:
    """Print a container's output (of one run with a file log: detached, or --log file://)."""
    ct = await c.container(container)
    uri = ct.labels.get(LOG_LABEL, "")
    if not uri.startswith("file://"):
        raise Fail(f"container {container} keeps no log file (run it detached, or with --log file:///path)")
    path = uri[len("file://"):]
    out = sys.stdout.buffer
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise Fail(f"log file {path} of container {container} is gone") from None
    with f:
        while True:
            chunk = f.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not follow:
                return
            try:
                status = (await (await ct.task()).status()).status
            except NotFound:
                status = "stopped"
            if status == "stopped":
                if not (chunk := f.read()):
                    return
                out.write(chunk)
                out.flush()
                return
            await asyncio.sleep(0.2)


@cli.command()
@click.option("-s", "--signal", "sig", default="SIGKILL", show_default=True)
@click.option("-a", "--all", "all_", is_flag=True, help="every process of the container")
@click.argument("containers", nargs=-1, required=True)
@with_client
async def kill(c: AsyncClient, sig: str, all_: bool, containers: tuple[str, ...]) -> None:
    """Send a signal to containers."""
    number = signal_number(sig)
    for name in containers:
        await (await (await c.container(name)).task()).kill(number, all=all_)
        click.echo(name)


@cli.command()
@click.option("-t", "--time", "timeout", type=float, default=10.0, show_default=True,
              help="seconds before SIGKILL")
@click.argument("containers", nargs=-1, required=True)
@with_client
async def stop(c: AsyncClient, timeout: float, containers: tuple[str, ...]) -> None:
    """Stop containers (SIGTERM, then SIGKILL after the timeout); prints each exit status."""
    for name in containers:
        status = await (await (await c.container(name)).task()).stop(timeout)
        click.echo(f"{name} {status.code}")


@cli.command()
@click.option("-f", "--force", is_flag=True, help="kill a running container first")
@click.argument("containers", nargs=-1, required=True)
@with_client
async def rm(c: AsyncClient, force: bool, containers: tuple[str, ...]) -> None:
    """Remove containers (and their tasks, once stopped)."""
    for name in containers:
        ct = await c.container(name)
        with contextlib.suppress(NotFound):
            task = await ct.task()
            try:
                await task.delete(force=force)
            except KetchError as e:
                raise Fail(f"{name}: {e} (ketch stop it, or rm -f)") from None
        await ct.delete()
        click.echo(name)


@cli.command()
@click.argument("containers", nargs=-1, required=True)
@with_client
async def pause(c: AsyncClient, containers: tuple[str, ...]) -> None:
    """Freeze every process of containers."""
    for name in containers:
        await (await (await c.container(name)).task()).pause()
        click.echo(name)


@cli.command()
@click.argument("containers", nargs=-1, required=True)
@with_client
async def unpause(c: AsyncClient, containers: tuple[str, ...]) -> None:
    """Thaw paused containers."""
    for name in containers:
        await (await (await c.container(name)).task()).resume()
        click.echo(name)


@cli.command()
@click.option("--exit", "exit_", is_flag=True, help="stop the task once checkpointed")
@click.option("--rw", is_flag=True, help="include the changes of the container's rw layer")
@click.option("--no-task", is_flag=True, help="leave the running process out (only spec, runtime, image, rw)")
@click.argument("container")
@click.argument("ref")
@with_client
async def checkpoint(c: AsyncClient, exit_: bool, rw: bool, no_task: bool, container: str, ref: str) -> None:
    """Checkpoint a container (its process through CRIU) as the image REF, in containerd's
    format; ``ketch images ls`` lists checkpoints, ``ketch restore`` restores one."""
    image = await (await c.container(container)).checkpoint(ref, task=not no_task, rw=rw, exit=exit_)
    click.echo(image.name)


@cli.command()
@click.option("--live", is_flag=True, help="restore the checkpointed process (else start the command anew)")
@click.option("--rw", is_flag=True, help="restore the checkpointed rw layer")
@click.option("--log", "log_uri", default=None, metavar="URI",
              help="send output to file:///path or binary:///logger (default: a file under $KETCH_LOG_DIR)")
@click.argument("container")
@click.argument("ref")
@with_client
async def restore(c: AsyncClient, live: bool, rw: bool, log_uri: str | None, container: str, ref: str) -> None:
    """Make the container CONTAINER from the checkpoint REF and start it, detached."""
    if log_uri is None:
        log_uri = f"file://{os.path.join(_log_dir(), c.namespace, container + '.log')}"
        os.makedirs(os.path.dirname(log_uri[len('file://'):]), exist_ok=True)
    await c.restore(container, ref, live=live, rw=rw, io=LogURI(log_uri), labels={LOG_LABEL: LogURI(log_uri).uri})
    click.echo(container)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.argument("container")
@with_client
async def top(c: AsyncClient, as_json: bool, container: str) -> None:
    """The processes of a container (host pids)."""
    task = await (await c.container(container)).task()
    rows = [{"pid": p.pid, "exec_id": p.exec_id, "command": _cmdline(p.pid)} for p in await task.pids()]
    if as_json:
        out_json(rows)
    else:
        table(["PID", "EXEC", "COMMAND"], [(r["pid"], r["exec_id"] or "-", r["command"]) for r in rows])


@cli.command()
@click.option("--no-stream", is_flag=True, help="one sample, then exit")
@click.option("--json", "as_json", is_flag=True, help="one JSON document (implies --no-stream)")
@click.argument("containers", nargs=-1)
@with_client
async def stats(c: AsyncClient, no_stream: bool, as_json: bool, containers: tuple[str, ...]) -> None:
    """CPU, memory and pids of running containers, live (or one sample)."""
    names = list(containers) or [t.container_id for t in await c.tasks() if t.status.status == "running"]
    tasks = [await (await c.container(n)).task() for n in names]

    async def sample() -> list[Any]:
        return [await t.metrics() for t in tasks]

    async def rows(interval: float = 0.5) -> list[dict[str, Any]]:
        before, t0 = await sample(), time.monotonic()
        await asyncio.sleep(interval)
        after, dt = await sample(), time.monotonic() - t0
        return [{"id": n, "cpu_percent": round(100 * (a.cpu_ns - b.cpu_ns) / (dt * 1e9), 2),
                 "memory_bytes": a.memory_bytes, "memory_limit": a.memory_limit, "pids": a.pids, "cgroup": a.cgroup}
                for n, b, a in zip(names, before, after)]

    def render(rs: list[dict[str, Any]]) -> Any:
        from rich.table import Table

        t = Table(box=None, header_style="bold")
        for col in ("CONTAINER", "CPU %", "MEM USAGE / LIMIT", "PIDS"):
            t.add_column(col)
        for r in rs:
            t.add_row(r["id"], f"{r['cpu_percent']:.2f}%",
                      f"{human_size(r['memory_bytes'])} / {human_size(r['memory_limit'])}", str(r["pids"]))
        return t

    if as_json:
        out_json(await rows())
        return
    from rich.console import Console

    if no_stream:
        Console().print(render(await rows()))
        return
    from rich.live import Live

    with Live(render(await rows()), refresh_per_second=2) as live:
        while True:
            live.update(render(await rows(1.0)))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="one JSON object a line")
@click.argument("filters", nargs=-1)
@with_client
async def events(c: AsyncClient, as_json: bool, filters: tuple[str, ...]) -> None:
    """Follow the daemon's events (containerd filters, e.g. 'topic=="/tasks/exit"'); survives
    a daemon restart."""
    async for e in c.events(*filters):
        if as_json:
            click.echo(json.dumps(e.as_dict(), sort_keys=True, default=str))
        else:
            when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(e.timestamp))
            click.echo(f"{when} {e.namespace} {e.topic} {json.dumps(e.fields(), sort_keys=True)}")
        sys.stdout.flush()


# -- images --------------------------------------------------------------------------------


@cli.group()
def images() -> None:
    """List, pull, import, export, tag and remove images."""


def _progress() -> tuple[Any, Callable[[str, int, int], None]]:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    # on stderr, and only on a terminal: stdout stays the command's answer
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), transient=True,
                   disable=not sys.stderr.isatty(), console=Console(stderr=True))
    ids: dict[str, Any] = {}

    def update(what: str, done: int, total: int) -> None:
        if what not in ids:
            ids[what] = bar.add_task(what[:24], total=total)
        bar.update(ids[what], completed=done)

    return bar, update


def _image_row(i: Image, size: int) -> dict[str, Any]:
    return {**i.as_dict(), "unpacked_size": size}


@images.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
@click.option("-q", "--quiet", is_flag=True, help="names only")
@click.argument("filters", nargs=-1)
@with_client
async def images_ls(c: AsyncClient, as_json: bool, quiet: bool, filters: tuple[str, ...]) -> None:
    """List images."""
    found = await c.images(*filters)
    if quiet:
        for i in found:
            click.echo(i.name)
        return
    rows = [{**i.as_dict(), "content_size": await c.image_size(i)} for i in found]
    if as_json:
        out_json(rows)
    else:
        table(["NAME", "DIGEST", "SIZE"], [(r["name"], r["digest"][:19], human_size(r["content_size"])) for r in rows])


@images.command(name="pull")
@click.option("--plain-http", is_flag=True, default=None, help="the registry speaks HTTP (default for localhost)")
@click.argument("ref")
@with_client
async def images_pull(c: AsyncClient, plain_http: bool | None, ref: str) -> None:
    """Pull an image for this platform and unpack it."""
    bar, update = _progress()
    with bar:
        image = await c.pull(ref, plain_http=plain_http or None, progress=update)
    click.echo(f"{image.name} {image.digest}")


@images.command(name="import")
@click.option("--name", default=None, help="name for an archive whose image has none")
@click.argument("archive", type=click.Path(dir_okay=False))
@with_client
async def images_import(c: AsyncClient, name: str | None, archive: str) -> None:
    """Import an OCI layout or docker save archive."""
    bar, update = _progress()
    with bar:
        found = await c.import_image(archive, name=name, progress=update)
    for i in found:
        click.echo(f"{i.name} {i.digest}")


@images.command(name="export")
@click.argument("archive", type=click.Path(dir_okay=False))
@click.argument("names", nargs=-1, required=True)
@with_client
async def images_export(c: AsyncClient, archive: str, names: tuple[str, ...]) -> None:
    """Write images to an OCI layout archive."""
    await c.export_images(archive, *names)
    click.echo(archive)


@images.command(name="rm")
@click.argument("names", nargs=-1, required=True)
@with_client
async def images_rm(c: AsyncClient, names: tuple[str, ...]) -> None:
    """Remove images (their blobs and snapshots go when nothing else holds them)."""
    for n in names:
        await c.remove_image(n)
        click.echo(n)


@images.command(name="tag")
@click.option("-f", "--force", is_flag=True, help="replace an image of that name")
@click.argument("source")
@click.argument("target")
@with_client
async def images_tag(c: AsyncClient, force: bool, source: str, target: str) -> None:
    """Give an image a second name."""
    image = await c.tag_image(source, target, force=force)
    click.echo(image.name)


# -- the daemon and the host -------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@with_client
async def version(c: AsyncClient, as_json: bool) -> None:
    """The client's and the daemon's versions."""
    v = await c.version()
    doc = {"client": {"version": __version__}, "server": {"address": c.address, "version": v.version,
                                                          "revision": v.revision}}
    if as_json:
        out_json(doc)
    else:
        click.echo(f"Client:\n  Version:  {__version__}\nServer:\n  Address:  {c.address}\n"
                   f"  Version:  {v.version}\n  Revision: {v.revision}")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@with_client
async def info(c: AsyncClient, as_json: bool) -> None:
    """The daemon: version, uuid, namespaces, runtimes and plugins."""
    v = await c.version()
    plugins = await c.plugins()
    runtimes = sorted({p["id"] for p in plugins if p["type"] in ("io.containerd.runtime.v2", "io.containerd.runtime.v1")})
    doc = {"address": c.address, "version": v.version, "revision": v.revision, "uuid": await c.server_uuid(),
           "namespaces": await c.namespaces(), "runtime_plugins": runtimes, "plugins": plugins}
    if as_json:
        out_json(doc)
        return
    click.echo(f"Address:    {doc['address']}\nVersion:    {v.version} ({v.revision})\nUUID:       {doc['uuid']}\n"
               f"Namespaces: {', '.join(doc['namespaces']) or '-'}\nRuntimes:   {', '.join(runtimes) or '-'}")
    table(["TYPE", "ID", "STATUS"], [(p["type"], p["id"], p["status"]) for p in plugins])


def _checks(address: str) -> list[dict[str, Any]]:
    """What the host needs, each: name, ok, what was found, and what to do if not ok."""
    out: list[dict[str, Any]] = []

    def check(name: str, ok: bool, found: str, fix: str = "", required: bool = True) -> None:
        out.append({"check": name, "ok": ok, "found": found, "fix": "" if ok else fix, "required": required})

    runc = shutil.which("runc")
    found = ""
    if runc:
        r = subprocess.run([runc, "--version"], capture_output=True, text=True)
        found = r.stdout.splitlines()[0] if r.returncode == 0 and r.stdout else "runc does not run"
    check("runc", bool(runc) and "runc version" in found, found or "not on PATH", "apt-get install runc")
    v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    if v2:
        with open("/sys/fs/cgroup/cgroup.controllers") as f:
            controllers = f.read().split()
    else:
        controllers = sorted(p.name for p in os.scandir("/sys/fs/cgroup") if p.is_dir()) if os.path.isdir(
            "/sys/fs/cgroup") else []
    check("cgroups", bool(controllers), f"v{2 if v2 else 1}: {' '.join(controllers)}" if controllers else "none mounted",
          "mount cgroup2 on /sys/fs/cgroup")
    missing = [c for c in ("cpu", "memory", "pids") if c not in controllers]
    check("cgroup controllers", not missing, "missing " + ", ".join(missing) if missing else "cpu memory pids",
          "enable them (cgroup v2: +cpu +memory +pids in the parent's cgroup.subtree_control)", required=False)
    with open("/proc/filesystems") as f:
        filesystems = f.read()
    overlay = "overlay" in filesystems
    check("overlayfs", overlay, "available" if overlay else "not in /proc/filesystems",
          "modprobe overlay (or use --snapshotter native)", required=False)
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            userns = int(f.read())
    except OSError:
        userns = 0
    check("user namespaces", userns > 0, f"max_user_namespaces={userns}", "sysctl user.max_user_namespaces=15000",
          required=False)
    criu = shutil.which("criu")
    check("criu", bool(criu), criu or "not on PATH", "apt-get install criu (only for checkpoint/restore)",
          required=False)
    return out


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check the host and the daemon's socket, and say what to fix."""
    from ketch.client._conn import default_address

    address = default_address(ctx.obj["address"])
    checks = _checks(address)

    async def reach() -> str:
        async with _client(ctx) as c:
            return (await c.version()).version

    try:
        found, ok = f"{address}: {asyncio.run(reach())}", True
    except KetchError as e:
        found, ok = f"{address}: {e}", False
    checks.append({"check": "daemon socket", "ok": ok, "found": found, "required": True,
                   "fix": "" if ok else "start ketchd (or point --address / $KETCH_ADDRESS at a running daemon)"})
    if as_json:
        out_json(checks)
    else:
        for ch in checks:
            mark = "ok  " if ch["ok"] else ("FAIL" if ch["required"] else "warn")
            click.echo(f"{mark} {ch['check']}: {ch['found']}" + (f"\n     fix: {ch['fix']}" if ch["fix"] else ""))
    if not all(ch["ok"] for ch in checks if ch["required"]):
        raise Exit(1)


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script (e.g. eval "$(ketch completion bash)")."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(cli, {}, "ketch", "_KETCH_COMPLETE").source())


def main(argv: Sequence[str] | None = None) -> None:
    """The entry point: one clear line on error, no traceback."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="ketch", standalone_mode=False)
    except Exit as e:
        sys.exit(e.code)
    except Fail as e:
        click.echo(f"ketch: {e}", err=True)
        sys.exit(e.code)
    except KetchError as e:
        click.echo(f"ketch: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("ketch: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (BrokenPipeError, KeyboardInterrupt):
        sys.exit(130)
    except OSError as e:
        click.echo(f"ketch: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
        sys.exit(1)
