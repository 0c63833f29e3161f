"""Contract §10, Destinations: no connection to loopback, private or similar addresses
unless `smtp.allowed_destinations` lists them."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from mxsend.config import config_from_mapping
from mxsend.delivery import Deliverer
from mxsend.destination import refusal
from mxsend.envelope import Envelope, Message, Recipient
from mxsend.errors import ConfigError, Phase
from mxsend.mx import MxHost
from mxsend.outcome import DeliveryStatus
from tests.fixtures.daemon import DaemonProcess, write_config
from tests.fixtures.dns_server import DnsTestServer
from tests.fixtures.smtp_receiver import ReceiverGroup

NETS = tuple(ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "10.1.0.0/16"))


@pytest.mark.parametrize(("ip", "kind"), [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("10.0.0.1", "private"), ("172.16.0.1", "private"), ("172.31.255.254", "private"),
    ("192.168.1.1", "private"), ("fd00::1", "private"), ("fc00::1", "private"),
    ("100.64.0.1", "shared"), ("100.127.255.254", "shared"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
])
def test_restricted_addresses_are_refused_by_default(ip: str, kind: str) -> None:
    reason = refusal(ip, ())
    assert reason is not None and kind in reason and ip in reason
    assert "smtp.allowed_destinations" in reason


@pytest.mark.parametrize("ip", ["192.0.2.1", "8.8.8.8", "172.32.0.1", "100.128.0.1",
                                "2001:db8::1", "2a00:1450::1", "11.0.0.1"])
def test_public_addresses_are_allowed(ip: str) -> None:
    assert refusal(ip, ()) is None


@pytest.mark.parametrize(("ip", "allowed"), [
    ("127.0.0.2", True), ("::1", True), ("10.1.200.3", True), ("10.2.0.1", False),
    ("::ffff:127.0.0.1", True), ("192.168.0.1", False), ("fe80::1", False),
])
def test_allowed_destinations_opens_only_the_networks_listed(ip: str, allowed: bool) -> None:
    assert (refusal(ip, NETS) is None) is allowed


def test_allowed_destinations_is_validated() -> None:
    config = config_from_mapping({"smtp": {"allowed_destinations": ["127.0.0.0/8", "::1"]}})
    assert config.smtp.allowed_destinations == (ipaddress.ip_network("127.0.0.0/8"),
                                                ipaddress.ip_network("::1/128"))
    assert config_from_mapping({}).smtp.allowed_destinations == ()
    for bad in (["localhost"], "127.0.0.0/8", [8], ["10.0.0.0/33"]):
        with pytest.raises(ConfigError, match=r"^smtp\.allowed_destinations: "):
            config_from_mapping({"smtp": {"allowed_destinations": bad}})


class Table:
    def __init__(self, hosts: list[MxHost]) -> None:
        self.hosts = hosts

    async def resolve(self, domain: str) -> list[MxHost]:
        return self.hosts


async def test_deliverer_refuses_loopback_without_connecting(
        smtp_receivers: ReceiverGroup) -> None:
    server = smtp_receivers.start("127.0.0.2")
    config = config_from_mapping({"smtp": {"port": smtp_receivers.port,
                                           "helo_name": "c.example"}})
    hosts = [MxHost("mx1.example.org", 10, ("127.0.0.2",)),
             MxHost("mx2.example.org", 20, ("::ffff:127.0.0.2", "10.0.0.1"))]
    deliverer = Deliverer(config, Table(hosts), batv_key=None)
    called: list[Any] = []

    async def details(params: Any, preset: Any) -> Any:
        from mxsend.actions import ServerActions
        called.append(params)
        return ServerActions()

    message = Message(Envelope("a@example.com", (Recipient("b@example.org"),)), b"x\r\n")
    try:
        [outcome] = await deliverer.deliver("Q1", message, list(message.envelope.recipients),
                                            "example.org", details)
        # Every server refused: deferred, saying why (the last one tried).
        assert outcome.status is DeliveryStatus.DEFERRED
        assert outcome.phase is Phase.CONNECT and outcome.dsn == "4.7.0"
        assert "10.0.0.1 is a private address" in outcome.response
        assert "smtp.allowed_destinations" in outcome.response
        assert len(called) == 3  # each address was considered ...
        assert server.sessions == []  # ... and none was connected to
        # Not a refused connection: no backoff is recorded for the address.
        assert deliverer.backoff.blocked_until(("127.0.0.2", smtp_receivers.port), 0) is None
    finally:
        await deliverer.close()


def test_daemon_refuses_localhost_and_private_literals_by_default(
        tmp_path: Path, dns_server: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Any) -> None:
    # A domain that points its MX at localhost, and an address literal on a private
    # network: both are deferred with the reason, and nothing connects.
    local = smtp_receivers.start("127.0.0.1")
    dns_server.add_mx("evil.test", 10, "localhost")
    dns_server.add_a("localhost", "127.0.0.1")
    spool = tmp_path / "spool"
    for folder in ("tmp", "new"):
        (spool / folder).mkdir(parents=True)
    (spool / "new" / "m1").write_bytes(
        b"MAIL FROM:<alice@src.test>\r\nRCPT TO:<bob@evil.test>\r\n"
        b"RCPT TO:<carol@[10.0.0.1]>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    config = write_config(tmp_path, {
        "dns": {"nameservers": [dns_server.nameserver], "timeout": "2s", "ipv6": False},
        "smtp": {"port": smtp_receivers.port, "helo_name": "mxsend.test",
                 "allowed_destinations": []},
    })
    process: DaemonProcess = daemon(config, "--once")
    assert process.wait(60) == 0, process.output()
    events = {e["recipient"]: e for e in process.find("delivery")}
    assert events["bob@evil.test"]["status"] == "deferred"
    assert "127.0.0.1 is a loopback address" in events["bob@evil.test"]["response"]
    assert events["carol@[10.0.0.1]"]["status"] == "deferred"
    assert "10.0.0.1 is a private address" in events["carol@[10.0.0.1]"]["response"]
    assert local.sessions == []
