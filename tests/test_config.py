"""Config: one small test per rule; every error is one line starting with the dotted key."""

from __future__ import annotations

import os
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest

import mxsend.config as config_module
from mxsend.config import (
    Config,
    config_from_mapping,
    config_path,
    load_config,
)
from mxsend.config_values import parse_duration, parse_size
from mxsend.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def refused(doc: dict[str, Any], key: str) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(doc, base=Path("/etc/mxsend"))
    message = str(info.value)
    assert message.startswith(f"{key}:"), message
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(30, 30.0), (1.5, 1.5), ("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0),
     ("5d", 432000.0), ("1.5h", 5400.0), (" 10 S ", 10.0), (0, 0.0)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value, "k") == seconds


@pytest.mark.parametrize("value", ["5w", "m", "", "-1s", -1, True, "1e3", float("inf"),
                                   float("nan"), [1], "5 minutes"])
def test_bad_durations_name_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^queue\.max_age: "):
        parse_duration(value, "queue.max_age")


@pytest.mark.parametrize(
    ("value", "size"),
    [(1024, 1024), ("1024", 1024), ("64KB", 65536), ("50MB", 50 * 1024**2),
     ("1GB", 1024**3), ("50mb", 50 * 1024**2), ("50M", 50 * 1024**2), ("10 B", 10)],
)
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value, "k") == size


@pytest.mark.parametrize("value", ["5TB", "1.5MB", "MB", "", -1, 1.5, True, "ten"])
def test_bad_sizes_name_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^spool\.max_message_size: "):
        parse_size(value, "spool.max_message_size")


def test_defaults_match_the_contract() -> None:
    c = Config()
    assert c.spool.max_message_size == 50 * 1024**2 and c.spool.keep_sent is False
    assert c.script.timeout == 1.0 and c.script.memory == 64 * 1024**2
    assert c.dns.nameservers == () and c.dns.timeout == 5.0 and c.dns.ipv6 is True
    assert c.smtp.port == 25 and c.smtp.max_connections == 100
    assert c.smtp.max_connections_per_domain == 10 and c.smtp.ca_file is None
    assert c.queue.retry == (300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)
    assert c.queue.scan_interval == 30.0 and c.queue.max_age == 5 * 86400.0
    assert c.queue.delay_warning == 4 * 3600.0 and c.queue.shutdown_grace == 30.0
    assert c.log.format == "text" and c.log.level == "info"
    assert config_from_mapping({}) == c


def test_values_are_read() -> None:
    c = config_from_mapping({
        "spool": {"max_message_size": "1MB", "keep_sent": True},
        "dns": {"nameservers": ["127.0.0.1:5353", "[::1]:53", "::1"], "ipv6": False},
        "smtp": {"port": 2525, "helo_name": "mx.test", "source_address": "127.0.0.2"},
        "queue": {"retry": ["1m", 120], "max_age": "1d"},
        "log": {"format": "JSON", "level": "debug"},
    })
    assert c.spool.max_message_size == 1024**2 and c.spool.keep_sent
    assert c.dns.nameservers == ("127.0.0.1:5353", "[::1]:53", "::1")
    assert c.smtp.port == 2525 and c.smtp.source_address == "127.0.0.2"
    assert c.queue.retry == (60.0, 120.0) and c.queue.max_age == 86400.0
    assert c.log.format == "json"


def test_config_is_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        Config().spool.keep_sent = True  # type: ignore[misc]


def test_unknown_key_names_the_dotted_key() -> None:
    assert "unknown key" in refused({"smtp": {"prot": 25}}, "smtp.prot")


def test_unknown_section() -> None:
    refused({"smpt": {}}, "smpt")


