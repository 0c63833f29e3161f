"""End to end: the receiving domain's TLS policy (contract §8, issue 14).

The daemon as a real process; real aiosmtpd receivers with trustme certificates; a real
DNS server; the MTA-STS policies served over HTTPS on port 443 of 127.0.14.x (the real
port: tests run as root; no test-only hook in the daemon); for DANE a real validating
unbound in front of DNSSEC-signed zones. Whatever a policy forbids is checked on the
receiver's side: no MAIL command ever reached it.
"""

from __future__ import annotations

import gzip
import json
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mxsend.dane import TlsaRecord
from mxsend.envelope import Envelope, Message, Recipient, serialise_bsmtp
from tests.fixtures.daemon import REPO, DaemonProcess, hand_over, write_config
from tests.fixtures.dns_server import DnsTestServer
from tests.fixtures.https_server import HttpsServers, https_servers  # noqa: F401
from tests.fixtures.smtp_receiver import Behaviour, Receiver, ReceiverGroup, TlsCa
from tests.fixtures.unbound import build_test_zones, validating_resolver

pytestmark = pytest.mark.slow

STS_HOST = "127.0.14.1"  # https://mta-sts.sts.test/ (enforce), port 443
TESTING_HOST = "127.0.14.2"  # https://mta-sts.tst.test/ (testing)
REPORT_HOST = "127.0.14.3"  # the https: rua


def policy(mode: str, *mx: str) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400"]
    return ("\r\n".join(lines) + "\r\n").encode()


def drop(spool: Path, name: str, *recipients: str, requiretls: bool = False,
         extra: str = "") -> None:
    message = Message(
        Envelope(sender="alice@src.test", recipients=tuple(Recipient(r) for r in recipients),
                 requiretls=requiretls),
        f"From: alice@src.test\r\nSubject: {name}\r\n{extra}\r\nhello\r\n".encode())
    hand_over(spool, name, serialise_bsmtp(message))


def no_mail(receiver: Receiver) -> bool:
    """Nothing was sent: no session of the receiver got as far as MAIL."""
    return not receiver.transactions and not any(
        c.startswith("MAIL") for s in receiver.sessions for c in s.commands)


@dataclass
class StsWorld:
    tmp: Path
    dns: DnsTestServer
    smtp: ReceiverGroup
    https: HttpsServers
    ca_bundle: Path

    @property
    def spool(self) -> Path:
        return self.tmp / "spool"

    def config(self, **sections: dict[str, object]) -> Path:
        base: dict[str, dict[str, object]] = {
            "dns": {"nameservers": [self.dns.nameserver], "timeout": "2s", "ipv6": False},
            "smtp": {"port": self.smtp.port, "helo_name": "mxsend.test",
                     "ca_file": str(self.ca_bundle)},
        }
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        return write_config(self.tmp, base)


@pytest.fixture
def sts(tmp_path: Path, dns_server: DnsTestServer, smtp_receivers: ReceiverGroup,
        tls_ca: TlsCa, https_servers: HttpsServers) -> StsWorld:  # noqa: F811
    """sts.test (enforce: mx1 only), tst.test (testing), src.test (the sender's own)."""
    dns = dns_server
    dns.add_mx("sts.test", 5, "rogue.sts.test")  # not in the policy: never contacted
    dns.add_mx("sts.test", 10, "mx1.sts.test")
    dns.add_a("rogue.sts.test", "127.0.0.3")
    dns.add_a("mx1.sts.test", "127.0.0.2")
    dns.add_txt("_mta-sts.sts.test", "v=STSv1; id=20261207")
    dns.add_a("mta-sts.sts.test", STS_HOST)
    dns.add_mx("tst.test", 10, "mx.tst.test")
    dns.add_a("mx.tst.test", "127.0.0.5")
    dns.add_txt("_mta-sts.tst.test", "v=STSv1; id=1")
    dns.add_a("mta-sts.tst.test", TESTING_HOST)
    dns.add_mx("src.test", 10, "mx.src.test")
    dns.add_a("mx.src.test", "127.0.0.4")
    https_servers.start(STS_HOST, names=("mta-sts.sts.test",), port=443).route(
        "/.well-known/mta-sts.txt", body=policy("enforce", "mx1.sts.test"))
    https_servers.start(TESTING_HOST, names=("mta-sts.tst.test",), port=443).route(
        "/.well-known/mta-sts.txt", body=policy("testing", "mx.tst.test"))
    bundle = tmp_path / "ca-bundle.pem"
    bundle.write_bytes(tls_ca.pem_path.read_bytes() + https_servers.ca_file.read_bytes())
    return StsWorld(tmp_path, dns, smtp_receivers, https_servers, bundle)


