"""The delivery engine against real aiosmtpd receivers on 127.0.0.x with real TLS.

DNS is out of scope here (test_mx covers it): a static resolver maps test domains to
MxHost lists. Everything SMTP is real: sockets, STARTTLS, certificates, timeouts.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest

from mxsend.actions import ServerActions, ServerParameters, Timeouts
from mxsend.batv import BatvKey, verify
from mxsend.config import Config, config_from_mapping
from mxsend.delivery import Deliverer
from mxsend.envelope import Envelope, Message, Recipient
from mxsend.errors import DeliveryError, PermanentFailure, Phase
from mxsend.mx import MxHost, Resolver, literal_host
from mxsend.outcome import DeliveryStatus, RecipientOutcome
from mxsend.pool import Backoff, ConnectionPool
from tests.fixtures.daemon import TEST_DESTINATIONS
from tests.fixtures.dns_server import DnsTestServer
from tests.fixtures.smtp_receiver import WITH_IPV6, Behaviour, ReceiverGroup, TlsCa

FAST = Timeouts(connect=3, greeting=3, ehlo=3, starttls=3, mail=3, rcpt=3, data=3,
                datablock=3, dataend=3)
BODY = (b"From: alice@example.com\r\nSubject: test\r\n\r\nhello\r\n.leading dot\r\n"
        b"..two dots\r\n.\r\nlast\r\n")


class StaticResolver:
    """domain -> MxHost list (or an error); address literals as mx.py does them."""

    def __init__(self, table: dict[str, list[MxHost] | DeliveryError]) -> None:
        self.table = table

    async def resolve(self, domain: str) -> list[MxHost]:
        literal = literal_host(domain, ipv6=True)
        if literal is not None:
            return [literal]
        entry = self.table[domain]
        if isinstance(entry, DeliveryError):
            raise entry
        return entry


def mx(name: str, *addresses: str, preference: int = 10) -> MxHost:
    return MxHost(name=name, preference=preference, addresses=tuple(addresses))


def config(port: int, **smtp: Any) -> Config:
    values: dict[str, Any] = {"port": port, "helo_name": "client.example.com",
                              "allowed_destinations": list(TEST_DESTINATIONS)}
    values.update(smtp)
    return config_from_mapping({"smtp": values})


def message(*rcpts: str | Recipient, sender: str = "alice@example.com",
            data: bytes = BODY, **envelope: Any) -> Message:
    recipients = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in rcpts)
    return Message(Envelope(sender=sender, recipients=recipients, **envelope), data)


class Details:
    """A ServerDetails stand-in: fixed actions, and a record of the parameters."""

    def __init__(self, **actions: Any) -> None:
        actions.setdefault("timeouts", FAST)
        self.actions = ServerActions(**actions)
        self.calls: list[ServerParameters] = []

    async def __call__(self, params: ServerParameters,
                       preset: Callable[[ServerActions], ServerActions]) -> ServerActions:
        self.calls.append(params)
        return preset(self.actions)


async def deliver(deliverer: Deliverer, msg: Message, domain: str = "example.org",
                  details: Details | None = None) -> list[RecipientOutcome]:
    recipients = [r for r in msg.envelope.recipients]
    return await deliverer.deliver("Q1", msg, recipients, domain, details or Details())


@pytest.fixture
async def make(smtp_receivers: ReceiverGroup) -> Any:
    """make(table, **smtp config) -> Deliverer; closed at teardown."""
    made: list[Deliverer] = []

    def factory(table: dict[str, list[MxHost] | DeliveryError] | None = None,
                batv_key: bytes | None = None, **smtp: Any) -> Deliverer:
        deliverer = Deliverer(config(smtp_receivers.port, **smtp), StaticResolver(table or {}),
                              batv_key=batv_key)
        made.append(deliverer)
        return deliverer

    yield factory
    for deliverer in made:
        await deliverer.close()


def statuses(outcomes: Sequence[RecipientOutcome]) -> dict[str, DeliveryStatus]:
    return {o.address: o.status for o in outcomes}


def commands(receiver: Any) -> list[str]:
    return [c.split(" ")[0] for s in receiver.sessions for c in s.commands]


# --- what arrives ------------------------------------------------------------------------


async def test_plain_delivery_arrives_byte_for_byte(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    data = BODY + "naïve 8-bit line\r\n".encode() + b"\r\n.\r\n..\r\nend"
    data += b"\r\n"
    outcomes = await deliver(deliverer, message("bob@example.org", "carol@example.org",
                                                data=data))
    assert statuses(outcomes) == {"bob@example.org": DeliveryStatus.SENT,
                                  "carol@example.org": DeliveryStatus.SENT}
    [received] = await server.async_wait_for(1)
    assert received.data == data
    assert received.mail_from == "alice@example.com"
    assert received.rcpts == ["bob@example.org", "carol@example.org"]
    assert received.session.hello == "EHLO"
    assert received.session.helo_name == "client.example.com"
    assert "BODY=8BITMIME" in received.mail_params
    first = outcomes[0]
    assert first.relay == f"mx1.example.org[127.0.0.2]:{smtp_receivers.port}"
    assert first.remote_mta == "mx1.example.org"
    assert first.tls is None and first.dsn == "2.0.0" and first.phase is Phase.DATAEND
    assert first.response.startswith("250 2.0.0")


async def test_starttls_when_offered_and_reported(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", tls=True)
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.SENT
    assert outcome.tls in ("TLSv1.2", "TLSv1.3")
    [received] = await server.async_wait_for(1)
    assert received.session.tls and received.session.tls_version == outcome.tls
    # RFC 3207 §4.2: EHLO again after the handshake.
    assert commands(server)[:3] == ["EHLO", "STARTTLS", "EHLO"]


async def test_try_tls_off_stays_plaintext(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", tls=True)
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"),
                              details=Details(try_tls=False))
    assert outcome.status is DeliveryStatus.SENT and outcome.tls is None
    assert "STARTTLS" not in commands(server)


async def test_try_esmtp_off_says_helo(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", tls=True)
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"),
                              details=Details(try_esmtp=False, helo_name="script.example.net"))
    assert outcome.status is DeliveryStatus.SENT
    [received] = await server.async_wait_for(1)
    assert received.session.hello == "HELO"
    assert received.session.helo_name == "script.example.net"
    assert received.mail_params == []  # no ESMTP, no parameters
    assert "EHLO" not in commands(server)


async def test_ehlo_refused_falls_back_to_helo(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(esmtp=False))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.SENT
    assert commands(server)[:2] == ["EHLO", "HELO"]


async def test_dsn_parameters_only_when_allowed_and_offered(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    rcpt = Recipient("bob@example.org", notify=("SUCCESS", "FAILURE"),
                     orcpt="rfc822;bob@example.org")
    msg = message(rcpt, ret="HDRS", envid="QQ314159")
    [outcome] = await deliver(deliverer, msg)
    assert outcome.status is DeliveryStatus.SENT and not outcome.dsn_relayed
    [received] = await server.async_wait_for(1)
    assert {"RET=HDRS", "ENVID=QQ314159"} <= set(received.mail_params)
    assert received.rcpt_params["bob@example.org"] == [
        "NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@example.org"]

    [outcome] = await deliver(deliverer, msg, details=Details(allow_dsn=False))
    [_, second] = await server.async_wait_for(2)
    assert not any(p.startswith(("RET=", "ENVID=")) for p in second.mail_params)
    assert second.rcpt_params["bob@example.org"] == []
    assert outcome.dsn_relayed  # RFC 3461 §4.1: NOTIFY=SUCCESS, no DSN on the way


async def test_server_without_dsn_gets_no_dsn_parameters(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(dsn=False))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    rcpt = Recipient("bob@example.org", notify=("SUCCESS",))
    [outcome] = await deliver(deliverer, message(rcpt, ret="FULL"))
    [received] = await server.async_wait_for(1)
    assert "RET=FULL" not in received.mail_params
    assert received.rcpt_params["bob@example.org"] == []
    assert outcome.status is DeliveryStatus.SENT and outcome.dsn_relayed


@pytest.mark.parametrize(("modifier", "expected"), [
    (0, "alice@example.com"), (1, "bounces@example.com"), (2, ""),
])
async def test_return_address_modifier(smtp_receivers, make, modifier, expected):
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    details = Details(return_address_modifier=modifier,
                      default_return_address="bounces@example.com", null_return_address="")
    [outcome] = await deliver(deliverer, message("bob@example.org"), details=details)
    assert outcome.status is DeliveryStatus.SENT
    [received] = await server.async_wait_for(1)
    assert received.mail_from == expected


async def test_batv_signs_the_return_path_but_never_the_null_sender(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2")
    key = b"s3cret-batv-key"
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]}, batv_key=key)
    await deliver(deliverer, message("bob@example.org"), details=Details(use_batv=True))
    await deliver(deliverer, message("bob@example.org", sender=""),
                  details=Details(use_batv=True))
    [signed, null] = await server.async_wait_for(2)
    assert signed.mail_from.startswith("prvs=") and signed.mail_from.endswith(
        "=alice@example.com")
    result = verify(signed.mail_from, BatvKey(key), time.time())
    assert result.valid and result.address == "alice@example.com"
    assert null.mail_from == ""


async def test_batv_without_a_key_holds_the_mail(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"),
                              details=Details(use_batv=True))
    assert outcome.status is DeliveryStatus.DEFERRED
    assert "batv.key_file" in outcome.response
    assert server.sessions == []  # nothing unsigned went out


async def test_server_details_gets_the_parameters(smtp_receivers, make):
    smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    details = Details()
    await deliver(deliverer, message("bob@example.org", auth="alice@example.com"),
                  details=details)
    [params] = details.calls
    assert params.server == "mx1.example.org" and params.domain == "example.org"
    assert params.originator == "alice@example.com" and params.authsender == "alice@example.com"
    assert params.length == len(BODY)
    assert params.connection == f"mx1.example.org[127.0.0.2]:{smtp_receivers.port}"


# --- local refusals before sending --------------------------------------------------------


async def test_too_big_for_advertised_size_bounces_before_mail(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(size=20))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.BOUNCED and outcome.dsn == "5.3.4"
    assert "MAIL" not in commands(server)


async def test_size_parameter_sent_when_within_limit(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(size=10_000))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    await deliver(deliverer, message("bob@example.org"))
    [received] = await server.async_wait_for(1)
    assert f"SIZE={len(BODY)}" in received.mail_params


async def test_smtputf8_needed_but_not_offered_bounces(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(smtputf8=False))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("jürgen@example.org"))
    assert outcome.status is DeliveryStatus.BOUNCED and outcome.dsn == "5.6.7"
    assert "MAIL" not in commands(server)


async def test_smtputf8_used_when_offered(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("jürgen@example.org"))
    assert outcome.status is DeliveryStatus.SENT
    [received] = await server.async_wait_for(1)
    assert "SMTPUTF8" in received.mail_params and received.rcpts == ["jürgen@example.org"]


async def test_8bit_without_8bitmime_is_sent_and_flagged(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(eightbitmime=False))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    data = "Subject: x\r\n\r\nnaïve\r\n".encode()
    [outcome] = await deliver(deliverer, message("bob@example.org", data=data))
    assert outcome.status is DeliveryStatus.SENT and outcome.eight_bit_unadvertised
    [received] = await server.async_wait_for(1)
    assert received.data == data and not any(p.startswith("BODY") for p in received.mail_params)


@pytest.mark.parametrize("helo", ["bad\r\nMAIL FROM:<x@y>", "two words"])
async def test_helo_name_with_control_characters_never_reaches_the_wire(smtp_receivers, make,
                                                                          helo):
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"),
                              details=Details(helo_name=helo))
    assert outcome.status is DeliveryStatus.DEFERRED
    assert server.sessions == []


async def test_return_address_with_crlf_is_refused(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    details = Details(return_address_modifier=1,
                      default_return_address="a@b.example\r\nRCPT TO:<evil@x.example>")
    [outcome] = await deliver(deliverer, message("bob@example.org"), details=details)
    assert outcome.status is DeliveryStatus.DEFERRED
    assert "MAIL" not in commands(server)


# --- failures, per recipient ---------------------------------------------------------------


async def test_connection_refused_defers_with_relay(smtp_receivers, make):
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.9")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.DEFERRED
    assert outcome.phase is Phase.CONNECT and outcome.dsn == "4.4.1"
    assert outcome.relay == f"mx1.example.org[127.0.0.9]:{smtp_receivers.port}"
    # The refused address is now in backoff: the next attempt does not even connect.
    [again] = await deliver(deliverer, message("bob@example.org"))
    assert "backoff" in again.response


async def test_dns_failure_becomes_an_outcome_without_relay(make):
    deliverer = make({"example.org": PermanentFailure(
        "example.org: no such domain", dsn="5.1.2", phase=Phase.DNS, host="example.org")})
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.BOUNCED and outcome.relay is None
    assert outcome.dsn == "5.1.2" and outcome.phase is Phase.DNS


async def test_421_greeting_defers_and_backs_off(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(
        greeting="421 4.3.2 too busy"))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.DEFERRED
    assert outcome.phase is Phase.GREETING and outcome.response == "421 4.3.2 too busy"
    await deliver(deliverer, message("bob@example.org"))
    assert len(server.sessions) == 1  # backoff: not hammered


async def test_rcpt_replies_decide_per_recipient(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(rcpt={
        "gone@example.org": "550 5.1.1 no such user",
        "full@example.org": "452 4.2.2 mailbox full",
    }))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    outcomes = await deliver(deliverer, message(
        "bob@example.org", "gone@example.org", "full@example.org"))
    by = {o.address: o for o in outcomes}
    assert by["bob@example.org"].status is DeliveryStatus.SENT
    assert by["gone@example.org"].status is DeliveryStatus.BOUNCED
    assert by["gone@example.org"].dsn == "5.1.1"
    assert by["gone@example.org"].response == "550 5.1.1 no such user"
    assert by["gone@example.org"].phase is Phase.RCPT
    assert by["full@example.org"].status is DeliveryStatus.DEFERRED
    [received] = await server.async_wait_for(1)
    assert received.rcpts == ["bob@example.org"]


async def test_all_recipients_refused_sends_no_data(smtp_receivers, make):
    # Without PIPELINING the client learns first and never says DATA.
    server = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(
        rcpt={"*": "550 5.7.1 relaying denied"}, pipelining=False))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    outcomes = await deliver(deliverer, message("a@example.org", "b@example.org"))
    assert {o.status for o in outcomes} == {DeliveryStatus.BOUNCED}
    assert "DATA" not in commands(server)


async def test_all_recipients_refused_pipelined_sends_no_message(smtp_receivers, make):
    # RFC 2920 §3.1: DATA went with the group; the server refuses it for want of
    # recipients, and not a byte of the message follows.
    server = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(
        rcpt={"*": "550 5.7.1 relaying denied"}))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    outcomes = await deliver(deliverer, message("a@example.org", "b@example.org"))
    assert {o.status for o in outcomes} == {DeliveryStatus.BOUNCED}
    assert commands(server)[:5] == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA"]
    assert all(t.data is None for s in server.sessions for t in s.transactions)


@pytest.mark.parametrize(("behaviour", "status", "phase"), [
    (Behaviour(mail="550 5.7.1 sender rejected"), DeliveryStatus.BOUNCED, Phase.MAIL),
    (Behaviour(mail="451 4.7.1 greylisted"), DeliveryStatus.DEFERRED, Phase.MAIL),
    (Behaviour(ehlo="554 5.7.1 go away", helo="554 5.7.1 go away"), DeliveryStatus.BOUNCED,
     Phase.EHLO),
    (Behaviour(data="554 5.5.1 no valid recipients"), DeliveryStatus.BOUNCED, Phase.DATA),
    (Behaviour(data="451 4.3.0 try later"), DeliveryStatus.DEFERRED, Phase.DATA),
    (Behaviour(dataend="554 5.7.1 spam"), DeliveryStatus.BOUNCED, Phase.DATAEND),
    (Behaviour(dataend="452 4.3.1 out of space"), DeliveryStatus.DEFERRED, Phase.DATAEND),
    (Behaviour(greeting="554 5.7.1 no service"), DeliveryStatus.BOUNCED, Phase.GREETING),
], ids=["mail-5xx", "mail-4xx", "helo-5xx", "data-5xx", "data-4xx", "dataend-5xx",
        "dataend-4xx", "greeting-5xx"])
async def test_reply_at_each_command(smtp_receivers, make, behaviour, status, phase):
    server = smtp_receivers.start("127.0.0.2", behaviour=behaviour)
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    outcomes = await deliver(deliverer, message("a@example.org", "b@example.org"))
    assert [o.status for o in outcomes] == [status, status]
    assert {o.phase for o in outcomes} == {phase}
    assert server.messages == []


@pytest.mark.parametrize("phase", ["greeting", "ehlo", "mail", "rcpt", "data", "mid-data",
                                   "dataend"])
async def test_disconnect_at_any_phase_defers_everyone(smtp_receivers, make, phase):
    server = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(disconnect=phase))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    outcomes = await deliver(deliverer, message("a@example.org", "b@example.org"))
    assert [o.status for o in outcomes] == [DeliveryStatus.DEFERRED] * 2
    assert all(o.dsn.startswith("4.") for o in outcomes)
    assert server.messages == []


@pytest.mark.parametrize("phase", ["greeting", "rcpt", "dataend"])
async def test_stall_past_the_timeout_defers(smtp_receivers, make, phase):
    # The receiver stalls for 30 s (until teardown); the 0.3 s timeouts must end the
    # attempt long before that, which the bounded wait checks.
    server = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(stall=phase))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    short = replace(FAST, greeting=0.3, rcpt=0.3, dataend=0.3)
    [outcome] = await asyncio.wait_for(deliver(deliverer, message("a@example.org"),
                                               details=Details(timeouts=short)), 15)
    assert outcome.status is DeliveryStatus.DEFERRED
    assert "timed out" in outcome.response
    assert server.messages == []


# --- TLS policy and certificate checks ----------------------------------------------------


def _der(receiver: Any) -> bytes:
    """The certificate a receiver presents, fetched over a real handshake."""
    import socket
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((receiver.host, receiver.port), timeout=3) as raw:
        file = raw.makefile("rwb")
        file.readline()
        file.write(b"EHLO probe.example\r\n")
        file.flush()
        while not file.readline().startswith(b"250 "):
            pass
        file.write(b"STARTTLS\r\n")
        file.flush()
        file.readline()
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


async def test_verify_cert_against_ca_file(smtp_receivers, make, tls_ca: TlsCa):
    server = smtp_receivers.start("127.0.0.2", tls=True)
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]},
                     ca_file=str(tls_ca.pem_path))
    [outcome] = await deliver(deliverer, message("bob@example.org"),
                              details=Details(verify_cert=True))
    assert outcome.status is DeliveryStatus.SENT and outcome.tls
    assert len(await server.async_wait_for(1)) == 1


async def test_untrusted_chain_sends_nothing(smtp_receivers, make, tls_ca: TlsCa,
                                             untrusted_ca: TlsCa):
    server = smtp_receivers.start("127.0.0.2", tls=untrusted_ca.ca)
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]},
                     ca_file=str(tls_ca.pem_path))
    [outcome] = await deliver(deliverer, message("bob@example.org"),
                              details=Details(verify_cert=True))
    assert outcome.status is DeliveryStatus.DEFERRED and outcome.phase is Phase.STARTTLS
    assert "MAIL" not in commands(server)
    assert len(server.sessions) == 1  # no plaintext retry: the check implies forceTLS


@pytest.mark.parametrize(("pattern", "ok"), [
    ("MX.EXAMPLE.TEST", True), ("*.example.test", True), ("m?.example.*", True),
    ("mx.example.org", False), ("?.example.test", False),
])
async def test_check_cert_name(smtp_receivers, make, pattern, ok):
    server = smtp_receivers.start("127.0.0.2", tls=True, cert_names=("mx.example.test",))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"),
                              details=Details(check_cert_name=pattern))
    expected = DeliveryStatus.SENT if ok else DeliveryStatus.DEFERRED
    assert outcome.status is expected
    assert ("MAIL" in commands(server)) is ok
    if not ok:
        assert "checkCertName" in outcome.response


async def test_check_cert_thumbprint(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", tls=True)
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    der = await asyncio.to_thread(_der, server)
    sha1 = hashlib.sha1(der).hexdigest().upper()
    sha1_colons = ":".join(sha1[i:i + 2] for i in range(0, 40, 2))
    sha256 = " ".join(hashlib.sha256(der).hexdigest()[i:i + 8] for i in range(0, 64, 8))
    wrong = hashlib.sha1(der + b"x").hexdigest()
    for pin, expected in [(sha1_colons, DeliveryStatus.SENT), (sha256, DeliveryStatus.SENT),
                          (wrong, DeliveryStatus.DEFERRED)]:
        [outcome] = await deliver(deliverer, message("bob@example.org"),
                                  details=Details(check_cert_thumbprint=pin))
        assert outcome.status is expected, pin
    assert len(server.messages) == 2


async def test_force_tls_without_starttls_sends_nothing(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2")  # no TLS offered
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"),
                              details=Details(force_tls=True))
    assert outcome.status is DeliveryStatus.DEFERRED and outcome.phase is Phase.STARTTLS
    assert "MAIL" not in commands(server)


async def test_broken_starttls_retries_once_in_plaintext(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(
        advertise_starttls=True, broken_tls=True))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.SENT and outcome.tls is None
    assert len(server.sessions) == 2
    assert "STARTTLS" in server.sessions[0].commands
    assert "STARTTLS" not in server.sessions[1].commands


async def test_broken_starttls_under_force_tls_sends_nothing(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(
        advertise_starttls=True, broken_tls=True))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"),
                              details=Details(force_tls=True))
    assert outcome.status is DeliveryStatus.DEFERRED and outcome.phase is Phase.STARTTLS
    assert len(server.sessions) == 1 and server.messages == []


async def test_starttls_declined_continues_in_plaintext(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", tls=True, behaviour=Behaviour(
        starttls="454 4.7.0 TLS not available now"))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.SENT and outcome.tls is None
    assert len(server.sessions) == 1


# --- MX order ----------------------------------------------------------------------------


async def test_next_mx_when_the_first_refuses_connections(smtp_receivers, make):
    second = smtp_receivers.start("127.0.0.3")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.9"),
                                      mx("mx2.example.org", "127.0.0.3", preference=20)]})
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.SENT
    assert outcome.remote_mta == "mx2.example.org"
    assert len(await second.async_wait_for(1)) == 1


async def test_every_address_of_a_host_is_tried(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.3")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.9", "127.0.0.3")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.SENT and "[127.0.0.3]" in (outcome.relay or "")
    assert len(server.messages) == 1


async def test_next_mx_after_whole_transaction_4xx_but_not_after_5xx(smtp_receivers, make):
    first = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(
        rcpt={"*": "450 4.2.0 greylisted"}))
    second = smtp_receivers.start("127.0.0.3")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2"),
                                      mx("mx2.example.org", "127.0.0.3", preference=20)]})
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.SENT and outcome.remote_mta == "mx2.example.org"

    first.behaviour = Behaviour(rcpt={"*": "550 5.1.1 unknown"})
    [outcome] = await deliver(deliverer, message("carol@example.org"))
    assert outcome.status is DeliveryStatus.BOUNCED and outcome.remote_mta == "mx1.example.org"
    assert len(second.messages) == 1  # the 5xx was final


async def test_a_5xx_greeting_moves_on_to_the_next_mx(smtp_receivers, make):
    refusing = smtp_receivers.start("127.0.0.2", behaviour=Behaviour(greeting="554 5.7.1 no"))
    good = smtp_receivers.start("127.0.0.3")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2", preference=10),
                                      mx("mx2.example.org", "127.0.0.3", preference=20)]})
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.SENT
    assert "[127.0.0.3]" in (outcome.relay or "")
    assert len(refusing.sessions) == 1 and len(good.messages) == 1


async def test_bounced_only_when_every_mx_refuses_at_the_greeting(smtp_receivers, make):
    for host in ("127.0.0.2", "127.0.0.3"):
        smtp_receivers.start(host, behaviour=Behaviour(greeting="554 5.7.1 no"))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2", preference=10),
                                      mx("mx2.example.org", "127.0.0.3", preference=20)]})
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.BOUNCED and outcome.phase is Phase.GREETING
    assert "[127.0.0.3]" in (outcome.relay or "")  # both were tried
    # One host deferring is enough to try again later, whichever order they come in.
    smtp_receivers.receivers[1].behaviour = Behaviour(greeting="421 4.3.2 busy")
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.DEFERRED


async def test_address_literal_goes_straight_to_the_address(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.4")
    deliverer = make({})
    [outcome] = await deliver(deliverer, message("bob@[127.0.0.4]"), domain="[127.0.0.4]")
    assert outcome.status is DeliveryStatus.SENT
    assert outcome.relay == f"[127.0.0.4][127.0.0.4]:{smtp_receivers.port}"
    [received] = await server.async_wait_for(1)
    assert received.rcpts == ["bob@[127.0.0.4]"]


# --- connection reuse and limits ----------------------------------------------------------


async def test_connection_reused_for_equal_actions(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2", tls=True)
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    details = Details()
    for rcpt in ("a@example.org", "b@example.org", "c@example.org"):
        [outcome] = await deliver(deliverer, message(rcpt), details=details)
        assert outcome.status is DeliveryStatus.SENT
    assert len(server.sessions) == 1
    assert len(server.sessions[0].transactions) == 3
    # A completed transaction needs no RSET before the next (RFC 5321 §4.1.1.4).
    assert commands(server).count("RSET") == 0
    assert len({p.connid for p in details.calls}) == 1


async def test_rset_before_reuse_after_an_aborted_transaction(smtp_receivers, make):
    server = smtp_receivers.start(
        "127.0.0.2", behaviour=Behaviour(rcpt={"nobody@example.org": "550 5.1.1 no"}))
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    [refused] = await deliver(deliverer, message("nobody@example.org"))
    assert refused.status is DeliveryStatus.BOUNCED
    [sent] = await deliver(deliverer, message("bob@example.org"))
    assert sent.status is DeliveryStatus.SENT
    assert len(server.sessions) == 1
    cmds = commands(server)
    assert cmds.index("RSET") < len(cmds) - 1 - cmds[::-1].index("MAIL")


async def test_different_actions_get_a_different_connection(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    await deliver(deliverer, message("a@example.org"), details=Details(helo_name="one.test"))
    await deliver(deliverer, message("b@example.org"), details=Details(helo_name="two.test"))
    assert [s.helo_name for s in server.sessions] == ["one.test", "two.test"]


async def test_stale_pooled_connection_is_replaced(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    await deliver(deliverer, message("a@example.org"))
    server.behaviour = Behaviour(disconnect="mail", sessions=1)  # session 0 dies at MAIL
    [outcome] = await deliver(deliverer, message("b@example.org"))
    assert outcome.status is DeliveryStatus.SENT
    assert len(server.sessions) == 2 and len(server.messages) == 2


async def test_per_domain_limit_bounds_concurrent_sessions(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]},
                     max_connections_per_domain=2)
    results = await asyncio.gather(*(
        deliver(deliverer, message(f"user{i}@example.org")) for i in range(8)))
    assert all(o.status is DeliveryStatus.SENT for [o] in results)
    assert 1 <= len(server.sessions) <= 2
    assert len(server.messages) == 8


async def test_many_waiters_with_different_actions_all_get_through(smtp_receivers, make):
    # Wake-ups are handed on one waiter at a time: one that cannot use a session given
    # back (other ServerActions) must pass it on, so that nobody waits forever.
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]},
                     max_connections_per_domain=1)
    plain, named = Details(), Details(helo_name="other.test")
    results = await asyncio.wait_for(asyncio.gather(*(
        deliver(deliverer, message(f"user{i}@example.org"),
                details=plain if i % 3 else named)
        for i in range(30))), timeout=30)
    assert all(o.status is DeliveryStatus.SENT for [o] in results)
    assert len(server.messages) == 30
    assert "other.test" in {s.helo_name for s in server.sessions}
    assert len({s.helo_name for s in server.sessions}) == 2  # both kinds of session


async def poll_until(condition: Any) -> None:
    """Bounded polling (5 s) on a condition another task or thread makes true."""
    async with asyncio.timeout(5):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


async def test_a_wake_up_one_waiter_cannot_use_reaches_one_that_can(smtp_receivers, make):
    # b.org's only session is stuck in DATA, and a second b.org delivery waits first in
    # line. A session given back for a.org is of no use to it: the wake-up must be
    # handed on to the a.org deliveries behind it, not lost until b.org moves again.
    a = smtp_receivers.start("127.0.0.2")
    b = smtp_receivers.start("127.0.0.3", behaviour=Behaviour(stall="dataend"))  # 30 s
    deliverer = make({"a.org": [mx("mx.a.org", "127.0.0.2")],
                      "b.org": [mx("mx.b.org", "127.0.0.3")]},
                     max_connections_per_domain=1)
    patient = Details(timeouts=replace(FAST, dataend=60))  # b.org stays stuck throughout
    stuck = asyncio.create_task(deliver(deliverer, message("b1@b.org"), domain="b.org",
                                        details=patient))
    await poll_until(lambda: any(c.startswith("DATA") for s in b.sessions for c in s.commands))
    waiting = asyncio.create_task(deliver(deliverer, message("b2@b.org"), domain="b.org",
                                          details=patient))
    await poll_until(lambda: deliverer.pool.waiting >= 1)
    results = await asyncio.wait_for(asyncio.gather(*(
        deliver(deliverer, message(f"a{i}@a.org"), domain="a.org") for i in range(5))), 15)
    assert all(o.status is DeliveryStatus.SENT for [o] in results)
    assert len(a.messages) == 5
    assert not stuck.done() and not waiting.done()  # b.org is still stalled
    for task in (stuck, waiting):
        task.cancel()
    await asyncio.gather(stuck, waiting, return_exceptions=True)


def _data_commands(server: Any) -> int:
    """How many DATA commands the receiver's sessions have been sent."""
    return sum(session.commands.count("DATA") for session in server.sessions)


