"""Traffic shaping end to end (contract §9): the daemon as a real process, real SMTP
receivers that record sessions and arrival times, a real DNS server, a real Redis."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mxsend.shaper import CLUSTER_SUSPENSION_RECHECK
from tests.fixtures.daemon import REPO, DaemonProcess, wait_until, write_config
from tests.fixtures.dns_server import DnsTestServer
from tests.fixtures.smtp_receiver import Behaviour, Receiver, ReceiverGroup
from tests.test_daemon_e2e import drop

pytestmark = pytest.mark.slow

Start = Callable[..., DaemonProcess]
GMAIL_421 = ("421 4.7.28 [127.0.0.2] Our system has detected an unusual rate of "
             "unsolicited mail originating from your IP address.")


def config(tmp_path: Path, dns: DnsTestServer, receivers: ReceiverGroup, extra: str = "",
           name: str = "mxsend.toml", spool: str = "spool",
           **sections: dict[str, object]) -> Path:
    base: dict[str, dict[str, object]] = {
        "spool": {"path": str(tmp_path / spool)},
        "dns": {"nameservers": [dns.nameserver], "timeout": "2s", "ipv6": False},
        "smtp": {"port": receivers.port, "helo_name": "mxsend.test"},
        "queue": {"retry": ["1s"]},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    path = write_config(tmp_path, base, name=name)
    path.write_text(path.read_text() + "\n" + extra)
    return path


def queue_cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mxsend", "-c", str(config_path), "queue",
                           *args], capture_output=True, text=True, timeout=30, cwd=REPO)


def gaps(receiver: Receiver) -> list[float]:
    times = sorted(m.received_at for m in receiver.messages)
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.fixture
def two_domains(dns_server: DnsTestServer) -> DnsTestServer:
    """slow.test -> mx.slow.test (127.0.0.2), fast.test -> mx.fast.test (127.0.0.3)."""
    for name, ip in (("slow", "127.0.0.2"), ("fast", "127.0.0.3")):
        dns_server.add_mx(f"{name}.test", 10, f"mx.{name}.test")
        dns_server.add_a(f"mx.{name}.test", ip)
    return dns_server


def test_a_slow_destination_never_starves_a_fast_one(
        tmp_path: Path, two_domains: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start) -> None:
    slow = smtp_receivers.start("127.0.0.2")
    fast = smtp_receivers.start("127.0.0.3")
    # Two workers only: a shaped message that held its worker while it waited for its
    # slot would hold up everything behind it.
    path = config(tmp_path, two_domains, smtp_receivers,
                  extra='[[shape]]\ndomains = ["slow.test"]\nrate = "2/s"\n',
                  smtp={"max_connections": 2})
    spool = tmp_path / "spool"
    for i in range(12):
        drop(spool, f"s{i}", "alice@src.test", f"u{i}@slow.test")
    process = daemon(path)
    slow.wait_for(1, timeout=30)
    for i in range(20):
        drop(spool, f"f{i}", "alice@src.test", f"u{i}@fast.test")
    fast.wait_for(20, timeout=30)
    # The slow mail takes 5.5 s at 2/s; the fast mail, queued after it started, is all
    # out before half of it. (Workers that waited for the slow slots would have let the
    # fast mail through only once the last slow message had its slot.)
    assert len(slow.messages) < 6, "the fast mail waited for the slow destination's rate"
    slow.wait_for(12, timeout=30)
    # 2/s, smooth: 11 intervals of 0.5 s at least (arrival jitter allowed for).
    times = sorted(m.received_at for m in slow.messages)
    assert times[-1] - times[0] >= 11 * 0.5 * 0.9
    assert min(gaps(slow)) >= 0.25
    # Waiting for the rate is not an attempt: every message went on its first.
    sent = process.wait_event("delivery", count=32, status="sent")
    assert {e["attempt"] for e in sent} == {1}
    assert not process.find("delivery", status="deferred")


def test_max_connections_and_messages_per_connection_hold(
        tmp_path: Path, two_domains: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start) -> None:
    slow = smtp_receivers.start("127.0.0.2")
    path = config(tmp_path, two_domains, smtp_receivers,
                  extra=('[[shape]]\nhosts = ["mx.slow.test"]\nmax_connections = 2\n'
                         'max_messages_per_connection = 3\n'))
    spool = tmp_path / "spool"
    for i in range(24):
        drop(spool, f"s{i}", "alice@src.test", f"u{i}@slow.test")
    process = daemon(path)
    slow.wait_for(24, timeout=60)
    assert slow.max_concurrent_sessions() <= 2
    assert all(len(s.transactions) <= 3 for s in slow.sessions)
    assert len(slow.sessions) >= 8
    sent = process.wait_event("delivery", count=24, status="sent")
    assert {e["attempt"] for e in sent} == {1}


def test_a_421_4_7_28_suspends_the_destination_while_other_mail_flows(
        tmp_path: Path, two_domains: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start) -> None:
    slow = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(rcpt={"*": GMAIL_421}))
    fast = smtp_receivers.start("127.0.0.3")
    path = config(tmp_path, two_domains, smtp_receivers,
                  extra=("[[reply_rule]]\npattern = '^421[ -]4\\.7\\.28 '\n"
                         'action = "suspend"\nduration = "1h"\n'))
    spool = tmp_path / "spool"
    drop(spool, "s0", "alice@src.test", "u0@slow.test")
    process = daemon(path)
    [suspended] = process.wait_event("suspended")
    assert suspended["destination"] == "mx.slow.test"
    assert suspended["reply"].startswith("421 4.7.28")
    for i in range(1, 4):
        drop(spool, f"s{i}", "alice@src.test", f"u{i}@slow.test")
    for i in range(5):
        drop(spool, f"f{i}", "alice@src.test", f"u{i}@fast.test")
    fast.wait_for(5, timeout=30)
    # The suspended destination saw only the one transaction that was answered 421.
    process.wait_event("queued", count=9)
    listed = queue_cli(path, "suspended", "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)["suspended"]
    assert entry["destination"] == "mx.slow.test" and entry["reply"].startswith("421 4.7.28")

    def waiting() -> bool:
        shown = [json.loads(queue_cli(path, "show", f"s{i}", "--json").stdout)
                 for i in range(1, 4)]
        return all(m["attempts"] == 0 and m["next_try"] > entry["until"] - 5 for m in shown)

    wait_until(waiting, 20, message=lambda: "s1..s3 waiting, uncounted, until the end\n"
               + process.output())
    assert len(slow.transactions) == 1
    assert not process.find("delivery", recipient="u1@slow.test")

    slow.behaviour = Behaviour()
    resumed = queue_cli(path, "resume", "mx.slow.test")
    assert resumed.returncode == 0, resumed.stderr
    slow.wait_for(4, timeout=30)
    assert json.loads(queue_cli(path, "suspended", "--json").stdout)["suspended"] == []
    assert queue_cli(path, "resume", "mx.slow.test").returncode == 1


# --- across hosts: two daemons, two spools, one Redis ----------------------------------


def _two_hosts(tmp_path: Path, dns: DnsTestServer, smtp: ReceiverGroup, redis_url: str,
               extra: str) -> tuple[Path, Path]:
    cluster = {"redis": redis_url}
    one = config(tmp_path, dns, smtp, extra, name="one.toml", spool="spool1",
                 cluster=cluster)
    two = config(tmp_path, dns, smtp, extra, name="two.toml", spool="spool2",
                 cluster=cluster)
    return one, two


def test_two_hosts_share_max_connections_and_a_suspension_on_redis(
        tmp_path: Path, two_domains: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start, redis_server: Any) -> None:
    slow = smtp_receivers.start("127.0.0.2")
    extra = ('[[shape]]\nname = "slow"\ndomains = ["slow.test"]\nmax_connections = 2\n'
             'max_messages_per_connection = 2\n'
             "[[reply_rule]]\npattern = '^421[ -]4\\.7\\.28 '\n"
             'action = "suspend"\nduration = "1h"\n')
    one, two = _two_hosts(tmp_path, two_domains, smtp_receivers, redis_server.url, extra)
    for n in (1, 2):
        for i in range(12):
            drop(tmp_path / f"spool{n}", f"h{n}m{i}", "alice@src.test", f"u{n}.{i}@slow.test")
    first, second = daemon(one), daemon(two)
    slow.wait_for(24, timeout=60)
    # Each host alone would open 2; together they never had more than 2 open.
    assert slow.max_concurrent_sessions() <= 2
    assert first.find("delivery", status="sent") and second.find("delivery", status="sent")

    # A 421 4.7.28 read by one host suspends the destination for the other.
    slow.behaviour = Behaviour(rcpt={"*": GMAIL_421})
    drop(tmp_path / "spool1", "trigger", "alice@src.test", "t@slow.test")
    first.wait_event("suspended")
    before = len(slow.transactions)
    slow.behaviour = Behaviour()
    # Another host sees a suspension within CLUSTER_SUSPENSION_RECHECK (docs/shaping.md):
    # the documented bound, not a guess at how long something takes.
    seen_by = time.monotonic() + CLUSTER_SUSPENSION_RECHECK + 0.1
    wait_until(lambda: time.monotonic() >= seen_by, 5)
    drop(tmp_path / "spool2", "later", "alice@src.test", "later@slow.test")
    second.wait_event("queued", id="later")
    def held_back() -> bool:
        shown = queue_cli(two, "show", "later", "--json")   # fails while in flight
        return shown.returncode == 0 and json.loads(shown.stdout)["next_try"] > 1000 + time.time()

    wait_until(held_back, 20, message=lambda: "host two holds `later` back for the suspension")
    assert len(slow.transactions) == before
    listed = json.loads(queue_cli(two, "suspended", "--json").stdout)["suspended"]
    assert [s["destination"] for s in listed] == ["slow"]
    assert queue_cli(two, "resume", "slow").returncode == 0
    slow.wait_for(25, timeout=30)
    assert any("later@slow.test" in m.rcpts for m in slow.messages)


def test_redis_gone_both_hosts_keep_delivering_and_recover(
        tmp_path: Path, two_domains: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start, redis_server: Any) -> None:
    slow = smtp_receivers.start("127.0.0.2")
    extra = '[[shape]]\nname = "slow"\ndomains = ["slow.test"]\nmax_connections = 2\n'
    one, two = _two_hosts(tmp_path, two_domains, smtp_receivers, redis_server.url, extra)
    first, second = daemon(one), daemon(two)
    drop(tmp_path / "spool1", "a0", "alice@src.test", "a0@slow.test")
    drop(tmp_path / "spool2", "b0", "alice@src.test", "b0@slow.test")
    slow.wait_for(2, timeout=30)
    redis_server.stop()
    for n, name in ((1, "a"), (2, "b")):
        for i in range(1, 6):
            drop(tmp_path / f"spool{n}", f"{name}{i}", "alice@src.test",
                 f"{name}{i}@slow.test")
    slow.wait_for(12, timeout=30)
    for process in (first, second):
        [gone] = process.wait_event("cluster", state="unreachable")
        assert gone["error"]
    redis_server.start()
    for n, name in ((1, "a"), (2, "b")):
        drop(tmp_path / f"spool{n}", f"{name}9", "alice@src.test", f"{name}9@slow.test")
    slow.wait_for(14, timeout=30)
    # Down once, up once: one event per change, not one per message.
    for process in (first, second):
        process.wait_event("cluster", state="reachable", timeout=30)
        assert len(process.find("cluster", state="unreachable")) == 1
