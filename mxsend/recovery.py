"""Owners, liveness, and taking back what a dead process held (docs/spool.md, "Recovery").

Rules of this file:

- A live process refreshes the mtime of owners/<owner>; nobody holds a lock a dead
  process could keep.
- An owner is dead when its heartbeat is missing or stale, or when it ran under this
  kernel and PID namespace and its PID is gone. Any doubt counts as alive.
- A dead owner's incoming/ or active/ directory is first renamed to <me>~<token>:
  exactly one recoverer wins it, and a presumed-dead process that is in fact alive
  finds its directory gone instead of writing over a new claim.
- Every OS call goes through the `os` module attribute, for the crash test.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

from mxsend.durable import (
    Durability,
    Steps,
    drive,
    free_name,
    move_noreplace,
    mtime,
    same_file,
    stamp,
    write_atomic,
)
from mxsend.errors import SpoolError
from mxsend.queue_state import MessageState, state_from_json
from mxsend.spool_layout import DIR_MODE

# Maildir's rule for abandoned writer files: untouched for 36 hours means dead.
TMP_MAX_AGE = 36 * 3600.0
OWNER_UNSAFE = re.compile(r"[^A-Za-z0-9.\-]")
TAKEN = "~"  # active/<owner>~<token>: a directory taken over from a dead owner


def default_owner() -> str:
    host = OWNER_UNSAFE.sub("_", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _state_owner(file_name: str) -> str | None:
    """NAME of an acceptance's private state `.NAME.state`, or None."""
    if file_name.startswith(".") and file_name.endswith(".state") and len(file_name) > 7:
        return file_name[1:-6]
    return None


def owner_of(directory_name: str) -> str:
    """The owner of active/<name> or incoming/<name>: the part before any '~'."""
    return directory_name.partition(TAKEN)[0]


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


def dead_here(identity: str) -> bool:
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


def live_owners(root: Path, max_age: float, now: float) -> list[str]:
    """Owners whose heartbeat was refreshed within `max_age` seconds of `now`."""
    try:
        with os.scandir(root / "owners") as it:
            return sorted(e.name for e in it if mtime(e) >= now - max_age)
    except FileNotFoundError:
        return []


class Presence:
    """This process's place in the spool: its heartbeat and its own directories."""

    def __init__(self, root: Path, owner: str, durable: Durability) -> None:
        self.root = root
        self.owner = owner
        self._durable = durable
        self._registered = False
        # Own directories made (or found) since the last retire(): a move into one
        # does not mkdir it again, but makes it anew if the move finds it gone (a
        # recoverer took it, or retire() removed it).
        self._made: set[str] = set()

    def heartbeat(self) -> None:
        """Refresh owners/<owner>; others treat our claims as live while it is fresh."""
        path = self.root / "owners" / self.owner
        try:
            try:
                os.utime(path)
            except FileNotFoundError:
                write_atomic(path, process_identity().encode(), durable=self._durable)
        except OSError as exc:
            raise SpoolError(f"cannot write heartbeat {path}: {exc}") from exc
        self._registered = True

    def register(self, directory: str | Path) -> None:
        """Make one of our own directories, after the heartbeat: without it a
        recoverer could see the directory without a live owner and take it."""
        if not self._registered:
            self.heartbeat()
        os.makedirs(directory, mode=DIR_MODE, exist_ok=True)

    def move_in(self, source: str, directory: str, name: str) -> bool:
        """rename(source, directory/name) into our incoming/ or active/ directory; False
        if `source` is not there (someone else took it)."""
        fresh = directory not in self._made
        if fresh:
            self.register(directory)
            self._made.add(directory)
        try:
            os.rename(source, f"{directory}/{name}")
            return True
        except FileNotFoundError:
            # The source or our directory is missing. Our directory is there unless a
            # recoverer took it: then the source was gone, which is the common case (the
            # other daemon claimed the message first) and costs one stat, not a mkdir and
            # a second rename.
            if fresh or os.path.isdir(directory):
                return False
        self.register(directory)
        try:
            os.rename(source, f"{directory}/{name}")
        except FileNotFoundError:
            return False
        return True

    def retire(self, directories: tuple[str, ...]) -> None:
        """Remove our heartbeat and our (empty) directories on a clean exit."""
        self._made.clear()
        for directory in directories:
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # only if empty: a leftover claim stays for recovery
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / "owners" / self.owner)
        self._registered = False


