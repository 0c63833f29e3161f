"""Logs and metrics of the daemon as a real process (contract §6, §10; issue 12 items 3, 5).

Real receivers on 127.0.0.x (one with TLS from a test CA), a real DNS server, the
daemon started as `python -m mxsend run`, its JSON lines read from stderr, and /metrics
scraped over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import re
import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mxsend.envelope import Envelope, Message, Recipient, serialise_bsmtp
from tests.fixtures.daemon import DaemonProcess, hand_over, wait_until, write_config
from tests.fixtures.dns_server import DnsTestServer
from tests.fixtures.ports import free_port
from tests.fixtures.smtp_receiver import Behaviour, Receiver, ReceiverGroup, TlsCa
from tests.test_metrics import scrape

Start = Callable[..., DaemonProcess]

BODY_SECRET = "the body is never in a transcript"


def drop(spool: Path, name: str, sender: str, *recipients: str,
         orcpt: bool = False, message_id: str | None = None) -> None:
    """A Batch SMTP file written the way a writer must: tmp/, fsync, rename into new/."""
    header = f"Message-ID: {message_id}\r\n" if message_id else ""
    data = (f"From: {sender}\r\n{header}Subject: {name}\r\n\r\n{BODY_SECRET}\r\n").encode()
    rcpts = tuple(Recipient(r, orcpt=f"rfc822;{r}" if orcpt else None) for r in recipients)
    message = Message(Envelope(sender=sender, recipients=rcpts), data)
    hand_over(spool, name, serialise_bsmtp(message))


@pytest.fixture
def dns(dns_server: DnsTestServer) -> DnsTestServer:
    """d1.test -> mx1 (127.0.0.2), d2.test -> mx2 (127.0.0.3), src.test -> 127.0.0.4."""
    for domain, host, ip in (("d1.test", "mx1.d1.test", "127.0.0.2"),
                             ("d2.test", "mx2.d2.test", "127.0.0.3"),
                             ("src.test", "mx.src.test", "127.0.0.4")):
        dns_server.add_mx(domain, 10, host)
        dns_server.add_a(host, ip)
    return dns_server


def config_for(tmp_path: Path, dns: DnsTestServer, receivers: ReceiverGroup,
               **sections: dict[str, object]) -> Path:
    base: dict[str, dict[str, object]] = {
        "dns": {"nameservers": [dns.nameserver], "timeout": "2s", "ipv6": False},
        "smtp": {"port": receivers.port, "helo_name": "mxsend.test"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return write_config(tmp_path, base)


def mixed_world(smtp: ReceiverGroup) -> tuple[Receiver, Receiver, Receiver]:
    """mx1 accepts (TLS), mx2 bounces carol and defers dave, home takes the DSNs."""
    mx1 = smtp.start("127.0.0.2", tls=True, cert_names=("mx1.d1.test",))
    mx2 = smtp.start("127.0.0.3", behaviour=Behaviour(rcpt={
        "carol@d2.test": "550 5.1.1 no such user", "dave@d2.test": "451 4.3.0 try later"}))
    home = smtp.start("127.0.0.4")
    return mx1, mx2, home


def drop_mixed(spool: Path) -> None:
    drop(spool, "m1", "alice@src.test", "bob@d1.test")
    drop(spool, "m2", "alice@src.test", "carol@d2.test")
    drop(spool, "m3", "alice@src.test", "dave@d2.test")


# --- 1. the delivery event's fields ----------------------------------------------------


def test_delivery_event_has_delay_delays_message_id_orcpt_cipher_verified(
        tmp_path: Path, dns: DnsTestServer, smtp_receivers: ReceiverGroup, tls_ca: TlsCa,
        daemon: Start) -> None:
    smtp_receivers.start("127.0.0.2", tls=True, cert_names=("mx1.d1.test",))
    smtp_receivers.start("127.0.0.3")
    (tmp_path / "mxout.lua").write_text("""
function ServerDetails(Parameters, HeaderLines, Actions)
  if Parameters.server == "mx1.d1.test" then Actions.verifyCert = 1 end
  return Actions