def run_once(world: StsWorld, daemon: object, **sections: dict[str, object]) -> DaemonProcess:
    process: DaemonProcess = daemon(world.config(**sections), "--once")  # type: ignore[operator]
    assert process.wait(60) == 0, process.output()
    return process


# --- MTA-STS --------------------------------------------------------------------------------


def test_enforce_stripped_starttls_defers_and_sends_nothing(sts: StsWorld, daemon: object) -> None:
    mx1 = sts.smtp.start("127.0.0.2", cert_names=("mx1.sts.test",))  # no TLS at all
    rogue = sts.smtp.start("127.0.0.3", cert_names=("rogue.sts.test",))
    drop(sts.spool, "m", "bob@sts.test")
    process = run_once(sts, daemon)
    [deferred] = process.find("delivery", id="m")
    assert deferred["status"] == "deferred" and deferred["tls_policy"] == "mta-sts"
    assert deferred["dsn"].startswith("4.7.")
    assert mx1.sessions and no_mail(mx1)  # asked, found no STARTTLS, stopped
    assert rogue.sessions == []  # not in the policy: never contacted


def test_enforce_wrong_certificate_defers_and_sends_nothing(sts: StsWorld,
                                                            daemon: object) -> None:
    mx1 = sts.smtp.start("127.0.0.2", tls=True, cert_names=("elsewhere.test",))
    drop(sts.spool, "m", "bob@sts.test")
    process = run_once(sts, daemon)
    [deferred] = process.find("delivery", id="m")
    assert deferred["status"] == "deferred" and deferred["dsn"] == "4.7.5"
    assert "elsewhere" in deferred["response"] or "name" in deferred["response"]
    assert no_mail(mx1)


def test_enforce_good_policy_delivers_over_verified_tls_to_listed_mx_only(
        sts: StsWorld, daemon: object) -> None:
    mx1 = sts.smtp.start("127.0.0.2", tls=True, cert_names=("mx1.sts.test",))
    rogue = sts.smtp.start("127.0.0.3", tls=True, cert_names=("rogue.sts.test",))
    drop(sts.spool, "m", "bob@sts.test")
    process = run_once(sts, daemon)
    [sent] = process.find("delivery", id="m")
    assert sent["status"] == "sent" and sent["tls_policy"] == "mta-sts"
    assert sent["relay"].startswith("mx1.sts.test[127.0.0.2]") and sent["tls"]
    [message] = mx1.messages
    assert message.tls
    assert rogue.sessions == []
    # The policy is cached durably in the spool (a restart keeps it).
    assert (sts.spool / "policy" / "mta-sts" / "sts.test.json").exists()


def test_testing_mode_delivers_and_counts_the_failure(sts: StsWorld, daemon: object) -> None:
    mx = sts.smtp.start("127.0.0.5", cert_names=("mx.tst.test",))  # no STARTTLS
    drop(sts.spool, "m", "bob@tst.test")
    process = run_once(sts, daemon, tls={"tlsrpt": True, "report_from": "tlsrpt@src.test"})
    [sent] = process.find("delivery", id="m")
    assert sent["status"] == "sent" and sent["tls_policy"] == "none"
    assert len(mx.messages) == 1 and not mx.messages[0].tls
    [day] = (sts.spool / "tlsrpt" / "open").iterdir()
    [record] = [json.loads(line) for line in (day / "tst.test.jsonl").read_text().splitlines()]
    assert record["t"] == "sts" and record["f"][0] == "starttls-not-supported"


