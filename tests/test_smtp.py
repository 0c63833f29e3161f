"""smtp.py's pure decisions, its one exception mapping, big messages, and the receiver CLI."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest

from mxsend.actions import ServerActions, Timeouts
from mxsend.destination import Destination
from mxsend.envelope import Envelope, Recipient
from mxsend.errors import PermanentFailure, Phase, TemporaryFailure
from mxsend.smtp import SmtpConnection
from mxsend.smtp_io import translate
from mxsend.smtp_rules import (
    ClientSettings,
    Transaction,
    advertised_size,
    choose_helo,
    choose_return_path,
    mail_params,
    needs_smtputf8,
    rcpt_params,
)
from tests.fixtures.smtp_receiver import ReceiverGroup, free_port

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
SETTINGS = ClientSettings(helo_name="c.example", allowed_destinations=LOOPBACK)


def tx(data: bytes = b"x\r\n", **envelope: object) -> Transaction:
    env = Envelope(sender="a@example.com", recipients=(Recipient("b@example.org"),),
                   **envelope)  # type: ignore[arg-type]
    return Transaction(envelope=env, return_path="a@example.com",
                       recipients=env.recipients, data=data)


def test_mail_params_follow_the_extensions():
    t = tx(b"caf\xc3\xa9\r\n", ret="HDRS", envid="E1")
    full = {"size": "1000", "8bitmime": "", "dsn": ""}
    assert mail_params(t, full, allow_dsn=True, smtputf8=False) == [
        "SIZE=7", "BODY=8BITMIME", "RET=HDRS", "ENVID=E1"]
    assert mail_params(t, full, allow_dsn=False, smtputf8=True) == [
        "SIZE=7", "BODY=8BITMIME", "SMTPUTF8"]
    assert mail_params(t, {}, allow_dsn=True, smtputf8=False) == []
    assert mail_params(tx(body="7BIT"), full, allow_dsn=False, smtputf8=False) == [
        "SIZE=3", "BODY=7BIT"]


def test_rcpt_params():
    dsn = {"dsn": ""}
    r = Recipient("b@example.org", notify=("NEVER",))
    assert rcpt_params(r, dsn, allow_dsn=True) == ["NOTIFY=NEVER", "ORCPT=rfc822;b@example.org"]
    assert rcpt_params(Recipient("b@example.org"), dsn, allow_dsn=True) == []
    assert rcpt_params(r, {}, allow_dsn=True) == []
    assert rcpt_params(r, dsn, allow_dsn=False) == []


@pytest.mark.parametrize(("value", "limit"), [
    ("", None), ("0", None), ("52428800", 52428800), ("junk", None)])
def test_advertised_size(value, limit):
    assert advertised_size({"size": value}) == limit
    assert advertised_size({}) is None


def test_needs_smtputf8():
    env = Envelope(sender="a@example.com", recipients=(Recipient("b@example.org"),))
    assert not needs_smtputf8(env, "a@example.com", env.recipients)
    assert needs_smtputf8(env, "ä@example.com", env.recipients)
    assert needs_smtputf8(env, "a@example.com", [Recipient("b@exämple.org")])
    assert needs_smtputf8(Envelope("a@example.com", (), smtputf8=True), "a@example.com", [])


def test_choose_return_path_and_helo():
    actions = ServerActions(return_address_modifier=1, default_return_address="<b@x.example>")
    assert choose_return_path("a@x.example", actions) == "b@x.example"
    assert choose_return_path("a@x.example", ServerActions(return_address_modifier=2)) == ""
    with pytest.raises(TemporaryFailure):
        choose_return_path("a@x.example", ServerActions(
            return_address_modifier=1, default_return_address="not an address"))
    settings = ClientSettings(helo_name="default.example")
    assert choose_helo(ServerActions(), settings) == "default.example"
    assert choose_helo(ServerActions(helo_name="bücher.example"), settings) == (
        "xn--bcher-kva.example")
    with pytest.raises(TemporaryFailure):
        choose_helo(ServerActions(helo_name="a\nb"), settings)


@pytest.mark.parametrize(("exc", "phase", "kind", "dsn"), [
    (PermanentFailure("550 denied", dsn="5.7.1"), Phase.MAIL, PermanentFailure, "5.7.1"),
    (ConnectionRefusedError(111, "Connection refused"), Phase.CONNECT, TemporaryFailure,
     "4.4.1"),
    (TimeoutError(), Phase.CONNECT, TemporaryFailure, "4.4.1"),
    (TimeoutError(), Phase.DATAEND, TemporaryFailure, "4.4.2"),
    (ConnectionResetError("gone"), Phase.RCPT, TemporaryFailure, "4.4.2"),
    (EOFError(), Phase.DATA, TemporaryFailure, "4.4.2"),
    (OSError(113, "No route to host"), Phase.MAIL, TemporaryFailure, "4.4.2"),
    (ssl.SSLError(1, "bad"), Phase.STARTTLS, TemporaryFailure, "4.7.5"),
    (ValueError("malformed reply line"), Phase.MAIL, TemporaryFailure, "4.5.0"),
])
def test_translate(exc, phase, kind, dsn):
    error = translate(exc, phase, "mx.example.org")
    assert type(error) is kind and error.dsn == dsn
    assert error.host == "mx.example.org" or isinstance(exc, PermanentFailure)


async def test_big_message_streams_unchanged(smtp_receivers: ReceiverGroup):
    """Several data blocks (flow control and the data-block timeout path)."""
    server = smtp_receivers.start("127.0.0.2")
    line = b"." + b"x" * 70 + b"\r\n"
    data = b"Subject: big\r\n\r\n" + line * 20_000  # ~1.4 MB, every line dot-stuffed
    actions = ServerActions(timeouts=Timeouts(connect=3, greeting=3, ehlo=3, mail=3, rcpt=3,
                                              data=3, datablock=5, dataend=5))
    conn = await SmtpConnection.open(Destination("mx.example.org", "127.0.0.2",
                                                 smtp_receivers.port),
                                     actions, SETTINGS)
    try:
        result = await conn.send(tx(data))
    finally:
        await conn.quit()
    assert not isinstance(result.final, Exception) and result.final is not None
    assert result.final.code == 250
    [received] = await server.async_wait_for(1)
    assert received.data == data


def test_receiver_runs_outside_pytest():
    port = free_port(["127.0.0.2"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.smtp_receiver", "--host", "127.0.0.2",
         "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "listening"

        async def send() -> None:
            await aiosmtplib.send(b"Subject: hi\r\n\r\nbody\r\n", sender="a@example.com",
                                  recipients=["b@example.org"], hostname="127.0.0.2",
                                  port=port, start_tls=False, timeout=5)

        asyncio.run(send())
        event = json.loads(proc.stdout.readline())
        assert event["event"] == "message" and event["rcpts"] == ["b@example.org"]
        assert event["data"] == "Subject: hi\r\n\r\nbody\r\n"
    finally:
        proc.terminate()
        proc.wait(10)
