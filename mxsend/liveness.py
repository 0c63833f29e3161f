"""The daemon's side of heartbeat.py: beat in owners/ and take back dead processes' claims.

Every heartbeat.interval (systemd's watchdog may ask for more often) the daemon refreshes
owners/<owner>, recovers the claims of processes whose beat is heartbeat.STALE_AFTER old
(their interrupted attempt counts: record.recover_claims) and schedules them again,
then pings the watchdog and lets the shaper probe an unreachable Redis. Kept apart from
heartbeat.py, which `health` imports without the delivery stack.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mxsend import heartbeat, sdnotify
from mxsend.errors import MxsendError
from mxsend.log import get_logger
from mxsend.record import recover_claims
from mxsend.runtime import Runtime
from mxsend.shaper import Shaper

log = get_logger()


class Liveness:
    """Beats and recovery over the daemon's runtime; `spool_io` runs on its I/O thread."""

    def __init__(self, rt: Runtime, spool_io: Callable[..., Awaitable[Any]]) -> None:
        self.rt = rt
        self._spool_io = spool_io

    async def run(self, shaper: Shaper | None) -> None:
        """The heartbeat loop, until cancelled."""
        watchdog = sdnotify.watchdog_interval()
        interval = heartbeat.interval(watchdog)
        while True:
            await asyncio.sleep(interval)
            await self.beat()
            sdnotify.notify("WATCHDOG=1")
            if shaper is not None:
                await shaper.probe()

    async def beat(self) -> None:
        """Prove we are alive in owners/, then take back what dead processes held."""
        try:
            self.rt.spool.heartbeat()
            await self.recover()
        except MxsendError as exc:
            log.error("heartbeat failed (retried in %.0fs): %s", heartbeat.INTERVAL, exc)

    async def recover(self) -> None:
        """Take back claims of processes that died; their interrupted attempt counts."""
        recovered = await self._spool_io(recover_claims, self.rt.spool,
                                         self.rt.config.queue.retry, heartbeat.STALE_AFTER,
                                         time.time())
        for queue_id, next_try in recovered:
            log.warning("recovered message %s from a process that stopped", queue_id)
            self.rt.plan.schedule(queue_id, next_try)
