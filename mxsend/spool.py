"""The on-disk queue: acceptance from new/, durable per-recipient state, claims, recovery.

Rules of this file (docs/spool.md has the full picture and the crash analysis):

- Every state change is one rename, one exclusive link, or one atomic replace (temp file,
  fsync, rename, fsync of the directory). Nothing is ever rewritten in place.
- A message is claimed by renaming its state file from queue/ into the claimant's own
  active/<owner>/ directory; a rename succeeds for exactly one process.
- Nobody holds a lock a dead process could keep: a live process refreshes the mtime of
  owners/<owner>; the directories of an owner whose heartbeat is stale or gone are taken
  over by renaming the whole directory (again, exactly one process wins) and put right.
- Temporary files live in the writer's own directory and start with "." so that no
  scanner ever reads them.
- Nothing here logs: results are returned, and the daemon logs the contract's events.

All of the spool's OS calls go through the `os` module attribute (never `from os import`),
so the crash test can interpose on them and kill the process between any two.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import re
import secrets
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

from mxsend.envelope import Message, parse_bsmtp, serialise_bsmtp
from mxsend.errors import EnvelopeError, SpoolError

STATE_VERSION = 1
# A queue id is also a file name and appears in logs and in Lua: keep it short and
# printable. 128 leaves room for maildir-style names ("1700000000.M1P2.host,S=42").
MAX_ID_LENGTH = 128
# Maildir's rule for abandoned writer files: untouched for 36 hours means dead.
TMP_MAX_AGE = 36 * 3600.0

DIRS = ("tmp", "new", "incoming", "bad", "msg", "queue", "active", "owners", "sent", "control")
# Contract §10: folders 0750 and files 0640, readable by the spool's group, by no one
# else. With spool.group the folders are also setgid, so that what anyone creates in
# them belongs to that group, and the writers' folders are group-writable: a writer of
# another user hands mail over by creating it in tmp/ and renaming it into new/.
DIR_MODE = 0o750
FILE_MODE = 0o640
WRITER_DIRS = ("tmp", "new")
GROUP_WRITER_DIR_MODE = 0o770
# A writer of another user than the daemon's: Linux's fs.protected_hardlinks lets the
# daemon link a file into msg/ only if it may read and write it.
OTHER_WRITER_FILE_MODE = 0o660

# Sortable alphabet (ASCII order) without I, L, O, U (Crockford's base32).
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
T = TypeVar("T")
_OWNER_SAFE = re.compile(r"[^A-Za-z0-9.\-]")
_PRINTABLE_NO_SPACE = re.compile(r"[!-~]*")  # code points 33 to 126
_TAKEN = "~"  # active/<owner>~<token>: a directory taken over from a dead owner
# State files a process has finished with are kept as active/<owner>/.spare-N and
# reused for the next state it writes, up to this many (see Spool._take_spare).
SPARE_MAX = 1024
_SPARE = ".spare-"


class RecipientStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    BOUNCED = "bounced"


@dataclass(frozen=True, slots=True)
class RecipientState:
    """What is known about one recipient of a queued message."""

    address: str
    status: RecipientStatus = RecipientStatus.PENDING
    response: str = ""  # last reply or reason
    dsn: str = ""  # last enhanced status code x.y.z (RFC 3463)
    relay: str = ""  # last host[ip]:port
    remote_mta: str = ""  # last server host name
    last_attempt: float = 0.0
    delay_notified: bool = False

    @property
    def final(self) -> bool:
        return self.status is not RecipientStatus.PENDING


@dataclass(frozen=True, slots=True)
class MessageState:
    """The durable state of one queued message; recipients in envelope order."""

    id: str
    created: float  # epoch seconds of acceptance
    sender: str  # "" is the null sender
    size: int  # bytes of message data (CRLF, not dot-stuffed)
    recipients: tuple[RecipientState, ...]
    attempts: int = 0
    last_try: float | None = None
    next_try: float = 0.0
    last_error: str = ""
    # "dev:ino:mtime_ns" of msg/ID at acceptance. Recovery uses it to tell this
    # message's file from a later file that reused the same name (docs/spool.md).
    file_stamp: str = ""

    def pending(self) -> tuple[RecipientState, ...]:
        return tuple(r for r in self.recipients if not r.final)

    def is_final(self) -> bool:
        return all(r.final for r in self.recipients)


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
class Claim:
    """A message's state file held in active/<owner>/ by this process."""

    id: str
    path: Path
    owner: str = field(default="")


# --- pure helpers -----------------------------------------------------------------------


def new_queue_id(now: float | None = None, token: bytes | None = None) -> str:
    """11 characters of microseconds since the epoch, then 10 random ones; sorts by time.

    Like Postfix's long queue ids: unique without coordination, safe as a file name.
    """
    micros = int((time.time() if now is None else now) * 1_000_000)
    stamp = "".join(_ALPHABET[(micros >> (5 * i)) & 31] for i in range(10, -1, -1))
    rand = int.from_bytes(token if token is not None else secrets.token_bytes(7), "big")
    tail = "".join(_ALPHABET[(rand >> (5 * i)) & 31] for i in range(9, -1, -1))
    return stamp + tail


def id_problem(name: str) -> str | None:
    """Why a writer-chosen file name cannot be a queue id, or None if it can."""
    if not name or name in (".", ".."):
        return "empty file name"
    if len(name) > MAX_ID_LENGTH:
        return f"file name longer than {MAX_ID_LENGTH} characters"
    if "/" in name or "\0" in name:
        return "file name contains '/' or NUL"
    if not _PRINTABLE_NO_SPACE.fullmatch(name):
        # Ids appear in logs, on command lines and in Lua: printable ASCII, no spaces.
        return "file name has spaces, control or non-ASCII characters"
    return None


