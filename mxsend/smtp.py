"""One SMTP connection and its transactions, over aiosmtplib (RFC 5321, 3207, 1870,
3461, 6152, 6531).

This is the only module that sees aiosmtplib's and ssl's exceptions: `_translate` maps
them, and OSError, to TemporaryFailure/PermanentFailure carrying code, DSN code, phase
and host. Everything that decides is a value or a pure function; this module does the
I/O in the order RFC 5321 §3.3 and §4.5.3.2 prescribe, with the script's per-phase
timeouts.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import aiosmtplib
from aiosmtplib.errors import (
    SMTPConnectError,
    SMTPConnectTimeoutError,
    SMTPException,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from mxsend.actions import ServerActions
from mxsend.config import IpNetwork
from mxsend.destination import Destination, refusal
from mxsend.envelope import Envelope, Recipient, dot_stuff, validate_mailbox, xtext_encode
from mxsend.errors import (
    DeliveryError,
    DestinationRefused,
    EnvelopeError,
    PermanentFailure,
    Phase,
    TemporaryFailure,
)
from mxsend.reply import MAX_REPLY_BUFFER, MAX_REPLY_TEXT, Reply, parse_reply, take_reply
from mxsend.tls import CertificateCheckFailed, check_certificate, client_context

# Data is written in blocks so that the §4.5.3.2.5 data-block timeout means something:
# each block must drain into the socket within `datablock` seconds.
DATA_BLOCK = 256 * 1024


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What the config says about every connection."""

    helo_name: str  # the default when the script leaves HELOname empty
    source_address: str = ""
    ca_file: Path | None = None
    allowed_destinations: tuple[IpNetwork, ...] = ()  # contract §10


