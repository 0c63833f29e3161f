"""`mxsend queue ...` as a real subprocess against a spool filled through the Spool API."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mxsend.envelope import parse_bsmtp
from mxsend.spool import Accepted, RecipientStatus, Spool
from tests.fixtures.daemon import REPO, write_config

# The real CLI, from this checkout (cwd=REPO puts it first on sys.path).
MXSEND = [sys.executable, "-m", "mxsend"]
HOUR = 3600.0

PLAIN = (
    b"MAIL FROM:<alice@example.com> ENVID=Q+2B1\r\n"
    b"RCPT TO:<bob@example.org> ORCPT=rfc822;bob@example.org\r\n"
    b"RCPT TO:<carol@example.net> NOTIFY=NEVER\r\n"
    b"RCPT TO:<dave@example.net> NOTIFY=SUCCESS,FAILURE\r\n"
    b"DATA\r\nFrom: alice@example.com\r\nSubject: stuck\r\n\r\nbody line\r\n.\r\n"
)


@dataclasses.dataclass
class Env:
    config: Path
    root: Path
    spool: Spool  # the "daemon" side: fills the queue, may hold claims


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    config = write_config(tmp_path, {"smtp": {"helo_name": "out.example.com"}})
    root = tmp_path / "spool"
    spool = Spool(root, owner="filler")
    spool.create_dirs()
    yield Env(config=config, root=root, spool=spool)
    spool.retire()


def mxsend(env: Env, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MXSEND, "-c", str(env.config), "queue", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO, input=stdin,
    )


def queued(
    env: Env,
    raw: bytes = PLAIN,
    *,
    age: float = HOUR,
    **changes: Any,
) -> str:
    """Accept a message `age` seconds ago, then give its state `changes`."""
    now = time.time()
    id = env.spool.enqueue_bytes(raw)
    accepted = env.spool.accept(id, now - age)
    assert isinstance(accepted, Accepted)
    claim = env.spool.claim(id)
    assert claim is not None
    state = env.spool.read(claim)
    env.spool.release(claim, dataclasses.replace(state, **changes))
    return id


def state_of(env: Env, id: str) -> Any:
    found = env.spool.find(id)
    return None if found is None else found[0]


def reports(env: Env) -> list[bytes]:
    new = env.root / "new"
    return [(new / name).read_bytes() for name in sorted(os.listdir(new))]


# --- list / show ---------------------------------------------------------------------------


def test_list_shows_one_line_per_pending_recipient_with_its_own_reply(env: Env) -> None:
    now = time.time()
    first = queued(env, age=2 * HOUR, attempts=3, next_try=now + 600,
                   last_error="mx1.example.org said 452 4.2.2 mailbox full")
    claim = env.spool.claim(first)
    assert claim is not None
    state = env.spool.read(claim)
    bob, carol, dave = state.recipients
    env.spool.release(claim, dataclasses.replace(state, recipients=(
        dataclasses.replace(bob, response="452 4.2.2 mailbox full"),
        dataclasses.replace(carol, status=RecipientStatus.SENT, response="250 ok"),
        dataclasses.replace(dave, response="451 4.7.1 greylisted"),
    )))
    second = queued(env, b"MAIL FROM:<>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nS: x\r\n\r\n.\r\n",
                    age=60)
    result = mxsend(env, "list")
    assert result.returncode == 0, result.stderr
    header, row1, row2, row3, summary = result.stdout.splitlines()
    columns = ["ID", "AGE", "SENDER", "RECIPIENT", "ATTEMPTS", "NEXT TRY", "LAST REPLY"]
    starts = [header.index(name) for name in columns]
    assert starts == sorted(starts)
    for row, id, values in (
        (row1, first, ["2h", "<alice@example.com>", "bob@example.org", "3", "in 9m",
                       "452 4.2.2 mailbox full"]),
        (row2, first, ["2h", "<alice@example.com>", "dave@example.net", "3", "in 9m",
                       "451 4.7.1 greylisted"]),  # carol is sent: no line
        (row3, second, ["1m", "<>", "x@example.com", "0", "due", "-"]),
    ):
        assert row.startswith(id)  # oldest first
        for start, value in zip(starts[1:], values, strict=True):
            assert row[start:].startswith(value), (row, value)
    assert summary == "-- 2 messages, 3 recipients pending"


def test_list_filters_by_domain_sender_and_age(env: Env) -> None:
    old = queued(env, age=3 * HOUR)
    young = queued(env, b"MAIL FROM:<Zed@Example.com>\r\nRCPT TO:<y@other.test>\r\n"
                        b"DATA\r\nS: x\r\n\r\n.\r\n", age=60)
    null = queued(env, b"MAIL FROM:<>\r\nRCPT TO:<n@other.test>\r\nDATA\r\nS: x\r\n\r\n.\r\n",
                  age=2 * HOUR)

    def ids(*args: str) -> list[str]:
        result = mxsend(env, "list", "--json", *args)
        assert result.returncode == 0, result.stderr
        return [m["id"] for m in json.loads(result.stdout)["messages"]]

    assert ids() == [old, null, young]
    assert ids("--domain", "EXAMPLE.NET") == [old]
    assert ids("--domain", "other.test") == [null, young]
    assert ids("--sender", "zed@example.com") == [young]
    assert ids("--sender", "<>") == [null]
    assert ids("--older-than", "90m") == [old, null]
    assert ids("--older-than", "90m", "--domain", "other.test") == [null]
    text = mxsend(env, "list", "--domain", "example.net").stdout
    # Only the recipients at that domain, each on its own line.
    assert "carol@example.net" in text and "dave@example.net" in text
    assert "bob@example.org" not in text and "other.test" not in text
    bad = mxsend(env, "list", "--older-than", "soon")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--older-than" in bad.stderr


def test_list_json_and_empty_queue(env: Env) -> None:
    result = mxsend(env, "list")
    assert (result.returncode, result.stdout) == (0, "The queue is empty.\n")
    assert json.loads(mxsend(env, "list", "--json").stdout) == {"messages": [], "incoming": []}
    waiting = env.spool.enqueue_bytes(PLAIN)  # not accepted by any daemon yet
    result = mxsend(env, "list")
    assert result.stdout == "-- 1 file in new/ waiting for a daemon to accept them\n"
    assert json.loads(mxsend(env, "list", "--json").stdout)["incoming"] == [waiting]
    assert mxsend(env, "show", waiting).stderr == (
        f"mxsend: {waiting} is waiting in new/ for a daemon to accept it\n"
    )
    os.unlink(env.root / "new" / waiting)
    id = queued(env, attempts=2, last_error="boom")
    claim = env.spool.claim(id)
    assert claim is not None
    sent = env.spool.read(claim)
    sent = dataclasses.replace(sent, recipients=(
        dataclasses.replace(sent.recipients[0], status=RecipientStatus.SENT, dsn="2.0.0"),
        *sent.recipients[1:],
    ))
    env.spool.update(claim, sent)  # still claimed: in flight for the CLI
    doc = json.loads(mxsend(env, "list", "--json").stdout)
    (message,) = doc["messages"]
    assert message["id"] == id and message["state"] == "in-flight"
    assert message["held"] is False and message["next_try"] == sent.next_try
    assert message["sender"] == "alice@example.com"
    assert message["attempts"] == 2 and message["last_error"] == "boom"
    assert message["pending"] == ["carol@example.net", "dave@example.net"]
    assert [r["status"] for r in message["recipients"]] == ["sent", "pending", "pending"]
    assert all(set(r) >= {"address", "status", "reply"} for r in message["recipients"])
    assert 3500 < message["age"] < 3700
    env.spool.release(claim, sent)


def test_show_text_and_json(env: Env) -> None:
    id = queued(env, attempts=1, last_error="421 try later")
    result = mxsend(env, "show", id)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"id:          {id}" in text
    assert "state:       queued" in text
    assert "sender:      <alice@example.com>" in text
    assert "last error:  421 try later" in text
    assert "envelope:    ENVID=Q+2B1" in text
    assert "carol@example.net  pending" in text and "NOTIFY=NEVER" in text
    doc = json.loads(mxsend(env, "show", id, "--json").stdout)
    assert doc["id"] == id and doc["attempts"] == 1
    assert doc["envelope"]["envid"] == "Q+2B1"
    assert doc["envelope"]["notify"]["carol@example.net"] == ["NEVER"]
    assert doc["envelope"]["orcpt"] == {"bob@example.org": "rfc822;bob@example.org"}


@pytest.mark.parametrize("action", ["show", "flush", "delete", "bounce"])
def test_unknown_id_is_one_line_and_exit_1(env: Env, action: str) -> None:
    result = mxsend(env, action, "NOSUCHID")
    assert result.returncode == 1
    assert result.stderr == "mxsend: no message NOSUCHID in the queue\n"


def test_missing_spool_is_reported(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"spool": {"path": str(tmp_path / "nowhere")}})
    result = subprocess.run([*MXSEND, "-c", str(config), "queue", "list"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert "spool.path" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [["list"], ["list", "--json"], ["stats"], ["stats", "--json"],
                                  ["flush"], ["hold", "ALL"]])
def test_a_corrupt_state_file_is_named_and_the_rest_still_shown(
        env: Env, args: list[str]) -> None:
    good = queued(env, age=3 * 60, next_try=time.time() + HOUR)
    bad = queued(env)
    broken = env.root / "queue" / bad
    broken.write_bytes(b'{"version":1,"id":"' + bad.encode())  # cut short by a bad disk
    result = mxsend(env, *args)
    # The daemon keeps such a message and retries it: one bad file must not hide the rest.
    assert result.returncode == 1
    assert result.stderr.startswith(f"mxsend: skipped {broken}: corrupt state file: ")
    assert result.stderr.count("\n") == 1
    shown = {"list": good, "stats": "example.net", "flush": "1 message made due now",
             "hold": f"{good}: on hold"}[args[0]]
    assert shown in result.stdout
    assert broken.read_bytes() == b'{"version":1,"id":"' + bad.encode()  # left as it was


def test_show_names_a_corrupt_state_file(env: Env) -> None:
    bad = queued(env)
    (env.root / "queue" / bad).write_bytes(b"[]")
    result = mxsend(env, "show", bad)
    assert result.returncode == 1
    assert result.stderr.startswith(f"mxsend: {env.root / 'queue' / bad}: corrupt state file")


# --- changes ---------------------------------------------------------------------------------


def test_flush_one_makes_it_due_and_asks_for_a_rescan(env: Env) -> None:
    later = time.time() + 5 * HOUR
    id = queued(env, attempts=4, next_try=later)
    other = queued(env, attempts=1, next_try=later)
    rescan = env.root / "control" / "rescan"
    before = time.time()
    result = mxsend(env, "flush", id)
    assert (result.returncode, result.stdout) == (0, f"{id}: due now\n")
    assert before - 1 <= state_of(env, id).next_try <= time.time()
    assert state_of(env, id).attempts == 4  # a flush is not an attempt
    assert state_of(env, other).next_try == later
    assert id in [i for t, i in env.spool.queued() if t <= time.time()]
    assert rescan.exists() and rescan.stat().st_mtime >= before - 1
    assert os.listdir(env.root / "owners") == ["filler"]  # the CLI left no heartbeat


def test_flush_all_skips_what_is_in_flight(env: Env) -> None:
    later = time.time() + HOUR
    ids = [queued(env, next_try=later) for _ in range(3)]
    busy = env.spool.claim(ids[1])
    assert busy is not None
    result = mxsend(env, "flush")
    assert (result.returncode, result.stdout) == (0, "2 messages made due now (1 in flight)\n")
    assert set([i for t, i in env.spool.queued() if t <= time.time()]) == {ids[0], ids[2]}
    env.spool.release(busy, env.spool.read(busy))
    assert state_of(env, ids[1]).next_try == later


def test_in_flight_messages_are_not_touched(env: Env) -> None:
    id = queued(env)
    claim = env.spool.claim(id)  # the daemon is delivering it
    assert claim is not None
    for action in ("flush", "delete", "bounce", "hold"):
        result = mxsend(env, action, id)
        assert result.returncode == 1
        assert result.stderr == (
            f"mxsend: {id} is being delivered right now; try again when the attempt ends\n"
        )
    shown = mxsend(env, "show", id)
    assert shown.returncode == 0 and "in flight" in shown.stdout
    assert claim.path.exists() and reports(env) == []
    env.spool.release(claim, env.spool.read(claim))


def test_delete_removes_without_a_report(env: Env) -> None:
    id = queued(env)
    keep = queued(env)
    result = mxsend(env, "delete", id)
    assert (result.returncode, result.stdout) == (0, f"{id}: deleted\n")
    assert state_of(env, id) is None and not env.spool.message_path(id).exists()
    assert state_of(env, keep) is not None
    assert reports(env) == []
    # Nothing of the CLI's is left behind: no heartbeat, no private folder.
    assert os.listdir(env.root / "owners") == ["filler"]
    assert os.listdir(env.root / "active") == ["filler"]


def test_bounce_queues_a_report_where_notify_allows(env: Env) -> None:
    id = queued(env, attempts=2, last_error="452 4.2.2 mailbox full")
    claim = env.spool.claim(id)
    assert claim is not None
    state = env.spool.read(claim)
    bob, carol, dave = state.recipients
    state = dataclasses.replace(state, recipients=(
        dataclasses.replace(bob, response="452 4.2.2 mailbox full", dsn="4.2.2",
                            remote_mta="mx1.example.org", last_attempt=time.time() - 60),
        carol,  # NOTIFY=NEVER: bounced, but not reported
        dataclasses.replace(dave, status=RecipientStatus.SENT, dsn="2.0.0"),  # already final
    ))
    env.spool.release(claim, state)

    result = mxsend(env, "bounce", id)
    assert result.returncode == 0, result.stderr
    (raw,) = reports(env)
    report_id = os.listdir(env.root / "new")[0]
    assert result.stdout == f"{id}: 2 recipients bounced; report {report_id} queued\n"
    assert state_of(env, id) is None and not env.spool.message_path(id).exists()

    events = [json.loads(line) for line in result.stderr.splitlines()]
    deliveries = [e for e in events if e["event"] == "delivery"]
    assert [(e["recipient"], e["status"], e["relay"], e["dsn"]) for e in deliveries] == [
        ("bob@example.org", "bounced", None, "5.0.0"),
        ("carol@example.net", "bounced", None, "5.0.0"),
    ]
    (bounce_event,) = [e for e in events if e["event"] == "bounce"]
    assert bounce_event["id"] == id and bounce_event["bounce_id"] == report_id
    assert bounce_event["recipients"] == ["bob@example.org"]

    dsn = parse_bsmtp(raw)
    assert dsn.envelope.sender == ""
    assert [r.address for r in dsn.envelope.recipients] == ["alice@example.com"]
    parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert parsed["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsed["From"] == "Mail Delivery System <MAILER-DAEMON@out.example.com>"
    _, status, returned = parsed.get_payload()  # type: ignore[misc]
    per_message, block = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; out.example.com"
    assert per_message["Original-Envelope-Id"] == "Q+1"
    assert block["Final-Recipient"] == "rfc822; bob@example.org"
    assert block["Original-Recipient"] == "rfc822; bob@example.org"
    assert block["Action"] == "failed" and block["Status"] == "5.0.0"
    assert block["Diagnostic-Code"] == (
        "X-mxsend; delivery cancelled by the mail system operator; "
        "the last attempt got: 452 4.2.2 mailbox full"
    )
    assert returned.get_content_type() == "message/rfc822"
    assert b"body line" in dsn.data


def test_bounce_without_anyone_to_tell(env: Env) -> None:
    never = queued(env, b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org> NOTIFY=NEVER\r\n"
                        b"DATA\r\nS: x\r\n\r\n.\r\n")
    null = queued(env, b"MAIL FROM:<>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nS: x\r\n\r\n.\r\n")
    first = mxsend(env, "bounce", never)
    assert first.stdout == f"{never}: 1 recipient bounced; no report (NOTIFY asked for none)\n"
    second = mxsend(env, "bounce", null)
    assert second.stdout == f"{null}: 1 recipient bounced; no report (null sender)\n"
    assert reports(env) == []
    assert state_of(env, never) is None and state_of(env, null) is None


def test_bounce_keeps_the_message_in_sent_when_asked(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"spool": {"keep_sent": True}})
    root = tmp_path / "spool"
    spool = Spool(root, owner="filler")
    spool.create_dirs()
    environment = Env(config=config, root=root, spool=spool)
    try:
        id = queued(environment)
        assert mxsend(environment, "bounce", id).returncode == 0
        assert (root / "sent" / id).exists()
    finally:
        spool.retire()


# --- several ids, hold and release --------------------------------------------------------


def test_several_ids_all_and_stdin(env: Env) -> None:
    ids = [queued(env) for _ in range(5)]
    result = mxsend(env, "delete", ids[0], ids[1], "NOSUCHID")
    assert result.returncode == 1  # one could not be done; the others were
    assert result.stdout == f"{ids[0]}: deleted\n{ids[1]}: deleted\n"
    assert result.stderr == "mxsend: no message NOSUCHID in the queue\n"
    result = mxsend(env, "hold", "-", stdin=f"{ids[2]}\n{ids[3]}\n")
    assert (result.returncode, result.stdout) == (0, f"{ids[2]}: on hold\n{ids[3]}: on hold\n")
    busy = env.spool.claim(ids[4])  # in flight: ALL leaves it alone
    assert busy is not None
    result = mxsend(env, "delete", "ALL")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "-- 2 messages deleted (1 in flight, not touched)"
    assert [state.id for state, _ in env.spool.entries()] == [ids[4]]
    env.spool.release(busy, env.spool.read(busy))


def test_held_messages_stay_out_of_the_queue_until_released(env: Env) -> None:
    id = queued(env, next_try=time.time() + HOUR)
    other = queued(env)
    assert mxsend(env, "hold", id).stdout == f"{id}: on hold\n"
    assert mxsend(env, "hold", id).stdout == f"{id}: on hold already\n"
    assert (env.root / "hold" / id).exists() and [i for _, i in env.spool.queued()] == [other]
    doc = json.loads(mxsend(env, "show", id, "--json").stdout)
    assert (doc["held"], doc["next_try"], doc["state"]) == (True, None, "held")
    assert "on hold" in mxsend(env, "list").stdout
    # Neither a flush of everything nor of the message itself makes it due.
    assert mxsend(env, "flush").stdout == "0 messages made due now (1 due already, 1 on hold)\n"
    refused = mxsend(env, "flush", id)
    assert refused.returncode == 1 and "on hold" in refused.stderr
    assert mxsend(env, "release", other).stderr == f"mxsend: {other} is not on hold\n"
    released = mxsend(env, "release", "ALL")
    assert released.returncode == 0, released.stderr
    assert released.stdout.splitlines() == [f"{id}: released, next try in 59m",
                                            "-- 1 message released"]
    assert sorted(i for _, i in env.spool.queued()) == sorted([id, other])
    state = state_of(env, id)
    assert state.held is False and state.attempts == 0


def test_held_messages_can_be_deleted_and_bounced(env: Env) -> None:
    one, two = queued(env), queued(env)
    assert mxsend(env, "hold", one, two).returncode == 0
    assert mxsend(env, "delete", one).stdout == f"{one}: deleted\n"
    bounced = mxsend(env, "bounce", two)
    assert bounced.returncode == 0 and "bounced; report" in bounced.stdout
    assert list(env.spool.entries()) == [] and os.listdir(env.root / "hold") == []


def test_flush_reports_what_it_made_due(env: Env) -> None:
    later = queued(env, next_try=time.time() + HOUR)
    now = queued(env)
    result = mxsend(env, "flush", later, now)
    assert (result.returncode, result.stdout) == (0, f"{later}: due now\n{now}: due already\n")
    assert mxsend(env, "flush", "ALL").stdout == "0 messages made due now (2 due already)\n"


# --- cat and stats -------------------------------------------------------------------------


def test_cat_prints_the_message_as_it_will_be_sent(env: Env) -> None:
    id = queued(env, b"MAIL FROM:<a@example.com>\nRCPT TO:<b@example.org>\nDATA\n"
                     b"Subject: dots\n\n..leading dot\nbare LF\r\n.\n")
    result = subprocess.run([*MXSEND, "-c", str(env.config), "queue", "cat", id],
                            capture_output=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"Subject: dots\r\n\r\n.leading dot\r\nbare LF\r\n"
    missing = mxsend(env, "cat", "NOSUCHID")
    assert (missing.returncode, missing.stderr) == (1, "mxsend: no message NOSUCHID in the queue\n")


def test_stats_counts_pending_recipients_by_domain_and_age(env: Env) -> None:
    queued(env, age=3 * 60)  # bob@example.org, carol and dave @example.net
    queued(env, b"MAIL FROM:<>\r\nRCPT TO:<x@Example.NET>\r\nDATA\r\nS: x\r\n\r\n.\r\n",
           age=30 * HOUR)
    held = queued(env, age=60)
    assert mxsend(env, "hold", held).returncode == 0  # left out, as qshape leaves hold
    result = mxsend(env, "stats", "--json")
    assert result.returncode == 0, result.stderr
    labels = ["5m", "10m", "20m", "40m", "80m", "160m", "320m", "640m", "1280m", "1280m+"]
    zero = dict.fromkeys(labels, 0)
    assert json.loads(result.stdout) == {"domains": [
        {"domain": "example.net", "total": 3, "ages": {**zero, "5m": 2, "1280m+": 1}},
        {"domain": "example.org", "total": 1, "ages": {**zero, "5m": 1}},
    ]}
    header, total, net, org = mxsend(env, "stats").stdout.splitlines()
    assert header.split() == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280",
                              "1280+"]
    assert total.split() == ["TOTAL", "4", "3", "0", "0", "0", "0", "0", "0", "0", "0", "1"]
    assert net.split()[:3] == ["example.net", "3", "2"]
    assert len({len(line) for line in (header, total, net, org)}) == 1  # right-aligned


# --- a closed pipe ---------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["list"], ["list", "--json"], ["show", "{id}"], ["show", "{id}", "--json"], ["cat", "{id}"],
    ["stats"], ["stats", "--json"], ["flush"], ["flush", "{id}"], ["hold", "{id}"],
    ["release", "{other}"], ["delete", "{id}"], ["bounce", "{id}"],
])
def test_a_closed_pipe_ends_quietly(env: Env, args: list[str]) -> None:
    id = queued(env, next_try=time.time() + HOUR)
    other = queued(env)
    assert mxsend(env, "hold", other).returncode == 0
    read, write = os.pipe()
    os.close(read)  # as `| head` does once it has read enough: every write fails
    try:
        result = subprocess.run(
            [*MXSEND, "-c", str(env.config), "queue",
             *(a.format(id=id, other=other) for a in args)],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=60, cwd=REPO)
    finally:
        os.close(write)
    assert result.returncode == 0
    # Nothing on stderr but the contract's own event lines (a bounce logs its events).
    assert [line for line in result.stderr.splitlines() if not line.startswith("{")] == []
    # The work is done all the same.
    if args[0] in ("delete", "bounce"):
        assert state_of(env, id) is None
    if args[0] == "hold":
        assert (env.root / "hold" / id).exists()
    if args[0] == "release":
        assert not (env.root / "hold" / other).exists()


# --- against a running daemon ------------------------------------------------------------------


def _closed_port() -> int:
    """A loopback port nobody listens on: connections to it are refused (a 4xx-like failure)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.slow