def default_owner() -> str:
    host = _OWNER_SAFE.sub("_", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def owner_of(directory_name: str) -> str:
    """The owner of active/<name> or incoming/<name>: the part before any '~'."""
    return directory_name.partition(_TAKEN)[0]


def state_to_json(state: MessageState) -> bytes:
    doc: dict[str, Any] = {
        "version": STATE_VERSION,
        "id": state.id,
        "created": state.created,
        "sender": state.sender,
        "size": state.size,
        "attempts": state.attempts,
        "last_try": state.last_try,
        "next_try": state.next_try,
        "last_error": state.last_error,
        "file_stamp": state.file_stamp,
        "recipients": [
            {
                "address": r.address,
                "status": r.status.value,
                "response": r.response,
                "dsn": r.dsn,
                "relay": r.relay,
                "remote_mta": r.remote_mta,
                "last_attempt": r.last_attempt,
                "delay_notified": r.delay_notified,
            }
            for r in state.recipients
        ],
    }
    return (_STATE_ENCODER.encode(doc) + "\n").encode()


# Compact on purpose: with `indent` the json module falls back to its pure-Python
# encoder, which was an eighth of the daemon's CPU (`mxsend queue show` pretty-prints).
# One encoder for all: json.dumps with options builds a new one per call.
_STATE_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def state_from_json(raw: bytes) -> MessageState:
    """Parse a state file; SpoolError if it is not one we wrote."""
    try:
        doc = json.loads(raw)
        if doc.get("version") != STATE_VERSION:
            raise SpoolError(f"unknown state version {doc.get('version')!r}")
        recipients = tuple(
            RecipientState(
                address=str(r["address"]),
                status=RecipientStatus(r["status"]),
                response=str(r.get("response", "")),
                dsn=str(r.get("dsn", "")),
                relay=str(r.get("relay", "")),
                remote_mta=str(r.get("remote_mta", "")),
                last_attempt=float(r.get("last_attempt", 0.0)),
                delay_notified=bool(r.get("delay_notified", False)),
            )
            for r in doc["recipients"]
        )
        last_try = doc.get("last_try")
        return MessageState(
            id=str(doc["id"]),
            created=float(doc["created"]),
            sender=str(doc["sender"]),
            size=int(doc["size"]),
            recipients=recipients,
            attempts=int(doc.get("attempts", 0)),
            last_try=None if last_try is None else float(last_try),
            next_try=float(doc.get("next_try", 0.0)),
            last_error=str(doc.get("last_error", "")),
            file_stamp=str(doc.get("file_stamp", "")),
        )
    except SpoolError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SpoolError(f"corrupt state file: {exc}") from None


def initial_state(id: str, message: Message, now: float, file_stamp: str = "") -> MessageState:
    """A freshly accepted message: every recipient pending, due now."""
    return MessageState(
        id=id,
        created=now,
        sender=message.envelope.sender,
        size=len(message.data),
        recipients=tuple(RecipientState(r.address) for r in message.envelope.recipients),
        next_try=now,
        file_stamp=file_stamp,
    )


# --- the spool --------------------------------------------------------------------------


class Spool:
    """One process's handle on a spool directory shared with writers and other mxsends."""

    def __init__(
        self,
        root: Path,
        *,
        keep_sent: bool = False,
        max_message_size: int = 50 * 1024**2,
        owner: str | None = None,
        durable: Durability | None = None,
        group: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.group = group  # spool.group as a gid; None: the daemon's own group
        self._durable = durable or FSYNC
        self.keep_sent = keep_sent
        self.max_message_size = max_message_size
        if owner is not None and (not owner or _OWNER_SAFE.search(owner)):
            raise ValueError(f"owner must be letters, digits, '.' and '-': {owner!r}")
        self.owner = owner or default_owner()
        self._registered = False
        # The hot operations join plain strings: pathlib's `/` and str() were ~5% of the
        # daemon's CPU. Each is the str of the Path the method of that name returns.
        root_str = os.fspath(self.root)
        self._new, self._msg, self._queue, self._bad, self._sent = (
            os.path.join(root_str, name) for name in ("new", "msg", "queue", "bad", "sent"))
        self._inbox = os.path.join(root_str, "incoming", self.owner)
        self._active = os.path.join(root_str, "active", self.owner)
        # Whether we made (or found) incoming/<owner> and active/<owner>: after that an
        # operation does not mkdir them again, but makes them anew if a rename into one
        # finds it gone (a recoverer took it, or retire() removed it).
        self._have_inbox = self._have_active = False
        # Inodes to reuse for new state files: ext4 looks for a free inode by skipping
        # the ones freed in the last ~30 s, so with a state file made and removed per
        # message each new one cost a scan over thousands (the kernel's
        # recently_deleted()): up to half of the daemon's system time, varying run to
        # run. Names of our active/<owner>/.spare-N whose inode has no other name.
        self._spares: list[str] = []
        self._spare_numbers = itertools.count()

    # -- paths

    def _dir(self, name: str) -> Path:
        return self.root / name

    def message_path(self, id: str) -> Path:
        """msg/ID, the accepted spool file (Lua's `Filename`)."""
        return self.root / "msg" / _checked(id)

    def message_file(self, id: str) -> str:
        """str(message_path(id)) without pathlib, for the per-message hot path."""
        return f"{self._msg}/{_checked(id)}"

    def _active_dir(self) -> Path:
        return self.root / "active" / self.owner

    def _incoming_dir(self) -> Path:
        return self.root / "incoming" / self.owner

    # -- set-up and liveness

    def create_dirs(self) -> None:
        """Make the spool's folders, or put right the modes and group of ours that exist."""
        try:
            os.makedirs(self.root, mode=DIR_MODE, exist_ok=True)
            self._settle(self.root, DIR_MODE)
            for name in DIRS:
                path = self.root / name
                os.makedirs(path, mode=DIR_MODE, exist_ok=True)
                group_writes = self.group is not None and name in WRITER_DIRS
                self._settle(path, GROUP_WRITER_DIR_MODE if group_writes else DIR_MODE)
            self._durable.directory(self.root)
        except OSError as exc:
            raise SpoolError(f"cannot create spool directories in {self.root}: {exc}") from exc

    def create_writer_dirs(self) -> None:
        """Make tmp/ and new/ if missing, for a writer (`mxsend enqueue`) that comes
        before the daemon; what exists is left as the daemon set it."""
        for name in WRITER_DIRS:
            path = self.root / name
            if not os.path.isdir(path):
                os.makedirs(path, mode=DIR_MODE, exist_ok=True)

    def _settle(self, path: Path, mode: int) -> None:
        """Give a folder `mode` (and spool.group, setgid) where it differs.

        A folder of another user is left as it is, unless spool.group is set and the
        folder is not in it: then the setting cannot hold and the start fails.
        """
        info = os.stat(path)
        if self.group is not None:
            mode |= stat.S_ISGID
            if info.st_gid != self.group:
                try:
                    os.chown(path, -1, self.group)
                except PermissionError:
                    raise SpoolError(f"spool.group: cannot give {path} to group {self.group}"
                                     " (mxsend's user must own it and be in that group)"
                                     ) from None
        if stat.S_IMODE(info.st_mode) != mode and info.st_uid == os.geteuid():
            os.chmod(path, mode)

    def heartbeat(self) -> None:
        """Refresh owners/<owner>; others treat our claims as live while it is fresh."""
        path = self.root / "owners" / self.owner
        try:
            try:
                os.utime(path)
            except FileNotFoundError:
                _write_atomic(path, process_identity().encode(), durable=self._durable)
        except OSError as exc:
            raise SpoolError(f"cannot write heartbeat {path}: {exc}") from exc
        self._registered = True

    def live_owners(self, max_age: float, now: float) -> list[str]:
        """Owners whose heartbeat was refreshed within `max_age` seconds of `now`."""
        try:
            with os.scandir(self.root / "owners") as it:
                return sorted(e.name for e in it if _mtime(e) >= now - max_age)
        except FileNotFoundError:
            return []

    def retire(self) -> None:
        """Remove our heartbeat on a clean exit: anything we still hold is recovered at once."""
        self._have_inbox = self._have_active = False
        for spare in self._spares:
            with contextlib.suppress(OSError):
                os.unlink(f"{self._active}/{spare}")
        self._spares.clear()
        for directory in (self._active_dir(), self._incoming_dir()):
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # only if empty: a leftover claim stays for recovery
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / "owners" / self.owner)
        self._registered = False

    def _register(self, directory: str | Path) -> None:
        # The heartbeat must exist before our first private directory does, or a
        # recoverer could see the directory without a live owner and take it.
        if not self._registered:
            self.heartbeat()
        os.makedirs(directory, mode=DIR_MODE, exist_ok=True)

    def _rename_into_own(self, source: str, directory: str, name: str, fresh: bool) -> bool:
        """rename(source, directory/name) into our incoming/ or active/ directory; False
        if `source` is not there (someone else took it).

        Unless `fresh` (just made by _register), the directory is only assumed to be
        there: if the rename finds it gone, it is made again and the rename retried.
        """
        try:
            os.rename(source, f"{directory}/{name}")
            return True
        except FileNotFoundError:
            if fresh:
                return False
        # The source or our directory is missing: which one, only a new try can tell.
        self._register(directory)
        try:
            os.rename(source, f"{directory}/{name}")
        except FileNotFoundError:
            return False
        return True

    # -- acceptance from new/

    def incoming(self) -> list[str]:
        """Names waiting in new/, oldest first; dot-files are the writers' business."""
        try:
            with os.scandir(self.root / "new") as it:
                found = [
                    (_mtime(e), e.name) for e in it if not e.name.startswith(".")
                ]
        except FileNotFoundError:
            return []
        return [name for _, name in sorted(found)]

    def accept(self, name: str, now: float) -> Accepted | Quarantined | None:
        """Take new/NAME: queue it (due now) or quarantine it; None if someone else took it."""
        return _drive(self.accept_steps(name, now), self._durable)

    def accept_steps(self, name: str, now: float) -> Steps[Accepted | Quarantined | None]:
        """accept() as steps, for run_rolling."""
        if "/" in name or name in ("", ".", "..") or name.startswith("."):
            return None
        inbox = self._inbox
        try:
            fresh = not self._have_inbox
            if fresh:
                self._register(inbox)
                self._have_inbox = True
            # The claim: exactly one process's rename succeeds (contract §1).
            if not self._rename_into_own(f"{self._new}/{name}", inbox, name, fresh):
                return None
            held = f"{inbox}/{name}"
            try:
                return (yield from self._accept_held(name, held, now))
            except OSError:
                # Hand it back rather than keep it in our incoming/ until we die.
                with contextlib.suppress(OSError):
                    _move_noreplace(held, self._new, _free_name(self._new, name))
                raise
        except OSError as exc:
            raise SpoolError(f"cannot accept {name}: {exc}") from exc

    def _accept_held(self, name: str, held: str, now: float
                     ) -> Steps[Accepted | Quarantined]:
        problem = id_problem(name)
        if problem:
            return (yield from self._quarantine(name, held, problem))
        info = os.lstat(held)
        if not stat.S_ISREG(info.st_mode):
            # A symlink could point anywhere (/etc/shadow); a spool file is a file.
            return (yield from self._quarantine(name, held, "not a regular file"))
        size = info.st_size
        if size > self.max_message_size:
            # Decided from the size alone: a huge file is never read into memory.
            return (yield from self._quarantine(
                name, held, f"file of {size} bytes exceeds spool.max_message_size"
            ))
        fd = os.open(held, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            raw = _read_fd(fd, self.max_message_size + 1, size)
        finally:
            os.close(fd)
        try:
            message = parse_bsmtp(raw)
        except EnvelopeError as exc:
            return (yield from self._quarantine(name, held, str(exc)))
        state = initial_state(name, message, now, _stamp(info))
        inbox = os.path.dirname(held)
        pending_state = f"{inbox}/.{name}.state"
        # 1. The state, private to us until published.
        yield from self._new_file_steps(pending_state, state_to_json(state), state.next_try)
        # 2. Reserve the id: link() fails if msg/NAME exists, atomically, so two
        #    processes accepting two files of one name cannot both win.
        try:
            os.link(held, f"{self._msg}/{name}", follow_symlinks=False)
        except FileExistsError:
            os.unlink(pending_state)
            return (yield from self._quarantine(name, held, "queue id in use"))
        yield _Sync(directory=self._msg)
        # 3. Publish: from this rename on the message is queued and claimable.
        os.rename(pending_state, f"{self._queue}/{name}")
        yield _Sync(directory=self._queue)
        # 4. Drop our second name of the file.
        os.unlink(held)
        yield _Sync(directory=inbox)
        return Accepted(id=name, state=state, message=message)

    def _quarantine(self, name: str, held: str, reason: str) -> Steps[Quarantined]:
        reason = " ".join(reason.split())  # one line, whatever the parser said
        bad = self._bad
        target = _free_name(bad, name, reasons=True)
        # The reason first: a crash before the file's move leaves the file in incoming/,
        # which recovery returns to new/ and this runs again, overwriting the reason.
        yield from _write_atomic_steps(f"{bad}/{target}.reason", (reason + "\n").encode())
        moved = _move_noreplace(held, bad, target)
        if moved != target:  # someone took the name meanwhile
            yield from _write_atomic_steps(f"{bad}/{moved}.reason", (reason + "\n").encode())
        yield _Sync(directory=bad)
        yield _Sync(directory=os.path.dirname(held))
        return Quarantined(id=name, reason=reason)

    # -- scheduling

    def due(self, now: float) -> list[str]:
        """Ids in queue/ whose next_try (the state file's mtime) has come, earliest first."""
        return [id for mtime, id in self._queued() if mtime <= now]

    def next_due(self) -> float | None:
        queued = self._queued()
        return min(mtime for mtime, _ in queued) if queued else None

    def queued(self) -> list[tuple[float, str]]:
        """(next_try, id) of every message in queue/, earliest first: one scandir."""
        return self._queued()

    def _queued(self) -> list[tuple[float, str]]:
        try:
            with os.scandir(self.root / "queue") as it:
                found = [(_mtime(e), e.name) for e in it if not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        return sorted(item for item in found if item[0] >= 0)

    # -- claims

    def claim(self, id: str) -> Claim | None:
        """Move queue/ID into active/<owner>/; None if it is not there (someone else has it)."""
        active = self._active
        try:
            fresh = not self._have_active
            if fresh:
                self._register(active)
                self._have_active = True
            if not self._rename_into_own(f"{self._queue}/{id}", active, _checked(id), fresh):
                return None
        except OSError as exc:
            raise SpoolError(f"cannot claim {id}: {exc}") from exc
        # No directory fsync: if a power loss undoes the claim, the message is simply
        # queued again, which is the state recovery would have restored anyway.
        return Claim(id=id, path=Path(f"{active}/{id}"), owner=self.owner)

    def read(self, claim: Claim) -> MessageState:
        try:
            return state_from_json(_read_file(os.fspath(claim.path)))
        except FileNotFoundError:
            raise SpoolError(f"{claim.id}: claim lost (presumed dead and recovered)") from None
        except OSError as exc:
            raise SpoolError(f"{claim.id}: cannot read state: {exc}") from exc

    def load_message(self, id: str) -> Message:
        """Parse msg/ID; SpoolError if it is gone, EnvelopeError if it no longer parses."""
        path = f"{self._msg}/{_checked(id)}"
        try:
            raw = _read_file(path, sized=True)
        except OSError as exc:
            raise SpoolError(f"{id}: cannot read message: {exc}") from exc
        return parse_bsmtp(raw)

    def update(self, claim: Claim, state: MessageState) -> None:
        """Make `state` durable; the message stays claimed."""
        _drive(self.update_steps(claim, state), self._durable)

    def update_steps(self, claim: Claim, state: MessageState) -> Steps[None]:
        """update() as steps, for run_rolling."""
        yield from self._write_claimed(claim, state)

    def release(self, claim: Claim, state: MessageState) -> None:
        """Make `state` durable and put the message back into queue/, due at next_try."""
        _drive(self.release_steps(claim, state), self._durable)

    def release_steps(self, claim: Claim, state: MessageState) -> Steps[None]:
        """release() as steps, for run_rolling."""
        yield from self._write_claimed(claim, state)
        path = os.fspath(claim.path)
        try:
            os.rename(path, f"{self._queue}/{claim.id}")
            yield _Sync(directory=self._queue)
            yield _Sync(directory=os.path.dirname(path))
        except FileNotFoundError:
            raise SpoolError(f"{claim.id}: claim lost (presumed dead and recovered)") from None
        except OSError as exc:
            raise SpoolError(f"{claim.id}: cannot release: {exc}") from exc

    def complete(self, claim: Claim, state: MessageState) -> None:
        """Every recipient is final: record that, then remove the message (or keep it in sent/)."""
        _drive(self.complete_steps(claim, state), self._durable)

    def complete_steps(self, claim: Claim, state: MessageState) -> Steps[None]:
        """complete() as steps, for run_rolling."""
        if not state.is_final():
            raise SpoolError(f"{claim.id}: complete() with recipients still pending")
        # No final state is written: the message file goes first, and a claimed state
        # without its message is what recovery reads as an interrupted removal and
        # drops (as for delete()). That saves a write and two barriers per message.
        path = os.fspath(claim.path)
        if not os.path.exists(path):
            # Presumed dead and recovered: the message is someone else's now.
            raise SpoolError(f"{claim.id}: claim lost (presumed dead and recovered)")
        try:
            yield from self._finish(claim.id, path)
        except OSError as exc:
            raise SpoolError(f"{claim.id}: cannot complete: {exc}") from exc

    def delete(self, claim: Claim) -> None:
        """Remove a claimed message without a bounce (queue delete)."""
        try:
            # Message first, then state: a state without its message is recognised by
            # recovery as an interrupted removal and dropped.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.message_path(claim.id))
            self._durable.directory(self.root / "msg")
            os.unlink(claim.path)
            self._durable.directory(claim.path.parent)
        except FileNotFoundError:
            raise SpoolError(f"{claim.id}: claim lost (presumed dead and recovered)") from None
        except OSError as exc:
            raise SpoolError(f"{claim.id}: cannot delete: {exc}") from exc

    def _finish(self, id: str, state_path: str | Path) -> Steps[None]:
        message = f"{self._msg}/{_checked(id)}"
        if self.keep_sent:
            moved = True
            try:
                _move_noreplace(message, self._sent, _free_name(self._sent, id))
            except FileNotFoundError:
                moved = False
            if moved:
                yield _Sync(directory=self._sent)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(message)
        yield _Sync(directory=self._msg)
        if not self._keep_as_spare(os.fspath(state_path)):
            os.unlink(state_path)
        yield _Sync(directory=os.path.dirname(state_path))

    def _write_claimed(self, claim: Claim, state: MessageState) -> Steps[None]:
        if state.id != claim.id:
            raise SpoolError(f"state of {state.id} written to the claim of {claim.id}")
        # A process presumed dead has had its directory taken away: refuse rather than
        # resurrect a claim someone else now holds (a new rename would recreate it).
        path = os.fspath(claim.path)
        if not os.path.exists(path):
            raise SpoolError(f"{claim.id}: claim lost (presumed dead and recovered)")
        try:
            yield from self._replace_steps(path, state_to_json(state), state.next_try)
        except FileNotFoundError:
            raise SpoolError(f"{claim.id}: claim lost (presumed dead and recovered)") from None
        except OSError as exc:
            raise SpoolError(f"{claim.id}: cannot write state: {exc}") from exc

    # -- reusing state files' inodes (see __init__)

    def _take_spare(self, path: str) -> bool:
        """Rename a spare to `path` (replacing a leftover there); False if none is left."""
        while self._spares:
            spare = self._spares.pop()
            try:
                os.rename(f"{self._active}/{spare}", path)
                return True
            except FileNotFoundError:
                # Our directory was taken (we were presumed dead): none is left.
                self._spares.clear()
        return False

    def _keep_as_spare(self, path: str) -> bool:
        """Move a state file we are done with, in our active/ directory, to the spares."""
        if len(self._spares) >= SPARE_MAX or os.path.dirname(path) != self._active:
            return False
        spare = f"{_SPARE}{next(self._spare_numbers)}"
        os.rename(path, f"{self._active}/{spare}")
        self._spares.append(spare)
        return True

    def _new_file_steps(self, path: str, data: bytes, mtime: float | None) -> Steps[None]:
        """Write a private file (a dot-name of ours) from a spare inode if there is one;
        durable before any rename publishes it, as _write_file_steps."""
        if self._take_spare(path):
            # The spare's old content is another message's: truncated before a byte is
            # written, and nothing reads this name until it is complete and synced.
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                         FILE_MODE)
        try:
            _write_fd(fd, data, mtime)
            yield _Sync(fd=fd)
        finally:
            os.close(fd)

    def _replace_steps(self, path: str, data: bytes, mtime: float | None) -> Steps[None]:
        """_write_atomic_steps for a state in our active/ directory, reusing inodes: the
        new state is written into a spare, and the old one becomes a spare."""
        directory, name = os.path.split(path)
        temp = f"{directory}/.{name}.{secrets.token_hex(4)}.tmp"
        try:
            yield from self._new_file_steps(temp, data, mtime)
            # A second name for the old state before the rename replaces it. A crash in
            # between leaves a dot-file that recovery deletes (only that name).
            kept: str | None = None
            if len(self._spares) < SPARE_MAX and directory == self._active:
                kept = f"{_SPARE}{next(self._spare_numbers)}"
                try:
                    os.link(path, f"{directory}/{kept}", follow_symlinks=False)
                except OSError:
                    kept = None
            try:
                os.rename(temp, path)
            except BaseException:
                if kept is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(f"{directory}/{kept}")
                raise
            if kept is not None:
                self._spares.append(kept)  # its only name now
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        yield _Sync(directory=directory)

    # -- recovery

    def recover(self, stale_after: float, now: float) -> list[str]:
        """Take back what dead owners held; return the ids of the messages put right.

        An owner is dead when owners/<owner> is missing or older than `stale_after`.
        Each dead owner's directory is first renamed to active/<me>~<token> (or
        incoming/...): exactly one recoverer wins it, and a presumed-dead process that
        is in fact alive finds its directory gone instead of writing over a new claim.
        """
        recovered: list[str] = []
        try:
            for kind in ("incoming", "active"):
                parent = self.root / kind
                try:
                    names = sorted(os.listdir(parent))
                except FileNotFoundError:
                    continue
                for name in names:
                    if name == self.owner:
                        continue
                    if owner_of(name) == self.owner:
                        taken: Path | None = parent / name  # our own unfinished recovery
                    elif self._is_dead(owner_of(name), stale_after, now):
                        taken = self._take(parent, name)
                    else:
                        continue
                    if taken is None:
                        continue
                    if kind == "incoming":
                        recovered += self._recover_incoming(taken)
                    else:
                        recovered += self._recover_active(taken)
            self._forget_dead_owners(stale_after, now)
            self._clean_tmp(now)
        except OSError as exc:
            raise SpoolError(f"recovery failed: {exc}") from exc
        return recovered

    def _is_dead(self, owner: str, stale_after: float, now: float) -> bool:
        if owner == self.owner:
            return False
        heartbeat = self.root / "owners" / owner
        try:
            beat = os.stat(heartbeat).st_mtime
        except FileNotFoundError:
            return True
        if beat < now - stale_after:
            return True
        # A restarted daemon should not wait out stale_after for its predecessor's
        # claims: when the owner ran under this very kernel and PID namespace, a PID
        # that no longer exists is proof enough. Any doubt falls back to the heartbeat.
        try:
            identity = heartbeat.read_text()
        except OSError:
            return False
        return _dead_here(identity)

    def _take(self, parent: Path, name: str) -> Path | None:
        self._register(parent / self.owner)
        taken = parent / f"{self.owner}{_TAKEN}{secrets.token_hex(4)}"
        try:
            os.rename(parent / name, taken)
        except FileNotFoundError:
            return None  # another recoverer won it
        self._durable.directory(parent)
        return taken

    def _recover_incoming(self, taken: Path) -> list[str]:
        """Finish or undo each acceptance that was in progress (see docs/spool.md)."""
        ids: list[str] = []
        for name in sorted(os.listdir(taken)):
            if name.startswith("."):
                continue
            held = taken / name
            pending_state = taken / f".{name}.state"
            ids.append(name)
            msg = self.root / "msg" / name
            if _same_file(held, msg):
                # The id was reserved by our link: the acceptance gets finished.
                if os.path.exists(pending_state):
                    os.rename(pending_state, self.root / "queue" / name)
                    self._durable.directory(self.root / "queue")
                os.unlink(held)
            else:
                # Not reserved: hand the file back to new/ to be accepted again.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(pending_state)
                _move_noreplace(held, self.root / "new", _free_name(self.root / "new", name))
                self._durable.directory(self.root / "new")
        self._remove_dir(taken)
        return ids

    def _recover_active(self, taken: Path) -> list[str]:
        """Queue each claimed message again; finish removals that were interrupted."""
        ids: list[str] = []
        for name in sorted(os.listdir(taken)):
            if name.startswith("."):
                continue
            path = taken / name
            ids.append(name)
            with open(path, "rb") as handle:
                state = state_from_json(handle.read())
            if not self._owns_file(state):
                # complete()/delete() remove the message before the state: this one
                # was being removed. (A file of the same name accepted since is not
                # ours, which the stamp tells.)
                os.unlink(path)
                self._durable.directory(taken)
            elif state.is_final():
                _drive(self._finish(name, path), self._durable)
            else:
                # rename keeps the mtime, which is next_try: due as planned.
                os.rename(path, self.root / "queue" / name)
                self._durable.directory(self.root / "queue")
        self._remove_dir(taken)
        return ids

    def _owns_file(self, state: MessageState) -> bool:
        try:
            info = os.lstat(self.message_path(state.id))
        except FileNotFoundError:
            return False
        return not state.file_stamp or state.file_stamp == _stamp(info)

    def _remove_dir(self, directory: Path) -> None:
        for name in os.listdir(directory):
            # Only temp files remain (a write that died before its rename).
            os.unlink(directory / name)
        os.rmdir(directory)
        self._durable.directory(directory.parent)

    def _forget_dead_owners(self, stale_after: float, now: float) -> None:
        owners = self.root / "owners"
        try:
            names = os.listdir(owners)
        except FileNotFoundError:
            return
        for name in names:
            if name != self.owner and self._is_dead(name, stale_after, now):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(owners / name)

    def _clean_tmp(self, now: float) -> None:
        tmp = self.root / "tmp"
        try:
            with os.scandir(tmp) as it:
                old = [e.name for e in it if e.is_file() and _mtime(e) < now - TMP_MAX_AGE]
        except FileNotFoundError:
            return
        for name in old:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp / name)

    # -- writers

    def enqueue(self, message: Message, *, name: str | None = None) -> str:
        """Hand a message to the spool by the writers' protocol; return its queue id."""
        return self.enqueue_bytes(serialise_bsmtp(message), name=name)

    def enqueue_bytes(self, raw: bytes, *, name: str | None = None) -> str:
        """tmp/ -> write, fsync -> link into new/ -> fsync new/ (contract §1)."""
        return _drive(self.enqueue_steps(raw, name=name), self._durable)

    def enqueue_steps(self, raw: bytes, *, name: str | None = None) -> Steps[str]:
        """enqueue_bytes() as steps, for run_rolling."""
        if name is not None and id_problem(name):
            raise SpoolError(f"bad queue id {name!r}: {id_problem(name)}")
        tmp = self.root / "tmp"
        new = self.root / "new"
        for _ in range(8):
            id = name or new_queue_id()
            temp = tmp / f"{id}.{self.owner}"
            try:
                yield from _write_file_steps(temp, raw, mode=self._writer_file_mode())
                try:
                    # link, not rename: never replace a file another writer handed over.
                    os.link(temp, new / id, follow_symlinks=False)
                except FileExistsError:
                    if name is not None:
                        raise SpoolError(f"queue id {id} is already in new/") from None
                    continue
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temp)
                yield _Sync(directory=new)
                return id
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise SpoolError(f"cannot write to {self.root}: {exc}") from exc
        raise SpoolError("could not find a free queue id")

    def _writer_file_mode(self) -> int:
        """0640 when we are the user who owns new/ (the daemon's), else 0660."""
        try:
            owner = os.stat(self._new).st_uid
        except OSError:
            return FILE_MODE  # the link into new/ will say what is wrong
        return FILE_MODE if owner == os.geteuid() else OTHER_WRITER_FILE_MODE

    # -- batches (the daemon)

    def run_rolling(
        self,
        take: Callable[[bool], list[tuple[Steps[Any], T]]],
        done: Callable[[list[tuple[T, object]]], None],
    ) -> None:
        """Run operations side by side, each stopped at its barriers, as they come.

        `take(idle)` hands over the operations that arrived (each with a token); `idle`
        says nothing waits at a barrier, and if it then has nothing to give it must
        note (under its own lock) that this runner is stopping, as it returns at once.
        `done()` receives (token, result or exception) for those that finished. Each
        operation still makes each step durable before its next, and under GroupCommit
        one syncfs serves every operation standing at a barrier; an operation that
        arrives while others are half-way only waits for the next barrier, not for the
        rest of their steps (which a batch of acceptances, four barriers each, made it
        do, so that the daemon accepted and delivered by turns instead of together).
        """
        waiting: dict[int, tuple[Steps[Any], _Sync, T]] = {}
        numbers = itertools.count()

        def advance(steps: Steps[Any], token: T, error: BaseException | None, first: bool,
                    finished: list[tuple[T, object]]) -> None:
            try:
                if error is not None:
                    sync = steps.throw(error)
                else:
                    sync = next(steps) if first else steps.send(None)
            except StopIteration as stop:
                finished.append((token, stop.value))
            except Exception as exc:  # one operation's failure is its own result
                finished.append((token, exc))
            else:
                waiting[next(numbers)] = (steps, sync, token)

        try:
            while True:
                arrived = take(not waiting)
                if not arrived and not waiting:
                    return
                finished: list[tuple[T, object]] = []
                for steps, token in arrived:
                    advance(steps, token, None, True, finished)
                if finished:
                    done(finished)
                    finished = []
                if not waiting:
                    continue
                errors: dict[int, OSError] = {}
                if isinstance(self._durable, GroupCommit):
                    try:
                        self._durable.barrier()
                    except OSError as exc:
                        errors = dict.fromkeys(waiting, exc)
                else:
                    for key, (_, sync, _) in waiting.items():
                        try:
                            sync.apply(self._durable)
                        except OSError as exc:
                            errors[key] = exc
                current = dict(waiting)
                waiting.clear()
                for key, (steps, _, token) in current.items():
                    advance(steps, token, errors.get(key), False, finished)
                if finished:
                    done(finished)
        except BaseException as exc:
            # A bug, not a disk error (those are each operation's own result): no
            # operation may wait forever for a runner that is gone.
            error = SpoolError(f"spool I/O failed: {exc!r}")
            done([(token, error) for _, _, token in waiting.values()])
            raise

    @property
    def group_commit(self) -> GroupCommit | None:
        """The group commit this spool's barriers go through, if any."""
        return self._durable if isinstance(self._durable, GroupCommit) else None

    # -- inspection (the queue CLI)

    def entries(self) -> Iterator[tuple[MessageState, str]]:
        """Every queued message with "queue" or "active"; files vanishing meanwhile are skipped."""
        for path, where in self._state_files():
            state = _read_state(path)
            if state is not None:
                yield state, where

    def find(self, id: str) -> tuple[MessageState, str] | None:
        if id_problem(id):
            return None
        candidates = [(self.root / "queue" / id, "queue")]
        with contextlib.suppress(FileNotFoundError):
            candidates += [
                (self.root / "active" / d / id, "active")
                for d in sorted(os.listdir(self.root / "active"))
            ]
        # Queue again last: a state moving between queue/ and active/ while we look is
        # still found on one side or the other.
        candidates.append((self.root / "queue" / id, "queue"))
        for path, where in candidates:
            state = _read_state(path)
            if state is not None:
                return state, where
        return None

    def _state_files(self) -> Iterator[tuple[Path, str]]:
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.root / "queue")):
                if not name.startswith("."):
                    yield self.root / "queue" / name, "queue"
        with contextlib.suppress(FileNotFoundError):
            for directory in sorted(os.listdir(self.root / "active")):
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    for name in sorted(os.listdir(self.root / "active" / directory)):
                        if not name.startswith("."):
                            yield self.root / "active" / directory / name, "active"

    def request_rescan(self) -> None:
        """Touch control/rescan: the daemon watches it and rescans the queue at once."""
        path = self.root / "control" / "rescan"
        try:
            os.makedirs(path.parent, mode=DIR_MODE, exist_ok=True)
            try:
                os.utime(path)
            except FileNotFoundError:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
        except OSError as exc:
            raise SpoolError(f"cannot write {path}: {exc}") from exc


