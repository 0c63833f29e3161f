"""Replies -> per-recipient outcomes: tables, no event loop."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxsend.errors import PermanentFailure, Phase, TemporaryFailure
from mxsend.outcome import (
    DeliveryStatus,
    Where,
    after_every_host,
    failure_outcomes,
    should_try_next_host,
    status_of,
    transaction_outcomes,
)
from mxsend.reply import Reply, default_dsn, parse_reply

WHERE = Where("mx.example.org[192.0.2.1]:25", "mx.example.org", "TLSv1.3")
SENT, DEFERRED, BOUNCED = DeliveryStatus.SENT, DeliveryStatus.DEFERRED, DeliveryStatus.BOUNCED


@pytest.mark.parametrize(("code", "text", "enhanced", "message"), [
    (550, "5.1.1 no such user", "5.1.1", "no such user"),
    (250, "2.0.0 Ok: queued as 12345", "2.0.0", "Ok: queued as 12345"),
    (550, "no such user", None, "no such user"),
    (450, "5.1.1 class mismatch", None, "5.1.1 class mismatch"),  # RFC 3463 §2
    (452, "4.2.2 mailbox full\n4.2.2 try later", "4.2.2", "mailbox full\ntry later"),
    (421, "", None, ""),
    (554, "5.7.01 padded", "5.7.1", "padded"),
])
def test_parse_reply(code, text, enhanced, message):
    reply = parse_reply(code, text)
    assert (reply.code, reply.enhanced, reply.message) == (code, enhanced, message)


def test_reply_str_is_one_line():
    assert str(parse_reply(550, "5.1.1 no\nsuch user")) == "550 5.1.1 no such user"
    assert parse_reply(550, "x").dsn == "5.0.0" and parse_reply(421, "").dsn == "4.4.2"


@given(st.integers(0, 999), st.text(max_size=3000))
def test_parse_reply_never_fails_and_caps_text(code, text):
    reply = parse_reply(code, text)
    assert len(reply.message) <= 1000 and len(str(reply)) <= 1000


@pytest.mark.parametrize(("code", "status"), [
    (250, SENT), (251, SENT), (450, DEFERRED), (421, DEFERRED), (550, BOUNCED),
    (354, DEFERRED), (999, DEFERRED),
])
def test_status_of(code, status):
    assert status_of(code) is status


def test_default_dsn():
    assert [default_dsn(c) for c in (250, 451, 554, None, 302)] == [
        "2.0.0", "4.0.0", "5.0.0", "4.0.0", "4.0.0"]


def _rcpts(**replies: tuple[int, str]) -> dict[str, Reply]:
    return {f"{name}@x.example": parse_reply(*reply) for name, reply in replies.items()}


ADDRS = ["ok@x.example", "gone@x.example", "later@x.example"]
RCPT = _rcpts(ok=(250, "2.1.5 ok"), gone=(550, "5.1.1 gone"), later=(450, "4.2.0 later"))


@pytest.mark.parametrize(("final", "ok_status", "ok_phase"), [
    (parse_reply(250, "2.0.0 queued"), SENT, Phase.DATAEND),
    (parse_reply(554, "5.7.1 spam"), BOUNCED, Phase.DATAEND),
    (parse_reply(451, "4.3.0 later"), DEFERRED, Phase.DATAEND),
    (TemporaryFailure("connection lost (dataend)", dsn="4.4.2", phase=Phase.DATAEND),
     DEFERRED, Phase.DATAEND),
    # Even a "permanent" local error after RCPT only defers: nobody refused the mail.
    (PermanentFailure("odd", dsn="5.0.0", phase=Phase.DATA), DEFERRED, Phase.DATA),
])
def test_transaction_outcomes(final, ok_status, ok_phase):
    outcomes = {o.address: o for o in transaction_outcomes(ADDRS, RCPT, final, WHERE)}
    assert outcomes["gone@x.example"].status is BOUNCED
    assert outcomes["gone@x.example"].dsn == "5.1.1"
    assert outcomes["gone@x.example"].phase is Phase.RCPT
    assert outcomes["later@x.example"].status is DEFERRED
    ok = outcomes["ok@x.example"]
    assert (ok.status, ok.phase) == (ok_status, ok_phase)
    assert ok.relay == WHERE.relay and ok.tls == "TLSv1.3" and ok.remote_mta == "mx.example.org"
    if ok_status is DEFERRED:
        assert ok.dsn.startswith("4.")


def test_never_asked_recipients_are_deferred():
    rcpt = {"a@x.example": parse_reply(250, "ok")}
    lost = TemporaryFailure("connection lost (rcpt)", dsn="4.4.2", phase=Phase.RCPT)
    outcomes = transaction_outcomes(["a@x.example", "b@x.example"], rcpt, lost, WHERE)
    assert [o.status for o in outcomes] == [DEFERRED, DEFERRED]


def test_nothing_accepted_means_no_data_phase():
    rcpt = {"a@x.example": parse_reply(550, "5.1.1 no")}
    [outcome] = transaction_outcomes(["a@x.example"], rcpt, None, WHERE)
    assert outcome.status is BOUNCED


def test_flags_only_on_sent():
    rcpt = {"a@x.example": parse_reply(250, "ok"), "b@x.example": parse_reply(250, "ok")}
    outcomes = transaction_outcomes(
        ["a@x.example", "b@x.example"], rcpt, parse_reply(250, "ok"), WHERE,
        relayed=frozenset({"a@x.example"}), eight_bit_unadvertised=True)
    assert [o.dsn_relayed for o in outcomes] == [True, False]
    assert all(o.eight_bit_unadvertised for o in outcomes)
    deferred = transaction_outcomes(["a@x.example"], rcpt, parse_reply(451, "no"), WHERE,
                                    relayed=frozenset({"a@x.example"}))
    assert not deferred[0].dsn_relayed


def test_failure_outcomes():
    error = PermanentFailure("null MX", dsn="5.1.10", phase=Phase.DNS, host="x.example")
    outcomes = failure_outcomes(["a@x.example", "b@x.example"], error)
    assert [(o.status, o.dsn, o.relay) for o in outcomes] == [(BOUNCED, "5.1.10", None)] * 2
    [temp] = failure_outcomes(["a@x.example"], TemporaryFailure("refused", phase=Phase.CONNECT))
    assert temp.status is DEFERRED and temp.dsn == "4.0.0"


def test_should_try_next_host():
    deferred = failure_outcomes(["a@x.example"], TemporaryFailure("x"))
    bounced = failure_outcomes(["a@x.example"], PermanentFailure("x"))
    assert should_try_next_host(deferred)
    assert not should_try_next_host(deferred + bounced)
    assert not should_try_next_host(bounced)


def _greeting(code: int) -> list:
    failure = (PermanentFailure if code >= 500 else TemporaryFailure)(
        f"{code} go away", code=code, phase=Phase.GREETING)
    return failure_outcomes(["a@x.example", "b@x.example"], failure, WHERE)


def test_a_5xx_greeting_moves_on_to_the_next_host():
    # Postfix's smtp_skip_5xx_greeting: "not this server", not "not this recipient".
    assert should_try_next_host(_greeting(554))
    assert should_try_next_host(_greeting(421))
    mail_refused = failure_outcomes(["a@x.example"], PermanentFailure("no", phase=Phase.MAIL))
    assert not should_try_next_host(mail_refused)


@pytest.mark.parametrize(("codes", "status"), [
    ((554,), BOUNCED), ((554, 554), BOUNCED), ((554, 421), DEFERRED),
    ((421, 554), DEFERRED), ((421, 554, 554), DEFERRED), ((421,), DEFERRED),
])
def test_after_every_host_bounces_only_if_every_greeting_refused(codes, status):
    outcomes = after_every_host([_greeting(code) for code in codes])
    assert [o.status for o in outcomes] == [status, status]


@given(st.sampled_from([250, 354, 421, 451, 550, 199]),
       st.text(alphabet="2450.19 \tx", max_size=14) | st.text(max_size=8))
def test_one_line_replies_parse_as_the_general_path_does(code: int, text: str) -> None:
    # A trailing newline sends the text down the multi-line path, which strips it.
    one_line = text.replace("\n", " ")
    assert parse_reply(code, one_line) == parse_reply(code, one_line + "\n")
