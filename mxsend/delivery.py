"""Per-domain delivery: MX hosts in order, ServerDetails per server, the connection pool.

`Deliverer.deliver()` makes one transaction per domain per attempt (contract §5) and
returns one RecipientOutcome per recipient; delivery problems, DNS included, become
outcomes, never exceptions. Every address of every MX host is tried in order until one
answers (RFC 5321 §5.1): a connection failure, or a host that answered 4xx for the
whole transaction, moves on to the next address; anything sent or bounced is final.

Connections are pooled (the big lever for throughput): after a transaction the session
is RSET (RFC 5321 §4.1.1.5) and kept for the next message to the same (ip, port) whose
ServerActions are equal (contract §4); idle sessions are closed after IDLE_SECONDS. The
pool enforces `smtp.max_connections`, `smtp.max_connections_per_domain` and a bound per
destination. A refused connection or a 421 puts that address in a short Backoff so a
struggling server is not hammered by every queued message at once.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol, cast

from mxsend.actions import ServerActions, ServerParameters
from mxsend.batv import BatvKey, sign
from mxsend.config import Config
from mxsend.envelope import Message, Recipient
from mxsend.errors import DeliveryError, Phase, TemporaryFailure
from mxsend.outcome import (
    RecipientOutcome,
    Reply,
    Where,
    failure_outcomes,
    should_try_next_host,
    transaction_outcomes,
)
from mxsend.smtp import (
    ClientSettings,
    Destination,
    HandshakeFailed,
    SmtpConnection,
    Transaction,
    choose_return_path,
)

ServerDetailsFn = Callable[[ServerParameters], Awaitable[ServerActions]]

# Idle sessions are closed after this long: long enough to catch the next message of a
# burst, short enough not to hold a server's slot (Postfix: smtp_connection_cache_time_limit
# is 2s; servers commonly drop idle clients after 30-60s).
IDLE_SECONDS = 5.0
# Sessions open to one (ip, port) at once, by default; RFC 5321 gives no number, and
# many receivers throttle above a handful of concurrent connections per client.
MAX_PER_DESTINATION = 10
# A session is closed after this many transactions so that no server sees it forever.
MAX_TRANSACTIONS = 1000


class HostLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def addresses(self) -> tuple[str, ...]: ...


class ResolverLike(Protocol):
    async def resolve(self, domain: str) -> Sequence[HostLike]: ...


# --- backoff (pure) ------------------------------------------------------------------


@dataclass(slots=True)
class Backoff:
    """Per-address pause after a refused connection or a 421; doubles, then caps."""

    base: float = 5.0
    cap: float = 300.0
    _state: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)

    def failed(self, key: tuple[str, int], now: float) -> float:
        """Record a failure; returns the time until which the address is skipped."""
        _, previous = self._state.get(key, (0.0, 0.0))
        delay = min(self.cap, previous * 2 if previous else self.base)
        self._state[key] = (now + delay, delay)
        return now + delay

    def succeeded(self, key: tuple[str, int]) -> None:
        self._state.pop(key, None)

    def blocked_until(self, key: tuple[str, int], now: float) -> float | None:
        entry = self._state.get(key)
        if entry is None or entry[0] <= now:
            return None
        return entry[0]


def backoff_worthy(error: DeliveryError) -> bool:
    """Refused or unreachable, or told to go away (421, RFC 5321 §3.8)."""
    return error.code == 421 or (error.phase is Phase.CONNECT and error.code is None)


# --- the pool ---------------------------------------------------------------------------

PoolKey = tuple[str, int, ServerActions]


@dataclass(slots=True)
class _Entry:
    connection: SmtpConnection
    domain: str
    idle_since: float = 0.0  # loop time it was given back


@dataclass(slots=True, eq=False)
class _Waiter:
    """A delivery waiting for a session of `key`, or for room to open one."""

    key: PoolKey
    domain: str
    future: asyncio.Future[_Entry | None]


_NOTHING = object()  # _try: neither a session nor room for one


class ConnectionPool:
    """Open sessions, idle ones by (ip, port, actions), and the connection limits."""

    def __init__(self, max_total: int, max_per_domain: int,
                 max_per_destination: int = MAX_PER_DESTINATION,
                 idle_seconds: float = IDLE_SECONDS) -> None:
        self.max_total = max_total
        self.max_per_domain = max_per_domain
        self.max_per_destination = max_per_destination
        self.idle_seconds = idle_seconds
        self._idle: dict[PoolKey, list[_Entry]] = {}
        self._total = 0
        self._per_domain: Counter[str] = Counter()
        self._per_destination: Counter[tuple[str, int]] = Counter()
        # Deliveries waiting, first come first served. A session given back goes
        # straight to the first waiter for its key (no wake-up round: with deliveries
        # queued behind busy sessions that is every transaction); room freed or an idle
        # session that could be closed is offered to each waiter in turn (_serve).
        self._queue: deque[_Waiter] = deque()
        self._serving = False
        self._closing: set[asyncio.Task[None]] = set()
        # One timer closes every session idle too long, instead of a timer per session
        # given back (a timer armed and cancelled per transaction showed in profiles).
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def open_count(self) -> int:
        return self._total

    def idle_connid(self, ip: str, port: int) -> int | None:
        """The id of an idle session to (ip, port), for ServerDetails' `connid`."""
        for (kip, kport, _), entries in self._idle.items():
            if kip == ip and kport == port and entries:
                return entries[-1].connection.connid
        return None

    def take(self, key: PoolKey) -> _Entry | None:
        """An idle live session for exactly this key, now busy."""
        entries = self._idle.get(key)
        while entries:
            entry = entries.pop()
            if entry.connection.alive:
                return entry
            self._forget(entry)
        return None

    async def acquire(self, key: PoolKey, domain: str) -> _Entry | None:
        """An idle session for `key`, or None with room reserved for a new one.

        Waits while the limits are reached, closing idle sessions of other keys that
        stand in the way; a session given back meanwhile is taken rather than replaced.
        """
        # Straight in if it can be served: a waiter ahead of us is waiting for something
        # else (a session given back for its key goes to it; room would have served it).
        got = self._try(key, domain)
        if got is not _NOTHING:
            return cast(_Entry | None, got)
        waiter = _Waiter(key, domain, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                # Served just as we were cancelled: hand it on.
                served = waiter.future.result()
                if served is None:
                    self.unreserve(domain, (key[0], key[1]))
                else:
                    self.give_back(served)
            else:
                with suppress(ValueError):
                    self._queue.remove(waiter)
            raise

    def _try(self, key: PoolKey, domain: str) -> object:
        """A session, None with room reserved, or _NOTHING."""
        entry = self.take(key)
        if entry is not None:
            return entry
        destination = (key[0], key[1])
        if self._room(domain, destination) or self._evict(key, domain, destination):
            self._reserve(domain, destination)
            return None
        return _NOTHING

    def _serve(self) -> None:
        """Something changed (room freed, a session idle): offer it to each waiter."""
        if self._serving or not self._queue:
            return
        self._serving = True  # _try may close a session, which comes back here
        try:
            for waiter in list(self._queue):
                if waiter.future.done():  # cancelled
                    self._queue.remove(waiter)
                    continue
                got = self._try(waiter.key, waiter.domain)
                if got is not _NOTHING:
                    self._queue.remove(waiter)
                    waiter.future.set_result(cast(_Entry | None, got))
        finally:
            self._serving = False

    def _reserve(self, domain: str, destination: tuple[str, int]) -> None:
        self._total += 1
        self._per_domain[domain] += 1
        self._per_destination[destination] += 1

    def _room(self, domain: str, destination: tuple[str, int]) -> bool:
        return (self._total < self.max_total
                and self._per_domain[domain] < self.max_per_domain
                and self._per_destination[destination] < self.max_per_destination)

    def _evict(self, key: PoolKey, domain: str, destination: tuple[str, int]) -> bool:
        """Close the oldest idle session that stands in the way; False if none does."""
        candidates = [
            entry for entry_key, entries in self._idle.items() if entry_key != key
            for entry in entries
            if self._total >= self.max_total
            or entry.domain == domain
            or (entry.connection.destination.ip, entry.connection.destination.port)
            == destination
        ]
        if not candidates:
            return False
        oldest = min(candidates, key=lambda entry: entry.connection.last_used)
        self._remove_idle(oldest)
        self._close(oldest)
        return True

    def unreserve(self, domain: str, destination: tuple[str, int]) -> None:
        self._total -= 1
        self._per_domain[domain] -= 1
        self._per_destination[destination] -= 1
        self._serve()

    def give_back(self, entry: _Entry) -> None:
        """A busy session is idle again (already RSET), or gone if it is not alive."""
        conn = entry.connection
        if not conn.alive or conn.transactions >= MAX_TRANSACTIONS:
            self._close(entry)
            return
        key = (conn.destination.ip, conn.destination.port, conn.actions)
        for waiter in self._queue:
            if waiter.key == key and not waiter.future.done():
                self._queue.remove(waiter)
                waiter.future.set_result(entry)  # busy still, now theirs
                return
        self._idle.setdefault(key, []).append(entry)
        loop = asyncio.get_running_loop()
        entry.idle_since = loop.time()
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.idle_seconds, self._sweep)
        self._serve()  # a waiter of another key may need it closed to make room

    def discard(self, entry: _Entry) -> None:
        self._close(entry)

    def _sweep(self) -> None:
        """Close the sessions idle for idle_seconds; come back when the next one is due."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        oldest: float | None = None
        for key, entries in list(self._idle.items()):
            for entry in [e for e in entries if now - e.idle_since >= self.idle_seconds]:
                entries.remove(entry)
                self._close(entry)
            if not entries:
                del self._idle[key]
                continue
            first = min(entry.idle_since for entry in entries)
            oldest = first if oldest is None else min(oldest, first)
        if oldest is not None:
            self._sweeper = loop.call_later(
                max(0.0, oldest + self.idle_seconds - now), self._sweep)

    def _remove_idle(self, entry: _Entry) -> None:
        conn = entry.connection
        key = (conn.destination.ip, conn.destination.port, conn.actions)
        entries = self._idle.get(key, [])
        if entry in entries:
            entries.remove(entry)
        if not entries:
            self._idle.pop(key, None)

    def _close(self, entry: _Entry) -> None:
        """QUIT in the background; the slot is free at once."""
        self._forget(entry)
        task = asyncio.get_running_loop().create_task(entry.connection.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _forget(self, entry: _Entry) -> None:
        conn = entry.connection
        self.unreserve(entry.domain, (conn.destination.ip, conn.destination.port))

    @property
    def waiting(self) -> int:
        """Deliveries waiting for a session or for room under the limits."""
        return len(self._queue)

    async def close(self) -> None:
        """QUIT every idle session and wait for every QUIT under way."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for entries in list(self._idle.values()):
            for entry in list(entries):
                self._remove_idle(entry)
                self._close(entry)
        self._idle.clear()
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)


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
            helo_name=smtp.helo_name or socket.getfqdn(),
            source_address=smtp.source_address,
            ca_file=smtp.ca_file,
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
                      domain: str, server_details: ServerDetailsFn) -> list[RecipientOutcome]:
        """One transaction for these recipients of `domain`; one outcome per recipient.

        Never raises for a delivery problem: DNS errors and local misconfiguration (a
        script asking for BATV without a key) come back as outcomes too.
        """
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
        last: list[RecipientOutcome] | None = None
        for host in hosts:
            for ip in host.addresses:
                destination = Destination(host.name, ip, self._port)
                outcomes = await self._try(destination, message, recipients, domain,
                                           server_details)
                if not should_try_next_host(outcomes):
                    return outcomes
                last = outcomes
        if last is None:
            return failure_outcomes(addresses, TemporaryFailure(
                f"{domain}: no address to deliver to", dsn="4.4.4", phase=Phase.DNS,
                host=domain))
        return last

    async def close(self) -> None:
        """QUIT every pooled connection."""
        await self.pool.close()

    # -- one destination ----------------------------------------------------------------

    async def _try(self, dest: Destination, message: Message, recipients: Sequence[Recipient],
                   domain: str, server_details: ServerDetailsFn) -> list[RecipientOutcome]:
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
            outcomes = await self._send(entry, tx, addresses)
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
        outcomes = await self._send(entry, tx, addresses, fresh=True)
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
                    connid: int) -> _Entry:
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
        return _Entry(conn, domain)

    async def _send(self, entry: _Entry, tx: Transaction, addresses: list[str],
                    *, fresh: bool = False) -> list[RecipientOutcome] | None:
        """Run the transaction; give the session back. None: a stale pooled session."""
        conn = entry.connection
        where = Where(conn.destination.relay, conn.destination.name, conn.tls_version)
        try:
            result = await conn.send(tx)
        except DeliveryError as exc:
            stale = (not fresh and not conn.alive and exc.phase is Phase.MAIL
                     and exc.code is None)
            if stale:
                self.pool.discard(entry)
                return None
            if exc.code == 421:
                self.backoff.failed((conn.destination.ip, conn.destination.port), self._clock())
            await self._recycle(entry)
            return failure_outcomes(addresses, exc, where)
        if isinstance(result.final, DeliveryError) and result.final.code == 421:
            self.backoff.failed((conn.destination.ip, conn.destination.port), self._clock())
        if isinstance(result.final, Reply) and result.final_phase is Phase.DATAEND:
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

    async def _recycle(self, entry: _Entry) -> None:
        if await entry.connection.reset():
            self.pool.give_back(entry)
        else:
            self.pool.discard(entry)
