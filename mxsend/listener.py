"""The SMTP listener (contract §10): ESMTP in, one Batch SMTP file per transaction out.

An MTA that relays to `[listen] address` hands its mail over exactly as a writer that
drops files into `new/`: each transaction is serialised (envelope.py), written by the
writers' protocol (Spool.enqueue_bytes: tmp/, fsync, link into new/, fsync of new/) and
only then answered 250. From that reply on, the daemon owns the message.

aiosmtpd runs the session (greeting, EHLO/HELO, STARTTLS, RSET, NOOP, QUIT, its idle
timer and per-command budgets); this module replaces what it does not do as a relay
needs: MAIL and RCPT keep their DSN and REQUIRETLS parameters verbatim (aiosmtpd
upper-cases them and refuses RCPT parameters), DATA is read in large pieces with the
size limit of the spool, replies carry enhanced status codes (RFC 2034), and clients
outside `listen.networks` are refused at the greeting.

Limits per client, so that no client can hold the daemon's memory or time:
- command lines of 512 octets (RFC 5321 §4.5.3.1.4), MAIL and RCPT 2048 to leave room
  for DSN's ENVID and ORCPT (RFC 3461 §4: +100 and +500); longer lines get 500;
- at most MAX_RECIPIENTS recipients per transaction (RFC 5321 §4.5.3.1.8 asks for at
  least 100) and a budget of commands per connection (COMMAND_BUDGET);
- `listen.idle_timeout` between commands and between pieces of DATA (RFC 5321
  §4.5.3.2.7: at least 5 minutes), `listen.max_connections` clients at once;
- a message over `spool.max_message_size` is read to its end and discarded (552).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Session as SmtpState

from mxsend.config import Config
from mxsend.config_values import split_host_port
from mxsend.envelope import (
    Message,
    Recipient,
    envelope_of,
    parse_mail_command,
    parse_rcpt_command,
    serialise_bsmtp,
)
from mxsend.errors import ConfigError, EnvelopeError, SpoolError
from mxsend.hostname import helo_name
from mxsend.log import event, get_logger
from mxsend.spool import Durability, GroupCommit, Spool, new_queue_id

log = get_logger()

MAX_RECIPIENTS = 1000  # Postfix's smtpd_recipient_limit
COMMAND_LINE = 512  # RFC 5321 §4.5.3.1.4
MAIL_RCPT_LINE = 2048  # the same as envelope.MAX_COMMAND_LINE for spool files
# Commands per connection: a relay reuses connections (Postfix's connection cache), so
# the transaction commands get room for thousands of messages; the rest is junk.
COMMAND_BUDGET = {"MAIL": 10_000, "RCPT": 100_000, "DATA": 10_000, "RSET": 10_000,
                  "NOOP": 100, "*": 100}
REFUSED_COMMANDS = 10  # a refused client may send this many commands before we close
WRITE_THREADS = 32  # concurrent spool writes: each waits on a (shared) syncfs
CLOSE_GRACE = 10.0  # seconds close() waits for writes in flight before cutting clients

_HAS_ENHANCED = re.compile(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}(?: |$)")
# RFC 2034 / RFC 3463 codes for aiosmtpd's own replies, which come without one.
_ENHANCED_FOR = {"221": "2.0.0", "250": "2.0.0", "252": "2.0.0", "451": "4.3.0",
                 "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1",
                 "504": "5.5.4", "530": "5.7.0", "538": "5.7.11", "554": "5.7.0",
                 "555": "5.5.4"}


# --- pure decisions --------------------------------------------------------------------


def peer_allowed(peer: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
                 ) -> bool:
    """Is the client's address in one of `networks`? IPv4-mapped IPv6 counts as IPv4."""
    try:
        address = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def with_enhanced_code(reply: str) -> str:
    """Add an RFC 3463 code to a reply that has none (RFC 2034 §3: every reply but the
    greeting, EHLO's and 354 carries one once ENHANCEDSTATUSCODES is offered)."""
    code = reply[:3]
    if code in ("220", "354") or _HAS_ENHANCED.match(reply) or reply[3:4] != " ":
        return reply
    enhanced = _ENHANCED_FOR.get(code)
    return f"{code} {enhanced} {reply[4:]}" if enhanced else reply