class Recovery:
    """One recovery pass of the process `owner` over the spool at `root`.

    `register(directory)` makes one of our own directories (heartbeat first);
    `finish(id, state_path)` removes a message whose recipients are all final.
    """

    def __init__(self, root: Path, owner: str, durable: Durability,
                 register: Callable[[Path], None],
                 finish: Callable[[str, Path], Steps[None]]) -> None:
        self.root = root
        self.owner = owner
        self._durable = durable
        self._register = register
        self._finish = finish

    def recover(self, stale_after: float, now: float) -> list[str]:
        """Take back what dead owners held; return the ids of the messages put right."""
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
                    elif self.is_dead(owner_of(name), stale_after, now):
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

    def is_dead(self, owner: str, stale_after: float, now: float) -> bool:
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
        return dead_here(identity)

    def _take(self, parent: Path, name: str) -> Path | None:
        self._register(parent / self.owner)
        taken = parent / f"{self.owner}{TAKEN}{secrets.token_hex(4)}"
        try:
            os.rename(parent / name, taken)
        except FileNotFoundError:
            return None  # another recoverer won it
        self._durable.directory(parent)
        return taken

    def _recover_incoming(self, taken: Path) -> list[str]:
        """Finish or undo each acceptance that was in progress (see docs/spool.md)."""
        ids: list[str] = []
        listed = sorted(os.listdir(taken))
        for name in listed:
            if not name.startswith("."):
                ids.append(name)
                self._finish_acceptance(taken, name)
        for private in listed:
            # A private state whose file's name is gone: the id was reserved and the
            # name dropped (step 5), and the publish (step 6) did not happen.
            reserved = _state_owner(private)
            if reserved is not None and reserved not in listed and (taken / private).exists():
                ids.append(reserved)
                self._publish_reserved(taken, reserved)
        self._remove_dir(taken)
        return ids

    def _finish_acceptance(self, taken: Path, name: str) -> None:
        """NAME still in incoming/ (steps 1 to 4): finished if its id was reserved and
        its state kept whole, else undone and handed back to new/."""
        held, pending_state = taken / name, taken / f".{name}.state"
        message = self.root / "msg" / name
        reserved = same_file(held, message)
        if reserved and self._whole_state(name, pending_state):
            # Our second name first, as the acceptance does (step 5).
            os.unlink(held)
            self._durable.directory(taken)
            self._publish(name, pending_state)
            return
        if reserved:
            # Reserved, but a crash before the barrier of step 4 did not keep the state
            # whole: the reservation goes (NAME keeps the file), as if never made.
            os.unlink(message)
            self._durable.directory(message.parent)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pending_state)
        new = self.root / "new"
        move_noreplace(held, new, free_name(new, name))
        self._durable.directory(new)

    def _publish_reserved(self, taken: Path, name: str) -> None:
        """NAME dropped, its private state left (step 5 done, not step 6): publish it."""
        pending_state = taken / f".{name}.state"
        if self._whole_state(name, pending_state):
            self._publish(name, pending_state)
            return
        message = self.root / "msg" / name
        if not os.path.lexists(message):
            os.unlink(pending_state)  # nothing of the message left to queue
            return
        # Only a disk that lost writes it had confirmed leaves a reserved message with a
        # state not its own: the file becomes NAME again, and the acceptance is undone.
        os.rename(message, taken / name)
        self._durable.directory(taken)
        self._durable.directory(message.parent)
        self._finish_acceptance(taken, name)

    def _whole_state(self, name: str, pending_state: Path) -> bool:
        """The private state is there and is this message's (its id, and the stamp of
        msg/NAME): written whole, not a reused spare's old content or part of it."""
        try:
            with open(pending_state, "rb") as handle:
                state = state_from_json(handle.read())
        except (FileNotFoundError, SpoolError):
            return False
        return state.id == name and self._owns_file(name, state)

    def _publish(self, name: str, pending_state: Path) -> None:
        os.rename(pending_state, self.root / "queue" / name)
        self._durable.directory(self.root / "queue")

    def _recover_active(self, taken: Path) -> list[str]:
        """Queue (or hold) each claimed message again; finish interrupted removals."""
        ids: list[str] = []
        for name in sorted(os.listdir(taken)):
            if name.startswith("."):
                continue
            path = taken / name
            ids.append(name)
            with open(path, "rb") as handle:
                state = state_from_json(handle.read())
            if not self._owns_file(name, state):
                # complete()/delete() remove the message before the state: this one
                # was being removed. (A file of the same name accepted since is not
                # ours, which the stamp tells.)
                os.unlink(path)
                self._durable.directory(taken)
            elif state.is_final():
                drive(self._finish(name, path), self._durable)
            else:
                # rename keeps the mtime, which is next_try: due as planned. A held
                # message goes back on hold: it is never attempted until released.
                folder = self.root / ("hold" if state.held else "queue")
                os.rename(path, folder / name)
                self._durable.directory(folder)
        self._remove_dir(taken)
        return ids

    def _owns_file(self, name: str, state: MessageState) -> bool:
        try:
            info = os.lstat(self.root / "msg" / name)
        except FileNotFoundError:
            return False
        return not state.file_stamp or state.file_stamp == stamp(info)

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
            if name != self.owner and self.is_dead(name, stale_after, now):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(owners / name)

    def _clean_tmp(self, now: float) -> None:
        tmp = self.root / "tmp"
        try:
            with os.scandir(tmp) as it:
                old = [e.name for e in it if e.is_file() and mtime(e) < now - TMP_MAX_AGE]
        except FileNotFoundError:
            return
        for name in old:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp / name)
