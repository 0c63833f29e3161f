"""Drives a real Spool in a subprocess, for tests/test_spool_crash.py and test_spool.py.

    python tests/spool_crash_driver.py crash SPOOL   # the scripted life of two messages
    python tests/spool_crash_driver.py race SPOOL    # accept and claim everything it can
    python tests/spool_crash_driver.py hold SPOOL    # m1 held, released, held again

crash mode: every file-system call the spool makes (open, write, fsync, rename, link,
unlink, utime, mkdir, rmdir) is counted; with MXSEND_CRASH_AT=N the process SIGKILLs
itself just before call number N, so the test can stop it at every point of every state
change. Before each step it prints "step NAME @CALLS" (flushed), so the test knows which
transition was in flight. Without MXSEND_CRASH_AT it runs to the end and prints
"ops N" with the number of calls made.

race mode: prints "accepted ID" and "claimed ID" for what this process won; completes
each claimed message.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mxsend import acceptance, durable, recovery, spares, spool_layout
from mxsend import spool as spool_module
from mxsend.spool import Accepted, RecipientStatus, Spool

# Every module that makes the spool's file-system calls, each through its `os` attribute.
SPOOL_MODULES = (spool_module, durable, recovery, spares, acceptance, spool_layout)

COUNTED = ("open", "write", "fsync", "rename", "link", "unlink", "utime", "makedirs",
           "mkdir", "rmdir")


class _CountingOs:
    """The os module, with a SIGKILL before the N-th counted call."""

    def __init__(self, crash_at: int | None) -> None:
        self.calls = 0
        self.crash_at = crash_at

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in COUNTED:
            return real

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == self.crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return counted


MESSAGES = {
    "m1": b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nRCPT TO:<c@dst.test>\r\n"
    b"DATA\r\nSubject: one\r\n\r\n..dotted\r\n.\r\n",
    "m2": b"MAIL FROM:<>\nRCPT TO:<d@dst.test> NOTIFY=NEVER\nDATA\nSubject: two\n\nbody\n.\n",
    "bad1": b"this is not batch smtp\n",
}


_counting: _CountingOs | None = None


def step(name: str) -> None:
    calls = _counting.calls if _counting else 0
    print(f"step {name} @{calls}", flush=True)


def crash(root: Path) -> None:
    counting = _CountingOs(int(os.environ["MXSEND_CRASH_AT"])
                           if os.environ.get("MXSEND_CRASH_AT") else None)
    global _counting
    _counting = counting
    for module in SPOOL_MODULES:
        module.os = counting  # type: ignore[attr-defined]
    spool = Spool(root, owner="driver", keep_sent=os.environ.get("KEEP_SENT") == "1")
    now = 1_000_000.0
    step("create")
    spool.create_dirs()
    spool.heartbeat()
    for name, raw in MESSAGES.items():
        step(f"enqueue {name}")
        spool.enqueue_bytes(raw, name=name)
    for name in ("bad1", "m1", "m2"):
        step(f"accept {name}")
        spool.accept(name, now)
    # m1: b sent on the first attempt; c on the second; then complete.
    step("claim m1")
    claim = spool.claim("m1")
    assert claim is not None
    state = spool.read(claim)
    step("update m1 b-sent")
    state = replace(state, attempts=1, last_try=now, recipients=(
        replace(state.recipients[0], status=RecipientStatus.SENT, response="250 ok"),
        state.recipients[1]))
    spool.update(claim, state)
    step("release m1")
    state = replace(state, next_try=now + 300)
    spool.release(claim, state)
    step("claim m1 again")
    claim = spool.claim("m1")
    assert claim is not None
    state = spool.read(claim)
    step("complete m1")
    state = replace(state, attempts=2, recipients=(
        state.recipients[0],
        replace(state.recipients[1], status=RecipientStatus.SENT, response="250 ok")))
    spool.complete(claim, state)
    # m2: bounced then deleted.
    step("claim m2")
    claim = spool.claim("m2")
    assert claim is not None
    step("delete m2")
    spool.delete(claim)
    step("done")
    print(f"ops {counting.calls}", flush=True)


def hold(root: Path) -> None:
    """As crash(), for the operator's hold and release moves (tests/test_spool_crash_hold.py)."""
    counting = _CountingOs(int(os.environ["MXSEND_CRASH_AT"])
                           if os.environ.get("MXSEND_CRASH_AT") else None)
    global _counting
    _counting = counting
    for module in SPOOL_MODULES:
        module.os = counting  # type: ignore[attr-defined]
    spool = Spool(root, owner="driver")
    step("create")
    spool.create_dirs()
    spool.heartbeat()
    step("enqueue m1")
    spool.enqueue_bytes(MESSAGES["m1"], name="m1")
    step("accept m1")
    spool.accept("m1", 1_000_000.0)
    step("hold m1")
    assert spool.hold("m1") is not None
    step("release m1")
    assert spool.unhold("m1") is not None
    step("hold m1 again")
    assert spool.hold("m1") is not None
    step("done")
    print(f"ops {counting.calls}", flush=True)


def race(root: Path) -> None:
    spool = Spool(root)
    spool.create_dirs()
    spool.heartbeat()
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while not (root / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.002)  # a start line, so both processes really race
    now = time.time()
    idle = 0
    while idle < 3:
        busy = False
        for name in spool.incoming():
            result = spool.accept(name, now)
            if isinstance(result, Accepted):
                print(f"accepted {name}", flush=True)
                busy = True
        for next_try, id in spool.queued():
            if next_try > time.time() + 1:
                break
            claim = spool.claim(id)
            if claim is None:
                continue
            busy = True
            print(f"claimed {id}", flush=True)
            state = spool.read(claim)
            done = tuple(replace(r, status=RecipientStatus.SENT) for r in state.recipients)
            spool.complete(claim, replace(state, recipients=done))
        idle = 0 if busy else idle + 1
    spool.retire()


if __name__ == "__main__":
    mode, root = sys.argv[1], Path(sys.argv[2])
    {"crash": crash, "race": race, "hold": hold}[mode](root)
