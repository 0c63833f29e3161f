"""Per-domain delivery: MX hosts in order, ServerDetails per server, one transaction.

`Deliverer.deliver()` makes one transaction per domain per attempt (contract §5) and
returns one RecipientOutcome per recipient; delivery problems, DNS included, become
outcomes, never exceptions. Every address of every MX host is tried in order until one
answers (RFC 5321 §5.1): a connection failure, or a host that answered 4xx for the
whole transaction, moves on to the next address; anything sent or bounced is final.

Each feature is one object the Deliverer is given and asks once per step, None when
it is off (one `is None`, nothing more, on the hot path):

* `Routing` (routing.py), the script's VPOP3 8.8 hooks: the hosts (mxserverrules.lua),
  CheckServer per host, ModifyReturnPath, ReturnCodeHandler on each reply;
* `TlsGuard` (tlsdelivery.py), the receiving domain's TLS policy (contract §8,
  docs/tls.md): per domain and per MX host before ServerDetails, whose Actions arrive
  preset; REQUIRETLS on each session before MAIL; the TLS-RPT records. DANE's chain
  check is smtp.py's;
* `Shaper` (shaper.py), traffic shaping (contract §9): suspension, connection and rate
  admission, the reply rules on each transaction's outcomes.

Sessions are pooled (`sessions.py` over `pool.py`, the big lever for throughput): a
session whose transaction ended cleanly goes back to the pool for the next message with
equal ServerActions; one aborted half-way is RSET first (RFC 5321 §4.1.1.5).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence

from mxsend.actions import ServerActions, ServerParameters
from mxsend.batv import BatvKey, sign
from mxsend.config import Config
from mxsend.delivery_event import AttemptInfo
from mxsend.destination import Destination
from mxsend.envelope import Message, Recipient
from mxsend.errors import DeliveryError, PermanentFailure, Phase, TemporaryFailure
from mxsend.hostname import helo_name
from mxsend.outcome import (
    RecipientOutcome,
    Where,
    after_every_host,
    failure_outcomes,
    should_try_next_host,
    waiting_outcomes,
)
from mxsend.policy import Policy
from mxsend.pool import Backoff, ConnectionPool, PoolEntry, backoff_worthy
from mxsend.requiretls import DSN_REQUIRETLS
from mxsend.routing import ResolverLike, Route, Routing
from mxsend.sessions import Sessions, Timing
from mxsend.shaper import Lease, Shaper, suspended_reason
from mxsend.smtp_rules import ClientSettings, Transaction, choose_return_path
from mxsend.tls import TlsFailure
from mxsend.tlsdelivery import TlsGuard
from mxsend.tlspolicy import NO_POLICY, HostTls

Preset = Callable[[ServerActions], ServerActions]
# ServerDetails(Parameters, preset): the script's Actions in are preset(defaults).
ServerDetailsFn = Callable[[ServerParameters, Preset], Awaitable[ServerActions]]


class RequireTlsRefused(TemporaryFailure):
    """This server cannot take a REQUIRETLS message (RFC 8689 §4.2.1): try the next."""


def stamped(outcomes: list[RecipientOutcome], elapsed: float, timing: Timing
            ) -> list[RecipientOutcome]:
    """The outcomes with their times: setup is everything before the transaction
    (DNS, ServerDetails, connecting, greeting, EHLO, TLS, other hosts tried), as the
    `c` of Postfix's delays=a/b/c/d."""
    setup = max(0.0, elapsed - timing.transfer)
    return [dataclasses.replace(o, setup=setup, transfer=timing.transfer,
                                tls_cipher=timing.tls_cipher if o.tls else None,
                                verified=timing.verified if o.tls else False)
            for o in outcomes]


# --- the deliverer -----------------------------------------------------------------------


