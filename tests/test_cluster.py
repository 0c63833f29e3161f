"""Limits shared across hosts, against a real redis-server on loopback (contract §9)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mxsend.cluster import Cluster, local_limit
from mxsend.shaping import Rate
from tests.fixtures.redis_server import REDIS_SERVER, RedisServer

pytestmark = pytest.mark.skipif(not Path(REDIS_SERVER).exists(),
                                reason="redis-server is not installed (scripts/test installs it)")


@pytest.fixture
async def hosts(redis_server: RedisServer) -> AsyncIterator[tuple[Cluster, Cluster]]:
    """Two daemons on two hosts: two clients of the same server."""
    one, two = Cluster(redis_server.url), Cluster(redis_server.url)
    yield one, two
    await one.close()
    await two.close()


async def test_connection_leases_hold_across_hosts(hosts: tuple[Cluster, Cluster]) -> None:
    one, two = hosts
    leases = [one.new_lease_id(), two.new_lease_id(), one.new_lease_id()]
    assert await one.acquire("gmail", leases[0], 2) is True
    assert await two.acquire("gmail", leases[1], 2) is True
    assert await one.acquire("gmail", leases[2], 2) is False      # the third, on any host
    assert await two.acquire("yahoo", leases[2], 2) is True       # another destination
    assert await one.acquire("gmail", leases[0], 2) is True       # a renewal is no new lease
    await two.release("gmail", leases[1])
    assert await one.acquire("gmail", leases[2], 2) is True


async def test_a_dead_hosts_leases_expire(hosts: tuple[Cluster, Cluster],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = hosts
    monkeypatch.setattr("mxsend.cluster.LEASE_SECONDS", 0.3)
    assert await one.acquire("d", "dead-host:1", 1) is True       # never released
    assert await two.acquire("d", "live:1", 1) is False
    deadline = time.monotonic() + 5
    while not await two.acquire("d", "live:1", 1):
        assert time.monotonic() < deadline, "the dead host's lease never expired"
        await asyncio.sleep(0.05)


async def test_rate_is_smooth_across_hosts(hosts: tuple[Cluster, Cluster]) -> None:
    one, two = hosts
    rate = Rate(20, 1.0)                                           # one per 50 ms
    granted: list[float] = []
    deadline = time.monotonic() + 5
    while len(granted) < 8:
        assert time.monotonic() < deadline
        for host in (one, two):
            reservation = await host.reserve("dest", rate)
            assert reservation is not None
            if reservation.granted:
                granted.append(time.monotonic())
            else:
                assert 0 < reservation.wait <= rate.interval + 0.01
                await asyncio.sleep(reservation.wait / 2)
    gaps = [b - a for a, b in itertools.pairwise(granted)]
    # The server's clock spaces grants one interval apart; our clock sees them no
    # closer than that, less the round trips' jitter.
    assert min(gaps) >= rate.interval * 0.8


async def test_a_batch_reservation_is_one_round_trip_for_several_slots(
        hosts: tuple[Cluster, Cluster]) -> None:
    one, two = hosts
    rate = Rate(10, 1.0)
    first = await one.reserve("batch", rate, count=5)
    assert first is not None and first.granted == 5 and first.wait == 0
    second = await two.reserve("batch", rate, count=1)
    assert second is not None and second.granted == 0
    assert 0.4 < second.wait <= 0.5 + 0.01                          # after the 5 reserved


async def test_suspension_is_seen_by_every_host(hosts: tuple[Cluster, Cluster]) -> None:
    one, two = hosts
    assert await two.suspended("gmail") == 0.0
    assert await one.suspend("gmail", 3600, "421 4.7.28 slow down") is True
    remaining = await two.suspended("gmail")
    assert remaining is not None and 3590 < remaining <= 3600
    assert await two.resume("gmail") is True
    assert await one.suspended("gmail") == 0.0


async def test_unreachable_server_falls_back_fast_logs_once_and_recovers(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("mxsend.cluster.RETRY_SECONDS", 0.2)
    cluster = Cluster(redis_server.url)
    try:
        assert await cluster.acquire("d", "a", 5) is True
        redis_server.stop()
        caplog.set_level(logging.INFO, logger="mxsend")
        for _ in range(5):
            started = time.monotonic()
            assert await cluster.acquire("d", "a", 5) is None        # decide locally
            assert time.monotonic() - started < 1.2                    # never over a second
        states = [r.__dict__["fields"]["state"] for r in caplog.records
                  if getattr(r, "event", None) == "cluster"]
        assert states == ["unreachable"]
        redis_server.start()
        deadline = time.monotonic() + 10
        while await cluster.acquire("d", "a", 5) is not True:
            assert time.monotonic() < deadline, "never reconnected"
            await asyncio.sleep(0.05)
        states = [r.__dict__["fields"]["state"] for r in caplog.records
                  if getattr(r, "event", None) == "cluster"]
        assert states == ["unreachable", "reachable"]
    finally:
        await cluster.close()


async def test_a_blackholed_server_costs_at_most_the_deadline() -> None:
    # A listening socket that never answers: the worst case of a "slow Redis".
    import socket
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        cluster = Cluster(f"redis://127.0.0.1:{port}/0", deadline=0.3)
        try:
            started = time.monotonic()
            assert await cluster.reserve("d", Rate(1, 1.0)) is None
            assert time.monotonic() - started < 1.0
        finally:
            await cluster.close()


@pytest.mark.parametrize(("limit", "share", "expected"), [(20, 1.0, 20), (20, 0.5, 10),
                                                           (3, 0.1, 1)])
def test_local_share(limit: int, share: float, expected: int) -> None:
    assert local_limit(limit, share) == expected


async def test_an_idle_daemon_sees_the_server_return(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("mxsend.cluster.RETRY_SECONDS", 0.1)
    cluster = Cluster(redis_server.url)
    caplog.set_level(logging.INFO, logger="mxsend")
    try:
        redis_server.stop()
        assert await cluster.acquire("d", "a", 5) is None
        assert not cluster.reachable
        redis_server.start()
        deadline = time.monotonic() + 10
        while not cluster.reachable:          # nothing but the heartbeat's probe
            assert time.monotonic() < deadline, "the probe never saw the server return"
            await cluster.probe()
            await asyncio.sleep(0.05)
        states = [r.__dict__["fields"]["state"] for r in caplog.records
                  if getattr(r, "event", None) == "cluster"]
        assert states == ["unreachable", "reachable"]
    finally:
        await cluster.close()
