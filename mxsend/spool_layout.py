"""The spool's folders and modes, queue ids, and the writers' protocol (contract §1, §10).

What a writer needs and nothing more, so that `mxsend enqueue` can hand mail over
without loading the daemon's side of the spool: the folders and who may write in
them, the queue id rules, and tmp/ -> new/ as durable steps.

Every OS call goes through the `os` module attribute, for the crash test.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import time
from pathlib import Path

from mxsend.durable import FILE_MODE, Steps, Sync, write_file_steps
from mxsend.errors import SpoolError

DIRS = ("tmp", "new", "incoming", "bad", "msg", "queue", "hold", "active", "owners", "sent",
        "control")
# Contract §10: folders 0750 and files 0640, readable by the spool's group, by no one
# else. With spool.group the folders are also setgid, so that what anyone creates in
# them belongs to that group, and the writers' folders are group-writable: a writer of
# another user hands mail over by creating it in tmp/ and renaming it into new/.
DIR_MODE = 0o750
WRITER_DIRS = ("tmp", "new")
GROUP_WRITER_DIR_MODE = 0o770
# A writer of another user than the daemon's: Linux's fs.protected_hardlinks lets the
# daemon link a file into msg/ only if it may read and write it.
OTHER_WRITER_FILE_MODE = 0o660

# A queue id is also a file name and appears in logs and in Lua: keep it short and
# printable. 128 leaves room for maildir-style names ("1700000000.M1P2.host,S=42").
MAX_ID_LENGTH = 128
# Sortable alphabet (ASCII order) without I, L, O, U (Crockford's base32).
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PRINTABLE_NO_SPACE = re.compile(r"[!-~]*")  # code points 33 to 126


def new_queue_id(now: float | None = None, token: bytes | None = None) -> str:
    """11 characters of microseconds since the epoch, then 10 random ones; sorts by time.

    Like Postfix's long queue ids: unique without coordination, safe as a file name.
    """
    micros = int((time.time() if now is None else now) * 1_000_000)
    head = "".join(_ALPHABET[(micros >> (5 * i)) & 31] for i in range(10, -1, -1))
    rand = int.from_bytes(token if token is not None else secrets.token_bytes(7), "big")
    tail = "".join(_ALPHABET[(rand >> (5 * i)) & 31] for i in range(9, -1, -1))
    return head + tail


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


# --- folders ----------------------------------------------------------------------------


def create_dirs(root: Path, group: int | None) -> None:
    """Make the spool's folders, or put right the modes and group of ours that exist."""
    os.makedirs(root, mode=DIR_MODE, exist_ok=True)
    settle(root, DIR_MODE, group)
    for name in DIRS:
        path = root / name
        os.makedirs(path, mode=DIR_MODE, exist_ok=True)
        group_writes = group is not None and name in WRITER_DIRS
        settle(path, GROUP_WRITER_DIR_MODE if group_writes else DIR_MODE, group)


def create_writer_dirs(root: Path) -> None:
    """Make tmp/ and new/ if missing, for a writer that comes before the daemon; what
    exists is left as the daemon set it."""
    for name in WRITER_DIRS:
        path = root / name
        if not os.path.isdir(path):
            os.makedirs(path, mode=DIR_MODE, exist_ok=True)


def settle(path: Path, mode: int, group: int | None) -> None:
    """Give a folder `mode` (and `group`, setgid) where it differs.

    A folder of another user is left as it is, unless a group is set and the folder is
    not in it: then the setting cannot hold and the start fails.
    """
    info = os.stat(path)
    if group is not None:
        mode |= stat.S_ISGID
        if info.st_gid != group:
            try:
                os.chown(path, -1, group)
            except PermissionError:
                raise SpoolError(f"spool.group: cannot give {path} to group {group}"
                                 " (mxsend's user must own it and be in that group)") from None
    if stat.S_IMODE(info.st_mode) != mode and info.st_uid == os.geteuid():
        os.chmod(path, mode)


def writer_file_mode(new: str | Path) -> int:
    """0640 when we are the user who owns new/ (the daemon's), else 0660."""
    try:
        owner = os.stat(new).st_uid
    except OSError:
        return FILE_MODE  # the link into new/ will say what is wrong
    return FILE_MODE if owner == os.geteuid() else OTHER_WRITER_FILE_MODE


def request_rescan(root: Path) -> None:
    """Touch control/rescan: the daemon watches it and rescans the queue at once."""
    path = root / "control" / "rescan"
    try:
        os.makedirs(path.parent, mode=DIR_MODE, exist_ok=True)
        try:
            os.utime(path)
        except FileNotFoundError:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    except OSError as exc:
        raise SpoolError(f"cannot write {path}: {exc}") from exc


# --- the writers' protocol ----------------------------------------------------------------


def enqueue_steps(root: Path, raw: bytes, writer: str, name: str | None = None) -> Steps[str]:
    """tmp/<id>.<writer> -> write, fsync -> link into new/<id> -> fsync new/; the id.

    link, not rename: a file another writer handed over under that name is never
    replaced. Without `name`, a fresh id is drawn until one is free.
    """
    if name is not None and id_problem(name):
        raise SpoolError(f"bad queue id {name!r}: {id_problem(name)}")
    tmp = root / "tmp"
    new = root / "new"
    for _ in range(8):
        id = name or new_queue_id()
        temp = tmp / f"{id}.{writer}"
        try:
            yield from write_file_steps(temp, raw, mode=writer_file_mode(new))
            try:
                os.link(temp, new / id, follow_symlinks=False)
            except FileExistsError:
                if name is not None:
                    raise SpoolError(f"queue id {id} is already in new/") from None
                continue
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
            yield Sync(directory=new)
            return id
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise SpoolError(f"cannot write to {root}: {exc}") from exc
    raise SpoolError("could not find a free queue id")