async def test_the_next_end_of_data_waits_until_the_previous_message_is_recorded(
        smtp_receivers, make):
    # Contract §1: at most one accepted-but-unrecorded message per connection. The
    # second message on the session goes as far as DATA; its last block and final dot
    # wait until the first one's outcome is recorded.
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    msg = message("a@example.org")
    [outcome] = await deliverer.deliver("Q1", msg, list(msg.envelope.recipients),
                                        "example.org", Details(), recorded=first)
    assert outcome.status is DeliveryStatus.SENT
    msg = message("b@example.org")
    task = asyncio.create_task(deliverer.deliver(
        "Q2", msg, list(msg.envelope.recipients), "example.org", Details(), recorded=second))
    await poll_until(lambda: _data_commands(server) == 2)
    # Held back: the task does not finish while `first` is unresolved (bounded wait).
    done, _ = await asyncio.wait({task}, timeout=0.5)
    assert not done and len(server.messages) == 1
    first.set_result(None)
    [outcome] = await asyncio.wait_for(task, 5)
    assert outcome.status is DeliveryStatus.SENT and len(server.messages) == 2
    assert len(server.sessions) == 1  # one connection carried both


async def test_an_end_of_data_never_waits_past_the_data_block_timeout(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    details = Details(timeouts=replace(FAST, datablock=0.2))
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    msg = message("a@example.org")
    await deliverer.deliver("Q1", msg, list(msg.envelope.recipients), "example.org",
                            details, recorded=never)
    msg = message("b@example.org")
    [outcome] = await asyncio.wait_for(deliverer.deliver(
        "Q2", msg, list(msg.envelope.recipients), "example.org", details), 5)
    # Not sent (the server never saw its end of data): deferred, the session closed.
    assert outcome.status is DeliveryStatus.DEFERRED and "not recorded" in outcome.response
    assert len(server.messages) == 1 and deliverer.pool.open_count == 0
    await asyncio.to_thread(server.wait_for_sessions, 1, 5.0, True)


async def test_close_quits_pooled_connections(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    await deliver(deliverer, message("a@example.org"))
    assert deliverer.pool.open_count == 1
    await deliverer.close()
    assert deliverer.pool.open_count == 0
    await asyncio.to_thread(server.wait_for_sessions, 1, 5.0, True)


def test_backoff_doubles_and_clears():
    backoff = Backoff(base=5, cap=12)
    key = ("127.0.0.2", 25)
    assert backoff.blocked_until(key, 0) is None
    assert backoff.failed(key, 100) == 105
    assert backoff.blocked_until(key, 104) == 105
    assert backoff.blocked_until(key, 105) is None
    assert backoff.failed(key, 200) == 210
    assert backoff.failed(key, 300) == 312  # capped
    backoff.succeeded(key)
    assert backoff.blocked_until(key, 301) is None


async def test_idle_connections_are_closed_after_a_while(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")]})
    deliverer.pool.idle_seconds = 0.2
    await deliver(deliverer, message("a@example.org"))
    await asyncio.to_thread(server.wait_for_sessions, 1, 5.0, True)
    assert deliverer.pool.open_count == 0


async def test_domains_sharing_an_mx_are_limited_per_domain_not_per_address(
        smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.2")
    deliverer = make({"example.org": [mx("mx.hoster.example", "127.0.0.2")],
                      "example.net": [mx("mx.hoster.example", "127.0.0.2")]},
                     max_connections_per_domain=1)
    await asyncio.gather(deliver(deliverer, message("a@example.org")),
                         deliver(deliverer, message("a@example.net"), domain="example.net"))
    # One session per domain at once: the shared host is not a third, hidden limit.
    assert deliverer.pool.open_count == 2 and len(server.messages) == 2


async def test_the_idle_sweep_closes_only_sessions_idle_long_enough(smtp_receivers, make):
    smtp_receivers.start("127.0.0.2")
    smtp_receivers.start("127.0.0.3")
    deliverer = make({"example.org": [mx("mx1.example.org", "127.0.0.2")],
                      "example.net": [mx("mx1.example.net", "127.0.0.3")]})
    await deliver(deliverer, message("a@example.org"))
    await deliver(deliverer, message("a@example.net"), domain="example.net")
    pool = deliverer.pool
    assert pool.open_count == 2 and pool._sweeper is not None
    stale = next(e for entries in pool._idle.values() for e in entries
                 if e.domain == "example.org")
    stale.idle_since -= pool.idle_seconds + 1  # as if given back long ago
    pool._sweep()
    assert pool.open_count == 1
    assert [e.domain for entries in pool._idle.values() for e in entries] == ["example.net"]
    assert pool._sweeper is not None  # and it comes back for the other one
    await pool.close()


async def test_ipv6_failure_falls_back_to_ipv4(smtp_receivers, make):
    server = smtp_receivers.start("127.0.0.3")  # nothing listens on [::1] at this port
    deliverer = make({"example.org": [mx("mx1.example.org", "::1", "127.0.0.3")]})
    [outcome] = await deliver(deliverer, message("bob@example.org"))
    assert outcome.status is DeliveryStatus.SENT and "[127.0.0.3]" in (outcome.relay or "")
    assert len(server.messages) == 1


async def test_ipv6_delivery_over_an_aaaa_record(dns_server: DnsTestServer, tls_ca: TlsCa):
    # The whole way over IPv6: the MX host has only an AAAA record (::1), so a success
    # means DNS, connect, STARTTLS and the transaction all ran on [::1].
    group = ReceiverGroup(tls_ca.ca, hosts=WITH_IPV6)
    deliverer: Deliverer | None = None
    try:
        server = group.start("::1", tls=True, cert_names=("mx.v6.test",))
        dns_server.add_mx("v6.test", 10, "mx.v6.test")
        dns_server.add_aaaa("mx.v6.test", "::1")
        deliverer = Deliverer(config(group.port, ca_file=str(tls_ca.pem_path)),
                              Resolver(dns_server.dns_config(ipv6=True)),
                              batv_key=None)
        [outcome] = await deliver(deliverer, message("bob@v6.test"), domain="v6.test",
                                  details=Details(verify_cert=True,
                                                  check_cert_name="mx.v6.test"))
        assert outcome.status is DeliveryStatus.SENT, outcome.response
        assert outcome.relay == f"mx.v6.test[::1]:{group.port}"
        assert outcome.tls is not None
        [received] = await server.async_wait_for(1)
        assert received.rcpts == ["bob@v6.test"] and received.session.peer[0] == "::1"
    finally:
        if deliverer is not None:
            await deliverer.close()
        group.stop()


async def test_a_cancelled_waiter_leaves_nothing_reserved():
    pool = ConnectionPool(max_total=1, max_per_domain=1)
    key = ("127.0.0.2", 25, ServerActions())
    assert await pool.acquire(key, "a.org") is None  # room reserved: the one slot
    waiting = asyncio.create_task(pool.acquire(key, "a.org"))
    await poll_until(lambda: pool.waiting == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pool.waiting == 0
    # Served (room reserved for it) and cancelled before it ran: the room comes back.
    served = asyncio.create_task(pool.acquire(key, "a.org"))
    await poll_until(lambda: pool.waiting == 1)
    pool.unreserve("a.org", ("127.0.0.2", 25))
    assert pool.waiting == 0 and pool.open_count == 1  # reserved for the waiter
    served.cancel()
    with pytest.raises(asyncio.CancelledError):
        await served
    assert pool.open_count == 0
    await pool.close()
