"""RFC 3464 reports: built, then parsed back with the `email` package field by field."""

from __future__ import annotations

import email
import email.message
import email.policy
from email.utils import parsedate_to_datetime
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxsend.bounce import (
    REPORT_KIND,
    DsnAction,
    DsnRecipient,
    _boundary,
    build_dsn,
    command_of,
    decode_envid,
    decode_orcpt,
    split_diagnostic,
    wants_report,
)
from mxsend.envelope import (
    Envelope,
    Message,
    Recipient,
    normalise_line_ends,
    parse_bsmtp,
    serialise_bsmtp,
    split_header,
)
from mxsend.errors import Phase

ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600.0
BODY = b"From: Alice <alice@example.com>\r\nSubject: hello\r\nDKIM-Signature: v=1; b=abc\r\n" \
       b"\r\nline one\r\n.leading dot\r\n\r\nlast line\r\n"


def original(
    data: bytes = BODY,
    *,
    sender: str = "alice@example.com",
    ret: str | None = None,
    envid: str | None = None,
    smtputf8: bool = False,
) -> Message:
    envelope = Envelope(
        sender=sender,
        recipients=(Recipient("bob@example.org"), Recipient("carol@example.net")),
        ret=ret,
        envid=envid,
        smtputf8=smtputf8,
    )
    return Message(envelope=envelope, data=data)


def failed(address: str = "bob@example.org", **changes: object) -> DsnRecipient:
    values: dict[str, object] = {
        "address": address,
        "orcpt": None,
        "action": DsnAction.FAILED,
        "status": "5.1.1",
        "remote_mta": "mx1.example.org",
        "diagnostic": "smtp; 550 5.1.1 <bob@example.org>: no such user",
        "last_attempt": NOW - 5,
        "phase": Phase.RCPT,
    }
    values.update(changes)
    return DsnRecipient(**values)  # type: ignore[arg-type]


def build(message: Message, recipients: list[DsnRecipient]) -> Message:
    dsn = build_dsn(
        original=message,
        queue_id="Q1a2b3",
        recipients=recipients,
        reporting_mta="out.example.com",
        arrival=ARRIVAL,
        now=NOW,
        message_id_domain="out.example.com",
    )
    assert dsn is not None
    return dsn


def parse(dsn: Message) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    assert not parsed.defects
    return parsed


def raw_parts(dsn: Message) -> list[bytes]:
    """The bodies of the three parts, byte for byte, split at the boundary."""
    parsed = parse(dsn)
    boundary = parsed.get_boundary()
    assert boundary
    marker = b"\r\n--" + boundary.encode()
    chunks = dsn.data.split(marker)[1:-1]
    return [chunk.split(b"\r\n\r\n", 1)[1] for chunk in chunks]


def status_blocks(part: email.message.Message) -> list[email.message.Message]:
    """The field blocks of a message/delivery-status part, as the email package reads them."""
    payload = part.get_payload()
    assert isinstance(payload, list)
    return cast(list[email.message.Message], payload)


def parts(parsed: email.message.Message) -> list[email.message.EmailMessage]:
    """The three parts of a report: human text, delivery status, returned message."""
    payload = parsed.get_payload()
    assert isinstance(payload, list) and len(payload) == 3
    return cast(list[email.message.EmailMessage], payload)


# --- NOTIFY (RFC 3461 §4.1) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("notify", "action", "wanted"),
    [
        (None, DsnAction.FAILED, True),
        (None, DsnAction.DELAYED, False),
        (None, DsnAction.DELIVERED, False),
        (None, DsnAction.RELAYED, False),
        (("NEVER",), DsnAction.FAILED, False),
        (("NEVER",), DsnAction.DELAYED, False),
        (("FAILURE",), DsnAction.FAILED, True),
        (("FAILURE",), DsnAction.DELAYED, False),
        (("DELAY",), DsnAction.DELAYED, True),
        (("DELAY",), DsnAction.FAILED, False),
        (("SUCCESS",), DsnAction.DELIVERED, True),
        (("SUCCESS",), DsnAction.RELAYED, True),
        (("SUCCESS",), DsnAction.EXPANDED, True),
        (("SUCCESS",), DsnAction.FAILED, False),
        (("SUCCESS", "FAILURE", "DELAY"), DsnAction.DELAYED, True),
        (("FAILURE", "DELAY"), DsnAction.RELAYED, False),
    ],
)
def test_wants_report(notify: tuple[str, ...] | None, action: DsnAction, wanted: bool) -> None:
    assert wants_report(Recipient("bob@example.org", notify=notify), action) is wanted


# --- failure reports -------------------------------------------------------------------


