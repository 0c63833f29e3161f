"""DANE (RFC 7672, RFC 7671): pure matching with tables, the chain getter on each path,
and TLSA lookups through a real validating unbound in front of DNSSEC-signed zones."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mxsend.config import DnsConfig
from mxsend.dane import (
    DNSSEC_INVALID,
    DaneLookup,
    DaneState,
    TlsaRecord,
    peer_chain,
    record_matches,
    usable_records,
    verify_chain,
)
from mxsend.tlsdns import TlsResolver
from tests.fixtures.dns_server import DnsTestServer
from tests.fixtures.https_server import HttpsServer, HttpsServers, https_servers  # noqa: F401
from tests.fixtures.unbound import Unbound, build_test_zones, validating_resolver

NOW = datetime.now(UTC)


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def _spki(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Chain:
    """root CA -> intermediate -> leaf for mx.secure.test, as DER, leaf first."""

    def __init__(self, *names: str, not_after: datetime | None = None) -> None:
        self.root = trustme.CA()
        self.intermediate = self.root.create_child_ca()
        self.leaf_cert = self.intermediate.issue_cert(
            *(names or ("mx.secure.test",)), not_after=not_after
        )
        self.chain = [_der(blob.bytes()) for blob in self.leaf_cert.cert_chain_pems]
        self.leaf, self.ta = self.chain[0], self.chain[1]


@pytest.fixture(scope="module")
def pki() -> Chain:
    return Chain()


# --- usable records (RFC 7672 §3.1) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "usable"),
    [
        (TlsaRecord(3, 1, 1, b"x" * 32), True),
        (TlsaRecord(3, 0, 2, b"x" * 64), True),
        (TlsaRecord(2, 0, 0, b"der"), True),
        (TlsaRecord(2, 1, 1, b"x" * 32), True),
        (TlsaRecord(0, 0, 1, b"x" * 32), False),  # PKIX-TA: not for SMTP (§3.1.3)
        (TlsaRecord(1, 0, 1, b"x" * 32), False),  # PKIX-EE: not for SMTP
        (TlsaRecord(3, 2, 1, b"x" * 32), False),  # unknown selector
        (TlsaRecord(3, 1, 3, b"x" * 32), False),  # unknown matching type
        (TlsaRecord(3, 1, 1, b"x" * 31), False),  # SHA-256 of the wrong length
        (TlsaRecord(3, 1, 2, b"x" * 32), False),  # SHA-512 of the wrong length
        (TlsaRecord(3, 1, 0, b""), False),
    ],
)
def test_usable_records(record: TlsaRecord, usable: bool) -> None:
    assert usable_records([record]) == ((record,) if usable else ())


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_record_matches_each_selector_and_matching_type(
    pki: Chain, selector: int, mtype: int
) -> None:
    selected = pki.leaf if selector == 0 else _spki(pki.leaf)
    data = {0: selected, 1: hashlib.sha256(selected).digest(),
            2: hashlib.sha512(selected).digest()}[mtype]
    assert record_matches(TlsaRecord(3, selector, mtype, data), pki.leaf)
    assert not record_matches(TlsaRecord(3, selector, mtype, data), pki.ta)


# --- verify_chain ----------------------------------------------------------------------------


def _ee(der: bytes) -> TlsaRecord:
    return TlsaRecord(3, 1, 1, hashlib.sha256(_spki(der)).digest())


def _ta(der: bytes) -> TlsaRecord:
    return TlsaRecord(2, 0, 1, hashlib.sha256(der).digest())


def test_dane_ee_matches_without_name_or_expiry_checks() -> None:
    expired = Chain(not_after=NOW - timedelta(days=1))
    verdict = verify_chain([_ee(expired.leaf)], expired.chain, ["other.example"], NOW)
    assert verdict.ok and verdict.usage == 3


def test_dane_ee_mismatch_fails(pki: Chain) -> None:
    other = Chain()
    verdict = verify_chain([_ee(other.leaf)], pki.chain, ["mx.secure.test"], NOW)
    assert not verdict.ok


def test_dane_ta_matches_an_issuer_and_checks_the_name(pki: Chain) -> None:
    verdict = verify_chain([_ta(pki.ta)], pki.chain, ["mx.secure.test", "secure.test"], NOW)
    assert verdict.ok and verdict.usage == 2
    wrong = verify_chain([_ta(pki.ta)], pki.chain, ["mx.other.test"], NOW)
    assert not wrong.ok and "names none" in wrong.reason


def test_dane_ta_accepts_the_next_hop_domain_and_wildcards() -> None:
    wildcard = Chain("*.secure.test")
    assert verify_chain([_ta(wildcard.ta)], wildcard.chain, ["mx.secure.test"], NOW).ok
    assert not verify_chain([_ta(wildcard.ta)], wildcard.chain, ["a.mx.secure.test"], NOW).ok
    domain_only = Chain("secure.test")
    assert verify_chain([_ta(domain_only.ta)], domain_only.chain,
                        ["mx.secure.test", "secure.test"], NOW).ok


def test_dane_ta_refuses_a_leaf_the_anchor_did_not_sign(pki: Chain) -> None:
    forged = Chain()  # the attacker's own leaf, presented with the real anchor
    verdict = verify_chain([_ta(pki.ta)], [forged.leaf, pki.ta], ["mx.secure.test"], NOW)
    assert not verdict.ok and "signed" in verdict.reason


def test_dane_ta_refuses_an_expired_leaf() -> None:
    expired = Chain(not_after=NOW - timedelta(days=1))
    verdict = verify_chain([_ta(expired.ta)], expired.chain, ["mx.secure.test"], NOW)
    assert not verdict.ok and "expired" in verdict.reason


def test_dane_ta_must_not_match_the_leaf_itself(pki: Chain) -> None:
    # Usage 2 names a trust anchor; a record for the leaf under usage 2 does not count.
    assert not verify_chain([_ta(pki.leaf)], pki.chain, ["mx.secure.test"], NOW).ok


def test_no_certificate_fails(pki: Chain) -> None:
    assert not verify_chain([_ee(pki.leaf)], [], ["mx.secure.test"], NOW).ok


# --- peer_chain on each path -------------------------------------------------------------------


@pytest.fixture
def tls_server(https_servers: HttpsServers) -> HttpsServer:  # noqa: F811
    return https_servers.start("127.0.0.2", names=("mx.secure.test",))


def _unverified_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # DANE authenticates after the handshake
    return context


def _tls_socket(port: int, host: str) -> ssl.SSLSocket:
    raw = socket.create_connection((host, port), timeout=5)
    return _unverified_context().wrap_socket(raw, server_hostname="mx.secure.test")


def test_peer_chain_private_sslobj_path_on_a_real_socket(tls_server: HttpsServer) -> None:
    with _tls_socket(tls_server.port, "127.0.0.2") as tls:
        if sys.version_info < (3, 13):
            assert not hasattr(tls, "get_unverified_chain")  # the path under test
        chain = peer_chain(tls)
        leaf = tls.getpeercert(binary_form=True)
    assert chain and chain[0] == leaf
    san = x509.load_der_x509_certificate(chain[0]).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["mx.secure.test"]


async def test_peer_chain_on_asyncio_ssl_object(tls_server: HttpsServer) -> None:
    _, writer = await asyncio.open_connection(
        "127.0.0.2", tls_server.port, ssl=_unverified_context(),
        server_hostname="mx.secure.test",
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        chain = peer_chain(ssl_object)
        assert chain[0] == ssl_object.getpeercert(binary_form=True)
    finally:
        writer.close()


def test_peer_chain_public_method_path(pki: Chain) -> None:
    class Python313Socket:
        def get_unverified_chain(self) -> list[bytes]:
            return list(pki.chain)

    assert peer_chain(Python313Socket()) == pki.chain


def test_peer_chain_falls_back_to_the_leaf(pki: Chain) -> None:
    class LeafOnly:
        def getpeercert(self, binary_form: bool = False) -> bytes:
            return pki.leaf

    assert peer_chain(LeafOnly()) == [pki.leaf]


def test_peer_chain_gives_intermediates_for_dane_ta(https_servers: HttpsServers) -> None:  # noqa: F811
    intermediate = https_servers.ca.create_child_ca()
    server = https_servers.start("127.0.0.3", names=("mx.secure.test",), ca=intermediate)
    with _tls_socket(server.port, "127.0.0.3") as tls:
        chain = peer_chain(tls)
    ta = _der(intermediate.cert_pem.bytes())
    assert ta in chain[1:]
    assert verify_chain([_ta(ta)], chain, ["mx.secure.test"], NOW).ok


# --- lookups through a real validating resolver -------------------------------------------------


LEAF = Chain()
BOGUS_TLSA = "_25._tcp.bogus.secure.test."


@pytest.fixture(scope="module")
def unbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    zones = build_test_zones()
    ee = _ee(LEAF.leaf)
    zones.add_records("secure.test.", f"""
