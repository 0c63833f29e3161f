"""What ReturnCodeHandler costs in worker round trips (contract §9, docs/shaping.md).

A real Deliverer and a real Policy (worker process, Lua) against a real aiosmtpd
receiver on 127.0.0.x; ScriptCalls._call_many is wrapped to count round trips and the
calls in them (the real one still runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mxsend.actions import ServerActions, ServerParameters
from mxsend.config import config_from_mapping
from mxsend.delivery import Deliverer
from mxsend.envelope import Envelope, Message, Recipient
from mxsend.mx import MxHost
from mxsend.outcome import DeliveryStatus
from mxsend.policy import Policy
from mxsend.script_calls import ScriptCalls
from tests.fixtures.daemon import TEST_DESTINATIONS
from tests.fixtures.smtp_receiver import Behaviour, ReceiverGroup

BASE = """
function CheckFile(Filename, Actions) return Actions end
function ServerDetails(params, headers, actions) actions.tryTLS = 0 return actions end
"""
HOOK = BASE + """
function ReturnCodeHandler(LastCommand, FullResponse, LastLine)
  if LastCommand == "RCPT TO" and string.sub(LastLine, 1, 3) == "550" then
    return "450 4.2.0 mailbox being created"
  end
  return nil
end
"""


class Rounds:
    def __init__(self) -> None:
        self.rounds: list[list[str]] = []  # the functions called in each round trip


@pytest.fixture
def rounds(monkeypatch: pytest.MonkeyPatch) -> Rounds:
    spy = Rounds()
    real = ScriptCalls._call_many

    async def counted(self: ScriptCalls, calls: Sequence[Any]) -> Any:
        spy.rounds.append([function for function, _, _ in calls])
        return await real(self, calls)

    monkeypatch.setattr(ScriptCalls, "_call_many", counted)
    return spy


class OneHost:
    def __init__(self, ip: str) -> None:
        self.ip = ip

    async def resolve(self, domain: str) -> list[MxHost]:
        return [MxHost("mx.example.test", 10, (self.ip,))]


async def _deliver(tmp_path: Path, receivers: ReceiverGroup, script: str,
                   messages: int) -> list[dict[str, DeliveryStatus]]:
    (tmp_path / "mxout.lua").write_text(script)
    config = config_from_mapping({
        "smtp": {"port": receivers.port, "helo_name": "client.test",
                 "allowed_destinations": list(TEST_DESTINATIONS)},
        "script": {"path": str(tmp_path / "mxout.lua")}})
    policy = Policy(config)
    deliverer = Deliverer(config, OneHost("127.0.0.2"), batv_key=None, hooks=policy)
    recipients = (Recipient("a@example.test"), Recipient("gone@example.test"))
    message = Message(Envelope("alice@src.test", recipients), b"Subject: x\r\n\r\nhi\r\n")

    async def details(params: ServerParameters, preset: Any) -> ServerActions:
        return await policy.server_details("Q", params, [])

    results = []
    try:
        await policy.load()
        for _ in range(messages):
            outcomes = await deliverer.deliver("Q", message, recipients, "example.test",
                                               details)
            results.append({o.address: o.status for o in outcomes})
    finally:
        await deliverer.close()
        policy.close()
    return results


GONE = Behaviour(rcpt={"gone@example.test": "550 5.1.1 no such user"})


async def test_without_the_hook_no_reply_costs_a_round_trip(
        tmp_path: Path, smtp_receivers: ReceiverGroup, rounds: Rounds) -> None:
    smtp_receivers.start("127.0.0.2", behaviour=GONE)
    results = await _deliver(tmp_path, smtp_receivers, BASE, 3)
    assert results[-1]["gone@example.test"] is DeliveryStatus.BOUNCED  # not replaced
    # ServerDetails once per message, nothing else: no call per reply.
    assert rounds.rounds == [["ServerDetails"]] * 3


async def test_a_pipelined_group_asks_the_hook_in_one_round_trip(
        tmp_path: Path, smtp_receivers: ReceiverGroup, rounds: Rounds) -> None:
    server = smtp_receivers.start("127.0.0.2", behaviour=GONE)
    results = await _deliver(tmp_path, smtp_receivers, HOOK, 3)
    # Replaced before it was classified: deferred, not bounced.
    assert results == [{"a@example.test": DeliveryStatus.SENT,
                        "gone@example.test": DeliveryStatus.DEFERRED}] * 3
    assert len(server.sessions) == 1  # one pooled connection for the three
    session = ["ReturnCodeHandler"]  # the greeting, then EHLO: one each
    group = ["ReturnCodeHandler"] * 4  # MAIL, RCPT, RCPT, DATA: together
    end = ["ReturnCodeHandler"]  # the reply to the end of the data
    per_message = [["ServerDetails"], group, end]
    quit_ = ["ReturnCodeHandler"]  # the reply to QUIT when the pool closes
    assert rounds.rounds == ([["ServerDetails"], session, session, group, end]
                             + per_message * 2 + [quit_]), rounds.rounds


async def test_without_pipelining_each_reply_is_its_own_round_trip(
        tmp_path: Path, smtp_receivers: ReceiverGroup, rounds: Rounds) -> None:
    smtp_receivers.start("127.0.0.2", behaviour=Behaviour(
        rcpt=GONE.rcpt, pipelining=False))
    results = await _deliver(tmp_path, smtp_receivers, HOOK, 1)
    assert results == [{"a@example.test": DeliveryStatus.SENT,
                        "gone@example.test": DeliveryStatus.DEFERRED}]
    # Greeting, EHLO, MAIL, RCPT, RCPT, DATA, end of data, QUIT: each waits for the one
    # before.
    assert rounds.rounds == [["ServerDetails"]] + [["ReturnCodeHandler"]] * 8


@pytest.mark.parametrize("behaviour", [
    Behaviour(disconnect="data"),  # lost before DATA's reply: all deferred
    Behaviour(rcpt={"gone@example.test": "421 4.7.0 closing"}),  # nothing after it
    Behaviour(mail="451 4.3.0 try later"),  # MAIL refused: the group is read out
    Behaviour(stall="rcpt", stall_seconds=5),  # a timeout inside the group
], ids=["disconnect", "rcpt-421", "mail-451", "stall"])
async def test_a_group_read_ahead_ends_as_one_read_reply_by_reply(
        tmp_path: Path, smtp_receivers: ReceiverGroup, behaviour: Behaviour) -> None:
    # The hook changes nothing here: the outcomes must be those without it.
    smtp_receivers.start("127.0.0.2", behaviour=behaviour)
    short = BASE.replace("actions.tryTLS = 0", "actions.tryTLS = 0 actions.timeouts.rcpt = 1")
    without = await _deliver(tmp_path, smtp_receivers, short, 1)
    with_hook = await _deliver(tmp_path, smtp_receivers, short + HOOK[len(BASE):], 1)
    assert with_hook == without
    assert DeliveryStatus.SENT not in without[0].values()
