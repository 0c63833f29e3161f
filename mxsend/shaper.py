"""The delivery side of traffic shaping (contract §9): the one object the Deliverer asks.

`Deliverer` is given a `Shaper` when the config has shapes, reply rules or a cluster
(otherwise none at all: the fast path costs one `is None` per destination). Before a
transaction it asks, for the transaction's destination (shaping.destination_of):

1. `suspended_until`: a reply rule suspended it (on this daemon, another daemon of the
   spool through the `suspended/` file, or another host through Redis);
2. `admit_session` before a new connection: `admit_connection` (max_connections,
   connection_rate, the cluster's lease), which answers a `Lease` to give back when the
   connection closes, then `admit_message`;
3. `admit_message` before each transaction on a pooled connection (rate).

Every "no" is an epoch time to come back at, never a wait: the Deliverer turns it into
an outcome with `wait_until`, and the attempt releases the message with that next try
without counting an attempt (attempt.py). So a message that must wait for its
destination gives its worker back at once, and a slow destination cannot starve a fast
one. To keep such messages from coming back all at once (and being refused again, one
claim each), every refusal books a time: a rate refusal books the next free GCRA slot
for that very message (honoured when it returns), a connection refusal books the next
estimated free turn (transaction time / connection limit, measured).

Across hosts, Redis decides (cluster.py): connection leases, and rate slots reserved in
batches sized to the destination's recent demand (at most a second's worth), so a
busy destination costs one round trip per batch, not per message. When Redis cannot
answer, the limiter's own limits (the shape's, shared among the spool's daemons, times
`cluster.local_share`) decide.

After a transaction, `apply_reply_rules` checks each reply against `[[reply_rule]]`:
suspend and throttle act on the destination; bounce and defer reclassify the reply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mxsend.cluster import LEASE_SECONDS, Cluster
from mxsend.config_shaping import ShapingConfig
from mxsend.errors import MxsendError
from mxsend.limiter import Limiter
from mxsend.log import event, get_logger
from mxsend.outcome import DeliveryStatus, RecipientOutcome
from mxsend.shaping import Rate, ReplyAction, Shape, destination_of, match_reply, throttled_limit

log = get_logger()

# A booked slot is honoured when its message comes back this long before or after it
# (the due plan wakes on time; a busy daemon may be a little late).
BOOKING_EARLY = 0.05
BOOKING_GRACE = 30.0
# A rate slot this close is waited for in the delivery itself (a fast rate hands out
# slots microseconds apart); a release and a new dispatch would cost milliseconds.
INLINE_WAIT = 0.05
# How long a daemon trusts its last look at a destination's suspension in Redis.
CLUSTER_SUSPENSION_RECHECK = 1.0
# Rate slots reserved per round trip: the destination's demand of the last second,
# at most a second's worth of its rate and at most BATCH_MAX.
BATCH_SECONDS = 1.0
BATCH_MAX = 64
# A destination's transaction time until one is measured, and the least used.
DEFAULT_TRANSACTION_SECONDS = 1.0
MIN_TRANSACTION_SECONDS = 0.05
_EWMA = 0.2
_MAX_REMEMBERED = 10_000
_MAX_BOOKINGS = 200_000


def suspended_reason(destination: str) -> str:
    """Why a message waits (its `last_error`); `queue resume` looks for it."""
    return f"waiting: destination {destination} is suspended"


@dataclass(frozen=True, slots=True)
class Target:
    """A transaction's destination: the name its limits and suspension are kept under."""

    name: str
    shape: Shape | None


class Lease:
    """One connection counted against its destination; given back once, when it closes."""

    __slots__ = ("_released", "_shaper", "lease_id", "renewed", "target")

    def __init__(self, shaper: Shaper, target: Target, lease_id: str | None) -> None:
        self.target = target
        self.lease_id = lease_id      # the cluster's lease, None when decided locally
        self.renewed = shaper.clock()
        self._shaper = shaper
        self._released = False

    @property
    def max_transactions(self) -> int | None:
        shape = self.target.shape
        return shape.max_messages_per_connection if shape is not None else None

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._shaper.connection_closed(self)


def reclassify(outcome: RecipientOutcome, action: ReplyAction) -> RecipientOutcome:
    """A `bounce` or `defer` reply rule: the reply counts as 5xx or 4xx. An accepted
    recipient is never changed: the server has the message (RFC 5321 §4.1.1.4)."""
    if outcome.status is DeliveryStatus.SENT:
        return outcome
    status = DeliveryStatus.BOUNCED if action is ReplyAction.BOUNCE else DeliveryStatus.DEFERRED
    digit = "5" if status is DeliveryStatus.BOUNCED else "4"
    dsn = digit + outcome.dsn[1:] if outcome.dsn[:1] in ("4", "5") else f"{digit}.0.0"
    return dataclasses.replace(outcome, status=status, dsn=dsn)


