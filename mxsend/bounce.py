"""Delivery Status Notifications (RFC 3464) as spool messages from `<>`. Pure.

`wants_report` applies the sender's NOTIFY request (RFC 3461 §4.1) to one recipient;
`build_dsn` turns the recipients worth reporting into one `multipart/report;
report-type=delivery-status` message, ready for the spool:

1. text/plain: what happened, in words ("RCPT TO to mx1.example.org said: 550 ...");
2. message/delivery-status: the machine-readable fields of RFC 3464 §2.2 and §2.3;
3. the original message (message/rfc822) or only its header (text/rfc822-headers).

Decisions (docs/dsn.md has the reasoning):

- Never a report to the null sender: a bounce of a bounce would loop (RFC 5321 §4.5.5).
- RET=HDRS returns the header only. A report with no failed recipient (delayed,
  delivered, relayed) returns the header only whatever RET says (RFC 3461 §4.3: RET is
  about failure reports; the sender still has the message).
- SMTPUTF8 originals and non-ASCII addresses use the RFC 6533 types
  (message/global-delivery-status, message/global, message/global-headers) and the
  `utf-8` address type, so nothing non-ASCII lands in a type that forbids it.
- Bytes of the original are returned untouched (a DKIM signature still verifies); any
  8-bit byte makes the report BODY=8BITMIME (RFC 6152). Lines are CRLF throughout.
- No randomness: Message-ID and the MIME boundary derive from the queue id, the time and
  a hash of the content, and the boundary is checked against the content it encloses.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from enum import StrEnum

from mxsend.addresses import xtext_decode
from mxsend.envelope import (
    NOTIFY_NEVER,
    Envelope,
    Message,
    Recipient,
    split_header,
)
from mxsend.errors import EnvelopeError, Phase


class DsnAction(StrEnum):
    """The Action field of a per-recipient block (RFC 3464 §2.3.3)."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"
    EXPANDED = "expanded"


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """One recipient's line in a report.

    `diagnostic` is `type; text` as in the Diagnostic-Code field ("smtp; 550 5.1.1 no
    such user"); a bare SMTP reply ("550 ...") is taken as type smtp and any other bare
    text as type X-mxsend. `remote_mta` is the host name of the server that answered;
    `phase` says which command it answered, for the human-readable part.
    """

    address: str
    orcpt: str | None  # "addr-type;xtext" as given in RCPT (RFC 3461 §4.2)
    action: DsnAction
    status: str  # x.y.z (RFC 3463)
    remote_mta: str | None
    diagnostic: str | None
    last_attempt: float | None
    will_retry_until: float | None = None
    phase: Phase | None = None


# RFC 3461 §4.1: which NOTIFY keyword asks for which kind of report.
_NOTIFY_KEYWORD = {
    DsnAction.FAILED: "FAILURE",
    DsnAction.DELAYED: "DELAY",
    DsnAction.DELIVERED: "SUCCESS",
    DsnAction.RELAYED: "SUCCESS",
    DsnAction.EXPANDED: "SUCCESS",
}


def wants_report(recipient: Recipient, action: DsnAction) -> bool:
    """Does this recipient's NOTIFY ask for a report of `action`? (RFC 3461 §4.1)

    No NOTIFY means FAILURE only: §4.1 allows FAILURE or FAILURE,DELAY as the default,
    and Postfix, like most MTAs, sends no delay warnings unless asked.
    """
    if recipient.notify is None:
        return action is DsnAction.FAILED
    if recipient.notify == (NOTIFY_NEVER,):
        return False
    return _NOTIFY_KEYWORD[action] in recipient.notify


# --- field values --------------------------------------------------------------------

_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_DEFAULT_STATUS = {
    DsnAction.FAILED: "5.0.0",
    DsnAction.DELAYED: "4.0.0",
    DsnAction.DELIVERED: "2.0.0",
    DsnAction.RELAYED: "2.0.0",
    DsnAction.EXPANDED: "2.0.0",
}
_DIAGNOSTIC_TYPE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)\s*;\s*(.*)$", re.DOTALL)
_SMTP_REPLY = re.compile(r"^[245]\d\d(?:[ -]|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_MSGID_UNSAFE = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")
# A DSN field is a header line (RFC 3464 §2.1); keep a hostile remote reply from making
# one unbounded. RFC 5321 §4.5.3.1.5 caps a reply line at 512 octets; allow a few lines.
MAX_FIELD_TEXT = 2000
_FOLD_AT = 78
# A token longer than this is broken so that no line nears 998 octets (RFC 5322 §2.1.1),
# even at four UTF-8 octets per character.
_HARD_LIMIT = 240

