"""The daemon's parts on their own: the plan, intake's book, grouping, folding
outcomes, giving up, the reports owed."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mxsend import heartbeat, schedule
from mxsend.attempt import bounce_phases, group_by_domain
from mxsend.envelope import Envelope, Recipient
from mxsend.errors import Phase
from mxsend.intake import IntakeBook, own_share_first
from mxsend.outcome import DeliveryStatus, RecipientOutcome
from mxsend.plan import DuePlan
from mxsend.record import apply_outcomes, give_up, reports_owed
from mxsend.spool import MessageState, RecipientState, RecipientStatus


def _state(*addresses: str, statuses: dict[str, RecipientStatus] | None = None) -> MessageState:
    statuses = statuses or {}
    return MessageState(
        id="Q1", created=1000.0, sender="a@src.test", size=10,
        recipients=tuple(
            RecipientState(address=a, status=statuses.get(a, RecipientStatus.PENDING))
            for a in addresses
        ),
    )


def _outcome(address: str, status: DeliveryStatus, response: str = "250 ok",
             dsn: str = "2.0.0") -> RecipientOutcome:
    return RecipientOutcome(
        address=address, status=status, dsn=dsn, response=response, phase=Phase.RCPT,
        relay="mx.d.test[127.0.0.2]:25", remote_mta="mx.d.test", tls=None,
    )


def test_group_by_domain_keeps_envelope_order_and_skips_final() -> None:
    recipients = [Recipient("a@X.test"), Recipient("b@y.test"), Recipient("c@x.test"),
                  Recipient("d@y.test")]
    groups = group_by_domain(recipients, {"a@X.test", "c@x.test", "d@y.test"})
    assert list(groups) == ["x.test", "y.test"]
    assert [r.address for r in groups["x.test"]] == ["a@X.test", "c@x.test"]
    assert [r.address for r in groups["y.test"]] == ["d@y.test"]


def test_apply_outcomes_maps_each_status() -> None:
    state = _state("s@d.test", "d@d.test", "b@d.test", "x@d.test")
    outcomes = [
        _outcome("s@d.test", DeliveryStatus.SENT),
        _outcome("d@d.test", DeliveryStatus.DEFERRED, "451 4.3.0 later", "4.3.0"),
        _outcome("b@d.test", DeliveryStatus.BOUNCED, "550 5.1.1 no such user", "5.1.1"),
    ]
    after = apply_outcomes(state, outcomes, now=2000.0)
    by_address = {r.address: r for r in after.recipients}
    assert by_address["s@d.test"].status is RecipientStatus.SENT
    assert by_address["d@d.test"].status is RecipientStatus.PENDING
    assert by_address["d@d.test"].response == "451 4.3.0 later"
    assert by_address["b@d.test"].status is RecipientStatus.BOUNCED
    assert by_address["b@d.test"].dsn == "5.1.1"
    assert by_address["b@d.test"].relay == "mx.d.test[127.0.0.2]:25"
    assert by_address["b@d.test"].last_attempt == 2000.0
    assert by_address["x@d.test"] == state.recipients[3]  # no outcome: untouched
    assert after.last_error == "451 4.3.0 later"


def test_apply_outcomes_never_reopens_a_final_recipient() -> None:
    state = _state("s@d.test", statuses={"s@d.test": RecipientStatus.SENT})
    after = apply_outcomes(state, [_outcome("s@d.test", DeliveryStatus.BOUNCED)], 5.0)
    assert after.recipients[0].status is RecipientStatus.SENT


def test_give_up_bounces_pending_and_keeps_the_last_status() -> None:
    state = _state("p@d.test", "q@d.test", "s@d.test",
                   statuses={"s@d.test": RecipientStatus.SENT})
    state = apply_outcomes(
        state, [_outcome("p@d.test", DeliveryStatus.DEFERRED, "452 4.2.2 full", "4.2.2")], 9.0)
    final = give_up(state, schedule.GiveUp.EXPIRED, now=10.0)
    by_address = {r.address: r for r in final.recipients}
    assert by_address["p@d.test"].status is RecipientStatus.BOUNCED
    assert by_address["p@d.test"].dsn == "4.2.2"
    assert "452 4.2.2 full" in by_address["p@d.test"].response
    assert "expired" in by_address["p@d.test"].response
    assert by_address["q@d.test"].dsn == "4.4.7"  # never reached a server
    assert by_address["s@d.test"].status is RecipientStatus.SENT
    assert final.is_final()


def test_give_up_forced_without_a_reply() -> None:
    final = give_up(_state("p@d.test"), schedule.GiveUp.FORCED, now=10.0)
    assert final.recipients[0].dsn == "4.0.0"
    assert "ForceLastTry" in final.recipients[0].response



def _split(order: list[str]) -> tuple[list[str], list[str]]:
    """A list made of two sorted runs -> the runs."""
    cut = next(i for i in range(1, len(order)) if order[i] < order[i - 1])
    return order[:cut], order[cut:]


def test_own_share_first_splits_new_without_overlap_and_keeps_order() -> None:
    names = [f"Q{n:05d}" for n in range(1000)]
    assert own_share_first(names, 0, 1) == names
    mine0, rest0 = _split(own_share_first(names, 0, 2))
    mine1, rest1 = _split(own_share_first(names, 1, 2))
    # Each daemon starts on its own share; the two shares are disjoint and cover all.
    assert mine0 == rest1 and mine1 == rest0
    assert sorted(mine0 + mine1) == names
    assert 350 < len(mine0) < 650
    # Oldest first within each share.
    assert mine0 == sorted(mine0) and mine1 == sorted(mine1)


def test_a_file_that_failed_acceptance_waits_and_once_leaves_it() -> None:
    for once, expected in ((False, ["late", "new"]), (True, ["new"])):
        book = IntakeBook(once=once)
        book.failed = {"late": 99.0, "soon": 160.0}
        # Due again in the daemon; a --once run never retries within the run.
        book.listed(["late", "soon", "new"], now=100.0)
        assert list(book.backlog) == expected
        assert "soon" in book.failed


# --- intake: names in flight (issue 10, item 6) -------------------------------------

def test_a_name_in_flight_is_not_listed_again_until_its_result_is_recorded() -> None:
    book = IntakeBook()
    book.listed(["m", "n"], now=0.0)
    assert book.take(room=10) == ["m", "n"]
    # The failed acceptance handed "m" back to new/ and its inotify event listed new/
    # before the loop heard of the failure: "m" must not be handed in again.
    book.arrived = True
    assert book.needs_listing()
    book.listed(["m"], now=0.1)
    assert book.take(room=10) == []
    book.recorded("m", failed=True, now=0.2, retry_after=1.0)
    book.recorded("n", failed=False, now=0.2, retry_after=1.0)
    assert book.in_flight == set()
    # Now it backs off a scan interval, and is tried again after it.
    book.listed(["m"], now=1.1)
    assert book.take(room=10) == []
    book.listed(["m"], now=1.3)
    assert book.take(room=10) == ["m"]


def test_intake_takes_at_most_the_room_and_a_chunk() -> None:
    book = IntakeBook()
    book.listed([f"f{i:03d}" for i in range(200)], now=0.0)
    assert len(book.take(room=5)) == 5
    assert len(book.take(room=1000)) == 64  # ACCEPT_CHUNK
    assert book.take(room=0) == [] and len(book.in_flight) == 69
    assert not book.needs_listing()  # a backlog is worked off before new/ is listed


# --- the due plan ---------------------------------------------------------------------

@pytest.mark.parametrize(("plans", "now", "limit", "busy", "due", "left"), [
    ([("a", 1.0), ("b", 2.0), ("c", 9.0)], 5.0, 10, (), ["a", "b"], 9.0),
    ([("a", 1.0), ("b", 2.0)], 5.0, 1, (), ["a"], 2.0),
    # Rescheduled later: the earlier entry is void.
    ([("a", 1.0), ("a", 7.0)], 5.0, 10, (), [], 7.0),
    # Rescheduled earlier: due once, not twice.
    ([("a", 7.0), ("a", 1.0)], 5.0, 10, (), ["a"], None),
    # Claimed already: leaves the plan, not returned (the holder schedules it again).
    ([("a", 1.0), ("b", 2.0)], 5.0, 10, ("a",), ["b"], None),
    ([], 5.0, 10, (), [], None),
])
def test_due_plan(plans: list[tuple[str, float]], now: float, limit: int,
                  busy: tuple[str, ...], due: list[str], left: float | None) -> None:
    plan = DuePlan()
    for queue_id, when in plans:
        plan.schedule(queue_id, when)
    assert plan.take_due(now, limit, busy) == due
    assert plan.next_due() == left


def test_due_plan_replace_starts_over() -> None:
    plan = DuePlan()
    plan.schedule("gone", 1.0)
    plan.replace([(3.0, "x"), (2.0, "y")])
    assert "gone" not in plan and len(plan) == 2
    assert plan.take_due(10.0, 10) == ["y", "x"]


def test_due_plan_fresh_mail_is_not_starved_by_a_sweep() -> None:
    # A retry sweep: thousands of old messages due before the new one (issue 16 item 7).
    plan = DuePlan()
    for i in range(1000):
        plan.schedule(f"old{i}", 1.0 + i / 1000)
    plan.schedule("new", 5.0, fresh=True)
    # the lanes in turn: new mail waits half a batch at most, then the sweep goes on
    assert plan.take_due(10.0, 4) == ["new", "old0", "old1", "old2"]
    assert plan.take_due(10.0, 2) == ["old3", "old4"]


def test_new_mail_and_the_queue_take_turns_at_the_workers() -> None:
    # A retry sweep keeps the ready window full of messages older than a new one: by
    # age the new one would wait for the whole sweep, in dispatch order for the window.
    from mxsend.dispatch import JobOrder

    order = JobOrder()
    swept = [order.key(50, fresh=False) for _ in range(400)]
    waiting = sorted(swept)
    for _ in range(2):
        order.taken(waiting.pop(0))  # the workers took two of the sweep
    new = [order.key(50, fresh=True) for _ in range(3)]
    waiting = sorted([*waiting, *new])
    # the first new message goes next, then the two lanes alternate
    assert waiting[:6] == [new[0], swept[2], new[1], swept[3], new[2], swept[4]]
    # a long burst of new mail does not starve the queue either
    burst = [order.key(50, fresh=True) for _ in range(100)]
    assert sorted([*waiting, *burst]).index(swept[10]) < 20


def test_job_priority_comes_first_and_is_clamped() -> None:
    from mxsend.dispatch import JobOrder

    order = JobOrder()
    high, normal, low = (order.key(p, fresh=False) for p in (100, 50, 1))
    assert high < normal < low  # contract §4: highest Priority first
    assert order.key(50, fresh=True) < normal  # at one place, new mail first
    assert order.key(500, fresh=False)[0] == order.key(100, fresh=False)[0]  # clamped


def test_due_plan_is_bounded_and_asks_for_a_rescan() -> None:
    plan = DuePlan(limit=10)
    # A rescan that found more than fits: the earliest 10, and where the rest starts.
    plan.replace([(float(i), f"m{i}") for i in range(10)], rest=10.0)
    assert len(plan) == 10 and plan.complete_until == 10.0
    # A retry planned after complete_until is left to the rescan that will list it.
    plan.schedule("later", 50.0)
    assert "later" not in plan
    assert not plan.wants_rescan(5.0)  # nothing left out is due yet
    assert plan.next_due() == 0.0
    assert plan.take_due(20.0, 100) == [f"m{i}" for i in range(10)]
    assert plan.next_due() == 10.0 and plan.wants_rescan(20.0)
    # Schedules beyond twice the limit trim the plan back to its earliest.
    plan = DuePlan(limit=10)
    for i in range(21):
        plan.schedule(f"x{i:02d}", float(100 - i))
    assert len(plan) == 10 and plan.complete_until == 90.0
    assert plan.take_due(1000.0, 100) == [f"x{i:02d}" for i in range(20, 10, -1)]


def test_due_plan_rescan_keeps_fresh_mail_in_front() -> None:
    plan = DuePlan()
    plan.schedule("new", 9.0, fresh=True)
    plan.replace([(1.0, "old"), (9.0, "new"), (2.0, "older")])
    assert len(plan) == 3
    assert plan.take_due(10.0, 1) == ["new"]


def test_due_plan_keeps_what_it_learnt_while_a_listing_was_made() -> None:
    # The daemon dispatches while a rescan lists queue/ (seconds for a million files).
    plan = DuePlan()
    plan.replace([(1.0, "deferred"), (2.0, "sent"), (3.0, "other")])
    plan.begin_rescan()
    assert plan.take_due(2.5, 2) == ["deferred", "sent"]
    plan.schedule("deferred", 600.0)  # attempted and deferred meanwhile
    # The listing saw both before they were taken: due at once, by its account.
    plan.replace([(1.0, "deferred"), (2.0, "sent"), (3.0, "other"), (4.0, "found")])
    assert plan.take_due(10.0, 10) == ["other", "found"]  # not "deferred" again, nor "sent"
    assert plan.next_due() == 600.0
    # Without a listing in progress, the listing is the truth again.
    plan.replace([(1.0, "deferred")])
    assert plan.take_due(10.0, 10) == ["deferred"]


def test_due_plan_forgets_a_failed_listing() -> None:
    plan = DuePlan()
    plan.begin_rescan()
    plan.schedule("x", 5.0)
    plan.end_rescan()
    plan.replace([(1.0, "x")])
    assert plan.take_due(10.0, 10) == ["x"] and plan.next_due() is None


def test_due_plan_limits_the_queue_lane_apart() -> None:
    # The queue may fill only its share of the ready window; new mail the rest.
    plan = DuePlan()
    plan.replace([(1.0, f"old{i}") for i in range(5)])
    plan.schedule("new0", 2.0, fresh=True)
    plan.schedule("new1", 2.0, fresh=True)
    assert plan.take_due(10.0, 4, queue_limit=1) == ["new0", "old0", "new1"]
    assert plan.take_due(10.0, 4, queue_limit=0) == []
    assert plan.next_due(queue=False) is None and plan.next_due() == 1.0


def test_due_plan_next_due_without_what_it_left_out() -> None:
    plan = DuePlan(limit=1)
    plan.replace([(5.0, "a")], rest=2.0)  # left out: something due at 2.0
    assert plan.next_due() == 2.0
    assert plan.next_due(rest=False) == 5.0  # a rescan is on its way: not a reason to wake


# --- the reports an attempt owes ------------------------------------------------------

def _envelope(*recipients: Recipient) -> Envelope:
    return Envelope(sender="a@src.test", recipients=recipients)


def _rcpt(address: str, status: RecipientStatus, **fields: object) -> RecipientState:
    return dataclasses.replace(RecipientState(address=address, status=status), **fields)  # type: ignore[arg-type]


def _with(*recipients: RecipientState) -> MessageState:
    return MessageState(id="Q1", created=1000.0, sender="a@src.test", size=10,
                        recipients=recipients)


P, S, B = RecipientStatus.PENDING, RecipientStatus.SENT, RecipientStatus.BOUNCED


@pytest.mark.parametrize(("before", "after", "notify", "relayed", "delay", "owed"), [
    # A new bounce owes a failure report; one bounced before owes nothing new.
    ({"x": P, "y": B}, {"x": B, "y": B}, None, (), 0.0, [("failed", ["x"])]),
    # NOTIFY=NEVER asks for nothing; SUCCESS alone asks for no failure report.
    ({"x": P}, {"x": B}, ("NEVER",), (), 0.0, []),
    ({"x": P}, {"x": B}, ("SUCCESS",), (), 0.0, []),
    # Relayed: reported when SUCCESS was asked for.
    ({"x": P}, {"x": S}, ("SUCCESS",), ("x",), 0.0, [("relayed", ["x"])]),
    ({"x": P}, {"x": S}, None, ("x",), 0.0, []),
    # Still pending after delay_warning: a DELAY notice, only if asked for.
    ({"x": P}, {"x": P}, ("DELAY",), (), 60.0, [("delayed", ["x"])]),
    ({"x": P}, {"x": P}, None, (), 60.0, []),
    ({"x": P}, {"x": P}, ("DELAY",), (), 0.0, []),  # 0: warnings off
    ({"x": P}, {"x": P}, ("DELAY",), (), 5000.0, []),  # not yet
    # Everything at once, in the order they are queued.
    ({"x": P, "y": P, "z": P}, {"x": B, "y": S, "z": P}, ("SUCCESS", "FAILURE", "DELAY"),
     ("y",), 60.0, [("failed", ["x"]), ("relayed", ["y"]), ("delayed", ["z"])]),
])
def test_reports_owed(before: dict[str, RecipientStatus], after: dict[str, RecipientStatus],
                      notify: tuple[str, ...] | None, relayed: tuple[str, ...],
                      delay: float, owed: list[tuple[str, list[str]]]) -> None:
    envelope = _envelope(*(Recipient(f"{a}@d.test", notify=notify) for a in before))
    reports = reports_owed(
        _with(*(_rcpt(f"{a}@d.test", s) for a, s in before.items())),
        _with(*(_rcpt(f"{a}@d.test", s) for a, s in after.items())),
        envelope, now=1000.0 + 120, relayed={f"{a}@d.test" for a in relayed},
        delay_warning=delay, max_age=3600.0)
    assert [(str(r.action), [d.address.split("@")[0] for d in r.recipients])
            for r in reports] == owed


def test_reports_owed_carry_the_phase_and_the_retry_limit() -> None:
    envelope = _envelope(Recipient("x@d.test", notify=("FAILURE", "DELAY")),
                         Recipient("y@d.test", notify=("FAILURE", "DELAY")))
    before = _with(_rcpt("x@d.test", P), _rcpt("y@d.test", P))
    after = _with(_rcpt("x@d.test", B, response="550 5.1.1 no such user", dsn="5.1.1",
                        remote_mta="mx1.d.test"),
                  _rcpt("y@d.test", P, delay_notified=True))
    [failed] = reports_owed(before, after, envelope, 1100.0,
                            phases={"x@d.test": Phase.RCPT}, delay_warning=60.0,
                            max_age=3600.0)
    [x] = failed.recipients
    assert x.phase is Phase.RCPT and x.status == "5.1.1" and x.remote_mta == "mx1.d.test"
    assert x.diagnostic == "550 5.1.1 no such user"
    # y was notified already: no second DELAY notice.
    delayed = reports_owed(before, _with(after.recipients[0], _rcpt("y@d.test", P)),
                           envelope, 1100.0, delay_warning=60.0, max_age=3600.0)[1]
    assert delayed.recipients[0].will_retry_until == 1000.0 + 3600.0


def test_bounce_phases_keeps_only_bounces() -> None:
    outcomes = [_outcome("s@d.test", DeliveryStatus.SENT),
                _outcome("b@d.test", DeliveryStatus.BOUNCED, "550 no", "5.1.1"),
                _outcome("d@d.test", DeliveryStatus.DEFERRED, "451 later", "4.3.0")]
    assert bounce_phases(outcomes) == {"b@d.test": Phase.RCPT}


# --- heartbeats: health and the supervisor's watchdog ---------------------------------

@pytest.mark.parametrize(("beats", "pids", "fresh"), [
    ([(1, 99.0), (2, 98.0)], [1, 2], True),
    ([(1, 99.0), (2, 90.0)], [1, 2], False),  # one daemon stopped beating
    ([(1, 99.0)], [1, 2], False),  # one never beat (or cannot write its beat)
    ([(1, 99.0), (2, 90.0)], [1], True),  # a stale beat of no daemon of ours
    ([(1, 90.0), (1, 99.0)], [1], True),  # the newest beat of a PID counts
    ([(None, 99.0)], [1], False),  # unreadable: not known to be alive
    ([], [], True),
])
def test_every_daemon_must_beat(beats: list[tuple[int | None, float]], pids: list[int],
                                fresh: bool) -> None:
    read = [heartbeat.Beat(f"owner{i}", pid, mtime) for i, (pid, mtime) in enumerate(beats)]
    assert heartbeat.all_fresh(read, pids, now=100.0, max_age=5.0) is fresh


def test_stale_beats_and_reading_them(tmp_path: Path) -> None:
    owners = tmp_path / "owners"
    owners.mkdir()
    (owners / "a").write_text("boot 4026531836 123\n")
    (owners / "b").write_text("garbage\n")
    os.utime(owners / "b", (50.0, 50.0))
    beats = heartbeat.read_beats(tmp_path)
    assert [(b.owner, b.pid) for b in beats] == [("a", 123), ("b", None)]
    assert [b.owner for b in heartbeat.stale(beats, time.time(), 15.0)] == ["b"]
    assert heartbeat.read_beats(tmp_path / "missing") == []


def test_health_does_not_import_the_daemon() -> None:
    code = ("import sys, mxsend.commands.health, mxsend.supervisor; "
            "sys.exit('mxsend.scheduler' in sys.modules or 'mxsend.delivery' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
