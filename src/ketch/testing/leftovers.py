"""What a run (a test, a fixture, a benchmark) left behind, found and reported before anything
is removed.

A run owns its daemon's private directory (``base``: root, state, sockets, logs, the ketch
shim's sockets in ``base/s`` and its runc state in ``base/runc``) and the containerd namespaces
it made (unique names). What it leaves is a leak, of one of these kinds:

- processes: any whose command line or cwd is under ``base`` (daemons, shims, keepers, shim
  templates, ctr), whose command line names one of its namespaces (``-namespace NS``: shims
  and keepers wherever they live), or that sit in one of its cgroups (container processes);
- runc containers in the runc roots of its namespaces (ours under ``base/runc``, containerd's
  runc shim's under /run/containerd/runc) — in a namespace other runs share (dockerd's
  ``moby``), only those whose bundle is under ``base``;
- mounts under ``base``;
- cgroups under ``/<namespace>`` (or another cgroup parent the run owns) in every hierarchy,
  v1 and v2;
- shim sockets: the ketch shim's in ``base/s``; containerd's runc shim's in /run/containerd/s,
  named by a hash of (daemon address, namespace, task id) — the ids are those the daemon's log
  and the leftovers name;
- bundle directories left in the daemon's state directory for its namespaces.

:func:`check` waits a little for processes that are on their way out (a shim told to exit),
then records everything, then removes it, and returns the record. Two things are not leaks,
because runc and containerd leave them on every host, for every namespace: the namespace's
cgroup parent ``/<namespace>`` (runc makes ``/<namespace>/<id>`` and removes only ``<id>``)
and the runc shim's root ``/run/containerd/runc/<namespace>``. :func:`check` removes those with
rmdir, which only succeeds when they are empty: whatever is in them is reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ketch.testing import system

#: where containerd's runc shim keeps its sockets and its runc state, whoever its daemon is
RUNC_SHIM_SOCKETS = "/run/containerd/s"
RUNC_SHIM_STATE = "/run/containerd/runc"
#: how long processes on their way out get before they count as left behind
GRACE = 10.0


@dataclass(frozen=True)
class Scope:
    """What one run owns."""

    #: the daemon's private directory
    base: Path
    #: the daemon's gRPC address (what shims get as ``-address``)
    address: str
    #: the daemon's log (it names the tasks it ran)
    log: Path
    #: where the daemon keeps bundles: ``<bundles>/<namespace>/<id>``
    bundles: Path
    #: namespaces only this run uses
    namespaces: Sequence[str] = ()
    #: namespaces other runs use too (dockerd's ``moby``): only what is under ``base`` counts
    shared: Sequence[str] = ()
    #: cgroup parents only this run uses, besides its namespaces (dockerd's ``--cgroup-parent``)
    cgroup_parents: Sequence[str] = ()

    @property
    def all_namespaces(self) -> list[str]:
        return [*self.namespaces, *self.shared]


@dataclass
class Leftovers:
    #: pid → why it counts
    processes: dict[int, str] = field(default_factory=dict)
    #: (runc root, container id)
    runc: list[tuple[str, str]] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    bundles: list[str] = field(default_factory=list)
    #: runc roots of containerd's runc shim that are not empty (nor runc containers)
    runc_roots: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        out = [f"process {pid} ({why})" for pid, why in sorted(self.processes.items())]
        out += [f"runc container {id} in {root}" for root, id in self.runc]
        out += [f"mount {m}" for m in self.mounts]
        out += _cgroups_described(self.cgroups)
        out += [f"shim socket {s}" for s in self.sockets]
        out += [f"bundle {b}" for b in self.bundles]
        out += [f"runc root {r}" for r in self.runc_roots]
        return out


def _cgroups_described(dirs: list[str]) -> list[str]:
    """One line per cgroup path, naming the hierarchies it is in."""
    where: dict[str, list[str]] = {}
    for d in dirs:
        mount = max((m for m in system.cgroup_mounts() if d.startswith(m + "/")), key=len, default="")
        where.setdefault(d[len(mount):], []).append(os.path.basename(mount) or mount)
    return [f"cgroup {path} (in {', '.join(sorted(ms))})" for path, ms in sorted(where.items())]


def check(scope: Scope, grace: float = GRACE) -> list[str]:
    """Everything ``scope`` left behind (see the module doc), recorded before anything is
    removed; then all of it is removed (processes by PID). The daemon's logs stay."""
    deadline = time.monotonic() + grace
    while processes(scope) and time.monotonic() < deadline:
        time.sleep(0.1)
    for ns in scope.namespaces:
        remove_namespace_parents(ns)
    for parent in scope.cgroup_parents:
        _rmdir_cgroups(parent, only_top=True)
    found = find(scope)
    remove(scope, found)
    return found.describe()


