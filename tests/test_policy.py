"""The Lua policy through its public API: marshalling both ways, faults, reload.

Real worker processes and real files; one Policy per module where the script can simply
be rewritten and reloaded, a fresh one where a test kills or starves its worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mxsend.actions import FileActions, ServerActions, ServerParameters, Timeouts
from mxsend.config import Config, ScriptConfig, SmtpConfig
from mxsend.log import get_logger
from mxsend.policy import CheckFileRequest, Policy, lua_time
from mxsend.watch import Watcher

HEADERS = (
    b"Received: from a by b;\r\n\tThu, 26 Nov 2026 09:30:00 +0000\r\n"
    b"Subject:   Hello\r\n  folded world  \r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"subject: second subject is ignored\r\n"
    b"X-Empty:\r\n"
    b"Precedence : bulk\r\n"
)
DATA = HEADERS + b"\r\nbody line\r\nSubject: not a header\r\n"
SAMPLE = Path(__file__).resolve().parent.parent / "config" / "mxout.lua"


def write_in_place(path: Path, text: str) -> None:
    """As an editor that truncates and rewrites the same inode."""
    with open(path, "w") as handle:
        handle.write(text)


class Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None):
            self.records.append({"event": record.event, **record.fields})  # type: ignore[attr-defined]
        else:
            self.records.append({"event": "log", "message": record.getMessage()})

    def of(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["event"] == name]


@pytest.fixture
def events() -> Iterator[Events]:
    handler = Events()
    logger = get_logger()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def make_config(path: Path, *, timeout: float = 1.0, memory: int = 64 * 1024**2) -> Config:
    return Config(script=ScriptConfig(path=path, timeout=timeout, memory=memory),
                  smtp=SmtpConfig(helo_name="out.example.com"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Policy, Path]]:
    path = tmp_path_factory.mktemp("policy") / "mxout.lua"
    path.write_text("-- empty\n")
    policy = Policy(make_config(path, timeout=0.5))
    yield policy, path
    policy.close()


@pytest.fixture
def script(shared: tuple[Policy, Path]) -> Any:
    """script(text) -> the shared Policy running that text."""
    policy, path = shared

    async def load(text: str) -> Policy:
        if path.read_text() != text:
            path.write_text(text)
            assert await policy.load(), "the new script version should be active"
        return policy

    return load


def request(**changes: Any) -> CheckFileRequest:
    values: dict[str, Any] = dict(
        queue_id="Q1", filename="/spool/new/Q1", size=len(DATA),
        creation_time=1_800_000_000.0, retries=0, last_try_time=None,
        return_path="alice@example.com", recipients=("bob@example.org", "carol@example.net"),
        data=DATA,
    )
    values.update(changes)
    return CheckFileRequest(**values)


PARAMS = ServerParameters(
    authsender="auth@example.com", originator="alice@example.com", server="mx1.example.org",
    domain="example.org", length=1234, connid=7, connection="mx1.example.org[127.0.0.1]:25",
)

REASON_OF = """
function CheckFile(Filename, Actions, Size, CreationTime, Retries, LastTryTime,
                   ReturnPath, Recipients, HeaderData, HeaderLines)
  Actions.Reason = tostring(%s)
  return Actions
