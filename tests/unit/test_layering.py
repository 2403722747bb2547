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


# (where, forbidden modules and their submodules, allowed exceptions)
RULES = [
    ("shim", ("ketch.services", "ketch.daemon", "grpc"), ()),
    ("ttrpc", ("ketch",), ("ketch.errdefs", "ketch.ttrpc")),
    ("oci", ("ketch.services", "ketch.daemon", "ketch.shim", "grpc"), ()),
    ("cgroups", ("ketch.services", "ketch.daemon", "ketch.shim", "grpc"), ()),
    ("runtime", ("ketch.services", "ketch.daemon", "ketch.shim", "grpc"), ()),
    ("metadata", ("ketch.services", "ketch.daemon", "grpc"), ()),
    ("events", ("ketch.services", "ketch.daemon", "grpc"), ()),
    ("filters.py", ("ketch.services", "ketch.daemon", "grpc"), ()),
    ("identifiers.py", ("ketch",), ("ketch.errdefs",)),
    ("content", ("ketch.services", "ketch.daemon", "grpc"), ()),
    ("images", ("ketch.services", "ketch.daemon", "grpc"), ()),
    ("snapshots", ("ketch.services", "ketch.daemon", "grpc"), ()),
    ("diff", ("ketch.services", "ketch.daemon", "grpc"), ()),
    ("gc.py", ("ketch.services", "ketch.daemon", "grpc"), ()),
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


def test_shim_start_path_imports_nothing_heavy() -> None:
    """containerd execs the shim for every task: its start path must stay light."""
    code = "import sys, ketch.shim.main; print('\\n'.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    heavy = {m for m in loaded if m.split(".")[0] in ("asyncio", "grpc", "google", "json", "logging", "subprocess")}
    assert not heavy, f"the shim's start path imports {sorted(heavy)}"
