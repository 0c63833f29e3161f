"""kill -9 at every file-system call of the spool's state changes; nothing may be lost.

tests/spool_crash_driver.py runs the scripted life of two messages (and one bad file)
in a real subprocess and SIGKILLs itself just before its N-th file-system call. For
every N, another Spool recovers and accepts what is left, and each message must be in
the state before or after the step that was in flight: never lost, never duplicated,
bytes unchanged, no recipient going back from sent to pending.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mxsend.envelope import parse_bsmtp
from mxsend.spool import RecipientStatus, Spool
from tests.spool_crash_driver import MESSAGES

DRIVER = Path(__file__).with_name("spool_crash_driver.py")
ROOT = Path(__file__).resolve().parent.parent

STEPS = [
    "create", "enqueue m1", "enqueue m2", "enqueue bad1", "accept bad1", "accept m1",
    "accept m2", "claim m1", "update m1 b-sent", "release m1", "claim m1 again",
    "complete m1", "claim m2", "delete m2", "done",
]
P, S = RecipientStatus.PENDING, RecipientStatus.SENT
GONE, BAD = "gone", "bad"


def expected(step: str) -> dict[str, set[object]]:
    """What each message may look like after a crash during `step` and recovery.

    GONE is both "never handed over" (a crash before the rename into new/) and "done".
    """
    at = STEPS.index(step)

    def phase(*pairs: tuple[str, set[object]]) -> set[object]:
        for until, states in pairs:
            if at <= STEPS.index(until):
                return states
        raise AssertionError(step)

    return {
        "m1": phase(
            ("create", {GONE}),
            ("enqueue m1", {GONE, (P, P)}),
            ("claim m1", {(P, P)}),
            ("update m1 b-sent", {(P, P), (S, P)}),
            ("claim m1 again", {(S, P)}),
            ("complete m1", {(S, P), GONE}),
            ("done", {GONE}),
        ),
        "m2": phase(
            ("enqueue m1", {GONE}),
            ("enqueue m2", {GONE, (P,)}),
            ("claim m2", {(P,)}),
            ("delete m2", {(P,), GONE}),
            ("done", {GONE}),
        ),
        "bad1": phase(
            ("enqueue m2", {GONE}),
            ("enqueue bad1", {GONE, BAD}),
            ("done", {BAD}),
        ),
    }


def run_driver(spool: Path, crash_at: int | None, keep_sent: bool = False) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), KEEP_SENT="1" if keep_sent else "0")
    env.pop("MXSEND_CRASH_AT", None)
    if crash_at is not None:
        env["MXSEND_CRASH_AT"] = str(crash_at)
    proc = subprocess.run(
        [sys.executable, str(DRIVER), "crash", str(spool)],
        env=env, capture_output=True, timeout=30, check=False,
    )
    if crash_at is None:
        assert proc.returncode == 0, proc.stderr.decode()
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    return proc.stdout.decode().splitlines()


def step_ranges(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Step name -> (first, last) file-system call number made during it."""
    marks = [(line.split(" @")[0].removeprefix("step "), int(line.split(" @")[1]))
             for line in lines if line.startswith("step ")]
    total = int(lines[-1].split()[1])
    bounds = [calls for _, calls in marks[1:]] + [total]
    return {name: (calls + 1, end) for (name, calls), end in zip(marks, bounds, strict=True)}


def observe(root: Path, id: str) -> object:
    """The one state a message is in; fails on a duplicate or a half state."""
    places: list[object] = []
    if (root / "new" / id).exists():
        places.append("new")
    if (root / "bad" / id).exists():
        places.append(BAD)
        assert (root / "bad" / id).read_bytes() == MESSAGES[id]
        assert (root / "bad" / f"{id}.reason").read_text().strip()
    found = Spool(root, owner="observer").find(id)
    msg = root / "msg" / id
    if found is not None:
        state, where = found
        assert where == "queue", f"{id} still claimed after recovery"
        assert msg.read_bytes() == MESSAGES[id], "message bytes changed"
        assert [r.address for r in state.recipients] == [
            r.address for r in parse_bsmtp(MESSAGES[id]).envelope.recipients
        ]
        places.append(tuple(r.status for r in state.recipients))
    else:
        assert not msg.exists(), f"msg/{id} without state"
    assert len(places) <= 1, f"{id} in several places: {places}"
    return places[0] if places else GONE


def check_after_crash(root: Path, lines: list[str], keep_sent: bool) -> None:
    steps = [line.split(" @")[0].removeprefix("step ") for line in lines
             if line.startswith("step ")]
    step = steps[-1] if steps else "create"
    checker = Spool(root, owner="checker", keep_sent=keep_sent)
    checker.create_dirs()
    checker.recover(stale_after=60, now=time.time() + 3600)
    for name in checker.incoming():
        checker.accept(name, time.time())
    assert checker.incoming() == []
    for id, states in expected(step).items():
        seen = observe(root, id)
        assert seen in states, f"crash during {step!r}: {id} is {seen}, allowed {states}"
    if keep_sent and observe(root, "m1") == GONE and STEPS.index(step) >= STEPS.index(
        "complete m1"
    ):
        assert (root / "sent" / "m1").read_bytes() == MESSAGES["m1"]
    # Nothing of the dead driver is left behind.
    for kind in ("active", "incoming"):
        leftovers = [d for d in os.listdir(root / kind) if not d.startswith("checker")]
        assert leftovers == [], f"{kind}: {leftovers}"
    assert not [n for n in os.listdir(root / "queue") if n.startswith(".")]


def test_driver_runs_to_the_end(tmp_path: Path) -> None:
    lines = run_driver(tmp_path, None)
    assert lines[-2].startswith("step done")
    check_after_crash(tmp_path, lines, keep_sent=False)
    assert sorted(os.listdir(tmp_path / "bad")) == ["bad1", "bad1.reason"]


def test_kill_before_every_file_system_call(tmp_path: Path) -> None:
    ranges = step_ranges(run_driver(tmp_path / "count", None))
    total = ranges["done"][1]
    assert total > 50  # the driver really goes through the spool
    seen = set()
    for n in range(1, total + 1):
        root = tmp_path / f"crash{n}"
        lines = run_driver(root, n)
        seen.add(lines[-1].split(" @")[0])
        check_after_crash(root, lines, keep_sent=False)
    assert {f"step {s}" for s in STEPS[:-1]} <= seen


def test_kill_during_completion_with_keep_sent(tmp_path: Path) -> None:
    ranges = step_ranges(run_driver(tmp_path / "count", None, keep_sent=True))
    first, last = ranges["complete m1"]
    assert last - first > 3
    for n in range(first, last + 2):
        root = tmp_path / f"crash{n}"
        check_after_crash(root, run_driver(root, n, keep_sent=True), keep_sent=True)
