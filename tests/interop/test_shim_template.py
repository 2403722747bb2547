"""ketchd's shim template: the first task of a new namespace gets a shim forked from it; without
it (killed) the shim is spawned as before and ketchd starts a template anew; it outlives ketchd,
is reused, and is a leftover until it is ended."""

from __future__ import annotations

import os
import re
import signal
import time

from ketch import logfields
from ketch.testing import leftovers
from ketch.testing import system as support
from tests.interop.conftest import Env
from tests.interop.test_ctr_shim import PATH


def _template(env: Env, other_than: int = 0) -> int:
    """The pid of ketchd's template, once ketchd says it serves (the latest it said)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        said = [int(pid) for pid in re.findall(r"shim template pid (\d+)", env.cd.log.read_text())]
        if said and said[-1] != other_than:
            pids = support.shim_templates(str(env.cd.base))
            assert pids == [said[-1]], (pids, said)
            return pids[0]
        time.sleep(0.05)
    raise AssertionError(f"no shim template: {env.cd.log.read_text()[-2000:]}")


def _serving_line(env: Env, ns: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in env.cd.log.read_text().splitlines():
            if logfields.parse(line).get("namespace") == ns and "shim serving on" in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no 'shim serving' line for {ns}")


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(") ", 1)[1].split()


def _alive(pid: int) -> bool:
    """Neither gone nor a zombie (init reaps orphans when it gets to it)."""
    try:
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


def test_a_new_namespace_gets_a_shim_forked_by_the_template(kenv: Env) -> None:
    template = _template(kenv)
    ns = kenv.ns()
    r = kenv.ctr(ns, "run", "--rm", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--rootfs", kenv.rootfs,
                 "once", "echo", "hello")
    assert r.stdout == "hello\n"
    assert f"(forked from template {template})" in _serving_line(kenv, ns)
    assert "executing" not in kenv.cd.log.read_text()  # the template ran start: no exec, no fallback

    other = kenv.ns()
    kenv.ctr(other, "run", "-d", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--rootfs", kenv.rootfs,
             "sleeper", "sleep", "1000")
    shim = support.shim_pid(other, "sleeper")  # found by its command line, as an exec'd one is
    ppid, _pgrp, sid = (int(x) for x in _stat(shim)[1:4])
    # its own session, led by the group's keeper (its parent) or itself; none of them is a
    # child of the template
    assert sid in (shim, ppid) and template not in (ppid, sid, int(_stat(sid)[1]))
    with open(f"/proc/{shim}/environ", "rb") as f:
        assert b"KETCH_SHIM_LINGER=" in f.read()  # the environment of the request, as exec shows it
    assert sorted(int(fd) for fd in os.listdir(f"/proc/{shim}/fd"))[:4] == [0, 1, 2, 3]
    assert os.readlink(f"/proc/{shim}/fd/0") == "/dev/null"
    assert f"(forked from template {template})" in _serving_line(kenv, other)
    kenv.ctr(other, "tasks", "kill", "-s", "SIGKILL", "sleeper")


def test_a_dead_template_costs_only_speed(kenv: Env) -> None:
    template = _template(kenv)
    os.kill(template, signal.SIGKILL)
    support.kill_pids([template])  # waits for it to be gone
    ns = kenv.ns()
    r = kenv.ctr(ns, "run", "--rm", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--rootfs", kenv.rootfs,
                 "fallback", "echo", "still")
    assert r.stdout == "still\n"
    line = _serving_line(kenv, ns)
    assert "forked from template" not in line, line
    assert "executing" in kenv.cd.log.read_text()  # ketchd said why it fell back
    # and started a template anew, which the next new group gets
    successor = _template(kenv, other_than=template)
    ns = kenv.ns()
    kenv.ctr(ns, "run", "--rm", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--rootfs", kenv.rootfs, "next", "true")
    assert f"(forked from template {successor})" in _serving_line(kenv, ns)


def test_the_template_outlives_ketchd_is_reused_and_is_a_leftover_until_ended(kenv: Env) -> None:
    template = _template(kenv)
    kenv.cd.kill(signal.SIGKILL)
    assert _alive(template)
    kenv.cd.log.write_text("")  # only the restarted ketchd's lines from here
    kenv.cd.start()
    assert _template(kenv) == template  # the one already serving, not a second one
    ns = kenv.ns()
    kenv.ctr(ns, "run", "--rm", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--rootfs", kenv.rootfs,
             "again", "true")
    assert f"(forked from template {template})" in _serving_line(kenv, ns)

    kenv.cd.kill(signal.SIGTERM)
    assert _alive(template)  # it outlives ketchd, as shims do
    deadline = time.monotonic() + 15  # the idle shim of ns lingers 10 s
    while time.monotonic() < deadline and support.shim_pids(ns):
        time.sleep(0.1)
    scope = kenv.cd.scope(kenv.namespaces)
    assert list(leftovers.processes(scope)) == [template]  # what the leak check would find
    kenv.cd.end_template()
    assert not _alive(template)
    assert leftovers.check(scope) == []