end
"""


# --- Python -> Lua ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("expression", "changes", "expected"),
    [
        ("Filename", {}, "/spool/new/Q1"),
        ("Size", {}, str(len(DATA))),
        ("type(Size)", {}, "number"),
        ("CreationTime", {}, lua_time(1_800_000_000.0)),
        ("#CreationTime", {}, "14"),
        ("Retries", {"retries": 3}, "3"),
        ("LastTryTime", {}, ""),
        ("LastTryTime", {"last_try_time": 1_800_000_600.0}, lua_time(1_800_000_600.0)),
        ("ReturnPath", {}, "alice@example.com"),
        ("ReturnPath", {"return_path": ""}, ""),
        ("#Recipients", {}, "2"),
        ("Recipients[1] .. ',' .. Recipients[2]", {}, "bob@example.org,carol@example.net"),
        ("Recipients[0]", {}, "nil"),
        ("HeaderData['Subject']", {}, "Hello  folded world"),
        ("HeaderData['SUBJECT']", {}, "Hello  folded world"),
        ("HeaderData.subject", {}, "Hello  folded world"),
        ("HeaderData['Received']", {}, "from a by b;\tThu, 26 Nov 2026 09:30:00 +0000"),
        ("HeaderData['x-empty']", {}, ""),
        ("HeaderData['precedence']", {}, "bulk"),
        ("HeaderData['Body line']", {}, "nil"),
        ("HeaderData['Missing']", {}, "nil"),
        ("HeaderData[1]", {}, "nil"),
        ("#HeaderLines", {}, "8"),
        ("HeaderLines[1]", {}, "Received: from a by b;"),
        ("HeaderLines[2]", {}, "\tThu, 26 Nov 2026 09:30:00 +0000"),
        ("HeaderLines[9]", {}, "nil"),
        ("#HeaderLines", {"data": b"\r\nbody only\r\n"}, "0"),
        ("HeaderData.subject", {"data": b"Subject: x\xe9y\r\n\r\n"}, "x\ufffdy"),
        ("(function() local n = 0 for k, v in pairs(HeaderData) do n = n + 1 end return n end)()",
         {}, "5"),
        ("(function() local t = {} for k in pairs(HeaderData) do t[#t+1] = k end "
         "table.sort(t) return table.concat(t, ',') end)()",
         {}, "From,Precedence,Received,Subject,X-Empty"),
    ],
)
async def test_check_file_arguments(script: Any, expression: str, changes: dict[str, Any],
                                    expected: str) -> None:
    policy = await script(REASON_OF % expression)
    actions = await policy.check_file(request(**changes))
    # Lua strings are bytes; non-UTF-8 bytes reach the log replaced, not lost in Lua.
    assert actions.reason == expected


async def test_header_bytes_reach_lua_unchanged(script: Any) -> None:
    policy = await script(REASON_OF % "string.byte(HeaderData.subject, 2)")
    actions = await policy.check_file(request(data=b"Subject: x\xe9y\r\n\r\n"))
    assert actions.reason == "233"


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("Parameters.authsender", "auth@example.com"),
        ("Parameters.originator", "alice@example.com"),
        ("Parameters.server", "mx1.example.org"),
        ("Parameters.domain", "example.org"),
        ("Parameters.length", "1234"),
        ("Parameters.connnid", "7"),
        ("Parameters.connid", "7"),
        ("Parameters.connection", "mx1.example.org[127.0.0.1]:25"),
        ("#HeaderLines .. '/' .. HeaderLines[1]", "2/Subject: hi"),
        ("Actions.tryESMTP", "1"),
        ("Actions.tryTLS", "1"),
        ("Actions.HELOname", "out.example.com"),
        ("Actions.useBATV", "0"),
        ("Actions.allowDSN", "1"),
        ("Actions.forceTLS", "0"),
        ("Actions.verifyCert", "0"),
        ("'[' .. Actions.checkCertName .. Actions.checkCertThumbprint .. ']'", "[]"),
        ("Actions.returnAddressModifier", "0"),
        ("'[' .. Actions.defaultReturnAddress .. Actions.nullReturnAddress .. ']'", "[]"),
        ("Actions.timeouts.connect", "60"),
        ("Actions.timeouts.greeting", "300"),
        ("Actions.timeouts.starttls", "120"),
        ("Actions.timeouts.data", "120"),
        ("Actions.timeouts.datablock", "180"),
        ("Actions.timeouts.dataend", "600"),
    ],
)
async def test_server_details_arguments(script: Any, expression: str, expected: str) -> None:
    # The value comes back through HELOname, made wire-safe with gsub.
    policy = await script(f"""
function ServerDetails(Parameters, HeaderLines, Actions)
  Actions.HELOname = "v=" .. string.gsub(tostring({expression}), "[^%w%.%-@:/%[%]=]", "_")
  return Actions
