"""Traffic shaping decisions (contract §9): shapes, rates and reply rules, as pure values.

Rules of this file:

- Nothing here does I/O, reads a clock or logs: time comes in as an argument, and the
  callers (the daemon's limiter, the Redis script) keep the state these functions return.
- A *destination* is what a shape or a suspension applies to: the first `[[shape]]` entry
  that matches (by MX host pattern or by recipient domain), or, without one, the MX host
  itself. Its name is stable, so that every daemon on a spool (and every host of a
  cluster) agrees on it.
- Rates are GCRA (the generic cell rate algorithm, ITU-T I.371): a theoretical arrival
  time per destination, advanced by one emission interval per message. With a burst
  of one, two messages are never closer than the interval: smooth, no bursts.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from mxsend.errors import ConfigError

T = TypeVar("T")

_PERIODS = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hour": 3600.0,
    "d": 86400.0, "day": 86400.0,
}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` events per `period` seconds."""

    count: int
    period: float

    @property
    def interval(self) -> float:
        """The emission interval: the least time between two events."""
        return self.period / self.count

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s"


def parse_rate(value: object, key: str) -> Rate:
    """`300/min`, `10/s`, `5/h`, `1000/d`, `2/5m` -> Rate; errors name the key."""
    match = _RATE_RE.match(value) if isinstance(value, str) else None
    if match is None or match.group(3).lower() not in _PERIODS:
        raise ConfigError(f"{key}: expected a rate such as 300/min or 10/s, got {value!r}")
    count = int(match.group(1))
    multiple = int(match.group(2)) if match.group(2) else 1
    if count < 1 or multiple < 1:
        raise ConfigError(f"{key}: a rate needs at least 1 per period, got {value!r}")
    return Rate(count=count, period=multiple * _PERIODS[match.group(3).lower()])


@dataclass(frozen=True, slots=True)
class GcraDecision:
    """The answer for one event: allowed now, or the time to wait; and the new state."""

    allowed: bool
    tat: float          # the theoretical arrival time to keep for the next decision
    wait: float         # seconds until an event would be allowed (0 when allowed)


def gcra(tat: float, now: float, rate: Rate, burst: int = 1) -> GcraDecision:
    """One GCRA decision. `tat` is the state kept from the last one (0 at first).

    An event is allowed when `now >= tat - (burst - 1) * interval`; it then moves the
    theoretical arrival time one interval past `max(tat, now)`. A refused event leaves
    the state as it was, so waiting costs nothing.
    """
    interval = rate.interval
    allowed_from = tat - (burst - 1) * interval
    if now >= allowed_from:
        return GcraDecision(True, max(tat, now) + interval, 0.0)
    return GcraDecision(False, tat, allowed_from - now)


@dataclass(frozen=True, slots=True)
class Shape:
    """One `[[shape]]` entry: which destinations it covers and the limits they share."""

    name: str                              # the destination name: stable, log- and label-safe
    hosts: tuple[str, ...] = ()            # MX host patterns, `*` and `?`, case-insensitive
    domains: tuple[str, ...] = ()          # recipient domains, exact, case-insensitive
    max_connections: int | None = None
    max_messages_per_connection: int | None = None
    rate: Rate | None = None
    connection_rate: Rate | None = None

    def matches(self, mx_host: str, domain: str) -> bool:
        host, dom = mx_host.lower().rstrip("."), domain.lower().rstrip(".")
        return dom in self.domains or any(fnmatch.fnmatchcase(host, p) for p in self.hosts)


def destination_of(shapes: Sequence[Shape], mx_host: str, domain: str) -> tuple[str, Shape | None]:
    """The destination a transaction counts against: the first matching shape, else the host."""
    for shape in shapes:
        if shape.matches(mx_host, domain):
            return shape.name, shape
    return mx_host.lower().rstrip("."), None


class ReplyAction(StrEnum):
    SUSPEND = "suspend"     # no new transaction to the destination for `duration`
    THROTTLE = "throttle"   # halve its connections for `duration`
    BOUNCE = "bounce"       # classify the reply as permanent
    DEFER = "defer"         # classify the reply as temporary


