"""Per-destination admission: suspensions, connection shares and rates (contract §9).

The delivery side asks this object before it opens a connection or starts a
transaction to a destination (shaping.destination_of), and tells it what replies said.
It keeps three things:

- suspensions, as one file per destination in the spool's `suspended/` folder (its
  content: the end of the suspension in epoch seconds and the reply), so that every
  daemon of the spool and the queue CLI see one the moment it is written; with a
  cluster, also as a Redis key that every host sees;
- connections open per destination, against the shape's `max_connections` divided among
  the spool's daemons (as the `[smtp]` limits are), or a cluster lease;
- each destination's GCRA state for `rate` and `connection_rate`, the shape's rate
  divided among the daemons, or the cluster's shared one.

A throttle (a reply rule) halves the destination's connection limit until it ends.
Nothing here blocks: each call answers at once with "go" or "wait this long".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mxsend import metrics
from mxsend.durable import make_dirs, write_atomic
from mxsend.shaping import Rate, Shape, gcra, throttled_limit

SUSPENDED_DIR = "suspended"


@dataclass(frozen=True, slots=True)
class Suspension:
    destination: str
    until: float
    reply: str


def suspension_file_name(destination: str) -> str:
    """A destination as a file name: its own characters, `/` and leading dots replaced."""
    return destination.replace("/", "_").lstrip(".") or "_"


def read_suspensions(spool: Path, now: float) -> list[Suspension]:
    """Every suspension of the spool still in force (the CLI's `queue suspended`)."""
    found: list[Suspension] = []
    with contextlib.suppress(FileNotFoundError), os.scandir(spool / SUSPENDED_DIR) as entries:
        for entry in entries:
            suspension = _read_suspension(Path(entry.path))
            if suspension is not None and suspension.until > now:
                found.append(suspension)
    return sorted(found, key=lambda s: s.destination)


def _read_suspension(path: Path) -> Suspension | None:
    try:
        data = json.loads(path.read_bytes())
        return Suspension(str(data["destination"]), float(data["until"]), str(data["reply"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_suspension(spool: Path, suspension: Suspension) -> None:
    """Durably, like every other spool write: a suspension survives a crash."""
    directory = spool / SUSPENDED_DIR
    make_dirs(directory)
    data = json.dumps({"destination": suspension.destination, "until": suspension.until,
                       "reply": suspension.reply[:512]}).encode()
    write_atomic(directory / suspension_file_name(suspension.destination), data)


def remove_suspension(spool: Path, destination: str) -> bool:
    try:
        os.unlink(spool / SUSPENDED_DIR / suspension_file_name(destination))
    except FileNotFoundError:
        return False
    return True


@dataclass(slots=True)
class _Destination:
    open: int = 0
    message_tat: float = 0.0
    connection_tat: float = 0.0
    throttled_until: float = 0.0
    suspended_until: float = 0.0
    checked_at: float = field(default=-math.inf)


class Limiter:
    """One daemon's view of its destinations; `share` is 1 / the spool's daemon count."""

    # How long a read of a destination's suspension file is trusted. A reply rule takes
    # effect at once in the daemon that read the reply; other daemons see the file
    # within this time.
    RECHECK = 0.05

    def __init__(self, spool: Path, *, share: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._spool = spool
        self._share = share
        self._clock = clock
        self._state: dict[str, _Destination] = {}

    def _of(self, destination: str) -> _Destination:
        state = self._state.get(destination)
        if state is None:
            state = self._state[destination] = _Destination()
        return state

    def suspended_until(self, destination: str) -> float:
        """When the destination's suspension ends (0.0: not suspended)."""
        state, now = self._of(destination), self._clock()
        if now - state.checked_at >= self.RECHECK:
            state.checked_at = now
            path = self._spool / SUSPENDED_DIR / suspension_file_name(destination)
            found = _read_suspension(path) if path.exists() else None
            state.suspended_until = found.until if found else 0.0
        return state.suspended_until if state.suspended_until > now else 0.0

    def recheck(self) -> None:
        """Read every suspension file afresh at its next use (`queue resume` ran)."""
        for state in self._state.values():
            state.checked_at = -math.inf

    def suspend(self, destination: str, seconds: float, reply: str) -> Suspension:
        now = self._clock()
        suspension = Suspension(destination, now + seconds, reply)
        state = self._of(destination)
        state.suspended_until, state.checked_at = suspension.until, now
        write_suspension(self._spool, suspension)
        # mxsend_suspended_destinations: the spool's suspensions in force (each daemon
        # sees them all; the gauge takes the largest, metrics.py).
        metrics.suspended(len(read_suspensions(self._spool, now)))
        return suspension

    def throttle(self, destination: str, seconds: float) -> None:
        self._of(destination).throttled_until = self._clock() + seconds

    def connection_limit(self, destination: str, shape: Shape | None, default: int) -> int:
        """This daemon's share of the shape's connections (else `default`, the caller's
        own per-domain share), halved while a reply rule throttles the destination."""
        if shape is None or shape.max_connections is None:
            limit = default
        else:
            limit = max(1, math.floor(shape.max_connections * self._share))
        state = self._state.get(destination)
        if state is not None and state.throttled_until > self._clock():
            return throttled_limit(limit)
        return limit

    def may_connect(self, destination: str, shape: Shape | None, default: int) -> float:
        """0.0 when a new connection may open now (it is counted), else seconds to wait."""
        limit = self.connection_limit(destination, shape, default)
        state = self._of(destination)
        if state.open >= limit:
            return math.inf  # until one closes: the caller waits for `closed`
        if shape is not None and shape.connection_rate is not None:
            rate = self._scaled(shape.connection_rate)
            decision = gcra(state.connection_tat, self._clock(), rate)
            if not decision.allowed:
                return decision.wait
            state.connection_tat = decision.tat
        state.open += 1
        return 0.0

    def opened(self, destination: str) -> None:
        """Count a connection another authority (the cluster) admitted, so that the
        local limit is right if this daemon has to fall back on it."""
        self._of(destination).open += 1

    def throttled(self, destination: str) -> bool:
        state = self._state.get(destination)
        return state is not None and state.throttled_until > self._clock()

    def closed(self, destination: str) -> None:
        state = self._of(destination)
        state.open = max(0, state.open - 1)

    def may_send(self, destination: str, shape: Shape | None) -> float:
        """0.0 when a message may start now (its rate slot is taken), else seconds to wait."""
        if shape is None or shape.rate is None:
            return 0.0
        state = self._of(destination)
        decision = gcra(state.message_tat, self._clock(), self._scaled(shape.rate))
        if decision.allowed:
            state.message_tat = decision.tat
        return decision.wait

    def book_send(self, destination: str, shape: Shape | None) -> float:
        """Like may_send, but a refused caller gets the next free slot booked for it:
        0.0 to start now, else the seconds until its own slot. Each waiting message
        then comes back once, at its slot, instead of all of them at the first one."""
        if shape is None or shape.rate is None:
            return 0.0
        state, now = self._of(destination), self._clock()
        slot = max(state.message_tat, now)
        state.message_tat = slot + self._scaled(shape.rate).interval
        return slot - now

    def _scaled(self, rate: Rate) -> Rate:
        """This daemon's part of a rate: the spool's daemons together keep to the whole."""
        return Rate(rate.count, rate.period / self._share) if self._share < 1 else rate
