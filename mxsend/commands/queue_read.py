"""Reading every state of a big queue quickly, for `queue list` and `queue stats`.

A million queued messages are a million state files, and reading them is the whole cost
of these commands (about 20 µs of system time and 30 µs of decoding each, on the 2-core
test machine). Two things make it cheaper, without changing what is read:

- the files are read in inode order (a scandir gives each name's inode for free): on a
  cold cache ext4's inode table and the files' blocks are then read mostly in order
  instead of at random;
- the work is split over up to MAX_WORKERS forked processes, each reading and folding
  its share (a qshape count, or list rows) and sending back only the result.

What a file says is exactly what `Spool.entries()` says (the same codec, the same
"vanished meanwhile: skipped", the same "unreadable: skipped and named"); the spool is
only read.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

from mxsend.commands.queue_format import StateView, shape_count_summaries
from mxsend.errors import SpoolError
from mxsend.queue_state import MessageState, state_from_json

T = TypeVar("T")
D = TypeVar("D")
MAX_WORKERS = 4
CHUNK = 20_000  # files per task: a worker's result is small against its reads
INLINE_BELOW = 2 * CHUNK  # a small queue is read in this process: no fork to pay for
READ_SIZE = 8192  # a state is a few hundred bytes: no 64 KiB buffer to allocate per file
# A state's mtime is its next try, in the future, so under `relatime` every read would
# also write the inode's atime: a third of the system time of reading them all.
_open_flags = os.O_RDONLY | getattr(os, "O_NOATIME", 0)


@contextlib.contextmanager
def without_cyclic_gc() -> Iterator[None]:
    """Reading a big queue makes millions of objects that live to the end and hold no
    cycles (bytes, strings, tuples): the cyclic collector would walk them again and
    again, half the CPU of `queue list`. Reference counting still frees them; forked
    workers inherit the setting."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _listing(root: Path) -> tuple[list[tuple[str, str]], list[tuple[int, str]]]:
    """The folders ((path, where)) and every name in them as (folder index, name), in
    inode order; a million paths as strings would be some 200 MB, the names a third."""
    root_str = os.fspath(root)
    folders = [(os.path.join(root_str, "queue"), "queue"),
               (os.path.join(root_str, "hold"), "hold")]
    with contextlib.suppress(FileNotFoundError):
        folders += [(os.path.join(root_str, "active", d), "active")
                    for d in os.listdir(os.path.join(root_str, "active"))]
    inodes: list[int] = []
    names: list[tuple[int, str]] = []
    for index, (folder, _where) in enumerate(folders):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), \
                os.scandir(folder) as it:
            for entry in it:
                if not entry.name.startswith("."):
                    inodes.append(entry.inode())
                    names.append((index, entry.name))
    # Sorted by a key of plain ints: half the time of sorting (inode, index, name) tuples.
    order = sorted(range(len(names)), key=inodes.__getitem__)
    return folders, [names[i] for i in order]


