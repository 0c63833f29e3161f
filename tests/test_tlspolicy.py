"""The combined TLS policy for delivery: precedence, presets, overrides; and the
MTA-STS path end to end with the real DNS and HTTPS servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from mxsend.actions import ServerActions
from mxsend.config import config_from_mapping
from mxsend.dane import DanePolicy, DaneState, TlsaRecord
from mxsend.mta_sts import Mode, Policy, decide
from mxsend.mta_sts_cache import PolicyLookup
from mxsend.tlspolicy import (
    DANE,
    MTA_STS,
    NONE,
    REQUIRETLS,
    DomainTls,
    TlsPolicies,
    host_tls,
    preset_actions,
    weakened,
)
from tests.fixtures.dns_server import DnsTestServer
from tests.fixtures.https_server import HttpsServers, https_servers  # noqa: F401

TEXT = "version: STSv1\nmode: enforce\nmx: mx1.example.test\nmax_age: 86400\n"
ENFORCE = Policy(Mode.ENFORCE, ("mx1.example.test",), 86400, "1", TEXT)
TESTING = Policy(Mode.TESTING, ("mx1.example.test",), 86400, "1", TEXT)
RECORD = TlsaRecord(3, 1, 1, b"x" * 32)
REQUIRED = DanePolicy(DaneState.REQUIRED, (RECORD,), ("mx1.example.test", "example.test"))
BOGUS = DanePolicy(DaneState.TEMPFAIL, reason="SERVFAIL", result_type="dnssec-invalid")


def domain(policy: Policy | None = None, **kwargs: object) -> DomainTls:
    sts = PolicyLookup(policy, "cache") if policy else None
    return DomainTls("example.test", sts, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dom", "dane", "host", "policy", "allowed", "force", "verify", "name"),
    [
        (domain(), None, "mx1.example.test", NONE, True, False, False, ""),
        (domain(ENFORCE), None, "mx1.example.test", MTA_STS, True, True, True,
         "mx1.example.test"),
        (domain(ENFORCE), None, "evil.test", MTA_STS, False, True, True, "evil.test"),
        (domain(TESTING), None, "evil.test", NONE, True, False, False, ""),
        (domain(ENFORCE), REQUIRED, "mx1.example.test", DANE, True, True, False, ""),
        (domain(None, requiretls=True), None, "mx1.example.test", REQUIRETLS, True, True,
         True, "mx1.example.test"),
        (domain(TESTING, requiretls=True), None, "mx1.example.test", REQUIRETLS, True, True,
         True, "mx1.example.test"),
    ],
)
def test_precedence(dom: DomainTls, dane: DanePolicy | None, host: str, policy: str,
                    allowed: bool, force: bool, verify: bool, name: str) -> None:
    sts = dom.sts.policy if dom.sts else None
    result = host_tls(dom, host, dane, decide(sts, host))
    assert (result.policy, result.allowed, result.force_tls, result.verify_cert,
            result.check_cert_name) == (policy, allowed, force, verify, name)


def test_dane_bogus_is_a_temporary_failure_before_mta_sts() -> None:
    result = host_tls(domain(ENFORCE), "mx1.example.test", BOGUS,
                      decide(ENFORCE, "mx1.example.test"))
    assert result.policy == DANE and "SERVFAIL" in result.tempfail


def test_tls_rpt_templates() -> None:
    sts = host_tls(domain(ENFORCE), "mx1.example.test", None, decide(ENFORCE, "mx1.example.test"))
    assert sts.report is not None and sts.report.policy_type == "sts"
    assert sts.report.policy_string == ("version: STSv1", "mode: enforce",
                                        "mx: mx1.example.test", "max_age: 86400")
    dane = host_tls(domain(), "mx1.example.test", REQUIRED, decide(None, "mx1.example.test"))
    assert dane.report is not None and dane.report.policy_string == (RECORD.text(),)


def test_mx_authenticated_by_dnssec_or_enforced_sts() -> None:
    assert host_tls(domain(ENFORCE), "mx1.example.test", None,
                    decide(ENFORCE, "mx1.example.test")).mx_authenticated
    assert host_tls(domain(None, mx_secure=True, requiretls=True), "mx1.example.test",
                    None, decide(None, "mx1.example.test")).mx_authenticated
    assert not host_tls(domain(None, requiretls=True), "mx1.example.test", None,
                        decide(None, "mx1.example.test")).mx_authenticated


def test_preset_and_weakened() -> None:
    base = ServerActions(helo_name="me.test")
    sts = host_tls(domain(ENFORCE), "mx1.example.test", None, decide(ENFORCE, "mx1.example.test"))
    preset = preset_actions(base, sts)
    assert (preset.force_tls, preset.verify_cert, preset.check_cert_name) == (
        True, True, "mx1.example.test")
    assert preset_actions(base, host_tls(domain(), "mx", None, decide(None, "mx"))) is base
    assert not weakened(preset, preset)
    assert weakened(preset, ServerActions(helo_name="me.test"))
    assert weakened(preset, ServerActions(force_tls=True, verify_cert=True,
                                          check_cert_name="*"))
    # A script adding a pin on top weakens nothing.
    stronger = ServerActions(force_tls=True, verify_cert=True,
                             check_cert_name="mx1.example.test", check_cert_thumbprint="ab" * 32)
    assert not weakened(preset, stronger)


async def test_mta_sts_end_to_end(
    tmp_path: Path, dns_server: DnsTestServer, https_servers: HttpsServers,  # noqa: F811
) -> None:
    server = https_servers.start("127.0.0.2", names=("mta-sts.example.test",))
    server.route("/.well-known/mta-sts.txt", body=TEXT.encode())
    dns_server.add("_mta-sts.example.test", "TXT", '"v=STSv1; id=1"')
    dns_server.add_a("mta-sts.example.test", "127.0.0.2")
    config = config_from_mapping({
        "spool": {"path": str(tmp_path)},
        "dns": {"nameservers": [dns_server.nameserver], "ipv6": False},
        "smtp": {"ca_file": str(server.ca_file)},
    })
    policies = TlsPolicies(config, sts_port=server.port)
    dom = await policies.for_domain("example.test")
    good = await policies.for_host(dom, "mx1.example.test")
    bad = await policies.for_host(dom, "mx9.elsewhere.test")
    assert (good.policy, good.allowed, good.check_cert_name) == (
        MTA_STS, True, "mx1.example.test")
    assert (bad.policy, bad.allowed) == (MTA_STS, False)
    # `TLS-Required: No` waives the policy for that message.
    waived = await policies.for_domain("example.test", header_lines=["TLS-Required: No"])
    assert (await policies.for_host(waived, "mx9.elsewhere.test")).allowed