def test_against_a_running_daemon(tmp_path: Path, daemon: Any) -> None:
    pytest.importorskip("mxsend.scheduler", reason="the daemon is not built yet")
    from tests.fixtures.daemon import wait_until

    config = write_config(tmp_path, {
        "smtp": {"port": _closed_port(), "helo_name": "out.example.com"},
        "queue": {"retry": ["1h"], "max_age": "5d", "scan_interval": "1s"},
    })
    root = tmp_path / "spool"
    spool = Spool(root, owner="writer")
    spool.create_dirs()
    environment = Env(config=config, root=root, spool=spool)
    try:
        running = daemon(config)
        id = spool.enqueue_bytes(
            b"MAIL FROM:<alice@[127.0.0.1]>\r\nRCPT TO:<bob@[127.0.0.1]>\r\n"
            b"DATA\r\nSubject: t\r\n\r\nhi\r\n.\r\n"
        )
        running.wait_event("delivery", id=id, status="deferred")

        def queued_with(attempts: int) -> bool:
            found = spool.find(id)
            return found is not None and found[1] == "queue" and found[0].attempts == attempts

        wait_until(lambda: queued_with(1), message="the first attempt to be recorded")
        listed = mxsend(environment, "list")
        assert listed.returncode == 0 and id in listed.stdout
        assert "in 59m" in listed.stdout or "in 1h" in listed.stdout

        flushed = mxsend(environment, "flush", id)
        assert flushed.returncode == 0, flushed.stderr
        running.wait_event("delivery", count=2, id=id, status="deferred")
        wait_until(lambda: queued_with(2), message="the flushed attempt to be recorded")

        bounced = mxsend(environment, "bounce", id)
        assert bounced.returncode == 0, bounced.stderr
        report_id = bounced.stdout.split("report ")[1].split()[0]
        running.wait_event("queued", id=report_id)  # the daemon took the report in
        assert spool.find(id) is None
    finally:
        spool.retire()


