"""Limits shared across hosts on Redis or Valkey (contract §9, "Across hosts").

Every daemon of every host that names the same `cluster.redis` server shares, per
destination (mxsend.shaping.destination_of):

- connection leases: a sorted set of lease ids scored by their expiry. A lease is taken
  only while fewer than the limit are unexpired, and renewed while its connection works,
  so a host that dies frees its leases within `LEASE_SECONDS` without anyone's help;
- rates: one GCRA theoretical arrival time (shaping.gcra, the same rule) per
  destination. A daemon may reserve several slots in one round trip and space them
  itself, so a busy destination costs one round trip per batch, not per message;
- suspensions: a key with the reply as value and the suspension as its lifetime.

Each decision is one server-side Lua script (one round trip; no Redis module needed),
timed by the server's own clock (`TIME`), so that hosts whose clocks differ agree.

The cluster never holds delivery up for long: every call has a deadline of at most a
second. When the server cannot be reached, each call answers `None` ("decide locally":
the caller applies its own limits times `cluster.local_share`), a `cluster` event with
`state=unreachable` is logged once, and the server is tried again after
`RETRY_SECONDS`; the first success logs `state=reachable`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mxsend.log import event
from mxsend.shaping import Rate

T = TypeVar("T")

PREFIX = "mxsend:"
LEASE_SECONDS = 60.0       # a dead host's connections count for at most this long
RETRY_SECONDS = 5.0        # how soon an unreachable server is tried again
DEADLINE_SECONDS = 1.0     # contract §9: never wait on the cluster longer than a second

# KEYS[1] leases of the destination; ARGV: lease id, limit, lease seconds.
# Expired leases are dropped first, so a dead host's leases free themselves.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000) + 1000)
return 1
"""

# KEYS[1] the destination's theoretical arrival time; ARGV: interval, count.
# GCRA with a burst of one (shaping.gcra): `count` slots are taken together when the
# first is due now; the answer is {granted, seconds to wait} as strings (Lua numbers
# would be truncated to integers on the way out).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local interval = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < tat then return {'0', tostring(tat - now)} end
local new_tat = now + interval * count
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(interval * count * 1000) + 1000)
return {tostring(count), '0'}
"""


@dataclass(frozen=True, slots=True)
class Reservation:
    """Rate slots granted: the first now, the rest one interval apart; or a wait."""

    granted: int
    wait: float


class Cluster:
    """The shared limits of one daemon; every method answers None to mean "decide locally"."""

    def __init__(self, url: str, *, deadline: float = DEADLINE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=deadline, socket_connect_timeout=deadline,
            decode_responses=True)
        self._deadline = deadline
        self._clock = clock
        self._reachable = True
        self._retry_at = 0.0
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._reserve = self._redis.register_script(_RESERVE)
        # Host and PID for the operator reading the keys; the token keeps two daemons
        # apart whose containers share a host name and a PID.
        self._owner = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"
        self._leases = 0

    @property
    def reachable(self) -> bool:
        return self._reachable

    def new_lease_id(self) -> str:
        self._leases += 1
        return f"{self._owner}:{self._leases}"

    async def acquire(self, destination: str, lease: str, limit: int) -> bool | None:
        """Take (or renew) a connection lease; False at the limit; None: decide locally."""
        result = await self._call(lambda: self._acquire(
            keys=[f"{PREFIX}conn:{destination}"], args=[lease, limit, LEASE_SECONDS]))
        return None if result is None else bool(int(result))

    async def release(self, destination: str, lease: str) -> None:
        await self._call(lambda: self._redis.zrem(f"{PREFIX}conn:{destination}", lease))

    async def reserve(self, destination: str, rate: Rate, count: int = 1) -> Reservation | None:
        """Take `count` slots of the destination's rate at once (one round trip)."""
        result = await self._call(lambda: self._reserve(
            keys=[f"{PREFIX}rate:{destination}"], args=[repr(rate.interval), count]))
        if result is None:
            return None
        granted, wait = result
        return Reservation(granted=int(granted), wait=float(wait))

    async def suspend(self, destination: str, seconds: float, reply: str) -> bool | None:
        """Suspend the destination for every daemon of the cluster."""
        result = await self._call(lambda: self._redis.set(
            f"{PREFIX}suspend:{destination}", reply[:512], px=max(1, int(seconds * 1000))))
        return None if result is None else True

    async def suspended(self, destination: str) -> float | None:
        """Seconds the destination stays suspended (0.0: not suspended); None: unknown."""
        result = await self._call(lambda: self._redis.pttl(f"{PREFIX}suspend:{destination}"))
        if result is None:
            return None
        return max(0.0, int(result) / 1000.0)

    async def suspensions(self) -> list[tuple[str, float, str]] | None:
        """Every suspension in force: (destination, seconds left, reply); None: unknown."""
        async def listing() -> list[tuple[str, float, str]]:
            found = []
            prefix = f"{PREFIX}suspend:"
            async for key in self._redis.scan_iter(match=f"{prefix}*", count=500):
                reply, left = await self._redis.get(key), await self._redis.pttl(key)
                if reply is not None and int(left) > 0:
                    found.append((str(key)[len(prefix):], int(left) / 1000.0, str(reply)))
            return found
        return await self._call(listing)

    async def resume(self, destination: str) -> bool | None:
        result = await self._call(lambda: self._redis.delete(f"{PREFIX}suspend:{destination}"))
        return None if result is None else bool(result)

    async def probe(self) -> None:
        """While unreachable, ask again (at most every RETRY_SECONDS), so that an idle
        daemon also sees the server return and says so (`cluster` state=reachable)."""
        if not self._reachable:
            await self._call(self._redis.ping)

    async def close(self) -> None:
        await self._redis.aclose()

    async def _call(self, request: Callable[[], Awaitable[T]]) -> T | None:
        """One request within the deadline; None (and the state logged once) on failure."""
        if not self._reachable and self._clock() < self._retry_at:
            return None
        try:
            async with asyncio.timeout(self._deadline):
                result = await request()
        except (RedisError, OSError, TimeoutError) as exc:
            self._retry_at = self._clock() + RETRY_SECONDS
            if self._reachable:
                self._reachable = False
                event("cluster", None, logging.WARNING, state="unreachable",
                      error=_describe(exc))
            return None
        if not self._reachable:
            self._reachable = True
            event("cluster", None, state="reachable")
        return result


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200] if text else type(exc).__name__


def local_limit(limit: int, share: float) -> int:
    """A daemon's own limit while the cluster is unreachable: `limit * local_share`, >= 1."""
    return max(1, int(limit * share))