def write_error_reply(error: BaseException) -> str:
    """The reply for a spool write that failed: a full disk is 452 4.3.1 (RFC 3463
    §3.4 "mail system full"), anything else a temporary 451."""
    cause = error.__cause__ if isinstance(error, SpoolError) else error
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return "452 4.3.1 Insufficient system storage"
    return "451 4.3.0 Local error in processing; try again later"


def printable(text: str, limit: int = 255) -> str:
    """Client-supplied text made safe for a header or a log line."""
    return "".join(c if 32 < ord(c) < 127 else "?" for c in text[:limit]) or "unknown"


def received_header(*, helo: str, peer: str, hostname: str, protocol: str, queue_id: str,
                    recipient: str | None, when: float) -> bytes:
    """The trace field a relay must prepend (RFC 5321 §4.4), as Postfix writes it."""
    stamp = format_datetime(datetime.fromtimestamp(when, UTC).astimezone())
    to = f"\r\n\tfor <{recipient}>" if recipient is not None else ""
    text = (f"Received: from {printable(helo)} ([{peer}])\r\n\tby {hostname} (mxsend) "
            f"with {protocol} id {queue_id}{to};\r\n\t{stamp}\r\n")
    return text.encode("utf-8", "surrogateescape")


def protocol_name(*, esmtp: bool, tls: bool, utf8: bool) -> str:
    """`with` of the Received field: RFC 3848 (ESMTPS) and RFC 6531 §3.7.3 (UTF8SMTPS)."""
    if utf8:
        return "UTF8SMTPS" if tls else "UTF8SMTP"
    if not esmtp:
        return "SMTP"
    return "ESMTPS" if tls else "ESMTP"


def spool_file(sender: str, mail: dict[str, object], recipients: tuple[Recipient, ...],
               trace: bytes, block: bytes) -> bytes:
    """The Batch SMTP file for one transaction. `block` is the DATA as received:
    dot-stuffed, CRLF lines, without the final `.` line."""
    envelope = envelope_of(sender, mail, recipients)
    if block.count(b"\n") == block.count(b"\r\n"):
        # Only CRLF line ends: the block is stuffed as the spool file wants it, so it
        # is written unchanged (no copy, no second pass).
        head = serialise_bsmtp(Message(envelope=envelope, data=b""))[:-3]  # without ".\r\n"
        return b"".join((head, trace, block, b".\r\n"))
    # A bare LF is a line end in a spool file: unstuff by SMTP's rule (dots after CRLF,
    # RFC 5321 §4.5.2) and let the serialiser stuff after every line end.
    data = block.replace(b"\r\n.", b"\r\n")
    data = data[1:] if data.startswith(b".") else data
    return serialise_bsmtp(Message(envelope=envelope, data=trace + data))


# --- the session -------------------------------------------------------------------------


class _Transaction:
    __slots__ = ("mail", "recipients", "sender")

    def __init__(self, sender: str, mail: dict[str, object]) -> None:
        self.sender = sender
        self.mail = mail
        self.recipients: list[Recipient] = []


class _Handler:
    """aiosmtpd's hook object: an unexpected error is logged, not shown to the client."""

    async def handle_exception(self, error: Exception) -> str:
        log.error("listener: unexpected error in an SMTP session", exc_info=error)
        return "451 4.3.0 Local error in processing"