@ 300 IN MX 10 mx
mx 300 IN A 127.0.0.2
_25._tcp.mx 300 IN TLSA 3 1 1 {ee.data.hex()}
unusable 300 IN A 127.0.0.2
_25._tcp.unusable 300 IN TLSA 1 0 1 {ee.data.hex()}
nodata 300 IN A 127.0.0.2
_25._tcp.nodata 300 IN TXT "not a TLSA"
notlsa 300 IN A 127.0.0.2
bogus 300 IN A 127.0.0.2
_25._tcp.bogus 300 IN TLSA 3 1 1 {ee.data.hex()}
bogusaddr 300 IN A 127.0.0.2
""")
    zones.add_records("insecure.test.", f"""
@ 300 IN MX 10 mx
mx 300 IN A 127.0.0.2
_25._tcp.mx 300 IN TLSA 3 1 1 {ee.data.hex()}
""")
    sign = zones.sign

    def sign_then_break() -> None:
        sign()
        zones.break_signature(BOGUS_TLSA, "TLSA")
        zones.break_signature("bogusaddr.secure.test.", "A")

    zones.sign = sign_then_break  # type: ignore[method-assign]
    with validating_resolver(zones, tmp_path_factory.mktemp("unbound")) as resolver:
        yield resolver


def _lookup(unbound: Unbound) -> DaneLookup:
    config = DnsConfig(nameservers=(unbound.nameserver,), timeout=3.0, ipv6=False)
    return DaneLookup(TlsResolver(config), port=25)


async def test_secure_domain_with_usable_tlsa_requires_dane(unbound: Unbound) -> None:
    dane = _lookup(unbound)
    assert await dane.domain_secure("secure.test") is None
    policy = await dane.host_policy("secure.test", "mx.secure.test")
    assert policy.state is DaneState.REQUIRED and policy.tls_required
    assert policy.records == (_ee(LEAF.leaf),)
    assert policy.names == ("mx.secure.test", "secure.test")
    # ...and the presented chain is checked against those records.
    assert verify_chain(policy.records, LEAF.chain, policy.names, NOW).ok


@pytest.mark.parametrize(
    ("host", "state"),
    [
        ("unusable.secure.test", DaneState.OPPORTUNISTIC),  # only PKIX-EE records
        ("nodata.secure.test", DaneState.NOT_APPLICABLE),  # secure NODATA
        ("notlsa.secure.test", DaneState.NOT_APPLICABLE),  # secure NXDOMAIN
        ("bogus.secure.test", DaneState.TEMPFAIL),  # bad TLSA signature
        ("bogusaddr.secure.test", DaneState.TEMPFAIL),  # bad address signature
        ("mx.insecure.test", DaneState.NOT_APPLICABLE),  # unsigned delegation
    ],
)
async def test_host_policy_outcomes(unbound: Unbound, host: str, state: DaneState) -> None:
    policy = await _lookup(unbound).host_policy("secure.test", host)
    assert policy.state is state, policy.reason
    if state is DaneState.TEMPFAIL:
        assert policy.result_type == DNSSEC_INVALID and not policy.tls_required


async def test_insecure_mx_means_no_dane(unbound: Unbound) -> None:
    policy = await _lookup(unbound).domain_secure("insecure.test")
    assert policy is not None and policy.state is DaneState.NOT_APPLICABLE


async def test_without_a_validating_resolver_nothing_is_secure(unbound: Unbound) -> None:
    # The same zones asked straight from the authoritative server carry no AD bit.
    stub_host, _, stub_port = unbound.stub.rpartition(":")
    config = DnsConfig(nameservers=(unbound.stub,), timeout=3.0, ipv6=False)
    assert stub_host == "127.0.0.1" and stub_port
    policy = await DaneLookup(TlsResolver(config)).domain_secure("secure.test")
    assert policy is not None and policy.state is DaneState.NOT_APPLICABLE


def test_unbound_is_stopped_by_pid(tmp_path: Path) -> None:
    zones = build_test_zones()
    with validating_resolver(zones, tmp_path) as resolver:
        process = resolver.process
        assert process is not None and process.poll() is None
    assert process.poll() is not None


async def _presented_chain(port: int, host: str) -> list[bytes]:
    _, writer = await asyncio.open_connection(
        host, port, ssl=_unverified_context(), server_hostname="mx.secure.test"
    )
    try:
        return peer_chain(writer.get_extra_info("ssl_object"))
    finally:
        writer.close()


async def test_end_to_end_tlsa_from_validated_dns_authenticates_the_real_server(
    tmp_path: Path, https_servers: HttpsServers,  # noqa: F811
) -> None:
    intermediate = https_servers.ca.create_child_ca()
    genuine = https_servers.start("127.0.0.2", names=("mx.secure.test",), ca=intermediate)
    impostor = https_servers.start("127.0.0.3", names=("mx.secure.test",))  # another CA
    genuine_chain = await _presented_chain(genuine.port, "127.0.0.2")
    ee = _ee(genuine_chain[0])
    ta = _ta(_der(intermediate.cert_pem.bytes()))
    zones = build_test_zones()
    zones.add_records("secure.test.", f"""
