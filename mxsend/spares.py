"""Reusing the inodes of finished state files for the next ones (docs/spool.md).

ext4 looks for a free inode by skipping the ones freed in the last ~30 s, so with a
state file made and removed per message each new one cost a scan over thousands (the
kernel's recently_deleted()): up to half of the daemon's system time. A process keeps
the state files it has finished with as active/<owner>/.spare-N (names no scanner
reads, each the inode's only name) and writes its next states into them.

Every OS call goes through the `os` module attribute, for the crash test.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets

from mxsend.durable import FILE_MODE, Steps, Sync, write_fd

# At most this many spares per process.
SPARE_MAX = 1024
_SPARE = ".spare-"


class Spares:
    """The spare state files of one process, in its active/<owner>/ directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.names: list[str] = []
        self._numbers = itertools.count()

    def _next_name(self) -> str:
        return f"{_SPARE}{next(self._numbers)}"

    def take(self, path: str) -> bool:
        """Rename a spare to `path` (replacing a leftover there); False if none is left."""
        while self.names:
            spare = self.names.pop()
            try:
                os.rename(f"{self.directory}/{spare}", path)
                return True
            except FileNotFoundError:
                # Our directory was taken (we were presumed dead): none is left.
                self.names.clear()
        return False

    def keep(self, path: str) -> bool:
        """Make a state file we are done with, in our directory, a spare."""
        if len(self.names) >= SPARE_MAX or os.path.dirname(path) != self.directory:
            return False
        spare = self._next_name()
        os.rename(path, f"{self.directory}/{spare}")
        self.names.append(spare)
        return True

    def drop_all(self) -> None:
        """Remove every spare (a clean exit)."""
        for spare in self.names:
            with contextlib.suppress(OSError):
                os.unlink(f"{self.directory}/{spare}")
        self.names.clear()

    def new_file_steps(self, path: str, data: bytes, mtime: float | None) -> Steps[None]:
        """Write a private file (a dot-name of ours) into a spare if there is one;
        durable before any rename publishes it, as durable.write_file_steps."""
        fd = self.write_new_file(path, data, mtime)
        try:
            yield Sync(fd=fd)
        finally:
            os.close(fd)

    def write_new_file(self, path: str, data: bytes, mtime: float | None) -> int:
        """new_file_steps() without its barrier: the open file, for the caller to make
        durable (together with other changes) and close."""
        reused = self.take(path)
        if reused:
            # The spare's old content is another message's. It is overwritten in place
            # and cut to the new length afterwards, not truncated first: freeing the
            # block and allocating it again costs a journal update (and a discard on
            # a filesystem mounted with it), about a quarter of the committer's time.
            # Nothing reads this name until it is complete and synced.
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                         FILE_MODE)
        try:
            write_fd(fd, data, None)
            if reused:
                os.ftruncate(fd, len(data))
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def replace_steps(self, path: str, data: bytes, mtime: float | None, *,
                      recorded: bool = False) -> Steps[None]:
        """Atomically replace a state in our directory: the new state is written into a
        spare, and the old one becomes a spare. `recorded` marks the last barrier, after
        which the new state is durable (durable.Sync)."""
        directory, name = os.path.split(path)
        temp = f"{directory}/.{name}.{secrets.token_hex(4)}.tmp"
        try:
            yield from self.new_file_steps(temp, data, mtime)
            # A second name for the old state before the rename replaces it. A crash in
            # between leaves a dot-file that recovery deletes (only that name).
            kept: str | None = None
            if len(self.names) < SPARE_MAX and directory == self.directory:
                kept = self._next_name()
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
                self.names.append(kept)  # its only name now
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        yield Sync(directory=directory, recorded=recorded)
