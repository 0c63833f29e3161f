"""Accepting a file a process has taken from new/: queue it or quarantine it.

docs/spool.md, "Acceptance", numbers the steps and says what a crash after each leaves;
the comments below use the same numbers. Every OS call goes through the `os` module
attribute, for the crash test.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

from mxsend.durable import (
    Steps,
    Sync,
    free_name,
    move_noreplace,
    read_fd,
    stamp,
    write_atomic_steps,
)
from mxsend.envelope import Message, parse_bsmtp
from mxsend.errors import EnvelopeError
from mxsend.queue_state import MessageState, initial_state, state_to_json
from mxsend.spares import Spares
from mxsend.spool_layout import id_problem

# A state due within this many seconds of now takes the mtime its write gives it: the
# scheduler reads mtimes to the second's precision it needs, not to the microsecond.
WRITE_STAMPS_WITHIN = 1.0


@dataclass(frozen=True, slots=True)
class Accepted:
    id: str
    state: MessageState
    message: Message


@dataclass(frozen=True, slots=True)
class Quarantined:
    id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Folders:
    """Where an acceptance puts things: the spool's msg/, queue/ and bad/."""

    msg: str
    queue: str
    bad: str


def accept_held_steps(name: str, held: str, now: float, folders: Folders,
                      max_message_size: int, spares: Spares
                      ) -> Steps[Accepted | Quarantined]:
    """Queue `held` (our incoming/<owner>/NAME) as message NAME, due now, or quarantine it."""
    problem = id_problem(name)
    if problem:
        return (yield from quarantine_steps(name, held, problem, folders.bad))
    info = os.lstat(held)
    if not stat.S_ISREG(info.st_mode):
        # A symlink could point anywhere (/etc/shadow); a spool file is a file.
        return (yield from quarantine_steps(name, held, "not a regular file", folders.bad))
    size = info.st_size
    if size > max_message_size:
        # Decided from the size alone: a huge file is never read into memory.
        return (yield from quarantine_steps(
            name, held, f"file of {size} bytes exceeds spool.max_message_size", folders.bad
        ))
    fd = os.open(held, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        raw = read_fd(fd, max_message_size + 1, size)
    finally:
        os.close(fd)
    try:
        message = parse_bsmtp(raw)
    except EnvelopeError as exc:
        return (yield from quarantine_steps(name, held, str(exc), folders.bad))
    state = initial_state(name, message, now, stamp(info))
    inbox = os.path.dirname(held)
    pending_state = f"{inbox}/.{name}.state"
    # 3. The state, private to us until published. Its mtime is its next try (docs/
    #    spool.md), which for new mail is now: the write itself sets that, so no
    #    utimensat() (a system call, and a GIL hand-over on the committer's thread).
    stamped = None if abs(state.next_try - time.time()) < WRITE_STAMPS_WITHIN else state.next_try
    state_fd = spares.write_new_file(pending_state, state_to_json(state), stamped)
    try:
        # 4. Reserve the id: link() fails if msg/NAME exists, atomically, so two
        #    processes accepting two files of one name cannot both win.
        try:
            os.link(held, f"{folders.msg}/{name}", follow_symlinks=False)
        except FileExistsError:
            os.unlink(pending_state)
            return (yield from quarantine_steps(name, held, "queue id in use", folders.bad))
        # One barrier for the state and the reservation: of a crash before it, recovery
        # finds what was kept and undoes the acceptance unless both were (docs/spool.md).
        yield Sync(fd=state_fd, directory=folders.msg)
    finally:
        os.close(state_fd)
    # 5. Drop our second name of the file. From here the reserved id and the private
    #    state are what recovery finishes the acceptance from. Before the publish: a
    #    message once published may be delivered and removed by another process, and
    #    a name of it left in incoming/ would then look never reserved to recovery,
    #    which would hand it back to new/ and have it sent twice.
    os.unlink(held)
    yield Sync(directory=inbox)
    # 6. Publish: from this rename on the message is queued and claimable.
    os.rename(pending_state, f"{folders.queue}/{name}")
    yield Sync(directory=folders.queue)
    return Accepted(id=name, state=state, message=message)


def quarantine_steps(name: str, held: str, reason: str, bad: str) -> Steps[Quarantined]:
    """Move `held` to bad/ with NAME.reason, one line; never replacing a name there."""
    reason = " ".join(reason.split())  # one line, whatever the parser said
    target = free_name(bad, name, reasons=True)
    # The reason first: a crash before the file's move leaves the file in incoming/,
    # which recovery returns to new/ and this runs again, overwriting the reason.
    yield from _write_reason(bad, target, reason)
    moved = move_noreplace(held, bad, target)
    if moved != target:  # someone took the name meanwhile
        yield from _write_reason(bad, moved, reason)
    yield Sync(directory=bad, also=os.path.dirname(held))
    return Quarantined(id=name, reason=reason)


def _write_reason(bad: str, name: str, reason: str) -> Steps[None]:
    yield from write_atomic_steps(f"{bad}/{name}.reason", (reason + "\n").encode())
