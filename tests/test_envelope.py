"""The Batch SMTP parser and writer: tables for each rule, hypothesis for hostile input."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mxsend.addresses import (
    address_literal,
    parse_path,
    validate_mailbox,
    xtext_decode,
    xtext_encode,
)
from mxsend.envelope import (
    Envelope,
    Message,
    Recipient,
    domain_of,
    dot_stuff,
    header_lines,
    parse_bsmtp,
    serialise_bsmtp,
    split_header,
    unstuff,
)
from mxsend.errors import EnvelopeError

SIMPLE = b"MAIL FROM:<a@src.test>\nRCPT TO:<b@dst.test>\nDATA\nSubject: x\n\nbody\n.\n"


def rcpt_file(rcpt_line: bytes, mail_line: bytes = b"MAIL FROM:<a@src.test>") -> bytes:
    return mail_line + b"\n" + rcpt_line + b"\nDATA\nx\n.\n"


# --- the format, rule by rule ---------------------------------------------------------


def test_the_contract_example() -> None:
    raw = (b"MAIL FROM:<alice@example.com> RET=HDRS ENVID=QQ314159 AUTH=<alice@example.com>\r\n"
           b"RCPT TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.org\r\n"
           b"RCPT TO:<carol@example.net>\r\n"
           b"DATA\r\nFrom: alice@example.com\r\nSubject: hello\r\n\r\n..dot\r\n.\r\n")
    message = parse_bsmtp(raw)
    env = message.envelope
    assert env.sender == "alice@example.com"
    assert env.ret == "HDRS" and env.envid == "QQ314159" and env.auth == "alice@example.com"
    assert env.recipients == (
        Recipient("bob@example.org", ("SUCCESS", "FAILURE"), "rfc822;bob@example.org"),
        Recipient("carol@example.net"),
    )
    assert message.data == b"From: alice@example.com\r\nSubject: hello\r\n\r\n.dot\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        SIMPLE,
        SIMPLE.replace(b"\n", b"\r\n"),
        SIMPLE.replace(b"RCPT TO:<b@dst.test>\n", b"RCPT TO:<b@dst.test>\r\n"),  # mixed
        b"HELO me.test\n" + SIMPLE,
        b"EHLO me.test\r\n" + SIMPLE,
        SIMPLE + b"QUIT\n",
        SIMPLE + b"quit\r\n",
        SIMPLE.replace(b"MAIL FROM:", b"mail from:").replace(b"RCPT TO:", b"Rcpt To:"),
        SIMPLE.replace(b"DATA", b"data"),
        SIMPLE.replace(b"MAIL FROM:<", b"MAIL FROM: <"),
        b"\n" + SIMPLE,  # blank lines before DATA are skipped
    ],
)
def test_accepted_variants_all_mean_the_same(raw: bytes) -> None:
    message = parse_bsmtp(raw)
    assert message.envelope == Envelope("a@src.test", (Recipient("b@dst.test"),))
    assert message.data == b"Subject: x\r\n\r\nbody\r\n"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty file"),
        (b"  \r\n\n", "empty file"),
        (b"RCPT TO:<b@dst.test>\nDATA\nx\n.\n", "RCPT before MAIL"),
        (b"MAIL FROM:<a@src.test>\nDATA\nx\n.\n", "no RCPT"),
        (b"MAIL FROM:<a@src.test>\nRCPT TO:<b@dst.test>\n", "no DATA"),
        (b"MAIL FROM:<a@src.test>\nRCPT TO:<b@dst.test>\nDATA\nx\n", "single '.'"),
        (b"MAIL FROM:<a@src.test>\nRCPT TO:<b@dst.test>\nDATA\nx\n.\nmore\n", "after the final"),
        # The final "." without its line end: the file may be cut (contract §1).
        (SIMPLE[:-1], "single '.' and a line end"),
        (SIMPLE.replace(b"\n", b"\r\n")[:-2], "single '.' and a line end"),
        (SIMPLE.replace(b"\n", b"\r\n")[:-1], "single '.' and a line end"),
        (b"MAIL FROM:<a@src.test>\nRCPT TO:<b@dst.test>\nDATA\n.", "line end"),
        # Cut right after the first dot of a dot-stuffed line "..tail".
        (b"MAIL FROM:<a@src.test>\nRCPT TO:<b@dst.test>\nDATA\nx\n.", "line end"),
        (b"MAIL FROM:<a@src.test>\nMAIL FROM:<b@src.test>\nRCPT TO:<b@dst.test>\nDATA\n.\n",
         "second MAIL"),
        (b"HELO x\nDATA\n.\n", "no MAIL"),
        (rcpt_file(b"RCPT TO:<b@dst.test>", b"MAIL FROM:<a@src.test> X-FOO=1"),
         "unknown MAIL parameter"),
        (rcpt_file(b"RCPT TO:<b@dst.test> BAR"), "unknown RCPT parameter"),
        (rcpt_file(b"RCPT TO:<>"), "null path"),
        (rcpt_file(b"RCPT TO:b@dst.test"), "angle brackets"),
        (rcpt_file(b"RCPT TO:<b@dst.test"), "unterminated"),
        (rcpt_file(b"RCPT TO:<b@dst.test>NOTIFY=NEVER"), "no space"),
        (rcpt_file(b"RCPT TO:<b@@dst.test>"), "bad local part"),
        (rcpt_file(b"RCPT TO:<b.@dst.test>"), "bad local part"),
        (rcpt_file(b"RCPT TO:<b@dst..test>"), "bad domain"),
        (rcpt_file(b"RCPT TO:<b@-dst.test>"), "bad domain"),
        (rcpt_file(b"RCPT TO:<b@[300.1.1.1]>"), "address literal"),
        (rcpt_file(b"RCPT TO:<b@[IPv6:fe80::1%eth0]>"), "address literal"),
        (rcpt_file(b"RCPT TO:<" + b"x" * 65 + b"@dst.test>"), "local part longer"),
        (rcpt_file(b"RCPT TO:<b@" + b"a." * 130 + b"test>"), "longer"),
        (rcpt_file("RCPT TO:<bé@dst.test>".encode()), "non-ASCII"),
        (rcpt_file(b"RCPT TO:<b@dst.test> NOTIFY=NEVER,SUCCESS"), "NOTIFY"),
        (rcpt_file(b"RCPT TO:<b@dst.test> NOTIFY=SUCCESS,SUCCESS"), "NOTIFY"),
        (rcpt_file(b"RCPT TO:<b@dst.test> NOTIFY=SOMETIMES"), "NOTIFY"),
        (rcpt_file(b"RCPT TO:<b@dst.test> NOTIFY"), "needs a value"),
        (rcpt_file(b"RCPT TO:<b@dst.test> ORCPT=b@dst.test"), "ORCPT"),
        (rcpt_file(b"RCPT TO:<b@dst.test> ORCPT=rfc822;a+zz"), "xtext"),
        (rcpt_file(b"RCPT TO:<b@dst.test> NOTIFY=NEVER NOTIFY=NEVER"), "twice"),
        (rcpt_file(b"RCPT TO:<b@dst.test>", b"MAIL FROM:<a@src.test> RET=SOME"), "RET"),
        (rcpt_file(b"RCPT TO:<b@dst.test>", b"MAIL FROM:<a@src.test> BODY=BINARYMIME"), "BODY"),
        (rcpt_file(b"RCPT TO:<b@dst.test>", b"MAIL FROM:<a@src.test> SIZE=12k"), "SIZE"),
        (rcpt_file(b"RCPT TO:<b@dst.test>", "MAIL FROM:<a@src.test> SIZE=²".encode()), "SIZE"),
        (rcpt_file(b"RCPT TO:<b@dst.test>", "MAIL FROM:<a@src.test> SIZE=٣".encode()), "SIZE"),
        (rcpt_file(b"RCPT TO:<b@dst.test>", b"MAIL FROM:<a@src.test> SMTPUTF8=yes"), "no value"),
        (rcpt_file(b"RCPT TO:<b@dst.test>", b"MAIL FROM:<a@src.test> ENVID=" + b"x" * 101),
         "ENVID"),
        (rcpt_file(b"RCPT TO:<b@dst.test>", b"MAIL FROM:<a@src.test> AUTH=alice"), "angle"),
        (rcpt_file(b"RCPT TO:<b@dst.test>", b"MAIL FROM:<a@src.test\x00>"), "control"),
        (rcpt_file(b"RCPT TO:<b@dst.test>", b"MAIL FROM:<a@src.test> \xff"), "UTF-8"),
        (rcpt_file(b"RCPT TO:<b@dst.test> " + b"X=1 " * 600), "longer than"),
        (rcpt_file(b"SEND TO:<b@dst.test>"), "expected MAIL FROM or RCPT TO"),
    ],
)
def test_malformed_files_say_why(raw: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError, match=re.escape(reason)):
        parse_bsmtp(raw)


def test_parameters_and_paths() -> None:
    raw = rcpt_file(
        b"RCPT TO:<@relay.test,@r2.test:b@dst.test> notify=delay,failure ORCPT=rfc822;b+2Bx@d",
        b"MAIL FROM:<> ret=full envid=A+2BB auth=<> body=8bitmime SMTPUTF8 SIZE=42",
    )
    env = parse_bsmtp(raw).envelope
    assert env == Envelope(
        "", (Recipient("b@dst.test", ("DELAY", "FAILURE"), "rfc822;b+2Bx@d"),),
        ret="FULL", envid="A+2BB", auth="", body="8BITMIME", smtputf8=True, size=42,
    )


def test_utf8_addresses_need_smtputf8() -> None:
    raw = rcpt_file("RCPT TO:<bé@dst.test>".encode(), b"MAIL FROM:<a@src.test> SMTPUTF8")
    assert parse_bsmtp(raw).envelope.recipients[0].address == "bé@dst.test"


@pytest.mark.parametrize(
    ("path", "address"),
    [("<a@b.test>", "a@b.test"), ('<"a b"@b.test>', '"a b"@b.test'),
     ("<a@[192.0.2.1]>", "a@[192.0.2.1]"), ("<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]"),
     ("<@x.test:a@b.test>", "a@b.test")],
)
def test_good_paths(path: str, address: str) -> None:
    assert parse_path(path, allow_null=False, utf8=False) == address


def test_address_literals_and_domains() -> None:
    assert address_literal("[192.0.2.1]") == "192.0.2.1"
    assert address_literal("[IPv6:2001:DB8::1]") == "2001:db8::1"
    assert address_literal("example.test") is None
    assert domain_of("A@Example.TEST") == "example.test"


def test_data_is_kept_byte_for_byte_apart_from_line_ends_and_stuffing() -> None:
    body = b"DKIM-Signature: v=1;\r\n\tb=abc\r\n\r\n\x00\xff\xfe raw \t \r\n.\r\n..\r\n"
    raw = b"MAIL FROM:<a@s.test>\nRCPT TO:<b@d.test>\nDATA\n" + dot_stuff(body) + b".\n"
    assert parse_bsmtp(raw).data == body


def test_headers() -> None:
    data = b"Subject: a\r\n b\r\nTo: x@y\r\n\r\nbody\r\n"
    assert split_header(data) == (b"Subject: a\r\n b\r\nTo: x@y\r\n\r\n", b"body\r\n")
    assert header_lines(data) == ["Subject: a", " b", "To: x@y"]
    assert split_header(b"\r\nbody\r\n") == (b"\r\n", b"body\r\n")


@pytest.mark.parametrize("text", ["plain", "a+b=c", "é ü", "", "+2B"])
def test_xtext_round_trip(text: str) -> None:
    encoded = xtext_encode(text)
    assert encoded.isascii() and " " not in encoded
    assert xtext_decode(encoded) == text


# --- properties -----------------------------------------------------------------------

_atom = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789!#$%&'*+/=?^_`{|}~-éü日",
                min_size=1, max_size=8)
_local = st.one_of(
    st.lists(_atom, min_size=1, max_size=3).map(".".join),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126,
                                   exclude_characters='"\\'), max_size=10).map(
        lambda s: f'"{s}"'),
).filter(lambda s: len(s) <= 64)
_label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\Z")
_domain = st.one_of(
    st.lists(_label, min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).map(lambda ip: f"[{ip}]"),
    st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip}]"),
)
_address = st.builds(lambda local, domain: f"{local}@{domain}", _local, _domain).filter(
    lambda a: len(a) <= 254)
_notify = st.one_of(
    st.none(),
    st.just(("NEVER",)),
    st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY"]), min_size=1, max_size=3,
             unique=True).map(tuple),
)
_xtext = st.text(max_size=30).map(xtext_encode).filter(lambda s: len(s) <= 100)
_recipient = st.builds(
    Recipient, address=_address, notify=_notify,
    orcpt=st.one_of(st.none(), _address.map(lambda a: "rfc822;" + xtext_encode(a))),
)
_line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_data = st.lists(_line, max_size=8).map(lambda lines: b"".join(ln + b"\r\n" for ln in lines))
def _needs_utf8(envelope: Envelope) -> Envelope:
    """Non-ASCII addresses are only valid with SMTPUTF8 (RFC 6531 §3.4)."""
    addresses = [envelope.sender, envelope.auth or "", *(r.address for r in envelope.recipients)]
    if all(a.isascii() for a in addresses):
        return envelope
    return replace(envelope, smtputf8=True)


_message = st.builds(
    Message,
    envelope=st.builds(
        Envelope,
        sender=st.one_of(st.just(""), _address),
        recipients=st.lists(_recipient, min_size=1, max_size=4).map(tuple),
        ret=st.sampled_from([None, "FULL", "HDRS"]),
        envid=st.one_of(st.none(), _xtext.filter(bool)),
        auth=st.one_of(st.none(), st.just(""), _address),
        body=st.sampled_from([None, "7BIT", "8BITMIME"]),
        smtputf8=st.booleans(),
        size=st.one_of(st.none(), st.integers(0, 10**12)),
    ).map(_needs_utf8),
    data=_data,
)


@given(_message)
@example(Message(Envelope("a@b.test", (Recipient("c@d.test"),)), b""))
@example(Message(Envelope("a@b.test", (Recipient("c@d.test"),)), b".\r\n..\r\n.x\r\n"))
def test_serialise_then_parse_is_the_identity(message: Message) -> None:
    assert parse_bsmtp(serialise_bsmtp(message)) == message


@given(_message, st.randoms(use_true_random=False))
def test_any_mix_of_lf_and_crlf_means_the_same(message: Message, rnd: object) -> None:
    raw = serialise_bsmtp(message)
    parts = raw.split(b"\r\n")
    mixed = parts[0]
    for part in parts[1:]:
        mixed += (b"\n" if rnd.random() < 0.5 else b"\r\n") + part  # type: ignore[attr-defined]
    assert parse_bsmtp(mixed) == message


@given(_data)
def test_dot_stuffing_round_trip(data: bytes) -> None:
    stuffed = dot_stuff(data)
    assert b"\r\n.\r\n" not in b"\r\n" + stuffed  # a data line never ends the message
    assert unstuff(stuffed) == data


@given(st.binary(max_size=400))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_bytes_raise_nothing_but_envelope_error(raw: bytes) -> None:
    try:
        parse_bsmtp(raw)
    except EnvelopeError as exc:
        assert "\n" not in str(exc)


_hostile_line = st.one_of(
    st.sampled_from([b"MAIL FROM:<a@b.test>", b"RCPT TO:<c@d.test>", b"DATA", b".", b"..",
                     b"QUIT", b"HELO x", b"MAIL FROM:<>", b"", b"RCPT TO:<>"]),
    st.builds(lambda verb, arg: verb + arg,
              st.sampled_from([b"MAIL FROM:", b"RCPT TO:", b"mail from: ", b"RCPT TO:<"]),
              st.binary(max_size=30)),
    st.builds(lambda key, value: b"MAIL FROM:<a@b.test> " + key + b"=" + value,
              st.sampled_from([b"SIZE", b"RET", b"ENVID", b"AUTH", b"BODY", b"SMTPUTF8"]),
              st.text(max_size=12).map(lambda s: s.encode("utf-8", "surrogatepass"))),
    st.builds(lambda key, value: b"RCPT TO:<c@d.test> " + key + b"=" + value,
              st.sampled_from([b"NOTIFY", b"ORCPT"]),
              st.text(max_size=12).map(lambda s: s.encode("utf-8", "surrogatepass"))),
    st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass")),
)


@given(st.lists(_hostile_line, max_size=10),
       st.lists(st.sampled_from([b"\n", b"\r\n", b"\r", b""]), min_size=10, max_size=10))
def test_hostile_line_soup_raises_nothing_but_envelope_error(
    lines: list[bytes], ends: list[bytes]
) -> None:
    raw = b"".join(line + end for line, end in zip(lines, ends, strict=False))
    try:
        message = parse_bsmtp(raw)
    except EnvelopeError:
        return
    # Whatever parses also survives a round trip.
    assert parse_bsmtp(serialise_bsmtp(message)) == message


@given(st.text(max_size=60))
def test_paths_of_any_text(text: str) -> None:
    for utf8 in (False, True):
        try:
            address = parse_path(text, allow_null=True, utf8=utf8)
        except EnvelopeError:
            continue
        assert parse_path(f"<{address}>", allow_null=True, utf8=utf8) == address


@pytest.mark.parametrize("text", ["a@b.example\n", '"q"@b.example\n', "a\n@b.example"])
def test_a_newline_never_passes_as_part_of_an_address(text: str) -> None:
    # `$` in a pattern also matches before a final newline; the checks must not.
    with pytest.raises(EnvelopeError):
        validate_mailbox(text, utf8=True)


def test_xtext_and_keyword_stop_at_a_trailing_newline() -> None:
    with pytest.raises(EnvelopeError):
        parse_bsmtp(b"MAIL FROM:<a@b.example> AUTH=<x+0A@b.example>\n\r\n"
                    b"RCPT TO:<c@d.example>\r\nDATA\r\nhi\r\n.\r\n")
