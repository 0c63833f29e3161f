"""REQUIRETLS (RFC 8689): the per-server decision and the TLS-Required header, as tables."""

from __future__ import annotations

import pytest

from mxsend.requiretls import (
    DSN_REQUIRETLS,
    CertCheck,
    ignore_policy_failures,
    requiretls_verdict,
    tls_required_no,
)

GOOD = {"mx_authenticated": True, "tls_active": True, "cert_check": CertCheck.PKIX,
        "ehlo_keywords": {"PIPELINING", "STARTTLS", "REQUIRETLS"}}


@pytest.mark.parametrize(
    ("changes", "proceed", "words"),
    [
        ({}, True, ""),
        ({"cert_check": CertCheck.DANE}, True, ""),
        ({"cert_check": CertCheck.MTA_STS}, True, ""),
        ({"ehlo_keywords": {"requiretls"}}, True, ""),  # keywords are case-insensitive
        ({"mx_authenticated": False}, False, "DNSSEC"),
        ({"tls_active": False}, False, "not encrypted"),
        ({"cert_check": CertCheck.NONE}, False, "not verified"),
        ({"ehlo_keywords": {"STARTTLS"}}, False, "does not advertise"),
    ],
)
def test_requiretls_verdict(changes: dict[str, object], proceed: bool, words: str) -> None:
    verdict = requiretls_verdict(True, **{**GOOD, **changes})  # type: ignore[arg-type]
    assert verdict.proceed is proceed
    assert words in verdict.reason
    assert verdict.dsn == ("" if proceed else DSN_REQUIRETLS)


def test_without_requiretls_anything_goes() -> None:
    verdict = requiretls_verdict(False, mx_authenticated=False, tls_active=False,
                                 cert_check=CertCheck.NONE, ehlo_keywords=())
    assert verdict.proceed


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["From: a@example.com", "TLS-Required: No", "Subject: x"], True),
        (["tls-required:no"], True),
        (["TLS-Required:", "  No"], True),  # folded
        (["TLS-Required: Yes"], False),
        (["TLS-Required: No thanks"], False),
        (["X-TLS-Required: No"], False),
        (["Subject: TLS-Required: No"], False),
        ([], False),
    ],
)
def test_tls_required_no(lines: list[str], expected: bool) -> None:
    assert tls_required_no(lines) is expected


def test_requiretls_parameter_wins_over_the_header() -> None:
    assert ignore_policy_failures(False, ["TLS-Required: No"])
    assert not ignore_policy_failures(True, ["TLS-Required: No"])
    assert not ignore_policy_failures(False, ["Subject: hi"])
