"""The scheduler's pure decisions: grouping, folding outcomes, giving up."""

from __future__ import annotations

import time
from pathlib import Path

from mxsend import schedule
from mxsend.config import config_from_mapping
from mxsend.envelope import Recipient
from mxsend.errors import Phase
from mxsend.outcome import DeliveryStatus, RecipientOutcome
from mxsend.scheduler import Daemon, apply_outcomes, give_up, group_by_domain, own_share_first
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


def test_a_file_that_failed_acceptance_waits_and_once_leaves_it(tmp_path: Path) -> None:
    config = config_from_mapping({"spool": {"path": str(tmp_path)}})
    for once, expected in ((False, ["late", "new"]), (True, ["new"])):
        daemon = Daemon(config, once=once)
        daemon._accept_failed = {"late": time.monotonic() - 1, "soon": time.monotonic() + 60}
        # Due again in the daemon; a --once run never retries within the run.
        assert daemon._retryable(["late", "soon", "new"]) == expected
        assert "soon" in daemon._accept_failed
        daemon._io.shutdown()
        daemon._commit_thread.shutdown()