_PHASE_LABEL = {
    Phase.CONNECT: "connection",
    Phase.GREETING: "connection",
    Phase.EHLO: "EHLO",
    Phase.STARTTLS: "STARTTLS",
    Phase.MAIL: "MAIL FROM",
    Phase.RCPT: "RCPT TO",
    Phase.DATA: "DATA",
    Phase.DATAEND: "end of DATA",
}


# The `kind` of a `bounce` log event (contract §10 Logs).
REPORT_KIND = {
    DsnAction.FAILED: "failure",
    DsnAction.DELAYED: "delay",
    DsnAction.RELAYED: "relayed",
    DsnAction.DELIVERED: "success",
    DsnAction.EXPANDED: "success",
}


def command_of(phase: Phase | None) -> str | None:
    """The SMTP command a reply in `phase` answered, as reports and logs name it."""
    return _PHASE_LABEL.get(phase) if phase is not None else None


def _clean(text: str, *, ascii_only: bool) -> str:
    """One line of header text: control characters (CR, LF, TAB...) become spaces."""
    text = _CONTROL.sub(" ", text).strip()
    if ascii_only:
        text = text.encode("ascii", "replace").decode("ascii")
    return text[:MAX_FIELD_TEXT]


def _date(timestamp: float) -> str:
    """RFC 5322 §3.3 date-time in UTC, `+0000` (not `-0000`, which means unknown)."""
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))


def status_for(recipient: DsnRecipient) -> str:
    """The recipient's status if it is a valid x.y.z code, else one that fits the action."""
    if _STATUS.match(recipient.status):
        return recipient.status
    return _DEFAULT_STATUS[recipient.action]


def split_diagnostic(diagnostic: str) -> tuple[str, str]:
    """`smtp; 550 ...` -> ("smtp", "550 ..."); bare text gets smtp or X-mxsend."""
    text = _CONTROL.sub(" ", diagnostic).strip()
    match = _DIAGNOSTIC_TYPE.match(text)
    if match and not _SMTP_REPLY.match(text):
        return match.group(1), match.group(2).strip()
    return ("smtp" if _SMTP_REPLY.match(text) else "X-mxsend"), text


def decode_orcpt(orcpt: str) -> str:
    """`rfc822;bob+2Bx@example.org` -> `rfc822; bob+x@example.org` (RFC 3464 §2.3.1).

    A value whose decoding is not printable text is kept as given rather than letting
    control characters into the report.
    """
    addr_type, _, xtext = orcpt.partition(";")
    try:
        address = xtext_decode(xtext)
    except EnvelopeError:
        address = xtext
    if not address.isprintable():
        address = xtext
    return f"{addr_type.strip()}; {address.strip()}"


def decode_envid(envid: str) -> str:
    """ENVID is xtext in SMTP and plain in the report (RFC 3461 §4.4, RFC 3464 §2.2.1)."""
    try:
        decoded = xtext_decode(envid)
    except EnvelopeError:
        return envid
    if not (decoded.isascii() and decoded.isprintable()):
        return envid
    return decoded


def _address_type(address: str) -> str:
    """rfc822 for ASCII addresses, utf-8 for internationalised ones (RFC 6533 §3)."""
    return "rfc822" if address.isascii() else "utf-8"


def _fold(name: str, value: str) -> str:
    """`Name: value` folded at spaces near 78 columns (RFC 5322 §2.2.3), without CRLF."""
    words: list[str] = []
    for word in value.split(" "):
        while len(word) > _HARD_LIMIT:
            words.append(word[:_HARD_LIMIT])
            word = word[_HARD_LIMIT:]
        words.append(word)
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        if not word:
            continue
        if current != f"{name}:" and len(current) + 1 + len(word) > _FOLD_AT:
            lines.append(current)
            current = " " + word
        else:
            current += " " + word
    lines.append(current)
    return "\r\n".join(lines)


# --- the report ----------------------------------------------------------------------


def _needs_global(envelope: Envelope, recipients: Sequence[DsnRecipient]) -> bool:
    """RFC 6533 §3: internationalised addresses or an SMTPUTF8 original."""
    texts = [envelope.sender, *(r.address for r in recipients)]
    texts += [r.orcpt for r in recipients if r.orcpt]
    return envelope.smtputf8 or not all(text.isascii() for text in texts)


def _subject(actions: set[DsnAction]) -> str:
    if DsnAction.FAILED in actions:
        return "Undelivered Mail Returned to Sender"
    if DsnAction.DELAYED in actions:
        return "Delayed Mail (still being retried)"
    if DsnAction.RELAYED in actions:
        return "Delivery Status Notification (relayed)"
    return "Successful Mail Delivery Report"


