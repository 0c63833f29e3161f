"""DNS for the TLS policies: TXT, addresses and TLSA, each with its DNSSEC status.

Like mx.py for MX, this is where the TLS-policy code meets dnspython: every outcome
becomes a `Lookup` value (status, records, `secure`), so mta_sts.py, dane.py and
tlsrpt.py never handle a DNS exception.

`secure` is the AD bit of the answer (RFC 4035 §3.2.3). It means something only when
`dns.nameservers` is a validating resolver the host trusts (on loopback, as Postfix
requires for DANE): we ask for it by setting AD and DO in the query (RFC 6840 §5.7,
RFC 3225). A validating resolver answers SERVFAIL for a bogus answer (RFC 4035 §5.5),
which is `FAILED` here.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from enum import Enum

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver

from mxsend.config import DnsConfig
from mxsend.mx import _dns_resolver  # one home for how dns.nameservers becomes a resolver

# EDNS buffer size recommended by the DNS flag day 2020 (avoids fragmentation).
_EDNS_PAYLOAD = 1232


class Status(Enum):
    """How a lookup ended."""

    OK = "ok"
    NODATA = "nodata"  # the name exists, without records of the type
    NXDOMAIN = "nxdomain"
    FAILED = "failed"  # SERVFAIL (bogus, for a validating resolver), timeout, no answer


@dataclass(frozen=True, slots=True)
class Lookup:
    """One (name, type) answer: records as values, AD bit, TTL, and why it failed."""

    status: Status
    secure: bool = False
    texts: tuple[str, ...] = ()  # TXT: each record's strings joined; A/AAAA: addresses
    tlsa: tuple[tuple[int, int, int, bytes], ...] = ()  # (usage, selector, mtype, data)
    mx: tuple[tuple[int, str], ...] = ()  # (preference, host)
    ttl: float = 0.0
    detail: str = ""

    @property
    def exists(self) -> bool:
        return self.status is Status.OK


class TlsResolver:
    """Queries with DO and AD set, through `dns.nameservers` (never another resolver)."""

    def __init__(self, config: DnsConfig) -> None:
        self._config = config
        self._resolver: dns.asyncresolver.Resolver = _dns_resolver(config)
        self._resolver.use_edns(0, dns.flags.DO, _EDNS_PAYLOAD)
        self._resolver.flags = dns.flags.RD | dns.flags.AD

    async def txt(self, name: str) -> Lookup:
        return await self._ask(name, dns.rdatatype.TXT)

    async def tlsa(self, name: str) -> Lookup:
        return await self._ask(name, dns.rdatatype.TLSA)

    async def mx(self, name: str) -> Lookup:
        return await self._ask(name, dns.rdatatype.MX)

    async def addresses(self, host: str) -> tuple[Lookup, ...]:
        """A, then AAAA when `dns.ipv6` (the order in which they are tried)."""
        kinds = [dns.rdatatype.A]
        if self._config.ipv6:
            kinds.append(dns.rdatatype.AAAA)
        return tuple(await asyncio.gather(*(self._ask(host, kind) for kind in kinds)))

    async def _ask(self, name: str, rdtype: dns.rdatatype.RdataType) -> Lookup:
        kind = dns.rdatatype.to_text(rdtype)
        try:
            qname = dns.name.from_text(name)
            answer = await self._resolver.resolve(
                qname, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            return Lookup(Status.NXDOMAIN, secure=_nxdomain_secure(exc))
        except dns.exception.Timeout:
            return Lookup(Status.FAILED, detail=f"{name} {kind}: timed out")
        except dns.resolver.NoNameservers:
            return Lookup(Status.FAILED, detail=f"{name} {kind}: SERVFAIL")
        except dns.exception.DNSException as exc:
            return Lookup(Status.FAILED, detail=f"{name} {kind}: {exc}")
        except OSError as exc:
            return Lookup(Status.FAILED, detail=f"{name} {kind}: {exc.strerror or exc}")
        secure = bool(answer.response.flags & dns.flags.AD)
        rrset = answer.rrset
        if rrset is None or len(rrset) == 0:
            return Lookup(Status.NODATA, secure=secure)
        ttl = float(rrset.ttl)
        if rdtype == dns.rdatatype.TXT:
            texts = tuple(
                b"".join(rd.strings).decode("utf-8", "replace") for rd in rrset
            )
            return Lookup(Status.OK, secure=secure, texts=texts, ttl=ttl)
        if rdtype == dns.rdatatype.TLSA:
            records = tuple(
                (int(rd.usage), int(rd.selector), int(rd.mtype), bytes(rd.cert)) for rd in rrset
            )
            return Lookup(Status.OK, secure=secure, tlsa=records, ttl=ttl)
        if rdtype == dns.rdatatype.MX:
            mx = tuple(
                (int(rd.preference), rd.exchange.to_text(omit_final_dot=True).lower())
                for rd in rrset
            )
            return Lookup(Status.OK, secure=secure, mx=mx, ttl=ttl)
        addresses = tuple(str(ipaddress.ip_address(rd.address)) for rd in rrset)
        return Lookup(Status.OK, secure=secure, texts=addresses, ttl=ttl)


def _nxdomain_secure(exc: dns.resolver.NXDOMAIN) -> bool:
    """A validated denial of existence carries AD too (RFC 4035 §3.2.3)."""
    responses = exc.kwargs.get("responses") or {}
    return any(bool(response.flags & dns.flags.AD) for response in responses.values())