end""")
    actions = await policy.server_details("Q1", PARAMS, ["Subject: hi", "From: a@b"])
    assert actions.helo_name == "v=" + expected.replace(" ", "_")


# --- Lua -> Python ---------------------------------------------------------------------

CHECK_SET = """
function CheckFile(Filename, Actions) Actions.%s = %s return Actions end
"""


@pytest.mark.parametrize(
    ("field", "lua", "expected", "fault"),
    [
        ("SkipSend", "true", FileActions(skip_send=True), False),
        ("SkipSend", "1", FileActions(skip_send=True), False),
        ("SkipSend", "-1", FileActions(skip_send=True), False),
        ("SkipSend", "0.5", FileActions(skip_send=True), False),
        ("SkipSend", "'1'", FileActions(skip_send=True), False),
        ("SkipSend", "'yes'", FileActions(skip_send=True), False),
        ("SkipSend", "'TRUE'", FileActions(skip_send=True), False),
        ("SkipSend", "0", FileActions(), False),
        ("SkipSend", "'0'", FileActions(), False),
        ("SkipSend", "false", FileActions(), False),
        ("SkipSend", "'false'", FileActions(), False),
        ("SkipSend", "'no'", FileActions(), False),
        ("SkipSend", "nil", FileActions(), False),
        ("SkipSend", "{}", FileActions(), True),
        ("SkipSend", "'maybe'", FileActions(), True),
        ("ForceLastTry", "true", FileActions(force_last_try=True), False),
        ("ForceLastTry", "'no'", FileActions(), False),
        ("Priority", "75", FileActions(priority=75), False),
        ("Priority", "150", FileActions(priority=100), False),
        ("Priority", "0", FileActions(priority=1), False),
        ("Priority", "-20", FileActions(priority=1), False),
        ("Priority", "75.9", FileActions(priority=75), False),
        ("Priority", "'80'", FileActions(priority=80), False),
        ("Priority", "math.huge", FileActions(priority=100), False),
        ("Priority", "0/0", FileActions(), True),
        ("Priority", "'high'", FileActions(), True),
        ("Priority", "true", FileActions(), True),
        ("Reason", "'queue full'", FileActions(reason="queue full"), False),
        ("Reason", "42", FileActions(reason="42"), False),
        ("Reason", "print", FileActions(), True),
    ],
)
async def test_check_file_results(script: Any, events: Events, field: str, lua: str,
                                  expected: FileActions, fault: bool) -> None:
    policy = await script(CHECK_SET % (field, lua))
    assert await policy.check_file(request()) == expected
    errors = events.of("script_error")
    assert bool(errors) == fault
    if fault:
        assert errors[0]["function"] == "CheckFile"
        assert field in errors[0]["error"]
        assert errors[0]["id"] == "Q1"


SERVER_SET = """
function ServerDetails(Parameters, HeaderLines, Actions) %s return Actions end
"""


def server(**changes: Any) -> ServerActions:
    return ServerActions(**{"helo_name": "out.example.com", **changes})


def unusable(pins: str) -> ServerActions:
    return server(force_tls=True, unusable=f"the script's {pins} cannot be used")


@pytest.mark.parametrize(
    ("lua", "expected", "fault"),
    [
        ("", server(), False),
        ('Actions["tryTLS"] = 0', server(try_tls=False), False),
        ("Actions.tryESMTP = 'no'", server(try_esmtp=False), False),
        ("Actions.useBATV = 1", server(use_batv=True), False),
        ("Actions.allowDSN = false", server(allow_dsn=False), False),
        ("Actions.forceTLS = true", server(force_tls=True), False),
        ("Actions.verifyCert = '1'", server(verify_cert=True), False),
        ("Actions.HELOname = 'mx.example.net'", server(helo_name="mx.example.net"), False),
        ("Actions.HELOname = '[192.0.2.1]'", server(helo_name="[192.0.2.1]"), False),
        ("Actions.HELOname = 'evil\\r\\nMAIL FROM:<x@y>'", server(), True),
        ("Actions.HELOname = 'a b'", server(), True),
        ("Actions.HELOname = ''", server(), True),
        ("Actions.HELOname = 'tab\\there'", server(), True),
        ("Actions.HELOname = {}", server(), True),
        ("Actions.checkCertName = '*.example.org'", server(check_cert_name="*.example.org"),
         False),
        ("Actions.checkCertName = 'x\\ny'", unusable("checkCertName"), True),
        ("Actions.checkCertName = {}", unusable("checkCertName"), True),
        ("Actions.checkCertThumbprint = string.rep('ab', 20)",
         server(check_cert_thumbprint="ab" * 20), False),
        ("Actions.checkCertThumbprint = 'AB:CD'", unusable("checkCertThumbprint"), True),
        ("Actions.checkCertThumbprint = string.rep('ab', 20) .. '\\0'",
         unusable("checkCertThumbprint"), True),
        ("Actions.checkCertName = 'a\\rb'; Actions.checkCertThumbprint = 'no'",
         unusable("checkCertName and checkCertThumbprint"), True),
        # An unreadable protection flag counts as on: off would be the weaker connection.
        ("Actions.forceTLS = 'maybe'", server(force_tls=True), True),
        ("Actions.verifyCert = {}", server(verify_cert=True), True),
        ("Actions.returnAddressModifier = 2", server(return_address_modifier=2), False),
        ("Actions.returnAddressModifier = '1'; Actions.defaultReturnAddress = 'b@x.example'",
         server(return_address_modifier=1, default_return_address="b@x.example"), False),
        ("Actions.returnAddressModifier = 3", server(), True),
        ("Actions.defaultReturnAddress = '<bounce@example.com>'",
         server(default_return_address="bounce@example.com"), False),
        ("Actions.defaultReturnAddress = 'bounce@example.com\\r\\nRCPT TO:<x@y>'",
         server(), True),
        ("Actions.defaultReturnAddress = 'not an address'", server(), True),
        ("Actions.nullReturnAddress = '<>'", server(), False),
        # A modifier whose target cannot be used sends the envelope sender as queued
        # (modifier 0), never <> (issue 10 item 1).
        ("Actions.returnAddressModifier = 1; Actions.defaultReturnAddress = 'b@x.example\\r'",
         server(), True),
        ("Actions.returnAddressModifier = 1; Actions.defaultReturnAddress = 'not valid'",
         server(), True),
        ("Actions.returnAddressModifier = 1", server(), True),
        ("Actions.returnAddressModifier = 1; Actions.defaultReturnAddress = {}", server(), True),
        ("Actions.returnAddressModifier = 2; Actions.nullReturnAddress = 'a\\nb@x.example'",
         server(), True),
        ("Actions.returnAddressModifier = 2; Actions.nullReturnAddress = ''",
         server(return_address_modifier=2), False),
        ("Actions.returnAddressModifier = 2; Actions.nullReturnAddress = '<>'",
         server(return_address_modifier=2), False),
        ("Actions.nullReturnAddress = 'null@example.com'",
         server(null_return_address="null@example.com"), False),
        ("Actions.timeouts.connect = 30", server(timeouts=Timeouts(connect=30.0)), False),
        ("Actions.timeouts.dataend = '900'", server(timeouts=Timeouts(dataend=900.0)), False),
        ("Actions.timeouts.rcpt = -1", server(), True),
        ("Actions.timeouts.mail = 'soon'", server(), True),
        ("Actions.timeouts = nil", server(), False),
        ("Actions.timeouts = 5", server(), True),
        ("Actions.timeouts = {connect = 10}", server(timeouts=Timeouts(connect=10.0)), False),
    ],
)
async def test_server_details_results(script: Any, events: Events, lua: str,
                                      expected: ServerActions, fault: bool) -> None:
    policy = await script(SERVER_SET % lua)
    assert await policy.server_details("Q1", PARAMS, ["Subject: hi"]) == expected
    assert bool(events.of("script_error")) == fault


async def test_a_bad_modifier_target_is_one_script_error_naming_it(script: Any,
                                                                   events: Events) -> None:
    policy = await script(SERVER_SET % (
        "Actions.returnAddressModifier = 1; Actions.defaultReturnAddress = 'b@x.example\\r'"))
    actions = await policy.server_details("Q1", PARAMS, [])
    assert actions.return_address_modifier == 0
    messages = [e["error"] for e in events.of("script_error")]
    assert any(m.startswith("defaultReturnAddress:") for m in messages), messages
    assert any(m.startswith("returnAddressModifier: 1 names defaultReturnAddress")
               and "envelope sender as queued" in m for m in messages), messages


@pytest.fixture
async def delivery_to(smtp_receivers: Any) -> Any:
    """delivery_to(policy) -> outcomes and the receiver, for one message to example.org."""
    from mxsend.config import config_from_mapping
    from mxsend.delivery import Deliverer
    from mxsend.envelope import Envelope, Message, Recipient
    from mxsend.mx import MxHost
    from tests.fixtures.daemon import TEST_DESTINATIONS

    receiver = smtp_receivers.start("127.0.0.2", tls=True)

    class Static:
        async def resolve(self, domain: str) -> list[MxHost]:
            return [MxHost(name="mx1.example.org", preference=10, addresses=("127.0.0.2",))]

    async def run(policy: Policy) -> tuple[list[Any], Any]:
        config = config_from_mapping({"smtp": {
            "port": smtp_receivers.port, "helo_name": "out.example.com",
            "allowed_destinations": list(TEST_DESTINATIONS)}})
        deliverer = Deliverer(config, Static(), batv_key=None)
        msg = Message(Envelope(sender="alice@example.com",
                               recipients=(Recipient("bob@example.org"),)),
                      b"Subject: t\r\n\r\nhi\r\n")

        async def details(params: ServerParameters, preset: Any) -> ServerActions:
            return await policy.server_details("Q1", params, [], preset)

        try:
            outcomes = await deliverer.deliver("Q1", msg, list(msg.envelope.recipients),
                                               "example.org", details)
        finally:
            await deliverer.close()
        return outcomes, receiver

    return run


async def test_a_bad_default_return_address_sends_the_queued_sender_not_null(
        script: Any, delivery_to: Any) -> None:
    policy = await script(SERVER_SET % (
        "Actions.returnAddressModifier = 1; Actions.defaultReturnAddress = 'b@x.example\\n'"))
    [outcome], receiver = await delivery_to(policy)
    assert str(outcome.status) == "sent", outcome
    [received] = await receiver.async_wait_for(1)
    assert received.mail_from == "alice@example.com"


async def test_an_unreadable_pin_defers_without_connecting(script: Any,
                                                           delivery_to: Any) -> None:
    policy = await script(SERVER_SET % "Actions.checkCertThumbprint = 'AB\\r\\nCD'")
    [outcome], receiver = await delivery_to(policy)
    assert str(outcome.status) == "deferred" and outcome.dsn == "4.7.5", outcome
    assert "checkCertThumbprint" in outcome.response
    assert receiver.sessions == []  # never connected: not unpinned, not in plaintext


async def test_repeated_server_details_answers_are_read_once_faults_logged_each_time(
        script: Any, events: Events) -> None:
    policy = await script(SERVER_SET % "Actions.timeouts.rcpt = -1; Actions.tryTLS = 0")
    first = await policy.server_details("Q1", PARAMS, ["Subject: hi"])
    second = await policy.server_details("Q2", PARAMS, ["Subject: hi"])
    assert first == server(try_tls=False) and second is first  # remembered, not re-read
    assert [e["id"] for e in events.of("script_error")] == ["Q1", "Q2"]
    # A different answer is its own.
    policy = await script(SERVER_SET % "Actions.tryTLS = 1")
    assert (await policy.server_details("Q3", PARAMS, [])).try_tls is True


async def test_vpop3_example_verbatim(script: Any) -> None:
    # From VPOP3's documentation of mxout.lua, unchanged.
    policy = await script("""function ServerDetails(params, headers, actions)
  if params["server"] == "mail.broken.com" then
    actions["tryTLS"] = 0
  end
  return actions