class _Demand:
    """Messages asked for per second, for the size of the next batch reservation."""

    __slots__ = ("count", "previous", "start")

    def __init__(self, now: float) -> None:
        self.start, self.count, self.previous = now, 0, 0

    def add(self, now: float) -> int:
        if now - self.start >= BATCH_SECONDS:
            self.previous = self.count if now - self.start < 2 * BATCH_SECONDS else 0
            self.start, self.count = now, 0
        self.count += 1
        return max(self.count, self.previous)


def batch_size(rate: Rate, demand: int) -> int:
    """Slots to reserve in one round trip: what the last second asked for, within reason."""
    return max(1, min(demand, BATCH_MAX, math.floor(BATCH_SECONDS / rate.interval)))


class Shaper:
    """Shapes, reply rules and the cluster, for one daemon; see the module doc."""

    def __init__(self, config: ShapingConfig, spool: Path, *, processes: int,
                 per_domain: int, cluster: Cluster | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._per_domain = per_domain
        self._cluster = cluster
        share = 1.0 / max(1, processes)
        if cluster is not None:
            share *= config.cluster.local_share   # the fallback while Redis is gone
        self.limiter = Limiter(spool, share=share, clock=clock)
        self._targets: dict[tuple[str, str], Target] = {}
        self._bookings: dict[tuple[str, str], float] = {}
        self._pruned_at = -math.inf
        self._connection_turn: dict[str, float] = {}
        self._transaction_seconds: dict[str, float] = {}
        self._remote_suspensions: dict[str, tuple[float, float]] = {}
        self._slots: dict[str, deque[float]] = {}
        self._demand: dict[str, _Demand] = {}
        self._cluster_turn: dict[str, tuple[float, float]] = {}   # (free at, next turn)
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def configured(cls, config: ShapingConfig, spool: Path, *, processes: int,
                   per_domain: int) -> Shaper | None:
        """The daemon's shaper, or None when nothing is configured (the fast path)."""
        if not config.active:
            return None
        cluster = Cluster(config.cluster.redis) if config.cluster.redis else None
        return cls(config, spool, processes=processes, per_domain=per_domain, cluster=cluster)

    def reconfigure(self, config: ShapingConfig) -> None:
        """SIGHUP: new shapes and rules; counts and suspensions carry on."""
        if config.cluster != self.config.cluster:
            log.warning("SIGHUP: [cluster] changes take effect at the next restart")
            config = dataclasses.replace(config, cluster=self.config.cluster)
        self.config = config
        self._targets.clear()

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        if self._cluster is not None:
            await self._cluster.close()

    # -- which destination ---------------------------------------------------------

    def target(self, mx_host: str, domain: str) -> Target:
        key = (mx_host, domain)
        found = self._targets.get(key)
        if found is None:
            if len(self._targets) >= _MAX_REMEMBERED:
                self._targets.clear()
            name, shape = destination_of(self.config.shapes, mx_host, domain)
            found = self._targets[key] = Target(name, shape)
        return found

    # -- suspensions -----------------------------------------------------------------

    async def suspended_until(self, target: Target) -> float:
        """When the destination's suspension ends (epoch seconds); 0.0: not suspended."""
        until = self.limiter.suspended_until(target.name)
        if self._cluster is not None:
            until = max(until, await self._cluster_suspended(target.name))
        return until

    async def _cluster_suspended(self, name: str) -> float:
        assert self._cluster is not None
        now = self.clock()
        checked, until = self._remote_suspensions.get(name, (-math.inf, 0.0))
        if now - checked >= CLUSTER_SUSPENSION_RECHECK:
            remaining = await self._cluster.suspended(name)
            if remaining is not None:   # unknown: keep what we last knew
                until = now + remaining if remaining > 0 else 0.0
            self._remote_suspensions[name] = (now, until)
        return until if until > now else 0.0

    async def probe(self) -> None:
        """The daemon's heartbeat: an unreachable cluster is asked again."""
        if self._cluster is not None:
            await self._cluster.probe()

    def recheck(self) -> None:
        """`queue resume` (a rescan request): look at every suspension afresh, so mail
        it made due is not held back by what this daemon last knew."""
        self.limiter.recheck()
        self._remote_suspensions.clear()

    # -- connections -------------------------------------------------------------

    async def admit_connection(self, target: Target) -> Lease | float:
        """A lease for a new connection, or the epoch time to come back at."""
        name, shape = target.name, target.shape
        limited = shape is not None and (shape.max_connections is not None
                                         or shape.connection_rate is not None)
        if not limited and not self.limiter.throttled(name):
            self.limiter.opened(name)
            return Lease(self, target, None)
        if self._cluster is not None and limited:
            assert shape is not None
            decided = await self._cluster_connect(name, shape)
            if isinstance(decided, Lease | float):
                return decided
            # None: Redis did not answer; decide locally
        wait = self.limiter.may_connect(name, shape, self._per_domain)
        if wait == 0.0:
            return Lease(self, target, None)
        if math.isinf(wait):
            return self._next_connection_turn(target)
        return self.clock() + wait

    async def _cluster_connect(self, name: str, shape: Shape) -> Lease | float | None:
        assert self._cluster is not None
        lease_id = self._cluster.new_lease_id()
        target = Target(name, shape)
        if shape.max_connections is not None:
            limit = shape.max_connections
            if self.limiter.throttled(name):
                limit = throttled_limit(limit)
            granted = await self._cluster.acquire(name, lease_id, limit)
            if granted is None:
                return None
            if not granted:
                return self._next_connection_turn(target)
        if shape.connection_rate is not None:
            reservation = await self._cluster.reserve(f"{name}#connect", shape.connection_rate)
            if reservation is None or not reservation.granted:
                if shape.max_connections is not None:
                    await self._cluster.release(name, lease_id)
                if reservation is None:
                    return None
                return self.clock() + reservation.wait
        self.limiter.opened(name)
        return Lease(self, target, lease_id if shape.max_connections is not None else None)

    def _next_connection_turn(self, target: Target) -> float:
        """At the connection limit: come back when a connection is likely free, each
        refused message one estimated turn after the one before."""
        now, name = self.clock(), target.name
        limit = self.limiter.connection_limit(name, target.shape, self._per_domain)
        if target.shape is not None and target.shape.max_connections is not None:
            limit = min(limit, target.shape.max_connections)
        seconds = self._transaction_seconds.get(name, DEFAULT_TRANSACTION_SECONDS)
        turn = max(self._connection_turn.get(name, 0.0), now) + seconds / max(1, limit)
        self._connection_turn[name] = turn
        return turn

    def connection_closed(self, lease: Lease) -> None:
        self.limiter.closed(lease.target.name)
        if lease.lease_id is not None and self._cluster is not None:
            task = asyncio.get_running_loop().create_task(
                self._cluster.release(lease.target.name, lease.lease_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def renew(self, lease: Lease) -> None:
        """Keep a busy connection's cluster lease alive (it expires so a dead host's do)."""
        if lease.lease_id is None or self._cluster is None:
            return
        now = self.clock()
        if now - lease.renewed >= LEASE_SECONDS / 3:
            lease.renewed = now
            shape = lease.target.shape
            limit = shape.max_connections if shape and shape.max_connections else 1
            await self._cluster.acquire(lease.target.name, lease.lease_id, limit)

    def observed(self, target: Target, seconds: float) -> None:
        """A transaction's duration, for the estimate of when a connection frees up."""
        seconds = max(MIN_TRANSACTION_SECONDS, seconds)
        old = self._transaction_seconds.get(target.name)
        self._transaction_seconds[target.name] = (
            seconds if old is None else old + _EWMA * (seconds - old))

    # -- messages ---------------------------------------------------------------

    async def admit_session(self, target: Target, queue_id: str,
                            make_room: Callable[[], bool]) -> Lease | float:
        """A lease and a rate slot for a new session, or when to come back. `make_room`
        closes an idle session of the destination (other ServerActions) holding a place."""
        admitted = await self.admit_connection(target)
        if not isinstance(admitted, Lease) and make_room():
            admitted = await self.admit_connection(target)
        if not isinstance(admitted, Lease):
            return admitted
        wait = await self.admit_message(target, queue_id)
        if wait:
            admitted.release()
            return wait
        return admitted

    async def admit_message(self, target: Target, queue_id: str, lease: object = None
                            ) -> float:
        """0.0: the transaction may start now (its rate slot is taken); else the epoch
        time to come back at, booked for this message where the rate allows it. `lease`:
        the pooled session's, kept alive. A slot due within INLINE_WAIT is waited for
        here: releasing the message and dispatching it again costs far more."""
        if isinstance(lease, Lease):
            await self.renew(lease)
        shape = target.shape
        if shape is None or shape.rate is None:
            return 0.0
        at = await self._message_slot(target, queue_id, shape.rate)
        wait = at - self.clock()
        if wait <= 0.0:
            return 0.0
        if wait <= INLINE_WAIT:
            await asyncio.sleep(wait)
            return 0.0
        return at

    async def _message_slot(self, target: Target, queue_id: str, rate: Rate) -> float:
        """When this message's rate slot is (0.0: now), booked if it must come back."""
        now = self.clock()
        key = (target.name, queue_id)
        booked = self._bookings.pop(key, None)
        if booked is not None and booked - BOOKING_EARLY <= now <= booked + BOOKING_GRACE:
            return 0.0   # its own slot, booked when it was refused
        if self._cluster is not None:
            slot = await self._cluster_slot(target.name, rate, now)
            if slot is not None:
                at, granted = slot
                if at <= now:
                    return 0.0
                if granted and at - now > INLINE_WAIT:
                    self._book(key, at)
                return at
        assert target.shape is not None
        wait = self.limiter.book_send(target.name, target.shape)
        if wait <= 0.0:
            return 0.0
        if wait > INLINE_WAIT:
            self._book(key, now + wait)
        return now + wait

    def _book(self, key: tuple[str, str], at: float) -> None:
        if len(self._bookings) >= _MAX_BOOKINGS:
            now = self.clock()
            if now - self._pruned_at >= 1.0:   # a scan at most once a second
                self._pruned_at = now
                self._bookings = {k: t for k, t in self._bookings.items()
                                  if t + BOOKING_GRACE >= now}
            if len(self._bookings) >= _MAX_BOOKINGS:
                return   # unbooked, it is simply refused again when it comes back
        self._bookings[key] = at

    async def _cluster_slot(self, name: str, rate: Rate, now: float
                            ) -> tuple[float, bool] | None:
        """(time, granted) of a rate slot from the cluster; None: decide locally."""
        assert self._cluster is not None
        slots = self._slots.setdefault(name, deque())
        while slots and slots[0] < now - rate.interval:
            slots.popleft()   # reserved and not used in time: gone
        if slots:
            return slots.popleft(), True
        demand = self._demand.get(name)
        if demand is None:
            demand = self._demand[name] = _Demand(now)
        count = batch_size(rate, demand.add(now))
        free_at, turn = self._cluster_turn.get(name, (0.0, 0.0))
        if now < free_at:
            # The cluster said when its next slot is free: no round trip before then.
            # This daemon's refused messages come back one interval apart.
            turn = max(free_at, turn)
            self._cluster_turn[name] = (free_at, turn + rate.interval)
            return turn, False
        reservation = await self._cluster.reserve(name, rate, count)
        if reservation is None:
            return None
        if reservation.granted:
            slots.extend(now + i * rate.interval for i in range(1, reservation.granted))
            return now, True
        free_at = now + reservation.wait
        turn = max(free_at, turn)
        self._cluster_turn[name] = (free_at, turn + rate.interval)
        return turn, False

    # -- replies ----------------------------------------------------------------

    async def apply_reply_rules(self, target: Target, outcomes: Sequence[RecipientOutcome],
                                seconds: float | None = None) -> list[RecipientOutcome]:
        """Each server reply against the rules, in order, first match wins. `seconds`:
        the transaction's time, when one ran (`observed`)."""
        if seconds is not None:
            self.observed(target, seconds)
        rules = self.config.reply_rules
        if not rules:
            return list(outcomes)
        result: list[RecipientOutcome] = []
        acted: set[str] = set()
        for outcome in outcomes:
            rule = None
            if outcome.relay is not None and outcome.wait_until is None:
                rule = match_reply(rules, outcome.response)
            if rule is None:
                result.append(outcome)
            elif rule.action in (ReplyAction.BOUNCE, ReplyAction.DEFER):
                result.append(reclassify(outcome, rule.action))
            else:
                if outcome.response not in acted:   # one reply, several recipients
                    acted.add(outcome.response)
                    await self._act(target, rule.action, rule.duration, outcome.response)
                result.append(outcome)
        return result

    async def _act(self, target: Target, action: ReplyAction, seconds: float,
                   reply: str) -> None:
        if action is ReplyAction.THROTTLE:
            self.limiter.throttle(target.name, seconds)
            log.warning("destination %s throttled for %.0fs after: %s", target.name, seconds,
                        reply)
            return
        try:
            suspension = self.limiter.suspend(target.name, seconds, reply)
        except (OSError, MxsendError) as exc:   # the spool said no: this daemon still holds it back
            log.error("could not record the suspension of %s: %s", target.name, exc)
            until = self.clock() + seconds
        else:
            until = suspension.until
        self._remote_suspensions[target.name] = (self.clock(), until)
        event("suspended", None, logging.WARNING, destination=target.name,
              until=round(until, 3), reply=reply)
        if self._cluster is not None:
            await self._cluster.suspend(target.name, seconds, reply)
