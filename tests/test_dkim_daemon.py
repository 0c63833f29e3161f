"""End to end: the daemon (a real process) signs with DKIM, once, and receivers verify.

- a real Exim on loopback, as the MX, verifies `pass` for RSA, Ed25519 and a dual
  signature, the keys published in the test DNS server (contract §7);
- a message retried after a 451 to its DATA carries the byte-identical signature, the
  same one `queue cat` shows and the state file holds, and SIZE= counts it;
- the script's `DKIMDomain = ""` skips signing; an unknown domain is a script_error;
- a key that cannot be read stops `mxsend run` with exit 2 naming it (one process or
  several); on SIGHUP such a key keeps the running ones.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mxsend.dkim import split_message
from mxsend.dkim_keys import SigningKey, write_new_key
from mxsend.spool import Spool
from tests.fixtures.daemon import REPO, DaemonProcess, wait_until, write_config
from tests.fixtures.dns_server import DnsTestServer
from tests.fixtures.exim import EximServer
from tests.fixtures.smtp_receiver import Behaviour, ReceiverGroup
from tests.test_daemon_e2e import drop
from tests.test_dkim import private, publish, signing_key, txt_lookup, verify_all

pytestmark = pytest.mark.slow

Start = Callable[..., DaemonProcess]
FROM_DOMAIN = "src.test"  # tests.test_daemon_e2e's messages are From: alice@src.test


def key_table(directory: Path, domain: str, selector: str, kind: str,
              mode: int = 0o600) -> tuple[dict[str, object], SigningKey]:
    """A key file written as `dkim keygen` does, its `[[dkim.key]]` table, and the key."""
    key = signing_key(domain, selector, kind)
    path = directory / f"{domain}.{selector}.pem"
    write_new_key(path, private(kind))
    path.chmod(mode)
    return {"domain": domain, "selector": selector, "key_file": str(path)}, key


def config_with_keys(tmp_path: Path, sections: dict[str, dict[str, object]],
                     keys: list[dict[str, object]]) -> Path:
    """write_config, then the `[[dkim.key]]` tables (an array of tables it cannot write)."""
    path = write_config(tmp_path, sections)
    tables = "".join(
        "\n[[dkim.key]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
        for table in keys)
    path.write_text(path.read_text() + tables)
    return path


def dkim_fields(data: bytes) -> list[bytes]:
    """The DKIM-Signature fields at the top of a message, raw."""
    header = split_message(data)[0]
    return re.findall(rb"DKIM-Signature:.*?\r\n(?![ \t])", header, re.S)


def _smtp_world(tmp_path: Path, dns: DnsTestServer, smtp: ReceiverGroup,
                behaviour: Behaviour | None = None,
                ) -> tuple[dict[str, dict[str, object]], object]:
    dns.add_mx("d1.test", 10, "mx1.d1.test")
    dns.add_a("mx1.d1.test", "127.0.0.2")
    receiver = smtp.start("127.0.0.2", behaviour=behaviour)
    sections: dict[str, dict[str, object]] = {
        "dns": {"nameservers": [dns.nameserver], "timeout": "2s", "ipv6": False},
        "smtp": {"port": smtp.port, "helo_name": "mxsend.test"},
    }
    return sections, receiver


# --- (a) a real Exim verifies ---------------------------------------------------------


@pytest.mark.parametrize("kinds", [("rsa",), ("ed25519",), ("rsa", "ed25519")],
                         ids=["rsa", "ed25519", "dual"])
def test_exim_verifies_what_the_daemon_signs(tmp_path: Path, exim_dkim: EximServer,
                                             daemon: Start, kinds: tuple[str, ...]) -> None:
    dns = exim_dkim.dns
    dns.add_mx("receiver.test", 10, "mx.receiver.test")
    dns.add_a("mx.receiver.test", exim_dkim.host)
    tables = []
    for number, kind in enumerate(kinds):
        table, key = key_table(tmp_path, FROM_DOMAIN, f"{kind[:2]}{number}", kind)
        publish(dns, key)
        tables.append(table)
    config = config_with_keys(tmp_path, {
        "dns": {"nameservers": [dns.nameserver], "timeout": "2s", "ipv6": False},
        "smtp": {"port": exim_dkim.port, "helo_name": "mxsend.test"},
    }, tables)
    drop(tmp_path / "spool", "m1", "alice@src.test", "bob@receiver.test")
    process = daemon(config, "--once")
    assert process.wait(60) == 0, process.output()
    [sent] = process.find("delivery", status="sent")
    labels = ",".join(f"d={t['domain']} s={t['selector']}" for t in tables)
    assert sent["dkim"] == labels
    exim_id = re.search(r"id=(\S+)", sent["response"])
    assert exim_id, sent
    results = exim_dkim.results(exim_id.group(1), len(kinds))
    assert {(r.domain, r.selector, r.status) for r in results} == {
        (FROM_DOMAIN, str(t["selector"]), "pass") for t in tables}


# --- (b) signed once: a retry sends the same bytes --------------------------------------


def test_a_retry_carries_the_identical_signature(
        tmp_path: Path, dns_server: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start) -> None:
    refuse = Behaviour(dataend="451 4.3.0 try again later", size=1_000_000)
    sections, receiver = _smtp_world(tmp_path, dns_server, smtp_receivers, refuse)
    rsa, rsa_key = key_table(tmp_path, FROM_DOMAIN, "s1", "rsa")
    ed, ed_key = key_table(tmp_path, FROM_DOMAIN, "e1", "ed25519")
    publish(dns_server, rsa_key)
    publish(dns_server, ed_key)
    config = config_with_keys(tmp_path, sections, [rsa, ed])
    spool = tmp_path / "spool"
    drop(spool, "m1", "alice@src.test", "bob@d1.test")
    process = daemon(config)
    try:
        process.wait_event("delivery", status="deferred", timeout=30)
        # The signature was durable before the first attempt; `queue cat` shows it.
        observer = Spool(spool, owner="test-observer")
        [(state, _)] = list(observer.entries())
        assert state.dkim == "d=src.test s=s1,d=src.test s=e1"
        # The message file itself is never changed (contract §7).
        assert b"DKIM-Signature" not in observer.load_message("m1").data
        cat = subprocess.run([sys.executable, "-m", "mxsend", "-c", str(config), "queue",
                              "cat", "m1"], cwd=REPO, capture_output=True, check=True)
        receiver.behaviour.dataend = None
        [sent] = process.wait_event("delivery", status="sent", timeout=30)
    finally:
        process.stop()
    assert sent["dkim"] == "d=src.test s=s1,d=src.test s=e1"
    first, second = receiver.transactions[:2]
    assert not first.accepted and second.accepted
    assert first.data == second.data == cat.stdout
    assert state.dkim_fields is not None
    assert first.data is not None and first.data.startswith(state.dkim_fields.encode())
    assert len(dkim_fields(first.data)) == 2
    # SIZE= (RFC 1870) counts the signature: the bytes as sent, before dot-stuffing.
    assert f"SIZE={len(first.data)}" in second.mail_params
    assert verify_all(second.data or b"", txt_lookup(dns_server)) == [True, True]


# --- (c) the script decides -------------------------------------------------------------


@pytest.mark.parametrize(("value", "signed", "error"), [
    ('""', False, False),
    ('"nope.test"', True, True),
    ("42", True, True),
])
def test_the_scripts_dkim_domain(
        tmp_path: Path, dns_server: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start, value: str, signed: bool, error: bool) -> None:
    sections, receiver = _smtp_world(tmp_path, dns_server, smtp_receivers)
    table, _ = key_table(tmp_path, FROM_DOMAIN, "s1", "ed25519")
    config = config_with_keys(tmp_path, sections, [table])
    (tmp_path / "mxout.lua").write_text(
        "function CheckFile(Filename, Actions)\n"
        '  print("in=" .. Actions.DKIMDomain)\n'
        f"  Actions.DKIMDomain = {value}\n"
        "  return Actions\nend\n")
    drop(tmp_path / "spool", "m1", "alice@src.test", "bob@d1.test")
    process = daemon(config, "--once")
    assert process.wait(60) == 0, process.output()
    assert process.find("script_log", message="in=src.test")
    [sent] = process.find("delivery", status="sent")
    [message] = receiver.messages
    assert len(dkim_fields(message.data)) == (1 if signed else 0)
    assert sent["dkim"] == ("d=src.test s=s1" if signed else None)
    errors = [e for e in process.find("script_error", function="CheckFile")
              if "DKIMDomain" in e["error"]]
    assert bool(errors) == error, process.output()


def test_no_matching_key_sends_unsigned_and_a_readable_key_is_a_warning(
        tmp_path: Path, dns_server: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start) -> None:
    sections, receiver = _smtp_world(tmp_path, dns_server, smtp_receivers)
    table, _ = key_table(tmp_path, "other.test", "s1", "ed25519", mode=0o644)
    config = config_with_keys(tmp_path, sections, [table])
    drop(tmp_path / "spool", "m1", "alice@src.test", "bob@d1.test")
    process = daemon(config, "--once")
    assert process.wait(60) == 0, process.output()
    [message] = receiver.messages
    assert dkim_fields(message.data) == []
    assert process.find("delivery", status="sent")[0]["dkim"] is None
    assert any("dkim.key[0]" in line and "too open" in line for line in process.lines)


# --- (d) keys that cannot be used -----------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_a_bad_key_at_start_is_exit_2_naming_it(tmp_path: Path, daemon: Start,
                                                processes: int) -> None:
    bad = tmp_path / "broken.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    bad.chmod(0o600)
    config = config_with_keys(tmp_path, {"queue": {"processes": processes}}, [
        {"domain": "src.test", "selector": "s1", "key_file": str(bad)}])
    process = daemon(config)
    assert process.wait(30) == 2, process.output()
    assert len(process.lines) == 1, process.output()
    assert "dkim.key[0] (src.test s1)" in process.lines[0]
    assert str(bad) in process.lines[0]
    assert not (tmp_path / "spool" / "owners").exists() or not any(
        (tmp_path / "spool" / "owners").iterdir())


def test_sighup_with_a_broken_key_keeps_the_running_keys(
        tmp_path: Path, dns_server: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start) -> None:
    sections, receiver = _smtp_world(tmp_path, dns_server, smtp_receivers)
    table, _ = key_table(tmp_path, FROM_DOMAIN, "s1", "ed25519")
    config = config_with_keys(tmp_path, sections, [table])
    process = daemon(config)
    try:
        wait_until(lambda: any("mxsend started" in line for line in process.lines), 30)
        key_file = Path(str(table["key_file"]))
        key_file.unlink()
        key_file.write_text("garbage")
        process.signal(signal.SIGHUP)
        wait_until(lambda: any("DKIM keys not reloaded" in line for line in process.lines),
                   30, message=process.output)
        drop(tmp_path / "spool", "m1", "alice@src.test", "bob@d1.test")
        [sent] = process.wait_event("delivery", status="sent", timeout=30)
    finally:
        process.stop()
    assert sent["dkim"] == "d=src.test s=s1"
    assert len(dkim_fields(receiver.messages[0].data)) == 1
