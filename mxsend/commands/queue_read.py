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
"vanished meanwhile: skipped"); the spool is only read.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mxsend.commands.queue_format import shape_count_summaries
from mxsend.errors import SpoolError
from mxsend.queue_state import MessageState, state_from_json

T = TypeVar("T")
MAX_WORKERS = 4
CHUNK = 20_000  # files per task: a worker's result is small against its reads
INLINE_BELOW = 2 * CHUNK  # a small queue is read in this process: no fork to pay for
READ_SIZE = 1 << 16
# A state's mtime is its next try, in the future, so under `relatime` every read would
# also write the inode's atime: a third of the system time of reading them all.
_open_flags = os.O_RDONLY | getattr(os, "O_NOATIME", 0)


def state_files(root: Path) -> list[tuple[str, str]]:
    """(path, where) of every state file: queue/, hold/, active/*/, in inode order."""
    folders, names = _listing(root)
    return [(f"{folders[i][0]}/{name}", folders[i][1]) for i, name in names]


def _listing(root: Path) -> tuple[list[tuple[str, str]], list[tuple[int, str]]]:
    """The folders ((path, where)) and every name in them as (folder index, name), in
    inode order; a million paths as strings would be some 200 MB, the names a third."""
    root_str = os.fspath(root)
    folders = [(os.path.join(root_str, "queue"), "queue"),
               (os.path.join(root_str, "hold"), "hold")]
    with contextlib.suppress(FileNotFoundError):
        folders += [(os.path.join(root_str, "active", d), "active")
                    for d in os.listdir(os.path.join(root_str, "active"))]
    found: list[tuple[int, int, str]] = []
    for index, (folder, _where) in enumerate(folders):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), \
                os.scandir(folder) as it:
            found += [(entry.inode(), index, entry.name) for entry in it
                      if not entry.name.startswith(".")]
    found.sort()
    return folders, [(index, name) for _ino, index, name in found]


def read_states(paths: Iterable[tuple[str, str]]) -> Iterator[tuple[MessageState, str]]:
    """The states behind `paths`; files gone meanwhile (claimed, removed) are skipped."""
    for path, where in paths:
        state = read_state(path)
        if state is not None:
            yield state, where


def read_state(path: str) -> MessageState | None:
    """One state file; None if it is gone (claimed or removed meanwhile)."""
    raw = read_raw(path)
    return None if raw is None else state_from_json(raw)


def read_raw(path: str) -> bytes | None:
    """One state file's bytes; None if it is gone (claimed or removed meanwhile)."""
    global _open_flags
    try:
        try:
            fd = os.open(path, _open_flags)
        except PermissionError:
            if _open_flags == os.O_RDONLY:
                raise
            _open_flags = os.O_RDONLY  # O_NOATIME is for the files' owner (or root)
            fd = os.open(path, _open_flags)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise SpoolError(f"cannot read {path}: {exc}") from exc
    try:
        # One read for a state (a few hundred bytes); a short read is the end.
        chunks = [os.read(fd, READ_SIZE)]
        while len(chunks[-1]) == READ_SIZE:
            chunks.append(os.read(fd, READ_SIZE))
    except OSError as exc:
        raise SpoolError(f"cannot read {path}: {exc}") from exc
    finally:
        os.close(fd)
    return b"".join(chunks)


# What `queue stats` needs of a state, without decoding all of it. Exact for the
# files state_to_json writes: with no backslash in the file no string holds a quote, so
# every `"` is JSON's own and these keys can only be the keys; anything else (an escape,
# another version, recipients in another key order) takes the full decoder.
_VERSION = b'{"version":1,'
_CREATED = re.compile(rb'"created":([-+0-9.eE]+)[,}]')
_ADDRESS = b'"address":"'
_RECIPIENT = re.compile(rb'"address":"([^"]*)","status":"([a-z]+)"')
_HELD = b'"held":true'


def stats_summary(raw: bytes) -> tuple[float, bool, list[str]]:
    """(created, held, pending recipient addresses) of a state file's bytes."""
    if raw.startswith(_VERSION) and b"\\" not in raw:
        created = _CREATED.search(raw)
        recipients = _RECIPIENT.findall(raw)
        if created and len(recipients) == raw.count(_ADDRESS):
            return (float(created[1]), _HELD in raw,
                    [a.decode() for a, status in recipients if status == b"pending"])
    state = state_from_json(raw)
    return state.created, state.held, [r.address for r in state.pending()]


def stats_shares(root: Path, now: float) -> list[dict[str, dict[str, int]]]:
    """queue_format.shape_counts of every share of the queue, from stats_summary."""
    def task(files: Iterator[tuple[bytes, str]]) -> dict[str, dict[str, int]]:
        summaries = ((*stats_summary(raw), where) for raw, where in files)
        return shape_count_summaries(((created, pending) for created, held, pending, where
                                      in summaries if where != "hold" and not held), now)
    return fold_files(root, task)


_task: Callable[[Iterator[tuple[bytes, str]]], Any] | None = None
_folders: list[tuple[str, str]] = []


def _share(names: list[tuple[int, str]]) -> Iterator[tuple[bytes, str]]:
    folders = _folders
    for index, name in names:
        folder, where = folders[index]
        raw = read_raw(f"{folder}/{name}")
        if raw is not None:
            yield raw, where


def _run_chunk(names: list[tuple[int, str]]) -> Any:
    assert _task is not None
    return _task(_share(names))


def fold_states(root: Path, task: Callable[[Iterator[tuple[MessageState, str]]], T],
                workers: int | None = None) -> list[T]:
    """`task` applied to the states of each share of the queue; one result per share.

    `task` must be a function of its share alone (the shares are read in parallel, in
    forked processes, when the queue is big); its result must be picklable.
    """
    def decoded(files: Iterator[tuple[bytes, str]]) -> T:
        return task((state_from_json(raw), where) for raw, where in files)
    return fold_files(root, decoded, workers)


def fold_files(root: Path, task: Callable[[Iterator[tuple[bytes, str]]], T],
               workers: int | None = None) -> list[T]:
    """fold_states() on the files' bytes."""
    global _task, _folders
    folders, names = _listing(root)
    count = workers or min(MAX_WORKERS, os.cpu_count() or 1)
    _task, _folders = task, folders  # inherited by the forked workers
    try:
        if len(names) < INLINE_BELOW or count < 2 or "fork" not in \
                multiprocessing.get_all_start_methods():
            return [_run_chunk(names)]
        chunks = [names[i:i + CHUNK] for i in range(0, len(names), CHUNK)]
        del names
        with multiprocessing.get_context("fork").Pool(count) as pool:
            return list(pool.imap(_run_chunk, chunks))
    finally:
        _task, _folders = None, []
