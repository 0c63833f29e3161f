"""Per-domain delivery: MX hosts in order, ServerDetails per server, the connection pool.

`Deliverer.deliver()` makes one transaction per domain per attempt (contract §5) and
returns one RecipientOutcome per recipient; delivery problems, DNS included, become
outcomes, never exceptions. Every address of every MX host is tried in order until one
answers (RFC 5321 §5.1): a connection failure, or a host that answered 4xx for the
whole transaction, moves on to the next address; anything sent or bounced is final.

Connections are pooled (`pool.py`, the big lever for throughput): a session whose
transaction ended cleanly goes back to the pool for the next message with equal
ServerActions; one aborted half-way is RSET first (RFC 5321 §4.1.1.5).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from mxsend import metrics
from mxsend.actions import ServerActions, ServerParameters
from mxsend.batv import BatvKey, sign
from mxsend.config import Config
from mxsend.destination import Destination
from mxsend.envelope import Message, Recipient
from mxsend.errors import DeliveryError, Phase, TemporaryFailure
from mxsend.hostname import helo_name
from mxsend.outcome import (
    RecipientOutcome,
    Where,
    after_every_host,
    failure_outcomes,
    should_try_next_host,
    transaction_outcomes,
)
from mxsend.pool import Backoff, ConnectionPool, PoolEntry, backoff_worthy
from mxsend.reply import Reply
from mxsend.smtp import HandshakeFailed, SmtpConnection
from mxsend.smtp_rules import ClientSettings, Transaction, choose_return_path

ServerDetailsFn = Callable[[ServerParameters], Awaitable[ServerActions]]


class HostLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def addresses(self) -> tuple[str, ...]: ...


class ResolverLike(Protocol):
    async def resolve(self, domain: str) -> Sequence[HostLike]: ...


@dataclasses.dataclass(slots=True)
class _Session:
    """What the `delivery` event says of the transaction that decided (contract §10)."""

    transfer: float = 0.0  # seconds of the transaction, MAIL to the final reply
    tls_cipher: str | None = None
    verified: bool = False


def stamped(outcomes: list[RecipientOutcome], elapsed: float, session: _Session
            ) -> list[RecipientOutcome]:
    """The outcomes with their times: setup is everything before the transaction
    (DNS, ServerDetails, connecting, greeting, EHLO, TLS, other hosts tried), as the
    `c` of Postfix's delays=a/b/c/d."""
    setup = max(0.0, elapsed - session.transfer)
    return [dataclasses.replace(o, setup=setup, transfer=session.transfer,
                                tls_cipher=session.tls_cipher if o.tls else None,
                                verified=session.verified if o.tls else False)
            for o in outcomes]


# --- the deliverer -----------------------------------------------------------------------