def test_section_must_be_a_table() -> None:
    refused({"spool": "x"}, "spool")


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"smtp": {"port": "25"}}, "smtp.port"),
        ({"smtp": {"port": 0}}, "smtp.port"),
        ({"queue": {"processes": 0}}, "queue.processes"),
        ({"queue": {"processes": "2"}}, "queue.processes"),
        ({"smtp": {"port": 70000}}, "smtp.port"),
        ({"smtp": {"port": True}}, "smtp.port"),
        ({"smtp": {"max_connections": 0}}, "smtp.max_connections"),
        ({"smtp": {"helo_name": 5}}, "smtp.helo_name"),
        ({"smtp": {"helo_name": "a\r\nMAIL FROM:<x>"}}, "smtp.helo_name"),
        ({"smtp": {"source_address": "eth0"}}, "smtp.source_address"),
        ({"spool": {"keep_sent": "yes"}}, "spool.keep_sent"),
        ({"spool": {"path": ""}}, "spool.path"),
        ({"spool": {"path": 5}}, "spool.path"),
        ({"spool": {"path": "~no-such-user-here/spool"}}, "spool.path"),
        ({"spool": {"max_message_size": 0}}, "spool.max_message_size"),
        ({"script": {"timeout": 0}}, "script.timeout"),
        ({"script": {"memory": "0MB"}}, "script.memory"),
        ({"dns": {"nameservers": "127.0.0.1"}}, "dns.nameservers"),
        ({"dns": {"nameservers": ["dns.example"]}}, "dns.nameservers"),
        ({"dns": {"nameservers": ["127.0.0.1:0"]}}, "dns.nameservers"),
        ({"dns": {"nameservers": ["127.0.0.1:٣"]}}, "dns.nameservers"),
        ({"dns": {"nameservers": ["[::1"]}}, "dns.nameservers"),
        ({"dns": {"ipv6": 1}}, "dns.ipv6"),
        ({"queue": {"retry": []}}, "queue.retry"),
        ({"queue": {"retry": "5m"}}, "queue.retry"),
        ({"queue": {"retry": ["5m", "0s"]}}, "queue.retry"),
        ({"queue": {"scan_interval": "0s"}}, "queue.scan_interval"),
        ({"queue": {"max_age": float("inf")}}, "queue.max_age"),
        ({"log": {"format": "xml"}}, "log.format"),
        ({"log": {"level": "loud"}}, "log.level"),
    ],
)
def test_wrong_types_and_values_name_the_key(doc: dict[str, Any], key: str) -> None:
    refused(doc, key)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "mxsend.toml"
    path.write_text('[spool]\npath = "../spool"\n[script]\npath = "mxout.lua"\n'
                    '[smtp]\nca_file = ""\n[batv]\nkey_file = "/abs/key"\n')
    c = load_config(path)
    assert c.spool.path == tmp_path / "spool"
    assert c.script.path == tmp_path / "etc" / "mxout.lua"
    assert c.smtp.ca_file is None
    assert c.batv.key_file == Path("/abs/key")
    assert c.source == path


def test_the_shipped_config_loads() -> None:
    c = load_config(REPO / "config" / "mxsend.toml")
    assert c.spool.path == REPO / "spool"


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"[spool\n", "config: "), (b'[spool]\npath = "\xff"\n', "not valid UTF-8")],
)
def test_unreadable_files(tmp_path: Path, content: bytes, says: str) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=says):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


def test_no_file_means_defaults() -> None:
    assert load_config(None) == Config()


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc.toml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", etc)
    env = {"MXSEND_CONFIG": "/from/env.toml"}
    assert config_path("/explicit.toml", env) == Path("/explicit.toml")
    assert config_path(None, env) == Path("/from/env.toml")
    assert config_path(None, {}) is None  # /etc file absent: built-in defaults
    etc.write_text("")
    assert config_path(None, {}) == etc
    assert config_path(None, {"MXSEND_CONFIG": ""}) == etc


def test_processes_share_out_the_connection_limits() -> None:
    from mxsend.supervisor import share_of

    config = config_from_mapping({"queue": {"processes": 3},
                                  "smtp": {"max_connections": 100,
                                           "max_connections_per_domain": 10}})
    assert config.queue.processes == 3
    shares = [share_of(config, f"{i}/3").smtp for i in range(3)]
    # Exactly the configured limits between them, never more.
    assert [s.max_connections for s in shares] == [34, 33, 33]
    assert [s.max_connections_per_domain for s in shares] == [4, 3, 3]
    assert share_of(config, "0/1").smtp == config.smtp


def test_a_limit_smaller_than_the_processes_still_gives_each_one() -> None:
    from mxsend.supervisor import share

    assert [share(2, i, 4) for i in range(4)] == [1, 1, 1, 1]
    assert sum(share(10, i, 4) for i in range(4)) == 10


def test_processes_default_to_auto() -> None:
    assert config_from_mapping({}).queue.processes == config_module.auto_processes()


def test_supervisor_gives_its_daemons_its_own_config_source(tmp_path: Path) -> None:
    from mxsend.supervisor import Supervisor

    built_in = Supervisor(config_from_mapping({"queue": {"processes": 2}}), once=True)
    assert "-c" not in built_in._command() and built_in._command()[-2:] == ["run", "--once"]
    path = tmp_path / "mxsend.toml"
    path.write_text("[queue]\nprocesses = 2\n")
    from_file = Supervisor(load_config(path), once=False)
    assert from_file._command()[-3:] == ["-c", str(path.resolve()), "run"]


def test_processes_auto_is_the_usable_cores_within_bounds(monkeypatch) -> None:
    assert 1 <= config_module.usable_cpus() <= (os.cpu_count() or 1)
    for cores, expected in ((1, 1), (2, 2), (64, config_module.AUTO_PROCESSES_MAX)):
        monkeypatch.setattr(config_module, "usable_cpus", lambda cores=cores: cores)
        config = config_from_mapping({"queue": {"processes": "auto"}})
        assert config.queue.processes == expected
    with pytest.raises(ConfigError, match=r"queue\.processes"):
        config_from_mapping({"queue": {"processes": "many"}})


def test_child_position_reads_i_of_n() -> None:
    from mxsend.supervisor import child_position

    assert child_position("1/3") == (1, 3)
    for malformed in ("", "3/3", "-1/2", "a/b", "2"):
        assert child_position(malformed) == (0, 1)