class Deliverer:
    """Delivers one message's recipients of one domain per call; see the module doc.

    Each feature is an object it is given, None when off (one `is None` per use): the
    script's VPOP3 8.8 hooks (`routing`, routing.py), the receiving domain's TLS policy
    (`tls`, tlsdelivery.py) and traffic shaping (`shaper`, shaper.py).
    """

    def __init__(self, config: Config, resolver: ResolverLike, *, batv_key: bytes | None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 hooks: Policy | None = None, tls: TlsGuard | None = None,
                 shaper: Shaper | None = None) -> None:
        smtp = config.smtp
        self._port = smtp.port
        self._resolver = resolver
        # ReturnCodeHandler, ModifyReturnPath and mxserverrules.lua; None: no script.
        self.routing = Routing(hooks, resolver, smtp.port) if hooks is not None else None
        self._settings = ClientSettings(
            helo_name=helo_name(smtp.helo_name),
            source_address=smtp.source_address,
            ca_file=smtp.ca_file,
            allowed_destinations=smtp.allowed_destinations,
            debug_peers=config.log.debug_peers,
        )
        self._batv = BatvKey(batv_key) if batv_key else None
        self.tls = tls  # None: no receiving-domain policies (unit tests, tools)
        self._clock = clock
        self._wall_clock = wall_clock
        # CheckServer skipping every server: the message is looked at again at the next
        # scan, as a CheckFile SkipSend is (contract §9).
        self._scan_interval = config.queue.scan_interval
        self._ids = itertools.count(1)
        self.backoff = Backoff()
        self.shaper = shaper  # None: nothing shaped, no per-destination checks at all
        # The limits are the contract's two: per recipient domain and in total, as
        # Postfix's per-destination concurrency is per domain for MX delivery. An extra
        # per-address cap equal to the per-domain one (what we had) throttled every
        # domain hosted on one MX to 10 connections together, which no setting named;
        # a server that wants fewer says 421, and Backoff listens.
        self.pool = ConnectionPool(smtp.max_connections, smtp.max_connections_per_domain,
                                   max_per_destination=smtp.max_connections)
        self._sessions = Sessions(self.pool, self.backoff, self._settings, clock)

    async def deliver(self, queue_id: str, message: Message, recipients: Sequence[Recipient],
                      domain: str, server_details: ServerDetailsFn, *,
                      recorded: asyncio.Future[None] | None = None,
                      attempt: AttemptInfo | None = None) -> list[RecipientOutcome]:
        """One transaction for these recipients of `domain`; one outcome per recipient.

        `recorded`: the caller resolves it (set_result, always, also on failure or
        shutdown) once these outcomes are durable. Until then the connection that
        carried the message may run the next transaction but holds back its final `.`,
        so that at most one accepted message per connection is unrecorded (contract §1:
        a crash duplicates at most one message per open connection).

        Never raises for a delivery problem: DNS errors and local misconfiguration (a
        script asking for BATV without a key) come back as outcomes too.
        """
        started = self._clock()
        timing = Timing()
        outcomes = await self._deliver(queue_id, message, recipients, domain, server_details,
                                       recorded, timing, attempt)
        return stamped(outcomes, self._clock() - started, timing)

    async def _deliver(self, queue_id: str, message: Message, recipients: Sequence[Recipient],
                       domain: str, server_details: ServerDetailsFn,
                       recorded: asyncio.Future[None] | None, timing: Timing,
                       attempt: AttemptInfo | None) -> list[RecipientOutcome]:
        addresses = [r.address for r in recipients]
        if not recipients:
            return []
        routing = self.routing
        ruled = routing is not None and routing.ruled
        size = len(message.data)
        retries = attempt.retries if attempt is not None else 0
        try:
            if ruled:
                assert routing is not None
                hosts = await routing.hosts(queue_id, domain, retries, size)
            else:
                hosts = await self._resolver.resolve(domain)
        except DeliveryError as exc:
            return failure_outcomes(addresses, exc)
        if not hosts:
            return failure_outcomes(addresses, TemporaryFailure(
                f"{domain}: no host to deliver to", dsn="4.4.4", phase=Phase.DNS, host=domain))
        guard = self.tls
        dom = await guard.domain(domain, message) if guard is not None else None
        tried: list[list[RecipientOutcome]] = []
        refused: list[str] = []  # REQUIRETLS: servers that cannot take the message
        skipped = 0  # MX hosts an enforced MTA-STS policy does not list
        allowed = 0  # MX hosts CheckServer let through
        for host in hosts:
            if ruled:
                assert routing is not None
                verdict = await routing.check_server(queue_id, domain, host.name,
                                                     retries, size)
                if verdict.hold_minutes > 0:
                    # Contract §9: held, whatever Allowed says; not an attempt.
                    return waiting_outcomes(
                        addresses, self._wall_clock() + verdict.hold_minutes * 60,
                        f"held for {verdict.hold_minutes:g} minutes by CheckServer"
                        f" ({host.name})")
                if not verdict.allowed:
                    continue
            allowed += 1
            tls = NO_POLICY
            if guard is not None and dom is not None:
                tls = await guard.host(dom, host.name)
                if not tls.allowed:
                    # RFC 8461 §4.1: an MX host the enforced policy does not list is
                    # not used.
                    skipped += 1
                    await guard.record(tls, host.name, "", "validation-failure")
                    continue
            port = host.port if isinstance(host, Route) else self._port
            for ip in host.addresses:
                destination = Destination(host.name, ip, port)
                try:
                    outcomes = await self._try(queue_id, destination, message, recipients,
                                               domain, server_details, recorded, timing,
                                               tls, attempt)
                except RequireTlsRefused as exc:
                    refused.append(f"{destination.relay}: {exc.message}")
                    continue
                outcomes = [dataclasses.replace(o, tls_policy=tls.policy) for o in outcomes]
                if not should_try_next_host(outcomes):
                    return outcomes
                tried.append(outcomes)
        if not allowed:
            # Every server skipped by CheckServer: queued, no error, not an attempt.
            return waiting_outcomes(addresses, self._wall_clock() + self._scan_interval,
                                    "CheckServer skipped every server")
        return after_hosts(addresses, domain, tried, refused, skipped)

    async def close(self) -> None:
        """QUIT every pooled connection."""
        await self.pool.close()

    # -- one destination ----------------------------------------------------------------

    async def _try(self, queue_id: str, dest: Destination, message: Message,
                   recipients: Sequence[Recipient], domain: str, server_details: ServerDetailsFn,
                   recorded: asyncio.Future[None] | None, timing: Timing,
                   tls: HostTls = NO_POLICY, attempt: AttemptInfo | None = None
                   ) -> list[RecipientOutcome]:
        """One address of one MX host. Raises RequireTlsRefused only."""
        addresses = [r.address for r in recipients]
        guard = self.tls
        if tls.tempfail:
            # DANE lookups failed validation (bogus): nothing is sent (RFC 7672 §2.1).
            if guard is not None:
                await guard.record(tls, dest.name, dest.ip, tls.dane.result_type
                                   if tls.dane is not None else "")
            return failure_outcomes(addresses, TemporaryFailure(
                tls.tempfail, dsn="4.7.5", phase=Phase.CONNECT, host=dest.name),
                Where(dest.relay, dest.name))
        requiretls = message.envelope.requiretls
        if requiretls and not tls.mx_authenticated:
            raise RequireTlsRefused(
                "REQUIRETLS: the MX host was not found through DNSSEC or an enforced "
                "MTA-STS policy", dsn=DSN_REQUIRETLS, phase=Phase.CONNECT, host=dest.name)
        shaper = self.shaper
        target = None
        if shaper is not None:
            # Before the backoff: a suspension (a reply rule) is the stronger word, and
            # waiting for it is no attempt, where a backoff deferral is one.
            target = shaper.target(dest.name, domain)
            suspended = await shaper.suspended_until(target)
            if suspended:
                return waiting_outcomes(addresses, suspended, suspended_reason(target.name))
        key = (dest.ip, dest.port)
        until = self.backoff.blocked_until(key, self._clock())
        if until is not None:
            return failure_outcomes(addresses, TemporaryFailure(
                f"{dest.relay} is in backoff after a refused connection or 421",
                dsn="4.4.1", phase=Phase.CONNECT, host=dest.name), Where(dest.relay, dest.name))
        connid = self.pool.idle_connid(dest.ip, dest.port) or next(self._ids)
        env = message.envelope
        params = ServerParameters(
            authsender=env.auth or "", originator=env.sender, server=dest.name, domain=domain,
            length=len(message.data), connid=connid, connection=dest.relay,
            tlspolicy=tls.policy,
        )
        if guard is not None:
            actions = await server_details(params, guard.preset(tls))
            if guard.check_override(queue_id, domain, dest.name, tls, actions):
                # The operator's exception wins (contract §8): DANE is not enforced.
                tls = dataclasses.replace(tls, dane=None)
        else:
            actions = await server_details(params, _unchanged)
        routing = self.routing
        try:
            return_path = (
                await routing.return_path(queue_id, message, recipients, actions, attempt)
                if routing is not None else choose_return_path(env.sender, actions))
            tx = transaction(message, recipients, actions, return_path, self._batv,
                             self._wall_clock)
        except DeliveryError as exc:
            return failure_outcomes(addresses, exc)
        hook = routing.reply_hook(queue_id) if routing is not None else None

        while True:
            entry = await self.pool.acquire((dest.ip, dest.port, actions), domain)
            if entry is None:
                break  # room was reserved for a new session
            if tls.dane_required and not entry.connection.dane_verified:
                # Opened for a message that waived DANE (TLS-Required: No): not for this.
                self.pool.discard(entry)
                continue
            entry.connection.reply_hook = hook
            if requiretls:
                self._check_requiretls(entry, tls)
            if shaper is not None and target is not None:
                wait = await shaper.admit_message(target, queue_id, entry.lease)
                if wait:
                    self.pool.give_back(entry)
                    return waiting_outcomes(addresses, wait, f"waiting: destination "
                                            f"{target.name} is at its rate")
            started = self._clock()
            outcomes = await self._sessions.send(entry, tx, addresses, recorded, timing)
            if outcomes is not None:
                if shaper is not None and target is not None:
                    return await shaper.apply_reply_rules(target, outcomes,
                                                          self._clock() - started)
                return outcomes
            # The pooled session had died while idle: nothing was sent; try again.
        lease = None
        if shaper is not None and target is not None:
            shaped = target
            admitted = await shaper.admit_session(target, queue_id, lambda: self.pool.evict_idle(
                lambda e: isinstance(e.lease, Lease) and e.lease.target == shaped))
            if not isinstance(admitted, Lease):
                self.pool.unreserve(domain, key)
                return waiting_outcomes(addresses, admitted, f"waiting: destination "
                                        f"{target.name} is at its connection limits")
            lease = admitted
        try:
            entry = await self._sessions.open(dest, actions, domain, connid, hook, tls)
        except DeliveryError as exc:
            if lease is not None:
                lease.release()
            if backoff_worthy(exc):
                self.backoff.failed(key, self._clock())
            if isinstance(exc, TlsFailure):
                if guard is not None:
                    await guard.record(tls, dest.name, dest.ip, exc.result_type)
                if requiretls:
                    raise RequireTlsRefused(f"REQUIRETLS: {exc.message}", dsn=DSN_REQUIRETLS,
                                            phase=Phase.STARTTLS, host=dest.name) from exc
            outcomes = failure_outcomes(addresses, exc, Where(dest.relay, dest.name))
            if shaper is not None and target is not None:
                return await shaper.apply_reply_rules(target, outcomes)
            return outcomes
        entry.lease = lease
        self.backoff.succeeded(key)
        if guard is not None:
            await guard.record_session(tls, entry.connection)
        if requiretls:
            self._check_requiretls(entry, tls)
        started = self._clock()
        outcomes = await self._sessions.send(entry, tx, addresses, recorded, timing, fresh=True)
        assert outcomes is not None
        if shaper is not None and target is not None:
            return await shaper.apply_reply_rules(target, outcomes, self._clock() - started)
        return outcomes

    def _check_requiretls(self, entry: PoolEntry, tls: HostTls) -> None:
        """RFC 8689 §4.2.1 on an open session; a refused one stays usable for others."""
        problem = TlsGuard.session_problem(tls, entry.connection)
        if problem:
            self.pool.give_back(entry)
            raise RequireTlsRefused(problem, dsn=DSN_REQUIRETLS, phase=Phase.MAIL,
                                    host=entry.connection.destination.name)


