"""The parser's fast paths agree with its exact checks, on plain and hostile input.

Each fast path in mxsend/envelope.py and mxsend/addresses.py accepts a subset of what
the exact checks accept, with the same result; everything else falls through to the
exact checks. These
properties compare the public function (fast path first) with the exact one alone, on
text built to sit on both sides of every rule the fast paths encode (lengths of 63, 64
and 255, leading and trailing hyphens and dots, quotes, brackets, controls, non-ASCII).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mxsend import addresses, envelope
from mxsend.addresses import (
    _HOST_NAME,
    CONTROL,
    _labels_valid,
    _parse_path_exactly,
    _validate_mailbox_exactly,
    parse_path,
    validate_mailbox,
)
from mxsend.envelope import (
    _BARE_LF,
    _find_terminator,
    _path_end,
    _path_end_scanning,
    _split_command,
    _split_command_exactly,
    _unstuff,
    parse_bsmtp,
    unstuff,
)
from mxsend.errors import EnvelopeError


def outcome(function: Callable[[], object]) -> tuple[str, object]:
    try:
        return "ok", function()
    except EnvelopeError as exc:
        return "error", str(exc)


# Characters that matter to some rule, plus ordinary ones.
_TRICKY = "aZ09-._+=!#~'`|{}@<>\"\\[]:,; \t\r\n\x00\x7f\x85\xa0éü日"
_piece = st.one_of(
    st.text(alphabet="abcxyz019-", min_size=0, max_size=70),  # near the 63/64 limits
    st.text(alphabet=_TRICKY, max_size=6),
    st.sampled_from(["a" * 63, "a" * 64, "b" * 62 + "-", "-x", "x-", "xn--d1a", ".", ".."]),
)
_joined = st.lists(_piece, max_size=6).map("".join)
_plainish = st.builds(
    lambda local, domain: f"{local}@{domain}",
    st.lists(st.text(alphabet="abc!#$%&'*+/=?^_`{|}~-.", min_size=1, max_size=30),
             min_size=1, max_size=3).map(".".join),
    st.lists(st.text(alphabet="abcXYZ019-", min_size=1, max_size=65), min_size=1,
             max_size=5).map(".".join),
)
_mailbox_text = st.one_of(_plainish, _joined, st.builds(lambda a, b: a + "@" + b,
                                                         _joined, _joined))


@given(_mailbox_text, st.booleans())
@example("a" * 64 + "@b.test", False)
@example("a" * 65 + "@b.test", False)
@example("a@" + ".".join(["b" * 63] * 4), False)  # 255 octets
@example("a@" + ".".join(["b" * 63] * 4) + "c", False)  # 256
@example("a@b\n", False)  # the exact check's `$` takes a final LF: the fast path must not
@example("a@b-.test", False)
@example("a@-b.test", False)
@example("a@b..test", False)
@example("a.@b.test", False)
@example("a@b.test.", False)
def test_validate_mailbox_fast_path_agrees(text: str, utf8: bool) -> None:
    assert outcome(lambda: validate_mailbox(text, utf8=utf8)) == outcome(
        lambda: _validate_mailbox_exactly(text, utf8=utf8))


@given(st.one_of(_mailbox_text.map(lambda t: f"<{t}>"), _joined), st.booleans(),
       st.booleans())
@example("<" + "a" * 64 + "@" + ".".join(["b" * 63] * 3) + ".cc>", False, False)  # 258
@example("<" + "a" * 64 + "@" + ".".join(["b" * 63] * 3) + ".ccc>", False, False)  # 259
@example("<@r.test:a@b.test>", False, False)
@example("<>", True, False)
@example("<", True, False)
@example(">", True, False)
def test_parse_path_fast_path_agrees(text: str, allow_null: bool, utf8: bool) -> None:
    assert outcome(lambda: parse_path(text, allow_null=allow_null, utf8=utf8)) == outcome(
        lambda: _parse_path_exactly(text, allow_null=allow_null, utf8=utf8))


@given(st.one_of(_joined, _plainish.map(lambda a: a.partition("@")[2])))
@example("b" * 63)
@example("b" * 64)
@example("é" * 63)
@example("a\n")
def test_whole_host_name_regex_implies_the_label_rule(domain: str) -> None:
    if _HOST_NAME.fullmatch(domain):
        assert _labels_valid(domain)


_keyword = st.one_of(st.sampled_from(["SIZE", "size", "NOTIFY", "ORCPT", "RET", "ENVID",
                                      "AUTH", "BODY", "SMTPUTF8", "X-Y", "-X", "9"]),
                     st.text(alphabet="aZ9-=_ é", min_size=0, max_size=5))
_value = st.one_of(st.text(alphabet="aZ09=+;@.,", min_size=1, max_size=8),
                   st.text(alphabet="aZ09=+;<>\"@.,", max_size=12), st.text(max_size=5))
_param = st.builds(lambda k, eq, v: k + ("=" + v if eq else ""), _keyword, st.booleans(),
                   _value)
# Half of the lines are written as serialise_bsmtp writes them, the other half not quite.
_command = st.builds(
    lambda verb, sep, path, params, seps: verb + sep + path + "".join(
        s + p for s, p in zip(seps, params, strict=False)),
    st.one_of(st.sampled_from(["MAIL FROM", "RCPT TO"]),
              st.sampled_from(["mail from", "MAIL  FROM", "RCPT TO ", "DATA"])),
    st.one_of(st.just(":"), st.sampled_from([": ", " :"])),
    st.one_of(_plainish.map(lambda t: f"<{t}>"), _mailbox_text.map(lambda t: f"<{t}>"),
              _joined,
              st.sampled_from(['<"a>b"@c.test>', "<a@b.test>>", "<>", "<a@b.test>x"])),
    st.lists(_param, max_size=3),
    st.one_of(st.just([" "] * 4),
              st.lists(st.sampled_from([" ", "  ", "\t", "", "\r", "\xa0"]), min_size=4,
                       max_size=4)),
)


@given(st.one_of(_command.map(lambda s: s.encode("utf-8", "surrogatepass")),
                 st.binary(max_size=60)))
@settings(max_examples=500)
@example(b"MAIL FROM:<a@b.test> SIZE=1 RET=HDRS")
@example(b"RCPT TO:<a@b.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b.test")
@example(b"MAIL FROM:<a@b.test> SIZE=")
@example(b"MAIL FROM:<a@b.test> =1")
@example(b"MAIL FROM:<a@b.test> SIZE==1")
@example(b"MAIL FROM:<a@b.test>  SIZE=1")
@example(b"MAIL FROM:<a@b.test> SIZE=1 ")
@example(b"MAIL FROM:<a@b.test>SIZE=1")
@example(b'MAIL FROM:<a@b.test> X="a>b"')
@example(b"MAIL FROM:<a@b.test>\x7f")
@example(b"MAIL FROM:<>")
def test_split_command_fast_path_agrees(line: bytes) -> None:
    assert outcome(lambda: _split_command(line, 3)) == outcome(
        lambda: _split_command_exactly(line, 3))


def test_typical_lines_take_the_fast_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("slow path taken")

    monkeypatch.setattr(envelope, "_split_command_exactly", refuse)
    for name in ("_parse_path_exactly", "_validate_mailbox_exactly", "_labels_valid"):
        monkeypatch.setattr(addresses, name, refuse)
    raw = (b"EHLO client.example.com\r\nMAIL FROM:<alice.smith@example.com> SIZE=1234\r\n"
           b"RCPT TO:<bob@mail.example.org> NOTIFY=SUCCESS,FAILURE\r\n"
           b"RCPT TO:<carol+news@sub-1.example.net>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    message = parse_bsmtp(raw)
    assert [r.address for r in message.envelope.recipients] == [
        "bob@mail.example.org", "carol+news@sub-1.example.net"]


# --- the other shortcuts ----------------------------------------------------------------


@given(st.text(alphabet=_TRICKY, max_size=30) | st.text(max_size=30))
def test_control_regex_is_the_character_rule(text: str) -> None:
    assert bool(CONTROL.search(text)) == any(ord(c) < 32 or ord(c) == 127 for c in text)


@given(st.text(alphabet='<>"\\a@ ', max_size=20))
def test_path_end_shortcut(text: str) -> None:
    assert _path_end(text) == _path_end_scanning(text)


_OLD_BARE_LF = re.compile(rb"(?<!\r)\n")


@given(st.binary(max_size=1) | st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n"]),
                                         max_size=20).map(b"".join))
def test_bare_lf_regex_matches_as_before(data: bytes) -> None:
    assert _BARE_LF.sub(b"\r\n", data) == _OLD_BARE_LF.sub(b"\r\n", data)
    assert bool(_BARE_LF.search(data)) == bool(_OLD_BARE_LF.search(data))


@given(st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"..", b"\n.", b"\n.\n"]),
                max_size=20).map(b"".join))
def test_terminator_knows_whether_a_dot_line_was_skipped(block: bytes) -> None:
    raw = block + b"\r\n.\r\n"
    end, after, stuffed = _find_terminator(raw, 0)
    assert end >= 0 and after > end
    assert _unstuff(raw[:end], stuffed) == unstuff(raw[:end])
    assert stuffed == (b"\n." in raw[:end])


@given(st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"..", b"\n.", b"\n.\n"]),
                max_size=20).map(b"".join))
@example(b"x\n.")
@example(b".")
@example(b"x\n.\r")
def test_terminator_needs_a_line_end_after_the_dot(data: bytes) -> None:
    _, after, _ = _find_terminator(data, 0)
    lines = re.split(rb"(?<=\n)", data)  # pieces ending in LF, then the rest
    expected = -1
    position = 0
    for line in lines:
        position += len(line)
        if line in (b".\n", b".\r\n"):
            expected = position
            break
    assert after == expected
    if data.endswith(b"\n."):
        assert after < len(data)  # a cut "." never ends the message
