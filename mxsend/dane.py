"""DANE for SMTP (RFC 7672, RFC 7671): TLSA lookup, the per-host decision, matching.

Pure parts (tested with tables): `usable_records`, `record_matches`, `verify_chain`,
`peer_chain`. The lookup (`DaneLookup.host_policy`) reads DNSSEC status from the AD bit
of the configured resolver (tlsdns.py), which must be a validating resolver on loopback.

Per MX host (RFC 7672 §2.2):

| DNS                                          | outcome                              |
|----------------------------------------------|--------------------------------------|
| MX or address answer insecure                | NOT_APPLICABLE: no DANE, as before   |
| address or TLSA lookup fails (bogus, SERVFAIL)| TEMPFAIL: temporary failure, no mail |
| TLSA NXDOMAIN / NODATA (secure denial)       | NOT_APPLICABLE                       |
| TLSA insecure                                | NOT_APPLICABLE                       |
| TLSA secure, no usable record                | OPPORTUNISTIC: TLS when offered      |
| TLSA secure with usable records              | REQUIRED: TLS, and `verify_chain`    |

Usable records (RFC 7672 §3.1): usage 3 (DANE-EE) and 2 (DANE-TA), selector 0 (full
certificate) or 1 (SubjectPublicKeyInfo), matching type 0 (exact), 1 (SHA-256) or
2 (SHA-512) with the right digest length. Usages 0 and 1 are not used for SMTP (§3.1.3).
"""

from __future__ import annotations

import hashlib
import itertools
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from mxsend.tlsdns import Lookup, Status, TlsResolver

USAGE_DANE_TA = 2
USAGE_DANE_EE = 3
SELECTOR_CERT = 0
SELECTOR_SPKI = 1
MATCH_FULL = 0
MATCH_SHA256 = 1
MATCH_SHA512 = 2
_DIGEST_SIZES = {MATCH_SHA256: 32, MATCH_SHA512: 64}

# RFC 8460 §4.3 result types for DANE problems.
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"
DANE_REQUIRED = "dane-required"
_MAX_CACHE = 10_000


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    usage: int
    selector: int
    mtype: int
    data: bytes

    def text(self) -> str:
        """Presentation format, for logs and TLS-RPT policy-string."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


def usable_records(records: Sequence[TlsaRecord]) -> tuple[TlsaRecord, ...]:
    """The records RFC 7672 §3.1 lets an SMTP client use; the rest are ignored."""
    usable = []
    for record in records:
        if record.usage not in (USAGE_DANE_TA, USAGE_DANE_EE):
            continue
        if record.selector not in (SELECTOR_CERT, SELECTOR_SPKI):
            continue
        if record.mtype == MATCH_FULL:
            if not record.data:
                continue
        elif _DIGEST_SIZES.get(record.mtype) != len(record.data):
            continue  # unknown matching type, or a digest of the wrong length
        usable.append(record)
    return tuple(usable)


def _selected(record: TlsaRecord, der: bytes) -> bytes:
    if record.selector == SELECTOR_CERT:
        return der
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_der_x509_certificate(der)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def record_matches(record: TlsaRecord, der: bytes) -> bool:
    """Does this certificate (DER) match the record's selector and matching type?"""
    try:
        selected = _selected(record, der)
    except ValueError:
        return False
    if record.mtype == MATCH_SHA256:
        selected = hashlib.sha256(selected).digest()
    elif record.mtype == MATCH_SHA512:
        selected = hashlib.sha512(selected).digest()
    return selected == record.data


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking a presented chain against the TLSA records."""

    ok: bool
    reason: str
    usage: int | None = None  # the usage that matched


def verify_chain(
    records: Sequence[TlsaRecord], chain: Sequence[bytes], names: Sequence[str],
    now: datetime,
) -> Verdict:
    """Authenticate a server by its presented chain (leaf first) per RFC 7672 §3.1.

    DANE-EE (3): the leaf matches; no name or expiry checks (RFC 7672 §3.1.1).
    DANE-TA (2): a certificate of the chain matches, the chain from the leaf up to it
    is signed link by link and in date, and the leaf names one of `names` (the MX host,
    and the next-hop domain: RFC 7672 §3.2.2).
    """
    usable = usable_records(records)
    if not chain:
        return Verdict(False, "the server presented no certificate")
    if any(r.usage == USAGE_DANE_EE and record_matches(r, chain[0]) for r in usable):
        return Verdict(True, "DANE-EE record matches the server's certificate", USAGE_DANE_EE)
    anchors = [r for r in usable if r.usage == USAGE_DANE_TA]
    for depth in range(1, len(chain)):
        if any(record_matches(r, chain[depth]) for r in anchors):
            problem = _chain_problem(chain[: depth + 1], names, now)
            if problem:
                return Verdict(False, f"DANE-TA: {problem}")
            return Verdict(True, f"DANE-TA record matches chain certificate {depth}",
                           USAGE_DANE_TA)
    return Verdict(False, "no TLSA record matches the presented certificates")


def _chain_problem(chain: Sequence[bytes], names: Sequence[str], now: datetime) -> str:
    """"" if each certificate is signed by the next and in date, and the leaf is named."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    from mxsend.tls import certificate_names, name_matches

    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError:
        return "a certificate of the chain cannot be parsed"
    for child, issuer in itertools.pairwise(certs):
        try:
            child.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError):
            return "the chain is not signed link by link up to the trust anchor"
    for cert in certs[:-1]:  # the anchor itself is trusted by DNSSEC, not by its dates
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return "a certificate of the chain is expired or not yet valid"
    presented = certificate_names(chain[0])
    # tls.name_matches honours certificate wildcards (RFC 6125 §6.4.3); a host name has
    # no `*` or `?` of its own, so it matches only itself.
    if not any(name_matches(name.lower().rstrip("."), presented) for name in names if name):
        return f"the certificate names none of {', '.join(names)}"
    return ""


def peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket | Any) -> list[bytes]:
    """The certificates the peer presented, leaf first, as DER, on every Python.

    `get_unverified_chain()` is public on SSLSocket and SSLObject from Python 3.13 and
    returns DER bytes. From 3.10 the same method exists on the private `_sslobj` (the
    `_ssl._SSLSocket`) and returns `_ssl.Certificate` objects. Python 3.11 (Debian 12,
    our floor) has only the latter. Without either, the leaf alone is returned, which
    suffices for DANE-EE but makes DANE-TA fail (closed, never open).
    """
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        inner = getattr(ssl_object, "_sslobj", None)
        getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        chain = getter() or []
        return [_der(cert) for cert in chain]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def _der(cert: Any) -> bytes:
    if isinstance(cert, bytes | bytearray):
        return bytes(cert)
    return bytes(cert.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]


# --- the lookup -----------------------------------------------------------------------


class DaneState(Enum):
    NOT_APPLICABLE = "not-applicable"  # no DANE for this host: deliver as before
    OPPORTUNISTIC = "opportunistic"  # secure TLSA, none usable: TLS when offered
    REQUIRED = "required"  # usable TLSA: TLS mandatory, authenticated by verify_chain
    TEMPFAIL = "tempfail"  # bogus or failed lookups: temporary failure, send nothing


@dataclass(frozen=True, slots=True)
class DanePolicy:
    """What DANE asks of the connection to one MX host."""

    state: DaneState
    records: tuple[TlsaRecord, ...] = ()  # the usable ones
    names: tuple[str, ...] = ()  # reference identifiers for DANE-TA
    reason: str = ""
    result_type: str = ""  # RFC 8460 result type when state is TEMPFAIL

    @property
    def tls_required(self) -> bool:
        return self.state is DaneState.REQUIRED