end
""")
    broken = ServerParameters("", "a@example.com", "mail.broken.com", "broken.com", 10, 1,
                              "mail.broken.com[127.0.0.1]:25")
    assert (await policy.server_details("Q1", broken, [])).try_tls is False
    assert (await policy.server_details("Q1", PARAMS, [])).try_tls is True


async def test_print_goes_to_the_log(script: Any, events: Events) -> None:
    policy = await script("""
function CheckFile(f, a) print("checking", f, 42, nil) return a end
""")
    await policy.check_file(request())
    assert [(e["id"], e["message"]) for e in events.of("script_log")] == [
        ("Q1", "checking\t/spool/new/Q1\t42\tnil")]


async def test_shipped_sample_runs_without_errors(tmp_path: Path, events: Events) -> None:
    policy = Policy(make_config(SAMPLE))
    try:
        actions = await policy.check_file(request(data=b"Precedence: bulk\r\n\r\n"))
        assert actions.priority == 20
        broken = ServerParameters("", "a@example.com", "mail.broken.com", "broken.com", 10, 1,
                                  "x")
        assert (await policy.server_details("Q1", broken, [])).try_tls is False
        bank = ServerParameters("", "a@example.com", "mx.bank.example", "bank.example", 10,
                                1, "x")
        details = await policy.server_details("Q1", bank, [])
        assert details.verify_cert and details.check_cert_name == "*.bank.example"
    finally:
        policy.close()
    assert events.of("script_error") == []


# --- faults ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("lua", "message"),
    [
        ("", "no function CheckFile"),
        ("CheckFile = 5", "no function CheckFile"),
        ("function CheckFile(f, a) end", "returned nil"),
        ("function CheckFile(f, a) return 'x' end", "returned a string"),
        ("function CheckFile(f, a) a.Priority = 99 error('boom') end", "boom"),
        ("function CheckFile(f, a) return nil .. 1 end", "attempt to concatenate"),
        ("function CheckFile(f, a) a.Priority = 99 while true do end end", "did not finish"),
        ("function CheckFile(f, a) a.Priority = 99 while true do pcall(function() "
         "while true do end end) end end", "did not finish"),
        ("function CheckFile(f, a) local co = coroutine.create(function() while true do end "
         "end) coroutine.resume(co) a.Priority = 99 return a end", "did not finish"),
        ("function CheckFile(f, a) coroutine.wrap(function() while true do end end)() "
         "return a end", "did not finish"),
        ("function CheckFile(f, a) local function r() return 1 + r() end return r() end",
         "stack overflow|not enough memory"),
        ("function CheckFile(f, a) local t = {} for i = 1, 1e8 do t[i] = string.rep('x', i % 100) "
         "end return a end", "not enough memory"),
        ("function CheckFile(f, a) local s = string.rep('x', 2^30) return a end",
         "not enough memory"),
    ],
)
async def test_faults_give_the_defaults(tmp_path: Path, events: Events, lua: str,
                                        message: str) -> None:
    path = tmp_path / "mxout.lua"
    path.write_text(lua)
    policy = Policy(make_config(path, timeout=0.3, memory=16 * 1024**2))
    try:
        async with asyncio.timeout(30):  # a bound only: the call must end
            assert await policy.check_file(request()) == FileActions()
        errors = events.of("script_error")
        assert len(errors) == 1, errors
        assert errors[0]["function"] == "CheckFile"
        assert re.search(message, errors[0]["error"]), errors[0]["error"]
        # The runtime is still usable after the fault.
        assert await policy.check_file(request()) == FileActions()
    finally:
        policy.close()


async def test_missing_function_is_reported_once(script: Any, events: Events) -> None:
    policy = await script("function CheckFile(f, a) return a end -- no ServerDetails")
    for _ in range(3):
        assert await policy.server_details("Q1", PARAMS, []) == server()
    assert len(events.of("script_error")) == 1


# A Lua pattern with many nested lazy repetitions backtracks exponentially inside one C
# call (str_find_aux): the count hook never runs, so only killing the worker helps.
HANGS_ON_SUBJECT = """
function CheckFile(f, a, size, c, r, l, rp, rcpts, hd)
  if hd.subject == "hang" then
    string.find(string.rep("a", 60), string.rep("a-", 30) .. "b")
  end
  a.Priority = 77
  return a
