"""The SMTP listener (contract §10) against real clients: smtplib on loopback, real TLS
(trustme), a real full file system (a tiny tmpfs), and a real Postfix relaying to it."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mxsend.config import Config, config_from_mapping
from mxsend.envelope import Recipient, parse_bsmtp
from mxsend.errors import ConfigError, SpoolError
from mxsend.listener import (
    Listener,
    peer_allowed,
    spool_file,
    start_listener,
    with_enhanced_code,
    write_error_reply,
)
from tests.fixtures.daemon import DaemonProcess, wait_until, write_config
from tests.fixtures.ports import free_port
from tests.fixtures.postfix import PostfixInstance, require_postfix


def make_config(spool: Path, **listen: object) -> Config:
    spool_section: dict[str, object] = {"path": str(spool)}
    if "max_message_size" in listen:
        spool_section["max_message_size"] = listen.pop("max_message_size")
    listen.setdefault("address", f"127.0.0.1:{free_port()}")
    return config_from_mapping({"spool": spool_section, "listen": listen,
                                "smtp": {"helo_name": "relay.test"}})


def new_files(spool: Path) -> list[Path]:
    return sorted(p for p in (spool / "new").iterdir() if not p.name.startswith("."))


Start = Callable[..., Awaitable[Listener]]


@pytest.fixture
async def listen(tmp_path: Path) -> AsyncIterator[Start]:
    """listen(**listen_keys) starts a listener on a free loopback port, closed at the end."""
    started: list[Listener] = []

    async def start(spool: Path | None = None, **keys: object) -> Listener:
        listener = await start_listener(make_config(spool or tmp_path / "spool", **keys))
        started.append(listener)
        return listener

    yield start
    for listener in started:
        await listener.close()


def client(listener: Listener, **kwargs: Any) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", listener.port, local_hostname="client.test",
                        timeout=10, **kwargs)


# --- pure decisions ----------------------------------------------------------------------


@pytest.mark.parametrize(("peer", "allowed"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("192.0.2.1", False), ("::2", False), ("fe80::1%eth0", False), ("nonsense", False),
])
def test_peer_allowed_default_networks(peer: str, allowed: bool) -> None:
    networks = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert peer_allowed(peer, networks) is allowed


@pytest.mark.parametrize(("reply", "expected"), [
    ("250 OK", "250 2.0.0 OK"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
    ("503 Error: send HELO first", "503 5.5.1 Error: send HELO first"),
    ("250 2.1.0 Ok", "250 2.1.0 Ok"),
    ("220 relay.test ESMTP", "220 relay.test ESMTP"),
    ("354 End data", "354 End data"),
    ("421 4.7.0 MAIL sent too many times", "421 4.7.0 MAIL sent too many times"),
])
def test_replies_carry_enhanced_codes(reply: str, expected: str) -> None:
    assert with_enhanced_code(reply) == expected


def test_write_error_replies() -> None:
    def failed(number: int) -> SpoolError:
        error = SpoolError("cannot write")
        error.__cause__ = OSError(number, os.strerror(number))
        return error

    assert write_error_reply(failed(28)).startswith("452 4.3.1 ")  # ENOSPC
    assert write_error_reply(failed(122)).startswith("452 4.3.1 ")  # EDQUOT
    assert write_error_reply(failed(5)).startswith("451 4.3.0 ")  # EIO


def test_spool_file_with_bare_lf_parses_to_the_same_message() -> None:
    recipients = (Recipient("b@dst.test", notify=("NEVER",)),)
    crlf = spool_file("a@src.test", {"envid": "X1"}, recipients, b"Received: x\r\n",
                      b"Subject: s\r\n\r\n..dot\r\nend\r\n")
    bare = spool_file("a@src.test", {"envid": "X1"}, recipients, b"Received: x\r\n",
                      b"Subject: s\r\n\r\n..dot\nend\r\n")
    for raw in (crlf, bare):
        message = parse_bsmtp(raw)
        assert message.data == b"Received: x\r\nSubject: s\r\n\r\n.dot\r\nend\r\n"
        assert message.envelope.envid == "X1"
        assert message.envelope.recipients == recipients


@pytest.mark.parametrize(("keys", "error"), [
    ({"address": "127.0.0.1"}, "listen.address"),
    ({"address": "::1:25"}, "listen.address"),
    ({"address": "example.org:25"}, "listen.address"),
    ({"networks": ["10.0.0.0/33"]}, "listen.networks"),
    ({"networks": "127.0.0.0/8"}, "listen.networks"),
    ({"tls_cert": "cert.pem"}, "listen.tls_key"),
    ({"tls_key": "key.pem"}, "listen.tls_cert"),
    ({"idle_timeout": "0s"}, "listen.idle_timeout"),
    ({"colour": "red"}, "listen.colour"),
])
def test_config_errors_name_the_key(keys: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{error}:"):
        config_from_mapping({"listen": keys})


def test_config_accepts_ipv6_and_defaults_to_loopback() -> None:
    config = config_from_mapping({"listen": {"address": "[::1]:10025"}})
    assert config.listen.address == "[::1]:10025"
    assert [str(n) for n in config.listen.networks] == ["127.0.0.0/8", "::1/128"]
    assert config_from_mapping({}).listen.address == ""


# --- real clients ------------------------------------------------------------------------


async def test_dsn_parameters_are_kept_and_the_file_is_in_new_before_250(
        listen: Start, tmp_path: Path) -> None:
    listener = await listen()
    spool = tmp_path / "spool"

    def send() -> tuple[str, list[Path]]:
        with client(listener) as smtp:
            code, caps = smtp.ehlo()
            assert code == 250
            for word in (b"PIPELINING", b"SIZE 52428800", b"8BITMIME", b"SMTPUTF8", b"DSN",
                         b"ENHANCEDSTATUSCODES"):
                assert word in caps.split(b"\n")
            assert smtp.mail("alice@src.test", ["RET=HDRS", "ENVID=QQ314159abc",
                                                "BODY=8BITMIME"])[0] == 250
            assert smtp.rcpt("bob@dst.test", ["NOTIFY=SUCCESS,FAILURE",
                                              "ORCPT=rfc822;Bob@Dst.test"])[0] == 250
            assert smtp.rcpt("carol@dst.test", ["NOTIFY=NEVER"])[0] == 250
            code, reply = smtp.data(b"Subject: hi\r\n\r\n.leading dot\r\n\xc3\xa9t\xc3\xa9\r\n")
            # Durable before the reply: the file is in new/ as the client reads the 250.
            present = new_files(spool)
        assert code == 250
        return reply.decode(), present

    reply, present = await asyncio.to_thread(send)
    queue_id = reply.rsplit(" ", 1)[1]
    assert reply.startswith("2.0.0 Ok: queued as ")
    assert [p.name for p in present] == [queue_id]
    message = parse_bsmtp(present[0].read_bytes())
    envelope = message.envelope
    assert (envelope.sender, envelope.ret, envelope.envid, envelope.body) == (
        "alice@src.test", "HDRS", "QQ314159abc", "8BITMIME")
    assert envelope.recipients == (
        Recipient("bob@dst.test", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;Bob@Dst.test"),
        Recipient("carol@dst.test", notify=("NEVER",)),
    )
    assert message.data.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby "
                                   b"relay.test (mxsend) with ESMTP id " + queue_id.encode())
    assert message.data.endswith(b"Subject: hi\r\n\r\n.leading dot\r\n\xc3\xa9t\xc3\xa9\r\n")
    assert not [p for p in (spool / "tmp").iterdir()]


async def test_size_is_announced_and_enforced_at_mail_and_after_data(
        listen: Start, tmp_path: Path) -> None:
    listener = await listen(max_message_size="4KB")

    def send() -> None:
        with client(listener) as smtp:
            assert b"SIZE 4096" in smtp.ehlo()[1].split(b"\n")
            code, reply = smtp.mail("a@src.test", ["SIZE=5000"])
            assert (code, reply[:5]) == (552, b"5.3.4")
            # Declared small, sent big: refused after the data, nothing queued.
            assert smtp.mail("a@src.test", ["SIZE=100"])[0] == 250
            assert smtp.rcpt("b@dst.test")[0] == 250
            code, reply = smtp.data(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 0
                                    + (b"y" * 78 + b"\r\n") * 100)
            assert (code, reply[:5]) == (552, b"5.3.4")
            # The session goes on: a message that fits is queued.
            smtp.sendmail("a@src.test", ["b@dst.test"], b"Subject: small\r\n\r\nok\r\n")

    await asyncio.to_thread(send)
    files = new_files(tmp_path / "spool")
    assert len(files) == 1
    assert b"Subject: small" in files[0].read_bytes()


async def test_starttls_offers_requiretls_and_keeps_it(listen: Start, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(tmp_path / "cert.pem"), append=True)
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    listener = await listen(tls_cert=str(tmp_path / "cert.pem"),
                            tls_key=str(tmp_path / "key.pem"))
    context = ssl.create_default_context()
    ca.configure_trust(context)

    def send() -> str:
        with client(listener) as smtp:
            caps = smtp.ehlo()[1].split(b"\n")
            assert b"STARTTLS" in caps and b"REQUIRETLS" not in caps
            assert smtp.starttls(context=context)[0] == 220
            caps = smtp.ehlo()[1].split(b"\n")
            assert b"REQUIRETLS" in caps and b"STARTTLS" not in caps
            assert smtp.mail("a@src.test", ["REQUIRETLS"])[0] == 250
            assert smtp.rcpt("b@dst.test")[0] == 250
            assert smtp.data(b"Subject: tls\r\n\r\nsecret\r\n")[0] == 250
            return str(smtp.sock.version())  # type: ignore[union-attr]

    version = await asyncio.to_thread(send)
    assert version.startswith("TLSv1.")
    message = parse_bsmtp(new_files(tmp_path / "spool")[0].read_bytes())
    assert message.envelope.requiretls
    assert b"with ESMTPS id" in message.data


async def test_tls_key_that_does_not_match_is_a_config_error(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.issue_cert("relay.test").cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.issue_cert("other.test").private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    config = make_config(tmp_path / "spool", tls_cert=str(tmp_path / "cert.pem"),
                         tls_key=str(tmp_path / "key.pem"))
    with pytest.raises(ConfigError, match=r"^listen\.tls_cert: "):
        await start_listener(config)


async def test_clients_outside_networks_get_554_at_connect(listen: Start) -> None:
    listener = await listen(networks=["192.0.2.0/24", "2001:db8::/32"])

    def connect() -> tuple[int, bytes]:
        with pytest.raises(smtplib.SMTPConnectError) as caught:
            client(listener)
        return caught.value.smtp_code, caught.value.smtp_error

    code, text = await asyncio.to_thread(connect)
    assert code == 554
    assert text.startswith(b"5.7.1 127.0.0.1 is not in listen.networks")


async def test_ipv6_loopback(listen: Start, tmp_path: Path) -> None:
    listener = await listen(address=f"[::1]:{free_port('::1')}")

    def send() -> None:
        with smtplib.SMTP("::1", listener.port, timeout=10) as smtp:
            smtp.sendmail("a@src.test", ["b@dst.test"], b"Subject: v6\r\n\r\nhi\r\n")

    await asyncio.to_thread(send)
    assert b"([::1])" in new_files(tmp_path / "spool")[0].read_bytes()


async def test_limits_per_client(listen: Start, tmp_path: Path) -> None:
    listener = await listen()

    def send() -> None:
        with client(listener) as smtp:
            smtp.ehlo()
            # RFC 5321 §4.5.3.1.4: 512 octets for a command line; MAIL and RCPT get
            # room for DSN's ORCPT (RFC 3461 §4).
            assert smtp.docmd("NOOP", "x" * 600)[0] == 500
            assert smtp.mail("a@src.test")[0] == 250
            orcpt = "ORCPT=rfc822;" + "b" * 60 + "@" + "d" * 400 + ".test"
            assert smtp.rcpt("b@dst.test", [orcpt])[0] == 250
            codes = {smtp.rcpt(f"r{i}@dst.test")[0] for i in range(999)}
            assert codes == {250}
            code, reply = smtp.rcpt("one.too.many@dst.test")
            assert (code, reply[:5]) == (452, b"4.5.3")  # RFC 5321 §4.5.3.1.10
            smtp.rset()
            # A budget of commands per connection: junk ends it.
            replies = [smtp.noop()[0] for _ in range(100)]
            assert set(replies) == {250}
            assert smtp.noop()[0] == 421

    await asyncio.to_thread(send)


async def test_idle_client_is_disconnected(listen: Start) -> None:
    listener = await listen(idle_timeout="0.3s")

    def idle() -> bytes:
        with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as sock:
            greeting = sock.recv(512)
            assert greeting.startswith(b"220 ")
            return sock.recv(512)  # blocks until the listener closes the connection

    started = time.monotonic()
    assert await asyncio.to_thread(idle) == b""
    assert time.monotonic() - started < 5


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True)
    return result.returncode == 0


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KB tmpfs: a real ENOSPC (needs root)."""
    mount = tmp_path / "tiny"
    if not _mount_tmpfs(mount, "256k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_full_disk_is_452_and_leaves_nothing(listen: Start, tiny_fs: Path) -> None:
    spool = tiny_fs / "spool"
    listener = await listen(spool=spool)
    body = (b"z" * 998 + b"\r\n") * 400  # 400 KB: more than the file system holds

    def send() -> tuple[int, bytes]:
        with client(listener) as smtp:
            smtp.ehlo()
            smtp.mail("a@src.test")
            smtp.rcpt("b@dst.test")
            result = smtp.data(b"Subject: big\r\n\r\n" + body)
            # The disk has room again for a small one.
            smtp.sendmail("a@src.test", ["b@dst.test"], b"Subject: small\r\n\r\nok\r\n")
            return result

    code, reply = await asyncio.to_thread(send)
    assert (code, reply[:5]) == (452, b"4.3.1")
    assert len(new_files(spool)) == 1
    assert list((spool / "tmp").iterdir()) == []


# --- a real MTA relaying to it -----------------------------------------------------------

def _relay_through_postfix(relay_port: int, spool: Path) -> list[Path]:
    """Start a private Postfix relaying to the listener, submit one message to its
    smtpd, wait for it in new/."""
    main_cf = f"relayhost = [127.0.0.1]:{relay_port}\nsmtp_tls_security_level = none\n"
    with PostfixInstance(main_cf) as postfix:
        with smtplib.SMTP("127.0.0.1", postfix.smtpd_port, timeout=10) as smtp:
            smtp.ehlo("app.test")
            smtp.mail("alice@src.test", ["RET=HDRS", "ENVID=PF42"])
            smtp.rcpt("bob@dst.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@dst.test"])
            assert smtp.data(b"Subject: via postfix\r\n\r\nhello\r\n")[0] == 250
        files: list[Path] = wait_until(
            lambda: new_files(spool), 30, 0.1,
            lambda: "the relayed message in new/; maillog:\n" + postfix.maillog[-3000:])
        return files