@dataclass(frozen=True, slots=True)
class ReplyRule:
    """One `[[reply_rule]]`: a case-insensitive regex on the whole reply text."""

    pattern: re.Pattern[str]
    action: ReplyAction
    duration: float = 0.0

    def __repr__(self) -> str:
        return f"ReplyRule({self.pattern.pattern!r}, {self.action}, {self.duration:g}s)"


def match_reply(rules: Sequence[ReplyRule], reply_text: str) -> ReplyRule | None:
    """The first rule whose pattern matches the reply (`"421 4.7.28 ..."`), or None."""
    for rule in rules:
        if rule.pattern.search(reply_text):
            return rule
    return None


def throttled_limit(limit: int) -> int:
    """A throttled destination gets half its connections, never fewer than one."""
    return max(1, limit // 2)


# -- config ------------------------------------------------------------------------------

_SHAPE_KEYS = {"hosts", "domains", "max_connections", "max_messages_per_connection", "rate",
               "connection_rate", "name"}
_RULE_KEYS = {"pattern", "action", "duration"}


def _strings(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{key}: expected a list of non-empty strings, got {value!r}")
    return tuple(v.strip().lower().rstrip(".") for v in value)


def _positive_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise ConfigError(f"{key}: expected a whole number from 1 to 1000000, got {value!r}")
    return value


def _optional(entry: Mapping[str, object], where: str, key: str,
              convert: Callable[[object, str], T]) -> T | None:
    return convert(entry[key], f"{where}.{key}") if key in entry else None


def shapes_from_config(entries: object) -> tuple[Shape, ...]:
    """The `[[shape]]` array of tables, validated; errors name `shape[N].key`."""
    if not isinstance(entries, list):
        raise ConfigError("shape: expected an array of tables ([[shape]])")
    shapes: list[Shape] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"shape[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a table")
        unknown = sorted(set(entry) - _SHAPE_KEYS)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key")
        hosts = _strings(entry["hosts"], f"{where}.hosts") if "hosts" in entry else ()
        domains = _strings(entry["domains"], f"{where}.domains") if "domains" in entry else ()
        if not hosts and not domains:
            raise ConfigError(f"{where}: needs hosts or domains")
        name = entry.get("name", (hosts or domains)[0])
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.*?-]{1,100}", name):
            raise ConfigError(f"{where}.name: expected a short name, got {name!r}")
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} is already used by another shape")
        names.add(name)

        shapes.append(Shape(
            name=name, hosts=hosts, domains=domains,
            max_connections=_optional(entry, where, "max_connections", _positive_int),
            max_messages_per_connection=_optional(
                entry, where, "max_messages_per_connection", _positive_int),
            rate=_optional(entry, where, "rate", parse_rate),
            connection_rate=_optional(entry, where, "connection_rate", parse_rate),
        ))
    return tuple(shapes)


def reply_rules_from_config(
    entries: object, duration: Callable[[object, str], float]
) -> tuple[ReplyRule, ...]:
    """The `[[reply_rule]]` array, validated; `duration` is config.parse_duration."""
    if not isinstance(entries, list):
        raise ConfigError("reply_rule: expected an array of tables ([[reply_rule]])")
    rules: list[ReplyRule] = []
    for index, entry in enumerate(entries):
        where = f"reply_rule[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a table")
        unknown = sorted(set(entry) - _RULE_KEYS)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key")
        pattern = entry.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{where}.pattern: expected a regular expression")
        try:
            compiled = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(f"{where}.pattern: {exc}") from None
        try:
            action = ReplyAction(str(entry.get("action", "")).lower())
        except ValueError:
            raise ConfigError(f"{where}.action: expected suspend, throttle, bounce or defer, "
                              f"got {entry.get('action')!r}") from None
        seconds = duration(entry["duration"], f"{where}.duration") if "duration" in entry else 0.0
        if action in (ReplyAction.SUSPEND, ReplyAction.THROTTLE) and not (
                seconds > 0 and math.isfinite(seconds)):
            raise ConfigError(f"{where}.duration: {action} needs a duration such as 1h")
        rules.append(ReplyRule(pattern=compiled, action=action, duration=seconds))
    return tuple(rules)