@ 300 IN MX 10 mx
@ 300 IN MX 20 mx2
mx 300 IN A 127.0.0.2
_25._tcp.mx 300 IN TLSA 3 1 1 {ee.data.hex()}
mx2 300 IN A 127.0.0.3
_25._tcp.mx2 300 IN TLSA 2 0 1 {ta.data.hex()}
""")
    with validating_resolver(zones, tmp_path) as resolver:
        dane = _lookup(resolver)
        assert await dane.domain_secure("secure.test") is None
        mx = await dane.host_policy("secure.test", "mx.secure.test")
        mx2 = await dane.host_policy("secure.test", "mx2.secure.test")
    assert mx.state is mx2.state is DaneState.REQUIRED
    assert verify_chain(mx.records, genuine_chain, mx.names, NOW).ok
    # DANE-TA for mx2: the genuine chain is anchored, but it names mx, not mx2.
    assert not verify_chain(mx2.records, genuine_chain, mx2.names, NOW).ok
    assert verify_chain(mx2.records, genuine_chain, ("mx.secure.test",), NOW).ok
    # An impostor on the address (wrong certificate): neither record accepts it.
    impostor_chain = await _presented_chain(impostor.port, "127.0.0.3")
    assert not verify_chain(mx.records, impostor_chain, mx.names, NOW).ok
    assert not verify_chain(mx2.records, impostor_chain, ("mx.secure.test",), NOW).ok


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_lookups_are_cached_for_their_ttl(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("plain.test", 10, "mx.plain.test", ttl=120)
    dns_server.set_servfail("broken.test")
    clock = Clock()
    dane = DaneLookup(TlsResolver(dns_server.dns_config(ipv6=False)), clock=clock,
                      failure_ttl=30.0)
    for _ in range(3):
        insecure = await dane.domain_secure("plain.test")
        assert insecure is not None and insecure.state is DaneState.NOT_APPLICABLE
        broken = await dane.domain_secure("broken.test")
        assert broken is not None and broken.state is DaneState.TEMPFAIL
    assert dns_server.query_count("plain.test", "MX") == 1
    assert dns_server.query_count("broken.test", "MX") >= 1
    before = dns_server.query_count("broken.test", "MX")
    clock.now += 31  # the failure is asked again, the answer is still fresh
    await dane.domain_secure("broken.test")
    await dane.domain_secure("plain.test")
    assert dns_server.query_count("broken.test", "MX") > before
    assert dns_server.query_count("plain.test", "MX") == 1
    clock.now += 100
    await dane.domain_secure("plain.test")
    assert dns_server.query_count("plain.test", "MX") == 2