end
""")
    drop(tmp_path / "spool", "m1", "alice@src.test", "bob@d1.test", "carol@d2.test",
         orcpt=True, message_id="<abc.123@src.test>")
    config = config_for(tmp_path, dns, smtp_receivers, smtp={"ca_file": str(tls_ca.pem_path)})
    process = daemon(config, "--once")
    assert process.wait(60) == 0, process.output()
    [tls] = process.find("delivery", recipient="bob@d1.test")
    [plain] = process.find("delivery", recipient="carol@d2.test")
    for event in (tls, plain):
        assert event["status"] == "sent"
        assert event["message_id"] == "<abc.123@src.test>"
        assert event["orcpt"] == f"rfc822;{event['recipient']}"
        assert event["command"] == "end of DATA"  # the reply to the final dot decided
        assert isinstance(event["delay"], float) and 0 <= event["delay"] < 30
        assert event["delay"] == round(event["delay"], 1)
        assert re.fullmatch(r"\d+\.\d\d/\d+\.\d\d/\d+\.\d\d", event["delays"]), event
        queue, setup, transfer = (float(part) for part in event["delays"].split("/"))
        assert queue + setup + transfer <= event["delay"] + 0.1
    assert tls["tls"] == "TLSv1.3" and tls["verified"] is True
    assert isinstance(tls["tls_cipher"], str) and tls["tls_cipher"]
    assert plain["tls"] is None and plain["tls_cipher"] is None and plain["verified"] is False


def _peer_certificate(host: str, port: int) -> bytes:
    """The DER certificate a receiver presents after STARTTLS (not verified here)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP(host, port, timeout=10) as client:
        client.starttls(context=context)
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.mark.parametrize(("check", "verified"), [("thumbprint", True), ("name", False)])
def test_verified_with_a_pin_but_not_with_a_name_alone(
        tmp_path: Path, dns: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start, check: str, verified: bool) -> None:
    # Postfix says "Verified" for a matching fingerprint; a name on a chain nobody
    # checked proves nothing. No verifyCert here: the chain is not checked.
    smtp_receivers.start("127.0.0.3", tls=True, cert_names=("mx2.d2.test",))
    der = _peer_certificate("127.0.0.3", smtp_receivers.port)
    setting = (f'Actions.checkCertThumbprint = "{hashlib.sha256(der).hexdigest()}"'
               if check == "thumbprint" else 'Actions.checkCertName = "mx2.d2.test"')
    (tmp_path / "mxout.lua").write_text(f"""
function ServerDetails(Parameters, HeaderLines, Actions)
  {setting}
  return Actions
end
""")
    drop(tmp_path / "spool", "m1", "alice@src.test", "carol@d2.test")
    process = daemon(config_for(tmp_path, dns, smtp_receivers), "--once")
    assert process.wait(60) == 0, process.output()
    [event] = process.find("delivery", recipient="carol@d2.test")
    assert event["status"] == "sent" and event["tls"] == "TLSv1.3"
    assert event["tls_cipher"] and event["verified"] is verified


def test_a_recipient_without_a_server_still_gets_the_fields(
        tmp_path: Path, dns: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start) -> None:
    dns.add_null_mx("nullmx.test")
    smtp_receivers.start("127.0.0.4")
    drop(tmp_path / "spool", "m1", "alice@src.test", "x@nullmx.test", orcpt=True,
         message_id="<n@src.test>")
    process = daemon(config_for(tmp_path, dns, smtp_receivers), "--once")
    assert process.wait(60) == 0, process.output()
    [event] = process.find("delivery", recipient="x@nullmx.test")
    assert event["status"] == "bounced" and event["relay"] is None
    assert event["message_id"] == "<n@src.test>" and event["orcpt"] == "rfc822;x@nullmx.test"
    assert event["tls_cipher"] is None and event["verified"] is False
    assert re.fullmatch(r"\d+\.\d\d/\d+\.\d\d/0\.00", event["delays"])


# --- 2, 3. the summary of run --once, the process field --------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_once_ends_with_one_summary_whatever_the_processes(
        tmp_path: Path, dns: DnsTestServer, smtp_receivers: ReceiverGroup, tls_ca: TlsCa,
        daemon: Start, processes: int) -> None:
    mixed_world(smtp_receivers)
    drop_mixed(tmp_path / "spool")
    config = config_for(tmp_path, dns, smtp_receivers,
                        queue={"processes": processes, "retry": ["1h"]},
                        smtp={"ca_file": str(tls_ca.pem_path)})
    process = daemon(config, "--once")
    assert process.wait(60) == 0, process.output()
    lines = [json.loads(line) for line in process.lines if line.strip()]
    summaries = [doc for doc in lines if doc["event"] == "summary"]
    assert len(summaries) == 1, process.output()
    summary = lines[-1]
    assert summary["event"] == "summary", process.output()
    # bob and the failure DSN to alice sent; carol bounced; dave deferred.
    assert {k: summary[k] for k in ("sent", "deferred", "bounced", "skipped")} == {
        "sent": 2, "deferred": 1, "bounced": 1, "skipped": 0}, process.output()
    assert isinstance(summary["seconds"], float) and 0 < summary["seconds"] < 60
    deliveries = [doc for doc in lines if doc["event"] == "delivery"]
    assert len(deliveries) == 4
    if processes == 1:
        assert all("process" not in doc for doc in lines)
    else:
        # Every line says which process wrote it.
        assert {doc.get("process") for doc in lines} <= {"1/2", "2/2", "supervisor"}
        assert all("process" in doc for doc in lines), process.output()
        assert summary["process"] == "supervisor"
        assert {doc["process"] for doc in deliveries} <= {"1/2", "2/2"}


