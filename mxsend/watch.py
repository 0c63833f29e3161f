"""Wake the daemon when files arrive in a spool folder: inotify on the event loop.

watchdog's inotify backend holds every IN_MOVED_FROM for half a second, hoping to pair it
with an IN_MOVED_TO, and its queue is first-in first-out. The daemon's own claims are
renames out of new/, so every arrival queued behind one waited 0.5 s: the latency floor
the benchmark measured. The daemon needs no pairing (any event only means "look at the
folder again"), so on Linux it reads inotify itself, from the event loop, with no
thread. Elsewhere it falls back to watchdog's observer, which is correct, only slower.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

# <sys/inotify.h>: a file arrived (renamed in, or created and closed after writing).
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_CLOSE_WRITE = 0x00000008
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_MASK = IN_MOVED_TO | IN_CREATE | IN_CLOSE_WRITE


class Watch(Protocol):
    def close(self) -> None: ...


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


class InotifyWatch:
    """inotify(7) on some folders; `wake()` runs on the loop for every batch of events."""

    def __init__(self, loop: asyncio.AbstractEventLoop, folders: Sequence[Path],
                 wake: Callable[[], None]) -> None:
        fd = _LIBC.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._fd = fd
        self._loop = loop
        try:
            for folder in folders:
                if _LIBC.inotify_add_watch(fd, os.fsencode(folder), _MASK) < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"inotify_add_watch {folder}: {os.strerror(err)}")
        except OSError:
            os.close(fd)
            raise
        self._wake = wake
        loop.add_reader(fd, self._read)

    def _read(self) -> None:
        # The event records are not needed, only that there were some; drain them all
        # (an overflow, IN_Q_OVERFLOW, also just means "look again").
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass
        self._wake()

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)


class WatchdogWatch:
    """The portable fallback: watchdog's observer thread, waking the loop thread-safely."""

    def __init__(self, loop: asyncio.AbstractEventLoop, folders: Sequence[Path],
                 wake: Callable[[], None]) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("created", "moved", "closed"):
                    loop.call_soon_threadsafe(wake)

        self._observer = Observer()
        for folder in folders:
            self._observer.schedule(_Wake(), str(folder), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def close(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)


def watch_folders(loop: asyncio.AbstractEventLoop, folders: Sequence[Path],
                  wake: Callable[[], None]) -> Watch:
    """Call `wake` on the loop soon after a file arrives in any of `folders`."""
    if _LIBC is not None and hasattr(_LIBC, "inotify_init1"):
        try:
            return InotifyWatch(loop, folders, wake)
        except OSError:
            pass  # e.g. out of inotify instances: the fallback still works
    return WatchdogWatch(loop, folders, wake)
