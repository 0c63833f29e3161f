"""VPOP3 8.8's hooks as values (hooks.py, contract §9): what each answer means.

Tables, no event loop and no Lua: the values are what the worker hands back (None for
nil, bool, float for a number, str for a string, ListResult for a table).
"""

from __future__ import annotations

import math

import pytest

from mxsend.errors import Phase
from mxsend.hooks import (
    HOLD_CAP,
    BadReturnPath,
    ListResult,
    Overrides,
    ServerVerdict,
    SmartHost,
    allowed,
    command_of,
    full_response,
    hold_minutes,
    read_overrides,
    read_verdict,
    replacement,
    return_path,
    smart_hosts,
    use_cache,
)

# --- ReturnCodeHandler ---------------------------------------------------------------


@pytest.mark.parametrize(("answer", "expected"), [
    ("450 4.2.0 later", (450, "4.2.0 later")),
    ("250", (250, "")),
    ("550-", (550, "")),
    ("221 bye\r\n", (221, "bye")),  # a final CRLF adds no empty line
    # Several lines, each with its code, CRLF or LF between them: the text as the wire
    # parser gives it (lines without their codes).
    ("450-first\r\n450 second", (450, "first\nsecond")),
    ("450-first\n450-second\n450 third", (450, "first\nsecond\nthird")),
    # A line with another code keeps it: only the first line's code counts.
    ("450-first\r\n550 second", (450, "first\n550 second")),
    ("450-first\r\nsecond", (450, "first\nsecond")),
    # Control characters become spaces; the text is for people, the code decides.
    ("550 5.1.1 a\x00b\x1bc", (550, "5.1.1 a b c")),
    ("550 \tpadded\t ", (550, "padded")),
    # Three digits are all the contract asks; a code outside 2xx-5xx is deferred later
    # (outcome.status_of), never delivered.
    ("999 odd", (999, "odd")),
    ("000", (0, "")),
])
def test_a_string_with_three_digits_replaces_the_reply(answer: str,
                                                         expected: tuple[int, str]) -> None:
    assert replacement(answer) == expected


@pytest.mark.parametrize("answer", [
    None, True, False, 450.0, 250, "", "45", "45x later", "4500 x", "450x", " 450 x",
    "450\tx", "OK", "4.2.0 450", "\r\n450 x", "ⅰⅱⅲ roman", "٤٥٠ arabic digits",
    ListResult("450 from a table"),
])
def test_anything_else_keeps_the_server_reply(answer: object) -> None:
    assert replacement(answer) is None


def test_a_long_replacement_is_capped() -> None:
    code, text = replacement("450 " + "x" * 100_000) or (0, "")
    assert code == 450 and len(text) < 5000


@pytest.mark.parametrize(("phase", "line", "command"), [
    (Phase.GREETING, b"", "CONNECT"),
    (Phase.EHLO, b"EHLO out.example\r\n", "EHLO"),
    (Phase.EHLO, b"HELO out.example\r\n", "HELO"),
    (Phase.STARTTLS, b"STARTTLS\r\n", "STARTTLS"),
    (Phase.MAIL, b"", "MAIL FROM"),
    (Phase.MAIL, b"RSET\r\n", "RSET"),
    (Phase.MAIL, b"QUIT\r\n", "QUIT"),
    (Phase.RCPT, b"", "RCPT TO"),
    (Phase.RCPT, b"rcpt TO:<a@b>\r\n", "RCPT TO"),
    (Phase.DATA, b"", "DATA"),
    (Phase.DATAEND, b"", "."),
    (Phase.DATAEND, b".\r\n", "."),
])
def test_last_command(phase: Phase, line: bytes, command: str) -> None:
    assert command_of(phase, line) == command


@pytest.mark.parametrize(("code", "text", "full", "last"), [
    (250, "ok", "250 ok", "250 ok"),
    (250, "", "250", "250"),
    (250, "mx.example\nPIPELINING\nSIZE 100", "250-mx.example\r\n250-PIPELINING\r\n"
     "250 SIZE 100", "250 SIZE 100"),
    (550, "5.1.1 no\n", "550-5.1.1 no\r\n550", "550"),
])
def test_full_response_and_last_line(code: int, text: str, full: str, last: str) -> None:
    assert full_response(code, text) == (full, last)


