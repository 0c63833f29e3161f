"""The session on the wire (wire.Wire, smtp.SmtpConnection): pipelining, hostile replies,
the handshake under the one reply parser.

aiosmtpd answers every command as it comes, so it cannot show whether a client
pipelines. These tests use a raw loopback server whose answers are scripted byte by
byte: one that answers nothing until it has the whole MAIL..DATA group proves the
group was sent in one go (a client that waited for the reply to MAIL would time out).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from mxsend.actions import ServerActions, Timeouts
from mxsend.destination import Destination
from mxsend.envelope import Envelope, Recipient
from mxsend.errors import DeliveryError, Phase, TemporaryFailure
from mxsend.reply import Reply, take_reply
from mxsend.smtp import SmtpConnection
from mxsend.smtp_rules import ClientSettings, Transaction
from mxsend.smtp_setup import HandshakeFailed

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
SETTINGS = ClientSettings(helo_name="c.example", allowed_destinations=LOOPBACK)
EHLO = b"250-mx.example.org\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
SHORT = Timeouts(connect=3, greeting=3, ehlo=3, mail=3, rcpt=3, data=3, datablock=3,
                 dataend=3)
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A loopback server running `script` for each connection, after greeting and EHLO."""

    def __init__(self, script: Script, ehlo: bytes = EHLO,
                 greeting: bytes = b"220 mx.example.org ESMTP\r\n") -> None:
        self.script = script
        self.ehlo = ehlo
        self.greeting = greeting
        self.received = bytearray()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                       ) -> None:
        try:
            writer.write(self.greeting)
            line = await reader.readline()
            self.received += line
            writer.write(self.ehlo)
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_until(self, reader: asyncio.StreamReader, marker: bytes) -> bytes:
        """What the client sent up to and including `marker`."""
        chunk = await reader.readuntil(marker)
        self.received += chunk
        return chunk


@pytest.fixture
async def raw() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(script: Script, ehlo: bytes = EHLO, **options: bytes) -> RawServer:
        server = RawServer(script, ehlo, **options)
        server.server = await asyncio.start_server(server._session, "127.0.0.2", 0)
        server.port = server.server.sockets[0].getsockname()[1]
        servers.append(server)
        return server

    yield start
    for server in servers:
        assert server.server is not None
        server.server.close()
        await server.server.wait_closed()


def transaction(*recipients: str, data: bytes = b"Subject: t\r\n\r\nbody\r\n") -> Transaction:
    env = Envelope(sender="a@example.com", recipients=tuple(Recipient(r) for r in recipients))
    return Transaction(envelope=env, return_path="a@example.com", recipients=env.recipients,
                       data=data)


async def connect(server: RawServer) -> SmtpConnection:
    return await SmtpConnection.open(
        Destination("mx.example.org", "127.0.0.2", server.port),
        ServerActions(try_tls=False, timeouts=SHORT), SETTINGS)


def final_code(result: object) -> int | None:
    final = getattr(result, "final", None)
    return final.code if isinstance(final, Reply) else None


async def test_mail_rcpt_and_data_go_in_one_group(raw) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        group = await server.read_until(reader, b"DATA\r\n")
        # Nothing was answered yet: only a pipelining client gets this far.
        assert group.count(b"\r\n") == 4, group
        writer.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n354 go on\r\n")
        await server.read_until(reader, b"\r\n.\r\n")
        writer.write(b"250 2.0.0 queued\r\n")
        await server.read_until(reader, b"QUIT\r\n")
        writer.write(b"221 bye\r\n")

    server = await raw(script)
    conn = await connect(server)
    result = await conn.send(transaction("b@example.org", "c@example.org"))
    await conn.quit()
    assert final_code(result) == 250
    assert [reply.code for _, reply in result.rcpt_replies] == [250, 250]
    assert b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n" in server.received