# --- file primitives --------------------------------------------------------------------


def process_identity(pid: int | None = None) -> str:
    """`boot_id pidns pid`: enough to tell whether a PID names a process we can see."""
    return f"{_boot_id()} {_pid_namespace()} {os.getpid() if pid is None else pid}\n"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return "unknown"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "unknown"


def _dead_here(identity: str) -> bool:
    """True only if `identity` is a process of this kernel and PID namespace that is gone."""
    parts = identity.split()
    if len(parts) != 3 or "unknown" in parts or not parts[2].isdigit():
        return False
    boot_id, pidns, pid = parts
    if boot_id != _boot_id() or pidns != _pid_namespace():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists (EPERM) or we cannot tell
    return False


def _checked(id: str) -> str:
    if "/" in id or "\0" in id or id in ("", ".", ".."):
        raise SpoolError(f"bad queue id {id!r}")
    return id


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return -1.0  # vanished while we looked


def _read_fd(fd: int, limit: int, expected: int) -> bytes:
    """Up to `limit` bytes from `fd`, to its end; `expected` is the size it probably has.

    os.read directly: a file object would cost an fstat, an ioctl and an lseek per
    file, and read(limit) would allocate the whole limit (50 MiB) for every message.
    Reads go on until one returns nothing, as a file object's would: a short read alone
    does not prove the end.
    """
    chunks: list[bytes] = []
    total = 0
    ask = min(limit, expected + 1)
    while total < limit:
        chunk = os.read(fd, ask)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        ask = min(limit - total, max(total, 65536))
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _read_file(path: str, *, sized: bool = False) -> bytes:
    """The whole file; `sized`: ask fstat first (a file that may be large)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        expected = os.fstat(fd).st_size if sized else 16384
        return _read_fd(fd, sys.maxsize, expected)
    finally:
        os.close(fd)


def _read_state(path: Path) -> MessageState | None:
    try:
        with open(path, "rb") as handle:
            return state_from_json(handle.read())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise SpoolError(f"cannot read {path}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _Sync:
    """A barrier: what an operation did before it must be durable before it goes on."""

    fd: int | None = None  # a file's data (fsync of the file)
    directory: str | Path | None = None  # a directory's entries (fsync of the directory)

    def apply(self, durable: Durability) -> None:
        if self.fd is not None:
            durable.file(self.fd)
        elif self.directory is not None:
            durable.directory(self.directory)


# An operation as steps: it yields at each barrier and returns its result. Writing the
# operations this way lets one implementation run alone (_drive: each barrier is its
# own fsync) or many in lockstep (Spool.run_rolling: one group commit per round).
Steps: TypeAlias = Generator[_Sync, None, T]


def _drive(steps: Steps[T], durable: Durability) -> T:
    """Run one operation, applying each barrier as it comes."""
    try:
        sync = next(steps)
        while True:
            try:
                sync.apply(durable)
            except OSError as exc:
                sync = steps.throw(exc)
            else:
                sync = steps.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result


def _write_file_steps(path: str | Path, data: bytes, mtime: float | None = None,
                      mode: int = FILE_MODE) -> Steps[None]:
    """Create `path` exclusively, write, set mtime, make it durable (before any rename)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        _write_fd(fd, data, mtime)
        yield _Sync(fd=fd)
    finally:
        os.close(fd)


