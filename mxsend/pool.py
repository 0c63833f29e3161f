"""The connection pool: open SMTP sessions by (ip, port, ServerActions), and the limits.

After a transaction the session is kept for the next message to the same (ip, port)
whose ServerActions are equal (contract §4); idle sessions are closed after
IDLE_SECONDS. The pool enforces `smtp.max_connections`, `smtp.max_connections_per_domain`
and a bound per destination; deliveries waiting for a session or for room are served
first come, first served. `Backoff` is the per-address pause after a refused
connection or a 421, so a struggling server is not hammered by every queued message.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol, cast

from mxsend.actions import ServerActions
from mxsend.errors import DeliveryError, DestinationRefused, Phase
from mxsend.smtp import SmtpConnection

# Idle sessions are closed after this long: long enough to catch the next message of a
# burst, short enough not to hold a server's slot (Postfix: smtp_connection_cache_time_limit
# is 2s; servers commonly drop idle clients after 30-60s).
IDLE_SECONDS = 5.0
# Sessions open to one (ip, port) at once, by default; RFC 5321 gives no number, and
# many receivers throttle above a handful of concurrent connections per client.
MAX_PER_DESTINATION = 10
# A session is closed after this many transactions so that no server sees it forever.
MAX_TRANSACTIONS = 1000


# --- backoff (pure) ---------------------------------------------------------------


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
    if isinstance(error, DestinationRefused):
        return False  # never tried: nothing to spare the server from
    return error.code == 421 or (error.phase is Phase.CONNECT and error.code is None)


# --- the pool ---------------------------------------------------------------------------

PoolKey = tuple[str, int, ServerActions]


class Lease(Protocol):
    """A connection counted against a shaped destination (shaper.Lease)."""

    @property
    def max_transactions(self) -> int | None: ...
    def release(self) -> None: ...


@dataclass(slots=True)
class PoolEntry:
    connection: SmtpConnection
    domain: str
    idle_since: float = 0.0  # loop time it was given back
    # The last message whose end of data this session sent, until the caller has
    # recorded its outcome: the next message's final `.` waits for it (contract §1).
    unrecorded: asyncio.Future[None] | None = None
    # Traffic shaping (contract §9): given back when the session closes; its shape's
    # max_messages_per_connection ends the session sooner than MAX_TRANSACTIONS.
    lease: Lease | None = None

    @property
    def key(self) -> PoolKey:
        """Which deliveries may reuse this session: same address, same ServerActions."""
        where = self.connection.destination
        return where.ip, where.port, self.connection.actions


@dataclass(slots=True, eq=False)
class _Waiter:
    """A delivery waiting for a session of `key`, or for room to open one."""

    key: PoolKey
    domain: str
    future: asyncio.Future[PoolEntry | None]


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
        self._idle: dict[PoolKey, list[PoolEntry]] = {}
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

    def take(self, key: PoolKey) -> PoolEntry | None:
        """An idle live session for exactly this key, now busy."""
        entries = self._idle.get(key)
        while entries:
            entry = entries.pop()
            if entry.connection.alive:
                return entry
            self._forget(entry)
        return None

    async def acquire(self, key: PoolKey, domain: str) -> PoolEntry | None:
        """An idle session for `key`, or None with room reserved for a new one.

        Waits while the limits are reached, closing idle sessions of other keys that
        stand in the way; a session given back meanwhile is taken rather than replaced.
        """
        # Straight in if it can be served: a waiter ahead of us is waiting for something
        # else (a session given back for its key goes to it; room would have served it).
        got = self._try(key, domain)
        if got is not _NOTHING:
            return cast(PoolEntry | None, got)
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
        # Many waiters want one key (a busy domain's deliveries): until one of them is
        # served, the pool is as it was for the previous one, and so is the answer;
        # _try (which may look at every idle session) runs once per key, not per waiter.
        refused: set[tuple[PoolKey, str]] = set()
        try:
            for waiter in list(self._queue):
                if waiter.future.done():  # cancelled
                    self._queue.remove(waiter)
                    continue
                wants = (waiter.key, waiter.domain)
                if wants in refused:
                    continue
                got = self._try(waiter.key, waiter.domain)
                if got is _NOTHING:
                    refused.add(wants)
                    continue
                refused.clear()
                self._queue.remove(waiter)
                waiter.future.set_result(cast(PoolEntry | None, got))
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
        full = self._total >= self.max_total

        def in_the_way(entry: PoolEntry) -> bool:
            where = entry.connection.destination
            return entry.key != key and (full or entry.domain == domain
                                         or (where.ip, where.port) == destination)

        return self.evict_idle(in_the_way)

    def evict_idle(self, belongs: Callable[[PoolEntry], bool]) -> bool:
        """Close the oldest idle session `belongs` picks (a shaped destination at its
        limit, with a session idle for other ServerActions); False if none."""
        candidates = [entry for entries in self._idle.values() for entry in entries
                      if belongs(entry)]
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

    def give_back(self, entry: PoolEntry) -> None:
        """A busy session is idle again (already RSET), or gone if it is not alive."""
        conn = entry.connection
        limit = MAX_TRANSACTIONS
        if entry.lease is not None and entry.lease.max_transactions is not None:
            limit = entry.lease.max_transactions   # then QUIT and reconnect
        if not conn.alive or conn.transactions >= limit:
            self._close(entry)
            return
        key = entry.key
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

    def discard(self, entry: PoolEntry) -> None:
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

    def _remove_idle(self, entry: PoolEntry) -> None:
        key = entry.key
        entries = self._idle.get(key, [])
        if entry in entries:
            entries.remove(entry)
        if not entries:
            self._idle.pop(key, None)

    def _close(self, entry: PoolEntry) -> None:
        """QUIT in the background; the slot is free at once."""
        self._forget(entry)
        task = asyncio.get_running_loop().create_task(entry.connection.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _forget(self, entry: PoolEntry) -> None:
        conn = entry.connection
        if entry.lease is not None:
            entry.lease.release()
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


