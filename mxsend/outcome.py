"""Replies -> per-recipient results (contract §5). Pure: values in, values out.

Rules (RFC 5321 §4.2.1, §3.3):
- a RCPT reply decides for its recipient when it is not 2xx: 4xx deferred, 5xx bounced;
- a recipient accepted at RCPT is SENT only when the final reply to DATA is 2xx; a 4xx
  there defers every accepted recipient, a 5xx bounces them, and a connection lost (or
  a timeout) before that reply defers them all;
- a failure of the whole transaction (connect, greeting, EHLO, STARTTLS, MAIL, a local
  check such as SIZE) gives every recipient the same result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from mxsend.errors import DeliveryError, Phase
from mxsend.reply import Reply, default_dsn, truncate


class DeliveryStatus(StrEnum):
    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


@dataclass(frozen=True, slots=True)
class Where:
    """The server a transaction reached, as outcomes and logs report it."""

    relay: str | None = None  # "host[ip]:port"
    remote_mta: str | None = None  # host name, for a DSN's Remote-MTA (RFC 3464 §2.3.5)
    tls: str | None = None  # "TLSv1.3", None for plaintext


NOWHERE = Where()


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    address: str
    status: DeliveryStatus
    dsn: str  # enhanced status x.y.z (derived from the code if the server gave none)
    response: str  # "550 5.1.1 no such user" or a reason for local failures
    phase: Phase | None
    relay: str | None  # "host[ip]:port", None if no server was reached
    remote_mta: str | None  # host name of the server, for the DSN's Remote-MTA
    tls: str | None  # e.g. "TLSv1.3", None for plaintext
    dsn_relayed: bool = False  # NOTIFY=SUCCESS asked but server lacked DSN (RFC 3461 §4.1)
    # 8-bit data sent to a server that did not offer 8BITMIME (contract §5: send, log).
    eight_bit_unadvertised: bool = False
    # The receiving domain's TLS policy for that server (contract §8), None if none reached.
    tls_policy: str | None = None
    # Not tried: its destination is suspended or at its limits, or the server rules held
    # or skipped it, until then (epoch seconds; contract §9). Not an attempt: the message
    # waits, uncounted, until then.
    wait_until: float | None = None

    # For the `delivery` event (contract §10), stamped by Deliverer.deliver: seconds of
    # connection setup (DNS, ServerDetails, connect, greeting, EHLO, TLS) and of the
    # transaction, the TLS cipher, and whether the server's certificate was verified.
    setup: float = 0.0
    transfer: float = 0.0
    tls_cipher: str | None = None
    verified: bool = False


def waiting_outcomes(addresses: Sequence[str], until: float,
                     reason: str) -> list[RecipientOutcome]:
    """Recipients that must wait for their destination (contract §9): not an attempt."""
    return [
        RecipientOutcome(address=address, status=DeliveryStatus.DEFERRED, dsn="4.4.5",
                         response=reason, phase=None, relay=None, remote_mta=None, tls=None,
                         wait_until=until)
        for address in addresses
    ]


def status_of(code: int) -> DeliveryStatus:
    """2xx sent, 5xx bounced, anything else (4xx, or nonsense) deferred."""
    if 200 <= code < 300:
        return DeliveryStatus.SENT
    if 500 <= code < 600:
        return DeliveryStatus.BOUNCED
    return DeliveryStatus.DEFERRED


def failure_outcomes(
    addresses: Sequence[str], error: DeliveryError, where: Where = NOWHERE
) -> list[RecipientOutcome]:
    """The same failure for every recipient (DNS, connect, greeting, MAIL, SIZE...)."""
    status = DeliveryStatus.BOUNCED if error.permanent else DeliveryStatus.DEFERRED
    dsn = error.dsn or default_dsn(error.code or (550 if error.permanent else 450))
    response = truncate(" ".join(error.message.split()))
    return [
        RecipientOutcome(
            address=address, status=status, dsn=dsn, response=response, phase=error.phase,
            relay=where.relay, remote_mta=where.remote_mta, tls=where.tls,
        )
        for address in addresses
    ]


def transaction_outcomes(
    addresses: Sequence[str],
    rcpt_replies: Mapping[str, Reply],
    final: Reply | DeliveryError | None,
    where: Where,
    *,
    final_phase: Phase = Phase.DATAEND,
    relayed: frozenset[str] = frozenset(),
    eight_bit_unadvertised: bool = False,
) -> list[RecipientOutcome]:
    """Outcomes of one transaction that got at least as far as RCPT.

    `rcpt_replies` has the reply to each RCPT sent (a recipient without one was never
    asked: the connection failed first). `final` is the reply to DATA or to the end of
    data, or the error that ended the transaction after RCPT, or None when no recipient
    was accepted (DATA was not sent); `final_phase` says whether a reply in `final`
    answered the DATA command or the end of data. `relayed` are the recipients that asked for
    NOTIFY=SUCCESS without the server offering DSN.
    """
    outcomes: list[RecipientOutcome] = []
    for address in addresses:
        reply = rcpt_replies.get(address)
        if reply is not None and not reply.positive:
            outcomes.append(_from_reply(address, reply, Phase.RCPT, where))
        elif reply is None or final is None:
            error = final if isinstance(final, DeliveryError) else None
            outcomes.append(_unfinished(address, error, where))
        elif isinstance(final, DeliveryError):
            outcomes.append(_unfinished(address, final, where))
        else:
            outcome = _from_reply(address, final, final_phase, where)
            if outcome.status is DeliveryStatus.SENT:
                outcome = _replace_flags(
                    outcome, address in relayed, eight_bit_unadvertised
                )
            outcomes.append(outcome)
    return outcomes


def _replace_flags(outcome: RecipientOutcome, relayed: bool, eight_bit: bool) -> RecipientOutcome:
    if not relayed and not eight_bit:
        return outcome
    return RecipientOutcome(
        address=outcome.address, status=outcome.status, dsn=outcome.dsn,
        response=outcome.response, phase=outcome.phase, relay=outcome.relay,
        remote_mta=outcome.remote_mta, tls=outcome.tls, dsn_relayed=relayed,
        eight_bit_unadvertised=eight_bit,
    )


def _from_reply(address: str, reply: Reply, phase: Phase, where: Where) -> RecipientOutcome:
    status = status_of(reply.code)
    dsn = reply.dsn
    if status is DeliveryStatus.DEFERRED and not dsn.startswith("4"):
        dsn = "4.0.0"  # a 3xx or nonsense where 2xx/4xx/5xx belongs: try again later
    return RecipientOutcome(
        address=address, status=status, dsn=dsn, response=str(reply), phase=phase,
        relay=where.relay, remote_mta=where.remote_mta, tls=where.tls,
    )


def _unfinished(address: str, error: DeliveryError | None, where: Where) -> RecipientOutcome:
    """Accepted (or never asked) but the transaction did not complete: try again later.

    Even a permanent-looking error here defers: the message was never refused for this
    recipient, so nothing says it cannot be delivered (RFC 5321 §4.1.1.4, §6.1).
    """
    if error is None:
        message, dsn, phase = "transaction not completed", "4.0.0", None
    else:
        message = " ".join(error.message.split())
        dsn = error.dsn if error.dsn and error.dsn.startswith("4") else "4.4.2"
        phase = error.phase
    return RecipientOutcome(
        address=address, status=DeliveryStatus.DEFERRED, dsn=dsn, response=truncate(message),
        phase=phase, relay=where.relay, remote_mta=where.remote_mta, tls=where.tls,
    )


def should_try_next_host(outcomes: Sequence[RecipientOutcome]) -> bool:
    """A host that answered 4xx for the whole transaction, or 5xx to its greeting: the
    next MX may do better.

    Anything else sent or bounced is final for this attempt (RFC 5321 §5.1: the MX list
    is for hosts that cannot be reached or decline temporarily). A 5xx greeting says
    "not this server", not "not this recipient" (RFC 5321 §3.1; Postfix's
    smtp_skip_5xx_greeting), so it moves on too.
    """
    return (all(o.status is DeliveryStatus.DEFERRED for o in outcomes)
            or _greeting_refused(outcomes))


def after_every_host(tried: Sequence[Sequence[RecipientOutcome]]) -> list[RecipientOutcome]:
    """The outcomes of a domain whose every host was tried, each moving on to the next.

    Bounced only if every host refused at its greeting; otherwise the last host that
    deferred speaks, since a temporary failure anywhere means a later attempt may work.
    """
    deferred = [outcomes for outcomes in tried if not _greeting_refused(outcomes)]
    return list(deferred[-1] if deferred else tried[-1])


def _greeting_refused(outcomes: Sequence[RecipientOutcome]) -> bool:
    return bool(outcomes) and all(
        o.status is DeliveryStatus.BOUNCED and o.phase is Phase.GREETING for o in outcomes)