def read_raw(path: str, dir_fd: int) -> bytes | None:
    """One state file's bytes (`path` relative to `dir_fd`); None if it is gone (claimed
    or removed meanwhile)."""
    global _open_flags
    try:
        try:
            fd = os.open(path, _open_flags, dir_fd=dir_fd)
        except PermissionError:
            if _open_flags == os.O_RDONLY:
                raise
            _open_flags = os.O_RDONLY  # O_NOATIME is for the files' owner (or root)
            fd = os.open(path, _open_flags, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise SpoolError(f"cannot read it: {exc}") from exc
    try:
        # One read for a state (a few hundred bytes); a short read is the end.
        chunks = [os.read(fd, READ_SIZE)]
        while len(chunks[-1]) == READ_SIZE:
            chunks.append(os.read(fd, READ_SIZE))
    except OSError as exc:
        raise SpoolError(f"cannot read it: {exc}") from exc
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# What `queue stats` and `queue list` need of a state, read without the JSON decoder
# (a tenth of its cost). Exact for the files state_to_json writes: the keys come in its
# order, and up to the end of the recipients (a DKIM signature, which has CRLFs and so
# escapes, comes after them) a file with no backslash has no string that holds a quote,
# so every `"` there is JSON's own and these patterns can only meet the keys. Anything
# else (an escape, another version, another key order) takes the full decoder.
_VERSION = b'{"version":1,'
_DKIM_AFTER_RECIPIENTS = b'],"dkim_fields":'
_CREATED = re.compile(rb'"created":([-+0-9.eE]+)[,}]')
_ADDRESS = b'"address":"'
_RECIPIENT = re.compile(rb'"address":"([^"]*)","status":"(pending|sent|bounced)"')
_HELD = b'"held":true'
_LIST_HEAD = re.compile(
    rb'\{"version":1,"id":"([^"]*)","created":([-+0-9.eE]+),"sender":"([^"]*)",'
    rb'"size":[0-9]+,"attempts":([0-9]+),"last_try":(?:null|[-+0-9.eE]+),'
    rb'"next_try":([-+0-9.eE]+),"last_error":"[^"]*","file_stamp":"[^"]*",'
    rb'"held":(?:true|false),"recipients":\[')
_LIST_RECIPIENT = re.compile(
    rb'\{"address":"([^"]*)","status":"(pending|sent|bounced)","response":"([^"]*)"')


def _plain_head(raw: bytes) -> bytes | None:
    """The state's bytes to the end of its recipients, if they have no escape in them."""
    if not raw.startswith(_VERSION):
        return None
    # The first `],"dkim_fields":` is the key's: before it there is no backslash (checked
    # next), so no string there holds a quote.
    end = raw.find(_DKIM_AFTER_RECIPIENTS)
    head = raw if end < 0 else raw[:end + 1]
    return None if b"\\" in head else head


def stats_summary(raw: bytes) -> tuple[float, bool, list[str]]:
    """(created, held, pending recipient addresses) of a state file's bytes."""
    head = _plain_head(raw)
    if head is not None:
        created = _CREATED.search(head)
        recipients = _RECIPIENT.findall(head)
        if created and len(recipients) == head.count(_ADDRESS):
            # A damaged file can still look like ours here ("1.2.3", bytes that are not
            # UTF-8): the decoder then says what is wrong with it.
            with contextlib.suppress(ValueError):
                return (float(created[1]), _HELD in head,
                        [a.decode() for a, status in recipients if status == b"pending"])
    state = state_from_json(raw)
    return state.created, state.held, [r.address for r in state.pending()]


class ListedRecipient(NamedTuple):
    address: str
    status: str
    response: str


class Listed(NamedTuple):
    """A state as `queue list` shows it (queue_format.StateView), from list_summary."""

    id: str
    created: float
    sender: str
    attempts: int
    next_try: float
    recipients: tuple[ListedRecipient, ...]

    def pending(self) -> tuple[ListedRecipient, ...]:
        return tuple(r for r in self.recipients if r.status == "pending")


def list_summary(raw: bytes) -> StateView:
    """What `queue list` shows of a state file's bytes: a Listed where the bytes are as
    state_to_json writes them (a tenth of the decoder's cost), else the decoded state."""
    head = _plain_head(raw)
    if head is not None:
        fields = _LIST_HEAD.match(head)
        recipients = _LIST_RECIPIENT.findall(head)
        if fields and len(recipients) == head.count(_ADDRESS):
            id, created, sender, attempts, next_try = fields.groups()
            with contextlib.suppress(ValueError):  # damaged: as in stats_summary
                return Listed(id.decode(), float(created), sender.decode(), int(attempts),
                              float(next_try),
                              tuple(ListedRecipient(address.decode(), status.decode(),
                                                    response.decode())
                                    for address, status, response in recipients))
    return state_from_json(raw)


def stats_shares(root: Path, now: float) -> Folded[dict[str, dict[str, int]]]:
    """queue_format.shape_counts of every share of the queue, from stats_summary."""
    def task(summaries: Iterator[tuple[tuple[float, bool, list[str]], str]]
             ) -> dict[str, dict[str, int]]:
        return shape_count_summaries(((created, pending) for (created, held, pending), where
                                      in summaries if where != "hold" and not held), now)
    return fold(root, stats_summary, task)


class Folded(NamedTuple, Generic[T]):
    """fold()'s answer: a result per share, and the state files it had to skip."""

    results: list[T]
    unreadable: list[str]  # "PATH: why", one per file that could not be read or decoded


_decode: Callable[[bytes], Any] | None = None
_task: Callable[[Iterator[tuple[Any, str]]], Any] | None = None
_folders: list[tuple[str, str]] = []
_names: list[tuple[int, str]] = []  # inherited by the workers: a task is only its range


def _share(names: list[tuple[int, str]], unreadable: list[str]) -> Iterator[tuple[Any, str]]:
    """Each file of `names` decoded, with where it is; one that cannot be read or decoded
    goes to `unreadable`, named, and the rest are still read (the daemon keeps such a
    message and retries it, so one bad file must not hide the whole queue)."""
    assert _decode is not None
    decode, folders = _decode, _folders
    # Each name opened relative to its folder: no walk of the spool's path per file.
    fds: dict[int, int | None] = {}
    try:
        for index, name in names:
            if index not in fds:
                fds[index] = _open_folder(folders[index][0])
            dir_fd = fds[index]
            try:
                raw = None if dir_fd is None else read_raw(name, dir_fd)
                if raw is not None:
                    yield decode(raw), folders[index][1]
            except SpoolError as exc:
                unreadable.append(f"{os.path.join(folders[index][0], name)}: {exc}")
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)