end
"""


async def test_stuck_c_call_kills_the_worker_not_the_daemon(tmp_path: Path,
                                                           events: Events) -> None:
    path = tmp_path / "mxout.lua"
    path.write_text(HANGS_ON_SUBJECT)
    policy = Policy(make_config(path, timeout=0.2))
    try:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        async with asyncio.timeout(policy.hard_timeout + 30):  # a bound only
            actions = await policy.check_file(request(data=b"Subject: hang\r\n\r\n"))
        task.cancel()
        assert actions == FileActions()
        assert ticks >= 3, "the event loop kept running while the worker was stuck"
        [error] = events.of("script_error")
        assert "killed" in error["error"]
        # A fresh worker with the same script serves the next call.
        assert (await policy.check_file(request())).priority == 77
    finally:
        policy.close()


def big_header(size: int) -> bytes:
    """A message that never has a blank line: all of it counts as header."""
    line = b"X-Filler: " + b"y" * 988 + b"\r\n"
    return line * (size // len(line))


async def test_the_script_sees_at_most_100_kb_of_header(script: Any) -> None:
    policy = await script(REASON_OF % (
        "(function() local n = 0 for _, l in ipairs(HeaderLines) do n = n + #l + 2 end "
        "return #HeaderLines .. '/' .. n end)()"))
    data = b"Subject: first\r\n" + big_header(400 * 1024)
    reason = (await policy.check_file(request(data=data))).reason
    lines, size = map(int, reason.split("/"))
    assert 90 * 1024 < size <= 100 * 1024 and lines == size // 1000 + 1, reason
    # ServerDetails' HeaderLines are capped the same way.
    policy = await script(SERVER_SET % "Actions.HELOname = 'n' .. #HeaderLines")
    headers = [f"X-Filler: {'y' * 988}" for _ in range(400)]
    assert (await policy.server_details("Q1", PARAMS, headers)).helo_name == "n102"


async def test_a_stuck_worker_with_large_headers_never_freezes_the_loop(
        tmp_path: Path, events: Events) -> None:
    # Issue 10 item 4: the worker stuck in a C pattern stops reading; the requests
    # behind the stuck one (each with a big header) filled the socket and the send
    # polled without a deadline on the loop thread. Now every send and receive awaits
    # with a deadline.
    path = tmp_path / "mxout.lua"
    path.write_text(HANGS_ON_SUBJECT)
    policy = Policy(make_config(path, timeout=0.2))
    assert await policy.load()  # the worker runs the script now
    worker = policy._calls.worker
    assert worker is not None
    # Safety net for the old behaviour: unblock a frozen loop after 20 s so the test
    # fails on its assertions instead of hanging.
    rescue = threading.Timer(20, worker.process.kill)
    rescue.start()
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    try:
        batch = [request(queue_id="stuck", data=b"Subject: hang\r\n\r\n")] + [
            request(queue_id=f"big{i}", data=big_header(400 * 1024)) for i in range(15)]
        async with asyncio.timeout(policy.hard_timeout + 30):  # a bound only
            results = await policy.check_files(batch)
    finally:
        task.cancel()
        rescue.cancel()
        policy.close()
    assert results == [FileActions()] * len(batch)
    # The loop ticked through the call; no pause as long as the deadline itself (the
    # old channel froze it for the whole time, and no tick ran at all).
    assert len(gaps) >= 3 and max(gaps) < policy.hard_timeout, gaps
    assert {e["id"] for e in events.of("script_error")} == {r.queue_id for r in batch}


async def test_nan_priority_says_so(script: Any, events: Events) -> None:
    policy = await script(CHECK_SET % ("Priority", "0/0"))
    assert await policy.check_file(request()) == FileActions()
    [error] = events.of("script_error")
    assert error["error"] == "Priority: is not a number (NaN, such as 0/0); using the default"


async def test_a_message_that_hangs_the_script_twice_is_not_given_to_it_again(
        tmp_path: Path, events: Events) -> None:
    # Each hang in C costs a worker restart; a message whose calls always hang would
    # cost one on every attempt, for every server (issue 10 item 14).
    path = tmp_path / "mxout.lua"
    path.write_text(HANGS_ON_SUBJECT)
    policy = Policy(make_config(path, timeout=0.2))
    hang = request(queue_id="Qhang", data=b"Subject: hang\r\n\r\n")
    try:
        for _ in range(2):
            assert await policy.check_file(hang) == FileActions()
        assert len([e for e in events.of("script_error") if "killed" in e["error"]]) == 2
        worker = policy._calls.worker
        assert await policy.check_file(hang) == FileActions()
        assert await policy.server_details("Qhang", PARAMS, []) == server()
        assert policy._calls.worker is worker  # not asked: no hang, no worker killed
        assert len([e for e in events.of("script_error") if "killed" in e["error"]]) == 2
        refused = [e for e in events.of("script_error") if "hung 2 times" in e["error"]]
        assert [e["id"] for e in refused] == ["Qhang", "Qhang"]
        # Other messages still go to the script, and a new version is asked again.
        assert (await policy.check_file(request())).priority == 77
        write_in_place(path, HANGS_ON_SUBJECT.replace("77", "78"))
        assert await policy.load()
        assert (await policy.check_file(request())).priority == 78
        events.records.clear()
        assert await policy.check_file(hang) == FileActions()
        assert any("killed" in e["error"] for e in events.of("script_error"))
    finally:
        policy.close()


async def test_check_files_answers_a_batch_in_order(script: Any, events: Events) -> None:
    policy = await script("""
