"""End to end: messages signed by mxsend.dkim, sent over SMTP to a real Exim on loopback,
which verifies each signature itself against the keys in the test DNS server (§7)."""

from __future__ import annotations

import re
import smtplib

import pytest

from mxsend.dkim import choose_keys, from_domain, sign
from mxsend.dkim_keys import SigningKey
from tests.fixtures.exim import DkimResult, EximServer
from tests.test_dkim import MESSAGE, publish, signing_key

NOW = 1_796_000_000.0


def send(server: EximServer, message: bytes) -> str:
    """Send `message` (CRLF, not dot-stuffed) and return Exim's message id."""
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        client.ehlo("client.test")
        code, reply = client.mail("alice@mail.example.com")
        assert code == 250, reply
        code, reply = client.rcpt("bob@receiver.test")
        assert code == 250, reply
        code, reply = client.data(message)  # dot-stuffs, as mxsend does on the wire
        assert code == 250, reply
    match = re.search(rb"id=(\S+)", reply)
    assert match, reply
    return match.group(1).decode()


def statuses(results: list[DkimResult]) -> dict[tuple[str, str], str]:
    return {(r.selector, r.algorithm): f"{r.status} {r.reason}".strip() for r in results}


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ([("rsa", "rsa2026", "relaxed/relaxed")], {("rsa2026", "rsa-sha256"): "pass"}),
        ([("ed25519", "ed2026", "relaxed/relaxed")],
         {("ed2026", "ed25519-sha256"): "pass"}),
        ([("rsa", "rsa2026", "relaxed/relaxed"), ("ed25519", "ed2026", "relaxed/relaxed")],
         {("rsa2026", "rsa-sha256"): "pass", ("ed2026", "ed25519-sha256"): "pass"}),
        ([("rsa", "simple1", "simple/simple")], {("simple1", "rsa-sha256"): "pass"}),
    ],
    ids=["rsa", "ed25519", "dual", "rsa-simple"],
)
def test_exim_verifies_mxsend_signatures(
    exim_dkim: EximServer, keys: list[tuple[str, str, str]],
    expected: dict[tuple[str, str], str],
) -> None:
    configured: list[SigningKey] = []
    for kind, selector, canonicalization in keys:
        key = signing_key("mail.example.com", selector, kind, canonicalization)
        publish(exim_dkim.dns, key)
        configured.append(key)
    fields = sign(MESSAGE, choose_keys(configured, from_domain(MESSAGE)), NOW)
    message_id = send(exim_dkim, fields + MESSAGE)
    results = exim_dkim.results(message_id, len(expected))
    assert statuses(results) == expected
    assert {r.domain for r in results} == {"mail.example.com"}


def test_exim_fails_a_message_changed_after_signing(exim_dkim: EximServer) -> None:
    """The receiver is not vacuous: the same signature over a changed body fails."""
    key = signing_key("mail.example.com", "rsa2026")
    publish(exim_dkim.dns, key)
    fields = sign(MESSAGE, [key], NOW)
    message_id = send(exim_dkim, fields + MESSAGE.replace(b"figures", b"numbers"))
    [result] = exim_dkim.results(message_id, 1)
    assert result.status == "fail", result


def test_exim_sees_a_line_starting_with_a_dot(exim_dkim: EximServer) -> None:
    """Signed before dot-stuffing (RFC 5321 §4.5.2), verified after un-stuffing."""
    key = signing_key("mail.example.com", "ed2026", "ed25519")
    publish(exim_dkim.dns, key)
    message = MESSAGE + b".leading dot\r\n..two dots\r\n"
    message_id = send(exim_dkim, sign(message, [key], NOW) + message)
    [result] = exim_dkim.results(message_id, 1)
    assert result.status == "pass", result
