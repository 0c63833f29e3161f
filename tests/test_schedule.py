"""The retry schedule: table tests and hypothesis invariants (no clock, no loop)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxsend.schedule import (
    GiveUp,
    after_temporary_failure,
    delay_warning_due,
    expired,
    expires_at,
    give_up_status,
    next_try,
    retry_interval,
)

RETRY = (300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)
T0 = 1_700_000_000.0


@pytest.mark.parametrize(
    ("attempts", "wait"),
    [(1, 300.0), (2, 600.0), (3, 1800.0), (6, 14400.0), (7, 14400.0), (100, 14400.0)],
)
def test_next_try_walks_the_list_and_repeats_the_last(attempts: int, wait: float) -> None:
    assert next_try(RETRY, attempts, T0) == T0 + wait


def test_single_interval_repeats_forever() -> None:
    assert [next_try([60.0], n, 0.0) for n in (1, 2, 50)] == [60.0, 60.0, 60.0]


@pytest.mark.parametrize(("retry", "attempts"), [((), 1), (RETRY, 0), (RETRY, -1)])
def test_retry_interval_rejects_nonsense(retry: tuple[float, ...], attempts: int) -> None:
    with pytest.raises(ValueError):
        retry_interval(retry, attempts)


@pytest.mark.parametrize(
    ("age", "max_age", "result"),
    [(0.0, 10.0, False), (9.999, 10.0, False), (10.0, 10.0, True), (11.0, 10.0, True)],
)
def test_expired(age: float, max_age: float, result: bool) -> None:
    assert expired(T0, T0 + age, max_age) is result


@pytest.mark.parametrize(
    ("age", "delay_warning", "already", "result"),
    [
        (3599.0, 3600.0, False, False),
        (3600.0, 3600.0, False, True),
        (9999.0, 3600.0, False, True),
        (9999.0, 3600.0, True, False),  # once only
        (9999.0, 0.0, False, False),  # 0 disables
    ],
)
def test_delay_warning_due(age: float, delay_warning: float, already: bool, result: bool) -> None:
    assert delay_warning_due(T0, T0 + age, delay_warning, already) is result


def test_force_last_try_gives_up_at_once() -> None:
    decision = after_temporary_failure(
        retry=RETRY, attempts=1, created=T0, now=T0 + 1, max_age=86400.0, force_last_try=True
    )
    assert decision.give_up is GiveUp.FORCED and decision.next_try is None


def test_expired_message_gives_up() -> None:
    decision = after_temporary_failure(
        retry=RETRY, attempts=9, created=T0, now=T0 + 86400.0, max_age=86400.0,
        force_last_try=False,
    )
    assert decision.give_up is GiveUp.EXPIRED and decision.next_try is None


def test_young_message_retries_on_schedule() -> None:
    decision = after_temporary_failure(
        retry=RETRY, attempts=2, created=T0, now=T0 + 400, max_age=86400.0,
        force_last_try=False,
    )
    assert decision.give_up is None and decision.next_try == T0 + 400 + 600


def test_last_try_is_pulled_in_to_the_expiry_time() -> None:
    # 4h interval, 1h of life left: try once more exactly at expiry, then give up.
    now = T0 + 86400.0 - 3600.0
    decision = after_temporary_failure(
        retry=RETRY, attempts=8, created=T0, now=now, max_age=86400.0, force_last_try=False
    )
    assert decision.next_try == expires_at(T0, 86400.0)
    then = after_temporary_failure(
        retry=RETRY, attempts=9, created=T0, now=decision.next_try, max_age=86400.0,
        force_last_try=False,
    )
    assert then.give_up is GiveUp.EXPIRED


@pytest.mark.parametrize(
    ("reason", "last", "status"),
    [
        (GiveUp.EXPIRED, "4.2.2", "4.2.2"),
        (GiveUp.EXPIRED, None, "4.4.7"),
        (GiveUp.FORCED, None, "4.0.0"),
        (GiveUp.FORCED, "4.7.1", "4.7.1"),
    ],
)
def test_give_up_status(reason: GiveUp, last: str | None, status: str) -> None:
    assert give_up_status(reason, last) == status


# --- invariants -------------------------------------------------------------------------

intervals = st.lists(st.floats(min_value=1.0, max_value=1e6), min_size=1, max_size=8)
times = st.floats(min_value=0.0, max_value=4e9)


@given(intervals, st.integers(min_value=1, max_value=10_000), times)
def test_next_try_is_in_the_future_by_a_listed_interval(
    retry: list[float], attempts: int, now: float
) -> None:
    later = next_try(retry, attempts, now)
    assert later > now
    assert retry_interval(retry, attempts) in retry
    if attempts >= len(retry):
        assert retry_interval(retry, attempts) == retry[-1]


@given(
    intervals,
    st.integers(min_value=1, max_value=10_000),
    times,
    st.floats(min_value=0.0, max_value=1e7),
    st.floats(min_value=1.0, max_value=1e7),
    st.booleans(),
)
def test_retry_decision_invariants(
    retry: list[float], attempts: int, created: float, age: float, max_age: float, force: bool
) -> None:
    now = created + age
    decision = after_temporary_failure(
        retry=retry, attempts=attempts, created=created, now=now, max_age=max_age,
        force_last_try=force,
    )
    assert (decision.give_up is None) != (decision.next_try is None)
    if force:
        assert decision.give_up is GiveUp.FORCED
    elif expired(created, now, max_age):
        assert decision.give_up is GiveUp.EXPIRED
    else:
        assert decision.next_try is not None
        assert now < decision.next_try <= expires_at(created, max_age)
        assert decision.next_try <= next_try(retry, attempts, now)


@given(times, st.floats(min_value=0.0, max_value=1e7), st.floats(min_value=0.0, max_value=1e7))
def test_delay_warning_never_repeats(created: float, age: float, delay: float) -> None:
    assert not delay_warning_due(created, created + age, delay, already=True)
