"""One SMTP session and its transactions (RFC 5321, 3207, 2920, 1870, 3461, 6152, 6531).

The session is ours from the greeting to QUIT: one `wire.Wire` protocol per connection,
one reply parser (`reply.take_reply`), STARTTLS as a transport swap under the same
protocol. aiosmtplib serves where it is good and cannot get in the way: its ESMTP
extension parser reads EHLO replies. (Its SMTP class reads one reply per command, so
it cannot pipeline; handing its transport over after the handshake left two parsers on
one connection. docs/architecture.md, "One SMTP path".)

Every transaction takes one path: MAIL, each RCPT, DATA as one group, written at once
when the server offers PIPELINING (RFC 2920 §3.1) or one command per reply when it does
not, and the replies read in order either way.

This is the only module that sees ssl's exceptions and the wire's OSErrors: `_translate`
maps them to TemporaryFailure/PermanentFailure carrying code, DSN code, phase and host.
What decides is in smtp_rules.py (pure); this module does the I/O in the order RFC
5321 §3.3 and §4.5.3.2 prescribe, with the script's per-phase timeouts.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime

from aiosmtplib.esmtp import parse_esmtp_extensions

from mxsend import dane as dane_checks
from mxsend import metrics
from mxsend.actions import ServerActions
from mxsend.destination import Destination, refusal
from mxsend.envelope import dot_stuff
from mxsend.errors import (
    DeliveryError,
    DestinationRefused,
    PermanentFailure,
    Phase,
    TemporaryFailure,
)
from mxsend.hooks import command_of
from mxsend.reply import Reply, parse_reply
from mxsend.smtp_rules import (
    ClientSettings,
    Transaction,
    advertised_size,
    check_wire_text,
    choose_helo,
    has_8bit,
    mail_params,
    needs_smtputf8,
    rcpt_params,
)
from mxsend.tls import (
    CertificateCheckFailed,
    TlsFailure,
    check_certificate,
    client_context,
    handshake_result_type,
)
from mxsend.transcript import tap
from mxsend.wire import Wire

# VPOP3 8.8's ReturnCodeHandler (contract §9): (LastCommand, code, text) -> a
# replacement (code, text) or None. Called with every reply, before anything reads it.
ReplyHook = Callable[[str, int, str], Awaitable[tuple[int, str] | None]]

# Data is written in blocks so that the §4.5.3.2.5 data-block timeout means something:
# each block must drain into the socket within `datablock` seconds.
DATA_BLOCK = 256 * 1024
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"  # RFC 8460 §4.3.1


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


# --- translating foreign exceptions (the one place) ------------------------------------


def failure_from_reply(reply: Reply, phase: Phase, host: str) -> DeliveryError:
    cls = PermanentFailure if reply.permanent else TemporaryFailure
    dsn = reply.dsn if reply.permanent or reply.transient else "4.5.0"
    return cls(str(reply), code=reply.code, dsn=dsn, phase=phase, host=host)


def _translate(exc: BaseException, phase: Phase, host: str) -> DeliveryError:
    """ssl, OSError and the wire's built-in exceptions -> our failures."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, TimeoutError):
        dsn = "4.4.1" if phase is Phase.CONNECT else "4.4.2"
        return TemporaryFailure(f"timed out ({phase.value})", dsn=dsn, phase=phase, host=host)
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return TemporaryFailure(
            f"TLS failure: {exc}", dsn="4.7.5", phase=Phase.STARTTLS, host=host
        )
    if isinstance(exc, OSError) and phase is Phase.CONNECT:
        return TemporaryFailure(
            f"cannot connect: {_cause(exc)}", dsn="4.4.1", phase=phase, host=host
        )
    if isinstance(exc, ConnectionError | EOFError):
        return TemporaryFailure(
            f"connection lost ({phase.value})", dsn="4.4.2", phase=phase, host=host
        )
    if isinstance(exc, OSError):
        return TemporaryFailure(
            f"network error: {_cause(exc)}", dsn="4.4.2", phase=phase, host=host
        )
    if isinstance(exc, ValueError):
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
    except (OSError, ssl.SSLError, ValueError, EOFError, TimeoutError) as exc:
        raise _translate(exc, phase, host) from exc