function CheckFile(f, a, size, c, r, l, rp, rcpts, hd)
  a.Priority = tonumber(hd["x-prio"]) or 50
  if hd["x-prio"] == "13" then error("unlucky") end
  return a
end
""")
    requests = [request(queue_id=f"Q{i}", data=f"X-Prio: {i}\r\n\r\n".encode())
                for i in range(1, 41)]  # more than one chunk
    results = await policy.check_files(requests)
    assert [a.priority for a in results] == [50 if i == 13 else i for i in range(1, 41)]
    [error] = events.of("script_error")
    assert error["id"] == "Q13" and "unlucky" in error["error"]


async def test_a_stuck_call_in_a_batch_spares_the_calls_before_it(tmp_path: Path,
                                                                  events: Events) -> None:
    path = tmp_path / "mxout.lua"
    path.write_text(HANGS_ON_SUBJECT)
    policy = Policy(make_config(path, timeout=0.2))
    try:
        batch = [request(queue_id="ok1"), request(queue_id="stuck",
                                                  data=b"Subject: hang\r\n\r\n"),
                 request(queue_id="after")]
        results = await policy.check_files(batch)
        assert [a.priority for a in results] == [77, 50, 50]
        assert sorted(e["id"] for e in events.of("script_error")) == ["after", "stuck"]
        assert (await policy.check_file(request())).priority == 77  # a fresh worker
    finally:
        policy.close()


async def test_new_mails_calls_go_before_a_backlog_at_the_worker(tmp_path: Path) -> None:
    # A retry sweep keeps hundreds of calls waiting for the one worker; new mail's go
    # in the next round of CALL_CHUNK, not after all of them (issue 16 item 7).
    path = tmp_path / "mxout.lua"
    path.write_text("function CheckFile(f, a) local n = 0 for i = 1, 20000 do n = n + i end"
                    " return a end")
    policy = Policy(make_config(path))
    try:
        await policy.check_file(request())  # the worker is up and the script loaded
        finished: list[str] = []

        async def check(queue_id: str, urgent: bool) -> None:
            await policy.check_files([request(queue_id=queue_id)],
                                     urgent={queue_id} if urgent else ())
            finished.append(queue_id)

        backlog = [asyncio.create_task(check(f"swept{i}", False)) for i in range(96)]
        await asyncio.sleep(0)  # the first round is on its way to the worker
        await asyncio.gather(check("new", True), check("new-not-urgent", False), *backlog)
        assert finished.index("new") < 40  # within the first rounds of 16
        assert finished.index("new-not-urgent") == len(finished) - 1  # behind them all
    finally:
        policy.close()


async def test_top_level_error_keeps_the_previous_version(tmp_path: Path,
                                                          events: Events) -> None:
    path = tmp_path / "mxout.lua"
    path.write_text("function CheckFile(f, a) a.Priority = 60 return a end")
    policy = Policy(make_config(path))
    try:
        assert (await policy.check_file(request())).priority == 60
        path.write_text("function CheckFile(f, a) a.Priority = 61 return a end\n"
                        "error('top level fails')")
        assert await policy.load() is False
        assert (await policy.check_file(request())).priority == 60
        path.write_text("function CheckFile(f, a) a.Priority = 62 return a end\nlocal x = = 1")
        assert await policy.load() is False
        assert (await policy.check_file(request())).priority == 60
        loads = [e for e in events.of("script_error") if e["function"] == "load"]
        assert "top level fails" in loads[0]["error"]
        assert "mxout.lua:2:" in loads[1]["error"]
    finally:
        policy.close()


async def test_missing_script_means_defaults_logged_once(tmp_path: Path,
                                                         events: Events) -> None:
    path = tmp_path / "absent.lua"
    policy = Policy(make_config(path))
    try:
        assert await policy.load() is False
        assert await policy.check_file(request()) == FileActions()
        assert await policy.server_details("Q1", PARAMS, []) == server()
        assert policy.default_server_actions() == server()
        logs = [e for e in events.records if e["event"] == "log"]
        assert len(logs) == 1 and "absent.lua" in logs[0]["message"]
        assert events.of("script_error") == []
    finally:
        policy.close()


def test_default_helo_is_the_fqdn(tmp_path: Path) -> None:
    import socket

    policy = Policy(Config(script=ScriptConfig(path=tmp_path / "none.lua")))
    try:
        assert policy.default_server_actions().helo_name == socket.getfqdn()
    finally:
        policy.close()


# --- reload -----------------------------------------------------------------------------

async def until(condition: Any, seconds: float = 10.0) -> None:
    """Poll `condition` (sync or async) until it holds; fail after `seconds`."""
    async with asyncio.timeout(seconds):
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)


async def stays(condition: Any, seconds: float = 1.0) -> bool:
    """True if `condition` holds throughout a bounded quiet window (polled)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not condition():
            return False
        await asyncio.sleep(0.02)
    return bool(condition())