def test_a_reply_survives_the_round_trip_through_the_script_unchanged() -> None:
    # A script that returns FullResponse as it got it changes nothing.
    for code, text in [(250, "ok"), (450, "4.2.0 a\nb"), (550, "5.1.1 x\ny\nz")]:
        assert replacement(full_response(code, text)[0]) == (code, text)


# --- ModifyReturnPath -----------------------------------------------------------------


@pytest.mark.parametrize(("answer", "sender"), [
    (None, None),
    ("srs0=x=y@relay.test", "srs0=x=y@relay.test"),
    ("<bounce@relay.test>", "bounce@relay.test"),
    ("  bounce@relay.test  ", "bounce@relay.test"),
    ("jörg@relay.test", "jörg@relay.test"),
])
def test_return_path_answers(answer: object, sender: str | None) -> None:
    assert return_path(answer) == sender


@pytest.mark.parametrize(("answer", "why"), [
    ("", "empty"), ("<>", "empty"), ("   ", "empty"),
    ("a\r\nb@x.test", "control"), ("a@x.test\r\nRCPT TO:<c@d>", "control"),
    ("a b@x.test", "not valid"), ("no-at-sign", "not valid"), ("a@", "not valid"),
    (12.0, "float"), (True, "bool"), (ListResult("a@x.test"), "table"),
])
def test_a_bad_return_path_is_refused_never_null(answer: object, why: str) -> None:
    with pytest.raises(BadReturnPath, match=why):
        return_path(answer)


# --- GetOverrides ---------------------------------------------------------------------


def _host(host: str, port: int | None = None, literal: bool = False) -> SmartHost:
    return SmartHost(host, port, literal)


@pytest.mark.parametrize(("servers", "hosts"), [
    ("", ()),
    ("  ", ()),
    ("mx.example.test", (_host("mx.example.test"),)),
    ("MX.Example.TEST.", (_host("mx.example.test"),)),
    ("mx.example.test:2525", (_host("mx.example.test", 2525),)),
    ("[192.0.2.1]", (_host("192.0.2.1", None, True),)),
    ("[192.0.2.1]:26", (_host("192.0.2.1", 26, True),)),
    ("192.0.2.1", (_host("192.0.2.1", None, True),)),
    ("192.0.2.1:26", (_host("192.0.2.1", 26, True),)),
    ("[2001:DB8::1]:25", (_host("2001:db8::1", 25, True),)),
    ("[IPv6:2001:db8::1]", (_host("2001:db8::1", None, True),)),
    ("2001:db8::1", (_host("2001:db8::1", None, True),)),  # bare: no port possible
    # Separated by spaces, commas or both, in order, duplicates kept as given.
    ("a.test b.test:26", (_host("a.test"), _host("b.test", 26))),
    ("a.test,b.test", (_host("a.test"), _host("b.test"))),
    (" a.test ,, b.test ,\t[192.0.2.9]:2600 ",
     (_host("a.test"), _host("b.test"), _host("192.0.2.9", 2600, True))),
    # A Lua table arrives as its items joined by "\n".
    (ListResult("a.test\n[192.0.2.1]:26"), (_host("a.test"), _host("192.0.2.1", 26, True))),
    ("a.test\r\nb.test", (_host("a.test"), _host("b.test"))),
])
def test_servers(servers: str, hosts: tuple[SmartHost, ...]) -> None:
    assert smart_hosts(servers) == hosts


@pytest.mark.parametrize("servers", [
    "host:0", "host:65536", "host:abc", "host:", "host:-1", "host:25:26",
    "[192.0.2.1", "[192.0.2.1]x", "[192.0.2.1]:", "[192.0.2.1]:99999", "[]",
    "[not-an-ip]:25", "[192.0.2.300]", "-host.test", "host_.test!", "ho$t.test",
    "good.test bad!", "a..b/c",
])
def test_a_bad_entry_is_refused_naming_it(servers: str) -> None:
    with pytest.raises(ValueError, match="not a"):
        smart_hosts(servers)