class RelaySession(SMTP):
    """One client connection."""

    line_length_limit = MAIL_RCPT_LINE  # the reader's buffer limit for a command line

    def __init__(self, listener: Listener) -> None:
        super().__init__(
            _Handler(), data_size_limit=None, enable_SMTPUTF8=True,
            hostname=listener.hostname, ident="ESMTP mxsend", tls_context=listener.tls,
            timeout=listener.idle_timeout, command_call_limit=COMMAND_BUDGET,
            loop=listener.loop)
        self.listener = listener
        self.command_size_limits = _CommandSizes()
        self._transaction: _Transaction | None = None
        self._replies: list[bytes] = []

    # -- aiosmtpd's seams

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # the first call; STARTTLS calls it again
            self.listener.sessions.add(self)
        super().connection_made(transport)

    def eof_received(self) -> bool | None:
        # Exim (4.96) pipelines QUIT after the final "." and then half-closes. aiosmtpd
        # would cancel the session at the EOF, and the 250 for a message already in the
        # spool would never go out: the client would send it again. While whole commands
        # wait in the buffer, keep the session to answer them (RFC 2920 §3.1); QUIT then
        # closes it, and the idle timeout ends a client that sent no QUIT. Over TLS the
        # transport cannot stay half-open.
        reader: Any = self._reader
        if self._tls() or b"\n" not in reader._buffer:
            return super().eof_received()
        return True

    def connection_lost(self, error: Exception | None) -> None:
        self.listener.sessions.discard(self)
        super().connection_lost(error)

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()  # type: ignore[no-untyped-call]
        self._transaction = None

    async def push(self, status: str) -> None:  # type: ignore[override]
        # RFC 2920 §3.1: replies to a pipelined group go out together. While more
        # commands wait in the buffer, a reply is held; the last one sends them all
        # (a send per reply was the listener's largest cost).
        self._replies.append(with_enhanced_code(status).encode("utf-8", "surrogateescape"))
        reader: Any = self._reader
        # Held only while a whole command waits (a client sending a command in pieces
        # waits for nothing), never a reply before a change of state (220 to STARTTLS,
        # 221, 421: the connection is closed or switched right after).
        if (b"\n" in reader._buffer and status[:3] not in ("220", "221", "421")
                and len(self._replies) < 64):
            return
        await self._flush()

    async def _flush(self) -> None:
        if self._replies:
            self._replies.append(b"")
            self._writer.write(b"\r\n".join(self._replies))
            self._replies.clear()
            await self._writer.drain()

    async def _handle_client(self) -> None:
        peer = self._peer_ip()
        if not peer_allowed(peer, self.listener.networks):
            # RFC 5321 §3.1: refuse with 554 at the greeting and wait for QUIT.
            await self._refuse(f"554 5.7.1 {printable(peer)} is not in listen.networks")
            return
        if len(self.listener.sessions) > self.listener.max_connections:
            await self._refuse("421 4.7.0 Too many connections; try again later")
            return
        await super()._handle_client()

    async def _refuse(self, reply: str) -> None:
        await super().push(reply)
        with contextlib.suppress(Exception):
            for _ in range(REFUSED_COMMANDS):
                line = await asyncio.wait_for(self._reader.readline(), 30)
                if not line or line.strip().upper() == b"QUIT":
                    await super().push("221 2.0.0 Bye")
                    break
                await super().push(reply if reply.startswith("554") else
                                   "503 5.5.1 Bad sequence of commands")
        if self.transport is not None:
            self.transport.close()

    def _peer_ip(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else ""

    def state(self) -> SmtpState:
        # A method, not a property: aiosmtpd's __init__ reads every attribute.
        assert self.session is not None  # set at connection_made, before any command
        return self.session

    def _tls(self) -> bool:
        return self._tls_protocol is not None

    # -- commands

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 Syntax: EHLO hostname")
            return
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.state().extended_smtp = True
        self.state().host_name = hostname
        lines = [self.hostname, "PIPELINING", f"SIZE {self.listener.max_message_size}",
                 "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and not self._tls():
            lines.append("STARTTLS")
        if self._tls():
            lines.append("REQUIRETLS")  # RFC 8689 §4: offered on a TLS session
        text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
        self._replies.append(text[:-2].encode("ascii"))  # EHLO's lines carry no codes
        await self._flush()

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push("502 5.5.1 AUTH not offered")  # the networks are the access control

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if self._transaction is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        if not arg or arg[:5].upper() != "FROM:":
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            sender, mail = parse_mail_command(b"MAIL " + arg.encode("utf-8", "surrogateescape"))
        except EnvelopeError as exc:
            await self.push(_syntax_reply(exc))
            return
        if mail and not self.state().extended_smtp:
            await self.push("555 5.5.4 MAIL parameters need EHLO")
            return
        size = mail.get("size")
        if isinstance(size, int) and size > self.listener.max_message_size:
            # RFC 1870 §6.1: refuse at MAIL what will not fit.
            await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
            return
        self._transaction = _Transaction(sender, mail)
        await self.push("250 2.1.0 Ok")

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        transaction = self._transaction
        if transaction is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not arg or arg[:3].upper() != "TO:":
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        if len(transaction.recipients) >= MAX_RECIPIENTS:
            await self.push("452 4.5.3 Too many recipients")  # RFC 5321 §4.5.3.1.10
            return
        try:
            recipient = parse_rcpt_command(
                b"RCPT " + arg.encode("utf-8", "surrogateescape"),
                utf8=bool(transaction.mail.get("smtputf8")))
        except EnvelopeError as exc:
            await self.push(_syntax_reply(exc))
            return
        if (recipient.notify or recipient.orcpt) and not self.state().extended_smtp:
            await self.push("555 5.5.4 RCPT parameters need EHLO")
            return
        transaction.recipients.append(recipient)
        await self.push("250 2.1.5 Ok")

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        transaction = self._transaction
        if transaction is None or not transaction.recipients:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        block = await self._read_block(self.listener.max_message_size)
        self._set_post_data_state()
        if block is None:
            await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
            return
        await self.push(await self._store(transaction, block))

    async def _read_block(self, limit: int) -> bytes | None:
        """The DATA up to the `.` line (not included); None if it was over `limit`.

        Read in pieces ending in ".\\r\\n" rather than line by line: most messages come
        in a few pieces. The reader's buffer limit is raised for the DATA only (it is
        the command-line limit otherwise).
        """
        reader: Any = self._reader  # _limit is asyncio's, stable since 3.4, not public
        saved = reader._limit
        reader._limit = limit + 5
        buffer = bytearray(b"\r\n")  # the CRLF of the DATA line starts the first line
        too_big = False
        try:
            while not buffer.endswith(b"\r\n.\r\n"):
                try:
                    piece = await reader.readuntil(b".\r\n")
                except asyncio.LimitOverrunError as exc:
                    piece = await reader.readexactly(exc.consumed)
                self._reset_timeout()
                buffer += piece
                if len(buffer) > limit + 5:
                    too_big = True
                    del buffer[:-5]  # keep only what may start the end of data
        finally:
            reader._limit = saved
        return None if too_big else bytes(buffer[2:-3])

    async def _store(self, transaction: _Transaction, block: bytes) -> str:
        now = time.time()
        queue_id = new_queue_id(now)
        recipients = tuple(transaction.recipients)
        utf8 = bool(transaction.mail.get("smtputf8"))
        trace = received_header(
            helo=self.state().host_name or "", peer=self._peer_ip(),
            hostname=self.hostname, queue_id=queue_id, when=now,
            protocol=protocol_name(esmtp=self.state().extended_smtp, tls=self._tls(),
                                   utf8=utf8),
            recipient=recipients[0].address if len(recipients) == 1 else None)
        raw = spool_file(transaction.sender, transaction.mail, recipients, trace, block)
        if len(raw) > self.listener.max_message_size:
            # The spool refuses a file over the limit (bad/): refuse it here instead.
            return "552 5.3.4 Message size exceeds fixed maximum message size"
        try:
            await self.listener.write(raw, queue_id)
        except (SpoolError, OSError) as exc:
            log.warning("listener: cannot write %s to the spool: %s", queue_id, exc)
            return write_error_reply(exc)
        event("received", queue_id, client=self._peer_ip(),
              helo=printable(self.state().host_name or ""), sender=transaction.sender,
              recipients=[r.address for r in recipients], size=len(block), tls=self._tls())
        return f"250 2.0.0 Ok: queued as {queue_id}"


def _syntax_reply(error: EnvelopeError) -> str:
    reason = printable(str(error).removeprefix("line 1: "), 200).replace("?", " ")
    if "unknown" in reason and "parameter" in reason:
        return f"555 5.5.4 {reason}"  # RFC 5321 §4.1.1.11
    return f"501 5.5.4 {reason}"


class _CommandSizes(dict[str, int]):
    """aiosmtpd's per-command line limits, fixed: its own grow by 36 at every EHLO."""

    def __missing__(self, command: str) -> int:
        return MAIL_RCPT_LINE if command in ("MAIL", "RCPT") else COMMAND_LINE

    def __setitem__(self, command: str, value: int) -> None:
        pass  # EHLO's "+= 26" and "+= 10" have no effect


# --- the listener ------------------------------------------------------------------------


class Listener:
    """The listening socket, its sessions and its spool writer."""

    def __init__(self, config: Config, tls: ssl.SSLContext | None, durable: Durability,
                 loop: asyncio.AbstractEventLoop) -> None:
        listen = config.listen
        self.loop = loop
        self.tls = tls
        self.hostname = helo_name(config.smtp.helo_name)
        self.networks = listen.networks
        self.idle_timeout = listen.idle_timeout
        self.max_connections = listen.max_connections
        self.max_message_size = config.spool.max_message_size
        self.sessions: set[RelaySession] = set()
        self.server: asyncio.Server | None = None
        self._durable = durable
        self._spool = Spool.configured(config.spool, durable=durable)
        self._executor = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="listener")
        self._writes: set[asyncio.Future[str]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def write(self, raw: bytes, queue_id: str) -> None:
        """Durably into new/ (write, fsync, link, fsync of new/) before returning."""
        future = self.loop.run_in_executor(
            self._executor, lambda: self._spool.enqueue_bytes(raw, name=queue_id))
        self._writes.add(future)
        try:
            await asyncio.shield(future)
        finally:
            self._writes.discard(future)

    async def close(self) -> None:
        """Stop accepting; let writes in flight finish (their clients get their 250);
        then close every session."""
        if self.server is not None:
            self.server.close()
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=CLOSE_GRACE)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), CLOSE_GRACE)
        self._executor.shutdown(wait=False)
        if isinstance(self._durable, GroupCommit):
            self._durable.close()


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server context for STARTTLS, or None; ConfigError naming the key on failure."""
    listen = config.listen
    if listen.tls_cert is None or listen.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(listen.tls_cert, listen.tls_key)
    except FileNotFoundError as exc:
        raise ConfigError(f"listen.tls_cert: {exc.filename}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"listen.tls_cert: cannot load {listen.tls_cert} with "
                          f"{listen.tls_key}: {exc}") from None
    return context


async def start_listener(config: Config, *, durable: Durability | None = None) -> Listener:
    """Bind `listen.address` and serve; ConfigError for a bad certificate, OSError
    (with the key named) if the address cannot be bound."""
    host, port = split_host_port(config.listen.address, 0)
    tls = tls_context(config)
    for name in ("tmp", "new"):
        (config.spool.path / name).mkdir(parents=True, exist_ok=True)
    if durable is None:
        durable = GroupCommit(config.spool.path) if GroupCommit.available() else Durability()
    loop = asyncio.get_running_loop()
    listener = Listener(config, tls, durable, loop)
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd's per-command lines
    try:
        listener.server = await loop.create_server(
            lambda: RelaySession(listener), host, port, reuse_address=True)
    except OSError as exc:
        await listener.close()
        raise OSError(exc.errno, f"listen.address: cannot listen on "
                      f"{config.listen.address}: {exc.strerror}") from None
    log.info("listener: accepting mail on %s", config.listen.address)
    return listener


__all__ = ["Listener", "RelaySession", "start_listener"]