def _write_fd(fd: int, data: bytes, mtime: float | None) -> None:
    """All of `data` (os.write may write less than asked), then the mtime if given."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    if mtime is not None:
        os.utime(fd, (mtime, mtime))


def _write_atomic_steps(path: str | Path, data: bytes, mtime: float | None = None
                        ) -> Steps[None]:
    """Replace `path` with `data` so a reader sees the old or the new file, never a mix."""
    directory, name = os.path.split(path)
    directory = directory or os.curdir
    temp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        yield from _write_file_steps(temp, data, mtime)
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    yield _Sync(directory=directory)


def _write_file(path: Path, data: bytes, mtime: float | None = None,
                durable: Durability | None = None) -> None:
    _drive(_write_file_steps(path, data, mtime), durable or FSYNC)


def _write_atomic(path: Path, data: bytes, mtime: float | None = None,
                  durable: Durability | None = None) -> None:
    _drive(_write_atomic_steps(path, data, mtime), durable or FSYNC)


def _fsync_dir(directory: str | Path) -> None:
    """A rename is durable only once its directory is (POSIX leaves it to fsync)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Durability:
    """How the spool makes a write durable before it goes on: one fsync per file and
    per directory. Every step of every operation waits for this at the points where
    POSIX needs it; a subclass may only change how, never when."""

    def file(self, fd: int) -> None:
        os.fsync(fd)

    def directory(self, directory: str | Path) -> None:
        _fsync_dir(directory)


