"""The `delivery` event's fields (contract §6, §10). Pure: values in, a dict out.

Beyond the contract's first keys, each `delivery` event says, as Postfix's log does:

- `delay`: seconds since the message was accepted from new/, one decimal;
- `delays`: `queue/setup/transfer`, as Postfix's delays= (its a+b, c and d): seconds
  queued before this attempt, connection setup (DNS, ServerDetails, connect, greeting,
  EHLO, TLS; near 0 on a pooled session) and the transaction (MAIL to the final reply);
- `message_id` (the Message-ID header, or null), `orcpt` (the RCPT's ORCPT, or null),
  `tls_cipher`, `verified` (the certificate chain was verified).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mxsend import bounce
from mxsend.envelope import Envelope
from mxsend.outcome import RecipientOutcome

# A Message-ID is untrusted input: logged, but not at any length.
MAX_MESSAGE_ID = 256


@dataclass(frozen=True, slots=True)
class AttemptInfo:
    """What every `delivery` event of one attempt shares."""

    attempt: int
    created: float  # epoch seconds the message was accepted from new/
    started: float  # epoch seconds this attempt started
    message_id: str | None
    orcpts: Mapping[str, str | None]
    dkim: str | None = None  # the DKIM-Signature(s) the message carries (contract §7)

    @property
    def retries(self) -> int:
        """Attempts before this one (what the VPOP3 8.8 hooks are told)."""
        return self.attempt - 1


def message_id_of(header_lines: Sequence[str]) -> str | None:
    """The first Message-ID header's value, unfolded (RFC 5322 §3.6.4), or None."""
    value: list[str] | None = None
    for line in header_lines:
        if value is not None:
            if line[:1] in (" ", "\t"):
                value.append(line.strip())
                continue
            break
        name, colon, rest = line.partition(":")
        if colon and name.strip().lower() == "message-id":
            value = [rest.strip()]
    if value is None:
        return None
    text = " ".join(part for part in value if part)
    return text[:MAX_MESSAGE_ID] or None


def attempt_info(envelope: Envelope, header_lines: Sequence[str], *, attempt: int,
                 created: float, started: float, dkim: str | None = None) -> AttemptInfo:
    return AttemptInfo(attempt=attempt, created=created, started=started,
                       message_id=message_id_of(header_lines),
                       orcpts={r.address: r.orcpt for r in envelope.recipients}, dkim=dkim)


def format_delays(queue: float, setup: float, transfer: float) -> str:
    """`queue/setup/transfer` in seconds, two decimals each (Postfix's delays= style)."""
    return f"{max(0.0, queue):.2f}/{max(0.0, setup):.2f}/{max(0.0, transfer):.2f}"


def delivery_fields(outcome: RecipientOutcome, info: AttemptInfo, now: float
                    ) -> dict[str, Any]:
    """The fields of the `delivery` event of one recipient's outcome."""
    return {
        "recipient": outcome.address, "status": str(outcome.status), "relay": outcome.relay,
        "tls": outcome.tls, "dsn": outcome.dsn, "response": outcome.response,
        "attempt": info.attempt, "command": bounce.command_of(outcome.phase),
        "delay": round(max(0.0, now - info.created), 1),
        "delays": format_delays(info.started - info.created, outcome.setup, outcome.transfer),
        "message_id": info.message_id, "orcpt": info.orcpts.get(outcome.address),
        "tls_cipher": outcome.tls_cipher, "verified": outcome.verified,
        "dkim": info.dkim, "tls_policy": outcome.tls_policy,
    }


def given_up_fields(address: str, dsn: str, response: str, info: AttemptInfo | None,
                    attempt: int, now: float, created: float, dkim: str | None = None
                    ) -> dict[str, Any]:
    """A recipient bounced without a server (expiry, ForceLastTry): relay null."""
    started = info.started if info is not None else now
    return {
        "recipient": address, "status": "bounced", "relay": None, "tls": None, "dsn": dsn,
        "response": response, "attempt": attempt, "command": None,
        "delay": round(max(0.0, now - created), 1),
        "delays": format_delays(started - created, now - started, 0.0),
        "message_id": info.message_id if info is not None else None,
        "orcpt": info.orcpts.get(address) if info is not None else None,
        "tls_cipher": None, "verified": False, "dkim": dkim, "tls_policy": None,
    }