class Deliverer:
    """Delivers one message's recipients of one domain per call; see the module doc."""

    def __init__(self, config: Config, resolver: ResolverLike, *, batv_key: bytes | None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        smtp = config.smtp
        self._port = smtp.port
        self._resolver = resolver
        self._settings = ClientSettings(
            helo_name=helo_name(smtp.helo_name),
            source_address=smtp.source_address,
            ca_file=smtp.ca_file,
            allowed_destinations=smtp.allowed_destinations,
            debug_peers=config.log.debug_peers,
        )
        self._batv = BatvKey(batv_key) if batv_key else None
        self._clock = clock
        self._wall_clock = wall_clock
        self._ids = itertools.count(1)
        self.backoff = Backoff()
        # The limits are the contract's two: per recipient domain and in total, as
        # Postfix's per-destination concurrency is per domain for MX delivery. An extra
        # per-address cap equal to the per-domain one (what we had) throttled every
        # domain hosted on one MX to 10 connections together, which no setting named;
        # a server that wants fewer says 421, and Backoff listens.
        self.pool = ConnectionPool(smtp.max_connections, smtp.max_connections_per_domain,
                                   max_per_destination=smtp.max_connections)

    async def deliver(self, queue_id: str, message: Message, recipients: Sequence[Recipient],
                      domain: str, server_details: ServerDetailsFn, *,
                      recorded: asyncio.Future[None] | None = None) -> list[RecipientOutcome]:
        """One transaction for these recipients of `domain`; one outcome per recipient.

        `recorded`: the caller resolves it (set_result, always, also on failure or
        shutdown) once these outcomes are durable. Until then the connection that
        carried the message may run the next transaction but holds back its final `.`,
        so that at most one accepted message per connection is unrecorded (contract §1:
        a crash duplicates at most one message per open connection).

        Never raises for a delivery problem: DNS errors and local misconfiguration (a
        script asking for BATV without a key) come back as outcomes too.
        """
        started = self._clock()
        session = _Session()
        outcomes = await self._deliver(message, recipients, domain, server_details,
                                       recorded, session)
        return stamped(outcomes, self._clock() - started, session)

    async def _deliver(self, message: Message, recipients: Sequence[Recipient], domain: str,
                       server_details: ServerDetailsFn, recorded: asyncio.Future[None] | None,
                       session: _Session) -> list[RecipientOutcome]:
        addresses = [r.address for r in recipients]
        if not recipients:
            return []
        try:
            hosts = await self._resolver.resolve(domain)
        except DeliveryError as exc:
            return failure_outcomes(addresses, exc)
        if not hosts:
            return failure_outcomes(addresses, TemporaryFailure(
                f"{domain}: no host to deliver to", dsn="4.4.4", phase=Phase.DNS, host=domain))
        tried: list[list[RecipientOutcome]] = []
        for host in hosts:
            for ip in host.addresses:
                destination = Destination(host.name, ip, self._port)
                outcomes = await self._try(destination, message, recipients, domain,
                                           server_details, recorded, session)
                if not should_try_next_host(outcomes):
                    return outcomes
                tried.append(outcomes)
        if not tried:
            return failure_outcomes(addresses, TemporaryFailure(
                f"{domain}: no address to deliver to", dsn="4.4.4", phase=Phase.DNS,
                host=domain))
        return after_every_host(tried)

    async def close(self) -> None:
        """QUIT every pooled connection."""
        await self.pool.close()

    # -- one destination ----------------------------------------------------------------

    async def _try(self, dest: Destination, message: Message, recipients: Sequence[Recipient],
                   domain: str, server_details: ServerDetailsFn,
                   recorded: asyncio.Future[None] | None, session: _Session
                   ) -> list[RecipientOutcome]:
        addresses = [r.address for r in recipients]
        key = (dest.ip, dest.port)
        until = self.backoff.blocked_until(key, self._clock())
        if until is not None:
            return failure_outcomes(addresses, TemporaryFailure(
                f"{dest.relay} is in backoff after a refused connection or 421",
                dsn="4.4.1", phase=Phase.CONNECT, host=dest.name), Where(dest.relay, dest.name))
        connid = self.pool.idle_connid(dest.ip, dest.port) or next(self._ids)
        env = message.envelope
        params = ServerParameters(
            authsender=env.auth or "", originator=env.sender, server=dest.name, domain=domain,
            length=len(message.data), connid=connid, connection=dest.relay,
        )
        actions = await server_details(params)
        try:
            tx = self._transaction(message, recipients, actions)
        except DeliveryError as exc:
            return failure_outcomes(addresses, exc)

        while True:
            entry = await self.pool.acquire((dest.ip, dest.port, actions), domain)
            if entry is None:
                break  # room was reserved for a new session
            outcomes = await self._send(entry, tx, addresses, recorded, session)
            if outcomes is not None:
                return outcomes
            # The pooled session had died while idle: nothing was sent; try again.
        try:
            entry = await self._open(dest, actions, domain, connid)
        except DeliveryError as exc:
            if backoff_worthy(exc):
                self.backoff.failed(key, self._clock())
            return failure_outcomes(addresses, exc, Where(dest.relay, dest.name))
        self.backoff.succeeded(key)
        outcomes = await self._send(entry, tx, addresses, recorded, session, fresh=True)
        assert outcomes is not None
        return outcomes

    def _transaction(self, message: Message, recipients: Sequence[Recipient],
                     actions: ServerActions) -> Transaction:
        if actions.unusable:
            # A pin the script set but that cannot be read: no connection at all rather
            # than one without the check (contract §4; docs/policy.md).
            raise TemporaryFailure(actions.unusable, dsn="4.7.5", phase=Phase.CONNECT)
        return_path = choose_return_path(message.envelope.sender, actions)
        if actions.use_batv and return_path:
            if self._batv is None:
                # An operator's mistake, not the recipient's: hold the mail (temporary)
                # until batv.key_file is set and the config reloaded, rather than send it
                # unsigned against the script's wish or bounce it.
                raise TemporaryFailure(
                    "the script sets useBATV but batv.key_file is not configured",
                    dsn="4.3.5", phase=Phase.MAIL)
            return_path = sign(return_path, self._batv, self._wall_clock())
        return Transaction(envelope=message.envelope, return_path=return_path,
                           recipients=tuple(recipients), data=message.data)

    async def _open(self, dest: Destination, actions: ServerActions, domain: str,
                    connid: int) -> PoolEntry:
        """Open a session in the room `acquire` reserved; give the room back on failure."""
        slot = (dest.ip, dest.port)
        try:
            try:
                conn = await SmtpConnection.open(dest, actions, self._settings, connid=connid)
            except HandshakeFailed:
                # Contract §4: without forceTLS, a failed handshake is retried once in
                # plaintext on a new connection.
                conn = await SmtpConnection.open(dest, actions, self._settings, connid=connid,
                                                 allow_tls=False)
        except BaseException:
            self.pool.unreserve(domain, slot)
            raise
        return PoolEntry(conn, domain)

    async def _send(self, entry: PoolEntry, tx: Transaction, addresses: list[str],
                    recorded: asyncio.Future[None] | None, session: _Session, *,
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
            self._timed(session, conn, started)
            if exc.code == 421:
                self.backoff.failed((conn.destination.ip, conn.destination.port), self._clock())
            await self._recycle(entry)
            return failure_outcomes(addresses, exc, where)
        self._timed(session, conn, started)
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

    def _timed(self, session: _Session, conn: SmtpConnection, started: float) -> None:
        session.transfer = self._clock() - started
        session.tls_cipher, session.verified = conn.tls_cipher, conn.verified
        metrics.transaction(session.transfer)

    async def _recycle(self, entry: PoolEntry) -> None:
        if await entry.connection.reset():
            self.pool.give_back(entry)
        else:
            self.pool.discard(entry)
