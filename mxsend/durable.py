"""Durable file operations as steps, the barriers between them, and how barriers are met.

Rules of this file (docs/spool.md, "Durability", says why each holds):

- An operation is a generator (`Steps`): it does its file-system calls and yields a
  `Sync` wherever what it did must be on disk before it goes on. It never fsyncs itself.
- `drive` runs one operation alone, each barrier its own fsync (`FSYNC`); `run_rolling`
  runs many side by side, and under `GroupCommit` one syncfs(2) meets every barrier
  that is waiting. The order of each operation's steps is the same either way.
- A file is made durable before any rename publishes it; a rename or link is durable
  once the directories it touched are fsynced.
- Names are never replaced where a file may already be: `move_noreplace` links.
- Every OS call goes through the `os` module attribute (never `from os import`), so the
  crash test can interpose on them and kill the process between any two.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import secrets
import stat
import sys
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias, TypeVar

from mxsend.errors import SpoolError

T = TypeVar("T")

# Contract §10: what mxsend writes is readable by the spool's group, by no one else.
FILE_MODE = 0o640


@dataclass(frozen=True, slots=True)
class Sync:
    """A barrier: what an operation did before it must be durable before it goes on.

    One barrier may cover a file and two directories (a rename's two sides): each is
    synced on its own without group commit, and one syncfs covers them all with it.
    """

    fd: int | None = None  # a file's data (fsync of the file)
    directory: str | Path | None = None  # a directory's entries (fsync of the directory)
    also: str | Path | None = None  # a second directory
    # Once this barrier is met, what the operation records is durable; its later steps
    # only tidy up (a spare kept, a name moved on). run_rolling tells the caller then.
    recorded: bool = False

    def apply(self, durable: Durability) -> None:
        if self.fd is not None:
            durable.file(self.fd)
        for directory in (self.directory, self.also):
            if directory is not None:
                durable.directory(directory)


# An operation as steps: it yields at each barrier and returns its result.
Steps: TypeAlias = Generator[Sync, None, T]


class _Recorded:
    """Not a result: run_rolling hands `done` (token, RECORDED) when an operation has
    met a barrier marked `recorded`, ahead of its result."""

    def __repr__(self) -> str:
        return "RECORDED"


RECORDED: Final = _Recorded()


def drive(steps: Steps[T], durable: Durability) -> T:
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


def run_rolling(
    take: Callable[[bool], list[tuple[Steps[Any], T]]],
    done: Callable[[list[tuple[T, object]]], None],
    durable: Durability,
) -> None:
    """Run operations side by side, each stopped at its barriers, as they come.

    `take(idle)` hands over the operations that arrived (each with a token); `idle`
    says nothing waits at a barrier, and if it then has nothing to give it must note
    (under its own lock) that this runner is stopping, as it returns at once. `done()`
    receives (token, result or exception) for those that finished, and (token, RECORDED)
    for those that met a barrier marked `recorded` and go on. Each operation makes
    each step durable before its next; under GroupCommit one syncfs serves every
    operation standing at a barrier, and an operation that arrives while others are
    half-way waits only for the next barrier, not for the rest of their steps.
    """
    waiting: dict[int, tuple[Steps[Any], Sync, T]] = {}
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
            errors = _meet(waiting, durable)
            current = dict(waiting)
            waiting.clear()
            for key, (steps, sync, token) in current.items():
                failed = errors.get(key)
                if sync.recorded and failed is None:
                    finished.append((token, RECORDED))
                advance(steps, token, failed, False, finished)
            if finished:
                done(finished)
    except BaseException as exc:
        # A bug, not a disk error (those are each operation's own result): no operation
        # may wait forever for a runner that is gone.
        error = SpoolError(f"spool I/O failed: {exc!r}")
        done([(token, error) for _, _, token in waiting.values()])
        raise


def _meet(waiting: dict[int, tuple[Steps[Any], Sync, T]], durable: Durability
          ) -> dict[int, OSError]:
    """Meet every waiting barrier: one group commit, or each on its own; the failures."""
    if isinstance(durable, GroupCommit):
        try:
            durable.barrier()
        except OSError as exc:
            return dict.fromkeys(waiting, exc)
        return {}
    errors: dict[int, OSError] = {}
    for key, (_, sync, _) in waiting.items():
        try:
            sync.apply(durable)
        except OSError as exc:
            errors[key] = exc
    return errors


# --- writing ------------------------------------------------------------------------------


def write_fd(fd: int, data: bytes, mtime: float | None) -> None:
    """All of `data` (os.write may write less than asked), then the mtime if given."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    if mtime is not None:
        os.utime(fd, (mtime, mtime))


def write_file_steps(path: str | Path, data: bytes, mtime: float | None = None,
                     mode: int = FILE_MODE) -> Steps[None]:
    """Create `path` exclusively, write, set mtime, make it durable (before any rename)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        write_fd(fd, data, mtime)
        yield Sync(fd=fd)
    finally:
        os.close(fd)


def write_atomic_steps(path: str | Path, data: bytes, mtime: float | None = None
                       ) -> Steps[None]:
    """Replace `path` with `data` so a reader sees the old or the new file, never a mix."""
    directory, name = os.path.split(path)
    directory = directory or os.curdir
    temp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        yield from write_file_steps(temp, data, mtime)
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    yield Sync(directory=directory)


def write_atomic(path: str | Path, data: bytes, mtime: float | None = None,
                 durable: Durability | None = None) -> None:
    drive(write_atomic_steps(path, data, mtime), durable or FSYNC)


def fsync_dir(directory: str | Path) -> None:
    """A rename is durable only once its directory is (POSIX leaves it to fsync)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: Path, mode: int = 0o750) -> None:
    """Create `directory` and missing parents, each entry durable in its parent."""
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, mode)
        fsync_dir(path.parent)