def test_a_script_weakening_the_policy_is_honoured_and_logged(sts: StsWorld,
                                                              daemon: object) -> None:
    mx1 = sts.smtp.start("127.0.0.2", tls=True, cert_names=("elsewhere.test",))
    (sts.tmp / "mxout.lua").write_text("""
function ServerDetails(Parameters, HeaderLines, Actions)
  if Parameters.domain == "sts.test" and Parameters.tlspolicy == "mta-sts" then
    Actions.verifyCert = 0
    Actions.checkCertName = ""
  end
  return Actions
end
""")
    drop(sts.spool, "m", "bob@sts.test")
    process = run_once(sts, daemon)
    [override] = process.find("tls_policy_override", id="m")
    assert override["domain"] == "sts.test" and override["server"] == "mx1.sts.test"
    assert override["policy"] == "mta-sts"
    assert process.find("delivery", id="m")[0]["status"] == "sent"
    assert mx1.messages[0].tls


def test_tls_required_no_waives_the_policy_without_an_override_event(
        sts: StsWorld, daemon: object) -> None:
    mx1 = sts.smtp.start("127.0.0.2", cert_names=("mx1.sts.test",))  # no STARTTLS
    sts.smtp.start("127.0.0.3", cert_names=("rogue.sts.test",))
    drop(sts.spool, "m", "bob@sts.test", extra="TLS-Required: No\r\n")
    process = run_once(sts, daemon)
    assert process.find("delivery", id="m")[0]["status"] == "sent"
    assert process.find("tls_policy_override") == []
    delivered = [m for r in sts.smtp.receivers for m in r.messages]
    assert b"TLS-Required: No\r\n" in delivered[0].data  # sent unchanged
    del mx1


# --- REQUIRETLS -------------------------------------------------------------------------------


def test_requiretls_to_a_server_without_the_keyword_bounces_5_7_30(
        sts: StsWorld, daemon: object) -> None:
    mx1 = sts.smtp.start("127.0.0.2", tls=True, cert_names=("mx1.sts.test",))
    home = sts.smtp.start("127.0.0.4", cert_names=("mx.src.test",))
    drop(sts.spool, "m", "bob@sts.test", requiretls=True)
    process = run_once(sts, daemon)
    [bounced] = process.find("delivery", id="m")
    assert bounced["status"] == "bounced" and bounced["dsn"] == "5.7.30"
    assert no_mail(mx1)
    [dsn] = home.wait_for(1)
    assert dsn.mail_from == "" and b"5.7.30" in dsn.data


def test_requiretls_with_the_keyword_is_delivered_and_passed_on(
        sts: StsWorld, daemon: object) -> None:
    mx1 = sts.smtp.start("127.0.0.2", tls=True, cert_names=("mx1.sts.test",),
                         behaviour=Behaviour(keywords=("REQUIRETLS",)))
    drop(sts.spool, "m", "bob@sts.test", requiretls=True)
    process = run_once(sts, daemon)
    assert process.find("delivery", id="m")[0]["status"] == "sent"
    [message] = mx1.messages
    assert message.tls and "REQUIRETLS" in message.mail_params


# --- TLS-RPT ----------------------------------------------------------------------------------


