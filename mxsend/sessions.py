"""SMTP sessions on the connection pool: open, run one transaction, give back.

`Sessions` is delivery.py's hands on the wire for one destination address: `open` a
session in the room `ConnectionPool.acquire` reserved (a failed handshake retried once
in plaintext, contract §4), `send` one transaction on it and hand the session back to
the pool: as is after an answered end of data, RSET first after an abort (RFC 5321
§4.1.1.5), dropped when it died. A refused connection or a 421 puts the address in
`Backoff` (pool.py). Which address, which ServerActions and which features apply is
delivery.py's.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from mxsend import metrics
from mxsend.actions import ServerActions
from mxsend.destination import Destination
from mxsend.errors import DeliveryError, Phase
from mxsend.outcome import RecipientOutcome, Where, failure_outcomes, transaction_outcomes
from mxsend.pool import Backoff, ConnectionPool, PoolEntry
from mxsend.reply import Reply
from mxsend.smtp import SmtpConnection
from mxsend.smtp_io import ReplyHook
from mxsend.smtp_rules import ClientSettings, Transaction
from mxsend.smtp_setup import HandshakeFailed
from mxsend.tlspolicy import NO_POLICY, HostTls


@dataclasses.dataclass(slots=True)
class Timing:
    """What the `delivery` event says of the transaction that decided (contract §10)."""

    transfer: float = 0.0  # seconds of the transaction, MAIL to the final reply
    tls_cipher: str | None = None
    verified: bool = False


class Sessions:
    """Sessions of one Deliverer on its pool; see the module doc."""

    def __init__(self, pool: ConnectionPool, backoff: Backoff, settings: ClientSettings,
                 clock: Callable[[], float]) -> None:
        self.pool = pool
        self.backoff = backoff
        self._settings = settings
        self._clock = clock

    async def open(self, dest: Destination, actions: ServerActions, domain: str,
                    connid: int, hook: ReplyHook | None = None,
                    tls: HostTls = NO_POLICY) -> PoolEntry:
        """Open a session in the room `acquire` reserved; give the room back on failure."""
        slot = (dest.ip, dest.port)
        try:
            try:
                conn = await SmtpConnection.open(dest, actions, self._settings, connid=connid,
                                                 reply_hook=hook, dane=tls.dane)
            except HandshakeFailed:
                # Contract §4: without forceTLS, a failed handshake is retried once in
                # plaintext on a new connection.
                conn = await SmtpConnection.open(dest, actions, self._settings, connid=connid,
                                                 allow_tls=False, reply_hook=hook)
            conn.reply_hook = hook
        except BaseException:
            self.pool.unreserve(domain, slot)
            raise
        return PoolEntry(conn, domain)

    async def send(self, entry: PoolEntry, tx: Transaction, addresses: list[str],
                    recorded: asyncio.Future[None] | None, timing: Timing, *,
                    fresh: bool = False) -> list[RecipientOutcome] | None:
        """Run the transaction; give the session back. None: a stale pooled session."""
        conn = entry.connection
        where = Where(conn.destination.relay, conn.destination.name, conn.tls_version)
        if entry.unrecorded is not None and entry.unrecorded.done():
            entry.unrecorded = None
        started = self._clock()
        try:
            result = await conn.send(tx, before_end_of_data=entry.unrecorded)
        except DeliveryError as exc:
            stale = (not fresh and not conn.alive and exc.phase is Phase.MAIL
                     and exc.code is None)
            if stale:
                self.pool.discard(entry)
                return None
            self._timed(timing, conn, started)
            if exc.code == 421:
                self.backoff.failed((conn.destination.ip, conn.destination.port), self._clock())
            await self._recycle(entry)
            return failure_outcomes(addresses, exc, where)
        self._timed(timing, conn, started)
        if isinstance(result.final, DeliveryError) and result.final.code == 421:
            self.backoff.failed((conn.destination.ip, conn.destination.port), self._clock())
        if isinstance(result.final, Reply) and result.final_phase is Phase.DATAEND:
            # The end of data was answered: this message is now the one the next
            # transaction's final `.` waits for (the previous one is recorded by now).
            entry.unrecorded = recorded
            # The reply to the end of data closes the transaction on both sides (RFC
            # 5321 §4.1.1.4): the session is ready for the next MAIL without an RSET
            # round trip, which is only needed to abort a transaction half-way.
            self.pool.give_back(entry)
        else:
            await self._recycle(entry)
        return transaction_outcomes(
            addresses, dict(result.rcpt_replies), result.final, where,
            final_phase=result.final_phase, relayed=result.relayed,
            eight_bit_unadvertised=result.eight_bit_unadvertised,
        )

    def _timed(self, timing: Timing, conn: SmtpConnection, started: float) -> None:
        timing.transfer = self._clock() - started
        timing.tls_cipher, timing.verified = conn.tls_cipher, conn.verified
        metrics.transaction(timing.transfer)

    async def _recycle(self, entry: PoolEntry) -> None:
        if await entry.connection.reset():
            self.pool.give_back(entry)
        else:
            self.pool.discard(entry)
