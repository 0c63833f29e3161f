"""TLS-RPT (RFC 8460): aggregation and the JSON report, rua parsing, the report message,
the durable store (with a real kill -9), and sending to a real HTTPS server."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mxsend.tlsdns import TlsResolver
from mxsend.tlsrpt import (
    MEDIA_TYPE,
    POLICY_NONE,
    POLICY_STS,
    POLICY_TLSA,
    Failure,
    SessionResult,
    build_report,
    gzip_report,
    mailto_address,
    parse_rua,
    report_message,
)
from mxsend.tlsrpt_store import TlsRptSender, TlsRptStore
from tests.fixtures.dns_server import DnsTestServer
from tests.fixtures.https_server import HttpsServers, https_servers  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
START = datetime(2026, 12, 6, tzinfo=UTC)
END = datetime(2026, 12, 7, tzinfo=UTC)
STS = ("version: STSv1", "mode: enforce", "mx: mx1.example.test", "max_age: 86400")


def sts(failure: Failure | None = None, domain: str = "example.test") -> SessionResult:
    return SessionResult(domain, POLICY_STS, STS, ("mx1.example.test",), failure)


# The required members of RFC 8460 §4.4's report, as its JSON schema lists them.
SCHEMA_REQUIRED: dict[str, Any] = {
    "organization-name": str, "contact-info": str, "report-id": str,
    "date-range": {"start-datetime": str, "end-datetime": str},
}
POLICY_REQUIRED: dict[str, Any] = {
    "policy": {"policy-type": str, "policy-domain": str},
    "summary": {"total-successful-session-count": int, "total-failure-session-count": int},
}
FAILURE_REQUIRED = {"result-type": str, "failed-session-count": int}


def check(obj: Any, required: dict[str, Any], where: str = "report") -> None:
    assert isinstance(obj, dict), where
    for key, kind in required.items():
        assert key in obj, f"{where}.{key} is required"
        if isinstance(kind, dict):
            check(obj[key], kind, f"{where}.{key}")
        else:
            assert isinstance(obj[key], kind), f"{where}.{key} is not {kind.__name__}"


def check_report(report: dict[str, Any]) -> None:
    check(report, SCHEMA_REQUIRED)
    assert isinstance(report["policies"], list)
    for policy in report["policies"]:
        check(policy, POLICY_REQUIRED, "policy")
        assert policy["policy"]["policy-type"] in (POLICY_STS, POLICY_TLSA, POLICY_NONE)
        for detail in policy.get("failure-details", []):
            check(detail, FAILURE_REQUIRED, "failure-details")
    for text in report["date-range"].values():
        datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")  # RFC 3339 date-time, UTC


# --- the report --------------------------------------------------------------------------


def test_report_aggregates_sessions_per_policy_and_failure() -> None:
    cert = Failure("certificate-expired", "mx1.example.test", "192.0.2.1", "198.51.100.7")
    results = [sts(), sts(), sts(cert), sts(cert),
               sts(Failure("starttls-not-supported", "mx1.example.test", "192.0.2.1")),
               SessionResult("other.test", POLICY_TLSA, ("3 1 1 abcd",)),
               SessionResult("third.test", POLICY_NONE)]
    report = build_report(results, organization="mxsend.example", contact="rpt@mxsend.example",
                          start=START, end=END, report_id="r1")
    check_report(report)
    assert report["date-range"] == {"start-datetime": "2026-12-06T00:00:00Z",
                                    "end-datetime": "2026-12-07T00:00:00Z"}
    first, tlsa, none = report["policies"]
    assert first["policy"] == {"policy-type": "sts", "policy-domain": "example.test",
                               "policy-string": list(STS), "mx-host": ["mx1.example.test"]}
    assert first["summary"] == {"total-successful-session-count": 2,
                                "total-failure-session-count": 3}
    assert first["failure-details"] == [
        {"result-type": "certificate-expired", "failed-session-count": 2,
         "sending-mta-ip": "198.51.100.7", "receiving-mx-hostname": "mx1.example.test",
         "receiving-ip": "192.0.2.1"},
        {"result-type": "starttls-not-supported", "failed-session-count": 1,
         "receiving-mx-hostname": "mx1.example.test", "receiving-ip": "192.0.2.1"},
    ]
    assert tlsa["policy"]["policy-string"] == ["3 1 1 abcd"]
    assert "failure-details" not in none


def test_gzip_round_trip() -> None:
    report = build_report([sts()], organization="o", contact="c@o.test", start=START, end=END)
    assert json.loads(gzip.decompress(gzip_report(report))) == report


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["v=TLSRPTv1; rua=mailto:tlsrpt@example.test"], ("mailto:tlsrpt@example.test",)),
        (["v=TLSRPTv1;rua=mailto:a@x.test,https://r.x.test/v1"],
         ("mailto:a@x.test", "https://r.x.test/v1")),
        (["v=TLSRPTv1; rua=mailto:a@x.test, https://r.x.test/v1 ;"],
         ("mailto:a@x.test", "https://r.x.test/v1")),
        (["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@x.test"], ("mailto:a@x.test",)),
        (["v=TLSRPTv1; rua=ftp://x.test/,http://x.test/"], ()),  # only mailto and https
        (["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"], ()),
        (["v=TLSRPTv2; rua=mailto:a@x.test"], ()),
        ([], ()),
    ],
)
def test_parse_rua(records: list[str], expected: tuple[str, ...]) -> None:
    assert parse_rua(records) == expected


def test_mailto_address() -> None:
    assert mailto_address("mailto:tls%2Brpt@x.test?subject=hi") == "tls+rpt@x.test"


def test_report_message_is_a_multipart_report_with_the_gzip() -> None:
    report = build_report([sts()], organization="mxsend.example",
                          contact="rpt@mxsend.example", start=START, end=END, report_id="r-1")
    compressed = gzip_report(report)
    raw = report_message(report=report, compressed=compressed, policy_domain="example.test",
                         submitter="mxsend.example", sender="rpt@mxsend.example",
                         recipient="tlsrpt@example.test", now=END)
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message["TLS-Report-Domain"] == "example.test"
    assert message["TLS-Report-Submitter"] == "mxsend.example"
    assert message["TLS-Required"] == "No"
    assert "Report-ID: <r-1>" in message["Subject"]
    [attachment] = [part for part in message.iter_attachments()]
    assert attachment.get_content_type() == MEDIA_TYPE
    name = attachment.get_filename()
    assert name.startswith("mxsend.example!example.test!1796515200!1796601600!")
    assert name.endswith(".json.gz")
    assert json.loads(gzip.decompress(attachment.get_content())) == report


# --- the durable store ---------------------------------------------------------------------


class Clock:
    def __init__(self, when: datetime) -> None:
        self.now = when.timestamp()

    def __call__(self) -> float:
        return self.now


def test_store_keeps_days_apart_and_reports_ended_days(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 12, 6, 10, tzinfo=UTC))
    store = TlsRptStore(tmp_path, clock)
    store.record(sts())
    store.record(sts(Failure("validation-failure")))
    clock.now += 86400
    store.record(sts())  # the next day: still open
    [batch] = store.close()
    assert (batch.start, batch.end) == (START, END)
    assert batch.domains() == ["example.test"]
    assert len(store.results(batch, "example.test")) == 2
    store.done(batch, "example.test")
    assert list(store.batches()) == []


def test_ending_the_period_now_and_again(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 12, 6, 10, tzinfo=UTC))
    store = TlsRptStore(tmp_path, clock)
    store.record(sts())
    [first] = store.close(everything=True)
    assert (first.start, first.end) == (START, datetime(2026, 12, 6, 10, tzinfo=UTC))
    store.done(first, "example.test")
    clock.now += 3600
    store.record(sts())
    [second] = store.close(everything=True)
    assert second.start == datetime(2026, 12, 6, 10, tzinfo=UTC)  # no overlap, no gap
    assert second.end == datetime(2026, 12, 6, 11, tzinfo=UTC)


def test_torn_line_is_skipped(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 12, 6, 10, tzinfo=UTC))
    store = TlsRptStore(tmp_path, clock)
    store.record(sts())
    with open(tmp_path / "tlsrpt/open/2026-12-06/example.test.jsonl", "ab") as handle:
        handle.write(b'{"d":"example.test","t":"st')  # a crash inside a write
    [batch] = store.close(everything=True)
    assert len(store.results(batch, "example.test")) == 1


def test_unsafe_domain_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        TlsRptStore(tmp_path).record(sts(domain="../x"))


RECORDER = """
import sys
from pathlib import Path
from mxsend.tlsrpt import SessionResult
from mxsend.tlsrpt_store import TlsRptStore
store = TlsRptStore(Path(sys.argv[1]))
i = 0
while True:
    store.record(SessionResult("example.test", "no-policy-found"))
    i += 1
    print(i, flush=True)