def test_tlsrpt_send_queues_the_mailto_report_and_posts_the_https_one(
        sts: StsWorld, daemon: object) -> None:
    reports = sts.https.start(REPORT_HOST, names=("rpt.sts.test",), port=443)
    reports.route("/tlsrpt", status=201)
    sts.dns.add_a("rpt.sts.test", REPORT_HOST)
    sts.dns.add_txt("_smtp._tls.sts.test",
                    "v=TLSRPTv1; rua=mailto:tlsrpt@sts.test,https://rpt.sts.test/tlsrpt")
    sts.smtp.start("127.0.0.2", tls=True, cert_names=("mx1.sts.test",))
    drop(sts.spool, "m", "bob@sts.test")
    tls = {"tlsrpt": True, "report_from": "tlsrpt@src.test"}
    run_once(sts, daemon, tls=tls)
    config = sts.config(tls=tls)
    done = subprocess.run([sys.executable, "-m", "mxsend", "-c", str(config), "tlsrpt", "send"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "sts.test: mailto:tlsrpt@sts.test" in done.stdout
    [post] = [r for r in reports.requests if r.method == "POST"]
    headers = {k.lower(): v for k, v in post.headers.items()}
    assert headers["content-type"] == "application/tlsrpt+gzip"
    report = json.loads(gzip.decompress(post.body))
    [entry] = report["policies"]
    assert entry["policy"]["policy-domain"] == "sts.test"
    assert entry["summary"]["total-successful-session-count"] == 1
    queued = list((sts.spool / "new").iterdir())
    assert len(queued) == 1 and b"RCPT TO:<tlsrpt@sts.test>" in queued[0].read_bytes()


# --- DANE -------------------------------------------------------------------------------------


def _leaf(port: int, host: str) -> bytes:
    """The certificate a receiver presents after STARTTLS (DER)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP(host, port, timeout=5) as client:
        client.starttls(context=context)
        assert client.sock is not None
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    assert der
    return der


def _ee(der: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    spki = x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return TlsaRecord(3, 1, 1, digest.finalize()).text()


@pytest.fixture
def dane_world(tmp_path: Path, smtp_receivers: ReceiverGroup, dns_server: DnsTestServer,
               ) -> Iterator[tuple[Path, dict[str, Receiver]]]:
    port = smtp_receivers.port
    receivers = {
        "good": smtp_receivers.start("127.0.0.2", tls=True, cert_names=("mx.good.secure.test",)),
        "bad": smtp_receivers.start("127.0.0.3", tls=True, cert_names=("mx.bad.secure.test",)),
        "bogus": smtp_receivers.start("127.0.0.5", tls=True,
                                      cert_names=("mx.bogus.secure.test",)),
        "insecure": smtp_receivers.start("127.0.0.6", tls=True,
                                         cert_names=("other.name.test",)),
        "home": smtp_receivers.start("127.0.0.4"),
    }
    good = _ee(_leaf(port, "127.0.0.2"))
    wrong = _ee(_leaf(port, "127.0.0.6"))  # a real key, not this server's
    zones = build_test_zones()
    zones.add_records("secure.test.", f"""
good 300 IN MX 10 mx.good
mx.good 300 IN A 127.0.0.2
_{port}._tcp.mx.good 300 IN TLSA {good}
bad 300 IN MX 10 mx.bad
mx.bad 300 IN A 127.0.0.3
_{port}._tcp.mx.bad 300 IN TLSA {wrong}
bogus 300 IN MX 10 mx.bogus
mx.bogus 300 IN A 127.0.0.5
_{port}._tcp.mx.bogus 300 IN TLSA {good}
src 300 IN MX 10 mx.src
mx.src 300 IN A 127.0.0.4
""")
    zones.add_records("insecure.test.", f"""
@ 300 IN MX 10 mx
mx 300 IN A 127.0.0.6
_{port}._tcp.mx 300 IN TLSA {good}
""")
    sign = zones.sign

    def sign_then_break() -> None:
        sign()
        zones.break_signature(f"_{port}._tcp.mx.bogus.secure.test.", "TLSA")

    zones.sign = sign_then_break  # type: ignore[method-assign]
    (tmp_path / "unbound").mkdir()
    with validating_resolver(zones, tmp_path / "unbound") as resolver:
        config = write_config(tmp_path, {
            "dns": {"nameservers": [resolver.nameserver], "timeout": "3s", "ipv6": False},
            "smtp": {"port": port, "helo_name": "mxsend.test"},
            "tls": {"dane": True, "mta_sts": False},
        })
        yield config, receivers


def test_dane_matching_delivers_mismatch_and_bogus_defer_insecure_is_opportunistic(
        dane_world: tuple[Path, dict[str, Receiver]], daemon: object) -> None:
    config, receivers = dane_world
    spool = config.parent / "spool"
    for name in ("good", "bad", "bogus"):
        drop(spool, name, f"bob@{name}.secure.test")
    drop(spool, "insecure", "bob@insecure.test")
    process: DaemonProcess = daemon(config, "--once")  # type: ignore[operator]
    assert process.wait(60) == 0, process.output()
    outcome = {e["id"]: e for e in process.find("delivery")}
    assert outcome["good"]["status"] == "sent" and outcome["good"]["tls_policy"] == "dane"
    assert receivers["good"].messages[0].tls
    assert outcome["bad"]["status"] == "deferred" and outcome["bad"]["tls_policy"] == "dane"
    assert "DANE" in outcome["bad"]["response"]
    assert receivers["bad"].sessions and no_mail(receivers["bad"])
    assert outcome["bogus"]["status"] == "deferred"
    assert receivers["bogus"].sessions == []  # bogus DNS: not even connected
    assert outcome["insecure"]["status"] == "sent"
    assert outcome["insecure"]["tls_policy"] == "none"
    assert len(receivers["insecure"].messages) == 1
