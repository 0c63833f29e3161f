"""The one watcher: closed writes and renames into a folder wake, reads never do."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from mxsend.watch import Watcher

QUIET = 0.5  # a window in which nothing may happen; only ever a bound, never a pass wait


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll `condition` until it holds; fail after `seconds`."""
    async with asyncio.timeout(seconds):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


async def stays(condition: Callable[[], bool], seconds: float = QUIET) -> bool:
    """True if `condition` holds for the whole window (polled)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not condition():
            return False
        await asyncio.sleep(0.01)
    return condition()


@pytest.fixture(params=[True, False], ids=["inotify", "watchdog"])
async def watcher(request: pytest.FixtureRequest) -> AsyncIterator[Watcher]:
    made = Watcher(asyncio.get_running_loop(), inotify=request.param)
    assert made.uses_inotify is request.param
    yield made
    made.close()


async def test_a_rename_into_the_folder_wakes(tmp_path: Path, watcher: Watcher) -> None:
    new, tmp = tmp_path / "new", tmp_path / "tmp"
    new.mkdir()
    tmp.mkdir()
    wakes: list[float] = []
    watcher.add(new, lambda: wakes.append(time.monotonic()))
    # A rename out of the folder first (what the daemon's claims do): it must not hold
    # back the arrival behind it.
    (tmp / "claimed").write_bytes(b"x")
    os.rename(tmp / "claimed", new / "claimed")
    await until(lambda: len(wakes) >= 1)
    os.rename(new / "claimed", tmp / "claimed")
    (tmp / "m1").write_bytes(b"x")
    before = len(wakes)
    os.rename(tmp / "m1", new / "m1")
    await until(lambda: len(wakes) > before)


async def test_a_link_into_the_folder_wakes(tmp_path: Path, watcher: Watcher) -> None:
    # The writers' protocol of `mxsend enqueue` and the listener: tmp/, fsync, link()
    # into new/. A link is neither a closed write nor a rename (IN_CREATE only).
    new, tmp = tmp_path / "new", tmp_path / "tmp"
    new.mkdir()
    tmp.mkdir()
    (tmp / "m1").write_bytes(b"x")
    wakes: list[int] = []
    watcher.add(new, lambda: wakes.append(1))
    os.link(tmp / "m1", new / "m1")
    await until(lambda: len(wakes) >= 1)


async def test_reading_a_file_is_no_change(tmp_path: Path, watcher: Watcher) -> None:
    script = tmp_path / "mxout.lua"
    script.write_text("-- v1\n")
    wakes: list[int] = []
    watcher.add(tmp_path, lambda: wakes.append(1), name="mxout.lua")
    for _ in range(20):  # what a reload does: open, read, close
        script.read_bytes()
    assert await stays(lambda: not wakes)
    script.write_text("-- v2\n")  # a closed write
    await until(lambda: len(wakes) >= 1)


async def test_a_named_interest_hears_only_its_file(tmp_path: Path, watcher: Watcher) -> None:
    mine: list[int] = []
    every: list[int] = []
    watcher.add(tmp_path, lambda: mine.append(1), name="mxout.lua")
    watcher.add(tmp_path, lambda: every.append(1))
    (tmp_path / "other").write_bytes(b"x")
    await until(lambda: len(every) >= 1)
    assert await stays(lambda: not mine)
    swap = tmp_path / ".mxout.lua.swp"
    swap.write_text("-- new\n")
    os.replace(swap, tmp_path / "mxout.lua")  # an editor's rename into place
    await until(lambda: len(mine) >= 1)


async def test_a_touch_counts_only_where_asked(tmp_path: Path, watcher: Watcher) -> None:
    signal_file = tmp_path / "rescan"
    signal_file.write_bytes(b"")
    touched: list[int] = []
    plain: list[int] = []
    watcher.add(tmp_path, lambda: touched.append(1), touch=True)
    os.utime(signal_file)
    await until(lambda: len(touched) >= 1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_bytes(b"")
    watcher.add(other, lambda: plain.append(1))
    os.utime(other / "f")
    assert await stays(lambda: not plain)


async def test_removed_interests_are_not_called(tmp_path: Path, watcher: Watcher) -> None:
    wakes: list[int] = []
    token = watcher.add(tmp_path, lambda: wakes.append(1))
    watcher.remove(token)
    (tmp_path / "f").write_bytes(b"x")
    assert await stays(lambda: not wakes)


async def test_an_absent_folder_is_an_error(tmp_path: Path, watcher: Watcher) -> None:
    with pytest.raises(OSError):
        watcher.add(tmp_path / "absent", lambda: None)