def test_failure_report_fields() -> None:
    message = original(envid="QQ+2B314+3D1")
    dsn = build(
        message,
        [failed(orcpt="rfc822;Bob+2BTag@Example.org"),
         failed("carol@example.net", status="5.7.1", remote_mta="mx.example.net",
                diagnostic="smtp; 550 5.7.1 rejected", phase=Phase.DATAEND)],
    )
    assert dsn.envelope.sender == ""
    assert [r.address for r in dsn.envelope.recipients] == ["alice@example.com"]
    assert dsn.envelope.body is None and not dsn.envelope.smtputf8
    assert b"\n" not in dsn.data.replace(b"\r\n", b"")  # CRLF only
    parsed = parse(dsn)
    assert parsed["From"] == "Mail Delivery System <MAILER-DAEMON@out.example.com>"
    assert parsed["To"].addresses[0].addr_spec == "alice@example.com"
    assert parsed["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsedate_to_datetime(parsed["Date"]).timestamp() == NOW
    assert parsed["Message-ID"].endswith("@out.example.com>")
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"

    human, status, returned = parts(parsed)
    assert human.get_content_type() == "text/plain"
    text = " ".join(human.get_content().split())  # unwrapped
    assert "RCPT TO to mx1.example.org said: 550 5.1.1 <bob@example.org>: no such user" in text
    assert "end of DATA to mx.example.net said: 550 5.7.1 rejected" in text

    assert status.get_content_type() == "message/delivery-status"
    per_message, bob, carol = status_blocks(status)
    assert per_message["Reporting-MTA"] == "dns; out.example.com"
    assert per_message["Original-Envelope-Id"] == "QQ+314=1"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert per_message["X-Mxsend-Queue-ID"] == "Q1a2b3"
    assert bob["Original-Recipient"] == "rfc822; Bob+Tag@Example.org"
    assert bob["Final-Recipient"] == "rfc822; bob@example.org"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.example.org"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.org>: no such user"
    assert parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW - 5
    assert bob["Will-Retry-Until"] is None
    assert carol["Original-Recipient"] is None
    assert carol["Final-Recipient"] == "rfc822; carol@example.net"
    assert carol["Status"] == "5.7.1"

    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()
    assert isinstance(inner, list) and inner[0]["Subject"] == "hello"
    # The original comes back byte for byte (its DKIM signature still verifies).
    assert raw_parts(dsn)[2] == BODY


def test_ret_hdrs_returns_the_header_only() -> None:
    dsn = build(original(ret="HDRS"), [failed()])
    parsed = parse(dsn)
    returned = parts(parsed)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert raw_parts(dsn)[2] == split_header(BODY)[0]
    assert b"line one" not in dsn.data


def test_ret_full_returns_everything() -> None:
    dsn = build(original(ret="FULL"), [failed()])
    assert parts(parse(dsn))[2].get_content_type() == "message/rfc822"
    assert b"line one" in dsn.data


def test_delay_report_returns_headers_and_retry_time() -> None:
    until = ARRIVAL + 5 * 86400
    dsn = build(
        original(ret="FULL"),
        [failed(action=DsnAction.DELAYED, status="4.2.2", will_retry_until=until,
                diagnostic="smtp; 452 4.2.2 mailbox full")],
    )
    parsed = parse(dsn)
    assert parsed["Subject"] == "Delayed Mail (still being retried)"
    human, status, returned = parts(parsed)
    text = " ".join(human.get_content().split())
    assert "still trying" in text
    assert "452 4.2.2 mailbox full" in text
    _, bob = status_blocks(status)
    assert bob["Action"] == "delayed"
    assert bob["Status"] == "4.2.2"
    assert parsedate_to_datetime(bob["Will-Retry-Until"]).timestamp() == until
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"line one" not in dsn.data


@pytest.mark.parametrize(
    ("action", "subject"),
    [
        (DsnAction.RELAYED, "Delivery Status Notification (relayed)"),
        (DsnAction.DELIVERED, "Successful Mail Delivery Report"),
    ],
)
def test_success_reports(action: DsnAction, subject: str) -> None:
    dsn = build(
        original(),
        [failed(action=action, status="2.0.0", diagnostic="smtp; 250 2.0.0 queued as X",
                phase=Phase.DATAEND, will_retry_until=NOW)],
    )
    parsed = parse(dsn)
    assert parsed["Subject"] == subject
    _, status, returned = parts(parsed)
    _, bob = status_blocks(status)
    assert bob["Action"] == action.value
    assert bob["Status"] == "2.0.0"
    assert bob["Will-Retry-Until"] is None  # RFC 3464 §2.3.8: delays only
    assert returned.get_content_type() == "text/rfc822-headers"


def test_mixed_report_lists_each_group() -> None:
    dsn = build(
        original(),
        [failed(), failed("carol@example.net", action=DsnAction.DELAYED, status="4.4.1",
                          diagnostic=None, remote_mta=None, phase=None)],
    )
    parsed = parse(dsn)
    assert parsed["Subject"] == "Undelivered Mail Returned to Sender"
    text = " ".join(parts(parsed)[0].get_content().split())
    assert text.index("could not be delivered") < text.index("not yet been delivered")
    _, _, carol = status_blocks(parts(parsed)[1])
    assert carol["Action"] == "delayed"
    assert carol["Remote-MTA"] is None and carol["Diagnostic-Code"] is None


def test_no_report_to_the_null_sender_or_about_nobody() -> None:
    common = dict(queue_id="Q", reporting_mta="m", arrival=0.0, now=1.0, message_id_domain="m")
    assert build_dsn(original=original(sender=""), recipients=[failed()], **common) is None  # type: ignore[arg-type]
    assert build_dsn(original=original(), recipients=[], **common) is None  # type: ignore[arg-type]


def test_invalid_status_falls_back_to_one_fitting_the_action() -> None:
    dsn = build(original(), [failed(status="550"), failed("c@example.net", status="",
                                                          action=DsnAction.DELAYED)])
    _, bob, carol = status_blocks(parts(parse(dsn))[1])
    assert bob["Status"] == "5.0.0" and carol["Status"] == "4.0.0"


def test_reply_text_cannot_inject_header_fields() -> None:
    dsn = build(original(), [failed(diagnostic="smtp; 550 no\r\nBcc: evil@example.com\r\n\r\nx",
                                    remote_mta="mx\r\nX-Evil: 1")])
    parsed = parse(dsn)
    _, bob = status_blocks(parts(parsed)[1])
    assert bob["Bcc"] is None and bob["X-Evil"] is None
    assert bob["Diagnostic-Code"] == "smtp; 550 no Bcc: evil@example.com x"
    assert parsed["Bcc"] is None


def test_long_replies_are_folded_under_the_line_limit() -> None:
    reply = "smtp; 550 5.7.1 " + " ".join(["word"] * 400) + " " + "u" * 3000
    dsn = build(original(), [failed(diagnostic=reply)])
    lines = dsn.data.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    _, bob = status_blocks(parts(parse(dsn))[1])
    assert bob["Diagnostic-Code"].startswith("smtp; 550 5.7.1 word word")


@pytest.mark.parametrize(
    ("diagnostic", "kind", "text"),
    [
        ("smtp; 550 5.1.1 x", "smtp", "550 5.1.1 x"),
        ("550 5.1.1 x", "smtp", "550 5.1.1 x"),
        ("421-first line", "smtp", "421-first line"),
        ("X-mxsend; null MX", "X-mxsend", "null MX"),
        ("domain has a null MX (RFC 7505)", "X-mxsend", "domain has a null MX (RFC 7505)"),
    ],
)
def test_split_diagnostic(diagnostic: str, kind: str, text: str) -> None:
    assert split_diagnostic(diagnostic) == (kind, text)


@pytest.mark.parametrize(
    ("orcpt", "decoded"),
    [
        ("rfc822;bob@example.org", "rfc822; bob@example.org"),
        ("rfc822;b+2Bo+3Db@example.org", "rfc822; b+o=b@example.org"),
        ("rfc822;a+0D+0Ab@example.org", "rfc822; a+0D+0Ab@example.org"),  # no CRLF let in
    ],
)
def test_decode_orcpt(orcpt: str, decoded: str) -> None:
    assert decode_orcpt(orcpt) == decoded


@pytest.mark.parametrize(
    ("envid", "decoded"),
    [("QQ314159", "QQ314159"), ("a+2Bb+3Dc", "a+b=c"), ("x+0Ay", "x+0Ay")],
)
def test_decode_envid(envid: str, decoded: str) -> None:
    assert decode_envid(envid) == decoded


def test_eight_bit_original_comes_back_intact() -> None:
    data = "From: a@example.com\r\nSubject: caf\u00e9\r\n\r\nna\u00efve \u00fcber\r\n".encode()
    latin1 = b"From: a@example.com\r\nSubject: x\r\n\r\ncaf\xe9\r\n"
    for body in (data, latin1):
        dsn = build(original(body), [failed()])
        assert dsn.envelope.body == "8BITMIME"
        parsed = parse(dsn)
        assert parts(parsed)[2]["Content-Transfer-Encoding"] == "8bit"
        assert raw_parts(dsn)[2] == body
        assert parse_bsmtp(serialise_bsmtp(dsn)) == dsn


def test_internationalised_addresses_use_the_global_types() -> None:
    data = "From: j\u00f6rg@b\u00fccher.example\r\nSubject: \u00fc\r\n\r\nx\r\n".encode()
    message = original(data, sender="j\u00f6rg@b\u00fccher.example", smtputf8=True)
    dsn = build(message, [failed("\u00e9lise@example.org", orcpt="utf-8;\u00e9lise@example.org")])
    assert dsn.envelope.smtputf8 and dsn.envelope.body == "8BITMIME"
    assert dsn.envelope.recipients[0].address == "j\u00f6rg@b\u00fccher.example"
    # The email package reads 8-bit header bytes as surrogates; RFC 6532 headers are
    # UTF-8, so read them as text.
    parsed = email.message_from_string(dsn.data.decode("utf-8"), policy=email.policy.default)
    assert parsed["To"].addresses[0].addr_spec == "j\u00f6rg@b\u00fccher.example"
    _, status, returned = parts(parsed)
    assert status.get_content_type() == "message/global-delivery-status"
    assert returned.get_content_type() == "message/global"
    fields = raw_parts(dsn)[1].decode("utf-8")
    assert "Final-Recipient: utf-8; \u00e9lise@example.org" in fields
    assert "Original-Recipient: utf-8; \u00e9lise@example.org" in fields
    assert raw_parts(dsn)[2] == data
    assert parse_bsmtp(serialise_bsmtp(dsn)) == dsn


def test_ascii_sender_of_an_smtputf8_message_needs_no_smtputf8() -> None:
    data = "Subject: \u00fc\r\n\r\nx\r\n".encode()
    dsn = build(original(data, smtputf8=True), [failed()])
    assert not dsn.envelope.smtputf8 and dsn.envelope.body == "8BITMIME"
    assert parts(parse(dsn))[2].get_content_type() == "message/global"


def test_boundary_avoids_the_content() -> None:
    first = _boundary(b"seed", [])
    second = _boundary(b"seed", [b"x\r\n--" + first.encode() + b"\r\n"])
    assert first != second


def test_message_without_header_or_body() -> None:
    for data in (b"", b"\r\njust a body\r\n", b"Subject: no body\r\n"):
        dsn = build(original(data), [failed()])
        parse(dsn)
        assert parse_bsmtp(serialise_bsmtp(dsn)) == dsn


def test_report_is_stable_for_the_same_input() -> None:
    # No randomness: a daemon that crashes and rebuilds a report builds the same one.
    assert build(original(), [failed()]) == build(original(), [failed()])


# --- any message gives a report that parses -----------------------------------------------

texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=200)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=2000).map(normalise_line_ends),
    diagnostic=st.one_of(st.none(), texts),
    remote=st.one_of(st.none(), texts),
    status=st.text(max_size=8),
    action=st.sampled_from(list(DsnAction)),
    ret=st.sampled_from([None, "FULL", "HDRS"]),
    envid=st.one_of(st.none(), st.from_regex(r"\A[!-*,-<>-~]{1,40}\Z")),
)
def test_any_message_gives_a_parsable_report(
    data: bytes,
    diagnostic: str | None,
    remote: str | None,
    status: str,
    action: DsnAction,
    ret: str | None,
    envid: str | None,
) -> None:
    recipient = failed(action=action, status=status, diagnostic=diagnostic, remote_mta=remote,
                       will_retry_until=NOW + 60)
    dsn = build(original(data, ret=ret, envid=envid), [recipient])
    parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    human, report, _ = parts(parsed)
    assert human.get_content_type() == "text/plain"
    per_message, block = status_blocks(report)
    assert per_message["Reporting-MTA"] == "dns; out.example.com"
    assert block["Action"] == action.value
    assert block["Final-Recipient"] == "rfc822; bob@example.org"
    assert block["Status"][0] in "245"
    head = dsn.data.split(b"\r\n--", 1)[0]
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))
    full = action is DsnAction.FAILED and ret != "HDRS"
    assert raw_parts(dsn)[2] == (data if full else split_header(data)[0])
    assert parse_bsmtp(serialise_bsmtp(dsn)) == dsn


@pytest.mark.parametrize(("phase", "command"), [
    (Phase.RCPT, "RCPT TO"), (Phase.MAIL, "MAIL FROM"), (Phase.DATAEND, "end of DATA"),
    (Phase.GREETING, "connection"), (Phase.DNS, None), (None, None),
])
def test_command_of_names_the_command_a_reply_answered(phase: Phase | None,
                                                      command: str | None) -> None:
    assert command_of(phase) == command


def test_every_action_has_a_report_kind() -> None:
    assert set(REPORT_KIND) == set(DsnAction)