# --- the connection ----------------------------------------------------------------------


class SmtpConnection:
    """One open SMTP session, after greeting, EHLO and (maybe) STARTTLS."""

    def __init__(self, wire: Wire, destination: Destination, actions: ServerActions, *,
                 extensions: dict[str, str], tls_version: str | None, connid: int) -> None:
        self._wire = wire
        self.extensions = extensions
        self.pipelining = "pipelining" in extensions
        self.destination = destination
        self.actions = actions
        self.tls_version = tls_version
        # For the `delivery` event (contract §10): the cipher, and whether the
        # certificate was verified, as Postfix's "Verified TLS connection": the chain
        # (verifyCert: CERT_REQUIRED against smtp.ca_file or the store) or a pinned
        # thumbprint that matched (checked before we got here). A name alone
        # (checkCertName) on an unverified chain proves nothing.
        self.tls_cipher: str | None = None
        self.verified = False
        if tls_version is not None:
            ssl_object = wire.extra("ssl_object")
            if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
                cipher = ssl_object.cipher()
                self.tls_cipher = cipher[0] if cipher else None
                self.verified = (ssl_object.context.verify_mode == ssl.CERT_REQUIRED
                                 or bool(actions.check_cert_thumbprint))
        self.connid = connid
        self.dane_verified = False  # the chain was authenticated by TLSA records
        self.transactions = 0
        self.last_used = time.monotonic()
        self.reply_hook: ReplyHook | None = None  # set per transaction by the deliverer
        self._counted = True
        metrics.connection_opened()
        if tls_version is not None:
            metrics.tls_session(tls_version)
        # Replies of a pipelined group read ahead and already through the hook, in
        # order; a DeliveryError stands where reading failed (_read_group).
        self._ahead: deque[Reply | DeliveryError] = deque()

    @property
    def alive(self) -> bool:
        return self._wire.alive

    def peer_certificates(self) -> list[bytes]:
        """The chain the server presented, leaf first (DER); [] in plaintext."""
        ssl_object = self._wire.extra("ssl_object") if self.tls_version else None
        return dane_checks.peer_chain(ssl_object) if ssl_object is not None else []

    @classmethod
    async def open(
        cls,
        destination: Destination,
        actions: ServerActions,
        settings: ClientSettings,
        *,
        connid: int = 0,
        allow_tls: bool = True,
        reply_hook: ReplyHook | None = None,
        dane: dane_checks.DanePolicy | None = None,
    ) -> SmtpConnection:
        """Connect, read the greeting, EHLO/HELO and STARTTLS as the actions say.

        `dane`: with usable TLSA records (REQUIRED), the presented chain must match
        them (RFC 7672 §3), whatever the actions say about the CA store.

        Raises DeliveryError; DestinationRefused before connecting to an address that
        contract §10 keeps out; HandshakeFailed when a plaintext retry is allowed;
        TlsFailure when required TLS failed.
        """
        dane_required = dane is not None and dane.tls_required
        host = destination.name
        timeouts = actions.timeouts
        helo = choose_helo(actions, settings)
        refused = refusal(destination.ip, settings.allowed_destinations)
        if refused is not None:
            # RFC 3463 §3.8: X.7.0, other security status: a policy, not the network.
            raise DestinationRefused(refused, dsn="4.7.0", phase=Phase.CONNECT, host=host)
        with _phase(Phase.CONNECT, host):
            sock = await _connect_socket(destination, settings.source_address, timeouts.connect)
            try:
                wire = await Wire.connect(sock, tap(destination, settings.debug_peers))
            except BaseException:
                sock.close()
                raise
        try:
            greeting = await _read(wire, Phase.GREETING, timeouts.greeting, host, reply_hook)
            if greeting.code != 220:
                raise failure_from_reply(greeting, Phase.GREETING, host)
            extensions = await _hello(wire, actions, helo, host, reply_hook)
            tls_version: str | None = None
            if dane_required and not tls_version_possible(allow_tls, actions):
                raise TlsFailure("DANE: TLS required but not attempted (the script)",
                                 result_type=STARTTLS_NOT_SUPPORTED, host=host)
            if allow_tls and (actions.try_tls or actions.requires_tls):
                tls_version, extensions = await _starttls(
                    wire, extensions, destination, actions, settings, helo, reply_hook,
                    dane=dane if dane_required else None)
            elif actions.requires_tls:
                raise TemporaryFailure(
                    "TLS required but not attempted", dsn="4.7.4", phase=Phase.STARTTLS,
                    host=host,
                )
        except BaseException:
            wire.close()
            raise
        connection = cls(wire, destination, actions, extensions=extensions,
                         tls_version=tls_version, connid=connid)
        connection.dane_verified = dane_required
        # A chain that matched its TLSA records is verified too (RFC 7672 §3.1), as
        # Postfix logs DANE sessions "Verified".
        connection.verified = connection.verified or dane_required
        return connection

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
        return await self._transact(tx, mail, rcpts, unsendable, before_end_of_data)

    async def _transact(self, tx: Transaction, mail: bytes, rcpts: list[bytes],
                        unsendable: DeliveryError | None,
                        before_end: Awaitable[None] | None) -> TransactionResult:
        """MAIL, every RCPT and DATA as one group, then the message if it may go.

        With PIPELINING the group is written at once and the replies read in order (RFC
        2920 §3.1); without it each command is written once the reply to the one before
        is in, which lets the group stop early: after MAIL is refused, and before DATA
        when no recipient was accepted. DATA is in the group only when every recipient
        was sendable.
        """
        host = self.destination.name
        timeouts = self.actions.timeouts
        with_data = unsendable is None
        group = deque([mail, *rcpts, b"DATA\r\n"] if with_data else [mail, *rcpts])
        if self.pipelining:
            with _phase(Phase.MAIL, host):
                self._wire.write(b"".join(group), len(group))
            group.clear()

        def next_command(phase: Phase) -> None:
            """Without PIPELINING: write the command whose reply is read next."""
            if group:
                with _phase(phase, host):
                    self._wire.write(group.popleft(), 1)

        try:
            if self.pipelining and self.reply_hook is not None:
                await self._read_group([(Phase.MAIL, timeouts.mail)]
                                       + [(Phase.RCPT, timeouts.rcpt)] * len(rcpts)
                                       + [(Phase.DATA, timeouts.data)] * with_data)
            return await self._group_replies(tx, len(rcpts), group, next_command,
                                             unsendable, before_end)
        finally:
            self._ahead.clear()  # a reply read ahead never outlives its transaction

    async def _group_replies(self, tx: Transaction, sendable: int, group: deque[bytes],
                             next_command: Callable[[Phase], None],
                             unsendable: DeliveryError | None,
                             before_end: Awaitable[None] | None) -> TransactionResult:
        """The replies to MAIL, each RCPT and DATA, in order; then the message."""
        host = self.destination.name
        timeouts = self.actions.timeouts
        with_data = unsendable is None
        next_command(Phase.MAIL)
        first = await self._reply(Phase.MAIL, timeouts.mail)
        if not first.positive and group:
            raise failure_from_reply(first, Phase.MAIL, host)  # nothing else was sent
        replies: list[tuple[str, Reply]] = []
        accepted = 0
        start: Reply | None = None
        try:
            for recipient in tx.recipients[:sendable]:
                next_command(Phase.RCPT)
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
            proceed = with_data and first.positive and accepted > 0
            data_sent = with_data and not group  # pipelined: its reply is owed
            if proceed or data_sent:
                next_command(Phase.DATA)
                start = await self._reply(Phase.DATA, timeouts.data)
        except DeliveryError as exc:
            if not first.positive:
                raise failure_from_reply(first, Phase.MAIL, host) from None
            if not replies:
                raise
            return self._result(replies, exc, exc.phase or Phase.RCPT, tx)
        if start is not None and start.code == 354 and not proceed:
            # RFC 2920 §3.1: DATA was accepted although nothing can be sent; a lone dot
            # ends the empty transaction (its reply does not matter).
            await self._abandon_data()
        if not first.positive:
            raise failure_from_reply(first, Phase.MAIL, host)
        if unsendable is not None:
            return self._result(replies, unsendable, Phase.RCPT, tx)
        if not accepted or start is None:
            return self._result(replies, None, Phase.RCPT, tx)
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
        return await self._reply(phase, seconds, line)

    async def _reply(self, phase: Phase, seconds: float, line: bytes = b"") -> Reply:
        if self._ahead:
            reply = self._ahead.popleft()
            if isinstance(reply, DeliveryError):
                raise reply
            return reply
        return await _read(self._wire, phase, seconds, self.destination.name,
                           self.reply_hook, line)

    async def _read_group(self, expected: Sequence[tuple[Phase, float]]) -> None:
        """Read the replies of a pipelined group, then ask ReturnCodeHandler about them
        all at once: its calls share one worker round trip (script_calls.py) instead of
        one each (docs/shaping.md has the figures).

        Sound because the replies of a group arrive together (RFC 2920 §3.1) and none
        is acted on before the group is written; each is still replaced before it is
        classified. Reading stops at a failure (kept in its place) or a 421, after
        which nothing more comes (RFC 5321 §3.8).
        """
        assert self.reply_hook is not None
        host = self.destination.name
        read: list[tuple[Phase, int, str]] = []
        failure: DeliveryError | None = None
        for phase, seconds in expected:
            try:
                code, text = await self._wire.read(seconds)
            except (OSError, ValueError, TimeoutError) as exc:
                self._wire.close()  # out of step with the server: never reused
                failure = _translate(exc, phase, host)
                failure.__cause__ = exc
                break
            read.append((phase, code, text))
            if code == 421:
                break
        hook = self.reply_hook
        answers = await asyncio.gather(*(hook(command_of(phase), code, text)
                                         for phase, code, text in read))
        for (_, code, text), replaced in zip(read, answers, strict=True):
            self._ahead.append(parse_reply(*(replaced or (code, text))))
        if failure is not None:
            self._ahead.append(failure)

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
                self._wire.write(payload[offset:offset + DATA_BLOCK], 0, body=True)
                # Each block must drain within the data-block timeout (§4.5.3.2.5).
                await self._wire.drain(timeouts.datablock)
            last = payload[offsets[-1]:] if offsets else b""
            if not waiting:
                self._wire.write(last, 1, body=True)
                return await self._reply(Phase.DATAEND, timeouts.dataend)
            self._wire.write(last, 0, body=True)
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
        if self._counted:
            self._counted = False
            metrics.connection_closed()



