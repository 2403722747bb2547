"""ketch against containerd, side by side.

    .venv/bin/python -m bench.run [--quick] [--n N] [--results DIR]

Starts a private Debian containerd 1.6 and a private ketchd (see ketch.testing.daemons) and
runs the same workloads, with the same client (Debian's ``ctr`` for command-level ones, a gRPC
Subscribe for events), against three setups:

    containerd    containerd + containerd-shim-runc-v2   (the reference)
    ketchd        ketchd     + containerd-shim-ketch-v2
    ketchd-runc   ketchd     + containerd-shim-runc-v2

Iterations are interleaved (run i goes through every setup, in an order rotated per run) so
that drift on the machine touches all setups alike. Prints a table (median, p95 and the ratio
setup / containerd of the medians; for rates the ratio of rates) and writes the same as JSON
into bench/results/<UTC timestamp>.json. Needs root. Benchmarks are not tests: nothing here
judges the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ketch.shim.keeper import parent_pid
from ketch.testing import leftovers, system
from ketch.testing.daemons import KETCH_RUNTIME, RUNC_RUNTIME, Containerd, Daemon, Ketchd

RESULTS = Path(__file__).resolve().parent / "results"
#: ctr gives a --rootfs container no environment at all
PATH_ENV = ("--env", "PATH=/bin")
MiB = 1 << 20
SETUP_NAMES = ("containerd", "ketchd", "ketchd-runc")
REFERENCE = "containerd"
#: how long close() waits for idle shared shims to go by themselves (they linger 10 s)
LINGER_WAIT = 15.0


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    unit: str
    #: "lower" (latency, memory) or "higher" (rates)
    better: str
    #: the setups that can have a sample at all; the others report why not (an error)
    only: tuple[str, ...] = ()


#: every workload, in the order of the table; keys are stable across --quick and full runs
WORKLOADS = (
    Workload("run_rm", "ctr run --rm /bin/true", "ms", "lower"),
    Workload("first_run", "first run in a new group (ctr run --rm, new namespace)", "ms", "lower"),
    Workload("concurrent_small", "concurrent ctr run --rm (small batch)", "containers/s", "higher"),
    Workload("concurrent_large", "concurrent ctr run --rm (large batch)", "containers/s", "higher"),
    Workload("exec", "ctr task exec /bin/true", "ms", "lower"),
    Workload("event_exit", "kill -9 -> /tasks/exit received", "ms", "lower"),
    Workload("stdout", "stdout throughput through the FIFOs", "MiB/s", "higher"),
    Workload("mem_shim", "shim PSS per idle container", "KiB", "lower"),
    Workload("mem_daemon", "daemon PSS with the idle containers", "KiB", "lower"),
    Workload("recovery", "kill -9 daemon -> all tasks RUNNING again", "ms", "lower"),
    Workload("mem_shim_many", "shim PSS per idle container, many in one namespace", "KiB", "lower"),
    Workload("task_ls_many", "ctr task ls with many running", "ms", "lower"),
    Workload("run_rm_many", "ctr run --rm /bin/true beside many running", "ms", "lower"),
    # containerd's runc shim takes its container with it: only ketchd's shim groups come back
    Workload("takeover", "kill -9 the shim -> its containers serving again", "ms", "lower", only=("ketchd",)),
)


@dataclass
class Config:
    quick: bool = False
    run_n: int = 30
    exec_n: int = 30
    event_n: int = 15
    concurrent: tuple[int, int] = (20, 50)
    concurrent_rounds: int = 2
    idle: int = 20
    idle_rounds: int = 5
    stdout_bytes: int = 256 * MiB
    stdout_n: int = 3
    #: idle containers in one namespace (one ketch shim group), started ``many_batch`` at a time
    many: int = 200
    many_batch: int = 20
    many_n: int = 20

    @classmethod
    def make(cls, quick: bool, n: int | None) -> Config:
        if quick:
            c = cls(quick=True, run_n=2, exec_n=2, event_n=2, concurrent=(5, 10), concurrent_rounds=1, idle=5,
                    idle_rounds=1, stdout_bytes=32 * MiB, stdout_n=1, many=10, many_batch=10, many_n=2)
        else:
            c = cls()
        if n is not None:
            c.run_n = c.exec_n = c.event_n = c.many_n = n
            c.concurrent_rounds = min(c.concurrent_rounds, n)
            c.idle_rounds = min(c.idle_rounds, n)
            c.stdout_n = min(c.stdout_n, n)
        return c


class BenchError(Exception):
    pass


class BenchKetchd(Ketchd):
    """ketchd at log level info, like the containerd it is compared with (the test default is debug),
    without asyncio's debug mode (which slows it)."""

    slow_callback = 0.0

    def argv(self) -> list[str]:
        argv = super().argv()
        if "--log-level" in argv:
            argv[argv.index("--log-level") + 1] = "info"
        else:
            argv += ["--log-level", "info"]
        return argv


