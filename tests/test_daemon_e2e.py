"""End to end: the daemon as a real process, real SMTP receivers, a real DNS server."""

from __future__ import annotations

import dataclasses
import email
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message as EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mxsend.envelope import Envelope, Message, Recipient, serialise_bsmtp
from mxsend.spool import Spool
from tests.fixtures.daemon import DaemonProcess, hand_over, pid_alive, wait_until, write_config
from tests.fixtures.dns_server import DnsTestServer
from tests.fixtures.smtp_receiver import Behaviour, Receiver, ReceiverGroup

pytestmark = pytest.mark.slow

Start = Callable[..., DaemonProcess]


def _body(subject: str, extra: str = "") -> bytes:
    return (f"From: alice@src.test\r\nTo: someone\r\nSubject: {subject}\r\n{extra}"
            f"\r\nhello {subject}\r\n.leading dot\r\n").encode()


def drop(spool: Path, name: str, sender: str, *recipients: str, subject: str = "",
         notify: tuple[str, ...] | None = None, extra: str = "") -> None:
    """Write a Batch SMTP file the way a writer must: tmp/, fsync, rename into new/."""
    message = Message(
        Envelope(sender=sender,
                 recipients=tuple(Recipient(r, notify=notify) for r in recipients)),
        _body(subject or name, extra),
    )
    hand_over(spool, name, serialise_bsmtp(message))


def queued_ids(spool: Path) -> list[str]:
    return sorted(state.id for state, _ in Spool(spool, owner="test-observer").entries())


@dataclass
class World:
    """The DNS server and the receivers one end-to-end test talks to."""

    dns: DnsTestServer
    smtp: ReceiverGroup

    def home(self) -> Receiver:
        """The sender's own domain, src.test -> 127.0.0.4, where DSNs arrive."""
        self.dns.add_mx("src.test", 10, "mx.src.test")
        self.dns.add_a("mx.src.test", "127.0.0.4")
        return self.smtp.start("127.0.0.4")


@pytest.fixture
def world(tmp_path: Path, dns_server: DnsTestServer, smtp_receivers: ReceiverGroup) -> World:
    """Two domains: d1.test -> mx1 (127.0.0.2), d2.test -> mx2 (127.0.0.3)."""
    dns_server.add_mx("d1.test", 10, "mx1.d1.test")
    dns_server.add_a("mx1.d1.test", "127.0.0.2")
    dns_server.add_mx("d2.test", 10, "mx2.d2.test")
    dns_server.add_a("mx2.d2.test", "127.0.0.3")
    dns_server.add_null_mx("nullmx.test")
    return World(dns_server, smtp_receivers)


