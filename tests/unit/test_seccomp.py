"""ketch's default seccomp profile and profiles read from files (pure data; runc applies them,
which tests/interop/test_cri.py proves through critest's seccomp specs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ketch import errdefs
from ketch.oci.seccomp import default_profile, load_profile
from ketch.oci.spec import default_spec


def _denied(profile: dict[str, object]) -> set[str]:
    rules = profile["syscalls"]
    assert isinstance(rules, list)
    return {name for rule in rules if rule["action"] == "SCMP_ACT_ERRNO" for name in rule["names"]}


def test_the_default_profile_refuses_what_the_capabilities_do_not_entitle() -> None:
    caps = default_spec("ns", "c")["process"]["capabilities"]["bounding"]
    profile = default_profile(caps)
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = _denied(profile)
    for call in ("mount", "unshare", "setns", "init_module", "reboot", "settimeofday", "keyctl", "bpf", "acct"):
        assert call in denied, call
    for call in ("read", "write", "clone", "execve", "chmod", "sethostname", "ptrace"):
        assert call not in denied, call


def test_a_capability_lifts_what_it_entitles() -> None:
    denied = _denied(default_profile(["CAP_SYS_ADMIN", "CAP_SYS_TIME"]))
    assert "mount" not in denied and "setns" not in denied and "settimeofday" not in denied
    assert "init_module" in denied and "keyctl" in denied  # other capabilities' calls, and the always-refused


def test_a_profile_file_is_read_as_oci_json(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "comment": "x",
                                "syscalls": [{"name": "chmod", "action": "SCMP_ACT_ERRNO"}]}))
    assert load_profile(str(path)) == {"defaultAction": "SCMP_ACT_ALLOW",
                                       "syscalls": [{"names": ["chmod"], "action": "SCMP_ACT_ERRNO"}]}


@pytest.mark.parametrize(("content", "error", "match"), [
    (None, errdefs.NotFound, "does not exist"),
    ("{", errdefs.InvalidArgument, "seccomp profile"),
    ('{"syscalls": []}', errdefs.InvalidArgument, "needs a defaultAction"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["x"]}]}', errdefs.InvalidArgument, "an action"),
])
def test_bad_profiles_say_what_is_wrong(tmp_path: Path, content: str | None, error: type[Exception], match: str) -> None:
    path = tmp_path / "p.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=match):
        load_profile(str(path))
