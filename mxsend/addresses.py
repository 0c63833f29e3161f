"""The address grammar of SMTP: mailboxes, domains, paths (RFC 5321 §4.1.2, RFC 6531)
and xtext (RFC 3461 §4). Pure.

Each check raises EnvelopeError with a one-line reason. The common plain-ASCII case goes
through one whole-string regex, and only what it does not match through the exact,
rule-by-rule checks (tests/test_envelope_fast.py compares the two). Also the home of
CONTROL, the wire-text rule shared by envelope.py and wire.py.
"""

from __future__ import annotations

import ipaddress
import re

from mxsend.errors import EnvelopeError

# RFC 5321 §4.5.3.1: size limits of the parts of a path.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

# The character classes below say "these ASCII characters, or any non-ASCII one" as the
# complement of the ASCII characters left out: the same set as `[...\u0080-\U0010ffff]`
# (tests/test_enqueue.py checks every code point), but compiled in 0.2 ms instead of
# ~5 ms each, which `mxsend enqueue` would pay at every start (docs/performance.md).
# atext (RFC 5322 §3.2.3) or UTF-8 (RFC 6531 §3.3):
_ATEXT = r"""[^\x00-\x20"(),.:;<>@\[\\\]\x7f]"""
_DOT_STRING = re.compile(rf"^{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
# qtextSMTP / quoted-pairSMTP, RFC 5321 §4.1.2 (and RFC 6531 §3.3 for UTF-8).
_QTEXT = r'[^\x00-\x1f"\\\x7f]'
_QUOTED_STRING = re.compile(rf'^"(?:{_QTEXT}|\\[\x20-\x7e])*"\Z')
# Let-dig (a letter, a digit, or non-ASCII) and Ldh-str's inner characters (RFC 5321 §4.1.2).
_LET_DIG = r"[^\x00-\x2f:-@\[-`{-\x7f]"
_LDH = r"[^\x00-\x2c./:-@\[-`{-\x7f]"
_LABEL = re.compile(rf"^{_LET_DIG}(?:{_LDH}*{_LET_DIG})?\Z")
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
# C0 controls and DEL: CR and LF would end a command early (command injection). The
# one wire-text rule: envelope's command lines and wire.has_control use it.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Fast paths for the common case: plain ASCII, no quoting, no route, no address literal.
# Each accepts a subset of what the exact checks below accept, with the same result, and
# anything it does not match goes through those checks (tests/test_envelope_fast.py
# compares the two). They are whole-string regexes so that a typical message is checked
# in C rather than character by character in Python.
_PLAIN_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+"
_PLAIN_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"  # at most 63 (§4.5.3.1.2)
# Group 1 is the local part, group 2 the domain; lengths are checked by the caller.
_PLAIN_MAILBOX = re.compile(
    rf"({_PLAIN_ATOM}(?:\.{_PLAIN_ATOM})*)@({_PLAIN_LABEL}(?:\.{_PLAIN_LABEL})*)"
)
# A host name of labels of at most 63 characters each, any of _LABEL's characters.
_ANY_LABEL = rf"{_LET_DIG}(?:{_LDH}{{0,61}}{_LET_DIG})?"
_HOST_NAME = re.compile(rf"{_ANY_LABEL}(?:\.{_ANY_LABEL})*")


def validate_mailbox(mailbox: str, *, utf8: bool) -> str:
    """Check `local@domain` per RFC 5321 §4.1.2 (RFC 6531 when utf8); return it."""
    plain = _PLAIN_MAILBOX.fullmatch(mailbox)
    if plain is not None and _plain_fits(plain):
        return mailbox
    return _validate_mailbox_exactly(mailbox, utf8=utf8)


def _validate_mailbox_exactly(mailbox: str, *, utf8: bool) -> str:
    """validate_mailbox for any text: every rule checked on its own."""
    if not utf8 and not mailbox.isascii():
        raise EnvelopeError(f"non-ASCII address without SMTPUTF8: {mailbox!r}")
    local, at, domain = mailbox.rpartition("@")
    if not at or not local or not domain:
        raise EnvelopeError(f"not an address: {mailbox!r}")
    if len(local.encode()) > MAX_LOCAL_PART:
        raise EnvelopeError(f"local part longer than {MAX_LOCAL_PART} octets: {mailbox!r}")
    if not (_DOT_STRING.match(local) or _QUOTED_STRING.match(local)):
        raise EnvelopeError(f"bad local part: {mailbox!r}")
    validate_domain(domain)
    return mailbox


def _plain_fits(plain: re.Match[str]) -> bool:
    """A _PLAIN_MAILBOX match within the §4.5.3.1 limits (ASCII: characters are octets)."""
    return (plain.end(1) - plain.start(1) <= MAX_LOCAL_PART
            and plain.end(2) - plain.start(2) <= MAX_DOMAIN)


def validate_domain(domain: str) -> None:
    """A host name or an address literal (RFC 5321 §4.1.3)."""
    if len(domain.encode()) > MAX_DOMAIN:
        raise EnvelopeError(f"domain longer than {MAX_DOMAIN} octets: {domain!r}")
    if domain.startswith("["):
        address_literal(domain)
        return
    if not (_HOST_NAME.fullmatch(domain) or _labels_valid(domain)):
        raise EnvelopeError(f"bad domain: {domain!r}")


def _labels_valid(domain: str) -> bool:
    """Each dot-separated label is a _LABEL of at most 63 characters (§4.5.3.1.2).

    _HOST_NAME says the same of a whole name at once, for the names it matches.
    """
    return all(len(label) <= 63 and _LABEL.match(label) for label in domain.split("."))


def address_literal(domain: str) -> str | None:
    """The IP of `[192.0.2.1]` or `[IPv6:2001:db8::1]`; None for a host name."""
    if not domain.startswith("["):
        return None
    if not domain.endswith("]"):
        raise EnvelopeError(f"bad address literal: {domain!r}")
    inner = domain[1:-1]
    if "%" in inner or not inner.isascii():
        # RFC 5321 §4.1.3 has no zone index ("%eth0"): it would pick a local interface.
        raise EnvelopeError(f"bad address literal: {domain!r}")
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        raise EnvelopeError(f"bad address literal: {domain!r}") from None


def parse_path(text: str, *, allow_null: bool, utf8: bool) -> str:
    """`<local@domain>` (optionally with an obsolete source route) -> `local@domain`."""
    if text.startswith("<") and text.endswith(">"):
        plain = _PLAIN_MAILBOX.fullmatch(text, 1, len(text) - 1)
        if plain is not None and len(text) <= MAX_PATH + 2 and _plain_fits(plain):
            return text[1:-1]
    return _parse_path_exactly(text, allow_null=allow_null, utf8=utf8)


def _parse_path_exactly(text: str, *, allow_null: bool, utf8: bool) -> str:
    """parse_path for any text: every rule checked on its own."""
    if len(text.encode()) > MAX_PATH + 2:
        raise EnvelopeError(f"path longer than {MAX_PATH} octets")
    if not (text.startswith("<") and text.endswith(">")):
        raise EnvelopeError(f"address not in angle brackets: {text!r}")
    inner = text[1:-1]
    if not inner:
        if allow_null:
            return ""
        raise EnvelopeError("the null path <> is not allowed here")
    if inner.startswith("@"):
        # RFC 5321 §4.1.1.3 / Appendix C: a source route is accepted and ignored.
        route, colon, inner = inner.partition(":")
        if not colon:
            raise EnvelopeError(f"bad source route: {text!r}")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise EnvelopeError(f"bad source route: {text!r}")
            validate_domain(hop[1:])
    return validate_mailbox(inner, utf8=utf8)


# --- xtext (RFC 3461 §4) --------------------------------------------------------------


def xtext_decode(text: str) -> str:
    """xtext -> text; "+XX" are octets, so UTF-8 (RFC 6533 addresses) decodes as a whole."""
    if not _XTEXT.match(text):
        raise EnvelopeError(f"bad xtext: {text!r}")
    octets = re.sub(rb"\+([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode())
    try:
        return octets.decode("utf-8")
    except UnicodeDecodeError:
        raise EnvelopeError(f"xtext is not UTF-8: {text!r}") from None


def xtext_encode(text: str) -> str:
    return "".join(
        c if 33 <= ord(c) <= 126 and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in text
    )