@dataclass(frozen=True, slots=True)
class Transaction:
    """What one MAIL..DATA sends; `return_path` is final (modifier and BATV applied)."""

    envelope: Envelope
    return_path: str
    recipients: tuple[Recipient, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """How far one transaction got. See outcome.transaction_outcomes."""

    rcpt_replies: tuple[tuple[str, Reply], ...]
    final: Reply | DeliveryError | None  # DATA or end-of-data reply, or what ended it
    final_phase: Phase
    relayed: frozenset[str]  # NOTIFY=SUCCESS recipients whose server lacks DSN
    eight_bit_unadvertised: bool


class HandshakeFailed(TemporaryFailure):
    """The TLS handshake after STARTTLS failed; plaintext may be retried (contract §4)."""


# --- pure decisions ---------------------------------------------------------------------


def has_8bit(data: bytes) -> bool:
    return not data.isascii()


def needs_smtputf8(envelope: Envelope, return_path: str, recipients: Sequence[Recipient]) -> bool:
    """RFC 6531 §3.4: needed when asked for or any address is not ASCII."""
    return envelope.smtputf8 or not return_path.isascii() or not all(
        r.address.isascii() for r in recipients
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x1f\x7f\s]")


def check_wire_text(value: str, what: str, *, spaces: bool = True) -> str:
    """Nothing with CR, LF or other controls reaches a command line (style §10)."""
    if (_CONTROL if spaces else _CONTROL_OR_SPACE).search(value):
        raise TemporaryFailure(
            f"{what} contains a control character: {value!r}", dsn="4.3.5", phase=Phase.MAIL,
        )
    return value


def choose_helo(actions: ServerActions, settings: ClientSettings) -> str:
    name = actions.helo_name.strip() or settings.helo_name
    check_wire_text(name, "HELOname", spaces=False)
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise TemporaryFailure(
                f"HELOname is not a valid host name: {name!r}", dsn="4.3.5", phase=Phase.EHLO
            ) from None
    return name


def choose_return_path(sender: str, actions: ServerActions) -> str:
    """returnAddressModifier: 0 as queued, 1 defaultReturnAddress, 2 nullReturnAddress."""
    if actions.return_address_modifier == 1:
        chosen = actions.default_return_address.strip()
    elif actions.return_address_modifier == 2:
        chosen = actions.null_return_address.strip()
    else:
        return sender
    if chosen.startswith("<") and chosen.endswith(">"):
        chosen = chosen[1:-1]
    if chosen:
        check_wire_text(chosen, "return address")
        try:
            validate_mailbox(chosen, utf8=True)
        except EnvelopeError as exc:
            raise TemporaryFailure(
                f"return address from the script is not valid: {exc}", dsn="4.3.5",
                phase=Phase.MAIL,
            ) from None
    return chosen


def mail_params(
    tx: Transaction, extensions: dict[str, str], *, allow_dsn: bool, smtputf8: bool
) -> list[str]:
    """MAIL FROM parameters for what this server offers."""
    params: list[str] = []
    env = tx.envelope
    if "size" in extensions:
        params.append(f"SIZE={len(tx.data)}")  # RFC 1870 §6
    if "8bitmime" in extensions:
        if env.body:
            params.append(f"BODY={env.body}")
        elif has_8bit(tx.data):
            params.append("BODY=8BITMIME")  # RFC 6152 §3
    if smtputf8:
        params.append("SMTPUTF8")
    if allow_dsn and "dsn" in extensions:
        if env.ret:
            params.append(f"RET={env.ret}")
        if env.envid:
            params.append(f"ENVID={env.envid}")
    # AUTH= (RFC 4954 §5) is never sent: we do not authenticate to MX hosts, and an
    # unauthenticated client has no identity to vouch for.
    return params


def rcpt_params(recipient: Recipient, extensions: dict[str, str], *, allow_dsn: bool) -> list[str]:
    params: list[str] = []
    if allow_dsn and "dsn" in extensions:
        if recipient.notify:
            params.append("NOTIFY=" + ",".join(recipient.notify))
        if recipient.orcpt:
            params.append(f"ORCPT={recipient.orcpt}")
        elif recipient.notify is not None:
            # RFC 3461 §4.2: ORCPT is the address as the client received it.
            params.append("ORCPT=rfc822;" + xtext_encode(recipient.address))
    return params


def advertised_size(extensions: dict[str, str]) -> int | None:
    """RFC 1870 §4: `SIZE n`; 0 or no number means no fixed limit."""
    value = extensions.get("size")
    if value is None:
        return None
    text = value.strip().split(" ")[0]
    return int(text) if text.isdigit() and int(text) > 0 else None


# --- translating foreign exceptions (the one place) ------------------------------------


def _reply(exc: SMTPResponseException) -> Reply:
    return parse_reply(exc.code, exc.message[:MAX_REPLY_TEXT])


def failure_from_reply(reply: Reply, phase: Phase, host: str) -> DeliveryError:
    cls = PermanentFailure if reply.permanent else TemporaryFailure
    dsn = reply.dsn if reply.permanent or reply.transient else "4.5.0"
    return cls(str(reply), code=reply.code, dsn=dsn, phase=phase, host=host)


def _translate(exc: BaseException, phase: Phase, host: str) -> DeliveryError:
    """aiosmtplib, ssl and OSError exceptions -> our failures. Everything ends here."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, SMTPResponseException) and exc.code > 0:
        return failure_from_reply(_reply(exc), phase, host)
    if isinstance(exc, SMTPConnectTimeoutError) or (
        isinstance(exc, TimeoutError | SMTPTimeoutError) and phase is Phase.CONNECT
    ):
        return TemporaryFailure(f"timed out ({phase.value})", dsn="4.4.1", phase=phase, host=host)
    if isinstance(exc, TimeoutError | SMTPTimeoutError):
        return TemporaryFailure(f"timed out ({phase.value})", dsn="4.4.2", phase=phase, host=host)
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return TemporaryFailure(
            f"TLS failure: {exc}", dsn="4.7.5", phase=Phase.STARTTLS, host=host
        )
    if isinstance(exc, SMTPConnectError) or (
        isinstance(exc, OSError) and phase is Phase.CONNECT
    ):
        return TemporaryFailure(
            f"cannot connect: {_cause(exc)}", dsn="4.4.1", phase=phase, host=host
        )
    if isinstance(exc, SMTPServerDisconnected | ConnectionError | EOFError):
        return TemporaryFailure(
            f"connection lost ({phase.value})", dsn="4.4.2", phase=phase, host=host
        )
    if isinstance(exc, OSError):
        return TemporaryFailure(
            f"network error: {_cause(exc)}", dsn="4.4.2", phase=phase, host=host
        )
    if isinstance(exc, SMTPException | ValueError):
        return TemporaryFailure(
            f"protocol error ({phase.value}): {exc}", dsn="4.5.0", phase=phase, host=host
        )
    return TemporaryFailure(
        f"unexpected error ({phase.value}): {exc!r}", dsn="4.0.0", phase=phase, host=host
    )


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    return str(inner) or type(inner).__name__


@contextmanager
def _phase(phase: Phase, host: str) -> Iterator[None]:
    try:
        yield
    except DeliveryError:
        raise
    except asyncio.CancelledError:
        raise
    except (SMTPException, OSError, ssl.SSLError, ValueError, EOFError, TimeoutError) as exc:
        raise _translate(exc, phase, host) from exc


# --- the session after the handshake ---------------------------------------------------


class _Wire(asyncio.Protocol):
    """The transport's protocol once the handshake is over: commands out, replies in order.

    aiosmtplib reads one reply per command written and drops what arrives unasked, so it
    cannot pipeline (RFC 2920). After the greeting, EHLO and STARTTLS, which it does
    well, the session's transport is handed to this protocol: replies are parsed as
    they arrive and queued, and a reader takes them in the order the commands went
    out. Failures surface as the built-in exceptions `_translate` already maps:
    ConnectionResetError (lost), TimeoutError, ValueError (a malformed reply).
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._replies: deque[tuple[int, str]] = deque()
        self._expected = 0  # replies owed for commands written and not yet answered
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._drained: asyncio.Future[None] | None = None  # set while writing is paused
        transport.set_protocol(self)

    @property
    def alive(self) -> bool:
        return self._error is None and not self._transport.is_closing()

    def write(self, data: bytes, replies: int) -> None:
        """Send `data`, which asks for `replies` replies."""
        if not self.alive:
            raise self._error or ConnectionResetError("connection lost")
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

    def close(self) -> None:
        self._fail(ConnectionResetError("connection closed"))
        self._transport.close()

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while True:
            try:
                reply = take_reply(buffer)
            except ValueError as exc:
                self._fail(exc)
                self._transport.abort()
                return
            if reply is None:
                break
            if self._expected == 0:
                # Unasked (say, a 421 before an idle timeout, RFC 5321 §4.2.1): the
                # server is leaving; the session is not reused.
                self._fail(ConnectionResetError(f"unsolicited reply: {reply[0]} {reply[1]}"))
                self._transport.close()
                return
            self._expected -= 1
            self._replies.append(reply)
        if len(buffer) > MAX_REPLY_BUFFER:
            self._fail(ValueError("reply too long"))
            self._transport.abort()
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

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("timed out waiting for a reply"))


