"""Folder watches wake the loop when a file is renamed in; inotify without a delay."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from mxsend.watch import InotifyWatch, Watch, WatchdogWatch, watch_folders

Factory = Callable[[asyncio.AbstractEventLoop, Sequence[Path], Callable[[], None]], Watch]


async def _first_wake_after(wakes: list[float], moment: float) -> float:
    """Seconds from `moment` to the first wake after it (bounded polling, 10 s)."""
    async with asyncio.timeout(10):
        while True:
            later = [w for w in wakes if w >= moment]
            if later:
                return later[0] - moment
            await asyncio.sleep(0.005)


@pytest.mark.parametrize("factory", [InotifyWatch, WatchdogWatch, watch_folders])
async def test_a_rename_into_the_folder_wakes(tmp_path: Path, factory: Factory) -> None:
    new, tmp = tmp_path / "new", tmp_path / "tmp"
    new.mkdir()
    tmp.mkdir()
    wakes: list[float] = []
    watch = factory(asyncio.get_running_loop(), [new], lambda: wakes.append(time.monotonic()))
    try:
        # A rename out of the folder first (what the daemon's claims do): it must not
        # hold back the arrival behind it.
        (tmp / "claimed").write_bytes(b"x")
        os.rename(tmp / "claimed", new / "claimed")
        await _first_wake_after(wakes, 0.0)
        os.rename(new / "claimed", tmp / "claimed")
        (tmp / "m1").write_bytes(b"x")
        started = time.monotonic()
        os.rename(tmp / "m1", new / "m1")
        elapsed = await _first_wake_after(wakes, started)
    finally:
        watch.close()
    if factory is not WatchdogWatch:
        # watchdog's inotify backend holds the unpaired move out for 0.5 s, and the
        # arrival behind it with it; ours must not.
        assert elapsed < 0.3, elapsed