async def priority_is(policy: Policy, wanted: int) -> bool:
    return (await policy.check_file(request())).priority == wanted


@pytest.fixture
async def watcher() -> Any:
    made = Watcher(asyncio.get_running_loop())
    yield made
    made.close()


async def test_reload_on_write_and_on_rename(tmp_path: Path, events: Events,
                                             watcher: Watcher) -> None:
    path = tmp_path / "mxout.lua"
    path.write_text("function CheckFile(f, a) a.Priority = 10 return a end")
    policy = Policy(make_config(path))
    policy.watch(watcher)
    try:
        assert await priority_is(policy, 10)
        # An editor that writes in place.
        write_in_place(path, "function CheckFile(f, a) a.Priority = 20 return a end")
        await until(lambda: priority_is(policy, 20))
        # An editor that writes a new file and renames it over the old one.
        temporary = tmp_path / ".mxout.lua.swp"
        temporary.write_text("function CheckFile(f, a) a.Priority = 30 return a end")
        os.replace(temporary, path)
        await until(lambda: priority_is(policy, 30))
        # A broken version is logged and the old one stays.
        path.write_text("function CheckFile(f, a) a.Priority = = 40 return a end")
        await until(lambda: events.of("script_error"))
        assert events.of("script_error")[0]["function"] == "load"
        assert await priority_is(policy, 30)
    finally:
        policy.close()


