"""Rescans of queue/: when one is due, and running one without holding up new mail.

A rescan lists queue/ (`Spool.queued_earliest`) and rebuilds the due plan from it
(plan.py): it catches what other processes, the queue CLI and lost events changed. At a
million files it takes seconds. The first is part of starting (READY follows it) and
`--once` decides from what it found, so those run in the scan loop itself; any later one
runs on a thread of its own in the background while the loop goes on accepting and
dispatching, and wakes the loop when it is done (issue 16 item 7: a retry sweep of a big
queue must not starve new mail).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from mxsend.errors import MxsendError
from mxsend.log import get_logger
from mxsend.runtime import Runtime

log = get_logger()

# The next full rescan waits at least this many times as long as the last one took: a
# big queue is listed in a twentieth of the time at most.
RESCAN_COST_FACTOR = 20


class Rescans:
    """The rescans of one daemon; `requested` asks for one at once."""

    def __init__(self, rt: Runtime, listed: Callable[[], None]) -> None:
        self._rt = rt
        self._listed = listed  # after each: new/ is looked at again too
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mxsend-rescan")
        self._running: asyncio.Task[None] | None = None
        self._next = 0.0  # time.monotonic() of the next one
        self.requested = True

    @property
    def running(self) -> bool:
        """One runs in the background (it wakes the scan loop when done)."""
        return self._running is not None

    def wanted(self) -> bool:
        return self._running is None and (
            self.requested or time.monotonic() >= self._next
            or self._rt.plan.wants_rescan(time.time()))

    def seconds_to_next(self) -> float | None:
        """How long the scan loop may sleep before the next is due; None while one runs."""
        return None if self.running else max(0.0, self._next - time.monotonic())

    async def run(self) -> None:
        """One rescan, awaited (its failure is the caller's)."""
        plan = self._rt.plan
        self.requested = False
        started = time.monotonic()
        plan.begin_rescan()
        try:
            listing = await asyncio.get_running_loop().run_in_executor(
                self._thread, self._rt.spool.queued_earliest, plan.limit)
        except BaseException:
            plan.end_rescan()
            raise
        plan.replace(*listing)
        self._listed()
        took = time.monotonic() - started
        self._next = time.monotonic() + max(self._rt.config.queue.scan_interval,
                                            RESCAN_COST_FACTOR * took)

    def start(self) -> None:
        """run() in the background; a failure is logged and tried again later."""
        async def rescan() -> None:
            try:
                await self.run()
            except (MxsendError, OSError) as exc:
                # As the scan loop's own failures: nothing is lost, try again later.
                log.error("scan failed (the rescan of queue/): %s", exc)
                self._next = time.monotonic() + self._rt.config.queue.scan_interval
            finally:
                self._running = None
                self._rt.wake.set()
        self._running = asyncio.get_running_loop().create_task(rescan())

    async def stop(self) -> None:
        """Shutdown: a rescan in the background is abandoned (its listing finishes on
        its thread; close() waits for that)."""
        if self._running is not None:
            self._running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._running

    def close(self) -> None:
        self._thread.shutdown(wait=True)