def test_the_daemon_never_attempts_a_held_message(
        tmp_path: Path, daemon: Any, dns_server: Any, smtp_receivers: Any) -> None:
    dns_server.add_mx("d1.test", 10, "mx1.d1.test")
    dns_server.add_a("mx1.d1.test", "127.0.0.2")
    mx1 = smtp_receivers.start("127.0.0.2")
    config = write_config(tmp_path, {
        "dns": {"nameservers": [dns_server.nameserver], "timeout": "2s", "ipv6": False},
        "smtp": {"port": smtp_receivers.port, "helo_name": "out.example.com"},
    })
    root = tmp_path / "spool"
    spool = Spool(root, owner="filler")
    spool.create_dirs()
    environment = Env(config=config, root=root, spool=spool)
    try:
        def message(subject: str) -> bytes:
            return (b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@d1.test>\r\nDATA\r\n"
                    b"Subject: " + subject.encode() + b"\r\n\r\nhi\r\n.\r\n")

        held = queued(environment, message("held"))
        free = queued(environment, message("free"))
        assert mxsend(environment, "hold", held).returncode == 0
        # Everything due now, held mail included, is tried; the held one is not.
        assert daemon(config, "--once").wait(60) == 0
        assert [m.data.splitlines()[0] for m in mx1.messages] == [b"Subject: free"]
        assert spool.find(free) is None and spool.find(held) is not None
        assert state_of(environment, held).attempts == 0
        assert mxsend(environment, "release", held).returncode == 0
        assert daemon(config, "--once").wait(60) == 0
        assert sorted(m.data.splitlines()[0] for m in mx1.messages) == [
            b"Subject: free", b"Subject: held"]
        assert spool.find(held) is None
    finally:
        spool.retire()
