"""VPOP3 8.8's hooks end to end (contract §9): the daemon as a real process, real SMTP
receivers on 127.0.0.x, a real DNS server, the operator's two scripts as files."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mxsend.spool import Spool
from tests.fixtures.daemon import REPO, DaemonProcess, wait_until, write_config
from tests.fixtures.dns_server import DnsTestServer
from tests.fixtures.smtp_receiver import Behaviour, ReceiverGroup
from tests.test_daemon_e2e import drop

pytestmark = pytest.mark.slow

Start = Callable[..., DaemonProcess]

# Written the way VPOP3's documentation writes its examples: globals, string keys,
# 0/1 flags. It runs unchanged.
MXOUT = """\
print("connection " .. ConnectionId .. " " .. ConnectionName)

function CheckFile(Filename, Actions, Size, CreationTime, Retries, LastTryTime,
                   ReturnPath, Recipients, HeaderData, HeaderLines)
  return Actions
end

function ServerDetails(params, headers, actions)
  actions["useBATV"] = %(batv)d
  return actions
end

-- Turn a hard "no such user" into a soft one: the user is being created.
function ReturnCodeHandler(LastCommand, FullResponse, LastLine)
  if LastCommand == "RCPT TO" and string.sub(LastLine, 1, 3) == "550" then
    return "450 4.2.0 mailbox being created (" .. ConnectionName .. ")"
  end
  return nil
end

-- SRS-like rewriting of the return path.
function ModifyReturnPath(ComputedMailFrom, MailFrom, OriginalMailFrom, AuthSender,
                          Recipients, CreationTime, Headers, Size, SenderIPAddress,
                          Subject, AllRecipients)
  if Subject == "rewrite" then
    local user, domain = string.match(ComputedMailFrom, "^(.*)@(.*)$")
    return "srs0=" .. user .. "=" .. domain .. "@relay.test"
  end
  if Subject == "broken" then
    return "bad\\r\\naddress@x.test"
  end
  return nil
end
"""

RULES = """\
function GetCheckCache(Domain, Retries, Size)
  return true
end

function GetOverrides(Domain, Retries, Size)
  if Domain == "smart.test" then
    return "[127.0.0.3]:%(port)d", true
  end
  if Domain == "stop.test" then
    return nil, false
  end
  return nil
end

function CheckServer(Domain, MXServer, Retries, Size, DefaultResult)
  if MXServer == "mxa.d3.test" then return false, 0 end
  if Domain == "skip.test" then return false, 0 end
  if Domain == "hold.test" then return true, 30 end
  return DefaultResult, 0