def test_smart_host_name_shows_brackets_for_an_address() -> None:
    assert [h.name for h in smart_hosts("[192.0.2.1]:26 mx.test 2001:db8::1")] == [
        "[192.0.2.1]", "mx.test", "[2001:db8::1]"]


@pytest.mark.parametrize(("servers", "proceed", "expected"), [
    (None, None, Overrides()),  # nil: the MX records
    (None, True, Overrides()),
    (False, None, Overrides()),
    ("", True, Overrides()),  # an empty string or table: the MX records
    (ListResult(""), None, Overrides()),
    ("mx.test", None, Overrides((_host("mx.test"),))),  # Continue nil goes on
    ("mx.test", True, Overrides((_host("mx.test"),))),
    ("mx.test", 0.0, Overrides((_host("mx.test"),))),  # only false itself stops
    ("mx.test", "false", Overrides((_host("mx.test"),))),
    ("mx.test", False, Overrides(proceed=False)),  # Servers do not matter then
    (None, False, Overrides(proceed=False)),
    (12.0, False, Overrides(proceed=False)),
])
def test_overrides_and_continue(servers: object, proceed: object,
                                expected: Overrides) -> None:
    assert read_overrides(servers, proceed) == expected


@pytest.mark.parametrize("servers", [12.0, True, "mx.test bad!"])
def test_servers_that_are_no_list_are_an_error(servers: object) -> None:
    with pytest.raises(ValueError):
        read_overrides(servers, True)


# --- CheckServer and GetCheckCache -----------------------------------------------------


@pytest.mark.parametrize(("value", "default", "expected"), [
    (None, True, True), (None, False, False),  # nil: DefaultResult
    (True, False, True), (False, True, False),
    (1.0, False, True), (0.0, True, False), (-1.0, False, True), (0.5, False, True),
    ("0", True, False), ("false", True, False), ("no", True, False), ("NO ", True, False),
    ("1", False, True), ("yes", False, True), ("true", False, True),
    (math.nan, True, True), (math.nan, False, False),  # NaN says nothing: the default
    ("maybe", True, True), ("maybe", False, False),
    (ListResult("0"), True, True),  # a table: the default
])
def test_allowed(value: object, default: bool, expected: bool) -> None:
    assert allowed(value, default) is expected


@pytest.mark.parametrize(("value", "minutes"), [
    (None, 0.0), (30.0, 30.0), (30, 30.0), (0.5, 0.5), ("30", 30.0), (" 15 ", 15.0),
    (0.0, 0.0), (-5.0, 0.0), ("-5", 0.0), (math.nan, 0.0), ("nan", 0.0),
    (math.inf, HOLD_CAP), ("inf", HOLD_CAP), (1e300, HOLD_CAP),
    (True, 0.0), (False, 0.0), ("soon", 0.0), ("", 0.0), (ListResult("30"), 0.0),
])
def test_hold_minutes(value: object, minutes: float) -> None:
    assert hold_minutes(value) == minutes


@pytest.mark.parametrize(("allowed_", "hold", "default", "verdict"), [
    (None, None, True, ServerVerdict(True, 0.0)),
    (None, None, False, ServerVerdict(False, 0.0)),
    (False, 0.0, True, ServerVerdict(False, 0.0)),
    # A hold wins whatever Allowed says (contract §9): the deliverer checks it first.
    (False, 30.0, True, ServerVerdict(False, 30.0)),
    (True, 30.0, True, ServerVerdict(True, 30.0)),
    (True, -30.0, True, ServerVerdict(True, 0.0)),
    (math.nan, math.nan, False, ServerVerdict(False, 0.0)),
])
def test_check_server_verdict(allowed_: object, hold: object, default: bool,
                              verdict: ServerVerdict) -> None:
    assert read_verdict(allowed_, hold, default) == verdict


@pytest.mark.parametrize(("value", "cached"), [
    (None, True), (True, True), (1.0, True), ("maybe", True), (math.nan, True),
    (False, False), (0.0, False), ("false", False), ("0", False),
])
def test_get_check_cache(value: object, cached: bool) -> None:
    assert use_cache(value) is cached
