"""MTA-STS I/O: TXT discovery, the HTTPS policy fetch and the durable policy cache.

`MtaStsPolicies.lookup(domain)` answers "which policy applies to this domain now",
following RFC 8461 §3.3 and §5.1:

- TXT `_mta-sts.<domain>` names the current policy id. A valid cached policy with that
  id is used as is; a new id (or no valid cache) fetches the policy.
- A fetch failure (no address, TLS or certificate error, a redirect, a status other
  than 200, a media type other than text/plain, over 64 KB, over 10 s, a malformed
  policy) keeps a valid cached policy in force; without one it means "no policy".
- A TXT record that disappears, or a TXT lookup that fails, keeps a valid cached
  policy in force until its max_age runs out (an attacker who blocks DNS or the
  policy host does not win, §10.2). Caching in the spool makes that hold across
  restarts.
- A cached policy within `refresh_before` of its expiry is refetched (§10.2's proactive
  refresh); failure keeps it until it really expires.

Costs: the TXT record is asked at most once per `recheck` seconds per domain (a domain
without a policy then costs one dictionary lookup per message), the policy is fetched
once per id or max_age. Concurrent lookups of one domain share one refresh.

The cache is `<spool>/policy/mta-sts/<domain>.json`, written atomically (durable.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mxsend import https
from mxsend.durable import make_dirs, write_atomic
from mxsend.mta_sts import (
    POLICY_HOST_PREFIX,
    POLICY_PATH,
    TXT_PREFIX,
    Policy,
    PolicyError,
    parse_policy,
    parse_txt,
)
from mxsend.tlsdns import Status, TlsResolver

MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 §3.3: "a reasonable maximum size (64 KB)"
FETCH_TIMEOUT = 10.0  # ... and "a reasonable timeout (ten seconds)"
DEFAULT_RECHECK = 300.0
DEFAULT_REFRESH_BEFORE = 86400.0
DEFAULT_MAX_DOMAINS = 10_000  # in memory; the spool keeps every fetched policy anyway
_SAFE_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+")

# RFC 8460 §4.3 result types for policy problems.
FETCH_ERROR = "sts-policy-fetch-error"
POLICY_INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"


class FetchError(Exception):
    """The policy could not be fetched; `result_type` is the RFC 8460 result type."""

    def __init__(self, message: str, result_type: str = FETCH_ERROR) -> None:
        super().__init__(message)
        self.result_type = result_type


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    """A policy with the wall-clock time it expires (fetch time + max_age)."""

    policy: Policy
    fetched: float
    expires: float

    def valid(self, now: float) -> bool:
        return now < self.expires


@dataclass(frozen=True, slots=True)
class PolicyLookup:
    """The policy in force for a domain, and what went wrong finding it (for logs)."""

    policy: Policy | None
    source: str  # "none", "cache" or "fetched"
    problem: str = ""  # "" or why a TXT lookup or fetch failed
    result_type: str = ""  # RFC 8460 result type of the problem, for TLS-RPT


@dataclass(slots=True)
class _State:
    cached: CachedPolicy | None
    checked: float  # monotonic time of the last TXT check; -inf: never
    last: PolicyLookup


class MtaStsPolicies:
    """The MTA-STS policies of recipient domains, cached in memory and in the spool."""

    def __init__(
        self,
        spool: Path,
        resolver: TlsResolver,
        *,
        ca_file: Path | None = None,
        port: int = 443,  # RFC 8461 §3.3; tests use a free port
        timeout: float = FETCH_TIMEOUT,
        recheck: float = DEFAULT_RECHECK,
        refresh_before: float = DEFAULT_REFRESH_BEFORE,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        max_domains: int = DEFAULT_MAX_DOMAINS,
    ) -> None:
        self.directory = spool / "policy" / "mta-sts"
        self._resolver = resolver
        self._context = https.verifying_context(ca_file)
        self._port = port
        self._timeout = timeout
        self._recheck = recheck
        self._refresh_before = refresh_before
        self._clock = clock
        self._monotonic = monotonic
        self._max_domains = max_domains
        self._states: dict[str, _State] = {}
        self._inflight: dict[str, asyncio.Future[PolicyLookup]] = {}

    async def lookup(self, domain: str) -> PolicyLookup:
        """The policy to apply to `domain` (A-label, lower case) now."""
        domain = domain.lower().rstrip(".")
        if not _SAFE_DOMAIN.fullmatch(domain):
            return PolicyLookup(None, "none", f"{domain!r} is not a domain name")
        state = self._states.get(domain)
        if state is not None and self._monotonic() - state.checked < self._recheck:
            return self._current(state)
        pending = self._inflight.get(domain)
        if pending is None:
            pending = asyncio.ensure_future(self._refresh(domain))
            self._inflight[domain] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(domain, None))
        return await asyncio.shield(pending)

    def _current(self, state: _State) -> PolicyLookup:
        """Between TXT checks: the cached policy while valid, else none."""
        cached = state.cached
        if state.last.policy is not None and cached is not None and not cached.valid(
            self._clock()
        ):
            return PolicyLookup(None, "none", "cached policy expired")
        return state.last

    async def _refresh(self, domain: str) -> PolicyLookup:
        state = self._states.get(domain)
        cached = state.cached if state is not None else self._load(domain)
        result, cached = await self._resolve(domain, cached)
        self._states.pop(domain, None)
        while len(self._states) >= self._max_domains:
            # The least recently refreshed goes; its policy is still on disk.
            del self._states[next(iter(self._states))]
        self._states[domain] = _State(cached, self._monotonic(), result)
        return result

    async def _resolve(
        self, domain: str, cached: CachedPolicy | None
    ) -> tuple[PolicyLookup, CachedPolicy | None]:
        now = self._clock()
        valid = cached if cached is not None and cached.valid(now) else None
        txt = await self._resolver.txt(TXT_PREFIX + domain)
        if txt.status is Status.FAILED:
            return _keep(valid, f"TXT lookup failed: {txt.detail}"), cached
        if txt.status is not Status.OK:
            return _keep(valid, ""), cached  # §5.1: a removed TXT keeps a cached policy
        try:
            policy_id = parse_txt(txt.texts)
        except PolicyError as exc:
            return _keep(valid, f"TXT record ignored: {exc}"), cached
        if (
            valid is not None
            and valid.policy.id == policy_id
            and valid.expires - now > min(self._refresh_before, valid.policy.max_age / 2)
        ):
            return PolicyLookup(valid.policy, "cache"), cached
        try:
            policy = await self.fetch(domain, policy_id)
        except FetchError as exc:
            return _keep(valid, f"policy fetch failed: {exc}", exc.result_type), cached
        fresh = CachedPolicy(policy, now, now + policy.max_age)
        try:
            self._store(domain, fresh)
        except OSError as exc:
            return PolicyLookup(policy, "fetched", f"policy cache not written: {exc}"), fresh
        return PolicyLookup(policy, "fetched"), fresh

    async def fetch(self, domain: str, policy_id: str) -> Policy:
        """GET https://mta-sts.<domain>/.well-known/mta-sts.txt with RFC 8461 §3.3's limits."""
        host = POLICY_HOST_PREFIX + domain
        lookups = await self._resolver.addresses(host)
        addresses = [address for lookup in lookups for address in lookup.texts]
        if not addresses:
            details = "; ".join(lookup.detail or lookup.status.value for lookup in lookups)
            raise FetchError(f"{host} has no address ({details})")
        try:
            response = await https.request(
                "GET", host, POLICY_PATH, addresses=addresses, context=self._context,
                port=self._port, max_body=MAX_POLICY_BYTES, time_limit=self._timeout,
                headers=[("Accept", "text/plain")],
            )
        except https.HttpError as exc:
            kind = WEBPKI_INVALID if "certificate" in str(exc) else FETCH_ERROR
            raise FetchError(str(exc), kind) from None
        if 300 <= response.status < 400:
            # §3.3: "HTTP 3xx redirects MUST NOT be followed".
            raise FetchError(f"{host} answered {response.status}: redirects are not followed")
        if response.status != 200:
            raise FetchError(f"{host} answered HTTP {response.status}")
        if response.media_type != "text/plain":
            raise FetchError(f"{host} served {response.media_type or 'no media type'}, "
                             "not text/plain", POLICY_INVALID)
        try:
            return parse_policy(response.body.decode("utf-8"), policy_id)
        except (UnicodeDecodeError, PolicyError) as exc:
            raise FetchError(f"invalid policy: {exc}", POLICY_INVALID) from None

    # --- the durable cache ------------------------------------------------------------

    def _path(self, domain: str) -> Path:
        return self.directory / f"{domain}.json"

    def _store(self, domain: str, cached: CachedPolicy) -> None:
        record = {
            "domain": domain,
            "id": cached.policy.id,
            "fetched": cached.fetched,
            "expires": cached.expires,
            "policy": cached.policy.text,
        }
        make_dirs(self.directory)
        write_atomic(self._path(domain), json.dumps(record, indent=1).encode() + b"\n")

    def _load(self, domain: str) -> CachedPolicy | None:
        """The cached policy from the spool; a missing or unreadable file is no cache."""
        try:
            record = json.loads(self._path(domain).read_bytes())
            policy = parse_policy(str(record["policy"]), str(record["id"]))
            return CachedPolicy(policy, float(record["fetched"]), float(record["expires"]))
        except (OSError, ValueError, KeyError, TypeError):
            # ValueError covers bad JSON and PolicyError: a damaged cache is refetched.
            return None


def _keep(valid: CachedPolicy | None, problem: str, result_type: str = "") -> PolicyLookup:
    """A failed refresh: the valid cached policy stays in force, else there is none."""
    if valid is not None:
        return PolicyLookup(valid.policy, "cache", problem, result_type)
    return PolicyLookup(None, "none", problem, result_type)