end
"""


@pytest.fixture
def dns(dns_server: DnsTestServer) -> DnsTestServer:
    dns_server.add_mx("d1.test", 10, "mx1.d1.test")
    dns_server.add_a("mx1.d1.test", "127.0.0.2")
    dns_server.add_mx("d3.test", 10, "mxa.d3.test")
    dns_server.add_mx("d3.test", 20, "mxb.d3.test")
    dns_server.add_a("mxa.d3.test", "127.0.0.5")
    dns_server.add_a("mxb.d3.test", "127.0.0.6")
    for domain in ("skip.test", "hold.test", "stop.test"):
        dns_server.add_mx(domain, 10, f"mx.{domain}")
        dns_server.add_a(f"mx.{domain}", "127.0.0.7")
    return dns_server


def _config(tmp_path: Path, dns: DnsTestServer, smtp: ReceiverGroup, *, batv: bool = False,
            rules: str | None = RULES, mxout: str = MXOUT) -> Path:
    (tmp_path / "mxout.lua").write_text(mxout % {"batv": int(batv)})
    script: dict[str, object] = {"connection_id": 7, "connection_name": "outbound-eu"}
    if rules is not None:
        (tmp_path / "mxserverrules.lua").write_text(rules % {"port": smtp.port})
        script["server_rules_path"] = str(tmp_path / "mxserverrules.lua")
    sections: dict[str, dict[str, object]] = {
        "dns": {"nameservers": [dns.nameserver], "timeout": "2s", "ipv6": False},
        "smtp": {"port": smtp.port, "helo_name": "mxsend.test"},
        "script": script,
        # Long enough that a deferred message is not tried again during a test.
        "queue": {"retry": ["10m"]},
    }
    if batv:
        (tmp_path / "batv.key").write_text("a-secret\n")
        sections["batv"] = {"key_file": str(tmp_path / "batv.key")}
    return write_config(tmp_path, sections)


def _states(spool: Path) -> dict[str, object]:
    return {state.id: state for state, _ in Spool(spool, owner="test-observer").entries()}


def test_a_vpop3_88_script_with_every_hook_runs_unchanged(
        tmp_path: Path, dns: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start) -> None:
    smtp = smtp_receivers
    mx1 = smtp.start("127.0.0.2", behaviour=Behaviour(
        rcpt={"new@d1.test": "550 5.1.1 no such user"}))
    smart = smtp.start("127.0.0.3")
    mxa = smtp.start("127.0.0.5")
    mxb = smtp.start("127.0.0.6")
    spool = tmp_path / "spool"
    drop(spool, "m1", "alice@src.test", "bob@d1.test", "new@d1.test", subject="rewrite")
    drop(spool, "m2", "alice@src.test", "carol@smart.test", "dave@d3.test", subject="plain")
    config = _config(tmp_path, dns, smtp)
    process = daemon(config, "--once")
    assert process.wait(60) == 0, process.output()
    # Globals: ConnectionId and ConnectionName, visible at the top level.
    assert process.find("script_log", message="connection 7 outbound-eu")
    # ReturnCodeHandler: 550 -> 450, a deferral with the script's text, not a bounce.
    [new] = process.find("delivery", recipient="new@d1.test")
    assert new["status"] == "deferred"
    assert new["response"].startswith("450 4.2.0 mailbox being created (outbound-eu)")
    assert not process.find("bounce")
    # ModifyReturnPath: the new envelope sender of that transaction.
    [m1] = mx1.messages
    assert m1.mail_from == "srs0=alice=src.test@relay.test"
    # GetOverrides: smart.test, which has no DNS at all, goes to the smart host.
    assert [m.rcpts for m in smart.messages] == [["carol@smart.test"]]
    assert smart.messages[0].mail_from == "alice@src.test"  # nil keeps the sender
    # CheckServer false for the first MX: the second one is used.
    assert not mxa.transactions
    assert [m.rcpts for m in mxb.messages] == [["dave@d3.test"]]
    assert not process.find("script_error"), process.output()


def test_modify_return_path_is_signed_by_batv_and_a_bad_one_is_a_script_error(
        tmp_path: Path, dns: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start) -> None:
    smtp = smtp_receivers
    mx1 = smtp.start("127.0.0.2")
    spool = tmp_path / "spool"
    drop(spool, "m1", "alice@src.test", "bob@d1.test", subject="rewrite")
    drop(spool, "m2", "alice@src.test", "carol@d1.test", subject="broken")
    process = daemon(_config(tmp_path, dns, smtp, batv=True, rules=None), "--once")
    assert process.wait(60) == 0, process.output()
    senders = {m.rcpts[0]: m.mail_from for m in mx1.messages}
    # BATV signs the address the script chose (prvs=KDDDSSSSSS=local@domain).
    assert senders["bob@d1.test"].startswith("prvs=")
    assert senders["bob@d1.test"].endswith("=srs0=alice=src.test@relay.test")
    # An address with a CR LF in it: script_error, the computed sender, never <>.
    assert senders["carol@d1.test"].startswith("prvs=")
    assert senders["carol@d1.test"].endswith("=alice@src.test")
    [error] = process.find("script_error", function="ModifyReturnPath")
    assert error["id"] == "m2"


def test_continue_false_defers_and_skip_or_hold_is_not_an_attempt(
        tmp_path: Path, dns: DnsTestServer, smtp_receivers: ReceiverGroup,
        daemon: Start) -> None:
    smtp = smtp_receivers
    mx = smtp.start("127.0.0.7")
    spool = tmp_path / "spool"
    drop(spool, "stop", "alice@src.test", "a@stop.test")
    drop(spool, "skip", "alice@src.test", "b@skip.test")
    drop(spool, "hold", "alice@src.test", "c@hold.test")
    before = time.time()
    process = daemon(_config(tmp_path, dns, smtp), "--once")
    assert process.wait(60) == 0, process.output()
    assert not mx.transactions
    [stop] = process.find("delivery", recipient="a@stop.test")
    assert stop["status"] == "deferred" and stop["relay"] is None
    assert "GetOverrides" in stop["response"]
    states = _states(spool)
    assert states["stop"].attempts == 1  # type: ignore[attr-defined]
    # Every server skipped: still queued, no error, no attempt counted.
    assert states["skip"].attempts == 0  # type: ignore[attr-defined]
    assert process.find("skipped", id="skip")
    assert not process.find("delivery", recipient="b@skip.test")
    # HoldMinutes = 30: held that long, not an attempt.
    assert states["hold"].attempts == 0  # type: ignore[attr-defined]
    next_try = states["hold"].next_try  # type: ignore[attr-defined]
    assert before + 29 * 60 < next_try < time.time() + 31 * 60
    assert not process.find("script_error"), process.output()


def test_a_broken_server_rules_script_stops_the_start(tmp_path: Path, dns: DnsTestServer,
                                                       smtp_receivers: ReceiverGroup) -> None:
    config = _config(tmp_path, dns, smtp_receivers,
                     rules="function GetOverrides(Domain)\n  return {\nend\n")
    result = subprocess.run([sys.executable, "-m", "mxsend", "-c", str(config), "run",
                             "--once"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{tmp_path / 'mxserverrules.lua'}:3:" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_rules_reload_on_change(tmp_path: Path, dns: DnsTestServer,
                                       smtp_receivers: ReceiverGroup, daemon: Start) -> None:
    smtp = smtp_receivers
    smart = smtp.start("127.0.0.3")
    blocked = RULES.replace('if Domain == "smart.test" then\n    return "[127.0.0.3]:%(port)d"',
                            'if Domain == "smart.test" then\n    return nil, false --')
    config = _config(tmp_path, dns, smtp, rules=blocked)
    spool = tmp_path / "spool"
    process = daemon(config)
    drop(spool, "m1", "alice@src.test", "carol@smart.test")
    process.wait_event("delivery", recipient="carol@smart.test", status="deferred")
    rules = tmp_path / "mxserverrules.lua"

    def reloads() -> int:
        return sum(f"{rules} reloaded" in line for line in list(process.lines))

    before = reloads()
    rules.write_text(RULES % {"port": smtp.port})
    # The watch reloads the new version (its own log line names the file), then a
    # flush makes the deferred message due now and the new version routes it.
    wait_until(lambda: reloads() > before, timeout=20,
               message=lambda: "no reload of mxserverrules.lua\n" + process.output())
    subprocess.run([sys.executable, "-m", "mxsend", "-c", str(config), "queue", "flush",
                    "m1"], cwd=REPO, capture_output=True, timeout=30, check=True)
    process.wait_event("delivery", recipient="carol@smart.test", status="sent")
    assert [m.rcpts for m in smart.messages] == [["carol@smart.test"]], process.output()