def after_hosts(addresses: list[str], domain: str, tried: list[list[RecipientOutcome]],
                refused: list[str], skipped: int) -> list[RecipientOutcome]:
    """The outcomes when no host's answer was final: `tried` holds each address's,
    `refused` the REQUIRETLS refusals, `skipped` the MX hosts MTA-STS ruled out."""
    if refused and not tried:
        # RFC 8689 §5: no server qualified; the message must not go to the domain.
        return failure_outcomes(addresses, PermanentFailure(
            "; ".join(refused), dsn=DSN_REQUIRETLS, phase=Phase.STARTTLS, host=domain))
    if not tried:
        why = ("no MX host matches its MTA-STS policy" if skipped
               else "no address to deliver to")
        return failure_outcomes(addresses, TemporaryFailure(
            f"{domain}: {why}", dsn="4.7.5" if skipped else "4.4.4",
            phase=Phase.CONNECT if skipped else Phase.DNS, host=domain))
    # A destination that made us wait is no answer when another host gave one.
    answered = [outcomes for outcomes in tried if outcomes[0].wait_until is None]
    if not answered:
        soonest = min(outcomes[0].wait_until or 0.0 for outcomes in tried)
        return next(o for o in tried if o[0].wait_until == soonest)
    return after_every_host(answered)


def transaction(message: Message, recipients: Sequence[Recipient], actions: ServerActions,
                return_path: str, batv: BatvKey | None, wall_clock: Callable[[], float]
                ) -> Transaction:
    """The transaction ServerDetails' Actions ask for; raises TemporaryFailure when they
    cannot be honoured."""
    if actions.unusable:
        # A pin the script set but that cannot be read: no connection at all rather
        # than one without the check (contract §4; docs/policy.md).
        raise TemporaryFailure(actions.unusable, dsn="4.7.5", phase=Phase.CONNECT)
    # The script's sender comes first, BATV signs what it chose (contract §9).
    if actions.use_batv and return_path:
        if batv is None:
            # An operator's mistake, not the recipient's: hold the mail (temporary)
            # until batv.key_file is set and the config reloaded, rather than send it
            # unsigned against the script's wish or bounce it.
            raise TemporaryFailure(
                "the script sets useBATV but batv.key_file is not configured",
                dsn="4.3.5", phase=Phase.MAIL)
        return_path = sign(return_path, batv, wall_clock())
    return Transaction(envelope=message.envelope, return_path=return_path,
                       recipients=tuple(recipients), data=message.data)


def _unchanged(actions: ServerActions) -> ServerActions:
    return actions