# --- the connection ----------------------------------------------------------------------


class SmtpConnection:
    """One open SMTP session, after greeting, EHLO and (maybe) STARTTLS."""

    def __init__(
        self,
        client: aiosmtplib.SMTP,
        destination: Destination,
        actions: ServerActions,
        *,
        tls_version: str | None,
        connid: int,
    ) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance here.
        transport = cast(asyncio.Transport | None, client.transport)
        if transport is None or transport.is_closing():
            raise TemporaryFailure("connection lost (ehlo)", dsn="4.4.2", phase=Phase.EHLO,
                                   host=destination.name)
        self.extensions: dict[str, str] = dict(client.esmtp_extensions)
        # From here on the session is ours (see _Wire); aiosmtplib's part is done.
        self._wire = _Wire(transport)
        self.pipelining = "pipelining" in self.extensions
        self.destination = destination
        self.actions = actions
        self.tls_version = tls_version
        self.connid = connid
        self.transactions = 0
        self.last_used = time.monotonic()

    @property
    def alive(self) -> bool:
        return self._wire.alive

    @classmethod
    async def open(
        cls,
        destination: Destination,
        actions: ServerActions,
        settings: ClientSettings,
        *,
        connid: int = 0,
        allow_tls: bool = True,
    ) -> SmtpConnection:
        """Connect, read the greeting, EHLO/HELO and STARTTLS as the actions say.

        Raises DeliveryError; HandshakeFailed when a plaintext retry is allowed.
        """
        host = destination.name
        timeouts = actions.timeouts
        helo = choose_helo(actions, settings)
        refused = refusal(destination.ip, settings.allowed_destinations)
        if refused is not None:
            # RFC 3463 §3.8: X.7.0, other security status: a policy, not the network.
            raise DestinationRefused(refused, dsn="4.7.0", phase=Phase.CONNECT, host=host)
        with _phase(Phase.CONNECT, host):
            sock = await _connect_socket(destination, settings.source_address, timeouts.connect)
        client = aiosmtplib.SMTP(local_hostname=helo, timeout=timeouts.greeting)
        try:
            with _phase(Phase.GREETING, host):
                await client.connect(sock=sock, start_tls=False, timeout=timeouts.greeting)
            await _hello(client, actions, helo, host)
            tls_version: str | None = None
            if allow_tls and (actions.try_tls or actions.requires_tls):
                tls_version = await _starttls(client, destination, actions, settings, helo)
            elif actions.requires_tls:
                raise TemporaryFailure(
                    "TLS required but not attempted", dsn="4.7.4", phase=Phase.STARTTLS,
                    host=host,
                )
            return cls(client, destination, actions, tls_version=tls_version, connid=connid)
        except BaseException:
            client.close()
            sock.close()
            raise

    async def send(self, tx: Transaction, *,
                   before_end_of_data: Awaitable[None] | None = None) -> TransactionResult:
        """MAIL, RCPT per recipient, DATA; pipelined (RFC 2920) when the server offers it.

        `before_end_of_data` is awaited after the message and before its final `.`, the
        point past which the server may accept it: the delivery layer passes the
        previous message's "recorded" so that a connection never has two accepted
        messages unrecorded (contract §1). The wait is bounded by the data-block
        timeout; past it the connection is closed, the transaction left unfinished.

        Raises DeliveryError when the whole transaction failed before any RCPT was
        answered (MAIL refused, SIZE, SMTPUTF8, lost).
        """
        self.last_used = time.monotonic()
        self.transactions += 1
        host = self.destination.name
        extensions = self.extensions
        limit = advertised_size(extensions)
        if limit is not None and len(tx.data) > limit:
            raise PermanentFailure(
                f"message of {len(tx.data)} bytes exceeds the server's SIZE {limit}",
                code=552, dsn="5.3.4", phase=Phase.MAIL, host=host,
            )
        utf8 = needs_smtputf8(tx.envelope, tx.return_path, tx.recipients)
        if utf8 and "smtputf8" not in extensions:
            raise PermanentFailure(
                "the message needs SMTPUTF8 and the server does not offer it",
                code=553, dsn="5.6.7", phase=Phase.MAIL, host=host,
            )
        check_wire_text(tx.return_path, "return address")
        allow_dsn = self.actions.allow_dsn
        encoding = "utf-8" if utf8 else "ascii"
        params = mail_params(tx, extensions, allow_dsn=allow_dsn, smtputf8=utf8)
        mail = _command_line(f"MAIL FROM:<{tx.return_path}>", params, encoding)
        rcpts: list[bytes] = []
        unsendable: DeliveryError | None = None
        for recipient in tx.recipients:
            try:
                check_wire_text(recipient.address, "recipient")
            except DeliveryError as exc:
                unsendable = exc  # the recipients before it are still asked
                break
            rparams = rcpt_params(recipient, extensions, allow_dsn=allow_dsn)
            rcpts.append(_command_line(f"TO:<{recipient.address}>", rparams, encoding,
                                       verb="RCPT "))
        if not rcpts and unsendable is not None:
            raise unsendable
        if self.pipelining:
            return await self._pipelined(tx, mail, rcpts, unsendable, before_end_of_data)
        return await self._lockstep(tx, mail, rcpts, unsendable, before_end_of_data)

    async def _pipelined(self, tx: Transaction, mail: bytes, rcpts: list[bytes],
                         unsendable: DeliveryError | None,
                         before_end: Awaitable[None] | None) -> TransactionResult:
        """RFC 2920 §3.1: MAIL, every RCPT and DATA in one write, then every reply, in
        order; DATA goes only when all the recipients are sendable."""
        host = self.destination.name
        timeouts = self.actions.timeouts
        with_data = unsendable is None
        group = [mail, *rcpts, b"DATA\r\n"] if with_data else [mail, *rcpts]
        with _phase(Phase.MAIL, host):
            self._wire.write(b"".join(group), len(group))
        first = await self._reply(Phase.MAIL, timeouts.mail)
        replies: list[tuple[str, Reply]] = []
        accepted = 0
        try:
            for recipient in tx.recipients[:len(rcpts)]:
                reply = await self._reply(Phase.RCPT, timeouts.rcpt)
                replies.append((recipient.address, reply))
                if reply.positive:
                    accepted += 1
                if reply.code == 421:
                    # RFC 5321 §3.8: the server is closing; nothing more will come.
                    self.close()
                    if not first.positive:
                        raise failure_from_reply(first, Phase.MAIL, host)
                    return self._result(replies, failure_from_reply(reply, Phase.RCPT, host),
                                        Phase.RCPT, tx)
            start = await self._reply(Phase.DATA, timeouts.data) if with_data else None
        except DeliveryError as exc:
            if not first.positive:
                raise failure_from_reply(first, Phase.MAIL, host) from None
            if not replies:
                raise
            return self._result(replies, exc, exc.phase or Phase.RCPT, tx)
        if start is not None and start.code == 354 and not (first.positive and accepted):
            # RFC 2920 §3.1: DATA was accepted although nothing can be sent; a lone dot
            # ends the empty transaction (its reply does not matter).
            await self._abandon_data()
        if not first.positive:
            raise failure_from_reply(first, Phase.MAIL, host)
        if unsendable is not None:
            return self._result(replies, unsendable, Phase.RCPT, tx)
        if not accepted:
            return self._result(replies, None, Phase.RCPT, tx)
        assert start is not None
        return await self._after_data(tx, replies, start, before_end)

    async def _lockstep(self, tx: Transaction, mail: bytes, rcpts: list[bytes],
                        unsendable: DeliveryError | None,
                        before_end: Awaitable[None] | None) -> TransactionResult:
        """Without PIPELINING: each command waits for the reply to the one before."""
        host = self.destination.name
        timeouts = self.actions.timeouts
        first = await self._command(Phase.MAIL, timeouts.mail, mail)
        if not first.positive:
            raise failure_from_reply(first, Phase.MAIL, host)
        replies: list[tuple[str, Reply]] = []
        accepted = 0
        try:
            for recipient, line in zip(tx.recipients, rcpts, strict=False):
                reply = await self._command(Phase.RCPT, timeouts.rcpt, line)
                replies.append((recipient.address, reply))
                if reply.positive:
                    accepted += 1
                if reply.code == 421:
                    # RFC 5321 §3.8: the server is closing; the rest are not asked.
                    return self._result(replies, failure_from_reply(reply, Phase.RCPT, host),
                                        Phase.RCPT, tx)
        except DeliveryError as exc:
            if not replies:
                raise
            return self._result(replies, exc, exc.phase or Phase.RCPT, tx)
        if unsendable is not None:
            return self._result(replies, unsendable, Phase.RCPT, tx)
        if not accepted:
            return self._result(replies, None, Phase.RCPT, tx)
        try:
            start = await self._command(Phase.DATA, timeouts.data, b"DATA\r\n")
        except DeliveryError as exc:
            return self._result(replies, exc, exc.phase or Phase.DATA, tx)
        return await self._after_data(tx, replies, start, before_end)

    async def _after_data(self, tx: Transaction, replies: list[tuple[str, Reply]],
                          start: Reply, before_end: Awaitable[None] | None
                          ) -> TransactionResult:
        """The reply to DATA is in: send the message if it was 354."""
        if start.code != 354:
            if start.positive:
                start = Reply(start.code, start.message, None)
                error = TemporaryFailure(f"unexpected reply to DATA: {start}",
                                         code=start.code, dsn="4.5.0", phase=Phase.DATA,
                                         host=self.destination.name)
                return self._result(replies, error, Phase.DATA, tx)
            return self._result(replies, start, Phase.DATA, tx)
        try:
            final = await self._send_data(tx.data, before_end)
        except DeliveryError as exc:
            return self._result(replies, exc, exc.phase or Phase.DATA, tx)
        return self._result(replies, final, Phase.DATAEND, tx)

    async def _abandon_data(self) -> None:
        try:
            await self._command(Phase.DATAEND, self.actions.timeouts.dataend, b".\r\n")
        except DeliveryError:
            self.close()

    def _result(
        self, replies: list[tuple[str, Reply]], final: Reply | DeliveryError | None,
        phase: Phase, tx: Transaction,
    ) -> TransactionResult:
        offered = self.actions.allow_dsn and "dsn" in self.extensions
        relayed = frozenset(
            r.address for r in tx.recipients
            if not offered and r.notify is not None and "SUCCESS" in r.notify
        )
        eight_bit = "8bitmime" not in self.extensions and (
            has_8bit(tx.data) or tx.envelope.body == "8BITMIME"
        )
        return TransactionResult(
            rcpt_replies=tuple(replies), final=final, final_phase=phase, relayed=relayed,
            eight_bit_unadvertised=eight_bit,
        )

    async def _command(self, phase: Phase, seconds: float, line: bytes) -> Reply:
        with _phase(phase, self.destination.name):
            self._wire.write(line, 1)
        return await self._reply(phase, seconds)

    async def _reply(self, phase: Phase, seconds: float) -> Reply:
        # Not `with _phase(...)`: this runs for every reply, and a generator-based
        # context manager per call showed in profiles; the mapping is the same.
        try:
            code, text = await self._wire.read(seconds)
        except (OSError, ValueError, TimeoutError) as exc:
            # Out of step with the server (a reply late, missing or garbled): never
            # reused.
            self.close()
            raise _translate(exc, phase, self.destination.name) from exc
        return parse_reply(code, text[:MAX_REPLY_TEXT])

    async def _send_data(self, data: bytes, before_end: Awaitable[None] | None) -> Reply:
        """The message, dot-stuffed (RFC 5321 §4.5.2), then `.`, then the final reply.

        The spool already gives CRLF lines, so the bytes go out as they are. The final
        `.` goes in the same write as the last block unless `before_end` must be awaited
        first.
        """
        timeouts = self.actions.timeouts
        host = self.destination.name
        waiting = before_end is not None and not _done(before_end)
        payload = dot_stuff(data) + (b"" if waiting else b".\r\n")
        offsets = range(0, len(payload), DATA_BLOCK)
        with _phase(Phase.DATA, host):
            for offset in offsets[:-1]:
                self._wire.write(payload[offset:offset + DATA_BLOCK], 0)
                # Each block must drain within the data-block timeout (§4.5.3.2.5).
                await self._wire.drain(timeouts.datablock)
            last = payload[offsets[-1]:] if offsets else b""
            if not waiting:
                self._wire.write(last, 1)
                return await self._reply(Phase.DATAEND, timeouts.dataend)
            self._wire.write(last, 0)
        assert before_end is not None
        # The server waits for more data meanwhile; the data-block timeout bounds the
        # pause as it bounds any other stretch without progress (§4.5.3.2.5).
        waiter = asyncio.ensure_future(before_end)
        done, _ = await asyncio.wait({waiter}, timeout=timeouts.datablock)
        if not done:
            if waiter is not before_end:
                waiter.cancel()  # our own task around a coroutine; a Future is the caller's
            self.close()  # the server discards the unfinished transaction
            raise TemporaryFailure(
                "the previous message on this connection was not recorded in time",
                dsn="4.4.2", phase=Phase.DATA, host=host)
        with _phase(Phase.DATA, host):
            self._wire.write(b".\r\n", 1)
        return await self._reply(Phase.DATAEND, timeouts.dataend)

    async def reset(self) -> bool:
        """RSET (RFC 5321 §4.1.1.5) before reuse; False if the session is not usable."""
        if not self.alive:
            return False
        try:
            reply = await self._command(Phase.MAIL, self.actions.timeouts.mail, b"RSET\r\n")
        except DeliveryError:
            self.close()
            return False
        if not reply.positive:
            self.close()
            return False
        self.last_used = time.monotonic()
        return True

    async def quit(self) -> None:
        """QUIT politely (RFC 5321 §4.1.1.10), never waiting long."""
        if self.alive:
            with suppress(DeliveryError):
                await self._command(Phase.MAIL, 5.0, b"QUIT\r\n")
        self.close()

    def close(self) -> None:
        self._wire.close()


