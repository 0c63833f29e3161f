"""MX resolution: pure ordering, and an async dnspython lookup behind a TTL cache.

This is the only module that sees dnspython. Every DNS outcome is translated here, once,
into a list of MxHost values or a TemporaryFailure / PermanentFailure with phase DNS and
an enhanced status code (RFC 3463), so the rest of mxsend never handles a DNS exception.

The rules (contract §5, RFC 5321 §5.1, RFC 7505):

- MX records are tried by preference, lowest first; equal preferences are shuffled so
  load spreads as the domain intends (RFC 5321 §5.1).
- `MX 0 .` alone is a null MX: the domain accepts no mail, a permanent 5.1.10
  (RFC 7505 §3, §4.2).
- NXDOMAIN for the domain is permanent 5.1.2; SERVFAIL or a timeout is temporary 4.4.3.
- No MX records: the domain's own A/AAAA records are an implicit MX of preference 0
  (RFC 5321 §5.1). No address either: permanent 5.4.4 (as Postfix: "no route").
- An MX host whose addresses cannot be resolved is skipped; if none is left the
  failure is temporary 4.4.3, or permanent 5.1.2 when every host is NXDOMAIN.
- `[192.0.2.1]` and `[IPv6:2001:db8::1]` are address literals and need no DNS
  (RFC 5321 §4.1.3).
- Each host's addresses are IPv6 first, then IPv4 (RFC 6724 §2.1's default preference),
  AAAA only when `dns.ipv6` is on.

Caching. A daemon delivering tens of thousands of messages to a handful of domains asks
for the same plan over and over, so a cache hit must cost a dictionary lookup: plans are
cached per domain until the shortest TTL that went into them expires, on top of a
per-record cache keyed by (name, type). Negative answers are cached for the SOA minimum
(RFC 2308 §5), capped at MAX_NEGATIVE_TTL; SERVFAIL and timeouts for `failure_ttl`
seconds (RFC 2308 §7 allows up to five minutes) so a broken domain is not re-queried for
every message. Concurrent lookups of one domain share a single query. Equal-preference
shuffling happens on every call, also for cached plans.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import idna

from mxsend.addresses import address_literal
from mxsend.config import DnsConfig
from mxsend.config_values import split_host_port
from mxsend.errors import ConfigError, EnvelopeError, PermanentFailure, Phase, TemporaryFailure

# RFC 2308 §5: negative answers should not be cached for more than a few hours; a mail
# queue gains nothing from trusting one for long.
MAX_NEGATIVE_TTL = 3600.0
# Resolvers commonly cap positive TTLs at a day (RFC 8767 §4 suggests 7 days at most).
MAX_TTL = 86400.0
DEFAULT_FAILURE_TTL = 30.0
DEFAULT_MAX_ENTRIES = 10_000
# dnspython's per-attempt timeout: a lost UDP packet is retried within dns.timeout.
_ATTEMPT_TIMEOUT = 2.0

DSN_NULL_MX = "5.1.10"  # RFC 7505 §4.2
DSN_NO_DOMAIN = "5.1.2"  # RFC 3463 §3.2: bad destination system address
DSN_NO_ROUTE = "5.4.4"  # RFC 3463 §3.5: unable to route
DSN_DNS_TEMPORARY = "4.4.3"  # RFC 3463 §3.5: directory server failure

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class MxHost:
    """One server to try for a domain, with its addresses in the order to try them."""

    name: str  # host name (A-labels, lower case, no trailing dot), or "[192.0.2.1]"
    preference: int
    addresses: tuple[str, ...]  # IPv6 first when dns.ipv6, then IPv4
    implicit: bool = False  # True when there was no MX and the domain's own A/AAAA is used


# --- pure decisions -------------------------------------------------------------------


def _shuffle_ties(
    items: Sequence[T], preference: Callable[[T], int], rng: random.Random
) -> list[T]:
    """Items already sorted by preference, with each run of equal preferences shuffled."""
    ordered: list[T] = []
    start = 0
    while start < len(items):
        end = start + 1
        while end < len(items) and preference(items[end]) == preference(items[start]):
            end += 1
        group = list(items[start:end])
        if len(group) > 1:
            rng.shuffle(group)
        ordered.extend(group)
        start = end
    return ordered


def order_mx(records: Sequence[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """(preference, host) by preference, equal preferences shuffled (RFC 5321 §5.1).

    Ties are put in name order before the shuffle: servers return an RRset in any order
    (RFC 2181 §5), and with it sorted the result depends only on the records and the rng.
    """
    return _shuffle_ties(sorted(records), lambda record: record[0], rng)


def normalise_domain(domain: str) -> str:
    """The A-label, lower-case form of a domain without a trailing dot (RFC 5890 §2.3.2.1).

    Raises PermanentFailure 5.1.2 for a name that cannot be encoded.
    """
    text = domain.strip().rstrip(".")
    if not text:
        raise PermanentFailure(
            "empty domain", dsn=DSN_NO_DOMAIN, phase=Phase.DNS, host=domain or None
        )
    if text.isascii():
        ascii_name = text.lower()
    else:
        try:
            # UTS #46 mapping first, as browsers and MTAs do, so "BÜCHER.de" works.
            ascii_name = idna.encode(text, uts46=True).decode("ascii").lower()
        except (idna.IDNAError, UnicodeError) as exc:
            raise PermanentFailure(
                f"{domain}: not a valid internationalised domain name ({exc})",
                dsn=DSN_NO_DOMAIN, phase=Phase.DNS, host=domain,
            ) from None
    if len(ascii_name) > 253 or any(not 0 < len(label) <= 63 for label in ascii_name.split(".")):
        # RFC 1035 §2.3.4: labels of 63 octets, names of 255 on the wire.
        raise PermanentFailure(
            f"{domain}: not a valid domain name", dsn=DSN_NO_DOMAIN, phase=Phase.DNS, host=domain
        )
    return ascii_name


def literal_host(domain: str, *, ipv6: bool) -> MxHost | None:
    """The single MxHost of an address literal domain, or None for a host name."""
    try:
        ip = address_literal(domain)
    except EnvelopeError as exc:
        raise PermanentFailure(
            str(exc), dsn=DSN_NO_DOMAIN, phase=Phase.DNS, host=domain
        ) from None
    if ip is None:
        return None
    if ":" in ip:
        if not ipv6:
            raise TemporaryFailure(
                f"{domain}: an IPv6 address literal, and dns.ipv6 is off",
                dsn=DSN_DNS_TEMPORARY, phase=Phase.DNS, host=domain,
            )
        return MxHost(name=f"[IPv6:{ip}]", preference=0, addresses=(ip,))
    return MxHost(name=f"[{ip}]", preference=0, addresses=(ip,))


# --- lookups as values ----------------------------------------------------------------


class _Status(Enum):
    OK = "ok"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    FAILED = "failed"  # SERVFAIL, REFUSED, timeout, network error


@dataclass(frozen=True, slots=True)
class _Lookup:
    """What one (name, type) query gave, and for how long it may be believed."""

    status: _Status
    ttl: float
    mx: tuple[tuple[int, str], ...] = ()  # (preference, host); "" is the root (null MX)
    addresses: tuple[str, ...] = ()
    detail: str = ""  # why it failed, for the error message


@dataclass(frozen=True, slots=True)
class _Failure:
    """A resolution error kept in the cache; raised as a fresh exception on each hit."""

    permanent: bool
    message: str
    dsn: str
    host: str

    def error(self) -> PermanentFailure | TemporaryFailure:
        kind = PermanentFailure if self.permanent else TemporaryFailure
        return kind(self.message, dsn=self.dsn, phase=Phase.DNS, host=self.host)


@dataclass(frozen=True, slots=True)
class _Plan:
    """A domain's resolved hosts sorted by preference (unshuffled), or its failure."""

    hosts: tuple[MxHost, ...] = ()
    failure: _Failure | None = None
    has_ties: bool = False

    def materialise(self, rng: random.Random) -> list[MxHost]:
        if self.failure is not None:
            raise self.failure.error()
        if not self.has_ties:
            return list(self.hosts)
        return _shuffle_ties(self.hosts, lambda host: host.preference, rng)


