"""The systemd unit, the Dockerfile and the sd_notify protocol."""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mxsend import sdnotify

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "config" / "mxsend.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_unit_is_a_hardened_notify_service() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert "/var/spool/mxsend" in service["ReadWritePaths"].split()
    assert service["User"] == "mxsend"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (scripts/test installs it)")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this checkout's console script.
    mxsend = Path(sys.executable).parent / "mxsend"
    unit = tmp_path / "mxsend.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/mxsend", str(mxsend)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 even for ignored lines; any complaint about the unit counts.
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "mxsend.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_a_spool_volume() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "\nUSER mxsend\n" in text
    assert 'VOLUME ["/var/spool/mxsend"]' in text
    assert "HEALTHCHECK" in text
    assert 'CMD ["mxsend", "run"]' in text


def test_notify_sends_a_datagram(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert server.recv(100) == b"READY=1"


def test_notify_abstract_socket() -> None:
    name = f"mxsend-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5)
        assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert server.recv(100) == b"STOPPING=1"


def test_notify_without_a_manager_is_a_no_op(tmp_path: Path) -> None:
    assert not sdnotify.notify("READY=1", {})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "relative/path"})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert sdnotify.watchdog_interval(environ) == expected
