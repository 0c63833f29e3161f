"""The SMTP client's side of one TCP connection: bytes out, replies in, in order.

`Wire` is the one protocol object of a connection, from the greeting to QUIT, TLS
included (`start_tls` swaps the transport under it, not the protocol), and
`reply.take_reply` is its one reply parser. It knows nothing of SMTP commands:
smtp_setup.py and smtp.py say what to write and how many replies that asks for; replies
are queued as they arrive and read in the order the commands went out, so pipelining
(RFC 2920) is just writing several commands before reading. Failures surface as
built-in exceptions that `smtp_io.translate` maps: ConnectionResetError (lost),
TimeoutError, ValueError (a malformed reply), ssl.SSLError (the handshake).

Also the one home of the wire-text checks: nothing with CR, LF or another control
character reaches a command line (style §10).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import cast

from mxsend.addresses import CONTROL
from mxsend.reply import MAX_REPLY_BUFFER, take_reply

# The same plus any white space, for single tokens such as a HELO name.
CONTROL_OR_SPACE = re.compile(r"[\x00-\x1f\x7f\s]")

# log.debug_peers: called with ">" and each command line written, "<" and each reply.
Transcript = Callable[[str, str], None]


def has_control(text: str, *, spaces: bool = True) -> bool:
    """True if `text` must not be put on a command line (`spaces=False`: nor any space)."""
    return bool((CONTROL if spaces else CONTROL_OR_SPACE).search(text))


class Wire(asyncio.Protocol):
    """Commands out, replies in order; see the module doc."""

    def __init__(self, transcript: Transcript | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._transcript = transcript
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._replies: deque[tuple[int, str]] = deque()
        # Replies owed for commands written and not yet answered; the greeting is owed
        # from the start (RFC 5321 §3.1).
        self._expected = 1
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._drained: asyncio.Future[None] | None = None  # set while writing is paused

    @classmethod
    async def connect(cls, sock: socket.socket, transcript: Transcript | None = None) -> Wire:
        """Take over a connected socket; `transcript` hears every command and reply
        from the greeting on."""
        loop = asyncio.get_running_loop()
        _, wire = await loop.create_connection(lambda: cls(transcript), sock=sock)
        return wire

    @property
    def alive(self) -> bool:
        return (self._error is None and self._transport is not None
                and not self._transport.is_closing())

    def extra(self, name: str) -> object:
        """Transport information, such as "ssl_object" once TLS is up."""
        return self._transport.get_extra_info(name) if self._transport is not None else None

    def write(self, data: bytes, replies: int, *, body: bool = False) -> None:
        """Send `data`, which asks for `replies` replies; `body`: message data, which a
        transcript shows as its size only."""
        if not self.alive or self._transport is None:
            raise self._error or ConnectionResetError("connection lost")
        if self._transcript is not None:
            _tell_written(self._transcript, data, body)
        self._expected += replies
        self._transport.write(data)

    async def read(self, seconds: float) -> tuple[int, str]:
        """The next reply, in the order the commands were written."""
        if not self._replies and self._error is None:
            waiter = self._loop.create_future()
            self._waiter = waiter
            timer = self._loop.call_later(seconds, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if self._replies:
            return self._replies.popleft()
        raise self._error or ConnectionResetError("connection lost")

    async def drain(self, seconds: float) -> None:
        """Wait while the transport is above its high-water mark (a big message)."""
        if self._drained is not None:
            await asyncio.wait_for(asyncio.shield(self._drained), seconds)

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None,
                        seconds: float) -> None:
        """The TLS handshake after the server's 220 to STARTTLS (RFC 3207 §4).

        Anything the server sent after that 220 and before the handshake would be
        read as if it came over TLS: refused, as the STARTTLS command-injection fixes
        (CVE-2011-0411 and its kin) do.
        """
        if self._buffer or self._replies or self._expected:
            raise ValueError("data after the reply to STARTTLS, before the TLS handshake")
        if not self.alive or self._transport is None:
            raise self._error or ConnectionResetError("connection lost")
        transport = await self._loop.start_tls(
            self._transport, self, context, server_side=False,
            server_hostname=server_hostname, ssl_handshake_timeout=seconds)
        if transport is None:
            raise ConnectionResetError("connection lost during the TLS handshake")
        self._transport = transport

    def close(self) -> None:
        self._fail(ConnectionResetError("connection closed"))
        if self._transport is not None:
            self._transport.close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._transport is None:  # start_tls calls it again with the TLS transport
            self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while True:
            try:
                reply = take_reply(buffer)
            except ValueError as exc:
                self._abort(exc)
                return
            if reply is None:
                break
            if self._expected == 0:
                # Unasked (say, a 421 before an idle timeout, RFC 5321 §4.2.1): the
                # server is leaving; the session is not reused.
                self._fail(ConnectionResetError(f"unsolicited reply: {reply[0]} {reply[1]}"))
                if self._transport is not None:
                    self._transport.close()
                return
            self._expected -= 1
            self._replies.append(reply)
            if self._transcript is not None:
                self._transcript("<", _reply_text(*reply))
        if len(buffer) > MAX_REPLY_BUFFER:
            self._abort(ValueError("reply too long"))
            return
        if self._replies and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def eof_received(self) -> bool:
        self._fail(ConnectionResetError("connection closed by the server"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionResetError(f"connection lost: {exc}") if exc
                   else ConnectionResetError("connection lost"))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    def _abort(self, error: Exception) -> None:
        self._fail(error)
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _tell_written(transcript: Transcript, data: bytes, body: bool) -> None:
    """Commands line by line, AUTH's argument redacted (aiosmtpd's rule); message data
    as its size, never its content, then the final `.` if this write ends it."""
    if body:
        ends = data == b".\r\n" or data.endswith(b"\r\n.\r\n")
        size = len(data) - (3 if ends else 0)
        if size > 0:
            transcript(">", f"[message data: {size} bytes]")
        if ends:
            transcript(">", ".")
        return
    for raw in data.split(b"\r\n"):
        if not raw:
            continue
        line = raw.decode("utf-8", "replace")
        if line[:5].upper() == "AUTH ":
            mechanism = line[5:].split(" ", 1)[0]
            line = f"AUTH {mechanism} [redacted]"
        transcript(">", line)


def _reply_text(code: int, text: str) -> str:
    lines = text.split("\n")
    last = len(lines) - 1
    return "\n".join(f"{code}{'-' if i < last else ' '}{line}" for i, line in enumerate(lines))


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("timed out waiting for a reply"))
