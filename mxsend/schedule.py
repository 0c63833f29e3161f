"""The retry schedule: when to try again, when to give up, when to warn. Pure.

Every function takes the time as an argument (seconds since the epoch, as `time.time()`
gives) and returns a value; nothing here reads a clock, sleeps or logs. The daemon asks,
then acts and records the answer in the spool.

Rules (contract §3 `[queue]`, §4 ForceLastTry):

- After the n-th attempt (n >= 1) the message waits `retry[n-1]`; past the end of the
  list the last interval repeats, as Postfix's backoff does once it reaches its maximum.
- A message is expired once it has been queued for `max_age`. A temporary failure is
  final when the message is expired or when the script set ForceLastTry for that attempt.
- The next try is never scheduled later than the expiry time itself: a message whose
  next interval would overshoot gets one last try exactly at expiry instead of being
  bounced early (which would cut its life short by up to one interval) or late (which
  would overrun max_age by up to one interval).
- A delay warning (RFC 3461 §4.1 NOTIFY=DELAY) is due once per recipient after
  `delay_warning` seconds in the queue; 0 turns warnings off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

# RFC 3463 §3.5: X.4.7 "Delivery time expired" — used when a message expires without a
# more specific status from its last attempt.
EXPIRED_STATUS = "4.4.7"


class GiveUp(StrEnum):
    """Why a temporary failure became final."""

    FORCED = "forced"  # the script's ForceLastTry (contract §4)
    EXPIRED = "expired"  # queued for longer than queue.max_age


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do after an attempt that left recipients temporarily failed.

    Exactly one of `give_up` and `next_try` is set.
    """

    give_up: GiveUp | None
    next_try: float | None


def retry_interval(retry: Sequence[float], attempts: int) -> float:
    """The wait after `attempts` attempts: retry[attempts-1], the last one repeating."""
    if not retry:
        raise ValueError("the retry schedule is empty")
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    return retry[min(attempts, len(retry)) - 1]


def next_try(retry: Sequence[float], attempts: int, now: float) -> float:
    """When to try again after `attempts` attempts (>= 1), the last of them at `now`."""
    return now + retry_interval(retry, attempts)


def expires_at(created: float, max_age: float) -> float:
    """The moment a message queued at `created` stops being retried (Will-Retry-Until)."""
    return created + max_age


def expired(created: float, now: float, max_age: float) -> bool:
    """Has the message been queued for `max_age` or longer?"""
    return now >= expires_at(created, max_age)


def delay_warning_due(created: float, now: float, delay_warning: float, already: bool) -> bool:
    """Should a DELAY notice go out now? Once only, never when `delay_warning` is 0."""
    if already or delay_warning <= 0:
        return False
    return now - created >= delay_warning


def after_temporary_failure(
    *,
    retry: Sequence[float],
    attempts: int,
    created: float,
    now: float,
    max_age: float,
    force_last_try: bool,
) -> RetryDecision:
    """Retry or give up after an attempt (`attempts` counts it) failed temporarily.

    ForceLastTry wins over expiry so that the bounce says why the operator's script
    stopped retrying; otherwise an expired message gives up, and any other is retried no
    later than its expiry time, so that its last try falls exactly on max_age.
    """
    if force_last_try:
        return RetryDecision(give_up=GiveUp.FORCED, next_try=None)
    if expired(created, now, max_age):
        return RetryDecision(give_up=GiveUp.EXPIRED, next_try=None)
    when = min(next_try(retry, attempts, now), expires_at(created, max_age))
    return RetryDecision(give_up=None, next_try=when)


def give_up_status(reason: GiveUp, last_status: str | None) -> str:
    """The DSN Status for recipients given up on: the last temporary status if known.

    Like Postfix, a recipient given up on keeps the 4.x.x status of its last failure, so
    the report says what kept failing; with no reply on record, expiry is 4.4.7 (RFC 3463
    §3.5) and a forced last try 4.0.0.
    """
    if last_status:
        return last_status
    return EXPIRED_STATUS if reason is GiveUp.EXPIRED else "4.0.0"
