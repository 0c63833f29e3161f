"""One SMTP session's transactions (RFC 5321, 2920, 1870, 3461, 6152, 6531).

`SmtpConnection` holds a session that `smtp_setup.open_session` set up (greeting, EHLO,
STARTTLS): one `wire.Wire` protocol per connection, one reply parser
(`reply.take_reply`), replies read and failures translated by smtp_io.py. aiosmtplib's
SMTP class reads one reply per command, so it cannot pipeline; docs/architecture.md,
"One SMTP path".

Every transaction takes one path: MAIL, each RCPT, DATA as one group, written at once
when the server offers PIPELINING (RFC 2920 §3.1) or one command per reply when it does
not, and the replies read in order either way; then the message in data blocks and
its final reply. What decides is in smtp_rules.py (pure); this module does the I/O in
the order RFC 5321 §3.3 and §4.5.3.2 prescribe, with the script's per-phase timeouts.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass

from mxsend import dane as dane_checks
from mxsend import metrics
from mxsend.actions import ServerActions
from mxsend.destination import Destination
from mxsend.envelope import dot_stuff
from mxsend.errors import DeliveryError, PermanentFailure, Phase, TemporaryFailure
from mxsend.reply import Reply
from mxsend.smtp_io import ReplyHook, failure_from_reply, in_phase, read_group, read_reply
from mxsend.smtp_rules import (
    ClientSettings,
    Transaction,
    advertised_size,
    check_wire_text,
    has_8bit,
    mail_params,
    needs_smtputf8,
    rcpt_params,
)
from mxsend.smtp_setup import Session, open_session

# Data is written in blocks so that the §4.5.3.2.5 data-block timeout means something:
# each block must drain into the socket within `datablock` seconds.
DATA_BLOCK = 256 * 1024


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """How far one transaction got. See outcome.transaction_outcomes."""

    rcpt_replies: tuple[tuple[str, Reply], ...]
    final: Reply | DeliveryError | None  # DATA or end-of-data reply, or what ended it
    final_phase: Phase
    relayed: frozenset[str]  # NOTIFY=SUCCESS recipients whose server lacks DSN
    eight_bit_unadvertised: bool


# --- the connection ----------------------------------------------------------------------


class SmtpConnection:
    """One open SMTP session, after greeting, EHLO and (maybe) STARTTLS."""

    def __init__(self, session: Session, destination: Destination, actions: ServerActions,
                 *, connid: int) -> None:
        self._wire = session.wire
        self.extensions = session.extensions
        self.pipelining = "pipelining" in session.extensions
        self.destination = destination
        self.actions = actions
        self.tls_version = session.tls_version
        self.tls_cipher = session.tls_cipher  # for the `delivery` event (contract §10)
        self.verified = session.verified
        self.dane_verified = session.dane_verified
        self.connid = connid
        self.transactions = 0
        self.last_used = time.monotonic()
        self.reply_hook: ReplyHook | None = None  # set per transaction by the deliverer
        self._counted = True
        metrics.connection_opened()
        if session.tls_version is not None:
            metrics.tls_session(session.tls_version)
        # Replies of a pipelined group read ahead and already through the hook, in
        # order; a DeliveryError stands where reading failed (read_group).
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
        """A session set up by `smtp_setup.open_session` (which says what it raises)."""
        session = await open_session(destination, actions, settings, allow_tls=allow_tls,
                                     reply_hook=reply_hook, dane=dane)
        return cls(session, destination, actions, connid=connid)

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
        unsendable = _rcpt_lines(tx, extensions, allow_dsn, encoding, rcpts)
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
            with in_phase(Phase.MAIL, host):
                self._wire.write(b"".join(group), len(group))
            group.clear()

        def next_command(phase: Phase) -> None:
            """Without PIPELINING: write the command whose reply is read next."""
            if group:
                with in_phase(phase, host):
                    self._wire.write(group.popleft(), 1)

        try:
            if self.pipelining and self.reply_hook is not None:
                await read_group(self._wire, [(Phase.MAIL, timeouts.mail)]
                                 + [(Phase.RCPT, timeouts.rcpt)] * len(rcpts)
                                 + [(Phase.DATA, timeouts.data)] * with_data,
                                 host, self.reply_hook, self._ahead)
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
            try:
                await self._command(Phase.DATAEND, timeouts.dataend, b".\r\n")
            except DeliveryError:
                self.close()
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
        with in_phase(phase, self.destination.name):
            self._wire.write(line, 1)
        return await self._reply(phase, seconds, line)

    async def _reply(self, phase: Phase, seconds: float, line: bytes = b"") -> Reply:
        if self._ahead:
            reply = self._ahead.popleft()
            if isinstance(reply, DeliveryError):
                raise reply
            return reply
        return await read_reply(self._wire, phase, seconds, self.destination.name,
                                self.reply_hook, line)

    async def _send_data(self, data: bytes, before_end: Awaitable[None] | None) -> Reply:
        """The message, dot-stuffed (RFC 5321 §4.5.2), then `.`, then the final reply.

        The spool already gives CRLF lines, so the bytes go out as they are. The last
        block goes out with the final `.` in one write, once `before_end` is done: the
        server idles meanwhile, as it would between any two packets, and the message
        costs one write (and one read on the server) instead of two.
        """
        timeouts = self.actions.timeouts
        host = self.destination.name
        payload = dot_stuff(data) + b".\r\n"
        offsets = range(0, len(payload), DATA_BLOCK)
        with in_phase(Phase.DATA, host):
            for offset in offsets[:-1]:
                self._wire.write(payload[offset:offset + DATA_BLOCK], 0, body=True)
                # Each block must drain within the data-block timeout (§4.5.3.2.5).
                await self._wire.drain(timeouts.datablock)
        if before_end is not None and not _done(before_end):
            # The data-block timeout bounds the pause as it bounds any other stretch
            # without progress (§4.5.3.2.5).
            waiter = asyncio.ensure_future(before_end)
            done, _ = await asyncio.wait({waiter}, timeout=timeouts.datablock)
            if not done:
                if waiter is not before_end:
                    waiter.cancel()  # our own task around a coroutine; a Future is the caller's
                self.close()  # the server discards the unfinished transaction
                raise TemporaryFailure(
                    "the previous message on this connection was not recorded in time",
                    dsn="4.4.2", phase=Phase.DATA, host=host)
        with in_phase(Phase.DATA, host):
            self._wire.write(payload[offsets[-1]:], 1, body=True)
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


def _done(awaitable: Awaitable[None]) -> bool:
    return isinstance(awaitable, asyncio.Future) and awaitable.done()


def _rcpt_lines(tx: Transaction, extensions: dict[str, str], allow_dsn: bool,
                encoding: str, lines: list[bytes]) -> DeliveryError | None:
    """A RCPT line per recipient into `lines`, up to the first whose address cannot go
    on the wire: its failure is returned, and the recipients before it are still asked.
    """
    for recipient in tx.recipients:
        try:
            check_wire_text(recipient.address, "recipient")
        except DeliveryError as exc:
            return exc
        params = rcpt_params(recipient, extensions, allow_dsn=allow_dsn)
        lines.append(_command_line(f"TO:<{recipient.address}>", params, encoding,
                                   verb="RCPT "))
    return None


def _command_line(text: str, params: Sequence[str], encoding: str, verb: str = "") -> bytes:
    """One command line; `text` was checked by check_wire_text, params are ours."""
    return (verb + " ".join([text, *params]) + "\r\n").encode(encoding)