FSYNC = Durability()


class GroupCommit(Durability):
    """Group commit: one syncfs(2) makes every waiting thread's writes durable at once.

    syncfs flushes all dirty data and metadata of the spool's file system, so it is at
    least as strong as the fsync of any one file or directory on it. A thread that
    needs a barrier waits for a syncfs that *started* after it asked: writes made
    before asking are then on disk. Threads arriving while one runs share the next,
    so with many operations in flight (the daemon runs spool I/O on a thread pool) a
    few syncfs calls serve them all, where one fsync each would serialise them. The
    order of the steps of each operation, and so every crash guarantee of
    docs/spool.md, is unchanged.
    """

    def __init__(self, root: Path) -> None:
        self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self._cond = threading.Condition()
        self._started = 0
        self._completed = 0
        self._failed: dict[int, OSError] = {}
        self._running = False

    @staticmethod
    def available() -> bool:
        return _SYNCFS is not None

    def file(self, fd: int) -> None:
        self.barrier()

    def directory(self, directory: str | Path) -> None:
        self.barrier()

    def barrier(self) -> None:
        with self._cond:
            target = self._started + 1
            while self._completed < target:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                generation = self._started
                error: OSError | None = None
                self._cond.release()
                try:
                    _syncfs(self._fd)
                except OSError as exc:
                    error = exc
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._completed = generation
                    if error is not None:
                        self._failed[generation] = error
                    self._cond.notify_all()
            failure = self._failed.get(target)
            if failure is not None:
                raise OSError(failure.errno, f"syncfs failed: {failure.strerror}")

    def close(self) -> None:
        os.close(self._fd)