def append_durable(path: Path, line: bytes) -> None:
    """Append one record and fsync it: acknowledged means on disk (TLS-RPT's results)."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    try:
        write_fd(fd, line, None)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


# --- reading ------------------------------------------------------------------------------


def read_fd(fd: int, limit: int, expected: int) -> bytes:
    """Up to `limit` bytes from `fd`, to its end; `expected` is the size it probably has.

    os.read directly: a file object would cost an fstat, an ioctl and an lseek per
    file, and read(limit) would allocate the whole limit (50 MiB) for every message.
    Reads go on until one returns nothing: a short read alone does not prove the end.
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


def read_file(path: str, *, sized: bool = False) -> bytes:
    """The whole file; `sized`: ask fstat first (a file that may be large)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        expected = os.fstat(fd).st_size if sized else 16384
        return read_fd(fd, sys.maxsize, expected)
    finally:
        os.close(fd)


def mtime(entry: os.DirEntry[str]) -> float:
    """The entry's mtime; -1 if it vanished while we looked."""
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return -1.0


def stamp(info: os.stat_result) -> str:
    """"dev:ino:mtime_ns": tells a file from a later one that reused its name."""
    return f"{info.st_dev}:{info.st_ino}:{info.st_mtime_ns}"


def same_file(a: str | Path, b: str | Path) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(sa.st_mode) and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# --- moving without replacing ---------------------------------------------------------------


def free_name(directory: str | Path, name: str, *, reasons: bool = False) -> str:
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


def move_noreplace(source: str | Path, directory: str | Path, name: str) -> str:
    """Move `source` to directory/name, or a free variant of it; return the name used.

    rename() would silently replace a file that is there; link() fails instead, so a
    name taken meanwhile costs a retry, never a file. Directories cannot be linked:
    they (only ever quarantined, never queued) are renamed after a check.
    """
    if stat.S_ISDIR(os.lstat(source).st_mode):
        name = free_name(directory, name)
        os.rename(source, os.path.join(directory, name))
        return name
    while True:
        try:
            os.link(source, os.path.join(directory, name), follow_symlinks=False)
            break
        except FileExistsError:
            name = free_name(directory, f"{name}-{secrets.token_hex(3)}", reasons=True)
    os.unlink(source)
    return name


# --- how barriers are met -------------------------------------------------------------------


class Durability:
    """How a write is made durable before the next step: one fsync per file and per
    directory. A subclass may change how, never when."""

    def file(self, fd: int) -> None:
        os.fsync(fd)

    def directory(self, directory: str | Path) -> None:
        fsync_dir(directory)


FSYNC = Durability()


class GroupCommit(Durability):
    """Group commit: one syncfs(2) makes every waiting caller's writes durable at once.

    syncfs flushes all dirty data and metadata of the spool's file system, so it is at
    least as strong as the fsync of any one file or directory on it. A caller that needs
    a barrier waits for a syncfs that *started* after it asked: writes made before
    asking are then on disk. Callers arriving while one runs share the next one.
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