def find(scope: Scope) -> Leftovers:
    found = Leftovers(processes=processes(scope))
    found.runc = runc_containers(scope)
    found.mounts = system.mounts_under(str(scope.base))
    for name in [*scope.namespaces, *scope.cgroup_parents]:
        for top in system.cgroup_dirs(name):
            found.cgroups += sorted((d for d, _, _ in os.walk(top)), key=len)
    found.sockets = shim_sockets(scope, found)
    for ns in scope.all_namespaces:
        d = scope.bundles / ns
        if d.is_dir():
            found.bundles += sorted(str(p) for p in d.iterdir())
    found.runc_roots = [str(p) for ns in scope.namespaces if (p := Path(RUNC_SHIM_STATE, ns)).exists()
                        and not any(str(p) == root for root, _ in found.runc)]
    return found


def remove(scope: Scope, found: Leftovers) -> None:
    for _ in range(3):  # a keeper may fork a successor while we look: look again
        pids = list(processes(scope))
        if not pids:
            break
        end_processes(pids)
    for root, id in found.runc:
        subprocess.run(["runc", "--root", root, "delete", "--force", id], capture_output=True)
    system.unmount_under(str(scope.base))
    for name in [*scope.namespaces, *scope.cgroup_parents]:
        _rmdir_cgroups(name)
    for path in found.sockets:
        with contextlib.suppress(OSError):
            os.unlink(path)
    for bundle in found.bundles:
        shutil.rmtree(bundle, ignore_errors=True)
    for ns in scope.namespaces:
        remove_namespace_parents(ns)


# -- the kinds ----------------------------------------------------------------------------------

def _serves_another_daemon(args: list[bytes], under: re.Pattern[str]) -> bool:
    """A shim whose ``-address`` is another daemon's socket (a namespace such as the CRI's
    ``k8s.io`` is every CRI daemon's: only the address tells whose shim it is)."""
    for flag, value in zip(args, args[1:]):
        if flag == b"-address":
            return not under.match(value.decode(errors="replace"))
    return False


def processes(scope: Scope) -> dict[int, str]:
    """pid → why it is the run's, for every live process of the run (not this one)."""
    base = str(scope.base)
    under = re.compile(rf"{re.escape(base)}(?:/|\s|$)")
    flags = {(b"-namespace", ns.encode()) for ns in scope.namespaces}
    parents = [f"/{p}" for p in [*scope.namespaces, *scope.cgroup_parents]]
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{pid}/cgroup") as f:
                cgroups = [line.split(":", 2)[2].strip() for line in f if line.count(":") >= 2]
            cwd = ""
            with contextlib.suppress(OSError):
                cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        cmd = b" ".join(args).decode(errors="replace").strip()
        if not cmd:
            continue  # a zombie: its parent's to reap
        why = ""
        if under.search(cmd) or under.match(cwd):
            why = f"under {base}"
        elif flags & set(zip(args, args[1:])) and not _serves_another_daemon(args, under):
            why = "serves one of its namespaces"
        elif any(c == p or c.startswith(p + "/") for c in cgroups for p in parents):
            why = f"in cgroup {next(c for c in cgroups if any(c == p or c.startswith(p + '/') for p in parents))}"
        if why:
            found[pid] = f"{cmd[:160]}; {why}"
    return found


