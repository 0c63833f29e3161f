"""What an SMTP transaction says, decided from values: no I/O (RFC 5321, 1870, 3461,
6152, 6531).

The HELO name, the return path, the MAIL and RCPT parameters for what a server offers,
and the checks that keep script-supplied text from breaking a command line.
smtp_setup.py and smtp.py put the result on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mxsend.actions import ServerActions
from mxsend.addresses import validate_mailbox, xtext_encode
from mxsend.config_values import IpNetwork
from mxsend.envelope import Envelope, Recipient
from mxsend.errors import EnvelopeError, Phase, TemporaryFailure
from mxsend.wire import has_control


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What the config says about every connection."""

    helo_name: str  # the default when the script leaves HELOname empty
    source_address: str = ""
    ca_file: Path | None = None
    allowed_destinations: tuple[IpNetwork, ...] = ()  # contract §10
    debug_peers: tuple[str, ...] = ()  # log.debug_peers: transcripts (transcript.py)


@dataclass(frozen=True, slots=True)
class Transaction:
    """What one MAIL..DATA sends; `return_path` is final (modifier and BATV applied)."""

    envelope: Envelope
    return_path: str
    recipients: tuple[Recipient, ...]
    data: bytes



def has_8bit(data: bytes) -> bool:
    return not data.isascii()


def needs_smtputf8(envelope: Envelope, return_path: str, recipients: Sequence[Recipient]) -> bool:
    """RFC 6531 §3.4: needed when asked for or any address is not ASCII."""
    return envelope.smtputf8 or not return_path.isascii() or not all(
        r.address.isascii() for r in recipients
    )


def check_wire_text(value: str, what: str, *, spaces: bool = True) -> str:
    """Nothing with CR, LF or other controls reaches a command line (style §10)."""
    if has_control(value, spaces=spaces):
        raise TemporaryFailure(
            f"{what} contains a control character: {value!r}", dsn="4.3.5", phase=Phase.MAIL,
        )
    return value


def choose_helo(actions: ServerActions, settings: ClientSettings) -> str:
    name = actions.helo_name.strip() or settings.helo_name
    check_wire_text(name, "HELOname", spaces=False)
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise TemporaryFailure(
                f"HELOname is not a valid host name: {name!r}", dsn="4.3.5", phase=Phase.EHLO
            ) from None
    return name


def choose_return_path(sender: str, actions: ServerActions) -> str:
    """returnAddressModifier: 0 as queued, 1 defaultReturnAddress, 2 nullReturnAddress."""
    if actions.return_address_modifier == 1:
        chosen = actions.default_return_address.strip()
    elif actions.return_address_modifier == 2:
        chosen = actions.null_return_address.strip()
    else:
        return sender
    if chosen.startswith("<") and chosen.endswith(">"):
        chosen = chosen[1:-1]
    if chosen:
        check_wire_text(chosen, "return address")
        try:
            validate_mailbox(chosen, utf8=True)
        except EnvelopeError as exc:
            raise TemporaryFailure(
                f"return address from the script is not valid: {exc}", dsn="4.3.5",
                phase=Phase.MAIL,
            ) from None
    return chosen


def mail_params(
    tx: Transaction, extensions: dict[str, str], *, allow_dsn: bool, smtputf8: bool
) -> list[str]:
    """MAIL FROM parameters for what this server offers."""
    params: list[str] = []
    env = tx.envelope
    if "size" in extensions:
        params.append(f"SIZE={len(tx.data)}")  # RFC 1870 §6
    if "8bitmime" in extensions:
        if env.body:
            params.append(f"BODY={env.body}")
        elif has_8bit(tx.data):
            params.append("BODY=8BITMIME")  # RFC 6152 §3
    if smtputf8:
        params.append("SMTPUTF8")
    if allow_dsn and "dsn" in extensions:
        if env.ret:
            params.append(f"RET={env.ret}")
        if env.envid:
            params.append(f"ENVID={env.envid}")
    if env.requiretls and "requiretls" in extensions:
        # RFC 8689 §4.2.1: the requirement travels on (delivery checked the session).
        params.append("REQUIRETLS")
    # AUTH= (RFC 4954 §5) is never sent: we do not authenticate to MX hosts, and an
    # unauthenticated client has no identity to vouch for.
    return params


def rcpt_params(recipient: Recipient, extensions: dict[str, str], *, allow_dsn: bool) -> list[str]:
    params: list[str] = []
    if allow_dsn and "dsn" in extensions:
        if recipient.notify:
            params.append("NOTIFY=" + ",".join(recipient.notify))
        if recipient.orcpt:
            params.append(f"ORCPT={recipient.orcpt}")
        elif recipient.notify is not None:
            # RFC 3461 §4.2: ORCPT is the address as the client received it.
            params.append("ORCPT=rfc822;" + xtext_encode(recipient.address))
    return params


def advertised_size(extensions: dict[str, str]) -> int | None:
    """RFC 1870 §4: `SIZE n`; 0 or no number means no fixed limit."""
    value = extensions.get("size")
    if value is None:
        return None
    text = value.strip().split(" ")[0]
    return int(text) if text.isdigit() and int(text) > 0 else None
