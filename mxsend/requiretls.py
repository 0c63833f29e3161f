"""REQUIRETLS (RFC 8689): the per-server decision and the `TLS-Required: No` header.

Pure functions. The MAIL parameter itself is parsed in envelope.py (Batch SMTP) and set
by `enqueue --require-tls`; delivery passes the flag here for each candidate server.

RFC 8689 §4.2.1: a message with REQUIRETLS goes only to a server that
- was found through an authenticated MX lookup (DNSSEC, or an MTA-STS policy in
  enforce mode whose mx patterns the host matches),
- is reached over TLS with its certificate verified by PKIX, DANE or MTA-STS,
- advertises REQUIRETLS in its EHLO reply, so the requirement travels on.
A server that fails any of these is not used (the next MX is tried); when none is left
the recipients bounce with 5.7.30 (RFC 8689 §5, "REQUIRETLS support required").
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import Enum

DSN_REQUIRETLS = "5.7.30"  # RFC 8689 §6 (RFC 3463 registry)
KEYWORD = "REQUIRETLS"


class CertCheck(Enum):
    """How the server's certificate was authenticated, if at all."""

    NONE = "none"  # plaintext, or opportunistic TLS without verification
    PKIX = "pkix"  # verifyCert and the name checked against the MX host
    DANE = "dane"
    MTA_STS = "mta-sts"


@dataclass(frozen=True, slots=True)
class RequireTlsVerdict:
    proceed: bool
    reason: str = ""
    dsn: str = ""  # DSN_REQUIRETLS when not proceeding


OK = RequireTlsVerdict(True)


def requiretls_verdict(
    required: bool,
    *,
    mx_authenticated: bool,
    tls_active: bool,
    cert_check: CertCheck,
    ehlo_keywords: Collection[str],
) -> RequireTlsVerdict:
    """May a message with (or without) REQUIRETLS be sent on this connection?"""
    if not required:
        return OK
    if not mx_authenticated:
        return _refuse("the MX host was not found through DNSSEC or an enforced MTA-STS policy")
    if not tls_active:
        return _refuse("the connection is not encrypted")
    if cert_check is CertCheck.NONE:
        return _refuse("the server's certificate was not verified (PKIX, DANE or MTA-STS)")
    if KEYWORD not in {keyword.upper() for keyword in ehlo_keywords}:
        return _refuse("the server does not advertise REQUIRETLS")
    return OK


def _refuse(reason: str) -> RequireTlsVerdict:
    return RequireTlsVerdict(False, f"REQUIRETLS: {reason}", DSN_REQUIRETLS)


def tls_required_no(header_lines: Iterable[str]) -> bool:
    """Does the header carry `TLS-Required: No` (RFC 8689 §5)?

    `header_lines` are the header's physical lines without line ends (as the script's
    HeaderLines); folded continuation lines are joined. The name and the value are
    case-insensitive (RFC 5322 §1.2.2; RFC 8689 §5 defines the single value "No").
    """
    fields: list[str] = []
    for line in header_lines:
        if line[:1] in (" ", "\t") and fields:
            fields[-1] += line
        elif line:
            fields.append(line)
    for field in fields:
        name, colon, value = field.partition(":")
        if colon and name.strip().lower() == "tls-required":
            return value.strip().lower() == "no"
    return False


def ignore_policy_failures(requiretls: bool, header_lines: Iterable[str]) -> bool:
    """`TLS-Required: No` waives MTA-STS and DANE failures, unless REQUIRETLS is also set
    (RFC 8689 §5: the MAIL parameter takes precedence over the header field)."""
    return not requiretls and tls_required_no(header_lines)
