"""The queue's state values and their one JSON codec (pure).

A message's durable state is a `MessageState`: who it is from, what is known about each
recipient, and when it is tried next. The spool writes it as JSON (`state_to_json`) and
the queue CLI shows the same fields (`recipient_document`, `state_document`): a field is
named here once. docs/spool.md shows a state file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mxsend.envelope import Message
from mxsend.errors import SpoolError

STATE_VERSION = 1


class RecipientStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    BOUNCED = "bounced"


@dataclass(frozen=True, slots=True)
class RecipientState:
    """What is known about one recipient of a queued message."""

    address: str
    status: RecipientStatus = RecipientStatus.PENDING
    response: str = ""  # last reply or reason
    dsn: str = ""  # last enhanced status code x.y.z (RFC 3463)
    relay: str = ""  # last host[ip]:port
    remote_mta: str = ""  # last server host name
    last_attempt: float = 0.0
    delay_notified: bool = False

    @property
    def final(self) -> bool:
        return self.status is not RecipientStatus.PENDING


@dataclass(frozen=True, slots=True)
class MessageState:
    """The durable state of one queued message; recipients in envelope order."""

    id: str
    created: float  # epoch seconds of acceptance
    sender: str  # "" is the null sender
    size: int  # bytes of message data (CRLF, not dot-stuffed)
    recipients: tuple[RecipientState, ...]
    attempts: int = 0
    last_try: float | None = None
    next_try: float = 0.0
    last_error: str = ""
    # "dev:ino:mtime_ns" of msg/ID at acceptance. Recovery uses it to tell this
    # message's file from a later file that reused the same name (docs/spool.md).
    file_stamp: str = ""
    # On hold by the operator (`mxsend queue hold`): kept in hold/, never attempted.
    # Recorded in the state too, so that recovery of a held message claimed by a
    # command that died puts it back on hold, not into the queue.
    held: bool = False
    # DKIM (contract §7), decided once before the first attempt and sent on every one:
    # the DKIM-Signature field(s) to put in front of the header ("" = not signed) and
    # the delivery event's `dkim` label. None: not decided yet (docs/dkim.md).
    dkim_fields: str | None = None
    dkim: str | None = None

    def pending(self) -> tuple[RecipientState, ...]:
        return tuple(r for r in self.recipients if not r.final)

    def is_final(self) -> bool:
        return all(r.final for r in self.recipients)


def initial_state(id: str, message: Message, now: float, file_stamp: str = "") -> MessageState:
    """A freshly accepted message: every recipient pending, due now."""
    return MessageState(
        id=id,
        created=now,
        sender=message.envelope.sender,
        size=len(message.data),
        recipients=tuple(RecipientState(r.address) for r in message.envelope.recipients),
        next_try=now,
        file_stamp=file_stamp,
    )


# --- the codec ----------------------------------------------------------------------------


def recipient_document(r: RecipientState) -> dict[str, Any]:
    return {
        "address": r.address,
        "status": r.status.value,
        "response": r.response,
        "dsn": r.dsn,
        "relay": r.relay,
        "remote_mta": r.remote_mta,
        "last_attempt": r.last_attempt,
        "delay_notified": r.delay_notified,
    }


def state_document(state: MessageState) -> dict[str, Any]:
    """Every field of the state, as JSON values (the state file's content)."""
    doc: dict[str, Any] = {
        "version": STATE_VERSION,
        "id": state.id,
        "created": state.created,
        "sender": state.sender,
        "size": state.size,
        "attempts": state.attempts,
        "last_try": state.last_try,
        "next_try": state.next_try,
        "last_error": state.last_error,
        "file_stamp": state.file_stamp,
        "held": state.held,
        "recipients": [recipient_document(r) for r in state.recipients],
    }
    if state.dkim_fields is not None:  # present = decided, even when "" (docs/spool.md)
        doc["dkim_fields"] = state.dkim_fields
        doc["dkim"] = state.dkim
    return doc


# Compact on purpose: with `indent` the json module falls back to its pure-Python
# encoder, which was an eighth of the daemon's CPU. One encoder for all: json.dumps
# with options builds a new one per call.
_STATE_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def state_to_json(state: MessageState) -> bytes:
    return (_STATE_ENCODER.encode(state_document(state)) + "\n").encode()


def _dkim_from_document(doc: dict[str, Any]) -> dict[str, str | None]:
    """The DKIM entry, if the state has one; its fields go on the wire, so check them."""
    if "dkim_fields" not in doc:
        return {}
    fields, label = doc["dkim_fields"], doc.get("dkim")
    if not isinstance(fields, str) or not fields.isascii() or (
            fields and not fields.endswith("\r\n")):
        raise SpoolError("corrupt state file: dkim_fields is not ASCII header fields")
    if label is not None and not isinstance(label, str):
        raise SpoolError("corrupt state file: dkim is not a string")
    return {"dkim_fields": fields, "dkim": label}


def state_from_json(raw: bytes) -> MessageState:
    """Parse a state file; SpoolError if it is not one we wrote."""
    try:
        doc = json.loads(raw)
        if doc.get("version") != STATE_VERSION:
            raise SpoolError(f"unknown state version {doc.get('version')!r}")
        recipients = tuple(
            RecipientState(
                address=str(r["address"]),
                status=RecipientStatus(r["status"]),
                response=str(r.get("response", "")),
                dsn=str(r.get("dsn", "")),
                relay=str(r.get("relay", "")),
                remote_mta=str(r.get("remote_mta", "")),
                last_attempt=float(r.get("last_attempt", 0.0)),
                delay_notified=bool(r.get("delay_notified", False)),
            )
            for r in doc["recipients"]
        )
        last_try = doc.get("last_try")
        return MessageState(
            id=str(doc["id"]),
            created=float(doc["created"]),
            sender=str(doc["sender"]),
            size=int(doc["size"]),
            recipients=recipients,
            attempts=int(doc.get("attempts", 0)),
            last_try=None if last_try is None else float(last_try),
            next_try=float(doc.get("next_try", 0.0)),
            last_error=str(doc.get("last_error", "")),
            file_stamp=str(doc.get("file_stamp", "")),
            held=doc.get("held", False) is True,
            **_dkim_from_document(doc),
        )
    except SpoolError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SpoolError(f"corrupt state file: {exc}") from None