async def test_without_pipelining_each_command_waits(raw) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go on\r\n"):
            line = await server.read_until(reader, b"\r\n")
            # The next command must not be here before its predecessor's reply.
            assert not reader._buffer, (line, bytes(reader._buffer))  # type: ignore[attr-defined]
            writer.write(reply)
        await server.read_until(reader, b"\r\n.\r\n")
        writer.write(b"250 queued\r\n")

    server = await raw(script, ehlo=b"250 mx.example.org\r\n")
    conn = await connect(server)
    result = await conn.send(transaction("b@example.org"))
    conn.close()
    assert final_code(result) == 250


async def test_replies_split_anywhere_and_multiline(raw) -> None:
    replies = (b"250-2.1.0 sender\r\n250 2.1.0 ok\r\n550-5.1.1 no such\r\n550 5.1.1 user\r\n"
               b"250 2.1.5 ok\r\n354 go\r\n")

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_until(reader, b"DATA\r\n")
        for index in range(len(replies)):  # one byte per write
            writer.write(replies[index:index + 1])
            await writer.drain()
        await server.read_until(reader, b"\r\n.\r\n")
        writer.write(b"250 queued\r\n")

    server = await raw(script)
    conn = await connect(server)
    result = await conn.send(transaction("gone@example.org", "b@example.org"))
    conn.close()
    assert final_code(result) == 250
    (gone, refused), (_, ok) = result.rcpt_replies
    assert gone == "gone@example.org" and refused.code == 550
    assert refused.message == "no such\nuser" and refused.enhanced == "5.1.1"
    assert ok.code == 250


async def test_refused_mail_fails_the_whole_transaction_in_step(raw) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_until(reader, b"DATA\r\n")
        writer.write(b"550 5.7.1 go away\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no RCPT\r\n")
        await server.read_until(reader, b"RSET\r\n")
        writer.write(b"250 2.0.0 reset\r\n")

    server = await raw(script)
    conn = await connect(server)
    with pytest.raises(DeliveryError) as caught:
        await conn.send(transaction("b@example.org"))
    assert caught.value.code == 550 and caught.value.phase is Phase.MAIL
    # Every reply of the group was read: the session is in step and still usable.
    assert await conn.reset()
    conn.close()


async def test_data_accepted_without_recipients_gets_a_lone_dot(raw) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_until(reader, b"DATA\r\n")
        writer.write(b"250 ok\r\n550 5.1.1 no such user\r\n354 go on anyway\r\n")
        await server.read_until(reader, b".\r\n")
        writer.write(b"554 5.5.1 no valid recipients\r\n")

    server = await raw(script)
    conn = await connect(server)
    result = await conn.send(transaction("gone@example.org"))
    conn.close()
    assert result.final is None and result.final_phase is Phase.RCPT
    # RFC 2920 §3.1: a single dot, not the message.
    assert server.received.endswith(b"DATA\r\n.\r\n")


@pytest.mark.parametrize("garbage", [b"hello there\r\n", b"2x0 odd\r\n",
                                     b"250-" + b"x" * 9000 + b"\r\n"])
async def test_malformed_reply_is_a_temporary_protocol_error(raw, garbage) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_until(reader, b"DATA\r\n")
        writer.write(garbage)
        await reader.read()  # until the client closes

    server = await raw(script)
    conn = await connect(server)
    with pytest.raises(TemporaryFailure) as caught:
        await conn.send(transaction("b@example.org"))
    assert "protocol error" in caught.value.message and caught.value.phase is Phase.MAIL
    assert not conn.alive


async def test_silent_server_times_out_and_the_session_is_dropped(raw) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_until(reader, b"DATA\r\n")
        await reader.read()

    server = await raw(script)
    conn = await SmtpConnection.open(
        Destination("mx.example.org", "127.0.0.2", server.port),
        ServerActions(try_tls=False, timeouts=Timeouts(
            connect=3, greeting=3, ehlo=3, mail=0.2, rcpt=3, data=3, datablock=3, dataend=3)),
        SETTINGS)
    with pytest.raises(TemporaryFailure) as caught:
        await conn.send(transaction("b@example.org"))
    assert caught.value.message == "timed out (mail)" and caught.value.dsn == "4.4.2"
    assert not conn.alive