def _config(tmp_path: Path, world: World, **sections: dict[str, object]) -> Path:
    dns, smtp = world.dns, world.smtp
    base: dict[str, dict[str, object]] = {
        "dns": {"nameservers": [dns.nameserver], "timeout": "2s", "ipv6": False},
        "smtp": {"port": smtp.port, "helo_name": "mxsend.test"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return write_config(tmp_path, base)


def test_once_delivers_and_empties_the_spool(tmp_path: Path, world: World,
                                             daemon: Start) -> None:
    smtp = world.smtp
    mx1 = smtp.start("127.0.0.2")
    mx2 = smtp.start("127.0.0.3")
    spool = tmp_path / "spool"
    drop(spool, "m1", "alice@src.test", "bob@d1.test", "carol@d2.test", "dave@d1.test")
    config = _config(tmp_path, world)
    process = daemon(config, "--once")
    assert process.wait(60) == 0, process.output()
    assert len(mx1.messages) == 1 and len(mx2.messages) == 1
    assert sorted(mx1.messages[0].rcpts) == ["bob@d1.test", "dave@d1.test"]
    assert mx2.messages[0].rcpts == ["carol@d2.test"]
    assert mx1.messages[0].data == _body("m1")
    assert mx1.messages[0].session.helo_name == "mxsend.test"
    sent = process.find("delivery", status="sent")
    assert sorted(e["recipient"] for e in sent) == ["bob@d1.test", "carol@d2.test",
                                                    "dave@d1.test"]
    assert all(e["relay"].endswith(f":{smtp.port}") for e in sent)
    assert process.find("queued", id="m1")[0]["recipients"] == [
        "bob@d1.test", "carol@d2.test", "dave@d1.test"]
    assert queued_ids(spool) == []
    assert not any((spool / "msg").iterdir())


def _dsn_parts(raw: bytes) -> tuple[EmailMessage, list[EmailMessage]]:
    """The DSN as parsed by the email package and its per-recipient field blocks."""
    report = email.message_from_bytes(raw)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = report.get_payload()
    assert isinstance(parts, list)
    status = parts[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return report, blocks[1:]


def test_daemon_picks_up_a_dropped_file_and_says_ready(
    tmp_path: Path, world: World, daemon: Start
) -> None:
    smtp = world.smtp
    mx1 = smtp.start("127.0.0.2")
    spool = tmp_path / "spool"
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(20)
        process = daemon(_config(tmp_path, world, queue={"scan_interval": "1h"}),
                         env={"NOTIFY_SOCKET": str(notify_path)})
        assert notify.recv(64) == b"READY=1"
        # The rescan is an hour away: only the watch on new/ can pick this up.
        drop(spool, "late", "alice@src.test", "bob@d1.test")
        mx1.wait_for(1, timeout=15)
        process.wait_event("delivery", id="late", status="sent")
        assert process.stop() == 0
        states = []
        while True:
            try:
                states.append(notify.recv(64))
            except TimeoutError:
                break
            if states[-1] == b"STOPPING=1":
                break
        assert b"STOPPING=1" in states
    assert queued_ids(spool) == []


def test_bad_file_is_quarantined_and_the_good_one_delivered(
    tmp_path: Path, world: World, daemon: Start
) -> None:
    smtp = world.smtp
    mx1 = smtp.start("127.0.0.2")
    spool = tmp_path / "spool"
    (spool / "new").mkdir(parents=True)
    (spool / "new" / "broken").write_bytes(b"MAIL FROM:<a@src.test>\nDATA\nx\n.\n")
    drop(spool, "good", "alice@src.test", "bob@d1.test")
    process = daemon(_config(tmp_path, world), "--once")
    assert process.wait(60) == 0, process.output()
    assert len(mx1.messages) == 1
    assert (spool / "bad" / "broken").read_bytes() == b"MAIL FROM:<a@src.test>\nDATA\nx\n.\n"
    assert "RCPT" in (spool / "bad" / "broken.reason").read_text()
    assert process.find("quarantined", id="broken")


def test_permanent_failure_bounces_with_a_dsn_to_the_sender(
    tmp_path: Path, world: World, daemon: Start
) -> None:
    smtp = world.smtp
    smtp.start("127.0.0.2", behaviour=Behaviour(rcpt={"nobody@d1.test":
                                                      "550 5.1.1 no such user"}))
    home = world.home()
    spool = tmp_path / "spool"
    drop(spool, "m", "alice@src.test", "bob@d1.test", "nobody@d1.test", "x@nullmx.test")
    process = daemon(_config(tmp_path, world), "--once")
    assert process.wait(60) == 0, process.output()
    bounced = {e["recipient"]: e for e in process.find("delivery", status="bounced")}
    assert bounced["nobody@d1.test"]["dsn"] == "5.1.1"
    assert bounced["x@nullmx.test"]["relay"] is None
    assert bounced["x@nullmx.test"]["dsn"] == "5.1.10"
    assert process.find("bounce", id="m")
    # The DSN itself was queued into the same spool and delivered, from <>.
    home.wait_for(1, timeout=15)
    dsn = home.messages[0]
    assert dsn.mail_from == "" and dsn.rcpts == ["alice@src.test"]
    _, blocks = _dsn_parts(dsn.data)
    fields = {b["Final-Recipient"].split(";")[1].strip(): b for b in blocks}
    assert set(fields) == {"nobody@d1.test", "x@nullmx.test"}
    assert fields["nobody@d1.test"]["Action"] == "failed"
    assert fields["nobody@d1.test"]["Status"] == "5.1.1"
    assert "550" in fields["nobody@d1.test"]["Diagnostic-Code"]
    assert fields["x@nullmx.test"]["Status"] == "5.1.10"
    assert "null MX" in fields["x@nullmx.test"]["Diagnostic-Code"]
    assert queued_ids(spool) == []


def test_temporary_failure_is_retried_on_schedule(
    tmp_path: Path, world: World, daemon: Start
) -> None:
    smtp = world.smtp
    mx1 = smtp.start("127.0.0.2", behaviour=Behaviour(mail="451 4.3.0 try later"))
    spool = tmp_path / "spool"
    drop(spool, "r", "alice@src.test", "bob@d1.test")
    process = daemon(_config(tmp_path, world, queue={"retry": ["2s"]}))
    deferred = process.wait_event("delivery", id="r", status="deferred")[0]
    assert deferred["dsn"] == "4.3.0" and deferred["attempt"] == 1
    mx1.behaviour.mail = None  # the server recovers
    sent = process.wait_event("delivery", id="r", status="sent", timeout=20)[0]
    assert sent["attempt"] == 2
    assert len(mx1.messages) == 1
    wait_until(lambda: queued_ids(spool) == [], 10, message="spool empty")


def test_force_last_try_and_skip_send_from_the_script(
    tmp_path: Path, world: World, daemon: Start
) -> None:
    smtp = world.smtp
    mx1 = smtp.start("127.0.0.2", behaviour=Behaviour(rcpt={"late@d1.test": "451 4.2.1 busy"}))
    hold = tmp_path / "hold"
    hold.write_text("x")
    (tmp_path / "mxout.lua").write_text(f"""
function CheckFile(Filename, Actions, Size, CreationTime, Retries, LastTryTime,
                   ReturnPath, Recipients, HeaderData, HeaderLines)
  if HeaderData["x-hold"] then
    local f = io.open("{hold}", "r")
    if f then f:close(); Actions.SkipSend = true; Actions.Reason = "held" end
  end
  if HeaderData["X-Last"] then Actions.ForceLastTry = true end
  return Actions
end
""")
    spool = tmp_path / "spool"
    drop(spool, "last", "<>".strip("<>"), "late@d1.test", extra="X-Last: yes\r\n")
    drop(spool, "held", "alice@src.test", "bob@d1.test", extra="X-Hold: yes\r\n")
    process = daemon(_config(tmp_path, world))
    bounced = process.wait_event("delivery", id="last", status="bounced")[0]
    assert bounced["response"].startswith("the last try")
    assert "451 4.2.1 busy" in bounced["response"]
    assert process.wait_event("skipped", id="held", count=2)[0]["reason"] == "held"
    assert mx1.messages == []
    hold.unlink()
    process.wait_event("delivery", id="held", status="sent", timeout=20)
    # A skip is not an attempt: the first real attempt is attempt 1.
    assert process.find("delivery", id="held", status="sent")[0]["attempt"] == 1


def test_priorities_are_taken_highest_first(
    tmp_path: Path, world: World, daemon: Start
) -> None:
    smtp = world.smtp
    mx1 = smtp.start("127.0.0.2")
    (tmp_path / "mxout.lua").write_text("""
function CheckFile(Filename, Actions, Size, CreationTime, Retries, LastTryTime,
                   ReturnPath, Recipients, HeaderData, HeaderLines)
  Actions.Priority = tonumber(HeaderData["X-Prio"]) or 50
  return Actions
end
""")
    spool = tmp_path / "spool"
    for name, prio in [("p10", 10), ("p90", 90), ("p50", 50), ("p100", 100), ("p1", 1)]:
        drop(spool, name, "alice@src.test", "bob@d1.test", subject=name,
             extra=f"X-Prio: {prio}\r\n")
    process = daemon(_config(tmp_path, world, smtp={"max_connections": 1}), "--once")
    assert process.wait(60) == 0, process.output()
    order = [m.data.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for m in mx1.messages]
    assert order == ["p100", "p90", "p50", "p10", "p1"]


def test_expired_message_bounces_after_max_age(
    tmp_path: Path, world: World, daemon: Start
) -> None:
    smtp = world.smtp
    smtp.start("127.0.0.2", behaviour=Behaviour(rcpt={"*": "452 4.2.2 mailbox full"}))
    home = world.home()
    spool = tmp_path / "spool"
    drop(spool, "old", "alice@src.test", "bob@d1.test")
    process = daemon(_config(tmp_path, world, queue={"retry": ["1s"], "max_age": "3s"}))
    bounced = process.wait_event("delivery", id="old", status="bounced", timeout=30)[0]
    assert bounced["dsn"] == "4.2.2"
    assert "expired" in bounced["response"]
    assert len(process.find("delivery", id="old", status="deferred")) >= 1
    home.wait_for(1, timeout=15)
    _, blocks = _dsn_parts(home.messages[0].data)
    assert blocks[0]["Action"] == "failed"
    wait_until(lambda: queued_ids(spool) == [], 10, message="spool empty")


def test_sigterm_mid_transaction_keeps_the_message(
    tmp_path: Path, world: World, daemon: Start
) -> None:
    smtp = world.smtp
    mx1 = smtp.start("127.0.0.2", behaviour=Behaviour(stall="dataend", stall_seconds=60))
    spool = tmp_path / "spool"
    drop(spool, "slow", "alice@src.test", "bob@d1.test")
    config = _config(tmp_path, world, queue={"shutdown_grace": "1s", "retry": ["1s"]})
    process = daemon(config)
    wait_until(lambda: any(s.transactions and s.transactions[-1].data is not None
                           for s in mx1.sessions) or (mx1.sessions and
               any("DATA" in c for s in mx1.sessions for c in s.commands)),
               15, message="the transaction to reach DATA")
    process.signal(signal.SIGTERM)
    assert process.wait(20) == 0, process.output()
    assert not process.find("delivery", status="sent")
    assert queued_ids(spool) == ["slow"]
    # After a restart against a healthy server the message goes out, once.
    mx1.behaviour.stall = None
    again = daemon(config, "--once")
    assert again.wait(60) == 0, again.output()
    assert len(mx1.messages) == 1
    assert queued_ids(spool) == []


def test_two_daemons_on_one_spool_deliver_each_message_once(
    tmp_path: Path, world: World, daemon: Start
) -> None:
    smtp = world.smtp
    mx1 = smtp.start("127.0.0.2")
    spool = tmp_path / "spool"
    config = _config(tmp_path, world)
    first, second = daemon(config), daemon(config)
    for process in (first, second):
        wait_until(lambda p=process: p.find("log") or p.lines, 15, message="daemon start")
    names = [f"m{i:03d}" for i in range(60)]
    for name in names:
        drop(spool, name, "alice@src.test", f"{name}@d1.test")
    mx1.wait_for(len(names), timeout=60)
    wait_until(lambda: queued_ids(spool) == [], 20, message="spool empty")
    received = sorted(r for m in mx1.messages for r in m.rcpts)
    assert received == sorted(f"{n}@d1.test" for n in names)  # each exactly once
    sent_by = [len(p.find("delivery", status="sent")) for p in (first, second)]
    assert sum(sent_by) == len(names)


def test_sigkill_and_restart_lose_nothing(
    tmp_path: Path, world: World, daemon: Start
) -> None:
    smtp = world.smtp
    # d1 accepts at once; d2 stalls before its final reply, so the kill lands with one
    # domain recorded as sent and the other mid-transaction.
    mx1 = smtp.start("127.0.0.2")
    mx2 = smtp.start("127.0.0.3", behaviour=Behaviour(stall="dataend", stall_seconds=60))
    spool = tmp_path / "spool"
    drop(spool, "k", "alice@src.test", "bob@d1.test", "carol@d2.test")
    for i in range(5):
        drop(spool, f"q{i}", "alice@src.test", f"r{i}@d1.test")
    config = _config(tmp_path, world)
    process = daemon(config)
    process.wait_event("delivery", id="k", status="sent")
    wait_until(lambda: any(t.rcpts and not t.accepted for s in mx2.sessions
                           for t in s.transactions), 15, message="d2 mid-DATA")
    process.wait_event("delivery", status="sent", count=6)
    # The q messages are complete once their files are gone (the event comes first).
    wait_until(lambda: queued_ids(spool) == ["k"], 15, message="only k left")
    process.signal(signal.SIGKILL)
    process.wait(10)
    assert queued_ids(spool) == ["k"]
    mx2.behaviour.stall = None
    # A restart on the same host sees the old PID is gone and recovers its claim at once.
    again = daemon(config)
    again.wait_event("delivery", id="k", recipient="carol@d2.test", status="sent", timeout=30)
    wait_until(lambda: queued_ids(spool) == [], 15, message="spool empty")
    # bob was recorded before the kill: never sent again.
    bobs = [m for m in mx1.messages if "bob@d1.test" in m.rcpts]
    assert len(bobs) == 1
    assert len(mx2.messages) == 1
    assert again.find("delivery", id="k")[0]["attempt"] == 2


def test_delay_warning_and_relayed_reports(
    tmp_path: Path, world: World, daemon: Start
) -> None:
    smtp = world.smtp
    # d1 keeps deferring; d2 takes the message but offers no DSN extension.
    smtp.start("127.0.0.2", behaviour=Behaviour(rcpt={"*": "451 4.4.1 not now"}))
    mx2 = smtp.start("127.0.0.3", behaviour=Behaviour(dsn=False))
    home = world.home()
    spool = tmp_path / "spool"
    drop(spool, "slow", "alice@src.test", "bob@d1.test", notify=("DELAY", "FAILURE"))
    drop(spool, "ok", "alice@src.test", "carol@d2.test", notify=("SUCCESS",))
    drop(spool, "quiet", "alice@src.test", "dan@d1.test", notify=("NEVER",))
    process = daemon(_config(tmp_path, world, queue={"retry": ["1s"], "delay_warning": "1s"}))
    home.wait_for(2, timeout=30)
    mx2.wait_for(1)
    assert "NOTIFY=SUCCESS" not in " ".join(mx2.messages[0].rcpt_params.get("carol@d2.test", []))
    reports = {}
    for received in home.messages:
        assert received.mail_from == ""
        _, blocks = _dsn_parts(received.data)
        for block in blocks:
            reports[block["Final-Recipient"].split(";")[1].strip()] = block
    assert reports["bob@d1.test"]["Action"] == "delayed"
    assert reports["bob@d1.test"]["Status"].startswith("4.")
    assert "Will-Retry-Until" in reports["bob@d1.test"]
    assert reports["carol@d2.test"]["Action"] == "relayed"
    assert "dan@d1.test" not in reports  # NOTIFY=NEVER
    # One delay notice only, however many retries follow.
    process.wait_event("delivery", id="slow", status="deferred", count=3, timeout=20)
    assert len([e for e in process.find("bounce") if e["id"] == "slow"]) == 1


def test_health_follows_the_daemons_heartbeat(
    tmp_path: Path, world: World, daemon: Start
) -> None:
    config = _config(tmp_path, world)

    def health() -> int:
        return subprocess.run([sys.executable, "-m", "mxsend", "-c", str(config), "health"],
                              capture_output=True, timeout=30).returncode

    assert health() == 1
    process = daemon(config)
    wait_until(lambda: health() == 0, 15, message="healthy")
    assert process.stop() == 0
    assert health() == 1  # a clean exit removes the heartbeat


def test_sighup_reloads_the_config(tmp_path: Path, world: World,
                                   daemon: Start) -> None:
    smtp = world.smtp
    mx1 = smtp.start("127.0.0.2")
    spool = tmp_path / "spool"
    config = _config(tmp_path, world)
    process = daemon(config)
    drop(spool, "before", "alice@src.test", "bob@d1.test")
    mx1.wait_for(1, timeout=15)
    assert mx1.messages[0].session.helo_name == "mxsend.test"
    config.write_text(config.read_text().replace('helo_name = "mxsend.test"',
                                                  'helo_name = "reloaded.test"'))
    process.signal(signal.SIGHUP)
    wait_until(lambda: any("configuration reloaded" in line for line in process.lines), 15,
               message="the reload to be logged")
    drop(spool, "after", "alice@src.test", "bob@d1.test")
    mx1.wait_for(2, timeout=15)
    assert mx1.messages[1].session.helo_name == "reloaded.test"
    # A config that no longer parses is refused and the running one kept.
    config.write_text("[smtp]\nport = 'not a number'\n")
    process.signal(signal.SIGHUP)
    wait_until(lambda: any("config not reloaded" in line for line in process.lines), 15,
               message="the refusal to be logged")
    drop(spool, "still", "alice@src.test", "bob@d1.test")
    mx1.wait_for(3, timeout=15)
    assert process.stop() == 0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_several_processes_share_the_work_once(tmp_path: Path, world: World,
                                               daemon: Start) -> None:
    smtp = world.smtp
    mx1 = smtp.start("127.0.0.2")
    spool = tmp_path / "spool"
    names = [f"p{i:03d}" for i in range(60)]
    for name in names:
        drop(spool, name, "alice@src.test", f"{name}@d1.test")
    process = daemon(_config(tmp_path, world, queue={"processes": 2}), "--once")
    assert process.wait(60) == 0, process.output()
    received = sorted(r for m in mx1.messages for r in m.rcpts)
    assert received == sorted(f"{n}@d1.test" for n in names)  # each exactly once
    assert queued_ids(spool) == []


def test_supervisor_readiness_restart_and_stop(tmp_path: Path, world: World,
                                               daemon: Start) -> None:
    smtp = world.smtp
    mx1 = smtp.start("127.0.0.2")
    spool = tmp_path / "spool"
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(30)
        process = daemon(_config(tmp_path, world, queue={"processes": 2}),
                         env={"NOTIFY_SOCKET": str(notify_path)})
        assert notify.recv(64) == b"READY=1"  # once, from the supervisor, when both are
        children = wait_until(lambda: len(_children(process.pid)) == 2 and
                              _children(process.pid), 15, message="two daemons")
        live = Spool(spool, owner="test-observer").live_owners(15, time.time())
        assert len(live) == 2
        # A daemon that dies is replaced, and mail keeps flowing.
        os.kill(children[0], signal.SIGKILL)
        wait_until(lambda: len(_children(process.pid)) == 2 and
                   children[0] not in _children(process.pid), 15,
                   message="the killed daemon to be replaced")
        wait_until(lambda: len(process.find("log")) and sum(
            "mxsend started" in e.get("message", "") for e in process.find("log")) == 3, 15,
            message="the new daemon to start")
        for i in range(10):
            drop(spool, f"s{i}", "alice@src.test", f"s{i}@d1.test")
        mx1.wait_for(10, timeout=30)
        now_children = _children(process.pid)
        assert process.stop() == 0, process.output()
        assert not any(pid_alive(pid) for pid in now_children)
    assert queued_ids(spool) == []


def _wait_started(process: DaemonProcess) -> None:
    """Until the daemon has recovered and entered its scan loop ("mxsend started"), not
    merely written its first line: a test that breaks a folder before then breaks
    recovery instead (seen on a loaded machine)."""
    wait_until(lambda: any("mxsend started" in line for line in process.lines), 15,
               message=process.output)


def test_a_failing_scan_is_logged_and_retried(tmp_path: Path, world: World,
                                              daemon: Start) -> None:
    mx1 = world.smtp.start("127.0.0.2")
    spool = tmp_path / "spool"
    process = daemon(_config(tmp_path, world))
    _wait_started(process)  # the spool folders exist and recovery is over
    # queue/ replaced by a file: every scan of it fails with NotADirectoryError.
    os.rename(spool / "queue", spool / "queue.saved")
    (spool / "queue").write_text("not a folder")
    (spool / "control" / "rescan").write_text("")
    wait_until(lambda: any("scan failed" in line for line in process.lines), 15,
               message="the failed scan to be logged")
    (spool / "queue").unlink()
    os.rename(spool / "queue.saved", spool / "queue")
    drop(spool, "after", "alice@src.test", "bob@d1.test")
    mx1.wait_for(1, timeout=30)
    assert process.proc.poll() is None  # still running
    assert process.stop() == 0


def test_new_mail_goes_out_while_a_rescan_of_queue_is_slow(
        tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # A rescan of a million-file queue/ takes seconds (issue 16 item 7: a retry sweep
    # must not starve new mail). Such a queue cannot be made in a test's time, so the
    # daemon runs in this process and its second listing of queue/ is held until the new
    # message has been delivered; everything else is real.
    import asyncio
    import threading

    from mxsend.config import load_config
    from mxsend.scheduler import Daemon
    from mxsend.spool_view import QueueView

    mx1 = world.smtp.start("127.0.0.2")
    spool = tmp_path / "spool"
    config = load_config(_config(tmp_path, world, queue={"scan_interval": "1h"}))
    listing = QueueView.queued_earliest
    held, release, calls = threading.Event(), threading.Event(), [0]

    def slow_listing(view: QueueView, limit: int) -> tuple[list[tuple[float, str]], float | None]:
        calls[0] += 1
        if calls[0] == 2:  # the first is the start's
            held.set()
            release.wait(60)
        return listing(view, limit)

    monkeypatch.setattr(QueueView, "queued_earliest", slow_listing)

    async def scenario() -> None:
        daemon = Daemon(config)
        running = asyncio.create_task(daemon.run())
        try:
            await asyncio.to_thread(wait_until, lambda: calls[0] == 1 and
                                    (spool / "control").is_dir(), 15, message="started")
            (spool / "control" / "rescan").write_text("")
            assert await asyncio.to_thread(held.wait, 15), "the rescan did not start"
            drop(spool, "new-during-rescan", "alice@src.test", "bob@d1.test")
            await asyncio.to_thread(mx1.wait_for, 1, 15)
            assert not release.is_set() and calls[0] == 2  # the listing is still held
        finally:
            release.set()
            daemon._stopping.set()
            await asyncio.wait_for(running, 30)

    asyncio.run(scenario())
    assert mx1.messages[0].rcpts == ["bob@d1.test"]


def test_the_next_end_of_data_goes_once_the_record_is_durable_not_after_tidying(
        tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Contract §1 holds a connection's next final dot until the previous message is
    # recorded. A delivered message is recorded once its msg/ file's removal is durable;
    # its state's removal after that is tidying (docs/spool.md). Here the tidying
    # barrier is held until the second message has arrived (bounded): it arrives only
    # if its dot went at the record point. One connection, so both share it.
    import asyncio
    import time

    import mxsend.durable as durable
    from mxsend.config import load_config
    from mxsend.scheduler import Daemon

    if not durable.GroupCommit.available():
        pytest.skip("no syncfs(2): every barrier is its own fsync, none to hold")
    mx1 = world.smtp.start("127.0.0.2")
    spool = tmp_path / "spool"
    drop(spool, "m1", "alice@src.test", "a@d1.test")
    drop(spool, "m2", "alice@src.test", "b@d1.test")
    config = load_config(_config(tmp_path, world,
                                 smtp={"max_connections_per_domain": 1}))
    real_syncfs = durable._syncfs
    held: list[bool] = []  # for each barrier held: whether the second message came

    def tidied(first: str) -> bool:
        """The first delivered message is gone from msg/ and its state removed."""
        return (not (spool / "msg" / first).exists()
                and not any((spool / "active").glob(f"*/{first}")))

    def syncfs(fd: int) -> None:
        # The second message may come before this barrier or while it is held; either
        # way before it ends, which without the early record it cannot: its dot would
        # wait for the end of the first message's spool operation, after this barrier.
        if mx1.messages and not held:
            first = {"a@d1.test": "m1", "b@d1.test": "m2"}[mx1.messages[0].rcpts[0]]
            if tidied(first):  # this is the first message's tidying barrier
                deadline = time.monotonic() + 10
                while len(mx1.messages) < 2 and time.monotonic() < deadline:
                    time.sleep(0.005)
                held.append(len(mx1.messages) == 2)
        real_syncfs(fd)

    monkeypatch.setattr(durable, "_syncfs", syncfs)

    async def scenario() -> None:
        daemon = Daemon(config)
        running = asyncio.create_task(daemon.run())
        try:
            await asyncio.to_thread(mx1.wait_for, 2, 30)
        finally:
            daemon._stopping.set()
            await asyncio.wait_for(running, 30)

    asyncio.run(scenario())
    assert held == [True]
    assert len(mx1.sessions) == 1 and len(mx1.messages) == 2


def test_new_mail_takes_turns_with_a_sweep_of_the_queue(
        tmp_path: Path, world: World, daemon: Start) -> None:
    # A queue due at once (a sweep after an outage) fills the ready window (256 jobs
    # here); a new message is still dispatched at once, into the share of the window
    # the queue may not take, and goes to a worker next (issue 16 item 7).
    from mxsend.dispatch import ready_window

    mx1 = world.smtp.start("127.0.0.2")
    slow = Behaviour(stall="mail", stall_seconds=0.2)  # each attempt: 0.2 s, then deferred
    mx2 = world.smtp.start("127.0.0.3", behaviour=slow)
    spool = tmp_path / "spool"
    filler = Spool(spool, owner="test-filler")
    filler.create_dirs()
    swept = ready_window(2) + 20
    for i in range(swept):
        drop(spool, f"old{i:03d}", "alice@src.test", f"r{i}@d2.test")
        assert filler.accept(f"old{i:03d}", time.time()) is not None  # in queue/, due now
    filler.retire()
    # No rescan timer to wake the daemon: only the new file's arrival does.
    process = daemon(_config(tmp_path, world, smtp={"max_connections": 2},
                             queue={"scan_interval": "1h"}))
    wait_until(lambda: len(mx2.sessions) >= 2, 15, message="the sweep to begin")
    drop(spool, "new", "alice@src.test", "bob@d1.test")
    mx1.wait_for(1, timeout=30)
    # Two workers, 0.2 s a job: had it waited for the window to drain to half, or behind
    # the jobs in it, it would have come after a hundred attempts or more.
    assert len(mx2.sessions) <= 12, len(mx2.sessions)
    assert process.stop() == 0


SLOW_FOR_THE_QUEUE = """
function CheckFile(Filename, Actions, Size, CreationTime, Retries, LastTryTime,
                   ReturnPath, Recipients)
  if Retries > 0 then  -- the queue's messages: 20 ms of script each
    local stop = os.clock() + 0.02
    while os.clock() < stop do end
  end
  return Actions
end
"""


def test_new_mail_is_dispatched_before_the_queues_batch_is_checked(
        tmp_path: Path, world: World, daemon: Start) -> None:
    # New mail and the queue's messages due at once go to CheckFile in two batches, new
    # mail's first: it does not wait for the script to check a whole batch of the
    # queue (here ~190 of them in a batch, 20 ms each) before it goes to a worker.
    mx1 = world.smtp.start("127.0.0.2")
    mx2 = world.smtp.start("127.0.0.3")
    spool = tmp_path / "spool"
    filler = Spool(spool, owner="test-filler")
    filler.create_dirs()
    for i in range(250):
        drop(spool, f"old{i:03d}", "alice@src.test", f"r{i}@d2.test")
        assert filler.accept(f"old{i:03d}", time.time()) is not None
        claim = filler.claim(f"old{i:03d}")
        assert claim is not None
        filler.release(claim, dataclasses.replace(filler.read(claim), attempts=1))
    filler.retire()
    drop(spool, "new", "alice@src.test", "bob@d1.test")  # waiting in new/ at the start
    (tmp_path / "mxout.lua").write_text(SLOW_FOR_THE_QUEUE)
    process = daemon(_config(tmp_path, world, smtp={"max_connections": 2}))
    mx1.wait_for(1, timeout=30)
    # The queue's batch is in CheckFile for ~4 s: none of it has been attempted yet.
    assert len(mx2.sessions) == 0
    assert process.stop() == 0


def test_a_file_that_cannot_be_accepted_waits_a_scan_interval(
        tmp_path: Path, world: World, daemon: Start) -> None:
    mx1 = world.smtp.start("127.0.0.2")
    spool = tmp_path / "spool"
    process = daemon(_config(tmp_path, world))
    _wait_started(process)
    # msg/ replaced by a file: accepting fails (link: ENOTDIR) and the file goes back to
    # new/, whose inotify event used to retry it at once, again and again.
    os.rename(spool / "msg", spool / "msg.saved")
    (spool / "msg").write_text("not a folder")
    drop(spool, "m", "alice@src.test", "bob@d1.test")

    def failures() -> list[dict[str, Any]]:
        return [e for e in process.find("log")
                if str(e.get("message", "")).startswith("could not accept m")]

    wait_until(lambda: len(failures()) >= 2, 15, message=process.output)
    first, second = (e["ts"] for e in failures()[:2])
    gap = _parse_ts(second) - _parse_ts(first)
    assert gap >= 0.9, gap  # scan_interval is 1 s in these tests
    (spool / "msg").unlink()
    os.rename(spool / "msg.saved", spool / "msg")
    mx1.wait_for(1, timeout=30)
    assert process.stop() == 0


def _parse_ts(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=UTC).timestamp()


def test_supervisor_fails_when_a_daemon_cannot_start(tmp_path: Path, world: World,
                                                     daemon: Start) -> None:
    (tmp_path / "not-a-folder").write_text("x")
    config = _config(tmp_path, world, queue={"processes": 2},
                     spool={"path": str(tmp_path / "not-a-folder")})
    process = daemon(config)
    assert process.wait(30) == 1, process.output()
    assert any("failed to start" in line for line in process.lines)
    assert not _children(process.pid)


def test_a_report_that_cannot_be_queued_is_tried_again(tmp_path: Path, world: World,
                                                       daemon: Start) -> None:
    world.smtp.start("127.0.0.2", behaviour=Behaviour(
        rcpt={"nobody@d1.test": "550 5.1.1 no such user"}))
    home = world.home()
    spool = tmp_path / "spool"
    process = daemon(_config(tmp_path, world, queue={"retry": ["1s"]}))
    _wait_started(process)  # recovery (which reads tmp/) is over
    # tmp/ stops being a folder, so no report can be written; the message comes in
    # through another folder of the same file system.
    os.rename(spool / "tmp", spool / "tmp.saved")
    (spool / "tmp").write_text("not a folder")
    raw = serialise_bsmtp(Message(Envelope("alice@src.test", (Recipient("nobody@d1.test"),)),
                                  _body("m")))
    (spool / "tmp.saved" / "m").write_bytes(raw)
    os.rename(spool / "tmp.saved" / "m", spool / "new" / "m")
    wait_until(lambda: any("could not queue the failed report" in line
                           for line in process.lines), 15, message=process.output)
    assert queued_ids(spool) == ["m"]  # the bounce was not recorded without its report
    (spool / "tmp").unlink()
    os.rename(spool / "tmp.saved", spool / "tmp")
    home.wait_for(1, timeout=30)
    wait_until(lambda: queued_ids(spool) == [], 15, message="the message to be done")
    assert len(home.messages) == 1
    assert process.stop() == 0


def _unfolded_text(raw: bytes) -> str:
    """The DSN's first part (for people) with its line wrapping undone."""
    report = email.message_from_bytes(raw)
    parts = report.get_payload()
    assert isinstance(parts, list) and isinstance(parts[0], EmailMessage)
    payload = parts[0].get_payload(decode=True)
    assert isinstance(payload, bytes)
    return " ".join(payload.decode("utf-8").split())


def test_a_bounce_says_which_command_the_server_refused(
        tmp_path: Path, world: World, daemon: Start) -> None:
    world.smtp.start("127.0.0.2", behaviour=Behaviour(
        rcpt={"nobody@d1.test": "550 5.1.1 no such user"}))
    # The sender's server defers, so the report stays in the spool to be read.
    home = world.home()
    home.behaviour.rcpt = {"*": "451 4.3.0 not now"}
    spool = tmp_path / "spool"
    drop(spool, "m", "alice@src.test", "nobody@d1.test")
    process = daemon(_config(tmp_path, world), "--once")
    assert process.wait(60) == 0, process.output()
    [report] = process.find("bounce", id="m")
    assert report["kind"] == "failure"
    [refused] = process.find("delivery", id="m")
    assert refused["status"] == "bounced" and refused["command"] == "RCPT TO"
    dsn = Spool(spool, owner="test-observer").load_message(report["bounce_id"])
    assert dsn.envelope.sender == ""
    text = _unfolded_text(dsn.data)
    # docs/dsn.md: who said what to which command.
    assert "<nobody@d1.test>: RCPT TO to mx1.d1.test said: 550 5.1.1 no such user" in text


def test_sigterm_with_one_domain_done_and_one_in_flight(
        tmp_path: Path, world: World, daemon: Start) -> None:
    mx1 = world.smtp.start("127.0.0.2")
    mx2 = world.smtp.start("127.0.0.3", behaviour=Behaviour(stall="dataend",
                                                            stall_seconds=60))
    spool = tmp_path / "spool"
    drop(spool, "k", "alice@src.test", "bob@d1.test", "carol@d2.test")
    config = _config(tmp_path, world, queue={"shutdown_grace": "1s"})
    process = daemon(config)
    process.wait_event("delivery", id="k", recipient="bob@d1.test", status="sent")
    wait_until(lambda: any(t.rcpts and not t.accepted for s in mx2.sessions
                           for t in s.transactions), 15, message="d2 mid-DATA")
    process.signal(signal.SIGTERM)
    assert process.wait(30) == 0, process.output()
    # bob is recorded as sent, carol still pending; the attempt ended untouched.
    [(state, _)] = Spool(spool, owner="test-observer").entries()
    statuses = {r.address: str(r.status) for r in state.recipients}
    assert statuses == {"bob@d1.test": "sent", "carol@d2.test": "pending"}
    mx2.behaviour.stall = None
    again = daemon(config, "--once")
    assert again.wait(60) == 0, again.output()
    assert [m.rcpts for m in mx1.messages] == [["bob@d1.test"]]  # never resent
    assert [m.rcpts for m in mx2.messages] == [["carol@d2.test"]]
    assert queued_ids(spool) == []


def _notifications(sock: socket.socket, seconds: float) -> list[bytes]:
    """Every datagram received within `seconds` (a bounded wait, not a sleep)."""
    received = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            received.append(sock.recv(64))
        except TimeoutError:
            break
    return received


def test_watchdog_and_health_follow_every_daemon(
        tmp_path: Path, world: World, daemon: Start) -> None:
    config = _config(tmp_path, world, queue={"processes": 2})
    notify_path = tmp_path / "notify.sock"

    def health() -> int:
        return subprocess.run([sys.executable, "-m", "mxsend", "-c", str(config), "health"],
                              capture_output=True, timeout=30).returncode

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(30)
        # systemd's protocol: WATCHDOG_USEC=2 s asks for a ping every second.
        process = daemon(config, env={"NOTIFY_SOCKET": str(notify_path),
                                      "WATCHDOG_USEC": "2000000"})
        assert notify.recv(64) == b"READY=1"
        children = wait_until(lambda: len(_children(process.pid)) == 2 and
                              _children(process.pid), 15, message="two daemons")
        assert b"WATCHDOG=1" in _notifications(notify, 3)
        assert health() == 0
        os.kill(children[0], signal.SIGSTOP)
        try:
            # Its heartbeat goes stale (3 beats of 1 s): the pings stop, while the
            # other daemon is fine, and health fails.
            wait_until(lambda: b"WATCHDOG=1" not in _notifications(notify, 2.5), 20,
                       interval=0, message="the watchdog pings to stop")
            assert b"WATCHDOG=1" not in _notifications(notify, 2.5)
            wait_until(lambda: health() == 1, 30, interval=0.5, message="unhealthy")
        finally:
            os.kill(children[0], signal.SIGCONT)
        wait_until(lambda: b"WATCHDOG=1" in _notifications(notify, 2), 20, interval=0,
                   message="the pings to resume")
        wait_until(lambda: health() == 0, 15, interval=0.5, message="healthy again")
        assert process.stop() == 0, process.output()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, so that a full disk is real (ENOSPC) and quick to reach."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as handle:
        for size in (65536, 4096, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError:
                pass


def test_a_full_disk_does_not_stop_the_daemon_from_starting(
        tmp_path: Path, world: World, daemon: Start, small_disk: Path) -> None:
    mx1 = world.smtp.start("127.0.0.2")
    spool = small_disk / "spool"
    drop(spool, "m", "alice@src.test", "bob@d1.test")
    _fill(small_disk / "filler")
    process = daemon(_config(tmp_path, world, spool={"path": str(spool)}))
    try:
        wait_until(lambda: any("heartbeat failed" in line for line in process.lines), 15,
                   message=process.output)
        _wait_started(process)
        assert process.proc.poll() is None
        (small_disk / "filler").unlink()  # space returns
        mx1.wait_for(1, timeout=30)
        wait_until(lambda: queued_ids(spool) == [], 15, message="the message to be done")
        assert process.stop() == 0, process.output()
    finally:
        process.stop()


def test_a_host_name_that_is_no_fqdn_is_warned_about(
        tmp_path: Path, world: World, daemon: Start) -> None:
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a UTS namespace here")
    config = _config(tmp_path, world, smtp={"helo_name": ""})
    # A machine named without a domain: getfqdn() has no dot to offer.
    process = daemon(config, "--once", wrapper=[
        "unshare", "--uts", "sh", "-c", 'hostname mxsendnodot && exec "$@"', "sh"])
    assert process.wait(60) == 0, process.output()
    warnings = [e for e in process.find("log") if "helo_name" in str(e.get("message"))]
    assert warnings and warnings[0]["level"] == "warning", process.output()
    assert "mxsendnodot" in warnings[0]["message"]