"""


def test_acknowledged_counts_survive_kill_9(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", RECORDER, str(tmp_path)], stdout=subprocess.PIPE,
        cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert process.stdout is not None
    acknowledged = 0
    try:
        while acknowledged < 50:
            line = process.stdout.readline()
            assert line, "the recorder died"
            acknowledged = int(line)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    store = TlsRptStore(tmp_path)
    counted = sum(len(store.results(b, "example.test")) for b in store.close(everything=True))
    assert counted >= acknowledged


# --- sending --------------------------------------------------------------------------------


async def test_sender_posts_https_and_queues_mailto(
    tmp_path: Path, dns_server: DnsTestServer, https_servers: HttpsServers,  # noqa: F811
) -> None:
    server = https_servers.start("127.0.0.2", names=("reports.example.test",))
    server.route("/v1/tlsrpt", status=201)
    dns_server.add_a("reports.example.test", "127.0.0.2")
    dns_server.add("_smtp._tls.example.test", "TXT",
                   f'"v=TLSRPTv1; rua=https://reports.example.test:{server.port}/v1/tlsrpt,'
                   'mailto:tlsrpt@example.test"')
    clock = Clock(datetime(2026, 12, 6, 10, tzinfo=UTC))
    store = TlsRptStore(tmp_path, clock)
    store.record(sts())
    store.record(sts(Failure("certificate-not-trusted", "mx1.example.test")))
    store.record(SessionResult("quiet.test", POLICY_NONE))  # publishes no rua
    queued: list[tuple[str, str, bytes]] = []
    resolver = TlsResolver(dns_server.dns_config(ipv6=False))
    sender = TlsRptSender(store, resolver, lambda *item: queued.append(item),
                          report_from="tlsrpt@mxsend.example", ca_file=server.ca_file,
                          clock=clock)
    outcomes = await sender.send(everything=True)
    assert {o.domain: o.problems for o in outcomes} == {"example.test": (), "quiet.test": ()}
    [request] = server.requests
    assert request.method == "POST" and request.headers["content-type"] == MEDIA_TYPE
    report = json.loads(gzip.decompress(request.body))
    check_report(report)
    assert report["policies"][0]["summary"] == {"total-successful-session-count": 1,
                                                "total-failure-session-count": 1}
    [(sender_address, recipient, message)] = queued
    assert (sender_address, recipient) == ("tlsrpt@mxsend.example", "tlsrpt@example.test")
    assert b"multipart/report" in message
    assert list(store.batches()) == []


async def test_failed_post_is_retried_without_requeueing_mailto(
    tmp_path: Path, dns_server: DnsTestServer, https_servers: HttpsServers,  # noqa: F811
) -> None:
    server = https_servers.start("127.0.0.2", names=("reports.example.test",))
    server.route("/v1", status=503)
    dns_server.add_a("reports.example.test", "127.0.0.2")
    dns_server.add("_smtp._tls.example.test", "TXT",
                   f'"v=TLSRPTv1; rua=mailto:a@example.test,'
                   f'https://reports.example.test:{server.port}/v1"')
    clock = Clock(datetime(2026, 12, 6, 10, tzinfo=UTC))
    store = TlsRptStore(tmp_path, clock)
    store.record(sts())
    queued: list[object] = []
    sender = TlsRptSender(store, TlsResolver(dns_server.dns_config(ipv6=False)),
                          lambda *item: queued.append(item),
                          report_from="tlsrpt@mxsend.example", ca_file=server.ca_file,
                          clock=clock)
    [first] = await sender.send(everything=True)
    assert first.problems and "HTTP 503" in first.problems[0]
    assert len(list(store.batches())) == 1  # kept for a retry
    server.route("/v1", status=200)
    [second] = await sender.send()
    assert second.problems == ()
    assert len(queued) == 1 and len(server.requests) == 2
    assert list(store.batches()) == []


def test_tlsrpt_send_command_queues_mailto_reports_in_the_spool(
    tmp_path: Path, dns_server: DnsTestServer
) -> None:
    from mxsend.commands import tlsrpt as command
    from mxsend.config import config_from_mapping
    from mxsend.envelope import parse_bsmtp

    dns_server.add("_smtp._tls.example.test", "TXT", '"v=TLSRPTv1; rua=mailto:rua@example.test"')
    config = config_from_mapping({
        "spool": {"path": str(tmp_path)},
        "dns": {"nameservers": [dns_server.nameserver], "ipv6": False},
        "tls": {"tlsrpt": True, "report_from": "tlsrpt@mxsend.example"},
    })
    TlsRptStore(tmp_path).record(sts())
    assert command.run(None, config) == 0  # type: ignore[arg-type]
    [queued] = list((tmp_path / "new").iterdir())
    message = parse_bsmtp(queued.read_bytes())
    assert message.envelope.sender == "tlsrpt@mxsend.example"
    assert [r.address for r in message.envelope.recipients] == ["rua@example.test"]
    assert b"application/tlsrpt+gzip" in message.data
    assert list(TlsRptStore(tmp_path).batches()) == []


def test_tlsrpt_send_command_refuses_when_tlsrpt_is_off(tmp_path: Path) -> None:
    from mxsend.commands import tlsrpt as command
    from mxsend.config import config_from_mapping
    from mxsend.errors import ConfigError

    config = config_from_mapping({"spool": {"path": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"^tls\.tlsrpt:"):
        command.run(None, config)  # type: ignore[arg-type]