def test_skipped_messages_are_counted_in_the_summary(
        tmp_path: Path, dns: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start) -> None:
    smtp_receivers.start("127.0.0.2")
    (tmp_path / "mxout.lua").write_text("""
function CheckFile(Filename, Actions, Size, CreationTime, Retries, LastTryTime, ReturnPath,
                   Recipients, HeaderData, HeaderLines)
  if HeaderData["Subject"] == "skip" then Actions.SkipSend = true; Actions.Reason = "no" end
  return Actions
end
""")
    drop(tmp_path / "spool", "skip", "alice@src.test", "bob@d1.test")
    drop(tmp_path / "spool", "go", "alice@src.test", "bob@d1.test")
    process = daemon(config_for(tmp_path, dns, smtp_receivers), "--once")
    assert process.wait(60) == 0, process.output()
    summary = json.loads(process.lines[-1])
    assert summary["event"] == "summary"
    assert (summary["sent"], summary["skipped"]) == (1, 1), process.output()


def test_text_format_says_process_and_summary(
        tmp_path: Path, dns: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start) -> None:
    smtp_receivers.start("127.0.0.2")
    drop(tmp_path / "spool", "m1", "alice@src.test", "bob@d1.test")
    config = config_for(tmp_path, dns, smtp_receivers, log={"format": "text"},
                        queue={"processes": 2})
    process = daemon(config, "--once")
    assert process.wait(60) == 0, process.output()
    lines = [line for line in process.lines if line.strip()]
    assert all(re.match(r"\S+Z \w+ process=(1/2|2/2|supervisor) ", line) for line in lines), \
        process.output()
    assert re.search(r" process=supervisor summary id=- sent=1 deferred=0 bounced=0 "
                     r"skipped=0 seconds=", lines[-1]), lines[-1]
    assert any(" process=" in line and " delivery id=m1 " in line for line in lines)


# --- 4. debug_peers: the transcript ---------------------------------------------------


@pytest.mark.parametrize("peer", ["mx1.d1.test", "MX1.D1.TEST.", ".d1.test", "127.0.0.2",
                                  "127.0.0.2/32"])
def test_debug_peers_transcript_for_the_named_server_only(
        tmp_path: Path, dns: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start, peer: str) -> None:
    smtp_receivers.start("127.0.0.2", behaviour=Behaviour(auth=True))
    smtp_receivers.start("127.0.0.3")
    drop(tmp_path / "spool", "m1", "alice@src.test", "bob@d1.test", "carol@d2.test")
    # log.level info: the transcript is there all the same, for the peer named.
    config = config_for(tmp_path, dns, smtp_receivers,
                        log={"level": "info", "debug_peers": [peer]})
    process = daemon(config, "--once")
    assert process.wait(60) == 0, process.output()
    lines = process.find("transcript")
    relay = f"mx1.d1.test[127.0.0.2]:{smtp_receivers.port}"
    assert lines and all(e["relay"] == relay and e["level"] == "debug" for e in lines)
    said = [(e["direction"], e["line"]) for e in lines]
    assert said[0][0] == "<" and said[0][1].startswith("220 ")
    sent = [line for direction, line in said if direction == ">"]
    assert sent[:4] == ["EHLO mxsend.test", "MAIL FROM:<alice@src.test>",
                        "RCPT TO:<bob@d1.test>", "DATA"], said
    assert re.fullmatch(r"\[message data: \d+ bytes\]", sent[4]) and sent[5] == "."
    replies = [line for direction, line in said if direction == "<"]
    assert any(line.startswith("250-") and "AUTH" in line for line in replies)
    assert any(line.startswith("354") for line in replies)
    assert not any(BODY_SECRET in e["line"] or "Subject" in e["line"] for e in lines)