def tls_version_possible(allow_tls: bool, actions: ServerActions) -> bool:
    """Will STARTTLS be tried at all on this connection?"""
    return allow_tls and (actions.try_tls or actions.requires_tls)


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


async def _read_raw(wire: Wire, phase: Phase, seconds: float, host: str,
                    hook: ReplyHook | None = None, line: bytes = b"") -> tuple[int, str]:
    # Not `with _phase(...)`: this runs for every reply, and a generator-based context
    # manager per call showed in profiles; the mapping is the same.
    try:
        code, text = await wire.read(seconds)
    except (OSError, ValueError, TimeoutError) as exc:
        # Out of step with the server (a reply late, missing or garbled): never reused.
        wire.close()
        raise _translate(exc, phase, host) from exc
    if hook is not None:
        # Contract §9: the script's replacement is the reply from here on (classified,
        # logged, put in a DSN); without the hook there is no call at all.
        replaced = await hook(command_of(phase, line), code, text)
        if replaced is not None:
            code, text = replaced
    return code, text


async def _read(wire: Wire, phase: Phase, seconds: float, host: str,
                hook: ReplyHook | None = None, line: bytes = b"") -> Reply:
    return parse_reply(*await _read_raw(wire, phase, seconds, host, hook, line))


async def _ask(wire: Wire, line: bytes, phase: Phase, seconds: float,
               host: str, hook: ReplyHook | None = None) -> tuple[int, str]:
    with _phase(phase, host):
        wire.write(line, 1)
    return await _read_raw(wire, phase, seconds, host, hook, line)