def _load_syncfs() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_SYNCFS = _load_syncfs()


def _syncfs(fd: int) -> None:
    if _SYNCFS(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _stamp(info: os.stat_result) -> str:
    return f"{info.st_dev}:{info.st_ino}:{info.st_mtime_ns}"


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(sa.st_mode) and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _free_name(directory: str | Path, name: str, *, reasons: bool = False) -> str:
    """`name`, or `name-<token>` if a file of that name is in `directory`.

    In bad/ (`reasons`), a data file's name never ends in ".reason", so every such file
    there is a reason; one without its data file is a leftover of a quarantine that
    died half-way, and is overwritten when the file comes back.
    """
    candidate = name
    while (reasons and candidate.endswith(".reason")) or os.path.lexists(
            os.path.join(directory, candidate)):
        candidate = f"{name}-{secrets.token_hex(3)}"
    return candidate


def _move_noreplace(source: str | Path, directory: str | Path, name: str) -> str:
    """Move `source` to directory/name, or a free variant of it; return the name used.

    rename() would silently replace a file that is there; link() fails instead, so a
    name taken meanwhile costs a retry, never a file. Directories cannot be linked:
    they (only ever quarantined, never queued) are renamed after a check.
    """
    if stat.S_ISDIR(os.lstat(source).st_mode):
        name = _free_name(directory, name)
        os.rename(source, os.path.join(directory, name))
        return name
    while True:
        try:
            os.link(source, os.path.join(directory, name), follow_symlinks=False)
            break
        except FileExistsError:
            name = _free_name(directory, f"{name}-{secrets.token_hex(3)}", reasons=True)
    os.unlink(source)
    return name


__all__ = [
    "Accepted",
    "Claim",
    "MessageState",
    "Quarantined",
    "RecipientState",
    "RecipientStatus",
    "Spool",
]