def _reply_sentence(recipient: DsnRecipient) -> str:
    """What happened to one recipient, in words: who said what to which command."""
    text = ""
    if recipient.diagnostic:
        _, text = split_diagnostic(recipient.diagnostic)
    host = _clean(recipient.remote_mta, ascii_only=False) if recipient.remote_mta else ""
    label = _PHASE_LABEL.get(recipient.phase) if recipient.phase else None
    if host and label and text:
        return f"{label} to {host} said: {text}"
    if host and text:
        return f"{host} said: {text}"
    if text:
        return text
    if recipient.action is DsnAction.DELIVERED:
        return f"delivered to {host}" if host else "delivered"
    if recipient.action is DsnAction.RELAYED:
        return (f"handed to {host}, which" if host else "handed to a server that") + (
            " does not offer delivery notifications"
        )
    return f"status {status_for(recipient)}"


_INTRO = {
    DsnAction.FAILED: (
        "Your message could not be delivered to the following recipients. "
        "The mail system has given up on them."
    ),
    DsnAction.DELAYED: (
        "Your message has not yet been delivered to the following recipients. "
        "The mail system is still trying; you do not need to send it again."
    ),
    DsnAction.DELIVERED: "Your message was delivered to the following recipients.",
    DsnAction.RELAYED: (
        "Your message was handed on to the following recipients' mail servers, which do "
        "not send delivery notifications; you may hear nothing more about it."
    ),
    DsnAction.EXPANDED: "Your message was delivered to the following recipients' lists.",
}


def _human_text(
    reporting_mta: str, recipients: Sequence[DsnRecipient], returned: str
) -> str:
    """The first part, for people: short paragraphs wrapped at 76 columns."""
    paragraphs = [f"This is the mail system at {reporting_mta}."]
    for action in DsnAction:
        group = [r for r in recipients if r.action is action]
        if not group:
            continue
        paragraphs.append(_INTRO[action])
        for recipient in group:
            line = f"<{recipient.address}>: {_reply_sentence(recipient)}"
            if recipient.action is DsnAction.DELAYED and recipient.will_retry_until:
                line += f" (retrying until {_date(recipient.will_retry_until)})"
            paragraphs.append(line)
    paragraphs.append(returned)
    # Long words (URLs in a server's reply) stay whole unless they would break the
    # 998-octet line limit of RFC 5322 §2.1.1.
    wrapper = textwrap.TextWrapper(width=76, break_long_words=False, break_on_hyphens=False)
    lines: list[str] = []
    for paragraph in paragraphs:
        for line in wrapper.wrap(_clean(paragraph, ascii_only=False)) or [""]:
            lines.extend(line[i : i + _HARD_LIMIT] for i in range(0, len(line), _HARD_LIMIT))
        lines.append("")
    return "\r\n".join(lines)


def _per_message_fields(
    reporting_mta: str, queue_id: str, envelope: Envelope, arrival: float, ascii_only: bool
) -> list[str]:
    """RFC 3464 §2.2."""
    fields = [_fold("Reporting-MTA", f"dns; {_clean(reporting_mta, ascii_only=True)}")]
    fields.append(_fold("X-Mxsend-Queue-ID", _clean(queue_id, ascii_only=True)))
    if envelope.envid:
        fields.append(_fold("Original-Envelope-Id", _clean(decode_envid(envelope.envid),
                                                           ascii_only=True)))
    fields.append(_fold("Arrival-Date", _date(arrival)))
    return fields


def _per_recipient_fields(recipient: DsnRecipient, ascii_only: bool) -> list[str]:
    """RFC 3464 §2.3."""
    fields: list[str] = []
    if recipient.orcpt:
        fields.append(
            _fold("Original-Recipient", _clean(decode_orcpt(recipient.orcpt),
                                               ascii_only=ascii_only))
        )
    address = _clean(recipient.address, ascii_only=ascii_only)
    fields.append(_fold("Final-Recipient", f"{_address_type(recipient.address)}; {address}"))
    fields.append(f"Action: {recipient.action.value}")
    fields.append(f"Status: {status_for(recipient)}")
    if recipient.remote_mta:
        fields.append(_fold("Remote-MTA", f"dns; {_clean(recipient.remote_mta, ascii_only=True)}"))
    if recipient.diagnostic:
        kind, text = split_diagnostic(recipient.diagnostic)
        fields.append(_fold("Diagnostic-Code", f"{kind}; {_clean(text, ascii_only=ascii_only)}"))
    if recipient.last_attempt is not None:
        fields.append(_fold("Last-Attempt-Date", _date(recipient.last_attempt)))
    # §2.3.8: only meaningful while the MTA is still trying.
    if recipient.action is DsnAction.DELAYED and recipient.will_retry_until is not None:
        fields.append(_fold("Will-Retry-Until", _date(recipient.will_retry_until)))
    return fields