def _done(awaitable: Awaitable[None]) -> bool:
    return isinstance(awaitable, asyncio.Future) and awaitable.done()


def _command_line(text: str, params: Sequence[str], encoding: str, verb: str = "") -> bytes:
    """One command line; `text` was checked by check_wire_text, params are ours."""
    return (verb + " ".join([text, *params]) + "\r\n").encode(encoding)


async def _connect_socket(destination: Destination, source: str, seconds: float) -> socket.socket:
    """A connected non-blocking TCP socket, bound to `smtp.source_address` if set."""
    family = socket.AF_INET6 if ":" in destination.ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source:
            source_is_v6 = ":" in source
            if source_is_v6 == (family == socket.AF_INET6):
                sock.bind((source, 0))
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (destination.ip, destination.port)), seconds)
    except BaseException:
        sock.close()
        raise
    return sock


async def _hello(client: aiosmtplib.SMTP, actions: ServerActions, helo: str, host: str) -> None:
    """EHLO, or HELO if tryESMTP is off or EHLO is refused (RFC 5321 §3.2)."""
    timeout = actions.timeouts.ehlo
    if actions.try_esmtp:
        with _phase(Phase.EHLO, host):
            response = await client.execute_command(b"EHLO", helo.encode("ascii"),
                                                    timeout=timeout)
        if response.code == 250:
            client.last_ehlo_response = response
            return
        if response.code == 421 or not client.is_connected:
            raise failure_from_reply(parse_reply(response.code, response.message), Phase.EHLO,
                                     host)
    with _phase(Phase.EHLO, host):
        response = await client.execute_command(b"HELO", helo.encode("ascii"), timeout=timeout)
    if response.code != 250:
        raise failure_from_reply(parse_reply(response.code, response.message), Phase.EHLO, host)
    client.last_helo_response = response