def end_processes(pids: Iterable[int]) -> None:
    """SIGSTOP them all first (a keeper must not fork a successor for a shim it sees die),
    then SIGKILL, and wait for them to go."""
    pids = list(pids)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    system.kill_pids(pids)


def runc_roots(scope: Scope) -> list[tuple[str, bool]]:
    """(runc root, whether all of it is ours) for the run's namespaces."""
    roots: list[tuple[str, bool]] = []
    ours = scope.base / "runc"
    if ours.is_dir():
        roots += [(str(p), True) for p in sorted(ours.iterdir()) if p.is_dir()]
    roots += [(str(Path(RUNC_SHIM_STATE, ns)), ns in scope.namespaces) for ns in scope.all_namespaces
              if Path(RUNC_SHIM_STATE, ns).is_dir()]
    return roots


def runc_containers(scope: Scope) -> list[tuple[str, str]]:
    out = []
    base = str(scope.base) + "/"
    for root, all_ours in runc_roots(scope):
        r = subprocess.run(["runc", "--root", root, "list", "--format", "json"], capture_output=True, text=True)
        for c in json.loads(r.stdout or "null") or []:
            if all_ours or str(c.get("bundle", "")).startswith(base):
                out.append((root, str(c["id"])))
    return out


def runc_shim_socket(address: str, namespace: str, id: str) -> str:
    """Where containerd's runc shim (containerd 1.6) serves task ``id``: a hash of the daemon's
    address, the namespace and the id (or the task's group), under /run/containerd/s."""
    digest = hashlib.sha256(os.path.join(address, namespace, id).encode()).hexdigest()
    return os.path.join(RUNC_SHIM_SOCKETS, digest)


def task_ids(scope: Scope, found: Leftovers) -> set[tuple[str, str]]:
    """(namespace, id) of every task the daemon's log or the leftovers name."""
    ids: set[tuple[str, str]] = set()
    namespaces = scope.all_namespaces
    try:
        text = scope.log.read_text(errors="replace")
    except OSError:
        text = ""
    for ns in namespaces:
        q = re.escape(ns)
        # ketchd: "namespace=NS id=ID"; containerd (its runc shim's lines): "namespace=NS path=…/NS/ID"
        for m in re.finditer(rf"namespace={q}\s+(?:id=|path=\S*/{q}/)([\w.-]+)", text):
            ids.add((ns, m.group(1)))
    for root, id in found.runc:
        ids.add((os.path.basename(root), id))
    for pid in found.processes:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
            pairs = dict(zip(args, args[1:]))
            if pairs.get("-namespace") in namespaces and "-id" in pairs:
                ids.add((pairs["-namespace"], pairs["-id"]))
    return ids


def shim_sockets(scope: Scope, found: Leftovers) -> list[str]:
    out = []
    ours = scope.base / "s"
    if ours.is_dir():
        out += sorted(str(p) for p in ours.iterdir())
    for ns, id in sorted(task_ids(scope, found)):
        path = runc_shim_socket(scope.address, ns, id)
        if os.path.lexists(path):
            out.append(path)
    return out


# -- what runc and containerd leave by design -----------------------------------------------------

def remove_namespace_parents(namespace: str) -> None:
    """rmdir the namespace's cgroup parents and the runc shim's runc root for it: runc and
    containerd's runc shim leave them (empty) on every host; not empty, they stay, and what is
    in them is a leak."""
    _rmdir_cgroups(namespace, only_top=True)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.join(RUNC_SHIM_STATE, namespace))


def _rmdir_cgroups(name: str, only_top: bool = False) -> None:
    for top in system.cgroup_dirs(name):
        dirs = [top] if only_top else sorted((d for d, _, _ in os.walk(top)), key=len, reverse=True)
        for d in dirs:
            for _ in range(20):  # a cgroup whose last process just died may be busy a moment
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if only_top:
                        break
                    time.sleep(0.05)