def _boundary(seed: bytes, parts: Iterable[bytes]) -> str:
    """A boundary that occurs in none of the parts (RFC 2046 §5.1.1)."""
    contents = list(parts)
    for counter in range(1000):
        digest = hashlib.sha256(seed + counter.to_bytes(4, "big")).hexdigest()[:24]
        boundary = f"=_mxsend_{digest}"
        marker = b"--" + boundary.encode()
        if not any(marker in content for content in contents):
            return boundary
    raise AssertionError("no free MIME boundary after 1000 tries")  # 2**96 odds per try


def build_dsn(
    *,
    original: Message,
    queue_id: str,
    recipients: Sequence[DsnRecipient],
    reporting_mta: str,
    arrival: float,
    now: float,
    message_id_domain: str,
) -> Message | None:
    """One RFC 3464 report about `recipients`, from `<>` to the original sender.

    None when there is nobody to tell: the original sender is `<>` or no recipient is
    listed. The caller picks the recipients with `wants_report`.
    """
    envelope = original.envelope
    if envelope.sender == "" or not recipients:
        return None
    global_types = _needs_global(envelope, recipients)
    actions = {r.action for r in recipients}
    full = DsnAction.FAILED in actions and envelope.ret != "HDRS"
    header, _ = split_header(original.data)
    returned = original.data if full else header
    if full:
        returned_type = "message/global" if global_types else "message/rfc822"
        returned_words = "Your message is attached below."
    else:
        returned_type = "message/global-headers" if global_types else "text/rfc822-headers"
        returned_words = "The header of your message is attached below."
    status_type = "message/global-delivery-status" if global_types else "message/delivery-status"

    human = _human_text(reporting_mta, recipients, returned_words).encode("utf-8")
    blocks = [_per_message_fields(reporting_mta, queue_id, envelope, arrival, not global_types)]
    blocks += [_per_recipient_fields(r, not global_types) for r in recipients]
    status = "\r\n\r\n".join("\r\n".join(block) for block in blocks).encode("utf-8") + b"\r\n"

    seed = "\0".join([queue_id, repr(now), *(f"{r.address}/{r.action}" for r in recipients)])
    digest = hashlib.sha256(seed.encode("utf-8", "surrogatepass") + original.data).hexdigest()
    boundary = _boundary(digest.encode(), [human, status, returned])
    safe_id = _MSGID_UNSAFE.sub("_", queue_id).strip(".") or "dsn"
    domain = _MSGID_UNSAFE.sub("_", message_id_domain).strip(".") or "localhost"
    message_id = f"<{int(now * 1000)}.{digest[:12]}.{safe_id}@{domain}>"

    def cte(data: bytes) -> str:
        return "7bit" if data.isascii() else "8bit"

    mta = _clean(reporting_mta, ascii_only=True)
    head = [
        _fold("From", f"Mail Delivery System <MAILER-DAEMON@{mta}>"),
        _fold("To", f"<{_clean(envelope.sender, ascii_only=False)}>"),
        _fold("Subject", _subject(actions)),
        _fold("Date", _date(now)),
        _fold("Message-ID", message_id),
        # RFC 3834 §5: marks the report as automatic so that responders do not answer it.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    parts = [
        ("text/plain; charset=utf-8", cte(human), "Notification", human),
        (status_type, cte(status), "Delivery report", status),
        (returned_type, cte(returned), "Undelivered message" if full else "Message header",
         returned),
    ]
    out = [("\r\n".join(head) + "\r\n\r\n").encode("utf-8")]
    out.append(b"This is a MIME-encapsulated message.\r\n\r\n")
    for content_type, encoding, description, body in parts:
        out.append(
            (
                f"--{boundary}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Transfer-Encoding: {encoding}\r\n"
                f"Content-Description: {description}\r\n\r\n"
            ).encode()
        )
        # RFC 2046 §5.1.1: the CRLF before a boundary belongs to the boundary, so one more
        # keeps the returned message's own final line end.
        out.append(body if body.endswith(b"\r\n") or not body else body + b"\r\n")
        out.append(b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    data = b"".join(out)

    sender_is_utf8 = not envelope.sender.isascii()
    dsn_envelope = Envelope(
        sender="",
        recipients=(Recipient(address=envelope.sender),),
        body=None if data.isascii() else "8BITMIME",
        smtputf8=sender_is_utf8,
    )
    return Message(envelope=dsn_envelope, data=data)
