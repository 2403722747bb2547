"""Import directions the architecture forbids, and the light shim start path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "ketch"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[: -node.level])
            base = f"{package}.{node.module}" if node.module else package
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _modules(subdir: str) -> list[Path]:
    root = SRC / subdir
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.py") if not p.name.endswith("_pb2.py"))


CORE_FORBIDS = ("ketch.services", "ketch.cri", "ketch.daemon", "ketch.client", "ketch.cli", "grpc")

# (where, forbidden modules and their submodules, allowed exceptions); ARCHITECTURE.md, "Layers"
RULES = [
    # leaves
    ("errdefs.py", ("ketch",), ()),
    ("identifiers.py", ("ketch",), ("ketch.errdefs",)),
    ("digests.py", ("ketch",), ("ketch.errdefs", "ketch.identifiers")),
    ("topics.py", ("ketch",), ()),
    ("timestamps.py", ("ketch",), ()),
    ("files.py", ("ketch",), ("ketch.errdefs",)),
    ("slowloop.py", ("ketch",), ()),
    # the notify protocol and socket activation, without libsystemd
    ("systemd.py", ("ketch",), ()),
    ("filters.py", ("ketch",), ("ketch.errdefs",)),
    # the shim template's framing: spoken by the shim's start path and by the daemon's runtime
    ("templatewire.py", ("ketch",), ()),
    # SPDY/3.1, as ttrpc: a sans-IO core (frames, connection) and an asyncio adapter, nothing of ketch
    ("spdy", ("ketch",), ("ketch.spdy",)),
    ("spdy/_frames.py", ("ketch.spdy._connection", "ketch.spdy._asyncio", "asyncio"), ()),
    ("spdy/_connection.py", ("ketch.spdy._asyncio", "asyncio"), ()),
    # the protocol core: nothing of ketch but errdefs and its own wire messages
    ("ttrpc", ("ketch",), ("ketch.errdefs", "ketch.ttrpc")),
    # the shim speaks ttrpc and outlives the daemon: no daemon core, no gRPC
    ("shim", ("ketch.runtime", "ketch.metadata", "ketch.content", "ketch.images", "ketch.snapshots",
              "ketch.events", "ketch.gc", *CORE_FORBIDS), ()),
    # the core beneath the ttrpc face knows neither ttrpc nor the Task requests
    ("shim/core.py", ("ketch.ttrpc", "ketch.api.containerd.task", "ketch.shim.service"), ()),
    # main is the entry point: nothing of the shim imports it back
    *((f"shim/{p.name}", ("ketch.shim.main",), ()) for p in sorted((SRC / "shim").glob("*.py"))
      if p.name not in ("main.py", "__main__.py")),
    ("oci", ("ketch.shim", "ketch.runtime", *CORE_FORBIDS), ()),
    ("cgroups", ("ketch.shim", "ketch.runtime", *CORE_FORBIDS), ()),
    # the daemon's core, one package per noun
    ("runtime", ("ketch.shim", *CORE_FORBIDS), ()),
    ("metadata", CORE_FORBIDS, ()),
    ("events", CORE_FORBIDS, ()),
    # a writer gets what it needs of its store handed over (content._writer.Owner)
    ("content/_writer.py", ("ketch.content._store",), ()),
    ("content/_reader.py", ("ketch.content._store", "ketch.content._writer"), ()),
    ("content", CORE_FORBIDS, ()),
    ("images", CORE_FORBIDS, ()),
    ("snapshots", CORE_FORBIDS, ()),
    ("diff", CORE_FORBIDS, ()),
    ("gc.py", CORE_FORBIDS, ()),
    # the client speaks gRPC to any containerd 1.6+: leaves, the API's messages and the OCI
    # spec defaults, nothing of the daemon or the shim
    ("client", ("ketch",), ("ketch.errdefs", "ketch.identifiers", "ketch.filters", "ketch.timestamps", "ketch.digests",
                            "ketch.config", "ketch.topics", "ketch.api", "ketch.oci.spec", "ketch.distribution",
                            "ketch.client")),
    ("oci/spec.py", ("ketch",), ()),
    ("oci/seccomp.py", ("ketch",), ("ketch.errdefs",)),
    # images as registries and archives hold them: shared by the daemon's pulls and the client's
    ("distribution", ("ketch",), ("ketch.errdefs", "ketch.digests", "ketch.identifiers", "ketch.distribution")),
    # the command line is a face of the client
    ("cli", ("ketch",), ("ketch.__version__", "ketch.errdefs", "ketch.identifiers", "ketch.filters", "ketch.timestamps",
                         "ketch.client", "ketch.cli")),
    # faces: decode, call the core, encode; shim requests are the runtime's to build
    ("cri", ("ketch.shim", "ketch.api.containerd.task", "ketch.runtime.shim", "ketch.daemon", "ketch.client",
             "ketch.cli"), ()),
    ("services", ("ketch.api.containerd.task", "ketch.shim", "ketch.runtime.shim", "ketch.runtime.manager",
                  "ketch.daemon"), ()),
    # ketchd's metrics read the core's counters and wrap the gRPC server; nothing imports them back
    ("metrics.py", ("ketch.shim", "ketch.api.containerd.task", "ketch.runtime.shim", "ketch.services", "ketch.cri",
                    "ketch.daemon", "ketch.client", "ketch.cli"), ()),
]


def _violates(name: str, forbidden: tuple[str, ...], allowed: tuple[str, ...]) -> bool:
    if name == "ketch" or (allowed and name.startswith(allowed)):
        return False
    return any(name == f or name.startswith(f + ".") for f in forbidden)


@pytest.mark.parametrize(("subdir", "forbidden", "allowed"), RULES)
def test_import_directions(subdir: str, forbidden: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    bad = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in _modules(subdir)
        for name in sorted(_imports(path))
        if _violates(name, forbidden, allowed)
    ]
    assert not bad, "\n".join(bad)


def test_only_ketchd_metrics_import_prometheus_client() -> None:
    """It costs ketchd ~50 ms to import: only ketch.metrics has it, which the daemon imports
    only when ``[metrics] address`` is set."""
    users = [str(p.relative_to(SRC)) for p in _modules(".") if any(
        n.split(".")[0] == "prometheus_client" for n in _imports(p))]
    assert users == ["metrics.py"]
    daemon = ast.parse((SRC / "daemon.py").read_text())
    top_level = {a.name for node in daemon.body if isinstance(node, (ast.Import, ast.ImportFrom))
                 for a in node.names} | {node.module for node in daemon.body if isinstance(node, ast.ImportFrom)}
    assert not top_level & {"ketch.metrics", "metrics"}


def test_shim_start_path_imports_nothing_heavy() -> None:
    """containerd execs the shim for every task: its start path must stay light."""
    code = "import sys, ketch.shim.main; print('\\n'.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    heavy = {m for m in loaded if m.split(".")[0] in ("asyncio", "grpc", "google", "json", "logging", "subprocess")}
    assert not heavy, f"the shim's start path imports {sorted(heavy)}"


def test_services_call_no_shim_method_by_name() -> None:
    """A servicer calls the runtime's typed Task methods, never ``something.call("Method", …)``."""
    bad = []
    for path in _modules("services"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                bad.append(f"{path.relative_to(SRC)}:{node.lineno} calls {node.args[0].value!r} by name")
    assert not bad, "\n".join(bad)
