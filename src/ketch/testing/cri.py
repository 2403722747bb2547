"""ketchd as a Kubernetes runtime for tests: its CRI configured with a private CNI network, and
the local registry, critest and crictl of ``../shared/cri-validation`` (see its README).

:func:`validation` runs that directory's ``setup.sh`` once (it starts a registry and a CONNECT
proxy unless they run already) and says what it started, so that the caller stops only that.
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from ketch.testing.daemons import Ketchd

#: the cri-validation kit, beside the repository (override: KETCH_CRI_VALIDATION)
KIT = Path(os.environ.get("KETCH_CRI_VALIDATION") or Path(__file__).resolve().parents[3] / ".." / "shared" / "cri-validation")
HOME = Path(os.environ.get("CRIV_HOME", "/var/lib/cri-validation"))


@dataclass
class Validation:
    """The kit, set up: its binaries, the environment a pulling daemon needs, and the pids of
    the registry and proxy if this process started them."""

    home: Path
    env: dict[str, str]
    started: list[int] = field(default_factory=list)

    @property
    def crictl(self) -> str:
        return str(self.home / "bin" / "crictl")

    @property
    def critest(self) -> str:
        return str(self.home / "bin" / "critest")

    @property
    def passlist(self) -> list[str]:
        return [line for line in (KIT / "critest-passlist.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]


def _pids(home: Path) -> dict[str, int]:
    try:
        text = (home / "pids").read_text()
    except FileNotFoundError:
        return {}
    return {k: int(v) for k, _, v in (line.partition("=") for line in text.split()) if v.isdigit()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def validation() -> Validation:
    """Set the kit up (idempotent); the registry and proxy this call started, if any."""
    before = {p for p in _pids(HOME).values() if _alive(p)}
    r = subprocess.run([str(KIT / "setup.sh")], capture_output=True, text=True, env=dict(os.environ, CRIV_HOME=str(HOME)))
    if r.returncode != 0:
        raise RuntimeError(f"cri-validation setup failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    env = {}
    for line in (HOME / "criv.env").read_text().splitlines():
        if line.startswith("export "):
            for assignment in line[len("export "):].split():
                key, _, value = assignment.partition("=")
                env[key] = value
    started = [p for p in _pids(HOME).values() if _alive(p) and p not in before]
    return Validation(HOME, env, started)


class CriKetchd(Ketchd):
    """ketchd with its CRI on: the local registry's environment, a private CNI configuration
    (the kit's bridge network with its own IPAM directory and a default route), and
    ``restrict_oom_score_adj`` (root here lacks CAP_SYS_RESOURCE); ``sandbox_image`` if not the
    default (the kit's pause)."""

    def __init__(self, base: Path, kit: Validation, sandbox_image: str = "") -> None:
        super().__init__(base)
        self.env.update(kit.env)
        self.cni_conf = base / "cni" / "net.d"
        self.cni_conf.mkdir(parents=True, exist_ok=True)
        network = json.loads((KIT / "cni-bridge.conflist").read_text())
        for plugin in network["plugins"]:
            if "ipam" in plugin:
                plugin["ipam"]["dataDir"] = str(base / "cni" / "ipam")
                # a default route through the bridge, as a node's pod network has: without it a
                # pod cannot answer a host port's clients (their source is the host's address)
                plugin["ipam"].setdefault("routes", [{"dst": "0.0.0.0/0"}])
        (self.cni_conf / "10-bridge.conflist").write_text(json.dumps(network, indent=1))
        self.config = base / "ketchd.toml"
        self.config.write_text(f"""[cri]
cni_conf_dir = "{self.cni_conf}"
restrict_oom_score_adj = true
""" + (f'sandbox_image = "{sandbox_image}"\n' if sandbox_image else ""))

    def argv(self) -> list[str]:
        return [*super().argv(), "--config", str(self.config)]

    def crictl(self, kit: Validation, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([kit.crictl, "--runtime-endpoint", f"unix://{self.address}",
                            "--image-endpoint", f"unix://{self.address}", "--timeout", "60s", *args],
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"crictl {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r


def critest(kit: Validation, address: str, focus: str, workdir: Path, timeout: float = 600,
            skip: str = "") -> dict[str, str]:
    """Run critest's specs matching ``focus`` (all: "") but not ``skip`` against ``address``
    (networking specs, which need more than the kit's bridge, are always skipped, as the kit's
    run-critest.sh does); each spec's status by name."""
    report = workdir / "critest.junit.xml"
    log = workdir / "critest.log"
    with open(log, "w") as out:
        subprocess.run([kit.critest, "-runtime-endpoint", f"unix://{address}", "-image-endpoint", f"unix://{address}",
                        *(("-ginkgo.focus", focus) if focus else ()),
                        "-ginkgo.skip", "|".join(filter(None, ("Networking|hostnet|HostNetwork", skip))),
                        "-ginkgo.no-color", "-ginkgo.junit-report", str(report)],
                       cwd=workdir, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=dict(os.environ, **kit.env))
    root = ET.parse(report).getroot()
    return {str(tc.get("name")): str(tc.get("status")) for tc in root.iter("testcase")}