async def test_unsolicited_reply_retires_an_idle_session(raw) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_until(reader, b"DATA\r\n")
        writer.write(b"250 ok\r\n250 ok\r\n354 go on\r\n")
        await server.read_until(reader, b"\r\n.\r\n")
        writer.write(b"250 queued\r\n")
        writer.write(b"421 4.4.2 idle too long\r\n")  # asked for by nobody
        await reader.read()

    server = await raw(script)
    conn = await connect(server)
    result = await conn.send(transaction("b@example.org"))
    assert final_code(result) == 250
    for _ in range(200):  # bounded: the 421 arrives within milliseconds
        if not conn.alive:
            break
        await asyncio.sleep(0.01)
    assert not conn.alive


async def test_connection_lost_mid_group_is_temporary_for_all(raw) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_until(reader, b"DATA\r\n")
        writer.write(b"250 ok\r\n")  # then hang up

    server = await raw(script)
    conn = await connect(server)
    with pytest.raises(TemporaryFailure) as caught:
        await conn.send(transaction("b@example.org"))
    assert caught.value.phase is Phase.RCPT and caught.value.dsn == "4.4.2"
    assert not conn.alive


@pytest.mark.parametrize(("buffer", "reply", "rest"), [
    (b"250 ok\r\n", (250, "ok"), b""),
    (b"250 ok\r\n354 go", (250, "ok"), b"354 go"),
    (b"250-a\r\n250-b\r\n250 c\r\n", (250, "a\nb\nc"), b""),
    (b"250-a\r\n250", None, b"250-a\r\n250"),
    (b"250\r\n", (250, ""), b""),
    (b"250 caf\xc3\xa9\n", (250, "café"), b""),
])
def test_take_reply(buffer: bytes, reply: tuple[int, str] | None, rest: bytes) -> None:
    data = bytearray(buffer)
    assert take_reply(data) == reply
    assert bytes(data) == rest


STARTTLS_EHLO = b"250-mx.example.org\r\n250-PIPELINING\r\n250 STARTTLS\r\n"


@pytest.mark.parametrize("after_220", [b"250 2.0.0 injected\r\n", b"garbage\r\n"])
async def test_bytes_after_the_reply_to_starttls_never_count_as_tls(raw, after_220) -> None:
    # A man in the middle may append plaintext after the 220 (the STARTTLS injection
    # of CVE-2011-0411): it must not be read as if it came over TLS.
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_until(reader, b"STARTTLS\r\n")
        writer.write(b"220 2.0.0 go ahead\r\n" + after_220)
        await reader.read()

    server = await raw(script, STARTTLS_EHLO)
    with pytest.raises(HandshakeFailed) as caught:
        await SmtpConnection.open(
            Destination("mx.example.org", "127.0.0.2", server.port),
            ServerActions(timeouts=SHORT), SETTINGS)
    assert caught.value.phase is Phase.STARTTLS


async def test_greeting_and_ehlo_go_through_the_one_parser(raw) -> None:
    # A multi-line greeting, then EHLO's list; the extensions are read from the full
    # text (SIZE's value included), whatever its length.
    long_line = b"250-X-" + b"A" * 1500 + b"\r\n"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_until(reader, b"QUIT\r\n")
        writer.write(b"221 bye\r\n")

    server = await raw(script, b"250-mx.example.org\r\n" + long_line
                       + b"250-SIZE 1000\r\n250 PIPELINING\r\n",
                       greeting=b"220-mx.example.org ESMTP\r\n220 welcome\r\n")
    conn = await connect(server)
    assert conn.extensions["size"] == "1000" and conn.pipelining
    await conn.quit()
