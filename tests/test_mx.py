"""MX resolution against a real DNS server on loopback (tests/fixtures/dns_server.py)."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxsend.config import DnsConfig
from mxsend.errors import PermanentFailure, Phase, TemporaryFailure
from mxsend.mx import MxHost, Resolver, normalise_domain, order_mx
from tests.fixtures.dns_server import DnsTestServer

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """A monotonic clock the test moves by hand, for TTL decisions without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver_for(
    server: DnsTestServer,
    *,
    timeout: float = 2.0,
    ipv6: bool = True,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
    failure_ttl: float = 30.0,
    max_entries: int = 10_000,
) -> Resolver:
    return Resolver(
        server.dns_config(timeout=timeout, ipv6=ipv6),
        rng=rng, clock=clock, failure_ttl=failure_ttl, max_entries=max_entries,
    )


async def wait_for(condition: Callable[[], Awaitable[bool]], limit: float = 5.0) -> None:
    """Bounded polling: await `condition()` until it is true, for at most `limit` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


# --- pure ordering --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([], []),
        ([(10, "a")], [(10, "a")]),
        ([(20, "b"), (10, "a"), (30, "c")], [(10, "a"), (20, "b"), (30, "c")]),
        ([(0, "z"), (65535, "y")], [(0, "z"), (65535, "y")]),
    ],
)
def test_order_mx_sorts_by_preference(
    records: list[tuple[int, str]], expected: list[tuple[int, str]]
) -> None:
    assert order_mx(records, random.Random(1)) == expected


def test_order_mx_shuffles_equal_preferences_only() -> None:
    records = [(20, "c"), (10, "a"), (10, "b"), (30, "d")]
    seen = set()
    for seed in range(50):
        ordered = order_mx(records, random.Random(seed))
        assert [pref for pref, _ in ordered] == [10, 10, 20, 30]
        assert ordered[2:] == [(20, "c"), (30, "d")]
        seen.add(tuple(host for _, host in ordered[:2]))
    assert seen == {("a", "b"), ("b", "a")}


def test_order_mx_is_reproducible_with_a_seed_and_leaves_input_alone() -> None:
    records = [(10, name) for name in "abcdef"]
    before = list(records)
    first = order_mx(records, random.Random(42))
    assert first == order_mx(records, random.Random(42))
    assert records == before
    assert any(order_mx(records, random.Random(seed)) != first for seed in range(5))


@given(st.lists(st.tuples(st.integers(0, 65535), st.text(min_size=1, max_size=5))), st.integers())
def test_order_mx_is_a_sorted_permutation(records: list[tuple[int, str]], seed: int) -> None:
    ordered = order_mx(records, random.Random(seed))
    assert sorted(ordered) == sorted(records)
    assert [p for p, _ in ordered] == sorted(p for p, _ in records)


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("Example.ORG", "example.org"),
        ("example.org.", "example.org"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("münchen.de", "xn--mnchen-3ya.de"),
    ],
)
def test_normalise_domain(domain: str, expected: str) -> None:
    assert normalise_domain(domain) == expected


@pytest.mark.parametrize("domain", ["", ".", "a..b", "x" * 64 + ".org", "xn--a.org\u0301"])
def test_normalise_domain_rejects_bad_names(domain: str) -> None:
    with pytest.raises(PermanentFailure) as info:
        normalise_domain(domain)
    assert info.value.dsn == "5.1.2"


# --- the test server itself -----------------------------------------------------------


def test_server_answers_nxdomain_nodata_and_empty_non_terminals(
    dns_server: DnsTestServer,
) -> None:
    import dns.nameserver
    import dns.resolver

    dns_server.add_a("a.b.example.test", "127.0.0.1")
    dns_server.add_txt("example.test", "v=spf1 -all", 'quote " inside')
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", dns_server.port)]
    assert [r.to_text() for r in resolver.resolve("a.b.example.test", "A")] == ["127.0.0.1"]
    txt = resolver.resolve("example.test", "TXT")
    assert [s for r in txt for s in r.strings] == [b"v=spf1 -all", b'quote " inside']
    assert resolver.resolve("b.example.test", "A", raise_on_no_answer=False).rrset is None
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("c.example.test", "A")
    dns_server.add_tlsa("_25._tcp.mx.example.test", 3, 1, 1, bytes(range(32)))
    tlsa = resolver.resolve("_25._tcp.mx.example.test", "TLSA")
    assert next(iter(tlsa)).cert == bytes(range(32))
    assert dns_server.query_count("example.test", "txt") == 1
    assert dns_server.query_count() == 5


def test_server_as_a_process_serves_a_zone_file(tmp_path: Path) -> None:
    zone = tmp_path / "zone.txt"
    zone.write_text(
        "$ORIGIN proc.test.\n$TTL 60\n"
        "@ IN SOA ns hostmaster 1 3600 600 86400 30\n"
        "@ IN MX 10 mx\nmx IN A 127.0.0.7\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.dns_server", "--zone", str(zone), "--port", "0"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        nameserver = proc.stdout.readline().strip()
        assert nameserver.startswith("127.0.0.1:")
        resolver = Resolver(DnsConfig(nameservers=(nameserver,), timeout=2.0))
        hosts = asyncio.run(resolver.resolve("proc.test"))
        assert hosts == [MxHost("mx.proc.test", 10, ("127.0.0.7",))]
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


# --- resolution -----------------------------------------------------------------------


async def test_mx_hosts_in_preference_order_with_ipv6_first(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("example.org", 20, "mx2.example.org")
    dns_server.add_mx("example.org", 10, "MX1.example.org")
    dns_server.add_a("mx1.example.org", "127.0.0.11")
    dns_server.add_aaaa("mx1.example.org", "::1")
    dns_server.add_a("mx2.example.org", "127.0.0.12")
    dns_server.add_a("mx2.example.org", "127.0.0.13")
    hosts = await resolver_for(dns_server).resolve("example.org")
    assert [(h.name, h.preference, h.implicit) for h in hosts] == [
        ("mx1.example.org", 10, False),
        ("mx2.example.org", 20, False),
    ]
    assert hosts[0].addresses == ("::1", "127.0.0.11")
    # Records inside one RRset have no order (RFC 2181 §5): compare as a set.
    assert sorted(hosts[1].addresses) == ["127.0.0.12", "127.0.0.13"]


async def test_equal_preferences_are_shuffled_per_call_with_a_seeded_rng(
    dns_server: DnsTestServer,
) -> None:
    for index in range(3):
        dns_server.add_mx("spread.test", 10, f"mx{index}.spread.test")
        dns_server.add_a(f"mx{index}.spread.test", f"127.0.1.{index}")
    dns_server.add_mx("spread.test", 5, "primary.spread.test")
    dns_server.add_a("primary.spread.test", "127.0.1.9")

    async def orders(seed: int) -> list[tuple[str, ...]]:
        resolver = resolver_for(dns_server, rng=random.Random(seed))
        return [tuple(h.name for h in await resolver.resolve("spread.test")) for _ in range(30)]

    first = await orders(3)
    assert first == await orders(3)  # the seed decides, nothing else
    assert {order[0] for order in first} == {"primary.spread.test"}
    assert len(set(first)) > 1  # cached plans are still shuffled on every call
    assert {frozenset(order[1:]) for order in first} == {
        frozenset({"mx0.spread.test", "mx1.spread.test", "mx2.spread.test"})
    }
    assert dns_server.query_count("spread.test", "MX") == 2  # one per resolver


async def test_null_mx_is_permanent_5_1_10(dns_server: DnsTestServer) -> None:
    dns_server.add_null_mx("nomail.test")
    dns_server.add_a("nomail.test", "127.0.0.1")  # must not become an implicit MX
    with pytest.raises(PermanentFailure) as info:
        await resolver_for(dns_server).resolve("nomail.test")
    error = info.value
    assert (error.dsn, error.phase, error.host) == ("5.1.10", Phase.DNS, "nomail.test")
    assert "null MX" in info.value.message


async def test_nxdomain_is_permanent_5_1_2(dns_server: DnsTestServer) -> None:
    with pytest.raises(PermanentFailure) as info:
        await resolver_for(dns_server).resolve("nowhere.test")
    assert info.value.dsn == "5.1.2"
    assert info.value.phase is Phase.DNS
    assert "no such domain" in info.value.message


async def test_no_mx_uses_the_domains_own_addresses(dns_server: DnsTestServer) -> None:
    dns_server.add_a("implicit.test", "127.0.0.21")
    dns_server.add_aaaa("implicit.test", "::1")
    hosts = await resolver_for(dns_server).resolve("implicit.test")
    assert hosts == [MxHost("implicit.test", 0, ("::1", "127.0.0.21"), implicit=True)]


async def test_no_mx_and_no_address_is_permanent(dns_server: DnsTestServer) -> None:
    dns_server.add_txt("bare.test", "exists but takes no mail")
    with pytest.raises(PermanentFailure) as info:
        await resolver_for(dns_server).resolve("bare.test")
    assert info.value.dsn == "5.4.4"


async def test_servfail_is_temporary_4_4_3(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("broken.test", 10, "mx.broken.test")
    dns_server.set_servfail("broken.test")
    with pytest.raises(TemporaryFailure) as info:
        await resolver_for(dns_server).resolve("broken.test")
    assert (info.value.dsn, info.value.phase) == ("4.4.3", Phase.DNS)
    assert "SERVFAIL" in info.value.message


async def test_timeout_is_temporary_and_bounded_by_dns_timeout(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("slow.test", 10, "mx.slow.test")
    dns_server.set_delay("slow.test", 60.0)  # later than any test waits
    with pytest.raises(TemporaryFailure) as info:
        # Bounded: with dns.timeout ignored this would wait for the 60 s answer.
        await asyncio.wait_for(resolver_for(dns_server, timeout=0.3).resolve("slow.test"), 20)
    assert info.value.dsn == "4.4.3"
    assert "timed out" in info.value.message


async def test_late_answer_within_the_timeout_is_used(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("late.test", 10, "mx.late.test")
    dns_server.add_a("mx.late.test", "127.0.0.3")
    dns_server.set_delay("late.test", 0.2)
    hosts = await resolver_for(dns_server, timeout=3.0).resolve("late.test")
    assert [h.addresses for h in hosts] == [("127.0.0.3",)]


async def test_mx_hosts_that_do_not_resolve_are_skipped(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("partial.test", 10, "gone.partial.test")
    dns_server.add_mx("partial.test", 20, "failing.partial.test")
    dns_server.add_mx("partial.test", 30, "noaddr.partial.test")
    dns_server.add_mx("partial.test", 40, "ok.partial.test")
    dns_server.set_servfail("failing.partial.test")
    dns_server.add_txt("noaddr.partial.test", "no A here")
    dns_server.add_a("ok.partial.test", "127.0.0.40")
    hosts = await resolver_for(dns_server).resolve("partial.test")
    assert hosts == [MxHost("ok.partial.test", 40, ("127.0.0.40",))]


async def test_every_mx_host_nxdomain_is_permanent(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("dangling.test", 10, "a.nowhere.test")
    dns_server.add_mx("dangling.test", 20, "b.nowhere.test")
    with pytest.raises(PermanentFailure) as info:
        await resolver_for(dns_server).resolve("dangling.test")
    assert info.value.dsn == "5.1.2"
    assert "a.nowhere.test" in info.value.message


async def test_no_usable_mx_host_is_temporary(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("flaky.test", 10, "a.nowhere.test")
    dns_server.add_mx("flaky.test", 20, "mx.flaky.test")
    dns_server.set_servfail("mx.flaky.test")
    with pytest.raises(TemporaryFailure) as info:
        await resolver_for(dns_server).resolve("flaky.test")
    assert info.value.dsn == "4.4.3"
    assert "mx.flaky.test" in info.value.message


async def test_mx_host_behind_a_cname_and_duplicates(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("alias.test", 10, "mail.alias.test")
    dns_server.add_mx("alias.test", 10, "mail.alias.test.")
    dns_server.add_cname("mail.alias.test", "real.alias.test")
    dns_server.add_a("real.alias.test", "127.0.0.50")
    hosts = await resolver_for(dns_server).resolve("alias.test")
    assert hosts == [MxHost("mail.alias.test", 10, ("127.0.0.50",))]


async def test_large_answers_come_over_tcp(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("big.test", 10, "mx.big.test")
    expected = tuple(f"127.0.2.{n}" for n in range(1, 61))
    for ip in expected:
        dns_server.add_a("mx.big.test", ip)
    hosts = await resolver_for(dns_server, ipv6=False).resolve("big.test")
    assert sorted(hosts[0].addresses) == sorted(expected)
    assert dns_server.tcp_query_count >= 1


@pytest.mark.parametrize(
    ("domain", "name", "address"),
    [
        ("[127.0.0.9]", "[127.0.0.9]", "127.0.0.9"),
        ("[IPv6:::1]", "[IPv6:::1]", "::1"),
        ("[ipv6:0:0:0:0:0:0:0:1]", "[IPv6:::1]", "::1"),
    ],
)
async def test_address_literals_need_no_dns(
    dns_server: DnsTestServer, domain: str, name: str, address: str
) -> None:
    hosts = await resolver_for(dns_server).resolve(domain)
    assert hosts == [MxHost(name, 0, (address,))]
    assert dns_server.query_count() == 0


async def test_bad_literal_is_permanent_and_ipv6_literal_needs_ipv6(
    dns_server: DnsTestServer,
) -> None:
    with pytest.raises(PermanentFailure):
        await resolver_for(dns_server).resolve("[300.1.2.3]")
    with pytest.raises(TemporaryFailure) as info:
        await resolver_for(dns_server, ipv6=False).resolve("[IPv6:::1]")
    assert "dns.ipv6" in info.value.message


async def test_ipv6_off_drops_aaaa(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("dual.test", 10, "v6only.dual.test")
    dns_server.add_mx("dual.test", 20, "both.dual.test")
    dns_server.add_aaaa("v6only.dual.test", "::1")
    dns_server.add_aaaa("both.dual.test", "::1")
    dns_server.add_a("both.dual.test", "127.0.0.60")
    on = await resolver_for(dns_server).resolve("dual.test")
    assert [(h.name, h.addresses) for h in on] == [
        ("v6only.dual.test", ("::1",)),
        ("both.dual.test", ("::1", "127.0.0.60")),
    ]
    dns_server.reset_counts()
    off = await resolver_for(dns_server, ipv6=False).resolve("dual.test")
    assert [(h.name, h.addresses) for h in off] == [("both.dual.test", ("127.0.0.60",))]
    assert dns_server.query_count(rdtype="AAAA") == 0


async def test_domain_is_case_insensitive_and_idn_goes_out_as_a_labels(
    dns_server: DnsTestServer,
) -> None:
    dns_server.add_mx("xn--bcher-kva.test", 10, "mx.xn--bcher-kva.test")
    dns_server.add_a("mx.xn--bcher-kva.test", "127.0.0.70")
    resolver = resolver_for(dns_server)
    for domain in ("bücher.test", "BÜCHER.test", "xn--bcher-kva.test", "XN--BCHER-KVA.TEST."):
        hosts = await resolver.resolve(domain)
        assert hosts == [MxHost("mx.xn--bcher-kva.test", 10, ("127.0.0.70",))]
    assert dns_server.query_count("xn--bcher-kva.test", "MX") == 1


async def test_ipv6_loopback_nameserver_form() -> None:
    try:
        server = DnsTestServer("::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert server.nameserver == f"[::1]:{server.port}"
        server.add_mx("six.test", 10, "mx.six.test")
        server.add_a("mx.six.test", "127.0.0.80")
        hosts = await Resolver(DnsConfig(nameservers=(server.nameserver,))).resolve("six.test")
        assert hosts[0].addresses == ("127.0.0.80",)
    finally:
        server.stop()


# --- caching --------------------------------------------------------------------------


async def test_cache_hit_sends_no_query_and_is_cheap(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("cached.test", 10, "mx.cached.test")
    dns_server.add_a("mx.cached.test", "127.0.0.90")
    resolver = resolver_for(dns_server)
    first = await resolver.resolve("cached.test")
    queries = dns_server.query_count()
    assert queries == 3  # MX, AAAA, A
    for _ in range(1000):
        # A hit is a dictionary lookup: the coroutine finishes at its first step,
        # without waiting on anything (no query, no task, no event-loop round).
        hit = resolver.resolve("cached.test")
        with pytest.raises(StopIteration) as done:
            hit.send(None)
        assert done.value.value == first
    assert dns_server.query_count() == queries


async def test_mx_hosts_shared_by_domains_are_looked_up_once(dns_server: DnsTestServer) -> None:
    for domain in ("one.test", "two.test"):
        dns_server.add_mx(domain, 10, "mx.shared.test")
    dns_server.add_a("mx.shared.test", "127.0.0.91")
    resolver = resolver_for(dns_server)
    await resolver.resolve("one.test")
    await resolver.resolve("two.test")
    assert dns_server.query_count("mx.shared.test", "A") == 1


async def test_concurrent_lookups_share_one_query(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("busy.test", 10, "mx.busy.test")
    dns_server.add_a("mx.busy.test", "127.0.0.92")
    dns_server.set_delay("busy.test", 0.2)
    resolver = resolver_for(dns_server)
    results = await asyncio.gather(*(resolver.resolve("busy.test") for _ in range(50)))
    assert all(hosts == results[0] for hosts in results)
    assert dns_server.query_count("busy.test", "MX") == 1


async def test_a_cancelled_caller_does_not_cancel_the_others(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("shy.test", 10, "mx.shy.test")
    dns_server.add_a("mx.shy.test", "127.0.0.93")
    dns_server.set_delay("shy.test", 0.3)
    resolver = resolver_for(dns_server)
    impatient = asyncio.ensure_future(resolver.resolve("shy.test"))
    patient = asyncio.ensure_future(resolver.resolve("shy.test"))

    async def asked() -> bool:
        return dns_server.query_count("shy.test", "MX") == 1

    await wait_for(asked)  # the shared lookup is under way
    impatient.cancel()
    assert (await patient)[0].addresses == ("127.0.0.93",)
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_ttl_expiry_with_a_tiny_ttl(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("short.test", 10, "mx.short.test", ttl=1)
    dns_server.add_a("mx.short.test", "127.0.0.94", ttl=1)
    resolver = resolver_for(dns_server, ipv6=False)
    await resolver.resolve("short.test")
    assert await resolver.resolve("short.test")
    assert dns_server.query_count("short.test", "MX") == 1
    dns_server.remove("mx.short.test", "A")
    dns_server.add_a("mx.short.test", "127.0.0.95", ttl=1)

    async def refreshed() -> bool:
        hosts = await resolver.resolve("short.test")
        return hosts[0].addresses == ("127.0.0.95",)

    await wait_for(refreshed, limit=5.0)
    assert dns_server.query_count("short.test", "MX") >= 2


async def test_plan_lives_as_long_as_its_shortest_ttl(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("ttl.test", 10, "mx.ttl.test", ttl=3600)
    dns_server.add_a("mx.ttl.test", "127.0.0.96", ttl=60)
    clock = FakeClock()
    resolver = resolver_for(dns_server, ipv6=False, clock=clock)
    await resolver.resolve("ttl.test")
    clock.now += 59
    await resolver.resolve("ttl.test")
    assert dns_server.query_count() == 2
    clock.now += 2  # the A record expired, the MX record did not
    await resolver.resolve("ttl.test")
    assert dns_server.query_count("mx.ttl.test", "A") == 2
    assert dns_server.query_count("ttl.test", "MX") == 1


async def test_negative_answers_are_cached_by_the_soa_minimum(dns_server: DnsTestServer) -> None:
    dns_server.load_zone(
        "$TTL 3600\n@ IN SOA ns hostmaster 1 3600 600 86400 120\n", origin="neg.test"
    )
    clock = FakeClock()
    resolver = resolver_for(dns_server, clock=clock)
    for _ in range(3):
        with pytest.raises(PermanentFailure):
            await resolver.resolve("missing.neg.test")
    assert dns_server.query_count("missing.neg.test") == 1
    clock.now += 121
    dns_server.add_mx("missing.neg.test", 10, "mx.neg.test")
    dns_server.add_a("mx.neg.test", "127.0.0.97")
    assert (await resolver.resolve("missing.neg.test"))[0].addresses == ("127.0.0.97",)


async def test_failures_are_cached_briefly(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("down.test", 10, "mx.down.test")
    dns_server.add_a("mx.down.test", "127.0.0.98")
    dns_server.set_servfail("down.test")
    clock = FakeClock()
    resolver = resolver_for(dns_server, clock=clock, failure_ttl=30.0)
    for _ in range(3):
        with pytest.raises(TemporaryFailure):
            await resolver.resolve("down.test")
    assert dns_server.query_count("down.test") == 1
    dns_server.set_servfail("down.test", on=False)
    clock.now += 31
    assert (await resolver.resolve("down.test"))[0].addresses == ("127.0.0.98",)


async def test_cache_is_bounded(dns_server: DnsTestServer) -> None:
    for index in range(6):
        dns_server.add_a(f"d{index}.bound.test", "127.0.0.99")
    resolver = resolver_for(dns_server, ipv6=False, max_entries=4)
    for index in itertools.chain(range(6), range(6)):
        await resolver.resolve(f"d{index}.bound.test")
    # Six names through a four-entry cache: the oldest are evicted and asked again.
    assert dns_server.query_count(rdtype="MX") > 6
    assert len(resolver._plans) <= 4 and len(resolver._records) <= 4


async def test_unreachable_nameserver_is_temporary() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never answers
        resolver = Resolver(DnsConfig(nameservers=(f"127.0.0.1:{port}",), timeout=0.3))
        with pytest.raises(TemporaryFailure) as info:
            await resolver.resolve("example.test")
    assert info.value.dsn == "4.4.3"
