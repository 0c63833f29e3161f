"""What is in a spool's queue: the daemon's scan of queue/ and the queue CLI's listings.

`QueueView` is a base of `spool.Spool`: these read the folders and change nothing, so
they stand apart from the claims and writes (`Spool.root` and its queue/ path are all
they need). Files vanishing while we look (claimed, released) are skipped, not errors.
"""

from __future__ import annotations

import contextlib
import heapq
import os
from collections.abc import Iterator
from pathlib import Path

from mxsend.durable import mtime
from mxsend.errors import SpoolError
from mxsend.queue_state import MessageState, state_from_json
from mxsend.spool_layout import id_problem, request_rescan


class QueueView:
    """The read-only side of a spool; `root` and `_queue` are set by `Spool`."""

    root: Path
    _queue: str  # os.path.join(root, "queue"), a plain string for the hot scan

    def queued(self) -> list[tuple[float, str]]:
        """(next_try, id) of every message in queue/, earliest first: one scandir.

        hold/ is not looked at: a held message is never attempted.
        """
        return _scan_mtimes(self._queue)

    def queued_earliest(self, limit: int) -> tuple[list[tuple[float, str]], float | None]:
        """The `limit` earliest of queued(), and the earliest next_try of those left out
        (None if none were): one scandir, memory for `limit` entries however big queue/ is.
        """
        return _scan_earliest(self._queue, limit)

    def entries(self, unreadable: list[str] | None = None
                ) -> Iterator[tuple[MessageState, str]]:
        """Every message with where it is: "queue", "hold" or "active" (in flight).
        Files vanishing meanwhile are skipped. A state file that cannot be read or
        decoded is a SpoolError naming it; given `unreadable`, it is added there
        ("PATH: why") and skipped instead."""
        for path, where in _state_files(self.root):
            try:
                state = _read_state(path)
            except SpoolError as exc:
                if unreadable is None:
                    raise
                unreadable.append(str(exc))
                continue
            if state is not None:
                yield state, where

    def find(self, id: str) -> tuple[MessageState, str] | None:
        """A message's state and where it is (as entries()), or None."""
        return None if id_problem(id) else _find(self.root, id)

    def request_rescan(self) -> None:
        """Touch control/rescan: the daemon watches it and rescans the queue at once."""
        request_rescan(self.root)


def _find(root: Path, id: str) -> tuple[MessageState, str] | None:
    queue, hold = (root / "queue" / id, "queue"), (root / "hold" / id, "hold")
    candidates = [queue, hold]
    with contextlib.suppress(FileNotFoundError):
        candidates += [(root / "active" / d / id, "active")
                       for d in sorted(os.listdir(root / "active"))]
    # Queue and hold again last: a state moving between them and active/ while we look
    # is still found on one side or the other.
    candidates += [queue, hold]
    for path, where in candidates:
        state = _read_state(path)
        if state is not None:
            return state, where
    return None


def _state_files(root: Path) -> Iterator[tuple[Path, str]]:
    for folder in ("queue", "hold"):
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(root / folder)):
                if not name.startswith("."):
                    yield root / folder / name, folder
    with contextlib.suppress(FileNotFoundError):
        for directory in sorted(os.listdir(root / "active")):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for name in sorted(os.listdir(root / "active" / directory)):
                    if not name.startswith("."):
                        yield root / "active" / directory / name, "active"


def _scan_mtimes(folder: str) -> list[tuple[float, str]]:
    """(mtime, name) of the files in `folder` but dot-files, earliest first."""
    try:
        with os.scandir(folder) as it:
            found = [(mtime(e), e.name) for e in it if not e.name.startswith(".")]
    except FileNotFoundError:
        return []
    return sorted(item for item in found if item[0] >= 0)


def _scan_earliest(folder: str, limit: int) -> tuple[list[tuple[float, str]], float | None]:
    """_scan_mtimes's `limit` earliest, streamed through a bounded heap (max at the top,
    by negated times), and the earliest time of what did not fit."""
    worst: list[tuple[float, str]] = []  # (-mtime, name): the latest kept on top
    rest: float | None = None
    try:
        with os.scandir(folder) as it:
            for entry in it:
                name = entry.name
                if name.startswith("."):
                    continue
                when = mtime(entry)
                if when < 0:
                    continue  # vanished meanwhile (claimed)
                if len(worst) < limit:
                    heapq.heappush(worst, (-when, name))
                    continue
                # the latest of the kept and this one goes (this one, if it is later)
                out = -heapq.heappushpop(worst, (-when, name))[0]
                rest = out if rest is None else min(rest, out)
    except FileNotFoundError:
        return [], None
    return sorted((-negated, name) for negated, name in worst), rest


def _read_state(path: Path) -> MessageState | None:
    """The state at `path`; None if it is gone; a SpoolError that names the file if it
    cannot be read or is not a state we wrote."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise SpoolError(f"{path}: cannot read it: {exc}") from exc
    try:
        return state_from_json(raw)
    except SpoolError as exc:
        raise SpoolError(f"{path}: {exc}") from None