async def _hello(wire: Wire, actions: ServerActions, helo: str, host: str,
                 hook: ReplyHook | None = None) -> dict[str, str]:
    """EHLO, or HELO if tryESMTP is off or EHLO is refused (RFC 5321 §3.2).

    Returns the extensions offered, keys in lower case (none after HELO).
    """
    timeout = actions.timeouts.ehlo
    name = helo.encode("ascii")
    if actions.try_esmtp:
        code, text = await _ask(wire, b"EHLO " + name + b"\r\n", Phase.EHLO, timeout, host,
                                hook)
        if code == 250:
            # The whole text, not the Reply's capped copy: a long list is still read.
            return parse_esmtp_extensions(text)[0]
        if code == 421 or not wire.alive:
            raise failure_from_reply(parse_reply(code, text), Phase.EHLO, host)
    code, text = await _ask(wire, b"HELO " + name + b"\r\n", Phase.EHLO, timeout, host, hook)
    if code != 250:
        raise failure_from_reply(parse_reply(code, text), Phase.EHLO, host)
    return {}


async def _starttls(
    wire: Wire,
    extensions: dict[str, str],
    destination: Destination,
    actions: ServerActions,
    settings: ClientSettings,
    helo: str,
    hook: ReplyHook | None = None,
    *,
    dane: dane_checks.DanePolicy | None = None,
) -> tuple[str | None, dict[str, str]]:
    """STARTTLS when offered: the TLS version (None for plaintext) and the extensions.

    With `dane` (usable TLSA records), TLS is required and the chain must match them.
    """
    host = destination.name
    required = actions.requires_tls or dane is not None
    if "starttls" not in extensions:
        if required:
            # RFC 3463 X.7.4: security features not supported.
            raise TlsFailure("TLS required but the server does not offer STARTTLS",
                             result_type=STARTTLS_NOT_SUPPORTED, host=host, dsn="4.7.4")
        return None, extensions
    context = client_context(actions.verify_cert, settings.ca_file)
    timeout = actions.timeouts.starttls
    try:
        code, text = await _ask(wire, b"STARTTLS\r\n", Phase.STARTTLS, timeout, host, hook)
    except DeliveryError as exc:
        raise _tls_failure(exc.message, exc.code, required, host,
                           STARTTLS_NOT_SUPPORTED) from exc
    if code != 220:
        if wire.alive and not required:
            # RFC 3207 §4: the server declined (454); carry on in plaintext.
            return None, extensions
        failure = failure_from_reply(parse_reply(code, text), Phase.STARTTLS, host)
        raise _tls_failure(failure.message, failure.code, required, host,
                           STARTTLS_NOT_SUPPORTED)
    # SNI is the MX host name, for DANE too (RFC 7672 §8.1).
    server_name = None if host.startswith("[") else host
    try:
        await wire.start_tls(context, server_name, timeout)
    except (OSError, ValueError, TimeoutError) as exc:  # ssl.SSLError is an OSError
        raise _tls_failure(f"TLS handshake failed: {_cause(exc)}", None, required,
                           host, handshake_result_type(exc)) from exc
    ssl_object = wire.extra("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        raise _tls_failure("TLS handshake left no TLS session", None, required, host,
                           "validation-failure")
    der = ssl_object.getpeercert(binary_form=True)
    try:
        check_certificate(der, name=actions.check_cert_name,
                          thumbprint=actions.check_cert_thumbprint)
    except CertificateCheckFailed as exc:
        # Nothing is sent on this connection (contract §4).
        raise TlsFailure(str(exc), result_type="certificate-host-mismatch",
                         host=host) from None
    if dane is not None:
        # RFC 7672 §3: the TLSA records, not the CA store, authenticate the server.
        verdict = dane_checks.verify_chain(dane.records, dane_checks.peer_chain(ssl_object),
                                           dane.names, datetime.now(UTC))
        if not verdict.ok:
            raise TlsFailure(f"DANE: {verdict.reason}", result_type="tlsa-invalid",
                             host=host)
    # RFC 3207 §4.2: forget what was learnt before TLS and say EHLO again.
    extensions = await _hello(wire, actions, helo, host, hook)
    return ssl_object.version() or "TLS", extensions


def _tls_failure(message: str, code: int | None, required: bool, host: str,
                 result_type: str) -> DeliveryError:
    if required:
        return TlsFailure(f"TLS required: {message}", code=code, host=host,
                          result_type=result_type)
    return HandshakeFailed(message, code=code, dsn="4.7.5", phase=Phase.STARTTLS, host=host)