@dataclass
class Setup:
    name: str
    daemon: Daemon
    runtime: str
    rootfs: str

    @property
    def fifo(self) -> tuple[str, str]:
        return ("--fifo-dir", str(self.daemon.base / "fifo"))

    def ctr_argv(self, ns: str, *args: str) -> list[str]:
        return ["ctr", "--address", self.daemon.address, "--namespace", ns, *args]

    def run_argv(self, ns: str, cid: str, *cmd: str, detach: bool = False) -> list[str]:
        return self.ctr_argv(ns, "run", "-d" if detach else "--rm", *self.fifo, "--runtime", self.runtime, *PATH_ENV,
                             "--rootfs", self.rootfs, cid, *cmd)

    def ctr(self, ns: str, *args: str, check: bool = True, timeout: float = 120) -> str:
        r = subprocess.run(self.ctr_argv(ns, *args), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise BenchError(f"{self.name}: ctr {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def tasks(self, ns: str) -> dict[str, tuple[int, str]]:
        """``ctr tasks ls``: id -> (pid, status)."""
        out: dict[str, tuple[int, str]] = {}
        for line in self.ctr(ns, "tasks", "ls").splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3:
                out[parts[0]] = (int(parts[1]), parts[2])
        return out


@dataclass
class Results:
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    params: dict[str, dict[str, object]] = field(default_factory=dict)

    def add(self, key: str, setup: str, value: float) -> None:
        self.samples.setdefault(key, {}).setdefault(setup, []).append(value)

    def error(self, key: str, setup: str, message: str) -> None:
        self.errors.setdefault(key, {}).setdefault(setup, []).append(message[-500:])
        log(f"  ! {key} {setup}: {message[-300:]}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rotations(setups: list[Setup], n: int) -> Iterator[tuple[int, list[Setup]]]:
    """Run i visits every setup, starting with setup i mod 3: interleaved, no fixed first place."""
    for i in range(n):
        k = i % len(setups)
        yield i, setups[k:] + setups[:k]


# --- measurement helpers ---------------------------------------------------------------------------

def timed(argv: list[str], stdout: int | object = subprocess.DEVNULL, timeout: float = 300) -> float:
    """Wall clock of one client process, in seconds; raises BenchError when it fails."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, timeout=timeout)  # type: ignore[call-overload]
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise BenchError(f"{' '.join(argv[5:])} failed ({r.returncode}): {r.stderr.decode(errors='replace').strip()}")
    return dt


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise BenchError(f"no Pss in /proc/{pid}/smaps_rollup")


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return not f.read().rsplit(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def parents() -> dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process."""
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(") ", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue
        if state != "Z":
            out[int(entry)] = int(ppid)
    return out


def supervisors(parent: dict[int, int], inits: set[int], recorded: set[int], foreign: set[int]) -> set[int]:
    """The processes that supervise the tasks whose init processes are ``inits``, by kinship.

    ``parent`` maps pid -> parent pid; ``recorded`` are shim pids the bundles name. From the
    parent of each init and from each recorded pid it takes every process up the ancestry (a
    shim, a keeper above it) until one in ``foreign`` (PID 1, the daemon, who started the bench),
    then every other descendant of those (a template process); never the tasks' own processes
    (an init and what that started)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    workload: set[int] = set()
    stack = list(inits)
    while stack:
        p = stack.pop()
        if p not in workload:
            workload.add(p)
            stack += children.get(p, [])
    foreign = foreign | {0, 1}
    found: set[int] = set()
    for p in {parent.get(p, 0) for p in inits} | recorded:
        while p in parent and p not in foreign and p not in found and p not in workload:
            found.add(p)
            p = parent[p]
    stack = list(found)
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in found and c not in workload and c not in foreign:
                found.add(c)
                stack.append(c)
    return found


def supervision_pids(s: Setup, ns: str, ids: list[str]) -> set[int]:
    """Every process that supervises the tasks ``ids`` of ``ns`` (see supervisors): found from
    the tasks' init pids and the ``shim.pid`` files of their bundles, not by name; and the
    daemon's shim template, if it has one."""
    tasks = s.tasks(ns)
    missing = [cid for cid in ids if cid not in tasks]
    if missing:
        raise BenchError(f"no task for {missing[:5]}")
    recorded = set()
    for cid in ids:  # a shim writes shim.pid into the bundle it was started for, if at all
        try:
            recorded.add(int((s.daemon.bundle(ns, cid) / "shim.pid").read_text()))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            raise BenchError(f"{cid}: unreadable shim.pid in the bundle: {e}") from None
    parent = parents()
    assert s.daemon.proc is not None
    foreign = {s.daemon.proc.pid}
    p = os.getpid()
    while p > 1:  # whoever started the bench, up to PID 1
        foreign.add(p)
        p = parent.get(p, 0)
    # a shim template (ketchd's, shared by all its groups) supervises nothing itself but forks
    # every group's shim: counted whole, as if these tasks were all it served
    templates = set(system.shim_templates(str(s.daemon.base))) if s.runtime == KETCH_RUNTIME else set()
    return supervisors(parent, {tasks[cid][0] for cid in ids}, recorded, foreign) | templates


def spawn(d: Daemon) -> None:
    """Start ``d`` the way Daemon.start does, without waiting for it (recovery times the wait)."""
    env = dict(os.environ, PATH=f"{system.VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}")
    with open(d.log, "ab") as logf:
        d.proc = subprocess.Popen(d.argv(), stdout=logf, stderr=logf, env=env, start_new_session=True)


def run_all(argvs: list[list[str]], stdout: int = subprocess.DEVNULL, timeout: float = 300) -> list[str]:
    """Run client processes at once; the error output of each that failed."""
    procs = [subprocess.Popen(a, stdout=stdout, stderr=subprocess.PIPE) for a in argvs]
    failed = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            failed.append(err.decode(errors="replace").strip() or f"exit {p.returncode}")
    return failed


def start_detached(s: Setup, ns: str, ids: list[str], cmd: tuple[str, ...] = ("sleep", "1000"), batch: int = 10) -> None:
    for i in range(0, len(ids), batch):
        failed = run_all([s.run_argv(ns, cid, *cmd, detach=True) for cid in ids[i:i + batch]])
        if failed:
            raise BenchError(f"{s.name}: ctr run -d failed: {failed[0]}")
    deadline = time.monotonic() + 60
    while True:
        tasks = s.tasks(ns)
        if all(tasks.get(cid, (0, ""))[1] == "RUNNING" for cid in ids):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{s.name}: tasks not RUNNING: {tasks}")
        time.sleep(0.05)


def clear(s: Setup, ns: str) -> None:
    """Kill and remove every task and container of ``ns``, in parallel; the namespace stays."""
    if s.daemon.proc is None or s.daemon.proc.poll() is not None:
        return
    ids = list(s.tasks(ns))
    run_all([s.ctr_argv(ns, "tasks", "kill", "-s", "SIGKILL", cid) for cid in ids])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [cid for cid, (_, status) in s.tasks(ns).items() if status != "STOPPED"]
        if not left:
            break
        time.sleep(0.05)
    run_all([s.ctr_argv(ns, "tasks", "rm", "-f", cid) for cid in s.tasks(ns)])
    containers = s.ctr(ns, "containers", "ls", "-q", check=False).split()
    if containers:
        s.ctr(ns, "containers", "rm", *containers, check=False)


class ExitWatch:
    """A gRPC Subscribe to /tasks/exit of one namespace; a thread stamps each envelope on arrival."""

    def __init__(self, address: str, ns: str) -> None:
        import grpc

        from ketch.api.containerd.events import task_pb2
        from ketch.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc

        self._exit = task_pb2.TaskExit
        self.channel = grpc.insecure_channel(f"unix://{address}")
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.stream = events_pb2_grpc.EventsStub(self.channel).Subscribe(
            events_pb2.SubscribeRequest(filters=[f'namespace=={ns},topic=="/tasks/exit"']),
            metadata=[("containerd-namespace", ns)])
        self.arrivals: queue.Queue[tuple[float, str, str]] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for envelope in self.stream:
                t = time.perf_counter()
                if envelope.topic == "/tasks/exit":
                    ev = self._exit.FromString(envelope.event.value)
                    self.arrivals.put((t, ev.container_id, ev.id))
        except Exception:  # cancelled on close, or the daemon went away
            pass

    def drain(self) -> None:
        while not self.arrivals.empty():
            self.arrivals.get_nowait()

    def wait(self, cid: str, timeout: float = 20) -> float:
        deadline = time.monotonic() + timeout
        while True:
            try:
                t, container, id = self.arrivals.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"no /tasks/exit for {cid} within {timeout}s") from None
            if container == cid and id == cid:
                return t

    def close(self) -> None:
        self.stream.cancel()
        self.thread.join(5)
        self.channel.close()


# --- the benchmark ---------------------------------------------------------------------------------

class Bench:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.results = Results()
        self.namespaces: dict[str, list[str]] = {"containerd": [], "ketchd": []}
        self.fs_dir = Path(tempfile.mkdtemp(prefix="kb-fs-", dir="/tmp"))
        self.rootfs = str(system.make_busybox_rootfs(self.fs_dir / "rootfs"))
        self.containerd = Containerd(Path(tempfile.mkdtemp(prefix="kb-c-", dir="/tmp")))
        self.ketchd = BenchKetchd(Path(tempfile.mkdtemp(prefix="kb-k-", dir="/tmp")))
        self.setups = [
            Setup("containerd", self.containerd, RUNC_RUNTIME, self.rootfs),
            Setup("ketchd", self.ketchd, KETCH_RUNTIME, self.rootfs),
            Setup("ketchd-runc", self.ketchd, RUNC_RUNTIME, self.rootfs),
        ]

    def ns(self, s: Setup, what: str) -> str:
        name = system.unique(f"kb-{what}")
        self.namespaces[s.daemon.name].append(name)
        return name

    def sample(self, key: str, s: Setup, measure: Callable[[], float]) -> None:
        try:
            self.results.add(key, s.name, measure())
        except (BenchError, subprocess.TimeoutExpired, OSError) as e:
            self.results.error(key, s.name, str(e))

    # 1. run --rm latency
    def run_rm(self) -> None:
        n = self.cfg.run_n
        self.results.params["run_rm"] = {"n": n, "warmup": 1}
        nss = {s.name: self.ns(s, "run") for s in self.setups}
        for s in self.setups:  # warm-up: page cache, bytecode, first-use paths in the daemons
            self.sample("_warmup", s, lambda: timed(s.run_argv(nss[s.name], "w", "/bin/true")))
        for i, order in rotations(self.setups, n):
            for s in order:
                self.sample("run_rm", s, lambda: 1000 * timed(s.run_argv(nss[s.name], f"r{i}", "/bin/true")))
        log(f"run --rm: {n} x {len(self.setups)} done")

    # 1b. run --rm as the first task of a namespace never used before: a new shim group for ketchd
    def first_run(self) -> None:
        n = self.cfg.run_n
        self.results.params["first_run"] = {"n": n, "warmup": 1, "namespace": "new for every run"}
        for s in self.setups:
            self.sample("_warmup", s, lambda: timed(s.run_argv(self.ns(s, "first"), "w", "/bin/true")))
        for i, order in rotations(self.setups, n):
            for s in order:
                ns = self.ns(s, "first")
                self.sample("first_run", s, lambda: 1000 * timed(s.run_argv(ns, f"f{i}", "/bin/true")))
        log(f"first run in a new group: {n} x {len(self.setups)} done")

    # 2. concurrent run --rm
    def concurrent(self) -> None:
        rounds = self.cfg.concurrent_rounds
        for key, k in zip(("concurrent_small", "concurrent_large"), self.cfg.concurrent):
            self.results.params[key] = {"containers": k, "rounds": rounds}
            nss = {s.name: self.ns(s, f"conc{k}") for s in self.setups}
            for i, order in rotations(self.setups, rounds):
                for s in order:
                    def measure() -> float:
                        argvs = [s.run_argv(nss[s.name], f"c{i}-{j}", "/bin/true") for j in range(k)]
                        t0 = time.perf_counter()
                        failed = run_all(argvs)
                        dt = time.perf_counter() - t0
                        for err in failed:
                            self.results.error(key, s.name, err)
                        if len(failed) == k:
                            raise BenchError(f"all {k} runs failed")
                        return (k - len(failed)) / dt
                    self.sample(key, s, measure)
                    clear(s, nss[s.name])  # leftovers of failed runs only
            log(f"concurrent {k}: {rounds} round(s) x {len(self.setups)} done")

    # 3. exec latency
    def exec(self) -> None:
        n = self.cfg.exec_n
        self.results.params["exec"] = {"n": n, "warmup": 1}
        nss = {s.name: self.ns(s, "exec") for s in self.setups}
        for s in self.setups:
            start_detached(s, nss[s.name], ["x"])
            self.sample("_warmup", s, lambda: timed(s.ctr_argv(nss[s.name], "tasks", "exec", *s.fifo, "--exec-id", "w",
                                                                "x", "/bin/true")))
        for i, order in rotations(self.setups, n):
            for s in order:
                argv = s.ctr_argv(nss[s.name], "tasks", "exec", *s.fifo, "--exec-id", f"e{i}", "x", "/bin/true")
                self.sample("exec", s, lambda: 1000 * timed(argv))
        for s in self.setups:
            clear(s, nss[s.name])
        log(f"exec: {n} x {len(self.setups)} done")

    # 4. event latency
    def event_exit(self) -> None:
        n = self.cfg.event_n
        self.results.params["event_exit"] = {"n": n, "warmup": 1, "client": "gRPC Events.Subscribe"}
        nss = {s.name: self.ns(s, "ev") for s in self.setups}
        watches: dict[str, ExitWatch] = {}
        try:
            for s in self.setups:
                watches[s.name] = ExitWatch(s.daemon.address, nss[s.name])

            def one(s: Setup, cid: str) -> float:
                ns = nss[s.name]
                start_detached(s, ns, [cid])
                pid = s.tasks(ns)[cid][0]
                w = watches[s.name]
                w.drain()
                t0 = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                t1 = w.wait(cid)
                s.ctr(ns, "tasks", "rm", cid)
                s.ctr(ns, "containers", "rm", cid)
                return 1000 * (t1 - t0)

            for s in self.setups:  # warm-up, and proof that the subscription is live
                self.sample("_warmup", s, lambda: one(s, "w"))
            for i, order in rotations(self.setups, n):
                for s in order:
                    self.sample("event_exit", s, lambda: one(s, f"v{i}"))
        finally:
            for w in watches.values():
                w.close()
            for s in self.setups:
                clear(s, nss[s.name])
        log(f"events: {n} x {len(self.setups)} done")

    # 7. stdout throughput
    def stdout(self) -> None:
        n, size = self.cfg.stdout_n, self.cfg.stdout_bytes
        self.results.params["stdout"] = {"n": n, "bytes": size, "warmup": "1 MiB, byte count checked"}
        nss = {s.name: self.ns(s, "out") for s in self.setups}
        for s in self.setups:
            def check() -> float:
                out = subprocess.run(s.run_argv(nss[s.name], "w", "head", "-c", str(MiB), "/dev/zero"),
                                     capture_output=True, timeout=60)
                if out.returncode != 0 or len(out.stdout) != MiB:
                    raise BenchError(f"stdout check: exit {out.returncode}, {len(out.stdout)} of {MiB} bytes: "
                                     f"{out.stderr.decode(errors='replace').strip()}")
                return 0.0
            self.sample("_warmup", s, check)
        with open(os.devnull, "wb") as null:
            for i, order in rotations(self.setups, n):
                for s in order:
                    argv = s.run_argv(nss[s.name], f"o{i}", "head", "-c", str(size), "/dev/zero")
                    self.sample("stdout", s, lambda: size / MiB / timed(argv, stdout=null.fileno()))
        log(f"stdout: {n} x {len(self.setups)} x {size // MiB} MiB done")

    # 5, 6 and 11. memory of idle containers, recovery of the daemon with them running, then
    # kill -9 of the process that supervises one of them (for ketchd: the group's serving shim)
    def idle(self) -> None:
        count, rounds = self.cfg.idle, self.cfg.idle_rounds
        for key in ("mem_shim", "mem_daemon", "recovery", "takeover"):
            self.results.params[key] = {"containers": count, "rounds": rounds}
        self.results.params["recovery"]["poll_ms"] = 20
        self.results.params["takeover"].update(poll_ms=20, measured=(
            "from kill -9 of the parent of a container's init until ctr task ls shows every container "
            "RUNNING with its pid and an exec in the killed one's container succeeds"))
        ids = [f"i{j}" for j in range(count)]
        for i, order in rotations(self.setups, rounds):
            for s in order:
                # one setup's containers at a time: shared pages would otherwise lower everyone's PSS,
                # and a daemon would recover the other setup's tasks too
                ns = self.ns(s, "idle")
                try:
                    start_detached(s, ns, ids)
                    time.sleep(1.0)  # let the shims settle into idleness
                    self._mem_shim("mem_shim", s, ns, ids)
                    assert s.daemon.proc is not None
                    self.results.add("mem_daemon", s.name, pss_kib(s.daemon.proc.pid))
                    self.sample("recovery", s, lambda: self._recover(s, ns, ids))
                    self.sample("takeover", s, lambda: self._takeover(s, ns, ids))
                except (BenchError, OSError, subprocess.TimeoutExpired) as e:
                    self.results.error("mem_shim", s.name, str(e))
                finally:
                    if s.daemon.proc is None or s.daemon.proc.poll() is not None:
                        s.daemon.start()
                    clear(s, ns)
        log(f"memory, recovery and takeover: {rounds} round(s) x {len(self.setups)} x {count} containers done")

    def _takeover(self, s: Setup, ns: str, ids: list[str]) -> float:
        before = s.tasks(ns)
        victim = ids[0]
        shim = parent_pid(before[victim][0])
        # containerd's runc shim removes its socket only when it exits of itself, and nothing
        # else does after a kill -9 (as under containerd): this removes it
        shim_socket = leftovers.runc_shim_socket(s.daemon.address, ns, victim) if s.runtime == RUNC_RUNTIME else ""
        t0 = time.perf_counter()
        os.kill(shim, signal.SIGKILL)
        if shim_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shim_socket)
        deadline = t0 + 10
        while time.perf_counter() < deadline:
            try:
                now = s.tasks(ns)
            except BenchError:
                now = {}
            if now and all(now.get(c) == (before[c][0], "RUNNING") for c in ids):
                argv = s.ctr_argv(ns, "tasks", "exec", *s.fifo, "--exec-id", "after", victim, "/bin/true")
                if subprocess.run(argv, capture_output=True, timeout=30).returncode == 0:
                    return 1000 * (time.perf_counter() - t0)
            if now and now.get(victim, (0, "STOPPED"))[1] == "STOPPED":
                raise BenchError("the container died with its shim")
            time.sleep(0.02)
        raise BenchError("not serving again within 10 s")

    def _mem_shim(self, key: str, s: Setup, ns: str, ids: list[str]) -> None:
        """PSS of every supervision process of ``ids`` (see supervision_pids), per container."""
        procs = supervision_pids(s, ns, ids)  # one shim may serve many tasks: each counted once
        if not procs:
            raise BenchError("no supervision process found")
        self.results.add(key, s.name, sum(pss_kib(p) for p in procs) / len(ids))
        self.results.params[key].setdefault("shim_processes", {})[s.name] = len(procs)  # type: ignore[union-attr]

    # 8, 9 and 10. many idle containers in one namespace (for ketchd: one shim group)
    def many(self) -> None:
        count, n = self.cfg.many, self.cfg.many_n
        self.results.params["mem_shim_many"] = {"containers": count, "batch": self.cfg.many_batch}
        for key in ("task_ls_many", "run_rm_many"):
            self.results.params[key] = {"containers": count, "n": n}
        self.results.params["run_rm_many"]["warmup"] = 1
        ids = [f"m{j}" for j in range(count)]
        for s in self.setups:  # one setup's containers at a time, as in idle()
            ns = self.ns(s, "many")
            try:
                t0 = time.perf_counter()
                start_detached(s, ns, ids, batch=self.cfg.many_batch)
                self.results.params["mem_shim_many"].setdefault("start_s", {})[s.name] = round(  # type: ignore[union-attr]
                    time.perf_counter() - t0, 1)
                time.sleep(1.0)  # let the shims settle into idleness
                self._mem_shim("mem_shim_many", s, ns, ids)
                for _ in range(n):
                    self.sample("task_ls_many", s, lambda: 1000 * timed(s.ctr_argv(ns, "tasks", "ls")))
                # in the same namespace as the idle ones: for ketchd, the same shim group
                self.sample("_warmup", s, lambda: timed(s.run_argv(ns, "w", "/bin/true")))
                for i in range(n):
                    self.sample("run_rm_many", s, lambda: 1000 * timed(s.run_argv(ns, f"r{i}", "/bin/true")))
            except (BenchError, OSError, subprocess.TimeoutExpired) as e:
                self.results.error("mem_shim_many", s.name, str(e))
            finally:
                clear(s, ns)
        log(f"many: {len(self.setups)} x {count} containers, {n} sample(s) each done")

    def _recover(self, s: Setup, ns: str, ids: list[str]) -> float:
        d = s.daemon
        d.kill(signal.SIGKILL)
        t0 = time.perf_counter()
        spawn(d)
        deadline = t0 + 60
        argv = s.ctr_argv(ns, "tasks", "ls")
        while time.perf_counter() < deadline:
            assert d.proc is not None
            if d.proc.poll() is not None:
                raise BenchError(f"{d.name} exited on restart: {d.log.read_text()[-2000:]}")
            # ctr's dial blocks and backs off on a refused connection: ask it only once the socket listens
            if system.listening(d.address):
                r = subprocess.run(argv, capture_output=True, text=True)
                if r.returncode == 0:
                    status = {p[0]: p[2] for p in (line.split() for line in r.stdout.splitlines()[1:]) if len(p) >= 3}
                    if all(status.get(cid) == "RUNNING" for cid in ids):
                        return 1000 * (time.perf_counter() - t0)
            time.sleep(0.02)
        raise BenchError(f"{d.name}: tasks not all RUNNING 60 s after restart")

    # --- running it all ---

    def run(self) -> None:
        for d in (self.containerd, self.ketchd):
            d.start()
        self.run_rm()
        self.first_run()
        self.concurrent()
        self.exec()
        self.event_exit()
        self.stdout()
        self.idle()
        self.many()

    def close(self) -> list[str]:
        left = []
        for d in (self.containerd, self.ketchd):
            for ns in self.namespaces[d.name]:
                try:
                    d.clean_namespace(ns)
                except Exception as e:  # keep cleaning
                    left.append(f"{d.name} {ns}: {e}")
            d.kill(signal.SIGTERM)
            # a shared ketch shim with no task left lingers a while (KETCH_SHIM_LINGER, 10 s) for
            # its group's next task; one that outlived a kill -9 of ketchd is not told to go
            # when ketchd stops: it goes by itself. Wait for that; only what stays is left behind.
            lingering = set().union(*(system.shim_pids(ns) for ns in self.namespaces[d.name]))
            if lingering:
                log(f"waiting for {len(lingering)} idle shim(s) of {d.name} to exit")
                deadline = time.monotonic() + LINGER_WAIT
                while lingering and time.monotonic() < deadline:
                    time.sleep(0.2)
                    lingering = {p for p in lingering if alive(p)}
            d.end_template()  # ketchd's outlives it by design
            found = leftovers.check(d.scope(self.namespaces[d.name]))
            if found:
                left.append(f"{d.name}: {found} (logs in {d.base})")
            else:
                shutil.rmtree(d.base, ignore_errors=True)
        system.unmount_under(str(self.fs_dir))
        shutil.rmtree(self.fs_dir, ignore_errors=True)
        return left


# --- statistics and reporting ----------------------------------------------------------------------

def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(results: Results, setups: list[str]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for w in WORKLOADS:
        per: dict[str, dict[str, object]] = {}
        for name in setups:
            values = results.samples.get(w.key, {}).get(name, [])
            entry: dict[str, object] = {"n": len(values), "samples": [round(v, 3) for v in values],
                                        "errors": results.errors.get(w.key, {}).get(name, [])}
            if values:
                entry["median"] = statistics.median(values)
                # p95: the 95th-percentile worst sample (for rates: the 5th-percentile rate)
                entry["p95"] = nearest_rank(values, 0.95 if w.better == "lower" else 0.05)
            per[name] = entry
        ref = per.get(REFERENCE, {}).get("median")
        for entry in per.values():
            if ref and entry.get("median") is not None:
                entry["ratio"] = entry["median"] / ref  # type: ignore[operator]
        out[w.key] = {"label": w.label, "unit": w.unit, "better": w.better,
                      "params": results.params.get(w.key, {}), "setups": per}
    return out


def fmt(v: object) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def table(summary: dict[str, dict[str, object]], setups: list[str]) -> str:
    rows = [("workload", "unit", "setup", "n", "median", "p95", f"ratio/{REFERENCE}")]
    for key, w in summary.items():
        params = w["params"]
        label = str(w["label"])
        if isinstance(params, dict) and "containers" in params:
            label = f"{label} x{params['containers']}"
        if key == "stdout" and isinstance(params, dict):
            label = f"{label} ({int(params['bytes']) // MiB} MiB)"  # type: ignore[call-overload]
        unit = f"{w['unit']} ({'lower' if w['better'] == 'lower' else 'higher'} better)"
        for j, name in enumerate(setups):
            e = w["setups"][name]  # type: ignore[index]
            errs = len(e["errors"])
            ratio = e.get("ratio")
            rows.append((label if j == 0 else "", unit if j == 0 else "", name, str(e["n"]) + (f" ({errs} err)" if errs else ""),
                         fmt(e.get("median")), fmt(e.get("p95")), f"{ratio:.2f}" if isinstance(ratio, float) else "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for r in rows:
        lines.append("  ".join(c.ljust(widths[i]) if i < 3 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def versions() -> dict[str, str]:
    def out(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return ""
    root = Path(__file__).resolve().parent.parent
    return {"containerd": out("containerd", "--version"), "ctr": out("ctr", "--version"), "runc": out("runc", "--version"),
            "python": sys.version.split()[0], "kernel": platform.release(), "cpus": str(os.cpu_count()),
            "ketch_commit": out("git", "-C", str(root), "rev-parse", "--short", "HEAD")}


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(v) for v in f.read().split()[:3]]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: N=2, small sizes, 5 and 10 idle containers (20 and 200 in the full run)")
    p.add_argument("--n", type=int, help="samples per latency workload (run --rm, exec, events); caps the rounds of the others")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"where the JSON goes (default {RESULTS})")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 1:
        p.error("--n must be at least 1")
    reason = system.need_root() or (None if shutil.which("containerd") and shutil.which("ctr") else "needs containerd and ctr")
    if reason:
        print(f"bench: {reason}", file=sys.stderr)
        return 2
    cfg = Config.make(args.quick, args.n)
    # SIGTERM (e.g. a test's timeout) unwinds like Ctrl-C, so that the cleanup below runs
    signal.signal(signal.SIGTERM, _interrupt)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = loadavg()
    t0 = time.monotonic()
    bench = Bench(cfg)
    left: list[str] = []
    failure = ""
    try:
        bench.run()
    except Exception:  # report what was measured, then fail
        failure = traceback.format_exc()
        print(failure, file=sys.stderr)
    finally:
        left = bench.close()
        if left:
            print(f"bench: left behind: {left}", file=sys.stderr)
    duration = time.monotonic() - t0
    load_end = loadavg()
    summary = summarize(bench.results, SETUP_NAMES)
    print(table(summary, list(SETUP_NAMES)))
    print(f"\n{'quick' if cfg.quick else 'full'} run in {duration:.0f} s; p95 = 95th-percentile worst sample "
          f"(for rates the 5th-percentile rate); ratio = setup median / {REFERENCE} median")
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {load_end} on {os.cpu_count()} CPUs"
          + ("; the machine was busy before the run began: expect noise" if load_start[0] > (os.cpu_count() or 1) else ""))
    warmup_errors = bench.results.errors.get("_warmup", {})
    doc = {
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(duration, 1),
        "mode": "quick" if cfg.quick else "full",
        "config": {k: v for k, v in vars(cfg).items()},
        "host": versions(),
        "loadavg": {"start": load_start, "end": load_end},
        "setups": {"containerd": f"containerd + {RUNC_RUNTIME}", "ketchd": f"ketchd + {KETCH_RUNTIME}",
                   "ketchd-runc": f"ketchd + {RUNC_RUNTIME}"},
        "reference": REFERENCE,
        "workloads": summary,
        "warmup_errors": warmup_errors,
        "left_behind": left,
        "failure": failure,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"results: {path}")
    return 1 if left or failure else 0


if __name__ == "__main__":
    sys.exit(main())
