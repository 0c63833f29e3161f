"""One watcher for every file the daemon follows: the spool's new/ and control/, the script.

Rules of this module:

* Only three kinds of change count: a file written and closed (IN_CLOSE_WRITE), a file
  renamed into the folder (IN_MOVED_TO) and a name made in it (IN_CREATE: the writers'
  protocol hands a file over by link() into new/, which is neither; the listener and
  `mxsend enqueue` do, and their messages waited for the next rescan, up to
  queue.scan_interval). Opening or reading a file is not a change: the
  daemon reads its own script on every reload, and counting those reads made each
  reload schedule the next one, forever (issue 10).
* A callback runs on the event loop and only means "look again"; it gets no event
  record. A lost event (IN_Q_OVERFLOW) calls every callback.
* On Linux the watcher reads inotify(7) itself, on the loop, with no thread: watchdog's
  inotify backend holds every IN_MOVED_FROM for half a second hoping to pair it, and the
  daemon's claims (renames out of new/) made every arrival behind one wait that long.
  Elsewhere watchdog's observer is the fallback, correct but slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# <sys/inotify.h>
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_MASK_ADD = 0x20000000
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
# struct inotify_event: int wd; uint32 mask, cookie, len; char name[len].
_EVENT = struct.Struct("iIII")


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


@dataclass(frozen=True, slots=True)
class _Interest:
    folder: str  # absolute, as registered
    name: str | None  # only this file of the folder; None: any file
    callback: Callable[[], None]
    mask: int


def parse_events(buffer: bytes) -> list[tuple[int, int, str]]:
    """inotify records -> (wd, mask, name); the name is "" for the folder itself."""
    events = []
    offset = 0
    while offset + _EVENT.size <= len(buffer):
        wd, mask, _, length = _EVENT.unpack_from(buffer, offset)
        start = offset + _EVENT.size
        name = buffer[start : start + length].split(b"\0", 1)[0]
        events.append((wd, mask, os.fsdecode(name)))
        offset = start + length
    return events


class Watcher:
    """Callbacks for files written or renamed into folders; one inotify instance.

    `add(folder, callback, name=...)` returns a token for `remove`. Several interests
    may share a folder (the script may live in the spool); each is told only about its
    own file when it names one. `inotify=False` forces the portable fallback (tests).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, inotify: bool = True) -> None:
        self._loop = loop
        self._interests: dict[int, _Interest] = {}
        self._tokens = itertools.count(1)
        self._fd: int | None = None
        self._wds: dict[int, str] = {}  # inotify watch descriptor -> folder
        self._observer: Any = None
        self._watched: set[str] = set()
        if inotify and _LIBC is not None and hasattr(_LIBC, "inotify_init1"):
            fd = _LIBC.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd >= 0:  # else (out of inotify instances): the fallback still works
                self._fd = fd
                loop.add_reader(fd, self._read)

    @property
    def uses_inotify(self) -> bool:
        return self._fd is not None

    def add(self, folder: Path, callback: Callable[[], None], *, name: str | None = None,
            touch: bool = False) -> int:
        """Call `callback` on the loop when a file in `folder` (or just `name`) changes.

        `touch`: a new timestamp counts too (IN_ATTRIB), for a file used as a signal
        (`mxsend queue flush` touches control/rescan). Raises OSError if the folder
        cannot be watched (it does not exist, say).
        """
        path = os.path.abspath(folder)
        mask = MASK | (IN_ATTRIB if touch else 0)
        self._watch(path, mask)
        token = next(self._tokens)
        self._interests[token] = _Interest(path, name, callback, mask)
        return token

    def remove(self, token: int) -> None:
        """Forget one interest; its folder stays watched (cheap, and others may share it)."""
        self._interests.pop(token, None)

    def close(self) -> None:
        self._interests.clear()
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    # -- inotify --------------------------------------------------------------------------

    def _watch(self, path: str, mask: int) -> None:
        if self._fd is None:
            if path not in self._watched:
                self._watch_portably(path)
                self._watched.add(path)
            return
        # IN_MASK_ADD: a second interest in the folder widens its mask, never narrows it.
        wd = _LIBC.inotify_add_watch(self._fd, os.fsencode(path), mask | IN_MASK_ADD)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot watch {path}: {os.strerror(err)}")
        self._wds[wd] = path

    def _read(self) -> None:
        data = bytearray()
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._fd or -1, 65536):
                data += chunk
        changed: list[tuple[str, str, int]] = []
        for wd, mask, name in parse_events(bytes(data)):
            if mask & IN_Q_OVERFLOW:
                changed = [(i.folder, i.name or "", i.mask) for i in self._interests.values()]
                break
            folder = self._wds.get(wd)
            if folder is not None:
                changed.append((folder, name, mask))
        self._notify(changed)

    def _notify(self, changed: list[tuple[str, str, int]]) -> None:
        """Each interested callback once per batch of changes."""
        for interest in list(self._interests.values()):
            if any(folder == interest.folder and interest.name in (None, name)
                   and mask & interest.mask for folder, name, mask in changed):
                interest.callback()

    # -- the portable fallback ------------------------------------------------------------

    def _watch_portably(self, path: str) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"cannot watch {path}: not a folder")
        watcher, loop = self, self._loop

        class _Changed(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                # "closed" is a closed write (watchdog reports reads as "closed_no_write"
                # and "opened", never counted); "modified" for platforms without closes.
                mask = MASK
                if event.event_type in ("created", "modified", "closed"):
                    where = os.fsdecode(event.src_path)
                elif event.event_type == "moved":
                    where = os.fsdecode(event.dest_path)
                elif event.event_type == "attrib":
                    where, mask = os.fsdecode(event.src_path), IN_ATTRIB
                else:
                    return
                change = (os.path.dirname(where), os.path.basename(where), mask)
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(watcher._notify, [change])

        if self._observer is None:
            self._observer = Observer()
            self._observer.daemon = True
            self._observer.start()
        self._observer.schedule(_Changed(), path, recursive=False)
