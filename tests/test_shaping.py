"""Shaping decisions as tables: rates, GCRA, destinations, reply rules (contract §9)."""

from __future__ import annotations

import itertools

import pytest

from mxsend.config_values import parse_duration
from mxsend.errors import ConfigError
from mxsend.shaping import (
    Rate,
    ReplyAction,
    destination_of,
    gcra,
    match_reply,
    parse_rate,
    reply_rules_from_config,
    shapes_from_config,
    throttled_limit,
)


@pytest.mark.parametrize(("text", "count", "period"), [
    ("300/min", 300, 60.0), ("10/s", 10, 1.0), ("5/h", 5, 3600.0), ("1000/d", 1000, 86400.0),
    ("2/5m", 2, 300.0), (" 7 / hour ", 7, 3600.0), ("1/Second", 1, 1.0),
])
def test_rates_parse(text: str, count: int, period: float) -> None:
    assert parse_rate(text, "shape[0].rate") == Rate(count, period)


@pytest.mark.parametrize("text", ["", "300", "0/min", "3/0m", "1/fortnight", "-1/s", 5, None])
def test_bad_rates_name_the_key(text: object) -> None:
    with pytest.raises(ConfigError, match=r"^shape\[0\]\.rate: "):
        parse_rate(text, "shape[0].rate")


def test_gcra_spaces_events_one_interval_apart_and_allows_no_burst() -> None:
    rate = Rate(10, 1.0)                     # one every 0.1 s
    tat, allowed_at = 0.0, []
    now = 100.0
    while now < 101.0:                        # a caller retrying every 10 ms for 1 s
        decision = gcra(tat, now, rate)
        if decision.allowed:
            allowed_at.append(now)
        tat = decision.tat
        now = round(now + 0.01, 6)
    assert len(allowed_at) == 10
    gaps = [b - a for a, b in itertools.pairwise(allowed_at)]
    assert min(gaps) >= 0.1 - 1e-9


def test_gcra_refusal_says_how_long_and_keeps_the_state() -> None:
    rate = Rate(1, 2.0)
    first = gcra(0.0, 50.0, rate)
    assert first.allowed and first.tat == 52.0
    second = gcra(first.tat, 51.5, rate)
    assert not second.allowed and second.tat == 52.0 and second.wait == pytest.approx(0.5)
    assert gcra(second.tat, 52.0, rate).allowed


def test_gcra_idle_time_does_not_bank_a_burst() -> None:
    rate = Rate(1, 1.0)
    decision = gcra(0.0, 1000.0, rate)        # idle for a long time
    assert decision.allowed
    assert not gcra(decision.tat, 1000.0, rate).allowed


def test_gcra_burst_allows_that_many_back_to_back() -> None:
    rate, tat, allowed = Rate(1, 1.0), 0.0, 0
    for _ in range(5):
        decision = gcra(tat, 10.0, rate, burst=3)
        allowed += decision.allowed
        tat = decision.tat
    assert allowed == 3


SHAPES = shapes_from_config([
    {"hosts": ["*.google.com", "aspmx?.example"], "max_connections": 20, "rate": "300/min"},
    {"domains": ["Yahoo.com"], "name": "yahoo", "connection_rate": "10/s",
     "max_messages_per_connection": 100},
])


@pytest.mark.parametrize(("host", "domain", "expected"), [
    ("alt1.aspmx.l.google.com", "gmail.com", "*.google.com"),
    ("ALT1.ASPMX.L.GOOGLE.COM.", "example.org", "*.google.com"),
    ("aspmx2.example", "x.org", "*.google.com"),
    ("mta5.am0.yahoodns.net", "yahoo.com", "yahoo"),
    ("mta5.am0.yahoodns.net", "YAHOO.COM", "yahoo"),
    ("mx.example.net", "example.net", "mx.example.net"),     # no shape: the host itself
    ("google.com", "google.com", "google.com"),               # `*.` needs a label
])
def test_destinations(host: str, domain: str, expected: str) -> None:
    assert destination_of(SHAPES, host, domain)[0] == expected


def test_first_matching_shape_applies() -> None:
    shapes = shapes_from_config([{"domains": ["a.example"], "name": "first"},
                                 {"domains": ["a.example"], "name": "second"}])
    assert destination_of(shapes, "mx.a.example", "a.example")[0] == "first"


@pytest.mark.parametrize(("entries", "error"), [
    ({}, r"^shape: expected an array"),
    ([{}], r"^shape\[0\]: needs hosts or domains"),
    ([{"hosts": "x"}], r"^shape\[0\]\.hosts: "),
    ([{"hosts": ["x"], "rate": "fast"}], r"^shape\[0\]\.rate: "),
    ([{"hosts": ["x"], "max_connections": 0}], r"^shape\[0\]\.max_connections: "),
    ([{"hosts": ["x"], "bogus": 1}], r"^shape\[0\]\.bogus: unknown key"),
    ([{"hosts": ["x"]}, {"domains": ["x"]}], r"^shape\[1\]\.name: 'x' is already used"),
    ([{"hosts": ["x"], "name": "a b"}], r"^shape\[0\]\.name: "),
])
def test_bad_shapes_name_the_key(entries: object, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        shapes_from_config(entries)


RULES = reply_rules_from_config([
    {"pattern": r"^421[ -]4\.7\.28 ", "action": "suspend", "duration": "1h"},
    {"pattern": r"TSS04", "action": "Throttle", "duration": "30m"},
    {"pattern": r"^5\d\d .*mailbox full", "action": "defer"},
], parse_duration)


@pytest.mark.parametrize(("reply", "action"), [
    ("421 4.7.28 Our system has detected an unusual rate", ReplyAction.SUSPEND),
    ("421-4.7.28 [1.2.3.4] Gmail has detected", ReplyAction.SUSPEND),
    ("421 4.7.0 [TSS04] Messages temporarily deferred", ReplyAction.THROTTLE),
    ("552 5.2.2 Mailbox FULL", ReplyAction.DEFER),
    ("250 2.0.0 OK", None),
    ("421 4.7.280 not it", None),
])
def test_reply_rules_first_match_wins(reply: str, action: ReplyAction | None) -> None:
    rule = match_reply(RULES, reply)
    assert (rule.action if rule else None) == action


def test_reply_rule_durations() -> None:
    assert [r.duration for r in RULES] == [3600.0, 1800.0, 0.0]


@pytest.mark.parametrize(("entries", "error"), [
    ([{"action": "suspend", "duration": "1h"}], r"^reply_rule\[0\]\.pattern: "),
    ([{"pattern": "(", "action": "defer"}], r"^reply_rule\[0\]\.pattern: "),
    ([{"pattern": "x", "action": "explode"}], r"^reply_rule\[0\]\.action: "),
    ([{"pattern": "x", "action": "suspend"}], r"^reply_rule\[0\]\.duration: suspend needs"),
    ([{"pattern": "x", "action": "defer", "when": 1}], r"^reply_rule\[0\]\.when: unknown"),
])
def test_bad_reply_rules_name_the_key(entries: object, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        reply_rules_from_config(entries, parse_duration)


@pytest.mark.parametrize(("limit", "throttled"), [(20, 10), (3, 1), (1, 1)])
def test_throttle_halves_never_below_one(limit: int, throttled: int) -> None:
    assert throttled_limit(limit) == throttled
