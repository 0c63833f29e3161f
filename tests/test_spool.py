"""The spool's operations on a real directory; two owners and two real processes racing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxsend.envelope import Envelope, Message, Recipient, parse_bsmtp
from mxsend.errors import SpoolError
from mxsend.spool import (
    Accepted,
    MessageState,
    Quarantined,
    RecipientState,
    RecipientStatus,
    Spool,
    id_problem,
    new_queue_id,
    state_from_json,
    state_to_json,
)

GOOD = b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nRCPT TO:<c@dst.test>\r\nDATA\r\n" \
       b"Subject: hi\r\n\r\n..dot\r\n.\r\n"
NOW = 1_800_000_000.0
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", owner="one")
    s.create_dirs()
    return s


def drop(spool: Spool, name: str, raw: bytes) -> None:
    """What a writer does: tmp/, then rename into new/."""
    temp = spool.root / "tmp" / name
    temp.write_bytes(raw)
    os.rename(temp, spool.root / "new" / name)


def accepted(spool: Spool, name: str, raw: bytes = GOOD, now: float = NOW) -> Accepted:
    drop(spool, name, raw)
    result = spool.accept(name, now)
    assert isinstance(result, Accepted), result
    return result


def due(spool: Spool, now: float) -> list[str]:
    """Ids in queue/ whose next_try has come, earliest first."""
    return [id for next_try, id in spool.queued() if next_try <= now]


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# --- ids ------------------------------------------------------------------------------


def test_queue_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_queue_id(NOW + i / 1000) for i in range(200)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 200
    assert len(set(new_queue_id(NOW) for _ in range(200))) == 200
    assert all(id_problem(i) is None and len(i) == 21 for i in ids)


@pytest.mark.parametrize(
    ("name", "ok"),
    [("abc", True), ("1700000000.M1P2.host,S=42:2,", True), ("a" * 128, True),
     ("a" * 129, False), ("", False), (".", False), ("..", False), ("a b", False),
     ("a\tb", False), ("é", False), ("a/b", False), ("a\0b", False)],
)
def test_id_rules(name: str, ok: bool) -> None:
    assert (id_problem(name) is None) is ok


# --- acceptance -----------------------------------------------------------------------


def test_enqueue_then_accept(spool: Spool) -> None:
    id = spool.enqueue_bytes(GOOD)
    assert spool.incoming() == [id]
    assert os.listdir(spool.root / "tmp") == []
    result = spool.accept(id, NOW)
    assert isinstance(result, Accepted)
    assert result.message == parse_bsmtp(GOOD)
    assert result.state.sender == "a@src.test"
    assert [r.address for r in result.state.recipients] == ["b@dst.test", "c@dst.test"]
    assert result.state.size == len(b"Subject: hi\r\n\r\n.dot\r\n")
    assert result.state.created == NOW and result.state.next_try == NOW
    assert spool.message_path(id).read_bytes() == GOOD  # unchanged bytes
    assert spool.incoming() == []
    assert due(spool, NOW) == [id]
    assert spool.load_message(id) == parse_bsmtp(GOOD)
    assert files(spool.root) == [f"msg/{id}", "owners/one", f"queue/{id}"]


def test_enqueue_a_message_value(spool: Spool) -> None:
    message = Message(Envelope("", (Recipient("x@y.test", notify=("NEVER",)),)), b"a\r\n")
    id = spool.enqueue(message)
    assert parse_bsmtp((spool.root / "new" / id).read_bytes()) == message


def test_accept_of_a_vanished_file_is_none(spool: Spool) -> None:
    assert spool.accept("nothing", NOW) is None
    assert spool.accept(".hidden", NOW) is None


def test_dot_files_in_new_are_ignored(spool: Spool) -> None:
    drop(spool, ".partial", GOOD)
    assert spool.incoming() == []


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty file"),
        (b"hello\n", "expected MAIL FROM"),
        (b"MAIL FROM:<a@b.test>\nDATA\nx\n.\n", "no RCPT"),
        (b"MAIL FROM:<a@b.test>\nRCPT TO:<c@d.test>\nDATA\nx\n", "single '.'"),
        # Cut right after a dot: complete only with the final line end.
        (b"MAIL FROM:<a@b.test>\nRCPT TO:<c@d.test>\nDATA\nx\n.", "and a line end"),
        (b"MAIL FROM:<a@b.test> FOO=1\nRCPT TO:<c@d.test>\nDATA\nx\n.\n", "unknown MAIL"),
    ],
)
def test_bad_files_are_quarantined_with_a_reason(spool: Spool, raw: bytes, reason: str) -> None:
    drop(spool, "bad", raw)
    result = spool.accept("bad", NOW)
    assert isinstance(result, Quarantined)
    assert reason in result.reason
    assert (spool.root / "bad" / "bad").read_bytes() == raw
    assert (spool.root / "bad" / "bad.reason").read_text() == result.reason + "\n"
    assert "\n" not in result.reason


def test_good_files_beside_bad_ones_are_unaffected(spool: Spool) -> None:
    for i in range(3):
        drop(spool, f"good{i}", GOOD)
        drop(spool, f"bad{i}", b"junk %d\n" % i)
    results = {name: spool.accept(name, NOW) for name in spool.incoming()}
    assert sorted(n for n, r in results.items() if isinstance(r, Accepted)) == [
        "good0", "good1", "good2"]
    assert sorted(n for n, r in results.items() if isinstance(r, Quarantined)) == [
        "bad0", "bad1", "bad2"]
    assert sorted(due(spool, NOW)) == ["good0", "good1", "good2"]


def test_too_big_is_quarantined_without_reading(tmp_path: Path) -> None:
    spool = Spool(tmp_path, owner="one", max_message_size=1000)
    spool.create_dirs()
    path = spool.root / "new" / "huge"
    with open(path, "wb") as handle:
        handle.truncate(50 * 1024**3)  # sparse: reading it whole would take 50 GB
    result = spool.accept("huge", NOW)
    assert isinstance(result, Quarantined)
    assert "max_message_size" in result.reason
    assert (spool.root / "bad" / "huge").stat().st_size == 50 * 1024**3


def test_size_limit_lets_a_file_of_exactly_the_limit_through(tmp_path: Path) -> None:
    spool = Spool(tmp_path, owner="one", max_message_size=len(GOOD))
    spool.create_dirs()
    assert isinstance(accepted(spool, "fits"), Accepted)


@pytest.mark.parametrize("name", ["with space", "x" * 129, "tab\there"])
def test_unusable_names_are_quarantined(spool: Spool, name: str) -> None:
    drop(spool, name, GOOD)
    result = spool.accept(name, NOW)
    assert isinstance(result, Quarantined)
    assert "file name" in result.reason
    assert (spool.root / "bad" / name).read_bytes() == GOOD


def test_symlinks_and_directories_are_quarantined(spool: Spool, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(GOOD)
    os.symlink(secret, spool.root / "new" / "link")
    os.mkdir(spool.root / "new" / "dir")
    for name in ("link", "dir"):
        result = spool.accept(name, NOW)
        assert isinstance(result, Quarantined)
        assert result.reason == "not a regular file"
    assert os.path.islink(spool.root / "bad" / "link")
    assert due(spool, NOW) == []


def test_a_name_still_queued_is_quarantined_as_in_use(spool: Spool) -> None:
    accepted(spool, "same")
    drop(spool, "same", GOOD.replace(b"hi", b"second"))
    result = spool.accept("same", NOW)
    assert result == Quarantined("same", "queue id in use")
    assert b"second" in (spool.root / "bad" / "same").read_bytes()
    assert spool.message_path("same").read_bytes() == GOOD


def test_bad_names_do_not_overwrite_each_other(spool: Spool) -> None:
    for content in (b"one\n", b"two\n"):
        drop(spool, "x", content)
        assert isinstance(spool.accept("x", NOW), Quarantined)
    kept = sorted(p.read_bytes() for p in (spool.root / "bad").iterdir()
                  if not p.name.endswith(".reason"))
    assert kept == [b"one\n", b"two\n"]
    drop(spool, "y.reason", b"junk\n")  # must not pass for the reason of a file "y"
    assert isinstance(spool.accept("y.reason", NOW), Quarantined)
    assert not (spool.root / "bad" / "y.reason").exists()


# --- scheduling and claims ------------------------------------------------------------


def test_queued_earliest_keeps_a_bounded_part(spool: Spool) -> None:
    assert spool.queued_earliest(2) == ([], None)
    for i, name in enumerate("dacb"):
        accepted(spool, name, now=NOW + 10 * (4 - i))  # d latest ... b earliest
    everything = spool.queued()
    assert spool.queued_earliest(10) == (everything, None)
    # the two earliest, and when the first one left out is due
    assert spool.queued_earliest(2) == (everything[:2], everything[2][0])
    assert spool.queued_earliest(1) == (everything[:1], everything[1][0])


def test_queued_follows_next_try(spool: Spool) -> None:
    assert spool.queued() == []
    a = accepted(spool, "a").state
    accepted(spool, "b", now=NOW + 5)
    claim = spool.claim("a")
    assert claim is not None
    spool.release(claim, replace(a, next_try=NOW + 100))
    assert spool.queued() == [(NOW + 5, "b"), (NOW + 100, "a")]
    assert due(spool, NOW + 4) == []
    assert due(spool, NOW + 5) == ["b"]


def test_claim_update_release_round_trip(spool: Spool) -> None:
    state = accepted(spool, "m").state
    claim = spool.claim("m")
    assert claim is not None and claim.owner == "one"
    assert spool.claim("m") is None  # already ours: not in queue/
    assert due(spool, NOW) == []
    assert spool.find("m") == (state, "active")
    sent = replace(state.recipients[0], status=RecipientStatus.SENT, response="250 2.0.0 ok",
                   dsn="2.0.0", relay="mx.dst.test[127.0.0.2]:25", remote_mta="mx.dst.test",
                   last_attempt=NOW + 1)
    state = replace(state, recipients=(sent, state.recipients[1]), attempts=1,
                    last_try=NOW + 1, next_try=NOW + 300, last_error="451 later")
    spool.update(claim, state)
    assert spool.read(claim) == state
    spool.release(claim, state)
    assert spool.find("m") == (state, "queue")
    assert list(spool.entries()) == [(state, "queue")]
    assert state.pending() == (state.recipients[1],)
    assert not state.is_final()


def test_complete_removes_everything(spool: Spool) -> None:
    state = accepted(spool, "m").state
    claim = spool.claim("m")
    assert claim is not None
    with pytest.raises(SpoolError):
        spool.complete(claim, state)  # still pending
    done = tuple(replace(r, status=RecipientStatus.BOUNCED) for r in state.recipients)
    spool.complete(claim, replace(state, recipients=done))
    # The state file's inode is kept to be reused (Spool._spares) until we retire.
    assert files(spool.root) == ["active/one/.spare-0", "owners/one"]
    assert spool.find("m") is None
    spool.retire()
    assert files(spool.root) == []


def test_keep_sent_keeps_the_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path, owner="one", keep_sent=True)
    spool.create_dirs()
    state = accepted(spool, "m").state
    claim = spool.claim("m")
    assert claim is not None
    done = tuple(replace(r, status=RecipientStatus.SENT) for r in state.recipients)
    spool.complete(claim, replace(state, recipients=done))
    assert (spool.root / "sent" / "m").read_bytes() == GOOD
    assert files(spool.root) == ["active/one/.spare-0", "owners/one", "sent/m"]


def test_delete(spool: Spool) -> None:
    accepted(spool, "m")
    claim = spool.claim("m")
    assert claim is not None
    spool.delete(claim)
    assert files(spool.root) == ["owners/one"]


def test_load_message_of_a_missing_id(spool: Spool) -> None:
    with pytest.raises(SpoolError):
        spool.load_message("nope")
    with pytest.raises(SpoolError):
        spool.message_path("../etc")


def test_two_owners_claim_each_message_once(tmp_path: Path) -> None:
    one, two = Spool(tmp_path, owner="one"), Spool(tmp_path, owner="two")
    one.create_dirs()
    for i in range(20):
        drop(one, f"m{i:02}", GOOD)
    won: dict[str, list[str]] = {"one": [], "two": []}
    for name in one.incoming():
        for s in (one, two):
            if isinstance(s.accept(name, NOW), Accepted):
                won[s.owner].append(name)
    assert sorted(won["one"] + won["two"]) == [f"m{i:02}" for i in range(20)]
    claimed = []
    for id in due(one, NOW):
        for s in (two, one):
            claim = s.claim(id)
            if claim is not None:
                claimed.append(id)
    assert sorted(claimed) == [f"m{i:02}" for i in range(20)]


def test_two_processes_race_and_each_message_is_taken_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path, owner="setup")
    spool.create_dirs()
    names = [spool.enqueue_bytes(GOOD) for _ in range(150)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    driver = str(Path(__file__).with_name("spool_crash_driver.py"))
    procs = [subprocess.Popen([sys.executable, driver, "race", str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    try:
        assert all(p.stdout is not None and p.stdout.readline() == b"ready\n" for p in procs)
        (tmp_path / "go").touch()
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    lines = [line.split() for out, _ in outputs for line in out.decode().splitlines()]
    for verb in ("accepted", "claimed"):
        taken = [id for v, id in lines if v == verb]
        assert sorted(taken) == sorted(names), verb  # each exactly once
    per_process = [sum(1 for ln in out.decode().splitlines() if ln.startswith("claimed"))
                   for out, _ in outputs]
    assert files(tmp_path) == ["go"]
    print("claims per process", per_process)


# --- recovery -------------------------------------------------------------------------


def test_claims_of_a_dead_owner_come_back(tmp_path: Path) -> None:
    dead, alive = Spool(tmp_path, owner="dead"), Spool(tmp_path, owner="alive")
    dead.create_dirs()
    state = accepted(dead, "m").state
    claim = dead.claim("m")
    assert claim is not None
    half = replace(state, recipients=(replace(state.recipients[0],
                                              status=RecipientStatus.SENT),
                                      state.recipients[1]), next_try=NOW + 60)
    dead.update(claim, half)
    alive.heartbeat()
    beat = os.stat(tmp_path / "owners" / "dead").st_mtime
    assert alive.recover(stale_after=30, now=beat + 10) == []  # still fresh
    assert due(alive, NOW + 60) == []
    assert alive.recover(stale_after=30, now=beat + 31) == ["m"]
    assert alive.find("m") == (half, "queue")
    assert due(alive, NOW + 60) == ["m"]  # next_try survives as the mtime
    assert not (tmp_path / "owners" / "dead").exists()
    # The presumed-dead process, if it wakes up, cannot write over the new owner's claim.
    with pytest.raises(SpoolError, match="claim lost"):
        dead.update(claim, state)
    with pytest.raises(SpoolError, match="claim lost"):
        dead.release(claim, state)
    assert alive.find("m") == (half, "queue")


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True, timeout=30)
    return int(child.stdout)


def test_claims_of_a_dead_pid_on_this_host_come_back_at_once(tmp_path: Path) -> None:
    from mxsend.spool import process_identity

    gone, alive = Spool(tmp_path, owner="gone"), Spool(tmp_path, owner="alive")
    gone.create_dirs()
    accepted(gone, "m")
    assert gone.claim("m") is not None
    heartbeat = tmp_path / "owners" / "gone"
    # A fresh heartbeat of a live process (this one): its claims stay.
    heartbeat.write_text(process_identity())
    assert alive.recover(stale_after=3600, now=time.time()) == []
    # Same heartbeat age, but the process it names has exited: recovered at once.
    heartbeat.write_text(process_identity(_dead_pid()))
    assert alive.recover(stale_after=3600, now=time.time()) == ["m"]
    assert due(alive, NOW) == ["m"]


def test_an_unrecognised_heartbeat_falls_back_to_its_age(tmp_path: Path) -> None:
    other, alive = Spool(tmp_path, owner="other"), Spool(tmp_path, owner="alive")
    other.create_dirs()
    accepted(other, "m")
    assert other.claim("m") is not None
    # Another kernel (a sidecar on another machine): its PID says nothing here.
    (tmp_path / "owners" / "other").write_text(f"another-boot 4026531836 {_dead_pid()}\n")
    assert alive.recover(stale_after=3600, now=time.time()) == []
    assert alive.recover(stale_after=3600, now=time.time() + 7200) == ["m"]


def test_retire_makes_leftovers_recoverable_at_once(tmp_path: Path) -> None:
    one, two = Spool(tmp_path, owner="one"), Spool(tmp_path, owner="two")
    one.create_dirs()
    accepted(one, "m")
    assert one.claim("m") is not None
    one.retire()
    assert two.recover(stale_after=3600, now=time.time()) == ["m"]
    assert due(two, NOW) == ["m"]


def test_recover_finishes_a_completion_that_died(tmp_path: Path) -> None:
    dead, alive = Spool(tmp_path, owner="dead"), Spool(tmp_path, owner="alive")
    dead.create_dirs()
    state = accepted(dead, "m").state
    claim = dead.claim("m")
    assert claim is not None
    final = replace(state, recipients=tuple(replace(r, status=RecipientStatus.SENT)
                                            for r in state.recipients))
    dead.update(claim, final)  # complete() writes this first, then dies
    dead.retire()
    assert alive.recover(stale_after=1, now=time.time()) == ["m"]
    assert files(tmp_path) == ["owners/alive"]


def test_recover_ignores_a_later_file_of_the_same_name(tmp_path: Path) -> None:
    dead, alive = Spool(tmp_path, owner="dead"), Spool(tmp_path, owner="alive")
    dead.create_dirs()
    state = accepted(dead, "m").state
    claim = dead.claim("m")
    assert claim is not None
    # complete() removed msg/m and died before removing the state; meanwhile a new
    # file called "m" was accepted.
    os.unlink(dead.message_path("m"))
    drop(alive, "m", GOOD.replace(b"hi", b"later"))
    later = alive.accept("m", NOW + 1)
    assert isinstance(later, Accepted)
    final = replace(state, recipients=tuple(replace(r, status=RecipientStatus.SENT)
                                            for r in state.recipients))
    os.unlink(claim.path)
    (claim.path).write_bytes(state_to_json(final))
    dead.retire()
    alive.recover(stale_after=1, now=time.time())
    assert alive.find("m") == (later.state, "queue")
    assert b"later" in alive.message_path("m").read_bytes()


def test_a_published_message_delivered_by_another_process_is_not_accepted_again(
        tmp_path: Path) -> None:
    # The acceptance dies just after it published m (a kill -9 in its last barrier);
    # before its owner is found dead, another daemon delivers m and removes it. Nothing
    # of m may be left in incoming/ that recovery would hand back to new/: m would be
    # sent twice (contract §1 allows a duplicate only between a reply and its record).
    dead, alive = Spool(tmp_path, owner="dead"), Spool(tmp_path, owner="alive")
    dead.create_dirs()
    drop(dead, "m", GOOD)
    steps = dead.accept_steps("m", NOW)
    next(steps)
    while not (tmp_path / "queue" / "m").exists():
        next(steps)
    steps.close()  # dies here, at the barrier after the publish
    claim = alive.claim("m")
    assert claim is not None
    state = alive.read(claim)
    alive.complete(claim, replace(state, recipients=tuple(
        replace(r, status=RecipientStatus.SENT) for r in state.recipients)))
    os.unlink(tmp_path / "owners" / "dead")
    alive.recover(stale_after=1, now=time.time())
    left = [f for f in files(tmp_path) if f.split("/")[0] in ("new", "incoming", "msg",
                                                              "queue")]
    assert alive.incoming() == [] and left == []


def _reserved_then_dead(tmp_path: Path) -> tuple[Spool, Path]:
    """m accepted by `dead` up to the publish: its id reserved, its name in incoming/
    dropped, its private state not yet in queue/ (acceptance steps 1-5)."""
    dead = Spool(tmp_path, owner="dead")
    dead.create_dirs()
    drop(dead, "m", GOOD)
    steps = dead.accept_steps("m", NOW)
    next(steps)
    private = tmp_path / "incoming" / "dead" / ".m.state"
    while (tmp_path / "incoming" / "dead" / "m").exists():
        next(steps)
    steps.close()
    assert private.exists() and not (tmp_path / "queue" / "m").exists()
    os.unlink(tmp_path / "owners" / "dead")
    return dead, private


def test_recover_publishes_a_reserved_message_whose_name_was_dropped(tmp_path: Path) -> None:
    _dead, _private = _reserved_then_dead(tmp_path)
    alive = Spool(tmp_path, owner="alive")
    assert alive.recover(stale_after=1, now=time.time()) == ["m"]
    assert due(alive, NOW) == ["m"] and alive.incoming() == []
    assert alive.load_message("m").data == parse_bsmtp(GOOD).data


def test_recover_accepts_afresh_when_the_private_state_is_not_this_messages(
        tmp_path: Path) -> None:
    # Only a disk that lost a write it had confirmed leaves this: the private state
    # (a reused spare) still holds another message's state.
    _dead, private = _reserved_then_dead(tmp_path)
    other = MessageState(id="other", created=NOW, sender="x@src.test", size=1,
                         recipients=(RecipientState("y@dst.test"),))
    private.write_bytes(state_to_json(other))
    alive = Spool(tmp_path, owner="alive")
    alive.recover(stale_after=1, now=time.time())
    assert alive.incoming() == ["m"] and not alive.message_path("m").exists()
    assert isinstance(alive.accept("m", NOW + 5), Accepted)
    assert due(alive, NOW + 5) == ["m"]
    assert alive.load_message("m").data == parse_bsmtp(GOOD).data


def _dead_at_the_reservation(tmp_path: Path) -> Path:
    """m accepted by `dead` up to its first barrier (steps 1-4 done: the state written,
    msg/m linked), which a power loss may undo in part; returns the private state."""
    dead = Spool(tmp_path, owner="dead")
    dead.create_dirs()
    drop(dead, "m", GOOD)
    steps = dead.accept_steps("m", NOW)
    next(steps)
    steps.close()
    held = tmp_path / "incoming" / "dead" / "m"
    assert os.path.samefile(held, dead.message_path("m"))
    os.unlink(tmp_path / "owners" / "dead")
    return held.with_name(".m.state")


@pytest.mark.parametrize("kept", ["whole", "no state", "part of it", "a spare's old state"])
def test_recover_an_acceptance_cut_at_its_first_barrier(tmp_path: Path, kept: str) -> None:
    # One barrier makes the state and the reservation durable together: a power loss
    # before it may keep the link and lose the state (or keep a reused spare's old
    # content). Recovery finishes only what is whole and hands the rest back to new/.
    private = _dead_at_the_reservation(tmp_path)
    whole = private.read_bytes()
    if kept == "no state":
        private.unlink()
    elif kept == "part of it":
        private.write_bytes(whole[: len(whole) // 2])
    elif kept == "a spare's old state":
        private.write_bytes(state_to_json(MessageState(
            id="m", created=NOW - 60, sender="old@src.test", size=1,
            recipients=(RecipientState("old@dst.test"),), file_stamp="1:2:3")))
    alive = Spool(tmp_path, owner="alive")
    assert alive.recover(stale_after=1, now=time.time()) == ["m"]
    if kept == "whole":
        assert due(alive, NOW) == ["m"] and alive.incoming() == []
    else:
        assert due(alive, NOW) == [] and alive.incoming() == ["m"]
        assert not alive.message_path("m").exists()
        assert isinstance(alive.accept("m", NOW + 5), Accepted)
        assert due(alive, NOW + 5) == ["m"]
    assert alive.load_message("m").data == parse_bsmtp(GOOD).data
    assert [f for f in files(tmp_path) if f.startswith("incoming/")] == []


def test_abandoned_writer_files_are_cleaned_after_36_hours(spool: Spool) -> None:
    temp = spool.root / "tmp" / "old"
    temp.write_bytes(b"x")
    os.utime(temp, (NOW, NOW))
    (spool.root / "tmp" / "fresh").write_bytes(b"x")
    os.utime(spool.root / "tmp" / "fresh", (NOW + 36 * 3600, NOW + 36 * 3600))
    spool.recover(stale_after=60, now=NOW + 35 * 3600)
    assert temp.exists()
    spool.recover(stale_after=60, now=NOW + 37 * 3600)
    assert sorted(os.listdir(spool.root / "tmp")) == ["fresh"]


def test_request_rescan_touches_the_control_file(spool: Spool) -> None:
    spool.request_rescan()
    first = (spool.root / "control" / "rescan").stat().st_mtime_ns
    os.utime(spool.root / "control" / "rescan", (0, 0))
    spool.request_rescan()
    assert (spool.root / "control" / "rescan").stat().st_mtime_ns >= first


def test_owner_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Spool(tmp_path, owner="a/b")
    with pytest.raises(ValueError):
        Spool(tmp_path, owner="a~b")
    assert "~" not in Spool(tmp_path).owner


# --- the state file -------------------------------------------------------------------

_text = st.text(max_size=30)
_recipient = st.builds(
    RecipientState, address=_text, status=st.sampled_from(list(RecipientStatus)),
    response=_text, dsn=_text, relay=_text, remote_mta=_text,
    last_attempt=st.floats(0, 4e9), delay_notified=st.booleans(),
)


@given(st.builds(
    MessageState, id=_text, created=st.floats(0, 4e9), sender=_text,
    size=st.integers(0, 2**40), recipients=st.lists(_recipient, max_size=4).map(tuple),
    attempts=st.integers(0, 1000), last_try=st.none() | st.floats(0, 4e9),
    next_try=st.floats(0, 4e9), last_error=_text, file_stamp=_text,
))
def test_state_json_round_trip(state: MessageState) -> None:
    assert state_from_json(state_to_json(state)) == state


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'{"version": 1}', b'{"version": 99}',
                                 b'{"version":1,"id":"x","created":0,"sender":"","size":0,'
                                 b'"recipients":[{"address":"a","status":"nonsense"}]}'])
def test_corrupt_state_is_a_spool_error(raw: bytes) -> None:
    with pytest.raises(SpoolError):
        state_from_json(raw)


def test_an_io_error_during_acceptance_hands_the_file_back(spool: Spool) -> None:
    drop(spool, "m", GOOD)
    msg = spool.root / "msg"
    os.rmdir(msg)
    msg.write_bytes(b"")  # not a directory: the reservation link fails, even for root
    with pytest.raises(SpoolError, match="cannot accept m"):
        spool.accept("m", NOW)
    os.unlink(msg)
    os.mkdir(msg)
    assert spool.incoming() == ["m"]
    assert isinstance(spool.accept("m", NOW), Accepted)
    assert files(spool.root) == ["msg/m", "owners/one", "queue/m"]


# --- reused inodes ----------------------------------------------------------------------


def _inode(path: Path) -> int:
    return os.stat(path).st_ino


def test_state_inodes_are_reused_not_made_anew(spool: Spool) -> None:
    """ext4 pays a scan over recently freed inodes for every new file (docs/spool.md)."""
    state = accepted(spool, "m1").state
    claim = spool.claim("m1")
    assert claim is not None
    first = _inode(claim.path)
    # An update writes the new state into a fresh file and keeps the old inode.
    spool.update(claim, replace(state, attempts=1))
    assert spool.read(claim).attempts == 1
    assert [p.name for p in claim.path.parent.iterdir() if p.name.startswith(".")] == [
        ".spare-0"]
    assert _inode(claim.path.parent / ".spare-0") == first
    done = tuple(replace(r, status=RecipientStatus.SENT) for r in state.recipients)
    second = _inode(claim.path)
    spool.complete(claim, replace(state, recipients=done))
    # The next message's state is written into those inodes.
    state2 = accepted(spool, "m2").state
    claim2 = spool.claim("m2")
    assert claim2 is not None
    assert _inode(claim2.path) in (first, second)
    assert spool.read(claim2) == state2


def test_a_dead_owners_spares_go_with_its_claims(tmp_path: Path) -> None:
    dead = Spool(tmp_path, owner="dead")
    dead.create_dirs()
    state = accepted(dead, "m").state
    claim = dead.claim("m")
    assert claim is not None
    dead.update(claim, replace(state, attempts=1))  # leaves a spare beside the claim
    (tmp_path / "owners" / "dead").unlink()
    alive = Spool(tmp_path, owner="alive")
    assert alive.recover(stale_after=60, now=NOW) == ["m"]
    assert [p for p in files(tmp_path) if "spare" in p] == []
    assert alive.find("m") is not None and alive.find("m")[0].attempts == 1


def test_spares_are_bounded(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    import mxsend.spares as spares_module

    monkeypatch.setattr(spares_module, "SPARE_MAX", 1)
    for name in ("m1", "m2"):
        state = accepted(spool, name).state
        claim = spool.claim(name)
        assert claim is not None
        spool.update(claim, replace(state, attempts=1))
    assert len([p for p in files(spool.root) if "spare" in p]) == 1


def test_message_file_is_the_message_path(spool: Spool) -> None:
    assert spool.message_file("Q1") == str(spool.message_path("Q1"))
    with pytest.raises(SpoolError):
        spool.message_file("../x")


def test_spares_lost_with_a_taken_directory_are_not_missed(spool: Spool) -> None:
    """A recoverer that took our active/ (we were presumed dead) took the spares too."""
    state = accepted(spool, "m1").state
    claim = spool.claim("m1")
    assert claim is not None
    spool.update(claim, replace(state, attempts=1))  # one spare now
    assert spool._spares.names
    claim.path.parent.rename(spool.root / "active" / "one~taken")
    # The next state is written into a new file instead, and the message is queued.
    assert accepted(spool, "m2").state.id == "m2"
    assert spool._spares.names == [] and spool.find("m2") is not None


# --- holds -----------------------------------------------------------------------------


def test_hold_moves_a_message_where_no_scan_finds_it(spool: Spool) -> None:
    state = accepted(spool, "m").state
    accepted(spool, "n")
    held = spool.hold("m")
    assert held is not None and held.held and held.next_try == state.next_try
    assert [id for _, id in spool.queued()] == ["n"]
    assert spool.find("m") == (held, "hold")
    assert spool.hold("m") is None and spool.claim("m") is None  # neither queued nor claimable
    released = spool.unhold("m")
    assert released is not None and not released.held
    assert spool.unhold("m") is None
    assert sorted(id for _, id in spool.queued()) == ["m", "n"]
    assert os.stat(spool.root / "queue" / "m").st_mtime == state.next_try  # as planned


def test_a_held_message_claimed_by_a_dead_process_goes_back_on_hold(tmp_path: Path) -> None:
    dead, alive = Spool(tmp_path, owner="dead"), Spool(tmp_path, owner="alive")
    dead.create_dirs()
    accepted(dead, "m")
    assert dead.hold("m") is not None
    # A `queue bounce` that died after its claim: the held state is in active/dead/.
    claim = dead.claim_held("m")
    assert claim is not None
    (tmp_path / "owners" / "dead").unlink()
    assert alive.recover(stale_after=60, now=NOW) == ["m"]
    assert alive.find("m") is not None and alive.find("m")[1] == "hold"
    assert alive.queued() == []


def test_a_reused_spare_holds_exactly_the_new_state(tmp_path: Path) -> None:
    """A spare is overwritten in place, not truncated first: its old, longer content
    must still be cut off after the new bytes."""
    from mxsend.spares import Spares

    spares = Spares(str(tmp_path))
    old = tmp_path / "old-state"
    old.write_bytes(b"x" * 10_000)
    assert spares.keep(str(old))
    target = str(tmp_path / ".m2.state")
    for _ in spares.new_file_steps(target, b'{"short": true}', 1_700_000_000.0):
        pass  # the Sync steps are the group commit's; the content is written already
    assert Path(target).read_bytes() == b'{"short": true}'
    assert os.stat(target).st_mtime == 1_700_000_000.0
    assert spares.names == []  # the spare was used, not a new file made


def test_new_mail_is_due_at_once_by_its_write_time(spool: Spool) -> None:
    """New mail's state takes the mtime its write gives it (no utimensat): still due now."""
    now = time.time()
    accepted(spool, "m", now=now)
    [(when, name)] = spool.queued()
    assert name == "m" and abs(when - now) < 1.0
    assert due(spool, time.time() + 0.01) == ["m"]
