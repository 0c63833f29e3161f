"""The per-destination limiter: suspensions seen across daemons of a spool, shares, rates."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from mxsend.limiter import Limiter, read_suspensions, remove_suspension
from mxsend.shaping import Shape, parse_rate


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_suspension_is_seen_by_another_daemon_of_the_spool(tmp_path: Path) -> None:
    clock = Clock()
    one, two = Limiter(tmp_path, clock=clock), Limiter(tmp_path, clock=clock)
    assert two.suspended_until("gmail") == 0.0
    one.suspend("gmail", 3600, "421 4.7.28 too fast")
    clock.now += 2 * Limiter.RECHECK
    assert two.suspended_until("gmail") == pytest.approx(1000.0 + 3600)
    [listed] = read_suspensions(tmp_path, clock.now)
    assert (listed.destination, listed.reply) == ("gmail", "421 4.7.28 too fast")
    assert oct(os.stat(tmp_path / "suspended" / "gmail").st_mode & 0o777) == "0o640"
    clock.now += 3600
    assert two.suspended_until("gmail") == 0.0 and read_suspensions(tmp_path, clock.now) == []


def test_resume_lifts_a_suspension_for_every_daemon(tmp_path: Path) -> None:
    clock = Clock()
    one, two = Limiter(tmp_path, clock=clock), Limiter(tmp_path, clock=clock)
    one.suspend("yahoo", 600, "421 TSS04")
    assert remove_suspension(tmp_path, "yahoo") and not remove_suspension(tmp_path, "yahoo")
    clock.now += 2 * Limiter.RECHECK
    assert one.suspended_until("yahoo") == 0.0 and two.suspended_until("yahoo") == 0.0


def test_a_broken_suspension_file_is_ignored_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "suspended").mkdir()
    (tmp_path / "suspended" / "x").write_text("{not json")
    assert Limiter(tmp_path).suspended_until("x") == 0.0
    assert read_suspensions(tmp_path, 0) == []


SHAPE = Shape(name="big", hosts=("*.big.example",), max_connections=4,
              rate=parse_rate("10/s", "rate"), connection_rate=parse_rate("2/s", "cr"))


def test_connections_are_shared_out_among_the_daemons(tmp_path: Path) -> None:
    clock = Clock()
    limiter = Limiter(tmp_path, share=0.5, clock=clock)          # two daemons: 2 each
    assert limiter.connection_limit("big", SHAPE, default=10) == 2
    assert limiter.may_connect("big", SHAPE, 10) == 0.0
    clock.now += 1.0                                              # connection_rate 1/s each
    assert limiter.may_connect("big", SHAPE, 10) == 0.0
    clock.now += 10
    assert limiter.may_connect("big", SHAPE, 10) == math.inf     # at the share: wait
    limiter.closed("big")
    assert limiter.may_connect("big", SHAPE, 10) == 0.0


def test_throttle_halves_until_it_ends(tmp_path: Path) -> None:
    clock = Clock()
    limiter = Limiter(tmp_path, clock=clock)
    limiter.throttle("big", 60)
    assert limiter.connection_limit("big", SHAPE, default=10) == 2
    assert limiter.connection_limit("other", None, default=10) == 10
    limiter.throttle("other", 60)
    assert limiter.connection_limit("other", None, default=10) == 5
    clock.now += 60
    assert limiter.connection_limit("big", SHAPE, default=10) == 4


def test_a_daemons_part_of_a_rate(tmp_path: Path) -> None:
    clock = Clock()
    limiter = Limiter(tmp_path, share=0.5, clock=clock)          # 10/s for two: 5/s each
    assert limiter.may_send("big", SHAPE) == 0.0
    assert limiter.may_send("big", SHAPE) == pytest.approx(0.2)
    clock.now += 0.2
    assert limiter.may_send("big", SHAPE) == 0.0
    assert limiter.may_send("unshaped", None) == 0.0
