"""The Shaper's decisions: bookings, connection turns, reply rules, the cluster's batches."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mxsend.attempt import split_waiting
from mxsend.cluster import Cluster
from mxsend.config import config_from_mapping
from mxsend.config_shaping import ShapingConfig
from mxsend.errors import ConfigError
from mxsend.outcome import DeliveryStatus, RecipientOutcome, waiting_outcomes
from mxsend.shaper import Lease, Shaper, batch_size, reclassify
from mxsend.shaping import ReplyAction, Shape, parse_rate, reply_rules_from_config
from tests.fixtures.redis_server import RedisServer


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


SLOW = Shape(name="slow", domains=("slow.test",), max_connections=2,
             rate=parse_rate("2/s", "rate"))


def shaper(tmp_path: Path, clock: Clock, *, rules: object = (), processes: int = 1,
           cluster: Cluster | None = None) -> Shaper:
    config = ShapingConfig(
        shapes=(SLOW,),
        reply_rules=reply_rules_from_config(list(rules), lambda v, k: float(str(v))))  # type: ignore[arg-type]
    return Shaper(config, tmp_path, processes=processes, per_domain=10, cluster=cluster,
                  clock=clock)


def outcome(response: str, status: DeliveryStatus = DeliveryStatus.DEFERRED,
            address: str = "a@slow.test") -> RecipientOutcome:
    return RecipientOutcome(address=address, status=status, dsn=response[4:9],
                            response=response, phase=None, relay="mx[127.0.0.2]:25",
                            remote_mta="mx", tls=None)


async def test_refused_messages_each_book_their_own_slot(tmp_path: Path) -> None:
    clock = Clock()
    s = shaper(tmp_path, clock)
    target = s.target("mx.slow.test", "slow.test")
    assert target.name == "slow"
    assert await s.admit_message(target, "m0") == 0.0
    # Three more at once: booked one interval apart, not all at the first free slot.
    assert [await s.admit_message(target, f"m{i}") for i in (1, 2, 3)] == [
        1000.5, 1001.0, 1001.5]
    clock.now = 1001.0
    assert await s.admit_message(target, "m2") == 0.0       # back at its slot: goes
    assert await s.admit_message(target, "late") == 1002.0  # behind the bookings


async def test_two_daemons_of_a_spool_share_the_rate(tmp_path: Path) -> None:
    s = shaper(tmp_path, Clock(), processes=2)
    target = s.target("mx.slow.test", "slow.test")
    assert await s.admit_message(target, "m0") == 0.0
    assert await s.admit_message(target, "m1") == 1001.0    # 1/s each: 2/s together


async def test_at_the_connection_limit_messages_come_back_a_turn_apart(
        tmp_path: Path) -> None:
    clock = Clock()
    s = shaper(tmp_path, clock)
    target = s.target("mx.slow.test", "slow.test")
    leases = [await s.admit_connection(target) for _ in range(2)]
    assert all(isinstance(lease, Lease) for lease in leases)
    s.observed(target, 0.4)
    assert await s.admit_connection(target) == pytest.approx(1000.2)   # 0.4 s / 2
    assert await s.admit_connection(target) == pytest.approx(1000.4)
    first = leases[0]
    assert isinstance(first, Lease)
    first.release()
    first.release()                                           # once only
    assert isinstance(await s.admit_connection(target), Lease)
    assert not isinstance(await s.admit_connection(target), Lease)


async def test_an_unshaped_destination_is_never_held(tmp_path: Path) -> None:
    s = shaper(tmp_path, Clock())
    target = s.target("mx.other.test", "other.test")
    assert target.name == "mx.other.test" and target.shape is None
    for _ in range(50):
        assert isinstance(await s.admit_connection(target), Lease)
    assert await s.admit_message(target, "m") == 0.0


async def test_suspend_rule_suspends_the_destination_once_per_reply(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    s = shaper(tmp_path, clock, rules=[
        {"pattern": r"^421[ -]4\.7\.28 ", "action": "suspend", "duration": "3600"}])
    target = s.target("mx.slow.test", "slow.test")
    reply = "421 4.7.28 too fast"
    outcomes = [outcome(reply, address=a) for a in ("a@slow.test", "b@slow.test")]
    assert await s.apply_reply_rules(target, outcomes) == outcomes
    assert await s.suspended_until(target) == 4600.0
    assert [r.getMessage() for r in caplog.records].count("suspended") == 1
    assert (tmp_path / "suspended" / "slow").exists()


async def test_bounce_and_defer_rules_reclassify_but_never_an_accepted_recipient(
        tmp_path: Path) -> None:
    s = shaper(tmp_path, Clock(), rules=[
        {"pattern": "mailbox full", "action": "bounce"},
        {"pattern": "^550 5.7.1 try later", "action": "defer"}])
    target = s.target("mx.slow.test", "slow.test")
    full, later, sent = (outcome("452 4.2.2 mailbox full"), outcome("550 5.7.1 try later",
                         DeliveryStatus.BOUNCED), outcome("250 2.0.0 mailbox full ok",
                                                          DeliveryStatus.SENT))
    got = await s.apply_reply_rules(target, [full, later, sent])
    assert [(o.status, o.dsn) for o in got] == [
        (DeliveryStatus.BOUNCED, "5.2.2"), (DeliveryStatus.DEFERRED, "4.7.1"),
        (DeliveryStatus.SENT, sent.dsn)]
    assert reclassify(full, ReplyAction.DEFER) == full


def test_waiting_outcomes_are_split_from_the_tried_ones() -> None:
    tried = outcome("450 4.2.0 later")
    waits = waiting_outcomes(["x@a"], 2000.0, "waiting") + waiting_outcomes(
        ["y@a"], 1500.0, "sooner")
    assert split_waiting([tried, *waits]) == ([tried], waits[1])
    assert split_waiting([tried]) == ([tried], None)


@pytest.mark.parametrize(("rate", "demand", "expected"), [
    ("2/s", 1, 1), ("2/s", 10, 2), ("300/min", 3, 3), ("100000/s", 500, 64), ("1/h", 9, 1)])
def test_batch_size(rate: str, demand: int, expected: int) -> None:
    assert batch_size(parse_rate(rate, "r"), demand) == expected


@pytest.mark.parametrize(("section", "error"), [
    ({"cluster": {"redis": "http://x"}}, "cluster.redis"),
    ({"cluster": {"local_share": 0}}, "cluster.local_share"),
    ({"cluster": {"local_share": True}}, "cluster.local_share"),
    ({"cluster": {"nodes": 3}}, "cluster.nodes: unknown key"),
    ({"shape": [{"hosts": ["a"], "rate": "fast"}]}, "shape[0].rate"),
    ({"reply_rule": [{"pattern": "x", "action": "suspend"}]}, "reply_rule[0].duration"),
])
def test_config_errors_name_the_key(section: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        config_from_mapping(section)


def test_nothing_configured_means_no_shaper(tmp_path: Path) -> None:
    config = config_from_mapping({})
    assert not config.shaping.active
    assert Shaper.configured(config.shaping, tmp_path, processes=1, per_domain=10) is None


async def test_a_busy_destination_costs_one_round_trip_per_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every refusal counted as one: no slot is waited for inline (INLINE_WAIT).
    monkeypatch.setattr("mxsend.shaper.INLINE_WAIT", 0.0)
    server = RedisServer(tmp_path)
    server.start()
    try:
        fast = Shape(name="fast", domains=("fast.test",), rate=parse_rate("100/s", "r"))
        config = ShapingConfig(shapes=(fast,))
        cluster = Cluster(server.url)
        s = Shaper(config, tmp_path, processes=1, per_domain=10, cluster=cluster)
        target = s.target("mx.fast.test", "fast.test")
        calls = 0
        reserve = cluster.reserve

        async def counted(*args: object, **kwargs: object) -> object:
            nonlocal calls
            calls += 1
            return await reserve(*args, **kwargs)  # type: ignore[arg-type]

        cluster.reserve = counted  # type: ignore[method-assign]
        # 200 messages due at once: one grant, one refusal that says when to ask again.
        waits = [await s.admit_message(target, f"m{i}") for i in range(200)]
        assert waits.count(0.0) == 1 and calls == 2
        # Then a steady 200/s for a second against 100/s, each refused or booked message
        # coming back at the time it was given (as the due plan brings it back): the
        # batches grow with the demand, so most messages cost no round trip of their own.
        calls, started, pending = 0, 0, [(0.0, f"m{i}") for i in range(200)]
        for i in range(200):
            await asyncio.sleep(0.005)
            now = time.time()
            due = [p for p in pending if p[0] <= now]
            pending = [p for p in pending if p[0] > now]
            for _, queue_id in [*due, (0.0, f"n{i}")]:
                at = await s.admit_message(target, queue_id)
                if at == 0.0:
                    started += 1
                else:
                    pending.append((at, queue_id))
        assert started >= 50 and calls <= started / 4, (started, calls)
        await s.close()
    finally:
        server.stop()


async def test_a_slot_due_within_the_inline_wait_is_waited_for_not_released(
        tmp_path: Path) -> None:
    # A fast rate hands out slots milliseconds apart: coming back later would cost a
    # release and a new dispatch per message, so the delivery waits for it instead.
    fast = Shape(name="fast", domains=("fast.test",), rate=parse_rate("200/s", "r"))
    s = Shaper(ShapingConfig(shapes=(fast,)), tmp_path, processes=1, per_domain=10)
    target = s.target("mx.fast.test", "fast.test")
    started = time.monotonic()
    assert [await s.admit_message(target, f"m{i}") for i in range(4)] == [0.0] * 4
    assert time.monotonic() - started >= 3 * fast.rate.interval * 0.9   # spaced, not burst
    slow = Shape(name="slow", domains=("slow.test",), rate=parse_rate("2/s", "r"))
    s2 = Shaper(ShapingConfig(shapes=(slow,)), tmp_path, processes=1, per_domain=10)
    target2 = s2.target("mx.slow.test", "slow.test")
    assert await s2.admit_message(target2, "a") == 0.0
    assert await s2.admit_message(target2, "b") > time.time()          # released, booked