def test_no_transcript_without_debug_peers(
        tmp_path: Path, dns: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start) -> None:
    smtp_receivers.start("127.0.0.2")
    drop(tmp_path / "spool", "m1", "alice@src.test", "bob@d1.test")
    config = config_for(tmp_path, dns, smtp_receivers, log={"debug_peers": ["mx9.d9.test"]})
    process = daemon(config, "--once")
    assert process.wait(60) == 0, process.output()
    assert process.find("delivery", status="sent") and not process.find("transcript")


# --- 5. metrics, scraped over HTTP -------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_metrics_count_what_the_daemons_did(
        tmp_path: Path, dns: DnsTestServer, smtp_receivers: ReceiverGroup, tls_ca: TlsCa,
        daemon: Start, processes: int) -> None:
    mixed_world(smtp_receivers)
    (tmp_path / "mxout.lua").write_text("""
function CheckFile(Filename, Actions, Size, CreationTime, Retries, LastTryTime, ReturnPath,
                   Recipients, HeaderData, HeaderLines)
  if HeaderData["Subject"] == "m3" and Retries == 0 then error("boom") end
  return Actions
end
function ServerDetails(Parameters, HeaderLines, Actions) return Actions end
""")
    port = free_port()
    config = config_for(tmp_path, dns, smtp_receivers,
                        queue={"processes": processes, "retry": ["1h"]},
                        smtp={"ca_file": str(tls_ca.pem_path)},
                        metrics={"listen": f"127.0.0.1:{port}"})
    process = daemon(config)
    wait_until(lambda: _scrape_or_none(port), timeout=30, message="/metrics")
    drop_mixed(tmp_path / "spool")
    process.wait_event("bounce", kind="failure")
    process.wait_event("delivery", count=4)
    expected = {
        'mxsend_deliveries_total{status="sent"}': 2.0,  # bob, and the DSN to alice
        'mxsend_deliveries_total{status="bounced"}': 1.0,  # carol
        'mxsend_deliveries_total{status="deferred"}': 1.0,  # dave
        'mxsend_bounces_total{kind="failure"}': 1.0,
        'mxsend_bounces_total{kind="delay"}': 0.0,
        'mxsend_script_errors_total{function="CheckFile"}': 1.0,
        'mxsend_tls_sessions_total{version="TLSv1.3"}': 1.0,  # mx1 only
        # One transaction per message and domain: m1, m2, m3 and the DSN.
        "mxsend_transaction_seconds_count": 4.0,
        # Final: m1 (sent), m2 (bounced), the DSN; m3 is still queued.
        "mxsend_delivery_seconds_count": 3.0,
        'mxsend_queue_messages{state="queued"}': 1.0,
    }

    def matches() -> bool:
        samples = scrape(port)
        return all(samples.get(name) == value for name, value in expected.items())

    wait_until(matches, timeout=15, message=lambda: f"{expected}\n{scrape(port)}")
    samples = scrape(port)
    assert samples["mxsend_transaction_seconds_sum"] > 0
    assert samples["mxsend_connections_open"] >= 0
    # Each daemon's events are counted once: the log and the counters agree.
    assert len(process.find("delivery")) == 4
    assert len(process.find("script_error")) == 1, json.dumps(process.find("script_error"))
    # The pooled sessions close after their idle time: the live gauge comes back to 0.
    wait_until(lambda: scrape(port)["mxsend_connections_open"] == 0, timeout=20,
               message="connections closed")
    assert process.stop() == 0


def _scrape_or_none(port: int) -> dict[str, Any] | None:
    try:
        return scrape(port)
    except OSError:
        return None


# --- 6. the buffered writer loses nothing on SIGTERM -----------------------------------


def test_sigterm_loses_no_line(tmp_path: Path, dns: DnsTestServer,
                               smtp_receivers: ReceiverGroup, daemon: Start) -> None:
    smtp_receivers.start("127.0.0.2")
    process = daemon(config_for(tmp_path, dns, smtp_receivers))
    wait_until(lambda: any("mxsend started" in line for line in process.lines), timeout=20,
               message="start")
    for n in range(20):
        drop(tmp_path / "spool", f"m{n}", "alice@src.test", "bob@d1.test")
    # SIGTERM as soon as the first is out: the rest are in flight or queued, and every
    # line they log until the daemon stops must reach stderr.
    process.wait_event("delivery")
    assert process.stop() == 0
    lines = [json.loads(line) for line in process.lines if line.strip()]
    assert lines[-1]["message"] == "mxsend stopped", process.output()
    queued = {doc["id"] for doc in lines if doc["event"] == "queued"}
    delivered = {doc["id"] for doc in lines if doc["event"] == "delivery"}
    assert delivered <= queued and delivered