class DaneLookup:
    """TLSA lookups behind a validating resolver (RFC 7672 §2.2), cached briefly.

    The resolver on loopback caches too; ours saves its round trips on every message
    (MX, A, AAAA and TLSA per host). Answers are kept for their smallest TTL, at most
    `max_ttl`; failures (bogus) for `failure_ttl`.
    """

    def __init__(
        self, resolver: TlsResolver, port: int = 25, *, max_ttl: float = 300.0,
        failure_ttl: float = 30.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._port = port
        self._max_ttl = max_ttl
        self._failure_ttl = failure_ttl
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, DanePolicy | None]] = {}

    def _get(self, key: tuple[str, str]) -> tuple[bool, DanePolicy | None]:
        hit = self._cache.get(key)
        if hit is not None and hit[0] > self._clock():
            return True, hit[1]
        return False, None

    def _put(self, key: tuple[str, str], policy: DanePolicy | None, lookups: Sequence[Lookup],
             ) -> DanePolicy | None:
        if policy is not None and policy.state is DaneState.TEMPFAIL:
            ttl = self._failure_ttl
        else:
            ttl = min([self._max_ttl, *(lookup.ttl for lookup in lookups if lookup.exists)])
        if ttl > 0:
            if len(self._cache) >= _MAX_CACHE:
                self._cache.clear()  # rare; the resolver still has everything
            self._cache[key] = (self._clock() + ttl, policy)
        return policy

    async def domain_secure(self, domain: str) -> DanePolicy | None:
        """None when the domain's MX answer is DNSSEC-validated (DANE may apply).

        Otherwise the policy for every host of the domain: NOT_APPLICABLE for an insecure
        MX RRset (RFC 7672 §2.2.1), TEMPFAIL when the MX lookup fails validation.
        A secure NODATA (implicit MX, RFC 5321 §5.1) counts as secure.
        """
        key = ("mx", domain.lower().rstrip("."))
        found, cached = self._get(key)
        if found:
            return cached
        mx = await self._resolver.mx(domain)
        if mx.status is Status.FAILED:
            policy: DanePolicy | None = DanePolicy(
                DaneState.TEMPFAIL, reason=mx.detail, result_type=DNSSEC_INVALID
            )
        elif not mx.secure:
            policy = DanePolicy(DaneState.NOT_APPLICABLE, reason=f"MX of {domain} is insecure")
        else:
            policy = None
        return self._put(key, policy, [mx])

    async def host_policy(self, domain: str, host: str) -> DanePolicy:
        """The DANE policy of one MX host of `domain` whose MX answer was secure."""
        host = host.lower().rstrip(".")
        key = (domain.lower().rstrip("."), host)
        found, cached = self._get(key)
        if found and cached is not None:
            return cached
        policy, lookups = await self._host_policy(domain, host)
        self._put(key, policy, lookups)
        return policy

    async def _host_policy(self, domain: str, host: str) -> tuple[DanePolicy, list[Lookup]]:
        addresses = list(await self._resolver.addresses(host))
        if any(lookup.status is Status.FAILED for lookup in addresses):
            detail = "; ".join(lookup.detail for lookup in addresses if lookup.detail)
            return DanePolicy(DaneState.TEMPFAIL, reason=detail,
                              result_type=DNSSEC_INVALID), addresses
        found = [lookup for lookup in addresses if lookup.exists]
        if not found or not all(lookup.secure for lookup in found):
            # RFC 7672 §2.2.2: TLSA records are looked up only for secure addresses.
            return DanePolicy(DaneState.NOT_APPLICABLE,
                              reason=f"addresses of {host} insecure"), addresses
        name = f"_{self._port}._tcp.{host}"
        tlsa = await self._resolver.tlsa(name)
        lookups = [*addresses, tlsa]
        if tlsa.status is Status.FAILED:
            return DanePolicy(DaneState.TEMPFAIL, reason=tlsa.detail,
                              result_type=DNSSEC_INVALID), lookups
        if not tlsa.secure:
            return DanePolicy(DaneState.NOT_APPLICABLE, reason=f"{name} is insecure"), lookups
        if tlsa.status is not Status.OK:
            return DanePolicy(DaneState.NOT_APPLICABLE, reason=f"no TLSA at {name}"), lookups
        records = usable_records([TlsaRecord(*fields) for fields in tlsa.tlsa])
        if not records:
            return DanePolicy(DaneState.OPPORTUNISTIC, reason=f"no usable TLSA at {name}",
                              result_type=TLSA_INVALID), lookups
        names = tuple(dict.fromkeys((host, domain.lower().rstrip("."))))
        return DanePolicy(DaneState.REQUIRED, records, names,
                          f"{len(records)} TLSA at {name}"), lookups