def _open_folder(path: str) -> int | None:
    """A folder's descriptor; None if it is gone (a dead daemon's active/ taken back)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise SpoolError(f"cannot read {path}: {exc}") from exc


def _run_range(bounds: tuple[int, int]) -> tuple[Any, list[str]]:
    assert _task is not None
    unreadable: list[str] = []
    return _task(_share(_names[bounds[0]:bounds[1]], unreadable)), unreadable


def fold_states(root: Path, task: Callable[[Iterator[tuple[MessageState, str]]], T],
                workers: int | None = None) -> Folded[T]:
    """fold() of the decoded states."""
    return fold(root, state_from_json, task, workers)


def fold_listed(root: Path, task: Callable[[Iterator[tuple[StateView, str]]], T],
                workers: int | None = None) -> Folded[T]:
    """fold() of what `queue list` shows of each state (list_summary)."""
    return fold(root, list_summary, task, workers)


def fold(root: Path, decode: Callable[[bytes], D],
         task: Callable[[Iterator[tuple[D, str]]], T], workers: int | None = None
         ) -> Folded[T]:
    """`task` applied to each share of the queue: (decode(file's bytes), where) of each
    state file in it; one result per share.

    `task` must be a function of its share alone (the shares are read in parallel, in
    forked processes, when the queue is big); its result must be picklable.
    """
    global _decode, _task, _folders, _names
    folders, names = _listing(root)
    count = workers or min(MAX_WORKERS, os.cpu_count() or 1)
    # inherited by the forked workers
    _decode, _task, _folders, _names = decode, task, folders, names
    try:
        if len(names) < INLINE_BELOW or count < 2 or "fork" not in \
                multiprocessing.get_all_start_methods():
            answers = [_run_range((0, len(names)))]
        else:
            ranges = [(i, min(i + CHUNK, len(names))) for i in range(0, len(names), CHUNK)]
            with multiprocessing.get_context("fork").Pool(count) as pool:
                answers = list(pool.imap(_run_range, ranges))
    finally:
        _decode, _task, _folders, _names = None, None, [], []
    return Folded([result for result, _ in answers],
                  [problem for _, problems in answers for problem in problems])


def report_unreadable(unreadable: list[str]) -> bool:
    """One line on stderr per state file a command skipped; whether there were any (the
    command then exits 1: what it printed or did leaves those messages out)."""
    for problem in unreadable:
        print(f"mxsend: skipped {problem}", file=sys.stderr)
    return bool(unreadable)