def _plan_of(hosts: Sequence[MxHost]) -> _Plan:
    ordered = tuple(sorted(hosts, key=lambda host: (host.preference, host.name)))
    prefs = [host.preference for host in ordered]
    return _Plan(hosts=ordered, has_ties=len(set(prefs)) != len(prefs))


def _fail(permanent: bool, message: str, dsn: str, host: str) -> _Plan:
    return _Plan(failure=_Failure(permanent, message, dsn, host))


def _plan_for_mx(
    domain: str,
    records: Sequence[tuple[int, str]],
    addresses: dict[str, tuple[_Lookup, ...]],
) -> _Plan:
    """Pure: turn MX records and their hosts' address lookups into a plan."""
    usable = [(pref, host) for pref, host in records if host]
    if not usable:
        return _fail(True, f"{domain} has a null MX: it accepts no mail (RFC 7505)",
                     DSN_NULL_MX, domain)
    hosts: list[MxHost] = []
    missing: list[str] = []
    all_nxdomain = True
    for pref, host in usable:
        lookups = addresses[host]
        found = tuple(ip for lookup in lookups for ip in lookup.addresses)
        if found:
            hosts.append(MxHost(name=host, preference=pref, addresses=found))
            continue
        missing.append(host)
        all_nxdomain = all_nxdomain and all(lk.status is _Status.NXDOMAIN for lk in lookups)
    if hosts:
        return _plan_of(hosts)
    names = ", ".join(missing)
    if all_nxdomain:
        return _fail(True, f"no MX host of {domain} exists ({names})", DSN_NO_DOMAIN, domain)
    details = "; ".join(
        sorted({lk.detail for host in missing for lk in addresses[host] if lk.detail})
    )
    reason = f": {details}" if details else ""
    return _fail(False, f"no address for any MX host of {domain} ({names}){reason}",
                 DSN_DNS_TEMPORARY, domain)