@pytest.mark.parametrize("broken", [False, True], ids=["good", "broken"])
async def test_one_change_is_one_reload_and_one_log_line(tmp_path: Path, events: Events,
                                                         watcher: Watcher,
                                                         broken: bool) -> None:
    # Issue 10 item 3: the reload's own read of the file counted as a change, so every
    # reload scheduled the next one (ten a second, forever).
    path = tmp_path / "mxout.lua"
    path.write_text("function CheckFile(f, a) a.Priority = 10 return a end")
    policy = Policy(make_config(path))
    policy.watch(watcher)
    try:
        assert await priority_is(policy, 10)
        reads = policy.reads
        events.records.clear()
        write_in_place(path, "function CheckFile(f, a) a.Priority = 20 %s return a end"
                       % ("= =" if broken else ""))
        await until(lambda: policy.reads > reads)
        assert await stays(lambda: policy.reads == reads + 1), policy.reads - reads
        lines = [e for e in events.records
                 if e["event"] == "script_error" or "reloaded" in e.get("message", "")]
        assert len(lines) == 1, lines
        assert (lines[0]["event"] == "script_error") is broken
        assert await priority_is(policy, 10 if broken else 20)
    finally:
        policy.close()


async def test_reconfigure_takes_the_new_helo_default(tmp_path: Path) -> None:
    path = tmp_path / "mxout.lua"
    path.write_text("function ServerDetails(p, h, a) return a end\n")
    policy = Policy(make_config(path))
    try:
        assert (await policy.server_details("Q", PARAMS, [])).helo_name == "out.example.com"
        config = Config(script=ScriptConfig(path=path, timeout=1.0, memory=32 * 1024**2),
                        smtp=SmtpConfig(helo_name="new.example.com"))
        policy.reconfigure(config)
        assert (await policy.server_details("Q", PARAMS, [])).helo_name == "new.example.com"
    finally:
        policy.close()


async def test_a_missing_server_details_is_not_asked_again(tmp_path: Path,
                                                           events: Events) -> None:
    path = tmp_path / "mxout.lua"
    path.write_text("function CheckFile(f, a) return a end\n")
    policy = Policy(make_config(path))
    try:
        first = await policy.server_details("Q1", PARAMS, [])
        assert first == policy.default_server_actions()
        assert len(events.of("script_error")) == 1  # "no function ServerDetails", once
        policy._calls.kill_worker()
        again = await policy.server_details("Q2", PARAMS, [])
        assert again == first
        assert policy._calls.worker is None  # answered without starting a worker to ask
        # A new version of the script is asked again.
        write_in_place(path, "function ServerDetails(p, h, a) a.HELOname = 'x.test' "
                             "return a end\n")
        assert await policy.load()
        assert (await policy.server_details("Q3", PARAMS, [])).helo_name == "x.test"
    finally:
        policy.close()


async def test_the_daemon_logs_one_error_per_broken_edit(tmp_path: Path, daemon: Any) -> None:
    # Issue 10 items 3 and 12 end to end: a real daemon, the script edited once into a
    # version that does not compile: exactly one script_error (at level error), not
    # ten a second; the daemon keeps the previous version.
    from tests.fixtures.daemon import wait_until, write_config

    script = tmp_path / "mxout.lua"
    script.write_text("function CheckFile(f, a) return a end\n")
    config = write_config(tmp_path, {"smtp": {"helo_name": "mxsend.test"},
                                     "log": {"level": "info"}})
    process = daemon(config)
    try:
        wait_until(lambda: "mxsend started" in process.output(), 15,
                   message="the daemon started")
        write_in_place(script, "function CheckFile(f, a)\n  return = a\nend\n")
        [error] = process.wait_event("script_error", function="load")
        assert error["level"] == "error" and "mxout.lua:2:" in error["error"]
        assert await stays(lambda: len(process.find("script_error")) == 1, 1.5), \
            process.output()
    finally:
        assert process.stop() == 0, process.output()