async def _starttls(
    client: aiosmtplib.SMTP,
    destination: Destination,
    actions: ServerActions,
    settings: ClientSettings,
    helo: str,
) -> str | None:
    """STARTTLS when offered; returns the TLS version or None for plaintext."""
    host = destination.name
    required = actions.requires_tls
    if not client.supports_extension("starttls"):
        if required:
            raise TemporaryFailure("TLS required but the server does not offer STARTTLS",
                                   dsn="4.7.4", phase=Phase.STARTTLS, host=host)
        return None
    context = client_context(actions.verify_cert, settings.ca_file)
    server_name = None if host.startswith("[") else host
    try:
        await client.starttls(tls_context=context, server_hostname=server_name,
                              timeout=actions.timeouts.starttls)
    except SMTPResponseException as exc:
        if exc.code > 0 and client.is_connected and not required:
            # RFC 3207 §4: the server declined (454); carry on in plaintext.
            return None
        failure = _translate(exc, Phase.STARTTLS, host)
        raise _tls_failure(failure.message, failure.code, required, host) from exc
    except (SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
        raise _tls_failure(f"TLS handshake failed: {_cause(exc)}", None, required,
                           host) from exc
    ssl_object = client.get_transport_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    try:
        check_certificate(der, name=actions.check_cert_name,
                          thumbprint=actions.check_cert_thumbprint)
    except CertificateCheckFailed as exc:
        # Nothing is sent on this connection (contract §4); QUIT over TLS is harmless.
        raise TemporaryFailure(str(exc), dsn="4.7.5", phase=Phase.STARTTLS,
                               host=host) from None
    # RFC 3207 §4.2: forget what was learnt before TLS and say EHLO again.
    await _hello(client, actions, helo, host)
    version = ssl_object.version() if ssl_object is not None else None
    return str(version) if version else "TLS"


def _tls_failure(message: str, code: int | None, required: bool, host: str) -> DeliveryError:
    if required:
        return TemporaryFailure(f"TLS required: {message}", code=code, dsn="4.7.5",
                                phase=Phase.STARTTLS, host=host)
    return HandshakeFailed(message, code=code, dsn="4.7.5", phase=Phase.STARTTLS, host=host)
