"""ketchd's configuration: defaults, overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ketch import config, errdefs


def test_defaults_are_the_printed_defaults() -> None:
    cfg = config.load()
    assert cfg.root == "/var/lib/ketch" and cfg.state == "/run/ketch"
    assert cfg.grpc.address == "/run/ketch/ketchd.sock"
    assert cfg.ttrpc_address == "/run/ketch/ketchd.sock.ttrpc"
    assert cfg.runtime.shim_call_timeout == 30.0 and cfg.log.level == "info"
    assert cfg.runtime.shim_template is True and "shim_template = true" in config.DEFAULT_TOML


def test_the_shim_template_lives_in_the_state_directory_unless_off() -> None:
    from ketch.daemon import _template_socket

    cfg = config.load()
    assert _template_socket(cfg) == "/run/ketch/shim-template.sock"  # not in s/: those are shims
    cfg.runtime.shim_template = False
    assert _template_socket(cfg) == ""
    cfg.runtime.shim_template, cfg.state = True, "/" + "x" * 100
    assert _template_socket(cfg) == ""  # too long for sun_path: none rather than a failure


def test_file_overrides(tmp_path: Path) -> None:
    f = tmp_path / "k.toml"
    f.write_text('root = "/srv/k"\n[grpc]\naddress = "/tmp/k.sock"\n[ttrpc]\naddress = "/tmp/t.sock"\n'
                 "[runtime]\nshim_call_timeout = 5\n")
    cfg = config.load(str(f))
    assert cfg.root == "/srv/k" and cfg.state == "/run/ketch"
    assert cfg.grpc.address == "/tmp/k.sock" and cfg.ttrpc_address == "/tmp/t.sock"
    assert cfg.runtime.shim_call_timeout == 5.0


@pytest.mark.parametrize(("text", "words"), [
    ("nope = 1\n", "unknown key nope"),
    ("[grpc]\nuid = 'root'\n", "grpc.uid must be int"),
    ("grpc = 3\n", "grpc must be a table"),
    ("[log]\nlevel = 'loud'\n", "log.level"),
    ("root = [\n", "config file"),
])
def test_bad_files_are_invalid_arguments(tmp_path: Path, text: str, words: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(errdefs.InvalidArgument, match=words):
        config.load(str(f))


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(errdefs.NotFound):
        config.load(str(tmp_path / "absent.toml"))


def test_runtime_aliases(tmp_path: Path) -> None:
    f = tmp_path / "k.toml"
    f.write_text('[runtime.aliases]\n"io.containerd.runc.v2" = "io.containerd.ketch.v2"\n')
    assert config.load(str(f)).runtime.aliases == {"io.containerd.runc.v2": "io.containerd.ketch.v2"}
    f.write_text('[runtime]\naliases = { x = 1 }\n')
    with pytest.raises(errdefs.InvalidArgument, match="table of strings"):
        config.load(str(f))


def test_metrics_are_off_by_default_and_served_on_host_port(tmp_path: Path) -> None:
    assert config.load().metrics.address == "" and '[metrics]\n' in config.DEFAULT_TOML
    f = tmp_path / "k.toml"
    for address, host, port in (("127.0.0.1:1338", "127.0.0.1", 1338), ("[::1]:9100", "::1", 9100),
                                (":1338", "", 1338), ("localhost:80", "localhost", 80)):
        f.write_text(f'[metrics]\naddress = "{address}"\n')
        assert config.load(str(f)).metrics.address == address
        assert config.host_port(address, "metrics.address") == (host, port)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "127.0.0.1:", "127.0.0.1:0", "host:65536", "host:http",
                                     "[::1]", "::1:1338"])
def test_a_metrics_address_without_a_port_is_refused(tmp_path: Path, address: str) -> None:
    f = tmp_path / "k.toml"
    f.write_text(f'[metrics]\naddress = "{address}"\n')
    with pytest.raises(errdefs.InvalidArgument, match=r"metrics.address .* must be host:port"):
        config.load(str(f))
