"""The TLS policy's part of delivery: pure decisions, the TLS-RPT sender lock and pass."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import trustme

from mxsend import tlsrpt_daily
from mxsend.actions import ServerActions
from mxsend.config import config_from_mapping
from mxsend.requiretls import CertCheck
from mxsend.tlsdelivery import cert_check, overridden, pkix_result_type, waiver_lines
from mxsend.tlspolicy import DANE, MTA_STS, NONE, REQUIRETLS, HostTls, preset_actions
from mxsend.tlsrpt import POLICY_STS, SessionResult
from mxsend.tlsrpt_store import TlsRptStore
from tests.fixtures.dns_server import DnsTestServer

STS = HostTls(MTA_STS, force_tls=True, verify_cert=True, check_cert_name="mx.example.test")


def test_waiver_lines_only_when_the_header_names_the_field() -> None:
    assert waiver_lines(b"Subject: x\r\n\r\nTLS-Required: No\r\n") == ()
    assert waiver_lines(b"Subject: x\r\ntls-required:  No\r\n\r\nbody\r\n") == [
        "Subject: x", "tls-required:  No"]


def test_overridden_only_when_the_script_lowers_a_policy() -> None:
    preset = preset_actions(ServerActions(), STS)
    assert not overridden(STS, preset)
    assert overridden(STS, ServerActions(verify_cert=False, force_tls=True,
                                         check_cert_name="mx.example.test"))
    assert overridden(STS, preset_actions(ServerActions(), STS).__class__(
        force_tls=True, verify_cert=True, check_cert_name="*.example.test"))
    # Without a policy, the script's own choices are nobody's exception.
    assert not overridden(HostTls(NONE), ServerActions(try_tls=False))
    dane = HostTls(DANE, force_tls=True)
    assert overridden(dane, ServerActions(try_tls=False))


def test_cert_check_names_how_the_session_was_authenticated() -> None:
    actions = preset_actions(ServerActions(), STS)
    assert cert_check(STS, actions, "MX.example.test.", tls=True,
                      dane_verified=False) is CertCheck.MTA_STS
    req = HostTls(REQUIRETLS, force_tls=True, verify_cert=True,
                  check_cert_name="mx.example.test")
    assert cert_check(req, actions, "mx.example.test", tls=True,
                      dane_verified=False) is CertCheck.PKIX
    assert cert_check(STS, actions, "mx.example.test", tls=False,
                      dane_verified=False) is CertCheck.NONE
    assert cert_check(HostTls(DANE), ServerActions(), "mx.example.test", tls=True,
                      dane_verified=True) is CertCheck.DANE
    # A script's pattern is not the MX host: not authenticated for REQUIRETLS.
    pattern = ServerActions(verify_cert=True, check_cert_name="*.example.test")
    assert cert_check(STS, pattern, "mx.example.test", tls=True,
                      dane_verified=False) is CertCheck.NONE


def test_pkix_result_type_for_testing_mode(tmp_path: Path) -> None:
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    leaf = ca.issue_cert("mx.example.test")
    chain = [leaf.cert_chain_pems[0].bytes()]
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = [x509.load_pem_x509_certificate(p).public_bytes(Encoding.DER) for p in chain]
    now = datetime.now(UTC)
    assert pkix_result_type(der, "mx.example.test", bundle, now) == ""
    assert pkix_result_type(der, "other.example.test", bundle, now) == (
        "certificate-host-mismatch")
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    assert pkix_result_type(der, "mx.example.test", other, now) == "certificate-not-trusted"
    assert pkix_result_type([], "mx.example.test", bundle, now) == "certificate-not-trusted"


def test_one_sender_at_a_time(tmp_path: Path) -> None:
    first, second = tlsrpt_daily.SenderLock(tmp_path), tlsrpt_daily.SenderLock(tmp_path)
    assert first.acquire(wait=False)
    assert not second.acquire(wait=False)  # another daemon of the spool is sending
    first.release()
    assert second.acquire(wait=False)
    second.release()


async def test_the_daemons_pass_reports_ended_days(tmp_path: Path,
                                                  dns_server: DnsTestServer) -> None:
    config = config_from_mapping({
        "spool": {"path": str(tmp_path)}, "dns": {"nameservers": [dns_server.nameserver],
                                                    "timeout": "1s"},
        "tls": {"tlsrpt": True, "report_from": "tlsrpt@src.test"}})
    yesterday = datetime(2026, 1, 1, 12, tzinfo=UTC).timestamp()
    TlsRptStore(tmp_path, clock=lambda: yesterday).record(
        SessionResult("example.test", POLICY_STS, ("version: STSv1",), ("mx.example.test",)))
    sent: list[tuple[str, str]] = []
    lock = tlsrpt_daily.SenderLock(tmp_path)
    assert lock.acquire(wait=False)  # another process is sending: this pass does nothing
    assert await tlsrpt_daily.send_reports(config, lambda s, r, d: None,
                                           everything=False) is None
    lock.release()
    results = await tlsrpt_daily.send_reports(
        config, lambda s, r, d: sent.append((s, r)), everything=False)
    assert results is not None and [r.domain for r in results] == ["example.test"]
    assert not any((tmp_path / "tlsrpt" / "closed").iterdir())
