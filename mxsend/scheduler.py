"""The daemon: scan, watch, prioritise, dispatch, record, shut down.

Data flows one way: spool -> scheduler -> policy -> delivery (mx, smtp) -> outcome ->
spool. This module owns the asyncio side of that flow and nothing that decides: when to
retry is schedule.py's, what a reply means is outcome.py's, what a DSN says is
bounce.py's. It is also the one place that logs the contract's events for a message.

A message's life here:

1. a file appears in new/ (watchdog wakes us; a rescan every scan_interval catches
   lost events) -> Spool.accept: quarantined, or queued and due now (`queued` event);
2. due -> claimed (atomic rename; another process may win) -> CheckFile. Skipped:
   released for the next scan, not counted as an attempt (`skipped`). Otherwise it waits
   in a priority queue, highest Priority first, for a free delivery worker;
3. a worker groups the pending recipients by domain, delivers each group concurrently
   (one transaction per domain), records every outcome (`delivery`), queues DSNs
   (`bounce`), and either completes the message or releases it with its next try.

The claim itself is the durable mark that an attempt started: if the process dies, the
claim is recovered by the next heartbeat of any process, and the attempt is counted
then (see _recover).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import logging
import signal
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mxsend import batv, bounce, schedule, sdnotify
from mxsend.actions import FileActions, ServerActions, ServerParameters
from mxsend.config import Config, load_config
from mxsend.delivery import Deliverer
from mxsend.envelope import Message, Recipient, header_lines, serialise_bsmtp
from mxsend.errors import ConfigError, MxsendError, SpoolError
from mxsend.log import event, get_logger, setup_logging
from mxsend.mx import Resolver
from mxsend.outcome import DeliveryStatus, RecipientOutcome
from mxsend.policy import CheckFileRequest, Policy
from mxsend.spool import (
    Accepted,
    Claim,
    GroupCommit,
    MessageState,
    Quarantined,
    RecipientState,
    RecipientStatus,
    Spool,
    Steps,
)
from mxsend.watch import Watcher

log = get_logger()
T = TypeVar("T")

# How often this process proves it is alive in owners/, and how old another process's
# heartbeat must be before its claims are taken back. The margin covers a loop stalled
# by a slow disk; a claim is only ever recovered from a process that stopped beating.
HEARTBEAT_INTERVAL = 5.0
STALE_AFTER = 60.0
# How many claimed messages may wait for a worker at once: enough to order by priority,
# bounded so that 100,000 due messages do not all sit in memory.
READY_WINDOW_PER_WORKER = 4
READY_WINDOW_MIN = 256
# Acceptances started per turn of the scan loop (see _accept_incoming).
ACCEPT_CHUNK = 64
# A message whose attempt was cut short by shutdown was no server's fault: it is due
# again at once, so the next start (or the other process sharing the spool) takes it.
INTERRUPTED_RETRY = 0.0
# One thread does the spool's waiting for the disk: batches make it enough, and more
# threads cost more in GIL hand-offs than they save (measured, docs/performance.md).
IO_THREADS = 1
# `run --once` stops after this many scans in a row fail (a daemon keeps trying).
SCAN_FAILURES_ONCE = 5


class _Committer:
    """Group commit for the daemon's spool operations.

    Operations run on the I/O thread (Spool.run_rolling) and join at the next barrier:
    under load each syncfs serves many messages at different stages, and an idle
    daemon still commits a lone operation at once. Results come back to the loop once
    per round.
    """

    def __init__(self, spool: Spool, executor: ThreadPoolExecutor) -> None:
        self._spool = spool
        self._executor = executor
        self._lock = threading.Lock()
        self._pending: list[tuple[Steps[Any], asyncio.Future[Any]]] = []
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, steps: Steps[T]) -> T:
        [done] = self.submit([steps])
        result: T = await done
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

    @staticmethod
    def _deliver(finished: list[tuple[asyncio.Future[Any], object]]) -> None:
        for done, result in finished:
            if done.done():
                continue  # its waiter was cancelled; the operation still happened
            if isinstance(result, BaseException):
                done.set_exception(result)
            else:
                done.set_result(result)


@dataclass(order=True, slots=True)
class _Job:
    """A claimed message waiting for a worker; ordered by priority, then age."""

    sort_key: tuple[int, float, int]
    claim: Claim = field(compare=False)
    state: MessageState = field(compare=False)
    message: Message = field(compare=False)
    actions: FileActions = field(compare=False)


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


def group_by_domain(
    recipients: Iterable[Recipient], pending: set[str]
) -> dict[str, list[Recipient]]:
    """Pending recipients grouped by domain, in envelope order (one transaction each)."""
    groups: dict[str, list[Recipient]] = {}
    for recipient in recipients:
        if recipient.address in pending:
            groups.setdefault(recipient.domain, []).append(recipient)
    return groups


def apply_outcomes(
    state: MessageState, outcomes: Iterable[RecipientOutcome], now: float
) -> MessageState:
    """Fold per-recipient outcomes into the message state (pure)."""
    by_address = {outcome.address: outcome for outcome in outcomes}
    recipients = []
    for rcpt in state.recipients:
        outcome = by_address.get(rcpt.address)
        if outcome is None or rcpt.status is not RecipientStatus.PENDING:
            recipients.append(rcpt)
            continue
        status = {
            DeliveryStatus.SENT: RecipientStatus.SENT,
            DeliveryStatus.BOUNCED: RecipientStatus.BOUNCED,
            DeliveryStatus.DEFERRED: RecipientStatus.PENDING,
        }[outcome.status]
        recipients.append(
            dataclasses.replace(
                rcpt,
                status=status,
                response=outcome.response,
                dsn=outcome.dsn,
                relay=outcome.relay or "",
                remote_mta=outcome.remote_mta or "",
                last_attempt=now,
            )
        )
    errors = [o.response for o in by_address.values() if o.status is DeliveryStatus.DEFERRED]
    return dataclasses.replace(
        state,
        recipients=tuple(recipients),
        last_error=errors[0] if errors else state.last_error,
    )


_GIVE_UP_REASONS = {
    schedule.GiveUp.FORCED: "the last try (ForceLastTry) failed",
    schedule.GiveUp.EXPIRED: "message expired in the queue",
}


def give_up(state: MessageState, reason: schedule.GiveUp, now: float) -> MessageState:
    """Every pending recipient becomes bounced, keeping its last reply if it had one."""
    text = _GIVE_UP_REASONS[reason]
    recipients = tuple(
        dataclasses.replace(
            rcpt,
            status=RecipientStatus.BOUNCED,
            response=f"{text}; last reply: {rcpt.response}" if rcpt.response else text,
            dsn=schedule.give_up_status(reason, rcpt.dsn or None),
            last_attempt=rcpt.last_attempt or now,
        )
        if rcpt.status is RecipientStatus.PENDING
        else rcpt
        for rcpt in state.recipients
    )
    return dataclasses.replace(state, recipients=recipients)


class Daemon:
    """`mxsend run`: owns the spool, the policy, the deliverer and the event loop's tasks.

    Spool I/O that waits for the disk (accept, release, complete, queueing a DSN,
    recovery, the full rescan) runs on one I/O thread; accept, update, release,
    complete and queueing go through a _Committer, so that the operations of many
    messages share each barrier (one syncfs under spool.GroupCommit) instead of each
    serialising the loop on its own fsyncs. Claims, reads and everything that decides
    stay on the event loop.
    """

    def __init__(self, config: Config, *, once: bool = False,
                 position: tuple[int, int] = (0, 1)) -> None:
        self.config = config
        self.once = once
        self.position = position  # daemon i of n on this spool (queue.processes)
        self.spool = Spool(config.spool.path, keep_sent=config.spool.keep_sent,
                           max_message_size=config.spool.max_message_size)
        self.policy: Policy | None = None
        self.deliverer: Deliverer | None = None
        self.reporting_mta = config.smtp.helo_name or socket.getfqdn()
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="mxsend-spool")
        # The committer's runner may run for as long as operations keep coming: it has
        # a thread of its own, so that listings (new/, queue/) never wait behind it.
        self._commit_thread = ThreadPoolExecutor(1, thread_name_prefix="mxsend-commit")
        self._commit: GroupCommit | None = None
        self._committer = _Committer(self.spool, self._commit_thread)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._jobs: asyncio.PriorityQueue[_Job] = asyncio.PriorityQueue()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._claimed: set[str] = set()
        # What is in queue/ and when it is due, kept in memory between full rescans so
        # that 100,000 deferred messages cost nothing while they wait.
        self._planned: dict[str, float] = {}
        self._plan: list[tuple[float, str]] = []
        self._fresh: dict[str, Accepted] = {}  # just accepted: no need to read them back
        self._accepting = 0  # acceptances under way (each goes through four barriers)
        self._accepts: set[asyncio.Task[None]] = set()
        # Files whose acceptance failed (the disk said no: EIO, EACCES, ENOSPC) and when
        # they may be tried again: the failure hands the file back to new/, and without
        # this its inotify event retried it at once, a hot loop of error lines.
        self._accept_failed: dict[str, float] = {}
        self._backlog: deque[str] = deque()  # names listed in new/, not yet accepted
        self._new_arrived = True
        self._rescan_requested = True
        self._sequence = itertools.count()
        self._workers: list[asyncio.Task[None]] = []
        self._watcher: Watcher | None = None
        self._batv_key: bytes | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def _spool_io(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, function, *args)

    # --- lifecycle -----------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._batv_key = read_batv_key(self.config)
        self.spool.create_dirs()
        if GroupCommit.available():
            self._commit = GroupCommit(self.config.spool.path)
            self.spool = Spool(self.config.spool.path, keep_sent=self.config.spool.keep_sent,
                               max_message_size=self.config.spool.max_message_size,
                               owner=self.spool.owner, durable=self._commit)
            self._committer = _Committer(self.spool, self._commit_thread)
        self.spool.heartbeat()
        self.policy = Policy(self.config)
        self.deliverer = Deliverer(
            self.config, Resolver(self.config.dns), batv_key=self._batv_key
        )
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        await self._recover()
        if not self.once:
            self._start_watching(loop)
        worker_count = self.config.smtp.max_connections
        self._workers = [asyncio.create_task(self._worker()) for _ in range(worker_count)]
        heartbeat = asyncio.create_task(self._heartbeat())
        log.info("mxsend started: spool %s, %d workers", self.config.spool.path, worker_count)
        try:
            await self._scan_loop()
        finally:
            await self._shutdown()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self._io.shutdown(wait=True)
            self._commit_thread.shutdown(wait=True)
            if self._commit is not None:
                self._commit.close()
        return 0

    async def _shutdown(self) -> None:
        sdnotify.notify("STOPPING=1")
        self._stop_watching()
        # Acceptances under way finish (a few barriers): their messages are then queued.
        await asyncio.gather(*self._accepts, return_exceptions=True)
        # Claimed but not started: back to the queue untouched, due at once.
        while not self._jobs.empty():
            job = self._jobs.get_nowait()
            await self._release_untouched(job.claim, job.state)
            self._jobs.task_done()
        in_flight = list(self._in_flight.values())
        if in_flight:
            log.info("waiting up to %.0fs for %d deliveries", self.config.queue.shutdown_grace,
                     len(in_flight))
            _, pending = await asyncio.wait(in_flight, timeout=self.config.queue.shutdown_grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self.deliverer is not None:
            await self.deliverer.close()
        if self.policy is not None:
            self.policy.stop_watching()
            self.policy.close()
        self.spool.retire()
        log.info("mxsend stopped")

    def _reload(self) -> None:
        """SIGHUP: re-read the config and the script; what needs a restart is logged."""
        config = self.config
        batv_key = self._batv_key
        if config.source is not None:
            try:
                config = load_config(config.source)
                batv_key = read_batv_key(config)
            except ConfigError as exc:
                log.error("SIGHUP: config not reloaded, keeping the running one: %s", exc)
                config = self.config
            else:
                if config.spool != self.config.spool:
                    log.warning("SIGHUP: [spool] changes take effect at the next restart")
                    config = dataclasses.replace(config, spool=self.config.spool)
        if config == self.config:
            if self.policy is not None:
                self.policy.reload()
            log.info("SIGHUP: script reloaded")
            return
        setup_logging(config.log.format, config.log.level)
        old_policy, old_deliverer = self.policy, self.deliverer
        if config.script.path == self.config.script.path and old_policy is not None:
            old_policy.reconfigure(config)
            old_policy = None
        else:
            self.policy = Policy(config)
            if self._watcher is not None:
                self.policy.watch(self._watcher)
            if old_policy is not None:
                old_policy.stop_watching()
        self.config = config
        self._batv_key = batv_key
        self.deliverer = Deliverer(config, Resolver(config.dns), batv_key=batv_key)
        task = asyncio.get_running_loop().create_task(self._retire(old_policy, old_deliverer))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        self._rescan_requested = True
        self._wake.set()
        log.info("SIGHUP: configuration reloaded")

    async def _retire(self, policy: Policy | None, deliverer: Deliverer | None) -> None:
        """Close what SIGHUP replaced once the deliveries that still use it are done."""
        in_flight = list(self._in_flight.values())
        if in_flight:
            await asyncio.wait(in_flight)
        if deliverer is not None:
            await deliverer.close()
        if policy is not None:
            policy.close()

    async def _heartbeat(self) -> None:
        watchdog = sdnotify.watchdog_interval()
        interval = min(HEARTBEAT_INTERVAL, watchdog) if watchdog else HEARTBEAT_INTERVAL
        while True:
            await asyncio.sleep(interval)
            try:
                self.spool.heartbeat()
                await self._recover()
            except MxsendError as exc:
                log.error("heartbeat failed: %s", exc)
            sdnotify.notify("WATCHDOG=1")

    async def _recover(self) -> None:
        """Take back claims of processes that died; their interrupted attempt counts.

        Counting it backs off a message that kills its daemon every time it is tried,
        instead of crashing in a loop.
        """
        for queue_id, next_try in await self._spool_io(self._recover_claims, time.time()):
            log.warning("recovered message %s from a process that stopped", queue_id)
            self._schedule(queue_id, next_try)

    def _recover_claims(self, now: float) -> list[tuple[str, float]]:
        """On the I/O pool: recover, count the interrupted attempt, give them back."""
        recovered = []
        for queue_id in self.spool.recover(STALE_AFTER, now):
            claim = self.spool.claim(queue_id)
            if claim is None:
                continue
            try:
                state = self.spool.read(claim)
                attempts = state.attempts + 1
                next_try = schedule.next_try(self.config.queue.retry, attempts, now)
                self.spool.release(claim, dataclasses.replace(
                    state, attempts=attempts, last_try=now, next_try=next_try,
                    last_error=state.last_error or "interrupted by a process that stopped",
                ))
            except MxsendError as exc:
                log.error("could not record the recovery of %s: %s", queue_id, exc)
                continue
            recovered.append((queue_id, next_try))
        return recovered

    # --- watching ------------------------------------------------------------------

    def _start_watching(self, loop: asyncio.AbstractEventLoop) -> None:
        def arrived() -> None:
            self._new_arrived = True
            self._wake.set()

        def rescan() -> None:
            self._rescan_requested = True
            self._wake.set()

        root = self.config.spool.path
        self._watcher = Watcher(loop)
        self._watcher.add(root / "new", arrived)
        self._watcher.add(root / "control", rescan, touch=True)
        if self.policy is not None:
            self.policy.watch(self._watcher)

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    # --- the plan: what is queued and when it is due -------------------------------

    def _schedule(self, queue_id: str, when: float) -> None:
        self._planned[queue_id] = when
        heapq.heappush(self._plan, (when, queue_id))

    def _take_due(self, now: float, limit: int) -> list[str]:
        due: list[str] = []
        while self._plan and len(due) < limit:
            when, queue_id = self._plan[0]
            if self._planned.get(queue_id) != when:
                heapq.heappop(self._plan)  # superseded by a later _schedule
                continue
            if when > now:
                break
            heapq.heappop(self._plan)
            del self._planned[queue_id]
            if queue_id not in self._claimed:
                due.append(queue_id)
        return due

    def _next_planned(self) -> float | None:
        while self._plan and self._planned.get(self._plan[0][1]) != self._plan[0][0]:
            heapq.heappop(self._plan)
        return self._plan[0][0] if self._plan else None

    async def _rescan(self) -> None:
        """Re-read queue/ (other processes, the queue CLI, lost events) and new/."""
        queued = await self._spool_io(self.spool.queued)
        self._planned = {queue_id: when for when, queue_id in queued}
        self._plan = [(when, queue_id) for when, queue_id in queued]
        heapq.heapify(self._plan)
        self._new_arrived = True

    # --- the scan loop -------------------------------------------------------------

    async def _scan_loop(self) -> None:
        ready_signalled = False
        next_rescan = 0.0
        failures = 0
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                if self._rescan_requested or time.monotonic() >= next_rescan:
                    self._rescan_requested = False
                    await self._rescan()
                    next_rescan = time.monotonic() + self.config.queue.scan_interval
                accepted = await self._accept_incoming()
                dispatched = await self._dispatch_due()
                failures = 0
            except (MxsendError, OSError) as exc:
                # The disk said no (EIO, EMFILE, a full disk): nothing is lost, since
                # every message is still where the spool left it. Keep the daemon up
                # and try again, a little later each time; --once gives up after a few.
                failures += 1
                log.error("scan failed (%d in a row): %s", failures, exc)
                if self.once and failures >= SCAN_FAILURES_ONCE:
                    raise
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(),
                                           min(30.0, 0.5 * 2**failures))
                continue
            if not ready_signalled:
                sdnotify.notify_ready()
                ready_signalled = True
            if self.once:
                if accepted or dispatched:
                    continue
                if not self._jobs.empty() or self._in_flight or self._accepting:
                    # Woken by an acceptance finishing or by the workers; what they
                    # queue (DSNs, into new/) is looked for once the backlog is empty.
                    await self._sleep_until(next_rescan)
                    self._new_arrived = True
                    continue
                if self._new_arrived:
                    continue
                return
            if (self._backlog or self._new_arrived) and self._room() > 0:
                continue
            await self._sleep_until(next_rescan)

    async def _sleep_until(self, next_rescan: float) -> None:
        timeout = max(0.0, next_rescan - time.monotonic())
        # With the ready window full, due messages wait for the workers, who wake us
        # when it is half empty; only otherwise does the next due time matter.
        next_due = self._next_planned()
        if next_due is not None and self._room() > 0:
            timeout = max(0.0, min(timeout, next_due - time.time()))
        waits = [asyncio.ensure_future(self._wake.wait()),
                 asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()

    def _ready_window(self) -> int:
        workers = self.config.smtp.max_connections
        return max(READY_WINDOW_MIN, READY_WINDOW_PER_WORKER * workers)

    def _room(self) -> int:
        return (self._ready_window() - self._jobs.qsize() - len(self._fresh)
                - self._accepting)

    async def _accept_incoming(self) -> int:
        """Start accepting the next part of new/; return how many were started.

        Acceptances run in the background and each one's message is dispatchable as
        soon as it is durable: the scan loop goes on dispatching meanwhile. (Awaiting a
        window's acceptances before dispatching any made the daemon accept and deliver
        by turns, each half of the time idle.) At most ACCEPT_CHUNK start per turn, so
        they finish in a stream rather than all at once.
        """
        if not self._backlog and self._new_arrived:
            self._new_arrived = False
            incoming = await self._spool_io(self.spool.incoming)
            self._backlog.extend(own_share_first(self._retryable(incoming), *self.position))
        count = min(len(self._backlog), self._room(), ACCEPT_CHUNK)
        if count <= 0:
            return 0
        names = [self._backlog.popleft() for _ in range(count)]
        now = time.time()
        self._accepting += count
        # Handed in together, so they become due together and CheckFile orders them.
        futures = self._committer.submit([self.spool.accept_steps(name, now)
                                          for name in names])
        task = asyncio.create_task(self._accepted(names, futures))
        self._accepts.add(task)
        task.add_done_callback(self._accepts.discard)
        return count

    async def _accepted(self, names: list[str], futures: list[asyncio.Future[Any]]) -> None:
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            self._accepting -= len(names)
            self._wake.set()
        for name, result in zip(names, results, strict=True):
            if isinstance(result, Accepted):
                envelope = result.message.envelope
                event("queued", result.id, sender=envelope.sender,
                      recipients=[r.address for r in envelope.recipients],
                      size=len(result.message.data))
                self._fresh[result.id] = result
                self._schedule(result.id, result.state.next_try)
            elif isinstance(result, Quarantined):
                event("quarantined", result.id, logging.WARNING, reason=result.reason)
            elif isinstance(result, MxsendError):
                log.error("could not accept %s: %s", name, result)
                self._accept_failed[name] = time.monotonic() + self.config.queue.scan_interval
            elif isinstance(result, BaseException):
                # A bug: the file stays in our incoming/, which recovery hands back.
                log.error("accepting %s failed unexpectedly: %r", name, result)

    def _retryable(self, names: list[str]) -> list[str]:
        """`names` without those whose acceptance failed lately: they wait a scan
        interval (and `run --once` leaves them in new/ for the next run)."""
        if not self._accept_failed:
            return names
        now = time.monotonic()
        for name, when in list(self._accept_failed.items()):
            if when <= now and not self.once:
                del self._accept_failed[name]
        return [name for name in names if name not in self._accept_failed]

    async def _dispatch_due(self) -> int:
        """Claim due messages, ask CheckFile, and hand the batch to the workers at once.

        The whole batch is checked (one call to the script's worker for all of it)
        before any of it is queued, so that with one free worker the highest Priority
        really goes first (contract §4).
        """
        room = self._ready_window() - self._jobs.qsize()
        if room <= 0:
            return 0
        loaded: list[tuple[Claim, MessageState, Message]] = []
        for queue_id in self._take_due(time.time(), room):
            if self._stopping.is_set():
                self._schedule(queue_id, time.time())
                continue
            claimed = await self._claim(queue_id)
            if claimed is not None:
                loaded.append(claimed)
        if not loaded:
            return 0
        assert self.policy is not None
        verdicts = await self.policy.check_files([
            CheckFileRequest(
                queue_id=claim.id,
                filename=self.spool.message_file(claim.id),
                size=len(message.data),
                creation_time=state.created,
                retries=state.attempts,
                last_try_time=state.last_try,
                return_path=message.envelope.sender,
                recipients=tuple(r.address for r in state.pending()),
                data=message.data,
            )
            for claim, state, message in loaded
        ])
        skipped = []
        for (claim, state, message), actions in zip(loaded, verdicts, strict=True):
            if actions.skip_send:
                event("skipped", claim.id, reason=actions.reason)
                skipped.append(self._release_untouched(
                    claim, state, delay=self.config.queue.scan_interval))
                continue
            priority = max(1, min(100, actions.priority))
            self._jobs.put_nowait(_Job((-priority, state.created, next(self._sequence)),
                                       claim, state, message, actions))
        await asyncio.gather(*skipped)
        return len(loaded) - len(skipped)

    async def _claim(self, queue_id: str) -> tuple[Claim, MessageState, Message] | None:
        """Claim a due message and load it; None if another process has it or it expired."""
        fresh = self._fresh.pop(queue_id, None)
        claim = self.spool.claim(queue_id)
        if claim is None:
            return None  # another process has it
        self._claimed.add(queue_id)
        try:
            if fresh is not None:
                state, message = fresh.state, fresh.message
            else:
                state = self.spool.read(claim)
                message = self.spool.load_message(queue_id)
        except MxsendError as exc:
            log.error("message %s unreadable, retried later: %s", queue_id, exc)
            await self._release_untouched(claim, None, delay=self.config.queue.retry[0])
            return None
        now = time.time()
        if schedule.expired(state.created, now, self.config.queue.max_age):
            expired = self._give_up(queue_id, state, schedule.GiveUp.EXPIRED, now)
            await self._finish(claim, expired, message, now, before=state, next_try=None)
            return None
        return claim, state, message

    async def _release_untouched(
        self, claim: Claim, state: MessageState | None, delay: float = 0.0
    ) -> None:
        """Give a claim back without counting an attempt."""
        try:
            if state is None:
                state = self.spool.read(claim)
            released = dataclasses.replace(state, next_try=time.time() + delay)
            await self._committer.run(self.spool.release_steps(claim, released))
            self._schedule(claim.id, released.next_try)
        except MxsendError as exc:
            # The claim stays in active/ and comes back through recovery after restart.
            log.error("could not release %s: %s", claim.id, exc)
        finally:
            self._claimed.discard(claim.id)

    # --- workers -------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            job = await self._jobs.get()
            try:
                attempt = asyncio.create_task(self._attempt(job))
                self._in_flight[job.claim.id] = attempt
                try:
                    await attempt
                except asyncio.CancelledError:
                    if not attempt.done():
                        raise  # the worker itself is being stopped
                except Exception:
                    # A bug, not a delivery problem: keep the message, keep the worker.
                    log.exception("attempt of %s failed unexpectedly", job.claim.id)
                    await self._release_untouched(job.claim, None,
                                                  delay=self.config.queue.retry[0])
                finally:
                    self._in_flight.pop(job.claim.id, None)
                    self._claimed.discard(job.claim.id)
            finally:
                self._jobs.task_done()
                if self._jobs.qsize() < self._ready_window() // 2:
                    self._wake.set()

    async def _attempt(self, job: _Job) -> None:
        """One attempt of one message; never raises, never loses the claim."""
        claim, message = job.claim, job.message
        started = time.time()
        state = dataclasses.replace(job.state, attempts=job.state.attempts + 1,
                                    last_try=started)
        running = set(self._start_deliveries(claim.id, message, state))
        outcomes: list[RecipientOutcome] = []
        # What may be recorded before the attempt ends: only what servers accepted. A
        # bounce is recorded together with its DSN at the end, or not at all; the
        # attempt itself is counted at the end, or by recovery after a crash.
        durable = job.state
        try:
            while running:
                if len(running) == 1:
                    # The common case, one domain: no wait() machinery for one task. Its
                    # exception is _collect's to report; a cancellation of ours reaches
                    # it through this await and the handler below.
                    with contextlib.suppress(Exception):
                        await next(iter(running))
                    done, running = running, set()
                else:
                    done, running = await asyncio.wait(running,
                                                       return_when=asyncio.FIRST_COMPLETED)
                finished = self._collect(claim.id, done, state.attempts)
                outcomes += finished
                if not running:
                    break  # the record at the end covers everything
                sent = [o for o in finished if o.status is DeliveryStatus.SENT]
                if sent:
                    durable = apply_outcomes(durable, sent, time.time())
                    # Other domains are still in flight, maybe for minutes: what this one
                    # accepted is made durable now, so a crash cannot send it twice
                    # (contract §1: the duplicate window is only reply-to-record).
                    await self._committer.run(self.spool.update_steps(claim, durable))
        except asyncio.CancelledError:
            # Shutdown cut the attempt short. What a server already accepted is recorded
            # (it must never be sent again); the rest is a temporary failure, due again
            # at once after restart (contract §2, SIGTERM).
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            sent = [o for o in self._collect(claim.id, running, state.attempts)
                    if o.status is DeliveryStatus.SENT]
            await self._release_untouched(claim, apply_outcomes(durable, sent, time.time()),
                                          delay=INTERRUPTED_RETRY)
            raise
        state = apply_outcomes(state, outcomes, time.time())
        now = time.time()
        relayed = [o for o in outcomes if o.status is DeliveryStatus.SENT and o.dsn_relayed]
        next_try: float | None = None
        if state.pending():
            decision = schedule.after_temporary_failure(
                retry=self.config.queue.retry, attempts=state.attempts, created=state.created,
                now=now, max_age=self.config.queue.max_age,
                force_last_try=job.actions.force_last_try,
            )
            if decision.give_up is not None:
                state = self._give_up(claim.id, state, decision.give_up, now)
            next_try = decision.next_try
        await self._finish(claim, state, message, now, relayed=relayed, before=job.state,
                           next_try=next_try)

    def _collect(
        self, queue_id: str, tasks: Iterable[asyncio.Task[list[RecipientOutcome]]],
        attempt: int,
    ) -> list[RecipientOutcome]:
        """The outcomes of finished domain tasks, each logged as a `delivery` event."""
        outcomes: list[RecipientOutcome] = []
        for task in tasks:
            if not task.done() or task.cancelled():
                continue
            if task.exception() is not None:
                # A bug, not a delivery problem: those recipients stay pending.
                log.error("delivery of %s failed unexpectedly: %r", queue_id, task.exception())
                continue
            outcomes += task.result()
        if any(outcome.eight_bit_unadvertised for outcome in outcomes):
            # Contract §5: 8-bit data to a server without 8BITMIME is sent anyway, noted.
            log.warning("message %s has 8-bit data; a server did not offer 8BITMIME", queue_id)
        for outcome in outcomes:
            event("delivery", queue_id, recipient=outcome.address, status=str(outcome.status),
                  relay=outcome.relay, tls=outcome.tls, dsn=outcome.dsn,
                  response=outcome.response, attempt=attempt)
        return outcomes

    def _start_deliveries(
        self, queue_id: str, message: Message, state: MessageState
    ) -> list[asyncio.Task[list[RecipientOutcome]]]:
        """One task per recipient domain: one transaction each (contract §5)."""
        assert self.deliverer is not None and self.policy is not None
        policy, deliverer = self.policy, self.deliverer
        pending = {r.address for r in state.pending()}
        headers = header_lines(message.data)

        async def server_details(params: ServerParameters) -> ServerActions:
            return await policy.server_details(queue_id, params, headers)

        return [
            asyncio.create_task(
                deliverer.deliver(queue_id, message, recipients, domain, server_details)
            )
            for domain, recipients in group_by_domain(message.envelope.recipients,
                                                      pending).items()
        ]

    def _give_up(
        self, queue_id: str, state: MessageState, reason: schedule.GiveUp, now: float
    ) -> MessageState:
        """Bounce what is still pending, with a `delivery` event each (relay null)."""
        final = give_up(state, reason, now)
        for rcpt in final.recipients:
            if _status_of(state, rcpt.address) is RecipientStatus.PENDING:
                event("delivery", queue_id, recipient=rcpt.address, status="bounced",
                      relay=None, tls=None, dsn=rcpt.dsn, response=rcpt.response,
                      attempt=state.attempts)
        return final

    async def _finish(
        self,
        claim: Claim,
        state: MessageState,
        message: Message,
        now: float,
        *,
        relayed: Sequence[RecipientOutcome] = (),
        before: MessageState,
        next_try: float | None,
    ) -> None:
        """Queue the DSNs this attempt owes, then record the state durably.

        DSNs go into the spool first: a crash in between repeats a report, it never
        loses one. A failure report that cannot be queued (a full disk) leaves its
        recipients pending, so the bounce and its report are tried again with the
        message rather than recorded without the report the sender is owed.
        """
        newly_bounced = [
            r for r in state.recipients
            if r.status is RecipientStatus.BOUNCED
            and _status_of(before, r.address) is RecipientStatus.PENDING
        ]
        if not await self._queue_dsn(claim.id, message, state, newly_bounced,
                                     bounce.DsnAction.FAILED, now):
            unreported = {r.address for r in newly_bounced}
            state = dataclasses.replace(state, recipients=tuple(
                dataclasses.replace(r, status=RecipientStatus.PENDING)
                if r.address in unreported else r
                for r in state.recipients
            ))
        # A relayed recipient was accepted: it is never sent again, report or not.
        await self._queue_dsn(claim.id, message, state,
                              [_rcpt_state(state, o.address) for o in relayed],
                              bounce.DsnAction.RELAYED, now)
        state = await self._delay_warnings(claim.id, message, state, now)
        try:
            if state.is_final():
                await self._committer.run(self.spool.complete_steps(claim, state))
            else:
                if next_try is None:
                    next_try = schedule.next_try(self.config.queue.retry, state.attempts, now)
                await self._committer.run(self.spool.release_steps(
                    claim, dataclasses.replace(state, next_try=next_try)))
                self._schedule(claim.id, next_try)
        except MxsendError as exc:
            log.error("could not record the outcome of %s: %s", claim.id, exc)
        finally:
            self._claimed.discard(claim.id)

    async def _delay_warnings(
        self, queue_id: str, message: Message, state: MessageState, now: float
    ) -> MessageState:
        """One DELAY notice per recipient that asked for it (RFC 3461 §4.1)."""
        if state.is_final() or not schedule.delay_warning_due(
            state.created, now, self.config.queue.delay_warning, already=False
        ):
            return state
        due = [r for r in state.pending() if not r.delay_notified]
        if not due:
            return state
        if not await self._queue_dsn(queue_id, message, state, due,
                                     bounce.DsnAction.DELAYED, now):
            return state  # not notified: tried again at the next attempt
        notified = {r.address for r in due}
        return dataclasses.replace(state, recipients=tuple(
            dataclasses.replace(r, delay_notified=True) if r.address in notified else r
            for r in state.recipients
        ))

    async def _queue_dsn(
        self,
        queue_id: str,
        message: Message,
        state: MessageState,
        recipients: Sequence[RecipientState],
        action: bounce.DsnAction,
        now: float,
    ) -> bool:
        """Queue the report these recipients are owed; False if it could not be."""
        envelope_rcpts = {r.address: r for r in message.envelope.recipients}
        reported = []
        for rcpt in recipients:
            original = envelope_rcpts.get(rcpt.address)
            if original is None or not bounce.wants_report(original, action):
                continue
            reported.append(bounce.DsnRecipient(
                address=rcpt.address,
                orcpt=original.orcpt,
                action=action,
                status=rcpt.dsn or ("2.0.0" if action is bounce.DsnAction.RELAYED else "5.0.0"),
                remote_mta=rcpt.remote_mta or None,
                # A server's reply is typed smtp; a local reason (null MX, expiry) gets
                # bounce.py's own diagnostic type, so every report says why.
                diagnostic=rcpt.response or None,
                last_attempt=rcpt.last_attempt or None,
                will_retry_until=(schedule.expires_at(state.created, self.config.queue.max_age)
                                  if action is bounce.DsnAction.DELAYED else None),
            ))
        if not reported:
            return True
        try:
            dsn = bounce.build_dsn(
                original=message, queue_id=queue_id, recipients=reported,
                reporting_mta=self.reporting_mta, arrival=state.created, now=now,
                message_id_domain=self.reporting_mta,
            )
            if dsn is None:
                return True  # nobody to report to (the null sender)
            bounce_id = await self._committer.run(self.spool.enqueue_steps(serialise_bsmtp(dsn)))
        except MxsendError as exc:
            log.error("could not queue the %s report for %s: %s", action, queue_id, exc)
            return False
        except Exception:
            # A bug in building the report must not turn into a failed attempt: the
            # recipients already sent would then be sent again.
            log.exception("could not build the %s report for %s", action, queue_id)
            return False
        event("bounce", queue_id, bounce_id=bounce_id, recipients=[r.address for r in reported])
        self._wake.set()
        return True


def _status_of(state: MessageState, address: str) -> RecipientStatus | None:
    for rcpt in state.recipients:
        if rcpt.address == address:
            return rcpt.status
    return None


def _rcpt_state(state: MessageState, address: str) -> RecipientState:
    for rcpt in state.recipients:
        if rcpt.address == address:
            return rcpt
    raise KeyError(address)


def read_batv_key(config: Config) -> bytes | None:
    """The BATV secret if one is configured; read once at start and on SIGHUP."""
    if config.batv.key_file is None:
        return None
    return batv.load_key(config.batv.key_file)


async def run_daemon(config: Config, *, once: bool = False,
                     position: tuple[int, int] = (0, 1)) -> int:
    return await Daemon(config, once=once, position=position).run()
