"""Hold and release under SIGKILL: the crash test's method for the operator's moves.

tests/spool_crash_driver.py (hold mode) holds a message, releases it and holds it again,
killed before each file-system call in turn. After recovery the message must be in
exactly one place, queued or held, with the `held` of its state matching the place: a
claim cut short by a crash goes back where the state says, never into the queue while
it says held (docs/spool.md, "Hold and release").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mxsend.spool import Spool
from tests.spool_crash_driver import MESSAGES

DRIVER = Path(__file__).with_name("spool_crash_driver.py")
ROOT = Path(__file__).resolve().parent.parent
STEPS = ["create", "enqueue m1", "accept m1", "hold m1", "release m1", "hold m1 again", "done"]
GONE = "gone"


def allowed(step: str) -> set[str]:
    return {
        "create": {GONE},
        "enqueue m1": {GONE, "queue"},
        "accept m1": {"queue"},
        "hold m1": {"queue", "hold"},
        "release m1": {"hold", "queue"},
        "hold m1 again": {"queue", "hold"},
        "done": {"hold"},
    }[step]


def run(root: Path, crash_at: int | None) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MXSEND_CRASH_AT", None)
    if crash_at is not None:
        env["MXSEND_CRASH_AT"] = str(crash_at)
    proc = subprocess.run([sys.executable, str(DRIVER), "hold", str(root)],
                          env=env, capture_output=True, timeout=30, check=False)
    expected = 0 if crash_at is None else -signal.SIGKILL
    assert proc.returncode == expected, proc.stderr.decode()
    return proc.stdout.decode().splitlines()


def check(root: Path, lines: list[str]) -> str:
    steps = [line.split(" @")[0].removeprefix("step ") for line in lines
             if line.startswith("step ")]
    step = steps[-1] if steps else "create"
    checker = Spool(root, owner="checker")
    checker.create_dirs()
    checker.recover(stale_after=60, now=time.time() + 3600)
    for name in checker.incoming():
        checker.accept(name, time.time())
    found = checker.find("m1")
    if found is None:
        assert not (root / "msg" / "m1").exists()
        place = GONE
    else:
        state, place = found
        assert place in ("queue", "hold"), f"m1 still claimed after recovery: {place}"
        assert state.held == (place == "hold"), (
            f"crash during {step!r}: held={state.held} in {place}")
        assert (root / "msg" / "m1").read_bytes() == MESSAGES["m1"]
        other = "hold" if place == "queue" else "queue"
        assert not (root / other / "m1").exists(), "m1 in both queue/ and hold/"
    assert place in allowed(step), f"crash during {step!r}: m1 is {place}"
    for kind in ("active", "incoming"):
        assert [d for d in os.listdir(root / kind) if not d.startswith("checker")] == []
    return step


def test_kill_before_every_file_system_call_of_hold_and_release(tmp_path: Path) -> None:
    lines = run(tmp_path / "count", None)
    check(tmp_path / "count", lines)
    total = int(lines[-1].split()[1])
    seen = set()
    for n in range(1, total + 1):
        root = tmp_path / f"crash{n}"
        seen.add(check(root, run(root, n)))
    assert set(STEPS[:-1]) <= seen