@pytest.mark.slow
async def test_postfix_relays_into_the_spool(listen: Start, tmp_path: Path) -> None:
    require_postfix()
    listener = await listen()
    files = await asyncio.to_thread(_relay_through_postfix, listener.port, tmp_path / "spool")
    message = parse_bsmtp(files[0].read_bytes())
    assert message.envelope.sender == "alice@src.test"
    assert message.envelope.ret == "HDRS" and message.envelope.envid == "PF42"
    assert message.envelope.recipients == (
        Recipient("bob@dst.test", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;bob@dst.test"),)
    assert b"Subject: via postfix" in message.data
    assert b"by mta.test (Postfix)" in message.data  # Postfix's own Received field


# --- in the daemon ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_the_daemon_serves_the_listener_and_metrics(
        daemon: Callable[..., DaemonProcess], tmp_path: Path, processes: int) -> None:
    """With one daemon it serves both; with two the supervisor does, and the daemons
    record into its metrics directory."""
    listen_port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path, {
        "listen": {"address": f"127.0.0.1:{listen_port}"},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "queue": {"processes": processes},
        "dns": {"nameservers": [f"127.0.0.1:{free_port()}"], "timeout": "1s"},
    })
    process = daemon(config)

    def connect() -> smtplib.SMTP | None:
        with contextlib.suppress(OSError):
            return smtplib.SMTP("127.0.0.1", listen_port, timeout=10)
        return None

    smtp = wait_until(connect, 30, 0.1, lambda: "the listener\n" + process.output())
    with smtp:
        smtp.ehlo()
        smtp.mail("a@src.test")
        smtp.rcpt("b@dst.test")
        code, reply = smtp.data(b"Subject: in\r\n\r\nhi\r\n")
        assert code == 250
        queue_id = reply.decode().rsplit(" ", 1)[1]
    process.wait_event("queued", timeout=30, id=queue_id)

    def scraped() -> str | None:
        with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
            return str(answer.read().decode())
        return None

    text = wait_until(scraped, 10, 0.1, "/metrics")
    assert 'mxsend_deliveries_total{status="sent"} 0.0' in text
    assert "mxsend_queue_messages" in text
    assert process.stop() == 0
    assert not list((tmp_path / "spool" / "tmp").iterdir())