def _plan_for_implicit(domain: str, lookups: Sequence[_Lookup]) -> _Plan:
    """Pure: the domain had no MX; its own A/AAAA is the implicit MX (RFC 5321 §5.1)."""
    found = tuple(ip for lookup in lookups for ip in lookup.addresses)
    if found:
        return _Plan(hosts=(MxHost(domain, 0, found, implicit=True),))
    failed = [lk.detail for lk in lookups if lk.status is _Status.FAILED]
    if failed:
        return _fail(False, f"{domain}: no MX, and its address lookup failed: {failed[0]}",
                     DSN_DNS_TEMPORARY, domain)
    if all(lk.status is _Status.NXDOMAIN for lk in lookups):
        return _fail(True, f"{domain}: no such domain", DSN_NO_DOMAIN, domain)
    return _fail(True, f"{domain} has no MX and no address records", DSN_NO_ROUTE, domain)


# --- the resolver ---------------------------------------------------------------------


class Resolver:
    """Resolves a domain to the MX hosts to try, with a TTL cache; one per daemon."""

    def __init__(
        self,
        config: DnsConfig,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        failure_ttl: float = DEFAULT_FAILURE_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self._config = config
        self._rng = rng or random.Random()
        self._clock = clock
        self._failure_ttl = failure_ttl
        self._max_entries = max_entries
        self._resolver = _dns_resolver(config)
        self._plans: dict[str, tuple[float, _Plan]] = {}
        self._records: dict[tuple[str, int], tuple[float, _Lookup]] = {}
        self._inflight: dict[str, asyncio.Future[_Plan]] = {}

    def clear(self) -> None:
        """Forget every cached answer (for example after a config reload)."""
        self._plans.clear()
        self._records.clear()

    async def resolve(self, domain: str, *, fresh: bool = False) -> list[MxHost]:
        """The hosts to try for `domain`, in order; raises a DeliveryError with phase DNS.

        `fresh`: ask the nameservers again instead of the cache (mxserverrules.lua's
        GetCheckCache returning false, contract §9); the answers then refill the cache.
        """
        key = domain.lower()
        if fresh:
            plan, expires = await self._plan(key, fresh=True)
            _put(self._plans, key, expires, plan, self._clock(), self._max_entries)
            return plan.materialise(self._rng)
        cached = self._plans.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1].materialise(self._rng)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._build(key))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        # shield: one caller giving up must not cancel the lookup the others wait for.
        plan = await asyncio.shield(task)
        return plan.materialise(self._rng)

    def _finished(self, key: str, task: asyncio.Future[_Plan]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here so an error nobody awaited is not reported

    async def _build(self, key: str) -> _Plan:
        plan, expires = await self._plan(key)
        _put(self._plans, key, expires, plan, self._clock(), self._max_entries)
        return plan

    async def host_addresses(self, host: str, *, fresh: bool = False) -> tuple[str, ...]:
        """The addresses of one host name (a smart host of GetOverrides, contract §9).

        Raises TemporaryFailure when it has none: a smart host is the operator's
        routing, so a name that does not resolve never bounces the recipient.
        """
        try:
            name = normalise_domain(host)
        except PermanentFailure as exc:
            raise TemporaryFailure(exc.message, dsn=DSN_DNS_TEMPORARY, phase=Phase.DNS,
                                   host=host) from None
        lookups, _ = await self._addresses(name, fresh)
        found = tuple(ip for lookup in lookups for ip in lookup.addresses)
        if not found:
            details = "; ".join(lk.detail for lk in lookups if lk.detail) or "no address"
            raise TemporaryFailure(f"smart host {name}: {details}", dsn=DSN_DNS_TEMPORARY,
                                   phase=Phase.DNS, host=name)
        return found

    async def _plan(self, domain: str, fresh: bool = False) -> tuple[_Plan, float]:
        """Resolve without the plan cache: (plan, monotonic time it expires)."""
        now = self._clock()
        try:
            literal = literal_host(domain, ipv6=self._config.ipv6)
            if literal is not None:
                return _Plan(hosts=(literal,)), now + MAX_TTL
            name = normalise_domain(domain)
        except (PermanentFailure, TemporaryFailure) as exc:
            failure = _Failure(exc.permanent, exc.message, exc.dsn or "", domain)
            return _Plan(failure=failure), now + MAX_TTL
        mx, expires = await self._query(name, dns.rdatatype.MX, fresh)
        if mx.status is _Status.NXDOMAIN:
            return _fail(True, f"{name}: no such domain", DSN_NO_DOMAIN, name), expires
        if mx.status is _Status.FAILED:
            plan = _fail(False, f"{name}: MX lookup failed: {mx.detail}", DSN_DNS_TEMPORARY, name)
            return plan, expires
        if mx.status is _Status.NODATA or not mx.mx:
            lookups, addr_expires = await self._addresses(name, fresh)
            return _plan_for_implicit(name, lookups), min(expires, addr_expires)
        hosts = list(dict.fromkeys(host for _, host in mx.mx if host))
        results = await asyncio.gather(*(self._addresses(host, fresh) for host in hosts))
        for _, host_expires in results:
            expires = min(expires, host_expires)
        addresses = {host: lookups for host, (lookups, _) in zip(hosts, results, strict=True)}
        return _plan_for_mx(name, mx.mx, addresses), expires

    async def _addresses(self, host: str, fresh: bool = False
                         ) -> tuple[tuple[_Lookup, ...], float]:
        """AAAA (when dns.ipv6) then A lookups of one host, and when the first expires."""
        kinds = [dns.rdatatype.A]
        if self._config.ipv6:
            kinds.insert(0, dns.rdatatype.AAAA)
        results = await asyncio.gather(*(self._query(host, kind, fresh) for kind in kinds))
        return tuple(lookup for lookup, _ in results), min(exp for _, exp in results)

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType, fresh: bool = False
                     ) -> tuple[_Lookup, float]:
        """One (name, type) through the record cache: (lookup, monotonic expiry)."""
        key = (name, int(rdtype))
        now = self._clock()
        cached = self._records.get(key)
        if cached is not None and cached[0] > now and not fresh:
            return cached[1], cached[0]
        lookup = await self._ask(name, rdtype)
        now = self._clock()
        expires = now + lookup.ttl
        _put(self._records, key, expires, lookup, now, self._max_entries)
        return lookup, expires

    async def _ask(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Lookup:
        """One query on the wire; every dnspython outcome becomes a _Lookup here."""
        qname = dns.name.from_text(name)  # absolute: no search list applies to mail
        kind = dns.rdatatype.to_text(rdtype)
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            return _Lookup(_Status.NXDOMAIN, ttl=_negative_ttl(exc))
        except dns.exception.Timeout:
            return self._failed(f"{name} {kind}: timed out after {self._config.timeout:g}s")
        except dns.resolver.NoNameservers as exc:
            return self._failed(f"{name} {kind}: {_server_errors(exc)}")
        except dns.exception.DNSException as exc:
            return self._failed(f"{name} {kind}: {exc}")
        except OSError as exc:  # e.g. no route to the nameserver
            return self._failed(f"{name} {kind}: {exc.strerror or exc}")
        ttl = min(max(0.0, answer.expiration - time.time()), MAX_TTL)
        rrset = answer.rrset
        if rrset is None or len(rrset) == 0:
            return _Lookup(_Status.NODATA, ttl=min(ttl, MAX_NEGATIVE_TTL))
        if rdtype == dns.rdatatype.MX:
            records = tuple((int(rd.preference), _host_text(rd.exchange)) for rd in rrset)
            return _Lookup(_Status.OK, ttl=ttl, mx=records)
        addresses = tuple(dict.fromkeys(str(ipaddress.ip_address(rd.address)) for rd in rrset))
        return _Lookup(_Status.OK, ttl=ttl, addresses=addresses)

    def _failed(self, detail: str) -> _Lookup:
        return _Lookup(_Status.FAILED, ttl=self._failure_ttl, detail=detail)


def _dns_resolver(config: DnsConfig) -> dns.asyncresolver.Resolver:
    """dnspython's stub resolver on dns.nameservers, or on the system's when empty."""
    if config.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        servers: list[dns.nameserver.Nameserver] = []
        for text in config.nameservers:
            host, port = split_host_port(text, 53)
            servers.append(dns.nameserver.Do53Nameserver(host, port))
        resolver.nameservers = servers
    else:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration:
            raise ConfigError(
                "dns.nameservers: empty, and the system resolver has no configuration"
            ) from None
    resolver.cache = None  # ours is above it and cheaper on a hit
    resolver.lifetime = config.timeout
    resolver.timeout = min(_ATTEMPT_TIMEOUT, config.timeout)
    return resolver


def _host_text(name: dns.name.Name) -> str:
    """An MX exchange as a lower-case name without the trailing dot; "" for the root."""
    return name.to_text(omit_final_dot=True).lower() if name != dns.name.root else ""


def _negative_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    """How long an NXDOMAIN may be believed: the SOA's minimum (RFC 2308 §5), capped."""
    ttls = []
    responses: dict[object, dns.message.QueryMessage] = exc.kwargs.get("responses") or {}
    for response in responses.values():
        try:
            ttls.append(float(response.resolve_chaining().minimum_ttl))
        except dns.exception.DNSException:
            continue
    return min(min(ttls, default=0.0), MAX_NEGATIVE_TTL)


def _server_errors(exc: dns.resolver.NoNameservers) -> str:
    """"127.0.0.1:53 answered SERVFAIL" rather than dnspython's whole sentence."""
    errors = exc.kwargs.get("errors") or []
    texts = [f"{err[0]} answered {err[3]}" for err in errors if len(err) >= 4]
    return "; ".join(dict.fromkeys(texts)) or "no nameserver could answer"


def _put(cache: dict[K, tuple[float, V]], key: K, expires: float, value: V, now: float,
         limit: int) -> None:
    """Store with expiry; when full, drop expired entries, then the oldest ones."""
    if expires <= now:
        cache.pop(key, None)
        return
    if len(cache) >= limit and key not in cache:
        for stale in [k for k, (exp, _) in cache.items() if exp <= now]:
            del cache[stale]
        while len(cache) >= limit:
            del cache[next(iter(cache))]
    cache[key] = (expires, value)
