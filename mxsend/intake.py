"""Intake: files in new/ become queued messages.

`IntakeBook` is the bookkeeping, pure: the backlog of names listed in new/, the names
in flight, and the back-off of names whose acceptance failed. `Intake` drives it:
lists new/, hands acceptances to the committer in groups, and reports each result.

A name is in flight from the moment it is handed in until its result is recorded in
the book. A failed acceptance hands its file back to new/ on the commit thread before
the loop hears of the failure; the inotify event of that rename lists new/ again, and
without the in-flight mark the name would be resubmitted at once instead of after
`queue.scan_interval` (issue 10, item 6).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from mxsend.errors import MxsendError
from mxsend.log import event, get_logger
from mxsend.runtime import Runtime
from mxsend.spool import Accepted, Quarantined

log = get_logger()

# Acceptances started per turn of the scan loop: they finish in a stream rather than
# all at once.
ACCEPT_CHUNK = 64


def own_share_first(names: Sequence[str], index: int, count: int) -> list[str]:
    """`names` with daemon `index` of `count`'s share first, each part in order.

    Daemons sharing a spool all list new/ and race to rename each file; in the same
    order they would collide on nearly every one. Taking its own share (by a hash all
    agree on) first, each finds its files free, and the others' shares afterwards are
    the work-stealing that covers a daemon that is slow or gone.
    """
    if count <= 1:
        return list(names)
    mine: list[str] = []
    others: list[str] = []
    for name in names:
        (mine if zlib.crc32(name.encode()) % count == index else others).append(name)
    return mine + others


class IntakeBook:
    """Which names in new/ to accept next. Times are `time.monotonic()` values.

    - new/ is listed again only once the backlog is empty and something arrived;
    - a listed name is skipped while it is in flight or backing off after a failure;
    - a failure backs the name off for `retry_after` seconds; `once` (run --once)
      never retries it within the run (it stays in new/ for the next run).
    """

    def __init__(self, position: tuple[int, int] = (0, 1), *, once: bool = False) -> None:
        self.position = position
        self.once = once
        self.arrived = True  # something may be in new/ that is not in the backlog
        self.backlog: deque[str] = deque()
        self.in_flight: set[str] = set()
        self.failed: dict[str, float] = {}  # name -> when it may be tried again

    def needs_listing(self) -> bool:
        return not self.backlog and self.arrived

    def has_work(self) -> bool:
        return bool(self.backlog) or self.arrived

    def listed(self, names: Sequence[str], now: float) -> None:
        """The names new/ holds now; those worth trying join the backlog."""
        self.arrived = False
        if not self.once:
            for name, when in list(self.failed.items()):
                if when <= now:
                    del self.failed[name]
        fresh = [n for n in names if n not in self.failed and n not in self.in_flight]
        self.backlog.extend(own_share_first(fresh, *self.position))

    def take(self, room: int) -> list[str]:
        """Up to `room` (at most ACCEPT_CHUNK) names to hand in now; they are in flight."""
        count = min(len(self.backlog), room, ACCEPT_CHUNK)
        names = [self.backlog.popleft() for _ in range(max(0, count))]
        self.in_flight.update(names)
        return names

    def recorded(self, name: str, *, failed: bool, now: float, retry_after: float) -> None:
        """The result of `name`'s acceptance is known and logged: it leaves flight."""
        if failed:
            self.failed[name] = now + retry_after
        self.in_flight.discard(name)


class Intake:
    """new/ -> queue/ through the committer; each accepted message goes into the plan.

    Acceptances run in the background and each message is dispatchable as soon as it
    is durable, so the scan loop goes on dispatching meanwhile. Accepted messages are
    kept in `fresh` until dispatched: no need to read them back from the disk.
    """

    def __init__(self, rt: Runtime, io: Callable[..., Any], *,
                 position: tuple[int, int] = (0, 1), once: bool = False) -> None:
        self._rt = rt
        self._io = io  # awaitable runner of a blocking spool call on the I/O thread
        self.book = IntakeBook(position, once=once)
        self.fresh: dict[str, Accepted] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        """Messages on their way to the workers: being accepted, or accepted and due."""
        return len(self.book.in_flight) + len(self.fresh)

    async def accept_incoming(self, room: int) -> int:
        """Start accepting the next part of new/; return how many were started."""
        spool, book = self._rt.spool, self.book
        if book.needs_listing():
            book.listed(await self._io(spool.incoming), time.monotonic())
        names = book.take(room)
        if not names:
            return 0
        now = time.time()
        # Handed in together, so they become due together and CheckFile orders them.
        futures = self._rt.committer.submit([spool.accept_steps(name, now) for name in names])
        task = asyncio.create_task(self._accepted(names, futures))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return len(names)

    async def settle(self) -> None:
        """Wait for the acceptances under way (shutdown): their messages are queued."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accepted(self, names: list[str], futures: list[asyncio.Future[Any]]) -> None:
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except BaseException:
            for name in names:
                self.book.in_flight.discard(name)
            raise
        finally:
            self._rt.wake.set()
        retry_after = self._rt.config.queue.scan_interval
        for name, result in zip(names, results, strict=True):
            failed = False
            if isinstance(result, Accepted):
                envelope = result.message.envelope
                event("queued", result.id, sender=envelope.sender,
                      recipients=[r.address for r in envelope.recipients],
                      size=len(result.message.data))
                self.fresh[result.id] = result
                self._rt.plan.schedule(result.id, result.state.next_try, fresh=True)
            elif isinstance(result, Quarantined):
                event("quarantined", result.id, logging.WARNING, reason=result.reason)
            elif isinstance(result, MxsendError):
                # The disk said no (EIO, EACCES, ENOSPC): the file is back in new/ and
                # waits a scan interval, not a hot loop of error lines.
                log.error("could not accept %s: %s", name, result)
                failed = True
            elif isinstance(result, BaseException):
                # A bug: the file stays in our incoming/, which recovery hands back.
                log.error("accepting %s failed unexpectedly: %r", name, result)
            self.book.recorded(name, failed=failed, now=time.monotonic(),
                               retry_after=retry_after)
