"""Dispatch: due messages are claimed, checked by the script and queued for a worker.

The ready window bounds how many claimed messages wait for a worker at once: enough to
order by priority, few enough that 100,000 due messages do not all sit in memory. A
claim is an atomic rename (another process may win it); CheckFile then decides for the
whole batch in one call to the script's worker, before any of it is queued, so that
with one free worker the highest Priority really goes first (contract §4).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field

from mxsend import schedule
from mxsend.actions import FileActions
from mxsend.delivery_event import attempt_info
from mxsend.dkim_spool import domain_in
from mxsend.envelope import Message, header_lines
from mxsend.errors import MxsendError
from mxsend.log import event, get_logger
from mxsend.policy import CheckFileRequest
from mxsend.record import Recorder
from mxsend.runtime import Runtime
from mxsend.spool import Accepted, Claim, MessageState

log = get_logger()

READY_WINDOW_PER_WORKER = 4
READY_WINDOW_MIN = 256
# The queue's messages may fill at most this share of the ready window; the rest is
# kept for new mail, which then never waits for a retry sweep's jobs to drain to half
# the window before it is dispatched (issue 16 item 7; with slow servers and a long
# scan interval, 133 attempts of the sweep went before a new message without it).
QUEUE_SHARE = 0.75


def ready_window(workers: int) -> int:
    """How many claimed messages may wait for `workers` delivery workers."""
    return max(READY_WINDOW_MIN, READY_WINDOW_PER_WORKER * workers)


JobKey = tuple[int, int, int]  # (-Priority, place, lane)
NEW_MAIL, QUEUED = 0, 1  # the lanes: just accepted from new/, or from queue/


class JobOrder:
    """Where a claimed message waits for a worker: highest Priority first (clamped to
    1..100, contract §4), then new mail and the queue's messages in turn.

    Not "oldest first": in a retry sweep every queued message is older than new mail,
    and with a steady supply of them a new message waited for the whole sweep (9 s for
    30,000 in scripts/bench; issue 16 item 7). Nor only in the order of dispatch: a new
    message then waited for every job of the ready window before it (hundreds in a
    sweep). The queue's messages take places in dispatch order; a new message takes the
    place after that of the job a worker took last, or the one after the last new
    message's, whichever is later, and goes first of the two at one place. So the
    workers alternate between the two while both have jobs, as Postfix's queue manager
    alternates its incoming and deferred queues, and neither can starve the other.
    """

    def __init__(self) -> None:
        self._queue_places = itertools.count()
        self._fresh_next = 0
        self._served = -1  # the place of the job a worker took last

    def key(self, priority: int, fresh: bool) -> JobKey:
        if fresh:
            place = max(self._fresh_next, self._served + 1)
            self._fresh_next = place + 1
        else:
            place = next(self._queue_places)
        return -max(1, min(100, priority)), place, NEW_MAIL if fresh else QUEUED

    def taken(self, key: JobKey) -> None:
        self._served = max(self._served, key[1])


@dataclass(order=True, slots=True)
class Job:
    """A claimed message waiting for a worker; ordered by `JobOrder`."""

    sort_key: JobKey
    claim: Claim = field(compare=False)
    state: MessageState = field(compare=False)
    message: Message = field(compare=False)
    actions: FileActions = field(compare=False)

    @property
    def new_mail(self) -> bool:
        return self.sort_key[2] == NEW_MAIL


class Dispatcher:
    def __init__(self, rt: Runtime, recorder: Recorder, fresh: dict[str, Accepted]) -> None:
        self._rt = rt
        self._recorder = recorder
        self._fresh = fresh  # intake's accepted messages: no need to read them back
        self.jobs: asyncio.PriorityQueue[Job] = asyncio.PriorityQueue()
        self._order = JobOrder()
        self._queue_waiting = 0  # jobs of the QUEUED lane in the ready window
        self._loading = 0  # claimed for a batch, not yet in the ready window
        self._queue_batch: asyncio.Task[int] | None = None

    def ready_window(self) -> int:
        return ready_window(self._rt.config.smtp.max_connections)

    def room(self) -> int:
        """How many more jobs may wait (new mail may take all of it)."""
        return self.ready_window() - self.jobs.qsize() - self._loading

    @property
    def busy(self) -> bool:
        """A batch of the queue's messages is being dispatched in the background."""
        return self._queue_batch is not None and not self._queue_batch.done()

    def queue_room(self) -> int:
        """How many more of the queue's messages may wait (QUEUE_SHARE of the window)."""
        return min(self.room(), int(self.ready_window() * QUEUE_SHARE) - self._queue_waiting)

    async def dispatch_due(self, stopping: asyncio.Event | None = None) -> int:
        """Claim due messages, ask CheckFile, and hand them to the workers; the number
        of new messages handed over.

        New mail is dispatched here, a batch of its own (its calls urgent at the
        script's worker); the queue's messages in a batch in the background, one at a
        time. In a retry sweep such a batch is hundreds of claims, reads and CheckFile
        calls, which new mail would otherwise wait for in full, and the scan loop too.
        """
        room = self.room()
        if room <= 0:
            return 0
        plan, claimed = self._rt.plan, self._rt.claimed
        new_mail = plan.take_due(time.time(), room, claimed, queue_limit=0)
        dispatched = await self._dispatch(new_mail, True, stopping)
        queue_room = self.queue_room()
        if not self.busy and queue_room > 0 and not (stopping and stopping.is_set()):
            queued = plan.take_due(time.time(), queue_room, claimed, fresh_limit=0)
            if queued:
                self._queue_batch = asyncio.get_running_loop().create_task(
                    self._dispatch_queued(queued, stopping))
        return dispatched

    async def _dispatch_queued(self, queue_ids: list[str],
                               stopping: asyncio.Event | None) -> int:
        try:
            return await self._dispatch(queue_ids, False, stopping)
        except (MxsendError, OSError) as exc:
            # As the scan loop's own failures: nothing is lost, the next batch tries again.
            log.error("dispatch failed: %s", exc)
            return 0
        finally:
            self._rt.wake.set()  # the scan loop may start the next batch

    async def _dispatch(self, queue_ids: list[str], new_mail: bool,
                        stopping: asyncio.Event | None) -> int:
        rt = self._rt
        loaded: list[tuple[Claim, MessageState, Message]] = []
        try:
            for queue_id in queue_ids:
                if stopping is not None and stopping.is_set():
                    rt.plan.schedule(queue_id, time.time(), fresh=new_mail)
                    continue
                claimed = await self._claim(queue_id)
                if claimed is not None:
                    loaded.append(claimed)
                    self._loading += 1
            if not loaded:
                return 0
            verdicts = await self._check_files(loaded, new_mail)
        except BaseException:
            # Shutdown (drain) while the batch was being checked, or the disk said no:
            # its claims go back to the queue untouched, as those waiting in the ready
            # window do at shutdown.
            for claim, state, _ in loaded:
                with contextlib.suppress(MxsendError, OSError):
                    await self._recorder.release_untouched(claim, state)
            raise
        finally:
            self._loading -= len(loaded)
        skipped = []
        for (claim, state, message), actions in zip(loaded, verdicts, strict=True):
            if actions.skip_send:
                # Not an attempt: released for the next scan (contract §4 SkipSend).
                event("skipped", claim.id, reason=actions.reason)
                skipped.append(self._recorder.release_untouched(
                    claim, state, delay=rt.config.queue.scan_interval))
                continue
            key = self._order.key(actions.priority, new_mail)
            self.jobs.put_nowait(Job(key, claim, state, message, actions))
            if not new_mail:
                self._queue_waiting += 1
        await asyncio.gather(*skipped)
        return len(loaded) - len(skipped)

    async def _check_files(self, loaded: list[tuple[Claim, MessageState, Message]],
                           new_mail: bool) -> list[FileActions]:
        rt = self._rt
        assert rt.policy is not None
        return await rt.policy.check_files([
            CheckFileRequest(
                queue_id=claim.id,
                filename=rt.spool.message_file(claim.id),
                size=len(message.data),
                creation_time=state.created,
                retries=state.attempts,
                last_try_time=state.last_try,
                return_path=message.envelope.sender,
                recipients=tuple(r.address for r in state.pending()),
                data=message.data,
                dkim_domain=domain_in(rt.signer, state, message.data),
            )
            for claim, state, message in loaded
        ], rt.signer.domains,
            urgent=frozenset(claim.id for claim, _, _ in loaded) if new_mail else ())

    async def next_job(self) -> Job:
        """The job a worker takes next."""
        job = await self.jobs.get()
        self._order.taken(job.sort_key)
        if not job.new_mail:
            self._queue_waiting -= 1
        return job

    async def drain(self) -> None:
        """Shutdown: claimed but not started goes back to the queue untouched, due at once."""
        if self._queue_batch is not None:
            self._queue_batch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._queue_batch
        while not self.jobs.empty():
            job = self.jobs.get_nowait()
            if not job.new_mail:
                self._queue_waiting -= 1
            await self._recorder.release_untouched(job.claim, job.state)
            self.jobs.task_done()

    async def _claim(self, queue_id: str) -> tuple[Claim, MessageState, Message] | None:
        """Claim a due message and load it; None if another process has it or it expired."""
        rt = self._rt
        fresh = self._fresh.pop(queue_id, None)
        claim = rt.spool.claim(queue_id)
        if claim is None:
            return None  # another process has it
        rt.claimed.add(queue_id)
        try:
            if fresh is not None:
                state, message = fresh.state, fresh.message
            else:
                state = rt.spool.read(claim)
                message = rt.spool.load_message(queue_id)
        except MxsendError as exc:
            log.error("message %s unreadable, retried later: %s", queue_id, exc)
            await self._recorder.release_untouched(claim, None,
                                                   delay=rt.config.queue.retry[0])
            return None
        now = time.time()
        if schedule.expired(state.created, now, rt.config.queue.max_age):
            info = attempt_info(message.envelope, header_lines(message.data),
                                attempt=state.attempts, created=state.created, started=now)
            expired = self._recorder.give_up(queue_id, state, schedule.GiveUp.EXPIRED, now,
                                             info)
            await self._recorder.finish(claim, expired, message, now, before=state,
                                        next_try=None)
            return None
        return claim, state, message
