"""Group commit for the daemon's spool operations, from the event loop's side.

Operations are spool `Steps` (spool.py): they run on one I/O thread
(`Spool.run_rolling`) and join at the next barrier, so that under load each syncfs
serves many messages at different stages while an idle daemon still commits a lone
operation at once. Results come back to the loop once per round, as futures.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from mxsend.durable import RECORDED
from mxsend.errors import SpoolError
from mxsend.log import get_logger
from mxsend.spool import Spool, Steps

log = get_logger()
T = TypeVar("T")


class Committer:
    """Runs spool operations on `executor`'s one thread, many to a barrier.

    The runner keeps going while operations keep coming and stops once a round finds
    none (decided under the lock that `submit` starts it with).
    """

    def __init__(self, spool: Spool, executor: ThreadPoolExecutor) -> None:
        self._spool = spool
        self._executor = executor
        self._lock = threading.Lock()
        self._pending: list[tuple[Steps[Any], asyncio.Future[Any]]] = []
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_recorded: dict[asyncio.Future[Any], Callable[[], None]] = {}

    async def run(self, steps: Steps[T], *,
                  on_recorded: Callable[[], None] | None = None) -> T:
        """The operation's result. `on_recorded` is called, on the loop, as soon as the
        operation has met its barrier marked `recorded` (durable.Sync), before the
        steps that only tidy up: a held end of data need not wait for those."""
        [done] = self.submit([steps])
        if on_recorded is not None:
            self._on_recorded[done] = on_recorded
        try:
            result: T = await done
        finally:
            self._on_recorded.pop(done, None)
        return result

    def submit(self, operations: Sequence[Steps[Any]]) -> list[asyncio.Future[Any]]:
        """Hand operations in together (they start at the same barrier); their futures."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in operations]
        with self._lock:
            self._pending.extend(zip(operations, futures, strict=True))
            start = not self._running
            self._running = True
        if start:
            try:
                future = loop.run_in_executor(self._executor, self._serve)
            except RuntimeError as exc:  # the pool is shutting down
                with self._lock:
                    self._running = False
                    batch, self._pending = self._pending, []
                self._deliver([(d, SpoolError(f"spool I/O stopped: {exc}")) for _, d in batch])
            else:
                future.add_done_callback(self._served)
        return futures

    def _serve(self) -> None:
        self._spool.run_rolling(self._take, self._done_on_thread)

    def _take(self, idle: bool) -> list[tuple[Steps[Any], asyncio.Future[Any]]]:
        with self._lock:
            batch, self._pending = self._pending, []
            if idle and not batch:
                self._running = False  # decided under the lock run() starts us with
            return batch

    def _done_on_thread(self, finished: list[tuple[asyncio.Future[Any], object]]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, finished)

    def _served(self, future: asyncio.Future[None]) -> None:
        if future.cancelled() or future.exception() is None:
            return
        # The runner itself failed (a bug): every waiter hears it, none waits forever.
        error = SpoolError(f"spool I/O failed: {future.exception()}")
        with self._lock:
            self._running = False
            batch, self._pending = self._pending, []
        self._deliver([(done, error) for _, done in batch])
        log.error("%s", error)

    def _deliver(self, finished: list[tuple[asyncio.Future[Any], object]]) -> None:
        for done, result in finished:
            if result is RECORDED:
                callback = self._on_recorded.pop(done, None)
                if callback is not None:
                    try:
                        callback()
                    except Exception:  # a bug; the batch's other results still go out
                        log.exception("an on_recorded callback failed")
                continue
            if done.done():
                continue  # its waiter was cancelled; the operation still happened
            if isinstance(result, BaseException):
                done.set_exception(result)
            else:
                done.set_result(result)
